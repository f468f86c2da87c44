//! The `lbx-lab` command line: `compare`, `up`, `down` and their options.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_tests::kubeproxy::{IptablesBackend, ProxyMode};
use lb_user::node::options::RemoteMode;

#[derive(Parser)]
#[command(about = "instance mode (kube-proxy) vs the lbx XDP path vs ip mode, side by side")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Build the lab, measure the three paths and the Service sweep, report, tear down.
    Compare(CompareArgs),
    /// Build the lab and keep it until Ctrl-C or `lab down`.
    Up(LabArgs),
    /// Stop a running `lab up` and remove what killed runs left behind.
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Iptables,
    Nftables,
    Ipvs,
}

#[derive(Args, Clone, Debug)]
pub struct LabArgs {
    /// Worker nodes.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Replicas of ui/ui-nlb after the 1-replica check, spread over the nodes.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Services in the cluster during the path measurements (ui-nlb plus N-1 others).
    #[arg(long, default_value_t = 1)]
    pub services: usize,
    /// kube-proxy's --proxy-mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Iptables)]
    pub kube_proxy_mode: ModeArg,
    /// The iptables kube-proxy runs in iptables mode: legacy (x_tables) or nft (Debian's
    /// default `iptables`, much slower to sync 10 000 Services).
    #[arg(long, value_enum, default_value_t = IptablesBackend::Legacy)]
    pub iptables_backend: IptablesBackend,
    /// The agents' `--snat-ports`. Default: every port, as their SNAT address is their own
    /// (a closed flow's port stays taken for 120 s, so thousands of new connections per
    /// second need more than the agent's default 4 536). A small range shows what happens
    /// when they run out: those SYNs are the kernel's (`pass_snat_exhausted`).
    #[arg(long, default_value = "1024-65535", value_name = "MIN-MAX")]
    pub snat_ports: String,
    /// The agents' `--remote-mode`: how the XDP path delivers a flow whose pod is on another
    /// node. `tunnel` (IP-in-IP to the pod's node; the pod sees the client) or `snat` (SNAT
    /// to the agent's address and forward; the pod sees that address).
    #[arg(long, value_enum, default_value_t = RemoteMode::Tunnel)]
    pub remote_mode: RemoteMode,
}

#[derive(Args, Clone, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub lab: LabArgs,
    /// Numbers of Services for the sweep (ascending; sizes below --services are skipped).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    pub sweep: Vec<usize>,
    /// Seconds of measured load per path and kind of load.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of measured new-connection load per path, sweep size and round.
    #[arg(long, default_value_t = 3.0)]
    pub sweep_duration: f64,
    /// Rounds per sweep size (the paths take turns in each; the point is the median).
    #[arg(long, default_value_t = 3)]
    pub sweep_rounds: usize,
    /// Seconds of unrecorded load before each measurement.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Concurrent client connections (threads).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measure the xdp path in `--remote-mode` only. By default the agents are also
    /// restarted in the other mode (tunnel <-> snat) to measure the xdp path and the sweep
    /// once more, reported beside the others as path `xdp-snat` (or `xdp-tunnel`).
    #[arg(long)]
    pub one_remote_mode: bool,
    /// Where the report goes when none of --json, --html and --svg-dir is given:
    /// `report.json`, `report.html` and `plots/` in this directory. Default:
    /// `target/lab/<start time, UTC>/` of the workspace lbx-lab was built in.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with SVG plots.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Also write the three plots as standalone SVG files into this directory.
    #[arg(long, value_name = "DIR")]
    pub svg_dir: Option<PathBuf>,
}

/// A `--remote-mode` as the agent spells it (`tunnel`, `snat`).
pub fn mode_label(mode: RemoteMode) -> String {
    use clap::ValueEnum;
    mode.to_possible_value()
        .map_or_else(|| format!("{mode:?}"), |v| v.get_name().to_string())
}

/// The remote mode that is not `mode`.
pub fn other_mode(mode: RemoteMode) -> RemoteMode {
    match mode {
        RemoteMode::Tunnel => RemoteMode::Snat,
        RemoteMode::Snat => RemoteMode::Tunnel,
    }
}

impl CompareArgs {
    /// The second remote mode the xdp path is measured in, unless `--one-remote-mode`.
    pub fn other_remote_mode(&self) -> Option<RemoteMode> {
        (!self.one_remote_mode).then(|| other_mode(self.lab.remote_mode))
    }
}

impl LabArgs {
    pub fn mode(&self) -> ProxyMode {
        match self.kube_proxy_mode {
            ModeArg::Iptables => ProxyMode::Iptables(self.iptables_backend),
            ModeArg::Nftables => ProxyMode::Nftables,
            ModeArg::Ipvs => ProxyMode::Ipvs,
        }
    }

    /// `--remote-mode` as the agent spells it (`tunnel`, `snat`).
    pub fn remote_mode_label(&self) -> String {
        mode_label(self.remote_mode)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=8).contains(&self.nodes),
            "--nodes must be 1..=8, got {}",
            self.nodes
        );
        ensure!(
            (1..=32).contains(&self.replicas),
            "--replicas must be 1..=32, got {}",
            self.replicas
        );
        ensure!(
            (1..=20_000).contains(&self.services),
            "--services must be 1..=20000, got {}",
            self.services
        );
        if self.kube_proxy_mode == ModeArg::Ipvs {
            ensure!(
                Path::new("/proc/net/ip_vs").exists(),
                "--kube-proxy-mode ipvs needs the kernel's IPVS (CONFIG_IP_VS, module ip_vs), \
                 and this kernel has none (/proc/net/ip_vs is missing): load it with \
                 `modprobe ip_vs` or use iptables or nftables"
            );
        }
        Ok(())
    }
}
