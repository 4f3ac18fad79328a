//! Abstract objects of the file service: the in-memory table entry for each slot and its
//! canonical encoding (piece 0 of the abstract object).

use super::locks::{LockId, LockTable};
use super::ops::{Attr, FileType, Name, Timespec};
use super::range_locks::RangeLockTable;
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// File data is split into chunks of this size; each chunk is one piece of the object.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Canonical block size reported in attributes and statfs.
pub const BLOCK_SIZE: u64 = 4096;
/// Constant file-system id in every attribute.
pub const FSID: u64 = 0x6266_7466_7331; // "bftfs1"
/// A directory's canonical size.
pub const DIR_SIZE: u64 = 4096;
/// Largest file: bounds the piece list of one object (131072 chunks) and the digest work a
/// single extending truncate can cause.
pub const MAX_FILE_SIZE: u64 = 8 << 30;
/// Largest read count and write size.
pub const MAX_IO: u64 = 1 << 20;
/// Most bytes one copy_file_range request copies (a shorter count is a valid answer, and
/// callers loop): bounds the work one request makes every replica do, as `MAX_IO` does for
/// writes, while saving the round trips of moving the data through the client.
pub const COPY_MAX: u64 = 8 << 20;
pub const NAME_MAX: usize = 255;
/// Longest symlink target (PATH_MAX without the NUL).
pub const TARGET_MAX: usize = 4095;
pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
/// Bound on all xattrs of one object together, so one header stays small.
pub const XATTR_TOTAL_MAX: usize = 256 * 1024;
pub const LINK_MAX: u32 = 65_000;
/// Largest directory: bounds the size of one header.
pub const DIR_ENTRIES_MAX: usize = 1 << 20;
/// Canonical statfs numbers: capacity never depends on the backend's free space.
pub const STATFS_BLOCKS: u64 = 1 << 30;
pub const STATFS_FILES: u64 = 1 << 32;

/// One live object in the wrapper's table.
#[derive(Clone, Debug)]
pub struct Obj {
    pub generation: u64,
    pub parent: u64,
    pub kind: FileType,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub rdev: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Exclusive-create verifier, kept until the first setattr.
    pub verifier: Option<u64>,
    pub xattrs: BTreeMap<Name, Vec<u8>>,
    /// Directory entries (name → index), in byte-wise name order by construction.
    pub entries: BTreeMap<Name, u64>,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Concrete side only (not abstract): the (directory, name) pairs naming this object in the
    /// mirror tree. Derived from directory entries.
    pub links: BTreeSet<(u64, Name)>,
    /// Piece digests (0 = header, 1.. = chunks); entries may be stale while the object is in
    /// the service's dirty set.
    pub pieces: Vec<Digest>,
    /// Chunks (1-based piece numbers) whose digests are stale.
    pub dirty_chunks: BTreeSet<u32>,
    /// Concrete inode number (not abstract): finds the node again after an unclean shutdown.
    pub ino: u64,
    /// The root only (0 in every other object): the newest agreed time, ns since the epoch,
    /// which clamps every later ordered time. It is replicated state like any other, so it
    /// lives in an object: digests cover it, rollback restores it, state transfer carries it.
    pub agreed_time: u64,
    /// The root only, from the first lock ever requested on: the lock table (see
    /// [`super::locks`]). Replicated state in the root for the reason `agreed_time` is.
    pub locks: Option<Box<LockTable>>,
    /// The root only: the fcntl/flock range locks of every client (see
    /// [`super::range_locks`]); empty elsewhere and while no client holds one.
    pub range_locks: RangeLockTable,
}

#[derive(Clone, Debug)]
pub enum Slot {
    Free { generation: u64 },
    Live(Box<Obj>),
}

impl Slot {
    pub fn generation(&self) -> u64 {
        match self {
            Slot::Free { generation } => *generation,
            Slot::Live(o) => o.generation,
        }
    }
    pub fn live(&self) -> Option<&Obj> {
        match self {
            Slot::Live(o) => Some(o),
            Slot::Free { .. } => None,
        }
    }
    pub fn live_mut(&mut self) -> Option<&mut Obj> {
        match self {
            Slot::Live(o) => Some(o),
            Slot::Free { .. } => None,
        }
    }
}

pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// Blocks (512-byte units) for a size: whole canonical blocks.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE) * (BLOCK_SIZE / 512)
}

impl Obj {
    /// The root directory of a new file system (slot 0), with the concrete inode number `ino`.
    pub fn new_root(ino: u64) -> Obj {
        let t = Timespec::default();
        Obj {
            generation: 1,
            parent: 0,
            kind: FileType::Directory,
            mode: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            size: DIR_SIZE,
            rdev: 0,
            atime: t,
            mtime: t,
            ctime: t,
            verifier: None,
            xattrs: Default::default(),
            entries: Default::default(),
            target: Vec::new(),
            links: Default::default(),
            pieces: vec![Digest::default()],
            dirty_chunks: Default::default(),
            ino,
            agreed_time: 0,
            locks: None,
            range_locks: RangeLockTable::default(),
        }
    }

