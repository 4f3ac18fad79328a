//! The mount's side of fcntl and flock locks shared by every client of the cluster (the
//! service's side is `state_abstraction::fs::range_locks`).
//!
//! In: the kernel's GETLK/SETLK/SETLKW (flock arrives as a whole-file SETLK whose owner is the
//! open file), and the closes that end locks: FLUSH names the POSIX owner (the closing
//! process's file table) and RELEASE ends an open file. Out: ordered range-lock operations,
//! and the answers the kernel wants (granted, EAGAIN, the conflicting lock, EINTR).
//!
//! - **Which owners to drop at a close.** fuser does not say whether a lock is POSIX, OFD or
//!   flock. The mount remembers, per open file (fh), the owners that set locks through it.
//!   FLUSH(owner) drops that owner's locks on the file (POSIX: any close drops them all) and
//!   forgets it on every fh of the file; RELEASE(fh) drops the owners still remembered on that
//!   fh, which are then the open file's own (OFD and flock locks: their owner is the open file,
//!   which never appears as a FLUSH owner), plus the flock owner the kernel names. A POSIX
//!   owner that set a lock through an fh always closes that descriptor (FLUSH) before the fh
//!   is released, so a late RELEASE never drops a lock the same process took again.
//! - **Waiting (F_SETLKW, flock without LOCK_NB)** is the mount retrying, doubling its pause
//!   from 20 ms to 500 ms, and at once when this mount unlocks something; on a thread of its
//!   own (at most [`WAITERS_MAX`]), so the FUSE threads keep serving. fuser answers the
//!   kernel's INTERRUPT with ENOSYS, so the mount watches the waiting thread itself: a
//!   signal pending for it (not blocked, not ignored, SIGKILL included) or its exit ends the
//!   wait with EINTR. A refused attempt changes nothing on the replicas, so an interrupted
//!   wait leaves no lock behind.
//! - **Leases.** Every granted lock extends this client's lease; a thread renews it every
//!   third of the lease while the mount may hold locks, and warns if the replicas say its
//!   locks are gone (it was cut off longer than the lease).

use crate::adapter::Failure;
use crate::transport::{FsTransport, TransportError};
use state_abstraction::fs::range_locks::{RangeLockInfo, RangeLockKind};
use state_abstraction::fs::{Caller, FsOp, FsReply, FsRequest, Handle};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Most F_SETLKW waits with a thread of their own; more wait in the FUSE thread that got them.
pub const WAITERS_MAX: usize = 64;
const RETRY_FIRST: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// What the mount knows of its own locks (never authoritative: the replicas are).
#[derive(Default)]
struct Book {
    /// Owners that may hold locks on each node id.
    owners: BTreeMap<u64, BTreeSet<u64>>,
    /// Per open file: its node id and the owners that set locks through it.
    via: HashMap<u64, (u64, BTreeSet<u64>)>,
    /// Counts this mount's unlocks, so its waiters retry at once.
    unlocks: u64,
    stopping: bool,
}

/// One lock request from the kernel.
#[derive(Clone, Debug)]
pub struct LockRequest {
    pub caller: Caller,
    pub nodeid: u64,
    pub h: Handle,
    pub fh: u64,
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    /// None: unlock.
    pub kind: Option<RangeLockKind>,
    /// The requesting process, as F_GETLK on this mount reports it.
    pub pid: u32,
    /// The requesting thread (the FUSE request's pid), whose signals end a wait.
    pub tid: u32,
}

/// How a wait ended without the lock.
#[derive(Debug)]
pub enum WaitEnd {
    Interrupted,
    Failed(Failure),
}

pub struct RangeLockClient {
    transport: Arc<dyn FsTransport>,
    lease: Duration,
    book: Mutex<Book>,
    changed: Condvar,
    waiters: AtomicUsize,
}

/// The kernel's lock type as a kind: F_UNLCK is `Ok(None)`.
pub fn kind_of(typ: i32) -> Result<Option<RangeLockKind>, Failure> {
    match typ {
        libc::F_RDLCK => Ok(Some(RangeLockKind::Read)),
        libc::F_WRLCK => Ok(Some(RangeLockKind::Write)),
        libc::F_UNLCK => Ok(None),
        _ => Err(Failure::Invalid("lock type")),
    }
}

pub fn typ_of(kind: RangeLockKind) -> i32 {
    match kind {
        RangeLockKind::Read => libc::F_RDLCK,
        RangeLockKind::Write => libc::F_WRLCK,
    }
}

