//! What the kernel may be serving from its own caches, for close-to-open consistency.
//!
//! The kernel keeps directory entries (name → node) for the entry TTL and attributes (size,
//! times, ...) for the attribute TTL, and asks nothing while they last. Another client's
//! changes are invisible to it until then. NFS promises more at open(2): a file opened after
//! another client closed it shows everything that client wrote. To keep that promise the
//! adapter checks, at each open of node N, every name the kernel may have resolved to N
//! without asking (a stale name means the open must be redone by name) and whether N's
//! attributes changed since the kernel was last given them (then they are invalidated).
//!
//! In: every name and attribute handed to the kernel (entry replies, readdirplus, getattr,
//! setattr), every name the kernel drops or moves (unlink, rmdir, rename, a lookup that
//! finds nothing, forget). Out: the names of a node to check at open, and whether a fresh
//! attribute differs from the one the kernel may hold.
//!
//! Two more records keep what the kernel is given consistent with this client's own writes.
//! Attributes can be older than a write this client made (a directory snapshot taken before
//! it, a lookup answered while it was on its way): [`KernelCache::newest`] replaces them with
//! the newest attributes the service returned for this client's own changes, so the kernel is
//! never told a size below bytes it has written. And a node whose data this client changed
//! is never opened with its cached pages kept ([`KernelCache::take_modified`]): the kernel
//! may have ignored attributes that would have dropped them (FUSE discards attributes that
//! were sampled before a write it made completed), so only a fresh start is safe.
//!
//! The names kept for a node are a superset of the kernel's live entries for it: a name is
//! added whenever an entry leaves the adapter and dropped only when the kernel is known to
//! have dropped or replaced it. A superset costs an extra lookup at open; a subset would let
//! a stale name through. Bounded like [`crate::inodes::InodeTable`]: entries go when the
//! kernel forgets the node.

use state_abstraction::fs::{Attr, Handle, Timespec};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

/// A directory entry as the kernel knows it: the directory's handle and the name.
pub type EntryName = (Handle, Vec<u8>);

#[derive(Default)]
struct Inner {
    /// Node id → names the kernel may resolve to it.
    names: HashMap<u64, BTreeSet<EntryName>>,
    /// Name → the node id the kernel last got for it.
    by_name: HashMap<EntryName, u64>,
    /// Node id → the attributes the kernel was last given (atime cleared: reads move it, and
    /// a changed atime alone is no reason to make the kernel ask again).
    attrs: HashMap<u64, Attr>,
    /// Node id → the newest attributes the service returned for this client's own data
    /// writes or size changes.
    own: HashMap<u64, Attr>,
    /// Nodes whose data or size this client changed since an open last dropped their pages.
    modified: HashSet<u64>,
}

#[derive(Default)]
pub struct KernelCache {
    inner: Mutex<Inner>,
}

fn comparable(attr: &Attr) -> Attr {
    Attr {
        atime: Timespec::default(),
        ..attr.clone()
    }
}

