//! Helpers shared by the file-service integration tests.
#![allow(dead_code)]

use state_abstraction::fs::*;
use std::path::{Path, PathBuf};

/// A service with a clock and a caller, so a test reads like a shell session.
pub struct Fs {
    pub svc: FileService,
    pub now: u64,
    pub caller: Caller,
}

impl Fs {
    pub fn open(dir: &Path) -> Fs {
        Fs {
            svc: FileService::open(dir).expect("open"),
            now: 1_700_000_000_000_000_000,
            caller: Caller::root(),
        }
    }

    pub fn run(&mut self, op: FsOp) -> FsResult {
        self.now += 1_000;
        let req = FsRequest {
            caller: self.caller.clone(),
            op,
        };
        self.svc.apply(&req, self.now)
    }

    pub fn as_user(&mut self, uid: u32, gid: u32, groups: &[u32]) -> &mut Self {
        self.caller = Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        self
    }

    pub fn entry(&mut self, op: FsOp) -> (Handle, Attr) {
        match self.run(op.clone()) {
            Ok(FsReply::Entry { handle, attr }) => (handle, attr),
            other => panic!("{op:?} gave {other:?}"),
        }
    }

    pub fn create(&mut self, dir: Handle, name: &str) -> Handle {
        self.entry(FsOp::Create {
            dir,
            name: name.into(),
            mode: 0o644,
            how: CreateHow::Guarded,
        })
        .0
    }

    pub fn mkdir(&mut self, dir: Handle, name: &str) -> Handle {
        self.entry(FsOp::Mkdir {
            dir,
            name: name.into(),
            mode: 0o755,
        })
        .0
    }

    pub fn lookup(&mut self, dir: Handle, name: &str) -> FsResult {
        self.run(FsOp::Lookup {
            dir,
            name: name.into(),
        })
    }

    /// The handle `name` in `dir` names; panics if the lookup does not find it.
    pub fn handle_of(&mut self, dir: Handle, name: &str) -> Handle {
        self.entry(FsOp::Lookup {
            dir,
            name: name.into(),
        })
        .0
    }

    pub fn attr(&mut self, h: Handle) -> Attr {
        match self.run(FsOp::GetAttr { h }) {
            Ok(FsReply::Attr(a)) => a,
            other => panic!("getattr {h:?}: {other:?}"),
        }
    }

    pub fn write(&mut self, h: Handle, offset: u64, data: &[u8]) {
        match self.run(FsOp::Write {
            h,
            offset,
            data: data.to_vec(),
        }) {
            Ok(FsReply::Write { count, .. }) => assert_eq!(count as usize, data.len()),
            other => panic!("write: {other:?}"),
        }
    }

    pub fn read(&mut self, h: Handle, offset: u64, count: u32) -> Vec<u8> {
        match self.run(FsOp::Read { h, offset, count }) {
            Ok(FsReply::Read { data, .. }) => data,
            other => panic!("read: {other:?}"),
        }
    }

    pub fn names(&mut self, dir: Handle) -> Vec<String> {
        match self.run(FsOp::ReadDir {
            dir,
            cookie: 0,
            count: u32::MAX,
            plus: false,
        }) {
            Ok(FsReply::ReadDir { entries, eof }) => {
                assert!(eof);
                entries
                    .into_iter()
                    .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                    .collect()
            }
            other => panic!("readdir: {other:?}"),
        }
    }

    pub fn digest(&mut self) -> state_abstraction::Digest {
        self.svc.root_digest().expect("digest")
    }
}

/// A fresh directory on the root file system (under the target directory), removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("tmp base");
    tempfile::Builder::new()
        .prefix("bftfs-fs-")
        .tempdir_in(base)
        .expect("tempdir")
}

/// A fresh directory on tmpfs (/dev/shm), if there is one.
pub fn shm_dir() -> Option<tempfile::TempDir> {
    let p = Path::new("/dev/shm");
    if !p.is_dir() {
        return None;
    }
    tempfile::Builder::new()
        .prefix("bftfs-fs-")
        .tempdir_in(p)
        .ok()
}

/// A btrfs file system on a loop device, mounted for the life of the value.
pub struct BtrfsMount {
    base: tempfile::TempDir,
    mnt: PathBuf,
}

impl BtrfsMount {
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// A fresh directory on the btrfs mount.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        std::fs::create_dir_all(&p).expect("dir on btrfs");
        p
    }
}

impl Drop for BtrfsMount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a descriptor (a test that simulates a crash leaks its
            // service on purpose): detach now, the kernel finishes when it is closed.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
        let _ = self.base.path();
    }
}

/// Mounts a fresh btrfs loopback image. `None` (with a message) when that is impossible here,
/// unless `BFTFS_REQUIRE_BTRFS=1`, which makes it a failure.
pub fn btrfs_mount() -> Option<BtrfsMount> {
    let required = std::env::var("BFTFS_REQUIRE_BTRFS").is_ok_and(|v| v == "1");
    match try_btrfs_mount() {
        Ok(m) => Some(m),
        Err(why) => {
            if required {
                panic!("btrfs required (BFTFS_REQUIRE_BTRFS=1) but unavailable: {why}");
            }
            eprintln!("btrfs unavailable, skipping the btrfs backend: {why}");
            None
        }
    }
}

fn try_btrfs_mount() -> Result<BtrfsMount, String> {
    use std::process::Command;
    let base = tempfile::Builder::new()
        .prefix("bftfs-btrfs-")
        .tempdir_in("/var/tmp")
        .map_err(|e| e.to_string())?;
    let img = base.path().join("img");
    let mnt = base.path().join("mnt");
    std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    run(Command::new("truncate").arg("-s").arg("512M").arg(&img))?;
    run(Command::new("mkfs.btrfs").arg("-q").arg(&img))?;
    run(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&img)
        .arg(&mnt))?;
    Ok(BtrfsMount { base, mnt })
}
