//! POSIX byte-range locks (`fcntl` F_SETLK/F_SETLKW/F_GETLK, OFD locks) and `flock`, shared
//! by every client of the cluster (issue #16, item 6).
//!
//! In: the ordered operations [`FsOp::SetRangeLock`], [`FsOp::TestRangeLock`],
//! [`FsOp::DropRangeLocks`] and [`FsOp::RenewRangeLocks`], each with its authenticated client
//! and the agreed time. Out: [`FsReply::RangeLock`] (granted, or the lock in the way) and
//! [`FsReply::RangeLeases`]; the table itself is replicated state in the root's header
//! ([`super::object::ObjectHeader::LiveRootRanges`]), so digests, checkpoints, rollback and
//! state transfer carry it like the agreed time.
//!
//! - **Owners.** A lock belongs to `(client, owner)`: the client is the one the replica
//!   authenticated (never a value from the request), `owner` is the FUSE `lock_owner` the
//!   kernel gave the mount (a process's file table for POSIX locks, an open file for OFD
//!   locks and for `flock`, which the kernel sends as a whole-file lock). So a client can only
//!   ever change or drop its own locks, and two processes of one mount are two owners.
//! - **Semantics** are POSIX's for one owner: a new lock replaces the owner's locks under its
//!   range (splitting them), an unlock cuts a hole, and adjacent or overlapping ranges of one
//!   kind merge. Locks of different owners conflict when they overlap and one is a write lock.
//!   The table keeps one canonical form (sorted, merged), so equal lock states encode alike.
//! - **Leases.** Each client with locks has one lease, extended by every lock it is granted
//!   and by [`FsOp::RenewRangeLocks`] (the mount sends one per renewal interval covering all
//!   of its locks). A lease that has run out by the agreed time of an operation is gone, and
//!   with it every lock of that client: this is how a client that died gives its locks back.
//!   Expiry is only ever judged by the agreed time of an ordered operation, so every replica
//!   drops exactly the same locks at the same point of the order.
//! - **Bounds.** [`RANGE_LOCKS_PER_CLIENT_MAX`] per client and [`RANGE_LOCKS_MAX`] in all
//!   (refused with [`FsError::NoLocks`], ENOLCK); ranges end at [`OFFSET_MAX`] at most; a
//!   lease lasts between [`LEASE_MIN_MS`] and [`LEASE_MAX_MS`].
//!
//! Range locks and Zzyzx locks are independent: a range-lock operation reads no object (a
//! handle inside an active Zzyzx lock is taken as it is, since its generation is the lock's
//! business), so it never revokes a Zzyzx lock and never runs as an entry of a lock's log.

use super::ops::{FsError, FsOp, FsReply, FsResult, Handle};
use super::FileService;
use crate::service::ClientId;
use serde::{Deserialize, Serialize};

/// Most range locks one client holds (each range of each owner counts once).
pub const RANGE_LOCKS_PER_CLIENT_MAX: usize = 256;
/// Most range locks in the table: bounds the root's header, which every ordered request
/// re-encodes.
pub const RANGE_LOCKS_MAX: usize = 16_384;
/// Most owners one [`FsOp::DropRangeLocks`] names.
pub const DROP_OWNERS_MAX: usize = 1024;
/// The last byte a range may cover: the kernel's `OFFSET_MAX`, which "to the end of the file"
/// becomes.
pub const OFFSET_MAX: u64 = i64::MAX as u64;
/// Shortest and longest lease a client may ask for.
pub const LEASE_MIN_MS: u32 = 1_000;
pub const LEASE_MAX_MS: u32 = 10 * 60 * 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RangeLockKind {
    /// F_RDLCK, or a shared `flock`.
    Read,
    /// F_WRLCK, or an exclusive `flock`.
    Write,
}

/// One lock: bytes `start..=end` of `file`, held by `(client, owner)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLock {
    pub file: Handle,
    pub client: u64,
    pub owner: u64,
    pub start: u64,
    /// Inclusive, as the kernel gives it.
    pub end: u64,
    pub kind: RangeLockKind,
    /// The process that took it, as its mount saw it (for F_GETLK on that mount only).
    pub pid: u32,
}

impl RangeLock {
    fn key(&self) -> (Handle, u64, u64, u64) {
        (self.file, self.client, self.owner, self.start)
    }

