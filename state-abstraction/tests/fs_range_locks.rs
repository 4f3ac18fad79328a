//! fcntl/flock range locks in the replicated file state (`range_locks.rs`): POSIX semantics
//! against a byte-by-byte model, answers to other clients, leases judged by agreed time, the
//! bounds, input a faulty client may send, and that the table is ordered state like any
//! other (same operations, same digest; checkpoints, rollback, restart, state transfer).

mod common;

use common::temp_dir;
use proptest::prelude::*;
use state_abstraction::fs::locks::{LockState, LockUnit};
use state_abstraction::fs::range_locks::*;
use state_abstraction::fs::*;
use state_abstraction::{AbstractObject, ClientId, Service};
use std::path::Path;

const ROOT: Handle = Handle::ROOT;
const SEC: u64 = 1_000_000_000;
const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);
use RangeLockKind::{Read, Write};

/// A file service driven through `Service::execute`, as a replica runs it: the client is the
/// authenticated one, the time the agreed one.
struct T(common::Fs);

impl std::ops::Deref for T {
    type Target = common::Fs;
    fn deref(&self) -> &common::Fs {
        &self.0
    }
}

impl std::ops::DerefMut for T {
    fn deref_mut(&mut self) -> &mut common::Fs {
        &mut self.0
    }
}

impl T {
    fn open(dir: &Path) -> T {
        T(common::Fs::open(dir))
    }

    fn call(&mut self, client: ClientId, op: FsOp, read_only: bool) -> FsResult {
        self.execute_as(client, op, read_only)
    }

    fn run(&mut self, client: ClientId, op: FsOp) -> FsResult {
        self.call(client, op, false)
    }

    fn file(&mut self, name: &str) -> Handle {
        self.create(ROOT, name)
    }

    #[allow(clippy::too_many_arguments)]
    fn set(
        &mut self,
        client: ClientId,
        h: Handle,
        owner: u64,
        start: u64,
        end: u64,
        kind: Option<RangeLockKind>,
        lease_ms: u32,
    ) -> FsResult {
        self.run(
            client,
            FsOp::SetRangeLock {
                h,
                owner,
                start,
                end,
                kind,
                pid: 4242,
                lease_ms,
            },
        )
    }

    fn test(
        &mut self,
        client: ClientId,
        h: Handle,
        owner: u64,
        start: u64,
        end: u64,
        kind: RangeLockKind,
    ) -> Option<RangeLockInfo> {
        match self.run(
            client,
            FsOp::TestRangeLock {
                h,
                owner,
                start,
                end,
                kind,
            },
        ) {
            Ok(FsReply::RangeLock { conflict }) => conflict,
            other => panic!("test: {other:?}"),
        }
    }
}

const GRANTED: FsResult = Ok(FsReply::RangeLock { conflict: None });

fn refused(r: &FsResult) -> bool {
    matches!(r, Ok(FsReply::RangeLock { conflict: Some(_) }))
}

#[test]
fn other_clients_conflict_and_see_the_lock_without_its_pid() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let f = t.file("f");
    assert_eq!(t.set(A, f, 7, 0, 99, Some(Write), 30_000), GRANTED);
    // Non-overlapping ranges both succeed; overlapping write locks conflict.
    assert_eq!(t.set(B, f, 7, 100, 199, Some(Write), 30_000), GRANTED);
    let r = t.set(B, f, 7, 50, 149, Some(Read), 30_000);
    assert_eq!(
        r,
        Ok(FsReply::RangeLock {
            conflict: Some(RangeLockInfo {
                start: 0,
                end: 99,
                kind: Write,
                pid: 0
            })
        }),
        "the same owner value on another client is another owner, and its pid means nothing here"
    );
    // Another owner of the same client sees the pid.
    assert_eq!(
        t.test(A, f, 8, 10, 10, Read),
        Some(RangeLockInfo {
            start: 0,
            end: 99,
            kind: Write,
            pid: 4242
        })
    );
    // The owner itself conflicts with nothing of its own.
    assert_eq!(t.test(A, f, 7, 0, 99, Write), None);
    // Read locks share.
    let g = t.file("g");
    assert_eq!(t.set(A, g, 1, 0, OFFSET_MAX, Some(Read), 30_000), GRANTED);
    assert_eq!(t.set(B, g, 1, 0, OFFSET_MAX, Some(Read), 30_000), GRANTED);
    assert!(refused(&t.set(B, g, 1, 5, 5, Some(Write), 30_000)));
    // Unlocking frees it for the other client.
    assert_eq!(t.set(A, g, 1, 0, OFFSET_MAX, None, 30_000), GRANTED);
    assert_eq!(t.set(B, g, 1, 5, 5, Some(Write), 30_000), GRANTED);
}

