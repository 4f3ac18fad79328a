//! `bftfs-bench micro`: the protocol micro-benchmarks (null operation, 4 KiB read, 4 KiB write).
//!
//! In: the workloads, how long to measure, how many client identities and concurrent callers
//! per client, how many rounds, the request payload. Out: ops/s and latency (p50, p99) of each
//! workload replicated with n=4 (f=1) against the same service unreplicated (n=1), measured in
//! one run with the configurations interleaved round by round; the median of the rounds, the
//! ratio n=4 / n=1, and where the CPU time goes.
//!
//! Workloads (`--workload`, default all three):
//! - `null`: `KvService` has no no-op, so it is a `Get` of a missing key sent as an ordered
//!   (not read-only) request; the key is `--payload` bytes long, so the payload travels in the
//!   request. Execution is a hash and a map lookup: what is measured is ordering.
//!   `--read-only` also measures the same `Get` on the read-only (unordered) path.
//! - `write4k`: the file service (`FileService` over a real directory per replica, the service
//!   a mount uses): each caller overwrites 4 KiB blocks of its own 64 KiB file, ordered. This
//!   adds the request's 4 KiB to every message that carries the batch, the `pwrite` and the
//!   piece digest upkeep at each replica.
//! - `read4k`: the file service; each caller reads 4 KiB blocks of one shared 256 KiB file on
//!   the read-only path, as the mount's `read` does (2f+1 matching replies, no ordering).
//!
//! n=1: the baseline is [`StandIn`]: one server speaking the replicas' client protocol (the
//! same `ClientHandle`, framing, MACs and signed requests) that executes each request as soon
//! as it has authenticated it: what a client library costs with no replication at all.
//! `--f0-driver` measures n=1 through the replica driver and core instead (f=0: the primary
//! commits its own proposals, with its write-ahead log), which adds the core's batching and
//! the log's fsyncs to the baseline.
//!
//! Every round starts fresh: new keys, new ports on 127.0.0.1, a new temporary data directory
//! (one write-ahead log per replica), replicas on threads in this process (`node::run_with`),
//! `--clients` [`ClientHandle`]s each called by `--callers` threads, so that many requests are
//! in flight and the primary batches. Once every client has had one answer, the callers run
//! `--warmup` seconds unmeasured, then `--seconds` measured; only calls that complete inside
//! the measured window count. Around the window the replicas' status counters (batches,
//! requests, WAL fsyncs, frames) and the CPU time of every thread of this process (grouped by
//! thread name) are read, to show where the time goes.

use anyhow::{bail, Context, Result};
use replica::config::{generate_with_os_random, ClientSecrets, ClusterConfig, ProtocolConfig};
use replica::driver::client::ClientHandle;
use replica::driver::node;
use replica::driver::status::ReplicaStatus;
use replica::wire::{
    self, Authenticator, ClientMessage, Message, Principal, ReplicaId, Reply, View,
};
use state_abstraction::fs::{
    decode, encode, Caller, CreateHow, FileService, FsError, FsOp, FsReply, FsRequest, Handle,
};
use state_abstraction::kv::{KvOp, KvReply, KvService};
use state_abstraction::{ClientId, Service};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Measured seconds per round (after the warm-up).
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Unmeasured seconds per round before the measurement (batches and pipelines fill up).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Client identities (one `ClientHandle` each).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Concurrent callers (threads) per client. A client has at most `client_window` (64)
    /// requests in flight; more callers wait in its queue. The default 16 x 32 = 512 requests
    /// in flight keep `pipeline_batches_max` (4) full batches of `batch_requests_max` (64)
    /// going at the primary with as many waiting (8 x 32 left batches at about 43).
    #[arg(long, default_value_t = 32)]
    callers: usize,
    /// Rounds per configuration; configurations alternate within each round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Override `ProtocolConfig::batch_requests_max` (default: the protocol default).
    #[arg(long)]
    batch_max: Option<usize>,
    /// Override `ProtocolConfig::pipeline_batches_max` (default: the protocol default).
    #[arg(long)]
    pipeline: Option<u64>,
    /// Ordering paths to measure n=4 with (comma-separated): `fast` (Zyzzyva's speculative
    /// fast path, the default of `bftfs up`) and `commit` (`ProtocolConfig::fast_path` off:
    /// PBFT's three phases before any reply).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [OrderPath::Fast, OrderPath::Commit])]
    path: Vec<OrderPath>,
    /// Also measure n=4 on the fast path with one backup (replica 3) never started: the fast
    /// path needs all 3f+1, so every request falls back to the commit path after the client's
    /// wait for the missing reply.
    #[arg(long)]
    crashed: bool,
    /// Bytes of payload in each request (the length of the missing key that is read).
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// Also measure the read-only path (the same `Get`, sent read-only: no ordering; the client
    /// waits for 2f+1 matching replies).
    #[arg(long)]
    read_only: bool,
    /// Where the replicas' write-ahead logs go (a temporary directory is made inside). Give it
    /// more than once to measure n=4 once per directory in the same run (e.g. a disk and a
    /// tmpfs, where fsync is free); the unreplicated server keeps no log.
    #[arg(long, default_value = "/var/tmp")]
    dir: Vec<PathBuf>,
    /// Measure n=1 through the replica driver and core with f=0 (its own write-ahead log)
    /// instead of the stand-in unreplicated server.
    #[arg(long)]
    f0_driver: bool,
    /// Workloads to measure (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Workload::Null, Workload::Read4k, Workload::Write4k])]
    workload: Vec<Workload>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OrderPath {
    Fast,
    Commit,
}

