//! The replica daemon: runs one replica of the bftfs file service until SIGINT/SIGTERM.
//!
//! It reads the cluster config (public: addresses and public keys) and this replica's secrets
//! file (its signing key and pairwise MAC keys), opens or creates its data directory, restores
//! itself from the newest checkpoint and its write-ahead log, and serves. Two programs run it
//! with the same options: `bftfs-replica` and `bftfs replica` (so that one installed `bftfs`
//! is enough); each sets up logging first, from its own `-v`/`-q`/`--log-file`.

use crate::config::{ClusterConfig, ReplicaSecrets};
use crate::driver::{node, status::ReplicaStatus};
use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use sd_notify::NotifyState;
use state_abstraction::fs::FileService;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the long help of both programs says about the daemon.
pub const ABOUT: &str = "Run one replica of a bftfs cluster";
pub const LONG_ABOUT: &str = "Runs one replica of a bftfs cluster: it orders file operations with \
                              the other replicas (PBFT), executes them on the file service kept in \
                              --data-dir, and answers clients. Keys and the cluster config come \
                              from `bftfs keygen`; `bftfs up` starts a whole local cluster for you.";

/// The `bftfs-replica` program's command line: the daemon's options and its logging options
/// (`bftfs replica` takes the same, its logging options being `bftfs`'s own). Public so that
/// `bftfs man` can write its manual page.
#[derive(clap::Parser, Debug)]
#[command(name = "bftfs-replica", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(flatten)]
    pub replica: ReplicaArgs,
    /// More log detail (-v debug, -vv trace); overrides RUST_LOG.
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Less log detail (-q warnings and errors only, -qq errors only); overrides RUST_LOG.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// Append the log to FILE (plain text) instead of writing it to stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// The daemon's options (logging options belong to the program that runs it).
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicaArgs {
    /// Cluster config (JSON, from `bftfs keygen`): every replica's address and public key.
    #[arg(long)]
    pub config: PathBuf,
    /// This replica's secrets file (JSON, mode 0600, from `bftfs keygen`); it names the replica.
    #[arg(long)]
    pub secrets: PathBuf,
    /// Directory for this replica's files, checkpoints and write-ahead log (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Misbehave on purpose, for fault tests: mute | slow[:MS] | lie | equivocate |
    /// bad-auth[:PERCENT] | wrong-checkpoint | corrupt-state[:SECONDS[:TIMES]]. Only in builds
    /// with the cargo feature `byzantine`.
    #[arg(long, value_name = "MODE")]
    pub byzantine: Option<String>,
    /// Listen for replicas and clients on HOST:PORT instead of the address the cluster
    /// config gives for this replica, e.g. 0.0.0.0:7000 behind NAT, port forwarding or in a
    /// container, where the advertised address (what the others connect to) is not one this
    /// host has. [default: the advertised address]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Serve the replica's metrics in the Prometheus text format at
    /// http://HOST:PORT/metrics (plain HTTP; keep it inside your network).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

fn read_text(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// Runs the replica until it is told to stop (Ok) or fails.
pub fn run(args: ReplicaArgs) -> anyhow::Result<()> {
    let mut options = run_options(args.byzantine.as_deref())?;
    let config = ClusterConfig::from_json(&read_text(&args.config, "cluster config")?)
        .with_context(|| format!("{} is not a valid cluster config", args.config.display()))?;
    let secrets = ReplicaSecrets::from_json(&read_text(&args.secrets, "secrets file")?)
        .with_context(|| {
            format!(
                "{} is not a valid replica secrets file",
                args.secrets.display()
            )
        })?;
    let id = secrets.id;
    tracing::debug!(
        config = %args.config.display(),
        secrets = %args.secrets.display(),
        f = config.f,
        replicas = config.n(),
        clients = config.clients.len(),
        "configuration read"
    );
    let Some(me) = config.replicas.get(id.0 as usize).cloned() else {
        bail!(
            "the secrets file is for replica {}, but the cluster config has only {} replicas",
            id.0,
            config.n()
        );
    };
    // The public key in the config must be ours, or every message we sign would be refused.
    secrets.check_against(&config).with_context(|| {
        format!(
            "{} does not belong to the cluster in {}",
            args.secrets.display(),
            args.config.display()
        )
    })?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    let _lock = lock_data_dir(&args.data_dir)?;
    let listener = match &args.listen {
        Some(address) => node::bind_at(address)?,
        None => node::bind(&config, id)?,
    };

    let mut service = FileService::open(&args.data_dir.join("fs")).with_context(|| {
        format!(
            "cannot open the file service in {}",
            args.data_dir.display()
        )
    })?;
    let squash: std::collections::BTreeMap<_, _> = config
        .clients
        .iter()
        .filter(|c| !c.squash.is_none())
        .map(|c| (c.id, c.squash))
        .collect();
    for (client, mode) in &squash {
        tracing::info!(client = client.0, ?mode, "client's stated uid/gid squashed");
    }
    service.set_squash(squash);
    let config = Arc::new(config);
    let (replica, wal) = node::restore_replica(
        config.clone(),
        &secrets,
        service,
        &args.data_dir.join("wal"),
    )?;
    tracing::info!(
        replica = id.0,
        address = %me.address,
        listen = %args.listen.as_deref().unwrap_or(&me.address),
        last_executed = replica.last_executed().0,
        view = replica.view().0,
        data_dir = %args.data_dir.display(),
        "replica started"
    );

    let stop = Arc::new(AtomicBool::new(false));
    // A parent that blocked these signals passes the mask on through exec; unblock them, or
    // SIGTERM (from `bftfs down`, or when the parent dies) would never arrive.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    let _ = stop_signals.thread_unblock();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A plain flag set from the handler; the core loop checks it between steps.
        let _ = signal_hook::flag::register(signal, stop.clone());
    }
    let mut initial = ReplicaStatus::new(id.0);
    initial.declared_byzantine = args.byzantine.clone();
    let status = Arc::new(Mutex::new(initial));
    // Kept until the replica stops: dropping it closes the listener.
    let _metrics = match &args.metrics_addr {
        Some(address) => {
            let (registry, timings) =
                crate::driver::metrics::replica_registry(id.0, status.clone());
            options.timings = Some(timings);
            let server = crate::metrics::MetricsServer::start(address, Arc::new(registry))
                .with_context(|| format!("--metrics-addr {address}: cannot listen"))?;
            tracing::info!(address = %server.address(), "metrics at http://{}/metrics", server.address());
            Some(server)
        }
        None => None,
    };
    #[cfg(feature = "byzantine")]
    if let Some(crate::driver::byzantine::Mode::CorruptState { every_ms, times }) =
        options.byzantine
    {
        corrupt_state(
            args.data_dir.join("fs").join("tree").join("root"),
            id.0,
            every_ms,
            times,
            stop.clone(),
        );
    }
    let status_file = args.data_dir.join("status.json");
    {
        let status = status.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut systemd = SystemdNotifier {
                watchdog: watchdog_interval().map(Watchdog::new),
                ..Default::default()
            };
            // Often enough to keep a short watchdog interval fed (at half of it, see Watchdog).
            let pause = systemd.watchdog.as_ref().map_or(STATUS_FILE_EVERY, |w| {
                (w.interval / 4).min(STATUS_FILE_EVERY)
            });
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = status.lock() {
                    let tmp = status_file.with_extension("tmp");
                    if std::fs::write(&tmp, s.to_json()).is_ok() {
                        let _ = std::fs::rename(&tmp, &status_file);
                    }
                    systemd.on_status(&s);
                }
                std::thread::sleep(pause);
            }
        });
    }
    let result = node::run_with(
        config, secrets, replica, wal, listener, status, stop, options,
    );
    // Tells systemd the stop is ours, so it does not take the exit for a crash while waiting.
    let _ = notify_systemd(&[NotifyState::Stopping]);
    result?;
    tracing::info!(replica = id.0, "replica stopped");
    Ok(())
}

