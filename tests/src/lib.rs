//! Shared test support: packet builder, independent checksums, namespace guards.
