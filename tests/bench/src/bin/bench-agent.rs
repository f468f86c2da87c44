//! `cargo xtask bench agent --json FILE`: the agent's control plane against a real API server
//! at 1, 1 000 and 10 000 Services of 10 endpoints each: initial sync time, the latency from
//! an EndpointSlice write to the BPF maps holding it, and the agent's resident memory; and, as
//! the reference, kube-proxy (iptables mode) syncing the same state on the same machine.
//!
//! Setup: a lab with two nodes and no pods plus the control namespace, where etcd,
//! kube-apiserver and kube-controller-manager run. Node objects n0 (10.77.0.10, where the
//! agent and kube-proxy run) and n1 (10.77.0.11). Every Service is selector-less, type
//! ClusterIP with one externalIP and one TCP port (the agent makes one exact-match frontend of
//! it, kube-proxy its external-IP rules), with one EndpointSlice of ours (managed-by
//! `lbx-bench.lbx.io`, so no controller touches it) whose endpoints all live on n1: the agent
//! forwards them to n1's InternalIP, so nothing needs a pod. NodePort Services cannot be
//! used: the API server's node-port range (30000-32767) holds 2 768 ports, not 10 000.
//! Sizes are measured in ascending order; each size adds Services to the ones already there.
//!
//! Per size, one after the other (never both at once):
//! 1. the agent (`lb-user agent` in n0's namespace, pins in the root mount namespace's bpffs)
//!    is started after the objects exist; its `lbx: synced ... sync_s=` line gives the sync
//!    time (lists returned -> maps hold everything), `list_s`, and the wall time to ready.
//!    The pinned maps are then checked: one frontend per Service, every endpoint a backend.
//! 2. update latency: sequential changes, each replacing one endpoint address of one
//!    EndpointSlice (merge patch) with a fresh one. The clock starts just before the write;
//!    the pinned maps are polled (every `--poll-us`) until the new address is a backend of
//!    the Service's Maglev ring: FRONTENDS lookup -> service slot -> the ring read through a
//!    read-only mmap of MAGLEV -> BACKENDS lookups of only the distinct ids it holds. A change
//!    not seen within 10 s counts as failed (and as 10 s in the percentiles).
//! 3. memory: VmRSS/VmHWM (and the anon/file/shmem split) of the agent from /proc after the
//!    sync and after the updates.
//! 4. kube-proxy (iptables mode, in n0's namespace, metrics on 127.0.0.1 there, conntrack
//!    and localhost-nodeport sysctls left alone) is started against the same API server, once
//!    per iptables backend (`--kube-proxy-iptables`: nft, Debian's default `iptables`, and
//!    legacy x_tables, chosen by a PATH directory of links): its first full sync (from its
//!    start, and the sync's own duration; a first sync that takes longer than
//!    `--kube-proxy-timeout` is reported as such), its rule counts, and
//!    `--kube-proxy-updates` changes timed by its own network-programming metric (the
//!    changes carry the `endpoints.kubernetes.io/last-change-trigger-time` annotation set
//!    just before the write, and come 1.1 s apart so its 1 s min-sync-period does not hold
//!    them back). Stopped by PID (with any iptables-restore it left running), then
//!    `kube-proxy --cleanup` removes its rules.
//!
//! Exits non-zero when the harness cannot do its job (no API server, an agent that does not
//! start, ...), never because a target is missed: targets are reported met or not.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    ptr::NonNull,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use lb_common::maps::{MapDef, BACKENDS, CONFIG, FRONTENDS, MAGLEV};
use lb_common::{v4, BE_ACTIVE, PROTO_TCP};
use lb_tests::{
    controlplane::{self, ControlPlane},
    fixture::frontend_key,
    kubelet,
    kubeproxy::{
        self, run_in_ns, spawn_in_ns, IptablesBackend, KubeProxy, KubeProxySpec, Metrics, ProxyMode,
    },
    netns::ChildGuard,
    scenario::{self, ReadyLine},
    topology::{Topology, TopologySpec, CONTROL_ADDR, NIC},
};
use lb_user::bpf::{
    maps::{pin_path, Maps},
    pins,
};
use serde::Serialize;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Agent sync time, update latency and memory vs kube-proxy, real API server")]
struct Args {
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Service counts to measure, ascending (each size adds to the previous one's Services).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 1000, 10000])]
    sizes: Vec<usize>,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// EndpointSlice changes timed per size for the agent.
    #[arg(long, default_value_t = 200)]
    updates: usize,
    /// EndpointSlice changes timed per size for kube-proxy, 1.1 s apart (past its 1 s
    /// --iptables-min-sync-period); 0 skips them.
    #[arg(long, default_value_t = 5)]
    kube_proxy_updates: usize,
    /// The iptables kube-proxy runs, one case each per size: `nft` is Debian's default
    /// `iptables`, `legacy` the x_tables one.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [IptablesBackend::Legacy, IptablesBackend::Nft])]
    kube_proxy_iptables: Vec<IptablesBackend>,
    /// Give up on kube-proxy's first sync after this many seconds (reported, not an error).
    #[arg(long, default_value_t = 120)]
    kube_proxy_timeout: u64,
    /// Skip kube-proxy entirely.
    #[arg(long)]
    no_kube_proxy: bool,
    /// The agent's --maglev-size; default: the largest of 16381, 4093, 1021 whose MAGLEV map
    /// (size x Services x 4 bytes) stays within 64 MiB.
    #[arg(long)]
    maglev_size: Option<u32>,
    /// API requests in flight while creating the objects.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Sleep between two polls of the maps, in microseconds.
    #[arg(long, default_value_t = 250)]
    poll_us: u64,
    /// Keep every log (agent, kube-proxy) in this directory; by default they go to a
    /// temporary directory that is removed after a successful run.
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Record the agent with `perf record --call-graph dwarf` over its whole run, one file
    /// per size, here.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
}

/// Kubernetes namespace of the benchmark's objects.
const K8S_NAMESPACE: &str = "lbx-bench";
/// The node the agent and kube-proxy run on, and the node every endpoint lives on.
const NODE: &str = "n0";
const REMOTE_NODE: &str = "n1";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const PORT_NAME: &str = "http";
/// Our EndpointSlices' managed-by label: the EndpointSlice controllers leave them alone.
const MANAGED_BY: &str = "lbx-bench.lbx.io";
/// What kube-proxy's network-programming latency is measured from.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// A unique value per timed write, so the benchmark's own watch can tell when it saw which.
const WRITE_ANNOTATION: &str = "lbx.bench/write";
/// Service i's externalIP is EXTERNAL_IP_BASE + 1 + i (198.18.0.0/15, benchmarking space).
const EXTERNAL_IP_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Initial endpoint k (= service * endpoints + j) is ENDPOINT_BASE + k.
const ENDPOINT_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
/// Replacement endpoints count up from here.
const FRESH_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
/// Where pins go (the lab's agents use the same root; stale `lbx-<pid>-*` dirs are removed).
const PIN_ROOT: &str = "/sys/fs/bpf/lbx";

const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(300);
const UPDATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two timed changes, so one change's tail work never overlaps the next.
const UPDATE_GAP: Duration = Duration::from_millis(20);
const METRICS_POLL: Duration = Duration::from_millis(20);
/// Targets of the issue.
const TARGET_SYNC_S: f64 = 2.0;
const TARGET_P99_MS: f64 = 100.0;
const TARGET_RSS_MIB: f64 = 100.0;
const TARGET_SERVICES: usize = 10_000;
/// kube-proxy's default --iptables-min-sync-period: at most one sync per period.
const KUBE_PROXY_MIN_SYNC_S: f64 = 1.0;
/// Pause between two kube-proxy changes: longer than its min-sync-period.
const KUBE_PROXY_UPDATE_GAP: Duration = Duration::from_millis(1100);
/// A kube-proxy change not programmed within this counts as failed (a partial sync of a
/// large legacy table rewrites the whole table, which takes seconds).
const KUBE_PROXY_UPDATE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Interruption: Ctrl-C / SIGTERM set a flag; every wait checks it and unwinds through the
// guards' Drop, which stops the processes, removes the pins and deletes the namespaces.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal, &sa, std::ptr::null_mut())
        };
        ensure!(
            rc == 0,
            "installing a signal handler: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Sleeps, but returns an error as soon as an interrupt arrives.
fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Serialize, Clone, Copy, Default)]
struct Memory {
    vm_rss_mib: f64,
    vm_hwm_mib: f64,
    rss_anon_mib: f64,
    rss_file_mib: f64,
    rss_shmem_mib: f64,
}

