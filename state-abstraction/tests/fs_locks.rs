//! Zzyzx locks in the replicated file state (M1): the lock table in the root, activation and
//! masking at checkpoints, the guarded ordered path, merge, and that ordered digests stay a
//! function of the ordered operations (two services, rollback, restart, state transfer).

mod common;

use common::temp_dir;
use state_abstraction::fs::locks::*;
use state_abstraction::fs::object::{Header, LiveHeader, ObjectHeader};
use state_abstraction::fs::*;
use state_abstraction::{AbstractObject, ClientId, Digest, Service};
use std::path::Path;

const ROOT: Handle = Handle::ROOT;
const HOLDER: ClientId = ClientId(1);
const OTHER: ClientId = ClientId(2);

/// A file service driven by several clients, each call one agreed time step later.
struct T {
    svc: FileService,
    now: u64,
}

impl T {
    fn open(dir: &Path) -> T {
        T {
            svc: FileService::open(dir).expect("open"),
            now: 1_700_000_000_000_000_000,
        }
    }

    fn run_as(&mut self, client: ClientId, op: FsOp) -> FsResult {
        self.now += 1_000;
        let req = FsRequest {
            caller: Caller::root(),
            op,
        };
        self.svc.apply_as(client, &req, self.now)
    }

    fn run(&mut self, op: FsOp) -> FsResult {
        self.run_as(OTHER, op)
    }

    fn read_only(&mut self, op: FsOp) -> FsResult {
        let req = FsRequest {
            caller: Caller::root(),
            op,
        };
        self.svc.apply_read_only(&req, self.now)
    }

    fn entry(&mut self, op: FsOp) -> Handle {
        match self.run(op.clone()) {
            Ok(FsReply::Entry { handle, .. }) => handle,
            other => panic!("{op:?} gave {other:?}"),
        }
    }

    fn mkdir(&mut self, dir: Handle, name: &str) -> Handle {
        self.entry(FsOp::Mkdir {
            dir,
            name: name.into(),
            mode: 0o755,
        })
    }

    fn create(&mut self, dir: Handle, name: &str, data: &[u8]) -> Handle {
        let h = self.entry(FsOp::Create {
            dir,
            name: name.into(),
            mode: 0o644,
            how: CreateHow::Guarded,
        });
        if !data.is_empty() {
            let r = self.run(FsOp::Write {
                h,
                offset: 0,
                data: data.to_vec(),
            });
            assert!(matches!(r, Ok(FsReply::Write { .. })), "{r:?}");
        }
        h
    }

    fn lock(&mut self, client: ClientId, h: Handle, unit: LockUnit) -> LockId {
        match self.run_as(client, FsOp::Lock { h, unit }) {
            Ok(FsReply::LockPending { lock }) => lock,
            other => panic!("lock {h:?}: {other:?}"),
        }
    }

    fn entry_of(&self, lock: LockId) -> Option<LockEntry> {
        self.svc.locks().entry(lock).cloned()
    }

    fn state(&self, lock: LockId) -> Option<LockState> {
        self.entry_of(lock).map(|e| e.state)
    }

    fn read(&mut self, h: Handle) -> FsResult {
        self.run(FsOp::Read {
            h,
            offset: 0,
            count: 1 << 20,
        })
    }

    fn checkpoint(&mut self, seq: u64) -> Digest {
        let d = self.svc.checkpoint(seq).expect("checkpoint");
        self.svc.check_lock_invariants();
        d
    }

    fn digest(&mut self) -> Digest {
        self.svc.root_digest().expect("digest")
    }

    /// Lets the agreed time pass a frozen lock's grace (an ordered request at a later
    /// time), so that the next checkpoint merges it.
    fn pass_grace(&mut self) {
        self.now += UNRESOLVED_MERGE_NS;
        self.run(FsOp::GetAttr { h: ROOT }).expect("getattr");
    }

    /// Stops the service (cleanly, or as a crash would) and opens its directory again.
    fn reopen(&mut self, crash: bool) {
        let dir = self.svc.data_dir().to_path_buf();
        let scratch = temp_dir();
        let stand_in = FileService::open(scratch.path()).expect("open a stand-in");
        let old = std::mem::replace(&mut self.svc, stand_in);
        if crash {
            old.simulate_crash();
        } else {
            drop(old);
        }
        self.svc = FileService::open(&dir).expect("reopen");
    }
}

fn all_objects(svc: &FileService) -> Vec<(u64, AbstractObject)> {
    (0..svc.object_count())
        .map(|i| (i, svc.get_obj(i).expect("get_obj")))
        .collect()
}

fn header(svc: &FileService, i: u64) -> ObjectHeader {
    ObjectHeader::decode_canonical(&svc.get_obj(i).expect("get_obj").pieces[0]).expect("header")
}

/// `/home/a/f` (data), `/home/a/g`, `/home/b/`, `/other` (data); returns (home, a, f, other).
fn populate(t: &mut T) -> (Handle, Handle, Handle, Handle) {
    let home = t.mkdir(ROOT, "home");
    let a = t.mkdir(home, "a");
    let f = t.create(a, "f", &[7u8; 100_000]);
    t.create(a, "g", b"g");
    t.mkdir(home, "b");
    let other = t.create(ROOT, "other", b"other");
    (home, a, f, other)
}

