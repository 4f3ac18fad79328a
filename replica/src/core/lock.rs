//! Zzyzx's log server (docs/zzyzx-plan.md §5, milestone M2): a lock's holder sends each
//! operation as a signed, hash-chained entry to every replica; each appends it after the
//! checks of §5.3, executes it on the lock's objects (through the execution stage) and
//! replies; the holder completes on 2f+1 matching replies. To release, the holder has the
//! servers seal the log at its last entry, and sends the 2f+1 signed seals in an ordered
//! `Release`; the service merges the lock back at the next checkpoint.
//!
//! A lock's life comes from the service, through ordered execution only: `Activated` (inside
//! a checkpoint, on committed state), `Frozen` (an ordered release, conflict or expiry),
//! `Merged`. So every correct replica starts and stops a log at the same point of the order;
//! entries never interleave with ordered batches in a way that matters, because the ordered
//! state holds only placeholders for the lock's objects.
//!
//! Safety rules (numbered after plan §5.4):
//! - L1: never two different entries at one (lock, k): an entry is appended only at
//!   k = last+1 with prev = h_last, and a different entry at a logged k is ignored.
//! - L2: an entry is persisted before its reply leaves (Persist precedes SendClient).
//! - L3: a freeze is persisted and sticky; after it nothing is appended.
//! - L4: at most one seal per lock, persisted before it is sent, and nothing is appended after
//!   it.
//! - L5: entries are accepted only after the activation event.
//!
//! A lock frozen without a certified end (its holder died or went silent) gets one from any
//! client: it asks every server for a signed `Report` of where its frozen log ends, and sends
//! 2f+1 of them in an ordered `Resolve`; the service's checker picks the longest chain the
//! holder signed, and a log longer than the end it fixes (or on another chain) is cut back
//! (`Truncated`) and its content rebuilt from the activation. What is left of M3: lock
//! checkpoints bounding the reports, and the draining of §6.1.

use super::{Action, Core, InFlightKind, StageAction};
use crate::wire::{
    lock_anchor, lock_chain_next, lock_op_digest, ClientId, Digest, LockMessage, LockReply,
    LockReport, LockSeal, LockServerState, LoggedEntry, Message, Principal, ReplicaId, Signed,
};
use serde::{Deserialize, Serialize};
use state_abstraction::locking::{BaseCursor, BasePage};
use state_abstraction::{LockEvent, LockId, LockPoint, LockedResult};
use std::collections::BTreeMap;

/// Entries buffered past a hole, per lock.
pub const LOCK_BUFFERED_MAX: usize = 64;
/// Entries buffered for locks not activated here yet (all locks together).
pub const LOCK_EARLY_MAX: usize = 64;
/// Most entries in one lock's log: the log is kept whole until the merge (M2), so it is
/// bounded; a holder releases and locks again before reaching it.
pub const LOCK_LOG_ENTRIES_MAX: u64 = 1 << 16;
/// Most operation bytes in one lock's log.
pub const LOCK_LOG_BYTES_MAX: u64 = 1 << 30;
/// Replies kept per lock for retransmitted entries.
const RESULTS_KEPT: usize = 64;

/// What a lock's log is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockLogState {
    pub lock: LockId,
    pub epoch: u32,
    pub holder: ClientId,
    pub anchor: Digest,
    pub k: u64,
    pub chain: Digest,
    pub state: LockServerState,
}

#[derive(Debug)]
pub(super) struct LockLog {
    epoch: u32,
    holder: ClientId,
    anchor: Digest,
    /// entries[k-1] is entry k.
    entries: Vec<LoggedEntry>,
    /// chains[k] = h_k; chains[0] = anchor.
    chains: Vec<Digest>,
    bytes: u64,
    last_time: u64,
    /// Results of recent entries (k → result), to answer a retransmission.
    results: BTreeMap<u64, LockedResult>,
    buffered: BTreeMap<u64, LoggedEntry>,
    /// The one seal this replica signed (L4), and a seal asked for above our log's end.
    seal: Option<Signed<LockSeal>>,
    seal_wanted: Option<(u64, Digest)>,
    seal_digest_asked: bool,
    /// Frozen by ordering (sticky, L3), with the certified end if the release named one.
    frozen: Option<Option<LockPoint>>,
    last_fetch_tick: u64,
    /// Fetching the whole log from peers (after the lock's content came by transfer): the
    /// log's end at the previous fetch; stops when a fetch brought nothing.
    catch_up: Option<u64>,
    /// This replica's signed report of a log frozen without an end (it no longer changes,
    /// so it is signed once however often clients ask).
    report: Option<Signed<LockReport>>,
    /// Times this log was cut back to follow its fixed end's chain (bounded: faulty peers
    /// relaying a forking holder's other chain must not make it go back and forth forever).
    cuts: u32,
}

/// Most cut-backs of one log after its end was fixed; past them the replica merges what it
/// has and state transfer repairs it.
const LOCK_CUTS_MAX: u32 = 4;

