//! The file-service workload of the simulator, and its sequential model.
//!
//! In: a scenario (its [`FsWorkload`], operations per client, share of reads on the read-only
//! path) and, as the run goes, each client's completed results. Out: per client a plan of
//! steps ([`plan`]), the concrete request for each step when the client invokes it
//! ([`FsClient::request`]), and [`check_results`], the checker of client results.
//!
//! Requests name objects by handle, and handles are only known once the service answered
//! (they depend on the agreed order of every client's creations), so a plan holds *steps*
//! ("write a little to a file", "part 2 of 3 of a large write") and the client turns each into
//! a request from what its own results taught it, as a real file client does from lookups.
//! Each client works under a directory of its own and keeps its names apart; the handles it
//! learnt may have gone stale in the meantime (several requests in flight), and the errors
//! that follows are results like any other.
//!
//! The check replays the agreed order on a reference [`FileService`] of its own (a sequential
//! execution of the same requests) and requires every result a client accepted on the ordered
//! path to be the reference's, and every read on the read-only path to be the reference's
//! answer at some state inside the read's real-time window. Timestamps are left out of the
//! comparison: they are the agreed times of the primaries, which the checker does not see;
//! whether the replicas agree on them is for the reply and checkpoint checkers.

use super::checkers::{HistoryEntry, Operation};
use super::service::FsWorkload;
use super::Rng;
use state_abstraction::fs::object::MAX_IO;
use state_abstraction::fs::{
    decode, encode, Attr, Caller, CreateHow, FileService, FsOp, FsReply, FsRequest, FsResult,
    Handle, SetAttrs, SetTime, Timespec,
};
use state_abstraction::Service;
use std::path::Path;

/// One step of a client's plan (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsStep {
    /// The client's own directory, `c<client>` in the root (its first step).
    MakeHome,
    Mkdir,
    Create,
    WriteSmall,
    /// Part `part` (from 0) of a write of `bytes` bytes, each part at most `MAX_IO`.
    WriteLarge {
        part: u64,
        bytes: u64,
    },
    Truncate,
    Rename,
    Unlink,
    Rmdir,
    SetMode,
    SetTimes,
    GetAttr,
    Lookup,
    ReadDir,
    Read,
}

impl FsStep {
    fn is_read(self) -> bool {
        matches!(
            self,
            FsStep::GetAttr | FsStep::Lookup | FsStep::ReadDir | FsStep::Read
        )
    }
}

/// Client `client`'s plan: `ops` steps (its home directory and a first file, then a mix),
/// with the large writes of `workload` spread over its second half, and whether each step
/// goes on the read-only path (reads only, `read_only_per_mille` of them).
pub fn plan(
    rng: &mut Rng,
    workload: &FsWorkload,
    ops: u64,
    read_only_per_mille: u64,
) -> Vec<(FsStep, bool)> {
    let mut steps = vec![FsStep::MakeHome, FsStep::Create];
    while (steps.len() as u64) < ops.max(2) {
        steps.push(match rng.below(100) {
            0..=11 => FsStep::Create,
            12..=16 => FsStep::Mkdir,
            17..=36 => FsStep::WriteSmall,
            37..=42 => FsStep::Truncate,
            43..=50 => FsStep::Rename,
            51..=57 => FsStep::Unlink,
            58..=59 => FsStep::Rmdir,
            60..=63 => FsStep::SetMode,
            64..=69 => FsStep::SetTimes,
            70..=77 => FsStep::GetAttr,
            78..=83 => FsStep::Lookup,
            84..=90 => FsStep::ReadDir,
            _ => FsStep::Read,
        });
    }
    let (low, high) = workload.large_write_bytes;
    for _ in 0..workload.large_writes {
        let bytes = rng.range(low.max(1), high.max(low.max(1)));
        let at = rng.range(steps.len() as u64 / 2, steps.len() as u64) as usize;
        let parts = bytes.div_ceil(MAX_IO);
        for part in (0..parts).rev() {
            steps.insert(at, FsStep::WriteLarge { part, bytes });
        }
    }
    steps
        .into_iter()
        .map(|step| {
            let read_only = step.is_read() && rng.chance(read_only_per_mille.min(1000));
            (step, read_only)
        })
        .collect()
}

