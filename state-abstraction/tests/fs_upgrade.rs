//! Data directories written by table version 2 (before the newest agreed time moved into the
//! root's header) are upgraded to version 3 on open, crash-safely.
//!
//! The version-2 directories are built here from the version-2 layout, written out below on
//! purpose rather than shared with the library: it pins the old bytes independently of the
//! code that reads them.

mod common;

use common::*;
use serde::Serialize;
use state_abstraction::digest::{
    object_digest, piece_digest, piece_digests, Digest, PartitionTree, LEVELS,
};
use state_abstraction::fs::object::{Header, CHUNK_SIZE, DIR_SIZE};
use state_abstraction::fs::*;
use state_abstraction::{SeqNo, Service};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const ROOT: Handle = Handle::ROOT;

// ---- The version-2 layout (serialized exactly as version 2 did) ----

#[derive(Serialize)]
enum HeaderV2 {
    #[allow(dead_code)]
    Free {
        generation: u64,
        next_free: Option<u64>,
    },
    Live(LiveHeaderV2),
}

#[derive(Serialize, Clone)]
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
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    entries: Vec<(Vec<u8>, u64)>,
    target: Vec<u8>,
}

#[derive(Serialize)]
#[allow(dead_code)]
enum SavedData {
    Nothing,
    Whole,
    Chunks(BTreeSet<u64>),
}

#[derive(Serialize)]
struct SavedObj {
    header: Vec<u8>,
    pieces: Vec<Digest>,
    size: u64,
    data: SavedData,
}

#[derive(Serialize)]
struct RecordFileV2 {
    seq: SeqNo,
    root: Digest,
    count: u64,
    leaves: Vec<Digest>,
    saved: Vec<(u64, SavedObj)>,
    last_time: u64,
}

#[derive(Serialize)]
struct TableFileV2 {
    version: u32,
    last_time: u64,
    slots: Vec<(Vec<u8>, Vec<Digest>, u64)>,
    records: Vec<RecordFileV2>,
}

#[derive(Serialize)]
enum JournalEntry {
    Saved {
        seq: SeqNo,
        index: u64,
        saved: SavedObj,
    },
}

fn table_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("encode")
}

// ---- A small version-2 file system ----

const CREATED: Timespec = Timespec {
    secs: 1_700_000_000,
    nsecs: 0,
};
/// The newest agreed time in the version-2 table.
const TABLE_TIME: u64 = 1_700_000_100_000_000_000;
/// The newest agreed time when checkpoint 4 was taken.
const CHECKPOINT_TIME: u64 = 1_700_000_050_000_000_000;

fn a_data() -> Vec<u8> {
    (0..100_000u32).map(|k| (k % 251) as u8).collect()
}

fn header(parent: u64, kind: FileType, mode: u32, nlink: u32, size: u64) -> LiveHeaderV2 {
    LiveHeaderV2 {
        generation: 1,
        parent,
        kind,
        mode,
        nlink,
        uid: 0,
        gid: 0,
        size,
        rdev: 0,
        atime: CREATED,
        mtime: CREATED,
        ctime: CREATED,
        verifier: None,
        xattrs: Vec::new(),
        entries: Vec::new(),
        target: Vec::new(),
    }
}

fn pieces(i: u64, header: &[u8], data: &[u8]) -> Vec<Digest> {
    let mut p = vec![piece_digest(i, 0, header)];
    for (c, chunk) in data.chunks(CHUNK_SIZE as usize).enumerate() {
        p.push(piece_digest(i, c as u32 + 1, chunk));
    }
    p
}

/// The version-2 live objects: 0 `/`, 1 `/a` (100 000 bytes), 2 `/d` (mode 0o755),
/// 3 `/d/b` ("hello"), 4 free. Returns the slots and `/d`'s header as of checkpoint 4
/// (mode 0o700), its live one being later.
struct V2 {
    slots: Vec<(Vec<u8>, Vec<Digest>, u64)>,
    d_at_checkpoint: Vec<u8>,
}

