//! Zzyzx locks, milestone M2, the file service's side: a lock's log entries run through
//! `Service::execute_locked` on the lock's members only, beside the ordered state. The
//! replies are the ordered path's; ordered digests, rollback and state transfer never see
//! the entries; `lock_restart` and a replay give the same lock state after a restart or a
//! crash; lock events tell the replica when a lock's log starts and ends; the merge hands
//! the lock's content to the ordered state.

mod common;

use common::temp_dir;
use state_abstraction::fs::locks::*;
use state_abstraction::fs::object::ObjectHeader;
use state_abstraction::fs::*;
use state_abstraction::locking::{
    BaseAssembly, BaseCursor, LockCertChecker, LockEvent, LockPoint, LockedResult, Resolution,
    ResolveSubject,
};
use state_abstraction::{AbstractObject, ClientId, Digest, Service};
use std::path::Path;
use std::sync::Arc;

const ROOT: Handle = Handle::ROOT;
const HOLDER: ClientId = ClientId(1);
const OTHER: ClientId = ClientId(2);
const START_NS: u64 = 1_700_000_000_000_000_000;
/// Entries' times: after every ordered time of these tests, as a log server would make them.
const ENTRY_NS: u64 = START_NS + 1_000_000_000_000;

fn req(op: FsOp) -> Vec<u8> {
    encode(&FsRequest {
        caller: Caller::root(),
        op,
    })
}