#[test]
fn a_lock_activates_at_the_next_checkpoint_and_masks_its_subtree() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, a, f, other) = populate(&mut t);
    // A hard link from outside keeps `g` out of the subtree's membership.
    let g = match t.run(FsOp::Lookup {
        dir: a,
        name: b"g".to_vec(),
    }) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        r => panic!("{r:?}"),
    };
    t.entry(FsOp::Link {
        h: g,
        dir: ROOT,
        name: b"g-outside".to_vec(),
    });
    assert!(matches!(header(&t.svc, 0), ObjectHeader::Live(_)));
    let df = t.run(FsOp::StatFs { h: ROOT });
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    assert!(
        matches!(header(&t.svc, 0), ObjectHeader::LiveRoot(..)),
        "the lock table lives in the root once a lock was asked for"
    );
    assert_eq!(t.state(lock), Some(LockState::Pending));
    assert!(t.svc.lock_transition_pending());
    assert!(Service::checkpoint_work_pending(&t.svc));
    // Pending masks nothing.
    assert!(t.read(f).is_ok());
    t.checkpoint(1);
    let e = t.entry_of(lock).expect("entry");
    assert_eq!(e.state, LockState::Active { activated_seq: 1 });
    // home, a, f, b (g has a name outside), and the pool.
    assert_eq!(e.members, 4 + POOL_INITIAL);
    assert_eq!(
        e.pool.iter().map(|r| r.1).sum::<u32>(),
        POOL_INITIAL,
        "{:?}",
        e.pool
    );
    assert_ne!(e.base, Digest::default());
    assert!(!t.svc.lock_transition_pending());
    assert_eq!(
        e.frozen_counts,
        (4, 100_000u64.div_ceil(4096)),
        "home, a, f, b"
    );
    assert_eq!(t.run(FsOp::StatFs { h: f }), df, "statfs counts as before");
    for h in [home, a, f] {
        assert_eq!(t.svc.masked_by(h.index), Some(lock));
        assert_eq!(
            t.svc.get_obj(h.index).expect("obj").pieces,
            vec![ObjectHeader::Locked { lock }.encode()],
            "the ordered state holds a placeholder"
        );
    }
    assert_eq!(t.svc.masked_by(g.index), None);
    assert_eq!(t.svc.masked_by(other.index), None);
    // Objects outside stay usable, the hard-linked file included.
    assert!(t.read(other).is_ok());
    assert!(t.read(g).is_ok());
    assert_eq!(t.state(lock), Some(LockState::Active { activated_seq: 1 }));
    // New objects never come from the pool.
    let n = t.create(ROOT, "new", b"");
    assert!(!e
        .pool
        .iter()
        .any(|&(s, l)| (s..s + l as u64).contains(&n.index)));
}

#[test]
fn an_ordered_access_by_another_client_freezes_and_the_merge_gives_the_objects_back() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, a, f, _) = populate(&mut t);
    let before = t.read(f);
    let attr_before = t.run(FsOp::GetAttr { h: f });
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    t.checkpoint(1);
    // The read-only path refuses without freezing (it is unordered).
    assert_eq!(t.read_only(FsOp::GetAttr { h: f }), Err(FsError::Locked));
    assert_eq!(t.state(lock), Some(LockState::Active { activated_seq: 1 }));
    // The ordered path refuses and freezes.
    let d = t.digest();
    assert_eq!(t.read(f), Err(FsError::Locked));
    match t.state(lock) {
        Some(LockState::Frozen {
            cause: FreezeCause::Conflict(c),
            ..
        }) => assert_eq!(c, OTHER),
        other => panic!("{other:?}"),
    }
    assert_ne!(t.digest(), d, "the freeze is ordered state");
    // Still masked until the merge; more conflicts change nothing more. The root of a
    // frozen lock is not answered with its attributes at activation any more (its holder
    // may have changed them): it waits for the merge too.
    assert_eq!(
        t.run(FsOp::Lookup {
            dir: ROOT,
            name: b"home".to_vec()
        }),
        Err(FsError::Locked)
    );
    assert_eq!(
        t.run(FsOp::Lookup {
            dir: home,
            name: b"a".to_vec()
        }),
        Err(FsError::Locked)
    );
    assert_eq!(
        t.run(FsOp::Remove {
            dir: a,
            name: b"f".to_vec()
        }),
        Err(FsError::Locked)
    );
    // Frozen without a certified end: merged only after the grace.
    t.checkpoint(2);
    assert!(matches!(t.state(lock), Some(LockState::Frozen { .. })));
    t.pass_grace();
    t.checkpoint(3);
    assert_eq!(t.svc.locks().locks, Vec::new(), "merged and deleted");
    assert_eq!(t.svc.masked_by(f.index), None);
    // The same requests now succeed, on unchanged content.
    assert_eq!(t.read(f), before);
    let mut attr_after = t.run(FsOp::GetAttr { h: f });
    if let (Ok(FsReply::Attr(a)), Ok(FsReply::Attr(b))) = (&attr_before, &mut attr_after) {
        b.atime = a.atime;
    }
    assert_eq!(attr_after, attr_before);
    assert!(t
        .run(FsOp::Lookup {
            dir: ROOT,
            name: b"home".to_vec()
        })
        .is_ok());
    // The revoked root may not be locked again by its holder at once.
    assert_eq!(
        t.run_as(
            HOLDER,
            FsOp::Lock {
                h: home,
                unit: LockUnit::Subtree
            }
        ),
        Ok(FsReply::LockRefused {
            why: LockRefusal::Recent
        })
    );
    // Pool slots are free again: a create takes the lowest free slot, which may be one.
    let free_before = t.svc.object_count();
    t.create(ROOT, "after", b"x");
    assert_eq!(t.svc.object_count(), free_before, "a free slot was reused");
}

