//! Deterministic simulator: the real replica core, client and wire format over a simulated
//! network, driven by one `u64` seed.
//!
//! In: a [`Scenario`] (usually [`Scenario::random`] from a seed). Out: a [`Report`], or a
//! [`Failure`] naming the checker that fired.
//!
//! The seed drives a small PRNG ([`Rng`], splitmix64) that decides everything: keys, workload,
//! message delays (reordering), loss, duplication, partitions, crashes and restarts (with WAL
//! records of the interrupted step possibly lost: only what was persisted before the crash
//! point survives), and the Byzantine replica's behaviour (equivocation, corrupted MACs and
//! signatures, forged statements, wrong replies, wrong checkpoint digests, replays, silence,
//! floods of garbage, oversized and unauthenticated frames). Every frame goes through
//! [`crate::wire::Authenticator`] sealing and opening, exactly as on a real network.
//!
//! A run has a safety phase with faults, then a liveness phase in which the network heals,
//! crashed replicas restart, and every client request must complete. Checkers
//! ([`checkers`]): correct replicas never execute different batches at one sequence number;
//! client results are linearizable (ordered results equal a sequential replay of the agreed
//! order, which respects real time; read-only results are those of a state within the read's
//! real-time window); correct replicas answer each ordered request alike; checkpoint digests
//! are identical at correct replicas; views never go back; after the faults stop, every
//! request completes.
//!
//! The replicas run the key-value service ([`ServiceKind::Kv`], the default: small, in
//! memory), or the file service over a real directory each ([`ServiceKind::Fs`]; see
//! [`service`] and, for the workload and the reference service results are checked against,
//! [`fs_workload`]). The data directories go under `SIM_FS_DIR`, or `/dev/shm`, or the
//! system's temporary directory, and are removed after the run.
//!
//! A scenario has n = 3f+1 replicas ([`Scenario::f`]); random scenarios run f = 2 (seven
//! replicas, up to two Byzantine) for about one seed in four. Besides the seed's faults a
//! scenario may carry large operations ([`Scenario::value_bytes`], with deployment limits:
//! [`deployed_protocol`]), crashes set off by events ([`TriggeredCrash`]: the primary after k
//! completions, every replica right after a fast-path completion) and faulty clients
//! ([`ClientFault`]). Every frame sealed must fit [`FRAME_BYTES_MAX`] and every WAL record
//! must fit what the driver can write and read back ([`RECORD_BYTES_MAX`], and
//! [`FRAME_BYTES_MAX`] for decoding): a message or record that cannot exist on a real network
//! or disk is a checker failure, not a panic.
//!
//! # Where things are
//!
//! This file holds the types (behaviours, plans, [`Scenario`], the nodes, [`Sim`]) and the run
//! loop ([`Sim::run`]). [`scenarios`]: the calm and random scenarios, the protocol parameters
//! and the named scenarios; `setup.rs`: building a run; `network.rs`: delivery, loss, delay,
//! partitions and sealing; `replicas.rs`: correct replicas' actions, the WAL, crashes and
//! restarts; `clients.rs`: correct and faulty clients; `byzantine.rs`: the Byzantine replica
//! (its message tampering is [`crate::tamper`]'s, shared with the `--byzantine` modes);
//! `report.rs`: [`Report`] and [`Failure`]; [`checkers`], [`service`], [`fs_workload`].
//!
//! # Running seeds
//!
//! `cargo test -p replica` runs 1,000 random seeds (four tests of 250, f drawn per seed), 200
//! seeds with f = 2, 450 random seeds over the file service (`random_fs`), and the named
//! scenarios of [`NAMED_SCENARIOS`]. Any number of seeds of any named scenario, and the replay
//! of one:
//!
//! ```text
//! SIM_SEEDS=0..20000 cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture
//! SIM_SCENARIO=random_f2 SIM_SEEDS=0..500 cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture
//! SIM_SCENARIO=random_fs SIM_SEEDS=0..5000 cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture
//! SIM_SCENARIO=large_ops_primary_crash SIM_SEED=1 cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture
//! SIM_SCENARIO=fs_time_skew_after_state_transfer SIM_SEED=1 cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture
//! ```
//!
//! `SIM_SCENARIO` defaults to `random`. A failure prints the command that replays it (its
//! scenario's name and seed); the run is byte-for-byte the same. `SIM_TRACE=1` prints what
//! the replicas do.

