//! The side-by-side lab (`lbx-lab`, what `cargo xtask lab` runs) end to end at small sizes:
//! real control plane, real kube-proxy (iptables) per node, the agents, 3 replicas of ui-nlb
//! over 2 nodes, loads of one second and a sweep of 1 and 20 Services. Asserts properties,
//! not speeds: every path answers, who sees which client address, netfilter untouched on
//! the XDP path, hops, the report files, and a teardown that leaves nothing behind. Then
//! `lab up` / `lab down`.
//!
//! Needs root. Run: `cargo test -p lbx-lab --release --test lab_compare -- --test-threads=1`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::netns;
use lbx_lab::report::{LabFootprint, LabReport, PATHS};

const LAB: &str = env!("CARGO_BIN_EXE_lbx-lab");

/// The per-path client addresses lbx-lab uses (see `path_sources` in src/paths.rs).
const INSTANCE_SOURCE: &str = "10.77.0.101";
/// The xdp path's client addresses, one per node frontend (`paths::path_sources`).
const XDP_SOURCES: [&str; 2] = ["10.77.0.102", "10.77.0.104"];
const IP_SOURCE: &str = "10.77.0.103";
/// The xdp path's again with the agents in `--remote-mode snat` (path `xdp-snat`).
const XDP_SNAT_SOURCES: [&str; 2] = ["10.77.0.120", "10.77.0.121"];
/// The agents' SNAT addresses (lb-tests' `snat_addr_of`): what a remote pod sees in SNAT
/// mode.
const SNAT_ADDRS: [&str; 2] = ["10.77.0.150", "10.77.0.151"];

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lbx-lab-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Nothing of the run is left: namespaces (and with them every link), processes, pins,
/// work directory.
fn assert_gone(fp: &LabFootprint) {
    assert!(
        fp.prefix.starts_with("lbx-"),
        "footprint names no prefix: {fp:?}"
    );
    let left = netns::list_with_prefix(&fp.prefix).unwrap();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!fp.pids.is_empty(), "the footprint lists no processes");
    for pid in &fp.pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        // A reused PID would be some other program: only ours count.
        let name = status.lines().next().unwrap_or_default().to_string();
        assert!(
            ![
                "lb-user",
                "lbx-podserver",
                "kube-apiserver",
                "kube-controller",
                "etcd",
                "kube-proxy"
            ]
            .iter()
            .any(|n| name.contains(n)),
            "process {pid} ({name}) is still running"
        );
    }
    for dir in fp.pin_dirs.iter().chain([&fp.workdir]) {
        assert!(!Path::new(dir).exists(), "{dir} is left behind");
    }
}

