//! The data plane of this node, running: the write path between a desired state and the
//! BPF layer. Imports run one way: `crate::k8s` drives this layer, this layer drives
//! `crate::control` (what to write) and `crate::bpf` (the maps).
//!
//! - [`runtime`]: [`runtime::NodeRuntime`], start-up, updates, periodic work, stop;
//! - [`driver`]: applies through the reconciler, attaches TC to local veths, logs;
//! - [`resolve`] and [`netinfo`]: where a backend's packets go, from the kernel's routes;
//! - [`options`]: the node's flags and what follows from them (addresses, peers, CONFIG);
//! - [`pins`]: the pin directory's lock, shape check, cleanup and takeover;
//! - [`process`]: privileges and stop signals.

pub mod driver;
pub mod netinfo;
pub mod options;
pub mod pins;
pub mod process;
pub mod resolve;
pub mod runtime;

use std::path::PathBuf;

use crate::bpf::dataplane::DataplaneError;
use crate::control::reconcile::ReconcileError;
use netinfo::NetinfoError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "lb-user needs CAP_NET_ADMIN and CAP_BPF (or CAP_SYS_ADMIN): run it as root, e.g. with sudo"
    )]
    NotPrivileged,
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// netinfo's message names the interface already.
    #[error("{source}")]
    Interface {
        iface: String,
        #[source]
        source: Box<NetinfoError>,
    },
    #[error("interface {iface} has no IPv4 address; give the node's addresses with --node-addr")]
    NoNodeAddrs { iface: String },
    #[error(
        "{count} node addresses given, at most {max} are supported; pass the ones clients reach \
         NodePorts on"
    )]
    TooManyNodeAddrs { count: usize, max: usize },
    #[error("{source}; check --max-services and --maglev-size (a prime)")]
    Sizes {
        #[source]
        source: Box<ReconcileError>,
    },
    #[error(transparent)]
    Bpffs(#[from] crate::bpf::bpffs::BpffsError),
    #[error("cannot create or lock the pin directory {dir:?}: {source}")]
    PinDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another lb-user already runs with pin directory {dir:?}; stop it first, or give this \
         one another --node-name or --pin-dir"
    )]
    Busy { dir: PathBuf },
    #[error(
        "the maps pinned in {dir:?} do not fit this run ({mismatches}); start with the options \
         the previous run used, or remove the directory (rm -r {dir:?}) to start fresh"
    )]
    PinsIncompatible { dir: PathBuf, mismatches: String },
    #[error("setting up the data plane ({step}): {source}")]
    Dataplane {
        step: &'static str,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error(
        "{source}; {iface} may lack native XDP support, retry with --xdp-mode generic (or auto)"
    )]
    NativeXdp {
        iface: String,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error("the first apply of {origin} failed: {source}")]
    FirstApply {
        origin: String,
        #[source]
        source: Box<ReconcileError>,
    },
}
