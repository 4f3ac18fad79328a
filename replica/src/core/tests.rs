//! Unit tests of the core: given this state and this input, exactly these actions.

use super::*;
use crate::config::{generate, ClusterKeys, ProtocolConfig};
use crate::sim::{sim_protocol, Rng};
use crate::wire::{Authenticator, FRAME_HEADER_BYTES};
use state_abstraction::kv::{KvOp, KvService};

struct Harness {
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

#[test]
fn primary_proposes_a_request_after_persisting_it() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let actions = h.deliver(CLIENT, 0, &request_message(&request));
    assert_eq!(actions.len(), 2, "{actions:?}");
    let Action::Persist(WalRecord::Accepted(proposal)) = &actions[0] else {
        panic!("{:?}", actions[0])
    };
    assert_eq!(proposal.pre_prepare.body.view, View(0));
    assert_eq!(proposal.pre_prepare.body.seq, SeqNo(1));
    assert_eq!(proposal.batch.requests, vec![request]);
    assert_eq!(
        proposal.pre_prepare.body.nondet,
        1_000u64.to_le_bytes().to_vec()
    );
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::PrePrepare(sent)),
    } = &actions[1]
    else {
        panic!("{:?}", actions[1])
    };
    assert_eq!(sent, &**proposal);
}

#[test]
fn backup_prepares_then_commits_then_executes() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let primary_actions = h.deliver(CLIENT, 0, &request_message(&request));
    let Action::Broadcast {
        message: pre_prepare,
    } = &primary_actions[1]
    else {
        panic!()
    };

    // Backup 1 accepts: persist, then prepare.
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, pre_prepare);
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Persist(WalRecord::Accepted(_))
    ));
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::Prepare(p1)),
    } = &actions[1]
    else {
        panic!("{:?}", actions[1])
    };
    assert_eq!(
        (p1.body.view, p1.body.seq, p1.body.replica),
        (View(0), SeqNo(1), ReplicaId(1))
    );

    // One more prepare (2f = 2 with its own): prepared — persist the certificate, then commit.
    let p2 = h.replica_signer(2).sign(Prepare {
        replica: ReplicaId(2),
        ..p1.body.clone()
    });
    let actions = h.deliver(
        Principal::Replica(ReplicaId(2)),
        1,
        &Message::Agreement(AgreementMessage::Prepare(p2)),
    );
    assert_eq!(actions.len(), 2, "{actions:?}");
    let Action::Persist(WalRecord::Prepared(cert)) = &actions[0] else {
        panic!("{:?}", actions[0])
    };
    assert_eq!(cert.prepares.len(), 2);
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::Commit(c1)),
    } = &actions[1]
    else {
        panic!("{:?}", actions[1])
    };
    assert_eq!(c1.body.replica, ReplicaId(1));

    // Two more commits (2f+1 = 3 with its own): execute, reply, notify.
    let c0 = h.replica_signer(0).sign(Commit {
        replica: ReplicaId(0),
        ..c1.body.clone()
    });
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::Commit(c0)),
    );
    assert!(actions.is_empty(), "{actions:?}");
    let c2 = h.replica_signer(2).sign(Commit {
        replica: ReplicaId(2),
        ..c1.body.clone()
    });
    let actions = h.deliver(
        Principal::Replica(ReplicaId(2)),
        1,
        &Message::Agreement(AgreementMessage::Commit(c2)),
    );
    assert_eq!(actions.len(), 2, "{actions:?}");
    let Action::SendClient {
        to,
        message: Message::Client(ClientMessage::Reply(reply)),
    } = &actions[0]
    else {
        panic!("{:?}", actions[0])
    };
    assert_eq!(*to, ClientId(100));
    assert_eq!(
        (reply.timestamp, reply.read_only, reply.replica),
        (Timestamp(1), false, ReplicaId(1))
    );
    assert_eq!(
        reply.result,
        state_abstraction::kv::KvReply::Value(None).encode()
    );
    assert!(matches!(
        &actions[1],
        Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
    ));
    assert_eq!(h.replicas[1].last_executed(), SeqNo(1));

    // The client retransmits the request: answered from the cache, not executed again.
    let actions = h.deliver(CLIENT, 1, &request_message(&request));
    assert_eq!(actions.len(), 1, "{actions:?}");
    let Action::SendClient {
        message: Message::Client(ClientMessage::Reply(again)),
        ..
    } = &actions[0]
    else {
        panic!("{:?}", actions[0])
    };
    assert_eq!(again, reply);
    assert_eq!(h.replicas[1].metrics().executed_requests, 1);
}

