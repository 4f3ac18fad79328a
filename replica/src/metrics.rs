//! Metrics in the Prometheus text format at `GET /metrics`, shared by the replica daemon
//! (`bftfs-replica --metrics-addr`) and the mount (`bftfs mount --metrics`).
//!
//! In: a [`Registry`] the caller filled (histograms it observes into, collectors that read a
//! status snapshot at scrape time). Out: an HTTP listener on a thread of its own that
//! answers `GET /metrics` (and `HEAD`) with the registry encoded by `prometheus-client`, 404
//! for any other path and 405 for other methods, so that a scrape configured with the wrong
//! path fails loudly instead of reading something that looks like metrics.
//!
//! Conventions (the Prometheus project's naming guide): every name starts with `bftfs_`,
//! times are in seconds (`_seconds`), counters end in `_total`, and each process exports
//! `bftfs_build_info{version, component, ...} 1`.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The path Prometheus scrapes by default; the only one served.
pub const METRICS_PATH: &str = "/metrics";

/// Latency buckets in seconds: 100 µs doubling to about 26 s (19 buckets). The low end
/// resolves a read answered on the fast path over loopback, the high end a view change or a
/// call that waits for a replica restart; more buckets would only cost series.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Durations of slow, rare events (view changes, state transfers): 10 ms doubling to about
/// 20 minutes.
pub fn long_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

/// Registers `bftfs_build_info{version, component, byzantine} 1`. `component` says which
/// program serves the metrics (`replica`, `client`); `byzantine` whether the build can
/// misbehave on purpose (test builds only: a production dashboard should never see "true").
pub fn register_build_info(registry: &mut Registry, component: &'static str) {
    let labels: Vec<(&'static str, &'static str)> = vec![
        ("version", env!("CARGO_PKG_VERSION")),
        ("component", component),
        (
            "byzantine",
            if crate::driver::BYZANTINE_AVAILABLE {
                "true"
            } else {
                "false"
            },
        ),
    ];
    registry.register(
        "build",
        "Version and build of this bftfs program (always 1)",
        Info::new(labels),
    );
}

/// The registry in the Prometheus text exposition format (version 0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, registry) {
        // Only a collector can fail (a formatting error); serve what was encoded rather than
        // nothing, and say so once per scrape.
        tracing::warn!(error = %e, "cannot encode every metric");
    }
    out
}

/// A running `/metrics` listener; stops accepting when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    address: std::net::SocketAddr,
}

impl MetricsServer {
    /// Listens on `address` (HOST:PORT) and serves `registry` from a thread of its own.
    pub fn start(address: &str, registry: Arc<Registry>) -> std::io::Result<MetricsServer> {
        let server = tiny_http::Server::http(address).map_err(std::io::Error::other)?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("not an IP listener"))?;
        let server = Arc::new(server);
        let serving = server.clone();
        std::thread::Builder::new()
            .name("bftfs-metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = respond(request.method(), request.url(), &registry);
                    // A scraper that hung up early is its own problem.
                    let _ = request.respond(response);
                }
            })?;
        Ok(MetricsServer {
            server,
            address: bound,
        })
    }

    /// The address it listens on (the port chosen, if 0 was asked for).
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

fn respond(
    method: &tiny_http::Method,
    url: &str,
    registry: &Registry,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    use tiny_http::{Header, Method, Response};
    // A query string (`/metrics?x=1`, as some scrapers add) names the same resource.
    let path = url.split('?').next().unwrap_or(url);
    if path != METRICS_PATH {
        return Response::from_string(format!("not found; metrics are at {METRICS_PATH}\n"))
            .with_status_code(404);
    }
    if !matches!(method, Method::Get | Method::Head) {
        let allow = Header::from_bytes(&b"Allow"[..], &b"GET, HEAD"[..]);
        let response = Response::from_string("only GET and HEAD\n").with_status_code(405);
        return match allow {
            Ok(h) => response.with_header(h),
            Err(()) => response,
        };
    }
    let response = Response::from_string(render(registry));
    match Header::from_bytes(
        &b"Content-Type"[..],
        prometheus_text::CONTENT_TYPE.as_bytes(),
    ) {
        Ok(h) => response.with_header(h),
        Err(()) => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(address: std::net::SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(address).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    }

    #[test]
    fn serves_only_get_metrics() {
        let mut registry = Registry::with_prefix("bftfs");
        register_build_info(&mut registry, "test");
        let server = MetricsServer::start("127.0.0.1:0", Arc::new(registry)).expect("listen");
        let ok = get(server.address(), "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            ok.contains(&format!(
                "bftfs_build_info{{version=\"{version}\",component=\"test\","
            )),
            "{ok}"
        );
        let other = get(server.address(), "GET / HTTP/1.0\r\n\r\n");
        assert!(other.starts_with("HTTP/1.0 404"), "{other}");
        let post = get(
            server.address(),
            "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.0 405"), "{post}");
    }
}
