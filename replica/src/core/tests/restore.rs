//! Recovery from the WAL.

use super::*;
use crate::core::{Notification, WalRecord};
use crate::wire::{Batch, Digest, SeqNo, View};
#[test]
fn restart_restores_votes_and_view() {
    let mut h = Harness::new();
    let (_, _, pre_prepare) = h.propose(1, put("a", "1"));
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, &pre_prepare);
    let wal: Vec<WalRecord> = actions
        .iter()
        .filter_map(|a| {
            if let Action::Persist(r) = a {
                Some(r.clone())
            } else {
                None
            }
        })
        .collect();
    let service = std::mem::replace(
        &mut h.replicas[1],
        Replica::new(h.config.clone(), &h.keys.replicas[1], KvService::new()).expect("r"),
    )
    .into_service();
    let mut restarted =
        Replica::restore(h.config.clone(), &h.keys.replicas[1], service, wal).expect("restore");
    // The same proposal again is a duplicate; a different one at (0, 1) is refused (rule 1).
    let mut actions = Vec::new();
    let batch = Batch {
        requests: vec![h.request(2, put("b", "2"))],
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
    let frame = h.auth[&Principal::Replica(ReplicaId(0))]
        .seal(
            &Message::Agreement(AgreementMessage::PrePrepare(proposal)),
            &[Principal::Replica(ReplicaId(1))],
        )
        .expect("seal");
    let opened = h.auth[&Principal::Replica(ReplicaId(1))]
        .open(&frame[FRAME_HEADER_BYTES..])
        .expect("open");
    restarted.step(Event::Message(opened), &mut actions);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Notify(Notification::Misbehaviour {
                what: "equivocating pre-prepare",
                ..
            })
        )),
        "{actions:?}"
    );
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Broadcast {
                message: Message::Agreement(AgreementMessage::Prepare(_))
            }
        )),
        "{actions:?}"
    );
}
