//! The kernel matrix: the test binaries built on this host, run inside Debian's 6.1 and 6.12
//! kernels under qemu (`cargo xtask test --kernels`, and a step of `cargo xtask test`).
//!
//! Per kernel, one boot runs, in order (the [`PLAN`]):
//! 1. `lbx-kernel-check`: the feature probe, then the real object loaded at the agent's
//!    default sizes (a verifier rejection prints the verifier's log verbatim);
//! 2. native XDP on virtio-net (`lbx-vmnet`, see `tests/src/vmnet.rs`): the guest's NIC is
//!    virtio-net on a tap in a host namespace `lbx-<pid>-<n>-vm<kernel>`; the guest runs the
//!    agent natively on it, and the client runs here, in that namespace;
//! 3. the fixture tables and the attach tests, whole;
//! 4. a subset of the network-namespace data-path tests, chosen to keep the matrix within
//!    about 15 minutes under TCG; the tests left out are listed, and run on the host.
//!
//! Every libtest target's selection is checked against its `--list` first, so a renamed test
//! fails the matrix instead of silently matching nothing. Pass counts come from libtest's
//! own result lines in the guest's logs; a step that exits non-zero fails even when its
//! counts look clean.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    cmd::{self, CmdError},
    kernels::{self, Kernel, KernelError, KernelSpec, MATRIX},
    vm::{self, Accel, Nic, VmError, VmSpec},
};

/// Memory and vCPUs of every guest (this machine has 2 cores and 24 GiB).
const GUEST_MEMORY_MIB: u32 = 2048;
const GUEST_CPUS: u32 = 2;
/// The host end of the guest's NIC (inside the run's `lbx-` namespace).
const TAP: &str = "lbx-tap0";
/// Queue pairs of the guest NIC: one per vCPU for the stack plus one per vCPU for XDP_TX,
/// so virtio_net's native XDP needs no shared (locked) TX queues.
const NIC_QUEUES: u32 = 2 * GUEST_CPUS;
/// Extra time a guest gets beyond its steps' own timeouts (boot, power-off).
const BOOT_ALLOWANCE: Duration = Duration::from_secs(180);
/// How long the host client may take after the guest has powered off.
const CLIENT_GRACE: Duration = Duration::from_secs(60);

/// Which tests of a libtest target run in the guest.
#[derive(Clone, Copy, Debug)]
pub enum Selection {
    All,
    /// Exactly these tests (libtest `--exact`); the rest of the target runs on the host only.
    Only(&'static [&'static str]),
}

/// One step of a guest's run.
#[derive(Clone, Copy, Debug)]
pub enum GuestStep {
    /// `lbx-kernel-check`: feature probe and the object's load.
    KernelCheck,
    /// `lbx-vmnet guest` in the guest, `lbx-vmnet client` here.
    NativeXdp,
    /// An integration-test target of lb-tests.
    LibTest {
        target: &'static str,
        selection: Selection,
    },
}

impl GuestStep {
    pub fn name(&self) -> &'static str {
        match self {
            GuestStep::KernelCheck => "kernel_check",
            GuestStep::NativeXdp => "native_xdp",
            GuestStep::LibTest { target, .. } => target,
        }
    }

    /// The step's own bound inside the guest (`timeout`), under TCG.
    fn timeout(&self) -> Duration {
        Duration::from_secs(match self {
            GuestStep::KernelCheck => 300,
            GuestStep::NativeXdp => 420,
            GuestStep::LibTest { .. } => 900,
        })
    }
}

