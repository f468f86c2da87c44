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
//!
//! The command is `src/main.rs`; this library holds the lab, one module per job:
//! - [`cli`]: the command line;
//! - `cluster`: the lab (lb-tests' scenario) with a real kube-proxy per node, started and
//!   torn down; `workload`: the Services and pods on it;
//! - `paths`: one path's load and results; `probes`: what is read around a load (target
//!   list, hops, rule and reason counters, conntrack, BPF run time); `sweep`: the Service
//!   sweep; `machine`: CPU time, waiting for a quiet machine, BPF statistics;
//! - [`compare()`], [`up()`], [`down()`]: the subcommands; [`interrupt`]: Ctrl-C;
//! - [`loadgen`]: the load generator; [`report`]: the results and their renderings (table,
//!   JSON, HTML, SVG).
//!
//! `src/bin/lbx-demo.rs` (`cargo xtask demo`) is the shorter tour of the XDP path alone.

pub mod cli;
mod cluster;
mod compare;
pub mod interrupt;
pub mod loadgen;
mod machine;
mod paths;
mod probes;
mod progress;
pub mod report;
mod sweep;
mod up_down;
mod workload;

pub use compare::compare;
pub use up_down::{down, up, HINTS_HEADER};