/// What each call does (see the module doc).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    Null,
    Read4k,
    Write4k,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Null => "null op",
            Workload::Read4k => "4 KiB read",
            Workload::Write4k => "4 KiB write",
        }
    }
    fn file_service(self) -> bool {
        self != Workload::Null
    }
}

/// A prepared workload: what caller `caller` sends on its `i`-th call, and what a correct
/// answer looks like. Replies are checked on every call, so a wrong answer counts as a failed
/// call rather than as throughput.
struct Prepared {
    workload: Workload,
    callers_per_client: usize,
    null_op: Vec<u8>,
    /// Write4k: each caller's own file. Read4k: the one shared file.
    files: Vec<Handle>,
}

impl Workload {
    /// Creates the files the workload uses (ordered calls, before anything is measured).
    fn prepare(
        setup: Setup,
        payload: usize,
        handles: &[Arc<ClientHandle>],
        callers: usize,
        timeout: Duration,
    ) -> Result<Prepared> {
        let null_op = KvOp::Get {
            key: vec![0xA5; payload],
        }
        .encode();
        let mut prepared = Prepared {
            workload: setup.workload,
            callers_per_client: callers,
            null_op,
            files: Vec::new(),
        };
        fn fs_call(h: &ClientHandle, op: FsOp, timeout: Duration) -> Result<FsReply> {
            let reply = h
                .call(fs_request(op), false, timeout)
                .context("the cluster does not answer")?;
            decode::<Result<FsReply, FsError>>(&reply)
                .context("undecodable file service reply")?
                .map_err(|e| anyhow::anyhow!("{e}"))
        }
        fn create(h: &ClientHandle, name: String, timeout: Duration) -> Result<Handle> {
            let op = FsOp::Create {
                dir: Handle::ROOT,
                name: name.into_bytes(),
                mode: 0o644,
                how: CreateHow::Unchecked,
            };
            match fs_call(h, op, timeout)? {
                FsReply::Entry { handle, .. } => Ok(handle),
                other => bail!("create answered {other:?}"),
            }
        }
        match setup.workload {
            Workload::Null => {}
            Workload::Read4k => {
                let h = &handles[0];
                let file = create(h, "shared".into(), timeout)?;
                for b in 0..READ_FILE_BLOCKS {
                    fs_call(
                        h,
                        FsOp::Write {
                            h: file,
                            offset: b * BLOCK as u64,
                            data: block(b),
                        },
                        timeout,
                    )?;
                }
                prepared.files.push(file);
            }
            Workload::Write4k => {
                // One client thread each: creates are ordered calls, so run them concurrently.
                let made: Vec<JoinHandle<Result<Vec<Handle>>>> = handles
                    .iter()
                    .enumerate()
                    .map(|(c, h)| {
                        let h = h.clone();
                        std::thread::spawn(move || {
                            (0..callers)
                                .map(|k| create(&h, format!("w-{c}-{k}"), timeout))
                                .collect::<Result<Vec<Handle>>>()
                        })
                    })
                    .collect();
                for t in made {
                    prepared.files.extend(
                        t.join()
                            .map_err(|_| anyhow::anyhow!("a set-up thread panicked"))??,
                    );
                }
            }
        }
        Ok(prepared)
    }
}

impl Prepared {
    fn call(&self, caller: usize, i: u64) -> (Vec<u8>, bool) {
        match self.workload {
            Workload::Null => (self.null_op.clone(), false),
            Workload::Read4k => {
                let b = (caller as u64 + i) % READ_FILE_BLOCKS;
                (
                    fs_request(FsOp::Read {
                        h: self.files[0],
                        offset: b * BLOCK as u64,
                        count: BLOCK as u32,
                    }),
                    true,
                )
            }
            Workload::Write4k => {
                let b = i % WRITE_FILE_BLOCKS;
                (
                    fs_request(FsOp::Write {
                        h: self.files[caller],
                        offset: b * BLOCK as u64,
                        data: block(i),
                    }),
                    false,
                )
            }
        }
    }

