//! fallocate and copy_file_range at the edges: unaligned ranges, ranges across chunk
//! boundaries and past the end of the file, size changes, errors, and rollback. Every case
//! runs on each backend there is here (the root file system, tmpfs, btrfs), and every reply
//! and root digest must be byte-identical across them: the backends implement these calls
//! differently (tmpfs has no ZERO_RANGE, btrfs may share extents on copy), and none of that
//! may show.

mod common;
use common::*;
use state_abstraction::fs::object::{CHUNK_SIZE, COPY_MAX, MAX_FILE_SIZE};
use state_abstraction::fs::*;
use state_abstraction::Service;

const ROOT: Handle = Handle::ROOT;
const KEEP: AllocMode = AllocMode::Allocate { keep_size: true };
const GROW: AllocMode = AllocMode::Allocate { keep_size: false };
const ZERO: AllocMode = AllocMode::ZeroRange { keep_size: false };
const ZERO_KEEP: AllocMode = AllocMode::ZeroRange { keep_size: true };
const PUNCH: AllocMode = AllocMode::PunchHole;

/// The same service on every backend, driven in lockstep.
struct Backends {
    fss: Vec<Fs>,
    _dirs: Vec<tempfile::TempDir>,
    _btrfs: Option<BtrfsMount>,
}

impl Backends {
    fn new() -> Backends {
        let mut dirs = vec![temp_dir()];
        dirs.extend(shm_dir());
        let btrfs = btrfs_mount();
        let mut fss: Vec<Fs> = dirs.iter().map(|d| Fs::open(d.path())).collect();
        if let Some(b) = &btrfs {
            fss.push(Fs::open(&b.dir("replica")));
        }
        Backends {
            fss,
            _dirs: dirs,
            _btrfs: btrfs,
        }
    }

    /// Runs `op` everywhere; the encoded replies must be identical.
    fn run(&mut self, op: FsOp) -> FsResult {
        let rs: Vec<FsResult> = self.fss.iter_mut().map(|f| f.run(op.clone())).collect();
        for (k, r) in rs.iter().enumerate() {
            assert_eq!(encode(r), encode(&rs[0]), "backend {k} differs on {op:?}");
        }
        rs.into_iter().next().expect("a backend")
    }

    fn check_digests(&mut self) -> state_abstraction::Digest {
        let ds: Vec<_> = self.fss.iter_mut().map(|f| f.digest()).collect();
        for (k, d) in ds.iter().enumerate() {
            assert_eq!(*d, ds[0], "digest of backend {k}");
        }
        ds[0]
    }

    fn as_user(&mut self, uid: u32, gid: u32) {
        for f in &mut self.fss {
            f.as_user(uid, gid, &[]);
        }
    }

    /// A file named `name` holding `len` bytes of a pattern that differs at every offset
    /// that matters here (so a misplaced byte shows).
    /// Backends holding one file, "f", of `len` bytes of [`pattern`].
    fn with_file(len: usize) -> (Backends, Handle) {
        let mut b = Backends::new();
        let f = b.file("f", len);
        (b, f)
    }

    fn file(&mut self, name: &str, len: usize) -> Handle {
        let h = match self.run(FsOp::Create {
            dir: ROOT,
            name: name.into(),
            mode: 0o644,
            how: CreateHow::Guarded,
        }) {
            Ok(FsReply::Entry { handle, .. }) => handle,
            other => panic!("create {name}: {other:?}"),
        };
        let data = pattern(0, len);
        for (k, piece) in data.chunks(1 << 20).enumerate() {
            let r = self.run(FsOp::Write {
                h,
                offset: (k << 20) as u64,
                data: piece.to_vec(),
            });
            assert!(r.is_ok(), "write: {r:?}");
        }
        h
    }

    /// The whole file, read back (and checked to be the same everywhere).
    fn contents(&mut self, h: Handle) -> Vec<u8> {
        let size = self.size(h);
        let mut out = Vec::new();
        while (out.len() as u64) < size {
            match self.run(FsOp::Read {
                h,
                offset: out.len() as u64,
                count: 1 << 20,
            }) {
                Ok(FsReply::Read { data, .. }) if !data.is_empty() => out.extend(data),
                other => panic!("read: {other:?}"),
            }
        }
        out
    }

