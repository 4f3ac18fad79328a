//! Seeded simulation runs and named scenarios (see the module doc of [`super`]).

use super::*;
use crate::wire::{
    ClientMessage, SeqNo, StateTransferMessage, View, FRAME_BYTES_MAX, FRAME_HEADER_BYTES,
};

/// Runs `scenario` (a [`NAMED_SCENARIOS`] name) for every seed; prints a summary and the
/// replay command of each failure.
fn run_range(scenario: &'static str, seeds: std::ops::Range<u64>) {
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut totals = Report::default();
    let mut f2_seeds = 0;
    let mut views_after_faults_max = 0;
    for seed in seeds.clone() {
        let outcome = std::panic::catch_unwind(|| {
            let s = named_scenario(scenario, seed).expect("a named scenario");
            let f2 = s.f == 2;
            (f2, Sim::new(s).run())
        })
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            (
                false,
                Err(Failure {
                    scenario,
                    seed,
                    tick: 0,
                    what: format!("panic: {what}"),
                }),
            )
        });
        f2_seeds += u64::from(outcome.0);
        match outcome.1 {
            Ok(r) => {
                totals.completed += r.completed;
                totals.view_changes += r.view_changes;
                totals.state_transfers += r.state_transfers;
                totals.lock_contents_fetched += r.lock_contents_fetched;
                totals.locks_given_back += r.locks_given_back;
                totals.locks_resolved += r.locks_resolved;
                totals.fetched_batches += r.fetched_batches;
                totals.fetched_bodies += r.fetched_bodies;
                totals.rejected_frames += r.rejected_frames;
                totals.fast_completions += r.fast_completions;
                totals.rollbacks += r.rollbacks;
                totals.poms_sent += r.poms_sent;
                totals.stripped_commits += r.stripped_commits;
                totals.stale_view_changes += r.stale_view_changes;
                totals.split_new_views += r.split_new_views;
                totals.faulty_client_requests += r.faulty_client_requests;
                views_after_faults_max = views_after_faults_max.max(r.views_after_faults);
            }
            Err(f) => {
                eprintln!("{f}");
                failures.push(f.seed);
            }
        }
    }
    eprintln!(
        "{scenario} seeds {:?} ({f2_seeds} with f=2): {} failed; {} requests ({} on the fast path), {} rollbacks, {} POMs, {} view changes (at most {views_after_faults_max} views after the faults), {} state transfers ({} lock contents fetched), {} frozen locks given back by their holders, {} resolved by reports, {} fetched batches ({} forged commits stripped), {} batches fetched by digest after a new view, {} lying view changes, {} split new views, {} faulty-client requests, {} frames rejected, in {:?}",
        seeds,
        failures.len(),
        totals.completed,
        totals.fast_completions,
        totals.rollbacks,
        totals.poms_sent,
        totals.view_changes,
        totals.state_transfers,
        totals.lock_contents_fetched,
        totals.locks_given_back,
        totals.locks_resolved,
        totals.fetched_batches,
        totals.stripped_commits,
        totals.fetched_bodies,
        totals.stale_view_changes,
        totals.split_new_views,
        totals.faulty_client_requests,
        totals.rejected_frames,
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{scenario}: failing seeds: {failures:?} (replay commands above)"
    );
}

#[test]
fn seeds_0_to_250() {
    run_range("random", 0..250);
}

#[test]
fn seeds_250_to_500() {
    run_range("random", 250..500);
}

#[test]
fn seeds_500_to_750() {
    run_range("random", 500..750);
}

#[test]
fn seeds_750_to_1000() {
    run_range("random", 750..1000);
}

// A Zzyzx lock holder beside the random workload and faults (see `holder.rs`).
#[test]
fn seeds_locks_0_to_150() {
    run_range("locks", 0..150);
}

#[test]
fn seeds_locks_f2_0_to_40() {
    run_range("locks_f2", 0..40);
}

// An ordered read freezes the lock while its holder works; the holder gives it back with a
// certificate (or, when an entry in flight blocks the seal, resolves it by reports).
#[test]
fn seeds_locks_revoked_0_to_40() {
    run_range("locks_revoked", 0..40);
}

#[test]
fn seeds_locks_revoked_f2_0_to_10() {
    run_range("locks_revoked_f2", 0..10);
}

