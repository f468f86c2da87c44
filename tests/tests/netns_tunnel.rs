//! Tunnel delivery end to end (#13), with real sockets: the nodes know each other (Node
//! objects in the agents' files), so a request that lands on one node for a pod on the other
//! is DNATed and encapsulated (IP-in-IP) to the pod's node, which decapsulates it into the
//! pod and tunnels the pod's replies back; the holding node reverse-NATs them. The pod sees
//! the client's own address and port, as in ip mode, and neither node's netfilter sees the
//! flow. See `netns_dataplane` for the SNAT path (agents that know no other node).
//!
//! Needs root (CI runs as root) and fails, never skips, without it. Run one at a time:
//!     cargo test --release -p lb-tests --test netns_tunnel -- --test-threads=1

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_tests::scenario::{
    counter_delta, Answer, Lab, LabSpec, ScenarioError, CLOSED_UDP_NODE_PORT,
    CLOSED_UDP_TARGET_PORT, NFT_HOOKS, TCP_NODE_PORT, TCP_TARGET_PORT, UDP_NODE_PORT,
};
use lb_tests::topology::NIC;

/// New flows per protocol and entry node: enough that both nodes' pods get many.
const FLOWS: usize = 120;

fn start_lab() -> Lab {
    start_lab_with(LabSpec::default())
}

/// A lab of `spec` whose agents know each other's nodes (tunnel mode).
fn start_lab_with(spec: LabSpec) -> Lab {
    Lab::start(LabSpec {
        node_objects: true,
        ..spec
    })
    .unwrap_or_else(|e| panic!("starting the lab: {}", e))
}

fn ok<T>(what: impl std::fmt::Display, r: Result<T, ScenarioError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {}", e))
}

fn counters(lab: &Lab, node: usize) -> BTreeMap<String, u64> {
    ok(format!("lb-user counters of n{node}"), lab.counters(node))
}

/// Like [`ok`], adding the nodes' non-zero counters to the panic.
fn with_counters<T>(lab: &Lab, what: impl std::fmt::Display, r: Result<T, ScenarioError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}\ncounters: {}", lab.nonzero_counters()))
}

/// Counters that must not move on this path: errors, and the ways a tunnelled packet or a
/// too-large one falls back to the kernel.
fn assert_clean(lab: &Lab, node: usize) {
    let c = counters(lab, node);
    for bad in [
        "pass_internal",
        "drop_redirect_failed",
        "pass_backend_missing",
        "pass_tunnel_peer",
        "pass_tunnel_inner",
        "pass_too_big",
        "icmp_too_big",
    ] {
        assert_eq!(c.get(bad), Some(&0), "n{node}: {bad} counted: {c:?}");
    }
}

/// Every answer came from the frontend the client asked and saw the client's own socket.
fn assert_client_kept(what: &str, target: (Ipv4Addr, u16), answers: &[Answer]) {
    for a in answers {
        assert_eq!(
            (*a.peer.ip(), a.peer.port()),
            target,
            "{what}: answer from the wrong peer: {a:?}"
        );
        assert_eq!(
            a.client_seen, a.local,
            "{what}: pod {} saw another client address than the client's socket: {a:?}",
            a.pod
        );
    }
}

