//! A replica's metrics: the status figures (gauges and counters, read from the
//! [`ReplicaStatus`] snapshot at scrape time) and latency histograms per protocol phase.
//!
//! The core is sans-IO and keeps no clock, so the phases are timed here, in the driver's core
//! thread, from what goes in (client requests, pre-prepares) and what comes out (the core's
//! actions and notifications), with `Instant`. [`PhaseClock`] does that; it holds only
//! bounded maps, and a request or batch whose end it never sees is forgotten, not counted.
//!
//! What is measured, on this replica's own clock:
//! - `bftfs_request_duration_seconds{phase}`: from a client request's arrival here to
//!   `pre_prepared` (this primary proposed it), `executed` (it ran committed) and `replied`
//!   (this replica sent its reply or speculative response). Ordered requests reach only the
//!   primary (others see them on retransmission), so most samples come from the primary;
//!   read-only requests reach every replica.
//! - `bftfs_batch_duration_seconds{phase}`: from a batch's pre-prepare (sent by this primary
//!   or received by a backup) to `prepared` (this replica sent its commit), `speculated` (ran
//!   ahead of the commit, fast path) and `executed` (ran committed).
//! - `bftfs_view_change_duration_seconds`: from leaving an active view to entering the next.
//! - `bftfs_checkpoint_stable_duration_seconds`: from taking a checkpoint to its becoming
//!   stable (2f+1 matching checkpoint messages).
//! - `bftfs_state_transfer_duration_seconds`: a state transfer, start to end.
//! - `bftfs_wal_sync_duration_seconds`: one fsync (or atomic rewrite) of the write-ahead log.
//! - `bftfs_batch_requests`: requests per executed batch.

use super::peers::PeerReport;
use super::status::ReplicaStatus;
use crate::core::{Action, Notification};
use crate::metrics::{latency_histogram, long_histogram};
use crate::wire::{AgreementMessage, ClientMessage, Message};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `phase` label.
type Phase = [(&'static str, &'static str); 1];
type PhaseFamily = Family<Phase, Histogram, fn() -> Histogram>;

fn phase(name: &'static str) -> Phase {
    [("phase", name)]
}

/// The histograms the core thread observes into; shared with the registry that serves them.
#[derive(Debug)]
pub struct ReplicaTimings {
    request: PhaseFamily,
    batch: PhaseFamily,
    view_change: Histogram,
    checkpoint_stable: Histogram,
    state_transfer: Histogram,
    wal_sync: Histogram,
    batch_requests: Histogram,
}

impl ReplicaTimings {
    /// New histograms, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<ReplicaTimings> {
        let t = ReplicaTimings {
            request: Family::new_with_constructor(latency_histogram),
            batch: Family::new_with_constructor(latency_histogram),
            view_change: long_histogram(),
            checkpoint_stable: latency_histogram(),
            state_transfer: long_histogram(),
            wal_sync: latency_histogram(),
            // 1, 2, 4, ... 1024 requests.
            batch_requests: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
        };
        registry.register_with_unit(
            "request_duration",
            "Time from a client request's arrival at this replica to each phase (pre_prepared, executed, replied)",
            Unit::Seconds,
            t.request.clone(),
        );
        registry.register_with_unit(
            "batch_duration",
            "Time from a batch's pre-prepare to each phase at this replica (prepared, speculated, executed)",
            Unit::Seconds,
            t.batch.clone(),
        );
        for (name, help, histogram) in [
            (
                "view_change_duration",
                "Time from leaving an active view to entering the next one",
                &t.view_change,
            ),
            (
                "checkpoint_stable_duration",
                "Time from taking a checkpoint to its becoming stable",
                &t.checkpoint_stable,
            ),
            (
                "state_transfer_duration",
                "Duration of a state transfer from the other replicas",
                &t.state_transfer,
            ),
            (
                "wal_sync_duration",
                "Duration of one write-ahead log fsync",
                &t.wal_sync,
            ),
        ] {
            registry.register_with_unit(name, help, Unit::Seconds, histogram.clone());
        }
        // Every phase from the start, at 0: a series that appears with its first sample
        // escapes `rate()` over the scrape before it.
        for name in ["pre_prepared", "executed", "replied"] {
            drop(t.request.get_or_create(&phase(name)));
        }
        for name in ["prepared", "speculated", "executed"] {
            drop(t.batch.get_or_create(&phase(name)));
        }
        registry.register(
            "batch_requests",
            "Requests per executed batch",
            t.batch_requests.clone(),
        );
        Arc::new(t)
    }
}

