//! Config files that refuse mistakes: `bftfs config check`, misspelt fields refused by every
//! reader with the field and file named, and cluster.json files of the older form (times in
//! ticks) still working. The mounting part needs FUSE (skipped with a message otherwise; a
//! failure when BFTFS_REQUIRE_FUSE=1).

mod common;

use common::{bftfs, replicated_mounts_available, text, Mounted};
use std::ffi::OsStr;
use std::fs;
use std::path::Path;

/// The `protocol` object as `bftfs up` and `bftfs keygen` wrote it before times were
/// durations.
const OLD_PROTOCOL: &str = r#"{
    "checkpoint_interval": 64, "log_window": 256, "batch_requests_max": 64,
    "pipeline_batches_max": 4, "batch_bytes_max": 4194304, "operation_bytes_max": 4194304,
    "pending_requests_max": 8192, "client_window": 64, "view_change_timeout_ticks": 200,
    "view_change_timeout_ticks_max": 6400, "retransmit_ticks": 50, "catch_up_ticks": 100,
    "client_retransmit_ticks": 100, "client_retransmit_ticks_max": 1600, "tick_ns": 10000000,
    "fast_path": true
}"#;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).expect("read")).expect("json")
}

fn write_json(path: &Path, v: &serde_json::Value) {
    fs::write(path, serde_json::to_string_pretty(v).expect("encode")).expect("write");
}

/// Rewrites `path`'s protocol section in the older form.
fn make_old(path: &Path) {
    let mut v = json(path);
    v["protocol"] = serde_json::from_str(OLD_PROTOCOL).expect("old protocol");
    write_json(path, &v);
}

fn check(file: &Path, xdg: &Path) -> (i32, String) {
    let out = bftfs(
        &["config".as_ref(), "check".as_ref(), file.as_os_str()],
        xdg,
    );
    (out.status.code().unwrap_or(-1), text(&out))
}

