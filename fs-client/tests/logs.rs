//! Log files are plain text (no terminal escape codes), and `-v`, `-q` and `--log-file` decide
//! how much is logged and where, for `bftfs` in the foreground, for the background process of
//! `--detach`, and for the replicas `bftfs up` starts. Real mounts: skipped with a message
//! without FUSE (a failure when BFTFS_REQUIRE_FUSE=1).

mod common;

use common::{
    fuse_available, is_mounted, replicated_mounts_available, send_signal, wait_until, Mounted,
    Signal,
};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The line `bftfs` logs (at info) once the kernel has accepted the mount.
const MOUNTED_LINE: &str = "FUSE threads)";

/// Runs `bftfs FLAGS up MNT --f 0` in the foreground with stderr into `stderr_file`, waits
/// until it has mounted, and stops it with Ctrl-C (SIGINT).
fn foreground_up(flags: &[&std::ffi::OsStr], mnt: &Path, xdg: &Path, stderr_file: &Path) {
    let mut child = Command::new(common::BFTFS)
        .args(flags)
        .args(["up".as_ref(), mnt.as_os_str(), "--f".as_ref(), "0".as_ref()])
        .env("XDG_DATA_HOME", xdg)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(fs::File::create(stderr_file).expect("stderr file"))
        .spawn()
        .expect("start bftfs up");
    let mounted = wait_until(Duration::from_secs(30), || is_mounted(mnt));
    assert!(send_signal(
        i32::try_from(child.id()).expect("pid"),
        Signal::SIGINT
    ));
    let status = child.wait().expect("wait");
    assert!(mounted, "bftfs up did not mount");
    assert!(status.success(), "{status}");
}

#[test]
fn foreground_log_file_and_quiet() {
    if !fuse_available("foreground_log_file_and_quiet") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mnt, xdg) = (tmp.path().join("mnt"), tmp.path().join("xdg"));
    fs::create_dir(&mnt).expect("mkdir");
    let log = tmp.path().join("bftfs.log");
    let stderr = tmp.path().join("stderr");

    foreground_up(
        &["--log-file".as_ref(), log.as_os_str()],
        &mnt,
        &xdg,
        &stderr,
    );
    let logged = fs::read_to_string(&log).expect("the log file exists");
    assert!(logged.contains(MOUNTED_LINE), "{logged}");
    assert!(!logged.contains('\x1b'), "plain text: {logged:?}");
    let said = fs::read_to_string(&stderr).expect("stderr");
    assert!(
        !said.contains(MOUNTED_LINE),
        "the log went to the file only: {said}"
    );

    // A second run appends.
    foreground_up(
        &["--log-file".as_ref(), log.as_os_str()],
        &mnt,
        &xdg,
        &stderr,
    );
    let again = fs::read_to_string(&log).expect("log");
    assert_eq!(again.matches(MOUNTED_LINE).count(), 2, "{again}");

    // -q: warnings and errors only.
    foreground_up(&["-q".as_ref()], &mnt, &xdg, &stderr);
    let said = fs::read_to_string(&stderr).expect("stderr");
    assert!(!said.contains(MOUNTED_LINE), "-q: {said}");
    // -v on stderr, which is a file here: plain text too.
    foreground_up(&["-v".as_ref()], &mnt, &xdg, &stderr);
    let said = fs::read_to_string(&stderr).expect("stderr");
    assert!(
        said.contains(MOUNTED_LINE) && !said.contains('\x1b'),
        "{said:?}"
    );
}

#[test]
fn detached_up_and_its_replicas_write_plain_logs() {
    if !replicated_mounts_available("detached_up_and_its_replicas_write_plain_logs") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mnt, xdg, data) = (
        tmp.path().join("mnt"),
        tmp.path().join("xdg"),
        tmp.path().join("data"),
    );
    fs::create_dir(&mnt).expect("mkdir");
    let log = tmp.path().join("up.log");
    let log_arg = log.to_str().expect("utf-8 temp path");
    let m = Mounted::at(
        &mnt,
        &xdg,
        Some(&data),
        &["--f", "1", "-v", "--log-file", log_arg],
    )
    .expect("up");
    fs::write(m.path("f"), b"x").expect("write");
    // The background process of --detach logs where the command said, as much as it said
    // (-v beats the tests' RUST_LOG=warn).
    let logged = fs::read_to_string(&log).expect("the background process's log");
    assert!(logged.contains(MOUNTED_LINE), "{logged}");
    m.down();
    for i in 0..4 {
        let name = format!("replica-{i}.log");
        let text = fs::read_to_string(data.join(&name)).expect("replica log");
        assert!(text.contains("replica started"), "{name}: {text}");
        assert!(!text.contains('\x1b'), "{name} has escape codes: {text:?}");
    }
    let text = fs::read_to_string(&log).expect("log");
    assert!(!text.contains('\x1b'), "{text:?}");
}
