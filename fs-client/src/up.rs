//! `bftfs up` / `down` / `status` for a cluster started on this machine, and `bftfs mount` of
//! a cluster that runs elsewhere.
//!
//! `up` checks its inputs (mount point, data directory), then serves the mount: with `--f 0`
//! from one in-process file service (no replication, `serve_unreplicated`), with
//! `--f N ≥ 1` from 3N+1 local replica processes (`serve_replicated`). With `--detach` it
//! re-executes itself in the background with the hidden `--foreground-child` flag and returns
//! once the mount answers. The serving process records itself in a pid file named after the
//! mount point, which is how `down` and `status` find it.
//!
//! Data directory layout (per mount point unless `--data-dir` is given):
//! - `BFTFS_CLUSTER`: which cluster this directory belongs to (id and f);
//! - `service/`: the file service's directory (f = 0);
//! - `lock`: held (flock) by the serving process;
//! - `up.log`: the log of a detached `up`.

use crate::cluster;
use crate::health::{self, Health};
use crate::local::LocalTransport;
use crate::mounting::{
    self, check_can_mount, check_mount_point, mount_path, mounted_fstype, FS_TYPE,
};
use crate::options::MountOptions;
use crate::transport::FsTransport;
use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getegid, geteuid, setsid, Pid};
use replica::driver::status::{unix_ms, CallReport, ClientReport};
use serde::Serialize;
use sha2::{Digest, Sha256};
use state_abstraction::fs::{Caller, FsOp, FsReply, FsRequest, Handle, SetAttrs};
use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

const MARKER: &str = "BFTFS_CLUSTER";
const SERVICE_DIR: &str = "service";
const LOCK_FILE: &str = "lock";
const LOG_FILE: &str = "up.log";

/// How long `up --detach` waits for the mount to answer.
const DETACH_WAIT: Duration = Duration::from_secs(60);
/// How often the unreplicated service saves its state while serving.
const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How long `down` waits for the serving process to stop after SIGTERM.
const STOP_WAIT: Duration = Duration::from_secs(20);

/// The logging flags (`-v`, `-q`, `--log-file ABS`) a background process of `--detach` gets,
/// so that it logs where and as much as the command that started it.
static FORWARDED_LOG_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

pub fn set_forwarded_log_args(args: Vec<String>) {
    let _ = FORWARDED_LOG_ARGS.set(args);
}

fn forwarded_log_args() -> &'static [String] {
    FORWARDED_LOG_ARGS
        .get()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// What `bftfs up` was asked to do.
#[derive(Clone, Debug)]
pub struct UpArgs {
    pub mountpoint: PathBuf,
    pub f: u32,
    pub data_dir: Option<PathBuf>,
    pub detach: bool,
    /// Zyzzyva's speculative fast path (false: `--no-fast-path`, commit path only).
    pub fast_path: bool,
    pub options: MountOptions,
    /// Replicas that misbehave on purpose: (replica id, mode as `bftfs-replica --byzantine`
    /// takes it).
    pub byzantine: Vec<(u32, String)>,
    /// `--metrics-port`: replica i serves Prometheus metrics on 127.0.0.1:(port+i), the mount
    /// on the port after the replicas' (its `metrics=` option, unless given).
    pub metrics_port: Option<u16>,
    /// Set on the re-executed background process of `--detach`.
    pub foreground_child: bool,
}

/// Parses `--byzantine ID:MODE` arguments for a cluster of 3f+1 replicas.
pub fn parse_byzantine(raw: &[String], f: u32) -> Result<Vec<(u32, String)>> {
    let mut out: Vec<(u32, String)> = Vec::new();
    for text in raw {
        let Some((id, mode)) = text.split_once(':') else {
            bail!("--byzantine {text}: expected ID:MODE, e.g. 2:lie");
        };
        let id: u32 = id
            .parse()
            .map_err(|_| anyhow!("--byzantine {text}: `{id}` is not a replica number"))?;
        if f == 0 || id >= 3 * f + 1 {
            bail!(
                "--byzantine {text}: there is no replica {id} (the cluster has {} replicas)",
                3 * f + 1
            );
        }
        if out.iter().any(|(i, _)| *i == id) {
            bail!("--byzantine: replica {id} is given two modes");
        }
        replica::driver::check_byzantine_mode(mode).map_err(|e| anyhow!("{e}"))?;
        out.push((id, mode.to_string()));
    }
    if out.len() > f as usize {
        warn!(
            "{} Byzantine replicas is more than f={f}: the cluster may stop or go wrong",
            out.len()
        );
    }
    Ok(out)
}

