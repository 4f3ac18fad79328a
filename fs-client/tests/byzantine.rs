//! Byzantine replicas as real processes (`bftfs up --byzantine ID:MODE`, f=1, four replicas,
//! a real mount): for each mode on a backup (replica 2), and for `mute`, `slow`, `bad-auth`
//! and `equivocate` on the primary of view 0 (replica 0), a deterministic workload runs with
//! every read checked against an in-memory model, the final tree (names, kinds, sizes,
//! contents, modes) must equal the model — which `fault_free_run_matches_the_model` shows is
//! exactly what a fault-free cluster ends with — and `bftfs status` must name the replica that
//! misbehaves.
//!
//! The Byzantine modes need the cargo feature `byzantine`, which this crate's dev-dependency
//! on `replica` turns on for test builds only.
//!
//! `BFTFS_BYZ_ROUNDS` makes the workload longer (default 3 rounds).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Concurrent workers: each has its own directory, so its model is exact; together they
/// keep several requests in flight (batches, and a slow primary costs less wall time).
const WORKERS: usize = 4;
const FILES_PER_WORKER: usize = 6;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
}

/// Relative path → node, for the model and for what the mount holds.
type Tree = BTreeMap<String, Node>;

fn rounds() -> usize {
    env_or("BFTFS_BYZ_ROUNDS", 3)
}

/// Deterministic bytes for file `i` of worker `w` in round `r`.
fn content(w: usize, i: usize, r: usize, salt: usize) -> Vec<u8> {
    let line = format!("w{w} f{i} r{r} s{salt} ");
    line.repeat(1 + (w * 31 + i * 7 + r * 13 + salt) % 700)
        .into_bytes()
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut got = Vec::new();
    fs::File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .read_to_end(&mut got)
        .expect("read");
    got
}

/// One worker's part of the workload under `root/w<w>`; returns its model (paths relative to
/// the mount). Every read is checked against the model as it goes.
fn worker(mnt: &Path, w: usize, rounds: usize) -> Tree {
    let base = format!("w{w}");
    let mut model = Tree::new();
    fs::create_dir(mnt.join(&base)).expect("mkdir worker");
    fs::create_dir(mnt.join(&base).join("sub")).expect("mkdir sub");
    model.insert(base.clone(), Node::Dir { mode: 0o755 });
    model.insert(format!("{base}/sub"), Node::Dir { mode: 0o755 });
    // Where file i lives now (relative to the mount).
    let mut place: Vec<String> = (0..FILES_PER_WORKER)
        .map(|i| format!("{base}/f{i}"))
        .collect();
    for r in 0..rounds {
        for (i, place) in place.iter_mut().enumerate() {
            let path = mnt.join(&*place);
            let current = match model.get(&*place) {
                Some(Node::File { data, mode }) => Some((data.clone(), *mode)),
                _ => None,
            };
            let op = if current.is_none() {
                0
            } else {
                (r * 5 + i + w) % 6
            };
            let (data, mode) = current.clone().unwrap_or((Vec::new(), 0o644));
            let (new_data, new_mode) = match op {
                0 => {
                    let d = content(w, i, r, 0);
                    fs::write(&path, &d).expect("write");
                    (d, mode)
                }
                1 => {
                    // Overwrite in the middle, no truncation.
                    let patch = content(w, i, r, 1);
                    let patch = &patch[..patch.len().min(300)];
                    let at = data.len() / 3;
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .expect("open rw");
                    f.seek(SeekFrom::Start(at as u64)).expect("seek");
                    f.write_all(patch).expect("pwrite");
                    let mut d = data.clone();
                    if d.len() < at + patch.len() {
                        d.resize(at + patch.len(), 0);
                    }
                    d[at..at + patch.len()].copy_from_slice(patch);
                    (d, mode)
                }
                2 => {
                    // Truncate: shorter on even rounds, longer (a hole of zeros) on odd ones.
                    let len = if r % 2 == 0 {
                        data.len() / 2
                    } else {
                        data.len() + 4097
                    };
                    fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .expect("open")
                        .set_len(len as u64)
                        .expect("truncate");
                    let mut d = data.clone();
                    d.resize(len, 0);
                    (d, mode)
                }
                3 => {
                    // Write a new version aside and rename it over the file.
                    let tmp = mnt.join(format!("{base}/.tmp{i}"));
                    let d = content(w, i, r, 3);
                    fs::write(&tmp, &d).expect("write tmp");
                    fs::rename(&tmp, &path).expect("rename over");
                    (d, 0o644)
                }
                4 => {
                    let m = if r % 2 == 0 { 0o600 } else { 0o640 };
                    fs::set_permissions(&path, fs::Permissions::from_mode(m)).expect("chmod");
                    (data.clone(), m)
                }
                _ => {
                    let extra = content(w, i, r, 5);
                    fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .expect("open append")
                        .write_all(&extra)
                        .expect("append");
                    let mut d = data.clone();
                    d.extend_from_slice(&extra);
                    (d, mode)
                }
            };
            model.insert(
                place.clone(),
                Node::File {
                    mode: new_mode,
                    data: new_data,
                },
            );
            // Every few operations a file moves between the worker's directory and sub/.
            if (r + i) % 4 == 3 {
                let to = if place.contains("/sub/") {
                    format!("{base}/f{i}")
                } else {
                    format!("{base}/sub/f{i}")
                };
                fs::rename(mnt.join(&*place), mnt.join(&to)).expect("rename");
                let node = model.remove(&*place).expect("model");
                model.insert(to.clone(), node);
                *place = to;
            }
        }
        // Read back everything this worker owns and list its directories.
        for (rel, node) in &model {
            match node {
                Node::File { data, .. } => {
                    let got = read_all(&mnt.join(rel));
                    assert!(
                        got == *data,
                        "{rel} after round {r}: {} bytes, want {}",
                        got.len(),
                        data.len()
                    );
                }
                Node::Dir { .. } => {
                    let mut names: Vec<String> = fs::read_dir(mnt.join(rel))
                        .expect("readdir")
                        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    let mut want: Vec<String> = model
                        .keys()
                        .filter_map(|k| {
                            k.strip_prefix(&format!("{rel}/"))
                                .filter(|rest| !rest.contains('/'))
                                .map(str::to_string)
                        })
                        .collect();
                    want.sort();
                    assert_eq!(names, want, "listing of {rel} after round {r}");
                }
            }
        }
    }
    model
}