/// A file this client created, where it last knew it to be.
#[derive(Clone, Debug)]
struct KnownFile {
    dir: Handle,
    name: Vec<u8>,
    handle: Handle,
    /// Size as of the client's latest result about it (to aim writes and reads).
    size: u64,
}

/// A directory this client made (not its home).
#[derive(Clone, Debug)]
struct KnownDir {
    parent: Handle,
    name: Vec<u8>,
    handle: Handle,
}

/// What one client knows, learnt from its own results. See the module doc.
pub struct FsClient {
    client: usize,
    rng: Rng,
    home: Option<Handle>,
    dirs: Vec<KnownDir>,
    files: Vec<KnownFile>,
    names: u64,
    /// The file and offset the current large write goes to.
    large: Option<(Handle, u64)>,
    /// Largest small write, so that the request fits the cluster's operation limit.
    small_write_max: u64,
    /// Largest read count.
    read_max: u64,
    /// Bytes of large-write parts that completed with success.
    pub large_write_bytes: u64,
}

impl FsClient {
    /// `operation_bytes_max`: the cluster's limit on one request.
    pub fn new(client: usize, rng: Rng, operation_bytes_max: usize, large: bool) -> Self {
        // Room for the caller, the handle, the offset and bincode's length prefixes.
        let room = (operation_bytes_max as u64).saturating_sub(256).max(1);
        FsClient {
            client,
            rng,
            home: None,
            dirs: Vec::new(),
            files: Vec::new(),
            names: 0,
            large: None,
            small_write_max: room.min(16 << 10),
            read_max: if large { MAX_IO } else { 16 << 10 },
            large_write_bytes: 0,
        }
    }

    fn fresh_name(&mut self, prefix: &str) -> Vec<u8> {
        self.names += 1;
        format!("{prefix}{}.{}", self.client, self.names).into_bytes()
    }

    /// A directory to work in: home, one of its own, or the root before home is known.
    fn some_dir(&mut self) -> Handle {
        let home = self.home.unwrap_or(Handle::ROOT);
        let k = self.rng.below(self.dirs.len() as u64 + 1) as usize;
        self.dirs.get(k).map_or(home, |d| d.handle)
    }

    fn some_file(&mut self) -> Option<usize> {
        if self.files.is_empty() {
            None
        } else {
            Some(self.rng.below(self.files.len() as u64) as usize)
        }
    }

    fn some_object(&mut self) -> Handle {
        match self.some_file() {
            Some(f) if self.rng.chance(700) => self.files[f].handle,
            _ => self.some_dir(),
        }
    }

    fn data(&mut self, len: u64) -> Vec<u8> {
        let mut data = vec![0u8; len as usize];
        self.rng.fill(&mut data);
        data
    }

    fn time(&mut self) -> SetTime {
        if self.rng.chance(300) {
            SetTime::Now
        } else {
            SetTime::At(Timespec {
                secs: self.rng.below(2_000_000_000) as i64,
                nsecs: self.rng.below(1_000_000_000) as u32,
            })
        }
    }

    fn create(&mut self) -> FsOp {
        let dir = self.some_dir();
        let name = self.fresh_name("f");
        FsOp::Create {
            dir,
            name,
            mode: 0o644,
            how: CreateHow::Guarded,
        }
    }

