//! The lock timeline (docs/zzyzx-plan.md, milestone M2): what an active lock's log does to
//! the lock's members, beside the ordered state.
//!
//! In: entries of a lock's log ([`FileService::run_locked`], behind
//! `Service::execute_locked`) and restarts of that log ([`FileService::restart_lock`]). Out:
//! the reply the ordered path would give for the same operation, the lock's state digest
//! D_L ([`FileService::lock_state_digest_of`]), and the members' real content, which the
//! merge (`locks.rs`) hands to the ordered state.
//!
//! An entry runs under `Scope::Lock`: the guards refuse every slot that is not one of the
//! lock's members, and since an operation reads everything it will change before its first
//! side effect, a refused entry has had no effect (it needs agreement). New objects take the
//! lowest free member slot (the pool), removed ones stay members as free slots; nothing
//! ordered moves: not the agreed time, not the free list, not the checkpoint records.
//!
//! Each lock keeps a record of the activation value of every member its entries changed,
//! saved copy-on-write at the first change (file data by reflink or copy under
//! `locks/<id>/<index>`, on btrfs too: snapshots are the ordered timeline's), kept in the
//! table and, between table saves, in the journal. With it `lock_restart` brings the members
//! back to their activation content at any time (after a restart, or a crash in the middle
//! of an entry), so the log can be replayed from its first entry. Activation values never
//! change, so a record only grows, until the merge drops it.

use super::checkpoint::{
    ensure_dir_durable, save_chunks, seq_name, unsaved_chunks_of, JournalEntry, SavedData, SavedObj,
};
use super::install::Target;
use super::locks::{LockEntry, LockId, LockState, Scope};
use super::object::{chunk_count, Obj, ObjectHeader, Slot, CHUNK_SIZE};
use super::ops::{self, FileType, FsError, FsOp, FsRequest, FsResult, Timespec};
use super::{backend, storage, FileService};
use crate::digest::{object_digest, piece_digest, Digest};
use crate::locking::LockedResult;
use crate::service::{ClientId, SeqNo, ServiceError};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::AsRawFd;

/// Where lock records keep saved file data: `locks/<lock id>/<index>` in the data directory.
const LOCKS_DIR: &[u8] = b"locks";

/// The activation values of the members a lock's entries changed.
#[derive(Clone, Debug)]
pub(super) struct LockRecord {
    /// The checkpoint that activated the lock: an ordered rollback below it undoes the
    /// activation, and restores the members first.
    pub activated_seq: SeqNo,
    pub saved: BTreeMap<u64, SavedObj>,
}

impl LockRecord {
    pub fn new(activated_seq: SeqNo) -> LockRecord {
        LockRecord {
            activated_seq,
            saved: BTreeMap::new(),
        }
    }
}

fn io_fs(e: io::Error) -> FsError {
    tracing::warn!(error = %e, "file service: backend failure under a lock");
    backend::fs_error(&e)
}

