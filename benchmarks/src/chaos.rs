//! `bftfs-bench chaos`: a long fault run. Starts four `bftfs-replica` processes (f=1) whose
//! every connection goes through a proxy this command controls, mounts them with
//! `bftfs mount`, and for `--minutes` runs the data-verifying workload (every read checked
//! against a model) and PostMark rounds while, every `--fault-every` seconds, one fault is
//! injected in turn: SIGKILL of a backup, SIGKILL of the primary (each restarted a second
//! later), a backup cut off from everyone, the primary cut off (each reconnected after
//! `--cut-seconds`). Only one fault at a time: before the next, the cluster must be whole
//! again (four replicas answering, one primary, none far behind).
//!
//! Out: figures on stdout and in `--out` (JSON): operations, faults by kind, errors,
//! mismatches, view changes, PostMark rounds, and whether the replicas ended in the same
//! state. The exit status is non-zero if anything was wrong.

#[path = "../../replica/tests/proxy/mod.rs"]
#[allow(dead_code, clippy::all)]
mod proxy;
#[path = "../../fs-client/tests/common/workload.rs"]
#[allow(dead_code, clippy::all)]
mod workload;

use anyhow::{bail, Context, Result};
use proxy::Mesh;
use replica::config::{generate_with_os_random, ProtocolConfig};
use replica::driver::status::{highest_executed, ReplicaStatus, STATUS_PROBE};
use serde::Serialize;
use state_abstraction::ClientId;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{Counts, Workload};

#[derive(clap::Args)]
pub struct Args {
    /// How long to inject faults.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds between faults (at least; the next waits for the cluster to be whole).
    #[arg(long, default_value_t = 5.0)]
    fault_every: f64,
    /// How long a cut-off replica stays cut off.
    #[arg(long, default_value_t = 6.0)]
    cut_seconds: f64,
    /// Directory in which a fresh working directory (replicas' data, mount point) is made.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Figures as JSON.
    #[arg(long, default_value = "chaos.json")]
    out: PathBuf,
    /// Run only the verifying workload, no PostMark.
    #[arg(long)]
    no_postmark: bool,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Default, Serialize)]
struct Faults {
    kill_backup: u32,
    kill_primary: u32,
    cut_backup: u32,
    cut_primary: u32,
}

#[derive(Serialize)]
struct Figures {
    minutes: f64,
    faults: Faults,
    operations: u64,
    writes: u64,
    truncates: u64,
    renames: u64,
    removes: u64,
    fsyncs: u64,
    verified_reads: u64,
    bytes_written: u64,
    errors: u64,
    mismatches: u64,
    problems: Vec<String>,
    postmark_rounds: u32,
    postmark_failures: Vec<String>,
    /// The view the replicas ended in (each completed view change moves it by one).
    final_view: u64,
    /// View changes started, summed over replicas (restarted replicas count from zero again).
    view_changes_started: u64,
    state_transfers: u64,
    /// Times the cluster was not whole again within two minutes of a fault.
    slow_recoveries: u32,
    /// Seconds from the end of each fault (restart or reconnection) until the cluster was
    /// whole again: median and maximum.
    recovery_seconds_median: f64,
    recovery_seconds_max: f64,
    final_executed: Vec<u64>,
    final_checkpoint: Vec<u64>,
    replicas_agree: bool,
}

/// Asks a replica for its status over plain TCP (the probe needs no authentication).
fn probe(address: &str) -> Option<ReplicaStatus> {
    let mut s = TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(&replica::wire::frame(STATUS_PROBE).ok()?)
        .ok()?;
    let mut header = [0u8; 4];
    s.read_exact(&mut header).ok()?;
    let len = replica::wire::frame_length(header).ok()?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("no parent")?.join(name);
    if !p.is_file() {
        bail!(
            "{} not found next to bftfs-bench (build the workspace: cargo build --release)",
            p.display()
        );
    }
    Ok(p)
}

