//! The normal case (PROTOCOLS §2.3): the primary cuts batches and proposes them
//! (pre-prepare); backups accept a proposal, persist it and prepare; 2f matching prepares make
//! a prepared certificate and a commit; 2f+1 matching commits commit the batch; committed
//! batches run in sequence order, with replies to the clients and a checkpoint every
//! `checkpoint_interval`.
//!
//! In: pre-prepares, prepares and commits (authenticated). Out: the WAL records, the messages,
//! the replies. Execution itself is the execution stage's (see `executed.rs`).

use super::execution::{ExecutedRequest, Lookup};
use super::invariants::invariant;
use super::{same_content, Action, Core, Notification, WalRecord};
use crate::wire::{
    chain_history, AgreementMessage, Batch, Commit, CommitCertificate, Digest, Message, PrePrepare,
    Prepare, PreparedCertificate, Principal, Proposal, ReplicaId, SeqNo, Signed, View,
    ViewChangeMessage,
};

impl Core {
    /// Moves the primary's next sequence number past executed and committed slots, and
    /// past slots already bound in this view (while a new view is being installed, its
    /// re-issued slots are bound before `next_seq` moves past them, and a proposal made in
    /// between, such as a null batch of the checkpoint padding, would equivocate).
    fn skip_committed_seqs(&mut self) {
        if self.next_seq <= self.last_executed {
            self.next_seq = self.last_executed.next();
        }
        let view = self.view;
        while self.log.get(&self.next_seq).is_some_and(|s| {
            s.committed
                || s.proposal
                    .as_ref()
                    .is_some_and(|p| p.pre_prepare.body.view == view)
                || s.awaiting.as_ref().is_some_and(|a| a.body.view == view)
        }) {
            self.next_seq = self.next_seq.next();
        }
    }

    /// Primary: cuts batches from the queue while the window and the pipeline allow.
    pub(super) fn try_propose(&mut self, actions: &mut Vec<Action>) {
        if !self.view_active
            || self.installing_view
            || !self.is_primary()
            || self.transfer.is_some()
        {
            return;
        }
        let interval = self.config.protocol.checkpoint_interval;
        let p = &self.config.protocol;
        let (batch_max, bytes_max, pipeline) = (
            p.batch_requests_max,
            p.batch_bytes_max,
            p.pipeline_batches_max,
        );
        // Sequence numbers this replica learnt were committed (executed, or proven by a commit
        // certificate) are never proposed again; that happens to a primary of a view the
        // others already left.
        self.skip_committed_seqs();
        let padding = |core: &Self| {
            // Null batches up to the checkpoint boundary, when the state has lock work
            // waiting there (activations and merges happen only inside checkpoints).
            core.pad_to_checkpoint
                && core.pending.is_empty()
                && (core.next_seq.0 - 1) % interval != 0
        };
        while (!self.pending.is_empty() || padding(self))
            && self.next_seq <= self.high_water()
            && self.next_seq.0.saturating_sub(self.last_executed.0) <= pipeline
        {
            let mut batch = Batch::default();
            let mut bytes = 0usize;
            while let Some(front) = self.pending.front() {
                let size = front.body.operation.len();
                if batch.requests.len() >= batch_max
                    || (!batch.requests.is_empty() && bytes + size > bytes_max)
                {
                    break;
                }
                let Some(request) = self.pending.pop_front() else {
                    break;
                };
                let key = (request.body.client, request.body.timestamp);
                self.pending_keys.remove(&key);
                if self.replies.lookup(&request) != Lookup::New || self.proposed.contains(&key) {
                    continue;
                }
                bytes += size;
                self.proposed.insert(key);
                batch.requests.push(request);
            }
            if batch.requests.is_empty() && !padding(self) {
                continue;
            }
            let seq = self.next_seq;
            invariant!(
                self.in_window(seq) && seq > self.last_executed,
                "replica {}: proposing {seq:?}, outside the window above {:?} or executed",
                self.id.0,
                self.stable.seq
            );
            let nondet = self.policy.propose_nondet(self.now_ns);
            let batch_digest = batch.ordered_digest(&nondet);
            // Without our own chain below `seq` (a restart, or a committed slot skipped) the
            // history is a placeholder no backup accepts speculatively: those batches take
            // the commit path, which never looks at histories.
            let previous = self.proposed_history(SeqNo(seq.0 - 1)).unwrap_or_default();
            let history = chain_history(&previous, seq, &batch_digest, &nondet);
            let pre_prepare = self.signer.sign(PrePrepare {
                view: self.view,
                seq,
                batch_digest,
                nondet,
                primary: self.id,
                history,
            });
            if let Err(e) = self
                .safety
                .check_vote(self.view, seq, pre_prepare.body.batch_digest)
            {
                panic!("primary {} would equivocate: {e}", self.id.0);
            }
            let proposal = Proposal { pre_prepare, batch };
            self.next_seq = seq.next();
            self.skip_committed_seqs();
            self.highest_seen = self.highest_seen.max(seq);
            actions.push(Action::Persist(WalRecord::Accepted(Box::new(
                proposal.clone(),
            ))));
            actions.push(Action::Broadcast {
                message: Message::Agreement(AgreementMessage::PrePrepare(proposal.clone())),
            });
            let ticks = self.ticks;
            let slot = self.log.entry(seq).or_default();
            assert!(
                !slot.committed,
                "replica {}: proposing into committed {seq:?}",
                self.id.0
            );
            slot.proposal = Some(proposal);
            slot.sent_commit = false;
            slot.accepted_tick = ticks;
            // With f=0 (one replica) no prepare will ever arrive to trigger this, and 0
            // prepares already make a prepared certificate; with f>0 it returns at once.
            self.try_prepared(seq, actions);
        }
        if self.pad_to_checkpoint && (self.next_seq.0 - 1) % interval == 0 {
            self.pad_to_checkpoint = false;
        }
        self.speculate(actions);
    }

