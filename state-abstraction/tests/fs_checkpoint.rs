//! Checkpoints, rollback, state transfer (get_obj/put_objs) and restart on one backend.

mod common;
use common::*;
use state_abstraction::fs::*;
use state_abstraction::Service;

const ROOT: Handle = Handle::ROOT;

/// A little of everything, so the objects cover every kind and both data pieces and holes.
fn populate(fs: &mut Fs, tag: u8) {
    let d = fs.mkdir(ROOT, &format!("dir{tag}"));
    let f = fs.create(d, "file");
    fs.write(f, 0, &vec![tag; 150_000]);
    fs.write(f, 300_000, b"tail");
    let g = fs.create(ROOT, &format!("g{tag}"));
    fs.write(g, 0, b"small");
    fs.entry(FsOp::Link {
        h: g,
        dir: d,
        name: b"hard".to_vec(),
    });
    fs.entry(FsOp::Symlink {
        dir: d,
        name: b"sym".to_vec(),
        target: b"../g".to_vec(),
    });
    fs.entry(FsOp::Mknod {
        dir: d,
        name: b"fifo".to_vec(),
        mode: 0o644,
        kind: NodeKind::Fifo,
    });
    fs.entry(FsOp::Mknod {
        dir: d,
        name: b"dev".to_vec(),
        mode: 0o600,
        kind: NodeKind::CharDevice { rdev: 0x0501 },
    });
    fs.run(FsOp::SetXattr {
        h: f,
        name: b"user.k".to_vec(),
        value: vec![tag; 10],
        how: XattrSet::Create,
    })
    .expect("xattr");
}

fn mutate(fs: &mut Fs) {
    let d = fs.handle_of(ROOT, "dir1");
    let f = fs.handle_of(d, "file");
    fs.write(f, 70_000, b"changed in the middle");
    fs.truncate(f, 1000).expect("truncate");
    fs.remove(ROOT, b"g1").expect("remove");
    fs.rename(d, b"sym", ROOT, b"moved").expect("rename");
    let n = fs.mkdir(d, "new");
    let x = fs.create(n, "x");
    fs.write(x, 0, b"x");
    fs.rmdir(ROOT, b"dir2").expect_err("not empty");
    fs.remove(d, b"hard").expect("remove hard link");
    fs.rename(ROOT, b"dir2", n, b"d2").expect("move dir");
}

fn all_objects(svc: &FileService) -> Vec<(u64, state_abstraction::AbstractObject)> {
    (0..svc.object_count())
        .map(|i| (i, svc.get_obj(i).expect("get_obj")))
        .collect()
}

fn checkpoint_rollback_on(dir: &std::path::Path) {
    let mut fs = Fs::open(dir);
    populate(&mut fs, 1);
    populate(&mut fs, 2);
    let d10 = fs.svc.checkpoint(10).expect("checkpoint");
    assert_eq!(d10, fs.digest());
    let objs10 = all_objects(&fs.svc);
    let t10 = fs.now;
    mutate(&mut fs);
    let d_mut = fs.digest();
    assert_ne!(d_mut, d10);
    assert!(!fs.svc.modified_since(10).expect("modified").is_empty());
    // The checkpoint is still served as it was.
    for (i, o) in &objs10 {
        assert_eq!(
            fs.svc.get_obj_at(10, *i).as_ref(),
            Some(o),
            "object {i} at checkpoint 10"
        );
        let digests = fs.svc.piece_digests_at(10, *i).expect("piece digests");
        assert_eq!(digests.len(), o.pieces.len());
        for (p, bytes) in o.pieces.iter().enumerate() {
            assert_eq!(
                digests[p],
                state_abstraction::digest::piece_digest(*i, p as u32, bytes)
            );
            assert_eq!(fs.svc.get_piece_at(10, *i, p as u32).as_ref(), Some(bytes));
        }
    }
    let d20 = fs.svc.checkpoint(20).expect("checkpoint 20");
    assert_eq!(d20, d_mut);
    populate(&mut fs, 3);
    fs.svc.rollback_to(10).expect("rollback");
    assert_eq!(fs.digest(), d10);
    assert_eq!(all_objects(&fs.svc), objs10);
    assert_eq!(fs.svc.checkpoints(), vec![(10, d10)]);
    // Behaviour after rollback: the same operations at the same times give the same state.
    fs.now = t10;
    mutate(&mut fs);
    assert_eq!(fs.digest(), d_mut);
}

