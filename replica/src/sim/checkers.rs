//! Checkers of simulated runs.
//!
//! In: notifications from correct replicas (as they happen) and the clients' history of
//! invocations and completions. Out: the first violation, as text.
//!
//! - **Agreement**: no two correct replicas execute different batches at one sequence
//!   number, and the executed sequence has no holes.
//! - **Checkpoints**: every correct replica's checkpoint at a sequence number has the same
//!   service root and reply-cache digest (the divergence check, for either service).
//! - **Replies**: every correct replica that answers a request on the ordered path answers it
//!   with the same result (it ran at one place in one agreed order), timestamps included.
//! - **Linearizability** (over the key-value service): the agreed order (batches by sequence
//!   number, requests in batch order, each request at its first execution) is replayed on a
//!   model map; every ordered result must equal the model's; an operation that completed
//!   before another was invoked must come first in the agreed order (real time); a read
//!   answered on the read-only path must return a value its key had at some point of the
//!   agreed order inside the read's real-time window. Ticks are ordered: within one tick,
//!   deliveries (completions) come before invocations.
//! - **File results** (over the file service): the same, with a reference file service in
//!   place of the model map (see [`super::fs_workload::check_results`]).

use crate::client::RequestId;
use crate::core::Notification;
use crate::wire::{Digest, Reply, SeqNo, Timestamp};
use state_abstraction::fs::{FsOp, FsRequest};
use state_abstraction::kv::{KvOp, KvReply};
use state_abstraction::ClientId;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// An operation a correct client invoked, of either service.
#[derive(Clone, PartialEq, Eq)]
pub enum Operation {
    Kv(KvOp),
    Fs(Box<FsRequest>),
}

impl Operation {
    /// The bytes the client sends.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Operation::Kv(op) => op.encode(),
            Operation::Fs(request) => state_abstraction::fs::encode(&**request),
        }
    }
}