fn write_tree(dir: &Path) -> V2 {
    let root = dir.join("tree/root");
    std::fs::create_dir_all(root.join("d")).expect("mkdir");
    std::fs::write(root.join("a"), a_data()).expect("write a");
    std::fs::write(root.join("d/b"), b"hello").expect("write b");
    let ino = |p: &str| std::fs::metadata(root.join(p)).expect("stat").ino();

    let mut slash = header(0, FileType::Directory, 0o755, 3, DIR_SIZE);
    slash.entries = vec![(b"a".to_vec(), 1), (b"d".to_vec(), 2)];
    let a = header(0, FileType::Regular, 0o644, 1, 100_000);
    let mut d = header(0, FileType::Directory, 0o755, 2, DIR_SIZE);
    d.entries = vec![(b"b".to_vec(), 3)];
    let b = header(2, FileType::Regular, 0o600, 1, 5);
    let d_old = LiveHeaderV2 {
        mode: 0o700,
        ..d.clone()
    };
    let enc = |h: LiveHeaderV2| encode(&HeaderV2::Live(h));
    let (slash, a, d, b) = (enc(slash), enc(a), enc(d), enc(b));
    let free = encode(&HeaderV2::Free {
        generation: 1,
        next_free: None,
    });
    V2 {
        slots: vec![
            (slash.clone(), pieces(0, &slash, &[]), ino("")),
            (a.clone(), pieces(1, &a, &a_data()), ino("a")),
            (d.clone(), pieces(2, &d, &[]), ino("d")),
            (b.clone(), pieces(3, &b, b"hello"), ino("d/b")),
            (free, Vec::new(), 0),
        ],
        d_at_checkpoint: enc(d_old),
    }
}

/// Object digest of each slot as of checkpoint 4 (`/d` as it was then), and the tree's root.
fn v2_checkpoint_tree(v2: &V2) -> (Vec<Digest>, Digest) {
    let mut leaves = Vec::new();
    for (i, (h, p, _)) in v2.slots.iter().enumerate() {
        let i = i as u64;
        leaves.push(match i {
            2 => object_digest(2, &pieces(2, &v2.d_at_checkpoint, &[])),
            _ if p.is_empty() => object_digest(i, &[piece_digest(i, 0, h)]),
            _ => object_digest(i, p),
        });
    }
    let mut tree = PartitionTree::new();
    for (i, l) in leaves.iter().enumerate() {
        tree.set(i as u64, *l);
    }
    let root = tree.root();
    (leaves, root)
}

fn table_version(dir: &Path) -> u8 {
    std::fs::read(dir.join("table")).expect("table")[0]
}

/// The header of object `i` in the current state.
fn header_of(svc: &FileService, i: u64) -> Header {
    let obj = svc.get_obj(i).expect("object");
    decode::<Header>(&obj.pieces[0]).expect("header")
}

fn agreed_time(svc: &FileService, i: u64) -> u64 {
    match header_of(svc, i) {
        Header::Live(l) => l.agreed_time,
        Header::Free { .. } => panic!("object {i} is free"),
    }
}

/// The object digests of the current state, from the objects themselves.
fn object_digests(svc: &FileService, count: u64) -> Vec<Digest> {
    (0..count)
        .map(|i| {
            let obj = svc.get_obj(i).expect("object");
            object_digest(i, &piece_digests(i, &obj.pieces))
        })
        .collect()
}

/// The files of the version-2 tree, read through the service (ordered requests: call after
/// checking the agreed time, which they move).
fn check_files(fs: &mut Fs, d_mode: u32) {
    let a = fs.handle_of(ROOT, "a");
    assert_eq!(fs.attr(a).size, 100_000);
    assert_eq!(fs.read(a, 0, 100_000), a_data());
    let d = fs.handle_of(ROOT, "d");
    assert_eq!(fs.attr(d).mode, d_mode);
    let b = fs.handle_of(d, "b");
    assert_eq!(fs.attr(b).size, 5);
    assert_eq!(fs.read(b, 0, 100), b"hello");
    let names = fs.names(ROOT);
    assert!(
        names.iter().any(|n| n == "a") && names.iter().any(|n| n == "d"),
        "{names:?}"
    );
}

/// A cleanly closed version-2 directory without checkpoints: the table's agreed time moves
/// into the root, the files are all there, and the next open is plain version 3.
#[test]
fn version_2_directory_is_upgraded_on_open() {
    let dir = temp_dir();
    let v2 = write_tree(dir.path());
    let table = TableFileV2 {
        version: 2,
        last_time: TABLE_TIME,
        slots: v2.slots.clone(),
        records: Vec::new(),
    };
    std::fs::write(dir.path().join("table"), table_bytes(&table)).expect("table");

    let mut fs = Fs::open(dir.path());
    assert_eq!(
        table_version(dir.path()),
        3,
        "the table is rewritten as version 3"
    );
    assert_eq!(agreed_time(&fs.svc, 0), TABLE_TIME);
    for i in 1..4 {
        assert_eq!(agreed_time(&fs.svc, i), 0, "object {i}");
    }
    assert!(matches!(header_of(&fs.svc, 4), Header::Free { .. }));
    // The digest covers the converted objects.
    let mut tree = PartitionTree::new();
    for (i, d) in object_digests(&fs.svc, 5).into_iter().enumerate() {
        tree.set(i as u64, d);
    }
    assert_eq!(fs.digest(), tree.root());

    // A proposal before the carried-over time is clamped to it.
    fs.now = TABLE_TIME - 1_000_000_000;
    let (_, attr) = fs.entry(FsOp::Mkdir {
        dir: ROOT,
        name: b"new".to_vec(),
        mode: 0o755,
    });
    assert_eq!(attr.mtime, Timespec::from_nanos(TABLE_TIME));
    fs.now = TABLE_TIME;
    check_files(&mut fs, 0o755);
    let digest = fs.digest();
    drop(fs);

    // The second open finds version 3 and changes nothing.
    let table_before = std::fs::read(dir.path().join("table")).expect("table");
    assert_eq!(table_before[0], 3);
    let mut fs = Fs::open(dir.path());
    assert_eq!(
        std::fs::read(dir.path().join("table")).expect("table"),
        table_before
    );
    assert_eq!(fs.digest(), digest);
    fs.now = TABLE_TIME + 1_000_000_000;
    check_files(&mut fs, 0o755);
}

