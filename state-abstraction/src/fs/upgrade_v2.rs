//! Upgrading a data directory from table version 2 to 3: the one place that still knows
//! version 2.
//!
//! Version 2 kept the newest agreed time outside the abstract state: in the table and in each
//! checkpoint record (`last_time`). Version 3 keeps it in the root object's header
//! ([`LiveHeader::agreed_time`], 0 in every other object), so every live header gained a
//! field and every piece-0 digest, object digest and partition tree changed. Nothing else
//! changed: free headers, file data, `cow/` saves and btrfs snapshots (which hold file data
//! only; their headers are in the table's records) are the same in both.
//!
//! In: the bytes of a version-2 table and, after an unclean shutdown, its journal (whose
//! saved headers are version 2 too). Out: the same state as a version-3 table, by the pure
//! [`convert`], written crash-safely by [`FileService::upgrade_from_v2`]:
//!
//! 1. `journal` is renamed to `journal.v2` (a version-3 reader must never replay version-2
//!    headers, and the two files cannot be replaced together);
//! 2. the version-3 table, with the journal folded into its records, is written beside the
//!    old one, fsync'ed and renamed over it;
//! 3. `journal.v2` is removed.
//!
//! A crash before step 2's rename leaves a version-2 table (with its journal under either
//! name), which is upgraded again on the next open; a crash after it leaves a version-3
//! table and at most a stale `journal.v2`, which the next open removes
//! ([`FileService::remove_v2_leftovers`]). The `dirty` marker is left alone, so crash
//! recovery still runs after the upgrade exactly as it would have before it.
//!
//! Determinism: version-2 and version-3 digests of the same state differ. That is fine
//! because the conversion is a function of the version-2 abstract state alone (no clock, no
//! concrete inode numbers, no map iteration order), so replicas that held the same version-2
//! state hold the same version-3 state after upgrading, and their next checkpoints agree.
//! The whole cluster must be upgraded: a version-2 replica and a version-3 replica never
//! agree on a checkpoint digest.

use super::checkpoint::{
    journal_entries, table_config, RecordFile, SavedData, SavedObj, TableFile, TABLE_VERSION,
};
use super::object::{Header, LiveHeader};
use super::ops::{FileType, Name, Timespec};
use super::{backend, storage, FileService};
use crate::digest::{object_digest, piece_digest, Digest};
use crate::service::{SeqNo, ServiceError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;

/// The version-2 table (`TableFile` then).
#[derive(Deserialize)]
struct TableFileV2 {
    version: u32,
    /// The newest agreed time when the table was saved.
    last_time: u64,
    slots: Vec<(Vec<u8>, Vec<Digest>, u64)>,
    records: Vec<RecordFileV2>,
}

/// A version-2 checkpoint record. `saved` headers are version-2 encodings.
#[derive(Deserialize)]
struct RecordFileV2 {
    seq: SeqNo,
    root: Digest,
    count: u64,
    leaves: Vec<Digest>,
    saved: Vec<(u64, SavedObj)>,
    /// The newest agreed time when the checkpoint was taken.
    last_time: u64,
}

/// The version-2 header: [`Header`] before `agreed_time`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
enum HeaderV2 {
    Free {
        generation: u64,
        next_free: Option<u64>,
    },
    Live(LiveHeaderV2),
}

/// The version-2 live header: [`LiveHeader`] without `agreed_time`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct LiveHeaderV2 {
    generation: u64,
    parent: u64,
    kind: FileType,
    mode: u32,
    nlink: u32,
    uid: u32,
    gid: u32,
    size: u64,
    rdev: u64,
    atime: Timespec,
    mtime: Timespec,
    ctime: Timespec,
    verifier: Option<u64>,
    xattrs: Vec<(Name, Vec<u8>)>,
    entries: Vec<(Name, u64)>,
    target: Vec<u8>,
}

/// The version-3 encoding of object `i`'s version-2 header `bytes`; a live root gets
/// `agreed_time`, every other object 0.
fn convert_header(i: u64, bytes: &[u8], agreed_time: u64) -> Result<Vec<u8>, String> {
    let old: HeaderV2 = super::ops::decode(bytes)
        .ok_or_else(|| format!("object {i}: version-2 header does not decode"))?;
    let new = match old {
        HeaderV2::Free {
            generation,
            next_free,
        } => Header::Free {
            generation,
            next_free,
        },
        HeaderV2::Live(l) => Header::Live(LiveHeader {
            generation: l.generation,
            parent: l.parent,
            kind: l.kind,
            mode: l.mode,
            nlink: l.nlink,
            uid: l.uid,
            gid: l.gid,
            size: l.size,
            rdev: l.rdev,
            atime: l.atime,
            mtime: l.mtime,
            ctime: l.ctime,
            verifier: l.verifier,
            xattrs: l.xattrs,
            entries: l.entries,
            target: l.target,
            agreed_time: if i == 0 { agreed_time } else { 0 },
        }),
    };
    Ok(new.encode())
}

