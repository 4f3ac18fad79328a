//! Recovery: a replica rebuilt after a restart from every durable WAL record and its reopened
//! service (see the driver contract in the module doc of [`super`]), in three steps:
//! 1. `Replayed::from_wal`: the durable state replayed from the WAL, a pure function of the
//!    records (no service, no signing);
//! 2. the newest checkpoint both the service and the WAL hold is chosen (the execution stage
//!    rolls the service back to it), and the log, view and window are rebuilt from the
//!    replayed state (still no signing);
//! 3. `Core::resign_own_statements`, the one re-signing step: the replica's own prepares
//!    and commits (and, mid view change, its view change), so that retransmission can finish
//!    what was in flight.

use super::execution::{ReplyLimits, ReplyTable};
use super::safety::SafetyRules;
use super::view_change::{self, Genesis};
use super::{Core, CoreError, Metrics, OwnCheckpoint, Slot, WalRecord};
use crate::config::{ClusterConfig, ReplicaSecrets};
use crate::wire::{
    history_anchor, Batch, CheckpointCertificate, Commit, Digest, NewView, PrePrepare, Prepare,
    PreparedCertificate, Proposal, SeqNo, Signed, Signer, View, ViewChange,
};
use state_abstraction::RequestPolicy;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

fn empty_replies_digest(limits: ReplyLimits) -> (Vec<u8>, Digest) {
    let bytes = ReplyTable::new(limits).encode();
    let digest = ReplyTable::digest_of_encoding(&bytes);
    (bytes, digest)
}

/// Whether the WAL records the genesis checkpoint (a snapshot does). If not, the genesis is
/// the service's checkpoint 0: the execution stage takes it before [`Core::restore`] if the
/// service holds no checkpoint at all.
pub fn wal_records_genesis(wal: &[WalRecord]) -> bool {
    wal.iter().any(|r| matches!(r, WalRecord::Snapshot(_)))
}