/// Requests and batches followed at once; beyond these the oldest are forgotten. A primary
/// sees at most a few thousand requests in flight (clients' windows), a replica at most a
/// log window of batches.
const REQUESTS_FOLLOWED: usize = 8192;
const BATCHES_FOLLOWED: usize = 4096;
const CHECKPOINTS_FOLLOWED: usize = 64;

#[derive(Clone, Copy)]
struct RequestTimes {
    arrived: Instant,
    read_only: bool,
    pre_prepared: bool,
    executed: bool,
    replied: bool,
}

#[derive(Clone, Copy)]
struct BatchTimes {
    pre_prepared: Instant,
    prepared: bool,
    speculated: bool,
}

/// Times the protocol phases from the core's inputs and actions (see the module doc). All
/// its methods do nothing when the replica serves no metrics.
pub struct PhaseClock {
    timings: Option<Arc<ReplicaTimings>>,
    requests: BTreeMap<(u64, u64), RequestTimes>,
    batches: BTreeMap<u64, BatchTimes>,
    view_change_since: Option<Instant>,
    checkpoints: BTreeMap<u64, Instant>,
    transfer_since: Option<Instant>,
}

impl PhaseClock {
    pub fn new(timings: Option<Arc<ReplicaTimings>>) -> PhaseClock {
        PhaseClock {
            timings,
            requests: BTreeMap::new(),
            batches: BTreeMap::new(),
            view_change_since: None,
            checkpoints: BTreeMap::new(),
            transfer_since: None,
        }
    }

    /// One fsync (or atomic rewrite) of the write-ahead log.
    pub fn on_wal_sync(&self, took: Duration) {
        if let Some(t) = &self.timings {
            t.wal_sync.observe(took.as_secs_f64());
        }
    }

    /// A message about to be stepped into the core.
    pub fn on_input(&mut self, message: &Message, now: Instant) {
        if self.timings.is_none() {
            return;
        }
        match message {
            Message::Client(ClientMessage::Request(r)) => {
                // A retransmission keeps the first arrival: the client has waited since then.
                self.requests
                    .entry((r.body.client.0, r.body.timestamp.0))
                    .or_insert(RequestTimes {
                        arrived: now,
                        read_only: r.body.read_only,
                        pre_prepared: false,
                        executed: false,
                        replied: false,
                    });
                if self.requests.len() > REQUESTS_FOLLOWED {
                    forget_oldest(&mut self.requests, |r| r.arrived);
                }
            }
            Message::Agreement(AgreementMessage::PrePrepare(p)) => {
                self.batch_pre_prepared(p.pre_prepare.body.seq.0, now)
            }
            _ => {}
        }
    }

    /// Whether the core is fetching state, after each step: the core announces the end of a
    /// transfer but not its start.
    pub fn on_transfer_state(&mut self, transferring: bool, now: Instant) {
        let Some(t) = &self.timings else { return };
        match (transferring, self.transfer_since) {
            (true, None) => self.transfer_since = Some(now),
            (false, Some(since)) => {
                t.state_transfer.observe(secs(now, since));
                self.transfer_since = None;
            }
            _ => {}
        }
    }

    /// The core's actions, before they are performed.
    pub fn on_actions(&mut self, actions: &[Action], now: Instant) {
        let Some(t) = self.timings.clone() else {
            return;
        };
        for action in actions {
            match action {
                Action::Broadcast {
                    message: Message::Agreement(AgreementMessage::PrePrepare(p)),
                } => {
                    self.batch_pre_prepared(p.pre_prepare.body.seq.0, now);
                    for r in &p.batch.requests {
                        let key = (r.body.client.0, r.body.timestamp.0);
                        if let Some(times) = self.requests.get_mut(&key) {
                            if !times.pre_prepared {
                                times.pre_prepared = true;
                                observe(&t.request, "pre_prepared", now, times.arrived);
                            }
                        }
                    }
                }
                Action::Broadcast {
                    message: Message::Agreement(AgreementMessage::Commit(c)),
                } => {
                    if let Some(b) = self.batches.get_mut(&c.body.seq.0) {
                        if !b.prepared {
                            b.prepared = true;
                            observe(&t.batch, "prepared", now, b.pre_prepared);
                        }
                    }
                }
                Action::SendClient { to, message } => {
                    let timestamp = match message {
                        Message::Client(ClientMessage::Reply(r)) => r.timestamp,
                        Message::Client(ClientMessage::SpecResponse(s)) => s.reply.timestamp,
                        _ => continue,
                    };
                    let key = (to.0, timestamp.0);
                    if let Some(times) = self.requests.get_mut(&key) {
                        if !times.replied {
                            times.replied = true;
                            observe(&t.request, "replied", now, times.arrived);
                        }
                        if times.executed || times.read_only {
                            self.requests.remove(&key);
                        }
                    }
                }
                Action::Notify(n) => self.on_notification(&t, n, now),
                _ => {}
            }
        }
    }

