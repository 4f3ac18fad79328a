//! The replica's protocol core: a sans-IO state machine (PBFT ordering with checkpoints,
//! Zyzzyva's speculative fast path with rollback, the evidence-ranked view change of PROTOCOLS
//! §2.8–2.9, catch-up and state transfer).
//!
//! No I/O, no clock, no randomness, no `HashMap` iteration: the same events in the same order
//! give the same actions, which is what lets the simulator replay a run from its seed.
//!
//! # Where each protocol lives
//!
//! This file holds the [`Replica`] type, [`Replica::step`] and the dispatch of each message to
//! its handler. Each protocol has a file of its own, named after it; handlers are named after
//! what they handle (`on_pre_prepare`, `on_checkpoint`, `on_view_change_timeout`, ...).
//!
//! - `requests.rs`: client requests: the read-only path, answers from the reply cache,
//!   relaying a request to the primary and watching it.
//! - `ordering.rs`: the normal case (PROTOCOLS §2.3): the primary proposes; pre-prepare,
//!   prepare, commit; committed batches executed in order.
//! - `fast_path.rs`: Zyzzyva's speculative execution and its rollback (§6), holes below a
//!   buffered proposal, proofs of misbehaviour, the histories a new view re-issues.
//! - `checkpoint.rs`: checkpoints taken, checkpoint votes, stable checkpoints and the log
//!   window (§2.4).
//! - `catch_up.rs`: fetching what the log lacks from peers: committed batches
//!   (`FetchCommitted`), batches by sequence number and view (`FillHole`).
//! - `view_change/` (§2.8–2.9): `start.rs` leaves a view (timeouts, the view change, the
//!   evidence reported), `new_view.rs` enters one (the new view built, checked, installed); the
//!   pure rules in `evidence.rs` (what a view change may carry) and `plan.rs` (what a new view
//!   re-issues); their tests and the model check.
//! - `state_transfer/` (§4.3): the core's side (start, chase a newer target, retry, install);
//!   the verified walk of the partition tree and the answers to peers run in the execution
//!   stage ([`crate::execution::transfer`]).
//! - `timers.rs`: the tick: which timers are due, each with its named handler
//!   (`on_state_transfer_timeout`, `on_view_change_timeout`, `on_retransmit_timeout`,
//!   `on_fill_hole_timeout`, `on_catch_up_timeout`).
//! - `restore.rs`: recovery, a core rebuilt from its WAL and the checkpoints its reopened
//!   service holds after a restart.
//! - `durable.rs`: what survives a crash: [`DurableState`], [`WalRecord`], snapshots.
//! - `invariants.rs`: the checks run after every step, and the handlers' pre- and
//!   postconditions (all of them in tests, debug builds and the simulator).
//! - `safety.rs`: the safety rules, numbered: one proposal per slot, views only grow, persist
//!   before send, commit only what prepared, execute in order once, new views recomputed.
//! - `execution.rs`: what passes between the core and the execution stage: the reply cache
//!   ([`execution::ReplyTable`]; the stage checkpoints it, the core keeps a copy), executed
//!   requests, checkpoints.
//! - `executed.rs`: execution as actions: the core asks ([`StageAction::Execute`],
//!   [`StageAction::TakeCheckpoint`], [`StageAction::Rollback`], ...), and handles the
//!   stage's answers ([`Event::Executed`], [`Event::CheckpointTaken`], ...), matched first in,
//!   first out. The core makes no service, file-system, clock or network call: the stage
//!   ([`crate::execution::Stage`]) does.
//! - `bounds.rs`: upper bounds of every message and record, checked against the frame and
//!   record limits.
//! - `tests/`: unit tests of the core, one file per protocol.
//!
//! The handlers are private to the core. The only way in is [`Replica::step`], with a tick or
//! an [`Authenticated`] message, which only the verifier
//! ([`crate::wire::Authenticator::open`]) builds.
//!
//! # Driver contract
//!
//! The core holds no service: [`crate::execution::Replica`] pairs it with an in-process
//! execution stage and is what the driver and the simulator run (profile A). What follows is
//! the contract between the core and whoever drives it.
//!
//! **Construction.** [`Core::restore`] with every WAL record that was durable, in order (none
//! for a new replica), the service's request policy and the checkpoints the reopened service
//! holds; it returns the checkpoint the stage must roll the service back to first, if any
//! (the service's state is that of its newest checkpoint; the core goes back further if its
//! WAL lacks that checkpoint's record, and catches up from peers from there).
//!
//! **Events.** Call [`Core::step`] with
//! - [`Event::Message`]: a frame that [`crate::wire::Authenticator::open`] accepted (from a
//!   replica or a client). Frames that fail are never given to the core; count and drop them.
//! - [`Event::Tick`]: once per [`crate::config::ProtocolConfig::tick_ns`] of real time, with the
//!   driver's wall clock in `now_ns` (used only for the agreed time a primary proposes and
//!   backups check). All timeouts in the core count ticks.
//! - [`Event::Persisted`]: WAL records made durable (see `Action::Persist` below).
//! - the execution stage's answers ([`Event::Executed`], [`Event::CheckpointTaken`],
//!   [`Event::ReadOnlyExecuted`], [`Event::StateInstalled`], [`Event::ExecutionFailed`]), one
//!   per execution action that has one, in the order the actions were asked.
//!
//! **Actions**, appended to the caller's vector, must be performed **in order**:
//! - [`Action::Persist`]: append the record to the WAL. It must be durable (fsync'ed) before
//!   any later action of the list (or of a later step) is performed. A driver may group
//!   consecutive records into one write and one fsync, but must not send anything that follows
//!   a record before that fsync returns. A [`WalRecord::Snapshot`] supersedes every earlier
//!   record: once it is durable the driver may delete the records before it.
//!   Once records are durable, tell the core with [`Event::Persisted`] (`upto` counts the
//!   `Persist` actions performed since the core was built): service checkpoints that only
//!   those records make unnecessary for a restart are discarded then, not before.
//! - [`Action::Send`] / [`Action::Broadcast`] (to every other replica) /
//!   [`Action::SendClient`]: seal with [`crate::wire::Authenticator::seal`] and send. Best
//!   effort: the core retransmits what matters, so a full queue may drop a message.
//! - [`Action::Notify`]: information for logs, metrics and tests; no effect needed.
//! - [`Action::Halt`]: the service failed (storage error). Stop the replica; it behaves as a
//!   crashed replica and may be restarted from durable state.
//! - [`Action::Stage`]: for the execution stage, which performs
//!   them in the order asked. The core changes its own state when it asks (which batches ran,
//!   where the service stands: that never depends on results) and does what depends on the
//!   results (replies, checkpoint votes, the check of a transferred state) when the answer
//!   comes. Batches run when they commit, and with [`crate::config::ProtocolConfig::fast_path`]
//!   the accepted ones of the installed view before they commit; speculative runs are undone
//!   by [`StageAction::Rollback`] to the newest checkpoint (always a committed sequence number), so
//!   the stage keeps its checkpoints from the stable one on until told to discard them.