/// Checks that `--metrics-port` leaves room for the ports it names: the 3f+1 replicas' and,
/// after them, the mount's.
pub fn check_metrics_port(port: Option<u16>, f: u32) -> Result<Option<u16>> {
    let Some(port) = port else {
        return Ok(None);
    };
    let n = replicas_of(f);
    if port == 0 || u64::from(port) + n > u64::from(u16::MAX) {
        bail!(
            "--metrics-port {port}: the {n} replicas and the mount need ports {port}..{} within 1..=65535",
            u64::from(port) + n
        );
    }
    Ok(Some(port))
}

/// Replicas of a local cluster tolerating f faults (none with f = 0: one in-process service).
fn replicas_of(f: u32) -> u64 {
    if f == 0 {
        0
    } else {
        3 * u64::from(f) + 1
    }
}

/// Where `up --metrics-port PORT` has the mount serve its metrics: the port after the
/// replicas'.
pub fn mount_metrics_address(port: u16, f: u32) -> String {
    format!("127.0.0.1:{}", u64::from(port) + replicas_of(f))
}

/// Serves the mount's metrics where its options say (`metrics=HOST:PORT`), over `transport`
/// timed for them; nothing when they say nowhere. The listener stops with the handle.
fn with_metrics(
    options: &MountOptions,
    transport: Arc<dyn FsTransport>,
    replicated: Option<Arc<cluster::ReplicatedTransport>>,
) -> Result<(
    Arc<dyn FsTransport>,
    Option<replica::metrics::MetricsServer>,
)> {
    match &options.metrics {
        None => Ok((transport, None)),
        Some(address) => {
            let (metered, server) = crate::metrics::serve(address, transport, replicated)?;
            Ok((metered, Some(server)))
        }
    }
}

/// `$XDG_DATA_HOME/bftfs`, else `~/.local/share/bftfs`.
pub fn base_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("bftfs"));
    }
    match std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/bftfs")),
        None => bail!("neither XDG_DATA_HOME nor HOME is set; pass --data-dir"),
    }
}

/// A short, stable name for a mount point: its last component (for people) and a hash of the
/// whole path (for uniqueness).
fn mount_key(mnt: &Path) -> String {
    let digest = Sha256::digest(mnt.as_os_str().as_bytes());
    let hex = hex::encode(&digest[..8]);
    let name: String = mnt
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .take(40)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| "root".to_string());
    format!("{name}-{hex}")
}

pub fn default_data_dir(mnt: &Path) -> Result<PathBuf> {
    Ok(base_dir()?.join(mount_key(mnt)))
}

fn pid_file(mnt: &Path) -> Result<PathBuf> {
    Ok(base_dir()?
        .join("run")
        .join(format!("{}.pid", mount_key(mnt))))
}

/// What the serving process records about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct PidInfo {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub data_dir: PathBuf,
    pub f: u32,
}

impl PidInfo {
    fn render(&self) -> String {
        format!(
            "pid={}\nmountpoint={}\ndata_dir={}\nf={}\n",
            self.pid,
            self.mountpoint.display(),
            self.data_dir.display(),
            self.f
        )
    }

    fn parse(text: &str) -> Option<PidInfo> {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
        };
        Some(PidInfo {
            pid: get("pid")?.parse().ok()?,
            mountpoint: PathBuf::from(get("mountpoint")?),
            data_dir: PathBuf::from(get("data_dir")?),
            f: get("f")?.parse().ok()?,
        })
    }
}

