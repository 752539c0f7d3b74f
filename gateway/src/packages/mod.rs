//! Packages for `%pip install`, fetched by the gateway (the only process with a network):
//! [`index`] reads names and index pages, [`wheel`] checks and unpacks wheels, [`fetch`]
//! downloads and caches them by content hash.

pub mod fetch;
pub mod index;
pub mod wheel;
