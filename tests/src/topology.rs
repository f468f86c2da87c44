//! The lab network in namespaces: a client ("the load balancer"), N nodes on one L2 subnet
//! (a bridge standing in for the VPC) and pods behind each node on veth pairs with their own
//! routable addresses (like the AWS VPC CNI). Nothing is created in the root namespace; every
//! namespace is removed when the [`Topology`] drops.
//!
//! Addressing (i = node, k = pod, both 0-based):
//! - subnet 10.77.0.0/24: client 10.77.0.100, node i 10.77.0.(10+i), and with
//!   [`TopologySpec::control`] the control namespace `<prefix>-ctl` at 10.77.0.2 (where the
//!   real API server of [`crate::controlplane`] runs)
//! - pods of node i: 10.77.(i+1).(k+10)/32, gateway 10.77.(i+1).1 (on every `p<k>` of node i)
//! - MACs are fixed and locally administered so packet fixtures can name them: client
//!   02:77:00:00:00:64, node eth0 02:77:00:00:00:(10+i), pod eth0 02:77:(i+1):00:00:(k+10),
//!   pod host side `p<k>` 02:77:(i+1):00:01:(k+10), control eth0 02:77:00:00:00:02.
//!
//! Offloads are set for XDP: TX checksum offload off wherever packets start or cross (XDP
//! rewrites checksums incrementally, which needs complete ones, not CHECKSUM_PARTIAL), and
//! GRO on at every veth that an XDP program may REDIRECT or TX into the peer of (pod eth0,
//! the bridge ports of node eth0s): veth's ndo_xdp_xmit needs NAPI on the receiving peer.
//! IPv6 is disabled in every namespace so router solicitations and MLD do not show up in
//! packet counters and captures. Every link has the kernel's default MTU (1500) unless
//! [`Topology::set_lan_mtu`] narrows the subnet.

use std::net::Ipv4Addr;

use crate::netns::{self, ip, NetNs, NetnsError};

/// Subnet shared by the client and the nodes (the "VPC subnet").
pub const LAN_PREFIX_LEN: u8 = 24;
/// Interface name of a host's NIC inside its namespace (client, node, pod).
pub const NIC: &str = "eth0";
/// The bridge in the `<prefix>-net` namespace.
pub const BRIDGE: &str = "br0";
/// Address of the control namespace on the lab subnet (the API server's address).
pub const CONTROL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// Node addresses are 10.77.0.(10+i) and must stay below the client's .100.
const MAX_NODES: usize = 90;
/// Pod addresses are 10.77.(i+1).(k+10), at most .254.
const MAX_PODS_PER_NODE: usize = 245;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("invalid topology: {reason}")]
    Spec { reason: String },
    #[error(
        "building the lab topology failed while {step}: {source}{hint}",
        hint = kernel_hint(source)
    )]
    Step {
        step: String,
        #[source]
        source: NetnsError,
    },
    #[error("unexpected `ip -j link` output for {ifname} in {ns}: {detail}")]
    LinkInfo {
        ns: String,
        ifname: String,
        detail: String,
    },
}

fn kernel_hint(e: &NetnsError) -> &'static str {
    match e {
        NetnsError::Command { stderr, .. } if stderr.contains("Unknown device type") => {
            " (the kernel lacks veth or bridge support: `modprobe veth bridge`)"
        }
        _ => "",
    }
}

/// What to build. `pods_per_node[i]` pods behind node i; its length must equal `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySpec {
    pub nodes: usize,
    pub pods_per_node: Vec<usize>,
    /// Also build the control namespace `<prefix>-ctl` at [`CONTROL_ADDR`] on the bridge,
    /// routed to the pod subnets like the client.
    pub control: bool,
}

impl Default for TopologySpec {
    /// Two nodes with two pods each: the smallest lab that has local and remote backends.
    fn default() -> Self {
        TopologySpec::uniform(2, 2)
    }
}

impl TopologySpec {
    /// `nodes` nodes with `pods` pods each.
    pub fn uniform(nodes: usize, pods: usize) -> Self {
        TopologySpec {
            nodes,
            pods_per_node: vec![pods; nodes],
            control: false,
        }
    }

    /// The same lab plus the control namespace (see [`TopologySpec::control`]).
    pub fn with_control(mut self) -> Self {
        self.control = true;
        self
    }

