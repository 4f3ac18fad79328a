//! systemd's `Type=notify` protocol as a unit would see it: `bftfs-replica` runs with
//! NOTIFY_SOCKET pointing at a datagram socket the test listens on (standing in for PID 1),
//! says `READY=1` only once it answers, follows with `STATUS=` lines as its figures change,
//! and `STOPPING=1` when it is told to stop.

mod common;

use common::{cluster_dir, free_addresses, mkdir_within, probe, read_log, write_json};
use replica::config::{generate_with_os_random, ProtocolConfig};
use replica::driver::client::ClientHandle;
use state_abstraction::ClientId;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long to wait for a message: generous, the replica may start slowly on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

/// Kills the replica if the test fails half way.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next datagram whose text satisfies `wanted`, or a panic with what came and the log.
fn wait_for(
    socket: &UnixDatagram,
    what: &str,
    wanted: impl Fn(&str) -> bool,
    log: impl Fn() -> String,
) -> String {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < WAIT {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if wanted(&text) {
                    return text;
                }
                seen.push(text);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("receiving from the notify socket: {e}"),
        }
    }
    panic!("no {what} within {WAIT:?}; received {seen:?}\n{}", log());
}

fn status_line(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

/// `executed N` out of a status line.
fn executed(line: &str) -> Option<u64> {
    line.split(", ")
        .find_map(|part| part.strip_prefix("executed "))
        .and_then(|n| n.parse().ok())
}

/// One replica (f = 0: readiness, status and the watchdog are per process) started with
/// NOTIFY_SOCKET at a socket the test reads, plus `env`.
struct Notified {
    dir: tempfile::TempDir,
    socket: UnixDatagram,
    address: Vec<String>,
    keys: replica::config::ClusterKeys,
    replica: Killed,
}

impl Notified {
    fn start(name: &str, env: &[(&str, &str)]) -> Notified {
        let dir = cluster_dir(name);
        let d = dir.path();
        let address = free_addresses(1);
        let keys = generate_with_os_random(
            0,
            address.clone(),
            &[ClientId(1)],
            ProtocolConfig::default(),
        )
        .expect("keygen");
        write_json(&d.join("cluster.json"), keys.config.to_json());
        write_json(&d.join("replica-0.json"), keys.replicas[0].to_json());

        let socket_path = d.join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");

        let log_file = std::fs::File::create(d.join("replica-0.log")).expect("log");
        let replica = Killed(
            Command::new(env!("CARGO_BIN_EXE_bftfs-replica"))
                .arg("--config")
                .arg(d.join("cluster.json"))
                .arg("--secrets")
                .arg(d.join("replica-0.json"))
                .arg("--data-dir")
                .arg(d.join("data-0"))
                .env("NOTIFY_SOCKET", &socket_path)
                .env("RUST_LOG", "info")
                .envs(env.iter().copied())
                .stderr(log_file)
                .spawn()
                .expect("spawn bftfs-replica"),
        );
        Notified {
            dir,
            socket,
            address,
            keys,
            replica,
        }
    }

    fn log(&self) -> String {
        read_log(self.dir.path(), 0)
    }
}

#[test]
fn replica_tells_systemd_when_it_serves_and_how_it_is_doing() {
    let Notified {
        dir,
        socket,
        address,
        keys,
        mut replica,
    } = Notified::start("bftfs-notify", &[]);
    let log = || read_log(dir.path(), 0);

    let ready = wait_for(
        &socket,
        "READY=1",
        |m| m.lines().any(|l| l == "READY=1"),
        log,
    );
    // Ready means serving: a unit ordered after this one may connect at once.
    assert!(
        probe(&address[0]).is_some(),
        "READY=1 came before the replica answered\n{}",
        log()
    );
    let first = status_line(&ready)
        .map(str::to_string)
        .unwrap_or_else(|| panic!("READY=1 without a STATUS= line: {ready:?}"));
    assert!(first.starts_with("view 0, "), "{first}");
    assert!(first.contains("lag "), "{first}");
    let before = executed(&first).unwrap_or_else(|| panic!("no executed count in {first:?}"));

    // Executing a request changes the figures, so a new status line follows.
    let secrets = keys.clients[0].clone();
    let client = ClientHandle::start(keys.config.clone(), secrets).expect("client");
    mkdir_within(&client, "work", 0o755, WAIT, log);
    let later = wait_for(
        &socket,
        "STATUS= line with more executed",
        |m| {
            status_line(m)
                .and_then(executed)
                .is_some_and(|n| n > before)
        },
        log,
    );
    assert!(
        !later.lines().any(|l| l == "READY=1"),
        "READY=1 sent twice: {later:?}"
    );

    // A stop that systemd asked for is announced as one, not taken for a crash.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(replica.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    wait_for(
        &socket,
        "STOPPING=1",
        |m| m.lines().any(|l| l == "STOPPING=1"),
        log,
    );
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if let Ok(Some(status)) = replica.0.try_wait() {
            assert!(status.success(), "exit {status}\n{}", log());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the replica did not exit after SIGTERM\n{}", log());
}

#[test]
fn replica_feeds_the_watchdog_systemd_set_for_it() {
    // WatchdogSec=0.6s: systemd passes WATCHDOG_USEC (and WATCHDOG_PID, here left unset,
    // which sd_watchdog_enabled(3) takes as "this process").
    let n = Notified::start("bftfs-watchdog", &[("WATCHDOG_USEC", "600000")]);
    let log = || n.log();
    wait_for(
        &n.socket,
        "READY=1",
        |m| m.lines().any(|l| l == "READY=1"),
        log,
    );
    let start = Instant::now();
    for i in 0..4 {
        wait_for(
            &n.socket,
            &format!("WATCHDOG=1 number {}", i + 1),
            |m| m.lines().any(|l| l == "WATCHDOG=1"),
            log,
        );
    }
    // At half the interval: four pings take about 0.9 s or more after the first, and far
    // less than the 2.4 s in which systemd would have restarted it.
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn replica_leaves_a_watchdog_meant_for_another_process_alone() {
    // A replica started by a supervised process inherits its variables: WATCHDOG_PID names
    // the parent, not the replica.
    let n = Notified::start(
        "bftfs-watchdog-other",
        &[("WATCHDOG_USEC", "400000"), ("WATCHDOG_PID", "1")],
    );
    let log = || n.log();
    wait_for(
        &n.socket,
        "READY=1",
        |m| m.lines().any(|l| l == "READY=1"),
        log,
    );
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(len) = n.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..len]).to_string();
            assert!(
                !text.lines().any(|l| l == "WATCHDOG=1"),
                "pinged a watchdog that is not its own: {text:?}"
            );
        }
    }
}
