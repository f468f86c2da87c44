//! `lb-user standalone`: runs the data plane on one interface from a manifest file instead of
//! an API server, and keeps it in step with the file until SIGTERM/SIGINT.
//!
//! Startup: read the file (a bad file stops here, before anything is loaded), then bring the
//! node runtime up with it ([`NodeRuntime::start`]) and print one `lbx: ready ...` line.
//! Loop: every resync period, re-read the file when it changed and re-apply, and let the
//! runtime retry what it could not do yet. A bad file keeps the last good state. Stop:
//! detach, remove the pins unless `--keep-pins`, exit 0.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use super::manifest::{translate_file, FileState, StandaloneError};
use crate::k8s::translate::TranslateOptions;
use crate::node::{options::NodeOptions, process, runtime::NodeRuntime, RunError};

/// Everything `lb-user standalone` is told on its command line.
#[derive(Clone, Debug)]
pub struct StandaloneOptions {
    pub node: NodeOptions,
    pub config: PathBuf,
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneRunError {
    #[error("cannot load {path:?}: {source}; fix the file and start again")]
    File {
        path: PathBuf,
        #[source]
        source: Box<StandaloneError>,
    },
    #[error(transparent)]
    Run(#[from] RunError),
}

/// What identifies a version of the file (a rename-over or an edit changes one of these).
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
    dev: u64,
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
        dev: m.dev(),
    })
}

fn load_desired(opts: &StandaloneOptions) -> Result<FileState, StandaloneError> {
    let state = translate_file(
        &opts.config,
        &opts.node.node_name,
        &TranslateOptions::default(),
    )?;
    for s in &state.skipped {
        warn!(
            "{}: skipped {} {}: {}",
            opts.config.display(),
            s.kind,
            s.object,
            s.reason
        );
    }
    Ok(state)
}

/// Runs until SIGTERM/SIGINT; Ok after a clean shutdown.
pub fn run(opts: &StandaloneOptions) -> Result<(), StandaloneRunError> {
    process::install_signal_handlers()?;
    let state = load_desired(opts).map_err(|source| StandaloneRunError::File {
        path: opts.config.clone(),
        source: Box::new(source),
    })?;
    let mut stamp = file_stamp(&opts.config);
    // Remote endpoints of the file's Nodes go to their InternalIP (through the tunnel),
    // others by the route to their pod.
    let mut rt = NodeRuntime::start(
        &opts.node,
        state.desired,
        state.node_ips,
        &format!("{:?}", opts.config),
    )?;
    rt.announce_ready();

    let mut next = Instant::now() + opts.resync;
    while !process::sleep_until(next) {
        next = Instant::now() + opts.resync;
        let now = file_stamp(&opts.config);
        if now != stamp {
            stamp = now;
            match load_desired(opts) {
                Ok(state) => {
                    info!("{} changed: applying it", opts.config.display());
                    // Errors are logged and retried by tick().
                    let _ = rt.set_desired(state.desired, state.node_ips);
                    continue;
                }
                Err(e) => error!(
                    "{}: {e}; keeping the last good state (fix the file, it is re-read when it changes)",
                    opts.config.display()
                ),
            }
        }
        rt.tick();
    }
    drop(rt);
    Ok(())
}
