//! The normal case: proposing, pre-prepare, prepare, commit, execution.

use super::*;
use crate::core::{Notification, WalRecord};
use crate::wire::{Batch, Digest, SeqNo, View};
#[test]
fn primary_proposes_a_request_after_persisting_it() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let actions = h.deliver(CLIENT, 0, &request_message(&request));
    assert_eq!(actions.len(), 2, "{actions:?}");
    let Action::Persist(WalRecord::Accepted(proposal)) = &actions[0] else {
        panic!("{:?}", actions[0])
    };
    assert_eq!(proposal.pre_prepare.body.view, View(0));
    assert_eq!(proposal.pre_prepare.body.seq, SeqNo(1));
    assert_eq!(proposal.batch.requests, vec![request]);
    assert_eq!(
        proposal.pre_prepare.body.nondet,
        1_000u64.to_le_bytes().to_vec()
    );
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::PrePrepare(sent)),
    } = &actions[1]
    else {
        panic!("{:?}", actions[1])
    };
    assert_eq!(sent, &**proposal);
}

#[test]
fn backup_prepares_then_commits_then_executes() {
    let mut h = Harness::new();
    let (_, proposal, pre_prepare) = h.propose(1, put("a", "1"));
    let (request, pre_prepare) = (proposal.batch.requests[0].clone(), &pre_prepare);

    // Backup 1 accepts: persist, then prepare.
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, pre_prepare);
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Persist(WalRecord::Accepted(_))
    ));
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::Prepare(p1)),
    } = &actions[1]
    else {
        panic!("{:?}", actions[1])
    };
    assert_eq!(
        (p1.body.view, p1.body.seq, p1.body.replica),
        (View(0), SeqNo(1), ReplicaId(1))
    );

    // One more prepare (2f = 2 with its own): prepared — persist the certificate, then commit.
    let p2 = h.replica_signer(2).sign(Prepare {
        replica: ReplicaId(2),
        ..p1.body.clone()
    });
    let actions = h.deliver(
        Principal::Replica(ReplicaId(2)),
        1,
        &Message::Agreement(AgreementMessage::Prepare(p2)),
    );
    assert_eq!(actions.len(), 2, "{actions:?}");
    let Action::Persist(WalRecord::Prepared(cert)) = &actions[0] else {
        panic!("{:?}", actions[0])
    };
    assert_eq!(cert.prepares.len(), 2);
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::Commit(c1)),
    } = &actions[1]
    else {
        panic!("{:?}", actions[1])
    };
    assert_eq!(c1.body.replica, ReplicaId(1));

    // Two more commits (2f+1 = 3 with its own): execute, reply, notify.
    let c0 = h.replica_signer(0).sign(Commit {
        replica: ReplicaId(0),
        ..c1.body.clone()
    });
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::Commit(c0)),
    );
    assert!(actions.is_empty(), "{actions:?}");
    let c2 = h.replica_signer(2).sign(Commit {
        replica: ReplicaId(2),
        ..c1.body.clone()
    });
    let actions = h.deliver(
        Principal::Replica(ReplicaId(2)),
        1,
        &Message::Agreement(AgreementMessage::Commit(c2)),
    );
    // The reply (which comes with the execution stage's answer) and the notification that
    // the batch committed, in either order.
    assert_eq!(actions.len(), 2, "{actions:?}");
    let replies: Vec<(&ClientId, &Reply)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::SendClient {
                to,
                message: Message::Client(ClientMessage::Reply(reply)),
            } => Some((to, reply)),
            _ => None,
        })
        .collect();
    let [(to, reply)] = replies[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(*to, ClientId(100));
    assert_eq!(
        (reply.timestamp, reply.read_only, reply.replica),
        (Timestamp(1), false, ReplicaId(1))
    );
    assert_eq!(
        reply.result,
        state_abstraction::kv::KvReply::Value(None).encode()
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
    )));
    assert_eq!(h.replicas[1].last_executed(), SeqNo(1));

    // The client retransmits the request: answered from the cache, not executed again.
    let actions = h.deliver(CLIENT, 1, &request_message(&request));
    assert_eq!(actions.len(), 1, "{actions:?}");
    let Action::SendClient {
        message: Message::Client(ClientMessage::Reply(again)),
        ..
    } = &actions[0]
    else {
        panic!("{:?}", actions[0])
    };
    assert_eq!(again, reply);
    assert_eq!(h.replicas[1].metrics().executed_requests, 1);
}

#[test]
fn equivocating_pre_prepare_is_refused() {
    let mut h = Harness::new();
    let (_, _, pre_prepare) = h.propose(1, put("a", "1"));
    h.deliver(Principal::Replica(ReplicaId(0)), 2, &pre_prepare);
    // A second, validly signed proposal for the same view and sequence number.
    let other = h.request(2, put("a", "2"));
    let batch = Batch {
        requests: vec![other],
    };
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&1_000u64.to_le_bytes()),
        nondet: 1_000u64.to_le_bytes().to_vec(),
        primary: ReplicaId(0),
        history: Digest::default(),
    };
    let proposal = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        2,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal)),
    );
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Notify(Notification::Misbehaviour {
            what: "equivocating pre-prepare",
            ..
        })
    ));
    assert_eq!(h.replicas[2].metrics().misbehaviour, 1);
}

#[test]
fn pre_prepare_with_a_time_far_ahead_is_refused() {
    let mut h = Harness::new();
    let batch = Batch {
        requests: vec![h.request(1, put("a", "1"))],
    };
    let far = (1_000 + state_abstraction::kv::MAX_CLOCK_SKEW_NS * 2)
        .to_le_bytes()
        .to_vec();
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&far),
        nondet: far.clone(),
        primary: ReplicaId(0),
        history: Digest::default(),
    };
    let proposal = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal)),
    );
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Notify(Notification::Misbehaviour { .. })
    ));
}
