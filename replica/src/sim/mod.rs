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

pub mod checkers;
pub mod fs_workload;
pub mod scenarios;
pub mod service;
#[cfg(test)]
mod tests;

use crate::client::{Client, ClientAction, Completion, RequestId};
use crate::config::{generate, ClusterConfig, ClusterKeys, ProtocolConfig};
use crate::core::{Action, Event, Notification, Replica, WalRecord};
use crate::driver::wal::RECORD_BYTES_MAX;
use crate::wire::{
    AgreementMessage, Authenticator, Batch, Checkpoint, CheckpointCertificate, ClientMessage,
    Commit, Evidence, Message, NewView, PrePrepare, Prepare, Principal, Proposal, ReplicaId, SeqNo,
    Signed, Signer, StateTransferMessage, View, ViewChange, ViewChangeMessage, FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
};
use checkers::{Checker, HistoryEntry, Operation};
use fs_workload::{FsClient, FsStep};
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

/// Deployment limits (the default [`ProtocolConfig`]: 4 MiB batches and operations, a log
/// window of 256 batches, a checkpoint every 64) with the simulator's timers, for scenarios
/// whose messages must be as large as real ones.
pub fn deployed_protocol() -> ProtocolConfig {
    let timers = sim_protocol();
    ProtocolConfig {
        view_change_timeout_ticks: timers.view_change_timeout_ticks,
        view_change_timeout_ticks_max: timers.view_change_timeout_ticks_max,
        retransmit_ticks: timers.retransmit_ticks,
        catch_up_ticks: timers.catch_up_ticks,
        client_retransmit_ticks: timers.client_retransmit_ticks,
        client_retransmit_ticks_max: timers.client_retransmit_ticks_max,
        tick_ns: timers.tick_ns,
        fast_path: true,
        ..ProtocolConfig::default()
    }
}

impl Scenario {
    /// A quiet run: no faults.
    pub fn calm(seed: u64) -> Self {
        Scenario {
            name: "calm",
            seed,
            f: 1,
            clients: 3,
            ops_per_client: 8,
            client_parallelism: 2,
            read_only_per_mille: 150,
            keys: 3,
            value_bytes: None,
            large_results: false,
            loss_per_mille: 0,
            duplicate_per_mille: 0,
            delay_max_ticks: 3,
            byzantine: Vec::new(),
            crashes: Vec::new(),
            triggered_crashes: Vec::new(),
            partitions: Vec::new(),
            faulty_clients: Vec::new(),
            fault_end_tick: 0,
            max_ticks: 6000,
            drain_ticks: 0,
            views_after_faults_max: None,
            protocol: sim_protocol(),
            service: ServiceKind::Kv,
        }
    }

    pub fn n(&self) -> u32 {
        3 * self.f + 1
    }

    pub fn is_byzantine(&self, replica: u32) -> bool {
        self.byzantine.iter().any(|(b, _)| *b == replica)
    }

    /// Faults chosen by the seed; one seed in four runs seven replicas (f = 2).
    pub fn random(seed: u64) -> Self {
        // A stream of its own, so that the choice of f does not shift the other draws.
        let f = if Rng::new(seed ^ 0xF_C0DE).below(4) == 0 {
            2
        } else {
            1
        };
        Scenario {
            name: "random",
            ..Scenario::random_with_f(seed, f)
        }
    }

