//! `cargo xtask lab compare | up | down`: the side-by-side lab, the project's main job.
//!
//! One lab in network namespaces (see DESIGN.md, "The lab"): a client namespace acting as the
//! load balancer, N nodes on a shared subnet, pods behind each node with routable addresses,
//! the real control plane (etcd, kube-apiserver, kube-controller-manager) in the control
//! namespace, a real kube-proxy per node (iptables by default) and the lbx agent per node.
//! The scenario is the AWS Load Balancer Controller walkthrough's: Service `ui/ui-nlb`, type
//! LoadBalancer, port 80 -> targetPort 8080, selector `app.kubernetes.io/name=ui`, first 1
//! then `--replicas` (3) replicas spread over the nodes; `--services N` adds N-1 other
//! Services (an externalIP each, endpoints = the ui pods) so both kube-proxy and the agent
//! hold N Services.
//!
//! The same Service is reached three ways in one run:
//! - instance: client -> nodeIP:nodePort -> kube-proxy's rules -> pod (the Service carries
//!   `lbx.io/accelerate: "false"`, so the agents leave it to kube-proxy; their XDP program
//!   stays attached and passes the packets on);
//! - xdp: client -> nodeIP:nodePort -> the agents' XDP DNAT -> pod;
//! - ip: client -> podIP:8080 directly.
//!
//! `compare` measures every path (keep-alive and one-connection-per-request load, hops,
//! client IP, CPU, netfilter, conntrack, the target list), then sweeps the number of
//! Services, prints a table, writes `--json`/`--html`/`--svg-dir`, and tears everything
//! down, also on Ctrl-C or failure. `up` builds the same lab and keeps it until Ctrl-C or
//! `lab down`; `down` stops a running `up` (by the PID in its state file) and removes what
//! a killed run left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use lb_tests::controlplane::SERVICE_CIDR;
use lb_tests::kubelet;
use lb_tests::kubeproxy::{self, IptablesBackend, KubeProxy, KubeProxySpec, ProxyMode};
use lb_tests::netns;
use lb_tests::scenario::{
    self, Lab, LabSpec, NftProbe, PodId, LB_INGRESS_IP, TCP_NODE_PORT, TCP_SERVICE_PORT,
    TCP_TARGET_PORT,
};
use lb_tests::topology::TopologySpec;
use lbx_lab::loadgen::{self, HopProbe, LoadResult, LoadSpec, Mode};
use lbx_lab::report::{
    self as labreport, LabFootprint, LabReport, LbTarget, Meta, PathResult, SweepPoint,
    TargetCheck, PATHS,
};
use serde_json::json;

const UI_NS: &str = "ui";
const UI_SERVICE: &str = "ui-nlb";
const APP_LABEL: (&str, &str) = ("app.kubernetes.io/name", "ui");
/// The agent's per-Service opt-out annotation.
const ACCELERATE_ANNOTATION: &str = "lbx.io/accelerate";
/// Namespace of the extra Services of `--services` and the sweep.
const SCALE_NS: &str = "scale";
const MANAGED_BY: &str = "lbx-lab.lbx.io";
/// Extra Service i gets externalIP 198.18.0.0 + i + 1 (the benchmarking range, RFC 2544).
const EXTERNAL_IP_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Each path's load comes from its own client address (added to the client namespace), so
/// no TCP tuple is shared between paths: a port reused across paths within seconds would
/// meet the pod's TIME_WAIT (with another path's timestamps) or a closing flow of lbx.
fn path_source(path: &str) -> Ipv4Addr {
    match path {
        "instance" => Ipv4Addr::new(10, 77, 0, 101),
        "xdp" => Ipv4Addr::new(10, 77, 0, 102),
        _ => Ipv4Addr::new(10, 77, 0, 103),
    }
}

/// `lab up` records itself here; `lab down` reads it.
const STATE_FILE: &str = "/run/lbx/lab-up.json";

/// How long the data plane may take to follow a change (API write, agents, kube-proxy).
const CONVERGE: Duration = Duration::from_secs(60);
/// How long kube-proxy and the agents may take to sync after the Services grew.
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the lab down");
    }
    Ok(())
}

/// Sleeps in short slices so an interrupt is noticed.
fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    Ok(())
}

#[derive(Parser)]
#[command(about = "instance mode (kube-proxy) vs the lbx XDP path vs ip mode, side by side")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the lab, measure the three paths and the Service sweep, report, tear down.
    Compare(CompareArgs),
    /// Build the lab and keep it until Ctrl-C or `lab down`.
    Up(LabArgs),
    /// Stop a running `lab up` and remove what killed runs left behind.
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Iptables,
    Nftables,
    Ipvs,
}

#[derive(Args, Clone, Debug)]
struct LabArgs {
    /// Worker nodes.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Replicas of ui/ui-nlb after the 1-replica check, spread over the nodes.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Services in the cluster during the path measurements (ui-nlb plus N-1 others).
    #[arg(long, default_value_t = 1)]
    services: usize,
    /// kube-proxy's --proxy-mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Iptables)]
    kube_proxy_mode: ModeArg,
    /// The iptables kube-proxy runs in iptables mode: legacy (x_tables) or nft (Debian's
    /// default `iptables`, much slower to sync 10 000 Services).
    #[arg(long, value_enum, default_value_t = IptablesBackend::Legacy)]
    iptables_backend: IptablesBackend,
    /// The agents' `--snat-ports`. Default: every port, as their SNAT address is their own
    /// (a closed flow's port stays taken for 120 s, so thousands of new connections per
    /// second need more than the agent's default 4 536). A small range shows what happens
    /// when they run out: those SYNs are the kernel's (`pass_snat_exhausted`).
    #[arg(long, default_value = "1024-65535", value_name = "MIN-MAX")]
    snat_ports: String,
}

#[derive(Args, Clone, Debug)]
struct CompareArgs {
    #[command(flatten)]
    lab: LabArgs,
    /// Numbers of Services for the sweep (ascending; sizes below --services are skipped).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    sweep: Vec<usize>,
    /// Seconds of measured load per path and kind of load.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of measured new-connection load per path, sweep size and round.
    #[arg(long, default_value_t = 3.0)]
    sweep_duration: f64,
    /// Rounds per sweep size (the paths take turns in each; the point is the median).
    #[arg(long, default_value_t = 3)]
    sweep_rounds: usize,
    /// Seconds of unrecorded load before each measurement.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Concurrent client connections (threads).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report with SVG plots.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Also write the three plots as standalone SVG files into this directory.
    #[arg(long, value_name = "DIR")]
    svg_dir: Option<PathBuf>,
}

