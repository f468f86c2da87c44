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
use lb_user::bpf::{
    dataplane::{DataplaneOptions, XdpModeChoice},
    maps::Maps,
    netdev, pins,
    sandbox::Hook,
};
use lb_user::inspect::{
    self,
    explain::explain,
    flows::{FlowRow, ReturnRow},
    packet::{Probe, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
    render,
    targets::FrontendTargets,
};
use lb_user::k8s::{
    agent::{self, AgentOptions},
    standalone::{self, StandaloneOptions},
};
use lb_user::node::options::{
    NodeOptions, PortRange, RemoteMode, TunnelEncap, DEFAULT_TUNNEL_PORT,
};

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
    /// What the data plane does with one packet: it runs through the real program against
    /// the instance's maps (which are not written), and the verdict, reason, rewritten packet
    /// and map entries read and written are shown.
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
    /// How requests reach pods on other nodes: tunnelled to the owning node (the pod sees
    /// the client's address; the network must carry IP protocol 4, or UDP to --tunnel-port
    /// with --tunnel-encap fou, between the nodes) or SNATed to --snat-addr.
    #[arg(long, value_enum, default_value_t = RemoteMode::Tunnel)]
    remote_mode: RemoteMode,
    /// The tunnel's encapsulation (the same on every node).
    #[arg(long, value_enum, default_value_t = TunnelEncap::Ipip)]
    tunnel_encap: TunnelEncap,
    /// FOU's UDP port (the same on every node).
    #[arg(long, default_value_t = DEFAULT_TUNNEL_PORT, value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    tunnel_port: u16,
    /// The largest IPv4 packet the path between the nodes carries [default: the MTU of
    /// --iface]. Tunnelled TCP gets its MSS clamped to fit; larger DF packets get ICMP
    /// fragmentation-needed.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(576..))]
    tunnel_mtu: Option<u16>,
    /// This node's address in the tunnel, the one its peers know it by (its InternalIP)
    /// [default: the first node address].
    #[arg(long, value_name = "IP")]
    tunnel_addr: Option<Ipv4Addr>,
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
            remote_mode: self.remote_mode,
            tunnel_encap: self.tunnel_encap,
            tunnel_port: self.tunnel_port,
            tunnel_mtu: self.tunnel_mtu,
            tunnel_addr: self.tunnel_addr,
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
    /// Send a TCP SYN (a new connection). Only a SYN starts a TCP flow that has no entry
    /// (without it, such a packet is left to the kernel), and a SYN on a tracked flow whose
    /// backend is terminating reselects. Without --syn or --tcp-flags: an ACK.
    #[arg(long, conflicts_with = "tcp_flags")]
    syn: bool,
    /// TCP flags as letters: S (SYN), A (ACK), F (FIN), R (RST), P (PSH), e.g. SA or FA.
    #[arg(long, value_name = "LETTERS", value_parser = parse_tcp_flags)]
    tcp_flags: Option<u8>,
    /// The packet is a local pod's reply: it goes through lb_reply (TC on the pod's veth)
    /// instead of lb_ingress (XDP on the NIC).
    #[arg(long)]
    reply: bool,
    #[arg(long, default_value_t = 64)]
    ttl: u8,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// TCP flag letters (S, A, F, R, P) as the flags byte.
fn parse_tcp_flags(s: &str) -> Result<u8, String> {
    s.chars().try_fold(0u8, |flags, c| {
        let bit = match c.to_ascii_uppercase() {
            'S' => TCP_SYN,
            'A' => TCP_ACK,
            'F' => TCP_FIN,
            'R' => TCP_RST,
            'P' => TCP_PSH,
            _ => {
                return Err(format!(
                    "{c:?} is not a TCP flag; use S, A, F, R, P (e.g. SA)"
                ))
            }
        };
        Ok(flags | bit)
    })
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
            Ok(standalone::run(&opts)?)
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
            let (_, maps) = open(&a.instance)?;
            let report = inspect::counters::counters(&maps)?;
            emit(a.output, &report, || render::counters_table(&report))
        }
        Command::Conntrack(a) => {
            let (located, maps) = open(&a.instance)?;
            let rows = inspect::flows::flows(&maps)?;
            let returns = inspect::flows::returns(&maps)?;
            if a.output == Output::Table && rows.is_empty() && returns.is_empty() {
                eprintln!("No flows tracked in {}.", located.pin_dir.display());
                return Ok(());
            }
            let doc = FlowsDoc {
                flows: &rows,
                tunnelled_in: &returns,
            };
            emit(a.output, &doc, || render::flows_table(&rows, &returns))
        }
        Command::Targets(a) => {
            let (located, maps) = open(&a.instance)?;
            let fes = inspect::targets::targets(&maps)?;
            if a.output == Output::Table && fes.is_empty() {
                eprintln!("No frontends in {}.", located.pin_dir.display());
                return Ok(());
            }
            emit(a.output, &TargetsDoc { frontends: &fes }, || {
                render::targets_table(&fes)
            })
        }
        Command::Explain(a) => {
            let (located, _) = open(&a.instance)?;
            let probe = Probe {
                from: a.from,
                to: a.to,
                proto: match a.proto {
                    Proto::Tcp => PROTO_TCP,
                    Proto::Udp => PROTO_UDP,
                },
                tcp_flags: match (a.syn, a.tcp_flags) {
                    (true, _) => TCP_SYN,
                    (false, Some(flags)) => flags,
                    (false, None) => TCP_ACK,
                },
                src_mac: [0x02, 0, 0, 0, 0, 0x01],
                dst_mac: [0x02, 0, 0, 0, 0, 0x02],
                ttl: a.ttl,
            };
            let hook = if a.reply { Hook::Reply } else { Hook::Ingress };
            let e = explain(&located.open_path, hook, &probe.frame())?;
            emit(a.output, &e, || render::explain_table(&e, &netdev::ifname))
        }
    }
}

/// `conntrack -o json`: one document, fields in declaration order.
#[derive(serde::Serialize)]
struct FlowsDoc<'a> {
    flows: &'a [FlowRow],
    /// Tunnelled flows whose pods are on this node.
    tunnelled_in: &'a [ReturnRow],
}

/// `targets -o json`.
#[derive(serde::Serialize)]
struct TargetsDoc<'a> {
    frontends: &'a [FrontendTargets],
}

/// The instance `target` names, and its maps.
fn open(target: &InstanceArgs) -> anyhow::Result<(pins::Located, Maps)> {
    let located = pins::locate(target.pin_dir.as_deref(), target.node_name.as_deref())?;
    let maps = inspect::open(&located)?;
    Ok((located, maps))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
