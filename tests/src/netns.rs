//! Network-namespace plumbing for tests: RAII guards that clean up namespaces and processes
//! on drop (also while a failed assertion unwinds), command helpers whose errors carry the
//! tool's stderr, and `in_netns` to open real sockets inside a namespace from the test process.
//!
//! Every namespace is named `lbx-<pid>-<seq>...`: concurrent tests (threads of one process,
//! or other processes) never clash, and [`cleanup_stale`] can tell leftovers of a killed run
//! (creator pid dead) from namespaces someone is still using.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Prefix of every namespace the project creates (the lab rule: nothing outside `lbx-*`).
pub const PREFIX: &str = "lbx-";

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// How long a child gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "network-namespace tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) but run as \
         euid {euid}: run them as root, e.g. `sudo -E cargo test -p lb-tests`"
    )]
    NotRoot { euid: u32 },
    #[error(
        "`{tool}` is not usable ({detail}): install it (Debian: apt-get install -y {package})"
    )]
    MissingTool {
        tool: &'static str,
        package: &'static str,
        detail: String,
    },
    #[error("the kernel lacks {feature} ({detail}): use a kernel with network namespaces")]
    Kernel {
        feature: &'static str,
        detail: String,
    },
    #[error("namespace name {name:?} is invalid: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not open namespace {path}: {source}; was it created with `ip netns add`?")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setns(2) into namespace {name} failed: {source} (needs CAP_SYS_ADMIN)")]
    Setns {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: nothing after {waited:?}{detail}")]
    Timeout {
        what: String,
        waited: Duration,
        detail: String,
    },
}

/// Checks up front what every namespace test needs, so a missing prerequisite fails with a
/// message saying what to install instead of an obscure error halfway through a topology.
/// CI runs as root: a test that skipped here would be a failure in disguise, so this errors.
pub fn preflight() -> Result<(), NetnsError> {
    static OK: OnceLock<()> = OnceLock::new();
    if OK.get().is_some() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(NetnsError::NotRoot { euid });
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Err(NetnsError::Kernel {
            feature: "network namespaces",
            detail: "/proc/self/ns/net is missing".into(),
        });
    }
    tool_check("ip", "iproute2", &["-j", "-V"])?;
    tool_check("ethtool", "ethtool", &["--version"])?;
    let _ = OK.set(());
    Ok(())
}

