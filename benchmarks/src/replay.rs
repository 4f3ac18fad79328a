//! `bftfs-bench replay`: replays an NFSv3 trace in Ellard's nfsdump text format against
//! mounted directories.
//!
//! In: a trace (plain text, `.zst` or `.gz`, detected by its first bytes), one or more
//! directories to replay into, a pace (`--speed X` times the trace's own pace, or `--max`).
//! Out: per directory and run, ops/s, latency percentiles per procedure, how many replayed
//! results agreed with the status the trace's server replied, and every line that could not be
//! mapped, counted by reason (malformed lines with their line numbers).
//!
//! How (after TBBT, FAST 2005):
//! 1. A first pass over the trace pairs calls with replies by (client, XID) and finds the
//!    objects the trace uses before it creates them: handles first seen in a LOOKUP reply
//!    (placed at that directory and name), handles used by a call without ever having been
//!    returned (placed at the stable placeholder `.replay-orphans/fh-<handle>` unless a later
//!    LOOKUP shows where they live), and names removed or renamed that no earlier reply
//!    created. Types, modes and sizes come from the first attributes the trace shows for each.
//! 2. That initial tree is made in a fresh directory `bftfs-replay-<pid>-<n>` under each mount
//!    (the export root, i.e. the handle of the first FSINFO, maps to that directory).
//! 3. A second pass issues, for every (call, reply) pair in reply order, the system calls a
//!    server makes for that procedure: getattr/lookup/access → `lstat`, read/write → `pread`/
//!    `pwrite` at the trace's offset and count, create → `open(O_CREAT[|O_EXCL])`, mkdir,
//!    symlink, mknod, unlink, rmdir, rename, link, setattr → chmod/lchown/truncate/utimensat,
//!    readdir(plus) → a full directory listing (continuations with a non-zero cookie are
//!    served by it), fsstat/fsinfo/pathconf → `statvfs`, commit → `fsync`. The namespace
//!    (which path each handle names) follows the trace's replies, not the replayed results, so
//!    one disagreement does not derail the rest.
//!
//! Memory is bounded by the number of distinct handles and names and by the calls in flight
//! (at most [`PENDING_CALLS_MAX`]), never by the length of the trace: both passes stream.
//! Open files are cached per handle (at most [`OPEN_FILES_MAX`]), as NFS servers do.

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use nix::fcntl::{AtFlags, AT_FDCWD};
use nix::sys::stat::{self, Mode, SFlag};
use nix::sys::time::TimeSpec;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Calls waiting for their reply; past this the oldest is dropped (counted as "no reply").
pub const PENDING_CALLS_MAX: usize = 65_536;
/// Open file descriptors cached per handle for read/write/commit.
pub const OPEN_FILES_MAX: usize = 256;
/// Malformed lines whose numbers are listed in the report (all are counted).
const MALFORMED_LISTED_MAX: usize = 20;
const ORPHANS_DIR: &str = ".replay-orphans";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Trace in nfsdump text format: plain, zstd or gzip (detected from the first bytes).
    pub trace: PathBuf,
    /// Directory to replay into (usually a mount point). Repeat to replay against several in
    /// one run; with --runs N the directories alternate round by round. Each replay runs in a
    /// fresh subdirectory `bftfs-replay-<pid>-<n>`, removed afterwards unless --keep.
    #[arg(long, required = true)]
    pub mount: Vec<PathBuf>,
    /// Replay at X times the trace's pace (calls are issued no earlier than their time / X).
    #[arg(long, conflicts_with = "max")]
    pub speed: Option<f64>,
    /// Replay as fast as possible (the default when --speed is not given).
    #[arg(long)]
    pub max: bool,
    /// Replays per directory.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Keep the replay directories.
    #[arg(long)]
    pub keep: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Exit with an error if the fraction of replayed results that agree with the trace is
    /// below this (0..1) on any directory.
    #[arg(long)]
    pub min_agreement: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// Parsing

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Call,
    Reply,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// An nfsstat3 error code.
    Error(u32),
    /// The RPC itself was rejected (`DENIED`, `RPCERR`).
    Rejected(String),
}

/// One line of the trace. Fields are kept in order: keys repeat within a line.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub time_us: u64,
    pub src: &'a str,
    pub dst: &'a str,
    pub version: u8,
    pub direction: Direction,
    pub xid: u32,
    pub procedure: u32,
    pub name: &'a str,
    /// Replies only.
    pub status: Option<Status>,
    pub fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Record<'a> {
    /// The value of the `nth` (0-based) occurrence of `key`.
    pub fn field_nth(&self, key: &str, nth: usize) -> Option<&'a str> {
        self.fields
            .iter()
            .filter(|(k, _)| *k == key)
            .nth(nth)
            .map(|(_, v)| *v)
    }
    pub fn field(&self, key: &str) -> Option<&'a str> {
        self.field_nth(key, 0)
    }
    pub fn hex(&self, key: &str) -> Result<Option<u64>, String> {
        self.field(key).map(parse_hex).transpose()
    }
    pub fn quoted(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.field(key).map(decode_quoted).transpose()
    }
    /// Attribute blocks in order; each starts at an `ftype` key.
    pub fn attributes(&self) -> Vec<Attributes> {
        let mut blocks: Vec<Attributes> = Vec::new();
        for (key, value) in &self.fields {
            match *key {
                "ftype" => blocks.push(Attributes {
                    ftype: parse_hex(value).unwrap_or(0) as u32,
                    ..Attributes::default()
                }),
                "mode" | "size" => {
                    if let Some(last) = blocks.last_mut() {
                        let v = parse_hex(value).unwrap_or(0);
                        if *key == "mode" {
                            last.mode = v as u32;
                        } else {
                            last.size = v;
                        }
                    }
                }
                _ => {}
            }
        }
        blocks
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attributes {
    pub ftype: u32,
    pub mode: u32,
    pub size: u64,
}

pub fn parse_hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s, 16).map_err(|_| format!("not a hex number: {s:?}"))
}

/// `sec.usec` (decimal) to microseconds.
pub fn parse_time_us(s: &str) -> Result<u64, String> {
    let (sec, usec) = s.split_once('.').unwrap_or((s, "0"));
    let sec: u64 = sec.parse().map_err(|_| format!("bad time {s:?}"))?;
    if usec.is_empty() || usec.len() > 6 || !usec.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad time {s:?}"));
    }
    let usec: u64 = usec.parse().map_err(|_| format!("bad time {s:?}"))?;
    let scale = 10u64.pow(6 - s.split_once('.').map_or(1, |(_, u)| u.len()) as u32);
    Ok(sec * 1_000_000 + usec * scale)
}

/// A double-quoted string with bytes outside 0x21..=0x7e, `"` and `%` written as `%XX`.
pub fn decode_quoted(s: &str) -> Result<Vec<u8>, String> {
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .filter(|_| s.len() >= 2)
        .ok_or_else(|| format!("not a quoted string: {s:?}"))?;
    let bytes = inner.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or_else(|| format!("truncated %XX escape in {s:?}"))?;
                let hex = std::str::from_utf8(hex).map_err(|_| format!("bad escape in {s:?}"))?;
                let byte =
                    u8::from_str_radix(hex, 16).map_err(|_| format!("bad %XX escape in {s:?}"))?;
                out.push(byte);
                i += 3;
            }
            b'"' => return Err(format!("unescaped quote inside {s:?}")),
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn parse_status_word(word: &str) -> Result<Status, String> {
    match word {
        "OK" => Ok(Status::Ok),
        "DENIED" | "RPCERR" => Ok(Status::Rejected(word.to_string())),
        _ => match parse_hex(word)? {
            0 => Ok(Status::Ok),
            n => Ok(Status::Error(n as u32)),
        },
    }
}

