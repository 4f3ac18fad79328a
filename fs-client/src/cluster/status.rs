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
    pub health: String,
    pub lag: Option<u64>,
    /// Whether this replica's checkpoint state digests match the other replicas' at the same
    /// sequence numbers (`None`: it did not answer, or no other replica reported a checkpoint
    /// it could be compared with).
    pub agree: Option<bool>,
    pub status: Option<ReplicaStatus>,
}

/// For each replica, whether its checkpoint roots agree with the others', and if not, at
/// which checkpoint they differ.
///
/// Correct replicas that took a checkpoint at the same sequence number hold the same state
/// digest there, so any difference is a fault. A replica disagrees where more replicas (or
/// as many: then it cannot be told which side is right) report another root at that
/// checkpoint than report its own.
fn agreement(statuses: &[Option<ReplicaStatus>]) -> Vec<(Option<bool>, Option<u64>)> {
    use std::collections::{BTreeMap, BTreeSet};
    let pairs = |s: &ReplicaStatus| -> Vec<(u64, String)> {
        [
            (s.stable_checkpoint, s.stable_root.clone()),
            (s.last_checkpoint, s.last_checkpoint_root.clone()),
        ]
        .into_iter()
        .filter(|(_, root)| !root.is_empty())
        .collect()
    };
    let mut at: BTreeMap<u64, BTreeMap<String, BTreeSet<usize>>> = BTreeMap::new();
    for (i, s) in statuses.iter().enumerate() {
        for (seq, root) in s.as_ref().map(pairs).unwrap_or_default() {
            at.entry(seq)
                .or_default()
                .entry(root)
                .or_default()
                .insert(i);
        }
    }
    statuses
        .iter()
        .map(|s| {
            let Some(s) = s else { return (None, None) };
            let mut compared = false;
            for (seq, root) in pairs(s) {
                let roots = &at[&seq];
                let own = roots.get(&root).map_or(0, BTreeSet::len);
                let other = roots
                    .iter()
                    .filter(|(r, _)| **r != root)
                    .map(|(_, who)| who.len())
                    .max()
                    .unwrap_or(0);
                if other > 0 && other >= own {
                    return (Some(false), Some(seq));
                }
                compared |= own > 1 || other > 0;
            }
            (compared.then_some(true), None)
        })
        .collect()
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
    let agreement = agreement(&statuses);
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
        .zip(agreement)
        .map(|((r, (status, silent)), (agree, differs_at))| {
            let lag = status
                .as_ref()
                .map(|s| best.saturating_sub(s.last_executed));
            let health = match &status {
                None if silent => "not answering".into(),
                None => "down".into(),
                Some(_) if agree == Some(false) => format!(
                    "state differs from the others' at checkpoint {}",
                    differs_at.unwrap_or(0)
                ),
                Some(s) if s.transferring_state => "catching up (state transfer)".into(),
                Some(s) if !s.view_active => "changing view".into(),
                Some(s) if common_view.is_some_and(|v| v != s.view) => "in another view".into(),
                // A few batches behind is normal in flight; more is lag.
                Some(_) if lag.unwrap_or(0) > 64 => "lagging".into(),
                Some(_) => "ok".into(),
            };
            ReplicaReport {
                id: r.id.0,
                address: r.address.clone(),
                status,
                lag,
                agree,
                health,
            }
        })
        .collect()
}

pub fn print_reports(reports: &[ReplicaReport]) {
    println!(
        "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>5} {:>9} {:>6}  health",
        "replica",
        "address",
        "pid",
        "role",
        "view",
        "executed",
        "stable cp",
        "lag",
        "agree",
        "rejected",
        "xfers"
    );
    for r in reports {
        match &r.status {
            Some(s) => println!(
                "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>5} {:>9} {:>6}  {}",
                r.id,
                r.address,
                s.pid,
                if s.primary { "primary" } else { "backup" },
                s.view,
                s.last_executed,
                s.stable_checkpoint,
                r.lag.unwrap_or(0),
                match r.agree {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "-",
                },
                s.frames_rejected,
                s.state_transfers,
                r.health
            ),
            None => println!(
                "{:<8} {:<22} {:>8} {:<8} {:>6} {:>10} {:>10} {:>6} {:>5} {:>9} {:>6}  {}",
                r.id, r.address, "-", "-", "-", "-", "-", "-", "-", "-", "-", r.health
            ),
        }
    }
    print_locks(reports);
}

