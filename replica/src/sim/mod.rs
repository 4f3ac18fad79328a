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
//! client results are linearizable over the key-value service (ordered results equal a
//! sequential replay of the agreed order, which respects real time; read-only results are a
//! state the key had within the read's real-time window); checkpoint digests are identical at
//! correct replicas; views never go back; after the faults stop, every request completes.
//!
//! # Running seeds
//!
//! `cargo test -p replica` runs 1,000 seeds (four tests of 250). Any number of seeds, and the
//! replay of one:
//!
//! ```text
//! SIM_SEEDS=0..20000 cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture
//! SIM_SEED=1234      cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture
//! ```
//!
//! A failing seed prints the second command with its number; the run is byte-for-byte the same.

pub mod checkers;
#[cfg(test)]
mod tests;

use crate::client::{Client, ClientAction, Completion, RequestId};
use crate::config::{generate, ClusterConfig, ClusterKeys, ProtocolConfig};
use crate::core::{Action, Event, Notification, Replica, WalRecord};
use crate::wire::{
    AgreementMessage, Authenticator, Batch, Checkpoint, ClientMessage, Commit, Message, PrePrepare,
    Prepare, Principal, Proposal, ReplicaId, SeqNo, Signer, StateTransferMessage, View,
    ViewChangeMessage, FRAME_BYTES_MAX, FRAME_HEADER_BYTES,
};
use checkers::{Checker, HistoryEntry};
use state_abstraction::kv::{KvOp, KvService};
use state_abstraction::ClientId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// splitmix64: small, fast, and good enough to drive a simulation.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    pub fn range(&mut self, low: u64, high_inclusive: u64) -> u64 {
        low + self.below(high_inclusive - low + 1)
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What the Byzantine replica does.
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
    /// A little of everything, chosen per message.
    Mixed,
}

const BEHAVIOURS: [Behaviour; 11] = [
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

/// Everything a run does, derived from the seed by [`Scenario::random`] (or set by a test).
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub clients: u64,
    pub ops_per_client: u64,
    /// Requests each client keeps in flight at most.
    pub client_parallelism: u64,
    pub read_only_per_mille: u64,
    pub loss_per_mille: u64,
    pub duplicate_per_mille: u64,
    pub delay_max_ticks: u64,
    pub byzantine: Option<(u32, Behaviour)>,
    pub crashes: Vec<CrashPlan>,
    pub partitions: Vec<PartitionPlan>,
    /// When faults stop (the liveness phase starts).
    pub fault_end_tick: u64,
    /// Every request must have completed by then.
    pub max_ticks: u64,
    /// Ticks to keep running after every request completed (to let laggards catch up).
    pub drain_ticks: u64,
    pub protocol: ProtocolConfig,
}

/// The protocol parameters of simulated clusters: tiny windows so that checkpoints, the
/// high-water mark and log truncation are exercised in short runs.
pub fn sim_protocol() -> ProtocolConfig {
    ProtocolConfig {
        checkpoint_interval: 4,
        log_window: 8,
        batch_requests_max: 4,
        pipeline_batches_max: 2,
        batch_bytes_max: 1 << 16,
        operation_bytes_max: 1 << 12,
        pending_requests_max: 64,
        client_window: 4,
        view_change_timeout_ticks: 80,
        view_change_timeout_ticks_max: 1280,
        retransmit_ticks: 25,
        catch_up_ticks: 50,
        client_retransmit_ticks: 60,
        client_retransmit_ticks_max: 480,
        tick_ns: 1_000_000,
        fast_path: true,
    }
}

impl Scenario {
    /// A quiet run: no faults.
    pub fn calm(seed: u64) -> Self {
        Scenario {
            seed,
            clients: 3,
            ops_per_client: 8,
            client_parallelism: 2,
            read_only_per_mille: 150,
            loss_per_mille: 0,
            duplicate_per_mille: 0,
            delay_max_ticks: 3,
            byzantine: None,
            crashes: Vec::new(),
            partitions: Vec::new(),
            fault_end_tick: 0,
            max_ticks: 6000,
            drain_ticks: 0,
            protocol: sim_protocol(),
        }
    }