pub mod bounds;
mod catch_up;
mod checkpoint;
mod durable;
mod executed;
pub mod execution;
pub mod fast_path;
mod invariants;
pub mod lock;
mod ordering;
mod requests;
pub mod restore;
pub mod safety;
pub mod state_transfer;
#[cfg(test)]
mod tests;
mod timers;
pub mod view_change;

pub use crate::execution::Replica;
pub use durable::{DurableState, OwnCheckpoint, WalRecord};

use crate::config::ClusterConfig;
use crate::wire::{
    AgreementMessage, Authenticated, Batch, Checkpoint, CheckpointCertificate, ClientMessage,
    Commit, CommitCertificate, Digest, Message, NewView, PrePrepare, Prepare, PreparedCertificate,
    Principal, Proposal, ReplicaId, Request, SeqNo, Signed, Signer, StateTransferMessage,
    Timestamp, View, ViewChange, ViewChangeMessage,
};
use execution::{ExecutedRequest, ExecutorCheckpoint, ReplyTable};
use safety::SafetyRules;
use state_abstraction::{
    AbstractObject, ClientId, LockEvent, LockId, LockedResult, RequestPolicy, ServiceError,
};
use state_transfer::{Finished, TransferJob, TransferStep};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use view_change::Genesis;

/// An input to the core.
#[derive(Debug)]
pub enum Event {
    Message(Authenticated<Message>),
    Tick {
        now_ns: u64,
    },
    /// The driver made every WAL record up to the `upto`-th one this core asked for (counted
    /// from 1 since it was built) durable.
    Persisted {
        upto: u64,
    },
    /// The results of an [`StageAction::Execute`]: one entry per request of the batch that was
    /// answered (new ones run, duplicates answered from the reply cache), in batch order.
    Executed {
        seq: SeqNo,
        results: Vec<ExecutedRequest>,
        /// Locks the batch froze (see [`state_abstraction::LockEvent`]).
        lock_events: Vec<LockEvent>,
        /// The next checkpoint has work beyond the digest (a lock to activate or merge):
        /// a primary pads to it with null batches (`Service::checkpoint_work_pending`).
        checkpoint_work: bool,
    },
    /// The result of an [`StageAction::TakeCheckpoint`].
    CheckpointTaken {
        seq: SeqNo,
        checkpoint: ExecutorCheckpoint,
        /// Locks the checkpoint activated, froze (expiry) or merged.
        lock_events: Vec<LockEvent>,
    },
    /// The result of an [`StageAction::ExecuteLocked`].
    LockedExecuted {
        lock: LockId,
        k: u64,
        result: LockedResult,
    },
    /// The answer to an [`StageAction::LockDigest`].
    LockDigest {
        lock: LockId,
        digest: Option<Digest>,
    },
    /// The answer to [`StageAction::LockInfos`].
    LockInfos {
        locks: Vec<state_abstraction::locking::LockInfo>,
    },
    /// The answer to [`StageAction::ServeLockBase`] (`None`: not held here).
    LockBaseServed {
        to: ReplicaId,
        lock: LockId,
        from: state_abstraction::locking::BaseCursor,
        page: Option<state_abstraction::locking::BasePage>,
    },
    /// The answer to [`StageAction::InstallLockBase`].
    LockBaseInstalled {
        lock: LockId,
        ok: bool,
    },
    /// The result of an [`StageAction::ExecuteReadOnly`].
    ReadOnlyExecuted {
        client: ClientId,
        timestamp: Timestamp,
        result: Vec<u8>,
    },
    /// The result of an [`StageAction::InstallState`]: the checkpoint taken over the installed
    /// state, or why the objects were refused.
    StateInstalled {
        seq: SeqNo,
        result: Result<ExecutorCheckpoint, String>,
    },
    /// The answer to an [`StageAction::Serve`] (none if the state asked for is not held).
    Served {
        to: ReplicaId,
        answer: Option<StateTransferMessage>,
    },
    /// The answer to a transfer action: requests to send, bad answers noticed, and the
    /// fetched state once complete.
    TransferProgress {
        steps: Vec<TransferStep>,
        bytes_fetched: u64,
        finished: Option<Box<Finished>>,
    },
    /// The execution stage failed (storage error): the replica halts.
    ExecutionFailed {
        reason: String,
    },
}