struct Cluster {
    work: PathBuf,
    replica_bin: PathBuf,
    mesh: Mesh,
    children: Vec<Option<Child>>,
}

impl Cluster {
    fn start(work: &Path) -> Result<Cluster> {
        let real = replica::localhost::free_addresses(4, replica::localhost::fresh_seed())?;
        let keys =
            generate_with_os_random(1, real.clone(), &[ClientId(1)], ProtocolConfig::default())?;
        let mesh = Mesh::start(real);
        for (i, secrets) in keys.replicas.iter().enumerate() {
            // Addresses never enter the protocol: each replica reaches the others through its
            // own proxies to them.
            let config = mesh.replica_config(&keys.config, i);
            std::fs::write(work.join(format!("cluster-{i}.json")), config.to_json()?)?;
            std::fs::write(work.join(format!("replica-{i}.json")), secrets.to_json()?)?;
        }
        let client_dir = work.join("client");
        std::fs::create_dir_all(&client_dir)?;
        let config = mesh.client_config(&keys.config);
        std::fs::write(client_dir.join("cluster.json"), config.to_json()?)?;
        std::fs::write(client_dir.join("client-1.json"), keys.clients[0].to_json()?)?;
        let mut c = Cluster {
            work: work.to_path_buf(),
            replica_bin: sibling("bftfs-replica")?,
            mesh,
            children: Vec::new(),
        };
        for i in 0..4 {
            let child = c.spawn(i)?;
            c.children.push(Some(child));
        }
        replica::localhost::wait_until_serving(
            c.children.iter_mut().map(Option::as_mut),
            &c.mesh.real,
            |i| work.join(format!("replica-{i}.log")),
            Duration::from_secs(60),
        )?;
        Ok(c)
    }

    fn spawn(&self, i: usize) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join(format!("replica-{i}.log")))?;
        Ok(Command::new(&self.replica_bin)
            .arg("--config")
            .arg(self.work.join(format!("cluster-{i}.json")))
            .arg("--secrets")
            .arg(self.work.join(format!("replica-{i}.json")))
            .arg("--data-dir")
            .arg(self.work.join(format!("data-{i}")))
            .env(
                "RUST_LOG",
                std::env::var("REPLICA_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?)
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn isolate(&self, k: usize, cut: bool) {
        self.mesh.isolate(k, cut);
    }

    fn statuses(&self) -> Vec<Option<ReplicaStatus>> {
        self.mesh.real.iter().map(|a| probe(a)).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Four replicas answer, exactly one primary in an active view, no one more than a few
/// batches behind.
fn whole(all: &[Option<ReplicaStatus>]) -> bool {
    let best = highest_executed(all);
    all.iter().all(|s| {
        s.as_ref()
            .is_some_and(|s| s.last_executed + 16 >= best && !s.transferring_state)
    }) && all
        .iter()
        .flatten()
        .filter(|s| s.primary && s.view_active)
        .count()
        == 1
}

fn bftfs(bin: &Path, xdg: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("XDG_DATA_HOME", xdg)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("bftfs {:?} failed: {text}", args);
    }
    Ok(text)
}

/// One PostMark run in `dir` (300 files, 1500 transactions, 4 subdirectories, `seed`): its
/// exit status and what it printed, or why it could not be waited for; Err if it could not
/// be started.
fn postmark(dir: &Path, seed: u32) -> Result<std::io::Result<(bool, String)>, String> {
    let mut child = Command::new("postmark")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start postmark: {e}"))?;
    let script = format!(
        "set location {}\nset number 300\nset transactions 1500\nset subdirectories 4\nset seed {seed}\nrun\nquit\n",
        dir.display(),
    );
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(script.as_bytes());
    }
    Ok(child.wait_with_output().map(|out| {
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), report)
    }))
}

