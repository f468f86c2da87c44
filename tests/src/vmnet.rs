//! Native XDP on a real driver: `lb-user standalone --xdp-mode native` on a virtio-net NIC
//! inside a qemu guest, with real connections from the host.
//!
//! The two halves run in different kernels: `cargo xtask test --kernels` boots each kernel
//! of the matrix with a virtio-net NIC whose backend is a tap device in a host namespace
//! (`lbx-*`), runs [`guest`] inside the guest and [`client`] in that host namespace.
//!
//! - guest: the NIC (driver virtio_net, checked) gets [`GUEST_ADDR`]; two pods are network
//!   namespaces behind veths, each running `lbx-podserver`; the real agent runs on the NIC
//!   in native mode from a manifest (the lab's `demo/echo` Service: nodePorts 30080/TCP and
//!   30053/UDP), then the guest prints [`READY_MARKER`] and answers one report request on
//!   [`CONTROL_PORT`] with the agent's counters, the driver's statistics and the NIC's XDP
//!   attachment as the kernel reports it.
//! - client (host namespace, [`HOST_ADDR`]): TCP connections and UDP queries to the guest's
//!   nodePorts must reach both pods with the client's own address (local delivery keeps it)
//!   and come back from the nodePort (a connected socket accepts nothing else: the replies
//!   were reverse-NATed); then the report must show native XDP: the kernel's attachment in
//!   driver mode, and the driver's own XDP redirect counter equal to the agent's `fwd_local`
//!   (virtio_net counts XDP verdicts only on its native path).
//!
//! The client prints libtest-style lines, so the runner counts its checks like tests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::{self, ip, ChildGuard, NetNs, NetnsError};
use crate::scenario::{
    manifest, EndpointSpec, PodId, ReadyLine, TCP_NODE_PORT, TCP_TARGET_PORT, UDP_NODE_PORT,
    UDP_TARGET_PORT,
};

/// The guest NIC's address (the node address NodePorts match).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);
/// The host end of the tap, in the client namespace.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
pub const PREFIX_LEN: u8 = 24;
/// The guest NIC's MAC (locally administered).
pub const GUEST_MAC: &str = "02:78:00:00:00:0a";
/// Where the guest answers the client's report request (not a Service port: lbx passes it).
pub const CONTROL_PORT: u16 = 7070;
/// What the guest prints once the agent is ready and the control port listens.
pub const READY_MARKER: &str = "lbx-vmnet: guest ready";
/// Pods behind the guest's node.
const PODS: usize = 2;
/// The Kubernetes node name of the guest.
const NODE: &str = "n0";
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const PODSERVER_READY: Duration = Duration::from_secs(30);
const AGENT_READY: Duration = Duration::from_secs(180);
/// New TCP connections and UDP queries the client sends.
const TCP_FLOWS: usize = 16;
const UDP_FLOWS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum VmnetError {
    #[error("{step}: {source}")]
    Netns {
        step: String,
        #[source]
        source: NetnsError,
    },
    #[error("{what}: {detail}")]
    Check { what: String, detail: String },
    #[error("{what} ({}): {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn step<T>(what: impl Into<String>, r: Result<T, NetnsError>) -> Result<T, VmnetError> {
    r.map_err(|source| VmnetError::Netns {
        step: what.into(),
        source,
    })
}

fn check(what: impl Into<String>, detail: impl Into<String>) -> VmnetError {
    VmnetError::Check {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Address of pod `k` behind the guest, and the pods' gateway (held by every `p<k>`).
pub fn pod_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, 1, 10 + k as u8)
}
const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 1);

/// The guest half. `agent` and `podserver` are the host-built binaries.
pub struct GuestOptions {
    pub iface: String,
    pub agent: PathBuf,
    pub podserver: PathBuf,
    /// How long to wait for the client's report request.
    pub wait: Duration,
}