fn n(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// One entry of a lock's log: the operation and its time.
#[derive(Clone, Debug)]
struct Entry {
    op: FsOp,
    time_ns: u64,
}

/// A file service driven as a replica's execution stage drives it: ordered requests
/// through `execute` with their agreed time, entries through `execute_locked`, checkpoints
/// numbered in order.
struct R {
    svc: FileService,
    now: u64,
    seq: u64,
}

impl R {
    fn open(dir: &Path) -> R {
        R {
            svc: FileService::open(dir).expect("open"),
            now: START_NS,
            seq: 0,
        }
    }

    /// An ordered request by `client`, one agreed microsecond after the previous one.
    fn ordered_as(&mut self, client: ClientId, op: FsOp) -> FsResult {
        self.now += 1_000;
        let reply = self
            .svc
            .execute(&req(op), client, &encode(&self.now), false);
        decode(&reply).expect("a reply decodes")
    }

    fn ordered(&mut self, op: FsOp) -> FsResult {
        self.ordered_as(OTHER, op)
    }

    fn read_only(&mut self, op: FsOp) -> FsResult {
        let reply = self.svc.execute(&req(op), OTHER, &[], true);
        decode(&reply).expect("a reply decodes")
    }

    fn entry(&mut self, op: FsOp) -> Handle {
        match self.ordered(op.clone()) {
            Ok(FsReply::Entry { handle, .. }) => handle,
            other => panic!("{op:?} gave {other:?}"),
        }
    }

    fn locked(&mut self, lock: LockId, e: &Entry) -> LockedResult {
        self.svc
            .execute_locked(lock, &req(e.op.clone()), HOLDER, e.time_ns)
    }

    /// An entry that must run under the lock: its decoded result.
    fn locked_ok(&mut self, lock: LockId, e: &Entry) -> FsResult {
        match self.locked(lock, e) {
            LockedResult::Done(bytes) => decode(&bytes).expect("a reply decodes"),
            other => panic!("{:?} answered {other:?}", e.op),
        }
    }

    fn replay(&mut self, lock: LockId, entries: &[Entry]) {
        for e in entries {
            // What an entry answers was checked when it first ran; here only its effect counts.
            let _ = self.locked_ok(lock, e);
        }
    }

    fn lock(&mut self, h: Handle, unit: LockUnit) -> LockId {
        match self.ordered_as(HOLDER, FsOp::Lock { h, unit }) {
            Ok(FsReply::LockPending { lock }) => lock,
            other => panic!("lock {h:?}: {other:?}"),
        }
    }

    fn release(&mut self, lock: LockId, cert: Option<Vec<u8>>) -> FsResult {
        self.ordered_as(HOLDER, FsOp::Release { lock, cert })
    }

    fn checkpoint(&mut self) -> Digest {
        self.seq += 1;
        let d = self.svc.checkpoint(self.seq).expect("checkpoint");
        self.svc.check_lock_invariants();
        d
    }

    fn events(&mut self) -> Vec<LockEvent> {
        self.svc.take_lock_events()
    }

    fn state(&self, lock: LockId) -> Option<LockState> {
        self.svc.locks().entry(lock).map(|e| e.state)
    }

    fn base(&self, lock: LockId) -> Digest {
        self.svc.locks().entry(lock).expect("entry").base
    }

    fn lock_digest(&self, lock: LockId) -> Digest {
        self.svc.lock_state_digest(lock).expect("lock content here")
    }

    fn digest(&mut self) -> Digest {
        self.svc.root_digest().expect("digest")
    }

    /// Lets the agreed time pass the release grace (an ordered request at a later time).
    fn pass_grace(&mut self) {
        self.now += UNRESOLVED_MERGE_NS;
        self.ordered(FsOp::GetAttr { h: ROOT }).expect("getattr");
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

/// The project a holder locks: `/proj/src/main.c` (data), `/proj/docs/`, and outside it
/// `/other` (data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Proj {
    proj: Handle,
    src: Handle,
    docs: Handle,
    main: Handle,
    other: Handle,
}

fn populate(r: &mut R) -> Proj {
    let proj = r.entry(FsOp::Mkdir {
        dir: ROOT,
        name: n("proj"),
        mode: 0o755,
    });
    let src = r.entry(FsOp::Mkdir {
        dir: proj,
        name: n("src"),
        mode: 0o755,
    });
    let main = r.entry(FsOp::Create {
        dir: src,
        name: n("main.c"),
        mode: 0o644,
        how: CreateHow::Guarded,
    });
    r.ordered(FsOp::Write {
        h: main,
        offset: 0,
        data: vec![b'm'; 200_000],
    })
    .expect("write");
    let docs = r.entry(FsOp::Mkdir {
        dir: proj,
        name: n("docs"),
        mode: 0o755,
    });
    let other = r.entry(FsOp::Create {
        dir: ROOT,
        name: n("other"),
        mode: 0o644,
        how: CreateHow::Guarded,
    });
    r.ordered(FsOp::Write {
        h: other,
        offset: 0,
        data: n("outside"),
    })
    .expect("write");
    Proj {
        proj,
        src,
        docs,
        main,
        other,
    }
}

/// Populates, checkpoints, locks `/proj` for [`HOLDER`] and checkpoints again (which
/// activates the lock): the lock and the project.
fn locked_project(r: &mut R) -> (LockId, Proj) {
    let p = populate(r);
    r.checkpoint();
    let lock = r.lock(p.proj, LockUnit::Subtree);
    r.checkpoint();
    assert!(matches!(r.state(lock), Some(LockState::Active { .. })));
    (lock, p)
}

fn handle_of(r: FsResult) -> Handle {
    match r {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("not an entry: {other:?}"),
    }
}

/// The holder's work under a lock on `/proj`: every kind of operation a log carries, reads
/// included. `run` executes one entry (its time is the runner's business) and answers its
/// result; the work checks what it relies on.
fn holder_work(run: &mut dyn FnMut(FsOp) -> FsResult, p: &Proj) {
    let ok = |r: FsResult, what: &str| assert!(r.is_ok(), "{what}: {r:?}");
    let build = handle_of(run(FsOp::Mkdir {
        dir: p.proj,
        name: n("build"),
        mode: 0o755,
    }));
    let out = handle_of(run(FsOp::Create {
        dir: build,
        name: n("out.o"),
        mode: 0o644,
        how: CreateHow::Guarded,
    }));
    let big: Vec<u8> = (0..1u32 << 20).map(|k| (k % 251) as u8).collect();
    ok(
        run(FsOp::Write {
            h: out,
            offset: 0,
            data: big,
        }),
        "1 MiB write",
    );
    ok(
        run(FsOp::Write {
            h: p.main,
            offset: 70_000,
            data: n("patched"),
        }),
        "a write inside an old file",
    );
    assert_eq!(
        run(FsOp::Rename {
            from_dir: p.src,
            from_name: n("main.c"),
            to_dir: build,
            to_name: n("main.c"),
            no_replace: false,
        }),
        Ok(FsReply::Done)
    );
    // A directory moved inside the lock (the ancestor walk stops at the lock's root), and
    // one moved below itself (refused the same way on both paths).
    assert_eq!(
        run(FsOp::Rename {
            from_dir: p.proj,
            from_name: n("build"),
            to_dir: p.src,
            to_name: n("build"),
            no_replace: false,
        }),
        Ok(FsReply::Done)
    );
    assert_eq!(
        run(FsOp::Rename {
            from_dir: p.proj,
            from_name: n("src"),
            to_dir: build,
            to_name: n("src"),
            no_replace: false,
        }),
        Err(FsError::Inval)
    );
    ok(
        run(FsOp::Symlink {
            dir: p.proj,
            name: n("link"),
            target: n("src/build/out.o"),
        }),
        "symlink",
    );
    ok(
        run(FsOp::SetAttr {
            h: out,
            set: SetAttrs {
                mode: Some(0o600),
                size: Some(100_000),
                ..Default::default()
            },
        }),
        "setattr",
    );
    ok(
        run(FsOp::Link {
            h: out,
            dir: p.proj,
            name: n("out-link"),
        }),
        "link",
    );
    ok(
        run(FsOp::SetXattr {
            h: out,
            name: n("user.k"),
            value: n("v"),
            how: XattrSet::Either,
        }),
        "setxattr",
    );
    ok(
        run(FsOp::Mknod {
            dir: build,
            name: n("fifo"),
            mode: 0o644,
            kind: NodeKind::Fifo,
        }),
        "mknod",
    );
    let tmp = handle_of(run(FsOp::Create {
        dir: build,
        name: n("tmp"),
        mode: 0o644,
        how: CreateHow::Guarded,
    }));
    ok(
        run(FsOp::Write {
            h: tmp,
            offset: 0,
            data: vec![1; 5000],
        }),
        "write",
    );
    assert_eq!(
        run(FsOp::Remove {
            dir: build,
            name: n("tmp"),
        }),
        Ok(FsReply::Done)
    );
    // The removed object's slot is the lowest free member again.
    let again = handle_of(run(FsOp::Create {
        dir: build,
        name: n("again"),
        mode: 0o644,
        how: CreateHow::Guarded,
    }));
    assert_eq!(again.index, tmp.index);
    assert_eq!(again.generation, tmp.generation + 1);
    handle_of(run(FsOp::Mkdir {
        dir: p.proj,
        name: n("empty"),
        mode: 0o755,
    }));
    assert_eq!(
        run(FsOp::Rmdir {
            dir: p.proj,
            name: n("empty"),
        }),
        Ok(FsReply::Done)
    );
    assert_eq!(
        run(FsOp::Remove {
            dir: p.proj,
            name: n("out-link"),
        }),
        Ok(FsReply::Done)
    );
    ok(
        run(FsOp::Fallocate {
            h: out,
            offset: 1000,
            length: 5000,
            mode: AllocMode::ZeroRange { keep_size: false },
        }),
        "fallocate",
    );
    ok(
        run(FsOp::CopyRange {
            src: out,
            src_offset: 0,
            dst: p.main,
            dst_offset: 150_000,
            length: 90_000,
        }),
        "copy",
    );
    ok(run(FsOp::Commit { h: out }), "commit");
    // Reads of members.
    let reads = [
        FsOp::ReadDir {
            dir: build,
            cookie: 0,
            count: 100,
            plus: true,
        },
        FsOp::Read {
            h: out,
            offset: 0,
            count: 200_000,
        },
        FsOp::Lookup {
            dir: build,
            name: n("out.o"),
        },
        FsOp::Lookup {
            dir: build,
            name: n(".."),
        },
        FsOp::GetAttr { h: p.main },
        FsOp::Access { h: out, mask: 7 },
        FsOp::GetXattr {
            h: out,
            name: n("user.k"),
        },
        FsOp::ListXattr { h: out },
    ];
    for op in reads {
        ok(run(op.clone()), &format!("{op:?}"));
    }
    let link = handle_of(run(FsOp::Lookup {
        dir: p.proj,
        name: n("link"),
    }));
    assert_eq!(
        run(FsOp::ReadLink { h: link }),
        Ok(FsReply::ReadLink {
            target: n("src/build/out.o")
        })
    );
    // A failing operation is a result like any other.
    assert_eq!(
        run(FsOp::Lookup {
            dir: build,
            name: n("missing"),
        }),
        Err(FsError::NoEnt)
    );
}

/// Runs [`holder_work`] under `lock` at `r`, and returns its entries.
fn work_under_lock(r: &mut R, lock: LockId, p: &Proj) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut run = |op: FsOp| {
        let e = Entry {
            op,
            time_ns: ENTRY_NS + 1_000 * entries.len() as u64,
        };
        let result = r.locked_ok(lock, &e);
        entries.push(e);
        result
    };
    holder_work(&mut run, p);
    entries
}

/// A checker that accepts one byte string as the certificate of one point.
struct Accept {
    cert: Vec<u8>,
    point: LockPoint,
}

impl LockCertChecker for Accept {
    fn check(&self, cert: &[u8]) -> Option<LockPoint> {
        (cert == self.cert.as_slice()).then_some(self.point)
    }
}

/// A certificate for `lock` after `k` entries whose state is `state`, and a checker that
/// accepts it.
fn certificate(lock: LockId, k: u64, state: Digest) -> (Vec<u8>, Arc<Accept>) {
    let cert = format!("cert of lock {} at {k}", lock.0).into_bytes();
    let point = LockPoint {
        lock,
        epoch: 0,
        k,
        chain: Digest([k as u8; 32]),
        state,
    };
    let checker = Arc::new(Accept {
        cert: cert.clone(),
        point,
    });
    (cert, checker)
}

#[test]
fn locked_operations_answer_as_ordered_ones_and_stay_out_of_ordered_digests() {
    let (dl, dord, dun) = (temp_dir(), temp_dir(), temp_dir());
    // `l` locks and runs entries; `o` runs the same ordered requests and no entry; `u`
    // locks nothing and runs the entries as ordered requests.
    let mut l = R::open(dl.path());
    let mut o = R::open(dord.path());
    let mut u = R::open(dun.path());
    let p = populate(&mut l);
    populate(&mut o);
    populate(&mut u);
    let df = l.ordered(FsOp::StatFs { h: ROOT });
    o.ordered(FsOp::StatFs { h: ROOT }).expect("statfs");
    assert_eq!(l.checkpoint(), o.checkpoint());
    let lock = l.lock(p.proj, LockUnit::Subtree);
    assert_eq!(o.lock(p.proj, LockUnit::Subtree), lock);
    assert_eq!(l.events(), Vec::new(), "a grant is not an activation");
    // Pending: no entry runs yet.
    let first = Entry {
        op: FsOp::GetAttr { h: p.main },
        time_ns: ENTRY_NS,
    };
    assert_eq!(l.locked(lock, &first), LockedResult::NeedsAgreement);
    assert_eq!(l.checkpoint(), o.checkpoint());
    let base = l.base(lock);
    assert_eq!(
        l.events(),
        vec![LockEvent::Activated {
            lock,
            epoch: 0,
            holder: HOLDER,
            base
        }]
    );
    assert_eq!(l.svc.lock_state_digest(lock), Some(base));

    // The holder's work, with ordered requests of another client outside the lock in
    // between, and a checkpoint: compared entry by entry with the ordered path at `u`.
    let mut count = 0u64;
    let mut ordered_digests = (Vec::new(), Vec::new());
    let mut run = |op: FsOp| {
        let e = Entry {
            op: op.clone(),
            time_ns: ENTRY_NS + 1_000 * count,
        };
        count += 1;
        let locked = l.locked_ok(lock, &e);
        let reply = u
            .svc
            .execute(&req(op.clone()), HOLDER, &encode(&e.time_ns), false);
        let ordered: FsResult = decode(&reply).expect("reply");
        assert_eq!(locked, ordered, "{op:?}");
        assert_eq!(l.events(), Vec::new(), "an entry makes no lock event");
        if count.is_multiple_of(7) {
            let w = FsOp::Write {
                h: p.other,
                offset: count,
                data: vec![count as u8; 10],
            };
            assert_eq!(l.ordered(w.clone()), o.ordered(w));
        }
        if count == 12 {
            ordered_digests.0.push(l.checkpoint());
            ordered_digests.1.push(o.checkpoint());
        }
        locked
    };
    holder_work(&mut run, &p);
    assert_eq!(ordered_digests.0, ordered_digests.1);
    assert_ne!(
        l.lock_digest(lock),
        base,
        "the entries changed the lock's content"
    );
    // Statfs never reads the lock's content.
    assert_eq!(l.ordered(FsOp::StatFs { h: ROOT }), df);
    assert_eq!(o.ordered(FsOp::StatFs { h: ROOT }), df);
    assert_eq!(l.checkpoint(), o.checkpoint());
    assert_eq!(all_objects(&l.svc), all_objects(&o.svc), "ordered objects");

    // Released with a certificate of the end: merged at the next checkpoint, with the
    // content the entries made (the same objects as at `u`, which ran them ordered).
    let (cert, checker) = certificate(lock, count, l.lock_digest(lock));
    l.svc.set_lock_cert_checker(checker);
    assert_eq!(l.release(lock, Some(cert)), Ok(FsReply::Done));
    let frozen = l.events();
    assert!(
        matches!(frozen.as_slice(), [LockEvent::Frozen { end: Some(pt), .. }] if pt.k == count),
        "{frozen:?}"
    );
    l.checkpoint();
    assert_eq!(l.events(), vec![LockEvent::Merged { lock, epoch: 0 }]);
    assert_eq!(l.state(lock), None);
    assert!(
        !l.svc.data_dir().join("locks").join("0").exists(),
        "the lock's saved data goes with the merge"
    );
    let mut compared = 0;
    for i in 1..u.svc.object_count() {
        let ui = u.svc.get_obj(i).expect("u");
        if !matches!(
            ObjectHeader::decode_canonical(&ui.pieces[0]),
            Ok(ObjectHeader::Live(_))
        ) {
            continue;
        }
        if i == p.other.index {
            continue; // written by the ordered requests at `l` only
        }
        assert_eq!(l.svc.get_obj(i).expect("l"), ui, "object {i}");
        compared += 1;
    }
    assert!(compared >= 9, "{compared} objects compared");
}

#[test]
fn an_entry_that_reaches_outside_the_lock_needs_agreement_and_does_nothing() {
    let dir = temp_dir();
    let mut r = R::open(dir.path());
    let p = populate(&mut r);
    // `/proj/src/shared` also has a name outside: not a member.
    let shared = r.entry(FsOp::Create {
        dir: p.src,
        name: n("shared"),
        mode: 0o644,
        how: CreateHow::Guarded,
    });
    r.entry(FsOp::Link {
        h: shared,
        dir: ROOT,
        name: n("shared-outside"),
    });
    r.checkpoint();
    let lock = r.lock(p.src, LockUnit::Subtree);
    r.checkpoint();
    assert_eq!(r.svc.masked_by(shared.index), None);
    // Another client's lock, still pending.
    let pending = match r.ordered_as(
        OTHER,
        FsOp::Lock {
            h: p.other,
            unit: LockUnit::File,
        },
    ) {
        Ok(FsReply::LockPending { lock }) => lock,
        other => panic!("{other:?}"),
    };
    r.events();
    let before = (all_objects(&r.svc), r.digest(), r.lock_digest(lock));
    let e = |op: FsOp| Entry {
        op,
        time_ns: ENTRY_NS,
    };
    let outside = vec![
        // Out of the subtree, into it, links across the boundary both ways.
        FsOp::Rename {
            from_dir: p.src,
            from_name: n("main.c"),
            to_dir: ROOT,
            to_name: n("main.c"),
            no_replace: false,
        },
        FsOp::Rename {
            from_dir: ROOT,
            from_name: n("other"),
            to_dir: p.src,
            to_name: n("other"),
            no_replace: false,
        },
        FsOp::Link {
            h: p.other,
            dir: p.src,
            name: n("l"),
        },
        FsOp::Link {
            h: p.main,
            dir: ROOT,
            name: n("l"),
        },
        // The lock root's parent, reached by name and by "..".
        FsOp::Lookup {
            dir: p.proj,
            name: n("src"),
        },
        FsOp::Lookup {
            dir: p.src,
            name: n(".."),
        },
        // A directory whose entries name a non-member.
        FsOp::ReadDir {
            dir: p.src,
            cookie: 0,
            count: 10,
            plus: false,
        },
        FsOp::Lookup {
            dir: p.src,
            name: n("shared"),
        },
        FsOp::Remove {
            dir: p.src,
            name: n("shared"),
        },
        // Creating in, and removing from, a directory outside.
        FsOp::Create {
            dir: ROOT,
            name: n("new"),
            mode: 0o644,
            how: CreateHow::Guarded,
        },
        FsOp::Mkdir {
            dir: p.proj,
            name: n("new"),
            mode: 0o755,
        },
        FsOp::Remove {
            dir: ROOT,
            name: n("other"),
        },
        FsOp::Write {
            h: p.other,
            offset: 0,
            data: n("x"),
        },
        FsOp::GetAttr { h: shared },
        FsOp::CopyRange {
            src: p.other,
            src_offset: 0,
            dst: p.main,
            dst_offset: 0,
            length: 3,
        },
        // Only the ordered path runs these.
        FsOp::StatFs { h: p.main },
        FsOp::ListLocks,
        FsOp::Renew { lock },
        FsOp::Release { lock, cert: None },
        FsOp::Lock {
            h: p.main,
            unit: LockUnit::File,
        },
    ];
    for op in outside {
        assert_eq!(
            r.locked(lock, &e(op.clone())),
            LockedResult::NeedsAgreement,
            "{op:?}"
        );
    }
    // Not the holder; not a lock; a lock that is not active (the pending one).
    let get = FsOp::GetAttr { h: p.main };
    let by_other = r
        .svc
        .execute_locked(lock, &req(get.clone()), OTHER, ENTRY_NS);
    assert_eq!(by_other, LockedResult::NeedsAgreement);
    assert_eq!(
        r.locked(LockId(99), &e(get.clone())),
        LockedResult::NeedsAgreement
    );
    let other_get = req(FsOp::GetAttr { h: p.other });
    assert_eq!(
        r.svc.execute_locked(pending, &other_get, OTHER, ENTRY_NS),
        LockedResult::NeedsAgreement
    );
    // A hard link made under the lock between members keeps the file inside.
    assert!(r
        .locked_ok(
            lock,
            &e(FsOp::Link {
                h: p.main,
                dir: p.src,
                name: n("main2.c")
            })
        )
        .is_ok());
    // Malformed bytes are answered as the ordered path answers them.
    assert_eq!(
        r.svc.execute_locked(lock, b"junk", HOLDER, ENTRY_NS),
        LockedResult::Done(encode(&FsResult::Err(FsError::BadRequest)))
    );
    let after = (all_objects(&r.svc), r.digest());
    assert_eq!(
        after,
        (before.0, before.1),
        "the ordered state did not move"
    );
    assert_ne!(
        r.lock_digest(lock),
        before.2,
        "only the link changed the lock"
    );
    assert_eq!(r.events(), Vec::new());
    // A frozen lock still runs entries until it merges (the log server decides what it
    // appends after a freeze: a replay after a restart, entries up to a certified end).
    assert_eq!(r.ordered(FsOp::GetAttr { h: p.main }), Err(FsError::Locked));
    assert!(matches!(
        r.events().as_slice(),
        [LockEvent::Frozen { end: None, .. }]
    ));
    assert!(matches!(r.locked(lock, &e(get)), LockedResult::Done(_)));
}

#[test]
fn an_empty_pool_answers_pool_empty_until_a_remove_frees_a_slot() {
    let dir = common::shm_dir().unwrap_or_else(temp_dir);
    let mut r = R::open(dir.path());
    let p = populate(&mut r);
    r.checkpoint();
    let lock = r.lock(p.src, LockUnit::Directory);
    r.checkpoint();
    let pool = r.svc.locks().entry(lock).expect("entry").pool.clone();
    assert_eq!(pool.iter().map(|x| x.1).sum::<u32>(), POOL_INITIAL);
    let count = r.svc.object_count();
    let mut t = ENTRY_NS;
    let mut e = |op: FsOp| {
        t += 1_000;
        Entry { op, time_ns: t }
    };
    for k in 0..POOL_INITIAL {
        let h = handle_of(r.locked_ok(
            lock,
            &e(FsOp::Create {
                dir: p.src,
                name: format!("f{k}").into_bytes(),
                mode: 0o644,
                how: CreateHow::Guarded,
            }),
        ));
        assert!(pool
            .iter()
            .any(|&(s, l)| (s..s + l as u64).contains(&h.index)));
    }
    let before = r.lock_digest(lock);
    let creates = [
        FsOp::Create {
            dir: p.src,
            name: n("one-more"),
            mode: 0o644,
            how: CreateHow::Guarded,
        },
        FsOp::Mkdir {
            dir: p.src,
            name: n("one-more"),
            mode: 0o755,
        },
        FsOp::Symlink {
            dir: p.src,
            name: n("one-more"),
            target: n("x"),
        },
        FsOp::Mknod {
            dir: p.src,
            name: n("one-more"),
            mode: 0o644,
            kind: NodeKind::Socket,
        },
    ];
    for op in &creates {
        assert_eq!(
            r.locked(lock, &e(op.clone())),
            LockedResult::PoolEmpty,
            "{op:?}"
        );
    }
    assert_eq!(r.lock_digest(lock), before, "no effect");
    assert_eq!(
        r.svc.object_count(),
        count,
        "the slot array never grows under a lock"
    );
    // A create that fails for another reason first still answers.
    assert_eq!(
        r.locked_ok(
            lock,
            &e(FsOp::Create {
                dir: p.src,
                name: n("f0"),
                mode: 0o644,
                how: CreateHow::Guarded,
            })
        ),
        Err(FsError::Exist)
    );
    assert_eq!(
        r.locked_ok(
            lock,
            &e(FsOp::Remove {
                dir: p.src,
                name: n("f7"),
            })
        ),
        Ok(FsReply::Done)
    );
    assert!(r.locked_ok(lock, &e(creates[0].clone())).is_ok());
}

/// The ordered requests of the interleaving test: another client's work outside the lock.
fn ordered_batch(r: &mut R, k: u64, p: &Proj) {
    r.ordered(FsOp::Write {
        h: p.other,
        offset: k * 10,
        data: vec![k as u8; 10],
    })
    .expect("write");
    let name = format!("o{k}").into_bytes();
    r.ordered(FsOp::Create {
        dir: ROOT,
        name,
        mode: 0o644,
        how: CreateHow::Guarded,
    })
    .expect("create");
}

#[test]
fn two_replicas_interleaving_entries_differently_agree() {
    let (da, db, dref) = (
        temp_dir(),
        common::shm_dir().unwrap_or_else(temp_dir),
        temp_dir(),
    );
    let mut reference = R::open(dref.path());
    let (lock, p) = locked_project(&mut reference);
    let entries = work_under_lock(&mut reference, lock, &p);
    let mut a = R::open(da.path());
    let mut b = R::open(db.path());
    assert_eq!(locked_project(&mut a), (lock, p));
    assert_eq!(locked_project(&mut b), (lock, p));
    assert_eq!(a.digest(), b.digest());
    let half = entries.len() / 2;
    // `a` runs entries early, `b` late, across the same ordered batches and checkpoints.
    let mut digests = (Vec::new(), Vec::new());
    a.replay(lock, &entries[..half]);
    ordered_batch(&mut a, 1, &p);
    ordered_batch(&mut b, 1, &p);
    digests.0.push(a.checkpoint());
    digests.1.push(b.checkpoint());
    b.replay(lock, &entries[..3]);
    ordered_batch(&mut a, 2, &p);
    a.replay(lock, &entries[half..]);
    ordered_batch(&mut b, 2, &p);
    b.replay(lock, &entries[3..half]);
    digests.0.push(a.checkpoint());
    digests.1.push(b.checkpoint());
    ordered_batch(&mut a, 3, &p);
    b.replay(lock, &entries[half..]);
    ordered_batch(&mut b, 3, &p);
    digests.0.push(a.checkpoint());
    digests.1.push(b.checkpoint());
    assert_eq!(digests.0, digests.1, "ordered checkpoint digests");
    let end = a.lock_digest(lock);
    assert_eq!(b.lock_digest(lock), end);
    assert_eq!(reference.lock_digest(lock), end);
    // Released with a certificate of the end: both merge at the next checkpoint into the
    // same state, files and all.
    let (cert, checker) = certificate(lock, entries.len() as u64, end);
    for r in [&mut a, &mut b] {
        r.svc.set_lock_cert_checker(checker.clone());
        r.events();
        assert_eq!(r.release(lock, Some(cert.clone())), Ok(FsReply::Done));
    }
    assert_eq!(a.checkpoint(), b.checkpoint());
    let events = a.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                LockEvent::Frozen { end: Some(_), .. },
                LockEvent::Merged { .. }
            ]
        ),
        "{events:?}"
    );
    assert!(all_objects(&a.svc) == all_objects(&b.svc), "same objects");
    let read = FsOp::Read {
        h: p.main,
        offset: 0,
        count: 1 << 20,
    };
    let data = a.ordered(read.clone());
    assert!(matches!(&data, Ok(FsReply::Read { data, .. }) if data.len() == 240_000));
    assert_eq!(b.ordered(read), data);
}