/// What every guest runs, in order.
pub const PLAN: &[GuestStep] = &[
    GuestStep::KernelCheck,
    GuestStep::NativeXdp,
    GuestStep::LibTest {
        target: "xdp_fixtures",
        selection: Selection::All,
    },
    GuestStep::LibTest {
        target: "attach",
        selection: Selection::All,
    },
    GuestStep::LibTest {
        target: "netns_dataplane",
        // Measured under TCG on 6.12 (each on its own): nodeport 63 s, bypass 72 s,
        // client_ip 46 s, kernel-carries 36 s; left to the host: teardown 68 s, established
        // 59 s (its conntrack logic is also in the fixtures), snat_exhausted 28 s.
        selection: Selection::Only(&[
            // The data path: TCP, UDP, the LB IP, local and remote pods.
            "nodeport_tcp_udp_and_lb_ip_reach_pods_on_both_nodes",
            // SNAT to remote pods, client IP kept for local ones.
            "client_ip_kept_for_local_pods_and_snat_for_remote_ones",
            // The kernel's netfilter never sees accelerated flows (nftables counters).
            "accelerated_flows_bypass_netfilter_on_the_node",
            // XDP_PASS hands flows lbx does not own to the kernel's NAT, intact.
            "connections_the_kernel_carries_stay_with_it_when_lbx_takes_over",
        ]),
    },
    GuestStep::LibTest {
        target: "netns_tunnel",
        // Tunnel delivery needs bpf_skb_adjust_room's encapsulation flags and XDP head
        // adjustment on each kernel, and the ICMP error of a tunnelled flow is built and
        // translated by both programs (TC on the owning node, XDP on the one holding the
        // flow); the bulk transfers (15 MB each, slow under TCG) are left to the host.
        selection: Selection::Only(&[
            "pods_on_the_other_node_see_the_client_through_the_tunnel_and_netfilter_sees_nothing",
            "a_closed_udp_port_on_a_pod_behind_the_tunnel_refuses_the_client",
        ]),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("the kernel matrix boots VMs and creates network namespaces: run it as root")]
    NotRoot,
    #[error("building the test binaries failed")]
    Build {
        #[source]
        source: CmdError,
    },
    #[error("cargo built no {what}; its JSON output had no such artifact")]
    NoArtifact { what: String },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("`{exe} --list` failed: {detail}")]
    List { exe: String, detail: String },
    #[error(
        "{target}: the kernel matrix selects {missing:?}, which the target does not have \
         (renamed or removed?); update PLAN in xtask/src/matrix.rs"
    )]
    UnknownTests {
        target: &'static str,
        missing: Vec<&'static str>,
    },
    #[error("setting up the host side of the guest's NIC failed: {detail}")]
    HostNet { detail: String },
    #[error("unknown kernel {label:?}; the matrix has {}", MATRIX.iter().map(|k| k.label).collect::<Vec<_>>().join(", "))]
    UnknownKernel { label: String },
    #[error("{failed} of {total} kernels failed: {}", names.join(", "))]
    Failed {
        failed: usize,
        total: usize,
        names: Vec<String>,
    },
}

/// The binaries a guest runs, all built on this host.
#[derive(Clone, Debug)]
struct Binaries {
    /// Directory of lb-user, lbx-podserver, lbx-vmnet, lbx-kernel-check (target/release).
    bin_dir: PathBuf,
    /// Integration-test executables by target name.
    tests: BTreeMap<String, PathBuf>,
}

