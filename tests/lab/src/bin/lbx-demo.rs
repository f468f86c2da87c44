//! `cargo xtask demo`: the lab end to end in one command. Builds the namespace lab (a client,
//! two nodes with two pods each), runs the real `lb-user standalone` agent on every node,
//! sends requests to node 0's NodePort (and the LoadBalancer IP), and shows which pod answered,
//! which client address it saw and whether the flow stayed on node 0 (XDP redirect into the
//! pod's veth, client IP kept) or went to node 1 (SNAT). Then node 0's data-plane counters,
//! then teardown. Exits non-zero if any request fails or answers wrongly.
//!
//! Usage: lbx-demo [--requests N] [--keep]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lb_tests::scenario::{
    Answer, Lab, LabSpec, PodId, LB_INGRESS_IP, TCP_NODE_PORT, TCP_SERVICE_PORT, TCP_TARGET_PORT,
    UDP_NODE_PORT, UDP_TARGET_PORT,
};

#[derive(Parser)]
#[command(about = "Real traffic through the lbx XDP data plane in network namespaces")]
struct Args {
    /// TCP requests to node 0's NodePort (each on a new connection).
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// Leave the lab running afterwards and print how to remove it.
    #[arg(long)]
    keep: bool,
}

/// Which kind of request a row is.
#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Udp,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbx-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    eprintln!("lbx-demo: building binaries and the lab (namespaces lbx-*) ...");
    let spec = LabSpec {
        quiet: true,
        detachable: args.keep,
        ..LabSpec::default()
    };
    let lab = Lab::start(spec).context("starting the lab")?;
    let outcome = demo(&lab, args.requests);
    if let Err(e) = &outcome {
        print_logs(lab.workdir());
        eprintln!("lbx-demo: {e:#}");
    }
    if args.keep {
        let workdir = lab.workdir().display().to_string();
        let commands = lab.keep().context("keeping the lab")?;
        println!("\nThe lab keeps running (configs and logs in {workdir}). Remove it with:");
        for c in commands {
            println!("    {c}");
        }
    } else {
        lab.shutdown().context("tearing the lab down")?;
        println!("\nTorn down: agents stopped (XDP detached, pins removed), namespaces deleted.");
    }
    outcome
}

fn demo(lab: &Lab, requests: usize) -> Result<()> {
    let t = lab.topology();
    println!(
        "lab {}: client {}, {} nodes, pods:",
        lab.prefix(),
        lab.client_addr(),
        lab.node_count()
    );
    for node in 0..lab.node_count() {
        let pods: Vec<String> = lab
            .pods()
            .into_iter()
            .filter(|p| p.node == node)
            .map(|p| format!("{p} {}", t.pod_addr(p.node, p.pod)))
            .collect();
        let r = lab.agent_ready(node);
        println!(
            "  n{node} {:<11} agent: XDP {} on {}, {} frontends, {} backends; pods {}",
            lab.node_addr(node).to_string(),
            r.mode,
            r.iface,
            r.frontends,
            r.backends,
            pods.join(", ")
        );
    }
    println!(
        "Service demo/echo: NodePort TCP {TCP_NODE_PORT} -> {TCP_TARGET_PORT}, UDP {UDP_NODE_PORT} \
         -> {UDP_TARGET_PORT}, LoadBalancer {LB_INGRESS_IP} (routed to n0), \
         externalTrafficPolicy Cluster\n"
    );

    let node0 = lab.node_addr(0);
    let mut plan: Vec<(Kind, Ipv4Addr, u16)> = vec![(Kind::Tcp, node0, TCP_NODE_PORT); requests];
    plan.push((Kind::Udp, node0, UDP_NODE_PORT));
    plan.push((Kind::Tcp, LB_INGRESS_IP, TCP_SERVICE_PORT));

    println!(
        "{:>3}  {:<25} {:<20} {:<21} path",
        "#", "request", "answered by", "client IP seen"
    );
    let mut problems = Vec::new();
    let mut answered = BTreeSet::new();
    let (mut local, mut remote) = (0, 0);
    for (i, (kind, addr, port)) in plan.into_iter().enumerate() {
        let target = SocketAddrV4::new(addr, port);
        let (proto, result) = match kind {
            Kind::Tcp => ("TCP", lab.http_get(addr, port)),
            Kind::Udp => ("UDP", lab.udp_query(addr, port)),
        };
        let request = format!("{proto} {target}");
        let a = match result {
            Ok(a) => a,
            Err(e) => {
                println!("{:>3}  {request:<25} FAILED: {e}", i + 1);
                problems.push(format!("request {} ({request}): {e}", i + 1));
                continue;
            }
        };
        let (path, problem) = classify(lab, target, &a);
        if a.pod.node == 0 {
            local += 1;
        } else {
            remote += 1;
        }
        answered.insert(a.pod);
        let pod_addr = t.pod_addr(a.pod.node, a.pod.pod);
        println!(
            "{:>3}  {request:<25} {:<20} {:<21} {path}",
            i + 1,
            format!("{} {pod_addr}", a.pod),
            a.client_seen.to_string(),
        );
        if let Some(p) = problem {
            problems.push(format!("request {} ({request}): {p}", i + 1));
        }
    }
    let pods: Vec<String> = answered.iter().map(PodId::to_string).collect();
    println!(
        "\n{local} flows stayed on n0, {remote} went to n1; pods that answered: {}",
        pods.join(", ")
    );

    let counters = lab.counters(0).context("reading n0's counters")?;
    println!(
        "\nlb-user counters --pin-dir {} (packets):",
        lab.pin_dir(0).display()
    );
    for (reason, n) in counters.iter().filter(|(_, n)| **n > 0) {
        println!("    {reason:<22} {n}");
    }
    if !problems.is_empty() {
        bail!(
            "{} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// The path a flow took, and what is wrong with the answer if anything.
fn classify(lab: &Lab, target: SocketAddrV4, a: &Answer) -> (String, Option<String>) {
    let node0 = lab.node_addr(0);
    let mut problem = None;
    if a.peer != target {
        problem = Some(format!("answered by {} instead of {target}", a.peer));
    }
    let path = if a.pod.node == 0 {
        if a.client_seen != a.local {
            problem = Some(format!(
                "local pod saw {} instead of the client's {}",
                a.client_seen, a.local
            ));
        }
        "local: XDP redirect into the pod's veth, client IP kept".to_string()
    } else {
        if *a.client_seen.ip() != node0 {
            problem = Some(format!(
                "remote pod saw {} instead of n0's SNAT address {node0}",
                a.client_seen
            ));
        }
        format!("remote: SNAT to n0, forwarded to n{}", a.pod.node)
    };
    (path, problem)
}

/// The tail of every log in the work directory, for a failed run.
fn print_logs(workdir: &Path) {
    let Ok(entries) = std::fs::read_dir(workdir) else {
        return;
    };
    let mut paths: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            continue;
        }
        eprintln!("--- {} (last lines) ---", p.display());
        for l in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("{l}");
        }
    }
}
