//! `mount -t bftfs` and fstab: `bftfs install-helper` links /sbin/mount.bftfs to bftfs, and
//! mount(8) mounts a cluster started by the test, with the options mount(8) and fstab add.
//! Real mounts as root: skipped with a message without FUSE (a failure when
//! BFTFS_REQUIRE_FUSE=1).

mod common;

use common::{is_mounted, replicated_mounts_available, text, wait_until, Helper, Mounted};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Unmounts lazily when dropped, even if the test panicked.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Runs mount(8) or umount(8) as a user would (without the tests' RUST_LOG, which mount(8)
/// would pass on to the helper).
/// `mount -t bftfs CONFIG MNT -o OPTIONS`.
fn mount_t(config: &Path, mnt: &Path, options: &str) -> Output {
    run(
        "mount",
        &[
            "-t".as_ref(),
            "bftfs".as_ref(),
            config.as_os_str(),
            mnt.as_os_str(),
            "-o".as_ref(),
            options.as_ref(),
        ],
    )
}

fn run(program: &str, args: &[&OsStr]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// The mount options /proc/self/mountinfo shows for `mnt`.
fn options_of(mnt: &Path) -> String {
    let want = mnt.canonicalize().expect("mount point");
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find(|l| l.split(' ').nth(4).is_some_and(|p| Path::new(p) == want))
        .and_then(|l| l.split(' ').nth(5))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn mount_t_bftfs_and_an_fstab_line() {
    if !replicated_mounts_available("mount_t_bftfs_and_an_fstab_line") {
        return;
    }
    if !common::mount_8_available("mount_t_bftfs_and_an_fstab_line") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mnt, other, xdg, data) = (
        tmp.path().join("up"),
        tmp.path().join("x"),
        tmp.path().join("xdg"),
        tmp.path().join("data"),
    );
    fs::create_dir(&mnt).expect("mkdir");
    fs::create_dir(&other).expect("mkdir");
    let first = Mounted::at(&mnt, &xdg, Some(&data), &["--f", "1"]).expect("up");
    let config = data.join("cluster/cluster.json");
    let client = data.join("cluster/client-3.json");
    let _helper = Helper::install(&xdg);
    let _cleanup = Unmount(other.clone());

    // mount -t bftfs CLUSTER.json DIR -o client=...,<what fstab users write>
    let log = tmp.path().join("mount.log");
    let opts = format!(
        "client={},noatime,noexec,nodev,_netdev,nofail,log={}",
        client.display(),
        log.display()
    );
    let out = mount_t(&config, &other, &opts);
    assert!(out.status.success(), "mount -t bftfs: {}", text(&out));
    assert!(is_mounted(&other), "mount(8) returns once mounted");
    let flags = options_of(&other);
    for flag in ["noexec", "noatime", "nodev", "nosuid", "rw"] {
        assert!(flags.split(',').any(|f| f == flag), "{flag} in {flags}");
    }
    fs::write(other.join("via-mount-8"), b"through mount(8)").expect("write");
    assert_eq!(
        fs::read(first.path("via-mount-8")).expect("the other client sees it"),
        b"through mount(8)"
    );
    // noexec is honoured: a program on the mount does not run.
    fs::write(first.path("prog"), b"#!/bin/sh\nexit 0\n").expect("write");
    fs::set_permissions(first.path("prog"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let e = Command::new(other.join("prog"))
        .status()
        .expect_err("noexec");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    assert!(Command::new(first.path("prog"))
        .status()
        .expect("runs where exec is allowed")
        .success());
    let out = run("umount", &[other.as_os_str()]);
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(!is_mounted(&other), "umount(8) unmounts");
    // The background process logged to log=FILE, and kept logging after mount(8) returned.
    let logged = fs::read_to_string(&log).expect("log=FILE is written");
    assert!(logged.contains("FUSE threads)"), "{logged}");
    assert!(
        wait_until(Duration::from_secs(30), || fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("is unmounted; stopping")),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );

    // An fstab line, read only: what mount(8) passes along (defaults, _netdev, nofail) is
    // accepted, ro is enforced, and `mount -a` sees the line as mounted already.
    let fstab = tmp.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# bftfs\n{} {} bftfs defaults,_netdev,nofail,ro,client={} 0 0\n",
            config.display(),
            other.display(),
            client.display()
        ),
    )
    .expect("write fstab");
    let out = run(
        "mount",
        &["-T".as_ref(), fstab.as_os_str(), other.as_os_str()],
    );
    assert!(out.status.success(), "mount -T FSTAB DIR: {}", text(&out));
    assert!(options_of(&other).split(',').any(|f| f == "ro"));
    assert_eq!(
        fs::read(other.join("via-mount-8")).expect("read"),
        b"through mount(8)"
    );
    let e = fs::write(other.join("refused"), b"x").expect_err("read-only");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let out = run("mount", &["-T".as_ref(), fstab.as_os_str(), "-a".as_ref()]);
    assert!(out.status.success(), "mount -a: {}", text(&out));
    let out = run("umount", &[other.as_os_str()]);
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(!is_mounted(&other), "umount(8) unmounts");

    // Mistakes are refused with mount(8)'s exit statuses and one sentence.
    let out = mount_t(&config, &other, "frobnicate");
    assert!(
        !out.status.success() && text(&out).contains("unknown mount option `frobnicate`"),
        "{}",
        text(&out)
    );
    let missing = tmp.path().join("missing.json");
    let out = run(
        "mount",
        &[
            "-t".as_ref(),
            "bftfs".as_ref(),
            missing.as_os_str(),
            other.as_os_str(),
        ],
    );
    assert_eq!(out.status.code(), Some(32), "{}", text(&out));
    assert!(
        text(&out).contains("cannot read the cluster config"),
        "{}",
        text(&out)
    );
    assert!(!is_mounted(&other));
    first.down();
}
