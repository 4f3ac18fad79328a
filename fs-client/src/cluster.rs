//! The replicated side of `bftfs`: the transport over the BFT client protocol, the local
//! cluster that `bftfs up` starts (3f+1 `bftfs-replica` processes, restarted if they die), the
//! choice of a client identity, and the per-replica status report.
//!
//! Files of a local cluster, under its data directory:
//! - `cluster/`: `cluster.json` and the secrets files from `bftfs keygen`;
//! - `replica-<i>/`: replica i's data directory; `replica-<i>.log` its log.

use crate::keygen;
use crate::transport::{FsTransport, TransportError};
use anyhow::{bail, Context, Result};
use replica::config::{ClientSecrets, ClusterConfig};
use replica::driver::client::{CallError, ClientHandle};
use replica::driver::status::{
    probe, unix_ms, CallReport, ClientReport, ReplicaStatus, CLIENT_REPORT_HEARTBEAT,
};
use state_abstraction::fs::{decode, encode, FsRequest, FsResult};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const CLUSTER_DIR: &str = "cluster";
/// Client identities made for a local cluster: the mount of `up` and a few more mounts of the
/// same cluster (`bftfs mount DATA/cluster/cluster.json DIR`) or benchmarks.
const LOCAL_CLIENTS: u32 = 8;

/// [`FsTransport`] over the BFT client protocol.
pub struct ReplicatedTransport {
    client: ClientHandle,
    client_id: u64,
    timeout: Duration,
    /// Set after a timeout so that an outage is logged once, not once per request.
    failing: AtomicBool,
    calls: CallTracker,
}

/// Counts a client's calls for its report ([`CallReport`]), including those still waiting.
#[derive(Default)]
struct CallTracker {
    inner: Mutex<TrackedCalls>,
}

#[derive(Default)]
struct TrackedCalls {
    report: CallReport,
    /// Calls waiting for an answer: number → when sent (Unix ms).
    pending: BTreeMap<u64, u64>,
    next: u64,
}

impl CallTracker {
    fn begin(&self) -> u64 {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.next += 1;
        let id = t.next;
        t.pending.insert(id, unix_ms());
        id
    }

    fn end(&self, id: u64, failure: Option<String>) {
        let now = unix_ms();
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.pending.remove(&id);
        let r = &mut t.report;
        match failure {
            None => {
                r.completed += 1;
                r.failed_in_a_row = 0;
                r.last_completed_unix_ms = now;
            }
            Some(why) => {
                r.failed += 1;
                r.failed_in_a_row += 1;
                r.last_failed_unix_ms = now;
                r.last_error = why;
            }
        }
    }

    fn report(&self) -> CallReport {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        CallReport {
            pending: t.pending.len() as u64,
            // Numbers grow with sending time, so the first pending call is the oldest.
            oldest_pending_unix_ms: t.pending.values().next().copied().unwrap_or(0),
            ..t.report.clone()
        }
    }
}

impl ReplicatedTransport {
    pub fn start(config: ClusterConfig, secrets: ClientSecrets, timeout: Duration) -> Result<Self> {
        let client_id = secrets.id.0;
        let client = ClientHandle::start(config, secrets).context("cannot start the BFT client")?;
        Ok(ReplicatedTransport {
            client,
            client_id,
            timeout,
            failing: AtomicBool::new(false),
            calls: CallTracker::default(),
        })
    }
}

/// The thread that keeps a client's observations of the replicas on disk; stops on drop.
pub struct ObservationReporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ObservationReporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a mount rewrites what it observed about the replicas.
const REPORT_EVERY: Duration = Duration::from_millis(500);

impl ReplicatedTransport {
    /// Writes this client's observations of the replicas (replies that disagreed with the
    /// accepted result, replies that did not authenticate) and how its calls fare into `dir`
    /// when they change and at least every [`CLIENT_REPORT_HEARTBEAT`], for `bftfs status`:
    /// only a client can see a replica that lies in its replies, or calls that get no answer.
    pub fn report_observations(self: &Arc<Self>, dir: &Path) -> ObservationReporter {
        let stop = Arc::new(AtomicBool::new(false));
        let (me, stop2, dir) = (self.clone(), stop.clone(), dir.to_path_buf());
        let client = self.client_id;
        let thread = std::thread::Builder::new()
            .name("bftfs-observe".into())
            .spawn(move || {
                let mut last: Option<ClientReport> = None;
                while !stop2.load(Ordering::Relaxed) {
                    let mut report =
                        ClientReport::from_observations(client, &me.client.observations());
                    report.calls = me.calls.report();
                    let due = last.as_ref().is_none_or(|l| {
                        let same = ClientReport {
                            updated_unix_ms: report.updated_unix_ms,
                            ..l.clone()
                        } == report;
                        let age = report.updated_unix_ms.saturating_sub(l.updated_unix_ms);
                        !same || age >= CLIENT_REPORT_HEARTBEAT.as_millis() as u64
                    });
                    if due {
                        if let Err(e) = report.write_to(&dir) {
                            // A read-only cluster directory (another user's mount): status
                            // then lacks the client's view, nothing else.
                            tracing::debug!(error = %e, "cannot write the client's observations");
                        }
                        last = Some(report);
                    }
                    std::thread::sleep(REPORT_EVERY);
                }
            })
            .ok();
        ObservationReporter { stop, thread }
    }
}