#[test]
fn ordered_rollback_leaves_the_lock_alone_and_lock_restart_goes_back_to_activation() {
    let dir = temp_dir();
    rollback_on(dir.path());
}

fn rollback_on(dir: &Path) {
    let mut r = R::open(&dir.join("a"));
    let p = populate(&mut r);
    let d1 = r.checkpoint();
    let objects1 = all_objects(&r.svc);
    let lock = r.lock(p.proj, LockUnit::Subtree);
    let d2 = r.checkpoint();
    let base = r.base(lock);
    let entries = work_under_lock(&mut r, lock, &p);
    ordered_batch(&mut r, 1, &p);
    let end = r.lock_digest(lock);
    // Speculation undone: the ordered state goes back, the lock's content does not.
    r.svc.rollback_to(2).expect("rollback");
    r.svc.check_lock_invariants();
    assert_eq!(r.digest(), d2);
    assert_eq!(r.lock_digest(lock), end);
    // Records of older checkpoints going do not take the lock's record with them.
    ordered_batch(&mut r, 2, &p);
    r.checkpoint();
    r.checkpoint();
    r.svc.discard_before(4);
    assert_eq!(r.svc.checkpoints().len(), 1);
    // The log's restart: back to activation, and the replay gives the same content.
    r.svc.lock_restart(lock).expect("lock restart");
    assert_eq!(r.lock_digest(lock), base);
    r.replay(lock, &entries);
    assert_eq!(r.lock_digest(lock), end);
    // Restarting twice is restarting once.
    r.svc.lock_restart(lock).expect("lock restart");
    r.svc.lock_restart(lock).expect("lock restart");
    assert_eq!(r.lock_digest(lock), base);
    r.replay(lock, &entries);
    assert_eq!(r.lock_digest(lock), end);

    // An ordered rollback below the activation undoes the lock: the state is checkpoint 1's
    // exactly, whatever the entries did.
    let mut r = R::open(&dir.join("b"));
    let p = populate(&mut r);
    assert_eq!(r.checkpoint(), d1);
    assert!(all_objects(&r.svc) == objects1);
    let lock = r.lock(p.proj, LockUnit::Subtree);
    r.checkpoint();
    work_under_lock(&mut r, lock, &p);
    r.svc.rollback_to(1).expect("rollback");
    r.svc.check_lock_invariants();
    assert_eq!(r.digest(), d1);
    assert!(all_objects(&r.svc) == objects1, "checkpoint 1's objects");
    assert_eq!(r.svc.lock_state_digest(lock), None);
    assert!(r
        .ordered(FsOp::Read {
            h: p.main,
            offset: 0,
            count: 10
        })
        .is_ok());
}