#[test]
fn locks_revoked_scenario_gives_locks_back_with_certificates() {
    // Over 40 seeds (8 were too few: which ending a seed takes moves with any change to
    // the timing of the protocol): 24 given back and 16 resolved at a82ef30.
    let given_back = sum_over_seeds("locks_revoked", 0..40, |r| r.locks_given_back);
    assert!(
        given_back >= 12,
        "holders gave back {given_back} of 40 frozen locks with a certificate"
    );
}

// The holder dies with an entry in flight; it comes back as a client and resolves the
// frozen lock with the replicas' reports (`holder.rs`); runs are longer (the grace).
#[test]
fn seeds_locks_holder_dies_0_to_30() {
    run_range("locks_holder_dies", 0..30);
}

#[test]
fn seeds_locks_holder_dies_f2_0_to_8() {
    run_range("locks_holder_dies_f2", 0..8);
}

// The holder forks its log as it dies (two entries at one k, each to half the replicas):
// the resolution picks one chain and every replica merges that one.
#[test]
fn seeds_locks_holder_forks_0_to_30() {
    run_range("locks_holder_forks", 0..30);
}

#[test]
fn seeds_locks_holder_forks_f2_0_to_8() {
    run_range("locks_holder_forks_f2", 0..8);
}

/// The dying holder's scenario is about the resolution: it happens in most seeds (a seed
/// where the lock froze before the holder's death has nothing to resolve by reports).
#[test]
fn locks_holder_dies_scenario_resolves() {
    let resolved = sum_over_seeds("locks_holder_dies", 0..8, |r| r.locks_resolved);
    assert!(
        resolved >= 6,
        "{resolved} of 8 seeds resolved the dead holder's lock"
    );
}

#[test]
fn seeds_locks_lagging_0_to_30() {
    run_range("locks_lagging", 0..30);
}

#[test]
fn seeds_locks_lagging_f2_0_to_8() {
    run_range("locks_lagging_f2", 0..8);
}

/// The lagging replica's scenario is about lock state transfer: the replica comes back to
/// an active lock and fetches its content in most seeds (in others the lock merged first,
/// or the replica caught up from its peers' logs without a state transfer).
#[test]
fn locks_lagging_lying_scenario_fetches_lock_content_past_endless_pages() {
    let fetched = sum_over_seeds("locks_lagging_lying", 0..8, |r| r.lock_contents_fetched);
    assert!(fetched >= 4, "lock content fetched in {fetched} of 8 seeds");
}

#[test]
fn locks_lagging_scenario_fetches_lock_content() {
    let fetched = sum_over_seeds("locks_lagging", 0..8, |r| r.lock_contents_fetched);
    assert!(fetched >= 4, "lock content fetched in {fetched} of 8 seeds");
}

/// Runs the named scenario over `seeds` (each must pass) and sums one figure of the reports.
fn sum_over_seeds(name: &str, seeds: std::ops::Range<u64>, figure: impl Fn(&Report) -> u64) -> u64 {
    seeds
        .map(|seed| {
            let scenario = named_scenario(name, seed).expect("named");
            let report = Sim::new(scenario).run().unwrap_or_else(|f| panic!("{f}"));
            figure(&report)
        })
        .sum()
}

/// The lock scenario is about locked work: it happens, under faults, in most seeds.
#[test]
fn locks_scenario_runs_locked_entries() {
    let mut entries = 0;
    for seed in 0..10 {
        let scenario = named_scenario("locks", seed).expect("named");
        let mut sim = Sim::new(scenario);
        let report = sim.run().unwrap_or_else(|f| panic!("{f}"));
        entries += report.lock_entries;
    }
    assert!(entries >= 10 * 12, "{entries} locked entries in 10 seeds");
}

// Seven replicas: about three times the cost of a seed of four.
#[test]
fn seeds_f2_0_to_100() {
    run_range("random_f2", 0..100);
}

#[test]
fn seeds_f2_100_to_200() {
    run_range("random_f2", 100..200);
}

// The file service (each replica over a directory of its own; see `service::RunDir` for
// where): some 50 ms of CPU per seed.
#[test]
fn seeds_fs_0_to_150() {
    run_range("random_fs", 0..150);
}

#[test]
fn seeds_fs_150_to_300() {
    run_range("random_fs", 150..300);
}

#[test]
fn seeds_fs_300_to_450() {
    run_range("random_fs", 300..450);
}

