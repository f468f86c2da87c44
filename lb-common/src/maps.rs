//! The map catalogue: every map of the data plane, written once. A map's name, kind, key and
//! value types, default size, flags, which option sizes it and who writes its entries live
//! in the one table of [`map_catalogue!`]; everything else is generated from it or refers to
//! it:
//! - lb-ebpf's `maps.rs` expands the table into the `#[map]` statics the programs use;
//! - this module expands it into one marker type per map (its name is the map's name:
//!   `maps::CONNTRACK`), each implementing [`MapDef`], and the list [`CATALOGUE`];
//! - lb-user's handle layer (`bpf::maps`) opens maps by marker type, from the loaded object
//!   or from pins, and derives pin shape checks, load-time sizes and the explain sandbox's
//!   private copies from [`MapSpec`].
//!
//! A map's name therefore appears as text nowhere but here (`stringify!` of the marker).

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists, so a new flow's insert takes no global lock
/// (Katran keeps its connection table per CPU for the same reason).
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// `BPF_F_MMAPABLE`: userspace writes whole Maglev rings through mmap instead of one
/// syscall per slot (10 000 services x 16381 slots would otherwise take minutes).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The kernel map type of a catalogue entry (as aya-ebpf and aya name them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    HashMap,
    LruHashMap,
    PerCpuArray,
}

impl MapKind {
    /// The kernel's `bpf_map_type` number.
    pub const fn bpf_map_type(self) -> u32 {
        match self {
            MapKind::HashMap => 1,
            MapKind::Array => 2,
            MapKind::PerCpuArray => 6,
            MapKind::LruHashMap => 9,
        }
    }
}

/// What decides a map's number of entries at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapSize {
    /// The object's own size (the catalogue's default): fixed by the layout.
    Fixed,
    /// `max_services * maglev_size` ring slots, two per element.
    RingSlots,
    /// `max_backends`.
    Backends,
    /// `max_frontends`.
    Frontends,
    /// `ct_entries` (connection tracking and reverse NAT).
    Flows,
    /// `affinity_entries`.
    Affinity,
}

/// Who writes a map's entries while the programs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// Userspace (the agent) writes; the programs only read.
    Agent,
    /// The programs write (flow state, learned values, counters); userspace may seed or
    /// clear entries.
    Program,
}

/// One catalogue entry as plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// The object's size (what lb-ebpf declares); see [`MapSpec::size`].
    pub max_entries: u32,
    pub flags: u32,
    pub size: MapSize,
    pub writer: Writer,
}

/// A catalogue entry as a type: `maps::CONNTRACK` names the map, its key and value types
/// and its [`MapSpec`].
pub trait MapDef {
    type Key: Copy + 'static;
    type Value: Copy + 'static;
    const SPEC: MapSpec;
}

