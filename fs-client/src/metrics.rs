//! A mount's metrics (`bftfs mount --metrics HOST:PORT`, `-o metrics=HOST:PORT`, or `bftfs
//! up --metrics-port`): how long the file service takes to answer each kind of operation,
//! and, for a replicated cluster, how the calls completed and what this client saw of each
//! replica.
//!
//! In: the transport the FUSE adapter would use. Out: the same transport wrapped in
//! [`MeteredTransport`], which times every call by operation kind, and the listener serving
//! `/metrics` (see `replica::metrics`), which lives as long as the mount.
//!
//! Times are of the calls the adapter makes to the file service, retries included: what a
//! `stat` or a `close` waits for when it must ask the replicas. Calls the kernel or this
//! process answer from their caches (attributes within `attr_timeout`, buffered writes) are
//! not calls, so they are not counted.

use crate::cluster::ReplicatedTransport;
use crate::transport::{FsTransport, TransportError};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use replica::metrics::{latency_histogram, MetricsServer};
use state_abstraction::fs::{Caller, FsRequest, FsResult, Handle};
use std::sync::Arc;
use std::time::Instant;

/// An `op` label: the operation's kind (`FsOp::kind`).
type OpLabel = [(&'static str, &'static str); 1];

/// Per-operation-kind call times and failures.
#[derive(Debug)]
struct CallTimings {
    duration: Family<OpLabel, Histogram, fn() -> Histogram>,
    failures: Family<OpLabel, Counter>,
}

/// A transport whose calls are timed by operation kind.
pub struct MeteredTransport {
    inner: Arc<dyn FsTransport>,
    timings: Arc<CallTimings>,
}

impl FsTransport for MeteredTransport {
    fn call(&self, req: FsRequest) -> Result<FsResult, TransportError> {
        let op = [("op", req.op.kind())];
        let started = Instant::now();
        let result = self.inner.call(req);
        self.timings
            .duration
            .get_or_create(&op)
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.timings.failures.get_or_create(&op).inc();
        }
        result
    }
    fn lock(&self, caller: Caller, h: Handle) -> Result<(), i32> {
        self.inner.lock(caller, h)
    }
    fn unlock(&self, caller: Caller, h: Handle) -> Result<(), i32> {
        self.inner.unlock(caller, h)
    }
    fn release_all(&self) {
        self.inner.release_all()
    }
}

/// What a replicated transport's client saw, read at scrape time.
struct ReplicatedCollector {
    transport: Arc<ReplicatedTransport>,
}

impl std::fmt::Debug for ReplicatedCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicatedCollector")
    }
}

impl Collector for ReplicatedCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = self.transport.figures();
        let o = &figures.observations;
        let mut by_path = e.encode_descriptor(
            "client_completions",
            "Calls completed, by path: fast (3f+1 matching speculative replies), committed \
             (2f+1 after the commit), read_only (2f+1 matching, unordered), locked (through \
             a Zzyzx lock's log)",
            None,
            MetricType::Counter,
        )?;
        for (path, n) in [
            ("fast", o.completed_fast),
            ("committed", o.completed_committed),
            ("read_only", o.completed_read_only),
            ("locked", figures.locked_calls),
        ] {
            ConstCounter::new(n).encode(by_path.encode_family(&[("path", path)])?)?;
        }
        let totals: [(&str, &str, u64); 3] = [
            (
                "client_calls_failed",
                "Calls that got no answer in time or could not be sent (EIO)",
                figures.calls.failed,
            ),
            (
                "client_retransmissions",
                "Requests sent again for want of an answer",
                o.retransmissions,
            ),
            (
                "client_read_only_fallbacks",
                "Read-only requests sent again on the ordered path (replies did not match)",
                o.read_only_fallbacks,
            ),
        ];
        for (name, help, value) in totals {
            let c = ConstCounter::new(value);
            c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges: [(&str, &str, u64); 2] = [
            (
                "client_pending_calls",
                "Calls sent and not answered yet",
                figures.calls.pending,
            ),
            (
                "client_failed_in_a_row",
                "Calls failed since the last one that completed",
                figures.calls.failed_in_a_row,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let per_replica: [(&str, &str, &std::collections::BTreeMap<u32, u64>); 3] = [
            (
                "client_replica_disagreeing_replies",
                "Ordered replies of the replica that disagreed with the accepted result",
                &o.disagreeing_replies,
            ),
            (
                "client_replica_compared_replies",
                "Ordered replies of the replica compared with an accepted result",
                &o.compared_replies,
            ),
            (
                "client_replica_auth_failures",
                "Frames claiming to come from the replica that did not authenticate",
                &o.auth_failures,
            ),
        ];
        for (name, help, map) in per_replica {
            let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            // Every replica, 0 until something is seen: a series that appears only with the
            // first fault would escape `increase()` and alerts on it.
            for replica in 0..figures.replicas {
                let n = map.get(&replica).copied().unwrap_or(0);
                let labels = [("replica", replica.to_string())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Starts serving a mount's metrics at `address` and wraps `transport` to feed them.
/// `replicated` is the same transport when it is the replicated one (its client's
/// figures are exported too). The server stops when the returned handle is dropped.
pub fn serve(
    address: &str,
    transport: Arc<dyn FsTransport>,
    replicated: Option<Arc<ReplicatedTransport>>,
) -> anyhow::Result<(Arc<dyn FsTransport>, MetricsServer)> {
    use anyhow::Context;
    let mut registry = Registry::with_prefix("bftfs");
    replica::metrics::register_build_info(&mut registry, "client");
    let timings = Arc::new(CallTimings {
        duration: Family::new_with_constructor(latency_histogram),
        failures: Family::default(),
    });
    registry.register_with_unit(
        "client_request_duration",
        "Time a call to the file service took, by operation kind (retries included)",
        Unit::Seconds,
        timings.duration.clone(),
    );
    registry.register(
        "client_request_failures",
        "Calls to the file service that failed (EIO), by operation kind",
        timings.failures.clone(),
    );
    if let Some(transport) = replicated {
        registry.register_collector(Box::new(ReplicatedCollector { transport }));
    }
    let server = MetricsServer::start(address, Arc::new(registry))
        .with_context(|| format!("metrics={address}: cannot listen"))?;
    tracing::info!(
        "the mount's metrics are at http://{}/metrics",
        server.address()
    );
    Ok((
        Arc::new(MeteredTransport {
            inner: transport,
            timings,
        }),
        server,
    ))
}
