//! The file service's operations and replies: what travels (bincode-encoded) inside a BFT
//! request and reply. NFSv3-shaped, with what a FUSE client needs on top (xattrs, no-replace
//! rename, readdirplus).
//!
//! Everything here is canonical: no maps, no floats, no backend-specific numbers.

use super::locks::{LockEntry, LockId, LockRefusal, LockUnit};
use super::range_locks::{RangeLockInfo, RangeLockKind};
use serde::{Deserialize, Serialize};

/// Abstract file handle: the object's slot in the abstract array and the slot's generation.
/// A stale generation or a free slot answers [`FsError::Stale`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Handle {
    pub index: u64,
    pub generation: u64,
}

impl Handle {
    /// The root directory: slot 0, generation 1.
    pub const ROOT: Handle = Handle {
        index: 0,
        generation: 1,
    };
}

/// Who is asking. Permission checks are made by the service from these, never by the backend,
/// so every replica reaches the same answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn root() -> Self {
        Caller {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// The anonymous identity squashed callers become (NFS's `anonuid`/`anongid` default).
    pub fn nobody() -> Self {
        Caller {
            uid: NOBODY,
            gid: NOBODY,
            groups: Vec::new(),
        }
    }
}

/// uid and gid of [`Caller::nobody`].
pub const NOBODY: u32 = 65534;

/// How much of the identity a client claims is believed, per client, as an NFS server's
/// export options say. A client's calls carry the caller's uid and gids as the client states
/// them (like NFS AUTH_SYS): its key proves which client sent a call, not which user. Every
/// replica applies the same mapping from the shared cluster config, so all reach the same
/// answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Squash {
    /// Trust the stated uid and gids (a client on a machine the cluster trusts).
    #[default]
    None,
    /// Root (uid 0) becomes nobody; other users are believed (NFS `root_squash`).
    Root,
    /// Every caller becomes nobody (NFS `all_squash`).
    All,
}

impl Squash {
    pub fn is_none(&self) -> bool {
        *self == Squash::None
    }

    /// The identity the service acts for when this client states `caller`.
    pub fn apply(self, caller: Caller) -> Caller {
        match self {
            Squash::None => caller,
            Squash::Root if caller.uid != 0 => caller,
            Squash::Root | Squash::All => Caller::nobody(),
        }
    }
}

impl std::str::FromStr for Squash {
    type Err = String;
    fn from_str(s: &str) -> Result<Squash, String> {
        match s {
            "none" => Ok(Squash::None),
            "root" => Ok(Squash::Root),
            "all" => Ok(Squash::All),
            other => Err(format!(
                "`{other}` is not a squash mode: none, root (uid 0 becomes nobody) or all"
            )),
        }
    }
}

/// A time as seconds and nanoseconds since the Unix epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timespec {
    pub secs: i64,
    pub nsecs: u32,
}

