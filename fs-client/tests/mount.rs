//! Real mounts: `bftfs up --f 0 --detach` into temporary directories, real programs and
//! syscalls against them, `bftfs down` at the end. They need root and /dev/fuse; without them
//! they skip with a message (a failure when BFTFS_REQUIRE_FUSE=1).

mod common;

use common::{bftfs, fuse_available, is_mounted, send_signal, sh, text, Mounted, Signal};
use replica::rng::Rng;
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths")
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn last_errno(rc: libc::c_int) -> i32 {
    if rc >= 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// One line per object of a tree: what a faithful copy must reproduce.
fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("entry");
            let rel = rel.join(e.file_name());
            let p = root.join(&rel);
            let m = fs::symlink_metadata(&p).expect("lstat");
            let mode = m.permissions().mode() & 0o7777;
            let line = if m.is_dir() {
                stack.push(rel.clone());
                format!("d {} {mode:o}", rel.display())
            } else if m.file_type().is_symlink() {
                format!(
                    "l {} -> {}",
                    rel.display(),
                    fs::read_link(&p).expect("readlink").display()
                )
            } else {
                let data = fs::read(&p).expect("read");
                let sum: String = Sha256::digest(&data)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!(
                    "f {} {mode:o} {} {} {sum}",
                    rel.display(),
                    m.len(),
                    m.mtime()
                )
            };
            out.push(line);
        }
    }
    out.sort();
    out
}

#[test]
fn tarball_of_thousands_of_files() {
    if !fuse_available("tarball_of_thousands_of_files") {
        return;
    }
    let m = Mounted::new();
    // The original tree on tmpfs when there is one: creating and deleting thousands of files
    // on a slow disk would dominate the test's time and says nothing about the mount.
    let work = tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let src = work.path().join("src");
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let sizes = [
        0usize, 1, 17, 511, 4095, 4096, 4097, 20_000, 65_536, 65_537, 200_000,
    ];
    let mut n = 0;
    for d in 0..30 {
        let dir = src.join(format!("pkg{d:02}/sub{}", d % 4));
        fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..100 {
            let size = sizes[(rng.below(sizes.len() as u64)) as usize];
            fs::write(dir.join(format!("file{f:03}.dat")), rng.bytes(size)).expect("write");
            n += 1;
        }
        std::os::unix::fs::symlink(
            format!("sub{}/file000.dat", d % 4),
            src.join(format!("pkg{d:02}/link")),
        )
        .expect("symlink");
    }
    // A few files larger than the service's 1 MiB request limit.
    for i in 0..3 {
        fs::write(
            src.join(format!("big{i}.bin")),
            rng.bytes(2 * 1024 * 1024 + 12345 * i),
        )
        .expect("write big");
        n += 1;
    }
    assert!(n >= 3000);
    let tarball = work.path().join("src.tar");
    sh(&format!(
        "tar cf {} -C {} .",
        tarball.display(),
        src.display()
    ));

    let t = Instant::now();
    sh(&format!(
        "tar xf {} -C {}",
        tarball.display(),
        m.mnt.display()
    ));
    eprintln!("tar x of {n} files into the mount: {:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(
        describe(&m.mnt),
        describe(&src),
        "the unpacked tree differs from the original"
    );
    eprintln!("compared every file: {:?}", t.elapsed());
    m.down();
}