    fn check(&self, reply: &[u8]) -> bool {
        match self.workload {
            Workload::Null => KvReply::decode(reply) == Some(KvReply::Value(None)),
            Workload::Read4k => {
                matches!(decode::<Result<FsReply, FsError>>(reply), Some(Ok(FsReply::Read { data, .. })) if data.len() == BLOCK)
            }
            Workload::Write4k => {
                matches!(decode::<Result<FsReply, FsError>>(reply), Some(Ok(FsReply::Write { count, .. })) if count as usize == BLOCK)
            }
        }
    }
}

fn fs_request(op: FsOp) -> Vec<u8> {
    encode(&FsRequest {
        caller: Caller::root(),
        op,
    })
}

/// A 4 KiB block whose bytes depend on `seed` (so overwrites change the data).
fn block(seed: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| (seed as usize).wrapping_mul(31).wrapping_add(j) as u8)
        .collect()
}

/// Block size of the read and write workloads.
const BLOCK: usize = 4096;
/// Blocks in each writer's file and in the shared file the readers read.
const WRITE_FILE_BLOCKS: u64 = 16;
const READ_FILE_BLOCKS: u64 = 64;

/// How the service is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// n=4, f=1: four replicas through the tokio driver.
    Replicated,
    /// n=1, f=0 through the same driver and core. The core does not make progress with f=0
    /// today (see the module doc), so this is only run on request (`--f0-driver`).
    F0Driver,
    /// The stand-in unreplicated server (see [`StandIn`]).
    Unreplicated,
}

/// One configuration measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Setup {
    workload: Workload,
    kind: Kind,
    /// n=4 only: with the fast path (else the commit path).
    fast_path: bool,
    /// n=4 only: replica 3 is down for the whole round.
    crashed: bool,
    read_only: bool,
    /// Index into `--dir` of the replicas' log directory.
    dir: usize,
}

impl Setup {
    fn f(&self) -> u32 {
        match self.kind {
            Kind::Replicated => 1,
            Kind::F0Driver | Kind::Unreplicated => 0,
        }
    }
    fn label(&self, args: &Args) -> String {
        let base = match self.kind {
            Kind::Replicated if self.crashed => "n=4 (f=1) fast path, replica 3 down",
            Kind::Replicated if self.fast_path => "n=4 (f=1) fast path",
            Kind::Replicated => "n=4 (f=1) commit path",
            Kind::F0Driver => "n=1 (f=0) driver",
            Kind::Unreplicated => "n=1 unreplicated",
        };
        let dir = if self.kind == Kind::Unreplicated || args.dir.len() < 2 {
            String::new()
        } else {
            format!(", WAL {}", args.dir[self.dir].display())
        };
        let path = if self.read_only { " read-only" } else { "" };
        format!("{}: {base}{path}{dir}", self.workload.label())
    }
}

/// What one round of one configuration measured.
#[derive(Clone, Debug, Default)]
struct Round {
    ops: u64,
    ops_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Deltas over the measured window, from the primary's (replica 0's) status.
    batches: u64,
    requests: u64,
    primary_wal_syncs: u64,
    primary_frames: u64,
    wal_syncs_all: u64,
    dropped: u64,
    /// CPU seconds per thread group during the window.
    cpu: BTreeMap<&'static str, f64>,
    /// Until every client had its first answer; from the end of the window until all stopped.
    setup_seconds: f64,
    teardown_seconds: f64,
}