#[test]
fn a_dead_clients_locks_go_when_its_lease_runs_out_by_agreed_time() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let f = t.file("f");
    assert_eq!(t.set(A, f, 1, 0, 0, Some(Write), 2_000), GRANTED);
    let granted_at = t.now;
    t.now = granted_at + SEC;
    assert!(refused(&t.set(B, f, 1, 0, 0, Some(Write), 2_000)));
    // A renewal keeps it: the lease runs from the renewal.
    assert_eq!(
        t.run(A, FsOp::RenewRangeLocks { lease_ms: 2_000 }),
        Ok(FsReply::RangeLeases { held: 1 })
    );
    let renewed_at = t.now;
    t.now = granted_at + 2 * SEC;
    assert!(refused(&t.set(B, f, 1, 0, 0, Some(Write), 2_000)));
    // No renewal: by the agreed time of the next operation the lease is over.
    t.now = renewed_at + 2 * SEC;
    assert_eq!(t.set(B, f, 1, 0, 0, Some(Write), 2_000), GRANTED);
    assert_eq!(
        t.run(A, FsOp::RenewRangeLocks { lease_ms: 2_000 }),
        Ok(FsReply::RangeLeases { held: 0 }),
        "a client learns that its locks are gone"
    );
    // The lease asked for is bounded below: 1 ms is 1 s.
    let g = t.file("g");
    assert_eq!(t.set(A, g, 1, 0, 0, Some(Write), 1), GRANTED);
    t.now += SEC / 2;
    assert!(refused(&t.set(B, g, 1, 0, 0, Some(Write), 1)));
}

#[test]
fn a_faulty_client_can_only_drop_its_own_locks_and_is_bounded() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let f = t.file("f");
    assert_eq!(t.set(A, f, 1, 0, 9, Some(Write), 30_000), GRANTED);
    // B names A's owner: its own (empty) set of locks is what it drops or unlocks.
    assert_eq!(
        t.run(
            B,
            FsOp::DropRangeLocks {
                h: f,
                owners: vec![1]
            }
        ),
        Ok(FsReply::Done)
    );
    assert_eq!(t.set(B, f, 1, 0, 9, None, 30_000), GRANTED);
    assert!(
        t.test(B, f, 2, 0, 0, Read).is_some(),
        "A's lock is still there"
    );
    // Absurd input is refused without effect, and never panics.
    for (start, end) in [(5, 4), (0, u64::MAX), (u64::MAX, u64::MAX)] {
        assert_eq!(
            t.set(B, f, 1, start, end, Some(Write), 30_000),
            Err(FsError::Inval)
        );
    }
    assert_eq!(
        t.run(
            B,
            FsOp::DropRangeLocks {
                h: f,
                owners: vec![0; DROP_OWNERS_MAX + 1]
            }
        ),
        Err(FsError::Inval)
    );
    let stale = Handle {
        index: f.index,
        generation: f.generation + 1,
    };
    assert_eq!(
        t.set(B, stale, 1, 0, 0, Some(Write), 30_000),
        Err(FsError::Stale)
    );
    let nowhere = Handle {
        index: 1 << 40,
        generation: 1,
    };
    assert_eq!(
        t.set(B, nowhere, 1, 0, 0, Some(Write), 30_000),
        Err(FsError::Stale)
    );
    // Range locks are ordered only (leases are judged by agreed time).
    assert_eq!(
        t.call(B, FsOp::RenewRangeLocks { lease_ms: 1_000 }, true),
        Err(FsError::BadRequest)
    );
    // A client's locks are bounded: ENOLCK past it, and the others still get theirs.
    let g = t.file("g");
    for k in 0..RANGE_LOCKS_PER_CLIENT_MAX as u64 {
        assert_eq!(t.set(B, g, 1, 2 * k, 2 * k, Some(Read), 30_000), GRANTED);
    }
    assert_eq!(
        t.set(B, g, 2, 10_000, 10_000, Some(Read), 30_000),
        Err(FsError::NoLocks)
    );
    assert_eq!(FsError::NoLocks.errno(), libc::ENOLCK);
    assert_eq!(t.set(A, g, 1, 10_000, 10_000, Some(Read), 30_000), GRANTED);
    t.svc.range_locks().check().expect("canonical");
}

