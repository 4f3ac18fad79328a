//! The FUSE adapter: kernel requests in, file-service requests out.
//!
//! Each FUSE request becomes one or more [`FsOp`]s sent through an [`FsTransport`], with the
//! caller's identity (uid, gid, supplementary groups) attached, so that the service (and so
//! every replica) makes the permission decisions: the mount does not use
//! `default_permissions`. Node ids are mapped to handles by [`InodeTable`]; every error reaches
//! the kernel through [`errno`], the one place errors become errno values.
//!
//! Writes are buffered and sent in the background ([`crate::write_back`], the default) or sent
//! before `write(2)` returns (`-o sync`); either way the kernel runs FUSE in write-through
//! mode and takes every size from the adapter. Reads go to the service, or come from the
//! kernel's page cache when an open finds the file unchanged. The kernel caches attributes
//! and entries for the TTLs given in [`MountOptions`]. The adapter's own state is small: the
//! node id table, a snapshot per open directory, the open files (who opened them, for
//! writes the kernel sends later from its page cache, and which write errors they were told
//! of), the open-file counts that keep unlinked open files alive ([`crate::open_files`]), and
//! a short-lived cache of files known to have no `security.capability` attribute (the kernel
//! asks before every write). fcntl and flock locks go to the replicas through
//! [`crate::range_locks`], which also remembers which owners to drop at close.

use crate::inodes::InodeTable;
use crate::kernel_cache::KernelCache;
use crate::open_files::{Hidden, OpenFiles};
use crate::options::MountOptions;
use crate::range_locks::{self, LockRequest, RangeLockClient, WaitEnd};
use crate::transport::{FsTransport, TransportError};
use crate::write_back::{Limits, Observer, WriteBack, WriteError};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyBmap, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use state_abstraction::fs::object::MAX_FILE_SIZE;
use state_abstraction::fs::{
    AllocMode, Attr, Caller, CreateHow, DirEntry, FileType, FsError, FsOp, FsReply, FsRequest,
    Handle, NodeKind, SetAttrs, SetTime, Timespec, XattrSet, ACCESS_EXECUTE, ACCESS_READ,
    ACCESS_WRITE,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, error, trace, warn};

/// Largest read or write the service accepts in one request. Larger kernel requests are split.
pub const IO_MAX: u32 = 1 << 20;

/// `st_blksize` reported to programs. stdio and many tools size their buffers by it; every
/// write() is a round trip to the cluster, so a large value means fewer, larger requests.
const BLKSIZE: u32 = 128 * 1024;

/// Entries asked of the service per round trip while taking a directory snapshot.
const READDIR_BATCH: u32 = 1024;

/// How often at most a transport failure is logged (the rest are counted).
const TRANSPORT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a FUSE request failed. Mapped to errno by [`errno`] only.
#[derive(Debug)]
pub enum Failure {
    /// The service answered with an error.
    Service(FsError),
    /// The service could not be reached.
    Transport(TransportError),
    /// The kernel named a node id we do not (or no longer) know.
    UnknownNode(u64),
    /// The service answered with a reply of the wrong kind: a bug or a misbehaving service.
    UnexpectedReply(&'static str),
    /// The request itself is something we refuse (e.g. RENAME_EXCHANGE, mknod of a directory).
    Invalid(&'static str),
    /// A feature this file system does not have.
    Unsupported(&'static str),
    /// The caller's buffer is too small (xattr protocol).
    BufferTooSmall,
    /// An operation the kernel does locally or generically when the file system says it
    /// lacks it (ENOSYS, which the kernel remembers): byte-range locks with `local_locks`,
    /// lseek of holes, ioctl, poll, bmap.
    LeftToKernel,
    /// Another owner holds a conflicting lock (F_SETLK, flock with LOCK_NB).
    WouldBlock,
    /// A lock wait ended by a signal for the waiting thread.
    Interrupted,
}

impl From<WriteError> for Failure {
    fn from(e: WriteError) -> Failure {
        match e {
            WriteError::Service(e) => Failure::Service(e),
            WriteError::Transport(e) => Failure::Transport(e),
            WriteError::Unexpected(what) => Failure::UnexpectedReply(what),
        }
    }
}

/// The one mapping from failures to errno.
pub fn errno(f: &Failure) -> Errno {
    match f {
        Failure::Service(e) => Errno::from_i32(e.errno()),
        Failure::Transport(_) => Errno::EIO,
        Failure::UnknownNode(_) => Errno::ESTALE,
        Failure::UnexpectedReply(_) => Errno::EIO,
        Failure::Invalid(_) => Errno::EINVAL,
        Failure::Unsupported(_) => Errno::EOPNOTSUPP,
        Failure::BufferTooSmall => Errno::ERANGE,
        Failure::LeftToKernel => Errno::ENOSYS,
        Failure::WouldBlock => Errno::EAGAIN,
        Failure::Interrupted => Errno::EINTR,
    }
}

/// The reply types' common `error` method, so failures go through one helper.
trait ErrorReply {
    fn send_error(self, e: Errno);
}

macro_rules! error_reply {
    ($($t:ty),*) => {$(
        impl ErrorReply for $t {
            fn send_error(self, e: Errno) {
                self.error(e)
            }
        }
    )*};
}
error_reply!(
    ReplyAttr,
    ReplyBmap,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyIoctl,
    ReplyLock,
    ReplyLseek,
    ReplyOpen,
    ReplyPoll,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

/// Logs transport failures at most every [`TRANSPORT_LOG_EVERY`], so that a dead cluster gives
/// one clear line instead of one per request.
#[derive(Default)]
struct TransportLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl TransportLog {
    fn failed(&self, op: &str, e: &TransportError) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = s.0.is_none_or(|t| t.elapsed() >= TRANSPORT_LOG_EVERY);
        if due {
            let suppressed = s.1;
            *s = (Some(Instant::now()), 0);
            error!(
                "{e}: answering EIO to {op}{}",
                if suppressed > 0 {
                    format!(" ({suppressed} earlier failures not logged)")
                } else {
                    String::new()
                }
            );
        } else {
            s.1 += 1;
        }
    }
}

/// An open directory: a snapshot of its entries, taken at the first readdir (and again at
/// rewinddir). The service's cookies are positions, so continuing a listing by cookie while
/// another program deletes entries would skip some; a snapshot never skips an entry that
/// existed throughout, which is what POSIX asks of readdir.
#[derive(Default)]
struct DirStream {
    entries: Vec<DirEntry>,
    /// The snapshot carries attributes (taken for readdirplus).
    plus: bool,
    loaded: bool,
}

/// FUSE readdir offsets: 1 is after ".", 2 after "..", and an entry with service cookie `c`
/// has offset `c + 2`. The kernel passes back the offset of the last entry it consumed.
const DOT_OFFSET: u64 = 1;
const DOTDOT_OFFSET: u64 = 2;

fn cookie_of_offset(offset: u64) -> u64 {
    offset.saturating_sub(DOTDOT_OFFSET)
}

fn offset_of_cookie(cookie: u64) -> u64 {
    cookie.saturating_add(DOTDOT_OFFSET)
}

/// A file the kernel opened (FUSE file handle → this).
struct OpenFile {
    /// Opened for writing: its close waits for the node's buffered writes.
    writable: bool,
    /// Who opened it. Writes the kernel sends from its page cache (a shared mapping) come
    /// from whichever thread writes pages back; they are made with the opener's rights, as
    /// NFS clients do.
    caller: Caller,
    /// The node's write-error count this descriptor was last told of.
    seen_error: u64,
}

/// What the background write threads report, handed to the kernel caches.
struct Feedback {
    kernel: Arc<KernelCache>,
    /// Nodes whose cached pages and size must be dropped (a buffered write was refused),
    /// for the thread that tells the kernel: telling it can wait on page locks, which a
    /// read waiting for this node's writes may hold.
    refused: std::sync::mpsc::SyncSender<u64>,
}

impl Observer for Feedback {
    fn written(&self, nodeid: u64, attr: &Attr) {
        self.kernel.wrote(nodeid, attr);
    }

    fn failed(&self, nodeid: u64) {
        if self.refused.try_send(nodeid).is_err() {
            debug!("invalidation queue full; node {nodeid} is dropped at its next open");
        }
    }
}

/// The bftfs FUSE file system.
pub struct BftFs {
    transport: Arc<dyn FsTransport>,
    inodes: InodeTable,
    opts: MountOptions,
    dirs: Mutex<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_fh: AtomicU64,
    transport_log: TransportLog,
    /// Node ids known (since the instant) to have no `security.capability` attribute.
    no_caps: Mutex<HashMap<u64, Instant>>,
    /// Files open in the kernel, kept alive when unlinked (see [`crate::open_files`]).
    open_files: OpenFiles,
    /// Names and attributes the kernel may serve without asking (see [`crate::kernel_cache`]).
    kernel: Arc<KernelCache>,
    /// Buffered writes (`None` with `-o sync`).
    write_back: Option<WriteBack>,
    /// Open files by FUSE file handle.
    files: Mutex<HashMap<u64, OpenFile>>,
    /// Set once the session exists (see [`BftFs::notifier_slot`]); until then, and without a
    /// session, nothing is invalidated.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// fcntl/flock locks shared across mounts (`None` with `-o local_locks`: the kernel
    /// keeps them for this machine only).
    range_locks: Option<Arc<RangeLockClient>>,
}

/// The kernel asks for this attribute before every write(2) to a FUSE file (to know whether
/// the write must drop file capabilities): one extra round trip to the cluster per write.
/// Its absence is cached like other attributes, for the attribute TTL.
const CAPS_XATTR: &[u8] = b"security.capability";

/// Bound on the absence cache; it is emptied when full (it only saves round trips).
const NO_CAPS_MAX: usize = 1 << 16;

/// Supplementary groups of `pid`, from the `Groups:` line of /proc/PID/status. Empty when the
/// process is gone or the request came from the kernel itself (pid 0).
pub fn groups_of(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `bftfs lock PATH` sets this attribute and `bftfs unlock PATH` removes it: the mount
/// takes or gives back a Zzyzx lock on the subtree (the kernel resolves PATH; nothing is
/// stored).
pub const LOCK_XATTR: &[u8] = b"user.bftfs.lock";

fn caller_of(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        groups: groups_of(req.pid()),
    }
}

fn name_bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

fn system_time(t: Timespec) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nsecs.min(999_999_999)));
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.secs.unsigned_abs()))
            .and_then(|b| b.checked_add(nanos))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            secs: d.as_secs() as i64,
            nsecs: d.subsec_nanos(),
        },
        Err(before) => {
            // Before the epoch: seconds round down, nanoseconds count forward from there.
            let d = before.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nsecs = 0;
            if d.subsec_nanos() > 0 {
                secs -= 1;
                nsecs = 1_000_000_000 - d.subsec_nanos();
            }
            Timespec { secs, nsecs }
        }
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timespec(t)),
    }
}