#[test]
fn equivocating_pre_prepare_is_refused() {
    let mut h = Harness::new();
    let first = h.request(1, put("a", "1"));
    let primary_actions = h.deliver(CLIENT, 0, &request_message(&first));
    let Action::Broadcast {
        message: pre_prepare,
    } = &primary_actions[1]
    else {
        panic!()
    };
    h.deliver(Principal::Replica(ReplicaId(0)), 2, pre_prepare);
    // A second, validly signed proposal for the same view and sequence number.
    let other = h.request(2, put("a", "2"));
    let batch = Batch {
        requests: vec![other],
    };
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&1_000u64.to_le_bytes()),
        nondet: 1_000u64.to_le_bytes().to_vec(),
        primary: ReplicaId(0),
        history: Digest::default(),
    };
    let proposal = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        2,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal)),
    );
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Notify(Notification::Misbehaviour {
            what: "equivocating pre-prepare",
            ..
        })
    ));
    assert_eq!(h.replicas[2].metrics().misbehaviour, 1);
}

#[test]
fn pre_prepare_with_a_time_far_ahead_is_refused() {
    let mut h = Harness::new();
    let batch = Batch {
        requests: vec![h.request(1, put("a", "1"))],
    };
    let far = (1_000 + state_abstraction::kv::MAX_CLOCK_SKEW_NS * 2)
        .to_le_bytes()
        .to_vec();
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&far),
        nondet: far.clone(),
        primary: ReplicaId(0),
        history: Digest::default(),
    };
    let proposal = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal)),
    );
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Notify(Notification::Misbehaviour { .. })
    ));
}

#[test]
fn backup_relays_a_retransmitted_request_and_suspects_the_primary() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let actions = h.deliver(CLIENT, 1, &request_message(&request));
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(
        &actions[0],
        Action::Send {
            to: ReplicaId(0),
            message: Message::Client(_)
        }
    ));
    // Nothing executes: after the view-change timeout, backup 1 asks for view 1 (persisting
    // first), and its timer for view 1 waits for 2f+1 view changes.
    let timeout = h.config.protocol.view_change_timeout_ticks;
    let mut all = Vec::new();
    for t in 0..=timeout {
        all.extend(h.tick(1, 2_000 + t));
    }
    let position = all
        .iter()
        .position(|a| {
            matches!(
                a,
                Action::Broadcast {
                    message: Message::ViewChange(ViewChangeMessage::ViewChange(_))
                }
            )
        })
        .expect("a view change");
    assert!(matches!(
        &all[position - 1],
        Action::Persist(WalRecord::EnteredView { view: View(1) })
    ));
    assert_eq!(h.replicas[1].view(), View(1));
    assert!(!h.replicas[1].is_view_active());
}

#[test]
fn restart_restores_votes_and_view() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let primary_actions = h.deliver(CLIENT, 0, &request_message(&request));
    let Action::Broadcast {
        message: pre_prepare,
    } = &primary_actions[1]
    else {
        panic!()
    };
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, pre_prepare);
    let wal: Vec<WalRecord> = actions
        .iter()
        .filter_map(|a| {
            if let Action::Persist(r) = a {
                Some(r.clone())
            } else {
                None
            }
        })
        .collect();
    let service = std::mem::replace(
        &mut h.replicas[1],
        Replica::new(h.config.clone(), &h.keys.replicas[1], KvService::new()).expect("r"),
    )
    .into_service();
    let mut restarted =
        Replica::restore(h.config.clone(), &h.keys.replicas[1], service, wal).expect("restore");
    // The same proposal again is a duplicate; a different one at (0, 1) is refused (rule 1).
    let mut actions = Vec::new();
    let batch = Batch {
        requests: vec![h.request(2, put("b", "2"))],
    };
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&1_000u64.to_le_bytes()),
        nondet: 1_000u64.to_le_bytes().to_vec(),
        primary: ReplicaId(0),
        history: Digest::default(),
    };
    let proposal = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let frame = h.auth[&Principal::Replica(ReplicaId(0))]
        .seal(
            &Message::Agreement(AgreementMessage::PrePrepare(proposal)),
            &[Principal::Replica(ReplicaId(1))],
        )
        .expect("seal");
    let opened = h.auth[&Principal::Replica(ReplicaId(1))]
        .open(&frame[FRAME_HEADER_BYTES..])
        .expect("open");
    restarted.step(Event::Message(opened), &mut actions);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Notify(Notification::Misbehaviour {
                what: "equivocating pre-prepare",
                ..
            })
        )),
        "{actions:?}"
    );
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Broadcast {
                message: Message::Agreement(AgreementMessage::Prepare(_))
            }
        )),
        "{actions:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fast path (speculative execution)

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

