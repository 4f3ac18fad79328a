//! Zzyzx locks on real mounts (f=1, four `bftfs-replica` processes): `bftfs lock` of a work
//! directory, work in it served by the lock's log (a real build included), `bftfs unlock`,
//! and a second mount that sees everything; a second mount that touches the locked subtree
//! while it is held (the lock is revoked, and nothing the holder completed is lost).

mod common;

use common::*;
use state_abstraction::fs::locks::{POOL_INITIAL, RELEASE_GRACE_NS};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Kernel attribute and entry caches off, so each mount asks the replicas every time.
const NO_CACHE: &str = "attr_timeout=0,entry_timeout=0";

fn lock(path: &Path, xdg: &Path, take: bool) {
    let cmd = if take { "lock" } else { "unlock" };
    let out = bftfs(&[cmd.as_ref(), path.as_os_str()], xdg);
    assert!(out.status.success(), "bftfs {cmd}: {}", text(&out));
}

/// Every file under `dir` with its bytes (symlinks as their targets), sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", d.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
            let meta = fs::symlink_metadata(&p).expect("lstat");
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&p).expect("readlink");
                out.push((rel, target.display().to_string().into_bytes()));
            } else if meta.is_dir() {
                out.push((rel + "/", Vec::new()));
                stack.push(p);
            } else {
                out.push((rel, fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// A little of everything a user does in a work directory.
fn work(dir: &Path, tag: &str) {
    fs::create_dir_all(dir.join("src/deep")).expect("mkdir");
    for i in 0..40 {
        fs::write(
            dir.join(format!("src/f{i}.txt")),
            format!("{tag} file {i}\n").repeat(i + 1),
        )
        .expect("write");
    }
    let big: Vec<u8> = (0..(1 << 20) + 333).map(|i| (i % 251) as u8).collect();
    fs::write(dir.join("src/deep/big.bin"), &big).expect("write 1 MiB");
    fs::rename(dir.join("src/f3.txt"), dir.join("src/deep/three.txt")).expect("rename");
    fs::remove_file(dir.join("src/f4.txt")).expect("unlink");
    std::os::unix::fs::symlink("deep/three.txt", dir.join("src/link")).expect("symlink");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(dir.join("src/f5.txt"))
        .expect("open");
    f.write_all(b"appended\n").expect("append");
    drop(f);
    assert_eq!(
        fs::read(dir.join("src/deep/big.bin")).expect("read back"),
        big
    );
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A small C project built and run in the mount (when a compiler and make are installed).
fn build(dir: &Path) -> bool {
    if !have("cc") || !have("make") {
        eprintln!("no cc or make: the build step is skipped");
        return false;
    }
    fs::create_dir_all(dir.join("hello")).expect("mkdir");
    fs::write(dir.join("hello/greet.h"), "const char *greeting(void);\n").expect("write");
    fs::write(
        dir.join("hello/greet.c"),
        "#include \"greet.h\"\nconst char *greeting(void) { return \"hello from the lock\"; }\n",
    )
    .expect("write");
    fs::write(
        dir.join("hello/main.c"),
        "#include <stdio.h>\n#include \"greet.h\"\nint main(void) { puts(greeting()); return 0; }\n",
    )
    .expect("write");
    fs::write(
        dir.join("hello/Makefile"),
        "hello: main.o greet.o\n\tcc -o $@ main.o greet.o\n%.o: %.c greet.h\n\tcc -c -o $@ $<\n",
    )
    .expect("write");
    let out = Command::new("make")
        .arg("-C")
        .arg(dir.join("hello"))
        .output()
        .expect("make");
    assert!(
        out.status.success(),
        "make: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(dir.join("hello/hello")).output().expect("run");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "hello from the lock\n"
    );
    true
}

/// A cluster mounted twice (two clients), kernel caches off. Fields drop in this order:
/// the mounts before their temporary directory.
struct Two {
    first: Mounted,
    _second: Unmount,
    mnt2: std::path::PathBuf,
    xdg: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

fn two_mounts() -> Two {
    let (tmp, [mnt1, mnt2, xdg]) = scratch(["one", "two", "xdg"]);
    fs::create_dir(&mnt1).expect("mkdir");
    fs::create_dir(&mnt2).expect("mkdir");
    let first = Mounted::at(&mnt1, &xdg, None, &["-o", NO_CACHE]).expect("up");
    let second = second_mount(&first, &mnt2, &xdg, NO_CACHE);
    Two {
        first,
        _second: second,
        mnt2,
        xdg,
        _tmp: tmp,
    }
}

#[test]
fn a_locked_work_directory_merges_and_a_second_mount_sees_it_all() {
    if !replicated_mounts_available("a_locked_work_directory_merges_and_a_second_mount_sees_it_all")
    {
        return;
    }
    let t = two_mounts();
    let (mnt1, mnt2, xdg) = (t.first.mnt.clone(), t.mnt2.clone(), t.xdg.clone());
    let work_dir = mnt1.join("work");
    fs::create_dir(&work_dir).expect("mkdir work");
    fs::write(work_dir.join("before.txt"), b"written before the lock").expect("write");

    lock(&work_dir, &xdg, true);
    // Locking it twice: refused (already covered).
    let again = bftfs(&["lock".as_ref(), work_dir.as_os_str()], &xdg);
    assert!(!again.status.success(), "a second lock of the same tree");
    work(&work_dir, "locked");
    let built = build(&work_dir);
    let seen_by_holder = tree(&work_dir);
    lock(&work_dir, &xdg, false);

    let seen_by_other = tree(&mnt2.join("work"));
    assert_eq!(seen_by_other, seen_by_holder);
    assert!(seen_by_other.iter().any(|(p, _)| p == "src/deep/big.bin"));
    if built {
        assert!(seen_by_other.iter().any(|(p, _)| p == "hello/hello"));
    }
    // After the merge both mounts go on through ordinary agreement.
    fs::write(mnt2.join("work/after.txt"), b"from the other mount").expect("write");
    assert_eq!(
        fs::read(work_dir.join("after.txt")).expect("read"),
        b"from the other mount"
    );
    t.first.down();
}

#[test]
fn a_second_mount_touching_a_locked_tree_revokes_it_and_loses_nothing() {
    if !replicated_mounts_available(
        "a_second_mount_touching_a_locked_tree_revokes_it_and_loses_nothing",
    ) {
        return;
    }
    let t = two_mounts();
    let (mnt1, mnt2, xdg) = (t.first.mnt.clone(), t.mnt2.clone(), t.xdg.clone());
    let work_dir = mnt1.join("work");
    fs::create_dir(&work_dir).expect("mkdir work");
    lock(&work_dir, &xdg, true);
    work(&work_dir, "before revocation");
    let seen_by_holder = tree(&work_dir);

    // The other mount reads and writes inside the locked tree: its calls wait until the
    // lock merged, then see everything the holder completed. The holder, told of the
    // freeze by the replicas, releases at once with a certificate, so the first call
    // does not wait out the release grace (after which another client could resolve
    // the lock without the holder; before, it waited 6 s).
    let asked = std::time::Instant::now();
    let size = fs::metadata(mnt2.join("work/src/f5.txt"))
        .expect("stat on the other mount")
        .len();
    let waited = asked.elapsed();
    assert!(size > 0);
    assert!(
        waited < Duration::from_nanos(RELEASE_GRACE_NS) - Duration::from_secs(1),
        "the other mount waited {waited:?} for the lock: the holder did not give it back"
    );
    let seen_by_other = tree(&mnt2.join("work"));
    assert_eq!(seen_by_other, seen_by_holder);
    fs::write(mnt2.join("work/src/from-two.txt"), b"two").expect("write");
    // The holder goes on, through agreement now; unlock finds no lock to give back.
    fs::write(work_dir.join("src/from-one.txt"), b"one").expect("write");
    assert_eq!(
        fs::read(mnt2.join("work/src/from-one.txt")).expect("read"),
        b"one"
    );
    assert_eq!(
        fs::read(work_dir.join("src/from-two.txt")).expect("read"),
        b"two"
    );
    // The holder read src/f3.txt under the lock (its attributes were in the lock's cache):
    // a change by the other mount shows at once, in size and in bytes.
    fs::write(mnt2.join("work/src/f3.txt"), b"changed by two").expect("write");
    assert_eq!(
        fs::metadata(work_dir.join("src/f3.txt"))
            .expect("stat")
            .len(),
        14
    );
    assert_eq!(
        fs::read(work_dir.join("src/f3.txt")).expect("read"),
        b"changed by two"
    );
    t.first.down();
}

/// The pid of replica `id` from `bftfs status --json`.
fn replica_pid(m: &Mounted, id: u64) -> Option<i32> {
    let (_, json) = status(m, true);
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    v["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["id"].as_u64() == Some(id))
        .and_then(|r| r["status"]["pid"].as_u64())
        .map(|p| p as i32)
}

/// Rounds of locked work, checked against what was written, with `between` run after the
/// first round; then unlock, and the same tree through ordinary agreement.
fn locked_rounds(m: &Mounted, between: impl FnOnce()) {
    let work_dir = m.path("work");
    fs::create_dir(&work_dir).expect("mkdir work");
    lock(&work_dir, &m.xdg, true);
    let mut between = Some(between);
    for round in 0..4 {
        for i in 0..25 {
            fs::write(
                work_dir.join(format!("f{i}")),
                format!("round {round} file {i}\n"),
            )
            .expect("write");
        }
        if let Some(b) = between.take() {
            b();
        }
        for i in 0..25 {
            assert_eq!(
                fs::read_to_string(work_dir.join(format!("f{i}"))).expect("read"),
                format!("round {round} file {i}\n")
            );
        }
    }
    let seen = tree(&work_dir);
    lock(&work_dir, &m.xdg, false);
    assert_eq!(tree(&work_dir), seen);
}

#[test]
fn a_lying_log_server_changes_nothing_under_a_lock() {
    if !replicated_mounts_available("a_lying_log_server_changes_nothing_under_a_lock") {
        return;
    }
    if test_f() != "1" {
        eprintln!("SKIPPED a_lying_log_server_changes_nothing_under_a_lock: needs f=1");
        return;
    }
    let (_tmp, [mnt, xdg]) = scratch(["mnt", "xdg"]);
    fs::create_dir(&mnt).expect("mkdir");
    let m = match Mounted::at(&mnt, &xdg, None, &["--byzantine", "2:lie"]) {
        Ok(m) => m,
        Err(e) => panic!(
            "bftfs up --byzantine: {e} (the bftfs-replica next to bftfs needs the `byzantine` \
             feature: `cargo test --workspace` builds it)"
        ),
    };
    locked_rounds(&m, || {});
    m.down();
}

/// Locked rounds with replica `id` SIGKILLed after the first: `bftfs up` restarts it, and
/// it replays the lock's log from its write-ahead log while the others go on.
fn killed_during_locked_work(name: &str, id: u64) {
    if !replicated_mounts_available(name) {
        return;
    }
    let m = Mounted::new();
    locked_rounds(&m, || {
        let pid = replica_pid(&m, id).unwrap_or_else(|| panic!("replica {id} pid"));
        assert!(send_signal(pid, nix::sys::signal::Signal::SIGKILL));
        assert!(wait_until(Duration::from_secs(30), || {
            replica_pid(&m, id).is_some_and(|p| p != pid)
        }));
    });
    m.down();
}

#[test]
fn a_log_server_killed_during_locked_work_loses_nothing() {
    killed_during_locked_work("a_log_server_killed_during_locked_work_loses_nothing", 1);
}

/// The primary of view 0: the log needs no primary, but the unlock is ordered and waits for
/// the view change its death causes.
#[test]
fn the_primary_killed_during_locked_work_loses_nothing() {
    killed_during_locked_work("the_primary_killed_during_locked_work_loses_nothing", 0);
}

/// Whether some replica reports an active Zzyzx lock (`bftfs status --json`).
fn lock_active(m: &Mounted) -> bool {
    let (_, json) = status(m, true);
    json.contains("\"state\":\"active\"")
}

#[test]
fn locks_auto_takes_a_busy_directory_and_backs_off_after_a_revocation() {
    if !replicated_mounts_available(
        "locks_auto_takes_a_busy_directory_and_backs_off_after_a_revocation",
    ) {
        return;
    }
    let (_tmp, [mnt1, mnt2, xdg]) = scratch(["one", "two", "xdg"]);
    fs::create_dir(&mnt1).expect("mkdir");
    fs::create_dir(&mnt2).expect("mkdir");
    let options = format!("{NO_CACHE},locks=auto,lock_idle=2");
    let first = Mounted::at(&mnt1, &xdg, None, &["-o", &options]).expect("up");
    let _second = second_mount(&first, &mnt2, &xdg, NO_CACHE);
    let work_dir = mnt1.join("work");
    fs::create_dir(&work_dir).expect("mkdir work");
    // A few changes are not enough.
    for i in 0..4 {
        fs::write(work_dir.join(format!("few{i}")), b"few").expect("write");
    }
    assert!(!lock_active(&first), "locked after 4 changes");
    // A burst of changes in one directory takes a lock on it.
    for i in 0..40 {
        fs::write(work_dir.join(format!("a{i}")), format!("first {i}")).expect("write");
    }
    assert!(
        wait_until(Duration::from_secs(10), || lock_active(&first)),
        "no lock after 40 creates in one directory with locks=auto"
    );
    // The other mount needs it: the lock is revoked, and everything is there.
    let mut names: Vec<String> = fs::read_dir(mnt2.join("work"))
        .expect("readdir on the other mount")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 44, "{names:?}");
    assert_eq!(fs::read(mnt2.join("work/a39")).expect("read"), b"first 39");
    // Another burst right after: the directory is in back-off, so it stays unlocked and
    // both mounts go on through agreement.
    for i in 0..40 {
        fs::write(work_dir.join(format!("b{i}")), format!("second {i}")).expect("write");
    }
    std::thread::sleep(Duration::from_millis(600));
    assert!(!lock_active(&first), "locked again within the back-off");
    assert_eq!(fs::read(mnt2.join("work/b39")).expect("read"), b"second 39");
    // Another directory: locked by a burst, given back once idle for lock_idle.
    let other = mnt1.join("other");
    fs::create_dir(&other).expect("mkdir other");
    for i in 0..20 {
        fs::write(other.join(format!("c{i}")), b"c").expect("write");
    }
    assert!(
        wait_until(Duration::from_secs(10), || lock_active(&first)),
        "no lock on the second busy directory"
    );
    assert!(
        wait_until(Duration::from_secs(15), || !lock_active(&first)),
        "an idle automatic lock was not given back"
    );
    assert_eq!(fs::read(mnt2.join("other/c19")).expect("read"), b"c");
    first.down();
}

/// A faulty holder: the mount holding the lock is SIGKILLed in the middle of its work. What
/// its calls completed was in the lock's log at 2f+1 replicas, so another mount that opens
/// the tree (revoking the lock; it merges after the release grace) sees all of it.
#[test]
fn a_holder_killed_mid_work_loses_nothing_it_completed() {
    if !replicated_mounts_available("a_holder_killed_mid_work_loses_nothing_it_completed") {
        return;
    }
    let (_tmp, [mnt1, mnt2, xdg]) = scratch(["one", "two", "xdg"]);
    fs::create_dir(&mnt1).expect("mkdir");
    fs::create_dir(&mnt2).expect("mkdir");
    let first = Mounted::at(&mnt1, &xdg, None, &["-o", NO_CACHE]).expect("up");
    let config = data_dir_of(&first).join("cluster/cluster.json");
    // The holder is a mount of its own, so that killing it leaves the cluster running.
    let (_, holder_pid) = mount_detached(&config, &mnt2, &xdg, &[NO_CACHE, "sync"]);
    let _holder = Unmount(mnt2.clone(), xdg.clone());
    let work_dir = mnt2.join("work");
    fs::create_dir(&work_dir).expect("mkdir work");
    lock(&work_dir, &xdg, true);
    work(&work_dir, "holder");
    let completed = tree(&work_dir);
    // More work in flight when it dies: none of it is promised.
    let writer = {
        let work_dir = work_dir.clone();
        std::thread::spawn(move || {
            for i in 0..1000 {
                if fs::write(work_dir.join(format!("late{i}")), b"late").is_err() {
                    return;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(send_signal(holder_pid, nix::sys::signal::Signal::SIGKILL));
    let _ = writer.join();

    let seen: Vec<(String, Vec<u8>)> = tree(&mnt1.join("work"))
        .into_iter()
        .filter(|(p, _)| !p.starts_with("late"))
        .collect();
    assert_eq!(seen, completed);
    // The tree is the ordered state's again: the first mount changes it.
    fs::write(mnt1.join("work/after.txt"), b"after").expect("write after the merge");
    assert_eq!(
        fs::read(mnt1.join("work/after.txt")).expect("read"),
        b"after"
    );
    // The dead holder's lock was resolved by the first mount (it would otherwise have
    // stayed frozen for a minute, past the calls' timeout), and every replica merged the
    // same entries.
    let diverged = divergence_in_replica_logs(&data_dir_of(&first));
    assert!(diverged.is_empty(), "{diverged:#?}");
    first.down();
}

/// A replica SIGKILLed while entries remove files that existed before the lock was taken
/// and create others: it must come back, serve, and agree. (At a restart the table, saved
/// before those entries, can name nodes that are gone; a replica used to halt at every
/// restart for that, for good. Seen with `-o locks=auto` under PostMark and SIGKILLs; this
/// test did not reproduce that exact interleaving, and guards the path around it.)
#[test]
fn a_replica_killed_after_removing_files_older_than_the_lock_restarts() {
    if !replicated_mounts_available(
        "a_replica_killed_after_removing_files_older_than_the_lock_restarts",
    ) {
        return;
    }
    let m = Mounted::new();
    let work_dir = m.path("work");
    fs::create_dir(&work_dir).expect("mkdir work");
    for i in 0..20 {
        fs::write(work_dir.join(format!("old{i}")), vec![b'o'; 3000 + i]).expect("write");
    }
    lock(&work_dir, &m.xdg, true);
    for i in 0..10 {
        fs::remove_file(work_dir.join(format!("old{i}"))).expect("remove");
    }
    for i in 10..15 {
        fs::write(work_dir.join(format!("old{i}")), b"rewritten").expect("rewrite");
    }
    for i in 0..10 {
        fs::write(work_dir.join(format!("new{i}")), format!("new {i}")).expect("write");
    }
    // Creates and removes going on (PostMark's transactions) while the replica dies.
    let churn = {
        let work_dir = work_dir.clone();
        std::thread::spawn(move || {
            for i in 0..400 {
                let f = work_dir.join(format!("t{}", i % 40));
                if i % 2 == 0 {
                    fs::write(&f, vec![b't'; 2000 + i]).expect("churn write");
                } else {
                    let _ = fs::remove_file(work_dir.join(format!("t{}", (i * 7) % 40)));
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let pid = replica_pid(&m, 2).expect("replica 2 pid");
    assert!(send_signal(pid, nix::sys::signal::Signal::SIGKILL));
    churn.join().expect("churn");
    let seen = tree(&work_dir);
    let mut restarted = None;
    assert!(wait_until(Duration::from_secs(30), || {
        restarted = replica_pid(&m, 2).filter(|p| *p != pid);
        restarted.is_some()
    }));
    // A replica that halts at restart is restarted again at once, with another pid.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        replica_pid(&m, 2),
        restarted,
        "replica 2 keeps failing to restart"
    );
    lock(&work_dir, &m.xdg, false);
    assert_eq!(tree(&work_dir), seen);
    m.down();
}

/// The holder changes its lock root's mode under the lock: it sees the new mode wherever it
/// looks, also through the parent (a lookup or a listing from outside the lock, which the
/// replicas answer with the root's attributes as at activation). Seen as a wrong directory
/// mode after `tar x` with automatic locks.
#[test]
fn the_holder_sees_its_own_changes_to_the_lock_root() {
    if !replicated_mounts_available("the_holder_sees_its_own_changes_to_the_lock_root") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let (_tmp, [mnt, xdg]) = scratch(["mnt", "xdg"]);
    fs::create_dir(&mnt).expect("mkdir");
    let m = Mounted::at(&mnt, &xdg, None, &["-o", NO_CACHE]).expect("up");
    let work = mnt.join("work");
    fs::create_dir(&work).expect("mkdir work");
    fs::set_permissions(&work, fs::Permissions::from_mode(0o700)).expect("chmod 700");
    lock(&work, &xdg, true);
    fs::write(work.join("inside"), b"x").expect("write inside");
    fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).expect("chmod 755");
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&work), 0o755, "stat of the lock root");
    let listed = sh(&format!("ls -ld {}", work.display()));
    assert!(listed.starts_with("drwxr-xr-x"), "ls -ld: {listed}");
    let from_parent = sh(&format!("ls -l {} | grep ' work$'", mnt.display()));
    assert!(
        from_parent.starts_with("drwxr-xr-x"),
        "ls -l of the parent: {from_parent}"
    );
    lock(&work, &xdg, false);
    assert_eq!(mode(&work), 0o755, "after the merge");
    m.down();
}

/// Replica `id`'s view in `bftfs status --json`: the locks whose log it serves, and how many
/// lock contents it fetched from peers.
fn replica_locks(m: &Mounted, id: u64) -> (Vec<u64>, u64) {
    let (_, json) = status(m, true);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    let Some(r) = v["replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"].as_u64() == Some(id)))
    else {
        return (Vec::new(), 0);
    };
    let locks = r["status"]["locks"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["lock"].as_u64()).collect())
        .unwrap_or_default();
    (
        locks,
        r["status"]["lock_contents_fetched"].as_u64().unwrap_or(0),
    )
}

/// Lock state transfer on real processes: a replica stopped before a lock's activation
/// misses it, and is killed after ordered work elsewhere moved the cluster past its log
/// window, so when it runs again it catches up by state transfer to a state where the lock
/// is active, with placeholders only. It fetches the lock's content (a 3 MiB file among it: several pages)
/// from its peers and serves the lock's log: with f other replicas stopped next, the locked
/// work still completes, which needs it among the 2f+1.
#[test]
fn a_replica_that_missed_a_locks_activation_fetches_its_content_and_serves_the_lock() {
    let name = "a_replica_that_missed_a_locks_activation_fetches_its_content_and_serves_the_lock";
    if !replicated_mounts_available(name) {
        return;
    }
    let f: u64 = test_f().parse().expect("BFTFS_TEST_F");
    let n = 3 * f + 1;
    // Manual locks whatever BFTFS_TEST_LOCKS says: an automatic lock on `work` taken
    // before the replica stops would leave it nothing to fetch.
    let (_tmp, [mnt, xdg]) = scratch(["mnt", "xdg"]);
    fs::create_dir(&mnt).expect("mkdir");
    let m = Mounted::at(&mnt, &xdg, None, &["-o", "locks=manual"]).expect("bftfs up");
    let work_dir = m.path("work");
    fs::create_dir(&work_dir).expect("mkdir work");
    let big: Vec<u8> = (0..3 << 20).map(|i| (i % 239) as u8).collect();
    fs::write(work_dir.join("big.bin"), &big).expect("write 3 MiB");
    for i in 0..30 {
        fs::write(work_dir.join(format!("f{i}")), format!("before {i}\n")).expect("write");
    }
    let lagging = n - 1;
    let pid = |id: u64| replica_pid(&m, id).unwrap_or_else(|| panic!("replica {id} pid")) as u32;
    let mut stopped = Stopped(Vec::new());
    let old = pid(lagging);
    stopped.stop(old);
    // Ordered work first, enough to overflow what its peers queue for the stopped replica
    // (4,096 frames each): it will not see the lock's activation, and must catch up by
    // state transfer rather than from the messages queued for it.
    let outside = m.path("outside");
    fs::create_dir(&outside).expect("mkdir outside");
    let ordered_work = |from: usize, to: usize| {
        for i in from..to {
            fs::write(outside.join(format!("o{i}")), b"o").expect("write outside");
        }
    };
    ordered_work(0, 1000);

    lock(&work_dir, &m.xdg, true);
    let mut lock_id = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            lock_id = replica_locks(&m, 0).0.first().copied();
            lock_id.is_some()
        }),
        "replica 0 serves no lock"
    );
    let lock_id = lock_id.expect("a lock");
    for i in 0..30 {
        fs::write(work_dir.join(format!("f{i}")), format!("locked {i}\n")).expect("write");
    }
    // A few checkpoints past the activation, for the state transfer to reach.
    ordered_work(1000, 1200);
    // Killed while stopped: what its peers had sent it (socket buffers hold thousands of
    // frames) is lost, so the restarted process, after its own log, is below its peers'
    // stable checkpoint and catches up by state transfer. `bftfs up` restarts it.
    assert!(send_signal(old as i32, Signal::SIGKILL));
    stopped.0.clear();
    assert!(wait_until(Duration::from_secs(30), || {
        replica_pid(&m, lagging).is_some_and(|p| p as u32 != old)
    }));
    assert!(
        wait_until(Duration::from_secs(90), || {
            let (locks, fetched) = replica_locks(&m, lagging);
            locks.contains(&lock_id) && fetched >= 1
        }),
        "replica {lagging} never served lock {lock_id}: {:?}\n{}",
        replica_locks(&m, lagging),
        status(&m, false).1
    );

    // f others stopped: the lock's log goes on only with the returned replica's replies.
    for id in 1..=f {
        stopped.stop(pid(id));
    }
    for i in 0..30 {
        fs::write(
            work_dir.join(format!("g{i}")),
            format!("with {lagging} {i}\n"),
        )
        .expect("write");
    }
    let mut part = fs::OpenOptions::new()
        .write(true)
        .open(work_dir.join("big.bin"))
        .expect("open big");
    use std::io::{Seek, SeekFrom};
    part.seek(SeekFrom::Start(1 << 20)).expect("seek");
    part.write_all(&[7u8; 4096]).expect("overwrite");
    drop(part);
    stopped.resume_all();
    let mut want = big.clone();
    want[1 << 20..(1 << 20) + 4096].fill(7);
    let seen = tree(&work_dir);
    lock(&work_dir, &m.xdg, false);
    assert_eq!(tree(&work_dir), seen);
    assert_eq!(fs::read(work_dir.join("big.bin")).expect("read big"), want);
    assert_eq!(
        fs::read_to_string(work_dir.join("g29")).expect("read g29"),
        format!("with {lagging} 29\n")
    );
    let diverged = divergence_in_replica_logs(&data_dir_of(&m));
    assert!(diverged.is_empty(), "{diverged:?}");
    m.down();
}

/// Automatic locks under concurrency: six threads each fill a directory of their own, so the
/// mount takes, switches and gives back locks while other threads' calls are queued on a
/// lock's log or in flight on the ordered path. Nothing may be lost, and no call may wait out
/// its timeout: a release once waited for queued entries that waited for the release (30 s,
/// then EIO at close, which `fs::write` does not report).
#[test]
fn concurrent_writers_under_automatic_locks_lose_nothing_and_never_stall() {
    let name = "concurrent_writers_under_automatic_locks_lose_nothing_and_never_stall";
    if !replicated_mounts_available(name) {
        return;
    }
    let (_tmp, [mnt, xdg]) = scratch(["mnt", "xdg"]);
    fs::create_dir(&mnt).expect("mkdir");
    let m = Mounted::at(&mnt, &xdg, None, &["-o", "locks=auto"]).expect("bftfs up");
    for round in 0..5 {
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            for t in 0..6 {
                let dir = m.path(&format!("r{round}-par{t}"));
                s.spawn(move || {
                    fs::create_dir(&dir).expect("mkdir");
                    for i in 0..100 {
                        let mut f = fs::File::create(dir.join(format!("{i}"))).expect("create");
                        f.write_all(format!("{t}:{i}").as_bytes()).expect("write");
                        // Close errors are what a stall turns into: see them.
                        f.sync_all().expect("fsync");
                    }
                });
            }
        });
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(25),
            "round {round} took {took:?}"
        );
        for t in 0..6 {
            for i in 0..100 {
                assert_eq!(
                    fs::read_to_string(m.path(&format!("r{round}-par{t}/{i}"))).expect("read"),
                    format!("{t}:{i}"),
                    "round {round}"
                );
            }
        }
    }
    let (_, said) = status(&m, false);
    assert!(said.contains(" 0 failed"), "{said}");
    m.down();
}

/// Big inputs under an automatic lock: a directory filled with more files than a lock's
/// pool holds. The create that finds the pool used up answers `PoolEmpty` (no effect); the
/// mount gives the lock back and takes the directory again, with a fresh pool, and goes on
/// under the new lock (before, it went ordered and met its own lock). Every file is there.
#[test]
fn a_directory_larger_than_a_locks_pool_fills_under_a_retaken_lock() {
    if !replicated_mounts_available(
        "a_directory_larger_than_a_locks_pool_fills_under_a_retaken_lock",
    ) {
        return;
    }
    let (_tmp, [mnt, xdg]) = scratch(["mnt", "xdg"]);
    fs::create_dir(&mnt).expect("mkdir");
    // -v: the log says how the lock went (debug lines too; the test reads info ones).
    let m = Mounted::at(&mnt, &xdg, None, &["-o", "locks=auto", "-v"]).expect("up");
    let dir = mnt.join("many");
    fs::create_dir(&dir).expect("mkdir many");
    let files = POOL_INITIAL as usize + 600;
    for i in 0..files {
        fs::File::create(dir.join(format!("f{i:05}"))).expect("create");
    }
    // Still under a lock, and not the first one: the directory was taken again.
    let (locks, _) = replica_locks(&m, 0);
    assert!(
        locks.iter().any(|&l| l >= 1),
        "after {files} creates the replicas list locks {locks:?}: not taken again"
    );
    // Taken again by the rotation, not after the mount's own ordered call froze it.
    let log = fs::read_to_string(data_dir_of(&m).join("up.log")).unwrap_or_default();
    eprintln!("the mount's log: {} bytes", log.len());
    assert!(
        log.contains("pool of new objects is used up"),
        "no rotation for an empty pool in the mount's log"
    );
    assert!(
        !log.contains("froze the lock"),
        "the lock was frozen on the way"
    );
    let names = fs::read_dir(&dir).expect("readdir").count();
    assert_eq!(names, files);
    fs::write(dir.join("f00007"), b"seven").expect("write");
    assert_eq!(fs::read(dir.join("f00007")).expect("read"), b"seven");
    m.down();
}

/// Two mounts working in one directory at once, with the default options (automatic locks,
/// kernel caches on): each creates and writes files of its own there, so each takes the
/// directory's lock in turn and the other's access revokes it; and each reads the other's
/// files right after the other closed them (close-to-open across mounts). Nothing may be
/// lost or stale, and no call may stall: a revocation once waited out the 5 s release
/// grace, and a lock revoked before it was served still did (its holder released it
/// without a certificate); a stall past the call timeout is an EIO.
#[test]
fn two_mounts_sharing_a_directory_under_automatic_locks_see_each_others_closed_files() {
    two_mounts_share_a_directory(
        "two_mounts_sharing_a_directory_under_automatic_locks_see_each_others_closed_files",
        None,
    );
}

/// The same with a replica SIGKILLed a moment into the work (`bftfs up` restarts it): locks
/// are taken, revoked, sealed and merged while it is down and while it catches up.
#[test]
fn two_mounts_sharing_a_directory_lose_nothing_when_a_replica_is_killed_midway() {
    two_mounts_share_a_directory(
        "two_mounts_sharing_a_directory_lose_nothing_when_a_replica_is_killed_midway",
        Some(0),
    );
}

fn two_mounts_share_a_directory(name: &str, kill: Option<u64>) {
    if !replicated_mounts_available(name) {
        return;
    }
    let (_tmp, [mnt1, mnt2, xdg]) = scratch(["one", "two", "xdg"]);
    fs::create_dir(&mnt1).expect("mkdir");
    fs::create_dir(&mnt2).expect("mkdir");
    // -v: the first mount's log says how its locks went (the test reads it at the end).
    let first = Mounted::at(&mnt1, &xdg, None, &["-v"]).expect("up");
    let _second = second_mount(&first, &mnt2, &xdg, "");
    fs::create_dir(mnt1.join("shared")).expect("mkdir shared");
    let started = std::time::Instant::now();
    // Each side writes `FILES` files, and after each one tells the other side its name;
    // the other reads it (from its own mount) and checks every byte.
    const FILES: usize = 120;
    let (to_two, from_one) = std::sync::mpsc::channel::<(String, Vec<u8>)>();
    let (to_one, from_two) = std::sync::mpsc::channel::<(String, Vec<u8>)>();
    let side = |mine: std::path::PathBuf,
                theirs: std::path::PathBuf,
                tag: &'static str,
                tell: std::sync::mpsc::Sender<(String, Vec<u8>)>,
                told: std::sync::mpsc::Receiver<(String, Vec<u8>)>| {
        move || {
            let mut checked = 0;
            for i in 0..FILES {
                let name = format!("{tag}-{i}");
                let body: Vec<u8> = format!("{tag} file {i}\n")
                    .repeat(i % 7 * 300 + 1)
                    .into_bytes();
                let mut f = fs::File::create(mine.join("shared").join(&name)).expect("create");
                f.write_all(&body).expect("write");
                drop(f);
                tell.send((name, body)).expect("tell");
                while let Ok((name, body)) = told.try_recv() {
                    let got = fs::read(theirs.join("shared").join(&name)).expect("read theirs");
                    assert_eq!(got.len(), body.len(), "{tag} read {name}: size");
                    assert!(got == body, "{tag} read {name}: content");
                    checked += 1;
                }
            }
            drop(tell);
            for (name, body) in told {
                let got = fs::read(theirs.join("shared").join(&name)).expect("read theirs");
                assert!(got == body, "{tag} read {name} at the end");
                checked += 1;
            }
            assert_eq!(checked, FILES, "{tag} checked");
        }
    };
    std::thread::scope(|s| {
        s.spawn(side(mnt1.clone(), mnt2.clone(), "one", to_two, from_two));
        s.spawn(side(mnt2.clone(), mnt1.clone(), "two", to_one, from_one));
        if let Some(id) = kill {
            std::thread::sleep(Duration::from_millis(700));
            let pid = replica_pid(&first, id).unwrap_or_else(|| panic!("replica {id} pid"));
            assert!(send_signal(pid, nix::sys::signal::Signal::SIGKILL));
        }
    });
    let took = started.elapsed();
    // Generous (a loaded 2-core machine): a single stall at the call timeout is 30 s.
    assert!(took < Duration::from_secs(25), "took {took:?}");
    // Both see the same directory, every file of both.
    let list = |m: &Path| {
        let mut names: Vec<String> = fs::read_dir(m.join("shared"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(list(&mnt1).len(), 2 * FILES);
    assert_eq!(list(&mnt1), list(&mnt2));
    let (_, said) = status(&first, false);
    assert!(said.contains(" 0 failed"), "{said}");
    // Locks should be given back sealed, those revoked before they were served too
    // (sealed empty), not resolved by another mount after the grace. Reported, not
    // asserted: with a replica killed a seal may not be had (it needs 2f+1), and CI showed
    // the fallback once without a kill too, on a loaded machine (the holder's release
    // losing the race against the grace).
    let log = fs::read_to_string(data_dir_of(&first).join("up.log")).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("resolved a frozen lock")) {
        eprintln!("resolved after the grace (kill {kill:?}): {line}");
    }
    // Not asserted: a replica whose copy of a lock's log missed the entry in flight at the
    // freeze fetches it after the certified release, and if the merge's checkpoint comes
    // first it merges short and is repaired by state transfer (logged as a checkpoint that
    // differs from the certified one; seen once in CI). Holding the checkpoint until the
    // log reaches the end is not built (DESIGN-CHANGES, "Resolving a frozen lock").
    for line in divergence_in_replica_logs(&data_dir_of(&first)) {
        eprintln!("repaired by state transfer: {line}");
    }
    first.down();
}