/// Every operation on a masked object is refused with no effect on the objects.
#[test]
fn every_operation_on_a_masked_object_is_refused_without_effect() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, a, f, other) = populate(&mut t);
    let sub = t.mkdir(home, "sub");
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    t.checkpoint(1);
    let objects: Vec<_> = all_objects(&t.svc).into_iter().skip(1).collect();
    let n = |s: &str| s.as_bytes().to_vec();
    let ops = vec![
        FsOp::GetAttr { h: f },
        FsOp::SetAttr {
            h: f,
            set: SetAttrs {
                mode: Some(0o600),
                ..Default::default()
            },
        },
        FsOp::Lookup {
            dir: a,
            name: n("f"),
        },
        FsOp::Access { h: f, mask: 7 },
        FsOp::ReadLink { h: f },
        FsOp::Read {
            h: f,
            offset: 0,
            count: 10,
        },
        FsOp::Write {
            h: f,
            offset: 0,
            data: vec![1],
        },
        FsOp::Create {
            dir: a,
            name: n("x"),
            mode: 0o644,
            how: CreateHow::Guarded,
        },
        FsOp::Mkdir {
            dir: a,
            name: n("x"),
            mode: 0o755,
        },
        FsOp::Symlink {
            dir: a,
            name: n("x"),
            target: n("y"),
        },
        FsOp::Mknod {
            dir: a,
            name: n("x"),
            mode: 0o644,
            kind: NodeKind::Fifo,
        },
        FsOp::Remove {
            dir: a,
            name: n("f"),
        },
        FsOp::Remove {
            dir: ROOT,
            name: n("home"),
        },
        FsOp::Rmdir {
            dir: ROOT,
            name: n("home"),
        },
        FsOp::Rmdir {
            dir: home,
            name: n("sub"),
        },
        // Across the boundary, both ways, and a directory moved into the lock.
        FsOp::Rename {
            from_dir: ROOT,
            from_name: n("other"),
            to_dir: a,
            to_name: n("o"),
            no_replace: false,
        },
        FsOp::Rename {
            from_dir: a,
            from_name: n("f"),
            to_dir: ROOT,
            to_name: n("f"),
            no_replace: false,
        },
        FsOp::Rename {
            from_dir: ROOT,
            from_name: n("home"),
            to_dir: ROOT,
            to_name: n("home2"),
            no_replace: false,
        },
        FsOp::Rename {
            from_dir: ROOT,
            from_name: n("other"),
            to_dir: ROOT,
            to_name: n("home"),
            no_replace: false,
        },
        FsOp::Link {
            h: f,
            dir: ROOT,
            name: n("l"),
        },
        FsOp::Link {
            h: other,
            dir: a,
            name: n("l"),
        },
        FsOp::ReadDir {
            dir: a,
            cookie: 0,
            count: 100,
            plus: true,
        },
        FsOp::Commit { h: f },
        FsOp::GetXattr {
            h: f,
            name: n("user.a"),
        },
        FsOp::SetXattr {
            h: f,
            name: n("user.a"),
            value: n("v"),
            how: XattrSet::Either,
        },
        FsOp::ListXattr { h: f },
        FsOp::RemoveXattr {
            h: f,
            name: n("user.a"),
        },
        FsOp::Fallocate {
            h: f,
            offset: 0,
            length: 10,
            mode: AllocMode::Allocate { keep_size: false },
        },
        FsOp::CopyRange {
            src: other,
            src_offset: 0,
            dst: f,
            dst_offset: 0,
            length: 5,
        },
        FsOp::CopyRange {
            src: f,
            src_offset: 0,
            dst: other,
            dst_offset: 0,
            length: 5,
        },
        FsOp::Lock {
            h: sub,
            unit: LockUnit::Directory,
        },
    ];
    for op in ops {
        assert_eq!(t.run(op.clone()), Err(FsError::Locked), "{op:?}");
        if op.is_read_only() {
            assert_eq!(t.read_only(op.clone()), Err(FsError::Locked), "{op:?}");
        }
    }
    assert_eq!(
        all_objects(&t.svc).into_iter().skip(1).collect::<Vec<_>>(),
        objects,
        "refused operations changed objects"
    );
    assert!(matches!(t.state(lock), Some(LockState::Frozen { .. })));
    // statfs never revokes, and counts masked objects as at activation. (Another holder:
    // the first was revoked a moment ago.)
    t.pass_grace();
    t.checkpoint(2);
    let df = t.run(FsOp::StatFs { h: ROOT });
    let lock = t.lock(ClientId(3), home, LockUnit::Directory);
    t.checkpoint(3);
    assert_eq!(t.run(FsOp::StatFs { h: home }), df);
    assert!(matches!(t.state(lock), Some(LockState::Active { .. })));
    // A directory lock masks the directory, not its children.
    assert_eq!(t.svc.masked_by(a.index), None);
    assert!(t.read(f).is_ok());
    // The lock root seen from outside answers its attributes as they were at activation,
    // without revoking (plan §2.4); looking inside revokes.
    let Ok(FsReply::Attr(frozen)) = t.run(FsOp::GetAttr { h: home }) else {
        panic!("getattr of the lock root");
    };
    assert_eq!(frozen.fileid, home.index);
    assert!(matches!(t.state(lock), Some(LockState::Active { .. })));
    assert_eq!(
        t.run(FsOp::ReadDir {
            dir: home,
            cookie: 0,
            count: 10,
            plus: false
        }),
        Err(FsError::Locked)
    );
    assert!(matches!(t.state(lock), Some(LockState::Frozen { .. })));
}

