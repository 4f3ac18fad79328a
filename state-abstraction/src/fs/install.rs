//! The inverse abstraction function: installing abstract objects into the concrete tree
//! (`put_objs`, and rollback, which installs old values).
//!
//! The objects may come in any order and in several calls (state transfer), so the state
//! between calls can be inconsistent: a directory may name an object that has not arrived, or
//! a live object may be named by no directory yet. Such objects wait in `orphans/`; requests
//! are refused with `Io` until the state is consistent again.
//!
//! Steps: decide every object's new set of names (from all directories' entries in the new
//! table); move every object whose node is replaced or whose names change into `stage/`
//! (directory descriptors opened beforehand keep everything below them reachable); swap the
//! table entries; create or rewrite the nodes of installed objects in `stage/`; move them to
//! their names; delete what is left in `stage/`.

use super::backend;
use super::locks::LockId;
use super::object::{chunk_count, Obj, ObjectHeader, Slot, CHUNK_SIZE};
use super::ops::{FileType, FsError};
use super::{storage, FileService};
use crate::digest::{piece_digest, Digest};
use crate::service::{AbstractObject, ServiceError};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::AsRawFd;

/// A decoded abstract value to install.
pub(super) struct Target {
    pub header: ObjectHeader,
    pub chunks: Vec<Vec<u8>>,
}

impl Target {
    /// Decodes and checks one abstract value from a peer (state transfer, lock content):
    /// a canonical header, and data that matches it.
    pub(super) fn parse(i: u64, o: AbstractObject) -> Result<Target, ServiceError> {
        if i >= INDEX_MAX {
            return Err(ServiceError::BadIndex(i));
        }
        let bad = |why: &str| ServiceError::BadObject {
            index: i,
            why: why.to_string(),
        };
        let mut pieces = o.pieces;
        let first = pieces.first().ok_or_else(|| bad("no header piece"))?;
        let header = ObjectHeader::decode_canonical(first).map_err(|why| bad(&why))?;
        let chunks: Vec<Vec<u8>> = pieces.split_off(1);
        match &header {
            ObjectHeader::LiveRoot(..) | ObjectHeader::LiveRootRanges(..) if i != 0 => {
                return Err(bad("a lock table outside the root"));
            }
            ObjectHeader::Locked { .. } => {
                if i == 0 {
                    return Err(bad("the root cannot be locked"));
                }
                if !chunks.is_empty() {
                    return Err(bad("data on a lock placeholder"));
                }
            }
            ObjectHeader::Free { .. } => {
                if i == 0 {
                    return Err(bad("the root cannot be free"));
                }
                if !chunks.is_empty() {
                    return Err(bad("data on a free slot"));
                }
            }
            ObjectHeader::Live(l)
            | ObjectHeader::LiveRoot(l, _)
            | ObjectHeader::LiveRootRanges(l, ..) => {
                if i == 0 && l.kind != FileType::Directory {
                    return Err(bad("the root must be a directory"));
                }
                if i != 0 && l.agreed_time != 0 {
                    return Err(bad("an agreed time outside the root"));
                }
                if l.kind == FileType::Regular {
                    let n = chunk_count(l.size);
                    if chunks.len() as u64 != n {
                        return Err(bad("wrong number of chunks"));
                    }
                    for (k, c) in chunks.iter().enumerate() {
                        let want = CHUNK_SIZE.min(l.size - k as u64 * CHUNK_SIZE);
                        if c.len() as u64 != want {
                            return Err(bad("wrong chunk length"));
                        }
                    }
                } else if !chunks.is_empty() {
                    return Err(bad("data on a non-file"));
                }
            }
        }
        Ok(Target { header, chunks })
    }
}

/// A concrete name: (directory index, name).
type Link = (u64, Vec<u8>);

/// Largest object index accepted from a peer (the partition tree addresses 2^32).
const INDEX_MAX: u64 = 1 << 32;