fn read_pid_info(mnt: &Path) -> Result<Option<PidInfo>> {
    let path = pid_file(mnt)?;
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(PidInfo::parse(&t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

fn write_pid_info(info: &PidInfo) -> Result<()> {
    let path = pid_file(&info.mountpoint)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Written whole, then renamed, so `down` never reads half a file.
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, info.render())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Removes the pid file if it still names `pid` (a later `up` may have replaced it).
fn remove_pid_info(mnt: &Path, pid: u32) {
    if let (Ok(path), Ok(Some(info))) = (pid_file(mnt), read_pid_info(mnt)) {
        if info.pid == pid {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `/proc/<pid>`, if `pid` names a process.
fn process(pid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(pid).ok()?).ok()
}

/// Whether `pid` is a running (not zombie) process.
fn alive(pid: u32) -> bool {
    use procfs::process::ProcState;
    process(pid)
        .and_then(|p| p.stat().ok()?.state().ok())
        .is_some_and(|state| !matches!(state, ProcState::Zombie | ProcState::Dead))
}

/// Whether `pid` is a bftfs process (so a recycled pid is never signalled).
fn is_bftfs(pid: u32) -> bool {
    let Some(p) = process(pid) else {
        return false;
    };
    let exe_is_bftfs = p.exe().ok().is_some_and(|exe| {
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("bftfs"))
    });
    let argv0_is_bftfs = p
        .cmdline()
        .ok()
        .and_then(|argv| argv.into_iter().next())
        .is_some_and(|a| a.ends_with("bftfs"));
    exe_is_bftfs || argv0_is_bftfs
}

fn random_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| anyhow!("no random bytes: {e}"))?;
    Ok(hex::encode(bytes))
}

/// The identity written in a data directory's marker file.
#[derive(Clone, Debug, PartialEq)]
struct Marker {
    cluster_id: String,
    f: u32,
}

impl Marker {
    fn render(&self) -> String {
        format!(
            "# bftfs data directory, written by `bftfs up`; do not edit\nformat=1\ncluster_id={}\nf={}\n",
            self.cluster_id, self.f
        )
    }

    fn parse(text: &str) -> Option<Marker> {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
        };
        if get("format")? != "1" {
            return None;
        }
        Some(Marker {
            cluster_id: get("cluster_id")?.to_string(),
            f: get("f")?.parse().ok()?,
        })
    }
}

/// Makes `dir` this cluster's data directory, or refuses with one sentence: it belongs to a
/// cluster with another f, or it is a non-empty directory that is not a bftfs one.
fn claim_data_dir(dir: &Path, f: u32) -> Result<Marker> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let marker_path = dir.join(MARKER);
    match std::fs::read_to_string(&marker_path) {
        Ok(text) => {
            let Some(m) = Marker::parse(&text) else {
                bail!("data directory {} has an unreadable {MARKER} file; it belongs to another cluster or another bftfs version", dir.display());
            };
            if m.f != f {
                bail!(
                    "data directory {} belongs to another cluster (f={}, id {}); use --f {} or another --data-dir",
                    dir.display(),
                    m.f,
                    m.cluster_id,
                    m.f
                );
            }
            Ok(m)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let not_empty = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read data directory {}", dir.display()))?
                .next()
                .is_some();
            if not_empty {
                bail!("data directory {} is not empty and is not a bftfs data directory (no {MARKER} file)", dir.display());
            }
            let m = Marker {
                cluster_id: random_id()?,
                f,
            };
            std::fs::write(&marker_path, m.render())
                .with_context(|| format!("cannot write {}", marker_path.display()))?;
            Ok(m)
        }
        Err(e) => bail!("cannot read {}: {e}", marker_path.display()),
    }
}

/// Takes the data directory's lock for the life of the returned file.
fn lock_data_dir(dir: &Path) -> Result<Flock<File>> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // A bftfs that was just killed may still be exiting (its files close only as it dies):
    // give it a few seconds before calling the directory busy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((unlocked, _)) => file = unlocked,
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "data directory {} is in use by another running bftfs process",
                dir.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn up(mut args: UpArgs) -> Result<()> {
    let mnt = mount_path(&args.mountpoint)?;
    if let (Some(port), None) = (args.metrics_port, &args.options.metrics) {
        args.options.metrics = Some(mount_metrics_address(port, args.f));
    }
    if mnt.as_os_str().as_bytes().contains(&b'\n') {
        bail!("mount point paths with a newline are not supported");
    }
    check_can_mount()?;
    if let Some(info) = read_pid_info(&mnt)? {
        if alive(info.pid) && is_bftfs(info.pid) {
            bail!(
                "bftfs up is already serving {} (pid {}); run `bftfs down {0}` first",
                mnt.display(),
                info.pid
            );
        }
    }
    check_mount_point(&mnt)?;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir(&mnt)?,
    };
    claim_data_dir(&data_dir, args.f)?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
    if args.detach && !args.foreground_child {
        // Tell the user now about a busy data directory, and about replica ports that move,
        // rather than through the child's log.
        let lock = lock_data_dir(&data_dir)?;
        if args.f >= 1 {
            cluster::prepare_local_cluster(&data_dir, args.f, args.fast_path)?;
        }
        drop(lock);
        return spawn_detached(&mnt, &data_dir, &args);
    }
    if args.f == 0 {
        serve_unreplicated(&mnt, &data_dir, &args)
    } else {
        serve_replicated(&mnt, &data_dir, &args)
    }
}

