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
use std::net::Ipv4Addr;

use lb_tests::scenario::{
    counter_delta, Answer, Lab, LabSpec, ScenarioError, NFT_HOOKS, TCP_NODE_PORT, TCP_TARGET_PORT,
    UDP_NODE_PORT,
};

/// New flows per protocol and entry node: enough that both nodes' pods get many.
const FLOWS: usize = 120;

fn start_lab() -> Lab {
    Lab::start(LabSpec {
        node_objects: true,
        ..LabSpec::default()
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
    const UPLOAD: usize = 512 << 10;
    const DOWNLOAD: usize = 4 << 20;
    let lab = start_lab();
    let node = lab.node_addr(0);
    let before = (counters(&lab, 0), counters(&lab, 1));
    // New connections until one lands on n1's pods (half of them do).
    let mut conn = (0..64)
        .find_map(|_| {
            let mut c = ok("connecting via n0", lab.connect(node, TCP_NODE_PORT));
            let a = with_counters(&lab, "a request via n0", c.get());
            (a.pod.node == 1).then_some(c)
        })
        .expect("one of 64 connections via n0 reaches n1's pods");
    for round in 0..3 {
        let a = with_counters(
            &lab,
            format!("round {round}: {UPLOAD} bytes up, {DOWNLOAD} down via n0 to n1's pod"),
            conn.exchange(UPLOAD, DOWNLOAD),
        );
        assert_eq!(a.pod.node, 1, "the connection moved to another pod: {a:?}");
        assert_eq!(a.client_seen, a.local, "the pod saw another client: {a:?}");
    }
    let after = (counters(&lab, 0), counters(&lab, 1));
    // 3 * 512 KiB up in segments of at most 1440 bytes: at least 1092 encapsulated requests.
    let up = counter_delta(&after.0, &before.0, "fwd_tunnel");
    let taken_in = counter_delta(&after.1, &before.1, "tunnel_in");
    let (back, reversed) = (
        counter_delta(&after.1, &before.1, "tunnel_reply"),
        counter_delta(&after.0, &before.0, "rev_nat_tunnel"),
    );
    eprintln!(
        "n0 fwd_tunnel +{up}, n1 tunnel_in +{taken_in}, n1 tunnel_reply +{back}, n0 rev_nat_tunnel +{reversed}"
    );
    let least_up = (3 * UPLOAD / 1440) as u64;
    assert!(
        up >= least_up && taken_in >= least_up,
        "{up} / {taken_in} < {least_up}"
    );
    // n1's TC program runs once per packet the pod sends (a GSO packet would count once);
    // n0's XDP program once per wire-sized segment, so it sees at least DOWNLOAD / MSS.
    let least_down = (3 * DOWNLOAD / 1440) as u64;
    assert!(back > 0, "n1 tunnelled no replies");
    assert!(
        reversed >= least_down,
        "n0 reverse-NATed {reversed} < {least_down} replies"
    );
    for n in 0..lab.node_count() {
        assert_clean(&lab, n);
    }
}
