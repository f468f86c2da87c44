//! lb-user: loads the data plane, keeps its maps in step with Kubernetes, and answers
//! operator questions about it.
//!
//! Layers, top to bottom; a module imports only from layers below it:
//!
//! ```text
//!   k8s      Kubernetes objects (API server or manifest file) -> desired state
//!    |
//!   node     this node's running data plane: start-up, applies, pins, routes, signals
//!    |
//!   control  desired state -> map writes: model, Maglev, reconcile (make-before-break)
//!    |
//!   bpf      the embedded object, the map catalogue's handles, the data plane, pins,
//!    |       the explain sandbox
//!   lb-common (map catalogue, map types, reasons, hashes, checksums)
//!
//!   inspect  the operator view (counters, conntrack, targets, explain): beside the write
//!            path, it imports only bpf; nothing imports it
//! ```
//!
//! The binary (`main.rs`) wires the command line to `k8s` (agent, standalone) and
//! `inspect` (the operator CLI).

pub mod bpf;
pub mod control;
pub mod inspect;
pub mod k8s;
pub mod node;