#[test]
fn backup_runs_a_pre_prepare_speculatively_and_confirms_it_on_commit() {
    let mut h = Harness::with_fast_path(true);
    let request = h.request(1, append("a", "1"));
    let primary_actions = h.deliver(CLIENT, 0, &request_message(&request));
    // The primary persists, broadcasts and runs its own proposal at once.
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::PrePrepare(proposal)),
    } = &primary_actions[1]
    else {
        panic!("{primary_actions:?}")
    };
    let proposal = proposal.clone();
    assert_eq!(spec_responses(&primary_actions).len(), 1);

    // Backup: persist, prepare, then the speculative reply carrying the primary's order.
    let message = Message::Agreement(AgreementMessage::PrePrepare(proposal.clone()));
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, &message);
    assert!(
        matches!(&actions[0], Action::Persist(WalRecord::Accepted(_))),
        "{actions:?}"
    );
    assert!(matches!(
        &actions[1],
        Action::Broadcast {
            message: Message::Agreement(AgreementMessage::Prepare(_))
        }
    ));
    let specs = spec_responses(&actions);
    assert_eq!(specs.len(), 1, "{actions:?}");
    assert_eq!(specs[0].order, proposal.pre_prepare);
    assert_eq!(
        (specs[0].reply.timestamp, specs[0].reply.result.clone()),
        (Timestamp(1), value("1"))
    );
    assert!(committed_replies(&actions).is_empty());
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Notify(Notification::Speculated { seq: SeqNo(1), .. })
    )));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::Notify(Notification::Executed { .. }))));
    assert_eq!(h.replicas[1].last_executed(), SeqNo(0));

    // Reads are not answered from speculative state.
    assert!(h.read_only(50, "a", 1).is_empty());
    // A retransmission gets the speculative reply again, not a committed one.
    let again = h.deliver(CLIENT, 1, &request_message(&request));
    assert_eq!(spec_responses(&again).len(), 1, "{again:?}");
    assert!(committed_replies(&again).is_empty());

    // Commit: the committed reply carries the speculative result; nothing runs twice. (The
    // waiting read is answered too.)
    let actions = h.commit_at(1, &proposal);
    let replies: Vec<_> = committed_replies(&actions)
        .into_iter()
        .filter(|r| !r.read_only)
        .collect();
    assert_eq!(replies.len(), 1, "{actions:?}");
    assert_eq!(replies[0].result, value("1"));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
    )));
    assert_eq!(h.replicas[1].last_executed(), SeqNo(1));
    let read = h.read_only(51, "a", 1);
    assert_eq!(
        committed_replies(&read)
            .iter()
            .map(|r| r.result.clone())
            .collect::<Vec<_>>(),
        vec![value("1")]
    );
}

#[test]
fn pre_prepare_whose_history_does_not_chain_is_not_run_speculatively() {
    let mut h = Harness::with_fast_path(true);
    let batch = Batch {
        requests: vec![h.request(1, append("a", "1"))],
    };
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&1_000u64.to_le_bytes()),
        nondet: 1_000u64.to_le_bytes().to_vec(),
        primary: ReplicaId(0),
        history: Digest([9; 32]),
    };
    let proposal = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal.clone())),
    );
    // Accepted and prepared (PBFT ignores histories), but not run.
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(spec_responses(&actions).is_empty());
    // It still commits and runs on the commit path.
    let actions = h.commit_at(1, &proposal);
    assert_eq!(committed_replies(&actions).len(), 1, "{actions:?}");
}

