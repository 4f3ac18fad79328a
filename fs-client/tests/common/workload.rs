//! A data-verifying file workload for fault tests: writes, overwrites, truncates, renames,
//! removes and fsyncs on a few dozen files in one directory, every read checked against an
//! in-memory model of the directory.
//!
//! Every state change is one system call. Each becomes one ordered request, except that the
//! kernel may send one `write(2)` as several WRITE requests even far below the mount's 1 MiB
//! `max_write`: it ends a request after a partly written page that is not in its page cache
//! (an unaligned write's first page, for one) and where copying from the caller's buffer
//! faults. The pieces go out one after another in offset order, each applied whole, so a
//! crash can leave a prefix of the write in progress, and a write whose later piece fails
//! returns a short count (the bytes it reports are written; the failed piece may or may not
//! have been, like any call cut short). While a call is in progress,
//! `pending` holds what it changes (and `pending_write` the write, if it is one); after a
//! crash the directory must equal the model, or the model with `pending` applied, or, for a
//! write, with a prefix of it applied: nothing that returned may be lost, and the call that
//! was cut short happened, did not, or (a write) got part of the way.
//!
//! Only `std`: it is shared with `bftfs-bench chaos` (benchmarks/src/chaos.rs includes this
//! file by path, since a benchmark cannot depend on a test crate).

#![allow(dead_code)]

use replica::rng::Rng;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The mount's hidden names for open unlinked files (`fs_client::open_files::HIDDEN_PREFIX`,
/// written out because the benchmarks include this file without the fs-client crate; the
/// faults tests check that the two agree).
pub const HIDDEN_PREFIX: &str = ".bftfs-hidden-";

/// Largest single write (the kernel may still send it in several pieces, see the module doc).
const WRITE_BYTES_MAX: usize = 64 << 10;

#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// System calls made (reads included).
    pub ops: u64,
    pub writes: u64,
    pub truncates: u64,
    pub renames: u64,
    pub removes: u64,
    pub fsyncs: u64,
    /// Whole-file reads checked against the model.
    pub reads: u64,
    pub bytes_written: u64,
    /// Calls that failed (EIO after the mount's timeout, ENOTCONN, ...).
    pub errors: u64,
    /// Reads or listings that differed from the model.
    pub mismatches: u64,
}

/// A `write(2)` in progress on `name`, whose content was `before`.
#[derive(Clone, Debug)]
pub struct PendingWrite {
    pub name: String,
    pub before: Vec<u8>,
    pub offset: usize,
    pub data: Vec<u8>,
}

/// `before` after the first `k` bytes of a write of `data` at `offset` (what the first pieces of
/// a write the kernel split leave; `k == 0` is no piece at all, so no gap is filled).
pub fn with_prefix(before: &[u8], offset: usize, data: &[u8], k: usize) -> Vec<u8> {
    let mut out = before.to_vec();
    if k == 0 {
        return out;
    }
    if out.len() < offset + k {
        out.resize(offset + k, 0);
    }
    out[offset..offset + k].copy_from_slice(&data[..k]);
    out
}

/// Whether `found` is `before` with a prefix of 1 to `data.len() - 1` bytes of the write of
/// `data` at `offset` applied (the two ends are the model and the whole write).
pub fn is_torn_write(found: &[u8], before: &[u8], offset: usize, data: &[u8]) -> bool {
    let torn = |k: usize| {
        k > 0 && k < data.len() && found == with_prefix(before, offset, data, k).as_slice()
    };
    if found.len() > before.len() {
        // The file grew: the size says how far the write got.
        return found.len().checked_sub(offset).is_some_and(torn);
    }
    if found.len() != before.len() || offset >= before.len() || found[..offset] != before[..offset]
    {
        return false;
    }
    // Within the old size: k must cover every byte that differs from `before` and may not
    // pass the first byte that differs from `data`.
    let agree = found[offset..]
        .iter()
        .zip(data)
        .take_while(|(a, b)| a == b)
        .count();
    let last_change = match found.iter().zip(before).rposition(|(a, b)| a != b) {
        Some(i) => i,
        None => return false,
    };
    let lowest = (last_change + 1).saturating_sub(offset).max(1);
    let highest = agree.min(data.len() - 1).min(before.len() - offset);
    lowest <= highest && torn(lowest)
}

