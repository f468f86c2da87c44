//! Where an instance's maps are pinned, and what a pin directory must hold.
//!
//! `lb-user standalone` and `lb-user agent` pin under `/sys/fs/bpf/lbx/<node-name>`. Under
//! `ip netns exec` every process gets its own mount namespace with a fresh /sys, so a bpffs
//! mounted by the agent there is invisible to a CLI started by another `ip netns exec`. The
//! pins are then reached through the agent's own view, `/proc/<pid>/root/<pin dir>`, which the
//! kernel resolves in the agent's mount namespace.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use lb_common::maps::{MapDef, MapSpec, CATALOGUE, CONFIG};

use super::maps::pin_path;
use super::object::MapSizes;

/// Where `lb-user standalone` pins each node's maps (one directory per node name).
pub const PIN_ROOT: &str = "/sys/fs/bpf/lbx";

/// The pin directory of node `node_name` when `--pin-dir` is not given.
pub fn default_pin_dir(node_name: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(node_name)
}

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error(
        "no lbx maps are pinned at {dir:?} (looked in this and every other mount namespace); \
         is `lb-user standalone` running? Pass the --pin-dir or --node-name it was started with"
    )]
    NotRunning { dir: PathBuf },
    #[error(
        "no lbx instance found under {root:?} (looked in this and every other mount namespace); \
         is `lb-user standalone` running?"
    )]
    NoInstance { root: PathBuf },
    #[error(
        "several lbx instances match ({candidates}); choose one with --node-name or --pin-dir"
    )]
    Ambiguous { candidates: String },
    #[error("cannot list {path:?}: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// Locating an instance

/// Where an instance's pins were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The pin directory as the agent sees it (what it was started with).
    pub pin_dir: PathBuf,
    /// The path this process opens: `pin_dir` itself, or reached through the agent's mount
    /// namespace (`/proc/<pid>/root/...`).
    pub open_path: PathBuf,
    /// The process whose mount namespace holds the pins, when not ours.
    pub pid: Option<u32>,
}

/// Finds the pins of one instance: by `pin_dir`, else by `node_name`, else the only one
/// running.
pub fn locate(pin_dir: Option<&Path>, node_name: Option<&str>) -> Result<Located, PinsError> {
    match (pin_dir, node_name) {
        (Some(dir), _) => locate_dir(&absolute(dir)),
        (None, Some(node)) => locate_dir(&default_pin_dir(node)),
        (None, None) => discover(),
    }
}

fn absolute(dir: &Path) -> PathBuf {
    if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(dir))
            .unwrap_or_else(|_| dir.to_path_buf())
    }
}

fn is_pin_dir(path: &Path) -> bool {
    pin_path(path, &CONFIG::SPEC).exists()
}

/// `/proc/<pid>/root` of one process per mount namespace other than ours.
fn other_mount_namespaces() -> Result<Vec<(u32, PathBuf)>, PinsError> {
    let proc_dir = Path::new("/proc");
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = BTreeSet::new();
    if let Some(ns) = &ours {
        seen.insert(ns.clone());
    }
    let entries = std::fs::read_dir(proc_dir).map_err(|source| PinsError::Proc {
        path: proc_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes may exit while we look, and kernel threads have no usable root: skip.
        let Ok(ns) = std::fs::read_link(entry.path().join("ns/mnt")) else {
            continue;
        };
        if seen.insert(ns) {
            out.push((pid, entry.path().join("root")));
        }
    }
    Ok(out)
}

/// `root` + absolute `path`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn locate_dir(dir: &Path) -> Result<Located, PinsError> {
    if is_pin_dir(dir) {
        return Ok(Located {
            pin_dir: dir.to_path_buf(),
            open_path: dir.to_path_buf(),
            pid: None,
        });
    }
    let found: Vec<Located> = other_mount_namespaces()?
        .into_iter()
        .map(|(pid, root)| Located {
            pin_dir: dir.to_path_buf(),
            open_path: under(&root, dir),
            pid: Some(pid),
        })
        .filter(|l| is_pin_dir(&l.open_path))
        .collect();
    pick_one(found, || PinsError::NotRunning {
        dir: dir.to_path_buf(),
    })
}

/// Every instance under [`PIN_ROOT`], here and in other mount namespaces.
fn discover() -> Result<Located, PinsError> {
    let root = Path::new(PIN_ROOT);
    let mut found = Vec::new();
    let mut scan = |view_root: &Path, pid: Option<u32>| {
        let Ok(entries) = std::fs::read_dir(view_root) else {
            return;
        };
        for entry in entries.flatten() {
            if is_pin_dir(&entry.path()) {
                found.push(Located {
                    pin_dir: root.join(entry.file_name()),
                    open_path: entry.path(),
                    pid,
                });
            }
        }
    };
    scan(root, None);
    for (pid, proc_root) in other_mount_namespaces()? {
        scan(&under(&proc_root, root), Some(pid));
    }
    pick_one(found, || PinsError::NoInstance {
        root: root.to_path_buf(),
    })
}

