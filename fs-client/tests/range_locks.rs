//! fcntl and flock locks across two mounts of one replicated cluster (f=1): what the
//! README's "Locks across mounts" promises.
//!
//! - two `flock(1)` commands on two mounts: `-n` fails while the other mount holds the lock,
//!   `-w` gives up after its timeout (the wait ends with EINTR at the timer's signal), and a
//!   plain `flock` waits and gets the lock once the other lets go;
//! - fcntl range locks from processes on both mounts: non-overlapping ranges both succeed,
//!   overlapping write locks conflict, F_GETLK reports the other mount's lock (type and range;
//!   pid 0, while a process of the same mount sees the holder's pid), F_SETLKW waits until
//!   the holder unlocks, a close drops the process's locks, and OFD locks conflict with
//!   POSIX ones and go with their open file;
//! - a mount killed with SIGKILL while holding a lock: the other mount gets it once the dead
//!   one's lease (2 s here) has run out.
//!
//! The processes that take fcntl locks are this test binary run again as a helper
//! (`lock_helper`), driven line by line over a pipe. Skipped with a message without root and
//! /dev/fuse (a failure when BFTFS_REQUIRE_FUSE=1).

mod common;

use common::*;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The lease the mounts of these tests ask for: short, so a dead mount's locks go quickly.
const LEASE: &str = "lock_lease=2";

/// A cluster mounted (by `up`) at `<tmp>/a` and a second client at `<tmp>/b`.
struct Pair {
    xdg: PathBuf,
    second: Option<Unmount>,
    second_pid: i32,
    first: Option<Mounted>,
    a: PathBuf,
    b: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        let (tmp, [a, b, xdg, data]) = scratch(["a", "b", "xdg", "data"]);
        fs::create_dir(&a).expect("mkdir");
        fs::create_dir(&b).expect("mkdir");
        let first = Mounted::at(&a, &xdg, Some(&data), &["--f", "1", "-o", LEASE]).expect("up");
        let config = data.join("cluster/cluster.json");
        let (_, second_pid) = mount_detached(&config, &b, &xdg, &[LEASE]);
        Pair {
            xdg: xdg.clone(),
            second: Some(Unmount(b.clone(), xdg)),
            second_pid,
            first: Some(first),
            a,
            b,
            _tmp: tmp,
        }
    }

    /// A file both mounts see: its path on `a` and on `b`.
    fn file(&self, name: &str) -> (PathBuf, PathBuf) {
        let on_a = self.a.join(name);
        fs::write(&on_a, b"0123456789").expect("create");
        let on_b = self.b.join(name);
        assert!(
            wait_until(Duration::from_secs(10), || on_b.exists()),
            "{name} never showed on the second mount"
        );
        (on_a, on_b)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        drop(self.second.take());
        drop(self.first.take());
    }
}

fn flock(args: &[&str], path: &Path) -> (bool, Duration) {
    let started = Instant::now();
    let status = Command::new("flock")
        .args(args)
        .arg(path)
        .arg("true")
        .status()
        .expect("run flock(1) (util-linux)");
    (status.success(), started.elapsed())
}

#[test]
fn flock_commands_exclude_each_other_across_mounts() {
    if !replicated_mounts_available("flock_commands_exclude_each_other_across_mounts") {
        return;
    }
    let pair = Pair::new();
    let (on_a, on_b) = pair.file("lockfile");
    let marker = pair._tmp.path().join("held");
    let mut holder = Command::new("flock")
        .arg(&on_a)
        .arg("sh")
        .arg("-c")
        .arg(format!("touch {}; sleep 4", marker.display()))
        .spawn()
        .expect("flock(1)");
    assert!(
        wait_until(Duration::from_secs(20), || marker.exists()),
        "the first mount never got the lock"
    );
    let (got, _) = flock(&["-n"], &on_b);
    assert!(
        !got,
        "flock -n on the second mount got a lock the first one holds"
    );
    let (got, took) = flock(&["-w", "1"], &on_b);
    assert!(!got, "flock -w 1 got a lock the first mount holds");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "flock -w 1 gave up after {took:?}"
    );
    // Without -n it waits for the holder (about 3 s more) and gets it.
    let (got, took) = flock(&[], &on_b);
    assert!(got, "flock on the second mount never got the lock");
    assert!(holder.wait().expect("holder").success());
    assert!(
        took >= Duration::from_millis(500),
        "flock got the lock after {took:?}, while the first mount still held it"
    );
    // Both let go: either mount takes it. A flock lock goes with the kernel's RELEASE of
    // the open file, which it sends after close(2) has returned (asynchronously), so right
    // after the other flock(1) exited it may still be held for a moment.
    assert!(
        wait_until(Duration::from_secs(5), || flock(&["-n"], &on_a).0),
        "the lock stayed after both flock(1) ended"
    );
    assert!(flock(&["-n", "-s"], &on_b).0);
}