pub struct Workload {
    dir: PathBuf,
    files: usize,
    rng: Rng,
    /// name → content of every file in `dir`.
    pub model: BTreeMap<String, Vec<u8>>,
    /// What the call in progress changes (None: removes the name).
    pub pending: Vec<(String, Option<Vec<u8>>)>,
    /// The call in progress when it is a write (of which a crash may leave a prefix).
    pub pending_write: Option<PendingWrite>,
    pub counts: Counts,
    /// The first few errors and mismatches, for the report.
    pub problems: Vec<String>,
}

impl Workload {
    /// A workload on `dir` (created if missing; must be empty or hold only a previous
    /// workload's files, which are then taken as they are).
    pub fn new(dir: &Path, files: usize, seed: u64) -> std::io::Result<Workload> {
        fs::create_dir_all(dir)?;
        let mut w = Workload {
            dir: dir.to_path_buf(),
            files,
            rng: Rng::new(seed),
            model: BTreeMap::new(),
            pending: Vec::new(),
            pending_write: None,
            counts: Counts::default(),
            problems: Vec::new(),
        };
        w.model = w.read_dir_state()?;
        Ok(w)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        self.rng.bytes(n)
    }

    fn name(&self, i: usize) -> String {
        format!("f{i:03}")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < 20 {
            self.problems.push(what);
        }
    }

    /// Runs `call` as the one state change described by `changes`: the model follows only if
    /// the call returns. On failure the error is counted and `pending` stays set.
    fn change<T>(
        &mut self,
        what: &str,
        changes: Vec<(String, Option<Vec<u8>>)>,
        call: impl FnOnce(&Self) -> std::io::Result<T>,
    ) -> Result<T, String> {
        self.pending = changes;
        self.pending_write = None;
        self.counts.ops += 1;
        match call(self) {
            Ok(v) => {
                for (name, value) in std::mem::take(&mut self.pending) {
                    match value {
                        Some(v) => self.model.insert(name, v),
                        None => self.model.remove(&name),
                    };
                }
                Ok(v)
            }
            Err(e) => self.failed(format!("{what}: {e}")),
        }
    }

    /// Counts a failed call and records it as a problem.
    fn failed<T>(&mut self, msg: String) -> Result<T, String> {
        self.counts.errors += 1;
        self.problem(msg.clone());
        Err(msg)
    }

    /// `write(2)` of `data` at `offset` to `name` through `file`. The model takes exactly the
    /// bytes the call reports written. A short count means a later piece of the write failed
    /// (see the module doc), typically because the mount went away while it was in flight:
    /// that piece may still have been executed, so the rest of the write stays pending, as a
    /// write of its own that a crash may have left whole, in part or not at all.
    fn write_call(
        &mut self,
        name: &str,
        file: &File,
        offset: usize,
        data: &[u8],
    ) -> Result<usize, String> {
        let before = self.model.get(name).cloned().unwrap_or_default();
        self.pending = vec![(
            name.to_string(),
            Some(with_prefix(&before, offset, data, data.len())),
        )];
        self.pending_write = Some(PendingWrite {
            name: name.to_string(),
            before,
            offset,
            data: data.to_vec(),
        });
        self.counts.ops += 1;
        self.counts.writes += 1;
        self.counts.bytes_written += data.len() as u64;
        match file.write_at(data, offset as u64) {
            Ok(n) => {
                let before = self
                    .pending_write
                    .take()
                    .map(|w| w.before)
                    .unwrap_or_default();
                let reported = with_prefix(&before, offset, data, n);
                self.model.insert(name.to_string(), reported.clone());
                if n < data.len() {
                    self.pending_write = Some(PendingWrite {
                        name: name.to_string(),
                        before: reported,
                        offset: offset + n,
                        data: data[n..].to_vec(),
                    });
                } else {
                    self.pending.clear();
                }
                Ok(n)
            }
            Err(e) => self.failed(format!("write {name} at {offset}: {e}")),
        }
    }