    /// Faults chosen by the seed, with n = 3f+1 replicas: up to f Byzantine ones, crashes of
    /// up to f correct ones at a time (and sometimes f+1: no progress then, but safety must
    /// hold and all must come back from their durable state), partitions.
    pub fn random_with_f(seed: u64, f: u32) -> Self {
        let mut rng = Rng::new(seed ^ 0x5EED_5CE7_A710);
        let mut s = Scenario::calm(seed);
        s.name = if f == 1 { "random_f1" } else { "random_f2" };
        s.f = f;
        let n = s.n() as u64;
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
        if rng.chance(600) {
            // The primary of view 0 is replica 0 (and of view 1 replica 1): make them the
            // Byzantine ones often.
            let mut count = 1;
            if f >= 2 && rng.chance(500) {
                count = f;
            }
            for k in 0..count {
                let mut who = if rng.chance(500) {
                    k
                } else {
                    rng.below(n) as u32
                };
                while s.is_byzantine(who) {
                    who = (who + 1) % n as u32;
                }
                let behaviour = BEHAVIOURS[rng.below(BEHAVIOURS.len() as u64) as usize];
                s.byzantine.push((who, behaviour));
            }
        }
        let correct = |s: &Scenario, mut replica: u32| {
            while s.is_byzantine(replica) {
                replica = (replica + 1) % n as u32;
            }
            replica
        };
        // Crashes of correct replicas, one at a time, with restarts (with f Byzantine ones
        // that is more than f faulty for a while: progress may stop until the restart).
        let crashes = rng.below(3);
        let mut t = rng.range(20, 200);
        for _ in 0..crashes {
            let replica = correct(&s, rng.below(n) as u32);
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
        // Sometimes f+1 correct replicas are down at once: no progress, but safety must hold
        // and all must come back from their durable state.
        if rng.chance(250) {
            let at = rng.range(10, s.fault_end_tick / 2);
            let mut down: Vec<u32> = Vec::new();
            let mut next = rng.below(n) as u32;
            while down.len() < (f + 1) as usize && down.len() + s.byzantine.len() < n as usize {
                next = correct(&s, next);
                if !down.contains(&next) {
                    down.push(next);
                }
                next = (next + 1 + rng.below(n - 1) as u32) % n as u32;
            }
            for (k, replica) in down.into_iter().enumerate() {
                s.crashes.push(CrashPlan {
                    replica,
                    at: at + if k == 0 { 0 } else { rng.below(20) },
                    restart: at + rng.range(20, 300),
                });
            }
        }
        for _ in 0..rng.below(3) {
            let replica = rng.below(n) as u32;
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
        // Drawn last, so that adding them left every other draw as it was.
        if rng.chance(100) {
            s.faulty_clients.push(match rng.below(3) {
                0 => ClientFault::ReuseTimestamp,
                1 => ClientFault::FloodReads,
                _ => ClientFault::SplitStale,
            });
        }
        s
    }

    /// [`Scenario::random`]'s faults over the file service (small files, no large writes),
    /// with one Byzantine replica in three skewing its time ([`Behaviour::SkewedTime`])
    /// instead of what it drew. Faulty clients still send key-value operations, which the
    /// file service answers as malformed: what they test is the protocol, not the service.
    pub fn random_fs(seed: u64) -> Self {
        let mut s = Scenario::random(seed);
        s.name = "random_fs";
        s.service = ServiceKind::Fs(FsWorkload::default());
        // A stream of its own: the faults stay those of `random` for the same seed.
        let mut rng = Rng::new(seed ^ 0xF11E_5EED);
        if let Some(first) = s.byzantine.first_mut() {
            if rng.chance(333) {
                first.1 = Behaviour::SkewedTime;
            }
        }
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
    /// Views that passed after the faults stopped (highest view of a correct replica at the
    /// end minus the highest at the end of the faulty phase).
    pub views_after_faults: u64,
    /// Largest frame sealed and largest WAL record encoded (bytes), to show how close a run
    /// came to [`FRAME_BYTES_MAX`] and [`RECORD_BYTES_MAX`].
    pub frame_bytes_max: u64,
    pub record_bytes_max: u64,
    /// Requests the faulty clients sent.
    pub faulty_client_requests: u64,
    /// Lying view changes sent ([`Behaviour::StaleViewChange`]).
    pub stale_view_changes: u64,
    /// New views split over different quorums ([`Behaviour::SplitNewView`]).
    pub split_new_views: u64,
    /// Times a skewed primary proposed below its own newest agreed time
    /// ([`Behaviour::SkewedTime`]).
    pub backward_proposals: u64,
    /// Ordered requests that correct replicas ran, after catching up by state transfer,
    /// with a proposed time below their newest agreed time: the clamp, carried over by the
    /// transfer, decided their time (file service).
    pub clamped_after_transfer: u64,
    /// Bytes that large writes (parts of at least half a MiB) wrote, as their clients saw
    /// them succeed (file service).
    pub large_write_bytes: u64,
    /// Checkpoints that correct replicas took after a state transfer, beyond the checkpoint
    /// they installed: each was compared with the others' (the divergence check).
    pub checkpoints_after_transfer: u64,
}

/// A checker fired (or the run did not finish).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The [`NAMED_SCENARIOS`] entry that replays the run with `seed`.
    pub scenario: &'static str,
    pub seed: u64,
    pub tick: u64,
    pub what: String,
}

impl Failure {
    /// The command that runs this scenario again, byte for byte.
    pub fn replay_command(&self) -> String {
        format!(
            "SIM_SCENARIO={} SIM_SEED={} cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture",
            self.scenario, self.seed
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scenario {} seed {} failed at tick {}: {}\n  replay: {}",
            self.scenario,
            self.seed,
            self.tick,
            self.what,
            self.replay_command()
        )
    }
}

/// Every scenario a failure can name, by the name it prints; `SIM_SCENARIO` picks one for
/// [`tests`]' `replay` (default `random`). Named scenario tests build their scenario here
/// too, so that the replay is the same run.
pub const NAMED_SCENARIOS: &[(&str, fn(u64) -> Scenario)] = &[
    ("random", Scenario::random),
    ("random_f1", |seed| Scenario::random_with_f(seed, 1)),
    ("random_f2", |seed| Scenario::random_with_f(seed, 2)),
    ("calm", Scenario::calm),
    ("random_fs", Scenario::random_fs),
    ("equivocating_primary", scenarios::equivocating_primary),
    ("silent_primary", scenarios::silent_primary),
    (
        "restarted_replica_catches_up",
        scenarios::restarted_replica_catches_up,
    ),
    ("lossy_network", scenarios::lossy_network),
    ("forged_commits", scenarios::forged_commits),
    ("lying_new_primary", scenarios::lying_new_primary),
    ("ordered_only", scenarios::ordered_only),
    ("commit_path_only", scenarios::commit_path_only),
    ("primary_forks_history", scenarios::primary_forks_history),
    ("primary_wrong_replies", scenarios::primary_wrong_replies),
    ("backup_wrong_replies", scenarios::backup_wrong_replies),
    ("reads_only", scenarios::reads_only),
    ("regression_3786", scenarios::regression_3786),
    (
        "large_ops_primary_crash",
        scenarios::large_ops_primary_crash,
    ),
    (
        "large_ops_primary_crash_f2",
        scenarios::large_ops_primary_crash_f2,
    ),
    (
        "large_log_repeated_restarts",
        scenarios::large_log_repeated_restarts,
    ),
    (
        "large_results_across_a_checkpoint",
        scenarios::large_results_across_a_checkpoint,
    ),
    (
        "all_crash_after_fast_completion",
        scenarios::all_crash_after_fast_completion,
    ),
    ("stale_view_changes", scenarios::stale_view_changes),
    ("stale_view_changes_f2", scenarios::stale_view_changes_f2),
    ("split_new_views", scenarios::split_new_views),
    ("split_new_views_f2", scenarios::split_new_views_f2),
    (
        "faulty_client_split_stale",
        scenarios::faulty_client_split_stale,
    ),
    (
        "faulty_client_reused_timestamps",
        scenarios::faulty_client_reused_timestamps,
    ),
    (
        "faulty_client_read_flood",
        scenarios::faulty_client_read_flood,
    ),
    ("fs_calm", scenarios::fs_calm),
    (
        "fs_large_writes_primary_crash",
        scenarios::fs_large_writes_primary_crash,
    ),
    (
        "fs_large_writes_primary_crash_f2",
        scenarios::fs_large_writes_primary_crash_f2,
    ),
    (
        "fs_time_skew_after_state_transfer",
        scenarios::fs_time_skew_after_state_transfer,
    ),
];

/// The scenario `name` (see [`NAMED_SCENARIOS`]) for `seed`.
pub fn named_scenario(name: &str, seed: u64) -> Option<Scenario> {
    NAMED_SCENARIOS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(name, build)| Scenario {
            name,
            ..build(seed)
        })
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
    pub fn new(scenario: Scenario) -> Self {
        let n = scenario.n();
        let mut rng = Rng::new(scenario.seed);
        let clients: Vec<ClientId> = (0..scenario.clients).map(|i| ClientId(100 + i)).collect();
        let faulty_ids: Vec<ClientId> = (0..scenario.faulty_clients.len() as u64)
            .map(|i| ClientId(100 + scenario.clients + i))
            .collect();
        let all_clients: Vec<ClientId> = clients.iter().chain(&faulty_ids).copied().collect();
        let addresses = (0..n).map(|i| format!("sim:{i}")).collect();
        let mut key_rng = Rng::new(scenario.seed ^ 0x6B65_7973);
        let keys = match generate(
            scenario.f,
            addresses,
            &all_clients,
            scenario.protocol.clone(),
            &mut |b| key_rng.fill(b),
        ) {
            Ok(k) => k,
            Err(e) => panic!("simulator keygen: {e}"),
        };
        let config = Arc::new(keys.config.clone());
        let mut setup_error = None;
        let run_dir = match &scenario.service {
            ServiceKind::Kv => None,
            ServiceKind::Fs(_) => RunDir::new(scenario.name, scenario.seed)
                .map_err(|e| setup_error = Some(e))
                .ok(),
        };
        let mut replicas = Vec::new();
        for secrets in &keys.replicas {
            let byzantine = scenario
                .byzantine
                .iter()
                .find(|(b, _)| *b == secrets.id.0)
                .map(|(_, behaviour)| *behaviour);
            let service = match (&scenario.service, &run_dir) {
                (ServiceKind::Kv, _) => Ok(SimService::kv()),
                (ServiceKind::Fs(_), Some(dir)) => {
                    SimService::fs(&dir.replica(secrets.id.0 as usize))
                }
                (ServiceKind::Fs(_), None) => Err("no data directory for the file service".into()),
            }
            .map(|service| match byzantine {
                Some(Behaviour::SkewedTime) => {
                    service.skewed(scenario.seed ^ (u64::from(secrets.id.0) << 48))
                }
                _ => service,
            });
            let state = match service {
                Ok(service) => match Replica::new(config.clone(), secrets, service) {
                    Ok(r) => ReplicaState::Up(Box::new(r)),
                    Err(e) => panic!("replica: {e}"),
                },
                Err(e) => {
                    setup_error.get_or_insert(e);
                    ReplicaState::Gone
                }
            };
            replicas.push(ReplicaNode {
                state,
                auth: Authenticator::for_replica(&config, secrets),
                wal: Vec::new(),
                persisted: 0,
                byzantine,
                signer: byzantine.map(|_| Signer::from_secret(&secrets.signing_key.0)),
                stable_history: Vec::new(),
                view_changes_held: BTreeMap::new(),
                held_new_view: None,
                max_view_spoken: View(0),
                last_view: View(0),
                restarts: 0,
                crash_pending: false,
                transferred: None,
            });
        }
        let mut client_nodes = Vec::new();
        for (i, secrets) in keys.clients.iter().take(clients.len()).enumerate() {
            let mut plan = Vec::new();
            let mut fs = None;
            if let ServiceKind::Fs(workload) = &scenario.service {
                // A stream per client, apart from the run's: the key-value draws below and
                // every later draw of the run stay what they are without a file workload.
                let mut fs_rng = Rng::new(scenario.seed ^ 0xF5_C11E_0000 ^ ((i as u64) << 40));
                // Reads are about a third of the steps, as gets are of key-value operations.
                let read_only = scenario.read_only_per_mille.saturating_mul(3).min(1000);
                for (step, read_only) in
                    fs_workload::plan(&mut fs_rng, workload, scenario.ops_per_client, read_only)
                {
                    plan.push(PlannedOp {
                        op: Step::Fs(step),
                        read_only,
                    });
                }
                fs = Some(FsClient::new(
                    i,
                    fs_rng,
                    scenario.protocol.operation_bytes_max,
                    workload.large_writes > 0,
                ));
            }
            // Key-value operations, unless the plan is a file workload's.
            let kv_ops = if fs.is_some() {
                0
            } else {
                scenario.ops_per_client
            };
            for k in 0..kv_ops {
                let key = format!("k{}", rng.below(scenario.keys)).into_bytes();
                let (op, read_only) = match scenario.value_bytes {
                    Some((low, high)) => {
                        // Large values: puts, each to a key of its own, so that replies stay
                        // small (a put returns the old value) and the simulation spends its
                        // time on what is large in the protocol: requests, batches, logs.
                        let mut value = vec![0u8; rng.range(low, high) as usize];
                        let tag = format!("c{i}.{k};");
                        value[..tag.len()].copy_from_slice(tag.as_bytes());
                        let key = if scenario.large_results {
                            key
                        } else {
                            [key, tag.into_bytes()].concat()
                        };
                        (KvOp::Put { key, value }, false)
                    }
                    None => {
                        let value = format!("c{i}.{k};").into_bytes();
                        match rng.below(10) {
                            0..=2 => (KvOp::Put { key, value }, false),
                            3..=5 => (KvOp::Append { key, value }, false),
                            6 => (KvOp::Delete { key }, false),
                            _ => (
                                KvOp::Get { key },
                                rng.chance(
                                    scenario.read_only_per_mille.saturating_mul(3).min(1000),
                                ),
                            ),
                        }
                    }
                };
                plan.push(PlannedOp {
                    op: Step::Kv(op),
                    read_only,
                });
            }
            client_nodes.push(ClientNode {
                client: Client::new(config.clone(), secrets, 1),
                auth: Authenticator::for_client(&config, secrets),
                fs,
                plan,
                next: 0,
                in_flight: BTreeMap::new(),
                next_invoke_tick: rng.below(20),
            });
        }
        let faulty_clients = scenario
            .faulty_clients
            .iter()
            .zip(keys.clients.iter().skip(clients.len()))
            .map(|(fault, secrets)| FaultyClientNode {
                fault: *fault,
                id: secrets.id,
                signer: Signer::from_secret(&secrets.signing_key.0),
                auth: Authenticator::for_client(&config, secrets),
                next_timestamp: 1,
                next_tick: 30,
                sent: 0,
            })
            .collect();
        let byzantine = scenario.byzantine.iter().map(|(b, _)| *b).collect();
        let mut checker = Checker::new(byzantine, faulty_ids);
        if let Some(dir) = &run_dir {
            checker = checker.with_fs_reference(dir.path().join("reference"));
        }
        Sim {
            checker,
            fired: vec![false; scenario.triggered_crashes.len()],
            scenario,
            rng,
            keys,
            config,
            tick: 0,
            queue: BTreeMap::new(),
            counter: 0,
            replicas,
            clients: client_nodes,
            faulty_clients,
            replay_pool: Vec::new(),
            misbehaviour_noticed: 0,
            stripped_commits: 0,
            forks: BTreeMap::new(),
            view_at_fault_end: None,
            frame_bytes_max: 0,
            record_bytes_max: 0,
            stale_view_changes: 0,
            split_new_views: 0,
            checkpoints_after_transfer: 0,
            trace: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
            setup_error,
            _run_dir: run_dir,
        }
    }

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
    /// Frames are shared, not copied, between the receivers and copies of one send (they
    /// are megabytes in the large-operation scenarios).
    fn transmit(&mut self, from: Principal, to: Principal, frame: impl Into<Arc<Vec<u8>>>) {
        let body: Arc<Vec<u8>> = frame.into();
        if body.len() < FRAME_HEADER_BYTES {
            return;
        }
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

    fn send_sealed(
        &mut self,
        from_replica: usize,
        to: Vec<Principal>,
        message: &Message,
    ) -> Result<(), Failure> {
        let from = Principal::Replica(ReplicaId(from_replica as u32));
        let sealed = seal_frame(&self.replicas[from_replica].auth, from, &to, message);
        let frame = self.sealed(sealed)?;
        for receiver in to {
            self.transmit(from, receiver, frame.clone());
        }
        Ok(())
    }

    fn sealed(&mut self, sealed: Result<Vec<u8>, String>) -> Result<Arc<Vec<u8>>, Failure> {
        let frame = sealed.map_err(|e| self.fail(e))?;
        self.frame_bytes_max = self.frame_bytes_max.max(frame.len() as u64);
        Ok(Arc::new(frame))
    }

    /// A WAL record the driver could not write (over [`RECORD_BYTES_MAX`], or refused by the
    /// encoder) or could not read back is a checker failure: the replica would stop there, or
    /// fail to restart. Reading back is `wire::decode` (see `driver::node`), which refuses
    /// anything over [`FRAME_BYTES_MAX`], a lower limit than the log's own.
    fn check_record(&mut self, r: usize, record: &WalRecord) -> Result<(), Failure> {
        let len = match encoded_len(record) {
            Ok(len) => len,
            Err(e) => {
                return Err(self.fail(format!(
                    "wal record size: replica {r} cannot encode a {} record: {e}",
                    record_kind(record)
                )))
            }
        };
        self.record_bytes_max = self.record_bytes_max.max(len as u64);
        if len > RECORD_BYTES_MAX {
            return Err(self.fail(format!(
                "wal record size: replica {r} wrote a {} record of {len} bytes, over {RECORD_BYTES_MAX}",
                record_kind(record)
            )));
        }
        if len > FRAME_BYTES_MAX {
            return Err(self.fail(format!(
                "wal record size: replica {r} wrote a {} record of {len} bytes, which a restart cannot decode (over {FRAME_BYTES_MAX})",
                record_kind(record)
            )));
        }
        Ok(())
    }

    fn other_replicas(&self, me: usize) -> Vec<Principal> {
        (0..self.n())
            .filter(|r| *r != me)
            .map(|r| Principal::Replica(ReplicaId(r as u32)))
            .collect()
    }

    /// Performs a correct replica's actions (up to `cut` of them, if it crashes mid-step).
    fn perform(&mut self, r: usize, actions: Vec<Action>) -> Result<(), Failure> {
        for action in actions {
            match action {
                Action::Persist(record) => {
                    self.check_record(r, &record)?;
                    if matches!(record, WalRecord::Snapshot(_)) {
                        self.replicas[r].wal.clear();
                    }
                    self.replicas[r].wal.push(record);
                    self.replicas[r].persisted += 1;
                }
                Action::Send { to, message } => {
                    if self.trace {
                        eprintln!("[{}] r{r} -> r{}: {}", self.tick, to.0, message.kind());
                    }
                    self.note_spoken(r, &message);
                    self.send_sealed(r, vec![Principal::Replica(to)], &message)?;
                }
                Action::Broadcast { message } => {
                    self.note_spoken(r, &message);
                    let to = self.other_replicas(r);
                    self.send_sealed(r, to, &message)?;
                }
                Action::SendClient { to, message } => {
                    if let Message::Client(ClientMessage::Reply(reply)) = &message {
                        self.checker
                            .observe_reply(r as u32, reply)
                            .map_err(|e| self.fail(e))?;
                    }
                    self.send_sealed(r, vec![Principal::Client(to)], &message)?
                }
                Action::Notify(n) => {
                    if self.trace {
                        eprintln!("[{}] r{r}: {n:?}", self.tick);
                    }
                    if let Notification::Misbehaviour { .. } = n {
                        self.misbehaviour_noticed += 1;
                    }
                    match (&n, &self.replicas[r].state) {
                        (Notification::StateTransferred { seq, .. }, ReplicaState::Up(replica)) => {
                            self.replicas[r].transferred =
                                Some((*seq, replica.service().clamped()));
                        }
                        (Notification::CheckpointTaken { seq, .. }, _)
                            if self.replicas[r].transferred.is_some_and(|(t, _)| *seq > t) =>
                        {
                            self.checkpoints_after_transfer += 1;
                        }
                        _ => {}
                    }
                    self.checker
                        .observe(r as u32, &n)
                        .map_err(|e| self.fail(e))?;
                }
                // The replica's execution stage performed these already.
                Action::Stage(_) => {}
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
        if !replica.is_halted() && !replica.reply_caches_agree() {
            return Err(self.fail(format!(
                "replica {r}: the core's copy of the reply cache differs from the stage's"
            )));
        }
        let view = replica.view();
        if self.replicas[r].crash_pending {
            self.replicas[r].crash_pending = false;
            return self.crash(r, Some(actions));
        }
        if self.replicas[r].byzantine.is_some() {
            self.perform_byzantine(r, actions)?;
            return self.tell_persisted(r);
        }
        if view < self.replicas[r].last_view {
            return Err(self.fail(format!(
                "replica {r}: view went back from {:?} to {view:?}",
                self.replicas[r].last_view
            )));
        }
        self.replicas[r].last_view = view;
        self.perform(r, actions)?;
        self.tell_persisted(r)
    }

    /// Tells replica `r` that the records it asked for are durable (the simulator's WAL is
    /// durable as soon as a record is performed).
    fn tell_persisted(&mut self, r: usize) -> Result<(), Failure> {
        let upto = self.replicas[r].persisted;
        let ReplicaState::Up(replica) = &mut self.replicas[r].state else {
            return Ok(());
        };
        let mut actions = Vec::new();
        replica.step(Event::Persisted { upto }, &mut actions);
        if self.replicas[r].byzantine.is_some() {
            return self.perform_byzantine(r, actions);
        }
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
            ReplicaState::Up(replica) => match replica.into_service().after_crash() {
                Ok(service) => ReplicaState::Down(Box::new(service)),
                Err(e) => return Err(self.fail(format!("replica {r} cannot restart: {e}"))),
            },
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
        node.persisted = 0;
        node.state = ReplicaState::Up(Box::new(replica));
        Ok(())
    }

    fn deliver(&mut self, to: Principal, body: &[u8]) -> Result<(), Failure> {
        match to {
            Principal::Replica(r) => {
                let r = r.0 as usize;
                if !matches!(self.replicas[r].state, ReplicaState::Up(_)) {
                    return Ok(());
                }
                let Ok(message) = self.replicas[r].auth.open(body) else {
                    return Ok(());
                };
                if self.replicas[r].byzantine.is_none() {
                    self.stripped_commits += message.stripped_commits().len() as u64;
                } else if let Message::ViewChange(ViewChangeMessage::ViewChange(vc)) =
                    message.message()
                {
                    self.hold_view_change(r, vc.clone());
                }
                self.step_replica(r, Event::Message(message))
            }
            Principal::Client(c) => {
                let index = (c.0 - 100) as usize;
                let Some(node) = self.clients.get_mut(index) else {
                    return Ok(());
                };
                let Ok(message) = node.auth.open(body) else {
                    return Ok(());
                };
                let mut actions = Vec::new();
                let mut completed = Vec::new();
                let fast_before = node.client.fast_completions;
                node.client
                    .on_message(message, &mut actions, &mut completed);
                let fast = node.client.fast_completions > fast_before;
                self.client_actions(index, actions)?;
                for c in completed {
                    self.complete(index, c)?;
                }
                self.fire_triggers(fast)
            }
        }
    }

    fn all_replicas(&self) -> Vec<Principal> {
        (0..self.n())
            .map(|r| Principal::Replica(ReplicaId(r as u32)))
            .collect()
    }

    fn client_actions(&mut self, index: usize, actions: Vec<ClientAction>) -> Result<(), Failure> {
        let from = Principal::Client(self.clients[index].client.id());
        for action in actions {
            let (to, message) = match action {
                ClientAction::Send { to, message } => (vec![Principal::Replica(to)], message),
                ClientAction::Broadcast { message } => (self.all_replicas(), message),
            };
            let sealed = seal_frame(&self.clients[index].auth, from, &to, &message);
            let frame = self.sealed(sealed)?;
            for receiver in to {
                self.transmit(from, receiver, frame.clone());
            }
        }
        Ok(())
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

    /// Fires the triggered crashes whose event just happened (`fast`: a request completed
    /// on the fast path in this delivery).
    fn fire_triggers(&mut self, fast: bool) -> Result<(), Failure> {
        for i in 0..self.scenario.triggered_crashes.len() {
            let t = self.scenario.triggered_crashes[i];
            let due = match t.when {
                Trigger::Completions(k) => self.checker.completed() >= k,
                Trigger::FastCompletion => fast,
            };
            if self.fired[i] || !due || !self.faulty_phase() {
                continue;
            }
            self.fired[i] = true;
            let victims: Vec<usize> = match t.victims {
                Victims::Primary => {
                    vec![self.highest_correct_view().primary(self.n()).0 as usize]
                }
                Victims::All => (0..self.n()).collect(),
            };
            let restart = (self.tick + t.down_ticks).min(self.scenario.fault_end_tick);
            for r in victims {
                if !matches!(self.replicas[r].state, ReplicaState::Up(_)) {
                    continue;
                }
                if self.trace {
                    eprintln!("[{}] r{r} crashes ({:?})", self.tick, t.when);
                }
                // Inside its next step (a tick at the latest), like a scheduled crash.
                self.replicas[r].crash_pending = true;
                self.scenario.crashes.push(CrashPlan {
                    replica: r as u32,
                    at: self.tick,
                    restart,
                });
            }
        }
        Ok(())
    }

    fn complete(&mut self, index: usize, c: Completion) -> Result<(), Failure> {
        let node = &mut self.clients[index];
        let Some(h) = node.in_flight.remove(&c.id) else {
            return Err(self.fail(format!(
                "client {index} completed unknown request {:?}",
                c.id
            )));
        };
        if let (Some(fs), Some(Operation::Fs(request))) = (&mut node.fs, self.checker.operation(h))
        {
            fs.completed(request, &c.result);
        }
        self.checker
            .complete(h, self.tick, c.result, c.read_only)
            .map_err(|e| self.fail(e))
    }

    fn client_tick(&mut self, index: usize) -> Result<(), Failure> {
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
            let op = match (&planned.op, &mut node.fs) {
                (Step::Kv(op), _) => Operation::Kv(op.clone()),
                (Step::Fs(step), Some(fs)) => Operation::Fs(Box::new(fs.request(*step))),
                (Step::Fs(_), None) => {
                    return Err(
                        self.fail(format!("client {index}: a file step without a file client"))
                    )
                }
            };
            match node
                .client
                .invoke(op.encode(), planned.read_only, &mut actions)
            {
                Ok(id) => {
                    let h = self.checker.invoke(HistoryEntry {
                        client: node.client.id(),
                        id,
                        op,
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
        self.client_actions(index, actions)
    }

    fn all_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.next == c.plan.len() && c.in_flight.is_empty())
            && self.checker.completions_awaiting_commit() == 0
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
        report.views_after_faults = self
            .highest_correct_view()
            .0
            .saturating_sub(self.view_at_fault_end.unwrap_or(0));
        report.frame_bytes_max = self.frame_bytes_max;
        report.record_bytes_max = self.record_bytes_max;
        report.faulty_client_requests = self.faulty_clients.iter().map(|c| c.sent).sum();
        report.stale_view_changes = self.stale_view_changes;
        report.split_new_views = self.split_new_views;
        report.checkpoints_after_transfer = self.checkpoints_after_transfer;
        for (i, node) in self.replicas.iter().enumerate() {
            report.rejected_frames += node.auth.counters.rejected();
            if node.byzantine.is_some() {
                if let ReplicaState::Up(r) = &node.state {
                    report.backward_proposals += r.service().backward_proposals();
                }
                continue;
            }
            if let ReplicaState::Up(r) = &node.state {
                if let Some((_, at_transfer)) = node.transferred {
                    report.clamped_after_transfer +=
                        r.service().clamped().saturating_sub(at_transfer);
                }
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
            report.large_write_bytes += c.fs.as_ref().map_or(0, |fs| fs.large_write_bytes);
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

    /// Sends as a Byzantine replica. Its messages come from the real core (at most slightly
    /// altered), so one too large to seal is the core's fault and fails the run too.
    fn byzantine_send(
        &mut self,
        r: usize,
        to: Vec<Principal>,
        message: &Message,
        behaviour: Behaviour,
    ) -> Result<(), Failure> {
        let from = Principal::Replica(ReplicaId(r as u32));
        let sealed = seal_frame(&self.replicas[r].auth, from, &to, message);
        let frame = self.sealed(sealed)?;
        for receiver in to {
            let mut frame = frame.clone();
            if behaviour == Behaviour::CorruptAuth && self.rng.chance(500) {
                let i = FRAME_HEADER_BYTES
                    + self.rng.below((frame.len() - FRAME_HEADER_BYTES) as u64) as usize;
                Arc::make_mut(&mut frame)[i] ^= 1 << self.rng.below(8);
            }
            // Large frames are left out of the pool: replaying them adds nothing and would
            // pin megabytes per entry.
            if frame.len() <= 1 << 20 {
                if self.replay_pool.len() < 512 {
                    self.replay_pool.push((receiver, frame.clone()));
                } else {
                    let i = self.rng.below(512) as usize;
                    self.replay_pool[i] = (receiver, frame.clone());
                }
            }
            self.transmit(from, receiver, frame);
        }
        Ok(())
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
                    self.check_record(r, &record)?;
                    let stable = match &record {
                        WalRecord::Stable(cert) => Some(&**cert),
                        WalRecord::Snapshot(state) => Some(&state.stable),
                        _ => None,
                    };
                    if let Some(cert) = stable {
                        let history = &mut self.replicas[r].stable_history;
                        if history.last().is_none_or(|last| last.seq < cert.seq) {
                            history.push(cert.clone());
                        }
                        if history.len() > 4 {
                            history.remove(0);
                        }
                    }
                    if matches!(record, WalRecord::Snapshot(_)) {
                        self.replicas[r].wal.clear();
                    }
                    self.replicas[r].wal.push(record);
                    self.replicas[r].persisted += 1;
                    continue;
                }
                Action::Send { to, message } => (vec![Principal::Replica(to)], message),
                Action::Broadcast { message } => (self.other_replicas(r), message),
                Action::SendClient { to, message } => (vec![Principal::Client(to)], message),
                Action::Notify(_) | Action::Halt { .. } => continue,
                // The replica's execution stage performed these already.
                Action::Stage(_) => continue,
            };
            if behaviour == Behaviour::Silent {
                continue;
            }
            let Some(signer) = self.replicas[r].signer.clone() else {
                continue;
            };
            if let Message::ViewChange(ViewChangeMessage::ViewChange(vc)) = &message {
                if vc.body.replica == me {
                    self.hold_view_change(r, vc.clone());
                }
            }
            match (&message, behaviour) {
                (
                    Message::ViewChange(ViewChangeMessage::ViewChange(vc)),
                    Behaviour::StaleViewChange,
                ) if vc.body.replica == me => {
                    let body = self.stale_view_change(r, &vc.body);
                    if self.trace {
                        eprintln!(
                            "[{}] r{r} lies in its view change for {:?}: stable {:?} -> {:?}, {} -> {} evidence items",
                            self.tick,
                            vc.body.new_view,
                            vc.body.stable.seq,
                            body.stable.seq,
                            vc.body.evidence.len(),
                            body.evidence.len()
                        );
                    }
                    self.stale_view_changes += u64::from(body != vc.body);
                    let m = Message::ViewChange(ViewChangeMessage::ViewChange(signer.sign(body)));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::ViewChange(ViewChangeMessage::NewView(nv)), Behaviour::SplitNewView)
                    if nv.body.primary == me =>
                {
                    let held = self.view_changes_for(r, nv.body.view).len();
                    if to.len() > 1 && held <= self.config.quorum() && held < self.n() {
                        // Wait for more view changes than a quorum, so that the subsets
                        // differ; the deadline keeps a view with only a quorum alive.
                        let deadline = self.tick + 2 * self.scenario.protocol.retransmit_ticks;
                        self.replicas[r].held_new_view = Some((nv.clone(), to, deadline));
                    } else {
                        self.send_split_new_view(r, nv, to)?;
                    }
                }
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
                    self.byzantine_send(r, to, &m, behaviour)?;
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
                        self.byzantine_send(r, vec![*receiver], &m, behaviour)?;
                    }
                }
                (Message::Agreement(AgreementMessage::Prepare(p)), Behaviour::ForgeSignatures) => {
                    // Claim to be another replica (signature by our key: refused), or vote for
                    // a digest nobody proposed.
                    let mut body = p.body.clone();
                    if self.rng.chance(500) {
                        body.replica = ReplicaId((me.0 + 1) % self.n() as u32);
                    } else {
                        body.batch_digest.0[0] ^= 0xff;
                    }
                    let m =
                        Message::Agreement(AgreementMessage::Prepare(signer.sign::<Prepare>(body)));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::Agreement(AgreementMessage::Commit(c)), Behaviour::ForgeSignatures) => {
                    // Claim to be another replica (refused), or send our own commit with a
                    // broken signature under a valid MAC: receivers count it without checking
                    // the signature, so it ends up in their commit certificates, and a
                    // replica catching up from one must drop it and still find 2f+1 valid.
                    let commit = if self.rng.chance(500) {
                        let mut body = c.body.clone();
                        body.replica = ReplicaId((me.0 + 2) % self.n() as u32);
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
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::Client(ClientMessage::Reply(reply)), Behaviour::WrongReplies) => {
                    let mut reply = reply.clone();
                    reply.result = b"wrong".to_vec();
                    let m = Message::Client(ClientMessage::Reply(reply));
                    self.byzantine_send(r, to, &m, behaviour)?;
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
                    self.byzantine_send(r, to, &m, behaviour)?;
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
                        self.byzantine_send(r, vec![*receiver], &m, behaviour)?;
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
                    self.byzantine_send(r, to, &m, behaviour)?;
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
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                _ => self.byzantine_send(r, to, &message, behaviour)?,
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
    fn byzantine_extra(&mut self, r: usize) -> Result<(), Failure> {
        let Some(base) = self.replicas[r].byzantine else {
            return Ok(());
        };
        if let Some((nv, _, deadline)) = &self.replicas[r].held_new_view {
            let held = self.view_changes_for(r, nv.body.view).len();
            if self.tick >= *deadline || held > self.config.quorum() {
                if let Some((nv, to, _)) = self.replicas[r].held_new_view.take() {
                    self.send_split_new_view(r, &nv, to)?;
                }
            }
        }
        let n = self.n() as u64;
        let behaviour = self.pick(base);
        let from = Principal::Replica(ReplicaId(r as u32));
        match behaviour {
            Behaviour::Replay if !self.replay_pool.is_empty() && self.rng.chance(300) => {
                let i = self.rng.below(self.replay_pool.len() as u64) as usize;
                let (to, frame) = self.replay_pool[i].clone();
                self.transmit(from, to, frame);
            }
            Behaviour::Flood if self.rng.chance(500) => {
                let victim = Principal::Replica(ReplicaId(
                    ((r as u64 + 1 + self.rng.below(n - 1)) % n) as u32,
                ));
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
        Ok(())
    }

    /// Remembers a view change a Byzantine replica holds (a few views' worth).
    fn hold_view_change(&mut self, r: usize, vc: Signed<ViewChange>) {
        let held = &mut self.replicas[r].view_changes_held;
        held.entry(vc.body.new_view)
            .or_default()
            .insert(vc.body.replica, vc);
        while held.len() > 4 {
            held.pop_first();
        }
    }

    fn view_changes_for(&self, r: usize, view: View) -> Vec<Signed<ViewChange>> {
        self.replicas[r]
            .view_changes_held
            .get(&view)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A lying but well-formed view change (see [`Behaviour::StaleViewChange`]): one lie per
    /// message, chosen at random.
    fn stale_view_change(&mut self, r: usize, honest: &ViewChange) -> ViewChange {
        let mut body = honest.clone();
        let older = self.replicas[r]
            .stable_history
            .iter()
            .find(|c| c.seq < honest.stable.seq)
            .cloned();
        match self.rng.below(3) {
            0 if older.is_some() => {
                // An older stable checkpoint: evidence must then lie within the window
                // above it, so what is beyond is withheld too.
                if let Some(old) = older {
                    let high = old.seq.0 + self.scenario.protocol.log_window;
                    body.evidence.retain(|e| e.seq().0 <= high);
                    body.stable = old;
                }
            }
            1 => {
                // Every certificate withheld: strong evidence goes, a lone certificate
                // becomes the bare pre-prepare it certifies (still "accepted").
                let mut evidence: Vec<Evidence> = Vec::new();
                for e in &honest.evidence {
                    match e {
                        Evidence::Prepared(cert) => {
                            let followed = honest
                                .evidence
                                .iter()
                                .any(|x| x.seq() == e.seq() && !x.is_strong());
                            if !followed {
                                evidence.push(Evidence::Accepted(cert.pre_prepare.clone()));
                            }
                        }
                        Evidence::Accepted(_) => evidence.push(e.clone()),
                    }
                }
                body.evidence = evidence;
            }
            _ => body.evidence.clear(),
        }
        body
    }

    /// Sends each receiver a new view for `nv`'s view built from its own 2f+1 subset of the
    /// view changes this (Byzantine) primary holds, re-signed, each valid on its own.
    fn send_split_new_view(
        &mut self,
        r: usize,
        nv: &Signed<NewView>,
        to: Vec<Principal>,
    ) -> Result<(), Failure> {
        let Some(signer) = self.replicas[r].signer.clone() else {
            return Ok(());
        };
        let view = nv.body.view;
        let held = self.view_changes_for(r, view);
        let quorum = self.config.quorum();
        if held.len() <= quorum {
            return self.byzantine_send(
                r,
                to,
                &Message::ViewChange(ViewChangeMessage::NewView(nv.clone())),
                Behaviour::SplitNewView,
            );
        }
        self.split_new_views += 1;
        for (k, receiver) in to.into_iter().enumerate() {
            // Receiver k gets the quorum starting at offset k (wrapping): neighbours differ.
            let subset: Vec<Signed<ViewChange>> = (0..quorum)
                .map(|i| held[(k + i) % held.len()].clone())
                .collect();
            let plan = crate::core::view_change::plan_new_view(&self.config, &subset);
            let me = ReplicaId(r as u32);
            let pre_prepares = crate::core::fast_path::reissue(view, me, &plan)
                .into_iter()
                .map(|pp| signer.sign(pp))
                .collect();
            let split = signer.sign(NewView {
                view,
                primary: me,
                view_changes: subset,
                pre_prepares,
            });
            let m = Message::ViewChange(ViewChangeMessage::NewView(split));
            self.byzantine_send(r, vec![receiver], &m, Behaviour::SplitNewView)?;
        }
        Ok(())
    }

    /// One tick of faulty client `c` (faulty phase only; see [`ClientFault`]).
    fn faulty_client_tick(&mut self, c: usize) -> Result<(), Failure> {
        if self.tick < self.faulty_clients[c].next_tick {
            return Ok(());
        }
        let n = self.n();
        let primary = self.highest_correct_view().primary(n);
        let backups: Vec<Principal> = (0..n as u32)
            .map(ReplicaId)
            .filter(|r| *r != primary)
            .map(Principal::Replica)
            .collect();
        let everyone = self.all_replicas();
        let window = self.scenario.protocol.client_window;
        let node = &self.faulty_clients[c];
        let own_key = format!("faulty{}", node.id.0).into_bytes();
        let put = |value: String| KvOp::Put {
            key: own_key.clone(),
            value: value.into_bytes(),
        };
        let t = node.next_timestamp;
        // (receivers, timestamp, operation, read-only)
        let mut sends: Vec<(Vec<Principal>, u64, KvOp, bool)> = Vec::new();
        let (advance, pause) = match node.fault {
            ClientFault::SplitStale => {
                sends.push((backups, t, put(format!("stale {t}")), false));
                for later in t + 1..=t + window {
                    sends.push((
                        vec![Principal::Replica(primary)],
                        later,
                        put(format!("later {later}")),
                        false,
                    ));
                }
                (window + 1, 150)
            }
            ClientFault::ReuseTimestamp => {
                sends.push((
                    vec![Principal::Replica(primary)],
                    t,
                    put(format!("first {t}")),
                    false,
                ));
                sends.push((everyone, t, put(format!("second {t}")), false));
                (1, 40)
            }
            ClientFault::FloodReads => {
                // Every replica verifies every request's signature: this rate is already
                // several times what the correct clients send.
                for k in 0..2 {
                    let key = format!("k{}", (t + k) % self.scenario.keys.max(1)).into_bytes();
                    sends.push((everyone.clone(), t + k, KvOp::Get { key }, true));
                }
                (2, 3)
            }
        };
        let from = Principal::Client(node.id);
        for (to, timestamp, op, read_only) in sends {
            let node = &self.faulty_clients[c];
            let request = node.signer.sign(crate::wire::Request {
                client: node.id,
                timestamp: crate::wire::Timestamp(timestamp),
                operation: op.encode(),
                read_only,
            });
            let message = Message::Client(ClientMessage::Request(request));
            let sealed = seal_frame(&node.auth, from, &to, &message);
            let frame = self.sealed(sealed)?;
            for receiver in to {
                self.transmit(from, receiver, frame.clone());
            }
            self.faulty_clients[c].sent += 1;
        }
        let node = &mut self.faulty_clients[c];
        node.next_timestamp += advance;
        node.next_tick = self.tick + pause;
        Ok(())
    }

    /// For tests: the replicas' metrics.
    pub fn replica(&self, r: usize) -> Option<&Replica<SimService>> {
        match &self.replicas[r].state {
            ReplicaState::Up(replica) => Some(replica),
            _ => None,
        }
    }
}

/// Seals a message as the real driver would. A message the driver could not send (over
/// [`FRAME_BYTES_MAX`] once framed) is a checker failure, not a panic: on a real network it
/// never arrives, and if every peer needs it (a view change) the cluster stops for good.
fn seal_frame(
    auth: &Authenticator,
    from: Principal,
    to: &[Principal],
    message: &Message,
) -> Result<Vec<u8>, String> {
    let frame = auth.seal(message, to).map_err(|e| {
        format!(
            "frame size: {from:?} cannot send a {} to {} receiver(s): {e} (limit {FRAME_BYTES_MAX} bytes)",
            message.kind(),
            to.len()
        )
    })?;
    if frame.len() > FRAME_BYTES_MAX + FRAME_HEADER_BYTES {
        return Err(format!(
            "frame size: {from:?} sealed a {} frame of {} bytes, over {FRAME_BYTES_MAX}",
            message.kind(),
            frame.len()
        ));
    }
    Ok(frame)
}

/// The length of [`crate::wire::encode`]'s output, counted rather than built (the same
/// bincode configuration; its size limit only applies to decoding).
fn encoded_len<T: serde::Serialize>(value: &T) -> Result<usize, String> {
    struct Counter(usize);
    impl bincode::enc::write::Writer for Counter {
        fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
            self.0 += bytes.len();
            Ok(())
        }
    }
    let mut counter = Counter(0);
    bincode::serde::encode_into_writer(value, &mut counter, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    Ok(counter.0)
}

fn record_kind(record: &WalRecord) -> &'static str {
    match record {
        WalRecord::Snapshot(_) => "snapshot",
        WalRecord::EnteredView { .. } => "entered-view",
        WalRecord::InstalledView { .. } => "installed-view",
        WalRecord::NewViewMessage(_) => "new-view",
        WalRecord::Accepted(_) => "accepted",
        WalRecord::Prepared(_) => "prepared",
        WalRecord::CheckpointTaken { .. } => "checkpoint",
        WalRecord::Stable(_) => "stable",
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
