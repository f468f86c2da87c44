//! `cargo xtask bench xdp --json FILE`: ns per packet of the XDP program through
//! BPF_PROG_TEST_RUN, for an established flow (ct hit), new flows (Maglev select + ct
//! create) to local pods, through the tunnel and by SNAT, the tunnel's legs, and a
//! non-service packet, at 1, 1 000 and 10 000 services of 10 backends each.
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
//! - through the harness (`lb_bench_harness`, lb-ebpf/src/reference.rs: it puts the packet
//!   back on every repeat, a fresh client address and port if asked, then runs
//!   `lb_ingress`'s own code): new_flow_local (a SYN to a NodePort whose backends are local
//!   pods: select, one CONNTRACK insert, DNAT, redirect), new_flow_tunnel (the same to a
//!   Service whose pods are on another node: select, insert, DNAT, MSS clamp, IP-in-IP
//!   encapsulation, redirect to the NIC), ct_hit_tunnel (an established tunnelled flow's
//!   ACK: lookup, DNAT, encapsulation), new_flow_snat (the same SYN to a Service whose pods
//!   are reached by SNAT, `--remote-mode snat`: select, a SNAT port, a REVNAT entry besides
//!   the CONNTRACK one) and decap_tunnel (the owning node: an IP-in-IP request from a peer
//!   decapsulated into a local pod, its RETURNS entry found; decap_tunnel_new: the same for
//!   a new flow's SYN, one RETURNS insert). The counters prove every repeat took the case's
//!   path; after the last round, the tables show that every new-flow repeat left an entry
//!   of its own and none was evicted. `harness` is the harness alone (restore and a fresh
//!   flow, then XDP_PASS): what these cases carry that the plain-repeat ones do not (their
//!   checksums go stale, which no path checks). This is the method of the Katran anchor
//!   (../shared/anchors/katran), so its cases compare gross to gross, and like its
//!   new_flow_syn the new flows go into never-used entries of a 4M-entry table (nothing is
//!   flushed between rounds), on one pinned CPU (`--cpu`, default the last). An earlier
//!   version flushed the tables between runs, so its inserts reused freed entries in hash
//!   order, a different (steady-state-like) condition: new_flow_local 1.4-1.6x slower in
//!   an earlier sitting of the same day (not an A/B).
//! - empty_program / floor: the harness cost (a program that only returns XDP_PASS) and the
//!   program's shortest path (an ARP frame), for reference.
//! - ref_ct_lookup / ref_ct_insert: the object's reference programs (never attached): the
//!   ct_hit packet through parse and one CONNTRACK lookup, and one CONNTRACK insert of a
//!   fresh key (ct_create makes one such insert per new flow; SNAT flows one more, REVNAT).
//!   They show how much of ct_hit and the new flows is the kernel's LRU hash code.
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
use lb_common::{
    bench::{BenchInput, BENCH_PACKET_LEN, BENCH_PIPELINE, BENCH_RESTORE_ONLY},
    port_be, CtEntry, FlowKey, Frontend, Reason, CFG_TUNNEL, DEFAULT_MAGLEV_SIZE, PEER_TUNNEL,
    PROTO_TCP,
};
use lb_tests::{
    fixture::{
        addr, frontend_key, local_backend, node_config, ring_for, tunnel_backend, NODE1, NODE1_MAC,
        XDP_PASS, XDP_REDIRECT,
    },
    packet::{datagram, Packet, IPPROTO_IPIP},
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
    /// Conntrack (and reverse-NAT, RETURNS) entries. Katran's anchor's connection table has
    /// 4M; the new-flow cases insert into never-used entries of it (see the module's doc).
    #[arg(long, default_value_t = 4_194_304)]
    ct_entries: u32,
    /// The CPU the benchmark (and so every test run) stays on; default the last, as the
    /// Katran anchor's.
    #[arg(long)]
    cpu: Option<usize>,
    /// Only these cases (default: all), e.g. `--cases new_flow_tunnel` to profile one path with
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
const REFERENCE: [&str; 6] = [
    "empty_program",
    "harness",
    "floor",
    "ref_ct_lookup",
    "ref_ct_insert",
    "mem_random_read",
];
/// The cases the targets are about, in report order.
const CASES: [&str; 8] = [
    "non_service",
    "ct_hit",
    "new_flow_local",
    "ct_hit_tunnel",
    "new_flow_tunnel",
    "decap_tunnel",
    "decap_tunnel_new",
    "new_flow_snat",
];

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
    /// The cases of [`CASES`], per service count.
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
        max_services: n + 2, // + the SNAT and the tunnel Service
        maglev_size: DEFAULT_MAGLEV_SIZE,
        max_backends: n * b + 2 * b + 1,
        max_frontends: n + 16,
        ct_entries,
        affinity_entries: 1024,
        pin_dir: None,
    })
    .context("loading the data plane (run as root)")?;
    let mut cfg = node_config();
    // Decrementing TTL would end the ct_hit fixed point after 255 repeats. Tunnel delivery
    // on (IP-in-IP), as the agent's default.
    cfg.flags = CFG_TUNNEL;
    dp.set_config(&cfg)?;
    // The other node, a tunnel peer: decap_tunnel's requests come from it.
    dp.set_peers(&[(NODE1, PEER_TUNNEL)])?;
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