impl Timespec {
    pub fn from_nanos(ns: u64) -> Self {
        Timespec {
            secs: (ns / 1_000_000_000) as i64,
            nsecs: (ns % 1_000_000_000) as u32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Canonical attributes. `fileid` is the abstract index, timestamps are agreed values,
/// `blocks` is derived from `size` (512-byte units), `fsid` is constant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub kind: FileType,
    /// Permission bits including setuid/setgid/sticky (mode & 0o7777).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub rdev: u64,
    pub fsid: u64,
    pub fileid: u64,
    pub generation: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    /// The agreed time of the request ("touch" without an explicit time).
    Now,
    At(Timespec),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CreateHow {
    /// Open an existing file (truncating nothing) or create it.
    Unchecked,
    /// Fail with `Exist` if the name exists (O_EXCL).
    Guarded,
    /// Exclusive create with a verifier: a retransmission with the same verifier succeeds.
    Exclusive { verifier: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Fifo,
    Socket,
    CharDevice { rdev: u64 },
    BlockDevice { rdev: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrSet {
    /// Create or replace.
    Either,
    /// XATTR_CREATE: fail with `Exist` if present.
    Create,
    /// XATTR_REPLACE: fail with `NoData` if absent.
    Replace,
}

/// Access bits for [`FsOp::Access`] (as in access(2)).
pub const ACCESS_READ: u32 = 4;
pub const ACCESS_WRITE: u32 = 2;
pub const ACCESS_EXECUTE: u32 = 1;

/// What [`FsOp::Fallocate`] does to its range (Linux `fallocate(2)` modes; the others are
/// refused with `EOPNOTSUPP` by [`AllocMode::from_linux`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocMode {
    /// Mode 0 (`posix_fallocate`): reserve space; the size grows to cover the range unless
    /// `keep_size` (`FALLOC_FL_KEEP_SIZE`). Data is unchanged.
    Allocate { keep_size: bool },
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: the range inside the file reads as zeros
    /// afterwards; the size never changes.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: the range reads as zeros; the size grows to cover it unless
    /// `keep_size`.
    ZeroRange { keep_size: bool },
}

impl AllocMode {
    /// The mode `fallocate(2)` was called with, if it is one the service has. Linux refuses
    /// a hole punch without KEEP_SIZE, and punch together with zero range, with EOPNOTSUPP
    /// too; collapse, insert and unshare are not offered.
    pub fn from_linux(mode: i32) -> Option<AllocMode> {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => Some(AllocMode::Allocate { keep_size }),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => Some(AllocMode::PunchHole),
            libc::FALLOC_FL_ZERO_RANGE => Some(AllocMode::ZeroRange { keep_size }),
            _ => None,
        }
    }

    pub fn keeps_size(self) -> bool {
        match self {
            AllocMode::Allocate { keep_size } | AllocMode::ZeroRange { keep_size } => keep_size,
            AllocMode::PunchHole => true,
        }
    }
}

/// Names are raw bytes: a name is validated by the service (no `/`, no NUL, not `.` or `..`,
/// 1..=255 bytes), never by the client.
pub type Name = Vec<u8>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsOp {
    GetAttr {
        h: Handle,
    },
    SetAttr {
        h: Handle,
        set: SetAttrs,
    },
    Lookup {
        dir: Handle,
        name: Name,
    },
    /// Answers the subset of `mask` (ACCESS_* bits) the caller is granted.
    Access {
        h: Handle,
        mask: u32,
    },
    ReadLink {
        h: Handle,
    },
    Read {
        h: Handle,
        offset: u64,
        count: u32,
    },
    Write {
        h: Handle,
        offset: u64,
        data: Vec<u8>,
    },
    Create {
        dir: Handle,
        name: Name,
        mode: u32,
        how: CreateHow,
    },
    Mkdir {
        dir: Handle,
        name: Name,
        mode: u32,
    },
    Symlink {
        dir: Handle,
        name: Name,
        target: Vec<u8>,
    },
    Mknod {
        dir: Handle,
        name: Name,
        mode: u32,
        kind: NodeKind,
    },
    Remove {
        dir: Handle,
        name: Name,
    },
    Rmdir {
        dir: Handle,
        name: Name,
    },
    Rename {
        from_dir: Handle,
        from_name: Name,
        to_dir: Handle,
        to_name: Name,
        no_replace: bool,
    },
    Link {
        h: Handle,
        dir: Handle,
        name: Name,
    },
    /// Entries after position `cookie` (0 = from the start) in byte-wise name order, `.` and
    /// `..` excluded; at most `count` entries. `plus` adds attributes and handles.
    ReadDir {
        dir: Handle,
        cookie: u64,
        count: u32,
        plus: bool,
    },
    StatFs {
        h: Handle,
    },
    /// fsync/commit: every reply is already durable in the replicated sense; this exists so
    /// the replica can make its own copy durable too.
    Commit {
        h: Handle,
    },
    GetXattr {
        h: Handle,
        name: Name,
    },
    SetXattr {
        h: Handle,
        name: Name,
        value: Vec<u8>,
        how: XattrSet,
    },
    ListXattr {
        h: Handle,
    },
    RemoveXattr {
        h: Handle,
        name: Name,
    },
    /// fallocate(2) on a regular file: `length` bytes from `offset` (`length` > 0).
    /// Answers the file's attributes.
    Fallocate {
        h: Handle,
        offset: u64,
        length: u64,
        mode: AllocMode,
    },
    /// copy_file_range(2): up to `length` bytes of `src` from `src_offset` to `dst` at
    /// `dst_offset`, inside the replicas (the data never travels). Stops at the end of `src`
    /// and after [`object::COPY_MAX`](super::object::COPY_MAX) bytes; answers
    /// [`FsReply::Write`] with the count copied and `dst`'s attributes.
    CopyRange {
        src: Handle,
        src_offset: u64,
        dst: Handle,
        dst_offset: u64,
        length: u64,
    },
    /// Asks for a lock on `h` (see `locks.rs`): granted `Pending`, active from the next
    /// checkpoint. Answers [`FsReply::LockPending`] or [`FsReply::LockRefused`].
    Lock {
        h: Handle,
        unit: LockUnit,
    },
    /// The holder gives the lock back: it freezes. With `cert` (an encoded lock-checkpoint
    /// certificate, checked by the replica's `LockCertChecker`) the certified point is the
    /// log's end and the lock merges at the next checkpoint; a certificate that does not
    /// verify, or names another lock or epoch, is refused `Inval` with no effect. Without
    /// one it waits for a `Resolve` (or, unresolved, `locks::UNRESOLVED_MERGE_NS`). On a lock already
    /// frozen (by a conflict, expiry or an earlier release) a certificate sets the end.
    Release {
        lock: LockId,
        cert: Option<Vec<u8>>,
    },
    /// The holder extends the lock's life (10 minutes from now, at most 1 hour from the
    /// request).
    Renew {
        lock: LockId,
    },
    /// The lock table, without the pools.
    ListLocks,
    /// F_SETLK/F_SETLKW/`flock` (see `range_locks.rs`): sets (`kind` Some) or removes (None)
    /// the lock of owner `(client, owner)` over bytes `start..=end` of `h`. A granted lock
    /// extends the client's lease to `lease_ms` from now. Answers [`FsReply::RangeLock`]
    /// (with the lock in the way if refused), `NoLocks` past the bounds.
    SetRangeLock {
        h: Handle,
        owner: u64,
        start: u64,
        end: u64,
        kind: Option<RangeLockKind>,
        /// The caller's pid, reported by F_GETLK to the same client only.
        pid: u32,
        lease_ms: u32,
    },
    /// F_GETLK: the first lock of another owner that would conflict. Ordered, so that
    /// expired leases are judged by agreed time.
    TestRangeLock {
        h: Handle,
        owner: u64,
        start: u64,
        end: u64,
        kind: RangeLockKind,
    },
    /// close(2) of a POSIX owner's descriptor, or the last close of an open file: drops every
    /// lock of the calling client's `owners` on `h`.
    DropRangeLocks {
        h: Handle,
        owners: Vec<u64>,
    },
    /// Extends the calling client's lease over all of its range locks; answers
    /// [`FsReply::RangeLeases`] with how many it holds (0 after its lease ran out).
    RenewRangeLocks {
        lease_ms: u32,
    },
    /// Any client fixes where the log of a lock frozen without a certified end stops
    /// (its holder died or went silent): `evidence` holds 2f+1 replicas' signed reports of
    /// their frozen logs, from which the replica's `LockCertChecker` deterministically picks
    /// the longest chain the holder signed. Refused `Locked` within the release grace after
    /// the freeze (the holder's own certified release has priority), `Inval` if the evidence
    /// does not verify or the lock is not frozen; `Done` once the lock has an end or is gone.
    Resolve {
        lock: LockId,
        evidence: Vec<u8>,
    },
}

impl FsOp {
    /// Operations that never change the state and may use the read-only path.
    /// The operation's name, lower case as NFS and FUSE name theirs (`getattr`, `write`,
    /// ...): a label for metrics and logs that says what was asked, never with whom or what.
    pub fn kind(&self) -> &'static str {
        match self {
            FsOp::GetAttr { .. } => "getattr",
            FsOp::SetAttr { .. } => "setattr",
            FsOp::Lookup { .. } => "lookup",
            FsOp::Access { .. } => "access",
            FsOp::ReadLink { .. } => "readlink",
            FsOp::Read { .. } => "read",
            FsOp::Write { .. } => "write",
            FsOp::Create { .. } => "create",
            FsOp::Mkdir { .. } => "mkdir",
            FsOp::Symlink { .. } => "symlink",
            FsOp::Mknod { .. } => "mknod",
            FsOp::Remove { .. } => "remove",
            FsOp::Rmdir { .. } => "rmdir",
            FsOp::Rename { .. } => "rename",
            FsOp::Link { .. } => "link",
            FsOp::ReadDir { .. } => "readdir",
            FsOp::StatFs { .. } => "statfs",
            FsOp::Commit { .. } => "commit",
            FsOp::GetXattr { .. } => "getxattr",
            FsOp::SetXattr { .. } => "setxattr",
            FsOp::ListXattr { .. } => "listxattr",
            FsOp::RemoveXattr { .. } => "removexattr",
            FsOp::Fallocate { .. } => "fallocate",
            FsOp::CopyRange { .. } => "copy_file_range",
            FsOp::Lock { .. } => "lock",
            FsOp::Release { .. } => "release",
            FsOp::Renew { .. } => "renew",
            FsOp::ListLocks => "listlocks",
            FsOp::SetRangeLock { .. } => "setlk",
            FsOp::TestRangeLock { .. } => "getlk",
            FsOp::DropRangeLocks { .. } => "unlock_owners",
            FsOp::RenewRangeLocks { .. } => "renew_leases",
            FsOp::Resolve { .. } => "resolve",
        }
    }

    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            FsOp::GetAttr { .. }
                | FsOp::Lookup { .. }
                | FsOp::Access { .. }
                | FsOp::ReadLink { .. }
                | FsOp::Read { .. }
                | FsOp::ReadDir { .. }
                | FsOp::StatFs { .. }
                | FsOp::GetXattr { .. }
                | FsOp::ListXattr { .. }
                | FsOp::ListLocks
        )
    }

    /// The range-lock operations: ordered, never entries of a Zzyzx lock's log.
    pub fn is_range_lock(&self) -> bool {
        matches!(
            self,
            FsOp::SetRangeLock { .. }
                | FsOp::TestRangeLock { .. }
                | FsOp::DropRangeLocks { .. }
                | FsOp::RenewRangeLocks { .. }
        )
    }
}

/// One request to the file service: the caller's identity and the operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRequest {
    pub caller: Caller,
    pub op: FsOp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Name,
    /// Position of this entry; pass it back as `cookie` to continue after it.
    pub cookie: u64,
    pub handle: Handle,
    pub kind: FileType,
    /// Present for readdirplus.
    pub attr: Option<Attr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namemax: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsReply {
    Attr(Attr),
    /// Lookup, create, mkdir, symlink, mknod, link: the object's handle and attributes.
    Entry {
        handle: Handle,
        attr: Attr,
    },
    Access {
        granted: u32,
    },
    ReadLink {
        target: Vec<u8>,
    },
    Read {
        data: Vec<u8>,
        eof: bool,
    },
    Write {
        count: u32,
        attr: Attr,
    },
    /// Remove, rmdir, rename, commit, setxattr, removexattr.
    Done,
    ReadDir {
        entries: Vec<DirEntry>,
        eof: bool,
    },
    StatFs(StatFs),
    Xattr {
        value: Vec<u8>,
    },
    XattrList {
        names: Vec<Name>,
    },
    LockPending {
        lock: LockId,
    },
    LockRefused {
        why: LockRefusal,
    },
    Locks {
        next_lock: u64,
        locks: Vec<LockEntry>,
    },
    /// SetRangeLock and TestRangeLock: `None` granted (or, for a test, nothing in the way);
    /// otherwise the conflicting lock.
    RangeLock {
        conflict: Option<RangeLockInfo>,
    },
    RangeLeases {
        held: u32,
    },
}

/// The one canonical error table (NFS status style). Backend errnos are mapped into this in
/// one place; the FUSE adapter maps it to errno in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum FsError {
    #[error("operation not permitted")]
    Perm,
    #[error("no such file or directory")]
    NoEnt,
    #[error("I/O error")]
    Io,
    #[error("permission denied")]
    Access,
    #[error("file exists")]
    Exist,
    #[error("cross-device link")]
    XDev,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("invalid argument")]
    Inval,
    #[error("file too large")]
    FBig,
    #[error("no space left on device")]
    NoSpc,
    #[error("too many links")]
    MLink,
    #[error("file name too long")]
    NameTooLong,
    #[error("directory not empty")]
    NotEmpty,
    #[error("stale file handle")]
    Stale,
    #[error("operation not supported")]
    NotSupp,
    #[error("no such attribute")]
    NoData,
    #[error("result too large")]
    Range,
    #[error("too many levels of symbolic links")]
    Loop,
    #[error("malformed request")]
    BadRequest,
    /// The object is inside another client's lock (or the caller's own, reached through
    /// the ordered path): nothing was done, and an ordered request froze the lock, so the
    /// same request succeeds once the lock has merged back.
    #[error("object locked")]
    Locked,
    /// A range lock past the bounds of `range_locks.rs`.
    #[error("no locks available")]
    NoLocks,
}

