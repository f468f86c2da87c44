//! The loaded data plane: the BPF object, its maps, and its attachments.
//!
//! `Dataplane` is the only code that touches the maps; everything above it (reconcile, the
//! CLI, tests) goes through its typed methods.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, Map, MapError, PerCpuArray},
    programs::{
        tc::{self, TcAttachType},
        ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    port_host, service_port_word, stats::NUM_REASONS, AffinityEntry, AffinityKey, Backend, Config,
    CtEntry, CtKey, Frontend, FrontendKey, LocalEndpoint, PeerNode, Reason, RevNatEntry, BE_ACTIVE,
    BE_LOCAL, CFG_PEERS, DEFAULT_MAGLEV_SIZE,
};
use log::warn;

use crate::object::EBPF_OBJECT;

/// Sizes of the maps, chosen at load time.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
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
    /// Pin (or reuse already pinned) maps under this bpffs directory, so a restarted agent
    /// keeps the connection state and the operator CLI can read the maps. None: unpinned.
    pub pin_dir: Option<std::path::PathBuf>,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            max_services: 1024,
            maglev_size: DEFAULT_MAGLEV_SIZE,
            max_backends: 65536,
            max_frontends: 65536,
            ct_entries: 262_144,
            affinity_entries: 65536,
            pin_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the BPF object failed (are you root with CAP_BPF, and is the kernel >= 6.1?)"
    )]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("program {name} not found in the BPF object (rebuild with `cargo xtask build-ebpf`)")]
    MissingProgram { name: &'static str },
    #[error("map {name} not found in the BPF object (rebuild with `cargo xtask build-ebpf`)")]
    MissingMap { name: &'static str },
    #[error("map {name}: {op} failed")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {op} failed")]
    Program {
        name: &'static str,
        op: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach XDP to {iface}: native mode failed ({native}) and generic mode failed ({generic}); check that the interface exists and no other XDP program is attached")]
    XdpAttach {
        iface: String,
        native: String,
        generic: String,
    },
    #[error("cannot attach XDP to {iface} in {mode:?} mode: {source}")]
    XdpAttachMode {
        iface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach the TC reply program to {iface}: {source}")]
    TcAttach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot create the pin directory {dir:?} (is bpffs mounted at /sys/fs/bpf?)")]
    PinDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
    #[error(transparent)]
    KernelFeatures(#[from] crate::kernel_features::KernelFeaturesError),
    #[error("mmap of the MAGLEV map failed: {source}")]
    Mmap {
        #[source]
        source: std::io::Error,
    },
    #[error("ring of service slot {service_id} out of range (max_services {max_services})")]
    RingOutOfRange { service_id: u32, max_services: u32 },
    #[error("ring length {len} differs from maglev_size {maglev_size}")]
    RingSize { len: usize, maglev_size: u32 },
    #[error("maglev_size {maglev_size} x max_services {max_services} overflows the map size")]
    TooLarge { maglev_size: u32, max_services: u32 },
}

/// How the XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    Native,
    /// Generic (skb) XDP: works everywhere, slower; reported as a warning and a metric.
    Generic,
}

/// Which XDP mode to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

/// The MAGLEV map, written through mmap (the map is BPF_F_MMAPABLE). Only the pages of the
/// ring being read or written are mapped, and only while that happens: the whole map (up to
/// 64 MiB at 10 000 Services) would otherwise count in the agent's resident memory although
/// it is the kernel's.
struct Rings {
    /// The MAGLEV map's fd (owned by the loaded `Ebpf`, which outlives this).
    fd: std::os::fd::RawFd,
    /// u32 ring slots the map holds.
    entries: usize,
}

/// Ring slots `[start, start + len)` of the MAGLEV map, mapped until dropped.
struct RingWindow {
    base: NonNull<u8>,
    len_bytes: usize,
    /// The first slot's place in the mapping.
    first: *mut u32,
    len: usize,
}

impl RingWindow {
    fn map(rings: &Rings, start: usize, len: usize) -> Result<Self, DataplaneError> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let begin = start * 4 / page * page;
        let end = ((start + len) * 4).div_ceil(page) * page;
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                end - begin,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                rings.fd,
                begin as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap returned NULL without MAP_FAILED");
        Ok(RingWindow {
            base,
            len_bytes: end - begin,
            first: unsafe { base.as_ptr().add(start * 4 - begin).cast() },
            len,
        })
    }

    fn slots(&mut self) -> &mut [u32] {
        // The window covers exactly these slots, 4-byte aligned (page + multiple of 4).
        unsafe { std::slice::from_raw_parts_mut(self.first, self.len) }
    }
}

impl Drop for RingWindow {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len_bytes) };
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    opts: DataplaneOptions,
    rings: Rings,
    /// Times the XDP attach fell back to generic mode (exported as a metric).
    pub generic_fallbacks: u64,
    /// Frontends in FRONTENDS, per (protocol, port): drives the SERVICE_PORTS bitmap.
    port_refs: std::collections::HashMap<(u8, u16), u32>,
    /// Frontends in FRONTENDS and their service slots.
    frontend_keys: std::collections::HashMap<FrontendKey, u32>,
    /// `Config::frontend_epoch` as last written (see [`Dataplane::bump_frontend_epoch`]).
    frontend_epoch: u32,
    /// LOCAL_ENDPOINTS as written, with the local backend ids of each pod: the same pod
    /// behind many Service ports is one entry, deleted with its last id.
    local_endpoints: std::collections::HashMap<u32, (LocalEndpoint, BTreeSet<u32>)>,
    /// The pod address of every local backend id (to find its entry again on clear).
    local_ids: std::collections::HashMap<u32, u32>,
    /// Local pods in `local_endpoints` that found LOCAL_ENDPOINTS full: their peer requests
    /// take the kernel path; each freed slot goes to one of them.
    local_overflow: BTreeSet<u32>,
    /// The keys of PEERS (peer nodes' SNAT addresses, wire order).
    peers: BTreeSet<u32>,
}