    fn validate(&self) -> Result<(), TopologyError> {
        let reason = if self.nodes == 0 || self.nodes > MAX_NODES {
            format!("nodes must be 1..={MAX_NODES}, got {}", self.nodes)
        } else if self.pods_per_node.len() != self.nodes {
            format!(
                "pods_per_node has {} entries for {} nodes: give one count per node",
                self.pods_per_node.len(),
                self.nodes
            )
        } else if let Some(n) = self.pods_per_node.iter().find(|&&n| n > MAX_PODS_PER_NODE) {
            format!("at most {MAX_PODS_PER_NODE} pods per node, got {n}")
        } else {
            return Ok(());
        };
        Err(TopologyError::Spec { reason })
    }
}

/// One end of a link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

#[derive(Debug)]
struct Host {
    ns: NetNs,
    addr: Ipv4Addr,
    nic: Iface,
}

#[derive(Debug)]
struct Pod {
    ns: NetNs,
    addr: Ipv4Addr,
    nic: Iface,
    /// `p<k>` in the node's namespace.
    host_side: Iface,
}

#[derive(Debug)]
struct Node {
    host: Host,
    pods: Vec<Pod>,
}

/// A built lab network. Index accessors panic on an out-of-range node or pod, like slices.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    // Field order is drop order: pods and nodes go first, the bridge namespace last.
    nodes: Vec<Node>,
    control: Option<Host>,
    client: Host,
    net: NetNs,
}

/// Addresses of the plan, shared by the builder and the accessors' docs.
pub fn node_addr_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + i as u8)
}
pub fn client_addr_of() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 100)
}
pub fn pod_addr_of(i: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, i as u8 + 1, k as u8 + 10)
}
/// The pods' gateway on node i (held by every `p<k>` of that node).
pub fn pod_gateway_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, i as u8 + 1, 1)
}
/// Node i's pod subnet (network address; prefix length 24).
pub fn pod_subnet_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, i as u8 + 1, 0)
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

struct Builder<'a> {
    prefix: &'a str,
}

