//! How the data plane runs on this node: the flags `standalone` and `agent` share, and what
//! follows from them (the node addresses NodePorts match, the peers, the CONFIG value).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use lb_common::{
    port_be, v4, Config, CFG_DEC_TTL, CFG_TUNNEL, CFG_TUNNEL_FOU, MAX_NODE_ADDRS, PEER_SNAT,
    PEER_TUNNEL,
};
use log::warn;

use super::netinfo::NetinfoError;
use super::RunError;
use crate::bpf::{dataplane::XdpModeChoice, pins::default_pin_dir};

/// A SNAT port whose flow saw no reply for this long may be reused (seconds).
pub const SNAT_IDLE_S: u32 = 300;
/// How long a TCP flow that saw FIN or RST keeps translating (its closing handshake and
/// late retransmits) before its tuple counts as free: longer than a FIN/ACK exchange, much
/// shorter than the client's TIME_WAIT, after which it may reuse the port elsewhere.
pub const CLOSE_GRACE_S: u32 = 10;
/// An inclusive port range, `MIN-MAX` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port range; write MIN-MAX, e.g. 61000-65535");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let min: u16 = a.trim().parse().map_err(|_| bad())?;
        let max: u16 = b.trim().parse().map_err(|_| bad())?;
        if min == 0 || min > max {
            return Err(format!(
                "port range {s:?} must satisfy 1 <= MIN <= MAX, e.g. 61000-65535"
            ));
        }
        Ok(PortRange { min, max })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// How a request reaches a pod on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RemoteMode {
    /// Encapsulated to the node that owns the pod (client address kept, no SNAT port); the
    /// replies come back the same way.
    Tunnel,
    /// SNATed to this node's SNAT address and forwarded; the pod sees the SNAT address.
    Snat,
}

/// The tunnel's encapsulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TunnelEncap {
    /// IP-in-IP (IP protocol 4): 20 bytes.
    Ipip,
    /// IPv4 in UDP (FOU) to `--tunnel-port`: 28 bytes, for networks that drop protocol 4.
    Fou,
}

/// FOU's default UDP port (the one the kernel's FOU documentation uses).
pub const DEFAULT_TUNNEL_PORT: u16 = 5555;

/// How the data plane runs on this node (the flags `standalone` and `agent` share).
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub iface: String,
    pub node_name: String,
    /// Empty: the IPv4 addresses of `iface`.
    pub node_addrs: Vec<Ipv4Addr>,
    /// None: the first node address.
    pub snat_addr: Option<Ipv4Addr>,
    /// The other nodes' SNAT addresses, whose forwarded requests to local pods (and the
    /// replies) bypass netfilter here. Empty: the other nodes' InternalIPs (their agents'
    /// default SNAT address), following the Node objects.
    pub peer_snat_addrs: Vec<Ipv4Addr>,
    pub xdp_mode: XdpModeChoice,
    /// None: [`default_pin_dir`] of `node_name`.
    pub pin_dir: Option<PathBuf>,
    pub max_services: u32,
    /// BACKENDS entries (id 0 is reserved).
    pub max_backends: u32,
    pub maglev_size: u32,
    pub snat_ports: PortRange,
    pub keep_pins: bool,
    pub remote_mode: RemoteMode,
    pub tunnel_encap: TunnelEncap,
    pub tunnel_port: u16,
    /// None: the MTU of `iface`.
    pub tunnel_mtu: Option<u16>,
    /// This node's tunnel address, what its peers know it by. None: the first node address
    /// (the InternalIP, normally).
    pub tunnel_addr: Option<Ipv4Addr>,
}

impl NodeOptions {
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| default_pin_dir(&self.node_name))
    }
}

/// The node addresses to match NodePorts on: the given ones, else the interface's.
pub(crate) fn node_addrs(
    given: &[Ipv4Addr],
    iface: &str,
    iface_addrs: impl FnOnce() -> Result<Vec<Ipv4Addr>, NetinfoError>,
) -> Result<Vec<Ipv4Addr>, RunError> {
    let mut addrs: Vec<Ipv4Addr> = Vec::new();
    if given.is_empty() {
        for a in iface_addrs().map_err(|source| RunError::Interface {
            iface: iface.to_string(),
            source: Box::new(source),
        })? {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            return Err(RunError::NoNodeAddrs {
                iface: iface.to_string(),
            });
        }
        if addrs.len() > MAX_NODE_ADDRS {
            warn!(
                "{iface} has {} IPv4 addresses; NodePorts match the first {MAX_NODE_ADDRS} ({}), pass --node-addr to choose",
                addrs.len(),
                join(&addrs[..MAX_NODE_ADDRS])
            );
            addrs.truncate(MAX_NODE_ADDRS);
        }
    } else {
        for a in given {
            if !addrs.contains(a) {
                addrs.push(*a);
            }
        }
        if addrs.len() > MAX_NODE_ADDRS {
            return Err(RunError::TooManyNodeAddrs {
                count: addrs.len(),
                max: MAX_NODE_ADDRS,
            });
        }
    }
    Ok(addrs)
}

