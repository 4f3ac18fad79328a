//! Write-back of file data, the default mode (`-o sync` turns it off).
//!
//! NFS clients answer `write(2)` from their page cache and send the data to the server in the
//! background, at the latest when the file is closed or fsync'ed. This module does the same
//! for the FUSE adapter: a write the kernel sends is kept here and answered at once, and the
//! bytes reach the cluster from a few background threads (or from the thread that waits for
//! them: close, fsync, and any operation that must see them on the service first).
//!
//! Why here and not in the kernel (FUSE's `writeback_cache`): in that mode the kernel never
//! takes a regular file's size or mtime from the file system while it holds the inode ("the
//! kernel owns i_size"), so a client that has the file cached never sees another client's
//! truncation or append. Measured on this kernel (6.18): after a truncation to 2 bytes and an
//! append through another mount, `stat` still said 10 and reads returned zeros. Kept in the
//! adapter, the kernel stays in write-through mode and takes sizes from the adapter, which
//! can answer for both the service and its own unsent bytes (see [`WriteBack::pending_end`]).
//!
//! In: writes (node, handle, offset, bytes, caller); requests to drain a node. Out: service
//! writes, each with the caller of the bytes it carries, one node's overlapping ranges in the
//! order they were written; a per-node error sequence ([`WriteBack::error_since`]) so that a
//! refused write is reported at the next close or fsync of each descriptor that may have
//! written it, never dropped silently.
//!
//! Bounded: at most [`Limits::dirty_max`] bytes wait here (a writer waits for room beyond
//! that); each piece is at most [`Limits::chunk`] bytes, the largest write the service takes.

use crate::transport::{FsTransport, TransportError};
use state_abstraction::fs::{Attr, Caller, FsError, FsOp, FsReply, FsRequest, Handle};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How much waits here, what is sent in the background, and by how many threads.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes buffered (not yet sent) in the whole mount before a writer waits.
    pub dirty_max: usize,
    /// Buffered bytes older than this are sent in the background even if no one asks. Bounds
    /// what a crash of the mount process can lose of files still open.
    pub max_age: Duration,
    /// Largest piece sent in one request; contiguous writes are merged up to this.
    pub chunk: usize,
    /// Background sending threads. Each waits for one request at a time.
    pub threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            dirty_max: 64 << 20,
            max_age: Duration::from_secs(5),
            chunk: crate::adapter::IO_MAX as usize,
            threads: 4,
        }
    }
}

/// Why buffered bytes did not reach the service. Kept per node until a descriptor is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteError {
    Service(FsError),
    Transport(TransportError),
    /// The service answered a write with the wrong kind of reply, or wrote nothing.
    Unexpected(&'static str),
}

/// What the adapter learns from background sends: the file's attributes after a write the
/// service accepted, and that a node's bytes were refused (its cached pages are now wrong).
pub trait Observer: Send + Sync {
    fn written(&self, nodeid: u64, attr: &Attr);
    fn failed(&self, nodeid: u64);
}

struct Extent {
    data: Vec<u8>,
    caller: Caller,
    /// The node's write count when the oldest of these bytes arrived: a drain waits for the
    /// bytes written before it began, not for a writer that keeps going.
    epoch: u64,
}

/// One node's bytes that are not on the service yet.
struct Node {
    handle: Handle,
    /// Buffered and not sent, keyed by offset; never overlapping each other.
    extents: BTreeMap<u64, Extent>,
    /// Ranges being sent now, with their extent's epoch. An extent overlapping one waits,
    /// so that the later bytes land last.
    sending: Vec<(Range<u64>, u64)>,
    /// Writes made so far (the epoch of the next one).
    epoch: u64,
    /// When the oldest buffered extent arrived.
    since: Option<Instant>,
    /// Threads waiting for this node to drain; the background threads serve it first.
    waiters: usize,
    /// Count of failed sends, and the latest failure.
    error_seq: u64,
    error: Option<WriteError>,
}

