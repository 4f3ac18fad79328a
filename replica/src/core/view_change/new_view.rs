//! Entering a view (PROTOCOLS §2.9): the new primary builds the new view from 2f+1 view changes
//! ([`super::plan_new_view`], re-issuing each chosen proposal with a fresh history); a backup
//! recomputes the plan and refuses a new view that differs (safety rule 6); installing it moves
//! the window to its checkpoint, undoes speculation it does not repeat, and binds the replica to
//! every re-issued proposal, fetching the batches it lacks (*awaited* slots, `catch_up.rs`).

use super::super::fast_path;
use super::super::invariants::invariant;
use super::super::{Action, Core, Notification, WalRecord};
use super::{plan_new_view, valid_quorum, NewViewPlan};
use crate::wire::{
    history_anchor, Batch, ClientMessage, Digest, Message, NewView, PrePrepare, Principal,
    Proposal, ReplicaId, Request, SeqNo, Signed, View, ViewChange, ViewChangeMessage,
};

impl Core {
    /// The new primary, with 2f+1 view changes for its view (its own first): builds, installs
    /// and broadcasts the new view.
    pub(in crate::core) fn maybe_send_new_view(&mut self, actions: &mut Vec<Action>) {
        if self.view_active || self.primary() != self.id {
            return;
        }
        let mut chosen: Vec<Signed<ViewChange>> = Vec::new();
        if let Some(mine) = self.view_changes.get(&self.id) {
            if mine.body.new_view == self.view {
                chosen.push(mine.clone());
            }
        }
        for (r, vc) in &self.view_changes {
            if *r != self.id && vc.body.new_view == self.view && chosen.len() < self.quorum() {
                chosen.push(vc.clone());
            }
        }
        if chosen.len() < self.quorum() || chosen.first().map(|v| v.body.replica) != Some(self.id) {
            return;
        }
        let plan = plan_new_view(&self.config, &chosen);
        let pre_prepares: Vec<Signed<PrePrepare>> = fast_path::reissue(self.view, self.id, &plan)
            .into_iter()
            .map(|pp| self.signer.sign(pp))
            .collect();
        let nv = self.signer.sign(NewView {
            view: self.view,
            primary: self.id,
            view_changes: chosen,
            pre_prepares,
        });
        if let Err(e) = self.safety.check_enter_view(self.view, true) {
            panic!("replica {}: {e}", self.id.0);
        }
        self.install_new_view(nv.clone(), plan, actions);
        actions.push(Action::Broadcast {
            message: Message::ViewChange(ViewChangeMessage::NewView(nv)),
        });
    }

    /// A new view: installed if its primary is right, its view changes are a valid quorum, and
    /// its pre-prepares are the ones we recompute from them (rule 6).
    pub(in crate::core) fn on_new_view(
        &mut self,
        from: ReplicaId,
        nv: Signed<NewView>,
        actions: &mut Vec<Action>,
    ) {
        let v = nv.body.view;
        if v < self.view || (v == self.view && self.view_active) {
            return;
        }
        if nv.body.primary != v.primary(self.n()) {
            return self.misbehaved(
                Principal::Replica(from),
                "new view from a non-primary",
                actions,
            );
        }
        if !valid_quorum(&self.config, &self.genesis, v, &nv.body.view_changes) {
            return self.misbehaved(
                Principal::Replica(from),
                "new view without a valid quorum",
                actions,
            );
        }
        // Rule 6: recompute and compare.
        let plan = plan_new_view(&self.config, &nv.body.view_changes);
        let expected = fast_path::reissue(v, nv.body.primary, &plan);
        let matches = expected.len() == nv.body.pre_prepares.len()
            && expected
                .iter()
                .zip(&nv.body.pre_prepares)
                .all(|(e, pp)| pp.body == *e);
        if !matches {
            return self.misbehaved(
                Principal::Replica(from),
                "new view does not match its view changes",
                actions,
            );
        }
        if self.safety.check_enter_view(v, v == self.view).is_err() {
            return;
        }
        self.view = v;
        self.install_new_view(nv, plan, actions);
    }

