//! The client side over TCP: a [`ClientHandle`] that any thread (a FUSE worker, a benchmark)
//! can call; it runs the sans-IO [`crate::client::Client`] on its own runtime thread.
//!
//! Requests beyond the protocol's in-flight window wait in a bounded queue; a call that gets
//! no completed result within its timeout fails with [`CallError::Timeout`] instead of hanging.
//!
//! The same task runs the client's Zzyzx lock sessions ([`crate::lock_client::LockSession`]):
//! [`ClientHandle::lock_start`], [`ClientHandle::locked_call`] (one entry in flight per lock,
//! the others queued), [`ClientHandle::lock_seal`] and [`ClientHandle::lock_end`].

use super::audit::ReplyAudit;
use super::net::{self, Backoff};
use crate::client::{Client, ClientAction, Completion, RequestId};
use crate::config::{ClientSecrets, ClusterConfig};
use crate::lock_client::{LockOutput, LockSession};
use crate::wire::{
    encode, Authenticator, ClientMessage, LockCertVerifier, LockMessage, LockReport,
    LockResolution, Message, Principal, ReplicaId, Signed,
};
use state_abstraction::{LockId, LockedResult, ResolveSubject};
use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

const SUBMIT_QUEUE: usize = 1024;
const LINK_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CallError {
    #[error("no answer from the cluster within {0:?}")]
    Timeout(Duration),
    #[error("the client has shut down")]
    Closed,
    #[error("the request is too large ({0} bytes)")]
    TooLarge(usize),
    /// The lock is frozen (revoked) or its session was ended: use the ordered path.
    #[error("the lock is no longer served")]
    LockGone,
    /// The entry was sent and 2f+1 servers refused it (the lock froze meanwhile): it took
    /// effect only if the lock's end, fixed later, includes it.
    #[error("the lock froze with this entry in flight")]
    EntryRefused,
}

type Done<T> = std_mpsc::SyncSender<Result<T, CallError>>;

enum Submit {
    Call {
        operation: Vec<u8>,
        read_only: bool,
        done: Done<Vec<u8>>,
    },
    /// Start a session for a granted lock; answered once it is ready (with the log's end).
    LockStart {
        lock: LockId,
        done: Done<u64>,
    },
    Locked {
        lock: LockId,
        operation: Vec<u8>,
        done: Done<LockedResult>,
    },
    /// Seal the log at its last completed entry; answered with the certificate.
    LockSeal {
        lock: LockId,
        done: Done<Vec<u8>>,
    },
    LockEnd {
        lock: LockId,
    },
    /// Collect the replicas' reports of a frozen lock's log; answered with the encoded
    /// evidence for an ordered `Resolve`.
    LockReports {
        subject: ResolveSubject,
        done: Done<Vec<u8>>,
    },
}

/// Reports of one frozen lock being collected.
struct Reporting {
    subject: ResolveSubject,
    reports: BTreeMap<ReplicaId, Signed<LockReport>>,
    waiting: Vec<Done<Vec<u8>>>,
    asked_tick: u64,
    created_tick: u64,
    /// When 2f+1 valid reports were in: the rest get a couple of ticks more (a longer log
    /// among them wins), then the evidence goes with what came.
    quorum_tick: Option<u64>,
}

/// Ticks to wait for more reports once 2f+1 are in.
const REPORTS_EXTRA_TICKS: u64 = 3;

/// One lock session in the client task, with the callers waiting on it.
struct LockTask {
    session: LockSession,
    ready: Vec<Done<u64>>,
    queue: VecDeque<(Vec<u8>, Done<LockedResult>)>,
    in_flight: Option<Done<LockedResult>>,
    sealing: Option<Done<Vec<u8>>>,
}

