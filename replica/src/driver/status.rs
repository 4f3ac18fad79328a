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
    /// Locks whose content this replica fetched from peers after a state transfer.
    #[serde(default)]
    pub lock_contents_fetched: u64,
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
    /// The Zzyzx locks this replica serves a log for.
    #[serde(default)]
    pub locks: Vec<LockReport>,
    /// How often the core has filled this in: 0 until the core loop runs, which is what
    /// systemd readiness waits for. Local to the process, so not part of the probe answer.
    #[serde(skip)]
    pub updates: u64,
}

/// A lock whose log a replica serves (`bftfs status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReport {
    pub lock: u64,
    /// The client that holds it.
    pub holder: u64,
    /// Entries in its log.
    pub entries: u64,
    /// active, sealed or frozen.
    pub state: String,
}

/// The highest `last_executed` among the replicas that answered (0 if none did): how far the
/// cluster has got, what a lagging replica is measured against.
pub fn highest_executed(statuses: &[Option<ReplicaStatus>]) -> u64 {
    statuses
        .iter()
        .flatten()
        .fold(0, |best, s| best.max(s.last_executed))
}

impl ReplicaStatus {
    pub fn new(id: u32) -> Self {
        ReplicaStatus {
            id,
            pid: std::process::id(),
            ..Default::default()
        }
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
        self.lock_contents_fetched = m.lock_contents_fetched;
        self.misbehaviour_seen = m.misbehaviour;
        self.frames_accepted = auth.counters.accepted.load(Ordering::Relaxed);
        self.frames_rejected = auth.counters.rejected();
        self.dropped_overload =
            counters.dropped_core_queue_full.load(Ordering::Relaxed) + m.requests_dropped;
        self.wal_syncs = counters.wal_syncs.load(Ordering::Relaxed);
        self.new_views = m.new_views_installed;
        let wire = &auth.counters;
        self.auth_failures = wire.unauthenticated.load(Ordering::Relaxed)
            + wire.bad_signature.load(Ordering::Relaxed);
        self.state_transfer_bytes_served =
            counters.state_transfer_bytes_served.load(Ordering::Relaxed);
        self.highest_seen = watch.highest_seq().max(self.last_executed);
        self.lag = self.highest_seen - self.last_executed;
        self.stable_root = hex::encode(replica.stable_checkpoint().service_root.0);
        if let Ok(Some((seq, root))) = counters.last_checkpoint.lock().map(|c| *c) {
            self.last_checkpoint = seq;
            self.last_checkpoint_root = hex::encode(root.0);
        }
        self.peers = watch.reports();
        self.locks = replica
            .lock_logs()
            .into_iter()
            .map(|l| LockReport {
                lock: l.lock.0,
                holder: l.holder.0,
                entries: l.k,
                state: format!("{:?}", l.state).to_lowercase(),
            })
            .collect();
        self.invalid_messages = self.peers.iter().map(|p| p.invalid).sum();
        self.updates += 1;
    }

