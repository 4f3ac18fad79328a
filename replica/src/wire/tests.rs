use super::*;
use crate::config::{generate_seeded, ClusterKeys, ProtocolConfig};
use serde::Serialize;

#[test]
fn byte_strings_encode_as_sequences_of_bytes_did() {
    // Digests and signatures are over encodings: the faster form must not change them.
    for len in [0usize, 1, 127, 128, 300, 70_000] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let request = Request {
            client: ClientId(9),
            timestamp: Timestamp(len as u64),
            operation: bytes.clone(),
            read_only: false,
        };
        #[derive(Serialize)]
        struct PlainRequest {
            client: ClientId,
            timestamp: Timestamp,
            operation: Vec<u8>,
            read_only: bool,
        }
        let plain = PlainRequest {
            client: ClientId(9),
            timestamp: Timestamp(len as u64),
            operation: bytes,
            read_only: false,
        };
        let encoded = encode(&request).expect("encodes");
        assert_eq!(encoded, encode(&plain).expect("encodes"));
        assert_eq!(decode::<Request>(&encoded).expect("decodes"), request);
    }
}

pub(crate) fn keys() -> ClusterKeys {
    let addresses = (0..4).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
    generate_seeded(1, addresses, &[ClientId(1)], ProtocolConfig::default(), 7).expect("keygen")
}

fn strip(frame: Vec<u8>) -> Vec<u8> {
    frame[FRAME_HEADER_BYTES..].to_vec()
}

#[test]
fn seal_open_round_trip_and_tampering() {
    let keys = keys();
    let a0 = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
    let a1 = Authenticator::for_replica(&keys.config, &keys.replicas[1]);
    let a2 = Authenticator::for_replica(&keys.config, &keys.replicas[2]);
    let signer = Signer::from_secret(&keys.replicas[0].signing_key.0);
    let prepare = signer.sign(Prepare {
        view: View(1),
        seq: SeqNo(2),
        batch_digest: Digest::default(),
        replica: ReplicaId(0),
    });
    let message = Message::Agreement(AgreementMessage::Prepare(prepare.clone()));
    let sealed = a0
        .seal(&message, &[Principal::Replica(ReplicaId(1))])
        .expect("seal");
    let opened = a1.open(&strip(sealed.clone())).expect("open");
    assert_eq!(opened.sender(), Principal::Replica(ReplicaId(0)));
    assert_eq!(opened.message(), &message);
    // Not addressed to replica 2.
    assert!(matches!(
        a2.open(&strip(sealed.clone())),
        Err(WireError::NoTag)
    ));
    // A flipped bit anywhere is refused.
    let mut bad = strip(sealed);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(a1.open(&bad).is_err());
    // A prepare signed by replica 0 but sent by replica 2 is refused.
    let forged = a2
        .seal(&message, &[Principal::Replica(ReplicaId(1))])
        .expect("seal");
    assert!(matches!(
        a1.open(&strip(forged)),
        Err(WireError::ForbiddenSender(..))
    ));
    // A corrupted signature is refused.
    let mut corrupt = prepare;
    corrupt.signature.0[0] ^= 1;
    let m = Message::Agreement(AgreementMessage::Prepare(corrupt));
    let sealed = a0
        .seal(&m, &[Principal::Replica(ReplicaId(1))])
        .expect("seal");
    assert!(matches!(
        a1.open(&strip(sealed)),
        Err(WireError::BadSignature(_))
    ));
    assert_eq!(a1.counters.rejected(), 3);
    assert_eq!(a2.counters.rejected(), 1);
}

