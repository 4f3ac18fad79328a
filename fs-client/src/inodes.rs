//! FUSE node ids ⇄ abstract handles.
//!
//! The kernel names a file by a 64-bit node id; the service names it by a [`Handle`]
//! `(index, generation)`. Node id 1 is always [`Handle::ROOT`]. Any other handle gets node id
//! `index + 1` when that id is free, so `st_ino` is small and the same across mounts and
//! clients. When a slot is reused (new generation) while the kernel still holds the old object
//! (an open, unlinked file, or a cached inode not yet forgotten), the new object gets an id
//! from a separate range instead: reusing the id would let the kernel's old inode silently read
//! and write the new file. The old one then answers ESTALE from the service, as in NFS.
//!
//! Entries live as long as the kernel holds a reference: every entry reply (lookup, create,
//! mkdir, mknod, symlink, link, readdirplus) counts one lookup, `forget` gives them back, and
//! at zero the entry goes. This is FUSE's own lookup-count protocol, so the table is bounded by
//! the kernel's inode cache.

use state_abstraction::fs::Handle;
use std::collections::HashMap;
use std::sync::Mutex;

pub const ROOT_NODEID: u64 = 1;

/// First node id handed out when `index + 1` is taken. Far above any index a real service
/// reaches, so the two ranges never meet.
const SPILL_BASE: u64 = 1 << 62;

#[derive(Debug)]
struct Node {
    handle: Handle,
    lookups: u64,
}

#[derive(Debug)]
struct Inner {
    by_nodeid: HashMap<u64, Node>,
    by_handle: HashMap<Handle, u64>,
    next_spill: u64,
}

#[derive(Debug)]
pub struct InodeTable {
    inner: Mutex<Inner>,
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

impl InodeTable {
    pub fn new() -> Self {
        let mut by_nodeid = HashMap::new();
        let mut by_handle = HashMap::new();
        // The root is never forgotten: its lookup count is irrelevant.
        by_nodeid.insert(
            ROOT_NODEID,
            Node {
                handle: Handle::ROOT,
                lookups: 1,
            },
        );
        by_handle.insert(Handle::ROOT, ROOT_NODEID);
        InodeTable {
            inner: Mutex::new(Inner {
                by_nodeid,
                by_handle,
                next_spill: SPILL_BASE,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the mount, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle the kernel means by `nodeid`, if the kernel may still use it.
    pub fn handle(&self, nodeid: u64) -> Option<Handle> {
        self.lock().by_nodeid.get(&nodeid).map(|n| n.handle)
    }

    /// Records that an entry for `handle` is being returned to the kernel (one more lookup)
    /// and gives its node id.
    pub fn remember(&self, handle: Handle) -> u64 {
        let mut inner = self.lock();
        if let Some(&nodeid) = inner.by_handle.get(&handle) {
            if let Some(node) = inner.by_nodeid.get_mut(&nodeid) {
                node.lookups = node.lookups.saturating_add(1);
            }
            return nodeid;
        }
        let preferred = handle.index.checked_add(1).filter(|&n| n < SPILL_BASE);
        let nodeid = match preferred {
            Some(n) if !inner.by_nodeid.contains_key(&n) => n,
            _ => {
                let n = inner.next_spill;
                inner.next_spill += 1;
                n
            }
        };
        inner.by_nodeid.insert(nodeid, Node { handle, lookups: 1 });
        inner.by_handle.insert(handle, nodeid);
        nodeid
    }

    /// The kernel dropped `count` references to `nodeid`.
    pub fn forget(&self, nodeid: u64, count: u64) {
        if nodeid == ROOT_NODEID {
            return;
        }
        let mut inner = self.lock();
        let gone = match inner.by_nodeid.get_mut(&nodeid) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(count);
                (node.lookups == 0).then_some(node.handle)
            }
            None => None,
        };
        if let Some(handle) = gone {
            inner.by_nodeid.remove(&nodeid);
            inner.by_handle.remove(&handle);
        }
    }

    /// The node id the kernel holds for `handle`, if any (no lookup is counted).
    pub fn find(&self, handle: Handle) -> Option<u64> {
        self.lock().by_handle.get(&handle).copied()
    }

    /// The inode number to show for `handle` in a plain readdir (no lookup is counted there).
    pub fn display_ino(&self, handle: Handle) -> u64 {
        match self.lock().by_handle.get(&handle) {
            Some(&n) => n,
            None => handle.index.saturating_add(1),
        }
    }

    /// Number of node ids the kernel holds (root included).
    pub fn node_count(&self) -> usize {
        self.lock().by_nodeid.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(index: u64, generation: u64) -> Handle {
        Handle { index, generation }
    }

    #[test]
    fn root_is_one_and_never_forgotten() {
        let t = InodeTable::new();
        assert_eq!(t.handle(1), Some(Handle::ROOT));
        assert_eq!(t.remember(Handle::ROOT), 1);
        t.forget(1, 100);
        assert_eq!(t.handle(1), Some(Handle::ROOT));
    }

    #[test]
    fn index_plus_one_and_lookup_counting() {
        let t = InodeTable::new();
        assert_eq!(t.remember(h(5, 1)), 6);
        assert_eq!(t.remember(h(5, 1)), 6);
        t.forget(6, 1);
        assert_eq!(t.handle(6), Some(h(5, 1)));
        t.forget(6, 1);
        assert_eq!(t.handle(6), None);
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn reused_slot_while_old_is_held_gets_another_id() {
        let t = InodeTable::new();
        assert_eq!(t.remember(h(5, 1)), 6);
        let other = t.remember(h(5, 2));
        assert!(other >= SPILL_BASE);
        assert_eq!(t.handle(6), Some(h(5, 1)));
        assert_eq!(t.handle(other), Some(h(5, 2)));
        // Once the old one is forgotten, a later object in the slot gets index + 1 again,
        // but the live new object keeps the id the kernel knows.
        t.forget(6, 1);
        assert_eq!(t.remember(h(5, 2)), other);
        assert_eq!(t.remember(h(5, 3)), 6);
    }

    #[test]
    fn display_ino_does_not_count() {
        let t = InodeTable::new();
        assert_eq!(t.display_ino(h(9, 1)), 10);
        assert_eq!(t.handle(10), None);
    }

    #[test]
    fn forget_of_unknown_is_ignored() {
        let t = InodeTable::new();
        t.forget(12345, 3);
        assert_eq!(t.node_count(), 1);
    }
}
