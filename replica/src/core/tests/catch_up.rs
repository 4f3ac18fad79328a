//! Catching up on committed batches from peers.

use super::*;
use crate::core::Notification;
use crate::wire::{CommitCertificate, SeqNo};
/// Commits are not signature-checked on receipt (the MAC names their sender), so a forged one
/// counts toward a local commit and lands in the commit certificate; a replica catching up
/// from that certificate drops it and needs 2f+1 valid commits besides, which the spares
/// collected after committing provide.
#[test]
fn forged_commit_is_counted_locally_and_stripped_from_a_relayed_certificate() {
    let mut h = Harness::new();
    let (_, proposal, _) = h.propose(1, put("a", "1"));
    let b = proposal.pre_prepare.body.clone();
    let r = |i: u32| Principal::Replica(ReplicaId(i));
    h.deliver(
        r(0),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal.clone())),
    );
    let p2 = h.replica_signer(2).sign(Prepare {
        view: b.view,
        seq: b.seq,
        batch_digest: b.batch_digest,
        replica: ReplicaId(2),
    });
    h.deliver(r(2), 1, &Message::Agreement(AgreementMessage::Prepare(p2)));
    let commit = |h: &Harness, i: u32| h.commit_of(i, &b);
    let (c0, c1, c2) = (commit(&h, 0), commit(&h, 1), commit(&h, 2));
    let c3_forged = forged(commit(&h, 3));

    // Replica 1 commits on its own commit, replica 0's and replica 3's forged one.
    h.deliver(
        r(0),
        1,
        &Message::Agreement(AgreementMessage::Commit(c0.clone())),
    );
    let actions = h.deliver(
        r(3),
        1,
        &Message::Agreement(AgreementMessage::Commit(c3_forged.clone())),
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
        )),
        "{actions:?}"
    );
    // Replica 2's commit arrives late and joins the certificate as a spare.
    let actions = h.deliver(r(2), 1, &Message::Agreement(AgreementMessage::Commit(c2)));
    assert!(actions.is_empty(), "{actions:?}");
    let actions = h.deliver(
        r(3),
        1,
        &Message::Agreement(AgreementMessage::FetchCommitted {
            from: SeqNo(1),
            to: SeqNo(1),
        }),
    );
    let [Action::Send {
        to: ReplicaId(3),
        message: committed @ Message::Agreement(AgreementMessage::Committed(cert)),
    }] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    let mut signers: Vec<u32> = cert.commits.iter().map(|c| c.body.replica.0).collect();
    signers.sort_unstable();
    assert_eq!(signers, vec![0, 1, 2, 3]);

    // Only 2f valid commits besides the forged one: refused, and not held against the
    // relayer (it could not know).
    let short = Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
        proposal: proposal.clone(),
        commits: vec![c0, c1, c3_forged],
    })));
    let actions = h.deliver(r(1), 2, &short);
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(h.replicas[2].last_executed(), SeqNo(0));
    assert_eq!(h.replicas[2].metrics().misbehaviour, 0);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(h.auth[&r(2)].counters.bad_signature.load(Relaxed), 1);

    // The certificate with the spare: the forged commit is dropped, 2f+1 valid remain.
    for to in [2, 3] {
        let actions = h.deliver(r(1), to, committed);
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
            )),
            "{actions:?}"
        );
        assert_eq!(h.replicas[to].last_executed(), SeqNo(1));
    }
    assert_eq!(h.auth[&r(2)].counters.bad_signature.load(Relaxed), 2);
    assert_eq!(h.auth[&r(3)].counters.bad_signature.load(Relaxed), 1);
}

/// A batch committed with a faulty replica's forged commit in its only quorum: no correct
/// replica holds 2f+1 valid commit signatures for it. A lagging replica still catches up
/// without the faulty one, on the word of f+1 relayers.
#[test]
fn a_commit_certificate_short_of_valid_signatures_counts_once_f_plus_one_relayers_vouch() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let proposal = proposals_in(&h.deliver(CLIENT, 0, &request_message(&request)))
        .pop()
        .expect("a proposal");
    let b = proposal.pre_prepare.body.clone();
    let commit = |h: &Harness, i: u32| h.commit_of(i, &b);
    let forged = forged(commit(&h, 3));
    let short = Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
        proposal: proposal.clone(),
        commits: vec![commit(&h, 0), commit(&h, 1), forged],
    })));
    let r = |i: u32| Principal::Replica(ReplicaId(i));
    // One relayer, even twice, is not enough: it may be the faulty one.
    for _ in 0..2 {
        h.deliver(r(1), 2, &short);
        assert_eq!(h.replicas[2].last_executed(), SeqNo(0));
    }
    // A relayer vouching for another batch at that sequence number does not add up with it.
    let other = h.request(2, put("b", "2"));
    let mut wrong = proposals_in(&h.deliver(CLIENT, 0, &request_message(&other)))
        .pop()
        .expect("a second proposal");
    wrong.pre_prepare = h.replica_signer(0).sign(PrePrepare {
        seq: b.seq,
        ..wrong.pre_prepare.body.clone()
    });
    let wrong = Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
        proposal: wrong,
        commits: vec![commit(&h, 0)],
    })));
    h.deliver(r(3), 2, &wrong);
    assert_eq!(h.replicas[2].last_executed(), SeqNo(0));
    // A second relayer with the same proposal: f+1 = 2 vouch for it.
    let actions = h.deliver(r(0), 2, &short);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
        )),
        "{actions:?}"
    );
    assert_eq!(h.replicas[2].last_executed(), SeqNo(1));
}
