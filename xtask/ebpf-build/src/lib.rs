//! Builds the lb-ebpf object file.
//!
//! One implementation shared by `cargo xtask build-ebpf` and lb-user's build script, so the
//! object a developer inspects and the object lb-user embeds come from the same command line,
//! environment and target directory. The recipe (Debian's rustc-web + bpf-linker, because no
//! nightly toolchain can be downloaded here) is described in ../shared/TOOLCHAIN.md.

use std::{
    env,
    ffi::OsStr,
    io,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

/// What to tell a developer whose machine lacks part of the eBPF toolchain.
pub const SETUP_HINT: &str =
    "run `cargo xtask setup` (installs the eBPF toolchain, see ../shared/TOOLCHAIN.md)";

/// Debian's rustc-web: the only compiler reachable here that can build `core` for BPF.
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// Debian's cargo-web, matching [`DEBIAN_RUSTC`] (it understands `-Z build-std`).
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Library sources shipped by rust-web-src; `build-std` compiles `core` from them.
pub const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
/// The linker named in lb-ebpf/.cargo/config.toml, found on PATH.
pub const BPF_LINKER: &str = "bpf-linker";
/// Target triple set in lb-ebpf/.cargo/config.toml; part of the object's path.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Cargo profile of the eBPF build. Release is what gets embedded and shipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    /// Directory cargo puts this profile's artifacts in.
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// Where the nested cargo's diagnostics go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diagnostics {
    /// Stream to our stderr: an interactive `cargo xtask build-ebpf` shows progress.
    Inherit,
    /// Collect and return them in [`BuildError::Failed`]: a build script's stdout is parsed
    /// by cargo, and its stderr is only shown when the script fails.
    Capture,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("eBPF toolchain incomplete: {what} not found ({looked_in}); {SETUP_HINT}")]
    ToolchainMissing {
        what: &'static str,
        looked_in: String,
    },
    #[error("could not start {program} to build lb-ebpf; {SETUP_HINT}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "building lb-ebpf failed ({status}): `{command}` in {crate_dir}; fix the errors reported \
         by the nested cargo{}",
        if stderr.is_empty() { String::new() } else { format!(":\n{stderr}") }
    )]
    Failed {
        status: ExitStatus,
        command: String,
        crate_dir: PathBuf,
        stderr: String,
    },
    #[error(
        "the eBPF build succeeded but left no object at {path}; check the [[bin]] name and \
         target in lb-ebpf/Cargo.toml and lb-ebpf/.cargo/config.toml"
    )]
    ObjectMissing { path: PathBuf },
}

/// One build of lb-ebpf, rooted at the workspace directory (the one holding lb-ebpf/).
#[derive(Clone, Debug)]
pub struct EbpfBuild {
    workspace_root: PathBuf,
    profile: Profile,
    diagnostics: Diagnostics,
}

impl EbpfBuild {
    pub fn new(workspace_root: impl Into<PathBuf>) -> Self {
        EbpfBuild {
            workspace_root: workspace_root.into(),
            profile: Profile::Release,
            diagnostics: Diagnostics::Inherit,
        }
    }

    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    pub fn diagnostics(mut self, diagnostics: Diagnostics) -> Self {
        self.diagnostics = diagnostics;
        self
    }

    pub fn crate_dir(&self) -> PathBuf {
        self.workspace_root.join("lb-ebpf")
    }

    /// Separate from the workspace's target/ so a build script can run this while the outer
    /// cargo holds the lock on target/<profile>.
    pub fn target_dir(&self) -> PathBuf {
        self.workspace_root.join("target").join("bpf")
    }

    pub fn object_path(&self) -> PathBuf {
        self.target_dir()
            .join(BPF_TARGET)
            .join(self.profile.dir_name())
            .join("lb-ebpf")
    }

