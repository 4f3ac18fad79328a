//! Network partitions with real `bftfs-replica` processes: every replica-to-replica and
//! client-to-replica connection goes through a TCP proxy this test controls, so one replica
//! (a backup, then the primary) can be cut off from everyone and later reconnected. While cut
//! off it falls behind; once reconnected it catches up (past the log window, so by state
//! transfer) and ends at the same executed sequence number and stable checkpoint.
//!
//! Addresses never enter the protocol, so each replica gets its own copy of the cluster config
//! in which the other replicas' addresses are its proxies to them ([`proxy::Mesh`]).

mod common;
mod proxy;

use common::{
    call_within, cluster_dir, create_within, free_addresses, log_tails, mkdir_within, probe,
    read_dir_within, spawn_replica, write_json, Processes, N,
};
use proxy::Mesh;
use replica::config::{generate_with_os_random, ClusterConfig, ProtocolConfig};
use replica::driver::client::ClientHandle;
use replica::driver::status;
use state_abstraction::fs::{FsOp, FsReply, FsResult, Handle};
use state_abstraction::ClientId;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a call may wait for the cluster's answer (a reconnected replica may be busy with
/// a state transfer).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

struct Cluster {
    /// Kept for its `Drop`, which kills the replicas; first, so that this happens before the
    /// directory is removed.
    _children: Processes,
    dir: tempfile::TempDir,
    mesh: Mesh,
    client_config: ClusterConfig,
    client_secrets: replica::config::ClientSecrets,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = cluster_dir("bftfs-partition");
        let real = free_addresses(N);
        // Short checkpoint interval and log window, so a short cut already forces a state
        // transfer rather than a replay of the missed batches.
        let protocol = ProtocolConfig {
            checkpoint_interval: 8,
            log_window: 32,
            ..ProtocolConfig::default()
        };
        let keys =
            generate_with_os_random(1, real.clone(), &[ClientId(1)], protocol).expect("keygen");
        let mesh = Mesh::start(real);
        let d = dir.path();
        for (i, secrets) in keys.replicas.iter().enumerate() {
            let config = mesh.replica_config(&keys.config, i);
            write_json(&d.join(format!("cluster-{i}.json")), config.to_json());
            write_json(&d.join(format!("replica-{i}.json")), secrets.to_json());
        }
        let client_config = mesh.client_config(&keys.config);
        let mut _children = Processes(
            (0..4)
                .map(|i| Some(spawn_replica(d, &d.join(format!("cluster-{i}.json")), i)))
                .collect(),
        );
        _children.wait_serving(d, &mesh.real);
        Cluster {
            dir,
            mesh,
            client_config,
            client_secrets: keys.clients[0].clone(),
            _children,
        }
    }

    fn isolate(&self, k: usize, cut: bool) {
        self.mesh.isolate(k, cut);
    }

    fn client(&self) -> ClientHandle {
        ClientHandle::start(self.client_config.clone(), self.client_secrets.clone())
            .expect("client")
    }

    fn status(&self, i: usize) -> Option<status::ReplicaStatus> {
        probe(&self.mesh.real[i])
    }

    fn statuses(&self) -> Vec<Option<status::ReplicaStatus>> {
        (0..4).map(|i| self.status(i)).collect()
    }

    fn logs(&self) -> String {
        log_tails(self.dir.path(), 12)
    }
}

fn call(client: &ClientHandle, op: FsOp) -> FsResult {
    call_within(client, op, CALL_TIMEOUT)
}

fn write_files(client: &ClientHandle, dir: Handle, prefix: &str, n: usize) {
    for i in 0..n {
        let h = create_within(client, dir, &format!("{prefix}{i}"), CALL_TIMEOUT);
        let data = format!("{prefix} {i} ").repeat(i % 40 + 1).into_bytes();
        assert!(matches!(
            call(client, FsOp::Write { h, offset: 0, data }),
            Ok(FsReply::Write { .. })
        ));
    }
}

