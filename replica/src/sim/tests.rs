//! Seeded simulation runs and named scenarios (see the module doc of [`super`]).

use super::*;

fn run_range(seeds: std::ops::Range<u64>) {
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut totals = Report::default();
    for seed in seeds.clone() {
        let outcome = std::panic::catch_unwind(|| run_seed(seed)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Failure { seed, tick: 0, what: format!("panic: {what}") })
        });
        match outcome {
            Ok(r) => {
                totals.completed += r.completed;
                totals.view_changes += r.view_changes;
                totals.state_transfers += r.state_transfers;
                totals.fetched_batches += r.fetched_batches;
                totals.rejected_frames += r.rejected_frames;
            }
            Err(f) => {
                eprintln!("{f}");
                failures.push(f.seed);
            }
        }
    }
    eprintln!(
        "seeds {:?}: {} failed; {} requests, {} view changes, {} state transfers, {} fetched batches, {} frames rejected, in {:?}",
        seeds,
        failures.len(),
        totals.completed,
        totals.view_changes,
        totals.state_transfers,
        totals.fetched_batches,
        totals.rejected_frames,
        started.elapsed()
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?} (replay commands above)");
}

#[test]
fn seeds_0_to_250() {
    run_range(0..250);
}

#[test]
fn seeds_250_to_500() {
    run_range(250..500);
}

#[test]
fn seeds_500_to_750() {
    run_range(500..750);
}

#[test]
fn seeds_750_to_1000() {
    run_range(750..1000);
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
    let seed = std::env::var("SIM_SEED").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    seed..seed + 1
}

/// `SIM_SEED=N` or `SIM_SEEDS=A..B`; see the module doc.
#[test]
#[ignore]
fn replay() {
    let seeds = seeds_from_env();
    if seeds.end - seeds.start == 1 {
        let scenario = Scenario::random(seeds.start);
        eprintln!("{scenario:?}");
        match Sim::new(scenario).run() {
            Ok(report) => eprintln!("ok: {report:?}"),
            Err(f) => panic!("{f}"),
        }
    } else {
        run_range(seeds);
    }
}
