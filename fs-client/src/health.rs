//! The verdict at the top of `bftfs status`: whether the cluster serves, from what the
//! replicas report, what the others suspect them of, and how the clients' calls fare.
//!
//! In: the replicas' reports ([`ReplicaReport`]), the suspects, the client reports that
//! matter (the mount's own for `status MOUNTPOINT`, every recent one for `--config`) and, for
//! a mount, whether its process runs. Out: [`Health`] (also the exit status) and the reasons.
//!
//! A replica's word about itself decides nothing here beyond "I answer and I am in view v":
//! whether a quorum exists is counted across replicas, and whether calls complete is what the
//! clients saw.

use crate::cluster::{ReplicaReport, Suspect};
use replica::config::ClusterConfig;
use replica::driver::status::{ClientReport, ReplicaStatus, CLIENT_REPORT_HEARTBEAT};
use serde::Serialize;

/// Worst first in the ordering, so the verdict is the maximum of its parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    /// Every replica answers, in one active view, none far behind or suspected; calls
    /// complete.
    Ok,
    /// A quorum serves, but some replica is down, lagging, changing view alone or suspected:
    /// one more fault may stop the file system.
    Degraded,
    /// No quorum in an active view (a view change that does not complete, too many replicas
    /// down or unreachable), or the clients' calls fail or hang.
    Stuck,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Stuck => "stuck",
        }
    }

    /// `bftfs status`'s exit status (see its `--help`).
    pub fn exit_code(self) -> i32 {
        match self {
            Health::Ok => 0,
            Health::Degraded => 1,
            Health::Stuck => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub health: Health,
    /// Why it is not ok, worst first.
    pub reasons: Vec<(Health, String)>,
}

impl Verdict {
    fn new() -> Verdict {
        Verdict {
            health: Health::Ok,
            reasons: Vec::new(),
        }
    }

    fn add(&mut self, health: Health, why: String) {
        self.health = self.health.max(health);
        self.reasons.push((health, why));
    }

    fn sorted(mut self) -> Verdict {
        self.reasons.sort_by_key(|r| std::cmp::Reverse(r.0));
        self
    }
}

/// A call unanswered this long means the cluster is not serving: calls normally take
/// milliseconds, and a view change after a crashed primary a few seconds.
pub const CALL_HANGS_MS: u64 = 10_000;
/// A failed call older than this (with none since) no longer speaks for the present.
pub const FAILURE_RECENT_MS: u64 = 60_000;

/// The active view with the most replicas in it (the higher view on a tie), and how many.
pub fn largest_active_view<'a>(
    statuses: impl Iterator<Item = &'a ReplicaStatus>,
) -> Option<(u64, usize)> {
    let mut counts = std::collections::BTreeMap::<u64, usize>::new();
    for s in statuses.filter(|s| s.view_active) {
        *counts.entry(s.view).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(view, count)| (count, view))
}

/// The state of the `bftfs` process behind a mount point.
#[derive(Clone, Copy, Debug)]
pub struct MountState {
    pub running: bool,
    pub mounted: bool,
}

/// Client reports that speak for the present: written within a few heartbeats of `now_ms`.
pub fn fresh_clients(clients: &[ClientReport], now_ms: u64) -> Vec<&ClientReport> {
    let limit = 5 * CLIENT_REPORT_HEARTBEAT.as_millis() as u64;
    clients
        .iter()
        .filter(|c| now_ms.saturating_sub(c.updated_unix_ms) <= limit)
        .collect()
}

/// The verdict for a cluster of `config` (replicated: f ≥ 1) or for an unreplicated mount
/// (`config` None).
pub fn verdict(
    config: Option<&ClusterConfig>,
    reports: &[ReplicaReport],
    suspects: &[Suspect],
    clients: &[&ClientReport],
    mount: Option<MountState>,
    now_ms: u64,
) -> Verdict {
    let mut v = Verdict::new();
    match mount {
        Some(MountState { running: false, mounted: true }) => v.add(
            Health::Stuck,
            "the bftfs process serving the mount is not running (`bftfs up` again detaches the dead mount and mounts)".into(),
        ),
        Some(MountState { running: false, mounted: false }) => {
            v.add(Health::Stuck, "stopped: nothing serves the mount point".into())
        }
        Some(MountState { running: true, mounted: false }) => {
            v.add(Health::Degraded, "the mount is starting or stopping".into())
        }
        _ => {}
    }
    if let Some(config) = config {
        replicas_verdict(&mut v, config, reports, suspects);
    }
    for c in clients {
        calls_verdict(&mut v, c, now_ms);
    }
    v.sorted()
}

