//! Checkpoints and the WAL: older service checkpoints go only once the records that make them
//! unnecessary are durable.

use super::*;
use crate::wire::SeqNo;
use state_abstraction::Service;

/// A checkpoint becoming stable makes the older ones unnecessary for a restart only once the
/// snapshot naming it is durable: until the driver says so (`Event::Persisted`), the service
/// keeps them, so a crash before the fsync still finds a checkpoint its WAL knows.
#[test]
fn older_checkpoints_go_only_once_the_snapshot_is_durable() {
    let mut h = Harness::new();
    let interval = h.config.protocol.checkpoint_interval;
    for t in 1..=interval {
        let actions = h.deliver(
            CLIENT,
            0,
            &request_message(&h.request(t, put("a", &t.to_string()))),
        );
        h.exchange(0, actions, |_| false);
    }
    let held = |h: &Harness, r: usize| -> Vec<u64> {
        h.replicas[r]
            .service()
            .checkpoints()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect()
    };
    for r in 0..4 {
        assert_eq!(
            h.replicas[r].stable_checkpoint().seq,
            SeqNo(interval),
            "replica {r}"
        );
        // Stable at `interval`, but nothing was reported durable yet.
        assert_eq!(held(&h, r), vec![0, interval], "replica {r}");
    }
    // Too early: not every record of the step that made it stable.
    let mut actions = Vec::new();
    h.replicas[1].step(Event::Persisted { upto: 1 }, &mut actions);
    assert_eq!(held(&h, 1), vec![0, interval]);
    h.replicas[1].step(Event::Persisted { upto: u64::MAX }, &mut actions);
    assert_eq!(held(&h, 1), vec![interval]);
    assert!(actions.is_empty(), "{actions:?}");
    // The others still hold theirs.
    assert_eq!(held(&h, 2), vec![0, interval]);
}
