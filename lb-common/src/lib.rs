//! Types and pure logic shared by the XDP/TC programs (lb-ebpf) and userspace (lb-user).
//!
//! Conventions, the same in every map:
//! - Map keys, which are hashed on every lookup, hold IPv4 addresses as one `u32` exactly as
//!   the four bytes appear on the wire (`u32::from_ne_bytes(octets)`, see [`ip4`]): a 16-byte
//!   5-tuple hashes and compares in a fraction of the time of a 40-byte IPv6-ready one. IPv6
//!   gets maps of its own with wider keys (as Cilium's CT4/CT6 split), not wider IPv4 keys.
//! - Map values hold addresses as `[u32; 4]` (IPv4 in `addr[0]`, the other words zero) so
//!   IPv6 fits without a redesign. Use [`v4`] / [`v4_octets`] to convert. The exception is
//!   [`RevNatEntry`], which every new flow writes into an LRU hash: it is IPv4-only like the
//!   keys (60 -> 36 bytes measured 7-13% off a new flow) and belongs to the IPv4 maps.
//! - Ports are stored in network byte order (`u16::from_ne_bytes(wire bytes)`), see [`port_be`].
//! - No bool/enum/Option in map values: flags are integers, padding is explicit and every
//!   type has a size assertion, so both sides agree byte for byte.
#![no_std]

pub mod bench;
pub mod csum;
pub mod hash;
pub mod maps;
pub mod stats;

pub use stats::Reason;

/// Maximum node addresses the NodePort wildcard matches (per node, IPv4).
pub const MAX_NODE_ADDRS: usize = 4;
/// Default Maglev table size (prime), as in Cilium and DESIGN.md.
pub const DEFAULT_MAGLEV_SIZE: u32 = 16381;
/// Backend id 0 is reserved: "no backend" in rings and ct entries.
pub const BACKEND_ID_NONE: u32 = 0;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IP protocol as Kubernetes spells the ones frontends have ("TCP", "UDP"), else its
/// number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtoName(pub u8);

impl core::fmt::Display for ProtoName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            PROTO_TCP => f.write_str("TCP"),
            PROTO_UDP => f.write_str("UDP"),
            other => write!(f, "{other}"),
        }
    }
}