/// Parses one line. Runs of whitespace separate tokens (a NULL reply has two spaces where the
/// status word would be).
pub fn parse_line(line: &str) -> Result<Record<'_>, String> {
    let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
    if tokens.len() < 8 {
        return Err(format!("too few columns ({})", tokens.len()));
    }
    let time_us = parse_time_us(tokens[0])?;
    let (src, dst) = (tokens[1], tokens[2]);
    for host in [src, dst] {
        let ok = host
            .split_once('.')
            .is_some_and(|(a, p)| parse_hex(a).is_ok() && parse_hex(p).is_ok());
        if !ok {
            return Err(format!("bad host {host:?}"));
        }
    }
    if !matches!(tokens[3], "T" | "U") {
        return Err(format!("bad protocol {:?}", tokens[3]));
    }
    let dir = tokens[4].as_bytes();
    if dir.len() != 2 || !matches!(dir[0], b'C' | b'R') || !dir[1].is_ascii_digit() {
        return Err(format!("bad direction {:?}", tokens[4]));
    }
    let direction = if dir[0] == b'C' {
        Direction::Call
    } else {
        Direction::Reply
    };
    let version = dir[1] - b'0';
    let xid = u32::from_str_radix(tokens[5], 16).map_err(|_| format!("bad xid {:?}", tokens[5]))?;
    let procedure =
        u32::from_str_radix(tokens[6], 16).map_err(|_| format!("bad procedure {:?}", tokens[6]))?;
    let name = tokens[7];
    let mut i = 8;
    let mut status = None;
    if direction == Direction::Reply {
        let word = tokens.get(i).ok_or("reply without status")?;
        if !word.starts_with("status=") {
            status = Some(parse_status_word(word)?);
            i += 1;
        }
    }
    let mut fields = Vec::new();
    let mut tail_seen = false;
    while i < tokens.len() {
        let token = tokens[i];
        if let Some(code) = token.strip_prefix("status=") {
            if direction != Direction::Reply {
                return Err("status= in a call".into());
            }
            let tail_status = parse_status_word(code)?;
            match &status {
                None => status = Some(tail_status),
                Some(Status::Rejected(_)) => {}
                Some(word) if *word != tail_status => {
                    return Err(format!("status word {word:?} disagrees with status={code}"));
                }
                Some(_) => {}
            }
            expect_tail(&tokens[i + 1..], &["pl", "con", "len"])?;
            tail_seen = true;
            break;
        }
        if token == "con" && tokens.get(i + 1) == Some(&"=") {
            if direction != Direction::Call {
                return Err("reply tail without status=".into());
            }
            expect_tail(&tokens[i..], &["con", "len"])?;
            tail_seen = true;
            break;
        }
        let value = tokens
            .get(i + 1)
            .ok_or_else(|| format!("key {token:?} without a value"))?;
        fields.push((token, *value));
        i += 2;
    }
    if !tail_seen {
        return Err("missing tail (con = N len = N)".into());
    }
    Ok(Record {
        time_us,
        src,
        dst,
        version,
        direction,
        xid,
        procedure,
        name,
        status,
        fields,
    })
}

fn expect_tail(tokens: &[&str], keys: &[&str]) -> Result<(), String> {
    if tokens.len() != keys.len() * 3 {
        return Err(format!("bad tail: {:?}", tokens.join(" ")));
    }
    for (chunk, key) in tokens.chunks(3).zip(keys) {
        if chunk[0] != *key
            || chunk[1] != "="
            || chunk[2].parse::<u64>().is_err() && parse_hex(chunk[2]).is_err()
        {
            return Err(format!("bad tail: {:?}", tokens.join(" ")));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Streaming the trace and pairing calls with replies

/// Opens a trace, decompressing zstd or gzip as detected from its magic bytes.
pub fn open_trace(path: &Path) -> Result<(Box<dyn BufRead>, u64)> {
    let mut file = File::open(path).with_context(|| format!("opening trace {}", path.display()))?;
    let length = file.metadata()?.len();
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic)?;
    let file = File::open(path)?;
    let reader: Box<dyn BufRead> = if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(BufReader::with_capacity(
            1 << 16,
            zstd::stream::read::Decoder::new(file)?,
        ))
    } else if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(BufReader::new(file)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, file))
    };
    Ok((reader, length))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = file.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// What the pairing stream hands out.
enum Event<'a> {
    /// A call and its reply, at the reply's position in the trace.
    Pair {
        call_line: u64,
        call: Record<'a>,
        reply: Record<'a>,
    },
    /// A line that is not an NFSv3 call/reply we can use, with the reason.
    Unmapped(&'static str),
    Malformed {
        line: u64,
        reason: String,
    },
}

/// Pairs calls with replies by (client, xid), holding at most `PENDING_CALLS_MAX` calls.
struct Pairer {
    pending: HashMap<(String, u32), (u64, String)>,
    order: VecDeque<(String, u32)>,
    pub evicted: u64,
}

impl Pairer {
    fn new() -> Self {
        Pairer {
            pending: HashMap::new(),
            order: VecDeque::new(),
            evicted: 0,
        }
    }

