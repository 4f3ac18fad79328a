//! The fast path's pure rules: which fast evidence a new view may count, and the history chain
//! of the pre-prepares a new view re-issues.
//!
//! In: the 2f+1 view changes a new view is built from. Out: the new view's plan (through
//! [`super::view_change::plan_new_view`]) and its re-issued pre-prepare bodies, identical at
//! the new primary and at every backup that recomputes them (safety rule 6).

use super::view_change::{plan_new_view, NewViewPlan};
use crate::wire::{
    chain_history, history_anchor, statement_digest, Digest, Evidence, PrePrepare, ReplicaId, Signed, View, ViewChange,
};
use std::collections::BTreeMap;

/// Removes fast evidence (`Evidence::Accepted`) that fewer than `f + 1` of the view changes
/// report with an identical pre-prepare body (PROTOCOLS §2.8): f Byzantine replicas can report
/// anything a faulty primary signed, but f+1 identical reports include a correct replica that
/// accepted the proposal inside an installed view.
///
/// The selection in `view_change` applies the same threshold itself; filtering here first
/// changes nothing for the groups that reach it, so the two agree.
pub fn count_fast_evidence(view_changes: &[Signed<ViewChange>], f: usize) -> Vec<Signed<ViewChange>> {
    let mut reports: BTreeMap<Digest, usize> = BTreeMap::new();
    for vc in view_changes {
        for e in &vc.body.evidence {
            if let Evidence::Accepted(p) = e {
                *reports.entry(statement_digest(&p.pre_prepare.body)).or_default() += 1;
            }
        }
    }
    view_changes
        .iter()
        .map(|vc| {
            let mut vc = vc.clone();
            vc.body.evidence.retain(|e| match e {
                Evidence::Accepted(p) => reports.get(&statement_digest(&p.pre_prepare.body)).copied().unwrap_or(0) > f,
                Evidence::Prepared(_) => true,
            });
            vc
        })
        .collect()
}

/// The new view's plan from its view changes, fast evidence counted.
pub fn plan(view_changes: &[Signed<ViewChange>], f: usize) -> NewViewPlan {
    plan_new_view(&count_fast_evidence(view_changes, f))
}

/// The pre-prepares a new view re-issues for its plan, with the history recomputed from the
/// plan's stable checkpoint (PROTOCOLS §2.9: the primary re-issues G with new history digests).
pub fn reissue(view: View, primary: ReplicaId, plan: &NewViewPlan) -> Vec<PrePrepare> {
    let mut history = history_anchor(&plan.stable);
    plan.slots
        .iter()
        .map(|(seq, chosen)| {
            let (batch_digest, nondet) = NewViewPlan::slot_content(chosen);
            history = chain_history(&history, *seq, &batch_digest, &nondet);
            PrePrepare { view, seq: *seq, batch_digest, nondet, primary, history }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Batch, CheckpointCertificate, Proposal, SeqNo, Signature};

    fn unsigned<T>(body: T) -> Signed<T> {
        Signed { body, signature: Signature::from_bytes(&[0; 64]) }
    }

    fn accepted(view: u64, seq: u64, history: u8) -> Evidence {
        let batch = Batch::default();
        let pre_prepare = unsigned(PrePrepare {
            view: View(view),
            seq: SeqNo(seq),
            batch_digest: batch.digest(),
            nondet: vec![],
            primary: View(view).primary(4),
            history: Digest([history; 32]),
        });
        Evidence::Accepted(Proposal { pre_prepare, batch })
    }

    fn vc(replica: u32, evidence: Vec<Evidence>) -> Signed<ViewChange> {
        let stable = CheckpointCertificate {
            seq: SeqNo(0),
            service_root: Digest::default(),
            replies_digest: Digest::default(),
            checkpoints: vec![],
        };
        unsigned(ViewChange { new_view: View(2), replica: ReplicaId(replica), stable, evidence })
    }

    #[test]
    fn fast_evidence_needs_f_plus_one_identical_bodies() {
        // Two reports of one body survive; a lone report (a body that differs only in its
        // history, as an equivocating primary would sign) is dropped.
        let vcs = vec![vc(0, vec![accepted(1, 1, 7)]), vc(1, vec![accepted(1, 1, 7)]), vc(2, vec![accepted(1, 1, 8)])];
        let counted = count_fast_evidence(&vcs, 1);
        assert_eq!(counted[0].body.evidence.len(), 1);
        assert_eq!(counted[1].body.evidence.len(), 1);
        assert!(counted[2].body.evidence.is_empty());
        let p = plan(&vcs, 1);
        assert_eq!(p.slots.len(), 1);
        assert_eq!(p.slots[0].1.as_ref().map(|p| p.pre_prepare.body.history), Some(Digest([7; 32])));
        // Alone, nothing is counted and the plan is empty.
        assert!(plan(&vcs[2..], 1).slots.is_empty());
    }

    #[test]
    fn reissued_histories_chain_from_the_stable_checkpoint() {
        let vcs = vec![vc(0, vec![accepted(1, 1, 7), accepted(1, 3, 9)]), vc(1, vec![accepted(1, 1, 7), accepted(1, 3, 9)])];
        let p = plan(&vcs, 1);
        let issued = reissue(View(2), ReplicaId(2), &p);
        assert_eq!(issued.len(), 3);
        let mut h = history_anchor(&p.stable);
        for pp in &issued {
            h = chain_history(&h, pp.seq, &pp.batch_digest, &pp.nondet);
            assert_eq!(pp.history, h);
            assert_eq!(pp.view, View(2));
        }
        // The same content from the same checkpoint gives the same history in any view.
        assert_eq!(reissue(View(3), ReplicaId(3), &p).last().map(|pp| pp.history), Some(h));
    }
}
