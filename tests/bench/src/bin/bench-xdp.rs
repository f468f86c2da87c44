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
//!   TTL decrement off; every repeat does the whole established-flow path (parse, the
//!   service-port bitmap, ct_lookup, rewrite, redirect) and leaves the packet as it was. The
//!   counters prove every repeat took that path; the entry carries the current frontend
//!   epoch, so no repeat looks up the frontend (as for any flow whose frontends did not
//!   change since it was last checked).
//! - new_flow: a chain where each repeat's output is the next repeat's new flow (see the
//!   code); the counters and the conntrack table prove every repeat created a flow.
//! - empty_program / floor: the harness cost (a program that only returns XDP_PASS) and the
//!   program's shortest path (an ARP frame), for reference.
//! - ref_ct_lookup / ref_ct_insert: the object's reference programs (never attached): the
//!   ct_hit packet through parse and one CONNTRACK lookup, and one CONNTRACK insert of a
//!   fresh key (ct_create makes two such inserts per new flow, REVNAT and CONNTRACK). They
//!   show how much of ct_hit and new_flow is the kernel's LRU hash code.
//! - mem_random_read: no program; one dependent read at a random place of a 64 MiB buffer
//!   from userspace, what touching memory no recent packet touched costs on this machine.
//!
//! `ns_per_packet` is the gross cost per BPF_PROG_TEST_RUN repeat (harness included), the
//! number the targets are about. `net_ns_per_packet` (the "net of harness" column) is the
//! median over rounds of the case minus empty_program of the same round: what the program
//! adds to running any XDP program at all.

use std::{net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use lb_common::{port_be, CtEntry, FlowKey, Frontend, Reason, DEFAULT_MAGLEV_SIZE, PROTO_TCP};
use lb_tests::{
    fixture::{addr, frontend_key, local_backend, node_config, ring_for, XDP_PASS, XDP_REDIRECT},
    packet::Packet,
};
use lb_user::bpf::dataplane::{Dataplane, DataplaneOptions};
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
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// Conntrack (and reverse-NAT) entries.
    #[arg(long, default_value_t = 262_144)]
    ct_entries: u32,
    /// Only these cases (default: all), e.g. `--cases new_flow` to profile one path with
    /// `perf record -g`; empty_program always runs (the net column needs it).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(REFERENCE.iter().chain(&CASES)))]
    cases: Vec<String>,
}

impl Args {
    fn wants(&self, case: &str) -> bool {
        case == "empty_program" || self.cases.is_empty() || self.cases.iter().any(|c| c == case)
    }
}

/// The reference rows (harness, shortest path, map-operation references), in report order.
const REFERENCE: [&str; 5] = [
    "empty_program",
    "floor",
    "ref_ct_lookup",
    "ref_ct_insert",
    "mem_random_read",
];
/// The cases the targets are about, in report order.
const CASES: [&str; 3] = ["non_service", "ct_hit", "new_flow"];

#[derive(Serialize)]
struct Case {
    name: &'static str,
    services: u32,
    ns_per_packet: f64,
    /// Every run's value, for the spread.
    runs_ns: Vec<f64>,
    /// Net of the harness: the median over rounds of (this case minus empty_program of the
    /// same round and size). Not the cost a packet sees; `ns_per_packet` is. None for
    /// mem_random_read, which runs no program.
    net_ns_per_packet: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    /// ct_hit, new_flow and non_service, per service count.
    cases: Vec<Case>,
    /// empty_program (the harness alone), floor (the program's shortest path) and the
    /// ref_ct_lookup / ref_ct_insert map-operation references.
    reference: Vec<Case>,
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
        max_backends: n * b + b + 1,
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
        let fe = Frontend {
            service_id: s,
            backend_count: b,
            flags: 0,
            affinity_timeout_s: 0,
        };
        dp.set_frontend(
            &frontend_key(None, NODEPORT_BASE + s as u16, PROTO_TCP),
            &fe,
        )?;
    }
    eprintln!(
        "  {n} services x {b} backends programmed in {:.2?}",
        started.elapsed()
    );
    Ok(dp)
}

fn stat(dp: &Dataplane, reason: Reason) -> Result<u64> {
    Ok(dp
        .stats()?
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, n)| n)
        .unwrap_or(0))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One test run of `repeat` copies of an unchanging packet; the counters must show every
/// repeat took the path named by `reason`. Returns ns per packet.
fn one_run(
    dp: &mut Dataplane,
    pkt: &[u8],
    repeat: u32,
    expect: u32,
    reason: Reason,
) -> Result<f64> {
    let before = stat(dp, reason)?;
    let (v, d) = dp.bench_xdp(pkt, repeat)?;
    ensure!(v == expect, "verdict {v}, expected {expect}");
    let counted = stat(dp, reason)? - before;
    ensure!(
        counted == repeat as u64,
        "{} counted {counted} of {repeat} repeats: the path changed",
        reason.name()
    );
    Ok(d.as_nanos() as f64)
}

