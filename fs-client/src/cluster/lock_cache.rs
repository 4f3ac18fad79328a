//! The holder's cache under a Zzyzx lock (issue #13 item 3; docs/zzyzx-plan.md §7.2, in the
//! reply-derived form the plan allows before M4's planner).
//!
//! While a mount holds a lock, no other client can change the lock's objects without first
//! freezing the lock, and a frozen lock merges only [`RELEASE_GRACE_NS`] of agreed time after
//! the freeze. So the answers to read-only calls the log servers gave under the lock stay true
//! until this mount changes the objects itself, and for a while after the lock was last seen
//! active. The cache keeps those answers and serves them again with no round trip:
//!
//! - **What is kept**: the result of a read-only request (getattr, lookup, access, readlink,
//!   readdir, getxattr, listxattr) that came back `Done` from the lock's log, keyed by the
//!   whole request (caller included: permission answers depend on it). Data reads are left to
//!   the kernel's page cache.
//! - **What drops it**: every mutation this mount sends while it holds a lock, on the lock's
//!   log or on the ordered path, drops the cached answers that depend on what it changes
//!   ([`Dep`]), once it has completed (or failed: a timed-out call may have run). A mutation
//!   whose target the cache cannot name (a remove of a name it never saw) drops everything.
//!   A read that was in flight while anything was dropped is not kept, so a read that raced
//!   a mutation never outlives it.
//! - **How long it is trusted (the lease)**: [`LEASE`] after the sending of the latest entry
//!   that 2f+1 servers answered as active. Past it, the next read goes to the servers as an
//!   entry, which renews the lease. The lease is shorter than the release grace by a margin
//!   for clock drift: by the time another client can see the merged objects, this mount has
//!   stopped trusting its copy (the one timing assumption, recorded in DESIGN-CHANGES.md).
//! - Released, rotated or revoked locks clear the cache.

use state_abstraction::fs::locks::RELEASE_GRACE_NS;
use state_abstraction::fs::{
    name_error, Caller, CreateHow, FsError, FsOp, FsReply, FsRequest, FsResult, Handle, Name,
    ACCESS_EXECUTE,
};

/// The attribute the kernel reads before every write to a file.
const CAPABILITY_XATTR: &[u8] = b"security.capability";
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long cached answers are trusted after an entry was last answered by an active lock.
pub const LEASE: Duration = Duration::from_secs(2);
const _: () = assert!(LEASE.as_nanos() * 2 < RELEASE_GRACE_NS as u128);

/// Most answers kept; past it the cache starts again empty (a lock's working set is far
/// smaller, and clearing is always correct).
pub const ENTRIES_MAX: usize = 1 << 16;
/// Most name bindings remembered.
const NAMES_MAX: usize = 1 << 18;

/// What a cached answer depends on, and what a mutation changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Dep {
    /// Anything about the object: attributes, size, times, data, entries, xattrs.
    Obj(u64),
    /// Who may do what with the object: mode, owner, group, ACLs. Changed only by setattr
    /// and xattr changes, so a create in a directory keeps the lookups made in it.
    Perm(u64),
    /// The object's extended attributes.
    Xattr(u64),
}

/// What a mutation changes.
enum Effect {
    Deps(Vec<Dep>),
    /// The cache cannot tell what changed.
    Everything,
}

struct Cached {
    result: FsResult,
    deps: Vec<Dep>,
}

#[derive(Default)]
pub struct LockCache {
    entries: HashMap<Vec<u8>, Cached>,
    by_dep: HashMap<Dep, HashSet<Vec<u8>>>,
    /// What (directory, name) is bound to, from answers and this mount's own changes:
    /// `None` is a name known to be free.
    names: HashMap<(u64, Name), Option<Handle>>,
    /// Directories whose every name is in `names` (made under the lock, or read whole).
    complete: HashSet<u64>,
    /// Bumped at every drop: a read sent before a drop is not kept.
    generation: u64,
    valid_until: Option<Instant>,
    pub hits: u64,
    pub misses: u64,
    /// Calls sent to the lock's log, by kind (reported at release, to see what the cache
    /// does not answer).
    pub sent: std::collections::BTreeMap<&'static str, u64>,
}

/// The question whose answer says the caller may search `dir`.
fn search(dir: Handle) -> FsOp {
    FsOp::Access {
        h: dir,
        mask: ACCESS_EXECUTE,
    }
}

/// The key a read-only request is cached under: its encoding, if the cache keeps it.
pub fn key(req: &FsRequest) -> Option<Vec<u8>> {
    match &req.op {
        // What these name changes with renames the cache does not follow.
        FsOp::Lookup { name, .. } if name.as_slice() == b"." || name.as_slice() == b".." => None,
        FsOp::GetAttr { .. }
        | FsOp::Lookup { .. }
        | FsOp::Access { .. }
        | FsOp::ReadLink { .. }
        | FsOp::ReadDir { .. }
        | FsOp::GetXattr { .. }
        | FsOp::ListXattr { .. } => Some(state_abstraction::fs::encode(req)),
        _ => None,
    }
}

