//! The cluster: the lab's namespaces, control plane and agents (lb-tests' scenario), a real
//! kube-proxy per node, and BPF run-time statistics held on while it runs. What runs on it is
//! in [`crate::workload`]; how it is measured in [`crate::paths`], [`crate::probes`] and
//! [`crate::sweep`].

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::controlplane::SERVICE_CIDR;
use lb_tests::kubeproxy::{KubeProxy, KubeProxySpec};
use lb_tests::netns;
use lb_tests::scenario::{self, Lab, LabSpec, PodId};
use lb_tests::topology::TopologySpec;
use lb_user::node::options::RemoteMode;

use crate::cli::{mode_label, other_mode, LabArgs};
use crate::interrupt::{check_interrupted, sleep};
use crate::machine::enable_bpf_stats;
use crate::paths::{path_sources, xdp_leg};
use crate::progress::Progress;
use crate::report::{LabFootprint, PATHS};
use crate::workload::Extra;

/// How long the data plane may take to follow a change (API write, agents, kube-proxy).
pub(crate) const CONVERGE: Duration = Duration::from_secs(60);
/// How long kube-proxy and the agents may take to sync after the Services grew.
pub(crate) const SYNC_TIMEOUT: Duration = Duration::from_secs(900);

/// The lab with kube-proxy and the scenario's objects. Field order is drop order: the
/// kube-proxies (whose `--cleanup` needs the node namespaces) go before the lab.
pub(crate) struct Cluster {
    pub(crate) proxies: Vec<KubeProxy>,
    pub(crate) lab: Lab,
    pub(crate) args: LabArgs,
    /// The agents' `--max-services` (they are restarted with it).
    max_services: usize,
    /// The `--remote-mode` the agents run in now.
    pub(crate) remote_mode: RemoteMode,
    /// The ui pods, in the order they were started.
    pub(crate) replicas: Vec<PodId>,
    pub(crate) extras: Vec<Extra>,
    /// Holds BPF run-time statistics on (BPF_ENABLE_STATS) while it lives.
    _bpf_stats: Option<OwnedFd>,
    /// BPF program ids attached in the node namespaces (ours: XDP on eth0, TC on pod veths).
    pub(crate) prog_ids: Vec<u32>,
    pub(crate) notes: Vec<String>,
}

/// The agents' arguments beyond the lab's own (node, addresses, pins).
fn agent_args(args: &LabArgs, max_services: usize, mode: RemoteMode) -> Vec<String> {
    vec![
        "--max-services".into(),
        max_services.to_string(),
        "--maglev-size".into(),
        auto_maglev_size(max_services).to_string(),
        "--snat-ports".into(),
        args.snat_ports.clone(),
        "--remote-mode".into(),
        mode_label(mode),
    ]
}

/// The largest Maglev ring (prime) whose MAGLEV map for `max_services` stays within 64 MiB.
fn auto_maglev_size(max_services: usize) -> usize {
    const LIMIT: usize = 64 << 20;
    [16381usize, 4093, 1021]
        .into_iter()
        .find(|&m| m * max_services * 4 <= LIMIT)
        .unwrap_or(1021)
}

impl Cluster {
    pub(crate) fn start(
        args: &LabArgs,
        max_services: usize,
        progress: &Progress,
    ) -> Result<Cluster> {
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
            agent_args: agent_args(args, max_services, args.remote_mode),
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
        let other_leg = xdp_leg(other_mode(args.remote_mode));
        for path in PATHS.into_iter().chain([other_leg]) {
            for source in path_sources(path, lab.node_count()) {
                let addr = format!("{source}/32");
                netns::ip(&["-n", t.client_ns(), "addr", "add", &addr, "dev", "eth0"])
                    .with_context(|| format!("adding the {path} client address {source}"))?;
            }
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
            max_services,
            remote_mode: args.remote_mode,
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
    pub(crate) fn logs(&self) -> String {
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
    /// Restarts the agents in `mode` unless they run in it, and waits until they hold every
    /// Service again (ui-nlb accelerated, as every load expects it).
    pub(crate) fn set_remote_mode(&mut self, mode: RemoteMode, progress: &Progress) -> Result<()> {
        if self.remote_mode == mode {
            return Ok(());
        }
        progress.step(format!(
            "restarting the agents with --remote-mode {}",
            mode_label(mode)
        ));
        let started = Instant::now();
        self.lab
            .restart_agents(agent_args(&self.args, self.max_services, mode))
            .context("restarting the agents")?;
        self.remote_mode = mode;
        self.prog_ids = self.attached_programs()?;
        self.set_accelerated(true)?;
        self.wait_programmed()?;
        progress.step(format!(
            "the agents run --remote-mode {} and hold every Service ({:.1}s)",
            mode_label(mode),
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

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

    pub(crate) fn kube<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(kube::Client) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        Ok(self.lab.kube(f)?)
    }

    pub(crate) fn footprint(&mut self) -> LabFootprint {
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
    pub(crate) fn shutdown(mut self) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn maglev_size_follows_the_map_budget() {
        assert_eq!(auto_maglev_size(17), 16381);
        assert_eq!(auto_maglev_size(10_016), 1021);
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