impl LockTask {
    /// Fails everything waiting: the lock is no longer served.
    fn fail_all(&mut self) {
        for d in self.ready.drain(..) {
            let _ = d.try_send(Err(CallError::LockGone));
        }
        for (_, d) in self.queue.drain(..) {
            let _ = d.try_send(Err(CallError::LockGone));
        }
        if let Some(d) = self.in_flight.take() {
            let _ = d.try_send(Err(CallError::LockGone));
        }
        if let Some(d) = self.sealing.take() {
            let _ = d.try_send(Err(CallError::LockGone));
        }
    }

    fn on_output(&mut self, out: LockOutput) {
        match out {
            LockOutput::Ready { k } => {
                for d in self.ready.drain(..) {
                    let _ = d.try_send(Ok(k));
                }
            }
            LockOutput::Completed { result, .. } => {
                if let Some(d) = self.in_flight.take() {
                    let _ = d.try_send(Ok(result));
                }
            }
            LockOutput::Certificate(cert) => {
                if let Some(d) = self.sealing.take() {
                    let _ = d.try_send(Ok(cert));
                }
            }
            LockOutput::Gone => {
                tracing::info!(lock = self.session.lock().0, "lock merged at the servers");
                // The entry in flight waits for its refusals or its replies (see below).
                let in_flight = self.in_flight.take();
                self.fail_all();
                self.in_flight = in_flight;
            }
            LockOutput::EntryRefused { .. } => {
                if let Some(d) = self.in_flight.take() {
                    let _ = d.try_send(Err(CallError::EntryRefused));
                }
            }
            LockOutput::Revoked => {
                tracing::info!(lock = self.session.lock().0, "lock frozen by the servers");
                // A seal may still be asked for (and answered) on a frozen log: only the
                // operations fail.
                for d in self.ready.drain(..) {
                    let _ = d.try_send(Err(CallError::LockGone));
                }
                for (_, d) in self.queue.drain(..) {
                    let _ = d.try_send(Err(CallError::LockGone));
                }
                // Not the entry in flight: some servers may have appended it before they
                // froze, so it is not safe to send again on the ordered path. It completes
                // (2f+1 replies), is refused by 2f+1 (`EntryRefused`), or times out (EIO:
                // may or may not have happened, as for any call).
            }
        }
    }

    /// Sends the next queued operation when none is in flight. Also while a seal is asked
    /// for: the seal waits for the queue to drain, so holding the queue back too left both
    /// waiting until the call timed out (a release racing another thread's call).
    fn pump(&mut self, now_ns: u64, actions: &mut Vec<ClientAction>) {
        if self.in_flight.is_some() || !self.session.is_ready() || self.session.is_sealing() {
            return;
        }
        let Some((op, done)) = self.queue.pop_front() else {
            return;
        };
        match self.session.submit(op, now_ns, actions) {
            Ok(_) => self.in_flight = Some(done),
            Err(e) => {
                tracing::warn!(error = %e, "locked operation refused by the session");
                let _ = done.try_send(Err(CallError::LockGone));
            }
        }
    }
}

/// Locks whose servers said they are frozen or merged, for the holder's side to give back
/// at once (an idle holder learns of a revocation only from these, not from a failed call).
#[derive(Default)]
pub struct LockRevocations {
    ids: Mutex<Vec<LockId>>,
    changed: std::sync::Condvar,
}

impl LockRevocations {
    fn push(&self, lock: LockId) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if !ids.contains(&lock) {
            ids.push(lock);
        }
        self.changed.notify_all();
    }

    /// The locks revoked since the last call, waiting up to `timeout` for one.
    pub fn wait(&self, timeout: Duration) -> Vec<LockId> {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let (mut ids, _) = self
            .changed
            .wait_timeout_while(ids, timeout, |ids| ids.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *ids)
    }
}

/// The lock a lock message is about.
fn lock_of(message: &Message) -> Option<LockId> {
    match message {
        Message::Lock(LockMessage::Reply(r)) => Some(r.lock),
        Message::Lock(LockMessage::Status { lock, .. }) => Some(*lock),
        Message::Lock(LockMessage::Sealed(s)) => Some(s.body.point.lock),
        _ => None,
    }
}