    /// Installs a checked new view (see the module doc).
    fn install_new_view(
        &mut self,
        nv: Signed<NewView>,
        plan: NewViewPlan,
        actions: &mut Vec<Action>,
    ) {
        let view = nv.body.view;
        self.view = view;
        self.view_active = true;
        // No proposal until the re-issued slots are bound and `next_seq` is past them.
        self.installing_view = true;
        self.view_change_deadline = None;
        self.view_changes.retain(|_, v| v.body.new_view > view);
        self.proposed.clear();
        actions.push(Action::Persist(WalRecord::InstalledView { view }));
        actions.push(Action::Persist(WalRecord::NewViewMessage(Box::new(
            nv.clone(),
        ))));

        if plan.stable.seq > self.stable.seq {
            if plan.stable.seq > self.last_executed {
                // The new view starts above our state: move our window there now (so we take
                // part in the new view's slots) and fetch the state behind it.
                self.jump_stable(plan.stable.clone(), actions);
            } else {
                self.adopt_stable(plan.stable.clone(), actions);
            }
        }
        // Speculation that the new view does not repeat exactly is undone (PROTOCOLS §6.2:
        // rollback plus re-execution): the first speculatively run slot whose content differs
        // from the plan's, or that the plan leaves out, sends the service back to its newest
        // checkpoint (committed state); the loop at the end re-runs the plan from there.
        let speculated = self.spec_executed > self.last_executed;
        let conflict = speculated
            && self
                .log
                .range(self.last_executed.next()..=self.spec_executed)
                .any(|(seq, slot)| {
                    let planned = plan
                        .slots
                        .iter()
                        .find(|(s, _)| s == seq)
                        .map(|(_, p)| NewViewPlan::slot_content(p));
                    match (&slot.executed, planned) {
                        (Some(spec), Some((digest, nondet))) => {
                            spec.order.body.batch_digest != digest
                                || spec.order.body.nondet != nondet
                        }
                        _ => true,
                    }
                })
            || (self.spec_executed > self.last_executed && plan.stable.seq > self.last_executed);
        if conflict && self.spec_executed > self.last_executed {
            self.roll_back_speculation(actions);
        }
        self.view_anchor = Some((plan.stable.seq, history_anchor(&plan.stable)));
        let primary = view.primary(self.n()) == self.id;
        let mut max_seq = plan.stable.seq.max(self.stable.seq);
        for ((seq, _), pre_prepare) in plan.slots.iter().zip(nv.body.pre_prepares.iter()) {
            max_seq = max_seq.max(*seq);
            if !self.in_window(*seq) {
                continue;
            }
            let digest = pre_prepare.body.batch_digest;
            if let Some(slot) = self.log.get(seq) {
                if slot.committed {
                    let old = slot
                        .proposal
                        .as_ref()
                        .map(|p| p.pre_prepare.body.batch_digest);
                    assert_eq!(
                        old,
                        Some(digest),
                        "replica {}: new view {view:?} changes committed {seq:?}; view changes: {:?}",
                        self.id.0,
                        nv.body
                            .view_changes
                            .iter()
                            .map(|v| (
                                v.body.replica.0,
                                v.body.stable.seq.0,
                                v.body.evidence.iter().map(|e| (e.seq().0, e.view().0, e.pre_prepare().body.batch_digest)).collect::<Vec<_>>()
                            ))
                            .collect::<Vec<_>>()
                    );
                }
            }
            if let Err(e) = self.safety.check_vote(view, *seq, digest) {
                panic!("replica {}: {e}", self.id.0);
            }
            let committed = self.log.get(seq).is_some_and(|s| s.committed);
            match self.batch_for(*seq, &digest, &pre_prepare.body.nondet) {
                Some(batch) => self.accept_and_prepare(
                    Proposal {
                        pre_prepare: pre_prepare.clone(),
                        batch,
                    },
                    actions,
                ),
                None => {
                    // Bound to it now (the vote above; the new-view record makes it durable),
                    // prepared once its batch arrives.
                    let ticks = self.ticks;
                    let slot = self.log.entry(*seq).or_default();
                    slot.proposal = None;
                    slot.sent_commit = false;
                    slot.awaiting = Some(pre_prepare.clone());
                    slot.accepted_tick = ticks;
                }
            }
            if committed {
                if let Some(slot) = self.log.get_mut(seq) {
                    slot.committed = true;
                }
            }
        }
        // Proposals of old views above the plan are void.
        for (_, slot) in self.log.range_mut(max_seq.next()..) {
            if !slot.committed {
                slot.proposal = None;
                slot.awaiting = None;
                slot.sent_commit = false;
            }
        }
        // Bound to every re-issued proposal in the window: accepted, or awaiting its batch.
        invariant!(
            plan.slots
                .iter()
                .filter(|(seq, _)| self.in_window(*seq))
                .all(|(seq, _)| self.log.get(seq).is_some_and(|s| {
                    s.proposal
                        .as_ref()
                        .is_some_and(|p| p.pre_prepare.body.view == view)
                        || s.awaiting.as_ref().is_some_and(|a| a.body.view == view)
                })),
            "replica {}: new view {view:?} installed without binding every re-issued slot",
            self.id.0
        );
        self.request_awaited_batches(actions);
        self.next_seq = max_seq.max(self.last_executed).next();
        self.installing_view = false;
        // Give the new primary the requests clients were waiting on.
        let ticks = self.ticks;
        let waiting: Vec<Signed<Request>> = self
            .waiting
            .values_mut()
            .map(|(r, t)| {
                *t = ticks;
                r.clone()
            })
            .collect();
        if primary {
            let waiting_keys: Vec<_> = self.waiting.keys().copied().collect();
            for (key, request) in waiting_keys.into_iter().zip(waiting) {
                if self.pending_keys.insert(key) {
                    self.pending.push_back(request);
                }
            }
            self.waiting.clear();
        } else {
            for request in waiting {
                actions.push(Action::Send {
                    to: view.primary(self.n()),
                    message: Message::Client(ClientMessage::Request(request)),
                });
            }
            self.pending.clear();
            self.pending_keys.clear();
        }
        self.new_view_message = Some(nv);
        self.metrics.new_views_installed += 1;
        tracing::info!(replica = self.id.0, view = view.0, "new view installed");
        actions.push(Action::Notify(Notification::ViewEntered {
            view,
            active: true,
        }));
        let seqs: Vec<SeqNo> = self.log.keys().copied().collect();
        for seq in seqs {
            self.try_prepared(seq, actions);
        }
        self.execute_ready(actions);
        self.try_propose(actions);
        invariant!(
            self.halted
                || (self.view_active
                    && self.view == view
                    && self.new_view_message.as_ref().map(|nv| nv.body.view) == Some(view)),
            "replica {}: new view {view:?} not installed",
            self.id.0
        );
    }

