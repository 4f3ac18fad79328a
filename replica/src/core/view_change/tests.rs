//! Unit tests of the view-change rules: validity of view changes, and the plan a new view
//! re-issues.

use super::*;
use crate::config::{generate, ClusterConfig, ProtocolConfig};
use crate::wire::{
    Batch, Checkpoint, CheckpointCertificate, Digest, Evidence, PrePrepare, Prepare,
    PreparedCertificate, ReplicaId, Request, SeqNo, Signature, Signed, Timestamp, View, ViewChange,
};
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
    assert!(plan.slots[0].1.is_none() && plan.slots[1].1.is_none() && plan.slots[2].1.is_some());
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