#[test]
fn speculation_is_rolled_back_when_another_batch_commits_at_its_sequence_number() {
    let mut h = Harness::with_fast_path(true);
    let mine = h.request(1, append("a", "mine"));
    let primary_actions = h.deliver(CLIENT, 0, &request_message(&mine));
    let Action::Broadcast { message } = &primary_actions[1] else {
        panic!()
    };
    let actions = h.deliver(Principal::Replica(ReplicaId(0)), 1, message);
    assert_eq!(spec_responses(&actions).len(), 1);

    // The primary equivocated: the others committed another batch at (0, 1).
    let theirs = h.request(2, append("a", "theirs"));
    let batch = Batch {
        requests: vec![theirs],
    };
    let anchor = history_anchor(&h.replicas[1].stable_checkpoint().clone());
    let nondet = 1_000u64.to_le_bytes().to_vec();
    let body = PrePrepare {
        view: View(0),
        seq: SeqNo(1),
        batch_digest: batch.ordered_digest(&nondet),
        history: chain_history(&anchor, SeqNo(1), &batch.ordered_digest(&nondet), &nondet),
        nondet,
        primary: ReplicaId(0),
    };
    let other = Proposal {
        pre_prepare: h.replica_signer(0).sign(body),
        batch,
    };
    let commits = [0u32, 2, 3]
        .iter()
        .map(|r| {
            let b = &other.pre_prepare.body;
            h.replica_signer(*r as usize).sign(Commit {
                view: b.view,
                seq: b.seq,
                batch_digest: b.batch_digest,
                replica: ReplicaId(*r),
            })
        })
        .collect();
    let cert = CommitCertificate {
        proposal: other.clone(),
        commits,
    };
    let actions = h.deliver(
        Principal::Replica(ReplicaId(2)),
        1,
        &Message::Agreement(AgreementMessage::Committed(Box::new(cert))),
    );
    let rolled = actions.iter().position(|a| {
        matches!(
            a,
            Action::Notify(Notification::RolledBack {
                to: SeqNo(0),
                from: SeqNo(1)
            })
        )
    });
    let executed = actions.iter().position(
        |a| matches!(a, Action::Notify(Notification::Executed { seq: SeqNo(1), batch_digest, .. }) if *batch_digest == other.pre_prepare.body.batch_digest),
    );
    assert!(rolled.is_some() && executed > rolled, "{actions:?}");
    // The committed reply is the re-executed one; the undone append left no trace.
    let replies = committed_replies(&actions);
    assert_eq!(
        replies
            .iter()
            .map(|r| (r.timestamp, r.result.clone()))
            .collect::<Vec<_>>(),
        vec![(Timestamp(2), value("theirs"))]
    );
    let read = h.read_only(50, "a", 1);
    assert_eq!(committed_replies(&read)[0].result, value("theirs"));
    // Exactly-once survives the rollback: the undone request is new again.
    let again = h.deliver(CLIENT, 1, &request_message(&mine));
    assert!(
        spec_responses(&again).is_empty() && committed_replies(&again).is_empty(),
        "{again:?}"
    );
    assert_eq!(h.replicas[1].metrics().rollbacks, 1);
}

#[test]
fn proof_of_misbehaviour_starts_a_view_change() {
    let mut h = Harness::with_fast_path(true);
    let make = |h: &Harness, history: u8| {
        h.replica_signer(0).sign(PrePrepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: Batch::default().digest(),
            nondet: vec![],
            primary: ReplicaId(0),
            history: Digest([history; 32]),
        })
    };
    // Two identical orders prove nothing.
    let same = Pom {
        first: make(&h, 1),
        second: make(&h, 1),
    };
    let actions = h.deliver(
        CLIENT,
        2,
        &Message::Client(ClientMessage::Pom(Box::new(same))),
    );
    assert!(
        matches!(
            &actions[..],
            [Action::Notify(Notification::Misbehaviour { .. })]
        ),
        "{actions:?}"
    );
    assert_eq!(h.replicas[2].view(), View(0));
    let pom = Pom {
        first: make(&h, 1),
        second: make(&h, 2),
    };
    let actions = h.deliver(
        CLIENT,
        2,
        &Message::Client(ClientMessage::Pom(Box::new(pom))),
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Persist(WalRecord::EnteredView { view: View(1) }))),
        "{actions:?}"
    );
    assert_eq!(h.replicas[2].view(), View(1));
    assert_eq!(h.replicas[2].metrics().poms, 1);
}