/// `STATUS=` no more often than this: systemd logs nothing for it, but each one is a message
/// to PID 1, and a replica's figures change many times a second under load.
const SYSTEMD_STATUS_EVERY: Duration = Duration::from_secs(2);

/// How often the status file is rewritten (and systemd told what changed).
const STATUS_FILE_EVERY: Duration = Duration::from_millis(500);

/// Readiness and status for a `Type=notify` unit (nothing is sent where NOTIFY_SOCKET is unset).
#[derive(Default)]
struct SystemdNotifier {
    ready: bool,
    last: Option<(std::time::Instant, String)>,
    /// A socket that refused once is not tried again: one warning, not one every 2 s.
    failed: bool,
    /// `WatchdogSec=` of the unit, when it set one.
    watchdog: Option<Watchdog>,
}

/// The unit's watchdog interval, as systemd passes it (`sd_watchdog_enabled(3)`):
/// `WATCHDOG_USEC`, for this process unless `WATCHDOG_PID` names another one (a program this
/// process started that inherited the variables).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Decides when to say `WATCHDOG=1`: at half the interval (systemd's advice, so that one late
/// message is not fatal), and only if the core loop has refreshed the status since the last
/// one. A core stuck in a step (a hung disk, a deadlock) stops refreshing it, the pings stop,
/// and systemd restarts the replica, which then recovers from its log like after a crash.
struct Watchdog {
    interval: Duration,
    last_ping: Option<std::time::Instant>,
    /// `ReplicaStatus::updates` at the last ping.
    updates_seen: u64,
}