impl FileService {
    /// Runs entry `op` (an encoded [`FsRequest`]) of `lock`'s log for `client` at
    /// `time_ns`. See the module documentation; [`LockedResult::NeedsAgreement`] whenever the
    /// lock is not active here with its content, `client` is not its holder, the operation
    /// is one only the ordered path may run, or it reaches outside the lock.
    pub(super) fn run_locked(
        &mut self,
        lock: LockId,
        op: &[u8],
        client: ClientId,
        time_ns: u64,
    ) -> LockedResult {
        let Some(mut req) = ops::decode::<FsRequest>(op) else {
            // Executed as the ordered path would: refused, without effect.
            let refused: FsResult = Err(FsError::BadRequest);
            return LockedResult::Done(ops::encode(&refused));
        };
        if matches!(
            req.op,
            // The lock table is ordered state; statfs counts every object.
            FsOp::Lock { .. }
                | FsOp::Release { .. }
                | FsOp::Resolve { .. }
                | FsOp::Renew { .. }
                | FsOp::ListLocks
                | FsOp::StatFs { .. }
        ) || req.op.is_range_lock()
        {
            return LockedResult::NeedsAgreement;
        }
        let Some(e) = self.lock_table().and_then(|t| t.entry(lock)).cloned() else {
            return LockedResult::NeedsAgreement;
        };
        // A frozen lock still runs entries: the log server appends nothing new after a
        // freeze, but replays its log after a restart and fetches what a certified end says
        // it lacks, and those entries must run until the merge.
        if matches!(e.state, LockState::Pending)
            || e.holder != client
            || self.inconsistent
            || !self.content_ready(&e)
        {
            return LockedResult::NeedsAgreement;
        }
        if let Some(squash) = self.squash.get(&client) {
            req.caller = squash.apply(req.caller);
        }
        self.fds.get_mut().trim();
        self.scope = Scope::Lock {
            lock,
            root: e.root.index,
        };
        self.needs_agreement.set(false);
        self.pool_empty.set(false);
        let result = self.exec(&req, Timespec::from_nanos(time_ns));
        self.scope = Scope::Outside;
        if self.needs_agreement.take() {
            // The guard that refused came before any side effect, and its refusal must be
            // the result: an operation that went on could have acted on what it did not read.
            assert_eq!(
                result,
                Err(FsError::Locked),
                "{:?} went on past a refused guard under a lock",
                req.op
            );
            if self.pool_empty.take() {
                return LockedResult::PoolEmpty;
            }
            return LockedResult::NeedsAgreement;
        }
        // The changed members' digests are left stale (in `dirty`): the lock's digest reads
        // stale ones from the data when a seal or a merge asks, and the next checkpoint
        // refreshes them. Refreshing after every entry re-encoded a directory's whole header
        // per create in it: quadratic in a directory of thousands of entries.
        LockedResult::Done(ops::encode(&result))
    }

    /// Whether `e`'s content is here: a record exists (it was activated here, or its
    /// content was found equal to its base), or the members still hash to the base digest,
    /// in which case a record is started now. Otherwise the placeholders came by state
    /// transfer without the content, and entries cannot run.
    fn content_ready(&mut self, e: &LockEntry) -> bool {
        if self.lock_records.contains_key(&e.id) {
            return true;
        }
        let LockState::Active { activated_seq } = e.state else {
            return false;
        };
        if self.lock_state_digest_of(e.id) != Some(e.base) {
            return false;
        }
        self.lock_records
            .insert(e.id, LockRecord::new(activated_seq));
        true
    }

    /// D_L of `lock` as it is now, or `None` if its objects are not masked here (pending,
    /// merged, unknown, or in the middle of a state transfer) or its content is missing (no
    /// record, and the members do not hash to the base digest).
    pub(super) fn lock_state_digest_of(&self, lock: LockId) -> Option<Digest> {
        let e = self.lock_table()?.entry(lock)?;
        if e.state == LockState::Pending {
            return None;
        }
        let members = self.lock_members(lock);
        if members.len() as u64 != e.members as u64 {
            return None;
        }
        let d = match self.lock_digest(lock, e.epoch, &members) {
            Ok(d) => d,
            Err(err) => {
                tracing::warn!(lock = lock.0, error = %err, "file service: cannot digest a lock's objects");
                return None;
            }
        };
        (self.lock_records.contains_key(&lock) || d == e.base).then_some(d)
    }

    /// The slots masked by `lock`, in index order.
    pub(super) fn lock_members(&self, lock: LockId) -> Vec<u64> {
        self.masked
            .iter()
            .filter(|(_, l)| **l == lock)
            .map(|(i, _)| *i)
            .collect()
    }

    /// The lowest free member of `lock`: its pool, with the slots its entries freed.
    fn lock_free_slot(&self, lock: LockId) -> Option<u64> {
        self.masked
            .iter()
            .find(|(i, l)| **l == lock && self.slots[**i as usize].live().is_none())
            .map(|(i, _)| *i)
    }

    /// The check an operation that creates an object makes before its first side effect:
    /// under a lock, a free pool slot must be there for it (else the entry has no effect and
    /// answers `PoolEmpty`: the holder takes the lock again, with a fresh pool).
    pub(super) fn pool_check(&self) -> Result<(), FsError> {
        if let Scope::Lock { lock, .. } = self.scope {
            if self.lock_free_slot(lock).is_none() {
                self.needs_agreement.set(true);
                self.pool_empty.set(true);
                return Err(FsError::Locked);
            }
        }
        Ok(())
    }