/// `up --f N` with N ≥ 1: start 3N+1 `bftfs-replica` processes on 127.0.0.1 (restarted if
/// they die) and mount them through the replicated transport.
fn serve_replicated(mnt: &Path, data_dir: &Path, args: &UpArgs) -> Result<()> {
    mounting::block_stop_signals();
    let _lock = lock_data_dir(data_dir)?;
    let config_path = cluster::prepare_local_cluster(data_dir, args.f, args.fast_path)?;
    let extras = cluster::ReplicaExtras {
        byzantine: args.byzantine.clone(),
        metrics_port: args.metrics_port,
        // Their logs stay in replica-<i>.log; only the level follows this command's.
        log_flags: forwarded_log_args()
            .iter()
            .filter(|a| *a == "-v" || *a == "-q")
            .cloned()
            .collect(),
    };
    let mut replicas = match cluster::LocalCluster::start_with(data_dir, &config_path, &extras) {
        // The ports were free when chosen, but another program (another `up` choosing at the
        // same moment) bound one before the replica did. The addresses are local, so move
        // them and try once more.
        Err(e) => match cluster::lost_port_race(&e) {
            Some(why) => {
                cluster::move_local_ports(&config_path, &why)?;
                cluster::LocalCluster::start_with(data_dir, &config_path, &extras)?
            }
            None => return Err(e),
        },
        Ok(started) => started,
    };
    let result = (|| {
        let config = cluster::read_config(&config_path)?;
        let (secrets, _client_lock) = cluster::claim_client(&config_path, None)?;
        let replicated = Arc::new(
            cluster::ReplicatedTransport::start(config, secrets, args.options.request_timeout)?
                .with_lock_cache(args.options.lock_cache)
                .with_lock_policy(args.options.locks, args.options.lock_idle),
        );
        replicated.start_lock_keeper();
        let _reporter =
            replicated.report_observations(config_path.parent().unwrap_or(Path::new(".")));
        let (transport, _metrics) =
            with_metrics(&args.options, replicated.clone(), Some(replicated))?;
        wait_until_answering(transport.as_ref(), data_dir)?;
        serve_cluster(mnt, data_dir, args, transport, "bftfs")
    })();
    replicas.stop();
    result
}