/// `pieces` with the header's digest replaced by that of `header` (chunk digests are the
/// same in both versions). Empty stays empty (a free slot in the table).
fn with_header_digest(i: u64, header: &[u8], pieces: &[Digest]) -> Vec<Digest> {
    let mut out = pieces.to_vec();
    if let Some(p) = out.first_mut() {
        *p = piece_digest(i, 0, header);
    }
    out
}

/// Object `i`'s digest from its header and piece digests as stored (a free slot in the table
/// has no stored pieces: its one piece is the header).
fn digest_of(i: u64, header: &[u8], pieces: &[Digest]) -> Digest {
    if pieces.is_empty() {
        object_digest(i, &[piece_digest(i, 0, header)])
    } else {
        object_digest(i, pieces)
    }
}

/// Object `i` as of the checkpoint whose record is `records[k]`: the first of `records[k..]`
/// that saved it, else the live slot (the rule of `checkpoint.rs`).
fn value_at<'a>(
    records: &'a [BTreeMap<u64, SavedObj>],
    slots: &'a [(Vec<u8>, Vec<Digest>, u64)],
    k: usize,
    i: u64,
) -> Option<(&'a [u8], &'a [Digest])> {
    match records[k..].iter().find_map(|saved| saved.get(&i)) {
        Some(s) => Some((&s.header, &s.pieces)),
        None => slots
            .get(i as usize)
            .map(|(h, p, _)| (h.as_slice(), p.as_slice())),
    }
}

/// Converts a version-2 table, with `journal` (the entries of its journal, when crash
/// recovery would replay it) folded into its records, to the same state in version 3.
fn convert(file: TableFileV2, journal: Vec<(SeqNo, u64, SavedObj)>) -> Result<TableFile, String> {
    // The journal, folded as `replay_journal` would (a later entry replaces an earlier one).
    let mut saved_v2: Vec<BTreeMap<u64, SavedObj>> = file
        .records
        .iter()
        .map(|r| r.saved.iter().cloned().collect())
        .collect();
    for (seq, index, saved) in journal {
        if let Some(k) = file.records.iter().position(|r| r.seq == seq) {
            saved_v2[k].insert(index, saved);
        }
    }

    // Live objects: the table's agreed time goes into the root.
    let mut slots = Vec::with_capacity(file.slots.len());
    for (i, (header, pieces, ino)) in file.slots.iter().enumerate() {
        let i = i as u64;
        let header = convert_header(i, header, file.last_time)?;
        let pieces = with_header_digest(i, &header, pieces);
        slots.push((header, pieces, *ino));
    }

    // Saved values: record k's agreed time goes into its saved root.
    let mut saved_v3: Vec<BTreeMap<u64, SavedObj>> = Vec::with_capacity(saved_v2.len());
    for (r, saved) in file.records.iter().zip(&saved_v2) {
        let mut out = BTreeMap::new();
        for (&i, s) in saved {
            let header = convert_header(i, &s.header, r.last_time)?;
            let pieces = with_header_digest(i, &header, &s.pieces);
            out.insert(
                i,
                SavedObj {
                    header,
                    pieces,
                    ..s.clone()
                },
            );
        }
        saved_v3.push(out);
    }

    // The root's value at checkpoint k must carry record k's agreed time. Version 2 saved the
    // root only when something else in it changed, so where the time alone moved after
    // checkpoint k, record k gains the root's value at k, as version 3 would have saved it
    // (`touch(0)` when the time moves). Newest record first: each looks at the later ones.
    let live_root = |bytes: &[u8]| match super::ops::decode::<Header>(bytes) {
        Some(Header::Live(l)) => Ok(l),
        _ => Err("the root is not a live object".to_string()),
    };
    let mut later = live_root(
        &slots
            .first()
            .ok_or_else(|| "the table has no root".to_string())?
            .0,
    )?;
    for k in (0..file.records.len()).rev() {
        if let Some(s) = saved_v3[k].get(&0) {
            later = live_root(&s.header)?;
            continue;
        }
        let at_k = LiveHeader {
            agreed_time: file.records[k].last_time,
            ..later.clone()
        };
        if at_k != later {
            let header = Header::Live(at_k.clone()).encode();
            let pieces = vec![piece_digest(0, 0, &header)];
            saved_v3[k].insert(
                0,
                SavedObj {
                    header,
                    pieces,
                    size: 0,
                    data: SavedData::Nothing,
                },
            );
        }
        later = at_k;
    }

    // Each record's tree, recomputed from the values at its checkpoint.
    let mut records = Vec::with_capacity(file.records.len());
    for (k, r) in file.records.iter().enumerate() {
        if r.leaves.len() as u64 != r.count {
            return Err(format!(
                "checkpoint {}: {} leaves for {} objects",
                r.seq,
                r.leaves.len(),
                r.count
            ));
        }
        let mut leaves = Vec::with_capacity(r.leaves.len());
        for (i, &stored) in r.leaves.iter().enumerate() {
            let i = i as u64;
            let missing = || format!("checkpoint {}: object {i} has no value", r.seq);
            let (h2, p2) = value_at(&saved_v2, &file.slots, k, i).ok_or_else(missing)?;
            let (h3, p3) = value_at(&saved_v3, &slots, k, i).ok_or_else(missing)?;
            // A leaf that is not the digest of the recorded value was replaced by scrubbing
            // (damaged data, see `scrub.rs`): it must stay unlike the correct digest so that a
            // state transfer fetches the object. The version-2 leaf is (no version-3 value has
            // that digest).
            leaves.push(if digest_of(i, h2, p2) == stored {
                digest_of(i, h3, p3)
            } else {
                stored
            });
        }
        records.push(RecordFile {
            seq: r.seq,
            // The record keeps the root digest it was taken with, not its version-3 tree's:
            // that digest is the checkpoint's name in the replica's write-ahead log and in the
            // checkpoint certificates of every replica, and a restart resumes at the newest
            // checkpoint the service and the log both hold with the same digest (see
            // `Replica::restore`). Its tree and values are version 3, so it can be rolled back
            // to and diffed against new checkpoints; a state transfer to it cannot be verified
            // (the tree does not hash to the name), so replicas catch up to a later checkpoint.
            root: r.root,
            count: r.count,
            leaves,
            saved: std::mem::take(&mut saved_v3[k]).into_iter().collect(),
        });
    }
    Ok(TableFile {
        version: TABLE_VERSION,
        slots,
        records,
    })
}

