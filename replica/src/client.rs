//! The client half of the protocol (sans-IO).
//!
//! In: operations to invoke, authenticated replies (from [`crate::wire::Authenticator::open`]),
//! ticks. Out: [`ClientAction`]s (send a request to the primary, or to every replica) and
//! [`Completion`]s.
//!
//! - An ordered request goes to the primary of the client's current view. It completes on
//!   3f+1 matching speculative replies (fast path: the same signed order — view, sequence
//!   number, history — and the same result from every replica), or on 2f+1 matching replies
//!   to committed batches, from distinct replicas. Fewer speculative replies never complete
//!   it: 2f+1..3f of them do not survive every view change (PROTOCOLS §2.1, §6.1), so the
//!   client waits for the committed replies the background commit produces.
//! - Two validly signed orders for one (view, seq) that differ convict the primary: the
//!   client sends both to every replica (a proof of misbehaviour), once per (view, seq). (f+1 would prove the result — one correct
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
    Authenticated, ClientMessage, Message, Pom, PrePrepare, Principal, ReplicaId, Request, SeqNo,
    Signed, Signer, SpecResponse, Timestamp, View,
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
    Send {
        to: ReplicaId,
        message: Message,
    },
    /// To every replica.
    Broadcast {
        message: Message,
    },
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
    /// Latest speculative reply from each replica: (order, result).
    speculative: BTreeMap<ReplicaId, (PrePrepare, Vec<u8>)>,
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
    /// Requests completed on 3f+1 speculative replies.
    pub fast_completions: u64,
    /// Proofs of misbehaviour sent.
    pub poms_sent: u64,
    /// One signed order per (view, seq) seen in speculative replies (bounded), to catch an
    /// equivocating primary, and the (view, seq)s already reported.
    orders: BTreeMap<(View, SeqNo), Signed<PrePrepare>>,
    reported: BTreeMap<(View, SeqNo), ()>,
}