    fn same_owner(&self, file: Handle, client: u64, owner: u64) -> bool {
        self.file == file && self.client == client && self.owner == owner
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// A client's lease: its locks live until `expires_ns` of agreed time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLease {
    pub client: u64,
    pub expires_ns: u64,
}

/// The replicated table. Canonical: `locks` sorted by (file, client, owner, start), one
/// owner's ranges on a file disjoint and never adjacent with the same kind; `leases` sorted
/// by client, exactly one for each client that holds a lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLockTable {
    pub leases: Vec<RangeLease>,
    pub locks: Vec<RangeLock>,
}

/// What a conflicting lock looks like to the asking client (F_GETLK's answer, and why an
/// F_SETLK was refused).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLockInfo {
    pub start: u64,
    pub end: u64,
    pub kind: RangeLockKind,
    /// The holder's pid if the asking client holds it too, else 0: a pid from another
    /// machine names nothing here.
    pub pid: u32,
}

/// Why a change of the table is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeRefusal {
    /// Another owner holds a conflicting lock (the first one in table order).
    Conflict(RangeLock),
    /// Granting it would pass a bound (ENOLCK).
    TooMany,
    /// A malformed range (EINVAL).
    Invalid,
}

/// Checks a range a client sent.
fn check_range(start: u64, end: u64) -> Result<(), RangeRefusal> {
    if start > end || end > OFFSET_MAX {
        Err(RangeRefusal::Invalid)
    } else {
        Ok(())
    }
}

/// The lease asked for, in ns, within the bounds.
pub fn lease_ns(lease_ms: u32) -> u64 {
    u64::from(lease_ms.clamp(LEASE_MIN_MS, LEASE_MAX_MS)) * 1_000_000
}

