//! The replica's protocol core: a sans-IO state machine (PBFT ordering with checkpoints,
//! Zyzzyva's speculative fast path with rollback, the evidence-ranked view change of PROTOCOLS
//! §2.8–2.9, catch-up and state transfer).
//!
//! No I/O, no clock, no randomness, no `HashMap` iteration: the same events in the same order
//! give the same actions, which is what lets the simulator replay a run from its seed.
//!
//! # Driver contract
//!
//! **Construction.** [`Replica::new`] for a replica with an empty write-ahead log (WAL);
//! [`Replica::restore`] after a restart, with every WAL record that was durable, in order.
//! The service must be reopened over its data directory first: its state is then that of the
//! newest checkpoint it reports ([`state_abstraction::Service::checkpoints`]); the core rolls it
//! back further if its WAL lacks that checkpoint's record, and catches up from peers (missing
//! committed batches, or state transfer) from there.
//!
//! **Events.** Call [`Replica::step`] with
//! - [`Event::Message`]: a frame that [`crate::wire::Authenticator::open`] accepted (from a
//!   replica or a client). Frames that fail are never given to the core; count and drop them.
//! - [`Event::Tick`]: once per [`crate::config::ProtocolConfig::tick_ns`] of real time, with the
//!   driver's wall clock in `now_ns` (used only for the agreed time a primary proposes and
//!   backups check). All timeouts in the core count ticks.
//!
//! **Actions**, appended to the caller's vector, must be performed **in order**:
//! - [`Action::Persist`]: append the record to the WAL. It must be durable (fsync'ed) before
//!   any later action of the list (or of a later step) is performed. A driver may group
//!   consecutive records into one write and one fsync, but must not send anything that follows
//!   a record before that fsync returns. A [`WalRecord::Snapshot`] supersedes every earlier
//!   record: once it is durable the driver may delete the records before it.
//!   **Before calling `step` again, every record of the earlier steps must be durable**: at
//!   the start of a step the core may discard service checkpoints that only those records
//!   make unnecessary for a restart.
//! - [`Action::Send`] / [`Action::Broadcast`] (to every other replica) /
//!   [`Action::SendClient`]: seal with [`crate::wire::Authenticator::seal`] and send. Best
//!   effort: the core retransmits what matters, so a full queue may drop a message.
//! - [`Action::Notify`]: information for logs, metrics and tests; no effect needed.
//! - [`Action::Halt`]: the service failed (storage error). Stop the replica; it behaves as a
//!   crashed replica and may be restarted from durable state.
//!
//! **Execution.** Batches run synchronously inside `step` through [`execution::Executor`], the
//! single interface to the service (so that execution can move to another process for the ZZ
//! profile without the ordering code changing): committed ones, and with
//! [`crate::config::ProtocolConfig::fast_path`] the accepted ones of the installed view before
//! they commit. Speculative runs are undone with [`state_abstraction::Service::rollback_to`] to
//! the newest checkpoint (always a committed sequence number), so a service must keep its
//! checkpoints from the stable one on until told to discard them.

pub mod bounds;
pub mod execution;
pub mod safety;
pub mod speculation;
pub mod state_transfer;
#[cfg(test)]
mod tests;
pub mod view_change;

use crate::config::{ClusterConfig, ReplicaSecrets};
use crate::wire::{
    chain_history, history_anchor, AgreementMessage, Authenticated, Batch, Checkpoint,
    CheckpointCertificate, ClientMessage, Commit, CommitCertificate, Digest, Evidence, Message,
    NewView, Pom, PrePrepare, Prepare, PreparedCertificate, Principal, Proposal, ReplicaId, Reply,
    Request, SeqNo, Signed, Signer, SpecResponse, StateTransferMessage, Timestamp, View,
    ViewChange, ViewChangeMessage,
};
use execution::{ExecutedRequest, Executor, Lookup, ReplyLimits, ReplyTable};
use safety::SafetyRules;
use serde::{Deserialize, Serialize};
use state_abstraction::{ClientId, Service, ServiceError};
use state_transfer::{Transfer, TransferStep};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use view_change::{Genesis, NewViewPlan};

/// Batches whose commit certificates one `FetchCommitted` answer carries at most.
const FETCH_BATCHES_MAX: u64 = 16;
/// Operation bytes one `FillHole` answer sends at most (one batch, however large, always goes).
const FETCH_BYTES_MAX: usize = 16 << 20;

/// An input to the core.
#[derive(Debug)]
pub enum Event {
    Message(Authenticated<Message>),
    Tick { now_ns: u64 },
}

/// An output of the core; see the module doc for the order and durability rules.
#[derive(Clone, Debug)]
pub enum Action {
    Persist(WalRecord),
    Send {
        to: ReplicaId,
        message: Message,
    },
    /// To every replica but this one.
    Broadcast {
        message: Message,
    },
    SendClient {
        to: ClientId,
        message: Message,
    },
    Notify(Notification),
    Halt {
        reason: String,
    },
}

/// Things worth logging or checking; the driver need not act on them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// A batch ran ahead of its commit (fast path); it may still be rolled back.
    Speculated {
        seq: SeqNo,
        batch_digest: Digest,
    },
    /// Speculative execution above `to` was undone (the service is back at checkpoint `to`).
    RolledBack {
        to: SeqNo,
        from: SeqNo,
    },
    /// A committed batch ran (or, on the fast path, a batch that ran speculatively committed);
    /// `requests` in batch order (duplicates were answered from the cache).
    Executed {
        seq: SeqNo,
        batch_digest: Digest,
        requests: Vec<(ClientId, Timestamp)>,
    },
    CheckpointTaken {
        seq: SeqNo,
        service_root: Digest,
        replies_digest: Digest,
    },
    CheckpointStable {
        seq: SeqNo,
        service_root: Digest,
        replies_digest: Digest,
    },
    ViewEntered {
        view: View,
        active: bool,
    },
    StateTransferred {
        seq: SeqNo,
        bytes: u64,
    },
    Misbehaviour {
        from: Principal,
        what: &'static str,
    },
}

/// A checkpoint this replica took, with its reply cache (needed to roll back to it, to serve
/// it, and to restart from it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnCheckpoint {
    pub seq: SeqNo,
    pub service_root: Digest,
    pub replies: Vec<u8>,
    pub replies_digest: Digest,
}

/// Everything a replica must remember across a crash (see [`safety`] rule 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableState {
    pub genesis: Genesis,
    pub view: View,
    pub view_active: bool,
    pub stable: CheckpointCertificate,
    pub checkpoints: Vec<OwnCheckpoint>,
    /// The pre-prepares this replica accepted (its votes). Their batches are not in this
    /// record, which must stay bounded whatever the requests' sizes: they follow it as
    /// [`WalRecord::Accepted`] records (see [`WalRecord::Snapshot`]).
    pub accepted: Vec<Signed<PrePrepare>>,
    pub prepared: Vec<PreparedCertificate>,
    /// The new-view message that installed `view`, kept so a restarted replica can still hand
    /// it to replicas that missed it.
    #[serde(default)]
    pub new_view: Option<Signed<NewView>>,
}

/// One WAL record. Encode with [`crate::wire::encode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalRecord {
    /// Supersedes all earlier records. The core follows it, in the same step and with no
    /// other action between, by one [`WalRecord::Accepted`] per batch the state refers to;
    /// the driver must write the snapshot and those records as the new log atomically (every
    /// `Persist` that immediately follows a snapshot belongs to it). A record's size is thus
    /// bounded by one batch, not by the log.
    Snapshot(Box<DurableState>),
    /// About to send a view change for `view`.
    EnteredView { view: View },
    /// Installed the new view `view` (normal operation in it).
    InstalledView { view: View },
    /// The new-view message just installed (kept to relay after a restart).
    NewViewMessage(Box<Signed<NewView>>),
    /// Accepted (backup) or proposed (primary) this proposal in its view.
    Accepted(Box<Proposal>),
    /// Prepared: about to send a commit.
    Prepared(Box<PreparedCertificate>),
    /// Took a checkpoint (service checkpoint `seq` plus this reply cache).
    CheckpointTaken {
        seq: SeqNo,
        service_root: Digest,
        replies: Vec<u8>,
    },
    /// A checkpoint became stable.
    Stable(Box<CheckpointCertificate>),
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("service: {0}")]
    Service(#[from] ServiceError),
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("durable state is inconsistent: {0}")]
    Inconsistent(String),
}