/// A loaded data plane for one service count, with the packets of every case.
struct Size {
    n: u32,
    dp: Dataplane,
    non_service: Vec<u8>,
    arp: Vec<u8>,
    ct_pkt: Vec<u8>,
    /// The ct_hit fixed point's conntrack entry, rewritten after each new_flow chain flushes it.
    ct_entry: (FlowKey, CtEntry),
    chain_pkt: Vec<u8>,
}

const CHAIN_REPEAT: u32 = 4000;
/// Inserts per ref_ct_insert run (at most): below a CPU's share of CONNTRACK (262 144 / 2
/// CPUs here), so nothing is evicted.
const REF_INSERT_REPEAT: u32 = 100_000;

/// ref_ct_insert's inserts for a CONNTRACK of `ct_entries`: [`REF_INSERT_REPEAT`], or half a
/// CPU's share of a smaller table (`--ct-entries`, to see what the table's size costs).
fn ref_insert_repeat(ct_entries: u32) -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    REF_INSERT_REPEAT.min(ct_entries / cpus / 2)
}

fn prepare(n: u32, args: &Args) -> Result<Size> {
    eprintln!("services = {n}");
    let mut dp = setup(n, args.backends, args.ct_entries)?;
    let target = n / 2;

    // non_service: to the node, a port no service uses.
    let non_service = Packet::eth(CLIENT_MAC, NIC_MAC)
        .ipv4(CLIENT, NODE)
        .tcp(40000, 9999)
        .ack()
        .build();
    // floor: the shortest path through the program (an ARP frame: Ethernet parse and a
    // counter); empty_program runs lb_pass (returns XDP_PASS, touches nothing) on it.
    let arp = Packet::eth(CLIENT_MAC, NIC_MAC)
        .ethertype(0x0806)
        .payload(&[0u8; 28])
        .build();

    // ct_hit fixed point on backend 0 of the target service.
    let be_ip = pod_ip(target, 0);
    let fe = Frontend {
        service_id: target,
        backend_count: args.backends,
        flags: 0,
        affinity_timeout_s: 0,
    };
    dp.set_frontend(&frontend_key(Some(be_ip), 8080, PROTO_TCP), &fe)?;
    let key = FlowKey {
        client: addr(CLIENT)[0],
        client_port: port_be(40000),
        proto: PROTO_TCP,
        _pad: 0,
    };
    let mut entry = CtEntry {
        frontend_addr: addr(be_ip)[0],
        frontend_port: port_be(8080),
        backend_id: 1 + target * args.backends,
        service_id: target,
        ..Default::default()
    };
    let ct_pkt = Packet::eth(POD_MAC, VETH_MAC)
        .ipv4(CLIENT, be_ip)
        .tcp(40000, 8080)
        .ack()
        .payload(&[0u8; 64])
        .build();

    // new_flow: a chain of new flows inside one test run. The bench service (slot n) has
    // remote backends Qi:8080, and every Qi:8080 is also one of its frontends. A packet to a
    // Qi is SNATed to (node, fresh port) and DNATed to the Qj that Maglev picks, so the next
    // repeat is again a packet to a frontend, from a source port never used before towards
    // that backend (SNAT ports are allocated exclusively per backend): every repeat is a new
    // flow through select_backend. This is the remote (SNAT) path, the heavier of the two
    // new-flow paths; the local one cannot chain (its output goes to a pod, not a frontend).
    let chain = n;
    let q = Ipv4Addr::new(10, 99, 0, 1);
    let mut cfg = dp.config()?;
    // Room for the chain's exclusive ports; the non_service port (9999) stays outside the
    // range, as the node's own traffic stays outside the default SNAT range.
    cfg.snat_port_min = 32768;
    cfg.snat_port_max = 65535;
    dp.set_config(&cfg)?;
    // The chain service has `backends` remote backends Q1..Qb, and each Qi:8080 is also one
    // of its frontends: every repeat goes through Maglev selection among all of them.
    let qs: Vec<(u32, lb_common::Backend)> = (0..args.backends)
        .map(|i| {
            let qi = Ipv4Addr::new(10, 99, 0, 1 + i as u8);
            (
                n * args.backends + 1 + i,
                lb_tests::fixture::remote_backend(qi, 8080),
            )
        })
        .collect();
    for (id, be) in &qs {
        dp.set_backend(*id, be)?;
    }
    dp.write_full_ring(chain, &ring_for(&qs, DEFAULT_MAGLEV_SIZE))?;
    let chain_fe = Frontend {
        service_id: chain,
        backend_count: args.backends,
        flags: 0,
        affinity_timeout_s: 0,
    };
    for i in 0..args.backends {
        let qi = Ipv4Addr::new(10, 99, 0, 1 + i as u8);
        dp.set_frontend(&frontend_key(Some(qi), 8080, PROTO_TCP), &chain_fe)?;
    }
    let chain_pkt = Packet::eth(CLIENT_MAC, NIC_MAC)
        .ipv4(CLIENT, q)
        .tcp(40000, 8080)
        .syn()
        .build();
    // Every frontend is in place: stamp the fixed point's entry with the epoch they left.
    entry.frontend_epoch = dp.config()?.frontend_epoch;
    dp.set_conntrack(&key, &entry)?;
    Ok(Size {
        n,
        dp,
        non_service,
        arp,
        ct_pkt,
        ct_entry: (key, entry),
        chain_pkt,
    })
}

