//! `lbx-lab compare`: build the lab, measure the three paths and the sweep, check the
//! issue's targets, tear down, and write the report (table, JSON, HTML, SVG).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::cli::{mode_label, CompareArgs};
use crate::cluster::Cluster;
use crate::machine::{QUIET_BUSY, QUIET_MAX, QUIET_WINDOW};
use crate::paths::xdp_leg;
use crate::progress::Progress;
use crate::report::{render, LabFootprint, LabReport, Meta, TargetCheck};

/// `lbx-lab compare`: measures, tears down (also on failure), then prints and writes the
/// report.
pub fn compare(c: CompareArgs) -> Result<()> {
    ensure!(
        c.duration > 0.0 && c.sweep_duration > 0.0,
        "durations must be positive"
    );
    ensure!(c.connections >= 1, "--connections must be at least 1");
    ensure!(c.sweep_rounds >= 1, "--sweep-rounds must be at least 1");
    let progress = Progress::new();
    let mut sweep: Vec<usize> = c.sweep.clone();
    sweep.sort_unstable();
    sweep.dedup();
    let max_services = sweep
        .iter()
        .copied()
        .chain([c.lab.services])
        .max()
        .unwrap_or(1)
        + 16;
    let started = utc_now();
    let mut cluster = Cluster::start(&c.lab, max_services, &progress)?;
    let outcome = run_compare(&mut cluster, &c, &sweep, &progress, started);
    if outcome.is_err() {
        eprintln!(
            "lbx-lab: the run failed; last log lines:\n{}",
            cluster.logs()
        );
    }
    let footprint = cluster.footprint();
    progress.step("tearing down (kube-proxy rules, agents, pods, control plane, namespaces)");
    let teardown = cluster.shutdown();
    let mut report = outcome?;
    teardown?;
    report.footprint = footprint;
    progress.step("torn down");
    println!("{}", render::table(&report));
    let exe = std::env::current_exe().context("locating lbx-lab's own binary")?;
    let out = Outputs::of(&c, &report.meta.started, &exe);
    write_outputs(&report, &out)?;
    if let Some(dir) = &out.dir {
        println!(
            "The report is in {}: report.json, report.html, plots/",
            dir.display()
        );
    }
    Ok(())
}

/// Where a run's report goes: the files given, or all three in one directory.
#[derive(Debug, PartialEq)]
struct Outputs {
    json: Option<PathBuf>,
    html: Option<PathBuf>,
    svg_dir: Option<PathBuf>,
    /// Set when the report went to a directory of its own (no file flag given).
    dir: Option<PathBuf>,
}

impl Outputs {
    /// `--json`/`--html`/`--svg-dir` when any is given; otherwise `report.json`,
    /// `report.html` and `plots/` in `--out-dir`, by default `target/lab/<started>/` beside
    /// the binary's own build directory (`exe` is `<target>/<profile>/lbx-lab`).
    fn of(c: &CompareArgs, started: &str, exe: &Path) -> Outputs {
        if c.json.is_some() || c.html.is_some() || c.svg_dir.is_some() {
            return Outputs {
                json: c.json.clone(),
                html: c.html.clone(),
                svg_dir: c.svg_dir.clone(),
                dir: None,
            };
        }
        let dir = c.out_dir.clone().unwrap_or_else(|| {
            let target = exe
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."));
            // No colons: the name is also a valid path on filesystems that refuse them.
            target.join("lab").join(started.replace(':', "-"))
        });
        Outputs {
            json: Some(dir.join("report.json")),
            html: Some(dir.join("report.html")),
            svg_dir: Some(dir.join("plots")),
            dir: Some(dir),
        }
    }
}

