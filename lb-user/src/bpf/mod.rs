//! The bottom layer of lb-user: the BPF object this binary embeds, its programs and the
//! maps of lb-common's catalogue. Nothing else in lb-user makes a BPF syscall.
//!
//! - [`object`]: the embedded object and the one way it is loaded (map sizes and pins);
//! - [`maps`]: the handle layer: every catalogue map, typed, from the object or from pins;
//! - [`dataplane`]: the write path's data plane (typed writes that keep derived maps in
//!   step, attachments, BPF_PROG_TEST_RUN), with [`rings`] (MAGLEV through mmap) and
//!   [`local_endpoints`];
//! - [`sandbox`]: a private instance of the programs over a running instance's maps, for
//!   `explain`: what the live program would do, without writing the live maps;
//! - [`pins`]: where instances pin their maps and what a pin directory must hold;
//! - [`kernel_features`]: what the kernel must offer, probed before the object loads;
//! - [`bpffs`], [`netdev`], [`testrun`]: the kernel interfaces underneath.

pub mod bpffs;
pub mod dataplane;
pub mod kernel_features;
pub mod local_endpoints;
pub mod maps;
pub mod netdev;
pub mod object;
pub mod pins;
pub mod rings;
pub mod sandbox;
pub mod testrun;