    /// Feeds one line; calls `f` with the resulting event, if any.
    fn feed(&mut self, line_no: u64, line: &str, f: &mut dyn FnMut(Event<'_>)) {
        if line.trim().is_empty() {
            return;
        }
        let record = match parse_line(line) {
            Ok(r) => r,
            Err(reason) => {
                return f(Event::Malformed {
                    line: line_no,
                    reason,
                })
            }
        };
        if record.version != 3 {
            return f(Event::Unmapped("not NFSv3"));
        }
        match record.direction {
            Direction::Call => {
                let key = (record.src.to_string(), record.xid);
                if self
                    .pending
                    .insert(key.clone(), (line_no, line.to_string()))
                    .is_some()
                {
                    f(Event::Unmapped(
                        "call retransmitted or xid reused before its reply",
                    ));
                } else {
                    self.order.push_back(key);
                }
                while self.pending.len() > PENDING_CALLS_MAX {
                    let Some(old) = self.order.pop_front() else {
                        break;
                    };
                    if self.pending.remove(&old).is_some() {
                        self.evicted += 1;
                        f(Event::Unmapped("call without reply"));
                    }
                }
                if self.order.len() > 4 * PENDING_CALLS_MAX {
                    let pending = &self.pending;
                    self.order.retain(|k| pending.contains_key(k));
                }
            }
            Direction::Reply => {
                let key = (record.dst.to_string(), record.xid);
                let Some((call_line, call_text)) = self.pending.remove(&key) else {
                    return f(Event::Unmapped("reply without call"));
                };
                let call = match parse_line(&call_text) {
                    Ok(c) => c,
                    Err(reason) => {
                        return f(Event::Malformed {
                            line: call_line,
                            reason,
                        })
                    }
                };
                if call.procedure != record.procedure || call.name != record.name {
                    return f(Event::Unmapped("reply procedure differs from its call's"));
                }
                f(Event::Pair {
                    call_line,
                    call,
                    reply: record,
                });
            }
        }
    }

    fn finish(&mut self, f: &mut dyn FnMut(Event<'_>)) {
        for _ in 0..self.pending.len() {
            f(Event::Unmapped("call without reply"));
        }
        self.pending.clear();
        self.order.clear();
    }
}

/// Reads the trace line by line and feeds the pairer. Returns the number of lines.
fn stream_trace(
    path: &Path,
    progress: Option<&indicatif::ProgressBar>,
    f: &mut dyn FnMut(Event<'_>),
) -> Result<u64> {
    let (mut reader, _) = open_trace(path)?;
    let mut pairer = Pairer::new();
    let mut buf = Vec::with_capacity(1024);
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if let Some(p) = progress {
            if line_no % 4096 == 0 {
                p.set_position(line_no);
            }
        }
        match std::str::from_utf8(&buf) {
            Ok(line) => pairer.feed(line_no, line.trim_end_matches(['\n', '\r']), f),
            Err(_) => f(Event::Malformed {
                line: line_no,
                reason: "not UTF-8".into(),
            }),
        }
    }
    pairer.finish(f);
    if let Some(p) = progress {
        p.set_position(line_no);
    }
    Ok(line_no)
}

// ---------------------------------------------------------------------------------------------
// Procedures

/// Defines `Proc` from one list of the NFSv3 procedures in the order of their numbers, each
/// with its label in the reports, so that number, variant and label cannot drift apart.
macro_rules! procs {
    ($($proc:ident => $label:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Proc {
            $($proc,)*
        }

        impl Proc {
            pub fn from_number(n: u32) -> Option<Proc> {
                const ALL: &[Proc] = &[$(Proc::$proc,)*];
                ALL.get(n as usize).copied()
            }
            pub fn label(self) -> &'static str {
                match self {
                    $(Proc::$proc => $label,)*
                }
            }
        }
    };
}

procs! {
    Null => "null",
    Getattr => "getattr",
    Setattr => "setattr",
    Lookup => "lookup",
    Access => "access",
    Readlink => "readlink",
    Read => "read",
    Write => "write",
    Create => "create",
    Mkdir => "mkdir",
    Symlink => "symlink",
    Mknod => "mknod",
    Remove => "remove",
    Rmdir => "rmdir",
    Rename => "rename",
    Link => "link",
    Readdir => "readdir",
    Readdirplus => "readdirp",
    Fsstat => "fsstat",
    Fsinfo => "fsinfo",
    Pathconf => "pathconf",
    Commit => "commit",
}

// ---------------------------------------------------------------------------------------------
// Handles and the namespace

type HandleId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Other,
}

impl Kind {
    fn from_ftype(ftype: u32) -> Kind {
        match ftype {
            1 => Kind::File,
            2 => Kind::Dir,
            5 => Kind::Symlink,
            7 => Kind::Fifo,
            _ => Kind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Loc {
    /// Not known to name anything now (removed, or created by a reply without a handle).
    Unknown,
    /// The export root: the replay directory itself.
    Root,
    /// Never seen in a lookup: `.replay-orphans/fh-<handle>`.
    Orphan,
    Entry {
        parent: HandleId,
        name: Box<[u8]>,
    },
}

/// An object the trace uses before creating it.
#[derive(Debug, Clone)]
struct Initial {
    loc: Loc,
    kind: Kind,
    mode: Option<u32>,
    size: u64,
    symlink_target: Option<Vec<u8>>,
    attributes_known: bool,
}

#[derive(Default)]
struct Handles {
    ids: HashMap<Box<str>, HandleId>,
    names: Vec<Box<str>>,
}

impl Handles {
    fn intern(&mut self, handle: &str) -> HandleId {
        if let Some(&id) = self.ids.get(handle) {
            return id;
        }
        let id = self.names.len() as HandleId;
        self.ids.insert(handle.into(), id);
        self.names.push(handle.into());
        id
    }
}

/// Result of the first pass: the initial tree.
struct Plan {
    handles: Handles,
    /// Indexed by handle id; `Some` for objects that exist before the trace creates anything.
    initial: Vec<Option<Initial>>,
    /// Names (directory, name, kind) removed or renamed by the trace that no reply had shown.
    name_only: Vec<(HandleId, Vec<u8>, Kind)>,
    root: Option<HandleId>,
    lines: u64,
    malformed: u64,
    malformed_listed: Vec<(u64, String)>,
}

fn call_handles<'a>(call: &Record<'a>) -> Vec<(&'static str, &'a str)> {
    ["fh", "fh2"]
        .into_iter()
        .filter_map(|k| call.field(k).map(|v| (k, v)))
        .collect()
}

/// Kind an object must have, from how a call uses it (when no attributes say).
fn kind_from_use(proc: Proc, key: &str) -> Kind {
    use Proc::*;
    match (proc, key) {
        (
            Lookup | Create | Mkdir | Symlink | Mknod | Remove | Rmdir | Readdir | Readdirplus,
            "fh",
        ) => Kind::Dir,
        (Rename, _) | (Link, "fh2") => Kind::Dir,
        (Readlink, _) => Kind::Symlink,
        _ => Kind::File,
    }
}

fn first_pass(path: &Path, progress: Option<&indicatif::ProgressBar>) -> Result<Plan> {
    let mut handles = Handles::default();
    let mut initial: Vec<Option<Initial>> = Vec::new();
    let mut known: Vec<bool> = Vec::new();
    let mut names_exist: HashSet<(HandleId, Vec<u8>)> = HashSet::new();
    let mut name_only = Vec::new();
    let mut root = None;
    let mut malformed = 0u64;
    let mut malformed_listed = Vec::new();

    let mut on_event = |event: Event<'_>| {
        let (call, reply) = match event {
            Event::Pair { call, reply, .. } => (call, reply),
            Event::Malformed { line, reason } => {
                malformed += 1;
                if malformed_listed.len() < MALFORMED_LISTED_MAX {
                    malformed_listed.push((line, reason));
                }
                return;
            }
            Event::Unmapped(_) => return,
        };
        let Some(proc) = Proc::from_number(call.procedure) else {
            return;
        };
        let ok = reply.status == Some(Status::Ok);
        let attributes = reply.attributes();
        let intern = |h: &str,
                      handles: &mut Handles,
                      initial: &mut Vec<Option<Initial>>,
                      known: &mut Vec<bool>| {
            let id = handles.intern(h);
            if initial.len() <= id as usize {
                initial.resize(id as usize + 1, None);
                known.resize(id as usize + 1, false);
            }
            id
        };
        for (key, h) in call_handles(&call) {
            let id = intern(h, &mut handles, &mut initial, &mut known);
            if !known[id as usize] {
                known[id as usize] = true;
                let is_root = root.is_none() && proc == Proc::Fsinfo;
                if is_root {
                    root = Some(id);
                }
                initial[id as usize] = Some(Initial {
                    loc: if is_root { Loc::Root } else { Loc::Orphan },
                    kind: if is_root {
                        Kind::Dir
                    } else {
                        kind_from_use(proc, key)
                    },
                    mode: None,
                    size: 0,
                    symlink_target: None,
                    attributes_known: false,
                });
            }
            // The first attributes the trace shows for a pre-existing object describe it.
            if let Some(init) = initial[id as usize].as_mut() {
                if key == "fh" && !init.attributes_known && ok {
                    let object_attributes = match proc {
                        Proc::Getattr
                        | Proc::Setattr
                        | Proc::Access
                        | Proc::Readlink
                        | Proc::Read
                        | Proc::Write
                        | Proc::Commit
                        | Proc::Fsstat
                        | Proc::Fsinfo
                        | Proc::Pathconf
                        | Proc::Readdir
                        | Proc::Readdirplus => attributes.first().copied(),
                        _ => None,
                    };
                    if let Some(a) = object_attributes {
                        init.attributes_known = true;
                        init.kind = Kind::from_ftype(a.ftype);
                        init.mode = Some(a.mode);
                        init.size = reply.hex("pre-size").ok().flatten().unwrap_or(a.size);
                        if init.loc == Loc::Root {
                            init.kind = Kind::Dir;
                        }
                    }
                }
                if proc == Proc::Readlink && ok && init.symlink_target.is_none() {
                    init.symlink_target = reply.quoted("name").ok().flatten();
                }
            }
        }
        let dir = call.field("fh").map(|h| handles.intern(h));
        let name = call.quoted("name").ok().flatten();
        match proc {
            Proc::Lookup if ok => {
                let (Some(dir), Some(name), Some(h)) = (dir, name, reply.field("fh")) else {
                    return;
                };
                let id = intern(h, &mut handles, &mut initial, &mut known);
                let entry = Loc::Entry {
                    parent: dir,
                    name: name.clone().into(),
                };
                let a = attributes.first().copied().unwrap_or_default();
                let dir_pre_existing = initial.get(dir as usize).is_some_and(Option::is_some);
                if !known[id as usize] {
                    known[id as usize] = true;
                    if dir_pre_existing && id != dir {
                        initial[id as usize] = Some(Initial {
                            loc: entry,
                            kind: Kind::from_ftype(a.ftype),
                            mode: Some(a.mode),
                            size: a.size,
                            symlink_target: None,
                            attributes_known: true,
                        });
                    }
                } else if let Some(init) = initial[id as usize].as_mut() {
                    // A handle used before any lookup: now we know where it lives.
                    if init.loc == Loc::Orphan && dir_pre_existing && id != dir {
                        init.loc = entry;
                    }
                }
                names_exist.insert((dir, name));
            }
            Proc::Create | Proc::Mkdir | Proc::Symlink | Proc::Mknod if ok => {
                if let Some(h) = reply.field("fh") {
                    let id = intern(h, &mut handles, &mut initial, &mut known);
                    known[id as usize] = true;
                }
                if let (Some(dir), Some(name)) = (dir, name) {
                    names_exist.insert((dir, name));
                }
            }
            Proc::Remove | Proc::Rmdir | Proc::Rename if ok => {
                let (Some(dir), Some(name)) = (dir, name) else {
                    return;
                };
                let key = (dir, name);
                if !names_exist.remove(&key)
                    && initial.get(dir as usize).is_some_and(Option::is_some)
                {
                    let kind = if proc == Proc::Rmdir {
                        Kind::Dir
                    } else {
                        Kind::File
                    };
                    name_only.push((key.0, key.1, kind));
                }
                if proc == Proc::Rename {
                    if let (Some(to_dir), Ok(Some(to_name))) =
                        (call.field("fh2"), call.quoted("name2"))
                    {
                        let to_dir = handles.intern(to_dir);
                        names_exist.insert((to_dir, to_name));
                    }
                }
            }
            Proc::Link if ok => {
                if let (Some(to_dir), Some(name)) = (call.field("fh2"), name) {
                    let to_dir = handles.intern(to_dir);
                    names_exist.insert((to_dir, name));
                }
            }
            _ => {}
        }
    };
    let lines = stream_trace(path, progress, &mut on_event)?;
    Ok(Plan {
        handles,
        initial,
        name_only,
        root,
        lines,
        malformed,
        malformed_listed,
    })
}

// ---------------------------------------------------------------------------------------------
// The replay

fn nfsstat_of(error: &std::io::Error) -> u32 {
    match error.raw_os_error() {
        Some(libc::EPERM) => 1,
        Some(libc::ENOENT) => 2,
        Some(libc::EIO) => 5,
        Some(libc::ENXIO) => 6,
        Some(libc::EACCES) => 0xd,
        Some(libc::EEXIST) => 0x11,
        Some(libc::EXDEV) => 0x12,
        Some(libc::ENODEV) => 0x13,
        Some(libc::ENOTDIR) => 0x14,
        Some(libc::EISDIR) => 0x15,
        Some(libc::EINVAL) => 0x16,
        Some(libc::EFBIG) => 0x1b,
        Some(libc::ENOSPC) => 0x1c,
        Some(libc::EROFS) => 0x1e,
        Some(libc::EMLINK) => 0x1f,
        Some(libc::ENAMETOOLONG) => 0x3f,
        Some(libc::ENOTEMPTY) => 0x42,
        Some(libc::EDQUOT) => 0x45,
        Some(libc::ESTALE) => 0x46,
        Some(libc::ENOTSUP) => 0x2714,
        _ => 0x271d, // NFS3ERR_SERVERFAULT
    }
}

fn status_text(code: u32) -> String {
    if code == 0 {
        "OK".into()
    } else {
        format!("{code:x}")
    }
}

/// EINVAL for a path the kernel cannot be given (a NUL byte inside), as nix's calls answer.
fn no_nul(path: &Path) -> std::io::Result<()> {
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

fn utime_of(value: &str) -> Result<TimeSpec, String> {
    if value == "SERVER" {
        return Ok(TimeSpec::UTIME_NOW);
    }
    let us = parse_time_us(value)?;
    Ok(TimeSpec::new(
        (us / 1_000_000) as libc::time_t,
        ((us % 1_000_000) * 1000) as _,
    ))
}

/// One directory being replayed into.
struct Target {
    root: PathBuf,
    loc: Vec<Loc>,
    names: HashMap<(HandleId, Box<[u8]>), HandleId>,
    open: HashMap<HandleId, File>,
    write_buffer: Vec<u8>,
    read_buffer: Vec<u8>,
}

/// Why a pair could not be replayed.
#[derive(Debug)]
struct Unmappable(&'static str);

#[derive(Default)]
pub struct RunStats {
    pub mount: PathBuf,
    pub run: usize,
    pub replayed: u64,
    pub agreed: u64,
    pub seconds: f64,
    pub setup_seconds: f64,
    pub unmapped: BTreeMap<&'static str, u64>,
    pub disagreements: BTreeMap<String, u64>,
    pub disagreement_examples: Vec<String>,
    pub latency_ns: BTreeMap<Proc, Histogram<u64>>,
}

impl RunStats {
    pub fn ops_per_second(&self) -> f64 {
        self.replayed as f64 / self.seconds.max(1e-9)
    }
    pub fn agreement(&self) -> f64 {
        self.agreed as f64 / (self.replayed.max(1)) as f64
    }
}

impl Target {
    fn path_of(
        &self,
        root_handle: Option<HandleId>,
        handles: &Handles,
        id: HandleId,
    ) -> Option<PathBuf> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut current = id;
        let base = loop {
            if parts.len() > 4096 {
                return None; // a cycle: a trace rename the replay cannot follow
            }
            match self.loc.get(current as usize)? {
                Loc::Unknown => return None,
                Loc::Root => break self.root.clone(),
                Loc::Orphan => {
                    let _ = root_handle;
                    break self
                        .root
                        .join(ORPHANS_DIR)
                        .join(format!("fh-{}", handles.names[current as usize]));
                }
                Loc::Entry { parent, name } => {
                    parts.push(&name[..]);
                    current = *parent;
                }
            }
        };
        let mut path = base;
        for part in parts.iter().rev() {
            path.push(OsStr::from_bytes(part));
        }
        Some(path)
    }

    fn set_loc(&mut self, id: HandleId, loc: Loc) {
        if self.loc.len() <= id as usize {
            self.loc.resize(id as usize + 1, Loc::Unknown);
        }
        self.loc[id as usize] = loc;
    }

    fn file(&mut self, id: HandleId, path: &Path) -> std::io::Result<&File> {
        if !self.open.contains_key(&id) {
            if self.open.len() >= OPEN_FILES_MAX {
                self.open.clear();
            }
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
            {
                Ok(f) => f,
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => return Err(e),
                Err(_) => OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)?,
            };
            self.open.insert(id, file);
        }
        Ok(&self.open[&id])
    }

    /// Forgets the name `(dir, name)`; returns the handle it named.
    fn unlink_name(&mut self, dir: HandleId, name: &[u8]) -> Option<HandleId> {
        let id = self.names.remove(&(dir, name.into()))?;
        if let Some(Loc::Entry { parent, name: n }) = self.loc.get(id as usize) {
            if *parent == dir && **n == *name {
                self.loc[id as usize] = Loc::Unknown;
                self.open.remove(&id);
            }
        }
        Some(id)
    }

    fn bind_name(&mut self, dir: HandleId, name: &[u8], id: HandleId) {
        self.names.insert((dir, name.into()), id);
        self.set_loc(
            id,
            Loc::Entry {
                parent: dir,
                name: name.into(),
            },
        );
    }
}

/// Builds the initial tree under `target.root` and the namespace that goes with it.
fn make_initial_tree(plan: &Plan, target: &mut Target) -> Result<()> {
    std::fs::create_dir(&target.root)
        .with_context(|| format!("creating {}", target.root.display()))?;
    target.loc = vec![Loc::Unknown; plan.handles.names.len()];
    let mut has_orphans = false;
    for (id, init) in plan.initial.iter().enumerate() {
        if let Some(init) = init {
            target.loc[id] = init.loc.clone();
            has_orphans |= init.loc == Loc::Orphan;
            if let Loc::Entry { parent, name } = &init.loc {
                target.names.insert((*parent, name.clone()), id as HandleId);
            }
        }
    }
    if has_orphans {
        std::fs::create_dir(target.root.join(ORPHANS_DIR))?;
    }
    // Parents before children: order by depth.
    let mut order: Vec<(usize, HandleId, PathBuf)> = Vec::new();
    for (id, init) in plan.initial.iter().enumerate() {
        if init.is_none() || plan.root == Some(id as HandleId) {
            continue;
        }
        match target.path_of(plan.root, &plan.handles, id as HandleId) {
            Some(path) => order.push((path.components().count(), id as HandleId, path)),
            None => {
                // A location whose parent is not in the initial tree: fall back to a placeholder.
                target.loc[id] = Loc::Orphan;
                if !has_orphans {
                    std::fs::create_dir(target.root.join(ORPHANS_DIR))?;
                    has_orphans = true;
                }
                let path = target
                    .path_of(plan.root, &plan.handles, id as HandleId)
                    .context("orphan path")?;
                order.push((path.components().count(), id as HandleId, path));
            }
        }
    }
    order.sort();
    let chunk = vec![0x5au8; 1 << 20];
    let mut modes = Vec::new();
    for (_, id, path) in &order {
        let Some(init) = &plan.initial[*id as usize] else {
            continue;
        };
        create_object(
            &path,
            init.kind,
            init.size,
            init.symlink_target.as_deref(),
            &chunk,
        )
        .with_context(|| format!("creating initial object {}", path.display()))?;
        if let (Some(mode), false) = (init.mode, init.kind == Kind::Symlink) {
            modes.push((path.clone(), mode & 0o7777));
        }
    }
    for (dir, name, kind) in &plan.name_only {
        let Some(dir_path) = target.path_of(plan.root, &plan.handles, *dir) else {
            continue;
        };
        let path = dir_path.join(OsStr::from_bytes(name));
        if std::fs::symlink_metadata(&path).is_err() {
            // Best effort: the directory may itself be a file in a trace we cannot follow.
            let _ = create_object(&path, *kind, 0, None, &chunk);
        }
    }
    // Modes last, deepest first, so that a read-only directory is filled before it closes.
    for (path, mode) in modes.iter().rev() {
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(*mode));
    }
    Ok(())
}

fn create_object(
    path: &Path,
    kind: Kind,
    size: u64,
    target: Option<&[u8]>,
    chunk: &[u8],
) -> std::io::Result<()> {
    match kind {
        Kind::Dir => std::fs::create_dir(path),
        Kind::Symlink => std::os::unix::fs::symlink(
            OsStr::from_bytes(target.unwrap_or(b"replay-placeholder-target")),
            path,
        ),
        Kind::Fifo => Ok(nix::unistd::mkfifo(path, Mode::from_bits_retain(0o644))?),
        Kind::File | Kind::Other => {
            let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                file.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            Ok(())
        }
    }
}

struct Replay<'p> {
    plan: &'p Plan,
    target: Target,
    stats: RunStats,
    pace: Option<(f64, Instant, Option<u64>)>,
}

