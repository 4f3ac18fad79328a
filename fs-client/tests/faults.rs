//! Faults with real processes under a real mount (f=1, four `bftfs-replica` processes started
//! by `bftfs up`): replicas killed with SIGKILL and restarted while a data-verifying workload
//! and PostMark run, and a total power loss (every replica and the client killed at once in
//! the middle of a workload) followed by `bftfs up` on the same data.
//!
//! `FAULTS_SECONDS` (default 60) sets how long the kill/restart test runs. With `BFTFS_KEEP`
//! set, the power-loss test keeps its directory (printed) and, per round, a copy of the data
//! as the power loss left it (`data-roundN`) and the workload's model and interrupted call
//! (`model-roundN`), to compare with the replicas' trees after a failure.

mod common;
#[path = "common/workload.rs"]
mod workload;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::Workload;

#[derive(Debug, Clone)]
struct Rep {
    id: u32,
    pid: Option<i32>,
    primary: bool,
    executed: Option<u64>,
    checkpoint: Option<u64>,
    view: Option<u64>,
}

/// `bftfs status --json`, per replica (a replica that does not answer has no pid/executed).
fn replicas(m: &Mounted) -> Vec<Rep> {
    let out = bftfs(
        &["status".as_ref(), m.mnt.as_os_str(), "--json".as_ref()],
        &m.xdg,
    );
    let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let s = &r["status"];
                    Rep {
                        id: r["id"].as_u64().unwrap_or(99) as u32,
                        pid: s["pid"].as_u64().map(|p| p as i32),
                        primary: s["primary"].as_bool().unwrap_or(false),
                        executed: s["last_executed"].as_u64(),
                        checkpoint: s["stable_checkpoint"].as_u64(),
                        view: s["view"].as_u64(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn status_text(m: &Mounted) -> String {
    text(&bftfs(&["status".as_ref(), m.mnt.as_os_str()], &m.xdg))
}

/// The last lines about views and restarts from every replica's log, for a failure message.
fn view_history(m: &Mounted) -> String {
    let data = data_dir_of(m);
    let mut out = String::new();
    for i in 0..replica_count() {
        let log =
            std::fs::read_to_string(data.join(format!("replica-{i}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("view")
                    || l.contains("start")
                    || l.contains("WARN")
                    || l.contains("ERROR")
            })
            .collect();
        out.push_str(&format!("--- replica {i} ---\n"));
        for l in &lines[lines.len().saturating_sub(25)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Whether all four replicas answer, in one active view, with no one far behind.
fn healthy(reps: &[Rep]) -> bool {
    let best = reps.iter().filter_map(|r| r.executed).max().unwrap_or(0);
    reps.len() == replica_count()
        && reps
            .iter()
            .all(|r| r.pid.is_some() && r.executed.is_some_and(|e| e + 16 >= best))
        && reps.iter().filter(|r| r.primary).count() == 1
}

fn kill9(pid: i32) {
    send_signal(pid, Signal::SIGKILL);
}

/// PostMark in `dir` until `stop`; returns (rounds completed, failures).
fn postmark_rounds(dir: PathBuf, stop: Arc<AtomicBool>) -> (u32, Vec<String>) {
    let (mut rounds, mut failures) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let _ = std::fs::create_dir_all(&dir);
        let mut child = match Command::new("/usr/bin/postmark")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("cannot start postmark: {e}"));
                break;
            }
        };
        let script = format!(
            "set location {}\nset number 150\nset transactions 400\nset seed {}\nrun\nquit\n",
            dir.display(),
            42 + rounds
        );
        if let Some(mut s) = child.stdin.take() {
            let _ = s.write_all(script.as_bytes());
        }
        let out = child.wait_with_output().expect("postmark");
        let report = text(&out);
        if out.status.success()
            && report.contains("Deleting files...Done")
            && report.contains("Time:")
        {
            rounds += 1;
        } else {
            failures.push(format!(
                "postmark round {rounds}: {}",
                report.lines().rev().take(6).collect::<Vec<_>>().join(" | ")
            ));
            break;
        }
    }
    (rounds, failures)
}

#[test]
fn workload_and_postmark_survive_replicas_killed_every_few_seconds() {
    let name = "workload_and_postmark_survive_replicas_killed_every_few_seconds";
    if !replicated_mounts_available(name) {
        return;
    }
    let seconds: u64 = env_or("FAULTS_SECONDS", 60);
    let m = Mounted::new();
    let stop = Arc::new(AtomicBool::new(false));
    let dir = m.path("verify");
    let worker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut w = Workload::new(&dir, 24, 0x5eed).expect("workload");
            while !stop.load(Ordering::Relaxed) {
                if w.step().is_err() {
                    w.resync();
                }
            }
            w
        })
    };
    let postmark = Path::new("/usr/bin/postmark").exists().then(|| {
        let (stop, dir) = (stop.clone(), m.path("pm"));
        std::thread::spawn(move || postmark_rounds(dir, stop))
    });

    let start = Instant::now();
    let mut kills: Vec<(u32, bool)> = Vec::new();
    let mut kill_primary = false;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(3));
        // One replica down at a time: wait until the last victim is back and caught up.
        let mut reps = replicas(&m);
        let ok = wait_until(Duration::from_secs(60), || {
            reps = replicas(&m);
            healthy(&reps)
        });
        assert!(
            ok,
            "the cluster did not recover from the last kill: {}\n{}",
            status_text(&m),
            view_history(&m)
        );
        let victim = if kill_primary {
            reps.iter().find(|r| r.primary)
        } else {
            let backups: Vec<&Rep> = reps.iter().filter(|r| !r.primary).collect();
            backups.get(kills.len() % backups.len().max(1)).copied()
        };
        let victim = victim.expect("a victim").clone();
        kill9(victim.pid.expect("pid"));
        eprintln!(
            "{:>5.1}s: killed replica {} ({})",
            start.elapsed().as_secs_f64(),
            victim.id,
            if victim.primary { "primary" } else { "backup" }
        );
        kills.push((victim.id, victim.primary));
        kill_primary = !kill_primary;
    }
    stop.store(true, Ordering::Relaxed);
    let w = worker.join().expect("workload thread");
    let (pm_rounds, pm_failures) = postmark
        .map(|h| h.join().expect("postmark thread"))
        .unwrap_or_default();
    eprintln!(
        "{} kills ({} of the primary) in {:?}; workload {:?}; postmark rounds {pm_rounds}",
        kills.len(),
        kills.iter().filter(|k| k.1).count(),
        start.elapsed(),
        w.counts
    );
    assert!(
        kills.iter().any(|k| k.1) && kills.iter().any(|k| !k.1),
        "both a primary and a backup were killed: {kills:?}"
    );
    assert_eq!(
        (w.counts.errors, w.counts.mismatches),
        (0, 0),
        "errors and mismatches: {:?}",
        w.problems
    );
    assert!(
        w.counts.writes > 50 && w.counts.reads > 50,
        "the workload made progress: {:?}",
        w.counts
    );
    assert!(pm_failures.is_empty(), "postmark: {pm_failures:?}");

    // Every replica ends in the same state: same executed sequence number and checkpoint.
    let mut last = Vec::new();
    let same = wait_until(Duration::from_secs(90), || {
        last = replicas(&m);
        let agree = last.len() == replica_count()
            && last.iter().all(|r| {
                r.executed.is_some()
                    && r.executed == last[0].executed
                    && r.checkpoint == last[0].checkpoint
                    && r.view == last[0].view
            });
        if !agree {
            // Idle replicas that missed the last batches learn of them from the next one.
            let _ = std::fs::write(m.path("nudge"), b"x");
            std::thread::sleep(Duration::from_millis(500));
        }
        agree
    });
    assert!(
        same,
        "replicas disagree at the end: {last:?}\n{}\n{}",
        status_text(&m),
        view_history(&m)
    );
    eprintln!(
        "final state of every replica: executed {:?}, checkpoint {:?}, view {:?}",
        last[0].executed, last[0].checkpoint, last[0].view
    );
    m.down();
}

