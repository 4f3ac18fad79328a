//! View-change evidence rules (PROTOCOLS §2.8–2.9), as pure functions.
//!
//! In: view-change messages (already signature-checked by the verifier). Out: whether each is
//! well formed, and the new view's plan: the stable checkpoint to start from and, for every
//! later sequence number up to the highest evidence, the proposal to re-issue (or a null
//! batch). The new primary and every backup run [`plan_new_view`] on the same 2f+1 view
//! changes and must get the same plan (safety rule 6).
//!
//! Selection, slot by slot: candidates are the evidence every view change reports for the
//! slot; the highest *view* wins (never the highest sequence number: that is the published
//! Zyzzyva bug, §2.6); within a view strong evidence beats fast evidence; with no candidate the
//! slot gets a null batch. Today the only evidence is the PBFT prepared certificate (strong).
//! Fast evidence (f+1 identical accepted order-reqs) would be counted per (view, seq, digest)
//! across view changes and admitted as a candidate only at f+1 reports.

use crate::config::ClusterConfig;
use crate::wire::{
    Batch, CheckpointCertificate, Digest, Evidence, PreparedCertificate, Proposal, ReplicaId, SeqNo, Signed, View,
    ViewChange,
};
use std::collections::{BTreeMap, BTreeSet};

/// The genesis checkpoint's digests: a certificate at sequence number 0 needs no signatures
/// but must name exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Genesis {
    pub service_root: Digest,
    pub replies_digest: Digest,
}

pub fn valid_checkpoint_certificate(config: &ClusterConfig, genesis: &Genesis, cert: &CheckpointCertificate) -> bool {
    if cert.seq == SeqNo(0) {
        return cert.service_root == genesis.service_root && cert.replies_digest == genesis.replies_digest;
    }
    if cert.seq.0 % config.protocol.checkpoint_interval != 0 {
        return false;
    }
    let mut signers = BTreeSet::new();
    for c in &cert.checkpoints {
        let b = &c.body;
        if b.seq != cert.seq || b.service_root != cert.service_root || b.replies_digest != cert.replies_digest {
            return false;
        }
        if b.replica.0 as usize >= config.n() || !signers.insert(b.replica) {
            return false;
        }
    }
    signers.len() >= config.quorum()
}

pub fn valid_prepared_certificate(config: &ClusterConfig, cert: &PreparedCertificate) -> bool {
    let pp = &cert.proposal.pre_prepare.body;
    if pp.primary != pp.view.primary(config.n()) {
        return false;
    }
    let mut signers = BTreeSet::new();
    for p in &cert.prepares {
        let b = &p.body;
        if b.view != pp.view || b.seq != pp.seq || b.batch_digest != pp.batch_digest {
            return false;
        }
        if b.replica == pp.primary || b.replica.0 as usize >= config.n() || !signers.insert(b.replica) {
            return false;
        }
    }
    signers.len() >= 2 * config.f as usize
}

/// Checks a view change's structure: a valid stable certificate, and evidence in increasing
/// sequence order within the log window above it, each from a view below the new one.
pub fn valid_view_change(config: &ClusterConfig, genesis: &Genesis, vc: &ViewChange) -> bool {
    if vc.replica.0 as usize >= config.n() || !valid_checkpoint_certificate(config, genesis, &vc.stable) {
        return false;
    }
    let low = vc.stable.seq;
    let high = SeqNo(low.0 + config.protocol.log_window);
    let mut previous = low;
    for e in &vc.evidence {
        let seq = e.seq();
        if seq <= previous || seq > high || e.view() >= vc.new_view {
            return false;
        }
        previous = seq;
        let ok = match e {
            Evidence::Prepared(cert) => valid_prepared_certificate(config, cert),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// What a new view re-issues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewViewPlan {
    pub stable: CheckpointCertificate,
    /// Every sequence number from `stable.seq + 1` to the highest chosen evidence, in order;
    /// `None` is a null batch.
    pub slots: Vec<(SeqNo, Option<Proposal>)>,
}

impl NewViewPlan {
    /// The digest and nondet a slot's re-issued pre-prepare must carry.
    pub fn slot_content(proposal: &Option<Proposal>) -> (Digest, Vec<u8>) {
        match proposal {
            Some(p) => (p.pre_prepare.body.batch_digest, p.pre_prepare.body.nondet.clone()),
            None => (Batch::default().digest(), Vec::new()),
        }
    }
    pub fn batch(proposal: &Option<Proposal>) -> Batch {
        proposal.as_ref().map(|p| p.batch.clone()).unwrap_or_default()
    }
}

/// Checks that `view_changes` is a quorum of distinct, well-formed view changes for `view`.
pub fn valid_quorum(config: &ClusterConfig, genesis: &Genesis, view: View, view_changes: &[Signed<ViewChange>]) -> bool {
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

/// Selects the new view's plan from a quorum of valid view changes (see the module doc).
pub fn plan_new_view(view_changes: &[Signed<ViewChange>]) -> NewViewPlan {
    // Start from the highest stable checkpoint any of them proves.
    let stable = view_changes
        .iter()
        .map(|vc| &vc.body.stable)
        .max_by_key(|c| c.seq)
        .cloned()
        .unwrap_or(CheckpointCertificate {
            seq: SeqNo(0),
            service_root: Digest::default(),
            replies_digest: Digest::default(),
            checkpoints: Vec::new(),
        });
    let mut candidates: BTreeMap<SeqNo, Vec<&Evidence>> = BTreeMap::new();
    for vc in view_changes {
        for e in &vc.body.evidence {
            if e.seq() > stable.seq {
                candidates.entry(e.seq()).or_default().push(e);
            }
        }
    }
    let Some(&highest) = candidates.keys().next_back() else {
        return NewViewPlan { stable, slots: Vec::new() };
    };
    let mut slots = Vec::new();
    let mut seq = stable.seq.next();
    while seq <= highest {
        let chosen = candidates.get(&seq).and_then(|list| {
            // Highest view; strong before fast; then the smallest digest, so the choice is
            // deterministic even in the impossible case of two strong certificates of one view.
            list.iter()
                .max_by(|a, b| {
                    (a.view(), a.is_strong(), std::cmp::Reverse(a.proposal().pre_prepare.body.batch_digest)).cmp(&(
                        b.view(),
                        b.is_strong(),
                        std::cmp::Reverse(b.proposal().pre_prepare.body.batch_digest),
                    ))
                })
                .map(|e| e.proposal().clone())
        });
        slots.push((seq, chosen));
        seq = seq.next();
    }
    NewViewPlan { stable, slots }
}