/// Counters for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    pub executed_batches: u64,
    pub executed_requests: u64,
    pub read_only_requests: u64,
    pub view_changes_started: u64,
    pub new_views_installed: u64,
    pub checkpoints_stable: u64,
    pub state_transfers: u64,
    pub state_transfer_bytes: u64,
    pub fetched_batches: u64,
    /// Batches of re-issued pre-prepares fetched by digest after a new view.
    pub fetched_bodies: u64,
    pub misbehaviour: u64,
    pub requests_dropped: u64,
    pub speculated_batches: u64,
    pub rollbacks: u64,
    pub poms: u64,
    pub fill_holes: u64,
}

#[derive(Clone, Debug, Default)]
struct Slot {
    /// The proposal accepted for this sequence number (in its pre-prepare's view).
    proposal: Option<Proposal>,
    /// Latest prepare and commit from each replica (the one of the highest view).
    prepares: BTreeMap<ReplicaId, Signed<Prepare>>,
    commits: BTreeMap<ReplicaId, Signed<Commit>>,
    /// A commit was sent for `proposal` in its view.
    sent_commit: bool,
    committed: bool,
    /// The highest-view prepared certificate this replica holds (view-change evidence).
    certificate: Option<PreparedCertificate>,
    /// The batch `certificate` names: evidence carries digests only, and `proposal` may since
    /// have been replaced by a later view's, so the certified batch is kept here for a new
    /// view that re-issues it.
    certified_batch: Option<Batch>,
    /// A pre-prepare of the installed view that this replica is bound to (a new view
    /// re-issued it) but whose batch it does not hold yet: fetched by `FillHole` from the
    /// replicas that do; it becomes `proposal` (and is prepared) when the batch arrives.
    awaiting: Option<Signed<PrePrepare>>,
    /// When `proposal` was accepted (ticks): a proposal that does not commit within the
    /// view-change timeout makes the replica suspect the primary.
    accepted_tick: u64,
    /// Proof that the batch committed (kept apart from `proposal` and `commits`, which a
    /// later view replaces), served to replicas that missed it.
    commit_certificate: Option<Box<CommitCertificate>>,
    /// What ran here speculatively (only above `last_executed`): the order it ran under and its
    /// results, resent as committed replies once the slot commits with the same content.
    executed: Option<Speculation>,
}

#[derive(Clone, Debug)]
struct Speculation {
    order: Signed<PrePrepare>,
    results: Vec<ExecutedRequest>,
}

fn same_content(a: &PrePrepare, b: &PrePrepare) -> bool {
    a.batch_digest == b.batch_digest && a.nondet == b.nondet
}

/// A PBFT replica over service `S`. See the module doc for how to drive it.
pub struct Replica<S: Service> {
    config: Arc<ClusterConfig>,
    id: ReplicaId,
    signer: Signer,
    exec: Executor<S>,
    safety: SafetyRules,
    genesis: Genesis,

    view: View,
    view_active: bool,
    /// The new-view message that installed the current view, relayed to replicas that missed it.
    new_view_message: Option<Signed<NewView>>,
    log: BTreeMap<SeqNo, Slot>,
    stable: CheckpointCertificate,
    /// The committed prefix that has run: every slot up to here committed and executed.
    last_executed: SeqNo,
    /// Where the service state is: `last_executed` plus the batches run speculatively after it
    /// (fast path). Never past an uncommitted checkpoint boundary, so checkpoints are always
    /// taken on committed state (PROTOCOLS §2.4 [D]).
    spec_executed: SeqNo,
    /// The current view's history anchor: its starting checkpoint and [`history_anchor`] of it
    /// (unknown after a restart into a view whose new-view message was not kept).
    view_anchor: Option<(SeqNo, Digest)>,
    /// Requests whose cached reply comes from a speculative execution, with its slot: a
    /// retransmission gets that reply as speculative, never as committed.
    spec_keys: BTreeMap<(ClientId, Timestamp), SeqNo>,
    /// The hole below buffered proposals being filled: (first missing, tick asked, asked all).
    fill_hole: Option<(SeqNo, u64, bool)>,
    /// Read-only requests waiting for the state to be fully committed (bounded).
    deferred_reads: VecDeque<Signed<Request>>,
    /// Primary: the next sequence number to assign.
    next_seq: SeqNo,
    own_checkpoints: BTreeMap<SeqNo, OwnCheckpoint>,
    checkpoint_votes: BTreeMap<SeqNo, BTreeMap<ReplicaId, Signed<Checkpoint>>>,

    /// Primary: requests waiting for a batch, oldest first.
    pending: VecDeque<Signed<Request>>,
    pending_keys: BTreeSet<(ClientId, Timestamp)>,
    /// Primary: requests proposed in this view and not executed yet.
    proposed: BTreeSet<(ClientId, Timestamp)>,
    /// Backup: requests a client sent us directly (so it timed out at the primary), with the
    /// tick they arrived; if one is not executed within the view-change timeout, the primary
    /// is suspected.
    waiting: BTreeMap<(ClientId, Timestamp), (Signed<Request>, u64)>,

    /// The newest view change from each replica.
    view_changes: BTreeMap<ReplicaId, Signed<ViewChange>>,
    view_change_timeout_ticks: u64,
    view_change_deadline: Option<u64>,
    /// The last tick at which this replica was catching up (transferring state, or knowing
    /// of a stable checkpoint above what it executed). Requests waiting since before then
    /// waited on our lag, not on the primary.
    caught_up_tick: u64,

    ticks: u64,
    now_ns: u64,
    last_progress_tick: u64,
    last_fetch_tick: u64,
    last_view_query_tick: Option<u64>,
    fetch_rotation: u32,
    /// Per sequence number above `last_executed`, which replicas relayed a commit certificate
    /// with too few valid signatures, and for which ordered digest (see `on_committed`).
    commit_vouches: BTreeMap<SeqNo, Vec<(ReplicaId, Digest)>>,
    /// Highest sequence number any replica was seen working on.
    highest_seen: SeqNo,
    /// Read-only requests are not answered before this batch is executed: the highest one
    /// restored from the WAL, which may have committed before the restart.
    read_only_barrier: SeqNo,
    /// A stable certificate above our execution point (we must catch up to it).
    stable_ahead: Option<CheckpointCertificate>,
    transfer: Option<Transfer>,

    initial_snapshot: bool,
    /// See [`Replica::defer_discard`].
    discard_pending: Option<SeqNo>,
    halted: bool,
    metrics: Metrics,
}

fn empty_replies_digest(limits: ReplyLimits) -> (Vec<u8>, Digest) {
    let bytes = ReplyTable::new(limits).encode();
    let digest = ReplyTable::digest_of_encoding(&bytes);
    (bytes, digest)
}

impl<S: Service> Replica<S> {
    /// A replica with an empty WAL over a fresh service.
    pub fn new(
        config: Arc<ClusterConfig>,
        secrets: &ReplicaSecrets,
        service: S,
    ) -> Result<Self, CoreError> {
        Self::restore(config, secrets, service, Vec::new())
    }

