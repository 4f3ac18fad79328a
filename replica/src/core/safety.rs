//! Safety rules: every check that keeps a correct replica from contradicting itself.
//!
//! 1. **One proposal per (view, seq).** A replica never accepts (as a backup: sends a prepare
//!    for) or proposes (as the primary: signs a pre-prepare for) two different batch digests
//!    with the same view and sequence number.
//! 2. **Views only grow.** A replica never enters a view lower than or equal to one it has
//!    already entered (re-entering the same view is allowed only to install its new view), and
//!    never signs anything for a view below its current one.
//! 3. **Persist before send.** A signed pre-prepare or prepare leaves only after the
//!    `Accepted` WAL record of that proposal; a commit only after the `Prepared` record of its
//!    certificate; a view change only after the `EnteredView` record of its view; a new view
//!    only after the `InstalledView` record; a checkpoint only after its `CheckpointTaken`
//!    record. In an action list, the record comes first (the driver makes it durable before
//!    performing any later action), so a restarted replica remembers everything it ever said.
//! 4. **Commit only what prepared.** A commit for (v, n, d) is sent only with a prepared
//!    certificate for (v, n, d) in hand: the proposal and 2f matching prepares of view v.
//! 5. **Execute in order, once.** Sequence number n is executed only after n-1, only when
//!    committed (2f+1 matching commits of one view, or a commit certificate), and only once.
//! 6. **New views are recomputed.** A new view is installed only if its pre-prepares equal
//!    those every replica recomputes from the 2f+1 view changes it carries.
//!
//! Rules 1, 2 and 5 are checked here before the core acts; rule 3 is checked over each step's
//! action list ([`SafetyRules::check_actions`]); rules 4 and 6 by construction in the core, with
//! assertions.

use super::{Action, WalRecord};
use crate::wire::{AgreementMessage, Digest, Message, ReplicaId, SeqNo, View, ViewChangeMessage};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SafetyViolation {
    #[error(
        "rule 1: already voted for {existing:?} at view {view:?} seq {seq:?}, not {proposed:?}"
    )]
    ConflictingProposal {
        view: View,
        seq: SeqNo,
        existing: Digest,
        proposed: Digest,
    },
    #[error("rule 2: view {requested:?} is not above {current:?}")]
    ViewRegression { current: View, requested: View },
    #[error("rule 5: executing {seq:?} after {last:?}")]
    OutOfOrderExecution { last: SeqNo, seq: SeqNo },
}

/// What a replica has persisted, by message key (rule 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Said {
    Proposal(View, SeqNo, Digest),
    Prepared(View, SeqNo, Digest),
    EnteredView(View),
    InstalledView(View),
    Checkpoint(SeqNo),
}

#[derive(Debug, Default)]
pub struct SafetyRules {
    highest_view: View,
    /// Rule 1: the digest voted for, per sequence number and view (pruned below the stable
    /// checkpoint, so bounded by the log window times the views seen in it).
    votes: BTreeMap<SeqNo, BTreeMap<View, Digest>>,
    last_executed: SeqNo,
    /// Rule 3: what is durable (or pending durability ahead of any send).
    persisted: BTreeSet<Said>,
}

impl SafetyRules {
    pub fn new(view: View, last_executed: SeqNo) -> Self {
        SafetyRules {
            highest_view: view,
            last_executed,
            ..Default::default()
        }
    }

    pub fn highest_view(&self) -> View {
        self.highest_view
    }

    /// Rule 1: records a vote, or refuses a conflicting one. Voting twice for the same digest
    /// is fine (retransmission, restart).
    pub fn check_vote(
        &mut self,
        view: View,
        seq: SeqNo,
        digest: Digest,
    ) -> Result<(), SafetyViolation> {
        let per_view = self.votes.entry(seq).or_default();
        match per_view.get(&view) {
            Some(existing) if *existing != digest => Err(SafetyViolation::ConflictingProposal {
                view,
                seq,
                existing: *existing,
                proposed: digest,
            }),
            _ => {
                per_view.insert(view, digest);
                Ok(())
            }
        }
    }

    pub fn voted(&self, view: View, seq: SeqNo) -> Option<Digest> {
        self.votes.get(&seq).and_then(|v| v.get(&view)).copied()
    }

    /// Rule 2: `installing` re-enters the current view to install its new view.
    pub fn check_enter_view(
        &mut self,
        view: View,
        installing: bool,
    ) -> Result<(), SafetyViolation> {
        if view > self.highest_view || (installing && view == self.highest_view) {
            self.highest_view = view;
            Ok(())
        } else {
            Err(SafetyViolation::ViewRegression {
                current: self.highest_view,
                requested: view,
            })
        }
    }

    /// Rule 5.
    pub fn check_execute(&mut self, seq: SeqNo) -> Result<(), SafetyViolation> {
        if seq != self.last_executed.next() {
            return Err(SafetyViolation::OutOfOrderExecution {
                last: self.last_executed,
                seq,
            });
        }
        self.last_executed = seq;
        Ok(())
    }

    /// The state jumped to a checkpoint (state transfer or restart).
    pub fn reset_executed(&mut self, seq: SeqNo) {
        self.last_executed = seq;
    }