#[test]
fn build_like_directory_work() {
    if !fuse_available("build_like_directory_work") {
        return;
    }
    let m = Mounted::new();
    let p = |r: &str| m.path(r);

    // Many small files in one directory, then a full readdir of it.
    fs::create_dir_all(p("obj/deep/er")).expect("mkdir -p");
    for i in 0..2500 {
        fs::write(p(&format!("obj/f{i:05}.o")), format!("object {i}")).expect("create");
    }
    let mut names: Vec<String> = fs::read_dir(p("obj"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2501, "2500 files and one directory");
    assert_eq!(names[0], "deep");
    assert_eq!(names[2500], "f02499.o");
    let ls = sh(&format!("ls -la {} | wc -l", p("obj").display()));
    assert_eq!(ls.trim(), "2504", "total line, ., .., deep and 2500 files");
    // readdir while deleting: nothing may be skipped.
    let mut removed = 0;
    for e in fs::read_dir(p("obj")).expect("readdir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            fs::remove_file(e.path()).expect("unlink during readdir");
            removed += 1;
        }
    }
    assert_eq!(removed, 2500);
    assert_eq!(fs::read_dir(p("obj")).expect("readdir").count(), 1);

    // Renames: plain, over an existing target, across directories, of a directory.
    fs::write(p("a.tmp"), b"new contents").expect("write");
    fs::write(p("a"), b"old").expect("write");
    fs::rename(p("a.tmp"), p("a")).expect("rename over existing");
    assert_eq!(fs::read(p("a")).expect("read"), b"new contents");
    assert_eq!(errno_of(fs::metadata(p("a.tmp"))), libc::ENOENT);
    fs::rename(p("a"), p("obj/deep/a")).expect("rename across directories");
    fs::rename(p("obj/deep"), p("moved")).expect("rename a directory");
    assert_eq!(fs::read(p("moved/a")).expect("read"), b"new contents");
    assert!(p("moved/er").is_dir());
    assert_eq!(
        errno_of(fs::rename(p("moved"), p("moved/er/inside"))),
        libc::EINVAL
    );
    // RENAME_NOREPLACE onto an existing name.
    fs::write(p("b"), b"b").expect("write");
    // SAFETY: valid C strings; renameat2 is a plain syscall.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(&p("b")).as_ptr(),
            libc::AT_FDCWD,
            c(&p("moved/a")).as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(last_errno(rc), libc::EEXIST);
    // SAFETY: as above.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(&p("b")).as_ptr(),
            libc::AT_FDCWD,
            c(&p("b2")).as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(last_errno(rc), 0);
    // SAFETY: as above.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(&p("b2")).as_ptr(),
            libc::AT_FDCWD,
            c(&p("moved/a")).as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert!(
        matches!(last_errno(rc), libc::EINVAL | libc::EOPNOTSUPP),
        "RENAME_EXCHANGE is refused"
    );

    // Hard links and their counts.
    fs::hard_link(p("moved/a"), p("hard")).expect("link");
    let (ma, mh) = (
        fs::metadata(p("moved/a")).expect("stat"),
        fs::metadata(p("hard")).expect("stat"),
    );
    assert_eq!((ma.nlink(), mh.nlink()), (2, 2));
    assert_eq!(ma.ino(), mh.ino());
    fs::remove_file(p("moved/a")).expect("unlink one name");
    assert_eq!(fs::metadata(p("hard")).expect("stat").nlink(), 1);
    assert_eq!(fs::read(p("hard")).expect("read"), b"new contents");
    assert_eq!(errno_of(fs::hard_link(p("hard"), p("b2"))), libc::EEXIST);

    // Symlinks.
    std::os::unix::fs::symlink("moved/er", p("sym")).expect("symlink");
    std::os::unix::fs::symlink("nowhere/at/all", p("dangling")).expect("symlink");
    assert_eq!(
        fs::read_link(p("sym")).expect("readlink"),
        Path::new("moved/er")
    );
    assert!(p("sym").is_dir(), "symlink to a directory resolves");
    fs::write(p("sym/through"), b"x").expect("write through symlink");
    assert!(p("moved/er/through").is_file());
    assert!(fs::symlink_metadata(p("dangling"))
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert_eq!(errno_of(fs::metadata(p("dangling"))), libc::ENOENT);

    // An open file outlives its name (unlink, or rename over it), as POSIX asks.
    fs::write(p("doomed"), b"still here").expect("write");
    let mut reader = fs::File::open(p("doomed")).expect("open");
    let mut writer = fs::OpenOptions::new()
        .append(true)
        .open(p("doomed"))
        .expect("open");
    fs::remove_file(p("doomed")).expect("unlink an open file");
    assert_eq!(errno_of(fs::metadata(p("doomed"))), libc::ENOENT);
    writer.write_all(b", and more").expect("write after unlink");
    let mut got = String::new();
    reader.read_to_string(&mut got).expect("read after unlink");
    assert_eq!(got, "still here, and more");
    fs::write(p("target"), b"old version").expect("write");
    let mut old_reader = fs::File::open(p("target")).expect("open");
    fs::write(p("target.new"), b"new version").expect("write");
    fs::rename(p("target.new"), p("target")).expect("rename over an open file");
    let mut got = String::new();
    old_reader
        .read_to_string(&mut got)
        .expect("read the replaced file");
    assert_eq!(got, "old version");
    assert_eq!(fs::read(p("target")).expect("read"), b"new version");
    let hidden = || {
        fs::read_dir(&m.mnt)
            .expect("readdir")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".bftfs-hidden-")
            })
            .count()
    };
    assert_eq!(hidden(), 2, "kept under hidden names while open");
    drop((reader, writer, old_reader));
    assert!(
        common::wait_until(std::time::Duration::from_secs(5), || hidden() == 0),
        "removed at the last close"
    );

    // Deletes.
    assert_eq!(errno_of(fs::remove_dir(p("moved"))), libc::ENOTEMPTY);
    fs::remove_file(p("moved/er/through")).expect("unlink");
    fs::remove_dir(p("moved/er")).expect("rmdir");
    assert_eq!(errno_of(fs::remove_dir(p("hard"))), libc::ENOTDIR);

    // mkfifo.
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mkfifo(c(&p("fifo")).as_ptr(), 0o644) },
        0,
        "mkfifo: {}",
        std::io::Error::last_os_error()
    );
    assert!(fs::symlink_metadata(p("fifo"))
        .expect("lstat")
        .file_type()
        .is_fifo());

    // chmod, chown, truncate, utimens.
    fs::set_permissions(p("hard"), fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(
        fs::metadata(p("hard")).expect("stat").mode() & 0o7777,
        0o640
    );
    std::os::unix::fs::chown(p("hard"), Some(1234), Some(5678)).expect("chown");
    let st = fs::metadata(p("hard")).expect("stat");
    assert_eq!((st.uid(), st.gid()), (1234, 5678));
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p("hard"))
        .expect("open");
    f.set_len(3).expect("truncate down");
    f.set_len(100_000).expect("extend");
    drop(f);
    let data = fs::read(p("hard")).expect("read");
    assert_eq!(data.len(), 100_000);
    assert_eq!(&data[..3], b"new");
    assert!(data[3..].iter().all(|&b| b == 0));
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_100_000_000,
            tv_nsec: 5,
        },
    ];
    // SAFETY: valid C string and a two-element array.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c(&p("hard")).as_ptr(), times.as_ptr(), 0) };
    assert_eq!(last_errno(rc), 0);
    let st = fs::metadata(p("hard")).expect("stat");
    assert_eq!(
        (st.atime(), st.atime_nsec(), st.mtime(), st.mtime_nsec()),
        (1_000_000_000, 123_456_789, 1_100_000_000, 5)
    );
    let now = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: as above.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c(&p("hard")).as_ptr(), now.as_ptr(), 0) };
    assert_eq!(last_errno(rc), 0);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let st = fs::metadata(p("hard")).expect("stat");
    assert!(
        (st.mtime() - wall).abs() <= 5,
        "UTIME_NOW sets the current time: {} vs {wall}",
        st.mtime()
    );

    // Extended attributes, with the size-0 probe.
    let path = c(&p("hard"));
    let name = CString::new("user.colour").expect("name");
    // SAFETY: valid pointers and lengths throughout this block.
    unsafe {
        assert_eq!(
            libc::setxattr(path.as_ptr(), name.as_ptr(), b"blue!".as_ptr().cast(), 5, 0),
            0
        );
        assert_eq!(
            libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0),
            5,
            "size probe"
        );
        let mut small = [0u8; 2];
        assert_eq!(
            libc::getxattr(path.as_ptr(), name.as_ptr(), small.as_mut_ptr().cast(), 2),
            -1
        );
        assert_eq!(last_errno(-1), libc::ERANGE);
        let mut buf = [0u8; 64];
        assert_eq!(
            libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 64),
            5
        );
        assert_eq!(&buf[..5], b"blue!");
        assert_eq!(
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                b"x".as_ptr().cast(),
                1,
                libc::XATTR_CREATE
            ),
            -1
        );
        assert_eq!(last_errno(-1), libc::EEXIST);
        let other = CString::new("user.other").expect("name");
        assert_eq!(
            libc::setxattr(
                path.as_ptr(),
                other.as_ptr(),
                b"x".as_ptr().cast(),
                1,
                libc::XATTR_REPLACE
            ),
            -1
        );
        assert_eq!(last_errno(-1), libc::ENODATA);
        assert_eq!(
            libc::setxattr(
                path.as_ptr(),
                other.as_ptr(),
                b"".as_ptr().cast(),
                0,
                libc::XATTR_CREATE
            ),
            0
        );
        let len = libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0);
        assert_eq!(len as usize, "user.colour\0user.other\0".len());
        let mut list = vec![0u8; len as usize];
        assert_eq!(
            libc::listxattr(path.as_ptr(), list.as_mut_ptr().cast(), list.len()),
            len
        );
        let mut names: Vec<&[u8]> = list.split(|&b| b == 0).filter(|s| !s.is_empty()).collect();
        names.sort();
        assert_eq!(names, vec![&b"user.colour"[..], b"user.other"]);
        assert_eq!(libc::removexattr(path.as_ptr(), name.as_ptr()), 0);
        assert_eq!(
            libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0),
            -1
        );
        assert_eq!(last_errno(-1), libc::ENODATA);
    }
    let got = sh(&format!(
        "setfattr -n user.tool -v hi {0} && getfattr --only-values -n user.tool {0}",
        p("hard").display()
    ));
    assert_eq!(got, "hi");

    // Large I/O across the 1 MiB request limit, at odd offsets.
    let mut rng = Rng::new(7);
    let big = rng.bytes(3 * 1024 * 1024 + 777);
    fs::write(p("big"), &big).expect("write big");
    let mut f = fs::File::open(p("big")).expect("open");
    let mut part = vec![0u8; 1_500_000];
    f.seek(SeekFrom::Start(1_000_001)).expect("seek");
    f.read_exact(&mut part).expect("read across chunks");
    assert_eq!(&part[..], &big[1_000_001..2_500_001]);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(p("big"))
        .expect("open append");
    f.write_all(b"tail").expect("append");
    f.sync_all().expect("fsync");
    drop(f);
    assert_eq!(
        fs::metadata(p("big")).expect("stat").len(),
        big.len() as u64 + 4
    );

    // What the kernel does itself once told ENOSYS: copy_file_range and SEEK_DATA (cp),
    // posix_fallocate (written as zeros), and locks (kept locally).
    sh(&format!(
        "cp {0} {0}.copy && cmp {0} {0}.copy",
        p("big").display()
    ));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("big.copy"))
        .expect("open");
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor for the calls below.
    unsafe {
        assert_eq!(libc::posix_fallocate(f.as_raw_fd(), 0, 5_000_000), 0);
        assert_eq!(libc::flock(f.as_raw_fd(), libc::LOCK_EX), 0);
        assert_eq!(libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA), 0);
    }
    assert_eq!(f.metadata().expect("fstat").len(), 5_000_000);
    drop(f);

    // Names the service rejects.
    let long = "x".repeat(256);
    assert_eq!(errno_of(fs::write(p(&long), b"")), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::create_dir(p(&long))), libc::ENAMETOOLONG);
    fs::write(p(&"y".repeat(255)), b"ok").expect("a 255-byte name is fine");
    assert_eq!(errno_of(fs::create_dir(p("hard"))), libc::EEXIST);
    assert_eq!(
        errno_of(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p("hard"))
        ),
        libc::EEXIST
    );

    // statfs.
    // SAFETY: zeroed statvfs is a valid out-buffer.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c(&m.mnt).as_ptr(), &mut sv) }, 0);
    assert_eq!(sv.f_namemax, 255);
    assert!(sv.f_blocks > 0);

    // Another user: the service decides, from the caller the adapter passes through.
    if Path::new("/usr/bin/setpriv").exists() {
        fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).expect("chmod root");
        fs::write(p("rootonly"), b"secret").expect("write");
        fs::set_permissions(p("rootonly"), fs::Permissions::from_mode(0o600)).expect("chmod");
        let as_nobody = |cmd: &str| {
            Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "sh",
                    "-c",
                    cmd,
                ])
                .output()
                .expect("setpriv")
        };
        let out = as_nobody(&format!("cat {}", p("rootonly").display()));
        assert!(
            !out.status.success(),
            "nobody must not read a 0600 root file"
        );
        assert!(text(&out).contains("Permission denied"), "{}", text(&out));
        let out = as_nobody(&format!("touch {}", p("nobody-file").display()));
        assert!(
            !out.status.success(),
            "nobody must not create in a 0755 root directory"
        );
        fs::create_dir(p("pub")).expect("mkdir");
        fs::set_permissions(p("pub"), fs::Permissions::from_mode(0o1777)).expect("chmod");
        let out = as_nobody(&format!(
            "echo hi > {0}/mine && cat {0}/mine",
            p("pub").display()
        ));
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(fs::metadata(p("pub/mine")).expect("stat").uid(), 65534);
    }

    // Concurrent writers from several threads (several FUSE threads serve them).
    std::thread::scope(|s| {
        for t in 0..6 {
            let dir = p(&format!("par{t}"));
            s.spawn(move || {
                fs::create_dir(&dir).expect("mkdir");
                for i in 0..100 {
                    fs::write(dir.join(format!("{i}")), format!("{t}:{i}")).expect("write");
                }
            });
        }
    });
    for t in 0..6 {
        for i in 0..100 {
            assert_eq!(
                fs::read_to_string(p(&format!("par{t}/{i}"))).expect("read"),
                format!("{t}:{i}")
            );
        }
    }
    m.down();
}

