//! The Zzyzx locks a mount holds (docs/zzyzx-plan.md §7, milestone M2): taken with
//! `bftfs lock PATH`, given back with `bftfs unlock PATH` or at unmount.
//!
//! While a lock is held, every call is first sent as an entry of the lock's log (one round
//! trip to the replicas, no agreement among them). A call that reaches outside the lock comes
//! back `NeedsAgreement` and takes the ordered path. If the servers froze the lock (another
//! client touched its objects, or one of this mount's calls reached it from outside), the
//! mount has the log sealed and releases the lock through ordering with the certificate, so
//! everything its calls completed under the lock is what merges.
//!
//! M2 sends reads as log entries too, one at a time per lock: correct, not yet fast (the
//! client cache and pipelining are M4).

use super::lock_cache::{self, LockCache};
use super::transport::ReplicatedTransport;
use crate::options::LockPolicy;
use crate::transport::TransportError;
use replica::core::lock::{LOCK_LOG_BYTES_MAX, LOCK_LOG_ENTRIES_MAX};
use replica::driver::client::CallError;
use state_abstraction::fs::locks::{FreezeCause, LockRefusal, LockState, LockUnit};
use state_abstraction::fs::{
    decode, encode, Caller, FsError, FsOp, FsReply, FsRequest, FsResult, Handle,
};
use state_abstraction::{ClientId, LockId, LockedResult, ResolveSubject};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// A lock is renewed when it is older than this (its life is extended 10 minutes at a time).
const RENEW_AFTER: Duration = Duration::from_secs(5 * 60);

struct Held {
    id: LockId,
    root: Handle,
    caller: Caller,
    renewed: Instant,
    /// What the lock's log holds (entries and operation bytes), counted from the entries
    /// this mount sent: the servers keep a log whole until its merge and refuse entries past
    /// their caps, so the mount gives the lock back and takes it again before it gets there.
    entries: u64,
    bytes: u64,
    /// Taken by `-o locks=auto` (given back when idle), not by `bftfs lock`.
    auto: bool,
}

/// Entries and bytes at which a lock is rotated (released and taken again): below the log
/// servers' caps by more than the FUSE threads can add meanwhile.
const ROTATE_ENTRIES: u64 = LOCK_LOG_ENTRIES_MAX - 4096;
const ROTATE_BYTES: u64 = LOCK_LOG_BYTES_MAX - (256 << 20);

/// Names of the lock's root read at activation, for the cache.
const ROOT_NAMES_READ: u32 = 1024;

/// How long a rotation waits for the old lock to merge before the new one is granted.
const ROTATE_WAIT: Duration = Duration::from_secs(20);

/// How often a mount whose calls wait on a frozen lock tries to resolve it.
const RESOLVE_EVERY: Duration = Duration::from_secs(1);
/// How long a mount waits for the replicas' reports of a frozen lock.
const REPORTS_WAIT: Duration = Duration::from_secs(5);

/// How a release went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Released {
    Done,
    /// Released, but a `Resolve` by another client had fixed the log's end beyond this
    /// mount's certificate (its entry in flight at the freeze is part of the lock's result).
    BeyondCertificate,
    Failed,
}

/// Most objects remembered as outside the held lock.
const OUTSIDE_MAX: usize = 1 << 16;

/// The objects an operation names by handle (none for the operations on the lock table).
fn named_objects(op: &FsOp) -> Vec<Handle> {
    match op {
        FsOp::GetAttr { h }
        | FsOp::SetAttr { h, .. }
        | FsOp::Access { h, .. }
        | FsOp::ReadLink { h }
        | FsOp::Read { h, .. }
        | FsOp::Write { h, .. }
        | FsOp::StatFs { h }
        | FsOp::Commit { h, .. }
        | FsOp::GetXattr { h, .. }
        | FsOp::SetXattr { h, .. }
        | FsOp::ListXattr { h, .. }
        | FsOp::RemoveXattr { h, .. }
        | FsOp::Fallocate { h, .. }
        | FsOp::SetRangeLock { h, .. }
        | FsOp::TestRangeLock { h, .. }
        | FsOp::DropRangeLocks { h, .. }
        | FsOp::Lock { h, .. } => vec![*h],
        FsOp::Lookup { dir, .. }
        | FsOp::Create { dir, .. }
        | FsOp::Mkdir { dir, .. }
        | FsOp::Symlink { dir, .. }
        | FsOp::Mknod { dir, .. }
        | FsOp::Remove { dir, .. }
        | FsOp::Rmdir { dir, .. }
        | FsOp::ReadDir { dir, .. } => vec![*dir],
        FsOp::Rename {
            from_dir, to_dir, ..
        } => vec![*from_dir, *to_dir],
        FsOp::Link { h, dir, .. } => vec![*h, *dir],
        FsOp::CopyRange { src, dst, .. } => vec![*src, *dst],
        FsOp::Release { .. }
        | FsOp::Renew { .. }
        | FsOp::ListLocks
        | FsOp::RenewRangeLocks { .. }
        | FsOp::Resolve { .. } => Vec::new(),
    }
}

