//! `mount.bftfs`: the `bftfs` binary called by mount(8) for `mount -t bftfs` and fstab lines
//! of type `bftfs`, and `bftfs install-helper`, which puts it where mount(8) looks.
//!
//! mount(8) runs `/sbin/mount.bftfs SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]` with an
//! empty environment (no PATH, no HOME) and expects it to return once the file system is
//! mounted. SOURCE is the cluster config; `-o` carries bftfs's own options (`client=FILE`
//! among them) mixed with the generic ones mount(8) adds, which [`MountOptions`] accepts.
//! The mount itself is `bftfs mount --detach`: a background process serves it, logging to
//! the file named by the `log=FILE` option (else nowhere once mount(8) has returned).

use crate::options::MountOptions;
use anyhow::{bail, Context, Result};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use tracing::warn;

/// The names under which `bftfs` acts as a mount helper.
pub const HELPER_NAME: &str = "mount.bftfs";

/// Where mount(8) looks for helpers (the first of /sbin, /sbin/fs.d, /sbin/fs).
pub const HELPER_DIR: &str = "/sbin";

/// mount(8)'s exit statuses for helpers: bad usage, and the mount failed.
const EXIT_USAGE: i32 = 1;
const EXIT_MOUNT_FAILED: i32 = 32;

/// Whether this process was started under the helper's name (argv[0]).
pub fn invoked_as_helper(argv0: Option<&OsStr>) -> bool {
    argv0
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == HELPER_NAME)
}

/// A helper command line, parsed.
#[derive(Debug, PartialEq)]
struct HelperArgs {
    source: PathBuf,
    mountpoint: PathBuf,
    options: Vec<String>,
    /// -f: check everything, mount nothing.
    fake: bool,
    /// -s: ignore options we do not know instead of refusing them.
    sloppy: bool,
    verbose: bool,
}

fn parse_args(args: &[OsString]) -> Result<HelperArgs> {
    let mut positional: Vec<PathBuf> = Vec::new();
    let mut options = Vec::new();
    let (mut fake, mut sloppy, mut verbose) = (false, false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str() else {
            positional.push(PathBuf::from(arg));
            continue;
        };
        match text {
            "-o" => {
                let Some(value) = it.next() else {
                    bail!("-o needs a list of options");
                };
                options.push(
                    value
                        .to_str()
                        .context("mount options are not valid UTF-8")?
                        .to_string(),
                );
            }
            // The type (bftfs) is ours by definition.
            "-t" => {
                it.next();
            }
            "-N" => bail!("-N (mount in another namespace) is not supported by mount.bftfs"),
            "-h" | "--help" => {
                bail!("usage: mount.bftfs CLUSTER.json MOUNTPOINT [-sfnv] [-o client=FILE,OPTIONS]")
            }
            flags if flags.starts_with('-') && flags.len() > 1 => {
                for c in flags[1..].chars() {
                    match c {
                        'f' => fake = true,
                        's' => sloppy = true,
                        'v' => verbose = true,
                        // -n: do not write /etc/mtab; there is none to write.
                        'n' => {}
                        _ => bail!("unknown flag -{c} (mount.bftfs takes -s, -f, -n, -v, -o)"),
                    }
                }
            }
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let [source, mountpoint]: [PathBuf; 2] = positional.try_into().map_err(|p: Vec<PathBuf>| {
        anyhow::anyhow!(
            "expected CLUSTER.json and MOUNTPOINT, got {} arguments (usage: mount.bftfs CLUSTER.json MOUNTPOINT [-o client=FILE,OPTIONS])",
            p.len()
        )
    })?;
    Ok(HelperArgs {
        source,
        mountpoint,
        options,
        fake,
        sloppy,
        verbose,
    })
}

/// Mount options from the helper's `-o` lists, and the `log=FILE` option; with `sloppy`,
/// unknown options are dropped with a warning instead of refused.
fn parse_options(raw: &[String], sloppy: bool) -> Result<(MountOptions, Option<PathBuf>)> {
    let mut o = MountOptions::default();
    let mut log = None;
    for item in raw.iter().flat_map(|a| a.split(',')) {
        // Where the background process logs: mount(8) returns once mounted, and with it goes
        // the stderr the process had, so fstab needs a place to name a log file.
        if let Some(path) = item.strip_prefix("log=") {
            if path.is_empty() {
                bail!("option log= needs a file name");
            }
            log = Some(PathBuf::from(path));
            continue;
        }
        if let Err(e) = o.apply(item) {
            if sloppy && e.starts_with("unknown mount option") {
                warn!("ignoring mount option `{item}` (-s)");
            } else {
                bail!("{e}");
            }
        }
    }
    Ok((o, log))
}

/// Runs as mount(8)'s helper; returns the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    // mount(8) runs helpers with no PATH; fusermount3 (for auto_unmount, or as an ordinary
    // user) must still be found.
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    let parsed = match parse_args(&args).and_then(|a| {
        let o = parse_options(&a.options, a.sloppy)?;
        Ok((a, o))
    }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mount.bftfs: {e:#}");
            return EXIT_USAGE;
        }
    };
    let (args, (options, log)) = parsed;
    if let Some(log) = log {
        let Ok(abs) = std::path::absolute(&log) else {
            eprintln!("mount.bftfs: log={}: not a usable path", log.display());
            return EXIT_USAGE;
        };
        crate::up::set_forwarded_log_args(vec![
            "--log-file".into(),
            abs.to_string_lossy().into_owned(),
        ]);
    }
    let result = (|| {
        if args.fake {
            // Everything mount(8) would have us check, without mounting.
            crate::cluster::read_config(&args.source)?;
            if let Some(c) = &options.client {
                std::fs::metadata(c)
                    .with_context(|| format!("cannot read the client file {}", c.display()))?;
            }
            return Ok(());
        }
        let client = options.client.clone();
        crate::up::mount(
            &args.source,
            &args.mountpoint,
            options,
            client.as_deref(),
            true,
            false,
            !args.verbose,
        )
    })();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mount.bftfs: {e:#}");
            EXIT_MOUNT_FAILED
        }
    }
}

