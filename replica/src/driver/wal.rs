//! The replica's write-ahead log: an append-only file of length-prefixed, checksummed records.
//!
//! A record is durable once [`Wal::sync`] returns. After a crash the file may end in a torn
//! record (a write that was not synced); [`Wal::open`] keeps every record up to the first one
//! that is incomplete or fails its checksum and cuts the file there, so a later append never
//! follows garbage.

use sha2::{Digest as _, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Records larger than this are refused on append and treated as corruption on replay, so a
/// damaged length field cannot make recovery allocate without bound.
pub const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;

const HEADER_BYTES: usize = 8;

pub struct Wal {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes appended since the last sync (0 = nothing pending).
    pending: u64,
}

fn checksum(bytes: &[u8]) -> u32 {
    let d = Sha256::digest(bytes);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

impl Wal {
    /// Opens (or creates) the log at `path` and returns it with every intact record in order.
    pub fn open(path: &Path) -> io::Result<(Wal, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut all = Vec::new();
        file.read_to_end(&mut all)?;
        let mut records = Vec::new();
        let mut at = 0usize;
        while all.len() - at >= HEADER_BYTES {
            let len = u32::from_le_bytes([all[at], all[at + 1], all[at + 2], all[at + 3]]) as usize;
            let sum = u32::from_le_bytes([all[at + 4], all[at + 5], all[at + 6], all[at + 7]]);
            if len > RECORD_BYTES_MAX || all.len() - at - HEADER_BYTES < len {
                break;
            }
            let body = &all[at + HEADER_BYTES..at + HEADER_BYTES + len];
            if checksum(body) != sum {
                break;
            }
            records.push(body.to_vec());
            at += HEADER_BYTES + len;
        }
        if at != all.len() {
            tracing_note(path, all.len() - at);
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(at as u64))?;
        Ok((
            Wal {
                path: path.to_path_buf(),
                out: BufWriter::new(file),
                pending: 0,
            },
            records,
        ))
    }

    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        if record.len() > RECORD_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "log record too large",
            ));
        }
        self.out.write_all(&(record.len() as u32).to_le_bytes())?;
        self.out.write_all(&checksum(record).to_le_bytes())?;
        self.out.write_all(record)?;
        self.pending += (HEADER_BYTES + record.len()) as u64;
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        self.pending = 0;
        Ok(())
    }

    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// Replaces the whole log with `records` (those still needed after a stable checkpoint),
    /// atomically: a crash leaves either the old log or the new one.
    pub fn rewrite(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        self.sync()?;
        let tmp = self.path.with_extension("rewrite");
        // A record that `open` would take for a torn tail must never be written: the log
        // would come back empty, a replica that forgot its votes.
        if let Some(r) = records.iter().find(|r| r.len() > RECORD_BYTES_MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("log record of {} bytes exceeds the limit", r.len()),
            ));
        }
        {
            let file = File::create(&tmp)?;
            let mut w = BufWriter::new(file);
            for r in records {
                w.write_all(&(r.len() as u32).to_le_bytes())?;
                w.write_all(&checksum(r).to_le_bytes())?;
                w.write_all(r)?;
            }
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let mut file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        file.seek(SeekFrom::End(0))?;
        self.out = BufWriter::new(file);
        Ok(())
    }
}

fn tracing_note(path: &Path, bytes: usize) {
    tracing::warn!(path = %path.display(), bytes, "write-ahead log ended in a torn or corrupt record; dropped it");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal");
        {
            let (mut w, r) = Wal::open(&p).unwrap();
            assert!(r.is_empty());
            w.append(b"one").unwrap();
            w.append(b"two").unwrap();
            w.sync().unwrap();
        }
        // A torn write: a header promising more bytes than were written.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&100u32.to_le_bytes()).unwrap();
        f.write_all(&[1, 2, 3, 4, 5]).unwrap();
        drop(f);
        {
            let (mut w, r) = Wal::open(&p).unwrap();
            assert_eq!(r, vec![b"one".to_vec(), b"two".to_vec()]);
            w.append(b"three").unwrap();
            w.sync().unwrap();
        }
        let (mut w, r) = Wal::open(&p).unwrap();
        assert_eq!(r.len(), 3);
        w.rewrite(&[b"three".to_vec()]).unwrap();
        w.append(b"four").unwrap();
        w.sync().unwrap();
        drop(w);
        let (_, r) = Wal::open(&p).unwrap();
        assert_eq!(r, vec![b"three".to_vec(), b"four".to_vec()]);
    }

    #[test]
    fn corrupted_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal");
        {
            let (mut w, _) = Wal::open(&p).unwrap();
            for i in 0..5u8 {
                w.append(&[i; 10]).unwrap();
            }
            w.sync().unwrap();
        }
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[2 * 18 + 8] ^= 0xff; // body of the third record
        std::fs::write(&p, bytes).unwrap();
        let (_, r) = Wal::open(&p).unwrap();
        assert_eq!(r.len(), 2);
    }
}
