//! Shared test support: packet builder, independent checksums, namespace guards, the lab
//! topology and a real Kubernetes control plane.

pub mod controlplane;
pub mod fixture;
pub mod inet_csum;
pub mod kubelet;
pub mod kubeproxy;
pub mod labreport;
pub mod loadgen;
pub mod netns;
pub mod packet;
pub mod scenario;
pub mod topology;
pub mod vmnet;
