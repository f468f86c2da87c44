//! `cargo xtask setup`: installs, idempotently, what a fresh Debian bookworm machine needs to
//! build the BPF programs and run the tests (see ../shared/TOOLCHAIN.md for why each piece).
//!
//! etcd is the exception to "install with apt": installing etcd-server would also enable and
//! start a system etcd that nobody asked for. Its package is downloaded and unpacked into
//! `~/.cache/lbx/etcd/<debian-version>/` instead, and the tests run `<that>/usr/bin/etcd`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use lb_ebpf_build::{find_on_path, BPF_LINKER};

use crate::cmd::{self, CmdError};

/// Debian packages: the BPF-capable compiler (rustc-web, cargo-web, rust-web-src), what
/// bpf-linker links against (LLVM 22, polly, zstd, zlib), the network tools the
/// namespace tests and the lab drive, and what the kernel matrix boots guests with.
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
    // The kernel matrix (`cargo xtask test --kernels`): qemu, the guests' initramfs
    // (busybox), depmod/modprobe over the unpacked kernels, and the kernel payloads' formats.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
];

/// The Debian package holding the etcd server binary the control-plane tests run.
pub const ETCD_PACKAGE: &str = "etcd-server";
/// Where the package puts the binary, relative to the unpacked tree.
const ETCD_BINARY: &str = "usr/bin/etcd";

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
    #[error(
        "apt knows no installable version of {ETCD_PACKAGE}{detail}; run `apt-get update` as \
         root and check that the bookworm main repository is configured"
    )]
    EtcdUnknown { detail: String },
    #[error("neither XDG_CACHE_HOME nor HOME is set; set HOME so etcd has a cache directory")]
    NoCacheDir,
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching {ETCD_PACKAGE} {version} failed; check the apt/dpkg output above")]
    EtcdFetch {
        version: String,
        #[source]
        source: CmdError,
    },
    #[error(
        "{} is not a working etcd {version} ({detail}); delete {} and re-run `cargo xtask setup`",
        binary.display(),
        dir.display()
    )]
    EtcdBroken {
        version: String,
        binary: PathBuf,
        dir: PathBuf,
        detail: String,
    },
}

/// Installs what is missing, printing one line per step.
pub fn run() -> Result<(), SetupError> {
    apt_packages()?;
    bpf_linker()?;
    etcd()?;
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

/// Makes sure apt's candidate version of etcd-server is unpacked under
/// `~/.cache/lbx/etcd/<version>/` (without installing the package) and returns the path of its
/// `usr/bin/etcd`. A version already unpacked is reused, so a second call costs one
/// `apt-cache policy`.
pub fn etcd() -> Result<PathBuf, SetupError> {
    let version = etcd_candidate()?;
    let step = format!("setup: {ETCD_PACKAGE} {version} (unpacked, not installed)");
    let dir = cache_dir()?.join("lbx").join("etcd").join(&version);
    let binary = dir.join(ETCD_BINARY);
    if binary.is_file() {
        check_etcd(&binary, &dir, &version)?;
        println!("{step}: ok (cached)");
        return Ok(binary);
    }
    println!("{step}: downloading into {} ...", dir.display());
    let parent = dir.parent().expect("dir has the etcd directory as parent");
    let staging = parent.join(format!(".{version}.partial-{}", std::process::id()));
    let result = fetch_etcd(&version, &staging).and_then(|()| {
        match fs::rename(&staging, &dir) {
            Ok(()) => Ok(()),
            // A concurrent setup finished first: its copy is as good as ours.
            Err(_) if binary.is_file() => Ok(()),
            Err(source) => Err(SetupError::Io {
                action: "move the unpacked etcd into",
                path: dir.clone(),
                source,
            }),
        }
    });
    // The staging directory only survives a failure; never leave it behind.
    let _ = fs::remove_dir_all(&staging);
    result?;
    check_etcd(&binary, &dir, &version)?;
    Ok(binary)
}

/// The version `apt-get download etcd-server` would fetch; runs `apt-get update` once (as
/// root) if apt knows none yet, e.g. on a fresh machine whose package lists are empty.
fn etcd_candidate() -> Result<String, SetupError> {
    let policy = || -> Result<Option<String>, SetupError> {
        let out = cmd::output(Command::new("apt-cache").args(["policy", ETCD_PACKAGE]))
            .map_err(|source| SetupError::NoDpkg { source })?;
        Ok(parse_candidate(&String::from_utf8_lossy(&out.stdout)))
    };
    if let Some(version) = policy()? {
        return Ok(version);
    }
    if !cmd::is_root() {
        return Err(SetupError::EtcdUnknown {
            detail: " (and refreshing the package lists needs root)".into(),
        });
    }
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null()),
    )
    .map_err(|source| SetupError::Apt { source })?;
    policy()?.ok_or(SetupError::EtcdUnknown {
        detail: " even after `apt-get update`".into(),
    })
}