    /// `touch` under a lock: the member's activation value goes into the lock's record the
    /// first time its entries change it (journaled before the change, like an ordered save);
    /// the ordered checkpoint records are not involved.
    pub(super) fn lock_touch(&mut self, lock: LockId, i: u64) -> Result<(), FsError> {
        self.mark_unsaved()?;
        let known = self
            .lock_records
            .get(&lock)
            .is_some_and(|r| r.saved.contains_key(&i));
        if !known {
            let header = self.real_header_of(i).encode();
            let pieces = self.real_pieces_now(i).map_err(io_fs)?;
            let size = match &self.slots[i as usize] {
                Slot::Live(o) if o.kind == FileType::Regular => o.size,
                _ => 0,
            };
            let data = if size == 0 {
                SavedData::Nothing
            } else {
                SavedData::Chunks(BTreeSet::new())
            };
            let saved = SavedObj {
                header,
                pieces,
                size,
                data,
            };
            let Some(rec) = self.lock_records.get_mut(&lock) else {
                panic!("an entry of lock {} ran without its record", lock.0)
            };
            rec.saved.insert(i, saved.clone());
            self.journal_append(&JournalEntry::LockSaved {
                lock,
                index: i,
                saved,
            })?;
        }
        self.dirty.insert(i);
        Ok(())
    }

    /// `touch_data` under a lock: the chunks of member `i` in `start..end` as they were at
    /// activation, saved into the lock's record before they change.
    pub(super) fn lock_touch_data(
        &mut self,
        lock: LockId,
        i: u64,
        start: u64,
        end: u64,
    ) -> Result<(), FsError> {
        self.lock_touch(lock, i)?;
        let chunks = self
            .lock_records
            .get(&lock)
            .and_then(|r| r.saved.get(&i))
            .map_or_else(Vec::new, |s| unsaved_chunks_of(s, start, end));
        if chunks.is_empty() {
            return Ok(());
        }
        let fd = self.file_fd(i).map_err(io_fs)?;
        let locks = ensure_dir_durable(self.meta_fd.as_raw_fd(), LOCKS_DIR, true).map_err(io_fs)?;
        let dir = ensure_dir_durable(locks.as_raw_fd(), &seq_name(lock.0), true).map_err(io_fs)?;
        let Some(s) = self
            .lock_records
            .get_mut(&lock)
            .and_then(|r| r.saved.get_mut(&i))
        else {
            return Ok(());
        };
        save_chunks(&self.ckpt.reflink, dir.as_raw_fd(), i, s, fd, chunks).map_err(io_fs)?;
        let saved = s.clone();
        self.journal_append(&JournalEntry::LockSaved {
            lock,
            index: i,
            saved,
        })
    }

    /// `alloc` under a lock: the lowest free member, with the next generation.
    pub(super) fn lock_alloc(&mut self, lock: LockId, mut obj: Obj) -> Result<u64, FsError> {
        let Some(i) = self.lock_free_slot(lock) else {
            panic!(
                "a create under lock {} passed its pool check and found no slot",
                lock.0
            )
        };
        self.touch(i)?;
        obj.generation = self.slots[i as usize].generation() + 1;
        obj.pieces = vec![Digest::default(); 1 + obj.chunks() as usize];
        self.fds.get_mut().forget(i);
        self.slots[i as usize] = Slot::Live(Box::new(obj));
        self.dirty.insert(i);
        Ok(i)
    }

    /// `release` under a lock: the slot stays a member, free, for the lock's next create;
    /// the ordered free list (and its slots' successors) is not touched.
    pub(super) fn lock_release(&mut self, i: u64) -> Result<(), FsError> {
        self.touch(i)?;
        let generation = self.slots[i as usize].generation();
        self.slots[i as usize] = Slot::Free { generation };
        self.fds.get_mut().forget(i);
        Ok(())
    }