/// One harness run of `repeat` repeats of `input`; the counters must show every repeat
/// took the path named by `reason` (XDP_REDIRECT). Returns ns per packet.
fn harness_run(dp: &mut Dataplane, input: &BenchInput, repeat: u32, reason: Reason) -> Result<f64> {
    let before = stat(dp, reason)?;
    let (v, d) = dp.bench_harness(input, repeat)?;
    ensure!(v == XDP_REDIRECT, "{}: verdict {v}", reason.name());
    let counted = stat(dp, reason)? - before;
    ensure!(
        counted == repeat as u64,
        "{} counted {counted} of {repeat} harness repeats: the path changed",
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
    /// The ct_hit fixed point's conntrack entry, rewritten after each round.
    ct_entry: (FlowKey, CtEntry),
    /// Harness inputs: a SYN to a local Service from a fresh client each repeat, the same to
    /// the tunnel Service, that Service's established flow (its SYN first: `tunnel_syn`),
    /// an IP-in-IP request from the peer for a local pod (an established flow's ACK).
    new_local: BenchInput,
    new_tunnel: BenchInput,
    /// The same to the SNAT Service.
    new_snat: BenchInput,
    tunnel_syn: Vec<u8>,
    ct_tunnel: BenchInput,
    decap: BenchInput,
    /// The same for a new flow's SYN from a fresh client each repeat.
    decap_new: BenchInput,
    /// Inserts so far: the new-flow cases' (CONNTRACK), ref_ct_insert's (random keys) and
    /// decap_tunnel_new's (RETURNS).
    new_flows: u64,
    random_inserts: u64,
    returns: u64,
}

/// A harness input: `packet` padded to [`BENCH_PACKET_LEN`] by its builder's payload.
fn harness_input(packet: Vec<u8>, vary_at: Option<(usize, usize)>) -> Result<BenchInput> {
    ensure!(
        packet.len() == BENCH_PACKET_LEN,
        "a harness packet is {BENCH_PACKET_LEN} bytes, this one {}",
        packet.len()
    );
    let mut input = BenchInput {
        mode: BENCH_PIPELINE,
        ..Default::default()
    };
    input.packet.copy_from_slice(&packet);
    if let Some((addr_off, port_off)) = vary_at {
        (input.vary, input.addr_off, input.port_off) = (1, addr_off as u32, port_off as u32);
    }
    Ok(input)
}

/// Offsets of the IPv4 source address and the source port behind an Ethernet header.
const SRC_AT: (usize, usize) = (14 + 12, 14 + 20);
/// The same inside IP-in-IP.
const INNER_SRC_AT: (usize, usize) = (14 + 20 + 12, 14 + 20 + 20);
/// A SYN's MSS option (1460), as every real SYN carries one: the tunnel clamps it.
const MSS_1460: [u8; 4] = [2, 4, 0x05, 0xb4];
/// The tunnel and the SNAT Service's NodePorts, outside the local Services' range.
const TUNNEL_NODE_PORT: u16 = 31000;
const SNAT_NODE_PORT: u16 = 31001;

/// New flows per run of a new-flow case (and ref_ct_insert's inserts).
const NEW_FLOW_REPEAT: u32 = 20_000;
/// new_flow_snat's: each holds a SNAT port of its backend for `snat_idle_s`, and 15 runs of
/// these fill a tenth of the 10 backends' 32 768 ports each, so a port is found at the first
/// probes (as on a node that is not running out of them); 20 000 a run filled them and
/// passed flows to the kernel (`pass_snat_exhausted`) by the fourth round.
const SNAT_FLOW_REPEAT: u32 = 2_000;
/// Each new-flow case's flows start at its own multiple of 2^this in the harness's counter.
const FLOW_RANGE_BITS: u32 = 26;
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

    // The SNAT Service (slot n, `--remote-mode snat`): `backends` pods on another node
    // reached by SNAT to this node; its NodePort takes SYNs from a fresh client each repeat.
    let snat_svc = n;
    let mut cfg = dp.config()?;
    // Room for the SNAT ports (allocated per backend); the non_service port (9999) stays
    // outside the range, as the node's own traffic stays outside the default SNAT range.
    cfg.snat_port_min = 32768;
    cfg.snat_port_max = 65535;
    dp.set_config(&cfg)?;
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
    dp.write_full_ring(snat_svc, &ring_for(&qs, DEFAULT_MAGLEV_SIZE))?;
    dp.set_frontend(
        &frontend_key(None, SNAT_NODE_PORT, PROTO_TCP),
        &Frontend {
            service_id: snat_svc,
            backend_count: args.backends,
            flags: 0,
            affinity_timeout_s: 0,
        },
    )?;
    // The tunnel Service (slot n + 1): `backends` pods on the other node, reached through
    // the tunnel; its NodePort takes SYNs from a fresh client each repeat.
    let tunnel_svc = n + 1;
    let ts: Vec<(u32, lb_common::Backend)> = (0..args.backends)
        .map(|i| {
            let pod = Ipv4Addr::new(10, 98, 0, 1 + i as u8);
            ((n + 1) * args.backends + 1 + i, tunnel_backend(pod, 8080))
        })
        .collect();
    for (id, be) in &ts {
        dp.set_backend(*id, be)?;
    }
    dp.write_full_ring(tunnel_svc, &ring_for(&ts, DEFAULT_MAGLEV_SIZE))?;
    dp.set_frontend(
        &frontend_key(None, TUNNEL_NODE_PORT, PROTO_TCP),
        &Frontend {
            service_id: tunnel_svc,
            backend_count: args.backends,
            flags: 0,
            affinity_timeout_s: 0,
        },
    )?;
    // Padding payloads bring every harness packet to BENCH_PACKET_LEN: an Ethernet, IPv4
    // and TCP header with the MSS option is 58 bytes, without it 54, and IP-in-IP adds 20.
    let syn_to = |port: u16| {
        Packet::eth(CLIENT_MAC, NIC_MAC)
            .ipv4(CLIENT, NODE)
            .tcp(40001, port)
            .syn()
            .tcp_options(&MSS_1460)
            .payload(&[0u8; BENCH_PACKET_LEN - 58])
    };
    let new_local = harness_input(syn_to(NODEPORT_BASE + target as u16).build(), Some(SRC_AT))?;
    let mut new_tunnel = harness_input(syn_to(TUNNEL_NODE_PORT).build(), Some(SRC_AT))?;
    let mut new_snat = harness_input(syn_to(SNAT_NODE_PORT).build(), Some(SRC_AT))?;
    // Disjoint flow ranges: the counter's bits above 24 go into the source port.
    new_tunnel.counter = 1 << FLOW_RANGE_BITS;
    new_snat.counter = 2 << FLOW_RANGE_BITS;
    let tunnel_syn = syn_to(TUNNEL_NODE_PORT).build();
    let ct_tunnel = harness_input(
        Packet::eth(CLIENT_MAC, NIC_MAC)
            .ipv4(CLIENT, NODE)
            .tcp(40001, TUNNEL_NODE_PORT)
            .ack()
            .payload(&[0u8; BENCH_PACKET_LEN - 54])
            .build(),
        None,
    )?;
    // What the other node tunnels here for our pod: backend 0 of Service 0, a pod
    // LOCAL_ENDPOINTS holds (it has room for 16 384 local pods, the benchmark programs up to
    // 100 000 local backends; a node runs a few hundred pods).
    let inner = Packet::eth(CLIENT_MAC, NIC_MAC)
        .ipv4(CLIENT, pod_ip(0, 0))
        .tcp(40002, 8080)
        .ack()
        .payload(&[0u8; BENCH_PACKET_LEN - 54 - 20]);
    let decap = harness_input(
        Packet::eth(NODE1_MAC, NIC_MAC)
            .ipv4(NODE1, NODE)
            .ip_proto(IPPROTO_IPIP)
            .payload(&datagram(&inner.build()))
            .build(),
        None,
    )?;
    // The same for a new flow (a SYN) from a fresh client each repeat: one RETURNS insert.
    let inner_syn = Packet::eth(CLIENT_MAC, NIC_MAC)
        .ipv4(CLIENT, pod_ip(0, 0))
        .tcp(40003, 8080)
        .syn()
        .tcp_options(&MSS_1460)
        .payload(&[0u8; BENCH_PACKET_LEN - 58 - 20]);
    let mut decap_new = harness_input(
        Packet::eth(NODE1_MAC, NIC_MAC)
            .ipv4(NODE1, NODE)
            .ip_proto(IPPROTO_IPIP)
            .payload(&datagram(&inner_syn.build()))
            .build(),
        Some(INNER_SRC_AT),
    )?;
    decap_new.counter = 3 << FLOW_RANGE_BITS;
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
        new_local,
        new_tunnel,
        new_snat,
        tunnel_syn,
        ct_tunnel,
        decap,
        decap_new,
        new_flows: 0,
        random_inserts: 0,
        returns: 0,
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
    if args.wants("harness") {
        let floor = BenchInput {
            mode: BENCH_RESTORE_ONLY,
            ..sz.new_local
        };
        let (v, d) = dp.bench_harness(&floor, r)?;
        ensure!(v == XDP_PASS, "harness: verdict {v}");
        out.push(("harness", d.as_nanos() as f64));
    }
    // Each case's flows continue where its last run stopped (its own counter range), so
    // every repeat inserts a key never seen, into table memory never used (nothing is
    // flushed; `check_flows` proves it at the end).
    for (case, input, reason, repeat) in [
        (
            "new_flow_local",
            &mut sz.new_local,
            Reason::FwdLocal,
            NEW_FLOW_REPEAT,
        ),
        (
            "new_flow_tunnel",
            &mut sz.new_tunnel,
            Reason::FwdTunnel,
            NEW_FLOW_REPEAT,
        ),
        (
            "new_flow_snat",
            &mut sz.new_snat,
            Reason::FwdRemote,
            SNAT_FLOW_REPEAT,
        ),
    ] {
        if args.wants(case) {
            let ns = harness_run(dp, input, repeat, reason)?;
            input.counter += u64::from(repeat);
            sz.new_flows += u64::from(repeat);
            out.push((case, ns));
        }
    }
    if args.wants("ct_hit_tunnel") {
        // The flow's SYN through the real program (once: later rounds find its entry), then
        // its ACK on every repeat.
        let (v, _) = dp.test_run_xdp(&sz.tunnel_syn)?;
        ensure!(v == XDP_REDIRECT, "ct_hit_tunnel: the SYN's verdict {v}");
        let ns = harness_run(dp, &sz.ct_tunnel, r, Reason::FwdTunnel)?;
        out.push(("ct_hit_tunnel", ns));
    }
    if args.wants("decap_tunnel") {
        let ns = harness_run(dp, &sz.decap, r, Reason::TunnelIn)?;
        out.push(("decap_tunnel", ns));
    }
    if args.wants("decap_tunnel_new") {
        let ns = harness_run(dp, &sz.decap_new, NEW_FLOW_REPEAT, Reason::TunnelIn)?;
        sz.decap_new.counter += u64::from(NEW_FLOW_REPEAT);
        sz.returns += u64::from(NEW_FLOW_REPEAT);
        out.push(("decap_tunnel_new", ns));
    }
    if args.wants("ref_ct_insert") {
        // One LRU insert of a random key per repeat (DROP if one failed), into never-used
        // entries like the new-flow cases.
        let (v, d) = dp.bench_reference("lb_ref_ct_insert", &sz.arp, NEW_FLOW_REPEAT)?;
        ensure!(
            v == XDP_PASS,
            "ref_ct_insert: verdict {v} (an insert failed)"
        );
        sz.random_inserts += u64::from(NEW_FLOW_REPEAT);
        out.push(("ref_ct_insert", d.as_nanos() as f64));
    }
    if args.wants("mem_random_read") {
        out.push(("mem_random_read", chase.ns_per_read()));
    }
    // The ct_hit fixed point's entry as it was (a repeat may have refreshed its stamp).
    dp.set_conntrack(&sz.ct_entry.0, &sz.ct_entry.1)?;
    Ok(out)
}