    /// Faults chosen by the seed.
    pub fn random(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5EED_5CE7_A710);
        let mut s = Scenario::calm(seed);
        s.clients = rng.range(2, 4);
        s.ops_per_client = rng.range(4, 10);
        s.client_parallelism = rng.range(1, 4);
        s.read_only_per_mille = rng.below(300);
        s.fault_end_tick = rng.range(300, 1500);
        s.delay_max_ticks = if rng.chance(200) {
            rng.range(12, 40)
        } else {
            rng.range(1, 12)
        };
        if rng.chance(700) {
            s.loss_per_mille = if rng.chance(200) {
                rng.range(150, 350)
            } else {
                rng.below(150)
            };
        }
        if rng.chance(400) {
            s.duplicate_per_mille = rng.below(100);
        }
        let byzantine = rng.chance(600);
        if byzantine {
            // The primary of view 0 is replica 0: make it the Byzantine one often.
            let who = if rng.chance(500) {
                0
            } else {
                rng.below(4) as u32
            };
            let behaviour = BEHAVIOURS[rng.below(BEHAVIOURS.len() as u64) as usize];
            s.byzantine = Some((who, behaviour));
        }
        // Crashes of correct replicas (one at a time), with restarts.
        let crashes = rng.below(3);
        let mut t = rng.range(20, 200);
        for _ in 0..crashes {
            let mut replica = rng.below(4) as u32;
            if s.byzantine.is_some_and(|(b, _)| b == replica) {
                replica = (replica + 1) % 4;
            }
            let restart = t + rng.range(30, 500);
            if restart >= s.fault_end_tick {
                break;
            }
            s.crashes.push(CrashPlan {
                replica,
                at: t,
                restart,
            });
            t = restart + rng.range(10, 200);
        }
        // Sometimes two replicas are down at once: more than f, so no progress, but safety
        // must hold and both must come back from their durable state.
        if rng.chance(250) {
            let first = rng.below(4) as u32;
            let mut second = (first + 1 + rng.below(3) as u32) % 4;
            if s.byzantine.is_some_and(|(b, _)| b == second) {
                second = (second + 1) % 4;
            }
            if second != first && !s.byzantine.is_some_and(|(b, _)| b == first || b == second) {
                let at = rng.range(10, s.fault_end_tick / 2);
                s.crashes.push(CrashPlan {
                    replica: first,
                    at,
                    restart: at + rng.range(20, 300),
                });
                s.crashes.push(CrashPlan {
                    replica: second,
                    at: at + rng.below(20),
                    restart: at + rng.range(20, 300),
                });
            }
        }
        for _ in 0..rng.below(3) {
            let replica = rng.below(4) as u32;
            let from = rng.below(s.fault_end_tick);
            let until = (from + rng.range(50, 600)).min(s.fault_end_tick);
            s.partitions.push(PartitionPlan {
                replica,
                from,
                until,
            });
        }
        s.max_ticks = s.fault_end_tick + 6000;
        // One seed in five keeps the commit path alone (what `fast_path: false` deploys).
        s.protocol.fast_path = seed % 5 != 4;
        s
    }
}

/// What a successful run reports.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub ticks: u64,
    pub completed: u64,
    pub read_only_completed: u64,
    pub view_changes: u64,
    pub state_transfers: u64,
    pub fetched_batches: u64,
    /// Batches of re-issued pre-prepares fetched by digest after a new view.
    pub fetched_bodies: u64,
    pub rejected_frames: u64,
    pub misbehaviour_noticed: u64,
    pub highest_executed: u64,
    pub max_view: u64,
    /// Completions on 3f+1 speculative replies.
    pub fast_completions: u64,
    pub speculated_batches: u64,
    pub rollbacks: u64,
    pub poms_sent: u64,
    pub poms_received: u64,
    /// Read-only requests the clients had to send again on the ordered path.
    pub read_only_fallbacks: u64,
    /// Commits with a bad signature that correct replicas dropped from commit certificates
    /// they were sent.
    pub stripped_commits: u64,
}

/// A checker fired (or the run did not finish).
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub tick: u64,
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at tick {}: {}\n  replay: SIM_SEED={} cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture",
            self.seed, self.tick, self.what, self.seed
        )
    }
}

enum ReplicaState {
    Up(Box<Replica<KvService>>),
    Down(Box<KvService>),
    Gone,
}

struct ReplicaNode {
    state: ReplicaState,
    auth: Authenticator,
    /// The durable WAL: records persisted by completed actions.
    wal: Vec<WalRecord>,
    byzantine: Option<Behaviour>,
    /// Highest view this replica ever signed something for (must survive restarts).
    max_view_spoken: View,
    last_view: View,
    restarts: u64,
    /// Crash during the next step.
    crash_pending: bool,
}

struct PlannedOp {
    op: KvOp,
    read_only: bool,
}

struct ClientNode {
    client: Client,
    auth: Authenticator,
    plan: Vec<PlannedOp>,
    next: usize,
    /// Request id → history index.
    in_flight: BTreeMap<RequestId, usize>,
    next_invoke_tick: u64,
}

/// One simulation run.
pub struct Sim {
    scenario: Scenario,
    rng: Rng,
    keys: ClusterKeys,
    config: Arc<ClusterConfig>,
    tick: u64,
    /// (delivery tick, sequence) → (receiver, frame body).
    queue: BTreeMap<(u64, u64), (Principal, Vec<u8>)>,
    counter: u64,
    replicas: Vec<ReplicaNode>,
    clients: Vec<ClientNode>,
    checker: Checker,
    /// Frames the Byzantine replica sent, for replays.
    replay_pool: Vec<(Principal, Vec<u8>)>,
    byzantine_signer: Option<Signer>,
    /// Reports of misbehaviour noticed by correct replicas.
    misbehaviour_noticed: u64,
    /// See [`Report::stripped_commits`].
    stripped_commits: u64,
    /// The history an equivocating primary sent each backup per (backup, view, seq), so its
    /// alternative proposals chain correctly and run speculatively there.
    forks: BTreeMap<(u32, u64, u64), crate::wire::Digest>,
    /// `SIM_TRACE=1`: print every notification.
    trace: bool,
}

