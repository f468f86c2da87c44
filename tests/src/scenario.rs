//! The end-to-end lab scenario shared by the data-plane namespace tests, the lab (`lbx-lab`)
//! and `lbx-demo`: a [`Topology`] (2 nodes x 2 pods by default), a pod server in every pod,
//! one real `lb-user standalone` agent per node namespace fed a Kubernetes manifest file, and
//! helpers to send traffic from the client, read the agents' counters and watch netfilter.
//!
//! The Service (`demo/echo`, type LoadBalancer, externalTrafficPolicy Cluster):
//! - port `http` TCP 80 -> targetPort 8080, nodePort 30080;
//! - port `dns`  UDP 53 -> targetPort 5353, nodePort 30053;
//! - with [`LabSpec::closed_udp_port`], port `closed` UDP 54 -> targetPort 5354, nodePort
//!   30054, where no pod listens (ICMP port unreachable);
//! - LoadBalancer ingress IP 10.77.100.1, which the client routes to node 0 (the "NLB").
//!
//! Processes are started by PID and stopped by PID; everything the scenario creates
//! (namespaces, processes, pin directories, config files) is removed on drop, also while a
//! failed assertion unwinds. [`Lab::keep`] instead leaves it running for a human to explore.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::controlplane::{ControlPlane, ControlPlaneError};
use crate::kubelet::{self, KubeletError};
use crate::netns::{self, describe, in_netns, ChildGuard, NetnsError};
use crate::topology::{Topology, TopologyError, TopologySpec, CONTROL_ADDR, NIC};

/// Kubernetes namespace and name of the lab's Service.
pub const SERVICE_NAMESPACE: &str = "demo";
pub const SERVICE_NAME: &str = "echo";
/// Service port, nodePort and targetPort of the TCP (HTTP) port.
pub const TCP_SERVICE_PORT: u16 = 80;
pub const TCP_NODE_PORT: u16 = 30080;
pub const TCP_TARGET_PORT: u16 = 8080;
/// Service port, nodePort and targetPort of the UDP port.
pub const UDP_SERVICE_PORT: u16 = 53;
pub const UDP_NODE_PORT: u16 = 30053;
pub const UDP_TARGET_PORT: u16 = 5353;
/// Service port, nodePort and targetPort of the UDP port no pod listens on
/// ([`LabSpec::closed_udp_port`]).
pub const CLOSED_UDP_SERVICE_PORT: u16 = 54;
pub const CLOSED_UDP_NODE_PORT: u16 = 30054;
pub const CLOSED_UDP_TARGET_PORT: u16 = 5354;
/// The Service's LoadBalancer ingress IP; the client routes it to node 0.
pub const LB_INGRESS_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
/// The node whose address the client uses for the LoadBalancer IP.
pub const LB_NODE: usize = 0;

/// How long one request may take before it counts as lost.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a pod server or an agent may take to print its ready line.
const PODSERVER_READY: Duration = Duration::from_secs(10);
const AGENT_READY: Duration = Duration::from_secs(60);
/// SIGTERM -> SIGKILL grace for detached ([`Lab::keep`]-able) processes.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Where `ip netns add` keeps named namespaces (setns opens these).
const NETNS_DIR: &str = "/run/netns";
/// Where the agents pin their maps (on the bpffs at /sys/fs/bpf).
const PIN_ROOT: &str = "/sys/fs/bpf/lbx";
/// Environment: a prebuilt agent binary to use instead of building `lb-user`.
pub const AGENT_BIN_ENV: &str = "LBX_AGENT_BIN";
/// Environment: `1` skips the `cargo build` of the binaries (use what is in target/).
pub const SKIP_BUILD_ENV: &str = "LBX_SKIP_BUILD";
/// The agent's ready line starts with this.
const AGENT_READY_PREFIX: &str = "lbx: ready ";

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Bpffs(#[from] lb_user::bpf::bpffs::BpffsError),
    #[error("the lab's control plane: {0}")]
    ControlPlane(#[from] ControlPlaneError),
    #[error("playing the kubelet: {0}")]
    Kubelet(#[from] KubeletError),
    #[error("{what} needs a lab with a control plane (LabSpec::control_plane)")]
    NoControlPlane { what: &'static str },
    #[error("{what} needs a lab fed from files (LabSpec::control_plane = false)")]
    NotFileFed { what: &'static str },
    #[error(transparent)]
    Topology {
        #[from]
        source: TopologyError,
    },
    #[error("{step}: {source}")]
    Netns {
        step: String,
        #[source]
        source: NetnsError,
    },
    #[error(
        "building {what} failed (`{command}`): {stderr}\nfix the build, or build it yourself with \
         `cargo build -p lb-user --release` and rerun with {SKIP_BUILD_ENV}=1"
    )]
    Build {
        what: String,
        command: String,
        stderr: String,
    },
    #[error("{what} not found at {path:?}: {hint}")]
    MissingBinary {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    #[error("{what} ({path:?}): {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("agent of node {node} did not become ready: {detail}")]
    AgentNotReady { node: usize, detail: String },
    #[error("agent of node {node} printed an unexpected ready line {line:?}: {detail}")]
    BadReadyLine {
        node: usize,
        line: String,
        detail: String,
    },
    #[error("{what} {target}: {source}")]
    Request {
        what: &'static str,
        target: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("{what} {target}: unexpected answer {answer:?}: {detail}")]
    BadAnswer {
        what: &'static str,
        target: SocketAddrV4,
        answer: String,
        detail: String,
    },
    #[error("`{command}` printed output we cannot read ({detail}): {output}")]
    BadOutput {
        command: String,
        detail: String,
        output: String,
    },
    #[error("no pod {pod} in this lab (it has {nodes} nodes with {pods:?} pods)")]
    NoSuchPod {
        pod: PodId,
        nodes: usize,
        pods: Vec<usize>,
    },
    #[error("{what} timed out after {waited:?}: {detail}")]
    Timeout {
        what: String,
        waited: Duration,
        detail: String,
    },
    #[error("reading the CONFIG pinned by node {node}'s agent in {pin_dir:?}: {detail}")]
    AgentConfig {
        node: usize,
        pin_dir: PathBuf,
        detail: String,
    },
    #[error("teardown left problems: {}", problems.join("; "))]
    Teardown { problems: Vec<String> },
}

fn io_err(
    what: impl Into<String>,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ScenarioError {
    let (what, path) = (what.into(), path.into());
    move |source| ScenarioError::Io { what, path, source }
}

fn netns_err(step: impl Into<String>) -> impl FnOnce(NetnsError) -> ScenarioError {
    let step = step.into();
    move |source| ScenarioError::Netns { step, source }
}

/// A pod of the lab: pod `pod` behind node `node`. Its pod server calls itself `n<node>-p<pod>`,
/// which is how answers name the backend that served them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId {
    pub node: usize,
    pub pod: usize,
}

impl PodId {
    pub const fn new(node: usize, pod: usize) -> Self {
        PodId { node, pod }
    }
    /// The Kubernetes node name of its node (`n<i>`), as in the manifests and `--node-name`.
    pub fn node_name(&self) -> String {
        node_name(self.node)
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}-p{}", self.node, self.pod)
    }
}

impl FromStr for PodId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a pod name of the form n<node>-p<pod>");
        let (n, p) = s.split_once('-').ok_or_else(bad)?;
        let node = n
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        let pod = p
            .strip_prefix('p')
            .and_then(|p| p.parse().ok())
            .ok_or_else(bad)?;
        Ok(PodId { node, pod })
    }
}

/// Kubernetes node name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// One endpoint of the Service's EndpointSlice, with its conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub pod: PodId,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl EndpointSpec {
    /// A running pod: ready, serving, not terminating.
    pub fn ready(pod: PodId) -> Self {
        EndpointSpec {
            pod,
            ready: true,
            serving: true,
            terminating: false,
        }
    }
    /// A pod being deleted that still serves (what the EndpointSlice controller writes
    /// during graceful termination): keeps its connections, gets no new ones.
    pub fn terminating(pod: PodId) -> Self {
        EndpointSpec {
            pod,
            ready: false,
            serving: true,
            terminating: true,
        }
    }
}

/// The manifest every agent reads: the Service and one EndpointSlice holding `endpoints`.
/// Both nodes get the same file (only `--node-name` differs), as from one API server.
pub fn manifest(endpoints: &[EndpointSpec], pod_addr: impl Fn(PodId) -> Ipv4Addr) -> String {
    manifest_with(endpoints, pod_addr, false)
}