/// The table. Call it with the name of a macro of yours that takes the entries, as
/// `lb_common::map_catalogue!(my_macro)`; each entry reads
/// `NAME: Kind<Key, Value> [max_entries, flags, MapSize, Writer];` after its doc comment.
#[macro_export]
macro_rules! map_catalogue {
    ($callback:ident) => {
        $callback! {
            /// Per-node settings (`CONFIG[0]`). Written by userspace before the programs
            /// attach.
            CONFIG: Array<u32, $crate::Config> [1, 0, Fixed, Agent];

            /// Which destination ports any frontend uses: bit `port % 64` of word
            /// `proto_slot * 1024 + port / 64` (proto_slot 0 = TCP, 1 = UDP). A clear bit
            /// sends non-service traffic on its way without a hash lookup. Maintained by
            /// userspace with the frontends (set before a frontend is added, cleared after
            /// the last one on a port goes).
            SERVICE_PORTS: Array<u32, u64> [2048, 0, Fixed, Agent];

            /// Service frontends: {addr (0 = NodePort wildcard), port, proto} -> service slot
            /// and flags. Written by userspace (reconcile), read per packet.
            FRONTENDS: HashMap<$crate::FrontendKey, $crate::Frontend> [65536, 0, Frontends, Agent];

            /// Backends by id (id 0 reserved): where a pod is and how to deliver to it.
            /// Userspace writes a backend before any ring references it and clears it only
            /// after no ring does.
            BACKENDS: Array<u32, $crate::Backend> [65536, 0, Backends, Agent];

            /// Pods on this node that are backends of some service, by pod IPv4 address (wire
            /// order): their veth and MACs. Written by userspace (`Dataplane`) with the local
            /// backends; read by `lb_ingress` for requests a peer node forwarded (see `PEERS`).
            LOCAL_ENDPOINTS: HashMap<u32, $crate::LocalEndpoint> [16384, 0, Fixed, Agent];

            /// The other nodes' addresses (wire order): their tunnel addresses, from which
            /// encapsulated requests are accepted (tunnel mode), and their SNAT addresses, from
            /// which plain requests to a local endpoint are (SNAT mode): either is a request
            /// that node's lbx already load-balanced, so it goes straight into the pod, and the
            /// pod's replies straight back (no netfilter on this node either). Userspace writes
            /// the keys (zero values); `lb_ingress` fills in the interface and MACs the peer's
            /// requests arrive with.
            PEERS: HashMap<u32, $crate::PeerNode> [1024, 0, Fixed, Program];

            /// Maglev lookup tables, one ring of `Config::maglev_size` backend ids per service
            /// slot, laid end to end: ring slot `s` of the flat u32 sequence is
            /// `MAGLEV[s / 2][s % 2]`. Pairs, because array elements are 8-byte aligned in the
            /// kernel: a u32 element would waste half. Built in userspace; only changed
            /// positions are rewritten, through mmap.
            MAGLEV: Array<u32, [u32; 2]> [64 * 16381 / 2, $crate::maps::BPF_F_MMAPABLE, RingSlots, Agent];

            /// Connection tracking by client (address, port, protocol) -> the frontend, the
            /// chosen backend and how replies go back: one entry per flow serves both
            /// directions (requests by source, replies by destination). Written by the XDP
            /// program on a flow's first packet (TCP: its SYN); LRU so it never fills up.
            CONNTRACK: LruHashMap<$crate::FlowKey, $crate::CtEntry> [262144, $crate::maps::BPF_F_NO_COMMON_LRU, Flows, Program];

            /// Reverse SNAT (SNAT mode), keyed by the reply's 5-tuple as it reaches this node
            /// (backend -> SNAT address and port): what to restore. Written by the XDP program
            /// with the ct entry of a SNATed flow, read by it for the replies.
            REVNAT: LruHashMap<$crate::CtKey, $crate::RevNatEntry> [262144, $crate::maps::BPF_F_NO_COMMON_LRU, Flows, Program];

            /// Tunnelled flows whose pods are on this node, by the inner 5-tuple as the
            /// requests arrive (client -> pod): the node that holds each flow, where the pod's
            /// replies go back. Written by the XDP program on a flow's first decapsulated
            /// request, read by the TC program for the replies.
            RETURNS: LruHashMap<$crate::CtKey, $crate::ReturnEntry> [262144, $crate::maps::BPF_F_NO_COMMON_LRU, Flows, Program];

            /// sessionAffinity ClientIP: {client, service slot} -> backend and last use.
            AFFINITY: LruHashMap<$crate::AffinityKey, $crate::AffinityEntry> [65536, $crate::maps::BPF_F_NO_COMMON_LRU, Affinity, Program];

            /// Per-CPU packet counters indexed by `lb_common::Reason`; userspace sums the CPUs.
            STATS: PerCpuArray<u32, u64> [$crate::stats::NUM_REASONS, 0, Fixed, Program];
        }
    };
}

macro_rules! define_catalogue {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident : $kind:ident < $k:ty, $v:ty > [$max:expr, $flags:expr, $size:ident, $writer:ident];
    )*) => {
        $(
            $(#[doc = $doc])*
            #[allow(non_camel_case_types)]
            #[derive(Clone, Copy, Debug)]
            pub struct $name;

            impl MapDef for $name {
                type Key = $k;
                type Value = $v;
                const SPEC: MapSpec = MapSpec {
                    name: stringify!($name),
                    kind: MapKind::$kind,
                    key_size: core::mem::size_of::<$k>() as u32,
                    value_size: core::mem::size_of::<$v>() as u32,
                    max_entries: $max,
                    flags: $flags,
                    size: MapSize::$size,
                    writer: Writer::$writer,
                };
            }
        )*

        /// Every map, in catalogue order.
        pub const CATALOGUE: &[MapSpec] = &[$(<$name as MapDef>::SPEC,)*];
    };
}

map_catalogue!(define_catalogue);

/// The entry named `name`, if the catalogue has one.
pub fn spec(name: &str) -> Option<&'static MapSpec> {
    CATALOGUE.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_arrays_have_u32_keys() {
        for (i, a) in CATALOGUE.iter().enumerate() {
            assert!(
                CATALOGUE[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
            if matches!(a.kind, MapKind::Array | MapKind::PerCpuArray) {
                assert_eq!(a.key_size, 4, "{}", a.name);
            }
            assert!(a.max_entries > 0, "{}", a.name);
        }
        assert_eq!(spec(CONNTRACK::SPEC.name), Some(&CONNTRACK::SPEC));
        assert_eq!(CONNTRACK::SPEC.name, "CONNTRACK");
        assert_eq!(spec("NOPE"), None);
    }

    #[test]
    fn programs_write_flow_state_and_counters_only() {
        let written: [&str; 6] = [
            PEERS::SPEC.name,
            CONNTRACK::SPEC.name,
            REVNAT::SPEC.name,
            RETURNS::SPEC.name,
            AFFINITY::SPEC.name,
            STATS::SPEC.name,
        ];
        for s in CATALOGUE {
            assert_eq!(
                s.writer == Writer::Program,
                written.contains(&s.name),
                "{}",
                s.name
            );
        }
    }
}
