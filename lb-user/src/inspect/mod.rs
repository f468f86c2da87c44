//! The operator view: what `lb-user counters | conntrack | targets | explain` report about a
//! running instance, read from its pins. It sits beside the write path, not under it: it
//! imports only the BPF layer (`crate::bpf`) and lb-common, and nothing of the write path
//! imports it.
//!
//! - [`view`]: the map reads the reports need ([`MapsView`]: the live maps, or a
//!   [`Snapshot`] in tests);
//! - [`counters`], [`flows`], [`targets`]: the reports;
//! - [`explain`]: one packet through the real programs (a [`crate::bpf::sandbox::Sandbox`]),
//!   with [`packet`] (frames built and decoded) and [`describe`] (entries in words);
//! - [`render`]: the tables.

pub mod counters;
pub mod describe;
pub mod explain;
pub mod flows;
pub mod packet;
pub mod render;
pub mod targets;
pub mod view;

pub use view::{MapsView, Snapshot};

use crate::bpf::{
    maps::{Maps, MapsError},
    pins::{Located, PinsError},
    sandbox::SandboxError,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error("{source}; is `lb-user` still running? (maps of another lbx version need that version's lb-user)")]
    Maps {
        #[from]
        source: MapsError,
    },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// The maps of the instance at `located`, checked readable.
pub fn open(located: &Located) -> Result<Maps, InspectError> {
    let maps = Maps::from_pins(&located.open_path)?;
    // Fail early, with the pin dir in the message, if the maps cannot be read.
    maps.config()?;
    Ok(maps)
}
