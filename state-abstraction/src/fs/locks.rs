//! Zzyzx locks in the replicated file state (issue #13, milestones M1–M2; docs/zzyzx-plan.md
//! §1–§4).
//!
//! A client may lock a subtree, a directory or a file so that it can work on it through a
//! log protocol without agreement (the log's entries run in `lock_timeline.rs`). This module
//! holds the part that lives in the ordered state:
//!
//! - the lock table, in the root's header ([`ObjectHeader::LiveRoot`]), changed only by
//!   ordered operations ([`super::FsOp::Lock`], [`super::FsOp::Release`],
//!   [`super::FsOp::Renew`]) and by [`FileService`]'s checkpoint;
//! - the *masked* objects: while a lock is active, every object of its membership M_L (and
//!   its pool of reserved slots) reads in the ordered state as the placeholder
//!   `Locked{lock}`, whatever the lock's own timeline does to it. So ordered checkpoint
//!   digests, rollback and state transfer never depend on how a replica interleaved locked
//!   work with ordered batches. The file service keeps each masked slot's real value;
//!   `masked` says which slots the ordered side must not read;
//! - the transitions (activation, merge, expiry), run only inside `checkpoint(seq)`:
//!   checkpoints are taken on committed state and no rollback goes below the newest one, so
//!   no transition is ever undone, and no committed batch is re-executed across one.
//!
//! An ordered operation that reads a masked slot answers [`FsError::Locked`] with no effect
//! and freezes the lock. A frozen lock merges back at the first checkpoint after its log's
//! end is fixed: by the holder's `Release` with a certificate (2f+1 replicas sealed that
//! point), or, when the holder stays silent for [`RELEASE_GRACE_NS`] of agreed time after
//! the freeze, by any client's `Resolve` with 2f+1 replicas' reports of their frozen logs
//! (the checker picks the longest chain the holder signed, so every correct replica merges
//! the same entries). A lock nobody resolves merges with each replica's own log after
//! [`UNRESOLVED_MERGE_NS`]. Meanwhile the holder's log entries change the real content of
//! the members (M2, `lock_timeline.rs`), and the merge gives the ordered state that content.

