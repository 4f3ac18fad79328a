//! State transfer (PROTOCOLS §4.3): a replica whose state is behind a stable checkpoint it
//! cannot reach by committed batches (or whose own checkpoint turned out corrupt) fetches the
//! certified state from its peers.
//!
//! - This file: the core's side. It rolls the state back to its newest checkpoint below the
//!   target (the *base*, kept until the transfer ends), has the execution stage run a
//!   [`crate::execution::transfer::Transfer`] (which reads the stage's own checkpoints to fetch only what differs),
//!   chases a newer target (keeping what was fetched), retries a transfer whose result does not
//!   match the certificate, and installs the result as its own checkpoint.
//! - [`crate::execution::transfer`]: the verified walk of the partition tree and the answers
//!   to peers' requests for state, run by the execution stage.

use state_abstraction::AbstractObject;

/// What the fetcher asks the core to do.
#[derive(Debug)]
pub enum TransferStep {
    Send(ReplicaId, StateTransferMessage),
    /// A peer answered with something that failed verification.
    Misbehaved(ReplicaId, &'static str),
}

/// A finished transfer: install these objects, then the reply cache.
#[derive(Debug)]
pub struct Finished {
    pub objects: Vec<(u64, AbstractObject)>,
    /// The encoded reply cache (its digest matches the certificate).
    pub replies: Vec<u8>,
    /// The number of objects of the certified state.
    pub object_count: u64,
}

/// The state transfer in progress, as the core sees it (the execution stage runs the
/// fetcher).
#[derive(Clone, Debug)]
pub struct TransferJob {
    pub target: CheckpointCertificate,
    /// Our checkpoint the transfer diffs against (the stage's state was rolled back to it).
    pub base: SeqNo,
}

use super::execution::{ExecutorCheckpoint, ReplyLimits, ReplyTable};
use super::invariants::invariant;
use super::view_change;
use super::{Action, Core, InFlightKind, Notification, OwnCheckpoint, StageAction, WalRecord};
use crate::wire::{
    AgreementMessage, CheckpointCertificate, Message, Principal, ReplicaId, SeqNo,
    StateTransferMessage,
};

impl Core {
    /// Starts a state transfer to `cert` unless our state already reached it.
    pub(super) fn begin_transfer(
        &mut self,
        cert: CheckpointCertificate,
        actions: &mut Vec<Action>,
    ) {
        if cert.seq <= self.last_executed && self.last_executed >= self.stable.seq {
            return;
        }
        self.start_transfer(cert, actions)
    }

    /// Starts a state transfer to `cert` whatever we executed (also when our own state at
    /// `cert` turned out corrupt).
    pub(super) fn start_transfer(
        &mut self,
        cert: CheckpointCertificate,
        actions: &mut Vec<Action>,
    ) {
        if self
            .transfer
            .as_ref()
            .is_some_and(|t| t.target.seq >= cert.seq)
        {
            return;
        }
        // Diff against our newest checkpoint below the target: roll the service back to it.
        let Some(base) = self
            .own_checkpoints
            .range(..cert.seq)
            .next_back()
            .map(|(_, c)| c.clone())
        else {
            return self.halt(
                "no own checkpoint to transfer state against".into(),
                actions,
            );
        };
        let replies = match ReplyTable::decode(&base.replies, ReplyLimits::of(&self.config)) {
            Ok(r) => r,
            Err(e) => return self.halt(format!("own reply cache: {e}"), actions),
        };
        self.ask_rollback(base.seq, base.replies.clone(), replies, actions);
        self.set_service_position(base.seq);
        // The service dropped its later checkpoints with the rollback: so do we, or one of
        // them could become stable while we no longer hold its state (and a transfer below it
        // would then leave us behind our stable checkpoint with nothing pending).
        self.own_checkpoints.split_off(&base.seq.next());
        let mut peers: Vec<ReplicaId> = cert.checkpoints.iter().map(|c| c.body.replica).collect();
        for r in self.config.replica_ids() {
            if !peers.contains(&r) {
                peers.push(r);
            }
        }
        tracing::info!(
            replica = self.id.0,
            target = cert.seq.0,
            base = base.seq.0,
            "state transfer"
        );
        self.metrics.state_transfers += 1;
        // Answers still in flight belong to the transfer this one replaces.
        for f in self.in_flight.iter_mut() {
            if matches!(f.what, InFlightKind::Transfer) {
                f.undone = true;
            }
        }
        self.transfer = Some(TransferJob {
            target: cert.clone(),
            base: base.seq,
        });
        actions.push(Action::Stage(StageAction::TransferStart {
            target: cert,
            base: base.seq,
            peers,
            tick: self.ticks,
        }));
        self.push_in_flight(InFlightKind::Transfer);
        invariant!(
            self.last_executed == base.seq && self.own_checkpoints.contains_key(&base.seq),
            "replica {}: transfer started off its base {:?}",
            self.id.0,
            base.seq
        );
    }