impl<'p> Replay<'p> {
    fn id(&self, handle: &str) -> Option<HandleId> {
        self.plan.handles.ids.get(handle).copied()
    }

    fn path(&self, call: &Record<'_>, key: &str) -> Result<(HandleId, PathBuf), Unmappable> {
        let handle = call
            .field(key)
            .ok_or(Unmappable("call without a file handle"))?;
        let id = self
            .id(handle)
            .ok_or(Unmappable("handle not in the first pass"))?;
        let path = self
            .target
            .path_of(self.plan.root, &self.plan.handles, id)
            .ok_or(Unmappable("handle whose object the trace had removed"))?;
        Ok((id, path))
    }

    fn named(
        &self,
        call: &Record<'_>,
        dir_key: &str,
        name_key: &str,
    ) -> Result<(HandleId, Vec<u8>, PathBuf), Unmappable> {
        let (dir, dir_path) = self.path(call, dir_key)?;
        let name = call
            .quoted(name_key)
            .map_err(|_| Unmappable("bad name"))?
            .ok_or(Unmappable("missing name"))?;
        let path = dir_path.join(OsStr::from_bytes(&name));
        Ok((dir, name, path))
    }

    fn on_pair(&mut self, call: &Record<'_>, reply: &Record<'_>, call_line: u64) {
        let result = self.replay_pair(call, reply, call_line);
        if let Err(Unmappable(reason)) = result {
            *self.stats.unmapped.entry(reason).or_default() += 1;
        }
    }

