//! Zzyzx's log protocol end to end over the key-value service: an ordered `Lock`, the
//! activation at a checkpoint (reached by the primary's null batches), entries completed on
//! 2f+1 replies, a seal certificate, the ordered `Release` and the merge; with a lying log
//! server, a server that misses entries, a server restarted mid-lock, a conflicting client,
//! and f = 2.

use super::super::{Action, Event, Replica, WalRecord};
use crate::client::{Client, ClientAction, Completion};
use crate::config::{generate, ClusterConfig, ClusterKeys, ProtocolConfig};
use crate::lock_client::{LockOutput, LockSession};
use crate::sim::{sim_protocol, Rng};
use crate::wire::{Authenticator, LockMessage, Message, Principal, ReplicaId, FRAME_HEADER_BYTES};
use state_abstraction::kv::{KvOp, KvReply, KvService};
use state_abstraction::{ClientId, LockId, LockedResult, Service};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

const HOLDER: ClientId = ClientId(100);
const OTHER: ClientId = ClientId(101);

type Filter = Box<dyn Fn(Principal, Principal, &Message) -> bool>;

struct Net {
    keys: ClusterKeys,
    config: Arc<ClusterConfig>,
    replicas: Vec<Option<Replica<KvService>>>,
    wal: Vec<Vec<WalRecord>>,
    auth: BTreeMap<Principal, Authenticator>,
    clients: BTreeMap<ClientId, Client>,
    session: Option<LockSession>,
    queue: VecDeque<(Principal, Principal, Message)>,
    outputs: Vec<LockOutput>,
    completions: Vec<(ClientId, Completion)>,
    now: u64,
    /// Messages for which this returns true are lost.
    drop: Filter,
    /// Replica whose lock replies and seals are rewritten on the way (a lying log server).
    liar: Option<usize>,
    /// The largest frame seen per message kind, and the largest WAL record.
    largest: BTreeMap<&'static str, usize>,
    largest_record: usize,
    /// Lock reports sent to any client (for a `Resolve`).
    reports: Vec<crate::wire::Signed<crate::wire::LockReport>>,
}

/// The replica gives its service the certificate checker itself (`Replica::restore`).
fn service(_config: &ClusterConfig) -> KvService {
    KvService::new()
}

impl Net {
    fn new(f: u32) -> Self {
        let n = 3 * f as usize + 1;
        let mut rng = Rng::new(7 + f as u64);
        let addresses = (0..n).map(|i| format!("test:{i}")).collect();
        let protocol = ProtocolConfig {
            fast_path: true,
            ..sim_protocol()
        };
        let keys = generate(f, addresses, &[HOLDER, OTHER], protocol, &mut |b| {
            rng.fill(b)
        })
        .expect("keys");
        let config = Arc::new(keys.config.clone());
        let replicas = keys
            .replicas
            .iter()
            .map(|s| Some(Replica::new(config.clone(), s, service(&config)).expect("replica")))
            .collect();
        let mut auth = BTreeMap::new();
        for s in &keys.replicas {
            auth.insert(
                Principal::Replica(s.id),
                Authenticator::for_replica(&config, s),
            );
        }
        let mut clients = BTreeMap::new();
        for s in &keys.clients {
            auth.insert(
                Principal::Client(s.id),
                Authenticator::for_client(&config, s),
            );
            clients.insert(s.id, Client::new(config.clone(), s, 1));
        }
        Net {
            keys,
            config,
            replicas,
            wal: vec![Vec::new(); n],
            auth,
            clients,
            session: None,
            queue: VecDeque::new(),
            outputs: Vec::new(),
            completions: Vec::new(),
            now: 1_000_000_000,
            drop: Box::new(|_, _, _| false),
            liar: None,
            largest: BTreeMap::new(),
            largest_record: 0,
            reports: Vec::new(),
        }
    }

    fn n(&self) -> usize {
        self.replicas.len()
    }