    /// The request for `step`, from what this client knows now. A step that needs a file
    /// when the client knows none creates one instead.
    pub fn request(&mut self, step: FsStep) -> FsRequest {
        let op = match step {
            FsStep::MakeHome => FsOp::Mkdir {
                dir: Handle::ROOT,
                name: format!("c{}", self.client).into_bytes(),
                mode: 0o755,
            },
            FsStep::Mkdir => {
                let dir = self.some_dir();
                let name = self.fresh_name("d");
                FsOp::Mkdir {
                    dir,
                    name,
                    mode: 0o755,
                }
            }
            FsStep::Create => {
                if let (Some(f), true) = (self.some_file(), self.rng.chance(100)) {
                    // Open an existing name (an unchecked create is an open).
                    let file = self.files[f].clone();
                    FsOp::Create {
                        dir: file.dir,
                        name: file.name,
                        mode: 0o600,
                        how: CreateHow::Unchecked,
                    }
                } else {
                    self.create()
                }
            }
            FsStep::WriteSmall => match self.some_file() {
                None => self.create(),
                Some(f) => {
                    let file = self.files[f].clone();
                    let len = self.rng.range(1, self.small_write_max);
                    let offset = self.rng.below(file.size + 4096);
                    let data = self.data(len);
                    FsOp::Write {
                        h: file.handle,
                        offset,
                        data,
                    }
                }
            },
            FsStep::WriteLarge { part, bytes } => {
                if part == 0 || self.large.is_none() {
                    self.large = self.some_file().map(|f| {
                        let file = &self.files[f];
                        (file.handle, file.size.min(MAX_IO))
                    });
                }
                match self.large {
                    None => self.create(),
                    Some((h, base)) => {
                        let done = part * MAX_IO;
                        let len = MAX_IO.min(bytes.saturating_sub(done)).max(1);
                        let data = self.data(len);
                        FsOp::Write {
                            h,
                            offset: base + done,
                            data,
                        }
                    }
                }
            }
            FsStep::Truncate => match self.some_file() {
                None => self.create(),
                Some(f) => {
                    let file = self.files[f].clone();
                    let size = self.rng.below(2 * file.size + 8192);
                    FsOp::SetAttr {
                        h: file.handle,
                        set: SetAttrs {
                            size: Some(size),
                            ..SetAttrs::default()
                        },
                    }
                }
            },
            FsStep::Rename => match self.some_file() {
                None => self.create(),
                Some(f) => {
                    let file = self.files[f].clone();
                    let (to_dir, to_name) = match self.some_file() {
                        // Onto another of its files (replacing it), sometimes.
                        Some(g) if g != f && self.rng.chance(300) => {
                            (self.files[g].dir, self.files[g].name.clone())
                        }
                        _ => {
                            let dir = self.some_dir();
                            (dir, self.fresh_name("r"))
                        }
                    };
                    FsOp::Rename {
                        from_dir: file.dir,
                        from_name: file.name,
                        to_dir,
                        to_name,
                        no_replace: self.rng.chance(200),
                    }
                }
            },
            FsStep::Unlink => match self.some_file() {
                None => {
                    let dir = self.some_dir();
                    FsOp::Remove {
                        dir,
                        name: self.fresh_name("none"),
                    }
                }
                Some(f) => FsOp::Remove {
                    dir: self.files[f].dir,
                    name: self.files[f].name.clone(),
                },
            },
            FsStep::Rmdir => {
                if self.dirs.is_empty() {
                    let dir = self.some_dir();
                    let name = self.fresh_name("d");
                    FsOp::Mkdir {
                        dir,
                        name,
                        mode: 0o700,
                    }
                } else {
                    let k = self.rng.below(self.dirs.len() as u64) as usize;
                    FsOp::Rmdir {
                        dir: self.dirs[k].parent,
                        name: self.dirs[k].name.clone(),
                    }
                }
            }
            FsStep::SetMode => {
                let h = self.some_object();
                let mode = [0o600, 0o644, 0o640, 0o755][self.rng.below(4) as usize];
                FsOp::SetAttr {
                    h,
                    set: SetAttrs {
                        mode: Some(mode),
                        ..SetAttrs::default()
                    },
                }
            }
            FsStep::SetTimes => {
                let h = self.some_object();
                let atime = Some(self.time());
                let mtime = Some(self.time());
                FsOp::SetAttr {
                    h,
                    set: SetAttrs {
                        atime,
                        mtime,
                        ..SetAttrs::default()
                    },
                }
            }
            FsStep::GetAttr => FsOp::GetAttr {
                h: self.some_object(),
            },
            FsStep::Lookup => match self.some_file() {
                Some(f) if self.rng.chance(800) => FsOp::Lookup {
                    dir: self.files[f].dir,
                    name: self.files[f].name.clone(),
                },
                _ => {
                    let dir = self.some_dir();
                    FsOp::Lookup {
                        dir,
                        name: self.fresh_name("none"),
                    }
                }
            },
            FsStep::ReadDir => {
                let dir = self.some_dir();
                FsOp::ReadDir {
                    dir,
                    cookie: 0,
                    count: 64,
                    plus: self.rng.chance(500),
                }
            }
            FsStep::Read => match self.some_file() {
                None => FsOp::GetAttr { h: self.some_dir() },
                Some(f) => {
                    let file = self.files[f].clone();
                    let offset = self.rng.below(file.size + 1);
                    let count = self.rng.range(1, self.read_max) as u32;
                    FsOp::Read {
                        h: file.handle,
                        offset,
                        count,
                    }
                }
            },
        };
        FsRequest {
            caller: Caller::root(),
            op,
        }
    }