impl RangeLockTable {
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty() && self.leases.is_empty()
    }

    /// Locks `client` holds.
    pub fn held_by(&self, client: u64) -> usize {
        self.locks.iter().filter(|l| l.client == client).count()
    }

    fn lease_of(&self, client: u64) -> Option<&RangeLease> {
        self.leases
            .binary_search_by_key(&client, |l| l.client)
            .ok()
            .map(|k| &self.leases[k])
    }

    /// Drops every lock of every client whose lease ran out by `now_ns`. Whether it changed
    /// anything.
    pub fn expire(&mut self, now_ns: u64) -> bool {
        let before = self.leases.len();
        self.leases.retain(|l| l.expires_ns > now_ns);
        if self.leases.len() == before {
            return false;
        }
        let leases = &self.leases;
        self.locks
            .retain(|l| leases.binary_search_by_key(&l.client, |x| x.client).is_ok());
        true
    }

    /// The first lock of another owner that conflicts with `kind` over `start..=end`.
    pub fn conflict(
        &self,
        file: Handle,
        client: u64,
        owner: u64,
        start: u64,
        end: u64,
        kind: RangeLockKind,
    ) -> Option<&RangeLock> {
        self.on_file(file).iter().find(|l| {
            !(l.client == client && l.owner == owner)
                && l.overlaps(start, end)
                && (kind == RangeLockKind::Write || l.kind == RangeLockKind::Write)
        })
    }

    /// The locks on `file`, a contiguous run of the sorted table.
    fn on_file(&self, file: Handle) -> &[RangeLock] {
        let first = self.locks.partition_point(|l| l.file < file);
        let last = self.locks.partition_point(|l| l.file <= file);
        &self.locks[first..last]
    }

    /// Where `(file, client, owner)`'s locks are in the table.
    fn owner_span(&self, file: Handle, client: u64, owner: u64) -> std::ops::Range<usize> {
        let key = (file, client, owner);
        let first = self
            .locks
            .partition_point(|l| (l.file, l.client, l.owner) < key);
        let last = self
            .locks
            .partition_point(|l| (l.file, l.client, l.owner) <= key);
        first..last
    }

    /// Sets (`kind` Some) or removes (None) `(client, owner)`'s lock over `start..=end` of
    /// `file` at agreed time `now_ns`, as F_SETLK does; a granted lock extends the client's
    /// lease to at least `now_ns + lease_ns`. Nothing changes when refused. Expired leases
    /// are not dropped here (see [`Self::expire`]).
    #[allow(clippy::too_many_arguments)]
    pub fn set(
        &mut self,
        file: Handle,
        client: u64,
        owner: u64,
        start: u64,
        end: u64,
        kind: Option<RangeLockKind>,
        pid: u32,
        now_ns: u64,
        lease_ns: u64,
    ) -> Result<(), RangeRefusal> {
        check_range(start, end)?;
        if let Some(k) = kind {
            if let Some(c) = self.conflict(file, client, owner, start, end, k) {
                return Err(RangeRefusal::Conflict(c.clone()));
            }
        }
        let span = self.owner_span(file, client, owner);
        let mut mine: Vec<RangeLock> = Vec::with_capacity(span.len() + 2);
        for l in &self.locks[span.clone()] {
            if !l.overlaps(start, end) {
                mine.push(l.clone());
                continue;
            }
            // The parts outside the new range stay; `start > 0` and `end < OFFSET_MAX` there,
            // so neither bound wraps.
            if l.start < start {
                mine.push(RangeLock {
                    end: start - 1,
                    ..l.clone()
                });
            }
            if l.end > end {
                mine.push(RangeLock {
                    start: end + 1,
                    ..l.clone()
                });
            }
        }
        if let Some(kind) = kind {
            mine.push(RangeLock {
                file,
                client,
                owner,
                start,
                end,
                kind,
                pid,
            });
        }
        mine.sort_by_key(RangeLock::key);
        let mine = merge_adjacent(mine);
        let held = self.held_by(client) - span.len() + mine.len();
        let total = self.locks.len() - span.len() + mine.len();
        if mine.len() > span.len() && (held > RANGE_LOCKS_PER_CLIENT_MAX || total > RANGE_LOCKS_MAX)
        {
            return Err(RangeRefusal::TooMany);
        }
        self.locks.splice(span, mine);
        if kind.is_some() {
            self.extend_lease(client, now_ns.saturating_add(lease_ns));
        }
        self.drop_idle_lease(client);
        Ok(())
    }

    /// Removes every lock of `client` on `file` whose owner is one of `owners` (close(2) of
    /// a POSIX owner's descriptor, the last close of an open file). Whether any went.
    pub fn drop_owners(&mut self, file: Handle, client: u64, owners: &[u64]) -> bool {
        let before = self.locks.len();
        self.locks
            .retain(|l| !(l.file == file && l.client == client && owners.contains(&l.owner)));
        self.drop_idle_lease(client);
        self.locks.len() != before
    }

    /// Extends `client`'s lease (if it holds any lock) to at least `now_ns + lease_ns`;
    /// answers how many locks it holds.
    pub fn renew(&mut self, client: u64, now_ns: u64, lease_ns: u64) -> usize {
        let held = self.held_by(client);
        if held > 0 {
            self.extend_lease(client, now_ns.saturating_add(lease_ns));
        }
        held
    }

    fn extend_lease(&mut self, client: u64, until_ns: u64) {
        match self.leases.binary_search_by_key(&client, |l| l.client) {
            Ok(k) => {
                let l = &mut self.leases[k];
                l.expires_ns = l.expires_ns.max(until_ns);
            }
            Err(k) => self.leases.insert(
                k,
                RangeLease {
                    client,
                    expires_ns: until_ns,
                },
            ),
        }
    }

    /// A client without locks has no lease (one canonical form for "no locks").
    fn drop_idle_lease(&mut self, client: u64) {
        if self.held_by(client) == 0 {
            self.leases.retain(|l| l.client != client);
        }
    }

    /// Checks a table received from elsewhere (state transfer, a saved table) for the
    /// canonical form, so that a bad one is refused rather than trusted.
    pub fn check(&self) -> Result<(), String> {
        if self.locks.len() > RANGE_LOCKS_MAX {
            return Err("too many range locks".into());
        }
        if self.leases.windows(2).any(|w| w[0].client >= w[1].client) {
            return Err("range-lock leases not in strict client order".into());
        }
        for l in &self.locks {
            if l.start > l.end || l.end > OFFSET_MAX {
                return Err("a malformed range lock".into());
            }
            if self.lease_of(l.client).is_none() {
                return Err("a range lock without a lease".into());
            }
        }
        for w in self.locks.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if a.key() >= b.key() {
                return Err("range locks not in strict order".into());
            }
            if b.same_owner(a.file, a.client, a.owner)
                && (a.end >= b.start || (a.end + 1 == b.start && a.kind == b.kind))
            {
                return Err("range locks of one owner overlap or are not merged".into());
            }
        }
        for lease in &self.leases {
            let held = self.held_by(lease.client);
            if held == 0 {
                return Err("a range-lock lease without locks".into());
            }
            if held > RANGE_LOCKS_PER_CLIENT_MAX {
                return Err("too many range locks for one client".into());
            }
        }
        Ok(())
    }
}

