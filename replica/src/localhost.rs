//! Replica processes on this machine: choosing their ports, and waiting until started ones
//! serve. `bftfs up`, the test harnesses and `bftfs-bench chaos` all go through here, so
//! that they choose ports one way.
//!
//! Ports come from outside the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`,
//! 32768–60999 by default). A port found free by binding port 0 lies inside that range, and
//! every outgoing connection on the machine draws its local port from there, so by the time a
//! replica binds it (or at the next `bftfs up` of a stored config) a connection may hold it.
//! Below the range only programs that ask for a port by number take one.

use crate::driver::status;
use std::collections::BTreeSet;
use std::io;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where ports are looked for first (up to just below the ephemeral range).
pub const PREFERRED_LOW: u16 = 20_000;

/// The range the kernel hands out for outgoing connections (Linux's default if the file
/// cannot be read, e.g. on another system).
pub fn ephemeral_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or(32_768..=60_999)
}

/// `"32768\t60999\n"` → 32768..=60999.
pub fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut words = text.split_whitespace().map(|w| w.parse::<u16>().ok());
    let (low, high) = (words.next()??, words.next()??);
    (low <= high).then_some(low..=high)
}

/// Where runs of ports are looked for, in order of preference: [`PREFERRED_LOW`] up to the
/// ephemeral range, then above it, then below [`PREFERRED_LOW`] (well-known ports excluded).
fn windows(ephemeral: &RangeInclusive<u16>) -> Vec<RangeInclusive<u16>> {
    let (low, high) = (*ephemeral.start(), *ephemeral.end());
    let mut out = Vec::new();
    if low > PREFERRED_LOW {
        out.push(PREFERRED_LOW..=low - 1);
    }
    if high < u16::MAX {
        out.push(high.max(PREFERRED_LOW - 1) + 1..=u16::MAX);
    }
    let below = low.min(PREFERRED_LOW);
    if below > 1025 {
        out.push(1024..=below - 1);
    }
    out
}

/// Runs handed out by this process, so that tests running in parallel threads of one binary
/// never get the same ports (they are released before the replicas bind them).
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// `count` consecutive ports, free on 127.0.0.1 now and outside the ephemeral range; returns
/// the first. The same `seed` (e.g. [`seed_of`] a data directory) gives the same ports while
/// they stay free, so a cluster keeps its addresses from one run to the next.
pub fn free_port_run(count: u16, seed: u64) -> io::Result<u16> {
    if count == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no ports asked for",
        ));
    }
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for window in windows(&ephemeral_range()) {
        let (low, high) = (u32::from(*window.start()), u32::from(*window.end()));
        let span = high + 1 - low;
        if span < u32::from(count) {
            continue;
        }
        let starts = span - u32::from(count) + 1;
        let first = (seed % u64::from(starts)) as u32;
        for step in 0..starts {
            let base = low + (first + step) % starts;
            let ports = (base..base + u32::from(count)).map(|p| p as u16);
            if ports.clone().any(|p| handed_out.contains(&p)) {
                continue;
            }
            // Held together while checking, so the run is free as a whole at one moment.
            let held: Result<Vec<TcpListener>, _> = ports
                .clone()
                .map(|p| TcpListener::bind(("127.0.0.1", p)))
                .collect();
            if held.is_ok() {
                handed_out.extend(ports);
                return Ok(base as u16);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no {count} consecutive free ports on 127.0.0.1 outside the ephemeral range"),
    ))
}

/// `count` addresses `127.0.0.1:PORT` from [`free_port_run`].
pub fn free_addresses(count: usize, seed: u64) -> io::Result<Vec<String>> {
    let n = u16::try_from(count)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many ports"))?;
    let base = free_port_run(n, seed)?;
    Ok((0..n).map(|i| format!("127.0.0.1:{}", base + i)).collect())
}

/// Whether `address` can be listened on now.
pub fn port_free(address: &str) -> bool {
    TcpListener::bind(address).is_ok()
}

/// A stable seed from bytes (FNV-1a: unlike std's hasher, the same in every build).
pub fn seed_of(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A seed that differs between processes and calls, for clusters that need not keep their
/// ports (tests, benchmarks): concurrent test binaries then look in different places first.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    seed_of(
        &[
            nanos.to_le_bytes(),
            u64::from(std::process::id()).to_le_bytes(),
        ]
        .concat(),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("replica {id} exited while starting ({status}); the end of its log {log}:\n{tail}")]
    Exited {
        id: usize,
        status: String,
        log: String,
        tail: String,
    },
    #[error("replicas {ids:?} did not answer a status probe within {waited:?}")]
    NotServing { ids: Vec<usize>, waited: Duration },
    #[error("cannot probe the replicas: {0}")]
    Probe(std::io::Error),
}

