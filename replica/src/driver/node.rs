//! Runs one replica's protocol core over TCP, a write-ahead log and a clock.
//!
//! Threads: a tokio runtime owns the sockets (accepting peers and clients, outbound links to
//! every other replica) and authenticates every frame before it is queued for the core; one
//! ordinary thread owns the core (and through it the service, whose calls block on disk) and
//! the WAL. The core thread steps the core on each message and on each tick, then performs
//! the actions in order: WAL records are appended, and fsync'ed before the first later action
//! that sends anything, so no message that depends on a record leaves before the record is
//! durable.

use super::metrics::{PhaseClock, ReplicaTimings};
use super::net::{self, Backoff};
use super::peers::PeerWatch;
use super::status::{ReplicaStatus, STATUS_PROBE};
use super::wal::Wal;
use crate::config::{ClusterConfig, ReplicaSecrets};
use crate::core::{Action, Event, Notification, Replica, WalRecord};
use crate::wire::{
    self, Authenticated, Authenticator, ClientMessage, Message, Principal, ReplicaId,
    StateTransferMessage,
};
use state_abstraction::Digest;
use state_abstraction::{ClientId, Service};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Messages waiting for the core. Bounded: when the core falls behind, new messages are
/// dropped (and counted) at the socket instead of piling up in memory.
const CORE_QUEUE: usize = 16 * 1024;
/// Frames waiting to go to one peer or client.
const LINK_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "cannot listen on {address}: {source} (is another replica or program using this port?)"
    )]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("replica {0} is not in the cluster config")]
    NotInConfig(u32),
    #[error("write-ahead log {path}: {source}")]
    Wal {
        path: String,
        source: std::io::Error,
    },
    #[error("write-ahead log record {index} does not decode; the log is damaged")]
    WalRecord { index: usize },
    #[error("protocol core: {0}")]
    Core(String),
    #[error("the replica halted: {0}")]
    Halted(String),
}

/// Counters the driver keeps itself (the core's are in `Replica::metrics`).
#[derive(Default)]
pub struct DriverCounters {
    pub dropped_core_queue_full: AtomicU64,
    pub dropped_client_unknown: AtomicU64,
    pub wal_syncs: AtomicU64,
    /// Bytes of state (pieces, tree nodes, reply caches) sent to replicas catching up.
    pub state_transfer_bytes_served: AtomicU64,
    /// The newest checkpoint this replica took: sequence number and service root.
    pub last_checkpoint: Mutex<Option<(u64, Digest)>>,
}

/// Extras of [`run_with`] beyond what every replica needs.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Latency histograms to fill (the replica serves metrics); none: nothing is timed.
    pub timings: Option<Arc<ReplicaTimings>>,
    /// Misbehave on purpose (fault tests; see [`super::byzantine`]).
    #[cfg(feature = "byzantine")]
    pub byzantine: Option<super::byzantine::Mode>,
}

/// What sits on the seal-and-send path: nothing in normal builds, the tampering layer of a
/// Byzantine replica in builds with the `byzantine` feature.
#[cfg(feature = "byzantine")]
type Tamper = Option<super::byzantine::Byzantine>;
#[cfg(not(feature = "byzantine"))]
type Tamper = ();

enum Input {
    Message(Authenticated<Message>),
}

type ClientLinks = Arc<Mutex<BTreeMap<ClientId, mpsc::Sender<Vec<u8>>>>>;

/// Loads the WAL at `wal_path` and restores a replica from it over `service`.
pub fn restore_replica<S: Service>(
    config: Arc<ClusterConfig>,
    secrets: &ReplicaSecrets,
    service: S,
    wal_path: &Path,
) -> Result<(Replica<S>, Wal), NodeError> {
    let (wal, records) = Wal::open(wal_path).map_err(|source| NodeError::Wal {
        path: wal_path.display().to_string(),
        source,
    })?;
    let mut decoded = Vec::with_capacity(records.len());
    for (index, r) in records.iter().enumerate() {
        decoded.push(wire::decode::<WalRecord>(r).map_err(|_| NodeError::WalRecord { index })?);
    }
    tracing::info!(
        records = decoded.len(),
        "restoring from the write-ahead log"
    );
    let replica = Replica::restore(config, secrets, service, decoded)
        .map_err(|e| NodeError::Core(e.to_string()))?;
    Ok((replica, wal))
}

