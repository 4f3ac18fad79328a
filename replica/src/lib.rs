//! bftfs replication.
//!
//! - [`wire`]: typed messages, frames with size limits, MAC and signature authenticators; the
//!   only way to obtain an [`wire::Authenticated`] message.
//! - [`config`]: cluster configuration, key generation, secrets files (JSON).
//! - [`core`]: the replica's sans-IO protocol state machine (PBFT ordering, checkpoints, view
//!   change, catch-up, state transfer) and its driver contract.
//! - [`client`]: the client half of the protocol, also sans-IO.
//! - [`daemon`]: the replica daemon (`bftfs-replica`, `bftfs replica`).
//! - [`driver`]: the tokio driver: TCP links, write-ahead log, timers, status; runs the core
//!   (the `bftfs-replica` daemon) and the client (`ClientHandle`).
//! - [`localhost`]: replica processes on this machine: ports outside the ephemeral range,
//!   waiting until started ones serve.
//! - [`logging`]: where the programs' logs go (stderr or `--log-file`), `-v`/`-q`, colour
//!   only on a terminal.
//! - [`metrics`]: `/metrics` in the Prometheus text format (replicas and mounts).
//! - [`sim`]: the deterministic simulator (tests, or the `sim` feature).
//! - [`rng`]: the seeded PRNG of the tools and tests (the simulator's generator).

pub mod client;
pub mod config;
pub mod core;
pub mod daemon;
pub mod driver;
pub mod execution;
pub mod localhost;
pub mod lock_client;
pub mod logging;
pub mod metrics;
pub mod rng;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(any(test, feature = "sim", feature = "byzantine"))]
pub mod tamper;
pub mod wire;