impl LockLog {
    fn new(epoch: u32, holder: ClientId, anchor: Digest) -> Self {
        LockLog {
            epoch,
            holder,
            anchor,
            entries: Vec::new(),
            chains: vec![anchor],
            bytes: 0,
            last_time: 0,
            results: BTreeMap::new(),
            buffered: BTreeMap::new(),
            seal: None,
            seal_wanted: None,
            seal_digest_asked: false,
            frozen: None,
            last_fetch_tick: 0,
            catch_up: None,
            report: None,
            cuts: 0,
        }
    }
    /// Drops the entries after `k` (a certified or resolved end below this log's).
    fn truncate(&mut self, k: u64) {
        self.entries.truncate(k as usize);
        self.chains.truncate(k as usize + 1);
        self.bytes = self.entries.iter().map(|e| e.op.len() as u64).sum();
        self.last_time = self
            .entries
            .iter()
            .map(|e| e.entry.body.time_ns)
            .max()
            .unwrap_or(0);
        self.buffered.clear();
        self.results.clear();
        self.report = None;
    }
    fn last(&self) -> u64 {
        self.entries.len() as u64
    }
    fn chain(&self) -> Digest {
        self.chains[self.entries.len()]
    }
    fn closed(&self) -> bool {
        self.frozen.is_some() || self.seal.is_some()
    }
    fn server_state(&self) -> LockServerState {
        if self.frozen.is_some() {
            LockServerState::Frozen
        } else if self.seal.is_some() {
            LockServerState::Sealed
        } else {
            LockServerState::Active
        }
    }
    /// The entry the log must reach (a hole below buffered entries, a seal asked above our
    /// end, a certified end), if beyond what it holds.
    fn wanted(&self) -> Option<u64> {
        let mut want = self.buffered.keys().next().map(|k| k - 1);
        if let Some((k, _)) = self.seal_wanted {
            want = want.max(Some(k));
        }
        if let Some(Some(p)) = self.frozen {
            want = want.max(Some(p.k));
        }
        if self.catch_up.is_some() {
            want = want.max(Some(
                self.last() + crate::wire::lock::LOCK_ENTRIES_PER_MESSAGE as u64,
            ));
        }
        want.filter(|k| *k > self.last())
    }
}

/// WAL records of the log servers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockRecord {
    Activated {
        lock: LockId,
        epoch: u32,
        holder: ClientId,
        anchor: Digest,
    },
    Entry {
        lock: LockId,
        entry: Box<LoggedEntry>,
    },
    Sealed {
        lock: LockId,
        seal: Box<Signed<LockSeal>>,
    },
    Frozen {
        lock: LockId,
        end: Option<LockPoint>,
    },
    Merged {
        lock: LockId,
    },
    /// The log keeps its first `k` entries: the end the ordered state fixed is below the
    /// entries this replica appended (an entry in flight at the freeze reached it and not
    /// 2f+1 others), or on another chain (a holder that forked its log; `k` = 0).
    Truncated {
        lock: LockId,
        k: u64,
    },
}

/// A lock's content at activation being fetched from peers (lock state transfer): one peer
/// at a time, page by page from where the assembly stands; another peer when one stays
/// silent for a retransmission period, sends a page that does not continue the assembly, or
/// the whole turns out not to hash to the lock's base digest.
#[derive(Debug)]
struct FetchingBase {
    info: state_abstraction::locking::LockInfo,
    assembly: state_abstraction::locking::BaseAssembly,
    /// The peer asked now.
    peer: ReplicaId,
    /// A page arrived since the last retransmission timeout.
    progressed: bool,
    /// The assembled content is with the service.
    installing: bool,
}

/// The log servers' state in the core.
#[derive(Debug, Default)]
pub(super) struct LockLogs {
    logs: BTreeMap<LockId, LockLog>,
    /// Entries for locks not activated here yet, oldest first.
    early: Vec<LoggedEntry>,
    /// Locks restored from the WAL whose entries must be executed again before serving.
    replay_pending: bool,
    /// Locks merged (or dropped) here: their late messages are ignored. Bounded by the lock
    /// ids ever used, which grow by one per `Lock`; kept as the highest merged id plus a set.
    merged: std::collections::BTreeSet<LockId>,
    /// Locks the ordered state holds whose content this replica lacks (it got the state by
    /// transfer), fetched from peers page by page.
    fetching_base: BTreeMap<LockId, FetchingBase>,
    /// A lock merged here before its log reached the end ordering fixed: the checkpoint
    /// taking the merge is not voted (repaired by state transfer).
    pub(super) merged_short: bool,
}

impl LockLogs {
    /// The logs as the WAL leaves them (records after the newest snapshot; a snapshot is
    /// followed by the records of every live log).
    pub(super) fn from_wal(wal: &[super::WalRecord]) -> Self {
        let mut logs = LockLogs::default();
        for record in wal {
            match record {
                super::WalRecord::Snapshot(_) => logs.logs.clear(),
                super::WalRecord::Lock(r) => logs.apply(r),
                _ => {}
            }
        }
        logs.replay_pending = !logs.logs.is_empty();
        logs
    }

    fn apply(&mut self, record: &LockRecord) {
        match record {
            LockRecord::Activated {
                lock,
                epoch,
                holder,
                anchor,
            } => {
                self.logs
                    .entry(*lock)
                    .or_insert_with(|| LockLog::new(*epoch, *holder, *anchor));
            }
            LockRecord::Entry { lock, entry } => {
                if let Some(log) = self.logs.get_mut(lock) {
                    if entry.entry.body.k == log.last() + 1 {
                        let next = lock_chain_next(&log.chain(), &entry.entry.body);
                        log.last_time = log.last_time.max(entry.entry.body.time_ns);
                        log.bytes += entry.op.len() as u64;
                        log.entries.push((**entry).clone());
                        log.chains.push(next);
                    }
                }
            }
            LockRecord::Sealed { lock, seal } => {
                if let Some(log) = self.logs.get_mut(lock) {
                    log.seal = Some((**seal).clone());
                }
            }
            LockRecord::Frozen { lock, end } => {
                if let Some(log) = self.logs.get_mut(lock) {
                    if log.frozen.as_ref().is_none_or(|e| e.is_none()) {
                        log.frozen = Some(*end);
                    }
                }
            }
            LockRecord::Merged { lock } => {
                self.logs.remove(lock);
                self.merged.insert(*lock);
            }
            LockRecord::Truncated { lock, k } => {
                if let Some(log) = self.logs.get_mut(lock) {
                    log.truncate(*k);
                }
            }
        }
    }

