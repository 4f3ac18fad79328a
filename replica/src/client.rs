//! The client half of the protocol (sans-IO).
//!
//! In: operations to invoke, authenticated replies (from [`crate::wire::Authenticator::open`]),
//! ticks. Out: [`ClientAction`]s (send a request to the primary, or to every replica) and
//! [`Completion`]s.
//!
//! - An ordered request goes to the primary of the client's current view; it completes on
//!   2f+1 matching replies from distinct replicas. (f+1 would prove the result — one correct
//!   replica executed it in the committed order — but the read-only path needs more: with
//!   only f+1, a completed write may be executed at a single correct replica, and a later
//!   read could collect 2f+1 matching stale answers from f lagging correct replicas and f
//!   Byzantine ones. With 2f+1, at least f+1 correct replicas executed every completed
//!   request, so any 2f+1 matching read-only answers include one of them.)
//! - On a timeout it is retransmitted to every replica (backups relay it to the primary and
//!   start suspecting it); the timeout doubles up to a cap.
//! - A read-only request goes to every replica and completes on 2f+1 matching read-only
//!   replies; when that can no longer happen, or on its first timeout, it is re-sent on the
//!   ordered path with the same timestamp.
//! - The client's view is the highest view that f+1 replicas reported in replies.
//! - At most `client_window` requests are in flight, all within `client_window` timestamps of
//!   the oldest incomplete one (replicas cache that many replies per client).
//!
//! Timestamps start at the `first_timestamp` given to [`Client::new`]; a client that restarts
//! must start above every timestamp it used before (e.g. its wall clock in nanoseconds).

use crate::config::{ClientSecrets, ClusterConfig};
use crate::wire::{
    Authenticated, ClientMessage, Message, Principal, ReplicaId, Request, Signed, Signer, Timestamp, View,
};
use state_abstraction::ClientId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Names one invocation; equal to the request's timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What the driver must send (seal with the client's authenticator first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAction {
    Send { to: ReplicaId, message: Message },
    /// To every replica.
    Broadcast { message: Message },
}

/// A finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub id: RequestId,
    pub result: Vec<u8>,
    /// Answered on the read-only path (2f+1 matching) rather than the ordered one.
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("too many requests in flight")]
    WindowFull,
    #[error("operation of {0} bytes exceeds the limit")]
    OperationTooLarge(usize),
}

#[derive(Debug)]
struct InFlight {
    request: Signed<Request>,
    /// Latest reply from each replica (view, result), for the current mode only.
    replies: BTreeMap<ReplicaId, (View, Vec<u8>)>,
    sent_tick: u64,
    timeout_ticks: u64,
}

/// See the module doc.
pub struct Client {
    config: Arc<ClusterConfig>,
    id: ClientId,
    signer: Signer,
    next_timestamp: u64,
    in_flight: BTreeMap<Timestamp, InFlight>,
    view: View,
    ticks: u64,
    pub retransmissions: u64,
    pub read_only_fallbacks: u64,
}

