//! The pin directory of a running node: one agent per directory (a lock), a check that
//! pinned maps fit this run, their removal on exit unless kept, and a takeover of what an
//! earlier run left (flows kept, services rewritten).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use lb_common::{Backend, CtEntry, FlowKey, BE_ACTIVE};
use log::{info, warn};

use super::RunError;
use crate::bpf::{
    dataplane::{Dataplane, DataplaneError, DataplaneOptions},
    pins,
};

/// Holds an exclusive flock on the pin directory: one agent per directory.
pub struct PinLock {
    _dir: std::fs::File,
}

pub fn lock_pin_dir(dir: &Path) -> Result<PinLock, RunError> {
    let io = |source| RunError::PinDir {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::File::open(dir).map_err(io)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(RunError::Busy {
                dir: dir.to_path_buf(),
            });
        }
        return Err(io(err));
    }
    Ok(PinLock { _dir: file })
}

/// Checks maps pinned by an earlier run; true when there are any (a takeover).
pub fn check_existing_pins(dir: &Path, opts: &DataplaneOptions) -> Result<bool, RunError> {
    if !pins::any_pinned(dir) {
        return Ok(false);
    }
    let mismatches = pins::mismatches(&opts.sizes(), &pins::pinned_sizes(dir));
    if !mismatches.is_empty() {
        return Err(RunError::PinsIncompatible {
            dir: dir.to_path_buf(),
            mismatches: mismatches.join("; "),
        });
    }
    Ok(true)
}

/// Removes the pins (and the directory) when dropped, after the data plane is gone.
pub struct PinCleanup {
    pub dir: PathBuf,
    pub keep: bool,
}

impl Drop for PinCleanup {
    fn drop(&mut self) {
        if self.keep {
            info!("keeping the pinned maps in {:?} (--keep-pins)", self.dir);
            return;
        }
        match pins::remove_all(&self.dir) {
            Ok(()) => info!("removed the pinned maps in {:?}", self.dir),
            Err(errors) => {
                for e in errors {
                    warn!("{e}");
                }
            }
        }
    }
}

/// Old BACKENDS contents, by id, for checking conntrack entries after a takeover.
pub type BackendsById = BTreeMap<u32, Backend>;

/// Empties the control maps an earlier run left (the reconciler starts from all-zero maps).
/// Flows stay; [`prune_moved_flows`] later drops those whose backend id changed meaning.
pub fn clear_control_maps(dp: &mut Dataplane) -> Result<BackendsById, DataplaneError> {
    for (key, _) in dp.frontends()? {
        dp.remove_frontend(&key)?;
    }
    let mut old = BTreeMap::new();
    for id in 1..dp.options().max_backends {
        let be = dp.backend(id)?;
        if be != Backend::default() {
            old.insert(id, be);
            dp.clear_backend(id)?;
        }
    }
    let m = dp.options().maglev_size as usize;
    let zeros = vec![0u32; m];
    for sid in 0..dp.options().max_services {
        if dp.ring(sid)?.iter().any(|&id| id != 0) {
            dp.write_full_ring(sid, &zeros)?;
        }
    }
    Ok(old)
}

/// Conntrack entries whose backend id now holds another backend (or none) would send an
/// established flow somewhere else: delete them so the flow selects anew.
fn moved_flows(
    flows: &[(FlowKey, CtEntry)],
    old: &BackendsById,
    now: &dyn Fn(u32) -> Option<Backend>,
) -> Vec<FlowKey> {
    let same = |a: &Backend, b: &Backend| a.addr == b.addr && a.port == b.port;
    flows
        .iter()
        .filter(|(_, ct)| {
            let new = now(ct.backend_id).filter(|b| b.flags & BE_ACTIVE != 0);
            match (old.get(&ct.backend_id), new) {
                (Some(o), Some(n)) => !same(o, &n),
                _ => true,
            }
        })
        .map(|(k, _)| *k)
        .collect()
}

pub fn prune_moved_flows(dp: &mut Dataplane, old: &BackendsById) -> Result<usize, DataplaneError> {
    let flows = dp.conntrack()?;
    let stale = moved_flows(&flows, old, &|id| dp.backend(id).ok());
    let mut n = 0;
    for key in &stale {
        if dp.remove_conntrack(key)? {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use lb_common::v4;

    use super::*;

    fn backend(last: u8, port: u16) -> Backend {
        Backend {
            addr: v4([10, 0, 0, last]),
            port: lb_common::port_be(port),
            flags: BE_ACTIVE,
            ..Default::default()
        }
    }

    #[test]
    fn takeover_drops_flows_whose_backend_id_changed() {
        let flow = |sport: u16, id: u32| {
            (
                FlowKey {
                    client_port: sport,
                    ..Default::default()
                },
                CtEntry {
                    backend_id: id,
                    ..Default::default()
                },
            )
        };
        let flows = [flow(1, 1), flow(2, 2), flow(3, 3), flow(4, 4)];
        let old: BackendsById = [
            (1, backend(1, 80)),
            (2, backend(2, 80)),
            (3, backend(3, 80)),
        ]
        .into();
        // id 1 unchanged, id 2 now another pod, id 3 cleared, id 4 unknown before.
        let now = |id: u32| match id {
            1 => Some(backend(1, 80)),
            2 => Some(backend(9, 80)),
            4 => Some(backend(4, 80)),
            _ => Some(Backend::default()),
        };
        let stale: Vec<u16> = moved_flows(&flows, &old, &now)
            .iter()
            .map(|k| k.client_port)
            .collect();
        assert_eq!(stale, [2, 3, 4]);
    }
}