#[derive(Serialize, Default)]
struct LatencySummary {
    changes: usize,
    failed: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

#[derive(Serialize)]
struct AgentCase {
    services: usize,
    endpoints_per_service: usize,
    maglev_size: u32,
    max_services: u32,
    /// Lists returned -> maps hold everything (the agent's own `sync_s`).
    sync_s: f64,
    /// Agent start -> the last of the three first lists returned (the agent's `list_s`).
    list_s: f64,
    /// Process spawned -> `lbx: ready` printed.
    ready_wall_s: f64,
    /// CPU time (user + system) the agent used until it printed `lbx: synced`.
    cpu_s_to_sync: f64,
    update_p50_ms: f64,
    update_p99_ms: f64,
    updates: LatencySummary,
    /// The same writes as a plain watch in the benchmark process saw them arrive (write ->
    /// watch event): the API server's own delivery time, a floor for any agent (and for
    /// kube-proxy) on this machine. Writes the watch never saw count as the timeout.
    api_watch: LatencySummary,
    /// Agent CPU time per timed change (user + system), ms.
    cpu_ms_per_update: f64,
    /// max(VmRSS, VmHWM) over both samples.
    rss_mib: f64,
    rss_after_sync: Memory,
    rss_after_updates: Memory,
    frontends: usize,
    backends: u64,
    expected_backends: usize,
    /// Every Service has its frontend and every endpoint is a backend.
    complete: bool,
    note: Option<String>,
    polls: u64,
    mean_poll_us: f64,
    /// Time to create this size's new objects (not a metric of the agent).
    created_s: f64,
    created_objects: usize,
}

#[derive(Serialize, Default, Clone, Copy)]
struct Histogram {
    count: f64,
    sum_s: f64,
}

#[derive(Serialize)]
struct KubeProxyCase {
    services: usize,
    iptables_backend: IptablesBackend,
    /// Process start -> end of its first successful rules sync
    /// (kubeproxy_sync_proxy_rules_last_timestamp_seconds - start time); None: no sync
    /// finished within `timed_out_after_s`.
    first_sync_s: Option<f64>,
    /// Duration of that first sync alone (kubeproxy_sync_proxy_rules_duration_seconds with
    /// count 1): building and iptables-restore of the full rule set.
    first_sync_duration_s: Option<f64>,
    timed_out_after_s: Option<f64>,
    sync_proxy_rules_duration: Histogram,
    sync_full_proxy_rules_duration: Histogram,
    sync_partial_proxy_rules_duration: Histogram,
    /// kubeproxy_sync_proxy_rules_iptables_total by table, after the first sync.
    iptables_rules: BTreeMap<String, f64>,
    /// `-A` lines of `iptables-save -t nat`, and the KUBE-SEP chains among its chains.
    nat_rules_saved: usize,
    kube_sep_chains: usize,
    /// Changes timed by kubeproxy_network_programming_duration_seconds (sum deltas).
    updates: LatencySummary,
    /// max(VmRSS, VmHWM) after the first sync and after the updates.
    rss_mib: f64,
    memory: Memory,
}

#[derive(Serialize)]
struct Target {
    name: &'static str,
    target: String,
    measured: Option<f64>,
    met: Option<bool>,
    detail: String,
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn mib_of_kb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// VmRSS, VmHWM and the Rss* split of `pid`.
fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow!("{path} has no {name} line"))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("parsing {line:?}"))?;
        Ok(mib_of_kb(kb))
    };
    Ok(Memory {
        vm_rss_mib: field("VmRSS:")?,
        vm_hwm_mib: field("VmHWM:")?,
        rss_anon_mib: field("RssAnon:")?,
        rss_file_mib: field("RssFile:")?,
        rss_shmem_mib: field("RssShmem:")?,
    })
}

/// User + system CPU seconds of `pid` (/proc/<pid>/stat fields 14 and 15).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: no ')' in {text:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .ok_or_else(|| anyhow!("{path}: too few fields"))?
            .parse::<f64>()
            .with_context(|| format!("{path}: field {}", i + 3))
    };
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Failures count as the timeout, so a lost change can only push the percentiles up.
fn summarize(latencies_ms: &[f64], failed: usize, timeout: Duration) -> LatencySummary {
    let mut all: Vec<f64> = latencies_ms.to_vec();
    all.extend(std::iter::repeat_n(timeout.as_secs_f64() * 1e3, failed));
    all.sort_by(f64::total_cmp);
    let mean = if all.is_empty() {
        f64::NAN
    } else {
        all.iter().sum::<f64>() / all.len() as f64
    };
    LatencySummary {
        changes: all.len(),
        failed,
        p50_ms: percentile(&all, 50.0),
        p90_ms: percentile(&all, 90.0),
        p99_ms: percentile(&all, 99.0),
        max_ms: all.last().copied().unwrap_or(f64::NAN),
        mean_ms: mean,
    }
}

fn ip_of(base: u32, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(base + offset as u32)
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn external_ip(i: usize) -> Ipv4Addr {
    ip_of(EXTERNAL_IP_BASE, i + 1)
}

/// The largest ring size of 16381/4093/1021 whose MAGLEV map stays within 64 MiB.
fn auto_maglev_size(max_services: u32) -> u32 {
    const LIMIT: u64 = 64 << 20;
    [16381u32, 4093, 1021]
        .into_iter()
        .find(|&m| m as u64 * max_services as u64 * 4 <= LIMIT)
        .unwrap_or(1021)
}

/// A tiny deterministic generator (xorshift64*) for picking which Service changes.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// Waits for a stdout line containing `needle`, in short slices so an interrupt is noticed.
fn wait_line(child: &mut ChildGuard, needle: &str, timeout: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        check_interrupted()?;
        let slice = Duration::from_millis(500).min(timeout.saturating_sub(start.elapsed()));
        match child.wait_for_line(needle, slice) {
            Ok(line) => return Ok(line),
            Err(e) => {
                if !child.is_running() || start.elapsed() >= timeout {
                    return Err(anyhow!(e))
                        .context(format!("waiting {:.0?} for {needle:?}", start.elapsed()));
                }
            }
        }
    }
}