    /// The records that re-create every live log after a snapshot.
    pub(super) fn snapshot_records(&self) -> Vec<LockRecord> {
        let mut out = Vec::new();
        for (lock, log) in &self.logs {
            out.push(LockRecord::Activated {
                lock: *lock,
                epoch: log.epoch,
                holder: log.holder,
                anchor: log.anchor,
            });
            for e in &log.entries {
                out.push(LockRecord::Entry {
                    lock: *lock,
                    entry: Box::new(e.clone()),
                });
            }
            if let Some(seal) = &log.seal {
                out.push(LockRecord::Sealed {
                    lock: *lock,
                    seal: Box::new(seal.clone()),
                });
            }
            if let Some(end) = log.frozen {
                out.push(LockRecord::Frozen { lock: *lock, end });
            }
        }
        out
    }

    pub(super) fn states(&self) -> Vec<LockLogState> {
        self.logs
            .iter()
            .map(|(lock, log)| LockLogState {
                lock: *lock,
                epoch: log.epoch,
                holder: log.holder,
                anchor: log.anchor,
                k: log.last(),
                chain: log.chain(),
                state: log.server_state(),
            })
            .collect()
    }
}

impl Core {
    /// The log servers' view of each live lock (status, tests).
    pub fn lock_logs(&self) -> Vec<LockLogState> {
        self.locks.states()
    }

    fn persist_lock(&mut self, record: LockRecord, actions: &mut Vec<Action>) {
        actions.push(Action::Persist(super::WalRecord::Lock(record)));
    }

    /// After a restart: the service's lock content is wherever the crash left it; bring each
    /// live lock back to its activation and run its logged entries again (no replies: the
    /// holder retransmits what it still waits for, and the cached results answer it).
    pub(super) fn replay_locks(&mut self, actions: &mut Vec<Action>) {
        // Locks the reopened state holds but this replica never logged (it got them by a
        // state transfer before the restart, and their content had not come yet).
        actions.push(Action::Stage(StageAction::LockInfos));
        self.push_in_flight(InFlightKind::LockInfos);
        if !std::mem::take(&mut self.locks.replay_pending) {
            return;
        }
        let locks: Vec<LockId> = self.locks.logs.keys().copied().collect();
        for lock in locks {
            self.restart_lock(lock, actions);
        }
    }

    fn restart_lock(&mut self, lock: LockId, actions: &mut Vec<Action>) {
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return;
        };
        log.results.clear();
        actions.push(Action::Stage(StageAction::LockRestart { lock }));
        let mut time = 0;
        let runs: Vec<_> = log
            .entries
            .iter()
            .map(|e| {
                time = time.max(e.entry.body.time_ns);
                (e.entry.body.k, e.op.clone(), time)
            })
            .collect();
        let holder = log.holder;
        for (k, op, time_ns) in runs {
            self.ask_execute_locked(lock, k, op, holder, time_ns, false, actions);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ask_execute_locked(
        &mut self,
        lock: LockId,
        k: u64,
        op: Vec<u8>,
        client: ClientId,
        time_ns: u64,
        reply: bool,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::Stage(StageAction::ExecuteLocked {
            lock,
            k,
            op,
            client,
            time_ns,
        }));
        self.push_in_flight(InFlightKind::Locked { lock, k, reply });
    }

    /// Lock events from ordered execution and checkpoints (in the order they happened).
    pub(super) fn on_lock_events(&mut self, events: Vec<LockEvent>, actions: &mut Vec<Action>) {
        for event in events {
            match event {
                LockEvent::Activated {
                    lock,
                    epoch,
                    holder,
                    base,
                } => self.on_lock_activated(lock, epoch, holder, base, actions),
                LockEvent::Frozen { lock, end, .. } => self.on_lock_frozen(lock, end, actions),
                LockEvent::Merged { lock, .. } => {
                    if let Some(log) = self.locks.logs.get(&lock) {
                        if let Some(Some(p)) = log.frozen {
                            if log.last() != p.k || log.chain() != p.chain {
                                // Merged short of the fixed end, or on another chain: this
                                // checkpoint is not the others' (see `on_checkpoint_taken`).
                                tracing::warn!(
                                    replica = self.id.0,
                                    lock = lock.0,
                                    at = log.last(),
                                    end = p.k,
                                    "lock merged before its log reached the fixed end"
                                );
                                self.locks.merged_short = true;
                            }
                        }
                    }
                    if self.locks.logs.remove(&lock).is_some() {
                        tracing::info!(replica = self.id.0, lock = lock.0, "lock merged");
                    }
                    // A fetch of its content still under way is moot: nobody serves it now.
                    if self.locks.fetching_base.remove(&lock).is_some() {
                        tracing::warn!(
                            replica = self.id.0,
                            lock = lock.0,
                            "lock merged before its content arrived here"
                        );
                    }
                    self.locks.merged.insert(lock);
                    self.persist_lock(LockRecord::Merged { lock }, actions);
                }
            }
        }
    }