#[test]
fn postmark_to_completion() {
    if !fuse_available("postmark_to_completion") {
        return;
    }
    if !Path::new("/usr/bin/postmark").exists() {
        panic!("postmark is not installed (Debian package postmark)");
    }
    let m = Mounted::new();
    fs::create_dir(m.path("pm")).expect("mkdir");
    let t = Instant::now();
    let mut child = Command::new("/usr/bin/postmark")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start postmark");
    let script = format!(
        "set location {}\nset number 500\nset transactions 2000\nrun\nquit\n",
        m.path("pm").display()
    );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("feed postmark");
    let out = child.wait_with_output().expect("postmark");
    let report = text(&out);
    assert!(out.status.success(), "postmark failed: {report}");
    assert!(
        report.contains("Deleting files...Done") && report.contains("Time:"),
        "postmark did not finish: {report}"
    );
    assert_eq!(
        fs::read_dir(m.path("pm")).expect("readdir").count(),
        0,
        "postmark removes its files"
    );
    eprintln!("postmark (500 files, 2000 transactions): {:?}", t.elapsed());
    m.down();
}

#[test]
fn state_persists_across_down_and_up() {
    if !fuse_available("state_persists_across_down_and_up") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    let xdg = tmp.path().join("xdg");
    fs::create_dir(&mnt).expect("mkdir");
    let m = Mounted::at(&mnt, &xdg, None, &[]).expect("first up");
    assert!(
        m.up_output.contains("data:"),
        "up says where the data lives: {}",
        m.up_output
    );
    assert!(
        m.up_output.contains("bftfs down"),
        "up says how to stop: {}",
        m.up_output
    );
    fs::create_dir_all(m.path("etc/conf.d")).expect("mkdir");
    fs::write(m.path("etc/conf.d/a.conf"), b"persist me").expect("write");
    std::os::unix::fs::symlink("conf.d/a.conf", m.path("etc/link")).expect("symlink");
    fs::hard_link(m.path("etc/conf.d/a.conf"), m.path("etc/hard")).expect("link");
    fs::set_permissions(
        m.path("etc/conf.d/a.conf"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let before = describe(&mnt);
    m.down();
    assert_eq!(
        fs::read_dir(&mnt).expect("readdir").count(),
        0,
        "nothing left behind in the mount point"
    );

    let m = Mounted::at(&mnt, &xdg, None, &[]).expect("second up");
    assert_eq!(describe(&mnt), before);
    assert_eq!(fs::metadata(m.path("etc/hard")).expect("stat").nlink(), 2);
    m.down();
}

#[test]
fn foreground_up_stops_cleanly_on_ctrl_c() {
    if !fuse_available("foreground_up_stops_cleanly_on_ctrl_c") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let mut child = Command::new(common::BFTFS)
        .args(["up".as_ref(), mnt.as_os_str(), "--f".as_ref(), "0".as_ref()])
        .env("XDG_DATA_HOME", tmp.path().join("xdg"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bftfs up");
    let mounted = common::wait_until(std::time::Duration::from_secs(20), || is_mounted(&mnt));
    if !mounted {
        let _ = child.kill();
        panic!("bftfs up did not mount");
    }
    fs::write(mnt.join("f"), b"x").expect("write");
    let pid = i32::try_from(child.id()).expect("pid");
    assert!(send_signal(pid, Signal::SIGINT));
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "exit status after Ctrl-C: {}",
        out.status
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Ctrl-C"),
        "tells how to stop"
    );
    assert!(!is_mounted(&mnt), "unmounted after Ctrl-C");
    assert_eq!(fs::read_dir(&mnt).expect("readdir").count(), 0);
}

#[test]
fn recovers_from_a_killed_client() {
    if !fuse_available("recovers_from_a_killed_client") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    let xdg = tmp.path().join("xdg");
    fs::create_dir(&mnt).expect("mkdir");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = bftfs(args, &xdg);
        (out.status.success(), text(&out))
    };
    let kill_server = |m: &Mounted| {
        let pid = m.server_pid().expect("pid file");
        assert!(send_signal(pid, Signal::SIGKILL));
        assert!(common::wait_until(
            std::time::Duration::from_secs(10),
            || { errno_of(fs::metadata(&m.mnt)) == libc::ENOTCONN }
        ));
    };
    let m = Mounted::at(&mnt, &xdg, None, &[]).expect("up");
    let mut f = fs::File::create(m.path("synced")).expect("create");
    f.write_all(b"durable").expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    kill_server(&m);
    // The dead mount is detached by the next `up`, which says so.
    std::mem::forget(m);
    let m = Mounted::at(&mnt, &xdg, None, &[]).expect("up after a crash");
    assert!(
        m.up_output.contains("bftfs process that is gone")
            && m.up_output.contains("detached that mount"),
        "{}",
        m.up_output
    );
    assert_eq!(
        fs::read(m.path("synced")).expect("fsynced data survives"),
        b"durable"
    );
    // `down` also cleans up after a dead client.
    kill_server(&m);
    let (ok, msg) = run(&["down".as_ref(), mnt.as_os_str()]);
    assert!(ok, "down after a crash: {msg}");
    assert!(!is_mounted(&mnt));
    std::mem::forget(m);
}

#[test]
fn keygen_writes_a_cluster_config_and_private_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("keys");
    let args: Vec<&std::ffi::OsStr> = vec![
        "keygen".as_ref(),
        "--out".as_ref(),
        out_dir.as_os_str(),
        "--clients".as_ref(),
        "2".as_ref(),
    ];
    let out = bftfs(&args, tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    for name in [
        "cluster.json",
        "replica-0.json",
        "replica-3.json",
        "client-1.json",
        "client-2.json",
    ] {
        let meta = fs::metadata(out_dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = if name == "cluster.json" { 0o644 } else { 0o600 };
        assert_eq!(meta.permissions().mode() & 0o777, want, "{name}");
    }
    assert!(fs::read_to_string(out_dir.join("cluster.json"))
        .expect("read")
        .contains("127.0.0.1:7003"));
    let again = bftfs(&args, tmp.path());
    assert!(
        !again.status.success() && text(&again).contains("never overwrites"),
        "{}",
        text(&again)
    );
    let bad = bftfs(
        &[
            "keygen".as_ref(),
            "--out".as_ref(),
            tmp.path().join("k2").as_os_str(),
            "--replica".as_ref(),
            "h:1".as_ref(),
        ],
        tmp.path(),
    );
    assert!(
        !bad.status.success() && text(&bad).contains("4 replicas"),
        "{}",
        text(&bad)
    );
}

#[test]
fn bad_input_one_sentence_each() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let xdg = tmp.path().join("xdg");
    let run = |args: &[&str]| {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|s| std::ffi::OsStr::new(*s)).collect();
        let out = bftfs(&args, &xdg);
        (out.status.success(), text(&out))
    };
    let root = tmp.path().to_str().expect("utf-8 temp path");
    let fuse = fuse_available("bad_input_one_sentence_each (mounting parts)");

    let (ok, msg) = run(&["up", &format!("{root}/missing"), "--f", "0"]);
    if fuse {
        assert!(!ok && msg.contains("does not exist"), "{msg}");
    }
    fs::create_dir(tmp.path().join("full")).expect("mkdir");
    fs::write(tmp.path().join("full/x"), b"").expect("write");
    let (ok, msg) = run(&["up", &format!("{root}/full"), "--f", "0"]);
    if fuse {
        assert!(!ok && msg.contains("not empty"), "{msg}");
    }
    fs::create_dir(tmp.path().join("mnt")).expect("mkdir");
    let (ok, msg) = run(&["up", &format!("{root}/mnt"), "--f", "0", "-o", "frobnicate"]);
    assert!(!ok && msg.contains("unknown mount option"), "{msg}");
    let (ok, msg) = run(&["down", &format!("{root}/mnt")]);
    assert!(
        !ok && msg.contains("nothing started by `bftfs up`"),
        "{msg}"
    );
    let (ok, msg) = run(&["umount", &format!("{root}/mnt")]);
    if nix::unistd::geteuid().is_root() {
        assert!(!ok && msg.contains("not a mount point"), "{msg}");
    } else {
        assert!(!ok, "{msg}");
    }
    for (ok, msg) in [
        run(&["status", "--config", "x"]),
        run(&["mount", "cfg", &format!("{root}/mnt")]),
    ] {
        assert!(
            !ok && msg.contains("cannot read the cluster config"),
            "{msg}"
        );
    }
    fs::write(tmp.path().join("bad.json"), b"{\"f\": 1}").expect("write");
    let (ok, msg) = run(&["status", "--config", &format!("{root}/bad.json")]);
    assert!(
        !ok && msg.contains("is not a valid cluster config"),
        "{msg}"
    );
    let (ok, msg) = run(&["--help"]);
    assert!(
        ok && msg.contains("up") && msg.contains("down") && msg.contains("umount"),
        "{msg}"
    );

    if !fuse {
        return;
    }
    // A data directory that belongs to another cluster.
    let other = tmp.path().join("other-cluster");
    fs::create_dir(&other).expect("mkdir");
    fs::write(
        other.join("BFTFS_CLUSTER"),
        "format=1\ncluster_id=abc\nf=1\n",
    )
    .expect("marker");
    let (ok, msg) = run(&[
        "up",
        &format!("{root}/mnt"),
        "--f",
        "0",
        "--data-dir",
        other.to_str().expect("utf-8"),
    ]);
    assert!(!ok && msg.contains("belongs to another cluster"), "{msg}");
    // Already mounted; status while mounted; then a clean down.
    let m = Mounted::at(&tmp.path().join("mnt"), &xdg, None, &[]).expect("up");
    let (ok, msg) = run(&["up", &format!("{root}/mnt"), "--f", "0", "--detach"]);
    assert!(!ok && (msg.contains("already")), "{msg}");
    let (ok, msg) = run(&["status", &format!("{root}/mnt"), "--json"]);
    assert!(
        ok && msg.contains("\"mounted\":true") && msg.contains("\"health\":\"ok\""),
        "{msg}"
    );
    assert!(is_mounted(&m.mnt));
    m.down();
}

/// fallocate(2) on `f`: Ok or the errno.
fn fallocate(f: &fs::File, mode: i32, offset: i64, len: i64) -> i32 {
    use std::os::fd::AsRawFd;
    // SAFETY: plain system call on an open descriptor.
    last_errno(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, len) })
}