#[test]
fn hole_below_a_buffered_pre_prepare_is_filled_from_the_primary_then_anyone() {
    let mut h = Harness::with_fast_path(true);
    let first = h.deliver(CLIENT, 0, &request_message(&h.request(1, append("a", "1"))));
    let second = h.deliver(CLIENT, 0, &request_message(&h.request(2, append("a", "2"))));
    let proposal = |actions: &[Action]| {
        proposals_in(actions)
            .into_iter()
            .next()
            .expect("a pre-prepare")
    };
    let (p1, p2) = (proposal(&first), proposal(&second));
    assert_eq!(
        (p1.pre_prepare.body.seq, p2.pre_prepare.body.seq),
        (SeqNo(1), SeqNo(2))
    );

    // Backup 1 gets only the second: accepted, but it cannot run before the first.
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(p2.clone())),
    );
    assert!(spec_responses(&actions).is_empty(), "{actions:?}");
    let wait = h.config.protocol.retransmit_ticks;
    let fill_holes = |actions: &[Action]| -> Vec<Option<ReplicaId>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    to,
                    message:
                        Message::Agreement(AgreementMessage::FillHole {
                            from: SeqNo(1),
                            to: SeqNo(1),
                            ..
                        }),
                } => Some(Some(*to)),
                Action::Broadcast {
                    message:
                        Message::Agreement(AgreementMessage::FillHole {
                            from: SeqNo(1),
                            to: SeqNo(1),
                            ..
                        }),
                } => Some(None),
                _ => None,
            })
            .collect()
    };
    let mut asked = Vec::new();
    for t in 0..=2 * wait {
        asked.extend(fill_holes(&h.tick(1, 2_000 + t)));
    }
    // First the primary, then everyone.
    assert_eq!(asked.first(), Some(&Some(ReplicaId(0))), "{asked:?}");
    assert_eq!(asked.last(), Some(&None), "{asked:?}");

    // Replica 2 holds the first proposal and relays it (the primary's signature is what counts).
    h.deliver(
        Principal::Replica(ReplicaId(0)),
        2,
        &Message::Agreement(AgreementMessage::PrePrepare(p1.clone())),
    );
    let answer = h.deliver(
        Principal::Replica(ReplicaId(1)),
        2,
        &Message::Agreement(AgreementMessage::FillHole {
            view: View(0),
            from: SeqNo(1),
            to: SeqNo(1),
        }),
    );
    let Some(Action::Send {
        to: ReplicaId(1),
        message: filled @ Message::Agreement(AgreementMessage::Filled(_)),
    }) = answer.first()
    else {
        panic!("{answer:?}")
    };
    let actions = h.deliver(Principal::Replica(ReplicaId(2)), 1, filled);
    // Both now run, in order.
    let ran: Vec<SeqNo> = spec_responses(&actions)
        .iter()
        .map(|s| s.order.body.seq)
        .collect();
    assert_eq!(ran, vec![SeqNo(1), SeqNo(2)], "{actions:?}");
    assert_eq!(spec_responses(&actions)[1].reply.result, value("12"));
}

#[test]
fn read_during_speculation_is_answered_once_the_state_is_committed() {
    let mut h = Harness::with_fast_path(true);
    let first = h.deliver(CLIENT, 0, &request_message(&h.request(1, append("a", "1"))));
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::PrePrepare(p1)),
    } = &first[1]
    else {
        panic!()
    };
    let p1 = p1.clone();
    h.deliver(
        Principal::Replica(ReplicaId(0)),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(p1.clone())),
    );
    // The read waits (no answer from speculative state)...
    assert!(h.read_only(50, "a", 1).is_empty());
    // ...and is answered, with the write, as soon as it commits.
    let actions = h.commit_at(1, &p1);
    let read: Vec<_> = committed_replies(&actions)
        .into_iter()
        .filter(|r| r.read_only)
        .collect();
    assert_eq!(read.len(), 1, "{actions:?}");
    assert_eq!(
        (read[0].timestamp, read[0].result.clone()),
        (Timestamp(50), value("1"))
    );
}