impl Core {
    /// A core restarted from its durable state: every durable WAL record in order, and the
    /// checkpoints the reopened service holds (see the driver contract in the module doc of
    /// [`super`]). Returns the core and the checkpoint the execution stage must roll the
    /// service back to before anything else, if any.
    pub fn restore(
        config: Arc<ClusterConfig>,
        secrets: &ReplicaSecrets,
        policy: Arc<dyn RequestPolicy>,
        wal: Vec<WalRecord>,
        held: Vec<(u64, Digest)>,
    ) -> Result<(Self, Option<SeqNo>), CoreError> {
        config.validate()?;
        let limits = ReplyLimits::of(&config);
        let (empty_replies, empty_digest) = empty_replies_digest(limits);
        let mut held: BTreeMap<SeqNo, Digest> =
            held.into_iter().map(|(s, d)| (SeqNo(s), d)).collect();
        let mut rollback = false;

        // 1. The durable state, replayed from the WAL (pure: no service, no signing).
        let Replayed {
            snapshot_genesis,
            mut safety,
            entered,
            mut accepted,
            batches,
            prepared,
            mut checkpoints,
            stable,
            new_view_message,
        } = Replayed::from_wal(&wal);

        // 2. The service: back to the newest checkpoint both it and the WAL hold.
        // The genesis checkpoint.
        let genesis = match snapshot_genesis {
            Some(genesis) => genesis,
            None => {
                let root = match held.first_key_value() {
                    Some((SeqNo(0), root)) => *root,
                    Some((seq, _)) => {
                        return Err(CoreError::Inconsistent(format!(
                            "the service holds checkpoint {} but the WAL is empty",
                            seq.0
                        )))
                    }
                    None => {
                        return Err(CoreError::Inconsistent(
                            "the service holds no genesis checkpoint".into(),
                        ))
                    }
                };
                if held.len() > 1 {
                    held.split_off(&SeqNo(1));
                    rollback = true;
                }
                checkpoints.insert(
                    SeqNo(0),
                    OwnCheckpoint {
                        seq: SeqNo(0),
                        service_root: root,
                        replies: empty_replies.clone(),
                        replies_digest: empty_digest,
                    },
                );
                Genesis {
                    service_root: root,
                    replies_digest: empty_digest,
                }
            }
        };
        let stable = stable.unwrap_or(CheckpointCertificate {
            seq: SeqNo(0),
            service_root: genesis.service_root,
            replies_digest: genesis.replies_digest,
            checkpoints: Vec::new(),
        });

        // The newest checkpoint both the service and the WAL hold is where execution resumes.
        let resume = checkpoints
            .values()
            .rev()
            .find(|c| held.get(&c.seq) == Some(&c.service_root))
            .cloned()
            .ok_or_else(|| {
                CoreError::Inconsistent("no checkpoint held by both the service and the WAL".into())
            })?;
        if rollback || held.keys().next_back().copied() != Some(resume.seq) {
            rollback = true;
        }
        let replies = ReplyTable::decode(&resume.replies, limits)
            .map_err(|e| CoreError::Inconsistent(format!("reply cache: {e}")))?;
        checkpoints.retain(|seq, _| *seq <= resume.seq && *seq >= stable.seq.min(resume.seq));

        let (view, view_active) = entered
            .iter()
            .copied()
            .max_by_key(|(v, active)| (*v, *active))
            .unwrap_or((View(0), true));
        safety
            .check_enter_view(view, true)
            .map_err(|e| CoreError::Inconsistent(e.to_string()))?;
        safety.reset_executed(resume.seq);

        let low = stable.seq;
        let mut log: BTreeMap<SeqNo, Slot> = BTreeMap::new();
        let mut highest_seen = resume.seq;
        // The pre-prepares of the installed view's new-view message bind this replica even
        // where it logged no acceptance: it had not received their batches yet.
        if let Some(nv) = new_view_message
            .as_ref()
            .filter(|nv| nv.body.view == view && view_active)
        {
            for pp in &nv.body.pre_prepares {
                let seq = pp.body.seq;
                if seq > low && accepted.get(&seq).is_none_or(|a| a.body.view < view) {
                    accepted.insert(seq, pp.clone());
                }
            }
        }
        for (seq, pre_prepare) in accepted.range(low.next()..) {
            let b = &pre_prepare.body;
            // Re-record the vote (rule 1 survives the restart).
            let _ = safety.check_vote(b.view, *seq, b.batch_digest);
            highest_seen = highest_seen.max(*seq);
            let slot = log.entry(*seq).or_default();
            let batch = batches.get(&(*seq, b.batch_digest)).cloned().or_else(|| {
                (Batch::default().ordered_digest(&b.nondet) == b.batch_digest).then(Batch::default)
            });
            match batch {
                Some(batch) => {
                    slot.proposal = Some(Proposal {
                        pre_prepare: pre_prepare.clone(),
                        batch,
                    })
                }
                // Only a vote: awaited if it is of the installed view, else just remembered.
                None if b.view == view && view_active => slot.awaiting = Some(pre_prepare.clone()),
                None => {}
            }
        }
        for (seq, cert) in prepared.range(low.next()..) {
            let slot = log.entry(*seq).or_default();
            let same_view = slot.proposal.as_ref().map(|p| p.pre_prepare.body.view)
                == Some(cert.pre_prepare.body.view);
            slot.sent_commit = same_view;
            slot.certified_batch = batches
                .get(&(*seq, cert.pre_prepare.body.batch_digest))
                .cloned();
            slot.certificate = Some(cert.clone());
        }
        let n = config.n();
        let next_seq = log
            .iter()
            .filter(|(_, s)| {
                s.awaiting.is_some()
                    || s.proposal
                        .as_ref()
                        .is_some_and(|p| p.pre_prepare.body.view == view)
            })
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(low.max(resume.seq))
            .next();
        let stable_ahead = (stable.seq > resume.seq).then(|| stable.clone());
        let vc_timeout = config.protocol.view_change_timeout_ticks;
        let new_view_message = new_view_message.filter(|nv| nv.body.view == view && view_active);
        let view_anchor = match &new_view_message {
            _ if view == View(0) => {
                let genesis_cert = CheckpointCertificate {
                    seq: SeqNo(0),
                    service_root: genesis.service_root,
                    replies_digest: genesis.replies_digest,
                    checkpoints: Vec::new(),
                };
                Some((SeqNo(0), history_anchor(&genesis_cert)))
            }
            Some(nv) => {
                let plan = view_change::plan_new_view(&config, &nv.body.view_changes);
                Some((plan.stable.seq, history_anchor(&plan.stable)))
            }
            None => None,
        };
        let replica = Core {
            id: secrets.id,
            signer: Signer::from_secret(&secrets.signing_key.0),
            policy,
            replies,
            in_flight: VecDeque::new(),
            safety,
            genesis,
            view,
            view_active,
            new_view_message,
            log,
            stable,
            last_executed: resume.seq,
            spec_executed: resume.seq,
            view_anchor,
            spec_keys: BTreeMap::new(),
            fill_hole: None,
            deferred_reads: VecDeque::new(),
            next_seq,
            own_checkpoints: checkpoints,
            checkpoint_votes: BTreeMap::new(),
            pending: VecDeque::new(),
            pending_keys: BTreeSet::new(),
            proposed: BTreeSet::new(),
            waiting: BTreeMap::new(),
            view_changes: BTreeMap::new(),
            view_change_timeout_ticks: vc_timeout,
            view_change_deadline: (!view_active).then_some(vc_timeout),
            caught_up_tick: 0,
            ticks: 0,
            now_ns: 0,
            last_progress_tick: 0,
            last_fetch_tick: 0,
            last_view_query_tick: None,
            stable_answers: None,
            fetch_rotation: secrets.id.0,
            commit_vouches: BTreeMap::new(),
            highest_seen,
            read_only_barrier: highest_seen,
            stable_ahead,
            transfer: None,
            initial_snapshot: true,
            discard_pending: None,
            discard_after: None,
            records_asked: 0,
            locks: super::lock::LockLogs::from_wal(&wal),
            pad_to_checkpoint: false,
            installing_view: false,
            suspect: false,
            halted: false,
            metrics: Metrics::default(),
            config,
        };
        let mut replica = replica;
        // 3. One re-signing step.
        replica.resign_own_statements();
        debug_assert!(replica.id.0 < n as u32);
        Ok((replica, rollback.then_some(resume.seq)))
    }

