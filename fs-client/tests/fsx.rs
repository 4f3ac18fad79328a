//! fsx, the File System eXerciser (the Rust rewrite, crates.io package `fsx`, which `.ci/run`
//! installs with `cargo install`), on a real replicated mount: a random, seeded sequence of
//! reads, writes, mmap reads and writes, truncates, fsyncs, posix_fallocate, hole punches,
//! sendfile, posix_fadvise and copy_file_range on one file, every read checked against
//! what fsx expects.
//!
//! - `fsx_short_run`: 20,000 operations (4 processes of 5,000), in CI.
//! - `fsx_long_run` (ignored): 1,000,000 operations in 8 processes (`BFTFS_FSX_OPS`,
//!   `BFTFS_FSX_JOBS`, `BFTFS_FSX_SEED` change that):
//!   `cargo test -p fs-client --test fsx fsx_long_run -- --ignored --nocapture`.
//!
//! fsx is looked for as `BFTFS_FSX`, then on `PATH`; without it the tests skip with a message
//! (a failure when `BFTFS_REQUIRE_FSX=1`, as in CI).

mod common;

use common::{env_or, fuse_available, text, Mounted};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Every operation this fsx has. The file spans 16 chunks of the abstract state (64 KiB each)
/// and operations reach 128 KiB, so most cross a chunk boundary.
const CONFIG: &str = "\
flen = 1048576

[opsize]
max = 131072
min = 0
align = 1

[weights]
close_open = 1
read = 10
write = 10
mapread = 5
mapwrite = 5
invalidate = 1
truncate = 2
fsync = 1
fdatasync = 1
posix_fallocate = 3
punch_hole = 3
sendfile = 3
posix_fadvise = 1
copy_file_range = 3
";

fn fsx_binary(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("BFTFS_FSX")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("fsx"))
                    .find(|p| p.is_file())
            })
        });
    if found.is_none() {
        let why =
            "fsx is not installed (`cargo install --locked --version 0.3.2 fsx`, or set BFTFS_FSX)";
        if std::env::var("BFTFS_REQUIRE_FSX").as_deref() == Ok("1") {
            panic!("{test}: fsx is required (BFTFS_REQUIRE_FSX=1) but {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
    }
    found
}

/// Runs `jobs` fsx processes at once on a fresh mount, each on its own file with its own
/// seed (`seed`, `seed + 1`, ...), for `ops` operations in all; panics with fsx's report (and
/// where it left its logs) if one finds a difference. Several at once is how a long run
/// fits in an hour: each operation waits for agreement, and the replicas order concurrent
/// requests in batches.
fn run_fsx(test: &str, ops: u64, seed: u64, jobs: u64) {
    if !fuse_available(test) {
        return;
    }
    let Some(fsx) = fsx_binary(test) else {
        return;
    };
    let m = Mounted::new();
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("fsx.toml");
    std::fs::write(&config, CONFIG).expect("write fsx.toml");
    let started = Instant::now();
    let children: Vec<_> = (0..jobs)
        .map(|k| {
            let artifacts = work.path().join(format!("job{k}"));
            std::fs::create_dir(&artifacts).expect("mkdir artifacts");
            let n = ops / jobs + u64::from(k < ops % jobs);
            let child = Command::new(&fsx)
                .arg("-f")
                .arg(&config)
                .arg("-N")
                .arg(n.to_string())
                .arg("-S")
                .arg((seed + k).to_string())
                .arg("-P")
                .arg(&artifacts)
                .arg(m.path(&format!("fsx.{k}")))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start fsx");
            (k, n, child)
        })
        .collect();
    let mut failures = Vec::new();
    for (k, n, child) in children {
        let out = child.wait_with_output().expect("wait for fsx");
        let report = text(&out);
        if !out.status.success() || !report.contains("All operations completed A-OK!") {
            failures.push(format!(
                "fsx job {k} failed (replay: {} -f {} -N {n} -S {} FILE):\n{}",
                fsx.display(),
                config.display(),
                seed + k,
                tail(&report, 60)
            ));
        }
    }
    if !failures.is_empty() {
        // Keep fsx's logs and expected files for whoever reads the failure.
        let kept = work.keep();
        panic!(
            "after {:?}, logs in {}:\n{}",
            started.elapsed(),
            kept.display(),
            failures.join("\n")
        );
    }
    eprintln!(
        "fsx: {ops} operations ({jobs} processes, seeds {seed}..{}) in {:?}, all A-OK",
        seed + jobs - 1,
        started.elapsed()
    );
    m.down();
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn fsx_short_run() {
    run_fsx("fsx_short_run", 20_000, 1, 4);
}

#[test]
#[ignore = "about an hour: run by hand, see the module docs"]
fn fsx_long_run() {
    let ops = env_or("BFTFS_FSX_OPS", 1_000_000);
    let seed = env_or("BFTFS_FSX_SEED", 7);
    let jobs = match env_or("BFTFS_FSX_JOBS", 8) {
        0 => 8,
        j => j,
    };
    run_fsx("fsx_long_run", ops, seed, jobs);
}