/// copy_file_range(2) with explicit offsets: the count or the errno (negated).
fn copy_range(src: &fs::File, at: i64, dst: &fs::File, to: i64, len: usize) -> isize {
    use std::os::fd::AsRawFd;
    let (mut at, mut to) = (at, to);
    // SAFETY: both offsets point at live i64s the call may advance.
    let n = unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut at, dst.as_raw_fd(), &mut to, len, 0)
    };
    if n < 0 {
        -(std::io::Error::last_os_error().raw_os_error().unwrap_or(1) as isize)
    } else {
        n
    }
}

#[test]
fn fallocate_and_copy_file_range() {
    if !fuse_available("fallocate_and_copy_file_range") {
        return;
    }
    let m = Mounted::new();
    let p = |r: &str| m.path(r);
    let mut rng = Rng::new(0x5eed);
    let data = rng.bytes(200_000);
    fs::write(p("f"), &data).expect("write");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("f"))
        .expect("open");
    let (keep, punch, zero) = (
        libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_PUNCH_HOLE,
        libc::FALLOC_FL_ZERO_RANGE,
    );

    // A hole across a chunk boundary, unaligned at both ends.
    assert_eq!(fallocate(&f, punch | keep, 60_001, 10_000), 0);
    let mut want = data.clone();
    want[60_001..70_001].fill(0);
    assert_eq!(fs::read(p("f")).expect("read"), want);
    // A zero range past the end grows the file; with KEEP_SIZE it does not.
    assert_eq!(fallocate(&f, zero, 190_000, 50_000), 0);
    want[190_000..].fill(0);
    want.resize(240_000, 0);
    assert_eq!(fs::read(p("f")).expect("read"), want);
    assert_eq!(fallocate(&f, zero | keep, 239_990, 1 << 20), 0);
    want[239_990..].fill(0);
    assert_eq!(fs::read(p("f")).expect("read"), want);
    // A reservation past the end with KEEP_SIZE leaves size and blocks as they were.
    let before = f.metadata().expect("fstat");
    assert_eq!(fallocate(&f, keep, 0, 4 << 20), 0);
    let after = f.metadata().expect("fstat");
    assert_eq!(
        (after.len(), after.blocks()),
        (before.len(), before.blocks())
    );
    // posix_fallocate grows the file with zeros.
    use std::os::fd::AsRawFd;
    // SAFETY: plain call on an open descriptor.
    assert_eq!(
        unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 300_000) },
        0
    );
    want.resize(300_000, 0);
    assert_eq!(fs::read(p("f")).expect("read"), want);
    // Modes the file system lacks, and bad arguments.
    assert_eq!(
        fallocate(&f, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096),
        libc::EOPNOTSUPP
    );
    assert_eq!(fallocate(&f, punch, 0, 10), libc::EOPNOTSUPP);
    assert_eq!(fallocate(&f, 0, 0, 0), libc::EINVAL);
    let ro = fs::File::open(p("f")).expect("open read-only");
    assert_eq!(fallocate(&ro, punch | keep, 0, 10), libc::EBADF);
    assert_eq!(fs::read(p("f")).expect("read"), want);

    // copy_file_range between files: counted, short at the end of the source.
    let g = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("g"))
        .expect("create");
    assert_eq!(copy_range(&f, 1_000, &g, 5_000, 100_000), 100_000);
    assert_eq!(copy_range(&f, 299_000, &g, 200_000, 50_000), 1_000);
    assert_eq!(copy_range(&f, 300_000, &g, 0, 10), 0);
    let mut gwant = vec![0; 5_000];
    gwant.extend_from_slice(&want[1_000..101_000]);
    gwant.resize(200_000, 0);
    gwant.extend_from_slice(&want[299_000..300_000]);
    assert_eq!(fs::read(p("g")).expect("read"), gwant);
    // Within one file: apart is fine, overlapping is EINVAL.
    assert_eq!(copy_range(&g, 0, &g, 150_000, 10_000), 10_000);
    gwant.copy_within(0..10_000, 150_000);
    assert_eq!(
        copy_range(&g, 0, &g, 5_000, 10_000),
        -(libc::EINVAL as isize)
    );
    assert_eq!(fs::read(p("g")).expect("read"), gwant);
    // Into a file opened read-only: EBADF; from a directory: EISDIR.
    assert_eq!(copy_range(&f, 0, &ro, 0, 10), -(libc::EBADF as isize));
    let dir = fs::File::open(m.path("")).expect("open the root");
    assert_eq!(copy_range(&dir, 0, &g, 0, 10), -(libc::EISDIR as isize));

    // A large copy is done by the replicas in pieces of at most 8 MiB (not by the kernel's
    // fallback through the client, which would copy it whole): the first call is short.
    let big = rng.bytes(10 << 20);
    fs::write(p("big"), &big).expect("write big");
    let src = fs::File::open(p("big")).expect("open big");
    let dst = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("big2"))
        .expect("create big2");
    let first = copy_range(&src, 0, &dst, 0, big.len());
    assert_eq!(first, 8 << 20, "one replicated copy of COPY_MAX bytes");
    let mut done = first as usize;
    while done < big.len() {
        let n = copy_range(&src, done as i64, &dst, done as i64, big.len() - done);
        assert!(n > 0, "copy_file_range: {n}");
        done += n as usize;
    }
    assert!(
        fs::read(p("big2")).expect("read big2") == big,
        "big copy differs"
    );
    drop((f, g, ro, dir, src, dst));
    m.down();
}

