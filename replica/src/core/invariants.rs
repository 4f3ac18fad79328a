//! Invariants of the core, checked after every step, and the pre- and postconditions of its
//! handlers ([`invariant!`]).
//!
//! A failed check is a bug in this replica, never a peer's doing (a faulty peer's messages are
//! logged, counted and ignored by the handlers), so it crashes the replica. The safety rules
//! over each step's actions ([`super::safety`]) are checked in every build; everything else
//! wherever [`CHECKED`] is on: in tests (CI runs `cargo test`), debug builds and the
//! simulator (the `sim` feature, in any profile).

use super::{Action, Core};

/// Whether the full invariants and the handlers' pre- and postconditions are checked.
pub(crate) const CHECKED: bool = cfg!(any(test, debug_assertions, feature = "sim"));

/// Asserts a pre- or postcondition of a handler where [`CHECKED`] is on. Only for what the
/// core's own logic guarantees: a failure is a bug, never a peer's doing.
macro_rules! invariant {
    ($condition:expr, $($message:tt)+) => {
        if $crate::core::invariants::CHECKED {
            assert!($condition, $($message)+);
        }
    };
}
pub(crate) use invariant;

impl Core {
    /// Checked after every step (see [`Replica::step`]): the safety rules over the step's
    /// actions and the view always; the rest where [`CHECKED`] is on.
    pub(super) fn check_invariants(&mut self, actions: &[Action]) -> Result<(), String> {
        self.safety.check_actions(self.id, actions)?;
        if self.halted {
            return Ok(());
        }
        if self.view != self.safety.highest_view() {
            return Err(format!(
                "view {:?} differs from the safety view {:?}",
                self.view,
                self.safety.highest_view()
            ));
        }
        if CHECKED {
            if let (Some(first), Some(last)) = (self.log.keys().next(), self.log.keys().next_back())
            {
                if !self.in_window(*first) || !self.in_window(*last) {
                    return Err(format!(
                        "log {first:?}..{last:?} outside the window above {:?}",
                        self.stable.seq
                    ));
                }
            }
            let installing = self
                .in_flight
                .iter()
                .any(|f| matches!(f.what, super::InFlightKind::Install { .. }));
            if self.last_executed < self.stable.seq
                && self.stable_ahead.is_none()
                && self.transfer.is_none()
                && !installing
            {
                return Err("executed below the stable checkpoint with no transfer pending".into());
            }
            let limit = self.config.protocol.pending_requests_max;
            if self.pending.len() > limit
                || self.waiting.len() > limit
                || self.deferred_reads.len() > limit
            {
                return Err("request queues over their bound".into());
            }
            if self.pending.len() != self.pending_keys.len() {
                return Err("pending requests and their keys disagree".into());
            }
            if self.view_active && self.is_primary() && self.next_seq <= self.stable.seq {
                return Err("primary's next sequence number is below the stable checkpoint".into());
            }
            for (seq, slot) in &self.log {
                if let Some(p) = &slot.proposal {
                    if p.pre_prepare.body.seq != *seq {
                        return Err(format!(
                            "slot {seq:?} holds a proposal for {:?}",
                            p.pre_prepare.body.seq
                        ));
                    }
                }
                let speculative = *seq > self.last_executed && *seq <= self.spec_executed;
                if slot.executed.is_some() != speculative {
                    return Err(format!(
                        "slot {seq:?} speculation record {} outside ({:?}, {:?}]",
                        slot.executed.is_some(),
                        self.last_executed,
                        self.spec_executed
                    ));
                }
            }
            if self.spec_executed < self.last_executed {
                return Err("service state behind the committed prefix".into());
            }
            let interval = self.config.protocol.checkpoint_interval;
            if (self.last_executed.0 + 1..self.spec_executed.0).any(|s| s % interval == 0) {
                return Err(format!(
                    "speculation ran past an uncommitted checkpoint ({:?}..{:?})",
                    self.last_executed, self.spec_executed
                ));
            }
            if self.spec_executed > self.last_executed && !self.config.protocol.fast_path {
                return Err("speculation with the fast path off".into());
            }
            if let Some(t) = &self.transfer {
                // A retry, or a transfer to a newer target, rolls back to the base again.
                if !self.own_checkpoints.contains_key(&t.base) {
                    return Err(format!("the state transfer's base {:?} is gone", t.base));
                }
                if self.last_executed != t.base || t.target.seq <= t.base {
                    return Err(format!(
                        "transferring {:?} over base {:?} with the service at {:?}",
                        t.target.seq, t.base, self.last_executed
                    ));
                }
            }
        }
        Ok(())
    }
}
