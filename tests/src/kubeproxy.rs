//! A real kube-proxy inside a lab node's network namespace: started against the lab's API
//! server, its sync state read from its own `/metrics`, stopped by PID (with any
//! iptables-restore it left running) and its rules removed (`kube-proxy --cleanup`) when
//! dropped. Used by the side-by-side lab (instance mode) and by `bench agent` (the reference).
//!
//! Nothing here touches the root namespace: the process, its metrics/healthz listeners on
//! 127.0.0.1 and its rules all live in the node namespace. Conntrack sysctls are left alone
//! (`--conntrack-*` = 0) and `route_localnet` is not set (`--iptables-localhost-nodeports=false`).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::netns::{self, ChildGuard, NetnsError};

/// kube-proxy's `--metrics-bind-address` port (on 127.0.0.1 of the node namespace).
pub const METRICS_PORT: u16 = 10249;
/// kube-proxy's `--healthz-bind-address` port (on 127.0.0.1 of the node namespace).
pub const HEALTHZ_PORT: u16 = 10256;

#[derive(Debug, Error)]
pub enum KubeProxyError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is missing: install it (Debian: apt-get install -y iptables)", .0.display())]
    MissingTool(PathBuf),
    #[error("starting kube-proxy in {ns}: {source}")]
    Spawn { ns: String, source: NetnsError },
    #[error("`{command}` in {ns} failed ({status}): {stderr}")]
    Command {
        command: String,
        ns: String,
        status: String,
        stderr: String,
    },
    #[error("reading kube-proxy's /metrics in {ns}: {detail}")]
    Metrics { ns: String, detail: String },
    #[error("joining namespace {ns}: {source}")]
    Netns { ns: String, source: NetnsError },
}

type Result<T> = std::result::Result<T, KubeProxyError>;

/// Which iptables kube-proxy runs: Debian's default `iptables` is the nf_tables one; the
/// legacy (x_tables) one is selected with a PATH directory of links named like the tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesBackend {
    Legacy,
    Nft,
}

/// The tools kube-proxy runs, linked to their backend's variant.
const IPTABLES_TOOLS: [&str; 6] = [
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

impl IptablesBackend {
    pub fn name(self) -> &'static str {
        match self {
            IptablesBackend::Legacy => "legacy",
            IptablesBackend::Nft => "nft",
        }
    }

    /// `<dir>/iptables-<name>/`, holding `iptables` -> /usr/sbin/iptables-<name> and so on
    /// (the xtables multi-binaries dispatch on the name they are called by).
    pub fn shim_dir(self, dir: &Path) -> Result<PathBuf> {
        let dir = dir.join(format!("iptables-{}", self.name()));
        fs::create_dir_all(&dir).map_err(|source| KubeProxyError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        for tool in IPTABLES_TOOLS {
            let target = Path::new("/usr/sbin").join(self.variant(tool));
            if !target.exists() {
                return Err(KubeProxyError::MissingTool(target));
            }
            let link = dir.join(tool);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(&target, &link).map_err(|source| {
                    KubeProxyError::Io {
                        what: "linking",
                        path: link.clone(),
                        source,
                    }
                })?;
            }
        }
        Ok(dir)
    }

    /// Debian's name of `tool` for this backend: `ip6tables-save` -> `ip6tables-legacy-save`.
    pub fn variant(self, tool: &str) -> String {
        let (family, rest) = tool.split_once("tables").expect("every tool has 'tables'");
        format!("{family}tables-{}{rest}", self.name())
    }

    /// PATH for kube-proxy: the shim first.
    pub fn path_env(self, dir: &Path) -> Result<String> {
        let shim = self.shim_dir(dir)?;
        let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        Ok(format!("{}:{rest}", shim.display()))
    }

    /// The path of `tool` for this backend.
    pub fn tool(self, dir: &Path, tool: &str) -> Result<String> {
        Ok(self
            .shim_dir(dir)?
            .join(tool)
            .to_string_lossy()
            .into_owned())
    }
}

/// kube-proxy's `--proxy-mode`, with the iptables variant for iptables mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables(IptablesBackend),
    Nftables,
    Ipvs,
}

