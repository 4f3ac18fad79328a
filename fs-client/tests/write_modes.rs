//! The two write modes on real mounts of a replicated cluster (f=1), each test run in both:
//! write-back (the default, `-o async`) and `-o sync`. What the README's "What a write
//! guarantees" promises:
//!
//! - close-to-open between two mounts: an open after another client's close sees every byte
//!   and the size (overwrite, truncation, append, a write past a hole, many small writes),
//!   even with the file still open on the reading side and long cache timeouts;
//! - a file closed, or fsync'ed, survives SIGKILL of the mount process; with `-o sync` so does
//!   a file only written; in the default mode such a file may have lost bytes, never gained
//!   any;
//! - a buffered write the replicas refuse (permission taken away after open) fails the close
//!   or fsync that follows, and leaves the file as it was, on both mounts;
//! - sizes seen on the writing mount while bytes are still buffered are those written.
//!
//! Skipped with a message without root and /dev/fuse (a failure when BFTFS_REQUIRE_FUSE=1).

mod common;

use common::*;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const MODES: [&str; 2] = ["async", "sync"];

/// A cluster mounted (by `up`) at `<tmp>/a` and a second client (`bftfs mount`) at
/// `<tmp>/b`, both with `options`.
struct Pair {
    first: Option<Mounted>,
    second: Option<Unmount>,
    second_pid: i32,
    a: PathBuf,
    b: PathBuf,
    xdg: PathBuf,
    config: PathBuf,
    options: String,
    _tmp: tempfile::TempDir,
}

impl Pair {
    fn new(options: &str) -> Pair {
        let (tmp, [a, b, xdg, data]) = scratch(["a", "b", "xdg", "data"]);
        fs::create_dir(&a).expect("mkdir");
        fs::create_dir(&b).expect("mkdir");
        let first = Mounted::at(&a, &xdg, Some(&data), &["--f", "1", "-o", options]).expect("up");
        let config = data.join("cluster/cluster.json");
        let (second, second_pid) = mount_second(&config, &b, &xdg, options);
        Pair {
            first: Some(first),
            second: Some(second),
            second_pid,
            a,
            b,
            xdg,
            config,
            options: options.to_string(),
            _tmp: tmp,
        }
    }

    /// Mounts the second client again (after it was killed).
    fn remount_second(&mut self) -> String {
        // The killed mount's guard would unmount the new one: mounting again detaches the
        // dead mount anyway.
        std::mem::forget(self.second.take());
        let (guard, pid, said) = mount_second_said(&self.config, &self.b, &self.xdg, &self.options);
        self.second = Some(guard);
        self.second_pid = pid;
        said
    }

    fn down(mut self) {
        drop(self.second.take());
        if let Some(m) = self.first.take() {
            m.down();
        }
    }
}

fn mount_second(config: &Path, mnt: &Path, xdg: &Path, options: &str) -> (Unmount, i32) {
    let (guard, pid, _) = mount_second_said(config, mnt, xdg, options);
    (guard, pid)
}

/// `bftfs mount CONFIG MNT --detach -o OPTIONS`: an unmount guard, the serving process's
/// pid (which it prints) and what it said.
fn mount_second_said(
    config: &Path,
    mnt: &Path,
    xdg: &Path,
    options: &str,
) -> (Unmount, i32, String) {
    let (said, pid) = mount_detached(config, mnt, xdg, &[options]);
    (Unmount(mnt.to_path_buf(), xdg.to_path_buf()), pid, said)
}

/// Bytes that are never zero, different for each `seed`, so a hole or a misplaced piece
/// shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| 1 + ((i / 7 + i * 13 + seed as usize * 31) % 251) as u8)
        .collect()
}

/// Opens `path` afresh and returns (size by fstat, contents).
fn open_and_read(path: &Path) -> (u64, Vec<u8>) {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let size = f.metadata().expect("fstat").len();
    let mut data = Vec::new();
    f.read_to_end(&mut data).expect("read");
    (size, data)
}