/// IPv4 address (wire order) as map keys hold it.
#[inline(always)]
pub const fn ip4(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// IPv4 address (wire order) in the `[u32; 4]` form of map values.
#[inline(always)]
pub const fn v4(octets: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// The IPv4 octets back from the shared form.
#[inline(always)]
pub const fn v4_octets(addr: [u32; 4]) -> [u8; 4] {
    addr[0].to_ne_bytes()
}

/// A host-order port in the network-order form the maps hold.
#[inline(always)]
pub const fn port_be(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// A network-order port from a map back to host order.
#[inline(always)]
pub const fn port_host(port_be: u16) -> u16 {
    u16::from_be_bytes(port_be.to_ne_bytes())
}

/// Index into `SERVICE_PORTS` of the word holding `port`'s bit (bit `port % 64`), or None
/// for protocols without frontends.
#[inline(always)]
pub const fn service_port_word(proto: u8, port: u16) -> Option<u32> {
    let slot = match proto {
        PROTO_TCP => 0,
        PROTO_UDP => 1,
        _ => return None,
    };
    Some(slot * 1024 + port as u32 / 64)
}

/// Key of `FRONTENDS`: a Service frontend. A NodePort frontend uses the all-zero address
/// (the wildcard) and matches every address in `Config::node_addrs`; LoadBalancer ingress
/// IPs and externalIPs use their exact address. TCP and UDP are different frontends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FrontendKey {
    /// IPv4, wire order; 0 for the NodePort wildcard.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 8);

/// `Frontend::flags`: sessionAffinity ClientIP is on (see `affinity_timeout_s`).
pub const FE_AFFINITY: u32 = 1;
/// `Frontend::flags`: externalTrafficPolicy Local (the ring holds local backends only).
pub const FE_LOCAL_ONLY: u32 = 2;

/// Value of `FRONTENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frontend {
    /// Slot of this frontend's Maglev ring in `MAGLEV` (ring i occupies
    /// `[i * maglev_size, (i + 1) * maglev_size)`) and its identity in ct/affinity entries.
    pub service_id: u32,
    /// Number of backends that may take new flows; 0 means "no endpoints" (XDP_PASS, so the
    /// kernel answers as kube-proxy would).
    pub backend_count: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<Frontend>() == 16);

/// `Backend::flags`: the slot holds a backend.
pub const BE_ACTIVE: u8 = 1;
/// `Backend::flags`: the pod is on this node (DNAT + redirect into its veth).
pub const BE_LOCAL: u8 = 2;
/// `Backend::flags`: terminating: keeps its established flows, gets no new ones.
pub const BE_TERMINATING: u8 = 4;
/// `Backend::flags`: on another node, reached through the tunnel to `Backend::node_addr`
/// (the client's address kept); without it a remote backend is reached by SNAT.
pub const BE_TUNNEL: u8 = 8;

/// Value of `BACKENDS` (an array indexed by backend id; id 0 reserved). A backend is one
/// (pod address, target port) pair together with how to deliver to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub flags: u8,
    pub _pad0: u8,
    /// Local: the pod's host-side veth. Remote: the NIC towards the owning node.
    pub ifindex: u32,
    /// Local: the pod's MAC. Remote: the owning node's MAC.
    pub dmac: [u8; 6],
    /// The MAC of `ifindex`.
    pub smac: [u8; 6],
    /// Tunnelled (`BE_TUNNEL`): the owning node's address, the outer destination (IPv4, wire
    /// order); 0 otherwise.
    pub node_addr: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 40);

/// `Config::flags`: decrement TTL on forwarded packets like a router (default on).
pub const CFG_DEC_TTL: u32 = 1;
/// `Config::flags`: `PEERS` holds at least one peer SNAT address, so the programs look
/// packets up there (set by userspace with the peers; saves a hash lookup per packet on
/// nodes without peers).
pub const CFG_PEERS: u32 = 2;

/// `Config::flags`: tunnel encapsulation is FOU (IPv4 in UDP to `tunnel_port`) instead of
/// IP-in-IP (IP protocol 4), for networks that drop protocol 4.
pub const CFG_TUNNEL_FOU: u32 = 4;
/// `Config::flags`: this node accepts tunnelled requests from its peers (`PEERS`, keyed by
/// their tunnel addresses) and sends their pods' replies back through the tunnel.
pub const CFG_TUNNEL: u32 = 8;

/// Bytes an IP-in-IP encapsulation adds (the outer IPv4 header).
pub const IPIP_OVERHEAD: u16 = 20;
/// Bytes a FOU encapsulation adds (outer IPv4 and UDP headers).
pub const FOU_OVERHEAD: u16 = 28;

/// Value of `CONFIG[0]`: per-node settings written by userspace before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// This node's IPv4 addresses (wire order), 0 = unused slot. NodePort matches these.
    pub node_addrs: [u32; MAX_NODE_ADDRS],
    /// Source address for SNAT to remote backends (wire order).
    pub snat_addr: u32,
    pub maglev_size: u32,
    /// SNAT source port range, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub flags: u32,
    /// A SNAT port whose flow saw no reply for this long may be reused.
    pub snat_idle_s: u32,
    /// How long a TCP flow that saw FIN or RST keeps translating (late retransmits, the
    /// closing handshake) before its entries count as gone.
    pub close_grace_s: u32,
    /// Changes whenever the frontend a 5-tuple resolves to may have changed: userspace
    /// (`Dataplane`) moves it on, after the map write, when a frontend key is added or
    /// removed, a key moves to another service slot, or this config is rewritten (node
    /// addresses decide NodePort matches). A ct entry stamped with the current value
    /// (`CtEntry::frontend_epoch`) may skip the frontend lookup; see lb-ebpf's `ct_lookup`.
    pub frontend_epoch: u32,
    /// This node's tunnel address: the outer source of what it encapsulates, and what its
    /// peers know it by (IPv4, wire order).
    pub tunnel_addr: u32,
    /// FOU's UDP destination port (network byte order), the same on every node.
    pub tunnel_port: u16,
    /// The largest IPv4 packet (outer header included) the tunnel path carries: requests
    /// whose encapsulation would exceed it get an ICMP fragmentation-needed (DF) or go to the
    /// kernel; TCP SYNs and SYN-ACKs of tunnelled flows get their MSS clamped to fit. 0: no
    /// limit checked.
    pub tunnel_mtu: u16,
}
const _: () = assert!(core::mem::size_of::<Config>() == 52);

impl Config {
    /// Bytes the configured encapsulation adds.
    #[inline(always)]
    pub const fn tunnel_overhead(&self) -> u16 {
        if self.flags & CFG_TUNNEL_FOU != 0 {
            FOU_OVERHEAD
        } else {
            IPIP_OVERHEAD
        }
    }

    /// The largest MSS whose segments still fit the tunnel (IPv4 and TCP headers without
    /// options).
    #[inline(always)]
    pub const fn tunnel_mss(&self) -> u16 {
        self.tunnel_mtu
            .saturating_sub(self.tunnel_overhead())
            .saturating_sub(40)
    }
}

