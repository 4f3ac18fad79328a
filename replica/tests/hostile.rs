//! Hostile input: arbitrary and mutated bytes into frame decoding, `Authenticator::open` and a
//! replica core; oversized, garbled and unauthenticated frames and a client whose key is not in
//! the config against real `bftfs-replica` processes; hostile names and forbidden requests
//! against the file service.
//!
//! A counting allocator records the largest single allocation a thread asks for, so "refused
//! without allocating" is checked, not assumed.

mod common;

use common::{call, call_as, create, create_op, entry, mkdir_within, Cluster, CALL_TIMEOUT};
use proptest::prelude::*;
use replica::config::{
    generate_seeded, generate_with_os_random, ClientSecrets, ClusterKeys, KeyBytes, ProtocolConfig,
};
use replica::core::{Action, Event, Replica};
use replica::driver::client::ClientHandle;
use replica::wire::{
    self, AgreementMessage, Authenticator, Checkpoint, ClientMessage, Commit, FrameReader, Message,
    PrePrepare, Prepare, Principal, Proposal, ReplicaId, Request, SeqNo, Signer,
    StateTransferMessage, Timestamp, View, ViewChangeMessage, FRAME_BYTES_MAX,
};
use state_abstraction::fs::{
    self as fsvc, Caller, CreateHow, FileService, FsError, FsOp, FsReply, FsRequest, FsResult,
    Handle, SetAttrs,
};
use state_abstraction::kv::KvService;
use state_abstraction::{ClientId, Digest};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Largest allocation, per thread

struct Counting;

thread_local! {
    // Const-initialised, no destructor: safe to touch from inside the allocator.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(|l| l.get()))
}

// ---------------------------------------------------------------------------------------------
// Keys and messages

fn test_keys() -> ClusterKeys {
    let addresses = (0..4).map(|i| format!("127.0.0.1:{}", 7100 + i)).collect();
    generate_seeded(1, addresses, &[ClientId(1)], ProtocolConfig::default(), 11).expect("keygen")
}

/// A sample of valid messages from replica 1 (and client 1), to mutate.
fn sample_messages(keys: &ClusterKeys) -> Vec<Message> {
    let r1 = Signer::from_secret(&keys.replicas[1].signing_key.0);
    let c1 = Signer::from_secret(&keys.clients[0].signing_key.0);
    let d = Digest::default();
    let request = c1.sign(Request {
        client: ClientId(1),
        timestamp: Timestamp(5),
        operation: b"op".to_vec(),
        read_only: false,
    });
    let r0 = Signer::from_secret(&keys.replicas[0].signing_key.0);
    let batch = replica::wire::Batch {
        requests: vec![request.clone()],
    };
    let pre = r0.sign(PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.digest(),
        nondet: 7u64.to_le_bytes().to_vec(),
        primary: ReplicaId(0),
        history: d,
    });
    vec![
        Message::Agreement(AgreementMessage::Prepare(r1.sign(Prepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: d,
            replica: ReplicaId(1),
        }))),
        Message::Agreement(AgreementMessage::Commit(r1.sign(Commit {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: d,
            replica: ReplicaId(1),
        }))),
        Message::Agreement(AgreementMessage::Checkpoint(r1.sign(Checkpoint {
            seq: SeqNo(8),
            service_root: d,
            replies_digest: d,
            replica: ReplicaId(1),
        }))),
        Message::Agreement(AgreementMessage::PrePrepare(Proposal {
            pre_prepare: pre,
            batch,
        })),
        Message::Agreement(AgreementMessage::FetchCommitted {
            from: SeqNo(1),
            to: SeqNo(9),
        }),
        Message::Client(ClientMessage::Request(request)),
        Message::ViewChange(ViewChangeMessage::QueryNewView { view: View(3) }),
        Message::StateTransfer(StateTransferMessage::GetNode {
            seq: SeqNo(0),
            level: 0,
            index: 0,
        }),
        Message::StateTransfer(StateTransferMessage::Piece {
            seq: SeqNo(0),
            index: 1,
            piece: 0,
            bytes: vec![1, 2, 3],
        }),
    ]
}