impl RangeLockClient {
    /// Starts the renewal thread, which ends at [`Self::stop`].
    pub fn start(transport: Arc<dyn FsTransport>, lease: Duration) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(RangeLockClient {
            transport,
            lease,
            book: Mutex::new(Book::default()),
            changed: Condvar::new(),
            waiters: AtomicUsize::new(0),
        });
        let renewer = me.clone();
        std::thread::Builder::new()
            .name("bftfs-lock-lease".into())
            .spawn(move || renewer.renew_loop())?;
        Ok(me)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_ms(&self) -> u32 {
        u32::try_from(self.lease.as_millis()).unwrap_or(u32::MAX)
    }

    fn call(&self, caller: Caller, op: FsOp) -> Result<FsReply, Failure> {
        match self.transport.call(FsRequest { caller, op }) {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(Failure::Service(e)),
            Err(e) => Err(Failure::Transport(e)),
        }
    }

    /// F_GETLK: the lock of another owner in the way, if any.
    pub fn test(
        &self,
        r: &LockRequest,
        kind: RangeLockKind,
    ) -> Result<Option<RangeLockInfo>, Failure> {
        let op = FsOp::TestRangeLock {
            h: r.h,
            owner: r.owner,
            start: r.start,
            end: r.end,
            kind,
        };
        match self.call(r.caller.clone(), op)? {
            FsReply::RangeLock { conflict } => Ok(conflict),
            _ => Err(Failure::UnexpectedReply("getlk")),
        }
    }

    /// One attempt at F_SETLK: whether it was granted (an unlock always is).
    pub fn try_set(&self, r: &LockRequest) -> Result<bool, Failure> {
        if r.kind.is_some() {
            // Remembered before the attempt: one that times out may still have been granted,
            // and the close must then drop it.
            let mut book = self.book();
            book.owners.entry(r.nodeid).or_default().insert(r.owner);
            book.via
                .entry(r.fh)
                .or_insert_with(|| (r.nodeid, BTreeSet::new()))
                .1
                .insert(r.owner);
        }
        let op = FsOp::SetRangeLock {
            h: r.h,
            owner: r.owner,
            start: r.start,
            end: r.end,
            kind: r.kind,
            pid: r.pid,
            lease_ms: self.lease_ms(),
        };
        let granted = match self.call(r.caller.clone(), op)? {
            FsReply::RangeLock { conflict } => conflict.is_none(),
            _ => return Err(Failure::UnexpectedReply("setlk")),
        };
        if r.kind.is_none() {
            self.unlocked();
        }
        Ok(granted)
    }