    pub fn attr(&self, index: u64) -> Attr {
        Attr {
            kind: self.kind,
            mode: self.mode & 0o7777,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            blocks: if self.kind == FileType::Regular || self.kind == FileType::Directory {
                blocks_for(self.size)
            } else {
                0
            },
            rdev: self.rdev,
            fsid: FSID,
            fileid: index,
            generation: self.generation,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
        }
    }

    /// Number of data chunks (pieces after the header).
    pub fn chunks(&self) -> u64 {
        if self.kind == FileType::Regular {
            chunk_count(self.size)
        } else {
            0
        }
    }

    pub fn header(&self) -> ObjectHeader {
        let live = LiveHeader {
            generation: self.generation,
            parent: self.parent,
            kind: self.kind,
            mode: self.mode,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            rdev: self.rdev,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            verifier: self.verifier,
            xattrs: self
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            entries: self.entries.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            target: self.target.clone(),
            agreed_time: self.agreed_time,
        };
        if !self.range_locks.is_empty() {
            // Only while some client holds a range lock: a state without any encodes as it
            // did before range locks existed.
            return ObjectHeader::LiveRootRanges(
                live,
                self.locks.as_deref().cloned(),
                self.range_locks.clone(),
            );
        }
        match &self.locks {
            // Until a lock is first asked for, the root keeps the plain `Live` header, so
            // digests of states that never used locks are those of earlier versions.
            None => ObjectHeader::Live(live),
            Some(t) => ObjectHeader::LiveRoot(live, t.as_ref().clone()),
        }
    }
}

/// Piece 0 of every abstract object. Maps are flattened into sorted vectors so the encoding is
/// canonical; a decoded header is accepted only if it re-encodes to the same bytes.
///
/// Variants are only ever appended: `Free` and `Live` encode as they always did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectHeader {
    /// A free slot, with the next free slot (the free list is kept in index order, so
    /// allocation always takes the lowest free slot).
    Free {
        generation: u64,
        next_free: Option<u64>,
    },
    Live(LiveHeader),
    /// The root (index 0 only) once a lock has ever been asked for: its header and the lock
    /// table.
    LiveRoot(LiveHeader, LockTable),
    /// An object of an active lock as the ordered state sees it: a placeholder that does not
    /// depend on what the holder did under the lock (see `locks.rs`).
    Locked {
        lock: LockId,
    },
    /// The root (index 0 only) while some client holds a range lock: its header, the Zzyzx
    /// lock table if one was ever asked for, and the range locks (never empty here).
    LiveRootRanges(LiveHeader, Option<LockTable>, RangeLockTable),
}

/// The two-variant view of a header that code written before locks matches on (the
/// replica's simulator among it). `LiveRoot` reads as `Live`; a placeholder does not decode.
/// Encodes exactly as the same [`ObjectHeader`] variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Header {
    Free {
        generation: u64,
        next_free: Option<u64>,
    },
    Live(LiveHeader),
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        super::ops::encode(self)
    }

    /// Decodes and checks a header received from elsewhere; see
    /// [`ObjectHeader::decode_canonical`].
    pub fn decode_canonical(bytes: &[u8]) -> Result<Header, String> {
        match ObjectHeader::decode_canonical(bytes)? {
            ObjectHeader::Free {
                generation,
                next_free,
            } => Ok(Header::Free {
                generation,
                next_free,
            }),
            ObjectHeader::Live(l)
            | ObjectHeader::LiveRoot(l, _)
            | ObjectHeader::LiveRootRanges(l, ..) => Ok(Header::Live(l)),
            ObjectHeader::Locked { .. } => Err("a lock placeholder".into()),
        }
    }
}

impl ObjectHeader {
    pub fn encode(&self) -> Vec<u8> {
        super::ops::encode(self)
    }

    /// The live header, for `Live` and the root's variants.
    pub fn live(&self) -> Option<&LiveHeader> {
        match self {
            ObjectHeader::Live(l)
            | ObjectHeader::LiveRoot(l, _)
            | ObjectHeader::LiveRootRanges(l, ..) => Some(l),
            _ => None,
        }
    }