pub(crate) fn join(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The PEERS entries, each with its role: the peers' SNAT addresses (the configured ones,
/// else the other nodes' InternalIPs) take the peer path (`PEER_SNAT`); in tunnel mode the
/// other nodes' InternalIPs are also tunnel addresses (`PEER_TUNNEL`), and only that when
/// SNAT addresses are configured apart: kube-proxy there masquerades to the InternalIP, and
/// those flows stay the kernel's. Never one of this node's own addresses or its SNAT address.
pub(crate) fn peer_addrs(
    configured: &[Ipv4Addr],
    node_ips: &BTreeMap<String, Ipv4Addr>,
    node_addrs: &[Ipv4Addr],
    snat_addr: Ipv4Addr,
    mode: RemoteMode,
) -> Vec<(Ipv4Addr, u8)> {
    let snat_peers: Vec<Ipv4Addr> = if configured.is_empty() {
        node_ips.values().copied().collect()
    } else {
        configured.to_vec()
    };
    let mut all: Vec<(Ipv4Addr, u8)> = snat_peers.into_iter().map(|a| (a, PEER_SNAT)).collect();
    if mode == RemoteMode::Tunnel {
        for a in node_ips.values() {
            match all.iter_mut().find(|(b, _)| b == a) {
                Some((_, roles)) => *roles |= PEER_TUNNEL,
                None => all.push((*a, PEER_TUNNEL)),
            }
        }
    }
    all.into_iter()
        .filter(|(a, _)| *a != snat_addr && !node_addrs.contains(a))
        .collect()
}

/// The tunnel's part of CONFIG: this node's tunnel address, the FOU port, the largest packet
/// the tunnel path carries, and the flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    pub mode: RemoteMode,
    pub encap: TunnelEncap,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub mtu: u16,
}

