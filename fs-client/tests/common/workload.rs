//! A data-verifying file workload for fault tests: writes, overwrites, truncates, renames,
//! removes and fsyncs on a few dozen files in one directory, every read checked against an
//! in-memory model of the directory.
//!
//! Every state change is one system call that the FUSE adapter turns into one ordered request
//! (writes are at most 64 KiB, well under the mount's 1 MiB `max_write`, so the kernel never
//! splits one). While a call is in progress, `pending` holds what it changes; after a crash
//! the directory must equal the model, or the model with `pending` applied: nothing that
//! returned may be lost, and the call that was cut short either happened or did not.
//!
//! Only `std`: it is shared with `bftfs-bench chaos` (benchmarks/src/chaos.rs includes this
//! file by path, since a benchmark cannot depend on a test crate).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Largest single write: one FUSE request.
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

pub struct Workload {
    dir: PathBuf,
    files: usize,
    rng: u64,
    /// name → content of every file in `dir`.
    pub model: BTreeMap<String, Vec<u8>>,
    /// What the call in progress changes (None: removes the name).
    pub pending: Vec<(String, Option<Vec<u8>>)>,
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
            rng: seed | 1,
            model: BTreeMap::new(),
            pending: Vec::new(),
            counts: Counts::default(),
            problems: Vec::new(),
        };
        w.model = w.read_dir_state()?;
        Ok(w)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: enough to vary sizes and contents without a dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
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
            Err(e) => {
                self.counts.errors += 1;
                let msg = format!("{what}: {e}");
                self.problem(msg.clone());
                Err(msg)
            }
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
                self.change(&format!("rename {name} {to}"), vec![(name.clone(), None), (to.clone(), value)], |_| {
                    fs::rename(&from_path, &to_path)
                })?;
                vec![name.clone(), to]
            }
        } else if roll < 70 {
            self.counts.removes += 1;
            let p = self.path(&name);
            self.change(&format!("remove {name}"), vec![(name.clone(), None)], |_| fs::remove_file(&p))?;
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
        let target = if via_tmp { format!("{name}.tmp") } else { name.to_string() };
        let p = self.path(&target);
        let file = self.change(&format!("create {target}"), vec![(target.clone(), Some(Vec::new()))], |_| File::create(&p))?;
        let mut done = 0;
        while done < data.len() {
            let end = (done + WRITE_BYTES_MAX).min(data.len());
            self.counts.writes += 1;
            self.counts.bytes_written += (end - done) as u64;
            let after = data[..end].to_vec();
            let n = self.change(&format!("write {target} at {done}"), vec![(target.clone(), Some(after))], |_| {
                file.write_at(&data[done..end], done as u64)
            })?;
            if n != end - done {
                // A short write changed only part: follow the file, then go on from there.
                let _ = self.verify(&target);
                if self.model.get(&target).map(Vec::len) == Some(done + n) {
                    done += n;
                    continue;
                }
                return Err(format!("short write to {target}: {n} of {}", end - done));
            }
            done = end;
        }
        if fsync {
            self.counts.fsyncs += 1;
            self.change(&format!("fsync {target}"), vec![], |_| file.sync_all())?;
        }
        drop(file);
        if via_tmp {
            self.counts.renames += 1;
            let (from, to) = (self.path(&target), self.path(name));
            self.change(&format!("rename {target} {name}"), vec![(target.clone(), None), (name.to_string(), Some(data))], |_| {
                fs::rename(&from, &to)
            })?;
        }
        Ok(vec![name.to_string(), target])
    }

    /// Writes at most 64 KiB somewhere in (or just past the end of) an existing file.
    fn overwrite(&mut self, name: &str, fsync: bool) -> Result<Vec<String>, String> {
        let old = self.model.get(name).cloned().unwrap_or_default();
        let offset = self.below(old.len() as u64 + 8192) as usize;
        let len = 1 + self.below(WRITE_BYTES_MAX as u64) as usize;
        let data = self.bytes(len);
        let mut after = old;
        if after.len() < offset + len {
            after.resize(offset + len, 0);
        }
        after[offset..offset + len].copy_from_slice(&data);
        let p = self.path(name);
        let file = self.change(&format!("open {name}"), vec![], |_| OpenOptions::new().write(true).open(&p))?;
        self.counts.writes += 1;
        self.counts.bytes_written += len as u64;
        let n = self.change(&format!("write {name} at {offset}"), vec![(name.to_string(), Some(after))], |_| {
            file.write_at(&data, offset as u64)
        })?;
        if n != len {
            return Err(format!("short write to {name}: {n} of {len}"));
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
        let file = self.change(&format!("open {name}"), vec![], |_| OpenOptions::new().write(true).open(&p))?;
        self.counts.truncates += 1;
        self.change(&format!("truncate {name} to {size}"), vec![(name.to_string(), Some(after))], |_| {
            file.set_len(size as u64)
        })?;
        if fsync {
            self.counts.fsyncs += 1;
            self.change(&format!("fsync {name}"), vec![], |_| file.sync_all())?;
        }
        Ok(vec![name.to_string()])
    }

    /// Checks that the directory holds exactly the model's names.
    pub fn verify_listing(&mut self) -> Result<(), String> {
        self.counts.ops += 1;
        let names: Vec<String> = match fs::read_dir(&self.dir) {
            Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
            Err(e) => {
                self.counts.errors += 1;
                let msg = format!("readdir: {e}");
                self.problem(msg.clone());
                return Err(msg);
            }
        };
        let mut names = names;
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
            let mut b = Vec::new();
            File::open(e.path())?.read_to_end(&mut b)?;
            out.insert(e.file_name().to_string_lossy().into_owned(), b);
        }
        Ok(out)
    }

    /// After a crash and restart: the directory must be the model, or the model with the
    /// interrupted call applied. Returns a description of the first difference.
    pub fn check_after_crash(&self) -> Result<&'static str, String> {
        let found = self.read_dir_state().map_err(|e| format!("reading the directory back: {e}"))?;
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
        let mut diffs = Vec::new();
        for name in found.keys().chain(self.model.keys()).collect::<std::collections::BTreeSet<_>>() {
            let (f, m, a) = (found.get(name), self.model.get(name), applied.get(name));
            if f != m && f != a {
                diffs.push(format!(
                    "{name}: found {:?} bytes, model {:?}, with the pending call {:?}",
                    f.map(Vec::len),
                    m.map(Vec::len),
                    a.map(Vec::len)
                ));
            }
        }
        Err(format!("pending {:?}: {}", self.pending.iter().map(|p| &p.0).collect::<Vec<_>>(), diffs.join("; ")))
    }
}
