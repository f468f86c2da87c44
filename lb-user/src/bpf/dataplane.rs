//! The loaded data plane: the programs, their maps (through the handle layer in
//! [`super::maps`]), and their attachments.
//!
//! `Dataplane` is the write path's only door to the maps: everything above it (reconcile,
//! the node runtime, tests) goes through its typed methods, which keep the derived maps
//! (SERVICE_PORTS, LOCAL_ENDPOINTS, the CONFIG epoch) in step with what is written.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use aya::{
    programs::{
        tc::{self, TcAttachType},
        ProgramError, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfError,
};
use lb_common::{
    bench::BenchInput,
    maps::{
        MapDef, AFFINITY, BACKENDS, CONFIG, CONNTRACK, FRONTENDS, LOCAL_ENDPOINTS, MAGLEV, PEERS,
        RETURNS, REVNAT, SERVICE_PORTS, STATS,
    },
    port_host, service_port_word,
    stats::NUM_REASONS,
    AffinityEntry, AffinityKey, Backend, Config, CtEntry, CtKey, FlowKey, Frontend, FrontendKey,
    LocalEndpoint, PeerNode, Reason, ReturnEntry, RevNatEntry, BE_ACTIVE, CFG_PEERS,
    DEFAULT_MAGLEV_SIZE,
};
use log::warn;

use super::{
    local_endpoints::LocalEndpoints,
    maps::{pin_path, Maps, MapsError},
    object::{
        self, MapSizes, Placement, BENCH_INPUT, PROG_BENCH_HARNESS, PROG_INGRESS, PROG_PASS,
        PROG_REPLY, REFERENCE_PROGRAMS,
    },
    rings::{Rings, RingsError},
    testrun,
};

/// Sizes of the maps, chosen at load time, and where they are pinned.
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
    pub pin_dir: Option<PathBuf>,
}