/// After all rounds: every new flow's entry is still in CONNTRACK (and every decapsulated
/// new flow's in RETURNS), so every repeat of those cases inserted a key of its own and
/// nothing was evicted. Random ref_ct_insert keys may coincide (a handful in a million).
fn check_flows(sz: &Size, args: &Args) -> Result<()> {
    let flows = sz.dp.conntrack()?.len() as u64;
    // + the ct_hit flow (set up with the Services) and ct_hit_tunnel's (its SYN's), when
    // that case ran.
    let fixed = 1 + u64::from(args.wants("ct_hit_tunnel"));
    let most = sz.new_flows + sz.random_inserts + fixed;
    let least = most - sz.random_inserts / 100;
    ensure!(
        flows >= least && flows <= most,
        "{} services: CONNTRACK holds {flows} flows, expected {least}..={most} \
         (a new-flow repeat that was not a new flow, or an eviction)",
        sz.n,
    );
    // + decap_tunnel's flow, when it ran.
    let want = sz.returns + u64::from(args.wants("decap_tunnel"));
    let returns = sz.dp.returns()?.len() as u64;
    ensure!(
        returns == want,
        "{} services: RETURNS holds {returns}, expected {want} (decap_tunnel_new's flows and decap_tunnel's)",
        sz.n,
    );
    eprintln!(
        "  {} services: {flows} flows and {returns} returns, none evicted",
        sz.n
    );
    Ok(())
}