    fn on_notification(&mut self, t: &ReplicaTimings, n: &Notification, now: Instant) {
        match n {
            Notification::Speculated { seq, .. } => {
                if let Some(b) = self.batches.get_mut(&seq.0) {
                    if !b.speculated {
                        b.speculated = true;
                        observe(&t.batch, "speculated", now, b.pre_prepared);
                    }
                }
            }
            Notification::Executed { seq, requests, .. } => {
                t.batch_requests.observe(requests.len() as f64);
                if let Some(b) = self.batches.remove(&seq.0) {
                    observe(&t.batch, "executed", now, b.pre_prepared);
                }
                for (client, timestamp) in requests {
                    let key = (client.0, timestamp.0);
                    if let Some(times) = self.requests.get_mut(&key) {
                        if !times.executed {
                            times.executed = true;
                            observe(&t.request, "executed", now, times.arrived);
                        }
                        if times.replied {
                            self.requests.remove(&key);
                        }
                    }
                }
            }
            Notification::ViewEntered { active: false, .. } => {
                // A view change that fails over to the next view is still one outage.
                self.view_change_since.get_or_insert(now);
            }
            Notification::ViewEntered { active: true, .. } => {
                if let Some(since) = self.view_change_since.take() {
                    t.view_change.observe(secs(now, since));
                }
                // Batches of the old view that never ran are re-proposed under new numbers'
                // pre-prepares; their first pre-prepare would overstate the new one's phases.
                self.batches.clear();
            }
            Notification::CheckpointTaken { seq, .. } => {
                self.checkpoints.entry(seq.0).or_insert(now);
                while self.checkpoints.len() > CHECKPOINTS_FOLLOWED {
                    self.checkpoints.pop_first();
                }
            }
            Notification::CheckpointStable { seq, .. } => {
                if let Some(taken) = self.checkpoints.remove(&seq.0) {
                    t.checkpoint_stable.observe(secs(now, taken));
                }
                // Older ones will never become stable on their own; nor will their batches run.
                self.checkpoints.retain(|s, _| *s > seq.0);
                self.batches.retain(|s, _| *s > seq.0);
            }
            _ => {}
        }
    }

    fn batch_pre_prepared(&mut self, seq: u64, now: Instant) {
        self.batches.entry(seq).or_insert(BatchTimes {
            pre_prepared: now,
            prepared: false,
            speculated: false,
        });
        while self.batches.len() > BATCHES_FOLLOWED {
            self.batches.pop_first();
        }
    }
}

fn secs(now: Instant, since: Instant) -> f64 {
    now.saturating_duration_since(since).as_secs_f64()
}

fn observe(family: &PhaseFamily, name: &'static str, now: Instant, since: Instant) {
    family.get_or_create(&phase(name)).observe(secs(now, since));
}

/// Drops the entries older than the newest eighth, so that trimming happens once per many
/// insertions, not at each.
fn forget_oldest<K: Ord + Clone, V>(map: &mut BTreeMap<K, V>, at: impl Fn(&V) -> Instant) {
    let mut times: Vec<Instant> = map.values().map(&at).collect();
    times.sort_unstable();
    let keep_from = times[times.len() - times.len() / 8];
    map.retain(|_, v| at(v) >= keep_from);
}

/// The status figures, read from the snapshot the core thread refreshes every 200 ms.
#[derive(Debug)]
pub struct StatusCollector {
    status: Arc<Mutex<ReplicaStatus>>,
}

impl StatusCollector {
    pub fn new(status: Arc<Mutex<ReplicaStatus>>) -> StatusCollector {
        StatusCollector { status }
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: impl prometheus_client::encoding::EncodeGaugeValue + Send + Sync + std::fmt::Debug,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, unit, c.metric_type())?)
}

/// One figure per peer; peers without it (`None`) have no sample.
type PeerFigure = (
    &'static str,
    &'static str,
    bool,
    fn(&PeerReport) -> Option<f64>,
);

