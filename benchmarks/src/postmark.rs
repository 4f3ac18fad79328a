//! `bftfs-bench postmark`: the real PostMark (Debian's `postmark`) against bftfs and its peers
//! in one session.
//!
//! In: a PostMark configuration (`std`, `paper` or a file of `set` commands), the targets, the
//! number of rounds. Out: per target the median (and min–max) of transactions/s, files
//! created/s and total seconds, the ratio of transactions/s to a baseline, and CSV, JSON and a
//! PNG chart in `--out`.
//!
//! Every target is set up once (bftfs clusters started with `bftfs up --detach`, tmpfs and
//! bindfs mounted) and torn down at the end, also on error. Each round runs PostMark once per
//! target, in a fresh directory, with the order of targets rotated from round to round so that
//! no target always runs first. PostMark's own timer counts whole seconds, so its output is
//! read unbuffered (`stdbuf -o0`) and the phases are timed here: creation from "Creating
//! files" to "Performing transactions", transactions from there to "Deleting files", and the
//! whole process.

use crate::report::{self, median_min_max, Bar};
use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{geteuid, Pid};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const ALL_TARGETS: &str =
    "bftfs,bftfs-locked,bftfs-auto,bftfs-sync,bftfs-commit,bftfs-n1,tmpfs,localdir,bindfs,glusterfs";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// `std` (2000 files, 10000 transactions), `paper` (5000 files, 20000 transactions), or a
    /// file of PostMark `set` commands (its `set location`, `run` and `quit` are ignored).
    #[arg(long, default_value = "std")]
    pub config: String,
    /// Comma-separated targets: bftfs (f=1, default write mode, no Zzyzx locks), bftfs-locked
    /// (the same, PostMark's directory under `bftfs lock`), bftfs-auto (`-o locks=auto`),
    /// bftfs-sync (f=1, -o sync),
    /// bftfs-commit (f=1 without the fast path), bftfs-n1, tmpfs, localdir, bindfs, glusterfs.
    #[arg(long, default_value = ALL_TARGETS)]
    pub targets: String,
    /// Rounds; each runs PostMark once on every target.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the CSV, JSON and PNG go.
    #[arg(long, default_value = "benchmarks/results")]
    pub out: PathBuf,
    /// Target the ratios are taken against (default: tmpfs if measured, else localdir, else
    /// the first target).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Directory on the root file system for localdir, bindfs's backing directory and the
    /// mount points (default /var/tmp).
    #[arg(long, default_value = "/var/tmp")]
    pub work_dir: PathBuf,
    /// Only redraw the PNG chart from a JSON file an earlier run wrote (next to it).
    #[arg(long)]
    pub replot: Option<PathBuf>,
}

/// A PostMark configuration: the `set` lines and the two numbers the rates need.
#[derive(Debug, Clone)]
struct Config {
    name: String,
    commands: Vec<String>,
    files: u64,
    transactions: u64,
}

