//! Catching up from peers on what the log lacks, short of a state transfer:
//! - committed batches (`FetchCommitted`, answered with commit certificates, or with a stable
//!   certificate when the asker is below our window), asked for when this replica made no
//!   progress for `catch_up_ticks` while others work on later batches;
//! - batches by sequence number and view (`FillHole`, answered with `Filled` proposals): the
//!   fast path's holes (see `fast_path.rs`) and the batches a new view bound this replica to
//!   without it holding them (*awaited* slots, see `view_change/new_view.rs`).

use super::{Action, Core};
use crate::wire::{
    AgreementMessage, CommitCertificate, Message, Principal, Proposal, ReplicaId, SeqNo,
    StateTransferMessage, View,
};
use std::collections::BTreeSet;

/// Batches whose commit certificates one `FetchCommitted` answer carries at most.
const FETCH_BATCHES_MAX: u64 = 16;
/// Operation bytes one `FillHole` answer sends at most (one batch, however large, always goes).
const FETCH_BYTES_MAX: usize = 16 << 20;

impl Core {
    /// A peer asks for the commit certificates of `first..=last`: it gets those of the slots
    /// we executed, up to [`FETCH_BATCHES_MAX`], and our stable certificate too if it asks
    /// below our window.
    pub(super) fn on_fetch_committed(
        &mut self,
        from: ReplicaId,
        first: SeqNo,
        last: SeqNo,
        actions: &mut Vec<Action>,
    ) {
        if first <= self.stable.seq && self.stable.seq > SeqNo(0) {
            actions.push(Action::Send {
                to: from,
                message: Message::StateTransfer(StateTransferMessage::ReplyStable(
                    self.stable.clone(),
                )),
            });
        }
        let start = first.max(self.stable.seq.next());
        let end = last
            .min(SeqNo(start.0.saturating_add(FETCH_BATCHES_MAX - 1)))
            .min(self.last_executed);
        if start > end {
            return;
        }
        for (_, slot) in self.log.range(start..=end) {
            if let Some(cert) = &slot.commit_certificate {
                actions.push(Action::Send {
                    to: from,
                    message: Message::Agreement(AgreementMessage::Committed(cert.clone())),
                });
            }
        }
    }

    /// A relayed commit certificate for a batch we have not executed: adopted when 2f+1 of its
    /// commits carry valid signatures, or when f+1 relayers vouch for the same proposal.
    pub(super) fn on_committed(
        &mut self,
        from: ReplicaId,
        cert: CommitCertificate,
        actions: &mut Vec<Action>,
    ) {
        let b = cert.proposal.pre_prepare.body.clone();
        if b.seq <= self.last_executed || !self.in_window(b.seq) {
            return;
        }
        if b.primary != b.view.primary(self.n()) {
            return self.misbehaved(
                Principal::Replica(from),
                "commit certificate for a non-primary's proposal",
                actions,
            );
        }
        let mut signers = BTreeSet::new();
        for c in &cert.commits {
            if c.body.view != b.view || c.body.seq != b.seq || c.body.batch_digest != b.batch_digest
            {
                return self.misbehaved(
                    Principal::Replica(from),
                    "commit certificate does not match",
                    actions,
                );
            }
            signers.insert(c.body.replica);
        }
        if signers.iter().any(|r| r.0 as usize >= self.n()) {
            return self.misbehaved(
                Principal::Replica(from),
                "commit certificate names an unknown replica",
                actions,
            );
        }
        // The one place the quorum of a relayed certificate is enforced, after the verifier
        // dropped the commits whose signature failed. Too few left is not held against the
        // relayer: a correct replica never verifies the commits it collects, so a faulty
        // replica's forged one can be what made the difference, and then no correct replica
        // may hold 2f+1 valid signatures for that batch. So a relayer's answer also counts as
        // its word that the batch committed there (its MAC proves who says so): f+1 relayers
        // vouching for one proposal include a correct one, which committed it after 2f+1
        // authenticated commits. The catch-up timer asks the next replica each time.
        if signers.len() < self.quorum() {
            let digest = b.batch_digest;
            let vouches = self.commit_vouches.entry(b.seq).or_default();
            vouches.retain(|(r, _)| *r != from);
            vouches.push((from, digest));
            let vouchers = vouches.iter().filter(|(_, d)| *d == digest).count();
            if vouchers <= self.f() {
                return;
            }
        }
        self.commit_vouches.remove(&b.seq);
        let slot = self.log.entry(b.seq).or_default();
        if slot.committed {
            return;
        }
        slot.proposal = Some(cert.proposal.clone());
        slot.awaiting = None;
        slot.sent_commit = true;
        slot.committed = true;
        slot.commit_certificate = Some(Box::new(cert));
        self.metrics.fetched_batches += 1;
        self.execute_ready(actions);
    }