fn assert_sees(path: &Path, want: &[u8], what: &str) {
    let (size, data) = open_and_read(path);
    assert_eq!(size, want.len() as u64, "{what}: size after open");
    assert!(
        data == want,
        "{what}: contents after open: {} bytes, want {} (first difference at {:?})",
        data.len(),
        want.len(),
        data.iter().zip(want).position(|(x, y)| x != y)
    );
}

fn close_to_open(mode: &str) {
    // Far longer than the test: whatever the second mount sees fresh, its kernel did not
    // time out.
    let pair = Pair::new(&format!("{mode},attr_timeout=600,entry_timeout=600"));
    let (a, b) = (&pair.a, &pair.b);
    let names = [
        "overwrite",
        "shrink",
        "append",
        "hole",
        "small-writes",
        "truncate-and-rewrite",
    ];
    for (k, name) in names.iter().enumerate() {
        fs::write(a.join(name), pattern(10_000, k as u8)).expect("write through a");
    }
    // The reader caches every file: attributes, pages, and an open descriptor on half of
    // them (with writeback_cache in the kernel, a file held open never took another size).
    let mut held = Vec::new();
    for (k, name) in names.iter().enumerate() {
        assert_sees(&b.join(name), &pattern(10_000, k as u8), "before");
        if k % 2 == 0 {
            held.push(fs::File::open(b.join(name)).expect("hold open"));
        }
    }

    let mut want = Vec::new();
    // Overwritten in place, same size.
    let new = pattern(10_000, 100);
    fs::OpenOptions::new()
        .write(true)
        .open(a.join("overwrite"))
        .and_then(|mut f| f.write_all(&new))
        .expect("overwrite");
    want.push(new);
    // Truncated to a few bytes.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(a.join("shrink"))
        .expect("open");
    f.set_len(3).expect("truncate");
    drop(f);
    want.push(pattern(10_000, 1)[..3].to_vec());
    // Appended to.
    let tail = pattern(5_000, 101);
    fs::OpenOptions::new()
        .append(true)
        .open(a.join("append"))
        .and_then(|mut f| f.write_all(&tail))
        .expect("append");
    want.push([pattern(10_000, 2), tail].concat());
    // Written far past the end: the gap reads as zeros.
    let far = 3 * 1024 * 1024 + 17;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(a.join("hole"))
        .expect("open");
    f.write_all_at(b"tail", far).expect("write past a hole");
    drop(f);
    let mut hole = pattern(10_000, 3);
    hole.resize(far as usize, 0);
    hole.extend_from_slice(b"tail");
    want.push(hole);
    // Rewritten in 2,000 small writes (one request each with -o sync, merged without).
    let many = pattern(2_000_000, 102);
    let mut f = fs::File::create(a.join("small-writes")).expect("create");
    for piece in many.chunks(1000) {
        f.write_all(piece).expect("small write");
    }
    drop(f);
    want.push(many);
    // Truncated to nothing, then written again.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(a.join("truncate-and-rewrite"))
        .expect("open");
    f.set_len(0).expect("truncate");
    f.write_all(b"again").expect("write");
    drop(f);
    want.push(b"again".to_vec());

    for (name, want) in names.iter().zip(&want) {
        assert_sees(
            &b.join(name),
            want,
            &format!("{mode}: {name} on the second mount"),
        );
        assert_sees(
            &a.join(name),
            want,
            &format!("{mode}: {name} on the writing mount"),
        );
    }
    // And the other way round, through the names the first mount cached.
    fs::write(b.join("overwrite"), b"from b").expect("write through b");
    assert_sees(&a.join("overwrite"), b"from b", "written back through b");
    drop(held);
    pair.down();
}