/// "Candidate: 3.4.23-4+b4" from `apt-cache policy PACKAGE`; None for "(none)" or no line.
pub(crate) fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_owned)
}

/// `apt-get download` + `dpkg-deb -x` of exactly `version` into `staging`.
fn fetch_etcd(version: &str, staging: &Path) -> Result<(), SetupError> {
    let _ = fs::remove_dir_all(staging);
    let download = staging.join("deb");
    fs::create_dir_all(&download).map_err(|source| SetupError::Io {
        action: "create",
        path: download.clone(),
        source,
    })?;
    let fetch = |source| SetupError::EtcdFetch {
        version: version.to_owned(),
        source,
    };
    // Root's apt drops to the _apt user for downloads, which cannot write our directory.
    cmd::run(
        Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{ETCD_PACKAGE}={version}"))
            .current_dir(&download)
            .stdin(std::process::Stdio::null()),
    )
    .map_err(fetch)?;
    let deb = fs::read_dir(&download)
        .map_err(|source| SetupError::Io {
            action: "list",
            path: download.clone(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| SetupError::EtcdBroken {
            version: version.to_owned(),
            binary: download.join("*.deb"),
            dir: staging.to_owned(),
            detail: "apt-get download left no .deb file".into(),
        })?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(staging)).map_err(fetch)?;
    fs::remove_dir_all(&download).map_err(|source| SetupError::Io {
        action: "remove",
        path: download,
        source,
    })
}

/// `etcd --version` must run and name the upstream part of the Debian version
/// ("3.4.23-4+b4" -> "etcd Version: 3.4.23").
fn check_etcd(binary: &Path, dir: &Path, version: &str) -> Result<(), SetupError> {
    let broken = |detail: String| SetupError::EtcdBroken {
        version: version.to_owned(),
        binary: binary.to_owned(),
        dir: dir.to_owned(),
        detail,
    };
    let out =
        cmd::output(Command::new(binary).arg("--version")).map_err(|e| broken(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = format!("etcd Version: {}", upstream_version(version));
    if !out.status.success() || !stdout.lines().any(|l| l.trim() == want) {
        return Err(broken(format!(
            "`--version` exited with {} and printed {:?}, expected a line {want:?}",
            out.status,
            stdout.trim()
        )));
    }
    Ok(())
}

/// The upstream part of a Debian version: no epoch, no Debian revision.
fn upstream_version(debian: &str) -> &str {
    let no_epoch = debian.split_once(':').map_or(debian, |(_, v)| v);
    no_epoch.rsplit_once('-').map_or(no_epoch, |(v, _)| v)
}

/// The cache base `cargo xtask k8s-build` uses too.
fn cache_dir() -> Result<PathBuf, SetupError> {
    cmd::cache_base().ok_or(SetupError::NoCacheDir)
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
    fn etcd_candidate_parsed_from_policy() {
        let policy = "etcd-server:\n  Installed: (none)\n  Candidate: 3.4.23-4+b4\n  \
                      Version table:\n     3.4.23-4+b4 500\n";
        assert_eq!(parse_candidate(policy).as_deref(), Some("3.4.23-4+b4"));
        assert_eq!(
            parse_candidate("etcd-server:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn upstream_version_drops_epoch_and_revision() {
        assert_eq!(upstream_version("3.4.23-4+b4"), "3.4.23");
        assert_eq!(upstream_version("1:3.5.0-1"), "3.5.0");
        assert_eq!(upstream_version("3.4.23"), "3.4.23");
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