    /// The history of this view's proposal at `seq` (the anchor at the view's checkpoint).
    pub fn proposed_history(&self, seq: SeqNo) -> Option<Digest> {
        if let Some((anchor_seq, anchor)) = self.view_anchor {
            if seq == anchor_seq {
                return Some(anchor);
            }
            if seq < anchor_seq {
                return None;
            }
        } else {
            return None;
        }
        let slot = self.log.get(&seq)?;
        let p = slot
            .proposal
            .as_ref()
            .map(|p| &p.pre_prepare)
            .or(slot.awaiting.as_ref())?;
        (p.body.view == self.view).then_some(p.body.history)
    }

    /// Traffic from a view we never entered: we missed its new view (e.g. while down), so ask
    /// the sender for it, at most once per retransmission interval.
    fn note_view_ahead(&mut self, from: ReplicaId, view: View, actions: &mut Vec<Action>) {
        // Traffic from a view we never entered: we missed its new view (e.g. while down).
        let due = self
            .last_view_query_tick
            .is_none_or(|t| self.ticks >= t + self.config.protocol.retransmit_ticks);
        if view > self.view && due {
            self.last_view_query_tick = Some(self.ticks);
            actions.push(Action::Send {
                to: from,
                message: Message::ViewChange(ViewChangeMessage::QueryNewView { view }),
            });
        }
    }

    /// A pre-prepare from the primary (a backup's is misbehaviour).
    pub(super) fn on_pre_prepare(
        &mut self,
        from: ReplicaId,
        proposal: Proposal,
        actions: &mut Vec<Action>,
    ) {
        if from != self.primary() && proposal.pre_prepare.body.view == self.view {
            return self.misbehaved(
                Principal::Replica(from),
                "pre-prepare from a backup",
                actions,
            );
        }
        self.accept_pre_prepare(from, proposal, actions);
    }

