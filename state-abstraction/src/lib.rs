//! The BASE layer of bftfs.
//!
//! In: ordered operations (bytes) with the agreed nondeterministic value and the caller's identity.
//! Out: reply bytes, and an abstract view of the state (objects, digests, checkpoints) that is
//! byte-identical on every correct replica whatever local file system sits underneath.
//!
//! - [`service`]: the upcalls the replica makes (BASE's `execute`, `get_obj`, `put_objs`, ...).
//! - [`digest`]: domain-separated hashing and the partition tree over abstract objects.
//! - [`locking`]: what the service shares with the replica's Zzyzx log servers.
//! - [`kv`]: a tiny key-value service, used by the replica's simulator.
//! - [`fs`]: the file service: `FsOp`/`FsReply`, the abstract file state and the conformance
//!   wrapper over a real local directory.

pub mod digest;
pub mod fs;
pub mod kv;
pub mod locking;
pub mod service;

pub use digest::Digest;
pub use locking::{LockEvent, LockId, LockPoint, LockedResult, Resolution, ResolveSubject};
pub use service::{AbstractObject, ClientId, RequestPolicy, SeqNo, Service, ServiceError};