    fn on_lock_activated(
        &mut self,
        lock: LockId,
        epoch: u32,
        holder: ClientId,
        base: Digest,
        actions: &mut Vec<Action>,
    ) {
        let anchor = lock_anchor(lock, epoch, &base);
        if let Some(log) = self.locks.logs.get(&lock) {
            if log.anchor == anchor {
                // Activated again: the service went back below the activation (a restart
                // that rolled it back further than its newest checkpoint) and re-ran it; its
                // lock content is at the activation again, so run the log once more.
                self.restart_lock(lock, actions);
                return;
            }
        }
        tracing::info!(
            replica = self.id.0,
            lock = lock.0,
            holder = holder.0,
            "lock active"
        );
        self.locks
            .logs
            .insert(lock, LockLog::new(epoch, holder, anchor));
        self.persist_lock(
            LockRecord::Activated {
                lock,
                epoch,
                holder,
                anchor,
            },
            actions,
        );
        // The holder waits for f+1 of these to start: told now, it need not wait for its
        // next ping (half a second: taking a lock took that long).
        self.send_lock_status(holder, lock, actions);
        let early: Vec<LoggedEntry> = {
            let (mine, rest) = std::mem::take(&mut self.locks.early)
                .into_iter()
                .partition(|e| e.entry.body.lock == lock);
            self.locks.early = rest;
            mine
        };
        for e in early {
            self.on_lock_entry(e, true, actions);
        }
    }

