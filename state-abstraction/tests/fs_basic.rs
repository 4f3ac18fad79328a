//! Basic behaviour of the file service's operations on one backend.

mod common;
use common::*;
use state_abstraction::fs::*;

const ROOT: Handle = Handle::ROOT;

#[test]
fn create_write_read_lookup_remove() {
    let (dir, mut fs) = fresh_fs();
    let f = fs.create(ROOT, "a.txt");
    assert_eq!(
        f,
        Handle {
            index: 1,
            generation: 1
        }
    );
    fs.write(f, 0, b"hello world");
    assert_eq!(fs.read(f, 6, 100), b"world");
    let a = fs.attr(f);
    assert_eq!(
        (a.size, a.fileid, a.nlink, a.kind),
        (11, 1, 1, FileType::Regular)
    );
    assert_eq!(a.blocks, 8);
    let (h, _) = fs.entry(FsOp::Lookup {
        dir: ROOT,
        name: b"a.txt".to_vec(),
    });
    assert_eq!(h, f);
    assert_eq!(fs.lookup(ROOT, "nope"), Err(FsError::NoEnt));
    // The data is really in the concrete tree.
    assert_eq!(
        std::fs::read(dir.path().join("tree/root/a.txt")).expect("concrete"),
        b"hello world"
    );
    assert_eq!(fs.remove(ROOT, b"a.txt"), Ok(FsReply::Done));
    assert_eq!(fs.run(FsOp::GetAttr { h: f }), Err(FsError::Stale));
    // The slot is reused with a new generation; the old handle stays stale.
    let g = fs.create(ROOT, "b");
    assert_eq!(
        g,
        Handle {
            index: 1,
            generation: 2
        }
    );
    assert_eq!(fs.run(FsOp::GetAttr { h: f }), Err(FsError::Stale));
    assert!(!dir.path().join("tree/root/a.txt").exists());
}

#[test]
fn directories_rename_and_nlink() {
    let (dir, mut fs) = fresh_fs();
    let [a, b] = ["a", "b"].map(|name| fs.mkdir(ROOT, name));
    let c = fs.mkdir(a, "c");
    assert_eq!(fs.attr(ROOT).nlink, 4);
    assert_eq!(fs.attr(a).nlink, 3);
    let r = fs.rename(a, b"c", b, b"d");
    assert_eq!(r, Ok(FsReply::Done));
    assert_eq!(fs.attr(a).nlink, 2);
    assert_eq!(fs.attr(b).nlink, 3);
    assert_eq!(fs.names(b), vec!["d"]);
    assert!(dir.path().join("tree/root/b/d").is_dir());
    // Into its own subtree.
    let r = fs.rename(ROOT, b"b", c, b"x");
    assert_eq!(r, Err(FsError::Inval));
    assert_eq!(fs.rmdir(ROOT, b"b"), Err(FsError::NotEmpty));
    assert_eq!(fs.rmdir(b, b"d"), Ok(FsReply::Done));
    assert_eq!(fs.attr(b).nlink, 2);
    assert_eq!(fs.attr(ROOT).nlink, 4);
    // Rename a directory over an empty directory.
    let r = fs.rename(ROOT, b"a", ROOT, b"b");
    assert_eq!(r, Ok(FsReply::Done));
    assert_eq!(fs.attr(ROOT).nlink, 3);
    assert_eq!(fs.run(FsOp::GetAttr { h: b }), Err(FsError::Stale));
    assert_eq!(fs.names(ROOT), vec!["b"]);
}

