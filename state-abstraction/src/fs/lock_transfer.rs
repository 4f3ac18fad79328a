//! Lock state transfer (docs/zzyzx-plan.md §5, without lock checkpoints): a replica that got
//! the ordered state by transfer while a lock was active has the lock's placeholders but not
//! its content. It fetches the members' values *as at activation* from a peer that serves
//! the lock, page by page, checks them against the lock's base digest in the ordered table,
//! installs them, and replays the lock's log on them from entry 1.
//!
//! Serving side ([`FileService::lock_base_page_of`]): a member the lock's entries changed has
//! its activation value in the lock's record (header, and the chunks saved copy-on-write);
//! any other member's live value is its activation value. Pages are cut by piece (header,
//! 64 KiB data chunks), so a lock over files of hundreds of MB never needs a large message,
//! and only the chunks of one page are read for it.
//!
//! Fetching side ([`FileService::install_lock_base`]): the objects must be exactly the
//! lock's members and hash to its base digest before anything is installed; afterwards the
//! lock has a record (as if activated here) and the table is saved, so a crash does not
//! leave a log server whose service lacks the content it replays on.

use super::install::Target;
use super::lock_timeline::LockRecord;
use super::locks::{LockEntry, LockId, LockState};
use super::object::{
    chunk_count, ObjectHeader, Slot, BLOCK_SIZE, CHUNK_SIZE, DIR_ENTRIES_MAX, NAME_MAX,
};
use super::ops::FileType;
use super::FileService;
use crate::digest::{object_digest, piece_digest, Hasher};
use crate::locking::{BaseCursor, BasePage, BasePiece, LockInfo};
use crate::service::{AbstractObject, ServiceError};
use std::collections::BTreeMap;

/// Header bytes allowed per member in [`content_bytes_max`]: a member's header is its
/// attributes, extended attributes (at most `XATTR_TOTAL_MAX`), a symbolic link's target and
/// a directory's entries; entries are about one per member, and one directory as large as a
/// directory may be is allowed on top.
const HEADER_BYTES_PER_MEMBER: u64 = 1 << 20;
const ONE_FULL_DIRECTORY: u64 = DIR_ENTRIES_MAX as u64 * (NAME_MAX as u64 + 64);

/// The most bytes lock `e`'s content (its members as at activation) can take in pages:
/// the file data ordering counted at activation (`frozen_counts`, in blocks) and an
/// allowance for the headers. A bound against faulty peers, not an estimate.
fn content_bytes_max(e: &LockEntry) -> u64 {
    e.frozen_counts
        .1
        .saturating_mul(BLOCK_SIZE)
        .saturating_add((e.members as u64).saturating_mul(HEADER_BYTES_PER_MEMBER))
        .saturating_add(ONE_FULL_DIRECTORY)
}

impl FileService {
    /// The locks the ordered state holds as active or frozen (not merged), for a replica
    /// that must learn which lock content it lacks, or a fixed end a state transfer brought.
    pub(super) fn lock_infos_of(&self) -> Vec<LockInfo> {
        let Some(table) = self.lock_table() else {
            return Vec::new();
        };
        table
            .locks
            .iter()
            .filter_map(|e| {
                let frozen = match e.state {
                    LockState::Pending => return None,
                    LockState::Active { .. } => None,
                    LockState::Frozen { end, .. } => Some(end),
                };
                Some(LockInfo {
                    lock: e.id,
                    epoch: e.epoch,
                    holder: e.holder,
                    base: e.base,
                    frozen,
                    members: e.members,
                    bytes_max: content_bytes_max(e),
                })
            })
            .collect()
    }

    /// A page of `lock`'s members as at activation, from `from` on (see the module
    /// documentation). `None` when this replica does not hold the lock's content, or cannot
    /// read it (logged).
    pub(super) fn lock_base_page_of(
        &self,
        lock: LockId,
        from: BaseCursor,
        budget: usize,
    ) -> Option<BasePage> {
        // A record means the content is here (activated here, or found equal to its base);
        // only without one does it take digesting every member, once per page.
        if !self.lock_records.contains_key(&lock) {
            self.lock_state_digest_of(lock)?;
        }
        match self.read_base_page(lock, from, budget) {
            Ok(page) => Some(page),
            Err(e) => {
                tracing::warn!(lock = lock.0, error = %e, "file service: cannot read a lock's content for a peer");
                None
            }
        }
    }