/// Per-peer figures: (name, help, counter?, value). Ages and lateness in seconds.
const PER_PEER: [PeerFigure; 7] = [
    (
        "peer_auth_failures",
        "Frames claiming to be from the peer that did not authenticate",
        true,
        |p| Some(p.auth_failures as f64),
    ),
    (
        "peer_invalid_messages",
        "Messages from the peer refused as invalid",
        true,
        |p| Some(p.invalid as f64),
    ),
    (
        "peer_checkpoint_mismatches",
        "Checkpoints of the peer that disagree with the stable certificate",
        true,
        |p| Some(p.checkpoint_mismatches as f64),
    ),
    (
        "peer_equivocations",
        "Proofs that the peer signed conflicting proposals",
        true,
        |p| Some(p.equivocations as f64),
    ),
    (
        "peer_conflicting_votes",
        "Votes of the peer for another batch than the primary proposed",
        true,
        |p| Some(p.conflicting_votes as f64),
    ),
    (
        "peer_last_message_age",
        "Seconds since the peer's last authenticated frame",
        false,
        |p| p.last_message_ms_ago.map(|ms| ms as f64 / 1000.0),
    ),
    (
        "peer_lateness",
        "Average lateness of the peer's commits and checkpoints, in seconds",
        false,
        |p| p.lateness_ms.map(|ms| ms as f64 / 1000.0),
    ),
];

impl Collector for StatusCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(s) = self.status.lock().map(|s| s.clone()) else {
            return Ok(());
        };
        let e = &mut e;
        gauge(e, "view", "Current view", None, s.view)?;
        gauge(
            e,
            "view_active",
            "1 while this replica is in an active view, 0 during a view change",
            None,
            u64::from(s.view_active),
        )?;
        gauge(
            e,
            "primary",
            "1 if this replica is the primary of its view",
            None,
            u64::from(s.primary),
        )?;
        gauge(
            e,
            "last_executed",
            "Last executed sequence number",
            None,
            s.last_executed,
        )?;
        gauge(
            e,
            "stable_checkpoint",
            "Sequence number of the stable checkpoint",
            None,
            s.stable_checkpoint,
        )?;
        gauge(
            e,
            "last_checkpoint",
            "Sequence number of the newest checkpoint this replica took",
            None,
            s.last_checkpoint,
        )?;
        gauge(
            e,
            "highest_seen",
            "Highest sequence number seen from any peer",
            None,
            s.highest_seen,
        )?;
        gauge(
            e,
            "lag",
            "Sequence numbers executed behind the highest seen from a peer",
            None,
            s.lag,
        )?;
        gauge(
            e,
            "transferring_state",
            "1 while this replica fetches state from the others",
            None,
            u64::from(s.transferring_state),
        )?;
        gauge(
            e,
            "lock_logs",
            "Zzyzx locks whose log this replica serves",
            None,
            s.locks.len() as u64,
        )?;
        let counters: [(&str, &str, u64); 14] = [
            (
                "executed_requests",
                "Requests executed",
                s.executed_requests,
            ),
            ("view_changes", "View changes started", s.view_changes),
            ("new_views", "New views installed", s.new_views),
            (
                "state_transfers",
                "State transfers started",
                s.state_transfers,
            ),
            (
                "auth_failures",
                "Frames whose MAC or signatures did not verify",
                s.auth_failures,
            ),
            (
                "frames_accepted",
                "Frames that authenticated",
                s.frames_accepted,
            ),
            (
                "frames_rejected",
                "Frames refused for any reason",
                s.frames_rejected,
            ),
            (
                "invalid_messages",
                "Messages refused as invalid by the protocol core",
                s.invalid_messages,
            ),
            (
                "misbehaviour_detected",
                "Misbehaviour the protocol core detected in peers or clients",
                s.misbehaviour_seen,
            ),
            (
                "requests_dropped",
                "Requests dropped because the core's queues were full",
                s.dropped_overload,
            ),
            ("wal_syncs", "Write-ahead log fsyncs", s.wal_syncs),
            (
                "state_transfer_fetched_bytes",
                "Bytes of state fetched from peers",
                s.state_transfer_bytes,
            ),
            (
                "state_transfer_served_bytes",
                "Bytes of state sent to peers",
                s.state_transfer_bytes_served,
            ),
            (
                "lock_contents_fetched",
                "Locks whose content was fetched from peers after a state transfer",
                s.lock_contents_fetched,
            ),
        ];
        for (name, help, value) in counters {
            counter(e, name, help, None, value)?;
        }
        for (name, help, is_counter, get) in PER_PEER {
            let kind = if is_counter {
                prometheus_client::metrics::MetricType::Counter
            } else {
                prometheus_client::metrics::MetricType::Gauge
            };
            let unit = (!is_counter).then_some(&Unit::Seconds);
            let mut family = e.encode_descriptor(name, help, unit, kind)?;
            for p in &s.peers {
                let Some(v) = get(p) else { continue };
                let labels = [("peer", p.id.to_string())];
                let sample = family.encode_family(&labels)?;
                if is_counter {
                    ConstCounter::new(v as u64).encode(sample)?;
                } else {
                    ConstGauge::new(v).encode(sample)?;
                }
            }
        }
        Ok(())
    }
}

