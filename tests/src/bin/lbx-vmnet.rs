//! Native XDP on virtio-net (see `lb_tests::vmnet`): the guest half and the host client,
//! run by `cargo xtask test --kernels` inside each kernel's guest and in the host namespace
//! holding the guest's tap.
//!
//! Usage:
//!   lbx-vmnet guest --iface eth0 --agent PATH --podserver PATH [--wait-s N]
//!   lbx-vmnet client [--guest IP]
//! Exit codes: 0 every check passed, 1 a check failed, 2 usage.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use lb_tests::vmnet::{self, GuestOptions};

const USAGE: &str = "usage: lbx-vmnet guest --iface IF --agent PATH --podserver PATH [--wait-s N]\n       lbx-vmnet client [--guest IP]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(usage) => {
            eprintln!("lbx-vmnet: {usage}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<bool, String> {
    let (mode, rest) = args.split_first().ok_or("give a mode")?;
    let mut flags = std::collections::BTreeMap::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        flags.insert(flag.as_str(), value.as_str());
    }
    let get = |k: &str| flags.get(k).copied().ok_or(format!("{k} is required"));
    match mode.as_str() {
        "guest" => {
            let opts = GuestOptions {
                iface: get("--iface")?.to_string(),
                agent: PathBuf::from(get("--agent")?),
                podserver: PathBuf::from(get("--podserver")?),
                wait: Duration::from_secs(
                    flags
                        .get("--wait-s")
                        .map(|v| v.parse().map_err(|e| format!("--wait-s: {e}")))
                        .transpose()?
                        .unwrap_or(180),
                ),
            };
            match vmnet::guest(&opts) {
                Ok(()) => Ok(true),
                Err(e) => {
                    println!("lbx-vmnet: guest FAILED: {e}");
                    Ok(false)
                }
            }
        }
        "client" => {
            let guest: Ipv4Addr = match flags.get("--guest") {
                Some(v) => v.parse().map_err(|e| format!("--guest: {e}"))?,
                None => vmnet::GUEST_ADDR,
            };
            Ok(vmnet::client(guest))
        }
        other => Err(format!("unknown mode {other:?}")),
    }
}