/// The `key=value` fields of a line.
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn field_f64(fields: &BTreeMap<String, String>, key: &str, line: &str) -> Result<f64> {
    fields
        .get(key)
        .ok_or_else(|| anyhow!("no {key}= in {line:?}"))?
        .parse()
        .with_context(|| format!("{key}= in {line:?}"))
}

/// A pin directory that is removed on drop if the agent left it behind.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = fs::remove_dir_all(&self.0) {
                eprintln!("lbx: could not remove {}: {e}", self.0.display());
            }
        }
    }
}

/// Log directory: kept if asked for or when the run fails.
struct Logs {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Logs {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            eprintln!("lbx: logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster's objects

/// The Services and EndpointSlices in the API server, and the endpoints we put in them.
struct Cluster {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// When the benchmark's own watch saw each timed write (by its WRITE_ANNOTATION value).
    watched: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    next_write: usize,
    /// Current endpoint addresses per Service.
    endpoints: Vec<Vec<Ipv4Addr>>,
    per_service: usize,
    next_fresh: usize,
}

fn service_object(i: usize) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": service_name(i),
            "namespace": K8S_NAMESPACE,
            "labels": { "app.kubernetes.io/part-of": "lbx-bench" },
        },
        "spec": {
            "type": "ClusterIP",
            "externalIPs": [external_ip(i).to_string()],
            "ports": [{
                "name": PORT_NAME,
                "port": SERVICE_PORT,
                "targetPort": TARGET_PORT,
                "protocol": "TCP",
            }],
        },
    }))?)
}

fn endpoints_json(addrs: &[Ipv4Addr]) -> serde_json::Value {
    addrs
        .iter()
        .map(|a| {
            json!({
                "addresses": [a.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": REMOTE_NODE,
            })
        })
        .collect()
}

fn slice_object(i: usize, addrs: &[Ipv4Addr]) -> Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": format!("{}-bench", service_name(i)),
            "namespace": K8S_NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": service_name(i),
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
        "addressType": "IPv4",
        "ports": [{ "name": PORT_NAME, "port": TARGET_PORT, "protocol": "TCP" }],
        "endpoints": endpoints_json(addrs),
    }))?)
}

/// Whether a failed create is worth another try (overload, a dropped connection).
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// Creates one object, retrying transient failures; an object that already exists (a
/// retried request that had gone through) is fine.
async fn create<K>(api: &Api<K>, obj: &K, what: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
{
    let mut attempt = 0;
    loop {
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.is_already_exists() => return Ok(()),
            Err(e) if attempt < 5 && transient(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(anyhow!(e)).context(format!("creating {what}")),
        }
    }
}

impl Cluster {
    fn new(cp: &ControlPlane, per_service: usize) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let client = rt
            .block_on(cp.kube_client())
            .context("a client for the API server")?;
        rt.block_on(async {
            kubelet::create_namespace(&client, K8S_NAMESPACE).await?;
            kubelet::create_node(&client, NODE, lb_tests::topology::node_addr_of(0)).await?;
            kubelet::create_node(&client, REMOTE_NODE, lb_tests::topology::node_addr_of(1)).await?;
            Ok::<_, kubelet::KubeletError>(())
        })
        .context("creating the namespace and the Nodes")?;
        Ok(Cluster {
            rt,
            client,
            watched: Default::default(),
            next_write: 0,
            endpoints: Vec::new(),
            per_service,
            next_fresh: 0,
        })
    }

    fn services(&self) -> usize {
        self.endpoints.len()
    }

    /// Starts a watch of the benchmark's EndpointSlices that records when each timed write
    /// arrives, and waits for its first list. It runs until the benchmark ends.
    fn watch_writes(&self) -> Result<()> {
        use kube::runtime::watcher::{self, Event};
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), K8S_NAMESPACE);
        let watched = self.watched.clone();
        let (listed_tx, listed_rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let mut stream = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
            while let Some(event) = stream.next().await {
                match event {
                    Ok(Event::Apply(slice)) => {
                        let now = Instant::now();
                        if let Some(w) = slice
                            .metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(WRITE_ANNOTATION))
                        {
                            watched.lock().unwrap().entry(w.clone()).or_insert(now);
                        }
                    }
                    Ok(Event::InitDone) => {
                        let _ = listed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("  (the benchmark's own watch: {e}; it retries)"),
                }
            }
        });
        listed_rx
            .recv_timeout(Duration::from_secs(120))
            .context("the benchmark's own watch of the EndpointSlices did not list them in 120 s")
    }

    /// When the benchmark's watch saw write `w`, if it did.
    fn watched_at(&self, w: &str) -> Option<Instant> {
        self.watched.lock().unwrap().get(w).copied()
    }

    /// Creates Services and EndpointSlices until there are `to`; returns the objects made.
    fn grow(&mut self, to: usize, concurrency: usize) -> Result<usize> {
        let from = self.services();
        if to <= from {
            return Ok(0);
        }
        let per = self.per_service;
        let new: Vec<Vec<Ipv4Addr>> = (from..to)
            .map(|i| {
                (0..per)
                    .map(|j| ip_of(ENDPOINT_BASE, i * per + j))
                    .collect()
            })
            .collect();
        let services: Api<Service> = Api::namespaced(self.client.clone(), K8S_NAMESPACE);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), K8S_NAMESPACE);
        let mut jobs = Vec::with_capacity(2 * (to - from));
        for (k, addrs) in new.iter().enumerate() {
            let i = from + k;
            jobs.push((i, Some(service_object(i)?), None));
            jobs.push((i, None, Some(slice_object(i, addrs)?)));
        }
        let total = jobs.len();
        let start = Instant::now();
        let result: Result<usize> = self.rt.block_on(async {
            let mut stream = futures::stream::iter(jobs)
                .map(|(i, svc, slice)| {
                    let (services, slices) = (services.clone(), slices.clone());
                    async move {
                        match (svc, slice) {
                            (Some(svc), _) => {
                                create(&services, &svc, &format!("Service {}", service_name(i)))
                                    .await
                            }
                            (_, Some(slice)) => {
                                create(&slices, &slice, &format!("EndpointSlice of {i}")).await
                            }
                            _ => unreachable!("every job holds one object"),
                        }
                    }
                })
                .buffer_unordered(concurrency.max(1));
            let mut done = 0usize;
            let mut last_report = Instant::now();
            while let Some(res) = stream.next().await {
                res?;
                done += 1;
                check_interrupted()?;
                if last_report.elapsed() >= Duration::from_secs(5) || done == total {
                    last_report = Instant::now();
                    let rate = done as f64 / start.elapsed().as_secs_f64();
                    eprintln!(
                        "  created {done}/{total} objects ({rate:.0}/s, {:.1}s)",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
            Ok(done)
        });
        let done = result?;
        self.endpoints.extend(new);
        Ok(done)
    }

    /// Replaces endpoint `j` of Service `i` with a fresh address, writing the slice in the
    /// background (with the trigger-time annotation set now); returns the new address, the
    /// instant just before the write began, and the write's handle.
    fn replace_endpoint(
        &mut self,
        i: usize,
        j: usize,
    ) -> Result<(
        Ipv4Addr,
        Instant,
        String,
        tokio::task::JoinHandle<Result<()>>,
    )> {
        let fresh = ip_of(FRESH_BASE, self.next_fresh);
        let write = format!("w{}", self.next_write);
        self.next_write += 1;
        self.next_fresh += 1;
        self.endpoints[i][j] = fresh;
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), K8S_NAMESPACE);
        let name = format!("{}-bench", service_name(i));
        let endpoints = endpoints_json(&self.endpoints[i]);
        let started = Instant::now();
        let patch = json!({
            "metadata": { "annotations": {
                TRIGGER_TIME_ANNOTATION: Timestamp::now().to_string(),
                WRITE_ANNOTATION: write.clone(),
            }},
            "endpoints": endpoints,
        });
        let handle = self.rt.spawn(async move {
            slices
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
                .with_context(|| format!("patching EndpointSlice {name}"))
        });
        Ok((fresh, started, write, handle))
    }

    fn finish_write(&self, handle: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
        self.rt
            .block_on(handle)
            .context("the write task panicked")?
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the agent's maps

/// MAGLEV mapped read-only: the rings are read without a syscall per slot.
struct RingView {
    ptr: NonNull<u32>,
    len_bytes: usize,
    slots: usize,
}

impl RingView {
    fn open(path: &Path) -> Result<RingView> {
        let data = aya::maps::MapData::from_pin(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let info = data.info().context("reading MAGLEV's info")?;
        let slots = info.max_entries() as usize * 2;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len_bytes = (slots * 4).div_ceil(page) * page;
        use std::os::fd::AsFd as _;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a read-only shared mapping of a BPF_F_MMAPABLE array; the fd may close
        // after mmap returns (the mapping holds the map).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap of MAGLEV: {}", std::io::Error::last_os_error());
        }
        Ok(RingView {
            ptr: NonNull::new(ptr.cast()).expect("mmap succeeded"),
            len_bytes,
            slots,
        })
    }

    /// Ring `service_id` of `m` slots.
    fn ring(&self, service_id: u32, m: u32) -> Result<&[u32]> {
        let start = service_id as usize * m as usize;
        ensure!(
            start + m as usize <= self.slots,
            "ring {service_id} beyond MAGLEV"
        );
        // SAFETY: in bounds of the mapping; the kernel's writers store whole u32s, and a torn
        // read would only delay the poll by one round.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), m as usize) })
    }
}

impl Drop for RingView {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
    }
}

