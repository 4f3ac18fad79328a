//! [`LocalCluster`]: the 3f+1 `bftfs-replica` processes of `bftfs up`, restarted if they die.

use super::read_config;
use anyhow::{Context, Result};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{kill, pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;
use replica::config::ClusterConfig;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How `up` starts a replica: a program and the arguments before the replica's options.
#[derive(Clone, Debug)]
struct ReplicaProgram {
    program: PathBuf,
    prefix: Vec<String>,
}

/// The replica daemon to run: `$BFTFS_REPLICA_BIN`, else the `bftfs-replica` beside this
/// `bftfs` (as `cargo build` leaves them), else this very program as `bftfs replica`, which
/// runs the same daemon. PATH is not searched: a `bftfs-replica` found there may be of
/// another version than this `bftfs`, and this program always matches itself.
fn replica_program() -> Result<ReplicaProgram> {
    let plain = |program: PathBuf| ReplicaProgram {
        program,
        prefix: Vec::new(),
    };
    if let Some(p) = std::env::var_os("BFTFS_REPLICA_BIN") {
        return Ok(plain(PathBuf::from(p)));
    }
    let exe = std::env::current_exe().context("cannot find the bftfs executable")?;
    if let Some(dir) = exe.parent() {
        let p = dir.join("bftfs-replica");
        if p.is_file() {
            return Ok(plain(p));
        }
        // `cargo test` runs bftfs from target/<profile>/, the replica binary sits there too.
        if let Some(p) = dir
            .parent()
            .map(|d| d.join("bftfs-replica"))
            .filter(|p| p.is_file())
        {
            return Ok(plain(p));
        }
    }
    Ok(ReplicaProgram {
        program: exe,
        prefix: vec!["replica".to_string()],
    })
}

/// What `bftfs up` adds to some replicas' command lines.
#[derive(Clone, Debug, Default)]
pub struct ReplicaExtras {
    /// Replicas that misbehave on purpose: (id, mode as `bftfs-replica --byzantine` takes it).
    pub byzantine: Vec<(u32, String)>,
    /// Replica i serves Prometheus metrics on 127.0.0.1:(port+i).
    pub metrics_port: Option<u16>,
    /// `-v`/`-q` flags for every replica (so `bftfs -v up` makes the replicas' logs as
    /// detailed as its own).
    pub log_flags: Vec<String>,
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
    program: ReplicaProgram,
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
        if !extras.log_flags.is_empty() {
            for i in 0..config.n() {
                extra_args.insert(i, extras.log_flags.clone());
            }
        }
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
                info!("replica {i} serves its metrics at http://{address}/metrics");
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
                if let Ok(pid) = i32::try_from(c.id()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
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
    program: &ReplicaProgram,
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
    let mut cmd = Command::new(&program.program);
    cmd.args(&program.prefix);
    // Readiness is the serving bftfs process's to report: a replica it starts would otherwise
    // answer to the same NOTIFY_SOCKET, which systemd refuses from a PID not the unit's main one.
    cmd.env_remove("NOTIFY_SOCKET");
    // Nor is the unit's watchdog theirs to feed.
    cmd.env_remove("WATCHDOG_USEC");
    cmd.env_remove("WATCHDOG_PID");
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: pthread_sigmask and prctl are (the empty set is built
    // on the stack, nothing allocates).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            // The serving process blocks SIGINT/SIGTERM to handle them on one thread; a blocked
            // mask is inherited across exec, and a replica must hear SIGTERM.
            pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            // A replica must not outlive the `bftfs` that started it (e.g. killed with
            // SIGKILL): an orphan would keep its port and its data directory, and the next `up`
            // would find both taken.
            set_pdeathsig(Signal::SIGTERM)?;
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
        .with_context(|| format!("cannot start {}", program.program.display()))
}