/// The last `lines` non-empty lines of a log file ("no output" if there are none).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if kept.is_empty() {
        return "no output".into();
    }
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

/// Waits until every started replica answers a status probe at its address (it answers only
/// once it has restored its state and serves), failing at once when one of the processes
/// exits, with its log's tail: a replica that cannot bind its port exits within milliseconds,
/// and waiting out a timeout for it only hides why. `children[i]` is replica i's process
/// (`None`: not started, not waited for), `log_of(i)` its log.
pub fn wait_until_serving<'a>(
    children: impl IntoIterator<Item = Option<&'a mut Child>>,
    addresses: &[String],
    log_of: impl Fn(usize) -> PathBuf,
    limit: Duration,
) -> Result<(), StartError> {
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Probe)?;
    // (id, process, serving yet)
    let mut waiting: Vec<(usize, &mut Child, bool)> = children
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, c?, false)))
        .collect();
    loop {
        for (id, child, _) in waiting.iter_mut() {
            let exited = match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            };
            if let Some(status) = exited {
                let log = log_of(*id);
                return Err(StartError::Exited {
                    id: *id,
                    status,
                    tail: log_tail(&log, 15),
                    log: log.display().to_string(),
                });
            }
        }
        let probes: Vec<(usize, String)> = waiting
            .iter()
            .filter(|(_, _, serving)| !serving)
            .map(|(id, _, _)| (*id, addresses.get(*id).cloned().unwrap_or_default()))
            .collect();
        let answered: Vec<usize> = runtime.block_on(async {
            let tasks: Vec<_> = probes
                .into_iter()
                .map(|(id, address)| {
                    tokio::spawn(async move {
                        let probe = status::probe(&address, Duration::from_millis(500));
                        probe.await.is_ok().then_some(id)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.extend(t.await.ok().flatten());
            }
            out
        });
        for (id, _, serving) in waiting.iter_mut() {
            *serving |= answered.contains(id);
        }
        if waiting.iter().all(|(_, _, serving)| *serving) {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(StartError::NotServing {
                ids: waiting
                    .iter()
                    .filter(|(_, _, serving)| !serving)
                    .map(|(id, _, _)| *id)
                    .collect(),
                waited: limit,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernel_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("garbage"), None);
        assert_eq!(parse_port_range(""), None);
    }

    #[test]
    fn windows_avoid_the_ephemeral_range() {
        assert_eq!(
            windows(&(32768..=60999)),
            vec![20_000..=32767, 61_000..=65535, 1024..=19_999]
        );
        // A machine that hands out almost everything: only what is left.
        assert_eq!(windows(&(1024..=65535)), vec![]);
        assert_eq!(windows(&(10_000..=65000)), vec![65001..=65535, 1024..=9999]);
    }

    #[test]
    fn runs_are_free_outside_the_range_and_never_handed_out_twice() {
        let ephemeral = ephemeral_range();
        let seed = fresh_seed();
        let a = free_port_run(4, seed).expect("a run");
        let b = free_port_run(4, seed).expect("another run");
        for base in [a, b] {
            for p in base..base + 4 {
                assert!(!ephemeral.contains(&p), "{p} is in {ephemeral:?}");
            }
        }
        assert!(a + 4 <= b || b + 4 <= a, "overlapping runs {a} and {b}");
        // The run is free: each port can be bound.
        for p in a..a + 4 {
            assert!(port_free(&format!("127.0.0.1:{p}")), "{p}");
        }
        assert_eq!(seed_of(b"/data/x"), seed_of(b"/data/x"));
        assert_ne!(seed_of(b"/data/x"), seed_of(b"/data/y"));
    }

    #[test]
    fn a_taken_port_is_skipped() {
        let ephemeral = ephemeral_range();
        let held = free_port_run(1, fresh_seed()).expect("a port");
        let listener = TcpListener::bind(("127.0.0.1", held)).expect("hold it");
        // Same seed as would have picked `held` first: the run must avoid it.
        let window = windows(&ephemeral)
            .into_iter()
            .find(|w| w.contains(&held))
            .expect("window");
        let seed = u64::from(held - window.start());
        HANDED_OUT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&held);
        let base = free_port_run(2, seed).expect("a run");
        assert!(!(base..base + 2).contains(&held), "{base} includes {held}");
        drop(listener);
    }
}
