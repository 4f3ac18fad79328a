//! View-change evidence rules (PROTOCOLS §2.8–2.9), as pure functions.
//!
//! In: view-change messages (already signature-checked by the verifier). Out: whether each is
//! well formed, and the new view's plan: the stable checkpoint to start from and, for every
//! later sequence number up to the highest chosen evidence, the proposal to re-issue (or a
//! null batch). The new primary and every backup run [`plan_new_view`] on the same 2f+1 view
//! changes and must get the same plan (safety rule 6).
//!
//! # What a view change reports (the contract with the core)
//!
//! For every sequence number above its stable checkpoint (and within the log window), in
//! increasing sequence order, at most two items:
//! 1. its **highest-view strong evidence** ([`Evidence::Prepared`]), if it has any;
//! 2. then, only if it accepted a proposal in a **strictly higher view** than that (or has no
//!    strong evidence), the **highest-view proposal it accepted** ([`Evidence::Accepted`]):
//!    the pre-prepare signed by that view's primary, with its batch, accepted inside an
//!    installed view (re-issued proposals of a new view count as accepted in that view).
//!
//! Both are needed: a replica whose only certificate is from view 1 but which accepted (and
//! speculatively executed) something in view 2 must say so, or a request completed on the
//! fast path in view 2 could lose to the view-1 certificate (the §2.6 counterexample). An
//! acceptance no higher than the certificate adds nothing, so it is not reported.
//!
//! # Selection, slot by slot above the chosen checkpoint
//!
//! - **Strong candidates**: every prepared certificate for the slot, at its own view.
//! - **Fast candidates**: items are grouped by *content* — the pre-prepare body with its view,
//!   primary and history cleared ([`proposal_content`]), so the sequence number, the batch
//!   digest and the nondeterministic input must all be equal. For each content, take per view change
//!   the highest view at which it reports that content (strong or fast item); a content
//!   reported by at least f+1 distinct view changes is a candidate at the (f+1)-th highest of
//!   those views: the highest view v such that f+1 view changes report it at v or above.
//! - The candidate with the **highest view** wins; on a tie strong beats fast (with an
//!   equivocating primary one view can hold a certificate for x and f+1 reports of y, but only
//!   x can have completed); a remaining tie (two fast contents, neither of which can have
//!   completed) goes to the smaller encoded content, so every replica picks the same one.
//! - No candidate: a null batch. The plan ends at the highest slot that has a candidate.
//!
//! Why content and not the identical (view, seq) pre-prepare of PROTOCOLS §2.8: after a
//! request *y* completes on the fast path in view u, the next view re-issues y, and some
//! replicas accept the re-issued pre-prepare (view u+1) while others are still at view u. A
//! later quorum can then hold one report of (u, y) and one of (u+1, y) from correct replicas
//! and an old certificate for x from a faulty one; counting identical pre-prepares sees two
//! groups below f+1 and picks x, losing y. The model check in `view_change::model` finds
//! exactly this schedule for the per-(view, seq) count. Counting by content with "at view v or
//! above" keeps the safety argument of §2.9: if y completed fast in view u, the f+1 or more
//! correct replicas of any later quorum all report y at a view ≥ u (everything installed since
//! kept y), so y is a candidate at a view ≥ u; any other content needs one correct reporter at
//! a view ≥ u, which cannot exist, and a certificate for another value at a view ≥ u would
//! need f+1 correct replicas that prepared it. If y completed slowly (f+1 correct replicas
//! prepared it in view u), one of them is in every quorum and reports a certificate for y at a
//! view ≥ u; another certificate in view u is impossible by quorum intersection, and a fast
//! candidate for another value in view u loses to the certificate.
//!
//! PROTOCOLS §2.9 step 4 (drop a strong certificate whose history disagrees with a lower slot
//! already chosen) applies once pre-prepares carry a history digest; with per-slot evidence
//! there is nothing to drop.

use crate::config::ClusterConfig;
use crate::wire::{
    Batch, CheckpointCertificate, Digest, Evidence, PrePrepare, PreparedCertificate, Proposal,
    ReplicaId, SeqNo, Signed, View, ViewChange,
};
use std::collections::BTreeSet;

