//! Plumbing checks for the namespace lab that the XDP tests build on: every pod is reachable
//! from the client and across nodes with the client address intact, the pod server answers
//! as documented, netinfo resolves local and remote backends, and nothing is left behind.
//! Needs root (CI runs as root); fails, never skips, without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::netns::{self, in_netns, ChildGuard, NetNs};
use lb_tests::topology::{Topology, TopologySpec};
use lb_user::node::netinfo::{self, NetinfoError};

const PODSERVER: &str = env!("CARGO_BIN_EXE_lbx-podserver");
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Starts a pod server in every pod, named after its namespace; waits until each listens.
fn start_podservers(topo: &Topology) -> Vec<ChildGuard> {
    let mut servers = Vec::new();
    for i in 0..topo.node_count() {
        for k in 0..topo.pod_count(i) {
            let ns = topo.pod_ns(i, k);
            let (tcp, udp) = (TCP_PORT.to_string(), UDP_PORT.to_string());
            let args = [PODSERVER, "--name", ns, "--tcp", &tcp, "--udp", &udp];
            let mut child = ChildGuard::spawn_in(ns, &args).expect("spawn podserver");
            let line = child
                .wait_for_line("ready", Duration::from_secs(10))
                .expect("podserver ready line");
            assert_eq!(
                line,
                format!("lbx-podserver ready name={ns} tcp={TCP_PORT} udp={UDP_PORT}")
            );
            servers.push(child);
        }
    }
    servers
}

/// Reads one HTTP response (headers + Content-Length body); returns (headers, body).
fn read_response(reader: &mut BufReader<TcpStream>) -> (String, String) {
    let mut headers = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read response line");
        assert!(n > 0, "connection closed mid-response; got {headers:?}");
        headers.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(headers.starts_with("HTTP/1.1 200 OK\r\n"), "{headers:?}");
    let len: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length header")
        .trim()
        .parse()
        .expect("numeric Content-Length");
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).expect("read body");
    (headers, String::from_utf8(body).expect("utf-8 body"))
}