impl DataplaneOptions {
    /// The size parameters of the catalogue's maps.
    pub fn sizes(&self) -> MapSizes {
        MapSizes {
            max_services: self.max_services,
            maglev_size: self.maglev_size,
            max_backends: self.max_backends,
            max_frontends: self.max_frontends,
            ct_entries: self.ct_entries,
            affinity_entries: self.affinity_entries,
        }
    }
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
    #[error("program {name}: {op} failed")]
    Program {
        name: &'static str,
        op: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Rings(#[from] RingsError),
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
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bpffs(#[from] super::bpffs::BpffsError),
    #[error(transparent)]
    KernelFeatures(#[from] super::kernel_features::KernelFeaturesError),
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

pub struct Dataplane {
    /// The programs (the maps are in `maps`).
    ebpf: Ebpf,
    maps: Maps,
    opts: DataplaneOptions,
    rings: Rings,
    /// Times the XDP attach fell back to generic mode (exported as a metric).
    pub generic_fallbacks: u64,
    /// Frontends in FRONTENDS, per (protocol, port): drives the SERVICE_PORTS bitmap.
    port_refs: HashMap<(u8, u16), u32>,
    /// Frontends in FRONTENDS and their service slots.
    frontend_keys: HashMap<FrontendKey, u32>,
    /// `Config::frontend_epoch` as last written (see [`Dataplane::bump_frontend_epoch`]).
    frontend_epoch: u32,
    local: LocalEndpoints,
    /// PEERS keys (other nodes' addresses, wire order) and their roles (`PEER_SNAT`, `PEER_TUNNEL`), as last written.
    peers: BTreeMap<u32, u8>,
}

impl Dataplane {
    /// Loads the embedded object with maps sized by `opts`. Nothing is attached yet.
    pub fn load(opts: DataplaneOptions) -> Result<Self, DataplaneError> {
        super::kernel_features::require()?;
        let sizes = opts.sizes();
        sizes
            .maglev_size
            .checked_mul(sizes.max_services)
            .ok_or(DataplaneError::TooLarge {
                maglev_size: sizes.maglev_size,
                max_services: sizes.max_services,
            })?;
        if let Some(dir) = &opts.pin_dir {
            super::bpffs::ensure(dir)?;
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
                dir: dir.clone(),
                source,
            })?;
        }
        let reused_pins = opts.pin_dir.as_ref().is_some_and(|dir| {
            lb_common::maps::CATALOGUE
                .iter()
                .any(|spec| pin_path(dir, spec).exists())
        });
        let mut ebpf = object::load(|spec| match &opts.pin_dir {
            Some(dir) => Placement::Pinned {
                path: pin_path(dir, spec),
                entries: sizes.entries(spec),
            },
            None => Placement::Private(sizes.entries(spec)),
        })
        .map_err(|source| DataplaneError::Load { source })?;

        for name in [PROG_INGRESS, PROG_PASS] {
            load_program::<Xdp>(&mut ebpf, name)?;
        }
        load_program::<SchedClassifier>(&mut ebpf, PROG_REPLY)?;

        let maps = Maps::take_from(&mut ebpf)?;
        let rings = Rings::new(
            maps.map::<MAGLEV>()?,
            sizes.entries(&MAGLEV::SPEC),
            sizes.maglev_size,
            sizes.max_services,
        )?;
        let mut dp = Self {
            ebpf,
            maps,
            opts,
            rings,
            generic_fallbacks: 0,
            port_refs: Default::default(),
            frontend_keys: Default::default(),
            frontend_epoch: 0,
            local: LocalEndpoints::default(),
            peers: BTreeMap::new(),
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
        dp.maps.clear::<LOCAL_ENDPOINTS>()?;
        if reused_pins {
            for id in 1..sizes.max_backends {
                let be = dp.backend(id)?;
                if be.flags & BE_ACTIVE != 0 {
                    dp.local.track(&mut dp.maps, id, &be)?;
                }
            }
        }
        dp.peers = dp
            .maps
            .entries::<PEERS>()?
            .into_iter()
            .map(|(k, v)| (k, v.flags))
            .collect();
        // Continue a pinned config's epoch: going back to an older value could make entries
        // checked before a frontend change look current again.
        dp.frontend_epoch = dp.config()?.frontend_epoch;
        dp.set_config(&Config {
            maglev_size: sizes.maglev_size,
            ..Default::default()
        })?;
        Ok(dp)
    }

    pub fn options(&self) -> &DataplaneOptions {
        &self.opts
    }

    /// The maps, for reading (the operator view's reports and tests).
    pub fn maps(&self) -> &Maps {
        &self.maps
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
        Ok(self.maps.set_element::<CONFIG>(0, cfg)?)
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
        Ok(self.maps.element::<CONFIG>(0)?.unwrap_or_default())
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
        self.maps.insert::<FRONTENDS>(key, fe)?;
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
        self.maps.remove::<FRONTENDS>(key)?;
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
        let old = self.maps.element::<SERVICE_PORTS>(word)?.unwrap_or(0);
        let bit = 1u64 << (port % 64);
        let new = if on { old | bit } else { old & !bit };
        Ok(self.maps.set_element::<SERVICE_PORTS>(word, new)?)
    }

    pub fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, DataplaneError> {
        Ok(self.maps.entries::<FRONTENDS>()?)
    }

    /// Writes a backend id; a local backend also makes its pod a LOCAL_ENDPOINTS entry
    /// (written after BACKENDS, removed with the pod's last local id).
    pub fn set_backend(&mut self, id: u32, be: &Backend) -> Result<(), DataplaneError> {
        self.maps.set_element::<BACKENDS>(id, *be)?;
        Ok(self.local.track(&mut self.maps, id, be)?)
    }

    pub fn clear_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.set_backend(id, &Backend::default())
    }

    pub fn backend(&self, id: u32) -> Result<Backend, DataplaneError> {
        Ok(self.maps.element::<BACKENDS>(id)?.unwrap_or_default())
    }

    /// Local pods without a LOCAL_ENDPOINTS entry because the map was full.
    pub fn local_endpoints_overflow(&self) -> usize {
        self.local.overflow()
    }

    /// LOCAL_ENDPOINTS as the program sees it.
    pub fn local_endpoints(&self) -> Result<Vec<(u32, LocalEndpoint)>, DataplaneError> {
        Ok(self.maps.entries::<LOCAL_ENDPOINTS>()?)
    }

    /// Sets the other nodes' addresses (PEERS keys) with their roles (`PEER_SNAT`: a peer's
    /// SNAT address, its requests take the peer path; `PEER_TUNNEL`: a peer's tunnel address,
    /// its encapsulated packets are taken). Entries that stay keep what the program learned
    /// about them; `Config::flags` gets `CFG_PEERS` while there are any.
    pub fn set_peers(&mut self, peers: &[(std::net::Ipv4Addr, u8)]) -> Result<(), DataplaneError> {
        let want: BTreeMap<u32, u8> = peers
            .iter()
            .map(|(a, roles)| (u32::from_ne_bytes(a.octets()), *roles))
            .collect();
        let gone: Vec<u32> = self
            .peers
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        let had = !self.peers.is_empty();
        for (addr, roles) in &want {
            if self.peers.get(addr) == Some(roles) {
                continue;
            }
            // New, or its roles changed: keep what the program learned of it.
            let learned = self.maps.lookup::<PEERS>(addr)?.unwrap_or_default();
            let entry = PeerNode {
                flags: *roles,
                ..learned
            };
            self.maps.insert::<PEERS>(addr, &entry)?;
            self.peers.insert(*addr, *roles);
        }
        if !had && !self.peers.is_empty() {
            self.rewrite_config_flags()?;
        }
        for addr in &gone {
            self.peers.remove(addr);
        }
        if had && self.peers.is_empty() {
            self.rewrite_config_flags()?;
        }
        for addr in &gone {
            self.maps.remove::<PEERS>(addr)?;
        }
        Ok(())
    }

    /// PEERS as the program sees it (with what it learned).
    pub fn peers(&self) -> Result<Vec<(u32, PeerNode)>, DataplaneError> {
        Ok(self.maps.entries::<PEERS>()?)
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
        Ok(self.maps.set_element::<CONFIG>(0, cfg)?)
    }

    /// Writes ring positions of one service slot (only the changed ones, Katran style).
    pub fn write_ring(
        &mut self,
        service_id: u32,
        changes: &[(u32, u32)],
    ) -> Result<(), DataplaneError> {
        Ok(self.rings.write(service_id, changes)?)
    }

    /// Writes a whole ring of one service slot.
    pub fn write_full_ring(
        &mut self,
        service_id: u32,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        Ok(self.rings.write_full(service_id, table)?)
    }

    /// The ring of a service slot as the program sees it.
    pub fn ring(&self, service_id: u32) -> Result<Vec<u32>, DataplaneError> {
        Ok(self.rings.read(service_id)?)
    }

    /// Counters summed over CPUs, one per `Reason`.
    pub fn stats(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let stats = stats(&self.maps)?;
        debug_assert!(stats.len() as u32 <= NUM_REASONS);
        Ok(stats)
    }

    pub fn conntrack(&self) -> Result<Vec<(FlowKey, CtEntry)>, DataplaneError> {
        Ok(self.maps.entries::<CONNTRACK>()?)
    }

    /// Writes a conntrack entry (operator repair, benchmarks and tests; the program writes
    /// its own on a flow's first packet).
    pub fn set_conntrack(&mut self, key: &FlowKey, entry: &CtEntry) -> Result<(), DataplaneError> {
        Ok(self.maps.insert::<CONNTRACK>(key, entry)?)
    }

    /// Deletes one flow's conntrack entry (its next packet is a new flow); false when there
    /// was none.
    pub fn remove_conntrack(&mut self, key: &FlowKey) -> Result<bool, DataplaneError> {
        Ok(self.maps.remove::<CONNTRACK>(key)?)
    }

    /// Forgets every flow: conntrack, reverse SNAT, tunnel return and affinity entries (for
    /// benchmarks and tests). Established TCP connections are then the kernel's
    /// (`pass_mid_stream`); UDP flows are new ones.
    pub fn flush_flows(&mut self) -> Result<usize, DataplaneError> {
        let flows = self.maps.clear::<CONNTRACK>()?;
        self.maps.clear::<REVNAT>()?;
        self.maps.clear::<RETURNS>()?;
        self.maps.clear::<AFFINITY>()?;
        Ok(flows)
    }

    /// The tunnelled flows whose pods are here (where their replies go back).
    pub fn returns(&self) -> Result<Vec<(CtKey, ReturnEntry)>, DataplaneError> {
        Ok(self.maps.entries::<RETURNS>()?)
    }

    pub fn revnat(&self) -> Result<Vec<(CtKey, RevNatEntry)>, DataplaneError> {
        Ok(self.maps.entries::<REVNAT>()?)
    }

    pub fn set_revnat(&mut self, key: &CtKey, entry: &RevNatEntry) -> Result<(), DataplaneError> {
        Ok(self.maps.insert::<REVNAT>(key, entry)?)
    }

    pub fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>, DataplaneError> {
        Ok(self.maps.lookup::<AFFINITY>(key)?)
    }

    pub fn set_affinity(
        &mut self,
        key: &AffinityKey,
        entry: &AffinityEntry,
    ) -> Result<(), DataplaneError> {
        Ok(self.maps.insert::<AFFINITY>(key, entry)?)
    }

    /// Attaches the XDP program to `iface` (of the current network namespace).
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        mode: XdpModeChoice,
    ) -> Result<AttachMode, DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_INGRESS)?;
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
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROG_REPLY)?;
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
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_INGRESS)?;
        testrun::run_once(prog, packet).map_err(test_run_err(PROG_INGRESS))
    }

    /// Runs the TC reply program once on `packet`.
    pub fn test_run_tc(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROG_REPLY)?;
        testrun::run_once(prog, packet).map_err(test_run_err(PROG_REPLY))
    }

    /// Runs the XDP program `repeat` times in the kernel on one packet; returns the kernel's
    /// average duration per run (the benchmark's unit).
    pub fn bench_xdp(
        &mut self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_INGRESS)?;
        testrun::run_repeated(prog, packet, repeat).map_err(test_run_err(PROG_INGRESS))
    }

    /// Like [`Self::bench_xdp`] for `lb_pass` (XDP_PASS only): the cost of running any XDP
    /// program through BPF_PROG_TEST_RUN, the benchmark's floor.
    pub fn bench_pass(
        &mut self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DataplaneError> {
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_PASS)?;
        testrun::run_repeated(prog, packet, repeat).map_err(test_run_err(PROG_PASS))
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
        testrun::run_repeated(prog, packet, repeat).map_err(test_run_err(name))
    }

    /// Runs the benchmark harness `repeat` times with `input` (its packet restored, and a
    /// new flow made if `input.vary`, before every repeat; then `lb_ingress`'s code, or
    /// nothing in `BENCH_RESTORE_ONLY` mode). Loads the harness on first use. Returns the
    /// last verdict and the kernel's average duration per repeat.
    pub fn bench_harness(
        &mut self,
        input: &BenchInput,
        repeat: u32,
    ) -> Result<(u32, Duration), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(BENCH_INPUT)
            .ok_or(DataplaneError::MissingProgram { name: BENCH_INPUT })?;
        let mut array: aya::maps::Array<_, BenchInput> =
            aya::maps::Array::try_from(map).map_err(|source| DataplaneError::Program {
                name: BENCH_INPUT,
                op: "open",
                source: ProgramError::MapError(source),
            })?;
        array
            .set(0, input, 0)
            .map_err(|source| DataplaneError::Program {
                name: BENCH_INPUT,
                op: "write",
                source: ProgramError::MapError(source),
            })?;
        let prog: &mut Xdp = program(&mut self.ebpf, PROG_BENCH_HARNESS)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Program {
                name: PROG_BENCH_HARNESS,
                op: "load",
                source,
            })?;
        }
        testrun::run_repeated(prog, &input.packet, repeat).map_err(test_run_err(PROG_BENCH_HARNESS))
    }
}

/// The STATS counters of `maps`, summed over CPUs, one per `Reason`.
pub fn stats(maps: &Maps) -> Result<Vec<(Reason, u64)>, MapsError> {
    Reason::ALL
        .iter()
        .map(|&reason| {
            let per_cpu = maps.per_cpu_element::<STATS>(reason as u32)?;
            Ok((reason, per_cpu.iter().sum()))
        })
        .collect()
}

/// Program `name` of a loaded object, as type `T`.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
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

/// Loads program `name` of `ebpf` into the kernel (the verifier runs here).
pub fn load_program<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DataplaneError>
where
    T: LoadProgram,
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog: &mut T = program(ebpf, name)?;
    prog.load_program()
        .map_err(|source| DataplaneError::Program {
            name,
            op: "load",
            source,
        })
}

/// The program types this object has, loadable without further arguments.
pub trait LoadProgram {
    fn load_program(&mut self) -> Result<(), ProgramError>;
}

impl LoadProgram for Xdp {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl LoadProgram for SchedClassifier {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

fn test_run_err(name: &'static str) -> impl Fn(ProgramError) -> DataplaneError {
    move |source| DataplaneError::Program {
        name,
        op: "test_run",
        source,
    }
}