/// The whole workload: the workers in parallel, then the model of everything.
fn workload(mnt: &Path) -> Tree {
    let rounds = rounds();
    let models: Vec<Tree> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|w| s.spawn(move || worker(mnt, w, rounds)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    models.into_iter().flatten().collect()
}

/// `count` ordered operations one after another (a chmod back and forth): enough batches to
/// cross at least one checkpoint (every 64 batches) after the workload.
fn push_checkpoints(mnt: &Path, model: &mut Tree, count: usize) {
    let path = mnt.join("pulse");
    // Written once: rewriting it would also heal a corrupted copy behind the scrub's back.
    if !path.exists() {
        fs::write(&path, b"pulse").expect("write pulse");
    }
    for k in 0..count {
        let m = if k % 2 == 0 { 0o600 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(m)).expect("chmod pulse");
    }
    let mode = if count % 2 == 1 { 0o600 } else { 0o644 };
    let mode = if count == 0 { 0o644 } else { mode };
    model.insert(
        "pulse".into(),
        Node::File {
            mode,
            data: b"pulse".to_vec(),
        },
    );
}

/// What the mount holds now.
fn snapshot(mnt: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(mnt.join(&rel)).expect("readdir") {
            let e = e.expect("entry");
            let child = rel.join(e.file_name());
            let meta = fs::symlink_metadata(mnt.join(&child)).expect("stat");
            let key = child.to_string_lossy().into_owned();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                tree.insert(key, Node::Dir { mode });
                stack.push(child);
            } else {
                let data = read_all(&mnt.join(&child));
                assert_eq!(
                    data.len() as u64,
                    meta.len(),
                    "{key}: size and content length differ"
                );
                tree.insert(key, Node::File { mode, data });
            }
        }
    }
    tree
}

fn compare(label: &str, got: &Tree, want: &Tree) {
    let only_got: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let only_want: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        only_got.is_empty() && only_want.is_empty(),
        "{label}: extra {only_got:?}, missing {only_want:?}"
    );
    for (k, w) in want {
        let g = &got[k];
        if g != w {
            let describe = |n: &Node| match n {
                Node::Dir { mode } => format!("dir {mode:o}"),
                Node::File { mode, data } => format!("file {mode:o}, {} bytes", data.len()),
            };
            panic!("{label}: {k} is {}, want {}", describe(g), describe(w));
        }
    }
}