/// Two keep-alive requests, one `Connection: close` and one raw (non-HTTP) request to
/// `addr`; every answer must name `pod` and the source address of the connection.
fn check_tcp(addr: Ipv4Addr, pod: &str, expect_src: Ipv4Addr) {
    let dst = SocketAddr::from((addr, TCP_PORT));
    let stream = TcpStream::connect_timeout(&dst, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("tcp connect to {dst} ({pod}): {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let local = stream.local_addr().unwrap();
    assert_eq!(local.ip(), expect_src, "source address towards {dst}");
    let expected = format!("pod={pod} client={local}\n");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..2 {
        writer
            .write_all(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
            .unwrap();
        let (headers, body) = read_response(&mut reader);
        assert!(headers.contains("Connection: keep-alive"), "{headers:?}");
        assert_eq!(body, expected, "keep-alive answer from {dst}");
    }
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (_, body) = read_response(&mut reader);
    assert_eq!(body, expected);
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("server closes after Connection: close");
    assert!(rest.is_empty(), "bytes after a closing response: {rest:?}");

    let mut raw = TcpStream::connect_timeout(&dst, IO_TIMEOUT).unwrap();
    raw.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let raw_local = raw.local_addr().unwrap();
    raw.write_all(b"hello\n").unwrap();
    let (_, body) = read_response(&mut BufReader::new(raw));
    assert_eq!(body, format!("pod={pod} client={raw_local}\n"));
}

/// One datagram to `addr`; the echo must name `pod`, our address and the TTL it arrived with.
fn check_udp(addr: Ipv4Addr, pod: &str, expect_src: Ipv4Addr, expect_ttl: u8) {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let dst = SocketAddr::from((addr, UDP_PORT));
    sock.connect(dst).unwrap();
    let local = sock.local_addr().unwrap();
    assert_eq!(local.ip(), expect_src, "source address towards {dst}");
    sock.send(b"ping").unwrap();
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("udp echo from {dst} ({pod}): {e}"));
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        format!("pod={pod} client={local} ttl={expect_ttl}\n")
    );
}

fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

#[test]
fn client_and_nodes_reach_every_pod_and_teardown_is_complete() {
    let root_sysctl = |key: &str| std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap();
    let root_before = root_sysctl("net/ipv6/conf/default/disable_ipv6");
    let topo = Topology::build(TopologySpec::default()).expect("build 2x2 topology");
    let prefix = topo.prefix().to_string();
    // Settings land in the lab namespaces, never in the root namespace.
    let ns_sysctl = |ns: &str, key: &str| netns::run(ns, &["sysctl", "-n", key]).unwrap();
    assert_eq!(
        ns_sysctl(topo.node_ns(1), "net.ipv4.ip_forward").trim(),
        "1"
    );
    assert_eq!(
        ns_sysctl(topo.node_ns(1), "net.ipv4.conf.p1.rp_filter").trim(),
        "0"
    );
    assert_eq!(
        ns_sysctl(topo.pod_ns(1, 1), "net.ipv6.conf.default.disable_ipv6").trim(),
        "1"
    );
    assert_eq!(
        root_sysctl("net/ipv6/conf/default/disable_ipv6"),
        root_before
    );
    assert_eq!(
        netns::list_with_prefix(&format!("{prefix}-"))
            .unwrap()
            .len(),
        8,
        "net, client, 2 nodes, 4 pods"
    );
    let servers = start_podservers(&topo);
    let pids: Vec<u32> = servers.iter().map(|s| s.pid()).collect();

    // ip mode: the client reaches every pod directly through VPC routes (one routed hop).
    let client = topo.client_addr();
    in_netns(topo.client_ns(), || {
        for i in 0..2 {
            for k in 0..2 {
                check_tcp(topo.pod_addr(i, k), topo.pod_ns(i, k), client);
                check_udp(topo.pod_addr(i, k), topo.pod_ns(i, k), client, 63);
            }
        }
    })
    .unwrap();

    // Node 0 reaches its own pods directly (TTL untouched) and node 1's via node 1.
    let n0 = topo.node_addr(0);
    in_netns(topo.node_ns(0), || {
        for k in 0..2 {
            check_tcp(topo.pod_addr(1, k), topo.pod_ns(1, k), n0);
            check_udp(topo.pod_addr(1, k), topo.pod_ns(1, k), n0, 63);
            let gw = topo.pod_gateway(0);
            check_udp(topo.pod_addr(0, k), topo.pod_ns(0, k), gw, 64);
        }
    })
    .unwrap();

    // The accessors describe what the kernel has: XDP tests rely on these values.
    let link = |ns: &str, dev: &str| -> serde_json::Value {
        let out = netns::ip(&["-n", ns, "-j", "link", "show", "dev", dev]).unwrap();
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
    };
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for i in 0..2 {
        let eth0 = link(topo.node_ns(i), "eth0");
        assert_eq!(eth0["ifindex"], topo.node_ifindex(i));
        assert_eq!(eth0["address"], mac(topo.node_mac(i)));
        for k in 0..2 {
            let host = link(topo.node_ns(i), topo.pod_host_ifname(i, k));
            assert_eq!(host["ifindex"], topo.pod_host_ifindex(i, k));
            assert_eq!(host["address"], mac(topo.pod_host_mac(i, k)));
            assert_eq!(
                link(topo.pod_ns(i, k), "eth0")["address"],
                mac(topo.pod_mac(i, k))
            );
            // Offloads the XDP tests depend on.
            let features = netns::run(topo.pod_ns(i, k), &["ethtool", "-k", "eth0"]).unwrap();
            assert!(features.contains("tx-checksumming: off"), "{features}");
            assert!(
                features.contains("generic-receive-offload: on"),
                "{features}"
            );
        }
        let port = format!("n{i}");
        let features = netns::run(topo.net_ns(), &["ethtool", "-k", &port]).unwrap();
        assert!(
            features.contains("generic-receive-offload: on"),
            "{features}"
        );
        assert!(features.contains("tx-checksumming: off"), "{features}");
    }
    assert_eq!(
        link(topo.client_ns(), "eth0")["address"],
        mac(topo.client_mac())
    );

    drop(servers);
    drop(topo);
    assert_eq!(
        netns::list_with_prefix(&format!("{prefix}-")).unwrap(),
        Vec::<String>::new(),
        "namespaces left after the topology dropped"
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "podserver pid {pid} still exists"
        );
    }
    assert_eq!(
        processes_mentioning(&format!("{prefix}-")),
        Vec::<u32>::new()
    );
}