/// One owner's ranges on one file, sorted and disjoint: merges neighbours of one kind.
fn merge_adjacent(sorted: Vec<RangeLock>) -> Vec<RangeLock> {
    let mut out: Vec<RangeLock> = Vec::with_capacity(sorted.len());
    for l in sorted {
        match out.last_mut() {
            Some(prev) if prev.kind == l.kind && prev.end.saturating_add(1) >= l.start => {
                prev.end = prev.end.max(l.end);
            }
            _ => out.push(l),
        }
    }
    out
}

impl FileService {
    /// The range-lock table as the ordered state holds it.
    pub fn range_locks(&self) -> RangeLockTable {
        self.slots
            .first()
            .and_then(super::object::Slot::live)
            .map(|root| root.range_locks.clone())
            .unwrap_or_default()
    }

    /// Runs a range-lock operation (ordered only: leases are judged by the agreed time).
    pub(super) fn exec_range_lock(&mut self, op: &FsOp) -> FsResult {
        let (client, now_ns) = match self.scope {
            super::locks::Scope::Ordered { client, now_ns } => (client, now_ns),
            _ => return Err(FsError::BadRequest),
        };
        let ClientId(client) = client;
        let mut table = self.range_locks();
        let mut changed = table.expire(now_ns);
        let result = match op {
            FsOp::SetRangeLock {
                h,
                owner,
                start,
                end,
                kind,
                pid,
                lease_ms,
            } => {
                self.range_lock_target(*h)?;
                match table.set(
                    *h,
                    client,
                    *owner,
                    *start,
                    *end,
                    *kind,
                    *pid,
                    now_ns,
                    lease_ns(*lease_ms),
                ) {
                    Ok(()) => {
                        changed = true;
                        Ok(FsReply::RangeLock { conflict: None })
                    }
                    Err(RangeRefusal::Conflict(l)) => Ok(FsReply::RangeLock {
                        conflict: Some(info_for(&l, client)),
                    }),
                    Err(RangeRefusal::TooMany) => Err(FsError::NoLocks),
                    Err(RangeRefusal::Invalid) => Err(FsError::Inval),
                }
            }
            FsOp::TestRangeLock {
                h,
                owner,
                start,
                end,
                kind,
            } => {
                self.range_lock_target(*h)?;
                check_range(*start, *end).map_err(|_| FsError::Inval)?;
                let conflict = table
                    .conflict(*h, client, *owner, *start, *end, *kind)
                    .map(|l| info_for(l, client));
                Ok(FsReply::RangeLock { conflict })
            }
            FsOp::DropRangeLocks { h, owners } => {
                if owners.len() > DROP_OWNERS_MAX {
                    return Err(FsError::Inval);
                }
                // No check of the handle: an owner may always drop its locks, even on a
                // file removed since.
                changed |= table.drop_owners(*h, client, owners);
                Ok(FsReply::Done)
            }
            FsOp::RenewRangeLocks { lease_ms } => {
                let before = table.lease_of(client).cloned();
                let held = table.renew(client, now_ns, lease_ns(*lease_ms));
                changed |= table.lease_of(client) != before.as_ref();
                Ok(FsReply::RangeLeases { held: held as u32 })
            }
            _ => Err(FsError::BadRequest),
        };
        if changed {
            // The root is touched by every ordered request already (the agreed time); this
            // keeps the order of checkpoint saves the same as any other change of it.
            self.touch(0)?;
            self.live_mut(0).range_locks = table;
        }
        result
    }

    /// The object a lock is asked on: a live object of that generation, or any handle inside
    /// an active Zzyzx lock (whose generation the ordered state must not read, and which a
    /// range lock must not revoke). Stale handles are refused as any operation refuses them.
    fn range_lock_target(&self, h: Handle) -> Result<(), FsError> {
        if self.masked_by(h.index).is_some() {
            return Ok(());
        }
        self.obj(h).map(|_| ())
    }
}

