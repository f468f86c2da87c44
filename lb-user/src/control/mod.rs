//! Desired state -> map writes: the vocabulary of what a node should forward
//! ([`model`]), the Maglev rings ([`maglev`]) and the reconciler that diffs the desired
//! state against a shadow of the maps and writes the difference make-before-break
//! ([`reconcile`]), through [`writer`]'s seams, reporting with [`report`]'s types. Below the node runtime, above the BPF layer; no Kubernetes types.

pub mod intern;
pub mod maglev;
pub mod model;
pub mod reconcile;
pub mod report;
pub mod writer;
