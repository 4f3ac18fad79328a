//! Client requests: relaying to the primary and watching it.

use super::*;
use crate::core::execution::Lookup;
use crate::core::WalRecord;
use crate::wire::View;
#[test]
fn backup_relays_a_retransmitted_request_and_suspects_the_primary() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let actions = h.deliver(CLIENT, 1, &request_message(&request));
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Send {
            to: ReplicaId(0),
            message: Message::Client(_)
        }
    ));
    // Nothing executes: after the view-change timeout, backup 1 asks for view 1 (persisting
    // first), and its timer for view 1 waits for 2f+1 view changes.
    let timeout = h.config.protocol.view_change_timeout_ticks;
    let mut all = Vec::new();
    for t in 0..=timeout {
        all.extend(h.tick(1, 2_000 + t));
    }
    let position = all
        .iter()
        .position(|a| {
            matches!(
                a,
                Action::Broadcast {
                    message: Message::ViewChange(ViewChangeMessage::ViewChange(_))
                }
            )
        })
        .expect("a view change");
    assert!(matches!(
        &all[position - 1],
        Action::Persist(WalRecord::EnteredView { view: View(1) })
    ));
    assert_eq!(h.replicas[1].view(), View(1));
    assert!(!h.replicas[1].is_view_active());
}

/// A faulty client sends request 1 to a backup only and requests 2..=1+window to the
/// primary. Once those execute, request 1 is stale everywhere (the primary would drop it):
/// the backup must stop watching the primary for it rather than suspect it forever.
#[test]
fn a_request_sent_only_to_a_backup_and_overtaken_does_not_force_a_view_change() {
    let mut h = Harness::new();
    let window = h.config.protocol.client_window;
    let planted = h.request(1, put("a", "planted"));
    h.deliver(CLIENT, 1, &request_message(&planted));
    let mut queue: Vec<Proposal> = Vec::new();
    for t in 2..=1 + window {
        let r = h.request(t, put("a", &t.to_string()));
        queue.extend(proposals_in(&h.deliver(CLIENT, 0, &request_message(&r))));
    }
    let mut executed = 0;
    while let Some(p) = queue.pop() {
        let from = Principal::Replica(ReplicaId(0));
        h.deliver(
            from,
            1,
            &Message::Agreement(AgreementMessage::PrePrepare(p.clone())),
        );
        h.commit_at(1, &p);
        queue.extend(proposals_in(&h.commit_at(0, &p)));
        executed += p.batch.requests.len();
    }
    assert_eq!(executed as u64, window, "every later request was ordered");
    assert_eq!(h.replicas[1].replies.lookup(&planted), Lookup::Stale);
    let timeout = h.config.protocol.view_change_timeout_ticks;
    for t in 0..=2 * timeout {
        let actions = h.tick(1, 2_000 + t);
        assert!(
            !starts_view_change(&actions),
            "backup suspected the primary at tick {t}"
        );
    }
    assert!(h.replicas[1].is_view_active());
}
