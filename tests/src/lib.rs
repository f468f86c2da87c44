//! The test harness: packet builder, independent checksums, namespace guards, the lab
//! topology, a real Kubernetes control plane, the kubelet's and kube-proxy's parts, and the
//! end-to-end scenario. The product's integration tests (`tests/tests/`) use it, and so do
//! the lab (`tests/lab`, crate lbx-lab) and the benchmarks (`tests/bench`, crate lbx-bench);
//! it depends on neither.

pub mod controlplane;
pub mod fixture;
pub mod inet_csum;
pub mod kubelet;
pub mod kubeproxy;
pub mod netns;
pub mod packet;
pub mod scenario;
pub mod topology;
pub mod vmnet;
