//! The choice of a client identity: one `client-<id>.json` no other mount holds.

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use replica::config::ClientSecrets;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Claims an unused client identity among the `client-<id>.json` files next to `config_path`
/// (or the one given), holding a lock on it for as long as the returned file lives: two mounts
/// sharing one identity would confuse the replicas' per-client reply caches.
pub fn claim_client(
    config_path: &Path,
    explicit: Option<&Path>,
) -> Result<(ClientSecrets, Flock<File>)> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let dir = config_path.parent().unwrap_or(Path::new("."));
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("client-") && n.ends_with(".json"))
                })
                .collect();
            found.sort();
            found
        }
    };
    if candidates.is_empty() {
        bail!(
            "no client secrets file (client-<id>.json) next to {}; pass --client FILE",
            config_path.display()
        );
    }
    for path in &candidates {
        let lock_path = path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        let lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            // The identity asked for by name may belong to a mount that was just unmounted
            // (`umount` returns before its process has exited): give that a few seconds.
            Err((lock, _)) if explicit.is_some() => wait_for_lock(lock).with_context(|| {
                format!(
                    "the client identity {} is in use by another mount; give each mount its own client file",
                    path.display()
                )
            })?,
            Err(_) => continue,
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let secrets = ClientSecrets::from_json(&text)
            .with_context(|| format!("{} is not a client secrets file", path.display()))?;
        return Ok((secrets, lock));
    }
    bail!(
        "every client identity next to {} is in use by another mount; make more with `bftfs keygen --clients N`",
        config_path.display()
    )
}

/// Takes `file`'s lock, waiting up to five seconds for its holder to let go.
fn wait_for_lock(file: File) -> Result<Flock<File>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut file = file;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((unlocked, errno)) if std::time::Instant::now() >= deadline => {
                drop(unlocked);
                bail!("still locked after 5 s ({errno})");
            }
            Err((unlocked, _)) => file = unlocked,
        }
    }
}