    fn replay_pair(
        &mut self,
        call: &Record<'_>,
        reply: &Record<'_>,
        call_line: u64,
    ) -> Result<(), Unmappable> {
        let proc =
            Proc::from_number(call.procedure).ok_or(Unmappable("unknown procedure number"))?;
        let expected = match &reply.status {
            Some(Status::Ok) => 0,
            Some(Status::Error(code)) => *code,
            Some(Status::Rejected(_)) => return Err(Unmappable("RPC rejected (DENIED/RPCERR)")),
            None => return Err(Unmappable("reply without status")),
        };
        if proc == Proc::Null {
            return Err(Unmappable("null procedure (nothing to replay)"));
        }
        if matches!(proc, Proc::Readdir | Proc::Readdirplus)
            && call.field("cookie").is_some_and(|c| c != "0")
        {
            return Err(Unmappable(
                "readdir continuation (served by the first listing)",
            ));
        }
        // Pace by the call's time.
        if let Some((speed, start, first)) = &mut self.pace {
            let first_us = *first.get_or_insert(call.time_us);
            let due = Duration::from_secs_f64(
                call.time_us.saturating_sub(first_us) as f64 / 1e6 / *speed,
            );
            let elapsed = start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        let started = Instant::now();
        let outcome = self.execute(proc, call)?;
        let elapsed_ns = started.elapsed().as_nanos() as u64;
        let got = match &outcome {
            Ok(()) => 0,
            Err(e) => nfsstat_of(e),
        };
        self.stats.replayed += 1;
        self.stats
            .latency_ns
            .entry(proc)
            .or_insert_with(|| {
                Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
            })
            .saturating_record(elapsed_ns.max(1));
        if got == expected {
            self.stats.agreed += 1;
        } else {
            let key = format!(
                "{} trace {} replay {}",
                proc.label(),
                status_text(expected),
                status_text(got)
            );
            *self.stats.disagreements.entry(key.clone()).or_default() += 1;
            if self.stats.disagreement_examples.len() < 10 {
                self.stats
                    .disagreement_examples
                    .push(format!("line {call_line}: {key}"));
            }
        }
        if expected == 0 {
            self.learn(proc, call, reply);
        }
        Ok(())
    }

    /// Follows the trace's namespace after a successful reply.
    fn learn(&mut self, proc: Proc, call: &Record<'_>, reply: &Record<'_>) {
        let dir = call.field("fh").and_then(|h| self.id(h));
        let name = call.quoted("name").ok().flatten();
        match proc {
            Proc::Lookup | Proc::Create | Proc::Mkdir | Proc::Symlink | Proc::Mknod => {
                let (Some(dir), Some(name)) = (dir, name) else {
                    return;
                };
                match reply.field("fh").and_then(|h| self.id(h)) {
                    Some(id) if id != dir => {
                        if proc != Proc::Lookup {
                            self.target.open.remove(&id);
                        }
                        self.target.bind_name(dir, &name, id);
                    }
                    _ => {}
                }
            }
            Proc::Remove | Proc::Rmdir => {
                if let (Some(dir), Some(name)) = (dir, name) {
                    self.target.unlink_name(dir, &name);
                }
            }
            Proc::Rename => {
                let (Some(dir), Some(name)) = (dir, name) else {
                    return;
                };
                let to_dir = call.field("fh2").and_then(|h| self.id(h));
                let to_name = call.quoted("name2").ok().flatten();
                let (Some(to_dir), Some(to_name)) = (to_dir, to_name) else {
                    return;
                };
                if dir == to_dir && name == to_name {
                    return;
                }
                let moved = self.target.names.remove(&(dir, name.clone().into()));
                self.target.unlink_name(to_dir, &to_name);
                if let Some(id) = moved {
                    self.target.bind_name(to_dir, &to_name, id);
                }
            }
            Proc::Link => {
                let file = call.field("fh").and_then(|h| self.id(h));
                let to_dir = call.field("fh2").and_then(|h| self.id(h));
                if let (Some(file), Some(to_dir), Some(name)) = (file, to_dir, name) {
                    // Keep the object's primary name; the new name resolves to it as well.
                    self.target.names.insert((to_dir, name.into()), file);
                    if self.target.loc.get(file as usize) == Some(&Loc::Unknown) {
                        self.target.bind_name(
                            to_dir,
                            &call.quoted("name").ok().flatten().unwrap_or_default(),
                            file,
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn execute(
        &mut self,
        proc: Proc,
        call: &Record<'_>,
    ) -> Result<std::io::Result<()>, Unmappable> {
        use Proc::*;
        let bad = |_| Unmappable("bad number in a field");
        Ok(match proc {
            Null => Ok(()),
            Getattr | Access => {
                let (_, path) = self.path(call, "fh")?;
                std::fs::symlink_metadata(path).map(|_| ())
            }
            Lookup => {
                let (_, _, path) = self.named(call, "fh", "name")?;
                std::fs::symlink_metadata(path).map(|_| ())
            }
            Readlink => {
                let (_, path) = self.path(call, "fh")?;
                std::fs::read_link(path).map(|_| ())
            }
            Read => {
                let (id, path) = self.path(call, "fh")?;
                let offset = call.hex("off").map_err(bad)?.unwrap_or(0);
                let count = call.hex("count").map_err(bad)?.unwrap_or(0).min(1 << 24) as usize;
                let mut buffer = std::mem::take(&mut self.target.read_buffer);
                buffer.resize(count, 0);
                let result = self
                    .target
                    .file(id, &path)
                    .and_then(|f| f.read_at(&mut buffer, offset))
                    .map(|_| ());
                self.target.read_buffer = buffer;
                result
            }
            Write => {
                let (id, path) = self.path(call, "fh")?;
                let offset = call.hex("off").map_err(bad)?.unwrap_or(0);
                let count = call.hex("count").map_err(bad)?.unwrap_or(0).min(1 << 24) as usize;
                let stable = call.field("stable").unwrap_or("U");
                if self.target.write_buffer.len() < count {
                    self.target.write_buffer = (0..count).map(|i| b'a' + (i % 26) as u8).collect();
                }
                let buffer = std::mem::take(&mut self.target.write_buffer);
                let result = self.target.file(id, &path).and_then(|f| {
                    f.write_all_at(&buffer[..count], offset)?;
                    match stable {
                        "D" => f.sync_data(),
                        "F" => f.sync_all(),
                        _ => Ok(()),
                    }
                });
                self.target.write_buffer = buffer;
                result
            }
            Commit => {
                let (id, path) = self.path(call, "fh")?;
                self.target.file(id, &path).and_then(|f| f.sync_all())
            }
            Create => {
                let (_, _, path) = self.named(call, "fh", "name")?;
                let mode = call.hex("mode").map_err(bad)?.unwrap_or(0o644) as u32 & 0o7777;
                let mut options = OpenOptions::new();
                options.write(true).mode(mode);
                match call.field("how") {
                    Some("G") | Some("E") => options.create_new(true),
                    _ => options.create(true),
                };
                let size = call.hex("size").map_err(bad)?;
                options.open(&path).and_then(|f| match size {
                    Some(size) => f.set_len(size),
                    None => Ok(()),
                })
            }
            Mkdir => {
                let (_, _, path) = self.named(call, "fh", "name")?;
                let mode = call.hex("mode").map_err(bad)?.unwrap_or(0o755) as u32 & 0o7777;
                std::fs::DirBuilder::new().mode(mode).create(path)
            }
            Symlink => {
                let (_, _, path) = self.named(call, "fh", "name")?;
                let target = call
                    .quoted("sdata")
                    .map_err(|_| Unmappable("bad symlink target"))?
                    .unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), path)
            }
            Mknod => {
                let (_, _, path) = self.named(call, "fh", "name")?;
                let mode = call.hex("mode").map_err(bad)?.unwrap_or(0o644) as libc::mode_t & 0o7777;
                let kind = match call.hex("ftype").map_err(bad)? {
                    Some(7) => libc::S_IFIFO,
                    Some(6) => libc::S_IFSOCK,
                    Some(3) => libc::S_IFBLK,
                    Some(4) => libc::S_IFCHR,
                    _ => return Err(Unmappable("mknod of an unsupported type")),
                };
                let major = call.hex("rdev").map_err(bad)?.unwrap_or(0) as u32;
                let minor = call.hex("rdev2").map_err(bad)?.unwrap_or(0) as u32;
                let dev = stat::makedev(major.into(), minor.into());
                let (kind, mode) = (SFlag::from_bits_retain(kind), Mode::from_bits_retain(mode));
                stat::mknod(&path, kind, mode, dev).map_err(std::io::Error::from)
            }
            Remove => {
                let (dir, name, path) = self.named(call, "fh", "name")?;
                if let Some(id) = self.target.names.get(&(dir, name.into())) {
                    self.target.open.remove(id);
                }
                std::fs::remove_file(path)
            }
            Rmdir => {
                let (_, _, path) = self.named(call, "fh", "name")?;
                std::fs::remove_dir(path)
            }
            Rename => {
                let (_, _, from) = self.named(call, "fh", "name")?;
                let (to_dir, to_name, to) = self.named(call, "fh2", "name2")?;
                if let Some(id) = self.target.names.get(&(to_dir, to_name.into())) {
                    self.target.open.remove(id);
                }
                std::fs::rename(from, to)
            }
            Link => {
                let (_, from) = self.path(call, "fh")?;
                let (_, _, to) = self.named(call, "fh2", "name")?;
                std::fs::hard_link(from, to)
            }
            Setattr => {
                let (id, path) = self.path(call, "fh")?;
                self.setattr(id, call, &path)?
            }
            Readdir | Readdirplus => {
                let (_, path) = self.path(call, "fh")?;
                std::fs::read_dir(path).and_then(|entries| {
                    for entry in entries {
                        let entry = entry?;
                        if proc == Readdirplus {
                            let _ = entry.path().symlink_metadata();
                        }
                    }
                    Ok(())
                })
            }
            Fsstat | Fsinfo | Pathconf => {
                let (_, path) = self.path(call, "fh")?;
                let statvfs = nix::sys::statvfs::statvfs(&path);
                statvfs.map(drop).map_err(std::io::Error::from)
            }
        })
    }

    fn setattr(
        &mut self,
        id: HandleId,
        call: &Record<'_>,
        path: &Path,
    ) -> Result<std::io::Result<()>, Unmappable> {
        let bad = |_| Unmappable("bad number in a field");
        let mode = call.hex("mode").map_err(bad)?;
        let uid = call.hex("uid").map_err(bad)?;
        let gid = call.hex("gid").map_err(bad)?;
        let size = call.hex("size").map_err(bad)?;
        let atime = call
            .field("atime")
            .map(utime_of)
            .transpose()
            .map_err(|_| Unmappable("bad time"))?;
        let mtime = call
            .field("mtime")
            .map(utime_of)
            .transpose()
            .map_err(|_| Unmappable("bad time"))?;
        let run = || -> std::io::Result<()> {
            // Refused up front even when there is nothing to set.
            no_nul(path)?;
            if let Some(size) = size {
                nix::unistd::truncate(path, size as libc::off_t)?;
            }
            if let Some(mode) = mode {
                let mode = Mode::from_bits_retain((mode & 0o7777) as libc::mode_t);
                stat::fchmodat(AT_FDCWD, path, mode, stat::FchmodatFlags::FollowSymlink)?;
            }
            if uid.is_some() || gid.is_some() {
                // lchown: the link itself, not what it names.
                let u = uid.map(|v| nix::unistd::Uid::from_raw(v as u32));
                let g = gid.map(|v| nix::unistd::Gid::from_raw(v as u32));
                nix::unistd::fchownat(AT_FDCWD, path, u, g, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            }
            if atime.is_some() || mtime.is_some() {
                let (a, m) = (
                    atime.unwrap_or(TimeSpec::UTIME_OMIT),
                    mtime.unwrap_or(TimeSpec::UTIME_OMIT),
                );
                let flag = stat::UtimensatFlags::NoFollowSymlink;
                stat::utimensat(AT_FDCWD, path, &a, &m, flag)?;
            }
            Ok(())
        };
        let _ = id;
        Ok(run())
    }
}

/// Replays the trace once into a fresh directory under `mount`.
fn replay_once(
    args: &Args,
    plan: &Plan,
    mount: &Path,
    run: usize,
    serial: usize,
) -> Result<RunStats> {
    let root = mount.join(format!("bftfs-replay-{}-{}", std::process::id(), serial));
    let mut target = Target {
        root: root.clone(),
        loc: Vec::new(),
        names: HashMap::new(),
        open: HashMap::new(),
        write_buffer: Vec::new(),
        read_buffer: Vec::new(),
    };
    let setup_started = Instant::now();
    make_initial_tree(plan, &mut target)?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let pace = match (args.speed, args.max) {
        (Some(speed), false) if speed > 0.0 => Some((speed, Instant::now(), None)),
        (Some(_), false) => bail!("--speed must be positive"),
        _ => None,
    };
    let mut replay = Replay {
        plan,
        target,
        stats: RunStats {
            mount: mount.to_path_buf(),
            run,
            setup_seconds,
            ..RunStats::default()
        },
        pace,
    };
    let bar = progress_bar(
        plan.lines,
        &format!("replay {} (run {})", mount.display(), run + 1),
    );
    let started = Instant::now();
    let mut on_event = |event: Event<'_>| match event {
        Event::Pair {
            call_line,
            call,
            reply,
        } => replay.on_pair(&call, &reply, call_line),
        Event::Unmapped(reason) => *replay.stats.unmapped.entry(reason).or_default() += 1,
        Event::Malformed { .. } => *replay.stats.unmapped.entry("malformed line").or_default() += 1,
    };
    let result = stream_trace(&args.trace, Some(&bar), &mut on_event);
    replay.target.open.clear();
    replay.stats.seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if !args.keep {
        remove_tree(&root);
    }
    result?;
    Ok(replay.stats)
}

/// Removes a replay tree, making read-only directories writable first.
fn remove_tree(root: &Path) {
    fn open_up(path: &Path) {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let p = entry.path();
                    let _ = std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(0o755),
                    );
                    open_up(&p);
                }
            }
        }
    }
    let _ = std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    open_up(root);
    if let Err(e) = std::fs::remove_dir_all(root) {
        eprintln!("warning: could not remove {}: {e}", root.display());
    }
}

fn progress_bar(length: u64, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(length);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} lines ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

pub fn run(args: Args) -> Result<()> {
    for mount in &args.mount {
        if !mount.is_dir() {
            bail!("--mount {}: not a directory", mount.display());
        }
    }
    let scan = indicatif::ProgressBar::new_spinner();
    scan.set_message(format!("reading {} (initial tree)", args.trace.display()));
    let plan = first_pass(&args.trace, Some(&scan))?;
    scan.finish_and_clear();
    let pre_existing = plan.initial.iter().flatten().count();
    let orphans = plan
        .initial
        .iter()
        .flatten()
        .filter(|i| i.loc == Loc::Orphan)
        .count();
    println!(
        "trace {}: {} lines, {} handles; initial tree: {} objects ({} at placeholder paths), {} names known only from removes/renames",
        args.trace.display(),
        plan.lines,
        plan.handles.names.len(),
        pre_existing,
        orphans,
        plan.name_only.len()
    );
    if plan.malformed > 0 {
        println!("malformed lines: {} (first: {})", plan.malformed, {
            let listed: Vec<String> = plan
                .malformed_listed
                .iter()
                .map(|(l, r)| format!("line {l}: {r}"))
                .collect();
            listed.join("; ")
        });
    }
    let mut all = Vec::new();
    let mut serial = 0;
    for run in 0..args.runs.max(1) {
        let count = args.mount.len();
        for k in 0..count {
            let mount = &args.mount[(k + run) % count];
            let stats = replay_once(&args, &plan, mount, run, serial)?;
            serial += 1;
            all.push(stats);
        }
    }
    print_report(&args, &plan, &all);
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&to_json(&args, &plan, &all))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(min) = args.min_agreement {
        for s in &all {
            if s.agreement() < min {
                bail!(
                    "agreement {:.4} on {} is below --min-agreement {min}",
                    s.agreement(),
                    s.mount.display()
                );
            }
        }
    }
    Ok(())
}

