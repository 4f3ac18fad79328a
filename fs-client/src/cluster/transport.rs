//! [`ReplicatedTransport`]: the FUSE adapter's [`FsTransport`] over the BFT client protocol,
//! counting its calls, and the thread that keeps the client's observations on disk for
//! `bftfs status`.

use super::locks::HeldLocks;
use crate::transport::{FsTransport, TransportError};
use anyhow::{Context, Result};
use replica::config::{ClientSecrets, ClusterConfig};
use replica::driver::client::{CallError, ClientHandle, ReplicaObservations};
use replica::driver::status::{unix_ms, CallReport, ClientReport, CLIENT_REPORT_HEARTBEAT};
use state_abstraction::fs::{decode, encode, Caller, FsError, FsRequest, FsResult, Handle};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// [`FsTransport`] over the BFT client protocol.
pub struct ReplicatedTransport {
    client: ClientHandle,
    client_id: u64,
    timeout: Duration,
    /// Set after a timeout so that an outage is logged once, not once per request.
    failing: AtomicBool,
    calls: CallTracker,
    /// The Zzyzx locks this mount holds.
    locks: HeldLocks,
    /// Calls served through a lock's log (for metrics).
    locked_calls: AtomicU64,
    replicas: u32,
}

/// What a mount's metrics export about its client ([`ReplicatedTransport::figures`]).
pub struct ClientFigures {
    pub observations: ReplicaObservations,
    pub calls: CallReport,
    pub locked_calls: u64,
    /// Replicas in the cluster (ids 0..replicas).
    pub replicas: u32,
}

/// Counts a client's calls for its report ([`CallReport`]), including those still waiting.
#[derive(Default)]
struct CallTracker {
    inner: Mutex<TrackedCalls>,
}

#[derive(Default)]
struct TrackedCalls {
    report: CallReport,
    /// Calls waiting for an answer: number → when sent (Unix ms).
    pending: BTreeMap<u64, u64>,
    next: u64,
}

impl CallTracker {
    fn begin(&self) -> u64 {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.next += 1;
        let id = t.next;
        t.pending.insert(id, unix_ms());
        id
    }

    fn end(&self, id: u64, failure: Option<String>) {
        let now = unix_ms();
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.pending.remove(&id);
        let r = &mut t.report;
        match failure {
            None => {
                r.completed += 1;
                r.failed_in_a_row = 0;
                r.last_completed_unix_ms = now;
            }
            Some(why) => {
                r.failed += 1;
                r.failed_in_a_row += 1;
                r.last_failed_unix_ms = now;
                r.last_error = why;
            }
        }
    }

    fn report(&self) -> CallReport {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        CallReport {
            pending: t.pending.len() as u64,
            // Numbers grow with sending time, so the first pending call is the oldest.
            oldest_pending_unix_ms: t.pending.values().next().copied().unwrap_or(0),
            ..t.report.clone()
        }
    }
}

impl ReplicatedTransport {
    pub fn start(config: ClusterConfig, secrets: ClientSecrets, timeout: Duration) -> Result<Self> {
        let client_id = secrets.id.0;
        let replicas = config.n() as u32;
        let client = ClientHandle::start(config, secrets).context("cannot start the BFT client")?;
        Ok(ReplicatedTransport {
            client,
            client_id,
            timeout,
            failing: AtomicBool::new(false),
            calls: CallTracker::default(),
            locks: HeldLocks::default(),
            locked_calls: AtomicU64::new(0),
            replicas,
        })
    }

    /// Whether reads under a Zzyzx lock may be answered from the mount's cache.
    pub fn with_lock_cache(mut self, on: bool) -> Self {
        self.locks.set_cache(on);
        self
    }

    /// Who takes Zzyzx locks (`-o locks=`), and when an automatic one is idle.
    pub fn with_lock_policy(
        mut self,
        policy: crate::options::LockPolicy,
        idle_after: Duration,
    ) -> Self {
        self.locks.set_policy(policy, idle_after);
        self
    }

