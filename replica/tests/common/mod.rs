//! What the test binaries that run real `bftfs-replica` processes share: a cluster of four
//! processes on 127.0.0.1 (or the pieces to build one with a different layout), status
//! probes, log tails, and file-service calls through a [`ClientHandle`].
//!
//! Each test binary compiles its own copy of this module and uses a subset of it.
// Not every binary uses every helper; without this each would warn about the rest.
#![allow(dead_code)]

use replica::config::{
    generate_with_os_random, ClientSecrets, ClusterConfig, ClusterKeys, ProtocolConfig,
};
use replica::driver::client::ClientHandle;
use replica::driver::status::{self, ReplicaStatus};
use state_abstraction::fs::{
    decode, encode, Caller, CreateHow, FsOp, FsReply, FsRequest, FsResult, Handle,
};
use state_abstraction::ClientId;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Replicas in every cluster these tests start (f = 1).
pub const N: usize = 4;

/// How long a started replica may take to answer its first status probe.
pub const START_LIMIT: Duration = Duration::from_secs(60);

/// How long [`call`] and [`create`] wait for the cluster's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Building blocks

/// A temporary directory for one cluster, kept after the test when `KEEP` is set.
pub fn cluster_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(std::env::var_os("KEEP").is_some())
        .tempdir()
        .expect("tempdir")
}

/// `n` consecutive addresses on 127.0.0.1, free now and outside the kernel's ephemeral range
/// (so no outgoing connection takes one before the replica binds it).
pub fn free_addresses(n: usize) -> Vec<String> {
    replica::localhost::free_addresses(n, replica::localhost::fresh_seed())
        .unwrap_or_else(|e| panic!("no free ports: {e}"))
}

/// Writes a JSON document the test made (a config or a secrets file).
pub fn write_json(path: &Path, json: Result<String, replica::config::ConfigError>) {
    std::fs::write(path, json.expect("json")).expect("write");
}

/// Starts replica `i` with the config at `config` and its secrets, data and log in `dir`
/// (`replica-{i}.json`, `data-{i}`, `replica-{i}.log`). `REPLICA_LOG` overrides the log
/// filter (default `info`).
pub fn spawn_replica(dir: &Path, config: &Path, i: usize) -> Child {
    let log = std::fs::File::create(dir.join(format!("replica-{i}.log"))).expect("log");
    Command::new(env!("CARGO_BIN_EXE_bftfs-replica"))
        .arg("--config")
        .arg(config)
        .arg("--secrets")
        .arg(dir.join(format!("replica-{i}.json")))
        .arg("--data-dir")
        .arg(dir.join(format!("data-{i}")))
        .env(
            "RUST_LOG",
            std::env::var("REPLICA_LOG").unwrap_or("info".into()),
        )
        .stderr(log)
        .spawn()
        .expect("spawn bftfs-replica")
}

/// Replica processes, killed (SIGKILL) when dropped. `None`: not running.
#[derive(Default)]
pub struct Processes(pub Vec<Option<Child>>);