mod byzantine;
pub mod checkers;
mod clients;
pub mod fs_workload;
mod holder;
mod network;
mod replicas;
mod report;
pub mod scenarios;
pub mod service;
mod setup;
#[cfg(test)]
mod tests;

use crate::client::{Client, ClientAction, Completion, RequestId};
use crate::config::{generate_seeded, ClusterConfig, ClusterKeys, ProtocolConfig};
use crate::core::{Action, Event, Notification, Replica, WalRecord};
use crate::driver::wal::RECORD_BYTES_MAX;
use crate::wire::{
    AgreementMessage, Authenticator, Batch, CheckpointCertificate, ClientMessage, Message, NewView,
    PrePrepare, Principal, Proposal, ReplicaId, SeqNo, Signed, Signer, StateTransferMessage, View,
    ViewChange, ViewChangeMessage, FRAME_BYTES_MAX, FRAME_HEADER_BYTES,
};
use checkers::{Checker, HistoryEntry, Operation};
use fs_workload::{FsClient, FsStep};
use network::seal_frame;
use replicas::encoded_len;
pub use report::{Failure, Report};
pub use scenarios::{deployed_protocol, named_scenario, sim_protocol, NAMED_SCENARIOS};
pub use service::{FsWorkload, ServiceKind};
use service::{RunDir, SimService};
use state_abstraction::kv::KvOp;
use state_abstraction::ClientId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The project's seeded PRNG; one `u64` seed drives the whole run.
pub use crate::rng::Rng;

/// What a Byzantine replica does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Sends nothing at all.
    Silent,
    /// As primary, sends different (validly signed) pre-prepares to different backups.
    Equivocate,
    /// Flips bits in its frames (MACs, signatures, encodings break).
    CorruptAuth,
    /// Sends prepares/commits claiming to be another replica, or signed with the wrong key,
    /// and commits whose signature is broken under a valid MAC.
    ForgeSignatures,
    /// Answers clients with wrong results (committed and speculative replies alike; as the
    /// primary it also re-signs the order inside its speculative replies with another history).
    WrongReplies,
    /// As primary, sends every backup the same batch under a different history (fast-path
    /// equivocation that PBFT's digest vote cannot see; clients catch it with a POM).
    ForkHistory,
    /// Signs checkpoints with wrong digests.
    WrongCheckpoints,
    /// Resends old frames it sent before.
    Replay,
    /// Floods peers with garbage, oversized and useless frames.
    Flood,
    /// As a new primary, sends new views whose pre-prepares differ from what its view
    /// changes determine (a slot dropped, replaced or invented).
    LyingNewView,
    /// Its view changes lie while staying well formed: an older stable checkpoint than it
    /// holds, evidence withheld, prepared certificates downgraded to bare pre-prepares. The
    /// selection must not lose anything a correct quorum member reports.
    StaleViewChange,
    /// As a new primary, sends each backup a valid new view built from a different 2f+1
    /// subset of the view changes it holds (it waits to hold more than 2f+1 so that the
    /// subsets differ). Each plan alone is safe; together they must not split agreement.
    SplitNewView,
    /// As primary, proposes agreed times anywhere inside the window the backups accept,
    /// ahead of every clock and back below times already agreed, and otherwise behaves
    /// correctly (see [`service::SimService`]). Only the clamp at execution keeps times
    /// monotone, so the clamp must be replicated state: a replica that caught up by state
    /// transfer and clamped against a time of its own would diverge.
    SkewedTime,
    /// A little of everything, chosen per message.
    Mixed,
}