    /// A thread that gives back, until the transport goes, the locks the servers froze (at
    /// once: another client waits for them) and idle automatic locks (every second).
    pub fn start_lock_keeper(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        let revocations = self.client.lock_revocations();
        let spawned = std::thread::Builder::new()
            .name("bftfs-lock-keeper".into())
            .spawn(move || {
                let mut idle_checked = std::time::Instant::now();
                loop {
                    // Waits without holding the transport, so that it can go meanwhile.
                    let revoked = revocations.wait(Duration::from_secs(1));
                    let Some(t) = weak.upgrade() else { return };
                    t.locks.release_revoked(&t, &revoked);
                    if idle_checked.elapsed() >= Duration::from_secs(1) {
                        idle_checked = std::time::Instant::now();
                        t.locks.release_idle(&t);
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the thread that gives back locks: {e}");
        }
    }

    /// The client's figures now: how its calls completed and what it saw of each replica.
    pub fn figures(&self) -> ClientFigures {
        ClientFigures {
            observations: self.client.observations(),
            calls: self.calls.report(),
            locked_calls: self.locked_calls.load(Ordering::Relaxed),
            replicas: self.replicas,
        }
    }
}

/// The thread that keeps a client's observations of the replicas on disk; stops on drop.
pub struct ObservationReporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ObservationReporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a mount rewrites what it observed about the replicas.
const REPORT_EVERY: Duration = Duration::from_millis(500);

impl ReplicatedTransport {
    /// Writes this client's observations of the replicas (replies that disagreed with the
    /// accepted result, replies that did not authenticate) and how its calls fare into `dir`
    /// when they change and at least every [`CLIENT_REPORT_HEARTBEAT`], for `bftfs status`:
    /// only a client can see a replica that lies in its replies, or calls that get no answer.
    pub fn report_observations(self: &Arc<Self>, dir: &Path) -> ObservationReporter {
        let stop = Arc::new(AtomicBool::new(false));
        let (me, stop2, dir) = (self.clone(), stop.clone(), dir.to_path_buf());
        let client = self.client_id;
        let thread = std::thread::Builder::new()
            .name("bftfs-observe".into())
            .spawn(move || {
                let mut last: Option<ClientReport> = None;
                while !stop2.load(Ordering::Relaxed) {
                    let mut report =
                        ClientReport::from_observations(client, &me.client.observations());
                    report.calls = me.calls.report();
                    let due = last.as_ref().is_none_or(|l| {
                        let same = ClientReport {
                            updated_unix_ms: report.updated_unix_ms,
                            ..l.clone()
                        } == report;
                        let age = report.updated_unix_ms.saturating_sub(l.updated_unix_ms);
                        !same || age >= CLIENT_REPORT_HEARTBEAT.as_millis() as u64
                    });
                    if due {
                        if let Err(e) = report.write_to(&dir) {
                            // A read-only cluster directory (another user's mount): status
                            // then lacks the client's view, nothing else.
                            tracing::debug!(error = %e, "cannot write the client's observations");
                        }
                        last = Some(report);
                    }
                    std::thread::sleep(REPORT_EVERY);
                }
            })
            .ok();
        ObservationReporter { stop, thread }
    }
}

impl FsTransport for ReplicatedTransport {
    fn call(&self, req: FsRequest) -> Result<FsResult, TransportError> {
        // Range locks are ordered state and never entries of a Zzyzx lock's log (the
        // replicas would answer NeedsAgreement): straight to the ordered path.
        if !req.op.is_range_lock() {
            if let Some(result) = self.locks.try_locked(self, &req) {
                if result.is_ok() {
                    self.locked_calls.fetch_add(1, Ordering::Relaxed);
                }
                return result;
            }
        }
        let mut result = self.call_ordered(&req);
        if let Ok(Ok(reply)) = &mut result {
            self.locks.holder_view_of_roots(self, &req, reply);
        }
        self.locks.after_ordered(&req, result.as_ref().ok());
        if let Ok(r) = &result {
            self.locks.note_ordered(self, &req, r);
        }
        result
    }

    fn lock(&self, caller: Caller, h: Handle) -> Result<(), i32> {
        self.locks.lock(self, caller, h)
    }

    fn unlock(&self, _caller: Caller, h: Handle) -> Result<(), i32> {
        self.locks.unlock(self, h)
    }

    fn release_all(&self) {
        self.locks.release_all(self)
    }
}

impl ReplicatedTransport {
    /// A call on the ordered path (the read-only path first for reads), retried while it
    /// meets a lock that has not merged yet.
    fn call_ordered(&self, req: &FsRequest) -> Result<FsResult, TransportError> {
        let deadline = std::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(2);
        let mut read_only = req.op.is_read_only();
        let mut first_locked: Option<std::time::Instant> = None;
        loop {
            let result = self.send(req, read_only)?;
            if result == Err(FsError::Locked) && read_only {
                // The read-only path refuses a locked object without revoking the lock
                // (it is unordered): the ordered path revokes it.
                read_only = false;
                continue;
            }
            // Inside another client's lock (or our own, reached from outside it): the
            // access froze the lock, and a retry succeeds once it merged. Never shown to an
            // application unless the lock outlives the call's timeout.
            if result != Err(FsError::Locked) || std::time::Instant::now() >= deadline {
                return Ok(result);
            }
            if self.locks.holds_any() {
                self.locks.release_all(self);
            }
            // A lock whose holder died stays frozen until a client resolves it.
            if first_locked
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                >= Duration::from_secs(1)
            {
                self.locks.resolve_frozen(self);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(64));
        }
    }

    pub(super) fn client(&self) -> &ClientHandle {
        &self.client
    }

    /// This mount's client identity at the replicas.
    pub(super) fn client_id(&self) -> u64 {
        self.client_id
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One ordered call (no retry).
    pub(super) fn ordered(&self, req: &FsRequest) -> Result<FsResult, TransportError> {
        self.send(req, false)
    }

    /// One call, on the read-only path or the ordered one (no retry).
    fn send(&self, req: &FsRequest, read_only: bool) -> Result<FsResult, TransportError> {
        let tracked = self.calls.begin();
        let result = self.client.call(encode(req), read_only, self.timeout);
        self.calls
            .end(tracked, result.as_ref().err().map(|e| e.to_string()));
        match result {
            Ok(bytes) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!("the cluster answers again");
                }
                decode::<FsResult>(&bytes)
                    .ok_or_else(|| TransportError::Malformed(format!("{} bytes", bytes.len())))
            }
            Err(CallError::Timeout(t)) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!("the cluster did not answer within {t:?}; operations fail with EIO until it does");
                }
                Err(TransportError::Timeout(t))
            }
            Err(e) => Err(TransportError::Unreachable(e.to_string())),
        }
    }
}
