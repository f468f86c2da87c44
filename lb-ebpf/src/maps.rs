//! Every map of the data plane, in one place. Userspace (lb-user) owns the contents of the
//! control maps and resizes them at load time (`EbpfLoader::set_max_entries`); the programs
//! write only the connection state maps and the counters.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    stats::NUM_REASONS, AffinityEntry, AffinityKey, Backend, Config, CtEntry, CtKey, Frontend,
    FrontendKey, LocalEndpoint, PeerNode, RevNatEntry,
};

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists, so a new flow's insert takes no global lock
/// (Katran keeps its connection table per CPU for the same reason).
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// `BPF_F_MMAPABLE`: userspace writes whole Maglev rings through mmap instead of one
/// syscall per slot (10 000 services x 16381 slots would otherwise take minutes).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Per-node settings (`CONFIG[0]`). Written by userspace before the programs attach.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Which destination ports any frontend uses: bit `port % 64` of word
/// `proto_slot * 1024 + port / 64` (proto_slot 0 = TCP, 1 = UDP). A clear bit sends
/// non-service traffic on its way without a hash lookup. Maintained by userspace with the
/// frontends (set before a frontend is added, cleared after the last one on a port goes).
#[map]
pub static SERVICE_PORTS: Array<u64> = Array::with_max_entries(2048, 0);

/// Service frontends: {addr (0 = NodePort wildcard), port, proto} -> service slot and flags.
/// Written by userspace (reconcile), read per packet.
#[map]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::with_max_entries(65536, 0);

/// Backends by id (id 0 reserved): where a pod is and how to deliver to it. Userspace writes a
/// backend before any ring references it and clears it only after no ring does.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(65536, 0);

/// Pods on this node that are backends of some service, by pod IPv4 address (wire order):
/// their veth and MACs. Written by userspace (`Dataplane`) with the local backends; read
/// by `lb_ingress` for requests a peer node forwarded (see `PEERS`).
#[map]
pub static LOCAL_ENDPOINTS: HashMap<u32, LocalEndpoint> = HashMap::with_max_entries(16384, 0);

/// The other nodes' SNAT addresses (wire order): a packet from one of them to a local
/// endpoint is a request that node's lbx already load-balanced, so it goes straight into the
/// pod, and the pod's replies to it straight out again (no netfilter on this node either).
/// Userspace writes the keys (zero values); `lb_ingress` fills in the interface and MACs
/// the peer's requests arrive with.
#[map]
pub static PEERS: HashMap<u32, PeerNode> = HashMap::with_max_entries(1024, 0);

/// Maglev lookup tables, one ring of `Config::maglev_size` backend ids per service slot,
/// laid end to end: ring slot `s` of the flat u32 sequence is `MAGLEV[s / 2][s % 2]`. Pairs,
/// because array elements are 8-byte aligned in the kernel: a u32 element would waste half.
/// Built in userspace; only changed positions are rewritten.
#[map]
pub static MAGLEV: Array<[u32; 2]> = Array::with_max_entries(64 * 16381 / 2, BPF_F_MMAPABLE);

/// Connection tracking, client -> frontend 5-tuple as received -> chosen backend. Written by
/// the XDP program on a flow's first packet (TCP: its SYN); LRU so it never fills up.
#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(262144, BPF_F_NO_COMMON_LRU);

/// Reverse NAT, keyed by the reply's 5-tuple as it reaches this node: what to restore. Written
/// by the XDP program with the ct entry; read by the TC reply program (local backends) and the
/// XDP program (replies to SNATed flows).
#[map]
pub static REVNAT: LruHashMap<CtKey, RevNatEntry> = LruHashMap::with_max_entries(262144, BPF_F_NO_COMMON_LRU);

/// sessionAffinity ClientIP: {client, service slot} -> backend and last use.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

/// Per-CPU packet counters indexed by `lb_common::Reason`; userspace sums the CPUs.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_REASONS, 0);