#[test]
fn grant_checks_and_the_holder_operations() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, a, f, other) = populate(&mut t);
    let refused = |why| Ok(FsReply::LockRefused { why });
    let lock_op = |h, unit| FsOp::Lock { h, unit };
    assert_eq!(
        t.run_as(HOLDER, lock_op(ROOT, LockUnit::Subtree)),
        refused(LockRefusal::Root)
    );
    assert_eq!(
        t.run_as(HOLDER, lock_op(f, LockUnit::Subtree)),
        Err(FsError::NotDir)
    );
    assert_eq!(
        t.run_as(HOLDER, lock_op(a, LockUnit::File)),
        Err(FsError::Inval)
    );
    // Permission: W and X on the directory.
    let req = FsRequest {
        caller: Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        },
        op: lock_op(home, LockUnit::Subtree),
    };
    t.now += 1000;
    assert_eq!(t.svc.apply_as(HOLDER, &req, t.now), Err(FsError::Access));
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    assert_eq!(
        t.run_as(HOLDER, lock_op(home, LockUnit::Subtree)),
        refused(LockRefusal::AlreadyCovered)
    );
    // The holder only.
    assert_eq!(
        t.run_as(OTHER, FsOp::Release { lock, cert: None }),
        Err(FsError::Perm)
    );
    assert_eq!(t.run_as(OTHER, FsOp::Renew { lock }), Err(FsError::Perm));
    assert_eq!(
        t.run_as(
            HOLDER,
            FsOp::Release {
                lock,
                cert: Some(vec![1])
            }
        ),
        Err(FsError::Inval),
        "no certificate checker: a certificate cannot be accepted"
    );
    assert_eq!(
        t.run_as(HOLDER, FsOp::Renew { lock: LockId(99) }),
        Err(FsError::Inval)
    );
    t.checkpoint(1);
    let e = t.entry_of(lock).expect("entry");
    t.now += 5 * 60 * 1_000_000_000;
    assert_eq!(t.run_as(HOLDER, FsOp::Renew { lock }), Ok(FsReply::Done));
    let renewed = t.entry_of(lock).expect("entry").expires_ns;
    assert!(renewed > e.expires_ns);
    assert!(renewed <= e.requested_ns + LOCK_LIFETIME_MAX_NS);
    // The holder's own lock, asked again on a member: refused, not frozen.
    assert_eq!(
        t.run_as(HOLDER, lock_op(a, LockUnit::Subtree)),
        refused(LockRefusal::AlreadyCovered)
    );
    assert_eq!(t.state(lock), Some(LockState::Active { activated_seq: 1 }));
    // ListLocks on either path, without pools.
    let listed = t.read_only(FsOp::ListLocks);
    match &listed {
        Ok(FsReply::Locks { next_lock, locks }) => {
            assert_eq!(*next_lock, lock.0 + 1);
            assert_eq!(locks.len(), 1);
            assert!(locks[0].pool.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.run(FsOp::ListLocks), listed);
    // Release: frozen, merged at the next checkpoint.
    assert_eq!(
        t.run_as(HOLDER, FsOp::Release { lock, cert: None }),
        Ok(FsReply::Done)
    );
    assert!(matches!(
        t.state(lock),
        Some(LockState::Frozen {
            cause: FreezeCause::Release,
            end: None,
            ..
        })
    ));
    t.pass_grace();
    t.checkpoint(2);
    assert_eq!(t.state(lock), None);
    assert!(t.read(f).is_ok());
    // Released (not revoked): the holder may lock again at once. A client holds at most
    // LOCKS_PER_CLIENT_MAX.
    let mut dirs = vec![home];
    for k in 0..LOCKS_PER_CLIENT_MAX - 1 {
        dirs.push(t.mkdir(ROOT, &format!("d{k}")));
    }
    for d in &dirs {
        t.lock(HOLDER, *d, LockUnit::Directory);
    }
    let extra = t.mkdir(ROOT, "extra");
    assert_eq!(
        t.run_as(HOLDER, lock_op(extra, LockUnit::Directory)),
        refused(LockRefusal::TooMany)
    );
    // A pending lock the holder releases is simply dropped.
    let l2 = t.lock(OTHER, other, LockUnit::File);
    assert_eq!(
        t.run_as(
            OTHER,
            FsOp::Release {
                lock: l2,
                cert: None
            }
        ),
        Ok(FsReply::Done)
    );
    assert_eq!(t.state(l2), None);
}

#[test]
fn overlapping_locks_revoke_the_older_one_and_wait() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, a, f, _) = populate(&mut t);
    let first = t.lock(HOLDER, a, LockUnit::Subtree);
    t.checkpoint(1);
    // Another client's lock around the first: the first is revoked, the second waits.
    let second = t.lock(OTHER, home, LockUnit::Subtree);
    t.checkpoint(2);
    assert!(matches!(
        t.state(first),
        Some(LockState::Frozen {
            cause: FreezeCause::Conflict(OTHER),
            ..
        })
    ));
    assert_eq!(t.state(second), Some(LockState::Pending));
    // The merge comes first at a checkpoint, so the waiting lock activates in the same one.
    t.pass_grace();
    t.checkpoint(3);
    assert_eq!(t.state(first), None, "merged");
    assert_eq!(
        t.state(second),
        Some(LockState::Active { activated_seq: 3 })
    );
    assert_eq!(t.svc.masked_by(f.index), Some(second));
    // A lock around one the same client holds is refused at activation.
    let solo = t.mkdir(ROOT, "solo");
    let inner = t.mkdir(solo, "in");
    let l_in = t.lock(HOLDER, inner, LockUnit::Subtree);
    t.checkpoint(4);
    let l_out = t.lock(HOLDER, solo, LockUnit::Subtree);
    t.checkpoint(5);
    assert_eq!(t.state(l_out), None);
    assert_eq!(t.state(l_in), Some(LockState::Active { activated_seq: 4 }));
    // Two clients asking in the same interval: the first activates and keeps its first
    // interval; the second revokes it at the next checkpoint.
    let p = t.mkdir(ROOT, "p");
    let q = t.mkdir(p, "q");
    let lp = t.lock(ClientId(5), p, LockUnit::Subtree);
    let lq = t.lock(ClientId(6), q, LockUnit::Subtree);
    t.checkpoint(6);
    assert_eq!(t.state(lp), Some(LockState::Active { activated_seq: 6 }));
    assert_eq!(t.state(lq), Some(LockState::Pending));
    t.checkpoint(7);
    assert!(matches!(
        t.state(lp),
        Some(LockState::Frozen {
            cause: FreezeCause::Conflict(ClientId(6)),
            ..
        })
    ));
    t.pass_grace();
    t.checkpoint(8);
    assert_eq!(t.state(lp), None);
    assert_eq!(t.state(lq), Some(LockState::Active { activated_seq: 8 }));
    assert!(t
        .svc
        .locks()
        .recent
        .iter()
        .any(|r| r.0 == p.index && r.1 == ClientId(5)));
}

