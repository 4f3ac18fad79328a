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

/// Help text for `-o`, shown by `--help`.
pub const OPTIONS_HELP: &str = "Mount options, comma-separated: attr_timeout=SECONDS (default 1), \
entry_timeout=SECONDS (default 1), timeout=SECONDS (a request the cluster does not answer in \
time fails with EIO; default 30), threads=N (FUSE worker threads, default 8), \
allow_other (let other users in; default when run as root), ro, auto_unmount (a helper \
process, fusermount3, unmounts the file system if bftfs dies, so the mount point is never left \
\"not connected\"; needs allow_other)";

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
                _ => {
                    return Err(format!(
                        "unknown mount option `{item}` (known: attr_timeout=S, entry_timeout=S, \
                         timeout=S, threads=N, allow_other, ro, rw, auto_unmount)"
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
        ];
        if self.allow_other == Some(true) {
            parts.push("allow_other".into());
        }
        if self.read_only {
            parts.push("ro".into());
        }
        if self.auto_unmount {
            parts.push("auto_unmount".into());
        }
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
        o.apply("attr_timeout=0.25,timeout=7.5,threads=2,allow_other,auto_unmount")
            .expect("valid");
        let back = MountOptions::parse_all(&[o.to_arg()]).expect("valid");
        assert_eq!(back, o);
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
