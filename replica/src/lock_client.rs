//! The holder's side of Zzyzx's log protocol (sans-IO; docs/zzyzx-plan.md §5, M2).
//!
//! In: the lock (granted by an ordered `Lock`), operations to run under it, authenticated
//! lock messages, ticks. Out: [`ClientAction`]s and [`LockOutput`]s.
//!
//! - The session first asks every server how it sees the lock (`Ping`); it is ready once
//!   f+1 servers report it active with one anchor and one log end (at least one of them is
//!   correct, so the anchor is the activation's).
//! - Each operation becomes entry k+1, ⟨op, lock, epoch, k+1, h_k⟩ signed by the holder, sent
//!   to every server. It completes on 2f+1 replies from distinct servers with the same chain
//!   (which the session computes itself: a server whose chain differs is not counted) and the
//!   same result. 2f+1 and not f+1: the entry must be in every 2f+1 logs a later merge could
//!   read. One entry at a time (pipelining is milestone M4).
//! - To release, the session asks every server to seal the log at its last completed entry
//!   and collects 2f+1 matching signed seals: the certificate the ordered `Release` carries.
//!
//! Timeouts retransmit to every server; a server that says the lock is frozen or unknown
//! after the session was ready is reported, so the caller falls back to the ordered path.

use crate::client::ClientAction;
use crate::config::{ClientSecrets, ClusterConfig};
use crate::wire::{
    encode, lock_chain_next, lock_op_digest, Authenticated, ClientId, Digest, LockCertificate,
    LockEntry, LockMessage, LockServerState, LoggedEntry, Message, Principal, ReplicaId, Signed,
    Signer,
};
use state_abstraction::{LockId, LockedResult};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How often an idle served session asks the servers how they see its lock.
const IDLE_PING_NS: u64 = 1_000_000_000;

