//! Execution: what passes between the ordering core and the execution stage.
//!
//! The core asks for execution with actions ([`super::StageAction::Execute`],
//! [`super::StageAction::TakeCheckpoint`], [`super::StageAction::Rollback`], ...) and learns the results
//! from events ([`super::Event::Executed`], [`super::Event::CheckpointTaken`], ...); it holds no
//! service. The stage ([`crate::execution::Stage`]) runs them in the order asked: in-process
//! in profile A, in another process later (ZZ).
//!
//! The reply cache ([`ReplyTable`], exactly-once semantics) is part of the replicated state
//! (its digest enters every checkpoint and it is transferred with the service state). The
//! stage holds the table it checkpoints, and decides with it which requests of a batch are new
//! ([`ReplyTable::run_batch`]); the core keeps a copy, updated from the results
//! ([`ReplyTable::record_results`]), to answer retransmissions and to keep executed requests
//! out of new batches.

use crate::wire::{
    decode, encode, Batch, Digest, Request, Signature, Signed, Timestamp, WireError,
};
use state_abstraction::digest::Hasher;
use state_abstraction::ClientId;
use std::collections::BTreeMap;

/// What the reply cache knows about a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Executed; here is the reply to resend.
    Cached(&'a [u8]),
    /// Executed, but its reply was evicted to keep the cache within its byte budget (see
    /// [`ReplyLimits`]): it is not executed again, and there is nothing to resend.
    Evicted,
    /// Older than every cached reply of this client: it completed long ago (a correct client
    /// never has it in flight any more), so it is neither executed nor answered.
    Stale,
    /// Another request of this client executed under the same timestamp: a faulty client, or
    /// one that restarted with a clock behind its earlier timestamps. Never executed.
    Reused,
    /// Not executed yet.
    New,
}

/// Bounds of the reply cache, from the cluster config.
///
/// The cache is replicated state: it travels whole in a state transfer's `Replies` message
/// and is written in every checkpoint's WAL record, so its size must stay far below the frame
/// and record limits whatever the replies' sizes (an ordered read may return 1 MiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyLimits {
    /// Replies kept per client (the client window).
    pub window: u64,
    /// Bytes of reply bodies kept per client; older bodies are evicted past it.
    pub bytes_per_client: usize,
}

/// Reply bytes the whole cache holds at most, shared among the configured clients.
pub const REPLIES_BYTES_TOTAL: usize = 16 << 20;

impl ReplyLimits {
    pub fn of(config: &crate::config::ClusterConfig) -> Self {
        let clients = config.clients.len().max(1);
        ReplyLimits {
            window: config.protocol.client_window,
            bytes_per_client: (REPLIES_BYTES_TOTAL / clients).clamp(64 << 10, 8 << 20),
        }
    }
}

/// One executed request: who sent it (its signature: Ed25519 signatures are deterministic,
/// so a retransmission carries the same one) and its reply, unless evicted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct CachedReply {
    request: Signature,
    reply: Option<Vec<u8>>,
}

/// Per client, the replies to its `window` most recent executed requests.
///
/// A correct client keeps at most `window` requests in flight, all within `window` of its
/// oldest incomplete one, so a request it may still retransmit is either cached here or new.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyTable {
    clients: BTreeMap<ClientId, BTreeMap<Timestamp, CachedReply>>,
    limits: ReplyLimits,
}

/// Canonical encoding: no maps (a vector sorted by client, then timestamp).
type EncodedTable = Vec<(ClientId, Vec<(Timestamp, CachedReply)>)>;

impl ReplyTable {
    pub fn new(limits: ReplyLimits) -> Self {
        ReplyTable {
            clients: BTreeMap::new(),
            limits,
        }
    }

