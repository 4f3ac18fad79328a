//! Wrapper micro-benchmark: the file service's cost per operation against the system calls a
//! plain server would make for it on the same backend, measured in one run, interleaved,
//! median of several rounds; and the cost of keeping digests up to date on 4 KiB writes.
//!
//! The raw side uses the same `*at` helpers as the wrapper, with directory and file
//! descriptors held open the way the wrapper caches them, so the difference is the wrapper's
//! own work: handle and permission checks, the table, copy-on-write bookkeeping.

use anyhow::{Context, Result};
use nix::sys::stat::{fchmod, Mode};
use state_abstraction::fs::backend as sys;
use state_abstraction::fs::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Directories (backends) to measure on; each gets its own temporary subdirectory.
    #[arg(long = "dir", default_values = ["/var/tmp", "/dev/shm"])]
    dirs: Vec<PathBuf>,
    /// Rounds per measurement; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Operations per batch.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Size of the file for the digest-upkeep measurement, in MiB.
    #[arg(long, default_value_t = 32)]
    file_mib: u64,
}

const ROOT: Handle = Handle::ROOT;

struct Wrapped {
    svc: FileService,
    now: u64,
    caller: Caller,
}

impl Wrapped {
    fn run(&mut self, op: FsOp) -> Result<FsReply> {
        self.now += 1000;
        let req = FsRequest {
            caller: self.caller.clone(),
            op,
        };
        self.svc
            .apply(&req, self.now)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
    fn handle(&mut self, op: FsOp) -> Result<Handle> {
        match self.run(op)? {
            FsReply::Entry { handle, .. } => Ok(handle),
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }

    // One method per operation `round` measures, so that each measurement reads as one line
    // per side.

    fn create(&mut self, dir: Handle, name: Vec<u8>) -> Result<Handle> {
        let how = CreateHow::Guarded;
        self.handle(FsOp::Create {
            dir,
            name,
            mode: 0o644,
            how,
        })
    }

    fn lookup(&mut self, dir: Handle, name: Vec<u8>) -> Result<FsReply> {
        self.run(FsOp::Lookup { dir, name })
    }

    fn chmod(&mut self, h: Handle, mode: u32) -> Result<FsReply> {
        let set = SetAttrs {
            mode: Some(mode),
            ..Default::default()
        };
        self.run(FsOp::SetAttr { h, set })
    }

    fn write(&mut self, h: Handle, data: Vec<u8>) -> Result<FsReply> {
        self.run(FsOp::Write { h, offset: 0, data })
    }

    fn read(&mut self, h: Handle, count: u32) -> Result<FsReply> {
        self.run(FsOp::Read {
            h,
            offset: 0,
            count,
        })
    }

    /// A rename within `dir` that may replace its target.
    fn rename(&mut self, dir: Handle, from_name: Vec<u8>, to_name: Vec<u8>) -> Result<FsReply> {
        let (from_dir, to_dir, no_replace) = (dir, dir, false);
        self.run(FsOp::Rename {
            from_dir,
            from_name,
            to_dir,
            to_name,
            no_replace,
        })
    }

    fn remove(&mut self, dir: Handle, name: Vec<u8>) -> Result<FsReply> {
        self.run(FsOp::Remove { dir, name })
    }

    fn mkdir(&mut self, dir: Handle, name: Vec<u8>) -> Result<FsReply> {
        self.run(FsOp::Mkdir {
            dir,
            name,
            mode: 0o755,
        })
    }

    fn rmdir(&mut self, dir: Handle, name: Vec<u8>) -> Result<FsReply> {
        self.run(FsOp::Rmdir { dir, name })
    }

    /// One page of up to 100 names, from `cookie`.
    fn readdir(&mut self, dir: Handle, cookie: u64) -> Result<FsReply> {
        let (count, plus) = (100, false);
        self.run(FsOp::ReadDir {
            dir,
            cookie,
            count,
            plus,
        })
    }
}

fn median(v: Vec<f64>) -> f64 {
    crate::report::median(&v)
}

fn name(prefix: &str, i: usize) -> Vec<u8> {
    format!("{prefix}{i:06}").into_bytes()
}

/// `f` on each of `items` in turn, up to the first error; what it returns is dropped.
fn each<I: IntoIterator, T, E>(items: I, mut f: impl FnMut(I::Item) -> Result<T, E>) -> Result<()>
where
    anyhow::Error: From<E>,
{
    for item in items {
        f(item)?;
    }
    Ok(())
}

/// Microseconds per operation of `f` over `n` operations.
fn time_us(n: usize, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// The operations `round` measures, in its order, with the system calls of the raw side.
const OPS: [(&str, &str); 10] = [
    ("create", "openat(O_CREAT|O_EXCL)"),
    ("lookup", "fstatat"),
    ("getattr", "fstat"),
    ("setattr (chmod)", "fchmod"),
    ("write 4 KiB", "pwrite"),
    ("read 4 KiB", "pread"),
    ("rename", "renameat"),
    ("remove", "unlinkat+close"),
    ("mkdir", "mkdirat"),
    ("readdir (100 names)", "lseek+getdents64 (3200 B)"),
];

struct Row {
    op: &'static str,
    baseline: &'static str,
    wrapper: Vec<f64>,
    raw: Vec<f64>,
}

/// One round of every operation on both sides, interleaved (the side that goes first
/// alternates by round).
fn round(
    w: &mut Wrapped,
    raw_dir: &OwnedFd,
    n: usize,
    round_no: usize,
    rows: &mut [Row],
) -> Result<()> {
    let rd = raw_dir.as_raw_fd();
    let sub = format!("r{round_no}");
    // Each round works in fresh directories on both sides.
    let wd = w.handle(FsOp::Mkdir {
        dir: ROOT,
        name: sub.clone().into_bytes(),
        mode: 0o755,
    })?;
    sys::mkdirat(rd, sub.as_bytes())?;
    let rdir = sys::open_dir_at(rd, sub.as_bytes())?;
    let r = rdir.as_raw_fd();
    let mut wfiles = Vec::with_capacity(n);
    let mut rfiles: Vec<OwnedFd> = Vec::with_capacity(n);
    let page = vec![7u8; 4096];
    let first_wrapper = round_no % 2 == 0;

    let measure = |row: usize,
                   rows: &mut [Row],
                   wf: &mut dyn FnMut() -> Result<()>,
                   rf: &mut dyn FnMut() -> Result<()>|
     -> Result<()> {
        let (a, b) = if first_wrapper {
            let a = time_us(n, &mut *wf)?;
            (a, time_us(n, &mut *rf)?)
        } else {
            let b = time_us(n, &mut *rf)?;
            (time_us(n, &mut *wf)?, b)
        };
        rows[row].wrapper.push(a);
        rows[row].raw.push(b);
        Ok(())
    };

    // create
    measure(
        0,
        rows,
        &mut || each(0..n, |i| w.create(wd, name("f", i)).map(|h| wfiles.push(h))),
        &mut || {
            each(0..n, |i| {
                sys::create_file_at(r, &name("f", i)).map(|f| rfiles.push(f))
            })
        },
    )?;
    // lookup
    measure(
        1,
        rows,
        &mut || each(0..n, |i| w.lookup(wd, name("f", i))),
        &mut || each(0..n, |i| sys::fstatat(r, &name("f", i))),
    )?;
    // getattr
    measure(
        2,
        rows,
        &mut || each(&wfiles, |h| w.run(FsOp::GetAttr { h: *h })),
        &mut || each(&rfiles, |f| sys::fstat(f.as_raw_fd())),
    )?;
    // setattr (chmod)
    measure(
        3,
        rows,
        &mut || each(&wfiles, |h| w.chmod(*h, 0o600)),
        &mut || each(&rfiles, |f| fchmod(f, Mode::from_bits_retain(0o600))),
    )?;
    // write 4 KiB
    measure(
        4,
        rows,
        &mut || each(&wfiles, |h| w.write(*h, page.clone())),
        &mut || {
            each(&rfiles, |f| {
                let data = page.clone();
                sys::pwrite_full(f.as_raw_fd(), &data, 0)
            })
        },
    )?;
    // read 4 KiB
    measure(
        5,
        rows,
        &mut || each(&wfiles, |h| w.read(*h, 4096)),
        &mut || {
            each(&rfiles, |f| {
                let mut buf = vec![0u8; 4096];
                sys::pread_full(f.as_raw_fd(), &mut buf, 0)
            })
        },
    )?;
    // rename
    measure(
        6,
        rows,
        &mut || each(0..n, |i| w.rename(wd, name("f", i), name("g", i))),
        &mut || {
            each(0..n, |i| {
                sys::renameat(r, &name("f", i), r, &name("g", i), false)
            })
        },
    )?;
    // remove
    measure(
        7,
        rows,
        &mut || each(0..n, |i| w.remove(wd, name("g", i))),
        &mut || {
            // The wrapper closes its cached descriptor of a removed file, which is when
            // the file is really freed; the raw side does the same.
            each(rfiles.drain(..).enumerate(), |(i, f)| {
                sys::unlinkat(r, &name("g", i), false)?;
                drop(f);
                Ok::<_, std::io::Error>(())
            })
        },
    )?;
    // mkdir
    measure(
        8,
        rows,
        &mut || each(0..n, |i| w.mkdir(wd, name("d", i))),
        &mut || each(0..n, |i| sys::mkdirat(r, &name("d", i))),
    )?;
    // readdir: 100 entries per call
    measure(
        9,
        rows,
        &mut || each(0..n, |i| w.readdir(wd, (i % 10) as u64 * 100)),
        &mut || {
            // A plain server seeks its open directory and reads one batch of entries: one
            // lseek and one getdents64 into a buffer that holds about 100 short names.
            let mut buf = vec![0u8; 3200];
            each(0..n, |_| {
                let _ = nix::unistd::lseek(&rdir, 0, nix::unistd::Whence::SeekSet);
                // nix has no getdents64 (its `Dir` is libc's buffered readdir, not one call).
                // SAFETY: a plain system call on a directory fd we own, into `buf`.
                let got =
                    unsafe { libc::syscall(libc::SYS_getdents64, r, buf.as_mut_ptr(), buf.len()) };
                if got < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                std::hint::black_box(&buf);
                Ok(())
            })
        },
    )?;
    // Clean up untimed.
    for i in 0..n {
        w.rmdir(wd, name("d", i))?;
        sys::unlinkat(r, &name("d", i), true)?;
    }
    w.rmdir(ROOT, sub.clone().into_bytes())?;
    drop(rdir);
    sys::unlinkat(rd, sub.as_bytes(), true)?;
    Ok(())
}

/// Digest upkeep on 4 KiB writes: `writes` writes (sequential or random offsets in a file of
/// `file_bytes`) followed by bringing the root digest up to date, against the same writes
/// with the digest work left out. Returns (µs per write without, µs per write with).
fn digest_upkeep(
    w: &mut Wrapped,
    file_bytes: u64,
    writes: usize,
    random: bool,
    round_no: usize,
) -> Result<(f64, f64)> {
    let f = w.handle(FsOp::Create {
        dir: ROOT,
        name: format!("big{round_no}").into_bytes(),
        mode: 0o644,
        how: CreateHow::Guarded,
    })?;
    // Fill the file (untimed) so every chunk has data and a digest.
    let mib = vec![1u8; 1 << 20];
    for off in (0..file_bytes).step_by(1 << 20) {
        w.run(FsOp::Write {
            h: f,
            offset: off,
            data: mib.clone(),
        })?;
    }
    w.svc.root_digest()?;
    let pages = file_bytes / 4096;
    let mut rng = replica::rng::Rng::new(round_no as u64);
    let mut offsets = Vec::with_capacity(writes);
    for i in 0..writes as u64 {
        let page = if random { rng.below(pages) } else { i % pages };
        offsets.push(page * 4096);
    }
    let page = vec![5u8; 4096];
    let pass = |w: &mut Wrapped, digest: bool| -> Result<f64> {
        let t = Instant::now();
        for &off in &offsets {
            w.run(FsOp::Write {
                h: f,
                offset: off,
                data: page.clone(),
            })?;
        }
        if digest {
            w.svc.root_digest()?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / writes as f64)
    };
    // The pass without digest work leaves chunks dirty; fold them in untimed before the
    // next pass so each pass starts clean.
    let (without, with) = if round_no % 2 == 0 {
        let a = pass(w, false)?;
        w.svc.root_digest()?;
        (a, pass(w, true)?)
    } else {
        let b = pass(w, true)?;
        let a = pass(w, false)?;
        w.svc.root_digest()?;
        (a, b)
    };
    w.run(FsOp::Remove {
        dir: ROOT,
        name: format!("big{round_no}").into_bytes(),
    })?;
    Ok((without, with))
}

pub fn run(args: Args) -> Result<()> {
    for base in &args.dirs {
        if !base.is_dir() {
            println!("skipping {}: not a directory", base.display());
            continue;
        }
        let tmp = tempfile::Builder::new()
            .prefix("bftfs-bench-")
            .tempdir_in(base)
            .with_context(|| format!("temp dir in {}", base.display()))?;
        let fstype = fs_type(base);
        println!(
            "\n== backend: {} ({fstype}), {} ops per batch, median of {} rounds ==",
            base.display(),
            args.ops,
            args.rounds
        );
        let svc = FileService::open(&tmp.path().join("replica"))?;
        let mut w = Wrapped {
            svc,
            now: 1_700_000_000_000_000_000,
            caller: Caller::root(),
        };
        std::fs::create_dir(tmp.path().join("raw"))?;
        let raw_dir = sys::open_path(&tmp.path().join("raw"), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let new_rows = || -> Vec<Row> {
            OPS.iter()
                .map(|&(op, baseline)| Row {
                    op,
                    baseline,
                    wrapper: vec![],
                    raw: vec![],
                })
                .collect()
        };
        let mut rows = new_rows();
        // One warm-up round, not counted.
        let mut warm = new_rows();
        round(&mut w, &raw_dir, args.ops, 1000, &mut warm)?;
        for k in 0..args.rounds {
            round(&mut w, &raw_dir, args.ops, k, &mut rows)?;
        }
        println!(
            "{:<22} {:>12} {:>12} {:>8}   raw baseline",
            "operation", "wrapper µs", "raw µs", "ratio"
        );
        for r in &rows {
            let (a, b) = (median(r.wrapper.clone()), median(r.raw.clone()));
            println!(
                "{:<22} {:>12.2} {:>12.2} {:>7.2}x   {}",
                r.op,
                a,
                b,
                a / b,
                r.baseline
            );
        }

        let file_bytes = args.file_mib << 20;
        println!("\ndigest upkeep on 4 KiB writes ({} MiB file, 64 KiB chunks, digests folded in once after the batch):", args.file_mib);
        println!(
            "{:<34} {:>14} {:>14} {:>9}",
            "pattern", "writes µs/op", "+digest µs/op", "overhead"
        );
        for (label, random, writes) in [
            ("sequential, 4096 writes", false, 4096usize),
            ("random, 4096 writes", true, 4096usize),
            ("random, 512 writes", true, 512usize),
        ] {
            let mut without = Vec::new();
            let mut with = Vec::new();
            for k in 0..args.rounds {
                let (a, b) = digest_upkeep(&mut w, file_bytes, writes, random, k)?;
                without.push(a);
                with.push(b);
            }
            print_upkeep(label, median(without), median(with));
        }
        // The worst case: the root digest brought up to date after every single write.
        let mut per_write = Vec::new();
        let mut plain = Vec::new();
        for k in 0..args.rounds {
            let f = w.handle(FsOp::Create {
                dir: ROOT,
                name: format!("each{k}").into_bytes(),
                mode: 0o644,
                how: CreateHow::Guarded,
            })?;
            w.run(FsOp::Write {
                h: f,
                offset: 0,
                data: vec![1u8; 1 << 20],
            })?;
            w.svc.root_digest()?;
            let page = vec![3u8; 4096];
            let n = 1000;
            // µs per write of `n` writes, with the root digest brought up to date after each
            // write or not.
            let writes = |w: &mut Wrapped, digest_each: bool| {
                time_us(n, || {
                    each(0..n, |i| {
                        w.run(FsOp::Write {
                            h: f,
                            offset: (i as u64 % 256) * 4096,
                            data: page.clone(),
                        })?;
                        if digest_each {
                            w.svc.root_digest()?;
                        }
                        Ok::<_, anyhow::Error>(())
                    })
                })
            };
            plain.push(writes(&mut w, false)?);
            w.svc.root_digest()?;
            per_write.push(writes(&mut w, true)?);
            w.run(FsOp::Remove {
                dir: ROOT,
                name: format!("each{k}").into_bytes(),
            })?;
        }
        print_upkeep("digest after every write", median(plain), median(per_write));
    }
    Ok(())
}

/// One row of the digest-upkeep table: µs per write without and with the digest work.
fn print_upkeep(label: &str, without: f64, with: f64) {
    println!(
        "{:<34} {:>14.2} {:>14.2} {:>8.0}%",
        label,
        without,
        with,
        (with / without - 1.0) * 100.0
    );
}

fn fs_type(p: &std::path::Path) -> String {
    std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
