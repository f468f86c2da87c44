//! lb-user: loads the data plane, translates Kubernetes objects into its maps, and
//! answers operator questions about it.