impl Event {
    /// Events from outside (the network, the clock), as opposed to the execution stage's
    /// answers to the core's own actions.
    fn is_external(&self) -> bool {
        matches!(
            self,
            Event::Message(_) | Event::Tick { .. } | Event::Persisted { .. }
        )
    }
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
    /// For the execution stage, which performs them in the order asked.
    Stage(StageAction),
}

/// What the core asks of the execution stage (see [`Action::Stage`]).
#[derive(Clone, Debug)]
pub enum StageAction {
    /// Run the batch's new requests in order (the reply cache answers
    /// Duplicates) on the state as it stands after every earlier execution action, then
    /// Answer with [`Event::Executed`]. `speculative` batches may later be undone by
    /// [`StageAction::Rollback`].
    Execute {
        seq: SeqNo,
        batch: Batch,
        nondet: Vec<u8>,
        speculative: bool,
    },
    /// Checkpoint the state (service and reply cache) at `seq`, answer with
    /// [`Event::CheckpointTaken`].
    TakeCheckpoint { seq: SeqNo },
    /// Go back to checkpoint `to`, with the reply cache of that checkpoint
    /// (its canonical encoding). No answer unless it fails ([`Event::ExecutionFailed`]).
    Rollback { to: SeqNo, replies: Vec<u8> },
    /// Checkpoints below `seq` are no longer needed.
    DiscardBefore { seq: SeqNo },
    /// Run a read-only request on the current state (nothing ordered is in
    /// Flight when the core asks), answer with [`Event::ReadOnlyExecuted`].
    ExecuteReadOnly { request: Signed<Request> },
    /// Answer a peer's request for state held in our checkpoints
    /// (`GetNode`, `GetPieceDigests`, `GetPiece`), answer with [`Event::Served`].
    Serve {
        to: ReplicaId,
        request: StateTransferMessage,
    },
    /// Start fetching the certified state `target`, diffing against our
    /// Checkpoint `base` (the state the stage was rolled back to); keeps what an earlier
    /// Transfer fetched. Answer with [`Event::TransferProgress`].
    TransferStart {
        target: CheckpointCertificate,
        base: SeqNo,
        peers: Vec<ReplicaId>,
        tick: u64,
    },
    /// An answer from a peer for the transfer in progress.
    TransferMessage {
        from: ReplicaId,
        message: StateTransferMessage,
        tick: u64,
    },
    /// The transfer's retransmission timer.
    TransferTick { tick: u64 },
    /// Install the objects and the reply cache a state transfer fetched
    /// (over the rolled-back base), checkpoint at `seq`, answer with [`Event::StateInstalled`].
    InstallState {
        seq: SeqNo,
        objects: Vec<(u64, AbstractObject)>,
        object_count: u64,
        replies: Vec<u8>,
    },
    /// Run entry `k` of a lock's log on the lock's objects (never undone by a rollback: the
    /// ordered state's rollback leaves the lock's objects alone), answer with
    /// [`Event::LockedExecuted`].
    ExecuteLocked {
        lock: LockId,
        k: u64,
        op: Vec<u8>,
        client: ClientId,
        time_ns: u64,
    },
    /// The digest of a lock's objects now, answer with [`Event::LockDigest`].
    LockDigest { lock: LockId },
    /// Bring a lock's objects back to their activation (the log is replayed after). No
    /// answer unless it fails.
    LockRestart { lock: LockId },
    /// The locks the ordered state holds (after a state transfer), answer with
    /// [`Event::LockInfos`].
    LockInfos,
    /// A page of a lock's objects at activation for a peer, answer with
    /// [`Event::LockBaseServed`].
    ServeLockBase {
        to: ReplicaId,
        lock: LockId,
        from: state_abstraction::locking::BaseCursor,
    },
    /// Install a lock's objects at activation fetched from a peer (checked against its
    /// base digest), answer with [`Event::LockBaseInstalled`].
    InstallLockBase {
        lock: LockId,
        objects: Vec<(u64, AbstractObject)>,
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
    /// Locks whose content (as at activation) this replica fetched from peers and installed
    /// after a state transfer (lock state transfer).
    pub lock_contents_fetched: u64,
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
    /// Known once the execution stage answered.
    results: Option<Vec<ExecutedRequest>>,
}

/// An execution action whose answer has not come back yet, in the order they were asked
/// (the stage answers in that order).
#[derive(Clone, Debug)]
struct InFlight {
    what: InFlightKind,
    /// A rollback was asked after it: its answer is about undone state and is dropped.
    undone: bool,
}

#[derive(Clone, Debug)]
enum InFlightKind {
    Batch {
        seq: SeqNo,
        speculative: bool,
        /// The view its replies are sent in (the one it ran in).
        view: View,
        /// A speculative batch that committed before its results came back: send them as
        /// committed replies too.
        committed: bool,
        asked: Box<executed::AskedBatch>,
    },
    Checkpoint {
        seq: SeqNo,
    },
    ReadOnly,
    Install {
        target: CheckpointCertificate,
        base: SeqNo,
    },
    Serve,
    Transfer,
    Locked {
        lock: LockId,
        k: u64,
        /// Send the result to the holder (not for a replay after a restart).
        reply: bool,
    },
    LockDigest {
        lock: LockId,
        /// Asked after a state transfer, to learn whether the lock is still live here.
        check: bool,
    },
    LockInfos,
    ServeLockBase,
    InstallLockBase,
}

fn same_content(a: &PrePrepare, b: &PrePrepare) -> bool {
    a.batch_digest == b.batch_digest && a.nondet == b.nondet
}

/// The protocol core of a PBFT replica. See the module doc for how to drive it;
/// [`crate::execution::Replica`] drives it with an in-process execution stage.
pub struct Core {
    config: Arc<ClusterConfig>,
    id: ReplicaId,
    signer: Signer,
    /// The service's request rules (read-only path, nondeterminism); no state.
    policy: Arc<dyn RequestPolicy>,
    /// The core's copy of the reply cache, as of the execution answers received so far (the
    /// execution stage holds the one checkpoints are taken of; see [`execution`]).
    replies: ReplyTable,
    /// Execution actions not answered yet, oldest first.
    in_flight: VecDeque<InFlight>,
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
    /// The current view's history anchor: its starting checkpoint and [`crate::wire::history_anchor`] of it
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
    /// After a start, the peers that answered `QueryStable` with a valid certificate: the
    /// query is sent again every catch-up period until f+1 did. Sent once, it was lost when
    /// the links were not up yet, and a replica restarted into an idle cluster (or one busy
    /// only with lock logs) then never learnt how far behind it was.
    stable_answers: Option<std::collections::BTreeSet<ReplicaId>>,
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
    /// The state transfer in progress (the stage runs its fetcher).
    transfer: Option<TransferJob>,

