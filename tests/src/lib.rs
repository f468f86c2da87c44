//! Shared test support: packet builder, independent checksums, namespace guards.

pub mod fixture;
pub mod inet_csum;
pub mod netns;
pub mod packet;
pub mod scenario;
pub mod topology;
