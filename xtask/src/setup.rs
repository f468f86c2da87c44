//! `cargo xtask setup`: installs, idempotently, what a fresh Debian bookworm machine needs to
//! build the BPF programs and run the tests (see ../shared/TOOLCHAIN.md for why each piece).

use std::{path::PathBuf, process::Command};

use lb_ebpf_build::{find_on_path, BPF_LINKER};

use crate::cmd::{self, CmdError};

/// Debian packages: the BPF-capable compiler (rustc-web, cargo-web, rust-web-src), what
/// bpf-linker links against (LLVM 22, polly, zstd, zlib), and the network tools the
/// namespace tests and the lab drive.
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "nftables",
    "ethtool",
    "bpftool",
    "conntrack",
    "tcpdump",
];

/// Newer bpf-linker releases need a newer rustc than the machines have.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's LLVM 22, which bpf-linker must link against to match rustc-web's bitcode.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "Debian packages missing: {}; installing them needs root: re-run `cargo xtask setup` \
         as root, or run `apt-get install -y {}` as root",
        missing.join(" "),
        missing.join(" ")
    )]
    NotRoot { missing: Vec<String> },
    #[error(
        "cannot query installed packages with dpkg: `cargo xtask setup` supports Debian \
         bookworm; elsewhere install the equivalents by hand (see ../shared/TOOLCHAIN.md)"
    )]
    NoDpkg {
        #[source]
        source: CmdError,
    },
    #[error("installing Debian packages failed; check the apt output above")]
    Apt {
        #[source]
        source: CmdError,
    },
    #[error(
        "packages still missing after apt-get install: {}; check that the bookworm \
         repositories providing them are configured",
        packages.join(" ")
    )]
    StillMissing { packages: Vec<String> },
    #[error("installing bpf-linker {BPF_LINKER_VERSION} failed; check the cargo output above")]
    LinkerInstall {
        #[source]
        source: CmdError,
    },
    #[error(
        "bpf-linker was installed but `{BPF_LINKER}` {found}; put {} first on PATH \
         (export PATH=\"$HOME/.cargo/bin:$PATH\")",
        cargo_bin.display()
    )]
    LinkerNotOnPath { found: String, cargo_bin: PathBuf },
}

/// Installs what is missing, printing one line per step.
pub fn run() -> Result<(), SetupError> {
    apt_packages()?;
    bpf_linker()?;
    Ok(())
}

fn apt_packages() -> Result<(), SetupError> {
    let step = format!("setup: apt packages ({})", APT_PACKAGES.len());
    let missing = missing_packages(APT_PACKAGES)?;
    if missing.is_empty() {
        println!("{step}: ok (cached)");
        return Ok(());
    }
    if !cmd::is_root() {
        return Err(SetupError::NotRoot { missing });
    }
    println!("{step}: installing {} ...", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null());
        c
    };
    cmd::run(&mut apt(&["update"])).map_err(|source| SetupError::Apt { source })?;
    let mut install = apt(&["install", "-y"]);
    install.args(&missing);
    cmd::run(&mut install).map_err(|source| SetupError::Apt { source })?;
    let still = missing_packages(APT_PACKAGES)?;
    if !still.is_empty() {
        return Err(SetupError::StillMissing { packages: still });
    }
    Ok(())
}

/// Packages `dpkg -s` does not report as "install ok installed" (a package removed but not
/// purged is still known to dpkg, yet its files are gone).
fn missing_packages(packages: &[&str]) -> Result<Vec<String>, SetupError> {
    let mut missing = Vec::new();
    for package in packages {
        let out = cmd::output(Command::new("dpkg").args(["-s", package]))
            .map_err(|source| SetupError::NoDpkg { source })?;
        if !(out.status.success() && is_installed(&String::from_utf8_lossy(&out.stdout))) {
            missing.push((*package).to_owned());
        }
    }
    Ok(missing)
}

fn is_installed(dpkg_status: &str) -> bool {
    dpkg_status
        .lines()
        .any(|line| line.trim_end() == "Status: install ok installed")
}

fn bpf_linker() -> Result<(), SetupError> {
    let step = format!("setup: bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
    let found = installed_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        println!("{step}: ok (cached)");
        return Ok(());
    }
    println!(
        "{step}: installing (found: {}) ...",
        found.as_deref().unwrap_or("none")
    );
    let mut install = cmd::cargo();
    install
        .args(["install", "bpf-linker", "--version"])
        .arg(format!("={BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", "llvm-22", "--locked"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .stdin(std::process::Stdio::null());
    cmd::run(&mut install).map_err(|source| SetupError::LinkerInstall { source })?;
    match installed_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => Ok(()),
        other => Err(SetupError::LinkerNotOnPath {
            found: match other {
                Some(v) => format!("on PATH reports version {v}"),
                None => "is not on PATH".to_owned(),
            },
            cargo_bin: cargo_bin_dir(),
        }),
    }
}

/// Version reported by the bpf-linker found on PATH ("bpf-linker 0.13.0" -> "0.13.0").
fn installed_linker_version() -> Option<String> {
    let linker = find_on_path(BPF_LINKER)?;
    let out = cmd::output(Command::new(linker).arg("--version")).ok()?;
    if !out.status.success() {
        return None;
    }
    parse_linker_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_linker_version(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    (words.next()? == BPF_LINKER).then_some(())?;
    words.next().map(str::to_owned)
}

/// Where `cargo install` puts binaries.
fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("~/.cargo"))
        .join("bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_installed_only_when_fully_installed() {
        let installed = "Package: rustc-web\nStatus: install ok installed\nPriority: optional\n";
        let removed = "Package: rustc-web\nStatus: deinstall ok config-files\n";
        let half = "Package: rustc-web\nStatus: install ok half-configured\n";
        assert!(is_installed(installed));
        assert!(!is_installed(removed));
        assert!(!is_installed(half));
        assert!(!is_installed(""));
    }

    #[test]
    fn linker_version_parsed_from_banner() {
        assert_eq!(
            parse_linker_version("bpf-linker 0.13.0\n").as_deref(),
            Some("0.13.0")
        );
        assert_eq!(parse_linker_version("other 0.13.0"), None);
        assert_eq!(parse_linker_version("bpf-linker"), None);
    }
}
