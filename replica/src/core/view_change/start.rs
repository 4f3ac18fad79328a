//! Leaving a view (PROTOCOLS §2.8): on a timeout or a proof of misbehaviour a replica enters
//! the next view, persists that, and broadcasts a view change carrying its stable checkpoint
//! and its evidence ([`Replica::evidence`], in the format of the module doc of [`super`]); f+1
//! view changes for higher views make it join the smallest of them; 2f+1 for its view arm the
//! timer that bounds the wait for the new view.

use super::super::invariants::invariant;
use super::super::{Action, Core, Notification, WalRecord};
use super::valid_view_change;
use crate::wire::{
    Evidence, Message, Principal, ReplicaId, Signed, View, ViewChange, ViewChangeMessage,
};

impl Core {
    /// The primary of the current view (or the view change to it) took too long.
    pub(in crate::core) fn on_view_change_timeout(&mut self, actions: &mut Vec<Action>) {
        let next = self.view.next();
        self.start_view_change(next, actions);
    }

    /// Enters `new_view` (rule 2), persists that, and broadcasts our view change.
    fn start_view_change(&mut self, new_view: View, actions: &mut Vec<Action>) {
        if self.safety.check_enter_view(new_view, false).is_err() {
            return;
        }
        self.view = new_view;
        self.view_active = false;
        self.new_view_message = None;
        self.proposed.clear();
        let evidence = self.evidence();
        let vc = self.signer.sign(ViewChange {
            new_view,
            replica: self.id,
            stable: self.stable.clone(),
            evidence,
        });
        actions.push(Action::Persist(WalRecord::EnteredView { view: new_view }));
        actions.push(Action::Broadcast {
            message: Message::ViewChange(ViewChangeMessage::ViewChange(vc.clone())),
        });
        self.view_changes.insert(self.id, vc);
        // The timer for the new view starts only once 2f+1 replicas want it (PBFT): a replica
        // alone ahead must not keep climbing views the others can never catch up with.
        self.view_change_deadline = None;
        self.arm_view_change_timer();
        // Back off: each consecutive view change waits twice as long for its new view.
        self.view_change_timeout_ticks = (self.view_change_timeout_ticks * 2)
            .min(self.config.protocol.view_change_timeout_ticks_max);
        self.metrics.view_changes_started += 1;
        tracing::info!(replica = self.id.0, view = new_view.0, "view change");
        actions.push(Action::Notify(Notification::ViewEntered {
            view: new_view,
            active: false,
        }));
        invariant!(
            !self.view_active
                && self.view == new_view
                && self.view_changes.get(&self.id).map(|vc| vc.body.new_view) == Some(new_view),
            "replica {}: entered {new_view:?} without its view change",
            self.id.0
        );
        self.maybe_send_new_view(actions);
    }

    /// A peer's view change: answered with our new view if it is behind; otherwise kept, and
    /// f+1 for higher views make us join the smallest of them.
    pub(in crate::core) fn on_view_change(
        &mut self,
        from: ReplicaId,
        vc: Signed<ViewChange>,
        actions: &mut Vec<Action>,
    ) {
        if !valid_view_change(&self.config, &self.genesis, &vc.body) {
            return self.misbehaved(Principal::Replica(from), "malformed view change", actions);
        }
        let target = vc.body.new_view;
        if target < self.view || (target == self.view && self.view_active) {
            // It is behind: hand it the new view that installed ours.
            if let Some(nv) = &self.new_view_message {
                actions.push(Action::Send {
                    to: from,
                    message: Message::ViewChange(ViewChangeMessage::NewView(nv.clone())),
                });
            }
            return;
        }
        if self
            .view_changes
            .get(&from)
            .is_some_and(|old| old.body.new_view >= target)
        {
            return;
        }
        self.view_changes.insert(from, vc);
        self.arm_view_change_timer();
        // f+1 replicas want a higher view: at least one correct one timed out, so join the
        // smallest of those views rather than wait for our own timer.
        let mut higher: Vec<View> = self
            .view_changes
            .values()
            .filter(|v| v.body.replica != self.id && v.body.new_view > self.view)
            .map(|v| v.body.new_view)
            .collect();
        if higher.len() > self.f() {
            higher.sort();
            self.start_view_change(higher[0], actions);
        }
        self.maybe_send_new_view(actions);
    }

    /// Arms the deadline for the new view once 2f+1 replicas want this view or a later one.
    fn arm_view_change_timer(&mut self) {
        if self.view_active || self.view_change_deadline.is_some() {
            return;
        }
        // Replicas that asked for this view or a later one have all given up on the views
        // below it.
        let support = self
            .view_changes
            .values()
            .filter(|v| v.body.new_view >= self.view)
            .count();
        if support >= self.quorum() {
            self.view_change_deadline = Some(self.ticks + self.view_change_timeout_ticks);
        }
    }

    /// The view-change evidence for every slot above the stable checkpoint, in the format of
    /// `view_change` (PROTOCOLS §2.9): the prepared certificate, then, on the fast path, the
    /// proposal accepted in a higher view than any certificate held.
    ///
    /// The certificate is reported even when a later proposal was accepted: reporting only
    /// the proposal would let a batch that committed under the certificate vanish when we are
    /// the only replica of the next quorum that prepared it (seed 3786). A higher-view
    /// proposal with the certificate's content adds only a view; it is reported too, and
    /// `plan_new_view` counts a content at the highest view each reporter gives it.
    pub(in crate::core) fn evidence(&self) -> Vec<Evidence> {
        let fast = self.config.protocol.fast_path;
        let mut evidence = Vec::new();
        for slot in self.log.values() {
            match (&slot.certificate, &slot.proposal) {
                (Some(c), Some(p)) => {
                    evidence.push(Evidence::Prepared(c.clone()));
                    if fast && p.pre_prepare.body.view > c.pre_prepare.body.view {
                        evidence.push(Evidence::Accepted(p.pre_prepare.clone()));
                    }
                }
                (Some(c), None) => evidence.push(Evidence::Prepared(c.clone())),
                (None, Some(p)) if fast => evidence.push(Evidence::Accepted(p.pre_prepare.clone())),
                (None, _) => {}
            }
        }
        evidence
    }
}