/// Removes a directory on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the guest half until the client has its report (see the module docs).
pub fn guest(opts: &GuestOptions) -> Result<(), VmnetError> {
    step("checking prerequisites", netns::preflight())?;
    let nic = opts.iface.as_str();
    let driver = step(
        format!("reading the driver of {nic}"),
        netns::output(Command::new("ethtool").args(["-i", nic])),
    )?;
    let driver = parse_driver(&driver).unwrap_or_default();
    if driver != "virtio_net" {
        return Err(check(
            format!("the guest NIC {nic}"),
            format!("has driver {driver:?}, not virtio_net"),
        ));
    }
    let cidr = format!("{GUEST_ADDR}/{PREFIX_LEN}");
    step(
        "addressing the NIC",
        ip(&["addr", "add", &cidr, "dev", nic]),
    )?;
    step("bringing the NIC up", ip(&["link", "set", nic, "up"]))?;
    for (key, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ] {
        let path = Path::new("/proc/sys").join(key);
        std::fs::write(&path, value).map_err(|source| VmnetError::Io {
            what: "setting a sysctl".into(),
            path,
            source,
        })?;
    }

    let prefix = netns::unique_prefix();
    let mut pods = Vec::new();
    for k in 0..PODS {
        pods.push(make_pod(&prefix, k)?);
    }
    let mut servers = Vec::new();
    for (k, ns) in pods.iter().enumerate() {
        let name = format!("{NODE}-p{k}");
        let mut server = step(
            format!("starting the pod server of {name}"),
            ChildGuard::spawn_in(
                ns.name(),
                &[
                    opts.podserver.to_string_lossy().as_ref(),
                    "--name",
                    &name,
                    "--tcp",
                    &TCP_TARGET_PORT.to_string(),
                    "--udp",
                    &UDP_TARGET_PORT.to_string(),
                ],
            ),
        )?;
        step(
            format!("waiting for the pod server of {name}"),
            server.wait_for_line("ready", PODSERVER_READY),
        )?;
        servers.push(server);
    }

    let work = TempDir(std::env::temp_dir().join(&prefix));
    std::fs::create_dir_all(&work.0).map_err(|source| VmnetError::Io {
        what: "creating the work directory".into(),
        path: work.0.clone(),
        source,
    })?;
    let config = work.0.join(format!("{NODE}.yaml"));
    let endpoints: Vec<EndpointSpec> = (0..PODS)
        .map(|pod| EndpointSpec::ready(PodId { node: 0, pod }))
        .collect();
    let text = manifest(&endpoints, |p| pod_addr(p.pod));
    std::fs::write(&config, text).map_err(|source| VmnetError::Io {
        what: "writing the agent's manifest".into(),
        path: config.clone(),
        source,
    })?;
    let pin_dir = format!("/sys/fs/bpf/lbx/{prefix}-{NODE}");
    let mut agent_cmd = Command::new(&opts.agent);
    #[rustfmt::skip]
    agent_cmd.args([
        "standalone",
        "--config", &config.to_string_lossy(),
        "--iface", nic,
        "--node-name", NODE,
        "--node-addr", &GUEST_ADDR.to_string(),
        "--xdp-mode", "native",
        "--pin-dir", &pin_dir,
    ]);
    let mut agent = step("starting the agent", ChildGuard::spawn(&mut agent_cmd))?;
    let line = step(
        "waiting for the agent",
        agent.wait_for_line("lbx: ready ", AGENT_READY),
    )?;
    let ready = ReadyLine::parse(&line).map_err(|e| check("the agent's ready line", e))?;
    if ready.mode != "native" {
        return Err(check(
            "the agent's ready line",
            format!("says mode={}, expected native: {line}", ready.mode),
        ));
    }

    let control = SocketAddrV4::new(GUEST_ADDR, CONTROL_PORT);
    let listener = TcpListener::bind(control).map_err(|source| VmnetError::Io {
        what: format!("listening on {control}"),
        path: PathBuf::new(),
        source,
    })?;
    println!("{READY_MARKER}: {line}");
    let _ = std::io::stdout().flush();
    let mut conn = accept_within(&listener, opts.wait)?;
    let mut request = String::new();
    BufReader::new(&conn)
        .read_line(&mut request)
        .map_err(|source| VmnetError::Io {
            what: "reading the client's request".into(),
            path: PathBuf::new(),
            source,
        })?;
    if request.trim() != "report" {
        return Err(check("the client's request", format!("{request:?}")));
    }
    let report = guest_report(nic, &line, &opts.agent, &pin_dir)?;
    println!("lbx-vmnet: report: {report}");
    conn.write_all(format!("{report}\n").as_bytes())
        .map_err(|source| VmnetError::Io {
            what: "sending the report".into(),
            path: PathBuf::new(),
            source,
        })?;
    // The client closes when it has read the report.
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.read(&mut [0u8; 16]);

    let status = agent.stop();
    drop(servers);
    drop(pods);
    if !status.is_some_and(|s| s.success()) {
        return Err(check(
            "the agent",
            format!("exited with {status:?} on SIGTERM"),
        ));
    }
    if Path::new(&pin_dir).exists() {
        return Err(check("the agent's teardown", format!("left {pin_dir}")));
    }
    println!("lbx-vmnet: guest done: agent stopped, pods and pins removed");
    Ok(())
}