    pub fn lookup(&self, request: &Signed<Request>) -> Lookup<'_> {
        let (client, timestamp) = (request.body.client, request.body.timestamp);
        let Some(replies) = self.clients.get(&client) else {
            return Lookup::New;
        };
        if let Some(cached) = replies.get(&timestamp) {
            return match &cached.reply {
                _ if cached.request != request.signature => Lookup::Reused,
                Some(reply) => Lookup::Cached(reply),
                None => Lookup::Evicted,
            };
        }
        match replies.keys().next() {
            Some(oldest) if replies.len() as u64 >= self.limits.window && timestamp < *oldest => {
                Lookup::Stale
            }
            _ => Lookup::New,
        }
    }

    fn record(&mut self, request: &Signed<Request>, reply: Vec<u8>) {
        let replies = self.clients.entry(request.body.client).or_default();
        replies.insert(
            request.body.timestamp,
            CachedReply {
                request: request.signature,
                reply: Some(reply),
            },
        );
        while replies.len() as u64 > self.limits.window {
            replies.pop_first();
        }
        // Newest first, within the budget. A retransmission of a request whose reply went
        // gets no answer (its client times out): replies that large come from ordered reads,
        // and a client has few of those in flight.
        let mut kept = 0usize;
        for cached in replies.values_mut().rev() {
            if let Some(reply) = &cached.reply {
                if kept + reply.len() > self.limits.bytes_per_client {
                    cached.reply = None;
                } else {
                    kept += reply.len();
                }
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let table: EncodedTable = self
            .clients
            .iter()
            .map(|(c, r)| {
                (
                    *c,
                    r.iter().map(|(t, cached)| (*t, cached.clone())).collect(),
                )
            })
            .collect();
        encode(&table).unwrap_or_default()
    }

    /// Decodes a table received from a peer (its digest is checked by the caller).
    pub fn decode(bytes: &[u8], limits: ReplyLimits) -> Result<Self, WireError> {
        let table: EncodedTable = decode(bytes)?;
        let mut out = ReplyTable::new(limits);
        for (client, replies) in table {
            if replies.len() as u64 > limits.window {
                return Err(WireError::Decode(
                    "reply table wider than the client window".into(),
                ));
            }
            out.clients.insert(client, replies.into_iter().collect());
        }
        Ok(out)
    }

    pub fn digest_of_encoding(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new("bftfs.replies");
        h.bytes(bytes);
        h.finish()
    }
}

/// A reply produced by execution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutedRequest {
    pub client: ClientId,
    pub timestamp: Timestamp,
    pub result: Vec<u8>,
    /// Run now (as opposed to answered from the cache): a copy of the reply cache records it.
    pub fresh: bool,
}

/// A checkpoint of the replicated state: the service's root digest, and the reply cache's
/// canonical encoding and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorCheckpoint {
    pub service_root: Digest,
    pub replies: Vec<u8>,
    pub replies_digest: Digest,
    /// The service says its state may differ from the correct replicas'
    /// (`Service::state_suspect`): not voted, repaired from the next stable checkpoint.
    pub suspect: bool,
}

impl ReplyTable {
    /// Runs a committed batch: a request already executed is not executed again; its cached
    /// reply is returned instead (exactly-once). Stale, evicted and reused ones produce
    /// nothing. `execute` runs one new request's operation on the service and returns its
    /// reply; it is called in batch order, and each reply is recorded before the next
    /// request is looked up (a later request of the batch may find the earlier one cached,
    /// or fall out of its client's window because of it).
    ///
    /// Which requests run does not depend on the replies (only whether a duplicate is
    /// answered from the cache or was evicted, by its size, does).
    pub fn run_batch(
        &mut self,
        batch: &Batch,
        mut execute: impl FnMut(&Signed<Request>) -> Vec<u8>,
    ) -> Vec<ExecutedRequest> {
        let mut out = Vec::with_capacity(batch.requests.len());
        for request in &batch.requests {
            let (client, timestamp) = (request.body.client, request.body.timestamp);
            match self.lookup(request) {
                Lookup::Cached(reply) => out.push(ExecutedRequest {
                    client,
                    timestamp,
                    result: reply.to_vec(),
                    fresh: false,
                }),
                Lookup::Stale | Lookup::Evicted | Lookup::Reused => {}
                Lookup::New => {
                    let result = execute(request);
                    self.record(request, result.clone());
                    out.push(ExecutedRequest {
                        client,
                        timestamp,
                        result,
                        fresh: true,
                    });
                }
            }
        }
        out
    }