#[test]
fn close_to_open_between_two_mounts_in_both_modes() {
    if !replicated_mounts_available("close_to_open_between_two_mounts_in_both_modes") {
        return;
    }
    for mode in MODES {
        close_to_open(mode);
    }
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

fn kill_of_the_mount(mode: &str) {
    let mut pair = Pair::new(mode);
    let b = pair.b.clone();
    let closed = pattern(3 * 1024 * 1024 + 333, 7);
    let mut f = fs::File::create(b.join("closed")).expect("create");
    for piece in closed.chunks(4096) {
        f.write_all(piece).expect("write");
    }
    drop(f);
    let synced = pattern(1024 * 1024 + 5, 8);
    let mut kept_synced = fs::File::create(b.join("synced")).expect("create");
    for piece in synced.chunks(4096) {
        kept_synced.write_all(piece).expect("write");
    }
    kept_synced.sync_all().expect("fsync");
    let written = pattern(200_000, 9);
    let mut kept_written = fs::File::create(b.join("written")).expect("create");
    for piece in written.chunks(4096) {
        kept_written.write_all(piece).expect("write");
    }

    assert!(send_signal(pair.second_pid, Signal::SIGKILL));
    assert!(
        wait_until(Duration::from_secs(30), || errno_of(fs::metadata(&b))
            == libc::ENOTCONN),
        "the killed mount answers ENOTCONN"
    );
    drop(kept_synced);
    drop(kept_written);
    let said = pair.remount_second();
    assert!(said.contains("detached that mount"), "{said}");

    assert_sees(
        &b.join("closed"),
        &closed,
        &format!("{mode}: closed before the kill"),
    );
    assert_sees(
        &b.join("synced"),
        &synced,
        &format!("{mode}: fsync'ed before the kill"),
    );
    if mode == "sync" {
        assert_sees(
            &b.join("written"),
            &written,
            "sync: written before the kill",
        );
    } else {
        // Creating it was synchronous; of its bytes, any piece may be missing (a hole or a
        // shorter file), and none may be wrong.
        let (size, got) = open_and_read(&b.join("written"));
        assert!(size <= written.len() as u64, "grew: {size}");
        let wrong = got
            .iter()
            .zip(&written)
            .position(|(g, w)| *g != 0 && g != w);
        assert_eq!(wrong, None, "a byte no one wrote");
        eprintln!(
            "async: {size} of {} unsynced bytes survived the kill",
            written.len()
        );
    }
    pair.down();
}

#[test]
fn what_a_kill_of_the_mount_process_keeps_in_both_modes() {
    if !replicated_mounts_available("what_a_kill_of_the_mount_process_keeps_in_both_modes") {
        return;
    }
    for mode in MODES {
        kill_of_the_mount(mode);
    }
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
        })
        .unwrap_or(false)
}

const USER: &str = "1002";