impl LabArgs {
    fn mode(&self) -> ProxyMode {
        match self.kube_proxy_mode {
            ModeArg::Iptables => ProxyMode::Iptables(self.iptables_backend),
            ModeArg::Nftables => ProxyMode::Nftables,
            ModeArg::Ipvs => ProxyMode::Ipvs,
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            (1..=8).contains(&self.nodes),
            "--nodes must be 1..=8, got {}",
            self.nodes
        );
        ensure!(
            (1..=32).contains(&self.replicas),
            "--replicas must be 1..=32, got {}",
            self.replicas
        );
        ensure!(
            (1..=20_000).contains(&self.services),
            "--services must be 1..=20000, got {}",
            self.services
        );
        if self.kube_proxy_mode == ModeArg::Ipvs {
            ensure!(
                Path::new("/proc/net/ip_vs").exists(),
                "--kube-proxy-mode ipvs needs the kernel's IPVS (CONFIG_IP_VS, module ip_vs), \
                 and this kernel has none (/proc/net/ip_vs is missing): load it with \
                 `modprobe ip_vs` or use iptables or nftables"
            );
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    install_signal_handlers();
    let result = match Cli::parse().command {
        Command::Compare(args) => compare(args),
        Command::Up(args) => up(args),
        Command::Down => down(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbx-lab: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Timestamped progress lines on stderr.
struct Progress {
    start: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            start: Instant::now(),
        }
    }

    fn step(&self, msg: impl Display) {
        eprintln!("[{:>7.1}s] {msg}", self.start.elapsed().as_secs_f64());
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster: lab + kube-proxy + the ui scenario

/// One extra Service and where kube-proxy and the agents expose it.
struct Extra {
    cluster_ip: Ipv4Addr,
    external_ip: Ipv4Addr,
}

/// The lab with kube-proxy and the scenario's objects. Field order is drop order: the
/// kube-proxies (whose `--cleanup` needs the node namespaces) go before the lab.
struct Cluster {
    proxies: Vec<KubeProxy>,
    lab: Lab,
    args: LabArgs,
    /// The ui pods, in the order they were started.
    replicas: Vec<PodId>,
    extras: Vec<Extra>,
    /// Holds BPF run-time statistics on (BPF_ENABLE_STATS) while it lives.
    _bpf_stats: Option<OwnedFd>,
    /// BPF program ids attached in the node namespaces (ours: XDP on eth0, TC on pod veths).
    prog_ids: Vec<u32>,
    notes: Vec<String>,
}

/// The largest Maglev ring (prime) whose MAGLEV map for `max_services` stays within 64 MiB.
fn auto_maglev_size(max_services: usize) -> usize {
    const LIMIT: usize = 64 << 20;
    [16381usize, 4093, 1021]
        .into_iter()
        .find(|&m| m * max_services * 4 <= LIMIT)
        .unwrap_or(1021)
}

/// Replica k lives on node k % nodes as that node's pod k / nodes.
fn replica_pod(k: usize, nodes: usize) -> PodId {
    PodId::new(k % nodes, k / nodes)
}

fn external_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(EXTERNAL_IP_BASE + 1 + i as u32)
}

/// bpf(BPF_ENABLE_STATS, BPF_STATS_RUN_TIME): run-time statistics stay on while the fd is
/// open and go off when it closes (also when this process dies), unlike the sysctl.
fn enable_bpf_stats() -> std::io::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr = [0u32; 32]; // enable_stats.type = BPF_STATS_RUN_TIME (0); the rest zero
                           // SAFETY: bpf(2) with a zeroed attribute buffer of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A load starts when the machine was at most this busy (fraction of all cores) over the
/// last [`QUIET_WINDOW`]...
const QUIET_BUSY: f64 = 0.5;
const QUIET_WINDOW: Duration = Duration::from_millis(500);
/// ... or after this long regardless (the note in the report says how long each waited).
const QUIET_MAX: Duration = Duration::from_secs(15);

/// Waits until the machine is quiet (see [`QUIET_BUSY`]): the kube-proxies and agents are
/// done with what the last change made them do. Returns how long it waited.
fn wait_quiet() -> Result<Duration> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let started = Instant::now();
    loop {
        let b0 = cpu_busy_s()?;
        sleep(QUIET_WINDOW)?;
        let busy = (cpu_busy_s()? - b0) / QUIET_WINDOW.as_secs_f64() / cores;
        if busy <= QUIET_BUSY || started.elapsed() >= QUIET_MAX {
            return Ok(started.elapsed());
        }
    }
}

/// Busy CPU time of the whole machine (user, nice, system, irq, softirq, steal) in seconds.
fn cpu_busy_s() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() >= 8, "short cpu line in /proc/stat: {line:?}");
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 / hz)
}

impl Cluster {
    fn start(args: &LabArgs, max_services: usize, progress: &Progress) -> Result<Cluster> {
        args.validate()?;
        let pods_per_node = args.replicas.div_ceil(args.nodes).max(1);
        let maglev = auto_maglev_size(max_services);
        let spec = LabSpec {
            topology: TopologySpec::uniform(args.nodes, pods_per_node),
            control_plane: true,
            quiet: true,
            // kube-proxy masquerades to the node address with random ports: the agents SNAT
            // to an address of their own, so the two can never pick the same tuple.
            dedicated_snat: true,
            agent_args: vec![
                "--max-services".into(),
                max_services.to_string(),
                "--maglev-size".into(),
                maglev.to_string(),
                "--snat-ports".into(),
                args.snat_ports.clone(),
            ],
            ..LabSpec::default()
        };
        progress.step(format!(
            "building the lab: {} nodes x {pods_per_node} pods, control plane, agents \
             (--max-services {max_services} --maglev-size {maglev})",
            args.nodes
        ));
        let lab = Lab::start(spec).context("starting the lab")?;
        progress.step(format!("lab {} is up", lab.prefix()));
        let t = lab.topology();
        // The load generator opens tens of thousands of connections: reuse TIME_WAIT ports.
        netns::sysctls(
            t.client_ns(),
            &[
                ("net/ipv4/tcp_tw_reuse", "1"),
                ("net/ipv4/ip_local_port_range", "1024 65535"),
            ],
        )
        .context("client sysctls")?;
        for path in PATHS {
            let addr = format!("{}/32", path_source(path));
            netns::ip(&["-n", t.client_ns(), "addr", "add", &addr, "dev", "eth0"])
                .with_context(|| format!("adding the {path} client address"))?;
        }
        for node in 0..lab.node_count() {
            let ns = t.node_ns(node);
            // Service ClusterIPs go out through eth0 (a real node's default route does
            // that), so the lab can check kube-proxy's rules from the node itself.
            netns::ip(&["-n", ns, "route", "add", SERVICE_CIDR, "dev", "eth0"])
                .context("routing the Service CIDR in the node namespace")?;
        }
        let mut cluster = Cluster {
            proxies: Vec::new(),
            lab,
            args: args.clone(),
            replicas: Vec::new(),
            extras: Vec::new(),
            _bpf_stats: None,
            prog_ids: Vec::new(),
            notes: Vec::new(),
        };
        cluster.start_kube_proxies(progress)?;
        match enable_bpf_stats() {
            Ok(fd) => cluster._bpf_stats = Some(fd),
            Err(e) => cluster
                .notes
                .push(format!("BPF run-time statistics unavailable: {e}")),
        }
        cluster.prog_ids = cluster.attached_programs()?;
        Ok(cluster)
    }

