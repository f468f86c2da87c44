//! Developer commands. `cargo xtask` is an alias (.cargo/config.toml) for running this crate.

mod cmd;
mod k8s;
mod kernels;
mod matrix;
mod run_bin;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lb_ebpf_build::{EbpfBuild, Profile};

use crate::run_bin::Suite;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "lbx developer commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools (Debian packages, bpf-linker); idempotent.
    Setup,
    /// Build the BPF object (lb-ebpf) and print its path.
    BuildEbpf {
        /// Build with lb-ebpf's dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Run every test and the format check: the command CI runs. Needs root.
    Test {
        /// Run only the kernel matrix: the tests inside Debian's 6.1 and 6.12 kernels
        /// under qemu (see `cargo xtask kernels`).
        #[arg(long)]
        kernels: bool,
    },
    /// The kernel matrix alone (what `cargo xtask test --kernels` runs): Debian's kernels
    /// fetched and cached, booted under qemu (KVM if it boots them, else TCG), the BPF
    /// object loaded, fixtures, attach tests, a data-path subset and native XDP on
    /// virtio-net inside each. Needs root.
    Kernels {
        /// Only this kernel of the matrix (repeatable), e.g. `--kernel 6.1`.
        #[arg(long = "kernel", value_name = "SERIES")]
        only: Vec<String>,
    },
    /// Run a benchmark suite (lbx-bench, tests/bench) in release mode; extra arguments go to
    /// the suite.
    Bench {
        suite: Suite,
        /// Passed to the suite's binary, e.g. `--json results.json`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the lab demo (lbx-lab's lbx-demo binary, tests/lab) in release mode.
    Demo {
        /// Passed to lbx-demo.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The side-by-side lab (the main job): instance mode through a real kube-proxy vs the
    /// XDP path vs ip mode on one Service, measured and plotted (the lbx-lab crate's
    /// binary, tests/lab, release build). Installs and builds what it needs first.
    Lab {
        action: run_bin::LabAction,
        /// Passed to `lbx-lab <action>`, e.g. `--json lab.json --html lab.html`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build kube-apiserver, kube-controller-manager and kube-proxy from the Go module proxy
    /// into ~/.cache/lbx/k8s/<version>/bin; cached per version.
    K8sBuild {
        /// Kubernetes release to build, 1.<minor>.<patch>.
        #[arg(long, default_value = k8s::DEFAULT_VERSION)]
        version: k8s::KubeVersion,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<ExitCode> {
    match task {
        Task::Setup => setup::run()?,
        Task::BuildEbpf { debug } => {
            setup::run()?;
            let profile = if debug {
                Profile::Debug
            } else {
                Profile::Release
            };
            let object = EbpfBuild::new(cmd::workspace_root())
                .profile(profile)
                .run()
                .context("cargo xtask build-ebpf")?;
            println!("{}", object.display());
        }
        Task::Test { kernels } => test::run(kernels)?,
        Task::Kernels { only } => {
            setup::run()?;
            matrix::run(&only).context("cargo xtask kernels")?;
        }
        Task::Bench { suite, args } => {
            // The suite builds lb-user, whose build script needs the eBPF toolchain.
            setup::run()?;
            return Ok(exit_code(run_bin::run(suite.binary(), &args)?));
        }
        Task::Demo { args } => {
            setup::run()?;
            return Ok(exit_code(run_bin::run(run_bin::DEMO, &args)?));
        }
        Task::Lab { action, args } => {
            let mut forwarded = vec![action.name().to_string()];
            forwarded.extend(args);
            let mut command = run_bin::command(run_bin::LAB, &forwarded);
            if action != run_bin::LabAction::Down {
                if !cmd::is_root() {
                    anyhow::bail!(
                        "the lab creates network namespaces and loads BPF programs: run it as root"
                    );
                }
                setup::run()?;
                test::control_plane_binaries()?.export(&mut command);
            }
            return Ok(exit_code(run_bin::run_with(command)?));
        }
        Task::K8sBuild { version } => {
            k8s::run(version).context("cargo xtask k8s-build")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A child's exit code, or failure if a signal ended it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