/// One run of every selected case on one size: (case, ns per packet).
fn round(sz: &mut Size, args: &Args, chase: &Chase) -> Result<Vec<(&'static str, f64)>> {
    let dp = &mut sz.dp;
    let r = args.repeat;
    let mut out = Vec::new();
    let (_, d) = dp.bench_pass(&sz.arp, r)?;
    out.push(("empty_program", d.as_nanos() as f64));
    if args.wants("floor") {
        let ns = one_run(dp, &sz.arp, r, XDP_PASS, Reason::PassNotIpv4)?;
        out.push(("floor", ns));
    }
    if args.wants("non_service") {
        let ns = one_run(dp, &sz.non_service, r, XDP_PASS, Reason::PassNonService)?;
        out.push(("non_service", ns));
    }
    if args.wants("ct_hit") {
        ensure!(
            dp.config()?.frontend_epoch == sz.ct_entry.1.frontend_epoch,
            "ct_hit: the frontends changed, the entry would be checked again"
        );
        let ns = one_run(dp, &sz.ct_pkt, r, XDP_REDIRECT, Reason::FwdLocal)?;
        out.push(("ct_hit", ns));
    }
    if args.wants("ref_ct_lookup") {
        // The same packet through parse and the CONNTRACK lookup alone (DROP if it missed).
        let (v, d) = dp.bench_reference("lb_ref_ct_lookup", &sz.ct_pkt, r)?;
        ensure!(
            v == XDP_PASS,
            "ref_ct_lookup: verdict {v} (the lookup missed)"
        );
        out.push(("ref_ct_lookup", d.as_nanos() as f64));
    }
    if args.wants("new_flow") {
        dp.flush_flows()?;
        let before = stat(dp, Reason::FwdRemote)?;
        let (v, d) = dp.bench_xdp(&sz.chain_pkt, CHAIN_REPEAT)?;
        ensure!(v == XDP_REDIRECT, "new_flow chain: verdict {v}");
        let fwd = stat(dp, Reason::FwdRemote)? - before;
        let flows = dp.conntrack()?.len();
        ensure!(
            fwd == CHAIN_REPEAT as u64 && flows == CHAIN_REPEAT as usize,
            "new_flow chain: {fwd} forwards and {flows} flows for {CHAIN_REPEAT} repeats (every repeat must be a new flow)"
        );
        out.push(("new_flow", d.as_nanos() as f64));
    }
    if args.wants("ref_ct_insert") {
        // One LRU insert per repeat into the emptied CONNTRACK (DROP if one failed), fewer
        // repeats than a CPU's share of the map, so nothing is evicted (neither is in new_flow).
        dp.flush_flows()?;
        let inserts = ref_insert_repeat(args.ct_entries);
        let (v, d) = dp.bench_reference("lb_ref_ct_insert", &sz.arp, inserts)?;
        ensure!(
            v == XDP_PASS,
            "ref_ct_insert: verdict {v} (an insert failed)"
        );
        let flows = dp.conntrack()?.len();
        // Random keys: a handful may coincide.
        ensure!(
            flows as u32 >= inserts - inserts / 100,
            "ref_ct_insert: {flows} entries after {inserts} inserts"
        );
        out.push(("ref_ct_insert", d.as_nanos() as f64));
    }
    if args.wants("mem_random_read") {
        out.push(("mem_random_read", chase.ns_per_read()));
    }
    // Restore the ct_hit fixed point's entry for the next round.
    dp.flush_flows()?;
    dp.set_conntrack(&sz.ct_entry.0, &sz.ct_entry.1)?;
    Ok(out)
}