    /// Performs what the fetcher asked: requests to send, bad answers to count.
    fn apply_transfer_steps(&mut self, steps: Vec<TransferStep>, actions: &mut Vec<Action>) {
        for step in steps {
            match step {
                TransferStep::Send(to, m) => actions.push(Action::Send {
                    to,
                    message: Message::StateTransfer(m),
                }),
                TransferStep::Misbehaved(from, what) => {
                    self.misbehaved(Principal::Replica(from), what, actions)
                }
            }
        }
    }

    /// The fetcher's answer to a transfer action: its steps, and the state once complete.
    pub(super) fn on_transfer_progress(
        &mut self,
        steps: Vec<TransferStep>,
        bytes_fetched: u64,
        finished: Option<Box<Finished>>,
        actions: &mut Vec<Action>,
    ) {
        if self.answered_plain("transfer", |k| matches!(k, InFlightKind::Transfer)) {
            return;
        }
        let Some(job) = self.transfer.clone() else {
            return;
        };
        self.metrics.state_transfer_bytes = self.metrics.state_transfer_bytes.max(bytes_fetched);
        self.apply_transfer_steps(steps, actions);
        if let Some(finished) = finished {
            self.transfer = None;
            self.finish_transfer(job.target, job.base, *finished, actions);
        }
    }

    /// The stage's answer to a peer's request for state.
    pub(super) fn on_served(
        &mut self,
        to: ReplicaId,
        answer: Option<StateTransferMessage>,
        actions: &mut Vec<Action>,
    ) {
        self.answered_plain("serve", |k| matches!(k, InFlightKind::Serve));
        if let Some(message) = answer {
            actions.push(Action::Send {
                to,
                message: Message::StateTransfer(message),
            });
        }
    }

    /// Every tick of a state transfer: requests unanswered for `retransmit_ticks` go to the
    /// next peer; a newer stable checkpoint replaces the target (peers discard checkpoints
    /// once newer ones are stable: chase the newest); now and then, ask where the others are.
    pub(super) fn on_state_transfer_timeout(&mut self, actions: &mut Vec<Action>) {
        let retransmit_ticks = self.config.protocol.retransmit_ticks;
        let Some(job) = &self.transfer else {
            return;
        };
        let target = job.target.seq;
        actions.push(Action::Stage(StageAction::TransferTick {
            tick: self.ticks,
        }));
        self.push_in_flight(InFlightKind::Transfer);
        if let Some(newer) = self.stable_ahead.clone().filter(|c| c.seq > target) {
            self.begin_transfer(newer, actions);
        } else if self.ticks % (4 * retransmit_ticks) == 0 {
            actions.push(Action::Broadcast {
                message: Message::StateTransfer(StateTransferMessage::QueryStable),
            });
        }
    }

    /// A state-transfer message: a request is answered from our checkpoints (see
    /// [`serve`]); a stable certificate may start a transfer; an answer goes to the transfer
    /// in progress (see [`fetch`]).
    pub(super) fn on_state_transfer(
        &mut self,
        from: ReplicaId,
        message: StateTransferMessage,
        actions: &mut Vec<Action>,
    ) {
        use StateTransferMessage as M;
        match &message {
            M::QueryStable => {
                return actions.push(Action::Send {
                    to: from,
                    message: Message::StateTransfer(M::ReplyStable(self.stable.clone())),
                })
            }
            M::GetReplies { seq } => {
                if let Some(c) = self.own_checkpoints.get(seq) {
                    actions.push(Action::Send {
                        to: from,
                        message: Message::StateTransfer(M::Replies {
                            seq: *seq,
                            table: c.replies.clone(),
                        }),
                    });
                }
                return;
            }
            M::GetNode { .. } | M::GetPieceDigests { .. } | M::GetPiece { .. } => {
                actions.push(Action::Stage(StageAction::Serve {
                    to: from,
                    request: message,
                }));
                return self.push_in_flight(InFlightKind::Serve);
            }
            _ => {}
        }
        match message {
            M::ReplyStable(cert) => {
                if !view_change::valid_checkpoint_certificate(&self.config, &self.genesis, &cert) {
                    return self.misbehaved(
                        Principal::Replica(from),
                        "invalid stable certificate",
                        actions,
                    );
                }
                if let Some(answers) = self.stable_answers.as_mut() {
                    answers.insert(from);
                    if answers.len() > self.f() {
                        self.stable_answers = None;
                    }
                }
                if cert.seq > self.last_executed {
                    self.stable_ahead = Some(cert.clone());
                    self.begin_transfer(cert, actions);
                } else {
                    self.adopt_stable(cert, actions);
                }
            }
            M::Node { .. } | M::PieceDigests { .. } | M::Piece { .. } | M::Replies { .. } => {
                if self.transfer.is_none() {
                    return;
                }
                actions.push(Action::Stage(StageAction::TransferMessage {
                    from,
                    message,
                    tick: self.ticks,
                }));
                self.push_in_flight(InFlightKind::Transfer);
            }
            _ => {}
        }
    }