impl ProxyMode {
    /// The `--proxy-mode` value.
    pub fn flag(self) -> &'static str {
        match self {
            ProxyMode::Iptables(_) => "iptables",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ipvs => "ipvs",
        }
    }

    /// A label for reports: `iptables (legacy)`, `nftables`, `ipvs`.
    pub fn label(self) -> String {
        match self {
            ProxyMode::Iptables(b) => format!("iptables ({})", b.name()),
            m => m.flag().to_string(),
        }
    }

    /// The iptables tools this mode uses (ipvs mode also writes iptables rules; it uses
    /// Debian's default variant unless told otherwise).
    fn backend(self) -> Option<IptablesBackend> {
        match self {
            ProxyMode::Iptables(b) => Some(b),
            ProxyMode::Ipvs => Some(IptablesBackend::Nft),
            ProxyMode::Nftables => None,
        }
    }
}

/// How to start one kube-proxy.
#[derive(Clone, Debug)]
pub struct KubeProxySpec {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    /// `--hostname-override`: the Node object's name.
    pub node_name: String,
    /// The node's network namespace.
    pub ns: String,
    pub mode: ProxyMode,
    /// Holds the iptables shim directories.
    pub work_dir: PathBuf,
    /// stderr goes here (appended).
    pub log: PathBuf,
    /// `--v`.
    pub verbosity: u8,
}

/// A running kube-proxy; see the module doc.
#[derive(Debug)]
pub struct KubeProxy {
    child: Option<ChildGuard>,
    ns: String,
    bin: PathBuf,
    env: Vec<(&'static str, String)>,
    mode: ProxyMode,
    work_dir: PathBuf,
}

/// Makes `cmd` join network namespace `ns` between fork and exec (network namespace only:
/// the mount namespace stays ours).
fn join_netns_at_exec(cmd: &mut Command, ns: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let ns_file = File::open(&path).map_err(|source| KubeProxyError::Io {
        what: "opening namespace",
        path,
        source,
    })?;
    // SAFETY: setns is async-signal-safe; the closure only uses an fd it owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// `program args` in network namespace `ns`, stderr appended to `log`, stdout piped (for
/// [`ChildGuard::wait_for_line`]); stopped by PID when the guard drops.
pub fn spawn_in_ns(
    ns: &str,
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> Result<ChildGuard> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| KubeProxyError::Io {
            what: "opening",
            path: log.to_path_buf(),
            source,
        })?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    join_netns_at_exec(&mut cmd, ns)?;
    // SAFETY: dup2 is async-signal-safe; the closure only uses an fd it owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(log_file.as_raw_fd(), 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    ChildGuard::spawn(&mut cmd).map_err(|source| KubeProxyError::Spawn {
        ns: ns.to_string(),
        source,
    })
}

