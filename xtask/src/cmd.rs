//! Running child processes with the command line echoed and failures named.

use std::{
    ffi::OsStr,
    io,
    path::PathBuf,
    process::{Command, ExitStatus, Output},
};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not start `{command}`: is `{program}` installed and on PATH?")]
    Spawn {
        command: String,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status})")]
    Failed { command: String, status: ExitStatus },
}

/// Runs `cmd` with inherited stdio and returns its exit status, whatever it is.
pub fn status(cmd: &mut Command) -> Result<ExitStatus, CmdError> {
    cmd.status().map_err(|source| spawn_error(cmd, source))
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<(), CmdError> {
    let status = status(cmd)?;
    if status.success() {
        Ok(())
    } else {
        Err(CmdError::Failed {
            command: describe(cmd),
            status,
        })
    }
}

/// Runs `cmd` capturing stdout and stderr; the caller judges the exit status.
pub fn output(cmd: &mut Command) -> Result<Output, CmdError> {
    cmd.output().map_err(|source| spawn_error(cmd, source))
}

/// The program and its arguments, space separated, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The cargo that runs xtask (so children use the same toolchain), else the one on PATH.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Whether we run with root's effective uid (package installs, BPF and netns tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn spawn_error(cmd: &Command, source: io::Error) -> CmdError {
    CmdError::Spawn {
        command: describe(cmd),
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    }
}

/// `$XDG_CACHE_HOME`, else `~/.cache`: the base of every xtask cache (`<base>/lbx/...`);
/// None when neither is set.
pub fn cache_base() -> Option<std::path::PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| std::path::PathBuf::from(home).join(".cache"))
        })
}