fn status_json(m: &Mounted) -> serde_json::Value {
    let (_, out) = status(m, true);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

fn status_text(m: &Mounted) -> String {
    status(m, false).1
}

/// The reasons `bftfs status --json` gives for suspecting replica `id`.
fn suspicions(status: &serde_json::Value, id: u64) -> Vec<String> {
    status["suspects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["id"].as_u64() == Some(id))
        .flat_map(|s| {
            s["why"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w.as_str().map(str::to_string))
        })
        .collect()
}

fn replica_status(status: &serde_json::Value, id: u64) -> serde_json::Value {
    status["replicas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"].as_u64() == Some(id)))
        .map(|r| r["status"].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// Mounts a fresh cluster with `byzantine` (e.g. "2:lie"), runs the workload, checks the tree
/// against the model, then waits until `bftfs status` names `suspect` for a reason containing
/// `because`. Returns the mount for further checks.
fn run(
    test: &str,
    byzantine: Option<&str>,
    push: usize,
    suspect: Option<(u64, &str)>,
) -> Option<(Mounted, tempfile::TempDir)> {
    if !fuse_available(test) {
        return None;
    }
    if test_f() != "1" {
        eprintln!("SKIPPED {test}: needs f=1 (BFTFS_TEST_F={})", test_f());
        return None;
    }
    let mut extra = vec!["-o", "attr_timeout=0,entry_timeout=0"];
    if let Some(b) = byzantine {
        extra.extend(["--byzantine", b]);
    }
    let (tmp, [mnt, xdg]) = scratch(["mnt", "xdg"]);
    fs::create_dir(&mnt).expect("mkdir mnt");
    let m = match Mounted::at(&mnt, &xdg, None, &extra) {
        Ok(m) => m,
        Err(e) if e.to_string().contains("built without Byzantine modes") => panic!(
            "{test}: the bftfs-replica next to bftfs lacks the `byzantine` feature. \
             `cargo test --workspace` builds it with the feature; when running this test \
             binary alone, run `cargo build -p replica --features byzantine` first \
             (`cargo test -p replica` rebuilds it without). bftfs up said: {e}"
        ),
        Err(e) => panic!("{test}: bftfs up: {e}"),
    };
    let started = Instant::now();
    let mut model = workload(&mnt);
    push_checkpoints(&mnt, &mut model, push);
    let worked = started.elapsed();
    compare(test, &snapshot(&mnt), &model);
    let suspected = Instant::now();
    if let Some((id, because)) = suspect {
        let mut last = serde_json::Value::Null;
        let named = wait_until(Duration::from_secs(30), || {
            last = status_json(&m);
            suspicions(&last, id).iter().any(|w| w.contains(because))
        });
        assert!(
            named,
            "{test}: status does not name replica {id} for `{because}`:\n{}\n{last:#}",
            status_text(&m)
        );
        let shown = status_text(&m);
        assert!(
            shown.contains(&format!("replica {id}: ")),
            "{test}: no suspects line for replica {id}:\n{shown}"
        );
        eprintln!(
            "{test}: status says:\n{}",
            shown
                .lines()
                .filter(|l| l.starts_with("suspects") || l.starts_with("    "))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    eprintln!(
        "{test}: workload {worked:?}, named in status after {:?}",
        suspected.elapsed()
    );
    Some((m, tmp))
}

/// Tests that run one Byzantine mode and check only that status names the faulty replica
/// (see [`run`]): `name: --byzantine argument, checkpoints to push, (replica, words of the
/// suspicion)`. The test's name is what `run` prints.
macro_rules! named_in_status {
    ($($name:ident: $mode:literal, $push:literal, ($who:literal, $why:literal);)*) => {$(
        #[test]
        fn $name() {
            if let Some((m, _tmp)) = run(stringify!($name), Some($mode), $push, Some(($who, $why))) {
                m.down();
            }
        }
    )*};
}

named_in_status! {
    mute_backup: "2:mute", 0, (2, "never heard from");
    slow_backup: "2:slow:400", 0, (2, "after the others'");
    slow_primary: "0:slow:200", 0, (0, "after the others'");
    lying_backup: "2:lie", 0, (2, "disagreed with the agreed result");
    equivocating_backup: "2:equivocate", 0, (2, "votes for another batch");
    bad_auth_backup: "2:bad-auth", 0, (2, "bad authenticators");
    bad_auth_primary: "0:bad-auth", 0, (0, "bad authenticators");
    wrong_checkpoint_backup: "2:wrong-checkpoint", 140, (2, "checkpoints disagreeing with the stable certificate");
}

#[test]
fn fault_free_run_matches_the_model() {
    let Some((m, _tmp)) = run("fault_free_run_matches_the_model", None, 70, None) else {
        return;
    };
    let status = status_json(&m);
    assert!(
        status["suspects"].as_array().is_some_and(|s| s.is_empty()),
        "a fault-free cluster has suspects: {status:#}"
    );
    m.down();
}

#[test]
fn mute_primary() {
    let Some((m, _tmp)) = run(
        "mute_primary",
        Some("0:mute"),
        0,
        Some((0, "never heard from")),
    ) else {
        return;
    };
    let status = status_json(&m);
    assert!(
        replica_status(&status, 1)["view"].as_u64().unwrap_or(0) >= 1,
        "no view change away from a mute primary: {status:#}"
    );
    m.down();
}

#[test]
fn equivocating_primary() {
    let suspect = Some((0, "proofs of equivocation"));
    let Some((m, _tmp)) = run("equivocating_primary", Some("0:equivocate"), 0, suspect) else {
        return;
    };
    // The backups that voted for what the primary sent them are not blamed for it.
    let status = status_json(&m);
    for backup in 1..4 {
        let blamed = suspicions(&status, backup);
        assert!(
            !blamed.iter().any(|w| w.contains("votes for another batch")),
            "backup {backup} blamed: {blamed:?}"
        );
    }
    m.down();
}

#[test]
fn byzantine_flag_is_checked() {
    // Parsing happens before anything starts, so this needs no FUSE.
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    for (arg, why) in [
        ("9:lie", "no replica 9"),
        ("2:loud", "unknown Byzantine mode"),
        ("lie", "ID:MODE"),
    ] {
        let out = bftfs(
            &[
                "up".as_ref(),
                mnt.as_os_str(),
                "--byzantine".as_ref(),
                arg.as_ref(),
            ],
            &tmp.path().join("xdg"),
        );
        assert!(!out.status.success(), "--byzantine {arg} accepted");
        assert!(
            text(&out).contains(why),
            "--byzantine {arg}: {}",
            text(&out)
        );
    }
}

fn count_in_log(m: &Mounted, replica: u32, needle: &str) -> usize {
    let log = fs::read_to_string(data_dir_of(m).join(format!("replica-{replica}.log")))
        .unwrap_or_default();
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn corrupt_state_is_found_and_repaired() {
    let test = "corrupt_state_is_found_and_repaired";
    // Two flipped bytes, two seconds apart, in replica 2's stored files.
    let Some((m, _tmp)) = run(test, Some("2:corrupt-state:2:2"), 0, None) else {
        return;
    };
    let mnt = m.mnt.clone();
    let mut model = snapshot(&mnt);
    let started = Instant::now();
    // Keep checkpoints coming until the damage was done, found and repaired.
    let mut last = serde_json::Value::Null;
    let repaired = wait_until(Duration::from_secs(90), || {
        push_checkpoints(&mnt, &mut model, 70);
        last = status_json(&m);
        let done = count_in_log(&m, 2, "corrupted a stored file on purpose");
        let found = count_in_log(&m, 2, "does not match its digest");
        let transfers = replica_status(&last, 2)["state_transfers"]
            .as_u64()
            .unwrap_or(0);
        done >= 2
            && found >= 1
            && transfers >= 1
            && !replica_status(&last, 2)["transferring_state"]
                .as_bool()
                .unwrap_or(true)
    });
    assert!(
        repaired,
        "{test}: corruption not found and repaired: {} corruptions done, {} found:\n{last:#}",
        count_in_log(&m, 2, "corrupted a stored file on purpose"),
        count_in_log(&m, 2, "does not match its digest")
    );
    eprintln!("{test}: found and repaired after {:?}", started.elapsed());
    // After the repair its checkpoints agree with the others' again.
    let agree = wait_until(Duration::from_secs(60), || {
        push_checkpoints(&mnt, &mut model, 70);
        last = status_json(&m);
        let cps: Vec<(u64, String)> = (0..4)
            .map(|i| {
                let s = replica_status(&last, i);
                (
                    s["last_checkpoint"].as_u64().unwrap_or(0),
                    s["last_checkpoint_root"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        cps.iter().all(|c| c == &cps[0]) && cps[0].0 > 0
    });
    assert!(
        agree,
        "{test}: checkpoints of replica 2 do not agree with the others after the repair:\n{last:#}"
    );
    let suspects = suspicions(&last, 2);
    assert!(
        suspects
            .iter()
            .any(|w| w.contains("checkpoints disagreeing with the stable certificate")),
        "{test}: status does not show replica 2's wrong checkpoint: {suspects:?}"
    );
    eprintln!("{test}: status says replica 2: {suspects:?}");
    compare(test, &snapshot(&mnt), &model);
    m.down();
}
