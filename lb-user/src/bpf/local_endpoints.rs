//! LOCAL_ENDPOINTS kept in step with the local backends in BACKENDS: the pods on this node a
//! peer node's forwarded requests may be redirected into. The same pod behind many Service
//! ports is one entry, written with its first local backend id and deleted with its last.

use std::collections::{BTreeSet, HashMap};

use aya::maps::MapError;
use lb_common::{
    maps::{MapDef, LOCAL_ENDPOINTS},
    Backend, LocalEndpoint, BE_ACTIVE, BE_LOCAL,
};
use log::warn;

use super::maps::{Maps, MapsError};

#[derive(Default)]
pub struct LocalEndpoints {
    /// LOCAL_ENDPOINTS as written, with the local backend ids of each pod.
    by_pod: HashMap<u32, (LocalEndpoint, BTreeSet<u32>)>,
    /// The pod address of every local backend id (to find its entry again on clear).
    by_id: HashMap<u32, u32>,
    /// Local pods in `by_pod` that found LOCAL_ENDPOINTS full: their peer requests take the
    /// kernel path; each freed slot goes to one of them.
    overflow: BTreeSet<u32>,
}

impl LocalEndpoints {
    /// Follows backend `id` becoming `be` (a cleared backend is the default value).
    pub fn track(&mut self, maps: &mut Maps, id: u32, be: &Backend) -> Result<(), MapsError> {
        let is_local = be.flags & BE_ACTIVE != 0 && be.flags & BE_LOCAL != 0;
        let addr = be.addr[0];
        if let Some(old) = self.by_id.get(&id).copied() {
            if !is_local || old != addr {
                self.forget(maps, id, old)?;
            }
        }
        if !is_local {
            return Ok(());
        }
        let ep = LocalEndpoint {
            ifindex: be.ifindex,
            mac: be.dmac,
            node_mac: be.smac,
        };
        self.by_id.insert(id, addr);
        let entry = self
            .by_pod
            .entry(addr)
            .or_insert_with(|| (LocalEndpoint::default(), BTreeSet::new()));
        entry.1.insert(id);
        if entry.0 != ep || entry.1.len() == 1 {
            entry.0 = ep;
            if !self.overflow.contains(&addr) {
                self.insert(maps, addr, &ep)?;
            }
        }
        Ok(())
    }

    /// Backend `id` no longer delivers to pod `addr`; the pod's entry goes with its last id.
    fn forget(&mut self, maps: &mut Maps, id: u32, addr: u32) -> Result<(), MapsError> {
        self.by_id.remove(&id);
        let last = match self.by_pod.get_mut(&addr) {
            Some((_, ids)) => {
                ids.remove(&id);
                ids.is_empty()
            }
            None => false,
        };
        if !last {
            return Ok(());
        }
        self.by_pod.remove(&addr);
        if self.overflow.remove(&addr) {
            return Ok(());
        }
        maps.remove::<LOCAL_ENDPOINTS>(&addr)?;
        // A slot is free: a pod that did not fit takes it.
        if let Some(waiting) = self.overflow.pop_first() {
            let ep = self.by_pod[&waiting].0;
            self.insert(maps, waiting, &ep)?;
        }
        Ok(())
    }

    /// Writes one entry. A full map is not an error: the pod goes on the overflow list (its
    /// peer requests take the kernel path, as without the fast path) and gets the next free
    /// slot.
    fn insert(&mut self, maps: &mut Maps, addr: u32, ep: &LocalEndpoint) -> Result<(), MapsError> {
        match maps.insert::<LOCAL_ENDPOINTS>(&addr, ep) {
            Ok(()) => Ok(()),
            Err(MapsError::Op { source, .. }) if is_full(&source) => {
                if self.overflow.is_empty() {
                    warn!(
                        "{} is full ({} pods): requests that peers forward to pods beyond it \
                         take the kernel path",
                        LOCAL_ENDPOINTS::SPEC.name,
                        self.by_pod.len() - 1
                    );
                }
                self.overflow.insert(addr);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Local pods without an entry because the map was full.
    pub fn overflow(&self) -> usize {
        self.overflow.len()
    }
}

fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}
