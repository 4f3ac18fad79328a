//! Files the kernel has open, so that unlinking one (or renaming over it) keeps it alive.
//!
//! The service is stateless, like NFS: removing a file's last name frees the object at once,
//! and a program still reading or writing it through an open descriptor would get ESTALE.
//! POSIX says the file lives on until the last descriptor closes. As NFS clients do, the adapter
//! renames such a file to a hidden name in the same directory instead of removing it, and
//! removes the hidden name when the last descriptor is released. If the client dies first, the
//! hidden file stays behind (`.bftfs-hidden-*`), as `.nfs*` files do.

use state_abstraction::fs::{Caller, Handle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Prefix of the names given to unlinked files that are still open.
pub const HIDDEN_PREFIX: &str = ".bftfs-hidden-";

/// Where an unlinked-but-open file was moved, and who unlinked it (whose rights remove it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hidden {
    pub dir: Handle,
    pub name: Vec<u8>,
    pub caller: Caller,
}

#[derive(Debug, Default)]
struct OpenFile {
    count: u64,
    hidden: Option<Hidden>,
}

#[derive(Debug, Default)]
pub struct OpenFiles {
    by_nodeid: Mutex<HashMap<u64, OpenFile>>,
    counter: AtomicU64,
}

impl OpenFiles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenFile>> {
        self.by_nodeid.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn opened(&self, nodeid: u64) {
        self.lock().entry(nodeid).or_default().count += 1;
    }

    /// One descriptor closed. When it was the last, gives where the file was hidden, if it
    /// was, so the caller removes it.
    pub fn released(&self, nodeid: u64) -> Option<Hidden> {
        let mut map = self.lock();
        let entry = map.get_mut(&nodeid)?;
        entry.count = entry.count.saturating_sub(1);
        if entry.count > 0 {
            return None;
        }
        map.remove(&nodeid).and_then(|e| e.hidden)
    }

    /// Whether nothing is open (then no unlink needs a lookup first).
    pub fn none_open(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn is_open(&self, nodeid: u64) -> bool {
        self.lock().get(&nodeid).is_some_and(|e| e.count > 0)
    }

    /// Whether `nodeid` is an open file whose name was removed (it lives under a hidden one).
    pub fn is_hidden(&self, nodeid: u64) -> bool {
        self.lock().get(&nodeid).is_some_and(|e| e.hidden.is_some())
    }

    /// Records that the open file `nodeid` now lives under `hidden`. Returns false if it was
    /// closed meanwhile (then the caller removes the hidden name itself).
    pub fn hide(&self, nodeid: u64, hidden: Hidden) -> bool {
        match self.lock().get_mut(&nodeid) {
            Some(e) if e.count > 0 => {
                e.hidden = Some(hidden);
                true
            }
            _ => false,
        }
    }

    /// A fresh hidden name. Unique within this process by the counter and, with the process
    /// id, across clients; a clash is still possible and is handled by renaming with
    /// no-replace and trying again.
    pub fn hidden_name(&self) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{HIDDEN_PREFIX}{:x}-{n:x}", std::process::id()).into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hidden(name: &str) -> Hidden {
        Hidden {
            dir: Handle::ROOT,
            name: name.as_bytes().to_vec(),
            caller: Caller::root(),
        }
    }

    #[test]
    fn last_release_gives_back_the_hidden_name() {
        let o = OpenFiles::default();
        assert!(o.none_open());
        o.opened(7);
        o.opened(7);
        assert!(o.is_open(7));
        assert!(!o.is_hidden(7));
        assert!(o.hide(7, hidden("h")));
        assert!(o.is_hidden(7));
        assert_eq!(o.released(7), None);
        assert_eq!(o.released(7), Some(hidden("h")));
        assert!(!o.is_open(7));
        assert!(!o.is_hidden(7));
        assert!(o.none_open());
    }

    #[test]
    fn closed_files_are_not_hidden() {
        let o = OpenFiles::default();
        assert!(!o.hide(3, hidden("h")));
        assert_eq!(o.released(3), None);
        o.opened(3);
        assert_eq!(o.released(3), None);
    }

    #[test]
    fn hidden_names_differ() {
        let o = OpenFiles::default();
        let (a, b) = (o.hidden_name(), o.hidden_name());
        assert_ne!(a, b);
        assert!(a.starts_with(HIDDEN_PREFIX.as_bytes()));
        assert!(a.len() < 64);
    }
}
