//! `bftfs-bench replay` end to end against plain temporary directories (no FUSE needed): the
//! real sample trace in ../shared/traces, and small traces written here that exercise the
//! initial-tree reconstruction, gzip input and malformed lines.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bftfs-bench"))
}

fn replay_json(trace: &Path, extra: &[&str]) -> serde_json::Value {
    let mount = tempfile::tempdir().expect("temp dir");
    let json = mount.path().join("out.json");
    let out = bench()
        .arg("replay")
        .arg(trace)
        .arg("--mount")
        .arg(mount.path())
        .arg("--max")
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .expect("run bftfs-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replay failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse json");
    // The replay directory is removed afterwards: only out.json is left.
    let left: Vec<_> = std::fs::read_dir(mount.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "left behind: {left:?}\n{stdout}");
    value
}

fn sample_trace() -> Option<PathBuf> {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/sample-small.nfsdump.zst");
    p.exists().then_some(p)
}

#[test]
fn sample_trace_replays_into_a_temp_dir_and_agrees_with_the_trace() {
    let Some(trace) = sample_trace() else {
        eprintln!("SKIPPED: ../shared/traces/sample-small.nfsdump.zst not found");
        return;
    };
    let v = replay_json(&trace, &[]);
    let run = &v["runs"][0];
    assert_eq!(v["lines"], 37_154);
    assert_eq!(v["malformed"], 0);
    let replayed = run["replayed"].as_u64().expect("replayed");
    let agreement = run["agreement"].as_f64().expect("agreement");
    eprintln!(
        "sample trace: {replayed} replayed, agreement {agreement:.5}, unmapped {}",
        run["unmapped"]
    );
    // 18,577 calls less the one NULL (nothing to replay).
    assert_eq!(replayed, 18_576, "{run}");
    // Measured: 18,576 of 18,576 agree on ext4 and tmpfs as root.
    assert!(agreement >= 0.99, "agreement {agreement}: {run}");
    assert_eq!(run["unmapped"]["null procedure (nothing to replay)"], 1);
    assert!(run["latency"]["lookup"]["count"].as_u64().unwrap_or(0) >= 13_000);
}

/// A trace that uses objects it never creates: a directory and a file found by LOOKUP, a file
/// handle never looked up (placeholder path), a name removed without an earlier reply, plus a
/// malformed line, an orphan reply and a call without a reply. Written gzip-compressed.
#[test]
fn initial_tree_is_reconstructed_and_malformed_lines_are_counted() {
    let c = "0a000001.0300 0a000002.0801 U C3";
    let r = "0a000002.0801 0a000001.0300 U R3";
    let tail_c = "euid 0 egid 0 con = 96 len = 96";
    let tail_r = |s: &str| format!("status={s} pl = 0 con = 1 len = 1");
    let dir_attr = "ftype 2 mode 1ed nlink 2 uid 0 gid 0 size 1000";
    let lines = vec![
        format!("1.000001 {c} 1 13 fsinfo fh 00 {tail_c}"),
        format!("1.000002 {r} 1 13 fsinfo OK {dir_attr} {}", tail_r("0")),
        format!("1.000003 {c} 2 3 lookup fh 00 name \"old%20dir\" {tail_c}"),
        format!("1.000004 {r} 2 3 lookup OK fh d1 {dir_attr} {dir_attr} {}", tail_r("0")),
        format!("1.000005 {c} 3 3 lookup fh d1 name \"data.bin\" {tail_c}"),
        format!("1.000006 {r} 3 3 lookup OK fh f1 ftype 1 mode 1a4 nlink 1 uid 0 gid 0 size 3000 {dir_attr} {}", tail_r("0")),
        format!("1.000007 {c} 4 6 read fh f1 off 2000 count 1000 {tail_c}"),
        format!("1.000008 {r} 4 6 read OK ftype 1 mode 1a4 size 3000 count 1000 eof 1 {}", tail_r("0")),
        // A handle never returned by any reply: gets a placeholder path, made as a file of 0x20.
        format!("1.000009 {c} 5 1 getattr fh f9 {tail_c}"),
        format!("1.000010 {r} 5 1 getattr OK ftype 1 mode 1a4 size 20 {}", tail_r("0")),
        format!("1.000011 {c} 6 7 write fh f9 off 10 count 10 stable F {tail_c}"),
        format!("1.000012 {r} 6 7 write OK ftype 1 mode 1a4 size 20 count 10 stable F {}", tail_r("0")),
        // Removed without any earlier reply showing it: must exist up front.
        format!("1.000013 {c} 7 c remove fh d1 name \"stale.log\" {tail_c}"),
        format!("1.000014 {r} 7 c remove OK {}", tail_r("0")),
        "this line is garbage".to_string(),
        format!("1.000015 {c} 8 e rename fh d1 name \"data.bin\" fh2 d1 name2 \"moved.bin\" {tail_c}"),
        format!("1.000016 {r} 8 e rename OK {}", tail_r("0")),
        // After the rename the handle names the new path.
        format!("1.000017 {c} 9 15 commit fh f1 off 0 count 0 {tail_c}"),
        format!("1.000018 {r} 9 15 commit OK {}", tail_r("0")),
        format!("1.000019 {c} a 3 lookup fh d1 name \"data.bin\" {tail_c}"),
        format!("1.000020 {r} a 3 lookup 2 {dir_attr} {}", tail_r("2")),
        format!("1.000021 {c} b d rmdir fh 00 name \"old%20dir\" {tail_c}"),
        format!("1.000022 {r} b d rmdir 42 {}", tail_r("42")),
        format!("1.000023 {r} ff 1 getattr OK {}", tail_r("0")),
        format!("1.000024 {c} c 1 getattr fh 00 {tail_c}"),
        format!("1.000025 {c} d 1 getattr fh 00 euid 0"),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("small.nfsdump.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&trace).expect("create"),
        flate2::Compression::fast(),
    );
    for line in &lines {
        writeln!(gz, "{line}").expect("write");
    }
    gz.finish().expect("finish gzip");

    let v = replay_json(&trace, &[]);
    let run = &v["runs"][0];
    assert_eq!(v["lines"], lines.len());
    assert_eq!(v["malformed"], 2, "{v}");
    assert_eq!(v["malformed_first"][0]["line"], 15);
    assert_eq!(v["malformed_first"][1]["line"], 26);
    assert_eq!(run["replayed"], 11, "{run}");
    assert_eq!(run["agreed"], 11, "{run}");
    assert_eq!(run["unmapped"]["reply without call"], 1);
    assert_eq!(run["unmapped"]["call without reply"], 1);
}