/// Waits until the cluster answers a request, so that a cluster that cannot work (a replica
/// that cannot bind, keys that do not match) is reported instead of a mount that hangs.
fn wait_until_answering(transport: &dyn FsTransport, data_dir: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        let answer = transport.call(FsRequest {
            caller: Caller::root(),
            op: FsOp::GetAttr { h: Handle::ROOT },
        });
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > DETACH_WAIT => bail!(
                "the cluster did not answer within {DETACH_WAIT:?} ({e}); see the replica logs in {}",
                data_dir.display()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `bftfs mount CONFIG MOUNTPOINT`: mount a cluster that runs elsewhere (or was started by
/// another `bftfs up`), with a client identity of its own.
pub fn mount(
    config_path: &Path,
    mountpoint: &Path,
    options: MountOptions,
    client: Option<&Path>,
    detach: bool,
    foreground_child: bool,
    quiet: bool,
) -> Result<()> {
    let mnt = mount_path(mountpoint)?;
    check_can_mount()?;
    check_mount_point(&mnt)?;
    let config = cluster::read_config(config_path)?;
    if detach && !foreground_child {
        let exe = std::env::current_exe().context("cannot find the bftfs executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("mount")
            .arg(config_path)
            .arg(&mnt)
            .arg("-o")
            .arg(options.to_arg())
            .arg("--foreground-child")
            .args(forwarded_log_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(c) = client {
            cmd.arg("--client").arg(c);
        }
        let mut child = spawn_in_new_session(&mut cmd)?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("bftfs mount failed ({status}): {}", err.trim());
            }
            if mounted_fstype(&mnt).as_deref() == Some(FS_TYPE) && std::fs::metadata(&mnt).is_ok() {
                if quiet {
                    return Ok(());
                }
                println!(
                    "bftfs: {} is mounted (cluster {}, pid {})",
                    mnt.display(),
                    config_path.display(),
                    child.id()
                );
                println!("  stop:  bftfs umount {}", mnt.display());
                return Ok(());
            }
            if started.elapsed() > DETACH_WAIT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the mount at {} did not answer within {DETACH_WAIT:?}",
                    mnt.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    mounting::block_stop_signals();
    let (secrets, _client_lock) = cluster::claim_client(config_path, client)?;
    let replicated = Arc::new(
        cluster::ReplicatedTransport::start(config, secrets, options.request_timeout)?
            .with_lock_cache(options.lock_cache)
            .with_lock_policy(options.locks, options.lock_idle),
    );
    replicated.start_lock_keeper();
    let _reporter = replicated.report_observations(config_path.parent().unwrap_or(Path::new(".")));
    let (transport, _metrics) = with_metrics(&options, replicated.clone(), Some(replicated))?;
    wait_until_answering(
        transport.as_ref(),
        config_path.parent().unwrap_or(Path::new(".")),
    )?;
    // The source column of the mount table names the cluster config, as fstab does: `mount -a`
    // recognises an fstab line as already mounted by its source and target, and `findmnt`
    // shows which cluster a mount serves. A path the option string cannot carry (a comma)
    // falls back to the plain name.
    let source = config_path
        .canonicalize()
        .ok()
        .and_then(|p| p.to_str().map(str::to_string))
        .filter(|p| !p.contains([',', ' ', '\t', '\n']))
        .unwrap_or_else(|| "bftfs".to_string());
    mounting::serve(&mnt, transport, &options, &source, || {
        if foreground_child {
            release_stderr();
        }
        if !foreground_child {
            println!(
                "bftfs: {} is mounted (cluster {})",
                mnt.display(),
                config_path.display()
            );
            println!("  stop:  Ctrl-C here, or `bftfs umount {}`", mnt.display());
            let _ = std::io::stdout().flush();
        }
        Ok(())
    })
}

/// A detached mount's stderr is a pipe to the `bftfs mount` that started it, which exits
/// once the mount answers. A later log line would then fail with EPIPE, and the logger's own
/// report of that failure (to stderr) would panic and take the mount down with it: a
/// refused buffered write, logged as a warning, did. Without `--log-file` such lines go
/// nowhere from then on, as with mount(8) without `log=`.
fn release_stderr() {
    use std::os::fd::AsRawFd;
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return;
    };
    // SAFETY: dup2 onto descriptor 2 replaces the pipe atomically; `null` stays owned here
    // and is closed on return, leaving the duplicate.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        tracing::debug!("cannot point stderr at /dev/null");
    }
}

/// `bftfs status --config CONFIG`: the replicas, and every client report written recently
/// next to CONFIG (clients of other machines write theirs elsewhere).
pub fn status_of_config(config_path: &Path, json: bool) -> Result<Health> {
    let config = cluster::read_config(config_path)?;
    let reports = cluster::probe_cluster(&config);
    let clients = ClientReport::read_all(config_path.parent().unwrap_or(Path::new(".")));
    let suspects = cluster::suspects(&config, &reports, &clients);
    let now = unix_ms();
    let verdict = health::verdict(
        Some(&config),
        &reports,
        &suspects,
        &health::fresh_clients(&clients, now),
        None,
        now,
    );
    if json {
        print_json(&ConfigStatusJson {
            config: config_path.to_string_lossy(),
            f: config.f,
            verdict: (&verdict).into(),
            replicas: &reports,
            clients: &clients,
            suspects: &suspects,
        })?;
    } else {
        println!(
            "cluster:     {} (f={}, {} replicas)",
            config_path.display(),
            config.f,
            config.n()
        );
        health::print(&verdict);
        cluster::print_reports(&reports);
        cluster::print_suspects(&suspects);
    }
    Ok(verdict.health)
}

/// What is serving the mount, for people.
fn describe(f: u32) -> String {
    if f == 0 {
        "unreplicated: --f 0, one local file service".to_string()
    } else {
        format!("f={f}: {} replicas on 127.0.0.1", 3 * f + 1)
    }
}

fn serve_unreplicated(mnt: &Path, data_dir: &Path, args: &UpArgs) -> Result<()> {
    // Before any thread starts, so that only the serving loop's signal thread sees them.
    mounting::block_stop_signals();
    let _lock = lock_data_dir(data_dir)?;
    let local = Arc::new(LocalTransport::open(&data_dir.join(SERVICE_DIR))?);
    // The service saves its table on flush; doing it periodically bounds what a crash of this
    // process (kill -9, power loss) can lose.
    let (stop_flusher, stopped) = mpsc::channel::<()>();
    let flusher = {
        let local = local.clone();
        std::thread::Builder::new()
            .name("bftfs-flush".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY) {
                    if let Err(e) = local.flush() {
                        warn!("saving the file service state failed: {e:#}");
                    }
                }
            })
            .context("cannot start the flush thread")?
    };
    let result =
        with_metrics(&args.options, local.clone(), None).and_then(|(transport, _metrics)| {
            serve_cluster(mnt, data_dir, args, transport, "bftfs-local")
        });
    drop(stop_flusher);
    let _ = flusher.join();
    let flushed = local.flush().context("cannot save the file service state");
    result.and(flushed)
}

/// Serves a mount over `transport` until it is unmounted, recorded in the pid file that
/// `down` and `status` read. Every kind of `up` ends here.
fn serve_cluster(
    mnt: &Path,
    data_dir: &Path,
    args: &UpArgs,
    transport: Arc<dyn FsTransport>,
    fsname: &str,
) -> Result<()> {
    give_new_root_to_caller(transport.as_ref())?;
    let info = PidInfo {
        pid: std::process::id(),
        mountpoint: mnt.to_path_buf(),
        data_dir: data_dir.to_path_buf(),
        f: args.f,
    };
    let quiet = args.foreground_child;
    let result = mounting::serve(mnt, transport, &args.options, fsname, || {
        write_pid_info(&info)?;
        if !quiet {
            print_started(mnt, data_dir, args.f, false);
        }
        Ok(())
    });
    remove_pid_info(mnt, info.pid);
    result
}

/// A new file system's root belongs to root (uid 0). When an ordinary user runs `up`, that
/// would give them a mount they cannot write to; so while the root directory is still empty
/// and root's, it is handed to the user who mounts it.
fn give_new_root_to_caller(local: &dyn FsTransport) -> Result<()> {
    let (uid, gid) = (geteuid().as_raw(), getegid().as_raw());
    if uid == 0 {
        return Ok(());
    }
    let call = |op: FsOp| {
        local
            .call(FsRequest {
                caller: Caller::root(),
                op,
            })
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!("cannot set up the root directory: {e}"))
    };
    let FsReply::Attr(attr) = call(FsOp::GetAttr { h: Handle::ROOT })? else {
        bail!("the file service answered getattr of the root with something else");
    };
    let empty = match call(FsOp::ReadDir {
        dir: Handle::ROOT,
        cookie: 0,
        count: 1,
        plus: false,
    })? {
        FsReply::ReadDir { entries, .. } => entries.is_empty(),
        _ => false,
    };
    if attr.uid == 0 && empty {
        let set = SetAttrs {
            uid: Some(uid),
            gid: Some(gid),
            ..Default::default()
        };
        call(FsOp::SetAttr {
            h: Handle::ROOT,
            set,
        })?;
        info!("the new file system's root directory belongs to uid {uid}, gid {gid}");
    }
    Ok(())
}