#[derive(PartialEq, Clone, Copy)]
enum NodeClass {
    Dir,
    Symlink,
    FileLike,
}

fn class(kind: FileType) -> NodeClass {
    match kind {
        FileType::Directory => NodeClass::Dir,
        FileType::Symlink => NodeClass::Symlink,
        _ => NodeClass::FileLike,
    }
}

fn fs_err(e: FsError) -> ServiceError {
    storage(io::Error::other(format!("file service: {e}")))
}

fn index_name(i: u64) -> Vec<u8> {
    i.to_string().into_bytes()
}

impl FileService {
    pub(super) fn put_objects(
        &mut self,
        objs: Vec<(u64, AbstractObject)>,
    ) -> Result<(), ServiceError> {
        let mut items = BTreeMap::new();
        for (i, o) in objs {
            items.insert(i, Some(Target::parse(i, o)?));
        }
        self.install(items, true)?;
        // A lock whose placeholders are all gone merged at the state fetched.
        self.prune_lock_records();
        Ok(())
    }

    /// Makes the object count `count`: higher slots go (their nodes are removed), missing
    /// ones are added as free slots.
    pub(super) fn resize(&mut self, count: u64) -> Result<(), ServiceError> {
        if count == 0 || count > INDEX_MAX {
            return Err(ServiceError::BadIndex(count));
        }
        let len = self.slots.len() as u64;
        if count > len {
            let items = (len..count)
                .map(|i| {
                    (
                        i,
                        Some(Target {
                            header: ObjectHeader::Free {
                                generation: 0,
                                next_free: None,
                            },
                            chunks: Vec::new(),
                        }),
                    )
                })
                .collect();
            return self.install(items, true);
        }
        if count < len {
            self.install((count..len).map(|i| (i, None)).collect(), true)?;
            self.slots.truncate(count as usize);
            self.encoded.truncate(count as usize);
            self.free.retain(|&i| i < count);
            self.masked.retain(|&i, _| i < count);
            self.dirty.retain(|&i| i < count);
            self.orphans.retain(|&i| i < count);
            self.tree.truncate(count);
            // The last remaining free slot's successor changed.
            if let Some(&last) = self.free.iter().next_back() {
                self.dirty.insert(last);
            }
            self.prune_lock_records();
        }
        Ok(())
    }

