//! What runs on the cluster: the AWS Load Balancer Controller walkthrough's Service
//! `ui/ui-nlb` (LoadBalancer, 80 -> 8080), its replicas, the opt-out annotation that hands it
//! to kube-proxy, and the extra Services of `--services` and the sweep.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use lb_tests::kubelet;
use lb_tests::netns;
use lb_tests::scenario::{PodId, LB_INGRESS_IP, TCP_NODE_PORT, TCP_SERVICE_PORT, TCP_TARGET_PORT};
use serde_json::json;

use crate::cluster::{Cluster, CONVERGE, SYNC_TIMEOUT};
use crate::interrupt::{check_interrupted, sleep};
use crate::progress::Progress;

pub(crate) const UI_NS: &str = "ui";
pub(crate) const UI_SERVICE: &str = "ui-nlb";
const APP_LABEL: (&str, &str) = ("app.kubernetes.io/name", "ui");
/// The agent's per-Service opt-out annotation.
pub(crate) const ACCELERATE_ANNOTATION: &str = "lbx.io/accelerate";
/// Namespace of the extra Services of `--services` and the sweep.
const SCALE_NS: &str = "scale";
const MANAGED_BY: &str = "lbx-lab.lbx.io";
/// Extra Service i gets externalIP 198.18.0.0 + i + 1 (the benchmarking range, RFC 2544).
const EXTERNAL_IP_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);

/// One extra Service and where kube-proxy and the agents expose it.
pub(crate) struct Extra {
    pub(crate) cluster_ip: Ipv4Addr,
    pub(crate) external_ip: Ipv4Addr,
}

/// Replica k lives on node k % nodes as that node's pod k / nodes.
fn replica_pod(k: usize, nodes: usize) -> PodId {
    PodId::new(k % nodes, k / nodes)
}

fn external_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(EXTERNAL_IP_BASE + 1 + i as u32)
}

impl Cluster {
    /// Namespace ui, Service ui-nlb with its LoadBalancer ingress IP (we play the cloud
    /// controller; the client routes that IP to node 0).
    pub(crate) fn create_ui_service(&self) -> Result<()> {
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
    pub(crate) fn scale_to(&mut self, n: usize) -> Result<()> {
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
    pub(crate) fn set_accelerated(&self, on: bool) -> Result<()> {
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
    pub(crate) fn node_port_frontend(&self, node: usize) -> Result<Option<serde_json::Value>> {
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
    pub(crate) fn node_targets(&self) -> Vec<SocketAddrV4> {
        (0..self.lab.node_count())
            .map(|i| SocketAddrV4::new(self.lab.node_addr(i), TCP_NODE_PORT))
            .collect()
    }

    /// podIP:targetPort of every replica (how ip mode is reached).
    pub(crate) fn pod_targets(&self) -> Result<Vec<SocketAddrV4>> {
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
    pub(crate) fn one_replica_check(&mut self) -> Result<()> {
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
    pub(crate) fn grow_services(&mut self, total: usize, progress: &Progress) -> Result<()> {
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
        let took = self.wait_programmed()?;
        progress.step(format!(
            "{total} Services programmed by kube-proxy and the agents ({:.1}s after the last write)",
            took.as_secs_f64()
        ));
        Ok(())
    }

    /// Waits until kube-proxy and every agent hold the last Service created (watch events
    /// come in order, so then every earlier one too); how long that took.
    pub(crate) fn wait_programmed(&self) -> Result<Duration> {
        let synced = Instant::now();
        let Some(last) = self.extras.last() else {
            return Ok(synced.elapsed());
        };
        let (cluster_ip, external_ip) = (last.cluster_ip, last.external_ip);
        loop {
            check_interrupted()?;
            if self.all_hold(cluster_ip, external_ip)? {
                return Ok(synced.elapsed());
            }
            if synced.elapsed() > SYNC_TIMEOUT {
                bail!(
                    "kube-proxy and the agents did not all program Service {} within \
                     {SYNC_TIMEOUT:?}\n{}",
                    self.extras.len() + 1,
                    self.logs()
                );
            }
            sleep(Duration::from_millis(500))?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_spread_over_the_nodes() {
        let pods: Vec<String> = (0..3).map(|k| replica_pod(k, 2).to_string()).collect();
        assert_eq!(pods, ["n0-p0", "n1-p0", "n0-p1"]);
    }
}