/// Bytes of the mem_random_read buffer: twice this machine's L3 (32 MiB), so reads miss.
const CHASE_BYTES: usize = 64 << 20;
/// Reads per mem_random_read sample.
const CHASE_READS: usize = 2_000_000;

/// mem_random_read: one dependent read at a random place of a buffer larger than the
/// last-level cache, from userspace. A new flow's map inserts land at random places of
/// tables this large (CONNTRACK and REVNAT are 262 144 entries each), so this is the
/// memory floor under ref_ct_insert and the new flows on this machine.
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
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = args.cpu.unwrap_or(cpus - 1);
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (the only one).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    // Nothing may be evicted: every insert of every round must fit in the pinned CPU's
    // share of the per-CPU LRU lists (entries / possible CPUs).
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<u64>().ok())
        .map_or(cpus as u64, |last| last + 1);
    let inserts = args.runs as u64 * 4 * u64::from(NEW_FLOW_REPEAT) + 2;
    ensure!(
        inserts <= u64::from(args.ct_entries) / possible,
        "{} runs insert {inserts} flows per size, more than one CPU's share of {} conntrack \
         entries over {possible} CPUs: raise --ct-entries or lower --runs",
        args.runs,
        args.ct_entries
    );
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
    for sz in &sizes {
        check_flows(sz, &args)?;
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
        "{:<17} {:>9} {:>12} {:>10} {:>10} {:>16}",
        "case", "services", "ns/packet", "min", "max", "net of harness"
    );
    for c in reference.iter().chain(&cases) {
        let min = c.runs_ns.iter().cloned().fold(f64::MAX, f64::min);
        let max = c.runs_ns.iter().cloned().fold(0.0, f64::max);
        let net = c
            .net_ns_per_packet
            .map_or_else(|| "-".to_string(), |n| format!("{n:.1}"));
        println!(
            "{:<17} {:>9} {:>12.1} {:>10.1} {:>10.1} {:>16}",
            c.name, c.services, c.ns_per_packet, min, max, net
        );
    }
    let growth = |name: &str| {
        let first = cases.iter().find(|c| c.name == name)?;
        let last = cases.iter().rev().find(|c| c.name == name)?;
        Some((last.ns_per_packet / first.ns_per_packet - 1.0) * 100.0)
    };
    for name in ["ct_hit", "new_flow_local", "new_flow_tunnel", "non_service"] {
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