    /// Learns from the result of one of this client's requests (whatever it is: the checker
    /// judges results, the client only uses them, as a real one would).
    pub fn completed(&mut self, request: &FsRequest, result: &[u8]) {
        let Some(Ok(reply)) = decode::<FsResult>(result) else {
            return;
        };
        match (&request.op, reply) {
            (FsOp::Mkdir { dir, name, .. }, FsReply::Entry { handle, .. }) => {
                if *dir == Handle::ROOT && *name == format!("c{}", self.client).into_bytes() {
                    self.home = Some(handle);
                } else {
                    self.dirs.push(KnownDir {
                        parent: *dir,
                        name: name.clone(),
                        handle,
                    });
                }
            }
            (FsOp::Create { dir, name, .. }, FsReply::Entry { handle, attr }) => {
                self.files.retain(|f| !(f.dir == *dir && f.name == *name));
                self.files.push(KnownFile {
                    dir: *dir,
                    name: name.clone(),
                    handle,
                    size: attr.size,
                });
            }
            (FsOp::Remove { dir, name }, FsReply::Done) => {
                self.files.retain(|f| !(f.dir == *dir && f.name == *name));
            }
            (FsOp::Rmdir { dir, name }, FsReply::Done) => {
                self.dirs.retain(|d| !(d.parent == *dir && d.name == *name));
            }
            (
                FsOp::Rename {
                    from_dir,
                    from_name,
                    to_dir,
                    to_name,
                    ..
                },
                FsReply::Done,
            ) => {
                self.files
                    .retain(|f| !(f.dir == *to_dir && f.name == *to_name));
                for f in &mut self.files {
                    if f.dir == *from_dir && f.name == *from_name {
                        f.dir = *to_dir;
                        f.name = to_name.clone();
                    }
                }
            }
            (FsOp::Write { h, data, .. }, FsReply::Write { attr, .. }) => {
                if data.len() as u64 >= MAX_IO / 2 {
                    self.large_write_bytes += data.len() as u64;
                }
                self.note_size(*h, &attr);
            }
            (FsOp::SetAttr { h, .. } | FsOp::GetAttr { h }, FsReply::Attr(attr)) => {
                self.note_size(*h, &attr)
            }
            _ => {}
        }
    }

    fn note_size(&mut self, h: Handle, attr: &Attr) {
        for f in &mut self.files {
            if f.handle == h {
                f.size = attr.size;
            }
        }
    }
}

