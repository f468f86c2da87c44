//! Can lbx run on this kernel? Probes every BPF feature lbx needs (lb_user::bpf::kernel_features),
//! then loads the real object with the agent's default map sizes, so the kernel's verifier
//! judges every program. On a rejection the verifier's log is printed verbatim.
//!
//! `cargo xtask test --kernels` runs this first in every guest. Exit codes: 0 loaded,
//! 1 a feature is missing or the load failed.

use std::process::ExitCode;

use aya::programs::ProgramError;
use lb_user::bpf::dataplane::{Dataplane, DataplaneOptions};
use lb_user::bpf::kernel_features::{self, attach_methods, kernel_release};

fn main() -> ExitCode {
    println!("lbx-kernel-check: kernel {}", kernel_release());
    let mut ok = true;
    match kernel_features::probe() {
        Ok(features) => {
            for p in features {
                let f = p.feature;
                println!(
                    "  {:<48} {:<7} Linux {}+, {}",
                    f.name,
                    if p.present { "ok" } else { "MISSING" },
                    f.since,
                    f.used_for
                );
                ok &= p.present;
            }
        }
        Err(e) => {
            println!("lbx-kernel-check: FAILED: {e}");
            ok = false;
        }
    }
    let (xdp, tc) = attach_methods();
    println!("  attach: XDP via {xdp}; TC via {tc}");
    match Dataplane::load(DataplaneOptions::default()) {
        Ok(_) => println!(
            "lbx-kernel-check: the verifier accepted lb_ingress, lb_pass and lb_reply; maps \
             created at the agent's default sizes"
        ),
        Err(e) => {
            ok = false;
            println!("lbx-kernel-check: FAILED: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(inner) = cause {
                match inner.downcast_ref::<ProgramError>() {
                    Some(ProgramError::LoadError {
                        io_error,
                        verifier_log,
                    }) => {
                        println!("  caused by: BPF_PROG_LOAD returned {io_error}");
                        println!("----- verifier log (verbatim) -----");
                        println!("{verifier_log}");
                        println!("----- end of verifier log -----");
                        break;
                    }
                    _ => println!("  caused by: {inner}"),
                }
                cause = inner.source();
            }
        }
    }
    if ok {
        println!("lbx-kernel-check: ok");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