impl FsError {
    /// The errno a POSIX program should see.
    pub fn errno(self) -> i32 {
        match self {
            FsError::Perm => libc::EPERM,
            FsError::NoEnt => libc::ENOENT,
            FsError::Io => libc::EIO,
            FsError::Access => libc::EACCES,
            FsError::Exist => libc::EEXIST,
            FsError::XDev => libc::EXDEV,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::Inval => libc::EINVAL,
            FsError::FBig => libc::EFBIG,
            FsError::NoSpc => libc::ENOSPC,
            FsError::MLink => libc::EMLINK,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Stale => libc::ESTALE,
            FsError::NotSupp => libc::EOPNOTSUPP,
            FsError::NoData => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Loop => libc::ELOOP,
            FsError::BadRequest => libc::EINVAL,
            // The transport retries; an application sees this only if retries time out.
            FsError::Locked => libc::EIO,
            FsError::NoLocks => libc::ENOLCK,
        }
    }
}

pub type FsResult = Result<FsReply, FsError>;

fn config() -> impl bincode::config::Config {
    // Bounded so that a hostile length prefix cannot make the decoder allocate without limit.
    bincode::config::standard().with_limit::<{ 16 * 1024 * 1024 }>()
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding our own plain-data types into a Vec cannot fail.
    bincode::serde::encode_to_vec(v, config()).unwrap_or_default()
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match bincode::serde::decode_from_slice(bytes, config()) {
        Ok((v, used)) if used == bytes.len() => Some(v),
        _ => None,
    }
}