/// Random scenarios draw from these; `Mixed` must stay last (it picks from the others).
/// [`Behaviour::SkewedTime`] is not among them, so that key-value seeds draw what they drew
/// before it existed; [`Scenario::random_fs`] draws it (the file service is what it is for).
const BEHAVIOURS: [Behaviour; 13] = [
    Behaviour::ForkHistory,
    Behaviour::LyingNewView,
    Behaviour::Silent,
    Behaviour::Equivocate,
    Behaviour::CorruptAuth,
    Behaviour::ForgeSignatures,
    Behaviour::WrongReplies,
    Behaviour::WrongCheckpoints,
    Behaviour::Replay,
    Behaviour::Flood,
    Behaviour::StaleViewChange,
    Behaviour::SplitNewView,
    Behaviour::Mixed,
];

/// A crash of replica `replica` at tick `at` and its restart at `restart`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashPlan {
    pub replica: u32,
    pub at: u64,
    pub restart: u64,
}

/// A replica cut off from everyone between two ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionPlan {
    pub replica: u32,
    pub from: u64,
    pub until: u64,
}

/// What sets off a [`TriggeredCrash`]: something that happens at a client, not a tick, so
/// the crash lands where the scenario means it to whatever the core's timing becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Once this many requests (of correct clients) have completed.
    Completions(u64),
    /// Right after the first request that completes on 3f+1 speculative replies.
    FastCompletion,
}

/// Who a [`TriggeredCrash`] takes down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victims {
    /// The primary of the highest view any correct replica is in.
    Primary,
    /// Every replica at once (they crash inside their next step, then all restart together).
    All,
}

/// A crash set off by an event, once; the victims restart `down_ticks` later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TriggeredCrash {
    pub when: Trigger,
    pub victims: Victims,
    pub down_ticks: u64,
}

/// A faulty client (beside the correct ones, outside the linearizability history: it
/// touches only its own key, so what it does cannot change what correct clients read).
/// It misbehaves during the faulty phase and falls silent in the liveness phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFault {
    /// Sends request t only to the backups and t+1..=t+window only to the primary: the
    /// primary runs the later ones, which pushes t out of the reply cache's window (stale),
    /// while the backups wait for t and would suspect a primary that did nothing wrong.
    SplitStale,
    /// Sends one operation to the primary and another under the same (client, timestamp)
    /// to every replica.
    ReuseTimestamp,
    /// Floods every replica with read-only requests.
    FloodReads,
}

/// Everything a run does, derived from the seed by [`Scenario::random`] or by a named
/// scenario of [`NAMED_SCENARIOS`] (which is what a failure's replay command names).
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The constructor in [`NAMED_SCENARIOS`] that built this scenario from `seed`.
    pub name: &'static str,
    pub seed: u64,
    /// n = 3f+1 replicas.
    pub f: u32,
    pub clients: u64,
    pub ops_per_client: u64,
    /// Requests each client keeps in flight at most.
    pub client_parallelism: u64,
    pub read_only_per_mille: u64,
    /// Keys the workload spreads over.
    pub keys: u64,
    /// Values of writes are this many bytes (inclusive range) instead of a few; every
    /// operation is then a put to a fresh key (small replies, large requests and batches).
    pub value_bytes: Option<(u64, u64)>,
    /// With `value_bytes`: puts go to the shared keys instead, so each returns the previous
    /// large value (large replies, and a reply cache holding megabytes per client).
    pub large_results: bool,
    pub loss_per_mille: u64,
    pub duplicate_per_mille: u64,
    pub delay_max_ticks: u64,
    /// Byzantine replicas (at most f of them for the liveness phase to be owed).
    pub byzantine: Vec<(u32, Behaviour)>,
    pub crashes: Vec<CrashPlan>,
    pub triggered_crashes: Vec<TriggeredCrash>,
    pub partitions: Vec<PartitionPlan>,
    pub faulty_clients: Vec<ClientFault>,
    /// When faults stop (the liveness phase starts).
    pub fault_end_tick: u64,
    /// Every request must have completed by then.
    pub max_ticks: u64,
    /// Ticks to keep running after every request completed (to let laggards catch up).
    pub drain_ticks: u64,
    /// At most this many views may pass after the faults stop (none: no bound). Faults that
    /// outlive their phase (a Byzantine replica, stale protocol state a faulty client left
    /// behind) must not keep the cluster changing views.
    pub views_after_faults_max: Option<u64>,
    pub protocol: ProtocolConfig,
    /// The service the replicas run (key-value unless a scenario says otherwise).
    pub service: ServiceKind,
    /// Client 0 takes a Zzyzx lock and works under it instead of its plan (key-value only).
    pub lock_holder: bool,
    /// The holder dies half-way with an entry in flight; the same principal then comes back
    /// as an ordinary client, meets the frozen lock, and resolves it with the replicas'
    /// reports.
    pub holder_dies: bool,
    /// Dying, the holder forks its log: two different entries at one k, each to half the
    /// replicas (a Byzantine holder).
    pub holder_forks: bool,
    /// Ticks the holder waits after an entry completes before it sends the next (0: at
    /// once), so that the lock lives long enough for a lagging replica to come back to it.
    pub holder_pace_ticks: u64,
    /// Half-way through its work the holder's own ordered read of its key freezes the lock
    /// (as another client's access would); told by the replicas, the holder finishes what
    /// is in flight, seals what completed and releases with the certificate, falling back
    /// to resolving by reports when that cannot complete.
    pub holder_revoked: bool,
}