    /// The one re-signing step of a restart. Votes are not logged, only what they vouch for:
    /// this replica's own prepares (every restored proposal it did not make) and commits (every
    /// slot it had prepared in its proposal's view) are signed again from what was persisted.
    /// Ed25519 is deterministic, so these are the very statements it made before (rule 3
    /// still holds), and retransmission can finish batches that were in flight when every
    /// replica went down at once; otherwise nobody holds the commits for them any more and
    /// they would wait for a view change that never comes. In the installed view, a prepared
    /// slot also gets back the certificate's prepares. Restarted during a view change, it
    /// speaks again for the view it had entered (the same statement, so no new record).
    fn resign_own_statements(&mut self) {
        let (me, view, active) = (self.id, self.view, self.view_active);
        for (seq, slot) in self.log.iter_mut() {
            let Some(p) = &slot.proposal else { continue };
            let b = &p.pre_prepare.body;
            if b.primary != me {
                let prepare = self.signer.sign(Prepare {
                    view: b.view,
                    seq: *seq,
                    batch_digest: b.batch_digest,
                    replica: me,
                });
                slot.prepares.insert(me, prepare);
            }
            if !slot.sent_commit {
                continue;
            }
            let Some(cert) = &slot.certificate else {
                continue;
            };
            if active && b.view == view {
                for pr in &cert.prepares {
                    slot.prepares
                        .entry(pr.body.replica)
                        .or_insert_with(|| pr.clone());
                }
            }
            // `sent_commit`: the certificate is of the proposal's view, so of the same batch
            // (rule 1).
            let c = &cert.pre_prepare.body;
            let commit = self.signer.sign(Commit {
                view: c.view,
                seq: c.seq,
                batch_digest: c.batch_digest,
                replica: me,
            });
            slot.commits.insert(me, commit);
        }
        if !active {
            self.view_change_deadline = None;
            let evidence = self.evidence();
            let vc = self.signer.sign(ViewChange {
                new_view: view,
                replica: me,
                stable: self.stable.clone(),
                evidence,
            });
            self.view_changes.insert(me, vc);
        }
    }
}

