//! The BPF object this binary was built with (see build.rs), and the one way it is loaded:
//! embedding it means the agent never loads programs that disagree with its own map types,
//! and loading it in one place means the data plane and the explain sandbox size, pin and
//! share maps the same way.

use std::path::PathBuf;

use aya::{Ebpf, EbpfError, EbpfLoader};
use lb_common::maps::{MapSize, MapSpec, CATALOGUE};

/// ELF object holding the XDP and TC programs and their maps, aligned for aya's parser.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The XDP program on the node's NIC (requests, replies to SNATed flows, peer requests).
pub const PROG_INGRESS: &str = "lb_ingress";
/// The TC ingress program on local pods' host-side veths (their replies).
pub const PROG_REPLY: &str = "lb_reply";
/// XDP_PASS and nothing else (veth peers, the benchmark's floor).
pub const PROG_PASS: &str = "lb_pass";
/// Benchmark references in the object (`lb-ebpf/src/reference.rs`): loaded only on demand,
/// never attached.
pub const REFERENCE_PROGRAMS: [&str; 2] = ["lb_ref_ct_lookup", "lb_ref_ct_insert"];
/// The benchmark harness (`lb-ebpf/src/reference.rs`): restores its packet from
/// [`BENCH_INPUT`] on every repeat, then runs `lb_ingress`'s code. Loaded only by the bench.
pub const PROG_BENCH_HARNESS: &str = "lb_bench_harness";
/// The harness's input map (one `lb_common::bench::BenchInput`), outside the catalogue.
pub const BENCH_INPUT: &str = "BENCH_INPUT";

/// The size parameters of the maps whose size the catalogue leaves to the run
/// ([`MapSize`] other than `Fixed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Service frontend ports that can have a Maglev ring at once.
    pub max_services: u32,
    /// Maglev ring size per service (prime).
    pub maglev_size: u32,
    /// Backend ids (slot 0 reserved).
    pub max_backends: u32,
    /// Frontend entries (a service port has one per frontend address).
    pub max_frontends: u32,
    /// Connection tracking and reverse-NAT entries (LRU).
    pub ct_entries: u32,
    pub affinity_entries: u32,
}

impl MapSizes {
    /// The number of entries `spec` gets with these sizes.
    pub fn entries(&self, spec: &MapSpec) -> u32 {
        match spec.size {
            MapSize::Fixed => spec.max_entries,
            // Two ring slots per element (see the catalogue's MAGLEV).
            MapSize::RingSlots => {
                (self.maglev_size as u64 * self.max_services as u64).div_ceil(2) as u32
            }
            MapSize::Backends => self.max_backends,
            MapSize::Frontends => self.max_frontends,
            MapSize::Flows => self.ct_entries,
            MapSize::Affinity => self.affinity_entries,
        }
    }
}

/// How one map is placed when the object loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Reuse the map pinned at `path`, or create it with `entries` and pin it there.
    Pinned { path: PathBuf, entries: u32 },
    /// A new map of this many entries that only this load sees.
    Private(u32),
}

/// Loads the embedded object (maps created or reused, programs not yet loaded into the
/// kernel). `place` decides each catalogue map's placement.
pub fn load(place: impl Fn(&MapSpec) -> Placement) -> Result<Ebpf, EbpfError> {
    let mut loader = EbpfLoader::new();
    for spec in CATALOGUE {
        match place(spec) {
            Placement::Pinned { path, entries } => {
                loader.map_pin_path(spec.name, path);
                loader.map_max_entries(spec.name, entries);
            }
            Placement::Private(entries) => {
                loader.map_max_entries(spec.name, entries);
            }
        }
    }
    loader.load(EBPF_OBJECT)
}
