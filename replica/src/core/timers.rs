//! Time in the core: ticks, counted from [`super::Event::Tick`] (the core reads no clock).
//! Each tick runs every timer that is due, each by its named handler, always in the order of
//! [`Replica::on_tick`]:
//! - `on_state_transfer_timeout` (`state_transfer/mod.rs`): resend, chase a newer target;
//! - `on_view_change_timeout` (`view_change/start.rs`): the primary owes progress, or the new
//!   view is late;
//! - `on_retransmit_timeout` (here): resend this replica's part of what is not committed;
//! - `on_fill_hole_timeout` (`fast_path.rs`) and the awaited batches (`catch_up.rs`);
//! - `on_catch_up_timeout` (`catch_up.rs`): fetch committed batches, or start a transfer.

use super::{Action, Core};
use crate::wire::{AgreementMessage, Message, ViewChangeMessage};

impl Core {
    /// One tick of the driver's clock: runs every timer that is due, each by its named
    /// handler, always in this order.
    pub(super) fn on_tick(&mut self, now_ns: u64, actions: &mut Vec<Action>) {
        self.ticks += 1;
        self.now_ns = self.now_ns.max(now_ns);
        let retransmit_ticks = self.config.protocol.retransmit_ticks;
        if self.transfer.is_some() {
            self.on_state_transfer_timeout(actions);
        }
        if self.view_change_timer_expired() {
            self.on_view_change_timeout(actions);
        }
        if self.ticks % retransmit_ticks == 0 {
            self.on_retransmit_timeout(actions);
            self.on_lock_timeout(actions);
        }
        if self.view_active {
            self.on_fill_hole_timeout(actions);
            if self.ticks % retransmit_ticks == 0 {
                self.request_awaited_batches(actions);
            }
        }
        if self.transfer.is_none() {
            self.on_catch_up_timeout(actions);
        }
        self.try_propose(actions);
    }

    /// Whether the view-change timer ran out. In an active view it runs while clients wait on
    /// requests or proposals of this view are not committed: the primary owes progress on
    /// both (the primary watches its own proposals too, so a view whose quorum fell apart is
    /// left even when no backup notices). During a view change, it is the deadline for the new
    /// view (armed once 2f+1 replicas want it).
    fn view_change_timer_expired(&mut self) -> bool {
        if !self.view_active {
            return self.view_change_deadline.is_some_and(|d| self.ticks >= d);
        }
        let view = self.view;
        let oldest_proposal = self
            .log
            .range(self.last_executed.next()..)
            .filter(|(_, s)| {
                !s.committed
                    && s.proposal
                        .as_ref()
                        .is_some_and(|p| p.pre_prepare.body.view == view)
            })
            .map(|(_, s)| s.accepted_tick)
            .min();
        let oldest = self
            .waiting
            .values()
            .map(|(_, t)| *t)
            .chain(oldest_proposal)
            .min();
        // A replica that is catching up does not suspect the primary: the group made
        // progress without it (a stable certificate above what it executed proves it), and
        // a view change started alone would leave it outside agreement until the others
        // change view too. Its clock starts once it has caught up.
        if self.transfer.is_some() || self.stable_ahead.is_some() {
            self.caught_up_tick = self.ticks;
        }
        oldest.is_some_and(|t| {
            self.ticks >= t.max(self.caught_up_tick) + self.view_change_timeout_ticks
        })
    }

    /// Every `retransmit_ticks`: resends this replica's part of whatever is not committed
    /// yet (messages get lost).
    fn on_retransmit_timeout(&mut self, actions: &mut Vec<Action>) {
        if !self.view_active {
            if let Some(vc) = self.view_changes.get(&self.id) {
                if vc.body.new_view == self.view {
                    actions.push(Action::Broadcast {
                        message: Message::ViewChange(ViewChangeMessage::ViewChange(vc.clone())),
                    });
                }
            }
            return;
        }
        let primary = self.is_primary();
        // Our commits for batches we executed (after a restart, from our checkpoint) without
        // knowing they committed everywhere: others may still need them.
        for (_, slot) in self.log.range(..=self.last_executed) {
            if slot.sent_commit && !slot.committed {
                if let Some(commit) = slot.commits.get(&self.id) {
                    actions.push(Action::Broadcast {
                        message: Message::Agreement(AgreementMessage::Commit(commit.clone())),
                    });
                }
            }
        }
        for (_, slot) in self.log.range(self.last_executed.next()..) {
            let Some(p) = &slot.proposal else { continue };
            if p.pre_prepare.body.view != self.view || slot.committed {
                continue;
            }
            if primary {
                actions.push(Action::Broadcast {
                    message: Message::Agreement(AgreementMessage::PrePrepare(p.clone())),
                });
            } else if let Some(prepare) = slot.prepares.get(&self.id) {
                actions.push(Action::Broadcast {
                    message: Message::Agreement(AgreementMessage::Prepare(prepare.clone())),
                });
            }
            if slot.sent_commit {
                if let Some(commit) = slot.commits.get(&self.id) {
                    actions.push(Action::Broadcast {
                        message: Message::Agreement(AgreementMessage::Commit(commit.clone())),
                    });
                }
            }
        }
        // Our newest checkpoint vote, while it is not stable.
        if let Some((_, votes)) = self.checkpoint_votes.iter().next_back() {
            if let Some(mine) = votes.get(&self.id) {
                actions.push(Action::Broadcast {
                    message: Message::Agreement(AgreementMessage::Checkpoint(mine.clone())),
                });
            }
        }
    }
}
