//! The file service: NFS-like operations over abstract objects, implemented by a conformance
//! wrapper over a real local directory.
//!
//! In: [`FsRequest`]s (through [`FileService::apply`] or the [`Service`] upcalls) with the agreed
//! time. Out: canonical [`FsResult`]s and an abstract state (an array of objects, see
//! [`object`]) that is byte-identical on every backend.
//!
//! Layout of a replica's data directory:
//! - `tree/root/`: the concrete mirror tree (real directories, files and symlinks under the
//!   names clients chose; device nodes, fifos and sockets are empty placeholder files).
//!   `tree/` is a btrfs subvolume when the data directory is on btrfs; `tree/stage/` and
//!   `tree/orphans/` are work areas of `put_objs`.
//! - `table`: the wrapper's table (every object's header and piece digests, and the kept
//!   checkpoint records), replaced atomically at every checkpoint and on [`FileService::flush`].
//! - `cow/<seq>/<index>`: copy-on-write saves of file data modified after checkpoint `seq`
//!   (reflinked where the file system supports it); on btrfs, `snapshots/<seq>` instead (a
//!   read-only snapshot of `tree/`; the headers as of `seq` are in the table's records).
//!
//! - `locks/<lock>/<index>`: the file data a lock's entries changed, as it was when the lock
//!   activated (copy-on-write saves of the lock timeline, on btrfs too; see
//!   `lock_timeline.rs`), until the lock merges.
//! - `journal`: the copy-on-write saves made since the table was last written (an undo log;
//!   each entry, and the saved chunks it names, is fsync'ed before the change it protects is
//!   made, so it covers a power loss as well as a process crash); `dirty` exists while the
//!   tree is ahead of the saved table (also made durable before the first change).
//! - `journal.v2`: only while a data directory is upgraded from table version 2 (see
//!   `upgrade_v2.rs`).
//!
//! After [`FileService::open`] on an existing directory:
//! - if a checkpoint is kept, the state is exactly that of the newest one, whether the last
//!   run ended cleanly (a later flushed state is rolled back to it) or crashed (on btrfs the
//!   tree comes back from the snapshot; otherwise the journal completes the checkpoint record,
//!   nodes are found again by inode number, and the rollback restores the checkpoint), because
//!   the replica replays its log from that checkpoint;
//! - without checkpoints, it is the last flushed (or dropped) state; after a crash the tree is
//!   reconciled with that table by name and data that changed since is kept as found (its
//!   digest then differs: exactness needs a checkpoint).
//!
//! A process that wants crash-exact restarts without replicas (the unreplicated mode) takes a
//! checkpoint instead of a flush, discards the older ones, and logs the requests after it.

pub mod backend;
mod checkpoint;
mod exec;
mod install;
mod lock_timeline;
mod lock_transfer;
pub mod locks;
pub mod object;
pub mod ops;
pub mod range_locks;
mod scrub;
mod upgrade_v2;

pub use ops::*;

use crate::digest::{object_digest, piece_digest, Digest, PartitionTree};
use crate::locking::{LockCertChecker, LockEvent, LockedResult};
use crate::service::{AbstractObject, ClientId, RequestPolicy, SeqNo, Service, ServiceError};
use checkpoint::Checkpoints;
use locks::{LockId, Scope};
use object::{chunk_count, Obj, ObjectHeader, Slot, CHUNK_SIZE};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest clock skew a backup accepts between the primary's proposed time and its own clock.
pub const TIME_SKEW_MAX_NS: u64 = 5 * 60 * 1_000_000_000;

/// Open descriptors for directories and files, so that a request costs one `*at` call rather
/// than a walk from the root. Bounded; trimmed only between requests so that a descriptor
/// handed out during a request stays open until it ends.
struct FdCache {
    dirs: HashMap<u64, OwnedFd>,
    files: HashMap<u64, OwnedFd>,
    /// Per-cache bound: a quarter of the open-file limit, at most 4096.
    max: usize,
}

impl Default for FdCache {
    fn default() -> Self {
        FdCache {
            dirs: HashMap::new(),
            files: HashMap::new(),
            max: 64,
        }
    }
}

/// Raises the soft limit on open files to the hard limit (capped at 65536) and returns the
/// bound for each descriptor cache: a quarter of the limit, at most 4096.
fn raise_fd_limit() -> usize {
    // SAFETY: `lim` is plain data filled in by getrlimit.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 64;
    }
    let want = lim.rlim_max.min(65_536);
    if lim.rlim_cur < want {
        let mut raised = lim;
        raised.rlim_cur = want;
        // SAFETY: valid pointer; failure only leaves the old limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    ((lim.rlim_cur / 4) as usize).clamp(16, 4096)
}

impl FdCache {
    fn trim(&mut self) {
        // Which descriptors are dropped never affects results, only speed.
        if self.dirs.len() > self.max {
            self.dirs.clear();
        }
        if self.files.len() > self.max {
            self.files.clear();
        }
    }
    fn forget(&mut self, index: u64) {
        self.dirs.remove(&index);
        self.files.remove(&index);
    }
}

