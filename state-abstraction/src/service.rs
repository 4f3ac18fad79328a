//! The service interface (BASE upcalls) that the replica calls.
//!
//! The replica is generic over a [`Service`], so the simulator runs the real protocol over the
//! small [`crate::kv::KvService`] and the daemon runs it over the file service. Every method must
//! be deterministic: the same calls in the same order give the same bytes on every replica.

use crate::digest::Digest;
use crate::locking::{
    BaseCursor, BasePage, LockCertChecker, LockEvent, LockId, LockInfo, LockedResult,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Sequence number of an ordered batch; checkpoints are named by the sequence number they follow.
pub type SeqNo = u64;

/// An authenticated client principal, as the replica's authenticator established it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub u64);

/// The abstract value of one object: a list of pieces.
///
/// Piece 0 is the object's header (type, generation, parent, attributes, directory entries or
/// link target); for a regular file, pieces 1.. are its data chunks. Splitting lets a write
/// re-hash only the chunks it touched and lets state transfer fetch only the chunks that differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbstractObject {
    pub pieces: Vec<Vec<u8>>,
}

impl ServiceError {
    /// Lock content from a peer that cannot be used (`lock_install_base`).
    pub fn bad_lock_content(lock: LockId, why: &str) -> ServiceError {
        ServiceError::BadObject {
            index: 0,
            why: format!("lock {}: {why}", lock.0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no checkpoint at sequence number {0}")]
    NoCheckpoint(SeqNo),
    #[error("object {0} is out of range")]
    BadIndex(u64),
    #[error("malformed abstract object {index}: {why}")]
    BadObject { index: u64, why: String },
    /// The concrete store failed (disk full, I/O error). The replica must stop: it then behaves
    /// as a crashed replica, which the protocol tolerates.
    #[error("storage failure: {0}")]
    Storage(#[from] std::io::Error),
}

/// What ordering needs to know of a service's requests, without its state: which may take the
/// read-only path, and the nondeterministic value (for both services here: the agreed time) a
/// primary proposes and a backup accepts.
///
/// Stateless on purpose: the ordering core runs it while the state is elsewhere (an execution
/// stage, possibly another process, maybe behind). So a check cannot be "not before the last
/// agreed value"; execution makes the value monotone instead (each service clamps it).
pub trait RequestPolicy: Send + Sync {
    /// Whether `op` may be answered on the unordered read-only path.
    fn is_read_only(&self, op: &[u8]) -> bool;

    /// On the primary: the nondeterministic value for the next batch. `now_ns` is the
    /// primary's clock, passed in because the core has none.
    fn propose_nondet(&self, now_ns: u64) -> Vec<u8>;

    /// On a backup: whether a proposed value is acceptable (for time: within a skew bound of
    /// `now_ns`).
    fn check_nondet(&self, nondet: &[u8], now_ns: u64) -> bool;
}

/// BASE's upcalls. The replica calls these in the agreed order only.
pub trait Service {
    /// Runs one operation. `nondet` is the value the primary proposed and the backups checked
    /// (for the file service: the agreed time). `client` is the authenticated caller.
    /// `read_only` requests run without ordering and must not change the state.
    fn execute(&mut self, op: &[u8], client: ClientId, nondet: &[u8], read_only: bool) -> Vec<u8>;

    /// The service's rules for requests and their non-determinism (see [`RequestPolicy`]),
    /// as an object of their own: the ordering core keeps it and never touches the state.
    fn policy(&self) -> Arc<dyn RequestPolicy>;

    /// Shorthands for [`RequestPolicy`]'s methods (tools and tests).
    fn is_read_only(&self, op: &[u8]) -> bool {
        self.policy().is_read_only(op)
    }
    fn propose_nondet(&self, now_ns: u64) -> Vec<u8> {
        self.policy().propose_nondet(now_ns)
    }
    fn check_nondet(&self, nondet: &[u8], now_ns: u64) -> bool {
        self.policy().check_nondet(nondet, now_ns)
    }

    /// Number of abstract object slots (free ones included).
    fn object_count(&self) -> u64;

    /// The abstraction function: the current abstract value of object `index`.
    fn get_obj(&self, index: u64) -> Result<AbstractObject, ServiceError>;

    /// The inverse abstraction function: installs abstract values into the concrete state.
    /// Objects may arrive in any order; the service orders the work itself (parents first).
    /// After `put_objs` of every object of some state S, the root digest is S's.
    fn put_objs(&mut self, objs: Vec<(u64, AbstractObject)>) -> Result<(), ServiceError>;

    /// State transfer: after `put_objs`, makes the object count `count` (the count the
    /// certified root covers), for a fetcher that held more slots than the state it fetched:
    /// slots from `count` on are dropped (missing ones below it become free). Services with a
    /// fixed number of objects keep this default.
    fn set_object_count(&mut self, count: u64) -> Result<(), ServiceError> {
        if count == self.object_count() {
            Ok(())
        } else {
            Err(ServiceError::BadIndex(count))
        }
    }

    /// Takes a checkpoint after batch `seq` and returns the partition-tree root digest.
    fn checkpoint(&mut self, seq: SeqNo) -> Result<Digest, ServiceError>;

    /// Restores the exact state of checkpoint `seq` (later checkpoints are dropped).
    fn rollback_to(&mut self, seq: SeqNo) -> Result<(), ServiceError>;

    /// Drops every checkpoint older than `seq` (it became stable).
    fn discard_before(&mut self, seq: SeqNo);

    /// The checkpoints this service holds, oldest first, with their root digests. After the
    /// service is reopened over its data directory (a restart), its state is that of the newest
    /// of these, and the replica replays its log from there.
    fn checkpoints(&self) -> Vec<(SeqNo, Digest)>;

    /// Objects modified since checkpoint `seq` (sorted, deduplicated).
    fn modified_since(&self, seq: SeqNo) -> Result<Vec<u64>, ServiceError>;

    /// State transfer, serving side: the partition-tree node `(level, index)` as of checkpoint
    /// `seq`: the digests of its children (for the leaf level: of its objects). `None` if the
    /// checkpoint is not kept or the node does not exist.
    fn partition_node(&self, seq: SeqNo, level: u32, index: u64) -> Option<Vec<Digest>>;

    /// State transfer, serving side: object `index` as it was at checkpoint `seq`.
    fn get_obj_at(&self, seq: SeqNo, index: u64) -> Option<AbstractObject>;

    /// State transfer, serving side: the digests of the pieces of object `index` at checkpoint
    /// `seq`, so that a fetcher can ask only for the pieces (file chunks) it lacks.
    fn piece_digests_at(&self, seq: SeqNo, index: u64) -> Option<Vec<Digest>>;

    /// State transfer, serving side: one piece of object `index` at checkpoint `seq`.
    fn get_piece_at(&self, seq: SeqNo, index: u64, piece: u32) -> Option<Vec<u8>>;

    /// Whether the next checkpoint has work beyond the digest (for the file service: a lock
    /// to activate, merge or expire, which happens only inside `checkpoint`). The primary
    /// may then pad with null batches to reach it sooner (docs/zzyzx-plan.md §4.3). Services
    /// without such work keep this default.
    fn checkpoint_work_pending(&self) -> bool {
        false
    }

    // Zzyzx locks (docs/zzyzx-plan.md, M2). Services without locks keep the defaults: no
    // lock is ever activated, so the replica never calls the others.

    /// The lock events produced since the last call, in the order they happened: `Frozen`
    /// by `execute` (ordered, never read-only), `Activated`/`Merged` by `checkpoint`. The
    /// execution stage drains them after each of those calls.
    fn take_lock_events(&mut self) -> Vec<LockEvent> {
        Vec::new()
    }

    /// Runs one entry of an active lock's log on the lock's objects, on behalf of `client`
    /// (the holder, already authenticated by the log server) at `time_ns` (the entry's time,
    /// which the log server made monotone per lock). Must not touch anything outside the
    /// lock (then: [`LockedResult::NeedsAgreement`] with no effect), never the ordered
    /// state, and must be deterministic given the lock's objects, `op` and `time_ns`.
    fn execute_locked(
        &mut self,
        _lock: LockId,
        _op: &[u8],
        _client: ClientId,
        _time_ns: u64,
    ) -> LockedResult {
        LockedResult::NeedsAgreement
    }

    /// The digest of the lock's objects as they are now (D_L): equal at two replicas iff
    /// they executed the same entries since activation. `None` if the lock is not active
    /// here (or its content is missing).
    fn lock_state_digest(&self, _lock: LockId) -> Option<Digest> {
        None
    }

    /// Restores the lock's objects to what they were at activation, so that the log
    /// server can replay the log from entry 1 (after a restart: the service reopens at an
    /// ordered checkpoint, and its lock content may be anywhere past activation). The
    /// ordered state is untouched.
    fn lock_restart(&mut self, _lock: LockId) -> Result<(), ServiceError> {
        Ok(())
    }

    /// Gives the service the checker for certificates inside ordered operations.
    fn set_lock_cert_checker(&mut self, _checker: Arc<dyn LockCertChecker>) {}

    /// The locks the ordered state holds as active or frozen (not merged).
    fn lock_infos(&self) -> Vec<LockInfo> {
        Vec::new()
    }

    /// A page of a lock's objects as they were at activation, from `from` on: at least one
    /// piece, more while the page stays within `budget` bytes, in (index, piece) order. To
    /// serve a replica that lacks them, page by page, so that a lock over large files never
    /// needs one large message. `None` if this replica does not hold them.
    fn lock_base_page(&self, _lock: LockId, _from: BaseCursor, _budget: usize) -> Option<BasePage> {
        None
    }

    /// Installs a lock's objects at activation, fetched from a peer: refused unless they
    /// hash to the lock's base digest. Afterwards the log is replayed on them (entries from
    /// 1), as after `lock_restart`.
    fn lock_install_base(
        &mut self,
        lock: LockId,
        _objects: Vec<(u64, AbstractObject)>,
    ) -> Result<(), ServiceError> {
        Err(ServiceError::BadObject {
            index: 0,
            why: format!(
                "lock {} content cannot be installed by this service",
                lock.0
            ),
        })
    }

    /// Whether the state may differ from the correct replicas' through no fault of this
    /// replica: a lock merged here with content that is not what its certified end says
    /// (entries missed, or content never received). The replica then votes none of its
    /// checkpoints and repairs itself by state transfer from the next stable one. Cleared
    /// by `put_objs`.
    fn state_suspect(&self) -> bool {
        false
    }
}