use super::object::{ObjectHeader, Slot};
use super::ops::{Caller, FileType, FsError, FsReply, FsResult, Handle};
use super::FileService;
use crate::digest::{object_digest, piece_digest, Digest, Hasher};
use crate::locking::{LockEvent, LockPoint};
use crate::service::{ClientId, SeqNo, ServiceError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub use crate::locking::LockId;

/// Most entries in the table: bounds the root's header.
pub const LOCKS_MAX: usize = 256;
/// Most locks one client holds (pending ones included).
pub const LOCKS_PER_CLIENT_MAX: usize = 8;
/// Most objects in one lock, pool included: bounds the walk and the merge inside one
/// checkpoint.
pub const LOCK_OBJECTS_MAX: u64 = 1 << 17;
/// Slots reserved for new objects when a subtree or directory lock activates. No refill is
/// built (docs/zzyzx-plan.md §3), so the pool is sized for a working directory that creates
/// thousands of files (PostMark `std` keeps 2,000 and more alive); a slot costs a masked
/// entry and a free header, and slots freed under the lock are reused.
pub const POOL_INITIAL: u32 = 16384;
/// Most ranges a pool is made of (runs of free slots, then one run at the end of the array):
/// a lock's entry stays small however fragmented the free list is.
pub const POOL_RANGES_MAX: usize = 16;
pub const BANNED_MAX: usize = 256;
/// How long a holder caught forking its log is refused locks.
pub const BAN_NS: u64 = 24 * 60 * 60 * 1_000_000_000;
pub const RECENT_MAX: usize = 64;
/// A lock's life from one renewal: 10 minutes of agreed time.
pub const LOCK_RENEW_NS: u64 = 10 * 60 * 1_000_000_000;
/// A lock's longest life from its request, renewals included: 1 hour.
pub const LOCK_LIFETIME_MAX_NS: u64 = 60 * 60 * 1_000_000_000;
/// A pending lock that overlaps another client's is retried at each checkpoint for this long.
pub const PENDING_MAX_NS: u64 = 30 * 1_000_000_000;
/// How long a root revoked by conflict may not be locked again by the same holder.
pub const RECENT_NS: u64 = 5 * 1_000_000_000;
/// A lock frozen without a certified end (a conflict, expiry, or a release without a
/// certificate) takes no `Resolve` for this much agreed time after the freeze: time for a
/// holder told of the conflict to drain its log and send `Release` with a certificate. It
/// also bounds how soon after a freeze the merge can come, which the holder's cache relies
/// on (fs-client's `lock_cache.rs`).
pub const RELEASE_GRACE_NS: u64 = 5 * 1_000_000_000;
/// A lock frozen without an end that no client resolved merges with each replica's own
/// log after this much agreed time: nobody touched its objects (a `Resolve` comes from the
/// first client that does), so the masks are lifted rather than kept for good. Replicas
/// whose logs differ then differ in the checkpoint, and state transfer repairs the minority.
pub const UNRESOLVED_MERGE_NS: u64 = 60 * 1_000_000_000;
/// Agreed time between a `Resolve` and the merge: the replicas whose logs do not end at the
/// chosen point fetch or cut back meanwhile (a replica still off it at the merge votes no
/// checkpoint and is repaired by state transfer).
pub const RESOLVED_SETTLE_NS: u64 = 1_000_000_000;
/// Most undrained lock events kept (one checkpoint makes at most about three per lock).
const LOCK_EVENTS_MAX: usize = 16 * LOCKS_MAX;

/// What a lock covers, from its root object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockUnit {
    /// The directory and every object reachable below it, except a non-directory that also
    /// has a name outside; plus a pool of slots for new objects.
    Subtree,
    /// The directory alone (its entries and attributes), plus a pool.
    Directory,
    /// A regular file alone (attributes and data); no pool.
    File,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FreezeCause {
    /// An ordered operation by this client (possibly the holder) touched a masked object.
    Conflict(ClientId),
    Release,
    Expired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockState {
    /// Granted by an ordered `Lock`; activates at the next checkpoint.
    Pending,
    /// Masked since checkpoint `activated_seq`.
    Active { activated_seq: SeqNo },
    /// No longer served. Merges back into the ordered state at the next checkpoint if `end`
    /// is known (the certified point a release named), else at the first checkpoint
    /// [`RELEASE_GRACE_NS`] after `since_ns`.
    Frozen {
        since_ns: u64,
        cause: FreezeCause,
        end: Option<LockPoint>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEntry {
    pub id: LockId,
    /// Changes only when the lock moves between server groups (M5).
    pub epoch: u32,
    pub holder: ClientId,
    pub unit: LockUnit,
    /// The lock's root object as the `Lock` request named it.
    pub root: Handle,
    pub state: LockState,
    /// Agreed time of the `Lock` request, and the end of the lock's life.
    pub requested_ns: u64,
    pub expires_ns: u64,
    /// |M_L|, pool included (0 until activation).
    pub members: u32,
    /// Reserved slot ranges (start, length), in index order.
    pub pool: Vec<(u64, u32)>,
    /// D_L(0), the lock's state digest at activation (see `FileService::lock_digest`): what
    /// its log starts from, what a replica without a record checks its content against,
    /// and what a later lock state transfer is verified against.
    pub base: Digest,
    /// (live objects, used blocks) among the members at activation: what statfs counts for
    /// them while masked, so that `df` reads no lock-timeline state.
    pub frozen_counts: (u64, u64),
    /// 0: the home group (M5).
    pub group: u32,
    /// The lock root's attributes at activation: what an ordered `Lookup`, `GetAttr` or
    /// `ReadDir` from outside the lock answers for the root, without revoking it (plan
    /// §2.4), so that `ls -l` of the parent, or a path walk through it, leaves the lock
    /// alone. Looking inside revokes. `None` while pending.
    pub frozen_attr: Option<super::ops::Attr>,
}

/// The lock table, in the root's header.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    /// The next lock's number.
    pub next_lock: u64,
    /// Strictly by id.
    pub locks: Vec<LockEntry>,
    /// Clients refused further locks (equivocators, M3), until an agreed time; by client.
    pub banned: Vec<(ClientId, u64)>,
    /// Roots revoked by conflict: (root index, holder, until agreed ns); by (root, holder).
    pub recent: Vec<(u64, ClientId, u64)>,
}

/// Why a `Lock` was refused (the request itself was well formed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockRefusal {
    Banned,
    /// The caller holds [`LOCKS_PER_CLIENT_MAX`], or the table is full.
    TooMany,
    /// The object is already inside one of the caller's locks (or asked for).
    AlreadyCovered,
    /// Revoked by conflict from this holder a moment ago.
    Recent,
    /// The root of the file system holds the lock table and the agreed time, which every
    /// ordered batch changes: it cannot be locked.
    Root,
}

impl LockTable {
    pub fn entry(&self, id: LockId) -> Option<&LockEntry> {
        self.locks
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|k| &self.locks[k])
    }

    fn entry_mut(&mut self, id: LockId) -> Option<&mut LockEntry> {
        match self.locks.binary_search_by_key(&id, |e| e.id) {
            Ok(k) => Some(&mut self.locks[k]),
            Err(_) => None,
        }
    }

    /// The checks a lock table from a peer must pass: bounded, sorted, self-consistent. A
    /// table that fails is refused like any malformed header.
    pub fn check(&self) -> Result<(), String> {
        if self.locks.len() > LOCKS_MAX {
            return Err("too many locks".into());
        }
        if self.banned.len() > BANNED_MAX || self.recent.len() > RECENT_MAX {
            return Err("lock table lists too long".into());
        }
        if self.locks.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err("locks not in strict id order".into());
        }
        if self.banned.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("banned clients not in strict order".into());
        }
        if self
            .recent
            .windows(2)
            .any(|w| (w[0].0, w[0].1) >= (w[1].0, w[1].1))
        {
            return Err("recent roots not in strict order".into());
        }
        let mut per_holder: BTreeMap<ClientId, usize> = BTreeMap::new();
        for e in &self.locks {
            if e.id.0 >= self.next_lock {
                return Err("lock id not yet handed out".into());
            }
            let n = per_holder.entry(e.holder).or_default();
            *n += 1;
            if *n > LOCKS_PER_CLIENT_MAX {
                return Err("too many locks for one client".into());
            }
            if e.root.index == 0 {
                return Err("a lock on the root".into());
            }
            if e.pool.len() > POOL_RANGES_MAX {
                return Err("too many pool ranges".into());
            }
            let mut pooled = 0u64;
            let mut end = 0u64;
            for &(start, len) in &e.pool {
                if len == 0 || start < end || start == 0 {
                    return Err("pool ranges empty, overlapping or out of order".into());
                }
                end = start
                    .checked_add(len as u64)
                    .ok_or("pool range overflows")?;
                pooled += len as u64;
            }
            if e.members as u64 > LOCK_OBJECTS_MAX || pooled > e.members as u64 {
                return Err("lock membership out of bounds".into());
            }
            let activated = !matches!(e.state, LockState::Pending);
            if !activated
                && (e.members != 0
                    || !e.pool.is_empty()
                    || e.base != Digest::default()
                    || e.frozen_counts != (0, 0)
                    || e.frozen_attr.is_some())
            {
                return Err("a pending lock with members".into());
            }
            if e.frozen_counts.0 > e.members as u64 {
                return Err("more live objects than members".into());
            }
            if activated && e.members == 0 {
                return Err("an active lock without members".into());
            }
            if e.unit == LockUnit::File && !e.pool.is_empty() {
                return Err("a pool on a file lock".into());
            }
            if e.expires_ns < e.requested_ns {
                return Err("a lock that expires before it was asked for".into());
            }
            if let LockState::Frozen { end: Some(p), .. } = e.state {
                if p.lock != e.id || p.epoch != e.epoch {
                    return Err("a lock's end point names another lock".into());
                }
            }
        }
        Ok(())
    }
}