    /// A peer asks for the proposals of `view` at `first..=last`: sent, each as we accepted it
    /// (the primary's signature is what counts), up to [`FETCH_BYTES_MAX`] of operations.
    pub(super) fn on_fill_hole(
        &mut self,
        from: ReplicaId,
        view: View,
        first: SeqNo,
        last: SeqNo,
        actions: &mut Vec<Action>,
    ) {
        if view != self.view || !self.view_active {
            return;
        }
        let end = last.min(SeqNo(first.0.saturating_add(FETCH_BATCHES_MAX - 1)));
        if first > end {
            return;
        }
        // A batch is up to `batch_bytes_max`: bound what one request makes us queue.
        let mut budget = FETCH_BYTES_MAX;
        for (_, slot) in self.log.range(first..=end) {
            if let Some(p) = &slot.proposal {
                if p.pre_prepare.body.view == view {
                    let bytes = p.batch.operation_bytes().max(1);
                    if bytes > budget && budget < FETCH_BYTES_MAX {
                        break;
                    }
                    budget = budget.saturating_sub(bytes);
                    actions.push(Action::Send {
                        to: from,
                        message: Message::Agreement(AgreementMessage::Filled(Box::new(p.clone()))),
                    });
                }
            }
        }
    }

    /// A proposal sent to fill a hole (fast path) or an awaited slot: handled as a pre-prepare
    /// relayed by anyone.
    pub(super) fn on_filled(
        &mut self,
        from: ReplicaId,
        proposal: Proposal,
        actions: &mut Vec<Action>,
    ) {
        let awaited = self
            .log
            .get(&proposal.pre_prepare.body.seq)
            .is_some_and(|s| s.awaiting.is_some());
        if !self.config.protocol.fast_path && !awaited {
            return;
        }
        self.accept_pre_prepare(from, proposal, actions);
    }

    /// The batch of a pre-prepare the installed new view bound this replica to: its digest
    /// was checked against the pre-prepare (and the primary's signature) by the verifier, and
    /// the agreed value was checked when it was first proposed, so only the limits remain.
    pub(super) fn take_awaited_batch(
        &mut self,
        from: ReplicaId,
        proposal: Proposal,
        actions: &mut Vec<Action>,
    ) {
        let p = &self.config.protocol;
        if proposal.batch.requests.len() > p.batch_requests_max
            || proposal.batch.operation_bytes() > p.batch_bytes_max
        {
            return self.misbehaved(Principal::Replica(from), "oversized batch", actions);
        }
        let seq = proposal.pre_prepare.body.seq;
        self.metrics.fetched_bodies += 1;
        self.accept_and_prepare(proposal, actions);
        self.try_prepared(seq, actions);
        self.execute_ready(actions);
    }

    /// Asks one peer (a different one each time) for the batches of the slots this replica
    /// awaits (see `Slot::awaiting`); called when a new view leaves some missing and then
    /// every retransmission interval until none is.
    pub(super) fn request_awaited_batches(&mut self, actions: &mut Vec<Action>) {
        let mut awaited = self
            .log
            .iter()
            .filter(|(_, s)| s.awaiting.is_some())
            .map(|(seq, _)| *seq);
        let Some(first) = awaited.next() else {
            return;
        };
        let last = awaited.last().unwrap_or(first);
        let to = self.next_peer();
        actions.push(Action::Send {
            to,
            message: Message::Agreement(AgreementMessage::FillHole {
                view: self.view,
                from: first,
                to: last,
            }),
        });
    }

    /// Every tick without a state transfer: a replica that knows of a stable checkpoint above
    /// its state starts a transfer to it, and one that made no progress for `catch_up_ticks`
    /// while others work on later batches asks the next peer for committed ones.
    pub(super) fn on_catch_up_timeout(&mut self, actions: &mut Vec<Action>) {
        let catch_up_ticks = self.config.protocol.catch_up_ticks;
        if self.stable_answers.is_some() && self.ticks % catch_up_ticks.max(1) == 0 {
            actions.push(Action::Broadcast {
                message: Message::StateTransfer(StateTransferMessage::QueryStable),
            });
        }
        let stalled = self.ticks >= self.last_progress_tick + catch_up_ticks;
        if let Some(cert) = self.stable_ahead.clone() {
            if cert.seq > self.last_executed && (stalled || self.last_executed < self.stable.seq) {
                self.begin_transfer(cert, actions);
            }
        }
        if self.transfer.is_none()
            && self.highest_seen > self.last_executed
            && stalled
            && self.ticks >= self.last_fetch_tick + catch_up_ticks
        {
            self.last_fetch_tick = self.ticks;
            let to = self.next_peer();
            actions.push(Action::Send {
                to,
                message: Message::Agreement(AgreementMessage::FetchCommitted {
                    from: self.last_executed.next(),
                    to: self.highest_seen,
                }),
            });
        }
    }

    /// The next replica to ask, in turn (never this one).
    pub(super) fn next_peer(&mut self) -> ReplicaId {
        let n = self.n() as u32;
        self.fetch_rotation = (self.fetch_rotation + 1) % n;
        if self.fetch_rotation == self.id.0 {
            self.fetch_rotation = (self.fetch_rotation + 1) % n;
        }
        ReplicaId(self.fetch_rotation)
    }
}