/// The CONFIG value for this node.
pub(crate) fn node_config(
    node_addrs: &[Ipv4Addr],
    snat_addr: Ipv4Addr,
    snat_ports: PortRange,
    tunnel: &TunnelConfig,
) -> Config {
    let mut addrs = [0u32; MAX_NODE_ADDRS];
    for (slot, a) in addrs.iter_mut().zip(node_addrs) {
        *slot = v4(a.octets())[0];
    }
    let mut flags = CFG_DEC_TTL;
    if tunnel.mode == RemoteMode::Tunnel {
        flags |= CFG_TUNNEL;
    }
    if tunnel.encap == TunnelEncap::Fou {
        flags |= CFG_TUNNEL_FOU;
    }
    Config {
        node_addrs: addrs,
        snat_addr: v4(snat_addr.octets())[0],
        // Dataplane::set_config fills in the ring size it was loaded with.
        maglev_size: 0,
        snat_port_min: snat_ports.min,
        snat_port_max: snat_ports.max,
        flags,
        snat_idle_s: SNAT_IDLE_S,
        close_grace_s: CLOSE_GRACE_S,
        // Dataplane::set_config moves its own epoch on.
        frontend_epoch: 0,
        tunnel_addr: v4(tunnel.addr.octets())[0],
        tunnel_port: port_be(tunnel.port),
        tunnel_mtu: tunnel.mtu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_the_configured_snat_addresses_else_the_other_nodes() {
        let ip = |d| Ipv4Addr::new(10, 77, 0, d);
        let nodes: BTreeMap<String, Ipv4Addr> =
            [("n1".to_string(), ip(11)), ("n2".to_string(), ip(12))].into();
        let (own, snat) = ([ip(10)], ip(150));
        let snat_mode = RemoteMode::Snat;
        assert_eq!(
            peer_addrs(&[], &nodes, &own, snat, snat_mode),
            vec![(ip(11), PEER_SNAT), (ip(12), PEER_SNAT)]
        );
        assert_eq!(
            peer_addrs(&[ip(151), ip(150), ip(152)], &nodes, &own, snat, snat_mode),
            vec![(ip(151), PEER_SNAT), (ip(152), PEER_SNAT)],
            "configured peers win, our own SNAT address is never a peer"
        );
        assert!(peer_addrs(&[], &BTreeMap::new(), &own, snat, snat_mode).is_empty());
        // Tunnel mode: the other nodes' InternalIPs are their tunnel addresses; with SNAT
        // addresses apart they take nothing else (kube-proxy masquerades to them).
        assert_eq!(
            peer_addrs(&[ip(151)], &nodes, &own, snat, RemoteMode::Tunnel),
            vec![
                (ip(151), PEER_SNAT),
                (ip(11), PEER_TUNNEL),
                (ip(12), PEER_TUNNEL)
            ]
        );
        assert_eq!(
            peer_addrs(&[], &nodes, &own, snat, RemoteMode::Tunnel),
            vec![
                (ip(11), PEER_SNAT | PEER_TUNNEL),
                (ip(12), PEER_SNAT | PEER_TUNNEL)
            ]
        );
    }

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(
            "61000-65535".parse(),
            Ok(PortRange {
                min: 61000,
                max: 65535
            })
        );
        assert_eq!("7 - 7".parse(), Ok(PortRange { min: 7, max: 7 }));
        for bad in [
            "",
            "61000",
            "65535-61000",
            "0-10",
            "1-65536",
            "a-b",
            "1-2-3",
        ] {
            let err = bad.parse::<PortRange>().unwrap_err();
            assert!(err.contains("MIN"), "{bad}: {err}");
        }
        assert_eq!(PortRange { min: 1, max: 2 }.to_string(), "1-2");
    }

    #[test]
    fn node_addrs_from_flags_or_interface() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let never = || -> Result<Vec<Ipv4Addr>, NetinfoError> { panic!("not asked") };
        assert_eq!(
            node_addrs(
                &[a("10.0.0.1"), a("10.0.0.1"), a("10.0.0.2")],
                "eth0",
                never
            )
            .unwrap(),
            [a("10.0.0.1"), a("10.0.0.2")]
        );
        let five: Vec<_> = (1..=5).map(|i| a(&format!("10.0.0.{i}"))).collect();
        assert!(matches!(
            node_addrs(&five, "eth0", never),
            Err(RunError::TooManyNodeAddrs { count: 5, max: 4 })
        ));
        let from_iface = five.clone();
        assert_eq!(
            node_addrs(&[], "eth0", || Ok(from_iface)).unwrap(),
            five[..4]
        );
        let err = node_addrs(&[], "eth0", || Ok(vec![])).unwrap_err();
        assert!(err.to_string().contains("--node-addr"), "{err}");
    }

    #[test]
    fn config_holds_addresses_in_wire_order() {
        let cfg = node_config(
            &["192.168.1.10".parse().unwrap(), "10.0.0.1".parse().unwrap()],
            "192.168.1.10".parse().unwrap(),
            PortRange {
                min: 61000,
                max: 65535,
            },
            &TunnelConfig {
                mode: RemoteMode::Tunnel,
                encap: TunnelEncap::Fou,
                addr: "192.168.1.10".parse().unwrap(),
                port: 5555,
                mtu: 1400,
            },
        );
        assert_eq!(cfg.node_addrs[0].to_ne_bytes(), [192, 168, 1, 10]);
        assert_eq!(
            cfg.flags & (CFG_TUNNEL | CFG_TUNNEL_FOU),
            CFG_TUNNEL | CFG_TUNNEL_FOU
        );
        assert_eq!(cfg.tunnel_addr.to_ne_bytes(), [192, 168, 1, 10]);
        assert_eq!(cfg.tunnel_port, 5555u16.to_be());
        assert_eq!((cfg.tunnel_mtu, cfg.tunnel_mss()), (1400, 1400 - 28 - 40));
        assert_eq!(cfg.node_addrs[1].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(cfg.node_addrs[2], 0);
        assert_eq!(cfg.snat_addr.to_ne_bytes(), [192, 168, 1, 10]);
        assert_eq!((cfg.snat_port_min, cfg.snat_port_max), (61000, 65535));
        assert_eq!(cfg.flags & CFG_DEC_TTL, CFG_DEC_TTL);
        assert_eq!(cfg.snat_idle_s, 300);
        assert_eq!(cfg.close_grace_s, CLOSE_GRACE_S);
    }
}