#[test]
fn locks_expire_and_merge() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, _, f, _) = populate(&mut t);
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    t.checkpoint(1);
    t.now += LOCK_RENEW_NS + 1;
    t.run(FsOp::GetAttr { h: ROOT }).expect("getattr");
    t.checkpoint(2);
    assert!(matches!(
        t.state(lock),
        Some(LockState::Frozen {
            cause: FreezeCause::Expired,
            ..
        })
    ));
    t.pass_grace();
    t.checkpoint(3);
    assert_eq!(t.state(lock), None);
    assert!(t.read(f).is_ok());
}

/// One deterministic workload with locks: what every replica executes.
fn workload(t: &mut T, seq0: u64, digests: &mut Vec<Digest>) {
    let (home, a, f, other) = populate(t);
    digests.push(t.checkpoint(seq0));
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    let l2 = t.lock(OTHER, other, LockUnit::File);
    t.create(ROOT, "x", b"x");
    digests.push(t.checkpoint(seq0 + 1));
    assert_eq!(t.read(f), Err(FsError::Locked));
    t.create(ROOT, "y", b"y");
    let _ = t.run_as(OTHER, FsOp::Renew { lock: l2 });
    digests.push(t.checkpoint(seq0 + 2));
    let parent = a_or_root(t, a);
    t.mkdir(parent, "later");
    let _ = t.run_as(
        OTHER,
        FsOp::Release {
            lock: l2,
            cert: None,
        },
    );
    digests.push(t.checkpoint(seq0 + 3));
    let _ = lock;
}

fn a_or_root(t: &T, a: Handle) -> Handle {
    if t.svc.masked_by(a.index).is_some() {
        ROOT
    } else {
        a
    }
}

#[test]
fn two_services_give_identical_digests() {
    let da = temp_dir();
    let db = common::shm_dir().unwrap_or_else(temp_dir);
    let mut a = T::open(da.path());
    let mut b = T::open(db.path());
    let (mut x, mut y) = (Vec::new(), Vec::new());
    workload(&mut a, 10, &mut x);
    workload(&mut b, 10, &mut y);
    assert_eq!(x, y);
    assert_eq!(all_objects(&a.svc), all_objects(&b.svc));
    assert_eq!(a.svc.checkpoints(), b.svc.checkpoints());
}

#[test]
fn rollback_to_before_activation_and_across_a_merge() {
    let dir = temp_dir();
    rollback_on(dir.path());
}

/// On btrfs, checkpoints are snapshots and old data is read from them.
#[test]
fn rollback_and_restart_on_btrfs() {
    let Some(m) = common::btrfs_mount() else {
        return;
    };
    rollback_on(&m.dir("rollback"));
    restart_on(&m.dir("restart"));
    serve_through_a_masked_directory_on(&m.dir("serve"));
}

#[test]
fn serving_a_file_below_a_masked_directory() {
    let dir = temp_dir();
    serve_through_a_masked_directory_on(dir.path());
}

/// A directory lock masks the directory, not its files: a checkpoint's file below it is
/// still served (on btrfs its data is found in the snapshot by real names).
fn serve_through_a_masked_directory_on(dir: &Path) {
    let mut t = T::open(dir);
    let (home, a, f, _) = populate(&mut t);
    let lock = t.lock(HOLDER, a, LockUnit::Directory);
    t.checkpoint(1);
    assert_eq!(t.svc.masked_by(a.index), Some(lock));
    assert_eq!(t.svc.masked_by(f.index), None);
    let want = t.svc.get_obj(f.index).expect("f");
    t.run(FsOp::Write {
        h: f,
        offset: 0,
        data: vec![1; 1000],
    })
    .expect("write below a locked directory");
    assert_eq!(t.svc.get_obj_at(1, f.index), Some(want));
    let _ = home;
}

fn rollback_on(dir: &Path) {
    let mut t = T::open(dir);
    let (home, _, f, _) = populate(&mut t);
    let d1 = t.checkpoint(1);
    let objs1 = all_objects(&t.svc);
    let t1 = t.now;
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    let d2 = t.checkpoint(2);
    let objs2 = all_objects(&t.svc);
    let t2 = t.now;
    assert_eq!(t.read(f), Err(FsError::Locked));
    t.create(ROOT, "z", b"z");
    t.pass_grace();
    let d3 = t.checkpoint(3); // merged
    assert_eq!(t.svc.masked_by(f.index), None);
    t.create(ROOT, "w", b"w");
    // Changed after the merge: the rollback must bring back the content as it was locked
    // (the merge's base check below would refuse anything else).
    t.run(FsOp::Write {
        h: f,
        offset: 5,
        data: vec![9; 70_000],
    })
    .expect("write");

    // Back across the merge: masked again, the same ordered objects.
    t.svc.rollback_to(2).expect("rollback to 2");
    t.svc.check_lock_invariants();
    assert_eq!(t.digest(), d2);
    assert_eq!(all_objects(&t.svc), objs2);
    assert_eq!(t.svc.masked_by(f.index), Some(lock));
    // Re-executing the same batches gives the same checkpoint.
    t.now = t2;
    assert_eq!(t.read(f), Err(FsError::Locked));
    t.create(ROOT, "z", b"z");
    t.pass_grace();
    assert_eq!(t.checkpoint(3), d3);
    assert_eq!(t.read(f).map(|_| ()), Ok(()));

    // Back to before the activation (and the request): no lock, nothing masked.
    t.svc.rollback_to(1).expect("rollback to 1");
    t.svc.check_lock_invariants();
    assert_eq!(t.digest(), d1);
    assert_eq!(all_objects(&t.svc), objs1);
    assert_eq!(t.svc.masked_by(f.index), None);
    assert_eq!(t.svc.locks(), LockTable::default());
    t.now = t1;
    assert_eq!(t.lock(HOLDER, home, LockUnit::Subtree), lock);
    assert_eq!(t.checkpoint(2), d2);
}