/// Removes a file of the data directory, if it is there; whether it was.
fn remove_if_present(svc: &FileService, name: &[u8]) -> Result<bool, ServiceError> {
    match backend::unlinkat(svc.meta_fd.as_raw_fd(), name, false) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(storage(e)),
    }
}

impl FileService {
    /// Upgrades the data directory from the version-2 table `bytes` (see the module doc for
    /// the steps and why a crash at any point is safe). Returns the version-3 table written.
    pub(super) fn upgrade_from_v2(&mut self, bytes: &[u8]) -> Result<Vec<u8>, ServiceError> {
        let bad = |why: String| storage(io::Error::other(format!("table (version 2): {why}")));
        let meta = self.meta_fd.as_raw_fd();
        match backend::renameat(meta, b"journal", meta, b"journal.v2", false) {
            Ok(()) => backend::fsync(meta)?,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(storage(e)),
        }
        // Version 2 replayed its journal only after an unclean shutdown, as version 3 does.
        let journal = if self.data_dir.join("dirty").exists() {
            match std::fs::read(self.data_dir.join("journal.v2")) {
                Ok(b) => journal_entries(&b),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(storage(e)),
            }
        } else {
            Vec::new()
        };
        let (file, _): (TableFileV2, usize) =
            bincode::serde::decode_from_slice(bytes, table_config())
                .map_err(|e| bad(e.to_string()))?;
        debug_assert_eq!(file.version, 2);
        let file = convert(file, journal).map_err(bad)?;
        let out = bincode::serde::encode_to_vec(&file, table_config())
            .map_err(|e| bad(format!("encoding the table: {e}")))?;
        self.replace_table(&out)?;
        if remove_if_present(self, b"journal.v2")? {
            backend::fsync(meta)?;
        }
        tracing::info!(
            data_dir = %self.data_dir.display(),
            "file service: upgraded the data directory from version 2 to version 3"
        );
        Ok(out)
    }