/// Kills the `bftfs up` server (FUSE client and supervisor) and every replica with SIGKILL,
/// all at once, then clears the dead mount.
fn power_loss(m: Mounted) {
    let reps = replicas(&m);
    let pids: Vec<i32> = reps.iter().filter_map(|r| r.pid).collect();
    // 3f+1 of them, f as the tests run (BFTFS_TEST_F).
    assert_eq!(
        pids.len(),
        replica_count(),
        "every replica running before the power loss: {reps:?}"
    );
    let server = m.server_pid().expect("server pid");
    // Replicas first: a replica whose parent dies gets SIGTERM (PR_SET_PDEATHSIG) and would
    // shut down cleanly; the supervisor waits 500 ms before restarting a dead replica, so the
    // server dies before it can.
    for &p in &pids {
        kill9(p);
    }
    kill9(server);
    let gone = wait_until(Duration::from_secs(20), || {
        pids.iter()
            .chain([&server])
            .all(|&p| !send_signal(p, None) || is_zombie(p))
    });
    assert!(gone, "processes survived SIGKILL");
    let out = bftfs(
        &["umount".as_ref(), m.mnt.as_os_str(), "--lazy".as_ref()],
        &m.xdg,
    );
    assert!(out.status.success(), "umount --lazy: {}", text(&out));
    std::mem::forget(m);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|t| t.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Reads every file and lists every directory under `root`; returns the number of entries.
fn walk(root: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(root).unwrap_or_else(|e| panic!("readdir {}: {e}", root.display())) {
        let e = e.expect("entry");
        let t = e.file_type().expect("file type");
        n += 1;
        if t.is_dir() {
            n += walk(&e.path());
        } else if t.is_file() {
            std::fs::read(e.path())
                .unwrap_or_else(|err| panic!("read {}: {err}", e.path().display()));
        }
    }
    n
}

#[test]
fn total_power_loss_keeps_every_returned_write() {
    let name = "total_power_loss_keeps_every_returned_write";
    // Without replicas a returned call is not yet durable (see README).
    if !replicated_mounts_available(name) {
        return;
    }
    let (tmp, [mnt, xdg, data]) = scratch(["mnt", "xdg", "data"]);
    eprintln!("power-loss test directory: {}", tmp.path().display());
    if std::env::var("BFTFS_KEEP").is_ok() {
        std::mem::forget(tmp);
    }
    std::fs::create_dir(&mnt).expect("mkdir");
    // -o sync: the workload counts a write as done when write(2) returns, which is what that
    // mode promises. In the default mode a write is durable only once its file is closed or
    // fsync'ed (tests/write_modes.rs kills the mount between the two).
    let mut m = Mounted::at(&mnt, &xdg, Some(&data), &["-o", "sync"]).expect("up");
    assert_eq!(data_dir_of(&m), data);
    let dir = mnt.join("verify");
    // Something written once and fsync'ed, then left alone.
    std::fs::create_dir_all(mnt.join("static/a/b")).expect("mkdir");
    let mut f = std::fs::File::create(mnt.join("static/a/b/synced")).expect("create");
    f.write_all(b"fsynced before everything").expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    let mut seeds = replica::rng::Rng::new(0xfeed);
    for round in 0..3 {
        let seed = seeds.next_u64();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (stop, dir) = (stop.clone(), dir.clone());
            std::thread::spawn(move || {
                let mut w = Workload::new(&dir, 16, seed).expect("workload");
                // Stops at the first error: the power loss cut the call in progress short.
                while !stop.load(Ordering::Relaxed) && w.step().is_ok() {}
                w
            })
        };
        std::thread::sleep(Duration::from_millis(4000 + 1500 * round));
        power_loss(m);
        stop.store(true, Ordering::Relaxed);
        let w = worker.join().expect("workload thread");
        eprintln!(
            "round {round}: power loss after {:?}; interrupted: {:?}",
            w.counts, w.problems
        );
        assert_eq!(w.counts.mismatches, 0, "{:?}", w.problems);
        assert!(
            w.counts.writes > 10,
            "the workload made progress before the power loss: {:?}",
            w.counts
        );

        if std::env::var("BFTFS_KEEP").is_ok() {
            // Diagnostics: the data as the power loss left it, and what the workload expects.
            let copy = data.with_file_name(format!("data-round{round}"));
            let _ = Command::new("cp").arg("-a").arg(&data).arg(&copy).status();
            let dump = data.with_file_name(format!("model-round{round}"));
            std::fs::create_dir_all(dump.join("model")).expect("mkdir model dump");
            std::fs::create_dir_all(dump.join("pending")).expect("mkdir pending dump");
            for (k, v) in &w.model {
                std::fs::write(dump.join("model").join(k), v).expect("dump model");
            }
            for (k, v) in &w.pending {
                if let Some(v) = v {
                    std::fs::write(dump.join("pending").join(k), v).expect("dump pending");
                }
            }
        }
        let started = Instant::now();
        m = Mounted::at(&mnt, &xdg, Some(&data), &["-o", "sync"]).expect("up after the power loss");
        eprintln!("round {round}: up again in {:?}", started.elapsed());
        match w.check_after_crash() {
            Ok(how) => {
                eprintln!("round {round}: every returned call is there; the directory is {how}")
            }
            Err(e) => panic!(
                "round {round}: after the power loss: {e}\n{}",
                status_text(&m)
            ),
        }
        assert_eq!(
            std::fs::read(mnt.join("static/a/b/synced")).expect("read"),
            b"fsynced before everything"
        );
        let entries = walk(&mnt);
        assert!(entries >= 4, "tree walk found {entries} entries");
        // The file system goes on working on top of the recovered state.
        let mut w = Workload::new(&dir, 16, seed ^ 0xabc).expect("workload after restart");
        for _ in 0..100 {
            w.step()
                .unwrap_or_else(|e| panic!("after the restart: {e}"));
        }
    }
    // The replicas came back to one state each time: none took a checkpoint that differs
    // from the others' (with automatic locks, a lock the dead mount held is resolved to
    // one end for all of them).
    let diverged = divergence_in_replica_logs(&data);
    assert!(diverged.is_empty(), "{diverged:#?}");
    m.down();
}