impl Sim {
    pub fn new(scenario: Scenario) -> Self {
        let mut rng = Rng::new(scenario.seed);
        let clients: Vec<ClientId> = (0..scenario.clients).map(|i| ClientId(100 + i)).collect();
        let addresses = (0..4).map(|i| format!("sim:{i}")).collect();
        let mut key_rng = Rng::new(scenario.seed ^ 0x6B65_7973);
        let keys = match generate(
            1,
            addresses,
            &clients,
            scenario.protocol.clone(),
            &mut |b| key_rng.fill(b),
        ) {
            Ok(k) => k,
            Err(e) => panic!("simulator keygen: {e}"),
        };
        let config = Arc::new(keys.config.clone());
        let mut replicas = Vec::new();
        for secrets in &keys.replicas {
            let replica = match Replica::new(config.clone(), secrets, KvService::new()) {
                Ok(r) => r,
                Err(e) => panic!("replica: {e}"),
            };
            let byzantine = scenario
                .byzantine
                .filter(|(b, _)| *b == secrets.id.0)
                .map(|(_, behaviour)| behaviour);
            replicas.push(ReplicaNode {
                state: ReplicaState::Up(Box::new(replica)),
                auth: Authenticator::for_replica(&config, secrets),
                wal: Vec::new(),
                byzantine,
                max_view_spoken: View(0),
                last_view: View(0),
                restarts: 0,
                crash_pending: false,
            });
        }
        let byzantine_signer = scenario
            .byzantine
            .map(|(b, _)| Signer::from_secret(&keys.replicas[b as usize].signing_key.0));
        let mut client_nodes = Vec::new();
        for (i, secrets) in keys.clients.iter().enumerate() {
            let mut plan = Vec::new();
            for k in 0..scenario.ops_per_client {
                let key = format!("k{}", rng.below(3)).into_bytes();
                let value = format!("c{i}.{k};").into_bytes();
                let (op, read_only) = match rng.below(10) {
                    0..=2 => (KvOp::Put { key, value }, false),
                    3..=5 => (KvOp::Append { key, value }, false),
                    6 => (KvOp::Delete { key }, false),
                    _ => (
                        KvOp::Get { key },
                        rng.chance(scenario.read_only_per_mille.saturating_mul(3).min(1000)),
                    ),
                };
                plan.push(PlannedOp { op, read_only });
            }
            client_nodes.push(ClientNode {
                client: Client::new(config.clone(), secrets, 1),
                auth: Authenticator::for_client(&config, secrets),
                plan,
                next: 0,
                in_flight: BTreeMap::new(),
                next_invoke_tick: rng.below(20),
            });
        }
        let byzantine = scenario.byzantine.map(|(b, _)| b);
        Sim {
            checker: Checker::new(byzantine),
            scenario,
            rng,
            keys,
            config,
            tick: 0,
            queue: BTreeMap::new(),
            counter: 0,
            replicas,
            clients: client_nodes,
            replay_pool: Vec::new(),
            byzantine_signer,
            misbehaviour_noticed: 0,
            stripped_commits: 0,
            forks: BTreeMap::new(),
            trace: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
        }
    }

    fn faulty_phase(&self) -> bool {
        self.tick < self.scenario.fault_end_tick
    }

    fn fail(&self, what: String) -> Failure {
        Failure {
            seed: self.scenario.seed,
            tick: self.tick,
            what,
        }
    }

    fn partitioned(&self, a: Principal, b: Principal) -> bool {
        if !self.faulty_phase() {
            return false;
        }
        self.scenario.partitions.iter().any(|p| {
            let cut = Principal::Replica(ReplicaId(p.replica));
            self.tick >= p.from && self.tick < p.until && (a == cut) != (b == cut)
        })
    }

    /// Puts a frame on the network (with loss, duplication and delay in the faulty phase).
    fn transmit(&mut self, from: Principal, to: Principal, frame: Vec<u8>) {
        if frame.len() < FRAME_HEADER_BYTES {
            return;
        }
        let body = frame[FRAME_HEADER_BYTES..].to_vec();
        if self.partitioned(from, to) {
            return;
        }
        let faulty = self.faulty_phase();
        if faulty && self.rng.chance(self.scenario.loss_per_mille) {
            return;
        }
        let copies = if faulty && self.rng.chance(self.scenario.duplicate_per_mille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay_max = if faulty {
                self.scenario.delay_max_ticks
            } else {
                self.scenario.delay_max_ticks.min(3)
            };
            let at = self.tick + self.rng.range(1, delay_max.max(1));
            self.counter += 1;
            self.queue.insert((at, self.counter), (to, body.clone()));
        }
    }

    fn send_sealed(&mut self, from_replica: usize, to: Vec<Principal>, message: &Message) {
        let from = Principal::Replica(ReplicaId(from_replica as u32));
        let frame = match self.replicas[from_replica].auth.seal(message, &to) {
            Ok(f) => f,
            Err(e) => panic!("seal: {e}"),
        };
        for receiver in to {
            self.transmit(from, receiver, frame.clone());
        }
    }