fn accept_within(listener: &TcpListener, wait: Duration) -> Result<TcpStream, VmnetError> {
    let io = |source| VmnetError::Io {
        what: "waiting for the client".into(),
        path: PathBuf::new(),
        source,
    };
    listener.set_nonblocking(true).map_err(io)?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).map_err(io)?;
                conn.set_read_timeout(Some(IO_TIMEOUT * 6)).map_err(io)?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > wait {
                    return Err(check(
                        "the client",
                        format!("did not ask for the report within {wait:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(io(e)),
        }
    }
}

/// A pod: namespace `<prefix>-p<k>`, veth `p<k>` (node side, holds the gateway) to its
/// `eth0`, offloads as in the lab topology (TX checksums complete, GRO on the pod side so
/// XDP redirects into it work).
fn make_pod(prefix: &str, k: usize) -> Result<NetNs, VmnetError> {
    let ns = step(
        format!("creating pod namespace {k}"),
        NetNs::create(&format!("{prefix}-p{k}")),
    )?;
    let n = ns.name().to_string();
    let host_if = format!("p{k}");
    let addr = pod_addr(k);
    let run = |what: &str, args: &[&str]| step(format!("{what} (pod {k})"), ip(args).map(drop));
    #[rustfmt::skip]
    run("creating the veth", &["link", "add", &host_if, "type", "veth",
                                "peer", "name", "eth0", "netns", &n])?;
    run(
        "addressing the gateway",
        &["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", &host_if],
    )?;
    run("bringing the veth up", &["link", "set", &host_if, "up"])?;
    run(
        "routing the pod",
        &["route", "add", &format!("{addr}/32"), "dev", &host_if],
    )?;
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{host_if}/rp_filter"), "0").map_err(
        |source| VmnetError::Io {
            what: "disabling rp_filter".into(),
            path: PathBuf::from(&host_if),
            source,
        },
    )?;
    run(
        "addressing the pod",
        &[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "eth0",
        ],
    )?;
    run(
        "bringing the pod up",
        &["-n", &n, "link", "set", "eth0", "up"],
    )?;
    run(
        "bringing the pod's lo up",
        &["-n", &n, "link", "set", "lo", "up"],
    )?;
    #[rustfmt::skip]
    run("routing to the gateway", &["-n", &n, "route", "add", &format!("{POD_GATEWAY}/32"),
                                     "dev", "eth0", "scope", "link"])?;
    #[rustfmt::skip]
    run("the pod's default route", &["-n", &n, "route", "add", "default",
                                      "via", &POD_GATEWAY.to_string(), "dev", "eth0"])?;
    step(
        format!("offloads of {host_if}"),
        netns::output(Command::new("ethtool").args(["-K", &host_if, "tx", "off"])),
    )?;
    step(
        format!("offloads of pod {k}"),
        netns::run(&n, &["ethtool", "-K", "eth0", "tx", "off", "gro", "on"]),
    )?;
    Ok(ns)
}

/// The report the client checks: one JSON line.
fn guest_report(
    nic: &str,
    ready_line: &str,
    agent: &Path,
    pin_dir: &str,
) -> Result<serde_json::Value, VmnetError> {
    let counters = step(
        "reading the agent's counters",
        netns::output(Command::new(agent).args(["counters", "-o", "json", "--pin-dir", pin_dir])),
    )?;
    let counters: serde_json::Value = serde_json::from_str(&counters)
        .map_err(|e| check("the agent's counters", format!("{e}: {counters}")))?;
    let stats = step(
        format!("reading the driver's statistics of {nic}"),
        netns::output(Command::new("ethtool").args(["-S", nic])),
    )?;
    let link = step(
        format!("reading {nic}'s XDP attachment"),
        ip(&["-j", "-d", "link", "show", "dev", nic]),
    )?;
    let link: serde_json::Value =
        serde_json::from_str(&link).map_err(|e| check("`ip -j -d link`", e.to_string()))?;
    Ok(serde_json::json!({
        "kernel": lb_user::bpf::kernel_features::kernel_release(),
        "ready_line": ready_line,
        "counters": counters,
        "driver_stats": parse_ethtool_stats(&stats),
        "xdp": link[0]["xdp"],
    }))
}