fn tool_check(tool: &'static str, package: &'static str, args: &[&str]) -> Result<(), NetnsError> {
    let detail = match Command::new(tool).args(args).output() {
        Ok(out) if out.status.success() => return Ok(()),
        Ok(out) => format!(
            "`{tool} {}` exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => e.to_string(),
    };
    Err(NetnsError::MissingTool {
        tool,
        package,
        detail,
    })
}

/// A fresh name prefix `lbx-<pid>-<seq>`, unique among concurrent tests and processes.
/// Namespace names built on it (`<prefix>-net`, ...) are recognised by [`cleanup_stale`].
pub fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid encoded in a name made from [`unique_prefix`], if it is one.
fn creator_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let seq = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(seq) {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Deletes `lbx-<pid>-<seq>*` namespaces left behind by runs whose process is gone (a test
/// killed by a timeout never runs its destructors). Namespaces of live processes, names of
/// another shape, and namespaces that still hold processes are left alone.
/// Returns the names deleted.
pub fn cleanup_stale() -> Result<Vec<String>, NetnsError> {
    preflight()?;
    let mut deleted = Vec::new();
    for name in list_with_prefix(PREFIX)? {
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let path = Path::new(NETNS_DIR).join(&name);
        // Another process may be cleaning up at the same time: a namespace that vanished
        // under us is simply gone, not an error.
        let pids = match ip(&["netns", "pids", &name]) {
            Ok(pids) => pids,
            Err(_) if !path.exists() => continue,
            Err(e) => return Err(e),
        };
        if !pids.trim().is_empty() {
            eprintln!(
                "lbx: stale namespace {name} still holds processes {}; leaving it",
                pids.split_whitespace().collect::<Vec<_>>().join(",")
            );
            continue;
        }
        match ip(&["netns", "del", &name]) {
            Ok(_) => deleted.push(name),
            Err(_) if !path.exists() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Names of the existing namespaces that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>, NetnsError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetnsError::Io {
                path: NETNS_DIR.into(),
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` (must start with `lbx-`) with its loopback up.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        preflight()?;
        if !name.starts_with(PREFIX) {
            return Err(NetnsError::BadName {
                name: name.into(),
                reason: "project namespaces must start with `lbx-`",
            });
        }
        if name.contains('/') || name.len() > 200 {
            return Err(NetnsError::BadName {
                name: name.into(),
                reason: "names are file names under /run/netns: no `/`, at most 200 bytes",
            });
        }
        ip(&["netns", "add", name])?;
        // From here on the guard owns the namespace, so a failure below still deletes it.
        let ns = NetNs { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that `in_netns` and `setns(2)` open.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Never panic here: we may already be unwinding from a failed assertion.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("lbx: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// A spawned process, terminated on drop: SIGTERM, then SIGKILL after a grace period,
/// always by its own PID. The child also gets SIGKILL from the kernel if the spawning
/// thread dies (PR_SET_PDEATHSIG), so a killed test run leaves no servers behind; spawn it
/// from the thread that keeps the guard (not from inside a short-lived `in_netns` closure).
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    label: String,
    lines: Option<Receiver<String>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout piped (read it with
    /// [`ChildGuard::wait_for_line`]); stderr goes to the test's stderr.
    pub fn spawn(cmd: &mut Command) -> Result<Self, NetnsError> {
        let label = describe(cmd);
        // SAFETY: prctl is async-signal-safe; the closure touches no shared state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| NetnsError::Spawn {
                command: label.clone(),
                source,
            })?;
        Ok(ChildGuard {
            child,
            label,
            lines: None,
        })
    }

    /// Spawns `args` inside namespace `ns` (`ip netns exec NS args...`, which execs in
    /// place, so [`ChildGuard::pid`] is the program's own pid).
    pub fn spawn_in<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<Self, NetnsError> {
        preflight()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        Self::spawn(&mut cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the child prints a stdout line containing `needle` (typically its
    /// "ready" line) and returns that line. Fails if it exits first or `timeout` passes.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String, NetnsError> {
        if self.lines.is_none() {
            let Some(stdout) = self.child.stdout.take() else {
                return Err(NetnsError::Timeout {
                    what: format!("{}: stdout", self.label),
                    waited: Duration::ZERO,
                    detail: " (stdout is not piped)".into(),
                });
            };
            let (tx, rx) = mpsc::channel();
            // Keeps draining after the needle so the child never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            self.lines = Some(rx);
        }
        let rx = self.lines.as_ref().expect("set above");
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(NetnsError::Timeout {
                        what: format!("{} printing {needle:?}", self.label),
                        waited: start.elapsed(),
                        detail: format!(" (stdout so far: {seen:?})"),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(NetnsError::Timeout {
                        what: format!("{} printing {needle:?}", self.label),
                        waited: start.elapsed(),
                        detail: format!(
                            ": it closed stdout and exited ({status}); stdout: {seen:?}"
                        ),
                    });
                }
            }
        }
    }

    /// Terminates the child now (SIGTERM, then SIGKILL) and returns how it ended.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot be reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < TERM_GRACE {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "lbx: {} (pid {pid}) ignored SIGTERM for {TERM_GRACE:?}; sending SIGKILL",
            self.label
        );
        // SAFETY: as above, still unreaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A command line as text, for error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion; its stdout on success, an error with its stderr otherwise.
pub fn output(cmd: &mut Command) -> Result<String, NetnsError> {
    let command = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...` (use `-n NS` for a namespace: cheaper than `ip netns exec`).
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, NetnsError> {
    output(Command::new("ip").args(args))
}

/// `ip netns exec NS ARGS...`: runs any program inside namespace `ns`, returns its stdout.
pub fn run<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<String, NetnsError> {
    output(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// Runs `f` on a fresh thread that has joined namespace `ns` with setns(2), so sockets it
/// opens (and processes it spawns) live in that namespace; the caller's thread is
/// untouched. A panic in `f` (a failed assertion) propagates to the caller.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            // SAFETY: file is an open namespace fd; setns only affects this new thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Setns {
                    name: ns.to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
            drop(file);
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Writes sysctls (`("net/ipv4/ip_forward", "1")`, paths under /proc/sys) inside `ns`.
/// Network sysctls resolve against the writing thread's namespace, so this needs no
/// process per setting.
pub fn sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<(), NetnsError> {
    in_netns(ns, || {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value).map_err(|source| NetnsError::Io { path, source })?;
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_pid_only_matches_our_shape() {
        assert_eq!(creator_pid("lbx-123-0"), Some(123));
        assert_eq!(creator_pid("lbx-123-4-n0-p1"), Some(123));
        assert_eq!(creator_pid("lbx-123"), None);
        assert_eq!(creator_pid("lbx-lab-0"), None);
        assert_eq!(creator_pid("lbx-12a-0"), None);
        assert_eq!(creator_pid("other-123-0"), None);
    }

    #[test]
    fn unique_prefixes_differ() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert_eq!(creator_pid(&a), Some(std::process::id()));
    }
}