#[test]
fn commits_are_checked_in_certificates_not_on_receipt() {
    use std::sync::atomic::Ordering::Relaxed;
    let keys = keys();
    let auth: Vec<Authenticator> = (0..4)
        .map(|i| Authenticator::for_replica(&keys.config, &keys.replicas[i]))
        .collect();
    let to1 = [Principal::Replica(ReplicaId(1))];
    let client = Signer::from_secret(&keys.clients[0].signing_key.0);
    let batch = Batch {
        requests: vec![client.sign(Request {
            client: ClientId(1),
            timestamp: Timestamp(1),
            operation: vec![1],
            read_only: false,
        })],
    };
    let pre_prepare = Signer::from_secret(&keys.replicas[0].signing_key.0).sign(PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.digest(),
        nondet: vec![],
        primary: ReplicaId(0),
        history: Digest::default(),
    });
    let commit = |i: usize| {
        Signer::from_secret(&keys.replicas[i].signing_key.0).sign(Commit {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: pre_prepare.body.batch_digest,
            replica: ReplicaId(i as u32),
        })
    };
    let mut forged = commit(3);
    forged.signature.1[7] ^= 4;

    // A commit with a broken signature under a valid MAC is accepted as it is...
    let m = Message::Agreement(AgreementMessage::Commit(forged.clone()));
    let sealed = strip(auth[3].seal(&m, &to1).expect("seal"));
    let opened = auth[1].open(&sealed).expect("commit with a valid MAC");
    assert_eq!(opened.message(), &m);
    assert!(opened.stripped_commits().is_empty());
    // ... but not under a broken MAC, nor from another sender than the replica it names.
    let mut bad_mac = sealed;
    let last = bad_mac.len() - 1;
    bad_mac[last] ^= 1;
    assert!(matches!(auth[1].open(&bad_mac), Err(WireError::BadMac(_))));
    let relayed = strip(auth[2].seal(&m, &to1).expect("seal"));
    assert!(matches!(
        auth[1].open(&relayed),
        Err(WireError::ForbiddenSender(..))
    ));
    assert_eq!(auth[1].counters.bad_signature.load(Relaxed), 0);

    let certificate = |commits: Vec<Signed<Commit>>| {
        Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
            proposal: Proposal {
                pre_prepare: pre_prepare.clone(),
                batch: batch.clone(),
            },
            commits,
        })))
    };
    let committed_commits = |m: &Message| match m {
        Message::Agreement(AgreementMessage::Committed(c)) => c.commits.clone(),
        other => panic!("{other:?}"),
    };
    // 2f+1 valid commits and a forged one: the forged one is dropped and counted.
    let m = certificate(vec![commit(0), forged.clone(), commit(1), commit(2)]);
    let opened = auth[1]
        .open(&strip(auth[2].seal(&m, &to1).expect("seal")))
        .expect("certificate");
    assert_eq!(
        committed_commits(opened.message()),
        vec![commit(0), commit(1), commit(2)]
    );
    assert_eq!(opened.stripped_commits(), &[ReplicaId(3)]);
    assert_eq!(auth[1].counters.bad_signature.load(Relaxed), 1);
    // 2f valid and a forged one: 2f are left, which the core refuses (its quorum check,
    // tested in core::tests).
    let m = certificate(vec![commit(0), commit(1), forged]);
    let opened = auth[1]
        .open(&strip(auth[2].seal(&m, &to1).expect("seal")))
        .expect("certificate");
    assert_eq!(committed_commits(opened.message()).len(), 2);
    assert_eq!(auth[1].counters.bad_signature.load(Relaxed), 2);
    // A certificate naming one replica twice is refused before any commit is verified.
    let m = certificate(vec![commit(0), commit(1), commit(1), commit(2)]);
    assert!(matches!(
        auth[1].open(&strip(auth[2].seal(&m, &to1).expect("seal"))),
        Err(WireError::Decode(_))
    ));
    // The proposal inside a certificate is still checked strictly.
    let mut m = certificate(vec![commit(0), commit(1), commit(2)]);
    if let Message::Agreement(AgreementMessage::Committed(c)) = &mut m {
        c.proposal.pre_prepare.signature.0[0] ^= 1;
    }
    assert!(matches!(
        auth[1].open(&strip(auth[2].seal(&m, &to1).expect("seal"))),
        Err(WireError::BadSignature("pre_prepare"))
    ));
}

#[test]
fn frames_refuse_oversize_before_body() {
    let mut reader = FrameReader::new();
    reader.push(&((FRAME_BYTES_MAX as u32) + 1).to_be_bytes());
    assert!(matches!(
        reader.next_frame(),
        Err(WireError::FrameTooLarge { .. })
    ));
    let mut reader = FrameReader::new();
    let f = frame(b"hello").expect("frame");
    reader.push(&f[..6]);
    assert_eq!(reader.next_frame().expect("ok"), None);
    reader.push(&f[6..]);
    assert_eq!(reader.next_frame().expect("ok"), Some(b"hello".to_vec()));
}

#[test]
fn batch_digest_is_checked() {
    let keys = keys();
    let a0 = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
    let a1 = Authenticator::for_replica(&keys.config, &keys.replicas[1]);
    let client = Signer::from_secret(&keys.clients[0].signing_key.0);
    let primary = Signer::from_secret(&keys.replicas[0].signing_key.0);
    let request = client.sign(Request {
        client: ClientId(1),
        timestamp: Timestamp(1),
        operation: vec![1],
        read_only: false,
    });
    let batch = Batch {
        requests: vec![request],
    };
    let pp = primary.sign(PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: Batch::default().digest(),
        nondet: vec![],
        primary: ReplicaId(0),
        history: Digest::default(),
    });
    let m = Message::Agreement(AgreementMessage::PrePrepare(Proposal {
        pre_prepare: pp,
        batch,
    }));
    let sealed = a0
        .seal(&m, &[Principal::Replica(ReplicaId(1))])
        .expect("seal");
    assert!(matches!(
        a1.open(&strip(sealed)),
        Err(WireError::BadBatchDigest)
    ));
}