pub fn run(args: Args) -> Result<()> {
    if args.clients == 0 || args.callers == 0 || args.rounds == 0 || args.seconds <= 0.0 {
        bail!("--clients, --callers, --rounds and --seconds must be positive");
    }
    for d in &args.dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let baseline = if args.f0_driver {
        Kind::F0Driver
    } else {
        Kind::Unreplicated
    };
    let mut workloads = args.workload.clone();
    workloads.sort();
    workloads.dedup();
    let mut setups = Vec::new();
    for &workload in &workloads {
        for read_only in [false, true] {
            let wanted = match workload {
                Workload::Null => !read_only || args.read_only,
                // The mount reads on the read-only path; that is the one worth measuring.
                Workload::Read4k => read_only,
                Workload::Write4k => !read_only,
            };
            if !wanted {
                continue;
            }
            // The read-only path writes no log: one directory is enough.
            let dirs = if read_only { 1 } else { args.dir.len() };
            for dir in 0..dirs {
                let mut paths = args.path.clone();
                paths.sort();
                paths.dedup();
                for path in paths {
                    setups.push(Setup {
                        workload,
                        kind: Kind::Replicated,
                        fast_path: path == OrderPath::Fast,
                        crashed: false,
                        read_only,
                        dir,
                    });
                }
                if args.crashed {
                    setups.push(Setup {
                        workload,
                        kind: Kind::Replicated,
                        fast_path: true,
                        crashed: true,
                        read_only,
                        dir,
                    });
                }
            }
            setups.push(Setup {
                workload,
                kind: baseline,
                fast_path: false,
                crashed: false,
                read_only,
                dir: 0,
            });
        }
    }
    eprintln!(
        "micro: {:?}, {} clients x {} callers, payload {} B, {} rounds x ({:.1} s warm-up + {:.1} s measured) per configuration, WAL in {:?}",
        workloads,
        args.clients,
        args.callers,
        args.payload,
        args.rounds,
        args.warmup,
        args.seconds,
        args.dir
    );
    let mut results: BTreeMap<Setup, Vec<Round>> = BTreeMap::new();
    for round in 0..args.rounds {
        for setup in &setups {
            let r = measure(*setup, &args)
                .with_context(|| format!("round {} of {}", round + 1, setup.label(&args)))?;
            eprintln!(
                "round {:>2} {:<44} {:>8.0} ops/s  p50 {:>7.0} µs  p99 {:>7.0} µs  batch {:>5.1} req  fsync/batch {:.2}  (setup {:.1} s, teardown {:.1} s){}",
                round + 1,
                setup.label(&args),
                r.ops_per_second,
                r.p50_us,
                r.p99_us,
                ratio(r.requests, r.batches),
                ratio(r.primary_wal_syncs, r.batches),
                r.setup_seconds,
                r.teardown_seconds,
                if r.errors > 0 { format!("  ({} calls failed)", r.errors) } else { String::new() }
            );
            results.entry(*setup).or_default().push(r);
        }
    }
    report(&args, &setups, &results);
    Ok(())
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn median(values: Vec<f64>) -> f64 {
    crate::report::median(&values)
}

fn report(args: &Args, setups: &[Setup], results: &BTreeMap<Setup, Vec<Round>>) {
    let med = |s: &Setup, f: &dyn Fn(&Round) -> f64| {
        median(
            results
                .get(s)
                .map(|v| v.iter().map(f).collect())
                .unwrap_or_default(),
        )
    };
    println!();
    println!(
        "{} clients x {} callers, null-op payload {} B, median of {} rounds ({:.1} s measured each), interleaved.",
        args.clients, args.callers, args.payload, args.rounds, args.seconds
    );
    println!();
    let p = protocol(args, true);
    println!(
        "Protocol: batch_requests_max {}, pipeline_batches_max {}, client_window {}.",
        p.batch_requests_max, p.pipeline_batches_max, p.client_window
    );
    println!();
    println!("| configuration | ops/s (median) | ops/s (min–max) | p50 µs | p99 µs | requests per batch | WAL fsyncs per batch (primary) | WAL fsyncs per batch (all replicas) | frames in per request (primary) | failed calls | dropped (overload) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in setups {
        let rounds = results.get(s).cloned().unwrap_or_default();
        let min = rounds
            .iter()
            .map(|r| r.ops_per_second)
            .fold(f64::INFINITY, f64::min);
        let max = rounds.iter().map(|r| r.ops_per_second).fold(0.0, f64::max);
        let dash = |v: f64, digits: usize| {
            if s.kind == Kind::Unreplicated {
                "–".to_string()
            } else {
                format!("{v:.digits$}")
            }
        };
        println!(
            "| {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
            s.label(args),
            med(s, &|r| r.ops_per_second),
            min,
            max,
            med(s, &|r| r.p50_us),
            med(s, &|r| r.p99_us),
            dash(med(s, &|r| ratio(r.requests, r.batches)), 1),
            dash(med(s, &|r| ratio(r.primary_wal_syncs, r.batches)), 2),
            dash(med(s, &|r| ratio(r.wal_syncs_all, r.batches)), 2),
            dash(med(s, &|r| ratio(r.primary_frames, r.requests)), 2),
            rounds.iter().map(|r| r.errors).sum::<u64>(),
            rounds.iter().map(|r| r.dropped).sum::<u64>(),
        );
    }
    println!();
    for &four in setups.iter().filter(|s| s.kind == Kind::Replicated) {
        let Some(one) = setups.iter().copied().find(|s| {
            s.kind != Kind::Replicated
                && s.read_only == four.read_only
                && s.workload == four.workload
        }) else {
            continue;
        };
        let a = med(&four, &|r| r.ops_per_second);
        let b = med(&one, &|r| r.ops_per_second);
        // The ratio per round too: rounds are adjacent in time, so it is less noisy.
        let per_round: Vec<f64> = results[&four]
            .iter()
            .zip(results.get(&one).cloned().unwrap_or_default())
            .map(|(x, y)| {
                if y.ops_per_second > 0.0 {
                    x.ops_per_second / y.ops_per_second
                } else {
                    0.0
                }
            })
            .collect();
        let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per_round.iter().copied().fold(0.0, f64::max);
        println!(
            "throughput [{}] / [{}]: {:.2} (ratio of medians); per round median {:.2}, min–max {:.2}–{:.2}",
            four.label(args),
            one.label(args),
            if b > 0.0 { a / b } else { 0.0 },
            median(per_round.clone()),
            lo,
            hi
        );
    }
    // The fast path's aim (issue 7): median latency at most 0.75x the commit path's.
    // With a replica down, the aim is latency at most 2x the fault-free commit path's.
    for &fast in setups
        .iter()
        .filter(|s| s.kind == Kind::Replicated && s.fast_path)
    {
        let commit = setups.iter().copied().find(|s| {
            s.kind == Kind::Replicated
                && !s.fast_path
                && !s.crashed
                && s.workload == fast.workload
                && s.read_only == fast.read_only
                && s.dir == fast.dir
        });
        let Some(commit) = commit else { continue };
        let (a, b) = (med(&fast, &|r| r.p50_us), med(&commit, &|r| r.p50_us));
        let (x, y) = (
            med(&fast, &|r| r.ops_per_second),
            med(&commit, &|r| r.ops_per_second),
        );
        println!(
            "[{}] vs [{}]: p50 latency {:.2}x, throughput {:.2}x",
            fast.label(args),
            commit.label(args),
            if b > 0.0 { a / b } else { 0.0 },
            if y > 0.0 { x / y } else { 0.0 }
        );
    }
    println!();
    println!("CPU per operation (µs of CPU time per completed operation, median of rounds), by thread group, and the cores used:");
    println!();
    println!("| configuration | clients | replica 0 (primary) | replica 1 | replica 2 | replica 3 | unreplicated server | other | total | cores used (of 2) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    const GROUPS: [&str; 7] = [
        "clients",
        "replica-0",
        "replica-1",
        "replica-2",
        "replica-3",
        "server",
        "other",
    ];
    for s in setups {
        let per_op = |g: &'static str| {
            med(s, &move |r: &Round| {
                if r.ops > 0 {
                    r.cpu.get(g).copied().unwrap_or(0.0) * 1e6 / r.ops as f64
                } else {
                    0.0
                }
            })
        };
        print!("| {} |", s.label(args));
        for g in GROUPS {
            let v = per_op(g);
            if v == 0.0 {
                print!(" – |");
            } else {
                print!(" {v:.0} |");
            }
        }
        let total = med(s, &|r| {
            if r.ops > 0 {
                r.cpu.values().sum::<f64>() * 1e6 / r.ops as f64
            } else {
                0.0
            }
        });
        let cores = med(s, &|r| r.cpu.values().sum::<f64>() / args.seconds);
        println!(" {total:.0} | {cores:.2} |");
    }
}

