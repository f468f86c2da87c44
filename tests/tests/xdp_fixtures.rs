//! BPF_PROG_TEST_RUN fixture tables through the real object (Katran style): one row per
//! behaviour, with the input packet, the expected verdict, the expected reason counter and
//! the expected output bytes. Expected packets are built from scratch by the test packet
//! builder, whose checksums are an implementation independent of lb_common::csum, and every
//! forwarded packet's checksums are verified again by `verify_checksums`.
//!
//! Needs root (BPF). `cargo xtask test` runs it as root; elsewhere it fails loudly.

use std::net::Ipv4Addr;

use lb_common::{
    hash::{flow_hash, tunnel_entropy},
    port_be, AffinityEntry, AffinityKey, Reason, BE_TERMINATING, PROTO_TCP, PROTO_UDP,
};
use lb_tests::{
    fixture::*,
    packet::{datagram, hexdiff, icmp_message, verify_checksums, Packet},
};
use lb_user::bpf::{dataplane::Dataplane, sandbox::Hook};
use lb_user::inspect::explain::explain;

/// Which program a step runs through.
#[derive(Clone, Copy, Debug)]
enum Prog {
    Xdp,
    Tc,
}

struct Row {
    description: &'static str,
    /// Packets sent through XDP first (to create flow state); their verdicts are not checked.
    before: Vec<Vec<u8>>,
    prog: Prog,
    input: Vec<u8>,
    expect_verdict: u32,
    expect_reason: Reason,
    /// None: the packet must come out unchanged.
    expect: Option<Vec<u8>>,
}

fn require_root() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "BPF_PROG_TEST_RUN fixtures need root (CAP_BPF): run `sudo cargo xtask test`"
    );
}

fn client() -> Packet {
    Packet::eth(CLIENT_MAC, NIC_MAC)
}

fn tcp_syn(dst: Ipv4Addr, dport: u16) -> Packet {
    client().ipv4(CLIENT, dst).tcp(40000, dport).syn()
}

fn stat(dp: &Dataplane, reason: Reason) -> u64 {
    dp.stats()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, n)| n)
        .unwrap()
}

fn total(dp: &Dataplane) -> u64 {
    dp.stats().unwrap().iter().map(|(_, n)| n).sum()
}