fn replicas_verdict(
    v: &mut Verdict,
    config: &ClusterConfig,
    reports: &[ReplicaReport],
    suspects: &[Suspect],
) {
    let n = config.n();
    let quorum = 2 * config.f as usize + 1;
    let answering: Vec<&ReplicaStatus> = reports.iter().filter_map(|r| r.status.as_ref()).collect();
    if answering.is_empty() {
        v.add(
            Health::Stuck,
            format!("unreachable: none of the {n} replicas answers"),
        );
        return;
    }
    match largest_active_view(answering.iter().copied()) {
        None => v.add(
            Health::Stuck,
            format!(
                "no replica has an active view: the {} that answer are changing view, and a view needs {quorum} to complete",
                answering.len()
            ),
        ),
        Some((view, count)) if count < quorum => v.add(
            Health::Stuck,
            format!(
                "no quorum: {count} of {n} replicas share an active view (view {view}); a quorum needs {quorum}"
            ),
        ),
        Some(_) => {}
    }
    for r in reports.iter().filter(|r| r.health != "ok") {
        v.add(Health::Degraded, format!("replica {}: {}", r.id, r.health));
    }
    for s in suspects {
        v.add(
            Health::Degraded,
            format!("replica {} is suspected (see suspects)", s.id),
        );
    }
}

fn calls_verdict(v: &mut Verdict, c: &ClientReport, now_ms: u64) {
    let calls = &c.calls;
    if calls.pending > 0 && calls.oldest_pending_unix_ms > 0 {
        let waited = now_ms.saturating_sub(calls.oldest_pending_unix_ms);
        if waited >= CALL_HANGS_MS {
            v.add(
                Health::Stuck,
                format!(
                    "client {} (pid {}): a call has waited {} s for an answer ({} waiting)",
                    c.client,
                    c.pid,
                    waited / 1000,
                    calls.pending
                ),
            );
        }
    }
    let failed_last = calls.failed_in_a_row > 0
        && calls.last_failed_unix_ms >= calls.last_completed_unix_ms
        && now_ms.saturating_sub(calls.last_failed_unix_ms) <= FAILURE_RECENT_MS;
    if failed_last {
        v.add(
            Health::Stuck,
            format!(
                "client {} (pid {}): its last {} call{} failed (EIO), the latest {} s ago: {}",
                c.client,
                c.pid,
                calls.failed_in_a_row,
                if calls.failed_in_a_row == 1 { "" } else { "s" },
                now_ms.saturating_sub(calls.last_failed_unix_ms) / 1000,
                calls.last_error
            ),
        );
    }
}

/// The verdict as `bftfs status --json` shows it, flattened into the status object:
/// `"health":"…","exit_code":N,"reasons":[…]`.
#[derive(Serialize)]
pub struct VerdictJson<'a> {
    pub health: &'static str,
    pub exit_code: i32,
    pub reasons: Vec<&'a str>,
}

impl<'a> From<&'a Verdict> for VerdictJson<'a> {
    fn from(v: &'a Verdict) -> Self {
        VerdictJson {
            health: v.health.as_str(),
            exit_code: v.health.exit_code(),
            reasons: v.reasons.iter().map(|(_, why)| why.as_str()).collect(),
        }
    }
}