/// A body shaped like a frame body (sender, tags, message) whose tag list claims `count`
/// entries: bincode's standard varint is 0xfd followed by a little-endian u64.
fn body_claiming_tags(count: u64) -> Vec<u8> {
    let mut out = wire::encode(&Principal::Replica(ReplicaId(1))).expect("encode");
    out.push(0xfd);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&[0u8; 40]);
    out
}

#[test]
fn huge_length_claims_are_refused_without_allocating() {
    let keys = test_keys();
    let a0 = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
    // A frame header of 4 GiB - 1 and one just over the limit: refused from the header.
    for len in [u32::MAX, FRAME_BYTES_MAX as u32 + 1] {
        let (r, big) = largest_allocation(|| {
            let mut reader = FrameReader::new();
            reader.push(&len.to_be_bytes());
            reader.push(&[0u8; 64]);
            reader.next_frame()
        });
        assert!(
            matches!(r, Err(wire::WireError::FrameTooLarge { .. })),
            "{len}: {r:?}"
        );
        assert!(
            big < 64 << 10,
            "header of {len} made a {big}-byte allocation"
        );
        assert!(wire::frame_length(len.to_be_bytes()).is_err());
    }
    // Collection lengths of 2^60 and 2^32 inside a body: refused by the decoder's limit.
    // serde preallocates at most 1 MiB for a sequence whatever length it claims (its
    // "cautious" size hint), so that much is the bound, and it is freed at once.
    for count in [1u64 << 60, 1 << 32, u64::MAX] {
        let body = body_claiming_tags(count);
        let (r, big) = largest_allocation(|| a0.open(&body));
        assert!(r.is_err(), "a tag list of {count} entries was accepted");
        assert!(
            big <= PREALLOCATION_MAX,
            "a claimed tag list of {count} entries made a {big}-byte allocation"
        );
    }
    // The same inside a message: a batch claiming 2^60 requests, bytes claiming 2^60 bytes.
    for prefix in [&[1u8, 0][..], &[3u8, 7][..]] {
        let mut bytes = prefix.to_vec();
        bytes.push(0xfd);
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let (r, big) = largest_allocation(|| wire::decode::<Message>(&bytes));
        assert!(r.is_err());
        assert!(
            big <= PREALLOCATION_MAX,
            "{prefix:?}: {big}-byte allocation"
        );
    }
    assert!(
        a0.counters
            .garbled
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3,
        "refusals are counted"
    );
}

/// The most a decode may allocate up front for input that is far shorter: serde's cap on
/// preallocating a sequence from its claimed length.
const PREALLOCATION_MAX: usize = 1 << 20;

