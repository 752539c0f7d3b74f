//! The encrypted workspace: every user's notebooks, data and outputs, encrypted at rest.
//!
//! - [`keys`]: master key sources, sealed data keys, per-workspace keys (HKDF), rotation.
//! - [`path`]: workspace paths, checked once (no traversal in any encoding).
//! - [`store`]: one workspace's encrypted, atomic, tamper-evident store with quotas.

pub mod keys;
pub mod path;
pub mod store;
