//! A private instance of the programs over a running instance's maps: what `explain` runs a
//! packet through. The maps the programs only read (the catalogue's `Writer::Agent` maps:
//! CONFIG, frontends, backends, rings, local endpoints) are the live ones, shared through
//! their pins, so the answer is about the state the live programs see. The maps the programs
//! write (flow state, learned peers, counters) are private copies of the same size, empty
//! until [`Sandbox::seed`] puts in the entries that matter: a run changes only those, and
//! what it changed is the program's own account of its work. Neither the programs nor this
//! code write a live map.

use std::path::{Path, PathBuf};

use aya::{
    maps::MapInfo,
    programs::{SchedClassifier, Xdp},
    Ebpf, Pod,
};
use lb_common::maps::{MapDef, MapSize, Writer, CATALOGUE};

use super::{
    dataplane::{load_program, program, DataplaneError},
    maps::{pin_path, Maps, MapsError},
    object::{self, Placement, PROG_INGRESS, PROG_REPLY},
    testrun,
};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("cannot read the size of the pinned map {path:?}: {source}")]
    Info {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading a private copy of the BPF object failed: {source}")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("map {name} is the agent's: the sandbox shares it with the live programs and never writes it")]
    SharedMap { name: &'static str },
}

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `lb_ingress`, XDP on the node's NIC: requests, replies to SNATed flows, peer requests.
    Ingress,
    /// `lb_reply`, TC ingress on a local pod's veth: the pod's replies.
    Reply,
}

pub struct Sandbox {
    ebpf: Ebpf,
    maps: Maps,
}

impl Sandbox {
    /// A private instance over the maps pinned in `live` (a pin directory as this process
    /// reaches it).
    pub fn open(live: &Path) -> Result<Self, SandboxError> {
        // Every shared map must exist before loading: the loader would otherwise create and
        // pin a new one in the live directory.
        Maps::from_some_pins(live, |spec| spec.writer == Writer::Agent)?;
        let mut private = Vec::new();
        for spec in CATALOGUE.iter().filter(|s| s.writer == Writer::Program) {
            // Private copies as large as the live maps: the same LRU behaviour (per-CPU
            // lists hold entries / CPUs each) for the seeds and what the run adds.
            let entries = match spec.size {
                MapSize::Fixed => spec.max_entries,
                _ => {
                    let path = pin_path(live, spec);
                    MapInfo::from_pin(&path)
                        .map_err(|source| SandboxError::Info { path, source })?
                        .max_entries()
                }
            };
            private.push((spec.name, entries));
        }
        let mut ebpf = object::load(|spec| match private.iter().find(|(n, _)| *n == spec.name) {
            Some(&(_, entries)) => Placement::Private(entries),
            None => Placement::Pinned {
                path: pin_path(live, spec),
                entries: spec.max_entries,
            },
        })
        .map_err(|source| SandboxError::Load { source })?;
        load_program::<Xdp>(&mut ebpf, PROG_INGRESS)?;
        load_program::<SchedClassifier>(&mut ebpf, PROG_REPLY)?;
        let maps = Maps::take_from(&mut ebpf)?;
        Ok(Sandbox { ebpf, maps })
    }

    /// The sandbox's view: live shared maps and private copies, for reading.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Puts an entry into one of the private copies (a map the programs write).
    pub fn seed<M>(&mut self, key: &M::Key, value: &M::Value) -> Result<(), SandboxError>
    where
        M: MapDef,
        M::Key: Pod,
        M::Value: Pod,
    {
        if M::SPEC.writer != Writer::Program {
            return Err(SandboxError::SharedMap { name: M::SPEC.name });
        }
        Ok(self.maps.insert::<M>(key, value)?)
    }

    /// Runs `packet` once through the program at `hook`: the verdict and the packet as the
    /// program left it.
    pub fn run(&mut self, hook: Hook, packet: &[u8]) -> Result<(u32, Vec<u8>), SandboxError> {
        let (name, res) = match hook {
            Hook::Ingress => {
                let prog: &mut Xdp = program(&mut self.ebpf, PROG_INGRESS)?;
                (PROG_INGRESS, testrun::run_once(prog, packet))
            }
            Hook::Reply => {
                let prog: &mut SchedClassifier = program(&mut self.ebpf, PROG_REPLY)?;
                (PROG_REPLY, testrun::run_once(prog, packet))
            }
        };
        res.map_err(|source| {
            SandboxError::Dataplane(DataplaneError::Program {
                name,
                op: "test_run",
                source,
            })
        })
    }
}