/// Replicas running on threads of this process.
struct Cluster {
    config: ClusterConfig,
    clients: Vec<ClientSecrets>,
    statuses: Vec<Arc<Mutex<ReplicaStatus>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<ReplicaThread>,
    /// Thread ids of each replica's runtime threads (named `bftfs-net` by the driver, whichever
    /// replica they belong to), found by starting the replicas one at a time.
    net_threads: BTreeMap<u64, u32>,
    _dir: tempfile::TempDir,
}

type ReplicaThread = JoinHandle<Result<(), node::NodeError>>;

/// Restores a replica of `service` from its log and runs it on a thread named after it.
fn spawn_replica<S: Service + Send + 'static>(
    config: Arc<ClusterConfig>,
    secrets: replica::config::ReplicaSecrets,
    service: S,
    wal: &std::path::Path,
    listener: std::net::TcpListener,
    status: Arc<Mutex<ReplicaStatus>>,
    stop: Arc<AtomicBool>,
) -> Result<ReplicaThread> {
    let (replica, wal) = node::restore_replica(config.clone(), &secrets, service, wal)?;
    let id = secrets.id.0;
    Ok(std::thread::Builder::new()
        .name(format!("replica-core-{id}"))
        .spawn(move || {
            let options = node::RunOptions::default();
            node::run_with(
                config, secrets, replica, wal, listener, status, stop, options,
            )
        })?)
}

