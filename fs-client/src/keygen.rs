//! `bftfs keygen`: a cluster config and one secrets file per replica and per client.
//!
//! Out, in one directory: `cluster.json` (public: f, replica addresses, public keys, protocol
//! parameters), `replica-<i>.json` and `client-<id>.json` (secret: signing key and pairwise
//! MAC keys; mode 0600). Existing files are never overwritten: keys that are in use must not be
//! replaced by accident.

use anyhow::{bail, Context, Result};
use replica::config::{generate_with_os_random, ClusterKeys, ProtocolConfig};
use state_abstraction::fs::Squash;
use state_abstraction::ClientId;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "cluster.json";

/// Where [`write_cluster`] put things.
#[derive(Clone, Debug)]
pub struct ClusterFiles {
    pub config: PathBuf,
    pub replicas: Vec<PathBuf>,
    pub clients: Vec<(ClientId, PathBuf)>,
}

/// The default replica addresses: `host` with consecutive ports from `base_port`.
pub fn default_addresses(f: u32, host: &str, base_port: u16) -> Result<Vec<String>> {
    let n = 3 * f + 1;
    (0..n)
        .map(|i| match base_port.checked_add(i as u16) {
            Some(p) => Ok(format!("{host}:{p}")),
            None => bail!("--base-port {base_port} leaves no room for {n} replicas"),
        })
        .collect()
}

fn check_address(a: &str) -> Result<()> {
    let Some((host, port)) = a.rsplit_once(':') else {
        bail!("replica address `{a}` is not HOST:PORT");
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        bail!("replica address `{a}` is not HOST:PORT with a port from 1 to 65535");
    }
    Ok(())
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "{} already exists; keygen never overwrites keys (use an empty directory)",
                path.display()
            ),
            _ => anyhow::anyhow!("cannot write {}: {e}", path.display()),
        })?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Generates keys for a cluster of 3f+1 replicas at `addresses` and `clients` client
/// identities (each mount needs its own, all with identity mapping `squash`), and writes them
/// into `dir`.
pub fn write_cluster(
    dir: &Path,
    f: u32,
    addresses: Vec<String>,
    clients: u32,
    squash: Squash,
) -> Result<ClusterFiles> {
    let n = 3 * f as usize + 1;
    if addresses.len() != n {
        bail!(
            "a cluster with f={f} has {n} replicas, but {} addresses were given",
            addresses.len()
        );
    }
    for a in &addresses {
        check_address(a)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = addresses.iter().find(|a| !seen.insert(a.as_str())) {
        bail!("replica address {dup} is given twice");
    }
    if clients == 0 {
        bail!("a cluster needs at least one client identity (--clients 1)");
    }
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() {
        bail!(
            "{} already exists; keygen never overwrites keys (use an empty directory)",
            config_path.display()
        );
    }
    let client_ids: Vec<ClientId> = (1..=u64::from(clients)).map(ClientId).collect();
    let ClusterKeys {
        mut config,
        replicas,
        clients: client_secrets,
    } = generate_with_os_random(f, addresses, &client_ids, ProtocolConfig::default())
        .context("cannot generate keys")?;
    for c in &mut config.clients {
        c.squash = squash;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // Secrets first: a directory with a config but missing secrets would look complete.
    let mut files = ClusterFiles {
        config: config_path.clone(),
        replicas: Vec::new(),
        clients: Vec::new(),
    };
    // Each secret in a file of its own, readable by the owner only.
    let write_secret = |kind: &str, id: u64, json: Result<String, _>| -> Result<PathBuf> {
        let path = dir.join(format!("{kind}-{id}.json"));
        let json = json.with_context(|| format!("cannot encode {kind} secrets"))?;
        write_new(&path, &json, 0o600)?;
        Ok(path)
    };
    for s in &replicas {
        files
            .replicas
            .push(write_secret("replica", s.id.0.into(), s.to_json())?);
    }
    for s in &client_secrets {
        files
            .clients
            .push((s.id, write_secret("client", s.id.0, s.to_json())?));
    }
    write_new(
        &config_path,
        &config
            .to_json()
            .context("cannot encode the cluster config")?,
        0o644,
    )?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use replica::config::ClusterConfig;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_config_and_private_secrets_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("keys");
        let addrs = default_addresses(1, "127.0.0.1", 7000).expect("addresses");
        assert_eq!(addrs[3], "127.0.0.1:7003");
        let files = write_cluster(&out, 1, addrs.clone(), 2, Squash::Root).expect("keygen");
        assert_eq!(files.replicas.len(), 4);
        assert_eq!(files.clients.len(), 2);
        let config =
            ClusterConfig::from_json(&std::fs::read_to_string(&files.config).expect("read"))
                .expect("parse");
        assert_eq!(config.f, 1);
        assert_eq!(config.replicas[2].address, "127.0.0.1:7002");
        assert!(config.clients.iter().all(|c| c.squash == Squash::Root));
        for p in files
            .replicas
            .iter()
            .chain(files.clients.iter().map(|(_, p)| p))
        {
            let mode = std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let e = write_cluster(&out, 1, addrs, 1, Squash::None).expect_err("second run");
        assert!(e.to_string().contains("never overwrites"), "{e}");
    }

    #[test]
    fn bad_addresses_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e =
            write_cluster(dir.path(), 1, vec!["a:1".into()], 1, Squash::None).expect_err("count");
        assert!(e.to_string().contains("4 replicas"), "{e}");
        let four = |x: &str| vec!["a:1".into(), "b:2".into(), "c:3".into(), x.to_string()];
        assert!(write_cluster(dir.path(), 1, four("d"), 1, Squash::None).is_err());
        assert!(write_cluster(dir.path(), 1, four("d:0"), 1, Squash::None).is_err());
        let e = write_cluster(dir.path(), 1, four("a:1"), 1, Squash::None).expect_err("duplicate");
        assert!(e.to_string().contains("twice"), "{e}");
        assert!(default_addresses(1, "h", 65534).is_err());
    }
}