/// The long file-service sweep: `SIM_FS_SEEDS` seeds (default 2,000) of `random_fs` after
/// the ones CI runs, and a tenth as many of the skewed-time scenario and of the large
/// writes (f = 1):
/// `SIM_FS_SEEDS=5000 cargo test -p replica --lib sim::tests::seeds_fs_long -- --ignored --nocapture`
#[test]
#[ignore]
fn seeds_fs_long() {
    let count: u64 = std::env::var("SIM_FS_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2000);
    run_range("random_fs", 450..450 + count);
    run_range("fs_time_skew_after_state_transfer", 0..count / 10);
    run_range("fs_large_writes_primary_crash", 0..count / 10);
}

/// Parses `SIM_SEED=N` or `SIM_SEEDS=A..B` (default: seed 0).
fn seeds_from_env() -> std::ops::Range<u64> {
    if let Ok(text) = std::env::var("SIM_SEEDS") {
        if let Some((a, b)) = text.split_once("..") {
            if let (Ok(a), Ok(b)) = (a.trim().parse(), b.trim().parse()) {
                return a..b;
            }
        }
        panic!("SIM_SEEDS must look like 0..1000");
    }
    let seed = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    seed..seed + 1
}

/// `SIM_SEED=N` or `SIM_SEEDS=A..B`, with `SIM_SCENARIO=name` (default `random`; any name
/// of [`NAMED_SCENARIOS`]); see the module doc.
#[test]
#[ignore]
fn replay() {
    let seeds = seeds_from_env();
    let name = std::env::var("SIM_SCENARIO").unwrap_or_else(|_| "random".into());
    let Some((name, _)) = NAMED_SCENARIOS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = NAMED_SCENARIOS.iter().map(|(n, _)| *n).collect();
        panic!("SIM_SCENARIO={name} is not one of {names:?}");
    };
    if seeds.end - seeds.start == 1 {
        // RUST_LOG=... shows the replicas' logs of the one run (all of them: the simulator
        // runs every replica in this thread).
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let scenario = named_scenario(name, seeds.start).expect("listed");
        eprintln!("{scenario:?}");
        match Sim::new(scenario).run() {
            Ok(report) => eprintln!("ok: {report:?}"),
            Err(f) => panic!("{f}"),
        }
    } else {
        run_range(name, seeds);
    }
}

#[test]
fn every_named_scenario_replays_under_its_own_name() {
    for (name, _) in NAMED_SCENARIOS {
        let s = named_scenario(name, 7).expect("listed");
        assert_eq!(s.name, *name);
        let failure = Failure {
            scenario: s.name,
            seed: 7,
            tick: 0,
            what: String::new(),
        };
        assert!(failure
            .to_string()
            .contains(&format!("SIM_SCENARIO={name} SIM_SEED=7 cargo test")));
    }
    // Random seeds choose f from the seed: one in four (about) runs seven replicas.
    let f2 = (0..400)
        .filter(|seed| Scenario::random(*seed).f == 2)
        .count();
    assert!((60..140).contains(&f2), "{f2}");
}

// ---------------------------------------------------------------------------------------------
// Named scenarios (STYLE.md, layer 2)

/// Runs a named scenario (so that its failure prints the command that replays it).
fn run_scenario(name: &str, seed: u64) -> (Sim, Report) {
    let scenario = named_scenario(name, seed).unwrap_or_else(|| panic!("no scenario {name}"));
    let mut sim = Sim::new(scenario);
    match sim.run() {
        Ok(report) => (sim, report),
        Err(f) => panic!("{f}"),
    }
}

#[test]
fn equivocating_primary_forces_a_view_change_and_nothing_is_lost() {
    let (sim, report) = run_scenario("equivocating_primary", 11);
    assert!(report.view_changes >= 1, "{report:?}");
    assert!(report.max_view >= 1);
    assert_eq!(report.completed, 3 * 8);
    for r in 1..4 {
        let replica = sim.replica(r).expect("up");
        assert_ne!(
            replica.view().primary(4),
            ReplicaId(0),
            "replica {r} still follows the equivocator"
        );
    }
}

#[test]
fn silent_primary_is_replaced_by_a_view_change() {
    let (sim, report) = run_scenario("silent_primary", 12);
    assert!(report.view_changes >= 1, "{report:?}");
    assert_eq!(report.completed, 3 * 8);
    let views: Vec<View> = (1..4).map(|r| sim.replica(r).expect("up").view()).collect();
    assert!(views.iter().all(|v| *v >= View(1)), "{views:?}");
}

#[test]
fn restarted_replica_catches_up_by_state_transfer() {
    let (sim, report) = run_scenario("restarted_replica_catches_up", 13);
    let r3 = assert_caught_up_by_state_transfer(&sim, 3);
    assert!(
        r3.stable_checkpoint().seq >= SeqNo(8),
        "{}",
        r3.debug_summary()
    );
    assert_eq!(report.completed, 3 * 16);
}

