//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager
//! (EndpointSlice, ServiceAccount, namespace and garbage-collector controllers) running inside
//! a network namespace, torn down when the [`ControlPlane`] drops.
//!
//! - [`ControlPlane::start`] runs in an existing namespace, usually the lab's control namespace
//!   ([`crate::topology::Topology::control_ns`]), with the API server on `bind:6443`, where
//!   processes in the node namespaces reach it through [`ControlPlane::kubeconfig`].
//! - [`ControlPlane::start_isolated`] makes its own `lbx-<pid>-<seq>-ctl` namespace with only
//!   loopback, for tests that need an API server but no lab.
//!
//! The test process itself stays in the root namespace: a loopback forwarder (a listener on
//! 127.0.0.1 in the root namespace whose thread connects from inside the control namespace)
//! carries [`ControlPlane::local_kubeconfig`], [`ControlPlane::kube_client`] and
//! [`ControlPlane::kubectl`]. Nothing else is opened outside the namespace.
//!
//! Binaries: `$LBX_K8S_BIN_DIR` (kube-apiserver, kube-controller-manager, kubectl; default
//! `~/.cache/lbx/k8s/1.34.10/bin` from `cargo xtask k8s-build`) and `$LBX_ETCD_BIN` (default
//! `~/.cache/lbx/etcd/*/usr/bin/etcd` from `cargo xtask setup`). Certificates, keys, tokens,
//! kubeconfigs, etcd's data and every log live in one temporary directory, removed on drop;
//! with `LBX_KEEP_LOGS=1` it is kept when start-up fails or the test panics.
//!
//! Processes are spawned from one long-lived thread that has joined the namespace: children
//! inherit its namespace, and PR_SET_PDEATHSIG ties them to that thread, so a killed test run
//! leaves no API server behind.