/// Commits are not signature-checked on receipt (the MAC names their sender), so a forged one
/// counts toward a local commit and lands in the commit certificate; a replica catching up
/// from that certificate drops it and needs 2f+1 valid commits besides, which the spares
/// collected after committing provide.
#[test]
fn forged_commit_is_counted_locally_and_stripped_from_a_relayed_certificate() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let primary_actions = h.deliver(CLIENT, 0, &request_message(&request));
    let Action::Broadcast {
        message: Message::Agreement(AgreementMessage::PrePrepare(proposal)),
    } = &primary_actions[1]
    else {
        panic!("{:?}", primary_actions[1])
    };
    let proposal = proposal.clone();
    let b = proposal.pre_prepare.body.clone();
    let r = |i: u32| Principal::Replica(ReplicaId(i));
    h.deliver(
        r(0),
        1,
        &Message::Agreement(AgreementMessage::PrePrepare(proposal.clone())),
    );
    let p2 = h.replica_signer(2).sign(Prepare {
        view: b.view,
        seq: b.seq,
        batch_digest: b.batch_digest,
        replica: ReplicaId(2),
    });
    h.deliver(r(2), 1, &Message::Agreement(AgreementMessage::Prepare(p2)));
    let commit = |h: &Harness, i: u32| h.commit_of(i, &b);
    let (c0, c1, c2) = (commit(&h, 0), commit(&h, 1), commit(&h, 2));
    let c3_forged = forged(commit(&h, 3));

    // Replica 1 commits on its own commit, replica 0's and replica 3's forged one.
    h.deliver(
        r(0),
        1,
        &Message::Agreement(AgreementMessage::Commit(c0.clone())),
    );
    let actions = h.deliver(
        r(3),
        1,
        &Message::Agreement(AgreementMessage::Commit(c3_forged.clone())),
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
        )),
        "{actions:?}"
    );
    // Replica 2's commit arrives late and joins the certificate as a spare.
    let actions = h.deliver(r(2), 1, &Message::Agreement(AgreementMessage::Commit(c2)));
    assert!(actions.is_empty(), "{actions:?}");
    let actions = h.deliver(
        r(3),
        1,
        &Message::Agreement(AgreementMessage::FetchCommitted {
            from: SeqNo(1),
            to: SeqNo(1),
        }),
    );
    let [Action::Send {
        to: ReplicaId(3),
        message: committed @ Message::Agreement(AgreementMessage::Committed(cert)),
    }] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    let mut signers: Vec<u32> = cert.commits.iter().map(|c| c.body.replica.0).collect();
    signers.sort_unstable();
    assert_eq!(signers, vec![0, 1, 2, 3]);

    // Only 2f valid commits besides the forged one: refused, and not held against the
    // relayer (it could not know).
    let short = Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
        proposal: proposal.clone(),
        commits: vec![c0, c1, c3_forged],
    })));
    let actions = h.deliver(r(1), 2, &short);
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(h.replicas[2].last_executed(), SeqNo(0));
    assert_eq!(h.replicas[2].metrics().misbehaviour, 0);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(h.auth[&r(2)].counters.bad_signature.load(Relaxed), 1);

    // The certificate with the spare: the forged commit is dropped, 2f+1 valid remain.
    for to in [2, 3] {
        let actions = h.deliver(r(1), to, committed);
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
            )),
            "{actions:?}"
        );
        assert_eq!(h.replicas[to].last_executed(), SeqNo(1));
    }
    assert_eq!(h.auth[&r(2)].counters.bad_signature.load(Relaxed), 2);
    assert_eq!(h.auth[&r(3)].counters.bad_signature.load(Relaxed), 1);
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

