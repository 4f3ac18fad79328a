//! The fast path: speculative execution, rollback, holes, proofs of misbehaviour.

use super::*;
use crate::core::{Notification, WalRecord};
use crate::wire::{
    chain_history, history_anchor, Batch, CommitCertificate, Digest, Pom, SeqNo, View,
};
#[test]
fn backup_runs_a_pre_prepare_speculatively_and_confirms_it_on_commit() {
    let mut h = Harness::with_fast_path(true);
    // The primary persists, broadcasts and runs its own proposal at once.
    let (primary_actions, proposal, _) = h.propose(1, append("a", "1"));
    let request = proposal.batch.requests[0].clone();
    assert_eq!(spec_responses(&primary_actions).len(), 1);

    // Backup: persist, prepare, then the speculative reply carrying the primary's order.
    let message = Message::Agreement(AgreementMessage::PrePrepare(proposal.clone()));
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, &message);
    assert!(
        matches!(&actions[0], Action::Persist(WalRecord::Accepted(_))),
        "{actions:?}"
    );
    assert!(matches!(
        &actions[1],
        Action::Broadcast {
            message: Message::Agreement(AgreementMessage::Prepare(_))
        }
    ));
    let specs = spec_responses(&actions);
    assert_eq!(specs.len(), 1, "{actions:?}");
    assert_eq!(specs[0].order, proposal.pre_prepare);
    assert_eq!(
        (specs[0].reply.timestamp, specs[0].reply.result.clone()),
        (Timestamp(1), value("1"))
    );
    assert!(committed_replies(&actions).is_empty());
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Notify(Notification::Speculated { seq: SeqNo(1), .. })
    )));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::Notify(Notification::Executed { .. }))));
    assert_eq!(h.replicas[1].last_executed(), SeqNo(0));

    // Reads are not answered from speculative state.
    assert!(h.read_only(50, "a", 1).is_empty());
    // A retransmission gets the speculative reply again, not a committed one.
    let again = h.deliver(CLIENT, 1, &request_message(&request));
    assert_eq!(spec_responses(&again).len(), 1, "{again:?}");
    assert!(committed_replies(&again).is_empty());

    // Commit: the committed reply carries the speculative result; nothing runs twice. (The
    // waiting read is answered too.)
    let actions = h.commit_at(1, &proposal);
    let replies: Vec<_> = committed_replies(&actions)
        .into_iter()
        .filter(|r| !r.read_only)
        .collect();
    assert_eq!(replies.len(), 1, "{actions:?}");
    assert_eq!(replies[0].result, value("1"));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
    )));
    assert_eq!(h.replicas[1].last_executed(), SeqNo(1));
    let read = h.read_only(51, "a", 1);
    assert_eq!(
        committed_replies(&read)
            .iter()
            .map(|r| r.result.clone())
            .collect::<Vec<_>>(),
        vec![value("1")]
    );
}

#[test]
fn pre_prepare_whose_history_does_not_chain_is_not_run_speculatively() {
    let mut h = Harness::with_fast_path(true);
    let batch = Batch {
        requests: vec![h.request(1, append("a", "1"))],
    };
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&1_000u64.to_le_bytes()),
        nondet: 1_000u64.to_le_bytes().to_vec(),
        primary: ReplicaId(0),
        history: Digest([9; 32]),
    };
    let proposal = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal.clone())),
    );
    // Accepted and prepared (PBFT ignores histories), but not run.
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(spec_responses(&actions).is_empty());
    // It still commits and runs on the commit path.
    let actions = h.commit_at(1, &proposal);
    assert_eq!(committed_replies(&actions).len(), 1, "{actions:?}");
}