#[test]
fn restart_and_crash_then_lock_restart_and_replay_give_the_same_lock_state() {
    let dir = temp_dir();
    restart_on(dir.path());
}

/// A replica that stops (cleanly or not) while a lock has entries, restarts its lock log
/// and replays it, merges as one that never stopped.
fn restart_on(dir: &Path) {
    let reference_dir = temp_dir();
    let mut reference = R::open(reference_dir.path());
    let (lock, p) = locked_project(&mut reference);
    let entries = work_under_lock(&mut reference, lock, &p);
    let end = reference.lock_digest(lock);
    let (cert, checker) = certificate(lock, entries.len() as u64, end);
    reference.svc.set_lock_cert_checker(checker.clone());
    reference
        .release(lock, Some(cert.clone()))
        .expect("release");
    let merged = reference.checkpoint();

    for (k, crash) in [(0, false), (1, true)] {
        let mut r = R::open(&dir.join(k.to_string()));
        locked_project(&mut r);
        let base = r.base(lock);
        let (now, seq) = (r.now, r.seq);
        r.replay(lock, &entries);
        assert_eq!(r.lock_digest(lock), end);
        r.reopen(crash);
        r.svc.check_lock_invariants();
        if let Err(e) = r.svc.lock_restart(lock) {
            panic!("lock restart after a crash ({crash}): {e}");
        }
        assert_eq!(r.lock_digest(lock), base, "crash {crash}");
        // A second stop in the middle of the replay, then the whole log again.
        r.replay(lock, &entries[..entries.len() / 2]);
        r.reopen(true);
        r.svc.lock_restart(lock).expect("lock restart");
        assert_eq!(r.lock_digest(lock), base, "crash {crash}, twice");
        r.replay(lock, &entries);
        assert_eq!(r.lock_digest(lock), end, "crash {crash}");
        // The ordered state is the checkpoint's: the release comes as in the reference.
        (r.now, r.seq) = (now, seq);
        r.svc.set_lock_cert_checker(checker.clone());
        r.release(lock, Some(cert.clone())).expect("release");
        assert_eq!(r.checkpoint(), merged, "crash {crash}");
        assert!(all_objects(&r.svc) == all_objects(&reference.svc));
    }
}