/// The placeholder's digest: what the ordered tree holds for a masked slot.
pub(super) fn placeholder_digest(i: u64, lock: LockId) -> Digest {
    let bytes = ObjectHeader::Locked { lock }.encode();
    object_digest(i, &[piece_digest(i, 0, &bytes)])
}

/// What the walk at activation found.
struct Walk {
    members: BTreeSet<u64>,
    /// Other locks whose masked objects the walk reached.
    overlaps: BTreeSet<LockId>,
    /// The walk stopped past [`LOCK_OBJECTS_MAX`] objects.
    too_large: bool,
}

/// Who runs the current request, for the guarded accessors (docs/zzyzx-plan.md §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scope {
    /// Not inside a request: checkpoints, rollback, state transfer, recovery. These see real
    /// values and decide themselves what is masked.
    Outside,
    /// An ordered request, by this client, at this agreed time.
    Ordered { client: ClientId, now_ns: u64 },
    /// An unordered read-only request.
    ReadOnly,
    /// An entry of `lock`'s log (whose root object is `root`): it may read and change that
    /// lock's members only.
    Lock { lock: LockId, root: u64 },
}

impl FileService {
    /// The guard every read of a table slot by a request passes (`obj` calls it; so does
    /// every read of a child or parent found through a directory). On the ordered and
    /// read-only paths a masked slot answers `Locked`, and the lock is remembered so that an
    /// ordered request freezes it. Under a lock, any slot that is not one of its members
    /// answers `Locked` too, and is remembered as outside: the entry then needs agreement.
    pub(super) fn guard(&self, i: u64) -> Result<(), FsError> {
        match self.scope {
            Scope::Outside => Ok(()),
            Scope::Lock { lock, .. } => {
                if self.masked.get(&i) == Some(&lock) {
                    Ok(())
                } else {
                    self.needs_agreement.set(true);
                    Err(FsError::Locked)
                }
            }
            Scope::Ordered { .. } | Scope::ReadOnly => match self.masked.get(&i) {
                None => Ok(()),
                Some(&lock) => {
                    if self.lock_hit.get().is_none() {
                        self.lock_hit.set(Some(lock));
                    }
                    Err(FsError::Locked)
                }
            },
        }
    }

    /// For slot `i` seen from outside a lock (ordered and read-only scopes): if it is the
    /// root of an active lock, its handle and the attributes frozen at activation. The
    /// caller answers with them instead of passing the guard, which would revoke. Not for a
    /// frozen lock: it merges soon, and its holder may have changed the root's attributes
    /// (a `chmod` under the lock); the caller then waits for the merge like any other
    /// access to the lock's objects, so that nobody, the holder included, reads the old
    /// attributes after the holder gave the lock back.
    pub(super) fn frozen_root(&self, i: u64) -> Option<(Handle, super::ops::Attr)> {
        if !matches!(self.scope, Scope::Ordered { .. } | Scope::ReadOnly) {
            return None;
        }
        let lock = *self.masked.get(&i)?;
        let e = self.lock_table()?.entry(lock)?;
        if !matches!(e.state, LockState::Active { .. }) {
            return None;
        }
        (e.root.index == i)
            .then(|| e.frozen_attr.clone().map(|a| (e.root, a)))
            .flatten()
    }

    /// Asserts that a request does not read slot `i` past the guards: that would make an
    /// ordered result depend on lock-timeline state, or a locked one on ordered state. A
    /// bug, never input.
    pub(super) fn assert_in_scope(&self, i: u64) {
        let ok = match self.scope {
            Scope::Outside => true,
            Scope::Lock { lock, .. } => self.masked.get(&i) == Some(&lock),
            Scope::Ordered { .. } | Scope::ReadOnly => !self.masked.contains_key(&i),
        };
        assert!(
            ok,
            "a request reached object {i} outside its scope without passing a guard"
        );
    }

    /// The root of the lock whose entry runs now, if one does: the rename ancestor walk stops
    /// there, since every member's chain of parents reaches it inside the lock.
    pub(super) fn scope_lock_root(&self) -> Option<u64> {
        match self.scope {
            Scope::Lock { root, .. } => Some(root),
            _ => None,
        }
    }

    /// Queues a lock event for [`crate::Service::take_lock_events`]. A caller that never
    /// drains them (the unreplicated mode) keeps only the newest, so the queue stays bounded.
    pub(super) fn emit(&mut self, event: LockEvent) {
        if self.lock_events.len() >= LOCK_EVENTS_MAX {
            self.lock_events.remove(0);
        }
        self.lock_events.push(event);
    }

    pub(super) fn lock_table(&self) -> Option<&LockTable> {
        self.slots.first().and_then(Slot::live)?.locks.as_deref()
    }

    /// The lock table for changing (created empty on first use, which turns the root's
    /// header into `LiveRoot`); the root is touched first.
    fn lock_table_mut(&mut self) -> Result<&mut LockTable, FsError> {
        self.touch(0)?;
        Ok(self.live_mut(0).locks.get_or_insert_with(Default::default))
    }

    /// The lock that masks slot `i`, if any.
    pub fn masked_by(&self, i: u64) -> Option<LockId> {
        self.masked.get(&i).copied()
    }

