//! The side-by-side lab's results: the data model ([`model`]) and its renderings
//! ([`render`]: terminal table, self-contained HTML with SVG plots).

pub mod model;
pub mod render;

pub use model::*;
