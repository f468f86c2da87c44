//! The XDP data plane end to end, with real sockets: a client, two nodes each running the
//! real `lb-user standalone` agent on its NIC, and pod servers behind them (see
//! `lb_tests::scenario`). Every test builds its own lab under a unique namespace prefix.
//!
//! Needs root (CI runs as root) and fails, never skips, without it. Run one at a time:
//!     cargo test --release -p lb-tests --test netns_dataplane -- --test-threads=1

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lb_tests::scenario::{
    counter_delta, Answer, EndpointSpec, HttpConn, Lab, LabSpec, PodId, ScenarioError,
    LB_INGRESS_IP, NFT_HOOKS, TCP_NODE_PORT, TCP_SERVICE_PORT, TCP_TARGET_PORT, UDP_NODE_PORT,
    UDP_SERVICE_PORT,
};

/// Connections per check: with 4 equal backends, 200 flows leave a pod out with probability
/// 4 * (3/4)^200 (about 1e-24), and give each pod 50 +- 6 flows.
const FLOWS: usize = 200;
/// Pause between new flows while waiting for an agent to apply a config change.
const POLL: Duration = Duration::from_millis(10);

fn start_lab() -> Lab {
    Lab::start(LabSpec::default()).unwrap_or_else(|e| panic!("starting the lab: {}", e))
}

fn ok<T>(what: impl std::fmt::Display, r: Result<T, ScenarioError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {}", e))
}

/// Like [`ok`], adding the agents' counters to the panic: they say what the data plane
/// did with the traffic that failed.
fn with_counters<T>(lab: &Lab, what: impl std::fmt::Display, r: Result<T, ScenarioError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}\ncounters: {}", lab.nonzero_counters()))
}

/// `n` new TCP connections (one request each) to `addr:port`, every one from a new source
/// port and answered by `addr:port` itself.
fn tcp_flows(lab: &Lab, addr: Ipv4Addr, port: u16, n: usize) -> Vec<Answer> {
    let target = SocketAddrV4::new(addr, port);
    let answers = with_counters(
        lab,
        format!("{n} TCP flows to {target}"),
        lab.http_flows(addr, port, n),
    );
    check_flows("TCP", target, &answers);
    answers
}

/// Like [`tcp_flows`] for UDP queries.
fn udp_flows(lab: &Lab, addr: Ipv4Addr, port: u16, n: usize) -> Vec<Answer> {
    let target = SocketAddrV4::new(addr, port);
    let answers = with_counters(
        lab,
        format!("{n} UDP queries to {target}"),
        lab.udp_flows(addr, port, n),
    );
    check_flows("UDP", target, &answers);
    answers
}

fn check_flows(proto: &str, target: SocketAddrV4, answers: &[Answer]) {
    for a in answers {
        // The connected socket received the answer, so it came from the frontend; the
        // peer address says the same from the socket's side.
        assert_eq!(a.peer, target, "{proto} answer from the wrong peer: {a:?}");
    }
    let ports: BTreeSet<u16> = answers.iter().map(|a| a.local.port()).collect();
    assert_eq!(
        ports.len(),
        answers.len(),
        "{proto} flows to {target} reused client source ports: they were not all new flows"
    );
}

fn per_pod(answers: &[Answer]) -> BTreeMap<PodId, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.pod).or_insert(0) += 1;
    }
    m
}

/// Every pod answered, and Maglev spread the flows: each pod got at least a third of
/// its fair share.
fn assert_spread(what: &str, lab: &Lab, answers: &[Answer]) {
    let counts = per_pod(answers);
    let all: BTreeSet<PodId> = lab.pods().into_iter().collect();
    let answered: BTreeSet<PodId> = counts.keys().copied().collect();
    assert_eq!(answered, all, "{what}: pods that answered: {counts:?}");
    let fair = answers.len() / all.len();
    for (pod, n) in &counts {
        assert!(
            *n >= fair / 3,
            "{what}: {pod} got {n} of {} flows (fair share {fair}): {counts:?}",
            answers.len()
        );
    }
    eprintln!("{what}: {counts:?}");
}

fn counters(lab: &Lab, node: usize) -> BTreeMap<String, u64> {
    ok(format!("lb-user counters of n{node}"), lab.counters(node))
}