    pub fn forget_before(&mut self, stable: SeqNo) {
        self.votes = self.votes.split_off(&stable.next());
        self.persisted.retain(|s| match s {
            Said::Proposal(_, n, _) | Said::Prepared(_, n, _) => *n > stable,
            Said::Checkpoint(n) => *n >= stable,
            Said::EnteredView(_) | Said::InstalledView(_) => true,
        });
        // Keep only the newest few view records: older views are never spoken in again.
        let views: Vec<Said> = self
            .persisted
            .iter()
            .filter(|s| matches!(s, Said::EnteredView(_) | Said::InstalledView(_)))
            .copied()
            .collect();
        if views.len() > 4 {
            for s in &views[..views.len() - 4] {
                self.persisted.remove(s);
            }
        }
    }

    /// Notes a record as persisted (used when restoring from the WAL).
    pub fn note_persisted(&mut self, record: &WalRecord) {
        match record {
            WalRecord::Accepted(p) => {
                let b = &p.pre_prepare.body;
                self.persisted
                    .insert(Said::Proposal(b.view, b.seq, b.batch_digest));
            }
            WalRecord::Prepared(c) => {
                let b = &c.pre_prepare.body;
                self.persisted
                    .insert(Said::Prepared(b.view, b.seq, b.batch_digest));
            }
            WalRecord::EnteredView { view } => {
                self.persisted.insert(Said::EnteredView(*view));
            }
            WalRecord::InstalledView { view } => {
                self.persisted.insert(Said::InstalledView(*view));
            }
            WalRecord::CheckpointTaken { seq, .. } => {
                self.persisted.insert(Said::Checkpoint(*seq));
            }
            WalRecord::Snapshot(state) => {
                self.persisted.insert(Said::EnteredView(state.view));
                if state.view_active {
                    self.persisted.insert(Said::InstalledView(state.view));
                }
                for p in &state.accepted {
                    let b = &p.body;
                    self.persisted
                        .insert(Said::Proposal(b.view, b.seq, b.batch_digest));
                }
                for c in &state.prepared {
                    self.note_persisted(&WalRecord::Prepared(Box::new(c.clone())));
                }
                for c in &state.checkpoints {
                    self.persisted.insert(Said::Checkpoint(c.seq));
                }
            }
            WalRecord::Stable(_) | WalRecord::NewViewMessage(_) | WalRecord::Lock(_) => {}
        }
    }

    /// Rule 3 over one step's actions: every message this replica signs appears after the
    /// record that makes it recoverable. Returns a description of the first offence.
    pub fn check_actions(&mut self, me: ReplicaId, actions: &[Action]) -> Result<(), String> {
        for action in actions {
            let message = match action {
                Action::Persist(record) => {
                    self.note_persisted(record);
                    continue;
                }
                Action::Send { message, .. } | Action::Broadcast { message } => message,
                _ => continue,
            };
            let needed = match message {
                Message::Agreement(AgreementMessage::PrePrepare(p))
                    if p.pre_prepare.body.primary == me =>
                {
                    let b = &p.pre_prepare.body;
                    Some(Said::Proposal(b.view, b.seq, b.batch_digest))
                }
                Message::Agreement(AgreementMessage::Prepare(p)) if p.body.replica == me => {
                    Some(Said::Proposal(p.body.view, p.body.seq, p.body.batch_digest))
                }
                Message::Agreement(AgreementMessage::Commit(c)) if c.body.replica == me => {
                    Some(Said::Prepared(c.body.view, c.body.seq, c.body.batch_digest))
                }
                Message::Agreement(AgreementMessage::Checkpoint(c)) if c.body.replica == me => {
                    Some(Said::Checkpoint(c.body.seq))
                }
                Message::ViewChange(ViewChangeMessage::ViewChange(vc)) if vc.body.replica == me => {
                    Some(Said::EnteredView(vc.body.new_view))
                }
                Message::ViewChange(ViewChangeMessage::NewView(nv)) if nv.body.primary == me => {
                    Some(Said::InstalledView(nv.body.view))
                }
                _ => None,
            };
            if let Some(needed) = needed {
                // Messages below the stable checkpoint are never sent, so pruning cannot hide
                // a missing record.
                if !self.persisted.contains(&needed) {
                    return Err(format!(
                        "rule 3: {} sent before {:?} was persisted",
                        message.kind(),
                        needed
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_refuse_contradictions() {
        let mut s = SafetyRules::new(View(0), SeqNo(0));
        let a = Digest([1; 32]);
        let b = Digest([2; 32]);
        assert!(s.check_vote(View(0), SeqNo(1), a).is_ok());
        assert!(s.check_vote(View(0), SeqNo(1), a).is_ok());
        assert!(s.check_vote(View(0), SeqNo(1), b).is_err());
        assert!(s.check_vote(View(1), SeqNo(1), b).is_ok());
        assert!(s.check_enter_view(View(1), false).is_ok());
        assert!(s.check_enter_view(View(1), false).is_err());
        assert!(s.check_enter_view(View(1), true).is_ok());
        assert!(s.check_enter_view(View(0), true).is_err());
        assert!(s.check_execute(SeqNo(2)).is_err());
        assert!(s.check_execute(SeqNo(1)).is_ok());
        s.forget_before(SeqNo(1));
        assert_eq!(s.voted(View(0), SeqNo(1)), None);
    }
}
