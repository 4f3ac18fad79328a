//! Wire format: typed messages, frames, authenticators.
//!
//! In: bytes from a socket (or the simulator's network). Out: [`Authenticated<Message>`], which
//! only [`Authenticator::open`] can build, after it has
//! - refused frames over [`FRAME_BYTES_MAX`] before reading them whole ([`frame_length`],
//!   [`FrameReader`]),
//! - decoded with a size limit (bincode 2, standard configuration, no trailing bytes),
//! - checked the sender's HMAC-SHA256 tag (pairwise keys; a broadcast carries one tag per
//!   receiver, computed over one digest of the message),
//! - checked every Ed25519 signature inside the message (requests, pre-prepares, prepares,
//!   checkpoints, view changes, new views and the certificates they carry) and that each batch
//!   hashes to the digest its pre-prepare signs,
//! - with one exception: a commit received on its own is not signature-checked (its MAC
//!   authenticates its sender, which is all a local "committed" decision needs); commits are
//!   checked where they become transferable evidence, inside a relayed [`CommitCertificate`],
//!   and those that fail are dropped from it ([`Authenticated::stripped_commits`]).
//!
//! What is signed: statements later forwarded as evidence ([`Statement`] types). What is only
//! MAC'd: everything point-to-point (replies, fetches, state-transfer data). Digests are taken
//! over canonical encodings (no maps, no floats) with a domain tag per statement kind.
//!
//! Semantic checks (quorum sizes, matching views, whose turn it is) are the core's job; the
//! verifier guarantees only that every signature and tag is genuine.
//!
//! Where things are:
//! - [`ids`]: the newtypes for replicas, principals, views, sequence numbers, timestamps;
//! - [`codec`]: the canonical encoding ([`encode`], [`decode`]);
//! - [`signed`]: [`Signature`], [`Statement`], [`Signed`], [`statement_digest`], [`Signer`];
//! - [`statements`]: the signed statements (request, pre-prepare, prepare, commit,
//!   checkpoint, view change, new view) and the history chain;
//! - [`compound`]: batches, proposals, certificates, evidence, replies;
//! - [`lock`]: Zzyzx's log protocol (entries, replies, seals, certificates);
//! - [`messages`]: one enum per protocol, and [`Message`];
//! - [`error`]: [`WireError`], why a frame was refused;
//! - [`frame`](mod@frame): length-prefixed frames ([`frame()`], [`FrameReader`]);
//! - [`auth`]: MACs and signature checks ([`Authenticator`], [`Authenticated`]).
//!
//! Every item is re-exported here: callers name `crate::wire::X`, never a submodule.

pub mod auth;
pub mod codec;
pub mod compound;
pub mod error;
pub mod frame;
pub mod ids;
pub mod lock;
pub mod messages;
pub mod signed;
pub mod statements;
#[cfg(test)]
mod tests;

pub use auth::{Authenticated, Authenticator, WireCounters};
pub use codec::{decode, encode};
pub use compound::{
    Batch, CheckpointCertificate, CommitCertificate, Evidence, Pom, PreparedCertificate, Proposal,
    Reply, SpecResponse,
};
pub use error::WireError;
pub use frame::{claimed_sender, frame, frame_length, FrameReader};
pub use ids::{Principal, ReplicaId, SeqNo, Timestamp, View};
pub use lock::{
    lock_anchor, lock_chain_next, lock_op_digest, LockCertVerifier, LockCertificate, LockEntry,
    LockMessage, LockReply, LockReport, LockResolution, LockSeal, LockServerState, LoggedEntry,
    LOCK_RESOLUTION_BYTES_MAX,
};
pub use messages::{
    AgreementMessage, ClientMessage, Message, StateTransferMessage, ViewChangeMessage,
};
pub use signed::{statement_digest, Signature, Signed, Signer, Statement};
pub use state_abstraction::{ClientId, Digest};
pub use statements::{
    chain_history, history_anchor, Checkpoint, Commit, NewView, PrePrepare, Prepare, Request,
    ViewChange,
};

/// Largest frame accepted or produced.
pub const FRAME_BYTES_MAX: usize = 32 << 20;
/// Length prefix of a frame: a big-endian `u32`.
pub const FRAME_HEADER_BYTES: usize = 4;
