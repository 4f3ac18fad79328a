//! State transfer.

use super::*;
use crate::wire::{Checkpoint, SeqNo, StateTransferMessage};
/// Issue #11, item 6. A replica finds its own checkpoint 4 differs from a certified one and
/// repairs itself: it rolls back to its checkpoint 0 and fetches the state at 4, diffing
/// against 0 (the transfer's base). Meanwhile its own checkpoint 8, above the base, becomes
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

    // The held votes for 8 arrive: replica 3's own checkpoint 8 matches them and becomes
    // stable during the transfer. The transfer's base stays.
    for (from, to, message) in held {
        let Message::Agreement(AgreementMessage::Checkpoint(c)) = &message else {
            unreachable!()
        };
        if c.body.seq == SeqNo(8) {
            h.deliver(Principal::Replica(ReplicaId(from as u32)), to, &message);
        }
    }
    let r3 = &h.replicas[lagging];
    assert_eq!(r3.stable_checkpoint().seq, SeqNo(8));
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