#[test]
fn a_replica_restarted_into_an_idle_cluster_catches_up() {
    let (sim, report) = run_scenario("restarted_into_an_idle_cluster", 13);
    assert_caught_up_by_state_transfer(&sim, 3);
    assert_eq!(report.completed, 3 * 16);
}

/// Replica `r` made a state transfer and executed as far as replica 1.
fn assert_caught_up_by_state_transfer(sim: &Sim, r: usize) -> &Replica<SimService> {
    let lagging = sim.replica(r).expect("up");
    let r1 = sim.replica(1).expect("up");
    assert!(
        lagging.metrics().state_transfers >= 1,
        "{}",
        lagging.debug_summary()
    );
    assert_eq!(
        lagging.last_executed(),
        r1.last_executed(),
        "{} / {}",
        lagging.debug_summary(),
        r1.debug_summary()
    );
    lagging
}

#[test]
fn retransmitted_requests_are_answered_but_not_executed_twice() {
    let (sim, report) = run_scenario("lossy_network", 14);
    // Lost replies made clients retransmit; the linearizability checker (appends return the
    // whole value) would fail if any retransmission had run again.
    assert!(sim.client_retransmissions() > 0);
    assert_eq!(report.completed, 3 * 10);
}

#[test]
fn oversized_garbled_and_unauthenticated_frames_are_dropped_and_counted() {
    use crate::wire::{frame_length, Authenticator, FrameReader, WireCounters, WireError};
    use std::sync::atomic::Ordering::Relaxed;
    let mut sim = Sim::new(Scenario::calm(15));
    let keys = sim.keys().clone();
    let config = keys.config.clone();
    let client = Authenticator::for_client(&config, &keys.clients[0]);
    let replica2 = Authenticator::for_replica(&config, &keys.replicas[2]);
    let to1 = [Principal::Replica(ReplicaId(1))];
    let query = Message::StateTransfer(StateTransferMessage::QueryStable);

    // Oversized: refused from the header alone.
    let mut reader = FrameReader::new();
    reader.push(&((FRAME_BYTES_MAX as u32) + 1).to_be_bytes());
    let error = reader.next_frame().expect_err("oversized");
    assert!(matches!(error, WireError::FrameTooLarge { .. }));
    assert!(frame_length(((FRAME_BYTES_MAX as u32) + 1).to_be_bytes()).is_err());
    let driver_counters = WireCounters::default();
    driver_counters.count(&error);
    assert_eq!(driver_counters.oversized.load(Relaxed), 1);

    // Garbled bytes.
    sim.inject(1, vec![0xff; 40]).expect("no failure");
    // A frame for another replica (no tag for replica 1).
    let frame = replica2
        .seal(&query, &[Principal::Replica(ReplicaId(3))])
        .expect("seal");
    sim.inject(1, frame[FRAME_HEADER_BYTES..].to_vec())
        .expect("no failure");
    // A flipped bit in the MAC.
    let mut frame = replica2.seal(&query, &to1).expect("seal");
    let at = frame.len() - 40;
    frame[at] ^= 1;
    sim.inject(1, frame[FRAME_HEADER_BYTES..].to_vec())
        .expect("no failure");
    // A client may not send replica traffic.
    let frame = client.seal(&query, &to1).expect("seal");
    sim.inject(1, frame[FRAME_HEADER_BYTES..].to_vec())
        .expect("no failure");
    // A request whose signature is broken.
    let signer = Signer::from_secret(&keys.clients[0].signing_key.0);
    let mut request = signer.sign(crate::wire::Request {
        client: keys.clients[0].id,
        timestamp: crate::wire::Timestamp(7),
        operation: vec![1],
        read_only: false,
    });
    request.body.timestamp = crate::wire::Timestamp(8);
    let frame = client
        .seal(&Message::Client(ClientMessage::Request(request)), &to1)
        .expect("seal");
    sim.inject(1, frame[FRAME_HEADER_BYTES..].to_vec())
        .expect("no failure");

    let c = sim.counters(1);
    assert_eq!(c.garbled.load(Relaxed), 1);
    assert_eq!(c.unauthenticated.load(Relaxed), 2);
    assert_eq!(c.forbidden.load(Relaxed), 1);
    assert_eq!(c.bad_signature.load(Relaxed), 1);
    assert_eq!(c.accepted.load(Relaxed), 0);
    // And the cluster is none the worse for it.
    let report = sim.run().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(report.completed, 3 * 8);
}

