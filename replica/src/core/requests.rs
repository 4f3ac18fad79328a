//! Client requests (PROTOCOLS §2.2, §3): the read-only path (answered from committed state,
//! or held until the state is), answers from the reply cache, and ordered requests, which the
//! primary queues for a batch and a backup relays to the primary and then watches it for
//! (see `view_change_timer_expired` in `timers.rs`).

use super::execution::Lookup;
use super::{Action, Core};
use crate::wire::{
    ClientMessage, Message, Principal, Reply, Request, Signed, SpecResponse, Timestamp,
};

impl Core {
    /// A committed (or read-only) reply to `request`.
    fn reply(&self, request: &Request, result: Vec<u8>, read_only: bool) -> Action {
        Action::SendClient {
            to: request.client,
            message: Message::Client(ClientMessage::Reply(Reply {
                view: self.view,
                client: request.client,
                timestamp: request.timestamp,
                replica: self.id,
                read_only,
                result,
            })),
        }
    }

    /// A client's request, from the client or relayed by a replica: a read-only one is
    /// answered from committed state or held; an ordered one is answered from the reply cache,
    /// queued by the primary, or relayed to the primary and watched by a backup.
    pub(super) fn on_request(
        &mut self,
        sender: Principal,
        request: Signed<Request>,
        actions: &mut Vec<Action>,
    ) {
        let body = &request.body;
        if body.operation.len() > self.config.protocol.operation_bytes_max {
            self.metrics.requests_dropped += 1;
            return self.misbehaved(sender, "oversized operation", actions);
        }
        if body.read_only {
            // Unordered path: answer from the current (committed) state, or stay silent and
            // let the client fall back to the ordered path.
            // A replica that knows of batches it has not executed yet (restarted, or behind)
            // must not answer from its older state: after every replica restarts at once, 2f+1
            // of them could otherwise agree on a read that misses committed writes.
            // On the fast path the barrier also covers everything run speculatively: a replica
            // answers reads only from a fully committed state, never one a view change may undo,
            // and never from a state behind a write it already reported (a write completed on
            // 3f+1 speculative replies is thus seen by every correct replica that answers).
            if !self.policy.is_read_only(&body.operation)
                || self.transfer.is_some()
                || self.stable_ahead.is_some()
            {
                return;
            }
            if self.reads_behind() {
                // Usually just the commit of what ran speculatively, a round trip away: answer
                // then rather than make the client wait out its timeout and order the read.
                if self.deferred_reads.len() >= self.config.protocol.pending_requests_max {
                    self.deferred_reads.pop_front();
                    self.metrics.requests_dropped += 1;
                }
                tracing::debug!(
                    replica = self.id.0,
                    last = self.last_executed.0,
                    spec = self.spec_executed.0,
                    barrier = self.read_only_barrier.0,
                    "read held"
                );
                self.deferred_reads.push_back(request);
                return;
            }
            return self.ask_read_only(request, actions);
        }
        let key = (body.client, body.timestamp);
        match self.replies.lookup(&request) {
            Lookup::Cached(result) => {
                let result = result.to_vec();
                // A result that only ran speculatively goes out as such, with its order.
                let order = self
                    .spec_keys
                    .get(&key)
                    .and_then(|seq| self.log.get(seq))
                    .and_then(|s| s.executed.as_ref());
                match order {
                    Some(spec) => {
                        let reply = Reply {
                            view: self.view,
                            client: body.client,
                            timestamp: body.timestamp,
                            replica: self.id,
                            read_only: false,
                            result,
                        };
                        let message = SpecResponse {
                            reply,
                            order: spec.order.clone(),
                        };
                        actions.push(Action::SendClient {
                            to: body.client,
                            message: Message::Client(ClientMessage::SpecResponse(Box::new(
                                message,
                            ))),
                        });
                    }
                    None => actions.push(self.reply(body, result, false)),
                }
                return;
            }
            Lookup::Stale | Lookup::Evicted => {
                self.metrics.requests_dropped += 1;
                return;
            }
            Lookup::Reused => {
                self.metrics.requests_dropped += 1;
                // The client's signature says who did it, whoever relayed it.
                let client = Principal::Client(request.body.client);
                return self.misbehaved(client, "timestamp reused for another request", actions);
            }
            Lookup::New => {}
        }
        let limit = self.config.protocol.pending_requests_max;
        if self.view_active && self.is_primary() {
            if self.pending_keys.contains(&key) || self.proposed.contains(&key) {
                return;
            }
            let per_client = self
                .pending_keys
                .range((body.client, Timestamp(0))..=(body.client, Timestamp(u64::MAX)))
                .count();
            if self.pending.len() >= limit
                || per_client as u64 >= self.config.protocol.client_window
            {
                self.metrics.requests_dropped += 1;
                return;
            }
            self.pending_keys.insert(key);
            self.pending.push_back(request);
            self.try_propose(actions);
        } else {
            // The client timed out at the primary: relay the request and watch the primary.
            if !self.waiting.contains_key(&key) {
                if self.waiting.len() >= limit {
                    self.metrics.requests_dropped += 1;
                    return;
                }
                self.waiting.insert(key, (request.clone(), self.ticks));
            }
            if matches!(sender, Principal::Client(_)) {
                // A client retransmitting to everyone may mean the others ordered it and we
                // missed that (we may even sit alone in a later view): look for committed
                // batches we lack once the catch-up timeout passes.
                self.highest_seen = self.highest_seen.max(self.last_executed.next());
            }
            if self.view_active && matches!(sender, Principal::Client(_)) {
                actions.push(Action::Send {
                    to: self.primary(),
                    message: Message::Client(ClientMessage::Request(request)),
                });
            }
        }
    }

    /// Drops the requests this replica watches the primary for that are no longer new: a
    /// client may send request t to the backups only and t+1.. to the primary, which then
    /// finds t stale once the later ones fill the reply cache's window; if the backups kept
    /// waiting for t they would suspect every primary in turn.
    /// With `speculative_cache`, a cached reply may still be undone by a rollback, so only
    /// stale requests are dropped.
    pub(super) fn forget_answered_waiting(&mut self, speculative_cache: bool) {
        let replies = &self.replies;
        let before = self.waiting.len();
        self.waiting
            .retain(|_, (request, _)| match replies.lookup(request) {
                Lookup::New => true,
                Lookup::Cached(_) => speculative_cache,
                Lookup::Stale | Lookup::Evicted | Lookup::Reused => false,
            });
        self.metrics.requests_dropped += (before - self.waiting.len()) as u64;
    }

    /// See `on_request`: the state may not answer reads yet.
    fn reads_behind(&self) -> bool {
        self.last_executed < self.read_only_barrier || self.spec_executed > self.last_executed
    }

    /// Answers the held read-only requests once the state is fully committed.
    pub(super) fn answer_deferred_reads(&mut self, actions: &mut Vec<Action>) {
        if self.deferred_reads.is_empty()
            || self.reads_behind()
            || self.transfer.is_some()
            || self.stable_ahead.is_some()
        {
            return;
        }
        tracing::debug!(
            replica = self.id.0,
            reads = self.deferred_reads.len(),
            last = self.last_executed.0,
            "held reads answered"
        );
        while let Some(request) = self.deferred_reads.pop_front() {
            self.ask_read_only(request, actions);
        }
    }
}