impl Builder<'_> {
    fn step<T>(
        &self,
        step: impl FnOnce() -> String,
        r: Result<T, NetnsError>,
    ) -> Result<T, TopologyError> {
        r.map_err(|source| TopologyError::Step {
            step: step(),
            source,
        })
    }

    fn ns(&self, suffix: &str) -> Result<NetNs, TopologyError> {
        let name = format!("{}-{suffix}", self.prefix);
        let ns = self.step(
            || format!("creating namespace {name}"),
            NetNs::create(&name),
        )?;
        self.step(
            || format!("setting sysctls in {name}"),
            netns::sysctls(
                &name,
                &[
                    ("net/ipv6/conf/all/disable_ipv6", "1"),
                    ("net/ipv6/conf/default/disable_ipv6", "1"),
                ],
            ),
        )?;
        Ok(ns)
    }

    fn ip(&self, ns: &NetNs, args: &[&str]) -> Result<(), TopologyError> {
        let mut full = vec!["-n", ns.name()];
        full.extend_from_slice(args);
        self.step(
            || format!("running `ip {}`", full.join(" ")),
            ip(&full).map(drop),
        )
    }

    fn ethtool(&self, ns: &NetNs, ifname: &str, features: &[&str]) -> Result<(), TopologyError> {
        let mut args = vec!["ethtool", "-K", ifname];
        args.extend_from_slice(features);
        self.step(
            || format!("running `{}` in {}", args.join(" "), ns.name()),
            netns::run(ns.name(), &args).map(drop),
        )
    }

    fn iface(&self, ns: &NetNs, ifname: &str) -> Result<Iface, TopologyError> {
        let out = self.step(
            || format!("reading {ifname} in {}", ns.name()),
            ip(&["-n", ns.name(), "-j", "link", "show", "dev", ifname]),
        )?;
        let bad = |detail: String| TopologyError::LinkInfo {
            ns: ns.name().into(),
            ifname: ifname.into(),
            detail,
        };
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
        let link = v.get(0).ok_or_else(|| bad("empty list".into()))?;
        let ifindex = link["ifindex"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("no ifindex in {link}")))?;
        let address = link["address"]
            .as_str()
            .ok_or_else(|| bad(format!("no address in {link}")))?;
        let mac = parse_mac(address).ok_or_else(|| bad(format!("bad MAC {address:?}")))?;
        Ok(Iface {
            name: ifname.into(),
            ifindex,
            mac,
        })
    }

    /// A host on the bridge: veth `port` in the net namespace, `eth0` with `addr` in `ns`.
    fn attach_host(
        &self,
        net: &NetNs,
        ns: NetNs,
        port: &str,
        addr: Ipv4Addr,
        mac: [u8; 6],
        port_gro: bool,
    ) -> Result<Host, TopologyError> {
        let mac = mac_str(mac);
        #[rustfmt::skip]
        self.ip(net, &["link", "add", port, "type", "veth",
                       "peer", "name", NIC, "address", &mac, "netns", ns.name()])?;
        self.ip(net, &["link", "set", port, "master", BRIDGE, "up"])?;
        let cidr = format!("{addr}/{LAN_PREFIX_LEN}");
        self.ip(&ns, &["addr", "add", &cidr, "dev", NIC])?;
        self.ip(&ns, &["link", "set", NIC, "up"])?;
        self.ethtool(&ns, NIC, &["tx", "off"])?;
        if port_gro {
            self.ethtool(net, port, &["tx", "off", "gro", "on"])?;
        } else {
            self.ethtool(net, port, &["tx", "off"])?;
        }
        let nic = self.iface(&ns, NIC)?;
        Ok(Host { ns, addr, nic })
    }

    fn pod(&self, node: &NetNs, i: usize, k: usize) -> Result<Pod, TopologyError> {
        let ns = self.ns(&format!("n{i}-p{k}"))?;
        let host_if = format!("p{k}");
        let addr = pod_addr_of(i, k);
        let gw = pod_gateway_of(i);
        let (i8, k8) = (i as u8 + 1, k as u8 + 10);
        let pod_mac = mac_str([0x02, 0x77, i8, 0, 0, k8]);
        let host_mac = mac_str([0x02, 0x77, i8, 0, 1, k8]);
        #[rustfmt::skip]
        self.ip(node, &["link", "add", &host_if, "address", &host_mac, "type", "veth",
                        "peer", "name", NIC, "address", &pod_mac, "netns", ns.name()])?;
        // Node side: the gateway address (/32, no subnet route) and a host route to the pod.
        self.ip(node, &["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
        self.ip(node, &["link", "set", &host_if, "up"])?;
        self.ip(
            node,
            &["route", "add", &format!("{addr}/32"), "dev", &host_if],
        )?;
        self.step(
            || format!("disabling rp_filter on {host_if} in {}", node.name()),
            netns::sysctls(
                node.name(),
                &[(&format!("net/ipv4/conf/{host_if}/rp_filter"), "0")],
            ),
        )?;
        self.ethtool(node, &host_if, &["tx", "off"])?;
        // Pod side: /32 address, on-link route to the gateway, default via it.
        self.ip(&ns, &["addr", "add", &format!("{addr}/32"), "dev", NIC])?;
        self.ip(&ns, &["link", "set", NIC, "up"])?;
        #[rustfmt::skip]
        self.ip(&ns, &["route", "add", &format!("{gw}/32"), "dev", NIC, "scope", "link"])?;
        self.ip(
            &ns,
            &[
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                NIC,
            ],
        )?;
        self.ethtool(&ns, NIC, &["tx", "off", "gro", "on"])?;
        let nic = self.iface(&ns, NIC)?;
        let host_side = self.iface(node, &host_if)?;
        Ok(Pod {
            ns,
            addr,
            nic,
            host_side,
        })
    }
}

pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl Topology {
    /// Builds the namespaces and links of `spec` under a fresh `lbx-<pid>-<seq>` prefix,
    /// after removing leftovers of killed runs. On error everything created so far is
    /// deleted again.
    pub fn build(spec: TopologySpec) -> Result<Topology, TopologyError> {
        spec.validate()?;
        let pre = |source| TopologyError::Step {
            step: "checking prerequisites".into(),
            source,
        };
        netns::preflight().map_err(pre)?;
        for name in netns::cleanup_stale().map_err(pre)? {
            eprintln!("lbx: removed stale namespace {name}");
        }
        let prefix = netns::unique_prefix();
        let b = Builder { prefix: &prefix };

        let net = b.ns("net")?;
        make_bridge(&b, &net)?;

        let client_ns = b.ns("client")?;
        let client_mac = [0x02, 0x77, 0, 0, 0, 100];
        let client = b.attach_host(&net, client_ns, "c0", client_addr_of(), client_mac, false)?;

        let control = if spec.control {
            let ns = b.ns("ctl")?;
            let mac = [0x02, 0x77, 0, 0, 0, 2];
            Some(b.attach_host(&net, ns, "ctl0", CONTROL_ADDR, mac, false)?)
        } else {
            None
        };

        let mut nodes = Vec::with_capacity(spec.nodes);
        for i in 0..spec.nodes {
            let ns = b.ns(&format!("n{i}"))?;
            b.step(
                || format!("setting forwarding sysctls in {}", ns.name()),
                netns::sysctls(
                    ns.name(),
                    &[
                        ("net/ipv4/ip_forward", "1"),
                        ("net/ipv4/conf/all/rp_filter", "0"),
                        ("net/ipv4/conf/default/rp_filter", "0"),
                    ],
                ),
            )?;
            let mac = [0x02, 0x77, 0, 0, 0, 10 + i as u8];
            let host = b.attach_host(&net, ns, &format!("n{i}"), node_addr_of(i), mac, true)?;
            let mut pods = Vec::with_capacity(spec.pods_per_node[i]);
            for k in 0..spec.pods_per_node[i] {
                pods.push(b.pod(&host.ns, i, k)?);
            }
            nodes.push(Node { host, pods });
        }

        // VPC routing: each pod subnet lives behind its node, for the client, the control
        // namespace and the other nodes.
        for (j, owner) in nodes.iter().enumerate() {
            let subnet = format!("{}/24", pod_subnet_of(j));
            let via = owner.host.addr.to_string();
            for host in std::iter::once(&client).chain(&control) {
                b.ip(
                    &host.ns,
                    &["route", "add", &subnet, "via", &via, "dev", NIC],
                )?;
            }
            for (i, other) in nodes.iter().enumerate() {
                if i != j {
                    b.ip(
                        &other.host.ns,
                        &["route", "add", &subnet, "via", &via, "dev", NIC],
                    )?;
                }
            }
        }

        Ok(Topology {
            prefix,
            nodes,
            control,
            client,
            net,
        })
    }

    /// The `lbx-<pid>-<seq>` prefix of every namespace of this topology.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    pub fn pod_count(&self, node: usize) -> usize {
        self.nodes[node].pods.len()
    }

    /// The bridge namespace (`<prefix>-net`).
    pub fn net_ns(&self) -> &str {
        self.net.name()
    }

    /// The control namespace `<prefix>-ctl` (at [`CONTROL_ADDR`]), if the spec asked for it.
    pub fn control_ns(&self) -> Option<&str> {
        self.control.as_ref().map(|h| h.ns.name())
    }
    /// The control namespace's address, if the spec asked for it: [`CONTROL_ADDR`].
    pub fn control_addr(&self) -> Option<Ipv4Addr> {
        self.control.as_ref().map(|h| h.addr)
    }

    pub fn client_ns(&self) -> &str {
        self.client.ns.name()
    }
    pub fn client_addr(&self) -> Ipv4Addr {
        self.client.addr
    }
    pub fn client_mac(&self) -> [u8; 6] {
        self.client.nic.mac
    }
    pub fn client_ifindex(&self) -> u32 {
        self.client.nic.ifindex
    }

    pub fn node_ns(&self, i: usize) -> &str {
        self.nodes[i].host.ns.name()
    }
    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        self.nodes[i].host.addr
    }
    /// MAC of `eth0` in node i's namespace.
    pub fn node_mac(&self, i: usize) -> [u8; 6] {
        self.nodes[i].host.nic.mac
    }
    /// Ifindex of `eth0` inside node i's namespace (where XDP attaches).
    pub fn node_ifindex(&self, i: usize) -> u32 {
        self.nodes[i].host.nic.ifindex
    }
    pub fn node_ifname(&self, _i: usize) -> &str {
        NIC
    }
    /// The pods' default gateway on node i.
    pub fn pod_gateway(&self, i: usize) -> Ipv4Addr {
        let _ = &self.nodes[i];
        pod_gateway_of(i)
    }

    pub fn pod_ns(&self, i: usize, k: usize) -> &str {
        self.nodes[i].pods[k].ns.name()
    }
    pub fn pod_addr(&self, i: usize, k: usize) -> Ipv4Addr {
        self.nodes[i].pods[k].addr
    }
    /// MAC of the pod's `eth0` (the destination MAC for local delivery).
    pub fn pod_mac(&self, i: usize, k: usize) -> [u8; 6] {
        self.nodes[i].pods[k].nic.mac
    }
    /// Ifindex of `p<k>` in node i's namespace (the XDP_REDIRECT target).
    pub fn pod_host_ifindex(&self, i: usize, k: usize) -> u32 {
        self.nodes[i].pods[k].host_side.ifindex
    }
    pub fn pod_host_ifname(&self, i: usize, k: usize) -> &str {
        &self.nodes[i].pods[k].host_side.name
    }
    /// MAC of `p<k>` (the source MAC for local delivery).
    pub fn pod_host_mac(&self, i: usize, k: usize) -> [u8; 6] {
        self.nodes[i].pods[k].host_side.mac
    }

    /// Sets the MTU of the lab subnet: every host's `eth0` on the bridge (client, control,
    /// nodes), its bridge port and the bridge. One L2 segment has one MTU (a bridge drops a
    /// frame larger than its egress port's MTU without a word), so the client's link goes
    /// down with the nodes' links. The pods' veths keep theirs (1500): a pod announces the
    /// MSS of its own link, and whatever forwards its flows over the narrower subnet must
    /// make it fit. Set it before the agents start: an agent reads its tunnel MTU from
    /// `eth0` once.
    pub fn set_lan_mtu(&self, mtu: u32) -> Result<(), TopologyError> {
        let b = Builder {
            prefix: &self.prefix,
        };
        let mtu = mtu.to_string();
        let mut hosts: Vec<(&Host, String)> = vec![(&self.client, "c0".into())];
        hosts.extend(self.control.iter().map(|h| (h, "ctl0".to_string())));
        hosts.extend(
            self.nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (&n.host, format!("n{i}"))),
        );
        for (host, port) in &hosts {
            b.ip(&host.ns, &["link", "set", "dev", NIC, "mtu", &mtu])?;
            b.ip(&self.net, &["link", "set", "dev", port, "mtu", &mtu])?;
        }
        b.ip(&self.net, &["link", "set", "dev", BRIDGE, "mtu", &mtu])
    }

    /// The MTU of `ifname` in namespace `ns` (any namespace of the lab), as the kernel
    /// reports it.
    pub fn mtu(&self, ns: &str, ifname: &str) -> Result<u32, TopologyError> {
        let out = ip(&["-n", ns, "-j", "link", "show", "dev", ifname]).map_err(|source| {
            TopologyError::Step {
                step: format!("reading {ifname} in {ns}"),
                source,
            }
        })?;
        let bad = |detail: String| TopologyError::LinkInfo {
            ns: ns.into(),
            ifname: ifname.into(),
            detail,
        };
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
        v.get(0)
            .and_then(|link| link["mtu"].as_u64())
            .and_then(|m| u32::try_from(m).ok())
            .ok_or_else(|| bad(format!("no mtu in {out}")))
    }

    /// Every namespace name of this topology.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut names = vec![self.net.name(), self.client.ns.name()];
        names.extend(self.control_ns());
        for node in &self.nodes {
            names.push(node.host.ns.name());
            names.extend(node.pods.iter().map(|p| p.ns.name()));
        }
        names
    }
}