/// Runs `program args` to completion in network namespace `ns`; its stdout.
pub fn run_in_ns(ns: &str, program: &str, args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    join_netns_at_exec(&mut cmd, ns)?;
    let command = netns::describe(&cmd);
    let out = cmd.output().map_err(|source| KubeProxyError::Io {
        what: "running",
        path: PathBuf::from(program),
        source,
    })?;
    if !out.status.success() {
        return Err(KubeProxyError::Command {
            command,
            ns: ns.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Direct children of `pid` (every thread's), from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

impl KubeProxy {
    /// Starts kube-proxy; it syncs in the background (see [`KubeProxy::metrics`]).
    pub fn start(spec: &KubeProxySpec) -> Result<KubeProxy> {
        let path = match spec.mode.backend() {
            Some(b) => b.path_env(&spec.work_dir)?,
            None => std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin".into()),
        };
        #[rustfmt::skip]
        let args: Vec<String> = [
            "--kubeconfig", &spec.kubeconfig.to_string_lossy(),
            "--hostname-override", &spec.node_name,
            "--proxy-mode", spec.mode.flag(),
            "--metrics-bind-address", &format!("127.0.0.1:{METRICS_PORT}"),
            "--healthz-bind-address", &format!("127.0.0.1:{HEALTHZ_PORT}"),
            // Leave every conntrack sysctl (and the global hash size) as it is.
            "--conntrack-max-per-core", "0",
            "--conntrack-tcp-timeout-established", "0",
            "--conntrack-tcp-timeout-close-wait", "0",
            // No route_localnet sysctl.
            "--iptables-localhost-nodeports=false",
            "--v", &spec.verbosity.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let env = vec![("PATH", path)];
        let child = spawn_in_ns(&spec.ns, &spec.bin, &args, &env, &spec.log)?;
        Ok(KubeProxy {
            child: Some(child),
            ns: spec.ns.clone(),
            bin: spec.bin.clone(),
            env,
            mode: spec.mode,
            work_dir: spec.work_dir.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn mode(&self) -> ProxyMode {
        self.mode
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// One scrape of its `/metrics`.
    pub fn metrics(&self) -> Result<Metrics> {
        scrape(&self.ns)
    }

    /// `iptables-save -c` (or `nft list ruleset` in nftables mode) in the node namespace,
    /// with the tools kube-proxy uses.
    pub fn ruleset(&self) -> Result<String> {
        match self.mode.backend() {
            Some(b) if self.mode != ProxyMode::Nftables => {
                let save = b.tool(&self.work_dir, "iptables-save")?;
                run_in_ns(&self.ns, &save, &["-c"], &[])
            }
            _ => run_in_ns(&self.ns, "nft", &["list", "ruleset"], &[]),
        }
    }

    /// Stops it by PID (and any iptables-restore it started), then removes its rules.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(child) = self.child.take() {
            // An iptables-restore kube-proxy started would outlive it (Go does not kill its
            // children on exit) and keep the namespace and the xtables lock.
            let helpers = children_of(child.pid());
            child.stop();
            for pid in helpers {
                // SAFETY: kill(2) by PID on a process our kube-proxy started; it cannot be
                // reaped and reused before we look, as it was our child's child and is now
                // either still running or a zombie reparented to init.
                if Path::new("/proc").join(pid.to_string()).exists() {
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
        let bin = self.bin.to_string_lossy().into_owned();
        run_in_ns(&self.ns, &bin, &["--cleanup"], &self.env).map(drop)
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.finish() {
                eprintln!("lbx: cleaning up kube-proxy's rules in {}: {e}", self.ns);
            }
        }
    }
}

/// Rules in an `iptables-save -c` dump and the sum of their packet counters.
pub fn iptables_rule_stats(dump: &str) -> (u64, u64) {
    let mut rules = 0;
    let mut packets = 0;
    for line in dump.lines() {
        // `[packets:bytes] -A CHAIN ...`
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((counters, rule)) = rest.split_once("] ") else {
            continue;
        };
        if !rule.starts_with("-A ") {
            continue;
        }
        rules += 1;
        if let Some(p) = counters
            .split(':')
            .next()
            .and_then(|p| p.parse::<u64>().ok())
        {
            packets += p;
        }
    }
    (rules, packets)
}

/// Rules in an `nft list ruleset` dump (lines inside a chain that are not declarations)
/// and the sum of the packets of their `counter packets N bytes M` statements.
pub fn nft_rule_stats(dump: &str) -> (u64, u64) {
    let mut rules = 0;
    let mut packets = 0;
    let mut in_chain = false;
    for line in dump.lines().map(str::trim) {
        if line.starts_with("chain ") {
            in_chain = true;
            continue;
        }
        if line == "}" {
            in_chain = false;
            continue;
        }
        if !in_chain || line.is_empty() || line.starts_with("type ") || line.starts_with("policy") {
            continue;
        }
        rules += 1;
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words.windows(3) {
            if w[0] == "counter" && w[1] == "packets" {
                packets += w[2].parse::<u64>().unwrap_or(0);
            }
        }
    }
    (rules, packets)
}

/// One scrape of the `/metrics` of the kube-proxy in namespace `ns`.
pub fn scrape(ns: &str) -> Result<Metrics> {
    let text = netns::in_netns(ns, http_get_metrics)
        .map_err(|source| KubeProxyError::Netns {
            ns: ns.to_string(),
            source,
        })?
        .map_err(|detail| KubeProxyError::Metrics {
            ns: ns.to_string(),
            detail,
        })?;
    Ok(Metrics::parse(&text))
}

/// One GET of kube-proxy's /metrics on 127.0.0.1 (call from inside the node namespace).
fn http_get_metrics() -> std::result::Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("talking to {addr}: {e}");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(io)?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(io)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("no HTTP header end in the metrics answer")?;
    if !(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200")) {
        return Err(format!(
            "/metrics answered {:?}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.to_string())
}

/// Prometheus text format, one sample per `name{labels}`.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (key, rest) = match line.rfind('}') {
                Some(close) => (&line[..=close], &line[close + 1..]),
                None => match line.split_once(' ') {
                    Some(kv) => kv,
                    None => continue,
                },
            };
            if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                out.insert(key.to_string(), v);
            }
        }
        Metrics(out)
    }

    /// The sum over every label set of `name` (0 when absent).
    pub fn get(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.as_str() == name || (k.starts_with(name) && k[name.len()..].starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// `name`'s samples by the value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let prefix = format!("{name}{{");
        let needle = format!("{label}=\"");
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| {
                let start = k.find(&needle)? + needle.len();
                let end = k[start..].find('"')? + start;
                Some((k[start..end].to_string(), *v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_variants_follow_debian_names() {
        assert_eq!(
            IptablesBackend::Legacy.variant("ip6tables-save"),
            "ip6tables-legacy-save"
        );
        assert_eq!(IptablesBackend::Nft.variant("iptables"), "iptables-nft");
        assert_eq!(
            ProxyMode::Iptables(IptablesBackend::Legacy).label(),
            "iptables (legacy)"
        );
        assert_eq!(ProxyMode::Ipvs.flag(), "ipvs");
    }

    #[test]
    fn prometheus_text_is_summed_per_name_and_split_by_label() {
        let m = Metrics::parse(
            "# HELP x help\n# TYPE x counter\n\
             kubeproxy_sync_proxy_rules_duration_seconds_sum 1.5\n\
             kubeproxy_sync_proxy_rules_duration_seconds_count 3\n\
             kubeproxy_sync_proxy_rules_iptables_total{table=\"filter\"} 4\n\
             kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 40\n\
             kubeproxy_sync_proxy_rules_last_timestamp_seconds 1.7e+09\n\
             weird{label=\"a b\"} 2 1700000000\n",
        );
        assert_eq!(
            m.get("kubeproxy_sync_proxy_rules_duration_seconds_count"),
            3.0
        );
        assert_eq!(
            m.get("kubeproxy_sync_proxy_rules_duration_seconds_sum"),
            1.5
        );
        // The _sum must not be counted into a prefix of its name.
        assert_eq!(m.get("kubeproxy_sync_proxy_rules_duration_seconds"), 0.0);
        assert_eq!(m.get("kubeproxy_sync_proxy_rules_iptables_total"), 44.0);
        assert_eq!(
            m.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            1.7e9
        );
        assert_eq!(m.get("weird"), 2.0);
        assert_eq!(m.get("absent"), 0.0);
        let by_table = m.by_label("kubeproxy_sync_proxy_rules_iptables_total", "table");
        assert_eq!(
            by_table.into_iter().collect::<Vec<_>>(),
            [("filter".to_string(), 4.0), ("nat".to_string(), 40.0)]
        );
    }

    #[test]
    fn iptables_counters_are_summed_over_rules_only() {
        let dump = "*nat\n:PREROUTING ACCEPT [10:600]\n[5:300] -A PREROUTING -j KUBE-SERVICES\n\
                    [0:0] -A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-X\n\
                    [2:120] -A KUBE-NODEPORTS -p tcp -j KUBE-EXT-Y\nCOMMIT\n";
        assert_eq!(iptables_rule_stats(dump), (3, 7));
    }

    #[test]
    fn nft_rules_and_counters() {
        let dump = "table ip kube-proxy {\n\tchain services {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\
                    \t\tip daddr 10.96.0.1 tcp dport 443 counter packets 4 bytes 240 jump svc\n\
                    \t\tjump nodeports\n\t}\n\tmap m {\n\t\ttype ipv4_addr : verdict\n\t}\n}\n";
        assert_eq!(nft_rule_stats(dump), (2, 4));
    }
}