    /// Decodes and checks a header received from elsewhere (state transfer, rollback).
    pub fn decode_canonical(bytes: &[u8]) -> Result<ObjectHeader, String> {
        let h: ObjectHeader = super::ops::decode(bytes).ok_or("header does not decode")?;
        if h.encode() != bytes {
            return Err("header is not canonically encoded".into());
        }
        if let ObjectHeader::LiveRoot(l, table) = &h {
            if l.kind != FileType::Directory {
                return Err("a lock table outside a directory".into());
            }
            table.check()?;
        }
        if let ObjectHeader::LiveRootRanges(l, zzyzx, ranges) = &h {
            if l.kind != FileType::Directory {
                return Err("range locks outside a directory".into());
            }
            if ranges.is_empty() {
                return Err("an empty range-lock table (not canonical)".into());
            }
            ranges.check()?;
            if let Some(t) = zzyzx {
                t.check()?;
            }
        }
        if let Some(l) = h.live() {
            if l.entries.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err("directory entries not in strict name order".into());
            }
            if l.xattrs.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err("xattrs not in strict name order".into());
            }
            if l.kind != FileType::Directory && !l.entries.is_empty() {
                return Err("entries on a non-directory".into());
            }
            if l.kind != FileType::Symlink && !l.target.is_empty() {
                return Err("target on a non-symlink".into());
            }
            if l.kind == FileType::Regular && l.size > MAX_FILE_SIZE {
                return Err("file too large".into());
            }
            if l.entries.len() > DIR_ENTRIES_MAX {
                return Err("directory too large".into());
            }
            for (name, _) in &l.entries {
                if super::name_error(name).is_some() {
                    return Err("bad entry name".into());
                }
            }
        }
        Ok(h)
    }

    /// The table object for a decoded live header (the root's lock table included).
    pub fn into_obj(self) -> Option<Obj> {
        match self {
            ObjectHeader::Live(l) => Some(l.into_obj()),
            ObjectHeader::LiveRoot(l, t) => {
                let mut o = l.into_obj();
                o.locks = Some(Box::new(t));
                Some(o)
            }
            ObjectHeader::LiveRootRanges(l, t, ranges) => {
                let mut o = l.into_obj();
                o.locks = t.map(Box::new);
                o.range_locks = ranges;
                Some(o)
            }
            ObjectHeader::Free { .. } | ObjectHeader::Locked { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveHeader {
    pub generation: u64,
    pub parent: u64,
    pub kind: FileType,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub rdev: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub verifier: Option<u64>,
    pub xattrs: Vec<(Name, Vec<u8>)>,
    pub entries: Vec<(Name, u64)>,
    pub target: Vec<u8>,
    /// See [`Obj::agreed_time`].
    pub agreed_time: u64,
}

impl LiveHeader {
    pub fn into_obj(self) -> Obj {
        Obj {
            generation: self.generation,
            parent: self.parent,
            kind: self.kind,
            mode: self.mode,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            rdev: self.rdev,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            verifier: self.verifier,
            xattrs: self.xattrs.into_iter().collect(),
            entries: self.entries.into_iter().collect(),
            target: self.target,
            links: BTreeSet::new(),
            pieces: Vec::new(),
            dirty_chunks: BTreeSet::new(),
            ino: 0,
            agreed_time: self.agreed_time,
            locks: None,
            range_locks: RangeLockTable::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The root directory's header with `entries` as they are (unsorted or repeated too).
    fn live(entries: Vec<(Name, u64)>) -> Header {
        let ObjectHeader::Live(root) = Obj::new_root(0).header() else {
            unreachable!("a live object has a live header")
        };
        Header::Live(LiveHeader { entries, ..root })
    }

    #[test]
    fn canonical_headers_round_trip_and_others_are_refused() {
        let good = live(vec![(b"a".to_vec(), 1), (b"b".to_vec(), 2)]);
        let bytes = good.encode();
        assert_eq!(Header::decode_canonical(&bytes), Ok(good));
        let unsorted = live(vec![(b"b".to_vec(), 1), (b"a".to_vec(), 2)]).encode();
        assert!(Header::decode_canonical(&unsorted).is_err());
        let duplicate = live(vec![(b"a".to_vec(), 1), (b"a".to_vec(), 2)]).encode();
        assert!(Header::decode_canonical(&duplicate).is_err());
        let bad_name = live(vec![(b"a/b".to_vec(), 1)]).encode();
        assert!(Header::decode_canonical(&bad_name).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Header::decode_canonical(&trailing).is_err());
        assert!(Header::decode_canonical(&[]).is_err());
    }

    /// Headers written before locks existed keep their bytes, so their digests do not
    /// change; the two-variant view reads a root with a lock table as live.
    #[test]
    fn the_full_header_encodes_the_old_variants_unchanged() {
        let ObjectHeader::Live(root) = Obj::new_root(7).header() else {
            unreachable!("a live object has a live header")
        };
        let free = (
            Header::Free {
                generation: 3,
                next_free: Some(9),
            },
            ObjectHeader::Free {
                generation: 3,
                next_free: Some(9),
            },
        );
        assert_eq!(free.0.encode(), free.1.encode());
        assert_eq!(
            Header::Live(root.clone()).encode(),
            ObjectHeader::Live(root.clone()).encode()
        );
        let with_table = ObjectHeader::LiveRoot(root.clone(), LockTable::default()).encode();
        assert_eq!(
            Header::decode_canonical(&with_table),
            Ok(Header::Live(root))
        );
        let placeholder = ObjectHeader::Locked { lock: LockId(4) }.encode();
        assert!(ObjectHeader::decode_canonical(&placeholder).is_ok());
        assert!(Header::decode_canonical(&placeholder).is_err());
    }

    #[test]
    fn sizes_to_chunks_and_blocks() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_SIZE), 1);
        assert_eq!(chunk_count(CHUNK_SIZE + 1), 2);
        assert_eq!(blocks_for(0), 0);
        assert_eq!(blocks_for(1), 8);
        assert_eq!(blocks_for(4097), 16);
    }
}