    fn replica(&self, r: usize) -> &Replica<KvService> {
        self.replicas[r].as_ref().expect("replica up")
    }

    fn replica_actions(&mut self, r: usize, actions: Vec<Action>) {
        let from = Principal::Replica(ReplicaId(r as u32));
        for a in actions {
            match a {
                Action::Persist(record) => {
                    let bytes = crate::wire::encode(&record).expect("encode").len();
                    assert!(
                        bytes <= crate::driver::wal::RECORD_BYTES_MAX,
                        "record of {bytes} B"
                    );
                    self.largest_record = self.largest_record.max(bytes);
                    if matches!(record, WalRecord::Snapshot(_)) {
                        self.wal[r].clear();
                    }
                    self.wal[r].push(record);
                }
                Action::Send { to, message } => {
                    self.queue
                        .push_back((from, Principal::Replica(to), message))
                }
                Action::Broadcast { message } => {
                    for to in (0..self.n()).filter(|t| *t != r) {
                        let to = Principal::Replica(ReplicaId(to as u32));
                        self.queue.push_back((from, to, message.clone()));
                    }
                }
                Action::SendClient { to, message } => {
                    self.queue.push_back((from, Principal::Client(to), message))
                }
                Action::Halt { reason } => panic!("replica {r} halted: {reason}"),
                _ => {}
            }
        }
    }

    fn client_actions(&mut self, c: ClientId, actions: Vec<ClientAction>) {
        let from = Principal::Client(c);
        for a in actions {
            match a {
                ClientAction::Send { to, message } => {
                    self.queue
                        .push_back((from, Principal::Replica(to), message))
                }
                ClientAction::Broadcast { message } => {
                    for to in 0..self.n() {
                        let to = Principal::Replica(ReplicaId(to as u32));
                        self.queue.push_back((from, to, message.clone()));
                    }
                }
            }
        }
    }

    fn lie(&self, from: Principal, mut message: Message) -> Message {
        if self.liar.map(|r| Principal::Replica(ReplicaId(r as u32))) != Some(from) {
            return message;
        }
        if let Message::Lock(LockMessage::Reply(reply)) = &mut message {
            reply.result = LockedResult::Done(KvReply::Value(Some(b"lie".to_vec())).encode());
        }
        message
    }

    fn deliver_all(&mut self) {
        let mut budget = 200_000;
        while let Some((from, to, message)) = self.queue.pop_front() {
            budget -= 1;
            assert!(budget > 0, "messages never stop");
            if (self.drop)(from, to, &message) {
                continue;
            }
            let message = self.lie(from, message);
            let frame = self.auth[&from].seal(&message, &[to]).expect("seal");
            assert!(frame.len() <= crate::wire::FRAME_BYTES_MAX + FRAME_HEADER_BYTES);
            let largest = self.largest.entry(message.kind()).or_default();
            *largest = (*largest).max(frame.len());
            let opened = self.auth[&to]
                .open(&frame[FRAME_HEADER_BYTES..])
                .expect("open");
            match to {
                Principal::Replica(r) => {
                    let r = r.0 as usize;
                    let Some(replica) = self.replicas[r].as_mut() else {
                        continue;
                    };
                    let mut actions = Vec::new();
                    replica.step(Event::Message(opened), &mut actions);
                    self.replica_actions(r, actions);
                }
                Principal::Client(c) => {
                    if let Message::Lock(LockMessage::Report(r)) = &message {
                        self.reports.push((**r).clone());
                        continue;
                    }
                    if matches!(message, Message::Lock(_)) {
                        if let Some(s) = self.session.as_mut().filter(|_| c == HOLDER) {
                            if let Some(out) = s.on_message(opened) {
                                self.outputs.push(out);
                            }
                        }
                        continue;
                    }
                    let mut actions = Vec::new();
                    let mut done = Vec::new();
                    let client = self.clients.get_mut(&c).expect("client");
                    client.on_message(opened, &mut actions, &mut done);
                    self.completions.extend(done.into_iter().map(|d| (c, d)));
                    self.client_actions(c, actions);
                }
            }
        }
    }