    /// The lock table as the ordered state holds it (empty if no lock was ever asked for).
    pub fn locks(&self) -> LockTable {
        self.lock_table().cloned().unwrap_or_default()
    }

    /// Whether the next checkpoint has lock work: a lock to activate, one past its life, or
    /// one frozen and due to merge (its end certified, or its grace over by the newest
    /// agreed time). The execution stage will report this so the primary pads to the next
    /// checkpoint with null batches (docs/zzyzx-plan.md §4.3); not wired yet.
    pub fn lock_transition_pending(&self) -> bool {
        let now = self.last_time();
        self.lock_table().is_some_and(|t| {
            t.locks.iter().any(|e| match e.state {
                LockState::Pending => true,
                LockState::Frozen { since_ns, end, .. } => merge_due(since_ns, end, now),
                LockState::Active { .. } => e.expires_ns <= now,
            })
        })
    }

    /// The lock operations (ordered except `ListLocks`).
    pub(super) fn exec_lock(&mut self, c: &Caller, op: &super::ops::FsOp) -> FsResult {
        use super::ops::FsOp;
        let (client, now_ns) = match self.scope {
            Scope::Ordered { client, now_ns } => (client, now_ns),
            Scope::ReadOnly | Scope::Outside | Scope::Lock { .. } => match op {
                FsOp::ListLocks => (ClientId(u64::MAX), 0),
                // Unreachable through `Service::execute`, which refuses mutating operations
                // on the read-only path; a direct caller gets the same answer.
                _ => return Err(FsError::BadRequest),
            },
        };
        match op {
            FsOp::Lock { h, unit } => self.lock(c, client, *h, *unit, now_ns),
            FsOp::Release { lock, cert } => {
                let e = self.holder_entry(*lock, client)?;
                let end = match cert {
                    None => None,
                    Some(bytes) => Some(self.check_release_cert(&e, bytes)?),
                };
                match e.state {
                    LockState::Pending => {
                        // Never activated: nothing to merge, and no log server knew it.
                        let t = self.lock_table_mut()?;
                        t.locks.retain(|e| e.id != *lock);
                    }
                    LockState::Active { .. } => {
                        self.set_frozen(&e, now_ns, FreezeCause::Release, end)?;
                    }
                    LockState::Frozen {
                        since_ns,
                        cause,
                        end: old,
                    } => {
                        // Frozen by a conflict or expiry, or released without a certificate,
                        // and not merged yet: a certified end now fixes where every replica
                        // merges. A later point on the chain replaces an earlier one.
                        if let (Some(p), Some(o)) = (end, old) {
                            if o.k > p.k {
                                // A `Resolve` chose a longer chain than the holder's
                                // certificate: an entry it saw refused by 2f+1 replicas
                                // was logged by others and is part of the lock's result.
                                return Err(FsError::Stale);
                            }
                        }
                        if let Some(p) = end.filter(|p| old.is_none_or(|o| p.k > o.k)) {
                            let t = self.lock_table_mut()?;
                            if let Some(x) = t.entry_mut(*lock) {
                                x.state = LockState::Frozen {
                                    since_ns,
                                    cause,
                                    end: Some(p),
                                };
                            }
                            self.emit(LockEvent::Frozen {
                                lock: e.id,
                                epoch: e.epoch,
                                end: Some(p),
                            });
                        }
                    }
                }
                Ok(FsReply::Done)
            }
            FsOp::Resolve { lock, evidence } => {
                let Some(e) = self.lock_table().and_then(|t| t.entry(*lock)).cloned() else {
                    // Merged already (or never granted): nothing is left to resolve.
                    return Ok(FsReply::Done);
                };
                let LockState::Frozen {
                    since_ns,
                    cause,
                    end,
                } = e.state
                else {
                    return Err(FsError::Inval);
                };
                if end.is_some() {
                    return Ok(FsReply::Done);
                }
                if now_ns < since_ns.saturating_add(RELEASE_GRACE_NS) {
                    return Err(FsError::Locked);
                }
                let subject = crate::locking::ResolveSubject {
                    lock: e.id,
                    epoch: e.epoch,
                    holder: e.holder,
                    base: e.base,
                };
                let resolution = self
                    .cert_checker
                    .as_ref()
                    .and_then(|c| c.resolve(evidence, &subject))
                    .filter(|r| r.point.lock == e.id && r.point.epoch == e.epoch)
                    .ok_or(FsError::Inval)?;
                let p = resolution.point;
                let t = self.lock_table_mut()?;
                if resolution.equivocation {
                    // The holder signed two entries at one position: no more locks for it
                    // for a day (the ordered path stays open to it, under access control).
                    tracing::warn!(
                        lock = e.id.0,
                        holder = e.holder.0,
                        "file service: the lock's holder forked its log; refused locks for a day"
                    );
                    let until = now_ns.saturating_add(BAN_NS);
                    match t.banned.binary_search_by_key(&e.holder, |b| b.0) {
                        Ok(i) => t.banned[i].1 = t.banned[i].1.max(until),
                        Err(i) => {
                            t.banned.insert(i, (e.holder, until));
                            if t.banned.len() > BANNED_MAX {
                                // The ban that ends first goes.
                                if let Some(j) = (0..t.banned.len()).min_by_key(|&j| t.banned[j].1)
                                {
                                    t.banned.remove(j);
                                }
                            }
                        }
                    }
                }
                if let Some(x) = t.entry_mut(*lock) {
                    // `since_ns` becomes the time the end was fixed: the merge waits
                    // `RESOLVED_SETTLE_NS` after it (see `merge_due`). The grace is over.
                    let _ = since_ns;
                    x.state = LockState::Frozen {
                        since_ns: now_ns,
                        cause,
                        end: Some(p),
                    };
                }
                tracing::info!(
                    lock = e.id.0,
                    k = p.k,
                    "file service: lock's log end resolved"
                );
                self.emit(LockEvent::Frozen {
                    lock: e.id,
                    epoch: e.epoch,
                    end: Some(p),
                });
                Ok(FsReply::Done)
            }
            FsOp::Renew { lock } => {
                let e = self.holder_entry(*lock, client)?;
                if matches!(e.state, LockState::Frozen { .. }) {
                    return Err(FsError::Inval);
                }
                let expires = now_ns
                    .saturating_add(LOCK_RENEW_NS)
                    .min(e.requested_ns.saturating_add(LOCK_LIFETIME_MAX_NS))
                    .max(e.expires_ns);
                let t = self.lock_table_mut()?;
                if let Some(e) = t.entry_mut(*lock) {
                    e.expires_ns = expires;
                }
                Ok(FsReply::Done)
            }
            FsOp::ListLocks => {
                let mut t = self.locks();
                for e in &mut t.locks {
                    // The pools are the holder's business and can be long.
                    e.pool.clear();
                }
                Ok(FsReply::Locks {
                    next_lock: t.next_lock,
                    locks: t.locks,
                })
            }
            _ => unreachable!("exec_lock called with {op:?}"),
        }
    }