impl Cluster {
    fn start(
        setup: Setup,
        clients: usize,
        dir: &std::path::Path,
        protocol: &ProtocolConfig,
    ) -> Result<Cluster> {
        let f = setup.f();
        let n = 3 * f as usize + 1;
        let dir = tempfile::Builder::new()
            .prefix("bftfs-micro")
            .tempdir_in(dir)
            .context("temporary directory")?;
        // Listen first (port 0), so the addresses in the config are ours with no race.
        let mut listeners = Vec::new();
        for _ in 0..n {
            let l =
                std::net::TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1")?;
            l.set_nonblocking(true)?;
            listeners.push(l);
        }
        let addresses = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let client_ids: Vec<ClientId> = (1..=clients as u64).map(ClientId).collect();
        let keys = generate_with_os_random(f, addresses, &client_ids, protocol.clone())
            .context("keygen")?;
        let config = Arc::new(keys.config.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let mut statuses = Vec::new();
        let mut threads = Vec::new();
        let mut net_threads = BTreeMap::new();
        for (secrets, listener) in keys.replicas.into_iter().zip(listeners) {
            let id = secrets.id.0;
            if setup.crashed && id == 3 {
                // Its port stays bound (the listener is dropped here, so connections are
                // refused, as to a crashed process).
                continue;
            }
            // Each replica's file service gets a directory of its own, as on separate machines.
            let fs_dir = dir.path().join(format!("fs-{id}"));
            let open_fs = || {
                FileService::open(&fs_dir)
                    .with_context(|| format!("cannot open a file service in {}", fs_dir.display()))
            };
            if setup.kind == Kind::Unreplicated {
                let service: Box<dyn Service + Send> = if setup.workload.file_service() {
                    Box::new(open_fs()?)
                } else {
                    Box::new(KvService::new())
                };
                let auth = Authenticator::for_replica(&config, &secrets);
                let stop = stop.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name("norep-accept".into())
                        .spawn(move || {
                            StandIn::accept_loop(listener, auth, service, stop);
                            Ok(())
                        })?,
                );
                continue;
            }
            let status = Arc::new(Mutex::new(ReplicaStatus::new(id)));
            statuses.push(status.clone());
            let wal = dir.path().join(format!("wal-{id}"));
            let before: Vec<u64> = thread_cpu().keys().copied().collect();
            let thread = if setup.workload.file_service() {
                spawn_replica(
                    config.clone(),
                    secrets,
                    open_fs()?,
                    &wal,
                    listener,
                    status,
                    stop.clone(),
                )?
            } else {
                spawn_replica(
                    config.clone(),
                    secrets,
                    KvService::new(),
                    &wal,
                    listener,
                    status,
                    stop.clone(),
                )?
            };
            threads.push(thread);
            // The driver builds its runtime (two workers) first thing; wait for them.
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let new: Vec<u64> = thread_cpu()
                    .into_iter()
                    .filter(|(tid, (name, _))| name == "bftfs-net" && !before.contains(tid))
                    .map(|(tid, _)| tid)
                    .collect();
                if new.len() >= 2 || Instant::now() > deadline {
                    net_threads.extend(new.into_iter().map(|t| (t, id)));
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(Cluster {
            config: keys.config,
            clients: keys.clients,
            statuses,
            stop,
            threads,
            net_threads,
            _dir: dir,
        })
    }

    fn status(&self) -> Vec<ReplicaStatus> {
        self.statuses
            .iter()
            .map(|s| s.lock().map(|s| s.clone()).unwrap_or_default())
            .collect()
    }

    fn shut_down(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for (i, t) in self.threads.into_iter().enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("replica {i} stopped with an error: {e}"),
                Err(_) => bail!("replica {i} panicked"),
            }
        }
        Ok(())
    }
}

