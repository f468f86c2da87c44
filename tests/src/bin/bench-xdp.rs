//! `cargo xtask bench xdp --json FILE`: ns per packet of the XDP program through
//! BPF_PROG_TEST_RUN, for an established flow (ct hit), a new flow (Maglev select + ct
//! create), and a non-service packet, at 1, 1 000 and 10 000 services of 10 backends each.
//!
//! Method (the kernel does not reset the packet between repeats, so a rewritten packet would
//! take another path on the next repeat):
//! - non_service: the packet is left unchanged, so one test run with a large repeat count
//!   measures exactly that path; the median of several runs is reported.
//! - ct_hit: a fixed point. The packet is addressed to a frontend that equals its own backend
//!   (an exact frontend on the backend's address and port) with a ct entry for the flow and
//!   TTL decrement off; every repeat does the whole established-flow path (parse,
//!   lookup_service, ct_lookup, rewrite, redirect) and leaves the packet as it was. The
//!   counters prove every repeat took that path.
//! - new_flow: a chain where each repeat's output is the next repeat's new flow (see the
//!   code); the counters and the conntrack table prove every repeat created a flow.
//! - empty_program / floor: the harness cost (a program that only returns XDP_PASS) and the
//!   program's shortest path (an ARP frame), for reference.

use std::{net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use lb_common::{
    port_be, CtEntry, CtKey, Frontend, Reason, DEFAULT_MAGLEV_SIZE, PROTO_TCP,
};
use lb_tests::{
    fixture::{addr, frontend_key, local_backend, node_config, ring_for, XDP_PASS, XDP_REDIRECT},
    packet::Packet,
};
use lb_user::dataplane::{Dataplane, DataplaneOptions};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Service counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 1000, 10000])]
    services: Vec<u32>,
    /// Backends per service.
    #[arg(long, default_value_t = 10)]
    backends: u32,
    /// Repeats per test run (ct_hit, non_service).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Test runs per case; the median is reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Conntrack (and reverse-NAT) entries.
    #[arg(long, default_value_t = 262_144)]
    ct_entries: u32,
}

#[derive(Serialize)]
struct Case {
    name: &'static str,
    services: u32,
    ns_per_packet: f64,
    /// Every run's value, for the spread.
    runs_ns: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    cases: Vec<Case>,
    method: &'static str,
    maglev_size: u32,
    backends_per_service: u32,
    repeat: u32,
    kernel: String,
}

const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x64];
const NIC_MAC: [u8; 6] = [0x02, 0x4e, 0, 0, 0, 0x0a];
const VETH_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 1];
const POD_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
const NODEPORT_BASE: u16 = 20000;