fn fuse_kind(k: FileType) -> fuser::FileType {
    match k {
        FileType::Regular => fuser::FileType::RegularFile,
        FileType::Directory => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::Socket => fuser::FileType::Socket,
        FileType::CharDevice => fuser::FileType::CharDevice,
        FileType::BlockDevice => fuser::FileType::BlockDevice,
    }
}

/// Kernel attributes for the object the kernel knows as `nodeid`. `st_ino` is the node id
/// (fuser uses one for both), not the abstract `fileid`.
pub fn file_attr(nodeid: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(nodeid),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: UNIX_EPOCH,
        kind: fuse_kind(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        // The kernel's rdev field is 32 bits; the service keeps the full value.
        rdev: a.rdev as u32,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Attributes for "." and ".." in readdirplus, which the kernel ignores (it never links those
/// names), but the wire format needs some.
fn placeholder_dir_attr(nodeid: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(nodeid),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: fuser::FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

fn access_mask_of_open(flags: OpenFlags) -> u32 {
    match flags.acc_mode() {
        OpenAccMode::O_RDONLY => ACCESS_READ,
        OpenAccMode::O_WRONLY => ACCESS_WRITE,
        OpenAccMode::O_RDWR => ACCESS_READ | ACCESS_WRITE,
    }
}

impl BftFs {
    /// Fails only if the write-back threads cannot be started.
    pub fn new(transport: Arc<dyn FsTransport>, opts: MountOptions) -> std::io::Result<Self> {
        let kernel = Arc::new(KernelCache::default());
        let notifier: Arc<OnceLock<fuser::Notifier>> = Arc::new(OnceLock::new());
        let write_back = if opts.sync {
            None
        } else {
            let (refused, queue) = std::sync::mpsc::sync_channel::<u64>(4096);
            let slot = notifier.clone();
            // Ends when the write-back (the only sender) is dropped.
            std::thread::Builder::new()
                .name("bftfs-invalidate".into())
                .spawn(move || {
                    for nodeid in queue {
                        invalidate(&slot, nodeid);
                    }
                })?;
            let feedback = Arc::new(Feedback {
                kernel: kernel.clone(),
                refused,
            });
            Some(WriteBack::new(
                transport.clone(),
                feedback,
                Limits::default(),
            )?)
        };
        let range_locks = if opts.local_locks {
            None
        } else {
            Some(RangeLockClient::start(transport.clone(), opts.lock_lease)?)
        };
        Ok(BftFs {
            range_locks,
            transport,
            inodes: InodeTable::new(),
            opts,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            transport_log: TransportLog::default(),
            no_caps: Mutex::new(HashMap::new()),
            open_files: OpenFiles::default(),
            kernel,
            write_back,
            files: Mutex::new(HashMap::new()),
            notifier,
        })
    }

    /// Waits until `nodeid`'s buffered writes are on the service, so that what follows (a
    /// read, a stat, a truncate, a copy) sees them and comes after them.
    fn settle(&self, nodeid: u64) {
        if let Some(wb) = &self.write_back {
            wb.drain(nodeid);
        }
    }

    /// Drains `nodeid` for descriptor `fh` and reports the first write of the node that the
    /// service refused since the descriptor was last told. `writers_only`: a descriptor
    /// opened read-only neither waits nor is told (close of a reader).
    fn settle_for(&self, nodeid: u64, fh: u64, writers_only: bool) -> Result<(), Failure> {
        let Some(wb) = &self.write_back else {
            return Ok(());
        };
        let seen = {
            let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            match files.get(&fh) {
                Some(f) if writers_only && !f.writable => return Ok(()),
                Some(f) => f.seen_error,
                // Not one of ours (not expected): wait, but report nothing it was not open for.
                None => wb.error_seq(nodeid),
            }
        };
        wb.drain(nodeid);
        let (seq, error) = wb.error_since(nodeid, seen);
        if let Some(f) = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&fh)
        {
            f.seen_error = f.seen_error.max(seq);
        }
        match error {
            Some(e) => {
                // The kernel's pages and size still show the refused bytes; make it ask now,
                // before the caller looks again.
                invalidate(&self.notifier, nodeid);
                Err(e.into())
            }
            None => Ok(()),
        }
    }

    /// Records an open file and returns its FUSE file handle.
    fn file_opened(&self, nodeid: u64, writable: bool, caller: Caller) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let seen_error = self
            .write_back
            .as_ref()
            .map_or(0, |wb| wb.error_seq(nodeid));
        self.files.lock().unwrap_or_else(|p| p.into_inner()).insert(
            fh,
            OpenFile {
                writable,
                caller,
                seen_error,
            },
        );
        fh
    }

    /// The attributes the kernel is to hold for `nodeid`, given the service's `a`: the newest
    /// of them and this client's own changes, and no smaller than its buffered writes reach.
    fn as_kernel_sees(&self, nodeid: u64, a: &Attr) -> Attr {
        let mut a = self.kernel.newest(nodeid, a);
        if let Some(end) = self.write_back.as_ref().and_then(|w| w.pending_end(nodeid)) {
            a.size = a.size.max(end);
        }
        a
    }

    /// Hands attributes to the kernel: adjusted ([`BftFs::as_kernel_sees`]), recorded for the
    /// check at open, converted.
    fn give(&self, nodeid: u64, a: &Attr) -> FileAttr {
        let a = self.as_kernel_sees(nodeid, a);
        self.kernel.gave_attr(nodeid, &a);
        self.kernel_attr(nodeid, &a)
    }

    /// Where the session's notifier goes once the session exists: the adapter is moved into
    /// the session, so it cannot be handed the notifier directly.
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Close-to-open consistency (NFS's rule, see [`crate::kernel_cache`]): an open must see
    /// everything a client that closed the file earlier wrote, whatever the kernel cached.
    /// One lookup per name the kernel may have used to reach `ino` (almost always one), as
    /// the caller, which also gives fresh attributes. A name that no longer leads to this
    /// node makes the open fail with ESTALE: the kernel then redoes the open once with every
    /// name on the path looked up afresh (LOOKUP_REVAL). Changed attributes are invalidated,
    /// so the size the kernel reads up to is the new one. Returns whether the attributes are
    /// those the kernel already had (then its cached pages may be kept).
    fn revalidate_at_open(&self, req: &Request, ino: INodeNo) -> Result<bool, Failure> {
        let h = self.handle(ino)?;
        let caller = caller_of(req);
        let names = self.kernel.names_of(ino.0);
        let mut fresh = None;
        let mut stale = Vec::new();
        for (dir, name) in names {
            let op = FsOp::Lookup {
                dir,
                name: name.clone(),
            };
            match self.call_as(caller.clone(), op) {
                Ok(FsReply::Entry { handle, attr }) if handle == h => fresh = Some(attr),
                Ok(FsReply::Entry { .. }) => stale.push((dir, name)),
                Ok(_) => return Err(Failure::UnexpectedReply("lookup")),
                // Whatever the service refuses now (gone, no longer a directory, no longer
                // searchable), the kernel must not resolve it from its cache: the redone open
                // looks it up and gets the error itself.
                Err(Failure::Service(_)) => stale.push((dir, name)),
                Err(f) => return Err(f),
            }
        }
        if !stale.is_empty() {
            for (dir, name) in stale {
                self.kernel.unnamed(dir, &name);
                // The redone open looks up only the name it uses; another stale one must go
                // now, or a later open through it would be checked against the valid ones.
                if let (Some(n), Some(parent)) = (self.notifier.get(), self.inodes.find(dir)) {
                    if let Err(e) = n.inval_entry(INodeNo(parent), OsStr::from_bytes(&name)) {
                        debug!("invalidating a stale entry: {e}");
                    }
                }
            }
            return Err(Failure::Service(FsError::Stale));
        }
        let fresh = match fresh {
            Some(a) => a,
            // No name known (not expected: every entry the kernel gets is recorded).
            None => Self::attr_of(self.call_as(caller, FsOp::GetAttr { h })?, "getattr")?,
        };
        let fresh = self.as_kernel_sees(ino.0, &fresh);
        if self.kernel.attr_changed(ino.0, &fresh) {
            if let Some(n) = self.notifier.get() {
                // Offset -1: attributes only; the pages go at open (no FOPEN_KEEP_CACHE).
                if let Err(e) = n.inval_inode(ino, -1, 0) {
                    debug!("invalidating attributes: {e}");
                }
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// If `dir/name` is a file some descriptor still has open, and removing the name would
    /// free it, moves it to a hidden name instead and returns that name; the last release
    /// removes it. `None`: nothing to keep alive, remove (or replace) the name as usual.
    fn hide_if_open(
        &self,
        caller: &Caller,
        dir: Handle,
        name: &[u8],
    ) -> Result<Option<Vec<u8>>, Failure> {
        if self.open_files.none_open() {
            return Ok(None);
        }
        let lookup = FsOp::Lookup {
            dir,
            name: name.to_vec(),
        };
        let (handle, attr) = match self.call_as(caller.clone(), lookup) {
            Ok(r) => Self::entry_of(r, "lookup")?,
            // The remove itself will report the error.
            Err(Failure::Service(_)) => return Ok(None),
            Err(f) => return Err(f),
        };
        if attr.kind == FileType::Directory || attr.nlink > 1 {
            return Ok(None);
        }
        let Some(nodeid) = self
            .inodes
            .find(handle)
            .filter(|&n| self.open_files.is_open(n))
        else {
            return Ok(None);
        };
        for _ in 0..5 {
            let hidden = self.open_files.hidden_name();
            let op = FsOp::Rename {
                from_dir: dir,
                from_name: name.to_vec(),
                to_dir: dir,
                to_name: hidden.clone(),
                no_replace: true,
            };
            match self.call_as(caller.clone(), op) {
                Ok(r) => Self::done_of(r, "rename")?,
                Err(Failure::Service(FsError::Exist)) => continue,
                Err(f) => return Err(f),
            }
            debug!(
                "{} is open: kept as {}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(&hidden)
            );
            let record = Hidden {
                dir,
                name: hidden.clone(),
                caller: caller.clone(),
            };
            if !self.open_files.hide(nodeid, record.clone()) {
                // Closed while we renamed it: nothing to keep alive after all.
                self.remove_hidden(record);
            }
            return Ok(Some(hidden));
        }
        Ok(None)
    }

    fn remove_hidden(&self, h: Hidden) {
        let shown = String::from_utf8_lossy(&h.name).into_owned();
        let op = FsOp::Remove {
            dir: h.dir,
            name: h.name,
        };
        if let Err(f) = self.call_as(h.caller, op) {
            warn!("cannot remove {shown}, an unlinked file closed just now: {f:?}");
        }
    }

    /// The attributes the kernel is given for node `nodeid`. A file unlinked while open
    /// lives on under a hidden name that is not its own: POSIX says fstat then shows one link
    /// fewer (none, unless it has other names).
    fn kernel_attr(&self, nodeid: u64, a: &Attr) -> FileAttr {
        let mut attr = file_attr(nodeid, a);
        if self.open_files.is_hidden(nodeid) {
            attr.nlink = attr.nlink.saturating_sub(1);
        }
        attr
    }

    fn caps_known_absent(&self, nodeid: u64) -> bool {
        let cache = self.no_caps.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(&nodeid)
            .is_some_and(|t| t.elapsed() < self.opts.attr_timeout)
    }

    fn set_caps_absent(&self, nodeid: u64, absent: bool) {
        let mut cache = self.no_caps.lock().unwrap_or_else(|p| p.into_inner());
        if absent {
            if cache.len() >= NO_CAPS_MAX {
                cache.clear();
            }
            cache.insert(nodeid, Instant::now());
        } else {
            cache.remove(&nodeid);
        }
    }

    fn handle(&self, nodeid: INodeNo) -> Result<Handle, Failure> {
        self.inodes
            .handle(nodeid.0)
            .ok_or(Failure::UnknownNode(nodeid.0))
    }

    fn call_as(&self, caller: Caller, op: FsOp) -> Result<FsReply, Failure> {
        // One span per service request, so the transport's own logs (retransmissions, view
        // changes) show which operation they belong to.
        let span = tracing::debug_span!("request", op = op.kind(), uid = caller.uid);
        let _entered = span.enter();
        let started = Instant::now();
        let result = self.transport.call(FsRequest { caller, op });
        trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            ok = matches!(result, Ok(Ok(_))),
            "done"
        );
        match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(Failure::Service(e)),
            Err(e) => Err(Failure::Transport(e)),
        }
    }

    fn call(&self, req: &Request, op: FsOp) -> Result<FsReply, Failure> {
        self.call_as(caller_of(req), op)
    }

    fn fail<R: ErrorReply>(&self, op: &'static str, reply: R, f: Failure) {
        match &f {
            Failure::Transport(e) => self.transport_log.failed(op, e),
            Failure::UnexpectedReply(what) => {
                error!("{op}: the service answered with the wrong kind of reply ({what})")
            }
            Failure::UnknownNode(n) => warn!("{op}: unknown node id {n}"),
            other => debug!("{op}: {other:?}"),
        }
        reply.send_error(errno(&f));
    }

    fn entry_of(reply: FsReply, op: &'static str) -> Result<(Handle, Attr), Failure> {
        match reply {
            FsReply::Entry { handle, attr } => Ok((handle, attr)),
            _ => Err(Failure::UnexpectedReply(op)),
        }
    }

    fn attr_of(reply: FsReply, op: &'static str) -> Result<Attr, Failure> {
        match reply {
            FsReply::Attr(a) => Ok(a),
            _ => Err(Failure::UnexpectedReply(op)),
        }
    }

    fn done_of(reply: FsReply, op: &'static str) -> Result<(), Failure> {
        match reply {
            FsReply::Done => Ok(()),
            _ => Err(Failure::UnexpectedReply(op)),
        }
    }

    /// `entry`: the directory and name the kernel will cache this entry under.
    fn send_entry(
        &self,
        reply: ReplyEntry,
        handle: Handle,
        attr: &Attr,
        entry: Option<(Handle, Vec<u8>)>,
    ) {
        // Counted (and the name recorded) before the reply leaves, so a forget can never
        // overtake it and an open never finds an entry the adapter does not know of.
        let nodeid = self.inodes.remember(handle);
        if let Some((dir, name)) = entry {
            self.kernel.named(dir, &name, nodeid);
        }
        let attr = self.give(nodeid, attr);
        reply.entry_with_ttls(
            &self.opts.attr_timeout,
            &self.opts.entry_timeout,
            &attr,
            Generation(handle.generation),
        );
    }

    fn entry_op(&self, req: &Request, op: FsOp, name: &'static str, reply: ReplyEntry) {
        let entry = match &op {
            FsOp::Lookup { dir, name }
            | FsOp::Mkdir { dir, name, .. }
            | FsOp::Mknod { dir, name, .. }
            | FsOp::Symlink { dir, name, .. }
            | FsOp::Link { dir, name, .. } => Some((*dir, name.clone())),
            _ => None,
        };
        let is_lookup = matches!(op, FsOp::Lookup { .. });
        match self.call(req, op).and_then(|r| Self::entry_of(r, name)) {
            Ok((handle, attr)) => self.send_entry(reply, handle, &attr, entry),
            Err(f) => {
                if let (true, Some((dir, entry_name)), Failure::Service(FsError::NoEnt)) =
                    (is_lookup, &entry, &f)
                {
                    self.kernel.unnamed(*dir, entry_name);
                }
                self.fail(name, reply, f)
            }
        }
    }

    /// Takes (`take`) or gives back the mount's lock on the subtree at `ino`.
    fn lock_control(&self, req: &Request, ino: INodeNo, take: bool, reply: ReplyEmpty) {
        let h = match self.handle(ino) {
            Ok(h) => h,
            Err(f) => return self.fail("lock", reply, f),
        };
        let result = if take {
            self.transport.lock(caller_of(req), h)
        } else {
            self.transport.unlock(caller_of(req), h)
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn empty_op(&self, req: &Request, op: FsOp, name: &'static str, reply: ReplyEmpty) {
        match self.call(req, op).and_then(|r| Self::done_of(r, name)) {
            Ok(()) => reply.ok(),
            Err(f) => self.fail(name, reply, f),
        }
    }

    /// `run` (`entry_op` or `empty_op`) with the op made from the handle of node `ino`.
    fn op_on<R: ErrorReply>(
        &self,
        req: &Request,
        ino: INodeNo,
        op: impl FnOnce(Handle) -> FsOp,
        name: &'static str,
        reply: R,
        run: fn(&Self, &Request, FsOp, &'static str, R),
    ) {
        match self.handle(ino) {
            Ok(h) => run(self, req, op(h), name, reply),
            Err(f) => self.fail(name, reply, f),
        }
    }

    /// The check at open(2) and opendir(3) of node `ino`: without default_permissions the
    /// kernel checks nothing at open; the service does, so that open fails where POSIX says it
    /// must rather than at the first read or write. Root passes read/write checks anyway,
    /// which saves a round trip on every open.
    fn check_open(&self, req: &Request, ino: INodeNo, mask: u32) -> Result<(), Failure> {
        let h = self.handle(ino)?;
        if req.uid() == 0 {
            Ok(())
        } else {
            self.check_access(req, h, mask)
        }
    }

    /// Checks `mask` (ACCESS_* bits) for the caller; EACCES if not all granted.
    fn check_access(&self, req: &Request, h: Handle, mask: u32) -> Result<(), Failure> {
        match self.call(req, FsOp::Access { h, mask })? {
            FsReply::Access { granted } if granted & mask == mask => Ok(()),
            FsReply::Access { .. } => Err(Failure::Service(FsError::Access)),
            _ => Err(Failure::UnexpectedReply("access")),
        }
    }

    fn read_impl(
        &self,
        req: &Request,
        h: Handle,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Failure> {
        let caller = caller_of(req);
        let mut out = Vec::with_capacity(size as usize);
        // A read must return everything asked for unless it hits the end of the file: the
        // kernel fills a short answer with zeros.
        while out.len() < size as usize {
            let count = (size - out.len() as u32).min(IO_MAX);
            let at = offset.saturating_add(out.len() as u64);
            match self.call_as(
                caller.clone(),
                FsOp::Read {
                    h,
                    offset: at,
                    count,
                },
            )? {
                FsReply::Read { data, eof } => {
                    let got = data.len();
                    if got > count as usize {
                        return Err(Failure::UnexpectedReply("read: more data than asked for"));
                    }
                    out.extend_from_slice(&data);
                    if eof || got == 0 {
                        break;
                    }
                }
                _ => return Err(Failure::UnexpectedReply("read")),
            }
        }
        Ok(out)
    }

    /// Sends a write and waits for it (`-o sync`).
    fn write_impl(
        &self,
        caller: Caller,
        nodeid: u64,
        h: Handle,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, Failure> {
        let mut done = 0usize;
        while done < data.len() {
            let end = (done + IO_MAX as usize).min(data.len());
            let at = offset.saturating_add(done as u64);
            let op = FsOp::Write {
                h,
                offset: at,
                data: data[done..end].to_vec(),
            };
            match self.call_as(caller.clone(), op)? {
                FsReply::Write { count, attr } => {
                    self.kernel.wrote(nodeid, &attr);
                    if count == 0 || count as usize > end - done {
                        // No progress (or nonsense): stop rather than loop forever.
                        if done == 0 {
                            return Err(Failure::UnexpectedReply("write: no progress"));
                        }
                        break;
                    }
                    done += count as usize;
                }
                _ => return Err(Failure::UnexpectedReply("write")),
            }
        }
        Ok(done as u32)
    }

    fn setattr_impl(&self, req: &Request, h: Handle, set: SetAttrs) -> Result<Attr, Failure> {
        let op = if set == SetAttrs::default() {
            FsOp::GetAttr { h }
        } else {
            FsOp::SetAttr { h, set }
        };
        Self::attr_of(self.call(req, op)?, "setattr")
    }

    /// A lock request from the kernel, checked: the kernel's ranges end at OFFSET_MAX.
    #[allow(clippy::too_many_arguments)]
    fn lock_request(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
    ) -> Result<LockRequest, Failure> {
        Ok(LockRequest {
            caller: caller_of(req),
            nodeid: ino.0,
            h: self.handle(ino)?,
            fh: fh.0,
            owner: lock_owner.0,
            start,
            end,
            kind: range_locks::kind_of(typ)?,
            pid,
            tid: req.pid(),
        })
    }

    /// The last close of open file (or directory) `fh`: its OFD and flock locks go.
    fn release_range_locks(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flock_owner: Option<LockOwner>,
    ) {
        if let (Some(locks), Ok(h)) = (&self.range_locks, self.handle(ino)) {
            locks.released(caller_of(req), ino.0, h, fh.0, flock_owner.map(|o| o.0));
        }
    }

    fn dir_stream(&self, fh: FileHandle) -> Arc<Mutex<DirStream>> {
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        dirs.entry(fh.0)
            .or_insert_with(|| Arc::new(Mutex::new(DirStream::default())))
            .clone()
    }

    /// Takes a fresh snapshot of directory `h` into `stream` unless the one it holds serves
    /// a continuation from `offset`.
    fn load(
        &self,
        caller: &Caller,
        h: Handle,
        stream: &mut DirStream,
        offset: u64,
        plus: bool,
    ) -> Result<(), Failure> {
        if stream.loaded && offset != 0 && (stream.plus || !plus) {
            return Ok(());
        }
        let mut entries: Vec<DirEntry> = Vec::new();
        let mut cookie = 0;
        loop {
            let op = FsOp::ReadDir {
                dir: h,
                cookie,
                count: READDIR_BATCH,
                plus,
            };
            let (batch, eof) = match self.call_as(caller.clone(), op)? {
                FsReply::ReadDir { entries, eof } => (entries, eof),
                _ => return Err(Failure::UnexpectedReply("readdir")),
            };
            if plus && batch.iter().any(|e| e.attr.is_none()) {
                return Err(Failure::UnexpectedReply("readdirplus without attributes"));
            }
            // Cookies must grow, or the listing would never end.
            let Some(last) = batch.last().map(|e| e.cookie) else {
                break;
            };
            if last <= cookie || batch.windows(2).any(|w| w[0].cookie >= w[1].cookie) {
                return Err(Failure::UnexpectedReply("readdir cookies do not increase"));
            }
            cookie = last;
            entries.extend(batch);
            if eof {
                break;
            }
        }
        *stream = DirStream {
            entries,
            plus,
            loaded: true,
        };
        Ok(())
    }
}

/// Index of the first snapshot entry after FUSE offset `offset`.
fn first_after(entries: &[DirEntry], offset: u64) -> usize {
    let cookie = cookie_of_offset(offset);
    entries.partition_point(|e| e.cookie <= cookie)
}

impl Filesystem for BftFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(IO_MAX) {
            let _ = config.set_max_write(nearest);
        }
        // Each is optional: an older kernel simply does without.
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // Symlink targets never change (a new target is a new object), so the kernel may
            // keep them.
            InitFlags::FUSE_CACHE_SYMLINKS,
            // Cached pages go whenever the kernel is given a different mtime, not only a
            // different size: what an open keeps (FOPEN_KEEP_CACHE) then always matches the
            // attributes last given, which the check at open compares.
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            if config.add_capabilities(cap).is_err() {
                debug!("kernel lacks {cap:?}");
            }
        }
        if self.range_locks.is_some() {
            // The kernel then sends fcntl locks (POSIX and OFD) and flock (as whole-file
            // locks) here instead of keeping them itself.
            for cap in [InitFlags::FUSE_POSIX_LOCKS, InitFlags::FUSE_FLOCK_LOCKS] {
                if config.add_capabilities(cap).is_err() {
                    warn!(
                        "the kernel cannot forward {cap:?}: those locks stay local to this machine"
                    );
                }
            }
        }
        debug!("FUSE session initialised");
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(locks) = &self.range_locks {
            locks.stop();
        }
        // Every file is closed by now, so nothing is expected here; bytes of a shared mapping
        // still being written back are the exception.
        if let Some(wb) = &self.write_back {
            let left = wb.drain_all(self.opts.request_timeout);
            if left > 0 {
                error!("{left} files still had buffered writes at unmount; they are lost");
            }
        }
        // Locks go back at unmount (after the buffered writes, which may go through them),
        // so what this mount did under them merges at once.
        self.transport.release_all();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.op_on(
            req,
            parent,
            |dir| FsOp::Lookup {
                dir,
                name: name_bytes(name),
            },
            "lookup",
            reply,
            Self::entry_op,
        )
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
        if self.inodes.handle(ino.0).is_none() {
            self.set_caps_absent(ino.0, false);
            self.kernel.forgotten(ino.0);
            if let Some(wb) = &self.write_back {
                wb.forget(ino.0);
            }
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        // A stat shows the size and mtime of the data written so far.
        self.settle(ino.0);
        let r = self
            .handle(ino)
            .and_then(|h| self.call(req, FsOp::GetAttr { h }))
            .and_then(|r| Self::attr_of(r, "getattr"));
        match r {
            Ok(a) => reply.attr(&self.opts.attr_timeout, &self.give(ino.0, &a)),
            Err(f) => self.fail("getattr", reply, f),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // ctime is the service's to set (the agreed time of the change), never the client's.
        let set = SetAttrs {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        // After the writes made before it, as with -o sync: a truncate must not be undone by
        // an older buffered write, nor a chmod refuse bytes written while it was allowed.
        self.settle(ino.0);
        let resizes = set.size.is_some();
        if resizes {
            self.kernel.modified(ino.0);
        }
        match self
            .handle(ino)
            .and_then(|h| self.setattr_impl(req, h, set))
        {
            Ok(a) => {
                if resizes {
                    self.kernel.resized(ino.0, &a);
                }
                reply.attr(&self.opts.attr_timeout, &self.give(ino.0, &a))
            }
            Err(f) => self.fail("setattr", reply, f),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .handle(ino)
            .and_then(|h| self.call(req, FsOp::ReadLink { h }));
        match r {
            Ok(FsReply::ReadLink { target }) => reply.data(&target),
            Ok(_) => self.fail("readlink", reply, Failure::UnexpectedReply("readlink")),
            Err(f) => self.fail("readlink", reply, f),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let dir = match self.handle(parent) {
            Ok(h) => h,
            Err(f) => return self.fail("mknod", reply, f),
        };
        let name = name_bytes(name);
        // The kernel has already applied the umask (we do not ask for FUSE_DONT_MASK).
        let perm = mode & 0o7777;
        let rdev = u64::from(rdev);
        let op = match mode & libc::S_IFMT {
            libc::S_IFREG => FsOp::Create {
                dir,
                name,
                mode: perm,
                how: CreateHow::Guarded,
            },
            libc::S_IFIFO => FsOp::Mknod {
                dir,
                name,
                mode: perm,
                kind: NodeKind::Fifo,
            },
            libc::S_IFSOCK => FsOp::Mknod {
                dir,
                name,
                mode: perm,
                kind: NodeKind::Socket,
            },
            libc::S_IFCHR => FsOp::Mknod {
                dir,
                name,
                mode: perm,
                kind: NodeKind::CharDevice { rdev },
            },
            libc::S_IFBLK => FsOp::Mknod {
                dir,
                name,
                mode: perm,
                kind: NodeKind::BlockDevice { rdev },
            },
            _ => return self.fail("mknod", reply, Failure::Invalid("mknod of this file type")),
        };
        self.entry_op(req, op, "mknod", reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.op_on(
            req,
            parent,
            |dir| FsOp::Mkdir {
                dir,
                name: name_bytes(name),
                mode: mode & 0o7777,
            },
            "mkdir",
            reply,
            Self::entry_op,
        )
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let dir = match self.handle(parent) {
            Ok(h) => h,
            Err(f) => return self.fail("unlink", reply, f),
        };
        let caller = caller_of(req);
        let name = name_bytes(name);
        match self.hide_if_open(&caller, dir, &name) {
            Ok(Some(_)) => {
                self.kernel.unnamed(dir, &name);
                reply.ok()
            }
            Ok(None) => {
                let r = self.call_as(
                    caller,
                    FsOp::Remove {
                        dir,
                        name: name.clone(),
                    },
                );
                match r.and_then(|r| Self::done_of(r, "unlink")) {
                    Ok(()) => {
                        self.kernel.unnamed(dir, &name);
                        reply.ok()
                    }
                    Err(f) => self.fail("unlink", reply, f),
                }
            }
            Err(f) => self.fail("unlink", reply, f),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_bytes(name);
        let r = self.handle(parent).and_then(|dir| {
            let op = FsOp::Rmdir {
                dir,
                name: name.clone(),
            };
            Self::done_of(self.call(req, op)?, "rmdir").map(|()| dir)
        });
        match r {
            Ok(dir) => {
                self.kernel.unnamed(dir, &name);
                reply.ok()
            }
            Err(f) => self.fail("rmdir", reply, f),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.op_on(
            req,
            parent,
            |dir| FsOp::Symlink {
                dir,
                name: name_bytes(link_name),
                target: target.as_os_str().as_bytes().to_vec(),
            },
            "symlink",
            reply,
            Self::entry_op,
        )
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return self.fail(
                "rename",
                reply,
                Failure::Invalid("RENAME_EXCHANGE is not supported"),
            );
        }
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return self.fail(
                "rename",
                reply,
                Failure::Invalid("RENAME_WHITEOUT is not supported"),
            );
        }
        let (from_dir, to_dir) = match (self.handle(parent), self.handle(newparent)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(f), _) | (_, Err(f)) => return self.fail("rename", reply, f),
        };
        let caller = caller_of(req);
        let (from_name, to_name) = (name_bytes(name), name_bytes(newname));
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        // Renaming over an open file would free it: keep it alive under a hidden name first.
        let same = from_dir == to_dir && from_name == to_name;
        let hidden = if no_replace || same {
            None
        } else {
            match self.hide_if_open(&caller, to_dir, &to_name) {
                Ok(h) => h,
                Err(f) => return self.fail("rename", reply, f),
            }
        };
        let op = FsOp::Rename {
            from_dir,
            from_name: from_name.clone(),
            to_dir,
            to_name: to_name.clone(),
            no_replace,
        };
        match self
            .call_as(caller.clone(), op)
            .and_then(|r| Self::done_of(r, "rename"))
        {
            Ok(()) => {
                if !same {
                    self.kernel
                        .renamed((from_dir, from_name), (to_dir, to_name.clone()));
                }
                reply.ok()
            }
            Err(f) => {
                if let Some(hidden) = hidden {
                    // Put the target back where it was.
                    let undo = FsOp::Rename {
                        from_dir: to_dir,
                        from_name: hidden,
                        to_dir,
                        to_name,
                        no_replace: true,
                    };
                    if let Err(e) = self.call_as(caller, undo) {
                        warn!("rename failed and its hidden target could not be restored: {e:?}");
                    }
                }
                self.fail("rename", reply, f)
            }
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (h, dir) = match (self.handle(ino), self.handle(newparent)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(f), _) | (_, Err(f)) => return self.fail("link", reply, f),
        };
        self.entry_op(
            req,
            FsOp::Link {
                h,
                dir,
                name: name_bytes(newname),
            },
            "link",
            reply,
        )
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let checked = self
            .check_open(req, ino, access_mask_of_open(flags))
            .and_then(|()| {
                // This client's own buffered bytes first, so that what the service answers
                // differs from what the kernel holds only by other clients' changes.
                self.settle(ino.0);
                self.revalidate_at_open(req, ino)
            });
        match checked {
            Ok(unchanged) => {
                // Cached pages are kept only if nothing changed them since the kernel was
                // given these attributes: not another client (the revalidation), not this
                // one (whose writes the kernel may have cached around attributes it then
                // ignored). Otherwise the kernel drops them here: close-to-open consistency.
                let modified_here = self.kernel.take_modified(ino.0);
                let keep = unchanged && !modified_here;
                let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
                let fh = self.file_opened(ino.0, writable, caller_of(req));
                self.open_files.opened(ino.0);
                let how = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), how)
            }
            Err(f) => self.fail("open", reply, f),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.settle(ino.0);
        match self
            .handle(ino)
            .and_then(|h| self.read_impl(req, h, offset, size))
        {
            Ok(data) => reply.data(&data),
            Err(f) => self.fail("read", reply, f),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let h = match self.handle(ino) {
            Ok(h) => h,
            Err(f) => return self.fail("write", reply, f),
        };
        let opener = if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&fh.0)
                .map(|f| f.caller.clone())
        } else {
            None
        };
        let caller = opener.unwrap_or_else(|| caller_of(req));
        self.kernel.modified(ino.0);
        let Some(wb) = &self.write_back else {
            return match self.write_impl(caller, ino.0, h, offset, data) {
                Ok(n) => reply.written(n),
                Err(f) => self.fail("write", reply, f),
            };
        };
        // What the service would refuse whatever happens meanwhile is refused now rather
        // than at close. (Permission was checked at open; a later change of it is reported
        // at close, as NFS does.)
        let fits = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= MAX_FILE_SIZE);
        let Ok(count) = u32::try_from(data.len()) else {
            return self.fail("write", reply, Failure::Invalid("write larger than 4 GiB"));
        };
        if !fits {
            return self.fail("write", reply, Failure::Service(FsError::FBig));
        }
        wb.write(ino.0, h, offset, data, &caller);
        reply.written(count)
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): a writer's close returns once the file's data is on the replicas
        // (close-to-open), and reports a buffered write they refused.
        let settled = self.settle_for(ino.0, fh.0, true);
        // And the closing process's POSIX locks on the file go, whatever the data did.
        if let (Some(locks), Ok(h)) = (&self.range_locks, self.handle(ino)) {
            locks.closed(caller_of(req), ino.0, h, lock_owner.0);
        }
        match settled {
            Ok(()) => reply.ok(),
            Err(f) => self.fail("flush", reply, f),
        }
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_range_locks(req, ino, fh, lock_owner);
        let hidden = self.open_files.released(ino.0);
        if let Some(wb) = &self.write_back {
            if hidden.is_some() {
                // Its last name is going: nothing will read these bytes.
                wb.discard(ino.0);
            } else if let Err(f) = self.settle_for(ino.0, fh.0, true) {
                // Writes through a shared mapping unmapped after close(2) are sent only
                // now, and no one is left to tell.
                warn!("a write to a file just closed was not accepted: {f:?}");
            }
        }
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        // Errors of release reach no one (close(2) has returned already).
        reply.ok();
        if let Some(h) = hidden {
            self.remove_hidden(h);
        }
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if let Err(f) = self.settle_for(ino.0, fh.0, false) {
            return self.fail("fsync", reply, f);
        }
        self.op_on(
            req,
            ino,
            |h| FsOp::Commit { h },
            "fsync",
            reply,
            Self::empty_op,
        )
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.check_open(req, ino, ACCESS_READ) {
            Ok(()) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                let stream = DirStream::default();
                self.dirs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, Arc::new(Mutex::new(stream)));
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(f) => self.fail("opendir", reply, f),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let h = match self.handle(ino) {
            Ok(h) => h,
            Err(f) => return self.fail("readdir", reply, f),
        };
        if offset < DOT_OFFSET && reply.add(ino, DOT_OFFSET, fuser::FileType::Directory, ".") {
            return reply.ok();
        }
        if offset < DOTDOT_OFFSET && reply.add(ino, DOTDOT_OFFSET, fuser::FileType::Directory, "..")
        {
            return reply.ok();
        }
        let stream = self.dir_stream(fh);
        let mut stream = stream.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(f) = self.load(&caller_of(req), h, &mut stream, offset, false) {
            return self.fail("readdir", reply, f);
        }
        for e in &stream.entries[first_after(&stream.entries, offset)..] {
            let ino = INodeNo(self.inodes.display_ino(e.handle));
            if reply.add(
                ino,
                offset_of_cookie(e.cookie),
                fuse_kind(e.kind),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let h = match self.handle(ino) {
            Ok(h) => h,
            Err(f) => return self.fail("readdirplus", reply, f),
        };
        // "." and ".." are never linked by the kernel and count no lookup.
        let ttl = self.opts.entry_timeout;
        let dot = placeholder_dir_attr(ino.0);
        if offset < DOT_OFFSET && reply.add(ino, DOT_OFFSET, ".", &ttl, &dot, Generation(0)) {
            return reply.ok();
        }
        if offset < DOTDOT_OFFSET && reply.add(ino, DOTDOT_OFFSET, "..", &ttl, &dot, Generation(0))
        {
            return reply.ok();
        }
        let stream = self.dir_stream(fh);
        let mut stream = stream.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(f) = self.load(&caller_of(req), h, &mut stream, offset, true) {
            return self.fail("readdirplus", reply, f);
        }
        for e in &stream.entries[first_after(&stream.entries, offset)..] {
            let Some(attr) = &e.attr else {
                return self.fail(
                    "readdirplus",
                    reply,
                    Failure::UnexpectedReply("readdirplus without attributes"),
                );
            };
            // Count the lookup first; give it back if the entry does not fit after all.
            let nodeid = self.inodes.remember(e.handle);
            // The snapshot may predate this client's latest writes: adjusted here.
            let attr = self.as_kernel_sees(nodeid, attr);
            let full = reply.add(
                INodeNo(nodeid),
                offset_of_cookie(e.cookie),
                OsStr::from_bytes(&e.name),
                &ttl,
                &self.kernel_attr(nodeid, &attr),
                Generation(e.handle.generation),
            );
            if full {
                self.inodes.forget(nodeid, 1);
                break;
            }
            // Recorded before `reply.ok()` sends the entries.
            self.kernel.named(h, &e.name, nodeid);
            self.kernel.gave_attr(nodeid, &attr);
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // fuser does not pass RELEASEDIR's flock owner; the owners that locked through this
        // directory handle are remembered anyway.
        self.release_range_locks(req, ino, fh, None);
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.op_on(
            req,
            ino,
            |h| FsOp::Commit { h },
            "fsyncdir",
            reply,
            Self::empty_op,
        )
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        // statfs may name any node; the root always exists.
        let h = self.handle(ino).unwrap_or(Handle::ROOT);
        match self.call(req, FsOp::StatFs { h }) {
            Ok(FsReply::StatFs(s)) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namemax, s.bsize,
            ),
            Ok(_) => self.fail("statfs", reply, Failure::UnexpectedReply("statfs")),
            Err(f) => self.fail("statfs", reply, f),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if position != 0 {
            return self.fail(
                "setxattr",
                reply,
                Failure::Unsupported("xattr position (macOS only)"),
            );
        }
        let how = match flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE) {
            0 => XattrSet::Either,
            libc::XATTR_CREATE => XattrSet::Create,
            libc::XATTR_REPLACE => XattrSet::Replace,
            _ => {
                return self.fail(
                    "setxattr",
                    reply,
                    Failure::Invalid("XATTR_CREATE with XATTR_REPLACE"),
                )
            }
        };
        if name.as_bytes() == LOCK_XATTR {
            return self.lock_control(req, ino, true, reply);
        }
        if name.as_bytes() == CAPS_XATTR {
            self.set_caps_absent(ino.0, false);
        }
        self.op_on(
            req,
            ino,
            |h| FsOp::SetXattr {
                h,
                name: name_bytes(name),
                value: value.to_vec(),
                how,
            },
            "setxattr",
            reply,
            Self::empty_op,
        )
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let caps = name.as_bytes() == CAPS_XATTR;
        if caps && self.caps_known_absent(ino.0) {
            return self.fail("getxattr", reply, Failure::Service(FsError::NoData));
        }
        let r = self.handle(ino).and_then(|h| {
            self.call(
                req,
                FsOp::GetXattr {
                    h,
                    name: name_bytes(name),
                },
            )
        });
        match r {
            Ok(FsReply::Xattr { value }) => reply_xattr(reply, size, &value, self),
            Ok(_) => self.fail("getxattr", reply, Failure::UnexpectedReply("getxattr")),
            Err(f) => {
                if caps && matches!(f, Failure::Service(FsError::NoData)) {
                    self.set_caps_absent(ino.0, true);
                }
                self.fail("getxattr", reply, f)
            }
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self
            .handle(ino)
            .and_then(|h| self.call(req, FsOp::ListXattr { h }));
        match r {
            Ok(FsReply::XattrList { names }) => {
                // The kernel's format: each name followed by a NUL.
                let mut buf = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
                for n in &names {
                    buf.extend_from_slice(n);
                    buf.push(0);
                }
                reply_xattr(reply, size, &buf, self)
            }
            Ok(_) => self.fail("listxattr", reply, Failure::UnexpectedReply("listxattr")),
            Err(f) => self.fail("listxattr", reply, f),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if name.as_bytes() == LOCK_XATTR {
            return self.lock_control(req, ino, false, reply);
        }
        if name.as_bytes() == CAPS_XATTR {
            self.set_caps_absent(ino.0, false);
        }
        self.op_on(
            req,
            ino,
            |h| FsOp::RemoveXattr {
                h,
                name: name_bytes(name),
            },
            "removexattr",
            reply,
            Self::empty_op,
        )
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let h = match self.handle(ino) {
            Ok(h) => h,
            Err(f) => return self.fail("access", reply, f),
        };
        let mut want = 0;
        if mask.contains(AccessFlags::R_OK) {
            want |= ACCESS_READ;
        }
        if mask.contains(AccessFlags::W_OK) {
            want |= ACCESS_WRITE;
        }
        if mask.contains(AccessFlags::X_OK) {
            want |= ACCESS_EXECUTE;
        }
        let r = if want == 0 {
            // F_OK: existence only.
            self.call(req, FsOp::GetAttr { h }).map(|_| ())
        } else {
            self.check_access(req, h, want)
        };
        match r {
            Ok(()) => reply.ok(),
            Err(f) => self.fail("access", reply, f),
        }
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let Some(locks) = &self.range_locks else {
            return self.fail("getlk", reply, Failure::LeftToKernel);
        };
        let asked = self
            .lock_request(req, ino, fh, lock_owner, start, end, typ, pid)
            .and_then(|r| match r.kind {
                Some(kind) => locks.test(&r, kind),
                None => Err(Failure::Invalid("F_GETLK of F_UNLCK")),
            });
        match asked {
            // The holder's pid only if it is this mount's (0 otherwise, which the kernel
            // reports as such: a pid of another machine names nothing here).
            Ok(Some(c)) => reply.locked(c.start, c.end, range_locks::typ_of(c.kind), c.pid),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(f) => self.fail("getlk", reply, f),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let Some(locks) = &self.range_locks else {
            return self.fail("setlk", reply, Failure::LeftToKernel);
        };
        let r = match self.lock_request(req, ino, fh, lock_owner, start, end, typ, pid) {
            Ok(r) => r,
            Err(f) => return self.fail("setlk", reply, f),
        };
        match locks.try_set(&r) {
            Ok(true) => return reply.ok(),
            Ok(false) if !sleep => return self.fail("setlk", reply, Failure::WouldBlock),
            Ok(false) => {}
            Err(f) => return self.fail("setlk", reply, f),
        }
        // F_SETLKW (or flock without LOCK_NB) and the lock is taken: wait, on a thread of
        // its own when one is free, so that this FUSE thread goes on serving.
        let finish = move |result: Result<(), WaitEnd>, reply: ReplyEmpty| match result {
            Ok(()) => reply.ok(),
            Err(WaitEnd::Interrupted) => reply.error(errno(&Failure::Interrupted)),
            Err(WaitEnd::Failed(f)) => {
                debug!("setlkw: {f:?}");
                reply.error(errno(&f))
            }
        };
        if locks.waiter_slot() {
            let waiter = locks.clone();
            let spawned = std::thread::Builder::new()
                .name("bftfs-lock-wait".into())
                .spawn(move || {
                    let result = waiter.wait(&r);
                    waiter.waiter_done();
                    finish(result, reply);
                });
            if let Err(e) = spawned {
                // The reply went with the closure, and fuser answers a dropped reply EIO.
                error!("cannot start a lock-wait thread: {e}; answering EIO");
                locks.waiter_done();
            }
        } else {
            finish(locks.wait(&r), reply);
        }
    }

    // The operations below are answered ENOSYS on purpose, and without fuser's "not
    // implemented" warning: the kernel then does them itself for good (lseek uses the
    // generic code).

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        self.fail("bmap", reply, Failure::LeftToKernel)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.fail("ioctl", reply, Failure::LeftToKernel)
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: ReplyPoll,
    ) {
        self.fail("poll", reply, Failure::LeftToKernel)
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(mode) = AllocMode::from_linux(mode) else {
            return self.fail("fallocate", reply, Failure::Unsupported("fallocate mode"));
        };
        // A hole punched after buffered bytes must not be filled by them later.
        self.settle(ino.0);
        self.kernel.modified(ino.0);
        let r = self
            .handle(ino)
            .and_then(|h| {
                self.call(
                    req,
                    FsOp::Fallocate {
                        h,
                        offset,
                        length,
                        mode,
                    },
                )
            })
            .and_then(|r| Self::attr_of(r, "fallocate"));
        match r {
            Ok(a) => {
                self.kernel.wrote(ino.0, &a);
                reply.ok()
            }
            Err(f) => self.fail("fallocate", reply, f),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        self.fail("lseek", reply, Failure::LeftToKernel)
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if !flags.is_empty() {
            return self.fail(
                "copy_file_range",
                reply,
                Failure::Invalid("copy_file_range flags"),
            );
        }
        let (src, dst) = match (self.handle(ino_in), self.handle(ino_out)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(f), _) | (_, Err(f)) => return self.fail("copy_file_range", reply, f),
        };
        // The copy reads the source's written bytes and lands after the destination's.
        self.settle(ino_in.0);
        self.settle(ino_out.0);
        self.kernel.modified(ino_out.0);
        let op = FsOp::CopyRange {
            src,
            src_offset: offset_in,
            dst,
            dst_offset: offset_out,
            length: len,
        };
        match self.call(req, op) {
            // The service copies at most COPY_MAX (well under u32) and never more than asked.
            Ok(FsReply::Write { count, attr }) if u64::from(count) <= len => {
                self.kernel.wrote(ino_out.0, &attr);
                reply.written(count)
            }
            Ok(_) => self.fail(
                "copy_file_range",
                reply,
                Failure::UnexpectedReply("copy_file_range"),
            ),
            Err(f) => self.fail("copy_file_range", reply, f),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let dir = match self.handle(parent) {
            Ok(h) => h,
            Err(f) => return self.fail("create", reply, f),
        };
        let how = if flags & libc::O_EXCL != 0 {
            CreateHow::Guarded
        } else {
            CreateHow::Unchecked
        };
        let op = FsOp::Create {
            dir,
            name: name_bytes(name),
            mode: mode & 0o7777,
            how,
        };
        let r = self
            .call(req, op)
            .and_then(|r| Self::entry_of(r, "create"))
            .and_then(|(h, attr)| {
                // The kernel calls create only for a name it believes absent; if another client
                // made it meanwhile, Unchecked opened the existing file, and O_TRUNC still applies.
                if flags & libc::O_TRUNC != 0 && attr.size > 0 {
                    // Known here already (another name of it): its buffered bytes go first,
                    // as before any truncate.
                    if let Some(n) = self.inodes.find(h) {
                        self.settle(n);
                    }
                    let set = SetAttrs {
                        size: Some(0),
                        ..Default::default()
                    };
                    Ok((h, self.setattr_impl(req, h, set)?, true))
                } else {
                    Ok((h, attr, false))
                }
            });
        match r {
            Ok((handle, attr, truncated)) => {
                let nodeid = self.inodes.remember(handle);
                if truncated {
                    self.kernel.modified(nodeid);
                    self.kernel.resized(nodeid, &attr);
                }
                self.kernel.named(dir, &name_bytes(name), nodeid);
                if attr.size == 0 {
                    // The kernel's question before the first write would find nothing worth
                    // asking about: a new file has no capabilities, and an empty one runs
                    // nothing. Saves a round trip per new file.
                    self.set_caps_absent(nodeid, true);
                }
                let attr = self.give(nodeid, &attr);
                let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
                let fh = self.file_opened(nodeid, writable, caller_of(req));
                self.open_files.opened(nodeid);
                reply.created(
                    &self.opts.attr_timeout,
                    &attr,
                    Generation(handle.generation),
                    FileHandle(fh),
                    FopenFlags::empty(),
                )
            }
            Err(f) => self.fail("create", reply, f),
        }
    }
}

/// Makes the kernel drop `nodeid`'s cached pages and attributes (it asks again for both).
fn invalidate(notifier: &OnceLock<fuser::Notifier>, nodeid: u64) {
    if let Some(n) = notifier.get() {
        if let Err(e) = n.inval_inode(INodeNo(nodeid), 0, 0) {
            // ENOENT: the kernel holds nothing for it.
            debug!("invalidating node {nodeid}: {e}");
        }
    }
}

/// The xattr size protocol: size 0 asks for the length; a buffer too small is ERANGE.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8], fs: &BftFs) {
    let Ok(len) = u32::try_from(value.len()) else {
        return fs.fail("xattr", reply, Failure::BufferTooSmall);
    };
    if size == 0 {
        reply.size(len)
    } else if len > size {
        fs.fail("xattr", reply, Failure::BufferTooSmall)
    } else {
        reply.data(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line_parsing() {
        let status =
            "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nVmPeak:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27, 1000]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name:\tx\n"), Vec::<u32>::new());
    }

    #[test]
    fn own_groups_are_readable() {
        // The test process exists, so its status file must parse (possibly to no groups).
        let _ = groups_of(std::process::id());
        assert!(groups_of(0).is_empty());
    }

    #[test]
    fn time_conversions_round_trip() {
        for t in [
            Timespec { secs: 0, nsecs: 0 },
            Timespec {
                secs: 1_700_000_000,
                nsecs: 123_456_789,
            },
            Timespec {
                secs: -1,
                nsecs: 500_000_000,
            },
            Timespec {
                secs: -86_400,
                nsecs: 0,
            },
        ] {
            assert_eq!(timespec(system_time(t)), t, "{t:?}");
        }
    }

    #[test]
    fn readdir_offsets() {
        assert_eq!(cookie_of_offset(0), 0);
        assert_eq!(cookie_of_offset(DOT_OFFSET), 0);
        assert_eq!(cookie_of_offset(DOTDOT_OFFSET), 0);
        assert_eq!(cookie_of_offset(offset_of_cookie(7)), 7);
        assert!(offset_of_cookie(1) > DOTDOT_OFFSET);
    }

    #[test]
    fn snapshot_positions() {
        let e = |cookie: u64| DirEntry {
            name: vec![b'a'],
            cookie,
            handle: Handle {
                index: cookie,
                generation: 1,
            },
            kind: FileType::Regular,
            attr: None,
        };
        let entries = vec![e(1), e(2), e(3)];
        assert_eq!(first_after(&entries, 0), 0);
        assert_eq!(first_after(&entries, DOTDOT_OFFSET), 0);
        assert_eq!(first_after(&entries, offset_of_cookie(1)), 1);
        assert_eq!(first_after(&entries, offset_of_cookie(3)), 3);
        assert_eq!(first_after(&entries, offset_of_cookie(99)), 3);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            errno(&Failure::Service(FsError::NameTooLong)),
            Errno::ENAMETOOLONG
        );
        assert_eq!(
            errno(&Failure::Service(FsError::NotEmpty)),
            Errno::ENOTEMPTY
        );
        assert_eq!(
            errno(&Failure::Transport(TransportError::Timeout(
                Duration::from_secs(1)
            ))),
            Errno::EIO
        );
        assert_eq!(errno(&Failure::Invalid("x")), Errno::EINVAL);
        assert_eq!(errno(&Failure::BufferTooSmall), Errno::ERANGE);
        assert_eq!(errno(&Failure::UnknownNode(5)), Errno::ESTALE);
    }

    #[test]
    fn attr_conversion_uses_node_id_and_permission_bits() {
        let a = Attr {
            kind: FileType::Regular,
            mode: 0o104755,
            nlink: 2,
            uid: 1,
            gid: 2,
            size: 10,
            blocks: 1,
            rdev: 0,
            fsid: 0,
            fileid: 41,
            generation: 3,
            atime: Timespec::default(),
            mtime: Timespec { secs: 5, nsecs: 6 },
            ctime: Timespec::default(),
        };
        let f = file_attr(42, &a);
        assert_eq!(f.ino, INodeNo(42));
        assert_eq!(f.perm, 0o4755);
        assert_eq!(f.kind, fuser::FileType::RegularFile);
        assert_eq!(f.mtime, UNIX_EPOCH + Duration::new(5, 6));
    }

    #[test]
    fn open_modes() {
        assert_eq!(access_mask_of_open(OpenFlags(libc::O_RDONLY)), ACCESS_READ);
        assert_eq!(access_mask_of_open(OpenFlags(libc::O_WRONLY)), ACCESS_WRITE);
        assert_eq!(
            access_mask_of_open(OpenFlags(libc::O_RDWR)),
            ACCESS_READ | ACCESS_WRITE
        );
    }
}