#[test]
fn speculation_is_rolled_back_when_another_batch_commits_at_its_sequence_number() {
    let mut h = Harness::with_fast_path(true);
    let (_, mine, message) = h.propose(1, append("a", "mine"));
    let mine = mine.batch.requests[0].clone();
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, &message);
    assert_eq!(spec_responses(&actions).len(), 1);

    // The primary equivocated: the others committed another batch at (0, 1).
    let theirs = h.request(2, append("a", "theirs"));
    let batch = Batch {
        requests: vec![theirs],
    };
    let anchor = history_anchor(&h.replicas[1].stable_checkpoint().clone());
    let nondet = 1_000u64.to_le_bytes().to_vec();
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&nondet),
        history: chain_history(&anchor, SeqNo(1), &batch.ordered_digest(&nondet), &nondet),
        nondet,
        primary: ReplicaId(0),
    };
    let other = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let commits = [0u32, 2, 3]
        .iter()
        .map(|r| {
            let b = &other.pre_prepare.body;
            h.replica_signer(*r as usize).sign(Commit {
                view: b.view,
                seq: b.seq,
                batch_digest: b.batch_digest,
                replica: ReplicaId(*r),
            })
        })
        .collect();
    let cert = CommitCertificate {
        proposal: other.clone(),
        commits,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(2)),
        1,
        &Message::Agreement(AgreementMessage::Committed(Box::new(cert))),
    );
    let rolled = actions.iter().position(|a| {
        matches!(
            a,
            Action::Notify(Notification::RolledBack {
                to: SeqNo(0),
                from: SeqNo(1)
            })
        )
    });
    let executed = actions.iter().position(
        |a| matches!(a, Action::Notify(Notification::Executed { seq: SeqNo(1), batch_digest, .. }) if *batch_digest == other.pre_prepare.body.batch_digest),
    );
    assert!(rolled.is_some() && executed > rolled, "{actions:?}");
    // The committed reply is the re-executed one; the undone append left no trace.
    let replies = committed_replies(&actions);
    assert_eq!(
        replies
            .iter()
            .map(|r| (r.timestamp, r.result.clone()))
            .collect::<Vec<_>>(),
        vec![(Timestamp(2), value("theirs"))]
    );
    let read = h.read_only(50, "a", 1);
    assert_eq!(committed_replies(&read)[0].result, value("theirs"));
    // Exactly-once survives the rollback: the undone request is new again.
    let again = h.deliver(CLIENT, 1, &request_message(&mine));
    assert!(
        spec_responses(&again).is_empty() && committed_replies(&again).is_empty(),
        "{again:?}"
    );
    assert_eq!(h.replicas[1].metrics().rollbacks, 1);
}

#[test]
fn proof_of_misbehaviour_starts_a_view_change() {
    let mut h = Harness::with_fast_path(true);
    let make = |h: &Harness, history: u8| {
        h.replica_signer(0).sign(PrePrepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: Batch::default().digest(),
            nondet: vec![],
            primary: ReplicaId(0),
            history: Digest([history; 32]),
        })
    };
    // Two identical orders prove nothing.
    let same = Pom {
        first: make(&h, 1),
        second: make(&h, 1),
    };
    let actions = h.deliver(
        CLIENT,
        2,
        &Message::Client(ClientMessage::Pom(Box::new(same))),
    );
    assert!(
        matches!(
            &actions[..],
            [Action::Notify(Notification::Misbehaviour { .. })]
        ),
        "{actions:?}"
    );
    assert_eq!(h.replicas[2].view(), View(0));
    let pom = Pom {
        first: make(&h, 1),
        second: make(&h, 2),
    };
    let actions = h.deliver(
        CLIENT,
        2,
        &Message::Client(ClientMessage::Pom(Box::new(pom))),
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Persist(WalRecord::EnteredView { view: View(1) }))),
        "{actions:?}"
    );
    assert_eq!(h.replicas[2].view(), View(1));
    assert_eq!(h.replicas[2].metrics().poms, 1);
}