/// A faulty client sends request 1 to a backup only and requests 2..=1+window to the
/// primary. Once those execute, request 1 is stale everywhere (the primary would drop it):
/// the backup must stop watching the primary for it rather than suspect it forever.
#[test]
fn a_request_sent_only_to_a_backup_and_overtaken_does_not_force_a_view_change() {
    let mut h = Harness::new();
    let window = h.config.protocol.client_window;
    let planted = h.request(1, put("a", "planted"));
    h.deliver(CLIENT, 1, &request_message(&planted));
    let mut queue: Vec<Proposal> = Vec::new();
    for t in 2..=1 + window {
        let r = h.request(t, put("a", &t.to_string()));
        queue.extend(proposals_in(&h.deliver(CLIENT, 0, &request_message(&r))));
    }
    let mut executed = 0;
    while let Some(p) = queue.pop() {
        let from = Principal::Replica(ReplicaId(0));
        h.deliver(
            from,
            1,
            &Message::Agreement(AgreementMessage::PrePrepare(p.clone())),
        );
        h.commit_at(1, &p);
        queue.extend(proposals_in(&h.commit_at(0, &p)));
        executed += p.batch.requests.len();
    }
    assert_eq!(executed as u64, window, "every later request was ordered");
    assert_eq!(h.replicas[1].exec.lookup(&planted), Lookup::Stale);
    let timeout = h.config.protocol.view_change_timeout_ticks;
    for t in 0..=2 * timeout {
        let actions = h.tick(1, 2_000 + t);
        assert!(
            !starts_view_change(&actions),
            "backup suspected the primary at tick {t}"
        );
    }
    assert!(h.replicas[1].is_view_active());
}

/// A batch committed with a faulty replica's forged commit in its only quorum: no correct
/// replica holds 2f+1 valid commit signatures for it. A lagging replica still catches up
/// without the faulty one, on the word of f+1 relayers.
#[test]
fn a_commit_certificate_short_of_valid_signatures_counts_once_f_plus_one_relayers_vouch() {
    let mut h = Harness::new();
    let request = h.request(1, put("a", "1"));
    let proposal = proposals_in(&h.deliver(CLIENT, 0, &request_message(&request)))
        .pop()
        .expect("a proposal");
    let b = proposal.pre_prepare.body.clone();
    let commit = |h: &Harness, i: u32| h.commit_of(i, &b);
    let forged = forged(commit(&h, 3));
    let short = Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
        proposal: proposal.clone(),
        commits: vec![commit(&h, 0), commit(&h, 1), forged],
    })));
    let r = |i: u32| Principal::Replica(ReplicaId(i));
    // One relayer, even twice, is not enough: it may be the faulty one.
    for _ in 0..2 {
        h.deliver(r(1), 2, &short);
        assert_eq!(h.replicas[2].last_executed(), SeqNo(0));
    }
    // A relayer vouching for another batch at that sequence number does not add up with it.
    let other = h.request(2, put("b", "2"));
    let mut wrong = proposals_in(&h.deliver(CLIENT, 0, &request_message(&other)))
        .pop()
        .expect("a second proposal");
    wrong.pre_prepare = h.replica_signer(0).sign(PrePrepare {
        seq: b.seq,
        ..wrong.pre_prepare.body.clone()
    });
    let wrong = Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
        proposal: wrong,
        commits: vec![commit(&h, 0)],
    })));
    h.deliver(r(3), 2, &wrong);
    assert_eq!(h.replicas[2].last_executed(), SeqNo(0));
    // A second relayer with the same proposal: f+1 = 2 vouch for it.
    let actions = h.deliver(r(0), 2, &short);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Notify(Notification::Executed { seq: SeqNo(1), .. })
        )),
        "{actions:?}"
    );
    assert_eq!(h.replicas[2].last_executed(), SeqNo(1));
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

