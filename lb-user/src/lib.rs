//! lb-user: loads the data plane, translates Kubernetes objects into its maps, and
//! answers operator questions about it.
pub mod agent;
pub mod bpffs;
pub mod dataplane;
pub mod inspect;
pub mod intern;
pub mod kernel_features;
pub mod maglev;
pub mod model;
pub mod netinfo;
pub mod object;
pub mod reconcile;
pub mod runtime;
pub mod standalone;
pub mod standalone_run;
pub mod translate;