#[test]
fn unlinked_open_file_has_no_links() {
    if !fuse_available("unlinked_open_file_has_no_links") {
        return;
    }
    let m = Mounted::new();
    let p = |r: &str| m.path(r);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("f"))
        .expect("create");
    f.write_all(b"still here").expect("write");
    assert_eq!(f.metadata().expect("fstat").nlink(), 1);
    fs::remove_file(p("f")).expect("unlink");
    assert_eq!(
        f.metadata().expect("fstat").nlink(),
        0,
        "fstat after unlink"
    );
    // Still usable, and still without links after a change of its attributes.
    f.write_all(b", and more").expect("write after unlink");
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .expect("fchmod after unlink");
    let meta = f.metadata().expect("fstat");
    assert_eq!((meta.nlink(), meta.len()), (0, 20));
    let mut back = String::new();
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_string(&mut back).expect("read after unlink");
    assert_eq!(back, "still here, and more");
    // Replaced by a rename: the same.
    fs::write(p("g"), b"old").expect("write");
    let g = fs::File::open(p("g")).expect("open");
    fs::write(p("g.new"), b"new").expect("write");
    fs::rename(p("g.new"), p("g")).expect("rename over an open file");
    assert_eq!(g.metadata().expect("fstat").nlink(), 0);
    assert_eq!(fs::metadata(p("g")).expect("stat").nlink(), 1);
    // A file with another name keeps that link.
    fs::write(p("h"), b"h").expect("write");
    fs::hard_link(p("h"), p("h2")).expect("link");
    let h = fs::File::open(p("h")).expect("open");
    fs::remove_file(p("h")).expect("unlink one name");
    assert_eq!(h.metadata().expect("fstat").nlink(), 1);
    drop((f, g, h));
    // The hidden names go with the last close.
    assert!(common::wait_until(
        std::time::Duration::from_secs(10),
        || {
            let mut names: Vec<String> = fs::read_dir(m.path(""))
                .expect("readdir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names == ["g", "h2"]
        }
    ));
    m.down();
}

