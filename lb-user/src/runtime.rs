//! The node runtime shared by `lb-user standalone` and `lb-user agent`: privileges, the pin
//! directory and its lock, loading the maps (taking over the ones an earlier run pinned),
//! CONFIG, applying desired states through the reconciler, attaching XDP to the node's NIC
//! and the TC reply program to every local pod's host-side veth, and a clean stop.
//!
//! Where the desired state comes from (a file, the API server) is the caller's business:
//! [`NodeRuntime::start`] takes the first one, [`NodeRuntime::set_desired`] replaces it
//! (a full apply), [`NodeRuntime::update`] changes some service ports (an apply scoped to
//! them, so an update costs the same at 1 and at 10 000 Services), and [`NodeRuntime::tick`]
//! retries what could not be done yet (unresolved backends, new veths, a failed apply) and
//! re-resolves every backend once per [`FULL_APPLY_EVERY`].
//! Dropping the runtime detaches everything and removes the pins unless `keep_pins`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, MapInfo};
use lb_common::{
    v4, AffinityEntry, AffinityKey, Backend, Config, CtEntry, CtKey, Frontend, FrontendKey,
    RevNatEntry, BE_ACTIVE, CFG_DEC_TTL, MAX_NODE_ADDRS,
};
use log::{debug, error, info, warn};

use crate::dataplane::{AttachMode, Dataplane, DataplaneError, DataplaneOptions, XdpModeChoice};
use crate::inspect::{default_pin_dir, ifname};
use crate::model::{BackendSpec, DesiredState, ServicePortId, ServicePortState};
use crate::netinfo::{self, NetinfoError};
use crate::reconcile::{
    ApplyReport, Capacity, Delivery, ReconcileConfig, ReconcileError, Reconciler, Resolver, Scope,
};

/// A SNAT port whose flow saw no reply for this long may be reused (seconds).
pub const SNAT_IDLE_S: u32 = 300;
/// How long a TCP flow that saw FIN or RST keeps translating (its closing handshake and
/// late retransmits) before its tuple counts as free: longer than a FIN/ACK exchange, much
/// shorter than the client's TIME_WAIT, after which it may reuse the port elsewhere.
pub const CLOSE_GRACE_S: u32 = 10;
/// How often the loop checks for a stop request while waiting.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Scoped applies resolve only the backends of the service ports that changed; this often a
/// full apply resolves every backend again (a pod's MAC, a remote node's next hop), like
/// kube-proxy's periodic full sync.
pub const FULL_APPLY_EVERY: Duration = Duration::from_secs(60);

/// Service ports that changed since the last apply: the new state, or None when gone.
pub type PortChanges = Vec<(ServicePortId, Option<ServicePortState>)>;

/// An inclusive port range, `MIN-MAX` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port range; write MIN-MAX, e.g. 61000-65535");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let min: u16 = a.trim().parse().map_err(|_| bad())?;
        let max: u16 = b.trim().parse().map_err(|_| bad())?;
        if min == 0 || min > max {
            return Err(format!(
                "port range {s:?} must satisfy 1 <= MIN <= MAX, e.g. 61000-65535"
            ));
        }
        Ok(PortRange { min, max })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// How the data plane runs on this node (the flags `standalone` and `agent` share).
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub iface: String,
    pub node_name: String,
    /// Empty: the IPv4 addresses of `iface`.
    pub node_addrs: Vec<Ipv4Addr>,
    /// None: the first node address.
    pub snat_addr: Option<Ipv4Addr>,
    /// The other nodes' SNAT addresses, whose forwarded requests to local pods (and the
    /// replies) bypass netfilter here. Empty: the other nodes' InternalIPs (their agents'
    /// default SNAT address), following the Node objects.
    pub peer_snat_addrs: Vec<Ipv4Addr>,
    pub xdp_mode: XdpModeChoice,
    /// None: [`default_pin_dir`] of `node_name`.
    pub pin_dir: Option<PathBuf>,
    pub max_services: u32,
    /// BACKENDS entries (id 0 is reserved).
    pub max_backends: u32,
    pub maglev_size: u32,
    pub snat_ports: PortRange,
    pub keep_pins: bool,
}

impl NodeOptions {
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| default_pin_dir(&self.node_name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "lb-user needs CAP_NET_ADMIN and CAP_BPF (or CAP_SYS_ADMIN): run it as root, e.g. with sudo"
    )]
    NotPrivileged,
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// netinfo's message names the interface already.
    #[error("{source}")]
    Interface {
        iface: String,
        #[source]
        source: Box<NetinfoError>,
    },
    #[error("interface {iface} has no IPv4 address; give the node's addresses with --node-addr")]
    NoNodeAddrs { iface: String },
    #[error(
        "{count} node addresses given, at most {max} are supported; pass the ones clients reach \
         NodePorts on"
    )]
    TooManyNodeAddrs { count: usize, max: usize },
    #[error("{source}; check --max-services and --maglev-size (a prime)")]
    Sizes {
        #[source]
        source: Box<ReconcileError>,
    },
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
    #[error("cannot create or lock the pin directory {dir:?}: {source}")]
    PinDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another lb-user already runs with pin directory {dir:?}; stop it first, or give this \
         one another --node-name or --pin-dir"
    )]
    Busy { dir: PathBuf },
    #[error(
        "the maps pinned in {dir:?} do not fit this run ({mismatches}); start with the options \
         the previous run used, or remove the directory (rm -r {dir:?}) to start fresh"
    )]
    PinsIncompatible { dir: PathBuf, mismatches: String },
    #[error("setting up the data plane ({step}): {source}")]
    Dataplane {
        step: &'static str,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error(
        "{source}; {iface} may lack native XDP support, retry with --xdp-mode generic (or auto)"
    )]
    NativeXdp {
        iface: String,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error("the first apply of {origin} failed: {source}")]
    FirstApply {
        origin: String,
        #[source]
        source: Box<ReconcileError>,
    },
}

