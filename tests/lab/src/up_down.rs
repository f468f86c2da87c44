//! `lbx-lab up` keeps a lab until Ctrl-C or `lbx-lab down`; `down` stops it by the PID in
//! its state file and removes what killed runs left behind.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use lb_tests::netns;
use lb_tests::scenario::{self, LB_INGRESS_IP, TCP_NODE_PORT, TCP_TARGET_PORT};
use serde_json::json;

use crate::cli::LabArgs;
use crate::cluster::Cluster;
use crate::interrupt::interrupted;
use crate::progress::Progress;
use crate::workload::{ACCELERATE_ANNOTATION, UI_NS, UI_SERVICE};

/// `lab up` records itself here; `lab down` reads it.
const STATE_FILE: &str = "/run/lbx/lab-up.json";

/// `lbx-lab up`: builds the lab and keeps it until Ctrl-C, SIGTERM or `lbx-lab down`.
pub fn up(args: LabArgs) -> Result<()> {
    let progress = Progress::new();
    if let Ok(text) = fs::read_to_string(STATE_FILE) {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(pid) = v["pid"].as_u64() {
            if Path::new("/proc").join(pid.to_string()).exists() {
                bail!("a lab is already up (pid {pid}, {STATE_FILE}); run `cargo xtask lab down` first");
            }
        }
    }
    let max_services = args.services + 16;
    let mut cluster = Cluster::start(&args, max_services, &progress)?;
    let outcome = (|| -> Result<()> {
        cluster.create_ui_service()?;
        cluster.scale_to(args.replicas)?;
        cluster.set_accelerated(true)?;
        cluster.grow_services(args.services, &progress)?;
        let fp = cluster.footprint();
        if let Some(dir) = Path::new(STATE_FILE).parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(
            STATE_FILE,
            serde_json::to_string_pretty(&json!({"pid": std::process::id(), "footprint": fp}))?,
        )?;
        print_up_help(&cluster);
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    let _ = fs::remove_file(STATE_FILE);
    if let Err(e) = &outcome {
        if !interrupted() {
            eprintln!("lbx-lab: {e:#}\n{}", cluster.logs());
        }
    }
    progress.step("tearing down");
    cluster.shutdown()?;
    progress.step("torn down");
    Ok(())
}

fn print_up_help(cluster: &Cluster) {
    let lab = &cluster.lab;
    let t = lab.topology();
    println!(
        "\nThe lab {} is up. Namespaces: {}",
        lab.prefix(),
        t.namespaces().join(" ")
    );
    println!("Service ui/ui-nlb: nodePort {TCP_NODE_PORT}, LoadBalancer IP {LB_INGRESS_IP}, pods:");
    for p in &cluster.replicas {
        println!(
            "  {p}  {}",
            lab.pod_addr(*p).map(|a| a.to_string()).unwrap_or_default()
        );
    }
    println!("\n{HINTS_HEADER}");
    for hint in up_hints(cluster) {
        println!("  {:<w$} # {}", hint.command, hint.what, w = HINT_WIDTH);
    }
    println!("\nCtrl-C here, or `cargo xtask lab down`, tears it down.");
}

/// The line before the hints; each hint is then one line, `  <command> # <what>`, up to
/// an empty line (lab_compare's test runs every one as printed).
pub const HINTS_HEADER: &str = "Try (each line runs as printed, as root):";
const HINT_WIDTH: usize = 60;

/// A command `lab up` suggests: it runs as printed, from any directory, in the machine's
/// own namespace: everything that reaches a lab address enters a lab namespace first
/// (`ip netns exec`), and kubectl talks to the API server through the lab's loopback
/// forwarder.
struct Hint {
    command: String,
    what: &'static str,
}

fn up_hints(cluster: &Cluster) -> Vec<Hint> {
    let lab = &cluster.lab;
    let t = lab.topology();
    let client = t.client_ns();
    let n0 = t.node_ns(0);
    let pod0 = lab
        .pod_addr(cluster.replicas[0])
        .map(|a| a.to_string())
        .unwrap_or_default();
    let agent = lab.binaries().agent.display().to_string();
    let pins = lab.pin_dir(0).display().to_string();
    let hint = |command: String, what| Hint { command, what };
    let mut hints = vec![
        hint(
            format!(
                "ip netns exec {client} curl -s http://{}:{TCP_NODE_PORT}/",
                lab.node_addr(0)
            ),
            "xdp path (n0's nodePort)",
        ),
        hint(
            format!("ip netns exec {client} curl -s http://{pod0}:{TCP_TARGET_PORT}/"),
            "ip mode",
        ),
        hint(
            format!("ip netns exec {client} curl -s http://{LB_INGRESS_IP}/"),
            "LoadBalancer IP (routed to n0)",
        ),
        hint(
            format!("{agent} targets --pin-dir {pins}"),
            "what n0's XDP forwards to",
        ),
        hint(
            format!("{agent} counters --pin-dir {pins}"),
            "n0's verdicts",
        ),
        hint(
            format!("ip netns exec {n0} bpftool net show"),
            "programs attached in n0",
        ),
        hint(
            format!("ip netns exec {n0} iptables-legacy-save -c -t nat | head -20"),
            "kube-proxy's rules in n0",
        ),
    ];
    if let Ok(cp) = lab.control_plane() {
        // The test harness's own kubectl command line (the release's kubectl, the loopback
        // kubeconfig), as one shell line.
        let cmd = cp.kubectl();
        let kubectl = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        hints.push(hint(
            format!("{kubectl} -n {UI_NS} annotate service {UI_SERVICE} {ACCELERATE_ANNOTATION}=false --overwrite"),
            "ui-nlb through kube-proxy",
        ));
        hints.push(hint(
            format!("{kubectl} -n {UI_NS} annotate service {UI_SERVICE} {ACCELERATE_ANNOTATION}-"),
            "back to lbx",
        ));
    }
    hints
}

/// Whether the process of `/proc/<pid>` still runs: gone, or a zombie its parent has not
/// reaped yet, both count as exited.
fn running(proc_dir: &Path) -> bool {
    match fs::read_to_string(proc_dir.join("stat")) {
        // `pid (comm) state ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `lbx-lab down`: stops a running `up` and removes namespaces and pins of killed runs.
pub fn down() -> Result<()> {
    match fs::read_to_string(STATE_FILE) {
        Ok(text) => {
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {STATE_FILE}"))?;
            let pid = v["pid"]
                .as_u64()
                .ok_or_else(|| anyhow!("{STATE_FILE} names no pid"))? as u32;
            let proc_dir = Path::new("/proc").join(pid.to_string());
            let is_ours =
                fs::read_to_string(proc_dir.join("cmdline")).is_ok_and(|c| c.contains("lbx-lab"));
            if is_ours {
                eprintln!("lbx-lab: stopping `lab up` (pid {pid})");
                // SAFETY: kill(2) by PID on the lab process named by its own state file,
                // checked to be an lbx-lab process above.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                let started = Instant::now();
                while running(&proc_dir) && started.elapsed() < Duration::from_secs(180) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                ensure!(
                    !running(&proc_dir),
                    "`lab up` (pid {pid}) did not exit within 180 s"
                );
            } else {
                eprintln!("lbx-lab: the `lab up` in {STATE_FILE} (pid {pid}) is gone");
            }
            let _ = fs::remove_file(STATE_FILE);
        }
        Err(_) => eprintln!("lbx-lab: no `lab up` is running ({STATE_FILE} does not exist)"),
    }
    let removed = netns::cleanup_stale().context("removing stale lab namespaces")?;
    scenario::cleanup_stale_pins();
    if removed.is_empty() {
        eprintln!("lbx-lab: no stale namespaces");
    } else {
        eprintln!("lbx-lab: removed stale namespaces {}", removed.join(" "));
    }
    Ok(())
}
