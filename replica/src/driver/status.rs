//! What a replica reports about itself to `bftfs status`: over the network, a connection that
//! sends the probe frame gets one JSON frame back (no secrets, nothing the protocol relies
//! on, so it needs no authentication), and the daemon also writes it to its data directory.

use super::node::DriverCounters;
use crate::core::Replica;
use crate::wire::Authenticator;
use serde::{Deserialize, Serialize};
use state_abstraction::Service;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The body of a status probe frame.
pub const STATUS_PROBE: &[u8] = b"bftfs-status-probe-v1";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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
}

impl ReplicaStatus {
    pub fn new(id: u32) -> Self {
        ReplicaStatus { id, pid: std::process::id(), ..Default::default() }
    }

    pub fn update<S: Service>(&mut self, replica: &Replica<S>, auth: &Authenticator, counters: &DriverCounters) {
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