    fn other_replicas(&self, me: usize) -> Vec<Principal> {
        (0..4)
            .filter(|r| *r != me)
            .map(|r| Principal::Replica(ReplicaId(r as u32)))
            .collect()
    }

    /// Performs a correct replica's actions (up to `cut` of them, if it crashes mid-step).
    fn perform(&mut self, r: usize, actions: Vec<Action>) -> Result<(), Failure> {
        for action in actions {
            match action {
                Action::Persist(record) => {
                    if matches!(record, WalRecord::Snapshot(_)) {
                        self.replicas[r].wal.clear();
                    }
                    self.replicas[r].wal.push(record);
                }
                Action::Send { to, message } => {
                    if self.trace {
                        eprintln!("[{}] r{r} -> r{}: {}", self.tick, to.0, message.kind());
                    }
                    self.note_spoken(r, &message);
                    self.send_sealed(r, vec![Principal::Replica(to)], &message);
                }
                Action::Broadcast { message } => {
                    self.note_spoken(r, &message);
                    let to = self.other_replicas(r);
                    self.send_sealed(r, to, &message);
                }
                Action::SendClient { to, message } => {
                    self.send_sealed(r, vec![Principal::Client(to)], &message)
                }
                Action::Notify(n) => {
                    if self.trace {
                        eprintln!("[{}] r{r}: {n:?}", self.tick);
                    }
                    if let Notification::Misbehaviour { .. } = n {
                        self.misbehaviour_noticed += 1;
                    }
                    self.checker
                        .observe(r as u32, &n)
                        .map_err(|e| self.fail(e))?;
                }
                Action::Halt { reason } => {
                    return Err(self.fail(format!("replica {r} halted: {reason}")))
                }
            }
        }
        Ok(())
    }

    fn note_spoken(&mut self, r: usize, message: &Message) {
        let me = ReplicaId(r as u32);
        let view = match message {
            Message::Agreement(AgreementMessage::PrePrepare(p))
                if p.pre_prepare.body.primary == me =>
            {
                Some(p.pre_prepare.body.view)
            }
            Message::Agreement(AgreementMessage::Prepare(p)) if p.body.replica == me => {
                Some(p.body.view)
            }
            Message::Agreement(AgreementMessage::Commit(c)) if c.body.replica == me => {
                Some(c.body.view)
            }
            Message::ViewChange(ViewChangeMessage::ViewChange(v)) if v.body.replica == me => {
                Some(v.body.new_view)
            }
            Message::ViewChange(ViewChangeMessage::NewView(v)) if v.body.primary == me => {
                Some(v.body.view)
            }
            _ => None,
        };
        if let Some(v) = view {
            let node = &mut self.replicas[r];
            node.max_view_spoken = node.max_view_spoken.max(v);
        }
    }

    /// Runs one event at replica `r`.
    fn step_replica(&mut self, r: usize, event: Event) -> Result<(), Failure> {
        let ReplicaState::Up(replica) = &mut self.replicas[r].state else {
            return Ok(());
        };
        let mut actions = Vec::new();
        replica.step(event, &mut actions);
        let view = replica.view();
        if self.replicas[r].crash_pending {
            self.replicas[r].crash_pending = false;
            return self.crash(r, Some(actions));
        }
        if self.replicas[r].byzantine.is_some() {
            return self.perform_byzantine(r, actions);
        }
        if view < self.replicas[r].last_view {
            return Err(self.fail(format!(
                "replica {r}: view went back from {:?} to {view:?}",
                self.replicas[r].last_view
            )));
        }
        self.replicas[r].last_view = view;
        self.perform(r, actions)
    }

    fn crash(&mut self, r: usize, cut_actions: Option<Vec<Action>>) -> Result<(), Failure> {
        if let Some(actions) = cut_actions {
            // The step was interrupted: only a prefix of its actions happened.
            let mut keep = self.rng.below(actions.len() as u64 + 1) as usize;
            // A snapshot and the records that follow it are one atomic rewrite of the log
            // (see `WalRecord::Snapshot`): a cut inside the group undoes all of it.
            if matches!(actions.get(keep), Some(Action::Persist(_))) {
                let group_start = actions[..keep].iter().rposition(
                    |a| !matches!(a, Action::Persist(r) if !matches!(r, WalRecord::Snapshot(_))),
                );
                if let Some(i) = group_start {
                    if matches!(actions[i], Action::Persist(WalRecord::Snapshot(_))) {
                        keep = i;
                    }
                }
            }
            // What the replica executed in memory before dying still counts for agreement.
            for action in &actions[keep..] {
                if let Action::Notify(n) = action {
                    self.checker
                        .observe(r as u32, n)
                        .map_err(|e| self.fail(e))?;
                }
            }
            let prefix: Vec<Action> = actions.into_iter().take(keep).collect();
            self.perform(r, prefix)?;
        }
        let state = std::mem::replace(&mut self.replicas[r].state, ReplicaState::Gone);
        self.replicas[r].state = match state {
            ReplicaState::Up(replica) => {
                let mut service = replica.into_service();
                service.reopen();
                ReplicaState::Down(Box::new(service))
            }
            other => other,
        };
        Ok(())
    }