/// `driver: virtio_net` from `ethtool -i`.
fn parse_driver(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("driver:"))
        .map(|d| d.trim().to_string())
}

/// `ethtool -S` as name -> value (lines `     name: value` after the header).
pub fn parse_ethtool_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().rsplit_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The sum over receive queues of the driver counter `suffix`: virtio_net names them
/// `rx_queue_<n>_<suffix>` (6.1) or `rx<n>_<suffix>` (6.12, which also reports the total as
/// `rx_<suffix>`, used only when there are no per-queue counters).
pub fn sum_stats(stats: &BTreeMap<String, u64>, suffix: &str) -> Option<u64> {
    let per_queue: Vec<u64> = stats
        .iter()
        .filter(|(k, _)| {
            k.strip_suffix(suffix)
                .and_then(|k| k.strip_suffix('_'))
                .is_some_and(|queue| {
                    queue.starts_with("rx") && queue.ends_with(|c: char| c.is_ascii_digit())
                })
        })
        .map(|(_, v)| *v)
        .collect();
    if per_queue.is_empty() {
        stats.get(&format!("rx_{suffix}")).copied()
    } else {
        Some(per_queue.iter().sum())
    }
}

/// One check of the client: its name and outcome.
type Outcome = (&'static str, Result<String, String>);

/// The host half: runs every check, prints libtest-style lines and returns whether all
/// passed.
pub fn client(guest: Ipv4Addr) -> bool {
    let mut outcomes: Vec<Outcome> = Vec::new();
    let tcp = tcp_flows(guest);
    outcomes.push(("tcp_nodeport_reaches_both_pods_with_the_client_ip", tcp));
    outcomes.push(("udp_replies_come_back_from_the_nodeport", udp_flows(guest)));
    let report = fetch_report(guest);
    match report {
        Ok(report) => {
            outcomes.push(("xdp_attached_in_driver_mode", check_attach(&report)));
            outcomes.push((
                "driver_xdp_counters_match_the_agents_counters",
                check_counters(&report),
            ));
        }
        Err(e) => {
            outcomes.push(("xdp_attached_in_driver_mode", Err(e.clone())));
            outcomes.push(("driver_xdp_counters_match_the_agents_counters", Err(e)));
        }
    }
    println!("\nrunning {} tests", outcomes.len());
    let mut failed = Vec::new();
    for (name, result) in &outcomes {
        match result {
            Ok(detail) => println!("test native_xdp::{name} ... ok ({detail})"),
            Err(e) => {
                println!("test native_xdp::{name} ... FAILED");
                failed.push((name, e));
            }
        }
    }
    for (name, e) in &failed {
        println!("\n---- native_xdp::{name} ----\n{e}");
    }
    let passed = outcomes.len() - failed.len();
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; 0 filtered out\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len()
    );
    failed.is_empty()
}

