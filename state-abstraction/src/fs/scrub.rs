//! Scrubbing: finding stored file data that no longer matches its recorded digests (a bad
//! disk, or someone writing behind the service's back).
//!
//! The digests of an object are recomputed only for what a request changed, so damage to
//! data at rest would otherwise go unseen: the replica would keep announcing the correct
//! checkpoint digest over wrong bytes, and serve them. At every checkpoint
//! [`FileService::scrub`] re-hashes, from disk, the objects modified since the previous one
//! (their untouched chunks) and a bounded, rotating share of the others. A chunk that does not
//! match is marked stale, so the checkpoint digest now describes what is really on disk: it
//! differs from the one the correct replicas certify, which makes the replica state-transfer
//! the differing objects from them. The kept checkpoint records get the new leaf digest too,
//! since they share the damaged bytes (a state transfer diffs against one of them, and must
//! see the object as different to fetch it).

use super::object::{Slot, CHUNK_SIZE};
use super::{backend, FileService, FileType};
use crate::digest::piece_digest;
use std::collections::BTreeSet;

/// Objects looked at per checkpoint in the rotating share.
const SCRUB_OBJECTS: u64 = 256;
/// Bytes read per checkpoint, modified objects first: a checkpoint costs at most this much
/// reading and hashing however large the state (one object larger than it is still scrubbed
/// when its turn comes, alone, so everything is covered eventually).
const SCRUB_BYTES: u64 = 8 << 20;

impl FileService {
    /// Re-hashes from disk the modified objects and the next share of the others (see the
    /// module doc). Returns the objects found damaged; their stale chunks are marked dirty.
    pub(super) fn scrub(&mut self) -> BTreeSet<u64> {
        let count = self.slots.len() as u64;
        // Masked objects are left out: the ordered digest covers their placeholder, not
        // their bytes (the lock's state digest covers those).
        let regular_size = |svc: &FileService, i: u64| match svc.slots.get(i as usize) {
            _ if svc.masked.contains_key(&i) => None,
            Some(Slot::Live(o)) if o.kind == FileType::Regular => Some(o.size),
            _ => None,
        };
        let mut candidates = BTreeSet::new();
        let mut budget_bytes = SCRUB_BYTES;
        let limit = SCRUB_OBJECTS.min(count);
        let mut looked = 0;
        // One regular file of the rotation whatever its size, so every object gets its turn.
        while looked < limit {
            let i = self.scrub_next % count.max(1);
            self.scrub_next = i + 1;
            looked += 1;
            if let Some(size) = regular_size(self, i) {
                budget_bytes = budget_bytes.saturating_sub(size);
                candidates.insert(i);
                break;
            }
        }
        // Then the modified objects, then more of the rotation, within the budget.
        for &m in self.dirty.iter().filter(|m| **m < count) {
            if let Some(size) = regular_size(self, m) {
                if size <= budget_bytes {
                    budget_bytes -= size;
                    candidates.insert(m);
                }
            }
        }
        while looked < limit {
            let i = self.scrub_next % count.max(1);
            match regular_size(self, i) {
                Some(size) if size > budget_bytes => break,
                Some(size) => {
                    budget_bytes -= size;
                    candidates.insert(i);
                }
                None => {}
            }
            self.scrub_next = i + 1;
            looked += 1;
        }
        let mut damaged = BTreeSet::new();
        let mut buf = Vec::new();
        for i in candidates {
            self.fds.get_mut().trim();
            let Some(Slot::Live(o)) = self.slots.get(i as usize) else {
                continue;
            };
            if o.kind != FileType::Regular {
                continue;
            }
            let (size, chunks) = (o.size, o.chunks());
            if o.pieces.len() != 1 + chunks as usize {
                continue; // resized since its digests were computed: all of it is rehashed
            }
            let mut stale = Vec::new();
            for p in 1..=chunks as u32 {
                if o.dirty_chunks.contains(&p) {
                    continue;
                }
                let start = (p as u64 - 1) * CHUNK_SIZE;
                let len = CHUNK_SIZE.min(size - start) as usize;
                buf.resize(len, 0);
                let read = self
                    .file_fd(i)
                    .and_then(|fd| backend::pread_full(fd, &mut buf, start));
                // A short or failed read is damage too: the refresh then reports the error.
                if !matches!(read, Ok(n) if n == len)
                    || piece_digest(i, p, &buf) != o.pieces[p as usize]
                {
                    stale.push(p);
                }
            }
            if !stale.is_empty() {
                tracing::error!(
                    object = i,
                    chunks = ?stale,
                    "file service: stored data does not match its digest (storage corruption); \
                     the checkpoint digest now describes the disk, and a state transfer will repair it"
                );
                self.corruptions_found += 1;
                self.live_mut(i).dirty_chunks.extend(stale);
                self.dirty.insert(i);
                damaged.insert(i);
            }
        }
        damaged
    }

    /// After the digests of `damaged` objects were recomputed from disk: the kept checkpoints
    /// share those bytes, so their trees get the same leaves.
    pub(super) fn mark_damaged_in_checkpoints(&mut self, damaged: &BTreeSet<u64>) {
        for &i in damaged {
            let Some(leaf) = self.tree.leaf(i) else {
                continue;
            };
            for rec in &mut self.ckpt.records {
                if i < rec.count {
                    rec.tree.set(i, leaf);
                    rec.tree.root();
                }
            }
        }
    }

    /// Damaged objects found by scrubbing since the service was opened.
    pub fn corruptions_found(&self) -> u64 {
        self.corruptions_found
    }
}
