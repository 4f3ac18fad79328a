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
            Evidence::Accepted(p) => p.pre_prepare.body.primary == p.pre_prepare.body.view.primary(config.n()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{generate, ProtocolConfig};
    use crate::wire::{Checkpoint, PrePrepare, Prepare, Request, Signature, Timestamp};
    use state_abstraction::ClientId;

    fn unsigned<T>(body: T) -> Signed<T> {
        Signed { body, signature: Signature::from_bytes(&[0; 64]) }
    }

    fn config() -> ClusterConfig {
        let mut x = 1u8;
        let addresses = (0..4).map(|i| format!("a{i}")).collect();
        generate(1, addresses, &[], ProtocolConfig { checkpoint_interval: 4, log_window: 8, ..Default::default() }, &mut |b| {
            for byte in b.iter_mut() {
                x = x.wrapping_add(7);
                *byte = x;
            }
        })
        .expect("keys")
        .config
    }

    const GENESIS: Genesis = Genesis { service_root: Digest([1; 32]), replies_digest: Digest([2; 32]) };

    fn genesis_cert() -> CheckpointCertificate {
        CheckpointCertificate {
            seq: SeqNo(0),
            service_root: GENESIS.service_root,
            replies_digest: GENESIS.replies_digest,
            checkpoints: vec![],
        }
    }

    fn stable_cert(seq: u64) -> CheckpointCertificate {
        let root = Digest([seq as u8; 32]);
        let checkpoints = (0..3)
            .map(|r| unsigned(Checkpoint { seq: SeqNo(seq), service_root: root, replies_digest: root, replica: ReplicaId(r) }))
            .collect();
        CheckpointCertificate { seq: SeqNo(seq), service_root: root, replies_digest: root, checkpoints }
    }

    fn prepared(view: u64, seq: u64, tag: u8) -> Evidence {
        let request = unsigned(Request { client: ClientId(1), timestamp: Timestamp(tag as u64), operation: vec![tag], read_only: false });
        let batch = Batch { requests: vec![request] };
        let digest = batch.digest();
        let primary = View(view).primary(4);
        let pre_prepare = unsigned(PrePrepare { view: View(view), seq: SeqNo(seq), batch_digest: digest, nondet: vec![], primary, history: Digest::default() });
        let prepares = (0..4u32)
            .map(ReplicaId)
            .filter(|r| *r != primary)
            .take(2)
            .map(|r| unsigned(Prepare { view: View(view), seq: SeqNo(seq), batch_digest: digest, replica: r }))
            .collect();
        Evidence::Prepared(PreparedCertificate { proposal: Proposal { pre_prepare, batch }, prepares })
    }

    fn vc(new_view: u64, replica: u32, stable: CheckpointCertificate, evidence: Vec<Evidence>) -> Signed<ViewChange> {
        unsigned(ViewChange { new_view: View(new_view), replica: ReplicaId(replica), stable, evidence })
    }

    fn digest_of(e: &Evidence) -> Digest {
        e.proposal().pre_prepare.body.batch_digest
    }

    #[test]
    fn highest_view_wins_not_highest_sequence() {
        // The §2.6 shape: an old-view certificate for slot 1 next to a newer-view one. The
        // newer view wins slot 1 even though the old-view reporter also reports a longer log.
        let old_a = prepared(1, 1, 0xa);
        let old_a2 = prepared(1, 2, 0xc);
        let new_b = prepared(2, 1, 0xb);
        let vcs = vec![
            vc(3, 0, genesis_cert(), vec![old_a.clone(), old_a2.clone()]),
            vc(3, 2, genesis_cert(), vec![new_b.clone()]),
            vc(3, 3, genesis_cert(), vec![]),
        ];
        let config = config();
        assert!(valid_quorum(&config, &GENESIS, View(3), &vcs));
        let plan = plan_new_view(&vcs);
        assert_eq!(plan.slots.len(), 2);
        assert_eq!(NewViewPlan::slot_content(&plan.slots[0].1).0, digest_of(&new_b));
        assert_eq!(NewViewPlan::slot_content(&plan.slots[1].1).0, digest_of(&old_a2));
    }

    #[test]
    fn gaps_become_null_batches_and_old_evidence_is_ignored() {
        let vcs = vec![
            vc(1, 0, stable_cert(4), vec![prepared(0, 7, 1)]),
            vc(1, 1, genesis_cert(), vec![prepared(0, 3, 2)]),
            vc(1, 2, genesis_cert(), vec![]),
        ];
        assert!(valid_quorum(&config(), &GENESIS, View(1), &vcs));
        let plan = plan_new_view(&vcs);
        assert_eq!(plan.stable.seq, SeqNo(4));
        let seqs: Vec<u64> = plan.slots.iter().map(|(s, _)| s.0).collect();
        assert_eq!(seqs, vec![5, 6, 7]);
        assert!(plan.slots[0].1.is_none() && plan.slots[1].1.is_none() && plan.slots[2].1.is_some());
        assert_eq!(NewViewPlan::slot_content(&None).0, Batch::default().digest());
    }

    #[test]
    fn malformed_view_changes_are_refused() {
        let config = config();
        // Evidence from the view being entered (or later).
        assert!(!valid_view_change(&config, &GENESIS, &vc(1, 0, genesis_cert(), vec![prepared(1, 1, 1)]).body));
        // Out of order.
        assert!(!valid_view_change(
            &config,
            &GENESIS,
            &vc(2, 0, genesis_cert(), vec![prepared(0, 2, 1), prepared(0, 1, 1)]).body
        ));
        // Beyond the window above the stable checkpoint.
        assert!(!valid_view_change(&config, &GENESIS, &vc(2, 0, genesis_cert(), vec![prepared(0, 9, 1)]).body));
        // A genesis certificate with the wrong digest.
        let mut bad = genesis_cert();
        bad.service_root = Digest([9; 32]);
        assert!(!valid_view_change(&config, &GENESIS, &vc(2, 0, bad, vec![]).body));
        // A checkpoint certificate with a repeated signer.
        let mut short = stable_cert(4);
        short.checkpoints[2] = short.checkpoints[0].clone();
        assert!(!valid_checkpoint_certificate(&config, &GENESIS, &short));
        // A prepared certificate with the primary's prepare counted.
        let Evidence::Prepared(mut cert) = prepared(0, 1, 1) else { unreachable!() };
        cert.prepares[0].body.replica = ReplicaId(0);
        assert!(!valid_prepared_certificate(&config, &cert));
        // Two view changes from one replica do not make a quorum.
        let vcs = vec![vc(1, 0, genesis_cert(), vec![]), vc(1, 0, genesis_cert(), vec![]), vc(1, 2, genesis_cert(), vec![])];
        assert!(!valid_quorum(&config, &GENESIS, View(1), &vcs));
    }
}