#[derive(Default)]
pub struct HeldLocks {
    /// When this mount last tried to resolve frozen locks (`resolve_frozen`).
    resolving: Mutex<Option<Instant>>,
    /// Objects the held lock's log servers said are not the lock's (an operation naming
    /// only them needed agreement): later calls naming only them skip the log's round
    /// trip. Membership is fixed while a lock lives (renames across its boundary revoke
    /// it), so the set is cleared only when the held locks change. A wrong entry costs no
    /// correctness: the ordered call then meets the mount's own lock, which is released.
    outside: Mutex<std::collections::HashSet<Handle>>,
    held: Mutex<Vec<Held>>,
    /// Answers to reads made under the locks (lock_cache.rs); cleared with each release.
    cache: Mutex<LockCache>,
    /// `-o lock_cache=off`: every read goes to the log servers.
    no_cache: bool,
    /// `-o locks=`: `None` is manual.
    policy: Option<LockPolicy>,
    auto: Mutex<Auto>,
    /// When a call last went through a lock (its log or its cache).
    last_use: Mutex<Option<Instant>>,
    /// `-o lock_idle=`: an automatic lock unused this long is given back.
    idle_after: Option<Duration>,
    /// The thread rotating the lock (see `rotate`); other calls wait for it rather than
    /// go ordered, since one landing after the new lock is active would revoke it.
    rotating: Mutex<Option<std::thread::ThreadId>>,
    rotated: std::sync::Condvar,
    /// A thread is taking an automatic lock (an ordered `Lock` and the wait for its
    /// activation, about a second): others do not take one meanwhile, so that concurrent
    /// callers in several busy directories do not each lock one.
    taking_auto: std::sync::atomic::AtomicBool,
    /// Releases under way (`None`) or done (how they went), by lock: a second thread that
    /// wants a lock given back (the keeper told of a revocation, and a call whose entry
    /// was refused) waits for the first one's outcome instead of taking its own guess.
    releases: Mutex<BTreeMap<LockId, Option<Released>>>,
    released: std::sync::Condvar,
}

/// Release outcomes remembered.
const RELEASES_KEPT: usize = 64;

/// Ends a rotation when the rotating thread leaves `rotate`, whichever way.
struct RotationDone<'a>(&'a HeldLocks);

impl Drop for RotationDone<'_> {
    fn drop(&mut self) {
        *self.0.rotating.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.0.rotated.notify_all();
    }
}

/// Automatic locking (docs/zzyzx-plan.md §7.5): a directory where this mount made
/// [`AUTO_CHANGES`] ordered changes within [`AUTO_WINDOW`], none of them refused as locked,
/// is locked as a subtree; a lock revoked by another mount keeps its root from being locked
/// again for a while that doubles with each revocation.
#[derive(Default)]
struct Auto {
    /// Recent ordered changes: when, and the directory they changed with its known
    /// ancestors (nearest first), found once when the change is recorded.
    recent: VecDeque<(Instant, Vec<Handle>)>,
    /// Roots not to lock before the instant, and the back-off that put them there.
    backoff: HashMap<u64, (Instant, Duration)>,
    /// The parent of each directory this mount made or looked up through ordering, so that
    /// changes spread over sibling directories count for their common parent.
    parents: HashMap<u64, Handle>,
}

pub const AUTO_CHANGES: usize = 16;
pub const AUTO_WINDOW: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(600);
const AUTO_RECENT_MAX: usize = 256;
const AUTO_PARENTS_MAX: usize = 1 << 16;
/// How far up from a changed directory a lock may be taken.
const AUTO_LEVELS: usize = 3;

impl Auto {
    /// Learns parents from an ordered answer that names a directory by name.
    fn learn(&mut self, op: &FsOp, result: &FsResult) {
        let (FsOp::Mkdir { dir, .. } | FsOp::Lookup { dir, .. }) = op else {
            return;
        };
        if let Ok(FsReply::Entry { handle, attr }) = result {
            if attr.kind == state_abstraction::fs::FileType::Directory {
                if self.parents.len() >= AUTO_PARENTS_MAX {
                    self.parents.clear();
                }
                self.parents.insert(handle.index, *dir);
            }
        }
    }

    /// `dir` and its known ancestors below the root, nearest first.
    fn ancestry(&self, dir: Handle) -> Vec<Handle> {
        let mut up = vec![dir];
        while up.len() <= AUTO_LEVELS {
            match self.parents.get(&up[up.len() - 1].index) {
                Some(p) if *p != Handle::ROOT && !up.contains(p) => up.push(*p),
                _ => break,
            }
        }
        up
    }

