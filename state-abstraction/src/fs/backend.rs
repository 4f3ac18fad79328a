//! The concrete side of the conformance wrapper: thin, checked wrappers over the `*at` system
//! calls, relative to directory file descriptors, never following a symbolic link.
//!
//! Nothing in here interprets a path: every call names one component inside a directory fd
//! that the wrapper already holds, so no name can reach outside the data directory.

use super::ops::FsError;
use nix::fcntl::{FallocateFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::UnlinkatFlags;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// The one place where a backend error becomes a canonical error.
///
/// The wrapper decides every POSIX-visible outcome (existence, types, permissions, limits) from
/// its own table before it touches the backend, so a backend error here means the local store
/// failed, not that the request was wrong: only resource exhaustion is reported as such, and
/// everything else is an I/O error.
pub fn fs_error(e: &io::Error) -> FsError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => FsError::NoSpc,
        Some(libc::EFBIG) => FsError::FBig,
        _ => FsError::Io,
    }
}

pub fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The descriptor `raw` names, for nix's calls. This module's functions take raw descriptors
/// (their callers hold the owning `OwnedFd`s); each borrows one for the length of a call.
fn fd<'a>(raw: RawFd) -> BorrowedFd<'a> {
    // SAFETY: every caller passes a descriptor it keeps open for the whole call.
    unsafe { BorrowedFd::borrow_raw(raw) }
}

/// Retries a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

pub fn open_path(path: &std::path::Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_CLOEXEC;
    retry(|| {
        Ok(nix::fcntl::open(
            path,
            flags,
            Mode::from_bits_retain(0o600),
        )?)
    })
}

pub fn openat(dir: RawFd, name: &[u8], flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let mode = Mode::from_bits_retain(mode as libc::mode_t);
    retry(|| Ok(nix::fcntl::openat(fd(dir), name, flags, mode)?))
}

pub fn open_dir_at(dir: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

pub fn open_file_at(dir: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDWR, 0)
}

/// Creates a new regular file (fails if the name exists) and returns it open for reading and
/// writing.
pub fn create_file_at(dir: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
    openat(
        dir,
        name,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
        0o600,
    )
}

pub fn mkdirat(dir: RawFd, name: &[u8]) -> io::Result<()> {
    Ok(nix::sys::stat::mkdirat(
        fd(dir),
        name,
        Mode::from_bits_retain(0o700),
    )?)
}

pub fn symlinkat(target: &[u8], dir: RawFd, name: &[u8]) -> io::Result<()> {
    Ok(nix::unistd::symlinkat(target, fd(dir), name)?)
}

