//! `/metrics` as Prometheus scrapes it: `bftfs up --metrics-port` on a real mount (f=1), each
//! replica and the mount scraped over HTTP before and after a workload, the text parsed with
//! a Prometheus text-format parser; and the Grafana dashboard in packaging/grafana, whose
//! queries must name only metrics that are exported.
//!
//! The cluster is started by a `bftfs` with no `bftfs-replica` beside it, so its replicas run
//! as `bftfs replica`: one installed program is enough.

mod common;

use common::*;
use prometheus_parse::{Scrape, Value};
use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One HTTP/1.0 GET of `path` on 127.0.0.1:`port`: (status line, headers and body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to the metrics port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let status = out.lines().next().unwrap_or_default().to_string();
    (status, out)
}

/// Scrapes `/metrics` on `port`, checks the response and the text the way a scraper relies on
/// it, and parses it.
fn scrape(port: u16) -> Scrape {
    let (status, response) = http_get(port, "/metrics");
    assert!(
        status.contains(" 200 "),
        "port {port}: {status}\n{response}"
    );
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("port {port}: no body in {response}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "port {port}: {head}"
    );
    let parsed =
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format");
    // Every sample belongs to a family declared with # HELP (and # TYPE) before it, and every
    // value is a number: what the parser leaves to us.
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line
            .split(['{', ' '])
            .next()
            .unwrap_or_else(|| panic!("port {port}: empty sample line"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| parsed.docs.contains_key(*f))
            })
            .unwrap_or(name);
        assert!(
            parsed.docs.contains_key(family),
            "port {port}: {name} has no # HELP:\n{body}"
        );
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN",
            "port {port}: {line}"
        );
        assert!(
            !name.ends_with("_ms") && !name.contains("_ms_"),
            "port {port}: {name} is not in seconds"
        );
    }
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        if line.ends_with(" counter") {
            assert!(line.contains("_total counter"), "port {port}: {line}");
        }
    }
    for s in &parsed.samples {
        if let Value::Histogram(buckets) = &s.value {
            check_buckets(port, &s.metric, buckets, &parsed);
        }
    }
    parsed
}

/// A histogram has buckets ending at +Inf, cumulative counts, and a +Inf count equal to its
/// `_count`.
fn check_buckets(
    port: u16,
    name: &str,
    buckets: &[prometheus_parse::HistogramCount],
    parsed: &Scrape,
) {
    assert!(buckets.len() > 2, "port {port}: {name} has {buckets:?}");
    let mut sorted = buckets.to_vec();
    sorted.sort_by(|a, b| a.less_than.total_cmp(&b.less_than));
    assert!(sorted.last().is_some_and(|b| b.less_than.is_infinite()));
    assert!(
        sorted.windows(2).all(|w| w[0].count <= w[1].count),
        "port {port}: {name} buckets are not cumulative: {sorted:?}"
    );
    let total = sorted.last().map(|b| b.count).unwrap_or(-1.0);
    let counted = parsed
        .samples
        .iter()
        .filter(|c| c.metric == format!("{name}_count"))
        .map(|c| value(&c.value))
        .collect::<Vec<_>>();
    assert!(
        counted.contains(&total),
        "port {port}: {name}: +Inf bucket {total}, counts {counted:?}"
    );
}

fn value(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        Value::Histogram(b) => b.iter().map(|b| b.count).fold(0.0, f64::max),
        Value::Summary(_) => f64::NAN,
    }
}

/// The value of the sample `name` whose labels include `labels` (summed if several match).
fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| value(&s.value))
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Names a query may use for what `scrape` exports: plain samples by their name, histograms
/// as `_bucket` (and `_sum`/`_count`, which are samples of their own).
fn exported_names(scrape: &Scrape) -> BTreeSet<String> {
    scrape
        .samples
        .iter()
        .map(|s| match s.value {
            Value::Histogram(_) => format!("{}_bucket", s.metric),
            _ => s.metric.clone(),
        })
        .collect()
}

fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/bftfs.json")
}

/// Every `bftfs_...` metric name the dashboard's queries use.
fn dashboard_metric_names() -> BTreeSet<String> {
    let text = fs::read_to_string(dashboard_path()).expect("read the dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 10, "too few queries: {exprs:?}");
    let mut names = BTreeSet::new();
    for expr in exprs {
        // PromQL identifiers; label names and functions never start with `bftfs_`.
        for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if token.starts_with("bftfs_") {
                names.insert(token.to_string());
            }
        }
    }
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_show_throughput_latency_view_changes_lag_and_suspects() {
    let names = dashboard_metric_names();
    for want in [
        "bftfs_executed_requests_total",
        "bftfs_client_request_duration_seconds_bucket",
        "bftfs_request_duration_seconds_bucket",
        "bftfs_view_changes_total",
        "bftfs_lag",
        "bftfs_peer_equivocations_total",
        "bftfs_client_replica_disagreeing_replies_total",
    ] {
        assert!(names.contains(want), "the dashboard does not use {want}");
    }
    let text = fs::read_to_string(dashboard_path()).expect("read");
    assert!(text.contains("histogram_quantile("), "no latency quantile");
}

/// A `bftfs` with nothing beside it: hard-linked (or copied) alone into `dir`.
fn lone_bftfs(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).expect("mkdir");
    let lone = dir.join("bftfs");
    if fs::hard_link(BFTFS, &lone).is_err() {
        fs::copy(BFTFS, &lone).expect("copy bftfs");
    }
    lone
}

