//! What `cargo xtask lab compare` measured: the JSON document (`--json FILE`) and the input of
//! the terminal table and the HTML report. Field names are the contract:
//! `{"paths":{"instance":{...},"xdp":{...},"ip":{...}},"sweep":[...]}`, each path with `rps`,
//! `p50_us`, `p90_us`, `p99_us`, `new_conn_rps`, `hops`, `client_ip_preserved`,
//! `cpu_us_per_req`; everything else is extra detail.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The three ways a load balancer reaches the Service, in report order.
pub const PATHS: [&str; 3] = ["instance", "xdp", "ip"];

/// One `lab compare` run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabReport {
    pub meta: Meta,
    /// Keyed by path name ([`PATHS`]).
    pub paths: BTreeMap<String, PathResult>,
    /// New-connection rate and p99 per path and number of Services.
    pub sweep: Vec<SweepPoint>,
    /// The targets, evaluated on this run's numbers.
    pub targets: Vec<TargetCheck>,
    /// What the run created, so a test can check that the teardown removed it.
    #[serde(default)]
    pub footprint: LabFootprint,
}

/// Everything a lab run created (all of it is gone when the run ends).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LabFootprint {
    /// Every namespace, link and pin directory of the run starts with this (`lbx-<pid>-<n>`).
    pub prefix: String,
    /// PIDs of every process the run started (agents, pod servers, control plane, kube-proxy).
    pub pids: Vec<u32>,
    pub pin_dirs: Vec<String>,
    pub workdir: String,
}

/// How the run was set up.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The command line that produced the report.
    pub command: String,
    /// RFC 3339 UTC time the run started.
    pub started: String,
    pub kernel: String,
    pub cpus: usize,
    pub nodes: usize,
    /// Replicas of `ui/ui-nlb` during the path measurements.
    pub replicas: usize,
    /// Services in the API server during the path measurements (ui-nlb plus the others).
    pub services: usize,
    /// `iptables` (with its backend, e.g. `iptables (legacy)`), `nftables` or `ipvs`.
    pub kube_proxy_mode: String,
    /// How the xdp path reaches a pod on another node (`--remote-mode`): `tunnel` or `snat`.
    #[serde(default)]
    pub remote_mode: String,
    /// The other mode, when the xdp path was measured in it too (path `xdp-<mode>`).
    #[serde(default)]
    pub other_remote_mode: Option<String>,
    pub kubernetes_version: String,
    /// Seconds of load per measurement (after the warm-up).
    pub duration_s: f64,
    /// Concurrent client connections (threads) of the load generator.
    pub connections: usize,
    /// Free-form remarks about the method (how CPU was measured, ...), shown in the report.
    pub notes: Vec<String>,
}

/// Everything measured for one path on `ui/ui-nlb`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathResult {
    /// One line: what the client sends where, e.g. "nodeIP:nodePort via kube-proxy".
    pub description: String,
    /// Keep-alive load: requests per second and latency percentiles (microseconds).
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// One connection per request: connections (= requests) per second and latency
    /// percentiles of connect + request + answer.
    pub new_conn_rps: f64,
    pub new_conn_p50_us: f64,
    pub new_conn_p90_us: f64,
    pub new_conn_p99_us: f64,
    /// Failed requests (connect errors, timeouts, bad answers) over both loads.
    pub errors: u64,
    /// Routers between the client and the pod, worst case over the pods that answered
    /// (TTL probe: the smallest IP TTL whose connection succeeds, minus one).
    pub hops: u32,
    /// Same, for pods on the node the request was sent to (None when none answered).
    pub hops_local: Option<u32>,
    /// Same, for pods on another node.
    pub hops_remote: Option<u32>,
    /// Every request served by a pod on the node it was sent to saw the client's address
    /// (for ip mode: every request).
    pub client_ip_preserved: bool,
    /// Fraction of all requests whose pod saw the client's own address.
    pub client_ip_seen_fraction: f64,
    /// Client addresses the pods reported, with request counts ("10.77.0.1" -> n).
    pub client_ips_seen: BTreeMap<String, u64>,
    /// Requests per pod that served them.
    pub served_by: BTreeMap<String, u64>,
    /// Whole-machine CPU time (all cores: load generator, kernel, pod servers) per request
    /// of the one-connection-per-request load, microseconds.
    pub cpu_us_per_req: f64,
    /// Same for the keep-alive load.
    pub cpu_us_per_req_keepalive: f64,
    /// Time inside lbx's BPF programs per request (kernel.bpf_stats_enabled run_time_ns,
    /// every node), nanoseconds; 0 for paths where nothing of ours ran.
    pub bpf_ns_per_req: f64,
    /// Netfilter rule matches per request in the node namespaces (sum of every rule's packet
    /// counter, before vs after the one-connection-per-request load).
    pub nf_rule_hits_per_req: f64,
    /// Packets of the client's flows seen by the nftables probe on every hook of every node
    /// (0 = netfilter never saw them).
    pub nf_probe_packets: u64,
    /// Rules kube-proxy had installed across the nodes while this path was measured.
    pub nf_rules_installed: u64,
    /// Conntrack entries created in the node namespaces during the one-connection-per-
    /// request load (`conntrack -S` insert counters), and per request.
    pub conntrack_created: u64,
    pub conntrack_per_req: f64,
    /// lbx's per-reason packet counters (`lb-user counters`) summed over the nodes, during
    /// both loads: which verdicts the XDP/TC programs gave this path's packets (e.g.
    /// `fwd_local`, or `pass_non_service` when the Service is left to kube-proxy).
    #[serde(default)]
    pub xdp_reasons: BTreeMap<String, u64>,
    /// The targets a load balancer registers for this path and their health.
    pub targets: Vec<LbTarget>,
    /// Latency CDF of the keep-alive load: (microseconds, fraction <= it), ascending.
    pub latency_cdf: Vec<(f64, f64)>,
    /// Same for the one-connection-per-request load.
    pub new_conn_latency_cdf: Vec<(f64, f64)>,
}

/// One registered target, like a row of `aws elbv2 describe-target-health`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LbTarget {
    /// IP address registered (a node's for instance mode, a pod's for ip and xdp).
    pub id: String,
    pub port: u16,
    /// healthy | unhealthy | draining
    pub state: String,
    /// Why, e.g. "node n0 InternalIP", "pod n1-p0 ready (lb-user targets on n0)".
    pub description: String,
}

/// One point of the scaling sweep.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub services: usize,
    pub path: String,
    pub new_conn_rps: f64,
    pub p99_us: f64,
    pub errors: u64,
    /// lbx's per-reason packet counters over the nodes during this load (see
    /// [`PathResult::xdp_reasons`]).
    #[serde(default)]
    pub xdp_reasons: BTreeMap<String, u64>,
    /// Every round's new connections/s, in round order (`new_conn_rps` is their median;
    /// the paths take turns within a round, see `lbx-lab --sweep-rounds`).
    #[serde(default)]
    pub rounds_rps: Vec<f64>,
    /// Every round's p99 (`p99_us` is their median).
    #[serde(default)]
    pub rounds_p99_us: Vec<f64>,
    /// What the failed connections reported (the first few distinct messages per round).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub first_errors: Vec<String>,
}

/// The median of `v` (the mean of the middle two for an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// One target of the issue, checked on this run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    /// e.g. "xdp new_conn_rps / instance at 10000 services".
    pub name: String,
    /// The measured value (a ratio, or 0/1 for yes/no checks).
    pub measured: f64,
    /// The target as text, e.g. ">= 2.0".
    pub target: String,
    pub met: bool,
}