#[test]
fn checkpoint_and_rollback_root_fs() {
    let dir = temp_dir();
    checkpoint_rollback_on(dir.path());
}

#[test]
fn checkpoint_and_rollback_tmpfs() {
    let Some(dir) = shm_dir() else {
        eprintln!("no /dev/shm: skipped");
        return;
    };
    checkpoint_rollback_on(dir.path());
}

/// A service that went through [`populate`] twice and [`mutate`], and its directory.
fn changed_service() -> (tempfile::TempDir, Fs) {
    let (dir, mut fs) = fresh_fs();
    populate(&mut fs, 1);
    populate(&mut fs, 2);
    mutate(&mut fs);
    (dir, fs)
}

#[test]
fn put_objs_into_fresh_service_reproduces_state() {
    let (_a, mut fs) = changed_service();
    let b = temp_dir();
    let want = fs.digest();
    let mut objs = all_objects(&fs.svc);
    objs.reverse();
    let mut other = Fs::open(b.path());
    other.now = fs.now;
    other.svc.put_objs(objs).expect("put_objs");
    assert_eq!(other.digest(), want);
    assert_eq!(all_objects(&other.svc), all_objects(&fs.svc));
    // Same behaviour afterwards.
    for t in [&mut fs, &mut other] {
        populate(t, 7);
    }
    assert_eq!(other.digest(), fs.digest());
    assert_eq!(
        std::fs::read(b.path().join("tree/root/dir1/file"))
            .expect("concrete file")
            .len(),
        1000
    );
}

#[test]
fn put_objs_over_existing_state() {
    let (_a, mut fs) = changed_service();
    let b = temp_dir();
    let mut other = Fs::open(b.path());
    populate(&mut other, 2);
    populate(&mut other, 5);
    other.svc.put_objs(all_objects(&fs.svc)).expect("put_objs");
    assert_eq!(other.digest(), fs.digest());
}

#[test]
fn table_survives_reopen() {
    let dir = temp_dir();
    let (want, now) = {
        let mut fs = Fs::open(dir.path());
        populate(&mut fs, 1);
        fs.svc.flush().expect("flush");
        (fs.digest(), fs.now)
    };
    let mut fs = Fs::open(dir.path());
    fs.now = now;
    assert_eq!(fs.digest(), want);
    // Reopen with a checkpoint and later unsaved changes: back to the checkpoint.
    let cp = fs.svc.checkpoint(5).expect("checkpoint");
    populate(&mut fs, 2);
    drop(fs);
    let mut fs = Fs::open(dir.path());
    assert_eq!(fs.svc.checkpoints(), vec![(5, cp)]);
    assert_eq!(fs.digest(), cp);
    assert_eq!(fs.lookup(ROOT, "dir2"), Err(FsError::NoEnt));
    populate(&mut fs, 2);
}

#[test]
fn put_objs_in_batches_and_serving_side() {
    let (_a, mut fs) = changed_service();
    let b = temp_dir();
    let cp = fs.svc.checkpoint(3).expect("checkpoint");
    // Serving side: the tree nodes verify against the checkpoint digest.
    let count = fs.svc.object_count();
    let top = fs.svc.partition_node(3, 0, 0).expect("root node");
    let leaves = fs.svc.partition_node(3, 3, 0).expect("leaf node");
    assert_eq!(leaves.len() as u64, count);
    for (i, d) in leaves.iter().enumerate() {
        let pieces = fs.svc.piece_digests_at(3, i as u64).expect("pieces");
        assert_eq!(
            *d,
            state_abstraction::digest::object_digest(i as u64, &pieces)
        );
    }
    assert!(!top.is_empty());
    assert_eq!(fs.svc.partition_node(99, 0, 0), None);
    // The receiving side gets the objects in several batches, children before parents and
    // parents before children mixed; between batches the state may be inconsistent and
    // requests are refused, never answered wrongly.
    let mut other = Fs::open(b.path());
    populate(&mut other, 4);
    let objs = all_objects(&fs.svc);
    let (odd, even): (Vec<_>, Vec<_>) = objs.into_iter().partition(|(i, _)| i % 2 == 1);
    other.svc.put_objs(odd).expect("first batch");
    let r = other.run(FsOp::GetAttr { h: ROOT });
    assert!(matches!(r, Ok(_) | Err(FsError::Io)), "{r:?}");
    other.svc.put_objs(even).expect("second batch");
    assert_eq!(other.digest(), cp);
    other.now = fs.now;
    populate(&mut other, 5);
    populate(&mut fs, 5);
    assert_eq!(other.digest(), fs.digest());
}

