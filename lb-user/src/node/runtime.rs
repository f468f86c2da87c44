//! The node runtime shared by `lb-user standalone` and `lb-user agent`: brings the data
//! plane up (privileges, the pin directory and its lock, loading the maps and taking over
//! the ones an earlier run pinned, CONFIG, the first apply before XDP is attached), keeps it
//! in step with desired states, and stops it.
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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::{
    driver::Driver,
    netinfo,
    options::{
        join, node_addrs, node_config, peer_addrs, NodeOptions, PortRange, RemoteMode,
        TunnelConfig, TunnelEncap,
    },
    pins::{
        check_existing_pins, clear_control_maps, lock_pin_dir, prune_moved_flows, PinCleanup,
        PinLock,
    },
    process::check_privileges,
    resolve::ResolveCache,
    RunError,
};
use crate::bpf::dataplane::{AttachMode, Dataplane, DataplaneOptions, XdpModeChoice};
use crate::control::{
    model::{DesiredState, ServicePortId, ServicePortState},
    reconcile::{ApplyReport, ReconcileConfig, ReconcileError, Reconciler},
};

/// Scoped applies resolve only the backends of the service ports that changed; this often a
/// full apply resolves every backend again (a pod's MAC, a remote node's next hop), like
/// kube-proxy's periodic full sync.
pub const FULL_APPLY_EVERY: Duration = Duration::from_secs(60);

/// Service ports that changed since the last apply: the new state, or None when gone.
pub type PortChanges = Vec<(ServicePortId, Option<ServicePortState>)>;

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
    tunnel: TunnelConfig,
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
        let tunnel = TunnelConfig {
            mode: opts.remote_mode,
            encap: opts.tunnel_encap,
            addr: opts.tunnel_addr.unwrap_or(node_addrs[0]),
            port: opts.tunnel_port,
            mtu: match opts.tunnel_mtu {
                Some(mtu) => mtu,
                None => netinfo::mtu(&opts.iface)
                    .map_err(iface_err)?
                    .min(u16::MAX as u32) as u16,
            },
        };

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
        crate::bpf::bpffs::ensure(&pin_dir)?;
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
        dp.set_config(&node_config(
            &node_addrs,
            snat_addr,
            opts.snat_ports,
            &tunnel,
        ))
        .map_err(dp_err("writing CONFIG"))?;
        dp.set_peers(&peer_addrs(
            &opts.peer_snat_addrs,
            &node_ips,
            &node_addrs,
            snat_addr,
            opts.remote_mode,
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
            tunnel: opts.remote_mode == RemoteMode::Tunnel,
            resolved: RefCell::new(ResolveCache::default()),
        };
        driver
            .apply(&mut dp)
            .map_err(|source| RunError::FirstApply {
                origin: origin.to_string(),
                source: Box::new(source),
            })?;
        if let Some(old) = &old_backends {
            match prune_moved_flows(&mut dp, old) {
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
            tunnel,
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
            "node addresses {}, remote pods by {}, SNAT {} ports {}, pins in {:?}",
            join(&self.node_addrs),
            match self.tunnel.mode {
                RemoteMode::Tunnel => format!(
                    "{:?} tunnel from {} (MTU {}, MSS clamped to {})",
                    self.tunnel.encap,
                    self.tunnel.addr,
                    self.tunnel.mtu,
                    self.tunnel.mtu.saturating_sub(
                        match self.tunnel.encap {
                            TunnelEncap::Ipip => lb_common::IPIP_OVERHEAD,
                            TunnelEncap::Fou => lb_common::FOU_OVERHEAD,
                        } + 40
                    )
                ),
                RemoteMode::Snat => "SNAT".to_string(),
            },
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
            self.tunnel.mode,
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
