//! Read access to a running instance's pinned maps, and what the operator CLI derives from
//! them: counters, flows, target health, and a step-by-step prediction of what the XDP program
//! does with a packet (`explain`).
//!
//! Every report is a pure function over a [`MapsView`], so the same code runs against the live
//! pinned maps ([`PinnedMaps`]) and, in tests, against an in-memory [`Snapshot`].
//!
//! Finding the pins: `lb-user standalone` pins under `/sys/fs/bpf/lbx/<node-name>`. Under
//! `ip netns exec` every process gets its own mount namespace with a fresh /sys, so a bpffs
//! mounted by the agent there is invisible to a CLI started by another `ip netns exec`. The
//! pins are then reached through the agent's own view, `/proc/<pid>/root/<pin dir>`, which the
//! kernel resolves in the agent's mount namespace.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    hash::{client_hash, flow_hash},
    port_be, port_host, service_port_word, v4, v4_octets, AffinityEntry, AffinityKey, Backend,
    Config, CtEntry, CtKey, Frontend, FrontendKey, Reason, RevNatEntry, BE_ACTIVE, BE_LOCAL,
    BE_TERMINATING, CT_CLOSING, CT_SNAT, FE_AFFINITY, FE_LOCAL_ONLY, PROTO_TCP, REV_SNAT,
};
use serde::Serialize;

use crate::model::proto_name;

/// Where `lb-user standalone` pins each node's maps (one directory per node name).
pub const PIN_ROOT: &str = "/sys/fs/bpf/lbx";

/// The pin directory of node `node_name` when `--pin-dir` is not given.
pub fn default_pin_dir(node_name: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(node_name)
}