impl Node {
    fn new(handle: Handle) -> Node {
        Node {
            handle,
            extents: BTreeMap::new(),
            sending: Vec::new(),
            epoch: 0,
            since: None,
            waiters: 0,
            error_seq: 0,
            error: None,
        }
    }

    fn drained(&self) -> bool {
        self.extents.is_empty() && self.sending.is_empty()
    }

    /// Whether every byte written before epoch `upto` has been answered.
    fn drained_upto(&self, upto: u64) -> bool {
        self.extents.values().all(|e| e.epoch >= upto)
            && self.sending.iter().all(|(_, epoch)| *epoch >= upto)
    }

    /// Nothing worth keeping: no bytes, no one waiting, no error to report.
    fn idle(&self) -> bool {
        self.drained() && self.waiters == 0 && self.error_seq == 0
    }

    fn end(&self) -> Option<u64> {
        let buffered = self
            .extents
            .iter()
            .next_back()
            .map(|(&o, e)| o + e.data.len() as u64);
        let sending = self.sending.iter().map(|(r, _)| r.end).max();
        buffered.max(sending)
    }

    /// Removes and returns the first extent that overlaps nothing being sent and satisfies
    /// `wanted`, marking its range as being sent.
    fn take(&mut self, wanted: impl Fn(&Extent) -> bool) -> Option<(u64, Extent)> {
        let offset = self
            .extents
            .iter()
            .find(|(&o, e)| {
                let r = o..o + e.data.len() as u64;
                wanted(e)
                    && !self
                        .sending
                        .iter()
                        .any(|(s, _)| s.start < r.end && r.start < s.end)
            })
            .map(|(&o, _)| o)?;
        let extent = self.extents.remove(&offset)?;
        self.sending
            .push((offset..offset + extent.data.len() as u64, extent.epoch));
        if self.extents.is_empty() {
            self.since = None;
        }
        Some((offset, extent))
    }
}

/// Puts `data` at `offset` into `extents`, over whatever was there, merging with neighbours
/// of the same caller up to `chunk` bytes. Returns the change in buffered bytes.
fn insert(
    extents: &mut BTreeMap<u64, Extent>,
    offset: u64,
    data: &[u8],
    caller: &Caller,
    epoch: u64,
    chunk: usize,
) -> isize {
    let end = offset + data.len() as u64;
    let mut delta = data.len() as isize;
    let overlapping: Vec<u64> = extents
        .range(..end)
        .rev()
        .take_while(|(&o, e)| o + e.data.len() as u64 > offset)
        .map(|(&o, _)| o)
        .collect();
    for start in overlapping {
        let Some(old) = extents.remove(&start) else {
            continue;
        };
        delta -= old.data.len() as isize;
        let old_end = start + old.data.len() as u64;
        if start < offset {
            let keep = old.data[..(offset - start) as usize].to_vec();
            delta += keep.len() as isize;
            extents.insert(
                start,
                Extent {
                    data: keep,
                    caller: old.caller.clone(),
                    epoch: old.epoch,
                },
            );
        }
        if old_end > end {
            let keep = old.data[(end - start) as usize..].to_vec();
            delta += keep.len() as isize;
            extents.insert(
                end,
                Extent {
                    data: keep,
                    caller: old.caller,
                    epoch: old.epoch,
                },
            );
        }
    }
    // Pieces of at most `chunk`, each merged with its left neighbour when that fits.
    let mut at = offset;
    for piece in data.chunks(chunk.max(1)) {
        let left = extents
            .range(..at)
            .next_back()
            .filter(|(&o, e)| {
                o + e.data.len() as u64 == at
                    && e.caller == *caller
                    && e.data.len() + piece.len() <= chunk
            })
            .map(|(&o, _)| o);
        match left.and_then(|o| extents.get_mut(&o)) {
            Some(e) => {
                e.data.extend_from_slice(piece);
                e.epoch = e.epoch.min(epoch);
            }
            None => {
                extents.insert(
                    at,
                    Extent {
                        data: piece.to_vec(),
                        caller: caller.clone(),
                        epoch,
                    },
                );
            }
        }
        at += piece.len() as u64;
    }
    // The right neighbour joins the last piece when it fits.
    let last = extents
        .range(..end)
        .next_back()
        .map(|(&o, e)| (o, e.data.len()));
    if let (Some((o, len)), Some(right)) = (last, extents.get(&end)) {
        if right.caller == *caller && len + right.data.len() <= chunk {
            if let Some(right) = extents.remove(&end) {
                if let Some(e) = extents.get_mut(&o) {
                    e.data.extend_from_slice(&right.data);
                    e.epoch = e.epoch.min(right.epoch);
                }
            }
        }
    }
    delta
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    /// Bytes in extents (buffered, not being sent).
    buffered: usize,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled whenever work arrives, a send ends or room is freed.
    changed: Condvar,
    transport: Arc<dyn FsTransport>,
    observer: Arc<dyn Observer>,
    limits: Limits,
}