fn measure(setup: Setup, args: &Args) -> Result<Round> {
    let started = Instant::now();
    let cluster = Cluster::start(
        setup,
        args.clients,
        &args.dir[setup.dir],
        &protocol(args, setup.fast_path),
    )?;
    let handles: Vec<Arc<ClientHandle>> = cluster
        .clients
        .iter()
        .map(|s| ClientHandle::start(cluster.config.clone(), s.clone()).map(Arc::new))
        .collect::<std::io::Result<_>>()
        .context("cannot start a client")?;
    let timeout = Duration::from_secs(10);
    let callers_total = args.clients * args.callers;
    let workload = Arc::new(Workload::prepare(
        setup,
        args.payload,
        &handles,
        args.callers,
        timeout,
    )?);
    // Every client gets one answer before the clock starts (connections are up). In parallel:
    // a reply that beats the client's hello to a backup is lost, and the client then waits a
    // retransmission timeout (1 s) before it asks again.
    let ready: Vec<JoinHandle<Result<bool>>> = handles
        .iter()
        .enumerate()
        .map(|(c, h)| {
            let (h, workload) = (h.clone(), workload.clone());
            std::thread::spawn(move || {
                let (operation, read_only) = workload.call(c * workload.callers_per_client, 0);
                let reply = h
                    .call(operation, read_only, timeout)
                    .context("the cluster does not answer")?;
                Ok(workload.check(&reply))
            })
        })
        .collect();
    for t in ready {
        if !t
            .join()
            .map_err(|_| anyhow::anyhow!("a caller panicked"))??
        {
            bail!(
                "unexpected reply to the first {} call",
                setup.workload.label()
            );
        }
    }
    let setup_seconds = started.elapsed().as_secs_f64();
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::with_capacity(callers_total);
    for (c, h) in handles.iter().enumerate() {
        for k in 0..args.callers {
            let (h, workload, errors) = (h.clone(), workload.clone(), errors.clone());
            let caller = c * args.callers + k;
            callers.push(
                std::thread::Builder::new()
                    .name(format!("caller-{c}-{k}"))
                    .spawn(move || {
                        let mut latencies_ns: Vec<u64> = Vec::with_capacity(1 << 14);
                        for i in 1.. {
                            let t0 = Instant::now();
                            if t0 >= end {
                                break;
                            }
                            let (operation, read_only) = workload.call(caller, i);
                            let ok = h
                                .call(operation, read_only, timeout)
                                .is_ok_and(|reply| workload.check(&reply));
                            let t1 = Instant::now();
                            if !ok {
                                errors.fetch_add(1, Ordering::Relaxed);
                            } else if t1 >= start && t1 < end {
                                latencies_ns.push((t1 - t0).as_nanos() as u64);
                            }
                        }
                        latencies_ns
                    })?,
            );
        }
    }
    sleep_until(start);
    let (status_before, cpu_before) = (cluster.status(), thread_cpu());
    sleep_until(end);
    let (status_after, cpu_after) = (cluster.status(), thread_cpu());
    let mut latencies: Vec<u64> = Vec::new();
    for t in callers {
        latencies.extend(t.join().map_err(|_| anyhow::anyhow!("a caller panicked"))?);
    }
    drop(handles);
    let net_threads = cluster.net_threads.clone();
    cluster.shut_down()?;
    let teardown_seconds = end.elapsed().as_secs_f64();

    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1000.0
    };
    let delta = |f: &dyn Fn(&ReplicaStatus) -> u64, i: usize| match (
        status_before.get(i),
        status_after.get(i),
    ) {
        (Some(b), Some(a)) => f(a).saturating_sub(f(b)),
        _ => 0,
    };
    let mut cpu: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (tid, (name, seconds)) in &cpu_after {
        let before = cpu_before.get(tid).map(|(_, s)| *s).unwrap_or(0.0);
        let group = match (name.as_str(), net_threads.get(tid)) {
            (_, Some(0)) | ("replica-core-0", _) => "replica-0",
            (_, Some(1)) | ("replica-core-1", _) => "replica-1",
            (_, Some(2)) | ("replica-core-2", _) => "replica-2",
            (_, Some(3)) | ("replica-core-3", _) => "replica-3",
            (n, _) if n.starts_with("bftfs-client") || n.starts_with("caller") => "clients",
            (n, _) if n.starts_with("norep") => "server",
            _ => "other",
        };
        *cpu.entry(group).or_insert(0.0) += seconds - before;
    }
    Ok(Round {
        ops: latencies.len() as u64,
        ops_per_second: latencies.len() as f64 / args.seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors: errors.load(Ordering::Relaxed),
        batches: delta(&|s| s.last_executed, 0),
        requests: delta(&|s| s.executed_requests, 0),
        primary_wal_syncs: delta(&|s| s.wal_syncs, 0),
        primary_frames: delta(&|s| s.frames_accepted, 0),
        wal_syncs_all: (0..status_after.len())
            .map(|i| delta(&|s| s.wal_syncs, i))
            .sum(),
        dropped: (0..status_after.len())
            .map(|i| delta(&|s| s.dropped_overload, i))
            .sum(),
        cpu,
        setup_seconds,
        teardown_seconds,
    })
}