    /// Whether another waiter may have a thread of its own; if so it is counted until
    /// [`Self::waiter_done`].
    pub fn waiter_slot(&self) -> bool {
        let n = self.waiters.fetch_add(1, Ordering::SeqCst);
        if n >= WAITERS_MAX {
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub fn waiter_done(&self) {
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// F_SETLKW after a refused attempt: retries until granted, the requesting thread has a
    /// signal to take (or is gone), or the mount stops.
    pub fn wait(&self, r: &LockRequest) -> Result<(), WaitEnd> {
        let mut pause = RETRY_FIRST;
        loop {
            let seen = {
                let book = self.book();
                if book.stopping {
                    return Err(WaitEnd::Failed(Failure::Transport(
                        TransportError::Unreachable("the mount is stopping".into()),
                    )));
                }
                book.unlocks
            };
            if signal_pending(r.tid) {
                debug!(tid = r.tid, "lock wait interrupted");
                return Err(WaitEnd::Interrupted);
            }
            match self.try_set(r) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(f) => return Err(WaitEnd::Failed(f)),
            }
            // Sleeps the pause, or less if this mount unlocks something meanwhile; the
            // signal check above runs at least every RETRY_MAX.
            let book = self.book();
            if book.unlocks == seen && !book.stopping {
                drop(
                    self.changed
                        .wait_timeout(book, pause)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    fn unlocked(&self) {
        self.book().unlocks += 1;
        self.changed.notify_all();
    }

    /// FLUSH (a close(2)): drops `owner`'s locks on the file, as POSIX drops a process's locks
    /// at any close of the file.
    pub fn closed(&self, caller: Caller, nodeid: u64, h: Handle, owner: u64) {
        let held = {
            let mut book = self.book();
            for (node, owners) in book.via.values_mut() {
                if *node == nodeid {
                    owners.remove(&owner);
                }
            }
            take_owners(&mut book, nodeid, &[owner])
        };
        self.drop_owners(caller, h, held);
    }

    /// RELEASE of open file `fh` (its last close): drops the locks of the owners that set
    /// them through it (OFD and flock locks) and of `flock_owner`.
    pub fn released(
        &self,
        caller: Caller,
        nodeid: u64,
        h: Handle,
        fh: u64,
        flock_owner: Option<u64>,
    ) {
        let held = {
            let mut book = self.book();
            let mut owners: Vec<u64> = book
                .via
                .remove(&fh)
                .map(|(_, o)| o.into_iter().collect())
                .unwrap_or_default();
            owners.extend(flock_owner);
            take_owners(&mut book, nodeid, &owners)
        };
        self.drop_owners(caller, h, held);
    }

    fn drop_owners(&self, caller: Caller, h: Handle, owners: Vec<u64>) {
        if owners.is_empty() {
            return;
        }
        match self.call(caller, FsOp::DropRangeLocks { h, owners }) {
            Ok(_) => {}
            // The lease ends them anyway.
            Err(f) => {
                warn!("could not give back locks at close: {f:?}; they go when the lease runs out")
            }
        }
        self.unlocked();
    }

    /// Ends the renewal thread and any wait (unmount).
    pub fn stop(&self) {
        self.book().stopping = true;
        self.changed.notify_all();
    }

    fn renew_loop(&self) {
        let every = self.lease / 3;
        let mut last = Instant::now();
        let mut book = self.book();
        loop {
            let left = every.saturating_sub(last.elapsed());
            book = self
                .changed
                .wait_timeout(book, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if book.stopping {
                return;
            }
            // Unlocks wake this thread too; only the interval counts.
            if last.elapsed() < every {
                continue;
            }
            last = Instant::now();
            if book.owners.is_empty() {
                continue;
            }
            drop(book);
            let sent = Instant::now();
            tracing::debug!("renewing the lease of this mount's fcntl/flock locks");
            let renewed = self.call(
                Caller::root(),
                FsOp::RenewRangeLocks {
                    lease_ms: self.lease_ms(),
                },
            );
            if sent.elapsed() > every {
                warn!(
                    "renewing the lease of this mount's fcntl/flock locks took {:?} (lease {:?})",
                    sent.elapsed(),
                    self.lease
                );
            }
            book = self.book();
            match renewed {
                Ok(FsReply::RangeLeases { held: 0 }) if !book.owners.is_empty() => {
                    warn!("the replicas dropped this mount's fcntl/flock locks: it could not renew them within the lease ({:?})", self.lease);
                    book.owners.clear();
                    book.via.clear();
                }
                Ok(_) => {}
                Err(f) => warn!("renewing the lease of this mount's locks failed: {f:?}"),
            }
        }
    }
}

/// Removes `owners` from what may hold locks on `nodeid`; answers those that might.
fn take_owners(book: &mut Book, nodeid: u64, owners: &[u64]) -> Vec<u64> {
    let Some(held) = book.owners.get_mut(&nodeid) else {
        return Vec::new();
    };
    let taken: Vec<u64> = owners.iter().copied().filter(|o| held.remove(o)).collect();
    if held.is_empty() {
        book.owners.remove(&nodeid);
    }
    taken
}

/// Whether thread `tid` has a signal to take (pending, neither blocked nor ignored), or is
/// gone: a waiting lock request must then end, as FUSE's INTERRUPT would end it.
fn signal_pending(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => deliverable(&status),
        Err(_) => true,
    }
}

fn deliverable(status: &str) -> bool {
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    pending & !mask("SigBlk:") & !mask("SigIgn:") != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_signals_count_unless_blocked_or_ignored() {
        let status = |pnd: &str, shd: &str, blk: &str, ign: &str| {
            format!("Name:\tx\nSigPnd:\t{pnd}\nShdPnd:\t{shd}\nSigBlk:\t{blk}\nSigIgn:\t{ign}\n")
        };
        let z = "0000000000000000";
        assert!(!deliverable(&status(z, z, z, z)));
        // SIGALRM (14, bit 13) as `flock -w` sends it.
        assert!(deliverable(&status(z, "0000000000002000", z, z)));
        assert!(!deliverable(&status(
            z,
            "0000000000002000",
            "0000000000002000",
            z
        )));
        assert!(!deliverable(&status(
            "0000000000002000",
            z,
            z,
            "0000000000002000"
        )));
        // SIGKILL (bit 8) cannot be blocked.
        assert!(deliverable(&status("0000000000000100", z, z, z)));
        assert!(!signal_pending(0));
        assert!(!signal_pending(std::process::id()));
    }

    #[test]
    fn kinds_map_both_ways() {
        assert_eq!(kind_of(libc::F_UNLCK).ok(), Some(None));
        for k in [RangeLockKind::Read, RangeLockKind::Write] {
            assert_eq!(kind_of(typ_of(k)).ok(), Some(Some(k)));
        }
        assert!(kind_of(77).is_err());
    }
}