fn print_started(mnt: &Path, data_dir: &Path, f: u32, detached: bool) {
    println!("bftfs: {} is mounted ({})", mnt.display(), describe(f));
    println!("  data:  {}", data_dir.display());
    if detached {
        println!("  log:   {}", data_dir.join(LOG_FILE).display());
        println!("  stop:  bftfs down {}", mnt.display());
    } else {
        println!("  stop:  Ctrl-C here, or `bftfs down {}`", mnt.display());
    }
    let _ = std::io::stdout().flush();
}

/// Starts the background bftfs process of `mount -d` or `up` in a session of its own: detached
/// from our terminal and process group, so that a Ctrl-C meant for the shell does not stop
/// the mount.
fn spawn_in_new_session(cmd: &mut Command) -> Result<std::process::Child> {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; setsid is one.
    unsafe {
        cmd.pre_exec(|| {
            setsid()?;
            Ok(())
        });
    }
    // A background process of --detach outlives the one systemd started: it must not report
    // readiness in that one's name (run `bftfs mount` in the foreground under systemd).
    cmd.env_remove("NOTIFY_SOCKET");
    cmd.spawn()
        .context("cannot start the background bftfs process")
}

fn spawn_detached(mnt: &Path, data_dir: &Path, args: &UpArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the bftfs executable")?;
    let log_path = data_dir.join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log_err = log.try_clone().context("cannot duplicate the log file")?;
    let mut cmd = Command::new(exe);
    cmd.arg("up")
        .arg(mnt)
        .arg("--f")
        .arg(args.f.to_string())
        .arg("--data-dir")
        .arg(data_dir)
        .arg("-o")
        .arg(args.options.to_arg())
        .arg("--foreground-child")
        .args(forwarded_log_args())
        .args((!args.fast_path).then_some("--no-fast-path"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    for (id, mode) in &args.byzantine {
        cmd.arg("--byzantine").arg(format!("{id}:{mode}"));
    }
    if let Some(port) = args.metrics_port {
        cmd.arg("--metrics-port").arg(port.to_string());
    }
    let mut child = spawn_in_new_session(&mut cmd)?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let tail = replica::localhost::log_tail(&log_path, 3);
            bail!("bftfs up failed ({status}): {tail}");
        }
        let pid_ok = read_pid_info(mnt)?.is_some_and(|i| i.pid == child.id());
        if pid_ok
            && mounted_fstype(mnt).as_deref() == Some(FS_TYPE)
            && std::fs::metadata(mnt).is_ok()
        {
            print_started(mnt, data_dir, args.f, true);
            return Ok(());
        }
        if started.elapsed() > DETACH_WAIT {
            let _ = child.kill();
            let _ = child.wait();
            let _ = mounting::unmount(mnt, true);
            bail!(
                "the mount at {} did not answer within {DETACH_WAIT:?}; see {}",
                mnt.display(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: Signal) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    kill(Pid::from_raw(pid), sig).is_ok()
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let started = Instant::now();
    while alive(pid) {
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

pub fn down(mountpoint: &Path) -> Result<()> {
    let mnt = mount_path(mountpoint)?;
    let info = read_pid_info(&mnt)?;
    let mounted = mounted_fstype(&mnt).as_deref() == Some(FS_TYPE);
    match &info {
        Some(i) if alive(i.pid) && is_bftfs(i.pid) => {
            // The serving process unmounts itself on SIGTERM and exits when the kernel ends
            // the session.
            signal(i.pid, Signal::SIGTERM);
            if !wait_gone(i.pid, STOP_WAIT) {
                warn!(
                    "bftfs (pid {}) did not stop within {STOP_WAIT:?}; killing it",
                    i.pid
                );
                signal(i.pid, Signal::SIGKILL);
                wait_gone(i.pid, Duration::from_secs(5));
            }
        }
        Some(_) | None if !mounted => {
            if let (Some(_), Ok(p)) = (&info, pid_file(&mnt)) {
                let _ = std::fs::remove_file(p);
            }
            bail!(
                "nothing started by `bftfs up` is mounted at {}",
                mnt.display()
            );
        }
        _ => info!(
            "no running bftfs process is recorded for {}; unmounting it",
            mnt.display()
        ),
    }
    if mounted_fstype(&mnt).as_deref() == Some(FS_TYPE) {
        mounting::unmount(&mnt, true)?;
    }
    if let Ok(p) = pid_file(&mnt) {
        let _ = std::fs::remove_file(p);
    }
    match info {
        Some(i) => println!(
            "bftfs: stopped {}; data kept in {}",
            mnt.display(),
            i.data_dir.display()
        ),
        None => println!("bftfs: unmounted {}", mnt.display()),
    }
    Ok(())
}

/// `bftfs status MOUNTPOINT`: the mount's process, its own calls (from the report it keeps in
/// the cluster directory) and the replicas.
pub fn status(mountpoint: &Path, json: bool) -> Result<Health> {
    let mnt = mount_path(mountpoint)?;
    let info = read_pid_info(&mnt)?;
    let mounted = mounted_fstype(&mnt).as_deref() == Some(FS_TYPE);
    let Some(info) = info else {
        if mounted {
            bail!("{} is a bftfs mount not started by `bftfs up` on this machine; use `bftfs status --config CONFIG`", mnt.display());
        }
        bail!(
            "nothing started by `bftfs up` is mounted at {}",
            mnt.display()
        );
    };
    let running = alive(info.pid) && is_bftfs(info.pid);
    let cluster_dir = info.data_dir.join(cluster::CLUSTER_DIR);
    let clients = ClientReport::read_all(&cluster_dir);
    let now = unix_ms();
    // This mount's own report: the one its process writes (another mount of the same cluster
    // speaks for itself, in `status --config`).
    let own: Vec<&ClientReport> = health::fresh_clients(&clients, now)
        .into_iter()
        .filter(|c| running && c.pid == info.pid)
        .collect();
    let (config, reports, suspects) = if info.f >= 1 {
        let config = cluster::read_config(&cluster_dir.join(crate::keygen::CONFIG_FILE))?;
        let reports = cluster::probe_cluster(&config);
        let suspects = cluster::suspects(&config, &reports, &clients);
        (Some(config), reports, suspects)
    } else {
        (None, Vec::new(), Vec::new())
    };
    let verdict = health::verdict(
        config.as_ref(),
        &reports,
        &suspects,
        &own,
        Some(health::MountState { running, mounted }),
        now,
    );
    if json {
        print_json(&MountStatusJson {
            mountpoint: info.mountpoint.to_string_lossy(),
            mounted,
            f: info.f,
            data_dir: info.data_dir.to_string_lossy(),
            verdict: (&verdict).into(),
            client: ClientJson {
                pid: info.pid,
                running,
                calls: own.first().map(|c| &c.calls),
            },
            replicas: &reports,
            clients: &clients,
            suspects: &suspects,
        })?;
    } else {
        println!(
            "mount point: {} ({})",
            info.mountpoint.display(),
            if mounted { "mounted" } else { "not mounted" }
        );
        health::print(&verdict);
        println!("cluster:     {}", describe(info.f));
        println!("data:        {}", info.data_dir.display());
        let calls = own.first().map(|c| &c.calls);
        println!(
            "client:      pid {} ({}){}",
            info.pid,
            if running { "running" } else { "not running" },
            calls
                .map(|c| format!(
                    "; calls: {} completed, {} failed, {} waiting",
                    c.completed, c.failed, c.pending
                ))
                .unwrap_or_default()
        );
        if !reports.is_empty() {
            cluster::print_reports(&reports);
            cluster::print_suspects(&suspects);
        }
    }
    Ok(verdict.health)
}

/// `bftfs status MOUNTPOINT --json`: one object on one line, fields in this order.
#[derive(Serialize)]
struct MountStatusJson<'a> {
    mountpoint: Cow<'a, str>,
    mounted: bool,
    f: u32,
    data_dir: Cow<'a, str>,
    #[serde(flatten)]
    verdict: health::VerdictJson<'a>,
    client: ClientJson<'a>,
    replicas: &'a [cluster::ReplicaReport],
    clients: &'a [ClientReport],
    suspects: &'a [cluster::Suspect],
}

/// The mount's own process in [`MountStatusJson`]; `calls` is null when it wrote no report.
#[derive(Serialize)]
struct ClientJson<'a> {
    pid: u32,
    running: bool,
    calls: Option<&'a CallReport>,
}

/// `bftfs status --config CONFIG --json`.
#[derive(Serialize)]
struct ConfigStatusJson<'a> {
    config: Cow<'a, str>,
    f: u32,
    #[serde(flatten)]
    verdict: health::VerdictJson<'a>,
    replicas: &'a [cluster::ReplicaReport],
    clients: &'a [ClientReport],
    suspects: &'a [cluster::Suspect],
}

fn print_json(value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string(value).context("cannot write the status as JSON")?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_info_round_trip() {
        let i = PidInfo {
            pid: 42,
            mountpoint: "/mnt/a b".into(),
            data_dir: "/d".into(),
            f: 0,
        };
        assert_eq!(PidInfo::parse(&i.render()), Some(i));
        assert_eq!(PidInfo::parse("garbage"), None);
    }

    #[test]
    fn mount_keys_are_stable_and_distinct() {
        let a = mount_key(Path::new("/mnt/data"));
        assert_eq!(a, mount_key(Path::new("/mnt/data")));
        assert!(a.starts_with("data-"));
        assert_ne!(a, mount_key(Path::new("/srv/data")));
        assert!(mount_key(Path::new("/")).starts_with("root-"));
        assert!(mount_key(Path::new("/x/we ird*")).starts_with("we_ird_-"));
    }

    #[test]
    fn data_dir_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("data");
        let m = claim_data_dir(&d, 0).expect("fresh");
        assert_eq!(claim_data_dir(&d, 0).expect("same cluster"), m);
        let e = claim_data_dir(&d, 1).expect_err("other f");
        assert!(e.to_string().contains("belongs to another cluster"), "{e}");
        let other = dir.path().join("other");
        std::fs::create_dir(&other).expect("mkdir");
        std::fs::write(other.join("x"), b"").expect("write");
        let e = claim_data_dir(&other, 0).expect_err("foreign dir");
        assert!(e.to_string().contains("not a bftfs data directory"), "{e}");
    }

    #[test]
    fn data_dir_lock_is_exclusive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = lock_data_dir(dir.path()).expect("first");
        let e = lock_data_dir(dir.path()).expect_err("second");
        assert!(e.to_string().contains("in use"), "{e}");
    }

    #[test]
    fn liveness() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }

    #[test]
    fn status_json_escapes_and_flattens() {
        let verdict = health::Verdict {
            health: Health::Degraded,
            reasons: vec![(Health::Degraded, "a \"quoted\"\nreason".into())],
        };
        let reports = vec![cluster::ReplicaReport {
            id: 3,
            address: "host\"with:quote".into(),
            health: "down".into(),
            lag: None,
            agree: None,
            status: None,
        }];
        let suspects = vec![cluster::Suspect {
            id: 3,
            why: vec!["silent\\".into()],
        }];
        let text = serde_json::to_string(&ConfigStatusJson {
            config: "/c/\"x\".json".into(),
            f: 1,
            verdict: (&verdict).into(),
            replicas: &reports,
            clients: &[],
            suspects: &suspects,
        })
        .expect("serialises");
        assert!(
            text.starts_with("{\"config\":\"/c/\\\"x\\\".json\",\"f\":1,\"health\":\"degraded\",\"exit_code\":1,"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(v["reasons"][0], "a \"quoted\"\nreason");
        assert_eq!(v["replicas"][0]["address"], "host\"with:quote");
        assert_eq!(v["replicas"][0]["lag"], serde_json::Value::Null);
        assert_eq!(v["suspects"][0]["why"][0], "silent\\");
        assert_eq!(v["clients"], serde_json::json!([]));
    }
}
