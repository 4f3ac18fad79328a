//! Shared harness for the real-mount tests: FUSE availability, and a guard that mounts with
//! `bftfs up --detach` and always cleans up (down, then lazy unmount and kill).
//!
//! Mounts are replicated (f=1: four `bftfs-replica` processes) unless `BFTFS_TEST_F` says
//! otherwise (`BFTFS_TEST_F=0` runs the same tests over the unreplicated service). They use
//! the default write mode (write-back) unless `BFTFS_TEST_SYNC=1`, which mounts every
//! `Mounted` with `-o sync`.

#![allow(dead_code)]

pub use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BFTFS: &str = env!("CARGO_BIN_EXE_bftfs");

/// A fresh temporary directory and the paths `names` inside it (not created), in order.
pub fn scratch<const N: usize>(names: [&str; N]) -> (tempfile::TempDir, [PathBuf; N]) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let paths = names.map(|n| tmp.path().join(n));
    (tmp, paths)
}

/// The value of the environment variable `name`, else (unset or unparsable) `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Whether real FUSE mounts can run here. Without them a test prints why and returns early;
/// with BFTFS_REQUIRE_FUSE=1 (CI) that is a failure instead.
pub fn fuse_available(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    let why = match (root, dev) {
        (true, true) => return true,
        (false, _) => "not running as root",
        (true, false) => "/dev/fuse cannot be opened",
    };
    if std::env::var("BFTFS_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{test}: FUSE is required (BFTFS_REQUIRE_FUSE=1) but {why}");
    }
    eprintln!("SKIPPED {test}: {why}; real-mount tests need root and /dev/fuse");
    false
}

/// Whether a test that needs replicas (a real mount with f ≥ 1) can run here; says why not.
pub fn replicated_mounts_available(test: &str) -> bool {
    if !fuse_available(test) {
        return false;
    }
    if test_f() == "0" {
        eprintln!("SKIPPED {test}: BFTFS_TEST_F=0 runs no replicas");
        return false;
    }
    true
}

pub fn bftfs(args: &[&std::ffi::OsStr], xdg: &Path) -> Output {
    bftfs_program(Path::new(BFTFS), args, xdg)
}