/// The file the lock tests write "under the lock" into reads that, on the ordered path.
fn assert_reads_under_the_lock(r: &mut R, h: Handle) {
    assert_eq!(
        r.ordered(FsOp::Read {
            h,
            offset: 0,
            count: 14
        }),
        Ok(FsReply::Read {
            data: n("under the lock"),
            eof: false
        })
    );
}

/// Entry: "under the lock" written at the start of `h`.
fn write_under_the_lock(r: &mut R, lock: LockId, h: Handle) {
    let e = Entry {
        op: FsOp::Write {
            h,
            offset: 0,
            data: n("under the lock"),
        },
        time_ns: ENTRY_NS,
    };
    r.locked_ok(lock, &e).expect("write");
}

/// `client`'s ordered request for a subtree lock on `h`.
fn lock_subtree(r: &mut R, client: ClientId, h: Handle) -> FsResult {
    r.ordered_as(
        client,
        FsOp::Lock {
            h,
            unit: LockUnit::Subtree,
        },
    )
}

/// A checker whose `resolve` accepts one byte string as the evidence for one point of one
/// lock (the subject the service passes must be that lock's, as the table records it).
struct Resolver {
    evidence: Vec<u8>,
    subject: ResolveSubject,
    point: LockPoint,
    cert: Option<(Vec<u8>, LockPoint)>,
    equivocation: bool,
}

impl Resolver {
    /// Accepts `evidence` about the holder's `lock` as `point`; no certificate, no fork.
    fn of(r: &R, lock: LockId, evidence: &[u8], point: LockPoint) -> Resolver {
        Resolver {
            evidence: evidence.to_vec(),
            subject: ResolveSubject {
                lock,
                epoch: 0,
                holder: HOLDER,
                base: r.base(lock),
            },
            point,
            cert: None,
            equivocation: false,
        }
    }
}

impl LockCertChecker for Resolver {
    fn check(&self, cert: &[u8]) -> Option<LockPoint> {
        let (c, p) = self.cert.as_ref()?;
        (cert == c.as_slice()).then_some(*p)
    }
    fn resolve(&self, evidence: &[u8], subject: &ResolveSubject) -> Option<Resolution> {
        (evidence == self.evidence.as_slice() && *subject == self.subject).then_some(Resolution {
            point: self.point,
            equivocation: self.equivocation,
        })
    }
}

#[test]
fn resolve_fixes_where_a_silent_holders_log_ends() {
    let dir = temp_dir();
    let mut r = R::open(dir.path());
    let (lock, p) = locked_project(&mut r);
    r.events();
    write_under_the_lock(&mut r, lock, p.main);
    let resolve = |evidence: &[u8]| FsOp::Resolve {
        lock,
        evidence: evidence.to_vec(),
    };
    // An active lock has nothing to resolve.
    assert_eq!(r.ordered(resolve(b"reports")), Err(FsError::Inval));
    assert_eq!(r.ordered(FsOp::GetAttr { h: p.main }), Err(FsError::Locked));
    r.events();
    // Within the grace the holder's own release has priority: retry later.
    assert_eq!(r.ordered(resolve(b"reports")), Err(FsError::Locked));
    r.now += RELEASE_GRACE_NS;
    // Without a checker, or with evidence that does not verify: refused, no effect.
    assert_eq!(r.ordered(resolve(b"reports")), Err(FsError::Inval));
    let point = LockPoint {
        lock,
        epoch: 0,
        k: 1,
        chain: Digest([1; 32]),
        state: LockPoint::UNCERTIFIED,
    };
    let held = LockPoint {
        k: 0,
        state: r.base(lock),
        ..point
    };
    r.svc.set_lock_cert_checker(Arc::new(Resolver {
        cert: Some((b"cert at 0".to_vec(), held)),
        ..Resolver::of(&r, lock, b"reports", point)
    }));
    assert_eq!(r.ordered(resolve(b"forged")), Err(FsError::Inval));
    assert_eq!(r.events(), Vec::new());
    assert!(!r.svc.lock_transition_pending());
    assert_eq!(r.ordered(resolve(b"reports")), Ok(FsReply::Done));
    assert_eq!(
        r.events(),
        vec![LockEvent::Frozen {
            lock,
            epoch: 0,
            end: Some(point)
        }]
    );
    // Resolved once: later ones change nothing.
    assert_eq!(r.ordered(resolve(b"reports")), Ok(FsReply::Done));
    // The holder comes back with a certificate for less than was resolved: the entry it
    // saw refused is in the lock's result, and it is told so.
    assert_eq!(
        r.release(lock, Some(b"cert at 0".to_vec())),
        Err(FsError::Stale)
    );
    assert_eq!(r.events(), Vec::new());
    // The merge waits a settling second after the resolution (replicas off the chosen end
    // catch up meanwhile).
    assert!(!r.svc.lock_transition_pending());
    r.checkpoint();
    assert_eq!(r.events(), Vec::new());
    r.now += RESOLVED_SETTLE_NS;
    assert_eq!(r.ordered(FsOp::GetAttr { h: p.main }), Err(FsError::Locked));
    assert!(r.svc.lock_transition_pending());
    r.checkpoint();
    assert_eq!(r.events(), vec![LockEvent::Merged { lock, epoch: 0 }]);
    // Merged with the entry, and the replica is not suspect: the resolved point certifies
    // no content, so nothing was compared.
    assert_reads_under_the_lock(&mut r, p.main);
    assert_eq!(r.ordered(resolve(b"reports")), Ok(FsReply::Done));
    // The holder was not caught forking: it may lock again.
    assert!(matches!(
        lock_subtree(&mut r, HOLDER, p.src),
        Ok(FsReply::LockPending { .. })
    ));
}

/// Evidence that the holder signed two entries at one position bans it from locks.
#[test]
fn a_resolution_showing_equivocation_bans_the_holder() {
    let dir = temp_dir();
    let mut r = R::open(dir.path());
    let (lock, p) = locked_project(&mut r);
    assert_eq!(r.ordered(FsOp::GetAttr { h: p.main }), Err(FsError::Locked));
    r.now += RELEASE_GRACE_NS;
    let point = LockPoint {
        lock,
        epoch: 0,
        k: 0,
        chain: Digest([0; 32]),
        state: LockPoint::UNCERTIFIED,
    };
    r.svc.set_lock_cert_checker(Arc::new(Resolver {
        equivocation: true,
        ..Resolver::of(&r, lock, b"forked", point)
    }));
    assert_eq!(
        r.ordered(FsOp::Resolve {
            lock,
            evidence: b"forked".to_vec()
        }),
        Ok(FsReply::Done)
    );
    // Merged after the settling second.
    r.now += RESOLVED_SETTLE_NS;
    assert_eq!(r.ordered(FsOp::GetAttr { h: p.main }), Err(FsError::Locked));
    r.checkpoint();
    assert!(r.state(lock).is_none());
    assert_eq!(
        lock_subtree(&mut r, HOLDER, p.src),
        Ok(FsReply::LockRefused {
            why: LockRefusal::Banned
        })
    );
    // Others still may.
    let other = lock_subtree(&mut r, OTHER, p.src);
    assert!(
        matches!(other, Ok(FsReply::LockPending { .. })),
        "{other:?}"
    );
}