/// [`manifest`], with the Service's `closed` UDP port too when `closed_udp_port`
/// ([`LabSpec::closed_udp_port`]).
pub fn manifest_with(
    endpoints: &[EndpointSpec],
    pod_addr: impl Fn(PodId) -> Ipv4Addr,
    closed_udp_port: bool,
) -> String {
    let (closed_service_port, closed_slice_port) = if closed_udp_port {
        (
            format!(
                "  - name: closed
    protocol: UDP
    port: {CLOSED_UDP_SERVICE_PORT}
    targetPort: {CLOSED_UDP_TARGET_PORT}
    nodePort: {CLOSED_UDP_NODE_PORT}
"
            ),
            format!(
                "- name: closed
  protocol: UDP
  port: {CLOSED_UDP_TARGET_PORT}
"
            ),
        )
    } else {
        Default::default()
    };
    let mut y = format!(
        "# Written by lb-tests' scenario: what `kubectl get svc,endpointslices -o yaml` shows.
apiVersion: v1
kind: Service
metadata:
  name: {SERVICE_NAME}
  namespace: {SERVICE_NAMESPACE}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.77
  clusterIPs: [10.96.0.77]
  externalTrafficPolicy: Cluster
  sessionAffinity: None
  selector:
    app: {SERVICE_NAME}
  ports:
  - name: http
    protocol: TCP
    port: {TCP_SERVICE_PORT}
    targetPort: {TCP_TARGET_PORT}
    nodePort: {TCP_NODE_PORT}
  - name: dns
    protocol: UDP
    port: {UDP_SERVICE_PORT}
    targetPort: {UDP_TARGET_PORT}
    nodePort: {UDP_NODE_PORT}
{closed_service_port}status:
  loadBalancer:
    ingress:
    - ip: {LB_INGRESS_IP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {SERVICE_NAME}-lab01
  namespace: {SERVICE_NAMESPACE}
  labels:
    kubernetes.io/service-name: {SERVICE_NAME}
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: {TCP_TARGET_PORT}
- name: dns
  protocol: UDP
  port: {UDP_TARGET_PORT}
{closed_slice_port}"
    );
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
    }
    for e in endpoints {
        y.push_str(&format!(
            "- addresses: [\"{addr}\"]
  conditions:
    ready: {ready}
    serving: {serving}
    terminating: {terminating}
  nodeName: {node}
  targetRef:
    kind: Pod
    namespace: {SERVICE_NAMESPACE}
    name: {pod}
",
            addr = pod_addr(e.pod),
            ready = e.ready,
            serving = e.serving,
            terminating = e.terminating,
            node = e.pod.node_name(),
            pod = e.pod,
        ));
    }
    y
}

/// A Node object as the API server shows it, with just the name and the InternalIP.
pub fn node_object(name: &str, addr: Ipv4Addr) -> String {
    format!(
        "---
apiVersion: v1
kind: Node
metadata:
  name: {name}
status:
  addresses:
  - type: InternalIP
    address: {addr}
"
    )
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub topology: TopologySpec,
    /// `--xdp-mode` of the agents: auto, native or generic.
    pub xdp_mode: String,
    /// `--resync-ms` of the agents: how soon a rewritten config file is applied.
    pub resync_ms: u64,
    /// Children's stderr goes to log files in the work directory instead of ours.
    pub quiet: bool,
    /// Start processes so that they can outlive this one ([`Lab::keep`]): no parent-death
    /// signal, own session, output in log files.
    pub detachable: bool,
    /// Run the real control plane (etcd, kube-apiserver, kube-controller-manager) in the
    /// lab's control namespace and the agents as `lb-user agent` against it, authenticated
    /// with the `deploy/` ServiceAccount's token, instead of `standalone` with files. The
    /// lab registers the Nodes; the Service and its Pods are the test's business.
    pub control_plane: bool,
    /// Extra arguments for every agent (e.g. `--max-services N --maglev-size M`).
    pub agent_args: Vec<String>,
    /// Give every node a dedicated SNAT address ([`snat_addr_of`], a /32 on its eth0) for
    /// the agent's `--snat-addr`, instead of the node address. Needed where the kernel also
    /// NATs to the node address (kube-proxy's masquerade): its port choices cannot collide
    /// with the agent's SNAT flows then.
    pub dedicated_snat: bool,
    /// Standalone agents only: list the nodes as Node objects (InternalIP = the node's
    /// address) in the config files, so the agents tunnel requests for other nodes' pods to
    /// their nodes and the pods see the client's address (`--remote-mode tunnel`). Without
    /// them an agent knows no other node and SNATs those requests (the PEERS path).
    pub node_objects: bool,
    /// The MTU of the lab subnet, the network between the nodes (and the client's link to
    /// them: one L2 segment has one MTU), set before the agents start, so their tunnel MTU
    /// (read from `eth0`) follows ([`Topology::set_lan_mtu`]). The pods' veths keep 1500.
    /// None: the kernel's default, 1500.
    pub lan_mtu: Option<u32>,
    /// Give the Service its `closed` UDP port ([`CLOSED_UDP_NODE_PORT`] ->
    /// [`CLOSED_UDP_TARGET_PORT`]), which no pod server listens on: every datagram to it
    /// makes the pod's kernel send an ICMP port unreachable.
    pub closed_udp_port: bool,
}

/// The dedicated SNAT address of node `i` ([`LabSpec::dedicated_snat`]): 10.77.0.(150+i).
pub fn snat_addr_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 150 + i as u8)
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            topology: TopologySpec::default(),
            xdp_mode: "auto".into(),
            resync_ms: 500,
            quiet: false,
            detachable: false,
            control_plane: false,
            agent_args: Vec::new(),
            dedicated_snat: false,
            node_objects: false,
            lan_mtu: None,
            closed_udp_port: false,
        }
    }
}

/// The binaries the lab runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `lb-user` (the agent and its CLI).
    pub agent: PathBuf,
    /// `lbx-podserver`.
    pub podserver: PathBuf,
}

impl Binaries {
    /// The binaries of the running executable's build profile (`target/<profile>/`), rebuilt
    /// first with `cargo build` so a test never runs a stale agent: `cargo test -p lb-tests`
    /// builds lb-user's library but not its binary. `LBX_AGENT_BIN=PATH` uses that agent
    /// instead; `LBX_SKIP_BUILD=1` uses whatever is in target/ without building. Built
    /// once per process.
    pub fn locate() -> Result<Self, ScenarioError> {
        static FOUND: OnceLock<Binaries> = OnceLock::new();
        if let Some(bins) = FOUND.get() {
            return Ok(bins.clone());
        }
        let bins = Self::find()?;
        Ok(FOUND.get_or_init(|| bins).clone())
    }

    fn find() -> Result<Self, ScenarioError> {
        let exe = std::env::current_exe()
            .map_err(io_err("finding the running executable", "/proc/self/exe"))?;
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let profile_dir = dir;
        let agent_override = std::env::var_os(AGENT_BIN_ENV).map(PathBuf::from);
        let skip_build = std::env::var(SKIP_BUILD_ENV).is_ok_and(|v| v == "1");
        if !skip_build {
            build(&profile_dir, agent_override.is_none())?;
        }
        let bins = Binaries {
            agent: agent_override.unwrap_or_else(|| profile_dir.join("lb-user")),
            podserver: profile_dir.join("lbx-podserver"),
        };
        let profile = profile_name(&profile_dir);
        if !bins.agent.is_file() {
            return Err(ScenarioError::MissingBinary {
                what: "the agent (lb-user)",
                path: bins.agent,
                hint: format!("build it with `cargo build -p lb-user --profile {profile}`"),
            });
        }
        if !bins.podserver.is_file() {
            return Err(ScenarioError::MissingBinary {
                what: "the pod server (lbx-podserver)",
                path: bins.podserver,
                hint: format!(
                    "build it with `cargo build -p lb-tests --bin lbx-podserver --profile {profile}`"
                ),
            });
        }
        Ok(bins)
    }
}

/// Cargo's profile name for a `target/<dir>` directory.
fn profile_name(profile_dir: &Path) -> String {
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".into(),
        Some(other) => other.into(),
    }
}

/// `cargo build` of the lab's binaries into the profile directory we run from.
fn build(profile_dir: &Path, agent: bool) -> Result<(), ScenarioError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .args(["build", "--profile", &profile_name(profile_dir)]);
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    if agent {
        cmd.args(["-p", "lb-user", "--bin", "lb-user"]);
    }
    cmd.args(["-p", "lb-tests", "--bin", "lbx-podserver"]);
    let command = describe(&cmd);
    let what = if agent {
        "lb-user and lbx-podserver"
    } else {
        "lbx-podserver"
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running `{command}`"), &cargo))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        return Err(ScenarioError::Build {
            what: what.into(),
            command,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(())
}

/// A process of the lab: under a [`ChildGuard`] (killed with us), or detachable for
/// [`Lab::keep`].
#[derive(Debug)]
enum Proc {
    Guarded(ChildGuard),
    Detached(Detached),
}

/// A process in its own session with its output in log files and no parent-death signal,
/// so it can outlive us; still terminated on drop unless released.
#[derive(Debug)]
struct Detached {
    child: Child,
    label: String,
    stdout_log: PathBuf,
    armed: bool,
}

impl Drop for Detached {
    fn drop(&mut self) {
        if self.armed {
            terminate(&mut self.child, &self.label);
        }
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Guarded(g) => g.pid(),
            Proc::Detached(d) => d.child.id(),
        }
    }

    fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let d = match self {
            Proc::Guarded(g) => return g.wait_for_line(needle, timeout).map_err(|e| e.to_string()),
            Proc::Detached(d) => d,
        };
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&d.stdout_log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(format!("{} exited ({status}); stdout: {text:?}", d.label));
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "{} printed no {needle:?} in {timeout:?}; stdout: {text:?}",
                    d.label
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_running(&mut self) -> bool {
        match self {
            Proc::Guarded(g) => g.is_running(),
            Proc::Detached(d) => matches!(d.child.try_wait(), Ok(None)),
        }
    }

    /// SIGTERM, then SIGKILL after a grace period; how it ended.
    fn stop(self) -> Option<ExitStatus> {
        match self {
            Proc::Guarded(g) => g.stop(),
            Proc::Detached(mut d) => {
                d.armed = false;
                terminate(&mut d.child, &d.label)
            }
        }
    }

    /// Lets a detached process outlive this one. (A guarded child cannot be released: the
    /// kernel kills it with us. [`Lab::keep`] only holds detached ones.)
    fn release(self) {
        if let Proc::Detached(mut d) = self {
            d.armed = false;
        }
    }
}

