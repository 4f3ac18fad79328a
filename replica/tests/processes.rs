//! Four real `bftfs-replica` processes on 127.0.0.1 serve a client through the file service
//! while one of them is killed (SIGKILL) and restarted; the restarted replica catches up.

mod common;

use common::{call, create, mkdir_within, read_dir_within, Cluster, CALL_TIMEOUT};
use replica::driver::client::ClientHandle;
use state_abstraction::fs::{FsOp, FsReply, Handle};
use std::time::{Duration, Instant};

fn content(i: usize) -> Vec<u8> {
    format!("file {i} ").repeat(i % 50 + 1).into_bytes()
}

fn write_files(
    client: &ClientHandle,
    dir: Handle,
    range: std::ops::Range<usize>,
) -> Vec<(usize, Handle)> {
    let mut out = Vec::new();
    for i in range {
        let h = create(client, dir, &format!("f{i}"));
        match call(
            client,
            FsOp::Write {
                h,
                offset: 0,
                data: content(i),
            },
        ) {
            Ok(FsReply::Write { count, .. }) => assert_eq!(count as usize, content(i).len()),
            other => panic!("write f{i}: {other:?}"),
        }
        out.push((i, h));
    }
    out
}

fn check_files(client: &ClientHandle, files: &[(usize, Handle)]) {
    for (i, h) in files {
        match call(
            client,
            FsOp::Read {
                h: *h,
                offset: 0,
                count: 1 << 20,
            },
        ) {
            Ok(FsReply::Read { data, .. }) => assert_eq!(data, content(*i), "content of f{i}"),
            other => panic!("read f{i}: {other:?}"),
        }
    }
}

fn wait_caught_up(cluster: &Cluster, i: usize, deadline: Duration) {
    let start = Instant::now();
    loop {
        let statuses = cluster.statuses();
        let best = replica::driver::status::highest_executed(&statuses);
        if let Some(s) = &statuses[i] {
            if s.last_executed >= best && best > 0 {
                return;
            }
        }
        if start.elapsed() > deadline {
            panic!(
                "replica {i} did not catch up: {statuses:?}\n{}",
                cluster.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn four_processes_serve_a_client_while_one_is_killed_and_restarted() {
    let mut cluster = Cluster::start("bftfs-proc");
    let client = cluster.client();
    let dir = mkdir_within(&client, "work", 0o755, CALL_TIMEOUT, || cluster.logs());
    let mut files = write_files(&client, dir, 0..60);
    check_files(&client, &files);

    // A backup dies; three replicas are still a quorum.
    cluster.kill(2);
    files.extend(write_files(&client, dir, 60..200));
    cluster.restart(2);
    files.extend(write_files(&client, dir, 200..260));
    wait_caught_up(&cluster, 2, Duration::from_secs(60));

    // Now the primary dies: the others change view and go on.
    let primary = (0..4)
        .find(|&j| cluster.status(j).is_some_and(|s| s.primary))
        .expect("a primary");
    cluster.kill(primary);
    files.extend(write_files(&client, dir, 260..300));
    cluster.restart(primary);
    files.extend(write_files(&client, dir, 300..320));
    wait_caught_up(&cluster, primary, Duration::from_secs(60));
    check_files(&client, &files);
    let listing = read_dir_within(&client, dir, CALL_TIMEOUT);
    match listing {
        Ok(FsReply::ReadDir { entries, eof }) => {
            assert!(eof);
            assert_eq!(entries.len(), 320);
        }
        other => panic!("readdir: {other:?}"),
    }
}

#[test]
#[ignore]
fn latency_probe() {
    let cluster = Cluster::start("bftfs-proc");
    let client = cluster.client();
    for i in 0..20 {
        let t = Instant::now();
        let r = call(&client, FsOp::GetAttr { h: Handle::ROOT });
        let a = t.elapsed();
        let t = Instant::now();
        create(&client, Handle::ROOT, &format!("x{i}"));
        eprintln!("getattr {:?} ok={} create {:?}", a, r.is_ok(), t.elapsed());
    }
}

/// A replica that cannot bind its port exits at once; the harness says so at once, with the
/// replica's log, instead of waiting for a replica that is gone.
#[test]
fn a_replica_that_cannot_start_is_reported_at_once() {
    use common::{cluster_dir, free_addresses, spawn_replica, write_json, Processes, N};
    use replica::config::{generate_with_os_random, ProtocolConfig};
    use state_abstraction::ClientId;

    let dir = cluster_dir("bftfs-taken");
    let addresses = free_addresses(N);
    let keys = generate_with_os_random(
        1,
        addresses.clone(),
        &[ClientId(1)],
        ProtocolConfig::default(),
    )
    .expect("keygen");
    let d = dir.path();
    write_json(&d.join("cluster.json"), keys.config.to_json());
    for r in &keys.replicas {
        write_json(&d.join(format!("replica-{}.json", r.id.0)), r.to_json());
    }
    let _holder = std::net::TcpListener::bind(&addresses[1]).expect("take replica 1's port");
    let mut children = Processes(
        (0..N)
            .map(|i| Some(spawn_replica(d, &d.join("cluster.json"), i)))
            .collect(),
    );
    let started = Instant::now();
    let result = replica::localhost::wait_until_serving(
        children.0.iter_mut().map(Option::as_mut),
        &addresses,
        |i| d.join(format!("replica-{i}.log")),
        Duration::from_secs(60),
    );
    let waited = started.elapsed();
    match result {
        Err(replica::localhost::StartError::Exited { id, tail, .. }) => {
            assert_eq!(id, 1, "{tail}");
            assert!(
                tail.contains(&addresses[1]) && tail.contains("in use"),
                "{tail}"
            );
        }
        other => panic!("a replica whose port is taken was not reported: {other:?}"),
    }
    assert!(
        waited < Duration::from_secs(10),
        "noticed only after {waited:?}"
    );
}