/// A version-2 directory with a checkpoint, after a crash in the middle of its upgrade (the
/// journal already renamed aside, a half-written new table): it upgrades again, the journal
/// is honoured, and the state is checkpoint 4's, with the agreed time of then. The record
/// keeps the digest it was taken with (its name in the replica's log).
#[test]
fn torn_upgrade_of_a_crashed_directory_with_a_checkpoint_still_opens() {
    let dir = temp_dir();
    let v2 = write_tree(dir.path());
    let (leaves, root) = v2_checkpoint_tree(&v2);
    let table = TableFileV2 {
        version: 2,
        last_time: TABLE_TIME,
        slots: v2.slots.clone(),
        records: vec![RecordFileV2 {
            seq: 4,
            root,
            count: 5,
            leaves,
            // `/d` was saved after the table was written: in the journal only.
            saved: Vec::new(),
            last_time: CHECKPOINT_TIME,
        }],
    };
    let p = dir.path();
    std::fs::write(p.join("table"), table_bytes(&table)).expect("table");
    let entry = table_bytes(&JournalEntry::Saved {
        seq: 4,
        index: 2,
        saved: SavedObj {
            header: v2.d_at_checkpoint.clone(),
            pieces: pieces(2, &v2.d_at_checkpoint, &[]),
            size: 0,
            data: SavedData::Nothing,
        },
    });
    let mut journal = (entry.len() as u32).to_le_bytes().to_vec();
    journal.extend_from_slice(&entry);
    // Where the crashed upgrade left it (step 1 done), with a torn new table beside the old.
    std::fs::write(p.join("journal.v2"), &journal).expect("journal");
    std::fs::write(p.join("table.tmp"), [3u8, 0, 0]).expect("table.tmp");
    std::fs::write(p.join("dirty"), b"").expect("dirty");
    std::fs::set_permissions(
        p.join("tree/root/d"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");

    let mut fs = Fs::open(p);
    assert_eq!(table_version(p), 3);
    assert!(
        !p.join("journal.v2").exists(),
        "the folded journal is removed"
    );
    assert!(!p.join("journal").exists());
    assert_eq!(
        fs.svc.checkpoints(),
        vec![(4, root)],
        "the checkpoint keeps its name"
    );
    assert_eq!(
        agreed_time(&fs.svc, 0),
        CHECKPOINT_TIME,
        "the agreed time of checkpoint 4"
    );
    // The record's tree is version 3 and describes the state it rolled back to.
    let digests = object_digests(&fs.svc, 5);
    assert_eq!(
        fs.svc.partition_node(4, LEVELS - 1, 0).expect("leaf node"),
        digests
    );
    let mut tree = PartitionTree::new();
    for (i, d) in digests.iter().enumerate() {
        tree.set(i as u64, *d);
    }
    assert_eq!(fs.digest(), tree.root());
    assert_ne!(
        fs.digest(),
        root,
        "version-3 digests differ from version 2's"
    );

    fs.now = CHECKPOINT_TIME + 1_000_000_000;
    check_files(&mut fs, 0o700);
    // The upgraded checkpoint is a checkpoint like any other.
    let at_4 = digests;
    fs.svc.checkpoint(5).expect("checkpoint");
    fs.mkdir(ROOT, "later");
    fs.svc.rollback_to(4).expect("rollback");
    assert_eq!(object_digests(&fs.svc, 5), at_4);
    drop(fs);

    // A crash after the new table was in place leaves only a stale journal.v2: removed.
    std::fs::write(p.join("journal.v2"), &journal).expect("journal");
    let mut fs = Fs::open(p);
    assert!(!p.join("journal.v2").exists());
    assert_eq!(agreed_time(&fs.svc, 0), CHECKPOINT_TIME);
    fs.now = CHECKPOINT_TIME + 2_000_000_000;
    check_files(&mut fs, 0o700);
}
