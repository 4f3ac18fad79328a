//! Execution: the one narrow interface between ordering and the service.
//!
//! In: committed batches in sequence order (with the agreed nondeterministic value), read-only
//! requests, checkpoint/rollback/discard commands. Out: replies, checkpoint digests.
//!
//! Everything the ordering core asks of the service goes through [`Executor`], so that in the
//! ZZ profile the executor can live in another process (the core would then send it
//! `ExecBatch` messages and receive replies and checkpoint digests back) without the ordering
//! code changing. The executor also owns the reply cache (exactly-once semantics), which is
//! part of the replicated state: its digest enters every checkpoint and it is transferred
//! with the service state.

use crate::wire::{decode, encode, Batch, Digest, Request, Signed, Timestamp, WireError};
use state_abstraction::digest::Hasher;
use state_abstraction::{ClientId, Service, ServiceError};
use std::collections::BTreeMap;

/// What the reply cache knows about a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Executed; here is the reply to resend.
    Cached(&'a [u8]),
    /// Older than every cached reply of this client: it completed long ago (a correct client
    /// never has it in flight any more), so it is neither executed nor answered.
    Stale,
    /// Not executed yet.
    New,
}

/// Per client, the replies to its `window` most recent executed requests.
///
/// A correct client keeps at most `window` requests in flight, all within `window` of its
/// oldest incomplete one, so a request it may still retransmit is either cached here or new.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyTable {
    clients: BTreeMap<ClientId, BTreeMap<Timestamp, Vec<u8>>>,
    window: u64,
}

/// Canonical encoding: no maps (a vector sorted by client, then timestamp).
type EncodedTable = Vec<(ClientId, Vec<(Timestamp, Vec<u8>)>)>;

impl ReplyTable {
    pub fn new(window: u64) -> Self {
        ReplyTable {
            clients: BTreeMap::new(),
            window,
        }
    }

    pub fn lookup(&self, client: ClientId, timestamp: Timestamp) -> Lookup<'_> {
        let Some(replies) = self.clients.get(&client) else {
            return Lookup::New;
        };
        if let Some(reply) = replies.get(&timestamp) {
            return Lookup::Cached(reply);
        }
        match replies.keys().next() {
            Some(oldest) if replies.len() as u64 >= self.window && timestamp < *oldest => {
                Lookup::Stale
            }
            _ => Lookup::New,
        }
    }

    fn record(&mut self, client: ClientId, timestamp: Timestamp, reply: Vec<u8>) {
        let replies = self.clients.entry(client).or_default();
        replies.insert(timestamp, reply);
        while replies.len() as u64 > self.window {
            replies.pop_first();
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let table: EncodedTable = self
            .clients
            .iter()
            .map(|(c, r)| (*c, r.iter().map(|(t, reply)| (*t, reply.clone())).collect()))
            .collect();
        encode(&table).unwrap_or_default()
    }

    /// Decodes a table received from a peer (its digest is checked by the caller).
    pub fn decode(bytes: &[u8], window: u64) -> Result<Self, WireError> {
        let table: EncodedTable = decode(bytes)?;
        let mut out = ReplyTable::new(window);
        for (client, replies) in table {
            if replies.len() as u64 > window {
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
}

/// A checkpoint as the executor reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorCheckpoint {
    pub service_root: Digest,
    pub replies: Vec<u8>,
    pub replies_digest: Digest,
}

/// Runs committed batches against the service; see the module doc.
pub struct Executor<S> {
    service: S,
    replies: ReplyTable,
}

impl<S: Service> Executor<S> {
    pub fn new(service: S, client_window: u64) -> Self {
        Executor {
            service,
            replies: ReplyTable::new(client_window),
        }
    }

    pub fn service(&self) -> &S {
        &self.service
    }

    pub fn into_service(self) -> S {
        self.service
    }

    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }

    pub fn lookup(&self, client: ClientId, timestamp: Timestamp) -> Lookup<'_> {
        self.replies.lookup(client, timestamp)
    }

    pub fn is_read_only(&self, operation: &[u8]) -> bool {
        self.service.is_read_only(operation)
    }

    pub fn propose_nondet(&self, now_ns: u64) -> Vec<u8> {
        self.service.propose_nondet(now_ns)
    }

    pub fn check_nondet(&self, nondet: &[u8], now_ns: u64) -> bool {
        self.service.check_nondet(nondet, now_ns)
    }

    /// Executes a committed batch. A request already executed is not executed again; its
    /// cached reply is returned instead (exactly-once). Stale requests produce nothing.
    pub fn execute_batch(&mut self, batch: &Batch, nondet: &[u8]) -> Vec<ExecutedRequest> {
        let mut out = Vec::with_capacity(batch.requests.len());
        for request in &batch.requests {
            let Request {
                client,
                timestamp,
                operation,
                ..
            } = &request.body;
            match self.replies.lookup(*client, *timestamp) {
                Lookup::Cached(reply) => out.push(ExecutedRequest {
                    client: *client,
                    timestamp: *timestamp,
                    result: reply.to_vec(),
                }),
                Lookup::Stale => {}
                Lookup::New => {
                    let result = self.service.execute(operation, *client, nondet, false);
                    self.replies.record(*client, *timestamp, result.clone());
                    out.push(ExecutedRequest {
                        client: *client,
                        timestamp: *timestamp,
                        result,
                    });
                }
            }
        }
        out
    }

    /// Executes a read-only request against the current state (no ordering, no caching).
    pub fn execute_read_only(&mut self, request: &Signed<Request>) -> Vec<u8> {
        self.service
            .execute(&request.body.operation, request.body.client, &[], true)
    }

    pub fn checkpoint(&mut self, seq: u64) -> Result<ExecutorCheckpoint, ServiceError> {
        let service_root = self.service.checkpoint(seq)?;
        let replies = self.replies.encode();
        let replies_digest = ReplyTable::digest_of_encoding(&replies);
        Ok(ExecutorCheckpoint {
            service_root,
            replies,
            replies_digest,
        })
    }

    pub fn rollback_to(&mut self, seq: u64, replies: ReplyTable) -> Result<(), ServiceError> {
        self.service.rollback_to(seq)?;
        self.replies = replies;
        Ok(())
    }

    pub fn set_replies(&mut self, replies: ReplyTable) {
        self.replies = replies;
    }

    pub fn discard_before(&mut self, seq: u64) {
        self.service.discard_before(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_table_window() {
        let mut t = ReplyTable::new(2);
        assert_eq!(t.lookup(ClientId(1), Timestamp(5)), Lookup::New);
        t.record(ClientId(1), Timestamp(5), vec![5]);
        t.record(ClientId(1), Timestamp(7), vec![7]);
        assert_eq!(t.lookup(ClientId(1), Timestamp(5)), Lookup::Cached(&[5]));
        assert_eq!(t.lookup(ClientId(1), Timestamp(6)), Lookup::New);
        t.record(ClientId(1), Timestamp(6), vec![6]);
        assert_eq!(t.lookup(ClientId(1), Timestamp(5)), Lookup::Stale);
        assert_eq!(t.lookup(ClientId(1), Timestamp(6)), Lookup::Cached(&[6]));
        let bytes = t.encode();
        assert_eq!(ReplyTable::decode(&bytes, 2).expect("decode"), t);
        assert!(ReplyTable::decode(&bytes, 1).is_err());
    }
}
