//! A state larger than the descriptor caches: flush, state transfer into a fresh directory,
//! and crash recovery must neither run out of descriptors nor lose anything.

mod common;
use common::*;
use state_abstraction::fs::*;
use state_abstraction::Service;

/// On tmpfs when there is one: this test is about the wrapper, and creating 20 000 inodes on
/// the shared VM's ext4 disk alone takes minutes.
fn scratch() -> tempfile::TempDir {
    shm_dir().unwrap_or_else(temp_dir)
}

#[test]
fn twenty_thousand_objects() {
    let dir = scratch();
    let mut fs = Fs::open(dir.path());
    for d in 0..40 {
        let h = fs.mkdir(Handle::ROOT, &format!("d{d}"));
        for f in 0..250 {
            let x = fs.create(h, &format!("f{f}"));
            fs.write(x, 0, format!("{d}/{f}").as_bytes());
        }
        for s in 0..250 {
            fs.mkdir(h, &format!("s{s}"));
        }
    }
    let t = std::time::Instant::now();
    fs.svc.flush().expect("flush");
    eprintln!(
        "first flush of {} objects: {:?}",
        fs.svc.object_count(),
        t.elapsed()
    );
    let x = fs.create(Handle::ROOT, "one-more");
    fs.write(x, 0, b"x");
    let t = std::time::Instant::now();
    fs.svc.flush().expect("flush");
    eprintln!("next flush: {:?}", t.elapsed());
    let cp = fs.svc.checkpoint(1).expect("checkpoint");
    // Touch everything after the checkpoint, then crash.
    for d in 0..40 {
        let (h, _) = fs.entry(FsOp::Lookup {
            dir: Handle::ROOT,
            name: format!("d{d}").into_bytes(),
        });
        fs.run(FsOp::Rename {
            from_dir: h,
            from_name: b"f0".to_vec(),
            to_dir: Handle::ROOT,
            to_name: format!("moved{d}").into_bytes(),
            no_replace: false,
        })
        .expect("rename");
        fs.rmdir(h, b"s0").expect("rmdir");
    }
    let fresh = scratch();
    let mut other = Fs::open(fresh.path());
    let objs = (0..fs.svc.object_count())
        .map(|i| (i, fs.svc.get_obj(i).expect("get")))
        .collect();
    let t = std::time::Instant::now();
    other.svc.put_objs(objs).expect("put_objs");
    eprintln!("put_objs: {:?}", t.elapsed());
    assert_eq!(other.digest(), fs.digest());
    fs.svc.simulate_crash();
    let t = std::time::Instant::now();
    let mut fs = Fs::open(dir.path());
    eprintln!("crash recovery: {:?}", t.elapsed());
    assert_eq!(fs.digest(), cp);
}
