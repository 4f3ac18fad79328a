//! The tokio driver: runs the sans-IO replica core and client over TCP, a write-ahead log and
//! the wall clock. See [`node`] for the replica side and [`client`] for the client side.

#[cfg(feature = "byzantine")]
pub mod byzantine;
pub mod client;
pub mod net;
pub mod node;
pub mod peers;
pub mod status;
pub mod wal;

/// Whether this build can run Byzantine replicas on purpose (cargo feature `byzantine`).
pub const BYZANTINE_AVAILABLE: bool = cfg!(feature = "byzantine");