/// A directional 5-tuple: key of `REVNAT` (backend -> SNAT address, as a SNATed flow's
/// reply arrives) and of `RETURNS` (client -> pod, as a tunnelled request arrives).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    /// IPv4, wire order.
    pub saddr: u32,
    /// IPv4, wire order.
    pub daddr: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    // Integers, not a [u8; 3]: zeroing a byte array compiles to a memset call in BPF.
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

/// `RevNatEntry::flags`: the entry undoes SNAT (a reply to a flow forwarded to a remote node).
pub const REV_SNAT: u8 = 1;
/// `RevNatEntry::flags`: the flow saw FIN or RST at `stamp_s`; after `Config::close_grace_s`
/// the entry no longer translates (a later connection on the same tuple is not ours), and
/// after [`SNAT_TIME_WAIT_S`] its SNAT port is free again.
pub const REV_CLOSING: u8 = 2;

/// Seconds a closed flow's SNAT port stays taken (netfilter's TCP TIME_WAIT timeout). The
/// backend holds TIME_WAIT for the old tuple for up to 60 s (Linux); a new connection from
/// another client on the same SNAT tuple carries that client's TCP timestamps, which PAWS
/// rejects half of the time (a lost SYN, a one-second stall).
pub const SNAT_TIME_WAIT_S: u32 = 120;

/// Key of `CONNTRACK`: a flow by its client, as the node that holds it sees it. One entry
/// serves both directions: a request finds it by its source, a reply (from a local pod, or
/// back through the tunnel) by its destination, so a new flow costs one map insert. Two
/// live flows of one client address and port to two frontends of this node cannot both be
/// held: the second is left to the kernel (`pass_flow_collision`), as kube-proxy handles it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// IPv4, wire order.
    pub client: u32,
    /// Network byte order.
    pub client_port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 8);

/// `CtEntry::flags`: the flow is SNATed to a remote backend.
pub const CT_SNAT: u8 = 1;
/// `CtEntry::flags`: the TCP flow saw FIN or RST at `stamp_s`; after
/// `Config::close_grace_s` its next packet is a new flow.
pub const CT_CLOSING: u8 = 2;
/// `CtEntry::flags`: the flow's backend is reached through the tunnel.
pub const CT_TUNNEL: u8 = 4;

/// Seconds a UDP flow's entry may go without a request before another frontend may take
/// its client tuple (netfilter's UDP timeout).
pub const UDP_IDLE_S: u32 = 30;

/// Value of `CONNTRACK`: the frontend the client talks to, the backend that serves it, and
/// how to send the replies back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// The frontend (IPv4, wire order): a request must match it, and replies come from it.
    pub frontend_addr: u32,
    /// Network byte order.
    pub frontend_port: u16,
    /// SNAT source port (network order) when `flags & CT_SNAT`.
    pub snat_port: u16,
    pub backend_id: u32,
    /// The frontend's service_id when the flow was created; a mismatch (service deleted
    /// and the slot reused) makes the entry stale (checked when `frontend_epoch` is old).
    pub service_id: u32,
    /// `Config::frontend_epoch` when the packet's frontend was last seen to belong to
    /// `service_id`. Another value (0 for entries written by userspace) means "check again".
    pub frontend_epoch: u32,
    /// Seconds (bpf_ktime_get_ns() / 1e9): when the flow saw FIN or RST (`CT_CLOSING`), else
    /// for UDP the last request (at most once a second), else when it started.
    pub stamp_s: u32,
    /// The interface the client's packets arrive on: replies leave through it.
    pub ifindex: u32,
    /// The request's source MAC: the replies' destination MAC.
    pub client_mac: [u8; 6],
    /// The request's destination MAC (ours): the replies' source MAC.
    pub node_mac: [u8; 6],
    pub flags: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 44);

/// `ReturnEntry::flags`: the flow arrived FOU-encapsulated; its replies go back that way.
pub const RET_FOU: u8 = 1;

/// Value of `RETURNS` (key: the tunnelled request's inner 5-tuple, client -> pod, as it
/// arrives on the owning node): where the pod's replies go back to, the node that holds the
/// flow and reverse-NATs them. Written by `lb_ingress` when it decapsulates a flow's first
/// request (TCP: the SYN) or finds none; read by `lb_reply` for every reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReturnEntry {
    /// The holding node's tunnel address: the replies' outer destination.
    pub peer: u32,
    /// Our interface the requests arrive on: the replies leave through it.
    pub ifindex: u32,
    /// The requests' source MAC (the peer or its next hop): the replies' destination MAC.
    pub peer_mac: [u8; 6],
    /// The requests' destination MAC (ours).
    pub node_mac: [u8; 6],
    pub flags: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// Seconds (bpf_ktime_get_ns() / 1e9) when it was recorded.
    pub stamp_s: u32,
}
const _: () = assert!(core::mem::size_of::<ReturnEntry>() == 28);