/// Counters that must never move: a program error or a failed redirect is a bug.
fn assert_no_errors(lab: &Lab, node: usize) {
    let c = counters(lab, node);
    for bad in [
        "pass_internal",
        "drop_redirect_failed",
        "pass_backend_missing",
    ] {
        assert_eq!(c.get(bad), Some(&0), "n{node}: {bad} counted: {c:?}");
    }
}

#[test]
fn nodeport_tcp_udp_and_lb_ip_reach_pods_on_both_nodes() {
    let lab = start_lab();
    for node in 0..lab.node_count() {
        let r = lab.agent_ready(node);
        // The lab's veths support native XDP: a fallback to generic is a regression.
        assert_eq!(r.mode, "native", "n{node}: {r:?}");
        // NodePort TCP + UDP and the LoadBalancer IP for both: four FRONTENDS entries.
        assert_eq!(r.frontends, 4, "n{node}: {r:?}");
    }
    let node0 = lab.node_addr(0);
    let before = counters(&lab, 0);
    // A node's conntrack holds one flow per client (address, port, protocol): a UDP query
    // from a port that queried another frontend of this node less than 30 s ago is passed
    // to the kernel (`pass_flow_collision`), where kube-proxy would carry it and this lab
    // has none. The NodePort and the LoadBalancer IP queries get disjoint source ports, so
    // this test is about reaching each frontend (the collision has its own fixture rows).
    let client_ports = |range: &str| {
        lb_tests::netns::sysctls(
            lab.topology().client_ns(),
            &[("net/ipv4/ip_local_port_range", range)],
        )
        .unwrap_or_else(|e| panic!("client ip_local_port_range {range}: {e}"))
    };
    client_ports("32768 45999");

    let tcp = tcp_flows(&lab, node0, TCP_NODE_PORT, FLOWS);
    assert_spread("TCP via n0 NodePort", &lab, &tcp);
    let udp = udp_flows(&lab, node0, UDP_NODE_PORT, FLOWS);
    assert_spread("UDP via n0 NodePort", &lab, &udp);

    client_ports("46000 60999");
    let lb_tcp = tcp_flows(&lab, LB_INGRESS_IP, TCP_SERVICE_PORT, FLOWS / 2);
    assert_spread("TCP via the LoadBalancer IP", &lab, &lb_tcp);
    let lb_udp = udp_flows(&lab, LB_INGRESS_IP, UDP_SERVICE_PORT, FLOWS / 2);
    assert_spread("UDP via the LoadBalancer IP", &lab, &lb_udp);

    // Node 1's agent serves its NodePort too.
    let node1 = lab.node_addr(1);
    let n1 = tcp_flows(&lab, node1, TCP_NODE_PORT, FLOWS / 2);
    assert_spread("TCP via n1 NodePort", &lab, &n1);

    // Node 0 handled all of it in BPF, both ways.
    let after = counters(&lab, 0);
    for reason in ["fwd_local", "fwd_remote", "rev_nat_local", "rev_nat_remote"] {
        assert!(
            counter_delta(&after, &before, reason) > 0,
            "n0 counted no {reason}: before {before:?}, after {after:?}"
        );
    }
    assert_no_errors(&lab, 0);
    assert_no_errors(&lab, 1);
}

#[test]
fn client_ip_kept_for_local_pods_and_snat_for_remote_ones() {
    let lab = start_lab();
    let client = lab.client_addr();
    for entry in 0..lab.node_count() {
        let node = lab.node_addr(entry);
        let mut answers = tcp_flows(&lab, node, TCP_NODE_PORT, FLOWS / 2);
        answers.extend(udp_flows(&lab, node, UDP_NODE_PORT, FLOWS / 4));
        let (mut local, mut remote) = (0, 0);
        for a in &answers {
            if a.pod.node == entry {
                // Redirected into the pod's veth: the pod sees the client's own socket.
                assert_eq!(
                    a.client_seen, a.local,
                    "pod {} behind n{entry} saw a different client: {a:?}",
                    a.pod
                );
                assert_eq!(a.client_seen.ip(), &client);
                local += 1;
            } else {
                // Forwarded to the owning node: SNAT to the entry node's address.
                assert_eq!(
                    a.client_seen.ip(),
                    &node,
                    "pod {} reached through n{entry} should see n{entry}'s address: {a:?}",
                    a.pod
                );
                remote += 1;
            }
        }
        eprintln!("via n{entry}: {local} local, {remote} remote flows");
        assert!(
            local > 0 && remote > 0,
            "via n{entry}: {local} local, {remote} remote"
        );
    }
}