impl FsTransport for ReplicatedTransport {
    fn call(&self, req: FsRequest) -> Result<FsResult, TransportError> {
        let read_only = req.op.is_read_only();
        let tracked = self.calls.begin();
        let result = self.client.call(encode(&req), read_only, self.timeout);
        self.calls
            .end(tracked, result.as_ref().err().map(|e| e.to_string()));
        match result {
            Ok(bytes) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!("the cluster answers again");
                }
                decode::<FsResult>(&bytes)
                    .ok_or_else(|| TransportError::Malformed(format!("{} bytes", bytes.len())))
            }
            Err(CallError::Timeout(t)) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!("the cluster did not answer within {t:?}; operations fail with EIO until it does");
                }
                Err(TransportError::Timeout(t))
            }
            Err(e) => Err(TransportError::Unreachable(e.to_string())),
        }
    }
}

pub fn read_config(path: &Path) -> Result<ClusterConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the cluster config {}", path.display()))?;
    ClusterConfig::from_json(&text)
        .with_context(|| format!("{} is not a valid cluster config", path.display()))
}

/// Claims an unused client identity among the `client-<id>.json` files next to `config_path`
/// (or the one given), holding a lock on it for as long as the returned file lives: two mounts
/// sharing one identity would confuse the replicas' per-client reply caches.
pub fn claim_client(config_path: &Path, explicit: Option<&Path>) -> Result<(ClientSecrets, File)> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let dir = config_path.parent().unwrap_or(Path::new("."));
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("client-") && n.ends_with(".json"))
                })
                .collect();
            found.sort();
            found
        }
    };
    if candidates.is_empty() {
        bail!(
            "no client secrets file (client-<id>.json) next to {}; pass --client FILE",
            config_path.display()
        );
    }
    for path in &candidates {
        let lock_path = path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        // SAFETY: a valid descriptor; flock has no memory effects.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let secrets = ClientSecrets::from_json(&text)
            .with_context(|| format!("{} is not a client secrets file", path.display()))?;
        return Ok((secrets, lock));
    }
    bail!(
        "every client identity next to {} is in use by another mount; make more with `bftfs keygen --clients N`",
        config_path.display()
    )
}

/// Where the `bftfs-replica` program is: next to this `bftfs`, else on PATH.
fn replica_program() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BFTFS_REPLICA_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let p = dir.join("bftfs-replica");
            if p.is_file() {
                return Ok(p);
            }
            // `cargo test` runs bftfs from target/<profile>/, the replica binary sits there too.
            if let Some(p) = dir
                .parent()
                .map(|d| d.join("bftfs-replica"))
                .filter(|p| p.is_file())
            {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("bftfs-replica");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("cannot find the bftfs-replica program next to bftfs or on PATH; build it with `cargo build --release`")
}

/// Makes the keys of a new local cluster, or reuses the existing ones, and applies the
/// fast-path setting of this `up` (the config is public and not signed, so only addresses and
/// protocol parameters change here, never the keys).
///
/// Ports come from [`replica::localhost`]: consecutive, outside the kernel's ephemeral range,
/// the same for a data directory while they stay free. If a stored port is taken at a later
/// `up` (or lies in the ephemeral range, as ports chosen before this rule did), every replica
/// moves to a new run, with a warning naming the port: the addresses are on 127.0.0.1, so only
/// this machine's processes use them, and all of them read `cluster.json` when they start.
pub fn prepare_local_cluster(data_dir: &Path, f: u32, fast_path: bool) -> Result<PathBuf> {
    wait_for_previous_replicas(data_dir, 3 * f as usize + 1)?;
    let dir = data_dir.join(CLUSTER_DIR);
    let config_path = dir.join(keygen::CONFIG_FILE);
    let seed = replica::localhost::seed_of(data_dir.as_os_str().as_encoded_bytes());
    if !config_path.exists() {
        // The local mount's caller is a user of this machine: believed as stated.
        keygen::write_cluster(
            &dir,
            f,
            replica::localhost::free_addresses(3 * f as usize + 1, seed)
                .context("cannot find free ports for the replicas")?,
            LOCAL_CLIENTS,
            state_abstraction::fs::Squash::None,
        )?;
        if fast_path {
            return Ok(config_path);
        }
    }
    let mut config = read_config(&config_path)?;
    if config.f != f {
        bail!(
            "the data directory {} holds a cluster with f={}, not f={f}; use --f {} or another --data-dir",
            data_dir.display(),
            config.f,
            config.f
        );
    }
    // Like the addresses, the protocol parameters are public and unsigned: every replica and
    // the client read them from this file at start.
    let mut changed = config.protocol.fast_path != fast_path;
    config.protocol.fast_path = fast_path;
    if let Some(why) = why_move_ports(&config) {
        move_replicas(&mut config, &why, seed, &config_path)?;
        changed = true;
    }
    if changed {
        write_config(&config, &config_path)?;
    }
    Ok(config_path)
}