#[test]
fn put_objs_rejects_malformed_objects() {
    let (_a, mut fs) = fresh_fs();
    populate(&mut fs, 1);
    let d = fs.digest();
    let mut obj = fs.svc.get_obj(2).expect("get");
    obj.pieces[0].push(0);
    let bad = vec![(2, obj)];
    assert!(matches!(
        fs.svc.put_objs(bad),
        Err(state_abstraction::ServiceError::BadObject { index: 2, .. })
    ));
    let empty = vec![(3, state_abstraction::AbstractObject { pieces: Vec::new() })];
    assert!(fs.svc.put_objs(empty).is_err());
    let mut file = fs.svc.get_obj(2).expect("get");
    file.pieces.push(vec![1, 2, 3]);
    assert!(fs.svc.put_objs(vec![(2, file)]).is_err());
    assert_eq!(fs.digest(), d, "a rejected put_objs changes nothing");
}

/// The agreed-time clamp is replicated state: a replica that received a state by transfer must
/// clamp a later proposal exactly as the replica it came from does. Otherwise a faulty
/// primary's time inside the skew window (below the newest agreed time) gives the two
/// different timestamps, replies and checkpoint digests.
#[test]
fn state_transfer_carries_the_agreed_time() {
    let (_a, mut fs) = fresh_fs();
    let b = temp_dir();
    populate(&mut fs, 1);
    // The newest agreed time, moved by an ordered request that changes no object.
    let late = fs.now + 1_000_000_000;
    let getattr = FsRequest {
        caller: Caller::root(),
        op: FsOp::GetAttr { h: ROOT },
    };
    fs.svc.apply(&getattr, late).expect("getattr");

    let mut other = Fs::open(b.path());
    other.svc.put_objs(all_objects(&fs.svc)).expect("put_objs");
    assert_eq!(other.digest(), fs.digest());

    // The same ordered request, with a proposal below the source's newest agreed time.
    let op = encode(&FsRequest {
        caller: Caller::root(),
        op: FsOp::Mkdir {
            dir: ROOT,
            name: b"after-transfer".to_vec(),
            mode: 0o755,
        },
    });
    let early = encode(&(late - 500_000_000));
    let client = state_abstraction::ClientId(1);
    let want = fs.svc.execute(&op, client, &early, false);
    let got = other.svc.execute(&op, client, &early, false);
    assert_eq!(got, want, "replies differ after state transfer");
    match decode::<FsResult>(&want) {
        Some(Ok(FsReply::Entry { attr, .. })) => {
            assert_eq!(attr.mtime, Timespec::from_nanos(late), "time not clamped")
        }
        other => panic!("mkdir: {other:?}"),
    }
    assert_eq!(
        other.digest(),
        fs.digest(),
        "digests differ after state transfer"
    );
    assert_eq!(
        other.svc.checkpoint(5).expect("checkpoint"),
        fs.svc.checkpoint(5).expect("checkpoint")
    );

    // So the agreed time must show in the abstract state even when nothing else changes.
    let before = fs.svc.get_obj(0).expect("root");
    fs.svc.apply(&getattr, late + 1).expect("getattr");
    assert_ne!(
        fs.svc.get_obj(0).expect("root"),
        before,
        "the newest agreed time is not in the abstract state"
    );
}

/// A rollback restores the agreed time with the rest of the checkpoint's state.
#[test]
fn rollback_restores_the_agreed_time() {
    let (_a, mut fs) = fresh_fs();
    populate(&mut fs, 1);
    let at_checkpoint = fs.svc.checkpoint(1).expect("checkpoint");
    let root = fs.svc.get_obj(0).expect("root");
    fs.now += 10_000_000_000;
    fs.mkdir(ROOT, "later");
    fs.svc.rollback_to(1).expect("rollback");
    assert_eq!(fs.svc.get_obj(0).expect("root"), root);
    assert_eq!(fs.digest(), at_checkpoint);
    // A proposal between the checkpoint's time and the abandoned future's is not clamped.
    fs.now -= 5_000_000_000;
    let (_, attr) = fs.entry(FsOp::Mkdir {
        dir: ROOT,
        name: b"again".to_vec(),
        mode: 0o755,
    });
    assert_eq!(attr.mtime, Timespec::from_nanos(fs.now));
}