#[test]
fn pods_on_the_other_node_see_the_client_through_the_tunnel_and_netfilter_sees_nothing() {
    let lab = start_lab();
    let probes: Vec<_> = (0..lab.node_count())
        .map(|n| ok(format!("nft probe in n{n}"), lab.install_nft_probe(n)))
        .collect();
    let zero: BTreeMap<String, u64> = NFT_HOOKS.iter().map(|h| (h.to_string(), 0)).collect();

    // The probes count: a connection to a port n0 itself does not serve goes through its input and
    // output hooks (SYN in, RST out). Service flows must leave them where they are then.
    match lab.connect(lab.node_addr(0), TCP_TARGET_PORT) {
        Err(ScenarioError::Request { source, .. })
            if source.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("n0:{TCP_TARGET_PORT} should refuse connections, got {other:?}"),
    }
    let live0 = ok("reading n0's nft probe", probes[0].read());
    assert!(
        live0["input"] > 0 && live0["output"] > 0,
        "n0's probe counted nothing for a closed port: {live0:?}"
    );
    assert_eq!(ok("reading n1's nft probe", probes[1].read()), zero);
    let nf_before: Vec<_> = probes.iter().map(|p| ok("nft probe", p.read())).collect();

    for entry in 0..lab.node_count() {
        let other = 1 - entry;
        let node = lab.node_addr(entry);
        let (before, before_other) = (counters(&lab, entry), counters(&lab, other));
        let tcp = with_counters(
            &lab,
            format!("{FLOWS} TCP flows via n{entry}"),
            lab.http_flows(node, TCP_NODE_PORT, FLOWS),
        );
        let udp = with_counters(
            &lab,
            format!("{FLOWS} UDP queries via n{entry}"),
            lab.udp_flows(node, UDP_NODE_PORT, FLOWS),
        );
        assert_client_kept(&format!("TCP via n{entry}"), (node, TCP_NODE_PORT), &tcp);
        assert_client_kept(&format!("UDP via n{entry}"), (node, UDP_NODE_PORT), &udp);
        let remote = |a: &[Answer]| a.iter().filter(|a| a.pod.node == other).count() as u64;
        let (remote_tcp, remote_udp) = (remote(&tcp), remote(&udp));
        eprintln!(
            "via n{entry}: {remote_tcp} of {FLOWS} TCP and {remote_udp} of {FLOWS} UDP flows \
             to n{other}'s pods, all with the client's address"
        );
        assert!(
            remote_tcp >= 10 && remote_udp >= 10,
            "via n{entry}: too few flows reached n{other}'s pods ({remote_tcp} TCP, {remote_udp} UDP)"
        );

        // The holding node encapsulated every request packet of those flows (at least SYN,
        // ACK and the request per TCP flow, one datagram per UDP query) and reverse-NATed
        // every reply (SYN-ACK and the answer, one datagram); the owning node took each
        // request into the pod and tunnelled each reply back.
        let (after, after_other) = (counters(&lab, entry), counters(&lab, other));
        let requests = 3 * remote_tcp + remote_udp;
        let replies = 2 * remote_tcp + remote_udp;
        for (counter, on, least) in [
            ("fwd_tunnel", entry, requests),
            ("rev_nat_tunnel", entry, replies),
            ("tunnel_in", other, requests),
            ("tunnel_reply", other, replies),
        ] {
            let (now, then) = if on == entry {
                (&after, &before)
            } else {
                (&after_other, &before_other)
            };
            let grew = counter_delta(now, then, counter);
            eprintln!("  n{on} {counter} +{grew} (at least {least})");
            assert!(
                grew >= least,
                "n{on} {counter} grew by {grew}, expected at least {least}"
            );
        }
        // Nothing went the SNAT way.
        assert_eq!(
            counter_delta(&after, &before, "fwd_remote"),
            0,
            "n{entry} SNATed flows"
        );
        assert_eq!(counter_delta(&after_other, &before_other, "fwd_peer"), 0);
    }
    for (n, probe) in probes.iter().enumerate() {
        assert_eq!(
            ok("reading an nft probe", probe.read()),
            nf_before[n],
            "netfilter in n{n} saw tunnelled Service flows (counters before and after)"
        );
    }
    for n in 0..lab.node_count() {
        assert_clean(&lab, n);
    }
}

/// Full-sized segments both ways: the MSS both ends announce is clamped so that a segment
/// plus the 20-byte outer header fits the tunnel's MTU, so nothing needs fragmenting and no
/// ICMP is needed; the pod's replies, however the stack batches them, arrive intact.
#[test]
fn bulk_transfers_cross_the_tunnel_both_ways_at_full_size() {
    bulk_transfers_through_the_tunnel(LabSpec::default());
}