#[test]
fn masks_survive_a_restart_and_a_crash() {
    let dir = temp_dir();
    restart_on(dir.path());
}

fn restart_on(dir: &Path) {
    let (d2, lock, f, now) = {
        let mut t = T::open(dir);
        let (home, _, f, _) = populate(&mut t);
        t.checkpoint(1);
        let lock = t.lock(HOLDER, home, LockUnit::Subtree);
        let d2 = t.checkpoint(2);
        assert_eq!(
            std::fs::read(dir.join("table")).expect("table")[0],
            5,
            "masked slots and lock records need table version 5"
        );
        (d2, lock, f, t.now)
    };
    let mut t = T::open(dir);
    t.now = now;
    t.svc.check_lock_invariants();
    assert_eq!(t.digest(), d2);
    assert_eq!(t.svc.masked_by(f.index), Some(lock));
    // A crash after more ordered work (a freeze included) comes back to checkpoint 2.
    t.create(ROOT, "late", b"late");
    assert_eq!(t.read(f), Err(FsError::Locked));
    t.svc.simulate_crash();
    let mut t = T::open(dir);
    t.now = now;
    t.svc.check_lock_invariants();
    assert_eq!(t.digest(), d2);
    assert_eq!(t.state(lock), Some(LockState::Active { activated_seq: 2 }));
    // Merge, and the table goes back to version 3 (nothing masked), readable as before.
    t.run_as(HOLDER, FsOp::Release { lock, cert: None })
        .expect("release");
    t.pass_grace();
    t.checkpoint(3);
    assert_eq!(std::fs::read(dir.join("table")).expect("table")[0], 3);
    drop(t);
    let mut t = T::open(dir);
    assert!(t.read(f).is_ok());
}

#[test]
fn state_transfer_of_a_state_with_locks() {
    let da = temp_dir();
    let db = temp_dir();
    let dc = temp_dir();
    let mut a = T::open(da.path());
    let mut b = T::open(db.path());
    let (home, _, f, _) = populate(&mut a);
    populate(&mut b);
    b.checkpoint(1);
    a.checkpoint(1);
    let lock = a.lock(HOLDER, home, LockUnit::Subtree);
    a.create(ROOT, "x", b"x");
    let d2 = a.checkpoint(2);
    // A replica that lagged (it has the content from before the lock) fetches the state.
    b.svc.put_objs(all_objects(&a.svc)).expect("put_objs");
    b.svc.set_object_count(a.svc.object_count()).expect("count");
    b.svc.check_lock_invariants();
    assert_eq!(b.digest(), d2);
    assert_eq!(b.svc.masked_by(f.index), Some(lock));
    b.now = a.now;
    // Both go on identically, through the merge.
    for t in [&mut a, &mut b] {
        assert_eq!(t.read(f), Err(FsError::Locked));
        t.pass_grace();
        t.checkpoint(3);
        assert!(t.read(f).is_ok());
    }
    assert_eq!(a.digest(), b.digest());
    assert_eq!(all_objects(&a.svc), all_objects(&b.svc));
    // A replica with nothing gets the same ordered state (the locked content itself comes
    // by lock state transfer, M2).
    let lock2 = a.lock(ClientId(3), home, LockUnit::Subtree);
    let d4 = a.checkpoint(4);
    let mut c = T::open(dc.path());
    c.svc.put_objs(all_objects(&a.svc)).expect("put_objs");
    c.svc.set_object_count(a.svc.object_count()).expect("count");
    assert_eq!(c.digest(), d4);
    assert_eq!(c.svc.masked_by(home.index), Some(lock2));
    // The rest of its state is usable, and stays in step. (Not so under a directory lock:
    // the directory's files are ordered objects named only inside it, and stay unplaced
    // until lock state transfer brings the directory, M2.)
    c.now = a.now;
    for t in [&mut a, &mut c] {
        t.create(ROOT, "after-transfer", b"data");
        assert_eq!(t.read(f), Err(FsError::Locked));
    }
    assert_eq!(c.digest(), a.digest());
    // Content it does not have merges all the same (frozen by the reads above, after the
    // grace): its digest differs from the others', its requests answer `Io` rather than
    // act on objects it lacks, and a state transfer of the merged state repairs it.
    for t in [&mut a, &mut c] {
        assert_eq!(
            t.svc.lock_state_digest(lock2).is_some(),
            t.svc.data_dir() == da.path()
        );
        t.pass_grace();
    }
    let d5 = a.checkpoint(5);
    assert_ne!(c.svc.checkpoint(5).expect("the merge is not refused"), d5);
    assert_eq!(c.svc.locks().entry(lock2), None, "merged");
    assert_eq!(c.run(FsOp::GetAttr { h: ROOT }), Err(FsError::Io));
    c.svc.put_objs(all_objects(&a.svc)).expect("put_objs");
    assert_eq!(c.digest(), d5);
    assert!(all_objects(&a.svc) == all_objects(&c.svc));
    assert!(c.read(f).is_ok());
}

