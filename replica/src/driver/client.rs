//! The client side over TCP: a [`ClientHandle`] that any thread (a FUSE worker, a benchmark)
//! can call; it runs the sans-IO [`crate::client::Client`] on its own runtime thread.
//!
//! Requests beyond the protocol's in-flight window wait in a bounded queue; a call that gets
//! no completed result within its timeout fails with [`CallError::Timeout`] instead of hanging.

use super::audit::ReplyAudit;
use super::net::{self, Backoff};
use crate::client::{Client, ClientAction, Completion, RequestId};
use crate::config::{ClientSecrets, ClusterConfig};
use crate::wire::{Authenticator, ClientMessage, Message, Principal, ReplicaId};
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
}

struct Submit {
    operation: Vec<u8>,
    read_only: bool,
    done: std_mpsc::SyncSender<Result<Vec<u8>, CallError>>,
}

/// A connection to a cluster as one client principal. Cheap to share (`Arc`) between threads.
pub struct ClientHandle {
    submit: mpsc::Sender<Submit>,
    runtime: Option<tokio::runtime::Runtime>,
    operation_bytes_max: usize,
    observed: Arc<Mutex<ReplicaObservations>>,
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
        runtime.spawn(client_task(config, secrets, submit_rx, observed.clone()));
        Ok(ClientHandle {
            submit: submit_tx,
            runtime: Some(runtime),
            operation_bytes_max,
            observed,
        })
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
        let (done, wait) = std_mpsc::sync_channel(1);
        self.submit
            .blocking_send(Submit {
                operation,
                read_only,
                done,
            })
            .map_err(|_| CallError::Closed)?;
        match wait.recv_timeout(timeout) {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(CallError::Timeout(timeout)),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(CallError::Closed),
        }
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
            .send(Submit {
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
    let mut waiting: VecDeque<Submit> = VecDeque::new();
    let mut pending: BTreeMap<RequestId, std_mpsc::SyncSender<Result<Vec<u8>, CallError>>> =
        BTreeMap::new();
    let mut actions = Vec::new();
    let mut completed: Vec<Completion> = Vec::new();
    let mut audit = ReplyAudit::default();
    let mut rejected = 0u64;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut audited = false;
        tokio::select! {
            s = submit_rx.recv(), if waiting.len() < SUBMIT_QUEUE => match s {
                Some(s) => waiting.push_back(s),
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
                        client.on_message(m, &mut actions, &mut completed)
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
            _ = ticker.tick() => client.on_tick(&mut actions),
        }
        // Callers that gave up (timed out) are dropped from the queue before they are sent.
        while client.can_invoke() {
            let Some(s) = waiting.pop_front() else { break };
            match client.invoke(s.operation, s.read_only, &mut actions) {
                Ok(id) => {
                    pending.insert(id, s.done);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "request refused by the client core");
                    let _ = s.done.try_send(Err(CallError::TooLarge(0)));
                }
            }
        }
        for c in completed.drain(..) {
            if !c.read_only {
                audit.on_complete(c.id.0, &c.result);
                audited = true;
            }
            if let Some(done) = pending.remove(&c.id) {
                let _ = done.try_send(Ok(c.result));
            }
        }
        if audited {
            if let Ok(mut o) = observed.lock() {
                o.disagreeing_replies.clone_from(audit.disagreed());
                o.compared_replies.clone_from(audit.compared());
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
