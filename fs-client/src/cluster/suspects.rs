//! Suspects: the replicas that the other replicas and the clients report as misbehaving or
//! silent.

use super::ReplicaReport;
use replica::config::ClusterConfig;
use replica::driver::status::ClientReport;
use serde::Serialize;

/// A replica that others report as misbehaving or silent, with why; as JSON, one of the
/// `suspects` objects of `bftfs status --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Suspect {
    pub id: u32,
    pub why: Vec<String>,
}

/// A peer silent this much longer than the liveliest other peer is reported.
const SILENCE_MS: u64 = 3000;
/// Messages arriving this late on average (and several times later than the others') are
/// reported.
const LATE_MS: u64 = 100;

/// Names the replicas that the other replicas (and the clients) report as misbehaving or
/// silent. Observations about a replica come only from others: a Byzantine replica's word
/// about itself counts for nothing, and its word about others is one voice among several
/// (hence "seen by K peers").
pub fn suspects(
    config: &ClusterConfig,
    reports: &[ReplicaReport],
    clients: &[ClientReport],
) -> Vec<Suspect> {
    let quorum_of_witnesses = config.f as usize + 1;
    // Views whose primary someone holds proof of equivocation against: conflicting votes in
    // them are the primary's doing, not the voters'.
    let tainted: std::collections::BTreeSet<u64> = reports
        .iter()
        .filter_map(|r| r.status.as_ref())
        .flat_map(|s| {
            s.peers
                .iter()
                .flat_map(|p| p.equivocation_views.iter().copied())
        })
        .collect();
    let mut out = Vec::new();
    for target in config.replicas.iter().map(|r| r.id.0) {
        let mut why = Vec::new();
        // (observer, its report about target, its reports about everyone else)
        let views: Vec<(
            u32,
            &replica::driver::peers::PeerReport,
            Vec<&replica::driver::peers::PeerReport>,
        )> = reports
            .iter()
            .filter(|r| r.id != target)
            .filter_map(|r| {
                let s = r.status.as_ref()?;
                let about = s.peers.iter().find(|p| p.id == target)?;
                Some((
                    r.id,
                    about,
                    s.peers.iter().filter(|p| p.id != target).collect(),
                ))
            })
            .collect();
        let mut tally = |what: &str, count: &dyn Fn(&replica::driver::peers::PeerReport) -> u64| {
            let total: u64 = views.iter().map(|(_, p, _)| count(p)).sum();
            let witnesses = views.iter().filter(|(_, p, _)| count(p) > 0).count();
            if total > 0 {
                why.push(format!(
                    "{total} {what} seen by {witnesses} peer{}",
                    if witnesses == 1 { "" } else { "s" }
                ));
            }
        };
        tally("bad authenticators", &|p| p.auth_failures);
        tally("invalid messages", &|p| p.invalid);
        tally(
            "proofs of equivocation (conflicting signed proposals)",
            &|p| p.equivocations,
        );
        tally(
            "checkpoints disagreeing with the stable certificate",
            &|p| p.checkpoint_mismatches,
        );
        tally(
            "votes for another batch than the primary proposed (it or the primary equivocates)",
            &|p| {
                p.conflicting_votes_by_view
                    .iter()
                    .filter(|(v, _)| !tainted.contains(v))
                    .map(|(_, n)| n)
                    .sum()
            },
        );
        let silent: Vec<u64> = views
            .iter()
            .filter_map(|(_, p, others)| {
                let liveliest = others.iter().filter_map(|o| o.last_message_ms_ago).min()?;
                match p.last_message_ms_ago {
                    // Only once the others have talked for a while: in a new or idle cluster
                    // a correct backup may have had nothing to send yet, while after the
                    // first batch it votes within milliseconds.
                    None => {
                        let talking_for =
                            others.iter().filter_map(|o| o.first_message_ms_ago).max()?;
                        (talking_for >= SILENCE_MS).then_some(u64::MAX)
                    }
                    Some(age) if age >= liveliest + SILENCE_MS => Some(age),
                    _ => None,
                }
            })
            .collect();
        if silent.len() >= quorum_of_witnesses {
            let shortest = silent.iter().min().copied().unwrap_or(u64::MAX);
            let since = if shortest == u64::MAX {
                "never heard from".to_string()
            } else {
                format!("silent for {} s", shortest / 1000)
            };
            why.push(format!(
                "{since} while the others talk, seen by {} peers",
                silent.len()
            ));
        }
        let late: Vec<u64> = views
            .iter()
            .filter_map(|(_, p, others)| {
                let mine = p.lateness_ms?;
                let theirs = others
                    .iter()
                    .filter_map(|o| o.lateness_ms)
                    .max()
                    .unwrap_or(0);
                (mine >= LATE_MS && mine >= 3 * theirs.max(1)).then_some(mine)
            })
            .collect();
        if late.len() >= quorum_of_witnesses {
            let mut sorted = late.clone();
            sorted.sort_unstable();
            why.push(format!(
                "its messages arrive about {} ms after the others', seen by {} peers",
                sorted[sorted.len() / 2],
                late.len()
            ));
        }
        for c in clients {
            if let Some(v) = c.replicas.iter().find(|v| v.id == target) {
                if v.disagreeing_replies > 0 {
                    why.push(format!(
                        "{} of {} replies to client {} disagreed with the agreed result",
                        v.disagreeing_replies, v.compared_replies, c.client
                    ));
                }
                if v.auth_failures > 0 {
                    why.push(format!(
                        "{} replies to client {} did not authenticate",
                        v.auth_failures, c.client
                    ));
                }
            }
        }
        if !why.is_empty() {
            out.push(Suspect { id: target, why });
        }
    }
    out
}

