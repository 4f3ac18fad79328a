//! The `bftfs` client: a FUSE adapter over the file service, and the commands that mount it.
//!
//! - [`cluster`]: the replicated transport, the local cluster `up` starts, `status` probes;
//! - [`health`]: the verdict of `bftfs status` (ok, degraded, stuck) and its reasons;
//! - [`transport`]: the [`transport::FsTransport`] trait, how the adapter reaches the service;
//! - [`adapter`]: the FUSE file system (fuser), node ids ⇄ handles, the errno mapping;
//! - [`inodes`]: the node id table;
//! - [`kernel_cache`]: what the kernel may serve from its caches (close-to-open consistency);
//! - [`local`]: the unreplicated transport (one in-process file service, `up --f 0`);
//! - [`metrics`]: a mount's `/metrics` (call times by operation kind, how calls completed);
//! - [`options`]: `-o` mount options;
//! - [`open_files`]: open files kept alive across unlink (hidden names, as NFS does);
//! - [`write_back`]: buffered writes sent in the background, drained at close and fsync;
//! - [`range_locks`]: fcntl and flock locks shared by every mount (waits, leases, closes);
//! - [`packaging`]: `bftfs completions` and `bftfs man`, made from the clap definitions;
//! - [`mount_helper`]: `mount.bftfs` (mount(8) and fstab) and `bftfs install-helper`;
//! - [`mounting`]: mount checks, serving a mount until it is unmounted, unmounting;
//! - [`keygen`]: `bftfs keygen`, a cluster config and secrets files;
//! - [`config_check`]: `bftfs config check`, what is wrong with a config or secrets file;
//! - [`up`]: `bftfs up`/`down`/`status` for a cluster started on this machine.

pub mod adapter;
pub mod cluster;
pub mod config_check;
pub mod health;
pub mod inodes;
pub mod kernel_cache;
pub mod keygen;
pub mod local;
pub mod metrics;
pub mod mount_helper;
pub mod mounting;
pub mod open_files;
pub mod options;
pub mod packaging;
pub mod range_locks;
pub mod transport;
pub mod up;
pub mod write_back;

/// `bftfs lock PATH` / `bftfs unlock PATH`: sets or removes the attribute the mount
/// intercepts ([`adapter::LOCK_XATTR`]); the kernel resolves PATH to the mount and the node.
pub fn lock_control(path: &std::path::Path, take: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut name = adapter::LOCK_XATTR.to_vec();
    name.push(0);
    // SAFETY: both strings are NUL-terminated and live across the call; the value is an
    // empty buffer of the length given. nix has no xattr calls.
    let rc = unsafe {
        if take {
            libc::setxattr(
                c_path.as_ptr(),
                name.as_ptr().cast(),
                b"subtree".as_ptr().cast(),
                7,
                0,
            )
        } else {
            libc::removexattr(c_path.as_ptr(), name.as_ptr().cast())
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