#[test]
fn forged_commits_are_stripped_from_the_certificates_lagging_replicas_fetch() {
    // Replica 3 sends its commits with broken signatures (half of them; the other half claim
    // to be another replica and are refused). Receivers count them without checking the
    // signature, so they end up in commit certificates; with lost messages, replicas fall
    // behind and catch up from those certificates, dropping the forged commits.
    let (mut stripped, mut fetched) = (0, 0);
    for seed in 30..36 {
        let (_, report) = run_scenario("forged_commits", seed);
        assert_eq!(report.completed, 3 * 12, "{report:?}");
        stripped += report.stripped_commits;
        fetched += report.fetched_batches;
    }
    eprintln!("{stripped} forged commits stripped, {fetched} batches fetched");
    assert!(stripped > 0 && fetched > 0);
}

#[test]
fn lying_new_primary_is_refused_and_replaced() {
    let (sim, report) = run_scenario("lying_new_primary", 16);
    assert!(report.misbehaviour_noticed > 0, "{report:?}");
    assert!(report.max_view >= 2, "{report:?}");
    assert_eq!(report.completed, 3 * 10);
    for r in [0, 2, 3] {
        let replica = sim.replica(r).expect("up");
        assert_ne!(
            replica.view().primary(4),
            ReplicaId(1),
            "replica {r} follows the liar"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Fast path

#[test]
fn calm_run_completes_on_the_fast_path() {
    let (_, report) = run_scenario("ordered_only", 3);
    assert_eq!(report.completed, 3 * 8);
    assert!(report.fast_completions * 2 > report.completed, "{report:?}");
    assert_eq!(
        (report.view_changes, report.rollbacks, report.poms_sent),
        (0, 0, 0),
        "{report:?}"
    );
}

#[test]
fn commit_path_alone_when_the_fast_path_is_off() {
    let (_, report) = run_scenario("commit_path_only", 3);
    assert_eq!(report.completed, 3 * 8);
    assert_eq!(
        (report.fast_completions, report.speculated_batches),
        (0, 0),
        "{report:?}"
    );
}

#[test]
fn primary_equivocating_on_the_fast_path_is_rolled_back_and_nothing_completed_is_lost() {
    // Different batches to different backups: they run them speculatively, the commit or the
    // next view decides, and what ran against it is undone. The checkers replay every
    // completion against the final committed order.
    let (_, report) = run_scenario("equivocating_primary", 11);
    assert_eq!(report.completed, 3 * 8);
    assert!(
        report.rollbacks >= 1 && report.view_changes >= 1,
        "{report:?}"
    );
}

#[test]
fn primary_sending_unchained_histories_gets_no_fast_completion() {
    // Same batch, a history that does not chain at all but one backup: those backups accept
    // (PBFT ignores histories) but do not run it speculatively, so nothing completes fast and
    // everything completes once committed.
    let (_, report) = run_scenario("primary_forks_history", 5);
    assert_eq!(report.completed, 3 * 8);
    assert_eq!(
        (report.fast_completions, report.rollbacks),
        (0, 0),
        "{report:?}"
    );
}

#[test]
fn primary_signing_two_orders_for_one_slot_is_convicted_by_a_client_pom() {
    // The primary's speculative replies carry orders re-signed with another history: the
    // client holds two validly signed orders for one (view, seq), sends both to every replica,
    // and the replicas leave the primary's view.
    let (sim, report) = run_scenario("primary_wrong_replies", 5);
    assert_eq!(report.completed, 3 * 8);
    assert!(
        report.poms_sent >= 1 && report.poms_received >= 1 && report.view_changes >= 1,
        "{report:?}"
    );
    for r in 1..4 {
        assert_ne!(sim.replica(r).expect("up").view().primary(4), ReplicaId(0));
    }
}

#[test]
fn wrong_speculative_replies_never_complete_a_request() {
    // One backup lies in every reply: 3f+1 matching speculative replies never form, so every
    // request completes on 2f+1 committed replies instead.
    let (_, report) = run_scenario("backup_wrong_replies", 7);
    assert_eq!(report.completed, 3 * 8);
    assert_eq!(report.fast_completions, 0, "{report:?}");
    assert!(report.speculated_batches > 0, "{report:?}");
}

#[test]
fn committed_batch_survives_when_its_only_preparer_in_the_quorum_accepted_a_re_issue() {
    // Seed 3786 once lost a committed batch: the one replica of the deciding quorum holding its
    // prepared certificate had accepted the next view's re-issue of the same batch and
    // reported only that (a lone fast report, not counted). It must report the certificate.
    run_scenario("regression_3786", 3786);
}

#[test]
fn reads_after_fast_writes_are_answered_on_the_read_only_path() {
    // Replicas hold reads while their state is speculative and answer them once it commits,
    // so in a calm run no read has to wait out a client timeout and go through ordering.
    let (_, report) = run_scenario("reads_only", 21);
    assert!(
        report.read_only_completed > 0 && report.fast_completions > 0,
        "{report:?}"
    );
    assert_eq!(report.read_only_fallbacks, 0, "{report:?}");
}

// ---------------------------------------------------------------------------------------------
// Large operations (issue #11): every frame and WAL record must fit its limit

#[test]
fn oversized_frames_and_wal_records_are_checker_failures() {
    // The checks themselves: a proposal carrying a batch of nine 4 MiB requests (what a view
    // change carrying batch bodies amounted to) cannot be sealed or logged, and the run
    // fails with the checker's name instead of panicking.
    let mut sim = Sim::new(named_scenario("large_ops_primary_crash", 1).expect("listed"));
    let keys = sim.keys().clone();
    let signer = Signer::from_secret(&keys.clients[0].signing_key.0);
    let batch = crate::wire::Batch {
        requests: (0..9)
            .map(|t| {
                signer.sign(crate::wire::Request {
                    client: keys.clients[0].id,
                    timestamp: crate::wire::Timestamp(t + 1),
                    operation: vec![7; 4 << 20],
                    read_only: false,
                })
            })
            .collect(),
    };
    let replica0 = Signer::from_secret(&keys.replicas[0].signing_key.0);
    let proposal = Proposal {
        pre_prepare: replica0.sign(PrePrepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: batch.ordered_digest(&[]),
            nondet: Vec::new(),
            primary: ReplicaId(0),
            history: Default::default(),
        }),
        batch,
    };
    let message = Message::Agreement(AgreementMessage::PrePrepare(proposal.clone()));
    let failure = sim
        .send_sealed(0, vec![Principal::Replica(ReplicaId(1))], &message)
        .expect_err("a 36 MiB frame");
    assert!(failure.what.starts_with("frame size"), "{failure}");
    assert!(failure
        .to_string()
        .contains("SIM_SCENARIO=large_ops_primary_crash SIM_SEED=1"));
    let small = WalRecord::InstalledView { view: View(3) };
    assert_eq!(
        encoded_len(&small),
        Ok(crate::wire::encode(&small).expect("encodes").len())
    );
    let record = WalRecord::Accepted(Box::new(proposal));
    let failure = sim.check_record(0, &record).expect_err("a 36 MiB record");
    assert!(failure.what.starts_with("wal record size"), "{failure}");
}

#[test]
fn large_operations_and_a_primary_crash_mid_run_fit_every_frame_and_record() {
    // 16 requests of 3–4 MiB, none truncated from the log (a checkpoint every 64 batches);
    // the primary crashes after 10 completions (over 30 MiB in the log), and the view change
    // must still fit in a frame: evidence names batches by digest, and replicas fetch the
    // bodies they lack after the new view.
    let (sim, report) = run_scenario("large_ops_primary_crash", 1);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 16);
    assert!(
        report.view_changes >= 1 && report.max_view >= 1,
        "{report:?}"
    );
    assert_ne!(
        sim.replica(1).expect("up").view().primary(4),
        ReplicaId(0),
        "the crash forced a new primary"
    );
    assert!(
        report.highest_executed >= 10 && report.highest_executed < 64,
        "a log full of large batches, never truncated: {report:?}"
    );
    // Frames and records were large (the checks saw real sizes), and within the limits.
    assert!(report.frame_bytes_max > 1 << 20, "{report:?}");
    assert!(report.frame_bytes_max <= (FRAME_BYTES_MAX + FRAME_HEADER_BYTES) as u64);
    assert!(report.record_bytes_max > 1 << 20, "{report:?}");
}

#[test]
fn large_operations_and_a_primary_crash_with_seven_replicas() {
    let (_, report) = run_scenario("large_ops_primary_crash_f2", 2);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 16);
    assert!(
        report.view_changes >= 1 && report.max_view >= 1,
        "{report:?}"
    );
    assert!(report.frame_bytes_max > 1 << 20, "{report:?}");
}