/// A connection to a cluster as one client principal. Cheap to share (`Arc`) between threads.
pub struct ClientHandle {
    submit: mpsc::Sender<Submit>,
    runtime: Option<tokio::runtime::Runtime>,
    operation_bytes_max: usize,
    observed: Arc<Mutex<ReplicaObservations>>,
    revocations: Arc<LockRevocations>,
}

/// What this client observed about each replica (for `bftfs status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaObservations {
    /// Ordered replies that disagreed with the result the client accepted, per replica.
    pub disagreeing_replies: BTreeMap<u32, u64>,
    /// Ordered replies compared with an accepted result, per replica.
    pub compared_replies: BTreeMap<u32, u64>,
    /// Frames that did not authenticate, per replica they claim to come from.
    pub auth_failures: BTreeMap<u32, u64>,
    /// Calls completed, by how: on 3f+1 matching speculative replies (Zyzzyva's fast path),
    /// on 2f+1 replies after the commit, or on the read-only path (2f+1 matching).
    pub completed_fast: u64,
    pub completed_committed: u64,
    pub completed_read_only: u64,
    /// Requests sent again for want of an answer, and read-only requests sent again ordered.
    pub retransmissions: u64,
    pub read_only_fallbacks: u64,
}

impl ClientHandle {
    /// Starts the client. `first_timestamp` must exceed every timestamp this client identity
    /// used before; the wall clock in nanoseconds is used when `None`.
    pub fn start(config: ClusterConfig, secrets: ClientSecrets) -> std::io::Result<ClientHandle> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("bftfs-client")
            .build()?;
        let (submit_tx, submit_rx) = mpsc::channel(SUBMIT_QUEUE);
        let operation_bytes_max = config.protocol.operation_bytes_max;
        let observed = Arc::new(Mutex::new(ReplicaObservations::default()));
        let revocations = Arc::new(LockRevocations::default());
        runtime.spawn(client_task(
            config,
            secrets,
            submit_rx,
            observed.clone(),
            revocations.clone(),
        ));
        Ok(ClientHandle {
            submit: submit_tx,
            runtime: Some(runtime),
            operation_bytes_max,
            observed,
            revocations,
        })
    }

    /// Where the client posts the locks its servers froze or merged.
    pub fn lock_revocations(&self) -> Arc<LockRevocations> {
        self.revocations.clone()
    }

    /// What this client observed about the replicas so far.
    pub fn observations(&self) -> ReplicaObservations {
        self.observed.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Invokes `operation` and waits for its result (f+1 matching committed replies, or 2f+1
    /// matching read-only ones).
    pub fn call(
        &self,
        operation: Vec<u8>,
        read_only: bool,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        if operation.len() > self.operation_bytes_max {
            return Err(CallError::TooLarge(operation.len()));
        }
        self.submit_and_wait(
            |done| Submit::Call {
                operation,
                read_only,
                done,
            },
            timeout,
        )
    }

    fn submit_and_wait<T>(
        &self,
        make: impl FnOnce(Done<T>) -> Submit,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let (done, wait) = std_mpsc::sync_channel(1);
        self.submit
            .blocking_send(make(done))
            .map_err(|_| CallError::Closed)?;
        match wait.recv_timeout(timeout) {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(CallError::Timeout(timeout)),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(CallError::Closed),
        }
    }

    /// Starts serving a lock this client was granted (an ordered `Lock` answered it) and
    /// waits until f+1 servers report it active: the log's last entry is returned.
    pub fn lock_start(&self, lock: LockId, timeout: Duration) -> Result<u64, CallError> {
        self.submit_and_wait(|done| Submit::LockStart { lock, done }, timeout)
    }

    /// Runs `operation` as the next entry of the lock's log (2f+1 matching replies).
    pub fn locked_call(
        &self,
        lock: LockId,
        operation: Vec<u8>,
        timeout: Duration,
    ) -> Result<LockedResult, CallError> {
        if operation.len() > self.operation_bytes_max {
            return Err(CallError::TooLarge(operation.len()));
        }
        self.submit_and_wait(
            |done| Submit::Locked {
                lock,
                operation,
                done,
            },
            timeout,
        )
    }

    /// Seals the lock's log at its last completed entry (after the operations queued
    /// before it): the certificate for the ordered `Release`.
    pub fn lock_seal(&self, lock: LockId, timeout: Duration) -> Result<Vec<u8>, CallError> {
        self.submit_and_wait(|done| Submit::LockSeal { lock, done }, timeout)
    }

    /// Forgets the lock's session (after its release).
    pub fn lock_end(&self, lock: LockId) {
        let _ = self.submit.blocking_send(Submit::LockEnd { lock });
    }

    /// Asks every replica where its copy of a frozen lock's log ends and returns the
    /// encoded evidence (2f+1 valid reports or more) for an ordered `Resolve`.
    pub fn lock_reports(
        &self,
        subject: ResolveSubject,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        self.submit_and_wait(|done| Submit::LockReports { subject, done }, timeout)
    }

    /// The async form of [`ClientHandle::call`], for callers already on a runtime.
    pub async fn call_async(
        &self,
        operation: Vec<u8>,
        read_only: bool,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let (done, wait) = std_mpsc::sync_channel(1);
        self.submit
            .send(Submit::Call {
                operation,
                read_only,
                done,
            })
            .await
            .map_err(|_| CallError::Closed)?;
        let waited = tokio::task::spawn_blocking(move || wait.recv_timeout(timeout))
            .await
            .map_err(|_| CallError::Closed)?;
        match waited {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(CallError::Timeout(timeout)),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(CallError::Closed),
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

async fn client_task(
    config: ClusterConfig,
    secrets: ClientSecrets,
    mut submit_rx: mpsc::Receiver<Submit>,
    observed: Arc<Mutex<ReplicaObservations>>,
    revocations: Arc<LockRevocations>,
) {
    let auth = Authenticator::for_client(&config, &secrets);
    let tick = Duration::from_nanos(config.protocol.tick_ns.max(1_000_000));
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<Vec<u8>>(LINK_QUEUE);
    let links: BTreeMap<ReplicaId, mpsc::Sender<Vec<u8>>> = config
        .replicas
        .iter()
        .map(|r| {
            let hello = auth
                .seal(
                    &Message::Client(ClientMessage::Hello),
                    &[Principal::Replica(r.id)],
                )
                .ok();
            (
                r.id,
                net::spawn_link(
                    r.address.clone(),
                    LINK_QUEUE,
                    Backoff::default(),
                    hello,
                    Some(inbound_tx.clone()),
                ),
            )
        })
        .collect();
    drop(inbound_tx);
    let all: Vec<Principal> = config.replica_ids().map(Principal::Replica).collect();
    let config = Arc::new(config);
    let mut client = Client::new(config.clone(), &secrets, wall_clock_ns());
    let mut locks: BTreeMap<LockId, LockTask> = BTreeMap::new();
    let mut reporting: BTreeMap<LockId, Reporting> = BTreeMap::new();
    let verifier = LockCertVerifier::new(&config);
    let mut ticks = 0u64;
    let reports_expire_ticks = 60_000_000_000 / config.protocol.tick_ns.max(1);
    let mut waiting: VecDeque<(Vec<u8>, bool, Done<Vec<u8>>)> = VecDeque::new();
    let mut pending: BTreeMap<RequestId, std_mpsc::SyncSender<Result<Vec<u8>, CallError>>> =
        BTreeMap::new();
    let mut actions = Vec::new();
    let mut completed: Vec<Completion> = Vec::new();
    let mut audit = ReplyAudit::default();
    let mut rejected = 0u64;
    // Calls completed since the start, for the observations.
    let (mut ordered_completed, mut read_only_completed) = (0u64, 0u64);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut audited = false;
        tokio::select! {
            s = submit_rx.recv(), if waiting.len() < SUBMIT_QUEUE => match s {
                Some(Submit::Call { operation, read_only, done }) => {
                    waiting.push_back((operation, read_only, done))
                }
                Some(Submit::LockStart { lock, done }) => {
                    let task = locks.entry(lock).or_insert_with(|| LockTask {
                        session: LockSession::new(config.clone(), &secrets, lock),
                        ready: Vec::new(),
                        queue: VecDeque::new(),
                        in_flight: None,
                        sealing: None,
                    });
                    if task.session.is_ready() {
                        let _ = done.try_send(Ok(task.session.last_k()));
                    } else {
                        task.ready.push(done);
                        task.session.ping(&mut actions);
                    }
                }
                Some(Submit::Locked { lock, operation, done }) => match locks.get_mut(&lock) {
                    Some(t) if !t.session.is_revoked() => t.queue.push_back((operation, done)),
                    _ => {
                        let _ = done.try_send(Err(CallError::LockGone));
                    }
                },
                Some(Submit::LockSeal { lock, done }) => match locks.get_mut(&lock) {
                    Some(t) if !t.session.is_gone() => t.sealing = Some(done),
                    _ => {
                        let _ = done.try_send(Err(CallError::LockGone));
                    }
                },
                Some(Submit::LockEnd { lock }) => {
                    if let Some(mut t) = locks.remove(&lock) {
                        t.fail_all();
                    }
                }
                Some(Submit::LockReports { subject, done }) => {
                    let r = reporting.entry(subject.lock).or_insert_with(|| Reporting {
                        subject,
                        reports: BTreeMap::new(),
                        waiting: Vec::new(),
                        asked_tick: ticks,
                        created_tick: ticks,
                        quorum_tick: None,
                    });
                    r.waiting.push(done);
                    actions.push(ClientAction::Broadcast {
                        message: Message::Lock(LockMessage::ReportAsk { lock: subject.lock }),
                    });
                }
                None => return,
            },
            Some(frame) = inbound_rx.recv() => {
                match auth.open(&frame) {
                    Ok(m) => {
                        if let Message::Client(ClientMessage::Reply(r)) = m.message() {
                            if !r.read_only {
                                audit.on_reply(r.replica.0, r.timestamp.0, &r.result);
                                audited = true;
                            }
                        }
                        if let Message::Lock(LockMessage::Report(report)) = m.message() {
                            let lock = report.body.lock;
                            if let Some(r) = reporting.get_mut(&lock) {
                                if Principal::Replica(report.body.replica) == m.sender()
                                    && verifier.report_valid(report, &r.subject)
                                {
                                    r.reports.insert(report.body.replica, (**report).clone());
                                    if r.reports.len() >= config.quorum() {
                                        r.quorum_tick.get_or_insert(ticks);
                                    }
                                }
                            }
                        } else if let Some(lock) = lock_of(m.message()) {
                            if let Some(t) = locks.get_mut(&lock) {
                                if let Some(out) = t.session.on_message(m) {
                                    if matches!(out, LockOutput::Revoked | LockOutput::Gone) {
                                        revocations.push(lock);
                                    }
                                    t.on_output(out);
                                }
                            }
                        } else {
                            client.on_message(m, &mut actions, &mut completed)
                        }
                    }
                    Err(e) => {
                        rejected += 1;
                        if let Some(Principal::Replica(r)) = crate::wire::claimed_sender(&frame) {
                            if let Ok(mut o) = observed.lock() {
                                *o.auth_failures.entry(r.0).or_default() += 1;
                            }
                        }
                        // The first few, then rarely: a replica that breaks every MAC must not
                        // flood the log.
                        if rejected <= 3 || rejected % 1000 == 0 {
                            tracing::warn!(error = %e, rejected, "dropped a reply that did not authenticate");
                        }
                    }
                }
            }
            _ = ticker.tick() => {
                ticks += 1;
                let period = config.protocol.retransmit_ticks.max(1);
                for (lock, r) in reporting.iter_mut() {
                    if r.quorum_tick.is_none() && ticks >= r.asked_tick + period {
                        r.asked_tick = ticks;
                        actions.push(ClientAction::Broadcast {
                            message: Message::Lock(LockMessage::ReportAsk { lock: *lock }),
                        });
                    }
                }
                client.on_tick(&mut actions);
                for t in locks.values_mut() {
                    t.session.on_tick(&mut actions);
                }
            }
        }
        // Evidence is ready once every replica reported, or a few ticks after 2f+1 did.
        let n = config.n();
        reporting.retain(|_, r| {
            let ready = r.reports.len() >= n
                || r.quorum_tick
                    .is_some_and(|q| ticks >= q + REPORTS_EXTRA_TICKS);
            if !ready {
                // Callers time out on their own; a collection nobody can finish goes after a
                // minute.
                return ticks < r.created_tick + reports_expire_ticks;
            }
            let evidence = encode(&LockResolution {
                reports: r.reports.values().cloned().collect(),
            })
            .map_err(|_| CallError::TooLarge(0));
            for d in r.waiting.drain(..) {
                let _ = d.try_send(evidence.clone());
            }
            false
        });
        let now = wall_clock_ns();
        for t in locks.values_mut() {
            t.pump(now, &mut actions);
            // A seal waits for the entries queued before it.
            if t.sealing.is_some()
                && t.queue.is_empty()
                && t.in_flight.is_none()
                && !t.session.busy()
                && !t.session.is_sealing()
            {
                if let Err(e) = t.session.seal(&mut actions) {
                    tracing::warn!(error = %e, "seal refused by the session");
                    if let Some(d) = t.sealing.take() {
                        let _ = d.try_send(Err(CallError::LockGone));
                    }
                }
            }
        }
        // Callers that gave up (timed out) are dropped from the queue before they are sent.
        while client.can_invoke() {
            let Some((operation, read_only, done)) = waiting.pop_front() else {
                break;
            };
            match client.invoke(operation, read_only, &mut actions) {
                Ok(id) => {
                    pending.insert(id, done);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "request refused by the client core");
                    let _ = done.try_send(Err(CallError::TooLarge(0)));
                }
            }
        }
        let any_completed = !completed.is_empty();
        for c in completed.drain(..) {
            if c.read_only {
                read_only_completed += 1;
            } else {
                ordered_completed += 1;
                audit.on_complete(c.id.0, &c.result);
                audited = true;
            }
            if let Some(done) = pending.remove(&c.id) {
                let _ = done.try_send(Ok(c.result));
            }
        }
        if audited || any_completed {
            if let Ok(mut o) = observed.lock() {
                if audited {
                    o.disagreeing_replies.clone_from(audit.disagreed());
                    o.compared_replies.clone_from(audit.compared());
                }
                // The client core counts its fast completions; the other ordered ones
                // completed after the commit.
                o.completed_read_only = read_only_completed;
                o.completed_fast = client.fast_completions;
                o.completed_committed = ordered_completed.saturating_sub(client.fast_completions);
                o.retransmissions = client.retransmissions;
                o.read_only_fallbacks = client.read_only_fallbacks;
            }
        }
        for action in actions.drain(..) {
            match action {
                ClientAction::Send { to, message } => {
                    if let (Some(link), Ok(frame)) = (
                        links.get(&to),
                        auth.seal(&message, &[Principal::Replica(to)]),
                    ) {
                        let _ = link.try_send(frame);
                    }
                }
                ClientAction::Broadcast { message } => {
                    if let Ok(frame) = auth.seal(&message, &all) {
                        for link in links.values() {
                            let _ = link.try_send(frame.clone());
                        }
                    }
                }
            }
        }
    }
}