fn make_bridge(b: &Builder<'_>, net: &NetNs) -> Result<(), TopologyError> {
    b.ip(
        net,
        &["link", "add", BRIDGE, "type", "bridge", "stp_state", "0"],
    )?;
    b.ip(net, &["link", "set", BRIDGE, "up"])?;
    // With br_netfilter loaded, bridged frames would traverse this namespace's iptables and
    // conntrack: keep the "VPC" a plain switch so netfilter counts belong to the nodes.
    if std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        b.step(
            || format!("disabling bridge netfilter in {}", net.name()),
            netns::sysctls(
                net.name(),
                &[
                    ("net/bridge/bridge-nf-call-iptables", "0"),
                    ("net/bridge/bridge-nf-call-arptables", "0"),
                ],
            ),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation() {
        assert!(TopologySpec::default().validate().is_ok());
        assert_eq!(TopologySpec::default().pods_per_node, vec![2, 2]);
        assert!(TopologySpec::uniform(0, 1).validate().is_err());
        assert!(TopologySpec::uniform(91, 1).validate().is_err());
        assert!(TopologySpec::uniform(2, 246).validate().is_err());
        let short = TopologySpec {
            nodes: 3,
            pods_per_node: vec![1, 1],
            control: false,
        };
        assert!(short.validate().is_err());
        assert!(!TopologySpec::default().control);
        assert!(TopologySpec::uniform(1, 1).with_control().control);
    }

    #[test]
    fn address_plan() {
        assert_eq!(node_addr_of(1), Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!(pod_addr_of(1, 0), Ipv4Addr::new(10, 77, 2, 10));
        assert_eq!(pod_gateway_of(0), Ipv4Addr::new(10, 77, 1, 1));
        assert_eq!(parse_mac("02:77:01:00:00:0a"), Some([2, 0x77, 1, 0, 0, 10]));
        assert_eq!(parse_mac("02:77:01:00:00"), None);
        assert_eq!(parse_mac("02:77:01:00:00:0a:01"), None);
    }
}