    /// Asks the stage to install a finished transfer; [`Core::check_installed`] checks the
    /// result against the certificate.
    fn finish_transfer(
        &mut self,
        target: CheckpointCertificate,
        base: SeqNo,
        finished: Finished,
        actions: &mut Vec<Action>,
    ) {
        if ReplyTable::decode(&finished.replies, ReplyLimits::of(&self.config)).is_err() {
            return self.retry_transfer(target, base, "reply cache does not decode", actions);
        }
        actions.push(Action::Stage(StageAction::InstallState {
            seq: target.seq,
            objects: finished.objects,
            object_count: finished.object_count,
            replies: finished.replies,
        }));
        self.push_in_flight(InFlightKind::Install { target, base });
    }

    /// The transferred state did not install or does not match the certificate: back to the
    /// base, and fetch again.
    fn retry_transfer(
        &mut self,
        target: CheckpointCertificate,
        base: SeqNo,
        why: &str,
        actions: &mut Vec<Action>,
    ) {
        let limits = ReplyLimits::of(&self.config);
        tracing::warn!(replica = self.id.0, why, "state transfer failed; retrying");
        let base_replies = self
            .own_checkpoints
            .get(&base)
            .map(|c| c.replies.clone())
            .unwrap_or_default();
        let replies =
            ReplyTable::decode(&base_replies, limits).unwrap_or_else(|_| ReplyTable::new(limits));
        self.ask_rollback(base, base_replies, replies, actions);
        self.stable_ahead = Some(target);
    }

    /// The stage installed the transferred state and checkpointed it: if it matches the
    /// certificate it becomes our stable checkpoint and we catch up from there.
    pub(super) fn check_installed(
        &mut self,
        target: CheckpointCertificate,
        base: SeqNo,
        result: Result<ExecutorCheckpoint, String>,
        actions: &mut Vec<Action>,
    ) {
        let cp = match result {
            Ok(cp) => cp,
            Err(why) => return self.retry_transfer(target, base, &why, actions),
        };
        if cp.service_root != target.service_root || cp.replies_digest != target.replies_digest {
            return self.retry_transfer(
                target,
                base,
                "installed state does not match the certified digest",
                actions,
            );
        }
        self.replies = match ReplyTable::decode(&cp.replies, ReplyLimits::of(&self.config)) {
            Ok(r) => r,
            Err(e) => return self.halt(format!("installed reply cache: {e}"), actions),
        };
        // Requests the transferred state already executed will never run here.
        self.forget_answered_waiting(false);
        actions.push(Action::Persist(WalRecord::CheckpointTaken {
            seq: target.seq,
            service_root: cp.service_root,
            replies: cp.replies.clone(),
        }));
        self.own_checkpoints.insert(
            target.seq,
            OwnCheckpoint {
                seq: target.seq,
                service_root: cp.service_root,
                replies: cp.replies,
                replies_digest: cp.replies_digest,
            },
        );
        self.set_service_position(target.seq);
        self.last_progress_tick = self.ticks;
        let bytes = self.metrics.state_transfer_bytes;
        if target.seq == self.stable.seq {
            // We had jumped to it already: now that we hold its state, drop what is older.
            self.own_checkpoints = self.own_checkpoints.split_off(&target.seq);
            self.defer_discard(target.seq);
            self.persist_snapshot(actions);
        }
        self.make_stable(target.clone(), actions);
        if self
            .stable_ahead
            .as_ref()
            .is_some_and(|c| c.seq <= target.seq)
        {
            self.stable_ahead = None;
        }
        invariant!(
            self.last_executed >= target.seq && self.stable.seq >= target.seq,
            "replica {}: transfer to {:?} finished at {:?} with stable {:?}",
            self.id.0,
            target.seq,
            self.last_executed,
            self.stable.seq
        );
        actions.push(Action::Notify(Notification::StateTransferred {
            seq: target.seq,
            bytes,
        }));
        // Batches committed after that checkpoint: ask one peer once (later traffic tells us
        // about the rest).
        let to = self.next_peer();
        actions.push(Action::Send {
            to,
            message: Message::Agreement(AgreementMessage::FetchCommitted {
                from: target.seq.next(),
                to: SeqNo(target.seq.0 + self.config.protocol.log_window),
            }),
        });
        self.execute_ready(actions);
    }
}
