//! LINK_MAX (65000, as ext4) for hard links and for subdirectories, which each add a link to
//! their parent: the link or directory that would pass it fails with EMLINK, and removing
//! one makes room again.

mod common;
use common::*;
use state_abstraction::fs::object::LINK_MAX;
use state_abstraction::fs::*;

const ROOT: Handle = Handle::ROOT;

/// tmpfs where there is one: 65,000 directories cost minutes on a loaded ext4 (creating and
/// removing them), and the limit is the wrapper's, not the backend's.
fn scratch() -> tempfile::TempDir {
    shm_dir().unwrap_or_else(temp_dir)
}

#[test]
fn link_max_is_ext4s() {
    assert_eq!(LINK_MAX, 65_000);
    let statfs_namemax = {
        let (_dir, mut fs) = fresh_fs();
        match fs.run(FsOp::StatFs { h: ROOT }) {
            Ok(FsReply::StatFs(s)) => s.namemax,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(statfs_namemax, 255);
}

#[test]
fn hard_links_stop_at_link_max() {
    let dir = scratch();
    let mut fs = Fs::open(dir.path());
    let f = fs.create(ROOT, "f");
    let links = fs.mkdir(ROOT, "links");
    for i in 1..LINK_MAX {
        let r = fs.link(f, links, i.to_string().into_bytes());
        assert!(r.is_ok(), "link {i}: {r:?}");
    }
    assert_eq!(fs.attr(f).nlink, LINK_MAX);
    let one_more = FsOp::Link {
        h: f,
        dir: links,
        name: b"one-more".to_vec(),
    };
    assert_eq!(fs.run(one_more.clone()), Err(FsError::MLink));
    // An existing name is still EEXIST, which Linux checks first.
    assert_eq!(fs.link(f, links, b"1"), Err(FsError::Exist));
    fs.remove(links, b"1").expect("unlink");
    assert!(fs.run(one_more).is_ok(), "room again after an unlink");
}

#[test]
fn subdirectories_stop_at_link_max() {
    let dir = scratch();
    let mut fs = Fs::open(dir.path());
    let d = fs.mkdir(ROOT, "d");
    // A directory starts with 2 links ("d" and its own "."); each subdirectory's ".." adds one.
    for i in 0..LINK_MAX - 2 {
        fs.mkdir(d, &i.to_string());
    }
    assert_eq!(fs.attr(d).nlink, LINK_MAX);
    let mkdir = FsOp::Mkdir {
        dir: d,
        name: b"one-more".to_vec(),
        mode: 0o755,
    };
    assert_eq!(fs.run(mkdir.clone()), Err(FsError::MLink));
    // Files do not count; moving a directory in does, moving one within does not.
    fs.create(d, "file");
    fs.mkdir(ROOT, "outside");
    let into = FsOp::Rename {
        from_dir: ROOT,
        from_name: b"outside".to_vec(),
        to_dir: d,
        to_name: b"outside".to_vec(),
        no_replace: false,
    };
    assert_eq!(fs.run(into.clone()), Err(FsError::MLink));
    fs.rename(d, b"0", d, b"zero").expect("rename within");
    fs.rmdir(d, b"zero").expect("rmdir");
    assert!(fs.run(into).is_ok(), "room again after an rmdir");
    assert_eq!(fs.run(mkdir), Err(FsError::MLink));
}
