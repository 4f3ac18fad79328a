//! Real mounts of a replicated cluster (f=1, four `bftfs-replica` processes): two clients of
//! one cluster, and a replica killed with SIGKILL in the middle of a workload.

mod common;

use common::*;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn status_json(m: &Mounted) -> String {
    status(m, true).1
}

/// The per-replica objects of `bftfs status --json`, as (id, pid, last_executed, health).
fn replicas(json: &str) -> Vec<(u32, Option<u32>, Option<u64>, String)> {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("status --json: {e}: {json}"));
    v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["id"].as_u64().unwrap_or(99) as u32,
                        r["status"]["pid"].as_u64().map(|p| p as u32),
                        r["status"]["last_executed"].as_u64(),
                        r["health"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_mounts_of_one_cluster_see_each_others_changes() {
    if !replicated_mounts_available("two_mounts_of_one_cluster_see_each_others_changes") {
        return;
    }
    let (_tmp, [mnt1, mnt2, xdg]) = scratch(["one", "two", "xdg"]);
    fs::create_dir(&mnt1).expect("mkdir");
    fs::create_dir(&mnt2).expect("mkdir");
    let first =
        Mounted::at(&mnt1, &xdg, None, &["-o", "attr_timeout=0,entry_timeout=0"]).expect("up");
    let _second = second_mount(&first, &mnt2, &xdg, "attr_timeout=0,entry_timeout=0");

    fs::write(
        mnt1.join("from-one.txt"),
        b"written through the first mount",
    )
    .expect("write 1");
    assert_eq!(
        fs::read(mnt2.join("from-one.txt")).expect("read 2"),
        b"written through the first mount"
    );
    fs::create_dir(mnt2.join("dir-two")).expect("mkdir 2");
    fs::write(mnt2.join("dir-two/x"), b"second").expect("write 2");
    assert_eq!(fs::read(mnt1.join("dir-two/x")).expect("read 1"), b"second");
    fs::rename(mnt1.join("from-one.txt"), mnt1.join("dir-two/moved.txt")).expect("rename 1");
    assert!(!mnt2.join("from-one.txt").exists());
    assert_eq!(
        fs::read(mnt2.join("dir-two/moved.txt")).expect("read moved"),
        b"written through the first mount"
    );
    // Appends from both sides land in one file, in order.
    for i in 0..20 {
        let m = if i % 2 == 0 { &mnt1 } else { &mnt2 };
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.join("shared.log"))
            .expect("open");
        writeln!(f, "line {i}").expect("append");
    }
    let text1 = fs::read_to_string(mnt1.join("shared.log")).expect("read");
    let want: String = (0..20).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text1, want);
    assert_eq!(
        fs::read_to_string(mnt2.join("shared.log")).expect("read"),
        want
    );

    let out = bftfs(&["umount".as_ref(), mnt2.as_os_str()], &xdg);
    assert!(out.status.success(), "umount: {}", text(&out));
    first.down();
}

