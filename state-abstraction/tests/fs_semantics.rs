//! Exact canonical answers: permissions, sticky and setgid directories, stale handles, bad
//! names, limits, exclusive create, xattrs, and recovery after an unclean shutdown.

mod common;
use common::*;
use state_abstraction::fs::*;
use state_abstraction::Service;

const ROOT: Handle = Handle::ROOT;

fn name(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn chmod(fs: &mut Fs, h: Handle, mode: u32) -> FsResult {
    fs.run(FsOp::SetAttr {
        h,
        set: SetAttrs {
            mode: Some(mode),
            ..Default::default()
        },
    })
}

fn chown(fs: &mut Fs, h: Handle, uid: Option<u32>, gid: Option<u32>) -> FsResult {
    fs.run(FsOp::SetAttr {
        h,
        set: SetAttrs {
            uid,
            gid,
            ..Default::default()
        },
    })
}

#[test]
fn permission_denials_are_exact() {
    let (_dir, mut fs) = fresh_fs();
    // Root's directory is 0755: others may look but not create.
    fs.as_user(1000, 1000, &[]);
    let r = fs.try_create(ROOT, b"x", CreateHow::Guarded);
    assert_eq!(r, Err(FsError::Access));
    assert_eq!(fs.try_mkdir(ROOT, b"x"), Err(FsError::Access));
    fs.as_user(0, 0, &[]);
    let home = fs.mkdir(ROOT, "home");
    chown(&mut fs, home, Some(1000), Some(1000)).expect("chown by root");
    chmod(&mut fs, home, 0o700).expect("chmod");
    // Another user cannot search it: lookups and creates inside are refused.
    fs.as_user(1001, 1001, &[]);
    assert_eq!(fs.lookup(home, "f"), Err(FsError::Access));
    assert_eq!(
        fs.run(FsOp::ReadDir {
            dir: home,
            cookie: 0,
            count: 10,
            plus: false
        }),
        Err(FsError::Access)
    );
    // The owner works in it; a 0600 file is private.
    fs.as_user(1000, 1000, &[2000]);
    let f = fs.create(home, "f");
    fs.write(f, 0, b"secret");
    chmod(&mut fs, f, 0o600).expect("owner chmod");
    chmod(&mut fs, home, 0o755).expect("owner chmod dir");
    fs.as_user(1001, 1001, &[]);
    assert_eq!(fs.try_read(f, 0, 10), Err(FsError::Access));
    assert_eq!(fs.try_write(f, 0, b"x"), Err(FsError::Access));
    assert_eq!(chmod(&mut fs, f, 0o666), Err(FsError::Perm));
    assert_eq!(chown(&mut fs, f, Some(1001), None), Err(FsError::Perm));
    assert_eq!(fs.remove(home, b"f"), Err(FsError::Access));
    assert_eq!(fs.access(f, 7), Ok(FsReply::Access { granted: 0 }));
    // The owner keeps access to its data even at mode 0 (an open descriptor outlives chmod).
    fs.as_user(1000, 1000, &[2000]);
    chmod(&mut fs, f, 0o000).expect("chmod 0");
    assert_eq!(fs.read(f, 0, 10), b"secret");
    assert_eq!(fs.access(f, 7), Ok(FsReply::Access { granted: 0 }));
    // chown: only root gives away; the owner may change the group to one it is in.
    assert_eq!(chown(&mut fs, f, Some(1001), None), Err(FsError::Perm));
    assert!(
        chown(&mut fs, f, Some(1000), None).is_ok(),
        "chown to oneself is allowed"
    );
    assert_eq!(chown(&mut fs, f, None, Some(3000)), Err(FsError::Perm));
    match chown(&mut fs, f, None, Some(2000)) {
        Ok(FsReply::Attr(a)) => assert_eq!(a.gid, 2000),
        other => panic!("{other:?}"),
    }
    // Root bypasses permission bits, but executing needs some x bit.
    fs.as_user(0, 0, &[]);
    assert_eq!(fs.access(f, 7), Ok(FsReply::Access { granted: 6 }));
    chmod(&mut fs, f, 0o010).expect("chmod");
    assert_eq!(fs.access(f, 7), Ok(FsReply::Access { granted: 7 }));
    // Group bits apply to supplementary groups; owner bits win over group bits.
    chmod(&mut fs, f, 0o040).expect("chmod");
    fs.as_user(1002, 1002, &[2000]);
    assert_eq!(fs.access(f, 4), Ok(FsReply::Access { granted: 4 }));
    chown(&mut fs, f, None, None).expect("empty setattr needs nothing");
    fs.as_user(1000, 1000, &[2000]);
    assert_eq!(fs.access(f, 4), Ok(FsReply::Access { granted: 0 }));
}

#[test]
fn setuid_is_cleared_by_unprivileged_writes_and_chown() {
    let (_dir, mut fs) = fresh_fs();
    let f = fs.create(ROOT, "prog");
    chown(&mut fs, f, Some(1000), Some(1000)).expect("chown");
    chmod(&mut fs, f, 0o6755).expect("chmod");
    fs.write(f, 0, b"root writes keep the bits");
    assert_eq!(fs.attr(f).mode, 0o6755);
    fs.as_user(1000, 1000, &[]);
    fs.write(f, 0, b"user");
    assert_eq!(fs.attr(f).mode, 0o0755);
    chmod(&mut fs, f, 0o6755).expect("owner sets the bits again");
    fs.as_user(0, 0, &[]);
    chown(&mut fs, f, None, Some(0)).expect("chgrp");
    assert_eq!(
        fs.attr(f).mode,
        0o0755,
        "chown of an executable clears setuid and setgid"
    );
    // A non-member cannot set setgid: it is dropped silently.
    fs.as_user(1000, 1000, &[]);
    match chmod(&mut fs, f, 0o2755) {
        Ok(FsReply::Attr(a)) => assert_eq!(a.mode, 0o755),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sticky_directories() {
    let (_dir, mut fs) = fresh_fs();
    let tmp = fs.mkdir(ROOT, "tmp");
    chmod(&mut fs, tmp, 0o1777).expect("chmod");
    fs.as_user(1000, 1000, &[]);
    let mine = fs.create(tmp, "mine");
    fs.as_user(1001, 1001, &[]);
    fs.create(tmp, "theirs");
    assert_eq!(fs.remove(tmp, b"mine"), Err(FsError::Perm));
    let r = fs.rename(tmp, b"mine", tmp, b"x");
    assert_eq!(r, Err(FsError::Perm));
    // Replacing someone else's file by rename is refused too.
    let r = fs.rename(tmp, b"theirs", tmp, b"mine");
    assert_eq!(r, Err(FsError::Perm));
    // Own files may go.
    let r = fs.rename(tmp, b"theirs", tmp, b"t2");
    assert_eq!(r, Ok(FsReply::Done));
    assert_eq!(fs.remove(tmp, b"t2"), Ok(FsReply::Done));
    // The directory's owner (root here) may remove anything.
    fs.as_user(0, 0, &[]);
    assert_eq!(fs.remove(tmp, b"mine"), Ok(FsReply::Done));
    assert_eq!(fs.run(FsOp::GetAttr { h: mine }), Err(FsError::Stale));
}

#[test]
fn setgid_directories_pass_on_their_group() {
    let (_dir, mut fs) = fresh_fs();
    let proj = fs.mkdir(ROOT, "proj");
    chown(&mut fs, proj, None, Some(500)).expect("chgrp");
    chmod(&mut fs, proj, 0o2777).expect("chmod");
    fs.as_user(1000, 1000, &[]);
    let (_, fa) = fs.create_as(proj, b"f", 0o2644, CreateHow::Guarded);
    assert_eq!(fa.gid, 500);
    assert_eq!(
        fa.mode, 0o644,
        "setgid on a file of a group the creator is not in is dropped"
    );
    let (sub, da) = fs.entry(FsOp::Mkdir {
        dir: proj,
        name: name("sub"),
        mode: 0o755,
    });
    assert_eq!((da.gid, da.mode), (500, 0o2755));
    let (_, ga) = fs.create_as(sub, b"g", 0o644, CreateHow::Guarded);
    assert_eq!(ga.gid, 500);
    // Without setgid the creator's group is used.
    let (_, ha) = fs.create_as(proj, b"h", 0o644, CreateHow::Guarded);
    assert_eq!(ha.gid, 500);
    fs.as_user(0, 0, &[]);
    chmod(&mut fs, proj, 0o777).expect("chmod");
    fs.as_user(1000, 1000, &[]);
    let (_, ia) = fs.create_as(proj, b"i", 0o644, CreateHow::Guarded);
    assert_eq!(ia.gid, 1000);
}

#[test]
fn stale_handles() {
    let (_dir, mut fs) = fresh_fs();
    let d = fs.mkdir(ROOT, "d");
    let f = fs.create(d, "f");
    fs.remove(d, b"f").expect("remove");
    assert_eq!(fs.try_read(f, 0, 1), Err(FsError::Stale));
    let g = fs.create(d, "g");
    assert_eq!(
        (g.index, g.generation),
        (f.index, f.generation + 1),
        "lowest free slot, next generation"
    );
    assert_eq!(fs.try_write(f, 0, b"x"), Err(FsError::Stale));
    fs.remove(d, b"g").expect("remove");
    fs.rmdir(ROOT, b"d").expect("rmdir");
    assert_eq!(
        fs.try_create(d, b"x", CreateHow::Guarded),
        Err(FsError::Stale)
    );
    assert_eq!(
        fs.run(FsOp::GetAttr {
            h: Handle {
                index: 99,
                generation: 1
            }
        }),
        Err(FsError::Stale)
    );
    assert_eq!(
        fs.run(FsOp::GetAttr {
            h: Handle {
                index: 0,
                generation: 2
            }
        }),
        Err(FsError::Stale)
    );
}

#[test]
fn bad_names_get_canonical_errors() {
    let (_dir, mut fs) = fresh_fs();
    let cases: Vec<(Vec<u8>, FsError)> = vec![
        (Vec::new(), FsError::Inval),
        (name("."), FsError::Inval),
        (name(".."), FsError::Inval),
        (name("a/b"), FsError::Inval),
        (b"a\0b".to_vec(), FsError::Inval),
        (vec![b'x'; 256], FsError::NameTooLong),
    ];
    for (n, e) in &cases {
        let r = fs.try_create(ROOT, n.clone(), CreateHow::Guarded);
        assert_eq!(r, Err(*e), "create {n:?}");
        assert_eq!(fs.try_mkdir(ROOT, n.clone()), Err(*e), "mkdir {n:?}");
        assert_eq!(fs.remove(ROOT, n.clone()), Err(*e), "remove {n:?}");
        let r = fs.rename(ROOT, b"nope", ROOT, n.clone());
        assert_eq!(r, Err(*e), "rename to {n:?}");
    }
    // The longest name and arbitrary bytes are fine, and nothing escapes the tree.
    fs.create(ROOT, &"y".repeat(255));
    let odd = vec![0xff, 0xfe, b'\n', b' '];
    fs.create_as(ROOT, odd.clone(), 0o644, CreateHow::Guarded);
    assert_eq!(fs.names(ROOT).len(), 2);
    // "." and ".." are answered by lookup, never created.
    let d = fs.mkdir(ROOT, "d");
    assert!(matches!(fs.lookup(d, ".."), Ok(FsReply::Entry { handle, .. }) if handle == ROOT));
    assert!(matches!(fs.lookup(d, "."), Ok(FsReply::Entry { handle, .. }) if handle == d));
}

#[test]
fn symlinks_are_never_followed() {
    let dir = temp_dir();
    let outside = temp_dir();
    let mut fs = Fs::open(dir.path());
    let target = outside
        .path()
        .join("victim")
        .into_os_string()
        .into_encoded_bytes();
    fs.entry(FsOp::Symlink {
        dir: ROOT,
        name: name("evil"),
        target,
    });
    let r = fs.try_create(ROOT, b"evil", CreateHow::Unchecked);
    assert_eq!(r, Err(FsError::Exist));
    let (l, _) = fs.entry(FsOp::Lookup {
        dir: ROOT,
        name: name("evil"),
    });
    assert_eq!(fs.try_write(l, 0, b"x"), Err(FsError::Inval));
    assert_eq!(
        fs.try_create(l, b"x", CreateHow::Guarded),
        Err(FsError::NotDir)
    );
    assert!(!outside.path().join("victim").exists());
    // Symlink target limits.
    assert_eq!(fs.symlink(ROOT, b"e", Vec::new()), Err(FsError::NoEnt));
    assert_eq!(
        fs.symlink(ROOT, b"e", vec![b'a'; 4096]),
        Err(FsError::NameTooLong)
    );
}

#[test]
fn limits() {
    let (_dir, mut fs) = fresh_fs();
    let f = fs.create(ROOT, "f");
    let mib = 1 << 20;
    assert_eq!(fs.try_read(f, 0, mib + 1), Err(FsError::Inval));
    assert_eq!(
        fs.try_write(f, 0, &vec![0; mib as usize + 1]),
        Err(FsError::Inval)
    );
    fs.write(f, 0, &vec![1; mib as usize]);
    let max = 8u64 << 30;
    assert_eq!(fs.try_write(f, max, b"x"), Err(FsError::FBig));
    assert_eq!(fs.try_write(f, u64::MAX, b"x"), Err(FsError::FBig));
    let set = SetAttrs {
        size: Some(max + 1),
        ..Default::default()
    };
    assert_eq!(fs.run(FsOp::SetAttr { h: f, set }), Err(FsError::FBig));
    let d = fs.mkdir(ROOT, "d");
    assert_eq!(fs.try_write(d, 0, b"x"), Err(FsError::IsDir));
    assert_eq!(fs.try_read(d, 0, 1), Err(FsError::IsDir));
    assert_eq!(fs.run(FsOp::ReadLink { h: f }), Err(FsError::Inval));
    assert_eq!(fs.remove(ROOT, b"d"), Err(FsError::IsDir));
    assert_eq!(fs.rmdir(ROOT, b"f"), Err(FsError::NotDir));
    assert_eq!(
        fs.run(FsOp::Lookup {
            dir: f,
            name: name("x")
        }),
        Err(FsError::NotDir)
    );
    // Reading at and past the end.
    match fs.try_read(f, mib as u64 - 2, 10) {
        Ok(FsReply::Read { data, eof }) => assert_eq!((data.len(), eof), (2, true)),
        other => panic!("{other:?}"),
    }
    match fs.try_read(f, 1 << 40, 10) {
        Ok(FsReply::Read { data, eof }) => assert_eq!((data.len(), eof), (0, true)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn create_modes_and_rename_rules() {
    let (_dir, mut fs) = fresh_fs();
    let how = |v| CreateHow::Exclusive { verifier: v };
    let (f, _) = fs.create_as(ROOT, b"f", 0o644, how(42));
    // A retransmitted exclusive create succeeds; another verifier does not.
    let (g, _) = fs.create_as(ROOT, b"f", 0o644, how(42));
    assert_eq!(f, g);
    assert_eq!(fs.try_create(ROOT, b"f", how(43)), Err(FsError::Exist));
    assert_eq!(
        fs.try_create(ROOT, b"f", CreateHow::Guarded),
        Err(FsError::Exist)
    );
    let (u, _) = fs.create_as(ROOT, b"f", 0o600, CreateHow::Unchecked);
    assert_eq!(u, f);
    fs.mkdir(ROOT, "d");
    let e = fs.mkdir(ROOT, "e");
    fs.create(e, "inside");
    let rn = |fs: &mut Fs, a: &str, b: &str, no_replace: bool| {
        fs.run(FsOp::Rename {
            from_dir: ROOT,
            from_name: name(a),
            to_dir: ROOT,
            to_name: name(b),
            no_replace,
        })
    };
    assert_eq!(rn(&mut fs, "f", "d", false), Err(FsError::IsDir));
    assert_eq!(rn(&mut fs, "d", "f", false), Err(FsError::NotDir));
    assert_eq!(rn(&mut fs, "d", "e", false), Err(FsError::NotEmpty));
    assert_eq!(rn(&mut fs, "f", "f", true), Err(FsError::Exist));
    assert_eq!(rn(&mut fs, "f", "f", false), Ok(FsReply::Done));
    assert_eq!(rn(&mut fs, "nope", "x", false), Err(FsError::NoEnt));
    fs.create(ROOT, "g");
    assert_eq!(rn(&mut fs, "f", "g", true), Err(FsError::Exist));
    assert_eq!(rn(&mut fs, "f", "g", false), Ok(FsReply::Done));
    assert_eq!(fs.names(ROOT), vec!["d", "e", "g"]);
    // Renaming one hard link onto another of the same file does nothing.
    fs.entry(FsOp::Link {
        h: f,
        dir: ROOT,
        name: name("h"),
    });
    assert_eq!(rn(&mut fs, "g", "h", false), Ok(FsReply::Done));
    assert_eq!(fs.names(ROOT), vec!["d", "e", "g", "h"]);
    assert_eq!(fs.attr(f).nlink, 2);
}

#[test]
fn xattrs() {
    let (_dir, mut fs) = fresh_fs();
    let f = fs.create(ROOT, "f");
    let long_name = "u".repeat(256);
    let (big, too_big) = (vec![7; 65536], vec![7; 65537]);
    // In order: each step sees what the ones before it set.
    let steps: [(&str, &[u8], XattrSet, FsResult); 10] = [
        ("user.a", b"1", XattrSet::Replace, Err(FsError::NoData)),
        ("user.a", b"1", XattrSet::Create, Ok(FsReply::Done)),
        ("user.a", b"2", XattrSet::Create, Err(FsError::Exist)),
        ("user.a", b"3", XattrSet::Replace, Ok(FsReply::Done)),
        ("user.b", &big, XattrSet::Either, Ok(FsReply::Done)),
        ("user.c", &too_big, XattrSet::Either, Err(FsError::Range)),
        (&long_name, b"", XattrSet::Either, Err(FsError::Range)),
        ("", b"", XattrSet::Either, Err(FsError::Inval)),
        (
            "system.posix_acl_access",
            b"",
            XattrSet::Either,
            Err(FsError::NotSupp),
        ),
        ("trusted.t", b"t", XattrSet::Either, Ok(FsReply::Done)),
    ];
    for (n, v, how, want) in steps {
        assert_eq!(fs.set_xattr(f, n, v, how), want, "set {n:?} {how:?}");
    }
    assert_eq!(
        fs.get_xattr(f, b"user.a"),
        Ok(FsReply::Xattr {
            value: b"3".to_vec()
        })
    );
    let list = fs.run(FsOp::ListXattr { h: f });
    assert_eq!(
        list,
        Ok(FsReply::XattrList {
            names: vec![name("trusted.t"), name("user.a"), name("user.b")]
        })
    );
    fs.as_user(1000, 1000, &[]);
    let list = fs.run(FsOp::ListXattr { h: f });
    assert_eq!(
        list,
        Ok(FsReply::XattrList {
            names: vec![name("user.a"), name("user.b")]
        })
    );
    assert_eq!(fs.get_xattr(f, b"trusted.t"), Err(FsError::Perm));
    assert_eq!(
        fs.set_xattr(f, "user.a", b"x", XattrSet::Either),
        Err(FsError::Access)
    );
    fs.as_user(0, 0, &[]);
    assert_eq!(fs.remove_xattr(f, b"user.a"), Ok(FsReply::Done));
    assert_eq!(fs.remove_xattr(f, b"user.a"), Err(FsError::NoData));
    assert_eq!(fs.get_xattr(f, b"user.a"), Err(FsError::NoData));
}

#[test]
fn timestamps_are_the_agreed_time() {
    let (_dir, mut fs) = fresh_fs();
    fs.now = 10_000_000_000;
    let f = fs.create(ROOT, "f");
    let created = fs.attr(f);
    assert_eq!(
        created.mtime,
        Timespec {
            secs: 10,
            nsecs: 1000
        }
    );
    assert_eq!(created.ctime, created.mtime);
    fs.read(f, 0, 1);
    assert_eq!(fs.attr(f).atime, created.atime, "no atime on reads");
    fs.write(f, 0, b"x");
    let written = fs.attr(f);
    assert_eq!(
        written.mtime,
        Timespec {
            secs: 10,
            nsecs: 5000
        }
    );
    let at = Timespec { secs: 1, nsecs: 5 };
    let set = SetAttrs {
        atime: Some(SetTime::At(at)),
        mtime: Some(SetTime::Now),
        ..Default::default()
    };
    match fs.run(FsOp::SetAttr { h: f, set }) {
        Ok(FsReply::Attr(a)) => {
            assert_eq!(a.atime, at);
            assert_eq!(
                a.mtime,
                Timespec {
                    secs: 10,
                    nsecs: 7000
                }
            );
            assert_eq!(a.ctime, a.mtime);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fs.attr(ROOT).mtime,
        created.mtime,
        "the directory changed when f was created"
    );
}

fn crash_then_reopen(dir: &std::path::Path, data_changes: bool) {
    let mut fs = Fs::open(dir);
    let d = fs.mkdir(ROOT, "d");
    let f = fs.create(d, "f");
    fs.write(f, 0, &vec![3; 200_000]);
    let cp = fs.svc.checkpoint(1).expect("checkpoint");
    let g = fs.create(ROOT, "new");
    fs.write(g, 0, b"after the checkpoint");
    fs.mkdir(d, "sub");
    if data_changes {
        fs.write(f, 70_000, b"overwritten");
        fs.rename(d, b"f", ROOT, b"moved").expect("rename");
    }
    // A crash: nothing is saved on the way down.
    fs.svc.simulate_crash();
    let mut fs = Fs::open(dir);
    assert_eq!(fs.svc.checkpoints(), vec![(1, cp)]);
    assert_eq!(fs.digest(), cp);
    assert_eq!(fs.lookup(ROOT, "new"), Err(FsError::NoEnt));
    assert_eq!(fs.read(f, 69_999, 3), vec![3, 3, 3]);
    fs.create(ROOT, "new");
}

#[test]
fn unclean_shutdown_returns_to_the_checkpoint_tmpfs() {
    let Some(dir) = shm_dir() else {
        eprintln!("no /dev/shm: skipped");
        return;
    };
    crash_then_reopen(dir.path(), true);
}

#[test]
fn unclean_shutdown_after_a_flush_and_many_changes() {
    let (dir, mut fs) = fresh_fs();
    let d = fs.mkdir(ROOT, "d");
    let e = fs.mkdir(d, "e");
    let f = fs.create(e, "f");
    fs.write(f, 0, &vec![1; 300_000]);
    let g = fs.create(ROOT, "g");
    fs.write(g, 0, b"gg");
    fs.entry(FsOp::Link {
        h: g,
        dir: e,
        name: name("g2"),
    });
    fs.entry(FsOp::Symlink {
        dir: d,
        name: name("s"),
        target: b"e/f".to_vec(),
    });
    let cp = fs.svc.checkpoint(4).expect("checkpoint");
    let objs: Vec<_> = (0..fs.svc.object_count())
        .map(|i| fs.svc.get_obj(i).expect("get"))
        .collect();
    // Changes before a flush (saved in the table)...
    fs.write(f, 100_000, b"before the flush");
    fs.rename(ROOT, b"d", ROOT, b"d2").expect("rename");
    let h = fs.create(ROOT, "h");
    fs.write(h, 0, b"made after the checkpoint");
    fs.svc.flush().expect("flush");
    // ...and after it (only in the journal), then a crash.
    fs.write(f, 200_000, b"after the flush");
    fs.truncate(f, 5).expect("truncate");
    fs.rename(e, b"f", ROOT, b"f-moved").expect("move");
    fs.remove(ROOT, b"g").expect("remove");
    fs.remove(e, b"g2").expect("remove last link");
    let x = fs.mkdir(ROOT, "x");
    fs.rename(ROOT, b"d2", x, b"inside")
        .expect("move dir into a new dir");
    fs.create(ROOT, "reuses-a-slot");
    fs.svc.simulate_crash();
    let mut fs = Fs::open(dir.path());
    assert_eq!(fs.digest(), cp);
    let now: Vec<_> = (0..fs.svc.object_count())
        .map(|i| fs.svc.get_obj(i).expect("get"))
        .collect();
    assert_eq!(now, objs);
    assert_eq!(fs.names(ROOT), vec!["d", "g"]);
    assert!(dir.path().join("tree/root/d/e/g2").exists());
    assert_eq!(
        std::fs::read(dir.path().join("tree/root/d/e/f"))
            .expect("f")
            .len(),
        300_000
    );
    assert!(!dir.path().join("tree/root/x").exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tree/orphans"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    fs.create(ROOT, "h");
}

#[test]
fn unclean_shutdown_returns_to_the_checkpoint_btrfs() {
    let Some(m) = btrfs_mount() else { return };
    let dir = m.dir("crash");
    crash_then_reopen(&dir, true);
    let fs = Fs::open(&dir);
    assert!(fs.svc.uses_snapshots());
}

#[test]
fn checkpoint_rollback_and_transfer_on_btrfs() {
    let Some(m) = btrfs_mount() else { return };
    let a = m.dir("a");
    let mut fs = Fs::open(&a);
    assert!(fs.svc.uses_snapshots());
    let d = fs.mkdir(ROOT, "d");
    let f = fs.create(d, "f");
    fs.write(f, 0, &vec![9; 300_000]);
    let cp = fs.svc.checkpoint(7).expect("checkpoint");
    let before: Vec<_> = (0..fs.svc.object_count())
        .map(|i| fs.svc.get_obj(i).expect("get"))
        .collect();
    fs.write(f, 100_000, b"later");
    fs.truncate(f, 10).expect("truncate");
    fs.rename(d, b"f", ROOT, b"g").expect("mv");
    fs.rmdir(ROOT, b"d").expect("rmdir");
    for (i, o) in before.iter().enumerate() {
        assert_eq!(
            fs.svc.get_obj_at(7, i as u64).as_ref(),
            Some(o),
            "object {i} served from the snapshot"
        );
    }
    fs.svc.rollback_to(7).expect("rollback");
    assert_eq!(fs.digest(), cp);
    // Transfer into a fresh service on the same btrfs.
    let b = m.dir("b");
    let mut other = Fs::open(&b);
    let objs = (0..fs.svc.object_count())
        .map(|i| (i, fs.svc.get_obj(i).expect("get")))
        .collect();
    other.svc.put_objs(objs).expect("put");
    assert_eq!(other.digest(), cp);
    // Read last: an ordered read moves the agreed time, which is part of the state.
    assert_eq!(fs.read(f, 99_999, 3), vec![9, 9, 9]);
}

/// A call as the replica makes it: from a client, which may be squashed.
fn exec_from(fs: &mut Fs, client: u64, caller: Caller, op: FsOp) -> FsResult {
    fs.now += 1_000;
    let out = fs.svc.execute(
        &encode(&FsRequest { caller, op }),
        state_abstraction::ClientId(client),
        &encode(&fs.now),
        false,
    );
    decode(&out).expect("a reply")
}

fn create_op(n: &str) -> FsOp {
    FsOp::Create {
        dir: ROOT,
        name: name(n),
        mode: 0o644,
        how: CreateHow::Guarded,
    }
}

fn owner(r: FsResult) -> (u32, u32) {
    match r {
        Ok(FsReply::Entry { attr, .. }) => (attr.uid, attr.gid),
        other => panic!("create: {other:?}"),
    }
}

#[test]
fn squashed_clients_act_as_nobody() {
    use state_abstraction::ClientId;
    let (_dir, mut fs) = fresh_fs();
    fs.svc.set_squash(
        [
            (ClientId(7), Squash::Root),
            (ClientId(8), Squash::All),
            (ClientId(9), Squash::None),
        ]
        .into(),
    );
    let alice = Caller {
        uid: 1000,
        gid: 100,
        groups: vec![],
    };
    // The root directory is root's, 0755: an unsquashed root may create in it, a squashed
    // root may not (it is nobody).
    assert_eq!(
        owner(exec_from(&mut fs, 1, Caller::root(), create_op("trusted"))),
        (0, 0)
    );
    assert_eq!(
        owner(exec_from(&mut fs, 9, Caller::root(), create_op("also"))),
        (0, 0)
    );
    assert_eq!(
        exec_from(&mut fs, 7, Caller::root(), create_op("squashed")),
        Err(FsError::Access)
    );
    assert_eq!(
        exec_from(&mut fs, 8, Caller::root(), create_op("squashed")),
        Err(FsError::Access)
    );
    // Nor may a squashed root take over root's file.
    let trusted = fs.entry(FsOp::Lookup {
        dir: ROOT,
        name: name("trusted"),
    });
    assert_eq!(
        exec_from(
            &mut fs,
            7,
            Caller::root(),
            FsOp::SetAttr {
                h: trusted.0,
                set: SetAttrs {
                    mode: Some(0o666),
                    ..Default::default()
                }
            }
        ),
        Err(FsError::Perm)
    );
    // In an open directory: root_squash believes other users, all_squash does not.
    assert!(chmod(&mut fs, ROOT, 0o777).is_ok());
    assert_eq!(
        owner(exec_from(&mut fs, 7, Caller::root(), create_op("r7"))),
        (NOBODY, NOBODY)
    );
    assert_eq!(
        owner(exec_from(&mut fs, 7, alice.clone(), create_op("a7"))),
        (1000, 100)
    );
    assert_eq!(
        owner(exec_from(&mut fs, 8, alice, create_op("a8"))),
        (NOBODY, NOBODY)
    );
}