    fn tick(&mut self) {
        self.now += self.config.protocol.tick_ns;
        for r in 0..self.n() {
            if let Some(replica) = self.replicas[r].as_mut() {
                let mut actions = Vec::new();
                replica.step(Event::Tick { now_ns: self.now }, &mut actions);
                self.replica_actions(r, actions);
            }
        }
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for c in ids {
            let mut actions = Vec::new();
            self.clients
                .get_mut(&c)
                .expect("client")
                .on_tick(&mut actions);
            self.client_actions(c, actions);
        }
        if let Some(s) = self.session.as_mut() {
            let mut actions = Vec::new();
            s.on_tick(&mut actions);
            self.client_actions(HOLDER, actions);
        }
        self.deliver_all();
    }

    /// Ticks until `done` holds (at most `limit` ticks).
    fn run_until(&mut self, limit: u64, what: &str, done: impl Fn(&Net) -> bool) {
        for _ in 0..limit {
            self.deliver_all();
            if done(self) {
                return;
            }
            self.tick();
        }
        panic!("{what}: not within {limit} ticks");
    }

    /// Another client's ordered read of the locked key "a": refused, and the lock frozen at
    /// every replica.
    fn freeze_by_another_client(&mut self) {
        assert_eq!(
            self.call(OTHER, KvOp::Get { key: "a".into() }),
            KvReply::Locked
        );
        self.run_until(500, "frozen everywhere", |net| {
            net.replicas.iter().flatten().all(|r| {
                r.lock_logs()
                    .iter()
                    .all(|l| l.state == crate::wire::LockServerState::Frozen)
            })
        });
    }

    /// An ordered operation of client `c`, run to completion.
    fn call(&mut self, c: ClientId, op: KvOp) -> KvReply {
        let mut actions = Vec::new();
        let id = self
            .clients
            .get_mut(&c)
            .expect("client")
            .invoke(op.encode(), false, &mut actions)
            .expect("invoke");
        self.client_actions(c, actions);
        self.run_until(3_000, "ordered call", |net| {
            net.completions.iter().any(|(cc, d)| *cc == c && d.id == id)
        });
        let i = self
            .completions
            .iter()
            .position(|(cc, d)| *cc == c && d.id == id)
            .expect("completion");
        let (_, d) = self.completions.remove(i);
        KvReply::decode(&d.result).expect("reply")
    }

    /// Locks the bucket of `key` and waits until the holder's session is ready.
    fn lock(&mut self, key: &str) -> LockId {
        let lock = self.lock_activated(key);
        self.start_session(lock);
        self.run_until(2_000, "session ready", |net| {
            net.outputs
                .iter()
                .any(|o| matches!(o, LockOutput::Ready { .. }))
        });
        self.outputs.clear();
        lock
    }

    /// Locks the bucket of `key` and waits until a quorum of replicas activated the lock
    /// (the holder's session is not started).
    fn lock_activated(&mut self, key: &str) -> LockId {
        let KvReply::Lock(lock) = self.call(HOLDER, KvOp::Lock { key: key.into() }) else {
            panic!("lock refused");
        };
        let quorum = self.config.quorum();
        self.run_until(2_000, "activation", |net| {
            (0..net.n())
                .filter(|r| {
                    net.replicas[*r]
                        .as_ref()
                        .is_some_and(|x| x.lock_logs().iter().any(|l| l.lock == lock))
                })
                .count()
                >= quorum
        });
        lock
    }

    /// The holder's session for `lock`, asking the servers how they see it.
    fn start_session(&mut self, lock: LockId) {
        let holder = self.keys.clients[0].clone();
        assert_eq!(holder.id, HOLDER);
        let mut session = LockSession::new(self.config.clone(), &holder, lock);
        let mut actions = Vec::new();
        session.ping(&mut actions);
        self.session = Some(session);
        self.client_actions(HOLDER, actions);
    }