impl Watchdog {
    fn new(interval: Duration) -> Watchdog {
        Watchdog {
            interval,
            last_ping: None,
            updates_seen: 0,
        }
    }

    /// Whether to ping now, given how often the core has refreshed the status so far.
    fn due(&mut self, updates: u64, now: std::time::Instant) -> bool {
        let alive = updates > self.updates_seen;
        let time = self
            .last_ping
            .is_none_or(|at| now.saturating_duration_since(at) >= self.interval / 2);
        if alive && time {
            self.updates_seen = updates;
            self.last_ping = Some(now);
            return true;
        }
        false
    }
}

impl SystemdNotifier {
    fn on_status(&mut self, status: &ReplicaStatus) {
        // The listening socket is bound before the core starts, and the core fills in the
        // status from its loop: once it has, the replica answers peers and clients.
        if status.updates == 0 || self.failed {
            return;
        }
        self.send_status(status);
        if !self.ready {
            return;
        }
        if let Some(watchdog) = &mut self.watchdog {
            if watchdog.due(status.updates, std::time::Instant::now()) {
                self.failed = !notify_systemd(&[NotifyState::Watchdog]);
            }
        }
    }

    /// READY=1 with the first status line, then a `STATUS=` line when the figures change.
    fn send_status(&mut self, status: &ReplicaStatus) {
        let line = status.systemd_status();
        let due = match &self.last {
            None => true,
            Some((at, sent)) => *sent != line && at.elapsed() >= SYSTEMD_STATUS_EVERY,
        };
        if !due {
            return;
        }
        let sent = if self.ready {
            notify_systemd(&[NotifyState::Status(&line)])
        } else {
            notify_systemd(&[NotifyState::Ready, NotifyState::Status(&line)])
        };
        self.failed = !sent;
        self.ready = true;
        self.last = Some((std::time::Instant::now(), line));
    }
}

fn notify_systemd(state: &[NotifyState]) -> bool {
    // The environment stays set (unset_env false): status lines follow the readiness message.
    match sd_notify::notify(false, state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
            false
        }
    }
}

#[cfg(feature = "byzantine")]
fn run_options(byzantine: Option<&str>) -> anyhow::Result<node::RunOptions> {
    let byzantine = match byzantine {
        None => None,
        Some(text) => Some(
            text.parse::<crate::driver::byzantine::Mode>()
                .map_err(|e| anyhow::anyhow!("--byzantine: {e}"))?,
        ),
    };
    Ok(node::RunOptions {
        byzantine,
        ..Default::default()
    })
}

#[cfg(not(feature = "byzantine"))]
fn run_options(byzantine: Option<&str>) -> anyhow::Result<node::RunOptions> {
    if let Some(mode) = byzantine {
        bail!(
            "--byzantine {mode}: this bftfs-replica was built without Byzantine modes; \
             rebuild with `cargo build --features byzantine`"
        );
    }
    Ok(node::RunOptions::default())
}

/// `corrupt-state`: damages a stored file every `every_ms`, `times` times, behind the file
/// service's back (the service and the protocol core know nothing of it).
#[cfg(feature = "byzantine")]
fn corrupt_state(tree_root: PathBuf, id: u32, every_ms: u64, times: u32, stop: Arc<AtomicBool>) {
    use crate::driver::byzantine::corrupt_one_file;
    use crate::rng::Rng;
    std::thread::spawn(move || {
        let mut rng = Rng::new(0xC0_22 ^ u64::from(id));
        let mut done = 0;
        while done < times && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(every_ms));
            match corrupt_one_file(&tree_root, &mut rng) {
                Ok(Some(path)) => {
                    done += 1;
                    tracing::warn!(replica = id, file = %path.display(), done, "corrupted a stored file on purpose");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(replica = id, error = %e, "could not corrupt a file"),
            }
        }
    });
}

/// Two replicas over one data directory would corrupt it: the second one refuses to start.
fn lock_data_dir(dir: &Path) -> anyhow::Result<Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut file, _)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "the data directory {} is in use by another running replica (pid {})",
                dir.display(),
                holder.trim()
            );
        }
    };
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn watchdog_pings_at_half_the_interval_while_the_core_refreshes_its_status() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = Watchdog::new(Duration::from_secs(2));
        assert!(w.due(1, at(0)), "the first refresh pings");
        assert!(!w.due(5, at(500)), "pinged before half the interval");
        assert!(w.due(6, at(1000)));
        // The core stopped refreshing: no ping, however long it has been.
        assert!(!w.due(6, at(2000)));
        assert!(!w.due(6, at(9000)));
        // It runs again: a ping at once.
        assert!(w.due(7, at(9100)));
    }
}