#[test]
fn netinfo_resolves_local_and_remote_backends_from_a_node() {
    let topo = Topology::build(TopologySpec::default()).expect("build 2x2 topology");
    in_netns(topo.node_ns(0), || {
        // Fresh namespaces have empty neighbour tables: this also exercises the ARP trigger.
        let local = netinfo::resolve_backend(topo.pod_addr(0, 1)).expect("local pod");
        assert_eq!(
            local,
            netinfo::Delivery {
                ifindex: topo.pod_host_ifindex(0, 1),
                dmac: topo.pod_mac(0, 1),
                smac: topo.pod_host_mac(0, 1),
                local: true,
                gateway: None,
            }
        );
        let remote = netinfo::resolve_backend(topo.pod_addr(1, 0)).expect("remote pod");
        assert_eq!(
            remote,
            netinfo::Delivery {
                ifindex: topo.node_ifindex(0),
                dmac: topo.node_mac(1),
                smac: topo.node_mac(0),
                local: false,
                gateway: Some(topo.node_addr(1)),
            }
        );
        // A host-network backend on the other node: on our LAN subnet, so not local.
        let lan = netinfo::resolve_backend(topo.node_addr(1)).expect("other node");
        assert_eq!((lan.local, lan.gateway), (false, None));
        assert_eq!(lan.dmac, topo.node_mac(1));

        assert!(matches!(
            netinfo::resolve_backend(topo.node_addr(0)),
            Err(NetinfoError::LocalAddress { .. })
        ));
        assert!(matches!(
            netinfo::resolve_backend(Ipv4Addr::new(192, 0, 2, 1)),
            Err(NetinfoError::NoRoute { .. })
        ));

        assert_eq!(netinfo::ifindex("eth0").unwrap(), topo.node_ifindex(0));
        assert_eq!(netinfo::mac("eth0").unwrap(), topo.node_mac(0));
        assert_eq!(netinfo::mac("p0").unwrap(), topo.pod_host_mac(0, 0));
        assert_eq!(
            netinfo::ipv4_addrs("p0").unwrap(),
            vec![topo.pod_gateway(0)]
        );
        assert_eq!(
            netinfo::ipv4_addrs("eth0").unwrap(),
            vec![topo.node_addr(0)]
        );
        assert!(matches!(
            netinfo::ifindex("nosuchdev0"),
            Err(NetinfoError::NoSuchInterface { .. })
        ));
    })
    .unwrap();

    // A route to an address nobody answers ARP for: the error must say so, after ~1 s.
    let ghost = Ipv4Addr::new(10, 77, 1, 99);
    netns::ip(&[
        "-n",
        topo.node_ns(0),
        "route",
        "add",
        &format!("{ghost}/32"),
        "dev",
        "p0",
    ])
    .unwrap();
    in_netns(topo.node_ns(0), || {
        let start = Instant::now();
        match netinfo::resolve_backend(ghost) {
            Err(NetinfoError::NeighbourUnresolved { next_hop, dev, .. }) => {
                assert_eq!((next_hop, dev.as_str()), (ghost, "p0"));
            }
            other => panic!("expected NeighbourUnresolved, got {other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_millis(900));
    })
    .unwrap();
}

#[test]
fn stale_namespaces_of_dead_runs_are_removed() {
    // A pid that surely exited (and was reaped) stands in for a killed test run.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale_name = format!("lbx-{dead}-0-stale");
    let stale = NetNs::create(&stale_name).unwrap();
    std::mem::forget(stale); // as if the run died before its destructors ran
    let ours = NetNs::create(&format!("{}-live", netns::unique_prefix())).unwrap();

    netns::cleanup_stale().unwrap();
    let left = netns::list_with_prefix("lbx-").unwrap();
    if left.contains(&stale_name) {
        let _ = netns::ip(&["netns", "del", &stale_name]);
        panic!("{stale_name} survived cleanup_stale");
    }
    assert!(
        left.iter().any(|n| n == ours.name()),
        "a live run's namespace was removed"
    );
}

#[test]
fn child_guard_escalates_to_sigkill() {
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    // SAFETY: signal(2) is async-signal-safe; an ignored disposition survives exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut guard = ChildGuard::spawn(&mut cmd).unwrap();
    let pid = guard.pid();
    assert!(guard.is_running());
    let start = Instant::now();
    let status = guard.stop().expect("exit status");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "SIGTERM should have been ignored"
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn a_panicking_test_still_tears_everything_down() {
    let mut prefix = String::new();
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::build(TopologySpec::uniform(1, 1)).expect("build 1x1 topology");
        prefix = topo.prefix().to_string();
        let servers = start_podservers(&topo);
        pid = servers[0].pid();
        in_netns(topo.client_ns(), || panic!("simulated assertion failure")).unwrap();
    }));
    assert!(result.is_err(), "the closure was meant to panic");
    assert!(
        !prefix.is_empty() && pid != 0,
        "topology was not built before the panic"
    );
    assert_eq!(
        netns::list_with_prefix(&format!("{prefix}-")).unwrap(),
        Vec::<String>::new()
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