/// The chain choice of a `Resolve` (`LockCertVerifier::choose`): the longest end the holder
/// signed among 2f+1 valid reports; a report the holder's signature does not back, a forged
/// replica signature and a duplicate reporter count for nothing; between two chains at one
/// k (a forking holder) more reporters win, then the smaller digest.
#[test]
fn resolve_chooses_the_longest_chain_the_holder_signed() {
    let keys = keys();
    let verifier = LockCertVerifier::new(&keys.config);
    let holder = Signer::from_secret(&keys.clients[0].signing_key.0);
    let lock = state_abstraction::LockId(3);
    let base = Digest([5; 32]);
    let subject = state_abstraction::ResolveSubject {
        lock,
        epoch: 1,
        holder: ClientId(1),
        base,
    };
    let anchor = lock_anchor(lock, 1, &base);
    // Two chains from the anchor: entries 1..=3 on one, a different entry 2 on the other.
    let entry = |k: u64, prev: Digest, op: &[u8]| LockEntry {
        holder: ClientId(1),
        lock,
        epoch: 1,
        k,
        prev,
        time_ns: k,
        op_digest: lock_op_digest(op),
    };
    let mut main = vec![anchor];
    let mut entries = Vec::new();
    for k in 1..=3 {
        let e = entry(k, main[k as usize - 1], b"main");
        main.push(lock_chain_next(&main[k as usize - 1], &e));
        entries.push(holder.sign(e));
    }
    let fork = entry(2, main[1], b"fork");
    let fork_chain = lock_chain_next(&main[1], &fork);
    let fork = holder.sign(fork);
    let report = |r: u32, k: u64, chain: Digest, top: Option<Signed<LockEntry>>| {
        Signer::from_secret(&keys.replicas[r as usize].signing_key.0).sign(LockReport {
            replica: ReplicaId(r),
            lock,
            epoch: 1,
            k,
            chain,
            top,
        })
    };
    let resolve =
        |reports: Vec<Signed<LockReport>>| verifier.choose(&LockResolution { reports }, &subject);
    let choose = |reports: Vec<Signed<LockReport>>| {
        let r = resolve(reports)?;
        Some((r.point.k, r.point.chain))
    };
    let at = |r: u32, k: usize| report(r, k as u64, main[k], Some(entries[k - 1].clone()));
    // The longest valid report wins, even when only one replica has it.
    assert_eq!(
        choose(vec![at(0, 1), at(1, 1), at(2, 3)]),
        Some((3, main[3]))
    );
    // An empty log reports the anchor and no entry.
    assert_eq!(
        choose(vec![
            report(0, 0, anchor, None),
            report(1, 0, anchor, None),
            at(2, 1)
        ]),
        Some((1, main[1]))
    );
    // Fewer than 2f+1, or the same replica twice: nothing.
    assert_eq!(choose(vec![at(0, 2), at(1, 2)]), None);
    assert_eq!(choose(vec![at(0, 2), at(1, 2), at(1, 3)]), None);
    // A replica claiming a longer log than the holder signed is not believed: no entry, an
    // entry at another k, or a chain the entry does not give.
    let claims = [
        report(3, 9, Digest([9; 32]), None),
        report(3, 9, main[3], Some(entries[2].clone())),
        report(3, 3, Digest([9; 32]), Some(entries[2].clone())),
    ];
    for claim in claims {
        assert_eq!(
            choose(vec![at(0, 2), at(1, 2), at(2, 2), claim]),
            Some((2, main[2]))
        );
        // And without a third valid report, nothing.
        assert_eq!(
            choose(vec![at(0, 2), at(1, 2), report(3, 9, main[3], None)]),
            None
        );
    }
    // A forged replica signature counts for nothing.
    let mut forged = at(2, 3);
    forged.body.replica = ReplicaId(3);
    assert_eq!(choose(vec![at(0, 1), at(1, 1), forged]), None);
    // An entry not signed by the holder counts for nothing.
    let other = Signer::from_secret(&keys.replicas[0].signing_key.0);
    let unsigned = report(2, 2, main[2], Some(other.sign(entry(2, main[1], b"main"))));
    assert_eq!(
        choose(vec![at(0, 1), at(1, 1), at(3, 1), unsigned]),
        Some((1, main[1]))
    );
    // A forking holder: two chains at k = 2; more reporters win, then the smaller digest.
    let forked = |r: u32| report(r, 2, fork_chain, Some(fork.clone()));
    assert_eq!(
        choose(vec![forked(0), forked(1), at(2, 2)]),
        Some((2, fork_chain))
    );
    assert_eq!(
        choose(vec![forked(0), at(1, 2), at(2, 2)]),
        Some((2, main[2]))
    );
    // Both forks reported: the holder equivocated; one chain only: nothing to show.
    assert!(resolve(vec![forked(0), at(1, 2), at(2, 2)]).is_some_and(|r| r.equivocation));
    assert!(resolve(vec![at(0, 2), at(1, 2), at(2, 3)]).is_some_and(|r| !r.equivocation));
    let smaller = fork_chain.min(main[2]);
    assert_eq!(
        choose(vec![forked(0), at(1, 2), at(2, 1), at(3, 1)]),
        Some((2, smaller))
    );
    // Reports about another lock or epoch do not count.
    let mut elsewhere = at(2, 3);
    elsewhere.body.lock = state_abstraction::LockId(4);
    assert_eq!(choose(vec![at(0, 1), at(1, 1), elsewhere]), None);
}
