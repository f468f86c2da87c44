//! `lb-user agent`: the node agent. Watches Services, EndpointSlices and Nodes on the API
//! server and keeps this node's data plane in step with them.
//!
//! - [`super::watch`]: the reflectors and the changes they report;
//! - [`super::state`]: the desired state, retranslated per changed Service;
//! - [`super::healthcheck`]: healthCheckNodePort servers for externalTrafficPolicy Local;
//! - [`crate::node::runtime`]: the data plane itself (shared with `standalone`).
//!
//! Start-up waits for the first full list of all three kinds, so the first apply is complete
//! (a partial state would delete frontends another list is about to bring back); then the
//! data plane comes up and `lbx: ready ...` is printed. After that, changes are batched for
//! `batch` and applied; a relist (start-up, reconnect, 410 Gone) retranslates everything, so
//! objects deleted while the agent was away disappear from the maps. While the API server is
//! unreachable nothing changes: forwarding goes on with the last state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use log::{info, warn};
use tokio::sync::mpsc;

use super::healthcheck::HealthServers;
use super::state::{node_ips, AgentState};
use super::watch::{Change, Kind, ServiceKey, Stores, WatchStats};
use crate::k8s::translate::TranslateOptions;
use crate::node::{options::NodeOptions, process, runtime::NodeRuntime, RunError};

/// How often the loop retries unresolved backends and checks for a stop request.
const TICK: Duration = Duration::from_millis(250);
/// How often start-up says it is still waiting for the API server.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Everything `lb-user agent` is told on its command line.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: NodeOptions,
    /// None: in-cluster config (the pod's ServiceAccount) or $KUBECONFIG / ~/.kube/config.
    pub kubeconfig: Option<PathBuf>,
    /// Also take Services labelled service.kubernetes.io/service-proxy-name=<this>.
    pub proxy_name: Option<String>,
    /// Address the healthCheckNodePort servers listen on.
    pub healthz_bind: IpAddr,
    /// How long changes are collected before one apply.
    pub batch: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the kubeconfig {path:?}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: Box<kube::config::KubeconfigError>,
    },
    #[error(
        "no Kubernetes configuration: {source}; run inside a pod with a ServiceAccount, or pass \
         --kubeconfig"
    )]
    Infer {
        #[source]
        source: Box<kube::config::InferConfigError>,
    },
    #[error("cannot build a Kubernetes client: {source}")]
    Client {
        #[source]
        source: Box<kube::Error>,
    },
    #[error("cannot start the async runtime: {source}")]
    Tokio {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Runs until SIGTERM/SIGINT; Ok after a clean shutdown.
pub fn run(opts: AgentOptions) -> Result<(), AgentError> {
    process::install_signal_handlers()?;
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| AgentError::Tokio { source })?;
    rt.block_on(run_async(opts))
}

/// glibc gives each thread that allocates concurrently its own arena (up to 8 per core) and
/// keeps freed memory in them: with the runtime's threads and a one-off full sync that
/// allocates a lot, that is resident memory nobody uses. Two arenas are plenty for an agent
/// that spends its time waiting.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns the heap memory a full sync freed to the kernel (glibc keeps it otherwise).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn client(opts: &AgentOptions) -> Result<Client, AgentError> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc_err = |source| AgentError::Kubeconfig {
                path: path.clone(),
                source: Box::new(source),
            };
            let kc = Kubeconfig::read_from(path).map_err(kc_err)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(kc_err)?
        }
        None => Config::infer().await.map_err(|source| AgentError::Infer {
            source: Box::new(source),
        })?,
    };
    Client::try_from(config).map_err(|source| AgentError::Client {
        source: Box::new(source),
    })
}