fn info_for(l: &RangeLock, asking: u64) -> RangeLockInfo {
    RangeLockInfo {
        start: l.start,
        end: l.end,
        kind: l.kind,
        pid: if l.client == asking { l.pid } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Handle = Handle {
        index: 3,
        generation: 1,
    };
    const SEC: u64 = 1_000_000_000;

    fn set(
        t: &mut RangeLockTable,
        client: u64,
        owner: u64,
        start: u64,
        end: u64,
        kind: Option<RangeLockKind>,
    ) -> Result<(), RangeRefusal> {
        t.set(F, client, owner, start, end, kind, 7, 0, 30 * SEC)
    }

    fn ranges(t: &RangeLockTable) -> Vec<(u64, u64, u64, RangeLockKind)> {
        t.locks
            .iter()
            .map(|l| (l.owner, l.start, l.end, l.kind))
            .collect()
    }

    use RangeLockKind::{Read, Write};

    #[test]
    fn one_owner_splits_and_merges() {
        let mut t = RangeLockTable::default();
        set(&mut t, 1, 1, 0, 99, Some(Read)).expect("granted");
        set(&mut t, 1, 1, 40, 59, Some(Write)).expect("granted");
        assert_eq!(
            ranges(&t),
            vec![(1, 0, 39, Read), (1, 40, 59, Write), (1, 60, 99, Read)]
        );
        set(&mut t, 1, 1, 40, 59, Some(Read)).expect("granted");
        assert_eq!(ranges(&t), vec![(1, 0, 99, Read)]);
        set(&mut t, 1, 1, 10, 19, None).expect("granted");
        assert_eq!(ranges(&t), vec![(1, 0, 9, Read), (1, 20, 99, Read)]);
        set(&mut t, 1, 1, 0, OFFSET_MAX, None).expect("granted");
        assert!(t.is_empty(), "no locks, no lease: {t:?}");
        t.check().expect("canonical");
    }

    #[test]
    fn owners_conflict_on_overlap_with_a_write() {
        let mut t = RangeLockTable::default();
        set(&mut t, 1, 1, 0, 9, Some(Read)).expect("granted");
        set(&mut t, 2, 1, 5, 14, Some(Read)).expect("granted");
        set(&mut t, 1, 2, 10, 19, Some(Write)).expect_err("overlaps client 2's read lock");
        set(&mut t, 1, 2, 15, 19, Some(Write)).expect("granted");
        assert!(matches!(
            set(&mut t, 2, 1, 0, 0, Some(Write)),
            Err(RangeRefusal::Conflict(RangeLock { client: 1, .. }))
        ));
        assert_eq!(t.conflict(F, 2, 1, 0, 4, Read), None);
        let c = t.conflict(F, 2, 9, 16, 16, Read).expect("granted");
        assert_eq!((c.client, c.owner, c.start, c.end), (1, 2, 15, 19));
    }

    #[test]
    fn leases_expire_with_agreed_time_and_bounds_hold() {
        let mut t = RangeLockTable::default();
        t.set(F, 1, 1, 0, 0, Some(Write), 0, 0, 10 * SEC)
            .expect("granted");
        t.set(F, 2, 1, 5, 5, Some(Write), 0, 0, 20 * SEC)
            .expect("granted");
        assert!(!t.expire(10 * SEC - 1));
        assert_eq!(t.renew(1, 5 * SEC, 10 * SEC), 1);
        assert!(!t.expire(14 * SEC));
        assert!(t.expire(15 * SEC));
        assert_eq!(t.held_by(1), 0);
        assert_eq!(t.held_by(2), 1);
        for k in 0..RANGE_LOCKS_PER_CLIENT_MAX as u64 - 1 {
            t.set(F, 2, 1, 10 + 2 * k, 10 + 2 * k, Some(Read), 0, 0, SEC)
                .expect("granted");
        }
        assert_eq!(
            t.set(F, 2, 1, 100_000, 100_000, Some(Read), 0, 0, SEC),
            Err(RangeRefusal::TooMany)
        );
        // An unlock that splits nothing is never refused for the bound.
        t.set(F, 2, 1, 10, 10, None, 0, 0, SEC).expect("granted");
        assert_eq!(
            t.set(F, 2, 1, 3, 1, Some(Read), 0, 0, SEC),
            Err(RangeRefusal::Invalid)
        );
        assert_eq!(
            t.set(F, 2, 1, 0, u64::MAX, Some(Read), 0, 0, SEC),
            Err(RangeRefusal::Invalid)
        );
        t.check().expect("canonical");
    }

    #[test]
    fn check_refuses_non_canonical_tables() {
        let mut t = RangeLockTable::default();
        set(&mut t, 1, 1, 0, 9, Some(Read)).expect("granted");
        set(&mut t, 1, 1, 20, 29, Some(Read)).expect("granted");
        t.check().expect("canonical");
        let mut adjacent = t.clone();
        adjacent.locks[1].start = 10;
        assert!(adjacent.check().is_err());
        let mut unordered = t.clone();
        unordered.locks.swap(0, 1);
        assert!(unordered.check().is_err());
        let mut no_lease = t.clone();
        no_lease.leases.clear();
        assert!(no_lease.check().is_err());
        let mut idle = t.clone();
        idle.leases.push(RangeLease {
            client: 9,
            expires_ns: 1,
        });
        assert!(idle.check().is_err());
    }
}
