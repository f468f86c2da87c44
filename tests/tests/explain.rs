//! `lb-user explain` against the fixture world: the real programs answer, in a sandbox over
//! pinned maps that it must never write. `xdp_fixtures::fixture_table` checks that explain
//! and the program agree on every fixture row; these check what explain reports beyond the
//! verdict (entries read and written, the out interface, the decoded output) on the paths
//! the old hand-kept model covered, and the CLI end to end.
//!
//! Needs root (BPF). Run: `cargo test -p lb-tests --release --test explain -- --test-threads=1`.

use std::process::Command;

use lb_common::{
    maps::{MapDef, AFFINITY, CONNTRACK, FRONTENDS, PEERS, REVNAT},
    AffinityEntry, AffinityKey, Reason, BE_TERMINATING,
};
use lb_tests::{fixture::*, packet::Packet};
use lb_user::bpf::{dataplane::Dataplane, sandbox::Hook};
use lb_user::inspect::explain::{explain, Explanation};

fn require_root() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "explain runs BPF programs: run as root (`cargo xtask test` does)"
    );
}

fn client() -> Packet {
    Packet::eth(CLIENT_MAC, NIC_MAC)
}

fn pinned() -> (TestPins, Dataplane) {
    let pins = TestPins::new("explain");
    let dp = world_in(Some(pins.dir().to_path_buf()));
    (pins, dp)
}

/// Explains `frame` and checks the live maps did not move.
fn ask(pins: &TestPins, dp: &Dataplane, hook: Hook, frame: &[u8]) -> Explanation {
    let live = LiveState::of(dp);
    let e = explain(pins.dir(), hook, frame).expect("explain");
    assert_eq!(LiveState::of(dp), live, "explain wrote the live maps");
    e
}

fn maps_of<'a>(entries: &'a [lb_user::inspect::explain::Entry], map: &str) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|e| e.map == map)
        .map(|e| e.key.as_str())
        .collect()
}

#[test]
fn a_new_local_flow_is_redirected_into_the_pod_and_creates_its_entries() {
    require_root();
    let (pins, dp) = pinned();
    let syn = client().ipv4(CLIENT, NODE).tcp(40000, 30080).syn().build();
    let e = ask(&pins, &dp, Hook::Ingress, &syn);
    assert_eq!(
        (e.action, e.reason),
        ("XDP_REDIRECT", Some(Reason::FwdLocal))
    );
    assert_eq!(e.out_ifindex, Some(VETH_A_IFINDEX));
    let out = e
        .rewritten
        .as_ref()
        .expect("rewritten")
        .l4
        .as_ref()
        .unwrap();
    assert_eq!(out.dst.to_string(), format!("{POD_A}:8080"));
    assert_eq!(
        out.src.to_string(),
        format!("{CLIENT}:40000"),
        "client address kept"
    );
    assert!(out.checksums_ok);
    assert_eq!(maps_of(&e.read, FRONTENDS::SPEC.name), ["*:30080/TCP"]);
    // One entry per new flow, keyed by the client's address: it serves both directions, so a
    // local pod's flow writes no reverse-NAT entry (REVNAT is for SNAT mode only).
    assert_eq!(
        maps_of(&e.created, CONNTRACK::SPEC.name),
        [format!("client {CLIENT}:40000 TCP").as_str()]
    );
    let ct = e
        .created
        .iter()
        .find(|c| c.map == CONNTRACK::SPEC.name)
        .unwrap();
    assert!(
        ct.value
            .starts_with(&format!("to {NODE}:30080, backend id ")),
        "{ct:?}"
    );
    assert_eq!(maps_of(&e.created, REVNAT::SPEC.name), Vec::<&str>::new());
    assert!(e.changed.is_empty() && e.removed.is_empty(), "{e:?}");
}

#[test]
fn non_service_and_mid_stream_packets_pass_and_create_nothing() {
    require_root();
    let (pins, dp) = pinned();
    let unused = client().ipv4(CLIENT, NODE).tcp(40000, 31999).syn().build();
    let e = ask(&pins, &dp, Hook::Ingress, &unused);
    assert_eq!(
        (e.action, e.reason),
        ("XDP_PASS", Some(Reason::PassNonService))
    );
    assert_eq!((e.rewritten.clone(), e.out_ifindex), (None, None));
    let ack = client().ipv4(CLIENT, NODE).tcp(40000, 30080).ack().build();
    let e = ask(&pins, &dp, Hook::Ingress, &ack);
    assert_eq!(e.reason, Some(Reason::PassMidStream));
    assert!(e.created.is_empty(), "{e:?}");
    let empty = client().ipv4(CLIENT, NODE).tcp(40000, 30082).syn().build();
    assert_eq!(
        ask(&pins, &dp, Hook::Ingress, &empty).reason,
        Some(Reason::PassNoBackend)
    );
    let arp = client().ethertype(0x0806).build();
    let e = ask(&pins, &dp, Hook::Ingress, &arp);
    assert_eq!(e.reason, Some(Reason::PassNotIpv4));
    assert_eq!(e.input.note.as_deref(), Some("not IPv4 (ethertype 0x0806)"));
}