    /// A pre-prepare straight from the primary, or relayed by anyone to fill a hole (the
    /// primary's signature is what counts).
    pub(super) fn accept_pre_prepare(
        &mut self,
        from: ReplicaId,
        proposal: Proposal,
        actions: &mut Vec<Action>,
    ) {
        let b = proposal.pre_prepare.body.clone();
        self.highest_seen = self.highest_seen.max(b.seq.min(self.high_water()));
        if b.view > self.view {
            return self.note_view_ahead(from, b.view, actions);
        }
        if b.view < self.view || !self.view_active {
            return;
        }
        let awaited = self
            .log
            .get(&b.seq)
            .and_then(|s| s.awaiting.as_ref())
            .is_some_and(|a| a.body == b);
        if awaited {
            return self.take_awaited_batch(from, proposal, actions);
        }
        if self.is_primary() {
            return;
        }
        if b.primary != self.primary() {
            return self.misbehaved(
                Principal::Replica(from),
                "pre-prepare from a backup",
                actions,
            );
        }
        if !self.in_window(b.seq) || b.seq <= self.last_executed {
            return;
        }
        let p = &self.config.protocol;
        if proposal.batch.requests.len() > p.batch_requests_max
            || proposal.batch.operation_bytes() > p.batch_bytes_max
        {
            return self.misbehaved(Principal::Replica(from), "oversized batch", actions);
        }
        if let Some(existing) = self.safety.voted(b.view, b.seq) {
            if existing != b.batch_digest {
                // Rule 1: the primary equivocated; keep our first vote.
                return self.misbehaved(
                    Principal::Replica(from),
                    "equivocating pre-prepare",
                    actions,
                );
            }
            return; // duplicate
        }
        if let Some(slot) = self.log.get(&b.seq) {
            if slot.committed {
                return;
            }
        }
        if !proposal.batch.requests.is_empty() && !self.policy.check_nondet(&b.nondet, self.now_ns)
        {
            return self.misbehaved(
                Principal::Replica(from),
                "unacceptable nondeterministic value",
                actions,
            );
        }
        if proposal
            .batch
            .requests
            .iter()
            .any(|r| r.body.operation.len() > p.operation_bytes_max)
        {
            return self.misbehaved(
                Principal::Replica(from),
                "oversized operation in batch",
                actions,
            );
        }
        if let Err(e) = self.safety.check_vote(b.view, b.seq, b.batch_digest) {
            tracing::warn!(replica = self.id.0, %e, "refused");
            return;
        }
        self.accept_and_prepare(proposal, actions);
        self.try_prepared(b.seq, actions);
        self.speculate(actions);
        self.note_hole();
    }

    /// Backup: records an accepted proposal durably, then sends its prepare (rule 3).
    pub(super) fn accept_and_prepare(&mut self, proposal: Proposal, actions: &mut Vec<Action>) {
        let b = proposal.pre_prepare.body.clone();
        // Every caller took the vote first (rule 1), within the window.
        invariant!(
            self.safety.voted(b.view, b.seq) == Some(b.batch_digest) && self.in_window(b.seq),
            "replica {}: accepting {:?} at {:?} without its vote or outside the window",
            self.id.0,
            b.view,
            b.seq
        );
        actions.push(Action::Persist(WalRecord::Accepted(Box::new(
            proposal.clone(),
        ))));
        let ticks = self.ticks;
        let slot = self.log.entry(b.seq).or_default();
        slot.proposal = Some(proposal);
        slot.awaiting = None;
        slot.sent_commit = false;
        slot.accepted_tick = ticks;
        if b.primary != self.id {
            let prepare = self.signer.sign(Prepare {
                view: b.view,
                seq: b.seq,
                batch_digest: b.batch_digest,
                replica: self.id,
            });
            slot.prepares.insert(self.id, prepare.clone());
            actions.push(Action::Broadcast {
                message: Message::Agreement(AgreementMessage::Prepare(prepare)),
            });
        }
    }

    /// A backup's prepare: counted towards a prepared certificate (the latest per replica).
    pub(super) fn on_prepare(
        &mut self,
        from: ReplicaId,
        prepare: Signed<Prepare>,
        actions: &mut Vec<Action>,
    ) {
        let b = prepare.body.clone();
        if b.view > self.view {
            self.note_view_ahead(from, b.view, actions);
        }
        if b.view < self.view || !self.in_window(b.seq) {
            return;
        }
        self.highest_seen = self.highest_seen.max(b.seq);
        let slot = self.log.entry(b.seq).or_default();
        match slot.prepares.get(&from) {
            Some(old) if old.body.view > b.view => return,
            Some(old) if old.body.view == b.view => {
                if old.body.batch_digest != b.batch_digest {
                    return self.misbehaved(
                        Principal::Replica(from),
                        "conflicting prepares",
                        actions,
                    );
                }
                return;
            }
            _ => {}
        }
        slot.prepares.insert(from, prepare);
        self.try_prepared(b.seq, actions);
    }