    /// The entry of `lock`, which `client` must hold.
    fn holder_entry(&self, lock: LockId, client: ClientId) -> Result<LockEntry, FsError> {
        let e = self
            .lock_table()
            .and_then(|t| t.entry(lock))
            .ok_or(FsError::Inval)?;
        if e.holder != client {
            return Err(FsError::Perm);
        }
        Ok(e.clone())
    }

    /// `Lock`: the grant checks (docs/zzyzx-plan.md §1.3), then a `Pending` entry.
    fn lock(
        &mut self,
        c: &Caller,
        client: ClientId,
        h: Handle,
        unit: LockUnit,
        now_ns: u64,
    ) -> FsResult {
        let refuse = |why| Ok(FsReply::LockRefused { why });
        if h.index == 0 {
            return refuse(LockRefusal::Root);
        }
        let table = self.locks();
        if table
            .banned
            .iter()
            .any(|&(b, until)| b == client && until > now_ns)
        {
            return refuse(LockRefusal::Banned);
        }
        // The caller's own lock already covering the object is refused rather than frozen:
        // asking twice is a client's mistake, not a conflict.
        if let Some(l) = self.masked.get(&h.index) {
            if table.entry(*l).is_some_and(|e| e.holder == client) {
                return refuse(LockRefusal::AlreadyCovered);
            }
        }
        let o = self.obj(h)?;
        match unit {
            LockUnit::Subtree | LockUnit::Directory if o.kind != FileType::Directory => {
                return Err(FsError::NotDir)
            }
            LockUnit::File if o.kind != FileType::Regular => return Err(FsError::Inval),
            _ => {}
        }
        let want = if unit == LockUnit::File {
            super::exec::W
        } else {
            super::exec::W | super::exec::X
        };
        if !super::exec::may(o, c, want) {
            return Err(FsError::Access);
        }
        let held = table.locks.iter().filter(|e| e.holder == client).count();
        if held >= LOCKS_PER_CLIENT_MAX || table.locks.len() >= LOCKS_MAX {
            return refuse(LockRefusal::TooMany);
        }
        if table
            .locks
            .iter()
            .any(|e| e.holder == client && e.root.index == h.index)
        {
            return refuse(LockRefusal::AlreadyCovered);
        }
        if table
            .recent
            .iter()
            .any(|&(r, holder, until)| r == h.index && holder == client && until > now_ns)
        {
            return refuse(LockRefusal::Recent);
        }
        let t = self.lock_table_mut()?;
        let id = LockId(t.next_lock);
        t.next_lock += 1;
        t.locks.push(LockEntry {
            id,
            epoch: 0,
            holder: client,
            unit,
            root: h,
            state: LockState::Pending,
            requested_ns: now_ns,
            expires_ns: now_ns.saturating_add(LOCK_RENEW_NS),
            members: 0,
            pool: Vec::new(),
            base: Digest::default(),
            frozen_counts: (0, 0),
            group: 0,
            frozen_attr: None,
        });
        Ok(FsReply::LockPending { lock: id })
    }

    /// An ordered request by `client` touched an object of `lock`: the lock freezes (once),
    /// and its root may not be locked again by the same holder for a while.
    pub(super) fn freeze_on_conflict(
        &mut self,
        lock: LockId,
        client: ClientId,
        now_ns: u64,
    ) -> Result<(), FsError> {
        // A slot masked by a lock the table lacks exists only between the batches of a
        // state transfer (placeholders before the root); the request is refused all the
        // same, and there is nothing to freeze.
        let Some(e) = self.lock_table().and_then(|t| t.entry(lock)).cloned() else {
            return Ok(());
        };
        if !matches!(e.state, LockState::Active { .. }) {
            return Ok(());
        }
        self.set_frozen(&e, now_ns, FreezeCause::Conflict(client), None)?;
        let t = self.lock_table_mut()?;
        note_recent(&mut t.recent, e.root.index, e.holder, now_ns);
        Ok(())
    }

    /// Freezes active lock `e` (an ordered change) and reports it to the log servers.
    fn set_frozen(
        &mut self,
        e: &LockEntry,
        now_ns: u64,
        cause: FreezeCause,
        end: Option<LockPoint>,
    ) -> Result<(), FsError> {
        let t = self.lock_table_mut()?;
        if let Some(entry) = t.entry_mut(e.id) {
            entry.state = LockState::Frozen {
                since_ns: now_ns,
                cause,
                end,
            };
        }
        self.emit(LockEvent::Frozen {
            lock: e.id,
            epoch: e.epoch,
            end,
        });
        Ok(())
    }