#[test]
fn an_established_flow_keeps_its_backend_and_a_syn_to_a_terminating_one_reselects() {
    require_root();
    let (pins, mut dp) = pinned();
    let syn = client().ipv4(CLIENT, NODE).tcp(40100, 30090).syn().build();
    assert_eq!(dp.test_run_xdp(&syn).unwrap().0, XDP_REDIRECT);
    let (key, ct) = dp.conntrack().unwrap()[0];
    let ack = client().ipv4(CLIENT, NODE).tcp(40100, 30090).ack().build();
    let e = ask(&pins, &dp, Hook::Ingress, &ack);
    assert_eq!(e.reason, Some(Reason::FwdLocal));
    assert!(
        e.created.is_empty(),
        "an established flow creates nothing: {e:?}"
    );
    assert!(
        e.read.iter().any(|r| r.map == CONNTRACK::SPEC.name
            && r.value
                .contains(&format!(", backend id {},", ct.backend_id))),
        "{e:?}"
    );

    // Its backend turns terminating (out of the ring): the flow keeps it, a new SYN on the
    // tuple reselects.
    let mut backends: Vec<(u32, lb_common::Backend)> = [BE_A_9090, BE_B_9090, BE_R_9090]
        .iter()
        .map(|&id| (id, dp.backend(id).unwrap()))
        .collect();
    for (id, be) in &mut backends {
        if *id == ct.backend_id {
            be.flags |= BE_TERMINATING;
        }
    }
    install_service(
        &mut dp,
        SVC_MULTI,
        &[frontend_key(None, 30090, lb_common::PROTO_TCP)],
        &backends,
        0,
        0,
    )
    .unwrap();
    let live = dp.conntrack().unwrap();
    assert_eq!(
        ask(&pins, &dp, Hook::Ingress, &ack).reason,
        Some(Reason::FwdLocal)
    );
    let e = ask(&pins, &dp, Hook::Ingress, &syn);
    assert_eq!(e.reason, Some(Reason::FwdLocal));
    let changed: Vec<_> = e
        .changed
        .iter()
        .filter(|c| c.map == CONNTRACK::SPEC.name)
        .collect();
    assert_eq!(changed.len(), 1, "{e:?}");
    assert!(changed[0]
        .before
        .contains(&format!(", backend id {},", ct.backend_id)));
    assert!(!changed[0]
        .after
        .contains(&format!(", backend id {},", ct.backend_id)));
    assert_eq!(dp.conntrack().unwrap(), live, "the live entry is untouched");
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].0, key);
}

#[test]
fn affinity_sticks_to_a_fresh_entry_and_creates_one_otherwise() {
    require_root();
    let (pins, mut dp) = pinned();
    let syn = client().ipv4(CLIENT, NODE).tcp(40200, 30091).syn().build();
    let e = ask(&pins, &dp, Hook::Ingress, &syn);
    assert_eq!(maps_of(&e.created, AFFINITY::SPEC.name).len(), 1, "{e:?}");
    // A fresh entry naming BE_B_8080 wins over the client hash.
    let akey = AffinityKey {
        client: addr(CLIENT)[0],
        service_id: SVC_AFFINITY,
    };
    let now = monotonic_ns();
    dp.set_affinity(
        &akey,
        &AffinityEntry {
            backend_id: BE_B_8080,
            _pad: 0,
            last_used_ns: now,
        },
    )
    .unwrap();
    let e = ask(&pins, &dp, Hook::Ingress, &syn);
    assert_eq!(e.out_ifindex, Some(VETH_B_IFINDEX));
    assert_eq!(
        e.rewritten.unwrap().l4.unwrap().dst.to_string(),
        format!("{POD_B}:8080")
    );
    assert!(
        maps_of(&e.read, AFFINITY::SPEC.name).len() == 1,
        "{:?}",
        e.read
    );
}