/// Value of `REVNAT`: how to turn a reply back into what the client expects.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNatEntry {
    /// Becomes the reply's source (the frontend the client talked to). IPv4, wire order:
    /// every new flow writes this entry, so it is kept as small as the keys.
    pub frontend_addr: u32,
    /// Becomes the reply's destination (only changes for SNATed flows). IPv4, wire order.
    pub client_addr: u32,
    /// Network byte order.
    pub frontend_port: u16,
    /// Network byte order.
    pub client_port: u16,
    /// Interface the request came in on: the reply leaves through it.
    pub ifindex: u32,
    /// The request's source MAC: the reply's destination MAC.
    pub client_mac: [u8; 6],
    /// The request's destination MAC (ours): the reply's source MAC.
    pub node_mac: [u8; 6],
    pub flags: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// Seconds (bpf_ktime_get_ns() / 1e9): when the flow started closing (`REV_CLOSING`), else
    /// when a reply last used a SNAT entry (a SNAT port idle for longer than
    /// `Config::snat_idle_s` may be taken by a new flow).
    pub stamp_s: u32,
}
const _: () = assert!(core::mem::size_of::<RevNatEntry>() == 36);

/// Value of `LOCAL_ENDPOINTS` (key: the pod's IPv4 address, wire order): how to put a frame
/// straight into a pod on this node. The same pod behind many Service ports is one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalEndpoint {
    /// The pod's host-side veth.
    pub ifindex: u32,
    /// The pod's MAC (destination).
    pub mac: [u8; 6],
    /// The MAC of `ifindex` (source).
    pub node_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 16);

/// Value of `PEERS` (key: another node's address, wire order): what that address may send
/// us (`flags`), and where replies to its SNATed flows leave. Userspace writes the key and
/// the flags with the rest zero; `lb_ingress` fills in the interface and MACs from the
/// peer's first SNATed request (the reply goes back the way the request came), so
/// `ifindex == 0` means "not seen yet".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerNode {
    /// Our interface the peer's requests arrive on.
    pub ifindex: u32,
    /// The peer's MAC (the requests' source).
    pub mac: [u8; 6],
    /// Our MAC on `ifindex` (the requests' destination).
    pub node_mac: [u8; 6],
    /// `PEER_SNAT` and/or `PEER_TUNNEL`.
    pub flags: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(core::mem::size_of::<PeerNode>() == 20);

/// `PeerNode::flags`: the address is a peer's SNAT address; its requests to our pods take
/// the peer path (into the pod, replies straight back).
pub const PEER_SNAT: u8 = 1;
/// `PeerNode::flags`: the address is a peer's tunnel address; its encapsulated packets are
/// taken. Only this: kube-proxy on that node masquerades to the same address, and those
/// flows are the kernel's.
pub const PEER_TUNNEL: u8 = 2;

// lb-ebpf copies MAC addresses between map values and the packet as three 16-bit words
// (`parse::copy_mac`): every MAC field must sit at an even offset of a 4-aligned value.
const _: () = {
    use core::mem::{align_of, offset_of};
    assert!(offset_of!(Backend, dmac) % 2 == 0 && offset_of!(Backend, smac) % 2 == 0);
    assert!(offset_of!(RevNatEntry, client_mac) % 2 == 0);
    assert!(offset_of!(RevNatEntry, node_mac) % 2 == 0);
    assert!(offset_of!(LocalEndpoint, mac) % 2 == 0);
    assert!(offset_of!(CtEntry, client_mac) % 2 == 0 && offset_of!(CtEntry, node_mac) % 2 == 0);
    assert!(offset_of!(ReturnEntry, peer_mac) % 2 == 0);
    assert!(offset_of!(ReturnEntry, node_mac) % 2 == 0);
    assert!(offset_of!(LocalEndpoint, node_mac) % 2 == 0);
    assert!(offset_of!(PeerNode, mac) % 2 == 0 && offset_of!(PeerNode, node_mac) % 2 == 0);
    assert!(align_of::<Backend>() >= 2 && align_of::<RevNatEntry>() >= 2);
    assert!(align_of::<LocalEndpoint>() >= 2 && align_of::<PeerNode>() >= 2);
    assert!(align_of::<CtEntry>() >= 2 && align_of::<ReturnEntry>() >= 2);
};

/// Key of `AFFINITY`: sessionAffinity ClientIP per service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// IPv4, wire order.
    pub client: u32,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last new flow that used it.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ReturnEntry {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNatEntry {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for LocalEndpoint {}
    unsafe impl aya::Pod for PeerNode {}
}
