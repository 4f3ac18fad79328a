//! `bftfs-bench seqwrite`: a large file written sequentially in 1 MiB writes (or `--block-kib`)
//! and fsync'ed at the end (`dd if=/dev/zero of=FILE bs=1M count=N conv=fsync`), on several
//! targets in one session, rounds interleaved.
//!
//! In: the targets (set up as `bftfs-bench postmark` sets them up, so `bftfs` is the default
//! write mode and `bftfs-sync` is `-o sync`), the size, the number of rounds. Out: per target
//! the median (and min–max) MB/s, timed here around the whole `dd` (its writes and the final
//! fsync), the ratio to a baseline, and a JSON file in `--out`.

use crate::postmark::{set_up_in, Setup, Target};
use crate::report::{median_min_max, utc_now};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Comma-separated targets, as for `postmark` (bftfs, bftfs-sync, bftfs-commit, bftfs-n1,
    /// tmpfs, localdir, bindfs, glusterfs).
    #[arg(long, default_value = "bftfs,bftfs-sync,bindfs")]
    pub targets: String,
    /// MiB written per run.
    #[arg(long, default_value_t = 200)]
    pub mib: u64,
    /// Size of each write(2), in KiB (dd's bs); must divide the file size.
    #[arg(long, default_value_t = 1024)]
    pub block_kib: u64,
    /// Rounds; each writes the file once on every target.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the JSON goes.
    #[arg(long, default_value = "benchmarks/results")]
    pub out: PathBuf,
    /// Target the ratios are taken against (default: the first target).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Directory on the root file system for backing directories and mount points.
    #[arg(long, default_value = "/var/tmp")]
    pub work_dir: PathBuf,
}

#[derive(serde::Serialize)]
struct Measurement {
    target: String,
    round: usize,
    seconds: f64,
    mb_per_second: f64,
}

pub fn run(args: Args) -> Result<()> {
    let names: Vec<String> = args
        .targets
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        bail!("--targets is empty");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    // Dropped (torn down) when this function returns, also on error.
    let mut targets: Vec<Target> = Vec::new();
    let mut skipped = Vec::new();
    for name in &names {
        eprintln!("setting up {name} ...");
        match set_up_in(name, &args.work_dir) {
            Ok(Setup::Ready(t)) => targets.push(t),
            Ok(Setup::Skipped(why)) => skipped.push((name.clone(), why)),
            Err(e) => skipped.push((name.clone(), format!("setup failed: {e:#}"))),
        }
    }
    for (name, why) in &skipped {
        eprintln!("skipped {name}: {why}");
    }
    if targets.is_empty() {
        bail!("no target could be set up");
    }
    let bytes = args.mib * (1 << 20);
    if args.block_kib == 0 || bytes % (args.block_kib * 1024) != 0 {
        bail!(
            "--block-kib {} does not divide {} MiB",
            args.block_kib,
            args.mib
        );
    }
    let count = bytes / (args.block_kib * 1024);
    let mut measurements = Vec::new();
    for round in 0..args.runs {
        for k in 0..targets.len() {
            let target = &targets[(k + round) % targets.len()];
            let file = target.dir.join(format!("seqwrite-{round}"));
            let started = Instant::now();
            let out = Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", file.display()))
                .arg(format!("bs={}K", args.block_kib))
                .arg(format!("count={count}"))
                .arg("conv=fsync")
                .output()
                .context("running dd")?;
            let seconds = started.elapsed().as_secs_f64();
            if !out.status.success() {
                bail!(
                    "dd on {} failed: {}",
                    target.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let written = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            if written != bytes {
                bail!("{}: the file has {written} bytes, not {bytes}", target.name);
            }
            let _ = std::fs::remove_file(&file);
            let mb_per_second = bytes as f64 / 1e6 / seconds;
            eprintln!(
                "round {}/{} {}: {:.1} MB/s ({seconds:.2} s)",
                round + 1,
                args.runs,
                target.name,
                mb_per_second
            );
            measurements.push(Measurement {
                target: target.name.clone(),
                round: round + 1,
                seconds,
                mb_per_second,
            });
        }
    }
    let baseline = args
        .baseline
        .clone()
        .unwrap_or_else(|| targets[0].name.clone());
    let rates = |name: &str| -> Vec<f64> {
        measurements
            .iter()
            .filter(|m| m.target == name)
            .map(|m| m.mb_per_second)
            .collect()
    };
    let base = median_min_max(&rates(&baseline)).map_or(f64::NAN, |r| r.0);
    println!(
        "dd bs={}K count={count} conv=fsync ({} MiB), {} round(s), medians with [min–max]",
        args.block_kib, args.mib, args.runs
    );
    println!();
    println!("| target | MB/s | vs {baseline} |");
    println!("|---|---:|---:|");
    let mut summary = Vec::new();
    for t in &targets {
        if let Some((median, min, max)) = median_min_max(&rates(&t.name)) {
            println!(
                "| {} | {median:.1} [{min:.1}–{max:.1}] | {:.2}× |",
                t.name,
                median / base
            );
            summary.push(serde_json::json!({
                "target": t.name,
                "description": t.description,
                "mb_per_second": [median, min, max],
                "ratio_to_baseline": median / base,
            }));
        }
    }
    let json = serde_json::json!({
        "when": utc_now(),
        "mib": args.mib,
        "block_kib": args.block_kib,
        "runs": args.runs,
        "baseline": baseline,
        "summary": summary,
        "measurements": measurements,
        "skipped": skipped,
    });
    let path = args
        .out
        .join(format!("seqwrite-{}mib-{}k.json", args.mib, args.block_kib));
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