    fn size(&mut self, h: Handle) -> u64 {
        match self.run(FsOp::GetAttr { h }) {
            Ok(FsReply::Attr(a)) => a.size,
            other => panic!("getattr: {other:?}"),
        }
    }

    fn fallocate(&mut self, h: Handle, offset: u64, length: u64, mode: AllocMode) -> FsResult {
        self.run(FsOp::Fallocate {
            h,
            offset,
            length,
            mode,
        })
    }

    fn copy(
        &mut self,
        src: Handle,
        src_offset: u64,
        dst: Handle,
        dst_offset: u64,
        n: u64,
    ) -> FsResult {
        self.run(FsOp::CopyRange {
            src,
            src_offset,
            dst,
            dst_offset,
            length: n,
        })
    }
}

fn pattern(start: usize, len: usize) -> Vec<u8> {
    (start..start + len)
        .map(|i| (i % 251) as u8 ^ (i / 251 % 7) as u8 | 1)
        .collect()
}

/// `data` with bytes `start..end` (cut at its length) set to zero.
fn zeroed(mut data: Vec<u8>, start: usize, end: usize) -> Vec<u8> {
    let end = end.min(data.len());
    if start < end {
        data[start..end].fill(0);
    }
    data
}

fn attr_of(r: FsResult) -> Attr {
    match r {
        Ok(FsReply::Attr(a)) => a,
        other => panic!("expected attributes, got {other:?}"),
    }
}

fn copied(r: FsResult) -> u32 {
    match r {
        Ok(FsReply::Write { count, .. }) => count,
        other => panic!("expected a count, got {other:?}"),
    }
}

#[test]
fn punch_hole_unaligned_within_one_chunk() {
    let (mut b, f) = Backends::with_file(100_000);
    let a = attr_of(b.fallocate(f, 1_001, 2_999, PUNCH));
    assert_eq!(a.size, 100_000, "a punched hole never changes the size");
    assert_eq!(b.contents(f), zeroed(pattern(0, 100_000), 1_001, 4_000));
    b.check_digests();
}

#[test]
fn punch_hole_across_chunk_boundaries() {
    let (mut b, f) = Backends::with_file(300_000);
    let (start, end) = (CHUNK_SIZE - 7, 3 * CHUNK_SIZE + 5);
    attr_of(b.fallocate(f, start, end - start, PUNCH));
    assert_eq!(
        b.contents(f),
        zeroed(pattern(0, 300_000), start as usize, end as usize)
    );
    b.check_digests();
}

#[test]
fn punch_hole_beyond_eof_changes_nothing_past_it() {
    let (mut b, f) = Backends::with_file(70_000);
    let before = b.check_digests();
    // Entirely past the end: nothing changes but the times.
    let a = attr_of(b.fallocate(f, 80_000, 1 << 20, PUNCH));
    assert_eq!(a.size, 70_000);
    assert_eq!(b.contents(f), pattern(0, 70_000));
    // Starting inside and running past the end: zeros to the end, same size.
    attr_of(b.fallocate(f, 69_000, 1 << 30, PUNCH));
    assert_eq!(b.size(f), 70_000);
    assert_eq!(b.contents(f), zeroed(pattern(0, 70_000), 69_000, 70_000));
    assert_ne!(b.check_digests(), before);
}

#[test]
fn zero_range_extends_the_size_unless_told_to_keep_it() {
    let (mut b, f) = Backends::with_file(1_000);
    let a = attr_of(b.fallocate(f, 500, 69_500, ZERO));
    assert_eq!(a.size, 70_000);
    // Blocks follow the size, never what a backend happened to allocate.
    assert_eq!(a.blocks, 70_000u64.div_ceil(4096) * 8);
    assert_eq!(
        b.contents(f),
        zeroed(pattern(0, 1_000), 500, 1_000)
            .into_iter()
            .chain(vec![0; 69_000])
            .collect::<Vec<_>>()
    );
    let g = b.file("g", 1_000);
    let a = attr_of(b.fallocate(g, 10, 1 << 20, ZERO_KEEP));
    assert_eq!(a.size, 1_000);
    assert_eq!(b.contents(g), zeroed(pattern(0, 1_000), 10, 1_000));
    b.check_digests();
}