fn protocol(args: &Args, fast_path: bool) -> ProtocolConfig {
    let mut p = ProtocolConfig::default();
    if let Some(b) = args.batch_max {
        p.batch_requests_max = b;
    }
    if let Some(d) = args.pipeline {
        p.pipeline_batches_max = d;
    }
    p.fast_path = fast_path;
    p
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// CPU seconds (user + system) of every live thread of this process, by thread id, with the
/// thread's name.
fn thread_cpu() -> BTreeMap<u64, (String, f64)> {
    let ticks = procfs::ticks_per_second().max(1) as f64;
    let mut out = BTreeMap::new();
    let Ok(tasks) = procfs::process::Process::myself().and_then(|p| p.tasks()) else {
        return out;
    };
    for task in tasks.flatten() {
        let (Ok(tid), Ok(stat)) = (u64::try_from(task.tid), task.stat()) else {
            continue;
        };
        let cpu = (stat.utime + stat.stime) as f64 / ticks;
        out.insert(tid, (stat.comm, cpu));
    }
    out
}

/// The unreplicated baseline: the same `KvService` behind one server that speaks the replicas'
/// client protocol (so the same [`ClientHandle`], framing, MACs and request signatures are
/// used), but executes each request as soon as it has authenticated it and answers at once:
/// no agreement, no other replica, no write-ahead log (the service is in memory either way).
/// One thread per connection (one connection per client); frames already received are
/// handled together and their replies go out in one write. No reply cache: the null
/// operation is idempotent and nothing is retransmitted on loopback at these rates.
struct StandIn;

impl StandIn {
    fn accept_loop(
        listener: std::net::TcpListener,
        auth: Authenticator,
        service: Box<dyn Service + Send>,
        stop: Arc<AtomicBool>,
    ) {
        let auth = Arc::new(auth);
        let service = Arc::new(Mutex::new(service));
        let mut connections = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let (auth, service, stop) = (auth.clone(), service.clone(), stop.clone());
                    let name = format!("norep-conn-{}", connections.len());
                    if let Ok(t) = std::thread::Builder::new()
                        .name(name)
                        .spawn(move || Self::serve(stream, &auth, &service, &stop))
                    {
                        connections.push(t);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        for t in connections {
            let _ = t.join();
        }
    }

    fn serve(
        mut stream: std::net::TcpStream,
        auth: &Authenticator,
        service: &Mutex<Box<dyn Service + Send>>,
        stop: &AtomicBool,
    ) {
        // The listener is non-blocking; the connection blocks, with a timeout to see `stop`.
        if stream.set_nonblocking(false).is_err()
            || stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .is_err()
        {
            return;
        }
        let _ = stream.set_nodelay(true);
        let mut input: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut output: Vec<u8> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(k) => input.extend_from_slice(&chunk[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(_) => return,
            }
            let mut at = 0;
            while input.len() - at >= wire::FRAME_HEADER_BYTES {
                let mut header = [0u8; wire::FRAME_HEADER_BYTES];
                header.copy_from_slice(&input[at..at + wire::FRAME_HEADER_BYTES]);
                let Ok(len) = wire::frame_length(header) else {
                    return;
                };
                if input.len() - at - wire::FRAME_HEADER_BYTES < len {
                    break;
                }
                let body =
                    &input[at + wire::FRAME_HEADER_BYTES..at + wire::FRAME_HEADER_BYTES + len];
                at += wire::FRAME_HEADER_BYTES + len;
                if let Some(frame) = Self::handle(body, auth, service) {
                    output.extend_from_slice(&frame);
                }
            }
            input.drain(..at);
            if !output.is_empty() {
                if stream.write_all(&output).is_err() {
                    return;
                }
                output.clear();
            }
        }
    }

    /// One frame in, the sealed reply frame out (nothing for a hello or a bad frame).
    fn handle(
        body: &[u8],
        auth: &Authenticator,
        service: &Mutex<Box<dyn Service + Send>>,
    ) -> Option<Vec<u8>> {
        let (sender, message) = auth.open(body).ok()?.into_parts();
        let Message::Client(ClientMessage::Request(request)) = message else {
            return None;
        };
        let Principal::Client(client) = sender else {
            return None;
        };
        if request.body.client != client {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut service = service.lock().ok()?;
        // The service's own encoding of the agreed time, as a primary would propose it.
        let nondet = if request.body.read_only {
            Vec::new()
        } else {
            service.propose_nondet(now)
        };
        let result = service.execute(
            &request.body.operation,
            client,
            &nondet,
            request.body.read_only,
        );
        let reply = Reply {
            view: View(0),
            client,
            timestamp: request.body.timestamp,
            replica: ReplicaId(0),
            read_only: request.body.read_only,
            result,
        };
        auth.seal(
            &Message::Client(ClientMessage::Reply(reply)),
            &[Principal::Client(client)],
        )
        .ok()
    }
}
