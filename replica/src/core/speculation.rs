//! The fast path's pure rules: the history chain of the pre-prepares a new view re-issues.
//!
//! In: the new view's plan ([`super::view_change::plan_new_view`], which also decides which
//! fast evidence counts). Out: its re-issued pre-prepare bodies, identical at the new primary
//! and at every backup that recomputes them (safety rule 6).

use super::view_change::NewViewPlan;
use crate::wire::{chain_history, history_anchor, PrePrepare, ReplicaId, View};

/// The pre-prepares a new view re-issues for its plan, with the history recomputed from the
/// plan's stable checkpoint (PROTOCOLS §2.9: the primary re-issues G with new history digests).
pub fn reissue(view: View, primary: ReplicaId, plan: &NewViewPlan) -> Vec<PrePrepare> {
    let mut history = history_anchor(&plan.stable);
    plan.slots
        .iter()
        .map(|(seq, chosen)| {
            let (batch_digest, nondet) = NewViewPlan::slot_content(chosen);
            history = chain_history(&history, *seq, &batch_digest, &nondet);
            PrePrepare {
                view,
                seq: *seq,
                batch_digest,
                nondet,
                primary,
                history,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Batch, CheckpointCertificate, Digest, Proposal, SeqNo, Signature, Signed};

    fn proposal(seq: u64, tag: u8) -> Proposal {
        let batch = Batch::default();
        let body = PrePrepare {
            view: View(1),
            seq: SeqNo(seq),
            batch_digest: batch.digest(),
            nondet: vec![tag],
            primary: ReplicaId(1),
            history: Digest([tag; 32]),
        };
        Proposal {
            pre_prepare: Signed {
                body,
                signature: Signature::from_bytes(&[0; 64]),
            },
            batch,
        }
    }

    #[test]
    fn reissued_histories_chain_from_the_stable_checkpoint() {
        let stable = CheckpointCertificate {
            seq: SeqNo(0),
            service_root: Digest::default(),
            replies_digest: Digest::default(),
            checkpoints: vec![],
        };
        let p = NewViewPlan {
            stable,
            slots: vec![
                (SeqNo(1), Some(proposal(1, 7).pre_prepare)),
                (SeqNo(2), None),
                (SeqNo(3), Some(proposal(3, 9).pre_prepare)),
            ],
        };
        let issued = reissue(View(2), ReplicaId(2), &p);
        assert_eq!(issued.len(), 3);
        let mut h = history_anchor(&p.stable);
        for pp in &issued {
            h = chain_history(&h, pp.seq, &pp.batch_digest, &pp.nondet);
            assert_eq!(pp.history, h);
            assert_eq!(pp.view, View(2));
        }
        // The reported history does not carry over: it is recomputed from the checkpoint.
        assert_ne!(issued[0].history, Digest([7; 32]));
        // The same content from the same checkpoint gives the same history in any view.
        assert_eq!(
            reissue(View(3), ReplicaId(3), &p)
                .last()
                .map(|pp| pp.history),
            Some(h)
        );
    }
}