fn terminate(child: &mut Child, label: &str) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < TERM_GRACE {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("lbx: {label} (pid {pid}) ignored SIGTERM for {TERM_GRACE:?}; sending SIGKILL");
    // SAFETY: as above, still unreaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    child.wait().ok()
}

/// Where a lab process writes its output.
struct Logs {
    stderr: Option<PathBuf>,
    stdout: Option<PathBuf>,
}

/// Starts `program args` in network namespace `ns` only (setns(2) between fork and exec).
/// Unlike `ip netns exec`, the mount namespace stays ours: `ip netns exec` remounts /sys,
/// which hides /sys/fs/bpf, so pins would land in a private bpffs that nobody else sees.
fn spawn_in_ns(
    ns: &str,
    program: &Path,
    args: &[String],
    logs: Logs,
    detached: bool,
) -> Result<Proc, ScenarioError> {
    let ns_path = Path::new(NETNS_DIR).join(ns);
    let ns_file = File::open(&ns_path).map_err(io_err("opening the namespace", &ns_path))?;
    let open_log = |p: &Path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(io_err("opening a log file", p))
    };
    let stderr_log = logs.stderr.as_deref().map(open_log).transpose()?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    let label = format!("{} in {ns}", describe(&cmd));
    // SAFETY: setns/dup2/setsid are async-signal-safe; the closure only touches fds it owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(log) = &stderr_log {
                if libc::dup2(log.as_raw_fd(), 2) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if detached && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if !detached {
        let guard = ChildGuard::spawn(&mut cmd).map_err(netns_err(format!("starting {label}")))?;
        return Ok(Proc::Guarded(guard));
    }
    let stdout_log = logs
        .stdout
        .expect("detached processes always get a stdout log");
    let out = open_log(&stdout_log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .spawn()
        .map_err(io_err(format!("starting {label}"), program))?;
    Ok(Proc::Detached(Detached {
        child,
        label,
        stdout_log,
        armed: true,
    }))
}

/// One node's agent.
#[derive(Debug)]
struct Agent {
    proc: Proc,
    pin_dir: PathBuf,
    config: PathBuf,
    ready: ReadyLine,
}

/// What an agent's ready line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyLine {
    pub node: String,
    pub iface: String,
    /// `native` or `generic`.
    pub mode: String,
    pub frontends: u64,
    pub backends: u64,
}

impl ReadyLine {
    /// Parses `lbx: ready node=<name> iface=<if> mode=<m> frontends=<n> backends=<n>`.
    pub fn parse(line: &str) -> Result<Self, String> {
        let rest = line
            .trim()
            .strip_prefix(AGENT_READY_PREFIX)
            .ok_or_else(|| format!("does not start with {AGENT_READY_PREFIX:?}"))?;
        let fields: BTreeMap<&str, &str> = rest
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |k: &str| {
            fields
                .get(k)
                .map(|v| v.to_string())
                .ok_or_else(|| format!("no {k}= field"))
        };
        let num = |k: &str| {
            get(k)?
                .parse::<u64>()
                .map_err(|e| format!("{k}= is not a number: {e}"))
        };
        Ok(ReadyLine {
            node: get("node")?,
            iface: get("iface")?,
            mode: get("mode")?,
            frontends: num("frontends")?,
            backends: num("backends")?,
        })
    }
}

/// One pod's server.
#[derive(Debug)]
struct PodServer {
    pod: PodId,
    proc: Proc,
}

/// Everything a lab creates outside its own memory, to check that teardown removed it.
#[derive(Clone, Debug)]
pub struct Footprint {
    pub prefix: String,
    /// (pid, binary file name) of every process started.
    pub processes: Vec<(u32, String)>,
    pub pin_dirs: Vec<PathBuf>,
    pub workdir: PathBuf,
}

impl Footprint {
    /// What still exists, one line per leftover; empty when teardown was complete.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        match netns::list_with_prefix(&self.prefix) {
            Ok(names) => left.extend(names.into_iter().map(|n| format!("namespace {n}"))),
            Err(e) => left.push(format!("cannot list namespaces: {e}")),
        }
        for (pid, name) in &self.processes {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if comm.contains(name.as_str()) {
                left.push(format!("process {pid} ({name})"));
            }
        }
        for dir in &self.pin_dirs {
            if dir.exists() {
                left.push(format!("pin directory {}", dir.display()));
            }
        }
        if self.workdir.exists() {
            left.push(format!("work directory {}", self.workdir.display()));
        }
        left
    }
}

/// What the client learnt from one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The pod that served it.
    pub pod: PodId,
    /// The client address the pod saw (the client itself, or a SNAT address).
    pub client_seen: SocketAddrV4,
    /// The client socket's own address.
    pub local: SocketAddrV4,
    /// Who answered, from the client's side (a connected socket accepts nothing else).
    pub peer: SocketAddrV4,
    /// UDP only: the TTL the datagram reached the pod with.
    pub ttl: Option<u8>,
}

/// What a connected UDP socket of the client learnt from an ICMP error about its datagram
/// ([`Lab::udp_icmp_error`], read with IP_RECVERR). The kernel hands an error to the socket
/// whose datagram the error quotes (source and destination address and port), so a
/// report at all means the quote named the socket's own datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpReport {
    /// The error the socket reported (`ConnectionRefused` for a port unreachable).
    pub error: io::ErrorKind,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Who sent the ICMP error (its outer source address).
    pub offender: Ipv4Addr,
    /// The destination of the datagram the error quotes.
    pub quoted_dst: SocketAddrV4,
    /// The quoted datagram's payload, as far as the error carries it.
    pub quoted_payload: Vec<u8>,
    /// The client socket's own address.
    pub local: SocketAddrV4,
}

/// How much counter `reason` grew between two [`Lab::counters`] readings. Panics naming the
/// counter when a reading lacks it.
pub fn counter_delta(
    after: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
    reason: &str,
) -> u64 {
    let get = |m: &BTreeMap<String, u64>| {
        *m.get(reason)
            .unwrap_or_else(|| panic!("lb-user counters has no {reason:?}: {m:?}"))
    };
    get(after) - get(before)
}

/// Filler byte `i` of a bulk exchange ([`HttpConn::exchange`]), both ways: the pod server
/// (std only) has the same function.
pub fn filler(i: usize) -> u8 {
    (i % 251) as u8
}

/// Parses a pod server body: `pod=NAME client=ADDR[ ttl=N]`.
fn parse_body(body: &str) -> Result<(PodId, SocketAddrV4, Option<u8>), String> {
    let mut pod = None;
    let mut client = None;
    let mut ttl = None;
    for field in body.split_whitespace() {
        match field.split_once('=') {
            Some(("pod", v)) => pod = Some(v.parse::<PodId>()?),
            Some(("client", v)) => {
                client = Some(
                    v.parse::<SocketAddrV4>()
                        .map_err(|e| format!("client={v}: {e}"))?,
                )
            }
            Some(("ttl", v)) => ttl = Some(v.parse::<u8>().map_err(|e| format!("ttl={v}: {e}"))?),
            _ => return Err(format!("unknown field {field:?}")),
        }
    }
    Ok((
        pod.ok_or("no pod= field")?,
        client.ok_or("no client= field")?,
        ttl,
    ))
}

fn set_int_opt(sock: &UdpSocket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid fd and a c_int option value of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr_v4(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

/// The first ICMP error in `sock`'s error queue (IP_RECVERR), without waiting, for the
/// socket at `local` that failed with `error`. None: the queue holds no ICMP error.
fn recv_icmp_error(
    sock: &UdpSocket,
    error: io::ErrorKind,
    local: SocketAddrV4,
) -> io::Result<Option<IcmpReport>> {
    let mut payload = vec![0u8; 2048];
    // SAFETY: all-zero is valid for these plain C structs.
    let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 64]; // u64 for cmsghdr alignment
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the sizes recorded in it.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    payload.truncate(n as usize);
    // SAFETY: walking the control buffer the kernel just filled, with the libc macros; the
    // IP_RECVERR payload is a sock_extended_err followed by the offender's sockaddr_in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_RECVERR {
                let ee_ptr = libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err;
                let ee = std::ptr::read_unaligned(ee_ptr);
                if ee.ee_origin != libc::SO_EE_ORIGIN_ICMP {
                    return Ok(None);
                }
                let offender = std::ptr::read_unaligned(
                    libc::SO_EE_OFFENDER(ee_ptr) as *const libc::sockaddr_in
                );
                return Ok(Some(IcmpReport {
                    error,
                    icmp_type: ee.ee_type,
                    icmp_code: ee.ee_code,
                    offender: *sockaddr_v4(&offender).ip(),
                    quoted_dst: sockaddr_v4(&name),
                    quoted_payload: payload,
                    local,
                }));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(None)
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("the lab is IPv4 only, got {a}"),
    }
}

/// A keep-alive HTTP connection from the client.
#[derive(Debug)]
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    target: SocketAddrV4,
    local: SocketAddrV4,
    peer: SocketAddrV4,
}

impl HttpConn {
    /// The client side's address.
    pub fn local(&self) -> SocketAddrV4 {
        self.local
    }
    pub fn peer(&self) -> SocketAddrV4 {
        self.peer
    }

    /// One `GET /` on this connection, keeping it open.
    pub fn get(&mut self) -> Result<Answer, ScenarioError> {
        self.request(false)
    }