/// Moves a local cluster's replicas to other free ports than those stored (which a replica
/// could not bind), saying why.
pub fn move_local_ports(config_path: &Path, why: &str) -> Result<()> {
    let mut config = read_config(config_path)?;
    // Not the data directory's seed: its first choice may be the very ports that failed.
    move_replicas(
        &mut config,
        why,
        replica::localhost::fresh_seed(),
        config_path,
    )?;
    write_config(&config, config_path)
}

fn move_replicas(
    config: &mut ClusterConfig,
    why: &str,
    seed: u64,
    config_path: &Path,
) -> Result<()> {
    let addresses = replica::localhost::free_addresses(config.n(), seed)
        .context("cannot find free ports for the replicas")?;
    warn!(
        "{why}; moving the replicas to {}..{} (restart any other `bftfs mount` of {} so that it reads the new addresses)",
        addresses[0],
        addresses[addresses.len() - 1],
        config_path.display()
    );
    for (r, address) in config.replicas.iter_mut().zip(addresses) {
        r.address = address;
    }
    Ok(())
}

fn write_config(config: &ClusterConfig, config_path: &Path) -> Result<()> {
    let tmp = config_path.with_extension("tmp");
    std::fs::write(&tmp, config.to_json()?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, config_path)
        .with_context(|| format!("cannot update {}", config_path.display()))
}

/// If `LocalCluster::start` failed because a replica could not listen on its port, which
/// replica and port (from the replica's own words in its log).
pub fn lost_port_race(e: &anyhow::Error) -> Option<String> {
    match e.downcast_ref::<replica::localhost::StartError>()? {
        replica::localhost::StartError::Exited { id, tail, .. } => {
            let line = tail.lines().find(|l| l.contains("cannot listen on"))?;
            let said = &line[line.find("cannot listen on")?..];
            Some(format!("replica {id} {said}"))
        }
        _ => None,
    }
}

/// Why a local cluster's stored addresses cannot be used as they are, if they cannot.
fn why_move_ports(config: &ClusterConfig) -> Option<String> {
    let ephemeral = replica::localhost::ephemeral_range();
    for r in &config.replicas {
        if !replica::localhost::port_free(&r.address) {
            return Some(format!(
                "port {} of replica {} is taken by another program",
                r.address, r.id.0
            ));
        }
        let port = r
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok());
        if port.is_some_and(|p| ephemeral.contains(&p)) {
            return Some(format!(
                "port {} of replica {} lies in the kernel's ephemeral range {}-{}, where outgoing connections may take it",
                r.address,
                r.id.0,
                ephemeral.start(),
                ephemeral.end()
            ));
        }
    }
    None
}

