//! State transfer.

use super::*;
use crate::wire::{Checkpoint, SeqNo, StateTransferMessage};
/// Issue #11, item 6. A replica finds its own checkpoint 4 differs from a certified one and
/// repairs itself: it rolls back to its checkpoint 0 and fetches the state at 4, diffing
/// against 0 (the transfer's base). Meanwhile the others' checkpoint 8, above the base, becomes
/// stable. The base must survive that: the next transfer (here, chasing the stable checkpoint
/// 8) diffs against it again, and without it the replica halted with "no own checkpoint to
/// transfer state against".
#[test]
fn a_checkpoint_above_the_transfer_base_becoming_stable_keeps_the_base() {
    let mut h = Harness::new();
    let interval = h.config.protocol.checkpoint_interval;
    assert_eq!(interval, 4, "the test counts on checkpoints at 4 and 8");
    // Eight batches, one request each, with every checkpoint vote to replica 3 held back:
    // it takes checkpoints 4 and 8 but sees neither become stable.
    let lagging = 3;
    let mut held = Vec::new();
    for t in 1..=2 * interval {
        let actions = h.deliver(
            CLIENT,
            0,
            &request_message(&h.request(t, put("a", &t.to_string()))),
        );
        held.extend(h.exchange(0, actions, |(_, to, m)| {
            *to == lagging && matches!(m, Message::Agreement(AgreementMessage::Checkpoint(_)))
        }));
    }
    let r3 = &h.replicas[lagging];
    assert_eq!(r3.last_executed(), SeqNo(8));
    assert_eq!(r3.stable_checkpoint().seq, SeqNo(0));
    assert_eq!(
        r3.own_checkpoints.keys().copied().collect::<Vec<_>>(),
        vec![SeqNo(0), SeqNo(4), SeqNo(8)]
    );
    for r in 0..3 {
        assert_eq!(
            h.replicas[r].stable_checkpoint().seq,
            SeqNo(8),
            "replica {r}"
        );
    }

    // 2f+1 replicas certify a state at 4 that differs from replica 3's: it repairs itself
    // from its checkpoint 0.
    let own = h.replicas[lagging].own_checkpoints[&SeqNo(4)].clone();
    let mut bad_root = own.service_root;
    bad_root.0[0] ^= 1;
    for r in 0..3u32 {
        let vote = h.replica_signer(r as usize).sign(Checkpoint {
            seq: SeqNo(4),
            service_root: bad_root,
            replies_digest: own.replies_digest,
            replica: ReplicaId(r),
        });
        // The transfer's requests go nowhere: the others kept no state at 4.
        h.deliver(
            Principal::Replica(ReplicaId(r)),
            lagging,
            &Message::Agreement(AgreementMessage::Checkpoint(vote)),
        );
    }
    let r3 = &h.replicas[lagging];
    let transfer = r3.transfer.as_ref().expect("a repair transfer");
    assert_eq!((transfer.target.seq, transfer.base), (SeqNo(4), SeqNo(0)));
    assert_eq!(r3.last_executed(), SeqNo(0));
    assert!(!r3.own_checkpoints.contains_key(&SeqNo(4)));

    // The held votes for 8 arrive during the transfer. Replica 3 no longer holds that state
    // (the rollback to the base dropped it): 8 becomes a checkpoint to catch up to, and the
    // transfer's base stays.
    for (from, to, message) in held {
        let Message::Agreement(AgreementMessage::Checkpoint(c)) = &message else {
            unreachable!()
        };
        if c.body.seq == SeqNo(8) {
            h.deliver(Principal::Replica(ReplicaId(from as u32)), to, &message);
        }
    }
    let r3 = &h.replicas[lagging];
    assert_eq!(r3.stable_checkpoint().seq, SeqNo(0));
    assert_eq!(r3.stable_ahead.as_ref().map(|c| c.seq), Some(SeqNo(8)));
    assert!(r3.is_transferring_state());
    assert!(
        r3.own_checkpoints.contains_key(&SeqNo(0)),
        "the transfer's base was dropped: {:?}",
        r3.own_checkpoints.keys().collect::<Vec<_>>()
    );

    // The next transfer: replica 3 learns of the stable checkpoint 8 (as its periodic
    // QueryStable would) and chases it, again from its base.
    let stable = h.replicas[0].stable_checkpoint().clone();
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        lagging,
        &Message::StateTransfer(StateTransferMessage::ReplyStable(stable)),
    );
    let halted = actions.iter().find_map(|a| match a {
        Action::Halt { reason } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(halted, None, "the next transfer found no base");
    let r3 = &h.replicas[lagging];
    assert!(!r3.is_halted());
    assert_eq!(
        r3.transfer.as_ref().map(|t| (t.target.seq, t.base)),
        Some((SeqNo(8), SeqNo(0)))
    );
    assert_eq!(r3.metrics().state_transfers, 2);

    // It completes against the others' checkpoint 8 and the replica runs again.
    h.exchange(lagging, actions, |_| false);
    let r3 = &h.replicas[lagging];
    assert!(!r3.is_transferring_state());
    assert_eq!(r3.last_executed(), SeqNo(8));
    let actions = h.deliver(CLIENT, 0, &request_message(&h.request(100, put("b", "1"))));
    h.exchange(0, actions, |_| false);
    assert_eq!(h.replicas[lagging].last_executed(), SeqNo(9));
}

/// A repair transfer rolls the service back to its base, and the service drops every later
/// checkpoint with it. The core must forget them too: otherwise one of them can become stable
/// while the older transfer runs, the transfer then completes below it, and the replica is
/// left behind its stable checkpoint with no transfer or catch-up pending (it never runs again).
#[test]
fn a_checkpoint_dropped_by_a_repair_rollback_never_becomes_stable() {
    let mut h = Harness::new();
    assert_eq!(h.config.protocol.checkpoint_interval, 4);
    let lagging = 3;
    let is_vote = |m: &Message, seq: u64| matches!(m, Message::Agreement(AgreementMessage::Checkpoint(c)) if c.body.seq == SeqNo(seq));
    // Eight batches. Nobody sees checkpoint 8 become stable (its votes are held); replica 3
    // does not see checkpoint 4 become stable either. The others keep the state at 4 (stable).
    let mut held = Vec::new();
    for t in 1..=8 {
        let actions = h.deliver(
            CLIENT,
            0,
            &request_message(&h.request(t, put("a", &t.to_string()))),
        );
        held.extend(h.exchange(0, actions, |(_, to, m)| {
            is_vote(m, 8) || (*to == lagging && is_vote(m, 4))
        }));
    }
    assert_eq!(h.replicas[0].stable_checkpoint().seq, SeqNo(4));
    let r3 = &h.replicas[lagging];
    assert_eq!(
        (r3.last_executed(), r3.stable_checkpoint().seq),
        (SeqNo(8), SeqNo(0))
    );

    // Replica 3's record of its checkpoint 4 is corrupt: the certificate for 4 makes it repair
    // itself from its checkpoint 0. Its requests for the state are held for now.
    h.replicas[lagging]
        .own_checkpoints
        .get_mut(&SeqNo(4))
        .expect("own checkpoint 4")
        .service_root
        .0[0] ^= 1;
    let mut transfer_actions = Vec::new();
    for (from, to, message) in held
        .iter()
        .filter(|(_, to, m)| *to == lagging && is_vote(m, 4))
    {
        transfer_actions.extend(h.deliver(
            Principal::Replica(ReplicaId(*from as u32)),
            *to,
            message,
        ));
    }
    let r3 = &h.replicas[lagging];
    let transfer = r3.transfer.as_ref().expect("a repair transfer");
    assert_eq!((transfer.target.seq, transfer.base), (SeqNo(4), SeqNo(0)));
    assert_eq!(
        r3.own_checkpoints.keys().copied().collect::<Vec<_>>(),
        vec![SeqNo(0)],
        "checkpoints the rollback dropped are still listed"
    );

    // The votes for 8 reach replica 3: it no longer holds that state, so 8 is a checkpoint to
    // catch up to, not its stable one.
    for (from, to, message) in held
        .iter()
        .filter(|(_, to, m)| *to == lagging && is_vote(m, 8))
    {
        h.deliver(Principal::Replica(ReplicaId(*from as u32)), *to, message);
    }
    let r3 = &h.replicas[lagging];
    assert_eq!(r3.stable_checkpoint().seq, SeqNo(0));
    assert_eq!(r3.stable_ahead.as_ref().map(|c| c.seq), Some(SeqNo(8)));

    // The transfer to 4 completes, and replica 3 catches up from there to 8 and beyond.
    h.exchange(lagging, transfer_actions, |(_, _, m)| is_vote(m, 8));
    let r3 = &h.replicas[lagging];
    assert!(!r3.is_transferring_state());
    assert!(
        r3.last_executed() >= r3.stable_checkpoint().seq,
        "behind its stable checkpoint: {}",
        r3.debug_summary()
    );
    assert_eq!(r3.last_executed(), SeqNo(8));
    let actions = h.deliver(CLIENT, 0, &request_message(&h.request(100, put("b", "1"))));
    h.exchange(0, actions, |(_, _, m)| is_vote(m, 8));
    assert_eq!(h.replicas[lagging].last_executed(), SeqNo(9));
}