    /// Brings `lock`'s members back to their activation content (see the module
    /// documentation); the ordered state is untouched. Without a record there is nothing to
    /// restore: the lock is not active here, or its content is missing (then
    /// `lock_state_digest` says `None`, and only the merge followed by a state transfer
    /// repairs it).
    pub(super) fn restart_lock(&mut self, lock: LockId) -> Result<(), ServiceError> {
        if !self.lock_records.contains_key(&lock) {
            if self.lock_table().and_then(|t| t.entry(lock)).is_some()
                && self.lock_state_digest_of(lock).is_none()
            {
                tracing::warn!(
                    lock = lock.0,
                    "file service: lock restart without the lock's content here"
                );
            }
            return Ok(());
        }
        let items = self.restart_items(lock)?;
        if items.is_empty() {
            return Ok(());
        }
        let slots: Vec<u64> = items.keys().copied().collect();
        self.install(items, false)?;
        self.remask(lock, &slots);
        self.refresh_lock_members(lock);
        Ok(())
    }

    /// What `restart_lock` installs: the activation value of every member the lock's
    /// entries changed (only slots it still masks: after a state transfer that merged it
    /// elsewhere, the others are ordered objects again). Their nodes' data is marked stale:
    /// after a crash it may differ from the chunk digests the table holds, so every chunk
    /// is written again, not only those whose digests differ.
    pub(super) fn restart_items(
        &mut self,
        lock: LockId,
    ) -> Result<BTreeMap<u64, Option<Target>>, ServiceError> {
        let saved: Vec<(u64, SavedObj)> = match self.lock_records.get(&lock) {
            Some(rec) => rec
                .saved
                .iter()
                .filter(|(i, _)| self.masked.get(i) == Some(&lock))
                .map(|(i, s)| (*i, s.clone()))
                .collect(),
            None => Vec::new(),
        };
        let mut items = BTreeMap::new();
        for (i, s) in &saved {
            let header: ObjectHeader =
                ops::decode(&s.header).ok_or_else(|| ServiceError::BadObject {
                    index: *i,
                    why: "a lock record's header does not decode".into(),
                })?;
            let chunks = self.activation_chunks(lock, *i, &header, s)?;
            items.insert(*i, Some(Target { header, chunks }));
        }
        for (i, _) in &saved {
            if let Some(o) = self.slots[*i as usize].live_mut() {
                o.dirty_chunks = (1..=o.chunks() as u32).collect();
            }
        }
        Ok(items)
    }

    /// After installing `slots` of `lock`'s restart: they are its members again (an install
    /// unmasks what it installs).
    pub(super) fn remask(&mut self, lock: LockId, slots: &[u64]) {
        for &i in slots {
            self.masked.insert(i, lock);
            self.free.remove(&i);
            self.dirty.insert(i);
        }
    }

    /// The node of live object `i` opened for reading, wherever it is: under its first
    /// name, or among the orphans, where crash recovery puts a known node it found inside
    /// a directory the table does not know.
    fn open_live_node(&self, i: u64) -> io::Result<std::os::fd::OwnedFd> {
        let name = seq_name(i);
        if self.orphans.contains(&i) {
            let orphans = backend::open_dir_at(self.tree_fd.as_raw_fd(), b"orphans")?;
            return backend::openat(orphans.as_raw_fd(), &name, libc::O_RDONLY, 0);
        }
        let (dfd, name) = self.location(i)?;
        backend::openat(dfd, &name, libc::O_RDONLY, 0)
    }

    /// The data chunks of member `i`'s activation value `s` (header `header`): saved ones
    /// from the record's file, the others from the live file, which still holds them (a
    /// file is saved whole before it is freed, so a partly saved one has lived throughout).
    fn activation_chunks(
        &self,
        lock: LockId,
        i: u64,
        header: &ObjectHeader,
        s: &SavedObj,
    ) -> Result<Vec<Vec<u8>>, ServiceError> {
        let size = match header.live() {
            Some(l) if l.kind == FileType::Regular => l.size,
            _ => return Ok(Vec::new()),
        };
        self.activation_chunk_range(lock, i, size, Some(&s.data), 0..chunk_count(size))
    }