    /// Reads `name` whole and checks it against the model.
    fn verify(&mut self, name: &str) -> Result<(), String> {
        self.counts.ops += 1;
        self.counts.reads += 1;
        let got = match fs::read(self.path(name)) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                self.counts.errors += 1;
                let msg = format!("read {name}: {e}");
                self.problem(msg.clone());
                return Err(msg);
            }
        };
        let want = self.model.get(name);
        if got.as_ref() != want {
            self.counts.mismatches += 1;
            let msg = format!(
                "{name}: read {:?} bytes, the model has {:?}",
                got.as_ref().map(Vec::len),
                want.map(Vec::len)
            );
            self.problem(msg.clone());
            // Follow what is there, so that one mismatch is reported once.
            match got {
                Some(b) => self.model.insert(name.to_string(), b),
                None => self.model.remove(name),
            };
            return Err(msg);
        }
        Ok(())
    }

    /// One operation (a mutation followed by a check of what it touched, or a check of a
    /// random file). Errors and mismatches are counted and returned.
    pub fn step(&mut self) -> Result<(), String> {
        let i = self.below(self.files as u64) as usize;
        let name = self.name(i);
        let exists = self.model.contains_key(&name);
        let roll = self.below(100);
        let fsync = self.below(3) == 0;
        let touched: Vec<String> = if roll < 25 || !exists && roll < 70 {
            self.write_whole(&name, fsync)?
        } else if roll < 45 {
            self.overwrite(&name, fsync)?
        } else if roll < 55 {
            self.truncate(&name, fsync)?
        } else if roll < 65 {
            let j = self.below(self.files as u64) as usize;
            let to = self.name(j);
            if to == name {
                vec![]
            } else {
                self.counts.renames += 1;
                let value = self.model.get(&name).cloned();
                let (from_path, to_path) = (self.path(&name), self.path(&to));
                self.change(
                    &format!("rename {name} {to}"),
                    vec![(name.clone(), None), (to.clone(), value)],
                    |_| fs::rename(&from_path, &to_path),
                )?;
                vec![name.clone(), to]
            }
        } else if roll < 70 {
            self.counts.removes += 1;
            let p = self.path(&name);
            self.change(
                &format!("remove {name}"),
                vec![(name.clone(), None)],
                |_| fs::remove_file(&p),
            )?;
            vec![name.clone()]
        } else {
            vec![name.clone()]
        };
        for n in touched {
            self.verify(&n)?;
        }
        if self.counts.ops % 64 == 0 {
            self.verify_listing()?;
        }
        Ok(())
    }

    /// Creates or truncates `name` and writes new content, directly or (one time in three)
    /// through a temporary file renamed over it.
    fn write_whole(&mut self, name: &str, fsync: bool) -> Result<Vec<String>, String> {
        let size = match self.below(4) {
            0 => self.below(4096),
            1 => self.below(200 << 10),
            _ => self.below(48 << 10),
        } as usize;
        let data = self.bytes(size);
        let via_tmp = self.below(3) == 0;
        let target = if via_tmp {
            format!("{name}.tmp")
        } else {
            name.to_string()
        };
        let p = self.path(&target);
        let file = self.change(
            &format!("create {target}"),
            vec![(target.clone(), Some(Vec::new()))],
            |_| File::create(&p),
        )?;
        let mut done = 0;
        while done < data.len() {
            let end = (done + WRITE_BYTES_MAX).min(data.len());
            let n = self.write_call(&target, &file, done, &data[done..end])?;
            if n == 0 {
                return Err(format!("write to {target} at {done} wrote nothing"));
            }
            if n != end - done {
                // A short write (the model took what it reports): check it, then go on from there.
                self.verify(&target)?;
                // The file holds just what was reported: the rest of that write did not happen.
                self.pending.clear();
                self.pending_write = None;
            }
            done += n;
        }
        if fsync {
            self.counts.fsyncs += 1;
            self.change(&format!("fsync {target}"), vec![], |_| file.sync_all())?;
        }
        drop(file);
        if via_tmp {
            self.counts.renames += 1;
            let (from, to) = (self.path(&target), self.path(name));
            self.change(
                &format!("rename {target} {name}"),
                vec![(target.clone(), None), (name.to_string(), Some(data))],
                |_| fs::rename(&from, &to),
            )?;
        }
        Ok(vec![name.to_string(), target])
    }

    /// Writes at most 64 KiB somewhere in (or just past the end of) an existing file.
    fn overwrite(&mut self, name: &str, fsync: bool) -> Result<Vec<String>, String> {
        let old_len = self.model.get(name).map_or(0, Vec::len);
        let offset = self.below(old_len as u64 + 8192) as usize;
        let len = 1 + self.below(WRITE_BYTES_MAX as u64) as usize;
        let data = self.bytes(len);
        let p = self.path(name);
        let file = self.change(&format!("open {name}"), vec![], |_| {
            OpenOptions::new().write(true).open(&p)
        })?;
        let n = self.write_call(name, &file, offset, &data)?;
        if n != len {
            // The model holds the n bytes reported and the rest stays pending. Unless the mount
            // is going away this is a fault of its own, so count it.
            self.counts.errors += 1;
            let msg = format!("short write to {name}: {n} of {len}");
            self.problem(msg.clone());
            return Err(msg);
        }
        if fsync {
            self.counts.fsyncs += 1;
            self.change(&format!("fsync {name}"), vec![], |_| file.sync_all())?;
        }
        Ok(vec![name.to_string()])
    }

    fn truncate(&mut self, name: &str, fsync: bool) -> Result<Vec<String>, String> {
        let mut after = self.model.get(name).cloned().unwrap_or_default();
        let size = self.below(after.len() as u64 + 16384) as usize;
        after.resize(size, 0);
        let p = self.path(name);
        let file = self.change(&format!("open {name}"), vec![], |_| {
            OpenOptions::new().write(true).open(&p)
        })?;
        self.counts.truncates += 1;
        self.change(
            &format!("truncate {name} to {size}"),
            vec![(name.to_string(), Some(after))],
            |_| file.set_len(size as u64),
        )?;
        if fsync {
            self.counts.fsyncs += 1;
            self.change(&format!("fsync {name}"), vec![], |_| file.sync_all())?;
        }
        Ok(vec![name.to_string()])
    }

    /// Checks that the directory holds exactly the model's names.
    pub fn verify_listing(&mut self) -> Result<(), String> {
        self.counts.ops += 1;
        // An entry that fails to read is an error, not a missing name: a listing cut short
        // by the mount going away must not count as a mismatch.
        let listed = fs::read_dir(&self.dir).and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<Vec<String>>>()
        });
        let names: Vec<String> = match listed {
            Ok(names) => names,
            Err(e) => {
                self.counts.errors += 1;
                let msg = format!("readdir: {e}");
                self.problem(msg.clone());
                return Err(msg);
            }
        };
        // A file replaced or unlinked while open lives on under a hidden name until its last
        // release (as NFS's silly rename does). The kernel sends that release after close(2)
        // has returned, so the name can show in a listing for a moment after the workload
        // closed the file, and stays if the mount dies first; it is no file of the model.
        let mut names: Vec<String> = names
            .into_iter()
            .filter(|n| !n.starts_with(HIDDEN_PREFIX))
            .collect();
        names.sort();
        let want: Vec<String> = self.model.keys().cloned().collect();
        if names != want {
            self.counts.mismatches += 1;
            let msg = format!("listing {names:?}, the model has {want:?}");
            self.problem(msg.clone());
            self.model = self.read_dir_state().map_err(|e| e.to_string())?;
            return Err(msg);
        }
        Ok(())
    }

    /// After a failed call (whose effect is unknown): takes the files it touched as they are.
    pub fn resync(&mut self) {
        self.pending_write = None;
        for (name, _) in std::mem::take(&mut self.pending) {
            match fs::read(self.path(&name)) {
                Ok(b) => {
                    self.model.insert(name, b);
                }
                Err(_) => {
                    self.model.remove(&name);
                }
            }
        }
    }

    /// Every file in the directory, read whole.
    pub fn read_dir_state(&self) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            // Hidden names of open unlinked files: see `verify_listing`.
            if e.file_name().to_string_lossy().starts_with(HIDDEN_PREFIX) {
                continue;
            }
            let mut b = Vec::new();
            File::open(e.path())?.read_to_end(&mut b)?;
            out.insert(e.file_name().to_string_lossy().into_owned(), b);
        }
        Ok(out)
    }

    /// After a crash and restart: the directory must be the model, or the model with the
    /// interrupted call applied. Returns a description of the first difference.
    pub fn check_after_crash(&self) -> Result<&'static str, String> {
        let found = self
            .read_dir_state()
            .map_err(|e| format!("reading the directory back: {e}"))?;
        if found == self.model {
            return Ok("as before the interrupted call");
        }
        let mut applied = self.model.clone();
        for (name, value) in &self.pending {
            match value {
                Some(v) => applied.insert(name.clone(), v.clone()),
                None => applied.remove(name),
            };
        }
        if found == applied {
            return Ok("with the interrupted call applied");
        }
        if let Some(w) = &self.pending_write {
            let others_as_model = found
                .iter()
                .filter(|(k, _)| **k != w.name)
                .eq(self.model.iter().filter(|(k, _)| **k != w.name));
            if others_as_model
                && found
                    .get(&w.name)
                    .is_some_and(|f| is_torn_write(f, &w.before, w.offset, &w.data))
            {
                return Ok(
                    "with a prefix of the interrupted write applied (the kernel sent it in pieces)",
                );
            }
        }
        let mut diffs = Vec::new();
        for name in found
            .keys()
            .chain(self.model.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let (f, m, a) = (found.get(name), self.model.get(name), applied.get(name));
            if f != m && f != a {
                diffs.push(format!(
                    "{name}: found {:?} bytes, model {:?}, with the pending call {:?}; differing bytes from the model: {}",
                    f.map(Vec::len),
                    m.map(Vec::len),
                    a.map(Vec::len),
                    differing_ranges(f.map(Vec::as_slice).unwrap_or(&[]), m.map(Vec::as_slice).unwrap_or(&[]))
                ));
            }
        }
        Err(format!(
            "pending {:?}: {}",
            self.pending.iter().map(|p| &p.0).collect::<Vec<_>>(),
            diffs.join("; ")
        ))
    }
}