    /// A peer missed the new view of `view` or later: sent ours if it is that recent.
    pub(in crate::core) fn on_query_new_view(
        &mut self,
        from: ReplicaId,
        view: View,
        actions: &mut Vec<Action>,
    ) {
        if let Some(nv) = &self.new_view_message {
            if nv.body.view >= view {
                actions.push(Action::Send {
                    to: from,
                    message: Message::ViewChange(ViewChangeMessage::NewView(nv.clone())),
                });
            }
        }
    }

    /// The batch a pre-prepare for `seq` with `digest` (an ordered digest) names, if this
    /// replica holds it: a null batch, or the batch of the slot's proposal, certificate or
    /// commit certificate.
    fn batch_for(&self, seq: SeqNo, digest: &Digest, nondet: &[u8]) -> Option<Batch> {
        if Batch::default().ordered_digest(nondet) == *digest {
            return Some(Batch::default());
        }
        let slot = self.log.get(&seq)?;
        if let Some(p) = slot.proposal.as_ref() {
            if p.pre_prepare.body.batch_digest == *digest {
                return Some(p.batch.clone());
            }
        }
        if let (Some(c), Some(b)) = (&slot.certificate, &slot.certified_batch) {
            if c.pre_prepare.body.batch_digest == *digest {
                return Some(b.clone());
            }
        }
        slot.commit_certificate
            .as_ref()
            .filter(|c| c.proposal.pre_prepare.body.batch_digest == *digest)
            .map(|c| c.proposal.batch.clone())
    }
}