fn percentile_us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn print_report(args: &Args, plan: &Plan, all: &[RunStats]) {
    println!();
    println!("| directory | run | ops | seconds | ops/s | agreed | agreement | setup s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in all {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {} | {:.2}% | {:.2} |",
            s.mount.display(),
            s.run + 1,
            s.replayed,
            s.seconds,
            s.ops_per_second(),
            s.agreed,
            100.0 * s.agreement(),
            s.setup_seconds
        );
    }
    // Medians per directory and the ratio to the first.
    if args.mount.len() > 1 {
        println!();
        let mut first = None;
        for mount in &args.mount {
            let mut rates: Vec<f64> = all
                .iter()
                .filter(|s| &s.mount == mount)
                .map(RunStats::ops_per_second)
                .collect();
            rates.sort_by(f64::total_cmp);
            let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
            let base = *first.get_or_insert(median);
            println!(
                "{}: median {:.0} ops/s, {:.3}x of {}",
                mount.display(),
                median,
                median / base,
                args.mount[0].display()
            );
        }
    }
    for s in all {
        println!();
        println!("## {} (run {})", s.mount.display(), s.run + 1);
        println!("| op | count | p50 µs | p90 µs | p99 µs | max µs |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (proc, h) in &s.latency_ns {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                proc.label(),
                h.len(),
                percentile_us(h, 0.5),
                percentile_us(h, 0.9),
                percentile_us(h, 0.99),
                h.max() as f64 / 1000.0
            );
        }
        if !s.unmapped.is_empty() {
            println!("not replayed:");
            for (reason, n) in &s.unmapped {
                println!("  {n:>8}  {reason}");
            }
        }
        if !s.disagreements.is_empty() {
            println!("disagreements (op, trace status, replayed status):");
            let mut d: Vec<_> = s.disagreements.iter().collect();
            d.sort_by(|a, b| b.1.cmp(a.1));
            for (what, n) in d.iter().take(12) {
                println!("  {n:>8}  {what}");
            }
            println!("  first: {}", s.disagreement_examples.join("; "));
        }
    }
    if plan.malformed > 0 {
        println!();
        println!(
            "{} malformed lines were counted and skipped (see above)",
            plan.malformed
        );
    }
}