/// The pinned maps of one agent, polled for "is this address a backend of that Service".
struct MapPoller {
    maps: Maps,
    ring: RingView,
    maglev_size: u32,
    /// seen[id] == epoch: id already checked in this poll.
    seen: Vec<u32>,
    epoch: u32,
    polls: u64,
    poll_time: Duration,
}

impl MapPoller {
    fn open(pin_dir: &Path) -> Result<MapPoller> {
        let located = pins::locate(Some(pin_dir), None)
            .with_context(|| format!("locating the pins in {}", pin_dir.display()))?;
        let maps = Maps::from_pins(&located.open_path).context("opening the pinned maps")?;
        let maglev_size = maps
            .element::<CONFIG>(0)
            .context("reading CONFIG")?
            .unwrap_or_default()
            .maglev_size;
        let ring = RingView::open(&pin_path(&located.open_path, &MAGLEV::SPEC))?;
        Ok(MapPoller {
            maps,
            ring,
            maglev_size,
            seen: Vec::new(),
            epoch: 0,
            polls: 0,
            poll_time: Duration::ZERO,
        })
    }

    /// Whether `addr:TARGET_PORT` is an active backend in Service `i`'s ring.
    fn holds(&mut self, i: usize, addr: Ipv4Addr) -> Result<bool> {
        let t = Instant::now();
        let found = self.holds_inner(i, addr);
        self.polls += 1;
        self.poll_time += t.elapsed();
        found
    }