/// The mount's buffered writes and the threads that send them. See the module docs.
pub struct WriteBack {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// One piece on its way to the service.
struct Job {
    nodeid: u64,
    handle: Handle,
    offset: u64,
    extent: Extent,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements that could panic; a poisoned lock
        // only means a sending thread died, and the others carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    fn wait_for<'a>(&self, guard: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(guard, d)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0)
    }

    /// A piece for a background thread: first for nodes someone waits on, then whole chunks,
    /// then (when buffers fill up or bytes grow old) anything. `None`: nothing to do now;
    /// the duration says when the oldest bytes come due.
    fn pick(&self, state: &mut State) -> (Option<Job>, Option<Duration>) {
        let now = Instant::now();
        let pressed = state.buffered > self.limits.dirty_max / 4;
        let mut due_in: Option<Duration> = None;
        let mut chosen = None;
        for pass in 0..3 {
            for (&nodeid, node) in state.nodes.iter_mut() {
                if node.extents.is_empty() {
                    continue;
                }
                let old = node
                    .since
                    .is_some_and(|t| now.duration_since(t) >= self.limits.max_age);
                let (eligible, full_only) = match pass {
                    0 => (node.waiters > 0, false),
                    1 => (true, true),
                    _ => (pressed || old, false),
                };
                if pass == 2 && !eligible {
                    if let Some(t) = node.since {
                        let left = self.limits.max_age.saturating_sub(now.duration_since(t));
                        due_in = Some(due_in.map_or(left, |d| d.min(left)));
                    }
                }
                if !eligible {
                    continue;
                }
                let chunk = self.limits.chunk;
                if let Some((offset, extent)) = node.take(|e| !full_only || e.data.len() >= chunk) {
                    chosen = Some(Job {
                        nodeid,
                        handle: node.handle,
                        offset,
                        extent,
                    });
                    break;
                }
            }
            if chosen.is_some() {
                break;
            }
        }
        if let Some(job) = &chosen {
            state.buffered = state.buffered.saturating_sub(job.extent.data.len());
        }
        (chosen, due_in)
    }

