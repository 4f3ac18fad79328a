//! A Zzyzx lock holder in the simulator: one correct client (client 0 of a scenario with
//! `lock_holder`) takes a lock on a bucket of its own, runs appends through the lock's log,
//! seals and releases it, then reads the key through ordering. Checked: every locked result
//! is the model's (the appends so far), and the merged value read through ordering is the
//! model's whole. Everything else of the run (Byzantine replicas, loss, crashes, view
//! changes, the other clients and every checker) goes on around it.

use super::*;
use crate::client::ClientAction;
use crate::lock_client::{LockOutput, LockSession};
use crate::wire::{Authenticated, LockMessage};
use state_abstraction::kv::{bucket_of, KvReply};
use state_abstraction::{LockId, LockedResult};

/// Locked appends per run.
const ENTRIES: u64 = 12;
/// Ticks between attempts of an ordered read answered `Locked` (before the merge).
const RETRY_TICKS: u64 = 20;

#[derive(Debug)]
enum Phase {
    Start,
    Locking(RequestId),
    Working,
    Sealing,
    Releasing(RequestId),
    Checking(RequestId),
    CheckLater(u64),
    /// Died (`holder_dies`) at this tick with an entry in flight; comes back as a client.
    Dead(u64),
    /// Its ordered read of the key, which meets (and freezes) the lock.
    Probing(RequestId),
    /// Waits out the release grace before it may resolve.
    Grace(u64),
    /// Collecting the replicas' reports since this tick.
    Reporting(u64),
    Resolving(RequestId),
    Done,
}

pub(super) struct Holder {
    key: Vec<u8>,
    secrets: crate::config::ClientSecrets,
    phase: Phase,
    lock: Option<LockId>,
    session: Option<LockSession>,
    model: Vec<u8>,
    done: u64,
    /// The value of the entry in flight.
    sent: Option<Vec<u8>>,
    pub(super) entries_completed: u64,
    dies: bool,
    forks: bool,
    /// Ticks between an entry's completion and the next entry.
    pace: u64,
    last_completed: u64,
    /// Its `Resolve` was taken (`holder_dies`).
    pub(super) resolved: bool,
    /// The entries in flight when it died (two if it forked): the resolved end may hold
    /// one of them, or none.
    lost: Vec<Vec<u8>>,
    reports: std::collections::BTreeMap<ReplicaId, crate::wire::Signed<crate::wire::LockReport>>,
    /// `holder_revoked`: its ordered read that freezes the lock, the tick the session said
    /// the lock is frozen, and a certificate waiting for that read to finish (the holder
    /// has one ordered request at a time).
    revokes: bool,
    probe: Probe,
    revoked_at: Option<u64>,
    cert_waiting: Option<Vec<u8>>,
    /// Entries refused by 2f+1 servers at the freeze.
    refused: Vec<Vec<u8>>,
    /// It gave its frozen lock back with a certificate (`holder_revoked`).
    pub(super) given_back: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    NotYet,
    Asked(RequestId),
    Answered,
}

/// Ticks a revoked holder may take to give its lock back with a certificate before it
/// resolves it by reports instead (an entry in flight at the freeze that neither 2f+1
/// servers ran nor 2f+1 refused blocks the seal).
const GIVE_BACK_TICKS: u64 = 1_000;

/// Ticks past the release grace (5 s of agreed time at 1 ms a tick) before a resolve.
const GRACE_TICKS: u64 = state_abstraction::kv::RELEASE_GRACE_NS / 1_000_000 + 100;

impl Holder {
    /// A holder whose key's bucket no other key of the run uses.
    pub(super) fn new(secrets: crate::config::ClientSecrets, scenario: &Scenario) -> Holder {
        let mut used: std::collections::BTreeSet<u64> = (0..scenario.keys)
            .map(|k| bucket_of(format!("k{k}").as_bytes()))
            .collect();
        for i in 0..(scenario.faulty_clients.len() as u64 + scenario.clients + 1) {
            used.insert(bucket_of(format!("faulty{}", 100 + i).as_bytes()));
        }
        let key = (0..)
            .map(|j| format!("lock{j}").into_bytes())
            .find(|k| !used.contains(&bucket_of(k)))
            .unwrap_or_default();
        Holder {
            key,
            secrets,
            phase: Phase::Start,
            lock: None,
            session: None,
            model: Vec::new(),
            done: 0,
            sent: None,
            entries_completed: 0,
            dies: scenario.holder_dies,
            forks: scenario.holder_forks,
            pace: scenario.holder_pace_ticks,
            last_completed: 0,
            resolved: false,
            lost: Vec::new(),
            reports: Default::default(),
            revokes: scenario.holder_revoked,
            probe: Probe::NotYet,
            revoked_at: None,
            cert_waiting: None,
            refused: Vec::new(),
            given_back: false,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "lock holder: {:?}, {} of {ENTRIES} entries, lock {:?}",
            self.phase, self.done, self.lock
        )
    }
}