#[test]
fn malformed_lock_tables_and_placeholders_are_refused() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, a, _, other) = populate(&mut t);
    t.lock(HOLDER, home, LockUnit::Subtree);
    t.lock(OTHER, other, LockUnit::File);
    t.checkpoint(1);
    let root = t.svc.get_obj(0).expect("root");
    let ObjectHeader::LiveRoot(live, table) = header(&t.svc, 0) else {
        panic!("root without a lock table")
    };
    table
        .check()
        .expect("a table made by the service is well formed");
    // The pre-lock view still reads the root (the simulator relies on it).
    assert!(matches!(
        Header::decode_canonical(&root.pieces[0]),
        Ok(Header::Live(_))
    ));
    let with = |f: &dyn Fn(&mut LockTable)| {
        let mut tb = table.clone();
        f(&mut tb);
        ObjectHeader::LiveRoot(live.clone(), tb).encode()
    };
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("ids out of order", with(&|tb| tb.locks.reverse())),
        ("id not handed out", with(&|tb| tb.next_lock = 1)),
        ("lock on the root", with(&|tb| tb.locks[0].root.index = 0)),
        (
            "too many locks",
            with(&|tb| {
                let e = tb.locks[0].clone();
                tb.locks = (0..LOCKS_MAX as u64 + 1)
                    .map(|k| LockEntry {
                        id: LockId(k),
                        holder: ClientId(k),
                        ..e.clone()
                    })
                    .collect();
                tb.next_lock = LOCKS_MAX as u64 + 1;
            }),
        ),
        (
            "too many per client",
            with(&|tb| {
                let e = tb.locks[1].clone();
                tb.locks = (0..LOCKS_PER_CLIENT_MAX as u64 + 1)
                    .map(|k| LockEntry {
                        id: LockId(k),
                        ..e.clone()
                    })
                    .collect();
                tb.next_lock = 100;
            }),
        ),
        (
            "overlapping pool",
            with(&|tb| {
                let r = tb.locks[0].pool[0];
                tb.locks[0].pool.push(r);
            }),
        ),
        ("empty pool range", with(&|tb| tb.locks[0].pool[0].1 = 0)),
        (
            "pool overflow",
            with(&|tb| tb.locks[0].pool[0] = (u64::MAX, 2)),
        ),
        (
            "more pool than members",
            with(&|tb| tb.locks[0].members = 3),
        ),
        (
            "too many members",
            with(&|tb| tb.locks[0].members = LOCK_OBJECTS_MAX as u32 + 1),
        ),
        (
            "pending with members",
            with(&|tb| tb.locks[0].state = LockState::Pending),
        ),
        (
            "pool on a file lock",
            with(&|tb| tb.locks[1].pool = vec![(5, 1)]),
        ),
        (
            "expires before asked",
            with(&|tb| tb.locks[0].expires_ns = tb.locks[0].requested_ns - 1),
        ),
        (
            "recent unsorted",
            with(&|tb| tb.recent = vec![(5, ClientId(1), 1), (4, ClientId(1), 1)]),
        ),
        (
            "banned duplicate",
            with(&|tb| tb.banned = vec![(ClientId(1), 1), (ClientId(1), 2)]),
        ),
        (
            "on a non-directory",
            ObjectHeader::LiveRoot(as_file(&live), table.clone()).encode(),
        ),
    ];
    let d = t.digest();
    for (why, bytes) in bad {
        assert!(
            ObjectHeader::decode_canonical(&bytes).is_err(),
            "accepted: {why}"
        );
        let obj = AbstractObject {
            pieces: vec![bytes],
        };
        assert!(t.svc.put_objs(vec![(0, obj)]).is_err(), "installed: {why}");
    }
    // Truncated and trailing bytes.
    let good = root.pieces[0].clone();
    assert!(ObjectHeader::decode_canonical(&good[..good.len() - 1]).is_err());
    let mut longer = good.clone();
    longer.push(0);
    assert!(ObjectHeader::decode_canonical(&longer).is_err());
    // A lock table outside the root; the root as a placeholder; data on a placeholder.
    let placeholder = ObjectHeader::Locked { lock: LockId(0) }.encode();
    let cases = vec![
        (a.index, root.pieces.clone()),
        (0, vec![placeholder.clone()]),
        (a.index, vec![placeholder, vec![1, 2, 3]]),
    ];
    for (i, pieces) in cases {
        assert!(
            t.svc
                .put_objs(vec![(i, AbstractObject { pieces })])
                .is_err(),
            "installed at {i}"
        );
    }
    assert_eq!(t.digest(), d, "a refused put_objs changes nothing");
}

/// A directory's live header turned into a regular file's (for the malformed-table case).
fn as_file(l: &LiveHeader) -> LiveHeader {
    LiveHeader {
        kind: FileType::Regular,
        entries: Vec::new(),
        size: 0,
        ..l.clone()
    }
}

#[test]
fn a_state_that_never_locked_keeps_its_digests() {
    // Same operations, with and without a ListLocks (read-only, and ordered): the root stays
    // `Live` and the digest is the same.
    let da = temp_dir();
    let db = temp_dir();
    let mut a = T::open(da.path());
    let mut b = T::open(db.path());
    populate(&mut a);
    populate(&mut b);
    assert!(b.read_only(FsOp::ListLocks).is_ok());
    assert!(a.run(FsOp::GetAttr { h: ROOT }).is_ok());
    assert!(matches!(b.run(FsOp::ListLocks), Ok(FsReply::Locks { .. })));
    assert_eq!(a.checkpoint(1), b.checkpoint(1));
    assert!(matches!(header(&b.svc, 0), ObjectHeader::Live(_)));
}