/// `dd` run as an ordinary user with stdin from the test: writes `data` to `path` (opened
/// before the test takes write permission away), then `fsync` if asked. Its exit status
/// and what it said.
fn refused_write(pair: &Pair, path: &Path, data: &[u8], conv: &str) -> (bool, String) {
    let mut child = Command::new("setpriv")
        .args([
            format!("--reuid={USER}"),
            format!("--regid={USER}"),
            "--clear-groups".into(),
            "dd".into(),
            format!("of={}", path.display()),
            "bs=64k".into(),
            format!("conv={conv}"),
            "status=none".into(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start setpriv dd");
    assert!(
        wait_until(Duration::from_secs(10), || has_open(child.id(), path)),
        "dd did not open {}",
        path.display()
    );
    // The owner (root here, through the other mount) takes write permission away.
    fs::set_permissions(
        pair.a.join(path.file_name().expect("name")),
        fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(data).expect("feed dd");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for dd");
    (out.status.success(), text(&out))
}

#[test]
fn a_write_the_replicas_refuse_is_reported_and_leaves_the_file_as_it_was() {
    if !replicated_mounts_available(
        "a_write_the_replicas_refuse_is_reported_and_leaves_the_file_as_it_was",
    ) {
        return;
    }
    for mode in MODES {
        let pair = Pair::new(mode);
        // conv=notrunc: the close reports it; conv=notrunc,fsync: the fsync does.
        for (name, conv) in [("at-close", "notrunc"), ("at-fsync", "notrunc,fsync")] {
            fs::write(pair.a.join(name), b"original").expect("create");
            fs::set_permissions(pair.a.join(name), fs::Permissions::from_mode(0o666))
                .expect("chmod 666");
            // Through the second mount, which caches what it writes.
            let path = pair.b.join(name);
            let (ok, said) = refused_write(&pair, &path, b"refused bytes, longer", conv);
            assert!(!ok, "{mode} {name}: dd succeeded: {said}");
            assert!(
                said.contains("Permission denied") || said.contains("Input/output error"),
                "{mode} {name}: {said}"
            );
            if mode == "async" {
                // The write itself was accepted into the buffer; the report came later.
                let step = if conv.contains("fsync") {
                    "fsync"
                } else {
                    "clos"
                };
                assert!(
                    said.contains(step),
                    "{mode} {name}: reported by {step}: {said}"
                );
            }
            assert_sees(
                &pair.a.join(name),
                b"original",
                &format!("{mode} {name}: first mount"),
            );
            assert_sees(
                &path,
                b"original",
                &format!("{mode} {name}: the writer's mount"),
            );
        }
        pair.down();
    }
}

/// Partial pages of a file its owner may write but not read: the kernel never needs to
/// read them (FUSE write-through), in either mode.
#[test]
fn unaligned_writes_to_a_write_only_file() {
    if !replicated_mounts_available("unaligned_writes_to_a_write_only_file") {
        return;
    }
    for mode in MODES {
        let pair = Pair::new(mode);
        let dir = pair.b.join("wo");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod dir");
        let file = dir.join("f");
        let script = format!(
            "umask 077 && printf 0123456789 > {f} && chmod 200 {f} && \
             printf XY | dd of={f} bs=1 seek=3 conv=notrunc status=none && \
             printf Z | dd of={f} bs=1 seek=5000 conv=notrunc status=none",
            f = file.display()
        );
        let out = Command::new("setpriv")
            .args([
                format!("--reuid={USER}"),
                format!("--regid={USER}"),
                "--clear-groups".into(),
                "sh".into(),
                "-c".into(),
                script,
            ])
            .output()
            .expect("setpriv sh");
        assert!(out.status.success(), "{mode}: {}", text(&out));
        let mut want = b"012XY56789".to_vec();
        want.resize(5000, 0);
        want.push(b'Z');
        assert_sees(
            &pair.a.join("wo/f"),
            &want,
            &format!("{mode}: write-only file"),
        );
        pair.down();
    }
}

#[test]
fn sizes_on_the_writing_mount_follow_buffered_writes() {
    if !replicated_mounts_available("sizes_on_the_writing_mount_follow_buffered_writes") {
        return;
    }
    for mode in MODES {
        let pair = Pair::new(mode);
        let path = pair.b.join("growing");
        let mut f = fs::File::create(&path).expect("create");
        let created = f.metadata().expect("fstat").modified().expect("mtime");
        // The agreed clock ticks in nanoseconds, but a write in the same tick would not move it.
        std::thread::sleep(Duration::from_millis(20));
        let mut want = Vec::new();
        for k in 0..3u8 {
            let piece = pattern(100_000, k);
            f.write_all(&piece).expect("write");
            want.extend_from_slice(&piece);
            assert_eq!(
                f.metadata().expect("fstat").len(),
                want.len() as u64,
                "{mode}: fstat"
            );
            assert_eq!(
                fs::metadata(&path).expect("stat").len(),
                want.len() as u64,
                "{mode}: stat"
            );
        }
        // Another descriptor appending, and a seek to the end, go by the same size.
        let mut g = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        g.write_all(b"appended").expect("append");
        want.extend_from_slice(b"appended");
        assert_eq!(
            f.seek(SeekFrom::End(0)).expect("seek"),
            want.len() as u64,
            "{mode}"
        );
        // Read back through the writer's own mount before anything was closed.
        let mut back = Vec::new();
        fs::File::open(&path)
            .and_then(|mut r| r.read_to_end(&mut back))
            .expect("read back");
        assert!(
            back == want,
            "{mode}: read back {} bytes of {}",
            back.len(),
            want.len()
        );
        drop((f, g));
        assert_sees(
            &pair.a.join("growing"),
            &want,
            &format!("{mode}: other mount"),
        );
        // mtime moved with the writes, and both mounts show the replicas' one.
        let here = fs::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime");
        let there = fs::metadata(pair.a.join("growing"))
            .expect("stat")
            .modified()
            .expect("mtime");
        assert!(
            here > created,
            "{mode}: mtime {here:?} not after creation {created:?}"
        );
        assert_eq!(here, there, "{mode}: mtime differs between the mounts");
        pair.down();
    }
}