fn postmark_rounds(dir: PathBuf, stop: Arc<AtomicBool>) -> (u32, Vec<String>) {
    let (mut rounds, mut failures) = (0u32, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let _ = std::fs::create_dir_all(&dir);
        match postmark(&dir, 1 + rounds) {
            Err(cannot_start) => {
                failures.push(cannot_start);
                break;
            }
            Ok(Ok((true, report))) if report.contains("Deleting files...Done") => rounds += 1,
            Ok(Ok((_, report))) => {
                failures.push(format!(
                    "round {}: {}",
                    rounds + 1,
                    report.lines().rev().take(4).collect::<Vec<_>>().join(" | ")
                ));
                // Start the next round from an empty directory.
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(Err(e)) => failures.push(format!("postmark: {e}")),
        }
    }
    (rounds, failures)
}

pub fn run(args: Args) -> Result<()> {
    let bftfs_bin = sibling("bftfs")?;
    let tmp = tempfile::Builder::new()
        .prefix("bftfs-chaos")
        .tempdir_in(&args.dir)?;
    let work = tmp.path().to_path_buf();
    let (mnt, xdg) = (work.join("mnt"), work.join("xdg"));
    std::fs::create_dir_all(&mnt)?;
    println!("chaos: working directory {}", work.display());
    let mut cluster = Cluster::start(&work)?;
    let config = work.join("client/cluster.json");
    bftfs(
        &bftfs_bin,
        &xdg,
        &[
            "mount".as_ref(),
            config.as_os_str(),
            mnt.as_os_str(),
            "--detach".as_ref(),
        ],
    )?;
    struct Unmount(PathBuf, PathBuf, PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new(&self.0)
                .args(["umount".as_ref(), self.1.as_os_str(), "--lazy".as_ref()])
                .env("XDG_DATA_HOME", &self.2)
                .output();
        }
    }
    let _unmount = Unmount(bftfs_bin.clone(), mnt.clone(), xdg.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stop, dir, seed) = (stop.clone(), mnt.join("verify"), args.seed);
        std::thread::spawn(move || -> Result<Workload> {
            let mut w = Workload::new(&dir, 24, seed)?;
            while !stop.load(Ordering::Relaxed) {
                if w.step().is_err() {
                    w.resync();
                }
            }
            let _ = w.verify_listing();
            Ok(w)
        })
    };
    let postmark = (!args.no_postmark).then(|| {
        let (stop, dir) = (stop.clone(), mnt.join("pm"));
        std::thread::spawn(move || postmark_rounds(dir, stop))
    });

    let start = Instant::now();
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let mut faults = Faults::default();
    let mut slow_recoveries = 0;
    let mut kind = 0usize;
    let mut recoveries: Vec<f64> = Vec::new();
    let mut fault_ended: Option<Instant> = None;
    while start.elapsed() < run_for {
        if let Some(t) = fault_ended.take() {
            // How long the cluster takes to be whole again after a fault ends.
            while !whole(&cluster.statuses()) && t.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(250));
            }
            recoveries.push(t.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_secs_f64(args.fault_every));
        let wait = Instant::now();
        let mut all = cluster.statuses();
        while !whole(&all) {
            if wait.elapsed() > Duration::from_secs(120) {
                slow_recoveries += 1;
                println!(
                    "{:>7.1}s: the cluster is not whole 2 min after the last fault: {all:?}",
                    start.elapsed().as_secs_f64()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
            all = cluster.statuses();
        }
        if !whole(&all) {
            continue;
        }
        let primary = all
            .iter()
            .flatten()
            .find(|s| s.primary)
            .map(|s| s.id as usize)
            .unwrap_or(0);
        let backup = (primary + 1 + (kind / 4) % 3) % 4;
        let t = start.elapsed().as_secs_f64();
        match kind % 4 {
            0 | 1 => {
                let victim = if kind % 4 == 0 { backup } else { primary };
                cluster.kill(victim);
                println!(
                    "{t:>7.1}s: SIGKILL replica {victim} ({})",
                    if victim == primary {
                        "primary"
                    } else {
                        "backup"
                    }
                );
                if victim == primary {
                    faults.kill_primary += 1;
                } else {
                    faults.kill_backup += 1;
                }
                std::thread::sleep(Duration::from_secs(1));
                let child = cluster.spawn(victim)?;
                cluster.children[victim] = Some(child);
            }
            _ => {
                let victim = if kind % 4 == 2 { backup } else { primary };
                cluster.isolate(victim, true);
                println!(
                    "{t:>7.1}s: cut off replica {victim} ({}) for {}s",
                    if victim == primary {
                        "primary"
                    } else {
                        "backup"
                    },
                    args.cut_seconds
                );
                if victim == primary {
                    faults.cut_primary += 1;
                } else {
                    faults.cut_backup += 1;
                }
                std::thread::sleep(Duration::from_secs_f64(args.cut_seconds));
                cluster.isolate(victim, false);
            }
        }
        fault_ended = Some(Instant::now());
        kind += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let w = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the workload thread panicked"))??;
    let (postmark_rounds, postmark_failures) = postmark
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();

    // The replicas must end in the same state; a little traffic lets one that missed the last
    // batches hear of them.
    let converge = Instant::now();
    let mut all = cluster.statuses();
    let agree = |all: &[Option<ReplicaStatus>]| {
        all.iter().all(|s| {
            s.as_ref().is_some_and(|s| {
                all[0].as_ref().is_some_and(|f| {
                    f.last_executed == s.last_executed && f.stable_checkpoint == s.stable_checkpoint
                })
            })
        })
    };
    let mut nudge = 0;
    while !agree(&all) && converge.elapsed() < Duration::from_secs(120) {
        let _ = std::fs::write(mnt.join(format!("nudge-{nudge}")), b"x");
        nudge += 1;
        std::thread::sleep(Duration::from_millis(1000));
        all = cluster.statuses();
    }
    let replicas_agree = agree(&all);
    recoveries.sort_by(f64::total_cmp);
    let c: &Counts = &w.counts;
    let figures = Figures {
        minutes: start.elapsed().as_secs_f64() / 60.0,
        faults,
        operations: c.ops,
        writes: c.writes,
        truncates: c.truncates,
        renames: c.renames,
        removes: c.removes,
        fsyncs: c.fsyncs,
        verified_reads: c.reads,
        bytes_written: c.bytes_written,
        errors: c.errors,
        mismatches: c.mismatches,
        problems: w.problems.clone(),
        postmark_rounds,
        postmark_failures,
        final_view: all.iter().flatten().map(|s| s.view).max().unwrap_or(0),
        view_changes_started: all.iter().flatten().map(|s| s.view_changes).sum(),
        state_transfers: all.iter().flatten().map(|s| s.state_transfers).sum(),
        slow_recoveries,
        recovery_seconds_median: recoveries.get(recoveries.len() / 2).copied().unwrap_or(0.0),
        recovery_seconds_max: recoveries.last().copied().unwrap_or(0.0),
        final_executed: all
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.last_executed))
            .collect(),
        final_checkpoint: all
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.stable_checkpoint))
            .collect(),
        replicas_agree,
    };
    let json = serde_json::to_string_pretty(&figures)?;
    println!("{json}");
    std::fs::write(&args.out, &json).with_context(|| format!("writing {}", args.out.display()))?;
    bftfs(&bftfs_bin, &xdg, &["umount".as_ref(), mnt.as_os_str()])?;
    drop(cluster);
    // A slow recovery is reported, not a failure: the cluster kept answering (with one
    // replica out) and the next fault simply waited. Wrong or lost data, failed calls or
    // replicas that never converge are failures.
    if figures.slow_recoveries > 0 {
        println!("warning: {} time(s) the cluster was not whole 2 min after a fault (see the lines above)", figures.slow_recoveries);
    }
    let ok = figures.errors == 0
        && figures.mismatches == 0
        && figures.postmark_failures.is_empty()
        && replicas_agree;
    if !ok {
        // Keep the logs of a failed run.
        let kept = tmp.keep();
        bail!("chaos run failed; logs kept in {}", kept.display());
    }
    Ok(())
}