#[test]
fn allocate_grows_the_size_only_without_keep_size() {
    let (mut b, f) = Backends::with_file(5_000);
    let a = attr_of(b.fallocate(f, 0, 4_000, GROW));
    assert_eq!(
        a.size, 5_000,
        "a reservation inside the file changes nothing"
    );
    let a = attr_of(b.fallocate(f, 100_000, 50_000, KEEP));
    assert_eq!(a.size, 5_000);
    assert_eq!(
        a.blocks, 16,
        "blocks derive from the size, not the reservation"
    );
    let a = attr_of(b.fallocate(f, 100_000, 50_000, GROW));
    assert_eq!(a.size, 150_000);
    let want: Vec<u8> = pattern(0, 5_000)
        .into_iter()
        .chain(vec![0; 145_000])
        .collect();
    assert_eq!(b.contents(f), want);
    // A later write into the reserved-but-not-sized range after KEEP_SIZE reads back whole.
    let g = b.file("g", 10);
    attr_of(b.fallocate(g, 0, 3 * CHUNK_SIZE, KEEP));
    assert!(b
        .run(FsOp::Write {
            h: g,
            offset: CHUNK_SIZE + 3,
            data: vec![7; 5]
        })
        .is_ok());
    let mut want = pattern(0, 10);
    want.resize(CHUNK_SIZE as usize + 3, 0);
    want.extend([7; 5]);
    assert_eq!(b.contents(g), want);
    b.check_digests();
}

#[test]
fn fallocate_errors_are_linuxs() {
    let (mut b, f) = Backends::with_file(10);
    assert_eq!(b.fallocate(f, 0, 0, GROW), Err(FsError::Inval));
    assert_eq!(b.fallocate(ROOT, 0, 10, GROW), Err(FsError::IsDir));
    assert_eq!(b.fallocate(f, MAX_FILE_SIZE, 1, GROW), Err(FsError::FBig));
    assert_eq!(b.fallocate(f, u64::MAX, 2, PUNCH), Err(FsError::FBig));
    assert_eq!(b.size(f), 10);
    // Data permission, as for write: others need the write bit.
    b.as_user(1000, 1000);
    assert_eq!(b.fallocate(f, 0, 10, PUNCH), Err(FsError::Access));
    b.as_user(0, 0);
    let stale = Handle {
        index: 99,
        generation: 1,
    };
    assert_eq!(b.fallocate(stale, 0, 10, PUNCH), Err(FsError::Stale));
    b.check_digests();
}

#[test]
fn fallocate_updates_times_and_drops_setuid() {
    let (mut b, f) = Backends::with_file(10);
    let a = attr_of(b.run(FsOp::SetAttr {
        h: f,
        set: SetAttrs {
            mode: Some(0o4777),
            ..Default::default()
        },
    }));
    b.as_user(1000, 1000);
    let after = attr_of(b.fallocate(f, 0, 5, PUNCH));
    assert!(after.mtime > a.mtime && after.ctime > a.ctime);
    assert_eq!(after.mode, 0o777, "a write by a user drops set-user-id");
}

#[test]
fn copy_across_chunks() {
    let mut b = Backends::new();
    let src = b.file("src", 300_000);
    let dst = b.file("dst", 20_000);
    let n = copied(b.copy(src, 30_000, dst, 50_000, 150_000));
    assert_eq!(n, 150_000);
    let mut want = pattern(0, 20_000);
    want.resize(50_000, 0);
    want.extend(pattern(30_000, 150_000));
    assert_eq!(b.contents(dst), want);
    assert_eq!(
        b.contents(src),
        pattern(0, 300_000),
        "the source is untouched"
    );
    b.check_digests();
}

#[test]
fn copy_within_one_file() {
    let (mut b, f) = Backends::with_file(200_000);
    // Non-overlapping, forwards and backwards.
    assert_eq!(copied(b.copy(f, 0, f, 100_000, 100_000)), 100_000);
    assert_eq!(copied(b.copy(f, 150_000, f, 10, 1_000)), 1_000);
    let mut want = pattern(0, 200_000);
    want.copy_within(0..100_000, 100_000);
    want.copy_within(150_000..151_000, 10);
    assert_eq!(b.contents(f), want);
    // Overlapping ranges of one file: EINVAL, as Linux (after cutting the count at EOF).
    assert_eq!(b.copy(f, 0, f, 99_999, 100_000), Err(FsError::Inval));
    assert_eq!(b.copy(f, 1_000, f, 0, 2_000), Err(FsError::Inval));
    // The count is cut at the end of the source first: this one no longer overlaps.
    assert_eq!(copied(b.copy(f, 199_000, f, 200_000, 1 << 20)), 1_000);
    assert_eq!(b.size(f), 201_000);
    b.check_digests();
}