    /// One line for systemd's `STATUS=` (shown by `systemctl status`): what an operator
    /// checks first, view and progress, and whether this replica is behind or in a view change.
    pub fn systemd_status(&self) -> String {
        let mut line = format!(
            "view {}, executed {}, stable {}, lag {}",
            self.view, self.last_executed, self.stable_checkpoint, self.lag
        );
        if !self.view_active {
            line.push_str(", changing view");
        }
        if self.transferring_state {
            line.push_str(", fetching state");
        }
        line
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Asks the replica at `address` for its status.
pub async fn probe(address: &str, timeout: Duration) -> std::io::Result<ReplicaStatus> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let frame =
            crate::wire::frame(STATUS_PROBE).map_err(|e| std::io::Error::other(e.to_string()))?;
        stream.write_all(&frame).await?;
        let body = super::net::read_frame(&mut stream).await?;
        serde_json::from_slice::<ReplicaStatus>(&body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// What one client (a mount) observed about the replicas, written by the mount process into
/// the cluster directory for `bftfs status` (only clients see the replies replicas send).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClientReport {
    pub client: u64,
    pub pid: u32,
    /// Wall-clock time of the report, in milliseconds since the Unix epoch. A running client
    /// rewrites its report at least every [`CLIENT_REPORT_HEARTBEAT`].
    pub updated_unix_ms: u64,
    pub replicas: Vec<ClientView>,
    /// How the client's own calls fare: the replicas can all look alive while no call
    /// completes, and only the client sees that.
    pub calls: CallReport,
}

/// How often a running client rewrites its report even when nothing changed, so that a
/// report much older than this belongs to a client that stopped (or cannot write it).
pub const CLIENT_REPORT_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// A client's calls to the cluster, as it counts them. Times are milliseconds since the Unix
/// epoch (0: never), so that another process can tell how long ago they were.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CallReport {
    pub completed: u64,
    /// Calls that got no answer in time (the mount returned EIO) or could not be sent.
    pub failed: u64,
    /// Calls that failed since the last one that completed.
    pub failed_in_a_row: u64,
    pub last_completed_unix_ms: u64,
    pub last_failed_unix_ms: u64,
    /// Why the last failed call failed.
    pub last_error: String,
    /// Calls sent and not answered yet, and when the oldest of them was sent.
    pub pending: u64,
    pub oldest_pending_unix_ms: u64,
}

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One replica as a client saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClientView {
    pub id: u32,
    /// Ordered replies that disagreed with the result the client accepted.
    pub disagreeing_replies: u64,
    /// Ordered replies compared with an accepted result.
    pub compared_replies: u64,
    /// Replies that did not authenticate.
    pub auth_failures: u64,
}

/// File name prefix of client reports in a cluster directory.
pub const CLIENT_REPORT_PREFIX: &str = "observed-by-client-";

impl ClientReport {
    pub fn from_observations(client: u64, o: &super::client::ReplicaObservations) -> ClientReport {
        let mut ids: Vec<u32> = o
            .compared_replies
            .keys()
            .chain(o.auth_failures.keys())
            .chain(o.disagreeing_replies.keys())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let get =
            |m: &std::collections::BTreeMap<u32, u64>, id: u32| m.get(&id).copied().unwrap_or(0);
        ClientReport {
            client,
            pid: std::process::id(),
            updated_unix_ms: unix_ms(),
            replicas: ids
                .into_iter()
                .map(|id| ClientView {
                    id,
                    disagreeing_replies: get(&o.disagreeing_replies, id),
                    compared_replies: get(&o.compared_replies, id),
                    auth_failures: get(&o.auth_failures, id),
                })
                .collect(),
            calls: CallReport::default(),
        }
    }

    /// Writes the report atomically as `dir/observed-by-client-<id>.json`.
    pub fn write_to(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let path = dir.join(format!("{CLIENT_REPORT_PREFIX}{}.json", self.client));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(self).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)
    }

    /// Every client report in `dir` (unreadable ones are skipped).
    pub fn read_all(dir: &std::path::Path) -> Vec<ClientReport> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<ClientReport> = entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(CLIENT_REPORT_PREFIX) && n.ends_with(".json"))
            })
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by_key(|r| r.client);
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_status_says_view_progress_and_trouble() {
        let mut s = ReplicaStatus::new(0);
        s.view = 3;
        s.view_active = true;
        s.last_executed = 1234;
        s.stable_checkpoint = 1200;
        s.lag = 7;
        assert_eq!(
            s.systemd_status(),
            "view 3, executed 1234, stable 1200, lag 7"
        );
        s.view_active = false;
        s.transferring_state = true;
        assert_eq!(
            s.systemd_status(),
            "view 3, executed 1234, stable 1200, lag 7, changing view, fetching state"
        );
    }
}
