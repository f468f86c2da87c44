//! How this node reaches a backend: out interface, next-hop MAC and our MAC, i.e. what
//! `lb_common::Backend` needs so XDP can rewrite Ethernet headers without a FIB lookup.
//!
//! We ask the kernel (`ip -j route get`, `ip -j neigh`, `ip -j link`) rather than
//! re-implementing routing: whatever the CNI installed is the truth. Everything runs in the
//! network namespace of the calling thread.
//!
//! Local vs remote: a pod on this node sits behind a host route on its own veth (AWS VPC CNI,
//! Calico, Cilium, the lab), so a gateway-less route on a device whose own IPv4 subnets do
//! not contain the address is a local pod. A route via a gateway, or to a neighbour on a
//! shared subnet of the device (another host on the node LAN), is remote.

use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How long to wait for ARP after triggering it.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);
const RESOLVE_POLL: Duration = Duration::from_millis(20);
/// The discard port: the trigger datagram must cause no work at the receiver.
const DISCARD_PORT: u16 = 9;

/// Where and how to send packets for one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Out interface: the pod's host-side veth (local) or the NIC towards the gateway.
    pub ifindex: u32,
    /// The pod's MAC (local) or the next hop's MAC (remote).
    pub dmac: [u8; 6],
    /// MAC of `ifindex`.
    pub smac: [u8; 6],
    /// The backend is a pod on this node, reached through its own veth.
    pub local: bool,
    /// The next hop, when the route goes via a gateway.
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetinfoError {
    #[error("could not run `ip {args}`: {source}; install iproute2 (Debian: apt-get install -y iproute2)")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed ({status}): {stderr}")]
    Ip {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("could not parse `ip {args}` output: {source}; iproute2 with JSON output (-j, 4.13 or later) is needed")]
    Json {
        args: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no route to backend {addr}: {stderr}; this node needs a route to the pod network")]
    NoRoute { addr: Ipv4Addr, stderr: String },
    #[error("backend {addr} is an address of this host (route type {kind}); a backend must be a pod or another host")]
    LocalAddress { addr: Ipv4Addr, kind: String },
    #[error("the route to backend {addr} is {detail}, which XDP delivery cannot use; give the node a plain unicast IPv4 route to it")]
    UnusableRoute { addr: Ipv4Addr, detail: String },
    #[error(
        "network interface {name:?} does not exist in this network namespace; check `ip link`"
    )]
    NoSuchInterface { name: String },
    #[error("interface {name} has no usable Ethernet address ({detail}); XDP delivery needs an Ethernet device")]
    NoMac { name: String, detail: String },
    #[error("could not send an ARP trigger datagram to {next_hop}: {source}")]
    Probe {
        next_hop: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "neighbour {next_hop} on {dev} (next hop to backend {addr}) is unresolved after \
         {waited:?} (state {state}); check that it is up and answers ARP"
    )]
    NeighbourUnresolved {
        addr: Ipv4Addr,
        next_hop: Ipv4Addr,
        dev: String,
        state: String,
        waited: Duration,
    },
}