#[test]
fn release_certificates_and_the_grace() {
    let dir = temp_dir();
    let mut r = R::open(dir.path());
    let (lock, p) = locked_project(&mut r);
    r.events();
    let end = r.lock_digest(lock);
    let (cert, checker) = certificate(lock, 0, end);
    // Without a checker, a certificate cannot be believed.
    assert_eq!(r.release(lock, Some(cert.clone())), Err(FsError::Inval));
    r.svc.set_lock_cert_checker(checker);
    let wrong = certificate(LockId(7), 0, end);
    for bad in [b"forged".to_vec(), wrong.0] {
        assert_eq!(r.release(lock, Some(bad)), Err(FsError::Inval));
    }
    // Another lock's certificate, checked by a checker that vouches for it.
    r.svc.set_lock_cert_checker(wrong.1);
    assert_eq!(
        r.release(lock, Some(b"cert of lock 7 at 0".to_vec())),
        Err(FsError::Inval)
    );
    assert_eq!(
        r.ordered_as(
            OTHER,
            FsOp::Release {
                lock,
                cert: Some(cert.clone())
            }
        ),
        Err(FsError::Perm)
    );
    assert!(matches!(r.state(lock), Some(LockState::Active { .. })));
    assert_eq!(r.events(), Vec::new());
    r.svc.set_lock_cert_checker(certificate(lock, 0, end).1);
    assert_eq!(r.release(lock, Some(cert)), Ok(FsReply::Done));
    let point = LockPoint {
        lock,
        epoch: 0,
        k: 0,
        chain: Digest([0; 32]),
        state: end,
    };
    assert_eq!(
        r.events(),
        vec![LockEvent::Frozen {
            lock,
            epoch: 0,
            end: Some(point)
        }]
    );
    assert!(r.svc.lock_transition_pending());
    r.checkpoint();
    assert_eq!(r.events(), vec![LockEvent::Merged { lock, epoch: 0 }]);
    assert!(r.ordered(FsOp::GetAttr { h: p.main }).is_ok());

    // Released without a certificate: frozen, merged only after the grace.
    let l2 = r.lock(p.proj, LockUnit::Subtree);
    r.checkpoint();
    r.events();
    assert_eq!(r.release(l2, None), Ok(FsReply::Done));
    assert_eq!(
        r.events(),
        vec![LockEvent::Frozen {
            lock: l2,
            epoch: 0,
            end: None
        }]
    );
    assert!(!r.svc.lock_transition_pending());
    r.checkpoint();
    assert_eq!(r.events(), Vec::new());
    assert!(matches!(r.state(l2), Some(LockState::Frozen { .. })));
    r.pass_grace();
    assert!(r.svc.lock_transition_pending());
    r.checkpoint();
    assert_eq!(r.events(), vec![LockEvent::Merged { lock: l2, epoch: 0 }]);

    // Frozen by a conflict, then released with a certificate inside the grace: the end is
    // set, and the lock merges at the next checkpoint with the entries' content.
    let l3 = r.lock(p.src, LockUnit::Subtree);
    r.checkpoint();
    r.events();
    write_under_the_lock(&mut r, l3, p.main);
    assert_eq!(r.ordered(FsOp::GetAttr { h: p.main }), Err(FsError::Locked));
    assert_eq!(
        r.events(),
        vec![LockEvent::Frozen {
            lock: l3,
            epoch: 0,
            end: None
        }]
    );
    let (cert3, checker3) = certificate(l3, 1, r.lock_digest(l3));
    r.svc.set_lock_cert_checker(checker3);
    assert_eq!(r.release(l3, Some(cert3.clone())), Ok(FsReply::Done));
    assert!(matches!(
        r.events().as_slice(),
        [LockEvent::Frozen { end: Some(pt), .. }] if pt.k == 1
    ));
    assert!(matches!(
        r.state(l3),
        Some(LockState::Frozen {
            cause: FreezeCause::Conflict(OTHER),
            end: Some(_),
            ..
        })
    ));
    // The same end again changes nothing.
    assert_eq!(r.release(l3, Some(cert3)), Ok(FsReply::Done));
    assert_eq!(r.events(), Vec::new());
    r.checkpoint();
    assert_eq!(r.events(), vec![LockEvent::Merged { lock: l3, epoch: 0 }]);
    assert_reads_under_the_lock(&mut r, p.main);
    // Read-only requests never make events, even when they meet a lock. (Not `/proj/src`:
    // its holder lost it to a conflict a moment ago.)
    assert_eq!(
        lock_subtree(&mut r, HOLDER, p.src),
        Ok(FsReply::LockRefused {
            why: LockRefusal::Recent
        })
    );
    let l4 = r.lock(p.proj, LockUnit::Subtree);
    r.checkpoint();
    r.events();
    assert_eq!(
        r.read_only(FsOp::GetAttr { h: p.main }),
        Err(FsError::Locked)
    );
    assert_eq!(r.events(), Vec::new());
    assert!(matches!(r.state(l4), Some(LockState::Active { .. })));
}

/// Pages of `lock`'s content at activation from `from` on, fetched from `r` with `budget`
/// bytes a page, appended to `into`; how many pages it took.
fn fetch_base(
    r: &R,
    lock: LockId,
    into: &mut BaseAssembly,
    budget: usize,
    pages_max: usize,
) -> usize {
    let mut pages = 0;
    while pages < pages_max {
        let from = into.cursor();
        let page = r
            .svc
            .lock_base_page(lock, from, budget)
            .expect("content served");
        let bytes: usize = page.pieces.iter().map(|p| p.bytes.len()).sum();
        assert!(
            bytes <= budget || page.pieces.len() == 1,
            "a page of {bytes} bytes for a budget of {budget}"
        );
        pages += 1;
        if into.append(page, 1 << 20).expect("pages continue") {
            break;
        }
    }
    pages
}