enum ReplicaState {
    Up(Box<Replica<SimService>>),
    Down(Box<SimService>),
    Gone,
}

struct ReplicaNode {
    state: ReplicaState,
    auth: Authenticator,
    /// The durable WAL: records persisted by completed actions.
    wal: Vec<WalRecord>,
    /// Records persisted since the replica's core was built (what `Event::Persisted` counts).
    persisted: u64,
    byzantine: Option<Behaviour>,
    /// A Byzantine replica's own signing key (it signs whatever it likes).
    signer: Option<Signer>,
    /// A Byzantine replica's stable checkpoints, oldest first (what a stale view change
    /// reports instead of the newest).
    stable_history: Vec<CheckpointCertificate>,
    /// View changes a Byzantine replica received or sent, by view and sender (a split new
    /// view is built from subsets of them).
    view_changes_held: BTreeMap<View, BTreeMap<ReplicaId, Signed<ViewChange>>>,
    /// A new view its core wants sent, held back until more than a quorum of view changes
    /// arrived (or the deadline passed), then split: (message, receivers, deadline tick).
    held_new_view: Option<(Signed<NewView>, Vec<Principal>, u64)>,
    /// Highest view this replica ever signed something for (must survive restarts).
    max_view_spoken: View,
    last_view: View,
    restarts: u64,
    /// Crash during the next step.
    crash_pending: bool,
    /// When this replica last finished a state transfer: the checkpoint it installed and the
    /// service's count of clamped times then (see [`Report::clamped_after_transfer`]).
    transferred: Option<(SeqNo, u64)>,
}

/// A step of a client's plan: a key-value operation as it will be sent, or a file-service
/// step that the client makes a request of when it gets to it (see [`fs_workload`]).
enum Step {
    Kv(KvOp),
    Fs(FsStep),
}

struct PlannedOp {
    op: Step,
    read_only: bool,
}

struct ClientNode {
    client: Client,
    auth: Authenticator,
    /// File-service runs: what the client learnt from its results.
    fs: Option<FsClient>,
    plan: Vec<PlannedOp>,
    next: usize,
    /// Request id → history index.
    in_flight: BTreeMap<RequestId, usize>,
    next_invoke_tick: u64,
    /// This client is the run's Zzyzx lock holder instead (see `holder.rs`).
    holder: Option<Box<holder::Holder>>,
}

/// A faulty client: it signs and sends requests itself (no [`Client`]).
struct FaultyClientNode {
    fault: ClientFault,
    id: ClientId,
    signer: Signer,
    auth: Authenticator,
    next_timestamp: u64,
    next_tick: u64,
    sent: u64,
}

