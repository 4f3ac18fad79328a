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
        match self.try_create(dir, name, CreateHow::Guarded) {
            Ok(FsReply::Entry { handle, .. }) => handle,
            other => panic!("create {name}: {other:?}"),
        }
    }

    /// A create of mode 0o644.
    pub fn try_create(&mut self, dir: Handle, name: impl AsRef<[u8]>, how: CreateHow) -> FsResult {
        let name = name.as_ref().to_vec();
        let mode = 0o644;
        self.run(FsOp::Create {
            dir,
            name,
            mode,
            how,
        })
    }

    /// The entry a create with `mode` and `how` makes; panics if it fails.
    pub fn create_as(
        &mut self,
        dir: Handle,
        name: impl AsRef<[u8]>,
        mode: u32,
        how: CreateHow,
    ) -> (Handle, Attr) {
        let name = name.as_ref().to_vec();
        self.entry(FsOp::Create {
            dir,
            name,
            mode,
            how,
        })
    }

    pub fn mkdir(&mut self, dir: Handle, name: &str) -> Handle {
        match self.try_mkdir(dir, name) {
            Ok(FsReply::Entry { handle, .. }) => handle,
            other => panic!("mkdir {name}: {other:?}"),
        }
    }

    /// A mkdir of mode 0o755.
    pub fn try_mkdir(&mut self, dir: Handle, name: impl AsRef<[u8]>) -> FsResult {
        let (name, mode) = (name.as_ref().to_vec(), 0o755);
        self.run(FsOp::Mkdir { dir, name, mode })
    }

    pub fn lookup(&mut self, dir: Handle, name: &str) -> FsResult {
        let name = name.into();
        self.run(FsOp::Lookup { dir, name })
    }

    /// The handle `name` in `dir` names; panics if the lookup does not find it.
    pub fn handle_of(&mut self, dir: Handle, name: &str) -> Handle {
        match self.lookup(dir, name) {
            Ok(FsReply::Entry { handle, .. }) => handle,
            other => panic!("lookup {name}: {other:?}"),
        }
    }

    pub fn remove(&mut self, dir: Handle, name: impl AsRef<[u8]>) -> FsResult {
        let name = name.as_ref().to_vec();
        self.run(FsOp::Remove { dir, name })
    }

    /// A rename that may replace its target (`no_replace: false`).
    pub fn rename(
        &mut self,
        from_dir: Handle,
        from_name: impl AsRef<[u8]>,
        to_dir: Handle,
        to_name: impl AsRef<[u8]>,
    ) -> FsResult {
        self.run(FsOp::Rename {
            from_dir,
            from_name: from_name.as_ref().to_vec(),
            to_dir,
            to_name: to_name.as_ref().to_vec(),
            no_replace: false,
        })
    }

    pub fn rmdir(&mut self, dir: Handle, name: impl AsRef<[u8]>) -> FsResult {
        let name = name.as_ref().to_vec();
        self.run(FsOp::Rmdir { dir, name })
    }

    pub fn link(&mut self, h: Handle, dir: Handle, name: impl AsRef<[u8]>) -> FsResult {
        let name = name.as_ref().to_vec();
        self.run(FsOp::Link { h, dir, name })
    }

    pub fn symlink(
        &mut self,
        dir: Handle,
        name: impl AsRef<[u8]>,
        to: impl AsRef<[u8]>,
    ) -> FsResult {
        let (name, target) = (name.as_ref().to_vec(), to.as_ref().to_vec());
        self.run(FsOp::Symlink { dir, name, target })
    }

    pub fn access(&mut self, h: Handle, mask: u32) -> FsResult {
        self.run(FsOp::Access { h, mask })
    }

    pub fn get_xattr(&mut self, h: Handle, name: impl AsRef<[u8]>) -> FsResult {
        let name = name.as_ref().to_vec();
        self.run(FsOp::GetXattr { h, name })
    }

    pub fn set_xattr(&mut self, h: Handle, name: &str, value: &[u8], how: XattrSet) -> FsResult {
        let (name, value) = (name.into(), value.to_vec());
        self.run(FsOp::SetXattr {
            h,
            name,
            value,
            how,
        })
    }

    /// Sets the size alone (truncate or extend).
    pub fn truncate(&mut self, h: Handle, size: u64) -> FsResult {
        let size = Some(size);
        let set = SetAttrs {
            size,
            ..Default::default()
        };
        self.run(FsOp::SetAttr { h, set })
    }

    pub fn remove_xattr(&mut self, h: Handle, name: impl AsRef<[u8]>) -> FsResult {
        let name = name.as_ref().to_vec();
        self.run(FsOp::RemoveXattr { h, name })
    }

    pub fn attr(&mut self, h: Handle) -> Attr {
        match self.run(FsOp::GetAttr { h }) {
            Ok(FsReply::Attr(a)) => a,
            other => panic!("getattr {h:?}: {other:?}"),
        }
    }

    pub fn write(&mut self, h: Handle, offset: u64, data: &[u8]) {
        match self.try_write(h, offset, data) {
            Ok(FsReply::Write { count, .. }) => assert_eq!(count as usize, data.len()),
            other => panic!("write: {other:?}"),
        }
    }

    pub fn try_write(&mut self, h: Handle, offset: u64, data: &[u8]) -> FsResult {
        let data = data.to_vec();
        self.run(FsOp::Write { h, offset, data })
    }

    pub fn read(&mut self, h: Handle, offset: u64, count: u32) -> Vec<u8> {
        match self.try_read(h, offset, count) {
            Ok(FsReply::Read { data, .. }) => data,
            other => panic!("read: {other:?}"),
        }
    }

    pub fn try_read(&mut self, h: Handle, offset: u64, count: u32) -> FsResult {
        self.run(FsOp::Read { h, offset, count })
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

    /// `op` as a replica runs it (`Service::execute`): from authenticated `client`, with
    /// the next agreed time, on the read-only path if `read_only`.
    pub fn execute_as(
        &mut self,
        client: state_abstraction::ClientId,
        op: FsOp,
        read_only: bool,
    ) -> FsResult {
        use state_abstraction::Service;
        self.now += 1_000;
        let req = encode(&FsRequest {
            caller: self.caller.clone(),
            op,
        });
        let reply = self
            .svc
            .execute(&req, client, &encode(&self.now), read_only);
        decode(&reply).expect("a reply decodes")
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

/// A service over a fresh [`temp_dir`], and the directory (keep it alive as long as the
/// service).
pub fn fresh_fs() -> (tempfile::TempDir, Fs) {
    let dir = temp_dir();
    let fs = Fs::open(dir.path());
    (dir, fs)
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
