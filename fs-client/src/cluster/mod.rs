//! The replicated side of `bftfs`: the transport over the BFT client protocol, the local
//! cluster that `bftfs up` starts (3f+1 `bftfs-replica` processes, restarted if they die), the
//! choice of a client identity, and the per-replica status report.
//!
//! Files of a local cluster, under its data directory:
//! - `cluster/`: `cluster.json` and the secrets files from `bftfs keygen`;
//! - `replica-<i>/`: replica i's data directory; `replica-<i>.log` its log.
//!
//! Where things are (each re-exported here):
//! - [`transport`]: [`ReplicatedTransport`], the adapter's transport over the BFT client;
//! - [`identity`]: [`claim_client`], a client identity no other mount holds;
//! - [`prepare`]: a local cluster's keys, config and ports before its replicas start;
//! - [`local`]: [`LocalCluster`], the replica processes, restarted if they die;
//! - [`status`]: [`probe_cluster`] and the per-replica report of `bftfs status`;
//! - [`suspects`](mod@suspects): [`suspects()`], the replicas others report as misbehaving.

pub mod identity;
pub mod local;
mod lock_cache;
mod locks;
pub mod prepare;
pub mod status;
pub mod suspects;
pub mod transport;

pub use identity::claim_client;
pub use local::{LocalCluster, ReplicaExtras};
pub use prepare::{lost_port_race, move_local_ports, prepare_local_cluster};
pub use status::{print_reports, probe_cluster, ReplicaReport};
#[cfg(test)]
pub(crate) use suspects::tests as suspect_tests;
pub use suspects::{print_suspects, suspects, Suspect};
pub use transport::{ObservationReporter, ReplicatedTransport};

use anyhow::{Context, Result};
use replica::config::ClusterConfig;
use std::path::Path;

/// The directory under a local cluster's data directory that holds its config and secrets.
pub const CLUSTER_DIR: &str = "cluster";

/// Reads a cluster config (`cluster.json`), saying which file is missing or invalid.
pub fn read_config(path: &Path) -> Result<ClusterConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the cluster config {}", path.display()))?;
    ClusterConfig::from_json(&text)
        .with_context(|| format!("{} is not a valid cluster config", path.display()))
}
