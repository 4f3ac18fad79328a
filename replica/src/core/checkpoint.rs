//! Checkpoints (PROTOCOLS §2.4): every `checkpoint_interval` committed batches a replica takes
//! a checkpoint of the service and its reply cache and signs a vote for it; 2f+1 matching
//! votes make it stable, which moves the log window and lets older checkpoints go. A stable
//! certificate for a state this replica does not hold starts a catch-up (`stable_ahead`) or,
//! if its own checkpoint differs, a repair by state transfer.

use super::execution::ExecutorCheckpoint;
use super::invariants::invariant;
use super::{Action, Core, Notification, OwnCheckpoint, WalRecord};
use crate::wire::{
    AgreementMessage, Checkpoint, CheckpointCertificate, Digest, Message, Principal, ReplicaId,
    SeqNo, Signed,
};
use std::collections::BTreeMap;

impl Core {
    /// Asks for a checkpoint of the state at `seq` (just executed); the vote follows the answer.
    pub(super) fn take_checkpoint(&mut self, seq: SeqNo, actions: &mut Vec<Action>) {
        // Only committed state is checkpointed (PROTOCOLS §2.4 [D]).
        invariant!(
            seq == self.last_executed && seq == self.spec_executed,
            "replica {}: checkpoint {seq:?} with the service at {:?} (committed {:?})",
            self.id.0,
            self.spec_executed,
            self.last_executed
        );
        self.ask_checkpoint(seq, actions);
    }