    fn on_lock_frozen(&mut self, lock: LockId, end: Option<LockPoint>, actions: &mut Vec<Action>) {
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return;
        };
        // Sticky (L3): a later event only adds the certified end.
        match log.frozen {
            Some(Some(_)) => return,
            Some(None) if end.is_none() => return,
            _ => {}
        }
        log.frozen = Some(end);
        tracing::info!(replica = self.id.0, lock = lock.0, end = ?end.map(|p| p.k), "lock frozen");
        // An end below what this log holds, or on another chain: the merge must see exactly
        // the entries up to it, so the log goes back to that point and the lock's content is
        // rebuilt from its activation.
        let cut = end.and_then(|p| {
            let on_chain = log.chains.get(p.k as usize) == Some(&p.chain);
            if on_chain && log.last() == p.k {
                None
            } else if on_chain {
                Some(p.k)
            } else if p.k <= log.last() {
                Some(0)
            } else {
                // Behind the end: the fetch below brings the rest (a fork below our end shows
                // when the fetched entries do not chain; the merge then differs and state
                // transfer repairs this replica).
                None
            }
        });
        let last = log.last();
        let holder = log.holder;
        self.persist_lock(LockRecord::Frozen { lock, end }, actions);
        if end.is_none() {
            // Revoked (another client's access, or expiry): told at once, the holder drains,
            // seals what completed and releases with the certificate, so the merge comes at
            // the next checkpoint instead of after the release grace. A holder that does not
            // answer is resolved by reports after the grace, as before.
            self.send_lock_status(holder, lock, actions);
        }
        if let Some(k) = cut {
            tracing::warn!(
                replica = self.id.0,
                lock = lock.0,
                from = last,
                to = k,
                "lock log cut back to its fixed end; lock content rebuilt"
            );
            if let Some(log) = self.locks.logs.get_mut(&lock) {
                log.truncate(k);
            }
            self.persist_lock(LockRecord::Truncated { lock, k }, actions);
            self.restart_lock(lock, actions);
        }
        self.fetch_lock_entries(lock, actions);
    }

    /// A client asks where this replica's copy of a frozen log ends, to resolve the lock.
    fn on_report_ask(&mut self, client: ClientId, lock: LockId, actions: &mut Vec<Action>) {
        let me = self.id;
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return self.send_lock_status(client, lock, actions);
        };
        if log.frozen != Some(None) {
            // Active here (the client saw the freeze before us), or its end is fixed already.
            return self.send_lock_status(client, lock, actions);
        }
        if log.report.is_none() {
            let report = LockReport {
                replica: me,
                lock,
                epoch: log.epoch,
                k: log.last(),
                chain: log.chain(),
                top: log.entries.last().map(|e| e.entry.clone()),
            };
            log.report = Some(self.signer.sign(report));
        }
        if let Some(report) = &log.report {
            actions.push(Action::SendClient {
                to: client,
                message: Message::Lock(LockMessage::Report(Box::new(report.clone()))),
            });
        }
    }

    /// A lock protocol message (client or replica).
    pub(super) fn on_lock_message(
        &mut self,
        sender: Principal,
        message: LockMessage,
        actions: &mut Vec<Action>,
    ) {
        match (sender, message) {
            (Principal::Client(_), LockMessage::Entry(e)) => self.on_lock_entry(*e, true, actions),
            (Principal::Client(c), LockMessage::Ping { lock }) => {
                self.send_lock_status(c, lock, actions)
            }
            (Principal::Client(c), LockMessage::ReportAsk { lock }) => {
                self.on_report_ask(c, lock, actions)
            }
            (
                Principal::Client(c),
                LockMessage::Seal {
                    lock,
                    epoch,
                    k,
                    chain,
                },
            ) => self.on_lock_seal(c, lock, epoch, k, chain, actions),
            (
                Principal::Replica(r),
                LockMessage::Fetch {
                    lock,
                    epoch,
                    from,
                    to,
                    want,
                },
            ) => self.on_lock_fetch(r, lock, epoch, (from, to), want, actions),
            (Principal::Replica(r), LockMessage::FetchBase { lock, from }) => {
                self.on_lock_fetch_base(r, lock, from, actions)
            }
            (Principal::Replica(r), LockMessage::Base { lock, from, page }) => {
                self.on_lock_base(r, lock, from, page, actions)
            }
            (Principal::Replica(_), LockMessage::Entries { lock, entries, .. }) => {
                for e in entries {
                    if e.entry.body.lock == lock {
                        self.on_lock_entry(e, true, actions);
                    }
                }
            }
            // Replies, statuses and seals are for clients.
            _ => {}
        }
    }

    fn send_lock_status(&mut self, to: ClientId, lock: LockId, actions: &mut Vec<Action>) {
        let message = match self.locks.logs.get(&lock) {
            Some(log) => LockMessage::Status {
                replica: self.id,
                lock,
                epoch: log.epoch,
                state: log.server_state(),
                anchor: log.anchor,
                k: log.last(),
                chain: log.chain(),
            },
            None => LockMessage::Status {
                replica: self.id,
                lock,
                epoch: 0,
                state: if self.locks.merged.contains(&lock) {
                    LockServerState::Merged
                } else {
                    LockServerState::Unknown
                },
                anchor: Digest::default(),
                k: 0,
                chain: Digest::default(),
            },
        };
        actions.push(Action::SendClient {
            to,
            message: Message::Lock(message),
        });
    }

    /// An entry, from its holder or relayed by a peer (its signature was checked by the wire;
    /// the signer is `entry.holder`).
    fn on_lock_entry(&mut self, e: LoggedEntry, reply: bool, actions: &mut Vec<Action>) {
        let lock = e.entry.body.lock;
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            if self.locks.merged.contains(&lock) {
                // Gone: tell the holder, whose session then falls back to ordering.
                let holder = e.entry.body.holder;
                return self.send_lock_status(holder, lock, actions);
            }
            if self.locks.early.len() < LOCK_EARLY_MAX {
                // Not activated here yet (L5): the holder saw 2f+1 others activate first.
                self.locks.early.push(e);
            }
            return;
        };
        let b = &e.entry.body;
        if b.holder != log.holder || b.epoch != log.epoch {
            let from = Principal::Client(b.holder);
            return self.misbehaved(from, "lock entry from another client", actions);
        }
        let k = b.k;
        if k == 0 {
            return;
        }
        let end = match log.frozen {
            Some(Some(p)) => Some(p),
            _ => None,
        };
        // With a fixed end, an entry that contradicts our log (another entry at a logged k,
        // or the next one on another chain) comes from the chain the end names: peers answer
        // a fetch only from that chain. Our log forked from it (a forking holder): cut it back
        // to where they agree and follow the end's chain.
        if let Some(p) = end.filter(|p| k <= p.k) {
            let fork_at = if k <= log.last() && log.entries[(k - 1) as usize].entry != e.entry {
                Some(if log.chains[(k - 1) as usize] == b.prev {
                    k - 1
                } else {
                    0
                })
            } else if k == log.last() + 1 && b.prev != log.chain() {
                Some(0)
            } else {
                None
            };
            if let Some(cut) = fork_at {
                if log.cuts < LOCK_CUTS_MAX {
                    log.cuts += 1;
                    log.truncate(cut);
                    tracing::warn!(
                        replica = self.id.0,
                        lock = lock.0,
                        k,
                        cut,
                        end = p.k,
                        "lock log on another chain than its fixed end; cut back"
                    );
                    self.persist_lock(LockRecord::Truncated { lock, k: cut }, actions);
                    self.restart_lock(lock, actions);
                    return self.on_lock_entry(e, reply, actions);
                }
                return;
            }
        }
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return;
        };
        if k <= log.last() {
            // A retransmission (or a relayed entry we have): answer from the cache if it is
            // the same entry; a different one at a logged k is the holder equivocating (L1).
            let same = log.entries[(k - 1) as usize].entry == e.entry;
            if !same {
                let from = Principal::Client(b.holder);
                return self.misbehaved(from, "two lock entries at one position", actions);
            }
            if let Some(result) = log.results.get(&k).cloned() {
                let chain = log.chains[k as usize];
                let holder = log.holder;
                self.send_lock_reply(holder, lock, k, chain, result, actions);
            }
            return;
        }
        if log.closed() {
            // Nothing is appended after a freeze (L3) or a seal (L4), except what a certified
            // end says the log must hold.
            let allowed = matches!(log.frozen, Some(Some(p)) if k <= p.k);
            if !allowed {
                let holder = log.holder;
                return self.send_lock_status(holder, lock, actions);
            }
        }
        if k > log.last() + 1 {
            if log.buffered.len() < LOCK_BUFFERED_MAX || log.buffered.contains_key(&k) {
                log.buffered.insert(k, e);
            }
            return self.fetch_lock_entries(lock, actions);
        }
        if b.prev != log.chain()
            || b.op_digest != lock_op_digest(&e.op)
            || e.op.len() > self.config.protocol.operation_bytes_max
        {
            let from = Principal::Client(b.holder);
            return self.misbehaved(from, "lock entry off the chain", actions);
        }
        if log.last() >= LOCK_LOG_ENTRIES_MAX || log.bytes + e.op.len() as u64 > LOCK_LOG_BYTES_MAX
        {
            tracing::warn!(
                replica = self.id.0,
                lock = lock.0,
                "lock log full; entry refused"
            );
            return;
        }
        // Append (L1, L2: the record precedes the reply in the action list).
        let next = lock_chain_next(&log.chain(), b);
        log.last_time = log.last_time.max(b.time_ns);
        let time_ns = log.last_time;
        log.bytes += e.op.len() as u64;
        log.chains.push(next);
        log.entries.push(e.clone());
        let holder = log.holder;
        let op = e.op.clone();
        self.persist_lock(
            LockRecord::Entry {
                lock,
                entry: Box::new(e),
            },
            actions,
        );
        self.ask_execute_locked(lock, k, op, holder, time_ns, reply, actions);
        // Entries buffered behind this one.
        let next_buffered = self
            .locks
            .logs
            .get_mut(&lock)
            .and_then(|log| log.buffered.remove(&(k + 1)));
        if let Some(next) = next_buffered {
            self.on_lock_entry(next, reply, actions);
        }
        self.maybe_seal(lock, actions);
    }

    fn send_lock_reply(
        &mut self,
        to: ClientId,
        lock: LockId,
        k: u64,
        chain: Digest,
        result: LockedResult,
        actions: &mut Vec<Action>,
    ) {
        let epoch = self.locks.logs.get(&lock).map_or(0, |l| l.epoch);
        actions.push(Action::SendClient {
            to,
            message: Message::Lock(LockMessage::Reply(Box::new(LockReply {
                replica: self.id,
                lock,
                epoch,
                k,
                chain,
                result,
            }))),
        });
    }

    /// The stage ran entry k.
    pub(super) fn on_locked_executed(
        &mut self,
        lock: LockId,
        k: u64,
        result: LockedResult,
        actions: &mut Vec<Action>,
    ) {
        let f = self.answered("locked");
        let InFlightKind::Locked {
            lock: asked,
            k: asked_k,
            reply,
        } = f.what
        else {
            panic!(
                "replica {}: a locked result answers another action",
                self.id.0
            );
        };
        assert!(
            asked == lock && asked_k == k,
            "replica {}: locked results out of order",
            self.id.0
        );
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return;
        };
        log.results.insert(k, result.clone());
        while log.results.len() > RESULTS_KEPT {
            log.results.pop_first();
        }
        if reply {
            let (holder, chain) = (log.holder, log.chains[k as usize]);
            self.send_lock_reply(holder, lock, k, chain, result, actions);
        }
    }

    /// The holder asks for a seal at (k, chain): the end of its log, to release the lock.
    fn on_lock_seal(
        &mut self,
        client: ClientId,
        lock: LockId,
        epoch: u32,
        k: u64,
        chain: Digest,
        actions: &mut Vec<Action>,
    ) {
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return self.send_lock_status(client, lock, actions);
        };
        if client != log.holder || epoch != log.epoch {
            return;
        }
        if let Some(seal) = &log.seal {
            // L4: one seal only; a retransmission gets the same one.
            if seal.body.point.k == k && seal.body.point.chain == chain {
                let message = Message::Lock(LockMessage::Sealed(Box::new(seal.clone())));
                actions.push(Action::SendClient {
                    to: client,
                    message,
                });
            }
            return;
        }
        // A log frozen without a certified end (a conflict) appends nothing more, so the
        // holder may still have what completed certified, to release with it.
        if matches!(log.frozen, Some(Some(_))) || k < log.last() {
            return self.send_lock_status(client, lock, actions);
        }
        log.seal_wanted = Some((k, chain));
        self.maybe_seal(lock, actions);
        self.fetch_lock_entries(lock, actions);
    }

    /// Seals once the log reached the point asked for: the digest of the lock's objects
    /// comes from the stage, after every entry asked before it.
    fn maybe_seal(&mut self, lock: LockId, actions: &mut Vec<Action>) {
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return;
        };
        let Some((k, chain)) = log.seal_wanted else {
            return;
        };
        if log.last() != k || log.seal_digest_asked || log.seal.is_some() {
            return;
        }
        if log.chain() != chain {
            // The holder's chain is not ours at k: it forked its log. Refuse to seal.
            log.seal_wanted = None;
            let from = Principal::Client(log.holder);
            return self.misbehaved(from, "seal asked on another chain", actions);
        }
        log.seal_digest_asked = true;
        actions.push(Action::Stage(StageAction::LockDigest { lock }));
        self.push_in_flight(InFlightKind::LockDigest { lock, check: false });
    }

    /// After a state transfer the service may have merged a lock this replica still logs
    /// (the merge happened in the checkpoints it skipped), or lack its content: a lock with
    /// no digest any more is forgotten here. Then the locks the transferred state holds are
    /// listed, and the content of those this replica lacks is fetched from peers.
    pub(super) fn check_locks_after_transfer(&mut self, actions: &mut Vec<Action>) {
        let locks: Vec<LockId> = self.locks.logs.keys().copied().collect();
        for lock in locks {
            actions.push(Action::Stage(StageAction::LockDigest { lock }));
            self.push_in_flight(InFlightKind::LockDigest { lock, check: true });
        }
        actions.push(Action::Stage(StageAction::LockInfos));
        self.push_in_flight(InFlightKind::LockInfos);
    }

    /// The locks the ordered state holds: fetch the content of those not served here.
    pub(super) fn on_lock_infos(
        &mut self,
        infos: Vec<state_abstraction::locking::LockInfo>,
        actions: &mut Vec<Action>,
    ) {
        self.answered_plain("lock infos", |k| matches!(k, InFlightKind::LockInfos));
        let mut fetching = std::mem::take(&mut self.locks.fetching_base);
        for info in infos {
            if self.locks.logs.contains_key(&info.lock) {
                // Served here already; a state transfer may have brought a freeze or a fixed
                // end this replica executed no event for.
                if let Some(end) = info.frozen {
                    self.on_lock_frozen(info.lock, end, actions);
                }
                continue;
            }
            // A fetch under way for the same lock goes on from where it stands.
            if let Some(f) = fetching.remove(&info.lock) {
                if f.info.base == info.base && f.info.epoch == info.epoch {
                    self.locks
                        .fetching_base
                        .insert(info.lock, FetchingBase { info, ..f });
                    continue;
                }
            }
            tracing::info!(
                replica = self.id.0,
                lock = info.lock.0,
                "lock content missing after state transfer; fetching it from peers"
            );
            let peer = self.next_peer();
            let lock = info.lock;
            self.locks.fetching_base.insert(
                lock,
                FetchingBase {
                    info,
                    assembly: Default::default(),
                    peer,
                    progressed: false,
                    installing: false,
                },
            );
            self.ask_lock_base(lock, actions);
        }
    }

    /// The next peer in turn, unless that is `than` (then the one after).
    fn peer_other_than(&mut self, than: ReplicaId) -> ReplicaId {
        match self.next_peer() {
            p if p == than => self.next_peer(),
            p => p,
        }
    }

    /// Moves `lock`'s content fetch to another peer and asks it from where the assembly
    /// stands (the one asked was silent, sent a page that did not fit, or the content it
    /// helped assemble was refused).
    fn ask_another_for_lock_base(&mut self, lock: LockId, actions: &mut Vec<Action>) {
        let Some(current) = self.locks.fetching_base.get(&lock).map(|f| f.peer) else {
            return;
        };
        let next = self.peer_other_than(current);
        if let Some(f) = self.locks.fetching_base.get_mut(&lock) {
            f.peer = next;
        }
        self.ask_lock_base(lock, actions);
    }

    /// Asks the current peer for the next page of `lock`'s content.
    fn ask_lock_base(&mut self, lock: LockId, actions: &mut Vec<Action>) {
        if let Some(f) = self.locks.fetching_base.get(&lock) {
            actions.push(Action::Send {
                to: f.peer,
                message: Message::Lock(LockMessage::FetchBase {
                    lock,
                    from: f.assembly.cursor(),
                }),
            });
        }
    }

    /// A peer lacks a lock's content: send a page of ours, if we serve that lock.
    fn on_lock_fetch_base(
        &mut self,
        to: ReplicaId,
        lock: LockId,
        from: BaseCursor,
        actions: &mut Vec<Action>,
    ) {
        if self.locks.logs.contains_key(&lock) {
            actions.push(Action::Stage(StageAction::ServeLockBase { to, lock, from }));
            self.push_in_flight(InFlightKind::ServeLockBase);
        }
    }

    pub(super) fn on_lock_base_served(
        &mut self,
        to: ReplicaId,
        lock: LockId,
        from: BaseCursor,
        page: Option<BasePage>,
        actions: &mut Vec<Action>,
    ) {
        self.answered_plain("lock base", |k| matches!(k, InFlightKind::ServeLockBase));
        if let Some(page) = page {
            actions.push(Action::Send {
                to,
                message: Message::Lock(LockMessage::Base { lock, from, page }),
            });
        }
    }

    fn on_lock_base(
        &mut self,
        peer: ReplicaId,
        lock: LockId,
        from: BaseCursor,
        page: BasePage,
        actions: &mut Vec<Action>,
    ) {
        let Some(f) = self.locks.fetching_base.get_mut(&lock) else {
            return;
        };
        if f.installing || peer != f.peer || from != f.assembly.cursor() {
            // A late or repeated answer, or one nobody asked for: only the peer asked now
            // adds pages, so a faulty one cannot spoil every attempt.
            return;
        }
        let page_bytes: u64 = page.pieces.iter().map(|p| p.bytes.len() as u64).sum();
        if f.assembly.bytes.saturating_add(page_bytes) > f.info.bytes_max {
            // More than the lock's content can hold: garbage from this peer (or from an
            // earlier one, which the whole would show). Start again elsewhere, before the
            // assembly takes all memory.
            tracing::warn!(
                replica = self.id.0,
                peer = peer.0,
                lock = lock.0,
                bytes = f.assembly.bytes + page_bytes,
                max = f.info.bytes_max,
                "a peer's lock content outgrows the lock; fetching it again from another"
            );
            f.assembly = Default::default();
            self.ask_another_for_lock_base(lock, actions);
            return self.misbehaved(Principal::Replica(peer), "lock content too large", actions);
        }
        match f.assembly.append(page, f.info.members as usize) {
            Err(why) => {
                tracing::warn!(
                    replica = self.id.0,
                    peer = peer.0,
                    lock = lock.0,
                    why,
                    "a peer's page of lock content does not fit; asking another"
                );
                self.ask_another_for_lock_base(lock, actions);
                self.misbehaved(
                    Principal::Replica(peer),
                    "lock base page out of order",
                    actions,
                );
            }
            Ok(false) => {
                f.progressed = true;
                self.ask_lock_base(lock, actions);
            }
            Ok(true) => {
                f.installing = true;
                let objects = std::mem::take(&mut f.assembly.objects);
                tracing::info!(
                    replica = self.id.0,
                    lock = lock.0,
                    objects = objects.len(),
                    bytes = f.assembly.bytes,
                    "lock content fetched; installing it"
                );
                actions.push(Action::Stage(StageAction::InstallLockBase {
                    lock,
                    objects,
                }));
                self.push_in_flight(InFlightKind::InstallLockBase);
            }
        }
    }

    /// The fetched content is in (checked against the base digest): the lock is served
    /// here from now on, and its whole log is fetched from the peers.
    pub(super) fn on_lock_base_installed(
        &mut self,
        lock: LockId,
        ok: bool,
        actions: &mut Vec<Action>,
    ) {
        self.answered_plain("lock base install", |k| {
            matches!(k, InFlightKind::InstallLockBase)
        });
        let Some(f) = self.locks.fetching_base.get_mut(&lock) else {
            return;
        };
        if !ok {
            // Some peer sent the wrong content (which one cannot be told: pages may have
            // come from several): start again from the next peer.
            tracing::warn!(
                replica = self.id.0,
                lock = lock.0,
                "fetched lock content refused by the service; fetching it again"
            );
            f.installing = false;
            f.assembly = Default::default();
            return self.ask_another_for_lock_base(lock, actions);
        }
        let info = f.info.clone();
        self.locks.fetching_base.remove(&lock);
        self.metrics.lock_contents_fetched += 1;
        self.on_lock_activated(lock, info.epoch, info.holder, info.base, actions);
        if let Some(end) = info.frozen {
            self.on_lock_frozen(lock, end, actions);
        }
        if let Some(log) = self.locks.logs.get_mut(&lock) {
            log.catch_up = Some(0);
            log.last_fetch_tick = 0;
        }
        self.fetch_lock_entries(lock, actions);
    }

    /// The stage's digest of a lock's objects, asked for a seal.
    pub(super) fn on_lock_digest(
        &mut self,
        lock: LockId,
        digest: Option<Digest>,
        actions: &mut Vec<Action>,
    ) {
        let f = self.answered("lock digest");
        let InFlightKind::LockDigest { lock: asked, check } = f.what else {
            panic!(
                "replica {}: a lock digest answers another action",
                self.id.0
            );
        };
        assert_eq!(
            asked, lock,
            "replica {}: lock digests out of order",
            self.id.0
        );
        if check {
            if digest.is_none() && self.locks.logs.remove(&lock).is_some() {
                self.locks.merged.insert(lock);
                tracing::info!(
                    replica = self.id.0,
                    lock = lock.0,
                    "lock merged or without content after state transfer; log dropped"
                );
                self.persist_lock(LockRecord::Merged { lock }, actions);
            } else if digest.is_some() {
                // Still here: run the log again on the installed state, so that the lock's
                // objects and the cached results follow from the base (a replay before the
                // transfer may have run on a state without the lock).
                self.restart_lock(lock, actions);
            }
            return;
        }
        let me = self.id;
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return;
        };
        log.seal_digest_asked = false;
        let Some((k, chain)) = log.seal_wanted.take() else {
            return;
        };
        let Some(state) = digest else {
            tracing::warn!(
                replica = me.0,
                lock = lock.0,
                "lock content missing here; no seal"
            );
            return;
        };
        if log.last() != k || log.seal.is_some() || matches!(log.frozen, Some(Some(_))) {
            return;
        }
        let point = LockPoint {
            lock,
            epoch: log.epoch,
            k,
            chain,
            state,
        };
        let seal = self.signer.sign(LockSeal { replica: me, point });
        let holder = log.holder;
        log.seal = Some(seal.clone());
        self.persist_lock(
            LockRecord::Sealed {
                lock,
                seal: Box::new(seal.clone()),
            },
            actions,
        );
        actions.push(Action::SendClient {
            to: holder,
            message: Message::Lock(LockMessage::Sealed(Box::new(seal))),
        });
    }

    /// Asks the peers for the entries this log lacks (at most once per retransmission
    /// period per lock).
    fn fetch_lock_entries(&mut self, lock: LockId, actions: &mut Vec<Action>) {
        let ticks = self.ticks;
        let period = self.config.protocol.retransmit_ticks;
        let Some(log) = self.locks.logs.get_mut(&lock) else {
            return;
        };
        let Some(to) = log.wanted() else {
            return;
        };
        if log.last_fetch_tick != 0 && ticks < log.last_fetch_tick + period {
            return;
        }
        if let Some(previous) = log.catch_up {
            if log.last_fetch_tick != 0 && previous == log.last() {
                // A whole period brought nothing new: the peers have no more.
                log.catch_up = None;
                if log.wanted().is_none() {
                    return;
                }
            } else {
                log.catch_up = Some(log.last());
            }
        }
        log.last_fetch_tick = ticks.max(1);
        let want = match log.frozen {
            Some(Some(p)) => Some((p.k, p.chain)),
            _ => None,
        };
        actions.push(Action::Broadcast {
            message: Message::Lock(LockMessage::Fetch {
                lock,
                epoch: log.epoch,
                from: log.last() + 1,
                to,
                want,
            }),
        });
    }

    fn on_lock_fetch(
        &mut self,
        to: ReplicaId,
        lock: LockId,
        epoch: u32,
        (from, last): (u64, u64),
        want: Option<(u64, Digest)>,
        actions: &mut Vec<Action>,
    ) {
        let Some(log) = self.locks.logs.get(&lock) else {
            return;
        };
        if epoch != log.epoch || from == 0 || from > log.last() {
            return;
        }
        if want.is_some_and(|(k, h)| log.chains.get(k as usize) != Some(&h)) {
            // Our log is not on the chain the asker must follow.
            return;
        }
        let end = last
            .min(log.last())
            .min(from + crate::wire::lock::LOCK_ENTRIES_PER_MESSAGE as u64 - 1);
        // Bound the answer by bytes too: a frame holds a few large entries at most.
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for k in from..=end {
            let e = &log.entries[(k - 1) as usize];
            if !entries.is_empty() && bytes + e.op.len() > self.config.protocol.operation_bytes_max
            {
                break;
            }
            bytes += e.op.len();
            entries.push(e.clone());
        }
        actions.push(Action::Send {
            to,
            message: Message::Lock(LockMessage::Entries {
                lock,
                epoch,
                entries,
            }),
        });
    }

    /// Retransmission timer: fetch what is still missing.
    pub(super) fn on_lock_timeout(&mut self, actions: &mut Vec<Action>) {
        let silent: Vec<LockId> = self
            .locks
            .fetching_base
            .iter()
            .filter(|(_, f)| !f.installing && !f.progressed)
            .map(|(lock, _)| *lock)
            .collect();
        for f in self.locks.fetching_base.values_mut() {
            f.progressed = false;
        }
        for lock in silent {
            self.ask_another_for_lock_base(lock, actions);
        }
        let locks: Vec<LockId> = self
            .locks
            .logs
            .iter()
            .filter(|(_, l)| l.wanted().is_some())
            .map(|(id, _)| *id)
            .collect();
        for lock in locks {
            self.fetch_lock_entries(lock, actions);
        }
    }
}