    /// The point a release certificate proves, if it verifies and names this lock. Refused
    /// with `Inval` otherwise (no checker given, a bad certificate, another lock or epoch):
    /// the request is malformed, as with any other bad argument, and changes nothing.
    fn check_release_cert(&self, e: &LockEntry, cert: &[u8]) -> Result<LockPoint, FsError> {
        let p = self
            .cert_checker
            .as_ref()
            .and_then(|c| c.check(cert))
            .ok_or(FsError::Inval)?;
        if p.lock != e.id || p.epoch != e.epoch {
            return Err(FsError::Inval);
        }
        Ok(p)
    }

    /// The lock transitions of checkpoint `seq`, in lock-id order, before its digest: merge
    /// what is frozen and due, freeze what expired, activate what is pending, forget old
    /// rows. Digests must be fresh (the base digest of an activation reads them, and so does
    /// the merge's comparison with the certified end).
    pub(super) fn lock_transitions(&mut self, seq: SeqNo) -> Result<(), ServiceError> {
        let Some(table) = self.lock_table().cloned() else {
            return Ok(());
        };
        let fs = |e: FsError| ServiceError::Storage(std::io::Error::other(e.to_string()));
        let now = self.last_time();
        let mut locks: Vec<LockEntry> = Vec::new();
        let mut blind_merge = false;
        let mut revoked: Vec<(u64, ClientId)> = Vec::new();
        for mut e in table.locks.iter().cloned() {
            match e.state {
                LockState::Frozen {
                    since_ns,
                    end,
                    cause,
                } if merge_due(since_ns, end, now) => {
                    if end.is_none() {
                        tracing::warn!(
                            lock = e.id.0,
                            "file service: merging a lock frozen without an end that no \
                             client resolved; replicas whose logs differ will differ here"
                        );
                    }
                    blind_merge |= self.merge_lock(&e, end).map_err(fs)?;
                    if let FreezeCause::Conflict(_) = cause {
                        revoked.push((e.root.index, e.holder));
                    }
                    continue;
                }
                LockState::Active { .. } if e.expires_ns <= now => {
                    e.state = LockState::Frozen {
                        since_ns: now,
                        cause: FreezeCause::Expired,
                        end: None,
                    };
                    self.emit(LockEvent::Frozen {
                        lock: e.id,
                        epoch: e.epoch,
                        end: None,
                    });
                }
                _ => {}
            }
            locks.push(e);
        }
        // Activations, in id order, after the merges (which may have cleared their way).
        let mut revoke: BTreeMap<LockId, ClientId> = BTreeMap::new();
        let mut kept = Vec::with_capacity(locks.len());
        for mut e in std::mem::take(&mut locks) {
            if e.state == LockState::Pending {
                let dropped = match self.activate(&mut e, seq, &table).map_err(fs)? {
                    Activation::Done => {
                        self.lock_records
                            .insert(e.id, super::lock_timeline::LockRecord::new(seq));
                        self.emit(LockEvent::Activated {
                            lock: e.id,
                            epoch: e.epoch,
                            holder: e.holder,
                            base: e.base,
                        });
                        false
                    }
                    Activation::Wait(others) => {
                        // Other clients' locks stand in the way: they are revoked (frozen
                        // now, merged after the grace) and this one waits, a while.
                        for o in others {
                            revoke.entry(o).or_insert(e.holder);
                        }
                        now.saturating_sub(e.requested_ns) > PENDING_MAX_NS
                    }
                    Activation::Refused => true,
                };
                if dropped {
                    // Dropped without ever being served; said all the same, so that a
                    // log server that heard of the request can forget it.
                    self.emit(LockEvent::Merged {
                        lock: e.id,
                        epoch: e.epoch,
                    });
                    continue;
                }
            }
            kept.push(e);
        }
        let mut banned = table.banned.clone();
        let mut recent = table.recent.clone();
        banned.retain(|b| b.1 > now);
        recent.retain(|r| r.2 > now);
        // The holder of a lock revoked by conflict may not lock its root again for a while
        // from the merge on (from the freeze, the window would end with the grace).
        for (root, holder) in revoked {
            note_recent(&mut recent, root, holder, now);
        }
        for e in &mut kept {
            // A lock activated by this very checkpoint is left its first interval: two
            // requests in one interval would otherwise revoke each other as they activate.
            if let (Some(&by), LockState::Active { activated_seq }) = (revoke.get(&e.id), e.state) {
                if activated_seq < seq {
                    e.state = LockState::Frozen {
                        since_ns: now,
                        cause: FreezeCause::Conflict(by),
                        end: None,
                    };
                    self.emit(LockEvent::Frozen {
                        lock: e.id,
                        epoch: e.epoch,
                        end: None,
                    });
                    note_recent(&mut recent, e.root.index, e.holder, now);
                }
            }
        }
        if kept != table.locks || banned != table.banned || recent != table.recent {
            let t = self.lock_table_mut().map_err(fs)?;
            t.locks = kept;
            t.banned = banned;
            t.recent = recent;
        }
        self.prune_lock_records();
        if blind_merge {
            self.check_consistency();
        }
        Ok(())
    }

    /// Merges frozen lock `e` into the ordered state with the content this replica has: its
    /// members are unmasked (the ordered tree then covers their real values), free pool
    /// slots rejoin the free list, and the lock's record goes. Returns whether the content
    /// was missing here (placeholders from a state transfer, without the content): the
    /// merge goes on all the same, and the checkpoint digest then differs from the correct
    /// replicas', which repair this one by ordinary state transfer of the merged objects.
    fn merge_lock(&mut self, e: &LockEntry, end: Option<LockPoint>) -> Result<bool, FsError> {
        let now = self.lock_state_digest_of(e.id);
        let end = end.filter(LockPoint::state_certified);
        if now.is_none() || end.is_some_and(|p| now != Some(p.state)) {
            self.merge_suspect = true;
        }
        match (now, end) {
            (None, _) => tracing::error!(
                lock = e.id.0,
                "file service: merging a lock whose content this replica lacks; its \
                 checkpoint digest will differ and state transfer must repair it"
            ),
            (Some(d), Some(p)) if d != p.state => tracing::warn!(
                lock = e.id.0,
                k = p.k,
                "file service: merging a lock whose log did not reach its certified end here; \
                 its checkpoint digest will differ and state transfer must repair it"
            ),
            _ => {}
        }
        self.with_batched_journal(|s| s.unmask_lock(e.id))?;
        self.drop_lock_record(e.id);
        self.emit(LockEvent::Merged {
            lock: e.id,
            epoch: e.epoch,
        });
        Ok(now.is_none())
    }