/// The byte ranges where `a` and `b` differ (the longer one's tail counts as differing), for
/// a failure message that says what kind of loss happened.
fn differing_ranges(a: &[u8], b: &[u8]) -> String {
    let n = a.len().max(b.len());
    let mut out = Vec::new();
    let mut start = None;
    for i in 0..=n {
        let differs = i < n && a.get(i) != b.get(i);
        match (differs, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(format!("{s}..{i}"));
                start = None;
            }
            _ => {}
        }
    }
    if out.len() > 12 {
        let k = out.len();
        out.truncate(12);
        out.push(format!("... ({k} ranges)"));
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn a_torn_write_is_a_prefix_of_its_pieces_and_nothing_else() {
        // The case seen after a power loss: 3796 bytes, a write of 13312 at 1822 that the
        // kernel sent as [1822, 4096) and [4096, 15134), cut after the first piece.
        let before = vec![0xaa; 3796];
        let w = data(13312, 7);
        let first_piece = with_prefix(&before, 1822, &w, 4096 - 1822);
        assert_eq!(first_piece.len(), 4096);
        assert!(is_torn_write(&first_piece, &before, 1822, &w));
        // A cut inside the old size (same length, part of the new bytes).
        let inside = with_prefix(&before, 1822, &w, 1000);
        assert!(is_torn_write(&inside, &before, 1822, &w));
        // A write past the end, cut after its first piece (the gap reads as zeros).
        let past = with_prefix(&before, 5000, &w, 100);
        assert!(is_torn_write(&past, &before, 5000, &w));
        // Neither end counts as torn: those are the model and the whole write.
        assert!(!is_torn_write(&before, &before, 1822, &w));
        assert!(!is_torn_write(
            &with_prefix(&before, 1822, &w, w.len()),
            &before,
            1822,
            &w
        ));
        // A later piece without the earlier one is not a prefix.
        let mut suffix_only = before.clone();
        suffix_only.resize(15134, 0);
        suffix_only[4096..].copy_from_slice(&w[4096 - 1822..]);
        assert!(!is_torn_write(&suffix_only, &before, 1822, &w));
        // Damage outside the write, or the right length with the wrong bytes, is not either.
        let mut outside = first_piece.clone();
        outside[10] ^= 1;
        assert!(!is_torn_write(&outside, &before, 1822, &w));
        let mut wrong = first_piece.clone();
        wrong[3000] ^= 1;
        assert!(!is_torn_write(&wrong, &before, 1822, &w));
        // Lost bytes of the old content (a shorter file) are not a torn write.
        assert!(!is_torn_write(&before[..2000], &before, 1822, &w));
    }

    #[test]
    fn after_a_crash_only_the_interrupted_write_may_be_torn() {
        let dir = std::env::temp_dir().join(format!("bftfs-workload-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut w = Workload::new(&dir, 4, 1).expect("workload");
        let before = data(5000, 1);
        let new = data(9000, 2);
        w.model.insert("f000".into(), before.clone());
        w.model.insert("f001".into(), data(100, 3));
        w.pending = vec![(
            "f000".into(),
            Some(with_prefix(&before, 3000, &new, new.len())),
        )];
        w.pending_write = Some(PendingWrite {
            name: "f000".into(),
            before: before.clone(),
            offset: 3000,
            data: new.clone(),
        });
        fs::write(dir.join("f001"), data(100, 3)).expect("write");

        // The first piece (up to the page boundary) of the interrupted write: accepted.
        fs::write(
            dir.join("f000"),
            with_prefix(&before, 3000, &new, 4096 - 3000),
        )
        .expect("write");
        assert!(w.check_after_crash().is_ok());
        // A returned write lost from another file: still a failure.
        fs::write(dir.join("f001"), data(50, 3)).expect("write");
        assert!(w.check_after_crash().is_err());
        fs::write(dir.join("f001"), data(100, 3)).expect("write");
        // A write that returned a short count: the model has the reported bytes and the rest
        // of the write is pending (its piece may have run although its reply was lost).
        w.model
            .insert("f000".into(), with_prefix(&before, 3000, &new, 4096 - 3000));
        w.pending = vec![(
            "f000".into(),
            Some(with_prefix(&before, 3000, &new, new.len())),
        )];
        w.pending_write = Some(PendingWrite {
            name: "f000".into(),
            before: with_prefix(&before, 3000, &new, 4096 - 3000),
            offset: 4096,
            data: new[4096 - 3000..].to_vec(),
        });
        fs::write(
            dir.join("f000"),
            with_prefix(&before, 3000, &new, new.len()),
        )
        .expect("write");
        assert!(w.check_after_crash().is_ok());
        fs::write(dir.join("f000"), with_prefix(&before, 3000, &new, 5000)).expect("write");
        assert!(w.check_after_crash().is_ok());
        // ... but never less than what it reported.
        fs::write(dir.join("f000"), &before).expect("write");
        assert!(w.check_after_crash().is_err());
        // Without a write in progress, a partly changed file is a failure.
        w.pending_write = None;
        fs::write(dir.join("f000"), with_prefix(&before, 3000, &new, 5000)).expect("write");
        assert!(w.check_after_crash().is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
