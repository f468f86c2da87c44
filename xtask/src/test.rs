//! `cargo xtask test`: the project's one test command, run by developers, the README and CI.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    cmd::{self, CmdError},
    k8s::{self, K8sError, KubeVersion},
    setup::{self, SetupError},
};

/// Where the control-plane fixture (lb-tests' `controlplane` module) finds its binaries.
pub const K8S_BIN_DIR_ENV: &str = "LBX_K8S_BIN_DIR";
pub const ETCD_BIN_ENV: &str = "LBX_ETCD_BIN";

/// The packages whose tests create network namespaces, attach programs or run the real
/// control plane: the harness with the product's integration tests (lb-tests) and the lab
/// (lbx-lab, whose `lab_compare` runs `lbx-lab` end to end). Their tests run in one step, one
/// at a time, and are left out of the parallel step.
const SERIAL_PACKAGES: [&str; 2] = ["lb-tests", "lbx-lab"];

#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(
        "`cargo xtask test` loads BPF programs and creates network namespaces, which needs \
         root: re-run as root, e.g. `sudo env PATH=\"$PATH\" cargo xtask test`"
    )]
    NotRoot,
    #[error("toolchain setup failed")]
    Setup {
        #[source]
        source: SetupError,
    },
    #[error(
        "building Kubernetes {} for the control-plane tests failed; `cargo xtask k8s-build` \
         shows the same error on its own",
        k8s::DEFAULT_VERSION
    )]
    K8s {
        #[source]
        source: K8sError,
    },
    #[error("{} of {total} test steps failed: {}", failed.len(), failed.join(", "))]
    StepsFailed { failed: Vec<String>, total: usize },
}

/// One command of the test run.
struct Step {
    name: &'static str,
    command: Command,
}

/// Runs every step even after a failure (CI then reports all problems at once) and prints a
/// summary line. `kernels_only`: just the kernel matrix step.
pub fn run(kernels_only: bool) -> Result<(), TestError> {
    if !cmd::is_root() {
        return Err(TestError::NotRoot);
    }
    setup::run().map_err(|source| TestError::Setup { source })?;
    let binaries = if kernels_only {
        None
    } else {
        Some(control_plane_binaries()?)
    };
    let started = Instant::now();
    let mut steps = binaries.as_ref().map(steps).unwrap_or_default();
    steps.push(kernel_matrix_step());
    let total = steps.len();
    let mut failed = Vec::new();
    for Step { name, mut command } in steps {
        eprintln!("xtask test: {name}: {}", cmd::describe(&command));
        if let Err(err) = cmd::run(&mut command) {
            eprintln!("xtask test: {name}: FAILED: {}", error_chain(&err));
            failed.push(name.to_owned());
        }
    }
    let elapsed = format_duration(started.elapsed());
    if failed.is_empty() {
        println!("xtask test: all {total} steps passed in {elapsed}");
        Ok(())
    } else {
        println!(
            "xtask test: FAILED {} of {total} steps ({}) in {elapsed}",
            failed.len(),
            failed.join(", ")
        );
        Err(TestError::StepsFailed { failed, total })
    }
}

/// The binaries the real-API-server tests run, exported to every step.
pub struct ControlPlaneBinaries {
    k8s_bin_dir: PathBuf,
    etcd: PathBuf,
}

impl ControlPlaneBinaries {
    /// Points `command` at these binaries (the lb-tests fixtures read the variables).
    pub fn export(&self, command: &mut Command) {
        command
            .env(K8S_BIN_DIR_ENV, &self.k8s_bin_dir)
            .env(ETCD_BIN_ENV, &self.etcd);
    }
}

/// Builds (or finds cached) the Kubernetes binaries and unpacks (or finds cached) etcd.
pub fn control_plane_binaries() -> Result<ControlPlaneBinaries, TestError> {
    let version: KubeVersion = k8s::DEFAULT_VERSION
        .parse()
        .map_err(|source| TestError::K8s { source })?;
    let k8s_bin_dir = k8s::run(version).map_err(|source| TestError::K8s { source })?;
    let etcd = setup::etcd().map_err(|source| TestError::Setup { source })?;
    Ok(ControlPlaneBinaries { k8s_bin_dir, etcd })
}