    /// Activates pending lock `e` if nothing stands in the way: walks its membership,
    /// reserves its pool, masks both and records the base digest.
    fn activate(
        &mut self,
        e: &mut LockEntry,
        seq: SeqNo,
        table: &LockTable,
    ) -> Result<Activation, FsError> {
        // The grant checks that depend on the state again: the root may have gone since.
        let root_ok = match self.slots.get(e.root.index as usize) {
            _ if self.masked.contains_key(&e.root.index) => true,
            Some(Slot::Live(o)) => {
                o.generation == e.root.generation
                    && match e.unit {
                        LockUnit::File => o.kind == FileType::Regular,
                        _ => o.kind == FileType::Directory,
                    }
            }
            _ => false,
        };
        if !root_ok {
            return Ok(Activation::Refused);
        }
        let walk = self.walk(e.unit, e.root.index);
        if walk.too_large {
            // Refused before it could revoke anything on the way.
            return Ok(Activation::Refused);
        }
        let holder_of = |l: LockId| table.entry(l).map(|x| x.holder);
        if !walk.overlaps.is_empty() {
            if walk
                .overlaps
                .iter()
                .any(|&l| holder_of(l) == Some(e.holder))
            {
                // Inside or around one of the holder's own locks.
                return Ok(Activation::Refused);
            }
            return Ok(Activation::Wait(walk.overlaps));
        }
        let pool_len = if e.unit == LockUnit::File {
            0
        } else {
            POOL_INITIAL
        };
        if walk.members.len() as u64 + pool_len as u64 > LOCK_OBJECTS_MAX {
            return Ok(Activation::Refused);
        }
        e.frozen_counts = walk.members.iter().fold((0, 0), |(n, b), &i| {
            let o = self.live(i);
            let blocks = if o.kind == FileType::Regular {
                o.size.div_ceil(super::object::BLOCK_SIZE)
            } else {
                0
            };
            (n + 1, b + blocks)
        });
        e.frozen_attr = Some(self.live(e.root.index).attr(e.root.index));
        let mut all = walk.members;
        let pool = self.with_batched_journal(|s| {
            let pool = s.reserve_pool(pool_len)?;
            for &(start, len) in &pool {
                all.extend(start..start + len as u64);
            }
            for &i in &all {
                // The ordered value before masking goes into the newest checkpoint record.
                s.touch(i)?;
            }
            Ok(pool)
        })?;
        for &i in &all {
            self.masked.insert(i, e.id);
        }
        e.members = all.len() as u32;
        e.pool = pool;
        e.state = LockState::Active { activated_seq: seq };
        let all: Vec<u64> = all.into_iter().collect();
        e.base = self
            .lock_digest(e.id, e.epoch, &all)
            .map_err(|e| super::backend::fs_error(&e))?;
        Ok(Activation::Done)
    }

    /// The membership walk at activation (docs/zzyzx-plan.md §2.1): for a subtree, every
    /// directory below the root and every other object all of whose names are in those
    /// directories. It stops at objects masked by other locks and reports them.
    fn walk(&self, unit: LockUnit, root: u64) -> Walk {
        let mut w = Walk {
            members: BTreeSet::new(),
            overlaps: BTreeSet::new(),
            too_large: false,
        };
        if let Some(&l) = self.masked.get(&root) {
            w.overlaps.insert(l);
            return w;
        }
        w.members.insert(root);
        if unit != LockUnit::Subtree {
            return w;
        }
        let live = |i: u64| self.slots.get(i as usize).and_then(Slot::live);
        let mut dirs = vec![root];
        let mut others = BTreeSet::new();
        while let Some(d) = dirs.pop() {
            let Some(dir) = live(d) else { continue };
            for &j in dir.entries.values() {
                if let Some(&l) = self.masked.get(&j) {
                    w.overlaps.insert(l);
                    continue;
                }
                // Entries name live objects in a consistent table; anything else is no member.
                match live(j) {
                    // Inserted once: a cycle cannot occur in a consistent table, and is
                    // never walked twice if it did.
                    Some(o) if o.kind == FileType::Directory && w.members.insert(j) => {
                        dirs.push(j);
                    }
                    Some(o) if o.kind != FileType::Directory => {
                        others.insert(j);
                    }
                    _ => {}
                }
            }
            if (w.members.len() + others.len()) as u64 > LOCK_OBJECTS_MAX {
                // The walk stops here: the lock would be refused anyway.
                w.too_large = true;
                return w;
            }
        }
        for j in others {
            if live(j).is_some_and(|o| o.links.iter().all(|(d, _)| w.members.contains(d))) {
                w.members.insert(j);
            }
        }
        w
    }