impl Sim {
    fn holder_invoke(&mut self, index: usize, op: KvOp) -> Result<RequestId, Failure> {
        let mut actions = Vec::new();
        let id = self.clients[index]
            .client
            .invoke(op.encode(), false, &mut actions)
            .map_err(|e| self.fail(format!("lock holder: invoke: {e}")))?;
        self.client_actions(index, actions)?;
        Ok(id)
    }

    /// One tick of the holder (client `index`).
    pub(super) fn holder_tick(&mut self, index: usize) -> Result<(), Failure> {
        let mut actions = Vec::new();
        self.clients[index].client.on_tick(&mut actions);
        let tick = self.tick;
        let Some(h) = self.clients[index].holder.as_mut() else {
            return Ok(());
        };
        if let Some(s) = h.session.as_mut() {
            s.on_tick(&mut actions);
        }
        let mut next_op = None;
        let mut probe = false;
        let quorum = self.config.quorum();
        let n = self.config.n();
        let period = self.config.protocol.retransmit_ticks.max(1);
        if let (Some(at), Phase::Working | Phase::Sealing) = (h.revoked_at, &h.phase) {
            if tick >= at + GIVE_BACK_TICKS && h.cert_waiting.is_none() {
                // No certificate to be had: resolve by reports, like any other client, once
                // the grace is over. The entry in flight may or may not be in the end.
                h.lost.extend(h.sent.take());
                h.lost.append(&mut h.refused);
                h.session = None;
                h.phase = Phase::Grace(at + GRACE_TICKS);
            }
        }
        match h.phase {
            Phase::Start if tick >= 10 => next_op = Some(KvOp::Lock { key: h.key.clone() }),
            Phase::Working if h.revoked_at.is_some() => {
                // Frozen: once the entry in flight completed or was refused, seal what
                // completed.
                let s = h.session.as_mut().expect("session while working");
                if !s.busy() && h.sent.is_none() && s.seal(&mut actions).is_ok() {
                    h.phase = Phase::Sealing;
                }
            }
            Phase::Working => {
                let s = h.session.as_mut().expect("session while working");
                if h.revokes && h.probe == Probe::NotYet && h.done >= ENTRIES / 2 {
                    // Its ordered read of the key meets the active lock and freezes it,
                    // with (usually) the next entry in flight beside it.
                    probe = true;
                }
                if s.is_ready() && !s.busy() && h.sent.is_none() {
                    if h.dies && h.done == ENTRIES / 2 && h.forks {
                        // Two different entries at the next k, each to half the replicas,
                        // signed by the holder: a fork only a resolution can settle.
                        if let Some((k, chain, epoch)) = s.end() {
                            let signer = crate::wire::Signer::from_secret(&h.secrets.signing_key.0);
                            let n = self.config.n();
                            for (half, tag) in [(0..n / 2, "A"), (n / 2..n, "B")] {
                                let value = format!("h{}{tag};", h.done).into_bytes();
                                let op = KvOp::Append {
                                    key: h.key.clone(),
                                    value: value.clone(),
                                }
                                .encode();
                                let entry = crate::wire::LockEntry {
                                    holder: h.secrets.id,
                                    lock: s.lock(),
                                    epoch,
                                    k: k + 1,
                                    prev: chain,
                                    time_ns: tick * 1_000_000,
                                    op_digest: crate::wire::lock_op_digest(&op),
                                };
                                let message = Message::Lock(LockMessage::Entry(Box::new(
                                    crate::wire::LoggedEntry {
                                        entry: signer.sign(entry),
                                        op,
                                    },
                                )));
                                for r in half {
                                    actions.push(ClientAction::Send {
                                        to: ReplicaId(r as u32),
                                        message: message.clone(),
                                    });
                                }
                                h.lost.push(value);
                            }
                            h.session = None;
                            h.phase = Phase::Dead(tick);
                        }
                    } else if h.done < ENTRIES && tick < h.last_completed + h.pace {
                        // Pacing: the next entry waits.
                    } else if h.done < ENTRIES {
                        let value = format!("h{};", h.done).into_bytes();
                        let op = KvOp::Append {
                            key: h.key.clone(),
                            value: value.clone(),
                        };
                        if s.submit(op.encode(), tick * 1_000_000, &mut actions)
                            .is_ok()
                        {
                            if h.dies && h.done == ENTRIES / 2 {
                                // The holder dies with this entry in flight.
                                h.lost.push(value);
                                h.session = None;
                                h.phase = Phase::Dead(tick);
                            } else {
                                h.sent = Some(value);
                            }
                        }
                    } else if s.seal(&mut actions).is_ok() {
                        h.phase = Phase::Sealing;
                    }
                }
            }
            Phase::CheckLater(at) if tick >= at => next_op = Some(KvOp::Get { key: h.key.clone() }),
            Phase::Dead(at) if tick >= at + 50 => next_op = Some(KvOp::Get { key: h.key.clone() }),
            Phase::Grace(until) if tick >= until && !matches!(h.probe, Probe::Asked(_)) => {
                h.reports.clear();
                h.phase = Phase::Reporting(tick);
                actions.push(ClientAction::Broadcast {
                    message: Message::Lock(LockMessage::ReportAsk {
                        lock: h.lock.unwrap_or(LockId(0)),
                    }),
                });
            }
            Phase::Reporting(since) => {
                // Every replica, or 2f+1 and a few ticks for the rest (a longer log wins).
                if h.reports.len() >= n || (h.reports.len() >= quorum && tick >= since + 5) {
                    let evidence = crate::wire::encode(&crate::wire::LockResolution {
                        reports: h.reports.values().cloned().collect(),
                    })
                    .unwrap_or_default();
                    next_op = Some(KvOp::Resolve {
                        lock: h.lock.unwrap_or(LockId(0)),
                        evidence,
                    });
                } else if tick >= since + period {
                    h.phase = Phase::Grace(tick);
                }
            }
            _ => {}
        }
        self.client_actions(index, actions)?;
        if probe {
            let id = self.holder_invoke(
                index,
                KvOp::Get {
                    key: self.clients[index]
                        .holder
                        .as_ref()
                        .expect("holder")
                        .key
                        .clone(),
                },
            )?;
            self.clients[index].holder.as_mut().expect("holder").probe = Probe::Asked(id);
        }
        if let Some(op) = next_op {
            let h = self.clients[index].holder.as_ref().expect("holder");
            let probing = matches!(h.phase, Phase::Dead(_));
            let get = matches!(op, KvOp::Get { .. });
            let resolve = matches!(op, KvOp::Resolve { .. });
            let id = self.holder_invoke(index, op)?;
            let h = self.clients[index].holder.as_mut().expect("holder");
            h.phase = if probing {
                Phase::Probing(id)
            } else if resolve {
                Phase::Resolving(id)
            } else if get {
                Phase::Checking(id)
            } else {
                Phase::Locking(id)
            };
        }
        Ok(())
    }