    /// A replica restarted from its durable state: the service reopened over its data, and
    /// every durable WAL record in order (see the module doc).
    pub fn restore(
        config: Arc<ClusterConfig>,
        secrets: &ReplicaSecrets,
        service: S,
        wal: Vec<WalRecord>,
    ) -> Result<Self, CoreError> {
        config.validate()?;
        let limits = ReplyLimits::of(&config);
        let mut exec = Executor::new(service, limits);
        let (empty_replies, empty_digest) = empty_replies_digest(limits);

        // Replay the WAL into one durable state.
        let mut state: Option<DurableState> = None;
        let mut safety = SafetyRules::new(View(0), SeqNo(0));
        let mut entered: Vec<(View, bool)> = Vec::new();
        // Per slot, the highest-view pre-prepare accepted; and every batch logged, by slot and
        // digest (a certificate's batch may belong to an older view than the acceptance).
        let mut accepted: BTreeMap<SeqNo, Signed<PrePrepare>> = BTreeMap::new();
        let mut batches: BTreeMap<(SeqNo, Digest), Batch> = BTreeMap::new();
        let mut prepared: BTreeMap<SeqNo, PreparedCertificate> = BTreeMap::new();
        let mut checkpoints: BTreeMap<SeqNo, OwnCheckpoint> = BTreeMap::new();
        let mut stable: Option<CheckpointCertificate> = None;
        let mut new_view_message: Option<Signed<NewView>> = None;
        for record in &wal {
            safety.note_persisted(record);
            match record {
                WalRecord::Snapshot(s) => {
                    entered = vec![(s.view, s.view_active)];
                    accepted = s.accepted.iter().map(|p| (p.body.seq, p.clone())).collect();
                    batches.clear();
                    prepared = s
                        .prepared
                        .iter()
                        .map(|c| (c.pre_prepare.body.seq, c.clone()))
                        .collect();
                    checkpoints = s.checkpoints.iter().map(|c| (c.seq, c.clone())).collect();
                    stable = Some(s.stable.clone());
                    new_view_message = s.new_view.clone();
                    state = Some((**s).clone());
                }
                WalRecord::NewViewMessage(nv) => {
                    if new_view_message
                        .as_ref()
                        .is_none_or(|old| old.body.view <= nv.body.view)
                    {
                        new_view_message = Some((**nv).clone());
                    }
                }
                WalRecord::EnteredView { view } => entered.push((*view, false)),
                WalRecord::InstalledView { view } => entered.push((*view, true)),
                WalRecord::Accepted(p) => {
                    let b = &p.pre_prepare.body;
                    if accepted
                        .get(&b.seq)
                        .is_none_or(|old| old.body.view <= b.view)
                    {
                        accepted.insert(b.seq, p.pre_prepare.clone());
                    }
                    batches.insert((b.seq, b.batch_digest), p.batch.clone());
                }
                WalRecord::Prepared(c) => {
                    let seq = c.pre_prepare.body.seq;
                    let view = c.pre_prepare.body.view;
                    if prepared
                        .get(&seq)
                        .is_none_or(|old| old.pre_prepare.body.view <= view)
                    {
                        prepared.insert(seq, (**c).clone());
                    }
                }
                WalRecord::CheckpointTaken {
                    seq,
                    service_root,
                    replies,
                } => {
                    checkpoints.insert(
                        *seq,
                        OwnCheckpoint {
                            seq: *seq,
                            service_root: *service_root,
                            replies: replies.clone(),
                            replies_digest: ReplyTable::digest_of_encoding(replies),
                        },
                    );
                }
                WalRecord::Stable(c) => {
                    if stable.as_ref().is_none_or(|s| s.seq < c.seq) {
                        stable = Some((**c).clone());
                    }
                }
            }
        }

        // The genesis checkpoint.
        let genesis = match &state {
            Some(s) => s.genesis,
            None => {
                let held = exec.service().checkpoints();
                let root = match held.first() {
                    Some((0, root)) => {
                        if held.len() > 1 {
                            exec.service_mut().rollback_to(0)?;
                        }
                        *root
                    }
                    Some((seq, _)) => {
                        return Err(CoreError::Inconsistent(format!(
                            "the service holds checkpoint {seq} but the WAL is empty"
                        )))
                    }
                    None => exec.service_mut().checkpoint(0)?,
                };
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
        let held: BTreeMap<u64, Digest> = exec.service().checkpoints().into_iter().collect();
        let resume = checkpoints
            .values()
            .rev()
            .find(|c| held.get(&c.seq.0) == Some(&c.service_root))
            .cloned()
            .ok_or_else(|| {
                CoreError::Inconsistent("no checkpoint held by both the service and the WAL".into())
            })?;
        if held.keys().next_back().copied() != Some(resume.seq.0) {
            exec.service_mut().rollback_to(resume.seq.0)?;
        }
        let replies = ReplyTable::decode(&resume.replies, limits)
            .map_err(|e| CoreError::Inconsistent(format!("reply cache: {e}")))?;
        exec.set_replies(replies);
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
        // Our own prepares and commits are re-signed from what was persisted (the same
        // statements, so rule 3 still holds) so that retransmission can resend them.
        let signer = Signer::from_secret(&secrets.signing_key.0);
        for (_, slot) in log.iter_mut() {
            if let Some(p) = &slot.proposal {
                let b = &p.pre_prepare.body;
                if b.primary != secrets.id {
                    let prepare = signer.sign(Prepare {
                        view: b.view,
                        seq: b.seq,
                        batch_digest: b.batch_digest,
                        replica: secrets.id,
                    });
                    slot.prepares.insert(secrets.id, prepare);
                }
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
            if same_view {
                let b = &cert.pre_prepare.body;
                let commit = signer.sign(Commit {
                    view: b.view,
                    seq: b.seq,
                    batch_digest: b.batch_digest,
                    replica: secrets.id,
                });
                slot.commits.insert(secrets.id, commit);
            }
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
        let replica = Replica {
            id: secrets.id,
            signer: Signer::from_secret(&secrets.signing_key.0),
            exec,
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
            fetch_rotation: secrets.id.0,
            commit_vouches: BTreeMap::new(),
            highest_seen,
            read_only_barrier: highest_seen,
            stable_ahead,
            transfer: None,
            initial_snapshot: true,
            discard_pending: None,
            halted: false,
            metrics: Metrics::default(),
            config,
        };
        let mut replica = replica;
        // Votes are not logged, only what they vouch for. Re-sign this replica's own prepares
        // and commits for the slots it restored (Ed25519 is deterministic, so these are the
        // very statements it made before), so that retransmission can finish batches that
        // were in flight when every replica went down at once; otherwise nobody holds the
        // commits for them any more and they would wait for a view change that never comes.
        if replica.view_active {
            let (me, view) = (replica.id, replica.view);
            for (seq, slot) in replica.log.iter_mut() {
                let Some(p) = &slot.proposal else { continue };
                let b = &p.pre_prepare.body;
                if b.view != view {
                    continue;
                }
                if b.primary != me {
                    let prepare = replica.signer.sign(Prepare {
                        view,
                        seq: *seq,
                        batch_digest: b.batch_digest,
                        replica: me,
                    });
                    slot.prepares.insert(me, prepare);
                }
                if slot.sent_commit {
                    if let Some(cert) = &slot.certificate {
                        for pr in &cert.prepares {
                            slot.prepares
                                .entry(pr.body.replica)
                                .or_insert_with(|| pr.clone());
                        }
                    }
                    let commit = replica.signer.sign(Commit {
                        view,
                        seq: *seq,
                        batch_digest: b.batch_digest,
                        replica: me,
                    });
                    slot.commits.insert(me, commit);
                }
            }
        }
        if !replica.view_active {
            // Restarted during a view change: speak again for the view we had entered (the
            // same statement, so no new record is needed) and wait for 2f+1 to arm the timer.
            replica.view_change_deadline = None;
            let evidence = replica.evidence();
            let vc = replica.signer.sign(ViewChange {
                new_view: replica.view,
                replica: replica.id,
                stable: replica.stable.clone(),
                evidence,
            });
            replica.view_changes.insert(replica.id, vc);
        }
        debug_assert!(replica.id.0 < n as u32);
        Ok(replica)
    }

    // -----------------------------------------------------------------------------------------
    // Accessors

    pub fn id(&self) -> ReplicaId {
        self.id
    }
    pub fn view(&self) -> View {
        self.view
    }
    /// False while a view change is under way.
    pub fn is_view_active(&self) -> bool {
        self.view_active
    }
    pub fn is_primary(&self) -> bool {
        self.view.primary(self.config.n()) == self.id
    }
    pub fn last_executed(&self) -> SeqNo {
        self.last_executed
    }
    pub fn stable_checkpoint(&self) -> &CheckpointCertificate {
        &self.stable
    }
    pub fn is_transferring_state(&self) -> bool {
        self.transfer.is_some()
    }
    pub fn is_halted(&self) -> bool {
        self.halted
    }
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    pub fn service(&self) -> &S {
        self.exec.service()
    }
    /// Gives the service back (the simulator reopens it to model a crash).
    pub fn into_service(self) -> S {
        self.exec.into_service()
    }
    pub fn durable_state(&self) -> DurableState {
        DurableState {
            genesis: self.genesis,
            view: self.view,
            view_active: self.view_active,
            stable: self.stable.clone(),
            checkpoints: self.own_checkpoints.values().cloned().collect(),
            accepted: self
                .log
                .values()
                .filter_map(|s| s.proposal.as_ref().map(|p| p.pre_prepare.clone()))
                .collect(),
            prepared: self
                .log
                .values()
                .filter_map(|s| s.certificate.clone())
                .collect(),
            new_view: self.new_view_message.clone(),
        }
    }

    /// Persists a snapshot of the durable state followed by its checkpoints and the batches
    /// it refers to (the accepted proposals' and the certified ones'), each in a record of its
    /// own, so that no record grows with the log or with the requests' sizes.
    fn persist_snapshot(&self, actions: &mut Vec<Action>) {
        // Each checkpoint carries a reply cache of up to `REPLIES_BYTES_TOTAL`: one record each.
        let mut state = self.durable_state();
        let checkpoints = std::mem::take(&mut state.checkpoints);
        actions.push(Action::Persist(WalRecord::Snapshot(Box::new(state))));
        for c in checkpoints {
            actions.push(Action::Persist(WalRecord::CheckpointTaken {
                seq: c.seq,
                service_root: c.service_root,
                replies: c.replies,
            }));
        }
        for slot in self.log.values() {
            if let (Some(c), Some(batch)) = (&slot.certificate, &slot.certified_batch) {
                let same = slot
                    .proposal
                    .as_ref()
                    .is_some_and(|p| p.pre_prepare == c.pre_prepare);
                if !same {
                    actions.push(Action::Persist(WalRecord::Accepted(Box::new(Proposal {
                        pre_prepare: c.pre_prepare.clone(),
                        batch: batch.clone(),
                    }))));
                }
            }
            if let Some(p) = &slot.proposal {
                actions.push(Action::Persist(WalRecord::Accepted(Box::new(p.clone()))));
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

    /// One line about the protocol state, for failure reports.
    pub fn debug_summary(&self) -> String {
        let slots: Vec<String> = self
            .log
            .iter()
            .map(|(seq, s)| {
                let view = s
                    .proposal
                    .as_ref()
                    .map(|p| p.pre_prepare.body.view.0 as i64)
                    .unwrap_or(-1);
                format!(
                    "{}:v{view}{}{}p{}c{}",
                    seq.0,
                    if s.sent_commit { "S" } else { "" },
                    if s.committed { "C" } else { "" },
                    s.prepares.len(),
                    s.commits.len()
                )
            })
            .collect();
        format!(
            "view {} active {} deadline {:?}/{} vcs {:?} primary {} executed {} next {} stable {} ahead {:?} seen {} transfer {:?} pending {} waiting {} slots [{}]",
            self.view.0,
            self.view_active,
            self.view_change_deadline,
            self.ticks,
            self.view_changes.values().map(|v| (v.body.replica.0, v.body.new_view.0)).collect::<Vec<_>>(),
            self.is_primary(),
            self.last_executed.0,
            self.next_seq.0,
            self.stable.seq.0,
            self.stable_ahead.as_ref().map(|c| c.seq.0),
            self.highest_seen.0,
            self.transfer.as_ref().map(|t| t.target.seq.0),
            self.pending.len(),
            self.waiting.len(),
            slots.join(" ")
        )
    }

    fn n(&self) -> usize {
        self.config.n()
    }
    fn f(&self) -> usize {
        self.config.f as usize
    }
    fn quorum(&self) -> usize {
        self.config.quorum()
    }
    fn primary(&self) -> ReplicaId {
        self.view.primary(self.n())
    }
    fn high_water(&self) -> SeqNo {
        SeqNo(self.stable.seq.0 + self.config.protocol.log_window)
    }
    fn in_window(&self, seq: SeqNo) -> bool {
        seq > self.stable.seq && seq <= self.high_water()
    }

    fn misbehaved(&mut self, from: Principal, what: &'static str, actions: &mut Vec<Action>) {
        self.metrics.misbehaviour += 1;
        tracing::warn!(replica = self.id.0, ?from, what, "peer misbehaved; ignored");
        actions.push(Action::Notify(Notification::Misbehaviour { from, what }));
    }

    fn halt(&mut self, reason: String, actions: &mut Vec<Action>) {
        tracing::error!(replica = self.id.0, %reason, "halting");
        self.halted = true;
        actions.push(Action::Halt { reason });
    }

    // -----------------------------------------------------------------------------------------
    // The step function

    /// Handles one event, appending the resulting actions (see the module doc).
    pub fn step(&mut self, event: Event, actions: &mut Vec<Action>) {
        if self.halted {
            return;
        }
        let start = actions.len();
        if let Some(seq) = self.discard_pending.take() {
            // Never below what a state transfer in progress diffs against.
            let keep = self.transfer.as_ref().map_or(seq, |t| t.base.min(seq));
            self.exec.discard_before(keep.0);
        }
        if self.initial_snapshot {
            self.initial_snapshot = false;
            self.persist_snapshot(actions);
            // After a restart the others may be far ahead: ask where they are.
            actions.push(Action::Broadcast {
                message: Message::StateTransfer(StateTransferMessage::QueryStable),
            });
        }
        match event {
            Event::Tick { now_ns } => self.on_tick(now_ns, actions),
            Event::Message(m) => {
                let (sender, message) = m.into_parts();
                self.on_message(sender, message, actions);
            }
        }
        if let Err(problem) = self.check_invariants(&actions[start..]) {
            panic!("replica {} broke an invariant: {problem}", self.id.0);
        }
    }

    fn check_invariants(&mut self, actions: &[Action]) -> Result<(), String> {
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
        if cfg!(debug_assertions) {
            if let (Some(first), Some(last)) = (self.log.keys().next(), self.log.keys().next_back())
            {
                if !self.in_window(*first) || !self.in_window(*last) {
                    return Err(format!(
                        "log {first:?}..{last:?} outside the window above {:?}",
                        self.stable.seq
                    ));
                }
            }
            if self.last_executed < self.stable.seq
                && self.stable_ahead.is_none()
                && self.transfer.is_none()
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
        }
        Ok(())
    }

    fn on_message(&mut self, sender: Principal, message: Message, actions: &mut Vec<Action>) {
        let from = match (sender, &message) {
            (_, Message::Client(ClientMessage::Request(r))) => {
                let r = r.clone();
                return self.on_request(sender, r, actions);
            }
            (_, Message::Client(ClientMessage::Pom(pom))) => {
                let pom = (**pom).clone();
                return self.on_pom(sender, pom, actions);
            }
            (_, Message::Client(_)) => return,
            (Principal::Replica(r), _) if r != self.id && (r.0 as usize) < self.n() => r,
            _ => return,
        };
        match message {
            Message::Agreement(m) => match m {
                AgreementMessage::PrePrepare(p) => self.on_pre_prepare(from, p, actions),
                AgreementMessage::Prepare(p) => self.on_prepare(from, p, actions),
                AgreementMessage::Commit(c) => self.on_commit(from, c, actions),
                AgreementMessage::Checkpoint(c) => self.on_checkpoint(from, c, actions),
                AgreementMessage::FetchCommitted { from: first, to } => {
                    self.on_fetch_committed(from, first, to, actions)
                }
                AgreementMessage::Committed(cert) => self.on_committed(from, *cert, actions),
                AgreementMessage::FillHole {
                    view,
                    from: first,
                    to,
                } => self.on_fill_hole(from, view, first, to, actions),
                AgreementMessage::Filled(p) => self.on_filled(from, *p, actions),
            },
            Message::ViewChange(m) => match m {
                ViewChangeMessage::ViewChange(vc) => self.on_view_change(from, vc, actions),
                ViewChangeMessage::NewView(nv) => self.on_new_view(from, nv, actions),
                ViewChangeMessage::QueryNewView { view } => {
                    self.on_query_new_view(from, view, actions)
                }
            },
            Message::StateTransfer(m) => self.on_state_transfer(from, m, actions),
            Message::Client(_) => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Requests and proposing

    fn reply(&self, request: &Request, result: Vec<u8>, read_only: bool) -> Action {
        Action::SendClient {
            to: request.client,
            message: Message::Client(ClientMessage::Reply(Reply {
                view: self.view,
                client: request.client,
                timestamp: request.timestamp,
                replica: self.id,
                read_only,
                result,
            })),
        }
    }

    pub fn on_request(
        &mut self,
        sender: Principal,
        request: Signed<Request>,
        actions: &mut Vec<Action>,
    ) {
        let body = &request.body;
        if body.operation.len() > self.config.protocol.operation_bytes_max {
            self.metrics.requests_dropped += 1;
            return self.misbehaved(sender, "oversized operation", actions);
        }
        if body.read_only {
            // Unordered path: answer from the current (committed) state, or stay silent and
            // let the client fall back to the ordered path.
            // A replica that knows of batches it has not executed yet (restarted, or behind)
            // must not answer from its older state: after every replica restarts at once, 2f+1
            // of them could otherwise agree on a read that misses committed writes.
            // On the fast path the barrier also covers everything run speculatively: a replica
            // answers reads only from a fully committed state, never one a view change may undo,
            // and never from a state behind a write it already reported (a write completed on
            // 3f+1 speculative replies is thus seen by every correct replica that answers).
            if !self.exec.is_read_only(&body.operation)
                || self.transfer.is_some()
                || self.stable_ahead.is_some()
            {
                return;
            }
            if self.reads_behind() {
                // Usually just the commit of what ran speculatively, a round trip away: answer
                // then rather than make the client wait out its timeout and order the read.
                if self.deferred_reads.len() >= self.config.protocol.pending_requests_max {
                    self.deferred_reads.pop_front();
                    self.metrics.requests_dropped += 1;
                }
                tracing::debug!(
                    replica = self.id.0,
                    last = self.last_executed.0,
                    spec = self.spec_executed.0,
                    barrier = self.read_only_barrier.0,
                    "read held"
                );
                self.deferred_reads.push_back(request);
                return;
            }
            self.metrics.read_only_requests += 1;
            let result = self.exec.execute_read_only(&request);
            actions.push(self.reply(body, result, true));
            return;
        }
        let key = (body.client, body.timestamp);
        match self.exec.lookup(&request) {
            Lookup::Cached(result) => {
                let result = result.to_vec();
                // A result that only ran speculatively goes out as such, with its order.
                let order = self
                    .spec_keys
                    .get(&key)
                    .and_then(|seq| self.log.get(seq))
                    .and_then(|s| s.executed.as_ref());
                match order {
                    Some(spec) => {
                        let reply = Reply {
                            view: self.view,
                            client: body.client,
                            timestamp: body.timestamp,
                            replica: self.id,
                            read_only: false,
                            result,
                        };
                        let message = SpecResponse {
                            reply,
                            order: spec.order.clone(),
                        };
                        actions.push(Action::SendClient {
                            to: body.client,
                            message: Message::Client(ClientMessage::SpecResponse(Box::new(
                                message,
                            ))),
                        });
                    }
                    None => actions.push(self.reply(body, result, false)),
                }
                return;
            }
            Lookup::Stale | Lookup::Evicted => {
                self.metrics.requests_dropped += 1;
                return;
            }
            Lookup::Reused => {
                self.metrics.requests_dropped += 1;
                // The client's signature says who did it, whoever relayed it.
                let client = Principal::Client(request.body.client);
                return self.misbehaved(client, "timestamp reused for another request", actions);
            }
            Lookup::New => {}
        }
        let limit = self.config.protocol.pending_requests_max;
        if self.view_active && self.is_primary() {
            if self.pending_keys.contains(&key) || self.proposed.contains(&key) {
                return;
            }
            let per_client = self
                .pending_keys
                .range((body.client, Timestamp(0))..=(body.client, Timestamp(u64::MAX)))
                .count();
            if self.pending.len() >= limit
                || per_client as u64 >= self.config.protocol.client_window
            {
                self.metrics.requests_dropped += 1;
                return;
            }
            self.pending_keys.insert(key);
            self.pending.push_back(request);
            self.try_propose(actions);
        } else {
            // The client timed out at the primary: relay the request and watch the primary.
            if !self.waiting.contains_key(&key) {
                if self.waiting.len() >= limit {
                    self.metrics.requests_dropped += 1;
                    return;
                }
                self.waiting.insert(key, (request.clone(), self.ticks));
            }
            if matches!(sender, Principal::Client(_)) {
                // A client retransmitting to everyone may mean the others ordered it and we
                // missed that (we may even sit alone in a later view): look for committed
                // batches we lack once the catch-up timeout passes.
                self.highest_seen = self.highest_seen.max(self.last_executed.next());
            }
            if self.view_active && matches!(sender, Principal::Client(_)) {
                actions.push(Action::Send {
                    to: self.primary(),
                    message: Message::Client(ClientMessage::Request(request)),
                });
            }
        }
    }

    /// Drops the requests this replica watches the primary for that are no longer new: a
    /// client may send request t to the backups only and t+1.. to the primary, which then
    /// finds t stale once the later ones fill the reply cache's window; if the backups kept
    /// waiting for t they would suspect every primary in turn.
    /// With `speculative_cache`, a cached reply may still be undone by a rollback, so only
    /// stale requests are dropped.
    fn forget_answered_waiting(&mut self, speculative_cache: bool) {
        let exec = &self.exec;
        let before = self.waiting.len();
        self.waiting
            .retain(|_, (request, _)| match exec.lookup(request) {
                Lookup::New => true,
                Lookup::Cached(_) => speculative_cache,
                Lookup::Stale | Lookup::Evicted | Lookup::Reused => false,
            });
        self.metrics.requests_dropped += (before - self.waiting.len()) as u64;
    }

    fn skip_committed_seqs(&mut self) {
        if self.next_seq <= self.last_executed {
            self.next_seq = self.last_executed.next();
        }
        while self.log.get(&self.next_seq).is_some_and(|s| s.committed) {
            self.next_seq = self.next_seq.next();
        }
    }

    /// Primary: cuts batches from the queue while the window and the pipeline allow.
    fn try_propose(&mut self, actions: &mut Vec<Action>) {
        if !self.view_active || !self.is_primary() || self.transfer.is_some() {
            return;
        }
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
        while !self.pending.is_empty()
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
                if self.exec.lookup(&request) != Lookup::New || self.proposed.contains(&key) {
                    continue;
                }
                bytes += size;
                self.proposed.insert(key);
                batch.requests.push(request);
            }
            if batch.requests.is_empty() {
                continue;
            }
            let seq = self.next_seq;
            let nondet = self.exec.propose_nondet(self.now_ns);
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

    /// The history of the state the service is in, if this view's chain reaches it: the
    /// proposal of this view at `spec_executed`, provided what ran there is that proposal's
    /// content (committed content is the same everywhere, so its history may be adopted).
    fn executed_history(&self) -> Option<Digest> {
        let seq = self.spec_executed;
        let history = self.proposed_history(seq)?;
        if seq > self.last_executed {
            let slot = self.log.get(&seq)?;
            let ran = &slot.executed.as_ref()?.order.body;
            let p = &slot.proposal.as_ref()?.pre_prepare.body;
            if !same_content(ran, p) {
                return None;
            }
        }
        Some(history)
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
    fn evidence(&self) -> Vec<Evidence> {
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

    // -----------------------------------------------------------------------------------------
    // Normal case

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

    pub fn on_pre_prepare(
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
    fn accept_pre_prepare(
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
        if !proposal.batch.requests.is_empty() && !self.exec.check_nondet(&b.nondet, self.now_ns) {
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

    /// The batch of a pre-prepare the installed new view bound this replica to: its digest
    /// was checked against the pre-prepare (and the primary's signature) by the verifier, and
    /// the agreed value was checked when it was first proposed, so only the limits remain.
    fn take_awaited_batch(
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
    fn request_awaited_batches(&mut self, actions: &mut Vec<Action>) {
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

    /// Fast path: a proposal of this view waits above a missing one. Start filling the hole
    /// (the tick handler asks the primary, then everyone; the view-change timer on
    /// uncommitted proposals suspects the primary after that).
    fn note_hole(&mut self) {
        if !self.config.protocol.fast_path || !self.view_active || self.is_primary() {
            self.fill_hole = None;
            return;
        }
        let next = self.spec_executed.next();
        let missing = !self.log.get(&next).is_some_and(|s| {
            s.proposal
                .as_ref()
                .is_some_and(|p| p.pre_prepare.body.view == self.view)
        });
        let above = self.log.range(next.next()..).any(|(_, s)| {
            s.proposal
                .as_ref()
                .is_some_and(|p| p.pre_prepare.body.view == self.view)
        });
        if !(missing && above) {
            self.fill_hole = None;
        } else if self.fill_hole.is_none_or(|(first, _, _)| first != next) {
            self.fill_hole = Some((next, self.ticks, false));
        }
    }

    fn hole_range(&self) -> Option<(SeqNo, SeqNo)> {
        let (first, _, _) = self.fill_hole?;
        let last = self
            .log
            .range(first..)
            .filter(|(_, s)| {
                s.proposal
                    .as_ref()
                    .is_some_and(|p| p.pre_prepare.body.view == self.view)
            })
            .map(|(seq, _)| *seq)
            .next()?;
        (last > first).then(|| (first, SeqNo(last.0 - 1)))
    }

    fn fill_hole_tick(&mut self, actions: &mut Vec<Action>) {
        let Some((first, asked, asked_all)) = self.fill_hole else {
            return;
        };
        let wait = self.config.protocol.retransmit_ticks;
        if self.ticks < asked + wait {
            return;
        }
        let Some((from, to)) = self.hole_range() else {
            self.fill_hole = None;
            return;
        };
        let message = Message::Agreement(AgreementMessage::FillHole {
            view: self.view,
            from,
            to,
        });
        self.metrics.fill_holes += 1;
        if asked_all || self.ticks >= asked + 2 * wait {
            actions.push(Action::Broadcast { message });
        } else {
            actions.push(Action::Send {
                to: self.primary(),
                message,
            });
        }
        self.fill_hole = Some((first, asked, self.ticks >= asked + 2 * wait));
    }

    fn on_fill_hole(
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

    fn on_filled(&mut self, from: ReplicaId, proposal: Proposal, actions: &mut Vec<Action>) {
        let awaited = self
            .log
            .get(&proposal.pre_prepare.body.seq)
            .is_some_and(|s| s.awaiting.is_some());
        if !self.config.protocol.fast_path && !awaited {
            return;
        }
        self.accept_pre_prepare(from, proposal, actions);
    }

    /// Two orders the primary of one view signed for one sequence number that differ: the
    /// primary is faulty. Leave its view (PROTOCOLS §2.3, 4d).
    fn on_pom(&mut self, sender: Principal, pom: Pom, actions: &mut Vec<Action>) {
        if !pom.convicts(self.n()) {
            return self.misbehaved(sender, "proof of misbehaviour that proves nothing", actions);
        }
        if pom.first.body.view != self.view || !self.view_active {
            return;
        }
        self.metrics.poms += 1;
        tracing::warn!(
            replica = self.id.0,
            view = self.view.0,
            seq = pom.first.body.seq.0,
            "primary equivocated"
        );
        self.misbehaved(
            Principal::Replica(pom.first.body.primary),
            "equivocating primary (proof of misbehaviour)",
            actions,
        );
        self.on_view_change_timeout(actions);
    }

    /// Backup: records an accepted proposal durably, then sends its prepare (rule 3).
    fn accept_and_prepare(&mut self, proposal: Proposal, actions: &mut Vec<Action>) {
        let b = proposal.pre_prepare.body.clone();
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

    pub fn on_prepare(
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

    pub fn on_commit(
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

    fn try_prepared(&mut self, seq: SeqNo, actions: &mut Vec<Action>) {
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
    fn execute_ready(&mut self, actions: &mut Vec<Action>) {
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
                        spec.results
                    }
                    _ => {
                        self.roll_back_speculation(actions);
                        continue;
                    }
                }
            } else {
                let results = self
                    .exec
                    .execute_batch(&proposal.batch, &proposal.pre_prepare.body.nondet);
                self.spec_executed = seq;
                results
            };
            self.commit_executed(seq, &proposal, results, actions);
        }
        self.answer_deferred_reads(actions);
        self.speculate(actions);
        self.try_propose(actions);
    }

    /// See `on_request`: the state may not answer reads yet.
    fn reads_behind(&self) -> bool {
        self.last_executed < self.read_only_barrier || self.spec_executed > self.last_executed
    }

    fn answer_deferred_reads(&mut self, actions: &mut Vec<Action>) {
        if self.deferred_reads.is_empty()
            || self.reads_behind()
            || self.transfer.is_some()
            || self.stable_ahead.is_some()
        {
            return;
        }
        tracing::debug!(
            replica = self.id.0,
            reads = self.deferred_reads.len(),
            last = self.last_executed.0,
            "held reads answered"
        );
        while let Some(request) = self.deferred_reads.pop_front() {
            self.metrics.read_only_requests += 1;
            let result = self.exec.execute_read_only(&request);
            actions.push(self.reply(&request.body, result, true));
        }
    }

    /// The slot after `last_executed` committed and has run: reply, notify, checkpoint.
    fn commit_executed(
        &mut self,
        seq: SeqNo,
        proposal: &Proposal,
        results: Vec<ExecutedRequest>,
        actions: &mut Vec<Action>,
    ) {
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
        if !proposal.batch.requests.is_empty() {
            self.forget_answered_waiting(self.spec_executed > self.last_executed);
        }
        for r in results {
            actions.push(Action::SendClient {
                to: r.client,
                message: Message::Client(ClientMessage::Reply(Reply {
                    view: self.view,
                    client: r.client,
                    timestamp: r.timestamp,
                    replica: self.id,
                    read_only: false,
                    result: r.result,
                })),
            });
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

    /// Fast path: runs this view's accepted proposals in sequence, each only if its history
    /// chains onto the state's, and sends speculative replies.
    fn speculate(&mut self, actions: &mut Vec<Action>) {
        if !self.config.protocol.fast_path
            || !self.view_active
            || self.transfer.is_some()
            || self.halted
        {
            return;
        }
        if self.last_executed < self.stable.seq {
            return;
        }
        // Reads wait for a fully committed state: running more batches now would keep them
        // waiting for as long as writes keep coming.
        if !self.deferred_reads.is_empty() {
            return;
        }
        loop {
            // Checkpoints are taken on committed state only: wait at a boundary until it commits.
            let boundary = self.spec_executed.0 % self.config.protocol.checkpoint_interval == 0;
            if boundary && self.spec_executed > self.last_executed {
                return;
            }
            let seq = self.spec_executed.next();
            let Some(previous) = self.executed_history() else {
                return;
            };
            let Some(slot) = self.log.get(&seq) else {
                return;
            };
            let Some(proposal) = slot.proposal.clone() else {
                return;
            };
            let b = &proposal.pre_prepare.body;
            if b.view != self.view || slot.committed && seq == self.last_executed.next() {
                return;
            }
            if b.history != chain_history(&previous, seq, &b.batch_digest, &b.nondet) {
                return;
            }
            // Our view-change evidence for this slot is an older certificate of the same
            // content (see `evidence`), which may rank below a conflicting proposal a later
            // view saw: a fast completion must not rest on it, so this one waits for its commit.
            if slot.certificate.as_ref().is_some_and(|c| {
                c.pre_prepare.body.view < b.view && same_content(&c.pre_prepare.body, b)
            }) {
                return;
            }
            let results = self.exec.execute_batch(&proposal.batch, &b.nondet);
            self.spec_executed = seq;
            self.read_only_barrier = self.read_only_barrier.max(seq);
            for r in &results {
                self.spec_keys.insert((r.client, r.timestamp), seq);
                let reply = Reply {
                    view: self.view,
                    client: r.client,
                    timestamp: r.timestamp,
                    replica: self.id,
                    read_only: false,
                    result: r.result.clone(),
                };
                let message = SpecResponse {
                    reply,
                    order: proposal.pre_prepare.clone(),
                };
                actions.push(Action::SendClient {
                    to: r.client,
                    message: Message::Client(ClientMessage::SpecResponse(Box::new(message))),
                });
            }
            self.metrics.speculated_batches += 1;
            tracing::debug!(replica = self.id.0, seq = seq.0, "speculated");
            actions.push(Action::Notify(Notification::Speculated {
                seq,
                batch_digest: b.batch_digest,
            }));
            if let Some(slot) = self.log.get_mut(&seq) {
                slot.executed = Some(Speculation {
                    order: proposal.pre_prepare.clone(),
                    results,
                });
            }
        }
    }

    /// Undoes every speculative execution: the service (and its reply cache) goes back to the
    /// newest checkpoint at or below `last_executed` (always committed state), and the committed
    /// batches after it run again.
    fn roll_back_speculation(&mut self, actions: &mut Vec<Action>) {
        let Some(base) = self
            .own_checkpoints
            .range(..=self.last_executed)
            .next_back()
            .map(|(_, c)| c.clone())
        else {
            return self.halt("no checkpoint to roll speculation back to".into(), actions);
        };
        let replies = match ReplyTable::decode(&base.replies, ReplyLimits::of(&self.config)) {
            Ok(r) => r,
            Err(e) => return self.halt(format!("own reply cache: {e}"), actions),
        };
        if let Err(e) = self.exec.rollback_to(base.seq.0, replies) {
            return self.halt(format!("rollback to {}: {e}", base.seq.0), actions);
        }
        tracing::info!(
            replica = self.id.0,
            to = base.seq.0,
            from = self.spec_executed.0,
            "speculation rolled back"
        );
        actions.push(Action::Notify(Notification::RolledBack {
            to: base.seq,
            from: self.spec_executed,
        }));
        self.metrics.rollbacks += 1;
        self.set_service_position(base.seq);
    }

    /// The service now holds exactly the committed state at `seq`.
    fn set_service_position(&mut self, seq: SeqNo) {
        self.last_executed = seq;
        self.spec_executed = seq;
        self.safety.reset_executed(seq);
        self.spec_keys.clear();
        for slot in self.log.values_mut() {
            slot.executed = None;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Checkpoints

    fn take_checkpoint(&mut self, seq: SeqNo, actions: &mut Vec<Action>) {
        let cp = match self.exec.checkpoint(seq.0) {
            Ok(cp) => cp,
            Err(e) => return self.halt(format!("checkpoint {}: {e}", seq.0), actions),
        };
        actions.push(Action::Persist(WalRecord::CheckpointTaken {
            seq,
            service_root: cp.service_root,
            replies: cp.replies.clone(),
        }));
        let signed = self.signer.sign(Checkpoint {
            seq,
            service_root: cp.service_root,
            replies_digest: cp.replies_digest,
            replica: self.id,
        });
        actions.push(Action::Broadcast {
            message: Message::Agreement(AgreementMessage::Checkpoint(signed.clone())),
        });
        actions.push(Action::Notify(Notification::CheckpointTaken {
            seq,
            service_root: cp.service_root,
            replies_digest: cp.replies_digest,
        }));
        self.own_checkpoints.insert(
            seq,
            OwnCheckpoint {
                seq,
                service_root: cp.service_root,
                replies: cp.replies,
                replies_digest: cp.replies_digest,
            },
        );
        self.checkpoint_votes
            .entry(seq)
            .or_default()
            .insert(self.id, signed);
        self.try_stable(seq, actions);
    }

    pub fn on_checkpoint(
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
    fn adopt_stable(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
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
    fn jump_stable(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
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
    }

    /// Service checkpoints below `seq` go only at the start of the next step: by then the
    /// driver has made this step's records (the snapshot naming the newer checkpoint) durable,
    /// so a crash never leaves the service without a checkpoint the WAL knows.
    fn defer_discard(&mut self, seq: SeqNo) {
        self.discard_pending = Some(self.discard_pending.map_or(seq, |s| s.max(seq)));
    }

    fn make_stable(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
        let seq = cert.seq;
        if seq <= self.stable.seq {
            return;
        }
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
        self.try_propose(actions);
    }

    // -----------------------------------------------------------------------------------------
    // Catching up: committed batches from peers

    pub fn on_fetch_committed(
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

    pub fn on_committed(
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

    // -----------------------------------------------------------------------------------------
    // Timers

    fn on_tick(&mut self, now_ns: u64, actions: &mut Vec<Action>) {
        self.ticks += 1;
        self.now_ns = self.now_ns.max(now_ns);
        let p = self.config.protocol.clone();

        if let Some(transfer) = self.transfer.as_mut() {
            let mut steps = Vec::new();
            transfer.on_tick(self.ticks, p.retransmit_ticks, &mut steps);
            let target = transfer.target.seq;
            self.apply_transfer_steps(steps, actions);
            // Peers discard checkpoints once newer ones are stable: chase the newest.
            if let Some(newer) = self.stable_ahead.clone().filter(|c| c.seq > target) {
                self.begin_transfer(newer, actions);
            } else if self.ticks % (4 * p.retransmit_ticks) == 0 {
                actions.push(Action::Broadcast {
                    message: Message::StateTransfer(StateTransferMessage::QueryStable),
                });
            }
        }

        // View-change timers.
        if self.view_active {
            // Requests clients are waiting on, and proposals of this view not committed: the
            // primary owes progress on both (the primary watches its own proposals too, so a
            // view whose quorum fell apart is left even when no backup notices).
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
            if let Some(t) = oldest {
                if self.ticks >= t.max(self.caught_up_tick) + self.view_change_timeout_ticks {
                    self.on_view_change_timeout(actions);
                }
            }
        } else if self.view_change_deadline.is_some_and(|d| self.ticks >= d) {
            self.on_view_change_timeout(actions);
        }

        if self.ticks % p.retransmit_ticks == 0 {
            self.retransmit(actions);
        }
        if self.view_active {
            self.note_hole();
            self.fill_hole_tick(actions);
            if self.ticks % p.retransmit_ticks == 0 {
                self.request_awaited_batches(actions);
            }
        }

        // Catching up.
        if self.transfer.is_none() {
            let stalled = self.ticks >= self.last_progress_tick + p.catch_up_ticks;
            if let Some(cert) = self.stable_ahead.clone() {
                if cert.seq > self.last_executed
                    && (stalled || self.last_executed < self.stable.seq)
                {
                    self.begin_transfer(cert, actions);
                }
            }
            if self.transfer.is_none()
                && self.highest_seen > self.last_executed
                && stalled
                && self.ticks >= self.last_fetch_tick + p.catch_up_ticks
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
        self.try_propose(actions);
    }

    fn next_peer(&mut self) -> ReplicaId {
        let n = self.n() as u32;
        self.fetch_rotation = (self.fetch_rotation + 1) % n;
        if self.fetch_rotation == self.id.0 {
            self.fetch_rotation = (self.fetch_rotation + 1) % n;
        }
        ReplicaId(self.fetch_rotation)
    }

    /// Resends this replica's part of whatever is not committed yet (messages get lost).
    fn retransmit(&mut self, actions: &mut Vec<Action>) {
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

    // -----------------------------------------------------------------------------------------
    // View change

    /// The primary of the current view (or the view change to it) took too long.
    pub fn on_view_change_timeout(&mut self, actions: &mut Vec<Action>) {
        let next = self.view.next();
        self.start_view_change(next, actions);
    }

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
        self.maybe_send_new_view(actions);
    }

    pub fn on_view_change(
        &mut self,
        from: ReplicaId,
        vc: Signed<ViewChange>,
        actions: &mut Vec<Action>,
    ) {
        if !view_change::valid_view_change(&self.config, &self.genesis, &vc.body) {
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

    fn maybe_send_new_view(&mut self, actions: &mut Vec<Action>) {
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
        let plan = view_change::plan_new_view(&self.config, &chosen);
        let pre_prepares: Vec<Signed<PrePrepare>> = speculation::reissue(self.view, self.id, &plan)
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

    pub fn on_new_view(&mut self, from: ReplicaId, nv: Signed<NewView>, actions: &mut Vec<Action>) {
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
        if !view_change::valid_quorum(&self.config, &self.genesis, v, &nv.body.view_changes) {
            return self.misbehaved(
                Principal::Replica(from),
                "new view without a valid quorum",
                actions,
            );
        }
        // Rule 6: recompute and compare.
        let plan = view_change::plan_new_view(&self.config, &nv.body.view_changes);
        let expected = speculation::reissue(v, nv.body.primary, &plan);
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

    fn install_new_view(
        &mut self,
        nv: Signed<NewView>,
        plan: NewViewPlan,
        actions: &mut Vec<Action>,
    ) {
        let view = nv.body.view;
        self.view = view;
        self.view_active = true;
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
        self.request_awaited_batches(actions);
        self.next_seq = max_seq.max(self.last_executed).next();
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
    }

    fn on_query_new_view(&mut self, from: ReplicaId, view: View, actions: &mut Vec<Action>) {
        if let Some(nv) = &self.new_view_message {
            if nv.body.view >= view {
                actions.push(Action::Send {
                    to: from,
                    message: Message::ViewChange(ViewChangeMessage::NewView(nv.clone())),
                });
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // State transfer

    fn begin_transfer(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
        if cert.seq <= self.last_executed && self.last_executed >= self.stable.seq {
            return;
        }
        self.start_transfer(cert, actions)
    }

    /// Starts a state transfer to `cert` whatever we executed (also when our own state at
    /// `cert` turned out corrupt).
    fn start_transfer(&mut self, cert: CheckpointCertificate, actions: &mut Vec<Action>) {
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
        if let Err(e) = self.exec.rollback_to(base.seq.0, replies) {
            return self.halt(format!("rollback to {}: {e}", base.seq.0), actions);
        }
        self.set_service_position(base.seq);
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
        let fetched = self
            .transfer
            .take()
            .map(Transfer::into_fetched)
            .unwrap_or_default();
        let mut steps = Vec::new();
        let mut transfer = Transfer::start(
            cert,
            base.seq,
            self.id,
            peers,
            self.config.weak_quorum(),
            self.ticks,
            &mut steps,
        );
        transfer.carry(fetched);
        self.transfer = Some(transfer);
        self.apply_transfer_steps(steps, actions);
    }

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

    fn on_state_transfer(
        &mut self,
        from: ReplicaId,
        message: StateTransferMessage,
        actions: &mut Vec<Action>,
    ) {
        use StateTransferMessage as M;
        let service = self.exec.service();
        let reply =
            match &message {
                M::QueryStable => Some(M::ReplyStable(self.stable.clone())),
                M::GetNode { seq, level, index } => service
                    .partition_node(seq.0, *level, *index)
                    .map(|children| M::Node {
                        seq: *seq,
                        level: *level,
                        index: *index,
                        object_count: service.object_count(),
                        children,
                    }),
                M::GetPieceDigests { seq, index } => {
                    service
                        .piece_digests_at(seq.0, *index)
                        .map(|digests| M::PieceDigests {
                            seq: *seq,
                            index: *index,
                            digests,
                        })
                }
                M::GetPiece { seq, index, piece } => service
                    .get_piece_at(seq.0, *index, *piece)
                    .map(|bytes| M::Piece {
                        seq: *seq,
                        index: *index,
                        piece: *piece,
                        bytes,
                    }),
                M::GetReplies { seq } => self.own_checkpoints.get(seq).map(|c| M::Replies {
                    seq: *seq,
                    table: c.replies.clone(),
                }),
                _ => None,
            };
        if let Some(reply) = reply {
            return actions.push(Action::Send {
                to: from,
                message: Message::StateTransfer(reply),
            });
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
                if cert.seq > self.last_executed {
                    self.stable_ahead = Some(cert.clone());
                    self.begin_transfer(cert, actions);
                } else {
                    self.adopt_stable(cert, actions);
                }
            }
            M::Node { .. } | M::PieceDigests { .. } | M::Piece { .. } | M::Replies { .. } => {
                let Some(mut transfer) = self.transfer.take() else {
                    return;
                };
                let mut steps = Vec::new();
                let finished =
                    transfer.on_message(self.exec.service(), from, message, self.ticks, &mut steps);
                self.metrics.state_transfer_bytes = self
                    .metrics
                    .state_transfer_bytes
                    .max(transfer.bytes_fetched);
                let target = transfer.target.clone();
                let base = transfer.base;
                self.transfer = Some(transfer);
                self.apply_transfer_steps(steps, actions);
                if let Some(finished) = finished {
                    self.transfer = None;
                    self.finish_transfer(target, base, finished, actions);
                }
            }
            _ => {}
        }
    }

    fn finish_transfer(
        &mut self,
        target: CheckpointCertificate,
        base: SeqNo,
        finished: state_transfer::Finished,
        actions: &mut Vec<Action>,
    ) {
        let limits = ReplyLimits::of(&self.config);
        let retry = |this: &mut Self, why: &str, actions: &mut Vec<Action>| {
            tracing::warn!(replica = this.id.0, why, "state transfer failed; retrying");
            let base_replies = this
                .own_checkpoints
                .get(&base)
                .map(|c| c.replies.clone())
                .unwrap_or_default();
            let replies = ReplyTable::decode(&base_replies, limits)
                .unwrap_or_else(|_| ReplyTable::new(limits));
            if let Err(e) = this.exec.rollback_to(base.0, replies) {
                this.halt(format!("rollback to {}: {e}", base.0), actions);
            }
            this.stable_ahead = Some(target.clone());
        };
        let replies = match ReplyTable::decode(&finished.replies, limits) {
            Ok(r) => r,
            Err(_) => return retry(self, "reply cache does not decode", actions),
        };
        if let Err(e) = self.exec.service_mut().put_objs(finished.objects) {
            return retry(self, &e.to_string(), actions);
        }
        // The certified state may have fewer object slots than ours.
        if let Err(e) = self
            .exec
            .service_mut()
            .set_object_count(finished.object_count)
        {
            return retry(self, &e.to_string(), actions);
        }
        self.exec.set_replies(replies);
        // Requests the transferred state already executed will never run here.
        self.forget_answered_waiting(false);
        let cp = match self.exec.checkpoint(target.seq.0) {
            Ok(cp) => cp,
            Err(e) => return self.halt(format!("checkpoint after state transfer: {e}"), actions),
        };
        if cp.service_root != target.service_root || cp.replies_digest != target.replies_digest {
            return retry(
                self,
                "installed state does not match the certified digest",
                actions,
            );
        }
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