/// The Zzyzx locks the replicas serve: one line per lock, with how many replicas serve it,
/// the longest log among them, and the answering replicas that do not serve it (a replica
/// that caught up by state transfer while the lock was active lacks its content until the
/// lock merges, and takes no part in it meanwhile).
fn print_locks(reports: &[ReplicaReport]) {
    let lines = lock_lines(reports);
    if lines.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<6} {:>8} {:>9} {:>9}  state",
        "lock", "holder", "entries", "replicas"
    );
    for line in lines {
        println!("{line}");
    }
}

fn lock_lines(reports: &[ReplicaReport]) -> Vec<String> {
    let mut locks: std::collections::BTreeMap<u64, (u64, u64, Vec<u32>, Vec<String>)> =
        Default::default();
    let answering: Vec<u32> = reports
        .iter()
        .filter(|r| r.status.is_some())
        .map(|r| r.id)
        .collect();
    for r in reports {
        let Some(s) = r.status.as_ref() else {
            continue;
        };
        for l in &s.locks {
            let e = locks
                .entry(l.lock)
                .or_insert((l.holder, 0, Vec::new(), Vec::new()));
            e.1 = e.1.max(l.entries);
            e.2.push(r.id);
            if !e.3.contains(&l.state) {
                e.3.push(l.state.clone());
            }
        }
    }
    locks
        .into_iter()
        .map(|(lock, (holder, entries, serving, states))| {
            let missing: Vec<String> = answering
                .iter()
                .filter(|id| !serving.contains(id))
                .map(|id| id.to_string())
                .collect();
            let without = if missing.is_empty() {
                String::new()
            } else {
                format!(" (not served by replica {})", missing.join(", "))
            };
            format!(
                "{lock:<6} {holder:>8} {entries:>9} {:>9}  {}{without}",
                serving.len(),
                states.join(",")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock one answering replica does not serve is named with it; a replica that did
    /// not answer is not blamed.
    #[test]
    fn lock_lines_name_the_replicas_that_do_not_serve_a_lock() {
        let lock = |entries: u64| replica::driver::status::LockReport {
            lock: 2,
            holder: 1,
            entries,
            state: "active".into(),
        };
        let report =
            |id: u32, locks: Option<Vec<replica::driver::status::LockReport>>| ReplicaReport {
                id,
                address: String::new(),
                health: "ok".into(),
                lag: None,
                agree: None,
                status: locks.map(|locks| ReplicaStatus {
                    locks,
                    ..Default::default()
                }),
            };
        let reports = vec![
            report(0, Some(vec![lock(10)])),
            report(1, Some(vec![lock(12)])),
            report(2, None),
            report(3, Some(Vec::new())),
        ];
        let lines = lock_lines(&reports);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("2             1        12         2  active"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].ends_with("(not served by replica 3)"),
            "{}",
            lines[0]
        );
        let all = vec![
            report(0, Some(vec![lock(1)])),
            report(1, Some(vec![lock(1)])),
        ];
        assert!(!lock_lines(&all)[0].contains("not served"));
    }

    fn at(stable: (u64, &str), last: (u64, &str)) -> Option<ReplicaStatus> {
        Some(ReplicaStatus {
            stable_checkpoint: stable.0,
            stable_root: stable.1.into(),
            last_checkpoint: last.0,
            last_checkpoint_root: last.1.into(),
            ..Default::default()
        })
    }

    #[test]
    fn checkpoint_roots_agree_or_not() {
        // All alike; one down.
        let same = vec![
            at((64, "a"), (128, "b")),
            at((64, "a"), (128, "b")),
            None,
            at((64, "a"), (64, "a")),
        ];
        assert_eq!(
            agreement(&same),
            vec![
                (Some(true), None),
                (Some(true), None),
                (None, None),
                (Some(true), None)
            ]
        );
        // Replica 2 holds another state at 128 than the two others there.
        let one_off = vec![
            at((64, "a"), (128, "b")),
            at((64, "a"), (128, "b")),
            at((64, "a"), (128, "X")),
            at((64, "a"), (64, "a")),
        ];
        let got = agreement(&one_off);
        assert_eq!(got[2], (Some(false), Some(128)));
        assert_eq!(got[0], (Some(true), None));
        // A replica with nothing in common with any other cannot be judged.
        let alone = vec![at((0, ""), (0, "")), at((64, "a"), (64, "a"))];
        assert_eq!(agreement(&alone), vec![(None, None), (None, None)]);
        // A tie: neither side can be believed.
        let tie = vec![at((64, "a"), (64, "a")), at((64, "b"), (64, "b"))];
        assert_eq!(
            agreement(&tie),
            vec![(Some(false), Some(64)), (Some(false), Some(64))]
        );
    }
}