/// The file service over one replica's data directory. See the module documentation.
pub struct FileService {
    data_dir: PathBuf,
    /// `data_dir` itself.
    meta_fd: OwnedFd,
    /// `data_dir/tree`: a btrfs subvolume where possible, holding `root/` and the work areas
    /// `stage/` and `orphans/` (inside it so that moves between them never cross a subvolume).
    tree_fd: OwnedFd,
    /// `data_dir/tree/root`, the concrete root directory (abstract index 0).
    root_fd: OwnedFd,
    slots: Vec<Slot>,
    /// Free slots; allocation takes the lowest.
    free: BTreeSet<u64>,
    tree: PartitionTree,
    /// Objects whose digests must be recomputed before the root is next asked for.
    dirty: BTreeSet<u64>,
    fds: RefCell<FdCache>,
    ckpt: Checkpoints,
    /// Whether the state changed since the table was last saved (then `data_dir/dirty` exists).
    unsaved: bool,
    /// Live objects named by no directory (only between partial `put_objs` calls); their
    /// nodes wait in `data_dir/orphans/<index>`.
    orphans: BTreeSet<u64>,
    /// Set while a partial `put_objs` left directory entries and objects out of step;
    /// requests are refused until it is cleared.
    inconsistent: bool,
    /// A lock merged here with content its certified end does not vouch for (see
    /// `Service::state_suspect`); cleared by `put_objs`.
    merge_suspect: bool,
    /// `data_dir/journal`, open for appending while the newest checkpoint record has entries
    /// the saved table does not.
    journal: Option<OwnedFd>,
    /// Journal entries gathered by [`FileService::with_batched_journal`], written with one
    /// fsync when it ends.
    journal_batch: Option<Vec<u8>>,
    /// Objects whose nodes sit in `tree/stage/<index>` (only during `put_objs`).
    staged: BTreeSet<u64>,
    /// Each slot's encoded header as of its last digest refresh (valid for slots not in
    /// `dirty`), so saving the table does not encode every object again.
    encoded: Vec<Vec<u8>>,
    /// Where the next checkpoint's scrub continues (see [`scrub`]).
    scrub_next: u64,
    corruptions_found: u64,
    /// Identity mapping per client (absent: [`Squash::None`]); configuration, not state.
    squash: BTreeMap<ClientId, Squash>,
    /// Slots masked by an active (or frozen, not yet merged) lock: their ordered value is
    /// the placeholder `Locked{lock}`, while `slots` keeps their real value. Derived from
    /// the ordered state (the placeholders), so rollback, state transfer and reloads rebuild
    /// it from headers; see `locks.rs`.
    masked: BTreeMap<u64, LockId>,
    /// Who runs the current request (guarded accessors).
    scope: Scope,
    /// The first lock a guard refused during the current request.
    lock_hit: Cell<Option<LockId>>,
    /// Set when a guard refused a locked entry (a slot outside its lock, or no pool slot).
    needs_agreement: Cell<bool>,
    /// Set with `needs_agreement` when the refusal was the lock's pool running out.
    pool_empty: Cell<bool>,
    /// Each active lock's record of activation values (see `lock_timeline.rs`); lock-timeline
    /// state, persisted with the table.
    lock_records: BTreeMap<LockId, lock_timeline::LockRecord>,
    /// Records dropped since the table was last saved, whose saved data goes at the next save.
    doomed_lock_records: Vec<LockId>,
    /// Lock events not yet taken by `take_lock_events`.
    lock_events: Vec<LockEvent>,
    /// Checks release certificates (configuration from the replica, not state).
    cert_checker: Option<Arc<dyn LockCertChecker>>,
}

impl std::fmt::Debug for FileService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileService")
            .field("data_dir", &self.data_dir)
            .field("objects", &self.slots.len())
            .finish()
    }
}

/// Canonical validation of a name: the error it gets, if any.
pub fn name_error(name: &[u8]) -> Option<FsError> {
    if name.len() > object::NAME_MAX {
        Some(FsError::NameTooLong)
    } else if name.is_empty()
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
        || name.contains(&0)
    {
        Some(FsError::Inval)
    } else {
        None
    }
}

fn storage(e: io::Error) -> ServiceError {
    ServiceError::Storage(e)
}

impl FileService {
    /// Sets how each client's stated identity is mapped (see [`Squash`]). Every replica of a
    /// cluster must be given the same map (it comes from the shared cluster config), or they
    /// would answer differently.
    pub fn set_squash(&mut self, squash: BTreeMap<ClientId, Squash>) {
        self.squash = squash;
        self.squash.retain(|_, s| !s.is_none());
    }