#[test]
fn repeated_restarts_replay_a_large_log() {
    let (sim, report) = run_scenario("large_log_repeated_restarts", 3);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 16);
    let restarts: Vec<u64> = (0..4).map(|r| sim.restarts(r)).collect();
    assert_eq!(restarts, vec![1, 2, 1, 2], "every planned crash restarted");
    assert!(report.record_bytes_max > 1 << 20, "{report:?}");
}

#[test]
fn all_replicas_crash_right_after_a_fast_completion_and_the_request_survives() {
    // The request completed on 3f+1 speculative replies, and nothing of it committed before
    // every replica crashed: the checkers require it in the committed order at the end.
    let (sim, report) = run_scenario("all_crash_after_fast_completion", 4);
    assert_eq!(report.completed, 3 * 8);
    assert!(report.fast_completions >= 1, "{report:?}");
    let restarts: Vec<u64> = (0..4).map(|r| sim.restarts(r)).collect();
    assert_eq!(restarts, vec![1; 4], "all crashed and restarted once");
}

// ---------------------------------------------------------------------------------------------
// Byzantine view changes

#[test]
fn lying_view_changes_lose_nothing() {
    let (_, report) = run_scenario("stale_view_changes", 5);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 3 * 12);
    assert!(
        report.stale_view_changes >= 1 && report.view_changes >= 1,
        "{report:?}"
    );
}