    fn restart(&mut self, r: usize) -> Result<(), Failure> {
        let state = std::mem::replace(&mut self.replicas[r].state, ReplicaState::Gone);
        let ReplicaState::Down(service) = state else {
            self.replicas[r].state = state;
            return Ok(());
        };
        let wal = self.replicas[r].wal.clone();
        let replica = Replica::restore(self.config.clone(), &self.keys.replicas[r], *service, wal)
            .map_err(|e| self.fail(format!("replica {r} cannot restart: {e}")))?;
        if replica.view() < self.replicas[r].max_view_spoken {
            return Err(self.fail(format!(
                "replica {r} restarted in view {:?} below {:?} it had spoken in",
                replica.view(),
                self.replicas[r].max_view_spoken
            )));
        }
        let node = &mut self.replicas[r];
        node.last_view = replica.view();
        node.restarts += 1;
        node.state = ReplicaState::Up(Box::new(replica));
        Ok(())
    }

    fn deliver(&mut self, to: Principal, body: Vec<u8>) -> Result<(), Failure> {
        match to {
            Principal::Replica(r) => {
                let r = r.0 as usize;
                if !matches!(self.replicas[r].state, ReplicaState::Up(_)) {
                    return Ok(());
                }
                let Ok(message) = self.replicas[r].auth.open(&body) else {
                    return Ok(());
                };
                if self.replicas[r].byzantine.is_none() {
                    self.stripped_commits += message.stripped_commits().len() as u64;
                }
                self.step_replica(r, Event::Message(message))
            }
            Principal::Client(c) => {
                let index = (c.0 - 100) as usize;
                let Some(node) = self.clients.get_mut(index) else {
                    return Ok(());
                };
                let Ok(message) = node.auth.open(&body) else {
                    return Ok(());
                };
                let mut actions = Vec::new();
                let mut completed = Vec::new();
                node.client
                    .on_message(message, &mut actions, &mut completed);
                self.client_actions(index, actions);
                for c in completed {
                    self.complete(index, c)?;
                }
                Ok(())
            }
        }
    }

    fn client_actions(&mut self, index: usize, actions: Vec<ClientAction>) {
        let from = Principal::Client(self.clients[index].client.id());
        for action in actions {
            let (to, message) = match action {
                ClientAction::Send { to, message } => (vec![Principal::Replica(to)], message),
                ClientAction::Broadcast { message } => (
                    (0..4).map(|r| Principal::Replica(ReplicaId(r))).collect(),
                    message,
                ),
            };
            let frame = match self.clients[index].auth.seal(&message, &to) {
                Ok(f) => f,
                Err(e) => panic!("seal: {e}"),
            };
            for receiver in to {
                self.transmit(from, receiver, frame.clone());
            }
        }
    }

    fn complete(&mut self, index: usize, c: Completion) -> Result<(), Failure> {
        let node = &mut self.clients[index];
        let Some(h) = node.in_flight.remove(&c.id) else {
            return Err(self.fail(format!(
                "client {index} completed unknown request {:?}",
                c.id
            )));
        };
        self.checker
            .complete(h, self.tick, c.result, c.read_only)
            .map_err(|e| self.fail(e))
    }

    fn client_tick(&mut self, index: usize) {
        let tick = self.tick;
        let mut actions = Vec::new();
        let node = &mut self.clients[index];
        node.client.on_tick(&mut actions);
        if node.next < node.plan.len()
            && tick >= node.next_invoke_tick
            && (node.in_flight.len() as u64) < self.scenario.client_parallelism
            && node.client.can_invoke()
        {
            let planned = &node.plan[node.next];
            match node
                .client
                .invoke(planned.op.encode(), planned.read_only, &mut actions)
            {
                Ok(id) => {
                    let h = self.checker.invoke(HistoryEntry {
                        client: node.client.id(),
                        id,
                        op: planned.op.clone(),
                        invoked: tick,
                        completed: None,
                        result: None,
                        read_only_path: false,
                    });
                    node.in_flight.insert(id, h);
                    node.next += 1;
                    node.next_invoke_tick = tick + self.rng.below(30);
                }
                Err(e) => panic!("client {index}: {e}"),
            }
        }
        self.client_actions(index, actions);
    }