const PROG_XDP: &str = "lb_ingress";
/// Every map of lb-ebpf/src/maps.rs.
pub const MAP_NAMES: &[&str] = &[
    "CONFIG",
    "SERVICE_PORTS",
    "FRONTENDS",
    "BACKENDS",
    "MAGLEV",
    "CONNTRACK",
    "REVNAT",
    "AFFINITY",
    "STATS",
    "LOCAL_ENDPOINTS",
    "PEERS",
];
const PROG_PASS: &str = "lb_pass";
/// Benchmark references in the object (`lb-ebpf/src/reference.rs`): loaded only by
/// [`Dataplane::bench_reference`], never attached.
pub const REFERENCE_PROGRAMS: [&str; 2] = ["lb_ref_ct_lookup", "lb_ref_ct_insert"];
const PROG_TC: &str = "lb_reply";

impl Dataplane {
    /// Loads the embedded object with maps sized by `opts`. Nothing is attached yet.
    pub fn load(opts: DataplaneOptions) -> Result<Self, DataplaneError> {
        crate::kernel_features::require()?;
        let ring_entries =
            opts.maglev_size
                .checked_mul(opts.max_services)
                .ok_or(DataplaneError::TooLarge {
                    maglev_size: opts.maglev_size,
                    max_services: opts.max_services,
                })?;
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, std::path::PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                crate::bpffs::ensure(dir)?;
                std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
                    dir: dir.clone(),
                    source,
                })?;
                MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect()
            }
            None => Vec::new(),
        };
        let reused_pins = pin_paths.iter().any(|(_, p)| p.exists());
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            // Two ring slots per element (see lb-ebpf/src/maps.rs).
            .map_max_entries("MAGLEV", ring_entries.div_ceil(2))
            .map_max_entries("BACKENDS", opts.max_backends)
            .map_max_entries("FRONTENDS", opts.max_frontends)
            .map_max_entries("CONNTRACK", opts.ct_entries)
            .map_max_entries("REVNAT", opts.ct_entries)
            .map_max_entries("AFFINITY", opts.affinity_entries)
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load { source })?;

        for name in [PROG_XDP, PROG_PASS] {
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load().map_err(|source| DataplaneError::Program {
                name,
                op: "load",
                source,
            })?;
        }
        {
            let prog: &mut SchedClassifier = program(&mut ebpf, PROG_TC)?;
            prog.load().map_err(|source| DataplaneError::Program {
                name: PROG_TC,
                op: "load",
                source,
            })?;
        }

        let rings = {
            let map = ebpf
                .map("MAGLEV")
                .ok_or(DataplaneError::MissingMap { name: "MAGLEV" })?;
            let Map::Array(data) = map else {
                return Err(DataplaneError::MissingMap { name: "MAGLEV" });
            };
            let rings = Rings {
                fd: data.fd().as_fd().as_raw_fd(),
                entries: ring_entries.div_ceil(2) as usize * 2,
            };
            // Fail at load, not at the first write, if the map cannot be mapped.
            drop(RingWindow::map(&rings, 0, 1)?);
            rings
        };

        let mut dp = Self {
            ebpf,
            opts,
            rings,
            generic_fallbacks: 0,
            port_refs: Default::default(),
            frontend_keys: Default::default(),
            frontend_epoch: 0,
            local_endpoints: Default::default(),
            local_overflow: BTreeSet::new(),
            local_ids: Default::default(),
            peers: BTreeSet::new(),
        };
        // Pinned maps may already hold frontends (agent restart): rebuild the port bitmap.
        for (key, fe) in dp.frontends()? {
            dp.frontend_keys.insert(key, fe.service_id);
            *dp.port_refs
                .entry((key.proto, port_host(key.port)))
                .or_default() += 1;
        }
        let ports: Vec<_> = dp.port_refs.keys().copied().collect();
        for (proto, port) in ports {
            dp.set_port_bit(proto, port, true)?;
        }
        // Pinned maps (agent restart): LOCAL_ENDPOINTS and PEERS are derived state, rebuilt
        // from BACKENDS here and from the agent's peers when it sets them.
        dp.hash_clear::<u32, LocalEndpoint>("LOCAL_ENDPOINTS")?;
        if reused_pins {
            for id in 1..dp.opts.max_backends {
                let be = dp.backend(id)?;
                if be.flags & BE_ACTIVE != 0 {
                    dp.track_local(id, &be)?;
                }
            }
        }
        dp.peers = dp
            .hash_entries::<u32, PeerNode>("PEERS")?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        // Continue a pinned config's epoch: going back to an older value could make entries
        // checked before a frontend change look current again.
        dp.frontend_epoch = dp.config()?.frontend_epoch;
        dp.set_config(&Config {
            maglev_size: dp.opts.maglev_size,
            ..Default::default()
        })?;
        Ok(dp)
    }

    pub fn options(&self) -> &DataplaneOptions {
        &self.opts
    }

    /// Writes the node config. Its `frontend_epoch` is ignored: the data plane's own moves on
    /// (node addresses decide which frontend a packet matches).
    pub fn set_config(&mut self, cfg: &Config) -> Result<(), DataplaneError> {
        let mut cfg = *cfg;
        // The ring layout is fixed at load time; the program must agree with it.
        cfg.maglev_size = self.opts.maglev_size;
        // Whether the programs consult PEERS follows the map, not the caller.
        if self.peers.is_empty() {
            cfg.flags &= !CFG_PEERS;
        } else {
            cfg.flags |= CFG_PEERS;
        }
        self.frontend_epoch = self.frontend_epoch.wrapping_add(1);
        cfg.frontend_epoch = self.frontend_epoch;
        let mut map: Array<_, Config> = self.typed("CONFIG")?;
        map.set(0, cfg, 0).map_err(map_err("CONFIG", "set"))
    }

    /// Moves `Config::frontend_epoch` on after a change that may alter which frontend (and
    /// service slot) some 5-tuple resolves to: the program then checks each established
    /// flow's frontend once more before trusting its ct entry alone (lb-ebpf `ct_lookup`).
    /// Called after the FRONTENDS write, so a packet that sees the new epoch sees the new
    /// frontends.
    fn bump_frontend_epoch(&mut self) -> Result<(), DataplaneError> {
        let cfg = self.config()?;
        self.set_config(&cfg)
    }

    pub fn config(&self) -> Result<Config, DataplaneError> {
        let map: Array<_, Config> = self.typed_ref("CONFIG")?;
        map.get(&0, 0).map_err(map_err("CONFIG", "get"))
    }

    /// Adds or updates a frontend. The port's SERVICE_PORTS bit is set first, so the
    /// program never skips a frontend that exists.
    pub fn set_frontend(&mut self, key: &FrontendKey, fe: &Frontend) -> Result<(), DataplaneError> {
        let old_slot = self.frontend_keys.get(key).copied();
        let new = old_slot.is_none();
        let port = (key.proto, port_host(key.port));
        if new && self.port_refs.get(&port).copied().unwrap_or(0) == 0 {
            self.set_port_bit(port.0, port.1, true)?;
        }
        let mut map: HashMap<_, FrontendKey, Frontend> = self.typed("FRONTENDS")?;
        map.insert(key, fe, 0)
            .map_err(map_err("FRONTENDS", "insert"))?;
        self.frontend_keys.insert(*key, fe.service_id);
        if new {
            *self.port_refs.entry(port).or_default() += 1;
        }
        // A new key can shadow another for some tuples (a NodePort wildcard goes before an
        // exact frontend on a node address); a new slot is another service. Only a change of
        // backend count, flags or affinity timeout leaves established flows as they are.
        if old_slot != Some(fe.service_id) {
            self.bump_frontend_epoch()?;
        }
        Ok(())
    }

    /// Removes a frontend; the port's bit is cleared after the last frontend on it is gone.
    pub fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), DataplaneError> {
        let mut map: HashMap<_, FrontendKey, Frontend> = self.typed("FRONTENDS")?;
        match map.remove(key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err("FRONTENDS", "remove")(e)),
        }
        self.bump_frontend_epoch()?;
        if self.frontend_keys.remove(key).is_some() {
            let port = (key.proto, port_host(key.port));
            let refs = self.port_refs.entry(port).or_default();
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.port_refs.remove(&port);
                self.set_port_bit(port.0, port.1, false)?;
            }
        }
        Ok(())
    }

    fn set_port_bit(&mut self, proto: u8, port: u16, on: bool) -> Result<(), DataplaneError> {
        let Some(word) = service_port_word(proto, port) else {
            return Ok(());
        };
        let mut map: Array<_, u64> = self.typed("SERVICE_PORTS")?;
        let old = map.get(&word, 0).map_err(map_err("SERVICE_PORTS", "get"))?;
        let bit = 1u64 << (port % 64);
        let new = if on { old | bit } else { old & !bit };
        map.set(word, new, 0)
            .map_err(map_err("SERVICE_PORTS", "set"))
    }

    pub fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, DataplaneError> {
        self.hash_entries("FRONTENDS")
    }

    /// Writes a backend id; a local backend also makes its pod a LOCAL_ENDPOINTS entry
    /// (written after BACKENDS, removed with the pod's last local id).
    pub fn set_backend(&mut self, id: u32, be: &Backend) -> Result<(), DataplaneError> {
        let mut map: Array<_, Backend> = self.typed("BACKENDS")?;
        map.set(id, be, 0).map_err(map_err("BACKENDS", "set"))?;
        self.track_local(id, be)
    }

    /// Keeps LOCAL_ENDPOINTS in step with the local backends in BACKENDS.
    fn track_local(&mut self, id: u32, be: &Backend) -> Result<(), DataplaneError> {
        let is_local = be.flags & BE_ACTIVE != 0 && be.flags & BE_LOCAL != 0;
        let addr = be.addr[0];
        if let Some(old) = self.local_ids.get(&id).copied() {
            if !is_local || old != addr {
                self.local_ids.remove(&id);
                let last = match self.local_endpoints.get_mut(&old) {
                    Some((_, ids)) => {
                        ids.remove(&id);
                        ids.is_empty()
                    }
                    None => false,
                };
                if last {
                    self.local_endpoints.remove(&old);
                    if !self.local_overflow.remove(&old) {
                        let mut map: HashMap<_, u32, LocalEndpoint> =
                            self.typed("LOCAL_ENDPOINTS")?;
                        match map.remove(&old) {
                            Ok(()) => {}
                            Err(e) if is_not_found(&e) => {}
                            Err(e) => return Err(map_err("LOCAL_ENDPOINTS", "remove")(e)),
                        }
                        // A slot is free: a pod that did not fit takes it.
                        if let Some(waiting) = self.local_overflow.pop_first() {
                            let ep = self.local_endpoints[&waiting].0;
                            self.insert_local_endpoint(waiting, &ep)?;
                        }
                    }
                }
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
        self.local_ids.insert(id, addr);
        let entry = self
            .local_endpoints
            .entry(addr)
            .or_insert_with(|| (LocalEndpoint::default(), BTreeSet::new()));
        entry.1.insert(id);
        if entry.0 != ep || entry.1.len() == 1 {
            entry.0 = ep;
            if !self.local_overflow.contains(&addr) {
                self.insert_local_endpoint(addr, &ep)?;
            }
        }
        Ok(())
    }

    /// Writes one LOCAL_ENDPOINTS entry. A full map is not an error: the pod goes on the
    /// overflow list (its peer requests take the kernel path, as without the fast path) and
    /// gets the next free slot.
    fn insert_local_endpoint(
        &mut self,
        addr: u32,
        ep: &LocalEndpoint,
    ) -> Result<(), DataplaneError> {
        let mut map: HashMap<_, u32, LocalEndpoint> = self.typed("LOCAL_ENDPOINTS")?;
        match map.insert(addr, ep, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                if self.local_overflow.is_empty() {
                    warn!(
                        "LOCAL_ENDPOINTS is full ({} pods): requests that peers forward to pods \
                         beyond it take the kernel path",
                        self.local_endpoints.len() - 1
                    );
                }
                self.local_overflow.insert(addr);
                Ok(())
            }
            Err(e) => Err(map_err("LOCAL_ENDPOINTS", "insert")(e)),
        }
    }

    /// Local pods without a LOCAL_ENDPOINTS entry because the map was full.
    pub fn local_endpoints_overflow(&self) -> usize {
        self.local_overflow.len()
    }

    /// LOCAL_ENDPOINTS as the program sees it.
    pub fn local_endpoints(&self) -> Result<Vec<(u32, LocalEndpoint)>, DataplaneError> {
        self.hash_entries("LOCAL_ENDPOINTS")
    }

    /// Sets the other nodes' SNAT addresses (PEERS keys). Entries that stay keep what the
    /// program learned about them; `Config::flags` gets `CFG_PEERS` while there are any.
    pub fn set_peers(&mut self, peers: &[std::net::Ipv4Addr]) -> Result<(), DataplaneError> {
        let want: BTreeSet<u32> = peers
            .iter()
            .map(|a| u32::from_ne_bytes(a.octets()))
            .collect();
        let gone: Vec<u32> = self.peers.difference(&want).copied().collect();
        let new: Vec<u32> = want.difference(&self.peers).copied().collect();
        let had = !self.peers.is_empty();
        {
            let mut map: HashMap<_, u32, PeerNode> = self.typed("PEERS")?;
            for addr in &new {
                map.insert(addr, PeerNode::default(), 0)
                    .map_err(map_err("PEERS", "insert"))?;
            }
        }
        self.peers.extend(new.iter().copied());
        if !had && !self.peers.is_empty() {
            self.rewrite_config_flags()?;
        }
        for addr in &gone {
            self.peers.remove(addr);
        }
        if had && self.peers.is_empty() {
            self.rewrite_config_flags()?;
        }
        let mut map: HashMap<_, u32, PeerNode> = self.typed("PEERS")?;
        for addr in &gone {
            match map.remove(addr) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("PEERS", "remove")(e)),
            }
        }
        Ok(())
    }

    /// PEERS as the program sees it (with what it learned).
    pub fn peers(&self) -> Result<Vec<(u32, PeerNode)>, DataplaneError> {
        self.hash_entries("PEERS")
    }

    /// Rewrites CONFIG with its flags following `self.peers` (the epoch stays: peers do not
    /// change which frontend a packet resolves to).
    fn rewrite_config_flags(&mut self) -> Result<(), DataplaneError> {
        let mut cfg = self.config()?;
        if self.peers.is_empty() {
            cfg.flags &= !CFG_PEERS;
        } else {
            cfg.flags |= CFG_PEERS;
        }
        let mut map: Array<_, Config> = self.typed("CONFIG")?;
        map.set(0, cfg, 0).map_err(map_err("CONFIG", "set"))
    }

    pub fn clear_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.set_backend(id, &Backend::default())
    }

    pub fn backend(&self, id: u32) -> Result<Backend, DataplaneError> {
        let map: Array<_, Backend> = self.typed_ref("BACKENDS")?;
        map.get(&id, 0).map_err(map_err("BACKENDS", "get"))
    }

    /// Writes ring positions of one service slot (only the changed ones, Katran style).
    pub fn write_ring(
        &mut self,
        service_id: u32,
        changes: &[(u32, u32)],
    ) -> Result<(), DataplaneError> {
        let mut window = self.ring_window(service_id)?;
        let ring = window.slots();
        for &(pos, id) in changes {
            if let Some(slot) = ring.get_mut(pos as usize) {
                // Aligned 4-byte stores are single-copy atomic: a packet sees old or new id.
                unsafe { std::ptr::write_volatile(slot, id) };
            }
        }
        Ok(())
    }

    /// Writes a whole ring of one service slot.
    pub fn write_full_ring(
        &mut self,
        service_id: u32,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        if table.len() != self.opts.maglev_size as usize {
            return Err(DataplaneError::RingSize {
                len: table.len(),
                maglev_size: self.opts.maglev_size,
            });
        }
        let mut window = self.ring_window(service_id)?;
        for (slot, id) in window.slots().iter_mut().zip(table) {
            unsafe { std::ptr::write_volatile(slot, *id) };
        }
        Ok(())
    }

    /// The ring of a service slot as the program sees it.
    pub fn ring(&self, service_id: u32) -> Result<Vec<u32>, DataplaneError> {
        let mut window = self.ring_window(service_id)?;
        Ok(window
            .slots()
            .iter()
            .map(|slot| unsafe { std::ptr::read_volatile(slot) })
            .collect())
    }

    fn ring_window(&self, service_id: u32) -> Result<RingWindow, DataplaneError> {
        let (start, len) = self.ring_bounds(service_id)?;
        RingWindow::map(&self.rings, start, len)
    }

    fn ring_bounds(&self, service_id: u32) -> Result<(usize, usize), DataplaneError> {
        let m = self.opts.maglev_size as usize;
        let start = service_id as usize * m;
        if service_id >= self.opts.max_services || start + m > self.rings.entries {
            return Err(DataplaneError::RingOutOfRange {
                service_id,
                max_services: self.opts.max_services,
            });
        }
        Ok((start, m))
    }

    /// Counters summed over CPUs, one per `Reason`.
    pub fn stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let map: PerCpuArray<_, u64> = self.typed_ref("STATS")?;
        let mut out = Vec::with_capacity(Reason::ALL.len());
        for &reason in Reason::ALL {
            let per_cpu = map
                .get(&(reason as u32), 0)
                .map_err(map_err("STATS", "get"))?;
            out.push((reason, per_cpu.iter().sum()));
        }
        debug_assert!(out.len() as u32 <= NUM_REASONS);
        Ok(out)
    }

    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>, DataplaneError> {
        self.hash_entries("CONNTRACK")
    }

    /// Writes a conntrack entry (operator repair, benchmarks and tests; the program writes
    /// its own on a flow's first packet).
    pub fn set_conntrack(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), DataplaneError> {
        self.hash_insert("CONNTRACK", key, entry)
    }

    /// Forgets every flow: conntrack, reverse NAT and affinity entries (for benchmarks and
    /// tests). Established TCP connections are then the kernel's (`pass_mid_stream`); UDP
    /// flows are new ones.
    pub fn flush_flows(&mut self) -> Result<usize, DataplaneError> {
        let flows = self.hash_clear::<CtKey, CtEntry>("CONNTRACK")?;
        self.hash_clear::<CtKey, RevNatEntry>("REVNAT")?;
        self.hash_clear::<AffinityKey, AffinityEntry>("AFFINITY")?;
        Ok(flows)
    }

    pub fn revnat(&self) -> Result<Vec<(CtKey, RevNatEntry)>, DataplaneError> {
        self.hash_entries("REVNAT")
    }

    pub fn set_revnat(&mut self, key: &CtKey, entry: &RevNatEntry) -> Result<(), DataplaneError> {
        self.hash_insert("REVNAT", key, entry)
    }

    pub fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>, DataplaneError> {
        let map: HashMap<_, AffinityKey, AffinityEntry> = self.typed_ref("AFFINITY")?;
        match map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err("AFFINITY", "get")(e)),
        }
    }

    pub fn set_affinity(
        &mut self,
        key: &AffinityKey,
        entry: &AffinityEntry,
    ) -> Result<(), DataplaneError> {
        self.hash_insert("AFFINITY", key, entry)
    }

    /// Attaches the XDP program to `iface` (of the current network namespace).
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpModeChoice,
    ) -> Result<AttachMode, DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_XDP)?;
        let attach = |prog: &mut Xdp, mode| {
            prog.attach(iface, mode)
                .map_err(|source| DataplaneError::XdpAttachMode {
                    iface: iface.to_string(),
                    mode,
                    source,
                })
        };
        match mode {
            XdpModeChoice::Native => attach(prog, XdpMode::Driver).map(|_| AttachMode::Native),
            XdpModeChoice::Generic => attach(prog, XdpMode::Skb).map(|_| AttachMode::Generic),
            XdpModeChoice::Auto => match attach(prog, XdpMode::Driver) {
                Ok(_) => Ok(AttachMode::Native),
                Err(native) => {
                    warn!("native XDP not available on {iface} ({native}); falling back to generic (skb) mode, which is slower");
                    match attach(prog, XdpMode::Skb) {
                        Ok(_) => {
                            self.generic_fallbacks += 1;
                            Ok(AttachMode::Generic)
                        }
                        Err(generic) => Err(DataplaneError::XdpAttach {
                            iface: iface.to_string(),
                            native: native.to_string(),
                            generic: generic.to_string(),
                        }),
                    }
                }
            },
        }
    }

    /// Attaches the reply program at TC ingress of a local pod's host-side veth.
    pub fn attach_tc_reply(&mut self, iface: &str) -> Result<(), DataplaneError> {
        // Without TCX (kernel < 6.6) aya attaches through a clsact qdisc.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            if e.to_string().contains("exists") {
                // fine: someone (or we, earlier) added it already
            } else {
                log::debug!("clsact on {iface}: {e} (TCX does not need it)");
            }
        }
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROG_TC)?;
        prog.attach(iface, TcAttachType::Ingress)
            .map(|_| ())
            .map_err(|source| DataplaneError::TcAttach {
                iface: iface.to_string(),
                source,
            })
    }

    /// Runs the XDP program once on `packet` through BPF_PROG_TEST_RUN. Returns the verdict and
    /// the packet as the program left it.
    pub fn test_run_xdp(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_XDP)?;
        test_run(prog, PROG_XDP, packet)
    }

    /// Runs the TC reply program once on `packet`.
    pub fn test_run_tc(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROG_TC)?;
        test_run(prog, PROG_TC, packet)
    }

    /// Runs the XDP program `repeat` times in the kernel on one packet; returns the kernel's
    /// average duration per run (the benchmark's unit).
    pub fn bench_xdp(
        &mut self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_XDP)?;
        bench(prog, PROG_XDP, packet, repeat)
    }

    /// Like [`Self::bench_xdp`] for `lb_pass` (XDP_PASS only): the cost of running any XDP
    /// program through BPF_PROG_TEST_RUN, the benchmark's floor.
    pub fn bench_pass(
        &mut self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_PASS)?;
        bench(prog, PROG_PASS, packet, repeat)
    }

    /// Like [`Self::bench_xdp`] for one of the object's reference programs, loaded on first
    /// use (never attached): `lb_ref_ct_lookup` (parse and one CONNTRACK lookup) or
    /// `lb_ref_ct_insert` (one CONNTRACK insert of a random key).
    pub fn bench_reference(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DataplaneError> {
        if !REFERENCE_PROGRAMS.contains(&name) {
            return Err(DataplaneError::MissingProgram { name });
        }
        let prog: &mut Xdp = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Program {
                name,
                op: "load",
                source,
            })?;
        }
        bench(prog, name, packet, repeat)
    }

    fn hash_entries<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(K, V)>, DataplaneError> {
        let map: HashMap<_, K, V> = self.typed_ref(name)?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(name, "iterate"))
    }

    fn hash_insert<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        key: &K,
        value: &V,
    ) -> Result<(), DataplaneError> {
        let mut map: HashMap<_, K, V> = self.typed(name)?;
        map.insert(key, value, 0).map_err(map_err(name, "insert"))
    }

    /// Deletes every entry; returns how many were deleted (entries the program adds or
    /// evicts meanwhile are not counted).
    fn hash_clear<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<usize, DataplaneError> {
        let mut map: HashMap<_, K, V> = self.typed(name)?;
        let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
        Ok(keys.iter().filter(|k| map.remove(k).is_ok()).count())
    }

    fn typed<'a, T>(&'a mut self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        T::try_from(map).map_err(map_err(name, "open"))
    }

    fn typed_ref<'a, T>(&'a self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        T::try_from(map).map_err(map_err(name, "open"))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?;
    prog.try_into().map_err(|source| DataplaneError::Program {
        name,
        op: "open",
        source,
    })
}

fn test_run<P>(
    prog: &mut P,
    name: &'static str,
    packet: &[u8],
) -> Result<(u32, Vec<u8>), DataplaneError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    let res = prog
        .test_run(opts)
        .map_err(|source| DataplaneError::Program {
            name,
            op: "test_run",
            source,
        })?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
}

fn bench(
    prog: &mut Xdp,
    name: &'static str,
    packet: &[u8],
    repeat: u32,
) -> Result<(u32, Duration), DataplaneError> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let res = prog
        .test_run(opts)
        .map_err(|source| DataplaneError::Program {
            name,
            op: "test_run",
            source,
        })?;
    Ok((res.return_value, res.duration))
}

/// aya reports a missing key as KeyNotFound on lookups and as ENOENT on deletes.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_err(name: &'static str, op: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, op, source }
}