use std::{
    collections::HashMap,
    ffi::OsString,
    fmt,
    fs::{self, File},
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{
        fd::AsRawFd,
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};

use crate::netns::{self, NetNs, NetnsError};

/// The Kubernetes release `cargo xtask k8s-build` builds by default.
pub const DEFAULT_K8S_VERSION: &str = "1.34.10";
/// Directory holding kube-apiserver, kube-controller-manager and kubectl.
pub const K8S_BIN_DIR_ENV: &str = "LBX_K8S_BIN_DIR";
/// Path of the etcd binary.
pub const ETCD_BIN_ENV: &str = "LBX_ETCD_BIN";
/// `LBX_KEEP_LOGS=1` keeps the temporary directory (logs, certificates) after a failure.
pub const KEEP_LOGS_ENV: &str = "LBX_KEEP_LOGS";

/// The API server's secure port, on the bind address inside the namespace.
pub const APISERVER_PORT: u16 = 6443;
/// `--service-cluster-ip-range`.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// ClusterIP of the `kubernetes` Service (first address of [`SERVICE_CIDR`]).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// `--service-node-port-range` (the Kubernetes default, spelt out).
pub const NODE_PORT_RANGE: &str = "30000-32767";
/// The service-account token issuer (and default audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The controllers kube-controller-manager runs (canonical 1.34 names; the old short names
/// endpointslice, endpointslicemirroring, serviceaccount, serviceaccount-token, namespace and
/// garbagecollector are aliases of these).
pub const CONTROLLERS: [&str; 6] = [
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "garbage-collector-controller",
];

/// Loopback ports inside the namespace.
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const CONTROLLER_MANAGER_PORT: u16 = 10257;

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(90);
const CONTROLLER_MANAGER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Between SIGTERM and SIGKILL at teardown (clients are gone by then, so the API server's
/// graceful shutdown is quick).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Between SIGTERM and SIGKILL in [`ControlPlane::stop_apiserver`]: with clients still
/// connected (the controller manager's watches) the API server would wait up to its request
/// timeout (60 s) for HTTP/2 connections to close; by this time it has stopped listening and
/// drained its short requests.
const APISERVER_STOP_GRACE: Duration = Duration::from_secs(3);
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Log lines quoted in a start-up error.
const LOG_TAIL_LINES: usize = 40;
/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_DIR: &str = "/run/netns";
const ADMIN_USER: &str = "lbx-admin";
const CONTROLLER_MANAGER_USER: &str = "system:kube-controller-manager";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("{what} not found at {}: {fix}", path.display())]
    MissingBinary {
        what: &'static str,
        path: PathBuf,
        fix: String,
    },
    #[error(
        "neither XDG_CACHE_HOME nor HOME is set: set HOME, or point {K8S_BIN_DIR_ENV} and \
         {ETCD_BIN_ENV} at the binaries"
    )]
    NoCacheDir,
    #[error("control-plane namespace: {step}: {source}")]
    Netns {
        step: String,
        #[source]
        source: NetnsError,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{command}` failed ({status}): {stderr}; the fixture makes its PKI with the openssl \
         CLI (Debian: apt-get install -y openssl)"
    )]
    Openssl {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not start {component} ({}): {source}", binary.display())]
    Spawn {
        component: &'static str,
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{component} {problem} after {waited:.1?}; last lines of {}:\n{tail}\n{}",
        log.display(),
        keep_hint(log, *kept)
    )]
    NotReady {
        component: &'static str,
        problem: String,
        waited: Duration,
        log: PathBuf,
        tail: String,
        /// Whether the work dir (the log's directory) survives the failure (LBX_KEEP_LOGS=1).
        kept: bool,
    },
    #[error("etcd: {problem}")]
    Etcd { problem: String },
    #[error("{action} {component}: it is {state}")]
    State {
        action: &'static str,
        component: &'static str,
        state: &'static str,
    },
    #[error("reading kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("building a Kubernetes client for {server}: {source}")]
    Client {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error("the control-plane thread in namespace {ns} {what}")]
    Thread { ns: String, what: String },
}

type Result<T, E = ControlPlaneError> = std::result::Result<T, E>;

fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ControlPlaneError {
    let path = path.into();
    move |source| ControlPlaneError::Io {
        action,
        path,
        source,
    }
}

/// The four programs the fixture runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
}

impl Binaries {
    /// Finds the binaries from the environment or the caches `cargo xtask k8s-build` and
    /// `cargo xtask setup` fill; errors say which command provides a missing one.
    pub fn locate() -> Result<Self> {
        let (k8s_dir, k8s_fix) = match std::env::var_os(K8S_BIN_DIR_ENV) {
            Some(dir) if !dir.is_empty() => (
                PathBuf::from(dir),
                format!("{K8S_BIN_DIR_ENV} points at a directory without it; unset it or run `cargo xtask k8s-build`"),
            ),
            _ => (
                cache_dir()?
                    .join("lbx/k8s")
                    .join(DEFAULT_K8S_VERSION)
                    .join("bin"),
                format!(
                    "build it with `cargo xtask k8s-build --version {DEFAULT_K8S_VERSION}` \
                     (or set {K8S_BIN_DIR_ENV})"
                ),
            ),
        };
        let k8s = |name: &'static str| {
            let path = k8s_dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ControlPlaneError::MissingBinary {
                    what: name,
                    path,
                    fix: k8s_fix.clone(),
                })
            }
        };
        Ok(Binaries {
            kube_apiserver: k8s("kube-apiserver")?,
            kube_controller_manager: k8s("kube-controller-manager")?,
            kubectl: k8s("kubectl")?,
            etcd: locate_etcd()?,
        })
    }
}

fn locate_etcd() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(ETCD_BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ControlPlaneError::MissingBinary {
                what: "etcd",
                path,
                fix: format!("{ETCD_BIN_ENV} names no file; unset it or run `cargo xtask setup`"),
            })
        };
    }
    let root = cache_dir()?.join("lbx/etcd");
    let missing = || ControlPlaneError::MissingBinary {
        what: "etcd",
        path: root.join("<debian-version>/usr/bin/etcd"),
        fix: format!("unpack it with `cargo xtask setup` (or set {ETCD_BIN_ENV})"),
    };
    let mut versions: Vec<PathBuf> = match fs::read_dir(&root) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path().join("usr/bin/etcd"))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    // Several versions only after a Debian update: take the highest-sorting one.
    versions.sort();
    versions.pop().ok_or_else(missing)
}

/// `$XDG_CACHE_HOME`, else `~/.cache` (where the xtask commands put their caches).
fn cache_dir() -> Result<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".cache"))
        })
        .ok_or(ControlPlaneError::NoCacheDir)
}

/// The end of a start-up error: where the files are, or how to keep them.
fn keep_hint(log: &Path, kept: bool) -> String {
    let dir = log.parent().unwrap_or(log).display();
    if kept {
        format!("(files kept in {dir})")
    } else {
        format!("(set {KEEP_LOGS_ENV}=1 to keep {dir} and every log after a failure)")
    }
}

fn keep_logs() -> bool {
    std::env::var_os(KEEP_LOGS_ENV).is_some_and(|v| v == "1")
}

/// The fixture's temporary directory, removed on drop unless `keep` was set.
#[derive(Debug)]
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create() -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "lbx-controlplane-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover of a killed run with a reused pid: it is ours to replace.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io_err("create", &path))?;
        // Keys and tokens live here.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .map_err(io_err("restrict permissions of", &path))?;
        Ok(WorkDir { path, keep: false })
    }

    fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn write(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        let path = self.join(name);
        fs::write(&path, contents).map_err(io_err("write", &path))?;
        Ok(path)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("lbx: kept control-plane files in {}", self.path.display());
        } else if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("lbx: could not remove {}: {e}", self.path.display());
        }
    }
}

/// Joins the calling thread to namespace `ns` (only this thread: sockets it opens and
/// processes it spawns live there).
fn enter_netns(ns: &str) -> Result<(), NetnsError> {
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    // SAFETY: file is an open namespace fd; setns affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Setns {
            name: ns.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Spawns a named thread that first joins `ns`, then runs `body`; returns once the thread is
/// in the namespace.
fn spawn_in_netns<F>(ns: &str, name: String, body: F) -> Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns_owned = ns.to_owned();
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let entered = enter_netns(&ns_owned);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                body();
            }
        })
        .map_err(io_err("spawn a thread for namespace", ns))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(source)) => {
            let _ = handle.join();
            Err(ControlPlaneError::Netns {
                step: format!("joining {ns}"),
                source,
            })
        }
        Err(_) => Err(ControlPlaneError::Thread {
            ns: ns.to_owned(),
            what: "died before joining the namespace".into(),
        }),
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A long-lived thread inside the control namespace that runs jobs: spawning the
/// components (they inherit its namespace, and their PR_SET_PDEATHSIG follows this thread,
/// which lives as long as the fixture) and probing them on loopback.
#[derive(Debug)]
struct NsThread {
    ns: String,
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl NsThread {
    fn start(ns: &str) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = spawn_in_netns(ns, format!("lbx-cp-{ns}"), move || {
            for job in rx {
                job();
            }
        })?;
        Ok(NsThread {
            ns: ns.to_owned(),
            jobs: Some(tx),
            handle: Some(handle),
        })
    }

    /// Runs `f` on the namespace thread and returns its result.
    fn run<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let dead = || ControlPlaneError::Thread {
            ns: self.ns.clone(),
            what: "is gone (a job panicked?)".into(),
        };
        self.jobs
            .as_ref()
            .expect("jobs is only taken in drop")
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| dead())?;
        rx.recv().map_err(|_| dead())
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// One component process with its output in a log file; stopped by PID on drop.
#[derive(Debug)]
struct Proc {
    component: &'static str,
    child: Child,
}

impl Proc {
    /// Must run on the [`NsThread`]: the child inherits that thread's namespace.
    fn spawn(
        component: &'static str,
        binary: &Path,
        args: &[OsString],
        log: &Path,
    ) -> Result<Proc> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err("open log", log))?;
        let err = out.try_clone().map_err(io_err("open log", log))?;
        let mut cmd = Command::new(binary);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe and the closure touches no shared state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ControlPlaneError::Spawn {
            component,
            binary: binary.to_owned(),
            source,
        })?;
        Ok(Proc { component, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited (reaping it).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace` (at once for a zero grace); waits for the exit.
    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let pid = self.child.id() as libc::pid_t;
        if !grace.is_zero() {
            // SAFETY: kill(2) on our own child that is not reaped yet: the pid cannot be
            // reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if grace >= STOP_GRACE {
            eprintln!(
                "lbx: {} (pid {pid}) still runs {grace:?} after SIGTERM; sending SIGKILL",
                self.component
            );
        }
        // SAFETY: as above, still unreaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

/// The last `n` lines of a log file (long lines cut), for error messages.
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(text) = fs::read(path) else {
        return format!("  (cannot read {})", path.display());
    };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        return "  (empty)".into();
    }
    lines[start..]
        .iter()
        .map(|l| {
            let cut: String = l.chars().take(400).collect();
            format!("  {cut}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Copies bytes between connections accepted on 127.0.0.1 in the root namespace and the API
/// server inside the control namespace: the listener is created by the caller (root
/// namespace), the upstream connections by the accept thread, which has joined the control
/// namespace; sockets keep the namespace they were created in.
#[derive(Debug)]
struct Forwarder {
    local: SocketAddrV4,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, [TcpStream; 2]>>>,
    accept: Option<JoinHandle<()>>,
}

impl Forwarder {
    fn start(ns: &str, upstream: SocketAddr) -> Result<Forwarder> {
        let any = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let listener = TcpListener::bind(any).map_err(io_err("listen on", "127.0.0.1:0"))?;
        let local = match listener.local_addr() {
            Ok(SocketAddr::V4(a)) => a,
            Ok(other) => unreachable!("bound an IPv4 address, got {other}"),
            Err(source) => return Err(io_err("read the address of", "127.0.0.1:0")(source)),
        };
        let accepting = listener
            .try_clone()
            .map_err(io_err("clone the listener on", local.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            spawn_in_netns(ns, format!("lbx-fwd-{}", local.port()), move || {
                accept_loop(accepting, upstream, &stop, &conns)
            })?
        };
        Ok(Forwarder {
            local,
            listener,
            stop,
            conns,
            accept: Some(accept),
        })
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    stop: &AtomicBool,
    conns: &Arc<Mutex<HashMap<u64, [TcpStream; 2]>>>,
) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((client, _)) = accepted else {
            // EMFILE and the like: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        // The API server may be stopped on purpose: refusing the client is the honest
        // answer, like connecting to the real address would be.
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        conns
            .lock()
            .expect("no panics under the lock")
            .insert(id, [c3, s3]);
        for (from, to) in [(client, server), (s2, c2)] {
            let conns = conns.clone();
            let _ = std::thread::Builder::new()
                .name(format!("lbx-fwd-conn-{id}"))
                .spawn(move || pipe(from, to, id, &conns));
        }
    }
}

/// One direction of a forwarded connection; the first direction to end closes both.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    id: u64,
    conns: &Mutex<HashMap<u64, [TcpStream; 2]>>,
) {
    let _ = io::copy(&mut from, &mut to);
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
    conns.lock().expect("no panics under the lock").remove(&id);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept(2) (Linux returns EINVAL for a shut-down listener).
        // SAFETY: shutdown(2) on a socket fd we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for [a, b] in self
            .conns
            .lock()
            .expect("no panics under the lock")
            .values()
        {
            let _ = a.shutdown(std::net::Shutdown::Both);
            let _ = b.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Runs `openssl ARGS` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    let command = netns::describe(&cmd);
    let out = cmd.output().map_err(|e| ControlPlaneError::Openssl {
        command: command.clone(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ControlPlaneError::Openssl {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_err("read", "/dev/urandom"))?;
    Ok(buf)
}

fn random_hex<const N: usize>() -> Result<String> {
    Ok(random_bytes::<N>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Standard base64 with padding (kubeconfig's `certificate-authority-data`).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The CA, the API server's serving certificate and the service-account key pair.
#[derive(Debug)]
struct Pki {
    ca_cert: PathBuf,
    ca_pem: String,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    fn create(dir: &WorkDir, bind: Ipv4Addr) -> Result<Pki> {
        let d = &dir.path;
        dir.write(
            "ca.cnf",
            b"[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3_ca\n\
              [dn]\nCN = lbx-test-ca\n\
              [v3_ca]\nbasicConstraints = critical,CA:TRUE\n\
              keyUsage = critical,keyCertSign,cRLSign,digitalSignature\n\
              subjectKeyIdentifier = hash\n",
        )?;
        #[rustfmt::skip]
        openssl(d, &["req", "-x509", "-config", "ca.cnf", "-newkey", "rsa:2048", "-nodes",
                     "-keyout", "ca.key", "-out", "ca.crt", "-days", "7"])?;

        let mut ips = vec![bind, Ipv4Addr::LOCALHOST, KUBERNETES_SERVICE_IP];
        ips.dedup();
        let mut sans: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        for dns in [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            sans.push(format!("DNS:{dns}"));
        }
        dir.write(
            "apiserver.cnf",
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = kube-apiserver\n\
                 [v3_serving]\nbasicConstraints = critical,CA:FALSE\n\
                 keyUsage = critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage = serverAuth\n\
                 subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
                 subjectAltName = {}\n",
                sans.join(",")
            )
            .as_bytes(),
        )?;
        #[rustfmt::skip]
        openssl(d, &["req", "-new", "-config", "apiserver.cnf", "-newkey", "rsa:2048", "-nodes",
                     "-keyout", "apiserver.key", "-out", "apiserver.csr"])?;
        let serial = format!("0x{}", random_hex::<16>()?);
        #[rustfmt::skip]
        openssl(d, &["x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                     "-set_serial", &serial, "-days", "7", "-extfile", "apiserver.cnf",
                     "-extensions", "v3_serving", "-out", "apiserver.crt"])?;

        #[rustfmt::skip]
        openssl(d, &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                     "-out", "sa.key"])?;
        openssl(d, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;

        let ca_cert = dir.join("ca.crt");
        let ca_pem = fs::read_to_string(&ca_cert).map_err(io_err("read", &ca_cert))?;
        Ok(Pki {
            ca_cert,
            ca_pem,
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        })
    }
}

/// A kubeconfig with one cluster (CA embedded), one token user and one context, as JSON
/// (which every kubeconfig reader accepts as YAML).
fn kubeconfig_text(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "lbx",
            "cluster": {
                "server": server,
                "certificate-authority-data": base64(ca_pem.as_bytes()),
            },
        }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{
            "name": "lbx",
            "context": { "cluster": "lbx", "user": user },
        }],
        "current-context": "lbx",
    });
    serde_json::to_string_pretty(&config).expect("a JSON value serializes")
}

/// Builds a client from a kubeconfig file. Async because kube's loader is.
async fn client_from(path: &Path) -> Result<kube::Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).map_err(|source| ControlPlaneError::Kubeconfig {
            path: path.to_owned(),
            source,
        })?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| ControlPlaneError::Kubeconfig {
            path: path.to_owned(),
            source,
        })?;
    let server = config.cluster_url.to_string();
    kube::Client::try_from(config).map_err(|source| ControlPlaneError::Client { server, source })
}

/// GET `path` on the server of `client`, as text.
async fn get_text(client: &kube::Client, path: &str) -> Result<String, kube::Error> {
    let name = path.trim_start_matches('/');
    let request = kube::core::Request::new("")
        .get(name, &Default::default())
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(request).await
}

/// A current-thread runtime for the probes that run on the namespace thread.
fn probe_runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// One plain-HTTP GET of etcd's /health on loopback; `Ok` when it reports healthy.
fn etcd_health() -> Result<(), String> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, ETCD_CLIENT_PORT);
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let healthy = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("health")
                .and_then(|h| h.as_str())
                .map(|h| h == "true")
        });
    if healthy == Some(true) {
        Ok(())
    } else {
        Err(format!("/health answered {:?}", body.trim()))
    }
}