    /// Removes what an upgrade from version 2 that crashed after writing the version-3 table
    /// left behind: the version-2 journal, already folded into the table.
    pub(super) fn remove_v2_leftovers(&self) -> Result<(), ServiceError> {
        if remove_if_present(self, b"journal.v2")? {
            backend::fsync(self.meta_fd.as_raw_fd())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(entries: Vec<(Name, u64)>, mode: u32) -> Vec<u8> {
        super::super::ops::encode(&HeaderV2::Live(LiveHeaderV2 {
            generation: 1,
            parent: 0,
            kind: FileType::Directory,
            mode,
            nlink: 2,
            uid: 0,
            gid: 0,
            size: 4096,
            rdev: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            verifier: None,
            xattrs: Vec::new(),
            entries,
            target: Vec::new(),
        }))
    }

    fn saved(i: u64, header: &[u8]) -> SavedObj {
        SavedObj {
            header: header.to_vec(),
            pieces: vec![piece_digest(i, 0, header)],
            size: 0,
            data: SavedData::Nothing,
        }
    }

    fn agreed_time(header: &[u8]) -> u64 {
        match super::super::ops::decode::<Header>(header) {
            Some(Header::Live(l)) => l.agreed_time,
            other => panic!("not a live header: {other:?}"),
        }
    }

    /// Root (0) and one directory (1); checkpoints 10, 20, 30 with agreed times 1, 1, 2, the
    /// table at 3; object 1 changed after checkpoint 10. Leaves are version-2 digests, except
    /// object 1's at checkpoint 20, which scrubbing replaced.
    fn table() -> (TableFileV2, Digest) {
        let root = dir(vec![(b"d".to_vec(), 1)], 0o755);
        let d_new = dir(Vec::new(), 0o755);
        let d_old = dir(Vec::new(), 0o700);
        let leaf = |i: u64, h: &[u8]| object_digest(i, &[piece_digest(i, 0, h)]);
        let damaged = Digest([7; 32]);
        let record =
            |seq: SeqNo, d: Digest, saved: Vec<(u64, SavedObj)>, last_time: u64| RecordFileV2 {
                seq,
                root: Digest([seq as u8; 32]),
                count: 2,
                leaves: vec![leaf(0, &root), d],
                saved,
                last_time,
            };
        let file = TableFileV2 {
            version: 2,
            last_time: 3,
            slots: vec![
                (root.clone(), vec![piece_digest(0, 0, &root)], 0),
                (d_new.clone(), vec![piece_digest(1, 0, &d_new)], 0),
            ],
            records: vec![
                record(10, leaf(1, &d_old), vec![(1, saved(1, &d_old))], 1),
                record(20, damaged, Vec::new(), 1),
                record(30, leaf(1, &d_new), Vec::new(), 2),
            ],
        };
        (file, damaged)
    }

    #[test]
    fn each_checkpoint_gets_its_agreed_time_in_the_root() {
        let (file, _) = table();
        let v3 = convert(file, Vec::new()).expect("convert");
        assert_eq!(agreed_time(&v3.slots[0].0), 3);
        assert_eq!(agreed_time(&v3.slots[1].0), 0);
        // The root is saved where the time moved after the checkpoint: after 20 (1 -> 2) and
        // after 30 (2 -> 3), not after 10 (checkpoint 20 has the same time).
        let root_saved: Vec<Option<u64>> = v3
            .records
            .iter()
            .map(|r| {
                r.saved
                    .iter()
                    .find(|(i, _)| *i == 0)
                    .map(|(_, s)| agreed_time(&s.header))
            })
            .collect();
        assert_eq!(root_saved, [None, Some(1), Some(2)]);
        // Saved values of other objects carry no time; names are kept.
        let (_, d) = &v3.records[0]
            .saved
            .iter()
            .find(|(i, _)| *i == 1)
            .expect("saved");
        assert_eq!(agreed_time(&d.header), 0);
        let names: Vec<Digest> = v3.records.iter().map(|r| r.root).collect();
        assert_eq!(names, [10, 20, 30].map(|s| Digest([s; 32])));
    }

    #[test]
    fn leaves_are_recomputed_except_damaged_ones() {
        let (file, damaged) = table();
        let v3 = convert(file, Vec::new()).expect("convert");
        let leaf = |k: usize, i: u64| {
            let h = v3.records[k..]
                .iter()
                .find_map(|r| {
                    r.saved
                        .iter()
                        .find(|(j, _)| *j == i)
                        .map(|(_, s)| &s.header)
                })
                .unwrap_or(&v3.slots[i as usize].0);
            object_digest(i, &[piece_digest(i, 0, h)])
        };
        for k in 0..3 {
            assert_eq!(v3.records[k].leaves[0], leaf(k, 0), "root at record {k}");
        }
        assert_eq!(v3.records[0].leaves[1], leaf(0, 1));
        assert_eq!(
            v3.records[1].leaves[1], damaged,
            "a damaged leaf stays unlike any value"
        );
        assert_eq!(v3.records[2].leaves[1], leaf(2, 1));
    }

    #[test]
    fn conversion_is_deterministic() {
        let a = convert(table().0, Vec::new()).expect("convert");
        let b = convert(table().0, Vec::new()).expect("convert");
        let enc = |t: &TableFile| bincode::serde::encode_to_vec(t, table_config()).expect("encode");
        assert_eq!(enc(&a), enc(&b));
    }
}