impl LockCache {
    /// A cached answer to `req` (whose key is `key`), if the lease still holds. A lookup is
    /// kept as the name's binding only, and answered with the object's attributes as a
    /// getattr has them cached: a write changes the attributes, not the binding.
    pub fn get(&mut self, req: &FsRequest, key: &[u8], now: Instant) -> Option<FsResult> {
        if self.valid_until.is_none_or(|t| now >= t) {
            return None;
        }
        let found = match &req.op {
            FsOp::Lookup { dir, name } => self.lookup(&req.caller, dir, name),
            _ => self.entries.get(key).map(|c| c.result.clone()),
        };
        match found {
            Some(r) => {
                self.hits += 1;
                Some(r)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// A lookup answered from what the cache knows: the caller may search the directory,
    /// and the name is bound to an object whose attributes are cached, or known free (a
    /// binding this mount saw go, or a directory whose every name it knows).
    fn lookup(&self, caller: &Caller, dir: &Handle, name: &Name) -> Option<FsResult> {
        let access = FsRequest {
            caller: caller.clone(),
            op: search(*dir),
        };
        let searchable = matches!(
            self.entries.get(&state_abstraction::fs::encode(&access)),
            Some(Cached { result: Ok(FsReply::Access { granted }), .. }) if granted & ACCESS_EXECUTE != 0
        );
        if !searchable {
            return None;
        }
        match self.bound(dir, name) {
            Some(Some(handle)) => {
                let getattr = FsRequest {
                    caller: caller.clone(),
                    op: FsOp::GetAttr { h: handle },
                };
                match self.entries.get(&state_abstraction::fs::encode(&getattr)) {
                    Some(Cached {
                        result: Ok(FsReply::Attr(attr)),
                        ..
                    }) => Some(Ok(FsReply::Entry {
                        handle,
                        attr: attr.clone(),
                    })),
                    _ => None,
                }
            }
            Some(None) => Some(Err(FsError::NoEnt)),
            None if self.complete.contains(&dir.index) && name_error(name).is_none() => {
                Some(Err(FsError::NoEnt))
            }
            None => None,
        }
    }

    /// The generation a read is sent at, to pass back to [`LockCache::store`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An entry sent at `sent` was answered by 2f+1 servers holding the lock active.
    pub fn renew(&mut self, sent: Instant) {
        let until = sent + LEASE;
        if self.valid_until.is_none_or(|t| t < until) {
            self.valid_until = Some(until);
        }
    }

    /// Keeps the answer to a read-only request answered under the lock, unless anything was
    /// dropped since it was sent (`generation`).
    pub fn store(&mut self, key: Vec<u8>, req: &FsRequest, result: &FsResult, generation: u64) {
        if generation != self.generation {
            return;
        }
        self.learn_names(req, result);
        if self.entries.len() >= ENTRIES_MAX {
            self.clear();
            return;
        }
        if let (FsOp::Lookup { dir, .. }, Ok(_) | Err(FsError::NoEnt)) = (&req.op, result) {
            // The service looked the name up, so the caller may search the directory: the
            // answer an access(X) would give.
            let access = FsRequest {
                caller: req.caller.clone(),
                op: search(*dir),
            };
            let granted = Ok(FsReply::Access {
                granted: ACCESS_EXECUTE,
            });
            if let Some(k) = self::key(&access) {
                self.store(k, &access, &granted, generation);
            }
        }
        if let (FsOp::Lookup { .. }, Ok(FsReply::Entry { handle, attr })) = (&req.op, result) {
            let getattr = FsRequest {
                caller: req.caller.clone(),
                op: FsOp::GetAttr { h: *handle },
            };
            let attr = Ok(FsReply::Attr(attr.clone()));
            self.store(
                state_abstraction::fs::encode(&getattr),
                &getattr,
                &attr,
                generation,
            );
        }
        if matches!(req.op, FsOp::Lookup { .. }) {
            // Kept as what it taught: the binding, the search permission, the attributes.
            return;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.unindex(&key, &old.deps);
        }
        let deps = read_deps(&req.op, result);
        for d in &deps {
            self.by_dep
                .entry(d.clone())
                .or_default()
                .insert(key.clone());
        }
        self.entries.insert(
            key,
            Cached {
                result: result.clone(),
                deps,
            },
        );
    }

    /// A mutation this mount sent under the lock has completed with `result`: what it
    /// changed is dropped, and what its answer shows is kept (the attributes a write or a
    /// setattr answers are what a getattr would; a create answers what a lookup of the new
    /// name would).
    pub fn mutated_locked(&mut self, req: &FsRequest, result: &FsResult) {
        // A create that made a new object (the name was known free, or the call fails when
        // it is not): the object has no extended attributes yet.
        let fresh = match &req.op {
            FsOp::Create {
                dir,
                name,
                how: CreateHow::Unchecked,
                ..
            } => match self.bound(dir, name) {
                Some(bound) => bound.is_none(),
                None => self.complete.contains(&dir.index),
            },
            FsOp::Create {
                how: CreateHow::Guarded,
                ..
            }
            | FsOp::Mkdir { .. }
            | FsOp::Symlink { .. }
            | FsOp::Mknod { .. } => true,
            _ => false,
        };
        self.mutated(&req.op, Some(result));
        let generation = self.generation;
        let caller = req.caller.clone();
        let as_request = |op| FsRequest {
            caller: caller.clone(),
            op,
        };
        let keep = |cache: &mut Self, r: FsRequest, result: FsResult| {
            if let Some(key) = key(&r) {
                cache.store(key, &r, &result, generation);
            }
        };
        match (&req.op, result) {
            (
                FsOp::Write { h, .. } | FsOp::Fallocate { h, .. } | FsOp::CopyRange { dst: h, .. },
                Ok(FsReply::Write { attr, .. }),
            )
            | (FsOp::SetAttr { h, .. } | FsOp::Fallocate { h, .. }, Ok(FsReply::Attr(attr))) => {
                keep(
                    self,
                    as_request(FsOp::GetAttr { h: *h }),
                    Ok(FsReply::Attr(attr.clone())),
                );
            }
            (
                FsOp::Create { dir, name, .. }
                | FsOp::Mkdir { dir, name, .. }
                | FsOp::Symlink { dir, name, .. }
                | FsOp::Mknod { dir, name, .. },
                Ok(FsReply::Entry { handle, attr }),
            ) => {
                let lookup = FsOp::Lookup {
                    dir: *dir,
                    name: name.clone(),
                };
                keep(self, as_request(lookup), result.clone());
                let getattr = FsOp::GetAttr { h: *handle };
                keep(self, as_request(getattr), Ok(FsReply::Attr(attr.clone())));
                if fresh {
                    let list = FsOp::ListXattr { h: *handle };
                    keep(
                        self,
                        as_request(list),
                        Ok(FsReply::XattrList { names: Vec::new() }),
                    );
                    if req.caller.uid == 0 {
                        // What the kernel asks before the first write; root may read the
                        // security namespace, and there is nothing in it.
                        let caps = FsOp::GetXattr {
                            h: *handle,
                            name: CAPABILITY_XATTR.to_vec(),
                        };
                        keep(self, as_request(caps), Err(FsError::NoData));
                    }
                }
            }
            _ => {}
        }
    }

    /// A mutation this mount sent has completed with `result` (`None`: it failed on the way,
    /// and may or may not have run).
    pub fn mutated(&mut self, op: &FsOp, result: Option<&FsResult>) {
        if self.entries.is_empty() && self.names.is_empty() {
            return;
        }
        // The service checks before it changes anything, so a refused operation changed
        // nothing; an I/O error or an answer that never came may have changed anything.
        let refused = matches!(result, Some(Err(e)) if *e != FsError::Io);
        if refused {
            return;
        }
        self.generation += 1;
        match self.effect(op) {
            Effect::Everything => self.clear(),
            Effect::Deps(deps) => {
                for d in deps {
                    if let Some(keys) = self.by_dep.remove(&d) {
                        for k in keys {
                            if let Some(c) = self.entries.remove(&k) {
                                self.unindex(&k, &c.deps);
                            }
                        }
                    }
                }
            }
        }
        self.bind_names(op, result);
    }

    /// Forgets everything, the lease included.
    pub fn clear(&mut self) {
        self.generation += 1;
        self.entries.clear();
        self.by_dep.clear();
        self.names.clear();
        self.complete.clear();
        self.valid_until = None;
    }

    fn unindex(&mut self, key: &[u8], deps: &[Dep]) {
        for d in deps {
            if let Some(keys) = self.by_dep.get_mut(d) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_dep.remove(d);
                }
            }
        }
    }

    /// The object a name is bound to: `Some(None)` known free, `None` unknown.
    fn bound(&self, dir: &Handle, name: &Name) -> Option<Option<Handle>> {
        self.names.get(&(dir.index, name.clone())).copied()
    }

    fn effect(&self, op: &FsOp) -> Effect {
        use Dep::*;
        let mut deps = Vec::new();
        // The object a name is bound to also changes (its link count, its ctime). Name
        // bindings themselves are kept apart (`names`) and follow in `bind_names`.
        let target = |deps: &mut Vec<Dep>, dir: &Handle, name: &Name| -> bool {
            match self.bound(dir, name) {
                Some(Some(h)) => {
                    // It may be gone (a stale handle now), so nothing about it holds.
                    deps.extend([Obj(h.index), Perm(h.index), Xattr(h.index)]);
                    true
                }
                Some(None) => true,
                None => false,
            }
        };
        match op {
            FsOp::SetAttr { h, .. } => deps.extend([Obj(h.index), Perm(h.index)]),
            // ACLs are xattrs and permissions both.
            FsOp::SetXattr { h, .. } | FsOp::RemoveXattr { h, .. } => {
                deps.extend([Obj(h.index), Perm(h.index), Xattr(h.index)]);
            }
            FsOp::Write { h, .. } | FsOp::Fallocate { h, .. } => deps.push(Obj(h.index)),
            FsOp::CopyRange { dst, .. } => deps.push(Obj(dst.index)),
            FsOp::Create { dir, .. }
            | FsOp::Mkdir { dir, .. }
            | FsOp::Symlink { dir, .. }
            | FsOp::Mknod { dir, .. } => deps.push(Obj(dir.index)),
            FsOp::Link { h, dir, .. } => deps.extend([Obj(h.index), Obj(dir.index)]),
            FsOp::Remove { dir, name } | FsOp::Rmdir { dir, name } => {
                deps.push(Obj(dir.index));
                if !target(&mut deps, dir, name) {
                    return Effect::Everything;
                }
            }
            FsOp::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
                ..
            } => {
                deps.extend([Obj(from_dir.index), Obj(to_dir.index)]);
                let moved = target(&mut deps, from_dir, from_name);
                let replaced = target(&mut deps, to_dir, to_name);
                if !(moved && replaced) {
                    return Effect::Everything;
                }
            }
            // Changes nothing a read answers (fcntl locks are no attribute of the file).
            FsOp::Commit { .. }
            | FsOp::Renew { .. }
            | FsOp::SetRangeLock { .. }
            | FsOp::TestRangeLock { .. }
            | FsOp::DropRangeLocks { .. }
            | FsOp::RenewRangeLocks { .. } => {}
            op if op.is_read_only() => {}
            // Lock and release, and whatever is added later.
            _ => return Effect::Everything,
        }
        Effect::Deps(deps)
    }