#[test]
fn symlinks_links_and_readdir_pages() {
    let (dir, mut fs) = fresh_fs();
    let (s, sa) = fs.entry(FsOp::Symlink {
        dir: ROOT,
        name: b"l".to_vec(),
        target: b"/etc/passwd".to_vec(),
    });
    assert_eq!(sa.size, 11);
    assert_eq!(
        fs.run(FsOp::ReadLink { h: s }),
        Ok(FsReply::ReadLink {
            target: b"/etc/passwd".to_vec()
        })
    );
    let f = fs.create(ROOT, "f");
    let (h, attr) = fs.entry(FsOp::Link {
        h: f,
        dir: ROOT,
        name: b"g".to_vec(),
    });
    assert_eq!((h, attr.nlink), (f, 2));
    let d = fs.mkdir(ROOT, "zz");
    assert_eq!(fs.link(d, ROOT, b"d2"), Err(FsError::Perm));
    for n in ["m3", "m1", "m2"] {
        fs.create(ROOT, n);
    }
    assert_eq!(fs.names(ROOT), vec!["f", "g", "l", "m1", "m2", "m3", "zz"]);
    let mut seen = Vec::new();
    let mut cookie = 0;
    loop {
        match fs.run(FsOp::ReadDir {
            dir: ROOT,
            cookie,
            count: 3,
            plus: true,
        }) {
            Ok(FsReply::ReadDir { entries, eof }) => {
                for e in &entries {
                    assert!(e.attr.is_some());
                    seen.push(String::from_utf8_lossy(&e.name).into_owned());
                    cookie = e.cookie;
                }
                if eof {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, vec!["f", "g", "l", "m1", "m2", "m3", "zz"]);
    fs.remove(ROOT, b"f").expect("remove");
    assert_eq!(fs.attr(f).nlink, 1);
    assert!(dir.path().join("tree/root/g").exists());
}

#[test]
fn setattr_truncate_extend_and_statfs() {
    let (_dir, mut fs) = fresh_fs();
    let f = fs.create(ROOT, "f");
    fs.write(f, 100_000, b"xyz");
    assert_eq!(fs.attr(f).size, 100_003);
    assert_eq!(fs.read(f, 99_999, 10), b"\0xyz");
    let set = SetAttrs {
        size: Some(10),
        mode: Some(0o600),
        ..Default::default()
    };
    match fs.run(FsOp::SetAttr { h: f, set }) {
        Ok(FsReply::Attr(a)) => assert_eq!((a.size, a.mode), (10, 0o600)),
        other => panic!("{other:?}"),
    }
    let set = SetAttrs {
        size: Some(70_000),
        ..Default::default()
    };
    fs.run(FsOp::SetAttr { h: f, set }).expect("extend");
    assert_eq!(fs.read(f, 0, 20), vec![0u8; 20]);
    match fs.run(FsOp::StatFs { h: ROOT }) {
        Ok(FsReply::StatFs(s)) => {
            assert_eq!((s.bsize, s.namemax, s.files - s.ffree), (4096, 255, 2))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn execute_round_trip_and_nondet() {
    use state_abstraction::{ClientId, Service};
    let dir = temp_dir();
    let mut svc = FileService::open(dir.path()).expect("open");
    let req = FsRequest {
        caller: Caller::root(),
        op: FsOp::Mkdir {
            dir: ROOT,
            name: b"d".to_vec(),
            mode: 0o700,
        },
    };
    let t = svc.propose_nondet(5_000_000_000);
    assert!(svc.check_nondet(&t, 5_000_000_000));
    let reply = svc.execute(&encode(&req), ClientId(1), &t, false);
    let r: FsResult = decode(&reply).expect("reply decodes");
    let FsReply::Entry { attr, .. } = r.expect("mkdir") else {
        panic!()
    };
    assert_eq!(attr.mtime, Timespec { secs: 5, nsecs: 0 });
    // A pipelined batch may carry the same (or an older) proposal; it is accepted, and time
    // still only moves forward because execution clamps it.
    assert!(svc.check_nondet(&t, 5_000_000_000));
    // The proposal is the primary's clock as it is; a clock behind the agreed time is clamped
    // at execution.
    let t2: u64 = decode(&svc.propose_nondet(1)).expect("u64");
    assert_eq!(t2, 1);
    assert!(!svc.check_nondet(&encode(&(t2 + 10 * 60 * 1_000_000_000)), t2));
    let older = encode(&4_000_000_000u64);
    let req2 = FsRequest {
        caller: Caller::root(),
        op: FsOp::Mkdir {
            dir: ROOT,
            name: b"e".to_vec(),
            mode: 0o700,
        },
    };
    let r2: FsResult =
        decode(&svc.execute(&encode(&req2), ClientId(1), &older, false)).expect("reply decodes");
    let FsReply::Entry { attr, .. } = r2.expect("mkdir") else {
        panic!()
    };
    assert_eq!(
        attr.mtime,
        Timespec { secs: 5, nsecs: 0 },
        "an older agreed time is clamped to the newest"
    );
    let bad = svc.execute(b"\xff\xff\xff", ClientId(1), &t, false);
    assert_eq!(decode::<FsResult>(&bad), Some(Err(FsError::BadRequest)));
}
