//! What the view-change tests (the unit tests, [`super::abraham`], [`super::model`]) share:
//! deterministic keys and the genesis checkpoint certificate.

use super::*;
use crate::config::{generate_seeded, ClusterKeys, ProtocolConfig};
use crate::wire::{CheckpointCertificate, SeqNo, Signer};
use state_abstraction::ClientId;

/// Keys for four replicas (f = 1) at `addresses` and one client, `ClientId(1)`, with the
/// default protocol config, drawn from the project's seeded generator started at `seed`:
/// the same keys on every run.
pub(super) fn seeded_keys(seed: u64, addresses: Vec<String>) -> ClusterKeys {
    generate_seeded(
        1,
        addresses,
        &[ClientId(1)],
        ProtocolConfig::default(),
        seed,
    )
    .expect("keygen")
}

/// Every replica's signer, indexed by replica id, and the client's.
pub(super) fn signers(keys: &ClusterKeys) -> (Vec<Signer>, Signer) {
    let replicas = keys
        .replicas
        .iter()
        .map(|s| Signer::from_secret(&s.signing_key.0))
        .collect();
    let client = Signer::from_secret(&keys.clients[0].signing_key.0);
    (replicas, client)
}

/// The certificate of `genesis` (sequence number 0, no signatures).
pub(super) fn genesis_certificate(genesis: &Genesis) -> CheckpointCertificate {
    CheckpointCertificate {
        seq: SeqNo(0),
        service_root: genesis.service_root,
        replies_digest: genesis.replies_digest,
        checkpoints: Vec::new(),
    }
}