/// Runs the matrix over `only` (every kernel when empty). Prints per-kernel results and
/// fails if any kernel failed.
pub fn run(only: &[String]) -> Result<(), MatrixError> {
    if !cmd::is_root() {
        return Err(MatrixError::NotRoot);
    }
    let started = Instant::now();
    let specs: Vec<KernelSpec> = if only.is_empty() {
        MATRIX.to_vec()
    } else {
        only.iter()
            .map(|label| {
                MATRIX
                    .iter()
                    .find(|k| k.label == label)
                    .copied()
                    .ok_or_else(|| MatrixError::UnknownKernel {
                        label: label.clone(),
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let bins = build()?;
    let selections = list_selections(&bins)?;
    for line in &selections {
        println!("kernels: {line}");
    }
    let kernels: Vec<Kernel> = specs
        .into_iter()
        .map(kernels::prepare)
        .collect::<Result<_, _>>()?;
    cleanup_stale_namespaces();
    let root = cmd::workspace_root().join("target").join("lbx-kernels");
    let accel = choose_accel(&kernels[0], &root.join("kvm-probe"));
    let mut reports = Vec::new();
    for kernel in &kernels {
        let report = run_kernel(kernel, accel, &bins, &root.join(kernel.spec.label));
        println!("kernels: {}", report.summary());
        reports.push(report);
    }
    println!(
        "\nkernels: matrix done in {} ({accel}; tests on the host run in the other steps)",
        fmt_duration(started.elapsed())
    );
    for r in &reports {
        println!("  {}", r.summary());
    }
    let summary_path = root.join("summary.txt");
    let text: String = reports.iter().map(|r| r.summary() + "\n").collect();
    let _ = fs::write(&summary_path, text);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.label.clone())
        .collect();
    let (passed_tests, failed_tests) = reports.iter().fold((0, 0), |(p, f), r| {
        (p + r.passed_count(), f + r.failed_count())
    });
    println!("kernels: {passed_tests} passed, {failed_tests} failed");
    if failed.is_empty() {
        Ok(())
    } else {
        Err(MatrixError::Failed {
            failed: failed.len(),
            total: reports.len(),
            names: failed,
        })
    }
}

/// Builds lb-user's binary, lb-tests' binaries and test executables (release, as the host
/// run) and finds them in cargo's JSON messages.
fn build() -> Result<Binaries, MatrixError> {
    let root = cmd::workspace_root();
    let mut bins = cmd::cargo();
    bins.current_dir(&root).args([
        "build",
        "--release",
        "--message-format=json-render-diagnostics",
        "-p",
        "lb-user",
        "--bin",
        "lb-user",
        "-p",
        "lb-tests",
        "--bins",
    ]);
    let bin_artifacts = artifacts(&mut bins)?;
    let mut tests = cmd::cargo();
    tests.current_dir(&root).args([
        "test",
        "--release",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "-p",
        "lb-tests",
    ]);
    let test_artifacts = artifacts(&mut tests)?;
    let lb_user = bin_artifacts
        .iter()
        .find(|a| a.kind == "bin" && a.name == "lb-user")
        .ok_or(MatrixError::NoArtifact {
            what: "lb-user binary".into(),
        })?;
    let bin_dir = lb_user
        .executable
        .parent()
        .expect("an executable has a directory")
        .to_owned();
    for name in ["lbx-podserver", "lbx-vmnet", "lbx-kernel-check"] {
        if !bin_dir.join(name).is_file() {
            return Err(MatrixError::NoArtifact {
                what: format!("{name} in {}", bin_dir.display()),
            });
        }
    }
    let tests = test_artifacts
        .into_iter()
        .filter(|a| a.kind == "test")
        .map(|a| (a.name, a.executable))
        .collect();
    Ok(Binaries { bin_dir, tests })
}

/// One executable cargo reported.
struct Artifact {
    kind: String,
    name: String,
    executable: PathBuf,
}

fn artifacts(command: &mut Command) -> Result<Vec<Artifact>, MatrixError> {
    println!("kernels: {}", cmd::describe(command));
    let out = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| MatrixError::Build {
            source: CmdError::Spawn {
                command: cmd::describe(command),
                program: "cargo".into(),
                source,
            },
        })?;
    if !out.status.success() {
        return Err(MatrixError::Build {
            source: CmdError::Failed {
                command: cmd::describe(command),
                status: out.status,
            },
        });
    }
    Ok(parse_artifacts(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_artifacts(json_lines: &str) -> Vec<Artifact> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter_map(|v| {
            Some(Artifact {
                kind: v["target"]["kind"][0].as_str()?.to_owned(),
                name: v["target"]["name"].as_str()?.to_owned(),
                executable: PathBuf::from(v["executable"].as_str()?),
            })
        })
        .collect()
}

/// Checks every [`Selection::Only`] against the target's `--list` and describes what runs
/// in the guests and what only on the host.
fn list_selections(bins: &Binaries) -> Result<Vec<String>, MatrixError> {
    let mut lines = Vec::new();
    for step in PLAN {
        let GuestStep::LibTest { target, selection } = step else {
            continue;
        };
        let exe = test_exe(bins, target)?;
        let out = Command::new(&exe)
            .args(["--list", "--format", "terse"])
            .output()
            .map_err(|e| MatrixError::List {
                exe: exe.display().to_string(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(MatrixError::List {
                exe: exe.display().to_string(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let all = parse_list(&String::from_utf8_lossy(&out.stdout));
        lines.push(match selection {
            Selection::All => format!("{target}: all {} tests in every guest", all.len()),
            Selection::Only(names) => {
                let missing: Vec<&'static str> = names
                    .iter()
                    .copied()
                    .filter(|n| !all.iter().any(|a| a == n))
                    .collect();
                if !missing.is_empty() {
                    return Err(MatrixError::UnknownTests { target, missing });
                }
                let host_only: Vec<&String> = all
                    .iter()
                    .filter(|a| !names.contains(&a.as_str()))
                    .collect();
                format!(
                    "{target}: {} of {} tests in every guest ({}); on the host only: {}",
                    names.len(),
                    all.len(),
                    names.join(", "),
                    host_only
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        });
    }
    Ok(lines)
}

/// Test names from libtest's `--list --format terse` (`name: test`).
fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

fn test_exe(bins: &Binaries, target: &str) -> Result<PathBuf, MatrixError> {
    bins.tests
        .get(target)
        .cloned()
        .ok_or_else(|| MatrixError::NoArtifact {
            what: format!("test executable of lb-tests' {target}"),
        })
}

/// KVM when a probe guest boots under it, else TCG; says which and why.
fn choose_accel(kernel: &Kernel, dir: &Path) -> Accel {
    match vm::probe_kvm(kernel, dir) {
        Ok(took) => {
            println!(
                "kernels: accelerator: KVM (a probe guest reached its initramfs in {:.1}s)",
                took.as_secs_f64()
            );
            Accel::Kvm
        }
        Err(why) => {
            println!(
                "kernels: accelerator: TCG (emulation, slower) because KVM is unusable: {why}"
            );
            Accel::Tcg
        }
    }
}

/// The outcome of one step in one guest.
#[derive(Debug, Clone)]
struct StepResult {
    name: &'static str,
    passed: usize,
    failed: usize,
    /// What went wrong beyond failed tests (exit code, counts that do not add up).
    problem: Option<String>,
    seconds: Option<u64>,
}

/// The outcome of one kernel.
#[derive(Debug)]
struct KernelReport {
    label: String,
    package: String,
    accel: Accel,
    elapsed: Duration,
    steps: Vec<StepResult>,
    /// Failure of the boot itself (timeout, qemu error, missing results).
    problem: Option<String>,
}

impl KernelReport {
    fn passed_count(&self) -> usize {
        self.steps.iter().map(|s| s.passed).sum()
    }
    fn failed_count(&self) -> usize {
        self.steps.iter().map(|s| s.failed).sum()
    }
    fn passed(&self) -> bool {
        self.problem.is_none()
            && self.steps.len() == PLAN.len()
            && self
                .steps
                .iter()
                .all(|s| s.failed == 0 && s.problem.is_none() && s.passed > 0)
    }

    fn summary(&self) -> String {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|s| {
                let mut t = format!("{} {}/{}", s.name, s.passed, s.passed + s.failed);
                if let Some(secs) = s.seconds {
                    t.push_str(&format!(" ({secs}s)"));
                }
                if let Some(p) = &s.problem {
                    t.push_str(&format!(" [{p}]"));
                }
                t
            })
            .collect();
        format!(
            "{} {} ({}, {}) in {}: {} passed, {} failed; {}{}",
            self.label,
            if self.passed() { "PASSED" } else { "FAILED" },
            self.package,
            self.accel,
            fmt_duration(self.elapsed),
            self.passed_count(),
            self.failed_count(),
            steps.join(", "),
            self.problem
                .as_ref()
                .map(|p| format!("; {p}"))
                .unwrap_or_default()
        )
    }
}

fn run_kernel(kernel: &Kernel, accel: Accel, bins: &Binaries, out: &Path) -> KernelReport {
    let started = Instant::now();
    let label = kernel.spec.label.to_string();
    println!(
        "\nkernels: === {label}: {} {} ({}), {accel} ===",
        kernel.package, kernel.version, kernel.release
    );
    let mut report = KernelReport {
        label: label.clone(),
        package: format!("{} {}", kernel.package, kernel.version),
        accel,
        elapsed: Duration::ZERO,
        steps: Vec::new(),
        problem: None,
    };
    match boot(kernel, accel, bins, out) {
        Ok(()) => {}
        Err(problem) => report.problem = Some(problem),
    }
    report.steps = PLAN.iter().map(|s| read_step(s, out)).collect();
    report.elapsed = started.elapsed();
    report
}

/// Boots the kernel with the run's guest script and the host client; Err describes a
/// failure of the boot itself (the steps' results are read from `out` either way).
fn boot(kernel: &Kernel, accel: Accel, bins: &Binaries, out: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let script = guest_script(kernel, bins, out).map_err(|e| e.to_string())?;
    let script_path = out.join("guest.sh");
    fs::write(&script_path, script).map_err(|e| format!("writing the guest script: {e}"))?;
    let host = HostNet::create(kernel.spec.label).map_err(|e| e.to_string())?;
    let timeout = PLAN.iter().map(GuestStep::timeout).sum::<Duration>() + BOOT_ALLOWANCE;
    let spec = VmSpec {
        kernel: kernel.clone(),
        accel,
        out_dir: out.to_owned(),
        guest_script: script_path,
        nic: Some(Nic {
            netns: host.name.clone(),
            tap: TAP.into(),
            mac: lb_tests_guest_mac().into(),
            queues: NIC_QUEUES,
        }),
        host_paths: vec![
            cmd::workspace_root(),
            bins.bin_dir.clone(),
            kernel.modules.clone(),
        ],
        memory_mib: GUEST_MEMORY_MIB,
        cpus: GUEST_CPUS,
        timeout,
    };
    let mut client: Option<ClientRun> = None;
    let vmnet = bins.bin_dir.join("lbx-vmnet");
    let label = kernel.spec.label;
    let client_log = out.join("native_xdp-client.log");
    let outcome = vm::run(&spec, &mut |line: &str| {
        if line.starts_with(VMNET_READY) && client.is_none() {
            client = Some(ClientRun::start(&host.name, &vmnet, label, &client_log));
        }
    });
    let client_status = match client {
        Some(run) => run.finish(CLIENT_GRACE),
        None => Err("the guest never became ready for the client".into()),
    };
    if let Err(e) = &client_status {
        let _ = fs::write(out.join("native_xdp-client.problem"), e);
    }
    drop(host);
    match outcome {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "qemu exited with {} after {}: {}",
            o.status,
            fmt_duration(o.elapsed),
            o.qemu_stderr.trim()
        )),
        Err(e @ VmError::Timeout { .. }) => Err(e.to_string()),
        Err(e) => Err(format!("booting the guest failed: {e}")),
    }
}

/// What `lbx-vmnet guest` prints when the client may start (`lb_tests::vmnet::READY_MARKER`;
/// xtask does not link lb-tests).
const VMNET_READY: &str = "lbx-vmnet: guest ready";

/// `lb_tests::vmnet::GUEST_MAC`.
fn lb_tests_guest_mac() -> &'static str {
    "02:78:00:00:00:0a"
}

/// The host client of the native XDP step, its output saved and prefixed.
struct ClientRun {
    child: Child,
    reader: std::thread::JoinHandle<()>,
}

impl ClientRun {
    fn start(netns: &str, vmnet: &Path, label: &str, log: &Path) -> Self {
        println!("[{label} host] starting the client in {netns}");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(vmnet)
            .arg("client")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The client dies with us (its pid is `ip netns exec`'s: it execs in place).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawning `ip netns exec`");
        let stdout = child.stdout.take().expect("piped");
        let label = label.to_string();
        let log = log.to_owned();
        let reader = std::thread::spawn(move || {
            let mut file = fs::File::create(&log).ok();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[{label} host] {line}");
                if let Some(f) = file.as_mut() {
                    let _ = std::io::Write::write_all(f, format!("{line}\n").as_bytes());
                }
            }
        });
        ClientRun { child, reader }
    }

    /// Waits up to `grace` for the client; Err if it failed or had to be killed.
    fn finish(mut self, grace: Duration) -> Result<(), String> {
        let deadline = Instant::now() + grace;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break None,
            }
        };
        let result = match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(format!("the host client exited with {s}")),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(format!(
                    "the host client was still running {}s after the guest ended; killed",
                    grace.as_secs()
                ))
            }
        };
        let _ = self.reader.join();
        result
    }
}

/// The guest's PID 1 script: mounts, module autoloading from the cached tree, then every
/// step of [`PLAN`] under `timeout`, its output teed to `<out>/<step>.log` and its exit code
/// to `<out>/<step>.rc`; then a power-off.
fn guest_script(kernel: &Kernel, bins: &Binaries, out: &Path) -> Result<String, MatrixError> {
    let tree = kernel
        .modules
        .ancestors()
        .nth(3)
        .expect("modules lives at <tree>/lib/modules/<release>");
    let bin = |name: &str| bins.bin_dir.join(name).display().to_string();
    let mut steps = String::new();
    for step in PLAN {
        let argv: Vec<String> = match step {
            GuestStep::KernelCheck => vec![bin("lbx-kernel-check")],
            GuestStep::NativeXdp => vec![
                bin("lbx-vmnet"),
                "guest".into(),
                "--iface".into(),
                "eth0".into(),
                "--agent".into(),
                bin("lb-user"),
                "--podserver".into(),
                bin("lbx-podserver"),
                "--wait-s".into(),
                "240".into(),
            ],
            GuestStep::LibTest { target, selection } => {
                let mut argv = vec![
                    test_exe(bins, target)?.display().to_string(),
                    "--test-threads=1".into(),
                ];
                if let Selection::Only(names) = selection {
                    argv.push("--exact".into());
                    argv.extend(names.iter().map(|n| n.to_string()));
                }
                argv
            }
        };
        let quoted: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
        steps.push_str(&format!(
            "step {} {} {}\n",
            step.name(),
            step.timeout().as_secs(),
            quoted.join(" ")
        ));
    }
    Ok(format!(
        r#"#!/bin/sh
# Written by `cargo xtask test --kernels`: PID 1 of the {label} guest ({package}).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp TMPDIR=/tmp LBX_SKIP_BUILD=1
OUT={out}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t bpf bpf /sys/fs/bpf
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
# The host has no /lib/modules of this kernel: the kernel's module requests (veth, nf_tables,
# sch_ingress, ...) go through modprobe over the unpacked package instead.
printf '#!/bin/sh\nexec /sbin/modprobe -d {tree} "$@"\n' > /run/lbx-modprobe
chmod 755 /run/lbx-modprobe
echo /run/lbx-modprobe > /proc/sys/kernel/modprobe
ip link set lo up
/run/lbx-modprobe virtio_net || echo "lbx-vm: modprobe virtio_net failed"
echo "lbx-vm: guest up: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {{print $2 " kB"}}' /proc/meminfo)"
step() {{
    name=$1; secs=$2; shift 2
    echo "lbx-vm: step $name: $*"
    t0=$(date +%s)
    {{ timeout -k 10 "$secs" "$@"; echo $? > "$OUT/$name.rc"; }} 2>&1 | tee "$OUT/$name.log"
    t=$(( $(date +%s) - t0 ))
    echo "$t" > "$OUT/$name.seconds"
    echo "lbx-vm: step $name: exit $(cat "$OUT/$name.rc") after ${{t}}s"
}}
cd {workspace}
{steps}echo "lbx-vm: all steps done"
sync
exec /bin/busybox poweroff -f
"#,
        label = kernel.spec.label,
        package = kernel.package,
        out = shell_quote(&out.display().to_string()),
        tree = tree.display(),
        workspace = shell_quote(&cmd::workspace_root().display().to_string()),
    ))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Reads a step's `.rc`, `.seconds` and log (and, for native XDP, the client's log).
fn read_step(step: &GuestStep, out: &Path) -> StepResult {
    let name = step.name();
    let read = |file: String| fs::read_to_string(out.join(file)).ok();
    let rc: Option<i32> = read(format!("{name}.rc")).and_then(|s| s.trim().parse().ok());
    let seconds = read(format!("{name}.seconds")).and_then(|s| s.trim().parse().ok());
    let log = read(format!("{name}.log")).unwrap_or_default();
    let mut result = StepResult {
        name,
        passed: 0,
        failed: 0,
        problem: None,
        seconds,
    };
    let Some(rc) = rc else {
        result.failed = 1;
        result.problem = Some("did not run to the end (no exit code)".into());
        return result;
    };
    match step {
        GuestStep::KernelCheck => {
            if rc == 0 {
                result.passed = 1;
            } else {
                result.failed = 1;
                result.problem = Some(format!("exit {rc}"));
            }
        }
        GuestStep::NativeXdp => {
            let client = read("native_xdp-client.log".into()).unwrap_or_default();
            let (p, f) = libtest_counts(&client).unwrap_or((0, 0));
            // The guest half is one more check: its setup, the agent's teardown.
            let guest_ok = rc == 0;
            result.passed = p + usize::from(guest_ok);
            result.failed = f + usize::from(!guest_ok);
            let client_problem = read("native_xdp-client.problem".into());
            result.problem = match (guest_ok, client_problem) {
                (true, None) if p > 0 => None,
                (true, None) => Some("the host client reported no results".into()),
                (false, _) => Some(format!("guest half exit {rc}")),
                (true, Some(p)) => Some(p),
            };
        }
        GuestStep::LibTest { selection, .. } => {
            let (p, f) = libtest_counts(&log).unwrap_or((0, 0));
            result.passed = p;
            result.failed = f;
            let expected = match selection {
                Selection::All => None,
                Selection::Only(names) => Some(names.len()),
            };
            if rc != 0 && f == 0 {
                result.failed = 1;
                result.problem = Some(format!("exit {rc}"));
            } else if let Some(n) = expected.filter(|n| p + f != *n) {
                result.problem = Some(format!("{} tests ran, {n} selected", p + f));
            } else if rc != 0 {
                result.problem = Some(format!("exit {rc}"));
            }
        }
    }
    result
}

/// Sums libtest's `test result: ... N passed; M failed; ...` lines.
fn libtest_counts(log: &str) -> Option<(usize, usize)> {
    let mut found = None;
    for line in log.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        let num = |label: &str| -> Option<usize> {
            rest.split(';').map(str::trim).find_map(|part| {
                let part = part.split_once(". ").map_or(part, |(_, p)| p);
                part.strip_suffix(label)?.trim().parse().ok()
            })
        };
        let (p, f) = (num("passed")?, num("failed")?);
        let (tp, tf) = found.unwrap_or((0, 0));
        found = Some((tp + p, tf + f));
    }
    found
}

/// The host namespace holding the tap of one guest's NIC: `lbx-<pid>-<n>-vm<kernel>`,
/// deleted (with the tap) on drop.
struct HostNet {
    name: String,
}

impl HostNet {
    fn create(label: &str) -> Result<Self, MatrixError> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "lbx-{}-{}-vm{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            label.replace('.', "")
        );
        let fail = |detail: String| MatrixError::HostNet { detail };
        ip(&["netns", "add", &name]).map_err(fail)?;
        let net = HostNet { name };
        let n = net.name.as_str();
        let cidr = "10.78.0.1/24";
        for args in [
            vec!["-n", n, "link", "set", "lo", "up"],
            vec![
                "-n",
                n,
                "tuntap",
                "add",
                "dev",
                TAP,
                "mode",
                "tap",
                "multi_queue",
                "vnet_hdr",
            ],
            vec!["-n", n, "addr", "add", cidr, "dev", TAP],
            vec!["-n", n, "link", "set", TAP, "up"],
        ] {
            ip(&args).map_err(fail)?;
        }
        println!("kernels: host side of the guest NIC: {TAP} ({cidr}) in namespace {n}");
        Ok(net)
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("kernels: removing namespace {}: {e}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes `lbx-<pid>-<n>-vm*` namespaces of matrix runs whose process is gone.
fn cleanup_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = stale_matrix_pid(name) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        match ip(&["netns", "del", name]) {
            Ok(_) => println!("kernels: removed stale namespace {name}"),
            Err(e) => eprintln!("kernels: {e}"),
        }
    }
}

/// The creator pid of a matrix namespace name `lbx-<pid>-<n>-vm<label>`.
fn stale_matrix_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix("lbx-")?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next()?.strip_prefix("vm")?;
    Some(pid)
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_results_are_summed() {
        let log = "running 17 tests\ntest a ... ok\n\ntest result: ok. 17 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 22.01s\n";
        assert_eq!(libtest_counts(log), Some((17, 0)));
        let two = "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 4 filtered out; finished in 1s\ntest result: ok. 3 passed; 0 failed; 0 ignored\n";
        assert_eq!(libtest_counts(two), Some((5, 1)));
        assert_eq!(libtest_counts("thread 'main' panicked"), None);
    }

    #[test]
    fn list_output_parsed() {
        let text = "a_test: test\nother::b: test\nbench_x: benchmark\n\n2 tests, 0 benchmarks\n";
        assert_eq!(parse_list(text), ["a_test", "other::b"]);
    }

    #[test]
    fn matrix_namespaces_recognised() {
        assert_eq!(stale_matrix_pid("lbx-123-0-vm61"), Some(123));
        assert_eq!(stale_matrix_pid("lbx-123-0-net"), None);
        assert_eq!(stale_matrix_pid("lbx-abc-0-vm61"), None);
        assert_eq!(stale_matrix_pid("other"), None);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn plan_steps_are_named_uniquely() {
        let mut names: Vec<&str> = PLAN.iter().map(GuestStep::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PLAN.len());
    }

    #[test]
    fn artifacts_read_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"attach"},"executable":"/t/release/deps/attach-1"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"lb_user"},"executable":null}
{"reason":"build-finished","success":true}"#;
        let a = parse_artifacts(json);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].name, "attach");
        assert_eq!(a[0].executable, PathBuf::from("/t/release/deps/attach-1"));
    }
}