    /// One locked operation, run to completion.
    fn locked(&mut self, op: KvOp) -> KvReply {
        let mut actions = Vec::new();
        let now = self.now;
        let k = self
            .session
            .as_mut()
            .expect("session")
            .submit(op.encode(), now, &mut actions)
            .expect("submit");
        self.client_actions(HOLDER, actions);
        self.run_until(2_000, "locked entry", |net| {
            net.outputs
                .iter()
                .any(|o| matches!(o, LockOutput::Completed { k: done, .. } if *done == k))
        });
        let out = self.outputs.remove(0);
        let LockOutput::Completed {
            result: LockedResult::Done(bytes),
            ..
        } = out
        else {
            panic!("entry {k}: {out:?}");
        };
        KvReply::decode(&bytes).expect("reply")
    }

    /// Seals, releases with the certificate, and waits until every live replica merged.
    fn release(&mut self, lock: LockId) {
        let mut actions = Vec::new();
        self.session
            .as_mut()
            .expect("session")
            .seal(&mut actions)
            .expect("seal");
        self.client_actions(HOLDER, actions);
        self.run_until(2_000, "certificate", |net| {
            net.outputs
                .iter()
                .any(|o| matches!(o, LockOutput::Certificate(_)))
        });
        let Some(LockOutput::Certificate(cert)) = self
            .outputs
            .drain(..)
            .find(|o| matches!(o, LockOutput::Certificate(_)))
        else {
            panic!("no certificate");
        };
        let reply = self.call(
            HOLDER,
            KvOp::Release {
                lock,
                cert: Some(cert),
            },
        );
        assert_eq!(reply, KvReply::Done);
        self.session = None;
        self.run_until(3_000, "merge everywhere", |net| {
            net.replicas
                .iter()
                .flatten()
                .all(|r| r.lock_logs().is_empty())
        });
    }

    fn crash_and_restart(&mut self, r: usize) {
        let replica = self.replicas[r].take().expect("up");
        let mut service = replica.into_service();
        service.reopen();
        let secrets = self.keys.replicas[r].clone();
        let wal = self.wal[r].clone();
        self.replicas[r] =
            Some(Replica::restore(self.config.clone(), &secrets, service, wal).expect("restore"));
    }

    /// A cluster of 3f+1 where "a" holds "start", locked by the holder (bucket of "a").
    fn started(f: u32) -> (Net, LockId) {
        let mut net = Net::new(f);
        net.call(
            OTHER,
            KvOp::Put {
                key: "a".into(),
                value: "start".into(),
            },
        );
        let lock = net.lock("a");
        (net, lock)
    }

    /// Every live replica holds `expected` at `key` in the ordered state.
    fn assert_value(&self, key: &str, expected: &str) {
        let values = self.values(key);
        assert!(
            values
                .iter()
                .all(|v| v.as_deref() == Some(expected.as_bytes())),
            "{values:?}"
        );
    }

    /// Every live replica's value of `key` in the ordered state.
    fn values(&self, key: &str) -> Vec<Option<Vec<u8>>> {
        self.replicas
            .iter()
            .flatten()
            .map(|r| r.service().value(key.as_bytes()).cloned())
            .collect()
    }

    /// Drives ordered traffic until every live replica's newest checkpoint is the same one
    /// with the same digest (a diverged replica repairs itself by state transfer meanwhile).
    fn converge(&mut self) {
        for i in 0..12 {
            self.call(
                OTHER,
                KvOp::Put {
                    key: format!("filler{i}").into_bytes(),
                    value: b"x".to_vec(),
                },
            );
        }
        self.run_until(3_000, "same checkpoints", |net| {
            let newest: Vec<_> = net
                .replicas
                .iter()
                .flatten()
                .map(|r| r.service().checkpoints().last().copied())
                .collect();
            newest.windows(2).all(|w| w[0] == w[1])
        });
    }
}