/// A map pinned by every instance; its presence marks a pin directory as live.
const MARKER_MAP: &str = "CONFIG";
const NS_PER_S: u64 = 1_000_000_000;
/// SNAT port probes per new remote flow and their stride, as in lb-ebpf/src/lb.rs.
const SNAT_PROBES: u32 = 8;
const SNAT_PROBE_STRIDE: u32 = 7919;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
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
    #[error(
        "cannot open pinned map {name} in {dir:?}: {source}; is `lb-user standalone` running? \
         (maps of another lbx version need that version's lb-user)"
    )]
    Open {
        dir: PathBuf,
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "reading map {name} in {dir:?} failed ({op}): {source}; is `lb-user standalone` still running?"
    )]
    Read {
        dir: PathBuf,
        name: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
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
pub fn locate(pin_dir: Option<&Path>, node_name: Option<&str>) -> Result<Located, InspectError> {
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
    path.join(MARKER_MAP).exists()
}

/// `/proc/<pid>/root` of one process per mount namespace other than ours.
fn other_mount_namespaces() -> Result<Vec<(u32, PathBuf)>, InspectError> {
    let proc_dir = Path::new("/proc");
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = BTreeSet::new();
    if let Some(ns) = &ours {
        seen.insert(ns.clone());
    }
    let entries = std::fs::read_dir(proc_dir).map_err(|source| InspectError::Proc {
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

fn locate_dir(dir: &Path) -> Result<Located, InspectError> {
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
    pick_one(found, || InspectError::NotRunning {
        dir: dir.to_path_buf(),
    })
}

/// Every instance under [`PIN_ROOT`], here and in other mount namespaces.
fn discover() -> Result<Located, InspectError> {
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
    pick_one(found, || InspectError::NoInstance {
        root: root.to_path_buf(),
    })
}

fn pick_one(
    mut found: Vec<Located>,
    none: impl FnOnce() -> InspectError,
) -> Result<Located, InspectError> {
    match found.len() {
        0 => Err(none()),
        1 => Ok(found.remove(0)),
        _ => Err(InspectError::Ambiguous {
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

/// Name of interface `ifindex` in this network namespace, if it exists.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Now on the clock `bpf_ktime_get_ns()` reads (CLOCK_MONOTONIC), for affinity and SNAT ages.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS_PER_S + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------------
// Views of the maps

/// The map reads the reports need. Lookups return `None` for a missing key or an index
/// beyond the map, exactly the cases in which the BPF program's lookup fails.
pub trait MapsView {
    fn config(&self) -> Result<Config, InspectError>;
    /// Word `index` of SERVICE_PORTS.
    fn service_ports_word(&self, index: u32) -> Result<Option<u64>, InspectError>;
    fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, InspectError>;
    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError>;
    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError>;
    /// Position `slot` of the flat ring sequence (service `s`'s ring starts at `s * M`).
    fn ring_slot(&self, slot: u32) -> Result<Option<u32>, InspectError>;
    /// The ring of service slot `service_id`; shorter than `maglev_size` only if the map is.
    fn ring(&self, service_id: u32, maglev_size: u32) -> Result<Vec<u32>, InspectError> {
        let start = service_id as u64 * maglev_size as u64;
        let mut out = Vec::with_capacity(maglev_size as usize);
        for slot in start..start + maglev_size as u64 {
            let Ok(slot) = u32::try_from(slot) else { break };
            match self.ring_slot(slot)? {
                Some(id) => out.push(id),
                None => break,
            }
        }
        Ok(out)
    }
    fn conntrack(&self, key: &CtKey) -> Result<Option<CtEntry>, InspectError>;
    fn flows(&self) -> Result<Vec<(CtKey, CtEntry)>, InspectError>;
    fn revnat(&self, key: &CtKey) -> Result<Option<RevNatEntry>, InspectError>;
    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>, InspectError>;
    /// Counters summed over CPUs, one per `Reason`.
    fn stats(&self) -> Result<Vec<(Reason, u64)>, InspectError>;
}

/// An instance's maps, opened from their pins.
pub struct PinnedMaps {
    dir: PathBuf,
    config: Array<MapData, Config>,
    service_ports: Array<MapData, u64>,
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, [u32; 2]>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    revnat: HashMap<MapData, CtKey, RevNatEntry>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    stats: PerCpuArray<MapData, u64>,
}

fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, InspectError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let open = |source| InspectError::Open {
        dir: dir.to_path_buf(),
        name,
        source: Box::new(source),
    };
    let data = MapData::from_pin(dir.join(name)).map_err(open)?;
    let map = Map::from_map_data(data).map_err(open)?;
    T::try_from(map).map_err(open)
}

impl PinnedMaps {
    /// Opens every map of the instance at `located`.
    pub fn open(located: &Located) -> Result<Self, InspectError> {
        let d = located.open_path.as_path();
        Ok(PinnedMaps {
            dir: located.pin_dir.clone(),
            config: open_pinned(d, "CONFIG")?,
            service_ports: open_pinned(d, "SERVICE_PORTS")?,
            frontends: open_pinned(d, "FRONTENDS")?,
            backends: open_pinned(d, "BACKENDS")?,
            maglev: open_pinned(d, "MAGLEV")?,
            conntrack: open_pinned(d, "CONNTRACK")?,
            revnat: open_pinned(d, "REVNAT")?,
            affinity: open_pinned(d, "AFFINITY")?,
            stats: open_pinned(d, "STATS")?,
        })
    }

    /// The pin directory (as the agent sees it), for messages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_err(
        &self,
        name: &'static str,
        op: &'static str,
    ) -> impl Fn(MapError) -> InspectError + '_ {
        move |source| InspectError::Read {
            dir: self.dir.clone(),
            name,
            op,
            source: Box::new(source),
        }
    }

    /// A lookup whose "missing" (key absent, index out of range) is `None`.
    fn lookup<V>(
        &self,
        name: &'static str,
        res: Result<V, MapError>,
    ) -> Result<Option<V>, InspectError> {
        match res {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound | MapError::OutOfBounds { .. }) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(e) => Err(self.read_err(name, "lookup")(e)),
        }
    }
}

impl MapsView for PinnedMaps {
    fn config(&self) -> Result<Config, InspectError> {
        self.config
            .get(&0, 0)
            .map_err(self.read_err("CONFIG", "lookup"))
    }

    fn service_ports_word(&self, index: u32) -> Result<Option<u64>, InspectError> {
        self.lookup("SERVICE_PORTS", self.service_ports.get(&index, 0))
    }

    fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, InspectError> {
        self.lookup("FRONTENDS", self.frontends.get(key, 0))
    }

    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError> {
        self.frontends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.read_err("FRONTENDS", "iterate"))
    }

    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError> {
        self.lookup("BACKENDS", self.backends.get(&id, 0))
    }

    fn ring_slot(&self, slot: u32) -> Result<Option<u32>, InspectError> {
        Ok(self
            .lookup("MAGLEV", self.maglev.get(&(slot / 2), 0))?
            .map(|pair| pair[(slot % 2) as usize]))
    }

    /// Reads each element (two slots) once.
    fn ring(&self, service_id: u32, maglev_size: u32) -> Result<Vec<u32>, InspectError> {
        let start = service_id as u64 * maglev_size as u64;
        let end = start + maglev_size as u64;
        let mut out = Vec::with_capacity(maglev_size as usize);
        let mut elem = start / 2;
        while elem * 2 < end {
            let Ok(index) = u32::try_from(elem) else {
                break;
            };
            let Some(pair) = self.lookup("MAGLEV", self.maglev.get(&index, 0))? else {
                break;
            };
            for (half, id) in pair.iter().enumerate() {
                let slot = elem * 2 + half as u64;
                if slot >= start && slot < end {
                    out.push(*id);
                }
            }
            elem += 1;
        }
        Ok(out)
    }

    fn conntrack(&self, key: &CtKey) -> Result<Option<CtEntry>, InspectError> {
        self.lookup("CONNTRACK", self.conntrack.get(key, 0))
    }

    fn flows(&self) -> Result<Vec<(CtKey, CtEntry)>, InspectError> {
        self.conntrack
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.read_err("CONNTRACK", "iterate"))
    }

    fn revnat(&self, key: &CtKey) -> Result<Option<RevNatEntry>, InspectError> {
        self.lookup("REVNAT", self.revnat.get(key, 0))
    }

    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>, InspectError> {
        self.lookup("AFFINITY", self.affinity.get(key, 0))
    }

    fn stats(&self) -> Result<Vec<(Reason, u64)>, InspectError> {
        let mut out = Vec::with_capacity(Reason::ALL.len());
        for &reason in Reason::ALL {
            let per_cpu = self
                .stats
                .get(&(reason as u32), 0)
                .map_err(self.read_err("STATS", "lookup"))?;
            out.push((reason, per_cpu.iter().sum()));
        }
        Ok(out)
    }
}

/// Map contents held in memory: for tests, and for reasoning about a state without a kernel.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub config: Config,
    pub service_ports: BTreeMap<u32, u64>,
    pub frontends: StdHashMap<FrontendKey, Frontend>,
    /// Indexed by backend id; ids beyond the end do not exist.
    pub backends: Vec<Backend>,
    /// The flat ring sequence (service `s` at `[s * M, (s + 1) * M)`).
    pub rings: Vec<u32>,
    pub conntrack: StdHashMap<CtKey, CtEntry>,
    pub revnat: StdHashMap<CtKey, RevNatEntry>,
    pub affinity: StdHashMap<AffinityKey, AffinityEntry>,
    /// Indexed by `Reason as usize`.
    pub stats: Vec<u64>,
}

impl Snapshot {
    /// Adds a frontend and sets its SERVICE_PORTS bit, as the agent does.
    pub fn add_frontend(&mut self, key: FrontendKey, fe: Frontend) {
        let port = port_host(key.port);
        if let Some(word) = service_port_word(key.proto, port) {
            *self.service_ports.entry(word).or_default() |= 1u64 << (port % 64);
        }
        self.frontends.insert(key, fe);
    }
}

impl MapsView for Snapshot {
    fn config(&self) -> Result<Config, InspectError> {
        Ok(self.config)
    }
    fn service_ports_word(&self, index: u32) -> Result<Option<u64>, InspectError> {
        // The real array has 2048 words; unset ones read as 0.
        Ok((index < 2048).then(|| self.service_ports.get(&index).copied().unwrap_or(0)))
    }
    fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, InspectError> {
        Ok(self.frontends.get(key).copied())
    }
    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError> {
        Ok(self.frontends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError> {
        Ok(self.backends.get(id as usize).copied())
    }
    fn ring_slot(&self, slot: u32) -> Result<Option<u32>, InspectError> {
        Ok(self.rings.get(slot as usize).copied())
    }
    fn conntrack(&self, key: &CtKey) -> Result<Option<CtEntry>, InspectError> {
        Ok(self.conntrack.get(key).copied())
    }
    fn flows(&self) -> Result<Vec<(CtKey, CtEntry)>, InspectError> {
        Ok(self.conntrack.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn revnat(&self, key: &CtKey) -> Result<Option<RevNatEntry>, InspectError> {
        Ok(self.revnat.get(key).copied())
    }
    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>, InspectError> {
        Ok(self.affinity.get(key).copied())
    }
    fn stats(&self) -> Result<Vec<(Reason, u64)>, InspectError> {
        Ok(Reason::ALL
            .iter()
            .map(|&r| (r, self.stats.get(r as usize).copied().unwrap_or(0)))
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Shared formatting

fn ip(addr: [u32; 4]) -> Ipv4Addr {
    Ipv4Addr::from(v4_octets(addr))
}

fn sock(addr: [u32; 4], port_net: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(addr), port_host(port_net))
}

/// An address as map keys hold it (one IPv4 `u32`, wire order).
fn ip_of(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

fn sock4(addr: u32, port_net: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip_of(addr), port_host(port_net))
}

fn serialize_reason<S: serde::Serializer>(r: &Reason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.name())
}

/// A BACKENDS entry that holds a backend.
fn active(be: Option<Backend>) -> Option<Backend> {
    be.filter(|b| b.flags & BE_ACTIVE != 0)
}

// ---------------------------------------------------------------------------------------------
// counters

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counter {
    #[serde(serialize_with = "serialize_reason")]
    pub reason: Reason,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CountersReport {
    /// Every reason, in index order, zeros included.
    pub counters: Vec<Counter>,
    pub total: u64,
}

pub fn counters(view: &dyn MapsView) -> Result<CountersReport, InspectError> {
    let counters: Vec<Counter> = view
        .stats()?
        .into_iter()
        .map(|(reason, count)| Counter { reason, count })
        .collect();
    let total = counters
        .iter()
        .map(|c| c.count)
        .fold(0u64, u64::saturating_add);
    Ok(CountersReport { counters, total })
}

// ---------------------------------------------------------------------------------------------
// conntrack

/// One tracked flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub proto: String,
    pub service_id: u32,
    pub backend_id: u32,
    /// None when the id no longer holds a backend (the flow will reselect).
    pub backend: Option<SocketAddrV4>,
    /// Source port towards a remote backend (host order), for SNATed flows.
    pub snat_port: Option<u16>,
}

/// Every conntrack entry, sorted by client then frontend.
pub fn flows(view: &dyn MapsView) -> Result<Vec<FlowRow>, InspectError> {
    let mut backends: BTreeMap<u32, Option<Backend>> = BTreeMap::new();
    let mut rows = Vec::new();
    for (key, ct) in view.flows()? {
        let be = match backends.get(&ct.backend_id) {
            Some(b) => *b,
            None => {
                let b = active(view.backend(ct.backend_id)?);
                backends.insert(ct.backend_id, b);
                b
            }
        };
        rows.push(FlowRow {
            client: sock4(key.saddr, key.sport),
            frontend: sock4(key.daddr, key.dport),
            proto: proto_name(key.proto),
            service_id: ct.service_id,
            backend_id: ct.backend_id,
            backend: be.map(|b| sock(b.addr, b.port)),
            snat_port: (ct.flags & CT_SNAT != 0).then(|| port_host(ct.snat_port)),
        });
    }
    rows.sort_by(|a, b| {
        (
            a.client.ip(),
            a.client.port(),
            a.frontend.ip(),
            a.frontend.port(),
            &a.proto,
        )
            .cmp(&(
                b.client.ip(),
                b.client.port(),
                b.frontend.ip(),
                b.frontend.port(),
                &b.proto,
            ))
    });
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// targets

/// A target's health as far as the data plane is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Takes new flows.
    Healthy,
    /// Terminating (or no longer ready): keeps its established flows, gets no new ones.
    Draining,
    /// Holds a backend but gets no share of new flows and is not draining.
    Unused,
    /// The ring or a flow points at an id that holds no backend: such packets go to the kernel.
    Missing,
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Healthy => "healthy",
            TargetState::Draining => "draining",
            TargetState::Unused => "unused",
            TargetState::Missing => "missing",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    pub id: u32,
    /// None when the id holds no backend.
    pub backend: Option<SocketAddrV4>,
    pub state: TargetState,
    /// "local" (a pod on this node) or "remote"; None when the id holds no backend.
    pub location: Option<&'static str>,
    /// Ring positions pointing at it.
    pub ring_slots: u32,
    /// Share of new flows, percent of the ring.
    pub share_pct: f64,
    /// Conntrack entries of this frontend's service slot using it.
    pub flows: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendTargets {
    /// "*" for the NodePort wildcard (every node address), else the address.
    pub address: String,
    pub port: u16,
    pub proto: String,
    pub service_id: u32,
    pub backend_count: u32,
    pub affinity_timeout_s: Option<u32>,
    pub local_only: bool,
    /// Ring members first (by share), then backends only flows still use.
    pub targets: Vec<Target>,
}

impl FrontendTargets {
    /// `addr:port`, `*:nodePort` for the wildcard.
    pub fn label(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

/// Per frontend, its backends from the Maglev ring (and the ones established flows still use),
/// like `aws elbv2 describe-target-health`. Sorted by protocol, port, address.
pub fn targets(view: &dyn MapsView) -> Result<Vec<FrontendTargets>, InspectError> {
    let cfg = view.config()?;
    let m = cfg.maglev_size;
    let mut frontends = view.frontends()?;
    frontends.sort_by_key(|(k, _)| (k.proto, port_host(k.port), ip_of(k.addr)));

    // Flows per (service slot, backend id).
    let mut flow_counts: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for (_, ct) in view.flows()? {
        *flow_counts
            .entry((ct.service_id, ct.backend_id))
            .or_default() += 1;
    }
    let mut rings: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    let mut backends: BTreeMap<u32, Option<Backend>> = BTreeMap::new();

    let mut out = Vec::new();
    for (key, fe) in frontends {
        let sid = fe.service_id;
        if let std::collections::btree_map::Entry::Vacant(slot) = rings.entry(sid) {
            let mut counts = BTreeMap::new();
            // backend_count 0 means the program never reads the ring.
            if fe.backend_count > 0 && m > 0 {
                for id in view.ring(sid, m)? {
                    *counts.entry(id).or_insert(0u32) += 1;
                }
            }
            slot.insert(counts);
        }
        let ring = &rings[&sid];
        let mut ids: Vec<u32> = ring.keys().copied().collect();
        for &(s, id) in flow_counts.keys() {
            if s == sid && !ring.contains_key(&id) {
                ids.push(id);
            }
        }
        let mut list = Vec::new();
        for id in ids {
            let be = match backends.get(&id) {
                Some(b) => *b,
                None => {
                    let b = active(view.backend(id)?);
                    backends.insert(id, b);
                    b
                }
            };
            let slots = ring.get(&id).copied().unwrap_or(0);
            let state = match be {
                _ if id == 0 => TargetState::Missing,
                None => TargetState::Missing,
                Some(b) if b.flags & BE_TERMINATING != 0 => TargetState::Draining,
                Some(_) if slots > 0 => TargetState::Healthy,
                Some(_) => TargetState::Unused,
            };
            list.push(Target {
                id,
                backend: be.map(|b| sock(b.addr, b.port)),
                state,
                location: be.map(|b| {
                    if b.flags & BE_LOCAL != 0 {
                        "local"
                    } else {
                        "remote"
                    }
                }),
                ring_slots: slots,
                share_pct: if m > 0 {
                    slots as f64 * 100.0 / m as f64
                } else {
                    0.0
                },
                flows: flow_counts.get(&(sid, id)).copied().unwrap_or(0),
            });
        }
        list.sort_by(|a, b| {
            b.ring_slots
                .cmp(&a.ring_slots)
                .then_with(|| a.backend.cmp(&b.backend))
                .then_with(|| a.id.cmp(&b.id))
        });
        out.push(FrontendTargets {
            address: if key.addr == 0 {
                "*".to_string()
            } else {
                ip_of(key.addr).to_string()
            },
            port: port_host(key.port),
            proto: proto_name(key.proto),
            service_id: sid,
            backend_count: fe.backend_count,
            affinity_timeout_s: (fe.flags & FE_AFFINITY != 0).then_some(fe.affinity_timeout_s),
            local_only: fe.flags & FE_LOCAL_ONLY != 0,
            targets: list,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// explain

/// The packet to explain: its first bytes as they reach the node's NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// A TCP SYN (opens a connection): only a SYN starts a TCP flow that has no entry, and a
    /// SYN reselects when the tracked backend is terminating.
    pub syn: bool,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} {}", self.from, self.to, proto_name(self.proto))?;
        if self.syn && self.proto == PROTO_TCP {
            f.write_str(" SYN")?;
        }
        Ok(())
    }
}

/// One decision of the program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The pipeline stage, as named in lb-ebpf (snat_reply, service_ports, lookup_service,
    /// ct_lookup, affinity, maglev, backend, deliver).
    pub step: &'static str,
    pub outcome: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExplainedBackend {
    pub id: u32,
    pub addr: SocketAddrV4,
    pub local: bool,
    pub ifindex: u32,
    pub terminating: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub packet: String,
    pub steps: Vec<Step>,
    /// The counter the packet would increment.
    #[serde(serialize_with = "serialize_reason")]
    pub reason: Reason,
    /// "XDP_PASS" or "XDP_REDIRECT" (also out of the interface the packet came in on).
    pub action: &'static str,
    pub out_ifindex: Option<u32>,
    pub backend: Option<ExplainedBackend>,
    /// The packet's addresses after the rewrite: (source, destination).
    pub rewritten: Option<(SocketAddrV4, SocketAddrV4)>,
    /// Whether the packet belongs to a tracked flow (no new ct entry is created).
    pub established: bool,
}

struct Trace {
    steps: Vec<Step>,
}

impl Trace {
    fn step(&mut self, step: &'static str, outcome: impl Into<String>) {
        self.steps.push(Step {
            step,
            outcome: outcome.into(),
        });
    }
}

fn describe_backend(id: u32, be: &Backend) -> String {
    let mut s = format!(
        "id {id} = {} {}, ifindex {}",
        sock(be.addr, be.port),
        if be.flags & BE_LOCAL != 0 {
            "(local pod)"
        } else {
            "(remote)"
        },
        be.ifindex
    );
    if be.flags & BE_TERMINATING != 0 {
        s.push_str(", terminating");
    }
    s
}

fn is_node_addr(cfg: &Config, addr: u32) -> bool {
    addr != 0 && cfg.node_addrs.contains(&addr)
}

/// Predicts what `lb_ingress` does with `probe`, step by step, reading `view` exactly where
/// the program reads its maps. `now_ns` is CLOCK_MONOTONIC (see [`monotonic_ns`]); it decides
/// whether affinity entries are fresh and SNAT ports idle. The packet is assumed well formed
/// with TTL > 1; the prediction cannot see map writes racing with it. The steps keep the
/// logical order (frontend, then flow): the program looks the flow up first and skips the
/// frontend while the flow's entry carries the current `frontend_epoch`, which gives the
/// same answer as checking the entry's service slot against the frontend, as done here.
pub fn explain(
    view: &dyn MapsView,
    probe: &Probe,
    now_ns: u64,
) -> Result<Explanation, InspectError> {
    let cfg = view.config()?;
    let mut t = Trace { steps: Vec::new() };
    let saddr = v4(probe.from.ip().octets());
    let daddr = v4(probe.to.ip().octets());
    let sport = port_be(probe.from.port());
    let dport = port_be(probe.to.port());
    let ct_key = CtKey {
        saddr: saddr[0],
        daddr: daddr[0],
        sport,
        dport,
        proto: probe.proto,
        ..Default::default()
    };
    let pass = |t: Trace, reason: Reason| Explanation {
        packet: probe.to_string(),
        steps: t.steps,
        reason,
        action: "XDP_PASS",
        out_ifindex: None,
        backend: None,
        rewritten: None,
        established: false,
    };

    // 1. A reply to a flow forwarded to another node?
    let dst_port = probe.to.port();
    if cfg.snat_addr != 0
        && daddr[0] == cfg.snat_addr
        && (cfg.snat_port_min..=cfg.snat_port_max).contains(&dst_port)
    {
        match view.revnat(&ct_key)? {
            Some(rev) if rev.flags & REV_SNAT != 0 => {
                let src = sock4(rev.frontend_addr, rev.frontend_port);
                let dst = sock4(rev.client_addr, rev.client_port);
                t.step(
                    "snat_reply",
                    format!("REVNAT hit: a reply to a SNATed flow; becomes {src} -> {dst}, out ifindex {}", rev.ifindex),
                );
                return Ok(Explanation {
                    packet: probe.to_string(),
                    steps: t.steps,
                    reason: Reason::RevNatRemote,
                    action: "XDP_REDIRECT",
                    out_ifindex: Some(rev.ifindex),
                    backend: None,
                    rewritten: Some((src, dst)),
                    established: true,
                });
            }
            _ => t.step(
                "snat_reply",
                "addressed to the SNAT address and port range, but no SNAT entry in REVNAT: not a reply",
            ),
        }
    } else {
        t.step(
            "snat_reply",
            format!(
                "not addressed to the SNAT address {}:{}-{}: not a reply to a forwarded flow",
                Ipv4Addr::from(cfg.snat_addr.to_ne_bytes()),
                cfg.snat_port_min,
                cfg.snat_port_max
            ),
        );
    }

    // 2. lookup_service: the port bitmap, then NodePort (node addresses) and exact frontends.
    let proto = proto_name(probe.proto);
    let Some(word) = service_port_word(probe.proto, dst_port) else {
        t.step(
            "service_ports",
            format!("protocol {proto} has no frontends"),
        );
        return Ok(pass(t, Reason::PassUnknownProto));
    };
    let bits = view.service_ports_word(word)?.unwrap_or(0);
    if bits & (1u64 << (dst_port % 64)) == 0 {
        t.step(
            "service_ports",
            format!("bit for {proto} port {dst_port} is clear: no frontend uses this port"),
        );
        return Ok(pass(t, Reason::PassNonService));
    }
    t.step(
        "service_ports",
        format!("bit for {proto} port {dst_port} is set"),
    );

    let mut key = FrontendKey {
        addr: 0,
        port: dport,
        proto: probe.proto,
        ..Default::default()
    };
    let mut found = None;
    if is_node_addr(&cfg, daddr[0]) {
        match view.frontend(&key)? {
            Some(fe) => {
                t.step(
                    "lookup_service",
                    format!(
                        "{} is a node address: NodePort frontend *:{dst_port}/{proto}",
                        probe.to.ip()
                    ),
                );
                found = Some(fe);
            }
            None => t.step(
                "lookup_service",
                format!(
                    "{} is a node address but there is no NodePort frontend *:{dst_port}/{proto}",
                    probe.to.ip()
                ),
            ),
        }
    } else {
        t.step(
            "lookup_service",
            format!(
                "{} is not a node address: NodePort frontends do not match",
                probe.to.ip()
            ),
        );
    }
    if found.is_none() {
        key.addr = daddr[0];
        match view.frontend(&key)? {
            Some(fe) => {
                t.step(
                    "lookup_service",
                    format!(
                        "frontend {}/{proto} (LoadBalancer IP or externalIP)",
                        probe.to
                    ),
                );
                found = Some(fe);
            }
            None => {
                t.step(
                    "lookup_service",
                    format!("no frontend {}/{proto}: not a service", probe.to),
                );
                return Ok(pass(t, Reason::PassNonService));
            }
        }
    }
    let fe = found.expect("set above");
    let mut fe_desc = format!(
        "service slot {}, {} backend(s) take new flows",
        fe.service_id, fe.backend_count
    );
    if fe.flags & FE_AFFINITY != 0 {
        fe_desc.push_str(&format!(
            ", sessionAffinity ClientIP ({} s)",
            fe.affinity_timeout_s
        ));
    }
    if fe.flags & FE_LOCAL_ONLY != 0 {
        fe_desc.push_str(", externalTrafficPolicy Local");
    }
    t.step("lookup_service", fe_desc);

    // 3. ct_lookup: an established flow keeps its backend.
    let mut chosen: Option<(u32, Backend, bool)> = None; // (id, backend, established)
    let mut ct_snat_port = 0u16;
    let ct_entry = view.conntrack(&ct_key)?;
    let has_entry = ct_entry.is_some();
    match ct_entry {
        None => t.step("ct_lookup", "no conntrack entry: a new flow"),
        Some(ct) if ct.service_id != fe.service_id => t.step(
            "ct_lookup",
            format!(
                "entry for service slot {} but the frontend now uses slot {}: stale, selecting anew",
                ct.service_id, fe.service_id
            ),
        ),
        Some(ct)
            if ct.flags & CT_CLOSING != 0
                && (probe.syn
                    || ((now_ns / NS_PER_S) as u32).wrapping_sub(ct.closing_s) > cfg.close_grace_s) =>
        {
            t.step(
                "ct_lookup",
                format!(
                    "entry of a flow that saw FIN/RST {} s ago (grace {} s){}: selecting anew",
                    ((now_ns / NS_PER_S) as u32).wrapping_sub(ct.closing_s),
                    cfg.close_grace_s,
                    if probe.syn { ", and this is a SYN" } else { "" }
                ),
            )
        }
        Some(ct) => match active(view.backend(ct.backend_id)?) {
            None => t.step(
                "ct_lookup",
                format!("entry points at backend id {}, which holds no backend: selecting anew", ct.backend_id),
            ),
            Some(be) if be.flags & BE_TERMINATING != 0 && probe.syn => t.step(
                "ct_lookup",
                format!(
                    "entry points at backend id {}, which is terminating, and this is a SYN: selecting anew",
                    ct.backend_id
                ),
            ),
            Some(be) => {
                t.step(
                    "ct_lookup",
                    format!("established flow: keeps backend id {}", ct.backend_id),
                );
                ct_snat_port = ct.snat_port;
                chosen = Some((ct.backend_id, be, true));
            }
        },
    }

    // 4. select_backend: affinity, else the Maglev ring. A TCP flow without an entry
    // starts only at a SYN; one with an entry is ours and is balanced again.
    if chosen.is_none() && !has_entry && probe.proto == PROTO_TCP && !probe.syn {
        t.step(
            "select_backend",
            "TCP without SYN and no flow entry: the connection is the kernel's (kube-proxy's); \
             lbx starts TCP flows only at a SYN (add --syn to see where a new connection goes)",
        );
        return Ok(pass(t, Reason::PassMidStream));
    }
    if chosen.is_none() {
        if fe.backend_count == 0 {
            t.step(
                "select_backend",
                "the frontend has no backend that takes new flows",
            );
            return Ok(pass(t, Reason::PassNoBackend));
        }
        let affinity = fe.flags & FE_AFFINITY != 0;
        if affinity {
            let akey = AffinityKey {
                client: saddr[0],
                service_id: fe.service_id,
            };
            match view.affinity(&akey)? {
                None => t.step(
                    "affinity",
                    format!("no affinity entry for client {}", probe.from.ip()),
                ),
                Some(a) => {
                    let age = now_ns.wrapping_sub(a.last_used_ns);
                    let fresh = age <= fe.affinity_timeout_s as u64 * NS_PER_S;
                    match active(view.backend(a.backend_id)?) {
                        _ if !fresh => t.step(
                            "affinity",
                            format!(
                                "entry for backend id {} expired ({} s old, timeout {} s)",
                                a.backend_id,
                                age / NS_PER_S,
                                fe.affinity_timeout_s
                            ),
                        ),
                        None => t.step(
                            "affinity",
                            format!(
                                "entry points at backend id {}, which holds no backend",
                                a.backend_id
                            ),
                        ),
                        Some(be) if be.flags & BE_TERMINATING != 0 => t.step(
                            "affinity",
                            format!(
                                "entry points at backend id {}, which is terminating",
                                a.backend_id
                            ),
                        ),
                        Some(be) => {
                            t.step(
                                "affinity",
                                format!(
                                    "client {} sticks to backend id {}",
                                    probe.from.ip(),
                                    a.backend_id
                                ),
                            );
                            chosen = Some((a.backend_id, be, false));
                        }
                    }
                }
            }
        }
        if chosen.is_none() {
            let m = cfg.maglev_size;
            if m == 0 {
                t.step(
                    "maglev",
                    "CONFIG.maglev_size is 0: the agent has not configured the data plane",
                );
                return Ok(pass(t, Reason::PassInternal));
            }
            let (hash, what) = if affinity {
                (client_hash(&saddr), "client hash")
            } else {
                (
                    flow_hash(&saddr, &daddr, sport, dport, probe.proto),
                    "flow hash",
                )
            };
            let pos = hash % m;
            let slot = fe.service_id.wrapping_mul(m).wrapping_add(pos);
            let id = view.ring_slot(slot)?;
            let Some(id) = id else {
                t.step(
                    "maglev",
                    format!(
                        "{what} {hash:#010x} % {m} = {pos}: ring slot {slot} lies beyond MAGLEV"
                    ),
                );
                return Ok(pass(t, Reason::PassBackendMissing));
            };
            t.step(
                "maglev",
                format!(
                    "{what} {hash:#010x} % {m} = position {pos} of ring {} -> backend id {id}",
                    fe.service_id
                ),
            );
            match active(view.backend(id)?) {
                Some(be) => chosen = Some((id, be, false)),
                None => {
                    t.step(
                        "backend",
                        format!("id {id} holds no backend (maps being rewritten?)"),
                    );
                    return Ok(pass(t, Reason::PassBackendMissing));
                }
            }
        }
    }
    let (id, be, established) = chosen.expect("chosen above or returned");
    t.step("backend", describe_backend(id, &be));

    // 5. Delivery: DNAT into a local pod's veth, or SNAT + DNAT towards the owning node.
    let be_sock = sock(be.addr, be.port);
    let backend = Some(ExplainedBackend {
        id,
        addr: be_sock,
        local: be.flags & BE_LOCAL != 0,
        ifindex: be.ifindex,
        terminating: be.flags & BE_TERMINATING != 0,
    });
    let (reason, src) = if be.flags & BE_LOCAL != 0 {
        t.step(
            "deliver",
            format!(
                "DNAT to {be_sock}, client address kept; redirect into ifindex {}{}",
                be.ifindex,
                if established {
                    ""
                } else {
                    "; creates the conntrack and reverse-NAT entries"
                }
            ),
        );
        (Reason::FwdLocal, probe.from)
    } else {
        let snat_ip = Ipv4Addr::from(cfg.snat_addr.to_ne_bytes());
        let port = if established {
            port_host(ct_snat_port)
        } else {
            match snat_port(view, &cfg, probe, &be, now_ns)? {
                Ok(p) => p,
                Err(why) => {
                    t.step("deliver", why);
                    return Ok(pass(t, Reason::PassSnatExhausted));
                }
            }
        };
        let src = SocketAddrV4::new(snat_ip, port);
        t.step(
            "deliver",
            format!(
                "SNAT to {src} and DNAT to {be_sock}; send out ifindex {}{}",
                be.ifindex,
                if established {
                    ""
                } else {
                    "; creates the conntrack and SNAT entries"
                }
            ),
        );
        (Reason::FwdRemote, src)
    };
    Ok(Explanation {
        packet: probe.to_string(),
        steps: t.steps,
        reason,
        action: "XDP_REDIRECT",
        out_ifindex: Some(be.ifindex),
        backend,
        rewritten: Some((src, be_sock)),
        established,
    })
}

/// The SNAT port `snat_alloc` in lb-ebpf picks for a new remote flow: the first free or idle
/// of its probe sequence. Err(reason) when it would find none.
fn snat_port(
    view: &dyn MapsView,
    cfg: &Config,
    probe: &Probe,
    be: &Backend,
    now_ns: u64,
) -> Result<Result<u16, String>, InspectError> {
    if cfg.snat_addr == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return Ok(Err(
            "no SNAT address or an empty SNAT port range in CONFIG".into()
        ));
    }
    let range = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    let now_s = (now_ns / NS_PER_S) as u32;
    let start = flow_hash(
        &v4(probe.from.ip().octets()),
        &v4(probe.to.ip().octets()),
        port_be(probe.from.port()),
        port_be(probe.to.port()),
        probe.proto,
    );
    for i in 0..SNAT_PROBES {
        let port = cfg
            .snat_port_min
            .wrapping_add((start.wrapping_add(i.wrapping_mul(SNAT_PROBE_STRIDE)) % range) as u16);
        let rkey = CtKey {
            saddr: be.addr[0],
            daddr: cfg.snat_addr,
            sport: be.port,
            dport: port_be(port),
            proto: probe.proto,
            ..Default::default()
        };
        match view.revnat(&rkey)? {
            None => return Ok(Ok(port)),
            Some(old) if now_s.wrapping_sub(old.stamp_s) > cfg.snat_idle_s => return Ok(Ok(port)),
            Some(_) => {}
        }
    }
    Ok(Err(format!(
        "all {SNAT_PROBES} SNAT ports probed towards {} are in use: passed to the kernel",
        sock(be.addr, be.port)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{ip4, PROTO_UDP};

    const NODE: [u8; 4] = [192, 168, 1, 10];
    const LB_IP: [u8; 4] = [203, 0, 113, 7];
    const M: u32 = 7;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn be(addr: [u8; 4], port: u16, flags: u8, ifindex: u32) -> Backend {
        Backend {
            addr: v4(addr),
            port: port_be(port),
            flags: BE_ACTIVE | flags,
            ifindex,
            ..Default::default()
        }
    }

    /// One NodePort service (slot 1) with a local (id 1) and a remote (id 2) backend, one
    /// LoadBalancer IP frontend on the same slot, and an empty UDP service (slot 0).
    fn snapshot() -> Snapshot {
        let mut s = Snapshot {
            config: Config {
                node_addrs: [v4(NODE)[0], 0, 0, 0],
                snat_addr: v4(NODE)[0],
                maglev_size: M,
                snat_port_min: 61000,
                snat_port_max: 61003,
                snat_idle_s: 300,
                ..Default::default()
            },
            backends: vec![
                Backend::default(),
                be([10, 244, 1, 5], 8080, BE_LOCAL, 7),
                be([10, 244, 2, 9], 8080, 0, 2),
            ],
            rings: vec![0; 3 * M as usize],
            stats: vec![0; 32],
            ..Default::default()
        };
        // Ring of slot 1: 4 x id 1, 3 x id 2.
        for (i, id) in [1, 2, 1, 2, 1, 2, 1].into_iter().enumerate() {
            s.rings[M as usize + i] = id;
        }
        let fe = Frontend {
            service_id: 1,
            backend_count: 2,
            flags: 0,
            affinity_timeout_s: 0,
        };
        s.add_frontend(
            FrontendKey {
                addr: 0,
                port: port_be(30080),
                proto: PROTO_TCP,
                ..Default::default()
            },
            fe,
        );
        s.add_frontend(
            FrontendKey {
                addr: ip4(LB_IP),
                port: port_be(80),
                proto: PROTO_TCP,
                ..Default::default()
            },
            fe,
        );
        s.add_frontend(
            FrontendKey {
                addr: 0,
                port: port_be(30053),
                proto: PROTO_UDP,
                ..Default::default()
            },
            Frontend {
                service_id: 0,
                backend_count: 0,
                flags: 0,
                affinity_timeout_s: 0,
            },
        );
        s
    }

    fn probe(from: &str, to: &str) -> Probe {
        Probe {
            from: sa(from),
            to: sa(to),
            proto: PROTO_TCP,
            syn: true,
        }
    }

    /// The backend id the ring gives a flow (independent of explain's own arithmetic).
    fn ring_pick(s: &Snapshot, p: &Probe, service_id: u32) -> u32 {
        let h = flow_hash(
            &v4(p.from.ip().octets()),
            &v4(p.to.ip().octets()),
            port_be(p.from.port()),
            port_be(p.to.port()),
            p.proto,
        );
        s.rings[(service_id * M + h % M) as usize]
    }

    fn steps(e: &Explanation) -> Vec<&'static str> {
        e.steps.iter().map(|s| s.step).collect()
    }

    #[test]
    fn explain_unused_port_passes_at_the_bitmap() {
        let e = explain(&snapshot(), &probe("10.0.0.9:40000", "192.168.1.10:22"), 0).unwrap();
        assert_eq!(e.reason, Reason::PassNonService);
        assert_eq!(e.action, "XDP_PASS");
        assert_eq!(steps(&e), ["snat_reply", "service_ports"]);
        assert!(e.steps[1].outcome.contains("clear"), "{:?}", e.steps);
    }

    #[test]
    fn explain_nodeport_on_a_non_node_address_is_not_a_service() {
        // Port 30080 is in the bitmap, but 10.9.9.9 is neither a node address nor a frontend.
        let e = explain(&snapshot(), &probe("10.0.0.9:40000", "10.9.9.9:30080"), 0).unwrap();
        assert_eq!(e.reason, Reason::PassNonService);
        assert!(e
            .steps
            .iter()
            .any(|s| s.outcome.contains("not a node address")));
    }

    #[test]
    fn explain_new_flow_follows_the_ring_to_local_or_remote() {
        let s = snapshot();
        let mut seen = BTreeSet::new();
        for sport in 40000..40064u16 {
            let p = probe(&format!("10.0.0.9:{sport}"), "192.168.1.10:30080");
            let e = explain(&s, &p, 0).unwrap();
            let want = ring_pick(&s, &p, 1);
            let got = e.backend.as_ref().unwrap();
            assert_eq!(got.id, want, "{e:?}");
            assert!(!e.established);
            assert_eq!(e.action, "XDP_REDIRECT");
            match want {
                1 => {
                    assert_eq!(e.reason, Reason::FwdLocal);
                    assert_eq!(e.out_ifindex, Some(7));
                    // Client address kept.
                    assert_eq!(e.rewritten, Some((p.from, sa("10.244.1.5:8080"))));
                }
                2 => {
                    assert_eq!(e.reason, Reason::FwdRemote);
                    let (src, dst) = e.rewritten.unwrap();
                    assert_eq!(*src.ip(), Ipv4Addr::from(NODE));
                    assert!((61000..=61003).contains(&src.port()));
                    assert_eq!(dst, sa("10.244.2.9:8080"));
                }
                other => panic!("ring holds id {other}"),
            }
            seen.insert(want);
        }
        assert_eq!(seen.len(), 2, "64 flows should reach both backends");
    }

    #[test]
    fn explain_lb_ip_matches_the_exact_frontend() {
        let e = explain(&snapshot(), &probe("10.0.0.9:40000", "203.0.113.7:80"), 0).unwrap();
        assert!(
            matches!(e.reason, Reason::FwdLocal | Reason::FwdRemote),
            "{e:?}"
        );
        assert!(e
            .steps
            .iter()
            .any(|s| s.outcome.contains("LoadBalancer IP")));
    }

    #[test]
    fn explain_established_flow_keeps_its_backend_and_terminating_reselects_on_syn() {
        let mut s = snapshot();
        let p = probe("10.0.0.9:40001", "192.168.1.10:30080");
        // Pin the flow to whichever backend the ring does NOT pick, so the ct path is visible.
        let other = 3 - ring_pick(&s, &p, 1);
        let key = CtKey {
            saddr: ip4(p.from.ip().octets()),
            daddr: ip4(p.to.ip().octets()),
            sport: port_be(p.from.port()),
            dport: port_be(p.to.port()),
            proto: PROTO_TCP,
            ..Default::default()
        };
        s.conntrack.insert(
            key,
            CtEntry {
                backend_id: other,
                service_id: 1,
                snat_port: port_be(61002),
                flags: CT_SNAT,
                ..Default::default()
            },
        );
        let e = explain(&s, &Probe { syn: false, ..p }, 0).unwrap();
        assert!(e.established);
        assert_eq!(e.backend.as_ref().unwrap().id, other);
        if other == 2 {
            assert_eq!(
                e.rewritten.unwrap().0,
                sa("192.168.1.10:61002"),
                "the flow's SNAT port"
            );
        }

        s.backends[other as usize].flags |= BE_TERMINATING;
        let kept = explain(&s, &Probe { syn: false, ..p }, 0).unwrap();
        assert_eq!(
            kept.backend.as_ref().unwrap().id,
            other,
            "established packets stay"
        );
        let syn = explain(&s, &p, 0).unwrap();
        assert!(!syn.established);
        assert_eq!(
            syn.backend.as_ref().unwrap().id,
            3 - other,
            "a SYN reselects"
        );

        // A ct entry of another service slot is stale.
        s.backends[other as usize].flags &= !BE_TERMINATING;
        s.conntrack.get_mut(&key).unwrap().service_id = 0;
        let stale = explain(&s, &Probe { syn: false, ..p }, 0).unwrap();
        assert!(!stale.established);
        assert!(stale.steps.iter().any(|s| s.outcome.contains("stale")));
        // Mid-stream with a stale entry: still ours, balanced again (not the kernel's).
        assert_ne!(stale.reason, Reason::PassMidStream);
        assert!(stale.backend.is_some());
    }

    #[test]
    fn explain_tcp_without_syn_and_without_flow_is_the_kernels() {
        let s = snapshot();
        let p = probe("10.0.0.9:40000", "192.168.1.10:30080");
        let e = explain(&s, &Probe { syn: false, ..p }, 0).unwrap();
        assert_eq!((e.reason, e.action), (Reason::PassMidStream, "XDP_PASS"));
        assert!(e.steps.last().unwrap().outcome.contains("--syn"), "{e:?}");
        // The same tuple as a SYN is a new flow; UDP needs no SYN.
        assert!(explain(&s, &p, 0).unwrap().backend.is_some());
        let udp = Probe {
            syn: false,
            proto: PROTO_UDP,
            ..probe("10.0.0.9:40000", "192.168.1.10:30053")
        };
        assert_ne!(explain(&s, &udp, 0).unwrap().reason, Reason::PassMidStream);
    }

    #[test]
    fn explain_no_backends_and_missing_backend_pass() {
        let mut s = snapshot();
        let mut p = probe("10.0.0.9:5000", "192.168.1.10:30053");
        p.proto = PROTO_UDP;
        assert_eq!(explain(&s, &p, 0).unwrap().reason, Reason::PassNoBackend);

        let p = probe("10.0.0.9:40000", "192.168.1.10:30080");
        let id = ring_pick(&s, &p, 1);
        s.backends[id as usize] = Backend::default();
        let e = explain(&s, &p, 0).unwrap();
        assert_eq!(e.reason, Reason::PassBackendMissing);
        assert_eq!(e.action, "XDP_PASS");
    }

    #[test]
    fn explain_affinity_uses_a_fresh_entry_else_the_client_hash() {
        let mut s = snapshot();
        for fe in s.frontends.values_mut() {
            if fe.service_id == 1 {
                fe.flags = FE_AFFINITY;
                fe.affinity_timeout_s = 10;
            }
        }
        let p = probe("10.0.0.9:40000", "192.168.1.10:30080");
        let by_hash = s.rings[(M + client_hash(&v4(p.from.ip().octets())) % M) as usize];
        // Every source port of one client lands on the same backend.
        for sport in [1u16, 2, 3, 40000] {
            let q = Probe {
                from: SocketAddrV4::new(*p.from.ip(), sport),
                ..p
            };
            assert_eq!(explain(&s, &q, 0).unwrap().backend.unwrap().id, by_hash);
        }
        let sticky = 3 - by_hash;
        s.affinity.insert(
            AffinityKey {
                client: ip4(p.from.ip().octets()),
                service_id: 1,
            },
            AffinityEntry {
                backend_id: sticky,
                last_used_ns: 100 * NS_PER_S,
                ..Default::default()
            },
        );
        let fresh = explain(&s, &p, 105 * NS_PER_S).unwrap();
        assert_eq!(fresh.backend.unwrap().id, sticky);
        let expired = explain(&s, &p, 111 * NS_PER_S).unwrap();
        assert_eq!(expired.backend.unwrap().id, by_hash);
        assert!(expired.steps.iter().any(|s| s.outcome.contains("expired")));
    }

    #[test]
    fn explain_snat_reply_is_reverse_natted() {
        let mut s = snapshot();
        let reply = probe("10.244.2.9:8080", "192.168.1.10:61001");
        let key = CtKey {
            saddr: ip4([10, 244, 2, 9]),
            daddr: ip4(NODE),
            sport: port_be(8080),
            dport: port_be(61001),
            proto: PROTO_TCP,
            ..Default::default()
        };
        s.revnat.insert(
            key,
            RevNatEntry {
                frontend_addr: ip4(NODE),
                client_addr: ip4([10, 0, 0, 9]),
                frontend_port: port_be(30080),
                client_port: port_be(40000),
                ifindex: 3,
                flags: REV_SNAT,
                ..Default::default()
            },
        );
        let e = explain(&s, &reply, 0).unwrap();
        assert_eq!(e.reason, Reason::RevNatRemote);
        assert_eq!(
            e.rewritten,
            Some((sa("192.168.1.10:30080"), sa("10.0.0.9:40000")))
        );
        assert_eq!(e.out_ifindex, Some(3));
        // Same packet outside the SNAT port range: not a reply.
        let other = probe("10.244.2.9:8080", "192.168.1.10:60999");
        assert_eq!(
            explain(&s, &other, 0).unwrap().reason,
            Reason::PassNonService
        );
    }

    #[test]
    fn explain_snat_port_skips_busy_ports_and_reuses_idle_ones() {
        let s0 = snapshot();
        // A flow the ring sends to the remote backend.
        let p = (40000..41000u16)
            .map(|sp| probe(&format!("10.0.0.9:{sp}"), "192.168.1.10:30080"))
            .find(|p| ring_pick(&s0, p, 1) == 2)
            .unwrap();
        let first = explain(&s0, &p, 0).unwrap().rewritten.unwrap().0.port();
        let rkey = |port: u16| CtKey {
            saddr: ip4([10, 244, 2, 9]),
            daddr: ip4(NODE),
            sport: port_be(8080),
            dport: port_be(port),
            proto: PROTO_TCP,
            ..Default::default()
        };
        let mut s = s0.clone();
        s.revnat.insert(
            rkey(first),
            RevNatEntry {
                flags: REV_SNAT,
                stamp_s: 1000,
                ..Default::default()
            },
        );
        let second = explain(&s, &p, 1000 * NS_PER_S)
            .unwrap()
            .rewritten
            .unwrap()
            .0
            .port();
        assert_ne!(second, first);
        // Idle longer than snat_idle_s: the first port is free again.
        let later = explain(&s, &p, 1301 * NS_PER_S)
            .unwrap()
            .rewritten
            .unwrap()
            .0
            .port();
        assert_eq!(later, first);
        // Every port busy: passed.
        for port in 61000..=61003 {
            s.revnat.insert(
                rkey(port),
                RevNatEntry {
                    flags: REV_SNAT,
                    stamp_s: 1000,
                    ..Default::default()
                },
            );
        }
        assert_eq!(
            explain(&s, &p, 1000 * NS_PER_S).unwrap().reason,
            Reason::PassSnatExhausted
        );
    }

    #[test]
    fn targets_report_ring_share_state_and_flows() {
        let mut s = snapshot();
        // A draining backend still used by one flow of slot 1.
        s.backends
            .push(be([10, 244, 1, 6], 8080, BE_LOCAL | BE_TERMINATING, 8));
        s.conntrack.insert(
            CtKey {
                sport: 1,
                ..Default::default()
            },
            CtEntry {
                backend_id: 3,
                service_id: 1,
                ..Default::default()
            },
        );
        s.conntrack.insert(
            CtKey {
                sport: 2,
                ..Default::default()
            },
            CtEntry {
                backend_id: 1,
                service_id: 1,
                ..Default::default()
            },
        );
        let t = targets(&s).unwrap();
        let labels: Vec<String> = t
            .iter()
            .map(|f| format!("{}/{}", f.label(), f.proto))
            .collect();
        assert_eq!(labels, ["203.0.113.7:80/TCP", "*:30080/TCP", "*:30053/UDP"]);
        let np = &t[1];
        let rows: Vec<(u32, TargetState, Option<&str>, u32, u64)> = np
            .targets
            .iter()
            .map(|x| (x.id, x.state, x.location, x.ring_slots, x.flows))
            .collect();
        assert_eq!(
            rows,
            [
                (1, TargetState::Healthy, Some("local"), 4, 1),
                (2, TargetState::Healthy, Some("remote"), 3, 0),
                (3, TargetState::Draining, Some("local"), 0, 1),
            ]
        );
        assert!((np.targets[0].share_pct - 400.0 / 7.0).abs() < 1e-9);
        assert!(t[2].targets.is_empty(), "no backends: the ring is not read");
    }

    #[test]
    fn flows_resolve_backends_and_snat_ports() {
        let mut s = snapshot();
        let key = CtKey {
            saddr: ip4([10, 0, 0, 9]),
            daddr: ip4(NODE),
            sport: port_be(40000),
            dport: port_be(30080),
            proto: PROTO_TCP,
            ..Default::default()
        };
        s.conntrack.insert(
            key,
            CtEntry {
                backend_id: 2,
                service_id: 1,
                snat_port: port_be(61002),
                flags: CT_SNAT,
                ..Default::default()
            },
        );
        s.conntrack.insert(
            CtKey {
                sport: port_be(40001),
                ..key
            },
            CtEntry {
                backend_id: 9,
                service_id: 1,
                ..Default::default()
            },
        );
        let rows = flows(&s).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].client, sa("10.0.0.9:40000"));
        assert_eq!(rows[0].frontend, sa("192.168.1.10:30080"));
        assert_eq!(rows[0].backend, Some(sa("10.244.2.9:8080")));
        assert_eq!(rows[0].snat_port, Some(61002));
        assert_eq!(rows[1].backend, None, "id 9 holds no backend");
        assert_eq!(rows[1].snat_port, None);
    }

    #[test]
    fn counters_sum_every_reason() {
        let mut s = snapshot();
        s.stats[Reason::FwdLocal as usize] = 5;
        s.stats[Reason::PassNonService as usize] = 7;
        let c = counters(&s).unwrap();
        assert_eq!(c.counters.len(), Reason::ALL.len());
        assert_eq!(c.total, 12);
        assert_eq!(
            c.counters[0],
            Counter {
                reason: Reason::FwdLocal,
                count: 5
            }
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["counters"][0]["reason"], "fwd_local");
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