impl Client {
    pub fn new(config: Arc<ClusterConfig>, secrets: &ClientSecrets, first_timestamp: u64) -> Self {
        Client {
            id: secrets.id,
            signer: Signer::from_secret(&secrets.signing_key.0),
            next_timestamp: first_timestamp.max(1),
            in_flight: BTreeMap::new(),
            view: View(0),
            ticks: 0,
            retransmissions: 0,
            read_only_fallbacks: 0,
            config,
        }
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The view the client believes current (where it sends ordered requests first).
    pub fn view(&self) -> View {
        self.view
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether [`Client::invoke`] would accept another request now.
    pub fn can_invoke(&self) -> bool {
        let window = self.config.protocol.client_window;
        let oldest = self.in_flight.keys().next().map(|t| t.0).unwrap_or(self.next_timestamp);
        (self.in_flight.len() as u64) < window && self.next_timestamp < oldest + window
    }

    /// Starts a request. `read_only` asks for the unordered path (the operation must be one
    /// the service answers without changing state).
    pub fn invoke(
        &mut self,
        operation: Vec<u8>,
        read_only: bool,
        actions: &mut Vec<ClientAction>,
    ) -> Result<RequestId, ClientError> {
        if operation.len() > self.config.protocol.operation_bytes_max {
            return Err(ClientError::OperationTooLarge(operation.len()));
        }
        if !self.can_invoke() {
            return Err(ClientError::WindowFull);
        }
        let timestamp = Timestamp(self.next_timestamp);
        self.next_timestamp += 1;
        let request = self.signer.sign(Request { client: self.id, timestamp, operation, read_only });
        self.send_first(&request, actions);
        self.in_flight.insert(
            timestamp,
            InFlight {
                request,
                replies: BTreeMap::new(),
                sent_tick: self.ticks,
                timeout_ticks: self.config.protocol.client_retransmit_ticks,
            },
        );
        Ok(RequestId(timestamp.0))
    }

    fn send_first(&self, request: &Signed<Request>, actions: &mut Vec<ClientAction>) {
        let message = Message::Client(ClientMessage::Request(request.clone()));
        if request.body.read_only {
            actions.push(ClientAction::Broadcast { message });
        } else {
            actions.push(ClientAction::Send { to: self.view.primary(self.config.n()), message });
        }
    }

    /// Handles a reply; completed requests are appended to `completed`.
    pub fn on_message(
        &mut self,
        message: Authenticated<Message>,
        actions: &mut Vec<ClientAction>,
        completed: &mut Vec<Completion>,
    ) {
        let (sender, message) = message.into_parts();
        let Message::Client(ClientMessage::Reply(reply)) = message else { return };
        // The verifier checked that the sender is the replica the reply names.
        if sender != Principal::Replica(reply.replica) || reply.client != self.id {
            return;
        }
        let (f, quorum, n) = (self.config.f as usize, self.config.quorum(), self.config.n());
        let Some(entry) = self.in_flight.get_mut(&reply.timestamp) else { return };
        if reply.read_only != entry.request.body.read_only {
            return;
        }
        entry.replies.insert(reply.replica, (reply.view, reply.result));
        // See the module doc for why ordered requests also need 2f+1.
        let needed = quorum;
        let mut tally: BTreeMap<&Vec<u8>, usize> = BTreeMap::new();
        for (_, result) in entry.replies.values() {
            *tally.entry(result).or_default() += 1;
        }
        let best = tally.iter().max_by_key(|(_, c)| **c).map(|(r, c)| ((*r).clone(), *c));
        let Some((result, count)) = best else { return };
        if count >= needed {
            // The highest view that f+1 replicas report is at most a correct replica's view.
            let mut views: Vec<View> = entry.replies.values().map(|(v, _)| *v).collect();
            views.sort_unstable_by(|a, b| b.cmp(a));
            if let Some(v) = views.get(f) {
                self.view = self.view.max(*v);
            }
            let read_only = entry.request.body.read_only;
            self.in_flight.remove(&reply.timestamp);
            completed.push(Completion { id: RequestId(reply.timestamp.0), result, read_only });
            return;
        }
        // Read-only: if the replies so far already make 2f+1 matching impossible, go ordered.
        if entry.request.body.read_only && count + (n - entry.replies.len()) < needed {
            self.fall_back(reply.timestamp, actions);
        }
    }

    fn fall_back(&mut self, timestamp: Timestamp, actions: &mut Vec<ClientAction>) {
        let Some(entry) = self.in_flight.get_mut(&timestamp) else { return };
        self.read_only_fallbacks += 1;
        let mut body = entry.request.body.clone();
        body.read_only = false;
        entry.request = self.signer.sign(body);
        entry.replies.clear();
        entry.sent_tick = self.ticks;
        entry.timeout_ticks = self.config.protocol.client_retransmit_ticks;
        let message = Message::Client(ClientMessage::Request(entry.request.clone()));
        actions.push(ClientAction::Send { to: self.view.primary(self.config.n()), message });
    }

    /// Advances time by one tick; retransmits what timed out.
    pub fn on_tick(&mut self, actions: &mut Vec<ClientAction>) {
        self.ticks += 1;
        let max = self.config.protocol.client_retransmit_ticks_max;
        let due: Vec<Timestamp> = self
            .in_flight
            .iter()
            .filter(|(_, e)| self.ticks >= e.sent_tick + e.timeout_ticks)
            .map(|(t, _)| *t)
            .collect();
        for timestamp in due {
            let read_only = self.in_flight.get(&timestamp).is_some_and(|e| e.request.body.read_only);
            if read_only {
                self.fall_back(timestamp, actions);
                continue;
            }
            if let Some(entry) = self.in_flight.get_mut(&timestamp) {
                entry.sent_tick = self.ticks;
                entry.timeout_ticks = (entry.timeout_ticks * 2).min(max);
                self.retransmissions += 1;
                actions.push(ClientAction::Broadcast {
                    message: Message::Client(ClientMessage::Request(entry.request.clone())),
                });
            }
        }
    }
}
