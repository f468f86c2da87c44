//! `lb-user`: the lbx node agent (`agent`, or `standalone` from a file) and the operator CLI that reads a running
//! instance's pinned maps (`counters`, `conntrack`, `targets`, `explain`).
//!
//! Exit codes: 0 ok, 1 error, 2 usage (clap).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_common::{DEFAULT_MAGLEV_SIZE, PROTO_TCP, PROTO_UDP};
use lb_user::agent::{self, AgentOptions};
use lb_user::dataplane::{DataplaneOptions, XdpModeChoice};
use lb_user::inspect::{
    self, CountersReport, Explanation, FlowRow, FrontendTargets, Located, MapsView, PinnedMaps,
    Probe,
};
use lb_user::runtime::{NodeOptions, PortRange};
use lb_user::standalone_run::{self, StandaloneOptions};

#[derive(Parser, Debug)]
#[command(
    name = "lb-user",
    version,
    about = "lbx: XDP load balancing for Kubernetes NodePort and LoadBalancer Services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The node agent: run the data plane on one interface, driven by the API server.
    Agent(AgentArgs),
    /// Run the data plane on one interface, driven by a manifest file (no API server).
    Standalone(StandaloneArgs),
    /// Packet counters of a running instance, one per verdict reason.
    Counters(ReadArgs),
    /// Tracked flows: client -> frontend -> backend.
    Conntrack(ReadArgs),
    /// Per frontend, its backends with state, location and share of new flows.
    Targets(ReadArgs),
    /// Predict, step by step, what the XDP program does with one packet.
    Explain(ExplainArgs),
}

/// The data-plane flags `standalone` and `agent` share.
#[derive(Args, Debug)]
struct NodeArgs {
    /// Interface to attach XDP to (the node's NIC).
    #[arg(long)]
    iface: String,
    /// This node's name: endpoints with this nodeName are local pods.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Address NodePorts match (repeatable, at most 4) [default: the IPv4 addresses of --iface].
    #[arg(long = "node-addr", value_name = "IP")]
    node_addrs: Vec<Ipv4Addr>,
    /// Source address towards remote backends [default: the first node address].
    #[arg(long, value_name = "IP")]
    snat_addr: Option<Ipv4Addr>,
    /// Another node's --snat-addr (repeatable): its forwarded requests to local pods and
    /// their replies bypass netfilter here [default: the other nodes' InternalIPs].
    #[arg(long = "peer-snat-addr", value_name = "IP")]
    peer_snat_addrs: Vec<Ipv4Addr>,
    /// XDP attach mode: auto tries native, then generic.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto)]
    xdp_mode: XdpModeChoice,
    /// Where to pin the maps [default: /sys/fs/bpf/lbx/<node-name>].
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Service ports that can have a Maglev ring at once.
    #[arg(long, default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_services: u32,
    /// Backend ids: one per endpoint of every service port (10 000 Services of 10
    /// endpoints need 100 000).
    #[arg(long, default_value_t = DataplaneOptions::default().max_backends, value_name = "N",
          value_parser = clap::value_parser!(u32).range(2..))]
    max_backends: u32,
    /// Maglev ring size per service port (a prime).
    #[arg(long, default_value_t = DEFAULT_MAGLEV_SIZE, value_name = "M")]
    maglev_size: u32,
    /// Source ports for SNAT towards remote backends.
    #[arg(long, default_value = "61000-65535", value_name = "MIN-MAX")]
    snat_ports: PortRange,
    /// Leave the pinned maps in place on exit (a restart then keeps the tracked flows).
    #[arg(long)]
    keep_pins: bool,
}

impl NodeArgs {
    fn options(self) -> NodeOptions {
        NodeOptions {
            iface: self.iface,
            node_name: self.node_name,
            node_addrs: self.node_addrs,
            snat_addr: self.snat_addr,
            peer_snat_addrs: self.peer_snat_addrs,
            xdp_mode: self.xdp_mode,
            pin_dir: self.pin_dir,
            max_services: self.max_services,
            max_backends: self.max_backends,
            maglev_size: self.maglev_size,
            snat_ports: self.snat_ports,
            keep_pins: self.keep_pins,
        }
    }
}

