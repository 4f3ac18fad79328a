//! Zyzzyva's fast path (PROTOCOLS §6): backups run accepted proposals of the installed view
//! ahead of their commit, if each one's history chains onto the state's, and send speculative
//! replies that carry the primary's order; a client completes on 3f+1 matching ones. What the
//! commit (or a new view) does not confirm is rolled back to the newest checkpoint. Also: a
//! hole below a buffered proposal is asked for (the primary first, then everyone), a client's
//! proof of misbehaviour (two orders for one slot) leaves the view, and the histories of the
//! pre-prepares a new view re-issues ([`reissue`], a pure rule every replica recomputes).

use super::execution::{ReplyLimits, ReplyTable};
use super::invariants::invariant;
use super::view_change::NewViewPlan;
use super::{same_content, Action, Core, Notification, Speculation};
use crate::wire::{
    chain_history, history_anchor, AgreementMessage, Digest, Message, Pom, PrePrepare, Principal,
    ReplicaId, SeqNo, View,
};

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

impl Core {
    /// The history of the state the service is in, if this view's chain reaches it: the
    /// proposal of this view at `spec_executed`, provided what ran there is that proposal's
    /// content (committed content is the same everywhere, so its history may be adopted).
    fn executed_history(&self) -> Option<Digest> {
        let seq = self.spec_executed;
        let history = self.proposed_history(seq)?;
        if seq > self.last_executed {
            let slot = self.log.get(&seq)?;
            let ran = &slot.executed.as_ref()?.order.body;
            let p = &slot.proposal.as_ref()?.pre_prepare.body;
            if !same_content(ran, p) {
                return None;
            }
        }
        Some(history)
    }

    /// Fast path: runs this view's accepted proposals in sequence, each only if its history
    /// chains onto the state's, and sends speculative replies.
    pub(super) fn speculate(&mut self, actions: &mut Vec<Action>) {
        if !self.config.protocol.fast_path
            || !self.view_active
            || self.transfer.is_some()
            || self.halted
        {
            return;
        }
        if self.last_executed < self.stable.seq {
            return;
        }
        // Reads wait for a fully committed state: running more batches now would keep them
        // waiting for as long as writes keep coming.
        if !self.deferred_reads.is_empty() {
            return;
        }
        loop {
            // Checkpoints are taken on committed state only: wait at a boundary until it commits.
            let boundary = self.spec_executed.0 % self.config.protocol.checkpoint_interval == 0;
            if boundary && self.spec_executed > self.last_executed {
                return;
            }
            let seq = self.spec_executed.next();
            let Some(previous) = self.executed_history() else {
                return;
            };
            let Some(slot) = self.log.get(&seq) else {
                return;
            };
            let Some(proposal) = slot.proposal.clone() else {
                return;
            };
            let b = &proposal.pre_prepare.body;
            if b.view != self.view || slot.committed && seq == self.last_executed.next() {
                return;
            }
            if b.history != chain_history(&previous, seq, &b.batch_digest, &b.nondet) {
                return;
            }
            // Our view-change evidence for this slot is an older certificate of the same
            // content (see `evidence`), which may rank below a conflicting proposal a later
            // view saw: a fast completion must not rest on it, so this one waits for its commit.
            if slot.certificate.as_ref().is_some_and(|c| {
                c.pre_prepare.body.view < b.view && same_content(&c.pre_prepare.body, b)
            }) {
                return;
            }
            self.ask_execute(seq, &proposal, true, actions);
            self.spec_executed = seq;
            self.read_only_barrier = self.read_only_barrier.max(seq);
            self.metrics.speculated_batches += 1;
            tracing::debug!(replica = self.id.0, seq = seq.0, "speculated");
            actions.push(Action::Notify(Notification::Speculated {
                seq,
                batch_digest: b.batch_digest,
            }));
            if let Some(slot) = self.log.get_mut(&seq) {
                slot.executed = Some(Speculation {
                    order: proposal.pre_prepare.clone(),
                    results: None,
                });
            }
        }
    }

