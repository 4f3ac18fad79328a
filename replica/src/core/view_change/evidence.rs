//! What a view change may carry, and the checks of its structure (the format is in the module
//! doc of [`super`]): stable certificates, prepared certificates, orders, whole view changes
//! and quorums of them. Pure functions; signatures were checked by the verifier.

use crate::config::ClusterConfig;
use crate::wire::{
    CheckpointCertificate, Digest, Evidence, PrePrepare, PreparedCertificate, Proposal, ReplicaId,
    SeqNo, Signed, View, ViewChange,
};
use std::collections::BTreeSet;

/// The genesis checkpoint's digests: a certificate at sequence number 0 needs no signatures
/// but must name exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Genesis {
    pub service_root: Digest,
    pub replies_digest: Digest,
}

pub fn valid_checkpoint_certificate(
    config: &ClusterConfig,
    genesis: &Genesis,
    cert: &CheckpointCertificate,
) -> bool {
    if cert.seq == SeqNo(0) {
        return cert.service_root == genesis.service_root
            && cert.replies_digest == genesis.replies_digest;
    }
    if cert.seq.0 % config.protocol.checkpoint_interval != 0 {
        return false;
    }
    let mut signers = BTreeSet::new();
    for c in &cert.checkpoints {
        let b = &c.body;
        if b.seq != cert.seq
            || b.service_root != cert.service_root
            || b.replies_digest != cert.replies_digest
        {
            return false;
        }
        if b.replica.0 as usize >= config.n() || !signers.insert(b.replica) {
            return false;
        }
    }
    signers.len() >= config.quorum()
}

/// A proposal's structure: signed by its view's primary (the verifier checked the signature)
/// and carrying the batch its pre-prepare names.
pub fn valid_proposal(config: &ClusterConfig, proposal: &Proposal) -> bool {
    let pp = &proposal.pre_prepare.body;
    valid_order(config, &proposal.pre_prepare)
        && proposal.batch.ordered_digest(&pp.nondet) == pp.batch_digest
}

/// A pre-prepare reported as evidence: signed by its view's primary (the verifier checked
/// the signature). Its batch travels apart (see [`PreparedCertificate`]), and its agreed value
/// is bounded so that evidence stays small whatever the primary put there.
pub fn valid_order(config: &ClusterConfig, pp: &Signed<PrePrepare>) -> bool {
    let b = &pp.body;
    b.primary == b.view.primary(config.n()) && b.nondet.len() <= NONDET_BYTES_MAX
}

/// An agreed value is a time (8 bytes) or empty; anything longer is refused in evidence.
pub const NONDET_BYTES_MAX: usize = 64;

pub fn valid_prepared_certificate(config: &ClusterConfig, cert: &PreparedCertificate) -> bool {
    if !valid_order(config, &cert.pre_prepare) {
        return false;
    }
    let pp = &cert.pre_prepare.body;
    let mut signers = BTreeSet::new();
    for p in &cert.prepares {
        let b = &p.body;
        if b.view != pp.view || b.seq != pp.seq || b.batch_digest != pp.batch_digest {
            return false;
        }
        if b.replica == pp.primary
            || b.replica.0 as usize >= config.n()
            || !signers.insert(b.replica)
        {
            return false;
        }
    }
    signers.len() >= 2 * config.f as usize
}

/// Checks a view change's structure: a valid stable certificate, and evidence within the log
/// window above it, each item from a view below the new one, in increasing sequence order with
/// at most two items per sequence number: a strong one first, then a fast one from a strictly
/// higher view (see the module doc of [`super`]).
pub fn valid_view_change(config: &ClusterConfig, genesis: &Genesis, vc: &ViewChange) -> bool {
    if vc.replica.0 as usize >= config.n()
        || !valid_checkpoint_certificate(config, genesis, &vc.stable)
    {
        return false;
    }
    let low = vc.stable.seq;
    let high = SeqNo(low.0 + config.protocol.log_window);
    let mut previous: Option<&Evidence> = None;
    for e in &vc.evidence {
        let seq = e.seq();
        if seq <= low || seq > high || e.view() >= vc.new_view {
            return false;
        }
        if let Some(p) = previous {
            let second_of_slot =
                p.seq() == seq && p.is_strong() && !e.is_strong() && e.view() > p.view();
            if p.seq() > seq || (p.seq() == seq && !second_of_slot) {
                return false;
            }
        }
        previous = Some(e);
        let ok = match e {
            Evidence::Prepared(cert) => valid_prepared_certificate(config, cert),
            Evidence::Accepted(pp) => valid_order(config, pp),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Checks that `view_changes` is a quorum of distinct, well-formed view changes for `view`.
pub fn valid_quorum(
    config: &ClusterConfig,
    genesis: &Genesis,
    view: View,
    view_changes: &[Signed<ViewChange>],
) -> bool {
    let mut senders: BTreeSet<ReplicaId> = BTreeSet::new();
    for vc in view_changes {
        if vc.body.new_view != view || !senders.insert(vc.body.replica) {
            return false;
        }
        if !valid_view_change(config, genesis, &vc.body) {
            return false;
        }
    }
    senders.len() == config.quorum()
}