/// A registry for one replica: every name prefixed `bftfs_`, every sample labelled with the
/// replica's id (several replicas of one cluster may share a host and a Prometheus job).
pub fn replica_registry(
    id: u32,
    status: Arc<Mutex<ReplicaStatus>>,
) -> (Registry, Arc<ReplicaTimings>) {
    let mut registry = Registry::with_prefix_and_labels(
        "bftfs",
        [(
            std::borrow::Cow::Borrowed("replica"),
            std::borrow::Cow::Owned(id.to_string()),
        )]
        .into_iter(),
    );
    crate::metrics::register_build_info(&mut registry, "replica");
    registry.register_collector(Box::new(StatusCollector::new(status)));
    let timings = ReplicaTimings::register(&mut registry);
    (registry, timings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Notification;
    use crate::wire::{SeqNo, View};

    fn scrape(registry: &Registry) -> String {
        crate::metrics::render(registry)
    }

    #[test]
    fn status_figures_follow_the_conventions() {
        let mut s = ReplicaStatus::new(2);
        s.auth_failures = 5;
        s.peers = vec![
            PeerReport {
                id: 0,
                auth_failures: 3,
                last_message_ms_ago: Some(1500),
                ..Default::default()
            },
            PeerReport {
                id: 1,
                ..Default::default()
            },
        ];
        let (registry, _) = replica_registry(2, Arc::new(Mutex::new(s)));
        let text = scrape(&registry);
        for want in [
            "bftfs_auth_failures_total{replica=\"2\"} 5",
            "bftfs_peer_auth_failures_total{replica=\"2\",peer=\"0\"} 3",
            "bftfs_peer_last_message_age_seconds{replica=\"2\",peer=\"0\"} 1.5",
            "# TYPE bftfs_request_duration_seconds histogram",
            "# TYPE bftfs_build_info gauge",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
        assert!(
            !text.contains("bftfs_peer_last_message_age_seconds{replica=\"2\",peer=\"1\"}"),
            "{text}"
        );
        assert!(!text.contains("_ms"), "a unit other than seconds:\n{text}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            if line.ends_with(" counter") {
                assert!(line.contains("_total "), "{line}");
            }
        }
    }

    #[test]
    fn phases_are_timed_from_actions() {
        let mut registry = Registry::default();
        let timings = ReplicaTimings::register(&mut registry);
        let mut clock = PhaseClock::new(Some(timings.clone()));
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(30);
        clock.on_actions(
            &[Action::Notify(Notification::ViewEntered {
                view: View(1),
                active: false,
            })],
            t0,
        );
        clock.on_actions(
            &[Action::Notify(Notification::ViewEntered {
                view: View(1),
                active: true,
            })],
            later,
        );

        clock.on_actions(
            &[Action::Notify(Notification::CheckpointTaken {
                seq: SeqNo(128),
                service_root: Default::default(),
                replies_digest: Default::default(),
            })],
            t0,
        );
        clock.on_actions(
            &[Action::Notify(Notification::CheckpointStable {
                seq: SeqNo(128),
                service_root: Default::default(),
                replies_digest: Default::default(),
            })],
            later,
        );

        clock.on_transfer_state(true, t0);
        clock.on_transfer_state(true, later);
        clock.on_transfer_state(false, later);
        let text = scrape(&registry);
        for want in [
            "view_change_duration_seconds_sum 0.03\n",
            "view_change_duration_seconds_count 1\n",
            "checkpoint_stable_duration_seconds_count 1\n",
            "state_transfer_duration_seconds_count 1\n",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
        // Without timings nothing is followed.
        let mut off = PhaseClock::new(None);
        off.on_transfer_state(true, t0);
        assert!(off.transfer_since.is_none());
    }

    #[test]
    fn forgetting_keeps_the_newest() {
        let t0 = Instant::now();
        let mut map: BTreeMap<u32, Instant> = (0..80)
            .map(|i| (i, t0 + Duration::from_millis(u64::from(i))))
            .collect();
        forget_oldest(&mut map, |t| *t);
        assert_eq!(map.len(), 10);
        assert!(map.contains_key(&79) && !map.contains_key(&69));
    }
}