mod sequences {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Lock(u8, bool, u8),
        Release(u8, u8),
        Touch(u8, u8),
        /// The agreed time moves past a frozen lock's grace.
        Wait,
        Checkpoint,
        /// Speculation undone: back to the newest checkpoint and the same requests again
        /// (on one of the two services only).
        Rollback,
        /// A restart (or crash) and the requests since the newest checkpoint again, as the
        /// replica replays its log (one service only).
        Reopen(bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..4u8, any::<bool>(), 1..3u8).prop_map(|(d, s, c)| Step::Lock(d, s, c)),
            (0..4u8, 1..3u8).prop_map(|(l, c)| Step::Release(l, c)),
            (0..6u8, 1..3u8).prop_map(|(o, c)| Step::Touch(o, c)),
            Just(Step::Wait),
            Just(Step::Checkpoint),
            Just(Step::Rollback),
            any::<bool>().prop_map(Step::Reopen),
        ]
    }

    /// One request of a step (no checkpoint, no rollback).
    fn request(t: &mut T, s: &Step, dirs: &[Handle], files: &[Handle]) {
        let _ = match *s {
            Step::Lock(d, subtree, c) => {
                let unit = if subtree {
                    LockUnit::Subtree
                } else {
                    LockUnit::Directory
                };
                t.run_as(
                    ClientId(c as u64),
                    FsOp::Lock {
                        h: dirs[d as usize],
                        unit,
                    },
                )
            }
            Step::Release(l, c) => t.run_as(
                ClientId(c as u64),
                FsOp::Release {
                    lock: LockId(l as u64),
                    cert: None,
                },
            ),
            Step::Touch(o, c) => t.run_as(
                ClientId(c as u64),
                FsOp::Write {
                    h: files[o as usize],
                    offset: 0,
                    data: vec![o; 3],
                },
            ),
            Step::Wait => {
                t.now += UNRESOLVED_MERGE_NS;
                t.run(FsOp::GetAttr { h: ROOT })
            }
            Step::Checkpoint | Step::Rollback | Step::Reopen(_) => {
                unreachable!("not a request")
            }
        };
    }

    fn run(t: &mut T, steps: &[Step], roll_back: bool) -> Vec<Digest> {
        let d0 = t.mkdir(ROOT, "d0");
        let d1 = t.mkdir(d0, "d1");
        let d2 = t.mkdir(ROOT, "d2");
        let d3 = t.mkdir(d2, "d3");
        let dirs = [d0, d1, d2, d3];
        let files = [
            t.create(d0, "f0", b"0"),
            t.create(d1, "f1", b"1"),
            t.create(d2, "f2", b"2"),
            t.create(d3, "f3", b"3"),
            t.create(ROOT, "f4", b"4"),
            t.create(d1, "f5", b"5"),
        ];
        let mut seq = 0;
        let mut digests = Vec::new();
        let mut since: Vec<Step> = Vec::new();
        let mut now_at_checkpoint = t.now;
        for s in steps {
            match s {
                Step::Checkpoint => {
                    seq += 1;
                    digests.push(t.checkpoint(seq));
                    since.clear();
                    now_at_checkpoint = t.now;
                }
                Step::Rollback | Step::Reopen(_) => {
                    if roll_back && seq > 0 {
                        match s {
                            Step::Reopen(crash) => t.reopen(*crash),
                            _ => t.svc.rollback_to(seq).expect("rollback"),
                        }
                        t.svc.check_lock_invariants();
                        t.now = now_at_checkpoint;
                        for r in &since {
                            request(t, r, &dirs, &files);
                        }
                    }
                }
                r => {
                    request(t, r, &dirs, &files);
                    since.push(r.clone());
                }
            }
        }
        seq += 1;
        digests.push(t.checkpoint(seq));
        digests
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of lock requests, releases, conflicting writes and checkpoints gives
        /// the same digests on two services, one of which also rolls back to its newest
        /// checkpoint, or restarts or crashes, and re-executes now and then; `masked` stays
        /// consistent with the table (checked at every checkpoint, rollback and restart).
        #[test]
        fn lock_sequences_are_deterministic(steps in proptest::collection::vec(step(), 1..20)) {
            let da = common::shm_dir().unwrap_or_else(temp_dir);
            let db = common::shm_dir().unwrap_or_else(temp_dir);
            let mut a = T::open(da.path());
            let mut b = T::open(db.path());
            let x = run(&mut a, &steps, true);
            let y = run(&mut b, &steps, false);
            prop_assert_eq!(&x, &y);
            prop_assert_eq!(all_objects(&a.svc), all_objects(&b.svc));
        }
    }
}

#[test]
fn the_lock_root_seen_from_its_parent_does_not_revoke() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let (home, _a, _f, _other) = populate(&mut t);
    let Ok(FsReply::Attr(before)) = t.run(FsOp::GetAttr { h: home }) else {
        panic!("getattr");
    };
    let lock = t.lock(HOLDER, home, LockUnit::Subtree);
    t.checkpoint(1);
    // (Slot 0 holds the agreed time, which every ordered request moves.)
    let objects: Vec<_> = all_objects(&t.svc).into_iter().skip(1).collect();
    // What `ls -l /` and a path walk through the root do: lookup, readdirplus, getattr.
    assert_eq!(
        t.run(FsOp::Lookup {
            dir: ROOT,
            name: b"home".to_vec()
        }),
        Ok(FsReply::Entry {
            handle: home,
            attr: before.clone()
        })
    );
    assert_eq!(
        t.run(FsOp::GetAttr { h: home }),
        Ok(FsReply::Attr(before.clone()))
    );
    let Ok(FsReply::ReadDir { entries, .. }) = t.run(FsOp::ReadDir {
        dir: ROOT,
        cookie: 0,
        count: 100,
        plus: true,
    }) else {
        panic!("readdir");
    };
    let e = entries
        .iter()
        .find(|e| e.name == b"home")
        .expect("home listed");
    assert_eq!((e.handle, e.attr.clone()), (home, Some(before)));
    assert_eq!(t.state(lock), Some(LockState::Active { activated_seq: 1 }));
    let after: Vec<_> = all_objects(&t.svc).into_iter().skip(1).collect();
    assert!(after == objects, "reads changed objects");
}
