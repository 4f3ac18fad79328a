//! Client mount options (`-o name=value,...`) and their defaults.

use std::time::Duration;

/// How long the kernel may trust attributes and directory entries without asking again.
/// One second, like NFS's `actimeo` lower bound: long enough to absorb the bursts of
/// getattr/lookup a single `ls -l` or `make` makes, short enough that another client's change
/// shows up quickly.
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);

/// How long a request may wait for the cluster. Long enough to ride out a view change, short
/// enough that a dead cluster shows up as EIO rather than as programs hanging forever.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// FUSE worker threads. Each blocks on one request to the service; with the replicated
/// transport a request waits a network round trip, so more threads than cores pay off.
pub const DEFAULT_THREADS: usize = 8;

/// How long a mount's fcntl/flock locks outlive its last renewal: a mount that dies (or is
/// cut off) holds its locks this long at most. The mount renews every third of it.
pub const DEFAULT_LOCK_LEASE: Duration = Duration::from_secs(30);

/// Help text for `-o`, shown by `--help`.
pub const OPTIONS_HELP: &str = "Mount options, comma-separated: sync (every write(2) returns \
only once the replicas hold the data) or async (the default: write(2) returns at once, the data \
reaches the replicas in the background within about 5 seconds and at the latest when close(2) or \
fsync(2) returns, which then report any write the replicas refused; a crash of this client may \
lose data written but not yet closed or fsync'ed; creating, renaming, removing files and \
changing attributes are synchronous in both modes), attr_timeout=SECONDS (default 1), \
entry_timeout=SECONDS (default 1), timeout=SECONDS (a request the cluster does not answer in \
time fails with EIO; default 30), threads=N (FUSE worker threads, default 8), \
allow_other (let other users in; default when run as root), ro, noexec, noatime, \
auto_unmount (a helper process, fusermount3, unmounts the file system if bftfs dies, so the \
mount point is never left \"not connected\"; needs allow_other), lock_lease=SECONDS (fcntl \
and flock locks are shared by every mount of the cluster; a mount that dies loses its locks \
this long after its last renewal; 1 to 600, default 30), local_locks (fcntl and flock locks are \
kept by this machine's kernel only, as before), lock_cache=off (under a `bftfs lock`, send \
every read to the replicas instead of answering it from this mount's cache; see the README), \
locks=off|manual|auto (Zzyzx locks: auto, the default, takes one on a directory (not the \
mount's root) where this mount made 16 changes within 2 seconds, and gives it back when \
another mount needs it or after lock_idle=SECONDS without use, default 30; manual takes them \
only on `bftfs lock`; off refuses them and sends every call through agreement), client=FILE (bftfs mount: \
this client's secrets, as --client), metrics=HOST:PORT (serve this mount's metrics at \
http://HOST:PORT/metrics, as --metrics). A bftfs mount is always nodev and nosuid (any client of \
the cluster could plant a device or set-user-id file); the options mount(8) and fstab add \
(rw, dev, suid, exec, atime, relatime, dirsync, defaults, auto, noauto, user, nouser, \
_netdev, nofail, x-..., ...) are accepted and change nothing";

/// Options mount(8), fstab entries and mount.fuse3 pass along that mean nothing for a bftfs
/// mount: accepted, so that an fstab line written for any file system works, and ignored.
/// `dev` and `suid` are here too: a bftfs mount stays nodev,nosuid whatever is asked, since
/// a client's key vouches for the client, not for the uid it states.
const NO_EFFECT: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "atime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    // Directory changes are always synchronous.
    "dirsync",
    "silent",
    "loud",
    "nonempty",
    "default_permissions",
];

/// Prefixes of `name=value` options of the same kind: userspace-only fstab annotations
/// (`x-systemd.automount`, `comment=`), names mount(8) or mount.fuse3 add, SELinux labels.
const NO_EFFECT_PREFIXES: &[&str] = &[
    "x-",
    "comment=",
    "fsname=",
    "subtype=",
    "helper=",
    "uhelper=",
    "context=",
    "fscontext=",
    "defcontext=",
    "rootcontext=",
];

