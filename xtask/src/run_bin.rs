//! `cargo xtask bench` and `cargo xtask demo`: thin dispatchers to binaries of the lb-tests
//! crate, built in release so measurements mean something.

use std::process::{Command, ExitStatus};

use clap::ValueEnum;

use crate::cmd::{self, CmdError};

/// Benchmark suites, each a binary of lb-tests named `bench-<suite>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// ns/packet of the XDP program through BPF_PROG_TEST_RUN at 1 to 10 000 services.
    Xdp,
    /// Agent sync time, update latency and memory at 1 to 10 000 Services against a real API
    /// server, with kube-proxy's sync of the same state as the reference.
    Agent,
}

impl Suite {
    pub fn binary(self) -> &'static str {
        match self {
            Suite::Xdp => "bench-xdp",
            Suite::Agent => "bench-agent",
        }
    }
}

/// Binary of lb-tests that runs the end-to-end demo.
pub const DEMO_BINARY: &str = "lbx-demo";

/// Binary of lb-tests that runs the side-by-side lab.
pub const LAB_BINARY: &str = "lbx-lab";

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

/// `cargo run --release -p lb-tests --bin <binary> -- <args>`, from the workspace root.
pub fn command(binary: &str, args: &[String]) -> Command {
    let mut c = cmd::cargo();
    c.args([
        "run",
        "--release",
        "--package",
        "lb-tests",
        "--bin",
        binary,
        "--",
    ])
    .args(args)
    .current_dir(cmd::workspace_root());
    c
}

/// Runs the binary; its exit status becomes ours.
pub fn run(binary: &str, args: &[String]) -> Result<ExitStatus, CmdError> {
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

    #[test]
    fn lab_actions_are_the_binary_subcommands() {
        let c = command(
            LAB_BINARY,
            &[LabAction::Compare.name().into(), "--json".into()],
        );
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[5..], ["lbx-lab", "--", "compare", "--json"]);
        assert_eq!(
            [LabAction::Up.name(), LabAction::Down.name()],
            ["up", "down"]
        );
    }

    #[test]
    fn forwards_arguments_after_the_separator() {
        let c = command(Suite::Xdp.binary(), &["--json".into(), "out.json".into()]);
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "run",
                "--release",
                "--package",
                "lb-tests",
                "--bin",
                "bench-xdp",
                "--",
                "--json",
                "out.json"
            ]
        );
    }
}