fn config_of(name: &str) -> Result<Config> {
    let standard = |files: u64, transactions: u64| Config {
        name: name.to_string(),
        commands: vec![
            format!("set number {files}"),
            format!("set transactions {transactions}"),
            "set size 500 10000".into(),
            "set subdirectories 10".into(),
            "set read 4096".into(),
            "set write 4096".into(),
            "set buffering false".into(),
            "set seed 42".into(),
        ],
        files,
        transactions,
    };
    match name {
        "std" => Ok(standard(2000, 10_000)),
        "paper" => Ok(standard(5000, 20_000)),
        path => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--config {path}: not std, paper or a readable file"))?;
            // PostMark's defaults, overridden by the file.
            let (mut files, mut transactions) = (500, 500);
            let mut commands = Vec::new();
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["set", "location", ..] | ["run"] | ["quit"] => continue,
                    ["set", "number", n] => {
                        files = n.parse().with_context(|| format!("bad line {line:?}"))?
                    }
                    ["set", "transactions", n] => {
                        transactions = n.parse().with_context(|| format!("bad line {line:?}"))?
                    }
                    ["set", ..] => {}
                    _ => bail!("--config {path}: only `set` commands are allowed, found {line:?}"),
                }
                commands.push(line.to_string());
            }
            let name = Path::new(path)
                .file_stem()
                .map_or("custom".into(), |s| s.to_string_lossy().into_owned());
            Ok(Config {
                name,
                commands,
                files,
                transactions,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targets

/// A file system to measure, set up for the session; torn down on drop.
pub(crate) struct Target {
    pub(crate) name: String,
    /// Directory PostMark works in (each round in a fresh subdirectory).
    pub(crate) dir: PathBuf,
    teardown: Vec<Teardown>,
    pub(crate) description: String,
}

enum Teardown {
    BftfsDown {
        bftfs: PathBuf,
        mountpoint: PathBuf,
    },
    Umount(PathBuf),
    RemoveDir(PathBuf),
    Gluster {
        volume: String,
    },
    /// glusterd started by the tool: stopped by the pid it wrote.
    KillGlusterd(PathBuf),
}

impl Drop for Target {
    fn drop(&mut self) {
        for step in self.teardown.iter().rev() {
            let result = match step {
                Teardown::BftfsDown { bftfs, mountpoint } => Command::new(bftfs)
                    .arg("down")
                    .arg(mountpoint)
                    .stdout(Stdio::null())
                    .status()
                    .map(|s| s.success()),
                Teardown::Umount(dir) => Command::new("umount")
                    .arg(dir)
                    .status()
                    .map(|s| s.success()),
                Teardown::RemoveDir(dir) => {
                    let _ = std::fs::remove_dir_all(dir);
                    Ok(true)
                }
                Teardown::Gluster { volume } => {
                    let stop = Command::new("gluster")
                        .args(["--mode=script", "volume", "stop", volume, "force"])
                        .status();
                    let delete = Command::new("gluster")
                        .args(["--mode=script", "volume", "delete", volume])
                        .status();
                    stop.and(delete).map(|s| s.success())
                }
                Teardown::KillGlusterd(pid_file) => {
                    let pid = std::fs::read_to_string(pid_file)
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok());
                    if let Some(pid) = pid.filter(|p| *p > 0) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                    }
                    Ok(pid.is_some())
                }
            };
            if !matches!(result, Ok(true)) {
                eprintln!(
                    "warning: teardown of {} did not complete cleanly ({:?})",
                    self.name,
                    result.err()
                );
            }
        }
    }
}

pub(crate) enum Setup {
    Ready(Target),
    Skipped(String),
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `bftfs` next to this executable, else on PATH.
fn find_bftfs() -> Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("bftfs")));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return Ok(p);
    }
    which("bftfs").context(
        "the bftfs binary is neither next to bftfs-bench nor on PATH: build it with \
         `cargo build --release -p fs-client -p replica --bins`",
    )
}

fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn is_mountpoint(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    mounts.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|m| Path::new(m) == dir)
    })
}

fn scratch(work_dir: &Path, tag: &str) -> Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("bftfs-bench-{tag}-"))
        .tempdir_in(work_dir)
        .with_context(|| format!("creating a directory in {}", work_dir.display()))?
        .keep();
    Ok(dir)
}

/// Sets up target `name`; `work_dir` as [`Args::work_dir`].
pub(crate) fn set_up_in(name: &str, work_dir: &Path) -> Result<Setup> {
    let args = Args {
        config: "std".into(),
        targets: name.into(),
        runs: 1,
        out: PathBuf::new(),
        baseline: None,
        work_dir: work_dir.to_path_buf(),
        replot: None,
    };
    set_up(name, &args)
}