/// Signed orders remembered for misbehaviour detection.
const ORDERS_KEPT: usize = 1024;

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
            fast_completions: 0,
            poms_sent: 0,
            orders: BTreeMap::new(),
            reported: BTreeMap::new(),
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
        let oldest = self
            .in_flight
            .keys()
            .next()
            .map(|t| t.0)
            .unwrap_or(self.next_timestamp);
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
        let request = self.signer.sign(Request {
            client: self.id,
            timestamp,
            operation,
            read_only,
        });
        self.send_first(&request, actions);
        self.in_flight.insert(
            timestamp,
            InFlight {
                request,
                replies: BTreeMap::new(),
                speculative: BTreeMap::new(),
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
            actions.push(ClientAction::Send {
                to: self.view.primary(self.config.n()),
                message,
            });
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
        let reply = match message {
            Message::Client(ClientMessage::Reply(reply)) => reply,
            Message::Client(ClientMessage::SpecResponse(spec)) => {
                return self.on_spec_response(sender, *spec, actions, completed);
            }
            _ => return,
        };
        // The verifier checked that the sender is the replica the reply names.
        if sender != Principal::Replica(reply.replica) || reply.client != self.id {
            return;
        }
        let (f, quorum, n) = (
            self.config.f as usize,
            self.config.quorum(),
            self.config.n(),
        );
        let Some(entry) = self.in_flight.get_mut(&reply.timestamp) else {
            return;
        };
        if reply.read_only != entry.request.body.read_only {
            return;
        }
        entry
            .replies
            .insert(reply.replica, (reply.view, reply.result));
        // See the module doc for why ordered requests also need 2f+1.
        let needed = quorum;
        let mut tally: BTreeMap<&Vec<u8>, usize> = BTreeMap::new();
        for (_, result) in entry.replies.values() {
            *tally.entry(result).or_default() += 1;
        }
        let best = tally
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(r, c)| ((*r).clone(), *c));
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
            completed.push(Completion {
                id: RequestId(reply.timestamp.0),
                result,
                read_only,
            });
            return;
        }
        // Read-only: if the replies so far already make 2f+1 matching impossible, go ordered.
        if entry.request.body.read_only && count + (n - entry.replies.len()) < needed {
            self.fall_back(reply.timestamp, actions);
        }
    }

    fn on_spec_response(
        &mut self,
        sender: Principal,
        spec: SpecResponse,
        actions: &mut Vec<ClientAction>,
        completed: &mut Vec<Completion>,
    ) {
        let SpecResponse { reply, order } = spec;
        let n = self.config.n();
        if sender != Principal::Replica(reply.replica) || reply.client != self.id || reply.read_only
        {
            return;
        }
        // The verifier checked the signature; only the view's primary may order.
        if order.body.primary != order.body.view.primary(n) {
            return;
        }
        self.check_equivocation(&order, actions);
        let Some(entry) = self.in_flight.get_mut(&reply.timestamp) else {
            return;
        };
        if entry.request.body.read_only {
            return;
        }
        entry
            .speculative
            .insert(reply.replica, (order.body, reply.result));
        let Some((order, result)) = entry.speculative.values().next().cloned() else {
            return;
        };
        // All 3f+1 must match: every replica ran the same history and got the same result.
        if entry.speculative.len() == n
            && entry
                .speculative
                .values()
                .all(|(o, r)| *o == order && *r == result)
        {
            self.view = self.view.max(order.view);
            self.in_flight.remove(&reply.timestamp);
            self.fast_completions += 1;
            completed.push(Completion {
                id: RequestId(reply.timestamp.0),
                result,
                read_only: false,
            });
        }
    }

    fn check_equivocation(&mut self, order: &Signed<PrePrepare>, actions: &mut Vec<ClientAction>) {
        let key = (order.body.view, order.body.seq);
        match self.orders.get(&key) {
            Some(seen) if seen.body != order.body => {
                if self.reported.insert(key, ()).is_none() {
                    self.poms_sent += 1;
                    let pom = Pom {
                        first: seen.clone(),
                        second: order.clone(),
                    };
                    actions.push(ClientAction::Broadcast {
                        message: Message::Client(ClientMessage::Pom(Box::new(pom))),
                    });
                    while self.reported.len() > ORDERS_KEPT {
                        self.reported.pop_first();
                    }
                }
            }
            Some(_) => {}
            None => {
                self.orders.insert(key, order.clone());
                while self.orders.len() > ORDERS_KEPT {
                    self.orders.pop_first();
                }
            }
        }
    }

    fn fall_back(&mut self, timestamp: Timestamp, actions: &mut Vec<ClientAction>) {
        let Some(entry) = self.in_flight.get_mut(&timestamp) else {
            return;
        };
        self.read_only_fallbacks += 1;
        let mut body = entry.request.body.clone();
        body.read_only = false;
        entry.request = self.signer.sign(body);
        entry.replies.clear();
        entry.speculative.clear();
        entry.sent_tick = self.ticks;
        entry.timeout_ticks = self.config.protocol.client_retransmit_ticks;
        let message = Message::Client(ClientMessage::Request(entry.request.clone()));
        actions.push(ClientAction::Send {
            to: self.view.primary(self.config.n()),
            message,
        });
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
            let read_only = self
                .in_flight
                .get(&timestamp)
                .is_some_and(|e| e.request.body.read_only);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{generate_seeded, ClusterKeys, ProtocolConfig};
    use crate::wire::{Authenticator, Digest, Reply, FRAME_HEADER_BYTES};

    struct Setup {
        keys: ClusterKeys,
        client: Client,
        auth: Authenticator,
    }

    fn setup() -> Setup {
        let addresses = (0..4).map(|i| format!("t:{i}")).collect();
        let keys = generate_seeded(1, addresses, &[ClientId(7)], ProtocolConfig::default(), 3)
            .expect("keys");
        let config = Arc::new(keys.config.clone());
        let client = Client::new(config.clone(), &keys.clients[0], 1);
        let auth = Authenticator::for_client(&config, &keys.clients[0]);
        Setup { keys, client, auth }
    }

    /// A client with one ordered request (id 1, timestamp 1) invoked.
    fn invoked() -> Setup {
        let mut s = setup();
        s.client
            .invoke(b"op".to_vec(), false, &mut Vec::new())
            .expect("invoke");
        s
    }

    impl Setup {
        fn order(&self, history: u8) -> Signed<PrePrepare> {
            Signer::from_secret(&self.keys.replicas[0].signing_key.0).sign(PrePrepare {
                view: View(0),
                seq: SeqNo(1),
                batch_digest: Digest::default(),
                nondet: vec![],
                primary: ReplicaId(0),
                history: Digest([history; 32]),
            })
        }

        fn deliver(&mut self, from: u32, message: Message) -> (Vec<ClientAction>, Vec<Completion>) {
            let replica = &self.keys.replicas[from as usize];
            let sealed = Authenticator::for_replica(&self.keys.config, replica)
                .seal(&message, &[Principal::Client(ClientId(7))])
                .expect("seal");
            let opened = self.auth.open(&sealed[FRAME_HEADER_BYTES..]).expect("open");
            let (mut actions, mut completed) = (Vec::new(), Vec::new());
            self.client.on_message(opened, &mut actions, &mut completed);
            (actions, completed)
        }

        fn reply(from: u32, result: &[u8]) -> Reply {
            Reply {
                view: View(0),
                client: ClientId(7),
                timestamp: Timestamp(1),
                replica: ReplicaId(from),
                read_only: false,
                result: result.to_vec(),
            }
        }

        fn spec(
            &mut self,
            from: u32,
            history: u8,
            result: &[u8],
        ) -> (Vec<ClientAction>, Vec<Completion>) {
            let order = self.order(history);
            let m = Message::Client(ClientMessage::SpecResponse(Box::new(SpecResponse {
                reply: Self::reply(from, result),
                order,
            })));
            self.deliver(from, m)
        }

        fn committed(&mut self, from: u32, result: &[u8]) -> (Vec<ClientAction>, Vec<Completion>) {
            self.deliver(
                from,
                Message::Client(ClientMessage::Reply(Self::reply(from, result))),
            )
        }
    }

    #[test]
    fn completes_on_all_3f_plus_1_matching_speculative_replies() {
        let mut s = invoked();
        for r in 0..3 {
            assert!(
                s.spec(r, 1, b"ok").1.is_empty(),
                "2f+1 speculative replies are not enough"
            );
        }
        let (_, done) = s.spec(3, 1, b"ok");
        assert_eq!(
            done,
            vec![Completion {
                id: RequestId(1),
                result: b"ok".to_vec(),
                read_only: false
            }]
        );
        assert_eq!(s.client.fast_completions, 1);
    }

    #[test]
    fn mismatched_speculation_waits_for_2f_plus_1_committed_replies() {
        let mut s = invoked();
        for r in 0..3 {
            assert!(s.spec(r, 1, b"ok").1.is_empty());
        }
        // A lying replica: 3f+1 replies, but not 3f+1 matching ones.
        assert!(s.spec(3, 1, b"wrong").1.is_empty());
        assert!(s.committed(0, b"ok").1.is_empty());
        assert!(s.committed(3, b"wrong").1.is_empty());
        assert!(s.committed(1, b"ok").1.is_empty());
        let (_, done) = s.committed(2, b"ok");
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result, b"ok".to_vec());
        assert_eq!(s.client.fast_completions, 0);
    }

    #[test]
    fn two_orders_for_one_slot_are_sent_to_every_replica_once() {
        let mut s = invoked();
        assert!(s.spec(1, 1, b"ok").0.is_empty());
        let (actions, done) = s.spec(2, 2, b"ok");
        assert!(done.is_empty());
        let [ClientAction::Broadcast {
            message: Message::Client(ClientMessage::Pom(pom)),
        }] = &actions[..]
        else {
            panic!("{actions:?}")
        };
        assert!(pom.convicts(4));
        assert_eq!(
            (pom.first.body.history, pom.second.body.history),
            (Digest([1; 32]), Digest([2; 32]))
        );
        // Only once per (view, seq).
        assert!(s.spec(3, 3, b"ok").0.is_empty());
        assert_eq!(s.client.poms_sent, 1);
    }
}
