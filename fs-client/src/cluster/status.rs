//! The per-replica status report of `bftfs status`: every replica probed at once, its health
//! and lag, printed as a table or as JSON (serialised with the status object of `up.rs`).

use replica::config::ClusterConfig;
use replica::driver::status::{probe, ReplicaStatus};
use serde::Serialize;
use std::time::Duration;

/// One replica as `bftfs status` shows it; as JSON, one of the `replicas` objects of
/// `bftfs status --json` (fields in this order).
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaReport {
    pub id: u32,
    pub address: String,
    pub health: &'static str,
    pub lag: Option<u64>,
    pub status: Option<ReplicaStatus>,
}

/// How long `bftfs status` waits for each replica's answer (all are asked at once).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks every replica of `config` for its status, all at once: a stopped replica costs the
/// probe timeout once, not once per replica.
pub fn probe_cluster(config: &ClusterConfig) -> Vec<ReplicaReport> {
    let answers: Vec<std::io::Result<ReplicaStatus>> =
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(async {
                let probes: Vec<_> = config
                    .replicas
                    .iter()
                    .map(|r| {
                        let address = r.address.clone();
                        tokio::spawn(async move { probe(&address, PROBE_TIMEOUT).await })
                    })
                    .collect();
                let mut out = Vec::new();
                for p in probes {
                    out.push(p.await.unwrap_or_else(|e| Err(std::io::Error::other(e))));
                }
                out
            }),
            Err(e) => config
                .replicas
                .iter()
                .map(|_| Err(std::io::Error::new(e.kind(), e.to_string())))
                .collect(),
        };
    // A replica that accepts the connection and never answers (stopped, hung, overloaded) is
    // not the same trouble as one that is gone.
    let silent: Vec<bool> = answers
        .iter()
        .map(|a| matches!(a, Err(e) if e.kind() == std::io::ErrorKind::TimedOut))
        .collect();
    let statuses: Vec<Option<ReplicaStatus>> = answers.into_iter().map(Result::ok).collect();
    let best = statuses
        .iter()
        .flatten()
        .map(|s| s.last_executed)
        .max()
        .unwrap_or(0);
    // The view most replicas are in: a replica in another view is changing views or lagging.
    let common_view = crate::health::largest_active_view(statuses.iter().flatten()).map(|(v, _)| v);
    config
        .replicas
        .iter()
        .zip(statuses.into_iter().zip(silent))
        .map(|(r, (status, silent))| {
            let lag = status
                .as_ref()
                .map(|s| best.saturating_sub(s.last_executed));
            let health = match &status {
                None if silent => "not answering",
                None => "down",
                Some(s) if s.transferring_state => "catching up (state transfer)",
                Some(s) if !s.view_active => "changing view",
                Some(s) if common_view.is_some_and(|v| v != s.view) => "in another view",
                // A few batches behind is normal in flight; more is lag.
                Some(_) if lag.unwrap_or(0) > 64 => "lagging",
                Some(_) => "ok",
            };
            ReplicaReport {
                id: r.id.0,
                address: r.address.clone(),
                status,
                lag,
                health,
            }
        })
        .collect()
}

pub fn print_reports(reports: &[ReplicaReport]) {
    println!(
        "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>9} {:>6}  health",
        "replica",
        "address",
        "pid",
        "role",
        "view",
        "executed",
        "stable cp",
        "lag",
        "rejected",
        "xfers"
    );
    for r in reports {
        match &r.status {
            Some(s) => println!(
                "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>9} {:>6}  {}",
                r.id,
                r.address,
                s.pid,
                if s.primary { "primary" } else { "backup" },
                s.view,
                s.last_executed,
                s.stable_checkpoint,
                r.lag.unwrap_or(0),
                s.frames_rejected,
                s.state_transfers,
                r.health
            ),
            None => println!(
                "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>9} {:>6}  {}",
                r.id, r.address, "-", "-", "-", "-", "-", "-", "-", "-", r.health
            ),
        }
    }
}
