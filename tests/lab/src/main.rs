//! `lbx-lab`: the side-by-side lab, the project's main job (`cargo xtask lab compare | up |
//! down`). What it builds and measures is described in the library's documentation
//! (`src/lib.rs`) and the README.

use std::process::ExitCode;

use clap::Parser;
use lbx_lab::cli::{Cli, Command};

fn main() -> ExitCode {
    lbx_lab::interrupt::install_signal_handlers();
    let result = match Cli::parse().command {
        Command::Compare(args) => lbx_lab::compare(args),
        Command::Up(args) => lbx_lab::up(args),
        Command::Down => lbx_lab::down(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbx-lab: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