/// `health:      stuck` and one indented line per reason.
pub fn print(v: &Verdict) {
    println!("health:      {}", v.health.as_str());
    for (_, why) in &v.reasons {
        println!("             - {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::suspect_tests::config;
    use replica::driver::status::CallReport;

    /// Replica i in `views[i]` (None: down; Some((view, active))).
    fn reports(views: &[Option<(u64, bool)>]) -> Vec<ReplicaReport> {
        views
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let status = v.map(|(view, active)| ReplicaStatus {
                    id: i as u32,
                    view,
                    view_active: active,
                    ..Default::default()
                });
                ReplicaReport {
                    id: i as u32,
                    address: String::new(),
                    health: match v {
                        None => "down",
                        Some((_, false)) => "changing view",
                        Some(_) => "ok",
                    }
                    .into(),
                    agree: None,
                    lag: status.as_ref().map(|_| 0),
                    status,
                }
            })
            .collect()
    }

    fn judge(views: &[Option<(u64, bool)>], clients: &[&ClientReport]) -> Verdict {
        verdict(
            Some(&config()),
            &reports(views),
            &[],
            clients,
            None,
            100_000,
        )
    }

    #[test]
    fn replicas_decide_ok_degraded_and_stuck() {
        let all = Some((3, true));
        assert_eq!(judge(&[all, all, all, all], &[]), Verdict::new());

        let one_down = judge(&[all, None, all, all], &[]);
        assert_eq!(one_down.health, Health::Degraded, "{one_down:?}");
        assert_eq!(one_down.reasons[0].1, "replica 1: down");

        let two_down = judge(&[all, None, None, all], &[]);
        assert_eq!(two_down.health, Health::Stuck, "{two_down:?}");
        assert!(
            two_down.reasons[0].1.starts_with("no quorum: 2 of 4"),
            "{two_down:?}"
        );

        // The case: everyone changing view forever.
        let changing = Some((4, false));
        let v = judge(&[changing, changing, changing, changing], &[]);
        assert_eq!(v.health, Health::Stuck, "{v:?}");
        assert!(
            v.reasons[0].1.starts_with("no replica has an active view"),
            "{v:?}"
        );

        // Split across views: no view holds 2f+1.
        let v = judge(
            &[
                Some((3, true)),
                Some((3, true)),
                Some((4, true)),
                Some((4, true)),
            ],
            &[],
        );
        assert_eq!(v.health, Health::Stuck, "{v:?}");

        let v = judge(&[None, None, None, None], &[]);
        assert_eq!(v.health, Health::Stuck);
        assert!(v.reasons[0].1.starts_with("unreachable"), "{v:?}");
    }

    #[test]
    fn clients_whose_calls_fail_or_hang_make_it_stuck() {
        let all = Some((0, true));
        let mut c = ClientReport {
            client: 1,
            pid: 7,
            updated_unix_ms: 100_000,
            ..Default::default()
        };
        assert_eq!(judge(&[all, all, all, all], &[&c]).health, Health::Ok);

        c.calls = CallReport {
            pending: 2,
            oldest_pending_unix_ms: 100_000 - 12_000,
            ..Default::default()
        };
        let v = judge(&[all, all, all, all], &[&c]);
        assert_eq!(v.health, Health::Stuck, "{v:?}");
        assert!(v.reasons[0].1.contains("has waited 12 s"), "{v:?}");

        c.calls = CallReport {
            failed: 3,
            failed_in_a_row: 3,
            last_completed_unix_ms: 10_000,
            last_failed_unix_ms: 95_000,
            last_error: "no answer within 30s".into(),
            ..Default::default()
        };
        let v = judge(&[all, all, all, all], &[&c]);
        assert_eq!(v.health, Health::Stuck, "{v:?}");
        assert!(v.reasons[0].1.contains("last 3 calls failed"), "{v:?}");

        // Long ago, and nothing since: the present is judged by the replicas.
        c.calls.last_failed_unix_ms = 20_000;
        assert_eq!(judge(&[all, all, all, all], &[&c]).health, Health::Ok);
        // A call completed after the failures.
        c.calls.failed_in_a_row = 0;
        c.calls.last_completed_unix_ms = 99_000;
        assert_eq!(judge(&[all, all, all, all], &[&c]).health, Health::Ok);
    }

    #[test]
    fn a_dead_mount_process_is_stuck_and_stale_reports_do_not_count() {
        let dead = MountState {
            running: false,
            mounted: true,
        };
        let v = verdict(None, &[], &[], &[], Some(dead), 0);
        assert_eq!(v.health, Health::Stuck);
        let old = ClientReport {
            updated_unix_ms: 1_000,
            ..Default::default()
        };
        let new = ClientReport {
            updated_unix_ms: 99_000,
            ..Default::default()
        };
        let all = [old, new.clone()];
        assert_eq!(fresh_clients(&all, 100_000), vec![&new]);
        assert_eq!(Health::Degraded.exit_code(), 1);
        assert!(Health::Stuck > Health::Degraded && Health::Degraded > Health::Ok);
    }
}