/// Lock state transfer: a replica that got the ordered state by transfer while a lock was
/// active (placeholders only) fetches the members as at activation in pages, from a peer
/// whose entries changed them meanwhile; wrong content is refused; the installed content
/// survives a crash, the log replays on it, and the lock merges the same everywhere.
#[test]
fn a_replica_without_a_locks_content_fetches_it_in_pages_and_serves_the_lock() {
    let (da, db) = (temp_dir(), temp_dir());
    let mut a = R::open(da.path());
    let (lock, p) = locked_project(&mut a);
    let base = a.base(lock);
    // The first page before the holder's work, the rest after: activation values stay put
    // while entries change the members (copy-on-write into the lock's record).
    let budget = 100_000;
    let mut fetched = BaseAssembly::default();
    assert_eq!(fetch_base(&a, lock, &mut fetched, budget, 1), 1);
    let entries = work_under_lock(&mut a, lock, &p);
    assert_ne!(a.lock_digest(lock), base);
    let pages = 1 + fetch_base(&a, lock, &mut fetched, budget, usize::MAX);
    assert!(pages > 2, "{pages} pages: main.c alone is 200 kB");
    a.checkpoint();

    // `b` takes a's ordered state (placeholders for the lock's members), as a state transfer
    // does, and lacks the content.
    let mut b = R::open(db.path());
    b.svc.put_objs(all_objects(&a.svc)).expect("put_objs");
    b.svc
        .set_object_count(a.svc.object_count())
        .expect("object count");
    assert_eq!(b.digest(), a.digest());
    b.checkpoint();
    assert_eq!(b.svc.lock_state_digest(lock), None);
    assert!(b
        .svc
        .lock_base_page(lock, BaseCursor::START, budget)
        .is_none());
    let infos = b.svc.lock_infos();
    assert!(
        matches!(infos.as_slice(), [i] if i.lock == lock && i.base == base && i.frozen.is_none()),
        "{infos:?}"
    );

    // Wrong content is refused with nothing changed: a flipped data byte, a missing member.
    let mut tampered = fetched.objects.clone();
    let file = tampered
        .iter_mut()
        .find(|(_, o)| o.pieces.len() > 2)
        .expect("a member with data");
    file.1.pieces[2][7] ^= 1;
    assert!(b.svc.lock_install_base(lock, tampered).is_err());
    let mut short = fetched.objects.clone();
    short.pop();
    assert!(b.svc.lock_install_base(lock, short).is_err());
    assert_eq!(b.svc.lock_state_digest(lock), None);

    b.svc
        .lock_install_base(lock, fetched.objects.clone())
        .expect("install");
    assert_eq!(b.lock_digest(lock), base);
    // Durable at once: a crash before the next checkpoint keeps it.
    b.reopen(true);
    assert_eq!(b.svc.lock_state_digest(lock), Some(base));
    b.replay(lock, &entries);
    let end = a.lock_digest(lock);
    assert_eq!(b.lock_digest(lock), end);
    // b serves the lock's content to others in turn.
    let mut again = BaseAssembly::default();
    fetch_base(&b, lock, &mut again, budget, usize::MAX);
    assert!(
        again.objects == fetched.objects,
        "the same activation values"
    );

    let (cert, checker) = certificate(lock, entries.len() as u64, end);
    // The same agreed times and checkpoint numbers from here on, as ordering gives them.
    (b.now, b.seq) = (a.now, a.seq);
    for r in [&mut a, &mut b] {
        r.svc.set_lock_cert_checker(checker.clone());
        assert_eq!(r.release(lock, Some(cert.clone())), Ok(FsReply::Done));
    }
    assert_eq!(a.checkpoint(), b.checkpoint());
    assert!(all_objects(&a.svc) == all_objects(&b.svc), "same objects");
    assert!(!b.svc.state_suspect());
}

#[test]
fn a_replica_that_missed_the_last_entry_merges_anyway_and_state_transfer_repairs_it() {
    let (da, db) = (temp_dir(), temp_dir());
    let mut a = R::open(da.path());
    let mut b = R::open(db.path());
    let (lock, p) = locked_project(&mut a);
    locked_project(&mut b);
    let entries = work_under_lock(&mut a, lock, &p);
    // `b` never got the copy and what followed it.
    let missed = entries
        .iter()
        .rposition(|e| matches!(e.op, FsOp::CopyRange { .. }))
        .expect("a copy");
    b.replay(lock, &entries[..missed]);
    let end = a.lock_digest(lock);
    assert_ne!(b.lock_digest(lock), end);
    let (cert, checker) = certificate(lock, entries.len() as u64, end);
    for r in [&mut a, &mut b] {
        r.svc.set_lock_cert_checker(checker.clone());
        r.release(lock, Some(cert.clone())).expect("release");
    }
    let d = a.checkpoint();
    assert_ne!(b.checkpoint(), d, "the lagging replica's digest differs");
    assert_eq!(b.state(lock), None, "merged all the same");
    assert_eq!(
        b.events().last(),
        Some(&LockEvent::Merged { lock, epoch: 0 })
    );
    // The repair: an ordinary state transfer of the objects that differ.
    let differ: Vec<(u64, AbstractObject)> = all_objects(&a.svc)
        .into_iter()
        .filter(|(i, o)| b.svc.get_obj(*i).ok().as_ref() != Some(o))
        .collect();
    assert!(!differ.is_empty());
    b.svc.put_objs(differ).expect("put_objs");
    assert_eq!(b.digest(), d);
}

#[test]
fn lock_timeline_on_btrfs() {
    let Some(m) = common::btrfs_mount() else {
        return;
    };
    rollback_on(&m.dir("rollback"));
    restart_on(&m.dir("restart"));
}

mod sequences {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// One step of a replica's life under a lock. Directories and names are small numbers
    /// (directory 0..3: `/proj`, `/proj/src`, `/proj/docs`; names `n0`..`n3`), so that
    /// entries meet each other's objects.
    #[derive(Clone, Debug)]
    enum Step {
        Create(u8, u8),
        Write(u8, u8, u16),
        Rename(u8, u8, u8),
        Remove(u8, u8),
        Mkdir(u8, u8),
        /// Another client's ordered requests outside the lock.
        Ordered(u8),
        Checkpoint,
        /// Speculation undone (one replica only): back to the newest checkpoint, and the
        /// ordered requests since run again; the entries stay.
        Rollback,
        /// A restart, clean or a crash (one replica only): the ordered requests since the
        /// newest checkpoint run again, and the lock's log restarts and replays from its
        /// first entry.
        Reopen(bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3u8, 0..4u8).prop_map(|(d, f)| Step::Create(d, f)),
            (0..3u8, 0..4u8, 1..200u16).prop_map(|(d, f, k)| Step::Write(d, f, k)),
            (0..3u8, 0..3u8, 0..4u8).prop_map(|(a, b, f)| Step::Rename(a, b, f)),
            (0..3u8, 0..4u8).prop_map(|(d, f)| Step::Remove(d, f)),
            (0..3u8, 0..4u8).prop_map(|(d, f)| Step::Mkdir(d, f)),
            (0..4u8).prop_map(Step::Ordered),
            Just(Step::Checkpoint),
            Just(Step::Rollback),
            any::<bool>().prop_map(Step::Reopen),
        ]
    }

    fn name(f: u8) -> Vec<u8> {
        format!("n{f}").into_bytes()
    }

    fn ordered(r: &mut R, p: &Proj, k: u8) {
        r.ordered(FsOp::Write {
            h: p.other,
            offset: k as u64 * 7,
            data: vec![k; 7],
        })
        .expect("write");
        let name = format!("o{k}").into_bytes();
        r.ordered(FsOp::Create {
            dir: ROOT,
            name,
            mode: 0o644,
            how: CreateHow::Unchecked,
        })
        .expect("create");
    }

    /// The straight run: every step's entry built from what the entries before it
    /// answered (handles of created files), executed, and recorded; the checkpoint digests.
    fn reference(
        r: &mut R,
        lock: LockId,
        p: &Proj,
        steps: &[Step],
    ) -> (Vec<Option<Entry>>, Vec<Digest>) {
        let dirs = [p.proj, p.src, p.docs];
        let mut files: BTreeMap<(u8, u8), Handle> = BTreeMap::new();
        let mut entries = Vec::new();
        let mut digests = Vec::new();
        for (k, s) in steps.iter().enumerate() {
            let op = match *s {
                Step::Create(d, f) => Some(FsOp::Create {
                    dir: dirs[d as usize],
                    name: name(f),
                    mode: 0o644,
                    how: CreateHow::Unchecked,
                }),
                Step::Write(d, f, len) => Some(FsOp::Write {
                    // A file not there now: the old one in its place (a handle from
                    // outside would need agreement).
                    h: files.get(&(d, f)).copied().unwrap_or(p.main),
                    offset: len as u64 * 997,
                    data: vec![len as u8; len as usize * 401],
                }),
                Step::Rename(a, b, f) => Some(FsOp::Rename {
                    from_dir: dirs[a as usize],
                    from_name: name(f),
                    to_dir: dirs[b as usize],
                    to_name: name(f),
                    no_replace: false,
                }),
                Step::Remove(d, f) => Some(FsOp::Remove {
                    dir: dirs[d as usize],
                    name: name(f),
                }),
                Step::Mkdir(d, f) => Some(FsOp::Mkdir {
                    dir: dirs[d as usize],
                    name: name(f),
                    mode: 0o755,
                }),
                Step::Ordered(o) => {
                    ordered(r, p, o);
                    None
                }
                Step::Checkpoint => {
                    digests.push(r.checkpoint());
                    None
                }
                Step::Rollback | Step::Reopen(_) => None,
            };
            let Some(op) = op else {
                entries.push(None);
                continue;
            };
            let e = Entry {
                op,
                time_ns: ENTRY_NS + 1_000 * k as u64,
            };
            let result = r.locked_ok(lock, &e);
            match (s, result) {
                (Step::Create(d, f), Ok(FsReply::Entry { handle, .. })) => {
                    files.insert((*d, *f), handle);
                }
                (Step::Remove(d, f), Ok(_)) => {
                    files.remove(&(*d, *f));
                }
                (Step::Rename(a, b, f), Ok(_)) if a != b => {
                    let moved = files.remove(&(*a, *f));
                    files.remove(&(*b, *f));
                    if let Some(h) = moved {
                        files.insert((*b, *f), h);
                    }
                }
                _ => {}
            }
            entries.push(Some(e));
        }
        (entries, digests)
    }

    /// The same steps with the rollbacks and restarts.
    fn perturbed(
        r: &mut R,
        lock: LockId,
        p: &Proj,
        steps: &[Step],
        entries: &[Option<Entry>],
    ) -> Vec<Digest> {
        let mut digests = Vec::new();
        let mut log: Vec<Entry> = Vec::new();
        let mut since: Vec<u8> = Vec::new();
        let mut now_at_checkpoint = r.now;
        for (s, e) in steps.iter().zip(entries) {
            if let Some(e) = e {
                let _ = r.locked_ok(lock, e);
                log.push(e.clone());
                continue;
            }
            match *s {
                Step::Ordered(o) => {
                    ordered(r, p, o);
                    since.push(o);
                }
                Step::Checkpoint => {
                    digests.push(r.checkpoint());
                    since.clear();
                    now_at_checkpoint = r.now;
                }
                Step::Rollback | Step::Reopen(_) => {
                    let before = r.lock_digest(lock);
                    match *s {
                        Step::Reopen(crash) => {
                            r.reopen(crash);
                            r.svc.lock_restart(lock).expect("lock restart");
                            assert_eq!(r.lock_digest(lock), r.base(lock));
                            r.replay(lock, &log);
                        }
                        _ => r.svc.rollback_to(r.seq).expect("rollback"),
                    }
                    r.svc.check_lock_invariants();
                    assert_eq!(r.lock_digest(lock), before);
                    r.now = now_at_checkpoint;
                    for &o in &since {
                        ordered(r, p, o);
                    }
                }
                _ => unreachable!("entries are handled above"),
            }
        }
        digests
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any sequence of entries, ordered requests and checkpoints gives the same ordered
        /// checkpoint digests and lock state on a replica that also rolls back, restarts
        /// and crashes (restarting and replaying the lock's log each time) as on one that
        /// does not; after the release both merge into the same state.
        #[test]
        fn entries_rollbacks_and_restarts_agree(steps in proptest::collection::vec(step(), 1..24)) {
            let (da, db) = (
                common::shm_dir().unwrap_or_else(temp_dir),
                common::shm_dir().unwrap_or_else(temp_dir),
            );
            let mut a = R::open(da.path());
            let mut b = R::open(db.path());
            let (lock, p) = locked_project(&mut b);
            prop_assert_eq!(locked_project(&mut a), (lock, p));
            let (entries, want) = reference(&mut b, lock, &p, &steps);
            let got = perturbed(&mut a, lock, &p, &steps, &entries);
            prop_assert_eq!(got, want);
            let end = b.lock_digest(lock);
            prop_assert_eq!(a.lock_digest(lock), end);
            let (cert, checker) = certificate(lock, entries.len() as u64, end);
            for r in [&mut a, &mut b] {
                r.svc.set_lock_cert_checker(checker.clone());
                r.release(lock, Some(cert.clone())).expect("release");
            }
            prop_assert_eq!(a.checkpoint(), b.checkpoint());
            prop_assert!(all_objects(&a.svc) == all_objects(&b.svc));
        }
    }
}