#[test]
fn copy_at_and_beyond_eof() {
    let mut b = Backends::new();
    let src = b.file("src", 10_000);
    let dst = b.file("dst", 100);
    // At or past the end of the source: nothing, and the destination is left alone (its
    // attributes and bytes: the root digest moves anyway, with the agreed time it holds).
    let before = (b.run(FsOp::GetAttr { h: dst }), b.contents(dst));
    assert_eq!(copied(b.copy(src, 10_000, dst, 0, 5)), 0);
    assert_eq!(copied(b.copy(src, 1 << 40, dst, 0, 5)), 0);
    assert_eq!(copied(b.copy(src, 0, dst, 0, 0)), 0);
    assert_eq!((b.run(FsOp::GetAttr { h: dst }), b.contents(dst)), before);
    b.check_digests();
    // A short copy at the end of the source, to past the end of the destination.
    assert_eq!(copied(b.copy(src, 9_000, dst, 200_000, 1 << 20)), 1_000);
    let mut want = pattern(0, 100);
    want.resize(200_000, 0);
    want.extend(pattern(9_000, 1_000));
    assert_eq!(b.contents(dst), want);
    b.check_digests();
}

#[test]
fn copy_is_capped_and_errors_are_linuxs() {
    let mut b = Backends::new();
    let big = b.file("big", (COPY_MAX + 3 * CHUNK_SIZE) as usize);
    let dst = b.file("dst", 0);
    assert_eq!(
        copied(b.copy(big, 5, dst, 0, u32::MAX as u64)),
        COPY_MAX as u32
    );
    let dir = match b.run(FsOp::Mkdir {
        dir: ROOT,
        name: b"d".to_vec(),
        mode: 0o755,
    }) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    assert_eq!(b.copy(dir, 0, dst, 0, 1), Err(FsError::IsDir));
    assert_eq!(b.copy(big, 0, dir, 0, 1), Err(FsError::IsDir));
    let link = match b.run(FsOp::Symlink {
        dir: ROOT,
        name: b"l".to_vec(),
        target: b"big".to_vec(),
    }) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    assert_eq!(b.copy(link, 0, dst, 0, 1), Err(FsError::Inval));
    assert_eq!(b.copy(big, u64::MAX - 1, dst, 0, 5), Err(FsError::Inval));
    assert_eq!(b.copy(big, 0, dst, MAX_FILE_SIZE, 5), Err(FsError::FBig));
    // Reading the source and writing the destination are both checked.
    b.run(FsOp::SetAttr {
        h: big,
        set: SetAttrs {
            mode: Some(0o600),
            ..Default::default()
        },
    })
    .expect("chmod");
    b.as_user(1000, 1000);
    assert_eq!(b.copy(big, 0, dst, 0, 5), Err(FsError::Access));
    b.check_digests();
}

#[test]
fn rollback_undoes_punches_and_copies() {
    let (mut b, f) = Backends::with_file(250_000);
    let g = b.file("g", 1_000);
    let mut seq = 0;
    let mut digests = Vec::new();
    for fs in &mut b.fss {
        seq = 7;
        digests.push(fs.svc.checkpoint(seq).expect("checkpoint"));
    }
    assert!(digests.iter().all(|d| *d == digests[0]));
    attr_of(b.fallocate(f, 60_000, 80_000, PUNCH));
    attr_of(b.fallocate(f, 240_000, 100_000, ZERO));
    attr_of(b.fallocate(g, 0, 1 << 20, GROW));
    copied(b.copy(f, 0, g, 500, 200_000));
    assert_ne!(b.check_digests(), digests[0]);
    for fs in &mut b.fss {
        fs.svc.rollback_to(seq).expect("rollback");
    }
    assert_eq!(b.check_digests(), digests[0]);
    assert_eq!(b.contents(f), pattern(0, 250_000));
    assert_eq!(b.contents(g), pattern(0, 1_000));
}
