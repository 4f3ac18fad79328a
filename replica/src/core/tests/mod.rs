//! Unit tests of the core: given this state and this input, exactly these actions. One file
//! per protocol, as in the core; this one holds the harness they share.

mod catch_up;
mod checkpoint;
mod fast_path;
mod lock;
mod ordering;
mod requests;
mod restore;
mod state_transfer;

use super::{Action, Event, Replica};
use crate::config::{generate, ClusterConfig, ClusterKeys, ProtocolConfig};
use crate::sim::{sim_protocol, Rng};
use crate::wire::{
    AgreementMessage, Authenticator, ClientMessage, Commit, Message, PrePrepare, Prepare,
    Principal, Proposal, ReplicaId, Reply, Request, Signed, Signer, SpecResponse, Timestamp,
    ViewChangeMessage, FRAME_HEADER_BYTES,
};
use state_abstraction::kv::{KvOp, KvService};
use state_abstraction::ClientId;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

pub(super) struct Harness {
    keys: ClusterKeys,
    config: Arc<ClusterConfig>,
    replicas: Vec<Replica<KvService>>,
    auth: BTreeMap<Principal, Authenticator>,
}

impl Harness {
    /// Replicas on the commit path only (fast path off).
    fn new() -> Self {
        Self::with_fast_path(false)
    }

    fn with_fast_path(fast_path: bool) -> Self {
        let mut rng = Rng::new(42);
        let addresses = (0..4).map(|i| format!("test:{i}")).collect();
        let protocol = ProtocolConfig {
            fast_path,
            ..sim_protocol()
        };
        let keys = generate(1, addresses, &[ClientId(100)], protocol, &mut |b| {
            rng.fill(b)
        })
        .expect("keys");
        let config = Arc::new(keys.config.clone());
        let replicas = keys
            .replicas
            .iter()
            .map(|s| Replica::new(config.clone(), s, KvService::new()).expect("replica"))
            .collect();
        let mut auth = BTreeMap::new();
        for s in &keys.replicas {
            auth.insert(
                Principal::Replica(s.id),
                Authenticator::for_replica(&config, s),
            );
        }
        for s in &keys.clients {
            auth.insert(
                Principal::Client(s.id),
                Authenticator::for_client(&config, s),
            );
        }
        let mut h = Harness {
            keys,
            config,
            replicas,
            auth,
        };
        // Drain the initial snapshot of every replica.
        for r in 0..4 {
            h.tick(r, 1_000);
        }
        h
    }

    /// Seals `message` from `from` for replica `to`, opens it there, and steps it.
    fn deliver(&mut self, from: Principal, to: usize, message: &Message) -> Vec<Action> {
        let receiver = Principal::Replica(ReplicaId(to as u32));
        let frame = self.auth[&from].seal(message, &[receiver]).expect("seal");
        let opened = self.auth[&receiver]
            .open(&frame[FRAME_HEADER_BYTES..])
            .expect("open");
        let mut actions = Vec::new();
        self.replicas[to].step(Event::Message(opened), &mut actions);
        actions
    }

    fn tick(&mut self, to: usize, now_ns: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.replicas[to].step(Event::Tick { now_ns }, &mut actions);
        actions
    }

    fn request(&self, timestamp: u64, op: KvOp) -> Signed<Request> {
        let signer = Signer::from_secret(&self.keys.clients[0].signing_key.0);
        signer.sign(Request {
            client: ClientId(100),
            timestamp: Timestamp(timestamp),
            operation: op.encode(),
            read_only: false,
        })
    }

    /// The primary (replica 0) receives a request from the client and proposes it: its
    /// actions, and the proposal it broadcast (as a message, ready to deliver).
    fn propose(&mut self, timestamp: u64, op: KvOp) -> (Vec<Action>, Proposal, Message) {
        let request = self.request(timestamp, op);
        let actions = self.deliver(CLIENT, 0, &request_message(&request));
        let proposal = proposals_in(&actions)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no proposal in {actions:?}"));
        let message = Message::Agreement(AgreementMessage::PrePrepare(proposal.clone()));
        (actions, proposal, message)
    }

    fn replica_signer(&self, r: usize) -> Signer {
        Signer::from_secret(&self.keys.replicas[r].signing_key.0)
    }

    /// Replica `i`'s signed commit for the pre-prepare `b`.
    fn commit_of(&self, i: u32, b: &PrePrepare) -> Signed<Commit> {
        self.replica_signer(i as usize).sign(Commit {
            view: b.view,
            seq: b.seq,
            batch_digest: b.batch_digest,
            replica: ReplicaId(i),
        })
    }
}