/// Service traffic through node 0 touches netfilter on neither node: node 0 DNATs (and
/// SNATs remote deliveries) in XDP; node 1, owning the remote pods, takes node 0's
/// forwarded requests straight into the pod and sends the replies straight back (its probe
/// also counts packets from and to node 0's SNAT address).
#[test]
fn accelerated_flows_bypass_netfilter_on_the_node() {
    let lab = start_lab();
    let node0 = lab.node_addr(0);
    let probe = ok("installing the nft probe in n0", lab.install_nft_probe(0));
    let probe1 = ok("installing the nft probe in n1", lab.install_nft_probe(1));
    let zero: BTreeMap<String, u64> = NFT_HOOKS.iter().map(|h| (h.to_string(), 0)).collect();
    assert_eq!(ok("reading the nft probe", probe.read()), zero);
    assert_eq!(ok("reading the n1 nft probe", probe1.read()), zero);

    // First prove the rules count: the client talks to node 0's pods directly (routed by
    // node 0: prerouting, forward, postrouting) and to a closed port on node 0 itself
    // (input, and output for the RST). This runs before any Service flow, so no reverse-NAT
    // state exists yet for the client ports it uses. The same for node 1's pods and probe.
    for node in 0..lab.node_count() {
        for k in 0..lab.topology().pod_count(node) {
            let pod = PodId::new(node, k);
            let addr = ok("pod address", lab.pod_addr(pod));
            for a in tcp_flows(&lab, addr, TCP_TARGET_PORT, 5) {
                assert_eq!(a.pod, pod);
                assert_eq!(a.client_seen, a.local, "direct pod traffic is not NATed");
            }
        }
    }
    let live1 = ok("reading the n1 nft probe", probe1.read());
    for hook in ["prerouting", "forward", "postrouting"] {
        assert!(
            live1[hook] > 0,
            "n1's {hook} rule counted nothing: {live1:?}"
        );
    }
    match lab.connect(node0, TCP_TARGET_PORT) {
        Err(ScenarioError::Request { source, .. })
            if source.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("n0:{TCP_TARGET_PORT} should refuse connections, got {other:?}"),
    }
    let live = ok("reading the nft probe", probe.read());
    for hook in NFT_HOOKS {
        assert!(live[hook] > 0, "the {hook} rule counted nothing: {live:?}");
    }
    eprintln!("nft counters after direct traffic: {live:?}");

    // Now Service traffic through node 0: not one packet may reach netfilter there, nor on
    // node 1 for the flows node 0 forwards to it.
    let before = counters(&lab, 0);
    let before1 = counters(&lab, 1);
    let tcp = tcp_flows(&lab, node0, TCP_NODE_PORT, FLOWS / 2);
    let udp = udp_flows(&lab, node0, UDP_NODE_PORT, FLOWS / 4);
    let lb = tcp_flows(&lab, LB_INGRESS_IP, TCP_SERVICE_PORT, FLOWS / 4);
    let after_nf = ok("reading the nft probe", probe.read());
    assert_eq!(
        after_nf, live,
        "netfilter in n0 saw accelerated flows (counters before and after)"
    );
    let remote = tcp
        .iter()
        .chain(&lb)
        .chain(&udp)
        .filter(|a| a.pod.node == 1)
        .count() as u64;
    assert!(remote >= 20, "only {remote} flows went to n1's pods");
    assert_eq!(
        ok("reading the n1 nft probe", probe1.read()),
        live1,
        "netfilter in n1 saw flows node 0 forwarded (counters before and after)"
    );

    let local_tcp = tcp.iter().chain(&lb).filter(|a| a.pod.node == 0).count() as u64;
    let local_udp = udp.iter().filter(|a| a.pod.node == 0).count() as u64;
    assert!(
        local_tcp >= 20,
        "only {local_tcp} TCP flows went to n0's pods"
    );
    // Node 1 did it in BPF: every forwarded request and reply (3+2 per TCP flow, 1+1 per
    // UDP query at least).
    let remote_udp = udp.iter().filter(|a| a.pod.node == 1).count() as u64;
    let remote_tcp = remote - remote_udp;
    let after1 = counters(&lab, 1);
    let fwd_peer = counter_delta(&after1, &before1, "fwd_peer");
    let reply_peer = counter_delta(&after1, &before1, "reply_peer");
    eprintln!(
        "{remote_tcp} remote TCP + {remote_udp} remote UDP flows: n1 fwd_peer +{fwd_peer}, reply_peer +{reply_peer}"
    );
    assert!(
        fwd_peer >= 3 * remote_tcp + remote_udp,
        "fwd_peer grew by {fwd_peer}"
    );
    assert!(
        reply_peer >= 2 * remote_tcp + remote_udp,
        "reply_peer grew by {reply_peer}"
    );
    assert_no_errors(&lab, 1);

    let after = counters(&lab, 0);
    // A TCP flow sends at least SYN, ACK and the request to the pod and gets at least
    // SYN-ACK and the response back; a UDP query is one datagram each way.
    let fwd = counter_delta(&after, &before, "fwd_local");
    let rev = counter_delta(&after, &before, "rev_nat_local");
    eprintln!(
        "{local_tcp} local TCP + {local_udp} local UDP flows: fwd_local +{fwd}, rev_nat_local +{rev}"
    );
    assert!(fwd >= 3 * local_tcp + local_udp, "fwd_local grew by {fwd}");
    assert!(
        rev >= 2 * local_tcp + local_udp,
        "rev_nat_local grew by {rev}"
    );
    assert_no_errors(&lab, 0);
}