    /// Records a change in `dir`; the directory to lock now, if one is due: the highest of
    /// `dir` and its ancestors (below the root, not backed off) with [`AUTO_CHANGES`] recent
    /// changes in its subtree, an ancestor only if they were spread over more than one
    /// directory (PostMark's ten subdirectories, a build's objects and sources).
    fn changed(&mut self, dir: Handle, now: Instant) -> Option<Handle> {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > AUTO_WINDOW)
            || self.recent.len() >= AUTO_RECENT_MAX
        {
            self.recent.pop_front();
        }
        let up = self.ancestry(dir);
        self.recent.push_back((now, up.clone()));
        let mut due = None;
        for (level, a) in up.into_iter().enumerate() {
            if a == Handle::ROOT
                || self
                    .backoff
                    .get(&a.index)
                    .is_some_and(|(until, _)| now < *until)
            {
                continue;
            }
            let within: Vec<Handle> = self
                .recent
                .iter()
                .filter(|(_, up)| up.contains(&a))
                .map(|(_, up)| up[0])
                .collect();
            let spread = within.iter().any(|d| *d != within[0]);
            if within.len() >= AUTO_CHANGES && (level == 0 || spread) {
                due = Some(a);
            }
        }
        due
    }

    /// Another mount wanted `root` (or this one could not lock it): keep off it a while.
    fn back_off(&mut self, root: u64, now: Instant) {
        let next = match self.backoff.get(&root) {
            Some((_, d)) => (*d * 2).min(BACKOFF_MAX),
            None => BACKOFF_FIRST,
        };
        self.backoff.insert(root, (now + next, next));
        self.recent.retain(|(_, up)| up[0].index != root);
    }
}

/// The directory an ordered change is made in, if it names one (writes and attribute
/// changes name only their object, whose directory the mount does not know).
fn changed_dir(op: &FsOp) -> Option<Handle> {
    match op {
        FsOp::Create { dir, .. }
        | FsOp::Mkdir { dir, .. }
        | FsOp::Symlink { dir, .. }
        | FsOp::Mknod { dir, .. }
        | FsOp::Remove { dir, .. }
        | FsOp::Rmdir { dir, .. }
        | FsOp::Link { dir, .. } => Some(*dir),
        FsOp::Rename {
            from_dir, to_dir, ..
        } if from_dir == to_dir => Some(*from_dir),
        _ => None,
    }
}

/// The replicas' lock table, through ordering (`None` when the call fails).
fn list_locks(t: &ReplicatedTransport) -> Option<Vec<state_abstraction::fs::locks::LockEntry>> {
    let list = FsRequest {
        caller: Caller::root(),
        op: FsOp::ListLocks,
    };
    match t.ordered(&list) {
        Ok(Ok(FsReply::Locks { locks, .. })) => Some(locks),
        _ => None,
    }
}

fn refusal_errno(why: LockRefusal) -> i32 {
    match why {
        LockRefusal::Banned => libc::EPERM,
        LockRefusal::Root => libc::EINVAL,
        LockRefusal::TooMany | LockRefusal::AlreadyCovered | LockRefusal::Recent => libc::EBUSY,
    }
}

impl HeldLocks {
    pub fn set_cache(&mut self, on: bool) {
        self.no_cache = !on;
    }

    pub fn set_policy(&mut self, policy: LockPolicy, idle_after: Duration) {
        self.policy = Some(policy);
        self.idle_after = Some(idle_after);
    }