    fn read_base_page(
        &self,
        lock: LockId,
        from: BaseCursor,
        budget: usize,
    ) -> Result<BasePage, ServiceError> {
        let record = self.lock_records.get(&lock);
        let mut page = BasePage::default();
        let mut bytes = 0usize;
        for i in self.lock_members(lock) {
            if i < from.index {
                continue;
            }
            // The record keeps a changed member's activation size beside its header.
            let (header, size, data) = match record.and_then(|r| r.saved.get(&i)) {
                Some(s) => (s.header.clone(), s.size, Some(&s.data)),
                None => {
                    let size = match &self.slots[i as usize] {
                        Slot::Live(o) if o.kind == FileType::Regular => o.size,
                        _ => 0,
                    };
                    (self.real_header_of(i).encode(), size, None)
                }
            };
            let chunks = chunk_count(size);
            let of = 1 + chunks as u32;
            let first = if i == from.index { from.piece } else { 0 };
            if first == 0 {
                if !page.pieces.is_empty() && bytes + header.len() > budget {
                    return Ok(page);
                }
                bytes += header.len();
                page.pieces.push(BasePiece {
                    index: i,
                    piece: 0,
                    of,
                    bytes: header,
                });
            }
            // As many whole chunks as the budget leaves room for (at least one on an empty
            // page), read in one pass. Chunk c is piece c + 1.
            let start = u64::from(first.saturating_sub(1));
            let mut end = start;
            while end < chunks {
                let len = CHUNK_SIZE.min(size - end * CHUNK_SIZE) as usize;
                let nothing_yet = page.pieces.is_empty() && end == start;
                if !nothing_yet && bytes + len > budget {
                    break;
                }
                bytes += len;
                end += 1;
            }
            let read = self.activation_chunk_range(lock, i, size, data, start..end)?;
            for (c, chunk) in (start..end).zip(read) {
                page.pieces.push(BasePiece {
                    index: i,
                    piece: c as u32 + 1,
                    of,
                    bytes: chunk,
                });
            }
            if end < chunks {
                return Ok(page);
            }
        }
        page.done = true;
        Ok(page)
    }

    /// Installs `lock`'s content as at activation, fetched from a peer (see the module
    /// documentation). Refused, with nothing changed, unless the objects are exactly the
    /// members this replica masks for the lock and hash to its base digest. A replica that
    /// already holds the content keeps it.
    pub(super) fn install_lock_base(
        &mut self,
        lock: LockId,
        objects: Vec<(u64, AbstractObject)>,
    ) -> Result<(), ServiceError> {
        let bad = |why: &str| ServiceError::bad_lock_content(lock, why);
        let e = self
            .lock_table()
            .and_then(|t| t.entry(lock))
            .cloned()
            .ok_or_else(|| bad("not in the lock table"))?;
        let activated_seq = match e.state {
            LockState::Pending => return Err(bad("not active")),
            LockState::Active { activated_seq } => activated_seq,
            // Rollback never goes below the checkpoint the content came at, which is this
            // replica's newest (the state transfer's target or later).
            LockState::Frozen { .. } => self.ckpt.list().last().map_or(0, |(s, _)| *s),
        };
        if self.lock_state_digest_of(lock).is_some() {
            return Ok(());
        }
        let members = self.lock_members(lock);
        if members.len() != e.members as usize
            || objects.len() != members.len()
            || objects.iter().zip(&members).any(|((i, _), m)| i != m)
        {
            return Err(bad("the objects are not the lock's members"));
        }
        let mut h = Hasher::new("bftfs.lockstate");
        h.u64(lock.0).u64(e.epoch as u64).u64(members.len() as u64);
        let mut items = BTreeMap::new();
        for (i, o) in objects {
            let pieces: Vec<_> = o
                .pieces
                .iter()
                .enumerate()
                .map(|(p, b)| piece_digest(i, p as u32, b))
                .collect();
            h.u64(i).digest(&object_digest(i, &pieces));
            let t = Target::parse(i, o)?;
            match &t.header {
                ObjectHeader::Live(_) | ObjectHeader::Free { .. } => {}
                _ => return Err(bad("a member that is a placeholder or a root")),
            }
            items.insert(i, Some(t));
        }
        if h.finish() != e.base {
            return Err(bad("the content does not hash to the lock's base digest"));
        }
        self.install(items, false)?;
        self.remask(lock, &members);
        self.lock_records
            .insert(lock, LockRecord::new(activated_seq));
        self.refresh_lock_members(lock);
        if self.lock_state_digest_of(lock) != Some(e.base) {
            // The objects hashed to the base before installing: a mismatch now is a bug in
            // the install, and the content must not be served.
            self.drop_lock_record(lock);
            return Err(bad("installed content does not digest to the base"));
        }
        self.save_table()?;
        tracing::info!(
            lock = lock.0,
            members = members.len(),
            "file service: lock content installed from a peer"
        );
        Ok(())
    }
}
