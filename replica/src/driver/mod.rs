//! The tokio driver: runs the sans-IO replica core and client over TCP, a write-ahead log and
//! the wall clock. See [`node`] for the replica side and [`client`] for the client side.

pub mod client;
pub mod net;
pub mod node;
pub mod status;
pub mod wal;