    /// Chunks `range` of member `i`'s activation value, a file of `size` bytes. `data` says
    /// which chunks the lock's record saved; `None`: the lock never changed the member, and
    /// the live file is its activation value.
    pub(super) fn activation_chunk_range(
        &self,
        lock: LockId,
        i: u64,
        size: u64,
        data: Option<&SavedData>,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<Vec<u8>>, ServiceError> {
        let saved_file = match data {
            // Touched (its header) but no chunk saved yet: no file was made for it, and
            // every chunk is still in the live file.
            None | Some(SavedData::Nothing) => None,
            Some(SavedData::Chunks(have)) if have.is_empty() => None,
            Some(_) => {
                let locks = backend::open_dir_at(self.meta_fd.as_raw_fd(), LOCKS_DIR)?;
                let dir = backend::open_dir_at(locks.as_raw_fd(), &seq_name(lock.0))?;
                Some(backend::openat(
                    dir.as_raw_fd(),
                    &seq_name(i),
                    libc::O_RDONLY,
                    0,
                )?)
            }
        };
        let mut live = None;
        let mut chunks = Vec::new();
        for c in range {
            let saved = match data {
                Some(SavedData::Whole) => true,
                Some(SavedData::Chunks(have)) => have.contains(&c),
                Some(SavedData::Nothing) | None => false,
            };
            let fd = match (&saved_file, saved) {
                (Some(f), true) => f.as_raw_fd(),
                _ => {
                    if live.is_none() {
                        live = Some(self.open_live_node(i)?);
                    }
                    live.as_ref().map_or(-1, |f| f.as_raw_fd())
                }
            };
            let start = c * CHUNK_SIZE;
            let len = CHUNK_SIZE.min(size - start) as usize;
            let mut buf = vec![0u8; len];
            if backend::pread_full(fd, &mut buf, start)? != len {
                return Err(storage(io::Error::other(format!(
                    "lock {} object {i}: activation data shorter than its size",
                    lock.0
                ))));
            }
            chunks.push(buf);
        }
        Ok(chunks)
    }

    /// Recomputes the digests of `lock`'s changed members, so that its state digest is
    /// cheap to ask for. A failure leaves them stale (D_L then reads the data itself).
    pub(super) fn refresh_lock_members(&mut self, lock: LockId) {
        let stale: Vec<u64> = self
            .dirty
            .iter()
            .copied()
            .filter(|i| self.masked.get(i) == Some(&lock))
            .collect();
        self.encoded.resize(self.slots.len(), Vec::new());
        let mut buf = Vec::new();
        for i in stale {
            if let Err(e) = self.refresh_object(i, &mut buf) {
                tracing::warn!(object = i, error = %e, "file service: cannot digest a locked object");
                return;
            }
            self.dirty.remove(&i);
        }
    }

    /// The piece digests of slot `i`'s real value now, read from the data where they are
    /// stale (the same digests `refresh_object` would compute, without storing them).
    fn real_pieces_now(&self, i: u64) -> io::Result<Vec<Digest>> {
        let header = self.real_header_of(i).encode();
        let h0 = piece_digest(i, 0, &header);
        let Slot::Live(o) = &self.slots[i as usize] else {
            return Ok(vec![h0]);
        };
        let want = 1 + o.chunks() as usize;
        let mut pieces = o.pieces.clone();
        let mut stale = o.dirty_chunks.clone();
        if pieces.len() != want {
            stale.extend((pieces.len().max(1)..want).map(|p| p as u32));
            pieces.resize(want, Digest::default());
        }
        pieces[0] = h0;
        let mut buf = Vec::new();
        for &p in stale.range(1..want as u32) {
            let start = (p as u64 - 1) * CHUNK_SIZE;
            let len = CHUNK_SIZE.min(o.size - start) as usize;
            buf.resize(len, 0);
            if backend::pread_full(self.file_fd(i)?, &mut buf, start)? != len {
                return Err(io::Error::other(format!(
                    "object {i}: backend file shorter than its size"
                )));
            }
            pieces[p as usize] = piece_digest(i, p, &buf);
        }
        Ok(pieces)
    }

    /// The object digest of slot `i`'s real value now.
    pub(super) fn real_digest_now(&self, i: u64) -> io::Result<Digest> {
        if !self.dirty.contains(&i) {
            match &self.slots[i as usize] {
                Slot::Live(o)
                    if o.dirty_chunks.is_empty() && o.pieces.len() == 1 + o.chunks() as usize =>
                {
                    return Ok(object_digest(i, &o.pieces));
                }
                Slot::Free { .. } => {
                    let bytes = self.real_header_of(i).encode();
                    return Ok(object_digest(i, &[piece_digest(i, 0, &bytes)]));
                }
                Slot::Live(_) => {}
            }
        }
        Ok(object_digest(i, &self.real_pieces_now(i)?))
    }

    /// Forgets `lock`'s record; its saved data goes once the table no longer lists it.
    pub(super) fn drop_lock_record(&mut self, lock: LockId) {
        if self.lock_records.remove(&lock).is_some() {
            self.doomed_lock_records.push(lock);
        }
    }

    /// Drops the records of locks that mask nothing any more (merged, undone, or replaced
    /// by a state transfer).
    pub(super) fn prune_lock_records(&mut self) {
        let live: BTreeSet<LockId> = self.masked.values().copied().collect();
        let gone: Vec<LockId> = self
            .lock_records
            .keys()
            .copied()
            .filter(|l| !live.contains(l))
            .collect();
        for l in gone {
            self.drop_lock_record(l);
        }
    }

    /// Removes the saved data of dropped records (after the table that forgot them is
    /// durable: until then a crash brings them back).
    pub(super) fn remove_doomed_lock_records(&mut self) {
        let doomed = std::mem::take(&mut self.doomed_lock_records);
        if doomed.is_empty() {
            return;
        }
        if let Ok(dir) = backend::open_dir_at(self.meta_fd.as_raw_fd(), LOCKS_DIR) {
            // A lock activated again since (after a rollback undid it) has a new record,
            // whose files these now are.
            for l in doomed
                .into_iter()
                .filter(|l| !self.lock_records.contains_key(l))
            {
                let _ = backend::remove_tree_at(dir.as_raw_fd(), &seq_name(l.0));
            }
        }
    }

    /// After a load: saved data of records the table does not list (dropped just before a
    /// crash) goes.
    pub(super) fn remove_stray_lock_records(&mut self) {
        let Ok(dir) = backend::open_dir_at(self.meta_fd.as_raw_fd(), LOCKS_DIR) else {
            return;
        };
        let Ok(names) = backend::list_dir(dir.as_raw_fd()) else {
            return;
        };
        for name in names {
            let kept = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|l| self.lock_records.contains_key(&LockId(l)));
            if !kept {
                let _ = backend::remove_tree_at(dir.as_raw_fd(), &name);
            }
        }
    }