/// As the operation itself, except that written data shows as its length (a write carries
/// up to a MiB).
impl std::fmt::Debug for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::Kv(op) => op.fmt(f),
            Operation::Fs(request) => match &request.op {
                FsOp::Write { h, offset, data } => write!(
                    f,
                    "Write {{ h: {h:?}, offset: {offset}, data: {} bytes }}",
                    data.len()
                ),
                op => op.fmt(f),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct HistoryEntry {
    pub client: ClientId,
    pub id: RequestId,
    pub op: Operation,
    pub invoked: u64,
    pub completed: Option<u64>,
    pub result: Option<Vec<u8>>,
    pub read_only_path: bool,
}

/// What one sequence number executed: batch digest, requests, and who reported it first.
type ExecutedBatch = (Digest, Vec<(ClientId, Timestamp)>, u32);
/// A key's values along the agreed order: (state index from which it holds, value).
type Timeline = Vec<(usize, Option<Vec<u8>>)>;

pub struct Checker {
    byzantine: Vec<u32>,
    /// Faulty clients: what they send is executed and agreed on like anything else, but
    /// they keep no history (they touch only keys of their own).
    /// Correct clients whose requests are checked elsewhere (the lock holder's, in
    /// `holder.rs`): left out of the history's linearizability check only.
    untracked: Vec<ClientId>,
    faulty_clients: Vec<ClientId>,
    executed: BTreeMap<SeqNo, ExecutedBatch>,
    checkpoints: BTreeMap<SeqNo, (Digest, Digest, u32)>,
    /// Per request answered on the ordered path: a digest of the result and who sent it first.
    replies: BTreeMap<(ClientId, Timestamp), (Digest, u32)>,
    history: Vec<HistoryEntry>,
    /// File-service runs: an empty directory for the reference service the results are
    /// checked against (key-value runs check against a model map).
    fs_reference: Option<PathBuf>,
}

impl Checker {
    pub fn new(byzantine: Vec<u32>, faulty_clients: Vec<ClientId>) -> Self {
        Checker {
            byzantine,
            faulty_clients,
            untracked: Vec::new(),
            executed: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            replies: BTreeMap::new(),
            history: Vec::new(),
            fs_reference: None,
        }
    }

    /// Leaves `clients`' requests out of the linearizability check (see `untracked`).
    pub fn with_untracked(mut self, clients: Vec<ClientId>) -> Self {
        self.untracked = clients;
        self
    }

    /// Checks results against a reference file service over `dir` instead of the key-value
    /// model.
    pub fn with_fs_reference(mut self, dir: PathBuf) -> Self {
        self.fs_reference = Some(dir);
        self
    }

    /// A reply a correct replica sent (see the module doc: **Replies**). Replies on the
    /// read-only path come from whatever state each replica is in, and faulty clients may
    /// send two operations under one timestamp: neither is compared.
    pub fn observe_reply(&mut self, replica: u32, reply: &Reply) -> Result<(), String> {
        if self.byzantine.contains(&replica)
            || reply.read_only
            || self.faulty_clients.contains(&reply.client)
        {
            return Ok(());
        }
        let mut hasher = state_abstraction::digest::Hasher::new("bftfs.sim.reply");
        hasher.bytes(&reply.result);
        let digest = hasher.finish();
        let key = (reply.client, reply.timestamp);
        match self.replies.get(&key) {
            Some((d, who)) if *d != digest => Err(format!(
                "replies: replica {replica} answered {:?}/{:?} with another result than replica {who} (one request, one place in the agreed order)",
                reply.client, reply.timestamp
            )),
            Some(_) => Ok(()),
            None => {
                self.replies.insert(key, (digest, replica));
                Ok(())
            }
        }
    }

    /// The history, for tests that tamper with results to see the checks fire.
    #[cfg(test)]
    pub(crate) fn history_mut(&mut self) -> &mut Vec<HistoryEntry> {
        &mut self.history
    }

    /// The operation of history entry `h`.
    pub fn operation(&self, h: usize) -> Option<&Operation> {
        self.history.get(h).map(|e| &e.op)
    }

    pub fn observe(&mut self, replica: u32, n: &Notification) -> Result<(), String> {
        if self.byzantine.contains(&replica) {
            return Ok(());
        }
        match n {
            Notification::Executed { seq, batch_digest, requests } => match self.executed.get(seq) {
                Some((d, _, who)) if d != batch_digest => Err(format!(
                    "agreement: replica {replica} executed {batch_digest:?} at {seq:?}, replica {who} executed {d:?}"
                )),
                Some(_) => Ok(()),
                None => {
                    self.executed.insert(*seq, (*batch_digest, requests.clone(), replica));
                    Ok(())
                }
            },
            Notification::CheckpointTaken { seq, service_root, replies_digest }
            | Notification::CheckpointStable { seq, service_root, replies_digest } => match self.checkpoints.get(seq) {
                Some((root, replies, who)) if root != service_root || replies != replies_digest => Err(format!(
                    "checkpoint {seq:?}: replica {replica} has {service_root:?}/{replies_digest:?}, replica {who} has {root:?}/{replies:?}"
                )),
                Some(_) => Ok(()),
                None => {
                    self.checkpoints.insert(*seq, (*service_root, *replies_digest, replica));
                    Ok(())
                }
            },
            _ => Ok(()),
        }
    }

    pub fn invoke(&mut self, entry: HistoryEntry) -> usize {
        self.history.push(entry);
        self.history.len() - 1
    }

    pub fn complete(
        &mut self,
        h: usize,
        tick: u64,
        result: Vec<u8>,
        read_only: bool,
    ) -> Result<(), String> {
        let Some(entry) = self.history.get_mut(h) else {
            return Err(format!("unknown history entry {h}"));
        };
        if entry.completed.is_some() {
            return Err(format!(
                "request {:?} of {:?} completed twice",
                entry.id, entry.client
            ));
        }
        entry.completed = Some(tick);
        entry.result = Some(result);
        entry.read_only_path = read_only;
        Ok(())
    }

    /// Ordered completions that no correct replica has executed in committed order yet (a
    /// fast-path completion precedes its commit; the run goes on until it commits).
    pub fn completions_awaiting_commit(&self) -> usize {
        let committed: std::collections::BTreeSet<(ClientId, Timestamp)> = self
            .executed
            .values()
            .flat_map(|(_, requests, _)| requests.iter().copied())
            .collect();
        self.history
            .iter()
            .filter(|e| {
                e.completed.is_some()
                    && !e.read_only_path
                    && !committed.contains(&(e.client, Timestamp(e.id.0)))
            })
            .count()
    }

    pub fn completed(&self) -> u64 {
        self.history
            .iter()
            .filter(|e| e.completed.is_some())
            .count() as u64
    }

    pub fn read_only_completed(&self) -> u64 {
        self.history.iter().filter(|e| e.read_only_path).count() as u64
    }

    pub fn check_history(&self) -> Result<(), String> {
        // The agreed order, without holes.
        let mut expected_seq = SeqNo(1);
        let mut order: Vec<(ClientId, Timestamp)> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (seq, (_, requests, _)) in &self.executed {
            if *seq != expected_seq {
                return Err(format!(
                    "agreement: no correct replica reported executing {expected_seq:?}"
                ));
            }
            expected_seq = seq.next();
            for key in requests {
                if self.faulty_clients.contains(&key.0) || self.untracked.contains(&key.0) {
                    continue;
                }
                if seen.insert(*key) {
                    order.push(*key);
                }
            }
        }
        let by_request: BTreeMap<(ClientId, u64), usize> = self
            .history
            .iter()
            .enumerate()
            .map(|(i, e)| ((e.client, e.id.0), i))
            .collect();
        // Each request's position in the agreed order, and the history in that order.
        let mut position: BTreeMap<usize, usize> = BTreeMap::new();
        let mut in_order: Vec<usize> = Vec::new();
        for (pos, (client, timestamp)) in order.iter().enumerate() {
            let Some(&h) = by_request.get(&(*client, timestamp.0)) else {
                return Err(format!(
                    "executed request {client:?}/{timestamp:?} that no client sent"
                ));
            };
            position.insert(h, pos);
            in_order.push(h);
        }
        // Every ordered completion was executed by a correct replica.
        for (h, e) in self.history.iter().enumerate() {
            if e.completed.is_some() && !e.read_only_path && !position.contains_key(&h) {
                return Err(format!(
                    "request {:?} of {:?} completed but no correct replica executed it",
                    e.id, e.client
                ));
            }
        }
        // Real-time order among ordered operations.
        let ordered: Vec<(usize, usize)> = position.iter().map(|(h, p)| (*h, *p)).collect();
        for &(a, pa) in &ordered {
            let Some(done) = self.history[a].completed else {
                continue;
            };
            if self.history[a].read_only_path {
                continue;
            }
            for &(b, pb) in &ordered {
                if done <= self.history[b].invoked && pa >= pb {
                    return Err(format!(
                        "real time: {:?}/{:?} completed at {done} before {:?}/{:?} was invoked at {}, but is ordered after it",
                        self.history[a].client, self.history[a].id, self.history[b].client, self.history[b].id, self.history[b].invoked
                    ));
                }
            }
        }
        // The states of the agreed order (a state: how many of its requests were applied)
        // each read on the read-only path may have seen: from the last ordered request that
        // completed before it was invoked to the first one invoked after it completed.
        let mut reads: Vec<(usize, usize, usize)> = Vec::new();
        for (r, e) in self.history.iter().enumerate() {
            if !e.read_only_path {
                continue;
            }
            let (Some(done), Some(_)) = (e.completed, &e.result) else {
                continue;
            };
            let low = ordered
                .iter()
                .filter(|(a, _)| {
                    self.history[*a].completed.is_some_and(|c| c <= e.invoked)
                        && !self.history[*a].read_only_path
                })
                .map(|(_, p)| p + 1)
                .max()
                .unwrap_or(0);
            let high = ordered
                .iter()
                .filter(|(b, _)| self.history[*b].invoked >= done && *b != r)
                .map(|(_, p)| *p)
                .min()
                .unwrap_or(order.len());
            reads.push((r, low, high));
        }
        match &self.fs_reference {
            Some(dir) => super::fs_workload::check_results(&self.history, &in_order, &reads, dir),
            None => self.check_kv_results(&in_order, &reads),
        }
    }

    /// Linearizability over the key-value service: `in_order` is the history in the agreed
    /// order, `reads` the read-only-path reads with their windows (see `check_history`).
    fn check_kv_results(
        &self,
        in_order: &[usize],
        reads: &[(usize, usize, usize)],
    ) -> Result<(), String> {
        // Replay on a model; remember each key's value history.
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        // values[key] = [(position after which the value holds, value)]
        let mut timeline: BTreeMap<Vec<u8>, Timeline> = BTreeMap::new();
        for (pos, &h) in in_order.iter().enumerate() {
            let entry = &self.history[h];
            let op = kv_op(entry)?;
            let key = op.key().to_vec();
            let expected = match op {
                KvOp::Put { key, value } => {
                    KvReply::Value(model.insert(key.clone(), value.clone()))
                }
                KvOp::Get { key } => KvReply::Value(model.get(key).cloned()),
                KvOp::Append { key, value } => {
                    let v = model.entry(key.clone()).or_default();
                    v.extend_from_slice(value);
                    KvReply::Value(Some(v.clone()))
                }
                KvOp::Delete { key } => KvReply::Value(model.remove(key)),
                KvOp::Lock { .. } | KvOp::Release { .. } | KvOp::Resolve { .. } => {
                    return Err(format!("the simulator's clients take no locks: {op:?}"))
                }
            };
            timeline
                .entry(key.clone())
                .or_default()
                .push((pos + 1, model.get(&key).cloned()));
            if let (Some(result), false) = (&entry.result, entry.read_only_path) {
                if *result != expected.encode() {
                    return Err(format!(
                        "linearizability: {:?} request {:?} ({:?}) returned {:?}, the agreed order gives {:?}",
                        entry.client,
                        entry.id,
                        entry.op,
                        KvReply::decode(result),
                        expected
                    ));
                }
            }
        }
        // Read-only results.
        for &(r, low, high) in reads {
            let e = &self.history[r];
            let Some(result) = &e.result else {
                continue;
            };
            let key = kv_op(e)?.key().to_vec();
            let changes = timeline.get(&key).cloned().unwrap_or_default();
            // The key's value after `state` operations of the agreed order.
            let value_at = |state: usize| -> Option<Vec<u8>> {
                changes
                    .iter()
                    .rev()
                    .find(|(p, _)| *p <= state)
                    .and_then(|(_, v)| v.clone())
            };
            let mut candidates: Vec<usize> = vec![low];
            candidates.extend(
                changes
                    .iter()
                    .map(|(p, _)| *p)
                    .filter(|p| *p >= low && *p <= high),
            );
            let ok = candidates
                .iter()
                .any(|s| KvReply::Value(value_at(*s)).encode() == *result);
            if !ok {
                return Err(format!(
                    "linearizability: read-only {:?}/{:?} ({:?}) returned {:?}, not a value of the key between states {low} and {high}",
                    e.client,
                    e.id,
                    e.op,
                    KvReply::decode(result)
                ));
            }
        }
        Ok(())
    }
}

fn kv_op(e: &HistoryEntry) -> Result<&KvOp, String> {
    match &e.op {
        Operation::Kv(op) => Ok(op),
        other => Err(format!("a key-value run executed {other:?}")),
    }
}