/// An automatic Zzyzx lock unused this long is given back (`-o lock_idle=`).
pub const DEFAULT_LOCK_IDLE: Duration = Duration::from_secs(30);

/// Who takes Zzyzx locks for a mount (`-o locks=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockPolicy {
    /// None: `bftfs lock` is refused.
    Off,
    /// Only on `bftfs lock`.
    Manual,
    /// Also on a directory this mount changes often without contention.
    Auto,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MountOptions {
    /// TTL of attributes the kernel caches (stat results).
    pub attr_timeout: Duration,
    /// TTL of name → inode entries the kernel caches.
    pub entry_timeout: Duration,
    /// How long a request may wait for the cluster before the adapter answers EIO. Applied by
    /// transports that can wait (the replicated one); the local service never waits.
    pub request_timeout: Duration,
    pub threads: usize,
    /// `None`: decide by who we are (allow_other when root).
    pub allow_other: Option<bool>,
    pub read_only: bool,
    /// fusermount3 stays behind and unmounts if this process dies (FUSE's `auto_unmount`).
    pub auto_unmount: bool,
    /// Kernel flags: no execution of files on the mount; no access-time updates.
    pub no_exec: bool,
    pub no_atime: bool,
    /// `sync`: every write goes to the replicas before `write(2)` returns. Otherwise (`async`,
    /// the default) writes are buffered in this process and sent in the background, at the
    /// latest at close and fsync ([`crate::write_back`]).
    pub sync: bool,
    /// `client=FILE`: this client's secrets file (for `bftfs mount` and mount.bftfs, where
    /// fstab has no other place for it).
    pub client: Option<std::path::PathBuf>,
    /// Lease of this mount's fcntl/flock locks on the replicas (`lock_lease=S`).
    pub lock_lease: Duration,
    /// `local_locks`: leave fcntl/flock locks to this machine's kernel (not shared).
    pub local_locks: bool,
    /// `lock_cache=on|off`: answer reads under a Zzyzx lock from the mount's cache (on, the
    /// default) or send each to the lock's log servers.
    pub lock_cache: bool,
    /// `locks=off|manual|auto`: whether the mount takes Zzyzx locks, and who decides.
    pub locks: LockPolicy,
    /// `lock_idle=S`: an automatic lock no call used this long is given back.
    pub lock_idle: Duration,
    /// `metrics=HOST:PORT`: serve this mount's metrics at http://HOST:PORT/metrics.
    pub metrics: Option<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            attr_timeout: DEFAULT_TTL,
            entry_timeout: DEFAULT_TTL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            threads: DEFAULT_THREADS,
            allow_other: None,
            read_only: false,
            auto_unmount: false,
            no_exec: false,
            no_atime: false,
            sync: false,
            client: None,
            lock_lease: DEFAULT_LOCK_LEASE,
            local_locks: false,
            lock_cache: true,
            locks: LockPolicy::Auto,
            lock_idle: DEFAULT_LOCK_IDLE,
            metrics: None,
        }
    }
}