    /// A commit: counted towards committing the slot, and kept as a spare in its certificate.
    pub(super) fn on_commit(
        &mut self,
        from: ReplicaId,
        commit: Signed<Commit>,
        actions: &mut Vec<Action>,
    ) {
        let b = commit.body.clone();
        if b.view > self.view {
            self.note_view_ahead(from, b.view, actions);
        }
        if b.view < self.view && b.seq <= self.last_executed {
            return;
        }
        if !self.in_window(b.seq) {
            if b.seq > self.high_water() {
                self.highest_seen = self.highest_seen.max(b.seq);
            }
            return;
        }
        self.highest_seen = self.highest_seen.max(b.seq);
        let slot = self.log.entry(b.seq).or_default();
        match slot.commits.get(&from) {
            Some(old) if old.body.view > b.view => return,
            Some(old) if old.body.view == b.view => {
                if old.body.batch_digest != b.batch_digest {
                    return self.misbehaved(
                        Principal::Replica(from),
                        "conflicting commits",
                        actions,
                    );
                }
                return;
            }
            _ => {}
        }
        // A commit arriving after the slot committed still joins its certificate: commits are
        // not signature-checked on receipt, so a certificate carries every matching one it can
        // as spares for those a receiver finds forged (see `CommitCertificate`).
        if let Some(cert) = slot.commit_certificate.as_mut() {
            let p = &cert.proposal.pre_prepare.body;
            if b.view == p.view
                && b.batch_digest == p.batch_digest
                && !cert.commits.iter().any(|c| c.body.replica == from)
            {
                cert.commits.push(commit.clone());
            }
        }
        slot.commits.insert(from, commit);
        self.try_committed(b.seq, actions);
    }

    /// The proposal at `seq` and 2f matching prepares of this view: persist the prepared
    /// certificate, then send our commit (rule 4).
    pub(super) fn try_prepared(&mut self, seq: SeqNo, actions: &mut Vec<Action>) {
        let needed = 2 * self.f();
        let (view, active, me) = (self.view, self.view_active, self.id);
        let Some(slot) = self.log.get_mut(&seq) else {
            return;
        };
        let Some(proposal) = &slot.proposal else {
            return;
        };
        let b = &proposal.pre_prepare.body;
        if !active || b.view != view || slot.sent_commit {
            return;
        }
        let prepares: Vec<Signed<Prepare>> = slot
            .prepares
            .values()
            .filter(|p| {
                p.body.view == b.view
                    && p.body.batch_digest == b.batch_digest
                    && p.body.replica != b.primary
            })
            .take(needed)
            .cloned()
            .collect();
        if prepares.len() < needed {
            return;
        }
        // Rule 4: the commit goes out with a prepared certificate in hand, persisted first.
        let certificate = PreparedCertificate {
            pre_prepare: proposal.pre_prepare.clone(),
            prepares,
        };
        let certified_batch = proposal.batch.clone();
        let commit = self.signer.sign(Commit {
            view: b.view,
            seq,
            batch_digest: b.batch_digest,
            replica: me,
        });
        actions.push(Action::Persist(WalRecord::Prepared(Box::new(
            certificate.clone(),
        ))));
        actions.push(Action::Broadcast {
            message: Message::Agreement(AgreementMessage::Commit(commit.clone())),
        });
        slot.certificate = Some(certificate);
        slot.certified_batch = Some(certified_batch);
        slot.sent_commit = true;
        slot.commits.insert(me, commit);
        self.try_committed(seq, actions);
    }