    /// Name bindings a read answer shows.
    fn learn_names(&mut self, req: &FsRequest, result: &FsResult) {
        match (&req.op, result) {
            (FsOp::Lookup { dir, name }, Ok(FsReply::Entry { handle, .. })) => {
                self.bind(dir, name, Some(*handle));
            }
            (FsOp::Lookup { dir, name }, Err(FsError::NoEnt)) => self.bind(dir, name, None),
            (FsOp::ReadDir { dir, cookie, .. }, Ok(FsReply::ReadDir { entries, eof })) => {
                for e in entries {
                    self.bind(dir, &e.name, Some(e.handle));
                }
                if *cookie == 0 && *eof {
                    self.complete.insert(dir.index);
                }
            }
            _ => {}
        }
    }

    /// Name bindings a mutation made, once the old ones were dropped by its effect.
    fn bind_names(&mut self, op: &FsOp, result: Option<&FsResult>) {
        let ok = matches!(result, Some(Ok(_)));
        match op {
            FsOp::Create { dir, name, .. }
            | FsOp::Mkdir { dir, name, .. }
            | FsOp::Symlink { dir, name, .. }
            | FsOp::Mknod { dir, name, .. }
            | FsOp::Link { dir, name, .. } => match result {
                Some(Ok(FsReply::Entry { handle, .. })) => {
                    self.bind(dir, name, Some(*handle));
                    if matches!(op, FsOp::Mkdir { .. }) {
                        // A new directory holds no names.
                        self.complete.insert(handle.index);
                    }
                }
                _ => self.unbind(dir, name),
            },
            FsOp::Remove { dir, name } | FsOp::Rmdir { dir, name } => {
                if ok {
                    self.bind(dir, name, None);
                } else {
                    self.unbind(dir, name);
                }
            }
            FsOp::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
                ..
            } => {
                let moved = self.bound(from_dir, from_name).flatten();
                if moved.is_some() && moved == self.bound(to_dir, to_name).flatten() {
                    // Two names of one object: rename(2) leaves both.
                    return;
                }
                if ok && moved.is_some() {
                    self.bind(from_dir, from_name, None);
                    self.bind(to_dir, to_name, moved);
                } else {
                    self.unbind(from_dir, from_name);
                    self.unbind(to_dir, to_name);
                }
            }
            _ => {}
        }
    }

    fn bind(&mut self, dir: &Handle, name: &Name, to: Option<Handle>) {
        if self.names.len() >= NAMES_MAX {
            self.names.clear();
            self.complete.clear();
        }
        self.names.insert((dir.index, name.clone()), to);
    }

    fn unbind(&mut self, dir: &Handle, name: &Name) {
        self.names.remove(&(dir.index, name.clone()));
        self.complete.remove(&dir.index);
    }
}