/// The answer on a long-lived connection must keep coming from the same pod, seeing the
/// same client address.
fn check_same(conn: &mut HttpConn, first: &Answer, when: &str) {
    let a = conn
        .get()
        .unwrap_or_else(|e| panic!("keep-alive connection to {} {when}: {}", first.pod, e));
    assert_eq!(
        (a.pod, a.client_seen),
        (first.pod, first.client_seen),
        "keep-alive connection moved {when}"
    );
}

/// Opens new connections through node 0 until `want` of them in a row satisfy `ok` (the
/// agent applied the new config), using the long-lived connections in between. Panics if
/// that does not happen within `deadline`. Paced: a tight loop would open thousands of
/// flows per stage and measure SNAT port capacity instead of what this test is about.
///
/// `removes_pods`: the change removes endpoints, so a new flow whose handshake went to a
/// removed pod just before the change may be reset (its backend is gone, the next packet
/// is balanced again and the new pod knows no such connection), as with kube-proxy. A few
/// such resets are tolerated then; any other failure, or any reset otherwise, is a bug.
fn until_applied(
    lab: &Lab,
    what: &str,
    want: usize,
    deadline: Duration,
    ok: impl Fn(PodId) -> bool,
    removes_pods: bool,
    keep: &mut [(HttpConn, Answer)],
) {
    const MAX_RESETS: usize = 3;
    let start = Instant::now();
    let (mut streak, mut flows, mut resets) = (0, 0, 0);
    while streak < want {
        assert!(
            start.elapsed() < deadline,
            "{what}: not applied after {deadline:?} ({flows} new flows, streak {streak})"
        );
        flows += 1;
        match lab.http_get(lab.node_addr(0), TCP_NODE_PORT) {
            Ok(a) => streak = if ok(a.pod) { streak + 1 } else { 0 },
            Err(e) if removes_pods && resets < MAX_RESETS && is_reset(&e) => {
                eprintln!("{what}: new flow {flows} reset during the change: {e}");
                resets += 1;
                streak = 0;
            }
            // Show what node 0's data plane did with it (a transient PASS is a bug).
            Err(e) => panic!(
                "{what}: new flow {flows} failed: {e}; n0 counters: {:?}",
                lab.counters(0)
            ),
        }
        for (conn, first) in keep.iter_mut() {
            check_same(conn, first, what);
        }
        std::thread::sleep(POLL);
    }
    eprintln!(
        "{what}: applied after {:?} ({flows} new flows, {resets} reset)",
        start.elapsed()
    );
}