// ---------------------------------------------------------------------------------------------
// Signals

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGTERM and SIGINT only set a flag: the loop notices it and shuts down cleanly.
pub fn install_signal_handlers() -> Result<(), RunError> {
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which
        // is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(RunError::Signal {
                signal: name,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleeps until `deadline`, returning early (true) when a stop was requested.
pub fn sleep_until(deadline: Instant) -> bool {
    loop {
        if stop_requested() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(STOP_POLL));
    }
}

// ---------------------------------------------------------------------------------------------
// Preconditions

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Whether an effective capability set can load and attach the programs.
fn caps_sufficient(cap_eff: u64) -> bool {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))
}

/// `CapEff` of /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

fn check_privileges() -> Result<(), RunError> {
    match effective_caps() {
        Some(caps) if !caps_sufficient(caps) => Err(RunError::NotPrivileged),
        // Unknown (no /proc): let the BPF syscalls speak for themselves.
        _ => Ok(()),
    }
}

/// The node addresses to match NodePorts on: the given ones, else the interface's.
fn node_addrs(
    given: &[Ipv4Addr],
    iface: &str,
    iface_addrs: impl FnOnce() -> Result<Vec<Ipv4Addr>, NetinfoError>,
) -> Result<Vec<Ipv4Addr>, RunError> {
    let mut addrs: Vec<Ipv4Addr> = Vec::new();
    if given.is_empty() {
        for a in iface_addrs().map_err(|source| RunError::Interface {
            iface: iface.to_string(),
            source: Box::new(source),
        })? {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            return Err(RunError::NoNodeAddrs {
                iface: iface.to_string(),
            });
        }
        if addrs.len() > MAX_NODE_ADDRS {
            warn!(
                "{iface} has {} IPv4 addresses; NodePorts match the first {MAX_NODE_ADDRS} ({}), pass --node-addr to choose",
                addrs.len(),
                join(&addrs[..MAX_NODE_ADDRS])
            );
            addrs.truncate(MAX_NODE_ADDRS);
        }
    } else {
        for a in given {
            if !addrs.contains(a) {
                addrs.push(*a);
            }
        }
        if addrs.len() > MAX_NODE_ADDRS {
            return Err(RunError::TooManyNodeAddrs {
                count: addrs.len(),
                max: MAX_NODE_ADDRS,
            });
        }
    }
    Ok(addrs)
}