/// Runs this test binary as a lock-taking helper on `file`.
struct Helper {
    child: Child,
    input: ChildStdin,
    answers: Receiver<String>,
}

const HELPER_ENV: &str = "BFTFS_LOCK_HELPER_FILE";
const SAID: &str = "helper: ";

impl Helper {
    fn start(file: &Path) -> Helper {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["lock_helper", "--exact", "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a helper");
        let input = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, answers) = channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                // The first answer follows the harness's "test lock_helper ... " on its line.
                if let Some(at) = line.find(SAID) {
                    if tx.send(line[at + SAID.len()..].to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        let mut h = Helper {
            child,
            input,
            answers,
        };
        assert_eq!(h.ask("open"), "ok");
        h
    }

    fn send(&mut self, command: &str) {
        writeln!(self.input, "{command}").expect("to the helper");
        self.input.flush().expect("flush");
    }

    fn answer_within(&self, limit: Duration) -> Option<String> {
        self.answers.recv_timeout(limit).ok()
    }

    fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.answer_within(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no answer to `{command}`"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the helper's side, which does nothing unless `HELPER_ENV` names a file. Reads
/// commands (`open`, `close`, `set|setw|get|ofdset|ofdsetw|ofdget r|w|u START LEN`) from
/// stdin and answers each with one line (`ok`, `err ERRNO`, `none`, `lock r|w START LEN
/// PID`).
#[test]
fn lock_helper() {
    let Some(path) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let mut file: Option<fs::File> = None;
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["open"] => {
                let f = fs::OpenOptions::new().read(true).write(true).open(&path);
                let a = match &f {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
                };
                file = f.ok();
                a
            }
            ["close"] => {
                file = None;
                "ok".to_string()
            }
            [cmd, kind, start, len] => match &file {
                None => "err closed".to_string(),
                Some(f) => fcntl_lock(f, cmd, kind, start, len),
            },
            _ => "err bad command".to_string(),
        };
        println!("{SAID}{answer}");
    }
}

fn fcntl_lock(f: &fs::File, cmd: &str, kind: &str, start: &str, len: &str) -> String {
    let cmd = match cmd {
        "set" => libc::F_SETLK,
        "setw" => libc::F_SETLKW,
        "get" => libc::F_GETLK,
        "ofdset" => libc::F_OFD_SETLK,
        "ofdsetw" => libc::F_OFD_SETLKW,
        "ofdget" => libc::F_OFD_GETLK,
        _ => return "err bad command".into(),
    };
    let l_type = match kind {
        "r" => libc::F_RDLCK,
        "w" => libc::F_WRLCK,
        _ => libc::F_UNLCK,
    };
    // SAFETY: plain data; every field the call reads is set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = l_type as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start.parse().unwrap_or(0);
    lock.l_len = len.parse().unwrap_or(0);
    // SAFETY: a valid descriptor and a valid struct flock for these commands.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut lock) };
    if rc != 0 {
        return format!(
            "err {}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        );
    }
    if cmd != libc::F_GETLK && cmd != libc::F_OFD_GETLK {
        return "ok".into();
    }
    match lock.l_type as i32 {
        libc::F_UNLCK => "none".into(),
        t => format!(
            "lock {} {} {} {}",
            if t == libc::F_WRLCK { "w" } else { "r" },
            lock.l_start,
            lock.l_len,
            lock.l_pid
        ),
    }
}

#[test]
fn fcntl_range_locks_work_across_mounts() {
    if !replicated_mounts_available("fcntl_range_locks_work_across_mounts") {
        return;
    }
    let pair = Pair::new();
    let (on_a, on_b) = pair.file("ranges");
    let eagain = format!("err {}", libc::EAGAIN);
    let mut a = Helper::start(&on_a);
    let mut b = Helper::start(&on_b);
    assert_eq!(a.ask("set w 0 100"), "ok");
    assert_eq!(b.ask("set w 100 100"), "ok", "non-overlapping ranges");
    assert_eq!(b.ask("set w 50 100"), eagain, "overlapping write locks");
    assert_eq!(
        b.ask("set r 99 1"),
        eagain,
        "a read lock under a write lock"
    );
    // F_GETLK on the other mount: type and range, and no pid from another machine.
    assert_eq!(b.ask("get w 50 100"), "lock w 0 100 0");
    assert_eq!(a.ask("get r 150 1"), "lock w 100 100 0");
    // A process of the same mount sees the holder's pid.
    let mut a2 = Helper::start(&on_a);
    assert_eq!(a2.ask("get r 10 1"), format!("lock w 0 100 {}", a.pid()));
    drop(a2);
    // F_SETLKW waits until the holder unlocks.
    b.send("setw w 50 100");
    assert_eq!(
        b.answer_within(Duration::from_millis(1500)),
        None,
        "F_SETLKW returned while the other mount held the range"
    );
    assert_eq!(a.ask("set u 0 100"), "ok");
    assert_eq!(
        b.answer_within(Duration::from_secs(15)).as_deref(),
        Some("ok"),
        "F_SETLKW did not get the range once it was free"
    );
    assert_eq!(a.ask("set r 0 10"), "ok");
    assert_eq!(a.ask("set w 60 1"), eagain);
    // Splitting on one mount shows on the other: b unlocks the middle of 50..199.
    assert_eq!(b.ask("set u 100 50"), "ok");
    assert_eq!(a.ask("set w 120 10"), "ok");
    assert_eq!(b.ask("get w 0 400"), "lock r 0 10 0");
    // A close drops all of the process's locks on the file.
    assert_eq!(b.ask("close"), "ok");
    assert_eq!(a.ask("set w 50 50"), "ok");
    assert_eq!(a.ask("set w 150 50"), "ok");
    // OFD locks conflict with POSIX ones and go with their open file.
    assert_eq!(b.ask("open"), "ok");
    assert_eq!(b.ask("ofdset w 300 100"), "ok");
    assert_eq!(a.ask("set w 350 1"), eagain);
    assert_eq!(a.ask("get r 350 1"), "lock w 300 100 0");
    assert_eq!(
        b.ask("ofdset w 0 1"),
        eagain,
        "POSIX locks of the other mount"
    );
    assert_eq!(b.ask("close"), "ok");
    assert!(
        wait_until(Duration::from_secs(10), || a.ask("set w 350 1") == "ok"),
        "the OFD lock outlived its open file"
    );
}

#[test]
fn a_dead_mounts_locks_go_when_its_lease_runs_out() {
    if !replicated_mounts_available("a_dead_mounts_locks_go_when_its_lease_runs_out") {
        return;
    }
    let mut pair = Pair::new();
    let (on_a, on_b) = pair.file("dying");
    let mut b = Helper::start(&on_b);
    assert_eq!(b.ask("set w 0 0"), "ok");
    let mut a = Helper::start(&on_a);
    let eagain = format!("err {}", libc::EAGAIN);
    assert_eq!(a.ask("set w 5 1"), eagain);
    // Several renewal intervals pass: the lock is kept.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(a.ask("set w 5 1"), eagain, "the live mount's lock went");
    assert!(send_signal(pair.second_pid, Signal::SIGKILL));
    let killed = Instant::now();
    // The helper on the dead mount goes too (its descriptor is useless now).
    drop(b);
    assert_eq!(
        a.ask("set w 5 1"),
        eagain,
        "the lock went before the lease ran out"
    );
    assert!(
        wait_until(Duration::from_secs(15), || a.ask("set w 5 1") == "ok"),
        "the dead mount's lock never went"
    );
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The dead mount's guard unmounts it lazily.
    drop(pair.second.take());
}

/// The mount holding a Zzyzx lock (`bftfs lock DIR`) takes fcntl locks inside it without
/// waiting on or giving back its own lock; another mount's fcntl locks there see them (its
/// open of the file revokes the Zzyzx lock, as any access does).
#[test]
fn range_locks_inside_a_zzyzx_lock() {
    if !replicated_mounts_available("range_locks_inside_a_zzyzx_lock") {
        return;
    }
    let pair = Pair::new();
    fs::create_dir(pair.a.join("work")).expect("mkdir");
    let (on_a, on_b) = pair.file("work/f");
    let out = bftfs(
        &["lock".as_ref(), pair.a.join("work").as_os_str()],
        &pair.xdg,
    );
    assert!(out.status.success(), "bftfs lock: {}", text(&out));
    let mut a = Helper::start(&on_a);
    let started = Instant::now();
    assert_eq!(a.ask("set w 0 10"), "ok");
    assert_eq!(a.ask("get w 0 10"), "none");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "fcntl under the mount's own Zzyzx lock took {:?}",
        started.elapsed()
    );
    let mut b = Helper::start(&on_b);
    let eagain = format!("err {}", libc::EAGAIN);
    assert_eq!(b.ask("set w 5 1"), eagain);
    assert_eq!(b.ask("get r 5 1"), "lock w 0 10 0");
    assert_eq!(a.ask("set u 0 10"), "ok");
    assert_eq!(b.ask("set w 5 1"), "ok");
    assert_eq!(a.ask("set r 5 1"), eagain);
}