    /// 2f+1 matching commits: the slot committed; run what is ready.
    fn try_committed(&mut self, seq: SeqNo, actions: &mut Vec<Action>) {
        let quorum = self.quorum();
        let Some(slot) = self.log.get_mut(&seq) else {
            return;
        };
        let Some(proposal) = &slot.proposal else {
            return;
        };
        if !slot.sent_commit || slot.committed {
            return;
        }
        let b = &proposal.pre_prepare.body;
        // Every matching commit (at most one per replica), not just a quorum: their
        // signatures were never checked, and the spares let a certificate survive a receiver
        // dropping the forged ones.
        let matching: Vec<Signed<Commit>> = slot
            .commits
            .values()
            .filter(|c| c.body.view == b.view && c.body.batch_digest == b.batch_digest)
            .cloned()
            .collect();
        if matching.len() >= quorum {
            slot.committed = true;
            slot.commit_certificate = Some(Box::new(CommitCertificate {
                proposal: proposal.clone(),
                commits: matching,
            }));
            self.execute_ready(actions);
        }
    }

    /// Executes committed batches in order (rule 5), replying to clients and checkpointing;
    /// on the fast path, runs accepted batches of this view ahead of their commit.
    pub(super) fn execute_ready(&mut self, actions: &mut Vec<Action>) {
        // While transferring, or below our stable checkpoint after a restart, the state is
        // not the one the log continues from.
        if self.transfer.is_some() || self.last_executed < self.stable.seq {
            return;
        }
        loop {
            if self.halted {
                return;
            }
            let seq = self.last_executed.next();
            let Some(slot) = self.log.get_mut(&seq) else {
                break;
            };
            if !slot.committed {
                break;
            }
            let Some(proposal) = slot.proposal.clone() else {
                break;
            };
            let results = if seq <= self.spec_executed {
                // It already ran speculatively: keep that run if it ran this very content.
                match slot.executed.take() {
                    Some(spec) if same_content(&spec.order.body, &proposal.pre_prepare.body) => {
                        if spec.results.is_none() {
                            self.commit_when_executed(seq);
                        }
                        spec.results
                    }
                    _ => {
                        self.roll_back_speculation(actions);
                        continue;
                    }
                }
            } else {
                self.ask_execute(seq, &proposal, false, actions);
                self.spec_executed = seq;
                None
            };
            self.commit_executed(seq, &proposal, results, actions);
        }
        self.answer_deferred_reads(actions);
        self.speculate(actions);
        self.try_propose(actions);
    }

    /// The slot after `last_executed` committed and has run (or was asked to): notify,
    /// checkpoint, and reply if its results are known (else they are sent when they come).
    fn commit_executed(
        &mut self,
        seq: SeqNo,
        proposal: &Proposal,
        results: Option<Vec<ExecutedRequest>>,
        actions: &mut Vec<Action>,
    ) {
        invariant!(
            self.spec_executed >= seq,
            "replica {}: {seq:?} committed before it ran (the service is at {:?})",
            self.id.0,
            self.spec_executed
        );
        if let Err(e) = self.safety.check_execute(seq) {
            panic!("replica {}: {e}", self.id.0);
        }
        self.last_executed = seq;
        tracing::debug!(
            replica = self.id.0,
            seq = seq.0,
            spec = self.spec_executed.0,
            "committed"
        );
        self.last_progress_tick = self.ticks;
        self.view_change_timeout_ticks = self.config.protocol.view_change_timeout_ticks;
        for request in &proposal.batch.requests {
            let key = (request.body.client, request.body.timestamp);
            self.proposed.remove(&key);
            self.waiting.remove(&key);
            if self.spec_keys.get(&key) == Some(&seq) {
                self.spec_keys.remove(&key);
            }
        }
        if let Some(results) = results {
            self.send_committed_replies(self.view, &proposal.batch, results, actions);
        }
        self.metrics.executed_batches += 1;
        self.metrics.executed_requests += proposal.batch.requests.len() as u64;
        actions.push(Action::Notify(Notification::Executed {
            seq,
            batch_digest: proposal.pre_prepare.body.batch_digest,
            requests: proposal
                .batch
                .requests
                .iter()
                .map(|r| (r.body.client, r.body.timestamp))
                .collect(),
        }));
        if seq.0 % self.config.protocol.checkpoint_interval == 0 {
            assert_eq!(
                self.spec_executed, seq,
                "replica {}: speculation ran past checkpoint {seq:?}",
                self.id.0
            );
            self.take_checkpoint(seq, actions);
        }
    }
}