/// The SNAT port the program must pick for a flow (first probe, as the table is empty).
fn expected_snat_port(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> u16 {
    let h = flow_hash(
        &addr(src),
        &addr(dst),
        port_be(sport),
        port_be(dport),
        proto,
    );
    SNAT_PORT_MIN + (h % (SNAT_PORT_MAX - SNAT_PORT_MIN + 1) as u32) as u16
}

fn rows() -> Vec<Row> {
    let snat_port = expected_snat_port(CLIENT, 40000, NODE, 30081, PROTO_TCP);
    let remote_request = tcp_syn(NODE, 30081);
    let local_request = tcp_syn(NODE, 30080).payload(b"GET / HTTP/1.1\r\n\r\n");
    let udp_request = client()
        .ipv4(CLIENT, NODE)
        .udp(40001, 30080)
        .payload(b"ping");
    let base = tcp_syn(NODE, 30080);
    // As node 1's XDP program sends them: from its SNAT address and MAC to a pod of ours.
    let peer_request = Packet::eth(NODE1_MAC, NIC_MAC)
        .ipv4(PEER_SNAT, POD_A)
        .ttl(63)
        .tcp(61234, 8080)
        .syn();
    let peer_udp = Packet::eth(NODE1_MAC, NIC_MAC)
        .ipv4(PEER_SNAT, POD_B)
        .ttl(63)
        .udp(61235, 5353)
        .payload(b"ping");
    vec![
        Row {
            description: "tcp syn to nodeport, local backend: DNAT + redirect into the pod veth",
            before: vec![],
            prog: Prog::Xdp,
            input: base.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(base.clone().macs(VETH_A_MAC, POD_A_MAC).ip_dst(POD_A).ttl(63).dport(8080).build()),
        },
        Row {
            description: "tcp ack with payload after the syn: same DNAT, payload untouched",
            before: vec![tcp_syn(NODE, 30080).sport(40002).build()],
            prog: Prog::Xdp,
            input: client().ipv4(CLIENT, NODE).tcp(40002, 30080).ack().payload(b"hello world").build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(
                Packet::eth(VETH_A_MAC, POD_A_MAC).ipv4(CLIENT, POD_A).ttl(63).tcp(40002, 8080).ack().payload(b"hello world").build(),
            ),
        },
        Row {
            description: "tcp ack, no flow: a connection the kernel carries, passed unchanged",
            before: vec![],
            prog: Prog::Xdp,
            input: client().ipv4(CLIENT, NODE).tcp(40003, 30080).ack().payload(b"hello world").build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassMidStream,
            expect: None,
        },
        Row {
            description: "tcp syn+ack to a frontend, no flow: not an opening, passed unchanged",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(NODE, 30080).sport(40004).ack().build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassMidStream,
            expect: None,
        },
        Row {
            description: "tcp fin, no flow: passed unchanged",
            before: vec![],
            prog: Prog::Xdp,
            input: client().ipv4(CLIENT, NODE).tcp(40005, 30081).fin().ack().build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassMidStream,
            expect: None,
        },
        Row {
            description: "udp to the same nodeport is a different frontend (POD_B:5353)",
            before: vec![],
            prog: Prog::Xdp,
            input: udp_request.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(udp_request.clone().macs(VETH_B_MAC, POD_B_MAC).ip_dst(POD_B).ttl(63).dport(5353).build()),
        },
        Row {
            description: "udp without checksum keeps checksum zero",
            before: vec![],
            prog: Prog::Xdp,
            input: udp_request.clone().udp_checksum_zero().build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(
                udp_request.clone().udp_checksum_zero().macs(VETH_B_MAC, POD_B_MAC).ip_dst(POD_B).ttl(63).dport(5353).build(),
            ),
        },
        Row {
            description: "802.1Q tagged syn: DNAT behind the tag, tag kept",
            before: vec![],
            prog: Prog::Xdp,
            input: base.clone().vlan(42).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(base.clone().vlan(42).macs(VETH_A_MAC, POD_A_MAC).ip_dst(POD_A).ttl(63).dport(8080).build()),
        },
        Row {
            description: "nodeport on the node's second address",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(NODE_ALT, 30080).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(tcp_syn(NODE_ALT, 30080).macs(VETH_A_MAC, POD_A_MAC).ip_dst(POD_A).ttl(63).dport(8080).build()),
        },
        Row {
            description: "LoadBalancer ingress IP exact match",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(LB_IP, 80).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(tcp_syn(LB_IP, 80).macs(VETH_A_MAC, POD_A_MAC).ip_dst(POD_A).ttl(63).dport(8080).build()),
        },
        Row {
            description: "externalIP exact match",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(EXT_IP, 443).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(tcp_syn(EXT_IP, 443).macs(VETH_B_MAC, POD_B_MAC).ip_dst(POD_B).ttl(63).dport(8443).build()),
        },
        Row {
            description: "LB port on a node address is not a nodeport: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(NODE, 80).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNonService,
            expect: None,
        },
        Row {
            description: "nodeport number on a foreign address: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(Ipv4Addr::new(10, 77, 0, 99), 30080).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNonService,
            expect: None,
        },
        Row {
            description: "traffic to a pod IP (ip mode) is not ours: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(POD_A, 8080).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNonService,
            expect: None,
        },
        Row {
            description: "remote backend: SNAT to the node address, DNAT, redirected out of the NIC to node 1",
            before: vec![],
            prog: Prog::Xdp,
            input: remote_request.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdRemote,
            expect: Some(
                remote_request.clone().macs(NIC_MAC, NODE1_MAC).ip_src(NODE).ip_dst(POD_R).ttl(63).sport(snat_port).dport(8080).build(),
            ),
        },
        Row {
            description: "reply to a SNATed flow: back to the client from the frontend, out of the NIC",
            before: vec![remote_request.build()],
            prog: Prog::Xdp,
            input: Packet::eth(NODE1_MAC, NIC_MAC).ipv4(POD_R, NODE).ttl(63).tcp(8080, snat_port).syn().ack().build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::RevNatRemote,
            expect: Some(Packet::eth(NIC_MAC, CLIENT_MAC).ipv4(NODE, CLIENT).ttl(62).tcp(30081, 40000).syn().ack().build()),
        },
        Row {
            description: "reply to a SNAT port with no flow: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: Packet::eth(NODE1_MAC, NIC_MAC).ipv4(POD_R, NODE).tcp(8080, snat_port).syn().ack().build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNonService,
            expect: None,
        },
        Row {
            description: "TC: local pod's reply is reverse-NATed to the frontend and sent out of the NIC",
            before: vec![local_request.build()],
            prog: Prog::Tc,
            input: Packet::eth(POD_A_MAC, VETH_A_MAC).ipv4(POD_A, CLIENT).tcp(8080, 40000).syn().ack().payload(b"HTTP/1.1 200 OK").build(),
            expect_verdict: TC_ACT_REDIRECT,
            expect_reason: Reason::RevNatLocal,
            expect: Some(
                Packet::eth(NIC_MAC, CLIENT_MAC).ipv4(NODE, CLIENT).ttl(63).tcp(30080, 40000).syn().ack().payload(b"HTTP/1.1 200 OK").build(),
            ),
        },
        Row {
            description: "TC: udp reply reverse-NATed",
            before: vec![udp_request.build()],
            prog: Prog::Tc,
            input: Packet::eth(POD_B_MAC, VETH_B_MAC).ipv4(POD_B, CLIENT).udp(5353, 40001).payload(b"pong").build(),
            expect_verdict: TC_ACT_REDIRECT,
            expect_reason: Reason::RevNatLocal,
            expect: Some(Packet::eth(NIC_MAC, CLIENT_MAC).ipv4(NODE, CLIENT).ttl(63).udp(30080, 40001).payload(b"pong").build()),
        },
        Row {
            description: "TC: pod traffic that is not a reply to an accelerated flow: passed",
            before: vec![],
            prog: Prog::Tc,
            input: Packet::eth(POD_A_MAC, VETH_A_MAC).ipv4(POD_A, CLIENT).tcp(8080, 40000).syn().ack().build(),
            expect_verdict: TC_ACT_OK,
            expect_reason: Reason::PassNotReply,
            expect: None,
        },
        Row {
            description: "TC: reply with TTL 1 left to the kernel",
            before: vec![local_request.build()],
            prog: Prog::Tc,
            input: Packet::eth(POD_A_MAC, VETH_A_MAC).ipv4(POD_A, CLIENT).ttl(1).tcp(8080, 40000).ack().build(),
            expect_verdict: TC_ACT_OK,
            expect_reason: Reason::PassTtl,
            expect: None,
        },
        // A peer node's remote delivery to one of our pods: no NAT here, MACs and TTL only.
        Row {
            description: "peer's SNATed request to a local pod: redirected into the pod veth, addresses kept",
            before: vec![],
            prog: Prog::Xdp,
            input: peer_request.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdPeer,
            expect: Some(peer_request.clone().macs(VETH_A_MAC, POD_A_MAC).ttl(62).build()),
        },
        Row {
            description: "peer's SNATed udp request to a local pod: redirected into its veth",
            before: vec![],
            prog: Prog::Xdp,
            input: peer_udp.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdPeer,
            expect: Some(peer_udp.clone().macs(VETH_B_MAC, POD_B_MAC).ttl(62).build()),
        },
        Row {
            description: "peer's packet to an address that is no local endpoint: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: Packet::eth(NODE1_MAC, NIC_MAC).ipv4(PEER_SNAT, Ipv4Addr::new(10, 77, 1, 99)).tcp(61234, 8080).syn().build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNonService,
            expect: None,
        },
        Row {
            description: "a non-peer source to a local pod (a node lbx does not know): passed",
            before: vec![],
            prog: Prog::Xdp,
            input: Packet::eth(NODE1_MAC, NIC_MAC).ipv4(Ipv4Addr::new(10, 77, 0, 12), POD_A).tcp(61234, 8080).syn().build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNonService,
            expect: None,
        },
        Row {
            description: "peer's request with TTL 1: passed so the kernel sends time-exceeded",
            before: vec![],
            prog: Prog::Xdp,
            input: peer_request.clone().ttl(1).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTtl,
            expect: None,
        },
        Row {
            description: "TC: pod's reply to a peer's SNAT address: MACs learned from the request, TTL-1, out of the NIC",
            before: vec![peer_request.build()],
            prog: Prog::Tc,
            input: Packet::eth(POD_A_MAC, VETH_A_MAC).ipv4(POD_A, PEER_SNAT).tcp(8080, 61234).syn().ack().payload(b"HTTP/1.1 200 OK").build(),
            expect_verdict: TC_ACT_REDIRECT,
            expect_reason: Reason::ReplyPeer,
            expect: Some(
                Packet::eth(NIC_MAC, NODE1_MAC).ipv4(POD_A, PEER_SNAT).ttl(63).tcp(8080, 61234).syn().ack().payload(b"HTTP/1.1 200 OK").build(),
            ),
        },
        Row {
            description: "TC: pod's udp reply to a peer's SNAT address: out of the NIC",
            before: vec![peer_udp.build()],
            prog: Prog::Tc,
            input: Packet::eth(POD_B_MAC, VETH_B_MAC).ipv4(POD_B, PEER_SNAT).udp(5353, 61235).payload(b"pong").build(),
            expect_verdict: TC_ACT_REDIRECT,
            expect_reason: Reason::ReplyPeer,
            expect: Some(Packet::eth(NIC_MAC, NODE1_MAC).ipv4(POD_B, PEER_SNAT).ttl(63).udp(5353, 61235).payload(b"pong").build()),
        },
        Row {
            description: "TC: reply to a peer no request came from yet: passed (the kernel routes it)",
            before: vec![],
            prog: Prog::Tc,
            input: Packet::eth(POD_A_MAC, VETH_A_MAC).ipv4(POD_A, PEER_SNAT).tcp(8080, 61234).syn().ack().build(),
            expect_verdict: TC_ACT_OK,
            expect_reason: Reason::PassNotReply,
            expect: None,
        },
        Row {
            description: "TC: reply to a peer with TTL 1: left to the kernel",
            before: vec![peer_request.build()],
            prog: Prog::Tc,
            input: Packet::eth(POD_A_MAC, VETH_A_MAC).ipv4(POD_A, PEER_SNAT).ttl(1).tcp(8080, 61234).ack().build(),
            expect_verdict: TC_ACT_OK,
            expect_reason: Reason::PassTtl,
            expect: None,
        },
        Row {
            description: "service with no endpoints: passed (the kernel rejects as kube-proxy would)",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(NODE, 30082).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNoBackend,
            expect: None,
        },
        Row {
            description: "TTL 1 to a service: passed so the kernel sends time-exceeded",
            before: vec![],
            prog: Prog::Xdp,
            input: base.clone().ttl(1).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTtl,
            expect: None,
        },
        Row {
            description: "TTL 0 to a service: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: base.clone().ttl(0).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTtl,
            expect: None,
        },
        Row {
            description: "ethernet padding after a short datagram is kept and ignored",
            before: vec![],
            prog: Prog::Xdp,
            input: pad(base.build(), 6),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(pad(base.clone().macs(VETH_A_MAC, POD_A_MAC).ip_dst(POD_A).ttl(63).dport(8080).build(), 6)),
        },
        // Malformed and unsupported input: always a defined pass with its own counter.
        malformed("802.1Q tag cut short", base.clone().vlan(7).truncate_to(16), Reason::PassTruncVlan),
        malformed("ARP", client().ethertype(0x0806).payload(&[0; 28]).build(), Reason::PassNotIpv4),
        malformed("IPv6 ethertype", client().ethertype(0x86dd).payload(&[0x60; 40]).build(), Reason::PassNotIpv4),
        malformed("ARP behind a VLAN tag", client().vlan(7).ethertype(0x0806).payload(&[0; 28]).build(), Reason::PassNotIpv4),
        malformed("IPv4 header cut short", base.truncate_to(14 + 12), Reason::PassTruncIp),
        malformed("IPv4 options (IHL 6)", base.clone().ip_options(&[1, 1, 1, 1]).build(), Reason::PassIpOptions),
        malformed("IHL below 5", base.clone().ihl(4).build(), Reason::PassIpOptions),
        malformed("IP version 6 inside an IPv4 ethertype", version(base.build(), 6), Reason::PassIpOptions),
        malformed("total length beyond the frame", base.clone().tot_len(200).build(), Reason::PassBadLen),
        malformed("total length below the IPv4 header", base.clone().tot_len(12).build(), Reason::PassBadLen),
        malformed("first fragment (MF set)", base.clone().frag(true, 0).build(), Reason::PassFragment),
        malformed("later fragment (offset)", base.clone().frag(false, 10).build(), Reason::PassFragment),
        malformed("ICMP to the node", client().ipv4(CLIENT, NODE).ip_proto(1).payload(&[8, 0, 0, 0, 0, 0, 0, 0]).build(), Reason::PassUnknownProto),
        malformed("SCTP to a nodeport", client().ipv4(CLIENT, NODE).ip_proto(132).payload(&[0x75, 0x30, 0x75, 0x60, 0, 0, 0, 0, 0, 0, 0, 0]).build(), Reason::PassUnknownProto),
        malformed("TCP header cut short", base.truncate_to(14 + 20 + 10), Reason::PassTruncL4),
        malformed("UDP header cut short", udp_request.truncate_to(14 + 20 + 4), Reason::PassTruncL4),
        malformed(
            "TCP header beyond the IP total length (frame padded)",
            pad(set_tot_len(base.build(), 20 + 8), 0),
            Reason::PassTruncL4,
        ),
    ]
    .into_iter()
    .chain(tunnel_rows())
    .chain(icmp_rows())
    .collect()
}

/// The MSS option first (where every common stack puts it).
const MSS_1460: [u8; 4] = [2, 4, 0x05, 0xb4];

fn mss(v: u16) -> [u8; 4] {
    let b = v.to_be_bytes();
    [2, 4, b[0], b[1]]
}

/// The entropy the program puts in a flow's outer headers ([`tunnel_entropy`] of the
/// packet as it arrived).
fn entropy(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> u16 {
    tunnel_entropy(addr(src)[0], addr(dst)[0], port_be(sport), port_be(dport))
}

/// The ICMP error (`ty`, `code`, `rest`) this node (NODE) sends back to the client about
/// `request` (a frame the client sent): RFC 792's minimal quote, the kernel's TOS for errors.
fn error_to_client(ty: u8, code: u8, rest: u32, request: &[u8]) -> Vec<u8> {
    Packet::eth(NIC_MAC, CLIENT_MAC)
        .ipv4(NODE, CLIENT)
        .tos(0xc0)
        .ip_id(0)
        .dont_fragment(false)
        .ip_proto(lb_tests::packet::IPPROTO_ICMP)
        .payload(&icmp_message(ty, code, rest, &datagram(request)[..28]))
        .build()
}

/// `inner` (a frame) IP-in-IP encapsulated from `from` to `to`, as lbx writes it: outer ID
/// the entropy (as stored, little-endian on this machine), DF, TTL 64, the inner TOS.
fn ipip(
    macs: ([u8; 6], [u8; 6]),
    from: Ipv4Addr,
    to: Ipv4Addr,
    id: u16,
    inner: &Packet,
) -> Vec<u8> {
    Packet::eth(macs.0, macs.1)
        .ipv4(from, to)
        .ip_proto(lb_tests::packet::IPPROTO_IPIP)
        .ip_id(id.swap_bytes())
        .payload(&datagram(&inner.build()))
        .build()
}

/// `inner` FOU encapsulated: outer ID 0, UDP from an ephemeral port of the entropy to the
/// tunnel port, no UDP checksum.
fn fou(
    macs: ([u8; 6], [u8; 6]),
    from: Ipv4Addr,
    to: Ipv4Addr,
    entropy: u16,
    inner: &Packet,
) -> Vec<u8> {
    Packet::eth(macs.0, macs.1)
        .ipv4(from, to)
        .ip_id(0)
        .udp(0xc000 | entropy, TUNNEL_PORT)
        .udp_checksum_zero()
        .payload(&datagram(&inner.build()))
        .build()
}

/// Tunnel delivery (IP-in-IP, the world's default): the holding node's encapsulation of
/// requests and decapsulation of replies, the owning node's decapsulation of requests and
/// encapsulation of the pod's replies, MSS clamping, fragmentation-needed, and every input
/// the tunnel paths refuse.
fn tunnel_rows() -> Vec<Row> {
    let to_node1 = (NIC_MAC, NODE1_MAC);
    let from_node1 = (NODE1_MAC, NIC_MAC);
    let syn = tcp_syn(NODE, 30083).tcp_options(&MSS_1460);
    let e_syn = entropy(CLIENT, 40000, NODE, 30083);
    let dnat = |p: Packet| p.ip_dst(POD_T).dport(8080).ttl(63);
    let mss_ipip = TUNNEL_MTU - 20 - 40;
    // On node 1's side: what node 0 tunnelled to our pod POD_A (node 1 is "this" node here).
    let req_for_a = client()
        .ipv4(CLIENT, POD_A)
        .ttl(63)
        .tcp(40000, 8080)
        .syn()
        .tcp_options(&MSS_1460);
    let tunnelled_req = ipip(from_node1, NODE1, NODE, 0x1111, &req_for_a);
    let pod_reply = Packet::eth(POD_A_MAC, VETH_A_MAC)
        .ipv4(POD_A, CLIENT)
        .tcp(8080, 40000)
        .syn()
        .ack()
        .tcp_options(&MSS_1460);
    let e_reply = entropy(POD_A, 8080, CLIENT, 40000);
    // A reply node 1 tunnels back for a flow we hold (its request was `syn`).
    let remote_reply = client()
        .ipv4(POD_T, CLIENT)
        .ttl(63)
        .tcp(8080, 40000)
        .syn()
        .ack();
    let big = client()
        .ipv4(CLIENT, NODE)
        .tcp(40000, 30083)
        .ack()
        .payload(&[0x5a; 1470]);
    vec![
        Row {
            description: "tunnel: syn for a pod on node 1: DNAT (client address kept), MSS clamped, IP-in-IP to node 1",
            before: vec![],
            prog: Prog::Xdp,
            input: syn.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(ipip(to_node1, NODE, NODE1, e_syn, &dnat(syn.clone()).tcp_options(&mss(mss_ipip)))),
        },
        Row {
            description: "tunnel: established ack with payload: one lookup, same encapsulation, payload untouched",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: client().ipv4(CLIENT, NODE).tcp(40000, 30083).ack().payload(b"hello").build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(ipip(to_node1, NODE, NODE1, e_syn, &dnat(client().ipv4(CLIENT, NODE).tcp(40000, 30083).ack().payload(b"hello")))),
        },
        Row {
            description: "tunnel: udp to a nodeport whose pod is on node 1: IP-in-IP, TOS copied to the outer header",
            before: vec![],
            prog: Prog::Xdp,
            input: client().ipv4(CLIENT, NODE).tos(0x28).udp(40001, 30083).payload(b"ping").build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(
                Packet::eth(NIC_MAC, NODE1_MAC)
                    .ipv4(NODE, NODE1)
                    .tos(0x28)
                    .ip_proto(lb_tests::packet::IPPROTO_IPIP)
                    .ip_id(entropy(CLIENT, 40001, NODE, 30083).swap_bytes())
                    .payload(&datagram(&client().ipv4(CLIENT, POD_T).tos(0x28).ttl(63).udp(40001, 5353).payload(b"ping").build()))
                    .build(),
            ),
        },
        Row {
            description: "tunnel: syn without an MSS option is encapsulated unchanged (the stack's default MSS is 536)",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(NODE, 30083).sport(40010).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(ipip(to_node1, NODE, NODE1, entropy(CLIENT, 40010, NODE, 30083), &dnat(tcp_syn(NODE, 30083).sport(40010)))),
        },
        Row {
            description: "tunnel: syn whose MSS already fits keeps it",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(NODE, 30083).sport(40011).tcp_options(&mss(1200)).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(ipip(to_node1, NODE, NODE1, entropy(CLIENT, 40011, NODE, 30083), &dnat(tcp_syn(NODE, 30083).sport(40011).tcp_options(&mss(1200))))),
        },
        Row {
            description: "tunnel: syn with the MSS after other options keeps it (only a first MSS option is clamped)",
            before: vec![],
            prog: Prog::Xdp,
            input: tcp_syn(NODE, 30083).sport(40012).tcp_options(&[1, 1, 2, 4, 0x05, 0xb4]).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(ipip(to_node1, NODE, NODE1, entropy(CLIENT, 40012, NODE, 30083), &dnat(tcp_syn(NODE, 30083).sport(40012).tcp_options(&[1, 1, 2, 4, 0x05, 0xb4])))),
        },
        Row {
            description: "tunnel: a request too big for the tunnel with DF: ICMP fragmentation-needed (MTU 1480) from the frontend, back out",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: big.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::IcmpTooBig,
            expect: Some(error_to_client(3, 4, u32::from(TUNNEL_MTU - 20), &big.build())),
        },
        Row {
            description: "tunnel: a syn with TTL 2 (it would run out on node 1): ICMP time-exceeded from this node, quoting the syn as sent, back out",
            before: vec![],
            prog: Prog::Xdp,
            input: syn.clone().sport(40020).ttl(2).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::IcmpTimeExceeded,
            expect: Some(error_to_client(11, 0, 0, &syn.clone().sport(40020).ttl(2).build())),
        },
        Row {
            description: "tunnel: an established flow's ack with TTL 2: time-exceeded too; with TTL 3 it is tunnelled (inner TTL 2, delivered by node 1)",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: client().ipv4(CLIENT, NODE).ttl(2).tcp(40000, 30083).ack().payload(b"hop").build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::IcmpTimeExceeded,
            expect: Some(error_to_client(11, 0, 0, &client().ipv4(CLIENT, NODE).ttl(2).tcp(40000, 30083).ack().payload(b"hop").build())),
        },
        Row {
            description: "tunnel: an established flow's ack with TTL 3: tunnelled, inner TTL 2",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: client().ipv4(CLIENT, NODE).ttl(3).tcp(40000, 30083).ack().build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(ipip(to_node1, NODE, NODE1, e_syn, &client().ipv4(CLIENT, POD_T).ttl(2).tcp(40000, 8080).ack())),
        },
        Row {
            description: "tunnel: a request too big without DF: the kernel's (lbx does not fragment)",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: big.clone().dont_fragment(false).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTooBig,
            expect: None,
        },
        Row {
            description: "tunnel: a peer's IP-in-IP request for our pod: decapsulated into the pod's veth (TTL -1)",
            before: vec![],
            prog: Prog::Xdp,
            input: tunnelled_req.clone(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::TunnelIn,
            expect: Some(req_for_a.clone().macs(VETH_A_MAC, POD_A_MAC).ttl(62).build()),
        },
        Row {
            description: "tunnel: our pod's syn-ack to a tunnelled flow: MSS clamped, IP-in-IP back to the holding node",
            before: vec![tunnelled_req.clone()],
            prog: Prog::Tc,
            input: pod_reply.build(),
            expect_verdict: TC_ACT_REDIRECT,
            expect_reason: Reason::TunnelReply,
            expect: Some(ipip(to_node1, NODE, NODE1, e_reply, &pod_reply.clone().macs(NIC_MAC, NODE1_MAC).ttl(63).tcp_options(&mss(mss_ipip)))),
        },
        Row {
            description: "tunnel: a reply of a flow we hold, tunnelled back by node 1: decapsulated, reverse-NATed to the client",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: ipip(from_node1, NODE1, NODE, 0x2222, &remote_reply),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::RevNatTunnel,
            expect: Some(remote_reply.clone().macs(NIC_MAC, CLIENT_MAC).ip_src(NODE).sport(30083).ttl(62).build()),
        },
        Row {
            description: "tunnel: a tunnelled reply of no flow we hold: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: ipip(from_node1, NODE1, NODE, 0x2222, &remote_reply),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelInner,
            expect: None,
        },
        Row {
            description: "tunnel: IP-in-IP from an address that is no peer: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: ipip(from_node1, Ipv4Addr::new(10, 77, 0, 12), NODE, 0x1111, &req_for_a),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelPeer,
            expect: None,
        },
        Row {
            description: "tunnel: IP-in-IP whose inner header is cut short: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: Packet::eth(NODE1_MAC, NIC_MAC).ipv4(NODE1, NODE).ip_proto(lb_tests::packet::IPPROTO_IPIP).payload(&datagram(&req_for_a.build())[..16]).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelInner,
            expect: None,
        },
        Row {
            description: "tunnel: IP-in-IP whose inner datagram has IP options: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: ipip(from_node1, NODE1, NODE, 0x1111, &req_for_a.clone().ip_options(&[1, 1, 1, 1])),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelInner,
            expect: None,
        },
        Row {
            description: "tunnel: IP-in-IP whose inner datagram is a fragment: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: ipip(from_node1, NODE1, NODE, 0x1111, &req_for_a.clone().frag(true, 0)),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelInner,
            expect: None,
        },
        Row {
            description: "tunnel: IP-in-IP whose outer length disagrees with the inner one: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: pad(set_tot_len(tunnelled_req.clone(), (tunnelled_req.len() - 14 + 4) as u16), 4),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelInner,
            expect: None,
        },
        Row {
            description: "tunnel: IP-in-IP with inner TTL 1: passed so the kernel answers",
            before: vec![],
            prog: Prog::Xdp,
            input: ipip(from_node1, NODE1, NODE, 0x1111, &req_for_a.clone().ttl(1)),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTtl,
            expect: None,
        },
        Row {
            description: "flow collision: the client's tuple has a live flow to another frontend: the kernel's",
            before: vec![tcp_syn(NODE, 30080).build()],
            prog: Prog::Xdp,
            input: tcp_syn(LB_IP, 80).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassFlowCollision,
            expect: None,
        },
        Row {
            description: "flow collision: after the old flow's RST, the tuple's new flow takes the entry over",
            before: vec![tcp_syn(NODE, 30080).build(), client().ipv4(CLIENT, NODE).tcp(40000, 30080).rst().build()],
            prog: Prog::Xdp,
            input: tcp_syn(LB_IP, 80).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdLocal,
            expect: Some(tcp_syn(LB_IP, 80).macs(VETH_A_MAC, POD_A_MAC).ip_dst(POD_A).ttl(63).dport(8080).build()),
        },
    ]
}

/// ICMP errors of NATed flows, translated like the flow's other packets.
fn icmp_rows() -> Vec<Row> {
    let router = Ipv4Addr::new(10, 77, 0, 1);
    let udp_req = client()
        .ipv4(CLIENT, NODE)
        .udp(40001, 30080)
        .payload(b"ping");
    let as_pod_got = udp_req.clone().ip_dst(POD_B).dport(5353).ttl(63);
    let icmp = |from: Ipv4Addr, to: Ipv4Addr, ty: u8, code: u8, rest: u32, quote: &[u8]| {
        Packet::eth(ROUTER_MAC, NIC_MAC)
            .ipv4(from, to)
            .ip_proto(lb_tests::packet::IPPROTO_ICMP)
            .payload(&icmp_message(ty, code, rest, quote))
    };
    // A reply of a local flow (NODE:30080 -> CLIENT:40000) as it left, quoted by a router.
    let reply_sent = Packet::eth(NIC_MAC, CLIENT_MAC)
        .ipv4(NODE, CLIENT)
        .ttl(63)
        .tcp(30080, 40000)
        .syn()
        .ack()
        .payload(&[7; 40]);
    let reply_pod = reply_sent.clone().ip_src(POD_A).sport(8080).ttl(64);
    let tunnel_reply_sent = Packet::eth(NIC_MAC, CLIENT_MAC)
        .ipv4(NODE, CLIENT)
        .ttl(62)
        .tcp(30083, 40000)
        .syn()
        .ack();
    let tunnel_reply_pod = tunnel_reply_sent.clone().ip_src(POD_T).sport(8080).ttl(64);
    let e_icmp = (port_be(30083) as u32 ^ addr(CLIENT)[0]) as u16;
    vec![
        Row {
            description: "icmp: a local pod's port-unreachable about a udp flow: from the frontend, quoting the client's request",
            before: vec![udp_req.build()],
            prog: Prog::Tc,
            input: Packet::eth(POD_B_MAC, VETH_B_MAC)
                .ipv4(POD_B, CLIENT)
                .ip_proto(lb_tests::packet::IPPROTO_ICMP)
                .payload(&icmp_message(3, 3, 0, &datagram(&as_pod_got.build())))
                .build(),
            expect_verdict: TC_ACT_REDIRECT,
            expect_reason: Reason::IcmpRevNat,
            expect: Some(
                Packet::eth(NIC_MAC, CLIENT_MAC)
                    .ipv4(NODE, CLIENT)
                    .ttl(63)
                    .ip_proto(lb_tests::packet::IPPROTO_ICMP)
                    .payload(&icmp_message(3, 3, 0, &datagram(&udp_req.clone().ttl(63).build())))
                    .build(),
            ),
        },
        Row {
            description: "icmp: fragmentation-needed about a local flow's reply: to the pod, quoting its own reply",
            before: vec![tcp_syn(NODE, 30080).build()],
            prog: Prog::Xdp,
            input: icmp(router, NODE, 3, 4, 1400, &datagram(&reply_sent.build())).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::IcmpToBackend,
            expect: Some(
                icmp(router, POD_A, 3, 4, 1400, &datagram(&reply_pod.clone().ttl(63).build()))
                    .macs(VETH_A_MAC, POD_A_MAC)
                    .ttl(63)
                    .build(),
            ),
        },
        Row {
            description: "icmp: time-exceeded about a tunnelled flow's reply: to the pod on node 1, through the tunnel",
            before: vec![tcp_syn(NODE, 30083).build()],
            prog: Prog::Xdp,
            input: icmp(router, NODE, 11, 0, 0, &datagram(&tunnel_reply_sent.build())[..28]).build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::IcmpToBackend,
            expect: Some(ipip(
                (NIC_MAC, NODE1_MAC),
                NODE,
                NODE1,
                e_icmp,
                &icmp(router, POD_T, 11, 0, 0, &datagram(&tunnel_reply_pod.clone().ttl(62).build())[..28]).ttl(63),
            )),
        },
        Row {
            description: "icmp: an error quoting no flow of ours: the kernel's",
            before: vec![],
            prog: Prog::Xdp,
            input: icmp(router, NODE, 3, 4, 1400, &datagram(&reply_sent.build())).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassNonService,
            expect: None,
        },
        Row {
            description: "icmp: an error whose quote is cut short: passed",
            before: vec![tcp_syn(NODE, 30080).build()],
            prog: Prog::Xdp,
            input: icmp(router, NODE, 3, 4, 1400, &datagram(&reply_sent.build())[..24]).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTruncL4,
            expect: None,
        },
    ]
}

fn malformed(description: &'static str, input: Vec<u8>, reason: Reason) -> Row {
    Row {
        description,
        before: vec![],
        prog: Prog::Xdp,
        input,
        expect_verdict: XDP_PASS,
        expect_reason: reason,
        expect: None,
    }
}

/// Appends Ethernet trailer bytes (padding beyond the IP total length).
fn pad(mut frame: Vec<u8>, n: usize) -> Vec<u8> {
    frame.extend(std::iter::repeat_n(0xee, n));
    frame
}

/// Overwrites the IPv4 version nibble (no VLAN).
fn version(mut frame: Vec<u8>, v: u8) -> Vec<u8> {
    frame[14] = (v << 4) | (frame[14] & 0x0f);
    frame
}

/// Overwrites the IPv4 total length (no VLAN), leaving the rest of the frame as trailer.
fn set_tot_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    frame[16..18].copy_from_slice(&len.to_be_bytes());
    frame
}

fn run(dp: &mut Dataplane, prog: Prog, packet: &[u8]) -> (u32, Vec<u8>) {
    match prog {
        Prog::Xdp => dp.test_run_xdp(packet).unwrap(),
        Prog::Tc => dp.test_run_tc(packet).unwrap(),
    }
}

#[test]
fn fixture_table() {
    check_rows(rows(), |_| {});
}

/// The tunnel rows' FOU counterparts: the world's nodes tunnel over UDP to `TUNNEL_PORT`.
#[test]
fn fixture_table_fou() {
    check_rows(fou_rows(), |dp| {
        let mut cfg = dp.config().unwrap();
        cfg.flags |= lb_common::CFG_TUNNEL_FOU;
        dp.set_config(&cfg).unwrap();
    });
}

fn fou_rows() -> Vec<Row> {
    let to_node1 = (NIC_MAC, NODE1_MAC);
    let from_node1 = (NODE1_MAC, NIC_MAC);
    let syn = tcp_syn(NODE, 30083).tcp_options(&MSS_1460);
    let mss_fou = TUNNEL_MTU - 28 - 40;
    let req_for_a = client()
        .ipv4(CLIENT, POD_A)
        .ttl(63)
        .tcp(40000, 8080)
        .syn()
        .tcp_options(&MSS_1460);
    let tunnelled_req = fou(from_node1, NODE1, NODE, 0x1111, &req_for_a);
    let pod_reply = Packet::eth(POD_A_MAC, VETH_A_MAC)
        .ipv4(POD_A, CLIENT)
        .tcp(8080, 40000)
        .syn()
        .ack()
        .tcp_options(&MSS_1460);
    let remote_reply = client()
        .ipv4(POD_T, CLIENT)
        .ttl(63)
        .tcp(8080, 40000)
        .syn()
        .ack();
    let big = client()
        .ipv4(CLIENT, NODE)
        .tcp(40000, 30083)
        .ack()
        .payload(&[0x5a; 1435]);
    vec![
        Row {
            description: "fou: syn for a pod on node 1: DNAT, MSS clamped for 28 bytes of outer headers, FOU to node 1",
            before: vec![],
            prog: Prog::Xdp,
            input: syn.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::FwdTunnel,
            expect: Some(fou(to_node1, NODE, NODE1, entropy(CLIENT, 40000, NODE, 30083), &syn.clone().ip_dst(POD_T).dport(8080).ttl(63).tcp_options(&mss(mss_fou)))),
        },
        Row {
            description: "fou: a request that fits IP-in-IP but not FOU: fragmentation-needed with MTU 1472",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: big.build(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::IcmpTooBig,
            expect: Some(
                Packet::eth(NIC_MAC, CLIENT_MAC)
                    .ipv4(NODE, CLIENT)
                    .tos(0xc0)
                    .ip_id(0)
                    .dont_fragment(false)
                    .ip_proto(lb_tests::packet::IPPROTO_ICMP)
                    .payload(&icmp_message(3, 4, u32::from(TUNNEL_MTU - 28), &datagram(&big.build())[..28]))
                    .build(),
            ),
        },
        Row {
            description: "fou: a peer's FOU request for our pod: decapsulated into the pod's veth",
            before: vec![],
            prog: Prog::Xdp,
            input: tunnelled_req.clone(),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::TunnelIn,
            expect: Some(req_for_a.clone().macs(VETH_A_MAC, POD_A_MAC).ttl(62).build()),
        },
        Row {
            description: "fou: our pod's syn-ack to a FOU flow goes back over FOU, MSS clamped",
            before: vec![tunnelled_req.clone()],
            prog: Prog::Tc,
            input: pod_reply.build(),
            expect_verdict: TC_ACT_REDIRECT,
            expect_reason: Reason::TunnelReply,
            expect: Some(fou(to_node1, NODE, NODE1, entropy(POD_A, 8080, CLIENT, 40000), &pod_reply.clone().ttl(63).tcp_options(&mss(mss_fou)))),
        },
        Row {
            description: "fou: a reply of a flow we hold, back over FOU: decapsulated, reverse-NATed to the client",
            before: vec![syn.build()],
            prog: Prog::Xdp,
            input: fou(from_node1, NODE1, NODE, 0x2222, &remote_reply),
            expect_verdict: XDP_REDIRECT,
            expect_reason: Reason::RevNatTunnel,
            expect: Some(remote_reply.clone().macs(NIC_MAC, CLIENT_MAC).ip_src(NODE).sport(30083).ttl(62).build()),
        },
        Row {
            description: "fou: FOU from an address that is no peer: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: fou(from_node1, Ipv4Addr::new(10, 77, 0, 12), NODE, 0x1111, &req_for_a),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelPeer,
            expect: None,
        },
        Row {
            description: "fou: a FOU datagram whose inner header is cut short: passed",
            before: vec![],
            prog: Prog::Xdp,
            input: Packet::eth(NODE1_MAC, NIC_MAC).ipv4(NODE1, NODE).udp(0xc001, TUNNEL_PORT).payload(&datagram(&req_for_a.build())[..12]).build(),
            expect_verdict: XDP_PASS,
            expect_reason: Reason::PassTunnelInner,
            expect: None,
        },
    ]
}

fn check_rows(rows: Vec<Row>, setup: fn(&mut Dataplane)) {
    require_root();
    let mut failures = Vec::new();
    for row in rows {
        let pins = TestPins::new("fixture");
        let mut dp = world_in(Some(pins.dir().to_path_buf()));
        setup(&mut dp);
        for pkt in &row.before {
            let _ = dp.test_run_xdp(pkt).unwrap();
        }
        // The same packet through `explain` first (the real program in a sandbox over these
        // maps, which it must not write), then through the program itself: same answer.
        let live = LiveState::of(&dp);
        let explained = explain(pins.dir(), hook(row.prog), &row.input);
        let mut problems = Vec::new();
        if LiveState::of(&dp) != live {
            problems.push("explain changed the live maps".to_string());
        }
        let stats_before = dp.stats().unwrap();
        let before = stat(&dp, row.expect_reason);
        let (verdict, out) = run(&mut dp, row.prog, &row.input);
        if verdict != row.expect_verdict {
            problems.push(format!(
                "verdict {verdict}, expected {}",
                row.expect_verdict
            ));
        }
        if stat(&dp, row.expect_reason) != before + 1 {
            let counters: Vec<_> = dp
                .stats()
                .unwrap()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect();
            problems.push(format!(
                "counter {} did not count the packet; counters: {counters:?}",
                row.expect_reason.name()
            ));
        }
        let expect = row.expect.clone().unwrap_or_else(|| row.input.clone());
        if out != expect {
            problems.push(format!("output differs:\n{}", hexdiff(&expect, &out)));
        }
        if row.expect.is_some() {
            if let Err(e) = verify_checksums(&out) {
                problems.push(format!("output checksums wrong: {e}"));
            }
            // FOU: the inner datagram's checksums too (IP-in-IP's are checked above).
            if let Ok(p) = lb_tests::packet::parse(&out) {
                if matches!(&p.l4, Some(lb_tests::packet::L4Info::Udp(u)) if u.dport == TUNNEL_PORT)
                {
                    if let Err(e) = verify_checksums(&lb_tests::packet::inner_frame(&out, 28)) {
                        problems.push(format!("inner checksums wrong: {e}"));
                    }
                }
            }
        }
        let moved = moved_reason(&stats_before, &dp.stats().unwrap());
        match explained {
            Err(e) => problems.push(format!("explain failed: {e}")),
            Ok(e) => {
                if (e.verdict, e.reason, &e.output) != (verdict, moved, &out) {
                    problems.push(format!(
                        "explain said {} {:?}, the program {verdict} {moved:?}; outputs:\n{}",
                        e.verdict,
                        e.reason,
                        hexdiff(&out, &e.output)
                    ));
                }
                let redirect = matches!(
                    (row.prog, verdict),
                    (Prog::Xdp, XDP_REDIRECT) | (Prog::Tc, TC_ACT_REDIRECT)
                );
                if e.out_ifindex.is_some() != redirect {
                    problems.push(format!(
                        "explain's out interface {:?} for verdict {verdict}",
                        e.out_ifindex
                    ));
                }
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "[{}]\n  {}",
                row.description,
                problems.join("\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn hook(prog: Prog) -> Hook {
    match prog {
        Prog::Xdp => Hook::Ingress,
        Prog::Tc => Hook::Reply,
    }
}

/// The one reason whose counter moved between two readings.
fn moved_reason(before: &[(Reason, u64)], after: &[(Reason, u64)]) -> Option<Reason> {
    let moved: Vec<Reason> = before
        .iter()
        .zip(after)
        .filter(|((_, a), (_, b))| b > a)
        .map(|((r, _), _)| *r)
        .collect();
    match moved.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Frames shorter than an Ethernet header cannot reach the program: BPF_PROG_TEST_RUN refuses
/// them (EINVAL), as drivers do not deliver them. The program still checks (PassTruncEth);
/// this pins down why the table has no row for it.
#[test]
fn frames_below_ethernet_header_are_refused_by_the_kernel() {
    require_root();
    let mut dp = world();
    for len in [0, 1, 13] {
        let frame = vec![0u8; len];
        assert!(
            dp.test_run_xdp(&frame).is_err(),
            "{len}-byte frame was accepted by test_run"
        );
    }
    assert_eq!(total(&dp), 0);
}

#[test]
fn every_packet_counts_exactly_one_reason() {
    require_root();
    let mut dp = world();
    let rows = rows();
    let mut sent = 0;
    for row in &rows {
        for pkt in row.before.iter().chain(std::iter::once(&row.input)) {
            let _ = run(
                &mut dp,
                if std::ptr::eq(pkt, &row.input) {
                    row.prog
                } else {
                    Prog::Xdp
                },
                pkt,
            );
            sent += 1;
        }
    }
    assert_eq!(
        total(&dp),
        sent,
        "sum of all reason counters must equal the packets run"
    );
}

/// An established flow keeps its backend when the backend set changes; a new flow follows
/// the new ring.
#[test]
fn established_flow_survives_backend_set_change() {
    require_root();
    let mut dp = world();
    let syn = client().ipv4(CLIENT, NODE).tcp(41000, 30090).syn();
    let (v, out) = dp.test_run_xdp(&syn.build()).unwrap();
    assert_eq!(v, XDP_REDIRECT);
    let first = lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst;

    // Rebuild the ring without the chosen backend (it stays in BACKENDS, still serving).
    let ids = [(BE_A_9090, POD_A), (BE_B_9090, POD_B), (BE_R_9090, POD_R)];
    let remaining: Vec<_> = ids
        .iter()
        .filter(|(_, ip)| *ip != first)
        .map(|(id, _)| (*id, dp.backend(*id).unwrap()))
        .collect();
    let ring = ring_for(&remaining, FIXTURE_MAGLEV_SIZE);
    dp.write_full_ring(SVC_MULTI, &ring).unwrap();

    let ack = client()
        .ipv4(CLIENT, NODE)
        .tcp(41000, 30090)
        .ack()
        .payload(b"more");
    let (v, out) = dp.test_run_xdp(&ack.build()).unwrap();
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(
        lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst,
        first,
        "established flow moved"
    );

    // New flows never land on the removed backend.
    for sport in 42000..42200 {
        let (_, out) = dp
            .test_run_xdp(&client().ipv4(CLIENT, NODE).tcp(sport, 30090).syn().build())
            .unwrap();
        assert_ne!(
            lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst,
            first,
            "new flow {sport} used the removed backend"
        );
    }
}

/// A backend that disappears entirely: its flows are reselected (fail closed, no stale id).
/// The flow has an entry, so it is ours even mid-stream: the kernel knows nothing of it.
#[test]
fn flow_of_deleted_backend_is_reselected() {
    require_root();
    let mut dp = world();
    let syn = client().ipv4(CLIENT, NODE).tcp(41001, 30090).syn();
    let (_, out) = dp.test_run_xdp(&syn.build()).unwrap();
    let first = lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst;
    let ids = [(BE_A_9090, POD_A), (BE_B_9090, POD_B), (BE_R_9090, POD_R)];
    let (gone, _) = *ids.iter().find(|(_, ip)| *ip == first).unwrap();
    let remaining: Vec<_> = ids
        .iter()
        .filter(|(id, _)| *id != gone)
        .map(|(id, _)| (*id, dp.backend(*id).unwrap()))
        .collect();
    dp.write_full_ring(SVC_MULTI, &ring_for(&remaining, FIXTURE_MAGLEV_SIZE))
        .unwrap();
    dp.clear_backend(gone).unwrap();
    let ack = client().ipv4(CLIENT, NODE).tcp(41001, 30090).ack().build();
    let before = stat(&dp, Reason::PassMidStream);
    let (v, out) = dp.test_run_xdp(&ack).unwrap();
    assert_eq!(v, XDP_REDIRECT);
    let second = lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst;
    assert_ne!(second, first);
    assert_eq!(
        stat(&dp, Reason::PassMidStream),
        before,
        "a flow with an entry is ours"
    );
    // The reselected flow is established again: its next ACK follows it.
    let (v, out) = dp.test_run_xdp(&ack).unwrap();
    assert_eq!(v, XDP_REDIRECT);
    assert_eq!(
        lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst,
        second
    );
}

/// Terminating backends keep established flows but take no new ones, and a new SYN on an
/// old tuple reselects.
#[test]
fn terminating_backend_keeps_flows_gets_no_new_ones() {
    require_root();
    let mut dp = world();
    let (_, out) = dp
        .test_run_xdp(&client().ipv4(CLIENT, NODE).tcp(41002, 30090).syn().build())
        .unwrap();
    let first = lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst;
    let ids = [(BE_A_9090, POD_A), (BE_B_9090, POD_B), (BE_R_9090, POD_R)];
    let mut all: Vec<_> = ids
        .iter()
        .map(|(id, _)| (*id, dp.backend(*id).unwrap()))
        .collect();
    let term = ids.iter().find(|(_, ip)| *ip == first).unwrap().0;
    for (id, be) in all.iter_mut() {
        if *id == term {
            be.flags |= BE_TERMINATING;
            dp.set_backend(*id, be).unwrap();
        }
    }
    dp.write_full_ring(SVC_MULTI, &ring_for(&all, FIXTURE_MAGLEV_SIZE))
        .unwrap();

    let (_, out) = dp
        .test_run_xdp(&client().ipv4(CLIENT, NODE).tcp(41002, 30090).ack().build())
        .unwrap();
    assert_eq!(
        lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst,
        first,
        "established flow left a terminating backend"
    );
    let (_, out) = dp
        .test_run_xdp(&client().ipv4(CLIENT, NODE).tcp(41002, 30090).syn().build())
        .unwrap();
    assert_ne!(
        lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst,
        first,
        "a new SYN picked the terminating backend"
    );
    for sport in 43000..43200 {
        let (_, out) = dp
            .test_run_xdp(&client().ipv4(CLIENT, NODE).tcp(sport, 30090).syn().build())
            .unwrap();
        assert_ne!(
            lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst,
            first
        );
    }
}

/// sessionAffinity ClientIP: one client's flows stick to one backend; the affinity entry wins
/// over the ring while fresh and is ignored once older than the timeout.
#[test]
fn session_affinity_with_timeout() {
    require_root();
    let mut dp = world();
    let dst = |dp: &mut Dataplane, sport: u16| {
        let (v, out) = dp
            .test_run_xdp(&client().ipv4(CLIENT, NODE).tcp(sport, 30091).syn().build())
            .unwrap();
        assert_eq!(v, XDP_REDIRECT);
        lb_tests::packet::parse(&out).unwrap().ip.unwrap().dst
    };
    let first = dst(&mut dp, 50000);
    for sport in 50001..50050 {
        assert_eq!(
            dst(&mut dp, sport),
            first,
            "flow {sport} of the same client left its affinity backend"
        );
    }
    let key = AffinityKey {
        client: addr(CLIENT)[0],
        service_id: SVC_AFFINITY,
    };
    let entry = dp.affinity(&key).unwrap().expect("affinity entry written");
    let other_id = if first == POD_A { BE_B_8080 } else { BE_A_8080 };
    let other_ip = if first == POD_A { POD_B } else { POD_A };
    // A fresh entry pointing elsewhere wins over the ring.
    dp.set_affinity(
        &key,
        &AffinityEntry {
            backend_id: other_id,
            ..entry
        },
    )
    .unwrap();
    assert_eq!(dst(&mut dp, 50100), other_ip);
    // An expired one (older than the 60 s timeout) is ignored: back to the ring's choice.
    let now = entry.last_used_ns;
    dp.set_affinity(
        &key,
        &AffinityEntry {
            backend_id: other_id,
            _pad: 0,
            last_used_ns: now - 61_000_000_000,
        },
    )
    .unwrap();
    assert_eq!(dst(&mut dp, 50101), first);
}

/// Hostile input never aborts or crashes: mutated and random frames get PASS (or a forward for
/// mutations that stay valid), and are all counted.
#[test]
fn mutated_packets_never_abort() {
    require_root();
    let mut dp = world();
    let seeds = [
        tcp_syn(NODE, 30080).build(),
        client()
            .ipv4(CLIENT, NODE)
            .udp(1, 30080)
            .payload(b"x")
            .build(),
        tcp_syn(NODE, 30081).vlan(3).build(),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut runs = 0u64;
    for i in 0..3000 {
        let mut pkt = seeds[i % seeds.len()].clone();
        let flips = 1 + next() % 4;
        for _ in 0..flips {
            let pos = (next() as usize) % pkt.len();
            pkt[pos] ^= 1 << (next() % 8);
        }
        if next() % 5 == 0 {
            // test_run refuses frames below 14 bytes (see above).
            let keep = 14 + (next() as usize) % (pkt.len() - 14);
            pkt.truncate(keep);
        }
        for prog in [Prog::Xdp, Prog::Tc] {
            let res = match prog {
                Prog::Xdp => dp.test_run_xdp(&pkt),
                Prog::Tc => dp.test_run_tc(&pkt),
            };
            // The kernel's skb test_run refuses IPv4 frames too short for an IP header (such
            // an skb never reaches TC from a local pod); that refusal is the only one allowed.
            let (v, _) = match res {
                Err(_) if matches!(prog, Prog::Tc) && pkt.len() < 14 + 20 => continue,
                r => r.unwrap_or_else(|e| {
                    panic!(
                        "{prog:?} test_run refused {} bytes {pkt:02x?}: {e}",
                        pkt.len()
                    )
                }),
            };
            runs += 1;
            match prog {
                Prog::Xdp => assert!(
                    matches!(v, XDP_PASS | XDP_REDIRECT),
                    "verdict {v} (never ABORTED/DROP on bad input) for {pkt:02x?}"
                ),
                Prog::Tc => assert!(
                    matches!(v, TC_ACT_OK | TC_ACT_REDIRECT),
                    "tc verdict {v} for {pkt:02x?}"
                ),
            }
        }
    }
    assert_eq!(total(&dp), runs);
    let _ = (XDP_ABORTED, XDP_DROP, PROTO_UDP);
}

/// The SERVICE_PORTS fast path follows the frontends: a port stays open while any frontend
/// uses it and closes with the last one.
#[test]
fn service_port_bitmap_follows_frontends() {
    require_root();
    let mut dp = world();
    let syn = |dst, port| tcp_syn(dst, port).build();
    // Port 30080/TCP has one frontend (NodePort); add an exact one on the LB IP as well.
    let lb_30080 = frontend_key(Some(LB_IP), 30080, PROTO_TCP);
    let fe = lb_user_frontend(&dp, frontend_key(None, 30080, PROTO_TCP));
    dp.set_frontend(&lb_30080, &fe).unwrap();
    dp.remove_frontend(&frontend_key(None, 30080, PROTO_TCP))
        .unwrap();
    // The NodePort is gone, the LB frontend on the same port still works.
    assert_eq!(dp.test_run_xdp(&syn(NODE, 30080)).unwrap().0, XDP_PASS);
    assert_eq!(dp.test_run_xdp(&syn(LB_IP, 30080)).unwrap().0, XDP_REDIRECT);
    dp.remove_frontend(&lb_30080).unwrap();
    let before = stat(&dp, Reason::PassNonService);
    assert_eq!(dp.test_run_xdp(&syn(LB_IP, 30080)).unwrap().0, XDP_PASS);
    assert_eq!(stat(&dp, Reason::PassNonService), before + 1);
    // Removing twice is harmless and does not close a port another frontend still uses.
    dp.remove_frontend(&lb_30080).unwrap();
    // (From another client port: the client's port 40000 still has its flow to LB_IP:30080.)
    let lb_80 = tcp_syn(LB_IP, 80).sport(40100).build();
    assert_eq!(dp.test_run_xdp(&lb_80).unwrap().0, XDP_REDIRECT);
}

/// Established flows skip the frontend lookup while their ct entry is current (lb-ebpf
/// `ct_lookup`). Every frontend change that could make the old per-packet check (the
/// packet's frontend belongs to the entry's service) fail must make the program check
/// again: a removed frontend, a key moved to another service slot, a NodePort wildcard
/// that now shadows an exact frontend. A change of backend count alone must not.
#[test]
fn established_flows_follow_frontend_changes() {
    require_root();
    let mut dp = world();
    let to = |dst: Ipv4Addr, sport: u16, dport: u16| client().ipv4(CLIENT, dst).tcp(sport, dport);
    let dst_of = |out: &[u8]| {
        let p = lb_tests::packet::parse(out).unwrap();
        let dport = match p.l4 {
            Some(lb_tests::packet::L4Info::Tcp(t)) => t.dport,
            other => panic!("not TCP: {other:?}"),
        };
        (p.ip.unwrap().dst, dport)
    };
    // A second frontend on port 80 keeps the port's SERVICE_PORTS bit set throughout, so
    // what is tested is the ct entry, not the bitmap.
    let ext_80 = frontend_key(Some(EXT_IP), 80, PROTO_TCP);
    let ext_fe = lb_user_frontend(&dp, frontend_key(Some(EXT_IP), 443, PROTO_TCP));
    dp.set_frontend(&ext_80, &ext_fe).unwrap();

    // 1. Frontend removed: the established flow is no longer ours.
    let lb_80 = frontend_key(Some(LB_IP), 80, PROTO_TCP);
    let lb_fe = lb_user_frontend(&dp, lb_80);
    let (v, out) = dp
        .test_run_xdp(&to(LB_IP, 46000, 80).syn().build())
        .unwrap();
    assert_eq!((v, dst_of(&out)), (XDP_REDIRECT, (POD_A, 8080)));
    let before = stat(&dp, Reason::FwdLocal);
    let (v, out) = dp
        .test_run_xdp(&to(LB_IP, 46000, 80).ack().build())
        .unwrap();
    assert_eq!((v, dst_of(&out)), (XDP_REDIRECT, (POD_A, 8080)));
    assert_eq!(stat(&dp, Reason::FwdLocal), before + 1);
    // TTL 1 on an established flow is the kernel's, as for a new one.
    let before = stat(&dp, Reason::PassTtl);
    let (v, _) = dp
        .test_run_xdp(&to(LB_IP, 46000, 80).ttl(1).ack().build())
        .unwrap();
    assert_eq!((v, stat(&dp, Reason::PassTtl)), (XDP_PASS, before + 1));
    dp.remove_frontend(&lb_80).unwrap();
    let before = stat(&dp, Reason::PassNonService);
    let ack = to(LB_IP, 46000, 80).ack().build();
    let (v, out) = dp.test_run_xdp(&ack).unwrap();
    assert_eq!(
        v, XDP_PASS,
        "a flow of a removed frontend was still forwarded"
    );
    assert_eq!(out, ack);
    assert_eq!(stat(&dp, Reason::PassNonService), before + 1);

    // 2. The same key back, but for another service slot (a deleted service's frontend
    // reused): the old flow's entry is stale and the packet is a new flow of the new service
    // (the tuple had an entry, so it is not left to the kernel).
    dp.set_frontend(&lb_80, &ext_fe).unwrap();
    let (v, out) = dp.test_run_xdp(&ack).unwrap();
    assert_eq!((v, dst_of(&out)), (XDP_REDIRECT, (POD_B, 8443)));
    let (_, entry) = ct_entry(&dp, 46000, LB_IP, 80);
    assert_eq!(entry.service_id, SVC_EXTERNAL_IP);

    // 3. A NodePort wildcard added on a port that an exact frontend on a node address
    // uses: packets to the node address now belong to the NodePort service.
    let node_exact = frontend_key(Some(NODE), 30100, PROTO_TCP);
    dp.set_frontend(&node_exact, &lb_fe).unwrap();
    let (v, out) = dp
        .test_run_xdp(&to(NODE, 46001, 30100).syn().build())
        .unwrap();
    assert_eq!((v, dst_of(&out)), (XDP_REDIRECT, (POD_A, 8080)));
    dp.set_frontend(&frontend_key(None, 30100, PROTO_TCP), &ext_fe)
        .unwrap();
    let (v, out) = dp
        .test_run_xdp(&to(NODE, 46001, 30100).ack().build())
        .unwrap();
    assert_eq!((v, dst_of(&out)), (XDP_REDIRECT, (POD_B, 8443)));

    // 4. Only the backend count changes: established flows are not checked again.
    let epoch = dp.config().unwrap().frontend_epoch;
    dp.set_frontend(
        &ext_80,
        &lb_common::Frontend {
            backend_count: 0,
            ..ext_fe
        },
    )
    .unwrap();
    assert_eq!(dp.config().unwrap().frontend_epoch, epoch);
    dp.remove_frontend(&ext_80).unwrap();
    assert_ne!(dp.config().unwrap().frontend_epoch, epoch);
}

fn lb_user_frontend(dp: &Dataplane, key: lb_common::FrontendKey) -> lb_common::Frontend {
    dp.frontends()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .expect("frontend")
}

fn monotonic_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

fn ct_entry(
    dp: &Dataplane,
    client_port: u16,
    dst: Ipv4Addr,
    dport: u16,
) -> (lb_common::FlowKey, lb_common::CtEntry) {
    dp.conntrack()
        .unwrap()
        .into_iter()
        .find(|(k, v)| {
            k.client_port == port_be(client_port)
                && v.frontend_addr == addr(dst)[0]
                && v.frontend_port == port_be(dport)
        })
        .expect("ct entry")
}

/// FIN/RST mark a flow closing (one entry serves both directions); once the grace is over,
/// the entry stops translating replies (the tuple may now be a direct client -> pod
/// connection) and the next packet from the client is a new flow.
#[test]
fn closed_flows_stop_translating_after_the_grace() {
    require_root();
    let mut dp = world();
    let req = client().ipv4(CLIENT, NODE).tcp(45000, 30080).syn().build();
    assert_eq!(dp.test_run_xdp(&req).unwrap().0, XDP_REDIRECT);
    let reply = |flags: fn(Packet) -> Packet| {
        flags(
            Packet::eth(POD_A_MAC, VETH_A_MAC)
                .ipv4(POD_A, CLIENT)
                .tcp(8080, 45000),
        )
        .build()
    };

    // The pod's FIN is still reverse-NATed, and marks the flow closing.
    let (v, out) = dp.test_run_tc(&reply(|p| p.fin().ack())).unwrap();
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(lb_tests::packet::parse(&out).unwrap().ip.unwrap().src, NODE);
    let (ckey, ct) = ct_entry(&dp, 45000, NODE, 30080);
    assert_ne!(
        ct.flags & lb_common::CT_CLOSING,
        0,
        "ct entry not marked closing"
    );
    assert!(dp.revnat().unwrap().is_empty(), "a local flow wrote REVNAT");

    // Within the grace (10 s) the last ACKs still translate.
    assert_eq!(
        dp.test_run_tc(&reply(|p| p.ack())).unwrap().0,
        TC_ACT_REDIRECT
    );

    // Past the grace: the reply is not ours any more and passes unchanged.
    let old = monotonic_s() - 11;
    dp.set_conntrack(&ckey, &lb_common::CtEntry { stamp_s: old, ..ct })
        .unwrap();
    let before = stat(&dp, Reason::PassNotReply);
    let direct = reply(|p| p.syn().ack());
    assert_eq!(
        dp.test_run_tc(&direct).unwrap(),
        (TC_ACT_OK, direct.clone())
    );
    assert_eq!(stat(&dp, Reason::PassNotReply), before + 1);

    // And the client's next packet on the old tuple is a new flow (fresh, not closing): the
    // tuple had an entry, so even a mid-stream packet is ours, not the kernel's.
    assert_eq!(
        dp.test_run_xdp(&client().ipv4(CLIENT, NODE).tcp(45000, 30080).ack().build())
            .unwrap()
            .0,
        XDP_REDIRECT
    );
    let (_, fresh) = ct_entry(&dp, 45000, NODE, 30080);
    assert_eq!(
        fresh.flags & lb_common::CT_CLOSING,
        0,
        "expired closing flow was not re-created"
    );
}

/// A client RST marks the flow closing; a new SYN on a closing tuple is a new connection.
#[test]
fn client_rst_marks_closing_and_a_new_syn_starts_over() {
    require_root();
    let mut dp = world();
    let pkt = |f: fn(Packet) -> Packet| f(client().ipv4(CLIENT, NODE).tcp(45001, 30080)).build();
    assert_eq!(dp.test_run_xdp(&pkt(|p| p.syn())).unwrap().0, XDP_REDIRECT);
    assert_eq!(dp.test_run_xdp(&pkt(|p| p.rst())).unwrap().0, XDP_REDIRECT);
    let (_, ct) = ct_entry(&dp, 45001, NODE, 30080);
    assert_ne!(ct.flags & lb_common::CT_CLOSING, 0);
    assert_eq!(dp.test_run_xdp(&pkt(|p| p.syn())).unwrap().0, XDP_REDIRECT);
    let (_, ct) = ct_entry(&dp, 45001, NODE, 30080);
    assert_eq!(
        ct.flags & lb_common::CT_CLOSING,
        0,
        "a new SYN must start a fresh flow"
    );
}

/// SNAT ports of closed flows are free again after netfilter's TIME_WAIT (120 s), long before
/// the idle timeout, and not earlier: the backend may still hold TIME_WAIT for the tuple.
#[test]
fn snat_port_of_a_closed_flow_is_reused_after_time_wait() {
    require_root();
    let mut dp = world();
    let mut cfg = dp.config().unwrap();
    cfg.snat_port_min = 61000;
    cfg.snat_port_max = 61000; // one port: the second flow needs the first one's
    dp.set_config(&cfg).unwrap();
    let syn = |sport| client().ipv4(CLIENT, NODE).tcp(sport, 30081).syn().build();
    assert_eq!(dp.test_run_xdp(&syn(46000)).unwrap().0, XDP_REDIRECT);
    // The only port is taken: a second flow falls back to the kernel ...
    let before = stat(&dp, Reason::PassSnatExhausted);
    assert_eq!(dp.test_run_xdp(&syn(46001)).unwrap().0, XDP_PASS);
    assert_eq!(stat(&dp, Reason::PassSnatExhausted), before + 1);
    // ... and stays there: its next packets pass unchanged, no flow is created for them
    // (taking them over would send the kernel's connection to another pod).
    let ack = client()
        .ipv4(CLIENT, NODE)
        .tcp(46001, 30081)
        .ack()
        .payload(b"GET /")
        .build();
    let before = stat(&dp, Reason::PassMidStream);
    assert_eq!(dp.test_run_xdp(&ack).unwrap(), (XDP_PASS, ack.clone()));
    assert_eq!(stat(&dp, Reason::PassMidStream), before + 1);
    assert_eq!(
        dp.conntrack().unwrap().len(),
        1,
        "only the first flow is tracked"
    );
    // The first flow closes (RST from the pod's side, via the SNAT reply path) ...
    let rst = Packet::eth(NODE1_MAC, NIC_MAC)
        .ipv4(POD_R, NODE)
        .tcp(8080, 61000)
        .rst()
        .ack()
        .build();
    assert_eq!(dp.test_run_xdp(&rst).unwrap().0, XDP_REDIRECT);
    let (rkey, rev) = dp
        .revnat()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.dport == port_be(61000))
        .unwrap();
    assert_ne!(rev.flags & lb_common::REV_CLOSING, 0);
    // ... past the 10 s grace the port is still taken (the pod may be in TIME_WAIT) ...
    dp.set_revnat(
        &rkey,
        &lb_common::RevNatEntry {
            stamp_s: monotonic_s() - 11,
            ..rev
        },
    )
    .unwrap();
    let before = stat(&dp, Reason::PassSnatExhausted);
    assert_eq!(dp.test_run_xdp(&syn(46001)).unwrap().0, XDP_PASS);
    assert_eq!(stat(&dp, Reason::PassSnatExhausted), before + 1);
    // ... and once TIME_WAIT is over, the port serves the second flow.
    dp.set_revnat(
        &rkey,
        &lb_common::RevNatEntry {
            stamp_s: monotonic_s() - lb_common::SNAT_TIME_WAIT_S - 1,
            ..rev
        },
    )
    .unwrap();
    let (v, out) = dp.test_run_xdp(&syn(46001)).unwrap();
    assert_eq!(v, XDP_REDIRECT);
    let parsed = lb_tests::packet::parse(&out).unwrap();
    assert_eq!(parsed.l4.unwrap().sport(), 61000);
}

/// A SYN-ACK on a tuple whose flow already closed belongs to a new connection, even within
/// the grace: the client talking to the pod directly on a reused port (local reply, TC), or
/// kube-proxy's masquerade choosing a node port our SNAT used before (remote reply, XDP).
/// It passes unchanged and the stale entry goes; before the fix it was rewritten into the
/// old flow and the new connection hung.
#[test]
fn a_syn_ack_on_a_closing_tuple_is_a_new_connection() {
    require_root();
    let mut dp = world();

    // Local: the client's flow through the NodePort closes ...
    let req = client().ipv4(CLIENT, NODE).tcp(45010, 30080).syn().build();
    assert_eq!(dp.test_run_xdp(&req).unwrap().0, XDP_REDIRECT);
    let reply = |f: fn(Packet) -> Packet| {
        f(Packet::eth(POD_A_MAC, VETH_A_MAC)
            .ipv4(POD_A, CLIENT)
            .tcp(8080, 45010))
        .build()
    };
    assert_eq!(
        dp.test_run_tc(&reply(|p| p.fin().ack())).unwrap().0,
        TC_ACT_REDIRECT
    );
    // ... and the same client port now connects to the pod directly (ip mode): the pod's
    // SYN-ACK is not translated, and the entry is gone.
    let before = stat(&dp, Reason::PassNotReply);
    let direct = reply(|p| p.syn().ack());
    assert_eq!(
        dp.test_run_tc(&direct).unwrap(),
        (TC_ACT_OK, direct.clone())
    );
    assert_eq!(stat(&dp, Reason::PassNotReply), before + 1);
    assert!(
        dp.revnat()
            .unwrap()
            .iter()
            .all(|(k, _)| k.dport != port_be(45010)),
        "stale local reverse-NAT entry not deleted"
    );

    // Remote: a flow SNATed to node port 61000 closes (RST from the pod's side) ...
    let mut cfg = dp.config().unwrap();
    cfg.snat_port_min = 61000;
    cfg.snat_port_max = 61000;
    dp.set_config(&cfg).unwrap();
    let syn = client().ipv4(CLIENT, NODE).tcp(46010, 30081).syn().build();
    assert_eq!(dp.test_run_xdp(&syn).unwrap().0, XDP_REDIRECT);
    let from_pod = |f: fn(Packet) -> Packet| {
        f(Packet::eth(NODE1_MAC, NIC_MAC)
            .ipv4(POD_R, NODE)
            .tcp(8080, 61000))
        .build()
    };
    assert_eq!(
        dp.test_run_xdp(&from_pod(|p| p.rst().ack())).unwrap().0,
        XDP_REDIRECT
    );
    // ... and kube-proxy masquerades another connection to the same pod from node port
    // 61000: its SYN-ACK is the kernel's, unchanged. The entry stays, so the port is not
    // handed out again while the kernel's connection may use it.
    let synack = from_pod(|p| p.syn().ack());
    assert_eq!(
        dp.test_run_xdp(&synack).unwrap(),
        (XDP_PASS, synack.clone())
    );
    assert!(
        dp.revnat()
            .unwrap()
            .iter()
            .any(|(k, _)| k.dport == port_be(61000)),
        "the SNAT entry must keep its port until TIME_WAIT is over"
    );
    let before = stat(&dp, Reason::PassSnatExhausted);
    let other = client().ipv4(CLIENT, NODE).tcp(46011, 30081).syn().build();
    assert_eq!(dp.test_run_xdp(&other).unwrap().0, XDP_PASS);
    assert_eq!(stat(&dp, Reason::PassSnatExhausted), before + 1);
}

/// A client reusing one source port for many short connections within TIME_WAIT: each new
/// flow needs a fresh SNAT port while the closed ones hold theirs. The probes after the
/// first are random, so the tuple does not walk the same 8 ports every time (it ran out at
/// the 9th reuse before).
#[test]
fn a_reused_client_tuple_keeps_getting_snat_ports() {
    require_root();
    let mut dp = world();
    let mut cfg = dp.config().unwrap();
    cfg.snat_port_min = 61000;
    cfg.snat_port_max = 61999;
    dp.set_config(&cfg).unwrap();
    let before = stat(&dp, Reason::PassSnatExhausted);
    let mut ports = std::collections::BTreeSet::new();
    for round in 0..16 {
        let syn = client().ipv4(CLIENT, NODE).tcp(46020, 30081).syn().build();
        let (v, out) = dp.test_run_xdp(&syn).unwrap();
        assert_eq!(
            v, XDP_REDIRECT,
            "round {round}: the SYN fell back to the kernel"
        );
        let port = lb_tests::packet::parse(&out).unwrap().l4.unwrap().sport();
        assert!(
            ports.insert(port),
            "round {round}: port {port} handed out twice"
        );
        // The pod resets the connection: the flow closes and its port stays taken.
        let rst = Packet::eth(NODE1_MAC, NIC_MAC)
            .ipv4(POD_R, NODE)
            .tcp(8080, port)
            .rst()
            .ack()
            .build();
        assert_eq!(dp.test_run_xdp(&rst).unwrap().0, XDP_REDIRECT);
    }
    assert_eq!(stat(&dp, Reason::PassSnatExhausted), before);
}

/// LOCAL_ENDPOINTS follows the local backends: one entry per pod however many backend ids
/// (Service ports) point at it, gone with the last one; the peer entry learns how the
/// peer's requests arrive; without peers the path is off.
#[test]
fn peer_path_follows_local_backends_and_peers() {
    require_root();
    let mut dp = world();
    let eps: std::collections::BTreeMap<Ipv4Addr, lb_common::LocalEndpoint> = dp
        .local_endpoints()
        .unwrap()
        .into_iter()
        .map(|(a, ep)| (Ipv4Addr::from(a.to_ne_bytes()), ep))
        .collect();
    assert_eq!(
        eps.keys().copied().collect::<Vec<_>>(),
        vec![POD_A, POD_B, POD_R],
        "the fixture's local backends' pods (remote POD_R:8080 is local as POD_R:9090)"
    );
    assert_eq!(
        eps[&POD_A],
        lb_common::LocalEndpoint {
            ifindex: VETH_A_IFINDEX,
            mac: POD_A_MAC,
            node_mac: VETH_A_MAC,
        }
    );
    // SNAT mode: node 1 is a peer by its SNAT address only.
    dp.set_peers(&[(PEER_SNAT, lb_common::PEER_SNAT)]).unwrap();
    let to = |pod: Ipv4Addr| {
        Packet::eth(NODE1_MAC, NIC_MAC)
            .ipv4(PEER_SNAT, pod)
            .tcp(61300, 8080)
            .syn()
            .build()
    };

    // The first forwarded request teaches the peer entry.
    assert_eq!(
        dp.peers().unwrap(),
        vec![(
            addr(PEER_SNAT)[0],
            lb_common::PeerNode {
                flags: lb_common::PEER_SNAT,
                ..Default::default()
            }
        )]
    );
    let (v, _) = dp.test_run_xdp(&to(POD_A)).unwrap();
    assert_eq!(v, XDP_REDIRECT);
    let (_, learned) = dp.peers().unwrap()[0];
    assert_ne!(learned.ifindex, 0, "the peer's interface was not learned");
    assert_eq!((learned.mac, learned.node_mac), (NODE1_MAC, NIC_MAC));

    // POD_A is behind two backend ids: clearing one keeps it, clearing both removes it.
    dp.clear_backend(BE_A_9090).unwrap();
    assert_eq!(dp.test_run_xdp(&to(POD_A)).unwrap().0, XDP_REDIRECT);
    dp.clear_backend(BE_A_8080).unwrap();
    assert!(dp
        .local_endpoints()
        .unwrap()
        .iter()
        .all(|(a, _)| *a != addr(POD_A)[0]));
    assert_eq!(dp.test_run_xdp(&to(POD_A)).unwrap().0, XDP_PASS);
    // An id that moves from a local pod to a remote one takes the pod's entry with it.
    dp.set_backend(BE_R_9090, &remote_backend(POD_R, 9090))
        .unwrap();
    assert_eq!(dp.test_run_xdp(&to(POD_R)).unwrap().0, XDP_PASS);

    // No peers: the programs skip PEERS altogether, POD_B's peer traffic goes to the kernel.
    assert_eq!(dp.test_run_xdp(&to(POD_B)).unwrap().0, XDP_REDIRECT);
    dp.set_peers(&[]).unwrap();
    assert_eq!(dp.config().unwrap().flags & lb_common::CFG_PEERS, 0);
    assert!(dp.peers().unwrap().is_empty());
    let before = stat(&dp, Reason::PassNonService);
    assert_eq!(dp.test_run_xdp(&to(POD_B)).unwrap().0, XDP_PASS);
    assert_eq!(stat(&dp, Reason::PassNonService), before + 1);
    // And back on.
    dp.set_peers(&[(PEER_SNAT, lb_common::PEER_SNAT)]).unwrap();
    assert_ne!(dp.config().unwrap().flags & lb_common::CFG_PEERS, 0);
    assert_eq!(dp.test_run_xdp(&to(POD_B)).unwrap().0, XDP_REDIRECT);

    // Roles: a tunnel-only peer (an InternalIP, which kube-proxy on that node masquerades
    // to) gets no peer path: its plain requests to our pods are the kernel's. A SNAT-only
    // peer's encapsulated packets are refused.
    dp.set_peers(&[(NODE1, lb_common::PEER_TUNNEL)]).unwrap();
    let masqueraded = Packet::eth(NODE1_MAC, NIC_MAC)
        .ipv4(NODE1, POD_B)
        .tcp(61301, 8080)
        .syn()
        .build();
    assert_eq!(dp.test_run_xdp(&masqueraded).unwrap().0, XDP_PASS);
    let inner = client().ipv4(CLIENT, POD_B).ttl(63).tcp(61302, 8080).syn();
    let tunnelled = |from: Ipv4Addr| ipip((NODE1_MAC, NIC_MAC), from, NODE, 0x3333, &inner);
    assert_eq!(dp.test_run_xdp(&tunnelled(NODE1)).unwrap().0, XDP_REDIRECT);
    dp.set_peers(&[(NODE1, lb_common::PEER_SNAT)]).unwrap();
    let before = stat(&dp, Reason::PassTunnelPeer);
    assert_eq!(dp.test_run_xdp(&tunnelled(NODE1)).unwrap().0, XDP_PASS);
    assert_eq!(stat(&dp, Reason::PassTunnelPeer), before + 1);
    assert_eq!(dp.test_run_xdp(&masqueraded).unwrap().0, XDP_REDIRECT);
}

/// LOCAL_ENDPOINTS full (more local pods than its 16 384 entries): writing the backend still
/// succeeds, the pod that does not fit is counted and its peer requests take the kernel
/// path, and it gets the first slot a removed pod frees.
#[test]
fn local_endpoints_overflow_is_counted_and_catches_up() {
    require_root();
    let mut dp = Dataplane::load(lb_user::bpf::dataplane::DataplaneOptions {
        max_services: 1,
        maglev_size: FIXTURE_MAGLEV_SIZE,
        max_backends: 16_400,
        max_frontends: 16,
        ct_entries: 1024,
        affinity_entries: 1024,
        pin_dir: None,
    })
    .expect("load the BPF object");
    let pod = |i: u32| Ipv4Addr::from(0x0a50_0000 + i);
    let be = |i: u32| local_backend(pod(i), 8080, VETH_A_IFINDEX, VETH_A_MAC, POD_A_MAC);
    const CAP: u32 = 16_384;
    for i in 1..=CAP {
        dp.set_backend(i, &be(i)).unwrap();
    }
    assert_eq!(dp.local_endpoints_overflow(), 0);
    // One more pod: the backend is written, the endpoint waits.
    dp.set_backend(CAP + 1, &be(CAP + 1)).unwrap();
    assert_eq!(dp.backend(CAP + 1).unwrap(), be(CAP + 1));
    assert_eq!(dp.local_endpoints_overflow(), 1);
    let in_map = |dp: &Dataplane, i: u32| {
        dp.local_endpoints()
            .unwrap()
            .iter()
            .any(|(a, _)| *a == addr(pod(i))[0])
    };
    assert!(!in_map(&dp, CAP + 1));
    // A second id of a waiting pod neither fails nor takes a slot.
    dp.set_backend(CAP + 2, &be(CAP + 1)).unwrap();
    assert_eq!(dp.local_endpoints_overflow(), 1);
    // Pod 7 goes: the waiting pod takes its slot.
    dp.clear_backend(7).unwrap();
    assert_eq!(dp.local_endpoints_overflow(), 0);
    assert!(in_map(&dp, CAP + 1));
    assert!(!in_map(&dp, 7));
    assert_eq!(dp.local_endpoints().unwrap().len(), CAP as usize);
}

/// A client tuple first served through this node (a local flow to POD_A, now closing), then
/// through node 1, which tunnels it to the same pod: the pod's replies belong to the new
/// flow and go back through the tunnel. The old local entry must not catch them (it would
/// send them from this node's frontend, which the client drops). A live TCP connection on
/// the same tuple keeps the pod's replies (the pod can serve only one of the two), and for
/// UDP the latest flow wins.
#[test]
fn a_tunnelled_flow_takes_a_tuple_over_from_an_old_local_flow() {
    require_root();
    let mut dp = world();
    let pod_reply = |sport: u16, port: u16, f: fn(Packet) -> Packet| {
        f(Packet::eth(POD_A_MAC, VETH_A_MAC)
            .ipv4(POD_A, CLIENT)
            .tcp(sport, port))
        .build()
    };
    let tunnelled_syn = |port: u16| {
        let inner = client().ipv4(CLIENT, POD_A).ttl(63).tcp(port, 8080).syn();
        ipip((NODE1_MAC, NIC_MAC), NODE1, NODE, 0x1111, &inner)
    };
    let outer = |out: &[u8]| lb_tests::packet::parse(out).unwrap().ip.unwrap();

    for (port, close_first) in [(46000u16, true), (46001, false)] {
        let local =
            |f: fn(Packet) -> Packet| f(client().ipv4(CLIENT, NODE).tcp(port, 30080)).build();
        assert_eq!(
            dp.test_run_xdp(&local(|p| p.syn())).unwrap().0,
            XDP_REDIRECT
        );
        if close_first {
            assert_eq!(
                dp.test_run_xdp(&local(|p| p.fin().ack())).unwrap().0,
                XDP_REDIRECT
            );
            let (_, ct) = ct_entry(&dp, port, NODE, 30080);
            assert_ne!(ct.flags & lb_common::CT_CLOSING, 0);
        }
        let before = stat(&dp, Reason::TunnelIn);
        assert_eq!(
            dp.test_run_xdp(&tunnelled_syn(port)).unwrap().0,
            XDP_REDIRECT
        );
        assert_eq!(stat(&dp, Reason::TunnelIn), before + 1);

        if close_first {
            // The old flow's entry, closing but within its grace, does not take the pod's
            // SYN-ACK, which ends that grace: the SYN-ACK and every later reply go through
            // the tunnel. (The owning node looks nothing up in CONNTRACK for a tunnelled SYN.)
            let tunnel = stat(&dp, Reason::TunnelReply);
            for (i, reply) in [
                pod_reply(8080, port, |p| p.syn().ack()),
                pod_reply(8080, port, |p| p.ack().payload(b"data")),
            ]
            .iter()
            .enumerate()
            {
                let (v, out) = dp.test_run_tc(reply).unwrap();
                assert_eq!(v, TC_ACT_REDIRECT);
                assert_eq!(
                    stat(&dp, Reason::TunnelReply),
                    tunnel + 1 + i as u64,
                    "port {port}, reply {i}"
                );
                assert_eq!(
                    (outer(&out).dst, outer(&out).proto),
                    (NODE1, lb_tests::packet::IPPROTO_IPIP)
                );
            }
        } else {
            let rev_local = stat(&dp, Reason::RevNatLocal);
            let (v, out) = dp
                .test_run_tc(&pod_reply(8080, port, |p| p.ack().payload(b"data")))
                .unwrap();
            assert_eq!(v, TC_ACT_REDIRECT);
            // A live local connection on the tuple keeps it.
            assert_eq!(stat(&dp, Reason::RevNatLocal), rev_local + 1, "port {port}");
            assert_eq!(outer(&out).src, NODE);
        }
    }

    // UDP: a query through this node (POD_B:5353), then one node 1 tunnels to the same pod.
    let port = 46002;
    let query = client()
        .ipv4(CLIENT, NODE)
        .udp(port, 30080)
        .payload(b"q")
        .build();
    assert_eq!(dp.test_run_xdp(&query).unwrap().0, XDP_REDIRECT);
    let inner = client()
        .ipv4(CLIENT, POD_B)
        .ttl(63)
        .udp(port, 5353)
        .payload(b"q");
    let tunnelled = ipip((NODE1_MAC, NIC_MAC), NODE1, NODE, 0x2222, &inner);
    assert_eq!(dp.test_run_xdp(&tunnelled).unwrap().0, XDP_REDIRECT);
    let answer = Packet::eth(POD_B_MAC, VETH_B_MAC)
        .ipv4(POD_B, CLIENT)
        .udp(5353, port)
        .payload(b"a")
        .build();
    let (v, out) = dp.test_run_tc(&answer).unwrap();
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        (outer(&out).dst, outer(&out).proto),
        (NODE1, lb_tests::packet::IPPROTO_IPIP)
    );
}
