//! What an apply did and why one stopped: the reconciler's report and errors.

use std::fmt;
use std::net::Ipv4Addr;

use crate::control::maglev::MaglevError;
use crate::control::model::{FrontendAddr, ServicePortId};

use super::writer::WriteError;

/// Which write step failed, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    WriteBackends,
    WriteRings,
    SetFrontends,
    ZeroRings,
    RemoveFrontends,
    ClearBackends,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::WriteBackends => "writing backends",
            Step::WriteRings => "writing Maglev rings",
            Step::SetFrontends => "setting frontends",
            Step::ZeroRings => "zeroing emptied rings",
            Step::RemoveFrontends => "removing frontends",
            Step::ClearBackends => "clearing unused backends",
        })
    }
}

/// Why an apply stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("invalid reconciler configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error(
        "{step} failed: {source}; the data plane is consistent but not up to date, \
         the next apply retries"
    )]
    Write {
        step: Step,
        #[source]
        source: WriteError,
    },
    #[error("building the Maglev ring of {service} failed: {source}")]
    Maglev {
        service: ServicePortId,
        #[source]
        source: MaglevError,
    },
}

/// A backend left out because it cannot be reached now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub service: ServicePortId,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub reason: String,
}

/// Which map ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// No free service slot: the whole service port is left out.
    ServiceSlots,
    /// No free backend id: this backend is left out.
    BackendIds,
    /// More backends than ring positions: this backend is left out.
    RingSize,
}

/// Something left out for lack of room; retried on every apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacitySkip {
    pub service: ServicePortId,
    /// The backend left out, or None when the whole service port is.
    pub backend: Option<(Ipv4Addr, u16)>,
    pub resource: Capacity,
}

/// Two service ports want the same frontend; `owner` keeps it (the one that had it, else the
/// first in order), `loser` goes without it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConflict {
    pub frontend: (FrontendAddr, u16, u8),
    pub owner: ServicePortId,
    pub loser: ServicePortId,
}

/// What an apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub frontends_added: usize,
    pub frontends_removed: usize,
    pub frontends_updated: usize,
    pub backends_added: usize,
    pub backends_updated: usize,
    pub backends_removed: usize,
    pub ring_slots_written: usize,
    /// Service slots taken and freed (not map writes).
    pub services_added: usize,
    pub services_removed: usize,
    pub unresolved: Vec<Unresolved>,
    pub skipped_capacity: Vec<CapacitySkip>,
    pub frontend_conflicts: Vec<FrontendConflict>,
}

impl ApplyReport {
    /// Total map writes made.
    pub fn writes(&self) -> usize {
        self.frontends_added
            + self.frontends_removed
            + self.frontends_updated
            + self.backends_added
            + self.backends_updated
            + self.backends_removed
            + self.ring_slots_written
    }
}