#[test]
fn hole_below_a_buffered_pre_prepare_is_filled_from_the_primary_then_anyone() {
    let mut h = Harness::with_fast_path(true);
    let first = h.deliver(CLIENT, 0, &request_message(&h.request(1, append("a", "1"))));
    let second = h.deliver(CLIENT, 0, &request_message(&h.request(2, append("a", "2"))));
    let proposal = |actions: &[Action]| {
        proposals_in(actions)
            .into_iter()
            .next()
            .expect("a pre-prepare")
    };
    let (p1, p2) = (proposal(&first), proposal(&second));
    assert_eq!(
        (p1.pre_prepare.body.seq, p2.pre_prepare.body.seq),
        (SeqNo(1), SeqNo(2))
    );

    // Backup 1 gets only the second: accepted, but it cannot run before the first.
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(p2.clone())),
    );
    assert!(spec_responses(&actions).is_empty(), "{actions:?}");
    let wait = h.config.protocol.retransmit_ticks;
    let fill_holes = |actions: &[Action]| -> Vec<Option<ReplicaId>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    to,
                    message:
                        Message::Agreement(AgreementMessage::FillHole {
                            from: SeqNo(1),
                            to: SeqNo(1),
                            ..
                        }),
                } => Some(Some(*to)),
                Action::Broadcast {
                    message:
                        Message::Agreement(AgreementMessage::FillHole {
                            from: SeqNo(1),
                            to: SeqNo(1),
                            ..
                        }),
                } => Some(None),
                _ => None,
            })
            .collect()
    };
    let mut asked = Vec::new();
    for t in 0..=2 * wait {
        asked.extend(fill_holes(&h.tick(1, 2_000 + t)));
    }
    // First the primary, then everyone.
    assert_eq!(asked.first(), Some(&Some(ReplicaId(0))), "{asked:?}");
    assert_eq!(asked.last(), Some(&None), "{asked:?}");

    // Replica 2 holds the first proposal and relays it (the primary's signature is what counts).
    h.deliver(
        Principal::Replica(ReplicaId(0)),
        2,
        &Message::Agreement(AgreementMessage::PrePrepare(p1.clone())),
    );
    let answer = h.deliver(
        Principal::Replica(ReplicaId(1)),
        2,
        &Message::Agreement(AgreementMessage::FillHole {
            view: View(0),
            from: SeqNo(1),
            to: SeqNo(1),
        }),
    );
    let Some(Action::Send {
        to: ReplicaId(1),
        message: filled @ Message::Agreement(AgreementMessage::Filled(_)),
    }) = answer.first()
    else {
        panic!("{answer:?}")
    };
    let actions = h.deliver(Principal::Replica(ReplicaId(2)), 1, filled);
    // Both now run, in order.
    let ran: Vec<SeqNo> = spec_responses(&actions)
        .iter()
        .map(|s| s.order.body.seq)
        .collect();
    assert_eq!(ran, vec![SeqNo(1), SeqNo(2)], "{actions:?}");
    assert_eq!(spec_responses(&actions)[1].reply.result, value("12"));
}

#[test]
fn read_during_speculation_is_answered_once_the_state_is_committed() {
    let mut h = Harness::with_fast_path(true);
    let first = h.deliver(CLIENT, 0, &request_message(&h.request(1, append("a", "1"))));
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::PrePrepare(p1)),
    } = &first[1]
    else {
        panic!()
    };
    let p1 = p1.clone();
    h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(p1.clone())),
    );
    // The read waits (no answer from speculative state)...
    assert!(h.read_only(50, "a", 1).is_empty());
    // ...and is answered, with the write, as soon as it commits.
    let actions = h.commit_at(1, &p1);
    let read: Vec<_> = committed_replies(&actions)
        .into_iter()
        .filter(|r| r.read_only)
        .collect();
    assert_eq!(read.len(), 1, "{actions:?}");
    assert_eq!(
        (read[0].timestamp, read[0].result.clone()),
        (Timestamp(50), value("1"))
    );
}