    fn all_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.next == c.plan.len() && c.in_flight.is_empty())
            && self.checker.completions_awaiting_commit() == 0
    }

    /// Runs the scenario to the end and checks everything.
    pub fn run(&mut self) -> Result<Report, Failure> {
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
                for r in 0..4 {
                    self.restart(r)?;
                }
            }

            // Deliveries due now.
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.tick {
                    break;
                }
                let (to, body) = entry.remove();
                self.deliver(to, body)?;
            }

            // Ticks.
            for r in 0..4 {
                self.step_replica(
                    r,
                    Event::Tick {
                        now_ns: self.tick * 1_000_000,
                    },
                )?;
                if self.replicas[r].byzantine.is_some() {
                    self.byzantine_extra(r);
                }
            }
            for c in 0..self.clients.len() {
                self.client_tick(c);
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
                .filter(|(_, c)| c.next < c.plan.len() || !c.in_flight.is_empty())
                .map(|(i, c)| {
                    format!(
                        "client {i}: {} of {} invoked, {} in flight",
                        c.next,
                        c.plan.len(),
                        c.in_flight.len()
                    )
                })
                .collect();
            let states: Vec<String> = self
                .replicas
                .iter()
                .enumerate()
                .map(|(i, n)| match &n.state {
                    ReplicaState::Up(r) => format!("r{i}: {}", r.debug_summary()),
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

    fn report(&self) -> Result<Report, Failure> {
        let mut report = Report {
            ticks: self.tick,
            ..Default::default()
        };
        for (i, node) in self.replicas.iter().enumerate() {
            report.rejected_frames += node.auth.counters.rejected();
            if node.byzantine.is_some() {
                continue;
            }
            if let ReplicaState::Up(r) = &node.state {
                let m = r.metrics();
                report.view_changes = report.view_changes.max(m.view_changes_started);
                report.state_transfers += m.state_transfers;
                report.fetched_batches += m.fetched_batches;
                report.fetched_bodies += m.fetched_bodies;
                report.highest_executed = report.highest_executed.max(r.last_executed().0);
                report.speculated_batches += m.speculated_batches;
                report.rollbacks += m.rollbacks;
                report.poms_received += m.poms;
                report.max_view = report.max_view.max(r.view().0);
                let _ = i;
            }
        }
        for c in &self.clients {
            report.rejected_frames += c.auth.counters.rejected();
            report.fast_completions += c.client.fast_completions;
            report.read_only_fallbacks += c.client.read_only_fallbacks;
            report.poms_sent += c.client.poms_sent;
        }
        report.completed = self.checker.completed();
        report.read_only_completed = self.checker.read_only_completed();
        report.misbehaviour_noticed = self.misbehaviour_noticed;
        report.stripped_commits = self.stripped_commits;
        Ok(report)
    }

    // -----------------------------------------------------------------------------------------
    // The Byzantine replica

    fn pick(&mut self, behaviour: Behaviour) -> Behaviour {
        if behaviour == Behaviour::Mixed {
            BEHAVIOURS[self.rng.below(BEHAVIOURS.len() as u64 - 1) as usize]
        } else {
            behaviour
        }
    }

    fn byzantine_send(
        &mut self,
        r: usize,
        to: Vec<Principal>,
        message: &Message,
        behaviour: Behaviour,
    ) {
        let from = Principal::Replica(ReplicaId(r as u32));
        let Ok(frame) = self.replicas[r].auth.seal(message, &to) else {
            return;
        };
        for receiver in to {
            let mut frame = frame.clone();
            if behaviour == Behaviour::CorruptAuth && self.rng.chance(500) {
                let i = FRAME_HEADER_BYTES
                    + self.rng.below((frame.len() - FRAME_HEADER_BYTES) as u64) as usize;
                frame[i] ^= 1 << self.rng.below(8);
            }
            if self.replay_pool.len() < 512 {
                self.replay_pool.push((receiver, frame.clone()));
            } else {
                let i = self.rng.below(512) as usize;
                self.replay_pool[i] = (receiver, frame.clone());
            }
            self.transmit(from, receiver, frame);
        }
    }

    fn perform_byzantine(&mut self, r: usize, actions: Vec<Action>) -> Result<(), Failure> {
        let Some(base) = self.replicas[r].byzantine else {
            return Ok(());
        };
        let me = ReplicaId(r as u32);
        for action in actions {
            let behaviour = self.pick(base);
            let (to, message) = match action {
                Action::Persist(record) => {
                    if matches!(record, WalRecord::Snapshot(_)) {
                        self.replicas[r].wal.clear();
                    }
                    self.replicas[r].wal.push(record);
                    continue;
                }
                Action::Send { to, message } => (vec![Principal::Replica(to)], message),
                Action::Broadcast { message } => (self.other_replicas(r), message),
                Action::SendClient { to, message } => (vec![Principal::Client(to)], message),
                Action::Notify(_) | Action::Halt { .. } => continue,
            };
            if behaviour == Behaviour::Silent {
                continue;
            }
            let Some(signer) = self.byzantine_signer.clone() else {
                continue;
            };
            match (&message, behaviour) {
                (Message::ViewChange(ViewChangeMessage::NewView(nv)), Behaviour::LyingNewView) => {
                    let mut body = nv.body.clone();
                    match body.pre_prepares.last_mut() {
                        Some(last) => {
                            let mut pp = last.body.clone();
                            pp.batch_digest.0[0] ^= 0x33;
                            *last = signer.sign(pp);
                        }
                        None => {
                            let seq = body
                                .view_changes
                                .iter()
                                .map(|v| v.body.stable.seq)
                                .max()
                                .unwrap_or_default()
                                .next();
                            body.pre_prepares.push(signer.sign(PrePrepare {
                                view: body.view,
                                seq,
                                batch_digest: Batch::default().digest(),
                                nondet: Vec::new(),
                                primary: me,
                                history: Default::default(),
                            }));
                        }
                    }
                    let m = Message::ViewChange(ViewChangeMessage::NewView(signer.sign(body)));
                    self.byzantine_send(r, to, &m, behaviour);
                }
                (Message::Agreement(AgreementMessage::PrePrepare(p)), Behaviour::Equivocate)
                    if to.len() > 1 =>
                {
                    // A different, validly signed batch for every other backup, each chained onto
                    // what that backup was sent before, so that it runs speculatively.
                    let b = &p.pre_prepare.body;
                    let own_previous = match &self.replicas[r].state {
                        ReplicaState::Up(core) => core.proposed_history(SeqNo(b.seq.0 - 1)),
                        _ => None,
                    };
                    for (k, receiver) in to.iter().enumerate() {
                        let Principal::Replica(rid) = receiver else {
                            continue;
                        };
                        let previous = self
                            .forks
                            .get(&(rid.0, b.view.0, b.seq.0 - 1))
                            .copied()
                            .or(own_previous)
                            .unwrap_or_default();
                        let mut proposal = p.clone();
                        if k > 0 {
                            proposal = self.alternative_proposal(&signer, p, k as u64, &previous);
                        }
                        if self.forks.len() > 4096 {
                            self.forks.clear();
                        }
                        self.forks.insert(
                            (rid.0, b.view.0, b.seq.0),
                            proposal.pre_prepare.body.history,
                        );
                        let m = Message::Agreement(AgreementMessage::PrePrepare(proposal));
                        self.byzantine_send(r, vec![*receiver], &m, behaviour);
                    }
                }
                (Message::Agreement(AgreementMessage::Prepare(p)), Behaviour::ForgeSignatures) => {
                    // Claim to be another replica (signature by our key: refused), or vote for
                    // a digest nobody proposed.
                    let mut body = p.body.clone();
                    if self.rng.chance(500) {
                        body.replica = ReplicaId((me.0 + 1) % 4);
                    } else {
                        body.batch_digest.0[0] ^= 0xff;
                    }
                    let m =
                        Message::Agreement(AgreementMessage::Prepare(signer.sign::<Prepare>(body)));
                    self.byzantine_send(r, to, &m, behaviour);
                }
                (Message::Agreement(AgreementMessage::Commit(c)), Behaviour::ForgeSignatures) => {
                    // Claim to be another replica (refused), or send our own commit with a
                    // broken signature under a valid MAC: receivers count it without checking
                    // the signature, so it ends up in their commit certificates, and a
                    // replica catching up from one must drop it and still find 2f+1 valid.
                    let commit = if self.rng.chance(500) {
                        let mut body = c.body.clone();
                        body.replica = ReplicaId((me.0 + 2) % 4);
                        signer.sign::<Commit>(body)
                    } else {
                        let mut forged = c.clone();
                        forged.signature = crate::wire::Signature::from_bytes(&{
                            let mut bytes = forged.signature.to_bytes();
                            bytes[self.rng.below(64) as usize] ^= 1 << self.rng.below(8);
                            bytes
                        });
                        forged
                    };
                    let m = Message::Agreement(AgreementMessage::Commit(commit));
                    self.byzantine_send(r, to, &m, behaviour);
                }
                (Message::Client(ClientMessage::Reply(reply)), Behaviour::WrongReplies) => {
                    let mut reply = reply.clone();
                    reply.result = b"wrong".to_vec();
                    let m = Message::Client(ClientMessage::Reply(reply));
                    self.byzantine_send(r, to, &m, behaviour);
                }
                (Message::Client(ClientMessage::SpecResponse(spec)), Behaviour::WrongReplies) => {
                    let mut spec = spec.clone();
                    if spec.order.body.primary == me && self.rng.chance(500) {
                        let mut order = spec.order.body.clone();
                        order.history.0[0] ^= 0x77;
                        spec.order = signer.sign(order);
                    } else {
                        spec.reply.result = b"wrong".to_vec();
                    }
                    let m = Message::Client(ClientMessage::SpecResponse(spec));
                    self.byzantine_send(r, to, &m, behaviour);
                }
                (Message::Agreement(AgreementMessage::PrePrepare(p)), Behaviour::ForkHistory)
                    if to.len() > 1 =>
                {
                    for (k, receiver) in to.iter().enumerate() {
                        let mut body = p.pre_prepare.body.clone();
                        body.history.0[1] ^= k as u8;
                        let proposal = Proposal {
                            pre_prepare: signer.sign(body),
                            batch: p.batch.clone(),
                        };
                        let m = Message::Agreement(AgreementMessage::PrePrepare(proposal));
                        self.byzantine_send(r, vec![*receiver], &m, behaviour);
                    }
                }
                (
                    Message::Agreement(AgreementMessage::Checkpoint(c)),
                    Behaviour::WrongCheckpoints,
                ) => {
                    let mut body = c.body.clone();
                    body.service_root.0[1] ^= 0x5a;
                    let m = Message::Agreement(AgreementMessage::Checkpoint(
                        signer.sign::<Checkpoint>(body),
                    ));
                    self.byzantine_send(r, to, &m, behaviour);
                }
                (
                    Message::StateTransfer(StateTransferMessage::Piece {
                        seq,
                        index,
                        piece,
                        bytes,
                    }),
                    Behaviour::WrongCheckpoints,
                ) => {
                    let mut bytes = bytes.clone();
                    bytes.push(0);
                    let m = Message::StateTransfer(StateTransferMessage::Piece {
                        seq: *seq,
                        index: *index,
                        piece: *piece,
                        bytes,
                    });
                    self.byzantine_send(r, to, &m, behaviour);
                }
                _ => self.byzantine_send(r, to, &message, behaviour),
            }
        }
        Ok(())
    }

    /// A validly signed proposal for the same view and sequence number with a different batch
    /// (variant `k` differs from variants of other `k`).
    fn alternative_proposal(
        &mut self,
        signer: &Signer,
        p: &Proposal,
        k: u64,
        previous: &crate::wire::Digest,
    ) -> Proposal {
        let mut batch: Batch = p.batch.clone();
        let mut nondet = p.pre_prepare.body.nondet.clone();
        if k % 2 == 0 && nondet.len() == 8 && self.rng.chance(500) {
            // The same batch at another agreed time: it must not commit at both.
            nondet[0] = nondet[0].wrapping_add(1);
        } else if k % 2 == 1 {
            batch.requests.pop();
        } else if let Some(first) = batch.requests.first().cloned() {
            // The same request twice: executing it must still happen once.
            batch.requests.push(first);
        }
        let b = &p.pre_prepare.body;
        let digest = batch.ordered_digest(&nondet);
        let history = crate::wire::chain_history(previous, b.seq, &digest, &nondet);
        let body = PrePrepare {
            batch_digest: digest,
            history,
            nondet,
            ..b.clone()
        };
        Proposal {
            pre_prepare: signer.sign(body),
            batch,
        }
    }

    /// Unsolicited traffic from the Byzantine replica each tick.
    fn byzantine_extra(&mut self, r: usize) {
        let Some(base) = self.replicas[r].byzantine else {
            return;
        };
        let behaviour = self.pick(base);
        let from = Principal::Replica(ReplicaId(r as u32));
        match behaviour {
            Behaviour::Replay if !self.replay_pool.is_empty() && self.rng.chance(300) => {
                let i = self.rng.below(self.replay_pool.len() as u64) as usize;
                let (to, frame) = self.replay_pool[i].clone();
                self.transmit(from, to, frame);
            }
            Behaviour::Flood if self.rng.chance(500) => {
                let victim =
                    Principal::Replica(ReplicaId(((r as u64 + 1 + self.rng.below(3)) % 4) as u32));
                match self.rng.below(5) {
                    0 => {
                        // Garbage bytes.
                        let mut junk = vec![0u8; self.rng.range(1, 300) as usize];
                        self.rng.fill(&mut junk);
                        let mut frame = (junk.len() as u32).to_be_bytes().to_vec();
                        frame.extend_from_slice(&junk);
                        self.transmit(from, victim, frame);
                    }
                    1 => {
                        // A frame claiming to be larger than the limit: its header alone is
                        // refused (the body is never read).
                        let mut frame = ((FRAME_BYTES_MAX as u32) + 1).to_be_bytes().to_vec();
                        frame.extend_from_slice(&[0u8; 16]);
                        if crate::wire::frame_length([frame[0], frame[1], frame[2], frame[3]])
                            .is_ok()
                        {
                            panic!("oversized frame accepted");
                        }
                        self.replicas[r]
                            .auth
                            .counters
                            .oversized
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    2 => {
                        let m = Message::Agreement(AgreementMessage::FetchCommitted {
                            from: SeqNo(0),
                            to: SeqNo(u64::MAX),
                        });
                        if let Ok(frame) = self.replicas[r].auth.seal(&m, &[victim]) {
                            self.transmit(from, victim, frame);
                        }
                    }
                    3 => {
                        let m = Message::StateTransfer(StateTransferMessage::GetNode {
                            seq: SeqNo(0),
                            level: 0,
                            index: 0,
                        });
                        if let Ok(frame) = self.replicas[r].auth.seal(&m, &[victim]) {
                            self.transmit(from, victim, frame);
                        }
                    }
                    _ => {
                        // A view change for a far view: alone (not f+1) it must not move anyone.
                        let m = Message::ViewChange(ViewChangeMessage::QueryNewView {
                            view: View(u64::MAX),
                        });
                        if let Ok(frame) = self.replicas[r].auth.seal(&m, &[victim]) {
                            self.transmit(from, victim, frame);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// For tests: the replicas' metrics.
    pub fn replica(&self, r: usize) -> Option<&Replica<KvService>> {
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
        self.deliver(Principal::Replica(ReplicaId(replica)), body)
    }

    /// The frame counters of a replica's authenticator.
    pub fn counters(&self, replica: u32) -> &crate::wire::WireCounters {
        &self.replicas[replica as usize].auth.counters
    }

    /// The cluster's keys (to craft frames in tests).
    pub fn keys(&self) -> &ClusterKeys {
        &self.keys
    }

    pub fn client_retransmissions(&self) -> u64 {
        self.clients.iter().map(|c| c.client.retransmissions).sum()
    }
}