/// The same across a 1 400-byte-MTU network between the nodes: the agents take their tunnel
/// MTU from it, and the clamped MSS (1 400 less the outer and the inner headers) must hold
/// both ends' segments, the client's (whose own link allows 1 360) and the pod's (whose
/// veth allows 1 460).
#[test]
fn bulk_transfers_cross_a_1400_byte_mtu_network_between_the_nodes() {
    bulk_transfers_through_the_tunnel(LabSpec {
        lan_mtu: Some(1400),
        ..LabSpec::default()
    });
}

/// `ROUNDS` exchanges of `UPLOAD` bytes up and `DOWNLOAD` bytes down on one connection via
/// n0 to one of n1's pods, every byte checked, on a lab of `spec`.
fn bulk_transfers_through_the_tunnel(spec: LabSpec) {
    const UPLOAD: usize = 1 << 20;
    const DOWNLOAD: usize = 4 << 20;
    const ROUNDS: usize = 3;
    let wanted_mtu = spec.lan_mtu;
    let lab = start_lab_with(spec);
    let topo = lab.topology();

    // The agents run without --tunnel-mtu: each took the MTU of its eth0, the network's.
    let mut mss = None;
    for n in 0..lab.node_count() {
        let mtu = ok(
            format!("n{n}'s eth0 MTU"),
            topo.mtu(topo.node_ns(n), NIC).map_err(ScenarioError::from),
        );
        if let Some(wanted) = wanted_mtu {
            assert_eq!(
                mtu, wanted,
                "n{n}'s eth0 has another MTU than the lab asked for"
            );
        }
        let cfg = ok(format!("n{n}'s CONFIG"), lab.agent_config(n));
        assert_eq!(
            u32::from(cfg.tunnel_mtu),
            mtu,
            "n{n}'s agent configured another tunnel MTU than its eth0's: {cfg:?}"
        );
        eprintln!(
            "n{n}: eth0 MTU {mtu}, tunnel MTU {}, tunnel MSS {}",
            cfg.tunnel_mtu,
            cfg.tunnel_mss()
        );
        assert_eq!(*mss.get_or_insert(cfg.tunnel_mss()), cfg.tunnel_mss());
    }
    let mss = u32::from(mss.expect("the lab has nodes"));

    let node = lab.node_addr(0);
    let before = (counters(&lab, 0), counters(&lab, 1));
    // New connections until one lands on n1's pods (half of them do).
    let (mut conn, first) = (0..64)
        .find_map(|_| {
            let mut c = ok("connecting via n0", lab.connect(node, TCP_NODE_PORT));
            let a = with_counters(&lab, "a request via n0", c.get());
            (a.pod.node == 1).then_some((c, a))
        })
        .expect("one of 64 connections via n0 reaches n1's pods");

    // What each end sends with: at most the clamped MSS (less the options every segment
    // carries, 40 bytes at most). Unclamped, the client would use its own link's 1 360 or
    // 1 460, and the pod the 1 460 of its veth.
    let pod_addr = ok("the pod's address", lab.pod_addr(first.pod));
    let pod_ns = topo.pod_ns(first.pod.node, first.pod.pod);
    let client_mss = ok(
        "the client's MSS",
        lab.tcp_mss(topo.client_ns(), conn.local(), conn.peer()),
    );
    let pod_mss = ok(
        "the pod's MSS",
        lab.tcp_mss(
            pod_ns,
            SocketAddrV4::new(pod_addr, TCP_TARGET_PORT),
            first.client_seen,
        ),
    );
    eprintln!(
        "client sends segments of {client_mss}, pod {}: {pod_mss} (tunnel MSS {mss})",
        first.pod
    );
    for (end, got) in [("client", client_mss), ("pod", pod_mss)] {
        assert!(
            got <= mss && got + 40 >= mss,
            "the {end} sends segments of {got} bytes, the tunnel carries {mss}"
        );
    }

    for round in 0..ROUNDS {
        let a = with_counters(
            &lab,
            format!("round {round}: {UPLOAD} bytes up, {DOWNLOAD} down via n0 to n1's pod"),
            conn.exchange(UPLOAD, DOWNLOAD),
        );
        assert_eq!(
            a.pod, first.pod,
            "the connection moved to another pod: {a:?}"
        );
        assert_eq!(a.client_seen, a.local, "the pod saw another client: {a:?}");
    }
    let after = (counters(&lab, 0), counters(&lab, 1));
    // Every upload segment (at most `mss` bytes) was encapsulated by n0 and taken in by n1.
    let up = counter_delta(&after.0, &before.0, "fwd_tunnel");
    let taken_in = counter_delta(&after.1, &before.1, "tunnel_in");
    let (back, reversed) = (
        counter_delta(&after.1, &before.1, "tunnel_reply"),
        counter_delta(&after.0, &before.0, "rev_nat_tunnel"),
    );
    eprintln!(
        "n0 fwd_tunnel +{up}, n1 tunnel_in +{taken_in}, n1 tunnel_reply +{back}, n0 rev_nat_tunnel +{reversed}"
    );
    let least_up = (ROUNDS * UPLOAD) as u64 / u64::from(mss);
    assert!(
        up >= least_up && taken_in >= least_up,
        "{up} / {taken_in} < {least_up}"
    );
    // n1's TC program runs once per packet the pod sends (a GSO packet would count once);
    // n0's XDP program once per wire-sized segment, so it sees at least DOWNLOAD / MSS.
    let least_down = (ROUNDS * DOWNLOAD) as u64 / u64::from(mss);
    assert!(back > 0, "n1 tunnelled no replies");
    assert!(
        reversed >= least_down,
        "n0 reverse-NATed {reversed} < {least_down} replies"
    );
    for n in 0..lab.node_count() {
        assert_clean(&lab, n);
    }
}