    /// A bulk exchange on this connection, keeping it open: `upload` bytes to the pod (a
    /// POST body) and `download` filler bytes back (`/bytes/N`), every byte checked.
    pub fn exchange(&mut self, upload: usize, download: usize) -> Result<Answer, ScenarioError> {
        self.send_and_read(false, upload, download)
    }

    fn request(&mut self, close: bool) -> Result<Answer, ScenarioError> {
        self.send_and_read(close, 0, 0)
    }

    fn send_and_read(
        &mut self,
        close: bool,
        upload: usize,
        download: usize,
    ) -> Result<Answer, ScenarioError> {
        let target = self.target;
        let req_err = |source| ScenarioError::Request {
            what: "HTTP request to",
            target,
            source,
        };
        let conn = if close { "close" } else { "keep-alive" };
        let mut req = if upload == 0 && download == 0 {
            format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: {conn}\r\n\r\n")
        } else {
            format!(
                "POST /bytes/{download} HTTP/1.1\r\nHost: {target}\r\nConnection: {conn}\r\n\
                 Content-Length: {upload}\r\n\r\n"
            )
        }
        .into_bytes();
        req.extend((0..upload).map(filler));
        self.reader.get_mut().write_all(&req).map_err(req_err)?;
        let bad = |answer: String, detail: String| ScenarioError::BadAnswer {
            what: "HTTP request to",
            target,
            answer,
            detail,
        };
        let mut headers = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).map_err(req_err)?;
            if n == 0 {
                return Err(bad(headers, "connection closed mid-response".into()));
            }
            headers.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        if !headers.starts_with("HTTP/1.1 200 ") {
            return Err(bad(headers, "not a 200 response".into()));
        }
        let Some(len) = headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        }) else {
            return Err(bad(headers, "no Content-Length".into()));
        };
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).map_err(req_err)?;
        let line_end = body.iter().position(|&b| b == b'\n').map_or(len, |i| i + 1);
        let (line, fill) = body.split_at(line_end);
        if fill.len() != download {
            return Err(bad(
                format!("{} bytes", body.len()),
                format!("{} filler bytes, asked for {download}", fill.len()),
            ));
        }
        if let Some(i) = (0..fill.len()).find(|&i| fill[i] != filler(i)) {
            return Err(bad(
                format!("{download} filler bytes"),
                format!("filler byte {i} is {}, expected {}", fill[i], filler(i)),
            ));
        }
        let body = String::from_utf8_lossy(line).into_owned();
        let (pod, client_seen, ttl) = parse_body(&body).map_err(|e| bad(body.clone(), e))?;
        Ok(Answer {
            pod,
            client_seen,
            local: self.local,
            peer: self.peer,
            ttl,
        })
    }
}

/// An nftables table in one namespace with a counter on every hook (priority -300, the
/// earliest) for the client's traffic to and from `ports`: a packet of such a flow that
/// touches the namespace's IP stack counts. Accelerated flows must leave it at zero. The
/// sources may include the agents' SNAT addresses, so the legs a node forwarded to another
/// node count on the owning node too.
///
/// [`NftProbe::install_icmp`] is the same probe for ICMP to and from the client (errors
/// about its flows), in a table of its own.
#[derive(Debug)]
pub struct NftProbe {
    ns: String,
    table: &'static str,
}

/// The netfilter hooks the probe counts on, in packet-path order.
pub const NFT_HOOKS: [&str; 5] = ["prerouting", "input", "forward", "output", "postrouting"];
const NFT_TABLE: &str = "lbx_bypass_probe";
const NFT_ICMP_TABLE: &str = "lbx_bypass_icmp_probe";

fn nft_set<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl NftProbe {
    /// Installs the table in `ns`, counting packets from any of `sources` to any of `ports`
    /// and from those ports back to `sources` (TCP and UDP).
    pub fn install(ns: &str, sources: &[Ipv4Addr], ports: &[u16]) -> Result<Self, ScenarioError> {
        let (client, ports) = (nft_set(sources), nft_set(ports));
        Self::install_rules(
            ns,
            NFT_TABLE,
            [
                format!(
                    "ip saddr {{ {client} }} meta l4proto {{ tcp, udp }} th dport {{ {ports} }}"
                ),
                format!(
                    "ip daddr {{ {client} }} meta l4proto {{ tcp, udp }} th sport {{ {ports} }}"
                ),
            ],
        )
    }

    /// Installs a probe in `ns` that counts ICMP packets to or from any of `hosts` (not
    /// ICMP carried in a tunnel: the outer protocol is IP-in-IP then).
    pub fn install_icmp(ns: &str, hosts: &[Ipv4Addr]) -> Result<Self, ScenarioError> {
        let hosts = nft_set(hosts);
        Self::install_rules(
            ns,
            NFT_ICMP_TABLE,
            [
                format!("ip daddr {{ {hosts} }} meta l4proto icmp"),
                format!("ip saddr {{ {hosts} }} meta l4proto icmp"),
            ],
        )
    }

    /// Table `table` in `ns` with a chain per hook holding a counter per rule of `matches`.
    fn install_rules(
        ns: &str,
        table: &'static str,
        matches: [String; 2],
    ) -> Result<Self, ScenarioError> {
        let mut script = format!("table ip {table} {{\n");
        for hook in NFT_HOOKS {
            script.push_str(&format!(
                "  chain {hook} {{\n    type filter hook {hook} priority -300; policy accept;\n"
            ));
            for m in &matches {
                script.push_str(&format!("    {m} counter\n"));
            }
            script.push_str("  }\n");
        }
        script.push_str("}\n");
        nft(ns, &["-f", "-"], Some(&script))?;
        Ok(NftProbe {
            ns: ns.into(),
            table,
        })
    }

    /// Packets counted per hook (both rules of its chain together).
    pub fn read(&self) -> Result<BTreeMap<String, u64>, ScenarioError> {
        let args = ["-j", "list", "table", "ip", self.table];
        let out = nft(&self.ns, &args, None)?;
        let bad = |detail: String| ScenarioError::BadOutput {
            command: format!("nft {}", args.join(" ")),
            detail,
            output: out.clone(),
        };
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
        let items = v["nftables"]
            .as_array()
            .ok_or_else(|| bad("no nftables array".into()))?;
        let mut counts: BTreeMap<String, u64> =
            NFT_HOOKS.iter().map(|h| (h.to_string(), 0)).collect();
        let mut rules = 0;
        for item in items {
            let Some(rule) = item.get("rule") else {
                continue;
            };
            let chain = rule["chain"]
                .as_str()
                .ok_or_else(|| bad("rule without chain".into()))?;
            let packets = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| e.get("counter")?.get("packets")?.as_u64())
                .ok_or_else(|| bad(format!("rule in {chain} has no counter")))?;
            *counts.entry(chain.to_string()).or_default() += packets;
            rules += 1;
        }
        if rules != 2 * NFT_HOOKS.len() {
            return Err(bad(format!(
                "expected {} counter rules, found {rules}",
                2 * NFT_HOOKS.len()
            )));
        }
        Ok(counts)
    }
}

impl Drop for NftProbe {
    /// Removes the table, so a later probe in the same namespace starts from zero.
    fn drop(&mut self) {
        // The namespace may already be gone (the lab tore down first): nothing to remove.
        let _ = nft(&self.ns, &["delete", "table", "ip", self.table], None);
    }
}

