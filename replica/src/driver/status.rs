//! What a replica reports about itself to `bftfs status`: over the network, a connection that
//! sends the probe frame gets one JSON frame back (no secrets, nothing the protocol relies
//! on, so it needs no authentication), and the daemon also writes it to its data directory.

use super::node::DriverCounters;
use super::peers::{PeerReport, PeerWatch};
use crate::core::Replica;
use crate::wire::Authenticator;
use serde::{Deserialize, Serialize};
use state_abstraction::Service;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The body of a status probe frame.
pub const STATUS_PROBE: &[u8] = b"bftfs-status-probe-v1";

/// Fields added later default when a status from an older replica is read.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ReplicaStatus {
    pub id: u32,
    pub pid: u32,
    pub view: u64,
    pub view_active: bool,
    pub primary: bool,
    pub last_executed: u64,
    pub stable_checkpoint: u64,
    pub transferring_state: bool,
    pub executed_requests: u64,
    pub view_changes: u64,
    pub state_transfers: u64,
    pub state_transfer_bytes: u64,
    pub misbehaviour_seen: u64,
    pub frames_accepted: u64,
    pub frames_rejected: u64,
    pub dropped_overload: u64,
    pub wal_syncs: u64,
    /// View changes this replica completed (new views installed).
    pub new_views: u64,
    /// Frames whose MAC or signatures did not verify (a subset of `frames_rejected`).
    pub auth_failures: u64,
    /// Messages the core refused as invalid, from any peer.
    pub invalid_messages: u64,
    /// Bytes of state sent to replicas catching up (`state_transfer_bytes` is what this
    /// replica fetched).
    pub state_transfer_bytes_served: u64,
    /// The highest sequence number seen from any peer, and how far execution is behind it.
    pub highest_seen: u64,
    pub lag: u64,
    /// Digest (hex) of the stable checkpoint's service state.
    pub stable_root: String,
    /// The newest checkpoint this replica took, and its service root (hex): equal on
    /// replicas whose state agrees.
    pub last_checkpoint: u64,
    pub last_checkpoint_root: String,
    /// What this replica observes about each other replica.
    pub peers: Vec<PeerReport>,
    /// A replica started with `--byzantine MODE` says so (tests and demos; a really
    /// Byzantine replica would not, which is why `bftfs status` names suspects from what the
    /// others observe).
    pub declared_byzantine: Option<String>,
}

fn hex(d: &state_abstraction::Digest) -> String {
    d.0.iter().map(|b| format!("{b:02x}")).collect()
}

impl ReplicaStatus {
    pub fn new(id: u32) -> Self {
        ReplicaStatus { id, pid: std::process::id(), ..Default::default() }
    }

    pub fn update<S: Service>(
        &mut self,
        replica: &Replica<S>,
        auth: &Authenticator,
        counters: &DriverCounters,
        watch: &PeerWatch,
    ) {
        let m = replica.metrics();
        self.view = replica.view().0;
        self.view_active = replica.is_view_active();
        self.primary = replica.is_primary();
        self.last_executed = replica.last_executed().0;
        self.stable_checkpoint = replica.stable_checkpoint().seq.0;
        self.transferring_state = replica.is_transferring_state();
        self.executed_requests = m.executed_requests;
        self.view_changes = m.view_changes_started;
        self.state_transfers = m.state_transfers;
        self.state_transfer_bytes = m.state_transfer_bytes;
        self.misbehaviour_seen = m.misbehaviour;
        self.frames_accepted = auth.counters.accepted.load(Ordering::Relaxed);
        self.frames_rejected = auth.counters.rejected();
        self.dropped_overload = counters.dropped_core_queue_full.load(Ordering::Relaxed) + m.requests_dropped;
        self.wal_syncs = counters.wal_syncs.load(Ordering::Relaxed);
        self.new_views = m.new_views_installed;
        let wire = &auth.counters;
        self.auth_failures = wire.unauthenticated.load(Ordering::Relaxed) + wire.bad_signature.load(Ordering::Relaxed);
        self.state_transfer_bytes_served = counters.state_transfer_bytes_served.load(Ordering::Relaxed);
        self.highest_seen = watch.highest_seq().max(self.last_executed);
        self.lag = self.highest_seen - self.last_executed;
        self.stable_root = hex(&replica.stable_checkpoint().service_root);
        if let Ok(Some((seq, root))) = counters.last_checkpoint.lock().map(|c| *c) {
            self.last_checkpoint = seq;
            self.last_checkpoint_root = hex(&root);
        }
        self.peers = watch.reports();
        self.invalid_messages = self.peers.iter().map(|p| p.invalid).sum();
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Asks the replica at `address` for its status.
pub async fn probe(address: &str, timeout: Duration) -> std::io::Result<ReplicaStatus> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let frame = crate::wire::frame(STATUS_PROBE).map_err(|e| std::io::Error::other(e.to_string()))?;
        stream.write_all(&frame).await?;
        let body = super::net::read_frame(&mut stream).await?;
        serde_json::from_slice::<ReplicaStatus>(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}