fn append(key: &str, v: &str) -> KvOp {
    KvOp::Append {
        key: key.into(),
        value: v.into(),
    }
}

fn value(v: &str) -> KvReply {
    KvReply::Value(Some(v.as_bytes().to_vec()))
}

/// Runs the standard workload under a lock: 12 appends to "a", a put and a delete in the
/// same bucket; returns the expected final value of "a".
fn workload(net: &mut Net) -> String {
    let mut expected = String::from("start");
    for i in 0..12 {
        let v = format!("-{i}");
        expected.push_str(&v);
        assert_eq!(net.locked(append("a", &v)), value(&expected));
    }
    assert_eq!(net.locked(KvOp::Get { key: "a".into() }), value(&expected));
    expected
}

#[test]
fn a_server_that_heard_no_entry_catches_up_at_the_seal() {
    let (mut net, lock) = Net::started(1);
    net.drop = Box::new(|from, to, m| {
        from == Principal::Client(HOLDER)
            && to == Principal::Replica(ReplicaId(0))
            && matches!(m, Message::Lock(LockMessage::Entry(_)))
    });
    let expected = workload(&mut net);
    assert_eq!(net.replica(0).lock_logs().first().map(|l| l.k), Some(0));
    net.drop = Box::new(|_, _, _| false);
    net.release(lock);
    net.assert_value("a", &expected);
    net.converge();
}

#[test]
fn locked_operations_complete_and_merge_identically_everywhere() {
    let (mut net, lock) = Net::started(1);
    let expected = workload(&mut net);
    // The ordered state holds the placeholder meanwhile: "a" is not there.
    assert!(net.values("a").iter().all(|v| v.is_none()));
    net.release(lock);
    net.assert_value("a", &expected);
    net.converge();
    // And the merged value is what the ordered path reads.
    assert_eq!(
        net.call(OTHER, KvOp::Get { key: "a".into() }),
        value(&expected)
    );
}

#[test]
fn a_lying_log_server_cannot_change_a_result() {
    let (mut net, lock) = Net::started(1);
    net.liar = Some(2);
    let expected = workload(&mut net);
    net.release(lock);
    net.assert_value("a", &expected);
}

#[test]
fn a_server_that_missed_entries_fetches_them_from_its_peers() {
    let (mut net, lock) = Net::started(1);
    // Replica 3 misses entries 3 to 8: entry 9 shows it the hole, which it fills from its
    // peers.
    net.drop = Box::new(|from, to, m| {
        from == Principal::Client(HOLDER)
            && to == Principal::Replica(ReplicaId(3))
            && matches!(m, Message::Lock(LockMessage::Entry(e)) if (3..=8).contains(&e.entry.body.k))
    });
    let expected = workload(&mut net);
    net.run_until(500, "replica 3 catches up", |net| {
        net.replica(3).lock_logs().first().map(|l| l.k) == Some(13)
    });
    net.drop = Box::new(|_, _, _| false);
    net.release(lock);
    net.assert_value("a", &expected);
}

#[test]
fn a_server_restarted_mid_lock_replays_its_log() {
    let (mut net, lock) = Net::started(1);
    let mut expected = String::from("start");
    for i in 0..6 {
        let v = format!("-{i}");
        expected.push_str(&v);
        assert_eq!(net.locked(append("a", &v)), value(&expected));
    }
    net.crash_and_restart(1);
    net.tick();
    assert_eq!(net.replica(1).lock_logs().first().map(|l| l.k), Some(6));
    for i in 6..10 {
        let v = format!("-{i}");
        expected.push_str(&v);
        assert_eq!(net.locked(append("a", &v)), value(&expected));
    }
    net.release(lock);
    net.assert_value("a", &expected);
    net.converge();
}

