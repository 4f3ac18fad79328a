//! Four replica hosts and a client host on a real (virtual) network: each replica runs in a
//! network namespace of its own, joined to a bridge by a veth pair, as the README's "Four
//! hosts" walkthrough sets them up (keys with `bftfs keygen --replica` four times, one secret
//! per host, `bftfs-replica` per host, `bftfs mount` on the client). The client is the fifth
//! host: the root namespace, on its own cable to the switch, because the FUSE mount has to be
//! visible to the test (a mount made inside `ip netns exec` would be too, but the test's
//! own file calls would then cross no link at all — here every request crosses the bridge).
//! A workload runs through the mount; then one replica host's link is cut (`ip link set
//! DEV down`: its TCP connections stall rather than close, as when a cable is pulled) and
//! writes and reads still complete with f=1; the link comes back and that replica catches
//! up with the others.
//!
//! Needs root, `ip` with netns support and FUSE: skipped with a message without them (a
//! failure when BFTFS_REQUIRE_FUSE=1, as CI sets).

mod common;
#[path = "common/workload.rs"]
mod workload;

use common::{bftfs, replicated_mounts_available, text, wait_until, Unmount, BFTFS};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use workload::Workload;

/// Runs `ip ARGS`; its output on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), text(&out).trim()))
    }
}

fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// The network the test makes: four replica hosts (namespaces `bftfs-t<pid>-r0..3`, each
/// with `eth0` and `lo`), a switch (namespace `bftfs-t<pid>-sw` holding bridge `br0`, with
/// one port `v<i>` per replica host and `vc` for the client), and the client host: the root
/// namespace, on `bt<pid>c`. The bridge is in a namespace of its own, not the root one,
/// so that the host's firewall (br_netfilter with a FORWARD policy of DROP, as Docker hosts
/// have) never sees the replicas' traffic to each other; a fresh namespace filters nothing.
/// Everything is removed when dropped, even after a panic; names carry the pid so that
/// concurrent runs, and leftovers of a killed run, never clash (interface names are limited
/// to 15 characters, hence the short root-side one).
struct Net {
    /// The replica hosts' namespaces, replica 0's first.
    hosts: Vec<String>,
    switch: String,
    client_link: String,
    /// First three octets of the private /24 the hosts live in.
    subnet: String,
}