fn replica0(keys: &ClusterKeys) -> Replica<KvService> {
    Replica::new(
        Arc::new(keys.config.clone()),
        &keys.replicas[0],
        KvService::new(),
    )
    .expect("replica")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Arbitrary bytes, split into arbitrary chunks, through the frame reader and `open`.
    #[test]
    fn arbitrary_bytes_never_panic_or_allocate_without_bound(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        cut in 0usize..2048,
    ) {
        let keys = test_keys();
        let a0 = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
        let (r, big) = largest_allocation(|| {
            let mut reader = FrameReader::new();
            let cut = cut.min(bytes.len());
            reader.push(&bytes[..cut]);
            reader.push(&bytes[cut..]);
            while let Ok(Some(frame)) = reader.next_frame() {
                prop_assert!(frame.len() <= FRAME_BYTES_MAX);
                let _ = a0.open(&frame);
            }
            let _ = a0.open(&bytes);
            let _ = wire::decode::<Message>(&bytes);
            Ok(())
        });
        r?;
        // A few KiB of input may not make the decoder allocate megabytes.
        prop_assert!(big <= PREALLOCATION_MAX, "{} input bytes made a {}-byte allocation", bytes.len(), big);
    }

    /// Valid frames with bytes flipped, cut off or appended: `open` refuses them or (when only
    /// bytes outside what the MAC covers changed, such as another receiver's tag) yields the
    /// very message that was sealed.
    #[test]
    fn mutated_frames_are_refused_or_unchanged(
        which in 0usize..9,
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in proptest::option::of(any::<usize>()),
        extra in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let keys = test_keys();
        let a1 = Authenticator::for_replica(&keys.config, &keys.replicas[1]);
        let a0 = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
        let message = sample_messages(&keys).swap_remove(which);
        let to = [Principal::Replica(ReplicaId(0)), Principal::Replica(ReplicaId(2))];
        let frame = a1.seal(&message, &to).expect("seal");
        let mut body = frame[4..].to_vec();
        for (at, x) in &flips {
            let i = at % body.len();
            body[i] ^= x;
        }
        if let Some(c) = cut {
            body.truncate(c % (body.len() + 1));
        }
        body.extend_from_slice(&extra);
        if let Ok(opened) = a0.open(&body) {
            prop_assert_eq!(opened.sender(), Principal::Replica(ReplicaId(1)));
            prop_assert_eq!(opened.message(), &message);
        }
    }

    /// Messages that a Byzantine replica or client with valid keys could send: encodings of
    /// valid messages with bytes changed, sealed properly, fed to a replica core. The core must
    /// neither panic nor halt (halting is for its own storage failing).
    #[test]
    fn authenticated_garbage_is_handled(
        which in 0usize..9,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        from in 1u32..4,
    ) {
        let keys = test_keys();
        let message = sample_messages(&keys).swap_remove(which);
        let mut bytes = wire::encode(&message).expect("encode");
        for (at, x) in &flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        let Ok(mutated) = wire::decode::<Message>(&bytes) else { return Ok(()) };
        let sender = Authenticator::for_replica(&keys.config, &keys.replicas[from as usize]);
        let receiver = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
        let Ok(frame) = sender.seal(&mutated, &[Principal::Replica(ReplicaId(0))]) else { return Ok(()) };
        let mut core = replica0(&keys);
        let mut actions = Vec::new();
        core.step(Event::Tick { now_ns: 1_000_000_000 }, &mut actions);
        if let Ok(authenticated) = receiver.open(&frame[4..]) {
            core.step(Event::Message(authenticated), &mut actions);
        }
        core.step(Event::Tick { now_ns: 2_000_000_000 }, &mut actions);
        prop_assert!(!actions.iter().any(|a| matches!(a, Action::Halt { .. })), "the core halted on a peer's message");
    }
}

// ---------------------------------------------------------------------------------------------
// Real processes