    /// Sends one piece (the rest of it again if the service took only part) and records the
    /// outcome. Called without the lock.
    fn send(&self, job: Job) {
        let Job {
            nodeid,
            handle,
            offset,
            extent,
        } = job;
        let len = extent.data.len() as u64;
        let mut done = 0u64;
        let mut failure = None;
        let mut last_attr = None;
        while done < len {
            let op = FsOp::Write {
                h: handle,
                offset: offset + done,
                data: extent.data[done as usize..].to_vec(),
            };
            let req = FsRequest {
                caller: extent.caller.clone(),
                op,
            };
            match self.transport.call(req) {
                Ok(Ok(FsReply::Write { count, attr })) => {
                    if count == 0 || u64::from(count) > len - done {
                        failure = Some(WriteError::Unexpected("write: no progress"));
                        break;
                    }
                    done += u64::from(count);
                    last_attr = Some(attr);
                }
                Ok(Ok(_)) => {
                    failure = Some(WriteError::Unexpected("write"));
                    break;
                }
                Ok(Err(e)) => {
                    failure = Some(WriteError::Service(e));
                    break;
                }
                Err(e) => {
                    failure = Some(WriteError::Transport(e));
                    break;
                }
            }
        }
        if let Some(attr) = &last_attr {
            self.observer.written(nodeid, attr);
        }
        if let Some(e) = &failure {
            warn!(
                nodeid,
                offset,
                bytes = len,
                "a buffered write was not accepted ({e:?}); the next close or fsync reports it"
            );
        }
        {
            let mut state = self.lock();
            if let Some(node) = state.nodes.get_mut(&nodeid) {
                if let Some(i) = node
                    .sending
                    .iter()
                    .position(|(r, _)| r.start == offset && r.end == offset + len)
                {
                    node.sending.swap_remove(i);
                }
                if let Some(e) = failure.clone() {
                    node.error_seq += 1;
                    node.error = Some(e);
                }
                if node.idle() {
                    state.nodes.remove(&nodeid);
                }
            }
        }
        self.changed.notify_all();
        if failure.is_some() {
            self.observer.failed(nodeid);
        }
    }

    fn run(self: Arc<Self>) {
        let mut state = self.lock();
        loop {
            // Stopping comes after a drain that gave up (a cluster gone for good): what is
            // left would only wait out one timeout per piece.
            if state.stopping {
                return;
            }
            let (job, due_in) = self.pick(&mut state);
            if let Some(job) = job {
                drop(state);
                // Room was freed for writers.
                self.changed.notify_all();
                self.send(job);
                state = self.lock();
                continue;
            }
            state = match due_in {
                Some(d) => self.wait_for(state, d.max(Duration::from_millis(1))),
                None => self.wait(state),
            };
        }
    }
}