    /// Files and directories whose change can change the object: what a build script must
    /// watch so the embedded object is never stale.
    pub fn inputs(&self) -> Vec<PathBuf> {
        let ebpf = self.crate_dir();
        let common = self.workspace_root.join("lb-common");
        vec![
            ebpf.join("src"),
            ebpf.join("Cargo.toml"),
            ebpf.join("Cargo.lock"),
            ebpf.join(".cargo").join("config.toml"),
            common.join("src"),
            common.join("Cargo.toml"),
        ]
    }

    /// The nested cargo invocation, with everything the calling cargo exported removed.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(DEBIAN_CARGO);
        cmd.arg("build");
        if self.profile == Profile::Release {
            cmd.arg("--release");
        }
        for (name, _) in env::vars_os() {
            if name.to_str().is_some_and(must_scrub) {
                cmd.env_remove(&name);
            }
        }
        cmd.current_dir(self.crate_dir())
            .env("RUSTC", DEBIAN_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", self.target_dir())
            .stdin(Stdio::null());
        cmd
    }

    /// Builds the object and returns its path.
    pub fn run(&self) -> Result<PathBuf, BuildError> {
        check_toolchain()?;
        let mut cmd = self.command();
        let (status, stderr) = match self.diagnostics {
            Diagnostics::Inherit => {
                let status = cmd.status().map_err(|source| BuildError::Spawn {
                    program: DEBIAN_CARGO,
                    source,
                })?;
                (status, String::new())
            }
            Diagnostics::Capture => {
                let out = cmd.output().map_err(|source| BuildError::Spawn {
                    program: DEBIAN_CARGO,
                    source,
                })?;
                let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stdout));
                (out.status, text)
            }
        };
        if !status.success() {
            return Err(BuildError::Failed {
                status,
                command: describe(&cmd),
                crate_dir: self.crate_dir(),
                stderr: stderr.trim_end().to_owned(),
            });
        }
        let object = self.object_path();
        if !object.is_file() {
            return Err(BuildError::ObjectMissing { path: object });
        }
        Ok(object)
    }
}

/// Checks that Debian's compiler, its library sources and bpf-linker are all present, so a
/// missing piece is reported as such instead of as a confusing compiler error.
pub fn check_toolchain() -> Result<(), BuildError> {
    for (what, path) in [
        ("Debian rustc (package rustc-web)", DEBIAN_RUSTC),
        ("Debian cargo (package cargo-web)", DEBIAN_CARGO),
        (
            "Rust library sources (package rust-web-src)",
            DEBIAN_RUST_SRC,
        ),
    ] {
        if !Path::new(path).exists() {
            return Err(BuildError::ToolchainMissing {
                what,
                looked_in: path.to_owned(),
            });
        }
    }
    if find_on_path(BPF_LINKER).is_none() {
        return Err(BuildError::ToolchainMissing {
            what: BPF_LINKER,
            looked_in: "PATH".to_owned(),
        });
    }
    Ok(())
}

/// The first executable file called `name` in the directories of PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether an inherited variable must not reach the nested cargo. Cargo exports RUSTC,
/// CARGO_ENCODED_RUSTFLAGS, CARGO_CFG_*, TARGET... to build scripts, and rustup exports
/// RUSTUP_TOOLCHAIN; any of them would switch the nested build to the host compiler, the
/// host target or the wrong flags. Kept: where to find registries and how to reach them
/// (CARGO_HOME, CARGO_NET_*, CARGO_HTTP_*, CARGO_REGISTRIES_*), terminal settings, and the
/// jobserver (CARGO_MAKEFLAGS), so a nested build shares the outer build's job slots.
fn must_scrub(name: &str) -> bool {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_MAKEFLAGS",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const EXACT: &[&str] = &[
        "CARGO",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
    ];
    const PREFIXES: &[&str] = &["CARGO_", "__CARGO", "RUSTC", "RUSTDOC", "DEP_"];
    if KEEP.iter().any(|keep| name.starts_with(keep)) {
        return false;
    }
    EXACT.contains(&name) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// The command line as a user could retype it, for error messages.