/// [`bftfs`] with another `bftfs` executable (e.g. one with no `bftfs-replica` beside it).
pub fn bftfs_program(program: &Path, args: &[&std::ffi::OsStr], xdg: &Path) -> Output {
    Command::new(program)
        .args(args)
        .env("XDG_DATA_HOME", xdg)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .output()
        .expect("run bftfs")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A mount made by `bftfs up --f 0 --detach`, undone on drop even if the test panicked.
pub struct Mounted {
    pub mnt: PathBuf,
    /// $XDG_DATA_HOME for every bftfs command of this mount (pid files, default data dirs).
    pub xdg: PathBuf,
    pub data_dir: Option<PathBuf>,
    pub up_output: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Mounted {
    /// Mounts at a fresh directory under a fresh temporary directory.
    pub fn new() -> Mounted {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        let xdg = tmp.path().join("xdg");
        let mut m = Mounted::at(&mnt, &xdg, None, &[]).expect("bftfs up");
        m._tmp = Some(tmp);
        m
    }

    /// Runs `bftfs up --detach` at `mnt`; the caller keeps the directories alive.
    pub fn at(
        mnt: &Path,
        xdg: &Path,
        data_dir: Option<&Path>,
        extra: &[&str],
    ) -> Result<Mounted, String> {
        Mounted::at_with(Path::new(BFTFS), mnt, xdg, data_dir, extra)
    }

    /// [`Mounted::at`] with another `bftfs` executable.
    pub fn at_with(
        program: &Path,
        mnt: &Path,
        xdg: &Path,
        data_dir: Option<&Path>,
        extra: &[&str],
    ) -> Result<Mounted, String> {
        // A test that names its own f in `extra` gets that one.
        let f = if extra.contains(&"--f") {
            String::new()
        } else {
            test_f()
        };
        let mut args: Vec<&std::ffi::OsStr> = vec!["up".as_ref(), mnt.as_os_str()];
        if !f.is_empty() {
            args.push("--f".as_ref());
            args.push(f.as_ref());
        }
        args.push("--detach".as_ref());
        if let Some(d) = data_dir {
            args.push("--data-dir".as_ref());
            args.push(d.as_os_str());
        }
        // BFTFS_TEST_FAST_PATH=0 runs every real-mount test on the commit path only.
        if std::env::var("BFTFS_TEST_FAST_PATH").as_deref() == Ok("0") && !f.is_empty() && f != "0"
        {
            args.push("--no-fast-path".as_ref());
        }
        if test_sync() {
            args.push("-o".as_ref());
            args.push("sync".as_ref());
        }
        // BFTFS_TEST_LOCKS=auto runs every real-mount test with automatic Zzyzx locks.
        let locks = std::env::var("BFTFS_TEST_LOCKS")
            .ok()
            .map(|p| format!("locks={p}"));
        if let Some(l) = &locks {
            args.push("-o".as_ref());
            args.push(l.as_ref());
        }
        args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
        let started = Instant::now();
        let out = bftfs_program(program, &args, xdg);
        let up_output = text(&out);
        if !out.status.success() {
            return Err(up_output);
        }
        eprintln!("mounted {} in {:?}", mnt.display(), started.elapsed());
        Ok(Mounted {
            mnt: mnt.to_path_buf(),
            xdg: xdg.to_path_buf(),
            data_dir: data_dir.map(Path::to_path_buf),
            up_output,
            _tmp: None,
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `bftfs down`, checked.
    pub fn down(mut self) {
        let out = bftfs(&["down".as_ref(), self.mnt.as_os_str()], &self.xdg);
        assert!(out.status.success(), "bftfs down failed: {}", text(&out));
        assert!(!is_mounted(&self.mnt), "still mounted after down");
        self.mnt = PathBuf::new();
    }

    /// The pid of the background process serving this mount.
    pub fn server_pid(&self) -> Option<i32> {
        let run = self.xdg.join("bftfs/run");
        for e in std::fs::read_dir(run).ok()?.flatten() {
            let t = std::fs::read_to_string(e.path()).ok()?;
            let mp = t.lines().find_map(|l| l.strip_prefix("mountpoint="))?;
            if Path::new(mp) == self.mnt.canonicalize().unwrap_or_else(|_| self.mnt.clone())
                || mp == self.mnt.to_string_lossy()
            {
                return t.lines().find_map(|l| l.strip_prefix("pid="))?.parse().ok();
            }
        }
        None
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mnt.as_os_str().is_empty() {
            return;
        }
        let pid = self.server_pid();
        let out = bftfs(&["down".as_ref(), self.mnt.as_os_str()], &self.xdg);
        if !out.status.success() || is_mounted(&self.mnt) {
            eprintln!(
                "cleanup: bftfs down failed ({}); unmounting lazily",
                text(&out).trim()
            );
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
            if let Some(pid) = pid {
                send_signal(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Sends `signal` to `pid` (`None`: only asks whether it exists); whether that succeeded.
/// Only for processes the test started, directly or through `bftfs up`.
pub fn send_signal(pid: i32, signal: impl Into<Option<Signal>>) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok()
}

/// Resumes the processes it names when dropped, so that a failing test does not leave
/// stopped replicas behind (a stopped process ignores SIGTERM until it runs again).
pub struct Stopped(pub Vec<u32>);

impl Stopped {
    pub fn stop(&mut self, pid: u32) {
        send_signal(pid as i32, Signal::SIGSTOP);
        self.0.push(pid);
    }

    pub fn resume_all(&mut self) {
        for pid in self.0.drain(..) {
            send_signal(pid as i32, Signal::SIGCONT);
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.resume_all();
    }
}

/// `bftfs status MOUNTPOINT` (with `--json` if `json`): its exit status (0 ok, 1 degraded,
/// 2 stuck) and stdout; panics if status could not find out (any other exit status).
pub fn status(m: &Mounted, json: bool) -> (i32, String) {
    let mut args: Vec<&std::ffi::OsStr> = vec!["status".as_ref(), m.mnt.as_os_str()];
    if json {
        args.push("--json".as_ref());
    }
    let out = bftfs(&args, &m.xdg);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        (0..=2).contains(&code),
        "bftfs status failed ({}): {}",
        out.status,
        text(&out)
    );
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where `m`'s cluster keeps its state (from `bftfs status --json`).
pub fn data_dir_of(m: &Mounted) -> PathBuf {
    let (_, json) = status(m, true);
    let v: serde_json::Value = serde_json::from_str(&json).expect("status --json");
    PathBuf::from(v["data_dir"].as_str().expect("data_dir in status"))
}

/// `bftfs mount CONFIG MNT --detach [-o OPTIONS]`: its output and the serving process's pid
/// (which it prints).
pub fn mount_detached(config: &Path, mnt: &Path, xdg: &Path, options: &[&str]) -> (String, i32) {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "mount".as_ref(),
        config.as_os_str(),
        mnt.as_os_str(),
        "--detach".as_ref(),
    ];
    for o in options {
        args.push("-o".as_ref());
        args.push(std::ffi::OsStr::new(*o));
    }
    let out = bftfs(&args, xdg);
    let said = text(&out);
    assert!(out.status.success(), "bftfs mount: {said}");
    let pid = said
        .split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in: {said}"));
    (said, pid)
}

/// `bftfs mount` of `first`'s cluster at `mnt` with mount options `options` (a second
/// client of the same cluster); unmounted when the guard goes.
pub fn second_mount(first: &Mounted, mnt: &Path, xdg: &Path, options: &str) -> Unmount {
    let config = data_dir_of(first).join("cluster/cluster.json");
    mount_detached(&config, mnt, xdg, &[options]);
    Unmount(mnt.to_path_buf(), xdg.to_path_buf())
}

/// Whether the tests mount with `-o sync` (see the module doc).
pub fn test_sync() -> bool {
    std::env::var("BFTFS_TEST_SYNC").as_deref() == Ok("1")
}

/// The f the tests mount with (see the module doc).
pub fn test_f() -> String {
    std::env::var("BFTFS_TEST_F").unwrap_or_else(|_| "1".into())
}

/// How many replicas the tests' clusters have: 3f+1 for the f they mount with.
pub fn replica_count() -> usize {
    3 * test_f().parse::<usize>().unwrap_or(1) + 1
}

pub fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.canonicalize().unwrap_or_else(|_| mnt.to_path_buf());
    info.lines().any(|l| {
        l.split(' ').nth(4).is_some_and(|p| Path::new(p) == want) && l.contains(" - fuse.bftfs ")
    })
}

pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Runs a shell command, panicking with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    assert!(out.status.success(), "`{cmd}` failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where `bftfs install-helper` puts mount.bftfs (mount(8) looks there).
pub const HELPER: &str = "/sbin/mount.bftfs";

/// Installs the mount(8) helper with `bftfs install-helper` and puts back what was there
/// before when dropped (a link to another bftfs build, or nothing).
pub struct Helper {
    before: Option<PathBuf>,
    xdg: PathBuf,
}

impl Helper {
    pub fn install(xdg: &Path) -> Helper {
        let before = std::fs::read_link(HELPER).ok();
        let out = bftfs(&["install-helper".as_ref()], xdg);
        assert!(out.status.success(), "install-helper: {}", text(&out));
        assert_eq!(
            std::fs::read_link(HELPER)
                .expect("a link")
                .canonicalize()
                .expect("target"),
            Path::new(BFTFS).canonicalize().expect("bftfs"),
        );
        Helper {
            before,
            xdg: xdg.to_path_buf(),
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = bftfs(&["install-helper".as_ref(), "--remove".as_ref()], &self.xdg);
        if let Some(target) = &self.before {
            let _ = std::os::unix::fs::symlink(target, HELPER);
        }
    }
}

/// Whether mount(8) is here; says why not (a failure when BFTFS_REQUIRE_FUSE=1, as FUSE
/// tests are).
pub fn mount_8_available(test: &str) -> bool {
    if Command::new("mount").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var("BFTFS_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{test}: mount(8) is required (BFTFS_REQUIRE_FUSE=1) but missing");
    }
    eprintln!("SKIPPED {test}: no mount(8) (util-linux)");
    false
}

/// `bftfs umount MNT --lazy` (with the mount's XDG directory) when dropped, even if the test
/// panicked: a second mount a test made must not outlive it.
pub struct Unmount(pub PathBuf, pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = bftfs(
            &["umount".as_ref(), self.0.as_os_str(), "--lazy".as_ref()],
            &self.1,
        );
    }
}

/// The lines of the cluster's replica logs that show replicas ending up with different
/// states: a checkpoint that differs from the certified one (repaired by state transfer,
/// but a sign that they did not execute the same), or a lock merged without an agreed end.
pub fn divergence_in_replica_logs(data_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("replica-") && name.ends_with(".log")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        found.extend(
            text.lines()
                .filter(|l| {
                    l.contains("differs from the certified one")
                        || l.contains("that no client resolved")
                })
                .map(|l| format!("{name}: {l}")),
        );
    }
    found
}