    /// The stage took our checkpoint at `seq`: persist it and vote for it.
    pub(super) fn vote_checkpoint(
        &mut self,
        seq: SeqNo,
        cp: ExecutorCheckpoint,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::Persist(WalRecord::CheckpointTaken {
            seq,
            service_root: cp.service_root,
            replies: cp.replies.clone(),
        }));
        let (service_root, replies_digest) = (cp.service_root, cp.replies_digest);
        // Kept even when suspect: it is where the state is, a base for rollback.
        self.own_checkpoints.insert(
            seq,
            OwnCheckpoint {
                seq,
                service_root,
                replies: cp.replies,
                replies_digest,
            },
        );
        if cp.suspect {
            // Not voted: when the others' certificate for it arrives and differs,
            // `adopt_stable` repairs us by state transfer.
            self.suspect = true;
            tracing::warn!(
                replica = self.id.0,
                seq = seq.0,
                "checkpoint not voted: the service's state may differ from the others' (a \
                 lock merged with content its certified end does not vouch for)"
            );
            return;
        }
        let signed = self.signer.sign(Checkpoint {
            seq,
            service_root,
            replies_digest,
            replica: self.id,
        });
        actions.push(Action::Broadcast {
            message: Message::Agreement(AgreementMessage::Checkpoint(signed.clone())),
        });
        actions.push(Action::Notify(Notification::CheckpointTaken {
            seq,
            service_root,
            replies_digest,
        }));
        self.checkpoint_votes
            .entry(seq)
            .or_default()
            .insert(self.id, signed);
        self.try_stable(seq, actions);
    }

    /// A peer's checkpoint vote: counted towards a stable certificate.
    pub(super) fn on_checkpoint(
        &mut self,
        from: ReplicaId,
        checkpoint: Signed<Checkpoint>,
        actions: &mut Vec<Action>,
    ) {
        let seq = checkpoint.body.seq;
        if seq <= self.stable.seq {
            return;
        }
        if seq.0 % self.config.protocol.checkpoint_interval != 0 {
            return self.misbehaved(
                Principal::Replica(from),
                "checkpoint off the interval",
                actions,
            );
        }
        self.highest_seen = self.highest_seen.max(seq);
        // Votes are kept for two windows ahead: enough to notice we are behind; further ahead,
        // catching up goes through FetchCommitted, answered with a stable certificate.
        if seq.0 > self.stable.seq.0 + 2 * self.config.protocol.log_window {
            return;
        }
        self.checkpoint_votes
            .entry(seq)
            .or_default()
            .insert(from, checkpoint);
        self.try_stable(seq, actions);
    }

    /// 2f+1 matching votes for `seq` make a stable certificate.
    fn try_stable(&mut self, seq: SeqNo, actions: &mut Vec<Action>) {
        let quorum = self.quorum();
        let Some(votes) = self.checkpoint_votes.get(&seq) else {
            return;
        };
        let mut groups: BTreeMap<(Digest, Digest), Vec<Signed<Checkpoint>>> = BTreeMap::new();
        for v in votes.values() {
            groups
                .entry((v.body.service_root, v.body.replies_digest))
                .or_default()
                .push(v.clone());
        }
        let Some(((service_root, replies_digest), mut checkpoints)) =
            groups.into_iter().find(|(_, list)| list.len() >= quorum)
        else {
            return;
        };
        checkpoints.truncate(quorum);
        let cert = CheckpointCertificate {
            seq,
            service_root,
            replies_digest,
            checkpoints,
        };
        self.adopt_stable(cert, actions);
    }

    /// A valid stable certificate: make it ours if we hold that state, else catch up to it.
    pub(super) fn adopt_stable(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
        if cert.seq <= self.stable.seq {
            return;
        }
        match self.own_checkpoints.get(&cert.seq) {
            Some(own)
                if own.service_root == cert.service_root
                    && own.replies_digest == cert.replies_digest =>
            {
                self.make_stable(cert, actions)
            }
            Some(_)
                if self
                    .transfer
                    .as_ref()
                    .is_some_and(|t| t.target.seq >= cert.seq) =>
            {
                // A transfer already under way to a later checkpoint (from this one as its
                // base, perhaps) replaces the state: it fetches every object that differs
                // from its target, whatever the base held. Dropping the base here left the
                // transfer without it (seen when a certificate for a checkpoint a lock's
                // merge had spoilt arrived after the one for the next).
                tracing::warn!(
                    replica = self.id.0,
                    seq = cert.seq.0,
                    "own checkpoint differs from the certified one; the transfer under way replaces it"
                );
            }
            Some(_) => {
                // 2f+1 replicas (so at least f+1 correct) agree on a state we did not reach:
                // our state is corrupt. Replace it.
                tracing::error!(
                    replica = self.id.0,
                    seq = cert.seq.0,
                    "own checkpoint differs from the certified one"
                );
                self.own_checkpoints.remove(&cert.seq);
                self.stable_ahead = Some(cert.clone());
                // We executed past it, so begin_transfer would see nothing to catch up on.
                self.start_transfer(cert, actions);
            }
            None => {
                if self.stable_ahead.as_ref().is_none_or(|c| c.seq < cert.seq) {
                    self.stable_ahead = Some(cert);
                }
            }
        }
    }

    /// Adopts a certified checkpoint above our execution point as the window's base, before
    /// we have its state (execution waits for the state transfer this starts).
    pub(super) fn jump_stable(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
        let seq = cert.seq;
        if seq <= self.stable.seq || seq <= self.last_executed {
            return;
        }
        self.stable = cert.clone();
        self.log = self.log.split_off(&seq.next());
        self.checkpoint_votes = self.checkpoint_votes.split_off(&seq.next());
        self.safety.forget_before(seq);
        self.stable_ahead = Some(cert);
        if self.next_seq <= seq {
            self.next_seq = seq.next();
        }
        self.persist_snapshot(actions);
        // Execution waits for the transfer to this checkpoint.
        invariant!(
            self.stable.seq == seq && self.last_executed < seq && self.stable_ahead.is_some(),
            "replica {}: jumped to {seq:?} without a catch-up pending",
            self.id.0
        );
    }

    /// Service checkpoints below `seq` go only once the driver reports this step's records
    /// (the snapshot naming the newer checkpoint) durable ([`super::Event::Persisted`]), so a
    /// crash never leaves the service without a checkpoint the WAL knows.
    pub(super) fn defer_discard(&mut self, seq: SeqNo) {
        self.discard_pending = Some(self.discard_pending.map_or(seq, |s| s.max(seq)));
    }

    /// Our own checkpoint `cert.seq` is certified: it becomes the window's base, and the log,
    /// votes and older checkpoints below it go (the transfer's base stays while one runs).
    pub(super) fn make_stable(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
        let seq = cert.seq;
        if seq <= self.stable.seq {
            return;
        }
        // Only a state this replica holds becomes its stable checkpoint.
        invariant!(
            self.own_checkpoints.get(&seq).is_some_and(|own| {
                own.service_root == cert.service_root && own.replies_digest == cert.replies_digest
            }),
            "replica {}: making {seq:?} stable without holding that state",
            self.id.0
        );
        self.stable = cert;
        self.log = self.log.split_off(&seq.next());
        self.checkpoint_votes = self.checkpoint_votes.split_off(&seq.next());
        self.commit_vouches = self.commit_vouches.split_off(&seq.next());
        // A transfer in progress diffs against its base, and a retry or a newer target rolls
        // back to it: that checkpoint stays until the transfer ends (the service keeps it too,
        // see `step`).
        let keep = self.transfer.as_ref().map_or(seq, |t| t.base.min(seq));
        self.own_checkpoints = self.own_checkpoints.split_off(&keep);
        self.defer_discard(seq);
        self.safety.forget_before(seq);
        if self.stable_ahead.as_ref().is_some_and(|c| c.seq <= seq) {
            self.stable_ahead = None;
        }
        if self.next_seq <= seq {
            self.next_seq = seq.next();
        }
        self.metrics.checkpoints_stable += 1;
        self.persist_snapshot(actions);
        actions.push(Action::Notify(Notification::CheckpointStable {
            seq,
            service_root: self.stable.service_root,
            replies_digest: self.stable.replies_digest,
        }));
        invariant!(
            self.log
                .keys()
                .chain(self.checkpoint_votes.keys())
                .all(|s| *s > seq)
                && self.next_seq > seq,
            "replica {}: state at or below the new stable checkpoint {seq:?} kept",
            self.id.0
        );
        self.try_propose(actions);
    }
}