#[cfg(test)]
mod abraham;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod model;

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
/// higher view (see the module doc).
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

/// What a new view re-issues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewViewPlan {
    pub stable: CheckpointCertificate,
    /// Every sequence number from `stable.seq + 1` to the highest chosen evidence, in order:
    /// the reported pre-prepare whose content is re-issued, or `None` for a null batch.
    pub slots: Vec<(SeqNo, Option<Signed<PrePrepare>>)>,
}

impl NewViewPlan {
    /// The digest and nondet a slot's re-issued pre-prepare must carry.
    pub fn slot_content(chosen: &Option<Signed<PrePrepare>>) -> (Digest, Vec<u8>) {
        match chosen {
            Some(p) => (p.body.batch_digest, p.body.nondet.clone()),
            None => (Batch::default().digest(), Vec::new()),
        }
    }
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

/// What a proposal says, whoever proposed it in whichever view: its pre-prepare with view,
/// primary and history cleared (sequence number, batch digest and agreed value remain). A
/// re-issued proposal has the same content as the original.
pub fn proposal_content(pre_prepare: &Signed<PrePrepare>) -> PrePrepare {
    // The history digest is cleared too: a new view re-issues a batch with a history chained
    // from its own starting checkpoint, so correct replicas that accepted one batch in two
    // views report two histories for it. What runs (batch and agreed value) is the content;
    // the history only matters for a client comparing speculative replies.
    PrePrepare {
        view: View(0),
        primary: ReplicaId(0),
        history: Digest::default(),
        ..pre_prepare.body.clone()
    }
}

/// How fast evidence is grouped. Only [`FastTally::Content`] is the protocol; the other is the
/// literal reading of PROTOCOLS §2.8 ("f+1 identical order-reqs"), kept for tests that show
/// the model check catches its flaw (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FastTally {
    Content,
    #[cfg(test)]
    IdenticalPrePrepare,
}

/// Selects the new view's plan from a quorum of valid view changes (see the module doc).
/// `config` gives f, the threshold of fast evidence.
pub fn plan_new_view(config: &ClusterConfig, view_changes: &[Signed<ViewChange>]) -> NewViewPlan {
    plan_with(config.f as usize, view_changes, FastTally::Content)
}

/// The highest stable checkpoint any of the view changes proves.
fn chosen_stable(view_changes: &[Signed<ViewChange>]) -> CheckpointCertificate {
    view_changes
        .iter()
        .map(|vc| &vc.body.stable)
        .max_by_key(|c| c.seq)
        .cloned()
        .unwrap_or(CheckpointCertificate {
            seq: SeqNo(0),
            service_root: Digest::default(),
            replies_digest: Digest::default(),
            checkpoints: Vec::new(),
        })
}

/// Per view change, its evidence items for `seq`.
fn reports_for(view_changes: &[Signed<ViewChange>], seq: SeqNo) -> Vec<Vec<&Evidence>> {
    view_changes
        .iter()
        .map(|vc| vc.body.evidence.iter().filter(|e| e.seq() == seq).collect())
        .collect()
}

/// Highest sequence number with any evidence above `stable` (where a plan could end).
fn highest_reported(view_changes: &[Signed<ViewChange>], stable: SeqNo) -> SeqNo {
    view_changes
        .iter()
        .flat_map(|vc| vc.body.evidence.iter().map(|e| e.seq()))
        .max()
        .unwrap_or(stable)
        .max(stable)
}

pub(crate) fn plan_with(
    f: usize,
    view_changes: &[Signed<ViewChange>],
    tally: FastTally,
) -> NewViewPlan {
    let stable = chosen_stable(view_changes);
    plan_slots(view_changes, stable, |seq| {
        select_slot(f, &reports_for(view_changes, seq), tally)
    })
}