#[derive(Args, Debug)]
struct StandaloneArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Services and EndpointSlices (YAML or JSON, as `kubectl get -o yaml` prints them).
    #[arg(long)]
    config: PathBuf,
    /// How often to check the file for changes and retry unresolved backends.
    #[arg(long, default_value_t = 500, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    resync_ms: u64,
}

#[derive(Args, Debug)]
struct AgentArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// kubeconfig to reach the API server [default: the pod's ServiceAccount in a cluster,
    /// else $KUBECONFIG or ~/.kube/config].
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Also accelerate Services labelled service.kubernetes.io/service-proxy-name=<NAME>
    /// (Services with any other proxy name are left alone, like kube-proxy does).
    #[arg(long, value_name = "NAME")]
    proxy_name: Option<String>,
    /// Address the healthCheckNodePort servers (externalTrafficPolicy Local) listen on.
    #[arg(long, default_value = "0.0.0.0", value_name = "IP")]
    healthz_bind_address: IpAddr,
    /// How long to collect API changes before one apply.
    #[arg(long, default_value_t = 5, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    batch_ms: u64,
}

/// Which running instance to read.
#[derive(Args, Debug)]
struct InstanceArgs {
    /// The instance's pin directory.
    #[arg(long, value_name = "DIR", conflicts_with = "node_name")]
    pin_dir: Option<PathBuf>,
    /// The instance's --node-name (pins under /sys/fs/bpf/lbx/<name>). Without either flag:
    /// the only instance running.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
struct ReadArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// The packet's source, IPv4:PORT.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_endpoint)]
    from: SocketAddrV4,
    /// The packet's destination, IPv4:PORT.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_endpoint)]
    to: SocketAddrV4,
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    proto: Proto,
    /// Treat the packet as a TCP SYN. Only a SYN starts a TCP flow that has no entry
    /// (without it, such a packet is left to the kernel), and a SYN on a tracked flow whose
    /// backend is terminating reselects.
    #[arg(long)]
    syn: bool,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// `IPv4:PORT`, with a message that shows the expected form.
fn parse_endpoint(s: &str) -> Result<SocketAddrV4, String> {
    if s.starts_with('[') {
        return Err(format!("{s:?}: IPv6 is not supported yet; give IPv4:PORT"));
    }
    let (ip, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} has no port; give IPv4:PORT, e.g. 10.0.0.9:40000"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| {
        format!("{ip:?} is not an IPv4 address; give IPv4:PORT, e.g. 10.0.0.9:40000")
    })?;
    let port: u16 = port.parse().map_err(|_| {
        format!("{port:?} is not a port (0-65535); give IPv4:PORT, e.g. 10.0.0.9:40000")
    })?;
    Ok(SocketAddrV4::new(ip, port))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-user: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause whose text the message
/// already includes (many of our errors embed their source for the log's sake).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Standalone(a) => {
            let opts = StandaloneOptions {
                node: a.node.options(),
                config: a.config,
                resync: Duration::from_millis(a.resync_ms),
            };
            Ok(standalone_run::run(&opts)?)
        }
        Command::Agent(a) => {
            let opts = AgentOptions {
                node: a.node.options(),
                kubeconfig: a.kubeconfig,
                proxy_name: a.proxy_name,
                healthz_bind: a.healthz_bind_address,
                batch: Duration::from_millis(a.batch_ms),
            };
            Ok(agent::run(opts)?)
        }
        Command::Counters(a) => {
            let maps = open(&a.instance)?;
            let report = inspect::counters(&maps)?;
            emit(a.output, &report, || counters_table(&report))
        }
        Command::Conntrack(a) => {
            let maps = open(&a.instance)?;
            let rows = inspect::flows(&maps)?;
            if a.output == Output::Table && rows.is_empty() {
                eprintln!("No flows tracked in {}.", maps.dir().display());
                return Ok(());
            }
            emit(a.output, &FlowsDoc { flows: &rows }, || flows_table(&rows))
        }
        Command::Targets(a) => {
            let maps = open(&a.instance)?;
            let fes = inspect::targets(&maps)?;
            if a.output == Output::Table && fes.is_empty() {
                eprintln!("No frontends in {}.", maps.dir().display());
                return Ok(());
            }
            emit(a.output, &TargetsDoc { frontends: &fes }, || {
                targets_table(&fes)
            })
        }
        Command::Explain(a) => {
            let maps = open(&a.instance)?;
            let probe = Probe {
                from: a.from,
                to: a.to,
                proto: match a.proto {
                    Proto::Tcp => PROTO_TCP,
                    Proto::Udp => PROTO_UDP,
                },
                syn: a.syn,
            };
            let e = inspect::explain(&maps, &probe, inspect::monotonic_ns())?;
            emit(a.output, &e, || explain_table(&e, &|i| inspect::ifname(i)))
        }
    }
}

