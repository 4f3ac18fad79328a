//! What `cargo install --path fs-client` gives a user beyond `bftfs` itself: completion
//! scripts and manual pages made from the clap definitions, and the replica daemon as
//! `bftfs replica`.

mod common;

use common::*;
use std::process::Command;

/// The commands a user types; every completion script and the main page must name them.
const COMMANDS: &[&str] = &[
    "up",
    "down",
    "mount",
    "umount",
    "status",
    "keygen",
    "config",
    "lock",
    "unlock",
    "install-helper",
    "replica",
    "completions",
    "man",
];

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BFTFS).args(args).output().expect("run bftfs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completions_name_every_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (ok, script, err) = run(&["completions", shell]);
        assert!(ok, "completions {shell}: {err}");
        for command in COMMANDS {
            assert!(
                script.contains(command),
                "the {shell} completions do not mention {command}"
            );
        }
        // Options of a command are completed too.
        assert!(
            script.contains("metrics-port"),
            "{shell}: no --metrics-port"
        );
    }
    let (ok, _, err) = run(&["completions", "tcsh"]);
    assert!(!ok, "an unknown shell was accepted");
    assert!(err.contains("bash"), "{err}");
}

#[test]
fn man_pages_for_bftfs_each_command_and_bftfs_replica() {
    let (ok, page, err) = run(&["man"]);
    assert!(ok, "{err}");
    // roff writes a hyphen as `\-`.
    let page = page.replace("\\-", "-");
    assert!(
        page.starts_with(".ie") || page.contains(".TH bftfs 1"),
        "{page}"
    );
    for command in COMMANDS {
        assert!(
            page.contains(command),
            "bftfs(1) does not mention {command}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, said, err) = run(&["man", "--dir", &dir.path().to_string_lossy()]);
    assert!(ok, "{err}");
    assert!(said.contains("manual pages"), "{said}");
    for name in [
        "bftfs",
        "bftfs-up",
        "bftfs-mount",
        "bftfs-status",
        "bftfs-config-check",
        "bftfs-replica",
    ] {
        let path = dir.path().join(format!("{name}.1"));
        let page =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(page.contains(&format!(".TH {name} 1")), "{name}: {page}");
    }
    // bftfs-replica(1) is the program's page: its logging options are its own.
    let replica = std::fs::read_to_string(dir.path().join("bftfs-replica.1")).expect("read");
    for option in ["data\\-dir", "metrics\\-addr", "log\\-file"] {
        assert!(
            replica.contains(option),
            "bftfs-replica(1) lacks --{option}"
        );
    }
    // No page for the hidden internals or clap's help.
    assert!(!dir.path().join("bftfs-help.1").exists());
}

#[test]
fn bftfs_replica_runs_the_daemon() {
    let (ok, help, err) = run(&["replica", "--help"]);
    assert!(ok, "{err}");
    for option in [
        "--config",
        "--secrets",
        "--data-dir",
        "--listen",
        "--metrics-addr",
    ] {
        assert!(help.contains(option), "bftfs replica --help lacks {option}");
    }
    // It is the daemon, not a stub: a missing config is reported as the daemon reports it.
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("none.json");
    let (ok, _, err) = run(&[
        "replica",
        "--config",
        &missing.to_string_lossy(),
        "--secrets",
        &missing.to_string_lossy(),
        "--data-dir",
        &dir.path().join("data").to_string_lossy(),
    ]);
    assert!(!ok);
    assert!(err.contains("cannot read the cluster config"), "{err}");
}