    /// Undoes every speculative execution: the service (and its reply cache) goes back to the
    /// newest checkpoint at or below `last_executed` (always committed state), and the committed
    /// batches after it run again.
    pub(super) fn roll_back_speculation(&mut self, actions: &mut Vec<Action>) {
        invariant!(
            self.spec_executed > self.last_executed,
            "replica {}: rolling back with nothing speculative",
            self.id.0
        );
        let Some(base) = self
            .own_checkpoints
            .range(..=self.last_executed)
            .next_back()
            .map(|(_, c)| c.clone())
        else {
            return self.halt("no checkpoint to roll speculation back to".into(), actions);
        };
        let replies = match ReplyTable::decode(&base.replies, ReplyLimits::of(&self.config)) {
            Ok(r) => r,
            Err(e) => return self.halt(format!("own reply cache: {e}"), actions),
        };
        self.ask_rollback(base.seq, base.replies.clone(), replies, actions);
        tracing::info!(
            replica = self.id.0,
            to = base.seq.0,
            from = self.spec_executed.0,
            "speculation rolled back"
        );
        actions.push(Action::Notify(Notification::RolledBack {
            to: base.seq,
            from: self.spec_executed,
        }));
        self.metrics.rollbacks += 1;
        self.set_service_position(base.seq);
    }

    /// The service now holds exactly the committed state at `seq`.
    pub(super) fn set_service_position(&mut self, seq: SeqNo) {
        self.last_executed = seq;
        self.spec_executed = seq;
        self.safety.reset_executed(seq);
        self.spec_keys.clear();
        for slot in self.log.values_mut() {
            slot.executed = None;
        }
    }

    /// Fast path: a proposal of this view waits above a missing one. Start filling the hole
    /// (the tick handler asks the primary, then everyone; the view-change timer on
    /// uncommitted proposals suspects the primary after that).
    pub(super) fn note_hole(&mut self) {
        if !self.config.protocol.fast_path || !self.view_active || self.is_primary() {
            self.fill_hole = None;
            return;
        }
        let next = self.spec_executed.next();
        let missing = !self.log.get(&next).is_some_and(|s| {
            s.proposal
                .as_ref()
                .is_some_and(|p| p.pre_prepare.body.view == self.view)
        });
        let above = self.log.range(next.next()..).any(|(_, s)| {
            s.proposal
                .as_ref()
                .is_some_and(|p| p.pre_prepare.body.view == self.view)
        });
        if !(missing && above) {
            self.fill_hole = None;
        } else if self.fill_hole.is_none_or(|(first, _, _)| first != next) {
            self.fill_hole = Some((next, self.ticks, false));
        }
    }

    fn hole_range(&self) -> Option<(SeqNo, SeqNo)> {
        let (first, _, _) = self.fill_hole?;
        let last = self
            .log
            .range(first..)
            .filter(|(_, s)| {
                s.proposal
                    .as_ref()
                    .is_some_and(|p| p.pre_prepare.body.view == self.view)
            })
            .map(|(seq, _)| *seq)
            .next()?;
        (last > first).then(|| (first, SeqNo(last.0 - 1)))
    }

    /// Fast path, every tick of an active view: notes a hole below a buffered proposal of
    /// this view and asks for it after `retransmit_ticks`, first the primary, then everyone.
    pub(super) fn on_fill_hole_timeout(&mut self, actions: &mut Vec<Action>) {
        self.note_hole();
        let Some((first, asked, asked_all)) = self.fill_hole else {
            return;
        };
        let wait = self.config.protocol.retransmit_ticks;
        if self.ticks < asked + wait {
            return;
        }
        let Some((from, to)) = self.hole_range() else {
            self.fill_hole = None;
            return;
        };
        let message = Message::Agreement(AgreementMessage::FillHole {
            view: self.view,
            from,
            to,
        });
        self.metrics.fill_holes += 1;
        if asked_all || self.ticks >= asked + 2 * wait {
            actions.push(Action::Broadcast { message });
        } else {
            actions.push(Action::Send {
                to: self.primary(),
                message,
            });
        }
        self.fill_hole = Some((first, asked, self.ticks >= asked + 2 * wait));
    }

    /// Two orders the primary of one view signed for one sequence number that differ: the
    /// primary is faulty. Leave its view (PROTOCOLS §2.3, 4d).
    pub(super) fn on_pom(&mut self, sender: Principal, pom: Pom, actions: &mut Vec<Action>) {
        if !pom.convicts(self.n()) {
            return self.misbehaved(sender, "proof of misbehaviour that proves nothing", actions);
        }
        if pom.first.body.view != self.view || !self.view_active {
            return;
        }
        self.metrics.poms += 1;
        tracing::warn!(
            replica = self.id.0,
            view = self.view.0,
            seq = pom.first.body.seq.0,
            "primary equivocated"
        );
        self.misbehaved(
            Principal::Replica(pom.first.body.primary),
            "equivocating primary (proof of misbehaviour)",
            actions,
        );
        self.on_view_change_timeout(actions);
    }
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
