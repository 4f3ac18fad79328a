//! What a service shares with the replica about Zzyzx locks (docs/zzyzx-plan.md, milestone
//! M2): the lock's identity, the events that start and end a lock's log, a point of that log,
//! and the result of one locked entry.
//!
//! The replica's log servers run the protocol (signatures, the hash chain, completion); the
//! service only executes entries against the lock's objects and digests them. Both sides
//! agree on a lock's life through [`LockEvent`]s, which the service produces only from
//! ordered execution and checkpoints, so every correct replica sees the same events at the
//! same sequence numbers.

use crate::digest::Digest;
use crate::service::ClientId;
use serde::{Deserialize, Serialize};

/// A lock's number: a counter in the service's lock table, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LockId(pub u64);

/// A point of a lock's log, as a lock checkpoint statement signs it: after entry `k` the
/// chain hash is `chain` and the lock's objects digest to `state` (the service's
/// [`crate::Service::lock_state_digest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockPoint {
    pub lock: LockId,
    pub epoch: u32,
    pub k: u64,
    pub chain: Digest,
    pub state: Digest,
}

impl LockPoint {
    /// The `state` of a point no replica certified (a `Resolve`'s choice): the merge does
    /// not compare the lock's content with it.
    pub const UNCERTIFIED: Digest = Digest([0; 32]);

    pub fn state_certified(&self) -> bool {
        self.state != Self::UNCERTIFIED
    }
}

/// A change of a lock's life, produced by ordered execution (`Frozen`) or inside
/// `checkpoint(seq)` (`Activated`, `Merged`); drained by
/// [`crate::Service::take_lock_events`] after each `execute` and `checkpoint`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockEvent {
    /// The lock's objects are masked from the ordered state as of this checkpoint: from now
    /// on its holder's log entries may be appended and executed. `base` is the lock's state
    /// digest at activation (what `lock_state_digest` gives before any entry).
    Activated {
        lock: LockId,
        epoch: u32,
        holder: ClientId,
        base: Digest,
    },
    /// No entry may be appended any more (release, conflicting ordered access, expiry).
    /// `end` is the certified point a release named: the log must reach it before the merge.
    /// `None` (conflict, expiry, release without a certificate): the log stops where it is.
    Frozen {
        lock: LockId,
        epoch: u32,
        end: Option<LockPoint>,
    },
    /// Merged back into the ordered state (or dropped) by this checkpoint: the log and the
    /// lock's records can go once the checkpoint is durable.
    Merged { lock: LockId, epoch: u32 },
}

impl LockEvent {
    pub fn lock(&self) -> LockId {
        match self {
            LockEvent::Activated { lock, .. }
            | LockEvent::Frozen { lock, .. }
            | LockEvent::Merged { lock, .. } => *lock,
        }
    }
}

/// An active (or frozen, not yet merged) lock as the ordered state records it: what a
/// replica that got the ordered state by transfer needs to fetch the lock's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub lock: LockId,
    pub epoch: u32,
    pub holder: ClientId,
    /// The lock's state digest at activation.
    pub base: Digest,
    /// Frozen by ordering (with the certified end, if its release named one).
    pub frozen: Option<Option<LockPoint>>,
}

/// What one locked entry did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockedResult {
    /// Executed on the lock's objects; the service's reply bytes.
    Done(Vec<u8>),
    /// The operation reaches outside the lock (or the lock is not active here): no effect;
    /// the client sends it on the ordered path.
    NeedsAgreement,
}

/// Checks a lock certificate carried inside an ordered operation (a release's): 2f+1
/// replica signatures over one [`LockPoint`]. The replica builds it from the cluster's keys
/// and gives it to the service, which stays free of keys and signatures. Deterministic: every
/// replica holds the same keys.
pub trait LockCertChecker: Send + Sync {
    /// The point the certificate proves, or `None` if it does not verify.
    fn check(&self, cert: &[u8]) -> Option<LockPoint>;

    /// Where the log of a lock frozen without a certified end ends, chosen from `evidence`
    /// (an ordered `Resolve`'s: 2f+1 replicas' signed reports of their frozen logs, each
    /// ending in an entry the holder signed): deterministic, so every replica picks the same
    /// point. `None` if the evidence does not hold 2f+1 valid reports for this lock. The
    /// point's `state` is [`LockPoint::UNCERTIFIED`]: no replica vouched for the content.
    fn resolve(&self, evidence: &[u8], lock: &ResolveSubject) -> Option<Resolution> {
        let _ = (evidence, lock);
        None
    }
}

/// What a `Resolve`'s evidence settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// Where the lock's log ends.
    pub point: LockPoint,
    /// Two valid reports end in different entries the holder signed at one position: the
    /// holder forked its log (PROTOCOLS §3.5), and is refused further locks.
    pub equivocation: bool,
}

/// The lock a `Resolve` is about, as the ordered state records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolveSubject {
    pub lock: LockId,
    pub epoch: u32,
    pub holder: ClientId,
    /// The lock's state digest at activation (the chain's anchor derives from it).
    pub base: Digest,
}

impl std::fmt::Debug for dyn LockCertChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockCertChecker")
    }
}
