//! The fast path's pure rules: which fast evidence a new view may count, and the history chain
//! of the pre-prepares a new view re-issues.
//!
//! In: the 2f+1 view changes a new view is built from. Out: the new view's plan (through
//! [`super::view_change::plan_new_view`]) and its re-issued pre-prepare bodies, identical at
//! the new primary and at every backup that recomputes them (safety rule 6).

use super::view_change::{plan_new_view, NewViewPlan};
use crate::wire::{chain_history, history_anchor, Digest, PrePrepare, Proposal, ReplicaId, SeqNo, Signed, View, ViewChange};
use std::collections::BTreeMap;

/// The new view's plan from its view changes (PROTOCOLS §2.8–2.9), fast evidence counted by
/// *content*.
///
/// Strong evidence (prepared certificates) is selected by [`plan_new_view`], which ranks it by
/// view. Fast evidence is then laid over it, slot by slot: every report for a slot, accepted
/// proposal or prepared certificate alike, is grouped by what would run (batch digest and
/// agreed value); a group reported by at least f+1 view changes is a candidate ranked at the
/// (f+1)-th highest view among its reports, the highest view at which at least one correct
/// replica is known to have accepted that content (f Byzantine reports cannot lift it). The
/// highest rank wins; strong beats fast at equal views.
///
/// Grouping by content rather than by identical pre-prepare body matters once a new view
/// re-issues a proposal: correct replicas that accepted it at different views report different
/// bodies for the same batch, and counted apart none of the groups might reach f+1 although
/// the batch completed.
pub fn plan(view_changes: &[Signed<ViewChange>], f: usize) -> NewViewPlan {
    let strong_only: Vec<Signed<ViewChange>> = view_changes
        .iter()
        .map(|vc| {
            let mut vc = vc.clone();
            vc.body.evidence.retain(|e| e.is_strong());
            vc
        })
        .collect();
    let mut plan = plan_new_view(&strong_only);
    type Content = (Digest, Vec<u8>);
    let mut groups: BTreeMap<(SeqNo, Content), Vec<(View, &Proposal)>> = BTreeMap::new();
    for vc in view_changes {
        for e in &vc.body.evidence {
            if e.seq() <= plan.stable.seq {
                continue;
            }
            let b = &e.proposal().pre_prepare.body;
            groups.entry((e.seq(), (b.batch_digest, b.nondet.clone()))).or_default().push((e.view(), e.proposal()));
        }
    }
    // The best fast candidate per slot: (rank, proposal).
    let mut fast: BTreeMap<SeqNo, (View, &Proposal)> = BTreeMap::new();
    for ((seq, _), mut reports) in groups {
        if reports.len() <= f {
            continue;
        }
        reports.sort_by_key(|r| std::cmp::Reverse(r.0));
        let rank = reports[f].0;
        let proposal = reports[0].1;
        let better = match fast.get(&seq) {
            None => true,
            Some((r, p)) => (rank, std::cmp::Reverse(proposal.pre_prepare.body.batch_digest))
                > (*r, std::cmp::Reverse(p.pre_prepare.body.batch_digest)),
        };
        if better {
            fast.insert(seq, (rank, proposal));
        }
    }
    let Some(&last_fast) = fast.keys().next_back() else { return plan };
    let mut seq = plan.slots.last().map(|(s, _)| *s).unwrap_or(plan.stable.seq).next();
    while seq <= last_fast {
        plan.slots.push((seq, None));
        seq = seq.next();
    }
    for (seq, chosen) in plan.slots.iter_mut() {
        let Some((rank, proposal)) = fast.get(seq) else { continue };
        let strong_view = chosen.as_ref().map(|p| p.pre_prepare.body.view);
        if strong_view.is_none_or(|v| *rank > v) {
            *chosen = Some((*proposal).clone());
        }
    }
    plan
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
    use crate::wire::{Batch, CheckpointCertificate, Evidence, Signature};

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

    fn accepted_content(view: u64, seq: u64, tag: u8) -> Evidence {
        let Evidence::Accepted(mut p) = accepted(view, seq, 0) else { unreachable!() };
        p.pre_prepare.body.nondet = vec![tag];
        Evidence::Accepted(p)
    }

    fn content(plan: &NewViewPlan, i: usize) -> Option<Vec<u8>> {
        plan.slots[i].1.as_ref().map(|p| p.pre_prepare.body.nondet.clone())
    }

    #[test]
    fn fast_evidence_needs_f_plus_one_reports_of_one_content() {
        // A lone report is not counted; two of one content are, whatever their views.
        let vcs = vec![vc(0, vec![accepted_content(1, 1, 7)]), vc(1, vec![accepted_content(0, 1, 7)]), vc(2, vec![accepted_content(1, 1, 8)])];
        let p = plan(&vcs, 1);
        assert_eq!(p.slots.len(), 1);
        assert_eq!(content(&p, 0), Some(vec![7]));
        assert!(plan(&vcs[2..], 1).slots.is_empty());
    }

    #[test]
    fn a_content_group_ranks_at_its_f_plus_one_th_highest_view() {
        // Content 7 reported at views 5 (perhaps by a Byzantine replica, with a proposal its
        // faulty primary signed) and 1: it ranks at view 1, below content 8 reported twice at
        // view 3.
        let vcs = vec![
            vc(0, vec![accepted_content(5, 1, 7)]),
            vc(1, vec![accepted_content(1, 1, 7)]),
            vc(2, vec![accepted_content(3, 1, 8)]),
            vc(3, vec![accepted_content(3, 1, 8)]),
        ];
        assert_eq!(content(&plan(&vcs, 1), 0), Some(vec![8]));
        // At equal views a prepared certificate beats fast evidence, and it is kept when no
        // content reaches f+1 reports.
        let strong = prepared_at(3, 1);
        let vcs = vec![vc(0, vec![strong.clone()]), vc(2, vec![accepted_content(3, 1, 8)]), vc(3, vec![accepted_content(3, 1, 8)])];
        assert_eq!(plan(&vcs, 1).slots[0].1.as_ref(), Some(strong.proposal()));
        let vcs = vec![vc(0, vec![strong.clone()]), vc(2, vec![accepted_content(4, 1, 8)])];
        assert_eq!(plan(&vcs, 1).slots[0].1.as_ref(), Some(strong.proposal()));
    }

    fn prepared_at(view: u64, seq: u64) -> Evidence {
        let Evidence::Accepted(proposal) = accepted_content(view, seq, 9) else { unreachable!() };
        let b = proposal.pre_prepare.body.clone();
        let prepares = (0..4u32)
            .map(ReplicaId)
            .filter(|r| *r != b.primary)
            .take(2)
            .map(|r| unsigned(crate::wire::Prepare { view: b.view, seq: b.seq, batch_digest: b.batch_digest, replica: r }))
            .collect();
        Evidence::Prepared(crate::wire::PreparedCertificate { proposal, prepares })
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