pub fn print_suspects(suspects: &[Suspect]) {
    if suspects.is_empty() {
        println!("suspects:    none");
        return;
    }
    for (i, s) in suspects.iter().enumerate() {
        let label = if i == 0 { "suspects:" } else { "" };
        println!("{label:<12} replica {}: {}", s.id, s.why.join("; "));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use replica::driver::peers::PeerReport;
    use replica::driver::status::{ClientView, ReplicaStatus};

    /// Four replicas (f = 1) with made-up keys.
    pub(crate) fn config() -> ClusterConfig {
        let mut rng = replica::rng::Rng::new(3);
        replica::config::generate(
            1,
            (0..4).map(|i| format!("127.0.0.1:{}", 9100 + i)).collect(),
            &[],
            replica::config::ProtocolConfig::default(),
            &mut |buf: &mut [u8]| rng.fill(buf),
        )
        .expect("config")
        .config
    }

    /// Four replicas that heard from each other 10 ms ago; `about(observer, peer)` adjusts.
    fn reports(about: impl Fn(u32, &mut PeerReport)) -> Vec<ReplicaReport> {
        (0..4u32)
            .map(|me| {
                let peers = (0..4u32)
                    .filter(|p| *p != me)
                    .map(|id| {
                        let mut p = PeerReport {
                            id,
                            last_message_ms_ago: Some(10),
                            first_message_ms_ago: Some(60_000),
                            lateness_ms: Some(2),
                            ..Default::default()
                        };
                        about(me, &mut p);
                        p
                    })
                    .collect();
                let status = ReplicaStatus {
                    id: me,
                    peers,
                    ..Default::default()
                };
                ReplicaReport {
                    id: me,
                    address: String::new(),
                    status: Some(status),
                    lag: Some(0),
                    agree: None,
                    health: "ok".into(),
                }
            })
            .collect()
    }

    fn named(s: &[Suspect]) -> Vec<(u32, String)> {
        s.iter().map(|s| (s.id, s.why.join("; "))).collect()
    }

    #[test]
    fn names_replicas_from_what_the_others_report() {
        let config = config();
        assert!(
            suspects(&config, &reports(|_, _| {}), &[]).is_empty(),
            "a quiet healthy cluster has no suspects"
        );

        let s = suspects(
            &config,
            &reports(|_, p| {
                if p.id == 2 {
                    p.auth_failures = 10
                }
            }),
            &[],
        );
        assert_eq!(
            named(&s),
            vec![(2, "30 bad authenticators seen by 3 peers".to_string())]
        );

        let s = suspects(
            &config,
            &reports(|_, p| {
                if p.id == 2 {
                    p.last_message_ms_ago = None
                }
            }),
            &[],
        );
        assert_eq!(s.len(), 1);
        assert!(
            s[0].id == 2 && s[0].why[0].contains("never heard from"),
            "{s:?}"
        );
        // A new cluster whose other replicas began to talk a moment ago: not yet suspect.
        let s = suspects(
            &config,
            &reports(|_, p| {
                p.first_message_ms_ago = Some(500);
                if p.id == 2 {
                    p.last_message_ms_ago = None;
                    p.first_message_ms_ago = None;
                }
            }),
            &[],
        );
        assert!(s.is_empty(), "{s:?}");

        // Late according to one observer only: not enough witnesses (f+1 = 2).
        let s = suspects(
            &config,
            &reports(|me, p| {
                if p.id == 2 && me == 0 {
                    p.lateness_ms = Some(500)
                }
            }),
            &[],
        );
        assert!(s.is_empty(), "{s:?}");
        let s = suspects(
            &config,
            &reports(|me, p| {
                if p.id == 2 && me != 3 {
                    p.lateness_ms = Some(500)
                }
            }),
            &[],
        );
        assert!(
            s.len() == 1 && s[0].why[0].contains("500 ms after the others'"),
            "{s:?}"
        );

        // Votes in a view whose primary someone proved to equivocate are the primary's doing.
        let s = suspects(
            &config,
            &reports(|me, p| {
                if p.id == 0 && me == 2 {
                    p.equivocations = 1;
                    p.equivocation_views = vec![0];
                }
                if p.id == 1 {
                    p.conflicting_votes = 5;
                    p.conflicting_votes_by_view = vec![(0, 5)];
                }
                if p.id == 3 {
                    p.conflicting_votes = 4;
                    p.conflicting_votes_by_view = vec![(1, 4)];
                }
            }),
            &[],
        );
        let ids: Vec<u32> = s.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![0, 3], "{s:?}");

        // Only clients see lies.
        let client = ClientReport {
            client: 1,
            replicas: vec![ClientView {
                id: 1,
                disagreeing_replies: 7,
                compared_replies: 9,
                auth_failures: 0,
            }],
            ..Default::default()
        };
        let s = suspects(&config, &reports(|_, _| {}), &[client]);
        assert_eq!(
            named(&s),
            vec![(
                1,
                "7 of 9 replies to client 1 disagreed with the agreed result".to_string()
            )]
        );
    }
}
