//! What the lab reads from the cluster around a load, per path: the target list a load
//! balancer would register, hops (TTL probe), kube-proxy's rule counters, lbx's reason
//! counters, conntrack entries and BPF run time.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use lb_tests::kubeproxy::{self, ProxyMode};
use lb_tests::netns;
use lb_tests::scenario::{TCP_NODE_PORT, TCP_TARGET_PORT};

use crate::cluster::Cluster;
use crate::loadgen::{self, HopProbe};
use crate::paths::path_sources;
use crate::report::LbTarget;
use crate::workload::{UI_NS, UI_SERVICE};

impl Cluster {
    /// Sum of run_time_ns and run_cnt over our programs.
    pub(crate) fn bpf_run_time(&self) -> Result<(u64, u64)> {
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

    /// The targets a load balancer registers for `path`, with their health.
    pub(crate) fn lb_targets(&self, path: &str) -> Result<Vec<LbTarget>> {
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
    pub(crate) fn hops(&self, path: &str) -> Result<(Option<u32>, Option<u32>)> {
        let mut local: Option<u32> = None;
        let mut remote: Option<u32> = None;
        for target in self.targets_of(path)? {
            // A pod target is one pod; a node target reaches every replica (Cluster policy).
            let pods = if path == "ip" { 1 } else { self.replicas.len() };
            let probe = HopProbe {
                source: path_sources(path, self.lab.node_count()).first().copied(),
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
    pub(crate) fn nf_stats(&self) -> Result<(u64, u64)> {
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
    pub(crate) fn xdp_reasons(&self) -> Result<BTreeMap<String, u64>> {
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
    pub(crate) fn conntrack_count(&self, sources: &[Ipv4Addr]) -> Result<u64> {
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
}