#[test]
fn compare_measures_three_paths_and_tears_everything_down() {
    let dir = out_dir("compare");
    let (json, html, svg) = (dir.join("lab.json"), dir.join("lab.html"), dir.join("svg"));
    let status = Command::new(LAB)
        .args([
            "compare",
            "--sweep",
            "1,20",
            "--duration",
            "1",
            "--sweep-duration",
            "1",
            "--sweep-rounds",
            "2",
        ])
        .args(["--warmup", "0.3", "--connections", "2", "--json"])
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .arg("--svg-dir")
        .arg(&svg)
        .status()
        .expect("lbx-lab runs");
    assert!(status.success(), "lbx-lab compare failed: {status}");

    let report: LabReport =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("the JSON parses");
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The field names, as written.
    for path in PATHS {
        for key in [
            "rps",
            "p50_us",
            "p90_us",
            "p99_us",
            "new_conn_rps",
            "hops",
            "client_ip_preserved",
            "cpu_us_per_req",
        ] {
            assert!(
                !raw["paths"][path][key].is_null(),
                "paths.{path}.{key} missing"
            );
        }
    }
    assert!(raw["sweep"].is_array());

    let replicas: BTreeSet<&str> = ["n0-p0", "n1-p0", "n0-p1"].into();
    assert_eq!(report.meta.remote_mode, "tunnel");
    assert_eq!(report.meta.other_remote_mode.as_deref(), Some("snat"));
    for path in PATHS.into_iter().chain(["xdp-snat"]) {
        let p = &report.paths[path];
        assert!(
            p.rps > 0.0 && p.new_conn_rps > 0.0,
            "{path} did not answer: {p:?}"
        );
        let requests: u64 = p.served_by.values().sum();
        assert!(
            p.errors * 100 <= requests,
            "{path}: {} errors in {requests} requests",
            p.errors
        );
        let served: BTreeSet<&str> = p.served_by.keys().map(String::as_str).collect();
        assert_eq!(served, replicas, "{path} should reach every replica");
        assert!(
            p.p50_us <= p.p90_us && p.p90_us <= p.p99_us,
            "{path}: {p:?}"
        );
        assert!(p.cpu_us_per_req > 0.0, "{path}: no CPU measured");
        assert!(!p.latency_cdf.is_empty() && !p.new_conn_latency_cdf.is_empty());
    }

    let (instance, xdp, ip) = (
        &report.paths["instance"],
        &report.paths["xdp"],
        &report.paths["ip"],
    );
    // Client addresses: ip mode always keeps it, and so does xdp (the agents' default
    // `--remote-mode tunnel`: a pod on the other node is reached through IP-in-IP with the
    // client's address, never SNAT); instance (kube-proxy masquerades NodePort traffic with
    // externalTrafficPolicy Cluster) never keeps it: pods see node addresses.
    assert!(ip.client_ip_preserved);
    assert_eq!(ip.client_ips_seen.keys().collect::<Vec<_>>(), [IP_SOURCE]);
    assert!(xdp.client_ip_preserved, "{:?}", xdp.client_ips_seen);
    assert_eq!(
        xdp.client_ips_seen.keys().collect::<Vec<_>>(),
        XDP_SOURCES,
        "xdp: pods saw {:?}",
        xdp.client_ips_seen
    );
    assert_eq!(xdp.client_ip_seen_fraction, 1.0);
    assert!(!instance.client_ip_preserved);
    assert_eq!(instance.client_ip_seen_fraction, 0.0);
    // MASQUERADE takes the address of the interface the packet leaves by: the node's
    // address towards the other node, the pod gateway's on the pod's veth.
    let node_side: BTreeSet<&str> = ["10.77.0.10", "10.77.0.11", "10.77.1.1", "10.77.2.1"].into();
    assert!(
        instance
            .client_ips_seen
            .keys()
            .all(|k| node_side.contains(k.as_str())),
        "instance: pods should see node addresses, saw {:?}",
        instance.client_ips_seen
    );
    assert!(!instance.client_ips_seen.contains_key(INSTANCE_SOURCE));
    for remote in ["10.77.0.10", "10.77.0.11"] {
        assert!(
            instance.client_ips_seen.contains_key(remote),
            "instance: cross-node requests should show node {remote}: {:?}",
            instance.client_ips_seen
        );
    }

    // Netfilter: the probe on every hook of every node never saw an xdp packet of the
    // client; it did see the instance path's (so it works).
    assert_eq!(xdp.nf_probe_packets, 0, "xdp packets touched netfilter");
    assert!(
        instance.nf_probe_packets > 0,
        "the probe saw no instance packet"
    );
    assert!(instance.nf_rule_hits_per_req > 0.0 && instance.nf_rules_installed > 0);
    // Which verdicts lbx gave: forwarding on the xdp path, none on the instance path.
    // Remote deliveries were tunnelled to the owning node, taken straight into the pod
    // there, and the replies tunnelled back and reverse-NATed (the probe above would have
    // counted any leg that met netfilter); nothing was SNATed.
    for reason in [
        "fwd_local",
        "fwd_tunnel",
        "tunnel_in",
        "tunnel_reply",
        "rev_nat_tunnel",
    ] {
        assert!(
            xdp.xdp_reasons.get(reason).copied().unwrap_or(0) > 0,
            "xdp counted no {reason}: {:?}",
            xdp.xdp_reasons
        );
    }
    for reason in [
        "fwd_remote",
        "fwd_peer",
        "pass_tunnel_peer",
        "pass_tunnel_inner",
    ] {
        assert_eq!(
            xdp.xdp_reasons.get(reason).copied().unwrap_or(0),
            0,
            "xdp counted {reason}: {:?}",
            xdp.xdp_reasons
        );
    }
    eprintln!(
        "xdp: netfilter rule hits/request {:.2}, instance {:.2}, ip {:.2}",
        xdp.nf_rule_hits_per_req, instance.nf_rule_hits_per_req, ip.nf_rule_hits_per_req
    );
    // kube-proxy's rules on either node: a remote delivery used to walk a dozen of them on
    // the owning node (12.7 per request in bench/lab-rerun.json); now no xdp packet meets one.
    assert!(
        xdp.nf_rule_hits_per_req < 1.0,
        "xdp requests hit {:.2} kube-proxy rules each",
        xdp.nf_rule_hits_per_req
    );
    assert!(
        instance.xdp_reasons.keys().all(|k| !k.starts_with("fwd_")),
        "{:?}",
        instance.xdp_reasons
    );

    // The same Service with the agents restarted in --remote-mode snat: local pods still
    // see the client, a pod on the other node sees the SNAT address of the node the
    // request came in through; forwarded (fwd_remote), not tunnelled, and still no
    // netfilter on either node (the owning node takes the peer's SNAT address in XDP).
    let snat = &report.paths["xdp-snat"];
    assert!(snat.client_ip_preserved, "{:?}", snat.client_ips_seen);
    let seen: BTreeSet<&str> = snat.client_ips_seen.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = XDP_SNAT_SOURCES.into_iter().chain(SNAT_ADDRS).collect();
    assert_eq!(seen, want, "xdp-snat: pods saw {:?}", snat.client_ips_seen);
    assert!(
        snat.client_ip_seen_fraction > 0.0 && snat.client_ip_seen_fraction < 1.0,
        "{}",
        snat.client_ip_seen_fraction
    );
    assert_eq!(
        snat.nf_probe_packets, 0,
        "xdp-snat packets touched netfilter"
    );
    for reason in ["fwd_local", "fwd_remote", "fwd_peer", "reply_peer"] {
        assert!(
            snat.xdp_reasons.get(reason).copied().unwrap_or(0) > 0,
            "xdp-snat counted no {reason}: {:?}",
            snat.xdp_reasons
        );
    }
    assert_eq!(
        snat.xdp_reasons.get("fwd_tunnel").copied().unwrap_or(0),
        0,
        "{:?}",
        snat.xdp_reasons
    );

    // Hops: one router (the pod's node) for ip mode and for local xdp delivery; two for a
    // pod behind the other node.
    assert_eq!(ip.hops_local, Some(1));
    assert_eq!(xdp.hops_local, ip.hops_local);
    assert_eq!(xdp.hops_remote, Some(2));
    assert_eq!(instance.hops_remote, Some(2));

    // Target lists: nodes for instance, pods for ip and xdp.
    let ids = |p: &lbx_lab::report::PathResult| -> BTreeSet<String> {
        p.targets
            .iter()
            .map(|t| format!("{}:{}", t.id, t.port))
            .collect()
    };
    assert_eq!(
        ids(instance),
        ["10.77.0.10:30080", "10.77.0.11:30080"]
            .map(String::from)
            .into()
    );
    let pods: BTreeSet<String> = ["10.77.1.10:8080", "10.77.1.11:8080", "10.77.2.10:8080"]
        .map(String::from)
        .into();
    assert_eq!(ids(ip), pods);
    assert_eq!(ids(xdp), pods);
    assert!(report
        .paths
        .values()
        .all(|p| p.targets.iter().all(|t| t.state == "healthy")));

    // Sweep: every path at both sizes, xdp-snat too.
    assert_eq!(report.sweep.len(), 8, "{:?}", report.sweep);
    for n in [1, 20] {
        let at: BTreeSet<&str> = report
            .sweep
            .iter()
            .filter(|s| s.services == n)
            .map(|s| s.path.as_str())
            .collect();
        assert_eq!(
            at,
            ["instance", "ip", "xdp", "xdp-snat"].into(),
            "{n} Services"
        );
    }
    for s in &report.sweep {
        assert!(s.new_conn_rps > 0.0 && s.p99_us > 0.0, "{s:?}");
        // Two rounds each; the point is their median.
        assert_eq!((s.rounds_rps.len(), s.rounds_p99_us.len()), (2, 2), "{s:?}");
        assert_eq!(s.new_conn_rps, lbx_lab::report::median(&s.rounds_rps));
    }
    // The targets are checked in the report (met or not: speeds are not asserted).
    for name in [
        "xdp failed requests over the whole run",
        "xdp requests whose pod saw the client's address",
        "xdp new_conn_rps / ip at 20 services",
    ] {
        assert!(
            report.targets.iter().any(|t| t.name.starts_with(name)),
            "no target {name:?}: {:?}",
            report.targets
        );
    }
    let seen = report
        .targets
        .iter()
        .find(|t| t.name.starts_with("xdp requests whose pod saw"))
        .unwrap();
    assert!(seen.met && seen.measured == 1.0, "{seen:?}");

    // Report files.
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert_eq!(page.matches("<svg").count(), 3);
    for name in [
        "latency-cdf.svg",
        "new-conn-vs-services.svg",
        "cpu-per-request.svg",
    ] {
        let text = std::fs::read_to_string(svg.join(name)).unwrap();
        assert!(
            text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
            "{name}"
        );
    }

    assert_gone(&report.footprint);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn up_keeps_the_lab_until_down() {
    let dir = out_dir("up");
    let log = dir.join("up.log");
    let mut up = Command::new(LAB)
        .args(["up", "--replicas", "2"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("lbx-lab up starts");
    let up_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let prefix = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(180).saturating_sub(started.elapsed()))
            .unwrap_or_else(|_| {
                let _ = up.kill();
                panic!("lab up printed no 'is up' line:\n{}", up_log())
            });
        if let Some(rest) = line.strip_prefix("The lab ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // It is up: the xdp path answers from the client namespace.
    let client = format!("{prefix}-client");
    assert!(netns::list_with_prefix(&prefix).unwrap().contains(&client));
    let answer = netns::in_netns(&client, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((Ipv4Addr::new(10, 77, 0, 10), 30080)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap();
    assert!(answer.contains("pod=n"), "{answer}");

    // Every hint it printed runs as printed, from the machine's own namespace (lab
    // addresses only inside lab namespaces, the API server through the loopback forwarder).
    let next = || {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("lab up stopped printing:\n{}", up_log()))
    };
    while next() != lbx_lab::HINTS_HEADER {}
    let mut hints = Vec::new();
    loop {
        let line = next();
        if line.trim().is_empty() {
            break;
        }
        let (command, what) = line
            .trim()
            .split_once(" # ")
            .unwrap_or_else(|| panic!("a hint without its comment: {line:?}"));
        hints.push((command.trim().to_string(), what.to_string()));
    }
    assert!(hints.len() >= 8, "{hints:?}");
    for (command, what) in &hints {
        let out = Command::new("timeout")
            .args(["60", "sh", "-c", command])
            .current_dir("/")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "hint {what:?} failed: {command}\n{}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !stdout.trim().is_empty(),
            "hint {what:?} printed nothing: {command}"
        );
        if command.contains(" curl ") {
            assert!(stdout.contains("pod=n"), "{what}: {stdout}");
        }
        eprintln!("hint ok: {what}");
    }
    assert!(
        hints
            .iter()
            .any(|(c, _)| c.contains("kubectl") && c.contains("accelerate=false")),
        "{hints:?}"
    );

    let down = Command::new(LAB).arg("down").status().unwrap();
    assert!(
        down.success(),
        "lab down failed; lab up's log:\n{}",
        up_log()
    );
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "lab up ended with {status}:\n{}",
        up_log()
    );
    let left = netns::list_with_prefix(&prefix).unwrap();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
