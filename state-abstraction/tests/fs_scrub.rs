//! Scrubbing at checkpoints: bytes flipped on disk behind the service's back change the next
//! checkpoint's digest (and the kept checkpoints' trees), so the replica's checkpoint disagrees
//! with the correct replicas' and it repairs itself by state transfer.

mod common;
use common::*;
use state_abstraction::fs::*;
use state_abstraction::Service;

const ROOT: Handle = Handle::ROOT;

fn flip_byte(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open backend file");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0xFF;
    f.write_all_at(&b, at).expect("write");
}

/// What both services are given: directory `d` with a 200 000-byte file `big` in it, and a
/// small file. Returns (d, big).
fn populate(fs: &mut Fs) -> (Handle, Handle) {
    let d = fs.mkdir(ROOT, "d");
    let f = fs.create(d, "big");
    fs.write(f, 0, &vec![7u8; 200_000]);
    let g = fs.create(ROOT, "small");
    fs.write(g, 0, b"hello");
    (d, f)
}

#[test]
fn damaged_data_changes_the_next_checkpoint_and_the_kept_ones() {
    let (dir, mut fs) = fresh_fs();
    let (_, f) = populate(&mut fs);
    let root1 = fs.svc.checkpoint(1).expect("checkpoint 1");
    let node1 = fs.svc.partition_node(1, 0, 0);
    // Nothing changes: the next checkpoint has the same digest.
    let root2 = fs.svc.checkpoint(2).expect("checkpoint 2");
    assert_eq!(root1, root2);
    assert_eq!(fs.svc.corruptions_found(), 0);

    // A bad disk flips a byte in the third chunk of the big file.
    flip_byte(&dir.path().join("tree/root/d/big"), 150_001);
    let root3 = fs.svc.checkpoint(3).expect("checkpoint 3");
    assert_ne!(root3, root2, "damage went unseen");
    assert_eq!(fs.svc.corruptions_found(), 1);
    // The kept checkpoint shares the damaged bytes: its tree changed too, so a transfer that
    // diffs against it fetches the object.
    let root_leaves_2 = fs.svc.partition_node(2, 0, 0);
    assert_ne!(
        root_leaves_2, node1,
        "kept checkpoint still claims the old digest"
    );
    // Only the damaged chunk differs in the piece digests.
    // Not found by an ordered lookup: that would move the agreed time, which is state too.
    let big = f.index;
    let fresh_dir = temp_dir();
    let mut fresh = Fs::open(fresh_dir.path());
    populate(&mut fresh);
    assert_eq!(
        fresh.svc.checkpoint(3).expect("fresh checkpoint"),
        root1,
        "same operations, same digest"
    );
    let good = fresh.svc.piece_digests_at(3, big).expect("good pieces");
    let bad = fs.svc.piece_digests_at(3, big).expect("bad pieces");
    let differing: Vec<usize> = (0..good.len()).filter(|p| good[*p] != bad[*p]).collect();
    assert_eq!(
        differing,
        vec![3],
        "piece 3 (bytes 131072..196608) holds the flipped byte"
    );
    // Repair: install the good object; the next checkpoint agrees again.
    let obj = fresh.svc.get_obj(big).expect("good object");
    fs.svc.put_objs(vec![(big, obj)]).expect("put_objs");
    assert_eq!(fs.svc.checkpoint(4).expect("checkpoint 4"), root1);
    assert_eq!(fs.read(f, 150_000, 4), vec![7u8; 4]);
}
