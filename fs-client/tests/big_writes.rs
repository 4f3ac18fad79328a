//! Large writes across view changes, with real processes under a real mount (four
//! `bftfs-replica` processes started by `bftfs up`, f=1 unless `BFTFS_TEST_F` says otherwise).
//!
//! The scenario that once stopped a cluster for good: a file written in 1 MiB writes while
//! the primary is killed with SIGKILL. The log above the stable checkpoint then held dozens of
//! 1 MiB batches, view-change messages carried them all and outgrew the frame limit, and no
//! new view could ever be installed. Here the primary is killed twice in one run (the second
//! time the primary of the new view), the write must finish, the file must read back exactly,
//! and the mount must go on working.
//!
//! `BIG_WRITE_MIB` (default 96) sets the file size; the run recorded in
//! `benchmarks/RESULTS.md` uses 300:
//! `BIG_WRITE_MIB=300 cargo test --release -p fs-client --test big_writes -- --nocapture`.

mod common;

use common::*;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// The content of MiB `index` of the file: distinct per MiB and per position, so that a
/// lost, repeated or misplaced write shows.
fn chunk(index: u64) -> Vec<u8> {
    replica::rng::Rng::new(index).bytes(MIB)
}

/// `bftfs status --json` (null when it printed nothing readable, e.g. while stuck).
fn status_json(m: &Mounted) -> serde_json::Value {
    let out = bftfs(
        &["status".as_ref(), m.mnt.as_os_str(), "--json".as_ref()],
        &m.xdg,
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// (pid, view) of the replica that `bftfs status --json` names primary, if one does.
fn primary(m: &Mounted) -> Option<(i32, u64)> {
    status_json(m)["replicas"].as_array()?.iter().find_map(|r| {
        let s = &r["status"];
        (s["primary"].as_bool() == Some(true) && s["view_active"].as_bool() != Some(false))
            .then(|| Some((s["pid"].as_u64()? as i32, s["view"].as_u64()?)))
            .flatten()
    })
}

/// Views of the replicas that answer `bftfs status --json`.
fn views(m: &Mounted) -> Vec<u64> {
    status_json(m)["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["status"]["view"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// Replica log lines that say a message or record did not fit, for the failure message.
fn oversize_complaints(m: &Mounted) -> Vec<String> {
    let v = status_json(m);
    let data = std::path::PathBuf::from(v["data_dir"].as_str().unwrap_or("/nonexistent"));
    let mut found = Vec::new();
    for i in 0..16 {
        let log = std::fs::read_to_string(data.join(format!("replica-{i}.log")));
        for line in log.unwrap_or_default().lines() {
            if line.contains("exceeds the limit") || line.contains("too large") {
                found.push(format!("replica {i}: {line}"));
            }
        }
    }
    found
}

fn kill9(pid: i32) {
    send_signal(pid, Signal::SIGKILL);
}

#[test]
fn a_large_file_written_while_the_primary_is_killed_twice_is_intact() {
    if !fuse_available("a_large_file_written_while_the_primary_is_killed_twice_is_intact") {
        return;
    }
    let mib: u64 = env_or("BIG_WRITE_MIB", 96);
    let m = Mounted::new();
    let path = m.path("big");
    let written = Arc::new(AtomicU64::new(0));

    let writer = {
        let path = path.clone();
        let written = written.clone();
        std::thread::spawn(move || -> Result<Duration, String> {
            let started = Instant::now();
            let mut file = std::fs::File::create(&path).map_err(|e| format!("create: {e}"))?;
            for i in 0..mib {
                file.write_all(&chunk(i))
                    .map_err(|e| format!("write of MiB {i}: {e}"))?;
                written.store(i + 1, Ordering::SeqCst);
            }
            file.sync_all().map_err(|e| format!("fsync: {e}"))?;
            Ok(started.elapsed())
        })
    };

    // Kill the primary a third of the way in, and the next primary at two thirds, each time
    // with a log full of 1 MiB batches above the stable checkpoint.
    let mut killed = Vec::new();
    for fraction in [3, 3 * 2] {
        let at = mib * fraction / 9;
        let reached = wait_until(Duration::from_secs(300), || {
            written.load(Ordering::SeqCst) >= at || writer.is_finished()
        });
        assert!(reached, "the writer stalled before MiB {at}");
        if writer.is_finished() {
            break;
        }
        let Some((pid, view)) = primary(&m) else {
            panic!("no primary in an active view at MiB {at}: {:?}", views(&m));
        };
        eprintln!(
            "killing the primary (pid {pid}, view {view}) at MiB {}",
            written.load(Ordering::SeqCst)
        );
        kill9(pid);
        killed.push(view);
        // The next kill must hit the new view's primary, not the old one restarted.
        let moved = wait_until(Duration::from_secs(120), || {
            primary(&m).is_some_and(|(_, v)| v > view) || writer.is_finished()
        });
        assert!(
            moved,
            "no new view after killing the primary of view {view}: views {:?}; {:?}",
            views(&m),
            oversize_complaints(&m)
        );
    }
    let elapsed = match writer.join() {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => panic!(
            "{e} (after {} MiB); views {:?}; {:?}",
            written.load(Ordering::SeqCst),
            views(&m),
            oversize_complaints(&m)
        ),
        Err(_) => panic!("writer panicked"),
    };
    eprintln!(
        "wrote {mib} MiB in {elapsed:?} ({:.1} MB/s) across {} primary kills",
        (mib as f64 * MIB as f64) / 1e6 / elapsed.as_secs_f64(),
        killed.len()
    );
    assert!(!killed.is_empty(), "the write ended before any kill");
    assert!(
        oversize_complaints(&m).is_empty(),
        "{:?}",
        oversize_complaints(&m)
    );

    // Every byte reads back, through a fresh open.
    let mut file = std::fs::File::open(&path).expect("open");
    assert_eq!(
        file.metadata().expect("stat").len(),
        mib * MIB as u64,
        "size after the write"
    );
    let mut buf = vec![0u8; MIB];
    for i in 0..mib {
        file.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("read of MiB {i}: {e}"));
        assert!(buf == chunk(i), "MiB {i} differs from what was written");
    }

    // The mount goes on working: new files, listing, removal.
    std::fs::write(m.path("after"), b"still here").expect("write after");
    let names: Vec<String> = std::fs::read_dir(&m.mnt)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"after".into()) && names.contains(&"big".into()));
    std::fs::remove_file(&path).expect("remove big");
    assert_eq!(std::fs::read(m.path("after")).expect("read"), b"still here");

    // Every replica, the killed ones restarted by `bftfs up`, ends in one view.
    let n = 3 * test_f().parse::<usize>().unwrap_or(1) + 1;
    let converged = wait_until(Duration::from_secs(120), || {
        let v = views(&m);
        v.len() == n && v.iter().all(|x| *x == v[0])
    });
    assert!(
        converged,
        "replicas did not converge on one view: {:?}",
        views(&m)
    );
    m.down();
}