#[test]
fn replicas_and_mount_serve_prometheus_metrics() {
    if !replicated_mounts_available("replicas_and_mount_serve_prometheus_metrics") {
        return;
    }
    let (tmp, [mnt, xdg, bin]) = scratch(["mnt", "xdg", "bin"]);
    fs::create_dir(&mnt).expect("mkdir");
    let program = lone_bftfs(&bin);
    // Four replicas, then the mount.
    let base = replica::localhost::free_port_run(5, replica::localhost::fresh_seed())
        .expect("five free ports");
    let port = base.to_string();
    let m = Mounted::at_with(
        &program,
        &mnt,
        &xdg,
        None,
        &["--f", "1", "--metrics-port", &port],
    )
    .expect("up");
    let mount_port = base + 4;
    // The replicas are `bftfs replica` processes of the lone program.
    let status = bftfs(
        &["status".as_ref(), mnt.as_os_str(), "--json".as_ref()],
        &xdg,
    );
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let pids: Vec<u64> = json["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter_map(|r| r["status"]["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 4, "{json}");
    for pid in pids {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let exe = fs::canonicalize(&args[0]).ok();
        assert!(
            exe == fs::canonicalize(&program).ok() && args[1] == "replica",
            "replica {pid} runs {args:?}, not {} replica",
            program.display()
        );
    }

    let before: Vec<Scrape> = (0..5).map(|i| scrape(base + i)).collect();
    for (i, s) in before.iter().enumerate() {
        let component = if i < 4 { "replica" } else { "client" };
        assert_eq!(
            sample(s, "bftfs_build_info", &[("component", component)]),
            Some(1.0),
            "port {}",
            base + i as u16
        );
    }
    // Anything but /metrics is not found.
    let (status, body) = http_get(base, "/");
    assert!(status.contains(" 404 "), "{status}\n{body}");
    let (status, body) = http_get(mount_port, "/metrics/x");
    assert!(status.contains(" 404 "), "{status}\n{body}");

    // A workload of several operation kinds.
    let dir = m.path("work");
    fs::create_dir(&dir).expect("mkdir");
    for i in 0..20 {
        let path = dir.join(format!("f{i}"));
        fs::write(&path, vec![i as u8; 10_000]).expect("write");
        assert_eq!(fs::read(&path).expect("read").len(), 10_000);
        fs::metadata(&path).expect("stat");
    }
    assert_eq!(fs::read_dir(&dir).expect("readdir").count(), 20);
    fs::remove_file(dir.join("f0")).expect("unlink");

    // The replicas' figures trail execution by up to 200 ms, the commit after a fast-path
    // reply a little more.
    let started = Instant::now();
    let after = loop {
        let after: Vec<Scrape> = (0..5).map(|i| scrape(base + i)).collect();
        let executed_everywhere = (0..4).all(|i| {
            sample(&after[i], "bftfs_executed_requests_total", &[])
                > sample(&before[i], "bftfs_executed_requests_total", &[])
                && sample(
                    &after[i],
                    "bftfs_batch_duration_seconds_count",
                    &[("phase", "executed")],
                )
                .is_some_and(|n| n > 0.0)
        });
        if executed_everywhere {
            break after;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "replicas do not report the workload"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    for (i, s) in after.iter().enumerate().take(4) {
        for name in ["bftfs_view", "bftfs_lag", "bftfs_last_executed"] {
            assert!(sample(s, name, &[]).is_some(), "replica {i}: no {name}");
        }
        assert!(
            sample(s, "bftfs_wal_sync_duration_seconds_count", &[]).is_some_and(|n| n > 0.0),
            "replica {i}: no WAL sync timed"
        );
        assert!(
            sample(s, "bftfs_peer_last_message_age_seconds", &[]).is_some(),
            "replica {i}: no peer figures"
        );
    }
    // The requests reach the primary (replica 0 in view 0): it times them to its reply.
    let replied: f64 = after
        .iter()
        .take(4)
        .filter_map(|s| {
            sample(
                s,
                "bftfs_request_duration_seconds_count",
                &[("phase", "replied")],
            )
        })
        .sum();
    assert!(replied >= 20.0, "requests timed to the reply: {replied}");

    let client = &after[4];
    for op in ["write", "lookup", "mkdir", "remove", "readdir"] {
        let n = sample(
            client,
            "bftfs_client_request_duration_seconds_count",
            &[("op", op)],
        );
        assert!(n.is_some_and(|n| n > 0.0), "no {op} calls timed: {n:?}");
    }
    let completed = |s: &Scrape| sample(s, "bftfs_client_completions_total", &[]).unwrap_or(0.0);
    assert!(
        completed(client) > completed(&before[4]),
        "completions did not increase: {} then {}",
        completed(&before[4]),
        completed(client)
    );
    for replica in ["0", "1", "2", "3"] {
        assert!(
            sample(
                client,
                "bftfs_client_replica_disagreeing_replies_total",
                &[("replica", replica)]
            )
            .is_some(),
            "no figures about replica {replica} from the client"
        );
    }

    // Every metric the dashboard queries is exported by a replica or the mount.
    let mut exported = BTreeSet::new();
    for s in &after {
        exported.extend(exported_names(s));
    }
    let missing: Vec<String> = dashboard_metric_names()
        .into_iter()
        .filter(|n| !exported.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}\nexported: {exported:?}"
    );
    m.down();
    drop(tmp);
}

#[test]
fn metrics_port_range_must_fit() {
    let (tmp, [xdg]) = scratch(["xdg"]);
    let out = bftfs(
        &[
            "up".as_ref(),
            tmp.path().join("other").as_os_str(),
            "--metrics-port".as_ref(),
            "65533".as_ref(),
        ],
        &xdg,
    );
    assert!(!out.status.success(), "--metrics-port 65533 accepted");
    assert!(text(&out).contains("within 1..=65535"), "{}", text(&out));
}