/// A connection the peer reset (or closed) after it was established.
fn is_reset(e: &ScenarioError) -> bool {
    match e {
        ScenarioError::Request { source, .. } => matches!(
            source.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        ScenarioError::BadAnswer { detail, .. } => detail.contains("closed mid-response"),
        _ => false,
    }
}

#[test]
fn established_flows_survive_backend_changes_and_terminating_pods() {
    let mut lab = start_lab();
    let node0 = lab.node_addr(0);
    // One long-lived connection to a pod behind node 0 (local delivery), one to a pod on
    // node 1 (SNAT): both must stay put.
    let open = |want_node: usize| -> (HttpConn, Answer) {
        for _ in 0..100 {
            let mut conn = ok("connect", lab.connect(node0, TCP_NODE_PORT));
            let first = ok("first request", conn.get());
            if first.pod.node == want_node {
                return (conn, first);
            }
        }
        panic!("no connection through n0 reached a pod on n{want_node} in 100 tries");
    };
    let mut keep = vec![open(0), open(1)];
    let (local, remote) = (keep[0].1.pod, keep[1].1.pod);
    let other_local = PodId::new(0, 1 - local.pod);
    eprintln!("long-lived connections: {local} (local), {remote} (remote)");
    let deadline = lab.resync() * 4 + Duration::from_secs(10);

    // 4 -> 2 endpoints: only the two pods of the long-lived connections stay.
    let two = [EndpointSpec::ready(local), EndpointSpec::ready(remote)];
    ok("config", lab.set_endpoints(0, &two));
    // A removed pod would take half of the new flows: 40 in a row without one is 1e-12.
    let in_two = |p: PodId| p == local || p == remote;
    until_applied(&lab, "scale 4 -> 2", 40, deadline, in_two, true, &mut keep);
    for a in tcp_flows(&lab, node0, TCP_NODE_PORT, 50) {
        assert!(
            in_two(a.pod),
            "scale 4 -> 2: new flow reached removed pod {}",
            a.pod
        );
    }

    // 2 -> 3: the other local pod comes back.
    let three = [
        EndpointSpec::ready(local),
        EndpointSpec::ready(remote),
        EndpointSpec::ready(other_local),
    ];
    ok("config", lab.set_endpoints(0, &three));
    until_applied(
        &lab,
        "scale 2 -> 3",
        1,
        deadline,
        |p| p == other_local,
        false,
        &mut keep,
    );
    let answers = tcp_flows(&lab, node0, TCP_NODE_PORT, 60);
    let pods: BTreeSet<PodId> = answers.iter().map(|a| a.pod).collect();
    assert_eq!(
        pods,
        BTreeSet::from([local, remote, other_local]),
        "scale 2 -> 3"
    );

    // Both long-lived pods terminating (ready=false, serving=true, terminating=true):
    // their connections go on, new flows all go to the one ready pod.
    let terminating = [
        EndpointSpec::terminating(local),
        EndpointSpec::terminating(remote),
        EndpointSpec::ready(other_local),
    ];
    ok("config", lab.set_endpoints(0, &terminating));
    let only = |p: PodId| p == other_local;
    until_applied(&lab, "terminating", 40, deadline, only, false, &mut keep);
    for a in tcp_flows(&lab, node0, TCP_NODE_PORT, 60) {
        assert_eq!(
            a.pod, other_local,
            "terminating: new flow reached {}",
            a.pod
        );
    }
    for round in 0..20 {
        for (conn, first) in keep.iter_mut() {
            check_same(conn, first, &format!("while terminating (round {round})"));
        }
    }
    assert!(
        lab.agent_running(0),
        "the agent of n0 exited during the config changes"
    );
    assert_no_errors(&lab, 0);
}

/// A kube-proxy-like rule pair in node `node`'s netfilter: its TCP nodePort DNATed to
/// `pod_ip`'s target port, masqueraded on the way there. What the kernel does with the
/// connections lbx leaves to it.
fn kernel_nodeport_nat(lab: &Lab, node: usize, pod_ip: Ipv4Addr) {
    let ns = lab.topology().node_ns(node);
    let addr = lab.node_addr(node);
    let (port, target) = (TCP_NODE_PORT, TCP_TARGET_PORT);
    for rule in [
        format!("-t nat -A PREROUTING -p tcp -d {addr} --dport {port} -j DNAT --to-destination {pod_ip}:{target}"),
        format!("-t nat -A POSTROUTING -p tcp -d {pod_ip} --dport {target} -j MASQUERADE"),
    ] {
        let args: Vec<&str> = std::iter::once("iptables").chain(rule.split(' ')).collect();
        if let Err(e) = lb_tests::netns::run(ns, &args) {
            panic!("iptables {rule} in {ns}: {e}");
        }
    }
}

/// A connection the kernel carries (here a kube-proxy-like DNAT + masquerade rule in node
/// 0's netfilter, while lbx has no backend for the Service) keeps working when lbx takes the
/// Service over: lbx starts TCP flows only at a SYN, so the connection's next packets stay
/// with the kernel (`pass_mid_stream`) while new connections take the XDP path. Before, XDP
/// balanced the middle of that connection to a pod that knew no such connection.
#[test]
fn connections_the_kernel_carries_stay_with_it_when_lbx_takes_over() {
    let lab = start_lab();
    let node0 = lab.node_addr(0);
    let pod = PodId::new(0, 0);
    let pod_ip = ok("pod address", lab.pod_addr(pod));
    kernel_nodeport_nat(&lab, 0, pod_ip);

    // No endpoints for lbx: the SYN is the kernel's, and so is the connection.
    ok("config", lab.set_endpoints(0, &[]));
    let deadline = lab.resync() * 4 + Duration::from_secs(10);
    let start = Instant::now();
    let (mut conn, first) = loop {
        assert!(start.elapsed() < deadline, "the kernel path never answered");
        if let Ok(mut conn) = lab.connect(node0, TCP_NODE_PORT) {
            if let Ok(a) = conn.get() {
                if a.pod == pod && *a.client_seen.ip() != lab.client_addr() {
                    break (conn, a);
                }
            }
        }
        std::thread::sleep(POLL);
    };
    eprintln!("kernel connection: {first:?}");

    // lbx takes the Service back: new connections are XDP's (client address kept) ...
    let all: Vec<EndpointSpec> = lab.pods().into_iter().map(EndpointSpec::ready).collect();
    ok("config", lab.set_endpoints(0, &all));
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < deadline,
            "lbx never took the Service over"
        );
        if let Ok(a) = lab.http_get(node0, TCP_NODE_PORT) {
            if *a.client_seen.ip() == lab.client_addr() {
                break;
            }
        }
        std::thread::sleep(POLL);
    }
    let before = counters(&lab, 0);
    let fresh = tcp_flows(&lab, node0, TCP_NODE_PORT, 20);
    for a in &fresh {
        let want = if a.pod.node == 0 {
            lab.client_addr()
        } else {
            lab.snat_addr(0)
        };
        assert_eq!(
            *a.client_seen.ip(),
            want,
            "a new connection after the takeover: {a:?}"
        );
    }
    let after = counters(&lab, 0);
    let xdp =
        counter_delta(&after, &before, "fwd_local") + counter_delta(&after, &before, "fwd_remote");
    assert!(
        xdp >= 3 * 20,
        "20 new connections, {xdp} packets through XDP"
    );
    // ... and the kernel's connection goes on where it was, untouched by XDP.
    for i in 0..5 {
        check_same(
            &mut conn,
            &first,
            &format!("request {i} after lbx took over"),
        );
    }
    let after = counters(&lab, 0);
    let mid = counter_delta(&after, &before, "pass_mid_stream");
    assert!(mid >= 5, "pass_mid_stream grew by {mid}: {after:?}");
    assert_no_errors(&lab, 0);
}

