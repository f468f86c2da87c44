//! `cargo xtask bench`, `cargo xtask demo` and `cargo xtask lab`: thin dispatchers to the
//! binaries of the lab crate (lbx-lab, `tests/lab`) and the benchmark crate (lbx-bench,
//! `tests/bench`), built in release so measurements mean something.

use std::process::{Command, ExitStatus};

use clap::ValueEnum;

use crate::cmd::{self, CmdError};

/// A binary of a workspace package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binary {
    pub package: &'static str,
    pub name: &'static str,
}

/// The package of the benchmark binaries.
const BENCH_PACKAGE: &str = "lbx-bench";
/// The package of the lab and the demo.
const LAB_PACKAGE: &str = "lbx-lab";

/// Benchmark suites, each a binary of lbx-bench named `bench-<suite>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// ns/packet of the XDP program through BPF_PROG_TEST_RUN at 1 to 10 000 services.
    Xdp,
    /// Agent sync time, update latency and memory at 1 to 10 000 Services against a real API
    /// server, with kube-proxy's sync of the same state as the reference.
    Agent,
}

impl Suite {
    pub fn binary(self) -> Binary {
        let name = match self {
            Suite::Xdp => "bench-xdp",
            Suite::Agent => "bench-agent",
        };
        Binary {
            package: BENCH_PACKAGE,
            name,
        }
    }
}

/// The end-to-end demo.
pub const DEMO: Binary = Binary {
    package: LAB_PACKAGE,
    name: "lbx-demo",
};

/// The side-by-side lab.
pub const LAB: Binary = Binary {
    package: LAB_PACKAGE,
    name: "lbx-lab",
};

/// What `cargo xtask lab` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LabAction {
    /// Build the lab, measure instance vs xdp vs ip, report, tear down.
    Compare,
    /// Build the lab and keep it until Ctrl-C or `lab down`.
    Up,
    /// Stop a running `lab up` and remove what killed runs left behind.
    Down,
}

impl LabAction {
    pub fn name(self) -> &'static str {
        match self {
            LabAction::Compare => "compare",
            LabAction::Up => "up",
            LabAction::Down => "down",
        }
    }
}

/// `cargo run --release -p <package> --bin <binary> -- <args>`, from the workspace root.
pub fn command(binary: Binary, args: &[String]) -> Command {
    let mut c = cmd::cargo();
    c.args([
        "run",
        "--release",
        "--package",
        binary.package,
        "--bin",
        binary.name,
        "--",
    ])
    .args(args)
    .current_dir(cmd::workspace_root());
    c
}

/// Runs the binary; its exit status becomes ours.
pub fn run(binary: Binary, args: &[String]) -> Result<ExitStatus, CmdError> {
    run_with(command(binary, args))
}

/// Runs a [`command`] (with its environment adjusted); its exit status becomes ours.
pub fn run_with(mut c: Command) -> Result<ExitStatus, CmdError> {
    eprintln!("xtask: {}", cmd::describe(&c));
    cmd::status(&mut c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn lab_actions_are_the_binary_subcommands() {
        let c = command(LAB, &[LabAction::Compare.name().into(), "--json".into()]);
        assert_eq!(
            args(&c)[2..],
            [
                "--package",
                "lbx-lab",
                "--bin",
                "lbx-lab",
                "--",
                "compare",
                "--json"
            ]
        );
        assert_eq!(
            [LabAction::Up.name(), LabAction::Down.name()],
            ["up", "down"]
        );
    }

    #[test]
    fn forwards_arguments_after_the_separator() {
        let c = command(Suite::Xdp.binary(), &["--json".into(), "out.json".into()]);
        assert_eq!(
            args(&c),
            [
                "run",
                "--release",
                "--package",
                "lbx-bench",
                "--bin",
                "bench-xdp",
                "--",
                "--json",
                "out.json"
            ]
        );
    }

    #[test]
    fn each_binary_runs_from_its_crate() {
        let run = |b: Binary| (b.package, b.name);
        assert_eq!(run(Suite::Agent.binary()), ("lbx-bench", "bench-agent"));
        assert_eq!(run(DEMO), ("lbx-lab", "lbx-demo"));
        assert_eq!(run(LAB), ("lbx-lab", "lbx-lab"));
    }
}
