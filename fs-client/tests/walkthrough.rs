//! The README's "Four hosts" walkthrough, step by step, on one machine: four directories
//! stand for the four replica hosts (each with only its own files, and its own loopback
//! address), one for the client. Keys with `bftfs keygen --replica` four times, each file
//! copied where the README says, `bftfs config check` on each host, `bftfs-replica` started
//! as the systemd unit's ExecStart does, `mount -t bftfs` on the client, `bftfs status`; then
//! host d fails and comes back. Real mounts: skipped with a message without FUSE (a failure
//! when BFTFS_REQUIRE_FUSE=1).

mod common;

use common::{bftfs, is_mounted, replicated_mounts_available, text, wait_until, Helper, BFTFS};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The replica processes of the "hosts", killed when dropped.
struct Hosts {
    replicas: Vec<Option<Child>>,
    dirs: Vec<PathBuf>,
}

impl Hosts {
    /// What the README's unit (`bftfs-replica@<i>`) runs on host `i`: `bftfs-replica --config
    /// /etc/bftfs/cluster.json --secrets /etc/bftfs/replica-<i>.json --data-dir
    /// /var/lib/bftfs/replica-<i>`, logging to its journal (here a file).
    fn start(&mut self, i: usize) {
        let host = &self.dirs[i];
        let journal = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.join("journal.log"))
            .expect("journal");
        let child = Command::new(Path::new(BFTFS).with_file_name("bftfs-replica"))
            .arg("--config")
            .arg(host.join("etc/cluster.json"))
            .arg("--secrets")
            .arg(host.join(format!("etc/replica-{i}.json")))
            .arg("--data-dir")
            .arg(host.join(format!("var/lib/bftfs/replica-{i}")))
            .stderr(journal)
            .spawn()
            .expect("start bftfs-replica");
        self.replicas[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.replicas[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..self.replicas.len() {
            self.kill(i);
        }
    }
}

/// Unmounts lazily when dropped, even if the test panicked.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn run(xdg: &Path, args: &[&OsStr]) -> (i32, String) {
    let out = bftfs(args, xdg);
    (out.status.code().unwrap_or(-1), text(&out))
}

#[test]
fn four_hosts_walkthrough() {
    if !replicated_mounts_available("four_hosts_walkthrough")
        || !common::mount_8_available("four_hosts_walkthrough")
    {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let xdg = root.join("xdg");
    // Hosts a..d: their own loopback addresses, ports from the tests' picker.
    let ports =
        replica::localhost::free_addresses(4, replica::localhost::fresh_seed()).expect("ports");
    let addresses: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let port = a.rsplit_once(':').expect("port").1;
            format!("127.0.0.{}:{port}", 11 + i)
        })
        .collect();

    // 1. Keys, on one trusted machine.
    let keys = root.join("keys");
    let mut args: Vec<&OsStr> = vec!["keygen".as_ref(), "--out".as_ref(), keys.as_os_str()];
    for a in &addresses {
        args.push("--replica".as_ref());
        args.push(a.as_ref());
    }
    args.extend([OsStr::new("--clients"), OsStr::new("3")]);
    let (code, out) = run(&xdg, &args);
    assert_eq!(code, 0, "keygen: {out}");
    let (code, out) = run(
        &xdg,
        &[
            "config".as_ref(),
            "check".as_ref(),
            keys.join("cluster.json").as_os_str(),
        ],
    );
    assert_eq!(code, 0, "{out}");

    // 2. Which file goes where: cluster.json everywhere, one secret per host.
    let copy = |name: &str, host: &Path| {
        fs::create_dir_all(host.join("etc")).expect("mkdir");
        fs::copy(keys.join(name), host.join("etc").join(name)).expect("copy");
    };
    let mut hosts = Hosts {
        replicas: (0..4).map(|_| None).collect(),
        dirs: (0..4)
            .map(|i| root.join(format!("host-{}", ["a", "b", "c", "d"][i])))
            .collect(),
    };
    for (i, host) in hosts.dirs.iter().enumerate() {
        copy("cluster.json", host);
        copy(&format!("replica-{i}.json"), host);
        let secrets = host.join(format!("etc/replica-{i}.json"));
        let (code, out) = run(
            &xdg,
            &["config".as_ref(), "check".as_ref(), secrets.as_os_str()],
        );
        assert!(code == 0 && out.contains("matches"), "host {i}: {out}");
        assert_eq!(
            fs::read_dir(host.join("etc")).expect("etc").count(),
            2,
            "a replica host holds its own secret only"
        );
    }
    let client = root.join("client");
    copy("cluster.json", &client);
    copy("client-1.json", &client);

    // 4. Each host runs its replica.
    for i in 0..4 {
        hosts.start(i);
    }

    // 5. Mount on the client.
    let _helper = Helper::install(&xdg);
    let mnt = client.join("mnt/bftfs");
    fs::create_dir_all(&mnt).expect("mkdir");
    let _cleanup = Unmount(mnt.clone());
    let config = client.join("etc/cluster.json");
    let client_opt = format!("client={}", client.join("etc/client-1.json").display());
    let out = Command::new("mount")
        .args([
            "-t".as_ref(),
            "bftfs".as_ref(),
            config.as_os_str(),
            mnt.as_os_str(),
        ])
        .args(["-o", &client_opt])
        .output()
        .expect("run mount");
    assert!(out.status.success(), "mount -t bftfs: {}", text(&out));
    fs::write(mnt.join("hello"), b"from the client").expect("write");
    assert_eq!(
        fs::read(mnt.join("hello")).expect("read"),
        b"from the client"
    );
    let status: Vec<&OsStr> = vec!["status".as_ref(), "--config".as_ref(), config.as_os_str()];
    assert!(
        wait_until(Duration::from_secs(60), || run(&xdg, &status).0 == 0),
        "status ok: {}",
        run(&xdg, &status).1
    );
    let (_, out) = run(&xdg, &status);
    assert_eq!(
        out.matches(" yes ").count(),
        4,
        "every replica agrees: {out}"
    );

    // 6. Host d fails: the mount keeps working, status says degraded and names it.
    hosts.kill(3);
    fs::write(mnt.join("while-d-is-down"), b"still served").expect("write with d down");
    assert_eq!(
        fs::read(mnt.join("while-d-is-down")).expect("read"),
        b"still served"
    );
    let (code, out) = run(&xdg, &status);
    assert_eq!(code, 1, "degraded: {out}");
    assert!(out.contains("replica 3"), "{out}");
    // ...and comes back, catching up as the file system is used (`--watch` would show its
    // lag going to 0; an idle cluster gives it nothing to notice it is behind). The verdict
    // may stay degraded a while longer: peers remember its silence as suspicious.
    hosts.start(3);
    let mut json_status = status.clone();
    json_status.push("--json".as_ref());
    let mut round = 0;
    let caught_up = || {
        round += 1;
        fs::write(mnt.join(format!("in-use-{round}")), b"traffic").expect("write");
        let (_, out) = run(&xdg, &json_status);
        let v: serde_json::Value =
            serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap_or_default();
        v["replicas"][3]["health"] == "ok"
            && v["replicas"][3]["lag"] == 0
            && v["replicas"][3]["agree"] != false
    };
    assert!(
        wait_until(Duration::from_secs(120), caught_up),
        "host d back and caught up: {}",
        run(&xdg, &status).1
    );
    fs::write(mnt.join("after-d-is-back"), b"x").expect("write");
    let out = Command::new("umount").arg(&mnt).output().expect("umount");
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(!is_mounted(&mnt));
}
