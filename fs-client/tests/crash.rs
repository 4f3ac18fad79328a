//! Recovering from a crash of the client: a `bftfs mount` killed with SIGKILL leaves its mount
//! point "not connected", and the next `bftfs mount` there detaches it and mounts; with
//! `-o auto_unmount` the mount goes away by itself. (`bftfs up` after a crash:
//! `mount.rs::recovers_from_a_killed_client`.) Real mounts: skipped with a message without
//! FUSE, a failure when BFTFS_REQUIRE_FUSE=1.

mod common;

use common::{
    is_mounted, mount_detached, replicated_mounts_available, send_signal, wait_until, Mounted,
    Signal, Unmount,
};
use std::fs;
use std::time::Duration;

fn errno_of(r: std::io::Result<fs::Metadata>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn mount_again_after_the_mount_process_was_killed() {
    if !replicated_mounts_available("mount_again_after_the_mount_process_was_killed") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mnt, mnt2, xdg) = (
        tmp.path().join("mnt"),
        tmp.path().join("second"),
        tmp.path().join("xdg"),
    );
    fs::create_dir(&mnt).expect("mkdir");
    fs::create_dir(&mnt2).expect("mkdir");
    let data = tmp.path().join("data");
    let first = Mounted::at(&mnt, &xdg, Some(&data), &["--f", "1"]).expect("up");
    let config = data.join("cluster/cluster.json");

    let (_, pid) = mount_detached(&config, &mnt2, &xdg, &[]);
    let _cleanup = Unmount(mnt2.clone(), xdg.clone());
    fs::write(mnt2.join("before"), b"written before the crash").expect("write");
    assert!(send_signal(pid, Signal::SIGKILL));
    assert!(
        wait_until(Duration::from_secs(30), || errno_of(fs::metadata(&mnt2))
            == libc::ENOTCONN),
        "the killed mount's point answers ENOTCONN"
    );
    assert!(
        is_mounted(&mnt2),
        "the dead mount is still in the mount table"
    );

    // Mounting again detaches the dead mount, says so, and serves.
    let (said, pid) = mount_detached(&config, &mnt2, &xdg, &[]);
    assert!(
        said.contains("bftfs process that is gone") && said.contains("detached that mount"),
        "{said}"
    );
    assert_eq!(
        fs::read(mnt2.join("before")).expect("read"),
        b"written before the crash"
    );
    fs::write(mnt2.join("after"), b"and after").expect("write after the crash");
    assert_eq!(fs::read(first.path("after")).expect("read"), b"and after");
    assert!(send_signal(pid, Signal::SIGTERM));
    assert!(
        wait_until(Duration::from_secs(30), || !is_mounted(&mnt2)),
        "SIGTERM unmounts"
    );
    first.down();
}

#[test]
fn auto_unmount_leaves_no_dead_mount_behind() {
    if !replicated_mounts_available("auto_unmount_leaves_no_dead_mount_behind") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mnt, xdg) = (tmp.path().join("mnt"), tmp.path().join("xdg"));
    fs::create_dir(&mnt).expect("mkdir");
    let m = Mounted::at(&mnt, &xdg, None, &["--f", "1", "-o", "auto_unmount"]).expect("up");
    fs::write(m.path("f"), b"x").expect("write");
    let pid = m.server_pid().expect("pid file");
    assert!(send_signal(pid, Signal::SIGKILL));
    // fusermount3, left behind by the mount, unmounts once the killed process's end of the
    // FUSE connection is closed.
    assert!(
        wait_until(Duration::from_secs(30), || !is_mounted(&mnt)),
        "the mount of a killed bftfs went away by itself"
    );
    assert_eq!(errno_of(fs::metadata(&mnt)), 0, "the directory is usable");
    std::mem::forget(m);
    let m = Mounted::at(&mnt, &xdg, None, &["--f", "1"]).expect("up again");
    assert!(
        !m.up_output.contains("detached that mount"),
        "nothing left to detach: {}",
        m.up_output
    );
    assert_eq!(fs::read(m.path("f")).expect("read"), b"x");
    m.down();
}
