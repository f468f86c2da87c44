//! The reconciler's two seams to the world below it: [`MapWriter`], where its writes go (the
//! data plane, or a test double that checks invariants after every write), and
//! [`Resolver`], where a backend's [`Delivery`] comes from (the node's routes).

use lb_common::{Backend, Frontend, FrontendKey};

use crate::control::model::BackendSpec;

/// A map write that failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WriteError {
    /// What was being written, e.g. "set BACKENDS[12]".
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl WriteError {
    pub fn new(message: impl Into<String>) -> Self {
        WriteError {
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        WriteError {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// The map writes the reconciler needs; the real one is the loaded data plane, tests use a
/// simulation that checks invariants after every call.
pub trait MapWriter {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError>;
    fn clear_backend(&mut self, id: u32) -> Result<(), WriteError>;
    /// Writes `(position, backend id)` pairs of ring `service_id`.
    fn write_ring(&mut self, service_id: u32, changes: &[(u32, u32)]) -> Result<(), WriteError>;
    fn set_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<(), WriteError>;
    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), WriteError>;
}

impl MapWriter for crate::bpf::dataplane::Dataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError> {
        crate::bpf::dataplane::Dataplane::set_backend(self, id, backend)
            .map_err(|e| WriteError::with_source(format!("set BACKENDS[{id}]"), e))
    }

    fn clear_backend(&mut self, id: u32) -> Result<(), WriteError> {
        crate::bpf::dataplane::Dataplane::clear_backend(self, id)
            .map_err(|e| WriteError::with_source(format!("clear BACKENDS[{id}]"), e))
    }

    fn write_ring(&mut self, service_id: u32, changes: &[(u32, u32)]) -> Result<(), WriteError> {
        crate::bpf::dataplane::Dataplane::write_ring(self, service_id, changes).map_err(|e| {
            WriteError::with_source(
                format!("write {} positions of ring {service_id}", changes.len()),
                e,
            )
        })
    }

    fn set_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<(), WriteError> {
        crate::bpf::dataplane::Dataplane::set_frontend(self, key, frontend)
            .map_err(|e| WriteError::with_source(format!("set FRONTENDS {key:?}"), e))
    }

    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), WriteError> {
        crate::bpf::dataplane::Dataplane::remove_frontend(self, key)
            .map_err(|e| WriteError::with_source(format!("remove FRONTENDS {key:?}"), e))
    }
}

/// How to reach a backend from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Local: the pod's host-side veth. Remote: the NIC towards the owning node.
    pub ifindex: u32,
    /// Local: the pod's MAC. Remote: the owning node's (or next hop's) MAC.
    pub dmac: [u8; 6],
    /// The MAC of `ifindex`.
    pub smac: [u8; 6],
    /// A remote backend reached through the tunnel: the owning node's address (the outer
    /// destination). None: local, or remote by SNAT.
    pub tunnel_to: Option<std::net::Ipv4Addr>,
}

/// Finds the [`Delivery`] of a backend (routes, neighbours, veths: the agent's business).
pub trait Resolver {
    /// Err(reason) when the backend cannot be reached now; it is retried on the next apply.
    fn resolve(&self, backend: &BackendSpec) -> Result<Delivery, String>;
}