/// PostMark's pattern under a lock (files created, written, removed, their slots reused),
/// with ordered checkpoints in between as a busy replica takes them, then a crash: the
/// restart must bring the lock back to its activation and the replay to the same end.
#[test]
fn a_crash_after_creates_and_removes_with_checkpoints_between_restarts_the_lock() {
    for crash_after in [5usize, 17, 40, 77] {
        let dir = temp_dir();
        let mut r = R::open(dir.path());
        let (lock, p) = locked_project(&mut r);
        let base = r.base(lock);
        let mut entries = Vec::new();
        let mut live: Vec<Vec<u8>> = Vec::new();
        for i in 0..crash_after {
            r.now += 1_000;
            let op = if i % 3 == 2 && !live.is_empty() {
                let name = live.remove((i * 7) % live.len());
                FsOp::Remove { dir: p.docs, name }
            } else {
                let name = n(&format!("f{i}"));
                live.push(name.clone());
                FsOp::Create {
                    dir: p.docs,
                    name,
                    mode: 0o644,
                    how: CreateHow::Unchecked,
                }
            };
            let e = Entry { op, time_ns: r.now };
            let res = r.locked_ok(lock, &e);
            entries.push(e);
            if let Ok(FsReply::Entry { handle, .. }) = res {
                r.now += 1_000;
                let w = Entry {
                    op: FsOp::Write {
                        h: handle,
                        offset: 0,
                        data: vec![b'x'; 5000 + i * 10],
                    },
                    time_ns: r.now,
                };
                r.locked_ok(lock, &w).expect("write");
                entries.push(w);
            }
            checkpoint_now_and_then(&mut r, i);
        }
        crash_restart_and_replay(
            &mut r,
            lock,
            base,
            &entries,
            &format!("crash at {crash_after}"),
        );
    }
}

/// Every tenth step, ordered work and a checkpoint while the lock is active (a busy
/// replica saves its table meanwhile).
fn checkpoint_now_and_then(r: &mut R, step: usize) {
    if step % 10 == 9 {
        r.ordered(FsOp::GetAttr { h: ROOT }).expect("getattr");
        r.checkpoint();
    }
}

/// A crash, then the restart brings the lock back to `base` and the replay of `entries`
/// to where it was.
fn crash_restart_and_replay(r: &mut R, lock: LockId, base: Digest, entries: &[Entry], what: &str) {
    let end = r.lock_digest(lock);
    r.reopen(true);
    if let Err(e) = r.svc.lock_restart(lock) {
        panic!("lock restart after a crash ({what}): {e}");
    }
    assert_eq!(r.lock_digest(lock), base, "{what}");
    r.replay(lock, entries);
    assert_eq!(r.lock_digest(lock), end, "{what}");
}

/// Files made by ordered calls just before the lock (as `-o locks=auto` does: the lock
/// follows a burst of creates), then written and removed under it, then a crash.
#[test]
fn a_crash_after_removing_files_made_before_the_lock_restarts_the_lock() {
    for (checkpoint_between, crash_after) in [(true, 8usize), (false, 8), (true, 30), (false, 30)] {
        let dir = temp_dir();
        let mut r = R::open(dir.path());
        let p = populate(&mut r);
        let mut before = Vec::new();
        for i in 0..16 {
            let h = r.entry(FsOp::Create {
                dir: p.docs,
                name: n(&format!("b{i}")),
                mode: 0o644,
                how: CreateHow::Unchecked,
            });
            r.ordered(FsOp::Write {
                h,
                offset: 0,
                data: vec![b'b'; 3000 + i],
            })
            .expect("write");
            before.push(h);
        }
        if checkpoint_between {
            r.checkpoint();
        }
        let lock = r.lock(p.proj, LockUnit::Subtree);
        r.checkpoint();
        assert!(matches!(r.state(lock), Some(LockState::Active { .. })));
        let base = r.base(lock);
        let mut entries = Vec::new();
        for i in 0..crash_after {
            r.now += 1_000;
            let op = match i % 3 {
                0 => FsOp::Write {
                    h: before[i % 16],
                    offset: 100,
                    data: vec![b'a'; 700],
                },
                1 => FsOp::Remove {
                    dir: p.docs,
                    name: n(&format!("b{}", i % 16)),
                },
                _ => FsOp::Create {
                    dir: p.docs,
                    name: n(&format!("new{i}")),
                    mode: 0o644,
                    how: CreateHow::Unchecked,
                },
            };
            let e = Entry { op, time_ns: r.now };
            let _ = r.locked_ok(lock, &e);
            entries.push(e);
            checkpoint_now_and_then(&mut r, i);
        }
        let what =
            format!("checkpoint before the lock {checkpoint_between}, crash at {crash_after}");
        crash_restart_and_replay(&mut r, lock, base, &entries, &what);
    }
}