pub fn unlinkat(dir: RawFd, name: &[u8], is_dir: bool) -> io::Result<()> {
    let flags = if is_dir {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    Ok(nix::unistd::unlinkat(fd(dir), name, flags)?)
}

/// `renameat2`; `no_replace` makes an existing target an error (EEXIST) instead of replacing it.
pub fn renameat(
    from_dir: RawFd,
    from: &[u8],
    to_dir: RawFd,
    to: &[u8],
    no_replace: bool,
) -> io::Result<()> {
    let flags = if no_replace {
        RenameFlags::RENAME_NOREPLACE
    } else {
        RenameFlags::empty()
    };
    let (from_dir, to_dir) = (fd(from_dir), fd(to_dir));
    Ok(nix::fcntl::renameat2(from_dir, from, to_dir, to, flags)?)
}

pub fn linkat(from_dir: RawFd, from: &[u8], to_dir: RawFd, to: &[u8]) -> io::Result<()> {
    // No flags: a symlink is linked, not followed.
    let no_follow = nix::fcntl::AtFlags::empty();
    let (from_dir, to_dir) = (fd(from_dir), fd(to_dir));
    Ok(nix::unistd::linkat(from_dir, from, to_dir, to, no_follow)?)
}

pub fn fstatat(dir: RawFd, name: &[u8]) -> io::Result<FileStat> {
    let flags = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
    Ok(nix::sys::stat::fstatat(fd(dir), name, flags)?)
}

pub fn fstat(raw: RawFd) -> io::Result<FileStat> {
    Ok(nix::sys::stat::fstat(fd(raw))?)
}

pub fn ftruncate(raw: RawFd, size: u64) -> io::Result<()> {
    retry(|| Ok(nix::unistd::ftruncate(fd(raw), size as libc::off_t)?))
}

pub fn fsync(raw: RawFd) -> io::Result<()> {
    retry(|| Ok(nix::unistd::fsync(fd(raw))?))
}

pub fn syncfs(raw: RawFd) -> io::Result<()> {
    Ok(nix::unistd::syncfs(fd(raw))?)
}

/// Reads up to `buf.len()` bytes at `offset`, stopping early only at end of file.
pub fn pread_full(raw: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let at = (offset + done as u64) as libc::off_t;
        let n = retry(|| Ok(nix::sys::uio::pread(fd(raw), &mut buf[done..], at)?))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

pub fn pwrite_full(raw: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = (offset + done as u64) as libc::off_t;
        let n = retry(|| Ok(nix::sys::uio::pwrite(fd(raw), &buf[done..], at)?))?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n;
    }
    Ok(())
}

/// Bytes `start..end` of a file read as zeros afterwards; its size does not change (the range
/// ends at or before the end of the file). A hole is punched where the file system can;
/// where it cannot, zeros are written.
pub fn zero_range(fd: RawFd, start: u64, end: u64) -> io::Result<()> {
    if end <= start {
        return Ok(());
    }
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(fd, punch, start, end - start) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        r => return r,
    }
    let zeros = vec![0u8; (end - start).min(1 << 20) as usize];
    let mut at = start;
    while at < end {
        let n = (end - at).min(zeros.len() as u64) as usize;
        pwrite_full(fd, &zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Reserves space for bytes `start..end` of a file; the size grows to `end` unless
/// `keep_size`. Where the file system cannot reserve space, only the size is set.
pub fn allocate(fd: RawFd, start: u64, end: u64, keep_size: bool) -> io::Result<()> {
    if end <= start {
        return Ok(());
    }
    let mode = if keep_size {
        libc::FALLOC_FL_KEEP_SIZE
    } else {
        0
    };
    match fallocate(fd, mode, start, end - start) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        r => return r,
    }
    if !keep_size && fstat(fd)?.st_size < end as i64 {
        ftruncate(fd, end)?;
    }
    Ok(())
}

fn fallocate(raw: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let mode = FallocateFlags::from_bits_retain(mode);
    let (offset, len) = (offset as libc::off_t, len as libc::off_t);
    retry(|| Ok(nix::fcntl::fallocate(fd(raw), mode, offset, len)?))
}

/// Copies `count` bytes of `src` at `src_at` to `dst` at `dst_at` (the two may be one file if
/// the ranges do not overlap). The source must hold them all: running out is an error.
pub fn copy_range(src: RawFd, src_at: u64, dst: RawFd, dst_at: u64, count: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < count {
        let mut from = (src_at + done) as libc::loff_t;
        let mut to = (dst_at + done) as libc::loff_t;
        let want = (count - done).min(1 << 30) as usize;
        let r = retry(|| {
            let (from, to) = (Some(&mut from), Some(&mut to));
            Ok(nix::fcntl::copy_file_range(
                fd(src),
                from,
                fd(dst),
                to,
                want,
            )?)
        });
        match r {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => done += n as u64,
            // Kernels and file systems without an in-kernel copy for these two files: copy
            // through a buffer instead.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL)
                ) =>
            {
                return copy_through_buffer(src, src_at + done, dst, dst_at + done, count - done);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_through_buffer(
    src: RawFd,
    src_at: u64,
    dst: RawFd,
    dst_at: u64,
    count: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; count.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(buf.len() as u64) as usize;
        if pread_full(src, &mut buf[..n], src_at + done)? != n {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        pwrite_full(dst, &buf[..n], dst_at + done)?;
        done += n as u64;
    }
    Ok(())
}

/// `FICLONE`: makes `dst` share `src`'s extents (btrfs, xfs). Fails with EOPNOTSUPP/EXDEV/EINVAL
/// where the file system cannot.
pub fn reflink(src: RawFd, dst: RawFd) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its argument.
    check(unsafe { libc::ioctl(dst, FICLONE as _, src) }).map(drop)
}

/// Names in a directory (without `.` and `..`), in the backend's order. Used only for repair
/// and cleanup, never to answer a request.
pub fn list_dir(dir: RawFd) -> io::Result<Vec<Vec<u8>>> {
    // The directory stream takes ownership of the fd it is given, so give it a duplicate; the
    // duplicate shares the position, so rewind it in case the fd was read before.
    let dup = fd(dir).try_clone_to_owned()?;
    nix::unistd::lseek(&dup, 0, nix::unistd::Whence::SeekSet)?;
    let mut stream = nix::dir::Dir::from_fd(dup)?;
    let mut names = Vec::new();
    for entry in stream.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`, recursively if it is a directory. A missing name is not an error.
pub fn remove_tree_at(dir: RawFd, name: &[u8]) -> io::Result<()> {
    let st = match fstatat(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let sub = open_dir_at(dir, name)?;
        for child in list_dir(sub.as_raw_fd())? {
            remove_tree_at(sub.as_raw_fd(), &child)?;
        }
        unlinkat(dir, name, true)
    } else {
        unlinkat(dir, name, false)
    }
}

pub fn is_dir_mode(mode: libc::mode_t) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

/// Whether a file descriptor's directory is the root of a btrfs subvolume (inode 256 on a
/// file system with btrfs's magic number).
pub fn is_btrfs_subvolume(raw: RawFd) -> bool {
    use nix::sys::statfs::{fstatfs, BTRFS_SUPER_MAGIC};
    match fstatfs(fd(raw)) {
        Ok(sfs) if sfs.filesystem_type() == BTRFS_SUPER_MAGIC => {}
        _ => return false,
    }
    matches!(fstat(raw), Ok(st) if st.st_ino == 256)
}

const BTRFS_IOCTL_MAGIC: u64 = 0x94;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;

#[repr(C)]
struct BtrfsVolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

#[repr(C)]
struct BtrfsVolArgs {
    fd: i64,
    name: [u8; 4088],
}

const fn iow(nr: u64, size: usize) -> libc::c_ulong {
    // _IOW(type, nr, size) on Linux: direction write (1) in bits 30..31.
    ((1u64 << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr) as libc::c_ulong
}

/// Creates a snapshot of subvolume `src` named `name` inside directory `dst_dir`.
pub fn btrfs_snapshot(src: RawFd, dst_dir: RawFd, name: &[u8], read_only: bool) -> io::Result<()> {
    if name.len() > BTRFS_SUBVOL_NAME_MAX || name.contains(&0) || name.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut args = Box::new(BtrfsVolArgsV2 {
        fd: src as i64,
        transid: 0,
        flags: if read_only { BTRFS_SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
    });
    args.name[..name.len()].copy_from_slice(name);
    let req = iow(23, std::mem::size_of::<BtrfsVolArgsV2>());
    // SAFETY: BTRFS_IOC_SNAP_CREATE_V2 reads a btrfs_ioctl_vol_args_v2, which `args` is.
    check(unsafe { libc::ioctl(dst_dir, req as _, &mut *args as *mut BtrfsVolArgsV2) }).map(drop)
}

/// Creates an empty subvolume `name` inside `dst_dir`.
pub fn btrfs_subvol_create(dst_dir: RawFd, name: &[u8]) -> io::Result<()> {
    // BTRFS_IOC_SUBVOL_CREATE
    btrfs_vol_ioctl(dst_dir, 14, name)
}

/// Deletes subvolume `name` inside `dir` (it must be empty of nested subvolumes).
pub fn btrfs_subvol_delete(dir: RawFd, name: &[u8]) -> io::Result<()> {
    // BTRFS_IOC_SNAP_DESTROY
    btrfs_vol_ioctl(dir, 15, name)
}

/// The btrfs ioctl number `nr` that takes a btrfs_ioctl_vol_args naming `name`, on `dir`.
fn btrfs_vol_ioctl(dir: RawFd, nr: u64, name: &[u8]) -> io::Result<()> {
    if name.len() >= 4088 || name.contains(&0) || name.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut args = Box::new(BtrfsVolArgs {
        fd: 0,
        name: [0; 4088],
    });
    args.name[..name.len()].copy_from_slice(name);
    let req = iow(nr, std::mem::size_of::<BtrfsVolArgs>());
    // SAFETY: both callers' ioctls (BTRFS_IOC_SUBVOL_CREATE, BTRFS_IOC_SNAP_DESTROY) read a
    // btrfs_ioctl_vol_args, which `args` is.
    check(unsafe { libc::ioctl(dir, req as _, &mut *args as *mut BtrfsVolArgs) }).map(drop)
}

/// Clears the read-only flag of a subvolume so it can be deleted without mount options.
pub fn btrfs_set_writable(fd: RawFd) -> io::Result<()> {
    let mut flags: u64 = 0;
    let get = ((2u64 << 30) | (8u64 << 16) | (BTRFS_IOCTL_MAGIC << 8) | 25) as libc::c_ulong;
    // SAFETY: BTRFS_IOC_SUBVOL_GETFLAGS writes one u64.
    check(unsafe { libc::ioctl(fd, get as _, &mut flags as *mut u64) })?;
    flags &= !BTRFS_SUBVOL_RDONLY;
    let set = iow(26, 8);
    // SAFETY: BTRFS_IOC_SUBVOL_SETFLAGS reads one u64.
    check(unsafe { libc::ioctl(fd, set as _, &flags as *const u64) }).map(drop)
}

pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}
