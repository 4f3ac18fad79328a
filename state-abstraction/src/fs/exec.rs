//! The operations: checks made from the wrapper's table (identical on every backend), then the
//! concrete system calls, then the table update.
//!
//! Order of checks (the canonical error when several apply is the first in this order):
//! handles (`Stale`), directory types (`NotDir`), names (`Inval`/`NameTooLong`), search
//! permission on the directory (`Access`), existence (`NoEnt`/`Exist`), write permission on the
//! directory (`Access`), sticky-bit ownership (`Perm`), object types (`IsDir`/`NotDir`),
//! emptiness (`NotEmpty`), limits.
//!
//! Data permission on read and write follows the NFS server convention: the owner may always
//! read and write its file (an open file descriptor outlives a later chmod), others need the
//! mode bits; root may always.

use super::backend::{self, fs_error};
use super::object::*;
use super::ops::*;
use super::{name_error, FileService};
use std::collections::{BTreeMap, BTreeSet};
use std::io;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;
const R: u32 = 4;
pub(super) const W: u32 = 2;
pub(super) const X: u32 = 1;

fn io_err(e: io::Error) -> FsError {
    tracing::warn!(error = %e, "file service: backend failure");
    fs_error(&e)
}

pub(super) fn in_group(c: &Caller, gid: u32) -> bool {
    c.gid == gid || c.groups.contains(&gid)
}

/// Whether `c` has all of `want` (R/W/X bits) on `o` by its mode bits.
pub(super) fn may(o: &Obj, c: &Caller, want: u32) -> bool {
    if c.uid == 0 {
        // Root needs some execute bit to execute a non-directory.
        return want & X == 0 || o.kind == FileType::Directory || o.mode & 0o111 != 0;
    }
    let bits = if c.uid == o.uid {
        (o.mode >> 6) & 7
    } else if in_group(c, o.gid) {
        (o.mode >> 3) & 7
    } else {
        o.mode & 7
    };
    bits & want == want
}

fn may_data(o: &Obj, c: &Caller, want: u32) -> bool {
    c.uid == o.uid || may(o, c, want)
}