    fn start_kube_proxies(&mut self, progress: &Progress) -> Result<()> {
        let mode = self.args.mode();
        let cp = self.lab.control_plane()?;
        let bin = cp.binaries().kubectl.with_file_name("kube-proxy");
        ensure!(
            bin.is_file(),
            "kube-proxy is not next to {}; build it with `cargo xtask k8s-build`",
            cp.binaries().kubectl.display()
        );
        let kubeconfig = cp.kubeconfig().to_path_buf();
        progress.step(format!(
            "starting kube-proxy ({}) in every node namespace",
            mode.label()
        ));
        for node in 0..self.lab.node_count() {
            let spec = KubeProxySpec {
                bin: bin.clone(),
                kubeconfig: kubeconfig.clone(),
                node_name: scenario::node_name(node),
                ns: self.lab.topology().node_ns(node).to_string(),
                mode,
                work_dir: self.lab.workdir().to_path_buf(),
                log: self.lab.workdir().join(format!("kube-proxy-n{node}.log")),
                verbosity: 1,
            };
            self.proxies.push(KubeProxy::start(&spec)?);
        }
        let started = Instant::now();
        for node in 0..self.proxies.len() {
            loop {
                check_interrupted()?;
                if !self.proxies[node].is_running() {
                    bail!(
                        "kube-proxy of n{node} exited:\n{}",
                        self.log_tail(&format!("kube-proxy-n{node}.log"))
                    );
                }
                let synced = self.proxies[node].metrics().ok().is_some_and(|m| {
                    m.get("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0
                });
                if synced {
                    break;
                }
                if started.elapsed() > CONVERGE {
                    bail!(
                        "kube-proxy of n{node} did not finish a sync within {CONVERGE:?}:\n{}",
                        self.log_tail(&format!("kube-proxy-n{node}.log"))
                    );
                }
                sleep(Duration::from_millis(100))?;
            }
        }
        progress.step(format!(
            "kube-proxy synced on every node ({:.1}s)",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.lab.workdir().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Tails of every agent and kube-proxy log, for a failure.
    fn logs(&self) -> String {
        let mut out = String::new();
        for node in 0..self.lab.node_count() {
            if let Some(p) = self.lab.agent_log(node) {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                out += &format!("--- {name} ---\n{}\n", self.log_tail(&name));
            }
            let name = format!("kube-proxy-n{node}.log");
            out += &format!("--- {name} ---\n{}\n", self.log_tail(&name));
        }
        out
    }

    /// Ids of the BPF programs attached in the node namespaces (`bpftool net show` there).
    fn attached_programs(&self) -> Result<Vec<u32>> {
        let mut ids = BTreeSet::new();
        for node in 0..self.lab.node_count() {
            let ns = self.lab.topology().node_ns(node);
            let out = netns::run(ns, &["bpftool", "-j", "net", "show"])
                .with_context(|| format!("bpftool net show in {ns}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&out).context("parsing bpftool net show")?;
            collect_ids(&v, &mut ids);
        }
        ensure!(
            !ids.is_empty(),
            "no BPF program is attached in the node namespaces: are the agents running?"
        );
        Ok(ids.into_iter().collect())
    }

    /// Sum of run_time_ns and run_cnt over our programs.
    fn bpf_run_time(&self) -> Result<(u64, u64)> {
        let out = netns::output(std::process::Command::new("bpftool").args(["-j", "prog", "show"]))
            .context("bpftool prog show")?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing bpftool output")?;
        let mut ns = 0;
        let mut cnt = 0;
        for p in v.as_array().into_iter().flatten() {
            let id = p["id"].as_u64().unwrap_or(0) as u32;
            if self.prog_ids.contains(&id) {
                ns += p["run_time_ns"].as_u64().unwrap_or(0);
                cnt += p["run_cnt"].as_u64().unwrap_or(0);
            }
        }
        Ok((ns, cnt))
    }

    fn kube<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(kube::Client) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        Ok(self.lab.kube(f)?)
    }

    /// Namespace ui, Service ui-nlb with its LoadBalancer ingress IP (we play the cloud
    /// controller; the client routes that IP to node 0).
    fn create_ui_service(&self) -> Result<()> {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": UI_SERVICE, "namespace": UI_NS, "labels": {APP_LABEL.0: APP_LABEL.1}},
            "spec": {
                "type": "LoadBalancer",
                "selector": {APP_LABEL.0: APP_LABEL.1},
                "ports": [{
                    "name": "http", "protocol": "TCP", "port": TCP_SERVICE_PORT,
                    "targetPort": TCP_TARGET_PORT, "nodePort": TCP_NODE_PORT,
                }],
            }
        }))?;
        self.kube(|c| async move {
            kubelet::create_namespace(&c, UI_NS).await?;
            kubelet::create_namespace(&c, SCALE_NS).await?;
            let api = Api::<Service>::namespaced(c, UI_NS);
            api.create(&PostParams::default(), &svc).await?;
            let status =
                json!({"status": {"loadBalancer": {"ingress": [{"ip": LB_INGRESS_IP.to_string()}]}}});
            api.patch_status(UI_SERVICE, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            Ok::<_, anyhow::Error>(())
        })?
        .context("creating Service ui/ui-nlb")
    }

    /// Scales ui to `n` replicas (adds Pods, reports them Ready like a kubelet).
    fn scale_to(&mut self, n: usize) -> Result<()> {
        while self.replicas.len() < n {
            let pod = replica_pod(self.replicas.len(), self.args.nodes);
            let (name, node) = (pod.to_string(), pod.node_name());
            let ip = self.lab.pod_addr(pod)?;
            self.kube(|c| async move {
                kubelet::create_pod(&c, UI_NS, &name, &node, &[APP_LABEL]).await?;
                kubelet::set_pod_ready(&c, UI_NS, &name, ip, true).await
            })?
            .with_context(|| format!("starting pod {pod}"))?;
            self.replicas.push(pod);
        }
        Ok(())
    }

    fn replica_set(&self) -> BTreeSet<String> {
        self.replicas.iter().map(ToString::to_string).collect()
    }

    /// Sets or clears the opt-out annotation and waits until every agent holds (or has
    /// dropped) the nodePort frontend with every replica, and node 0 answers through it.
    fn set_accelerated(&self, on: bool) -> Result<()> {
        let value = if on {
            serde_json::Value::Null
        } else {
            json!("false")
        };
        let patch = json!({"metadata": {"annotations": {ACCELERATE_ANNOTATION: value}}});
        self.kube(|c| async move {
            Api::<Service>::namespaced(c, UI_NS)
                .patch(UI_SERVICE, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        })?
        .context("annotating ui/ui-nlb")?;
        let want: BTreeSet<Ipv4Addr> = self
            .replicas
            .iter()
            .map(|p| self.lab.pod_addr(*p))
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        loop {
            check_interrupted()?;
            let mut ok = true;
            for node in 0..self.lab.node_count() {
                let held = self.node_port_backends(node)?;
                ok &= if on {
                    held.as_ref() == Some(&want)
                } else {
                    held.is_none()
                };
            }
            if ok {
                let replicas = self.replica_set();
                return self.wait_answered_by(&self.node_targets(), &replicas);
            }
            if started.elapsed() > CONVERGE {
                bail!(
                    "the agents did not {} ui-nlb's nodePort within {CONVERGE:?}\n{}",
                    if on { "program" } else { "drop" },
                    self.logs()
                );
            }
            sleep(Duration::from_millis(100))?;
        }
    }

    /// ui-nlb's `*:nodePort` frontend as `lb-user targets` prints it for node `node`; None
    /// when the agent holds no such frontend.
    fn node_port_frontend(&self, node: usize) -> Result<Option<serde_json::Value>> {
        let v = self.lab.targets(node)?;
        Ok(v["frontends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["address"] == "*" && f["port"] == TCP_NODE_PORT)
            .cloned())
    }

    /// The healthy backends of the `*:nodePort` frontend in node `node`'s maps; None when
    /// the agent holds no such frontend.
    fn node_port_backends(&self, node: usize) -> Result<Option<BTreeSet<Ipv4Addr>>> {
        let Some(fe) = self.node_port_frontend(node)? else {
            return Ok(None);
        };
        Ok(Some(
            fe["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["state"] == "healthy")
                .filter_map(|t| t["backend"].as_str()?.parse::<SocketAddrV4>().ok())
                .map(|a| *a.ip())
                .collect(),
        ))
    }

    /// nodeIP:nodePort of every node (how instance and xdp are reached).
    fn node_targets(&self) -> Vec<SocketAddrV4> {
        (0..self.lab.node_count())
            .map(|i| SocketAddrV4::new(self.lab.node_addr(i), TCP_NODE_PORT))
            .collect()
    }

    /// podIP:targetPort of every replica (how ip mode is reached).
    fn pod_targets(&self) -> Result<Vec<SocketAddrV4>> {
        self.replicas
            .iter()
            .map(|p| Ok(SocketAddrV4::new(self.lab.pod_addr(*p)?, TCP_TARGET_PORT)))
            .collect()
    }

    /// Polls until new connections to every target together are answered by exactly `want`.
    fn wait_answered_by(&self, targets: &[SocketAddrV4], want: &BTreeSet<String>) -> Result<()> {
        let started = Instant::now();
        let mut last = String::from("nothing tried yet");
        while started.elapsed() < CONVERGE {
            check_interrupted()?;
            let mut seen = BTreeSet::new();
            let mut failed = None;
            for t in targets {
                match self
                    .lab
                    .http_flows(*t.ip(), t.port(), 6 * want.len().max(1))
                {
                    Ok(answers) => seen.extend(answers.iter().map(|a| a.pod.to_string())),
                    Err(e) => failed = Some(format!("{t}: {e}")),
                }
            }
            if failed.is_none() && &seen == want {
                return Ok(());
            }
            last = failed.unwrap_or_else(|| format!("answered by {seen:?}"));
            sleep(Duration::from_millis(200))?;
        }
        bail!(
            "new connections to {targets:?} should be answered by {want:?} within \
             {CONVERGE:?}; last: {last}\n{}",
            self.logs()
        )
    }

    /// The one-replica check: every path answers with the one pod; notes what it saw.
    fn one_replica_check(&mut self) -> Result<()> {
        let pod = self.replicas[0];
        let pod_ip = self.lab.pod_addr(pod)?;
        let mut seen = Vec::new();
        for (path, accelerate) in [("xdp", true), ("instance", false)] {
            self.set_accelerated(accelerate)?;
            for node in 0..self.lab.node_count() {
                let a = self.lab.http_get(self.lab.node_addr(node), TCP_NODE_PORT)?;
                seen.push(format!(
                    "{path} via n{node}: {} saw {}",
                    a.pod,
                    a.client_seen.ip()
                ));
            }
        }
        self.set_accelerated(true)?;
        let a = self.lab.http_get(pod_ip, TCP_TARGET_PORT)?;
        seen.push(format!("ip: {} saw {}", a.pod, a.client_seen.ip()));
        self.notes
            .push(format!("1 replica ({pod}): {}", seen.join("; ")));
        Ok(())
    }

    /// Grows the extra Services (namespace `scale`) until the cluster holds `total`
    /// Services, then waits until kube-proxy and every agent hold the last one.
    fn grow_services(&mut self, total: usize, progress: &Progress) -> Result<()> {
        let want = total.saturating_sub(1);
        if self.extras.len() >= want {
            return Ok(());
        }
        let endpoints: Vec<(Ipv4Addr, String)> = self
            .replicas
            .iter()
            .map(|p| Ok((self.lab.pod_addr(*p)?, p.node_name())))
            .collect::<Result<_>>()?;
        let from = self.extras.len();
        progress.step(format!(
            "creating Services {} to {want} (namespace {SCALE_NS}, an externalIP and the ui pods as endpoints each)",
            from + 1
        ));
        let started = Instant::now();
        // All but the last in parallel; the last alone, so once kube-proxy and the agents
        // have it they have seen every earlier one (watch events come in order).
        let bulk: Vec<usize> = (from..want.saturating_sub(1)).collect();
        let mut made = self.create_extras(bulk, &endpoints, 32)?;
        made.extend(self.create_extras(vec![want - 1], &endpoints, 1)?);
        made.sort_by_key(|(i, _)| *i);
        self.extras.extend(made.into_iter().map(|(_, e)| e));
        progress.step(format!(
            "created {} Services in {:.1}s; waiting for kube-proxy and the agents",
            want - from,
            started.elapsed().as_secs_f64()
        ));
        let last = self.extras.last().expect("grew by at least one");
        let (cluster_ip, external_ip) = (last.cluster_ip, last.external_ip);
        let synced = Instant::now();
        loop {
            check_interrupted()?;
            if self.all_hold(cluster_ip, external_ip)? {
                break;
            }
            if synced.elapsed() > SYNC_TIMEOUT {
                bail!(
                    "kube-proxy and the agents did not all program Service {want} within \
                     {SYNC_TIMEOUT:?}\n{}",
                    self.logs()
                );
            }
            sleep(Duration::from_millis(500))?;
        }
        progress.step(format!(
            "{total} Services programmed by kube-proxy and the agents ({:.1}s after the last write)",
            synced.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Whether every agent holds `external_ip` and every node's kube-proxy answers on
    /// `cluster_ip` (a connection from the node itself, through its OUTPUT rules).
    fn all_hold(&self, cluster_ip: Ipv4Addr, external_ip: Ipv4Addr) -> Result<bool> {
        for node in 0..self.lab.node_count() {
            let v = self.lab.targets(node)?;
            let held = v["frontends"].as_array().into_iter().flatten().any(|f| {
                f["address"] == external_ip.to_string() && f["backend_count"].as_u64() > Some(0)
            });
            if !held {
                return Ok(false);
            }
            let ns = self.lab.topology().node_ns(node);
            let addr = std::net::SocketAddr::from((cluster_ip, TCP_SERVICE_PORT));
            let reached = netns::in_netns(ns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
            })?;
            if !reached {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn create_extras(
        &self,
        indices: Vec<usize>,
        endpoints: &[(Ipv4Addr, String)],
        concurrency: usize,
    ) -> Result<Vec<(usize, Extra)>> {
        let endpoints_json: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(ip, node)| {
                json!({"addresses": [ip.to_string()], "nodeName": node,
                       "conditions": {"ready": true, "serving": true, "terminating": false}})
            })
            .collect();
        self.kube(|c| async move {
            let services = Api::<Service>::namespaced(c.clone(), SCALE_NS);
            let slices = Api::<EndpointSlice>::namespaced(c, SCALE_NS);
            let total = indices.len();
            let started = Instant::now();
            let mut stream = futures::stream::iter(indices)
                .map(|i| {
                    let (services, slices) = (services.clone(), slices.clone());
                    let endpoints = endpoints_json.clone();
                    async move {
                        let name = format!("svc-{i:05}");
                        let svc: Service = serde_json::from_value(json!({
                            "metadata": {"name": name, "namespace": SCALE_NS},
                            "spec": {"type": "ClusterIP", "externalIPs": [external_ip(i).to_string()],
                                     "ports": [{"name": "http", "port": TCP_SERVICE_PORT,
                                                "targetPort": TCP_TARGET_PORT, "protocol": "TCP"}]}
                        }))?;
                        let slice: EndpointSlice = serde_json::from_value(json!({
                            "metadata": {"name": format!("{name}-lab"), "namespace": SCALE_NS,
                                         "labels": {"kubernetes.io/service-name": name,
                                                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
                            "addressType": "IPv4",
                            "ports": [{"name": "http", "port": TCP_TARGET_PORT, "protocol": "TCP"}],
                            "endpoints": endpoints,
                        }))?;
                        let svc = create_retrying(&services, &svc).await?;
                        create_retrying(&slices, &slice).await?;
                        let cluster_ip = svc
                            .spec
                            .and_then(|s| s.cluster_ip)
                            .ok_or_else(|| anyhow!("Service {name} has no clusterIP"))?
                            .parse::<Ipv4Addr>()?;
                        Ok::<_, anyhow::Error>((i, Extra { cluster_ip, external_ip: external_ip(i) }))
                    }
                })
                .buffer_unordered(concurrency.max(1));
            let mut out = Vec::with_capacity(total);
            let mut last_report = Instant::now();
            while let Some(r) = stream.next().await {
                out.push(r?);
                check_interrupted()?;
                if last_report.elapsed() > Duration::from_secs(10) {
                    last_report = Instant::now();
                    eprintln!(
                        "           created {}/{total} Services ({:.0}/s)",
                        out.len(),
                        out.len() as f64 / started.elapsed().as_secs_f64()
                    );
                }
            }
            Ok(out)
        })?
    }

    // -----------------------------------------------------------------------------------------
    // Measuring one path

    fn targets_of(&self, path: &str) -> Result<Vec<SocketAddrV4>> {
        match path {
            "ip" => self.pod_targets(),
            _ => Ok(self.node_targets()),
        }
    }

    fn node_of_addr(&self, ip: Ipv4Addr) -> Option<usize> {
        (0..self.lab.node_count()).find(|&i| self.lab.node_addr(i) == ip)
    }

    fn pod_node(&self, pod: &str) -> Option<usize> {
        pod.parse::<PodId>().ok().map(|p| p.node)
    }

    fn load(&self, spec: LoadSpec) -> Result<LoadResult> {
        check_interrupted()?;
        Ok(self.lab.in_client(|| loadgen::run(&spec))??)
    }

    /// The targets a load balancer registers for `path`, with their health.
    fn lb_targets(&self, path: &str) -> Result<Vec<LbTarget>> {
        let mut out = Vec::new();
        match path {
            "instance" => {
                for node in 0..self.lab.node_count() {
                    // Like an NLB's TCP health check of the node's nodePort.
                    let addr =
                        std::net::SocketAddr::from((self.lab.node_addr(node), TCP_NODE_PORT));
                    let up = self.lab.in_client(|| {
                        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                    })?;
                    out.push(LbTarget {
                        id: self.lab.node_addr(node).to_string(),
                        port: TCP_NODE_PORT,
                        state: if up { "healthy" } else { "unhealthy" }.into(),
                        description: format!(
                            "node n{node} InternalIP (TCP health check from the client)"
                        ),
                    });
                }
            }
            "ip" => {
                let slices = self.kube(|c| async move {
                    Api::<EndpointSlice>::namespaced(c, UI_NS)
                        .list(
                            &ListParams::default()
                                .labels(&format!("kubernetes.io/service-name={UI_SERVICE}")),
                        )
                        .await
                })??;
                for s in slices {
                    for e in s.endpoints {
                        let c = e.conditions.unwrap_or_default();
                        let state = match (c.ready, c.serving, c.terminating) {
                            (Some(true), _, _) => "healthy",
                            (_, Some(true), Some(true)) => "draining",
                            _ => "unhealthy",
                        };
                        let pod = e.target_ref.and_then(|r| r.name).unwrap_or_default();
                        for a in e.addresses {
                            out.push(LbTarget {
                                id: a,
                                port: TCP_TARGET_PORT,
                                state: state.into(),
                                description: format!(
                                    "pod {pod} on {} (EndpointSlice conditions)",
                                    e.node_name.clone().unwrap_or_default()
                                ),
                            });
                        }
                    }
                }
            }
            _ => {
                // What the XDP path forwards to, per node: pod:port (lb-user targets).
                for node in 0..self.lab.node_count() {
                    let Some(fe) = self.node_port_frontend(node)? else {
                        continue;
                    };
                    for t in fe["targets"].as_array().into_iter().flatten() {
                        let Some(b) = t["backend"]
                            .as_str()
                            .and_then(|b| b.parse::<SocketAddrV4>().ok())
                        else {
                            continue;
                        };
                        out.push(LbTarget {
                            id: b.ip().to_string(),
                            port: b.port(),
                            state: t["state"].as_str().unwrap_or("unknown").into(),
                            description: format!(
                                "via n{node}:{TCP_NODE_PORT}, {} pod, {:.1}% of new flows (lb-user targets)",
                                t["location"].as_str().unwrap_or("?"),
                                t["share_pct"].as_f64().unwrap_or(0.0)
                            ),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Routers per pod by TTL probing every target of `path`: (local, remote) maxima.
    fn hops(&self, path: &str) -> Result<(Option<u32>, Option<u32>)> {
        let mut local: Option<u32> = None;
        let mut remote: Option<u32> = None;
        for target in self.targets_of(path)? {
            // A pod target is one pod; a node target reaches every replica (Cluster policy).
            let pods = if path == "ip" { 1 } else { self.replicas.len() };
            let probe = HopProbe {
                source: Some(path_source(path)),
                target,
                max_ttl: 6,
                tries: 4 * pods,
                // A pod with a 1/3 share is missed at its TTL with (2/3)^48 < 1e-8; with one
                // round per TTL it was (2/3)^12 = 0.8%, and a CI run failed on it (a local
                // pod counted 2 hops away).
                rounds: 4,
                pods,
                timeout: Duration::from_millis(400),
            };
            let found = self.lab.in_client(|| loadgen::probe_hops(&probe))??;
            ensure!(
                !found.is_empty(),
                "no pod answered the hop probe to {target}"
            );
            for (pod, ttl) in found {
                let hops = u32::from(ttl) - 1;
                let is_local =
                    path == "ip" || self.node_of_addr(*target.ip()) == self.pod_node(&pod);
                let slot = if is_local { &mut local } else { &mut remote };
                *slot = Some(slot.map_or(hops, |h| h.max(hops)));
            }
        }
        Ok((local, remote))
    }

    /// (rules installed, sum of rule packet counters) over every node's kube-proxy rules.
    fn nf_stats(&self) -> Result<(u64, u64)> {
        let mut rules = 0;
        let mut packets = 0;
        for p in &self.proxies {
            let dump = p.ruleset()?;
            let (r, n) = match p.mode() {
                ProxyMode::Nftables => kubeproxy::nft_rule_stats(&dump),
                _ => kubeproxy::iptables_rule_stats(&dump),
            };
            rules += r;
            packets += n;
        }
        Ok((rules, packets))
    }

    /// lbx's reason counters summed over the nodes.
    fn xdp_reasons(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for node in 0..self.lab.node_count() {
            for (k, v) in self.lab.counters(node)? {
                *out.entry(k).or_default() += v;
            }
        }
        Ok(out)
    }

    /// Conntrack entries in the node namespaces whose original source is one of `sources`
    /// (a path's client address, or an address the client's packets were NATed to). The
    /// tables are never flushed: netfilter's TIME_WAIT entries are what keeps its NAT from
    /// reusing a tuple the pod still holds in TIME_WAIT.
    fn conntrack_count(&self, sources: &[Ipv4Addr]) -> Result<u64> {
        let mut total = 0;
        for node in 0..self.lab.node_count() {
            let ns = self.lab.topology().node_ns(node);
            for src in sources {
                // Fails when conntrack is not loaded in the namespace: nothing tracked then.
                if let Ok(out) = netns::run(ns, &["conntrack", "-L", "-s", &src.to_string()]) {
                    total += out.lines().filter(|l| !l.trim().is_empty()).count() as u64;
                }
            }
        }
        Ok(total)
    }

    fn measure_path(&self, path: &str, c: &CompareArgs, progress: &Progress) -> Result<PathResult> {
        let targets = self.targets_of(path)?;
        let description = match path {
            "instance" => "client -> nodeIP:nodePort -> kube-proxy rules (DNAT, SNAT) -> pod; ui-nlb opted out of lbx",
            "xdp" => "client -> nodeIP:nodePort -> lbx XDP DNAT -> pod (SNAT + forward for a pod on another node)",
            _ => "client -> podIP:8080 (routed via the pod's node)",
        };
        let mut r = PathResult {
            description: description.into(),
            ..PathResult::default()
        };
        progress.step(format!("{path}: target list and hop probe"));
        r.targets = self.lb_targets(path)?;
        let (local, remote) = self.hops(path)?;
        r.hops_local = local;
        r.hops_remote = remote;
        r.hops = local.max(remote).unwrap_or(0);

        let source = path_source(path);
        // The path's client address and the agents' SNAT addresses: a remote xdp delivery
        // reaches the owning node from the latter, and counts there if netfilter sees it.
        let probe_sources: Vec<Ipv4Addr> = std::iter::once(source)
            .chain((0..self.lab.node_count()).map(|n| self.lab.snat_addr(n)))
            .collect();
        let probes: Vec<NftProbe> = (0..self.lab.node_count())
            .map(|n| {
                NftProbe::install(
                    self.lab.topology().node_ns(n),
                    &probe_sources,
                    &[TCP_NODE_PORT, TCP_TARGET_PORT],
                )
            })
            .collect::<Result<_, _>>()?;
        let spec = |mode, secs: f64| LoadSpec {
            source: Some(source),
            targets: targets.clone(),
            mode,
            connections: c.connections,
            warmup: Duration::from_secs_f64(c.warmup),
            duration: Duration::from_secs_f64(secs),
            timeout: Duration::from_secs(2),
        };

        progress.step(format!(
            "{path}: keep-alive load ({} connections, {}s)",
            c.connections, c.duration
        ));
        wait_quiet()?;
        let reasons0 = self.xdp_reasons()?;
        let cpu0 = cpu_busy_s()?;
        let ka = self.load(spec(Mode::KeepAlive, c.duration))?;
        let cpu1 = cpu_busy_s()?;

        progress.step(format!(
            "{path}: one connection per request ({}s)",
            c.duration
        ));
        // The path's own client address, and the agents' SNAT addresses (its remote flows
        // cross the owning node's stack with those).
        let ct_sources: Vec<Ipv4Addr> = std::iter::once(source)
            .chain((0..self.lab.node_count()).map(scenario::snat_addr_of))
            .collect();
        wait_quiet()?;
        let ct0 = self.conntrack_count(&ct_sources)?;
        let (rules, nf0) = self.nf_stats()?;
        let (bpf_ns0, _) = self.bpf_run_time()?;
        let cpu2 = cpu_busy_s()?;
        let nc = self.load(spec(Mode::NewConnection, c.duration))?;
        let cpu3 = cpu_busy_s()?;
        let (bpf_ns1, _) = self.bpf_run_time()?;
        let (_, nf1) = self.nf_stats()?;
        let ct1 = self.conntrack_count(&ct_sources)?;
        let reasons1 = self.xdp_reasons()?;
        r.xdp_reasons = reasons1
            .into_iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.saturating_sub(reasons0.get(&k).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        let mut probe_packets = 0;
        for p in &probes {
            probe_packets += p.read()?.values().sum::<u64>();
        }
        drop(probes);

        // The CPU, netfilter and BPF deltas include the warm-up's requests: count them too.
        let per = |v: f64, res: &LoadResult| {
            let total = res.requests + res.warmup_requests;
            if total == 0 {
                0.0
            } else {
                v / total as f64
            }
        };
        r.rps = ka.rps();
        r.p50_us = ka.percentile_us(50.0);
        r.p90_us = ka.percentile_us(90.0);
        r.p99_us = ka.percentile_us(99.0);
        r.new_conn_rps = nc.rps();
        r.new_conn_p50_us = nc.percentile_us(50.0);
        r.new_conn_p90_us = nc.percentile_us(90.0);
        r.new_conn_p99_us = nc.percentile_us(99.0);
        r.errors = ka.errors + nc.errors;
        r.cpu_us_per_req_keepalive = per((cpu1 - cpu0) * 1e6, &ka);
        r.cpu_us_per_req = per((cpu3 - cpu2) * 1e6, &nc);
        r.bpf_ns_per_req = per(bpf_ns1.saturating_sub(bpf_ns0) as f64, &nc);
        r.nf_rule_hits_per_req = per(nf1.saturating_sub(nf0) as f64, &nc);
        r.nf_rules_installed = rules;
        r.nf_probe_packets = probe_packets;
        r.conntrack_created = ct1.saturating_sub(ct0);
        r.conntrack_per_req = per(r.conntrack_created as f64, &nc);
        r.latency_cdf = ka.cdf(200);
        r.new_conn_latency_cdf = nc.cdf(200);

        let client = source;
        let mut seen_client = 0u64;
        let mut all = 0u64;
        let mut local_total = 0u64;
        let mut local_kept = 0u64;
        for res in [&ka, &nc] {
            for (pod, n) in &res.served_by {
                *r.served_by.entry(pod.clone()).or_default() += n;
            }
            for ((pod, target_ip, seen), n) in &res.client_seen {
                *r.client_ips_seen.entry(seen.to_string()).or_default() += n;
                all += n;
                if *seen == client {
                    seen_client += n;
                }
                let is_local = path == "ip" || self.node_of_addr(*target_ip) == self.pod_node(pod);
                if is_local {
                    local_total += n;
                    if *seen == client {
                        local_kept += n;
                    }
                }
            }
        }
        r.client_ip_seen_fraction = if all == 0 {
            0.0
        } else {
            seen_client as f64 / all as f64
        };
        r.client_ip_preserved = local_total > 0 && local_kept == local_total;
        for (what, res) in [("keep-alive", &ka), ("new-connection", &nc)] {
            if !res.first_errors.is_empty() {
                eprintln!(
                    "           {path} {what} errors: {}",
                    res.first_errors.join("; ")
                );
            }
        }
        progress.step(format!(
            "{path}: {:.0} req/s keep-alive (p99 {:.0}us), {:.0} conn/s (p99 {:.0}us), {} errors",
            r.rps, r.p99_us, r.new_conn_rps, r.new_conn_p99_us, r.errors
        ));
        Ok(r)
    }

    /// One sweep point: new-connection load on every path, `--sweep-rounds` times. The paths
    /// take turns within a round, each round starting one path later (xdp, instance, ip;
    /// then instance, ip, xdp; ...), so a slow stretch of the machine (a kube-proxy resync,
    /// the agents applying) does not land on one path every time; the point is each path's
    /// median round. Every load starts once the machine is quiet ([`wait_quiet`]).
    fn sweep_point(
        &self,
        services: usize,
        c: &CompareArgs,
        progress: &Progress,
    ) -> Result<Vec<SweepPoint>> {
        const ORDER: [&str; 3] = ["xdp", "instance", "ip"];
        let mut out: Vec<SweepPoint> = ORDER
            .iter()
            .map(|p| SweepPoint {
                services,
                path: (*p).into(),
                ..SweepPoint::default()
            })
            .collect();
        let mut accelerated = None;
        for round in 0..c.sweep_rounds {
            for k in 0..ORDER.len() {
                let i = (round + k) % ORDER.len();
                let path = ORDER[i];
                let want = path != "instance";
                // ip mode does not care; leave the Service as it is.
                if path != "ip" && accelerated != Some(want) {
                    self.set_accelerated(want)?;
                    accelerated = Some(want);
                }
                let waited = wait_quiet()?;
                let reasons0 = self.xdp_reasons()?;
                let res = self.load(LoadSpec {
                    source: Some(path_source(path)),
                    targets: self.targets_of(path)?,
                    mode: Mode::NewConnection,
                    connections: c.connections,
                    warmup: Duration::from_secs_f64(c.warmup.min(0.5)),
                    duration: Duration::from_secs_f64(c.sweep_duration),
                    timeout: Duration::from_secs(2),
                })?;
                progress.step(format!(
                    "sweep {services} Services, round {}/{}, {path}: {:.0} conn/s, p99 {:.0}us, \
                     {} errors (after {:.1}s waiting for a quiet machine)",
                    round + 1,
                    c.sweep_rounds,
                    res.rps(),
                    res.percentile_us(99.0),
                    res.errors,
                    waited.as_secs_f64()
                ));
                let point = &mut out[i];
                point.rounds_rps.push(res.rps());
                point.rounds_p99_us.push(res.percentile_us(99.0));
                point.errors += res.errors;
                for e in &res.first_errors {
                    let e = format!("round {}: {e}", round + 1);
                    progress.step(format!("           {path} sweep error: {e}"));
                    point.first_errors.push(e);
                }
                for (k, v) in reason_delta(&reasons0, self.xdp_reasons()?) {
                    *point.xdp_reasons.entry(k).or_default() += v;
                }
            }
        }
        for point in &mut out {
            point.new_conn_rps = labreport::median(&point.rounds_rps);
            point.p99_us = labreport::median(&point.rounds_p99_us);
        }
        self.set_accelerated(true)?;
        Ok(out)
    }

    fn footprint(&mut self) -> LabFootprint {
        let fp = self.lab.footprint();
        let mut pids: Vec<u32> = fp.processes.iter().map(|(p, _)| *p).collect();
        pids.extend(self.proxies.iter().map(KubeProxy::pid));
        if let Ok(cp) = self.lab.control_plane_mut() {
            pids.extend(cp.pids());
        }
        LabFootprint {
            prefix: fp.prefix,
            pids,
            pin_dirs: fp
                .pin_dirs
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            workdir: fp.workdir.display().to_string(),
        }
    }

    /// Stops kube-proxy (rules removed) and tears the lab down, reporting every problem.
    fn shutdown(mut self) -> Result<()> {
        let mut problems = Vec::new();
        for mut p in std::mem::take(&mut self.proxies) {
            if let Err(e) = p.finish() {
                problems.push(format!("kube-proxy in {}: {e}", p.ns()));
            }
        }
        drop(self._bpf_stats.take());
        if let Err(e) = self.lab.shutdown() {
            problems.push(e.to_string());
        }
        ensure!(problems.is_empty(), "teardown: {}", problems.join("; "));
        Ok(())
    }
}

/// Creates `obj`, retrying overload and dropped connections; returns the stored object.
async fn create_retrying<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut attempt = 0u64;
    loop {
        match api.create(&PostParams::default(), obj).await {
            Ok(o) => return Ok(o),
            Err(kube::Error::Api(s)) if (s.code == 429 || s.code >= 500) && attempt < 5 => {}
            Err(kube::Error::Api(s)) => return Err(anyhow!("{} ({})", s.message, s.code)),
            Err(e) if attempt < 5 => eprintln!("           retrying a create: {e}"),
            Err(e) => return Err(e.into()),
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
    }
}

/// Counters that grew from `before` to `after`, by how much.
fn reason_delta(
    before: &BTreeMap<String, u64>,
    after: BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .into_iter()
        .map(|(k, v)| {
            let d = v.saturating_sub(before.get(&k).copied().unwrap_or(0));
            (k, d)
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn collect_ids(v: &serde_json::Value, ids: &mut BTreeSet<u32>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(id) = m.get("id").and_then(|i| i.as_u64()) {
                if m.contains_key("devname") || m.contains_key("ifindex") {
                    ids.insert(id as u32);
                }
            }
            for x in m.values() {
                collect_ids(x, ids);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_ids(x, ids)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// compare

fn compare(c: CompareArgs) -> Result<()> {
    ensure!(
        c.duration > 0.0 && c.sweep_duration > 0.0,
        "durations must be positive"
    );
    ensure!(c.connections >= 1, "--connections must be at least 1");
    ensure!(c.sweep_rounds >= 1, "--sweep-rounds must be at least 1");
    let progress = Progress::new();
    let mut sweep: Vec<usize> = c.sweep.clone();
    sweep.sort_unstable();
    sweep.dedup();
    let max_services = sweep
        .iter()
        .copied()
        .chain([c.lab.services])
        .max()
        .unwrap_or(1)
        + 16;
    let started = utc_now();
    let mut cluster = Cluster::start(&c.lab, max_services, &progress)?;
    let outcome = run_compare(&mut cluster, &c, &sweep, &progress, started);
    if outcome.is_err() {
        eprintln!(
            "lbx-lab: the run failed; last log lines:\n{}",
            cluster.logs()
        );
    }
    let footprint = cluster.footprint();
    progress.step("tearing down (kube-proxy rules, agents, pods, control plane, namespaces)");
    let teardown = cluster.shutdown();
    let mut report = outcome?;
    teardown?;
    report.footprint = footprint;
    progress.step("torn down");
    println!("{}", labreport::render::table(&report));
    write_outputs(&report, &c)?;
    Ok(())
}

fn run_compare(
    cluster: &mut Cluster,
    c: &CompareArgs,
    sweep: &[usize],
    progress: &Progress,
    started: String,
) -> Result<LabReport> {
    progress.step("creating Service ui/ui-nlb (LoadBalancer, 80 -> 8080) and 1 replica");
    cluster.create_ui_service()?;
    cluster.scale_to(1)?;
    cluster.set_accelerated(true)?;
    cluster.one_replica_check()?;
    progress.step(format!("scaling ui to {} replicas", c.lab.replicas));
    cluster.scale_to(c.lab.replicas)?;
    cluster.set_accelerated(true)?;
    cluster.grow_services(c.lab.services, progress)?;

    let mut paths = BTreeMap::new();
    for path in ["xdp", "instance", "ip"] {
        cluster.set_accelerated(path != "instance")?;
        paths.insert(path.to_string(), cluster.measure_path(path, c, progress)?);
    }
    cluster.set_accelerated(true)?;

    let mut points = Vec::new();
    for &n in sweep {
        if n < c.lab.services {
            cluster.notes.push(format!(
                "sweep size {n} skipped: below --services {} (Services are only added)",
                c.lab.services
            ));
            continue;
        }
        cluster.grow_services(n, progress)?;
        points.extend(cluster.sweep_point(n, c, progress)?);
    }

    let mut notes = cluster.notes.clone();
    notes.push(
        "CPU per request: busy time of the whole machine from /proc/stat (user, system, irq, \
         softirq, steal over every core: load generator, kernel paths and pod servers \
         together) during the load, divided by its requests (warm-up included). perf stat \
         cannot give this here: the VM exposes no hardware counters and system-wide \
         cpu-clock counts idle time."
            .into(),
    );
    notes.push(format!(
        "Sweep: {} rounds per size, the paths taking turns (each round starts one path \
         later); a point is the path's median round (every round in rounds_rps). Every load \
         starts once the machine was at most {:.0}% busy for {} ms (at most {} s of waiting).",
        c.sweep_rounds,
        QUIET_BUSY * 100.0,
        QUIET_WINDOW.as_millis(),
        QUIET_MAX.as_secs()
    ));
    notes.push(
        "bpf_ns_per_req: run_time_ns of lbx's programs in the node namespaces \
         (BPF_ENABLE_STATS) during the one-connection-per-request load, per request; \
         netfilter rule hits and conntrack entries: the same load, every node."
            .into(),
    );
    let meta = Meta {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        nodes: c.lab.nodes,
        replicas: c.lab.replicas,
        services: c.lab.services,
        kube_proxy_mode: c.lab.mode().label(),
        kubernetes_version: lb_tests::controlplane::DEFAULT_K8S_VERSION.into(),
        duration_s: c.duration,
        connections: c.connections,
        notes,
    };
    let mut report = LabReport {
        meta,
        paths,
        sweep: points,
        targets: Vec::new(),
        footprint: LabFootprint::default(),
    };
    report.targets = target_checks(&report);
    Ok(report)
}

/// The issue's targets on this run's numbers.
fn target_checks(r: &LabReport) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let point = |n: usize, path: &str| {
        r.sweep
            .iter()
            .find(|p| p.services == n && p.path == path)
            .map(|p| p.new_conn_rps)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for (n, min) in [(10_000usize, 2.0), (1, 1.2)] {
        if let Some(x) = ratio(point(n, "xdp"), point(n, "instance")) {
            out.push(TargetCheck {
                name: format!("xdp new_conn_rps / instance at {n} services"),
                measured: x,
                target: format!(">= {min}"),
                met: x >= min,
            });
        }
    }
    let sizes: BTreeSet<usize> = r.sweep.iter().map(|p| p.services).collect();
    for n in sizes {
        if let Some(x) = ratio(point(n, "xdp"), point(n, "ip")) {
            out.push(TargetCheck {
                name: format!("xdp new_conn_rps / ip at {n} services"),
                measured: x,
                target: ">= 0.9 (within 10% of ip mode)".into(),
                met: x >= 0.9,
            });
        }
    }
    if let (Some(x), Some(ip)) = (r.paths.get("xdp"), r.paths.get("ip")) {
        for (what, a, b) in [
            ("keep-alive", x.p99_us, ip.p99_us),
            ("new-connection", x.new_conn_p99_us, ip.new_conn_p99_us),
        ] {
            if b > 0.0 {
                out.push(TargetCheck {
                    name: format!("xdp p99 / ip p99 ({what})"),
                    measured: a / b,
                    target: "<= 1.1".into(),
                    met: a / b <= 1.1,
                });
            }
        }
        out.push(TargetCheck {
            name: "xdp keeps the client IP for local delivery".into(),
            measured: f64::from(u8::from(x.client_ip_preserved)),
            target: "= 1 (yes)".into(),
            met: x.client_ip_preserved,
        });
        let (xl, il) = (x.hops_local, ip.hops_local);
        out.push(TargetCheck {
            name: format!("xdp hops to a local pod ({xl:?}) = ip mode's ({il:?})"),
            measured: xl.map_or(f64::NAN, f64::from),
            target: format!("= {}", il.map_or("?".into(), |h| h.to_string())),
            met: xl.is_some() && xl == il,
        });
    }
    out
}

fn write_outputs(report: &LabReport, c: &CompareArgs) -> Result<()> {
    if let Some(path) = &c.json {
        let text = serde_json::to_string_pretty(report)?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("lbx-lab: wrote {}", path.display());
    }
    if let Some(path) = &c.html {
        fs::write(path, labreport::render::html(report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("lbx-lab: wrote {}", path.display());
    }
    if let Some(dir) = &c.svg_dir {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, svg) in [
            (
                "latency-cdf.svg",
                labreport::render::svg_latency_cdf(report),
            ),
            (
                "new-conn-vs-services.svg",
                labreport::render::svg_sweep(report),
            ),
            ("cpu-per-request.svg", labreport::render::svg_cpu(report)),
        ] {
            let p = dir.join(name);
            fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
        }
        eprintln!("lbx-lab: wrote the plots into {}", dir.display());
    }
    Ok(())
}

/// The current UTC time, RFC 3339 (from `date`, to need no time crate).
fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// up / down

fn up(args: LabArgs) -> Result<()> {
    let progress = Progress::new();
    if let Ok(text) = fs::read_to_string(STATE_FILE) {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(pid) = v["pid"].as_u64() {
            if Path::new("/proc").join(pid.to_string()).exists() {
                bail!("a lab is already up (pid {pid}, {STATE_FILE}); run `cargo xtask lab down` first");
            }
        }
    }
    let max_services = args.services + 16;
    let mut cluster = Cluster::start(&args, max_services, &progress)?;
    let outcome = (|| -> Result<()> {
        cluster.create_ui_service()?;
        cluster.scale_to(args.replicas)?;
        cluster.set_accelerated(true)?;
        cluster.grow_services(args.services, &progress)?;
        let fp = cluster.footprint();
        if let Some(dir) = Path::new(STATE_FILE).parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(
            STATE_FILE,
            serde_json::to_string_pretty(&json!({"pid": std::process::id(), "footprint": fp}))?,
        )?;
        print_up_help(&cluster);
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    let _ = fs::remove_file(STATE_FILE);
    if let Err(e) = &outcome {
        if !INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("lbx-lab: {e:#}\n{}", cluster.logs());
        }
    }
    progress.step("tearing down");
    cluster.shutdown()?;
    progress.step("torn down");
    Ok(())
}

fn print_up_help(cluster: &Cluster) {
    let lab = &cluster.lab;
    let t = lab.topology();
    let client = t.client_ns();
    let n0 = lab.node_addr(0);
    let pod0 = cluster.replicas[0];
    println!(
        "\nThe lab {} is up. Namespaces: {}",
        lab.prefix(),
        t.namespaces().join(" ")
    );
    println!("Service ui/ui-nlb: nodePort {TCP_NODE_PORT}, LoadBalancer IP {LB_INGRESS_IP}, pods:");
    for p in &cluster.replicas {
        println!(
            "  {p}  {}",
            lab.pod_addr(*p).map(|a| a.to_string()).unwrap_or_default()
        );
    }
    let agent = lab.binaries().agent.display().to_string();
    println!("\nTry:");
    println!("  ip netns exec {client} curl -s http://{n0}:{TCP_NODE_PORT}/        # xdp path");
    println!(
        "  ip netns exec {client} curl -s http://{}:{TCP_TARGET_PORT}/        # ip mode",
        lab.pod_addr(pod0)
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    println!(
        "  ip netns exec {client} curl -s http://{LB_INGRESS_IP}/           # LoadBalancer IP (routed to n0)"
    );
    println!(
        "  {agent} targets --pin-dir {}             # what n0's XDP forwards to",
        lab.pin_dir(0).display()
    );
    println!("  {agent} counters --pin-dir {}", lab.pin_dir(0).display());
    println!(
        "  ip netns exec {} bpftool net show                  # attached programs",
        t.node_ns(0)
    );
    println!(
        "  ip netns exec {} iptables-legacy-save -c -t nat | head   # kube-proxy's rules",
        t.node_ns(0)
    );
    println!("  perf top -a                                         # where the CPU goes");
    println!(
        "  annotate ui/ui-nlb lbx.io/accelerate=false (kubectl --kubeconfig {}) to send it through kube-proxy",
        lab.control_plane().map(|c| c.kubeconfig().display().to_string()).unwrap_or_default()
    );
    println!("\nCtrl-C here, or `cargo xtask lab down`, tears it down.");
}

/// Whether the process of `/proc/<pid>` still runs: gone, or a zombie its parent has not
/// reaped yet, both count as exited.
fn running(proc_dir: &Path) -> bool {
    match fs::read_to_string(proc_dir.join("stat")) {
        // `pid (comm) state ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn down() -> Result<()> {
    match fs::read_to_string(STATE_FILE) {
        Ok(text) => {
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {STATE_FILE}"))?;
            let pid = v["pid"]
                .as_u64()
                .ok_or_else(|| anyhow!("{STATE_FILE} names no pid"))? as u32;
            let proc_dir = Path::new("/proc").join(pid.to_string());
            let is_ours =
                fs::read_to_string(proc_dir.join("cmdline")).is_ok_and(|c| c.contains("lbx-lab"));
            if is_ours {
                eprintln!("lbx-lab: stopping `lab up` (pid {pid})");
                // SAFETY: kill(2) by PID on the lab process named by its own state file,
                // checked to be an lbx-lab process above.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                let started = Instant::now();
                while running(&proc_dir) && started.elapsed() < Duration::from_secs(180) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                ensure!(
                    !running(&proc_dir),
                    "`lab up` (pid {pid}) did not exit within 180 s"
                );
            } else {
                eprintln!("lbx-lab: the `lab up` in {STATE_FILE} (pid {pid}) is gone");
            }
            let _ = fs::remove_file(STATE_FILE);
        }
        Err(_) => eprintln!("lbx-lab: no `lab up` is running ({STATE_FILE} does not exist)"),
    }
    let removed = netns::cleanup_stale().context("removing stale lab namespaces")?;
    scenario::cleanup_stale_pins();
    if removed.is_empty() {
        eprintln!("lbx-lab: no stale namespaces");
    } else {
        eprintln!("lbx-lab: removed stale namespaces {}", removed.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_spread_over_the_nodes() {
        let pods: Vec<String> = (0..3).map(|k| replica_pod(k, 2).to_string()).collect();
        assert_eq!(pods, ["n0-p0", "n1-p0", "n0-p1"]);
    }

    #[test]
    fn maglev_size_follows_the_map_budget() {
        assert_eq!(auto_maglev_size(17), 16381);
        assert_eq!(auto_maglev_size(10_016), 1021);
    }

    #[test]
    fn checks_follow_the_issue_targets() {
        let mut r = LabReport::default();
        for (n, path, rps) in [
            (1, "xdp", 1300.0),
            (1, "instance", 1000.0),
            (1, "ip", 1400.0),
        ] {
            r.sweep.push(SweepPoint {
                services: n,
                path: path.into(),
                new_conn_rps: rps,
                ..SweepPoint::default()
            });
        }
        let checks = target_checks(&r);
        let get = |name: &str| {
            checks
                .iter()
                .find(|c| c.name.contains(name))
                .unwrap()
                .clone()
        };
        let a = get("instance at 1 services");
        assert!((a.measured - 1.3).abs() < 1e-9 && a.met);
        let b = get("ip at 1 services");
        assert!((b.measured - 1300.0 / 1400.0).abs() < 1e-9 && b.met);
        assert!(checks.iter().all(|c| !c.name.contains("10000")));
    }

    #[test]
    fn bpftool_net_ids_are_collected() {
        let v = json!([{"xdp": [{"devname": "eth0", "ifindex": 2, "mode": "driver", "id": 7}],
                        "tc": [{"devname": "p0", "ifindex": 5, "kind": "clsact/ingress", "name": "lb_reply", "id": 9}],
                        "flow_dissector": []}]);
        let mut ids = BTreeSet::new();
        collect_ids(&v, &mut ids);
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), [7, 9]);
    }
}