impl KernelCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Losing an update only costs an extra check at open (the sets are supersets).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kernel got `dir/name` → `nodeid` (an entry reply or a readdirplus entry); if the
    /// name meant another node before, the kernel replaced that entry.
    pub fn named(&self, dir: Handle, name: &[u8], nodeid: u64) {
        let mut inner = self.lock();
        let key = (dir, name.to_vec());
        if let Some(old) = inner.by_name.insert(key.clone(), nodeid) {
            if old != nodeid {
                remove_name(&mut inner.names, old, &key);
            }
        }
        inner.names.entry(nodeid).or_default().insert(key);
    }

    /// The kernel dropped `dir/name` (unlink, rmdir, a lookup that found nothing) or was told to.
    pub fn unnamed(&self, dir: Handle, name: &[u8]) {
        let mut inner = self.lock();
        let key = (dir, name.to_vec());
        if let Some(old) = inner.by_name.remove(&key) {
            remove_name(&mut inner.names, old, &key);
        }
    }

    /// A rename succeeded: the kernel moved its entry (and dropped the one it replaced).
    pub fn renamed(&self, from: EntryName, to: EntryName) {
        let mut inner = self.lock();
        if let Some(old) = inner.by_name.remove(&to) {
            remove_name(&mut inner.names, old, &to);
        }
        if let Some(moved) = inner.by_name.remove(&from) {
            remove_name(&mut inner.names, moved, &from);
            inner.by_name.insert(to.clone(), moved);
            inner.names.entry(moved).or_default().insert(to);
        }
    }

    /// The kernel forgot the node: it holds no entry and no attributes for it any more.
    pub fn forgotten(&self, nodeid: u64) {
        let mut inner = self.lock();
        for key in inner.names.remove(&nodeid).unwrap_or_default() {
            if inner.by_name.get(&key) == Some(&nodeid) {
                inner.by_name.remove(&key);
            }
        }
        inner.attrs.remove(&nodeid);
        inner.own.remove(&nodeid);
        inner.modified.remove(&nodeid);
    }

    /// This client is changing the data or size of `nodeid` (a write, truncate, fallocate,
    /// copy into it): the next open starts with no cached pages.
    pub fn modified(&self, nodeid: u64) {
        self.lock().modified.insert(nodeid);
    }

    /// Whether `nodeid` was changed here since the last call; the caller drops its pages.
    pub fn take_modified(&self, nodeid: u64) -> bool {
        self.lock().modified.remove(&nodeid)
    }

    /// The service accepted a write (or fallocate, or copy) of this client into `nodeid` and
    /// returned `attr`. Such changes only grow a file, so among several that the agreed time
    /// does not order (one batch, one time) the largest is the latest.
    pub fn wrote(&self, nodeid: u64, attr: &Attr) {
        let mut inner = self.lock();
        let newer = inner
            .own
            .get(&nodeid)
            .is_none_or(|old| (attr.ctime, attr.size) >= (old.ctime, old.size));
        if newer {
            inner.own.insert(nodeid, attr.clone());
        }
    }

    /// This client set the size of `nodeid` (truncate); `attr` is the service's answer. It
    /// comes after every earlier write of this client (the adapter sends a truncate only once
    /// the node's writes are answered), so it replaces what they left.
    pub fn resized(&self, nodeid: u64, attr: &Attr) {
        self.lock().own.insert(nodeid, attr.clone());
    }

    /// `attr` (from any answer of the service), or the attributes of this client's latest own
    /// change if those are newer. Agreed times order changes; at an equal time (one batch)
    /// the larger size wins, so the kernel never shrinks a file under bytes it wrote.
    pub fn newest(&self, nodeid: u64, attr: &Attr) -> Attr {
        match self.lock().own.get(&nodeid) {
            Some(own) if (own.ctime, own.size) > (attr.ctime, attr.size) => own.clone(),
            _ => attr.clone(),
        }
    }

    /// Every name the kernel may resolve to `nodeid` without asking.
    pub fn names_of(&self, nodeid: u64) -> Vec<EntryName> {
        self.lock()
            .names
            .get(&nodeid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The kernel was given `attr` for `nodeid`.
    pub fn gave_attr(&self, nodeid: u64, attr: &Attr) {
        self.lock().attrs.insert(nodeid, comparable(attr));
    }

    /// Whether the kernel may hold attributes for `nodeid` other than `fresh` (unknown
    /// counts as different). Forgets what it held: the caller invalidates them.
    pub fn attr_changed(&self, nodeid: u64, fresh: &Attr) -> bool {
        let mut inner = self.lock();
        if inner.attrs.get(&nodeid) == Some(&comparable(fresh)) {
            return false;
        }
        inner.attrs.remove(&nodeid);
        true
    }
}

fn remove_name(names: &mut HashMap<u64, BTreeSet<EntryName>>, nodeid: u64, key: &EntryName) {
    if let Some(set) = names.get_mut(&nodeid) {
        set.remove(key);
        if set.is_empty() {
            names.remove(&nodeid);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use state_abstraction::fs::FileType;

    fn dir(i: u64) -> Handle {
        Handle {
            index: i,
            generation: 1,
        }
    }

    /// A regular file's attributes for tests (other test modules use it too).
    pub(crate) fn attr(size: u64, atime: u64) -> Attr {
        Attr {
            kind: FileType::Regular,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size,
            blocks: 0,
            rdev: 0,
            fsid: 0,
            fileid: 5,
            generation: 1,
            atime: Timespec::from_nanos(atime),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
        }
    }

    #[test]
    fn names_follow_entries_renames_and_removals() {
        let c = KernelCache::default();
        c.named(dir(0), b"a", 7);
        c.named(dir(0), b"b", 7);
        assert_eq!(c.names_of(7).len(), 2);
        c.renamed((dir(0), b"a".to_vec()), (dir(3), b"c".to_vec()));
        assert_eq!(
            c.names_of(7),
            vec![(dir(0), b"b".to_vec()), (dir(3), b"c".to_vec())]
        );
        // A name looked up again meaning another node moves to that node.
        c.named(dir(0), b"b", 9);
        assert_eq!(c.names_of(7), vec![(dir(3), b"c".to_vec())]);
        assert_eq!(c.names_of(9), vec![(dir(0), b"b".to_vec())]);
        // Renaming over an entry drops the entry replaced.
        c.renamed((dir(3), b"c".to_vec()), (dir(0), b"b".to_vec()));
        assert!(c.names_of(9).is_empty());
        assert_eq!(c.names_of(7), vec![(dir(0), b"b".to_vec())]);
        c.unnamed(dir(0), b"b");
        assert!(c.names_of(7).is_empty());
        c.named(dir(0), b"x", 7);
        c.forgotten(7);
        assert!(c.names_of(7).is_empty());
        // A name kept by another node survives the forget.
        c.named(dir(0), b"y", 9);
        c.forgotten(7);
        assert_eq!(c.names_of(9).len(), 1);
    }

    #[test]
    fn attribute_changes_ignore_atime_and_unknown_counts_as_changed() {
        let c = KernelCache::default();
        assert!(c.attr_changed(5, &attr(4, 0)));
        c.gave_attr(5, &attr(4, 0));
        assert!(!c.attr_changed(5, &attr(4, 99)));
        assert!(c.attr_changed(5, &attr(6, 0)));
        // The kernel's copy is invalidated after a change: unknown until it is given one.
        assert!(c.attr_changed(5, &attr(4, 0)));
    }

    fn at(size: u64, ctime: u64) -> Attr {
        Attr {
            ctime: Timespec::from_nanos(ctime),
            ..attr(size, 0)
        }
    }

    #[test]
    fn own_writes_outrank_older_answers_and_truncates_replace_them() {
        let c = KernelCache::default();
        assert_eq!(c.newest(5, &at(3, 10)), at(3, 10));
        c.wrote(5, &at(100, 20));
        // A snapshot from before the write does not shrink the file.
        assert_eq!(c.newest(5, &at(3, 10)), at(100, 20));
        // Replies of one batch arriving out of order: the larger size stands.
        c.wrote(5, &at(50, 20));
        assert_eq!(c.newest(5, &at(3, 10)), at(100, 20));
        // Anything later from the service wins, another client's truncation included.
        assert_eq!(c.newest(5, &at(1, 30)), at(1, 30));
        // This client's own truncation replaces its writes, even at an equal time.
        c.resized(5, &at(10, 20));
        assert_eq!(c.newest(5, &at(3, 10)), at(10, 20));
        c.forgotten(5);
        assert_eq!(c.newest(5, &at(3, 10)), at(3, 10));
    }

    #[test]
    fn modified_is_taken_once() {
        let c = KernelCache::default();
        assert!(!c.take_modified(4));
        c.modified(4);
        c.modified(4);
        assert!(c.take_modified(4));
        assert!(!c.take_modified(4));
    }
}