#[test]
fn statfs_names_and_link_max() {
    if !fuse_available("statfs_names_and_link_max") {
        return;
    }
    // 130,000 links and directories: unreplicated and on tmpfs where there is one, so that
    // this takes seconds. The limit is the service's, and the errno the adapter's; neither
    // depends on replication.
    let tmp = tempfile::tempdir().expect("tempdir");
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    let data = shm.as_ref().map_or(tmp.path(), |d| d.path()).join("data");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir mnt");
    let m = Mounted::at(&mnt, &tmp.path().join("xdg"), Some(&data), &["--f", "0"])
        .expect("bftfs up --f 0");
    let p = |r: &str| m.path(r);
    // SAFETY: `s` is plain data that statvfs fills in.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    assert_eq!(
        last_errno(unsafe { libc::statvfs(c(&m.mnt).as_ptr(), &mut s) }),
        0
    );
    assert_eq!(s.f_namemax, 255, "NAME_MAX as ext4");
    assert!(s.f_bsize > 0 && s.f_blocks > 0 && s.f_files > 0);
    // SAFETY: valid path.
    let name_max = unsafe { libc::pathconf(c(&m.mnt).as_ptr(), libc::_PC_NAME_MAX) };
    assert_eq!(name_max, 255);
    // LINK_MAX (65000, as ext4): the link that would make 65001 names fails with EMLINK,
    // as does a subdirectory that would give its parent 65001 links.
    fs::write(p("f"), b"").expect("create");
    fs::create_dir(p("links")).expect("mkdir");
    fs::create_dir(p("dirs")).expect("mkdir");
    let started = Instant::now();
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            let p = &p;
            s.spawn(move || {
                for i in (t..64_999).step_by(threads) {
                    fs::hard_link(p("f"), p(&format!("links/{i}"))).expect("link");
                }
                // 64998 subdirectories give "dirs" 65000 links.
                for i in (t..64_998).step_by(threads) {
                    fs::create_dir(p(&format!("dirs/{i}"))).expect("mkdir");
                }
            });
        }
    });
    eprintln!("129997 links and directories in {:?}", started.elapsed());
    assert_eq!(fs::metadata(p("f")).expect("stat").nlink(), 65_000);
    assert_eq!(
        errno_of(fs::hard_link(p("f"), p("one-too-many"))),
        libc::EMLINK
    );
    assert_eq!(fs::metadata(p("dirs")).expect("stat").nlink(), 65_000);
    assert_eq!(
        errno_of(fs::create_dir(p("dirs/one-too-many"))),
        libc::EMLINK
    );
    // Moving a directory into it is refused the same way; within it, it is not.
    fs::create_dir(p("outside")).expect("mkdir");
    assert_eq!(
        errno_of(fs::rename(p("outside"), p("dirs/outside"))),
        libc::EMLINK
    );
    fs::rename(p("dirs/0"), p("dirs/renamed")).expect("rename within");
    // One name fewer makes room again.
    fs::remove_file(p("links/0")).expect("unlink");
    fs::hard_link(p("f"), p("links/again")).expect("link after unlink");
    m.down();
}