    /// An ordered request of the holder completed.
    pub(super) fn holder_complete(&mut self, index: usize, c: Completion) -> Result<(), Failure> {
        let reply = KvReply::decode(&c.result);
        let tick = self.tick;
        let config = self.config.clone();
        let h = self.clients[index].holder.as_mut().expect("holder");
        let mut release = None;
        if h.probe == Probe::Asked(c.id) {
            // The read under the active lock: refused, and the lock frozen by it.
            if reply != Some(KvReply::Locked) {
                let e =
                    format!("lock holder: its ordered read under the active lock got {reply:?}");
                return Err(self.fail(e));
            }
            h.probe = Probe::Answered;
            if let Some(cert) = h.cert_waiting.take() {
                let lock = h.lock.unwrap_or(LockId(0));
                let id = self.holder_invoke(
                    index,
                    KvOp::Release {
                        lock,
                        cert: Some(cert),
                    },
                )?;
                let h = self.clients[index].holder.as_mut().expect("holder");
                h.phase = Phase::Releasing(id);
            }
            return Ok(());
        }
        let result: Result<(), String> = match (&h.phase, reply) {
            (Phase::Locking(id), Some(KvReply::Lock(lock))) if *id == c.id => {
                h.lock = Some(lock);
                let mut s = LockSession::new(config, &h.secrets, lock);
                let mut actions = Vec::new();
                s.ping(&mut actions);
                h.session = Some(s);
                h.phase = Phase::Working;
                release = Some(actions);
                Ok(())
            }
            (Phase::Releasing(id), Some(KvReply::Done)) if *id == c.id => {
                h.given_back = h.revoked_at.is_some();
                h.session = None;
                h.phase = Phase::CheckLater(tick + 1);
                Ok(())
            }
            (Phase::Checking(id), Some(KvReply::Locked)) if *id == c.id => {
                // Not merged yet (the merge waits for the next checkpoint).
                h.phase = Phase::CheckLater(tick + RETRY_TICKS);
                Ok(())
            }
            (Phase::Probing(id), Some(KvReply::Locked)) if *id == c.id => {
                h.phase = Phase::Grace(tick + GRACE_TICKS);
                Ok(())
            }
            (Phase::Resolving(id), Some(KvReply::Done)) if *id == c.id => {
                h.resolved = true;
                h.phase = Phase::CheckLater(tick + 1);
                Ok(())
            }
            (Phase::Resolving(id), Some(KvReply::Locked | KvReply::Refused)) if *id == c.id => {
                // Still in the grace by agreed time, or too few valid reports: again.
                h.phase = Phase::Grace(tick + RETRY_TICKS);
                Ok(())
            }
            (Phase::Checking(id) | Phase::Probing(id), Some(KvReply::Value(v))) if *id == c.id => {
                // What completed is there; the entry in flight at the death may be too.
                let with_lost = |l: &Vec<u8>| {
                    let mut m = h.model.clone();
                    m.extend_from_slice(l);
                    m
                };
                if v.as_deref() == Some(&h.model[..])
                    || h.lost.iter().any(|l| v.as_ref() == Some(&with_lost(l)))
                {
                    h.phase = Phase::Done;
                    Ok(())
                } else {
                    Err(format!(
                        "lock holder: after the merge the key reads {:?}, the locked appends give {:?}",
                        v.map(|v| String::from_utf8_lossy(&v).into_owned()),
                        String::from_utf8_lossy(&h.model)
                    ))
                }
            }
            (phase, reply) => Err(format!(
                "lock holder: unexpected answer {reply:?} to {:?} in {phase:?}",
                c.id
            )),
        };
        result.map_err(|e| self.fail(e))?;
        if let Some(actions) = release {
            self.client_actions(index, actions)?;
        }
        Ok(())
    }