fn run_compare(
    cluster: &mut Cluster,
    c: &CompareArgs,
    sweep: &[usize],
    progress: &Progress,
    started: String,
) -> Result<LabReport> {
    progress.step("creating Service ui/ui-nlb (LoadBalancer, 80 -> 8080) and 1 replica");
    cluster.create_ui_service()?;
    cluster.scale_to(1)?;
    cluster.set_accelerated(true)?;
    cluster.one_replica_check()?;
    progress.step(format!("scaling ui to {} replicas", c.lab.replicas));
    cluster.scale_to(c.lab.replicas)?;
    cluster.set_accelerated(true)?;
    cluster.grow_services(c.lab.services, progress)?;

    const MAIN: [&str; 3] = ["xdp", "instance", "ip"];
    let primary = c.lab.remote_mode;
    let other = c.other_remote_mode();
    let mut paths = BTreeMap::new();
    for path in MAIN {
        cluster.set_accelerated(path != "instance")?;
        paths.insert(path.to_string(), cluster.measure_path(path, c, progress)?);
    }
    cluster.set_accelerated(true)?;
    if let Some(mode) = other {
        cluster.set_remote_mode(mode, progress)?;
        let leg = xdp_leg(mode);
        paths.insert(leg.to_string(), cluster.measure_path(leg, c, progress)?);
    }

    let other_order = other.map(|mode| [xdp_leg(mode)]);
    let mut points = Vec::new();
    for &n in sweep {
        if n < c.lab.services {
            cluster.notes.push(format!(
                "sweep size {n} skipped: below --services {} (Services are only added)",
                c.lab.services
            ));
            continue;
        }
        cluster.grow_services(n, progress)?;
        // The agents' mode changes at most once per size: the mode they run in goes first.
        let mut legs = vec![(primary, &MAIN[..])];
        if let (Some(mode), Some(order)) = (other, &other_order) {
            legs.push((mode, &order[..]));
            if cluster.remote_mode == mode {
                legs.reverse();
            }
        }
        for (mode, order) in legs {
            cluster.set_remote_mode(mode, progress)?;
            points.extend(cluster.sweep_point(n, order, c, progress)?);
        }
    }

    let mut notes = cluster.notes.clone();
    notes.push(
        "CPU per request: busy time of the whole machine from /proc/stat (user, system, irq, \
         softirq, steal over every core: load generator, kernel paths and pod servers \
         together) during the load, divided by its requests (warm-up included). perf stat \
         cannot give this here: the VM exposes no hardware counters and system-wide \
         cpu-clock counts idle time."
            .into(),
    );
    notes.push(format!(
        "Sweep: {} rounds per size, the paths taking turns (each round starts one path \
         later); a point is the path's median round (every round in rounds_rps). Every load \
         starts once the machine was at most {:.0}% busy for {} ms (at most {} s of waiting).",
        c.sweep_rounds,
        QUIET_BUSY * 100.0,
        QUIET_WINDOW.as_millis(),
        QUIET_MAX.as_secs()
    ));
    if let Some(mode) = other {
        notes.push(format!(
            "{}: the xdp path again with the agents restarted in --remote-mode {} (client \
             addresses of its own; the agents change mode between measurements, at most once \
             per sweep size, and hold every Service before the next load starts).",
            xdp_leg(mode),
            mode_label(mode)
        ));
    }
    notes.push(
        "bpf_ns_per_req: run_time_ns of lbx's programs in the node namespaces \
         (BPF_ENABLE_STATS) during the one-connection-per-request load, per request; \
         netfilter rule hits and conntrack entries: the same load, every node."
            .into(),
    );
    let meta = Meta {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        nodes: c.lab.nodes,
        replicas: c.lab.replicas,
        services: c.lab.services,
        kube_proxy_mode: c.lab.mode().label(),
        remote_mode: c.lab.remote_mode_label(),
        other_remote_mode: other.map(mode_label),
        kubernetes_version: lb_tests::controlplane::DEFAULT_K8S_VERSION.into(),
        duration_s: c.duration,
        connections: c.connections,
        notes,
    };
    let mut report = LabReport {
        meta,
        paths,
        sweep: points,
        targets: Vec::new(),
        footprint: LabFootprint::default(),
    };
    report.targets = target_checks(&report);
    Ok(report)
}

/// The issue's targets on this run's numbers.
fn target_checks(r: &LabReport) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let point = |n: usize, path: &str| {
        r.sweep
            .iter()
            .find(|p| p.services == n && p.path == path)
            .map(|p| p.new_conn_rps)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for (n, min) in [(10_000usize, 2.0), (1, 1.2)] {
        if let Some(x) = ratio(point(n, "xdp"), point(n, "instance")) {
            out.push(TargetCheck {
                name: format!("xdp new_conn_rps / instance at {n} services"),
                measured: x,
                target: format!(">= {min}"),
                met: x >= min,
            });
        }
    }
    let sizes: BTreeSet<usize> = r.sweep.iter().map(|p| p.services).collect();
    for n in sizes {
        if let Some(x) = ratio(point(n, "xdp"), point(n, "ip")) {
            out.push(TargetCheck {
                name: format!("xdp new_conn_rps / ip at {n} services"),
                measured: x,
                target: ">= 1 (ip mode's or more)".into(),
                met: x >= 1.0,
            });
        }
    }
    if let Some(x) = r.paths.get("xdp") {
        let failed = x.errors
            + r.sweep
                .iter()
                .filter(|p| p.path == "xdp")
                .map(|p| p.errors)
                .sum::<u64>();
        out.push(TargetCheck {
            name: "xdp failed requests over the whole run (loads and sweep)".into(),
            measured: failed as f64,
            target: "= 0".into(),
            met: failed == 0,
        });
        out.push(TargetCheck {
            name: "xdp requests whose pod saw the client's address (local and remote pods)".into(),
            measured: x.client_ip_seen_fraction,
            target: "= 1 (100 %, as ip mode)".into(),
            met: x.client_ip_seen_fraction >= 1.0,
        });
    }
    if let (Some(x), Some(ip)) = (r.paths.get("xdp"), r.paths.get("ip")) {
        for (what, a, b) in [
            ("keep-alive", x.p99_us, ip.p99_us),
            ("new-connection", x.new_conn_p99_us, ip.new_conn_p99_us),
        ] {
            if b > 0.0 {
                out.push(TargetCheck {
                    name: format!("xdp p99 / ip p99 ({what})"),
                    measured: a / b,
                    target: "<= 1.1".into(),
                    met: a / b <= 1.1,
                });
            }
        }
        out.push(TargetCheck {
            name: "xdp keeps the client IP for local delivery".into(),
            measured: f64::from(u8::from(x.client_ip_preserved)),
            target: "= 1 (yes)".into(),
            met: x.client_ip_preserved,
        });
        let (xl, il) = (x.hops_local, ip.hops_local);
        out.push(TargetCheck {
            name: format!("xdp hops to a local pod ({xl:?}) = ip mode's ({il:?})"),
            measured: xl.map_or(f64::NAN, f64::from),
            target: format!("= {}", il.map_or("?".into(), |h| h.to_string())),
            met: xl.is_some() && xl == il,
        });
    }
    out
}