/// What a session tells its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockOutput {
    /// f+1 servers agree the lock is active: operations may be submitted.
    Ready { k: u64 },
    /// Entry `k` completed with `result` (2f+1 matching replies).
    Completed { k: u64, result: LockedResult },
    /// The encoded certificate for the ordered `Release`.
    Certificate(Vec<u8>),
    /// f+1 servers say the lock is frozen (or gone): the session is over; what completed
    /// stays, what did not complete may not have happened.
    Revoked,
    /// f+1 servers say the lock merged: not even a seal can be had.
    Gone,
    /// The entry in flight was refused by 2f+1 servers (the lock is frozen or gone there):
    /// it took effect nowhere that counts, so it may be sent on the ordered path. Until
    /// this or a completion, an entry in flight at a revocation stays in flight: it may
    /// have been appended by some servers.
    EntryRefused { k: u64 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LockSessionError {
    #[error("the lock is not active yet")]
    NotReady,
    #[error("an entry is still in flight")]
    Busy,
    #[error("the session is sealing or over")]
    Closed,
    #[error("operation of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

#[derive(Debug)]
struct Pending {
    message: Message,
    k: u64,
    chain: Digest,
    replies: BTreeMap<ReplicaId, LockedResult>,
    /// Servers that answered this entry with a status instead of a reply: they did not
    /// append it (the lock is frozen, sealed or gone there).
    refused: std::collections::BTreeSet<ReplicaId>,
    sent_tick: u64,
}

#[derive(Debug)]
struct Sealing {
    message: Message,
    seals: BTreeMap<ReplicaId, Signed<crate::wire::LockSeal>>,
    sent_tick: u64,
    done: bool,
}

type StatusKey = (u32, Digest, u64, Digest);

/// See the module doc.
pub struct LockSession {
    config: Arc<ClusterConfig>,
    holder: ClientId,
    signer: Signer,
    lock: LockId,
    epoch: u32,
    /// The log's end as this session knows it: (k, h_k). `None` until ready.
    end: Option<(u64, Digest)>,
    statuses: BTreeMap<ReplicaId, (LockServerState, StatusKey)>,
    pending: Option<Pending>,
    sealing: Option<Sealing>,
    revoked: bool,
    gone: bool,
    ticks: u64,
    ping_tick: u64,
    /// The holder's clock for entries, made monotone here.
    last_time: u64,
    pub retransmissions: u64,
}

impl LockSession {
    pub fn new(config: Arc<ClusterConfig>, secrets: &ClientSecrets, lock: LockId) -> Self {
        LockSession {
            config,
            holder: secrets.id,
            signer: Signer::from_secret(&secrets.signing_key.0),
            lock,
            epoch: 1,
            end: None,
            statuses: BTreeMap::new(),
            pending: None,
            sealing: None,
            revoked: false,
            gone: false,
            ticks: 0,
            ping_tick: 0,
            last_time: 0,
            retransmissions: 0,
        }
    }

    pub fn lock(&self) -> LockId {
        self.lock
    }
    pub fn is_ready(&self) -> bool {
        self.end.is_some() && !self.revoked
    }
    pub fn is_revoked(&self) -> bool {
        self.revoked
    }
    /// The servers no longer know the lock: nothing, not even a seal, can be had.
    pub fn is_gone(&self) -> bool {
        self.gone
    }
    /// The log's end as this session knows it, (k, h_k), and the lock's epoch (the
    /// simulator's forking holder signs its own entries from them).
    pub fn end(&self) -> Option<(u64, Digest, u32)> {
        self.end.map(|(k, h)| (k, h, self.epoch))
    }

    /// The last completed entry.
    pub fn last_k(&self) -> u64 {
        self.end.map_or(0, |(k, _)| k)
    }
    pub fn busy(&self) -> bool {
        self.pending.is_some()
    }
    /// A seal was asked for (the session takes no more entries).
    pub fn is_sealing(&self) -> bool {
        self.sealing.is_some()
    }

    /// Asks every server how it sees the lock.
    pub fn ping(&mut self, actions: &mut Vec<ClientAction>) {
        self.ping_tick = self.ticks;
        actions.push(ClientAction::Broadcast {
            message: Message::Lock(LockMessage::Ping { lock: self.lock }),
        });
    }

    /// Sends `op` as the next entry.
    pub fn submit(
        &mut self,
        op: Vec<u8>,
        now_ns: u64,
        actions: &mut Vec<ClientAction>,
    ) -> Result<u64, LockSessionError> {
        let Some((k, chain)) = self.end else {
            return Err(LockSessionError::NotReady);
        };
        if self.revoked || self.sealing.is_some() {
            return Err(LockSessionError::Closed);
        }
        if self.pending.is_some() {
            return Err(LockSessionError::Busy);
        }
        if op.len() > self.config.protocol.operation_bytes_max {
            return Err(LockSessionError::TooLarge(op.len()));
        }
        self.last_time = self.last_time.max(now_ns);
        // Entries show the lock's state as they complete: no idle ping until a pause.
        self.ping_tick = self.ticks;
        let entry = LockEntry {
            holder: self.holder,
            lock: self.lock,
            epoch: self.epoch,
            k: k + 1,
            prev: chain,
            time_ns: self.last_time,
            op_digest: lock_op_digest(&op),
        };
        let next = lock_chain_next(&chain, &entry);
        let message = Message::Lock(LockMessage::Entry(Box::new(LoggedEntry {
            entry: self.signer.sign(entry),
            op,
        })));
        actions.push(ClientAction::Broadcast {
            message: message.clone(),
        });
        self.pending = Some(Pending {
            message,
            k: k + 1,
            chain: next,
            replies: BTreeMap::new(),
            refused: Default::default(),
            sent_tick: self.ticks,
        });
        Ok(k + 1)
    }

    /// Asks the servers to seal the log at its last completed entry (release).
    pub fn seal(&mut self, actions: &mut Vec<ClientAction>) -> Result<(), LockSessionError> {
        let Some((k, chain)) = self.end else {
            return Err(LockSessionError::NotReady);
        };
        if self.pending.is_some() {
            return Err(LockSessionError::Busy);
        }
        let message = Message::Lock(LockMessage::Seal {
            lock: self.lock,
            epoch: self.epoch,
            k,
            chain,
        });
        actions.push(ClientAction::Broadcast {
            message: message.clone(),
        });
        self.sealing = Some(Sealing {
            message,
            seals: BTreeMap::new(),
            sent_tick: self.ticks,
            done: false,
        });
        Ok(())
    }

    pub fn on_tick(&mut self, actions: &mut Vec<ClientAction>) {
        self.ticks += 1;
        let period = self.config.protocol.retransmit_ticks.max(1);
        if self.end.is_none() && !self.revoked && self.ticks >= self.ping_tick + period {
            self.ping(actions);
        }
        // Served and idle: ask how the servers see the lock now and then. They tell the
        // holder of a freeze as it happens, but that message can be lost (a link coming back
        // up), and an idle holder sends nothing else that would show it.
        let idle_period = (IDLE_PING_NS / self.config.protocol.tick_ns.max(1)).max(period);
        if self.end.is_some()
            && !self.revoked
            && self.pending.is_none()
            && self.sealing.is_none()
            && self.ticks >= self.ping_tick + idle_period
        {
            self.ping(actions);
        }
        if let Some(p) = &mut self.pending {
            if self.ticks >= p.sent_tick + period {
                p.sent_tick = self.ticks;
                self.retransmissions += 1;
                actions.push(ClientAction::Broadcast {
                    message: p.message.clone(),
                });
            }
        }
        if let Some(s) = &mut self.sealing {
            if !s.done && self.ticks >= s.sent_tick + period {
                s.sent_tick = self.ticks;
                self.retransmissions += 1;
                actions.push(ClientAction::Broadcast {
                    message: s.message.clone(),
                });
            }
        }
    }

    /// A message from a server (others are ignored).
    pub fn on_message(&mut self, message: Authenticated<Message>) -> Option<LockOutput> {
        let (sender, message) = message.into_parts();
        let Principal::Replica(from) = sender else {
            return None;
        };
        let Message::Lock(message) = message else {
            return None;
        };
        match message {
            LockMessage::Status {
                lock,
                epoch,
                state,
                anchor,
                k,
                chain,
                ..
            } if lock == self.lock => self.on_status(from, state, (epoch, anchor, k, chain)),
            LockMessage::Reply(r) if r.lock == self.lock => {
                let p = self.pending.as_mut()?;
                if r.k != p.k || r.chain != p.chain {
                    return None;
                }
                p.replies.insert(from, r.result);
                let quorum = self.config.quorum();
                let done = p
                    .replies
                    .values()
                    .find(|r| p.replies.values().filter(|o| o == r).count() >= quorum)?
                    .clone();
                let p = self.pending.take()?;
                self.end = Some((p.k, p.chain));
                Some(LockOutput::Completed {
                    k: p.k,
                    result: done,
                })
            }
            LockMessage::Sealed(seal) if seal.body.point.lock == self.lock => {
                let (k, chain) = self.end?;
                let s = self.sealing.as_mut()?;
                let point = seal.body.point;
                if s.done || point.k != k || point.chain != chain || seal.body.replica != from {
                    return None;
                }
                s.seals.insert(from, *seal);
                // Seals agree on (k, chain) by the check above; on the state digest only if
                // the servers executed alike. Group by it.
                let quorum = self.config.quorum();
                let seals: Vec<Signed<crate::wire::LockSeal>> = s
                    .seals
                    .values()
                    .filter(|o| o.body.point == point)
                    .cloned()
                    .collect();
                if seals.len() < quorum {
                    return None;
                }
                s.done = true;
                let cert = LockCertificate { seals };
                encode(&cert).ok().map(LockOutput::Certificate)
            }
            _ => None,
        }
    }

    fn on_status(
        &mut self,
        from: ReplicaId,
        state: LockServerState,
        key: StatusKey,
    ) -> Option<LockOutput> {
        self.statuses.insert(from, (state, key));
        let weak = self.config.weak_quorum();
        if let Some(p) = self.pending.as_mut() {
            // Only a server that says the lock is closed there did not append the entry (one
            // that has not seen the activation yet keeps it for later, and says nothing).
            if matches!(state, LockServerState::Frozen | LockServerState::Merged) {
                p.refused.insert(from);
                if p.refused.len() >= self.config.quorum() {
                    let k = p.k;
                    self.pending = None;
                    self.revoked = true;
                    return Some(LockOutput::EntryRefused { k });
                }
            }
        }
        let count =
            |f: fn(&LockServerState) -> bool| self.statuses.values().filter(|(s, _)| f(s)).count();
        if self.end.is_some() {
            // Once served, a lock that f+1 servers say merged (one of them is correct) is
            // over. Not knowing it is not enough: a lagging server has not activated it yet.
            let merged = count(|s| matches!(s, LockServerState::Merged));
            if merged >= weak && !self.gone {
                self.gone = true;
                self.revoked = true;
                return Some(LockOutput::Gone);
            }
            let closed = count(|s| matches!(s, LockServerState::Frozen | LockServerState::Merged));
            if closed >= weak && !self.revoked {
                self.revoked = true;
                return Some(LockOutput::Revoked);
            }
            return None;
        }
        if count(|s| matches!(s, LockServerState::Frozen)) >= weak && !self.revoked {
            self.revoked = true;
            // Frozen before it was ever served: this holder sent no entry, so the log is
            // empty, and f+1 servers saying so with one anchor (one of them correct) let
            // the session seal it there: the release then carries a certificate and the
            // lock merges at once instead of after the release grace.
            let mut empty: BTreeMap<StatusKey, usize> = BTreeMap::new();
            for (s, key) in self.statuses.values() {
                if *s == LockServerState::Frozen && key.2 == 0 && key.1 == key.3 {
                    *empty.entry(*key).or_default() += 1;
                }
            }
            if let Some(((epoch, anchor, _, _), _)) = empty.into_iter().find(|(_, n)| *n >= weak) {
                self.epoch = epoch;
                self.end = Some((0, anchor));
            }
            return Some(LockOutput::Revoked);
        }
        let mut counts: BTreeMap<StatusKey, usize> = BTreeMap::new();
        for (s, key) in self.statuses.values() {
            if *s == LockServerState::Active {
                *counts.entry(*key).or_default() += 1;
            }
        }
        // The highest log end f+1 servers agree on.
        let (epoch, _anchor, k, chain) = counts
            .into_iter()
            .filter(|(_, n)| *n >= weak)
            .map(|(key, _)| key)
            .max_by_key(|key| key.2)?;
        self.epoch = epoch;
        self.end = Some((k, chain));
        Some(LockOutput::Ready { k })
    }
}