fn join(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The PEERS keys: the configured peer SNAT addresses, else the other nodes' InternalIPs;
/// never one of this node's own addresses or its SNAT address.
fn peer_addrs(
    configured: &[Ipv4Addr],
    node_ips: &BTreeMap<String, Ipv4Addr>,
    node_addrs: &[Ipv4Addr],
    snat_addr: Ipv4Addr,
) -> Vec<Ipv4Addr> {
    let all: Vec<Ipv4Addr> = if configured.is_empty() {
        node_ips.values().copied().collect()
    } else {
        configured.to_vec()
    };
    all.into_iter()
        .filter(|a| *a != snat_addr && !node_addrs.contains(a))
        .collect()
}

/// The CONFIG value for this node.
fn node_config(node_addrs: &[Ipv4Addr], snat_addr: Ipv4Addr, snat_ports: PortRange) -> Config {
    let mut addrs = [0u32; MAX_NODE_ADDRS];
    for (slot, a) in addrs.iter_mut().zip(node_addrs) {
        *slot = v4(a.octets())[0];
    }
    Config {
        node_addrs: addrs,
        snat_addr: v4(snat_addr.octets())[0],
        // Dataplane::set_config fills in the ring size it was loaded with.
        maglev_size: 0,
        snat_port_min: snat_ports.min,
        snat_port_max: snat_ports.max,
        flags: CFG_DEC_TTL,
        snat_idle_s: SNAT_IDLE_S,
        close_grace_s: CLOSE_GRACE_S,
        // Dataplane::set_config moves its own epoch on.
        frontend_epoch: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Pins

/// Holds an exclusive flock on the pin directory: one agent per directory.
struct PinLock {
    _dir: std::fs::File,
}

fn lock_pin_dir(dir: &Path) -> Result<PinLock, RunError> {
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

/// (name, key size, value size, max entries or None when any is fine).
type MapShape = (&'static str, u32, u32, Option<u32>);
/// (key size, value size, max entries) of a pinned map.
type PinnedSizes = (u32, u32, u32);

/// (name, key size, value size, max entries) a map pinned for these options must have;
/// None when any size is fine (fixed-size maps whose entries the object decides).
fn expected_maps(opts: &DataplaneOptions) -> Vec<MapShape> {
    use std::mem::size_of;
    let s = |n: usize| n as u32;
    let ring = (opts.maglev_size as u64 * opts.max_services as u64).div_ceil(2) as u32;
    vec![
        ("CONFIG", 4, s(size_of::<Config>()), None),
        ("SERVICE_PORTS", 4, 8, None),
        (
            "FRONTENDS",
            s(size_of::<FrontendKey>()),
            s(size_of::<Frontend>()),
            Some(opts.max_frontends),
        ),
        (
            "BACKENDS",
            4,
            s(size_of::<Backend>()),
            Some(opts.max_backends),
        ),
        ("MAGLEV", 4, 8, Some(ring)),
        (
            "CONNTRACK",
            s(size_of::<CtKey>()),
            s(size_of::<CtEntry>()),
            Some(opts.ct_entries),
        ),
        (
            "REVNAT",
            s(size_of::<CtKey>()),
            s(size_of::<RevNatEntry>()),
            Some(opts.ct_entries),
        ),
        (
            "AFFINITY",
            s(size_of::<AffinityKey>()),
            s(size_of::<AffinityEntry>()),
            Some(opts.affinity_entries),
        ),
        ("STATS", 4, 8, None),
        (
            "LOCAL_ENDPOINTS",
            4,
            s(size_of::<lb_common::LocalEndpoint>()),
            None,
        ),
        ("PEERS", 4, s(size_of::<lb_common::PeerNode>()), None),
    ]
}

/// What differs between pinned maps (`actual`: name -> (key, value, max entries)) and what
/// this run needs. Missing maps are fine: they are created.
fn pin_mismatches(
    expected: &[MapShape],
    actual: &dyn Fn(&str) -> Option<PinnedSizes>,
) -> Vec<String> {
    let mut out = Vec::new();
    for &(name, key, value, max) in expected {
        let Some((k, v, m)) = actual(name) else {
            continue;
        };
        if (k, v) != (key, value) {
            out.push(format!(
                "{name} has {k}/{v}-byte keys/values, this lb-user uses {key}/{value}"
            ));
        }
        if let Some(max) = max.filter(|&max| max != m) {
            out.push(format!("{name} has {m} entries, this run needs {max}"));
        }
    }
    out
}

/// Checks maps pinned by an earlier run; true when there are any (a takeover).
fn check_existing_pins(dir: &Path, opts: &DataplaneOptions) -> Result<bool, RunError> {
    let info = |name: &str| {
        MapInfo::from_pin(dir.join(name))
            .ok()
            .map(|i| (i.key_size(), i.value_size(), i.max_entries()))
    };
    let present = crate::dataplane::MAP_NAMES
        .iter()
        .any(|n| dir.join(n).exists());
    if !present {
        return Ok(false);
    }
    let mismatches = pin_mismatches(&expected_maps(opts), &info);
    if !mismatches.is_empty() {
        return Err(RunError::PinsIncompatible {
            dir: dir.to_path_buf(),
            mismatches: mismatches.join("; "),
        });
    }
    Ok(true)
}

/// Removes the pins (and the directory) when dropped, after the data plane is gone.
struct PinCleanup {
    dir: PathBuf,
    keep: bool,
}

impl Drop for PinCleanup {
    fn drop(&mut self) {
        if self.keep {
            info!("keeping the pinned maps in {:?} (--keep-pins)", self.dir);
            return;
        }
        for name in crate::dataplane::MAP_NAMES {
            let path = self.dir.join(name);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("cannot remove pin {path:?}: {e}");
                }
            }
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => info!("removed the pinned maps in {:?}", self.dir),
            Err(e) => warn!("cannot remove {:?}: {e}", self.dir),
        }
    }
}

/// Old BACKENDS contents, by id, for checking conntrack entries after a takeover.
type BackendsById = BTreeMap<u32, Backend>;

/// Empties the control maps an earlier run left (the reconciler starts from all-zero maps).
/// Flows stay; [`prune_moved_flows`] later drops those whose backend id changed meaning.
fn clear_control_maps(dp: &mut Dataplane) -> Result<BackendsById, DataplaneError> {
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
    flows: &[(CtKey, CtEntry)],
    old: &BackendsById,
    now: &dyn Fn(u32) -> Option<Backend>,
) -> Vec<CtKey> {
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

fn prune_moved_flows(dp: &Dataplane, pin_dir: &Path, old: &BackendsById) -> Result<usize, String> {
    let flows = dp.conntrack().map_err(|e| e.to_string())?;
    let stale = moved_flows(&flows, old, &|id| dp.backend(id).ok());
    if stale.is_empty() {
        return Ok(0);
    }
    // Dataplane has no delete for single flows; the pinned map is the same map.
    let data = MapData::from_pin(pin_dir.join("CONNTRACK")).map_err(|e| e.to_string())?;
    let mut map: BpfHashMap<MapData, CtKey, CtEntry> =
        BpfHashMap::try_from(aya::maps::Map::from_map_data(data).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let mut n = 0;
    for key in &stale {
        if map.remove(key).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Resolving backends

/// Whether the EndpointSlice's idea of where a pod runs agrees with this node's routes;
/// Err(reason) when it does not (XDP would deliver the wrong way).
fn check_locality(spec: &BackendSpec, d: &netinfo::Delivery, node: &str) -> Result<(), String> {
    match (spec.local, d.local) {
        (true, false) => Err(format!(
            "the EndpointSlice puts {} on this node ({node}) but the route to it {}, so it is \
             not a local pod's veth; fix the pod's host route or the endpoint's nodeName",
            spec.addr,
            match d.gateway {
                Some(gw) => format!("goes via {gw}"),
                None => format!("is on a shared subnet of ifindex {}", d.ifindex),
            }
        )),
        (false, true) => Err(format!(
            "the EndpointSlice puts {} on node {} but this node ({node}) reaches it through a \
             host route on ifindex {}, like a local pod; fix the endpoint's nodeName or the route",
            spec.addr,
            spec.node_name.as_deref().unwrap_or("(none)"),
            d.ifindex
        )),
        _ => Ok(()),
    }
}

/// A backend's delivery, or why it has none.
type Resolved = Result<netinfo::Delivery, String>;

/// How long a successful resolution is reused by scoped applies. A lookup (`ip route get`,
/// the link, the neighbour) costs a few milliseconds of process spawns, which a one-Service
/// update must not pay for the same node address again and again; full applies (at start,
/// on resyncs, every [`FULL_APPLY_EVERY`]) always resolve afresh.
const RESOLVE_TTL: Duration = Duration::from_secs(10);

/// Resolutions by address, kept between applies: (when, result). Failures are reused only
/// within the apply that saw them.
#[derive(Default)]
struct ResolveCache {
    entries: BTreeMap<Ipv4Addr, (Instant, Resolved)>,
}

/// Resolves backends with the kernel's routes and neighbours (one lookup per address per
/// apply, or per [`RESOLVE_TTL`]) and remembers the veths of local pods for the TC reply
/// program.
struct NetResolver<'a> {
    node: &'a str,
    /// InternalIP of every other node by name: a remote endpoint is forwarded to the node its
    /// EndpointSlice names (direct node routing), without needing a route to its pod subnet.
    node_ips: &'a BTreeMap<String, Ipv4Addr>,
    cache: &'a RefCell<ResolveCache>,
    /// When this apply began: older failures are looked up again.
    started: Instant,
    local_ifindexes: RefCell<BTreeSet<u32>>,
}

impl<'a> NetResolver<'a> {
    fn new(
        node: &'a str,
        node_ips: &'a BTreeMap<String, Ipv4Addr>,
        cache: &'a RefCell<ResolveCache>,
    ) -> Self {
        NetResolver {
            node,
            node_ips,
            cache,
            started: Instant::now(),
            local_ifindexes: RefCell::new(BTreeSet::new()),
        }
    }

    fn lookup(&self, addr: Ipv4Addr) -> Resolved {
        let mut cache = self.cache.borrow_mut();
        if let Some((at, r)) = cache.entries.get(&addr) {
            let fresh = match r {
                Ok(_) => at.elapsed() < RESOLVE_TTL,
                Err(_) => *at >= self.started,
            };
            if fresh {
                return r.clone();
            }
        }
        let r = netinfo::resolve_backend(addr).map_err(|e| e.to_string());
        cache.entries.insert(addr, (Instant::now(), r.clone()));
        r
    }
}

impl Resolver for NetResolver<'_> {
    fn resolve(&self, spec: &BackendSpec) -> Result<Delivery, String> {
        if let Some(node_ip) = remote_node_ip(spec, self.node, self.node_ips) {
            let d = self.lookup(node_ip).map_err(|e| {
                format!(
                    "node {} ({node_ip}): {e}",
                    spec.node_name.as_deref().unwrap_or_default()
                )
            })?;
            if d.local {
                return Err(format!(
                    "node {} has InternalIP {node_ip}, which this node routes into a local veth; \
                     fix the Node's addresses",
                    spec.node_name.as_deref().unwrap_or_default()
                ));
            }
            return Ok(Delivery {
                ifindex: d.ifindex,
                dmac: d.dmac,
                smac: d.smac,
            });
        }
        let d = self.lookup(spec.addr)?;
        check_locality(spec, &d, self.node)?;
        if d.local {
            self.local_ifindexes.borrow_mut().insert(d.ifindex);
        }
        Ok(Delivery {
            ifindex: d.ifindex,
            dmac: d.dmac,
            smac: d.smac,
        })
    }
}

/// The InternalIP to forward a remote endpoint to, when its node is known.
fn remote_node_ip(
    spec: &BackendSpec,
    this_node: &str,
    node_ips: &BTreeMap<String, Ipv4Addr>,
) -> Option<Ipv4Addr> {
    if spec.local {
        return None;
    }
    let node = spec.node_name.as_deref()?;
    if node == this_node {
        return None;
    }
    node_ips.get(node).copied()
}

// ---------------------------------------------------------------------------------------------
// The run

/// One line for the log; identical lines mean nothing changed.
fn summary(r: &ApplyReport) -> String {
    format!(
        "applied: {} map writes (frontends +{} -{} ~{}, backends +{} -{} ~{}, ring slots {}), \
         service slots +{} -{}, unresolved {}, skipped for capacity {}, frontend conflicts {}",
        r.writes(),
        r.frontends_added,
        r.frontends_removed,
        r.frontends_updated,
        r.backends_added,
        r.backends_removed,
        r.backends_updated,
        r.ring_slots_written,
        r.services_added,
        r.services_removed,
        r.unresolved.len(),
        r.skipped_capacity.len(),
        r.frontend_conflicts.len()
    )
}

/// The problems of an apply, one line each (logged when they change).
fn problems(r: &ApplyReport) -> Vec<String> {
    let mut out = Vec::new();
    for u in &r.unresolved {
        out.push(format!(
            "{}: backend {}:{} unresolved: {}",
            u.service, u.addr, u.port, u.reason
        ));
    }
    for c in &r.skipped_capacity {
        let what = match c.backend {
            Some((a, p)) => format!("backend {a}:{p}"),
            None => "the whole service port".to_string(),
        };
        out.push(format!(
            "{}: {what} left out, out of {:?} (raise {})",
            c.service,
            c.resource,
            match c.resource {
                Capacity::ServiceSlots => "--max-services",
                Capacity::BackendIds => "--max-backends",
                Capacity::RingSize => "--maglev-size",
            }
        ));
    }
    for c in &r.frontend_conflicts {
        out.push(format!(
            "frontend {}:{}/{} wanted by {} and {}; {} keeps it",
            c.frontend.0,
            c.frontend.1,
            crate::model::proto_name(c.frontend.2),
            c.owner,
            c.loser,
            c.owner
        ));
    }
    out
}

/// Applies desired states, attaches TC to new local veths, logs what changed.
struct Driver {
    node_name: String,
    reconciler: Reconciler,
    desired: DesiredState,
    node_ips: BTreeMap<String, Ipv4Addr>,
    /// Local pod veths seen by the last apply, and the ones the TC program is attached to.
    local_ifindexes: BTreeSet<u32>,
    tc_attached: BTreeSet<u32>,
    last_problems: Vec<String>,
    /// The last apply left backends unresolved: apply their service ports again next tick.
    retry: bool,
    /// The last apply failed: the next one must look at everything.
    failed: bool,
    /// When the last full apply ran.
    last_full: Instant,
    /// Backend resolutions reused by scoped applies.
    resolved: RefCell<ResolveCache>,
}

impl Driver {
    /// A full apply: every service port, every backend resolved.
    fn apply(&mut self, dp: &mut Dataplane) -> Result<ApplyReport, ReconcileError> {
        self.apply_in(dp, None)
    }

    /// An apply of the `changed` service ports (plus those with problems), or a full one when
    /// `changed` is None or the last apply failed.
    fn apply_in(
        &mut self,
        dp: &mut Dataplane,
        changed: Option<&BTreeSet<ServicePortId>>,
    ) -> Result<ApplyReport, ReconcileError> {
        let scope = match changed {
            Some(c) if !self.failed => Scope::Changed(c),
            _ => Scope::All,
        };
        if matches!(scope, Scope::All) {
            self.resolved.borrow_mut().entries.clear();
        }
        let started = Instant::now();
        // The reply path before the request path: a new local pod's veth gets the TC reply
        // program before its backend enters a ring, or the replies of the first flows sent
        // to it would leave through the kernel without reverse NAT.
        let local = {
            let resolver = NetResolver::new(&self.node_name, &self.node_ips, &self.resolved);
            let ports = match scope {
                Scope::All => None,
                Scope::Changed(c) => Some(c),
            };
            let states = crate::reconcile::scoped(&self.desired, ports).map(|(_, st)| st);
            for b in states.flat_map(|st| st.backends.iter()).filter(|b| b.local) {
                // Failures are the apply's to report.
                let _ = resolver.resolve(b);
            }
            resolver.local_ifindexes.into_inner()
        };
        self.local_ifindexes.extend(local);
        self.attach_tc(dp);
        let resolver = NetResolver::new(&self.node_name, &self.node_ips, &self.resolved);
        let res = self
            .reconciler
            .apply_scoped(&self.desired, scope, &resolver, dp);
        let found = resolver.local_ifindexes.into_inner();
        match scope {
            Scope::All => {
                self.local_ifindexes = found;
                self.last_full = Instant::now();
            }
            // The others' veths are as the last apply found them.
            Scope::Changed(_) => self.local_ifindexes.extend(found),
        }
        self.failed = res.is_err();
        match &res {
            Ok(report) => {
                self.retry = !report.unresolved.is_empty();
                let problems = problems(report);
                let changed = problems != self.last_problems;
                let how = match scope {
                    Scope::All => "full".to_string(),
                    Scope::Changed(c) => format!("{} service ports", c.len()),
                };
                let took = started.elapsed().as_secs_f64() * 1e3;
                if report.writes() > 0 || changed {
                    info!("{} ({how}, {took:.1} ms)", summary(report));
                } else {
                    debug!("{} ({how}, {took:.1} ms)", summary(report));
                }
                if changed {
                    for p in &problems {
                        warn!("{p}");
                    }
                    self.last_problems = problems;
                }
            }
            Err(e) => {
                self.retry = true;
                error!("apply failed: {e}");
            }
        }
        res
    }

    /// Attaches the TC reply program to local veths that do not have it yet; failures are
    /// retried on the next tick.
    fn attach_tc(&mut self, dp: &mut Dataplane) {
        // Interfaces that disappeared took their attachment with them.
        self.tc_attached.retain(|i| ifname(*i).is_some());
        let mut gone = Vec::new();
        for &ifindex in &self.local_ifindexes {
            if self.tc_attached.contains(&ifindex) {
                continue;
            }
            let Some(name) = ifname(ifindex) else {
                // Its pod is gone; a pod that comes back gets a new veth, resolved when its
                // endpoint is applied.
                info!("local backend interface ifindex {ifindex} is gone");
                gone.push(ifindex);
                continue;
            };
            match dp.attach_tc_reply(&name) {
                Ok(()) => {
                    info!("attached the TC reply program to {name} (ifindex {ifindex})");
                    self.tc_attached.insert(ifindex);
                }
                Err(e) => warn!("{e}; retrying next period"),
            }
        }
        for ifindex in gone {
            self.local_ifindexes.remove(&ifindex);
        }
    }

    fn tc_pending(&self) -> bool {
        self.local_ifindexes
            .iter()
            .any(|i| !self.tc_attached.contains(i))
    }

    fn backends_in_use(&self) -> usize {
        let max_backends = self.reconciler.config().max_backends as usize;
        (max_backends - 1).saturating_sub(self.reconciler.free().1)
    }
}

/// The data plane of this node, running. Field order is drop order: the data plane (which
/// detaches the programs) goes before the pins are removed and the lock is released.
pub struct NodeRuntime {
    dp: Dataplane,
    driver: Driver,
    _cleanup: PinCleanup,
    _lock: PinLock,
    iface: String,
    mode: AttachMode,
    node_addrs: Vec<Ipv4Addr>,
    snat_addr: Ipv4Addr,
    snat_ports: PortRange,
    pin_dir: PathBuf,
    /// `NodeOptions::peer_snat_addrs`.
    peer_snat_addrs: Vec<Ipv4Addr>,
}

impl NodeRuntime {
    /// Brings the data plane up with `desired` applied before XDP is attached, so the first
    /// packet already sees the full state. `origin` names where `desired` came from (for
    /// errors). `node_ips` maps other nodes' names to their InternalIP (may be empty).
    pub fn start(
        opts: &NodeOptions,
        desired: DesiredState,
        node_ips: BTreeMap<String, Ipv4Addr>,
        origin: &str,
    ) -> Result<NodeRuntime, RunError> {
        check_privileges()?;
        let iface_err = |source| RunError::Interface {
            iface: opts.iface.clone(),
            source: Box::new(source),
        };
        netinfo::ifindex(&opts.iface).map_err(iface_err)?;
        let node_addrs = node_addrs(&opts.node_addrs, &opts.iface, || {
            netinfo::ipv4_addrs(&opts.iface)
        })?;
        let snat_addr = opts.snat_addr.unwrap_or(node_addrs[0]);

        let dp_opts = DataplaneOptions {
            max_services: opts.max_services,
            max_backends: opts.max_backends,
            maglev_size: opts.maglev_size,
            pin_dir: Some(opts.pin_dir()),
            ..DataplaneOptions::default()
        };
        let reconciler = Reconciler::new(ReconcileConfig {
            max_services: dp_opts.max_services,
            max_backends: dp_opts.max_backends,
            maglev_size: dp_opts.maglev_size,
        })
        .map_err(|source| RunError::Sizes {
            source: Box::new(source),
        })?;

        let pin_dir = opts.pin_dir();
        crate::bpffs::ensure(&pin_dir)?;
        let lock = lock_pin_dir(&pin_dir)?;
        let takeover = check_existing_pins(&pin_dir, &dp_opts)?;
        let dp_err = |step| {
            move |source| RunError::Dataplane {
                step,
                source: Box::new(source),
            }
        };
        let mut dp = Dataplane::load(dp_opts).map_err(dp_err("loading"))?;
        let cleanup = PinCleanup {
            dir: pin_dir.clone(),
            keep: opts.keep_pins,
        };
        dp.set_config(&node_config(&node_addrs, snat_addr, opts.snat_ports))
            .map_err(dp_err("writing CONFIG"))?;
        dp.set_peers(&peer_addrs(
            &opts.peer_snat_addrs,
            &node_ips,
            &node_addrs,
            snat_addr,
        ))
        .map_err(dp_err("writing PEERS"))?;
        let old_backends = if takeover {
            info!(
                "taking over the maps pinned in {pin_dir:?}: connection state kept, services rewritten"
            );
            Some(
                clear_control_maps(&mut dp)
                    .map_err(dp_err("clearing the maps of the previous run"))?,
            )
        } else {
            None
        };

        let mut driver = Driver {
            node_name: opts.node_name.clone(),
            reconciler,
            desired,
            node_ips,
            local_ifindexes: BTreeSet::new(),
            tc_attached: BTreeSet::new(),
            last_problems: Vec::new(),
            retry: false,
            failed: false,
            last_full: Instant::now(),
            resolved: RefCell::new(ResolveCache::default()),
        };
        driver
            .apply(&mut dp)
            .map_err(|source| RunError::FirstApply {
                origin: origin.to_string(),
                source: Box::new(source),
            })?;
        if let Some(old) = &old_backends {
            match prune_moved_flows(&dp, &pin_dir, old) {
                Ok(0) => {}
                Ok(n) => {
                    info!("dropped {n} tracked flows whose backend changed while no agent ran")
                }
                Err(e) => warn!("cannot check the flows of the previous run: {e}"),
            }
        }

        let mode = match dp.attach_xdp(&opts.iface, opts.xdp_mode) {
            Ok(mode) => mode,
            Err(source) if opts.xdp_mode == XdpModeChoice::Native => {
                return Err(RunError::NativeXdp {
                    iface: opts.iface.clone(),
                    source: Box::new(source),
                })
            }
            Err(source) => return Err(dp_err("attaching XDP")(source)),
        };
        driver.attach_tc(&mut dp);
        Ok(NodeRuntime {
            dp,
            driver,
            _cleanup: cleanup,
            _lock: lock,
            iface: opts.iface.clone(),
            mode,
            node_addrs,
            snat_addr,
            snat_ports: opts.snat_ports,
            pin_dir,
            peer_snat_addrs: opts.peer_snat_addrs.clone(),
        })
    }

    /// The `lbx: ready ...` line tests and the lab wait for, and the log line after it.
    pub fn announce_ready(&self) {
        let frontends = self.dp.frontends().map(|f| f.len()).unwrap_or(0);
        let ready = format!(
            "lbx: ready node={} iface={} mode={} frontends={frontends} backends={}",
            self.driver.node_name,
            self.iface,
            match self.mode {
                AttachMode::Native => "native",
                AttachMode::Generic => "generic",
            },
            self.driver.backends_in_use()
        );
        info!(
            "node addresses {}, SNAT {} ports {}, pins in {:?}",
            join(&self.node_addrs),
            self.snat_addr,
            self.snat_ports,
            self.pin_dir
        );
        // A closed stdout must not stop the data plane.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{ready}");
        let _ = out.flush();
    }

    /// Applies a new desired state (and the node addresses remote endpoints go to). Errors
    /// are logged and retried by [`NodeRuntime::tick`]; the last good map contents stay.
    pub fn set_desired(
        &mut self,
        desired: DesiredState,
        node_ips: BTreeMap<String, Ipv4Addr>,
    ) -> Result<ApplyReport, ReconcileError> {
        self.driver.desired = desired;
        self.driver.node_ips = node_ips;
        self.sync_peers();
        let res = self.driver.apply(&mut self.dp);
        self.driver.attach_tc(&mut self.dp);
        res
    }

    /// PEERS after the node addresses changed (only they move it, when no peers are
    /// configured). A failed write is logged: those peers' flows keep crossing netfilter.
    fn sync_peers(&mut self) {
        let peers = peer_addrs(
            &self.peer_snat_addrs,
            &self.driver.node_ips,
            &self.node_addrs,
            self.snat_addr,
        );
        if let Err(e) = self.dp.set_peers(&peers) {
            warn!("cannot write the peer nodes' SNAT addresses: {e}");
        }
    }

    /// Changes some service ports (None: the port is gone) and applies only those, unless
    /// the node addresses changed too (then every remote backend may go elsewhere: a full
    /// apply). Errors are logged and retried by [`NodeRuntime::tick`] with a full apply.
    pub fn update(
        &mut self,
        changes: PortChanges,
        node_ips: BTreeMap<String, Ipv4Addr>,
    ) -> Result<ApplyReport, ReconcileError> {
        let mut changed = BTreeSet::new();
        for (id, state) in changes {
            if self.driver.desired.services.get(&id) == state.as_ref() {
                continue; // retranslated to what it was
            }
            match state {
                Some(state) => self.driver.desired.services.insert(id.clone(), state),
                None => self.driver.desired.services.remove(&id),
            };
            changed.insert(id);
        }
        let full = node_ips != self.driver.node_ips;
        if changed.is_empty() && !full {
            return Ok(ApplyReport::default());
        }
        self.driver.node_ips = node_ips;
        if full {
            self.sync_peers();
        }
        let res = self
            .driver
            .apply_in(&mut self.dp, (!full).then_some(&changed));
        self.driver.attach_tc(&mut self.dp);
        res
    }

    /// Periodic work: re-applies after a failure (in full) or while backends are unresolved
    /// (their service ports: a pod's route or neighbour may appear later), a full apply every
    /// [`FULL_APPLY_EVERY`], and attaches TC to veths that missed it.
    pub fn tick(&mut self) {
        let full = self.driver.failed || self.driver.last_full.elapsed() >= FULL_APPLY_EVERY;
        let reapply = full || self.driver.retry;
        if full {
            // Errors are logged and retried next tick.
            let _ = self.driver.apply(&mut self.dp);
        } else if reapply {
            // Empty scope: the service ports with problems.
            let _ = self.driver.apply_in(&mut self.dp, Some(&BTreeSet::new()));
        }
        if reapply || self.driver.tc_pending() {
            self.driver.attach_tc(&mut self.dp);
        }
    }

    /// The desired state applied last.
    pub fn desired(&self) -> &DesiredState {
        &self.driver.desired
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn node_addrs(&self) -> &[Ipv4Addr] {
        &self.node_addrs
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        info!("stopping: detaching from {} and the pod veths", self.iface);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_the_configured_snat_addresses_else_the_other_nodes() {
        let ip = |d| Ipv4Addr::new(10, 77, 0, d);
        let nodes: BTreeMap<String, Ipv4Addr> =
            [("n1".to_string(), ip(11)), ("n2".to_string(), ip(12))].into();
        let (own, snat) = ([ip(10)], ip(150));
        assert_eq!(peer_addrs(&[], &nodes, &own, snat), vec![ip(11), ip(12)]);
        assert_eq!(
            peer_addrs(&[ip(151), ip(150), ip(152)], &nodes, &own, snat),
            vec![ip(151), ip(152)],
            "configured peers win, our own SNAT address is never a peer"
        );
        assert!(peer_addrs(&[], &BTreeMap::new(), &own, snat).is_empty());
    }

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(
            "61000-65535".parse(),
            Ok(PortRange {
                min: 61000,
                max: 65535
            })
        );
        assert_eq!("7 - 7".parse(), Ok(PortRange { min: 7, max: 7 }));
        for bad in [
            "",
            "61000",
            "65535-61000",
            "0-10",
            "1-65536",
            "a-b",
            "1-2-3",
        ] {
            let err = bad.parse::<PortRange>().unwrap_err();
            assert!(err.contains("MIN"), "{bad}: {err}");
        }
        assert_eq!(PortRange { min: 1, max: 2 }.to_string(), "1-2");
    }

    #[test]
    fn capabilities_need_net_admin_and_bpf_or_sys_admin() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let root = parse_cap_eff(status).unwrap();
        assert!(caps_sufficient(root));
        assert!(!caps_sufficient(0));
        assert!(
            !caps_sufficient(1 << CAP_BPF),
            "CAP_BPF alone cannot attach"
        );
        assert!(caps_sufficient(1 << CAP_BPF | 1 << CAP_NET_ADMIN));
        assert!(caps_sufficient(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN));
        assert_eq!(parse_cap_eff("CapInh:\t0\n"), None);
    }

    #[test]
    fn node_addrs_from_flags_or_interface() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let never = || -> Result<Vec<Ipv4Addr>, NetinfoError> { panic!("not asked") };
        assert_eq!(
            node_addrs(
                &[a("10.0.0.1"), a("10.0.0.1"), a("10.0.0.2")],
                "eth0",
                never
            )
            .unwrap(),
            [a("10.0.0.1"), a("10.0.0.2")]
        );
        let five: Vec<_> = (1..=5).map(|i| a(&format!("10.0.0.{i}"))).collect();
        assert!(matches!(
            node_addrs(&five, "eth0", never),
            Err(RunError::TooManyNodeAddrs { count: 5, max: 4 })
        ));
        let from_iface = five.clone();
        assert_eq!(
            node_addrs(&[], "eth0", || Ok(from_iface)).unwrap(),
            five[..4]
        );
        let err = node_addrs(&[], "eth0", || Ok(vec![])).unwrap_err();
        assert!(err.to_string().contains("--node-addr"), "{err}");
    }

    #[test]
    fn config_holds_addresses_in_wire_order() {
        let cfg = node_config(
            &["192.168.1.10".parse().unwrap(), "10.0.0.1".parse().unwrap()],
            "192.168.1.10".parse().unwrap(),
            PortRange {
                min: 61000,
                max: 65535,
            },
        );
        assert_eq!(cfg.node_addrs[0].to_ne_bytes(), [192, 168, 1, 10]);
        assert_eq!(cfg.node_addrs[1].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(cfg.node_addrs[2], 0);
        assert_eq!(cfg.snat_addr.to_ne_bytes(), [192, 168, 1, 10]);
        assert_eq!((cfg.snat_port_min, cfg.snat_port_max), (61000, 65535));
        assert_eq!(cfg.flags & CFG_DEC_TTL, CFG_DEC_TTL);
        assert_eq!(cfg.snat_idle_s, 300);
        assert_eq!(cfg.close_grace_s, CLOSE_GRACE_S);
    }

    #[test]
    fn pins_of_other_sizes_are_refused() {
        let opts = DataplaneOptions::default();
        let expected = expected_maps(&opts);
        let same = |name: &str| {
            expected
                .iter()
                .find(|e| e.0 == name)
                .map(|&(_, k, v, m)| (k, v, m.unwrap_or(1)))
        };
        assert!(pin_mismatches(&expected, &same).is_empty());
        assert!(
            pin_mismatches(&expected, &|_| None).is_empty(),
            "absent maps are created"
        );
        let smaller_ring = |name: &str| match name {
            "MAGLEV" => Some((4, 8, 123)),
            "BACKENDS" => Some((4, 40, opts.max_backends)),
            other => same(other),
        };
        let m = pin_mismatches(&expected, &smaller_ring);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m.iter().any(|s| s.starts_with("MAGLEV has 123 entries")),
            "{m:?}"
        );
        assert!(
            m.iter().any(|s| s.starts_with("BACKENDS has 4/40-byte")),
            "{m:?}"
        );
    }

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
                CtKey {
                    sport,
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
            .map(|k| k.sport)
            .collect();
        assert_eq!(stale, [2, 3, 4]);
    }

    fn spec(local: bool) -> BackendSpec {
        BackendSpec {
            addr: "10.244.1.5".parse().unwrap(),
            port: 8080,
            node_name: Some(if local { "n1" } else { "n2" }.into()),
            local,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    fn delivery(local: bool, gateway: Option<Ipv4Addr>) -> netinfo::Delivery {
        netinfo::Delivery {
            ifindex: 7,
            dmac: [2, 0, 0, 0, 0, 1],
            smac: [2, 0, 0, 0, 0, 2],
            local,
            gateway,
        }
    }

    #[test]
    fn locality_must_agree_with_routes() {
        assert!(check_locality(&spec(true), &delivery(true, None), "n1").is_ok());
        assert!(check_locality(
            &spec(false),
            &delivery(false, Some("10.1.1.7".parse().unwrap())),
            "n1"
        )
        .is_ok());
        let e = check_locality(
            &spec(true),
            &delivery(false, Some("10.1.1.7".parse().unwrap())),
            "n1",
        )
        .unwrap_err();
        assert!(e.contains("via 10.1.1.7") && e.contains("nodeName"), "{e}");
        let e = check_locality(&spec(false), &delivery(true, None), "n1").unwrap_err();
        assert!(e.contains("node n2") && e.contains("ifindex 7"), "{e}");
    }

    #[test]
    fn summary_and_problems_name_what_happened() {
        use crate::model::ServicePortId;
        use crate::reconcile::Unresolved;
        let mut r = ApplyReport {
            frontends_added: 2,
            backends_added: 3,
            ring_slots_written: 14,
            services_added: 1,
            ..Default::default()
        };
        assert!(summary(&r).starts_with("applied: 19 map writes (frontends +2 -0 ~0, backends +3"));
        assert!(problems(&r).is_empty());
        r.unresolved.push(Unresolved {
            service: ServicePortId::new("ns", "web", "", lb_common::PROTO_TCP),
            addr: "10.244.1.5".parse().unwrap(),
            port: 8080,
            reason: "no route".into(),
        });
        assert_eq!(
            problems(&r),
            ["ns/web/TCP: backend 10.244.1.5:8080 unresolved: no route"]
        );
        assert!(summary(&r).contains("unresolved 1"));
        // A capacity problem names the flag that raises that capacity.
        r.skipped_capacity.push(crate::reconcile::CapacitySkip {
            service: r.unresolved[0].service.clone(),
            backend: Some(("10.244.1.6".parse().unwrap(), 8080)),
            resource: Capacity::BackendIds,
        });
        let p = problems(&r);
        assert!(
            p[1].contains("backend 10.244.1.6:8080 left out")
                && p[1].ends_with("(raise --max-backends)"),
            "{p:?}"
        );
    }

    #[test]
    fn stop_flag_cuts_sleep_short() {
        let start = Instant::now();
        assert!(!sleep_until(start + Duration::from_millis(20)));
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Only this test touches the flag.
        STOP.store(true, Ordering::SeqCst);
        let start = Instant::now();
        assert!(sleep_until(start + Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(1));
        STOP.store(false, Ordering::SeqCst);
    }
}