#[test]
fn an_ordered_access_by_another_client_freezes_the_lock_and_the_holder_releases() {
    let (mut net, lock) = Net::started(1);
    assert_eq!(net.locked(append("a", "-mine")), value("start-mine"));
    // Another client touches the locked bucket: refused, and the lock freezes.
    net.freeze_by_another_client();
    // Nothing more is appended; the holder seals what completed and releases.
    net.release(lock);
    assert_eq!(
        net.call(OTHER, KvOp::Get { key: "a".into() }),
        value("start-mine")
    );
}

/// A freeze is told to the holder by every server as it happens, so an idle holder can
/// release at once; when those messages are lost, its idle ping finds the freeze within
/// about a second.
#[test]
fn an_idle_holder_learns_of_a_freeze_as_it_happens_or_by_its_idle_ping() {
    for lose_pushes in [false, true] {
        let (mut net, _lock) = Net::started(1);
        assert_eq!(net.locked(append("a", "-mine")), value("start-mine"));
        net.outputs.clear();
        if lose_pushes {
            net.drop = Box::new(|_, to, m| {
                to == Principal::Client(HOLDER)
                    && matches!(m, Message::Lock(LockMessage::Status { .. }))
            });
        }
        net.freeze_by_another_client();
        let revoked = |net: &Net| net.outputs.contains(&LockOutput::Revoked);
        if !lose_pushes {
            assert!(revoked(&net), "the holder was not told of the freeze");
            continue;
        }
        assert!(!revoked(&net), "told though every status was lost");
        net.drop = Box::new(|_, _, _| false);
        let second = 1_000_000_000 / net.config.protocol.tick_ns;
        net.run_until(second + 100, "the idle ping finds the freeze", revoked);
    }
}

/// A lock frozen before its holder's session was ever ready (another client's access came
/// between the grant and the activation the holder waits for): its log is empty, the
/// session seals it there, and the release with that certificate merges it at once,
/// without the release grace a `Resolve` would wait out.
#[test]
fn a_lock_frozen_before_it_was_served_is_sealed_empty_and_merges_at_once() {
    let mut net = Net::new(1);
    net.call(
        OTHER,
        KvOp::Put {
            key: "a".into(),
            value: "start".into(),
        },
    );
    let lock = net.lock_activated("a");
    net.freeze_by_another_client();
    net.start_session(lock);
    net.run_until(500, "the session sees the freeze", |net| {
        net.outputs.contains(&LockOutput::Revoked)
    });
    net.release(lock);
    assert_eq!(
        net.call(OTHER, KvOp::Get { key: "a".into() }),
        value("start")
    );
}

#[test]
fn f2_needs_five_matching_replies_and_merges() {
    let (mut net, lock) = Net::started(2);
    net.liar = Some(6);
    // One server hears nothing from the holder and one lies: 5 of 7 give the right
    // reply, exactly 2f+1.
    net.drop = Box::new(|from, to, m| {
        from == Principal::Client(HOLDER)
            && to == Principal::Replica(ReplicaId(5))
            && matches!(m, Message::Lock(LockMessage::Entry(_)))
    });
    let expected = workload(&mut net);
    net.drop = Box::new(|_, _, _| false);
    net.release(lock);
    net.assert_value("a", &expected);
    net.converge();
}