async fn run_async(opts: AgentOptions) -> Result<(), AgentError> {
    let client = client(&opts).await?;
    let node = opts.node.node_name.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stats = Arc::new(WatchStats::default());
    let stores = super::watch::spawn(&client, tx, stats.clone());
    info!("node {node}: watching services, endpointslices and nodes");

    // Start-up: the first full list of every kind.
    let started = Instant::now();
    let mut synced = BTreeSet::new();
    let mut next_log = started + WAIT_LOG_EVERY;
    while synced.len() < 3 {
        tokio::select! {
            change = rx.recv() => {
                if let Some(Change::Synced(kind)) = change {
                    synced.insert(kind);
                }
            }
            _ = tokio::time::sleep(TICK) => {
                if process::stop_requested() {
                    info!("stop requested before the first sync; nothing was attached");
                    return Ok(());
                }
                if Instant::now() >= next_log {
                    next_log += WAIT_LOG_EVERY;
                    let missing: Vec<&str> = [Kind::Service, Kind::EndpointSlice, Kind::Node]
                        .into_iter()
                        .filter(|k| !synced.contains(k))
                        .map(Kind::plural)
                        .collect();
                    warn!(
                        "still waiting for the first list of {} after {:.0?} (is the API server \
                         reachable? see the watch errors above)",
                        missing.join(", "),
                        started.elapsed()
                    );
                }
            }
        }
    }
    let listed = Instant::now();
    let mut state = AgentState::new(
        &node,
        TranslateOptions {
            proxy_name: opts.proxy_name.clone(),
        },
    );
    state.resync(&stores);
    let desired = state.take_desired();
    let (ips, found) = node_ips(&stores.nodes.state(), &node);
    if !found {
        warn!(
            "there is no Node named {node} in the API server; endpoints are matched to this node \
             by that name (check --node-name / NODE_NAME)"
        );
    }
    let mut rt = NodeRuntime::start(
        &opts.node,
        desired,
        ips.clone(),
        "the API server's Services and EndpointSlices",
    )?;
    let sync_s = listed.elapsed().as_secs_f64();
    let mut health = HealthServers::new(opts.healthz_bind);
    health.update(state.health_checks()).await;
    rt.announce_ready();
    {
        // Machine-readable for benchmarks: list = start to the last first list, sync = list
        // returned to the maps holding everything.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "lbx: synced services={} service_ports={} list_s={:.3} sync_s={sync_s:.3}",
            state.services(),
            state.service_ports(),
            (listed - started).as_secs_f64()
        );
        let _ = out.flush();
    }
    super::state::log_sync(&state, "initial sync");
    release_freed_memory();

    let mut control = Control {
        stores,
        state,
        node,
        ips,
        node_found: found,
    };
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = rx.recv() => {
                let Some(change) = change else { break };
                let mut batch = vec![change];
                if !opts.batch.is_zero() {
                    tokio::time::sleep(opts.batch).await;
                }
                while let Ok(c) = rx.try_recv() {
                    batch.push(c);
                }
                let applied = match control.absorb(batch) {
                    Absorbed::Nothing => false,
                    Absorbed::Changes => {
                        let changes = control.state.take_changes();
                        let _ = rt.update(changes, control.ips.clone());
                        true
                    }
                    Absorbed::Resync => {
                        let _ = rt.set_desired(control.state.take_desired(), control.ips.clone());
                        release_freed_memory();
                        true
                    }
                };
                if applied {
                    health.update(control.state.health_checks()).await;
                }
            }
            _ = ticker.tick() => {
                if process::stop_requested() {
                    break;
                }
                rt.tick();
            }
        }
    }
    let errors = stats.errors.load(std::sync::atomic::Ordering::Relaxed);
    let gone = stats
        .gone_relists
        .load(std::sync::atomic::Ordering::Relaxed);
    info!("stopping after {errors} watch errors ({gone} of them 410 Gone)");
    drop(health);
    drop(rt);
    Ok(())
}

/// What a batch of changes calls for.
#[derive(Debug, PartialEq, Eq)]
enum Absorbed {
    Nothing,
    /// Some service ports (or the node addresses) changed: apply those.
    Changes,
    /// A relist: apply the whole desired state.
    Resync,
}

/// The control loop's view: stores, the desired state and the node addresses.
struct Control {
    stores: Stores,
    state: AgentState,
    node: String,
    ips: BTreeMap<String, Ipv4Addr>,
    node_found: bool,
}

impl Control {
    /// Folds a batch of changes into the desired state and says what to apply.
    fn absorb(&mut self, batch: Vec<Change>) -> Absorbed {
        let mut full = false;
        let mut nodes = false;
        let mut services: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut slices: BTreeSet<ServiceKey> = BTreeSet::new();
        for change in batch {
            match change {
                Change::Synced(kind) => {
                    info!("relisted {}: full resync", kind.plural());
                    full = true;
                    nodes |= kind == Kind::Node;
                }
                Change::Node => nodes = true,
                Change::Service(key) => {
                    services.insert(key);
                }
                Change::Slice {
                    slice,
                    service,
                    deleted,
                } => {
                    slices.extend(self.state.slice_changed(slice, service, deleted));
                }
            }
        }
        let mut changed = false;
        if nodes || full {
            let (ips, found) = node_ips(&self.stores.nodes.state(), &self.node);
            if found != self.node_found {
                if found {
                    info!("Node {} appeared in the API server", self.node);
                } else {
                    warn!("Node {} is gone from the API server", self.node);
                }
                self.node_found = found;
            }
            if ips != self.ips {
                self.ips = ips;
                changed = true;
            }
        }
        if full {
            self.state.resync(&self.stores);
            super::state::log_sync(&self.state, "resync");
            return Absorbed::Resync;
        }
        for key in services.iter().chain(&slices) {
            changed |= self.state.update_service(&self.stores, key);
        }
        if changed {
            Absorbed::Changes
        } else {
            Absorbed::Nothing
        }
    }
}