#[test]
fn two_lying_view_changes_of_seven_lose_nothing() {
    let (_, report) = run_scenario("stale_view_changes_f2", 5);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 3 * 12);
    assert!(
        report.stale_view_changes >= 2 && report.view_changes >= 1,
        "{report:?}"
    );
}

#[test]
fn new_views_split_over_different_quorums_do_not_split_agreement() {
    let (_, report) = run_scenario("split_new_views", 6);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 3 * 12);
    assert!(report.split_new_views >= 1, "{report:?}");
}

#[test]
fn new_views_split_over_six_quorums_of_seven_replicas() {
    let (_, report) = run_scenario("split_new_views_f2", 6);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 3 * 12);
    assert!(report.split_new_views >= 1, "{report:?}");
}

// ---------------------------------------------------------------------------------------------
// Faulty clients: correct clients complete, and no endless view changes follow

// The only fault in these runs is the client, so any view change is one it caused.

#[test]
fn client_splitting_stale_requests_cannot_force_view_changes() {
    let (_, report) = run_scenario("faulty_client_split_stale", 8);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 3 * 12);
    assert!(report.faulty_client_requests > 0);
    assert_eq!(report.max_view, 0, "{report:?}");
}

#[test]
fn client_reusing_timestamps_cannot_force_view_changes() {
    let (_, report) = run_scenario("faulty_client_reused_timestamps", 9);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 3 * 12);
    assert!(report.faulty_client_requests > 0);
    assert_eq!(report.max_view, 0, "{report:?}");
}

#[test]
fn client_flooding_reads_cannot_force_view_changes() {
    let (_, report) = run_scenario("faulty_client_read_flood", 10);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 3 * 12);
    assert!(report.faulty_client_requests > 100);
    assert_eq!(report.max_view, 0, "{report:?}");
}