fn all_objects(svc: &FileService) -> Vec<(u64, AbstractObject)> {
    (0..svc.object_count())
        .map(|i| (i, svc.get_obj(i).expect("get_obj")))
        .collect()
}

/// The same ordered operations give the same digest on two replicas; a state whose locks are
/// all gone digests as one that never had any; checkpoints, rollback, a restart and a state
/// transfer carry the table.
#[test]
fn the_table_is_ordered_state() {
    let (da, db, dc) = (temp_dir(), temp_dir(), temp_dir());
    let (mut a, mut b, mut c) = (T::open(da.path()), T::open(db.path()), T::open(dc.path()));
    let mut files = Vec::new();
    for t in [&mut a, &mut b, &mut c] {
        files.push(t.file("f"));
    }
    let f = files[0];
    assert!(files.iter().all(|&x| x == f));
    for t in [&mut a, &mut b] {
        assert_eq!(t.set(A, f, 1, 0, 9, Some(Write), 30_000), GRANTED);
        assert_eq!(t.set(B, f, 3, 20, 29, Some(Read), 30_000), GRANTED);
    }
    // c runs ordered requests at the same times without locks.
    for _ in 0..2 {
        c.run(A, FsOp::GetAttr { h: ROOT }).expect("getattr");
    }
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), c.digest());
    let before = a.svc.range_locks();
    let at_1 = a.svc.checkpoint(1).expect("checkpoint");
    // State transfer: every object of a into a fresh service.
    let dt = temp_dir();
    let mut fresh = T::open(dt.path());
    fresh
        .svc
        .set_object_count(a.svc.object_count())
        .expect("count");
    fresh.svc.put_objs(all_objects(&a.svc)).expect("put_objs");
    assert_eq!(fresh.digest(), a.digest());
    assert_eq!(fresh.svc.range_locks(), before);
    // Rollback undoes later changes of the table.
    assert_eq!(a.set(A, f, 1, 0, 9, None, 30_000), GRANTED);
    assert_ne!(a.svc.range_locks(), before);
    a.svc.rollback_to(1).expect("rollback");
    assert_eq!(a.svc.range_locks(), before);
    assert_eq!(a.digest(), at_1);
    // A restart finds it.
    drop(a);
    let mut a = T::open(da.path());
    assert_eq!(a.svc.range_locks(), before);
    // Once every lock is gone the root's header is the plain one again.
    for t in [&mut b, &mut c] {
        t.now = 1_700_000_100 * SEC;
    }
    assert_eq!(
        b.run(
            A,
            FsOp::DropRangeLocks {
                h: f,
                owners: vec![1]
            }
        ),
        Ok(FsReply::Done)
    );
    assert_eq!(b.set(B, f, 3, 0, OFFSET_MAX, None, 30_000), GRANTED);
    for _ in 0..2 {
        c.run(A, FsOp::GetAttr { h: ROOT }).expect("getattr");
    }
    assert!(b.svc.range_locks().is_empty());
    assert_eq!(b.digest(), c.digest());
    let _ = a.digest();
}