/// Issue #11, item 6. A replica finds its own checkpoint 4 differs from a certified one and
/// repairs itself: it rolls back to its checkpoint 0 and fetches the state at 4, diffing
/// against 0 (the transfer's base). Meanwhile its own checkpoint 8, above the base, becomes
/// stable. The base must survive that: the next transfer (here, chasing the stable checkpoint
/// 8) diffs against it again, and without it the replica halted with "no own checkpoint to
/// transfer state against".
#[test]
fn a_checkpoint_above_the_transfer_base_becoming_stable_keeps_the_base() {
    let mut h = Harness::new();
    let interval = h.config.protocol.checkpoint_interval;
    assert_eq!(interval, 4, "the test counts on checkpoints at 4 and 8");
    // Eight batches, one request each, with every checkpoint vote to replica 3 held back:
    // it takes checkpoints 4 and 8 but sees neither become stable.
    let lagging = 3;
    let mut held = Vec::new();
    for t in 1..=2 * interval {
        let actions = h.deliver(
            CLIENT,
            0,
            &request_message(&h.request(t, put("a", &t.to_string()))),
        );
        held.extend(h.exchange(0, actions, |(_, to, m)| {
            *to == lagging && matches!(m, Message::Agreement(AgreementMessage::Checkpoint(_)))
        }));
    }
    let r3 = &h.replicas[lagging];
    assert_eq!(r3.last_executed(), SeqNo(8));
    assert_eq!(r3.stable_checkpoint().seq, SeqNo(0));
    assert_eq!(
        r3.own_checkpoints.keys().copied().collect::<Vec<_>>(),
        vec![SeqNo(0), SeqNo(4), SeqNo(8)]
    );
    for r in 0..3 {
        assert_eq!(
            h.replicas[r].stable_checkpoint().seq,
            SeqNo(8),
            "replica {r}"
        );
    }

    // 2f+1 replicas certify a state at 4 that differs from replica 3's: it repairs itself
    // from its checkpoint 0.
    let own = h.replicas[lagging].own_checkpoints[&SeqNo(4)].clone();
    let mut bad_root = own.service_root;
    bad_root.0[0] ^= 1;
    for r in 0..3u32 {
        let vote = h.replica_signer(r as usize).sign(Checkpoint {
            seq: SeqNo(4),
            service_root: bad_root,
            replies_digest: own.replies_digest,
            replica: ReplicaId(r),
        });
        // The transfer's requests go nowhere: the others kept no state at 4.
        h.deliver(
            Principal::Replica(ReplicaId(r)),
            lagging,
            &Message::Agreement(AgreementMessage::Checkpoint(vote)),
        );
    }
    let r3 = &h.replicas[lagging];
    let transfer = r3.transfer.as_ref().expect("a repair transfer");
    assert_eq!((transfer.target.seq, transfer.base), (SeqNo(4), SeqNo(0)));
    assert_eq!(r3.last_executed(), SeqNo(0));
    assert!(!r3.own_checkpoints.contains_key(&SeqNo(4)));

    // The held votes for 8 arrive: replica 3's own checkpoint 8 matches them and becomes
    // stable during the transfer. The transfer's base stays.
    for (from, to, message) in held {
        let Message::Agreement(AgreementMessage::Checkpoint(c)) = &message else {
            unreachable!()
        };
        if c.body.seq == SeqNo(8) {
            h.deliver(Principal::Replica(ReplicaId(from as u32)), to, &message);
        }
    }
    let r3 = &h.replicas[lagging];
    assert_eq!(r3.stable_checkpoint().seq, SeqNo(8));
    assert!(r3.is_transferring_state());
    assert!(
        r3.own_checkpoints.contains_key(&SeqNo(0)),
        "the transfer's base was dropped: {:?}",
        r3.own_checkpoints.keys().collect::<Vec<_>>()
    );

    // The next transfer: replica 3 learns of the stable checkpoint 8 (as its periodic
    // QueryStable would) and chases it, again from its base.
    let stable = h.replicas[0].stable_checkpoint().clone();
    let actions = h.deliver(
        Principal::Replica(ReplicaId(0)),
        lagging,
        &Message::StateTransfer(StateTransferMessage::ReplyStable(stable)),
    );
    let halted = actions.iter().find_map(|a| match a {
        Action::Halt { reason } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(halted, None, "the next transfer found no base");
    let r3 = &h.replicas[lagging];
    assert!(!r3.is_halted());
    assert_eq!(
        r3.transfer.as_ref().map(|t| (t.target.seq, t.base)),
        Some((SeqNo(8), SeqNo(0)))
    );
    assert_eq!(r3.metrics().state_transfers, 2);

    // It completes against the others' checkpoint 8 and the replica runs again.
    h.exchange(lagging, actions, |_| false);
    let r3 = &h.replicas[lagging];
    assert!(!r3.is_transferring_state());
    assert_eq!(r3.last_executed(), SeqNo(8));
    let actions = h.deliver(CLIENT, 0, &request_message(&h.request(100, put("b", "1"))));
    h.exchange(0, actions, |_| false);
    assert_eq!(h.replicas[lagging].last_executed(), SeqNo(9));
}
