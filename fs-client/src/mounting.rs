//! Mounting, serving and unmounting: the parts of the `bftfs` commands that talk to the kernel.
//!
//! [`serve`] mounts an adapter over a transport and runs it until the file system is unmounted
//! (by `bftfs down`/`umount`, or by SIGINT/SIGTERM/SIGHUP, which unmount first). As root the
//! mount and unmount are plain syscalls; as an ordinary user they go through `fusermount3`.

use crate::adapter::BftFs;
use crate::options::MountOptions;
use crate::transport::FsTransport;
use anyhow::{anyhow, bail, Context, Result};
use fuser::{Config, MountOption, Session, SessionACL};
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{access, geteuid, AccessFlags};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tracing::{info, warn};

/// File system type shown in /proc/mounts: `fuse.bftfs`.
pub const FS_SUBTYPE: &str = "bftfs";
pub const FS_TYPE: &str = "fuse.bftfs";

pub fn is_root() -> bool {
    geteuid().is_root()
}

/// Finds an executable in PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
                .unwrap_or(false)
        })
}

/// The absolute, symlink-free path of a mount point, even when the mount point itself cannot
/// be stat'ed (a dead FUSE mount answers ENOTCONN): then only its parent is resolved.
pub fn mount_path(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    // Lexical clean-up so that "x/." or "x/" still have a file name.
    let mut clean = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    let (Some(parent), Some(name)) = (clean.parent(), clean.file_name()) else {
        bail!("{} is not a usable mount point", p.display());
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("the directory containing {} does not exist", p.display()))?;
    Ok(parent.join(name))
}

/// Undoes the octal escapes (`\040` for a space...) of /proc/self/mountinfo fields.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The file system type mounted at `path` (the topmost one), if any.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source
        let mut fields = line.split(' ');
        let Some(mp) = fields.nth(4) else { continue };
        if unescape_mountinfo(mp) != want {
            continue;
        }
        let mut rest = line.split(" - ");
        let _ = rest.next();
        if let Some(after) = rest.next() {
            // Later lines are mounted on top of earlier ones.
            found = after.split(' ').next().map(str::to_string);
        }
    }
    found
}

/// Checks a mount point before mounting: an existing, empty directory with nothing mounted.
/// A bftfs mount whose process died ("transport endpoint is not connected") is detached
/// first, with a warning: it can serve nothing, and only its own process could have
/// unmounted it.
pub fn check_mount_point(mnt: &Path) -> Result<()> {
    // Each round detaches one dead mount; several can be stacked when earlier runs died.
    for _ in 0..16 {
        let Some(fstype) = mounted_fstype(mnt) else {
            break;
        };
        if fstype != FS_TYPE {
            bail!(
                "{} is already a mount point ({fstype}); choose an empty directory",
                mnt.display()
            );
        }
        if !is_dead_mount(mnt) {
            bail!(
                "{} is already mounted (bftfs); run `bftfs down {0}` or `bftfs umount {0}` first",
                mnt.display()
            );
        }
        unmount(mnt, true).with_context(|| {
            format!(
                "{} is a dead bftfs mount (its process is gone) and detaching it failed",
                mnt.display()
            )
        })?;
        warn!(
            "{} was still mounted by a bftfs process that is gone (transport endpoint is not connected); detached that mount",
            mnt.display()
        );
    }
    let meta = match std::fs::metadata(mnt) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{} is a dead FUSE mount (transport endpoint is not connected); run `bftfs umount --lazy {0}`",
            mnt.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mount point {} does not exist; create an empty directory there first", mnt.display())
        }
        Err(e) => bail!("cannot use mount point {}: {e}", mnt.display()),
    };
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", mnt.display());
    }
    let mut entries = std::fs::read_dir(mnt)
        .with_context(|| format!("cannot read mount point {}", mnt.display()))?;
    if entries.next().is_some() {
        bail!(
            "mount point {} is not empty; mount on an empty directory",
            mnt.display()
        );
    }
    Ok(())
}