/// `result` with every timestamp zeroed (see the module doc), or `None` if it does not
/// decode as a file-service result.
fn without_times(result: &[u8]) -> Option<FsResult> {
    fn clear(attr: &mut Attr) {
        attr.atime = Timespec::default();
        attr.mtime = Timespec::default();
        attr.ctime = Timespec::default();
    }
    let mut result = decode::<FsResult>(result)?;
    match &mut result {
        Ok(FsReply::Attr(attr))
        | Ok(FsReply::Entry { attr, .. })
        | Ok(FsReply::Write { attr, .. }) => clear(attr),
        Ok(FsReply::ReadDir { entries, .. }) => {
            for entry in entries {
                if let Some(attr) = &mut entry.attr {
                    clear(attr);
                }
            }
        }
        _ => {}
    }
    Some(result)
}

/// A result for a failure message: data as its length and first bytes (reads are up to a
/// MiB).
fn show(result: &Option<FsResult>) -> String {
    match result {
        Some(Ok(FsReply::Read { data, eof })) => format!(
            "Ok(Read {{ {} bytes starting {:02x?}, eof: {eof} }})",
            data.len(),
            &data[..data.len().min(8)]
        ),
        None => "bytes that do not decode as a file-service result".to_string(),
        other => format!("{other:?}"),
    }
}

/// Checks the clients' file-service results (see the module doc). `order`: history indices
/// in the agreed order; `reads`: (history index, lowest state, highest state) of each read
/// answered on the read-only path, a state being the number of ordered requests applied.
/// `dir`: an empty directory for the reference service.
pub fn check_results(
    history: &[HistoryEntry],
    order: &[usize],
    reads: &[(usize, usize, usize)],
    dir: &Path,
) -> Result<(), String> {
    // From empty, whatever an earlier check left there.
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("reference file service: {}: {e}", dir.display()))
        }
        _ => {}
    }
    let mut reference =
        FileService::open(dir).map_err(|e| format!("reference file service: {e}"))?;
    let mut answered = vec![false; reads.len()];
    let request_of = |h: usize| match &history[h].op {
        Operation::Fs(request) => Ok(encode(&**request)),
        other => Err(format!("a file-service run executed {other:?}")),
    };
    let mut check_reads = |state: usize, reference: &mut FileService| -> Result<(), String> {
        for (k, &(h, low, high)) in reads.iter().enumerate() {
            if answered[k] || state < low || state > high {
                continue;
            }
            let Some(result) = &history[h].result else {
                answered[k] = true;
                continue;
            };
            let want = reference.execute(&request_of(h)?, history[h].client, &[], true);
            answered[k] = without_times(&want) == without_times(result);
        }
        Ok(())
    };
    check_reads(0, &mut reference)?;
    for (pos, &h) in order.iter().enumerate() {
        let entry = &history[h];
        // The reference's times are its own (see the module doc): one second per request.
        let now = encode(&((pos as u64 + 1) * 1_000_000_000));
        let want = reference.execute(&request_of(h)?, entry.client, &now, false);
        if let (Some(result), false) = (&entry.result, entry.read_only_path) {
            let got = without_times(result);
            if got.is_none() || got != without_times(&want) {
                return Err(format!(
                    "file results: {:?} request {:?} ({:?}) returned {}, the agreed order gives {} (times aside)",
                    entry.client,
                    entry.id,
                    entry.op,
                    show(&got),
                    show(&without_times(&want))
                ));
            }
        }
        check_reads(pos + 1, &mut reference)?;
    }
    for (k, &(h, low, high)) in reads.iter().enumerate() {
        if !answered[k] {
            let e = &history[h];
            return Err(format!(
                "file results: read-only {:?}/{:?} ({:?}) returned {}, which no state between {low} and {high} of the agreed order gives (times aside)",
                e.client,
                e.id,
                e.op,
                show(&e.result.as_deref().and_then(without_times))
            ));
        }
    }
    Ok(())
}