fn to_json(args: &Args, plan: &Plan, all: &[RunStats]) -> serde_json::Value {
    let runs: Vec<serde_json::Value> = all
        .iter()
        .map(|s| {
            let latency: serde_json::Map<String, serde_json::Value> = s
                .latency_ns
                .iter()
                .map(|(p, h)| {
                    (
                        p.label().to_string(),
                        serde_json::json!({
                            "count": h.len(),
                            "p50_us": percentile_us(h, 0.5),
                            "p90_us": percentile_us(h, 0.9),
                            "p99_us": percentile_us(h, 0.99),
                            "max_us": h.max() as f64 / 1000.0,
                        }),
                    )
                })
                .collect();
            serde_json::json!({
                "directory": s.mount.display().to_string(),
                "run": s.run + 1,
                "replayed": s.replayed,
                "agreed": s.agreed,
                "agreement": s.agreement(),
                "seconds": s.seconds,
                "ops_per_second": s.ops_per_second(),
                "setup_seconds": s.setup_seconds,
                "unmapped": s.unmapped,
                "disagreements": s.disagreements,
                "latency": latency,
            })
        })
        .collect();
    serde_json::json!({
        "trace": args.trace.display().to_string(),
        "lines": plan.lines,
        "malformed": plan.malformed,
        "malformed_first": plan.malformed_listed.iter().map(|(l, r)| serde_json::json!({"line": l, "reason": r})).collect::<Vec<_>>(),
        "speed": args.speed,
        "runs": runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_names_decode_escapes() {
        assert_eq!(
            decode_quoted("\"meeting%20notes%20(final).txt\"").unwrap(),
            b"meeting notes (final).txt"
        );
        assert_eq!(
            decode_quoted("\"say%20%22hi%22.txt\"").unwrap(),
            b"say \"hi\".txt"
        );
        assert_eq!(
            decode_quoted("\"100%25-caf%c3%a9.txt\"").unwrap(),
            "100%-café.txt".as_bytes()
        );
        assert_eq!(decode_quoted("\"\"").unwrap(), b"");
        assert!(decode_quoted("\"bad%2\"").is_err());
        assert!(decode_quoted("\"bad%zz\"").is_err());
        assert!(decode_quoted("noquotes").is_err());
        assert!(decode_quoted("\"").is_err());
        assert!(decode_quoted("\"a\"b\"").is_err());
    }

    #[test]
    fn null_reply_with_double_space_has_ok_status() {
        let line = "1795240532.995299 7f000001.0801 7f000001.02d1 T R3 56f59535 0 null  status=0 pl = 0 con = 24 len = 24";
        let r = parse_line(line).unwrap();
        assert_eq!(r.direction, Direction::Reply);
        assert_eq!(r.xid, 0x56f59535);
        assert_eq!(r.procedure, 0);
        assert_eq!(r.status, Some(Status::Ok));
        assert!(r.fields.is_empty());
        assert_eq!(r.time_us, 1_795_240_532_995_299);
    }

    #[test]
    fn repeated_keys_are_kept_in_order() {
        let line = "1795240534.998594 7f000001.0801 7f000001.02d1 T R3 56f5953c 3 lookup OK fh 4300 ftype 2 mode 1ed nlink 2 size 1000 ftype 2 mode 1a4 nlink 3 size 20 status=0 pl = 0 con = 232 len = 232";
        let r = parse_line(line).unwrap();
        assert_eq!(r.status, Some(Status::Ok));
        assert_eq!(r.field("fh"), Some("4300"));
        assert_eq!(r.field_nth("nlink", 0), Some("2"));
        assert_eq!(r.field_nth("nlink", 1), Some("3"));
        assert_eq!(r.field_nth("nlink", 2), None);
        let a = r.attributes();
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[0],
            Attributes {
                ftype: 2,
                mode: 0x1ed,
                size: 0x1000
            }
        );
        assert_eq!(
            a[1],
            Attributes {
                ftype: 2,
                mode: 0x1a4,
                size: 0x20
            }
        );
    }

    #[test]
    fn calls_and_error_replies_parse() {
        let call = "1795240535.455787 7f000001.02d1 7f000001.0801 T C3 56f5a826 e rename fh aa name \"incoming.tmp\" fh2 bb name2 \"asset%2001.raw\" euid 0 egid 0 con = 156 len = 156";
        let c = parse_line(call).unwrap();
        assert_eq!((c.direction, c.procedure), (Direction::Call, 14));
        assert_eq!(Proc::from_number(c.procedure), Some(Proc::Rename));
        assert_eq!(c.quoted("name2").unwrap().unwrap(), b"asset 01.raw");
        assert_eq!(c.status, None);
        let reply = "1795240543.238345 7f000001.0801 7f000001.02d1 T R3 56f5d2a9 d rmdir 42 pre-size 1000 ftype 2 mode 1ed status=42 pl = 0 con = 144 len = 144";
        assert_eq!(parse_line(reply).unwrap().status, Some(Status::Error(0x42)));
        let denied = "1.5 7f000001.0801 7f000001.02d1 U R3 1 1 getattr DENIED status=1 pl = 0 con = 24 len = 24";
        assert_eq!(
            parse_line(denied).unwrap().status,
            Some(Status::Rejected("DENIED".into()))
        );
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        let bad = [
            "",
            "garbage",
            "1.0 7f000001.02d1 7f000001.0801 T C3 zz 1 getattr fh aa euid 0 egid 0 con = 96 len = 96",
            "1.0 7f000001.02d1 7f000001.0801 T X3 1 1 getattr fh aa con = 96 len = 96",
            "x.0 7f000001.02d1 7f000001.0801 T C3 1 1 getattr fh aa con = 96 len = 96",
            "1.0 7f000001.02d1 7f000001.0801 T C3 1 1 getattr fh aa euid 0 egid 0",
            "1.0 7f000001.02d1 7f000001.0801 T C3 1 1 getattr fh aa euid con = 96 len = 96",
            "1.0 7f000001.02d1 7f000001.0801 T C3 1 1 getattr fh con = 96 len = 96 extra",
            "1.0 7f000001.0801 7f000001.02d1 T R3 1 1 getattr OK ftype 1 status=2 pl = 0 con = 1 len = 1",
            "1.0 7f000001.0801 7f000001.02d1 T R3 1 1 getattr OK ftype 1 con = 1 len = 1",
            "1.0 hosta 7f000001.02d1 T R3 1 1 getattr OK ftype 1 status=0 pl = 0 con = 1 len = 1",
        ];
        for line in bad {
            assert!(parse_line(line).is_err(), "accepted {line:?}");
        }
        // The pairer counts them with line numbers.
        let mut pairer = Pairer::new();
        let mut malformed = Vec::new();
        for (i, line) in bad.iter().enumerate().skip(1) {
            pairer.feed(i as u64 + 1, line, &mut |e| {
                if let Event::Malformed { line, .. } = e {
                    malformed.push(line)
                }
            });
        }
        assert_eq!(malformed, (2..=bad.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn replies_pair_with_calls_by_xid_not_position() {
        let lines = [
            "1.000001 0a000001.0300 0a000002.0801 U C3 10 1 getattr fh aa euid 0 egid 0 con = 96 len = 96",
            "1.000002 0a000001.0300 0a000002.0801 U C3 11 1 getattr fh bb euid 0 egid 0 con = 96 len = 96",
            "1.000003 0a000002.0801 0a000001.0300 U R3 11 1 getattr 2 status=2 pl = 0 con = 1 len = 1",
            "1.000004 0a000002.0801 0a000001.0300 U R3 10 1 getattr OK ftype 1 mode 1a4 size 3 status=0 pl = 0 con = 1 len = 1",
            "1.000005 0a000002.0801 0a000001.0300 U R3 99 1 getattr OK status=0 pl = 0 con = 1 len = 1",
        ];
        let mut pairer = Pairer::new();
        let mut seen = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            pairer.feed(i as u64 + 1, line, &mut |e| match e {
                Event::Pair {
                    call,
                    reply,
                    call_line,
                } => seen.push(format!(
                    "{} {} {:?}",
                    call_line,
                    call.field("fh").unwrap_or(""),
                    reply.status
                )),
                Event::Unmapped(r) => seen.push(r.to_string()),
                Event::Malformed { line, .. } => seen.push(format!("malformed {line}")),
            });
        }
        assert_eq!(
            seen,
            vec!["2 bb Some(Error(2))", "1 aa Some(Ok)", "reply without call"]
        );
    }

    #[test]
    fn times_are_decimal_microseconds() {
        assert_eq!(parse_time_us("12.000034").unwrap(), 12_000_034);
        assert_eq!(parse_time_us("12.5").unwrap(), 12_500_000);
        assert!(parse_time_us("12.1234567").is_err());
    }
}