/// Release builds so BPF and namespace tests run at realistic speed.
fn steps(binaries: &ControlPlaneBinaries) -> Vec<Step> {
    let mut crates = cmd::cargo();
    crates.args(["test", "--workspace", "--release"]);
    let mut integration = cmd::cargo();
    integration.args(["test", "--release"]);
    for package in SERIAL_PACKAGES {
        crates.args(["--exclude", package]);
        integration.args(["--package", package]);
    }
    integration.args(["--", "--test-threads=1"]);
    let mut fmt = cmd::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let root = cmd::workspace_root();
    for command in [&mut crates, &mut integration, &mut fmt] {
        command.current_dir(&root);
        binaries.export(command);
    }
    vec![
        Step {
            name: "crate tests",
            command: crates,
        },
        Step {
            name: "integration tests (serial)",
            command: integration,
        },
        Step {
            name: "formatting",
            command: fmt,
        },
    ]
}

/// The kernel matrix (xtask/src/matrix.rs), run as `xtask kernels` in a child process like
/// every other step, after the host's own steps.
fn kernel_matrix_step() -> Step {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cargo-xtask"));
    let mut command = Command::new(exe);
    command.arg("kernels").current_dir(cmd::workspace_root());
    Step {
        name: "kernel matrix (Debian 6.1, 6.12 under qemu)",
        command,
    }
}

fn error_chain(err: &CmdError) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}

fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integration_tests_run_serially_and_are_not_run_twice() {
        let steps = steps(&binaries());
        let args = |i: usize| -> Vec<String> {
            steps[i]
                .command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        // The values of every `flag` before the `--` separator.
        let values = |args: &[String], flag: &str| -> Vec<String> {
            let own = args.split(|a| a == "--").next().unwrap_or_default();
            own.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].clone())
                .collect()
        };
        let crates = args(0);
        assert!(crates.contains(&"--workspace".to_owned()));
        assert!(crates.contains(&"--release".to_owned()));
        let integration = args(1);
        assert!(!integration.contains(&"--workspace".to_owned()));
        assert!(integration.contains(&"--release".to_owned()));
        // Every serial package is left out of the parallel step and run in the serial one,
        // and nothing else is: nothing runs twice, nothing is dropped.
        assert_eq!(values(&crates, "--exclude"), SERIAL_PACKAGES);
        assert_eq!(values(&integration, "--package"), SERIAL_PACKAGES);
        assert!(values(&crates, "--package").is_empty());
        assert_eq!(
            integration.last().map(String::as_str),
            Some("--test-threads=1")
        );
        assert_eq!(args(2), ["fmt", "--all", "--", "--check"]);
    }

    fn binaries() -> ControlPlaneBinaries {
        ControlPlaneBinaries {
            k8s_bin_dir: PathBuf::from("/cache/k8s/bin"),
            etcd: PathBuf::from("/cache/etcd/usr/bin/etcd"),
        }
    }

    #[test]
    fn control_plane_binaries_are_exported_to_every_step() {
        for step in steps(&binaries()) {
            let envs: Vec<(String, String)> = step
                .command
                .get_envs()
                .filter_map(|(k, v)| {
                    Some((
                        k.to_string_lossy().into_owned(),
                        v?.to_string_lossy().into_owned(),
                    ))
                })
                .collect();
            assert!(
                envs.contains(&(K8S_BIN_DIR_ENV.into(), "/cache/k8s/bin".into())),
                "{}: {envs:?}",
                step.name
            );
            assert!(
                envs.contains(&(ETCD_BIN_ENV.into(), "/cache/etcd/usr/bin/etcd".into())),
                "{}: {envs:?}",
                step.name
            );
        }
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
    }
}