/// One plain-HTTP POST of JSON to etcd's v3 gateway on loopback; the answer's JSON body.
fn etcd_post(path: &str, body: &serde_json::Value) -> Result<serde_json::Value, String> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, ETCD_CLIENT_PORT);
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "POST {path}: {}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("POST {path}: {e}: {body:?}"))
}

/// Writes a key outside the API server's prefix (moving etcd's revision on) and compacts
/// etcd's history up to it; returns the revision.
fn etcd_bump_and_compact() -> Result<i64, String> {
    // ByteString serializes as base64, which is what the gateway wants for bytes.
    let b64 = |s: &str| serde_json::json!(k8s_openapi::ByteString(s.as_bytes().to_vec()));
    let put = etcd_post(
        "/v3/kv/put",
        &serde_json::json!({"key": b64("/lbx-test/expire"), "value": b64("x")}),
    )?;
    // int64 fields come as JSON strings from the gateway.
    let revision: i64 = put["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .or_else(|| put["header"]["revision"].as_i64())
        .ok_or_else(|| format!("put answered without a revision: {put}"))?;
    etcd_post(
        "/v3/kv/compaction",
        &serde_json::json!({"revision": revision.to_string(), "physical": true}),
    )?;
    Ok(revision)
}

/// Which component a probe waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    Etcd,
    Apiserver,
    ControllerManager,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::Apiserver => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
        }
    }

    fn timeout(self) -> Duration {
        match self {
            Component::Etcd => ETCD_READY_TIMEOUT,
            Component::Apiserver => APISERVER_READY_TIMEOUT,
            Component::ControllerManager => CONTROLLER_MANAGER_READY_TIMEOUT,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A real etcd + kube-apiserver + kube-controller-manager in a network namespace. Dropping
/// it stops the processes (SIGTERM, then SIGKILL), deletes the namespace it created and
/// removes its files.
#[derive(Debug)]
pub struct ControlPlane {
    // Drop order matters and is spelled out in Drop; these are Options so stop/start and
    // Drop can take them.
    forwarder: Option<Forwarder>,
    controller_manager: Option<Proc>,
    apiserver: Option<Proc>,
    etcd: Option<Proc>,
    thread: Option<NsThread>,
    own_ns: Option<NetNs>,
    dir: WorkDir,
    ns: String,
    bind: Ipv4Addr,
    binaries: Binaries,
    pki: Option<Pki>,
    admin_token: String,
    apiserver_args: Vec<OsString>,
    kubeconfig: PathBuf,
    local_kubeconfig: PathBuf,
    /// Set while start() runs, so a failed start keeps the logs with LBX_KEEP_LOGS=1.
    starting: bool,
}

impl ControlPlane {
    /// Starts the control plane inside the existing namespace `ns`: etcd on 127.0.0.1, the
    /// API server on `bind:6443` (`bind` must be an address of `ns`, e.g.
    /// [`crate::topology::CONTROL_ADDR`]), kube-controller-manager on 127.0.0.1. Returns once
    /// the API server's /readyz and the controller manager's /healthz answer `ok` and the
    /// `default` ServiceAccount exists.
    pub fn start(ns: &str, bind: Ipv4Addr) -> Result<ControlPlane> {
        Self::start_with_binaries(ns, bind, Binaries::locate()?)
    }

    /// [`ControlPlane::start`] with explicit binaries instead of [`Binaries::locate`].
    pub fn start_with_binaries(
        ns: &str,
        bind: Ipv4Addr,
        binaries: Binaries,
    ) -> Result<ControlPlane> {
        Self::launch(ns.to_owned(), None, bind, binaries)
    }

    /// Starts the control plane in a namespace of its own (`lbx-<pid>-<seq>-ctl`, only
    /// loopback up), bound to 127.0.0.1 there; the namespace is deleted on drop.
    pub fn start_isolated() -> Result<ControlPlane> {
        Self::start_isolated_with_binaries(Binaries::locate()?)
    }

    /// [`ControlPlane::start_isolated`] with explicit binaries.
    pub fn start_isolated_with_binaries(binaries: Binaries) -> Result<ControlPlane> {
        let netns_err = |step: &str| {
            let step = step.to_owned();
            move |source| ControlPlaneError::Netns { step, source }
        };
        for name in netns::cleanup_stale().map_err(netns_err("removing stale namespaces"))? {
            eprintln!("lbx: removed stale namespace {name}");
        }
        let name = format!("{}-ctl", netns::unique_prefix());
        let ns = NetNs::create(&name).map_err(netns_err("creating the namespace"))?;
        Self::launch(name, Some(ns), Ipv4Addr::LOCALHOST, binaries)
    }

    fn launch(
        ns: String,
        own_ns: Option<NetNs>,
        bind: Ipv4Addr,
        binaries: Binaries,
    ) -> Result<ControlPlane> {
        let dir = WorkDir::create()?;
        let mut cp = ControlPlane {
            forwarder: None,
            controller_manager: None,
            apiserver: None,
            etcd: None,
            thread: None,
            own_ns,
            kubeconfig: dir.join("admin.kubeconfig"),
            local_kubeconfig: dir.join("local.kubeconfig"),
            dir,
            ns,
            bind,
            binaries,
            pki: None,
            admin_token: String::new(),
            apiserver_args: Vec::new(),
            starting: true,
        };
        cp.boot()?;
        cp.starting = false;
        Ok(cp)
    }

    fn boot(&mut self) -> Result<()> {
        let pki = Pki::create(&self.dir, self.bind)?;
        self.admin_token = random_hex::<24>()?;
        let controller_manager_token = random_hex::<24>()?;
        // token,user,uid,"groups": both identities are cluster admins (RBAC's
        // system:masters); the controller manager runs every controller under its own name.
        let tokens = self.dir.write(
            "tokens.csv",
            format!(
                "{},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n\
                 {controller_manager_token},{CONTROLLER_MANAGER_USER},\
                 {CONTROLLER_MANAGER_USER},\"system:masters\"\n",
                self.admin_token
            )
            .as_bytes(),
        )?;
        let server = self.server_url();
        let local_server = |port: u16| format!("https://127.0.0.1:{port}");
        fs::write(
            &self.kubeconfig,
            kubeconfig_text(&server, &pki.ca_pem, ADMIN_USER, &self.admin_token),
        )
        .map_err(io_err("write", &self.kubeconfig))?;
        let kcm_kubeconfig = self.dir.write(
            "controller-manager.kubeconfig",
            kubeconfig_text(
                &server,
                &pki.ca_pem,
                CONTROLLER_MANAGER_USER,
                &controller_manager_token,
            )
            .as_bytes(),
        )?;

        self.apiserver_args = self.apiserver_args(&pki, &tokens);
        self.pki = Some(pki);
        self.thread = Some(NsThread::start(&self.ns)?);

        self.start_etcd()?;
        self.start_apiserver()?;
        self.start_controller_manager(&kcm_kubeconfig)?;

        let upstream = SocketAddr::from((self.bind, APISERVER_PORT));
        let forwarder = Forwarder::start(&self.ns, upstream)?;
        let ca_pem = &self.pki.as_ref().expect("set above").ca_pem;
        fs::write(
            &self.local_kubeconfig,
            kubeconfig_text(
                &local_server(forwarder.local.port()),
                ca_pem,
                ADMIN_USER,
                &self.admin_token,
            ),
        )
        .map_err(io_err("write", &self.local_kubeconfig))?;
        self.forwarder = Some(forwarder);
        // The forwarded path is what tests use: prove it once, from this (root) namespace.
        self.wait_local_ready()?;
        Ok(())
    }

    fn apiserver_args(&self, pki: &Pki, tokens: &Path) -> Vec<OsString> {
        let path = |flag: &str, p: &Path| {
            let mut s = OsString::from(format!("--{flag}="));
            s.push(p);
            s
        };
        let mut args: Vec<OsString> = [
            format!("--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            format!("--bind-address={}", self.bind),
            format!("--advertise-address={}", self.bind),
            format!("--secure-port={APISERVER_PORT}"),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--service-node-port-range={NODE_PORT_RANGE}"),
            "--allow-privileged=true".into(),
            // The `kubernetes` Service's endpoints name the bind address, which may not be
            // loopback: an isolated control plane has no other, so it publishes none.
            format!(
                "--endpoint-reconciler-type={}",
                if self.bind.is_loopback() {
                    "none"
                } else {
                    "lease"
                }
            ),
            "--profiling=false".into(),
            "--v=1".into(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.extend([
            path("tls-cert-file", &pki.serving_cert),
            path("tls-private-key-file", &pki.serving_key),
            path("client-ca-file", &pki.ca_cert),
            path("token-auth-file", tokens),
            path("service-account-key-file", &pki.sa_pub),
            path("service-account-signing-key-file", &pki.sa_key),
            path("cert-dir", &self.dir.join("apiserver-certs")),
        ]);
        args
    }

    fn thread(&self) -> &NsThread {
        self.thread
            .as_ref()
            .expect("the namespace thread lives until drop")
    }

    /// Spawns a component on the namespace thread.
    fn spawn(&self, component: Component, binary: &Path, args: Vec<OsString>) -> Result<Proc> {
        let log = self.dir.join(&format!("{component}.log"));
        let binary = binary.to_owned();
        self.thread()
            .run(move || Proc::spawn(component.name(), &binary, &args, &log))?
    }

    fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.join("etcd-data");
        let client = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let mut args: Vec<OsString> = vec!["--data-dir".into(), data.into()];
        for arg in [
            "--name=lbx".to_owned(),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=lbx={peer}"),
            "--logger=zap".to_owned(),
            "--log-outputs=stderr".to_owned(),
        ] {
            args.push(arg.into());
        }
        let binary = self.binaries.etcd.clone();
        self.etcd = Some(self.spawn(Component::Etcd, &binary, args)?);
        self.wait_ready(Component::Etcd)
    }

    fn start_controller_manager(&mut self, kubeconfig: &Path) -> Result<()> {
        let pki = self
            .pki
            .as_ref()
            .expect("PKI is made before the components");
        let path = |flag: &str, p: &Path| {
            let mut s = OsString::from(format!("--{flag}="));
            s.push(p);
            s
        };
        let mut args: Vec<OsString> = vec![
            path("kubeconfig", kubeconfig),
            path("service-account-private-key-file", &pki.sa_key),
            path("root-ca-file", &pki.ca_cert),
            path("cert-dir", &self.dir.join("controller-manager-certs")),
        ];
        for arg in [
            format!("--controllers={}", CONTROLLERS.join(",")),
            "--leader-elect=false".to_owned(),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--secure-port={CONTROLLER_MANAGER_PORT}"),
            "--use-service-account-credentials=false".to_owned(),
            "--profiling=false".to_owned(),
            "--v=1".to_owned(),
        ] {
            args.push(arg.into());
        }
        let binary = self.binaries.kube_controller_manager.clone();
        self.controller_manager = Some(self.spawn(Component::ControllerManager, &binary, args)?);
        self.wait_ready(Component::ControllerManager)
    }

    /// Starts the API server again after [`ControlPlane::stop_apiserver`]: same flags, same
    /// port, same etcd (so every object is still there). Returns once /readyz answers `ok`.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self
            .apiserver
            .as_mut()
            .is_some_and(|p| p.exited().is_none())
        {
            return Err(ControlPlaneError::State {
                action: "cannot start",
                component: "kube-apiserver",
                state: "already running",
            });
        }
        let binary = self.binaries.kube_apiserver.clone();
        let args = self.apiserver_args.clone();
        self.apiserver = Some(self.spawn(Component::Apiserver, &binary, args)?);
        self.wait_ready(Component::Apiserver)
    }

    /// Stops the API server like an orderly shutdown: SIGTERM (it stops listening and
    /// drains short requests), SIGKILL 3 s later if connected clients still keep it up. etcd
    /// and the controller manager keep running; clients see connection errors until
    /// [`ControlPlane::start_apiserver`].
    pub fn stop_apiserver(&mut self) -> Result<()> {
        self.running_apiserver("cannot stop")?
            .stop(APISERVER_STOP_GRACE);
        Ok(())
    }

    /// What a long outage does to watch history, done now: etcd's revision moves past
    /// everything clients have seen and the history before it is compacted. Call while the
    /// API server is stopped; after [`ControlPlane::start_apiserver`] every watch that
    /// resumes from an older resourceVersion gets 410 Gone and must relist. Returns etcd's
    /// revision.
    pub fn expire_watch_history(&mut self) -> Result<i64> {
        if self.apiserver_running() {
            return Err(ControlPlaneError::State {
                action: "cannot expire the watch history of",
                component: "kube-apiserver",
                state: "running (its watch cache would keep serving the old history)",
            });
        }
        self.thread()
            .run(etcd_bump_and_compact)?
            .map_err(|problem| ControlPlaneError::Etcd { problem })
    }

    /// Kills the API server with SIGKILL, like a crash: no graceful shutdown at all.
    pub fn kill_apiserver(&mut self) -> Result<()> {
        self.running_apiserver("cannot kill")?.stop(Duration::ZERO);
        Ok(())
    }

    fn running_apiserver(&mut self, action: &'static str) -> Result<&mut Proc> {
        if !self.apiserver_running() {
            return Err(ControlPlaneError::State {
                action,
                component: "kube-apiserver",
                state: "not running",
            });
        }
        Ok(self.apiserver.as_mut().expect("checked above"))
    }

    /// Whether the API server process is running.
    pub fn apiserver_running(&mut self) -> bool {
        self.apiserver
            .as_mut()
            .is_some_and(|p| p.exited().is_none())
    }

    fn proc_mut(&mut self, component: Component) -> Option<&mut Proc> {
        match component {
            Component::Etcd => self.etcd.as_mut(),
            Component::Apiserver => self.apiserver.as_mut(),
            Component::ControllerManager => self.controller_manager.as_mut(),
        }
    }

    /// Polls `component`'s health endpoint from inside the namespace until it answers, the
    /// process exits, or its timeout passes.
    fn wait_ready(&mut self, component: Component) -> Result<()> {
        let start = Instant::now();
        let timeout = component.timeout();
        let kubeconfig = self.kubeconfig.clone();
        // The probe loop runs on the namespace thread; between rounds we look at the
        // process here, so an exit is reported at once instead of after the timeout.
        loop {
            if let Some(status) = self.proc_mut(component).and_then(Proc::exited) {
                return Err(self.not_ready(component, format!("exited ({status})"), start));
            }
            let kubeconfig = kubeconfig.clone();
            let probe = self.thread().run(move || probe(component, &kubeconfig))?;
            let last = match probe {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if start.elapsed() >= timeout {
                let problem = format!("did not become ready; last probe: {last}");
                return Err(self.not_ready(component, problem, start));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// Checks the forwarded path from the calling (root) namespace.
    fn wait_local_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        let path = self.local_kubeconfig.clone();
        let result = std::thread::scope(|s| {
            s.spawn(|| -> Result<(), String> {
                let rt = probe_runtime().map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let client = client_from(&path).await.map_err(|e| e.to_string())?;
                    let mut last = String::new();
                    while start.elapsed() < Duration::from_secs(10) {
                        match get_text(&client, "/readyz").await {
                            Ok(body) if body.trim() == "ok" => return Ok(()),
                            Ok(body) => last = format!("/readyz answered {:?}", body.trim()),
                            Err(e) => last = e.to_string(),
                        }
                        tokio::time::sleep(POLL_EVERY).await;
                    }
                    Err(last)
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the probe thread panicked".into()))
        });
        result.map_err(|e| {
            self.not_ready(
                Component::Apiserver,
                format!("answers inside the namespace but not through the loopback forwarder: {e}"),
                start,
            )
        })
    }

    fn not_ready(
        &mut self,
        component: Component,
        problem: String,
        start: Instant,
    ) -> ControlPlaneError {
        let log = self.dir.join(&format!("{component}.log"));
        ControlPlaneError::NotReady {
            component: component.name(),
            problem,
            waited: start.elapsed(),
            tail: log_tail(&log, LOG_TAIL_LINES),
            log,
            kept: keep_logs(),
        }
    }

    /// The namespace the components run in.
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// The API server's address inside the namespace.
    pub fn bind_addr(&self) -> Ipv4Addr {
        self.bind
    }

    /// `https://<bind>:6443`: the API server as the lab's namespaces reach it.
    pub fn server_url(&self) -> String {
        format!("https://{}:{APISERVER_PORT}", self.bind)
    }

    /// `https://127.0.0.1:<port>`: the forwarded API server, for the test process in the
    /// root namespace.
    pub fn local_server_url(&self) -> String {
        let port = self.forwarder.as_ref().map_or(0, |f| f.local.port());
        format!("https://127.0.0.1:{port}")
    }

    /// Kubeconfig (admin token, CA embedded) for processes inside the lab's namespaces:
    /// server [`ControlPlane::server_url`].
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Kubeconfig (admin token, CA embedded) for the test process in the root namespace:
    /// server [`ControlPlane::local_server_url`].
    pub fn local_kubeconfig(&self) -> &Path {
        &self.local_kubeconfig
    }

    /// Bearer token of a cluster admin (group system:masters).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The cluster CA certificate (PEM), which signed the API server's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.pki.as_ref().expect("PKI exists once started").ca_pem
    }

    /// The temporary directory with certificates, kubeconfigs and the components' logs
    /// (`etcd.log`, `kube-apiserver.log`, `kube-controller-manager.log`).
    pub fn work_dir(&self) -> &Path {
        &self.dir.path
    }

    /// The binaries in use.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// PIDs of the component processes that are still running.
    pub fn pids(&mut self) -> Vec<u32> {
        [
            self.etcd.as_mut(),
            self.apiserver.as_mut(),
            self.controller_manager.as_mut(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| p.exited().is_none().then(|| p.pid()))
        .collect()
    }

    /// An admin client through the loopback forwarder (call from the root namespace).
    pub async fn kube_client(&self) -> Result<kube::Client> {
        client_from(&self.local_kubeconfig).await
    }

    /// A client through the loopback forwarder that authenticates with `token` (e.g. a
    /// ServiceAccount token from the TokenRequest API), for RBAC checks.
    pub async fn client_with_token(&self, token: &str) -> Result<kube::Client> {
        let text = kubeconfig_text(&self.local_server_url(), self.ca_pem(), "token-user", token);
        let kubeconfig =
            Kubeconfig::from_yaml(&text).map_err(|source| ControlPlaneError::Kubeconfig {
                path: PathBuf::from("<in memory>"),
                source,
            })?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| ControlPlaneError::Kubeconfig {
                    path: PathBuf::from("<in memory>"),
                    source,
                })?;
        let server = config.cluster_url.to_string();
        kube::Client::try_from(config)
            .map_err(|source| ControlPlaneError::Client { server, source })
    }

    /// Writes `<work dir>/<name>.kubeconfig` for processes in the lab's namespaces (server
    /// [`ControlPlane::server_url`]) that authenticate with `token` (e.g. an agent's
    /// ServiceAccount token) and returns its path.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let text = kubeconfig_text(&self.server_url(), self.ca_pem(), name, token);
        self.dir
            .write(&format!("{name}.kubeconfig"), text.as_bytes())
    }

    /// `kubectl --kubeconfig <local kubeconfig>`, the release's own kubectl, for the test
    /// process in the root namespace.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.kubectl);
        cmd.arg("--kubeconfig").arg(&self.local_kubeconfig);
        cmd
    }
}

/// One readiness probe of `component`, run inside the namespace.
fn probe(component: Component, kubeconfig: &Path) -> Result<(), String> {
    match component {
        Component::Etcd => etcd_health(),
        Component::Apiserver => {
            let rt = probe_runtime().map_err(|e| e.to_string())?;
            rt.block_on(async {
                let client = client_from(kubeconfig).await.map_err(|e| e.to_string())?;
                match get_text(&client, "/readyz").await {
                    Ok(body) if body.trim() == "ok" => Ok(()),
                    Ok(body) => Err(format!("/readyz answered {:?}", body.trim())),
                    Err(e) => Err(format!("/readyz: {e}")),
                }
            })
        }
        Component::ControllerManager => {
            let rt = probe_runtime().map_err(|e| e.to_string())?;
            rt.block_on(async {
                // Serving on its self-signed certificate; /healthz needs no credentials.
                let url = format!("https://127.0.0.1:{CONTROLLER_MANAGER_PORT}");
                let mut config = kube::Config::new(url.parse().map_err(|e| format!("{url}: {e}"))?);
                config.accept_invalid_certs = true;
                config.connect_timeout = Some(Duration::from_secs(2));
                config.read_timeout = Some(Duration::from_secs(5));
                let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
                match get_text(&client, "/healthz").await {
                    Ok(body) if body.trim() == "ok" => {}
                    Ok(body) => return Err(format!("/healthz answered {:?}", body.trim())),
                    Err(e) => return Err(format!("/healthz: {e}")),
                }
                // Serving is not the same as running controllers: the ServiceAccount
                // controller's first act, the `default` account, proves they run.
                let admin = client_from(kubeconfig).await.map_err(|e| e.to_string())?;
                let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
                    kube::Api::namespaced(admin, "default");
                match accounts.get_opt("default").await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err("ServiceAccount default/default not created yet".into()),
                    Err(e) => Err(format!("reading ServiceAccount default/default: {e}")),
                }
            })
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Never panic here: we may be unwinding from a failed assertion.
        self.dir.keep = keep_logs() && (self.starting || std::thread::panicking());
        drop(self.forwarder.take());
        // Controllers first (they talk to the API server), etcd last.
        for proc in [
            self.controller_manager.take(),
            self.apiserver.take(),
            self.etcd.take(),
        ]
        .into_iter()
        .flatten()
        {
            drop(proc);
        }
        // The thread the children were tied to; then the namespace (ours only).
        drop(self.thread.take());
        drop(self.own_ns.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<ControlPlane>();
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn kubeconfig_is_readable_by_kube() {
        let text = kubeconfig_text("https://10.77.0.2:6443", "PEM", "lbx-admin", "secret");
        let kc = Kubeconfig::from_yaml(&text).expect("kube parses our kubeconfig");
        assert_eq!(kc.current_context.as_deref(), Some("lbx"));
        let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://10.77.0.2:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("UEVN"));
        let user = kc.auth_infos[0].auth_info.as_ref().expect("user");
        assert!(user.token.is_some());
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        let dir = WorkDir::create().expect("temp dir");
        let path = dir.write("x.log", b"1\n2\n3\n4\n").expect("write");
        assert_eq!(log_tail(&path, 2), "  3\n  4");
        assert!(log_tail(&dir.join("missing.log"), 2).contains("cannot read"));
    }
}