impl WriteBack {
    pub fn new(
        transport: Arc<dyn FsTransport>,
        observer: Arc<dyn Observer>,
        limits: Limits,
    ) -> std::io::Result<WriteBack> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            transport,
            observer,
            limits,
        });
        let mut threads = Vec::new();
        for i in 0..limits.threads.max(1) {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("bftfs-writeback-{i}"))
                .spawn(move || s.run());
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Stop the ones already running before giving up.
                    shared.lock().stopping = true;
                    shared.changed.notify_all();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(WriteBack {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Keeps `data` for `offset` of node `nodeid` (service handle `handle`), to be written as
    /// `caller`. Waits while the mount's buffers are full.
    pub fn write(&self, nodeid: u64, handle: Handle, offset: u64, data: &[u8], caller: &Caller) {
        if data.is_empty() {
            return;
        }
        let limits = self.shared.limits;
        let mut state = self.shared.lock();
        // One write larger than the whole budget still goes in once the buffers are empty.
        while state.buffered > 0
            && state.buffered + data.len() > limits.dirty_max
            && !state.stopping
        {
            state = self.shared.wait(state);
        }
        let node = state
            .nodes
            .entry(nodeid)
            .or_insert_with(|| Node::new(handle));
        let mut dropped = 0;
        if node.handle != handle {
            // The node id now names another object (the kernel reused it after a forget
            // this table had not seen yet); its old bytes have nowhere to go.
            warn!(
                nodeid,
                "node id reused with bytes still buffered; dropping them"
            );
            dropped = node.extents.values().map(|e| e.data.len()).sum();
            node.extents.clear();
            node.handle = handle;
        }
        if node.extents.is_empty() {
            node.since = Some(Instant::now());
        }
        let epoch = node.epoch;
        node.epoch += 1;
        let delta = insert(&mut node.extents, offset, data, caller, epoch, limits.chunk);
        let buffered = state.buffered.saturating_sub(dropped);
        state.buffered = buffered.checked_add_signed(delta).unwrap_or(0);
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Waits until every byte of `nodeid` buffered before the call has been sent and
    /// answered, sending pieces from this thread too. Errors are not returned here: see
    /// [`WriteBack::error_since`].
    pub fn drain(&self, nodeid: u64) {
        let mut state = self.shared.lock();
        let upto = match state.nodes.get_mut(&nodeid) {
            Some(node) if !node.drained() => {
                node.waiters += 1;
                node.epoch
            }
            _ => return,
        };
        self.shared.changed.notify_all();
        while let Some(node) = state.nodes.get_mut(&nodeid) {
            if node.drained_upto(upto) {
                break;
            }
            if let Some((offset, extent)) = node.take(|e| e.epoch < upto) {
                let job = Job {
                    nodeid,
                    handle: node.handle,
                    offset,
                    extent,
                };
                state.buffered = state.buffered.saturating_sub(job.extent.data.len());
                drop(state);
                self.shared.changed.notify_all();
                self.shared.send(job);
                state = self.shared.lock();
            } else {
                state = self.shared.wait(state);
            }
        }
        if let Some(node) = state.nodes.get_mut(&nodeid) {
            node.waiters -= 1;
            if node.idle() {
                state.nodes.remove(&nodeid);
            }
        }
    }

    /// Whether `nodeid` has bytes not yet on the service (buffered or being sent).
    pub fn pending(&self, nodeid: u64) -> bool {
        self.shared
            .lock()
            .nodes
            .get(&nodeid)
            .is_some_and(|n| !n.drained())
    }

    /// The end of the furthest byte of `nodeid` not yet known to be on the service: the file
    /// is at least this long once they are, so no size given to the kernel may be smaller.
    pub fn pending_end(&self, nodeid: u64) -> Option<u64> {
        self.shared.lock().nodes.get(&nodeid).and_then(Node::end)
    }

    /// The node's error count, for a descriptor opened now (it is told only of later
    /// failures).
    pub fn error_seq(&self, nodeid: u64) -> u64 {
        self.shared
            .lock()
            .nodes
            .get(&nodeid)
            .map_or(0, |n| n.error_seq)
    }

    /// The latest failure of `nodeid` if there was one after `seen` (a descriptor's last
    /// count), and the count to remember.
    pub fn error_since(&self, nodeid: u64, seen: u64) -> (u64, Option<WriteError>) {
        let state = self.shared.lock();
        match state.nodes.get(&nodeid) {
            Some(n) if n.error_seq > seen => (n.error_seq, n.error.clone()),
            Some(n) => (n.error_seq, None),
            None => (seen, None),
        }
    }

    /// Drops the buffered bytes of `nodeid` (its object is being removed). Pieces already on
    /// their way finish.
    pub fn discard(&self, nodeid: u64) {
        let mut state = self.shared.lock();
        let Some(node) = state.nodes.get_mut(&nodeid) else {
            return;
        };
        let dropped: usize = node.extents.values().map(|e| e.data.len()).sum();
        node.extents.clear();
        node.since = None;
        state.buffered = state.buffered.saturating_sub(dropped);
        drop(state);
        self.shared.changed.notify_all();
    }

    /// The kernel forgot the node: nothing can report its errors any more. Bytes still
    /// buffered (not expected: a forgotten node has no open file) are kept and sent.
    pub fn forget(&self, nodeid: u64) {
        let mut state = self.shared.lock();
        if let Some(node) = state.nodes.get_mut(&nodeid) {
            node.error_seq = 0;
            node.error = None;
            if node.idle() {
                state.nodes.remove(&nodeid);
            }
        }
    }

    /// Sends everything buffered and waits, for at most `limit`; how many nodes still had
    /// bytes pending when it gave up.
    pub fn drain_all(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut state = self.shared.lock();
        for node in state.nodes.values_mut() {
            node.waiters += 1;
        }
        self.shared.changed.notify_all();
        loop {
            let left = state.nodes.values().filter(|n| !n.drained()).count();
            let now = Instant::now();
            if left == 0 || now >= deadline {
                for node in state.nodes.values_mut() {
                    node.waiters = node.waiters.saturating_sub(1);
                }
                state.nodes.retain(|_, n| !n.idle());
                return left;
            }
            state = self.shared.wait_for(state, deadline - now);
        }
    }
}

impl Drop for WriteBack {
    fn drop(&mut self) {
        let left = self.drain_all(Duration::from_secs(60));
        if left > 0 {
            warn!("{left} files still had buffered writes when the mount ended; they are lost");
        }
        self.shared.lock().stopping = true;
        self.shared.changed.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            if t.join().is_err() {
                debug!("a write-back thread had panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalTransport;
    use state_abstraction::fs::{CreateHow, SetAttrs};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn caller(uid: u32) -> Caller {
        Caller {
            uid,
            gid: uid,
            groups: Vec::new(),
        }
    }

    /// Replays the extents into a byte array, for comparison with a model.
    fn apply(extents: &BTreeMap<u64, Extent>, into: &mut Vec<u8>) {
        for (&o, e) in extents {
            let end = o as usize + e.data.len();
            if into.len() < end {
                into.resize(end, 0);
            }
            into[o as usize..end].copy_from_slice(&e.data);
        }
    }

    #[test]
    fn extents_match_a_byte_model_and_stay_disjoint_and_bounded() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for chunk in [1usize, 3, 16, 64] {
            let mut extents = BTreeMap::new();
            let mut model: Vec<Option<(u8, u32)>> = vec![None; 300];
            let mut buffered: isize = 0;
            for step in 0..2000u32 {
                let offset = next(250);
                let len = 1 + next(40) as usize;
                let who = caller(next(2) as u32);
                let byte = (step % 251) as u8;
                let data = vec![byte; len];
                buffered += insert(&mut extents, offset, &data, &who, u64::from(step), chunk);
                model[offset as usize..offset as usize + len].fill(Some((byte, who.uid)));
                let mut last_end = 0;
                let mut total = 0;
                for (&o, e) in &extents {
                    assert!(o >= last_end, "overlap at {o} (chunk {chunk})");
                    assert!(!e.data.is_empty() && e.data.len() <= chunk);
                    for (k, b) in e.data.iter().enumerate() {
                        assert_eq!(model[o as usize + k], Some((*b, e.caller.uid)));
                    }
                    last_end = o + e.data.len() as u64;
                    total += e.data.len();
                }
                assert_eq!(total as isize, buffered);
                let covered = model.iter().filter(|m| m.is_some()).count();
                assert_eq!(covered, total, "every written byte is kept once");
            }
        }
    }

    #[test]
    fn contiguous_writes_of_one_caller_merge_up_to_a_chunk() {
        let mut extents = BTreeMap::new();
        for i in 0..10u64 {
            insert(&mut extents, i * 4, &[i as u8; 4], &caller(1), i, 16);
        }
        let sizes: Vec<usize> = extents.values().map(|e| e.data.len()).collect();
        assert_eq!(sizes, vec![16, 16, 8]);
        // Another caller's bytes stay apart (each piece is written with its own rights).
        insert(&mut extents, 40, &[9; 4], &caller(2), 10, 16);
        assert_eq!(extents.len(), 4);
        let mut bytes = Vec::new();
        apply(&extents, &mut bytes);
        assert_eq!(&bytes[36..44], &[9, 9, 9, 9, 9, 9, 9, 9][..]);
    }

    struct Seen {
        written: AtomicUsize,
        failed: AtomicUsize,
    }

    impl Observer for Seen {
        fn written(&self, _nodeid: u64, _attr: &Attr) {
            self.written.fetch_add(1, Ordering::Relaxed);
        }
        fn failed(&self, _nodeid: u64) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn service() -> (tempfile::TempDir, Arc<LocalTransport>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = LocalTransport::open(dir.path()).expect("service");
        (dir, Arc::new(t))
    }

    fn call(t: &LocalTransport, who: Caller, op: FsOp) -> FsReply {
        t.call(FsRequest { caller: who, op })
            .expect("transport")
            .expect("service")
    }

    fn create(t: &LocalTransport, name: &str, mode: u32) -> Handle {
        match call(
            t,
            Caller::root(),
            FsOp::Create {
                dir: Handle::ROOT,
                name: name.as_bytes().to_vec(),
                mode,
                how: CreateHow::Guarded,
            },
        ) {
            FsReply::Entry { handle, .. } => handle,
            r => panic!("create: {r:?}"),
        }
    }

    fn contents(t: &LocalTransport, h: Handle) -> Vec<u8> {
        match call(
            t,
            Caller::root(),
            FsOp::Read {
                h,
                offset: 0,
                count: 1 << 20,
            },
        ) {
            FsReply::Read { data, .. } => data,
            r => panic!("read: {r:?}"),
        }
    }

    fn seen() -> Arc<Seen> {
        Arc::new(Seen {
            written: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        })
    }

    #[test]
    fn random_writes_reach_the_service_in_order_after_drain() {
        let (_dir, t) = service();
        let h = create(&t, "f", 0o644);
        let obs = seen();
        let limits = Limits {
            dirty_max: 4096,
            max_age: Duration::from_millis(5),
            chunk: 100,
            threads: 3,
        };
        let wb = WriteBack::new(t.clone(), obs.clone(), limits).expect("threads");
        let mut model = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for step in 0..3000u32 {
            let offset = next(20_000) as usize;
            let len = 1 + next(300) as usize;
            let data: Vec<u8> = (0..len).map(|k| (step as usize + k) as u8).collect();
            wb.write(7, h, offset as u64, &data, &Caller::root());
            if model.len() < offset + len {
                model.resize(offset + len, 0);
            }
            model[offset..offset + len].copy_from_slice(&data);
            assert!(wb.pending_end(7).unwrap_or(0) <= model.len() as u64);
            {
                // The budget counts exactly the bytes buffered and not being sent.
                let state = wb.shared.lock();
                let held: usize = state
                    .nodes
                    .values()
                    .flat_map(|n| n.extents.values())
                    .map(|e| e.data.len())
                    .sum();
                assert_eq!(state.buffered, held);
            }
            if step % 500 == 499 {
                wb.drain(7);
                assert!(!wb.pending(7));
                assert_eq!(contents(&t, h), model, "after step {step}");
            }
        }
        wb.drain(7);
        assert_eq!(contents(&t, h), model);
        assert_eq!(wb.error_since(7, 0), (0, None));
        assert_eq!(obs.failed.load(Ordering::Relaxed), 0);
        assert!(obs.written.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_drain_waits_for_earlier_writes_not_for_a_writer_that_keeps_going() {
        let (_dir, t) = service();
        let h = create(&t, "f", 0o644);
        let limits = Limits {
            max_age: Duration::from_secs(60),
            chunk: 4096,
            threads: 1,
            ..Limits::default()
        };
        let wb = Arc::new(WriteBack::new(t.clone(), seen(), limits).expect("threads"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (wb, stop) = (wb.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    wb.write(2, h, (i % 64) * 100, &[i as u8; 100], &Caller::root());
                    i += 1;
                }
            })
        };
        for _ in 0..20 {
            let start = Instant::now();
            wb.drain(2);
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "drain chased the writer"
            );
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        wb.drain(2);
        assert!(!wb.pending(2));
    }

    #[test]
    fn old_bytes_go_out_without_being_asked() {
        let (_dir, t) = service();
        let h = create(&t, "f", 0o644);
        let limits = Limits {
            max_age: Duration::from_millis(50),
            ..Limits::default()
        };
        let wb = WriteBack::new(t.clone(), seen(), limits).expect("threads");
        wb.write(3, h, 0, b"soon", &Caller::root());
        let start = Instant::now();
        while wb.pending(3) {
            assert!(start.elapsed() < Duration::from_secs(10), "never sent");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(contents(&t, h), b"soon");
    }

    #[test]
    fn a_refused_write_is_reported_once_to_each_descriptor_that_was_open() {
        let (_dir, t) = service();
        let h = create(&t, "f", 0o666);
        let obs = seen();
        let wb = WriteBack::new(t.clone(), obs.clone(), Limits::default()).expect("threads");
        // Two descriptors opened before the failure, one after.
        let (mut first, mut second) = (wb.error_seq(5), wb.error_seq(5));
        wb.write(5, h, 0, b"accepted", &caller(1000));
        wb.drain(5);
        assert_eq!(wb.error_since(5, first), (0, None));
        // The mode changes under the buffered write: the service refuses it.
        let set = SetAttrs {
            mode: Some(0o644),
            ..Default::default()
        };
        call(&t, Caller::root(), FsOp::SetAttr { h, set });
        wb.write(5, h, 8, b"refused", &caller(1000));
        wb.drain(5);
        assert_eq!(obs.failed.load(Ordering::Relaxed), 1);
        let (seq, e) = wb.error_since(5, first);
        assert_eq!(e, Some(WriteError::Service(FsError::Access)));
        first = seq;
        assert_eq!(wb.error_since(5, first).1, None, "told once");
        let (seq, e) = wb.error_since(5, second);
        assert!(e.is_some(), "the other descriptor is told too");
        second = seq;
        assert_eq!(wb.error_since(5, second).1, None);
        let late = wb.error_seq(5);
        assert_eq!(wb.error_since(5, late).1, None, "opened after: not told");
        assert_eq!(contents(&t, h), b"accepted");
        wb.forget(5);
        assert_eq!(wb.error_seq(5), 0);
    }

    /// A transport that holds every write until released, to see writers wait for room.
    struct Gate {
        inner: Arc<LocalTransport>,
        open: Mutex<bool>,
        cv: Condvar,
    }

    impl FsTransport for Gate {
        fn call(&self, req: FsRequest) -> Result<state_abstraction::fs::FsResult, TransportError> {
            let mut open = self.open.lock().expect("gate");
            while !*open {
                open = self.cv.wait(open).expect("gate");
            }
            drop(open);
            self.inner.call(req)
        }
    }

    #[test]
    fn writers_wait_when_the_buffers_are_full() {
        let (_dir, t) = service();
        let h = create(&t, "f", 0o644);
        let gate = Arc::new(Gate {
            inner: t.clone(),
            open: Mutex::new(false),
            cv: Condvar::new(),
        });
        let limits = Limits {
            dirty_max: 1000,
            max_age: Duration::from_secs(60),
            chunk: 100,
            threads: 2,
        };
        let wb = Arc::new(WriteBack::new(gate.clone(), seen(), limits).expect("threads"));
        let writer = {
            let wb = wb.clone();
            std::thread::spawn(move || {
                for i in 0..30u64 {
                    wb.write(1, h, i * 100, &[i as u8; 100], &Caller::root());
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !writer.is_finished(),
            "3000 bytes went into a 1000-byte buffer"
        );
        *gate.open.lock().expect("gate") = true;
        gate.cv.notify_all();
        writer.join().expect("writer");
        wb.drain(1);
        let want: Vec<u8> = (0..30u8).flat_map(|i| [i; 100]).collect();
        assert_eq!(contents(&t, h), want);
    }
}