/// Whether the FUSE mount at `mnt` lost its server: the kernel answers ENOTCONN once the
/// process holding /dev/fuse for it has closed it (died), without asking anyone.
pub fn is_dead_mount(mnt: &Path) -> bool {
    matches!(std::fs::metadata(mnt), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Checks that this process can mount at all, with one sentence on what is missing.
pub fn check_can_mount() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("FUSE is not available: /dev/fuse is missing (load it with `modprobe fuse`, or give the container --device /dev/fuse)");
    }
    if !is_root() && which("fusermount3").is_none() && which("fusermount").is_none() {
        bail!("not running as root and fusermount3 is not installed: install the fuse3 package or run as root");
    }
    Ok(())
}

/// Unmounts `mnt`. As root with umount2(2) (`lazy`: MNT_DETACH); otherwise with
/// `fusermount3 -u [-z]`.
pub fn unmount(mnt: &Path, lazy: bool) -> Result<()> {
    if is_root() {
        if mnt.as_os_str().as_bytes().contains(&0) {
            bail!("mount point path contains a NUL byte");
        }
        let flags = if lazy {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        return match umount2(mnt, flags) {
            Ok(()) => Ok(()),
            Err(Errno::EINVAL) => Err(anyhow!("{} is not a mount point", mnt.display())),
            Err(Errno::EBUSY) => Err(anyhow!(
                "{} is busy (a process has a file or its working directory there); close it or use --lazy",
                mnt.display()
            )),
            Err(Errno::ENOENT) => Err(anyhow!("{} does not exist", mnt.display())),
            Err(e) => Err(anyhow!(
                "cannot unmount {}: {}",
                mnt.display(),
                std::io::Error::from(e)
            )),
        };
    }
    let Some(fusermount) = which("fusermount3").or_else(|| which("fusermount")) else {
        bail!("not running as root and fusermount3 is not installed: install the fuse3 package, or run `umount` as root");
    };
    let mut cmd = Command::new(&fusermount);
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg(mnt)
        .output()
        .with_context(|| format!("cannot run {}", fusermount.display()))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} -u {} failed: {}",
            fusermount.display(),
            mnt.display(),
            msg.trim()
        );
    }
    Ok(())
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and so in every thread started after), so that
/// only the thread that waits for them sees them.
pub fn block_stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    // Cannot fail: SIG_BLOCK with a valid set.
    let _ = set.thread_block();
    set
}