/// `conntrack -o json`: one document, fields in declaration order.
#[derive(serde::Serialize)]
struct FlowsDoc<'a> {
    flows: &'a [FlowRow],
}

/// `targets -o json`.
#[derive(serde::Serialize)]
struct TargetsDoc<'a> {
    frontends: &'a [FrontendTargets],
}

fn open(target: &InstanceArgs) -> anyhow::Result<PinnedMaps> {
    let located: Located = inspect::locate(target.pin_dir.as_deref(), target.node_name.as_deref())?;
    let maps = PinnedMaps::open(&located)?;
    // Fail early, with the pin dir in the message, if the maps cannot be read.
    maps.config()?;
    Ok(maps)
}

/// Prints one JSON document or a table; a closed stdout (`| head`) is not an error.
fn emit<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Table => table(),
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// kubectl-style columns: left-aligned, three spaces apart, no trailing blanks.
fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn counters_table(r: &CountersReport) -> String {
    let mut rows: Vec<Vec<String>> = r
        .counters
        .iter()
        .map(|c| vec![c.reason.name().to_string(), c.count.to_string()])
        .collect();
    rows.push(vec!["total".into(), r.total.to_string()]);
    render_table(&["REASON", "PACKETS"], &rows)
}

fn flows_table(rows: &[FlowRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|f| {
            vec![
                f.client.to_string(),
                f.frontend.to_string(),
                f.proto.clone(),
                f.backend
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "<gone>".into()),
                f.backend_id.to_string(),
                f.service_id.to_string(),
                f.snat_port
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    render_table(
        &[
            "CLIENT",
            "FRONTEND",
            "PROTO",
            "BACKEND",
            "BACKEND-ID",
            "SLOT",
            "SNAT-PORT",
        ],
        &rows,
    )
}

fn targets_table(fes: &[FrontendTargets]) -> String {
    let mut rows = Vec::new();
    for fe in fes {
        let frontend = fe.label();
        let mut notes = Vec::new();
        if let Some(t) = fe.affinity_timeout_s {
            notes.push(format!("affinity {t}s"));
        }
        if fe.local_only {
            notes.push("local-only".to_string());
        }
        let notes = if notes.is_empty() {
            "-".into()
        } else {
            notes.join(",")
        };
        if fe.targets.is_empty() {
            rows.push(vec![
                frontend.clone(),
                fe.proto.clone(),
                fe.service_id.to_string(),
                "<none>".into(),
                "-".into(),
                "no-backends".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                notes.clone(),
            ]);
        }
        for t in &fe.targets {
            rows.push(vec![
                frontend.clone(),
                fe.proto.clone(),
                fe.service_id.to_string(),
                t.backend
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "<empty slot>".into()),
                t.id.to_string(),
                t.state.to_string(),
                t.location.unwrap_or("-").to_string(),
                format!("{:.1}%", t.share_pct),
                t.flows.to_string(),
                notes.clone(),
            ]);
        }
    }
    render_table(
        &[
            "FRONTEND", "PROTO", "SLOT", "BACKEND", "ID", "STATE", "LOCATION", "SHARE", "FLOWS",
            "NOTES",
        ],
        &rows,
    )
}

fn explain_table(e: &Explanation, ifname: &dyn Fn(u32) -> Option<String>) -> String {
    let mut out = format!("PACKET   {}\n", e.packet);
    let rows: Vec<Vec<String>> = e
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| vec![format!("{}.", i + 1), s.step.to_string(), s.outcome.clone()])
        .collect();
    out.push_str(&render_table(&["#", "STEP", "OUTCOME"], &rows));
    let mut verdict = format!("VERDICT  {} ({})", e.action, e.reason.name());
    if let Some((src, dst)) = e.rewritten {
        verdict.push_str(&format!(" as {src} -> {dst}"));
    }
    if let Some(i) = e.out_ifindex {
        match ifname(i) {
            Some(name) => verdict.push_str(&format!(" out {name} (ifindex {i})")),
            None => verdict.push_str(&format!(" out ifindex {i}")),
        }
    }
    out.push_str(&verdict);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::Reason;
    use lb_user::inspect::{Counter, Step, Target, TargetState};

    #[test]
    fn endpoints_parse_ipv4_with_port_only() {
        assert_eq!(
            parse_endpoint("10.0.0.9:40000"),
            Ok("10.0.0.9:40000".parse().unwrap())
        );
        assert_eq!(parse_endpoint("1.2.3.4:0").unwrap().port(), 0);
        for (bad, hint) in [
            ("10.0.0.9", "no port"),
            ("10.0.0.9:70000", "not a port"),
            ("10.0.0:80", "not an IPv4"),
            ("host:80", "not an IPv4"),
            ("[::1]:80", "IPv6"),
            ("10.0.0.9:", "not a port"),
        ] {
            let err = parse_endpoint(bad).unwrap_err();
            assert!(err.contains(hint), "{bad}: {err}");
        }
    }

    #[test]
    fn cli_contract_parses() {
        let cli = Cli::try_parse_from([
            "lb-user",
            "standalone",
            "--iface",
            "eth0",
            "--config",
            "svc.yaml",
            "--node-name",
            "n1",
            "--node-addr",
            "10.0.0.1",
            "--node-addr",
            "10.0.0.2",
            "--snat-addr",
            "10.0.0.1",
            "--xdp-mode",
            "generic",
            "--pin-dir",
            "/sys/fs/bpf/x",
            "--resync-ms",
            "100",
            "--max-services",
            "16",
            "--maglev-size",
            "251",
            "--snat-ports",
            "62000-62010",
            "--keep-pins",
        ])
        .unwrap();
        let Command::Standalone(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.node.node_addrs.len(), 2);
        assert_eq!(a.node.xdp_mode, XdpModeChoice::Generic);
        assert_eq!(
            a.node.snat_ports,
            PortRange {
                min: 62000,
                max: 62010
            }
        );
        assert!(a.node.keep_pins);

        let d = Cli::try_parse_from([
            "lb-user",
            "standalone",
            "--iface",
            "e",
            "--config",
            "c",
            "--node-name",
            "n",
        ])
        .unwrap();
        let Command::Standalone(d) = d.command else {
            panic!()
        };
        assert_eq!(
            (d.resync_ms, d.node.max_services, d.node.maglev_size),
            (500, 1024, DEFAULT_MAGLEV_SIZE)
        );
        assert_eq!(
            d.node.snat_ports,
            PortRange {
                min: 61000,
                max: 65535
            }
        );
        assert_eq!(d.node.xdp_mode, XdpModeChoice::Auto);

        let e = Cli::try_parse_from([
            "lb-user",
            "explain",
            "--node-name",
            "n1",
            "--from",
            "10.0.0.9:1",
            "--to",
            "10.0.0.1:30080",
            "--proto",
            "udp",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Explain(e) = e.command else {
            panic!()
        };
        assert_eq!((e.proto, e.output), (Proto::Udp, Output::Json));

        // Usage errors: clap exits 2 for these.
        for args in [
            &["lb-user", "counters", "--pin-dir", "/x", "--node-name", "n"][..],
            &["lb-user", "standalone", "--iface", "e", "--config", "c"][..],
            &[
                "lb-user",
                "standalone",
                "--iface",
                "e",
                "--config",
                "c",
                "--node-name",
                "n",
                "--xdp-mode",
                "skb",
            ][..],
            &["lb-user", "targets", "--output", "yaml"][..],
            &[
                "lb-user",
                "explain",
                "--from",
                "1.2.3.4",
                "--to",
                "1.2.3.4:5",
            ][..],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn error_chain_skips_causes_the_message_already_says() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {source}")]
        struct Embeds {
            #[source]
            source: std::io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Chains {
            #[source]
            source: std::io::Error,
        }
        let io = || std::io::Error::other("inner");
        assert_eq!(error_chain(&Embeds { source: io() }.into()), "outer: inner");
        assert_eq!(error_chain(&Chains { source: io() }.into()), "outer: inner");
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let t = render_table(
            &["A", "LONG-HEADER", "C"],
            &[
                vec!["xxxx".into(), "y".into(), "z".into()],
                vec!["1".into(), "2".into(), "".into()],
            ],
        );
        assert_eq!(
            t,
            "A      LONG-HEADER   C\nxxxx   y             z\n1      2\n"
        );
    }

    #[test]
    fn counters_table_lists_every_reason_and_total() {
        let r = CountersReport {
            counters: Reason::ALL
                .iter()
                .map(|&reason| Counter {
                    reason,
                    count: if reason == Reason::PassTtl { 3 } else { 0 },
                })
                .collect(),
            total: 3,
        };
        let t = counters_table(&r);
        assert_eq!(t.lines().count(), Reason::ALL.len() + 2);
        assert!(t
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["pass_ttl", "3"]));
        assert_eq!(
            t.lines()
                .last()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["total", "3"]
        );
    }

    #[test]
    fn targets_table_has_a_row_per_backend_and_marks_empty_frontends() {
        let target = |id, state| Target {
            id,
            backend: Some(format!("10.244.1.{id}:8080").parse().unwrap()),
            state,
            location: Some("local"),
            ring_slots: 5,
            share_pct: 50.0,
            flows: 2,
        };
        let fes = vec![
            FrontendTargets {
                address: "*".into(),
                port: 30080,
                proto: "TCP".into(),
                service_id: 0,
                backend_count: 2,
                affinity_timeout_s: Some(10),
                local_only: false,
                targets: vec![
                    target(1, TargetState::Healthy),
                    target(2, TargetState::Draining),
                ],
            },
            FrontendTargets {
                address: "203.0.113.7".into(),
                port: 80,
                proto: "UDP".into(),
                service_id: 1,
                backend_count: 0,
                affinity_timeout_s: None,
                local_only: true,
                targets: vec![],
            },
        ];
        let t = targets_table(&fes);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[1],
            [
                "*:30080",
                "TCP",
                "0",
                "10.244.1.1:8080",
                "1",
                "healthy",
                "local",
                "50.0%",
                "2",
                "affinity",
                "10s"
            ]
        );
        assert_eq!(lines[2][5], "draining");
        assert_eq!(
            lines[3][..6],
            ["203.0.113.7:80", "UDP", "1", "<none>", "-", "no-backends"]
        );
        assert_eq!(*lines[3].last().unwrap(), "local-only");
    }

    #[test]
    fn explain_table_shows_steps_and_verdict() {
        let e = Explanation {
            packet: "10.0.0.9:40000 -> 192.168.1.10:30080 TCP".into(),
            steps: vec![
                Step {
                    step: "service_ports",
                    outcome: "bit for TCP port 30080 is set".into(),
                },
                Step {
                    step: "maglev",
                    outcome: "flow hash ...".into(),
                },
            ],
            reason: Reason::FwdLocal,
            action: "XDP_REDIRECT",
            out_ifindex: Some(7),
            backend: None,
            rewritten: Some((
                "10.0.0.9:40000".parse().unwrap(),
                "10.244.1.5:8080".parse().unwrap(),
            )),
            established: false,
        };
        let t = explain_table(&e, &|i| (i == 7).then(|| "veth-p1".to_string()));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "PACKET   10.0.0.9:40000 -> 192.168.1.10:30080 TCP"
        );
        assert!(
            lines[2].starts_with("1.   service_ports   bit for TCP"),
            "{t}"
        );
        assert!(lines[4].starts_with(
            "VERDICT  XDP_REDIRECT (fwd_local) as 10.0.0.9:40000 -> 10.244.1.5:8080 out veth-p1 (ifindex 7)"
        ), "{t}");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["reason"], "fwd_local");
        assert_eq!(json["rewritten"][1], "10.244.1.5:8080");
    }
}