fn pick_one(
    mut found: Vec<Located>,
    none: impl FnOnce() -> PinsError,
) -> Result<Located, PinsError> {
    match found.len() {
        0 => Err(none()),
        1 => Ok(found.remove(0)),
        _ => Err(PinsError::Ambiguous {
            candidates: found
                .iter()
                .map(|l| match l.pid {
                    Some(pid) => format!("{} (via /proc/{pid}/root)", l.pin_dir.display()),
                    None => l.pin_dir.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// What a pin directory holds

/// (key size, value size, max entries) of a pinned map.
pub type PinnedSizes = (u32, u32, u32);

/// What differs between pinned maps (`actual`: name -> (key, value, max entries)) and what
/// a run with `sizes` needs, one line each. Missing maps are fine: they are created.
pub fn mismatches(
    sizes: &MapSizes,
    actual: &dyn Fn(&MapSpec) -> Option<PinnedSizes>,
) -> Vec<String> {
    let mut out = Vec::new();
    for spec in CATALOGUE {
        let Some((k, v, m)) = actual(spec) else {
            continue;
        };
        let (key, value) = (spec.key_size, spec.value_size);
        if (k, v) != (key, value) {
            out.push(format!(
                "{} has {k}/{v}-byte keys/values, this lb-user uses {key}/{value}",
                spec.name
            ));
        }
        let want = sizes.entries(spec);
        // A map the object sizes itself may hold any size an older object gave it.
        if spec.size != lb_common::maps::MapSize::Fixed && want != m {
            out.push(format!(
                "{} has {m} entries, this run needs {want}",
                spec.name
            ));
        }
    }
    out
}

/// The sizes of the maps pinned in `dir`, by catalogue entry.
pub fn pinned_sizes(dir: &Path) -> impl Fn(&MapSpec) -> Option<PinnedSizes> + '_ {
    move |spec| {
        MapInfo::from_pin(pin_path(dir, spec))
            .ok()
            .map(|i| (i.key_size(), i.value_size(), i.max_entries()))
    }
}

/// Does `dir` hold any map of the catalogue?
pub fn any_pinned(dir: &Path) -> bool {
    CATALOGUE.iter().any(|spec| pin_path(dir, spec).exists())
}

/// Removes every catalogue map's pin in `dir`, then `dir` itself; errors other than "not
/// there" are returned as messages (a removal that half fails still removes what it can).
pub fn remove_all(dir: &Path) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    for spec in CATALOGUE {
        let path = pin_path(dir, spec);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("cannot remove pin {path:?}: {e}"));
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        errors.push(format!("cannot remove {dir:?}: {e}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use lb_common::maps::{BACKENDS, MAGLEV};

    use super::*;

    fn sizes() -> MapSizes {
        MapSizes {
            max_services: 1024,
            maglev_size: 16381,
            max_backends: 65536,
            max_frontends: 65536,
            ct_entries: 262_144,
            affinity_entries: 65536,
        }
    }

    #[test]
    fn pins_of_other_sizes_are_refused() {
        let sizes = sizes();
        let same = |spec: &MapSpec| Some((spec.key_size, spec.value_size, sizes.entries(spec)));
        assert!(mismatches(&sizes, &same).is_empty());
        assert!(
            mismatches(&sizes, &|_| None).is_empty(),
            "absent maps are created"
        );
        let smaller_ring = |spec: &MapSpec| match spec.name {
            n if n == MAGLEV::SPEC.name => Some((4, 8, 123)),
            n if n == BACKENDS::SPEC.name => Some((4, 36, sizes.max_backends)),
            _ => same(spec),
        };
        let m = mismatches(&sizes, &smaller_ring);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m.iter().any(|s| s.starts_with("MAGLEV has 123 entries")),
            "{m:?}"
        );
        assert!(
            m.iter().any(|s| s.starts_with("BACKENDS has 4/36-byte")),
            "{m:?}"
        );
        // Maps the object sizes itself may hold any size.
        let other_stats = |spec: &MapSpec| {
            let (k, v, n) = same(spec)?;
            Some((
                k,
                v,
                if spec.size == lb_common::maps::MapSize::Fixed {
                    n + 1
                } else {
                    n
                },
            ))
        };
        assert!(mismatches(&sizes, &other_stats).is_empty());
    }

    #[test]
    fn pin_dir_defaults_and_paths_under_another_root() {
        assert_eq!(
            default_pin_dir("node-a"),
            Path::new("/sys/fs/bpf/lbx/node-a")
        );
        assert_eq!(
            under(Path::new("/proc/42/root"), Path::new("/sys/fs/bpf/lbx/n")),
            Path::new("/proc/42/root/sys/fs/bpf/lbx/n")
        );
        let one = Located {
            pin_dir: "/a".into(),
            open_path: "/a".into(),
            pid: None,
        };
        assert_eq!(pick_one(vec![one.clone()], || unreachable!()).unwrap(), one);
        let two = vec![
            one.clone(),
            Located {
                pid: Some(7),
                ..one
            },
        ];
        let err = pick_one(two, || unreachable!()).unwrap_err().to_string();
        assert!(
            err.contains("/a (via /proc/7/root)") && err.contains("--node-name"),
            "{err}"
        );
    }
}