    /// A journaled lock save, found again after a crash. A later entry for one object
    /// replaces an earlier one (it names more saved chunks).
    pub(super) fn replay_lock_saved(&mut self, lock: LockId, index: u64, saved: SavedObj) {
        let activated_seq = match self
            .lock_table()
            .and_then(|t| t.entry(lock))
            .map(|e| e.state)
        {
            Some(LockState::Active { activated_seq }) => activated_seq,
            _ => 0,
        };
        self.lock_records
            .entry(lock)
            .or_insert_with(|| LockRecord::new(activated_seq))
            .saved
            .insert(index, saved);
    }

    /// Marks the state inconsistent (requests answer `Io`) if an ordered directory names,
    /// or an ordered object's parent is, a slot that holds no object: what a merge of
    /// content this replica lacked leaves, until a state transfer installs the merged
    /// objects (`install` then judges consistency again). Masked directories are the
    /// lock's business and are not looked into.
    pub(super) fn check_consistency(&mut self) {
        let n = self.slots.len() as u64;
        let holds = |j: u64| {
            j < n && (self.masked.contains_key(&j) || self.slots[j as usize].live().is_some())
        };
        let dangling = self.slots.iter().enumerate().any(|(d, s)| {
            if self.masked.contains_key(&(d as u64)) {
                return false;
            }
            s.live().is_some_and(|o| {
                !holds(o.parent) || o.entries.values().any(|&j| j == 0 || !holds(j))
            })
        });
        if dangling {
            tracing::error!(
                "file service: directories name objects this replica does not have; requests \
                 answer Io until state transfer repairs the state"
            );
            self.inconsistent = true;
        }
    }
}