    /// Installs `items` (`None`: the slot is to disappear, only used by rollback before it
    /// truncates the table). With `cow`, old values are saved for the newest checkpoint first.
    ///
    /// A lock placeholder (`Locked`) masks its slot and leaves the slot's real value and node
    /// alone: that is lock-timeline state, which the ordered state does not describe (the
    /// rollback of a merge re-masks the content the lock merged with; for a state transfer,
    /// content this replica never had is missing, see `lock_timeline.rs`). Any other value
    /// unmasks.
    pub(super) fn install(
        &mut self,
        mut items: BTreeMap<u64, Option<Target>>,
        cow: bool,
    ) -> Result<(), ServiceError> {
        if items.is_empty() {
            return Ok(());
        }
        let locked: BTreeMap<u64, LockId> = items
            .iter()
            .filter_map(|(&i, t)| match t {
                Some(Target {
                    header: ObjectHeader::Locked { lock },
                    ..
                }) => Some((i, *lock)),
                _ => None,
            })
            .collect();
        for i in locked.keys() {
            items.remove(i);
        }
        self.fds.get_mut().trim();
        self.mark_unsaved().map_err(fs_err)?;
        let old_len = self.slots.len() as u64;
        let new_len = items
            .iter()
            .filter(|(_, t)| t.is_some())
            .map(|(i, _)| i + 1)
            .max()
            .unwrap_or(0)
            .max(old_len)
            .max(locked.keys().next_back().map_or(0, |i| i + 1));

        let mut new_free = self.free.clone();
        for (&i, t) in &items {
            match t {
                Some(Target {
                    header: ObjectHeader::Free { .. },
                    ..
                }) if i < new_len => {
                    new_free.insert(i);
                }
                _ => {
                    new_free.remove(&i);
                }
            }
        }
        for i in old_len..new_len {
            if !items.contains_key(&i) {
                new_free.insert(i);
            }
        }
        for i in locked.keys() {
            new_free.remove(i);
        }

        if cow {
            let neighbours: Vec<u64> = self
                .free
                .iter()
                .copied()
                .filter(|i| {
                    !items.contains_key(i)
                        && new_free.contains(i)
                        && self.free.range(i + 1..).next() != new_free.range(i + 1..).next()
                })
                .collect();
            for i in neighbours {
                self.touch(i).map_err(fs_err)?;
            }
            for &i in items.keys().chain(locked.keys()) {
                if i >= old_len {
                    continue;
                }
                let is_file = !self.masked.contains_key(&i)
                    && matches!(&self.slots[i as usize], Slot::Live(o) if o.kind == FileType::Regular);
                if is_file {
                    self.touch_data(i, 0, u64::MAX).map_err(fs_err)?;
                } else {
                    self.touch(i).map_err(fs_err)?;
                }
            }
        }
        // Old values are saved: what is installed now is the object itself.
        for i in items.keys() {
            self.masked.remove(i);
        }

        // The new objects, and every object's new names.
        let mut new_objs: BTreeMap<u64, Obj> = BTreeMap::new();
        for (&i, t) in &items {
            if let Some(o) = t.as_ref().and_then(|t| t.header.clone().into_obj()) {
                new_objs.insert(i, o);
            }
        }
        let live_new = |j: u64, slots: &Vec<Slot>| -> bool {
            match items.get(&j) {
                Some(Some(t)) => t.header.live().is_some(),
                Some(None) => false,
                None => (j as usize) < slots.len() && slots[j as usize].live().is_some(),
            }
        };
        let mut desired: BTreeMap<u64, BTreeSet<(u64, Vec<u8>)>> = BTreeMap::new();
        let mut inconsistent = false;
        for d in 0..new_len {
            let entries = match new_objs.get(&d) {
                Some(o) => &o.entries,
                None if items.contains_key(&d) => continue,
                None => match self.slots.get(d as usize).and_then(Slot::live) {
                    Some(o) => &o.entries,
                    None => continue,
                },
            };
            for (name, &j) in entries {
                if locked.contains_key(&j) && !live_new(j, &self.slots) {
                    // A masked object this replica never had: the ordered state names only
                    // its placeholder, which no ordered request reads, so the rest of the
                    // state is usable. The lock's content is missing here (its state digest
                    // answers `None`); the merge then leaves this replica's digest wrong,
                    // and a state transfer of the merged objects repairs it.
                    continue;
                }
                if j == 0 || j >= new_len || !live_new(j, &self.slots) {
                    inconsistent = true;
                    continue;
                }
                desired.entry(j).or_default().insert((d, name.clone()));
            }
        }
        let old_links = |j: u64, slots: &Vec<Slot>| -> BTreeSet<(u64, Vec<u8>)> {
            slots
                .get(j as usize)
                .and_then(Slot::live)
                .map(|o| o.links.clone())
                .unwrap_or_default()
        };

        // Which nodes move to the stage, which only gain or lose names.
        let empty = BTreeSet::new();
        let mut staged: BTreeSet<u64> = BTreeSet::new();
        let mut relinked: BTreeSet<u64> = BTreeSet::new();
        for j in 1..old_len {
            let Some(o) = self.slots[j as usize].live() else {
                continue;
            };
            let has_node = !o.links.is_empty() || self.orphans.contains(&j);
            if !has_node {
                continue;
            }
            let want = desired.get(&j).unwrap_or(&empty);
            if items.contains_key(&j) {
                staged.insert(j);
            } else if *want != o.links {
                if o.kind == FileType::Directory || want.is_disjoint(&o.links) {
                    staged.insert(j);
                } else {
                    relinked.insert(j);
                }
            }
        }
        // From here on, a node moved to the stage is found there (`self.staged`), so the
        // descriptor caches may be trimmed between steps.
        let meta = self.tree_fd.as_raw_fd();
        backend::remove_tree_at(meta, b"stage").map_err(storage)?;
        backend::mkdirat(meta, b"stage")?;
        let stage = backend::open_dir_at(meta, b"stage")?;
        let orphans = match backend::mkdirat(meta, b"orphans") {
            Ok(()) => backend::open_dir_at(meta, b"orphans")?,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                backend::open_dir_at(meta, b"orphans")?
            }
            Err(e) => return Err(storage(e)),
        };
        let sfd = stage.as_raw_fd();
        let mut missing = Vec::new();
        for &j in &staged {
            self.fds.get_mut().trim();
            let links = old_links(j, &self.slots);
            let mut it = links.iter();
            if let Some((d, name)) = it.next() {
                match backend::renameat(
                    self.dir_fd(*d).map_err(storage)?,
                    name,
                    sfd,
                    &index_name(j),
                    false,
                ) {
                    Ok(()) => {}
                    // After a crash under a lock, the table (saved before later entries ran)
                    // can name a node an entry removed. An item whose whole content is
                    // given is made afresh instead.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) && whole_target(&items, j) => {
                        tracing::warn!(
                            object = j,
                            "file service: a node the table names is gone; made again from its content"
                        );
                        missing.push(j);
                        continue;
                    }
                    Err(e) => return Err(storage(e)),
                }
                for (d2, n2) in it {
                    match backend::unlinkat(self.dir_fd(*d2).map_err(storage)?, n2, false) {
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        other => other?,
                    }
                }
                self.staged.insert(j);
            } else if self.orphans.remove(&j) {
                backend::renameat(
                    orphans.as_raw_fd(),
                    &index_name(j),
                    sfd,
                    &index_name(j),
                    false,
                )?;
                self.staged.insert(j);
            }
        }
        for j in missing {
            staged.remove(&j);
        }
        // For files that keep some names: drop the lost ones now, add the new ones at the end
        // from a kept one.
        let mut relink_plan: Vec<(Link, Vec<Link>)> = Vec::new();
        for &j in &relinked {
            self.fds.get_mut().trim();
            let want = desired.get(&j).unwrap_or(&empty);
            let old = old_links(j, &self.slots);
            for (d, name) in old.difference(want) {
                backend::unlinkat(self.dir_fd(*d).map_err(storage)?, name, false)?;
            }
            if let Some(kept) = old.intersection(want).next() {
                relink_plan.push((kept.clone(), want.difference(&old).cloned().collect()));
            }
        }

        // What the old nodes were, to decide whether a staged node can be reused.
        struct OldNode {
            class: NodeClass,
            target: Vec<u8>,
            clean: Vec<Option<Digest>>,
        }
        let mut old_nodes: BTreeMap<u64, OldNode> = BTreeMap::new();
        for &j in items.keys() {
            if let Some(o) = self.slots.get(j as usize).and_then(Slot::live) {
                let chunks = o.chunks() as usize;
                let clean = o
                    .pieces
                    .iter()
                    .enumerate()
                    .map(|(p, d)| {
                        (p > 0 && p <= chunks && !o.dirty_chunks.contains(&(p as u32)))
                            .then_some(*d)
                    })
                    .collect();
                old_nodes.insert(
                    j,
                    OldNode {
                        class: class(o.kind),
                        target: o.target.clone(),
                        clean,
                    },
                );
            }
            let fds = self.fds.get_mut();
            fds.files.remove(&j);
            if !staged.contains(&j) {
                fds.dirs.remove(&j);
            }
        }

        // Swap the table.
        while (self.slots.len() as u64) < new_len {
            self.slots.push(Slot::Free { generation: 0 });
        }
        for (&i, t) in &items {
            if i >= new_len {
                continue;
            }
            if t.as_ref().is_none_or(|t| t.header.live().is_none()) {
                self.fds.get_mut().forget(i);
            }
            self.slots[i as usize] = match t {
                None => Slot::Free { generation: 0 },
                Some(Target {
                    header: ObjectHeader::Free { generation, .. },
                    ..
                }) => Slot::Free {
                    generation: *generation,
                },
                Some(Target {
                    header:
                        ObjectHeader::Live(_)
                        | ObjectHeader::LiveRoot(..)
                        | ObjectHeader::LiveRootRanges(..),
                    ..
                }) => match new_objs.remove(&i) {
                    Some(o) => Slot::Live(Box::new(o)),
                    None => Slot::Free { generation: 0 },
                },
                Some(Target {
                    header: ObjectHeader::Locked { .. },
                    ..
                }) => unreachable!("placeholders were taken out of the items"),
            };
            self.dirty.insert(i);
        }
        self.free = new_free;
        for (j, s) in self.slots.iter_mut().enumerate() {
            if let Some(o) = s.live_mut() {
                o.links = desired.remove(&(j as u64)).unwrap_or_default();
            }
        }

        // Create or rewrite the installed objects' nodes in the stage.
        for (&i, t) in &items {
            let Some((l, chunks)) = t
                .as_ref()
                .and_then(|t| t.header.live().map(|l| (l, &t.chunks)))
            else {
                continue;
            };
            self.fds.get_mut().trim();
            let name = index_name(i);
            let old = old_nodes.get(&i);
            let reuse = i == 0
                || (staged.contains(&i)
                    && old.is_some_and(|o| {
                        o.class == class(l.kind)
                            && (o.class != NodeClass::Symlink || o.target == l.target)
                    }));
            if i != 0 {
                if !reuse {
                    self.fds.get_mut().dirs.remove(&i);
                    backend::remove_tree_at(sfd, &name).map_err(storage)?;
                    match class(l.kind) {
                        NodeClass::Dir => backend::mkdirat(sfd, &name)?,
                        NodeClass::Symlink => backend::symlinkat(&l.target, sfd, &name)?,
                        NodeClass::FileLike => drop(backend::create_file_at(sfd, &name)?),
                    }
                }
                self.staged.insert(i);
            }
            let ino = if i == 0 {
                backend::fstat(self.root_fd.as_raw_fd())?.st_ino
            } else {
                0
            };
            let mut pieces = vec![Digest::default(); 1 + chunks.len()];
            if l.kind == FileType::Regular {
                let f = backend::open_file_at(sfd, &name)?;
                backend::ftruncate(f.as_raw_fd(), l.size)?;
                for (k, c) in chunks.iter().enumerate() {
                    let d = piece_digest(i, k as u32 + 1, c);
                    let same =
                        reuse && old.and_then(|o| o.clean.get(k + 1).copied().flatten()) == Some(d);
                    if !same {
                        backend::pwrite_full(f.as_raw_fd(), c, k as u64 * CHUNK_SIZE)?;
                    }
                    pieces[k + 1] = d;
                }
            }
            let o = self.live_mut(i);
            o.pieces = pieces;
            o.dirty_chunks.clear();
            o.ino = ino;
        }

        // Put every staged or new node under its names (or among the orphans).
        let mut to_attach: BTreeSet<u64> = staged.clone();
        to_attach.extend(
            items
                .iter()
                .filter(|(_, t)| t.as_ref().is_some_and(|t| t.header.live().is_some()))
                .map(|(i, _)| *i),
        );
        to_attach.remove(&0);
        let mut junk = 0u64;
        for &j in &to_attach {
            self.fds.get_mut().trim();
            let Some(o) = self.slots.get(j as usize).and_then(Slot::live) else {
                continue;
            };
            let is_dir = o.kind == FileType::Directory;
            let mut links: Vec<(u64, Vec<u8>)> = o.links.iter().cloned().collect();
            if is_dir && links.len() > 1 {
                // Only between batches: a directory has one name; it gets the others' turn
                // when the batch that settles it arrives.
                links.truncate(1);
                inconsistent = true;
                self.live_mut(j).links = links.iter().cloned().collect();
            }
            let name = index_name(j);
            let Some((d, n)) = links.first() else {
                backend::renameat(sfd, &name, orphans.as_raw_fd(), &name, false)?;
                self.staged.remove(&j);
                self.orphans.insert(j);
                continue;
            };
            let dfd = self.dir_fd(*d).map_err(storage)?;
            if let Err(e) = backend::renameat(sfd, &name, dfd, n, true) {
                match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        // Something not in the table holds the name: set it aside.
                        junk += 1;
                        backend::renameat(dfd, n, sfd, format!("junk-{junk}").as_bytes(), false)?;
                        backend::renameat(sfd, &name, dfd, n, true)?;
                    }
                    Some(libc::EINVAL) | Some(libc::ELOOP) if is_dir => {
                        // Between batches directories can name each other in a cycle; the
                        // directory waits among the orphans.
                        backend::renameat(sfd, &name, orphans.as_raw_fd(), &name, false)?;
                        self.staged.remove(&j);
                        self.orphans.insert(j);
                        self.live_mut(j).links.clear();
                        inconsistent = true;
                        continue;
                    }
                    _ => return Err(storage(e)),
                }
            }
            self.staged.remove(&j);
            for (d2, n2) in &links[1..] {
                backend::linkat(dfd, n, self.dir_fd(*d2).map_err(storage)?, n2)?;
            }
        }
        for ((sd, sn), additions) in relink_plan {
            let sdfd = self.dir_fd(sd).map_err(storage)?;
            for (d, n) in additions {
                backend::linkat(sdfd, &sn, self.dir_fd(d).map_err(storage)?, &n)?;
            }
        }
        drop(stage);
        // What is left (freed objects, set-aside names) goes; cached descriptors of it too.
        for j in std::mem::take(&mut self.staged) {
            self.fds.get_mut().forget(j);
        }
        backend::remove_tree_at(meta, b"stage").map_err(storage)?;

        // Masked last: the slots exist now (a state transfer may have grown the table).
        for (&i, &lock) in &locked {
            self.masked.insert(i, lock);
            self.free.remove(&i);
            self.dirty.insert(i);
        }
        self.orphans.retain(|&j| {
            (j as usize) < self.slots.len()
                && self.slots[j as usize]
                    .live()
                    .is_some_and(|o| o.links.is_empty())
        });
        for (j, s) in self.slots.iter().enumerate() {
            let Some(o) = s.live() else { continue };
            if j == 0 {
                // The root is its own parent.
                inconsistent |= o.parent != 0;
                continue;
            }
            // Every object is named, and its parent is the directory of its first name (the
            // rule the operations keep), so ".." and subtree checks can trust it.
            match o.links.iter().next() {
                Some((d, _)) => inconsistent |= o.parent != *d,
                None => inconsistent = true,
            }
        }
        self.inconsistent = inconsistent;
        Ok(())
    }
}

/// Whether `items` gives object `j` whole: a directory, a symlink or a file with every
/// chunk of its size (so no old node is needed to make it).
fn whole_target(items: &BTreeMap<u64, Option<Target>>, j: u64) -> bool {
    match items.get(&j) {
        Some(Some(t)) => match t.header.live() {
            Some(l) if l.kind == FileType::Regular => t.chunks.len() as u64 == chunk_count(l.size),
            Some(_) => true,
            None => false,
        },
        _ => false,
    }
}