/// An HTTP GET on a new connection; the pod server's body is `pod=NAME client=ADDR`.
fn http_get(target: SocketAddrV4) -> Result<(TcpStream, SocketAddrV4, String), String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(target), IO_TIMEOUT)
        .map_err(|e| format!("connect to {target}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let local = match stream.local_addr().map_err(|e| e.to_string())? {
        SocketAddr::V4(a) => a,
        other => return Err(format!("local address {other}")),
    };
    let req = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    (&stream)
        .write_all(req.as_bytes())
        .map_err(|e| format!("request to {target}: {e}"))?;
    let mut response = String::new();
    (&stream)
        .read_to_string(&mut response)
        .map_err(|e| format!("response from {target}: {e}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .ok_or_else(|| format!("no HTTP body from {target}: {response:?}"))?;
    Ok((stream, local, body))
}

/// `pod=NAME client=ADDR[ ttl=N]` -> (pod, client address).
fn parse_answer(body: &str) -> Result<(String, SocketAddrV4), String> {
    let mut pod = None;
    let mut client = None;
    for field in body.split_whitespace() {
        match field.split_once('=') {
            Some(("pod", v)) => pod = Some(v.to_string()),
            Some(("client", v)) => {
                client = Some(v.parse().map_err(|e| format!("client={v}: {e}"))?)
            }
            _ => {}
        }
    }
    Ok((
        pod.ok_or_else(|| format!("no pod= in {body:?}"))?,
        client.ok_or_else(|| format!("no client= in {body:?}"))?,
    ))
}

fn expected_pods() -> BTreeSet<String> {
    (0..PODS).map(|k| format!("{NODE}-p{k}")).collect()
}

fn tcp_flows(guest: Ipv4Addr) -> Result<String, String> {
    let target = SocketAddrV4::new(guest, TCP_NODE_PORT);
    let mut seen = BTreeMap::<String, usize>::new();
    // Held until all are done: every connection is a distinct flow.
    let mut held = Vec::new();
    for i in 0..TCP_FLOWS {
        let (stream, local, body) = http_get(target).map_err(|e| format!("connection {i}: {e}"))?;
        let (pod, client) = parse_answer(&body)?;
        if client != local {
            return Err(format!(
                "connection {i} from {local}: pod {pod} saw client {client} (client IP not kept)"
            ));
        }
        *seen.entry(pod).or_default() += 1;
        held.push(stream);
    }
    let pods: BTreeSet<String> = seen.keys().cloned().collect();
    if pods != expected_pods() {
        return Err(format!(
            "{TCP_FLOWS} connections reached {seen:?}, not both pods"
        ));
    }
    Ok(format!(
        "{TCP_FLOWS} connections to {target}: {seen:?}, client IP kept"
    ))
}

fn udp_flows(guest: Ipv4Addr) -> Result<String, String> {
    let target = SocketAddrV4::new(guest, UDP_NODE_PORT);
    let mut seen = BTreeMap::<String, usize>::new();
    let mut held = Vec::new();
    for i in 0..UDP_FLOWS {
        let sock = UdpSocket::bind((HOST_ADDR, 0)).map_err(|e| format!("bind: {e}"))?;
        sock.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        sock.send_to(b"lbx", target)
            .map_err(|e| format!("query {i} to {target}: {e}"))?;
        let mut buf = [0u8; 512];
        // Not connected: the reply's source is checked here, not filtered by the kernel.
        let (n, from) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("query {i} to {target}: no reply: {e}"))?;
        if from != SocketAddr::V4(target) {
            return Err(format!(
                "query {i}: the reply came from {from}, not the nodePort {target} (no reverse NAT)"
            ));
        }
        let (pod, _) = parse_answer(&String::from_utf8_lossy(&buf[..n]))?;
        *seen.entry(pod).or_default() += 1;
        held.push(sock);
    }
    let pods: BTreeSet<String> = seen.keys().cloned().collect();
    if pods != expected_pods() {
        return Err(format!(
            "{UDP_FLOWS} queries reached {seen:?}, not both pods"
        ));
    }
    Ok(format!(
        "{UDP_FLOWS} queries answered from {target}: {seen:?}"
    ))
}

fn fetch_report(guest: Ipv4Addr) -> Result<serde_json::Value, String> {
    let control = SocketAddrV4::new(guest, CONTROL_PORT);
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(control), IO_TIMEOUT)
        .map_err(|e| format!("connect to the guest's control port {control}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT * 6))
        .map_err(|e| e.to_string())?;
    (&stream)
        .write_all(b"report\n")
        .map_err(|e| format!("asking for the report: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading the report: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("the report is not JSON ({e}): {line:?}"))
}

/// `ip -d link`'s `xdp.mode`: 1 = XDP_ATTACHED_DRV (native), 2 = SKB (generic).
fn check_attach(report: &serde_json::Value) -> Result<String, String> {
    let ready = report["ready_line"].as_str().unwrap_or_default();
    if !ready.contains(" mode=native ") {
        return Err(format!("the agent's ready line is not native: {ready:?}"));
    }
    match report["xdp"]["mode"].as_u64() {
        Some(1) => Ok(format!(
            "kernel reports XDP mode 1 (driver), prog id {}",
            report["xdp"]["prog"]["id"]
        )),
        other => Err(format!(
            "the kernel reports XDP {:?} on the NIC (mode {other:?}), not driver mode 1",
            report["xdp"]
        )),
    }
}

fn counter(report: &serde_json::Value, reason: &str) -> Option<u64> {
    report["counters"]["counters"]
        .as_array()?
        .iter()
        .find(|c| c["reason"] == reason)?["count"]
        .as_u64()
}

fn check_counters(report: &serde_json::Value) -> Result<String, String> {
    let stats: BTreeMap<String, u64> = serde_json::from_value(report["driver_stats"].clone())
        .map_err(|e| format!("driver_stats: {e}"))?;
    let fwd_local = counter(report, "fwd_local")
        .ok_or_else(|| format!("no fwd_local counter in {}", report["counters"]))?;
    let rev_nat = counter(report, "rev_nat_local")
        .ok_or_else(|| format!("no rev_nat_local counter in {}", report["counters"]))?;
    let redirects = sum_stats(&stats, "xdp_redirects")
        .ok_or_else(|| format!("the driver reports no xdp_redirects counters: {stats:?}"))?;
    let xdp_packets = sum_stats(&stats, "xdp_packets").unwrap_or(0);
    // Every request packet of every flow: a SYN, the request, ACKs and the FIN at least.
    let least = (3 * TCP_FLOWS + UDP_FLOWS) as u64;
    if fwd_local < least {
        return Err(format!(
            "the agent counted {fwd_local} fwd_local packets, fewer than the {least} sent"
        ));
    }
    if rev_nat < least {
        return Err(format!(
            "the agent counted {rev_nat} rev_nat_local replies, fewer than {least}"
        ));
    }
    if redirects != fwd_local {
        return Err(format!(
            "virtio_net counted {redirects} XDP redirects, the agent {fwd_local} fwd_local: \
             the packets did not all take the driver's native XDP path"
        ));
    }
    Ok(format!(
        "fwd_local {fwd_local} = virtio_net xdp_redirects {redirects} (xdp_packets \
         {xdp_packets}), rev_nat_local {rev_nat}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethtool_stats_parsed_and_summed_per_queue() {
        let text = "NIC statistics:\n     rx_queue_0_packets: 52\n     rx_queue_0_xdp_redirects: 40\n     rx_queue_1_xdp_redirects: 2\n     tx_queue_0_xdp_tx: 0\n";
        let stats = parse_ethtool_stats(text);
        assert_eq!(stats["rx_queue_0_packets"], 52);
        assert_eq!(sum_stats(&stats, "xdp_redirects"), Some(42));
        assert_eq!(sum_stats(&stats, "xdp_drops"), None);
        // 6.12: per-queue counters and their total; the total is not counted twice.
        let text = "NIC statistics:\n     rx0_xdp_redirects: 34\n     rx1_xdp_redirects: 66\n     rx_xdp_redirects: 100\n     tx0_xdp_tx: 0\n";
        let stats = parse_ethtool_stats(text);
        assert_eq!(sum_stats(&stats, "xdp_redirects"), Some(100));
        let total_only = parse_ethtool_stats("     rx_xdp_redirects: 7\n");
        assert_eq!(sum_stats(&total_only, "xdp_redirects"), Some(7));
    }

    #[test]
    fn driver_and_answers_parsed() {
        assert_eq!(
            parse_driver("driver: virtio_net\nversion: 1.0.0\n").as_deref(),
            Some("virtio_net")
        );
        let (pod, client) = parse_answer("pod=n0-p1 client=10.78.0.1:40000").unwrap();
        assert_eq!(pod, "n0-p1");
        assert_eq!(client, SocketAddrV4::new(HOST_ADDR, 40000));
        assert!(parse_answer("client=10.78.0.1:1").is_err());
    }

    fn report(mode: u64, fwd: u64, redirects: u64) -> serde_json::Value {
        serde_json::json!({
            "ready_line": "lbx: ready node=n0 iface=eth0 mode=native frontends=3 backends=2",
            "xdp": {"mode": mode, "prog": {"id": 7}},
            "counters": {"counters": [
                {"reason": "fwd_local", "count": fwd},
                {"reason": "rev_nat_local", "count": fwd},
            ]},
            "driver_stats": {"rx_queue_0_xdp_redirects": redirects, "rx_queue_0_xdp_packets": fwd + 3},
        })
    }

    #[test]
    fn native_mode_needs_driver_attachment_and_matching_counters() {
        assert!(check_attach(&report(1, 60, 60)).is_ok());
        assert!(check_attach(&report(2, 60, 60))
            .unwrap_err()
            .contains("not driver mode 1"));
        assert!(check_counters(&report(1, 60, 60)).is_ok());
        assert!(check_counters(&report(1, 60, 0))
            .unwrap_err()
            .contains("native XDP path"));
        assert!(check_counters(&report(1, 3, 3))
            .unwrap_err()
            .contains("fewer than"));
    }
}