/// Waits until all four replicas report the same executed sequence number and stable
/// checkpoint, writing a file now and then so that a replica that missed the last batches
/// hears of newer ones.
fn wait_converged(
    cluster: &Cluster,
    client: &ClientHandle,
    dir: Handle,
    limit: Duration,
) -> Vec<status::ReplicaStatus> {
    static NUDGES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    loop {
        let all = cluster.statuses();
        let agreed = all.iter().all(|s| {
            s.as_ref().is_some_and(|s| {
                let first = all[0].as_ref().expect("replica 0");
                s.last_executed == first.last_executed
                    && s.stable_checkpoint == first.stable_checkpoint
                    && s.view_active
            })
        });
        if agreed {
            return all.into_iter().flatten().collect();
        }
        assert!(
            start.elapsed() < limit,
            "replicas did not converge: {all:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
        if start.elapsed() > Duration::from_secs(3) {
            write_files(
                client,
                dir,
                &format!("nudge{}-", NUDGES.fetch_add(1, Ordering::Relaxed)),
                1,
            );
        }
    }
}

#[test]
fn a_replica_cut_off_and_reconnected_catches_up_backup_then_primary() {
    let cluster = Cluster::start();
    let client = cluster.client();
    let dir = mkdir_within(&client, "work", 0o755, CALL_TIMEOUT, || cluster.logs());
    write_files(&client, dir, "warm", 10);
    wait_converged(&cluster, &client, dir, Duration::from_secs(60));

    for (round, pick_primary) in [(0, false), (1, true)] {
        let all = cluster.statuses();
        let k = (0..4)
            .find(|&i| all[i].as_ref().is_some_and(|s| s.primary == pick_primary))
            .unwrap_or_else(|| panic!("no replica with primary={pick_primary}: {all:?}"));
        let before = all[k].as_ref().expect("status").last_executed;
        cluster.isolate(k, true);
        let t = Instant::now();
        // 60 ordered batches or more: past the log window of 32, so the reconnected replica
        // needs a state transfer.
        write_files(&client, dir, &format!("r{round}-"), 40);
        // A replica's status snapshot is refreshed every 200 ms, so right after the writes it
        // may not show them yet (they can take less than that): poll briefly. The cut-off
        // replica cannot move while cut off, so waiting cannot hide a failure to cut it off.
        let polled = Instant::now();
        let (during, cut_off, others) = loop {
            let during = cluster.statuses();
            let cut_off = during[k]
                .as_ref()
                .expect("the cut-off replica still answers its own status")
                .last_executed;
            let others = during
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != k)
                .filter_map(|(_, s)| s.as_ref().map(|s| s.last_executed))
                .max()
                .unwrap_or(0);
            if cut_off + 32 < others || polled.elapsed() > Duration::from_secs(5) {
                break (during, cut_off, others);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!("round {round}: replica {k} (primary: {pick_primary}) cut off for {:?}: it executed {before} -> {cut_off}, the others {others}", t.elapsed());
        assert!(
            cut_off + 32 < others,
            "replica {k} was not behind while cut off: {during:?}"
        );

        cluster.isolate(k, false);
        let t = Instant::now();
        let all = wait_converged(&cluster, &client, dir, Duration::from_secs(90));
        eprintln!(
            "round {round}: replica {k} caught up in {:?}: executed {}, checkpoint {}, view {}, state transfers {}",
            t.elapsed(),
            all[k].last_executed,
            all[k].stable_checkpoint,
            all[k].view,
            all[k].state_transfers
        );
        assert!(all[k].last_executed > others, "{all:?}");
    }
    // Every file is there, read through the cluster.
    match read_dir_within(&client, dir, CALL_TIMEOUT) {
        Ok(FsReply::ReadDir { entries, .. }) => {
            assert!(entries.len() >= 90, "{} entries", entries.len())
        }
        other => panic!("readdir: {other:?}"),
    }
}