impl Processes {
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.0[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether replica `i` runs (was started and has not exited).
    pub fn alive(&mut self, i: usize) -> bool {
        self.0[i]
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until each replica answers a status probe at its address in `addresses` (its
    /// log is `dir/replica-{i}.log`), panicking at once with the log's tail if one of the
    /// processes exits meanwhile.
    pub fn wait_serving(&mut self, dir: &Path, addresses: &[String]) {
        let children = self.0.iter_mut().map(Option::as_mut);
        let log_of = |i: usize| dir.join(format!("replica-{i}.log"));
        if let Err(e) =
            replica::localhost::wait_until_serving(children, addresses, log_of, START_LIMIT)
        {
            panic!("{e}");
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for i in 0..self.0.len() {
            self.kill(i);
        }
    }
}

/// The status of the replica listening at `address`, if it answers within 2 s.
pub fn probe(address: &str) -> Option<ReplicaStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(status::probe(address, Duration::from_secs(2)))
        .ok()
}

/// Replica `i`'s log in `dir` (empty if there is none).
pub fn read_log(dir: &Path, i: usize) -> String {
    std::fs::read_to_string(dir.join(format!("replica-{i}.log"))).unwrap_or_default()
}

/// The last `lines` lines of every replica's log in `dir`, for a failure message.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    for i in 0..N {
        let text = read_log(dir, i);
        let all: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- replica {i} ---\n"));
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A cluster of four processes that listen where the config says

pub struct Cluster {
    /// First, so that the replicas are killed before the directory is removed.
    pub children: Processes,
    pub dir: tempfile::TempDir,
    pub config: ClusterConfig,
    pub keys: ClusterKeys,
}

impl Cluster {
    /// Four replicas (f = 1) with the default protocol config and one client, `ClientId(1)`;
    /// `cluster.json`, `replica-{i}.json` and `client-1.json` in a new directory named
    /// `prefix…`.
    pub fn start(prefix: &str) -> Cluster {
        Self::start_configured(prefix, |_| {})
    }

    /// [`Cluster::start`] with `adjust` applied to the cluster config before it is written.
    pub fn start_configured(prefix: &str, adjust: impl FnOnce(&mut ClusterConfig)) -> Cluster {
        let dir = cluster_dir(prefix);
        eprintln!("cluster dir: {}", dir.path().display());
        let mut keys = generate_with_os_random(
            1,
            free_addresses(N),
            &[ClientId(1)],
            ProtocolConfig::default(),
        )
        .expect("keygen");
        adjust(&mut keys.config);
        let d = dir.path();
        write_json(&d.join("cluster.json"), keys.config.to_json());
        for r in &keys.replicas {
            write_json(&d.join(format!("replica-{}.json", r.id.0)), r.to_json());
        }
        write_json(&d.join("client-1.json"), keys.clients[0].to_json());
        let mut c = Cluster {
            dir,
            config: keys.config.clone(),
            keys,
            children: Processes::default(),
        };
        for i in 0..N {
            let child = c.spawn(i);
            c.children.0.push(Some(child));
        }
        let addresses: Vec<String> = c
            .config
            .replicas
            .iter()
            .map(|r| r.address.clone())
            .collect();
        c.children.wait_serving(c.dir.path(), &addresses);
        c
    }

    fn spawn(&self, i: usize) -> Child {
        let d = self.dir.path();
        spawn_replica(d, &d.join("cluster.json"), i)
    }

    pub fn kill(&mut self, i: usize) {
        self.children.kill(i);
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let c = self.spawn(i);
        self.children.0[i] = Some(c);
    }

    pub fn alive(&mut self, i: usize) -> bool {
        self.children.alive(i)
    }

    /// A client handle with the secrets the cluster directory holds (`client-1.json`).
    pub fn client(&self) -> ClientHandle {
        let secrets = ClientSecrets::from_json(
            &std::fs::read_to_string(self.dir.path().join("client-1.json")).expect("read"),
        )
        .expect("secrets");
        ClientHandle::start(self.config.clone(), secrets).expect("client")
    }

    pub fn status(&self, i: usize) -> Option<ReplicaStatus> {
        probe(&self.config.replicas[i].address)
    }

    pub fn statuses(&self) -> Vec<Option<ReplicaStatus>> {
        (0..N).map(|i| self.status(i)).collect()
    }

    pub fn log(&self, i: usize) -> String {
        read_log(self.dir.path(), i)
    }

    /// The last 15 lines of every replica's log.
    pub fn logs(&self) -> String {
        log_tails(self.dir.path(), 15)
    }

    /// Waits until every replica has executed the same (positive) sequence number.
    pub fn wait_agreed(&self) -> Vec<ReplicaStatus> {
        let start = Instant::now();
        loop {
            let all = self.statuses();
            if all.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s.last_executed > 0
                        && Some(s.last_executed) == all[0].as_ref().map(|a| a.last_executed)
                })
            }) {
                return all.into_iter().flatten().collect();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "replicas did not converge: {all:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// File-service calls

/// `op` as `caller`, waiting up to `timeout`: the decoded result, or why there is none.
pub fn call_as(
    client: &ClientHandle,
    caller: Caller,
    op: FsOp,
    timeout: Duration,
) -> Result<FsResult, String> {
    let read_only = op.is_read_only();
    let bytes = client
        .call(encode(&FsRequest { caller, op }), read_only, timeout)
        .map_err(|e| e.to_string())?;
    decode::<FsResult>(&bytes).ok_or_else(|| "the reply does not decode".to_string())
}

/// `op` as root; panics unless the cluster answers within `timeout`.
pub fn call_within(client: &ClientHandle, op: FsOp, timeout: Duration) -> FsResult {
    call_as(client, Caller::root(), op, timeout)
        .unwrap_or_else(|e| panic!("the cluster answers: {e}"))
}

/// `op` as root; panics unless the cluster answers within [`CALL_TIMEOUT`].
pub fn call(client: &ClientHandle, op: FsOp) -> FsResult {
    call_within(client, op, CALL_TIMEOUT)
}

/// The new entry's handle; panics with `what` and the reply otherwise.
pub fn entry(result: FsResult, what: &str) -> Handle {
    match result {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("{what}: {other:?}"),
    }
}

/// Creating the file `name` (0644, guarded) in `dir`.
pub fn create_op(dir: Handle, name: &str) -> FsOp {
    FsOp::Create {
        dir,
        name: name.as_bytes().to_vec(),
        mode: 0o644,
        how: CreateHow::Guarded,
    }
}

/// Creates the file `name` (0644, guarded) in `dir`, waiting up to `timeout`.
pub fn create_within(client: &ClientHandle, dir: Handle, name: &str, timeout: Duration) -> Handle {
    let op = create_op(dir, name);
    entry(call_within(client, op, timeout), &format!("create {name}"))
}

/// Creates the file `name` (0644, guarded) in `dir`.
pub fn create(client: &ClientHandle, dir: Handle, name: &str) -> Handle {
    create_within(client, dir, name, CALL_TIMEOUT)
}

/// Makes the directory `name` under the root, waiting up to `timeout`; on failure the panic
/// message ends with `context()` (log tails, say).
pub fn mkdir_within(
    client: &ClientHandle,
    name: &str,
    mode: u32,
    timeout: Duration,
    context: impl FnOnce() -> String,
) -> Handle {
    let op = FsOp::Mkdir {
        dir: Handle::ROOT,
        name: name.as_bytes().to_vec(),
        mode,
    };
    match call_within(client, op, timeout) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("mkdir: {other:?}\n{}", context()),
    }
}

/// The first 1000 entries of `dir`, waiting up to `timeout`.
pub fn read_dir_within(client: &ClientHandle, dir: Handle, timeout: Duration) -> FsResult {
    let op = FsOp::ReadDir {
        dir,
        cookie: 0,
        count: 1000,
        plus: false,
    };
    call_within(client, op, timeout)
}