/// `c` with a broken signature (its MAC, added when sealed, stays valid).
fn forged(mut c: Signed<Commit>) -> Signed<Commit> {
    let mut bytes = c.signature.to_bytes();
    bytes[5] ^= 0x10;
    c.signature = crate::wire::Signature::from_bytes(&bytes);
    c
}

const CLIENT: Principal = Principal::Client(ClientId(100));

fn put(key: &str, value: &str) -> KvOp {
    KvOp::Put {
        key: key.into(),
        value: value.into(),
    }
}

fn request_message(r: &Signed<Request>) -> Message {
    Message::Client(ClientMessage::Request(r.clone()))
}

fn append(key: &str, value: &str) -> KvOp {
    KvOp::Append {
        key: key.into(),
        value: value.into(),
    }
}

fn value(bytes: &str) -> Vec<u8> {
    state_abstraction::kv::KvReply::Value(Some(bytes.into())).encode()
}

fn spec_responses(actions: &[Action]) -> Vec<&SpecResponse> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendClient {
                message: Message::Client(ClientMessage::SpecResponse(s)),
                ..
            } => Some(&**s),
            _ => None,
        })
        .collect()
}

fn committed_replies(actions: &[Action]) -> Vec<&Reply> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendClient {
                message: Message::Client(ClientMessage::Reply(r)),
                ..
            } => Some(r),
            _ => None,
        })
        .collect()
}

impl Harness {
    fn read_only(&mut self, timestamp: u64, key: &str, to: usize) -> Vec<Action> {
        let signer = Signer::from_secret(&self.keys.clients[0].signing_key.0);
        let op = KvOp::Get { key: key.into() }.encode();
        let request = signer.sign(Request {
            client: ClientId(100),
            timestamp: Timestamp(timestamp),
            operation: op,
            read_only: true,
        });
        self.deliver(CLIENT, to, &request_message(&request))
    }

    /// Prepares and commits `proposal` at backup `to` with votes from the other backups.
    fn commit_at(&mut self, to: usize, proposal: &Proposal) -> Vec<Action> {
        let b = &proposal.pre_prepare.body;
        let mut all = Vec::new();
        for r in [1usize, 2, 3].into_iter().filter(|r| *r != to) {
            let p = self.replica_signer(r).sign(Prepare {
                view: b.view,
                seq: b.seq,
                batch_digest: b.batch_digest,
                replica: ReplicaId(r as u32),
            });
            all.extend(self.deliver(
                Principal::Replica(ReplicaId(r as u32)),
                to,
                &Message::Agreement(AgreementMessage::Prepare(p)),
            ));
        }
        for r in [0usize, 1, 2, 3].into_iter().filter(|r| *r != to) {
            let c = self.replica_signer(r).sign(Commit {
                view: b.view,
                seq: b.seq,
                batch_digest: b.batch_digest,
                replica: ReplicaId(r as u32),
            });
            all.extend(self.deliver(
                Principal::Replica(ReplicaId(r as u32)),
                to,
                &Message::Agreement(AgreementMessage::Commit(c)),
            ));
        }
        all
    }
}

/// Pre-prepares the primary broadcast among `actions`.
fn proposals_in(actions: &[Action]) -> Vec<Proposal> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Broadcast {
                message: Message::Agreement(AgreementMessage::PrePrepare(p)),
            } => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn starts_view_change(actions: &[Action]) -> bool {
    actions.iter().any(|a| {
        matches!(
            a,
            Action::Broadcast {
                message: Message::ViewChange(ViewChangeMessage::ViewChange(_))
            }
        )
    })
}

/// A message between replicas: (sender, receiver, message).
type Delivery = (usize, usize, Message);

impl Harness {
    /// Delivers the replica-to-replica messages among `actions` (replica `from`'s) and every
    /// message they cause in turn, in FIFO order, until none is left. Messages `drop` selects
    /// are not delivered; they are returned.
    fn exchange(
        &mut self,
        from: usize,
        actions: Vec<Action>,
        drop: impl Fn(&Delivery) -> bool,
    ) -> Vec<Delivery> {
        fn enqueue(queue: &mut VecDeque<Delivery>, from: usize, actions: Vec<Action>) {
            for action in actions {
                match action {
                    Action::Send { to, message } => queue.push_back((from, to.0 as usize, message)),
                    Action::Broadcast { message } => {
                        for to in (0..4).filter(|to| *to != from) {
                            queue.push_back((from, to, message.clone()));
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut queue = VecDeque::new();
        let mut dropped = Vec::new();
        enqueue(&mut queue, from, actions);
        while let Some(delivery) = queue.pop_front() {
            if drop(&delivery) {
                dropped.push(delivery);
                continue;
            }
            let (from, to, message) = delivery;
            let actions = self.deliver(Principal::Replica(ReplicaId(from as u32)), to, &message);
            enqueue(&mut queue, to, actions);
        }
        dropped
    }
}