/// Replicas of a previous `up` whose `bftfs` was killed get SIGTERM when it dies, but may
/// take a moment to finish; they hold their data directory's lock (and port) until they exit.
/// Waits for them rather than failing on a lock or moving ports for nothing.
fn wait_for_previous_replicas(data_dir: &Path, n: usize) -> Result<()> {
    let started = Instant::now();
    for i in 0..n {
        let path = data_dir.join(format!("replica-{i}")).join("lock");
        let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
            continue;
        };
        loop {
            // SAFETY: a valid descriptor; flock has no memory effects.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // SAFETY: as above; the lock is released at once, the replica takes it.
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
                break;
            }
            if started.elapsed() > Duration::from_secs(15) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "replica {i} of {} is still running (pid {}); stop it first (`bftfs down`)",
                    data_dir.display(),
                    holder.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// What `bftfs up` adds to some replicas' command lines.
#[derive(Clone, Debug, Default)]
pub struct ReplicaExtras {
    /// Replicas that misbehave on purpose: (id, mode as `bftfs-replica --byzantine` takes it).
    pub byzantine: Vec<(u32, String)>,
    /// Replica i serves Prometheus metrics on 127.0.0.1:(port+i).
    pub metrics_port: Option<u16>,
}

/// How long `up` waits for every replica to serve before leaving a slow one to the supervisor.
const START_WAIT: Duration = Duration::from_secs(20);

struct Member {
    child: Option<Child>,
    restarts: u32,
}

/// 3f+1 `bftfs-replica` processes on this machine. A replica that dies is restarted (after a
/// pause) until the cluster is stopped; it recovers from its own checkpoint and log and catches
/// up from the others.
pub struct LocalCluster {
    program: PathBuf,
    /// Extra `bftfs-replica` arguments by replica id (`--byzantine`, `--metrics-addr`),
    /// restarts included.
    extra_args: Arc<BTreeMap<usize, Vec<String>>>,
    config_path: PathBuf,
    data_dir: PathBuf,
    members: Arc<Mutex<Vec<Member>>>,
    stop: Arc<AtomicBool>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

impl LocalCluster {
    pub fn start(data_dir: &Path, config_path: &Path) -> Result<LocalCluster> {
        Self::start_with(data_dir, config_path, &ReplicaExtras::default())
    }

    /// [`LocalCluster::start`] with per-replica extras, kept across restarts.
    pub fn start_with(
        data_dir: &Path,
        config_path: &Path,
        extras: &ReplicaExtras,
    ) -> Result<LocalCluster> {
        let config = read_config(config_path)?;
        let program = replica_program()?;
        let mut extra_args: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (id, mode) in &extras.byzantine {
            warn!("replica {id} misbehaves on purpose: --byzantine {mode}");
            extra_args
                .entry(*id as usize)
                .or_default()
                .extend(["--byzantine".to_string(), mode.clone()]);
        }
        if let Some(port) = extras.metrics_port {
            for i in 0..config.n() {
                let address = format!("127.0.0.1:{}", usize::from(port) + i);
                info!("replica {i} serves its metrics at http://{address}/");
                extra_args
                    .entry(i)
                    .or_default()
                    .extend(["--metrics-addr".to_string(), address]);
            }
        }
        let mut cluster = LocalCluster {
            extra_args: Arc::new(extra_args),
            program,
            config_path: config_path.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            members: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            supervisor: None,
        };
        let mut members = Vec::new();
        for i in 0..config.n() {
            members.push(Member {
                child: Some(cluster.spawn(i)?),
                restarts: 0,
            });
        }
        *cluster
            .members
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))? = members;
        // Fail fast on a replica that cannot start at all (bad keys, port in use). One that is
        // merely slow (a large state to restore) is left to the supervisor and the mount's
        // first call.
        let waited = cluster.wait_until_serving(&config);
        match waited {
            Ok(()) => {}
            Err(e @ replica::localhost::StartError::NotServing { .. }) => warn!("{e}"),
            Err(e) => {
                cluster.stop();
                return Err(e.into());
            }
        }
        cluster.supervisor = Some(cluster.spawn_supervisor());
        Ok(cluster)
    }

    fn wait_until_serving(
        &self,
        config: &ClusterConfig,
    ) -> Result<(), replica::localhost::StartError> {
        let addresses: Vec<String> = config.replicas.iter().map(|r| r.address.clone()).collect();
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        replica::localhost::wait_until_serving(
            members.iter_mut().map(|m| m.child.as_mut()),
            &addresses,
            |i| self.data_dir.join(format!("replica-{i}.log")),
            START_WAIT,
        )
    }

    fn spawn(&self, i: usize) -> Result<Child> {
        spawn_replica(
            &self.program,
            &self.config_path,
            &self.data_dir,
            i,
            self.extra_args
                .get(&i)
                .map(Vec::as_slice)
                .unwrap_or_default(),
        )
    }

    fn spawn_supervisor(&self) -> std::thread::JoinHandle<()> {
        let members = self.members.clone();
        let stop = self.stop.clone();
        let (program, config_path, data_dir) = (
            self.program.clone(),
            self.config_path.clone(),
            self.data_dir.clone(),
        );
        let extra_args = self.extra_args.clone();
        std::thread::spawn(move || {
            let mut dead_since: Vec<Option<Instant>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let Ok(mut members) = members.lock() else {
                    return;
                };
                dead_since.resize(members.len(), None);
                for (i, m) in members.iter_mut().enumerate() {
                    let exited = match m.child.as_mut().map(|c| c.try_wait()) {
                        Some(Ok(Some(status))) => Some(status.to_string()),
                        Some(Ok(None)) => None,
                        Some(Err(e)) => Some(e.to_string()),
                        None => Some("not running".into()),
                    };
                    let Some(why) = exited else { continue };
                    let since = *dead_since[i].get_or_insert_with(|| {
                        warn!("replica {i} exited ({why}); restarting it");
                        Instant::now()
                    });
                    // A pause, growing with repeated failures, so a replica that cannot start
                    // does not spin.
                    let pause = Duration::from_millis(500 * u64::from(m.restarts.min(10) + 1));
                    if since.elapsed() < pause || stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    match spawn_replica(
                        &program,
                        &config_path,
                        &data_dir,
                        i,
                        extra_args.get(&i).map(Vec::as_slice).unwrap_or_default(),
                    ) {
                        Ok(c) => {
                            m.child = Some(c);
                            m.restarts += 1;
                            dead_since[i] = None;
                            info!("replica {i} restarted");
                        }
                        Err(e) => warn!("cannot restart replica {i}: {e:#}"),
                    }
                }
            }
        })
    }

    /// Process ids of the replicas (None where one is not running).
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.members
            .lock()
            .map(|m| m.iter().map(|m| m.child.as_ref().map(|c| c.id())).collect())
            .unwrap_or_default()
    }

    /// Stops every replica (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        let Ok(mut members) = self.members.lock() else {
            return;
        };
        for m in members.iter_mut() {
            if let Some(c) = &m.child {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let started = Instant::now();
        for m in members.iter_mut() {
            if let Some(mut c) = m.child.take() {
                while matches!(c.try_wait(), Ok(None)) && started.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_replica(
    program: &Path,
    config_path: &Path,
    data_dir: &Path,
    i: usize,
    extra_args: &[String],
) -> Result<Child> {
    let secrets = config_path
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("replica-{i}.json"));
    let log_path = data_dir.join(format!("replica-{i}.log"));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_err = log.try_clone()?;
    let mut cmd = Command::new(program);
    // SAFETY: prctl is async-signal-safe. A replica must not outlive the `bftfs` that started
    // it (e.g. killed with SIGKILL): an orphan would keep its port and its data directory, and
    // the next `up` would find both taken.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            // The serving process blocks SIGINT/SIGTERM to handle them on one thread; a blocked
            // mask is inherited across exec, and a replica must hear SIGTERM.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.args(extra_args)
        .arg("--config")
        .arg(config_path)
        .arg("--secrets")
        .arg(&secrets)
        .arg("--data-dir")
        .arg(data_dir.join(format!("replica-{i}")))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))
}

/// One replica as `bftfs status` shows it.
#[derive(Clone, Debug)]
pub struct ReplicaReport {
    pub id: u32,
    pub address: String,
    pub status: Option<ReplicaStatus>,
    pub lag: Option<u64>,
    pub health: &'static str,
}

/// How long `bftfs status` waits for each replica's answer (all are asked at once).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks every replica of `config` for its status, all at once: a stopped replica costs the
/// probe timeout once, not once per replica.
pub fn probe_cluster(config: &ClusterConfig) -> Vec<ReplicaReport> {
    let answers: Vec<std::io::Result<ReplicaStatus>> =
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(async {
                let probes: Vec<_> = config
                    .replicas
                    .iter()
                    .map(|r| {
                        let address = r.address.clone();
                        tokio::spawn(async move { probe(&address, PROBE_TIMEOUT).await })
                    })
                    .collect();
                let mut out = Vec::new();
                for p in probes {
                    out.push(p.await.unwrap_or_else(|e| Err(std::io::Error::other(e))));
                }
                out
            }),
            Err(e) => config
                .replicas
                .iter()
                .map(|_| Err(std::io::Error::new(e.kind(), e.to_string())))
                .collect(),
        };
    // A replica that accepts the connection and never answers (stopped, hung, overloaded) is
    // not the same trouble as one that is gone.
    let silent: Vec<bool> = answers
        .iter()
        .map(|a| matches!(a, Err(e) if e.kind() == std::io::ErrorKind::TimedOut))
        .collect();
    let statuses: Vec<Option<ReplicaStatus>> = answers.into_iter().map(Result::ok).collect();
    let best = statuses
        .iter()
        .flatten()
        .map(|s| s.last_executed)
        .max()
        .unwrap_or(0);
    // The view most replicas are in: a replica in another view is changing views or lagging.
    let common_view = crate::health::largest_active_view(statuses.iter().flatten()).map(|(v, _)| v);
    config
        .replicas
        .iter()
        .zip(statuses.into_iter().zip(silent))
        .map(|(r, (status, silent))| {
            let lag = status
                .as_ref()
                .map(|s| best.saturating_sub(s.last_executed));
            let health = match &status {
                None if silent => "not answering",
                None => "down",
                Some(s) if s.transferring_state => "catching up (state transfer)",
                Some(s) if !s.view_active => "changing view",
                Some(s) if common_view.is_some_and(|v| v != s.view) => "in another view",
                // A few batches behind is normal in flight; more is lag.
                Some(_) if lag.unwrap_or(0) > 64 => "lagging",
                Some(_) => "ok",
            };
            ReplicaReport {
                id: r.id.0,
                address: r.address.clone(),
                status,
                lag,
                health,
            }
        })
        .collect()
}