fn set_up(name: &str, args: &Args) -> Result<Setup> {
    let is_root = geteuid().is_root();
    match name {
        "bftfs" | "bftfs-locked" | "bftfs-auto" | "bftfs-sync" | "bftfs-commit" | "bftfs-n1" => {
            let bftfs = match find_bftfs() {
                Ok(b) => b,
                Err(e) => return Ok(Setup::Skipped(format!("{e:#}"))),
            };
            if !Path::new("/dev/fuse").exists() {
                return Ok(Setup::Skipped(
                    "/dev/fuse is missing (FUSE unavailable)".into(),
                ));
            }
            let base = scratch(&args.work_dir, name)?;
            let mut target = Target {
                name: name.into(),
                dir: base.join("mnt"),
                teardown: vec![Teardown::RemoveDir(base.clone())],
                description: String::new(),
            };
            std::fs::create_dir(&target.dir)?;
            let f = if name == "bftfs-n1" { "0" } else { "1" };
            let mut up = Command::new(&bftfs);
            up.arg("up")
                .arg(&target.dir)
                .args(["--f", f, "--detach", "--data-dir"])
                .arg(base.join("data"));
            if name == "bftfs-commit" {
                up.arg("--no-fast-path");
            }
            if name == "bftfs-sync" {
                up.args(["-o", "sync"]);
            }
            // Every call ordered (the baseline of the ordered path) unless the target is
            // about locks: `bftfs-locked` takes one by hand, `bftfs-auto` lets the mount
            // take them (`-o locks=auto`).
            match name {
                "bftfs-locked" => up.args(["-o", "locks=manual"]),
                "bftfs-auto" => up.args(["-o", "locks=auto"]),
                _ => up.args(["-o", "locks=off"]),
            };
            run_checked(&mut up, &format!("bftfs up --f {f}"))?;
            target.teardown.push(Teardown::BftfsDown {
                bftfs: bftfs.clone(),
                mountpoint: target.dir.clone(),
            });
            wait_mounted(&target.dir)?;
            if name == "bftfs-locked" || name == "bftfs-auto" {
                // PostMark works in a directory below the mount's root (automatic locks never
                // take the root); `bftfs-locked` locks it by hand first.
                let work = target.dir.join("work");
                std::fs::create_dir(&work)?;
                if name == "bftfs-locked" {
                    run_checked(Command::new(&bftfs).arg("lock").arg(&work), "bftfs lock")?;
                }
                target.dir = work;
            }
            target.description = match name {
                "bftfs" => "bftfs -o locks=off, f=1: 4 bftfs-replica processes on 127.0.0.1 (data on the root fs), fast path, default write mode (write-back), every call ordered".into(),
                "bftfs-locked" => "bftfs, f=1, as `bftfs`, with PostMark's directory under a Zzyzx lock (`bftfs lock`): its calls go through the lock's log, one round trip, no agreement".into(),
                "bftfs-auto" => "bftfs -o locks=auto, f=1: as `bftfs` but the mount takes Zzyzx locks itself, PostMark in a directory below the root".into(),
                "bftfs-sync" => "bftfs -o sync, f=1: the same, every write replicated before it returns".into(),
                "bftfs-commit" => "bftfs --no-fast-path, f=1: the same, commit path only".into(),
                _ => "bftfs --f 0: one in-process file service, no replication".into(),
            };
            Ok(Setup::Ready(target))
        }
        "tmpfs" => {
            let base = scratch(&args.work_dir, name)?;
            let mut target = Target {
                name: name.into(),
                dir: base.clone(),
                teardown: vec![Teardown::RemoveDir(base.clone())],
                description: String::new(),
            };
            let mounted = is_root
                && Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=4g", "tmpfs"])
                    .arg(&base)
                    .status()
                    .is_ok_and(|s| s.success());
            if mounted {
                target.teardown.push(Teardown::Umount(base.clone()));
                target.description = "tmpfs mounted by the tool".into();
            } else {
                let shm = tempfile::Builder::new()
                    .prefix("bftfs-bench-tmpfs-")
                    .tempdir_in("/dev/shm")?
                    .keep();
                target.teardown.push(Teardown::RemoveDir(shm.clone()));
                target.dir = shm;
                target.description = "a directory in /dev/shm (tmpfs)".into();
            }
            Ok(Setup::Ready(target))
        }
        "localdir" => {
            let base = scratch(&args.work_dir, name)?;
            Ok(Setup::Ready(Target {
                name: name.into(),
                dir: base.clone(),
                teardown: vec![Teardown::RemoveDir(base)],
                description: format!(
                    "a directory in {} (root file system)",
                    args.work_dir.display()
                ),
            }))
        }
        "bindfs" => {
            let Some(bindfs) = which("bindfs") else {
                return Ok(Setup::Skipped(
                    "bindfs is not installed: apt-get install -y bindfs".into(),
                ));
            };
            let base = scratch(&args.work_dir, name)?;
            let (backing, mnt) = (base.join("backing"), base.join("mnt"));
            std::fs::create_dir(&backing)?;
            std::fs::create_dir(&mnt)?;
            let mut target = Target {
                name: name.into(),
                dir: mnt.clone(),
                teardown: vec![Teardown::RemoveDir(base)],
                description: String::new(),
            };
            run_checked(Command::new(bindfs).arg(&backing).arg(&mnt), "bindfs")?;
            target.teardown.push(Teardown::Umount(mnt.clone()));
            wait_mounted(&mnt)?;
            target.description = format!("bindfs over a directory in {}", args.work_dir.display());
            Ok(Setup::Ready(target))
        }
        "glusterfs" => {
            if which("glusterd").is_none() || which("gluster").is_none() {
                return Ok(Setup::Skipped(
                    "glusterfs-server is not installed: apt-get install -y glusterfs-server glusterfs-client".into(),
                ));
            }
            if !is_root {
                return Ok(Setup::Skipped(
                    "glusterfs needs root to run glusterd and mount".into(),
                ));
            }
            set_up_gluster(args).map(Setup::Ready)
        }
        other => bail!("unknown target {other:?} (known: {ALL_TARGETS})"),
    }
}