/// Whether the peer closed the connection within `limit` (reads until EOF or reset).
fn closed_by_peer(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn oversized_garbled_and_unauthenticated_frames_are_dropped_and_the_replica_keeps_serving() {
    let mut cluster = Cluster::start("bftfs-hostile");
    let client = cluster.client();
    let first = create(&client, Handle::ROOT, "before");
    let target = cluster.config.replicas[0].address.clone();
    let rejected_before = cluster.status(0).expect("status").frames_rejected;

    // Frames over the limit: the header alone gets the connection closed; the replica never
    // waits for (or buffers) the announced body.
    for len in [u32::MAX, FRAME_BYTES_MAX as u32 + 1] {
        let mut s = TcpStream::connect(&target).expect("connect");
        s.write_all(&len.to_be_bytes()).expect("header");
        s.write_all(&[0xab; 1024]).expect("some body");
        assert!(
            closed_by_peer(&mut s, Duration::from_secs(10)),
            "a {len}-byte frame header did not close the connection"
        );
    }
    // Garbage of a legal length, a frame claiming a 2^60-entry tag list, and a frame sealed
    // with keys the cluster does not know: dropped, counted, connection kept or not — but the
    // replica goes on serving.
    let stranger = generate_with_os_random(
        1,
        cluster
            .config
            .replicas
            .iter()
            .map(|r| r.address.clone())
            .collect(),
        &[ClientId(1)],
        ProtocolConfig::default(),
    )
    .expect("keygen");
    let forged = Authenticator::for_replica(&stranger.config, &stranger.replicas[1])
        .seal(
            &sample_messages(&stranger)[0],
            &[Principal::Replica(ReplicaId(0))],
        )
        .expect("seal");
    let mut s = TcpStream::connect(&target).expect("connect");
    let mut garbage = vec![0u8; 3000];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    for body in [
        garbage.clone(),
        body_claiming_tags(1 << 60),
        forged[4..].to_vec(),
        Vec::new(),
    ] {
        let _ = s.write_all(&wire::frame(&body).expect("frame"));
    }
    drop(s);

    // The replica is alive and the cluster still serves the real client, all four replicas
    // executing.
    let second = create(&client, Handle::ROOT, "after");
    assert_ne!(first, second);
    assert!(cluster.alive(0), "replica 0 exited:\n{}", cluster.log(0));
    cluster.wait_agreed();
    // The hostile connections are served by their own tasks, and the status snapshot is
    // refreshed every 200 ms, so the count may trail the client's reply: poll for it.
    let start = Instant::now();
    let counted = loop {
        let now = cluster.status(0).map(|s| s.frames_rejected).unwrap_or(0);
        if now >= rejected_before + 4 || start.elapsed() > Duration::from_secs(20) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Two oversized headers plus at least the first hostile frame on the garbage connection
    // (the replica may close it there); usually all six.
    assert!(
        counted >= rejected_before + 3,
        "rejections counted: {rejected_before} then {counted}"
    );
    let log = cluster.log(0);
    assert!(
        log.contains("closing a connection that sent a bad frame"),
        "the oversized frames are logged:\n{log}"
    );
    assert!(
        log.contains("did not authenticate"),
        "the unauthenticated frames are logged:\n{log}"
    );
}

#[test]
fn a_client_whose_key_is_not_in_the_config_is_refused() {
    let cluster = Cluster::start("bftfs-outsider");
    let client = cluster.client();
    let dir = mkdir_within(&client, "d", 0o777, CALL_TIMEOUT, String::new);
    // Two outsiders: a new client id, and one claiming the real client's id; both with keys
    // of their own making.
    let mut rng = replica::rng::Rng::new(99);
    let mut key = || {
        let mut k = [0u8; 32];
        rng.fill(&mut k);
        KeyBytes(k)
    };
    for (id, name) in [
        (ClientId(7), "from-stranger"),
        (ClientId(1), "from-impostor"),
    ] {
        let secrets = ClientSecrets {
            id,
            signing_key: key(),
            mac_keys: cluster
                .config
                .replicas
                .iter()
                .map(|r| (r.id, key()))
                .collect(),
        };
        let outsider =
            ClientHandle::start(cluster.config.clone(), secrets).expect("outsider client");
        let op = create_op(dir, name);
        let r = call_as(&outsider, Caller::root(), op, Duration::from_secs(4));
        assert!(
            r.is_err(),
            "{name}: an outsider's request was answered: {r:?}"
        );
        drop(outsider);
        // The legit client still works, and the outsider's file was never made.
        let look = call(
            &client,
            FsOp::Lookup {
                dir,
                name: name.as_bytes().to_vec(),
            },
        );
        assert_eq!(look.err(), Some(FsError::NoEnt), "{name} exists");
    }
    create(&client, dir, "from-client");
    let all = cluster.wait_agreed();
    assert!(
        all.iter().all(|s| s.frames_rejected > 0),
        "every replica counted the outsiders' frames: {all:?}"
    );
    // Nothing of the outsiders reached any replica's disk either.
    for i in 0..4 {
        let tree = cluster.dir.path().join(format!("data-{i}/fs/tree/root/d"));
        let names: Vec<String> = std::fs::read_dir(&tree)
            .expect("tree")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["from-client".to_string()], "replica {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Permissions: the same refusal from every replica

const USER: Caller = Caller {
    uid: 1000,
    gid: 1000,
    groups: Vec::new(),
};

/// Root makes a 0644 file and a 0755 directory; uid 1000 then tries what it may not.
fn forbidden_script(exec: &mut dyn FnMut(Caller, FsOp) -> FsResult) -> Vec<FsResult> {
    let mut out = Vec::new();
    let file = entry(
        exec(
            Caller::root(),
            FsOp::Create {
                dir: Handle::ROOT,
                name: b"owned-by-root".to_vec(),
                mode: 0o644,
                how: CreateHow::Guarded,
            },
        ),
        "create",
    );
    exec(
        Caller::root(),
        FsOp::Write {
            h: file,
            offset: 0,
            data: b"root's data".to_vec(),
        },
    )
    .expect("root writes");
    let dir = entry(
        exec(
            Caller::root(),
            FsOp::Mkdir {
                dir: Handle::ROOT,
                name: b"root-dir".to_vec(),
                mode: 0o755,
            },
        ),
        "mkdir",
    );
    let chmod = SetAttrs {
        mode: Some(0o777),
        ..SetAttrs::default()
    };
    let chown = SetAttrs {
        uid: Some(1000),
        ..SetAttrs::default()
    };
    let shrink = SetAttrs {
        size: Some(0),
        ..SetAttrs::default()
    };
    let ops = vec![
        FsOp::Write {
            h: file,
            offset: 0,
            data: b"user was here".to_vec(),
        },
        FsOp::SetAttr {
            h: file,
            set: chmod.clone(),
        },
        FsOp::SetAttr {
            h: file,
            set: chown,
        },
        FsOp::SetAttr {
            h: file,
            set: shrink,
        },
        FsOp::Create {
            dir,
            name: b"intruder".to_vec(),
            mode: 0o644,
            how: CreateHow::Guarded,
        },
        FsOp::Remove {
            dir: Handle::ROOT,
            name: b"owned-by-root".to_vec(),
        },
        FsOp::Rename {
            from_dir: Handle::ROOT,
            from_name: b"owned-by-root".to_vec(),
            to_dir: dir,
            to_name: b"x".to_vec(),
            no_replace: false,
        },
        FsOp::SetAttr { h: dir, set: chmod },
        FsOp::Read {
            h: file,
            offset: 0,
            count: 100,
        },
    ];
    for op in ops {
        out.push(exec(USER, op));
    }
    out.push(exec(
        Caller::root(),
        FsOp::Read {
            h: file,
            offset: 0,
            count: 100,
        },
    ));
    out
}

fn check_forbidden(results: &[FsResult]) {
    let errs: Vec<Option<FsError>> = results.iter().map(|r| r.as_ref().err().copied()).collect();
    assert_eq!(
        errs[..8],
        [
            Some(FsError::Access), // write to a 0644 file of root's
            Some(FsError::Perm),   // chmod by a non-owner
            Some(FsError::Perm),   // chown by a non-root
            Some(FsError::Access), // truncate without write permission
            Some(FsError::Access), // create in a 0755 directory of root's
            Some(FsError::Access), // remove from it
            Some(FsError::Access), // rename out of it
            Some(FsError::Perm),   // chmod of root's directory
        ],
        "{results:?}"
    );
    assert!(
        matches!(&results[8], Ok(FsReply::Read { .. })),
        "others may read a 0644 file: {:?}",
        results[8]
    );
    match &results[9] {
        Ok(FsReply::Read { data, .. }) => assert_eq!(data, b"root's data"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn forbidden_requests_get_the_same_refusal_on_every_backend_and_replica() {
    // The file service on two different backends: identical replies and identical state.
    let dirs = [
        tempfile::tempdir_in("/var/tmp").expect("tmp"),
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tmp"),
    ];
    let mut roots = Vec::new();
    let mut replies = Vec::new();
    for d in &dirs {
        let mut svc = FileService::open(&d.path().join("fs")).expect("open");
        let mut now = 1_000_000_000u64;
        let results = forbidden_script(&mut |caller, op| {
            now += 1000;
            svc.apply(&FsRequest { caller, op }, now)
        });
        check_forbidden(&results);
        replies.push(fsvc::encode(&results));
        roots.push(svc.root_digest().expect("digest"));
    }
    assert_eq!(replies[0], replies[1], "replies differ between backends");
    assert_eq!(roots[0], roots[1], "states differ between backends");

    // And through a real cluster: the ordered reply needs 2f+1 matching replies, and all four
    // replicas end at the same executed sequence number.
    let cluster = Cluster::start("bftfs-perm");
    let client = cluster.client();
    let results = forbidden_script(&mut |caller, op| {
        call_as(&client, caller, op, Duration::from_secs(30)).expect("answer")
    });
    check_forbidden(&results);
    assert_eq!(
        fsvc::encode(
            &results
                .iter()
                .map(|r| r.as_ref().err().copied())
                .collect::<Vec<_>>()
        ),
        fsvc::encode(&replies_errs(&replies[0]))
    );
    cluster.wait_agreed();
}

fn replies_errs(encoded: &[u8]) -> Vec<Option<FsError>> {
    let results: Vec<FsResult> = fsvc::decode(encoded).expect("decode");
    results.iter().map(|r| r.as_ref().err().copied()).collect()
}

// ---------------------------------------------------------------------------------------------
// Names

/// Every file under `dir` (relative paths), with contents.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readdir").flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).expect("stat");
            let rel = p
                .strip_prefix(dir)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                out.push((rel + "/", Vec::new()));
                stack.push(p);
            } else if meta.file_type().is_symlink() {
                out.push((
                    rel,
                    std::fs::read_link(&p)
                        .expect("readlink")
                        .to_string_lossy()
                        .into_owned()
                        .into_bytes(),
                ));
            } else {
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_names_never_reach_outside_the_data_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(outside.join("sub")).expect("mkdir");
    std::fs::write(outside.join("victim"), b"untouched").expect("write");
    std::fs::write(outside.join("sub/victim2"), b"untouched too").expect("write");
    let data = tmp.path().join("data");
    let mut svc = FileService::open(&data.join("fs")).expect("open");
    let before = snapshot(&outside);
    let mut now = 1_000_000_000u64;
    let mut run = |svc: &mut FileService, op: FsOp| {
        now += 1;
        svc.apply(
            &FsRequest {
                caller: Caller::root(),
                op,
            },
            now,
        )
    };
    let abs = outside.join("victim").to_string_lossy().into_owned();
    let dir = entry(
        run(
            &mut svc,
            FsOp::Mkdir {
                dir: Handle::ROOT,
                name: b"d".to_vec(),
                mode: 0o777,
            },
        ),
        "mkdir d",
    );
    let file = entry(
        run(
            &mut svc,
            FsOp::Create {
                dir,
                name: b"f".to_vec(),
                mode: 0o666,
                how: CreateHow::Guarded,
            },
        ),
        "create f",
    );
    let hostile: Vec<Vec<u8>> = vec![
        b"..".to_vec(),
        b".".to_vec(),
        b"../outside".to_vec(),
        b"../../outside/victim".to_vec(),
        b"../../../../../../../../tmp".to_vec(),
        abs.clone().into_bytes(),
        b"/etc/passwd".to_vec(),
        b"a/b".to_vec(),
        b"/".to_vec(),
        b"x\0y".to_vec(),
        b"\0".to_vec(),
        b"victim\0../..".to_vec(),
        Vec::new(),
        vec![b'a'; 256],
        vec![b'a'; 4096],
        vec![b'.'; 300],
    ];
    // `.` and `..` are lookups inside the abstract tree (the directory, its parent); the
    // parent of the root is the root.
    for (from, name, want) in [
        (dir, &b".."[..], Handle::ROOT),
        (Handle::ROOT, b"..", Handle::ROOT),
        (dir, b".", dir),
    ] {
        match run(
            &mut svc,
            FsOp::Lookup {
                dir: from,
                name: name.to_vec(),
            },
        ) {
            Ok(FsReply::Entry { handle, .. }) => {
                assert_eq!(handle, want, "lookup {name:?} in {from:?}")
            }
            Err(e) => assert!(matches!(e, FsError::Inval | FsError::NoEnt), "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    for name in &hostile {
        let lookup = if name == b".." || name == b"." {
            vec![]
        } else {
            vec![FsOp::Lookup {
                dir,
                name: name.clone(),
            }]
        };
        let ops = lookup.into_iter().chain([
            FsOp::Lookup {
                dir,
                name: [name.as_slice(), b"/x"].concat(),
            },
            FsOp::Create {
                dir,
                name: name.clone(),
                mode: 0o644,
                how: CreateHow::Unchecked,
            },
            FsOp::Mkdir {
                dir,
                name: name.clone(),
                mode: 0o755,
            },
            FsOp::Symlink {
                dir,
                name: name.clone(),
                target: abs.clone().into_bytes(),
            },
            FsOp::Remove {
                dir,
                name: name.clone(),
            },
            FsOp::Rmdir {
                dir,
                name: name.clone(),
            },
            FsOp::Rename {
                from_dir: dir,
                from_name: b"f".to_vec(),
                to_dir: dir,
                to_name: name.clone(),
                no_replace: false,
            },
            FsOp::Rename {
                from_dir: dir,
                from_name: name.clone(),
                to_dir: dir,
                to_name: b"g".to_vec(),
                no_replace: false,
            },
            FsOp::Link {
                h: file,
                dir,
                name: name.clone(),
            },
        ]);
        for op in ops {
            let what = format!("{op:?}");
            let r = run(&mut svc, op);
            let e = r.as_ref().err().copied();
            assert!(
                matches!(
                    e,
                    Some(FsError::Inval | FsError::NameTooLong | FsError::NoEnt)
                ),
                "{}: {r:?}",
                &what[..what.len().min(120)]
            );
        }
    }
    // Names that are legal but look like escapes: kept as plain names inside the tree.
    for name in [
        &b"...."[..],
        b"..a",
        b"a..",
        b"-rf",
        b"\\..\\..",
        b"\xff\xfe",
    ] {
        match run(
            &mut svc,
            FsOp::Create {
                dir,
                name: name.to_vec(),
                mode: 0o644,
                how: CreateHow::Guarded,
            },
        ) {
            Ok(FsReply::Entry { handle, .. }) => {
                run(
                    &mut svc,
                    FsOp::Write {
                        h: handle,
                        offset: 0,
                        data: b"inside".to_vec(),
                    },
                )
                .expect("write");
            }
            other => panic!("{name:?}: {other:?}"),
        }
    }
    // A symlink pointing outside is stored, never followed: writing "through" its name opens
    // nothing outside.
    let link = entry(
        run(
            &mut svc,
            FsOp::Symlink {
                dir,
                name: b"escape".to_vec(),
                target: abs.clone().into_bytes(),
            },
        ),
        "symlink escape",
    );
    let _ = run(
        &mut svc,
        FsOp::Create {
            dir,
            name: b"escape".to_vec(),
            mode: 0o644,
            how: CreateHow::Unchecked,
        },
    );
    let _ = run(
        &mut svc,
        FsOp::Write {
            h: link,
            offset: 0,
            data: b"overwritten".to_vec(),
        },
    );
    let _ = run(
        &mut svc,
        FsOp::SetAttr {
            h: link,
            set: SetAttrs {
                size: Some(0),
                ..SetAttrs::default()
            },
        },
    );
    // A symlink whose target climbs out, then used as if it were a directory.
    match run(
        &mut svc,
        FsOp::Symlink {
            dir,
            name: b"up".to_vec(),
            target: b"../../../../outside".to_vec(),
        },
    ) {
        Ok(FsReply::Entry { .. }) => {}
        other => panic!("{other:?}"),
    }
    let _ = run(
        &mut svc,
        FsOp::Create {
            dir,
            name: b"up".to_vec(),
            mode: 0o644,
            how: CreateHow::Unchecked,
        },
    );
    if let Ok(FsReply::Entry { handle, .. }) = run(
        &mut svc,
        FsOp::Lookup {
            dir,
            name: b"up".to_vec(),
        },
    ) {
        let r = run(
            &mut svc,
            FsOp::Create {
                dir: handle,
                name: b"victim".to_vec(),
                mode: 0o644,
                how: CreateHow::Unchecked,
            },
        );
        assert!(r.is_err(), "a symlink served as a directory: {r:?}");
        let r = run(
            &mut svc,
            FsOp::Remove {
                dir: handle,
                name: b"victim".to_vec(),
            },
        );
        assert!(r.is_err(), "a symlink served as a directory: {r:?}");
    }
    svc.flush().expect("flush");
    drop(svc);
    assert_eq!(
        snapshot(&outside),
        before,
        "something outside the data directory changed"
    );
    // Everything the service made is inside its data directory, and nothing there has a name
    // that was refused.
    let inside = snapshot(&data);
    for (path, _) in &inside {
        assert!(!path.contains('\0'));
        for part in path.split('/') {
            assert!(part.len() <= 255, "{path}");
        }
    }
    assert!(
        inside
            .iter()
            .any(|(p, c)| p.ends_with("d/....") && c == b"inside"),
        "{inside:?}"
    );
}

#[test]
fn a_slow_loris_does_not_stop_the_replica() {
    // A peer that announces a legal frame and sends it a byte at a time (or never) holds one
    // connection, not the replica.
    let cluster = Cluster::start("bftfs-loris");
    let client = cluster.client();
    // The cluster is up (listening) once it has answered.
    create(&client, Handle::ROOT, "before-idle");
    let target = cluster.config.replicas[0].address.clone();
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..32 {
        let mut s = TcpStream::connect(&target).expect("connect");
        s.write_all(&(FRAME_BYTES_MAX as u32).to_be_bytes())
            .expect("header");
        s.write_all(&[1, 2, 3]).expect("a little");
        idle.push(s);
    }
    for i in 0..5 {
        create(&client, Handle::ROOT, &format!("while-idle-{i}"));
    }
    cluster.wait_agreed();
    drop(idle);
}

#[test]
fn a_root_squashed_client_is_nobody_at_every_replica() {
    // The identity a call states is the client's word (NFS AUTH_SYS); a client configured
    // with root_squash cannot act as root however it fills the caller in.
    let cluster = Cluster::start_configured("bftfs-squash", |config| {
        config.clients[0].squash = state_abstraction::fs::Squash::Root;
    });
    let client = cluster.client();
    let make = |name: &str| FsOp::Create {
        dir: Handle::ROOT,
        name: name.as_bytes().to_vec(),
        mode: 0o644,
        how: CreateHow::Guarded,
    };
    // The root directory is root's and 0755: nobody may not create in it.
    assert_eq!(
        call_as(&client, Caller::root(), make("as-root"), CALL_TIMEOUT).expect("answer"),
        Err(FsError::Access)
    );
    // Every replica refused it: the file system holds nothing.
    match call(
        &client,
        FsOp::ReadDir {
            dir: Handle::ROOT,
            cookie: 0,
            count: 4096,
            plus: false,
        },
    ) {
        Ok(FsReply::ReadDir { entries, .. }) => assert!(entries.is_empty(), "{entries:?}"),
        other => panic!("readdir: {other:?}"),
    }
    let log = cluster.log(0);
    assert!(
        log.contains("squashed"),
        "the replica logs the mapping:\n{log}"
    );
}