fn pod_ip(service: u32, backend: u32) -> Ipv4Addr {
    let n = service * 16 + backend;
    Ipv4Addr::new(10, 80 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// Loads a data plane with `n` NodePort services of `b` local backends each.
fn setup(n: u32, b: u32, ct_entries: u32) -> Result<Dataplane> {
    let mut dp = Dataplane::load(DataplaneOptions {
        max_services: n + 1, // + the new_flow chain service
        maglev_size: DEFAULT_MAGLEV_SIZE,
        max_backends: n * b + 2,
        max_frontends: n + 16,
        ct_entries,
        affinity_entries: 1024,
        pin_dir: None,
    })
    .context("loading the data plane (run as root)")?;
    let mut cfg = node_config();
    // Decrementing TTL would end the ct_hit fixed point after 255 repeats.
    cfg.flags = 0;
    dp.set_config(&cfg)?;
    let started = Instant::now();
    for s in 0..n {
        let backends: Vec<_> = (0..b)
            .map(|i| {
                let id = 1 + s * b + i;
                (id, local_backend(pod_ip(s, i), 8080, 7, VETH_MAC, POD_MAC))
            })
            .collect();
        for (id, be) in &backends {
            dp.set_backend(*id, be)?;
        }
        dp.write_full_ring(s, &ring_for(&backends, DEFAULT_MAGLEV_SIZE))?;
        let fe = Frontend { service_id: s, backend_count: b, flags: 0, affinity_timeout_s: 0 };
        dp.set_frontend(&frontend_key(None, NODEPORT_BASE + s as u16, PROTO_TCP), &fe)?;
    }
    eprintln!("  {n} services x {b} backends programmed in {:.2?}", started.elapsed());
    Ok(dp)
}

fn stat(dp: &Dataplane, reason: Reason) -> Result<u64> {
    Ok(dp.stats()?.into_iter().find(|(r, _)| *r == reason).map(|(_, n)| n).unwrap_or(0))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Repeated runs of one unchanging packet: (median ns/packet, all runs).
fn repeated(dp: &mut Dataplane, pkt: &[u8], args: &Args, expect: u32, reason: Reason) -> Result<(f64, Vec<f64>)> {
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        let before = stat(dp, reason)?;
        let (v, d) = dp.bench_xdp(pkt, args.repeat)?;
        ensure!(v == expect, "verdict {v}, expected {expect}");
        let counted = stat(dp, reason)? - before;
        ensure!(counted == args.repeat as u64, "{} counted {counted} of {} repeats: the path changed", reason.name(), args.repeat);
        runs.push(d.as_nanos() as f64);
    }
    let m = median(&mut runs.clone());
    Ok((m, runs))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if unsafe { libc::geteuid() } != 0 {
        bail!("the XDP benchmark needs root (BPF_PROG_TEST_RUN): run it through `cargo xtask bench xdp`");
    }
    let mut cases = Vec::new();
    for &n in &args.services {
        eprintln!("services = {n}");
        let mut dp = setup(n, args.backends, args.ct_entries)?;
        let target = n / 2;
        

        // non_service: to the node, a port no service uses.
        let non_service = Packet::eth(CLIENT_MAC, NIC_MAC).ipv4(CLIENT, NODE).tcp(40000, 9999).ack().build();
        let (ns, ns_runs) = repeated(&mut dp, &non_service, &args, XDP_PASS, Reason::PassNonService)?;

        // floor: the shortest path through the program (an ARP frame: Ethernet parse and a
        // counter), i.e. what running any XDP program costs here; reported for reference.
        let arp = Packet::eth(CLIENT_MAC, NIC_MAC).ethertype(0x0806).payload(&[0u8; 28]).build();
        let (floor, floor_runs) = repeated(&mut dp, &arp, &args, XDP_PASS, Reason::PassNotIpv4)?;
        // empty_program: lb_pass (returns XDP_PASS, touches nothing): the test harness itself.
        let mut empty_runs = Vec::new();
        for _ in 0..args.runs {
            let (_, d) = dp.bench_pass(&arp, args.repeat)?;
            empty_runs.push(d.as_nanos() as f64);
        }
        let empty = median(&mut empty_runs.clone());
        cases.push(Case { name: "empty_program", services: n, ns_per_packet: empty, runs_ns: empty_runs });

        // ct_hit fixed point on backend 0 of the target service.
        let be_ip = pod_ip(target, 0);
        let fe = Frontend { service_id: target, backend_count: args.backends, flags: 0, affinity_timeout_s: 0 };
        dp.set_frontend(&frontend_key(Some(be_ip), 8080, PROTO_TCP), &fe)?;
        let key = CtKey {
            saddr: addr(CLIENT),
            daddr: addr(be_ip),
            sport: port_be(40000),
            dport: port_be(8080),
            proto: PROTO_TCP,
            _pad0: 0,
        _pad1: 0,
        };
        let be_id = 1 + target * args.backends;
        dp.set_conntrack(&key, &CtEntry { backend_id: be_id, service_id: target, ..Default::default() })?;
        let ct_pkt = Packet::eth(POD_MAC, VETH_MAC).ipv4(CLIENT, be_ip).tcp(40000, 8080).ack().payload(&[0u8; 64]).build();
        let (ct, ct_runs) = repeated(&mut dp, &ct_pkt, &args, XDP_REDIRECT, Reason::FwdLocal)?;

        // new_flow: a chain of new flows inside one test run. The bench service (slot n) has
        // one remote backend Q:8080 and an exact frontend on Q:8080 itself. A packet to
        // Q:8080 is SNATed to (node, fresh port) and DNATed to Q:8080, so the next repeat is
        // again a packet to the frontend, from a source port never used before (SNAT ports
        // are allocated exclusively): every repeat creates a flow. This is the remote (SNAT)
        // path, the heavier of the two new-flow paths.
        let chain = n;
        let q = Ipv4Addr::new(10, 99, 0, 1);
        let mut cfg = dp.config()?;
        cfg.snat_port_min = 1024;
        cfg.snat_port_max = 65535;
        dp.set_config(&cfg)?;
        let be_q = lb_tests::fixture::remote_backend(q, 8080);
        let q_id = n * args.backends + 1;
        dp.set_backend(q_id, &be_q)?;
        dp.write_full_ring(chain, &vec![q_id; DEFAULT_MAGLEV_SIZE as usize])?;
        let chain_fe = Frontend { service_id: chain, backend_count: 1, flags: 0, affinity_timeout_s: 0 };
        dp.set_frontend(&frontend_key(Some(q), 8080, PROTO_TCP), &chain_fe)?;
        let chain_pkt = Packet::eth(CLIENT_MAC, NIC_MAC).ipv4(CLIENT, q).tcp(40000, 8080).syn().build();
        let chain_repeat = 4000;
        let mut new_runs = Vec::new();
        for _ in 0..args.runs {
            dp.flush_flows()?;
            let before = stat(&dp, Reason::FwdRemote)?;
            let (v, d) = dp.bench_xdp(&chain_pkt, chain_repeat)?;
            ensure!(v == lb_tests::fixture::XDP_TX, "new_flow chain: verdict {v}");
            let fwd = stat(&dp, Reason::FwdRemote)? - before;
            let flows = dp.conntrack()?.len();
            ensure!(
                fwd == chain_repeat as u64 && flows == chain_repeat as usize,
                "new_flow chain: {fwd} forwards and {flows} flows for {chain_repeat} repeats (every repeat must be a new flow)"
            );
            new_runs.push(d.as_nanos() as f64);
        }
        dp.flush_flows()?;
        let new_ns = median(&mut new_runs.clone());

        cases.push(Case { name: "floor", services: n, ns_per_packet: floor, runs_ns: floor_runs });
        eprintln!("  empty program {empty:.1} ns, floor {floor:.1} ns, non_service {ns:.1} ns, ct_hit {ct:.1} ns, new_flow {new_ns:.1} ns");
        cases.push(Case { name: "ct_hit", services: n, ns_per_packet: ct, runs_ns: ct_runs });
        cases.push(Case { name: "new_flow", services: n, ns_per_packet: new_ns, runs_ns: new_runs });
        cases.push(Case { name: "non_service", services: n, ns_per_packet: ns, runs_ns: ns_runs });
    }

    println!("{:<12} {:>9} {:>12}", "case", "services", "ns/packet");
    for c in &cases {
        println!("{:<12} {:>9} {:>12.1}", c.name, c.services, c.ns_per_packet);
    }
    let growth = |name: &str| {
        let first = cases.iter().find(|c| c.name == name)?;
        let last = cases.iter().rev().find(|c| c.name == name)?;
        Some((last.ns_per_packet / first.ns_per_packet - 1.0) * 100.0)
    };
    for name in ["ct_hit", "new_flow", "non_service"] {
        if let Some(g) = growth(name) {
            println!("{name}: {g:+.1}% from {} to {} services", args.services[0], args.services[args.services.len() - 1]);
        }
    }
    if let Some(path) = &args.json {
        let report = Report {
            cases,
            method: "BPF_PROG_TEST_RUN; see tests/src/bin/bench-xdp.rs",
            maglev_size: DEFAULT_MAGLEV_SIZE,
            backends_per_service: args.backends,
            repeat: args.repeat,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