/// Does any string in `v` name `addr` (alone or as `addr:port`)?
fn mentions(v: &serde_json::Value, addr: &str) -> bool {
    match v {
        serde_json::Value::String(s) => {
            s == addr
                || s.strip_prefix(addr)
                    .is_some_and(|rest| rest.starts_with(':'))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| mentions(x, addr)),
        serde_json::Value::Object(o) => o.values().any(|x| mentions(x, addr)),
        _ => false,
    }
}

/// A SYN lbx cannot SNAT (the only port of its range towards the backend is taken) is the
/// kernel's: with a kube-proxy-like DNAT + masquerade rule on the node, the connection is
/// carried by netfilter from its SYN on, and its later packets stay there
/// (`pass_snat_exhausted`, then `pass_mid_stream`), while lbx's own flow keeps its port.
#[test]
fn snat_exhausted_connections_go_through_the_kernel() {
    let lab = Lab::start(LabSpec {
        dedicated_snat: true,
        agent_args: vec!["--snat-ports".into(), "40000-40000".into()],
        ..LabSpec::default()
    })
    .unwrap_or_else(|e| panic!("starting the lab: {}", e));
    let node0 = lab.node_addr(0);
    let remote = lab
        .pods()
        .into_iter()
        .find(|p| p.node == 1)
        .expect("a pod on node 1");
    let remote_ip = ok("pod address", lab.pod_addr(remote));
    kernel_nodeport_nat(&lab, 0, remote_ip);
    let port = TCP_NODE_PORT;

    // Only the remote pod is lbx's backend: every lbx flow from node 0 is SNATed, through
    // the one port. The first connection lbx carries keeps it.
    ok(
        "config",
        lab.set_endpoints(0, &[EndpointSpec::ready(remote)]),
    );
    let deadline = lab.resync() * 4 + Duration::from_secs(10);
    let others: Vec<String> = lab
        .pods()
        .into_iter()
        .filter(|&p| p != remote)
        .map(|p| ok("pod address", lab.pod_addr(p)).to_string())
        .collect();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < deadline,
            "node 0's agent never dropped the other pods"
        );
        let targets = ok("lb-user targets", lab.targets(0));
        if mentions(&targets, &remote_ip.to_string())
            && !others.iter().any(|o| mentions(&targets, o))
        {
            break;
        }
        std::thread::sleep(POLL);
    }
    let mut held = with_counters(&lab, "lbx's connection", lab.connect(node0, port));
    let held_first = with_counters(&lab, "lbx's connection: first request", held.get());
    assert_eq!(held_first.pod, remote, "lbx's flow: {held_first:?}");
    assert_eq!(
        *held_first.client_seen.ip(),
        lab.snat_addr(0),
        "lbx's flow: {held_first:?}"
    );
    assert_eq!(
        held_first.client_seen.port(),
        40000,
        "lbx's flow: {held_first:?}"
    );

    // The next connections find the port taken: the kernel carries them, from the SYN on.
    let before = counters(&lab, 0);
    for i in 0..3 {
        let mut conn = with_counters(
            &lab,
            format!("connection {i} while the SNAT port is taken"),
            lab.connect(node0, port),
        );
        let first = with_counters(&lab, format!("connection {i}: first request"), conn.get());
        assert_eq!(first.pod, remote, "connection {i}: {first:?}");
        assert_ne!(
            *first.client_seen.ip(),
            lab.snat_addr(0),
            "connection {i} went through lbx's SNAT: {first:?}"
        );
        for r in 0..3 {
            check_same(&mut conn, &first, &format!("connection {i}, request {r}"));
        }
    }
    let after = counters(&lab, 0);
    let exhausted = counter_delta(&after, &before, "pass_snat_exhausted");
    assert_eq!(exhausted, 3, "one passed SYN per connection: {after:?}");
    let mid = counter_delta(&after, &before, "pass_mid_stream");
    assert!(
        mid >= 3 * 4,
        "the connections' later packets: pass_mid_stream grew by {mid}: {after:?}"
    );
    // lbx's own flow is untouched.
    check_same(
        &mut held,
        &held_first,
        "lbx's flow after the kernel's connections",
    );
    assert_no_errors(&lab, 0);
    assert_no_errors(&lab, 1);
}

#[test]
fn teardown_leaves_nothing_behind() {
    // Explicit shutdown: also checks the agent's SIGTERM contract (exit 0, XDP detached,
    // pins removed by the agent itself).
    let lab = start_lab();
    let fp = lab.footprint();
    ok("a request", lab.http_get(lab.node_addr(0), TCP_NODE_PORT));
    for dir in &fp.pin_dirs {
        assert!(
            dir.is_dir(),
            "the agent did not pin under {}",
            dir.display()
        );
    }
    assert!(
        !fp.leftovers().is_empty(),
        "a running lab must show in its footprint"
    );
    ok("shutdown", lab.shutdown());
    assert_eq!(fp.leftovers(), Vec::<String>::new(), "after shutdown");

    // Plain drop, as when a test panics.
    let lab = start_lab();
    let fp = lab.footprint();
    ok("a request", lab.http_get(lab.node_addr(0), TCP_NODE_PORT));
    drop(lab);
    assert_eq!(fp.leftovers(), Vec::<String>::new(), "after drop");
}