/// Datagrams to the Service's `closed` port until [`REFUSED_REMOTE`] of them went to pods
/// on the other node.
const REFUSED_REMOTE: usize = 3;

/// A UDP request to a port no pod listens on: the pod's kernel sends an ICMP port
/// unreachable to the client. For a pod on n1 behind n0's NodePort, n1's TC program tunnels
/// it back to n0 (tunnel_reply), whose XDP program translates it (icmp_rev_nat): it comes
/// from the frontend and quotes the client's datagram to the frontend, so the client's
/// kernel hands it to the connected socket, which fails with ECONNREFUSED. A pod on n0 gets
/// the same from n0's TC program. Netfilter sees neither the datagrams nor the errors.
#[test]
fn a_closed_udp_port_on_a_pod_behind_the_tunnel_refuses_the_client() {
    let lab = start_lab_with(LabSpec {
        closed_udp_port: true,
        ..LabSpec::default()
    });
    // Every datagram here is to be refused: the pods' kernels must send each port
    // unreachable (their ICMP rate limit lets 6 through to one client, then one a second,
    // and a run of 7 datagrams to one pod happened once).
    for pod in lab.pods() {
        let ns = lab.topology().pod_ns(pod.node, pod.pod);
        lb_tests::netns::sysctls(ns, &[("net/ipv4/icmp_ratelimit", "0")])
            .unwrap_or_else(|e| panic!("icmp_ratelimit 0 in {ns}: {e}"));
    }
    let probes: Vec<_> = (0..lab.node_count())
        .map(|n| {
            let udp = ok(format!("nft probe in n{n}"), lab.install_nft_probe(n));
            let icmp = ok(format!("ICMP nft probe in n{n}"), lab.install_icmp_probe(n));
            (udp, icmp)
        })
        .collect();
    let read = |n: usize| {
        let (udp, icmp) = &probes[n];
        (
            ok("reading an nft probe", udp.read()),
            ok("reading an ICMP nft probe", icmp.read()),
        )
    };
    let node = lab.node_addr(0);

    // The probes count: a datagram to a port n0's own stack does not serve goes up its input
    // hook and the port unreachable out of its output hook. Service datagrams and their
    // errors must leave them where they are then.
    let own = with_counters(
        &lab,
        format!("a datagram to n0:{CLOSED_UDP_TARGET_PORT} (no Service port)"),
        lab.udp_icmp_error(node, CLOSED_UDP_TARGET_PORT, b"lbx n0 itself"),
    );
    assert_eq!(
        (own.error, own.offender, own.quoted_dst),
        (
            ErrorKind::ConnectionRefused,
            node,
            SocketAddrV4::new(node, CLOSED_UDP_TARGET_PORT)
        ),
        "n0's own port unreachable: {own:?}"
    );
    let (udp0, icmp0) = read(0);
    assert!(
        udp0["input"] > 0 && icmp0["output"] > 0,
        "n0's probes counted nothing for its own closed port: {udp0:?} {icmp0:?}"
    );
    let nf_before: Vec<_> = (0..lab.node_count()).map(read).collect();

    let frontend = SocketAddrV4::new(node, CLOSED_UDP_NODE_PORT);
    let (mut remote, mut local) = (0, 0);
    for attempt in 0..64 {
        let before = (counters(&lab, 0), counters(&lab, 1));
        let payload = format!("lbx closed-port datagram {attempt}");
        let report = with_counters(
            &lab,
            format!("datagram {attempt} to {frontend}"),
            lab.udp_icmp_error(node, CLOSED_UDP_NODE_PORT, payload.as_bytes()),
        );
        let after = (counters(&lab, 0), counters(&lab, 1));
        let delta = |n: usize, c: &str| {
            if n == 0 {
                counter_delta(&after.0, &before.0, c)
            } else {
                counter_delta(&after.1, &before.1, c)
            }
        };
        let tunnelled = delta(0, "fwd_tunnel");
        assert_eq!(
            tunnelled + delta(0, "fwd_local"),
            1,
            "datagram {attempt}: n0 neither tunnelled nor delivered it exactly once\n{}",
            lab.nonzero_counters()
        );
        eprintln!(
            "datagram {attempt} from {} to {}'s pod: {:?} (ICMP {}/{}) from {}, quoting {} {:?}",
            report.local,
            if tunnelled == 1 { "n1" } else { "n0" },
            report.error,
            report.icmp_type,
            report.icmp_code,
            report.offender,
            report.quoted_dst,
            String::from_utf8_lossy(&report.quoted_payload),
        );
        // The error the client got is the pod's port unreachable, as if the frontend had
        // sent it about the client's own datagram.
        assert_eq!(report.error, ErrorKind::ConnectionRefused, "{report:?}");
        assert_eq!(
            (report.icmp_type, report.icmp_code),
            (3, 3),
            "not a port unreachable: {report:?}"
        );
        assert_eq!(
            report.offender, node,
            "the error is not from the frontend: {report:?}"
        );
        assert_eq!(report.quoted_dst, frontend, "{report:?}");
        assert_eq!(
            report.quoted_payload,
            payload.as_bytes(),
            "the error quotes another datagram: {report:?}"
        );
        // Who carried it: for n1's pod, n0 tunnelled the datagram, n1 took it in and
        // tunnelled the error back, and n0 translated it; for n0's pod, n0's TC program
        // translated it. One each, and nothing else moved.
        let expected: &[(usize, &str, u64)] = if tunnelled == 1 {
            remote += 1;
            &[
                (0, "icmp_rev_nat", 1),
                (0, "rev_nat_tunnel", 0),
                (0, "pass_tunnel_inner", 0),
                (1, "tunnel_in", 1),
                (1, "tunnel_reply", 1),
                (1, "icmp_rev_nat", 0),
                (1, "pass_not_reply", 0),
            ]
        } else {
            local += 1;
            &[
                (0, "icmp_rev_nat", 1),
                (0, "pass_not_reply", 0),
                (1, "tunnel_in", 0),
                (1, "tunnel_reply", 0),
            ]
        };
        for &(n, counter, want) in expected {
            assert_eq!(
                delta(n, counter),
                want,
                "datagram {attempt}: n{n} {counter}\n{}",
                lab.nonzero_counters()
            );
        }
        if remote == REFUSED_REMOTE {
            break;
        }
    }
    eprintln!("{remote} datagrams refused by n1's pods, {local} by n0's");
    assert_eq!(
        remote, REFUSED_REMOTE,
        "too few of 64 datagrams via n0 reached n1's pods"
    );

    // Traceroute probes: a datagram sent with TTL 2 reaches a pod behind n0 (n0 is its one
    // router) and is refused there, but would run out on n1 (its second router) on the way
    // to n1's pods: n0 answers those with a time-exceeded from its own address, quoting the
    // datagram's headers as the client sent them, and tunnels nothing.
    let (mut expired, mut refused) = (0, 0);
    for attempt in 0..64 {
        let before = counters(&lab, 0);
        let payload = format!("lbx ttl-2 datagram {attempt}");
        let report = with_counters(
            &lab,
            format!("TTL-2 datagram {attempt} to {frontend}"),
            lab.udp_icmp_error_ttl(node, CLOSED_UDP_NODE_PORT, payload.as_bytes(), Some(2)),
        );
        let after = counters(&lab, 0);
        let delta = |c: &str| counter_delta(&after, &before, c);
        eprintln!(
            "TTL-2 datagram {attempt} from {}: {:?} (ICMP {}/{}) from {}",
            report.local, report.error, report.icmp_type, report.icmp_code, report.offender
        );
        // The kernel handed the error to this datagram's own socket: it matched the quoted
        // addresses and ports.
        assert_eq!(report.quoted_dst, frontend, "{report:?}");
        assert_eq!(report.offender, node, "{report:?}");
        if delta("icmp_time_exceeded") == 1 {
            expired += 1;
            // lbx quotes RFC 792's minimum, the IP and UDP headers (as its
            // fragmentation-needed does): no payload.
            assert_eq!(
                (
                    report.error,
                    report.icmp_type,
                    report.icmp_code,
                    report.quoted_payload.len()
                ),
                (ErrorKind::HostUnreachable, 11, 0, 0),
                "not a time-exceeded: {report:?}"
            );
            assert_eq!(delta("fwd_tunnel"), 0, "{}", lab.nonzero_counters());
        } else {
            refused += 1;
            assert_eq!(report.quoted_payload, payload.as_bytes(), "{report:?}");
            assert_eq!(
                (
                    report.error,
                    report.icmp_type,
                    report.icmp_code,
                    delta("fwd_local")
                ),
                (ErrorKind::ConnectionRefused, 3, 3, 1),
                "datagram {attempt}: neither expired at n0 nor refused by n0's pod: {report:?}\n{}",
                lab.nonzero_counters()
            );
        }
        if expired >= REFUSED_REMOTE && refused > 0 {
            break;
        }
    }
    eprintln!(
        "{expired} TTL-2 datagrams expired at n0 (bound for n1), {refused} refused by n0's pods"
    );
    assert!(
        expired >= REFUSED_REMOTE && refused > 0,
        "64 TTL-2 datagrams: {expired} expired, {refused} refused"
    );
    for (n, before) in nf_before.iter().enumerate() {
        assert_eq!(
            &read(n),
            before,
            "netfilter in n{n} saw the datagrams or their ICMP errors \
             ((TCP/UDP, ICMP) counters before and after)"
        );
        assert_clean(&lab, n);
    }
}