    /// Gives back the automatic locks no call used for `-o lock_idle` (another mount then
    /// gets at the tree without waiting for a revocation). Run every second by the
    /// transport's lock keeper.
    pub fn release_idle(&self, t: &ReplicatedTransport) {
        let Some(idle_after) = self.idle_after else {
            return;
        };
        let idle = {
            let last = self.last_use.lock().unwrap_or_else(|p| p.into_inner());
            last.is_none_or(|l| l.elapsed() >= idle_after)
        };
        if !idle {
            return;
        }
        let ids: Vec<LockId> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().filter(|h| h.auto).map(|h| h.id).collect()
        };
        for id in ids {
            info!(lock = id.0, "giving back an idle automatic lock");
            self.release(t, id);
        }
    }

    /// Gives back the held locks among `revoked` (their servers froze them: another
    /// client's access, or expiry). Sealed at what completed and released with the
    /// certificate, the lock merges at the next checkpoint, and the other client goes on
    /// without waiting for the release grace.
    pub fn release_revoked(&self, t: &ReplicatedTransport, revoked: &[LockId]) {
        let ids: Vec<LockId> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter()
                .filter(|h| revoked.contains(&h.id))
                .map(|h| h.id)
                .collect()
        };
        for id in ids {
            // Frozen by another client's access: an automatic lock keeps off the tree a while.
            // Not when this mount's own call from outside the lock froze it (the ordered path
            // then gives it back too), nor at expiry.
            let by = self.frozen_by(t, id);
            info!(
                lock = id.0,
                by = ?by.map(|c| c.0),
                "the replicas froze the lock; giving it back"
            );
            if by.is_some_and(|c| c.0 != t.client_id()) {
                self.revoked(self.root_of(id));
            }
            self.release(t, id);
        }
    }

    /// The client whose ordered access froze lock `id`, from the lock table (`None`: not
    /// frozen by an access, or the table could not be read).
    fn frozen_by(&self, t: &ReplicatedTransport, id: LockId) -> Option<ClientId> {
        list_locks(t)?
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| match e.state {
                LockState::Frozen {
                    cause: FreezeCause::Conflict(c),
                    ..
                } => Some(c),
                _ => None,
            })
    }

    /// An ordered call completed with `result`: with `-o locks=auto`, a directory changed
    /// often enough by this mount alone is locked.
    pub fn note_ordered(&self, t: &ReplicatedTransport, req: &FsRequest, result: &FsResult) {
        if self.policy != Some(LockPolicy::Auto) {
            return;
        }
        self.auto
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .learn(&req.op, result);
        let Some(dir) = changed_dir(&req.op) else {
            return;
        };
        let now = Instant::now();
        let due = {
            let mut auto = self.auto.lock().unwrap_or_else(|p| p.into_inner());
            if *result == Err(FsError::Locked) {
                // Someone else's lock is in the way there.
                auto.back_off(dir.index, now);
                return;
            }
            if result.is_err() {
                return;
            }
            auto.changed(dir, now)
        };
        let Some(dir) = due else {
            return;
        };
        if self.holds_any() {
            // One lock at a time; it goes back when idle (`release_idle`). Giving it up
            // for each new busy directory was measured slower: an unpack of 30 directories
            // of 100 files paid about 1.2 s per switch (a merge and an activation, each at
            // a checkpoint) for less than that saved under each lock.
            return;
        }
        use std::sync::atomic::Ordering;
        if self
            .taking_auto
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let taken = self.lock_as(t, req.caller.clone(), dir, true);
        self.taking_auto.store(false, Ordering::Release);
        match taken {
            Ok(()) => info!(index = dir.index, "locked a busy directory (locks=auto)"),
            Err(errno) => {
                debug!(
                    index = dir.index,
                    errno, "automatic lock not taken; backing off"
                );
                let mut auto = self.auto.lock().unwrap_or_else(|p| p.into_inner());
                auto.back_off(dir.index, now);
            }
        }
    }

    /// The lock on `root` was revoked by the replicas (another mount's access, or this
    /// mount's from outside the lock): an automatic lock keeps off it a while.
    fn revoked(&self, root: Option<Handle>) {
        if let Some(root) = root {
            let mut auto = self.auto.lock().unwrap_or_else(|p| p.into_inner());
            auto.back_off(root.index, Instant::now());
        }
    }

    /// The lock calls go through, whether it is due for renewal, and whether its log is
    /// due for rotation; counts `bytes` of operation into its log.
    fn first(&self, bytes: usize) -> Option<(LockId, bool, bool)> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.first_mut().map(|h| {
            h.entries += 1;
            h.bytes += bytes as u64;
            let full = h.entries >= ROTATE_ENTRIES || h.bytes >= ROTATE_BYTES;
            (h.id, h.renewed.elapsed() >= RENEW_AFTER, full)
        })
    }

    pub fn holds_any(&self) -> bool {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        !held.is_empty()
    }

    /// Runs `req` as the next entry of the held lock's log; `None`: it needs the ordered path.
    pub fn try_locked(
        &self,
        t: &ReplicatedTransport,
        req: &FsRequest,
    ) -> Option<Result<FsResult, TransportError>> {
        self.try_locked_after(t, req, false)
    }

    /// `try_locked`, once the lock was rotated for this call (`rotated`): a second rotation
    /// for one call is not tried (the call goes ordered).
    fn try_locked_after(
        &self,
        t: &ReplicatedTransport,
        req: &FsRequest,
        rotated: bool,
    ) -> Option<Result<FsResult, TransportError>> {
        self.wait_rotation();
        if !self.holds_any() {
            return None;
        }
        let key = lock_cache::key(req).filter(|_| !self.no_cache);
        let generation = {
            let mut cache = self.cache();
            if let Some(hit) = key.as_ref().and_then(|k| cache.get(req, k, Instant::now())) {
                self.used();
                return Some(Ok(hit));
            }
            cache.generation()
        };
        let named = named_objects(&req.op);
        if self.single_lock() {
            let outside = self.outside.lock().unwrap_or_else(|p| p.into_inner());
            if !named.is_empty() && named.iter().all(|h| outside.contains(h)) {
                return None;
            }
        }
        let op = encode(req);
        let (id, renew, full) = self.first(op.len())?;
        *self.cache().sent.entry(req.op.kind()).or_default() += 1;
        if full && !rotated {
            self.rotate(t, id, "the lock's log is nearly full");
            // Through the new lock if there is one (its log starts empty), else ordered.
            return self.try_locked_after(t, req, true);
        }
        if renew {
            self.renew(t, id);
        }
        let sent = Instant::now();
        let outcome = match t.client().locked_call(id, op, t.timeout()) {
            Ok(LockedResult::Done(bytes)) => {
                self.used();
                let result = decode::<FsResult>(&bytes)
                    .ok_or_else(|| TransportError::Malformed(format!("{} bytes", bytes.len())));
                if let Ok(result) = &result {
                    let mut cache = self.cache();
                    cache.renew(sent);
                    match key {
                        Some(key) => cache.store(key, req, result, generation),
                        None if !req.op.is_read_only() => cache.mutated_locked(req, result),
                        None => {}
                    }
                }
                return Some(result);
            }
            Ok(LockedResult::PoolEmpty) if !rotated => {
                // No effect anywhere: the same call goes through the next lock, whose pool
                // is fresh.
                self.cache().renew(sent);
                self.rotate(t, id, "the lock's pool of new objects is used up");
                return self.try_locked_after(t, req, true);
            }
            Ok(LockedResult::PoolEmpty) => return None,
            Ok(LockedResult::NeedsAgreement) => {
                // The ordered path runs it and tells the cache (`after_ordered`).
                self.cache().renew(sent);
                if let [h] = named.as_slice() {
                    if self.single_lock() {
                        let mut outside = self.outside.lock().unwrap_or_else(|p| p.into_inner());
                        if outside.len() >= OUTSIDE_MAX {
                            outside.clear();
                        }
                        outside.insert(*h);
                    }
                }
                return None;
            }
            Err(CallError::LockGone) => {
                info!(lock = id.0, "the replicas froze the lock; releasing it");
                self.revoked(self.root_of(id));
                self.release(t, id);
                return None;
            }
            Err(CallError::EntryRefused) => {
                info!(
                    lock = id.0,
                    "the replicas froze the lock with a call in flight; releasing it"
                );
                self.revoked(self.root_of(id));
                if self.release_as(t, id) == Released::BeyondCertificate {
                    // Another client resolved the lock before this mount could release it,
                    // and the end it fixed includes the refused entry: the call took effect
                    // under the lock, but its result is lost. Not sent again.
                    warn!(
                        lock = id.0,
                        op = req.op.kind(),
                        "a call refused at the lock's freeze was kept by its resolution; EIO"
                    );
                    return Some(Ok(Err(FsError::Io)));
                }
                return None;
            }
            Err(CallError::Timeout(d)) => Err(TransportError::Timeout(d)),
            Err(e) => Err(TransportError::Unreachable(e.to_string())),
        };
        // A mutation that failed on the way may have run.
        if !req.op.is_read_only() {
            self.cache().mutated(&req.op, None);
        }
        Some(outcome)
    }

    /// A call went through a lock (its log or its cache).
    fn used(&self) {
        *self.last_use.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Exactly one lock held: what its log servers say about membership is the whole story.
    fn single_lock(&self) -> bool {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len() == 1
    }

    fn forget_outside(&self) {
        self.outside
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// An ordered answer names a held lock's root (a lookup or `readdirplus` from its
    /// parent, outside the lock): the replicas answer the root's attributes as they were at
    /// activation (plan §2.4), which is right for other mounts' path walks but not for the
    /// holder, which may have changed them (a `chmod` of the root under the lock). The
    /// holder's own view comes from the lock.
    pub fn holder_view_of_roots(
        &self,
        t: &ReplicatedTransport,
        req: &FsRequest,
        reply: &mut FsReply,
    ) {
        let roots: Vec<Handle> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().map(|h| h.root).collect()
        };
        if roots.is_empty() {
            return;
        }
        let fresh = |root: Handle| -> Option<state_abstraction::fs::Attr> {
            let get = FsRequest {
                caller: req.caller.clone(),
                op: FsOp::GetAttr { h: root },
            };
            match self.try_locked(t, &get) {
                Some(Ok(Ok(FsReply::Attr(a)))) => Some(a),
                _ => None,
            }
        };
        match reply {
            FsReply::Entry { handle, attr } if roots.contains(handle) => {
                if let Some(a) = fresh(*handle) {
                    *attr = a;
                }
            }
            FsReply::ReadDir { entries, .. } => {
                for e in entries.iter_mut() {
                    if e.attr.is_some() && roots.contains(&e.handle) {
                        if let Some(a) = fresh(e.handle) {
                            e.attr = Some(a);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A call this mount sent on the ordered path has completed (`None`: it failed on the
    /// way): its changes drop what the lock cache holds about them.
    pub fn after_ordered(&self, req: &FsRequest, result: Option<&FsResult>) {
        if !req.op.is_read_only() && self.holds_any() {
            self.cache().mutated(&req.op, result);
        }
        if let Some(Ok(reply)) = result {
            if self.single_lock() {
                self.learn_outside(req, reply);
            }
        }
    }

    /// What an ordered answer says about membership of the held lock, which was fixed at
    /// its activation: an object ordering created since is not a member (the lock's new
    /// objects come from its pool, through its log), and the children of a directory
    /// outside a subtree are outside it, but for the lock's root itself.
    fn learn_outside(&self, req: &FsRequest, reply: &FsReply) {
        if !matches!(
            req.op,
            FsOp::Create { .. }
                | FsOp::Mkdir { .. }
                | FsOp::Symlink { .. }
                | FsOp::Mknod { .. }
                | FsOp::Lookup { .. }
                | FsOp::ReadDir { .. }
        ) {
            return;
        }
        let roots: Vec<Handle> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().map(|h| h.root).collect()
        };
        let mut outside = self.outside.lock().unwrap_or_else(|p| p.into_inner());
        if outside.len() >= OUTSIDE_MAX {
            outside.clear();
        }
        match (&req.op, reply) {
            (
                FsOp::Create { .. }
                | FsOp::Mkdir { .. }
                | FsOp::Symlink { .. }
                | FsOp::Mknod { .. },
                FsReply::Entry { handle, .. },
            ) => {
                outside.insert(*handle);
            }
            (FsOp::Lookup { dir, .. }, FsReply::Entry { handle, .. })
                if outside.contains(dir) && !roots.contains(handle) =>
            {
                outside.insert(*handle);
            }
            (FsOp::ReadDir { dir, .. }, FsReply::ReadDir { entries, .. })
                if outside.contains(dir) =>
            {
                for e in entries {
                    if !roots.contains(&e.handle) {
                        outside.insert(e.handle);
                    }
                }
            }
            _ => {}
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LockCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the lock back with its log sealed and takes the same root again, so that the
    /// new lock starts with an empty log and a fresh pool. Other calls wait for it
    /// (`wait_rotation`).
    fn rotate(&self, t: &ReplicatedTransport, id: LockId, why: &str) {
        {
            let mut rotating = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
            if rotating.is_some() {
                drop(rotating);
                self.wait_rotation();
                return;
            }
            *rotating = Some(std::thread::current().id());
        }
        let _done = RotationDone(self);
        let Some((root, caller, auto)) = ({
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter()
                .find(|h| h.id == id)
                .map(|h| (h.root, h.caller.clone(), h.auto))
        }) else {
            return;
        };
        info!(lock = id.0, "{why}; giving the lock back and locking again");
        if !self.release(t, id) {
            return;
        }
        let started = Instant::now();
        loop {
            match self.lock_as(t, caller.clone(), root, auto) {
                Ok(()) => return,
                // The old lock has not merged yet.
                Err(e) if e == libc::EBUSY && started.elapsed() < ROTATE_WAIT => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    warn!(
                        errno = e,
                        "locking again after a rotation failed; calls stay ordered"
                    );
                    return;
                }
            }
        }
    }

    /// Waits while another thread rotates the lock (bounded: a rotation gives up after
    /// `ROTATE_WAIT`).
    fn wait_rotation(&self) {
        let me = std::thread::current().id();
        let deadline = Instant::now() + ROTATE_WAIT + Duration::from_secs(30);
        let mut rotating = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        while rotating.is_some_and(|t| t != me) && Instant::now() < deadline {
            rotating = self
                .rotated
                .wait_timeout(rotating, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn renew(&self, t: &ReplicatedTransport, id: LockId) {
        let caller = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let Some(h) = held.iter_mut().find(|h| h.id == id) else {
                return;
            };
            h.renewed = Instant::now();
            h.caller.clone()
        };
        let req = FsRequest {
            caller,
            op: FsOp::Renew { lock: id },
        };
        match t.ordered(&req) {
            Ok(Ok(_)) => {}
            other => warn!(lock = id.0, result = ?other, "renewing the lock failed"),
        }
    }

    fn root_of(&self, id: LockId) -> Option<Handle> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().find(|h| h.id == id).map(|h| h.root)
    }

    /// Takes a subtree lock on `h` for `bftfs lock` and waits until the replicas serve it.
    pub fn lock(&self, t: &ReplicatedTransport, caller: Caller, h: Handle) -> Result<(), i32> {
        {
            // Already held here, taken by `-o locks=auto`: the lock becomes the user's,
            // kept until `bftfs unlock` rather than given back idle. (A second `bftfs lock`
            // of a tree the user locked is refused by the replicas, as covered already.)
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(x) = held.iter_mut().find(|x| x.root == h && x.auto) {
                info!(
                    lock = x.id.0,
                    "bftfs lock of a directory locked automatically"
                );
                x.auto = false;
                return Ok(());
            }
        }
        self.lock_as(t, caller, h, false)
    }

    fn lock_as(
        &self,
        t: &ReplicatedTransport,
        caller: Caller,
        h: Handle,
        auto: bool,
    ) -> Result<(), i32> {
        if self.policy == Some(LockPolicy::Off) {
            return Err(libc::EOPNOTSUPP);
        }
        let req = FsRequest {
            caller: caller.clone(),
            op: FsOp::Lock {
                h,
                unit: LockUnit::Subtree,
            },
        };
        let id = match t.ordered(&req) {
            Ok(Ok(FsReply::LockPending { lock })) => lock,
            Ok(Ok(FsReply::LockRefused { why })) => {
                info!(?why, "lock refused");
                return Err(refusal_errno(why));
            }
            Ok(Err(e)) => return Err(e.errno()),
            Ok(Ok(other)) => {
                warn!(?other, "unexpected answer to a lock request");
                return Err(libc::EIO);
            }
            Err(e) => {
                warn!(error = %e, "lock request failed");
                return Err(libc::EIO);
            }
        };
        match t.client().lock_start(id, t.timeout()) {
            Ok(k) => {
                info!(
                    lock = id.0,
                    index = h.index,
                    k,
                    "lock active; calls go through its log"
                );
                {
                    let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                    held.push(Held {
                        id,
                        root: h,
                        caller: caller.clone(),
                        renewed: Instant::now(),
                        entries: k,
                        bytes: 0,
                        auto,
                    });
                    *self.last_use.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
                self.forget_outside();
                // The root's names, read whole while the directory is small: from then on a
                // lookup of a name it does not hold (every create asks one first) is
                // answered by the cache.
                let names = FsRequest {
                    caller,
                    op: FsOp::ReadDir {
                        dir: h,
                        cookie: 0,
                        count: ROOT_NAMES_READ,
                        plus: false,
                    },
                };
                let _ = self.try_locked(t, &names);
                Ok(())
            }
            Err(e) => {
                // Revoked before it was served (another mount's access came first): nothing
                // was sent under it, so the servers seal it empty and it merges at once.
                let cert = match e {
                    CallError::LockGone => t.client().lock_seal(id, t.timeout()).ok(),
                    _ => None,
                };
                warn!(
                    lock = id.0,
                    error = %e,
                    sealed = cert.is_some(),
                    "the lock did not become active; giving it back"
                );
                t.client().lock_end(id);
                let req = FsRequest {
                    caller,
                    op: FsOp::Release { lock: id, cert },
                };
                let _ = t.ordered(&req);
                Err(libc::EBUSY)
            }
        }
    }

    /// Gives back the lock whose root is `h`.
    pub fn unlock(&self, t: &ReplicatedTransport, h: Handle) -> Result<(), i32> {
        let id = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().find(|x| x.root == h).map(|x| x.id)
        };
        match id {
            Some(id) => {
                if self.release(t, id) {
                    Ok(())
                } else {
                    Err(libc::EIO)
                }
            }
            None => Err(libc::ENOENT),
        }
    }

    /// Seals the lock's log (certificate of where it ends) and releases it through
    /// ordering. Without a certificate (the replicas are unreachable) the release still
    /// freezes it; what completed is then at 2f+1 servers and merges after the grace.
    fn release(&self, t: &ReplicatedTransport, id: LockId) -> bool {
        self.release_as(t, id) != Released::Failed
    }

    /// Frozen locks of other clients (or of this mount's past) that nobody gave an end:
    /// after the release grace, any client may resolve one with the replicas' reports, so
    /// that a call waiting on a dead holder's lock goes on. At most one thread of the mount
    /// does it at a time, and not more often than every `RESOLVE_EVERY`.
    pub fn resolve_frozen(&self, t: &ReplicatedTransport) {
        let Ok(mut last) = self.resolving.try_lock() else {
            return;
        };
        if last.is_some_and(|l| l.elapsed() < RESOLVE_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let Some(locks) = list_locks(t) else {
            return;
        };
        let mine: Vec<LockId> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().map(|h| h.id).collect()
        };
        for e in locks {
            let LockState::Frozen { end: None, .. } = e.state else {
                continue;
            };
            if mine.contains(&e.id) {
                continue;
            }
            let subject = ResolveSubject {
                lock: e.id,
                epoch: e.epoch,
                holder: e.holder,
                base: e.base,
            };
            let evidence = match t.client().lock_reports(subject, REPORTS_WAIT) {
                Ok(evidence) => evidence,
                Err(error) => {
                    debug!(lock = e.id.0, %error, "no reports for a frozen lock yet");
                    continue;
                }
            };
            let req = FsRequest {
                caller: Caller::root(),
                op: FsOp::Resolve {
                    lock: e.id,
                    evidence,
                },
            };
            match t.ordered(&req) {
                Ok(Ok(_)) => info!(
                    lock = e.id.0,
                    holder = e.holder.0,
                    "resolved a frozen lock whose holder did not release it"
                ),
                Ok(Err(FsError::Locked)) => debug!(lock = e.id.0, "frozen lock still in its grace"),
                other => warn!(lock = e.id.0, result = ?other, "resolving a frozen lock failed"),
            }
        }
    }

    fn release_as(&self, t: &ReplicatedTransport, id: LockId) -> Released {
        let held = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let Some(i) = held.iter().position(|x| x.id == id) else {
                drop(held);
                return self.release_outcome(id, t.timeout());
            };
            let mut releases = self.releases.lock().unwrap_or_else(|p| p.into_inner());
            while releases.len() >= RELEASES_KEPT {
                let Some((&old, _)) = releases.iter().find(|(_, o)| o.is_some()) else {
                    break;
                };
                releases.remove(&old);
            }
            releases.insert(id, None);
            held.remove(i)
        };
        let outcome = self.give_back(t, id, held);
        let mut releases = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        releases.insert(id, Some(outcome));
        self.released.notify_all();
        outcome
    }

    /// How another thread's release of `id` went, once it is over (`Done` for a lock this
    /// mount does not remember releasing).
    fn release_outcome(&self, id: LockId, timeout: Duration) -> Released {
        let releases = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        let (releases, _) = self
            .released
            .wait_timeout_while(releases, timeout, |r| matches!(r.get(&id), Some(None)))
            .unwrap_or_else(|p| p.into_inner());
        match releases.get(&id) {
            Some(Some(outcome)) => *outcome,
            Some(None) => Released::Failed,
            None => Released::Done,
        }
    }

    fn give_back(&self, t: &ReplicatedTransport, id: LockId, held: Held) -> Released {
        self.forget_outside();
        {
            let mut cache = self.cache();
            info!(
                lock = id.0,
                cache_hits = cache.hits,
                cache_misses = cache.misses,
                sent = ?cache.sent,
                "giving the lock back"
            );
            cache.clear();
        }
        let cert = match t.client().lock_seal(id, t.timeout()) {
            Ok(cert) => Some(cert),
            Err(e) => {
                warn!(lock = id.0, error = %e, "no seal certificate; releasing without one");
                None
            }
        };
        t.client().lock_end(id);
        let req = FsRequest {
            caller: held.caller,
            op: FsOp::Release { lock: id, cert },
        };
        match t.ordered(&req) {
            Ok(Ok(_)) => {
                info!(lock = id.0, "lock released");
                Released::Done
            }
            Ok(Err(FsError::Stale)) => {
                info!(
                    lock = id.0,
                    "lock released; another client had resolved it further"
                );
                Released::BeyondCertificate
            }
            other => {
                warn!(lock = id.0, result = ?other, "releasing the lock failed");
                Released::Failed
            }
        }
    }

    pub fn release_all(&self, t: &ReplicatedTransport) {
        let ids: Vec<LockId> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().map(|h| h.id).collect()
        };
        for id in ids {
            self.release(t, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use state_abstraction::fs::{Attr, FileType};

    fn h(index: u64) -> Handle {
        Handle {
            index,
            generation: 1,
        }
    }

    fn dir_entry(handle: Handle) -> FsResult {
        let t = state_abstraction::fs::Timespec { secs: 0, nsecs: 0 };
        let attr = Attr {
            kind: FileType::Directory,
            mode: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            size: 0,
            blocks: 0,
            rdev: 0,
            fsid: 0,
            fileid: handle.index,
            generation: handle.generation,
            atime: t,
            mtime: t,
            ctime: t,
        };
        Ok(FsReply::Entry { handle, attr })
    }

    fn mkdir(auto: &mut Auto, parent: Handle, child: Handle) {
        let op = FsOp::Mkdir {
            dir: parent,
            name: b"d".to_vec(),
            mode: 0o755,
        };
        auto.learn(&op, &dir_entry(child));
    }

    #[test]
    fn one_busy_directory_is_locked_itself() {
        let mut auto = Auto::default();
        let (work, sub) = (h(5), h(6));
        mkdir(&mut auto, Handle::ROOT, work);
        mkdir(&mut auto, work, sub);
        let now = Instant::now();
        let due: Vec<Option<Handle>> = (0..AUTO_CHANGES).map(|_| auto.changed(sub, now)).collect();
        assert!(due[..AUTO_CHANGES - 1].iter().all(Option::is_none));
        // Not its parent: all the changes were in one directory.
        assert_eq!(due[AUTO_CHANGES - 1], Some(sub));
    }

    #[test]
    fn changes_spread_over_siblings_lock_their_parent_never_the_root() {
        let mut auto = Auto::default();
        let work = h(5);
        mkdir(&mut auto, Handle::ROOT, work);
        let subs: Vec<Handle> = (0..10).map(|i| h(10 + i)).collect();
        for s in &subs {
            mkdir(&mut auto, work, *s);
        }
        let now = Instant::now();
        let mut due = None;
        for i in 0..AUTO_CHANGES {
            due = auto.changed(subs[i % subs.len()], now);
        }
        assert_eq!(due, Some(work));
        // Siblings right below the root: the root is never locked, so nothing is due.
        let mut top = Auto::default();
        for s in &subs {
            mkdir(&mut top, Handle::ROOT, *s);
        }
        let mut due = None;
        for i in 0..AUTO_CHANGES {
            due = top.changed(subs[i % subs.len()], now);
        }
        assert_eq!(due, None);
        // A parent backed off (another mount wanted it) is skipped.
        auto.back_off(work.index, now);
        for i in 0..4 * AUTO_CHANGES {
            due = auto.changed(subs[i % subs.len()], now);
        }
        assert_ne!(due, Some(work));
    }
}
