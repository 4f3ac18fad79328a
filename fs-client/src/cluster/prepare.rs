//! Making a local cluster's keys and config, or reusing them, and keeping its replicas' ports
//! usable: the steps of `bftfs up` before any replica starts.

use super::{read_config, CLUSTER_DIR};
use crate::keygen;
use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use replica::config::ClusterConfig;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::warn;

/// Client identities made for a local cluster: the mount of `up` and a few more mounts of the
/// same cluster (`bftfs mount DATA/cluster/cluster.json DIR`) or benchmarks.
const LOCAL_CLIENTS: u32 = 8;

/// Makes the keys of a new local cluster, or reuses the existing ones, and applies the
/// fast-path setting of this `up` (the config is public and not signed, so only addresses and
/// protocol parameters change here, never the keys).
///
/// Ports come from [`replica::localhost`]: consecutive, outside the kernel's ephemeral range,
/// the same for a data directory while they stay free. If a stored port is taken at a later
/// `up` (or lies in the ephemeral range, as ports chosen before this rule did), every replica
/// moves to a new run, with a warning naming the port: the addresses are on 127.0.0.1, so only
/// this machine's processes use them, and all of them read `cluster.json` when they start.
pub fn prepare_local_cluster(data_dir: &Path, f: u32, fast_path: bool) -> Result<PathBuf> {
    wait_for_previous_replicas(data_dir, 3 * f as usize + 1)?;
    let dir = data_dir.join(CLUSTER_DIR);
    let config_path = dir.join(keygen::CONFIG_FILE);
    let seed = replica::localhost::seed_of(data_dir.as_os_str().as_encoded_bytes());
    if !config_path.exists() {
        // The local mount's caller is a user of this machine: believed as stated.
        keygen::write_cluster(
            &dir,
            f,
            replica::localhost::free_addresses(3 * f as usize + 1, seed)
                .context("cannot find free ports for the replicas")?,
            LOCAL_CLIENTS,
            state_abstraction::fs::Squash::None,
        )?;
        if fast_path {
            return Ok(config_path);
        }
    }
    let mut config = read_config(&config_path)?;
    if config.f != f {
        bail!(
            "the data directory {} holds a cluster with f={}, not f={f}; use --f {} or another --data-dir",
            data_dir.display(),
            config.f,
            config.f
        );
    }
    // Like the addresses, the protocol parameters are public and unsigned: every replica and
    // the client read them from this file at start.
    let mut changed = config.protocol.fast_path != fast_path;
    config.protocol.fast_path = fast_path;
    if let Some(why) = why_move_ports(&config) {
        move_replicas(&mut config, &why, seed, &config_path)?;
        changed = true;
    }
    if changed {
        write_config(&config, &config_path)?;
    }
    Ok(config_path)
}

/// Moves a local cluster's replicas to other free ports than those stored (which a replica
/// could not bind), saying why.
pub fn move_local_ports(config_path: &Path, why: &str) -> Result<()> {
    let mut config = read_config(config_path)?;
    // Not the data directory's seed: its first choice may be the very ports that failed.
    move_replicas(
        &mut config,
        why,
        replica::localhost::fresh_seed(),
        config_path,
    )?;
    write_config(&config, config_path)
}

fn move_replicas(
    config: &mut ClusterConfig,
    why: &str,
    seed: u64,
    config_path: &Path,
) -> Result<()> {
    let addresses = replica::localhost::free_addresses(config.n(), seed)
        .context("cannot find free ports for the replicas")?;
    warn!(
        "{why}; moving the replicas to {}..{} (restart any other `bftfs mount` of {} so that it reads the new addresses)",
        addresses[0],
        addresses[addresses.len() - 1],
        config_path.display()
    );
    for (r, address) in config.replicas.iter_mut().zip(addresses) {
        r.address = address;
    }
    Ok(())
}

fn write_config(config: &ClusterConfig, config_path: &Path) -> Result<()> {
    let tmp = config_path.with_extension("tmp");
    std::fs::write(&tmp, config.to_json()?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, config_path)
        .with_context(|| format!("cannot update {}", config_path.display()))
}

/// If `LocalCluster::start` failed because a replica could not listen on its port, which
/// replica and port (from the replica's own words in its log).
pub fn lost_port_race(e: &anyhow::Error) -> Option<String> {
    match e.downcast_ref::<replica::localhost::StartError>()? {
        replica::localhost::StartError::Exited { id, tail, .. } => {
            let line = tail.lines().find(|l| l.contains("cannot listen on"))?;
            let said = &line[line.find("cannot listen on")?..];
            Some(format!("replica {id} {said}"))
        }
        _ => None,
    }
}

/// Why a local cluster's stored addresses cannot be used as they are, if they cannot.
fn why_move_ports(config: &ClusterConfig) -> Option<String> {
    let ephemeral = replica::localhost::ephemeral_range();
    for r in &config.replicas {
        if !replica::localhost::port_free(&r.address) {
            return Some(format!(
                "port {} of replica {} is taken by another program",
                r.address, r.id.0
            ));
        }
        let port = r
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok());
        if port.is_some_and(|p| ephemeral.contains(&p)) {
            return Some(format!(
                "port {} of replica {} lies in the kernel's ephemeral range {}-{}, where outgoing connections may take it",
                r.address,
                r.id.0,
                ephemeral.start(),
                ephemeral.end()
            ));
        }
    }
    None
}

/// Replicas of a previous `up` whose `bftfs` was killed get SIGTERM when it dies, but may
/// take a moment to finish; they hold their data directory's lock (and port) until they exit.
/// Waits for them rather than failing on a lock or moving ports for nothing.
fn wait_for_previous_replicas(data_dir: &Path, n: usize) -> Result<()> {
    let started = Instant::now();
    for i in 0..n {
        let path = data_dir.join(format!("replica-{i}")).join("lock");
        let Ok(mut file) = OpenOptions::new().read(true).write(true).open(&path) else {
            continue;
        };
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                // Released at once (on drop): the replica takes it.
                Ok(_free) => break,
                Err((unlocked, _)) => file = unlocked,
            }
            if started.elapsed() > Duration::from_secs(15) {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "replica {i} of {} is still running (pid {}); stop it first (`bftfs down`)",
                    data_dir.display(),
                    holder.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

#[cfg(test)]
mod port_tests {
    use super::*;
    use replica::localhost::StartError;

    #[test]
    fn a_replica_that_could_not_listen_is_told_apart() {
        let listen = replica::driver::node::NodeError::Listen {
            address: "127.0.0.1:21001".into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let exited = |tail: String| {
            anyhow::Error::from(StartError::Exited {
                id: 1,
                status: "exit status: 1".into(),
                log: "replica-1.log".into(),
                tail,
            })
        };
        let why = lost_port_race(&exited(format!("starting\nError: {listen}")));
        assert!(
            why.as_deref()
                .is_some_and(|w| w.starts_with("replica 1 cannot listen on 127.0.0.1:21001")),
            "{why:?}"
        );
        assert_eq!(lost_port_race(&exited("bad keys".into())), None);
        assert_eq!(lost_port_race(&anyhow::anyhow!("cannot listen on x")), None);
    }
}