/// Mounts an adapter over `transport` at `mnt` and serves it until it is unmounted.
/// `on_mounted` runs once the kernel has accepted the mount (write pid files, tell the user).
pub fn serve(
    mnt: &Path,
    transport: Arc<dyn FsTransport>,
    opts: &MountOptions,
    fsname: &str,
    on_mounted: impl FnOnce() -> Result<()>,
) -> Result<()> {
    check_can_mount()?;
    let signals = block_stop_signals();

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname.to_string()),
        // As a kernel option rather than MountOption::Subtype, which fuser hands only to
        // fusermount: this way the type reads `fuse.bftfs` whichever way the mount is made.
        MountOption::CUSTOM(format!("subtype={FS_SUBTYPE}")),
    ];
    if opts.read_only {
        config.mount_options.push(MountOption::RO);
    }
    if opts.no_exec {
        config.mount_options.push(MountOption::NoExec);
    }
    // The service changes atime only when asked to (utimes), never on reads, so this only
    // tells the kernel and /proc/mounts what is so anyway.
    if opts.no_atime {
        config.mount_options.push(MountOption::NoAtime);
    }
    // The service checks permissions for every caller, so other users may come in; that needs
    // root (or user_allow_other in /etc/fuse.conf), hence the default only for root.
    config.acl = if opts.allow_other.unwrap_or_else(is_root) {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    if opts.auto_unmount {
        // fusermount3 refuses auto_unmount for a mount only its owner may enter.
        if config.acl == SessionACL::Owner {
            bail!("-o auto_unmount needs allow_other too (as an ordinary user, that needs user_allow_other in /etc/fuse.conf)");
        }
        if which("fusermount3").is_none() && which("fusermount").is_none() {
            bail!("-o auto_unmount needs fusermount3 (Debian package fuse3), which stays behind to unmount if bftfs dies");
        }
        config.mount_options.push(MountOption::AutoUnmount);
    }
    config.n_threads = Some(opts.threads);
    // One /dev/fuse descriptor per thread: no contention on a single queue.
    config.clone_fd = true;

    let fs = BftFs::new(transport, opts.clone()).context("cannot start the write-back threads")?;
    let notifier = fs.notifier_slot();
    let mut session = Session::new(fs, mnt, &config).map_err(|e| mount_error(mnt, e))?;
    // Before `run`: no request can need the notifier earlier.
    let _ = notifier.set(session.notifier());
    info!("mounted {} ({} FUSE threads)", mnt.display(), opts.threads);

    // Unmounting through the session's own handle keeps fuser from trying a second unmount
    // when the session ends.
    let mut unmounter = session.unmount_callable();
    let stop_path = mnt.to_path_buf();
    std::thread::Builder::new()
        .name("bftfs-signals".into())
        .spawn(move || {
            let Ok(sig) = signals.wait() else {
                return;
            };
            info!("signal {}: unmounting {}", sig as i32, stop_path.display());
            match unmounter.unmount() {
                Ok(()) => info!("unmounted {}", stop_path.display()),
                Err(e) => {
                    warn!("cannot unmount {}: {e}; detaching it lazily (the session ends when the last user leaves)", stop_path.display());
                    if let Err(e) = unmount(&stop_path, true) {
                        warn!("lazy unmount of {} failed too: {e:#}", stop_path.display());
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;

    if let Err(e) = on_mounted() {
        // Dropping the session unmounts.
        drop(session);
        return Err(e);
    }
    // For a `Type=notify` unit running `bftfs mount` in the foreground: units ordered after
    // this one may use the mount from now on. Nothing is sent where NOTIFY_SOCKET is unset.
    let status = format!("mounted at {}", mnt.display());
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ],
    ) {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
    session
        .run()
        .with_context(|| format!("FUSE session at {} failed", mnt.display()))?;
    info!("{} is unmounted; stopping", mnt.display());
    Ok(())
}

fn mount_error(mnt: &Path, e: std::io::Error) -> anyhow::Error {
    let dev_fuse_usable = access("/dev/fuse", AccessFlags::R_OK | AccessFlags::W_OK).is_ok();
    match e.raw_os_error() {
        // fuser opens /dev/fuse itself before it would fall back to fusermount3.
        Some(libc::EPERM) | Some(libc::EACCES) if !dev_fuse_usable => anyhow!(
            "cannot mount {}: /dev/fuse is not readable and writable by this user (it usually has mode 0666); run as root or fix its permissions",
            mnt.display()
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => anyhow!(
            "not allowed to mount at {}: {e} (run as root, or install fusermount3 and own the mount point)",
            mnt.display()
        ),
        Some(libc::ENODEV) | Some(libc::ENOENT) if !Path::new("/dev/fuse").exists() => {
            anyhow!("FUSE is not available: /dev/fuse is missing")
        }
        _ => anyhow!("cannot mount {}: {e}", mnt.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), b"/mnt/a b".to_vec());
        assert_eq!(unescape_mountinfo("/plain"), b"/plain".to_vec());
        assert_eq!(unescape_mountinfo("/x\\"), b"/x\\".to_vec());
    }

    #[test]
    fn proc_is_mounted_somewhere() {
        assert!(mounted_fstype(Path::new("/proc")).is_some());
        assert!(mounted_fstype(Path::new("/definitely/not/a/mount")).is_none());
    }

    #[test]
    fn mount_path_of_missing_leaf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = mount_path(&dir.path().join("missing/")).expect("parent exists");
        assert_eq!(
            p,
            dir.path().canonicalize().expect("exists").join("missing")
        );
    }

    #[test]
    fn mount_point_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = check_mount_point(&dir.path().join("nope")).expect_err("missing");
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::write(dir.path().join("f"), b"x").expect("write");
        let e = check_mount_point(dir.path()).expect_err("not empty");
        assert!(e.to_string().contains("not empty"), "{e}");
        let e = check_mount_point(&dir.path().join("f")).expect_err("file");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