/// Whether a helper link's target is a bftfs: this executable, or one named bftfs*
/// (another build's).
fn is_ours(target: &Path) -> bool {
    let this = std::env::current_exe().and_then(|e| e.canonicalize()).ok();
    this.as_deref() == Some(target)
        || target
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("bftfs"))
}

/// `bftfs install-helper`: makes `DIR/mount.bftfs` a symbolic link to this executable, so
/// that `mount -t bftfs` and fstab find it. Replaces an older link to a bftfs, never
/// anything else. Returns the link's path.
pub fn install(dir: &Path) -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .and_then(|e| e.canonicalize())
        .context("cannot find the bftfs executable")?;
    let link = dir.join(HELPER_NAME);
    match std::fs::symlink_metadata(&link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(&link)
                .with_context(|| format!("cannot read the link {}", link.display()))?;
            if target == exe {
                return Ok(link);
            }
            if !is_ours(&target) {
                bail!(
                    "{} already links to {}, which is not bftfs; remove it first",
                    link.display(),
                    target.display()
                );
            }
            std::fs::remove_file(&link)
                .with_context(|| format!("cannot replace {}", link.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a symbolic link; remove it first",
            link.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot look at {}: {e}", link.display()),
    }
    std::os::unix::fs::symlink(&exe, &link).with_context(|| {
        format!(
            "cannot create {} (run as root, or choose --dir)",
            link.display()
        )
    })?;
    Ok(link)
}

/// `bftfs install-helper --remove`: removes `DIR/mount.bftfs` if it links to a bftfs.
pub fn uninstall(dir: &Path) -> Result<Option<PathBuf>> {
    let link = dir.join(HELPER_NAME);
    match std::fs::read_link(&link) {
        Ok(target) if is_ours(&target) => {
            std::fs::remove_file(&link)
                .with_context(|| format!("cannot remove {}", link.display()))?;
            Ok(Some(link))
        }
        Ok(target) => bail!(
            "{} links to {}, not to bftfs; left alone",
            link.display(),
            target.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => bail!(
            "{} is not a link this command made ({e}); left alone",
            link.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn mount_8_calling_convention() {
        let a = parse_args(&args(&[
            "/etc/bftfs/cluster.json",
            "/mnt/x",
            "-o",
            "rw,noatime,client=/k/c.json,_netdev",
        ]))
        .expect("parses");
        assert_eq!(a.source, Path::new("/etc/bftfs/cluster.json"));
        assert_eq!(a.mountpoint, Path::new("/mnt/x"));
        assert_eq!(a.options, vec!["rw,noatime,client=/k/c.json,_netdev"]);
        assert!(!a.fake && !a.sloppy);
        let a = parse_args(&args(&["-sfnv", "c.json", "-t", "bftfs", "/m", "-o", "ro"]))
            .expect("flags anywhere");
        assert!(a.fake && a.sloppy && a.verbose);
        assert_eq!(a.options, vec!["ro"]);
        for bad in [
            &["c.json"][..],
            &["c.json", "/m", "extra"],
            &["c.json", "/m", "-o"],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
        }
        assert!(parse_args(&args(&["c.json", "/m", "-N", "/proc/1/ns/mnt"])).is_err());
        assert!(parse_args(&args(&["c.json", "/m", "-x"])).is_err());
    }

    #[test]
    fn sloppy_drops_unknown_options_only() {
        let raw = vec!["noexec,frobnicate".to_string()];
        assert!(parse_options(&raw, false).is_err());
        let (o, log) = parse_options(&raw, true).expect("sloppy");
        assert!(o.no_exec && log.is_none());
        let (_, log) =
            parse_options(&["ro,log=/var/log/bftfs.log".to_string()], false).expect("log=");
        assert_eq!(log.as_deref(), Some(Path::new("/var/log/bftfs.log")));
        assert!(parse_options(&["log=".to_string()], false).is_err());
        // A known option with a bad value is wrong even when sloppy.
        assert!(parse_options(&["threads=0".to_string()], true).is_err());
    }

    #[test]
    fn helper_name() {
        assert!(invoked_as_helper(Some(OsStr::new("/sbin/mount.bftfs"))));
        assert!(invoked_as_helper(Some(OsStr::new("mount.bftfs"))));
        assert!(!invoked_as_helper(Some(OsStr::new("bftfs"))));
        assert!(!invoked_as_helper(None));
    }

    #[test]
    fn install_and_remove_a_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = install(dir.path()).expect("install");
        assert!(std::fs::read_link(&link).is_ok());
        assert_eq!(install(dir.path()).expect("again"), link);
        assert_eq!(uninstall(dir.path()).expect("remove"), Some(link.clone()));
        assert_eq!(uninstall(dir.path()).expect("nothing"), None);
        std::os::unix::fs::symlink("/bin/true", &link).expect("foreign link");
        assert!(install(dir.path()).is_err());
        assert!(uninstall(dir.path()).is_err());
    }
}