fn parse_seconds(name: &str, value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("option {name}={value}: expected a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!(
            "option {name}={value}: must be between 0 and 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl MountOptions {
    /// Applies one `-o` argument (which may hold several comma-separated options).
    pub fn apply(&mut self, arg: &str) -> Result<(), String> {
        for item in arg.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item, None),
            };
            match (name, value) {
                ("attr_timeout", Some(v)) => self.attr_timeout = parse_seconds(name, v)?,
                ("entry_timeout", Some(v)) => self.entry_timeout = parse_seconds(name, v)?,
                ("timeout", Some(v)) => self.request_timeout = parse_seconds(name, v)?,
                ("threads", Some(v)) => {
                    self.threads = match v.parse::<usize>() {
                        Ok(n) if (1..=256).contains(&n) => n,
                        _ => return Err(format!("option threads={v}: expected 1..=256")),
                    }
                }
                ("allow_other", None) => self.allow_other = Some(true),
                ("ro", None) => self.read_only = true,
                ("rw", None) => self.read_only = false,
                ("auto_unmount", None) => self.auto_unmount = true,
                ("noexec", None) => self.no_exec = true,
                ("exec", None) => self.no_exec = false,
                ("noatime", None) => self.no_atime = true,
                ("atime", None) => self.no_atime = false,
                ("sync", None) => self.sync = true,
                ("async", None) => self.sync = false,
                ("client", Some(v)) if !v.is_empty() => self.client = Some(v.into()),
                ("lock_lease", Some(v)) => {
                    self.lock_lease = parse_seconds(name, v)?;
                    if !(1.0..=600.0).contains(&self.lock_lease.as_secs_f64()) {
                        return Err(format!("option lock_lease={v}: expected 1 to 600 seconds"));
                    }
                }
                ("local_locks", None) => self.local_locks = true,
                ("lock_cache", Some("on")) => self.lock_cache = true,
                ("lock_cache", Some("off")) => self.lock_cache = false,
                ("lock_cache", Some(v)) => {
                    return Err(format!("option lock_cache={v}: expected on or off"));
                }
                ("lock_idle", Some(v)) => {
                    self.lock_idle = parse_seconds(name, v)?;
                    if !(0.5..=3600.0).contains(&self.lock_idle.as_secs_f64()) {
                        return Err(format!(
                            "option lock_idle={v}: expected 0.5 to 3600 seconds"
                        ));
                    }
                }
                ("locks", Some(v)) => {
                    self.locks = match v {
                        "off" => LockPolicy::Off,
                        "manual" => LockPolicy::Manual,
                        "auto" => LockPolicy::Auto,
                        _ => return Err(format!("option locks={v}: expected off, manual or auto")),
                    }
                }
                ("metrics", Some(v)) if !v.is_empty() => self.metrics = Some(v.to_string()),
                (n, None) if NO_EFFECT.contains(&n) => {}
                _ if NO_EFFECT_PREFIXES.iter().any(|p| item.starts_with(p)) => {}
                _ => {
                    return Err(format!(
                        "unknown mount option `{item}` (known: attr_timeout=S, entry_timeout=S, \
                         timeout=S, threads=N, sync, async, allow_other, ro, rw, noexec, \
                         noatime, auto_unmount, lock_lease=S, local_locks, lock_cache=on|off, \
                         locks=off|manual|auto, lock_idle=S, client=FILE, \
                         metrics=HOST:PORT, and the generic ones mount(8) passes)"
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn parse_all<'a>(args: impl IntoIterator<Item = &'a String>) -> Result<Self, String> {
        let mut o = MountOptions::default();
        for a in args {
            o.apply(a)?;
        }
        Ok(o)
    }

    /// The `-o` string that reproduces these options (for re-executing a detached child).
    pub fn to_arg(&self) -> String {
        let mut parts = vec![
            format!("attr_timeout={}", self.attr_timeout.as_secs_f64()),
            format!("entry_timeout={}", self.entry_timeout.as_secs_f64()),
            format!("timeout={}", self.request_timeout.as_secs_f64()),
            format!("threads={}", self.threads),
            format!("lock_lease={}", self.lock_lease.as_secs_f64()),
        ];
        if self.local_locks {
            parts.push("local_locks".into());
        }
        if !self.lock_cache {
            parts.push("lock_cache=off".into());
        }
        if self.lock_idle != DEFAULT_LOCK_IDLE {
            parts.push(format!("lock_idle={}", self.lock_idle.as_secs_f64()));
        }
        match self.locks {
            LockPolicy::Auto => {}
            LockPolicy::Off => parts.push("locks=off".into()),
            LockPolicy::Manual => parts.push("locks=manual".into()),
        }
        if self.allow_other == Some(true) {
            parts.push("allow_other".into());
        }
        if self.read_only {
            parts.push("ro".into());
        }
        if self.auto_unmount {
            parts.push("auto_unmount".into());
        }
        if self.no_exec {
            parts.push("noexec".into());
        }
        if self.no_atime {
            parts.push("noatime".into());
        }
        if self.sync {
            parts.push("sync".into());
        }
        if let Some(address) = &self.metrics {
            // HOST:PORT holds no comma (an IPv6 address is written [::1]:9400).
            parts.push(format!("metrics={address}"));
        }
        // `client` is left out: a path may hold a comma. Callers pass it as --client.
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let o = MountOptions::parse_all(&["attr_timeout=0.5,entry_timeout=2".to_string()])
            .expect("valid");
        assert_eq!(o.attr_timeout, Duration::from_millis(500));
        assert_eq!(o.entry_timeout, Duration::from_secs(2));
        assert_eq!(o.threads, DEFAULT_THREADS);
        let o = MountOptions::parse_all(&[
            "attr_timeout=0,timeout=5".to_string(),
            "threads=3,ro".to_string(),
        ])
        .expect("valid");
        assert_eq!(o.attr_timeout, Duration::ZERO);
        assert_eq!(o.request_timeout, Duration::from_secs(5));
        assert_eq!(o.threads, 3);
        assert!(o.read_only);
    }

    #[test]
    fn round_trip_through_arg() {
        let mut o = MountOptions::default();
        o.apply("attr_timeout=0.25,timeout=7.5,threads=2,allow_other,auto_unmount,sync")
            .expect("valid");
        o.apply("lock_lease=2.5,local_locks,lock_cache=off")
            .expect("valid");
        assert!(!o.lock_cache);
        assert!(o.to_arg().contains("lock_cache=off"));
        assert!(o.clone().apply("lock_cache=maybe").is_err());
        // Automatic locks are the default: only another choice is written out.
        assert_eq!(o.locks, LockPolicy::Auto);
        assert!(!o.to_arg().contains("locks="));
        o.apply("locks=manual,lock_idle=2").expect("valid");
        assert_eq!(o.lock_idle, Duration::from_secs(2));
        assert!(o.to_arg().contains("lock_idle=2"));
        assert!(o.clone().apply("lock_idle=0").is_err());
        assert_eq!(o.locks, LockPolicy::Manual);
        assert!(o.to_arg().contains("locks=manual"));
        assert!(o.clone().apply("locks=sometimes").is_err());
        assert_eq!(o.lock_lease, Duration::from_millis(2500));
        assert!(MountOptions::parse_all(&["lock_lease=0.5".to_string()]).is_err());
        assert!(o.sync);
        let back = MountOptions::parse_all(&[o.to_arg()]).expect("valid");
        assert_eq!(back, o);
    }

    #[test]
    fn sync_and_async_choose_the_write_mode_last_one_wins() {
        assert!(!MountOptions::default().sync, "write-back is the default");
        assert!(
            MountOptions::parse_all(&["sync".to_string()])
                .expect("valid")
                .sync
        );
        let o =
            MountOptions::parse_all(&["sync,ro".to_string(), "async".to_string()]).expect("valid");
        assert!(!o.sync && o.read_only);
        assert!(!MountOptions::parse_all(&[o.to_arg()]).expect("valid").sync);
    }

    #[test]
    fn what_mount_8_and_fstab_pass_is_accepted() {
        let o = MountOptions::parse_all(&[
            "rw,nosuid,nodev,noexec,noatime,_netdev,nofail,defaults,relatime,x-systemd.automount"
                .to_string(),
            "auto,user,async,dev,suid,comment=foo,client=/etc/bftfs/client-2.json".to_string(),
        ])
        .expect("tolerated");
        assert!(o.no_exec && o.no_atime && !o.read_only);
        assert_eq!(
            o.client.as_deref(),
            Some(std::path::Path::new("/etc/bftfs/client-2.json"))
        );
        let o = MountOptions::parse_all(&["ro,exec".to_string()]).expect("valid");
        assert!(o.read_only && !o.no_exec);
        let mut back = o.clone();
        back.apply("noexec,noatime").expect("valid");
        assert_eq!(
            MountOptions::parse_all(&[back.to_arg()]).expect("valid"),
            back
        );
        for bad in ["client=", "_netdev=1", "x", "nodevice"] {
            let e = MountOptions::parse_all(&[bad.to_string()]).expect_err(bad);
            assert!(e.contains("unknown mount option"), "{e}");
        }
    }

    #[test]
    fn bad_options_are_one_sentence() {
        for bad in [
            "attr_timeout=abc",
            "attr_timeout=-1",
            "threads=0",
            "frobnicate",
            "ro=1",
        ] {
            let e = MountOptions::parse_all(&[bad.to_string()]).expect_err(bad);
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