/// Sticky directories: only the owner of the entry, the owner of the directory or root may
/// remove or rename it.
fn sticky_ok(dir: &Obj, victim: &Obj, c: &Caller) -> bool {
    dir.mode & S_ISVTX == 0 || c.uid == 0 || c.uid == victim.uid || c.uid == dir.uid
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    match name_error(name) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Linux drops setuid (and setgid when group-executable) when a file is written, truncated or
/// given away, unless root does the writing.
fn kill_suid(mode: u32) -> u32 {
    let mut m = mode & !S_ISUID;
    if m & S_ISGID != 0 && m & 0o010 != 0 {
        m &= !S_ISGID;
    }
    m
}

fn xattr_name_check(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name.contains(&0) {
        return Err(FsError::Inval);
    }
    if name.len() > XATTR_NAME_MAX {
        return Err(FsError::Range);
    }
    Ok(())
}

#[derive(PartialEq)]
enum Ns {
    User,
    Privileged,
}

fn xattr_ns(name: &[u8]) -> Result<Ns, FsError> {
    if name.starts_with(b"user.") && name.len() > 5 {
        Ok(Ns::User)
    } else if (name.starts_with(b"trusted.") && name.len() > 8)
        || (name.starts_with(b"security.") && name.len() > 9)
    {
        Ok(Ns::Privileged)
    } else {
        Err(FsError::NotSupp)
    }
}

/// Whether `c` may get (`want` = R) or set (W) the xattr `name` of `o`: a well-formed name, user
/// xattrs only on files and directories (else `wrong_kind`) and by the permission bits,
/// trusted and security ones by root only.
fn xattr_access(
    o: &Obj,
    c: &Caller,
    name: &[u8],
    want: u32,
    wrong_kind: FsError,
) -> Result<(), FsError> {
    xattr_name_check(name)?;
    match xattr_ns(name)? {
        Ns::User => {
            if o.kind != FileType::Regular && o.kind != FileType::Directory {
                return Err(wrong_kind);
            }
            if !may(o, c, want) {
                return Err(FsError::Access);
            }
        }
        Ns::Privileged => {
            if c.uid != 0 {
                return Err(FsError::Perm);
            }
        }
    }
    Ok(())
}

impl FileService {
    pub(super) fn exec(&mut self, req: &FsRequest, now: Timespec) -> FsResult {
        let c = &req.caller;
        match &req.op {
            FsOp::GetAttr { h } => match self.frozen_root(h.index) {
                Some((root, attr)) if root == *h => Ok(FsReply::Attr(attr)),
                _ => Ok(FsReply::Attr(self.obj(*h)?.attr(h.index))),
            },
            FsOp::SetAttr { h, set } => self.setattr(c, *h, set, now),
            FsOp::Lookup { dir, name } => self.lookup(c, *dir, name),
            FsOp::Access { h, mask } => {
                let o = self.obj(*h)?;
                let granted = [R, W, X]
                    .into_iter()
                    .filter(|b| mask & b != 0 && may(o, c, *b))
                    .fold(0, |a, b| a | b);
                Ok(FsReply::Access { granted })
            }
            FsOp::ReadLink { h } => {
                let o = self.obj(*h)?;
                if o.kind != FileType::Symlink {
                    return Err(FsError::Inval);
                }
                Ok(FsReply::ReadLink {
                    target: o.target.clone(),
                })
            }
            FsOp::Read { h, offset, count } => self.read(c, *h, *offset, *count),
            FsOp::Write { h, offset, data } => self.write(c, *h, *offset, data, now),
            FsOp::Create {
                dir,
                name,
                mode,
                how,
            } => self.create(c, *dir, name, *mode, *how, now),
            FsOp::Mkdir { dir, name, mode } => {
                let d = self.new_entry_checks(c, *dir, name)?;
                if d.nlink >= LINK_MAX {
                    return Err(FsError::MLink);
                }
                self.pool_check()?;
                let fd = self.dir_fd(dir.index).map_err(io_err)?;
                backend::mkdirat(fd, name).map_err(io_err)?;
                self.finish_create(
                    c,
                    *dir,
                    name,
                    FileType::Directory,
                    mode & 0o1777,
                    0,
                    Vec::new(),
                    None,
                    now,
                )
            }
            FsOp::Symlink { dir, name, target } => {
                self.new_entry_checks(c, *dir, name)?;
                if target.is_empty() {
                    return Err(FsError::NoEnt);
                }
                if target.len() > TARGET_MAX {
                    return Err(FsError::NameTooLong);
                }
                if target.contains(&0) {
                    return Err(FsError::Inval);
                }
                self.pool_check()?;
                let fd = self.dir_fd(dir.index).map_err(io_err)?;
                backend::symlinkat(target, fd, name).map_err(io_err)?;
                self.finish_create(
                    c,
                    *dir,
                    name,
                    FileType::Symlink,
                    0o777,
                    0,
                    target.clone(),
                    None,
                    now,
                )
            }
            FsOp::Mknod {
                dir,
                name,
                mode,
                kind,
            } => {
                self.new_entry_checks(c, *dir, name)?;
                let (ft, rdev) = match kind {
                    NodeKind::Fifo => (FileType::Fifo, 0),
                    NodeKind::Socket => (FileType::Socket, 0),
                    NodeKind::CharDevice { rdev } => (FileType::CharDevice, *rdev),
                    NodeKind::BlockDevice { rdev } => (FileType::BlockDevice, *rdev),
                };
                if matches!(
                    kind,
                    NodeKind::CharDevice { .. } | NodeKind::BlockDevice { .. }
                ) && c.uid != 0
                {
                    return Err(FsError::Perm);
                }
                self.pool_check()?;
                // Nodes are data in the abstract state; the mirror tree holds a placeholder.
                let fd = self.dir_fd(dir.index).map_err(io_err)?;
                drop(backend::create_file_at(fd, name).map_err(io_err)?);
                self.finish_create(
                    c,
                    *dir,
                    name,
                    ft,
                    mode & 0o7777,
                    rdev,
                    Vec::new(),
                    None,
                    now,
                )
            }
            FsOp::Remove { dir, name } => self.remove(c, *dir, name, false, now),
            FsOp::Rmdir { dir, name } => self.remove(c, *dir, name, true, now),
            FsOp::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
                no_replace,
            } => self.rename(c, *from_dir, from_name, *to_dir, to_name, *no_replace, now),
            FsOp::Link { h, dir, name } => self.link(c, *h, *dir, name, now),
            FsOp::ReadDir {
                dir,
                cookie,
                count,
                plus,
            } => self.readdir(c, *dir, *cookie, *count, *plus),
            FsOp::StatFs { h } => {
                // Asked on a locked object (the mount's root may be one), statfs answers
                // without the generation check, which would read lock-timeline state, so
                // `df` never revokes a lock.
                if self.masked_by(h.index).is_none() {
                    self.obj(*h)?;
                }
                Ok(FsReply::StatFs(self.statfs()))
            }
            FsOp::Commit { h } => {
                let kind = self.obj(*h)?.kind;
                match kind {
                    FileType::Regular => {
                        backend::fsync(self.file_fd(h.index).map_err(io_err)?).map_err(io_err)?
                    }
                    FileType::Directory => {
                        backend::fsync(self.dir_fd(h.index).map_err(io_err)?).map_err(io_err)?
                    }
                    _ => {}
                }
                Ok(FsReply::Done)
            }
            FsOp::GetXattr { h, name } => {
                let o = self.obj(*h)?;
                xattr_access(o, c, name, R, FsError::NoData)?;
                o.xattrs
                    .get(name)
                    .map(|v| FsReply::Xattr { value: v.clone() })
                    .ok_or(FsError::NoData)
            }
            FsOp::ListXattr { h } => {
                let o = self.obj(*h)?;
                let names = o
                    .xattrs
                    .keys()
                    .filter(|n| c.uid == 0 || xattr_ns(n).is_ok_and(|ns| ns == Ns::User))
                    .cloned()
                    .collect();
                Ok(FsReply::XattrList { names })
            }
            FsOp::SetXattr {
                h,
                name,
                value,
                how,
            } => self.set_xattr(c, *h, name, Some((value, *how)), now),
            FsOp::RemoveXattr { h, name } => self.set_xattr(c, *h, name, None, now),
            FsOp::Fallocate {
                h,
                offset,
                length,
                mode,
            } => self.fallocate(c, *h, *offset, *length, *mode, now),
            FsOp::CopyRange {
                src,
                src_offset,
                dst,
                dst_offset,
                length,
            } => self.copy_range(c, *src, *src_offset, *dst, *dst_offset, *length, now),
            FsOp::Lock { .. }
            | FsOp::Release { .. }
            | FsOp::Renew { .. }
            | FsOp::ListLocks
            | FsOp::Resolve { .. } => self.exec_lock(c, &req.op),
            FsOp::SetRangeLock { .. }
            | FsOp::TestRangeLock { .. }
            | FsOp::DropRangeLocks { .. }
            | FsOp::RenewRangeLocks { .. } => self.exec_range_lock(&req.op),
        }
    }

    pub(super) fn statfs(&self) -> StatFs {
        let (mut used, mut live) = (0u64, 0u64);
        // Masked objects count as they were at their lock's activation: their real values are
        // the lock's, which ordered answers must not depend on.
        if let Some(t) = self.lock_table() {
            for e in &t.locks {
                live += e.frozen_counts.0;
                used += e.frozen_counts.1;
            }
        }
        for (i, s) in self.slots.iter().enumerate() {
            if self.masked_by(i as u64).is_some() {
                continue;
            }
            if let Some(o) = s.live() {
                live += 1;
                if o.kind == FileType::Regular {
                    used += o.size.div_ceil(BLOCK_SIZE);
                }
            }
        }
        let bfree = STATFS_BLOCKS.saturating_sub(used);
        StatFs {
            blocks: STATFS_BLOCKS,
            bfree,
            bavail: bfree,
            files: STATFS_FILES,
            ffree: STATFS_FILES.saturating_sub(live),
            bsize: BLOCK_SIZE as u32,
            namemax: NAME_MAX as u32,
        }
    }

    /// A directory handle's object, which must be a directory.
    fn dir_obj(&self, dir: Handle) -> Result<&Obj, FsError> {
        let d = self.obj(dir)?;
        if d.kind != FileType::Directory {
            return Err(FsError::NotDir);
        }
        Ok(d)
    }

    /// Directory `dir`, once the checks before using its entry `name` pass: `name` is a valid
    /// name and `c` may search the directory.
    fn searchable_dir(&self, c: &Caller, dir: Handle, name: &[u8]) -> Result<&Obj, FsError> {
        let d = self.dir_obj(dir)?;
        check_name(name)?;
        if !may(d, c, X) {
            return Err(FsError::Access);
        }
        Ok(d)
    }

    fn lookup(&self, c: &Caller, dir: Handle, name: &[u8]) -> FsResult {
        let d = self.dir_obj(dir)?;
        let special = name == b"." || name == b"..";
        if !special {
            check_name(name)?;
        }
        if !may(d, c, X) {
            return Err(FsError::Access);
        }
        let i = if name == b"." {
            dir.index
        } else if name == b".." {
            d.parent
        } else {
            *d.entries.get(name).ok_or(FsError::NoEnt)?
        };
        if !special {
            if let Some((handle, attr)) = self.frozen_root(i) {
                return Ok(FsReply::Entry { handle, attr });
            }
        }
        self.guard(i)?;
        Ok(FsReply::Entry {
            handle: self.handle_of(i),
            attr: self.live(i).attr(i),
        })
    }

    /// Checks for making a new entry `name` in `dir`: returns the directory.
    fn new_entry_checks(&self, c: &Caller, dir: Handle, name: &[u8]) -> Result<&Obj, FsError> {
        let d = self.searchable_dir(c, dir, name)?;
        if d.entries.contains_key(name) {
            return Err(FsError::Exist);
        }
        if !may(d, c, W) {
            return Err(FsError::Access);
        }
        if d.entries.len() >= DIR_ENTRIES_MAX {
            return Err(FsError::NoSpc);
        }
        Ok(d)
    }

    /// The table side of creating an object whose concrete node now exists at `dir`/`name`.
    #[allow(clippy::too_many_arguments)]
    fn finish_create(
        &mut self,
        c: &Caller,
        dir: Handle,
        name: &[u8],
        kind: FileType,
        mode: u32,
        rdev: u64,
        target: Vec<u8>,
        verifier: Option<u64>,
        now: Timespec,
    ) -> FsResult {
        let d = self.live(dir.index);
        let setgid_dir = d.mode & S_ISGID != 0;
        let gid = if setgid_dir { d.gid } else { c.gid };
        let mut mode = mode;
        if kind == FileType::Directory && setgid_dir {
            mode |= S_ISGID;
        } else if kind != FileType::Directory
            && mode & S_ISGID != 0
            && c.uid != 0
            && !in_group(c, gid)
        {
            mode &= !S_ISGID;
        }
        let size = match kind {
            FileType::Directory => DIR_SIZE,
            FileType::Symlink => target.len() as u64,
            _ => 0,
        };
        let obj = Obj {
            generation: 0,
            parent: dir.index,
            kind,
            mode,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: c.uid,
            gid,
            size,
            rdev,
            atime: now,
            mtime: now,
            ctime: now,
            verifier,
            xattrs: BTreeMap::new(),
            entries: BTreeMap::new(),
            target,
            links: BTreeSet::from([(dir.index, name.to_vec())]),
            pieces: Vec::new(),
            dirty_chunks: BTreeSet::new(),
            // Looked up when the table is next saved, off the request path.
            ino: 0,
            agreed_time: 0,
            locks: None,
            range_locks: Default::default(),
        };
        self.touch(dir.index)?;
        let i = self.alloc(obj)?;
        let d = self.live_mut(dir.index);
        d.entries.insert(name.to_vec(), i);
        d.mtime = now;
        d.ctime = now;
        if kind == FileType::Directory {
            d.nlink = d.nlink.saturating_add(1);
        }
        Ok(FsReply::Entry {
            handle: self.handle_of(i),
            attr: self.live(i).attr(i),
        })
    }

    fn create(
        &mut self,
        c: &Caller,
        dir: Handle,
        name: &[u8],
        mode: u32,
        how: CreateHow,
        now: Timespec,
    ) -> FsResult {
        let d = self.searchable_dir(c, dir, name)?;
        if let Some(&i) = d.entries.get(name) {
            self.guard(i)?;
            let o = self.live(i);
            let ok = match how {
                CreateHow::Guarded => false,
                CreateHow::Unchecked => o.kind == FileType::Regular,
                CreateHow::Exclusive { verifier } => {
                    o.kind == FileType::Regular && o.verifier == Some(verifier)
                }
            };
            if !ok {
                return Err(FsError::Exist);
            }
            return Ok(FsReply::Entry {
                handle: self.handle_of(i),
                attr: o.attr(i),
            });
        }
        self.new_entry_checks(c, dir, name)?;
        self.pool_check()?;
        let dfd = self.dir_fd(dir.index).map_err(io_err)?;
        let fd = backend::create_file_at(dfd, name).map_err(io_err)?;
        let verifier = match how {
            CreateHow::Exclusive { verifier } => Some(verifier),
            _ => None,
        };
        let r = self.finish_create(
            c,
            dir,
            name,
            FileType::Regular,
            mode & 0o7777,
            0,
            Vec::new(),
            verifier,
            now,
        )?;
        if let FsReply::Entry { handle, .. } = &r {
            self.cache_file_fd(handle.index, fd);
        }
        Ok(r)
    }

    fn setattr(&mut self, c: &Caller, h: Handle, set: &SetAttrs, now: Timespec) -> FsResult {
        let o = self.obj(h)?;
        let root = c.uid == 0;
        let owner = root || c.uid == o.uid;
        if let Some(size) = set.size {
            if o.kind == FileType::Directory {
                return Err(FsError::IsDir);
            }
            if o.kind != FileType::Regular {
                return Err(FsError::Inval);
            }
            if size > MAX_FILE_SIZE {
                return Err(FsError::FBig);
            }
            if !may_data(o, c, W) {
                return Err(FsError::Access);
            }
        }
        if let Some(uid) = set.uid {
            if !(root || c.uid == o.uid && uid == o.uid) {
                return Err(FsError::Perm);
            }
        }
        if let Some(gid) = set.gid {
            if !(root || c.uid == o.uid && (gid == o.gid || in_group(c, gid))) {
                return Err(FsError::Perm);
            }
        }
        if set.mode.is_some() && !owner {
            return Err(FsError::Perm);
        }
        for t in [set.atime, set.mtime].into_iter().flatten() {
            match t {
                SetTime::At(_) if !owner => return Err(FsError::Perm),
                SetTime::Now if !owner && !may(o, c, W) => return Err(FsError::Access),
                _ => {}
            }
        }
        let kind = o.kind;
        let old_size = o.size;
        let i = h.index;
        if let Some(size) = set.size {
            if size < old_size {
                self.touch_data(i, size, u64::MAX)?;
            } else {
                self.touch(i)?;
            }
            let fd = self.file_fd(i).map_err(io_err)?;
            backend::ftruncate(fd, size).map_err(io_err)?;
            if size > old_size {
                // The old last chunk grows and new chunks of zeros appear.
                self.dirty_range(i, old_size.saturating_sub(1), size);
            } else if size < old_size {
                // The chunk holding the new end shrinks; chunks past it vanish.
                let o = self.live_mut(i);
                let keep = 1 + chunk_count(size) as usize;
                o.pieces.truncate(keep);
                o.dirty_chunks.retain(|&p| (p as usize) < keep);
                if size % CHUNK_SIZE != 0 {
                    self.dirty_range(i, size - 1, size);
                }
            }
        } else {
            self.touch(i)?;
        }
        let o = self.live_mut(i);
        if let Some(size) = set.size {
            o.size = size;
            o.mtime = now;
            if !root {
                o.mode = kill_suid(o.mode);
            }
        }
        let chown = set.uid.is_some() || set.gid.is_some();
        if let Some(uid) = set.uid {
            o.uid = uid;
        }
        if let Some(gid) = set.gid {
            o.gid = gid;
        }
        if let Some(mode) = set.mode {
            let mut m = mode & 0o7777;
            if !root && !in_group(c, o.gid) {
                m &= !S_ISGID;
            }
            o.mode = m;
        } else if chown && kind != FileType::Directory {
            o.mode = kill_suid(o.mode);
        }
        match set.atime {
            Some(SetTime::Now) => o.atime = now,
            Some(SetTime::At(t)) => o.atime = t,
            None => {}
        }
        match set.mtime {
            Some(SetTime::Now) => o.mtime = now,
            Some(SetTime::At(t)) => o.mtime = t,
            None => {}
        }
        o.ctime = now;
        o.verifier = None;
        Ok(FsReply::Attr(o.attr(i)))
    }

    fn read(&self, c: &Caller, h: Handle, offset: u64, count: u32) -> FsResult {
        let o = self.obj(h)?;
        regular_file(o.kind)?;
        if count as u64 > MAX_IO {
            return Err(FsError::Inval);
        }
        if !may_data(o, c, R) {
            return Err(FsError::Access);
        }
        if offset >= o.size {
            return Ok(FsReply::Read {
                data: Vec::new(),
                eof: true,
            });
        }
        let len = (count as u64).min(o.size - offset) as usize;
        let mut data = vec![0; len];
        let fd = self.file_fd(h.index).map_err(io_err)?;
        let n = backend::pread_full(fd, &mut data, offset).map_err(io_err)?;
        if n != len {
            return Err(FsError::Io);
        }
        Ok(FsReply::Read {
            data,
            eof: offset + len as u64 >= o.size,
        })
    }

    fn write(
        &mut self,
        c: &Caller,
        h: Handle,
        offset: u64,
        data: &[u8],
        now: Timespec,
    ) -> FsResult {
        let o = self.obj(h)?;
        regular_file(o.kind)?;
        if data.len() as u64 > MAX_IO {
            return Err(FsError::Inval);
        }
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::FBig)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::FBig);
        }
        if !may_data(o, c, W) {
            return Err(FsError::Access);
        }
        let i = h.index;
        if data.is_empty() {
            return Ok(FsReply::Write {
                count: 0,
                attr: o.attr(i),
            });
        }
        let old_size = o.size;
        self.touch_data(i, offset, end)?;
        let fd = self.file_fd(i).map_err(io_err)?;
        backend::pwrite_full(fd, data, offset).map_err(io_err)?;
        Ok(self.wrote(c, i, old_size, offset, end, now))
    }

    /// The bookkeeping after bytes landed at `[offset, end)` of object `i` (a write or the
    /// destination of a copy): dirty chunks, size, times, setuid dropped as Linux does.
    fn wrote(
        &mut self,
        c: &Caller,
        i: u64,
        old_size: u64,
        offset: u64,
        end: u64,
        now: Timespec,
    ) -> FsReply {
        if offset > old_size {
            // The gap reads as zeros and the old last chunk grows.
            self.dirty_range(i, old_size.saturating_sub(1), offset);
        }
        self.dirty_range(i, offset, end);
        let o = self.live_mut(i);
        o.size = o.size.max(end);
        o.mtime = now;
        o.ctime = now;
        if c.uid != 0 {
            o.mode = kill_suid(o.mode);
        }
        FsReply::Write {
            count: (end - offset) as u32,
            attr: o.attr(i),
        }
    }

    /// fallocate(2). What the abstract state sees is only sizes and bytes: a reservation never
    /// shows (block counts derive from the size), a punched or zeroed range reads as zeros,
    /// and the size changes as Linux says. The backend is asked for the real thing (so space
    /// is reserved where it can be) and the same bytes are reached by other means where it
    /// cannot: tmpfs has no ZERO_RANGE, for one.
    fn fallocate(
        &mut self,
        c: &Caller,
        h: Handle,
        offset: u64,
        length: u64,
        mode: AllocMode,
        now: Timespec,
    ) -> FsResult {
        let o = self.obj(h)?;
        regular_file(o.kind)?;
        if length == 0 {
            return Err(FsError::Inval);
        }
        let end = offset.checked_add(length).ok_or(FsError::FBig)?;
        if !may_data(o, c, W) {
            return Err(FsError::Access);
        }
        let old_size = o.size;
        let new_size = if mode.keeps_size() {
            old_size
        } else {
            old_size.max(end)
        };
        if new_size > MAX_FILE_SIZE {
            return Err(FsError::FBig);
        }
        // Past the largest file nothing can ever be read or written, so a range that keeps
        // the size is cut there rather than refused, and the backend never reserves more.
        let end = end.min(MAX_FILE_SIZE);
        let zero_end = match mode {
            AllocMode::Allocate { .. } => offset,
            AllocMode::PunchHole | AllocMode::ZeroRange { .. } => end.min(old_size),
        };
        let i = h.index;
        if offset < zero_end {
            self.touch_data(i, offset, zero_end)?;
        } else {
            self.touch(i)?;
        }
        let fd = self.file_fd(i).map_err(io_err)?;
        let done = (|| {
            if offset < zero_end {
                backend::zero_range(fd, offset, zero_end)?;
            }
            match mode {
                AllocMode::Allocate { keep_size } | AllocMode::ZeroRange { keep_size }
                    if offset < end =>
                {
                    backend::allocate(fd, offset, end, keep_size)
                }
                _ => Ok(()),
            }
        })();
        if let Err(e) = done {
            // A reservation that failed part way (ENOSPC) may have grown the backend file:
            // the table still says the old size, so the file must too.
            if new_size != old_size {
                let _ = backend::ftruncate(fd, old_size);
            }
            return Err(io_err(e));
        }
        if new_size > old_size {
            // As with an extending truncate: the old last chunk grows, new chunks of zeros.
            self.dirty_range(i, old_size.saturating_sub(1), new_size);
        }
        self.dirty_range(i, offset, zero_end);
        let o = self.live_mut(i);
        o.size = new_size;
        // Linux's file_modified(): every successful fallocate updates both times and drops
        // set-user-id as a write does.
        o.mtime = now;
        o.ctime = now;
        if c.uid != 0 {
            o.mode = kill_suid(o.mode);
        }
        Ok(FsReply::Attr(o.attr(i)))
    }

    /// copy_file_range(2), with Linux's checks in Linux's order
    /// (`generic_copy_file_checks`): types, offsets that wrap, the count cut at the end of the
    /// source and at the largest file, then overlap within one file; then our own cap.
    #[allow(clippy::too_many_arguments)]
    fn copy_range(
        &mut self,
        c: &Caller,
        src: Handle,
        src_offset: u64,
        dst: Handle,
        dst_offset: u64,
        length: u64,
        now: Timespec,
    ) -> FsResult {
        let s = self.obj(src)?;
        let d = self.obj(dst)?;
        if s.kind == FileType::Directory || d.kind == FileType::Directory {
            return Err(FsError::IsDir);
        }
        if s.kind != FileType::Regular || d.kind != FileType::Regular {
            return Err(FsError::Inval);
        }
        // Offsets are signed (loff_t) in Linux, which answers EOVERFLOW here; the kernel checks
        // this before the request is sent, so only a hand-made request sees our EINVAL.
        let wraps = |at: u64| at.checked_add(length).is_none_or(|e| e > i64::MAX as u64);
        if wraps(src_offset) || wraps(dst_offset) {
            return Err(FsError::Inval);
        }
        if !may_data(s, c, R) || !may_data(d, c, W) {
            return Err(FsError::Access);
        }
        let mut count = length.min(s.size.saturating_sub(src_offset));
        if count > 0 && dst_offset >= MAX_FILE_SIZE {
            return Err(FsError::FBig);
        }
        count = count.min(MAX_FILE_SIZE.saturating_sub(dst_offset));
        if src.index == dst.index
            && dst_offset < src_offset + count
            && src_offset < dst_offset + count
        {
            return Err(FsError::Inval);
        }
        let i = dst.index;
        if count == 0 {
            return Ok(FsReply::Write {
                count: 0,
                attr: d.attr(i),
            });
        }
        let count = count.min(COPY_MAX);
        let end = dst_offset + count;
        let old_size = d.size;
        self.touch_data(i, dst_offset, end)?;
        let sfd = self.file_fd(src.index).map_err(io_err)?;
        let dfd = self.file_fd(i).map_err(io_err)?;
        if let Err(e) = backend::copy_range(sfd, src_offset, dfd, dst_offset, count) {
            // Like a failed write, the destination range may be partly copied; its size must
            // still match the table.
            if end > old_size {
                let _ = backend::ftruncate(dfd, old_size);
            }
            return Err(io_err(e));
        }
        Ok(self.wrote(c, i, old_size, dst_offset, end, now))
    }

    /// Remove (`rmdir == false`) or rmdir.
    fn remove(
        &mut self,
        c: &Caller,
        dir: Handle,
        name: &[u8],
        rmdir: bool,
        now: Timespec,
    ) -> FsResult {
        let d = self.searchable_dir(c, dir, name)?;
        let i = *d.entries.get(name).ok_or(FsError::NoEnt)?;
        if !may(d, c, W) {
            return Err(FsError::Access);
        }
        self.guard(i)?;
        let o = self.live(i);
        if !sticky_ok(d, o, c) {
            return Err(FsError::Perm);
        }
        let is_dir = o.kind == FileType::Directory;
        if rmdir && !is_dir {
            return Err(FsError::NotDir);
        }
        if !rmdir && is_dir {
            return Err(FsError::IsDir);
        }
        if is_dir && !o.entries.is_empty() {
            return Err(FsError::NotEmpty);
        }
        let last = is_dir || o.nlink <= 1;
        if last && o.kind == FileType::Regular {
            self.touch_data(i, 0, u64::MAX)?;
        }
        self.touch(dir.index)?;
        self.touch(i)?;
        let dfd = self.dir_fd(dir.index).map_err(io_err)?;
        backend::unlinkat(dfd, name, is_dir).map_err(io_err)?;
        self.unlink_entry(dir.index, name, i, now)?;
        let d = self.live_mut(dir.index);
        d.mtime = now;
        d.ctime = now;
        Ok(FsReply::Done)
    }

    /// The table side of removing entry `name` → `i` from directory `d` (both touched).
    /// Frees `i` when its last link goes.
    fn unlink_entry(&mut self, d: u64, name: &[u8], i: u64, now: Timespec) -> Result<(), FsError> {
        self.live_mut(d).entries.remove(name);
        if self.live(i).kind == FileType::Directory {
            self.live_mut(d).nlink = self.live(d).nlink.saturating_sub(1);
            return self.release(i);
        }
        let o = self.live_mut(i);
        o.links.remove(&(d, name.to_vec()));
        o.nlink = o.nlink.saturating_sub(1);
        o.ctime = now;
        if o.links.is_empty() {
            return self.release(i);
        }
        o.parent = o.links.iter().next().map(|l| l.0).unwrap_or(d);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        c: &Caller,
        from_dir: Handle,
        from_name: &[u8],
        to_dir: Handle,
        to_name: &[u8],
        no_replace: bool,
        now: Timespec,
    ) -> FsResult {
        let fd_ = self.obj(from_dir)?;
        let td = self.obj(to_dir)?;
        if fd_.kind != FileType::Directory || td.kind != FileType::Directory {
            return Err(FsError::NotDir);
        }
        check_name(from_name)?;
        check_name(to_name)?;
        if !may(fd_, c, X) || !may(td, c, X) {
            return Err(FsError::Access);
        }
        let src = *fd_.entries.get(from_name).ok_or(FsError::NoEnt)?;
        let target = td.entries.get(to_name).copied();
        if no_replace && target.is_some() {
            return Err(FsError::Exist);
        }
        self.guard(src)?;
        if let Some(t) = target {
            self.guard(t)?;
        }
        let s = self.live(src);
        let src_is_dir = s.kind == FileType::Directory;
        if src_is_dir {
            // Moving a directory under itself would cut it off from the root. Under a lock
            // the walk ends at the lock's root: every member's parents reach it inside the
            // lock, and `src`, a member, is below it.
            let mut cur = to_dir.index;
            let mut steps = 0;
            loop {
                if cur == src {
                    return Err(FsError::Inval);
                }
                if cur == 0 || Some(cur) == self.scope_lock_root() {
                    break;
                }
                self.guard(cur)?;
                cur = self.live(cur).parent;
                steps += 1;
                if steps > self.slots.len() {
                    // Parents always lead to the root in a consistent table.
                    return Err(FsError::Io);
                }
            }
        }
        if target == Some(src) {
            return Ok(FsReply::Done);
        }
        if !may(fd_, c, W) {
            return Err(FsError::Access);
        }
        if !sticky_ok(fd_, s, c) {
            return Err(FsError::Perm);
        }
        if let Some(t) = target {
            let t = self.live(t);
            let t_is_dir = t.kind == FileType::Directory;
            if src_is_dir && !t_is_dir {
                return Err(FsError::NotDir);
            }
            if !src_is_dir && t_is_dir {
                return Err(FsError::IsDir);
            }
            if !may(td, c, W) {
                return Err(FsError::Access);
            }
            if !sticky_ok(td, t, c) {
                return Err(FsError::Perm);
            }
            if t_is_dir && !t.entries.is_empty() {
                return Err(FsError::NotEmpty);
            }
        } else if !may(td, c, W) {
            return Err(FsError::Access);
        }
        let moves_dir = src_is_dir && from_dir.index != to_dir.index;
        if moves_dir {
            if !may(s, c, W) {
                return Err(FsError::Access);
            }
            if target.is_none() && td.nlink >= LINK_MAX {
                return Err(FsError::MLink);
            }
        }
        if target.is_none() && td.entries.len() >= DIR_ENTRIES_MAX {
            return Err(FsError::NoSpc);
        }

        // Save everything that changes, then do the concrete rename, then the table.
        if let Some(t) = target {
            let tobj = self.live(t);
            if tobj.kind == FileType::Regular && tobj.nlink <= 1 {
                self.touch_data(t, 0, u64::MAX)?;
            }
            self.touch(t)?;
        }
        self.touch(from_dir.index)?;
        self.touch(to_dir.index)?;
        self.touch(src)?;
        let ffd = self.dir_fd(from_dir.index).map_err(io_err)?;
        let tfd = self.dir_fd(to_dir.index).map_err(io_err)?;
        backend::renameat(ffd, from_name, tfd, to_name, false).map_err(io_err)?;
        if let Some(t) = target {
            self.fds.get_mut().files.remove(&t);
            self.unlink_entry(to_dir.index, to_name, t, now)?;
        }
        self.live_mut(from_dir.index).entries.remove(from_name);
        self.live_mut(to_dir.index)
            .entries
            .insert(to_name.to_vec(), src);
        let s = self.live_mut(src);
        s.links.remove(&(from_dir.index, from_name.to_vec()));
        s.links.insert((to_dir.index, to_name.to_vec()));
        s.ctime = now;
        s.parent = if src_is_dir {
            to_dir.index
        } else {
            s.links.iter().next().map(|l| l.0).unwrap_or(to_dir.index)
        };
        if src_is_dir {
            let (f, t) = (from_dir.index, to_dir.index);
            self.live_mut(f).nlink = self.live(f).nlink.saturating_sub(1);
            self.live_mut(t).nlink = self.live(t).nlink.saturating_add(1);
        }
        for d in [from_dir.index, to_dir.index] {
            let d = self.live_mut(d);
            d.mtime = now;
            d.ctime = now;
        }
        Ok(FsReply::Done)
    }

    fn link(&mut self, c: &Caller, h: Handle, dir: Handle, name: &[u8], now: Timespec) -> FsResult {
        let o = self.obj(h)?;
        self.dir_obj(dir)?;
        if o.kind == FileType::Directory {
            return Err(FsError::Perm);
        }
        self.new_entry_checks(c, dir, name)?;
        let o = self.live(h.index);
        if o.nlink >= LINK_MAX {
            return Err(FsError::MLink);
        }
        self.touch(dir.index)?;
        self.touch(h.index)?;
        let (sfd, sname) = self.location(h.index).map_err(io_err)?;
        let dfd = self.dir_fd(dir.index).map_err(io_err)?;
        backend::linkat(sfd, &sname, dfd, name).map_err(io_err)?;
        let d = self.live_mut(dir.index);
        d.entries.insert(name.to_vec(), h.index);
        d.mtime = now;
        d.ctime = now;
        let o = self.live_mut(h.index);
        o.links.insert((dir.index, name.to_vec()));
        o.nlink = o.nlink.saturating_add(1);
        o.ctime = now;
        o.parent = o.links.iter().next().map(|l| l.0).unwrap_or(dir.index);
        Ok(FsReply::Entry {
            handle: h,
            attr: o.attr(h.index),
        })
    }

    fn readdir(&self, c: &Caller, dir: Handle, cookie: u64, count: u32, plus: bool) -> FsResult {
        let d = self.dir_obj(dir)?;
        if !may(d, c, R) {
            return Err(FsError::Access);
        }
        let total = d.entries.len() as u64;
        let skip = cookie.min(total);
        for &i in d.entries.values().skip(skip as usize).take(count as usize) {
            if self.frozen_root(i).is_none() {
                self.guard(i)?;
            }
        }
        let entries: Vec<DirEntry> = d
            .entries
            .iter()
            .skip(skip as usize)
            .take(count as usize)
            .enumerate()
            .map(|(k, (name, &i))| {
                if let Some((handle, attr)) = self.frozen_root(i) {
                    return DirEntry {
                        name: name.clone(),
                        cookie: skip + k as u64 + 1,
                        handle,
                        kind: attr.kind,
                        attr: plus.then_some(attr),
                    };
                }
                let o = self.live(i);
                DirEntry {
                    name: name.clone(),
                    cookie: skip + k as u64 + 1,
                    handle: self.handle_of(i),
                    kind: o.kind,
                    attr: plus.then(|| o.attr(i)),
                }
            })
            .collect();
        let eof = skip + entries.len() as u64 >= total;
        Ok(FsReply::ReadDir { entries, eof })
    }

    fn set_xattr(
        &mut self,
        c: &Caller,
        h: Handle,
        name: &[u8],
        value: Option<(&Vec<u8>, XattrSet)>,
        now: Timespec,
    ) -> FsResult {
        let o = self.obj(h)?;
        xattr_access(o, c, name, W, FsError::Perm)?;
        let exists = o.xattrs.contains_key(name);
        match value {
            Some((v, how)) => {
                if v.len() > XATTR_VALUE_MAX {
                    return Err(FsError::Range);
                }
                match how {
                    XattrSet::Create if exists => return Err(FsError::Exist),
                    XattrSet::Replace if !exists => return Err(FsError::NoData),
                    _ => {}
                }
                let total: usize = o
                    .xattrs
                    .iter()
                    .filter(|(k, _)| k.as_slice() != name)
                    .map(|(k, v)| k.len() + v.len())
                    .sum();
                if total + name.len() + v.len() > XATTR_TOTAL_MAX {
                    return Err(FsError::NoSpc);
                }
                self.touch(h.index)?;
                let o = self.live_mut(h.index);
                o.xattrs.insert(name.to_vec(), v.clone());
                o.ctime = now;
            }
            None => {
                if !exists {
                    return Err(FsError::NoData);
                }
                self.touch(h.index)?;
                let o = self.live_mut(h.index);
                o.xattrs.remove(name);
                o.ctime = now;
            }
        }
        Ok(FsReply::Done)
    }
}

/// Data calls (write, fallocate, copy) take a regular file: EISDIR for a directory, and
/// EINVAL otherwise (Linux says ENODEV for fallocate; the kernel never sends these for a
/// device or fifo, whose opens do not reach the file system).
fn regular_file(kind: FileType) -> Result<(), FsError> {
    match kind {
        FileType::Regular => Ok(()),
        FileType::Directory => Err(FsError::IsDir),
        _ => Err(FsError::Inval),
    }
}