    /// Creates (if empty or missing) or reopens a replica's data directory.
    pub fn open(data_dir: &Path) -> Result<FileService, ServiceError> {
        let fd_cache_max = raise_fd_limit();
        std::fs::create_dir_all(data_dir)?;
        let meta_fd = backend::open_path(data_dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let fresh = !data_dir.join("table").exists();
        if fresh {
            // A leftover tree from a run that never saved its table is discarded.
            for d in [&b"tree"[..], b"cow", b"snapshots", b"locks"] {
                remove_any_at(meta_fd.as_raw_fd(), d)?;
            }
            // On btrfs the tree is a subvolume, so checkpoints can be snapshots.
            if backend::btrfs_subvol_create(meta_fd.as_raw_fd(), b"tree").is_err() {
                backend::mkdirat(meta_fd.as_raw_fd(), b"tree")?;
            }
            let tree = backend::open_dir_at(meta_fd.as_raw_fd(), b"tree")?;
            backend::mkdirat(tree.as_raw_fd(), b"root")?;
        }
        let tree_fd = backend::open_dir_at(meta_fd.as_raw_fd(), b"tree")?;
        let root_fd = backend::open_dir_at(tree_fd.as_raw_fd(), b"root")?;
        let snapshot_mode = backend::is_btrfs_subvolume(tree_fd.as_raw_fd());
        let mut svc = FileService {
            data_dir: data_dir.to_path_buf(),
            meta_fd,
            tree_fd,
            root_fd,
            slots: Vec::new(),
            free: BTreeSet::new(),
            tree: PartitionTree::new(),
            dirty: BTreeSet::new(),
            fds: RefCell::new(FdCache {
                max: fd_cache_max,
                ..FdCache::default()
            }),
            ckpt: Checkpoints::new(snapshot_mode),
            unsaved: false,
            orphans: BTreeSet::new(),
            squash: BTreeMap::new(),
            inconsistent: false,
            merge_suspect: false,
            journal: None,
            journal_batch: None,
            staged: BTreeSet::new(),
            encoded: Vec::new(),
            scrub_next: 0,
            corruptions_found: 0,
            masked: BTreeMap::new(),
            scope: Scope::Outside,
            lock_hit: Cell::new(None),
            needs_agreement: Cell::new(false),
            pool_empty: Cell::new(false),
            lock_records: BTreeMap::new(),
            doomed_lock_records: Vec::new(),
            lock_events: Vec::new(),
            cert_checker: None,
        };
        if fresh {
            svc.init_root();
            svc.save_table()?;
        } else {
            svc.load()?;
        }
        Ok(svc)
    }

    fn init_root(&mut self) {
        let ino = backend::fstat(self.root_fd.as_raw_fd())
            .map(|st| st.st_ino)
            .unwrap_or(0);
        let root = Obj::new_root(ino);
        self.slots = vec![Slot::Live(Box::new(root))];
        self.dirty.insert(0);
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether checkpoints are btrfs snapshots (otherwise copy-on-write saves).
    pub fn uses_snapshots(&self) -> bool {
        self.ckpt.snapshot_mode
    }

    /// Runs one request with the agreed time `now_ns`: the direct, unreplicated entry point.
    /// Same semantics as [`Service::execute`] with `ops::encode(req)` and `encode(&now_ns)`.
    pub fn apply(&mut self, req: &FsRequest, now_ns: u64) -> FsResult {
        self.apply_inner(req, ClientId(0), now_ns, true)
    }

    /// [`Self::apply`] on behalf of `client` (lock holders are clients, not users).
    pub fn apply_as(&mut self, client: ClientId, req: &FsRequest, now_ns: u64) -> FsResult {
        self.apply_inner(req, client, now_ns, true)
    }

    /// A read-only request on the unordered path, as [`Service::execute`] runs it.
    pub fn apply_read_only(&mut self, req: &FsRequest, now_ns: u64) -> FsResult {
        if !req.op.is_read_only() {
            return Err(FsError::BadRequest);
        }
        self.apply_inner(req, ClientId(0), now_ns, false)
    }

    /// `ordered`: the time is an agreed value and becomes the newest agreed time. Read-only
    /// requests run unordered with each replica's own notion of time, so they must not move it.
    fn apply_inner(
        &mut self,
        req: &FsRequest,
        client: ClientId,
        now_ns: u64,
        ordered: bool,
    ) -> FsResult {
        if self.inconsistent {
            // Only reachable in the middle of a state transfer.
            return Err(FsError::Io);
        }
        self.fds.get_mut().trim();
        // The agreed value is only a proposal for the time: what a request sees is never
        // earlier than what earlier requests saw, computed the same way on every replica
        // because they execute the same sequence.
        let last_time = self.last_time();
        let now_ns = if ordered {
            now_ns.max(last_time)
        } else {
            now_ns
        };
        if ordered && now_ns != last_time {
            // Through `touch`, like any change to an object, so the checkpoint keeps the old value.
            self.touch(0)?;
            self.live_mut(0).agreed_time = now_ns;
        }
        self.scope = if ordered {
            Scope::Ordered { client, now_ns }
        } else {
            Scope::ReadOnly
        };
        self.lock_hit.set(None);
        let result = self.exec(req, Timespec::from_nanos(now_ns));
        self.scope = Scope::Outside;
        if let Some(lock) = self.lock_hit.take() {
            // A guard's refusal must reach the reply: an operation that went on after one
            // could have acted on what it did not read.
            assert_eq!(
                result,
                Err(FsError::Locked),
                "{:?} passed a refused guard",
                req.op
            );
            if ordered {
                self.freeze_on_conflict(lock, client, now_ns)?;
            }
        }
        result
    }

    /// The newest agreed time (ns since the epoch), kept in the root object (see
    /// [`Obj::agreed_time`]).
    fn last_time(&self) -> u64 {
        self.slots
            .first()
            .and_then(Slot::live)
            .map_or(0, |root| root.agreed_time)
    }

    /// The root digest of the current state (recomputes the digests of changed objects).
    pub fn root_digest(&mut self) -> Result<Digest, ServiceError> {
        self.refresh_digests()?;
        Ok(self.tree.root())
    }

    /// Drops the service the way a crash would: nothing is saved, descriptors are closed.
    /// For tests of recovery.
    #[doc(hidden)]
    pub fn simulate_crash(mut self) {
        self.unsaved = false;
    }

    /// Saves the table (and syncs the tree) so that a reopen without checkpoints finds this
    /// state. Also done on drop.
    pub fn flush(&mut self) -> Result<(), ServiceError> {
        self.save_table()
    }

    // ----- table helpers -----

    /// The live object a handle names, or `Stale` (`Locked` if it is masked: its generation
    /// is lock-timeline state).
    fn obj(&self, h: Handle) -> Result<&Obj, FsError> {
        self.guard(h.index)?;
        match self.slots.get(h.index as usize) {
            Some(Slot::Live(o)) if o.generation == h.generation => Ok(o),
            _ => Err(FsError::Stale),
        }
    }

    /// A live object by index. Only called on indices the table itself references.
    fn live(&self, i: u64) -> &Obj {
        self.assert_in_scope(i);
        match self.slots.get(i as usize) {
            Some(Slot::Live(o)) => o,
            _ => panic!("table invariant broken: object {i} referenced but not live"),
        }
    }

    fn live_mut(&mut self, i: u64) -> &mut Obj {
        match self.slots.get_mut(i as usize) {
            Some(Slot::Live(o)) => o,
            _ => panic!("table invariant broken: object {i} referenced but not live"),
        }
    }

    fn handle_of(&self, i: u64) -> Handle {
        self.assert_in_scope(i);
        Handle {
            index: i,
            generation: self.slots[i as usize].generation(),
        }
    }

    /// Called before object `i` changes: saves its checkpoint value once and marks its
    /// digest stale. Under a lock the value saved is the member's activation value, into the
    /// lock's record: the ordered checkpoint records never see a locked change.
    fn touch(&mut self, i: u64) -> Result<(), FsError> {
        self.assert_in_scope(i);
        if let Scope::Lock { lock, .. } = self.scope {
            return self.lock_touch(lock, i);
        }
        self.mark_unsaved()?;
        if self.ckpt.needs_save(i) {
            let (header, pieces) = self.header_and_pieces(i);
            let size = match &self.slots[i as usize] {
                // A placeholder has no data to save.
                _ if self.masked.contains_key(&i) => 0,
                Slot::Live(o) if o.kind == FileType::Regular => o.size,
                _ => 0,
            };
            self.ckpt.save_header(i, header, pieces, size);
            self.journal_saved(i)?;
        }
        self.dirty.insert(i);
        Ok(())
    }

    fn mark_unsaved(&mut self) -> Result<(), FsError> {
        if !self.unsaved {
            match backend::create_file_at(self.meta_fd.as_raw_fd(), b"dirty") {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(backend::fs_error(&e)),
            }
            // Without the marker on disk, a reopen after a power loss would trust the saved
            // table and skip crash recovery over a tree that moved on. Once per table save.
            backend::fsync(self.meta_fd.as_raw_fd()).map_err(|e| backend::fs_error(&e))?;
            self.unsaved = true;
        }
        Ok(())
    }

    /// Saves the data of file `i` in `range` (as of the newest checkpoint) before it changes.
    fn touch_data(&mut self, i: u64, start: u64, end: u64) -> Result<(), FsError> {
        if let Scope::Lock { lock, .. } = self.scope {
            self.assert_in_scope(i);
            return self.lock_touch_data(lock, i, start, end);
        }
        self.touch(i)?;
        if self.ckpt.needs_data_save(i, start, end) {
            let fd = self.file_fd(i).map_err(|e| backend::fs_error(&e))?;
            self.ckpt
                .save_data(&self.meta_fd, i, fd, start, end)
                .map_err(|e| backend::fs_error(&e))?;
            self.journal_saved(i)?;
        }
        Ok(())
    }

    /// The encoded header and the (clean, since the object is unchanged since the checkpoint)
    /// piece digests of object `i`.
    fn header_and_pieces(&self, i: u64) -> (Vec<u8>, Vec<Digest>) {
        if let Some(&lock) = self.masked.get(&i) {
            let bytes = ObjectHeader::Locked { lock }.encode();
            let d = piece_digest(i, 0, &bytes);
            return (bytes, vec![d]);
        }
        match &self.slots[i as usize] {
            Slot::Free { generation } => {
                let bytes = ObjectHeader::Free {
                    generation: *generation,
                    next_free: self.next_free(i),
                }
                .encode();
                let d = piece_digest(i, 0, &bytes);
                (bytes, vec![d])
            }
            Slot::Live(o) => (o.header().encode(), o.pieces.clone()),
        }
    }

    fn next_free(&self, i: u64) -> Option<u64> {
        self.free.range(i + 1..).next().copied()
    }

    /// Object `i`'s header as the ordered state sees it (a placeholder if masked).
    fn header_of(&self, i: u64) -> ObjectHeader {
        match self.masked.get(&i) {
            Some(&lock) => ObjectHeader::Locked { lock },
            None => self.real_header_of(i),
        }
    }

    /// Object `i`'s own header, masked or not. A masked free slot (a lock's pool slot) is
    /// outside the ordered free list, so it has no successor.
    fn real_header_of(&self, i: u64) -> ObjectHeader {
        match &self.slots[i as usize] {
            Slot::Free { generation } => ObjectHeader::Free {
                generation: *generation,
                next_free: if self.masked.contains_key(&i) {
                    None
                } else {
                    self.next_free(i)
                },
            },
            Slot::Live(o) => o.header(),
        }
    }

    /// Takes the lowest free slot (or a new one) for `obj`.
    fn alloc(&mut self, mut obj: Obj) -> Result<u64, FsError> {
        if let Scope::Lock { lock, .. } = self.scope {
            return self.lock_alloc(lock, obj);
        }
        let i = match self.free.iter().next().copied() {
            Some(i) => {
                self.touch(i)?;
                self.free.remove(&i);
                obj.generation = self.slots[i as usize].generation() + 1;
                i
            }
            None => {
                self.mark_unsaved()?;
                let i = self.slots.len() as u64;
                self.slots.push(Slot::Free { generation: 0 });
                obj.generation = 1;
                i
            }
        };
        obj.pieces = vec![Digest::default(); 1 + obj.chunks() as usize];
        self.fds.get_mut().forget(i);
        self.slots[i as usize] = Slot::Live(Box::new(obj));
        self.dirty.insert(i);
        Ok(i)
    }

    /// Returns slot `i` to the free list (its concrete node is already gone).
    fn release(&mut self, i: u64) -> Result<(), FsError> {
        if let Scope::Lock { .. } = self.scope {
            return self.lock_release(i);
        }
        self.touch(i)?;
        if let Some(&pred) = self.free.range(..i).next_back() {
            self.touch(pred)?;
        }
        let generation = self.slots[i as usize].generation();
        self.slots[i as usize] = Slot::Free { generation };
        self.free.insert(i);
        self.fds.get_mut().forget(i);
        Ok(())
    }

    // ----- concrete side -----

    /// An open descriptor of directory `i`, opening the path down from the nearest cached
    /// ancestor.
    fn dir_fd(&self, i: u64) -> io::Result<RawFd> {
        if i == 0 {
            return Ok(self.root_fd.as_raw_fd());
        }
        let mut cache = self.fds.borrow_mut();
        if let Some(fd) = cache.dirs.get(&i) {
            return Ok(fd.as_raw_fd());
        }
        let mut chain = Vec::new();
        let mut cur = i;
        let base = loop {
            if cur == 0 {
                break self.root_fd.as_raw_fd();
            }
            if let Some(fd) = cache.dirs.get(&cur) {
                break fd.as_raw_fd();
            }
            if self.staged.contains(&cur) {
                // In the middle of put_objs: the node waits in the stage.
                let stage = backend::open_dir_at(self.tree_fd.as_raw_fd(), b"stage")?;
                let fd = backend::open_dir_at(stage.as_raw_fd(), cur.to_string().as_bytes())?;
                let raw = fd.as_raw_fd();
                cache.dirs.insert(cur, fd);
                break raw;
            }
            let o = self
                .slots
                .get(cur as usize)
                .and_then(Slot::live)
                .ok_or_else(|| io::Error::other("dangling dir"))?;
            let Some((parent, name)) = o.links.iter().next() else {
                if !self.orphans.contains(&cur) {
                    return Err(io::Error::other("unlinked dir"));
                }
                let orphans = backend::open_dir_at(self.tree_fd.as_raw_fd(), b"orphans")?;
                let fd = backend::open_dir_at(orphans.as_raw_fd(), cur.to_string().as_bytes())?;
                let raw = fd.as_raw_fd();
                cache.dirs.insert(cur, fd);
                break raw;
            };
            chain.push((cur, name.clone()));
            cur = *parent;
            if chain.len() > self.slots.len() {
                return Err(io::Error::other("directory cycle in table"));
            }
        };
        let mut fd = base;
        for (idx, name) in chain.into_iter().rev() {
            let new = backend::open_dir_at(fd, &name)?;
            fd = new.as_raw_fd();
            cache.dirs.insert(idx, new);
        }
        Ok(fd)
    }

    /// Where object `i` is named: its first link's directory descriptor and name.
    fn location(&self, i: u64) -> io::Result<(RawFd, Vec<u8>)> {
        let o = self
            .slots
            .get(i as usize)
            .and_then(Slot::live)
            .ok_or_else(|| io::Error::other("dangling object"))?;
        let (d, name) = o
            .links
            .iter()
            .next()
            .ok_or_else(|| io::Error::other("unlinked object"))?;
        Ok((self.dir_fd(*d)?, name.clone()))
    }

    /// An open read-write descriptor of regular file `i`.
    fn file_fd(&self, i: u64) -> io::Result<RawFd> {
        if let Some(fd) = self.fds.borrow().files.get(&i) {
            return Ok(fd.as_raw_fd());
        }
        let (dfd, name) = self.location(i)?;
        let fd = backend::open_file_at(dfd, &name)?;
        let raw = fd.as_raw_fd();
        self.fds.borrow_mut().files.insert(i, fd);
        Ok(raw)
    }

    fn cache_file_fd(&self, i: u64, fd: OwnedFd) {
        self.fds.borrow_mut().files.insert(i, fd);
    }

    // ----- digests -----

    /// Recomputes the digests of every changed object and updates the partition tree.
    fn refresh_digests(&mut self) -> Result<(), ServiceError> {
        let dirty = std::mem::take(&mut self.dirty);
        self.encoded.resize(self.slots.len(), Vec::new());
        let mut buf = Vec::new();
        for &i in &dirty {
            // Long loops trim the descriptor caches as they go (each descriptor is used
            // within one iteration), so a large state never runs out of descriptors.
            self.fds.get_mut().trim();
            if let Err(e) = self.refresh_object(i, &mut buf) {
                // Keep the rest pending so a retry recomputes them.
                self.dirty.extend(dirty.range(i..).copied());
                return Err(storage(e));
            }
        }
        Ok(())
    }

    /// Recomputes object `i`'s real piece digests; the ordered tree gets the real object
    /// digest, or the placeholder's if the slot is masked. `encoded` holds real headers (the
    /// saved table is the concrete state).
    fn refresh_object(&mut self, i: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let header = self.real_header_of(i).encode();
        let h0 = piece_digest(i, 0, &header);
        let d = match &self.slots[i as usize] {
            Slot::Free { .. } => object_digest(i, &[h0]),
            Slot::Live(o) => {
                let want = 1 + o.chunks() as usize;
                let size = o.size;
                let mut dirty_chunks = std::mem::take(&mut self.live_mut(i).dirty_chunks);
                let mut pieces = std::mem::take(&mut self.live_mut(i).pieces);
                if pieces.len() != want {
                    // New chunks (growth) must be hashed; old ones past the end go away.
                    for p in pieces.len().max(1)..want {
                        dirty_chunks.insert(p as u32);
                    }
                    pieces.resize(want, Digest::default());
                }
                pieces[0] = h0;
                let mut result = Ok(());
                for &p in dirty_chunks.range(1..want as u32) {
                    let start = (p as u64 - 1) * CHUNK_SIZE;
                    let len = CHUNK_SIZE.min(size - start) as usize;
                    buf.resize(len, 0);
                    match self
                        .file_fd(i)
                        .and_then(|fd| backend::pread_full(fd, buf, start))
                    {
                        Ok(n) if n == len => pieces[p as usize] = piece_digest(i, p, buf),
                        Ok(_) => {
                            result = Err(io::Error::other(format!(
                                "object {i}: backend file shorter than its size"
                            )));
                            break;
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                let d = object_digest(i, &pieces);
                let o = self.live_mut(i);
                o.pieces = pieces;
                if result.is_err() {
                    o.dirty_chunks = dirty_chunks;
                }
                result?;
                d
            }
        };
        let d = match self.masked.get(&i) {
            Some(&lock) => locks::placeholder_digest(i, lock),
            None => d,
        };
        self.tree.set(i, d);
        self.encoded[i as usize] = header;
        Ok(())
    }

    /// Marks the chunks of file `i` covering bytes `start..end` stale.
    fn dirty_range(&mut self, i: u64, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let first = start / CHUNK_SIZE;
        let last = (end - 1) / CHUNK_SIZE;
        let o = self.live_mut(i);
        for c in first..=last {
            o.dirty_chunks.insert(c as u32 + 1);
        }
    }

    /// The current abstract value of object `i`.
    fn current_obj(&self, i: u64) -> Result<AbstractObject, ServiceError> {
        let slot = self
            .slots
            .get(i as usize)
            .ok_or(ServiceError::BadIndex(i))?;
        let mut pieces = vec![self.header_of(i).encode()];
        if self.masked.contains_key(&i) {
            return Ok(AbstractObject { pieces });
        }
        if let Slot::Live(o) = slot {
            let n = o.chunks();
            if n > 0 {
                let fd = self.file_fd(i).map_err(storage)?;
                for c in 0..n {
                    let start = c * CHUNK_SIZE;
                    let len = CHUNK_SIZE.min(o.size - start) as usize;
                    let mut buf = vec![0; len];
                    let got = backend::pread_full(fd, &mut buf, start).map_err(storage)?;
                    if got != len {
                        return Err(storage(io::Error::other(format!(
                            "object {i}: backend file shorter than its size"
                        ))));
                    }
                    pieces.push(buf);
                }
            }
        }
        Ok(AbstractObject { pieces })
    }
}

/// Removes a directory tree, or a btrfs subvolume and the snapshots inside it, under the data
/// directory.
fn remove_any_at(dir: RawFd, name: &[u8]) -> Result<(), ServiceError> {
    checkpoint::remove_snapshots_in(dir, name);
    if let Ok(fd) = backend::open_dir_at(dir, name) {
        if backend::is_btrfs_subvolume(fd.as_raw_fd()) {
            drop(fd);
            if backend::btrfs_subvol_delete(dir, name).is_ok() {
                return Ok(());
            }
        }
    }
    backend::remove_tree_at(dir, name).map_err(storage)
}

impl Drop for FileService {
    fn drop(&mut self) {
        if self.unsaved {
            if let Err(e) = self.save_table() {
                tracing::warn!(error = %e, "file service: could not save the table on drop");
            }
        }
    }
}

/// The file service's [`RequestPolicy`]: lookups, reads and attribute queries are read-only;
/// the agreed time is the primary's clock, accepted within [`TIME_SKEW_MAX_NS`] of a backup's.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsPolicy;

impl RequestPolicy for FsPolicy {
    fn is_read_only(&self, op: &[u8]) -> bool {
        ops::decode::<FsRequest>(op).is_some_and(|r| r.op.is_read_only())
    }

    fn propose_nondet(&self, now_ns: u64) -> Vec<u8> {
        ops::encode(&now_ns)
    }

    fn check_nondet(&self, nondet: &[u8], now_ns: u64) -> bool {
        match ops::decode::<u64>(nondet) {
            // Only the skew is checked, not monotonicity against an executed state: batches
            // are proposed before earlier ones execute (pipelining, a new primary after a view
            // change, or execution in another process), so a value below the last agreed time
            // is normal here, and execution clamps it (`apply_inner`). A strict check made
            // backups refuse pipelined batches and change views under load.
            Some(t) => t.abs_diff(now_ns) <= TIME_SKEW_MAX_NS,
            None => false,
        }
    }
}

impl Service for FileService {
    fn execute(&mut self, op: &[u8], client: ClientId, nondet: &[u8], read_only: bool) -> Vec<u8> {
        let result = match ops::decode::<FsRequest>(op) {
            None => Err(FsError::BadRequest),
            Some(req) if read_only && !req.op.is_read_only() => Err(FsError::BadRequest),
            Some(mut req) => {
                if let Some(squash) = self.squash.get(&client) {
                    req.caller = squash.apply(req.caller);
                }
                let now = if read_only && nondet.is_empty() {
                    Some(self.last_time())
                } else {
                    ops::decode::<u64>(nondet)
                };
                match now {
                    Some(now) => self.apply_inner(&req, client, now, !read_only),
                    None => Err(FsError::BadRequest),
                }
            }
        };
        ops::encode(&result)
    }

    fn policy(&self) -> Arc<dyn RequestPolicy> {
        Arc::new(FsPolicy)
    }

    fn object_count(&self) -> u64 {
        self.slots.len() as u64
    }

    fn get_obj(&self, index: u64) -> Result<AbstractObject, ServiceError> {
        self.current_obj(index)
    }

    fn put_objs(&mut self, objs: Vec<(u64, AbstractObject)>) -> Result<(), ServiceError> {
        self.put_objects(objs)?;
        self.merge_suspect = false;
        Ok(())
    }

    fn state_suspect(&self) -> bool {
        self.merge_suspect || self.inconsistent
    }

    fn set_object_count(&mut self, count: u64) -> Result<(), ServiceError> {
        self.resize(count)
    }

    fn checkpoint(&mut self, seq: SeqNo) -> Result<Digest, ServiceError> {
        self.take_checkpoint(seq)
    }

    fn rollback_to(&mut self, seq: SeqNo) -> Result<(), ServiceError> {
        self.rollback(seq)
    }

    fn discard_before(&mut self, seq: SeqNo) {
        self.discard(seq)
    }

    fn checkpoints(&self) -> Vec<(SeqNo, Digest)> {
        self.ckpt.list()
    }

    fn modified_since(&self, seq: SeqNo) -> Result<Vec<u64>, ServiceError> {
        self.ckpt
            .modified_since(seq, self.slots.len() as u64)
            .ok_or(ServiceError::NoCheckpoint(seq))
    }

    fn partition_node(&self, seq: SeqNo, level: u32, index: u64) -> Option<Vec<Digest>> {
        self.ckpt.record(seq)?.tree.node_clean(level, index)
    }

    fn get_obj_at(&self, seq: SeqNo, index: u64) -> Option<AbstractObject> {
        self.obj_at(seq, index).ok().flatten()
    }

    fn piece_digests_at(&self, seq: SeqNo, index: u64) -> Option<Vec<Digest>> {
        self.pieces_at(seq, index)
    }

    fn get_piece_at(&self, seq: SeqNo, index: u64, piece: u32) -> Option<Vec<u8>> {
        self.piece_at(seq, index, piece).ok().flatten()
    }

    fn checkpoint_work_pending(&self) -> bool {
        self.lock_transition_pending()
    }

    fn take_lock_events(&mut self) -> Vec<LockEvent> {
        std::mem::take(&mut self.lock_events)
    }

    fn execute_locked(
        &mut self,
        lock: LockId,
        op: &[u8],
        client: ClientId,
        time_ns: u64,
    ) -> LockedResult {
        self.run_locked(lock, op, client, time_ns)
    }

    fn lock_state_digest(&self, lock: LockId) -> Option<Digest> {
        self.lock_state_digest_of(lock)
    }

    fn lock_restart(&mut self, lock: LockId) -> Result<(), ServiceError> {
        self.restart_lock(lock)
    }

    fn lock_infos(&self) -> Vec<crate::locking::LockInfo> {
        self.lock_infos_of()
    }

    fn lock_base_page(
        &self,
        lock: LockId,
        from: crate::locking::BaseCursor,
        budget: usize,
    ) -> Option<crate::locking::BasePage> {
        self.lock_base_page_of(lock, from, budget)
    }

    fn lock_install_base(
        &mut self,
        lock: LockId,
        objects: Vec<(u64, AbstractObject)>,
    ) -> Result<(), ServiceError> {
        self.install_lock_base(lock, objects)
    }

    fn set_lock_cert_checker(&mut self, checker: Arc<dyn LockCertChecker>) {
        self.cert_checker = Some(checker);
    }
}

/// Number of chunks a file of `size` bytes has (re-exported for tests and benchmarks).
pub fn chunks_for(size: u64) -> u64 {
    chunk_count(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_canonically() {
        assert_eq!(name_error(b"ok"), None);
        assert_eq!(name_error(&[0xff; 255]), None);
        assert_eq!(name_error(&[b'a'; 256]), Some(FsError::NameTooLong));
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            assert_eq!(name_error(bad), Some(FsError::Inval), "{bad:?}");
        }
    }

    #[test]
    fn unordered_reads_do_not_move_the_agreed_time() {
        let dir = std::env::temp_dir().join(format!("bftfs-unit-{}", std::process::id()));
        let mut svc = FileService::open(&dir).expect("open");
        let mkdir = |name: &str| {
            let op = FsOp::Mkdir {
                dir: Handle::ROOT,
                name: name.as_bytes().to_vec(),
                mode: 0o755,
            };
            encode(&FsRequest {
                caller: Caller::root(),
                op,
            })
        };
        let mtime = |reply: Vec<u8>| match decode::<FsResult>(&reply) {
            Some(Ok(FsReply::Entry { attr, .. })) => attr.mtime,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            mtime(svc.execute(&mkdir("a"), ClientId(0), &encode(&1_000u64), false)),
            Timespec::from_nanos(1_000)
        );
        let read = encode(&FsRequest {
            caller: Caller::root(),
            op: FsOp::GetAttr { h: Handle::ROOT },
        });
        svc.execute(&read, ClientId(0), &encode(&5_000_000u64), true);
        assert_eq!(
            mtime(svc.execute(&mkdir("b"), ClientId(0), &encode(&2_000u64), false)),
            Timespec::from_nanos(2_000),
            "a read-only request moved the agreed time"
        );
        // A proposal below the newest agreed time is clamped, identically everywhere.
        assert_eq!(
            mtime(svc.execute(&mkdir("c"), ClientId(0), &encode(&1_500u64), false)),
            Timespec::from_nanos(2_000)
        );
        // Backups check only the skew against their own clock.
        assert!(svc.check_nondet(&encode(&1_000u64), 2_000));
        assert!(!svc.check_nondet(&encode(&(TIME_SKEW_MAX_NS + 3_000)), 2_000));
        assert!(!svc.check_nondet(b"junk", 2_000));
        // A mutating request on the read-only path is refused.
        let r: Option<FsResult> = decode(&svc.execute(&mkdir("d"), ClientId(0), &[], true));
        assert_eq!(r, Some(Err(FsError::BadRequest)));
        drop(svc);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