fn describe(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())))
        .collect();
    words.push(cmd.get_program().to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(OsStr::to_string_lossy).map(String::from));
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_what_cargo_and_rustup_export() {
        for name in [
            "CARGO",
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTC_LINKER",
            "RUSTDOC",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "CARGO_TARGET_DIR",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_CFG_TARGET_ARCH",
            "CARGO_FEATURE_USER",
            "CARGO_PROFILE_RELEASE_LTO",
            "RUSTUP_TOOLCHAIN",
            "OUT_DIR",
            "TARGET",
            "HOST",
            "PROFILE",
            "OPT_LEVEL",
            "DEP_Z_INCLUDE",
            "__CARGO_DEFAULT_LIB_METADATA",
        ] {
            assert!(must_scrub(name), "{name} must not reach the nested cargo");
        }
    }

    #[test]
    fn keeps_registry_network_and_jobserver_settings() {
        for name in [
            "PATH",
            "HOME",
            "CARGO_HOME",
            "CARGO_MAKEFLAGS",
            "CARGO_NET_OFFLINE",
            "CARGO_HTTP_PROXY",
            "CARGO_REGISTRIES_CRATES_IO_PROTOCOL",
            "CARGO_TERM_COLOR",
            "RUSTUP_HOME",
            "RUST_BACKTRACE",
            "https_proxy",
        ] {
            assert!(!must_scrub(name), "{name} should be passed through");
        }
    }

    #[test]
    fn command_uses_debian_toolchain_and_separate_target_dir() {
        let build = EbpfBuild::new("/ws");
        let cmd = build.command();
        assert_eq!(cmd.get_program(), DEBIAN_CARGO);
        assert_eq!(
            cmd.get_args().collect::<Vec<_>>(),
            [OsStr::new("build"), OsStr::new("--release")]
        );
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/ws/lb-ebpf")));
        let set: Vec<_> = cmd.get_envs().filter(|(_, v)| v.is_some()).collect();
        assert!(set.contains(&(OsStr::new("RUSTC"), Some(OsStr::new(DEBIAN_RUSTC)))));
        assert!(set.contains(&(OsStr::new("RUSTC_BOOTSTRAP"), Some(OsStr::new("1")))));
        assert!(set.contains(&(
            OsStr::new("CARGO_TARGET_DIR"),
            Some(OsStr::new("/ws/target/bpf"))
        )));
        // `cargo test` exports CARGO_MANIFEST_DIR to this test, as it does to build scripts.
        let removed: Vec<_> = cmd.get_envs().filter(|(_, v)| v.is_none()).collect();
        assert!(env::var_os("CARGO_MANIFEST_DIR").is_some());
        assert!(removed.contains(&(OsStr::new("CARGO_MANIFEST_DIR"), None)));
    }

    #[test]
    fn debug_profile_drops_release_flag_and_changes_object_path() {
        let build = EbpfBuild::new("/ws").profile(Profile::Debug);
        assert_eq!(build.command().get_args().count(), 1);
        assert_eq!(
            build.object_path(),
            Path::new("/ws/target/bpf/bpfel-unknown-none/debug/lb-ebpf")
        );
        assert_eq!(
            EbpfBuild::new("/ws").object_path(),
            Path::new("/ws/target/bpf/bpfel-unknown-none/release/lb-ebpf")
        );
    }

    #[test]
    fn inputs_cover_ebpf_and_common_sources() {
        let inputs = EbpfBuild::new("/ws").inputs();
        for expected in [
            "/ws/lb-ebpf/src",
            "/ws/lb-ebpf/Cargo.toml",
            "/ws/lb-ebpf/Cargo.lock",
            "/ws/lb-ebpf/.cargo/config.toml",
            "/ws/lb-common/src",
            "/ws/lb-common/Cargo.toml",
        ] {
            assert!(inputs.contains(&PathBuf::from(expected)), "{expected}");
        }
    }
}