pub fn print_reports(reports: &[ReplicaReport]) {
    println!(
        "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>9} {:>6}  health",
        "replica",
        "address",
        "pid",
        "role",
        "view",
        "executed",
        "stable cp",
        "lag",
        "rejected",
        "xfers"
    );
    for r in reports {
        match &r.status {
            Some(s) => println!(
                "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>9} {:>6}  {}",
                r.id,
                r.address,
                s.pid,
                if s.primary { "primary" } else { "backup" },
                s.view,
                s.last_executed,
                s.stable_checkpoint,
                r.lag.unwrap_or(0),
                s.frames_rejected,
                s.state_transfers,
                r.health
            ),
            None => println!(
                "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>9} {:>6}  {}",
                r.id, r.address, "-", "-", "-", "-", "-", "-", "-", "-", r.health
            ),
        }
    }
}

pub fn reports_json(reports: &[ReplicaReport]) -> String {
    let items: Vec<String> = reports
        .iter()
        .map(|r| {
            let status = r
                .status
                .as_ref()
                .map(|s| s.to_json())
                .unwrap_or_else(|| "null".into());
            format!(
                "{{\"id\":{},\"address\":\"{}\",\"health\":\"{}\",\"lag\":{},\"status\":{}}}",
                r.id,
                r.address.replace('"', ""),
                r.health,
                r.lag
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "null".into()),
                status
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// A replica that others report as misbehaving or silent, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspect {
    pub id: u32,
    pub why: Vec<String>,
}

/// A peer silent this much longer than the liveliest other peer is reported.
const SILENCE_MS: u64 = 3000;
/// Messages arriving this late on average (and several times later than the others') are
/// reported.
const LATE_MS: u64 = 100;

/// Names the replicas that the other replicas (and the clients) report as misbehaving or
/// silent. Observations about a replica come only from others: a Byzantine replica's word
/// about itself counts for nothing, and its word about others is one voice among several
/// (hence "seen by K peers").
pub fn suspects(
    config: &ClusterConfig,
    reports: &[ReplicaReport],
    clients: &[ClientReport],
) -> Vec<Suspect> {
    let quorum_of_witnesses = config.f as usize + 1;
    // Views whose primary someone holds proof of equivocation against: conflicting votes in
    // them are the primary's doing, not the voters'.
    let tainted: std::collections::BTreeSet<u64> = reports
        .iter()
        .filter_map(|r| r.status.as_ref())
        .flat_map(|s| {
            s.peers
                .iter()
                .flat_map(|p| p.equivocation_views.iter().copied())
        })
        .collect();
    let mut out = Vec::new();
    for target in config.replicas.iter().map(|r| r.id.0) {
        let mut why = Vec::new();
        // (observer, its report about target, its reports about everyone else)
        let views: Vec<(
            u32,
            &replica::driver::peers::PeerReport,
            Vec<&replica::driver::peers::PeerReport>,
        )> = reports
            .iter()
            .filter(|r| r.id != target)
            .filter_map(|r| {
                let s = r.status.as_ref()?;
                let about = s.peers.iter().find(|p| p.id == target)?;
                Some((
                    r.id,
                    about,
                    s.peers.iter().filter(|p| p.id != target).collect(),
                ))
            })
            .collect();
        let mut tally = |what: &str, count: &dyn Fn(&replica::driver::peers::PeerReport) -> u64| {
            let total: u64 = views.iter().map(|(_, p, _)| count(p)).sum();
            let witnesses = views.iter().filter(|(_, p, _)| count(p) > 0).count();
            if total > 0 {
                why.push(format!(
                    "{total} {what} seen by {witnesses} peer{}",
                    if witnesses == 1 { "" } else { "s" }
                ));
            }
        };
        tally("bad authenticators", &|p| p.auth_failures);
        tally("invalid messages", &|p| p.invalid);
        tally(
            "proofs of equivocation (conflicting signed proposals)",
            &|p| p.equivocations,
        );
        tally(
            "checkpoints disagreeing with the stable certificate",
            &|p| p.checkpoint_mismatches,
        );
        tally(
            "votes for another batch than the primary proposed (it or the primary equivocates)",
            &|p| {
                p.conflicting_votes_by_view
                    .iter()
                    .filter(|(v, _)| !tainted.contains(v))
                    .map(|(_, n)| n)
                    .sum()
            },
        );
        let silent: Vec<u64> = views
            .iter()
            .filter_map(|(_, p, others)| {
                let liveliest = others.iter().filter_map(|o| o.last_message_ms_ago).min()?;
                match p.last_message_ms_ago {
                    // Only once the others have talked for a while: in a new or idle cluster
                    // a correct backup may have had nothing to send yet, while after the
                    // first batch it votes within milliseconds.
                    None => {
                        let talking_for =
                            others.iter().filter_map(|o| o.first_message_ms_ago).max()?;
                        (talking_for >= SILENCE_MS).then_some(u64::MAX)
                    }
                    Some(age) if age >= liveliest + SILENCE_MS => Some(age),
                    _ => None,
                }
            })
            .collect();
        if silent.len() >= quorum_of_witnesses {
            let shortest = silent.iter().min().copied().unwrap_or(u64::MAX);
            let since = if shortest == u64::MAX {
                "never heard from".to_string()
            } else {
                format!("silent for {} s", shortest / 1000)
            };
            why.push(format!(
                "{since} while the others talk, seen by {} peers",
                silent.len()
            ));
        }
        let late: Vec<u64> = views
            .iter()
            .filter_map(|(_, p, others)| {
                let mine = p.lateness_ms?;
                let theirs = others
                    .iter()
                    .filter_map(|o| o.lateness_ms)
                    .max()
                    .unwrap_or(0);
                (mine >= LATE_MS && mine >= 3 * theirs.max(1)).then_some(mine)
            })
            .collect();
        if late.len() >= quorum_of_witnesses {
            let mut sorted = late.clone();
            sorted.sort_unstable();
            why.push(format!(
                "its messages arrive about {} ms after the others', seen by {} peers",
                sorted[sorted.len() / 2],
                late.len()
            ));
        }
        for c in clients {
            if let Some(v) = c.replicas.iter().find(|v| v.id == target) {
                if v.disagreeing_replies > 0 {
                    why.push(format!(
                        "{} of {} replies to client {} disagreed with the agreed result",
                        v.disagreeing_replies, v.compared_replies, c.client
                    ));
                }
                if v.auth_failures > 0 {
                    why.push(format!(
                        "{} replies to client {} did not authenticate",
                        v.auth_failures, c.client
                    ));
                }
            }
        }
        if !why.is_empty() {
            out.push(Suspect { id: target, why });
        }
    }
    out
}

pub fn print_suspects(suspects: &[Suspect]) {
    if suspects.is_empty() {
        println!("suspects:    none");
        return;
    }
    for (i, s) in suspects.iter().enumerate() {
        let label = if i == 0 { "suspects:" } else { "" };
        println!("{label:<12} replica {}: {}", s.id, s.why.join("; "));
    }
}

pub fn suspects_json(suspects: &[Suspect]) -> String {
    let items: Vec<String> = suspects
        .iter()
        .map(|s| {
            let why: Vec<String> = s.why.iter().map(|w| crate::up::json_string(w)).collect();
            format!("{{\"id\":{},\"why\":[{}]}}", s.id, why.join(","))
        })
        .collect();
    format!("[{}]", items.join(","))
}

pub fn clients_json(clients: &[ClientReport]) -> String {
    format!(
        "[{}]",
        clients
            .iter()
            .map(|c| c.to_json())
            .collect::<Vec<_>>()
            .join(",")
    )
}

#[cfg(test)]
mod port_tests {
    use super::*;
    use replica::localhost::StartError;

    #[test]
    fn a_replica_that_could_not_listen_is_told_apart() {
        let listen = replica::driver::node::NodeError::Listen {
            address: "127.0.0.1:21001".into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let exited = |tail: String| {
            anyhow::Error::from(StartError::Exited {
                id: 1,
                status: "exit status: 1".into(),
                log: "replica-1.log".into(),
                tail,
            })
        };
        let why = lost_port_race(&exited(format!("starting\nError: {listen}")));
        assert!(
            why.as_deref()
                .is_some_and(|w| w.starts_with("replica 1 cannot listen on 127.0.0.1:21001")),
            "{why:?}"
        );
        assert_eq!(lost_port_race(&exited("bad keys".into())), None);
        assert_eq!(lost_port_race(&anyhow::anyhow!("cannot listen on x")), None);
    }
}

#[cfg(test)]
pub(crate) mod suspect_tests {
    use super::*;
    use replica::driver::peers::PeerReport;
    use replica::driver::status::ClientView;

    /// Four replicas (f = 1) with made-up keys.
    pub(crate) fn config() -> ClusterConfig {
        let mut seed = 3u8;
        replica::config::generate(
            1,
            (0..4).map(|i| format!("127.0.0.1:{}", 9100 + i)).collect(),
            &[],
            replica::config::ProtocolConfig::default(),
            &mut |buf: &mut [u8]| {
                for b in buf.iter_mut() {
                    seed = seed.wrapping_mul(37).wrapping_add(11);
                    *b = seed;
                }
            },
        )
        .expect("config")
        .config
    }

    /// Four replicas that heard from each other 10 ms ago; `about(observer, peer)` adjusts.
    fn reports(about: impl Fn(u32, &mut PeerReport)) -> Vec<ReplicaReport> {
        (0..4u32)
            .map(|me| {
                let peers = (0..4u32)
                    .filter(|p| *p != me)
                    .map(|id| {
                        let mut p = PeerReport {
                            id,
                            last_message_ms_ago: Some(10),
                            first_message_ms_ago: Some(60_000),
                            lateness_ms: Some(2),
                            ..Default::default()
                        };
                        about(me, &mut p);
                        p
                    })
                    .collect();
                let status = ReplicaStatus {
                    id: me,
                    peers,
                    ..Default::default()
                };
                ReplicaReport {
                    id: me,
                    address: String::new(),
                    status: Some(status),
                    lag: Some(0),
                    health: "ok",
                }
            })
            .collect()
    }

    fn named(s: &[Suspect]) -> Vec<(u32, String)> {
        s.iter().map(|s| (s.id, s.why.join("; "))).collect()
    }

    #[test]
    fn names_replicas_from_what_the_others_report() {
        let config = config();
        assert!(
            suspects(&config, &reports(|_, _| {}), &[]).is_empty(),
            "a quiet healthy cluster has no suspects"
        );

        let s = suspects(
            &config,
            &reports(|_, p| {
                if p.id == 2 {
                    p.auth_failures = 10
                }
            }),
            &[],
        );
        assert_eq!(
            named(&s),
            vec![(2, "30 bad authenticators seen by 3 peers".to_string())]
        );

        let s = suspects(
            &config,
            &reports(|_, p| {
                if p.id == 2 {
                    p.last_message_ms_ago = None
                }
            }),
            &[],
        );
        assert_eq!(s.len(), 1);
        assert!(
            s[0].id == 2 && s[0].why[0].contains("never heard from"),
            "{s:?}"
        );
        // A new cluster whose other replicas began to talk a moment ago: not yet suspect.
        let s = suspects(
            &config,
            &reports(|_, p| {
                p.first_message_ms_ago = Some(500);
                if p.id == 2 {
                    p.last_message_ms_ago = None;
                    p.first_message_ms_ago = None;
                }
            }),
            &[],
        );
        assert!(s.is_empty(), "{s:?}");

        // Late according to one observer only: not enough witnesses (f+1 = 2).
        let s = suspects(
            &config,
            &reports(|me, p| {
                if p.id == 2 && me == 0 {
                    p.lateness_ms = Some(500)
                }
            }),
            &[],
        );
        assert!(s.is_empty(), "{s:?}");
        let s = suspects(
            &config,
            &reports(|me, p| {
                if p.id == 2 && me != 3 {
                    p.lateness_ms = Some(500)
                }
            }),
            &[],
        );
        assert!(
            s.len() == 1 && s[0].why[0].contains("500 ms after the others'"),
            "{s:?}"
        );

        // Votes in a view whose primary someone proved to equivocate are the primary's doing.
        let s = suspects(
            &config,
            &reports(|me, p| {
                if p.id == 0 && me == 2 {
                    p.equivocations = 1;
                    p.equivocation_views = vec![0];
                }
                if p.id == 1 {
                    p.conflicting_votes = 5;
                    p.conflicting_votes_by_view = vec![(0, 5)];
                }
                if p.id == 3 {
                    p.conflicting_votes = 4;
                    p.conflicting_votes_by_view = vec![(1, 4)];
                }
            }),
            &[],
        );
        let ids: Vec<u32> = s.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![0, 3], "{s:?}");

        // Only clients see lies.
        let client = ClientReport {
            client: 1,
            replicas: vec![ClientView {
                id: 1,
                disagreeing_replies: 7,
                compared_replies: 9,
                auth_failures: 0,
            }],
            ..Default::default()
        };
        let s = suspects(&config, &reports(|_, _| {}), &[client]);
        assert_eq!(
            named(&s),
            vec![(
                1,
                "7 of 9 replies to client 1 disagreed with the agreed result".to_string()
            )]
        );
    }
}