    initial_snapshot: bool,
    /// See [`Core::defer_discard`]: asked for in this step.
    discard_pending: Option<SeqNo>,
    /// Checkpoints below this go once the WAL is durable up to this record.
    discard_after: Option<(SeqNo, u64)>,
    /// WAL records asked for since this core was built (see [`Event::Persisted`]).
    records_asked: u64,
    /// Zzyzx's log servers: one log per active lock.
    locks: lock::LockLogs,
    /// Primary: propose null batches up to the next checkpoint, where lock work waits.
    pad_to_checkpoint: bool,
    /// A new view is being installed: its re-issued slots are not all bound yet.
    installing_view: bool,
    /// The service's state may differ from the correct replicas' (a lock merged here with
    /// content its certified end does not vouch for): no checkpoint votes and no replies to
    /// clients until a state transfer repairs it.
    suspect: bool,
    halted: bool,
    metrics: Metrics,
}

impl Core {
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
    /// The core's copy of the reply cache (see [`execution`]).
    pub fn reply_cache(&self) -> &ReplyTable {
        &self.replies
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

    pub(super) fn n(&self) -> usize {
        self.config.n()
    }
    pub(super) fn f(&self) -> usize {
        self.config.f as usize
    }
    pub(super) fn quorum(&self) -> usize {
        self.config.quorum()
    }
    pub(super) fn primary(&self) -> ReplicaId {
        self.view.primary(self.n())
    }
    pub(super) fn high_water(&self) -> SeqNo {
        SeqNo(self.stable.seq.0 + self.config.protocol.log_window)
    }
    pub(super) fn in_window(&self, seq: SeqNo) -> bool {
        seq > self.stable.seq && seq <= self.high_water()
    }

    pub(super) fn misbehaved(
        &mut self,
        from: Principal,
        what: &'static str,
        actions: &mut Vec<Action>,
    ) {
        self.metrics.misbehaviour += 1;
        tracing::warn!(replica = self.id.0, ?from, what, "peer misbehaved; ignored");
        actions.push(Action::Notify(Notification::Misbehaviour { from, what }));
    }

    pub(super) fn halt(&mut self, reason: String, actions: &mut Vec<Action>) {
        tracing::error!(replica = self.id.0, %reason, "halting");
        self.halted = true;
        actions.push(Action::Halt { reason });
    }

    // -----------------------------------------------------------------------------------------
    // The step function and dispatch

    /// Handles one event, appending the resulting actions (see the module doc).
    pub fn step(&mut self, event: Event, actions: &mut Vec<Action>) {
        if self.halted {
            return;
        }
        let start = actions.len();
        if event.is_external() && self.initial_snapshot {
            self.initial_snapshot = false;
            self.persist_snapshot(actions);
            // After a restart the others may be far ahead: ask where they are.
            actions.push(Action::Broadcast {
                message: Message::StateTransfer(StateTransferMessage::QueryStable),
            });
            self.stable_answers = Some(Default::default());
            self.replay_locks(actions);
        }
        match event {
            Event::Tick { now_ns } => self.on_tick(now_ns, actions),
            Event::Persisted { upto } => self.on_persisted(upto, actions),
            Event::Message(m) => {
                let (sender, message) = m.into_parts();
                self.on_message(sender, message, actions);
            }
            Event::Executed {
                seq,
                results,
                lock_events,
                checkpoint_work,
            } => {
                self.pad_to_checkpoint |= checkpoint_work;
                self.on_executed(seq, results, lock_events, actions)
            }
            Event::CheckpointTaken {
                seq,
                checkpoint,
                lock_events,
            } => self.on_checkpoint_taken(seq, checkpoint, lock_events, actions),
            Event::LockedExecuted { lock, k, result } => {
                self.on_locked_executed(lock, k, result, actions)
            }
            Event::LockDigest { lock, digest } => self.on_lock_digest(lock, digest, actions),
            Event::LockInfos { locks } => self.on_lock_infos(locks, actions),
            Event::LockBaseServed {
                to,
                lock,
                from,
                page,
            } => self.on_lock_base_served(to, lock, from, page, actions),
            Event::LockBaseInstalled { lock, ok } => self.on_lock_base_installed(lock, ok, actions),
            Event::ReadOnlyExecuted {
                client,
                timestamp,
                result,
            } => self.on_read_only_executed(client, timestamp, result, actions),
            Event::StateInstalled { seq, result } => self.on_state_installed(seq, result, actions),
            Event::Served { to, answer } => self.on_served(to, answer, actions),
            Event::TransferProgress {
                steps,
                bytes_fetched,
                finished,
            } => self.on_transfer_progress(steps, bytes_fetched, finished, actions),
            Event::ExecutionFailed { reason } => self.halt(reason, actions),
        }
        if self.suspect {
            // Answers computed on a state that may be wrong would only be noise: f+1
            // matching correct replies never need this replica's.
            let mut i = start;
            while i < actions.len() {
                let client_answer = matches!(
                    &actions[i],
                    Action::SendClient {
                        message: Message::Client(
                            ClientMessage::Reply(_) | ClientMessage::SpecResponse(_)
                        ),
                        ..
                    }
                );
                if client_answer {
                    actions.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        self.records_asked += actions[start..]
            .iter()
            .filter(|a| matches!(a, Action::Persist(_)))
            .count() as u64;
        if let Some(seq) = self.discard_pending.take() {
            // Once this step's records (the snapshot naming the newer checkpoint) are durable.
            let seq = self.discard_after.map_or(seq, |(s, _)| s.max(seq));
            self.discard_after = Some((seq, self.records_asked));
        }
        if let Err(problem) = self.check_invariants(&actions[start..]) {
            panic!("replica {} broke an invariant: {problem}", self.id.0);
        }
    }

    /// WAL records are durable up to `upto`: checkpoints that only they make unnecessary for a
    /// restart may go.
    fn on_persisted(&mut self, upto: u64, actions: &mut Vec<Action>) {
        let Some((seq, needed)) = self.discard_after else {
            return;
        };
        if upto < needed {
            return;
        }
        self.discard_after = None;
        // Never below what a state transfer in progress diffs against.
        let keep = self.transfer.as_ref().map_or(seq, |t| t.base.min(seq));
        actions.push(Action::Stage(StageAction::DiscardBefore { seq: keep }));
    }

    /// Dispatches a message to its handler. Client messages may come relayed by anyone (the
    /// client's signature is what counts); anything else only from another configured replica.
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
            (Principal::Client(_), Message::Lock(m)) => {
                let m = m.clone();
                return self.on_lock_message(sender, m, actions);
            }
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
            Message::Lock(m) => self.on_lock_message(Principal::Replica(from), m, actions),
            Message::Client(_) => {}
        }
    }
}