#[test]
fn a_remote_flow_gets_a_free_snat_port_and_its_reply_is_reverse_natted() {
    require_root();
    let (pins, mut dp) = pinned();
    let syn = client().ipv4(CLIENT, NODE).tcp(40300, 30081).syn().build();
    let e = ask(&pins, &dp, Hook::Ingress, &syn);
    assert_eq!(e.reason, Some(Reason::FwdRemote));
    assert_eq!(e.out_ifindex, Some(NIC_IFINDEX));
    let first = e.rewritten.unwrap().l4.unwrap().src.port();

    // The port explain chose is taken by a live flow: the program probes further.
    let (v, _) = dp.test_run_xdp(&syn).unwrap();
    assert_eq!(v, XDP_REDIRECT);
    let other = client().ipv4(CLIENT, NODE).tcp(40300, 30081).syn().build();
    dp.remove_conntrack(&dp.conntrack().unwrap()[0].0).unwrap();
    let e = ask(&pins, &dp, Hook::Ingress, &other);
    assert_eq!(e.reason, Some(Reason::FwdRemote));
    let second = e.rewritten.unwrap().l4.unwrap().src.port();
    assert_ne!(first, second, "a busy SNAT port is not handed out again");
    let ct = e
        .created
        .iter()
        .find(|c| c.map == CONNTRACK::SPEC.name)
        .expect("a ct entry");
    assert!(ct.value.contains(&format!("SNAT port {second}")), "{ct:?}");

    // The pod's reply to the live flow's SNAT port comes back to the client.
    let reply = Packet::eth(NODE1_MAC, NIC_MAC)
        .ipv4(POD_R, NODE)
        .tcp(8080, first)
        .syn()
        .ack()
        .build();
    let e = ask(&pins, &dp, Hook::Ingress, &reply);
    assert_eq!(e.reason, Some(Reason::RevNatRemote));
    assert_eq!(e.out_ifindex, Some(NIC_IFINDEX));
    let out = e.rewritten.unwrap().l4.unwrap();
    assert_eq!(
        (out.src.to_string(), out.dst.to_string()),
        (format!("{NODE}:30081"), format!("{CLIENT}:40300"))
    );
}

#[test]
fn the_peer_path_and_a_local_pods_reply_are_explained() {
    require_root();
    let (pins, mut dp) = pinned();
    let peer = Packet::eth(NODE1_MAC, NIC_MAC)
        .ipv4(PEER_SNAT, POD_A)
        .ttl(63)
        .tcp(61234, 8080)
        .syn()
        .build();
    let e = ask(&pins, &dp, Hook::Ingress, &peer);
    assert_eq!(e.reason, Some(Reason::FwdPeer));
    assert_eq!(e.out_ifindex, Some(VETH_A_IFINDEX));
    let learned: Vec<_> = e
        .changed
        .iter()
        .filter(|c| c.map == PEERS::SPEC.name)
        .collect();
    assert_eq!(
        learned.len(),
        1,
        "the peer entry learns the interface: {e:?}"
    );

    // A local pod's reply (TC on its veth) to a flow the program created.
    let syn = client().ipv4(CLIENT, NODE).tcp(40400, 30080).syn().build();
    assert_eq!(dp.test_run_xdp(&syn).unwrap().0, XDP_REDIRECT);
    let reply = Packet::eth(POD_A_MAC, VETH_A_MAC)
        .ipv4(POD_A, CLIENT)
        .tcp(8080, 40400)
        .syn()
        .ack()
        .build();
    let e = ask(&pins, &dp, Hook::Reply, &reply);
    assert_eq!(
        (e.action, e.reason),
        ("TC_ACT_REDIRECT", Some(Reason::RevNatLocal))
    );
    assert_eq!(e.out_ifindex, Some(NIC_IFINDEX));
    assert_eq!(
        e.rewritten.unwrap().l4.unwrap().src.to_string(),
        format!("{NODE}:30080")
    );
    // And a packet from the pod that is no reply.
    let stray = Packet::eth(POD_A_MAC, VETH_A_MAC)
        .ipv4(POD_A, CLIENT)
        .tcp(8080, 49999)
        .ack()
        .build();
    assert_eq!(
        ask(&pins, &dp, Hook::Reply, &stray).reason,
        Some(Reason::PassNotReply)
    );
}

/// The CLI end to end: `lb-user explain` finds the pins by --pin-dir, prints the table and
/// the JSON, and a missing instance is a clear error with exit code 1.
#[test]
fn the_cli_prints_the_table_and_json() {
    require_root();
    let (pins, _dp) = pinned();
    let bin = lb_tests::scenario::Binaries::locate()
        .expect("lb-user binary")
        .agent;
    let run = |extra: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("explain")
            .arg("--pin-dir")
            .arg(pins.dir())
            .args([
                "--from",
                &format!("{CLIENT}:40500"),
                "--to",
                &format!("{NODE}:30080"),
                "--syn",
            ])
            .args(extra);
        let out = c.output().expect("run lb-user");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&[]);
    assert!(
        table.contains("VERDICT  XDP_REDIRECT (fwd_local)"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "TCP {CLIENT}:40500 -> {POD_A}:8080 ttl 63 [S], checksums ok"
        )),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("created   CONNTRACK")),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&run(&["-o", "json"])).unwrap();
    assert_eq!(json["reason"], "fwd_local");
    assert_eq!(json["out_ifindex"], VETH_A_IFINDEX);

    let out = Command::new(&bin)
        .args(["explain", "--pin-dir", "/sys/fs/bpf/lbx-no-such-instance"])
        .args(["--from", "10.0.0.9:1", "--to", "10.0.0.1:2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no lbx maps are pinned"), "{err}");
}