#[test]
fn config_check_explains_what_is_wrong() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    let out = bftfs(
        &["keygen".as_ref(), "--out".as_ref(), keys.as_os_str()],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let config = keys.join("cluster.json");
    let written = fs::read_to_string(&config).expect("read");
    assert!(
        written.contains("\"view_change_timeout\": \"2s\"") && !written.contains("_ticks"),
        "keygen writes durations: {written}"
    );
    for file in ["cluster.json", "replica-0.json", "client-1.json"] {
        let (code, msg) = check(&keys.join(file), tmp.path());
        assert_eq!(code, 0, "{file}: {msg}");
        assert!(msg.contains(": ok: "), "{msg}");
    }

    // A misspelt squash would have left root unsquashed; now it is refused by name.
    let mut v = json(&config);
    v["clients"][0]["sqaush"] = "root".into();
    write_json(&config, &v);
    let (code, msg) = check(&config, tmp.path());
    assert_eq!(code, 1, "{msg}");
    assert!(
        msg.contains(&config.display().to_string())
            && msg.contains("unknown field `sqaush`")
            && msg.contains("did you mean `squash`?")
            && msg.contains("line "),
        "{msg}"
    );
    // Every other reader refuses it too, naming the file and the field.
    let out = bftfs(
        &["status".as_ref(), "--config".as_ref(), config.as_os_str()],
        tmp.path(),
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(3), "{msg}");
    assert!(
        msg.contains("cluster.json is not a valid cluster config")
            && msg.contains("unknown field `sqaush`"),
        "{msg}"
    );
    // Cargo builds the replica daemon next to bftfs (the workspace's binaries share a
    // directory), which is also where `bftfs up` looks for it.
    let replica_bin = Path::new(common::BFTFS).with_file_name("bftfs-replica");
    let replica = std::process::Command::new(replica_bin)
        .args([OsStr::new("--config"), config.as_os_str()])
        .arg("--secrets")
        .arg(keys.join("replica-0.json"))
        .arg("--data-dir")
        .arg(tmp.path().join("r0"))
        .output()
        .expect("run bftfs-replica");
    let msg = text(&replica);
    assert!(
        !replica.status.success() && msg.contains("unknown field `sqaush`"),
        "{msg}"
    );

    // The older form (ticks and tick_ns) still loads, and so does a file mixing both forms.
    make_old(&config);
    v = json(&config);
    v["clients"][0]
        .as_object_mut()
        .expect("object")
        .remove("sqaush");
    write_json(&config, &v);
    let (code, msg) = check(&config, tmp.path());
    assert_eq!(code, 0, "{msg}");
    assert!(msg.contains("view-change timeout 2s"), "{msg}");
    v["protocol"]["retransmit"] = "0.5s".into();
    v["protocol"]
        .as_object_mut()
        .expect("object")
        .remove("retransmit_ticks");
    write_json(&config, &v);
    assert_eq!(check(&config, tmp.path()).0, 0);
    // ...but not one time given in both forms, nor a duration without a unit.
    v["protocol"]["catch_up"] = "1s".into();
    write_json(&config, &v);
    let (code, msg) = check(&config, tmp.path());
    assert!(
        code == 1 && msg.contains("`catch_up` or `catch_up_ticks`"),
        "{msg}"
    );
    v["protocol"]
        .as_object_mut()
        .expect("object")
        .remove("catch_up_ticks");
    v["protocol"]["catch_up"] = "100".into();
    write_json(&config, &v);
    let (code, msg) = check(&config, tmp.path());
    assert!(
        code == 1 && msg.contains("`100` is not a duration"),
        "{msg}"
    );
    v["protocol"]["catch_up"] = "1s".into();
    write_json(&config, &v);
    assert_eq!(check(&config, tmp.path()).0, 0);

    // A secrets file from another keygen run does not belong to this cluster.
    let other = tmp.path().join("other");
    let out = bftfs(
        &["keygen".as_ref(), "--out".as_ref(), other.as_os_str()],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = bftfs(
        &[
            "config".as_ref(),
            "check".as_ref(),
            other.join("replica-1.json").as_os_str(),
            "--cluster".as_ref(),
            keys.join("cluster.json").as_os_str(),
        ],
        tmp.path(),
    );
    let msg = text(&out);
    assert!(
        out.status.code() == Some(1) && msg.contains("does not belong to the cluster"),
        "{msg}"
    );
    let (code, msg) = check(&tmp.path().join("missing.json"), tmp.path());
    assert!(code == 1 && msg.contains("cannot read"), "{msg}");
}

/// A cluster that `bftfs up` made before times were durations comes up again unchanged, and
/// one with a misspelt field is refused before anything is mounted.
#[test]
fn up_loads_an_older_cluster_config_and_refuses_a_misspelt_one() {
    if !replicated_mounts_available("up_loads_an_older_cluster_config_and_refuses_a_misspelt_one") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    let xdg = tmp.path().join("xdg");
    let data = tmp.path().join("data");
    fs::create_dir(&mnt).expect("mkdir");
    let m = Mounted::at(&mnt, &xdg, Some(&data), &["--f", "1"]).expect("first up");
    fs::write(m.path("kept"), b"from before").expect("write");
    m.down();

    let config = data.join("cluster/cluster.json");
    make_old(&config);
    let m = Mounted::at(&mnt, &xdg, Some(&data), &["--f", "1"]).expect("up with the old form");
    assert_eq!(fs::read(m.path("kept")).expect("read"), b"from before");
    fs::write(m.path("new"), b"written").expect("write after the upgrade");
    m.down();
    assert!(
        fs::read_to_string(&config)
            .expect("read")
            .contains("\"tick_ns\": 10000000"),
        "up leaves an old-form file it did not need to change as it was"
    );

    let mut v = json(&config);
    v["protocol"]["fast_pat"] = true.into();
    write_json(&config, &v);
    let err = Mounted::at(&mnt, &xdg, Some(&data), &["--f", "1"])
        .err()
        .expect("a misspelt field is refused");
    assert!(
        err.contains("cluster.json is not a valid cluster config")
            && err.contains("unknown field `fast_pat`"),
        "{err}"
    );
    assert!(!common::is_mounted(&mnt));
}