/// Lists `dir` (readdirplus: the kernel caches every entry and its attributes).
fn list(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn open_error(path: &std::path::Path) -> Option<std::io::ErrorKind> {
    fs::File::open(path).err().map(|e| e.kind())
}

/// NFS's close-to-open rule between two clients: opening a file after another client closed
/// it shows everything that client did (contents, size, names), even though the kernel of
/// the opening client still holds the old attributes and entries (long cache timeouts here).
#[test]
fn close_to_open_between_two_mounts_whatever_the_cache_timeouts() {
    if !fuse_available("close_to_open_between_two_mounts_whatever_the_cache_timeouts") {
        return;
    }
    if test_f() == "0" {
        eprintln!("SKIPPED close-to-open: BFTFS_TEST_F=0 has no cluster to share");
        return;
    }
    let (_tmp, [a, b, xdg]) = scratch(["a", "b", "xdg"]);
    fs::create_dir(&a).expect("mkdir");
    fs::create_dir(&b).expect("mkdir");
    // Far longer than the test: whatever B sees fresh, its kernel did not time out.
    let ttls = "attr_timeout=600,entry_timeout=600";
    let first = Mounted::at(&a, &xdg, None, &["-o", ttls]).expect("up");
    let _second = second_mount(&first, &b, &xdg, ttls);
    let (da, db) = (a.join("d"), b.join("d"));
    fs::create_dir(&da).expect("mkdir d");
    for (name, before) in [
        ("grow", &b"1234"[..]),
        ("shrink", b"0123456789"),
        ("same-size", b"aaaa"),
        ("old", b"renamed"),
        ("old2", b"renamed too"),
        ("gone", b"removed"),
        ("target", b"replaced"),
    ] {
        fs::write(da.join(name), before).expect("write through a");
    }
    // B caches entries and attributes: a listing, and a stat of each file. (Not a read: that
    // marks the cached atime stale, and the next stat would then fetch everything afresh.)
    assert_eq!(
        list(&db),
        [
            "gone",
            "grow",
            "old",
            "old2",
            "same-size",
            "shrink",
            "target"
        ]
    );
    for name in [
        "grow",
        "shrink",
        "same-size",
        "old",
        "old2",
        "gone",
        "target",
    ] {
        let want = fs::metadata(da.join(name)).expect("stat through a").len();
        assert_eq!(
            fs::metadata(db.join(name)).expect("stat through b").len(),
            want
        );
    }

    // Contents and sizes: the report was `cat` showing the first 4 bytes of 6.
    fs::write(da.join("grow"), b"abcdef").expect("rewrite");
    assert_eq!(sh(&format!("cat {}", db.join("grow").display())), "abcdef");
    let f = fs::File::open(db.join("grow")).expect("open");
    assert_eq!(f.metadata().expect("fstat").len(), 6, "fstat after open");
    drop(f);
    fs::write(da.join("shrink"), b"xy").expect("rewrite");
    assert_eq!(fs::read(db.join("shrink")).expect("read"), b"xy");
    fs::write(da.join("same-size"), b"bbbb").expect("rewrite");
    assert_eq!(fs::read(db.join("same-size")).expect("read"), b"bbbb");
    // A file grown in place by appending (no truncation, same inode).
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(da.join("grow"))
        .expect("open for append");
    f.write_all(b"ghij").expect("append");
    drop(f);
    assert_eq!(fs::read(db.join("grow")).expect("read"), b"abcdefghij");

    // Names: the old name of a renamed file is gone, opened before or after the new one.
    fs::rename(da.join("old"), da.join("new")).expect("rename");
    assert_eq!(
        open_error(&db.join("old")),
        Some(std::io::ErrorKind::NotFound)
    );
    assert_eq!(fs::read(db.join("new")).expect("read new"), b"renamed");
    fs::rename(da.join("old2"), da.join("new2")).expect("rename");
    assert_eq!(
        fs::read(db.join("new2")).expect("read new2"),
        b"renamed too"
    );
    assert_eq!(
        open_error(&db.join("old2")),
        Some(std::io::ErrorKind::NotFound)
    );
    fs::remove_file(da.join("gone")).expect("remove");
    assert_eq!(
        open_error(&db.join("gone")),
        Some(std::io::ErrorKind::NotFound)
    );
    // Replaced by a rename over it (how editors save): the new file is opened.
    fs::write(da.join("target.tmp"), b"the new target").expect("write tmp");
    fs::rename(da.join("target.tmp"), da.join("target")).expect("rename over");
    assert_eq!(
        fs::read(db.join("target")).expect("read"),
        b"the new target"
    );

    // B's own changes keep working with the names it cached.
    fs::write(db.join("new"), b"from b").expect("write through b");
    assert_eq!(fs::read(da.join("new")).expect("read through a"), b"from b");
    assert_eq!(fs::read(db.join("new")).expect("read through b"), b"from b");

    let out = bftfs(&["umount".as_ref(), b.as_os_str()], &xdg);
    assert!(out.status.success(), "umount: {}", text(&out));
    first.down();
}

/// Content of file `i` after `round` overwrites.
fn content(i: usize, round: usize) -> Vec<u8> {
    format!("file {i} round {round} ")
        .repeat(1 + (i * 7 + round) % 300)
        .into_bytes()
}

#[test]
fn kill_9_of_a_replica_during_a_workload() {
    if !replicated_mounts_available("kill_9_of_a_replica_during_a_workload") {
        return;
    }
    let m = Mounted::new();
    let dir = m.path("work");
    fs::create_dir(&dir).expect("mkdir");
    let path = |i: usize| -> PathBuf { dir.join(format!("f{i}")) };
    let files = 40;
    let mut model: Vec<Vec<u8>> = vec![Vec::new(); files];
    let mut victims = Vec::new();
    let start = Instant::now();
    for round in 0..12 {
        if round == 3 || round == 8 {
            // Kill a replica (the primary the second time) with SIGKILL; `up` restarts it.
            let reps = replicas(&status_json(&m));
            let victim = if round == 3 { 2 } else { 0 };
            let pid = reps
                .iter()
                .find(|r| r.0 == victim)
                .and_then(|r| r.1)
                .expect("victim pid");
            assert!(send_signal(pid as i32, Signal::SIGKILL));
            victims.push((victim, pid));
        }
        for (i, slot) in model.iter_mut().enumerate() {
            let data = content(i, round);
            match (round + i) % 3 {
                0 => fs::write(path(i), &data).expect("write"),
                1 => {
                    // Overwrite in place, then truncate to size.
                    let mut f = fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(false)
                        .open(path(i))
                        .expect("open");
                    f.seek(SeekFrom::Start(0)).expect("seek");
                    f.write_all(&data).expect("write");
                    f.set_len(data.len() as u64).expect("truncate");
                }
                _ => {
                    let tmp = dir.join(format!("f{i}.tmp"));
                    fs::write(&tmp, &data).expect("write tmp");
                    fs::rename(&tmp, path(i)).expect("rename");
                }
            }
            *slot = data;
        }
        for (i, want) in model.iter().enumerate() {
            let mut got = Vec::new();
            fs::File::open(path(i))
                .expect("open")
                .read_to_end(&mut got)
                .expect("read");
            assert!(
                got == *want,
                "file {i} after round {round}: {} bytes, want {}",
                got.len(),
                want.len()
            );
        }
    }
    eprintln!("workload with two replicas killed: {:?}", start.elapsed());
    // The killed replicas were restarted (new pids) and caught up with the others.
    let caught_up = wait_until(Duration::from_secs(60), || {
        let reps = replicas(&status_json(&m));
        let best = reps.iter().filter_map(|r| r.2).max().unwrap_or(0);
        victims.iter().all(|(id, old_pid)| {
            reps.iter().any(|r| {
                r.0 == *id && r.1.is_some_and(|p| p != *old_pid) && r.2 == Some(best) && r.3 == "ok"
            })
        })
    });
    assert!(
        caught_up,
        "killed replicas did not come back and catch up: {}",
        status_json(&m)
    );
    let listing: Vec<String> = fs::read_dir(&dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listing.len(), files, "{listing:?}");
    m.down();
}