    /// Takes `n` slots out of the ordered free list for a lock's pool: the lowest free runs,
    /// at most [`POOL_RANGES_MAX`]` - 1` of them, then new slots at the end of the array.
    fn reserve_pool(&mut self, n: u32) -> Result<Vec<(u64, u32)>, FsError> {
        let mut ranges: Vec<(u64, u32)> = Vec::new();
        let mut left = n;
        let mut it = self.free.iter().copied().peekable();
        while left > 0 && ranges.len() < POOL_RANGES_MAX - 1 {
            let Some(start) = it.next() else { break };
            let mut len = 1u32;
            while len < left && it.peek() == Some(&(start + len as u64)) {
                it.next();
                len += 1;
            }
            ranges.push((start, len));
            left -= len;
        }
        let taken: BTreeSet<u64> = ranges.iter().flat_map(|&(s, l)| s..s + l as u64).collect();
        // Free slots whose successor in the free list changes are ordered changes too: the
        // one before each taken run (every slot inside a run has the run's predecessor, so
        // asking per slot would walk the run again for each, quadratic in the pool).
        for &(start, _) in &ranges {
            if let Some(&pred) = self.free.range(..start).rev().find(|p| !taken.contains(p)) {
                self.touch(pred)?;
            }
        }
        for &i in &taken {
            self.touch(i)?;
            self.free.remove(&i);
        }
        if left > 0 {
            self.mark_unsaved()?;
            let start = self.slots.len() as u64;
            for _ in 0..left {
                self.dirty.insert(self.slots.len() as u64);
                self.slots.push(Slot::Free { generation: 0 });
            }
            ranges.push((start, left));
        }
        Ok(ranges)
    }

    /// Gives lock `lock`'s objects back to the ordered state; pool slots still free rejoin
    /// the free list.
    fn unmask_lock(&mut self, lock: LockId) -> Result<(), FsError> {
        let members: Vec<u64> = self
            .masked
            .iter()
            .filter(|(_, l)| **l == lock)
            .map(|(i, _)| *i)
            .collect();
        for &i in &members {
            // The placeholder goes into the newest checkpoint record.
            self.touch(i)?;
        }
        for &i in &members {
            self.masked.remove(&i);
        }
        let freed: Vec<u64> = members
            .into_iter()
            .filter(|&i| self.slots[i as usize].live().is_none())
            .collect();
        for &i in &freed {
            self.free.insert(i);
        }
        // Free slots before a returned one now point at it.
        for &i in &freed {
            if let Some(&pred) = self.free.range(..i).next_back() {
                self.touch(pred)?;
            }
        }
        Ok(())
    }

    /// D_L: the real object digests of `members` (a lock's, in index order, pool slots
    /// included as they are), under the lock's id and epoch. At activation it is the lock's
    /// `base`; later it changes with every locked entry that changes a member, so two
    /// replicas agree on it iff their logs brought the members to the same content.
    pub(super) fn lock_digest(
        &self,
        lock: LockId,
        epoch: u32,
        members: &[u64],
    ) -> std::io::Result<Digest> {
        let mut h = Hasher::new("bftfs.lockstate");
        h.u64(lock.0).u64(epoch as u64).u64(members.len() as u64);
        for &i in members {
            h.u64(i).digest(&self.real_digest_now(i)?);
        }
        Ok(h.finish())
    }

    /// Rebuilds nothing: checks that `masked` agrees with the lock table (every masked slot
    /// names an active or frozen lock, whose member count it matches). For tests and after
    /// loads; a mismatch is a bug.
    pub fn check_lock_invariants(&self) {
        let table = self.locks();
        let mut counts: BTreeMap<LockId, u32> = BTreeMap::new();
        for l in self.masked.values() {
            *counts.entry(*l).or_default() += 1;
        }
        for e in &table.locks {
            let n = counts.remove(&e.id).unwrap_or(0);
            match e.state {
                LockState::Pending => assert_eq!(n, 0, "pending lock {:?} masks objects", e.id),
                _ => assert_eq!(n, e.members, "lock {:?} masks the wrong count", e.id),
            }
        }
        assert!(
            counts.is_empty(),
            "objects masked by unknown locks: {counts:?}"
        );
        for i in self.masked.keys() {
            assert!(!self.free.contains(i), "masked slot {i} in the free list");
        }
    }
}

/// Records that `holder`'s lock on `root` was revoked by conflict at `now_ns`: the same
/// holder may not lock that root again for [`RECENT_NS`], which bounds thrashing whatever the
/// client's policy.
fn note_recent(recent: &mut Vec<(u64, ClientId, u64)>, root: u64, holder: ClientId, now_ns: u64) {
    let until = now_ns.saturating_add(RECENT_NS);
    let key = (root, holder);
    if let Ok(k) = recent.binary_search_by_key(&key, |r| (r.0, r.1)) {
        recent[k].2 = until;
        return;
    }
    if recent.len() >= RECENT_MAX {
        // Full: the row that ends first goes (ties: the lowest key).
        if let Some(k) = (0..recent.len()).min_by_key(|&k| recent[k].2) {
            recent.remove(k);
        }
    }
    let k = recent
        .binary_search_by_key(&key, |r| (r.0, r.1))
        .unwrap_or_else(|k| k);
    recent.insert(k, (root, holder, until));
}

enum Activation {
    Done,
    /// These other locks overlap.
    Wait(BTreeSet<LockId>),
    Refused,
}

/// Whether a frozen lock merges at a checkpoint with agreed time `now`: at once when a
/// certificate fixed its end (2f+1 replicas sealed it, so they hold the entries);
/// [`RESOLVED_SETTLE_NS`] after a `Resolve` fixed it (`since_ns` is then that time), so that
/// replicas whose logs are short of it or on another chain fetch the chosen entries first;
/// when nobody fixed it, after [`UNRESOLVED_MERGE_NS`].
pub fn merge_due(since_ns: u64, end: Option<LockPoint>, now: u64) -> bool {
    match end {
        Some(p) if p.state_certified() => true,
        Some(_) => now >= since_ns.saturating_add(RESOLVED_SETTLE_NS),
        None => now >= since_ns.saturating_add(UNRESOLVED_MERGE_NS),
    }
}