    /// A lock message for the holder.
    pub(super) fn holder_message(
        &mut self,
        index: usize,
        message: Authenticated<Message>,
    ) -> Result<(), Failure> {
        let tick = self.tick;
        let h = self.clients[index].holder.as_mut().expect("holder");
        if let Message::Lock(LockMessage::Report(r)) = message.message() {
            // Signatures were checked by the authenticator; the service checks the rest.
            if matches!(h.phase, Phase::Reporting(_))
                && Principal::Replica(r.body.replica) == message.sender()
            {
                h.reports.insert(r.body.replica, (**r).clone());
            }
            return Ok(());
        }
        let Some(out) = h.session.as_mut().and_then(|s| s.on_message(message)) else {
            return Ok(());
        };
        let mut invoke = None;
        let result: Result<(), String> = match out {
            LockOutput::Ready { .. } => Ok(()),
            LockOutput::Completed { k, result } => {
                let value = h.sent.take().unwrap_or_default();
                let mut expected = h.model.clone();
                expected.extend_from_slice(&value);
                let want = LockedResult::Done(KvReply::Value(Some(expected.clone())).encode());
                if result == want {
                    h.model = expected;
                    h.done += 1;
                    h.last_completed = tick;
                    h.entries_completed += 1;
                    Ok(())
                } else {
                    Err(format!(
                        "lock holder: entry {k} completed with {result:?}, the model gives {:?}",
                        String::from_utf8_lossy(&expected)
                    ))
                }
            }
            LockOutput::Certificate(cert) if matches!(h.probe, Probe::Asked(_)) => {
                h.cert_waiting = Some(cert);
                Ok(())
            }
            LockOutput::Certificate(cert) => {
                let lock = h.lock.unwrap_or(LockId(0));
                invoke = Some(KvOp::Release {
                    lock,
                    cert: Some(cert),
                });
                Ok(())
            }
            LockOutput::Revoked if h.probe != Probe::NotYet && h.revoked_at.is_none() => {
                h.revoked_at = Some(tick);
                Ok(())
            }
            LockOutput::EntryRefused { .. } if h.probe != Probe::NotYet => {
                // Refused by 2f+1 (the session's sign of the freeze when an entry was in
                // flight): in no certified end. A resolution by reports may still take it
                // (up to f servers appended it before they froze), as the fallback allows.
                h.revoked_at.get_or_insert(tick);
                h.refused.extend(h.sent.take());
                Ok(())
            }
            other => Err(format!(
                "lock holder: the lock was revoked ({other:?}) though no one else touched it"
            )),
        };
        result.map_err(|e| self.fail(e))?;
        if let Some(op) = invoke {
            let id = self.holder_invoke(index, op)?;
            self.clients[index].holder.as_mut().expect("holder").phase = Phase::Releasing(id);
        }
        Ok(())
    }
}
