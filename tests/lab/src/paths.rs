//! Measuring one path (instance, xdp or ip): its targets, the load on it, and everything
//! observed while the load ran, into a [`PathResult`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Result;
use lb_tests::scenario::{self, NftProbe, PodId, TCP_NODE_PORT, TCP_TARGET_PORT};

use crate::cli::CompareArgs;
use crate::cluster::Cluster;
use crate::interrupt::check_interrupted;
use crate::loadgen::{self, LoadResult, LoadSpec, Mode};
use crate::machine::{cpu_busy_s, wait_quiet};
use crate::progress::Progress;
use crate::report::PathResult;
use lb_user::node::options::RemoteMode;

/// Each path's load comes from its own client addresses (added to the client namespace),
/// so no TCP tuple is shared between paths: a port reused across paths within seconds would
/// meet the pod's TIME_WAIT (with another path's timestamps) or a closing flow of lbx.
/// The xdp path has one per node frontend (`targets[i]` from `sources[i % len]`, see
/// [`LoadSpec::sources`]): it keeps the client's address, so flows through two nodes to
/// one pod share the pod's side of the tuple, and the client's kernel picks ports per
/// destination; with one address a port it reuses towards n1 while the pod still holds
/// it in TIME_WAIT from n0 costs a SYN retry (about 10 ms) in ip-mode-like delivery. Real
/// clients behind a load balancer are many addresses; ip mode's and instance mode's
/// (whose pods see the node) tuples never meet that way. See the README's "Tunnel delivery".
/// The xdp path in the other remote mode ([`xdp_leg`]) has addresses of its own likewise.
/// The path name of the xdp path measured with the agents in `mode` when that is not
/// `--remote-mode` (`lab compare` measures both unless `--one-remote-mode`).
pub(crate) fn xdp_leg(mode: RemoteMode) -> &'static str {
    match mode {
        RemoteMode::Tunnel => "xdp-tunnel",
        RemoteMode::Snat => "xdp-snat",
    }
}

pub(crate) fn path_sources(path: &str, nodes: usize) -> Vec<Ipv4Addr> {
    match path {
        "instance" => vec![Ipv4Addr::new(10, 77, 0, 101)],
        "xdp" => (0..nodes.max(1))
            .map(|n| match n {
                0 => Ipv4Addr::new(10, 77, 0, 102),
                n => Ipv4Addr::new(10, 77, 0, 103 + n as u8),
            })
            .collect(),
        "xdp-snat" | "xdp-tunnel" => (0..nodes.max(1))
            .map(|n| Ipv4Addr::new(10, 77, 0, 120 + n as u8))
            .collect(),
        _ => vec![Ipv4Addr::new(10, 77, 0, 103)],
    }
}

impl Cluster {
    pub(crate) fn targets_of(&self, path: &str) -> Result<Vec<SocketAddrV4>> {
        match path {
            "ip" => self.pod_targets(),
            _ => Ok(self.node_targets()),
        }
    }

    pub(crate) fn node_of_addr(&self, ip: Ipv4Addr) -> Option<usize> {
        (0..self.lab.node_count()).find(|&i| self.lab.node_addr(i) == ip)
    }

    pub(crate) fn pod_node(&self, pod: &str) -> Option<usize> {
        pod.parse::<PodId>().ok().map(|p| p.node)
    }

    pub(crate) fn load(&self, spec: LoadSpec) -> Result<LoadResult> {
        check_interrupted()?;
        Ok(self.lab.in_client(|| loadgen::run(&spec))??)
    }

    pub(crate) fn measure_path(
        &self,
        path: &str,
        c: &CompareArgs,
        progress: &Progress,
    ) -> Result<PathResult> {
        let targets = self.targets_of(path)?;
        let description = match path {
            "instance" => "client -> nodeIP:nodePort -> kube-proxy rules (DNAT, SNAT) -> pod; ui-nlb opted out of lbx",
            p if p.starts_with("xdp") => match self.remote_mode {
                RemoteMode::Tunnel => "client -> nodeIP:nodePort -> lbx XDP DNAT -> pod (IP-in-IP to the pod's node for a pod on another node)",
                RemoteMode::Snat => "client -> nodeIP:nodePort -> lbx XDP DNAT -> pod (SNAT + forward for a pod on another node)",
            },
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

        let sources = path_sources(path, self.lab.node_count());
        // The path's client addresses and the agents' SNAT addresses: a remote xdp delivery
        // reaches the owning node from the latter, and counts there if netfilter sees it.
        let probe_sources: Vec<Ipv4Addr> = sources
            .iter()
            .copied()
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
            sources: sources.clone(),
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
        let ct_sources: Vec<Ipv4Addr> = sources
            .iter()
            .copied()
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

        // The client address each target was reached from (what the pod should see).
        let client_of: BTreeMap<Ipv4Addr, Ipv4Addr> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (*t.ip(), sources[i % sources.len()]))
            .collect();
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
                let client = client_of.get(target_ip).copied();
                if Some(*seen) == client {
                    seen_client += n;
                }
                let is_local = path == "ip" || self.node_of_addr(*target_ip) == self.pod_node(pod);
                if is_local {
                    local_total += n;
                    if Some(*seen) == client {
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
}