/// One simulation run.
pub struct Sim {
    scenario: Scenario,
    rng: Rng,
    keys: ClusterKeys,
    config: Arc<ClusterConfig>,
    tick: u64,
    /// (delivery tick, sequence) → (receiver, whole frame: header and body).
    queue: BTreeMap<(u64, u64), (Principal, Arc<Vec<u8>>)>,
    counter: u64,
    replicas: Vec<ReplicaNode>,
    clients: Vec<ClientNode>,
    faulty_clients: Vec<FaultyClientNode>,
    checker: Checker,
    /// Frames the Byzantine replicas sent, for replays.
    replay_pool: Vec<(Principal, Arc<Vec<u8>>)>,
    /// Reports of misbehaviour noticed by correct replicas.
    misbehaviour_noticed: u64,
    /// See [`Report::stripped_commits`].
    stripped_commits: u64,
    /// The history an equivocating primary sent each backup per (backup, view, seq), so its
    /// alternative proposals chain correctly and run speculatively there.
    forks: BTreeMap<(u32, u64, u64), crate::wire::Digest>,
    /// Triggered crashes that have fired (by index in the scenario).
    fired: Vec<bool>,
    /// Highest view of a correct replica when the faults stopped.
    view_at_fault_end: Option<u64>,
    frame_bytes_max: u64,
    record_bytes_max: u64,
    stale_view_changes: u64,
    split_new_views: u64,
    checkpoints_after_transfer: u64,
    /// `SIM_TRACE=1`: print every notification.
    trace: bool,
    /// What kept the run from being set up (a data directory the file service could not
    /// open): `run` reports it as its failure.
    setup_error: Option<String>,
    /// File-service runs: the directory of the replicas' data directories. Last, so that it
    /// is removed after the replicas' services are dropped (they save their tables then).
    _run_dir: Option<RunDir>,
}

impl Sim {
    fn n(&self) -> usize {
        self.replicas.len()
    }

    fn faulty_phase(&self) -> bool {
        self.tick < self.scenario.fault_end_tick
    }

    fn fail(&self, what: String) -> Failure {
        Failure {
            scenario: self.scenario.name,
            seed: self.scenario.seed,
            tick: self.tick,
            what,
        }
    }

    /// The highest view any correct replica that is up is in.
    fn highest_correct_view(&self) -> View {
        self.replicas
            .iter()
            .filter(|n| n.byzantine.is_none())
            .filter_map(|n| match &n.state {
                ReplicaState::Up(r) => Some(r.view()),
                _ => None,
            })
            .max()
            .unwrap_or(View(0))
    }

    fn all_done(&self) -> bool {
        self.clients.iter().all(|c| {
            c.next == c.plan.len()
                && c.in_flight.is_empty()
                && c.holder.as_ref().is_none_or(|h| h.is_done())
        }) && self.checker.completions_awaiting_commit() == 0
    }