/// Bytes of the mem_random_read buffer: twice this machine's L3 (32 MiB), so reads miss.
const CHASE_BYTES: usize = 64 << 20;
/// Reads per mem_random_read sample.
const CHASE_READS: usize = 2_000_000;

/// mem_random_read: one dependent read at a random place of a buffer larger than the
/// last-level cache, from userspace. A new flow's map inserts land at random places of
/// tables this large (CONNTRACK and REVNAT are 262 144 entries each), so this is the
/// memory floor under ref_ct_insert and new_flow on this machine.
struct Chase {
    next: Vec<u32>,
}

impl Chase {
    /// One cycle through every slot in random order (Sattolo's shuffle), so each read
    /// depends on the one before and no prefetcher can guess it.
    fn new(bytes: usize) -> Self {
        let n = bytes / std::mem::size_of::<u32>();
        let mut next: Vec<u32> = (0..n as u32).collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in (1..n).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = (x % i as u64) as usize;
            next.swap(i, j);
        }
        Chase { next }
    }

    fn ns_per_read(&self) -> f64 {
        let mut at = 0u32;
        let started = Instant::now();
        for _ in 0..CHASE_READS {
            at = self.next[at as usize];
        }
        let ns = started.elapsed().as_nanos() as f64;
        std::hint::black_box(at);
        ns / CHASE_READS as f64
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if unsafe { libc::geteuid() } != 0 {
        bail!("the XDP benchmark needs root (BPF_PROG_TEST_RUN): run it through `cargo xtask bench xdp`");
    }
    // All sizes stay loaded and are measured in alternation, so drift on a shared machine
    // (other load, frequency) hits every size alike and the ratios stay fair.
    let mut sizes = args
        .services
        .iter()
        .map(|&n| prepare(n, &args))
        .collect::<Result<Vec<_>>>()?;
    let chase = Chase::new(CHASE_BYTES);
    let mut samples: std::collections::BTreeMap<(u32, &'static str), Vec<f64>> = Default::default();
    for r in 0..args.runs {
        for sz in sizes.iter_mut() {
            for (case, ns) in round(sz, &args, &chase)? {
                samples.entry((sz.n, case)).or_default().push(ns);
            }
        }
        eprintln!("  round {}/{} done", r + 1, args.runs);
    }
    let mut cases = Vec::new();
    let mut reference = Vec::new();
    for name in REFERENCE.into_iter().chain(CASES) {
        for sz in &sizes {
            let Some(runs) = samples.get(&(sz.n, name)).cloned() else {
                continue;
            };
            let net = (name != "mem_random_read").then(|| {
                let mut net: Vec<f64> = runs
                    .iter()
                    .zip(&samples[&(sz.n, "empty_program")])
                    .map(|(ns, empty)| ns - empty)
                    .collect();
                median(&mut net)
            });
            let list = if REFERENCE.contains(&name) {
                &mut reference
            } else {
                &mut cases
            };
            list.push(Case {
                name,
                services: sz.n,
                ns_per_packet: median(&mut runs.clone()),
                runs_ns: runs,
                net_ns_per_packet: net,
            });
        }
    }

    println!(
        "{:<15} {:>9} {:>12} {:>10} {:>10} {:>16}",
        "case", "services", "ns/packet", "min", "max", "net of harness"
    );
    for c in reference.iter().chain(&cases) {
        let min = c.runs_ns.iter().cloned().fold(f64::MAX, f64::min);
        let max = c.runs_ns.iter().cloned().fold(0.0, f64::max);
        let net = c
            .net_ns_per_packet
            .map_or_else(|| "-".to_string(), |n| format!("{n:.1}"));
        println!(
            "{:<15} {:>9} {:>12.1} {:>10.1} {:>10.1} {:>16}",
            c.name, c.services, c.ns_per_packet, min, max, net
        );
    }
    let growth = |name: &str| {
        let first = cases.iter().find(|c| c.name == name)?;
        let last = cases.iter().rev().find(|c| c.name == name)?;
        Some((last.ns_per_packet / first.ns_per_packet - 1.0) * 100.0)
    };
    for name in ["ct_hit", "new_flow", "non_service"] {
        if let Some(g) = growth(name) {
            println!(
                "{name}: {g:+.1}% from {} to {} services",
                args.services[0],
                args.services[args.services.len() - 1]
            );
        }
    }
    if let Some(path) = &args.json {
        let report = Report {
            cases,
            reference,
            method: "BPF_PROG_TEST_RUN; see tests/bench/src/bin/bench-xdp.rs",
            maglev_size: DEFAULT_MAGLEV_SIZE,
            backends_per_service: args.backends,
            repeat: args.repeat,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
