//! Shared test support: packet builder, independent checksums, namespace guards.

pub mod inet_csum;
pub mod packet;
pub mod fixture;
pub mod netns;
pub mod topology;
pub mod scenario;