    /// Brings a copy of the table up to date with a batch the execution stage ran (see
    /// [`ReplyTable::run_batch`]): the same replies recorded in the same order, so the copy
    /// equals the stage's table.
    pub fn record_results(&mut self, batch: &Batch, results: &[ExecutedRequest]) {
        let mut requests = batch.requests.iter();
        for r in results.iter().filter(|r| r.fresh) {
            let found = requests
                .by_ref()
                .find(|q| q.body.client == r.client && q.body.timestamp == r.timestamp);
            if let Some(request) = found {
                self.record(request, r.result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::wire::Signer;

    fn limits(window: u64, bytes_per_client: usize) -> ReplyLimits {
        ReplyLimits {
            window,
            bytes_per_client,
        }
    }

    fn request(signer: &Signer, timestamp: u64, operation: &[u8]) -> Signed<Request> {
        signer.sign(Request {
            client: ClientId(1),
            timestamp: Timestamp(timestamp),
            operation: operation.to_vec(),
            read_only: false,
        })
    }

    #[test]
    fn reply_table_window() {
        let signer = Signer::from_secret(&[7; 32]);
        let r = |t: u64| request(&signer, t, &[t as u8]);
        let mut t = ReplyTable::new(limits(2, 1 << 20));
        assert_eq!(t.lookup(&r(5)), Lookup::New);
        t.record(&r(5), vec![5]);
        t.record(&r(7), vec![7]);
        assert_eq!(t.lookup(&r(5)), Lookup::Cached(&[5]));
        assert_eq!(t.lookup(&r(6)), Lookup::New);
        t.record(&r(6), vec![6]);
        assert_eq!(t.lookup(&r(5)), Lookup::Stale);
        assert_eq!(t.lookup(&r(6)), Lookup::Cached(&[6]));
        let bytes = t.encode();
        assert_eq!(
            ReplyTable::decode(&bytes, limits(2, 1 << 20)).expect("decode"),
            t
        );
        assert!(ReplyTable::decode(&bytes, limits(1, 1 << 20)).is_err());
    }

    /// A client that restarted with its clock behind reuses a timestamp for another request:
    /// it must not receive the reply of the earlier one, nor have the new one run.
    #[test]
    fn another_request_under_a_cached_timestamp_is_refused() {
        let signer = Signer::from_secret(&[7; 32]);
        let mut t = ReplyTable::new(limits(4, 1 << 20));
        t.record(&request(&signer, 3, b"write a"), b"done a".to_vec());
        assert_eq!(
            t.lookup(&request(&signer, 3, b"write a")),
            Lookup::Cached(b"done a")
        );
        assert_eq!(t.lookup(&request(&signer, 3, b"write b")), Lookup::Reused);
    }

    /// Large replies (ordered reads of 1 MiB) cannot make the cache, which is replicated
    /// state sent whole in one message, grow past its budget; the newest always stays.
    #[test]
    fn reply_bodies_past_the_budget_are_evicted_oldest_first() {
        let signer = Signer::from_secret(&[7; 32]);
        let mut t = ReplyTable::new(limits(64, 3 << 20));
        let big = vec![0xab; 1 << 20];
        let cached = |t: &ReplyTable, ts: u64| match t.lookup(&request(&signer, ts, b"read")) {
            Lookup::Cached(r) => r == big.as_slice(),
            _ => false,
        };
        for ts in 1..=10 {
            t.record(&request(&signer, ts, b"read"), big.clone());
        }
        assert!(t.encode().len() < (3 << 20) + 64 * 200);
        assert!(cached(&t, 10) && cached(&t, 9) && cached(&t, 8));
        assert_eq!(t.lookup(&request(&signer, 7, b"read")), Lookup::Evicted);
        assert_eq!(t.lookup(&request(&signer, 1, b"read")), Lookup::Evicted);
        // A reply larger than the whole budget is not kept at all, and costs the others
        // nothing.
        t.record(&request(&signer, 11, b"read"), vec![1; 4 << 20]);
        assert_eq!(t.lookup(&request(&signer, 11, b"read")), Lookup::Evicted);
        assert!(cached(&t, 10) && cached(&t, 8));
    }
}