/// Many seeds: messages lost and duplicated at random, a lying server, a server restarted at
/// a random point; every completed locked operation's result is the model's, and every
/// replica ends with the model's value once the lock merged.
#[test]
fn random_loss_lies_and_restarts_over_seeds() {
    use std::cell::RefCell;
    use std::rc::Rc;
    for seed in 0..24u64 {
        let f = if seed % 4 == 3 { 2 } else { 1 };
        let mut net = Net::new(f);
        let n = net.n();
        let rng = Rc::new(RefCell::new(Rng::new(seed)));
        net.call(
            OTHER,
            KvOp::Put {
                key: "a".into(),
                value: "start".into(),
            },
        );
        let lock = net.lock("a");
        let liar = rng.borrow_mut().below(n as u64) as usize;
        net.liar = Some(liar);
        let loss = {
            let rng = rng.clone();
            move |_: Principal, _: Principal, _: &Message| rng.borrow_mut().below(1000) < 80
        };
        net.drop = Box::new(loss);
        let restart_at = rng.borrow_mut().below(10);
        let restarted = (liar + 1 + rng.borrow_mut().below(n as u64 - 1) as usize) % n;
        let mut expected = String::from("start");
        for i in 0..10 {
            if i == restart_at {
                net.crash_and_restart(restarted);
            }
            let v = format!("-{i}");
            expected.push_str(&v);
            assert_eq!(net.locked(append("a", &v)), value(&expected), "seed {seed}");
        }
        net.release(lock);
        net.drop = Box::new(|_, _, _| false);
        net.converge();
        assert!(
            net.values("a")
                .iter()
                .all(|v| v.as_deref() == Some(expected.as_bytes())),
            "seed {seed}: {:?}",
            net.values("a")
        );
    }
}

/// Entries as large as an operation may be, some of them fetched by a server that missed
/// them: every frame and record fits the bound the config check computes.
#[test]
fn the_largest_entries_fit_their_limits() {
    let mut net = Net::new(1);
    let lock = net.lock("a");
    net.drop = Box::new(|from, to, m| {
        from == Principal::Client(HOLDER)
            && to == Principal::Replica(ReplicaId(3))
            && matches!(m, Message::Lock(LockMessage::Entry(e)) if (2..=6).contains(&e.entry.body.k))
    });
    let big = net.config.protocol.operation_bytes_max - 64;
    for i in 0..8u8 {
        let op = KvOp::Put {
            key: "a".into(),
            value: vec![i; big],
        };
        assert!(op.encode().len() <= net.config.protocol.operation_bytes_max);
        net.locked(op);
    }
    net.run_until(500, "replica 3 catches up", |net| {
        net.replica(3).lock_logs().first().map(|l| l.k) == Some(8)
    });
    net.drop = Box::new(|_, _, _| false);
    net.release(lock);
    let bound = crate::core::bounds::lock_message_bytes(&net.config);
    let entries = net.largest["lock_entries"];
    // One large entry per answer: a second would pass `operation_bytes_max` of operations.
    assert!(entries > big && entries < 2 * big, "{entries} B");
    assert!(entries <= bound, "{entries} B over the bound {bound}");
    assert!(net.largest["lock_entry"] <= bound);
    assert!(net.largest_record <= bound.max(crate::core::bounds::batch_message_bytes(&net.config)));
    assert!(net
        .values("a")
        .iter()
        .all(|v| v.as_deref() == Some(&vec![7u8; big][..])));
}

