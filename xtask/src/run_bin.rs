//! `cargo xtask bench` and `cargo xtask demo`: thin dispatchers to binaries of the lb-tests
//! crate, built in release so measurements mean something.

use std::process::{Command, ExitStatus};

use clap::ValueEnum;

use crate::cmd::{self, CmdError};

/// Benchmark suites, each a binary of lb-tests named `bench-<suite>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// instance vs XDP vs direct pod IP paths through the lab (see DESIGN.md, "The lab").
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
    let mut c = command(binary, args);
    eprintln!("xtask: {}", cmd::describe(&c));
    cmd::status(&mut c)
}

#[cfg(test)]
mod tests {
    use super::*;

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