/// A range lock on a file inside another client's Zzyzx lock neither revokes it nor waits
/// for it, and the holder's own range lock there does not either.
#[test]
fn range_locks_leave_zzyzx_locks_alone() {
    let dir = temp_dir();
    let mut t = T::open(dir.path());
    let d = match t.run(
        A,
        FsOp::Mkdir {
            dir: ROOT,
            name: b"work".to_vec(),
            mode: 0o755,
        },
    ) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    let f = match t.run(
        A,
        FsOp::Create {
            dir: d,
            name: b"f".to_vec(),
            mode: 0o644,
            how: CreateHow::Guarded,
        },
    ) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    let lock = match t.run(
        A,
        FsOp::Lock {
            h: d,
            unit: LockUnit::Subtree,
        },
    ) {
        Ok(FsReply::LockPending { lock }) => lock,
        other => panic!("{other:?}"),
    };
    t.svc.checkpoint(1).expect("checkpoint");
    assert!(t.svc.masked_by(f.index).is_some());
    assert_eq!(t.set(B, f, 1, 0, 0, Some(Write), 30_000), GRANTED);
    assert_eq!(t.set(A, f, 1, 1, 1, Some(Write), 30_000), GRANTED);
    assert!(refused(&t.set(A, f, 1, 0, 0, Some(Write), 30_000)));
    let state = t.svc.locks().entry(lock).map(|e| e.state);
    assert!(
        matches!(state, Some(LockState::Active { .. })),
        "the Zzyzx lock was revoked: {state:?}"
    );
    // Entries of the lock's log never run range-lock operations.
    let op = encode(&FsRequest {
        caller: Caller::root(),
        op: FsOp::RenewRangeLocks { lease_ms: 1_000 },
    });
    let at = t.now + 1;
    assert!(matches!(
        t.svc.execute_locked(lock, &op, A, at),
        state_abstraction::LockedResult::NeedsAgreement
    ));
}

/// One owner's locks per byte, for the model.
type Bytes = [Option<RangeLockKind>; 24];

const OWNERS: [(u64, u64); 3] = [(1, 1), (1, 2), (2, 1)];

fn expand(t: &RangeLockTable) -> Vec<Bytes> {
    OWNERS
        .iter()
        .map(|&(c, o)| {
            let mut b: Bytes = [None; 24];
            for l in t.locks.iter().filter(|l| l.client == c && l.owner == o) {
                for x in l.start..=l.end.min(23) {
                    b[x as usize] = Some(l.kind);
                }
            }
            b
        })
        .collect()
}

fn op_strategy() -> impl Strategy<Value = (usize, u64, u64, Option<RangeLockKind>)> {
    (
        0..OWNERS.len(),
        0u64..24,
        0u64..8,
        prop_oneof![Just(None), Just(Some(Read)), Just(Some(Write))],
    )
        .prop_map(|(who, start, len, kind)| (who, start, (start + len).min(23), kind))
}

proptest! {
    /// The table against a byte-by-byte model of POSIX semantics: grants, refusals, the
    /// answers to tests, and the canonical form after every step.
    #[test]
    fn range_locks_follow_posix_semantics(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let file = Handle { index: 5, generation: 2 };
        let mut t = RangeLockTable::default();
        let mut model: Vec<Bytes> = vec![[None; 24]; OWNERS.len()];
        for (who, start, end, kind) in ops {
            let (client, owner) = OWNERS[who];
            let conflicting = |k: RangeLockKind, model: &Vec<Bytes>| {
                (0..OWNERS.len()).filter(|&o| o != who).any(|o| {
                    (start..=end).any(|x| match model[o][x as usize] {
                        Some(held) => held == Write || k == Write,
                        None => false,
                    })
                })
            };
            if let Some(k) = kind {
                prop_assert_eq!(
                    t.conflict(file, client, owner, start, end, k).is_some(),
                    conflicting(k, &model)
                );
            }
            let r = t.set(file, client, owner, start, end, kind, 0, 0, SEC);
            match kind {
                Some(k) if conflicting(k, &model) => {
                    prop_assert!(matches!(r, Err(RangeRefusal::Conflict(_))), "{:?}", r);
                }
                _ => {
                    prop_assert_eq!(r, Ok(()));
                    for x in start..=end {
                        model[who][x as usize] = kind;
                    }
                }
            }
            prop_assert_eq!(expand(&t), model.clone());
            prop_assert!(t.check().is_ok(), "{:?}", t.check());
        }
    }
}