/// Runs `ip ARGS` and returns stdout.
fn ip(args: &[&str]) -> Result<String, NetinfoError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetinfoError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetinfoError::Ip {
            args: joined,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> Result<T, NetinfoError> {
    let out = ip(args)?;
    serde_json::from_str(&out).map_err(|source| NetinfoError::Json {
        args: args.join(" "),
        source,
    })
}

#[derive(Debug, Deserialize)]
struct RouteGet {
    #[serde(rename = "type")]
    kind: Option<String>,
    gateway: Option<Ipv4Addr>,
    /// Set instead of `gateway` for a next hop of another family (`via inet6 ...`).
    via: Option<serde_json::Value>,
    dev: String,
}

#[derive(Debug, Deserialize)]
struct Link {
    ifindex: u32,
    #[serde(default)]
    mtu: Option<u32>,
    address: Option<String>,
    link_type: Option<String>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    family: String,
    local: Option<String>,
    prefixlen: Option<u8>,
}

#[derive(Debug, Deserialize)]
struct Neigh {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

/// `ip -j {link|addr} show dev NAME`, with "no such device" mapped to its own error.
fn link(name: &str, with_addrs: bool) -> Result<Link, NetinfoError> {
    let args: &[&str] = if with_addrs {
        &["-j", "addr", "show", "dev", name]
    } else {
        &["-j", "link", "show", "dev", name]
    };
    let links: Vec<Link> = ip_json(args).map_err(|e| match e {
        NetinfoError::Ip { ref stderr, .. }
            if stderr.contains("does not exist") || stderr.contains("Cannot find device") =>
        {
            NetinfoError::NoSuchInterface { name: name.into() }
        }
        e => e,
    })?;
    links
        .into_iter()
        .next()
        .ok_or_else(|| NetinfoError::NoSuchInterface { name: name.into() })
}

/// Ifindex of interface `name` in this namespace.
pub fn ifindex(name: &str) -> Result<u32, NetinfoError> {
    Ok(link(name, false)?.ifindex)
}

/// The MTU of interface `name` (1500 when `ip` does not say).
pub fn mtu(name: &str) -> Result<u32, NetinfoError> {
    Ok(link(name, false)?.mtu.unwrap_or(1500))
}

/// Ethernet address of interface `ifname`.
pub fn mac(ifname: &str) -> Result<[u8; 6], NetinfoError> {
    link_mac(ifname, &link(ifname, false)?)
}

fn link_mac(name: &str, l: &Link) -> Result<[u8; 6], NetinfoError> {
    let no_mac = |detail: String| NetinfoError::NoMac {
        name: name.into(),
        detail,
    };
    if let Some(t) = l.link_type.as_deref().filter(|t| *t != "ether") {
        return Err(no_mac(format!("link type {t}")));
    }
    let addr = l
        .address
        .as_deref()
        .ok_or_else(|| no_mac("no address".into()))?;
    parse_mac(addr).ok_or_else(|| no_mac(format!("address {addr:?}")))
}

/// IPv4 addresses configured on `ifname`.
pub fn ipv4_addrs(ifname: &str) -> Result<Vec<Ipv4Addr>, NetinfoError> {
    Ok(ipv4_nets(ifname)?.into_iter().map(|(a, _)| a).collect())
}

/// IPv4 (address, prefix length) pairs of `ifname`.
fn ipv4_nets(ifname: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetinfoError> {
    Ok(link_ipv4_nets(&link(ifname, true)?))
}

fn link_ipv4_nets(l: &Link) -> Vec<(Ipv4Addr, u8)> {
    l.addr_info
        .iter()
        .filter(|a| a.family == "inet")
        .filter_map(|a| Some((a.local.as_deref()?.parse().ok()?, a.prefixlen?)))
        .collect()
}

fn in_subnet(addr: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(prefix.min(32)));
    u32::from(addr) & mask == u32::from(net) & mask
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Neighbour states whose link-layer address may be used (the kernel would send to it too).
fn usable(state: &[String]) -> bool {
    state.iter().any(|s| {
        matches!(
            s.as_str(),
            "REACHABLE" | "STALE" | "DELAY" | "PROBE" | "PERMANENT" | "NOARP"
        )
    })
}

/// The MAC of `next_hop` on `dev`, or the state it is stuck in.
fn neighbour(next_hop: Ipv4Addr, dev: &str) -> Result<Result<[u8; 6], String>, NetinfoError> {
    let hop = next_hop.to_string();
    let entries: Vec<Neigh> = ip_json(&["-j", "-4", "neigh", "show", "to", &hop, "dev", dev])?;
    let Some(n) = entries.into_iter().next() else {
        return Ok(Err("none".into()));
    };
    match n.lladdr.as_deref().and_then(parse_mac) {
        Some(mac) if usable(&n.state) => Ok(Ok(mac)),
        _ if n.state.is_empty() => Ok(Err("none".into())),
        _ => Ok(Err(n.state.join(","))),
    }
}

/// Resolves `next_hop` on `dev`, triggering ARP with one datagram if the kernel has no
/// usable entry yet, and waiting up to [`RESOLVE_TIMEOUT`] for it.
fn resolve_neighbour(
    addr: Ipv4Addr,
    next_hop: Ipv4Addr,
    dev: &str,
) -> Result<[u8; 6], NetinfoError> {
    let state = match neighbour(next_hop, dev)? {
        Ok(mac) => return Ok(mac),
        Err(state) => state,
    };
    let start = Instant::now();
    // An empty datagram to the discard port makes the kernel resolve the next hop exactly as
    // it would for real traffic (and restarts resolution from FAILED).
    let probe = |source| NetinfoError::Probe { next_hop, source };
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(probe)?;
    sock.send_to(&[], (next_hop, DISCARD_PORT)).map_err(probe)?;
    let mut last = state;
    while start.elapsed() < RESOLVE_TIMEOUT {
        std::thread::sleep(RESOLVE_POLL);
        match neighbour(next_hop, dev)? {
            Ok(mac) => return Ok(mac),
            Err(state) => last = state,
        }
    }
    Err(NetinfoError::NeighbourUnresolved {
        addr,
        next_hop,
        dev: dev.into(),
        state: last,
        waited: start.elapsed(),
    })
}

/// How this node delivers packets to backend `addr`; see the module doc for local/remote.
pub fn resolve_backend(addr: Ipv4Addr) -> Result<Delivery, NetinfoError> {
    let target = addr.to_string();
    let routes: Vec<RouteGet> =
        ip_json(&["-j", "-4", "route", "get", &target]).map_err(|e| match e {
            NetinfoError::Ip { stderr, .. } => NetinfoError::NoRoute { addr, stderr },
            e => e,
        })?;
    let route = routes
        .into_iter()
        .next()
        .ok_or_else(|| NetinfoError::NoRoute {
            addr,
            stderr: "`ip route get` returned nothing".into(),
        })?;
    match route.kind.as_deref() {
        None | Some("unicast") => {}
        Some(kind @ ("local" | "broadcast" | "multicast" | "anycast")) => {
            return Err(NetinfoError::LocalAddress {
                addr,
                kind: kind.into(),
            })
        }
        Some(kind) => {
            return Err(NetinfoError::UnusableRoute {
                addr,
                detail: format!("of type {kind}"),
            })
        }
    }
    if let Some(via) = route.via.as_ref() {
        return Err(NetinfoError::UnusableRoute {
            addr,
            detail: format!("via a non-IPv4 next hop {via}"),
        });
    }
    let dev = route.dev;
    let out = link(&dev, true)?;
    let smac = link_mac(&dev, &out)?;
    let local = route.gateway.is_none()
        && !link_ipv4_nets(&out)
            .into_iter()
            .any(|(net, len)| len < 32 && in_subnet(addr, net, len));
    let next_hop = route.gateway.unwrap_or(addr);
    let dmac = resolve_neighbour(addr, next_hop, &dev)?;
    Ok(Delivery {
        ifindex: out.ifindex,
        dmac,
        smac,
        local,
        gateway: route.gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs() {
        assert_eq!(parse_mac("02:77:01:00:00:0a"), Some([2, 0x77, 1, 0, 0, 10]));
        assert_eq!(parse_mac("02:77:01:00:00"), None);
        assert_eq!(parse_mac("02:77:01:00:00:0a:0b"), None);
        assert_eq!(parse_mac("2:77:01:00:00:0a"), None);
        assert_eq!(parse_mac("zz:77:01:00:00:0a"), None);
    }

    #[test]
    fn subnet_membership() {
        let a = Ipv4Addr::new(10, 77, 0, 11);
        assert!(in_subnet(a, Ipv4Addr::new(10, 77, 0, 10), 24));
        assert!(!in_subnet(a, Ipv4Addr::new(10, 77, 1, 1), 24));
        assert!(in_subnet(a, Ipv4Addr::new(1, 2, 3, 4), 0));
        assert!(!in_subnet(a, Ipv4Addr::new(10, 77, 0, 10), 32));
    }

    #[test]
    fn parses_ip_json() {
        let r: Vec<RouteGet> = serde_json::from_str(
            r#"[{"dst":"10.3.0.9","gateway":"10.1.1.7","dev":"va","prefsrc":"10.1.1.1","flags":[],"uid":0,"cache":[]}]"#,
        )
        .unwrap();
        assert_eq!(r[0].gateway, Some(Ipv4Addr::new(10, 1, 1, 7)));
        assert_eq!(r[0].dev, "va");
        assert!(r[0].kind.is_none());
        let n: Vec<Neigh> =
            serde_json::from_str(r#"[{"dst":"10.1.1.6","dev":"veth0","state":["INCOMPLETE"]}]"#)
                .unwrap();
        assert!(n[0].lladdr.is_none() && !usable(&n[0].state));
        assert!(usable(&["STALE".to_string()]));
    }
}