    fn holds_inner(&mut self, i: usize, addr: Ipv4Addr) -> Result<bool> {
        let key = frontend_key(Some(external_ip(i)), SERVICE_PORT, PROTO_TCP);
        let Some(fe) = self.maps.lookup::<FRONTENDS>(&key)? else {
            return Ok(false);
        };
        let want = v4(addr.octets());
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.seen.fill(0);
            self.epoch = 1;
        }
        let ring = self.ring.ring(fe.service_id, self.maglev_size)?;
        for &id in ring {
            if id == 0 {
                continue;
            }
            let slot = id as usize;
            if slot >= self.seen.len() {
                self.seen.resize(slot + 1, 0);
            }
            if self.seen[slot] == self.epoch {
                continue;
            }
            self.seen[slot] = self.epoch;
            if let Some(be) = self.maps.element::<BACKENDS>(id)? {
                if be.addr == want
                    && be.port == lb_common::port_be(TARGET_PORT)
                    && be.flags & BE_ACTIVE != 0
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

struct Bench {
    args: Args,
    topology: Topology,
    cp: ControlPlane,
    cluster: Cluster,
    agent_bin: PathBuf,
    kube_proxy_bin: PathBuf,
    logs: Logs,
    rng: Rng,
    /// The benchmark's own watch of the writes is running (started before the first updates).
    watching: bool,
}

impl Bench {
    fn node_ns(&self) -> &str {
        self.topology.node_ns(0)
    }

    fn agent_case(
        &mut self,
        n: usize,
        created_s: f64,
        created_objects: usize,
    ) -> Result<AgentCase> {
        let per = self.args.endpoints;
        let max_services = n.max(16) as u32;
        // Every endpoint's id, plus room for the new id of a change before the old one is
        // freed (make-before-break).
        let max_backends = (n * per + 1024).max(65536) as u32;
        let maglev_size = self
            .args
            .maglev_size
            .unwrap_or_else(|| auto_maglev_size(max_services));
        let pin_dir = PinDir(
            Path::new(PIN_ROOT).join(format!("{}-bench-{NODE}-{n}", self.topology.prefix())),
        );
        let node_addr = self.topology.node_addr(0).to_string();
        #[rustfmt::skip]
        let args: Vec<String> = [
            "agent",
            "--iface", NIC,
            "--node-name", NODE,
            "--node-addr", &node_addr,
            "--snat-addr", &node_addr,
            "--pin-dir", &pin_dir.0.to_string_lossy(),
            "--kubeconfig", &self.cp.kubeconfig().to_string_lossy(),
            "--max-services", &max_services.to_string(),
            "--max-backends", &max_backends.to_string(),
            "--maglev-size", &maglev_size.to_string(),
            "--batch-ms", "5",
            "--xdp-mode", "auto",
        ]
        .map(String::from)
        .to_vec();
        let log = self.logs.dir.join(format!("agent-{n}.log"));
        eprintln!(
            "agent: {n} services, --max-services {max_services} --maglev-size {maglev_size} \
             (log {})",
            log.display()
        );
        let spawned = Instant::now();
        let mut agent = spawn_in_ns(self.topology.node_ns(0), &self.agent_bin, &args, &[], &log)?;
        let pid = agent.pid();
        let _perf = self.perf(pid, &format!("agent-{n}"))?;
        let ready = wait_line(&mut agent, "lbx: ready", AGENT_READY_TIMEOUT)
            .with_context(|| format!("the agent did not get ready (see {})", log.display()))?;
        let ready_wall_s = spawned.elapsed().as_secs_f64();
        let ready = ReadyLine::parse(&ready).map_err(|e| anyhow!("ready line {ready:?}: {e}"))?;
        let synced = wait_line(&mut agent, "lbx: synced", Duration::from_secs(10))?;
        let cpu_s_to_sync = cpu_seconds(pid)?;
        let f = fields(&synced);
        let sync_s = field_f64(&f, "sync_s", &synced)?;
        let list_s = field_f64(&f, "list_s", &synced)?;
        let synced_services = field_f64(&f, "services", &synced)? as usize;
        let rss_after_sync = memory(pid)?;
        eprintln!(
            "  ready in {ready_wall_s:.2}s: list {list_s:.3}s, sync {sync_s:.3}s, \
             {} frontends, {} backends, RSS {:.1} MiB",
            ready.frontends, ready.backends, rss_after_sync.vm_rss_mib
        );

        let mut poller = MapPoller::open(&pin_dir.0)?;
        let frontends = poller.maps.entries::<FRONTENDS>()?.len();
        let expected_backends = n * per;
        let mut notes = Vec::new();
        if synced_services != n {
            notes.push(format!(
                "the agent synced {synced_services} services of {n}"
            ));
        }
        if frontends != n {
            notes.push(format!("FRONTENDS holds {frontends} entries, expected {n}"));
        }
        if ready.backends != expected_backends as u64 {
            notes.push(format!(
                "{} backends of {expected_backends} programmed (see the agent's log for \
                 'skipped for capacity' / 'unresolved')",
                ready.backends
            ));
        }
        let complete = notes.is_empty();
        if !complete {
            eprintln!("  INCOMPLETE: {}", notes.join("; "));
        }

        // Updates.
        if !self.watching {
            self.cluster.watch_writes()?;
            self.watching = true;
        }
        let cpu_before = cpu_seconds(pid)?;
        let mut latencies = Vec::with_capacity(self.args.updates);
        let mut writes = Vec::with_capacity(self.args.updates);
        let mut failed = 0;
        let poll_every = Duration::from_micros(self.args.poll_us);
        for k in 0..self.args.updates {
            check_interrupted()?;
            let i = self.rng.below(n);
            let j = k % per;
            let (addr, started, write_id, write) = self.cluster.replace_endpoint(i, j)?;
            writes.push((write_id, started));
            let seen = loop {
                if poller.holds(i, addr)? {
                    break Some(started.elapsed());
                }
                if started.elapsed() >= UPDATE_TIMEOUT {
                    break None;
                }
                if !agent.is_running() {
                    bail!(
                        "the agent exited during the updates (see {})",
                        log.display()
                    );
                }
                std::thread::sleep(poll_every);
            };
            self.cluster.finish_write(write)?;
            match seen {
                Some(d) => latencies.push(d.as_secs_f64() * 1e3),
                None => {
                    failed += 1;
                    eprintln!(
                        "  change {k}: {addr} not in {}'s ring after 10 s",
                        service_name(i)
                    );
                }
            }
            if (k + 1) % 50 == 0 {
                eprintln!("  {} changes timed", k + 1);
            }
            sleep(UPDATE_GAP)?;
        }
        let cpu_ms_per_update = if self.args.updates > 0 {
            (cpu_seconds(pid)? - cpu_before) * 1e3 / self.args.updates as f64
        } else {
            0.0
        };
        let rss_after_updates = memory(pid)?;
        let updates = summarize(&latencies, failed, UPDATE_TIMEOUT);
        // The benchmark's own watch saw the writes no later than the agent's (give it 1 s).
        std::thread::sleep(Duration::from_secs(1));
        let (mut api_ms, mut api_missed) = (Vec::new(), 0);
        for (w, started) in &writes {
            match self.cluster.watched_at(w) {
                Some(t) => api_ms.push(t.saturating_duration_since(*started).as_secs_f64() * 1e3),
                None => api_missed += 1,
            }
        }
        let api_watch = summarize(&api_ms, api_missed, UPDATE_TIMEOUT);
        eprintln!(
            "  the same writes through a plain watch: p50 {:.2} ms, p99 {:.2} ms ({} missed)",
            api_watch.p50_ms, api_watch.p99_ms, api_missed
        );
        eprintln!(
            "  updates: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} failed; RSS {:.1} MiB \
             (HWM {:.1})",
            updates.p50_ms,
            updates.p99_ms,
            updates.max_ms,
            failed,
            rss_after_updates.vm_rss_mib,
            rss_after_updates.vm_hwm_mib
        );
        let (polls, mean_poll_us) = (
            poller.polls,
            poller.poll_time.as_secs_f64() * 1e6 / poller.polls.max(1) as f64,
        );
        drop(poller);

        let status = agent.stop();
        if !status.is_some_and(|s| s.success()) {
            bail!(
                "the agent did not stop cleanly ({status:?}); see {}",
                log.display()
            );
        }
        let rss_mib = [
            rss_after_sync.vm_rss_mib,
            rss_after_sync.vm_hwm_mib,
            rss_after_updates.vm_rss_mib,
            rss_after_updates.vm_hwm_mib,
        ]
        .into_iter()
        .fold(0.0, f64::max);
        Ok(AgentCase {
            services: n,
            endpoints_per_service: per,
            maglev_size,
            max_services,
            sync_s,
            list_s,
            ready_wall_s,
            cpu_s_to_sync,
            update_p50_ms: updates.p50_ms,
            update_p99_ms: updates.p99_ms,
            updates,
            api_watch,
            cpu_ms_per_update,
            rss_mib,
            rss_after_sync,
            rss_after_updates,
            frontends,
            backends: ready.backends,
            expected_backends,
            complete,
            note: (!complete).then(|| notes.join("; ")),
            polls,
            mean_poll_us,
            created_s,
            created_objects,
        })
    }

    /// `perf record -g -p PID` into --perf-dir, stopped (SIGINT, so it writes its file) when
    /// the guard drops.
    fn perf(&self, pid: u32, name: &str) -> Result<Option<PerfGuard>> {
        let Some(dir) = &self.args.perf_dir else {
            return Ok(None);
        };
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = dir.join(format!("{name}.data"));
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting perf record (Debian: apt-get install linux-perf)")?;
        Ok(Some(PerfGuard { child }))
    }

    // -----------------------------------------------------------------------------------------
    // kube-proxy

    fn scrape(&self) -> Result<Metrics> {
        Ok(kubeproxy::scrape(self.node_ns())?)
    }

    fn kube_proxy_case(&mut self, n: usize, backend: IptablesBackend) -> Result<KubeProxyCase> {
        let name = backend.name();
        let log = self.logs.dir.join(format!("kube-proxy-{name}-{n}.log"));
        eprintln!(
            "kube-proxy (iptables-{name}): {n} services (log {})",
            log.display()
        );
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs_f64();
        let started = Instant::now();
        let mut proxy = KubeProxy::start(&KubeProxySpec {
            bin: self.kube_proxy_bin.clone(),
            kubeconfig: self.cp.kubeconfig().to_path_buf(),
            node_name: NODE.into(),
            ns: self.node_ns().to_string(),
            mode: ProxyMode::Iptables(backend),
            work_dir: self.logs.dir.clone(),
            log: log.clone(),
            verbosity: 1,
        })?;
        let pid = proxy.pid();
        let timeout = Duration::from_secs(self.args.kube_proxy_timeout);
        let mut case = KubeProxyCase {
            services: n,
            iptables_backend: backend,
            first_sync_s: None,
            first_sync_duration_s: None,
            timed_out_after_s: None,
            sync_proxy_rules_duration: Histogram::default(),
            sync_full_proxy_rules_duration: Histogram::default(),
            sync_partial_proxy_rules_duration: Histogram::default(),
            iptables_rules: BTreeMap::new(),
            nat_rules_saved: 0,
            kube_sep_chains: 0,
            updates: summarize(&[], 0, KUBE_PROXY_UPDATE_TIMEOUT),
            rss_mib: 0.0,
            memory: Memory::default(),
        };

        // First sync.
        let first = loop {
            check_interrupted()?;
            if !proxy.is_running() {
                bail!(
                    "kube-proxy exited before its first sync; see {}",
                    log.display()
                );
            }
            if started.elapsed() >= timeout {
                break None;
            }
            if let Ok(m) = self.scrape() {
                if m.get("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0 {
                    break Some(m);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mem = memory(pid)?;
        case.rss_mib = mem.vm_rss_mib.max(mem.vm_hwm_mib);
        case.memory = mem;
        let Some(first) = first else {
            eprintln!(
                "  no sync finished within {timeout:?} (--kube-proxy-timeout): stopping it \
                 and the iptables-restore it runs"
            );
            case.timed_out_after_s = Some(timeout.as_secs_f64());
            proxy.finish()?;
            return Ok(case);
        };
        let first_sync_s =
            first.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds") - started_unix;
        let first_count = first.get("kubeproxy_sync_proxy_rules_duration_seconds_count");
        let first_sync_duration_s =
            first.get("kubeproxy_sync_proxy_rules_duration_seconds_sum") / first_count.max(1.0);
        case.first_sync_s = Some(first_sync_s);
        case.first_sync_duration_s = Some(first_sync_duration_s);
        case.iptables_rules = first.by_label("kubeproxy_sync_proxy_rules_iptables_total", "table");
        let save = backend.tool(&self.logs.dir, "iptables-save")?;
        let nat = run_in_ns(self.node_ns(), &save, &["-t", "nat"], &[])?;
        case.nat_rules_saved = nat.lines().filter(|l| l.starts_with("-A ")).count();
        case.kube_sep_chains = nat.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count();
        eprintln!(
            "  first sync {first_sync_s:.2}s after start (the sync itself \
             {first_sync_duration_s:.2}s{}), {} nat rules, {} KUBE-SEP chains",
            if first_count > 1.0 {
                format!(", mean of {first_count} syncs")
            } else {
                String::new()
            },
            case.nat_rules_saved,
            case.kube_sep_chains
        );
        // Ours, plus the `kubernetes` Service's one endpoint (the API server).
        let expected_seps = n * self.args.endpoints + 1;
        if case.kube_sep_chains != expected_seps {
            eprintln!(
                "  NOTE: {} KUBE-SEP chains, expected {expected_seps}",
                case.kube_sep_chains
            );
        }

        // Updates, timed by kube-proxy's own network-programming metric.
        let mut latencies = Vec::new();
        let mut failed = 0;
        const NPL: &str = "kubeproxy_network_programming_duration_seconds";
        for k in 0..self.args.kube_proxy_updates {
            check_interrupted()?;
            let before = self.scrape()?;
            let (count0, sum0) = (
                before.get(&format!("{NPL}_count")),
                before.get(&format!("{NPL}_sum")),
            );
            let i = self.rng.below(n);
            let (_, started, _, write) =
                self.cluster.replace_endpoint(i, k % self.args.endpoints)?;
            self.cluster.finish_write(write)?;
            let seen = loop {
                let m = self.scrape()?;
                let (count, sum) = (m.get(&format!("{NPL}_count")), m.get(&format!("{NPL}_sum")));
                if count > count0 {
                    break Some((sum - sum0) / (count - count0) * 1e3);
                }
                if started.elapsed() >= KUBE_PROXY_UPDATE_TIMEOUT {
                    break None;
                }
                if !proxy.is_running() {
                    bail!(
                        "kube-proxy exited during the updates; see {}",
                        log.display()
                    );
                }
                std::thread::sleep(METRICS_POLL);
            };
            match seen {
                Some(ms) => latencies.push(ms),
                None => failed += 1,
            }
            // Past the rate limiter, so each change is timed on its own rather than waiting
            // for the previous sync's min-sync-period to run out.
            sleep(KUBE_PROXY_UPDATE_GAP)?;
        }
        case.updates = summarize(&latencies, failed, KUBE_PROXY_UPDATE_TIMEOUT);
        if self.args.kube_proxy_updates > 0 {
            eprintln!(
                "  updates (its network-programming metric): p50 {:.0} ms, p99 {:.0} ms, {} failed",
                case.updates.p50_ms, case.updates.p99_ms, failed
            );
        }
        let end = self.scrape()?;
        let hist = |name: &str| Histogram {
            count: end.get(&format!("{name}_count")),
            sum_s: end.get(&format!("{name}_sum")),
        };
        case.sync_proxy_rules_duration = hist("kubeproxy_sync_proxy_rules_duration_seconds");
        case.sync_full_proxy_rules_duration =
            hist("kubeproxy_sync_full_proxy_rules_duration_seconds");
        case.sync_partial_proxy_rules_duration =
            hist("kubeproxy_sync_partial_proxy_rules_duration_seconds");
        let mem = memory(pid)?;
        case.rss_mib = case.rss_mib.max(mem.vm_rss_mib).max(mem.vm_hwm_mib);
        case.memory = mem;
        proxy.finish()?;
        Ok(case)
    }
}

struct PerfGuard {
    child: std::process::Child,
}

impl Drop for PerfGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn targets(cases: &[AgentCase]) -> Vec<Target> {
    let at = cases.iter().find(|c| c.services == TARGET_SERVICES);
    let not_measured = || format!("{TARGET_SERVICES} services not measured (see --sizes)");
    let mut out = vec![
        match at {
            Some(c) => Target {
                name: "sync_10k",
                target: format!("full sync of {TARGET_SERVICES} Services <= {TARGET_SYNC_S} s after the list returns"),
                measured: Some(c.sync_s),
                met: Some(c.sync_s <= TARGET_SYNC_S && c.complete),
                detail: if c.complete {
                    format!("sync_s {:.3}", c.sync_s)
                } else {
                    format!("sync_s {:.3}, but incomplete: {}", c.sync_s, c.note.as_deref().unwrap_or(""))
                },
            },
            None => Target {
                name: "sync_10k",
                target: format!("<= {TARGET_SYNC_S} s"),
                measured: None,
                met: None,
                detail: not_measured(),
            },
        },
        match at {
            Some(c) => Target {
                name: "update_p99_10k",
                target: format!("p99 EndpointSlice write -> map <= {TARGET_P99_MS} ms at {TARGET_SERVICES} Services"),
                measured: Some(c.update_p99_ms),
                met: Some(c.update_p99_ms <= TARGET_P99_MS),
                detail: format!(
                    "p99 {:.2} ms over {} changes, {} failed",
                    c.update_p99_ms, c.updates.changes, c.updates.failed
                ),
            },
            None => Target {
                name: "update_p99_10k",
                target: format!("<= {TARGET_P99_MS} ms"),
                measured: None,
                met: None,
                detail: not_measured(),
            },
        },
    ];
    let worst = cases.iter().max_by(|a, b| a.rss_mib.total_cmp(&b.rss_mib));
    out.push(Target {
        name: "rss",
        target: format!("agent RSS <= {TARGET_RSS_MIB} MiB (every size)"),
        measured: worst.map(|c| c.rss_mib),
        met: worst.map(|c| c.rss_mib <= TARGET_RSS_MIB),
        detail: match worst {
            Some(c) => format!(
                "max {:.1} MiB at {} services (anon {:.1}, file {:.1}, shmem {:.1} MiB after the updates)",
                c.rss_mib,
                c.services,
                c.rss_after_updates.rss_anon_mib,
                c.rss_after_updates.rss_file_mib,
                c.rss_after_updates.rss_shmem_mib
            ),
            None => "no case measured".into(),
        },
    });
    out
}

fn print_tables(cases: &[AgentCase], proxy: &[KubeProxyCase], targets: &[Target]) {
    println!();
    println!(
        "lbx agent (real API server, {} endpoints per Service):",
        cases.first().map_or(0, |c| c.endpoints_per_service)
    );
    println!(
        "{:>8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>8} {:>7} {:>9}",
        "services",
        "maglev",
        "list_s",
        "sync_s",
        "ready_s",
        "upd_p50",
        "upd_p99",
        "upd_max",
        "api_p50",
        "api_p99",
        "failed",
        "rss_MiB",
        "anon_MiB",
        "cpu_s",
        "complete"
    );
    for c in cases {
        println!(
            "{:>8} {:>7} {:>8.3} {:>8.3} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>6} {:>8.1} {:>8.1} {:>7.2} {:>9}",
            c.services,
            c.maglev_size,
            c.list_s,
            c.sync_s,
            c.ready_wall_s,
            c.update_p50_ms,
            c.update_p99_ms,
            c.updates.max_ms,
            c.api_watch.p50_ms,
            c.api_watch.p99_ms,
            c.updates.failed,
            c.rss_mib,
            c.rss_after_updates.rss_anon_mib,
            c.cpu_s_to_sync,
            if c.complete { "yes" } else { "NO" }
        );
    }
    if !proxy.is_empty() {
        println!();
        println!("kube-proxy (iptables mode, same state, run alone after the agent):");
        println!(
            "{:>8} {:>8} {:>12} {:>12} {:>10} {:>10} {:>9} {:>9} {:>8}",
            "services",
            "iptables",
            "first_sync_s",
            "sync_dur_s",
            "nat_rules",
            "sep_chains",
            "upd_p50",
            "upd_p99",
            "rss_MiB"
        );
        for c in proxy {
            let (first, dur, nat, seps) = match (c.first_sync_s, c.first_sync_duration_s) {
                (Some(f), Some(d)) => (
                    format!("{f:.2}"),
                    format!("{d:.3}"),
                    c.nat_rules_saved.to_string(),
                    c.kube_sep_chains.to_string(),
                ),
                _ => (
                    format!(">{:.0}", c.timed_out_after_s.unwrap_or(0.0)),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
            };
            let ms = |v: f64| {
                if v.is_nan() {
                    "-".to_string()
                } else {
                    format!("{v:.0}")
                }
            };
            println!(
                "{:>8} {:>8} {:>12} {:>12} {:>10} {:>10} {:>9} {:>9} {:>8.1}",
                c.services,
                c.iptables_backend.name(),
                first,
                dur,
                nat,
                seps,
                ms(c.updates.p50_ms),
                ms(c.updates.p99_ms),
                c.rss_mib
            );
        }
    }
    println!();
    println!("targets:");
    for t in targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "not measured",
        };
        println!(
            "  {:<15} {:<13} {} ({})",
            t.name, verdict, t.target, t.detail
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn iptables_version() -> String {
    Command::new("iptables")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let bench_started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the agent benchmark needs root (namespaces, XDP, BPF maps): run it as root through `cargo xtask bench agent`");
    }
    ensure!(!args.sizes.is_empty(), "--sizes is empty");
    ensure!(args.endpoints >= 1, "--endpoints must be at least 1");
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    ensure!(sizes[0] >= 1, "sizes must be at least 1");
    ensure!(
        sizes.last().copied().unwrap_or(0) * args.endpoints < (1 << 22),
        "too many endpoints for the address plan (10.64.0.0/10)"
    );
    install_signal_handlers()?;

    // Binaries first: a missing one should cost nothing else.
    let k8s = controlplane::Binaries::locate().context("locating the Kubernetes binaries")?;
    let kube_proxy_bin = k8s
        .kubectl
        .parent()
        .map(|d| d.join("kube-proxy"))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "kube-proxy is not next to {}; build it with `cargo xtask k8s-build`",
                k8s.kubectl.display()
            )
        })?;
    eprintln!("building the agent (release) ...");
    let agent_bin = scenario::Binaries::locate()
        .context("building lb-user")?
        .agent;

    lb_user::bpf::bpffs::ensure(Path::new(PIN_ROOT)).context("mounting bpffs")?;
    scenario::cleanup_stale_pins();

    let logs = match &args.logs {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Logs {
                dir: dir.clone(),
                keep: true,
            }
        }
        None => {
            let dir = std::env::temp_dir().join(format!("lbx-bench-agent-{}", std::process::id()));
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Logs { dir, keep: false }
        }
    };

    eprintln!("building the lab (2 nodes, control namespace) ...");
    let topology = Topology::build(TopologySpec {
        nodes: 2,
        pods_per_node: vec![0, 0],
        control: true,
    })
    .context("building the lab")?;
    let ctl = topology
        .control_ns()
        .ok_or_else(|| anyhow!("the lab has no control namespace"))?
        .to_string();
    eprintln!("starting etcd, kube-apiserver and kube-controller-manager in {ctl} ...");
    let cp_started = Instant::now();
    let cp = ControlPlane::start(&ctl, CONTROL_ADDR).context("starting the control plane")?;
    eprintln!("  control plane up in {:.1?}", cp_started.elapsed());
    let cluster = Cluster::new(&cp, args.endpoints)?;

    let mut bench = Bench {
        args,
        topology,
        cp,
        cluster,
        agent_bin,
        kube_proxy_bin,
        logs,
        rng: Rng(0x9e37_79b9_7f4a_7c15),
        watching: false,
    };
    let result = measure(&mut bench, &sizes, bench_started);
    if result.is_err() {
        bench.logs.keep = true;
    }
    let report = result?;
    // Tear down (processes, namespaces) before writing, so a teardown problem shows first.
    let Bench {
        args,
        cluster,
        cp,
        topology,
        logs,
        ..
    } = bench;
    drop(cluster);
    drop(cp);
    drop(topology);
    drop(logs);

    let (cases, proxy, targets, creation) = report;
    print_tables(&cases, &proxy, &targets);
    let runtime_s = bench_started.elapsed().as_secs_f64();
    println!("\nruntime {runtime_s:.0} s");
    if let Some(path) = &args.json {
        let doc = json!({
            "cases": cases,
            "kube_proxy": {
                "mode": "iptables",
                "run": "alone, after the agent's case at the same size (the agent stopped first); one case per iptables backend (nft: Debian's default iptables 1.8.9; legacy: x_tables, selected by a PATH directory of links); rules removed with `kube-proxy --cleanup` between cases",
                "first_sync_timeout_s": args.kube_proxy_timeout,
                "iptables_version": iptables_version(),
                "flags": "--proxy-mode iptables --hostname-override n0 --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0 --iptables-localhost-nodeports=false (defaults otherwise: --iptables-min-sync-period 1s)",
                "min_sync_period_s": KUBE_PROXY_MIN_SYNC_S,
                "update_method": "kubeproxy_network_programming_duration_seconds: sum delta per change, measured from the endpoints.kubernetes.io/last-change-trigger-time annotation set just before the write; changes 1.1 s apart (past the min-sync-period rate limiter)",
                "cases": proxy,
            },
            "targets": targets,
            "method": {
                "services": "selector-less, type ClusterIP, one externalIP and one TCP port each (NodePort cannot reach 10 000: the node-port range holds 2 768 ports)",
                "endpoints": "one EndpointSlice per Service (our managed-by label), endpoints on the remote Node n1, which the agent forwards to by its InternalIP",
                "sync_s": "the agent's `lbx: synced ... sync_s=`: the three first lists returned -> the maps hold everything",
                "update": "sequential merge patches of one EndpointSlice replacing one endpoint address with a fresh one; clock from just before the write to the new address being a backend in the Service's Maglev ring",
                "poll": "FRONTENDS lookup (service slot) -> the ring read from a read-only mmap of the pinned MAGLEV map -> BACKENDS lookups of the distinct ids in it; through lb_user::bpf::maps::Maps",
                "poll_interval_us": args.poll_us,
                "update_timeout_s": UPDATE_TIMEOUT.as_secs_f64(),
                "failed_changes_count_as": "the timeout, in the percentiles",
                "rss": "max of VmRSS and VmHWM from /proc/<pid>/status after the sync and after the updates",
                "creation": creation,
            },
            "machine": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "kernel": kernel(),
            },
            "runtime_s": runtime_s,
        });
        let text = serde_json::to_string_pretty(&doc)? + "\n";
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

type Report = (
    Vec<AgentCase>,
    Vec<KubeProxyCase>,
    Vec<Target>,
    Vec<serde_json::Value>,
);

fn measure(bench: &mut Bench, sizes: &[usize], started: Instant) -> Result<Report> {
    let mut cases = Vec::new();
    let mut proxy = Vec::new();
    let mut creation = Vec::new();
    for &n in sizes {
        check_interrupted()?;
        let have = bench.cluster.services();
        eprintln!("creating Services {have}..{n} with their EndpointSlices ...");
        let t = Instant::now();
        let objects = bench.cluster.grow(n, bench.args.concurrency)?;
        let created_s = t.elapsed().as_secs_f64();
        if objects > 0 {
            creation.push(json!({
                "services_from": have,
                "services_to": n,
                "objects": objects,
                "seconds": created_s,
                "per_second": objects as f64 / created_s,
                "concurrency": bench.args.concurrency,
            }));
        }
        cases.push(bench.agent_case(n, created_s, objects)?);
        if !bench.args.no_kube_proxy {
            for backend in bench.args.kube_proxy_iptables.clone() {
                proxy.push(bench.kube_proxy_case(n, backend)?);
            }
        }
        eprintln!("  ({:.0} s so far)", started.elapsed().as_secs_f64());
    }
    let t = targets(&cases);
    Ok((cases, proxy, t, creation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_failures_count_as_the_timeout() {
        let ms: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&ms, 0, UPDATE_TIMEOUT);
        assert_eq!(
            (s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!((s.changes, s.failed), (100, 0));
        // Two lost changes of 100: p99 is the timeout, p50 is unchanged.
        let s = summarize(&ms[..98], 2, UPDATE_TIMEOUT);
        assert_eq!(s.p99_ms, 10_000.0);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.changes, 100);
        let empty = summarize(&[], 0, UPDATE_TIMEOUT);
        assert!(empty.p50_ms.is_nan() && empty.max_ms.is_nan());
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn maglev_size_follows_the_map_budget() {
        assert_eq!(auto_maglev_size(16), 16381);
        assert_eq!(auto_maglev_size(1000), 16381);
        assert_eq!(auto_maglev_size(4000), 4093);
        assert_eq!(auto_maglev_size(10_000), 1021);
        assert_eq!(auto_maglev_size(100_000), 1021);
    }

    #[test]
    fn address_plan_stays_in_its_ranges() {
        assert_eq!(external_ip(0), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(external_ip(9_999), Ipv4Addr::new(198, 18, 39, 16));
        assert_eq!(
            ip_of(ENDPOINT_BASE, 99_999),
            Ipv4Addr::new(10, 65, 134, 159)
        );
        assert_eq!(ip_of(FRESH_BASE, 0), Ipv4Addr::new(10, 128, 0, 0));
        assert_eq!(service_name(42), "svc-00042");
    }

    #[test]
    fn key_value_fields_parse() {
        let line = "lbx: synced services=3 service_ports=4 list_s=0.014 sync_s=0.159";
        let f = fields(line);
        assert_eq!(field_f64(&f, "sync_s", line).unwrap(), 0.159);
        assert_eq!(field_f64(&f, "services", line).unwrap(), 3.0);
        assert!(field_f64(&f, "rss", line).is_err());
    }
}
