//! Where desired states come from: Kubernetes objects, from the API server ([`agent`],
//! with its reflectors in [`watch`], the incremental state in [`state`] and the
//! healthCheckNodePort servers in [`healthcheck`]) or from a manifest file ([`standalone`],
//! read by [`manifest`]), translated with kube-proxy's semantics ([`translate`], which reads
//! the slim EndpointSlices of [`slim`]). The top of the write path: it drives
//! `crate::node`, which nothing here is imported by.

pub mod agent;
pub mod healthcheck;
pub mod manifest;
pub mod slim;
pub mod standalone;
pub mod state;
pub mod translate;
pub mod watch;