#[cfg(test)]
mod alloc_mode_tests {
    use super::*;

    #[test]
    fn linux_modes_map_or_are_refused() {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        assert_eq!(
            AllocMode::from_linux(0),
            Some(AllocMode::Allocate { keep_size: false })
        );
        assert_eq!(
            AllocMode::from_linux(keep),
            Some(AllocMode::Allocate { keep_size: true })
        );
        assert_eq!(
            AllocMode::from_linux(punch | keep),
            Some(AllocMode::PunchHole)
        );
        assert_eq!(
            AllocMode::from_linux(zero),
            Some(AllocMode::ZeroRange { keep_size: false })
        );
        assert_eq!(
            AllocMode::from_linux(zero | keep),
            Some(AllocMode::ZeroRange { keep_size: true })
        );
        for refused in [
            punch,
            punch | zero | keep,
            libc::FALLOC_FL_COLLAPSE_RANGE,
            libc::FALLOC_FL_INSERT_RANGE,
            libc::FALLOC_FL_UNSHARE_RANGE,
            -1,
        ] {
            assert_eq!(AllocMode::from_linux(refused), None, "{refused:#x}");
        }
    }
}

#[cfg(test)]
mod squash_tests {
    use super::*;

    #[test]
    fn squash_modes_map_the_stated_identity() {
        let alice = Caller {
            uid: 1000,
            gid: 100,
            groups: vec![0, 27],
        };
        assert_eq!(Squash::None.apply(Caller::root()), Caller::root());
        assert_eq!(Squash::Root.apply(Caller::root()), Caller::nobody());
        assert_eq!(Squash::Root.apply(alice.clone()), alice);
        assert_eq!(Squash::All.apply(alice), Caller::nobody());
        assert_eq!("root".parse::<Squash>(), Ok(Squash::Root));
        assert!("roots".parse::<Squash>().is_err());
    }
}