/// GlusterFS replica 3 with three bricks on this machine (127.0.0.2: its CLI refuses
/// 127.0.0.1), mounted with its FUSE client.
fn set_up_gluster(args: &Args) -> Result<Target> {
    let base = scratch(&args.work_dir, "glusterfs")?;
    let mut target = Target {
        name: "glusterfs".into(),
        dir: base.join("mnt"),
        teardown: vec![Teardown::RemoveDir(base.clone())],
        description: "GlusterFS replica 3, three bricks on 127.0.0.2, FUSE client".into(),
    };
    std::fs::create_dir(&target.dir)?;
    let running = Command::new("pgrep")
        .args(["-x", "glusterd"])
        .status()
        .is_ok_and(|s| s.success());
    if !running {
        let pid_file = base.join("glusterd.pid");
        run_checked(
            Command::new("glusterd").arg(format!("--pid-file={}", pid_file.display())),
            "glusterd",
        )?;
        target.teardown.push(Teardown::KillGlusterd(pid_file));
        std::thread::sleep(Duration::from_secs(2));
    }
    let volume = format!("bftfsbench{}", std::process::id());
    let mut create = Command::new("gluster");
    create.args(["--mode=script", "volume", "create", &volume, "replica", "3"]);
    for i in 0..3 {
        let brick = base.join(format!("brick{i}"));
        std::fs::create_dir(&brick)?;
        create.arg(format!("127.0.0.2:{}", brick.display()));
    }
    create.arg("force");
    run_checked(&mut create, "gluster volume create")?;
    target.teardown.push(Teardown::Gluster {
        volume: volume.clone(),
    });
    run_checked(
        Command::new("gluster").args(["--mode=script", "volume", "start", &volume]),
        "gluster volume start",
    )?;
    run_checked(
        Command::new("mount")
            .args(["-t", "glusterfs", &format!("127.0.0.2:/{volume}")])
            .arg(&target.dir),
        "mount -t glusterfs",
    )?;
    target.teardown.push(Teardown::Umount(target.dir.clone()));
    Ok(target)
}