/// The durable state rebuilt from the WAL records, oldest first: pure, no service, no signing.
struct Replayed {
    /// The genesis checkpoint, if a snapshot recorded it (else the service's checkpoint 0).
    snapshot_genesis: Option<Genesis>,
    /// The safety rules' record of what was persisted.
    safety: SafetyRules,
    /// Views entered (`false`) and installed (`true`) since the newest snapshot.
    entered: Vec<(View, bool)>,
    /// Per slot, the highest-view pre-prepare accepted.
    accepted: BTreeMap<SeqNo, Signed<PrePrepare>>,
    /// Every batch logged, by slot and digest (a certificate's batch may belong to an older
    /// view than the acceptance).
    batches: BTreeMap<(SeqNo, Digest), Batch>,
    prepared: BTreeMap<SeqNo, PreparedCertificate>,
    checkpoints: BTreeMap<SeqNo, OwnCheckpoint>,
    stable: Option<CheckpointCertificate>,
    new_view_message: Option<Signed<NewView>>,
}

impl Replayed {
    fn from_wal(wal: &[WalRecord]) -> Self {
        let mut r = Replayed {
            snapshot_genesis: None,
            safety: SafetyRules::new(View(0), SeqNo(0)),
            entered: Vec::new(),
            accepted: BTreeMap::new(),
            batches: BTreeMap::new(),
            prepared: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            stable: None,
            new_view_message: None,
        };
        for record in wal {
            r.safety.note_persisted(record);
            r.apply(record);
        }
        r
    }

    fn apply(&mut self, record: &WalRecord) {
        match record {
            WalRecord::Snapshot(s) => {
                self.entered = vec![(s.view, s.view_active)];
                self.accepted = s.accepted.iter().map(|p| (p.body.seq, p.clone())).collect();
                self.batches.clear();
                self.prepared = s
                    .prepared
                    .iter()
                    .map(|c| (c.pre_prepare.body.seq, c.clone()))
                    .collect();
                self.checkpoints = s.checkpoints.iter().map(|c| (c.seq, c.clone())).collect();
                self.stable = Some(s.stable.clone());
                self.new_view_message = s.new_view.clone();
                self.snapshot_genesis = Some(s.genesis);
            }
            WalRecord::NewViewMessage(nv) => {
                if self
                    .new_view_message
                    .as_ref()
                    .is_none_or(|old| old.body.view <= nv.body.view)
                {
                    self.new_view_message = Some((**nv).clone());
                }
            }
            WalRecord::EnteredView { view } => self.entered.push((*view, false)),
            WalRecord::InstalledView { view } => self.entered.push((*view, true)),
            WalRecord::Accepted(p) => {
                let b = &p.pre_prepare.body;
                if self
                    .accepted
                    .get(&b.seq)
                    .is_none_or(|old| old.body.view <= b.view)
                {
                    self.accepted.insert(b.seq, p.pre_prepare.clone());
                }
                self.batches
                    .insert((b.seq, b.batch_digest), p.batch.clone());
            }
            WalRecord::Prepared(c) => {
                let seq = c.pre_prepare.body.seq;
                let view = c.pre_prepare.body.view;
                if self
                    .prepared
                    .get(&seq)
                    .is_none_or(|old| old.pre_prepare.body.view <= view)
                {
                    self.prepared.insert(seq, (**c).clone());
                }
            }
            WalRecord::CheckpointTaken {
                seq,
                service_root,
                replies,
            } => {
                self.checkpoints.insert(
                    *seq,
                    OwnCheckpoint {
                        seq: *seq,
                        service_root: *service_root,
                        replies: replies.clone(),
                        replies_digest: ReplyTable::digest_of_encoding(replies),
                    },
                );
            }
            // The log servers' records: see `LockLogs::from_wal`.
            WalRecord::Lock(_) => {}
            WalRecord::Stable(c) => {
                if self.stable.as_ref().is_none_or(|s| s.seq < c.seq) {
                    self.stable = Some((**c).clone());
                }
            }
        }
    }
}
