//! A cluster that cannot be reached: every operation fails with EIO (not a hang, not a crash),
//! and the mount still unmounts cleanly.

mod common;

use fs_client::mounting;
use fs_client::options::MountOptions;
use fs_client::transport::{FsTransport, TransportError};
use state_abstraction::fs::{FsRequest, FsResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Unreachable(AtomicU64);

impl FsTransport for Unreachable {
    fn call(&self, _req: FsRequest) -> Result<FsResult, TransportError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Err(TransportError::Timeout(Duration::from_millis(1)))
    }
}

#[test]
fn unreachable_cluster_gives_eio() {
    if !common::fuse_available("unreachable_cluster_gives_eio") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mnt = mnt.canonicalize().expect("canonical");
    let transport = Arc::new(Unreachable(AtomicU64::new(0)));
    let t2: Arc<dyn FsTransport> = transport.clone();
    let m2 = mnt.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        mounting::serve(&m2, t2, &MountOptions::default(), "bftfs-test", move || {
            let _ = tx.send(());
            Ok(())
        })
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("mounted");
    let e = std::fs::metadata(mnt.join("x")).expect_err("lookup must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = std::fs::read_dir(&mnt)
        .and_then(|mut d| d.next().transpose())
        .expect_err("readdir must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(transport.0.load(Ordering::Relaxed) >= 2);
    mounting::unmount(&mnt, false).expect("unmount");
    server
        .join()
        .expect("server thread")
        .expect("serve ends cleanly");
}