fn write_outputs(report: &LabReport, c: &Outputs) -> Result<()> {
    if let Some(dir) = &c.dir {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Some(path) = &c.json {
        let text = serde_json::to_string_pretty(report)?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("lbx-lab: wrote {}", path.display());
    }
    if let Some(path) = &c.html {
        fs::write(path, render::html(report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("lbx-lab: wrote {}", path.display());
    }
    if let Some(dir) = &c.svg_dir {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, svg) in [
            ("latency-cdf.svg", render::svg_latency_cdf(report)),
            ("new-conn-vs-services.svg", render::svg_sweep(report)),
            ("cpu-per-request.svg", render::svg_cpu(report)),
        ] {
            let p = dir.join(name);
            fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
        }
        eprintln!("lbx-lab: wrote the plots into {}", dir.display());
    }
    Ok(())
}

/// The current UTC time, RFC 3339 (from `date`, to need no time crate).
fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::SweepPoint;

    #[test]
    fn the_report_goes_to_the_files_given_or_to_a_directory_of_its_own() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            c: CompareArgs,
        }
        let args = |a: &[&str]| Cli::parse_from([&["lbx-lab"], a].concat()).c;
        let exe = Path::new("/src/lbx/target/release/lbx-lab");
        let started = "2026-12-05T07:38:47Z";
        let out = Outputs::of(&args(&[]), started, exe);
        let dir = PathBuf::from("/src/lbx/target/lab/2026-12-05T07-38-47Z");
        assert_eq!(
            out,
            Outputs {
                json: Some(dir.join("report.json")),
                html: Some(dir.join("report.html")),
                svg_dir: Some(dir.join("plots")),
                dir: Some(dir),
            }
        );
        let out = Outputs::of(&args(&["--out-dir", "/tmp/r"]), started, exe);
        assert_eq!(out.json, Some(PathBuf::from("/tmp/r/report.json")));
        // A file flag: only what was asked for.
        let out = Outputs::of(&args(&["--html", "x.html"]), started, exe);
        assert_eq!(
            out,
            Outputs {
                json: None,
                html: Some("x.html".into()),
                svg_dir: None,
                dir: None,
            }
        );
    }

    #[test]
    fn checks_follow_the_issue_targets() {
        let mut r = LabReport::default();
        for (n, path, rps) in [
            (1, "xdp", 1300.0),
            (1, "instance", 1000.0),
            (1, "ip", 1250.0),
            (1, "xdp-snat", 900.0),
        ] {
            r.sweep.push(SweepPoint {
                services: n,
                path: path.into(),
                new_conn_rps: rps,
                // Failed requests on other paths do not count against xdp's.
                errors: u64::from(path != "xdp") * 3,
                ..SweepPoint::default()
            });
        }
        r.paths.insert(
            "xdp".into(),
            crate::report::PathResult {
                client_ip_seen_fraction: 1.0,
                ..Default::default()
            },
        );
        let checks = target_checks(&r);
        let get = |name: &str| {
            checks
                .iter()
                .find(|c| c.name.contains(name))
                .unwrap()
                .clone()
        };
        let a = get("instance at 1 services");
        assert!((a.measured - 1.3).abs() < 1e-9 && a.met);
        let b = get("ip at 1 services");
        assert!((b.measured - 1300.0 / 1250.0).abs() < 1e-9 && b.met);
        assert!(checks.iter().all(|c| !c.name.contains("10000")));
        let failed = get("xdp failed requests");
        assert!(failed.measured == 0.0 && failed.met);
        assert!(get("saw the client's address").met);

        // 0.96 of ip mode is not ip mode's; one failed sweep request fails the run.
        r.sweep[2].new_conn_rps = 1354.0;
        r.sweep[0].errors = 1;
        r.paths.get_mut("xdp").unwrap().client_ip_seen_fraction = 0.72;
        let checks = target_checks(&r);
        let get = |name: &str| checks.iter().find(|c| c.name.contains(name)).unwrap();
        assert!(!get("ip at 1 services").met);
        let failed = get("xdp failed requests");
        assert!(failed.measured == 1.0 && !failed.met);
        assert!(!get("saw the client's address").met);
    }
}