/// Binds the replica's listening socket (separately, so a port in use is reported before
/// anything else starts).
pub fn bind(config: &ClusterConfig, id: ReplicaId) -> Result<std::net::TcpListener, NodeError> {
    let info = config
        .replicas
        .get(id.0 as usize)
        .ok_or(NodeError::NotInConfig(id.0))?;
    bind_at(&info.address)
}

/// Binds the replica's listening socket at `address` rather than the address the config
/// advertises: behind NAT, port forwarding or in a container, the address others reach is
/// not one this host has (`bftfs-replica --listen`).
pub fn bind_at(address: &str) -> Result<std::net::TcpListener, NodeError> {
    let listen_error = |source| NodeError::Listen {
        address: address.to_string(),
        source,
    };
    let listener = std::net::TcpListener::bind(address).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    Ok(listener)
}

/// Runs the replica until it halts or `stop` is set (with `RunOptions::default()` unless the
/// replica is Byzantine on purpose). Blocks the calling thread.
#[allow(clippy::too_many_arguments)]
pub fn run_with<S: Service + Send + 'static>(
    config: Arc<ClusterConfig>,
    secrets: ReplicaSecrets,
    replica: Replica<S>,
    wal: Wal,
    listener: std::net::TcpListener,
    status: Arc<Mutex<ReplicaStatus>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    options: RunOptions,
) -> Result<(), NodeError> {
    let auth = Arc::new(Authenticator::for_replica(&config, &secrets));
    let counters = Arc::new(DriverCounters::default());
    let watch = Arc::new(PeerWatch::new(secrets.id, config.n()));
    #[cfg(feature = "byzantine")]
    let mut tamper: Tamper = options
        .byzantine
        .map(|mode| super::byzantine::Byzantine::new(mode, &secrets));
    #[cfg(not(feature = "byzantine"))]
    let mut tamper: Tamper = ();
    let clock = PhaseClock::new(options.timings.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bftfs-net")
        .build()
        .map_err(|e| NodeError::Core(format!("cannot start the runtime: {e}")))?;
    let (core_tx, core_rx) = std_mpsc::sync_channel::<Input>(CORE_QUEUE);
    let clients: ClientLinks = Arc::new(Mutex::new(BTreeMap::new()));

    // Outbound links to every other replica.
    let me = secrets.id;
    let peers: BTreeMap<ReplicaId, mpsc::Sender<Vec<u8>>> = runtime.block_on(async {
        config
            .replicas
            .iter()
            .filter(|r| r.id != me)
            .map(|r| {
                (
                    r.id,
                    net::spawn_link(
                        r.address.clone(),
                        LINK_QUEUE,
                        Backoff::default(),
                        None,
                        None,
                    ),
                )
            })
            .collect()
    });

    {
        let auth = auth.clone();
        let clients = clients.clone();
        let status = status.clone();
        let counters = counters.clone();
        let watch = watch.clone();
        runtime.spawn(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the listening socket");
                    return;
                }
            };
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        tokio::spawn(serve_connection(
                            stream,
                            peer,
                            auth.clone(),
                            core_tx.clone(),
                            clients.clone(),
                            status.clone(),
                            counters.clone(),
                            watch.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }

    let links = Links {
        auth: &auth,
        peers: &peers,
        clients: &clients,
        counters: &counters,
        watch: &watch,
    };
    let result = core_loop(
        &config,
        replica,
        wal,
        core_rx,
        &links,
        &mut tamper,
        clock,
        &status,
        &stop,
    );
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    auth: Arc<Authenticator>,
    core_tx: std_mpsc::SyncSender<Input>,
    clients: ClientLinks,
    status: Arc<Mutex<ReplicaStatus>>,
    counters: Arc<DriverCounters>,
    watch: Arc<PeerWatch>,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    // Replies to a client go back over the connection its requests came in on.
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(LINK_QUEUE);
    let writer = tokio::spawn(async move {
        let _ = net::write_frames(&mut wr, &mut out_rx).await;
    });
    let mut registered: Option<ClientId> = None;
    let mut rejected = 0u64;
    loop {
        let body = match net::read_frame(&mut rd).await {
            Ok(b) => b,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    auth.counters
                        .oversized
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%peer, error = %e, "closing a connection that sent a bad frame");
                }
                break;
            }
        };
        if body == STATUS_PROBE {
            let report = match status.lock() {
                Ok(s) => s.to_json(),
                Err(_) => break,
            };
            if let Ok(frame) = wire::frame(report.as_bytes()) {
                let _ = out_tx.send(frame).await;
            }
            continue;
        }
        let message = match auth.open(&body) {
            Ok(m) => m,
            Err(e) => {
                watch.on_rejected(wire::claimed_sender(&body));
                rejected += 1;
                // One line for the first few, then rarely: a flood must not become a log flood.
                if rejected <= 3 || rejected % 1000 == 0 {
                    tracing::warn!(%peer, error = %e, kind = e.kind(), rejected, "dropped a frame that did not authenticate");
                }
                continue;
            }
        };
        watch.on_accepted(message.sender(), message.message());
        // Commits with a broken signature found inside a relayed certificate count against
        // the replica they name, as a bad MAC counts against the sender its frame claims.
        for r in message.stripped_commits() {
            watch.on_rejected(Some(Principal::Replica(*r)));
        }
        if let Principal::Client(c) = message.sender() {
            // Every authenticated frame (re)claims the client's reply route, so a replayed
            // hello on another connection cannot keep the replies away from the client.
            if let Ok(mut map) = clients.lock() {
                if !map.get(&c).is_some_and(|tx| tx.same_channel(&out_tx)) {
                    map.insert(c, out_tx.clone());
                }
            }
            registered = Some(c);
            if matches!(message.message(), Message::Client(ClientMessage::Hello)) {
                continue;
            }
        }
        if core_tx.try_send(Input::Message(message)).is_err() {
            counters
                .dropped_core_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(c) = registered {
        if let Ok(mut map) = clients.lock() {
            if map.get(&c).is_some_and(|tx| tx.same_channel(&out_tx)) {
                map.remove(&c);
            }
        }
    }
    drop(out_tx);
    let _ = writer.await;
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Where the core's messages go, and what watches them.
#[derive(Clone, Copy)]
struct Links<'a> {
    auth: &'a Authenticator,
    peers: &'a BTreeMap<ReplicaId, mpsc::Sender<Vec<u8>>>,
    clients: &'a ClientLinks,
    counters: &'a DriverCounters,
    watch: &'a PeerWatch,
}

#[allow(clippy::too_many_arguments)]
fn core_loop<S: Service>(
    config: &ClusterConfig,
    mut replica: Replica<S>,
    mut wal: Wal,
    core_rx: std_mpsc::Receiver<Input>,
    links: &Links<'_>,
    tamper: &mut Tamper,
    mut clock: PhaseClock,
    status: &Mutex<ReplicaStatus>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), NodeError> {
    let tick = Duration::from_nanos(config.protocol.tick_ns.max(1_000_000));
    let mut next_tick = Instant::now() + tick;
    let mut actions = Vec::new();
    let all_replicas: Vec<Principal> = config
        .replica_ids()
        .filter(|r| *r != replica.id())
        .map(Principal::Replica)
        .collect();
    let mut last_status = Instant::now() - Duration::from_secs(1);
    // WAL records made durable, and how many of them the core was told about.
    let (mut persisted, mut reported) = (0u64, 0u64);
    // Performs the actions the core asked for and tells it which records are now durable
    // (a macro: the core is stepped between uses, so a closure could not hold it).
    macro_rules! perform_and_report {
        () => {
            persisted += perform(
                &mut actions,
                &mut wal,
                &all_replicas,
                links,
                tamper,
                &mut clock,
            )?;
            tell_persisted(&mut replica, persisted, &mut reported, &mut actions);
        };
    }
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let wait = next_tick.saturating_duration_since(Instant::now());
        match core_rx.recv_timeout(wait) {
            Ok(Input::Message(m)) => {
                clock.on_input(m.message(), Instant::now());
                replica.step(Event::Message(m), &mut actions)
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        // Take what else is already queued, so that its sends go out together. A step's
        // records are performed, fsync included, before the next step: the core's later
        // decisions assume them durable (rule 3).
        for _ in 0..256 {
            if actions.iter().any(|a| matches!(a, Action::Persist(_))) {
                perform_and_report!();
            }
            match core_rx.try_recv() {
                Ok(Input::Message(m)) => {
                    clock.on_input(m.message(), Instant::now());
                    replica.step(Event::Message(m), &mut actions)
                }
                Err(_) => break,
            }
        }
        if actions.iter().any(|a| matches!(a, Action::Persist(_))) {
            perform_and_report!();
        }
        let now = Instant::now();
        if now >= next_tick {
            replica.step(Event::Tick { now_ns: now_ns() }, &mut actions);
            next_tick += tick;
            if next_tick < now {
                // We fell far behind (a long execution); do not fire a burst of ticks.
                next_tick = now + tick;
            }
        }
        perform_and_report!();
        clock.on_transfer_state(replica.is_transferring_state(), Instant::now());
        if now.duration_since(last_status) >= Duration::from_millis(200) {
            last_status = now;
            if let Ok(mut s) = status.lock() {
                s.update(&replica, links.auth, links.counters, links.watch);
            }
        }
    }
}

/// Tells the core which WAL records are durable, if it does not know yet.
fn tell_persisted<S: Service>(
    replica: &mut Replica<S>,
    persisted: u64,
    reported: &mut u64,
    actions: &mut Vec<Action>,
) {
    if persisted > *reported {
        *reported = persisted;
        replica.step(Event::Persisted { upto: persisted }, actions);
    }
}

/// Performs the actions in order; returns how many WAL records it made durable.
fn perform(
    actions: &mut Vec<Action>,
    wal: &mut Wal,
    all_replicas: &[Principal],
    links: &Links<'_>,
    #[allow(unused_variables)] tamper: &mut Tamper,
    clock: &mut PhaseClock,
) -> Result<u64, NodeError> {
    let mut records = 0u64;
    clock.on_actions(actions, Instant::now());
    let Links {
        auth,
        peers,
        clients,
        counters,
        watch,
    } = *links;
    let wal_error = |source| NodeError::Wal {
        path: "log".into(),
        source,
    };
    let encode_record =
        |record: &WalRecord| wire::encode(record).map_err(|e| NodeError::Core(e.to_string()));
    let mut drained = actions.drain(..).peekable();
    while let Some(action) = drained.next() {
        let (message, to) = match action {
            Action::Persist(record) => {
                let bytes = encode_record(&record)?;
                if matches!(record, WalRecord::Snapshot(_)) {
                    // A snapshot supersedes every earlier record: start the log afresh, with
                    // the batch records that follow it (they belong to it; see `WalRecord`).
                    let mut group = vec![bytes];
                    while let Some(Action::Persist(next)) = drained.peek() {
                        group.push(encode_record(next)?);
                        drained.next();
                    }
                    let started = Instant::now();
                    wal.rewrite(&group).map_err(wal_error)?;
                    counters.wal_syncs.fetch_add(1, Ordering::Relaxed);
                    clock.on_wal_sync(started.elapsed());
                    records += group.len() as u64;
                } else {
                    wal.append(&bytes).map_err(wal_error)?;
                    records += 1;
                }
                continue;
            }
            // The replica's execution stage performed these already.
            Action::Stage(_) => continue,
            Action::Notify(n) => {
                log_notification(&n);
                match &n {
                    Notification::Misbehaviour { from, .. } => watch.on_misbehaviour(*from),
                    Notification::CheckpointStable {
                        seq,
                        service_root,
                        replies_digest,
                    } => watch.on_stable(seq.0, *service_root, *replies_digest),
                    Notification::CheckpointTaken {
                        seq, service_root, ..
                    } => {
                        if let Ok(mut last) = counters.last_checkpoint.lock() {
                            *last = Some((seq.0, *service_root));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            Action::Halt { reason } => return Err(NodeError::Halted(reason)),
            Action::Send { to, message } => (message, Target::Replica(to)),
            Action::Broadcast { message } => (message, Target::AllReplicas),
            Action::SendClient { to, message } => (message, Target::Client(to)),
        };
        // What is sent may depend on records appended before it: make them durable first.
        if wal.has_pending() {
            sync_wal(wal, counters, clock).map_err(wal_error)?;
        }
        // One seal per message: hashed once, one MAC per receiver, the same frame to each link.
        let (receivers, links): (Vec<Principal>, Vec<mpsc::Sender<Vec<u8>>>) = match to {
            Target::Replica(r) => (
                vec![Principal::Replica(r)],
                peers.get(&r).cloned().into_iter().collect(),
            ),
            Target::AllReplicas => (all_replicas.to_vec(), peers.values().cloned().collect()),
            Target::Client(c) => {
                let link = clients.lock().ok().and_then(|m| m.get(&c).cloned());
                if link.is_none() {
                    // Not connected now; the client retransmits and gets the cached reply.
                    counters
                        .dropped_client_unknown
                        .fetch_add(1, Ordering::Relaxed);
                }
                (vec![Principal::Client(c)], link.into_iter().collect())
            }
        };
        if let Message::StateTransfer(m) = &message {
            counters
                .state_transfer_bytes_served
                .fetch_add(state_bytes(m), Ordering::Relaxed);
        }
        // The one place where a Byzantine replica's tampering layer sees what goes out.
        #[cfg(feature = "byzantine")]
        if let Some(byzantine) = tamper.as_mut() {
            byzantine.send(message, receivers.into_iter().zip(links).collect(), auth);
            continue;
        }
        let Some((last, rest)) = links.split_last() else {
            continue;
        };
        match auth.seal(&message, &receivers) {
            Ok(frame) => {
                for link in rest {
                    let _ = link.try_send(frame.clone());
                }
                let _ = last.try_send(frame);
            }
            Err(e) => tracing::error!(error = %e, "cannot seal a message"),
        }
    }
    if wal.has_pending() {
        sync_wal(wal, counters, clock).map_err(wal_error)?;
    }
    Ok(records)
}

/// Makes the appended WAL records durable, counted and timed.
fn sync_wal(wal: &mut Wal, counters: &DriverCounters, clock: &PhaseClock) -> std::io::Result<()> {
    let started = Instant::now();
    wal.sync()?;
    counters.wal_syncs.fetch_add(1, Ordering::Relaxed);
    clock.on_wal_sync(started.elapsed());
    Ok(())
}

/// Bytes of state a state-transfer answer carries.
fn state_bytes(m: &StateTransferMessage) -> u64 {
    match m {
        StateTransferMessage::Piece { bytes, .. } => bytes.len() as u64,
        StateTransferMessage::Replies { table, .. } => table.len() as u64,
        StateTransferMessage::Node { children, .. } => 32 * children.len() as u64,
        StateTransferMessage::PieceDigests { digests, .. } => 32 * digests.len() as u64,
        _ => 0,
    }
}

enum Target {
    Replica(ReplicaId),
    AllReplicas,
    Client(ClientId),
}

fn log_notification(n: &Notification) {
    match n {
        Notification::Executed { .. } | Notification::Speculated { .. } => {}
        Notification::RolledBack { to, from } => {
            tracing::info!(to = to.0, from = from.0, "speculation rolled back")
        }
        Notification::CheckpointTaken {
            seq, service_root, ..
        } => {
            tracing::debug!(seq = seq.0, root = ?service_root, "checkpoint taken")
        }
        Notification::CheckpointStable {
            seq, service_root, ..
        } => {
            tracing::info!(seq = seq.0, root = ?service_root, "checkpoint stable")
        }
        Notification::ViewEntered { view, active } => {
            tracing::info!(view = view.0, active, "view change")
        }
        Notification::StateTransferred { seq, bytes } => {
            tracing::info!(seq = seq.0, bytes, "state transfer finished")
        }
        Notification::Misbehaviour { from, what } => {
            tracing::warn!(?from, what, "misbehaviour detected")
        }
    }
}