impl Net {
    fn new(hosts: usize) -> Result<Net, String> {
        let pid = std::process::id();
        // A /24 in 10.0.0.0/8 picked from the pid, away from the 10.0.x and 10.1.x that
        // container runtimes and cloud networks like to use.
        let subnet = format!("10.{}.{}", 200 + (pid / 256) % 50, pid % 256);
        let mut net = Net {
            hosts: Vec::new(),
            switch: format!("bftfs-t{pid}-sw"),
            client_link: format!("bt{pid}c"),
            subnet,
        };
        ip(&["netns", "add", &net.switch])?;
        let sw = |args: &[&str]| {
            let mut all = vec!["-n", net.switch.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        sw(&["link", "add", "br0", "type", "bridge"])?;
        sw(&["link", "set", "br0", "up"])?;
        // A cable from namespace `ns` (None: the test's own) to the switch: a veth pair made
        // in the switch, one end on the bridge as `port`, the other moved to `ns` and named
        // `name` there. It is made under a temporary name: every host's end is `eth0`, and
        // two of them cannot share that name while both are still in the switch.
        let cable = |ns: Option<&str>, name: &str, port: &str, addr: &str| -> Result<(), String> {
            let tmp = format!("{port}x");
            sw(&["link", "add", port, "type", "veth", "peer", "name", &tmp])?;
            sw(&["link", "set", port, "master", "br0"])?;
            sw(&["link", "set", port, "up"])?;
            let to = ns.map_or_else(|| std::process::id().to_string(), str::to_string);
            sw(&["link", "set", &tmp, "netns", &to])?;
            let at = |args: &[&str]| match ns {
                Some(ns) => {
                    let mut all = vec!["-n", ns];
                    all.extend_from_slice(args);
                    ip(&all)
                }
                None => ip(args),
            };
            at(&["link", "set", &tmp, "name", name])?;
            at(&["addr", "add", &format!("{addr}/24"), "dev", name])?;
            at(&["link", "set", name, "up"])?;
            // The replica talks to itself over its own address too; lo must be up for that.
            if ns.is_some() {
                at(&["link", "set", "lo", "up"])?;
            }
            Ok(())
        };
        let client_link = net.client_link.clone();
        cable(None, &client_link, "vc", &net.client_ip())?;
        for i in 0..hosts {
            let ns = format!("bftfs-t{pid}-r{i}");
            ip(&["netns", "add", &ns])?;
            net.hosts.push(ns.clone());
            cable(Some(&ns), "eth0", &format!("v{i}"), &net.host_ip(i))?;
        }
        Ok(net)
    }

    fn host_ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    fn client_ip(&self) -> String {
        format!("{}.254", self.subnet)
    }

    /// Pulls (false) or plugs back (true) replica host `i`'s cable: its port on the switch
    /// goes down, so nothing reaches the host or leaves it, and its processes see no error.
    fn set_link(&self, i: usize, up: bool) {
        ip_ok(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("v{i}"),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and with them their peers; the
        // explicit delete covers a run that failed half-way through making them.
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.client_link]);
    }
}

/// Whether `ip` can make network namespaces and bridges here (it needs root and a kernel
/// with netns, veth and bridge support); says why not, and fails instead with
/// BFTFS_REQUIRE_FUSE=1, as the FUSE tests do.
fn netns_available(test: &str) -> Option<Net> {
    match Net::new(4) {
        Ok(net) => Some(net),
        Err(why) => {
            if std::env::var("BFTFS_REQUIRE_FUSE").as_deref() == Ok("1") {
                panic!("{test}: network namespaces are required (BFTFS_REQUIRE_FUSE=1): {why}");
            }
            eprintln!("SKIPPED {test}: cannot make network namespaces ({why})");
            None
        }
    }
}

/// The replica processes, one per namespace, killed when dropped (before the namespaces
/// go: a namespace with a process in it outlives `ip netns del`).
struct Replicas {
    children: Vec<Option<Child>>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(xdg: &Path, args: &[&OsStr]) -> (i32, String) {
    let out = bftfs(args, xdg);
    (out.status.code().unwrap_or(-1), text(&out))
}

/// `bftfs status --config CONFIG --json`, parsed (Null if it printed no JSON).
fn status_json(xdg: &Path, config: &Path) -> serde_json::Value {
    let out = bftfs(
        &[
            "status".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--json".as_ref(),
        ],
        xdg,
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Runs `steps` steps of the workload, which checks every read against its model.
fn work(w: &mut Workload, steps: usize, when: &str) {
    for _ in 0..steps {
        if let Err(e) = w.step() {
            panic!("workload {when}: {e}; problems: {:?}", w.problems);
        }
    }
    w.verify_listing()
        .unwrap_or_else(|e| panic!("listing {when}: {e}"));
}

#[test]
fn four_replica_hosts_in_network_namespaces_survive_a_cut_link() {
    let name = "four_replica_hosts_in_network_namespaces_survive_a_cut_link";
    if !replicated_mounts_available(name) {
        return;
    }
    let Some(net) = netns_available(name) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let xdg = root.join("xdg");

    // Keys, as on the trusted machine: each host by its address on the network. Every
    // host has its own address, so all can use the same port.
    let keys = root.join("keys");
    let addresses: Vec<String> = (0..4).map(|i| format!("{}:7000", net.host_ip(i))).collect();
    let mut args: Vec<&OsStr> = vec!["keygen".as_ref(), "--out".as_ref(), keys.as_os_str()];
    for a in &addresses {
        args.push("--replica".as_ref());
        args.push(a.as_ref());
    }
    args.extend([OsStr::new("--clients"), OsStr::new("1")]);
    let (code, out) = run(&xdg, &args);
    assert_eq!(code, 0, "keygen: {out}");

    // Each replica host: cluster.json and its own secret, `bftfs-replica` run inside its
    // namespace (`ip netns exec` execs it, so the child is the replica itself).
    let mut replicas = Replicas {
        children: Vec::new(),
    };
    let replica_bin = Path::new(BFTFS).with_file_name("bftfs-replica");
    let host_dirs: Vec<PathBuf> = (0..4).map(|i| root.join(format!("host-{i}"))).collect();
    for (i, host) in host_dirs.iter().enumerate() {
        fs::create_dir_all(host.join("etc")).expect("mkdir");
        for f in ["cluster.json".to_string(), format!("replica-{i}.json")] {
            fs::copy(keys.join(&f), host.join("etc").join(&f)).expect("copy");
        }
        let journal = fs::File::create(host.join("journal.log")).expect("journal");
        let child = Command::new("ip")
            .args(["netns", "exec", &net.hosts[i]])
            .arg(&replica_bin)
            .arg("--config")
            .arg(host.join("etc/cluster.json"))
            .arg("--secrets")
            .arg(host.join(format!("etc/replica-{i}.json")))
            .arg("--data-dir")
            .arg(host.join("data"))
            .arg("--log-file")
            .arg(host.join("journal.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(journal)
            .spawn()
            .expect("start bftfs-replica in its namespace");
        replicas.children.push(Some(child));
    }
    let journals = || {
        host_dirs
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let log = fs::read_to_string(h.join("journal.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- replica {i}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The client host: its own copy of cluster.json and its client secret; `bftfs mount
    // --detach` returns once the mount answers, which needs a quorum reached over the bridge.
    let client = root.join("client");
    fs::create_dir_all(client.join("etc")).expect("mkdir");
    for f in ["cluster.json", "client-1.json"] {
        fs::copy(keys.join(f), client.join("etc").join(f)).expect("copy");
    }
    let config = client.join("etc/cluster.json");
    let mnt = client.join("mnt");
    fs::create_dir_all(&mnt).expect("mkdir");
    let _unmount = Unmount(mnt.clone(), xdg.clone());
    let (code, out) = run(
        &xdg,
        &[
            "mount".as_ref(),
            config.as_os_str(),
            mnt.as_os_str(),
            "--client".as_ref(),
            client.join("etc/client-1.json").as_os_str(),
            "--detach".as_ref(),
            "--log-file".as_ref(),
            client.join("mount.log").as_os_str(),
        ],
    );
    assert_eq!(code, 0, "bftfs mount: {out}\n{}", journals());

    // A workload with all four hosts on the network.
    fs::write(mnt.join("hello"), b"over the bridge").expect("write");
    assert_eq!(
        fs::read(mnt.join("hello")).expect("read"),
        b"over the bridge"
    );
    let mut w = Workload::new(&mnt.join("work"), 16, 0x4e7).expect("workload");
    work(&mut w, 100, "with every host up");

    // Host 3's cable is pulled: three replicas are a quorum, so writes and reads complete.
    let before_cut = status_json(&xdg, &config)["replicas"][3]["status"]["last_executed"]
        .as_u64()
        .expect("host 3's executed sequence before the cut");
    net.set_link(3, false);
    fs::write(mnt.join("while-3-is-cut-off"), b"still served").expect("write with 3 cut off");
    assert_eq!(
        fs::read(mnt.join("while-3-is-cut-off")).expect("read with 3 cut off"),
        b"still served"
    );
    work(&mut w, 100, "with host 3 cut off");
    let v = status_json(&xdg, &config);
    assert_ne!(
        v["replicas"][3]["health"], "ok",
        "status sees host 3 gone: {v}"
    );

    // The cable goes back in: host 3 catches up with the others (through its stalled
    // connections resuming or new ones, and state transfer if it fell a checkpoint behind)
    // as the file system is used. No timing is asserted, only a generous bound.
    net.set_link(3, true);
    // The others keep executing while the test watches, so "equal" would race them: the
    // mark is what they had executed when the link came back, all of which host 3 missed.
    let executed =
        |v: &serde_json::Value, i: usize| v["replicas"][i]["status"]["last_executed"].as_u64();
    let v = status_json(&xdg, &config);
    let mark = (0..3)
        .filter_map(|i| executed(&v, i))
        .max()
        .unwrap_or_else(|| panic!("the others' executed sequence: {v}"));
    assert!(mark > before_cut, "the others went on without host 3: {v}");
    let mut round = 0;
    let mut last = serde_json::Value::Null;
    let caught_up = wait_until(Duration::from_secs(60), || {
        round += 1;
        fs::write(mnt.join(format!("after-{round}")), b"traffic").expect("write after the cut");
        last = status_json(&xdg, &config);
        executed(&last, 3).is_some_and(|e| e >= mark) && last["replicas"][3]["agree"] != false
    });
    assert!(caught_up, "host 3 caught up: {last}\n{}", journals());
    work(&mut w, 50, "after host 3 is back");
    assert!(w.problems.is_empty(), "{:?}", w.problems);

    let out = bftfs(&["umount".as_ref(), mnt.as_os_str()], &xdg);
    assert!(out.status.success(), "umount: {}", text(&out));
    drop(replicas);
    drop(net);
}