/// Runs `cmd` with `sh -c` as uid/gid 1000; returns (success, output).
fn sh_as_user(cmd: &str) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .uid(1000)
        .gid(1000)
        .output()
        .expect("run sh as uid 1000");
    (out.status.success(), text(&out))
}

#[test]
fn hostile_names_and_forbidden_calls_through_the_mount() {
    let name = "hostile_names_and_forbidden_calls_through_the_mount";
    if !replicated_mounts_available(name) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // uid 1000 must be able to reach the mount point.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let (mnt, xdg) = (tmp.path().join("mnt"), tmp.path().join("xdg"));
    std::fs::create_dir(&mnt).expect("mkdir");
    let m = Mounted::at(&mnt, &xdg, None, &["-o", "attr_timeout=0,entry_timeout=0"]).expect("up");
    let data = data_dir_of(&m);
    let top_before: Vec<_> = std::fs::read_dir(&data)
        .expect("data dir")
        .map(|e| e.expect("e").file_name())
        .collect();

    // Names the kernel passes on: odd but legal, stored as plain names inside the tree.
    let odd = [
        "...",
        "..a",
        "a\\..\\b",
        "-rf",
        " ",
        "\u{202e}evil",
        &"n".repeat(255),
    ];
    for n in odd {
        std::fs::write(mnt.join(n), n.as_bytes()).unwrap_or_else(|e| panic!("{n:?}: {e}"));
    }
    let e = std::fs::write(mnt.join("n".repeat(256)), b"x").expect_err("a 256-byte name");
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    // A symlink climbing out is stored, not followed by the replicas.
    std::os::unix::fs::symlink("../../../../../../../../etc/passwd", mnt.join("up"))
        .expect("symlink");
    assert_eq!(
        std::fs::read_link(mnt.join("up"))
            .expect("readlink")
            .to_string_lossy(),
        "../../../../../../../../etc/passwd"
    );

    // uid 1000 against a root-owned 0644 file and 0755 directory.
    std::fs::write(mnt.join("root-file"), b"root's data").expect("write");
    std::fs::create_dir(mnt.join("root-dir")).expect("mkdir");
    let f = mnt.join("root-file").display().to_string();
    let d = mnt.join("root-dir").display().to_string();
    let denied = [
        (format!("echo user >> '{f}'"), "Permission denied"),
        (format!("chmod 777 '{f}'"), "Operation not permitted"),
        (format!("chown 1000 '{f}'"), "Operation not permitted"),
        (format!("truncate -s 0 '{f}'"), "Permission denied"),
        (format!("touch '{d}/intruder'"), "Permission denied"),
        (format!("rm -f '{f}'"), "Permission denied"),
        (format!("mv '{f}' '{d}/moved'"), "Permission denied"),
    ];
    for (cmd, want) in &denied {
        let (ok, out) = sh_as_user(cmd);
        assert!(
            !ok && out.contains(want),
            "as uid 1000, `{cmd}`: want {want:?}, got ok={ok} {out:?}"
        );
    }
    let (ok, out) = sh_as_user(&format!("cat '{f}'"));
    assert!(
        ok && out.contains("root's data"),
        "others may read a 0644 file: {out}"
    );
    // Let the idle replicas hear of the last batches, then compare what every replica stored.
    std::fs::write(mnt.join("last"), b"x").expect("write");
    let mut reps = Vec::new();
    let same = wait_until(Duration::from_secs(60), || {
        reps = replicas(&m);
        reps.len() == replica_count()
            && reps
                .iter()
                .all(|r| r.executed.is_some() && r.executed == reps[0].executed)
    });
    assert!(same, "replicas disagree: {reps:?}");
    for i in 0..replica_count() {
        let root = data.join(format!("replica-{i}/fs/tree/root"));
        assert_eq!(
            std::fs::read(root.join("root-file")).expect("replica copy"),
            b"root's data",
            "replica {i}"
        );
        assert!(
            !root.join("root-dir/intruder").exists() && !root.join("root-dir/moved").exists(),
            "replica {i}"
        );
        for n in odd {
            assert_eq!(
                std::fs::read(root.join(n)).unwrap_or_else(|e| panic!("replica {i}, {n:?}: {e}")),
                n.as_bytes()
            );
        }
        assert!(std::fs::symlink_metadata(root.join("up"))
            .expect("link")
            .file_type()
            .is_symlink());
    }
    let mut top_after: Vec<_> = std::fs::read_dir(&data)
        .expect("data dir")
        .map(|e| e.expect("e").file_name())
        .collect();
    let mut top_before = top_before;
    top_before.sort();
    top_after.sort();
    assert_eq!(
        top_after, top_before,
        "nothing new next to the replicas' directories"
    );
    m.down();
}

#[test]
fn the_workload_knows_the_mounts_hidden_names() {
    assert_eq!(
        workload::HIDDEN_PREFIX,
        fs_client::open_files::HIDDEN_PREFIX
    );
}