/// What a read's answer depends on.
fn read_deps(op: &FsOp, result: &FsResult) -> Vec<Dep> {
    use Dep::*;
    match op {
        FsOp::Access { h, .. } => vec![Perm(h.index)],
        FsOp::GetAttr { h } | FsOp::ReadLink { h } => vec![Obj(h.index)],
        FsOp::GetXattr { h, .. } | FsOp::ListXattr { h } => vec![Perm(h.index), Xattr(h.index)],
        FsOp::ReadDir { dir, .. } => {
            let mut deps = vec![Obj(dir.index), Perm(dir.index)];
            if let Ok(FsReply::ReadDir { entries, .. }) = result {
                deps.extend(entries.iter().map(|e| Obj(e.handle.index)));
            }
            deps
        }
        // Lookups are kept as what they taught (`store`); other reads are not kept (`key`).
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use state_abstraction::fs::{Attr, DirEntry, FileType, SetAttrs};

    fn h(i: u64) -> Handle {
        Handle {
            index: i,
            generation: 1,
        }
    }

    fn req(op: FsOp) -> FsRequest {
        FsRequest {
            caller: Caller::root(),
            op,
        }
    }

    fn attr(size: u64) -> Attr {
        crate::kernel_cache::tests::attr(size, 0)
    }

    fn lookup(dir: u64, name: &str) -> FsRequest {
        req(FsOp::Lookup {
            dir: h(dir),
            name: name.into(),
        })
    }

    /// Caches `r` answered by `result`, with a lease running.
    fn fill(c: &mut LockCache, r: &FsRequest, result: FsResult) {
        c.renew(Instant::now());
        let g = c.generation();
        c.store(key(r).unwrap(), r, &result, g);
    }

    /// Removing `name` from `dir` drops the cached attributes of `object` (what the name
    /// is known to be bound to) and keeps `kept`.
    fn removing_drops(c: &mut LockCache, (dir, name): (u64, &str), object: u64, kept: &FsRequest) {
        let getattr = req(FsOp::GetAttr { h: h(object) });
        fill(c, &getattr, Ok(FsReply::Attr(attr(1))));
        c.mutated(
            &FsOp::Remove {
                dir: h(dir),
                name: name.into(),
            },
            Some(&Ok(FsReply::Done)),
        );
        assert_eq!(cached(c, &getattr), None);
        assert!(cached(c, kept).is_some());
    }

    fn cached(c: &mut LockCache, r: &FsRequest) -> Option<FsResult> {
        c.get(r, &key(r).unwrap(), Instant::now())
    }

    #[test]
    fn a_write_drops_the_files_attributes_and_keeps_the_rest() {
        let mut c = LockCache::default();
        let ga = |i| req(FsOp::GetAttr { h: h(i) });
        fill(&mut c, &ga(5), Ok(FsReply::Attr(attr(10))));
        fill(&mut c, &ga(6), Ok(FsReply::Attr(attr(20))));
        let acc = req(FsOp::Access { h: h(5), mask: 4 });
        fill(&mut c, &acc, Ok(FsReply::Access { granted: 4 }));
        c.mutated(
            &FsOp::Write {
                h: h(5),
                offset: 0,
                data: vec![1; 3],
            },
            Some(&Ok(FsReply::Write {
                count: 3,
                attr: attr(10),
            })),
        );
        assert_eq!(cached(&mut c, &ga(5)), None);
        assert_eq!(cached(&mut c, &ga(6)), Some(Ok(FsReply::Attr(attr(20)))));
        // Permissions do not change with data.
        assert!(cached(&mut c, &acc).is_some());
        // A chmod drops the access answer too.
        c.mutated(
            &FsOp::SetAttr {
                h: h(5),
                set: SetAttrs::default(),
            },
            Some(&Ok(FsReply::Attr(attr(10)))),
        );
        assert_eq!(cached(&mut c, &acc), None);
    }

    #[test]
    fn create_drops_the_negative_lookup_and_the_directory_but_not_other_names() {
        let mut c = LockCache::default();
        fill(&mut c, &lookup(1, "new"), Err(FsError::NoEnt));
        let other = lookup(1, "old");
        fill(
            &mut c,
            &other,
            Ok(FsReply::Entry {
                handle: h(7),
                attr: attr(1),
            }),
        );
        let dir_attr = req(FsOp::GetAttr { h: h(1) });
        fill(&mut c, &dir_attr, Ok(FsReply::Attr(attr(0))));
        let create = FsOp::Create {
            dir: h(1),
            name: "new".into(),
            mode: 0o644,
            how: CreateHow::Guarded,
        };
        c.mutated(
            &create,
            Some(&Ok(FsReply::Entry {
                handle: h(9),
                attr: attr(0),
            })),
        );
        assert_eq!(cached(&mut c, &lookup(1, "new")), None);
        assert_eq!(cached(&mut c, &dir_attr), None);
        assert!(cached(&mut c, &other).is_some());
        // The new name is known, so removing it drops only what depends on it.
        removing_drops(&mut c, (1, "new"), 9, &other);
    }

    #[test]
    fn a_lookup_is_answered_with_the_attributes_a_write_answered() {
        let mut c = LockCache::default();
        let l = lookup(1, "f");
        let found = |size| {
            Ok(FsReply::Entry {
                handle: h(5),
                attr: attr(size),
            })
        };
        fill(&mut c, &l, found(0));
        assert_eq!(cached(&mut c, &l), Some(found(0)));
        let write = req(FsOp::Write {
            h: h(5),
            offset: 0,
            data: vec![7; 4],
        });
        c.mutated_locked(
            &write,
            &Ok(FsReply::Write {
                count: 4,
                attr: attr(4),
            }),
        );
        assert_eq!(cached(&mut c, &l), Some(found(4)));
        assert_eq!(
            cached(&mut c, &req(FsOp::GetAttr { h: h(5) })),
            Some(Ok(FsReply::Attr(attr(4))))
        );
        // A write whose answer never came leaves the lookup unanswerable.
        c.mutated(&write.op, None);
        assert_eq!(cached(&mut c, &l), None);
        // "." and ".." are never kept.
        assert_eq!(key(&lookup(1, "..")), None);
    }

    #[test]
    fn a_remove_of_a_name_never_seen_drops_everything() {
        let mut c = LockCache::default();
        let ga = req(FsOp::GetAttr { h: h(5) });
        fill(&mut c, &ga, Ok(FsReply::Attr(attr(10))));
        // h(5) may be what "x" names (a hard link, a file opened by handle).
        c.mutated(
            &FsOp::Remove {
                dir: h(1),
                name: "x".into(),
            },
            Some(&Ok(FsReply::Done)),
        );
        assert_eq!(cached(&mut c, &ga), None);
    }

    #[test]
    fn rename_drops_both_names_and_both_objects() {
        let mut c = LockCache::default();
        let from = lookup(1, "a");
        let to = lookup(2, "b");
        fill(
            &mut c,
            &from,
            Ok(FsReply::Entry {
                handle: h(5),
                attr: attr(1),
            }),
        );
        fill(
            &mut c,
            &to,
            Ok(FsReply::Entry {
                handle: h(6),
                attr: attr(2),
            }),
        );
        let ga6 = req(FsOp::GetAttr { h: h(6) });
        fill(&mut c, &ga6, Ok(FsReply::Attr(attr(2))));
        let keep = req(FsOp::GetAttr { h: h(8) });
        fill(&mut c, &keep, Ok(FsReply::Attr(attr(3))));
        c.mutated(
            &FsOp::Rename {
                from_dir: h(1),
                from_name: "a".into(),
                to_dir: h(2),
                to_name: "b".into(),
                no_replace: false,
            },
            Some(&Ok(FsReply::Done)),
        );
        // "a" is known gone; "b" names h(5), whose attributes (its ctime) are not cached.
        assert_eq!(cached(&mut c, &from), Some(Err(FsError::NoEnt)));
        assert_eq!(cached(&mut c, &to), None);
        assert_eq!(cached(&mut c, &ga6), None);
        assert!(cached(&mut c, &keep).is_some());
        // The binding moved with it: removing "b" now names h(5).
        removing_drops(&mut c, (2, "b"), 5, &keep);
    }

    #[test]
    fn readdir_depends_on_the_directory_and_its_children() {
        let mut c = LockCache::default();
        let rd = req(FsOp::ReadDir {
            dir: h(1),
            cookie: 0,
            count: 100,
            plus: true,
        });
        let entries = vec![DirEntry {
            name: "f".into(),
            cookie: 1,
            handle: h(4),
            kind: FileType::Regular,
            attr: Some(attr(3)),
        }];
        fill(&mut c, &rd, Ok(FsReply::ReadDir { entries, eof: true }));
        c.mutated(
            &FsOp::Write {
                h: h(4),
                offset: 0,
                data: vec![0],
            },
            None,
        );
        assert_eq!(cached(&mut c, &rd), None);
        // The readdir taught the cache what "f" is bound to.
        assert_eq!(c.bound(&h(1), &b"f".to_vec()), Some(Some(h(4))));
    }

    #[test]
    fn a_read_sent_before_a_mutation_is_not_kept() {
        let mut c = LockCache::default();
        c.renew(Instant::now());
        fill(
            &mut c,
            &req(FsOp::GetAttr { h: h(3) }),
            Ok(FsReply::Attr(attr(0))),
        );
        let r = req(FsOp::GetAttr { h: h(5) });
        let g = c.generation();
        c.mutated(
            &FsOp::Write {
                h: h(5),
                offset: 0,
                data: vec![0],
            },
            None,
        );
        c.store(key(&r).unwrap(), &r, &Ok(FsReply::Attr(attr(0))), g);
        assert_eq!(cached(&mut c, &r), None);
    }

    #[test]
    fn nothing_is_served_past_the_lease() {
        let mut c = LockCache::default();
        let r = req(FsOp::GetAttr { h: h(5) });
        c.renew(Instant::now() - LEASE - Duration::from_millis(1));
        let g = c.generation();
        c.store(key(&r).unwrap(), &r, &Ok(FsReply::Attr(attr(0))), g);
        assert_eq!(cached(&mut c, &r), None);
        c.renew(Instant::now());
        assert!(cached(&mut c, &r).is_some());
        c.clear();
        assert_eq!(cached(&mut c, &r), None);
    }

    #[test]
    fn reads_are_keyed_by_caller() {
        let mut c = LockCache::default();
        let r = req(FsOp::Access { h: h(5), mask: 2 });
        fill(&mut c, &r, Ok(FsReply::Access { granted: 2 }));
        let mut other = r.clone();
        other.caller.uid = 1000;
        assert_eq!(cached(&mut c, &other), None);
        assert!(cached(&mut c, &r).is_some());
    }

    /// The cache against the file service itself: random work of two callers on a few names
    /// in two directories, every answer the service gives fed to the cache as the mount
    /// does, and every answer the cache would give checked against the service's.
    mod against_the_service {
        use super::*;
        use proptest::prelude::*;
        use state_abstraction::fs::{FileService, XattrSet};

        #[derive(Clone, Debug)]
        enum Step {
            Create(usize, usize),
            Mkdir(usize, usize),
            Remove(usize, usize),
            Rmdir(usize, usize),
            Rename(usize, usize, usize, usize),
            Link(usize, usize, usize),
            Write(usize, u8),
            Truncate(usize, u64),
            Chmod(usize, u32),
            SetXattr(usize),
            RemoveXattr(usize),
            GetAttr(usize),
            Lookup(usize, usize),
            Access(usize),
            ReadDir(usize),
            GetXattr(usize),
            ListXattr(usize),
            SetCaps(usize),
            /// In whatever object `.0` is (a directory made during the run, or not one).
            CreateIn(usize, usize),
            LookupIn(usize, usize),
        }

        const NAMES: [&str; 3] = ["a", "b", "c"];

        fn step() -> impl Strategy<Value = Step> {
            let d = 0..3usize;
            let n = 0..NAMES.len();
            let o = 0..8usize;
            prop_oneof![
                2 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Create(d, n)),
                1 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Mkdir(d, n)),
                1 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Remove(d, n)),
                1 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Rmdir(d, n)),
                1 => (d.clone(), n.clone(), d.clone(), n.clone())
                    .prop_map(|(a, b, c, e)| Step::Rename(a, b, c, e)),
                1 => (o.clone(), d.clone(), n.clone()).prop_map(|(o, d, n)| Step::Link(o, d, n)),
                2 => (o.clone(), any::<u8>()).prop_map(|(o, b)| Step::Write(o, b)),
                1 => (o.clone(), 0..8u64).prop_map(|(o, s)| Step::Truncate(o, s)),
                1 => (o.clone(), prop_oneof![Just(0o755u32), Just(0o700), Just(0o644), Just(0)])
                    .prop_map(|(o, m)| Step::Chmod(o, m)),
                1 => o.clone().prop_map(Step::SetXattr),
                1 => o.clone().prop_map(Step::SetCaps),
                1 => o.clone().prop_map(Step::RemoveXattr),
                6 => o.clone().prop_map(Step::GetAttr),
                6 => (d.clone(), n.clone()).prop_map(|(d, n)| Step::Lookup(d, n)),
                3 => o.clone().prop_map(Step::Access),
                2 => d.clone().prop_map(Step::ReadDir),
                2 => o.clone().prop_map(Step::GetXattr),
                1 => o.clone().prop_map(Step::ListXattr),
                1 => (o.clone(), n.clone()).prop_map(|(o, n)| Step::CreateIn(o, n)),
                3 => (o, n).prop_map(|(o, n)| Step::LookupIn(o, n)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn the_cache_never_answers_what_the_service_would_not(
                steps in proptest::collection::vec((step(), proptest::bool::weighted(0.2)), 1..200)
            ) {
                let tmp = tempfile::tempdir().unwrap();
                let mut service = FileService::open(tmp.path()).unwrap();
                let mut now = 1_000_000_000u64;
                let root = Caller::root();
                let user = Caller { uid: 1000, gid: 1000, groups: vec![] };
                // Directories 1 and 2 under the root, then every handle the service shows.
                let mut known: Vec<Handle> = vec![Handle::ROOT];
                for name in ["d1", "d2"] {
                    now += 1000;
                    let r = FsRequest {
                        caller: root.clone(),
                        op: FsOp::Mkdir { dir: Handle::ROOT, name: name.into(), mode: 0o777 },
                    };
                    if let Ok(FsReply::Entry { handle, .. }) = service.apply(&r, now) {
                        known.push(handle);
                    }
                }
                let dirs = known.clone();
                let mut cache = LockCache::default();
                for (step, as_user) in steps {
                    // Whole seconds, so that every change shows in the times.
                    now += 1_000_000_000;
                    let caller = if as_user { user.clone() } else { root.clone() };
                    let obj = |i: usize| known[i % known.len()];
                    let name = |n: usize| NAMES[n].as_bytes().to_vec();
                    let op = match step {
                        Step::Create(d, n) => FsOp::Create {
                            dir: dirs[d], name: name(n), mode: 0o644, how: CreateHow::Guarded,
                        },
                        Step::Mkdir(d, n) => FsOp::Mkdir { dir: dirs[d], name: name(n), mode: 0o755 },
                        Step::Remove(d, n) => FsOp::Remove { dir: dirs[d], name: name(n) },
                        Step::Rmdir(d, n) => FsOp::Rmdir { dir: dirs[d], name: name(n) },
                        Step::Rename(a, b, c, e) => FsOp::Rename {
                            from_dir: dirs[a], from_name: name(b),
                            to_dir: dirs[c], to_name: name(e), no_replace: false,
                        },
                        Step::Link(o, d, n) => FsOp::Link { h: obj(o), dir: dirs[d], name: name(n) },
                        Step::Write(o, b) => FsOp::Write { h: obj(o), offset: u64::from(b % 4), data: vec![b; 3] },
                        Step::Truncate(o, size) => FsOp::SetAttr {
                            h: obj(o), set: SetAttrs { size: Some(size), ..SetAttrs::default() },
                        },
                        Step::Chmod(o, mode) => FsOp::SetAttr {
                            h: obj(o), set: SetAttrs { mode: Some(mode), ..SetAttrs::default() },
                        },
                        Step::SetXattr(o) => FsOp::SetXattr {
                            h: obj(o), name: b"user.x".to_vec(), value: vec![1], how: XattrSet::Either,
                        },
                        Step::RemoveXattr(o) => FsOp::RemoveXattr { h: obj(o), name: b"user.x".to_vec() },
                        Step::GetAttr(o) => FsOp::GetAttr { h: obj(o) },
                        Step::Lookup(d, n) => FsOp::Lookup { dir: dirs[d], name: name(n) },
                        Step::Access(o) => FsOp::Access { h: obj(o), mask: 7 },
                        Step::ReadDir(d) => FsOp::ReadDir { dir: dirs[d], cookie: 0, count: 64, plus: true },
                        Step::GetXattr(o) => FsOp::GetXattr {
                            h: obj(o),
                            name: if o % 2 == 0 { b"user.x".to_vec() } else { CAPABILITY_XATTR.to_vec() },
                        },
                        Step::SetCaps(o) => FsOp::SetXattr {
                            h: obj(o), name: CAPABILITY_XATTR.to_vec(), value: vec![1], how: XattrSet::Either,
                        },
                        Step::ListXattr(o) => FsOp::ListXattr { h: obj(o) },
                        Step::CreateIn(o, n) => FsOp::Create {
                            dir: obj(o), name: name(n), mode: 0o644, how: CreateHow::Unchecked,
                        },
                        Step::LookupIn(o, n) => FsOp::Lookup { dir: obj(o), name: name(n) },
                    };
                    let req = FsRequest { caller, op };
                    cache.renew(Instant::now());
                    let k = key(&req);
                    let answer = k.as_ref().and_then(|k| cache.get(&req, k, Instant::now()));
                    let generation = cache.generation();
                    let result = service.apply(&req, now);
                    if let Some(answer) = answer {
                        prop_assert_eq!(&answer, &result, "cached answer to {:?}", req.op);
                    }
                    match (&result, k) {
                        (_, Some(k)) => cache.store(k, &req, &result, generation),
                        (_, None) => cache.mutated_locked(&req, &result),
                    }
                    match &result {
                        Ok(FsReply::Entry { handle, .. }) if !known.contains(handle) => known.push(*handle),
                        Ok(FsReply::ReadDir { entries, .. }) => {
                            for e in entries {
                                if !known.contains(&e.handle) {
                                    known.push(e.handle);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
