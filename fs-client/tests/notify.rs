//! A foreground `bftfs up` as a `Type=notify` unit runs it: NOTIFY_SOCKET points at a datagram
//! socket the test listens on (standing in for PID 1). `READY=1` must come once the FUSE mount
//! is there, and only from the serving process: the replicas it starts must not report to the
//! same socket. Real mounts: skipped with a message without FUSE (a failure when
//! BFTFS_REQUIRE_FUSE=1).

mod common;

use common::{bftfs, fuse_available, is_mounted, send_signal, test_f, wait_until, Signal, BFTFS};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: starting replicas and mounting may be slow on a loaded machine.
const WAIT: Duration = Duration::from_secs(90);

/// Stops the foreground `bftfs up` if the test fails half way, and what it left mounted.
struct Up {
    child: Child,
    mnt: std::path::PathBuf,
    xdg: std::path::PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            send_signal(self.child.id() as i32, Signal::SIGTERM);
            if !wait_until(Duration::from_secs(20), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            }) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if is_mounted(&self.mnt) {
            let _ = bftfs(&["down".as_ref(), self.mnt.as_os_str()], &self.xdg);
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn messages_until(
    socket: &UnixDatagram,
    limit: Duration,
    stop: impl Fn(&str) -> bool,
) -> Vec<String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < limit {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = stop(&text);
            seen.push(text);
            if done {
                break;
            }
        }
    }
    seen
}

#[test]
fn foreground_up_says_ready_once_mounted() {
    if !fuse_available("foreground_up_says_ready_once_mounted") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    let xdg = tmp.path().join("xdg");
    std::fs::create_dir(&mnt).expect("mkdir mnt");
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let log = tmp.path().join("up.log");

    let mut up = Up {
        child: Command::new(BFTFS)
            .arg("up")
            .arg(&mnt)
            .arg("--f")
            .arg(test_f())
            .arg("--log-file")
            .arg(&log)
            .env("XDG_DATA_HOME", &xdg)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start bftfs up"),
        mnt: mnt.clone(),
        xdg: xdg.clone(),
    };
    let read_log = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    let seen = messages_until(&socket, WAIT, |m| m.lines().any(|l| l == "READY=1"));
    let ready = seen
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 within {WAIT:?}: {seen:?}\n{}", read_log(&log)));
    assert!(
        is_mounted(&mnt),
        "READY=1 before the mount was there: {ready:?}\n{}",
        read_log(&log)
    );
    assert!(ready.contains("STATUS=mounted at "), "{ready:?}");
    // A file system that answers, not only a mount table entry.
    std::fs::write(mnt.join("hello"), b"ready").expect("write on the mount");

    // Replicas would report within a second or two of serving (their first status line).
    let after = messages_until(&socket, Duration::from_secs(4), |_| false);
    assert!(
        seen.iter()
            .chain(&after)
            .all(|m| !m.contains("STATUS=view")),
        "a replica of `up` reported to the unit's socket: {seen:?} {after:?}"
    );
    assert!(
        !after.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 twice: {after:?}"
    );

    send_signal(up.child.id() as i32, Signal::SIGTERM);
    assert!(
        wait_until(WAIT, || matches!(up.child.try_wait(), Ok(Some(_)))),
        "bftfs up did not stop on SIGTERM\n{}",
        read_log(&log)
    );
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
}
