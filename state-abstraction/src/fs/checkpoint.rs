//! Checkpoints: copy-on-write records of old abstract values, btrfs snapshots, the saved
//! table, rollback and the state-transfer serving side.
//!
//! Record `c` holds the value at checkpoint `c` of every object first modified after `c` and
//! before the next checkpoint: its header and piece digests always (in memory, persisted with
//! the table), and for files the data chunks that were about to change, saved under
//! `cow/<c>/<index>` (a reflink of the whole file where the file system supports it). On a
//! btrfs subvolume the data comes from the read-only snapshot `snapshots/<c>` instead.
//!
//! The value of object `i` at checkpoint `c`: the first record `r >= c` that saved `i` has its
//! header; chunk `k` comes from the first record `r' >= r` that saved that chunk, else from the
//! live file (a file is saved whole before it is freed, so the live file is then the same
//! object).

use super::backend;
use super::install::Target;
use super::locks::LockId;
use super::object::{chunk_count, LiveHeader, ObjectHeader, Slot, CHUNK_SIZE};
use super::ops::FileType;
use super::{storage, FileService};
use crate::digest::{object_digest, piece_digest, Digest, PartitionTree};
use crate::service::{AbstractObject, SeqNo, ServiceError};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum SavedData {
    /// Not a file, or data kept in a snapshot.
    Nothing,
    /// The whole file as of the checkpoint (reflinked or fully copied).
    Whole,
    /// These chunks (0-based) were copied at their offsets.
    Chunks(BTreeSet<u64>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct SavedObj {
    pub header: Vec<u8>,
    pub pieces: Vec<Digest>,
    /// File size at the checkpoint (0 for non-files).
    pub size: u64,
    pub data: SavedData,
}

#[derive(Clone, Debug)]
pub(super) struct Record {
    pub seq: SeqNo,
    pub root: Digest,
    pub count: u64,
    pub tree: PartitionTree,
    pub saved: BTreeMap<u64, SavedObj>,
}

pub(super) struct Checkpoints {
    pub snapshot_mode: bool,
    /// Oldest first.
    pub records: Vec<Record>,
    /// Whether FICLONE works here (unknown until tried).
    pub reflink: Cell<Option<bool>>,
    /// Records discarded in memory whose files go once the table no longer lists them.
    pub doomed: Vec<SeqNo>,
}

pub(super) fn seq_name(seq: SeqNo) -> Vec<u8> {
    seq.to_string().into_bytes()
}

fn ensure_dir(dir: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
    ensure_dir_durable(dir, name, false)
}

/// Like [`ensure_dir`]; with `durable`, a directory it had to make is fsync'ed into its
/// parent, so that what is later written inside it (and fsync'ed) survives a power loss.
pub(super) fn ensure_dir_durable(dir: RawFd, name: &[u8], durable: bool) -> io::Result<OwnedFd> {
    let made = match backend::mkdirat(dir, name) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => return Err(e),
    };
    if made && durable {
        backend::fsync(dir)?;
    }
    backend::open_dir_at(dir, name)
}

/// Deletes every btrfs subvolume directly inside `dir/name` (snapshots), so the plain
/// recursive removal that follows can succeed. Errors are ignored: the directory may not be
/// on btrfs or may not exist.
pub(super) fn remove_snapshots_in(dir: RawFd, name: &[u8]) {
    if let Ok(d) = backend::open_dir_at(dir, name) {
        if let Ok(names) = backend::list_dir(d.as_raw_fd()) {
            for n in names {
                if let Ok(sub) = backend::open_dir_at(d.as_raw_fd(), &n) {
                    if backend::is_btrfs_subvolume(sub.as_raw_fd()) {
                        let _ = backend::btrfs_set_writable(sub.as_raw_fd());
                        drop(sub);
                        let _ = backend::btrfs_subvol_delete(d.as_raw_fd(), &n);
                    }
                }
            }
        }
    }
}

/// Chunks of a saved file in `start..end` (cut at its saved size) not saved yet.
pub(super) fn unsaved_chunks_of(s: &SavedObj, start: u64, end: u64) -> Vec<u64> {
    let end = end.min(s.size);
    if end <= start {
        return Vec::new();
    }
    match &s.data {
        SavedData::Chunks(have) => (start / CHUNK_SIZE..=(end - 1) / CHUNK_SIZE)
            .filter(|c| !have.contains(c))
            .collect(),
        _ => Vec::new(),
    }
}

/// Copies `chunks` of file `i` (open as `fd`, still holding the saved value there) into
/// `dir/<i>`, durably, and notes them in `s`. The first save of an object truncates any
/// leftover file and, where the file system can reflink, saves the whole file at once.
pub(super) fn save_chunks(
    reflink: &Cell<Option<bool>>,
    dir: RawFd,
    i: u64,
    s: &mut SavedObj,
    fd: RawFd,
    chunks: Vec<u64>,
) -> io::Result<()> {
    let whole = matches!(&s.data, SavedData::Chunks(have) if have.is_empty());
    let name = seq_name(i);
    // The first save of an epoch truncates any leftover from a rolled-back future.
    let out = if whole {
        backend::openat(
            dir,
            &name,
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        )?
    } else {
        backend::openat(dir, &name, libc::O_RDWR | libc::O_CREAT, 0o600)?
    };
    if whole && reflink.get() != Some(false) {
        match backend::reflink(fd, out.as_raw_fd()) {
            Ok(()) => {
                reflink.set(Some(true));
                s.data = SavedData::Whole;
                backend::fsync(out.as_raw_fd())?;
                backend::fsync(dir)?;
                return Ok(());
            }
            Err(_) => reflink.set(Some(false)),
        }
    }
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for c in chunks {
        let off = c * CHUNK_SIZE;
        let len = CHUNK_SIZE.min(s.size - off) as usize;
        let n = backend::pread_full(fd, &mut buf[..len], off)?;
        if n != len {
            return Err(io::Error::other(format!(
                "object {i}: file shorter than its saved size"
            )));
        }
        backend::pwrite_full(out.as_raw_fd(), &buf[..len], off)?;
        if let SavedData::Chunks(have) = &mut s.data {
            have.insert(c);
        }
    }
    backend::fsync(out.as_raw_fd())?;
    if whole {
        // The file was just created (or truncated): its name must be durable too.
        backend::fsync(dir)?;
    }
    Ok(())
}

impl Checkpoints {
    pub fn new(snapshot_mode: bool) -> Self {
        Checkpoints {
            snapshot_mode,
            records: Vec::new(),
            reflink: Cell::new(None),
            doomed: Vec::new(),
        }
    }

    pub fn list(&self) -> Vec<(SeqNo, Digest)> {
        self.records.iter().map(|r| (r.seq, r.root)).collect()
    }

    pub fn record(&self, seq: SeqNo) -> Option<&Record> {
        self.records.iter().find(|r| r.seq == seq)
    }

    fn position(&self, seq: SeqNo) -> Option<usize> {
        self.records.iter().position(|r| r.seq == seq)
    }

    pub fn needs_save(&self, i: u64) -> bool {
        match self.records.last() {
            Some(r) => i < r.count && !r.saved.contains_key(&i),
            None => false,
        }
    }

    pub fn save_header(&mut self, i: u64, header: Vec<u8>, pieces: Vec<Digest>, size: u64) {
        let data = if size == 0 || self.snapshot_mode {
            SavedData::Nothing
        } else {
            SavedData::Chunks(BTreeSet::new())
        };
        if let Some(r) = self.records.last_mut() {
            r.saved.insert(
                i,
                SavedObj {
                    header,
                    pieces,
                    size,
                    data,
                },
            );
        }
    }

    /// Chunks of `i` in `start..end` that still need saving in the newest record.
    fn unsaved_chunks(&self, i: u64, start: u64, end: u64) -> Vec<u64> {
        self.records
            .last()
            .and_then(|r| r.saved.get(&i))
            .map_or_else(Vec::new, |s| unsaved_chunks_of(s, start, end))
    }

    pub fn needs_data_save(&self, i: u64, start: u64, end: u64) -> bool {
        !self.unsaved_chunks(i, start, end).is_empty()
    }

    /// Saves the chunks of file `i` (open as `fd`) covering `start..end` into the newest
    /// record's copy-on-write file.
    pub fn save_data(
        &mut self,
        meta: &OwnedFd,
        i: u64,
        fd: RawFd,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let chunks = self.unsaved_chunks(i, start, end);
        if chunks.is_empty() {
            return Ok(());
        }
        let Some(r) = self.records.last_mut() else {
            return Ok(());
        };
        // The saved chunks are the undo data of a change that follows at once: they (and the
        // directories naming them) must be on disk before the change can be, see `journal_saved`.
        let cow = ensure_dir_durable(meta.as_raw_fd(), b"cow", true)?;
        let dir = ensure_dir_durable(cow.as_raw_fd(), &seq_name(r.seq), true)?;
        let Some(s) = r.saved.get_mut(&i) else {
            return Ok(());
        };
        save_chunks(&self.reflink, dir.as_raw_fd(), i, s, fd, chunks)
    }

    pub fn modified_since(&self, seq: SeqNo, current_count: u64) -> Option<Vec<u64>> {
        let pos = self.position(seq)?;
        let mut set: BTreeSet<u64> = BTreeSet::new();
        for r in &self.records[pos..] {
            set.extend(r.saved.keys().copied());
        }
        let count = self.records[pos].count;
        set.extend(count..current_count.max(count));
        // Slots that existed at `seq` but not now (after a rollback) count as modified too.
        Some(set.into_iter().collect())
    }

    /// The first saved value of `i` in records from `seq` on: (record position, value).
    fn saved_from(&self, seq: SeqNo, i: u64) -> Option<(usize, &SavedObj)> {
        let pos = self.position(seq)?;
        self.records[pos..]
            .iter()
            .enumerate()
            .find_map(|(k, r)| r.saved.get(&i).map(|s| (pos + k, s)))
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct TableFile {
    pub version: u32,
    /// Header, piece digests and concrete inode number of every slot.
    pub slots: Vec<(Vec<u8>, Vec<Digest>, u64)>,
    pub records: Vec<RecordFile>,
}

/// [`TableFile`] as written, borrowing the headers and digests (same encoding).
#[derive(Serialize)]
struct TableFileRef<'a> {
    version: u32,
    slots: Vec<(&'a [u8], &'a [Digest], u64)>,
    records: Vec<RecordFile>,
}

/// Version 4: version 3 and the masked slots. `slots` then holds the real values of masked
/// slots, whose ordered value (the placeholder) follows from `masked`. Written only while
/// some slot is masked, so a data directory that never had an active lock stays readable by
/// version-3 binaries.
#[derive(Serialize, Deserialize)]
struct TableFileV4 {
    version: u32,
    slots: Vec<(Vec<u8>, Vec<Digest>, u64)>,
    records: Vec<RecordFile>,
    masked: Vec<(u64, LockId)>,
}

/// Version 5: version 4 and the lock records (each active lock's saved activation values,
/// see `lock_timeline.rs`). Written while some slot is masked (or a lock record is kept);
/// version 4 is still read, with empty records.
#[derive(Serialize, Deserialize)]
struct TableFileV5 {
    version: u32,
    slots: Vec<(Vec<u8>, Vec<Digest>, u64)>,
    records: Vec<RecordFile>,
    masked: Vec<(u64, LockId)>,
    lock_records: Vec<LockRecordFile>,
}

#[derive(Serialize)]
struct TableFileV5Ref<'a> {
    version: u32,
    slots: Vec<(&'a [u8], &'a [Digest], u64)>,
    records: Vec<RecordFile>,
    masked: Vec<(u64, LockId)>,
    lock_records: Vec<LockRecordFile>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct LockRecordFile {
    pub lock: LockId,
    pub activated_seq: SeqNo,
    pub saved: Vec<(u64, SavedObj)>,
}

/// The journal: what the newest checkpoint record gained since the table was saved, appended
/// before the change it protects, so that a crashed replica can still roll back exactly.
/// Each entry is fsync'ed before the change it protects is made (see `journal_saved`), so it
/// covers a crash of the machine (power loss), not only of the process.
#[derive(Serialize, Deserialize)]
pub(super) enum JournalEntry {
    Saved {
        seq: SeqNo,
        index: u64,
        saved: SavedObj,
    },
    /// A lock record gained the activation value of `index` (or more of its chunks): the
    /// undo data of a locked entry, so that `lock_restart` after a crash still finds it.
    LockSaved {
        lock: LockId,
        index: u64,
        saved: SavedObj,
    },
}

#[derive(Serialize, Deserialize)]
pub(super) struct RecordFile {
    pub seq: SeqNo,
    pub root: Digest,
    pub count: u64,
    pub leaves: Vec<Digest>,
    pub saved: Vec<(u64, SavedObj)>,
}

/// 3: the newest agreed time moved from the table into the root's header. Version 2 is
/// upgraded on open (see `upgrade_v2.rs`).
pub(super) const TABLE_VERSION: u32 = 3;
/// See [`TableFileV4`].
const TABLE_VERSION_LOCKS_V4: u32 = 4;
/// See [`TableFileV5`].
const TABLE_VERSION_LOCKS: u32 = 5;

/// The format version of a table file: its first field, which every version starts with.
fn table_version(bytes: &[u8]) -> Option<u32> {
    bincode::serde::decode_from_slice::<u32, _>(bytes, table_config())
        .ok()
        .map(|(v, _)| v)
}

/// The entries of a journal file, in order. A torn last entry (a crash while appending) and
/// anything after it are ignored.
pub(super) fn journal_all(bytes: &[u8]) -> Vec<JournalEntry> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    while at + 4 <= bytes.len() {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let Some(payload) = bytes.get(at + 4..at + 4 + len) else {
            break;
        };
        at += 4 + len;
        let Ok((entry, _)) =
            bincode::serde::decode_from_slice::<JournalEntry, _>(payload, table_config())
        else {
            break;
        };
        entries.push(entry);
    }
    entries
}

/// The checkpoint saves of a journal file, in order (see [`journal_all`]).
pub(super) fn journal_entries(bytes: &[u8]) -> Vec<(SeqNo, u64, SavedObj)> {
    journal_all(bytes)
        .into_iter()
        .filter_map(|e| match e {
            JournalEntry::Saved { seq, index, saved } => Some((seq, index, saved)),
            JournalEntry::LockSaved { .. } => None,
        })
        .collect()
}

pub(super) fn table_config() -> impl bincode::config::Config {
    // The table is our own local file, not peer input; it may be large.
    bincode::config::standard()
}

impl FileService {
    /// Writes the table atomically (after syncing the tree, so the table never claims data the
    /// disk does not have).
    pub(super) fn save_table(&mut self) -> Result<(), ServiceError> {
        self.refresh_digests()?;
        self.fill_inodes();
        // Every digest is fresh now, so every cached header is too.
        let slots = self
            .slots
            .iter()
            .zip(&self.encoded)
            .map(|(slot, header)| match slot {
                Slot::Live(o) => (header.as_slice(), o.pieces.as_slice(), o.ino),
                Slot::Free { .. } => (header.as_slice(), &[][..], 0),
            })
            .collect();
        let records = self
            .ckpt
            .records
            .iter()
            .map(|r| RecordFile {
                seq: r.seq,
                root: r.root,
                count: r.count,
                leaves: r.tree.leaves().to_vec(),
                saved: r.saved.iter().map(|(k, v)| (*k, v.clone())).collect(),
            })
            .collect();
        let bytes = if self.masked.is_empty() && self.lock_records.is_empty() {
            let file = TableFileRef {
                version: TABLE_VERSION,
                slots,
                records,
            };
            bincode::serde::encode_to_vec(&file, table_config())
        } else {
            let file = TableFileV5Ref {
                version: TABLE_VERSION_LOCKS,
                slots,
                records,
                masked: self.masked.iter().map(|(i, l)| (*i, *l)).collect(),
                lock_records: self
                    .lock_records
                    .iter()
                    .map(|(l, r)| LockRecordFile {
                        lock: *l,
                        activated_seq: r.activated_seq,
                        saved: r.saved.iter().map(|(k, v)| (*k, v.clone())).collect(),
                    })
                    .collect(),
            };
            bincode::serde::encode_to_vec(&file, table_config())
        }
        .map_err(|e| storage(io::Error::other(format!("encoding the table: {e}"))))?;
        backend::syncfs(self.root_fd.as_raw_fd()).map_err(storage)?;
        self.replace_table(&bytes)?;
        let meta = self.meta_fd.as_raw_fd();
        self.journal = None;
        match backend::unlinkat(meta, b"journal", false) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(storage(e)),
        }
        match backend::unlinkat(meta, b"dirty", false) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(storage(e)),
        }
        self.unsaved = false;
        for seq in std::mem::take(&mut self.ckpt.doomed) {
            self.remove_record_files(seq);
        }
        // Lock records the durable table no longer lists (merged or undone locks).
        self.remove_doomed_lock_records();
        Ok(())
    }

    /// Replaces the table file by `bytes` atomically and durably: written beside it, fsync'ed,
    /// renamed over it, and the rename fsync'ed. A crash leaves the old table or the new one.
    pub(super) fn replace_table(&self, bytes: &[u8]) -> Result<(), ServiceError> {
        let meta = self.meta_fd.as_raw_fd();
        let tmp = backend::openat(
            meta,
            b"table.tmp",
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        )?;
        backend::pwrite_full(tmp.as_raw_fd(), bytes, 0)?;
        backend::fsync(tmp.as_raw_fd())?;
        drop(tmp);
        backend::renameat(meta, b"table.tmp", meta, b"table", false)?;
        backend::fsync(meta)?;
        Ok(())
    }

    /// Records the inode number of every object created since the last save (crash recovery
    /// finds nodes by it). An object whose node cannot be reached keeps 0 and is treated as
    /// missing by recovery.
    fn fill_inodes(&mut self) {
        let missing: Vec<u64> = (1..self.slots.len() as u64)
            .filter(|&i| self.slots[i as usize].live().is_some_and(|o| o.ino == 0))
            .collect();
        for i in missing {
            self.fds.get_mut().trim();
            let st = if self.orphans.contains(&i) {
                backend::open_dir_at(self.tree_fd.as_raw_fd(), b"orphans")
                    .and_then(|d| backend::fstatat(d.as_raw_fd(), i.to_string().as_bytes()))
            } else {
                self.location(i)
                    .and_then(|(dfd, name)| backend::fstatat(dfd, &name))
            };
            if let (Ok(st), Some(o)) = (st, self.slots[i as usize].live_mut()) {
                o.ino = st.st_ino;
            }
        }
    }

    fn remove_record_files(&self, seq: SeqNo) {
        let meta = self.meta_fd.as_raw_fd();
        if let Ok(cow) = backend::open_dir_at(meta, b"cow") {
            let _ = backend::remove_tree_at(cow.as_raw_fd(), &seq_name(seq));
        }
        if let Ok(snaps) = backend::open_dir_at(meta, b"snapshots") {
            if let Ok(s) = backend::open_dir_at(snaps.as_raw_fd(), &seq_name(seq)) {
                let _ = backend::btrfs_set_writable(s.as_raw_fd());
            }
            let _ = backend::btrfs_subvol_delete(snaps.as_raw_fd(), &seq_name(seq));
            let _ = backend::remove_tree_at(snaps.as_raw_fd(), &seq_name(seq));
        }
    }

    /// Loads the table written by [`Self::save_table`], repairs the tree after an unclean
    /// shutdown, and returns to the newest checkpoint if the saved state is later.
    pub(super) fn load(&mut self) -> Result<(), ServiceError> {
        let mut bytes = std::fs::read(self.data_dir.join("table"))?;
        let bad = |why: String| storage(io::Error::other(format!("table: {why}")));
        let version = table_version(&bytes);
        let upgraded = version == Some(2);
        match version {
            Some(2) => bytes = self.upgrade_from_v2(&bytes)?,
            Some(TABLE_VERSION | TABLE_VERSION_LOCKS_V4 | TABLE_VERSION_LOCKS) => {
                self.remove_v2_leftovers()?
            }
            // Refused below, with the version named.
            _ => {}
        }
        let (file, masked, lock_records) = match version {
            Some(TABLE_VERSION_LOCKS) => {
                let (f, _): (TableFileV5, usize) =
                    bincode::serde::decode_from_slice(&bytes, table_config())
                        .map_err(|e| bad(e.to_string()))?;
                let file = TableFile {
                    version: TABLE_VERSION,
                    slots: f.slots,
                    records: f.records,
                };
                (file, f.masked, f.lock_records)
            }
            Some(TABLE_VERSION_LOCKS_V4) => {
                let (f, _): (TableFileV4, usize) =
                    bincode::serde::decode_from_slice(&bytes, table_config())
                        .map_err(|e| bad(e.to_string()))?;
                let file = TableFile {
                    version: TABLE_VERSION,
                    slots: f.slots,
                    records: f.records,
                };
                (file, f.masked, Vec::new())
            }
            _ => {
                let (file, _): (TableFile, usize) =
                    bincode::serde::decode_from_slice(&bytes, table_config())
                        .map_err(|e| bad(e.to_string()))?;
                (file, Vec::new(), Vec::new())
            }
        };
        self.lock_records = lock_records
            .into_iter()
            .map(|r| {
                let rec = super::lock_timeline::LockRecord {
                    activated_seq: r.activated_seq,
                    saved: r.saved.into_iter().collect(),
                };
                (r.lock, rec)
            })
            .collect();
        if file.version != TABLE_VERSION {
            return Err(bad(format!("version {} not supported", file.version)));
        }
        self.slots.clear();
        self.free.clear();
        self.tree = PartitionTree::new();
        self.encoded.clear();
        self.masked = masked.into_iter().collect();
        for (i, (hb, pieces, ino)) in file.slots.into_iter().enumerate() {
            let i = i as u64;
            let header: ObjectHeader = super::ops::decode(&hb)
                .ok_or_else(|| bad(format!("object {i} does not decode")))?;
            match header {
                ObjectHeader::Free { generation, .. } => {
                    self.slots.push(Slot::Free { generation });
                    if !self.masked.contains_key(&i) {
                        self.free.insert(i);
                    }
                    self.tree
                        .set(i, object_digest(i, &[piece_digest(i, 0, &hb)]));
                }
                ObjectHeader::Locked { .. } => {
                    return Err(bad(format!("object {i}: a placeholder for a real value")));
                }
                header @ (ObjectHeader::Live(_)
                | ObjectHeader::LiveRoot(..)
                | ObjectHeader::LiveRootRanges(..)) => {
                    let Some(mut o) = header.into_obj() else {
                        unreachable!("a live header makes an object")
                    };
                    if pieces.len() != 1 + o.chunks() as usize {
                        return Err(bad(format!("object {i} has the wrong number of pieces")));
                    }
                    // The saved header must be the one the saved digests describe.
                    if pieces[0] != piece_digest(i, 0, &hb) {
                        return Err(bad(format!("object {i}: header does not match its digest")));
                    }
                    self.tree.set(i, object_digest(i, &pieces));
                    o.pieces = pieces;
                    o.ino = ino;
                    self.slots.push(Slot::Live(Box::new(o)));
                }
            }
            self.encoded.push(hb);
        }
        if let Some((&i, _)) = self.masked.range(self.slots.len() as u64..).next() {
            return Err(bad(format!("masked object {i} out of range")));
        }
        for (&i, &lock) in &self.masked {
            // A lock the root's table lacks is possible here (a restart in the middle of a
            // state transfer, before the root arrived); the transfer completes it.
            self.tree.set(i, super::locks::placeholder_digest(i, lock));
        }
        self.relink_all();
        for r in file.records {
            let mut tree = PartitionTree::new();
            for (i, d) in r.leaves.into_iter().enumerate() {
                tree.set(i as u64, d);
            }
            tree.root();
            self.ckpt.records.push(Record {
                seq: r.seq,
                root: r.root,
                count: r.count,
                tree,
                saved: r.saved.into_iter().collect(),
            });
        }
        let crashed = self.data_dir.join("dirty").exists();
        let mut by_inode = false;
        if crashed {
            self.unsaved = true;
            self.replay_journal()?;
            by_inode = self.recover_after_crash()?;
        }
        if let Some(newest) = self.ckpt.records.last() {
            let (seq, root) = (newest.seq, newest.root);
            if !newest.saved.is_empty() || newest.count != self.slots.len() as u64 || crashed {
                self.rollback_with(seq, crashed)?;
            }
            if by_inode {
                self.remove_strays()?;
                let now = self.tree.root();
                // An upgraded record keeps its version-2 digest as its name (see `upgrade_v2`),
                // which its version-3 tree does not hash to.
                if now != root && !upgraded {
                    tracing::error!(%seq, "file service: state after crash recovery does not match checkpoint {seq}; state transfer must repair it");
                }
            }
        }
        self.remove_stray_lock_records();
        // A state saved right after a merge of content this replica lacked names objects
        // it does not have: requests answer `Io` until state transfer repairs it.
        self.check_consistency();
        Ok(())
    }

    /// Appends the newest record's saved value of `i` to the journal.
    pub(super) fn journal_saved(&mut self, i: u64) -> Result<(), super::ops::FsError> {
        let Some(r) = self.ckpt.records.last() else {
            return Ok(());
        };
        let Some(saved) = r.saved.get(&i) else {
            return Ok(());
        };
        let entry = JournalEntry::Saved {
            seq: r.seq,
            index: i,
            saved: saved.clone(),
        };
        self.journal_append(&entry)
    }

    /// Appends `entry` to the journal, durably, before the change it protects is made.
    pub(super) fn journal_append(
        &mut self,
        entry: &JournalEntry,
    ) -> Result<(), super::ops::FsError> {
        let payload = bincode::serde::encode_to_vec(entry, table_config())
            .map_err(|_| super::ops::FsError::Io)?;
        let mut buf = (payload.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&payload);
        if let Some(batch) = self.journal_batch.as_mut() {
            batch.extend_from_slice(&buf);
            return Ok(());
        }
        self.journal_write(&buf)
    }

    /// Runs `f` with its journal entries gathered and written, with one fsync, when it
    /// ends. Only for work that changes nothing on disk before it ends (masking and
    /// unmasking a lock's slots at a checkpoint: table changes only, saved with the table),
    /// where the fsync per entry buys nothing: it made a merge of a 16,384-slot lock take
    /// 2 s of ordering time.
    pub(super) fn with_batched_journal<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, super::ops::FsError>,
    ) -> Result<T, super::ops::FsError> {
        let outer = self.journal_batch.is_none();
        if outer {
            self.journal_batch = Some(Vec::new());
        }
        let result = f(self);
        if outer {
            let batch = self.journal_batch.take().unwrap_or_default();
            if !batch.is_empty() {
                self.journal_write(&batch)?;
            }
        }
        result
    }

    /// Appends framed journal entries and makes them durable.
    fn journal_write(&mut self, buf: &[u8]) -> Result<(), super::ops::FsError> {
        let io = |e: io::Error| backend::fs_error(&e);
        if self.journal.is_none() {
            let fd = backend::openat(
                self.meta_fd.as_raw_fd(),
                b"journal",
                libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
                0o600,
            )
            .map_err(io)?;
            // The journal's name must be durable before any entry in it can matter.
            backend::fsync(self.meta_fd.as_raw_fd()).map_err(io)?;
            self.journal = Some(fd);
        }
        if let Some(fd) = &self.journal {
            // With O_APPEND the offset is ignored: one write appends the whole entry.
            backend::pwrite_full(fd.as_raw_fd(), buf, 0).map_err(io)?;
            // Why an fsync per entry: the change this entry undoes is made next, and the
            // kernel may write that change back to disk at any moment, before the journal's
            // page. Without the entry on disk, a power loss could leave a tree that no longer
            // holds the checkpoint's value and nothing to restore it from; the replica would
            // then replay its log over a wrong state. The cost is one fsync per object first
            // changed after a checkpoint (not per write), and none for objects created after it.
            backend::fsync(fd.as_raw_fd()).map_err(io)?;
        }
        Ok(())
    }

    /// Folds the journal into the checkpoint records (a later entry for an object replaces an
    /// earlier one: it carries more saved chunks). A torn last entry is ignored.
    fn replay_journal(&mut self) -> Result<(), ServiceError> {
        let bytes = match std::fs::read(self.data_dir.join("journal")) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(storage(e)),
        };
        for entry in journal_all(&bytes) {
            match entry {
                JournalEntry::Saved { seq, index, saved } => {
                    if let Some(r) = self.ckpt.records.iter_mut().find(|r| r.seq == seq) {
                        r.saved.insert(index, saved);
                    }
                }
                JournalEntry::LockSaved { lock, index, saved } => {
                    self.replay_lock_saved(lock, index, saved);
                }
            }
        }
        Ok(())
    }

    /// After an unclean shutdown without snapshots: finds every node of the tree by its inode
    /// number, so the table's idea of where objects are matches the tree again; unknown nodes
    /// (made after the table was saved) are set aside. The rollback that follows then restores
    /// the checkpoint exactly.
    fn locate_by_inode(&mut self) -> Result<(), ServiceError> {
        self.fds.get_mut().dirs.clear();
        self.fds.get_mut().files.clear();
        let by_ino: BTreeMap<u64, u64> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.live()
                    .filter(|o| o.ino != 0 && i != 0)
                    .map(|o| (o.ino, i as u64))
            })
            .collect();
        for s in self.slots.iter_mut() {
            if let Some(o) = s.live_mut() {
                o.links.clear();
            }
        }
        self.orphans.clear();
        let tree = self.tree_fd.as_raw_fd();
        backend::mkdirat(tree, b"orphans").or_else(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let orphans = backend::open_dir_at(tree, b"orphans")?;
        // Moves node `name` of `dir` to orphans/`target`, in place of whatever stood there.
        let set_aside = |dir: RawFd, name: &[u8], target: &[u8]| -> Result<(), ServiceError> {
            backend::remove_tree_at(orphans.as_raw_fd(), target).map_err(storage)?;
            backend::renameat(dir, name, orphans.as_raw_fd(), target, false)?;
            Ok(())
        };
        // Nodes in the work areas move to orphans/<index> (known) or go (unknown).
        for area in [&b"stage"[..], b"orphans"] {
            let Ok(dir) = backend::open_dir_at(tree, area) else {
                continue;
            };
            for name in backend::list_dir(dir.as_raw_fd())? {
                let st = backend::fstatat(dir.as_raw_fd(), &name)?;
                match by_ino.get(&st.st_ino) {
                    Some(&j) if self.kind_matches(j, st.st_mode) && !self.orphans.contains(&j) => {
                        let target = j.to_string().into_bytes();
                        if area != b"orphans" || name != target {
                            set_aside(dir.as_raw_fd(), &name, &target)?;
                        }
                        self.orphans.insert(j);
                    }
                    _ => {}
                }
            }
        }
        // Walk the tree from the root; unknown directories are searched too (a known object
        // may have been moved into one), and known objects found inside them are rescued.
        // Pending directories are kept as paths, not descriptors, so a wide tree cannot run
        // out of descriptors.
        type Path = Vec<Vec<u8>>;
        let open_path = |p: &Path| -> io::Result<OwnedFd> {
            let mut fd = backend::open_dir_at(tree, &p[0])?;
            for name in &p[1..] {
                fd = backend::open_dir_at(fd.as_raw_fd(), name)?;
            }
            Ok(fd)
        };
        let mut queue: Vec<(Option<u64>, Path)> = vec![(Some(0), vec![b"root".to_vec()])];
        for &j in &self.orphans {
            if self.slots[j as usize]
                .live()
                .is_some_and(|o| o.kind == FileType::Directory)
            {
                queue.push((
                    Some(j),
                    vec![b"orphans".to_vec(), j.to_string().into_bytes()],
                ));
            }
        }
        let mut strays: Vec<(Path, Vec<u8>)> = Vec::new();
        while let Some((d, path)) = queue.pop() {
            let dfd = open_path(&path)?;
            for name in backend::list_dir(dfd.as_raw_fd())? {
                let st = backend::fstatat(dfd.as_raw_fd(), &name)?;
                let is_dir = backend::is_dir_mode(st.st_mode);
                let known = by_ino
                    .get(&st.st_ino)
                    .copied()
                    .filter(|&j| self.kind_matches(j, st.st_mode));
                let mut child = path.clone();
                child.push(name.clone());
                match (known, d) {
                    (Some(j), Some(d)) if !self.orphans.contains(&j) => {
                        if let Some(o) = self.slots[j as usize].live_mut() {
                            o.links.insert((d, name.clone()));
                        }
                        if is_dir {
                            queue.push((Some(j), child));
                        }
                    }
                    (Some(j), None)
                        if !self.orphans.contains(&j)
                            && self.slots[j as usize]
                                .live()
                                .is_none_or(|o| o.links.is_empty()) =>
                    {
                        let target = j.to_string().into_bytes();
                        set_aside(dfd.as_raw_fd(), &name, &target)?;
                        self.orphans.insert(j);
                        if is_dir {
                            queue.push((Some(j), vec![b"orphans".to_vec(), target]));
                        }
                    }
                    _ => {
                        if is_dir {
                            queue.push((None, child));
                        }
                        if d.is_some() {
                            strays.push((path.clone(), name.clone()));
                        }
                    }
                }
            }
        }
        // Stray nodes go after the walk, once everything known inside them is safe. A stray's
        // parent is a known directory, which the walk did not move.
        for (parent, name) in strays.into_iter().rev() {
            let pfd = open_path(&parent)?;
            backend::remove_tree_at(pfd.as_raw_fd(), &name).map_err(storage)?;
        }
        // Whatever changed since the checkpoint is rewritten in full by the rollback: its
        // recorded chunk digests may not describe what is on disk now.
        let pos = self.ckpt.records.len().saturating_sub(1);
        let modified: BTreeSet<u64> = self.ckpt.records[pos..]
            .iter()
            .flat_map(|r| r.saved.keys().copied())
            .collect();
        for i in modified {
            if let Some(o) = self.slots.get_mut(i as usize).and_then(Slot::live_mut) {
                o.dirty_chunks = (1..=o.chunks() as u32).collect();
            }
        }
        self.inconsistent = false;
        Ok(())
    }

    fn kind_matches(&self, j: u64, mode: libc::mode_t) -> bool {
        let t = mode & libc::S_IFMT;
        match self
            .slots
            .get(j as usize)
            .and_then(Slot::live)
            .map(|o| o.kind)
        {
            Some(FileType::Directory) => t == libc::S_IFDIR,
            Some(FileType::Symlink) => t == libc::S_IFLNK,
            Some(_) => t == libc::S_IFREG,
            None => false,
        }
    }

    /// Removes names in the tree that no directory entry accounts for, and orphans that are
    /// not (after crash recovery).
    fn remove_strays(&mut self) -> Result<(), ServiceError> {
        for d in 0..self.slots.len() as u64 {
            self.fds.get_mut().trim();
            let Some(o) = self.slots[d as usize].live() else {
                continue;
            };
            if o.kind != FileType::Directory {
                continue;
            }
            let wanted: BTreeSet<Vec<u8>> = o.entries.keys().cloned().collect();
            let dfd = self.dir_fd(d).map_err(storage)?;
            for name in backend::list_dir(dfd).map_err(storage)? {
                if !wanted.contains(&name) {
                    backend::remove_tree_at(dfd, &name).map_err(storage)?;
                }
            }
        }
        if let Ok(orphans) = backend::open_dir_at(self.tree_fd.as_raw_fd(), b"orphans") {
            for name in backend::list_dir(orphans.as_raw_fd()).map_err(storage)? {
                let keep = std::str::from_utf8(&name)
                    .ok()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|j| self.orphans.contains(&j));
                if !keep {
                    backend::remove_tree_at(orphans.as_raw_fd(), &name).map_err(storage)?;
                }
            }
        }
        Ok(())
    }

    /// Recomputes every object's concrete links from the directory entries.
    pub(super) fn relink_all(&mut self) {
        let mut links: BTreeMap<u64, BTreeSet<(u64, Vec<u8>)>> = BTreeMap::new();
        for (d, s) in self.slots.iter().enumerate() {
            if let Some(o) = s.live() {
                for (name, &j) in &o.entries {
                    links.entry(j).or_default().insert((d as u64, name.clone()));
                }
            }
        }
        for (j, s) in self.slots.iter_mut().enumerate() {
            if let Some(o) = s.live_mut() {
                o.links = links.remove(&(j as u64)).unwrap_or_default();
            }
        }
    }

    /// After an unclean shutdown the tree is ahead of the table. On btrfs the tree is replaced
    /// by the newest snapshot (exact). Otherwise, with a checkpoint, nodes are found by inode
    /// number and the rollback in `load` restores the checkpoint (exact); without one, the
    /// tree is reconciled with the table by name and file data rehashed. Returns whether
    /// nodes were found by inode number (then `load` removes strays after its rollback).
    ///
    /// On btrfs too, nodes are found by inode number once a lock's entries changed its
    /// members: the snapshot holds them as the lock timeline had them at the checkpoint,
    /// which no record describes (lock records hold activation values, and the table may
    /// have been saved later), while found by inode they are where the table's links say
    /// and `lock_restart` rewrites every changed one from its record.
    fn recover_after_crash(&mut self) -> Result<bool, ServiceError> {
        let meta = self.meta_fd.as_raw_fd();
        let lock_changed = self.lock_records.values().any(|r| !r.saved.is_empty());
        if self.ckpt.snapshot_mode && !lock_changed {
            if let Some(newest) = self.ckpt.records.last() {
                let seq = newest.seq;
                // The table holds a later state plus, in the newest record, the values at the
                // checkpoint of what changed since: put those back, then take the snapshot's tree.
                let saved: Vec<(u64, SavedObj)> =
                    newest.saved.iter().map(|(k, v)| (*k, v.clone())).collect();
                let count = newest.count;
                for (i, s) in saved {
                    let h: ObjectHeader = super::ops::decode(&s.header)
                        .ok_or_else(|| storage(io::Error::other("saved header")))?;
                    let slot = match h {
                        ObjectHeader::Locked { lock } => {
                            // Masked at the checkpoint: the real value stays as the table has
                            // it (lock-timeline state), and the slot is masked again.
                            self.masked.insert(i, lock);
                            continue;
                        }
                        ObjectHeader::Free { generation, .. } => Slot::Free { generation },
                        h => {
                            let Some(mut o) = h.into_obj() else {
                                unreachable!("a live header makes an object")
                            };
                            o.pieces = s.pieces.clone();
                            Slot::Live(Box::new(o))
                        }
                    };
                    self.masked.remove(&i);
                    self.slots[i as usize] = slot;
                    self.encoded[i as usize] = s.header.clone();
                }
                self.slots.truncate(count as usize);
                self.encoded.truncate(count as usize);
                self.masked.retain(|&i, _| i < count);
                self.free = (0..count)
                    .filter(|&i| {
                        self.slots[i as usize].live().is_none() && !self.masked.contains_key(&i)
                    })
                    .collect();
                if let Some(r) = self.ckpt.records.last_mut() {
                    r.saved.clear();
                }
                self.tree = self
                    .ckpt
                    .records
                    .last()
                    .map(|r| r.tree.clone())
                    .unwrap_or_default();
                self.relink_all();
                self.fds.get_mut().dirs.clear();
                self.fds.get_mut().files.clear();
                let snaps = backend::open_dir_at(meta, b"snapshots")?;
                super::remove_any_at(meta, b"tree")?;
                let snap = backend::open_dir_at(snaps.as_raw_fd(), &seq_name(seq))?;
                backend::btrfs_snapshot(snap.as_raw_fd(), meta, b"tree", false)?;
                self.tree_fd = backend::open_dir_at(meta, b"tree")?;
                self.root_fd = backend::open_dir_at(self.tree_fd.as_raw_fd(), b"root")?;
                return Ok(false);
            }
        }
        if !self.ckpt.records.is_empty() {
            self.locate_by_inode()?;
            return Ok(true);
        }
        self.reconcile_tree()?;
        Ok(false)
    }

    /// Makes the concrete tree match the table by name and type, then marks all data stale.
    fn reconcile_tree(&mut self) -> Result<(), ServiceError> {
        self.fds.get_mut().dirs.clear();
        self.fds.get_mut().files.clear();
        let mut first_seen: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
        let mut queue = vec![0u64];
        while let Some(d) = queue.pop() {
            self.fds.get_mut().trim();
            let dfd = self.dir_fd(d).map_err(storage)?;
            let entries: Vec<(Vec<u8>, u64)> = self
                .live(d)
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let wanted: BTreeMap<Vec<u8>, u64> = entries.iter().cloned().collect();
            for name in backend::list_dir(dfd).map_err(storage)? {
                let keep = match wanted.get(&name) {
                    Some(&j) => {
                        let o = self.live(j);
                        match backend::fstatat(dfd, &name) {
                            Ok(st) => {
                                let t = st.st_mode & libc::S_IFMT;
                                match o.kind {
                                    FileType::Directory => t == libc::S_IFDIR,
                                    FileType::Symlink => t == libc::S_IFLNK,
                                    _ => t == libc::S_IFREG,
                                }
                            }
                            Err(_) => false,
                        }
                    }
                    None => false,
                };
                if !keep {
                    backend::remove_tree_at(dfd, &name).map_err(storage)?;
                }
            }
            for (name, j) in entries {
                let kind = self.live(j).kind;
                let exists = backend::fstatat(dfd, &name).is_ok();
                match kind {
                    FileType::Directory => {
                        if !exists {
                            backend::mkdirat(dfd, &name)?;
                        }
                        queue.push(j);
                    }
                    FileType::Symlink => {
                        if !exists {
                            backend::symlinkat(&self.live(j).target.clone(), dfd, &name)?;
                        }
                    }
                    _ => {
                        if let Some((fd0, n0)) = first_seen.get(&j).cloned() {
                            // Later links of one file must be the same inode as the first.
                            let a = backend::fstatat(self.dir_fd(fd0).map_err(storage)?, &n0)?;
                            let b = backend::fstatat(dfd, &name).ok();
                            if b.map(|b| b.st_ino) != Some(a.st_ino) {
                                let _ = backend::unlinkat(dfd, &name, false);
                                backend::linkat(
                                    self.dir_fd(fd0).map_err(storage)?,
                                    &n0,
                                    dfd,
                                    &name,
                                )?;
                            }
                        } else {
                            if !exists {
                                drop(backend::create_file_at(dfd, &name)?);
                            }
                            first_seen.insert(j, (d, name.clone()));
                            if kind == FileType::Regular {
                                let size = self.live(j).size;
                                let f = backend::open_file_at(dfd, &name)?;
                                backend::ftruncate(f.as_raw_fd(), size)?;
                                let o = self.live_mut(j);
                                o.dirty_chunks = (1..=chunk_count(size) as u32).collect();
                            }
                        }
                    }
                }
            }
        }
        self.dirty.extend(0..self.slots.len() as u64);
        self.refresh_digests()
    }

    pub(super) fn take_checkpoint(&mut self, seq: SeqNo) -> Result<Digest, ServiceError> {
        if let Some(last) = self.ckpt.records.last() {
            if seq <= last.seq {
                return Err(storage(io::Error::other(format!(
                    "checkpoint {seq} is not after the newest checkpoint {}",
                    last.seq
                ))));
            }
        }
        // The scrub first: it re-hashes the objects modified since the last checkpoint, which
        // the refresh forgets, and its damage marks record leaves with real digests.
        let damaged = self.scrub();
        self.refresh_digests()?;
        self.mark_damaged_in_checkpoints(&damaged);
        // Lock transitions happen here and only here (see `locks.rs`), on fresh digests.
        self.lock_transitions(seq)?;
        self.refresh_digests()?;
        let root = self.tree.root();
        if self.ckpt.snapshot_mode {
            let snaps = ensure_dir(self.meta_fd.as_raw_fd(), b"snapshots")?;
            let name = seq_name(seq);
            let _ = backend::btrfs_subvol_delete(snaps.as_raw_fd(), &name);
            backend::btrfs_snapshot(self.tree_fd.as_raw_fd(), snaps.as_raw_fd(), &name, true)?;
        }
        // A leftover copy-on-write directory for this number (from a rolled-back future) is stale.
        if let Ok(cow) = backend::open_dir_at(self.meta_fd.as_raw_fd(), b"cow") {
            backend::remove_tree_at(cow.as_raw_fd(), &seq_name(seq)).map_err(storage)?;
        }
        self.ckpt.records.push(Record {
            seq,
            root,
            count: self.slots.len() as u64,
            tree: self.tree.clone(),
            saved: BTreeMap::new(),
        });
        self.save_table()?;
        Ok(root)
    }

    pub(super) fn discard(&mut self, seq: SeqNo) {
        let keep_from = self
            .ckpt
            .records
            .iter()
            .position(|r| r.seq >= seq)
            .unwrap_or(self.ckpt.records.len());
        let gone: Vec<SeqNo> = self
            .ckpt
            .records
            .drain(..keep_from)
            .map(|r| r.seq)
            .collect();
        self.ckpt.doomed.extend(gone);
    }

    pub(super) fn rollback(&mut self, seq: SeqNo) -> Result<(), ServiceError> {
        self.rollback_with(seq, false)
    }

    /// [`Self::rollback`]; with `restart_locks` (crash recovery), the members that active
    /// locks' entries changed go back to their activation content in the same install as
    /// the ordered objects: after a crash their table values and nodes may not agree (the
    /// entries ran after the table was saved), and one install places both kinds of node,
    /// whichever names the other.
    pub(super) fn rollback_with(
        &mut self,
        seq: SeqNo,
        restart_locks: bool,
    ) -> Result<(), ServiceError> {
        self.ckpt
            .position(seq)
            .ok_or(ServiceError::NoCheckpoint(seq))?;
        // Locks activated after `seq` are undone here. Their members go back to their
        // activation content first: the ordered records from before the activation saved
        // only their headers (data comes from the live files), and that content is what
        // those records describe.
        let undone: Vec<LockId> = self
            .lock_records
            .iter()
            .filter(|(_, r)| r.activated_seq > seq)
            .map(|(l, _)| *l)
            .collect();
        for &l in &undone {
            self.restart_lock(l)?;
        }
        let pos = self
            .ckpt
            .position(seq)
            .ok_or(ServiceError::NoCheckpoint(seq))?;
        let count = self.ckpt.records[pos].count;
        let modified = self
            .ckpt
            .modified_since(seq, self.slots.len() as u64)
            .ok_or(ServiceError::NoCheckpoint(seq))?;
        let mut items = BTreeMap::new();
        let mut remask = BTreeMap::new();
        for i in modified {
            if i < count {
                let t = self
                    .target_at(seq, i)?
                    .ok_or(ServiceError::NoCheckpoint(seq))?;
                if let ObjectHeader::Locked { lock } = t.header {
                    // Masked at `seq`: the ordered value is the placeholder. A slot unmasked
                    // since gets the content its lock merged with (the lock's record went
                    // with the merge, so its timeline is not rolled back further); one still
                    // masked keeps its lock-timeline content, which no ordered rollback
                    // touches.
                    remask.insert(i, lock);
                    if let Some(real) = self.real_value_after(seq, i)? {
                        items.insert(i, Some(real));
                    }
                    continue;
                }
                items.insert(i, Some(t));
            } else if i < self.slots.len() as u64 {
                items.insert(i, None);
            }
        }
        let mut restarted: Vec<(LockId, Vec<u64>)> = Vec::new();
        if restart_locks {
            let active: Vec<LockId> = self
                .lock_records
                .iter()
                .filter(|(_, r)| r.activated_seq <= seq && !r.saved.is_empty())
                .map(|(l, _)| *l)
                .collect();
            for l in active {
                let mut slots = Vec::new();
                for (i, t) in self.restart_items(l)? {
                    if let std::collections::btree_map::Entry::Vacant(v) = items.entry(i) {
                        v.insert(t);
                        slots.push(i);
                    }
                }
                restarted.push((l, slots));
            }
        }
        self.install(items, false)?;
        for (i, lock) in remask {
            self.masked.insert(i, lock);
            self.free.remove(&i);
            self.dirty.insert(i);
        }
        for (l, slots) in restarted {
            self.remask(l, &slots);
        }
        self.slots.truncate(count as usize);
        self.encoded.truncate(count as usize);
        self.masked.retain(|&i, _| i < count);
        self.free.retain(|&i| i < count);
        self.dirty.retain(|&i| i < count);
        let dropped: Vec<SeqNo> = self.ckpt.records.drain(pos + 1..).map(|r| r.seq).collect();
        let rec = &mut self.ckpt.records[pos];
        rec.saved.clear();
        self.tree = rec.tree.clone();
        for s in dropped.into_iter().chain([seq]) {
            if let Ok(cow) = backend::open_dir_at(self.meta_fd.as_raw_fd(), b"cow") {
                backend::remove_tree_at(cow.as_raw_fd(), &seq_name(s)).map_err(storage)?;
            }
            if s != seq {
                self.ckpt.doomed.push(s);
            }
        }
        for l in undone {
            self.drop_lock_record(l);
        }
        // Persist at once: the saved table and the journal describe the abandoned future
        // (saves whose copy-on-write files are now gone), which a crash must not bring back.
        self.save_table()
    }

    /// The real value of slot `i`, masked at checkpoint `seq` and unmasked since: its first
    /// unmasked value at a later checkpoint (the merge's), or `None` if it has been masked
    /// ever since (its current real value is then the one). A merge happens only at a
    /// checkpoint, so the first later unmasked value is the content the lock merged with.
    fn real_value_after(&self, seq: SeqNo, i: u64) -> Result<Option<Target>, ServiceError> {
        let Some((p, _)) = self.ckpt.saved_from(seq, i) else {
            return Ok(None);
        };
        let later: Vec<SeqNo> = self.ckpt.records[p + 1..].iter().map(|r| r.seq).collect();
        for r in later {
            match self.target_at(r, i)? {
                Some(t) if !matches!(t.header, ObjectHeader::Locked { .. }) => return Ok(Some(t)),
                _ => {}
            }
        }
        Ok(None)
    }

    /// The header of object `i` at checkpoint `seq` for finding names in a snapshot: the
    /// real header where the ordered one is a placeholder (a file outside a lock can sit in
    /// a masked directory, and the snapshot holds real names).
    fn path_header_at(&self, seq: SeqNo, i: u64) -> Result<Option<ObjectHeader>, ServiceError> {
        match self.header_at(seq, i)? {
            Some(ObjectHeader::Locked { .. }) => {
                if let Some(t) = self.real_value_after(seq, i)? {
                    return Ok(Some(t.header));
                }
                Ok(self.masked.contains_key(&i).then(|| self.real_header_of(i)))
            }
            other => Ok(other),
        }
    }

    /// The header of object `i` at checkpoint `seq`.
    fn header_at(&self, seq: SeqNo, i: u64) -> Result<Option<ObjectHeader>, ServiceError> {
        let rec = self
            .ckpt
            .record(seq)
            .ok_or(ServiceError::NoCheckpoint(seq))?;
        if i >= rec.count {
            return Ok(None);
        }
        if let Some((_, s)) = self.ckpt.saved_from(seq, i) {
            return Ok(super::ops::decode(&s.header));
        }
        if i as usize >= self.slots.len() {
            return Ok(None);
        }
        Ok(Some(self.header_of(i)))
    }

    pub(super) fn pieces_at(&self, seq: SeqNo, i: u64) -> Option<Vec<Digest>> {
        let rec = self.ckpt.record(seq)?;
        if i >= rec.count {
            return None;
        }
        if let Some((_, s)) = self.ckpt.saved_from(seq, i) {
            return Some(s.pieces.clone());
        }
        if let Some(&lock) = self.masked.get(&i) {
            let bytes = ObjectHeader::Locked { lock }.encode();
            return Some(vec![piece_digest(i, 0, &bytes)]);
        }
        match self.slots.get(i as usize)? {
            Slot::Live(o) if o.dirty_chunks.is_empty() && !self.dirty.contains(&i) => {
                Some(o.pieces.clone())
            }
            Slot::Live(_) => None,
            Slot::Free { .. } => Some(vec![piece_digest(i, 0, &self.header_of(i).encode())]),
        }
    }

    /// One piece of object `i` at checkpoint `seq`.
    pub(super) fn piece_at(
        &self,
        seq: SeqNo,
        i: u64,
        piece: u32,
    ) -> Result<Option<Vec<u8>>, ServiceError> {
        let Some(header) = self.header_at(seq, i)? else {
            return Ok(None);
        };
        if piece == 0 {
            return Ok(Some(header.encode()));
        }
        let Some(l) = header.live() else {
            return Ok(None);
        };
        let chunk = piece as u64 - 1;
        if l.kind != FileType::Regular || chunk >= chunk_count(l.size) {
            return Ok(None);
        }
        let start = chunk * CHUNK_SIZE;
        let len = CHUNK_SIZE.min(l.size - start) as usize;
        let mut buf = vec![0u8; len];
        let fd = self.chunk_source(seq, i, chunk)?;
        let raw = match &fd {
            Some(f) => f.as_raw_fd(),
            None => self.file_fd(i).map_err(storage)?,
        };
        let n = backend::pread_full(raw, &mut buf, start).map_err(storage)?;
        if n != len {
            return Err(storage(io::Error::other(format!(
                "object {i} chunk {chunk}: source too short"
            ))));
        }
        Ok(Some(buf))
    }

    /// Where chunk `chunk` of `i` as of `seq` lives: an opened saved copy, or `None` for the
    /// live file.
    fn chunk_source(
        &self,
        seq: SeqNo,
        i: u64,
        chunk: u64,
    ) -> Result<Option<OwnedFd>, ServiceError> {
        if self.ckpt.snapshot_mode {
            return self.snapshot_file(seq, i).map(Some);
        }
        let pos = self
            .ckpt
            .position(seq)
            .ok_or(ServiceError::NoCheckpoint(seq))?;
        for r in &self.ckpt.records[pos..] {
            if let Some(s) = r.saved.get(&i) {
                let has = match &s.data {
                    SavedData::Whole => true,
                    SavedData::Chunks(c) => c.contains(&chunk),
                    SavedData::Nothing => false,
                };
                if has {
                    let cow =
                        backend::open_dir_at(self.meta_fd.as_raw_fd(), b"cow").map_err(storage)?;
                    let dir =
                        backend::open_dir_at(cow.as_raw_fd(), &seq_name(r.seq)).map_err(storage)?;
                    return Ok(Some(
                        backend::openat(dir.as_raw_fd(), &seq_name(i), libc::O_RDONLY, 0)
                            .map_err(storage)?,
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Opens file `i` inside the snapshot of checkpoint `seq`, following the names the
    /// directory headers had then.
    fn snapshot_file(&self, seq: SeqNo, i: u64) -> Result<OwnedFd, ServiceError> {
        let broken = || {
            storage(io::Error::other(format!(
                "object {i} has no path at checkpoint {seq}"
            )))
        };
        let mut names = Vec::new();
        let mut cur = i;
        while cur != 0 {
            let Some(hh) = self.path_header_at(seq, cur)? else {
                return Err(broken());
            };
            let Some(h) = hh.live() else {
                return Err(broken());
            };
            let Some(ph) = self.path_header_at(seq, h.parent)? else {
                return Err(broken());
            };
            let Some(p) = ph.live() else {
                return Err(broken());
            };
            let name = p
                .entries
                .iter()
                .find(|(_, j)| *j == cur)
                .map(|(n, _)| n.clone())
                .ok_or_else(broken)?;
            names.push(name);
            cur = h.parent;
            if names.len() > self.slots.len() + 1 {
                return Err(broken());
            }
        }
        let snaps =
            backend::open_dir_at(self.meta_fd.as_raw_fd(), b"snapshots").map_err(storage)?;
        let snap = backend::open_dir_at(snaps.as_raw_fd(), &seq_name(seq)).map_err(storage)?;
        let mut fd = backend::open_dir_at(snap.as_raw_fd(), b"root").map_err(storage)?;
        let last = names.len().saturating_sub(1);
        for (k, name) in names.iter().rev().enumerate() {
            fd = if k == last {
                backend::openat(fd.as_raw_fd(), name, libc::O_RDONLY, 0).map_err(storage)?
            } else {
                backend::open_dir_at(fd.as_raw_fd(), name).map_err(storage)?
            };
        }
        Ok(fd)
    }

    /// The whole value of `i` at `seq`, decoded for installing.
    pub(super) fn target_at(&self, seq: SeqNo, i: u64) -> Result<Option<Target>, ServiceError> {
        let Some(header) = self.header_at(seq, i)? else {
            return Ok(None);
        };
        let mut chunks = Vec::new();
        if let Some(LiveHeader {
            kind: FileType::Regular,
            size,
            ..
        }) = header.live()
        {
            for c in 0..chunk_count(*size) {
                match self.piece_at(seq, i, c as u32 + 1)? {
                    Some(b) => chunks.push(b),
                    None => return Ok(None),
                }
            }
        }
        Ok(Some(Target { header, chunks }))
    }

    pub(super) fn obj_at(
        &self,
        seq: SeqNo,
        i: u64,
    ) -> Result<Option<AbstractObject>, ServiceError> {
        let Some(t) = self.target_at(seq, i)? else {
            return Ok(None);
        };
        let mut pieces = vec![t.header.encode()];
        pieces.extend(t.chunks);
        Ok(Some(AbstractObject { pieces }))
    }
}