/// The holder sends one more entry, which reaches replica 0 only, and dies. Another client's
/// access freezes the lock; after the grace it asks the replicas for reports and resolves the
/// lock. With replica 0's report among them the longest chain (with that entry) is chosen
/// and the others fetch it; without it the end is the completed entries, and replica 0 cuts
/// its log back and rebuilds the lock's content. Either way every replica merges the same.
fn silent_holder_resolved(with_the_longer_log: bool) {
    let (mut net, lock) = Net::started(1);
    assert_eq!(net.locked(append("a", "-0")), value("start-0"));
    assert_eq!(net.locked(append("a", "-1")), value("start-0-1"));
    net.drop = Box::new(|_, to, m| {
        matches!(m, Message::Lock(LockMessage::Entry(_))) && to != Principal::Replica(ReplicaId(0))
    });
    let mut actions = Vec::new();
    let now = net.now;
    net.session
        .as_mut()
        .expect("session")
        .submit(append("a", "-x").encode(), now, &mut actions)
        .expect("submit");
    net.client_actions(HOLDER, actions);
    net.deliver_all();
    let ends: Vec<u64> = (0..4)
        .map(|r| net.replica(r).lock_logs().first().map_or(0, |l| l.k))
        .collect();
    assert_eq!(ends, vec![3, 2, 2, 2]);
    // The holder is gone.
    net.session = None;
    net.drop = Box::new(|_, _, _| false);
    assert_eq!(
        net.call(OTHER, KvOp::Get { key: "a".into() }),
        KvReply::Locked
    );
    let ask = |net: &mut Net, from: &[usize]| {
        net.reports.clear();
        let actions = from
            .iter()
            .map(|r| crate::client::ClientAction::Send {
                to: ReplicaId(*r as u32),
                message: Message::Lock(LockMessage::ReportAsk { lock }),
            })
            .collect();
        net.client_actions(OTHER, actions);
        net.deliver_all();
        crate::wire::encode(&crate::wire::LockResolution {
            reports: net.reports.clone(),
        })
        .expect("encode")
    };
    let from: &[usize] = if with_the_longer_log {
        &[0, 1, 2]
    } else {
        &[1, 2, 3]
    };
    let evidence = ask(&mut net, from);
    assert_eq!(net.reports.len(), 3, "one report per frozen log asked");
    let resolve = |evidence: &Vec<u8>| KvOp::Resolve {
        lock,
        evidence: evidence.clone(),
    };
    // Within the grace: the holder's own release has priority.
    assert_eq!(net.call(OTHER, resolve(&evidence)), KvReply::Locked);
    let grace_ticks = state_abstraction::kv::RELEASE_GRACE_NS / net.config.protocol.tick_ns + 1;
    for _ in 0..grace_ticks {
        net.tick();
    }
    // Two reports are not 2f+1; a forged report does not count.
    let short = crate::wire::encode(&crate::wire::LockResolution {
        reports: net.reports[..2].to_vec(),
    })
    .expect("encode");
    assert_eq!(net.call(OTHER, resolve(&short)), KvReply::Refused);
    let mut forged = net.reports.clone();
    forged[2].body.k += 1;
    let forged =
        crate::wire::encode(&crate::wire::LockResolution { reports: forged }).expect("encode");
    assert_eq!(net.call(OTHER, resolve(&forged)), KvReply::Refused);
    assert_eq!(net.call(OTHER, resolve(&evidence)), KvReply::Done);
    // The merge waits a settling second of agreed time (the replicas off the chosen end
    // catch up meanwhile); the waiting client's retries keep the batches coming.
    let settle_ticks =
        state_abstraction::fs::locks::RESOLVED_SETTLE_NS / net.config.protocol.tick_ns + 1;
    for _ in 0..settle_ticks {
        net.tick();
    }
    let _ = net.call(OTHER, KvOp::Get { key: "a".into() });
    net.run_until(3_000, "merge everywhere", |net| {
        net.replicas
            .iter()
            .flatten()
            .all(|r| r.lock_logs().is_empty())
    });
    // Every replica merged the chosen entries itself: none needed a state transfer.
    let transfers: Vec<u64> = (0..4)
        .map(|r| net.replica(r).metrics().state_transfers)
        .collect();
    assert_eq!(transfers, vec![0; 4]);
    let expected = if with_the_longer_log {
        "start-0-1-x"
    } else {
        "start-0-1"
    };
    net.assert_value("a", expected);
    net.converge();
    net.assert_value("a", expected);
    assert_eq!(
        net.call(OTHER, KvOp::Get { key: "a".into() }),
        value(expected)
    );
}

#[test]
fn a_silent_holders_lock_resolves_to_the_longest_reported_chain() {
    silent_holder_resolved(true);
}

#[test]
fn a_log_longer_than_the_resolved_end_is_cut_back() {
    silent_holder_resolved(false);
}