/// `nft ARGS` inside `ns`, optionally with a script on stdin.
fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ScenarioError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nft"]).args(args);
    let command = describe(&cmd);
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(
            format!("running `{command}` (is nftables installed? apt-get install -y nftables)"),
            "nft",
        ))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(io_err(format!("writing the script to `{command}`"), "nft"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for `{command}`"), "nft"))?;
    if !out.status.success() {
        return Err(ScenarioError::Netns {
            step: format!("running nft in {ns}"),
            source: NetnsError::Command {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there: the agents pin their maps there
/// and the operator CLI reads them (the same mount a DaemonSet gets as a hostPath).
fn ensure_bpffs() -> Result<(), ScenarioError> {
    if lb_user::bpf::bpffs::ensure(Path::new(PIN_ROOT))? {
        eprintln!("lbx: mounted bpffs at {}", lb_user::bpf::bpffs::MOUNTPOINT);
    }
    Ok(())
}

/// Removes pin directories `/sys/fs/bpf/lbx/lbx-<pid>-<seq>-*` of runs whose process is gone
/// (a test killed by a timeout never runs its destructors).
pub fn cleanup_stale_pins() {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(netns::PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            eprintln!(
                "lbx: removed stale pin directory {}",
                entry.path().display()
            );
        }
    }
}

/// The last lines of a log file (a quiet child's stderr) for an error message; empty when
/// the child wrote to our stderr.
fn log_tail(path: Option<&Path>) -> String {
    let Some(path) = path else {
        return String::new();
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(15)..];
    format!(
        "; its stderr ({}) ends with:\n{}",
        path.display(),
        tail.join("\n")
    )
}

/// `lb-user counters --output json`: `{"counters": [{"reason": NAME, "count": N}, ...],
/// "total": N}`, or a plain `{NAME: N, ...}` object.
fn parse_counters(v: &serde_json::Value) -> Result<BTreeMap<String, u64>, String> {
    let mut out = BTreeMap::new();
    if let Some(rows) = v.get("counters").and_then(|c| c.as_array()) {
        for row in rows {
            let reason = row["reason"]
                .as_str()
                .ok_or_else(|| format!("row without a reason name: {row}"))?;
            let count = row["count"]
                .as_u64()
                .ok_or_else(|| format!("row without a count: {row}"))?;
            out.insert(reason.to_string(), count);
        }
        return Ok(out);
    }
    let obj = v
        .as_object()
        .ok_or("expected {\"counters\": [...]} or an object of reason -> count")?;
    for (k, n) in obj {
        let n = n
            .as_u64()
            .ok_or_else(|| format!("count of {k} is not a number"))?;
        out.insert(k.clone(), n);
    }
    Ok(out)
}

/// A running lab: topology, pod servers, one agent per node.
#[derive(Debug)]
pub struct Lab {
    // Drop order (after Drop::drop stopped the agents): pod servers, then namespaces.
    agents: Vec<Agent>,
    pods: Vec<PodServer>,
    /// The control plane runs in the topology's control namespace: it goes before it.
    control: Option<ControlPlane>,
    topo: Option<Topology>,
    /// Drives the kube-rs calls of the control-plane mode.
    rt: Option<tokio::runtime::Runtime>,
    bins: Binaries,
    workdir: PathBuf,
    spec: LabSpec,
    /// Set by `keep`: leave everything in place.
    kept: bool,
}

impl Lab {
    /// Builds the topology, starts the pod servers and the agents, and waits until every
    /// agent is ready. On error everything started so far is torn down again.
    pub fn start(spec: LabSpec) -> Result<Lab, ScenarioError> {
        let bins = Binaries::locate()?;
        Self::start_with(spec, bins)
    }

    /// [`Lab::start`] with given binaries.
    pub fn start_with(spec: LabSpec, bins: Binaries) -> Result<Lab, ScenarioError> {
        netns::preflight().map_err(netns_err("checking prerequisites"))?;
        ensure_bpffs()?;
        cleanup_stale_pins();
        let mut topo_spec = spec.topology.clone();
        topo_spec.control |= spec.control_plane;
        let topo = Topology::build(topo_spec)?;
        if let Some(mtu) = spec.lan_mtu {
            topo.set_lan_mtu(mtu)?;
        }
        let workdir = std::env::temp_dir().join(topo.prefix());
        std::fs::create_dir_all(&workdir)
            .map_err(io_err("creating the work directory", &workdir))?;
        let mut lab = Lab {
            agents: Vec::new(),
            pods: Vec::new(),
            control: None,
            topo: Some(topo),
            rt: None,
            bins,
            workdir,
            spec,
            kept: false,
        };
        lab.route_lb_ip()?;
        lab.start_podservers()?;
        if lab.spec.control_plane {
            lab.start_control_plane()?;
        }
        lab.start_agents()?;
        Ok(lab)
    }

    /// The control plane in the control namespace, the Nodes registered (InternalIP = the
    /// node's lab address), and `kubectl apply -k deploy/` (the agent's ServiceAccount and
    /// RBAC, and its DaemonSet, which nothing runs here: the lab starts the agents itself).
    fn start_control_plane(&mut self) -> Result<(), ScenarioError> {
        let ctl_ns = self
            .topology()
            .control_ns()
            .expect("the topology was built with a control namespace")
            .to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(io_err("starting a tokio runtime", "(none)"))?;
        self.rt = Some(rt);
        self.control = Some(ControlPlane::start(&ctl_ns, CONTROL_ADDR)?);
        let nodes: Vec<(String, Ipv4Addr)> = (0..self.node_count())
            .map(|i| (node_name(i), self.node_addr(i)))
            .collect();
        self.kube(|client| async move {
            for (name, ip) in nodes {
                kubelet::create_node(&client, &name, ip).await?;
            }
            Ok::<_, ScenarioError>(())
        })??;
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut apply = self.control_plane()?.kubectl();
        apply.arg("apply").arg("-k").arg(&deploy);
        netns::output(&mut apply).map_err(netns_err("kubectl apply -k deploy/"))?;
        Ok(())
    }

    /// The control plane (labs with [`LabSpec::control_plane`]).
    pub fn control_plane(&self) -> Result<&ControlPlane, ScenarioError> {
        self.control.as_ref().ok_or(ScenarioError::NoControlPlane {
            what: "Lab::control_plane",
        })
    }

    /// The control plane, for stopping and restarting the API server.
    pub fn control_plane_mut(&mut self) -> Result<&mut ControlPlane, ScenarioError> {
        self.control.as_mut().ok_or(ScenarioError::NoControlPlane {
            what: "Lab::control_plane_mut",
        })
    }

    /// Runs `f` with an admin client of the lab's API server (from the root namespace,
    /// through the control plane's loopback forwarder) and waits for it.
    pub fn kube<T, F, Fut>(&self, f: F) -> Result<T, ScenarioError>
    where
        F: FnOnce(kube::Client) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let cp = self.control_plane()?;
        let rt = self
            .rt
            .as_ref()
            .ok_or(ScenarioError::NoControlPlane { what: "Lab::kube" })?;
        rt.block_on(async {
            let client = cp.kube_client().await?;
            Ok(f(client).await)
        })
    }

    /// A token of the agent's ServiceAccount (`kube-system/lbx-agent` from deploy/) from
    /// the TokenRequest API.
    fn agent_token(&self) -> Result<String, ScenarioError> {
        let mut cmd = self.control_plane()?.kubectl();
        cmd.args([
            "-n",
            "kube-system",
            "create",
            "token",
            "lbx-agent",
            "--duration",
            "2h",
        ]);
        let token = netns::output(&mut cmd).map_err(netns_err("kubectl create token"))?;
        Ok(token.trim().to_string())
    }

    pub fn topology(&self) -> &Topology {
        self.topo
            .as_ref()
            .expect("the topology lives as long as the lab")
    }
    pub fn prefix(&self) -> &str {
        self.topology().prefix()
    }
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }
    /// Where config files (and logs of a quiet or detachable lab) live.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }
    pub fn node_count(&self) -> usize {
        self.topology().node_count()
    }
    pub fn node_addr(&self, node: usize) -> Ipv4Addr {
        self.topology().node_addr(node)
    }
    /// The address node `node`'s agent SNATs to (its `--snat-addr`).
    pub fn snat_addr(&self, node: usize) -> Ipv4Addr {
        if self.spec.dedicated_snat {
            snat_addr_of(node)
        } else {
            self.node_addr(node)
        }
    }
    pub fn client_addr(&self) -> Ipv4Addr {
        self.topology().client_addr()
    }
    /// Every pod, node by node.
    pub fn pods(&self) -> Vec<PodId> {
        let t = self.topology();
        (0..t.node_count())
            .flat_map(|i| (0..t.pod_count(i)).map(move |k| PodId::new(i, k)))
            .collect()
    }
    pub fn pod_addr(&self, pod: PodId) -> Result<Ipv4Addr, ScenarioError> {
        self.check_pod(pod)?;
        Ok(self.topology().pod_addr(pod.node, pod.pod))
    }
    /// Node `node`'s config file (the manifest its agent watches).
    pub fn config_path(&self, node: usize) -> &Path {
        &self.agents[node].config
    }
    pub fn pin_dir(&self, node: usize) -> &Path {
        &self.agents[node].pin_dir
    }
    pub fn agent_pid(&self, node: usize) -> u32 {
        self.agents[node].proc.pid()
    }
    /// The pod servers' pids.
    pub fn podserver_pids(&self) -> Vec<(PodId, u32)> {
        self.pods.iter().map(|p| (p.pod, p.proc.pid())).collect()
    }
    /// What node `node`'s agent said when it became ready.
    pub fn agent_ready(&self, node: usize) -> &ReadyLine {
        &self.agents[node].ready
    }
    /// The agents' `--resync-ms`.
    pub fn resync(&self) -> Duration {
        Duration::from_millis(self.spec.resync_ms)
    }

    fn check_pod(&self, pod: PodId) -> Result<(), ScenarioError> {
        let t = self.topology();
        if pod.node < t.node_count() && pod.pod < t.pod_count(pod.node) {
            return Ok(());
        }
        Err(ScenarioError::NoSuchPod {
            pod,
            nodes: t.node_count(),
            pods: (0..t.node_count()).map(|i| t.pod_count(i)).collect(),
        })
    }

    /// The client sends the LoadBalancer ingress IP to node 0, as a cloud load balancer
    /// in IP-forwarding mode would.
    fn route_lb_ip(&self) -> Result<(), ScenarioError> {
        let t = self.topology();
        let via = t.node_addr(LB_NODE).to_string();
        let dst = format!("{LB_INGRESS_IP}/32");
        let args = [
            "-n",
            t.client_ns(),
            "route",
            "add",
            &dst,
            "via",
            &via,
            "dev",
            NIC,
        ];
        netns::ip(&args)
            .map(drop)
            .map_err(netns_err("routing the LoadBalancer IP to node 0"))
    }

    fn logs(&self, name: &str) -> Logs {
        let path = |ext: &str| self.workdir.join(format!("{name}.{ext}"));
        Logs {
            stderr: (self.spec.quiet || self.spec.detachable).then(|| path("log")),
            stdout: self.spec.detachable.then(|| path("out")),
        }
    }

    fn start_podservers(&mut self) -> Result<(), ScenarioError> {
        for pod in self.pods() {
            let ns = self.topology().pod_ns(pod.node, pod.pod).to_string();
            let name = pod.to_string();
            let args: Vec<String> = [
                "--name",
                &name,
                "--tcp",
                &TCP_TARGET_PORT.to_string(),
                "--udp",
                &UDP_TARGET_PORT.to_string(),
            ]
            .map(String::from)
            .to_vec();
            let logs = self.logs(&format!("podserver-{name}"));
            let mut proc =
                spawn_in_ns(&ns, &self.bins.podserver, &args, logs, self.spec.detachable)?;
            let line = proc
                .wait_for_line("ready", PODSERVER_READY)
                .map_err(|detail| ScenarioError::Timeout {
                    what: format!("pod server {name} in {ns}"),
                    waited: PODSERVER_READY,
                    detail,
                })?;
            let expected = format!(
                "lbx-podserver ready name={name} tcp={TCP_TARGET_PORT} udp={UDP_TARGET_PORT}"
            );
            if line != expected {
                return Err(ScenarioError::Timeout {
                    what: format!("pod server {name} in {ns}"),
                    waited: PODSERVER_READY,
                    detail: format!("printed {line:?}, expected {expected:?}"),
                });
            }
            self.pods.push(PodServer { pod, proc });
        }
        Ok(())
    }

    /// The manifest with `endpoints`, as node `node`'s config.
    fn write_config(&self, path: &Path, endpoints: &[EndpointSpec]) -> Result<(), ScenarioError> {
        for e in endpoints {
            self.check_pod(e.pod)?;
        }
        let t = self.topology();
        let mut text = manifest_with(
            endpoints,
            |p| t.pod_addr(p.node, p.pod),
            self.spec.closed_udp_port,
        );
        if self.spec.node_objects {
            for node in 0..self.node_count() {
                text.push_str(&node_object(&node_name(node), self.node_addr(node)));
            }
        }
        // Write and rename, so the agent never reads a half-written file.
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, text).map_err(io_err("writing a config file", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("replacing a config file", path))?;
        Ok(())
    }

    fn start_agents(&mut self) -> Result<(), ScenarioError> {
        let endpoints: Vec<EndpointSpec> =
            self.pods().into_iter().map(EndpointSpec::ready).collect();
        let agent_kubeconfig = match &self.control {
            Some(cp) => Some(cp.kubeconfig_with_token("lbx-agent", &self.agent_token()?)?),
            None => None,
        };
        for node in 0..self.node_count() {
            let name = node_name(node);
            let pin_dir = Path::new(PIN_ROOT).join(format!("{}-{name}", self.prefix()));
            let addr = self.node_addr(node).to_string();
            let snat = if self.spec.dedicated_snat {
                let snat = snat_addr_of(node);
                let ns = self.topology().node_ns(node);
                // `replace`: a restarted agent finds the address in place.
                netns::ip(&[
                    "-n",
                    ns,
                    "addr",
                    "replace",
                    &format!("{snat}/32"),
                    "dev",
                    NIC,
                ])
                .map_err(netns_err("adding the node's SNAT address"))?;
                snat.to_string()
            } else {
                addr.clone()
            };
            let (source_args, config) = match &agent_kubeconfig {
                Some(kubeconfig) => (
                    vec![
                        "agent".to_string(),
                        "--kubeconfig".into(),
                        kubeconfig.to_string_lossy().into_owned(),
                        "--batch-ms".into(),
                        "5".into(),
                    ],
                    kubeconfig.clone(),
                ),
                None => {
                    let config = self.workdir.join(format!("{name}.yaml"));
                    self.write_config(&config, &endpoints)?;
                    (
                        vec![
                            "standalone".to_string(),
                            "--config".into(),
                            config.to_string_lossy().into_owned(),
                            "--resync-ms".into(),
                            self.spec.resync_ms.to_string(),
                        ],
                        config,
                    )
                }
            };
            #[rustfmt::skip]
            let mut node_args: Vec<String> = [
                "--iface", NIC,
                "--node-name", &name,
                "--node-addr", &addr,
                "--snat-addr", &snat,
                "--xdp-mode", &self.spec.xdp_mode,
                "--pin-dir", &pin_dir.to_string_lossy(),
            ]
            .map(String::from)
            .to_vec();
            // The other agents' SNAT addresses: their forwarded requests to this node's pods
            // (and the replies) bypass netfilter here.
            for peer in (0..self.node_count()).filter(|&n| n != node) {
                node_args.push("--peer-snat-addr".into());
                node_args.push(self.snat_addr(peer).to_string());
            }
            let args: Vec<String> = source_args
                .into_iter()
                .chain(node_args)
                .chain(self.spec.agent_args.iter().cloned())
                .collect();
            let ns = self.topology().node_ns(node).to_string();
            let logs = self.logs(&format!("agent-{name}"));
            let stderr_log = logs.stderr.clone();
            let proc = spawn_in_ns(&ns, &self.bins.agent, &args, logs, self.spec.detachable)?;
            // Registered before waiting, so a failed start is still torn down (and its
            // pins removed) by Drop.
            self.agents.push(Agent {
                proc,
                pin_dir,
                config,
                ready: ReadyLine {
                    node: name.clone(),
                    iface: NIC.into(),
                    mode: String::new(),
                    frontends: 0,
                    backends: 0,
                },
            });
            let agent = self.agents.last_mut().expect("pushed above");
            let line = agent
                .proc
                .wait_for_line(AGENT_READY_PREFIX, AGENT_READY)
                .map_err(|detail| ScenarioError::AgentNotReady {
                    node,
                    detail: detail + &log_tail(stderr_log.as_deref()),
                })?;
            let ready = ReadyLine::parse(&line).map_err(|detail| ScenarioError::BadReadyLine {
                node,
                line: line.clone(),
                detail,
            })?;
            if ready.node != name || ready.iface != NIC {
                return Err(ScenarioError::BadReadyLine {
                    node,
                    line,
                    detail: format!("expected node={name} iface={NIC}"),
                });
            }
            agent.ready = ready;
        }
        Ok(())
    }

    /// Rewrites node `node`'s config with `endpoints`; its agent applies it within
    /// `--resync-ms` (callers check the effect on traffic).
    pub fn set_endpoints(
        &self,
        node: usize,
        endpoints: &[EndpointSpec],
    ) -> Result<(), ScenarioError> {
        if self.control.is_some() {
            return Err(ScenarioError::NotFileFed {
                what: "Lab::set_endpoints",
            });
        }
        self.write_config(&self.agents[node].config, endpoints)
    }

    /// Node `node`'s agent log (labs with [`LabSpec::quiet`] or `detachable`).
    /// Stops every agent (they detach and unpin) and starts them again with `agent_args`
    /// in place of the spec's, waiting for each to be ready; pods, namespaces and the
    /// control plane stay. The new agents start with empty maps: flows the old ones held
    /// are not carried over (no hitless restart yet), so callers restart between loads.
    pub fn restart_agents(&mut self, agent_args: Vec<String>) -> Result<(), ScenarioError> {
        for agent in std::mem::take(&mut self.agents) {
            let Agent { proc, pin_dir, .. } = agent;
            proc.stop();
            if pin_dir.exists() {
                std::fs::remove_dir_all(&pin_dir)
                    .map_err(io_err("removing the agent's pins", &pin_dir))?;
            }
        }
        self.spec.agent_args = agent_args;
        self.start_agents()
    }

    pub fn agent_log(&self, node: usize) -> Option<PathBuf> {
        self.logs(&format!("agent-{}", node_name(node))).stderr
    }

    /// Whether node `node`'s agent still runs.
    pub fn agent_running(&mut self, node: usize) -> bool {
        self.agents[node].proc.is_running()
    }

    /// Runs `f` on a thread inside the client namespace (sockets it opens stay there).
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, ScenarioError> {
        in_netns(self.topology().client_ns(), f).map_err(netns_err("entering the client namespace"))
    }

    /// Opens a TCP connection from the client to `addr:port` for keep-alive requests.
    pub fn connect(&self, addr: Ipv4Addr, port: u16) -> Result<HttpConn, ScenarioError> {
        let target = SocketAddrV4::new(addr, port);
        let stream =
            self.in_client(|| TcpStream::connect_timeout(&SocketAddr::V4(target), IO_TIMEOUT))?;
        let req_err = |source| ScenarioError::Request {
            what: "TCP connect to",
            target,
            source,
        };
        let stream = stream.map_err(req_err)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(req_err)?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(req_err)?;
        stream.set_nodelay(true).map_err(req_err)?;
        let local = v4(stream.local_addr().map_err(req_err)?);
        let peer = v4(stream.peer_addr().map_err(req_err)?);
        Ok(HttpConn {
            reader: BufReader::new(stream),
            target,
            local,
            peer,
        })
    }

    /// One HTTP request on a new connection (a new source port) from the client.
    pub fn http_get(&self, addr: Ipv4Addr, port: u16) -> Result<Answer, ScenarioError> {
        self.connect(addr, port)?.request(true)
    }

    /// `n` HTTP requests, each on its own new connection. Every connection stays open until
    /// all are done, so the kernel cannot hand out a source port twice: `n` distinct flows.
    pub fn http_flows(
        &self,
        addr: Ipv4Addr,
        port: u16,
        n: usize,
    ) -> Result<Vec<Answer>, ScenarioError> {
        let mut held = Vec::with_capacity(n);
        let mut answers = Vec::with_capacity(n);
        for _ in 0..n {
            let mut conn = self.connect(addr, port)?;
            answers.push(conn.request(true)?);
            held.push(conn);
        }
        Ok(answers)
    }

    /// One UDP query from a new client socket (a new source port). The socket is connected
    /// to `addr:port`, so a reply from any other source is never received.
    pub fn udp_query(&self, addr: Ipv4Addr, port: u16) -> Result<Answer, ScenarioError> {
        Ok(self.udp_query_held(addr, port)?.0)
    }

    /// `n` UDP queries from `n` sockets kept open until all are answered: `n` distinct
    /// source ports (the kernel picks them at random and would otherwise repeat some).
    pub fn udp_flows(
        &self,
        addr: Ipv4Addr,
        port: u16,
        n: usize,
    ) -> Result<Vec<Answer>, ScenarioError> {
        let mut held = Vec::with_capacity(n);
        let mut answers = Vec::with_capacity(n);
        for _ in 0..n {
            let (answer, sock) = self.udp_query_held(addr, port)?;
            answers.push(answer);
            held.push(sock);
        }
        Ok(answers)
    }

    fn udp_query_held(
        &self,
        addr: Ipv4Addr,
        port: u16,
    ) -> Result<(Answer, UdpSocket), ScenarioError> {
        let target = SocketAddrV4::new(addr, port);
        let req_err = |source| ScenarioError::Request {
            what: "UDP query to",
            target,
            source,
        };
        let sock = self.client_udp(target)?.map_err(req_err)?;
        sock.send(b"lbx?").map_err(req_err)?;
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).map_err(req_err)?;
        let body = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (pod, client_seen, ttl) =
            parse_body(&body).map_err(|detail| ScenarioError::BadAnswer {
                what: "UDP query to",
                target,
                answer: body.clone(),
                detail,
            })?;
        let answer = Answer {
            pod,
            client_seen,
            local: v4(sock.local_addr().map_err(req_err)?),
            peer: v4(sock.peer_addr().map_err(req_err)?),
            ttl,
        };
        Ok((answer, sock))
    }

    /// A new UDP socket of the client's, connected to `target`, reads timing out after
    /// [`IO_TIMEOUT`] (the outer error: entering the client namespace).
    fn client_udp(&self, target: SocketAddrV4) -> Result<io::Result<UdpSocket>, ScenarioError> {
        let sock = self.in_client(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
        Ok(sock.and_then(|sock| {
            sock.connect(target)?;
            sock.set_read_timeout(Some(IO_TIMEOUT))?;
            Ok(sock)
        }))
    }

    /// Sends `payload` from a new client socket connected to `addr:port` and waits for the
    /// ICMP error the kernel hands that socket (IP_RECVERR): a port unreachable about the
    /// datagram, say. An answer instead, or nothing within the timeout, is an error.
    pub fn udp_icmp_error(
        &self,
        addr: Ipv4Addr,
        port: u16,
        payload: &[u8],
    ) -> Result<IcmpReport, ScenarioError> {
        self.udp_icmp_error_ttl(addr, port, payload, None)
    }

    /// [`Lab::udp_icmp_error`] with the datagram's IP TTL set to `ttl` (a traceroute probe:
    /// the error is then a time-exceeded from the router where it ran out).
    pub fn udp_icmp_error_ttl(
        &self,
        addr: Ipv4Addr,
        port: u16,
        payload: &[u8],
        ttl: Option<u8>,
    ) -> Result<IcmpReport, ScenarioError> {
        let target = SocketAddrV4::new(addr, port);
        let what = "UDP datagram (expecting an ICMP error) to";
        let req_err = |source| ScenarioError::Request {
            what,
            target,
            source,
        };
        let sock = self.client_udp(target)?.map_err(req_err)?;
        set_int_opt(&sock, libc::IPPROTO_IP, libc::IP_RECVERR, 1).map_err(req_err)?;
        if let Some(ttl) = ttl {
            sock.set_ttl(u32::from(ttl)).map_err(req_err)?;
        }
        let local = v4(sock.local_addr().map_err(req_err)?);
        sock.send(payload).map_err(req_err)?;
        let mut buf = [0u8; 512];
        let error = match sock.recv(&mut buf) {
            Ok(n) => {
                return Err(ScenarioError::BadAnswer {
                    what,
                    target,
                    answer: String::from_utf8_lossy(&buf[..n]).into_owned(),
                    detail: "an answer where an ICMP error was expected".into(),
                })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ScenarioError::Timeout {
                    what: format!("{what} {target} from {local}"),
                    waited: IO_TIMEOUT,
                    detail: "neither an answer nor an ICMP error arrived".into(),
                })
            }
            Err(e) => e.kind(),
        };
        let queued =
            recv_icmp_error(&sock, error, local).map_err(|source| ScenarioError::Request {
                what: "reading the ICMP error queue of the socket sending to",
                target,
                source,
            })?;
        queued.ok_or_else(|| ScenarioError::BadAnswer {
            what,
            target,
            answer: format!("{error:?}"),
            detail: "the socket failed, but its error queue holds no ICMP error".into(),
        })
    }

    /// Runs `lb-user ARGS --pin-dir <node's pin dir> --output json` and parses its output.
    fn cli_json(
        &self,
        node: usize,
        sub: &str,
    ) -> Result<(String, serde_json::Value), ScenarioError> {
        let pin = self.pin_dir(node).to_string_lossy().into_owned();
        let mut cmd = Command::new(&self.bins.agent);
        cmd.args([sub, "--pin-dir", &pin, "--output", "json"]);
        let command = describe(&cmd);
        let out =
            netns::output(&mut cmd).map_err(netns_err(format!("reading node {node}'s {sub}")))?;
        let value = serde_json::from_str(&out).map_err(|e| ScenarioError::BadOutput {
            command: command.clone(),
            detail: e.to_string(),
            output: out.clone(),
        })?;
        Ok((command, value))
    }

    /// Node `node`'s data-plane counters (`lb-user counters`): reason name -> packets.
    pub fn counters(&self, node: usize) -> Result<BTreeMap<String, u64>, ScenarioError> {
        let (command, v) = self.cli_json(node, "counters")?;
        parse_counters(&v).map_err(|detail| ScenarioError::BadOutput {
            command,
            detail,
            output: v.to_string(),
        })
    }

    /// Every node's non-zero counters, or why they could not be read: what a failed
    /// request's message adds, saying what the data plane did with the traffic.
    pub fn nonzero_counters(&self) -> String {
        (0..self.node_count())
            .map(|n| match self.counters(n) {
                Ok(c) => {
                    let nonzero: BTreeMap<_, _> = c.into_iter().filter(|(_, v)| *v > 0).collect();
                    format!("n{n}: {nonzero:?}")
                }
                Err(e) => format!("n{n}: {e}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Node `node`'s frontends and their backends (`lb-user targets`), as the CLI prints it.
    pub fn targets(&self, node: usize) -> Result<serde_json::Value, ScenarioError> {
        Ok(self.cli_json(node, "targets")?.1)
    }

    /// Node `node`'s connection-tracking table (`lb-user conntrack`), as the CLI prints it.
    pub fn conntrack(&self, node: usize) -> Result<serde_json::Value, ScenarioError> {
        Ok(self.cli_json(node, "conntrack")?.1)
    }

    /// Installs an [`NftProbe`] in node `node`'s namespace counting the client's traffic to
    /// and from the Service's node ports and target ports (the `closed` port's too), and
    /// the other nodes' forwarded legs of it (from and to their SNAT addresses).
    pub fn install_nft_probe(&self, node: usize) -> Result<NftProbe, ScenarioError> {
        let sources: Vec<Ipv4Addr> = std::iter::once(self.client_addr())
            .chain(
                (0..self.node_count())
                    .filter(|&n| n != node)
                    .map(|n| self.snat_addr(n)),
            )
            .collect();
        NftProbe::install(
            self.topology().node_ns(node),
            &sources,
            &[
                TCP_NODE_PORT,
                TCP_TARGET_PORT,
                UDP_NODE_PORT,
                UDP_TARGET_PORT,
                CLOSED_UDP_NODE_PORT,
                CLOSED_UDP_TARGET_PORT,
            ],
        )
    }

    /// Installs an [`NftProbe`] in node `node`'s namespace counting ICMP to and from the
    /// client ([`NftProbe::install_icmp`]): errors about its flows that the node's stack
    /// sees.
    pub fn install_icmp_probe(&self, node: usize) -> Result<NftProbe, ScenarioError> {
        NftProbe::install_icmp(self.topology().node_ns(node), &[self.client_addr()])
    }

    /// Node `node`'s data-plane settings as its agent wrote them (the pinned `CONFIG`):
    /// what the programs decide by, e.g. the tunnel MTU and the MSS it implies
    /// (`Config::tunnel_mss`).
    pub fn agent_config(&self, node: usize) -> Result<lb_common::Config, ScenarioError> {
        let err = |detail: String| ScenarioError::AgentConfig {
            node,
            pin_dir: self.pin_dir(node).to_path_buf(),
            detail,
        };
        let located = lb_user::bpf::pins::locate(Some(self.pin_dir(node)), None)
            .map_err(|e| err(e.to_string()))?;
        let maps = lb_user::inspect::open(&located).map_err(|e| err(e.to_string()))?;
        lb_user::inspect::MapsView::config(&maps).map_err(|e| err(e.to_string()))
    }

    /// The MSS the kernel of namespace `ns` sends with on its established TCP connection
    /// `local` -> `peer` (`ss -ti`'s `mss:`, the kernel's `mss_cache`: the smaller of the
    /// MSS the peer announced and what its own route allows, less the TCP options every
    /// segment carries).
    pub fn tcp_mss(
        &self,
        ns: &str,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> Result<u32, ScenarioError> {
        let (src, dst) = (local.to_string(), peer.to_string());
        let args = [
            "ss",
            "-Htin",
            "state",
            "established",
            "src",
            &src,
            "dst",
            &dst,
        ];
        let out = netns::run(ns, &args).map_err(netns_err(format!("running ss in {ns}")))?;
        let bad = |detail: &str| ScenarioError::BadOutput {
            command: format!("ip netns exec {ns} {}", args.join(" ")),
            detail: detail.into(),
            output: out.clone(),
        };
        let mss: Vec<&str> = out
            .split_whitespace()
            .filter_map(|t| t.strip_prefix("mss:"))
            .collect();
        match mss[..] {
            [one] => one.parse().map_err(|_| bad("mss: is not a number")),
            [] => Err(bad("no established connection with an mss: field")),
            _ => Err(bad("more than one connection matched")),
        }
    }

    /// Everything this lab created, to check teardown against.
    pub fn footprint(&self) -> Footprint {
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut processes: Vec<(u32, String)> = self
            .agents
            .iter()
            .map(|a| (a.proc.pid(), name(&self.bins.agent)))
            .collect();
        processes.extend(
            self.pods
                .iter()
                .map(|p| (p.proc.pid(), name(&self.bins.podserver))),
        );
        Footprint {
            prefix: self.prefix().to_string(),
            processes,
            pin_dirs: self.agents.iter().map(|a| a.pin_dir.clone()).collect(),
            workdir: self.workdir.clone(),
        }
    }

    /// Stops everything and checks that the agents kept their shutdown contract: exit 0 on
    /// SIGTERM, XDP detached from the node NIC, pins removed. Then the pod servers,
    /// namespaces and files go. Every problem is reported, not only the first.
    pub fn shutdown(mut self) -> Result<(), ScenarioError> {
        let mut problems = Vec::new();
        let agents = std::mem::take(&mut self.agents);
        for (node, agent) in agents.into_iter().enumerate() {
            let Agent { proc, pin_dir, .. } = agent;
            match proc.stop() {
                Some(s) if s.success() => {}
                Some(s) => problems.push(format!("agent of n{node} ended with {s} on SIGTERM")),
                None => problems.push(format!("agent of n{node}: exit status unknown")),
            }
            let ns = self.topology().node_ns(node);
            match netns::ip(&["-n", ns, "-j", "link", "show", "dev", NIC]) {
                Ok(out) if out.contains("\"xdp\"") => {
                    problems.push(format!("XDP still attached to {NIC} of n{node}: {out}"))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("cannot inspect {NIC} of n{node}: {e}")),
            }
            if pin_dir.exists() {
                problems.push(format!(
                    "agent of n{node} left its pin directory {}",
                    pin_dir.display()
                ));
                let _ = std::fs::remove_dir_all(&pin_dir);
            }
        }
        for pod in std::mem::take(&mut self.pods) {
            pod.proc.stop();
        }
        drop(self.control.take());
        drop(self.rt.take());
        drop(self.topo.take());
        if let Err(e) = std::fs::remove_dir_all(&self.workdir) {
            problems.push(format!("cannot remove {}: {e}", self.workdir.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ScenarioError::Teardown { problems })
        }
    }

    /// Leaves the lab running after this process exits (a lab started with
    /// `detachable: true`) and returns shell commands that tear it down.
    pub fn keep(mut self) -> Result<Vec<String>, ScenarioError> {
        if !self.spec.detachable {
            return Err(ScenarioError::Teardown {
                problems: vec![
                    "only a lab started with LabSpec::detachable can be kept (its processes \
                     would die with this one)"
                        .into(),
                ],
            });
        }
        self.kept = true;
        let pids: Vec<String> = self
            .agents
            .iter()
            .map(|a| a.proc.pid().to_string())
            .collect();
        let pod_pids: Vec<String> = self.pods.iter().map(|p| p.proc.pid().to_string()).collect();
        let prefix = self.prefix().to_string();
        let commands = vec![
            format!(
                "kill {}   # the agents: they detach XDP and remove their pins",
                pids.join(" ")
            ),
            format!("kill {}   # the pod servers", pod_pids.join(" ")),
            format!(
                "for ns in $(ip netns list | awk '/^{prefix}-/ {{print $1}}'); do ip netns del \"$ns\"; done"
            ),
            format!(
                "rm -rf {} {}",
                self.agents
                    .iter()
                    .map(|a| a.pin_dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                self.workdir.display()
            ),
        ];
        for agent in std::mem::take(&mut self.agents) {
            agent.proc.release();
        }
        for pod in std::mem::take(&mut self.pods) {
            pod.proc.release();
        }
        if let Some(topo) = self.topo.take() {
            // Leak the guards: the namespaces stay.
            std::mem::forget(topo);
        }
        Ok(commands)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        // Agents first: they detach and unpin while their namespaces still exist.
        for agent in std::mem::take(&mut self.agents) {
            let Agent { proc, pin_dir, .. } = agent;
            proc.stop();
            if pin_dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&pin_dir) {
                    eprintln!("lbx: could not remove {}: {e}", pin_dir.display());
                }
            }
        }
        for pod in std::mem::take(&mut self.pods) {
            pod.proc.stop();
        }
        drop(self.control.take());
        drop(self.rt.take());
        drop(self.topo.take());
        if self.workdir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.workdir) {
                eprintln!("lbx: could not remove {}: {e}", self.workdir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ids_round_trip() {
        let p = PodId::new(1, 0);
        assert_eq!(p.to_string(), "n1-p0");
        assert_eq!("n1-p0".parse::<PodId>(), Ok(p));
        assert!("lbx-1-0-n1-p0".parse::<PodId>().is_err());
        assert!("n1p0".parse::<PodId>().is_err());
        assert_eq!(p.node_name(), "n1");
    }

    #[test]
    fn bodies_parse() {
        let (pod, client, ttl) = parse_body("pod=n0-p1 client=10.77.0.100:40000\n").unwrap();
        assert_eq!(pod, PodId::new(0, 1));
        assert_eq!(client, "10.77.0.100:40000".parse().unwrap());
        assert_eq!(ttl, None);
        let (_, _, ttl) = parse_body("pod=n1-p0 client=10.77.0.10:61000 ttl=63\n").unwrap();
        assert_eq!(ttl, Some(63));
        assert!(parse_body("pod=n1-p0\n").is_err());
        assert!(parse_body("hello world").is_err());
    }

    #[test]
    fn counters_parse() {
        let v = serde_json::json!({"counters": [{"reason": "fwd_local", "count": 3},
            {"reason": "fwd_remote", "count": 0}], "total": 3});
        let c = parse_counters(&v).unwrap();
        assert_eq!(c["fwd_local"], 3);
        assert_eq!(c["fwd_remote"], 0);
        let flat = serde_json::json!({"fwd_local": 5});
        assert_eq!(parse_counters(&flat).unwrap()["fwd_local"], 5);
        assert!(parse_counters(&serde_json::json!([1, 2])).is_err());
        assert!(parse_counters(&serde_json::json!({"counters": [{"count": 1}]})).is_err());
    }

    #[test]
    fn ready_line_parses() {
        let r =
            ReadyLine::parse("lbx: ready node=n0 iface=eth0 mode=native frontends=4 backends=8")
                .unwrap();
        assert_eq!(
            r,
            ReadyLine {
                node: "n0".into(),
                iface: "eth0".into(),
                mode: "native".into(),
                frontends: 4,
                backends: 8
            }
        );
        assert!(ReadyLine::parse("lbx: ready node=n0 iface=eth0").is_err());
        assert!(ReadyLine::parse("ready node=n0").is_err());
    }

    #[test]
    fn node_objects_name_the_other_nodes_for_the_agent() {
        let mut text = manifest(&[EndpointSpec::ready(PodId::new(1, 0))], |p| {
            crate::topology::pod_addr_of(p.node, p.pod)
        });
        for node in 0..2 {
            text.push_str(&node_object(
                &node_name(node),
                crate::topology::node_addr_of(node),
            ));
        }
        let m = lb_user::k8s::manifest::parse_str(&text).expect("manifest parses");
        assert_eq!((m.services.len(), m.endpoint_slices.len()), (1, 1));
        let (others, found) = lb_user::k8s::state::node_ips(&m.nodes, &node_name(0));
        assert!(found, "n0 is among the Node objects");
        assert_eq!(
            others.into_iter().collect::<Vec<_>>(),
            [(node_name(1), crate::topology::node_addr_of(1))]
        );
    }

    #[test]
    fn manifest_parses_as_the_agent_reads_it() {
        let eps = [
            EndpointSpec::ready(PodId::new(0, 0)),
            EndpointSpec::terminating(PodId::new(1, 1)),
        ];
        let text = manifest(&eps, |p| crate::topology::pod_addr_of(p.node, p.pod));
        let m = lb_user::k8s::manifest::parse_str(&text).expect("manifest parses");
        assert_eq!((m.services.len(), m.endpoint_slices.len()), (1, 1));
        let (desired, skipped) = lb_user::k8s::translate::translate(
            &m.services,
            &m.slim_slices(),
            "n0",
            &Default::default(),
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        // TCP and UDP ports, each with the NodePort and the LoadBalancer IP.
        assert_eq!(desired.services.len(), 2);
        for (id, s) in &desired.services {
            assert_eq!(s.frontends.len(), 2, "{id}");
            let got: Vec<(Ipv4Addr, bool, bool)> = s
                .backends
                .iter()
                .map(|b| (b.addr, b.local, b.terminating))
                .collect();
            assert_eq!(
                got,
                vec![
                    (Ipv4Addr::new(10, 77, 1, 10), true, false),
                    (Ipv4Addr::new(10, 77, 2, 11), false, true),
                ],
                "{id}"
            );
            assert_eq!(s.ring_backends().count(), 1, "{id}");
        }
    }
}