    /// Runs the scenario to the end and checks everything.
    pub fn run(&mut self) -> Result<Report, Failure> {
        if let Some(e) = &self.setup_error {
            return Err(self.fail(format!("setup: {e}")));
        }
        let mut drained = 0;
        while self.tick < self.scenario.max_ticks {
            // Faults scheduled for this tick.
            let crashes = self.scenario.crashes.clone();
            for plan in &crashes {
                let r = plan.replica as usize;
                if plan.at == self.tick && matches!(self.replicas[r].state, ReplicaState::Up(_)) {
                    // It crashes in the middle of its next step: some of that step's actions
                    // (WAL records, sends) are lost.
                    self.replicas[r].crash_pending = true;
                }
                if (plan.restart == self.tick
                    || (self.tick == self.scenario.fault_end_tick && plan.restart > self.tick))
                    && matches!(self.replicas[r].state, ReplicaState::Down(_))
                {
                    self.restart(r)?;
                }
            }
            if self.tick == self.scenario.fault_end_tick {
                for r in 0..self.n() {
                    self.restart(r)?;
                }
                self.view_at_fault_end = Some(self.highest_correct_view().0);
            }

            // Deliveries due now.
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.tick {
                    break;
                }
                let (to, frame) = entry.remove();
                self.deliver(to, &frame[FRAME_HEADER_BYTES..])?;
            }

            // Ticks.
            for r in 0..self.n() {
                self.step_replica(
                    r,
                    Event::Tick {
                        now_ns: self.tick * 1_000_000,
                    },
                )?;
                if self.replicas[r].byzantine.is_some() {
                    self.byzantine_extra(r)?;
                }
            }
            for c in 0..self.clients.len() {
                self.client_tick(c)?;
            }
            if self.faulty_phase() {
                for c in 0..self.faulty_clients.len() {
                    self.faulty_client_tick(c)?;
                }
            }
            if let (Some(bound), Some(at_end)) =
                (self.scenario.views_after_faults_max, self.view_at_fault_end)
            {
                let passed = self.highest_correct_view().0.saturating_sub(at_end);
                if passed > bound {
                    return Err(self.fail(format!(
                        "liveness: {passed} views passed after the faults stopped (at most {bound} allowed): the cluster keeps changing views with no fault left to cause it"
                    )));
                }
            }

            if self.tick >= self.scenario.fault_end_tick && self.all_done() {
                if drained >= self.scenario.drain_ticks {
                    break;
                }
                drained += 1;
            }
            self.tick += 1;
        }
        if !self.all_done() {
            let pending: Vec<String> = self
                .clients
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.next < c.plan.len()
                        || !c.in_flight.is_empty()
                        || c.holder.as_ref().is_some_and(|h| !h.is_done())
                })
                .map(|(i, c)| match &c.holder {
                    Some(h) => format!("client {i}: {}", h.describe()),
                    None => format!(
                        "client {i}: {} of {} invoked, {} in flight",
                        c.next,
                        c.plan.len(),
                        c.in_flight.len()
                    ),
                })
                .collect();
            let states: Vec<String> = self
                .replicas
                .iter()
                .enumerate()
                .map(|(i, n)| match &n.state {
                    ReplicaState::Up(r) => format!(
                        "r{i}: {} locks {:?}",
                        r.debug_summary(),
                        r.lock_logs()
                            .iter()
                            .map(|l| (l.lock.0, l.k, l.state))
                            .collect::<Vec<_>>()
                    ),
                    _ => format!("r{i}: down"),
                })
                .collect();
            return Err(self.fail(format!(
                "liveness: requests incomplete after the faults stopped ({}; {} completed awaiting commit; {})",
                pending.join(", "),
                self.checker.completions_awaiting_commit(),
                states.join("; ")
            )));
        }
        self.checker.check_history().map_err(|e| self.fail(e))?;
        self.report()
    }

    /// For tests: the replicas' metrics.
    pub fn replica(&self, r: usize) -> Option<&Replica<SimService>> {
        match &self.replicas[r].state {
            ReplicaState::Up(replica) => Some(replica),
            _ => None,
        }
    }
}

/// Runs one seed's random scenario.
pub fn run_seed(seed: u64) -> Result<Report, Failure> {
    Sim::new(Scenario::random(seed)).run()
}

impl Sim {
    /// Delivers a raw frame body to a replica, as if it came off the network.
    pub fn inject(&mut self, replica: u32, body: Vec<u8>) -> Result<(), Failure> {
        self.deliver(Principal::Replica(ReplicaId(replica)), &body)
    }

    /// The frame counters of a replica's authenticator.
    pub fn counters(&self, replica: u32) -> &crate::wire::WireCounters {
        &self.replicas[replica as usize].auth.counters
    }

    /// The cluster's keys (to craft frames in tests).
    pub fn keys(&self) -> &ClusterKeys {
        &self.keys
    }

    /// How often replica `r` restarted.
    pub fn restarts(&self, r: usize) -> u64 {
        self.replicas[r].restarts
    }

    /// Requests the correct clients' plans hold (what a run must complete).
    pub fn planned_requests(&self) -> u64 {
        self.clients.iter().map(|c| c.plan.len() as u64).sum()
    }

    pub fn client_retransmissions(&self) -> u64 {
        self.clients.iter().map(|c| c.client.retransmissions).sum()
    }
}
