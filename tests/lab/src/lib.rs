//! The side-by-side lab, the project's main job (`lbx-lab`, run by `cargo xtask lab`): its
//! load generator ([`loadgen`]) and its results ([`report`]). The command is `src/main.rs`;
//! `lbx-demo` (`cargo xtask demo`) is the shorter tour of the XDP path alone.

pub mod loadgen;
pub mod report;