/// The plan from `stable`: `choose` picks each slot's proposal, from the one after the
/// checkpoint to the highest reported; slots above the last one with a candidate are left to
/// the new primary.
fn plan_slots<'a>(
    view_changes: &[Signed<ViewChange>],
    stable: CheckpointCertificate,
    mut choose: impl FnMut(SeqNo) -> Option<&'a Signed<PrePrepare>>,
) -> NewViewPlan {
    let mut slots = Vec::new();
    let mut end = 0;
    let highest = highest_reported(view_changes, stable.seq);
    let mut seq = stable.seq.next();
    while seq <= highest {
        let chosen = choose(seq);
        slots.push((seq, chosen.cloned()));
        if chosen.is_some() {
            end = slots.len();
        }
        seq = seq.next();
    }
    slots.truncate(end);
    NewViewPlan { stable, slots }
}

/// One slot's choice. `reports[i]` holds view change i's items for the slot (at most two).
fn select_slot<'a>(
    f: usize,
    reports: &[Vec<&'a Evidence>],
    tally: FastTally,
) -> Option<&'a Signed<PrePrepare>> {
    // (view, strong, pre-prepare) per candidate.
    let mut candidates: Vec<(View, bool, &Signed<PrePrepare>)> = Vec::new();
    for items in reports {
        for e in items.iter().filter(|e| e.is_strong()) {
            candidates.push((e.view(), true, e.pre_prepare()));
        }
    }
    // Fast groups: the content (or whole pre-prepare), and per view change the highest view
    // at which it reports it, with the proposal it reports there.
    struct Group<'a> {
        key: PrePrepare,
        by_reporter: Vec<(usize, View, &'a Signed<PrePrepare>)>,
    }
    let mut groups: Vec<Group<'a>> = Vec::new();
    for (reporter, items) in reports.iter().enumerate() {
        for e in items {
            let key = match tally {
                FastTally::Content => proposal_content(e.pre_prepare()),
                #[cfg(test)]
                FastTally::IdenticalPrePrepare => e.pre_prepare().body.clone(),
            };
            let index = match groups.iter().position(|g| g.key == key) {
                Some(i) => i,
                None => {
                    groups.push(Group {
                        key,
                        by_reporter: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let group = &mut groups[index];
            match group
                .by_reporter
                .iter_mut()
                .find(|(r, _, _)| *r == reporter)
            {
                Some(entry) if entry.1 < e.view() => *entry = (reporter, e.view(), e.pre_prepare()),
                Some(_) => {}
                None => group
                    .by_reporter
                    .push((reporter, e.view(), e.pre_prepare())),
            }
        }
    }
    for mut g in groups {
        if g.by_reporter.len() <= f {
            // f or fewer reports: faulty replicas alone can make them.
            continue;
        }
        g.by_reporter
            .sort_by_key(|entry| std::cmp::Reverse(entry.1));
        // At least f+1 view changes report it at this view or above, so at least one correct
        // replica accepted it at this view or above.
        let view = g.by_reporter[f].1;
        // Re-issue the highest-view copy; all copies have the same content.
        candidates.push((view, false, g.by_reporter[0].2));
    }
    let rank =
        |c: &(View, bool, &Signed<PrePrepare>)| (c.0, c.1, std::cmp::Reverse(content_bytes(c.2)));
    candidates
        .into_iter()
        .max_by(|a, b| rank(a).cmp(&rank(b)))
        .map(|c| c.2)
}

/// A canonical byte string of a proposal's content, for the last tie-break.
fn content_bytes(pre_prepare: &Signed<PrePrepare>) -> Vec<u8> {
    crate::wire::encode(&proposal_content(pre_prepare)).unwrap_or_default()
}

/// Zyzzyva's published VC3 (TOCS'09, PROTOCOLS §2.5), for tests only: start from the
/// certificate with the highest sequence number, whatever its view, then add each later
/// proposal that at least f+1 view changes report. It is unsafe (§2.6); the scenario test and
/// the model check show that it loses a completed request, which is how they show they can
/// fail. Mapping to our per-slot evidence: Zyzzyva's commit certificate covers its whole
/// prefix through the history chain, so slots up to the chosen certificate take the choosing
/// view change's own items (strong, else fast, else null); a tie on the sequence number goes
/// to the first view change in the quorum, as a naive implementation would do.
#[cfg(test)]
pub(crate) fn plan_new_view_published(
    config: &ClusterConfig,
    view_changes: &[Signed<ViewChange>],
) -> NewViewPlan {
    let f = config.f as usize;
    let stable = chosen_stable(view_changes);
    let mut best: Option<(SeqNo, usize)> = None;
    for (i, vc) in view_changes.iter().enumerate() {
        for e in vc
            .body
            .evidence
            .iter()
            .filter(|e| e.is_strong() && e.seq() > stable.seq)
        {
            if !matches!(best, Some((s, _)) if e.seq() <= s) {
                best = Some((e.seq(), i));
            }
        }
    }
    plan_slots(view_changes, stable, |seq| {
        match best {
            Some((cc_seq, i)) if seq <= cc_seq => {
                let items: Vec<&Evidence> = view_changes[i]
                    .body
                    .evidence
                    .iter()
                    .filter(|e| e.seq() == seq)
                    .collect();
                items
                    .iter()
                    .find(|e| e.is_strong())
                    .or(items.first())
                    .map(|e| e.pre_prepare())
            }
            _ => {
                // Later requests that appear in at least f+1 messages, by content.
                let reports = reports_for(view_changes, seq);
                let mut counted: Vec<(PrePrepare, usize, &Signed<PrePrepare>)> = Vec::new();
                for items in &reports {
                    let mut seen: Vec<PrePrepare> = Vec::new();
                    for e in items {
                        let key = proposal_content(e.pre_prepare());
                        if seen.contains(&key) {
                            continue;
                        }
                        seen.push(key.clone());
                        match counted.iter_mut().find(|(k, _, _)| *k == key) {
                            Some(entry) => entry.1 += 1,
                            None => counted.push((key, 1, e.pre_prepare())),
                        }
                    }
                }
                counted
                    .into_iter()
                    .filter(|(_, count, _)| *count > f)
                    .max_by_key(|(_, count, p)| (*count, std::cmp::Reverse(content_bytes(p))))
                    .map(|(_, _, p)| p)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{generate, ProtocolConfig};
    use crate::wire::{Checkpoint, PrePrepare, Prepare, Request, Signature, Timestamp};
    use state_abstraction::ClientId;

    fn unsigned<T>(body: T) -> Signed<T> {
        Signed {
            body,
            signature: Signature::from_bytes(&[0; 64]),
        }
    }

    fn config() -> ClusterConfig {
        let mut x = 1u8;
        let addresses = (0..4).map(|i| format!("a{i}")).collect();
        generate(
            1,
            addresses,
            &[],
            ProtocolConfig {
                checkpoint_interval: 4,
                log_window: 8,
                ..Default::default()
            },
            &mut |b| {
                for byte in b.iter_mut() {
                    x = x.wrapping_add(7);
                    *byte = x;
                }
            },
        )
        .expect("keys")
        .config
    }

    const GENESIS: Genesis = Genesis {
        service_root: Digest([1; 32]),
        replies_digest: Digest([2; 32]),
    };

    fn genesis_cert() -> CheckpointCertificate {
        super::fixtures::genesis_certificate(&GENESIS)
    }

    fn stable_cert(seq: u64) -> CheckpointCertificate {
        let root = Digest([seq as u8; 32]);
        let checkpoints = (0..3)
            .map(|r| {
                unsigned(Checkpoint {
                    seq: SeqNo(seq),
                    service_root: root,
                    replies_digest: root,
                    replica: ReplicaId(r),
                })
            })
            .collect();
        CheckpointCertificate {
            seq: SeqNo(seq),
            service_root: root,
            replies_digest: root,
            checkpoints,
        }
    }

    fn prepared(view: u64, seq: u64, tag: u8) -> Evidence {
        let request = unsigned(Request {
            client: ClientId(1),
            timestamp: Timestamp(tag as u64),
            operation: vec![tag],
            read_only: false,
        });
        let batch = Batch {
            requests: vec![request],
        };
        let digest = batch.digest();
        let primary = View(view).primary(4);
        let pre_prepare = unsigned(PrePrepare {
            view: View(view),
            seq: SeqNo(seq),
            batch_digest: digest,
            nondet: vec![],
            primary,
            history: Digest::default(),
        });
        let prepares = (0..4u32)
            .map(ReplicaId)
            .filter(|r| *r != primary)
            .take(2)
            .map(|r| {
                unsigned(Prepare {
                    view: View(view),
                    seq: SeqNo(seq),
                    batch_digest: digest,
                    replica: r,
                })
            })
            .collect();
        Evidence::Prepared(PreparedCertificate {
            pre_prepare,
            prepares,
        })
    }

    fn order(view: u64, seq: u64, tag: u8) -> Signed<PrePrepare> {
        prepared(view, seq, tag).pre_prepare().clone()
    }

    /// Fast evidence: the proposal of `tag` at (view, seq), signed (nominally) by the primary.
    fn accepted(view: u64, seq: u64, tag: u8) -> Evidence {
        Evidence::Accepted(order(view, seq, tag))
    }

    fn chosen(plan: &NewViewPlan) -> Vec<(u64, Option<Digest>)> {
        plan.slots
            .iter()
            .map(|(s, p)| (s.0, p.as_ref().map(|p| p.body.batch_digest)))
            .collect()
    }

    fn tag_digest(tag: u8) -> Digest {
        order(0, 1, tag).body.batch_digest
    }

    fn vc(
        new_view: u64,
        replica: u32,
        stable: CheckpointCertificate,
        evidence: Vec<Evidence>,
    ) -> Signed<ViewChange> {
        unsigned(ViewChange {
            new_view: View(new_view),
            replica: ReplicaId(replica),
            stable,
            evidence,
        })
    }

    fn digest_of(e: &Evidence) -> Digest {
        e.pre_prepare().body.batch_digest
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
        let plan = plan_new_view(&config, &vcs);
        assert_eq!(plan.slots.len(), 2);
        assert_eq!(
            NewViewPlan::slot_content(&plan.slots[0].1).0,
            digest_of(&new_b)
        );
        assert_eq!(
            NewViewPlan::slot_content(&plan.slots[1].1).0,
            digest_of(&old_a2)
        );
    }

    #[test]
    fn gaps_become_null_batches_and_old_evidence_is_ignored() {
        let vcs = vec![
            vc(1, 0, stable_cert(4), vec![prepared(0, 7, 1)]),
            vc(1, 1, genesis_cert(), vec![prepared(0, 3, 2)]),
            vc(1, 2, genesis_cert(), vec![]),
        ];
        assert!(valid_quorum(&config(), &GENESIS, View(1), &vcs));
        let plan = plan_new_view(&config(), &vcs);
        assert_eq!(plan.stable.seq, SeqNo(4));
        let seqs: Vec<u64> = plan.slots.iter().map(|(s, _)| s.0).collect();
        assert_eq!(seqs, vec![5, 6, 7]);
        assert!(
            plan.slots[0].1.is_none() && plan.slots[1].1.is_none() && plan.slots[2].1.is_some()
        );
        assert_eq!(
            NewViewPlan::slot_content(&None).0,
            Batch::default().digest()
        );
    }

    #[test]
    fn malformed_view_changes_are_refused() {
        let config = config();
        // Replica 0's view change to `new_view`.
        let valid = |new_view, stable, evidence| {
            valid_view_change(&config, &GENESIS, &vc(new_view, 0, stable, evidence).body)
        };
        // Evidence from the view being entered (or later).
        assert!(!valid(1, genesis_cert(), vec![prepared(1, 1, 1)]));
        // Out of order.
        assert!(!valid(
            2,
            genesis_cert(),
            vec![prepared(0, 2, 1), prepared(0, 1, 1)]
        ));
        // Beyond the window above the stable checkpoint.
        assert!(!valid(2, genesis_cert(), vec![prepared(0, 9, 1)]));
        // A genesis certificate with the wrong digest.
        let mut bad = genesis_cert();
        bad.service_root = Digest([9; 32]);
        assert!(!valid(2, bad, vec![]));
        // A checkpoint certificate with a repeated signer.
        let mut short = stable_cert(4);
        short.checkpoints[2] = short.checkpoints[0].clone();
        assert!(!valid_checkpoint_certificate(&config, &GENESIS, &short));
        // A prepared certificate with the primary's prepare counted.
        let Evidence::Prepared(mut cert) = prepared(0, 1, 1) else {
            unreachable!("prepared() makes a certificate")
        };
        cert.prepares[0].body.replica = ReplicaId(0);
        assert!(!valid_prepared_certificate(&config, &cert));
        // Two view changes from one replica do not make a quorum.
        let vcs = vec![
            vc(1, 0, genesis_cert(), vec![]),
            vc(1, 0, genesis_cert(), vec![]),
            vc(1, 2, genesis_cert(), vec![]),
        ];
        assert!(!valid_quorum(&config, &GENESIS, View(1), &vcs));
    }

    // PROTOCOLS §7.2 item 3: selection edge cases.

    #[test]
    fn fast_evidence_below_f_plus_one_is_ignored() {
        // One report of b (a faulty replica alone can make it) next to nothing: no candidate, so
        // no plan at all; next to an old certificate for a: the certificate.
        let config = config();
        let alone = vec![
            vc(3, 0, genesis_cert(), vec![accepted(2, 1, 0xb)]),
            vc(3, 1, genesis_cert(), vec![]),
            vc(3, 2, genesis_cert(), vec![]),
        ];
        assert!(valid_quorum(&config, &GENESIS, View(3), &alone));
        assert_eq!(chosen(&plan_new_view(&config, &alone)), vec![]);
        let with_cert = vec![
            vc(3, 0, genesis_cert(), vec![accepted(2, 1, 0xb)]),
            vc(3, 1, genesis_cert(), vec![prepared(1, 1, 0xa)]),
            vc(3, 2, genesis_cert(), vec![]),
        ];
        assert_eq!(
            chosen(&plan_new_view(&config, &with_cert)),
            vec![(1, Some(tag_digest(0xa)))]
        );
        // A split: one report of b and one of c in view 2, neither reaches f+1 = 2.
        let split = vec![
            vc(3, 0, genesis_cert(), vec![accepted(2, 1, 0xb)]),
            vc(3, 1, genesis_cert(), vec![accepted(2, 1, 0xc)]),
            vc(3, 3, genesis_cert(), vec![prepared(1, 1, 0xa)]),
        ];
        assert_eq!(
            chosen(&plan_new_view(&config, &split)),
            vec![(1, Some(tag_digest(0xa)))]
        );
        // Sub-threshold evidence at a higher slot does not stretch the plan either.
        let tail = vec![
            vc(
                3,
                0,
                genesis_cert(),
                vec![prepared(1, 1, 0xa), accepted(2, 2, 0xb)],
            ),
            vc(3, 1, genesis_cert(), vec![]),
            vc(3, 2, genesis_cert(), vec![]),
        ];
        assert_eq!(
            chosen(&plan_new_view(&config, &tail)),
            vec![(1, Some(tag_digest(0xa)))]
        );
    }

    #[test]
    fn one_view_change_counts_once_towards_f_plus_one() {
        // Replica 0 reports b twice (as a certificate and as a later acceptance of the
        // re-issued b); that is still one reporter, so only the certificate makes b a candidate
        // (at its view 1), and the view-2 certificate for a wins.
        let config = config();
        let vcs = vec![
            vc(
                4,
                0,
                genesis_cert(),
                vec![prepared(1, 1, 0xb), accepted(3, 1, 0xb)],
            ),
            vc(4, 1, genesis_cert(), vec![prepared(2, 1, 0xa)]),
            vc(4, 2, genesis_cert(), vec![]),
        ];
        assert!(valid_quorum(&config, &GENESIS, View(4), &vcs));
        assert_eq!(
            chosen(&plan_new_view(&config, &vcs)),
            vec![(1, Some(tag_digest(0xa)))]
        );
    }

    #[test]
    fn strong_beats_fast_in_the_same_view_with_an_equivocating_primary() {
        // The primary of view 1 equivocated: a certificate for x, and f+1 reports of y, both in
        // view 1. Only x can have completed (y's reporters include a faulty one or x could not
        // have prepared), so x wins whatever the order of the view changes.
        let config = config();
        let x = prepared(1, 1, 0x1);
        let y = accepted(1, 1, 0x2);
        let vcs = vec![
            vc(2, 0, genesis_cert(), vec![y.clone()]),
            vc(2, 2, genesis_cert(), vec![y.clone()]),
            vc(2, 3, genesis_cert(), vec![x.clone()]),
        ];
        assert!(valid_quorum(&config, &GENESIS, View(2), &vcs));
        assert_eq!(
            chosen(&plan_new_view(&config, &vcs)),
            vec![(1, Some(tag_digest(0x1)))]
        );
        let reversed: Vec<_> = vcs.into_iter().rev().collect();
        assert_eq!(
            chosen(&plan_new_view(&config, &reversed)),
            vec![(1, Some(tag_digest(0x1)))]
        );
    }

    #[test]
    fn higher_view_fast_evidence_beats_lower_view_strong_evidence() {
        // The §2.6 shape: b completed on the fast path in view 2; a's certificate is from view 1.
        let config = config();
        let vcs = vec![
            vc(3, 1, genesis_cert(), vec![prepared(1, 1, 0xa)]),
            vc(3, 3, genesis_cert(), vec![accepted(2, 1, 0xb)]),
            vc(3, 0, genesis_cert(), vec![accepted(2, 1, 0xb)]),
        ];
        assert!(valid_quorum(&config, &GENESIS, View(3), &vcs));
        assert_eq!(
            chosen(&plan_new_view(&config, &vcs)),
            vec![(1, Some(tag_digest(0xb)))]
        );
        // The published rule takes the certificate (the bug).
        assert_eq!(
            chosen(&plan_new_view_published(&config, &vcs)),
            vec![(1, Some(tag_digest(0xa)))]
        );
        // And a view change may carry both: its view-1 certificate and its view-2 acceptance.
        let both = vec![
            vc(3, 1, genesis_cert(), vec![prepared(1, 1, 0xa)]),
            vc(
                3,
                2,
                genesis_cert(),
                vec![prepared(1, 1, 0xa), accepted(2, 1, 0xb)],
            ),
            vc(3, 0, genesis_cert(), vec![accepted(2, 1, 0xb)]),
        ];
        assert!(valid_quorum(&config, &GENESIS, View(3), &both));
        assert_eq!(
            chosen(&plan_new_view(&config, &both)),
            vec![(1, Some(tag_digest(0xb)))]
        );
    }

    #[test]
    fn certificates_from_old_views_lose_to_newer_ones_but_survive_alone() {
        let config = config();
        // Slot 1: view-0 certificate for a vs view-2 certificate for b. Slot 2: only a view-0
        // certificate, re-issued as it is.
        let vcs = vec![
            vc(
                3,
                0,
                genesis_cert(),
                vec![prepared(0, 1, 0xa), prepared(0, 2, 0xc)],
            ),
            vc(3, 1, genesis_cert(), vec![prepared(2, 1, 0xb)]),
            vc(3, 2, genesis_cert(), vec![]),
        ];
        assert!(valid_quorum(&config, &GENESIS, View(3), &vcs));
        assert_eq!(
            chosen(&plan_new_view(&config, &vcs)),
            vec![(1, Some(tag_digest(0xb))), (2, Some(tag_digest(0xc)))]
        );
        // An old certificate also loses to f+1 newer acceptances, even of a lower view than its
        // own reporter's view change.
        let vcs = vec![
            vc(5, 0, genesis_cert(), vec![prepared(1, 1, 0xa)]),
            vc(5, 1, genesis_cert(), vec![accepted(3, 1, 0xb)]),
            vc(5, 2, genesis_cert(), vec![accepted(3, 1, 0xb)]),
        ];
        assert_eq!(
            chosen(&plan_new_view(&config, &vcs)),
            vec![(1, Some(tag_digest(0xb)))]
        );
    }

    #[test]
    fn a_reissued_proposal_counts_with_its_original() {
        // b completed fast in view 1; view 2 re-issued it and only replica 1 accepted that copy
        // before view 3's change. Replica 0 (faulty) shows a view-0 certificate for a. The two
        // correct reports of b are of different pre-prepares (views 1 and 2) but the same
        // content, so b is a candidate at view 1 and wins.
        let config = config();
        let vcs = vec![
            vc(3, 0, genesis_cert(), vec![prepared(0, 1, 0xa)]),
            vc(3, 1, genesis_cert(), vec![accepted(2, 1, 0xb)]),
            vc(3, 3, genesis_cert(), vec![accepted(1, 1, 0xb)]),
        ];
        assert!(valid_quorum(&config, &GENESIS, View(3), &vcs));
        assert_eq!(
            chosen(&plan_new_view(&config, &vcs)),
            vec![(1, Some(tag_digest(0xb)))]
        );
        // The literal "f+1 identical pre-prepares" count splits b and loses it.
        let literal = plan_with(1, &vcs, FastTally::IdenticalPrePrepare);
        assert_eq!(chosen(&literal), vec![(1, Some(tag_digest(0xa)))]);
        // The chosen view is the (f+1)-th highest: a view-1 certificate for c beats b (b's
        // second-highest report is view 1, and strong wins the tie)...
        let vcs = vec![
            vc(3, 0, genesis_cert(), vec![prepared(1, 1, 0xc)]),
            vc(3, 1, genesis_cert(), vec![accepted(2, 1, 0xb)]),
            vc(3, 3, genesis_cert(), vec![accepted(1, 1, 0xb)]),
        ];
        assert_eq!(
            chosen(&plan_new_view(&config, &vcs)),
            vec![(1, Some(tag_digest(0xc)))]
        );
        // ...and the re-issued copy is the one re-issued again.
        let vcs = vec![
            vc(4, 1, genesis_cert(), vec![accepted(2, 1, 0xb)]),
            vc(4, 3, genesis_cert(), vec![accepted(1, 1, 0xb)]),
            vc(4, 0, genesis_cert(), vec![]),
        ];
        let plan = plan_new_view(&config, &vcs);
        assert_eq!(plan.slots[0].1.as_ref().map(|p| p.body.view), Some(View(2)));
    }

    #[test]
    fn evidence_layout_is_checked() {
        let config = config();
        let ok = |evidence: Vec<Evidence>| {
            valid_view_change(&config, &GENESIS, &vc(4, 0, genesis_cert(), evidence).body)
        };
        // Strong, then fast of a higher view, per slot; slots increasing.
        assert!(ok(vec![
            prepared(1, 1, 1),
            accepted(2, 1, 2),
            accepted(3, 2, 3)
        ]));
        assert!(ok(vec![
            accepted(3, 1, 1),
            prepared(1, 2, 2),
            accepted(2, 2, 2)
        ]));
        // Fast before strong, or not higher than it, or two of a kind, or three items.
        assert!(!ok(vec![accepted(2, 1, 2), prepared(1, 1, 1)]));
        assert!(!ok(vec![prepared(2, 1, 1), accepted(2, 1, 1)]));
        assert!(!ok(vec![prepared(2, 1, 1), accepted(1, 1, 2)]));
        assert!(!ok(vec![accepted(1, 1, 1), accepted(2, 1, 2)]));
        assert!(!ok(vec![prepared(1, 1, 1), prepared(2, 1, 2)]));
        assert!(!ok(vec![
            prepared(1, 1, 1),
            accepted(2, 1, 2),
            accepted(3, 1, 2)
        ]));
        // Fast evidence from the new view or later, or beyond the window.
        assert!(!ok(vec![accepted(4, 1, 1)]));
        assert!(!ok(vec![accepted(1, 9, 1)]));
        // Fast evidence not from that view's primary, or with an oversized agreed value.
        let mut wrong_primary = order(1, 1, 1);
        wrong_primary.body.primary = ReplicaId(2);
        assert!(!ok(vec![Evidence::Accepted(wrong_primary)]));
        let mut padded = order(1, 1, 1);
        padded.body.nondet = vec![0; NONDET_BYTES_MAX + 1];
        assert!(!ok(vec![Evidence::Accepted(padded)]));
    }
}
