//! Four real `bftfs-replica` processes on 127.0.0.1 serve a client through the file service
//! while one of them is killed (SIGKILL) and restarted; the restarted replica catches up.

use replica::config::{generate_with_os_random, ClusterConfig, ProtocolConfig};
use replica::driver::client::ClientHandle;
use replica::driver::status;
use state_abstraction::fs::{
    decode, encode, Caller, CreateHow, FsOp, FsReply, FsRequest, FsResult, Handle,
};
use state_abstraction::ClientId;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Cluster {
    dir: tempfile::TempDir,
    config: ClusterConfig,
    children: Vec<Option<Child>>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("bftfs-proc")
            .disable_cleanup(std::env::var_os("KEEP").is_some())
            .tempdir()
            .expect("tempdir");
        eprintln!("cluster dir: {}", dir.path().display());
        let addresses: Vec<String> = (0..4)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                l.local_addr().expect("addr").to_string()
            })
            .collect();
        let keys = generate_with_os_random(1, addresses, &[ClientId(1)], ProtocolConfig::default())
            .expect("keygen");
        std::fs::write(
            dir.path().join("cluster.json"),
            keys.config.to_json().expect("json"),
        )
        .expect("write");
        for r in &keys.replicas {
            std::fs::write(
                dir.path().join(format!("replica-{}.json", r.id.0)),
                r.to_json().expect("json"),
            )
            .expect("write");
        }
        std::fs::write(
            dir.path().join("client-1.json"),
            keys.clients[0].to_json().expect("json"),
        )
        .expect("write");
        let mut c = Cluster {
            dir,
            config: keys.config,
            children: Vec::new(),
        };
        for i in 0..4 {
            let child = c.spawn(i);
            c.children.push(Some(child));
        }
        c
    }

    fn spawn(&self, i: usize) -> Child {
        let d = self.dir.path();
        let log = std::fs::File::create(d.join(format!("replica-{i}.log"))).expect("log");
        Command::new(env!("CARGO_BIN_EXE_bftfs-replica"))
            .arg("--config")
            .arg(d.join("cluster.json"))
            .arg("--secrets")
            .arg(d.join(format!("replica-{i}.json")))
            .arg("--data-dir")
            .arg(d.join(format!("data-{i}")))
            .env(
                "RUST_LOG",
                std::env::var("REPLICA_LOG").unwrap_or("info".into()),
            )
            .stderr(log)
            .spawn()
            .expect("spawn bftfs-replica")
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self, i: usize) {
        self.kill(i);
        let c = self.spawn(i);
        self.children[i] = Some(c);
    }

    fn client(&self) -> ClientHandle {
        let secrets = replica::config::ClientSecrets::from_json(
            &std::fs::read_to_string(self.dir.path().join("client-1.json")).expect("read"),
        )
        .expect("secrets");
        ClientHandle::start(self.config.clone(), secrets).expect("client")
    }

    fn status(&self, i: usize) -> Option<status::ReplicaStatus> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(status::probe(
            &self.config.replicas[i].address,
            Duration::from_secs(2),
        ))
        .ok()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..4 {
            let p: PathBuf = self.dir.path().join(format!("replica-{i}.log"));
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- replica {i} ---\n"));
            for l in tail.iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

fn call(client: &ClientHandle, op: FsOp) -> FsResult {
    let read_only = op.is_read_only();
    let req = FsRequest {
        caller: Caller::root(),
        op,
    };
    let bytes = client
        .call(encode(&req), read_only, Duration::from_secs(30))
        .expect("cluster answers");
    decode::<FsResult>(&bytes).expect("reply decodes")
}

fn create(client: &ClientHandle, dir: Handle, name: &str) -> Handle {
    match call(
        client,
        FsOp::Create {
            dir,
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            how: CreateHow::Guarded,
        },
    ) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("create {name}: {other:?}"),
    }
}

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
        let statuses: Vec<Option<status::ReplicaStatus>> =
            (0..4).map(|j| cluster.status(j)).collect();
        let best = statuses
            .iter()
            .flatten()
            .map(|s| s.last_executed)
            .max()
            .unwrap_or(0);
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
    let mut cluster = Cluster::start();
    let client = cluster.client();
    let dir = match call(
        &client,
        FsOp::Mkdir {
            dir: Handle::ROOT,
            name: b"work".to_vec(),
            mode: 0o755,
        },
    ) {
        Ok(FsReply::Entry { handle, .. }) => handle,
        other => panic!("mkdir: {other:?}\n{}", cluster.logs()),
    };
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
    let listing = call(
        &client,
        FsOp::ReadDir {
            dir,
            cookie: 0,
            count: 1000,
            plus: false,
        },
    );
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
    let cluster = Cluster::start();
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