#[test]
fn large_results_fit_a_checkpoint_record_and_a_state_transfer() {
    let (_, report) = run_scenario("large_results_across_a_checkpoint", 1);
    eprintln!("{report:?}");
    assert_eq!(report.completed, 20);
    assert!(
        report.highest_executed >= 16,
        "a checkpoint was taken: {report:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The file service (issue #11)

#[test]
fn file_service_run_agrees_with_a_reference_file_service() {
    let (sim, report) = run_scenario("fs_calm", 1);
    eprintln!("{report:?}");
    assert_eq!(report.completed, sim.planned_requests());
    assert!(report.read_only_completed > 0, "{report:?}");
    assert!(
        report.highest_executed >= 8,
        "checkpoints were taken and compared: {report:?}"
    );
}

#[test]
fn file_results_that_differ_from_the_reference_are_caught() {
    // The checker itself: a run that passes, then one ordered result and one read-only result
    // changed in the history, each of which the reference must refuse.
    let (mut sim, _) = run_scenario("fs_calm", 1);
    sim.checker.check_history().expect("the run passed");
    let history = sim.checker.history_mut().clone();
    let pick = |read_only: bool| {
        history.iter().position(|e| {
            e.read_only_path == read_only
                && e.result.is_some()
                && matches!(&e.op, checkers::Operation::Fs(r) if matches!(r.op, state_abstraction::fs::FsOp::GetAttr { .. } | state_abstraction::fs::FsOp::Mkdir { .. } | state_abstraction::fs::FsOp::Create { .. } | state_abstraction::fs::FsOp::ReadDir { .. }))
        })
    };
    let wrong = state_abstraction::fs::encode(&state_abstraction::fs::FsResult::Err(
        state_abstraction::fs::FsError::Io,
    ));
    for read_only in [false, true] {
        let h = pick(read_only).expect("such a request");
        let saved = sim.checker.history_mut()[h].result.replace(wrong.clone());
        let failure = sim.checker.check_history().expect_err("a wrong result");
        assert!(failure.starts_with("file results"), "{failure}");
        sim.checker.history_mut()[h].result = saved;
    }
    sim.checker.check_history().expect("restored");
}

#[test]
fn file_service_large_writes_and_a_primary_crash_fit_every_frame_and_record() {
    // Writes of 1-4 MiB in parts of 1 MiB, reads of up to 1 MiB, the primary crashing after
    // 12 completions: every frame and WAL record within its limit, every checkpoint digest
    // the same at every correct replica, every result the reference's.
    let (sim, report) = run_scenario("fs_large_writes_primary_crash", 1);
    eprintln!("{report:?}");
    assert_eq!(report.completed, sim.planned_requests());
    assert!(report.large_write_bytes >= 2 << 20, "{report:?}");
    assert!(
        report.view_changes >= 1 && report.max_view >= 1,
        "{report:?}"
    );
    assert!(report.frame_bytes_max > 1 << 20, "{report:?}");
    assert!(report.frame_bytes_max <= (FRAME_BYTES_MAX + FRAME_HEADER_BYTES) as u64);
    assert!(report.record_bytes_max > 1 << 20, "{report:?}");
    assert!(report.highest_executed >= 8, "{report:?}");
}

#[test]
fn file_service_large_writes_and_a_primary_crash_with_seven_replicas() {
    let (sim, report) = run_scenario("fs_large_writes_primary_crash_f2", 2);
    eprintln!("{report:?}");
    assert_eq!(report.completed, sim.planned_requests());
    assert!(report.large_write_bytes >= 1 << 20, "{report:?}");
    assert!(
        report.view_changes >= 1 && report.max_view >= 1,
        "{report:?}"
    );
    assert!(report.frame_bytes_max > 1 << 20, "{report:?}");
}

#[test]
fn skewed_primary_times_are_clamped_alike_after_a_state_transfer() {
    // Issue #11, item 4: the replica that caught up by state transfer must clamp the
    // primary's backward times against the same newest agreed time as the others, or its
    // replies and checkpoint digests differ (see the scenario's doc for how this was seen
    // to fail with the agreed time kept outside the replicated state).
    for seed in 0..10 {
        let (sim, report) = run_scenario("fs_time_skew_after_state_transfer", seed);
        eprintln!("{report:?}");
        assert_eq!(report.completed, sim.planned_requests());
        assert!(report.state_transfers >= 1, "{report:?}");
        assert!(report.backward_proposals > 0, "{report:?}");
        assert!(report.clamped_after_transfer > 0, "{report:?}");
        assert!(report.checkpoints_after_transfer >= 2, "{report:?}");
    }
}

/// Prints one line per run, `name seed report-or-failure | each replica's summary`, for
/// `SIM_SEEDS` (default `0..12`) of every named scenario: hash the output before and after a
/// refactoring that must not change behaviour, and compare.
#[test]
#[ignore]
fn fingerprint() {
    let seeds = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once("..")?;
            Some(a.trim().parse().ok()?..b.trim().parse().ok()?)
        })
        .unwrap_or(0..12u64);
    let only = std::env::var("SIM_SCENARIO").ok();
    for (name, _) in NAMED_SCENARIOS {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        for seed in seeds.clone() {
            let scenario = named_scenario(name, seed).expect("listed");
            let n = scenario.n();
            let mut sim = Sim::new(scenario);
            let outcome = match sim.run() {
                Ok(report) => format!("ok {report:?}"),
                Err(f) => format!("failed {f}"),
            };
            let summaries: Vec<String> = (0..n as usize)
                .map(|r| {
                    sim.replica(r)
                        .map(|r| r.debug_summary())
                        .unwrap_or_default()
                })
                .collect();
            println!("{name} {seed} {outcome} | {}", summaries.join(" | "));
        }
    }
}