fn wait_mounted(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mountpoint(dir) {
        if Instant::now() > deadline {
            bail!("{} is not mounted after 30 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One PostMark run

#[derive(Debug, Clone, serde::Serialize)]
struct Measurement {
    target: String,
    round: usize,
    total_seconds: f64,
    create_seconds: f64,
    transaction_seconds: f64,
    delete_seconds: f64,
    transactions_per_second: f64,
    files_created_per_second: f64,
    postmark_reported_seconds: Option<u64>,
}

/// Runs PostMark in `dir`, timing its phases from its unbuffered output.
fn run_postmark(
    config: &Config,
    dir: &Path,
    on_phase: &dyn Fn(&str),
) -> Result<(f64, f64, f64, f64, Option<u64>)> {
    let stdbuf = which("stdbuf");
    let mut command = match &stdbuf {
        Some(s) => {
            let mut c = Command::new(s);
            c.args(["-o0", "postmark"]);
            c
        }
        None => Command::new("postmark"),
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting postmark (Debian: apt-get install -y postmark)")?;
    let started = Instant::now();
    {
        let mut stdin = child.stdin.take().context("postmark stdin")?;
        writeln!(stdin, "set location {}", dir.display())?;
        for c in &config.commands {
            writeln!(stdin, "{c}")?;
        }
        writeln!(stdin, "run")?;
        writeln!(stdin, "quit")?;
    }
    let mut stdout = child.stdout.take().context("postmark stdout")?;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let markers = [
        "Creating files",
        "Performing transactions",
        "Deleting files",
        "Time:",
    ];
    let mut at: [Option<f64>; 4] = [None; 4];
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let now = started.elapsed().as_secs_f64();
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        for (i, m) in markers.iter().enumerate() {
            if at[i].is_none() && text.contains(m) {
                at[i] = Some(now);
                on_phase(m);
            }
        }
    }
    let status = child.wait()?;
    let total = started.elapsed().as_secs_f64();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    if !status.success() || at[3].is_none() || text.contains("Error") {
        bail!(
            "postmark failed in {} ({status}): {}{}",
            dir.display(),
            text.trim(),
            stderr.trim()
        );
    }
    let reported = text
        .lines()
        .find(|l| l.contains("seconds total"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    let (create, transactions, delete) = match (at[0], at[1], at[2], at[3]) {
        (Some(c), Some(t), Some(d), Some(end)) if stdbuf.is_some() => (t - c, d - t, end - d),
        // Without stdbuf the output arrives at exit: only the total is known.
        _ => (f64::NAN, total, f64::NAN),
    };
    Ok((total, create, transactions, delete, reported))
}

// ---------------------------------------------------------------------------------------------

/// Redraws the chart of an earlier run from its JSON.
fn replot(json_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("parsing the JSON")?;
    let number = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
    let bars: Vec<Bar> = v["summary"]
        .as_array()
        .context("no summary in the JSON")?
        .iter()
        .filter(|s| s["runs"].as_u64().unwrap_or(0) > 0)
        .map(|s| Bar {
            label: s["target"].as_str().unwrap_or("?").to_string(),
            median: number(&s["transactions_per_second"][0]),
            min: number(&s["transactions_per_second"][1]),
            max: number(&s["transactions_per_second"][2]),
        })
        .collect();
    let title = format!(
        "PostMark {}: transactions/s (median, min-max of {} rounds)",
        v["config"]["name"].as_str().unwrap_or("?"),
        v["runs"]
    );
    let png = json_path.with_extension("png");
    report::bar_chart_png(&png, &title, "transactions/s", &bars)?;
    println!("wrote {}", png.display());
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    if let Some(json) = &args.replot {
        return replot(json);
    }
    let config = config_of(&args.config)?;
    if which("postmark").is_none() {
        bail!("postmark is not installed: apt-get install -y postmark");
    }
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

    // Targets are dropped (torn down) when this function returns, also on error.
    let mut targets: Vec<Target> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for name in &names {
        eprintln!("setting up {name} ...");
        match set_up(name, &args) {
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

    let bar = indicatif::ProgressBar::new((targets.len() * args.runs) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut measurements: Vec<Measurement> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for round in 0..args.runs {
        for k in 0..targets.len() {
            let target = &targets[(k + round) % targets.len()];
            let dir = target.dir.join(format!("postmark-{round}"));
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let label = format!("round {}/{} {}", round + 1, args.runs, target.name);
            bar.set_message(format!("{label}: starting"));
            let phase = |p: &str| bar.set_message(format!("{label}: {p}"));
            match run_postmark(&config, &dir, &phase) {
                Ok((total, create, transactions, delete, reported)) => {
                    let m = Measurement {
                        target: target.name.clone(),
                        round: round + 1,
                        total_seconds: total,
                        create_seconds: create,
                        transaction_seconds: transactions,
                        delete_seconds: delete,
                        transactions_per_second: config.transactions as f64 / transactions,
                        files_created_per_second: config.files as f64 / create,
                        postmark_reported_seconds: reported,
                    };
                    say(
                        &bar,
                        format!(
                            "{label}: {:.0} transactions/s, {:.0} files created/s, {:.1} s total",
                            m.transactions_per_second, m.files_created_per_second, m.total_seconds
                        ),
                    );
                    measurements.push(m);
                }
                Err(e) => {
                    say(&bar, format!("{label}: FAILED: {e:#}"));
                    failures.push(format!("{label}: {e:#}"));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let measured: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let baseline = args
        .baseline
        .clone()
        .or_else(|| {
            ["tmpfs", "localdir"]
                .iter()
                .find(|b| measured.contains(b))
                .map(|s| s.to_string())
        })
        .unwrap_or_else(|| measured[0].to_string());
    let summary = summarize(&targets, &measurements, &baseline);
    print_summary(
        &args, &config, &targets, &summary, &skipped, &failures, &baseline,
    );
    write_files(
        &args,
        &config,
        &targets,
        &measurements,
        &summary,
        &skipped,
        &failures,
        &baseline,
    )?;
    drop(targets);
    if !failures.is_empty() {
        bail!("{} PostMark run(s) failed", failures.len());
    }
    Ok(())
}

/// A line above the progress bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

#[derive(serde::Serialize)]
struct Summary {
    target: String,
    runs: usize,
    transactions_per_second: (f64, f64, f64),
    files_created_per_second: (f64, f64, f64),
    total_seconds: (f64, f64, f64),
    ratio_to_baseline: f64,
}

fn summarize(targets: &[Target], measurements: &[Measurement], baseline: &str) -> Vec<Summary> {
    let of = |name: &str, f: fn(&Measurement) -> f64| -> Vec<f64> {
        measurements
            .iter()
            .filter(|m| m.target == name)
            .map(f)
            .collect()
    };
    let nan3 = (f64::NAN, f64::NAN, f64::NAN);
    let base_tps = median_min_max(&of(baseline, |m: &Measurement| m.transactions_per_second))
        .map_or(f64::NAN, |t| t.0);
    targets
        .iter()
        .map(|t| {
            let tps = median_min_max(&of(&t.name, |m: &Measurement| m.transactions_per_second))
                .unwrap_or(nan3);
            Summary {
                target: t.name.clone(),
                runs: of(&t.name, |m: &Measurement| m.total_seconds).len(),
                transactions_per_second: tps,
                files_created_per_second: median_min_max(&of(&t.name, |m: &Measurement| {
                    m.files_created_per_second
                }))
                .unwrap_or(nan3),
                total_seconds: median_min_max(&of(&t.name, |m: &Measurement| m.total_seconds))
                    .unwrap_or(nan3),
                ratio_to_baseline: tps.0 / base_tps,
            }
        })
        .collect()
}

fn print_summary(
    args: &Args,
    config: &Config,
    targets: &[Target],
    summary: &[Summary],
    skipped: &[(String, String)],
    failures: &[String],
    baseline: &str,
) {
    println!(
        "PostMark {} ({} files, {} transactions), {} round(s), medians with [min–max]",
        config.name, config.files, config.transactions, args.runs
    );
    println!();
    println!("| target | runs | transactions/s | files created/s | total s | tx/s vs {baseline} |");
    println!("|---|---:|---:|---:|---:|---:|");
    for s in summary {
        let (t, c, total) = (
            s.transactions_per_second,
            s.files_created_per_second,
            s.total_seconds,
        );
        println!(
            "| {} | {} | {:.0} [{:.0}–{:.0}] | {:.0} [{:.0}–{:.0}] | {:.1} [{:.1}–{:.1}] | {:.3} |",
            s.target,
            s.runs,
            t.0,
            t.1,
            t.2,
            c.0,
            c.1,
            c.2,
            total.0,
            total.1,
            total.2,
            s.ratio_to_baseline
        );
    }
    for (name, why) in skipped {
        println!("| {name} | skipped: {why} | | | | |");
    }
    println!();
    for t in targets {
        println!("{}: {}", t.name, t.description);
    }
    for f in failures {
        println!("FAILED {f}");
    }
}

#[allow(clippy::too_many_arguments)]
fn write_files(
    args: &Args,
    config: &Config,
    targets: &[Target],
    measurements: &[Measurement],
    summary: &[Summary],
    skipped: &[(String, String)],
    failures: &[String],
    baseline: &str,
) -> Result<()> {
    let stem = args.out.join(format!("postmark-{}", config.name));
    let csv_path = stem.with_extension("csv");
    let mut csv = String::from(
        "target,round,total_seconds,create_seconds,transaction_seconds,delete_seconds,transactions_per_second,files_created_per_second,postmark_reported_seconds\n",
    );
    for m in measurements {
        csv.push_str(&format!(
            "{},{},{:.3},{:.3},{:.3},{:.3},{:.1},{:.1},{}\n",
            report::csv_field(&m.target),
            m.round,
            m.total_seconds,
            m.create_seconds,
            m.transaction_seconds,
            m.delete_seconds,
            m.transactions_per_second,
            m.files_created_per_second,
            m.postmark_reported_seconds
                .map_or(String::new(), |s| s.to_string())
        ));
    }
    std::fs::write(&csv_path, csv).with_context(|| format!("writing {}", csv_path.display()))?;
    let json_path = stem.with_extension("json");
    let json = serde_json::json!({
        "when": report::utc_now(),
        "config": { "name": config.name, "commands": config.commands },
        "runs": args.runs,
        "baseline": baseline,
        "targets": targets.iter().map(|t| serde_json::json!({"name": t.name, "description": t.description})).collect::<Vec<_>>(),
        "skipped": skipped.iter().map(|(n, w)| serde_json::json!({"target": n, "why": w})).collect::<Vec<_>>(),
        "failures": failures,
        "summary": summary,
        "measurements": measurements,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let png_path = stem.with_extension("png");
    let bars: Vec<Bar> = summary
        .iter()
        .filter(|s| s.runs > 0)
        .map(|s| Bar {
            label: s.target.clone(),
            median: s.transactions_per_second.0,
            min: s.transactions_per_second.1,
            max: s.transactions_per_second.2,
        })
        .collect();
    let title = format!(
        "PostMark {}: transactions/s (median, min-max of {} rounds)",
        config.name, args.runs
    );
    match report::bar_chart_png(&png_path, &title, "transactions/s", &bars) {
        Ok(()) => println!(
            "wrote {}, {}, {}",
            csv_path.display(),
            json_path.display(),
            png_path.display()
        ),
        Err(e) => println!(
            "wrote {}, {}; no chart: {e:#}",
            csv_path.display(),
            json_path.display()
        ),
    }
    Ok(())
}
