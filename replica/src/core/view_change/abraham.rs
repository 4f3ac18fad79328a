//! Regression test: the Abraham et al. counterexample to Zyzzyva's published view change
//! (PROTOCOLS §2.6), replayed with real keys, real signed messages, the real verifier and the
//! real [`valid_view_change`] / [`plan_new_view`].
//!
//! Names. The paper's replicas r1..r4 with r1 the primary of view 1 map onto our ids with
//! primary = view mod 4: r1 = `ReplicaId(1)`, r2 = `ReplicaId(2)`, r3 = `ReplicaId(3)`,
//! r4 = `ReplicaId(0)`. View 0 passes with nothing ordered.
//!
//! Evidence. Zyzzyva's "CC for a" is 2f+1 = 3 signed speculative responses (r1, r2, r3) to the
//! view-1 order-req for *a*. Our strong evidence is PBFT's prepared certificate, which has the
//! same strength (three replicas stand behind *a* in view 1): r1's signed pre-prepare plus
//! prepares from r2 and r3. Those prepares exist because r2 and r3 accepted *a* and a replica
//! that accepts sends its prepare; only faulty r1 collected them, so r2 and r3 are not prepared
//! themselves and hold only fast evidence (their acceptance of *a*). r1 keeps the certificate,
//! as in the paper.

use super::*;
use crate::config::ClusterKeys;
use crate::wire::{
    frame_length, Authenticator, Batch, CheckpointCertificate, Digest, Evidence, Message,
    PrePrepare, Prepare, PreparedCertificate, Principal, Proposal, ReplicaId, Request, SeqNo,
    Signed, Signer, Timestamp, View, ViewChange, ViewChangeMessage, FRAME_HEADER_BYTES,
};
use state_abstraction::ClientId;

const GENESIS: Genesis = Genesis {
    service_root: Digest([5; 32]),
    replies_digest: Digest([6; 32]),
};

fn genesis_stable() -> CheckpointCertificate {
    super::fixtures::genesis_certificate(&GENESIS)
}

const R1: ReplicaId = ReplicaId(1);
const R2: ReplicaId = ReplicaId(2);
const R3: ReplicaId = ReplicaId(3);
const R4: ReplicaId = ReplicaId(0);

struct Cluster {
    keys: ClusterKeys,
    signers: Vec<Signer>,
    client: Signer,
}

impl Cluster {
    fn new() -> Self {
        let addresses = (0..4).map(|i| format!("127.0.0.1:{}", 7100 + i)).collect();
        let keys = super::fixtures::seeded_keys(0x2f6b_1d3c, addresses);
        let (signers, client) = super::fixtures::signers(&keys);
        Cluster {
            keys,
            signers,
            client,
        }
    }

    fn signer(&self, r: ReplicaId) -> &Signer {
        &self.signers[r.0 as usize]
    }

    /// A one-request batch from the client, ordered at slot 1 by `view`'s primary.
    fn propose(&self, view: View, operation: &[u8], timestamp: u64) -> Proposal {
        let request = self.client.sign(Request {
            client: ClientId(1),
            timestamp: Timestamp(timestamp),
            operation: operation.to_vec(),
            read_only: false,
        });
        let batch = Batch {
            requests: vec![request],
        };
        let primary = view.primary(self.keys.config.n());
        let nondet = timestamp.to_be_bytes().to_vec();
        // Slot 1 chains from the genesis checkpoint's anchor in every view.
        let batch_digest = batch.ordered_digest(&nondet);
        let history =
            crate::wire::chain_history(&Digest::default(), SeqNo(1), &batch_digest, &nondet);
        let pre_prepare = self.signer(primary).sign(PrePrepare {
            view,
            seq: SeqNo(1),
            batch_digest,
            nondet,
            primary,
            history,
        });
        Proposal { pre_prepare, batch }
    }

    fn prepare(&self, replica: ReplicaId, proposal: &Proposal) -> Signed<Prepare> {
        let pp = &proposal.pre_prepare.body;
        self.signer(replica).sign(Prepare {
            view: pp.view,
            seq: pp.seq,
            batch_digest: pp.batch_digest,
            replica,
        })
    }

    /// `replica`'s signed view change, broadcast over a real sealed frame and opened (MAC and
    /// every signature checked) by every other replica.
    fn view_change(
        &self,
        replica: ReplicaId,
        new_view: View,
        evidence: Vec<Evidence>,
    ) -> Signed<ViewChange> {
        let stable = genesis_stable();
        let vc = self.signer(replica).sign(ViewChange {
            new_view,
            replica,
            stable,
            evidence,
        });
        let others: Vec<ReplicaId> = self
            .keys
            .config
            .replica_ids()
            .filter(|r| *r != replica)
            .collect();
        let to: Vec<Principal> = others.iter().map(|r| Principal::Replica(*r)).collect();
        let sender =
            Authenticator::for_replica(&self.keys.config, &self.keys.replicas[replica.0 as usize]);
        let message = Message::ViewChange(ViewChangeMessage::ViewChange(vc.clone()));
        let sealed = sender.seal(&message, &to).expect("seal");
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header.copy_from_slice(&sealed[..FRAME_HEADER_BYTES]);
        assert_eq!(
            frame_length(header).expect("length"),
            sealed.len() - FRAME_HEADER_BYTES
        );
        for r in others {
            let receiver =
                Authenticator::for_replica(&self.keys.config, &self.keys.replicas[r.0 as usize]);
            let opened = receiver
                .open(&sealed[FRAME_HEADER_BYTES..])
                .expect("the verifier accepts the view change");
            assert_eq!(opened.message(), &message);
        }
        assert!(
            valid_view_change(&self.keys.config, &GENESIS, &vc.body),
            "{replica} sends a well-formed view change"
        );
        vc
    }
}

fn slot_one(plan: &NewViewPlan) -> Option<Digest> {
    assert!(plan.slots.len() <= 1);
    plan.slots.first().and_then(|(seq, p)| {
        assert_eq!(*seq, SeqNo(1));
        p.as_ref().map(|p| p.body.batch_digest)
    })
}

/// The §2.6 schedule. The published rule re-issues *a* in view 3 and so loses *b*, which
/// completed on the fast path in view 2; the §2.9 rule keeps *b*.
#[test]
fn abraham_counterexample_published_rule_loses_b_ours_keeps_it() {
    let cluster = Cluster::new();
    let config = &cluster.keys.config;
    assert_eq!((config.n(), config.f), (4, 1));

    // View 1: faulty r1 orders a to r1, r2, r3; r2 and r3 accept it and send prepares, which
    // only r1 collects into a certificate.
    let a = cluster.propose(View(1), b"a", 1);
    let accepted_a = [R1, R2, R3];
    let certificate_a = PreparedCertificate {
        pre_prepare: a.pre_prepare.clone(),
        prepares: accepted_a
            .iter()
            .filter(|r| **r != R1)
            .map(|r| cluster.prepare(*r, &a))
            .collect(),
    };
    assert!(
        valid_prepared_certificate(config, &certificate_a),
        "r1 holds a genuine view-1 certificate for a"
    );

    // View change to 2, quorum {r1, r2, r4}: r1 hides its certificate, r2 reports its
    // acceptance of a, r4 has nothing. One report of a is below f+1: both rules start view 2
    // with nothing at slot 1.
    let to_view_2 = vec![
        cluster.view_change(R2, View(2), vec![Evidence::Accepted(a.pre_prepare.clone())]),
        cluster.view_change(R1, View(2), vec![]),
        cluster.view_change(R4, View(2), vec![]),
    ];
    assert!(valid_quorum(config, &GENESIS, View(2), &to_view_2));
    assert_eq!(slot_one(&plan_new_view(config, &to_view_2)), None);
    assert_eq!(slot_one(&plan_new_view_published(config, &to_view_2)), None);

    // View 2: r2 orders b at slot 1 (the slot is free); all four accept and answer, so the
    // client holds 3f+1 matching speculative responses: b completed on the fast path.
    let b = cluster.propose(View(2), b"b", 2);
    let accepted_b = [R1, R2, R3, R4];
    assert_eq!(accepted_b.len(), 3 * config.f as usize + 1);
    let b_digest = b.pre_prepare.body.batch_digest;
    let a_digest = a.pre_prepare.body.batch_digest;
    assert_ne!(a_digest, b_digest);

    // View change to 3, quorum {r1, r3, r4}: r1 presents the view-1 certificate for a; r3 and
    // r4 have no certificate and report their highest-view acceptance, b in view 2 (r3's
    // acceptance of a is from a lower view and is not reported).
    let to_view_3 = vec![
        cluster.view_change(R3, View(3), vec![Evidence::Accepted(b.pre_prepare.clone())]),
        cluster.view_change(R1, View(3), vec![Evidence::Prepared(certificate_a)]),
        cluster.view_change(R4, View(3), vec![Evidence::Accepted(b.pre_prepare.clone())]),
    ];
    assert!(valid_quorum(config, &GENESIS, View(3), &to_view_3));

    // Published VC3: the certificate with the highest sequence number is a's, so view 3
    // re-issues a at slot 1 and the completed b is lost.
    assert_eq!(
        slot_one(&plan_new_view_published(config, &to_view_3)),
        Some(a_digest),
        "published rule picks a"
    );
    // §2.9: b has f+1 = 2 reports at view 2, above the certificate's view 1.
    let plan = plan_new_view(config, &to_view_3);
    assert_eq!(
        slot_one(&plan),
        Some(b_digest),
        "our rule keeps the completed b"
    );
    assert_eq!(
        plan.slots[0].1.as_ref(),
        Some(&b.pre_prepare),
        "and re-issues b's own proposal"
    );
}

/// The faulty replica cannot manufacture fast evidence: a pre-prepare it signs for a view it
/// is not primary of is refused by the verifier (wrong key for the named primary) or by
/// [`valid_view_change`] (the named primary is not that view's).
#[test]
fn forged_fast_evidence_is_refused() {
    let cluster = Cluster::new();
    let config = &cluster.keys.config;
    let genuine = cluster.propose(View(2), b"x", 9);
    // r1 re-signs r2's view-2 pre-prepare with its own key, still naming r2.
    let mut forged = genuine.clone();
    forged.pre_prepare = Signed {
        body: genuine.pre_prepare.body.clone(),
        signature: cluster
            .signer(R1)
            .sign(genuine.pre_prepare.body.clone())
            .signature,
    };
    let vc = cluster.signer(R1).sign(ViewChange {
        new_view: View(3),
        replica: R1,
        stable: genesis_stable(),
        evidence: vec![Evidence::Accepted(forged.pre_prepare)],
    });
    let sender = Authenticator::for_replica(config, &cluster.keys.replicas[R1.0 as usize]);
    let receiver = Authenticator::for_replica(config, &cluster.keys.replicas[R3.0 as usize]);
    let message = Message::ViewChange(ViewChangeMessage::ViewChange(vc));
    let sealed = sender
        .seal(&message, &[Principal::Replica(R3)])
        .expect("seal");
    assert!(matches!(
        receiver.open(&sealed[FRAME_HEADER_BYTES..]),
        Err(crate::wire::WireError::BadSignature(_))
    ));
    // r1 signs, as itself, a view-2 pre-prepare: its signature is genuine, but r1 is not the
    // primary of view 2.
    let mut own = genuine;
    own.pre_prepare = cluster.signer(R1).sign(PrePrepare {
        primary: R1,
        ..own.pre_prepare.body.clone()
    });
    let vc = ViewChange {
        new_view: View(3),
        replica: R1,
        stable: genesis_stable(),
        evidence: vec![Evidence::Accepted(own.pre_prepare)],
    };
    assert!(!valid_view_change(config, &GENESIS, &vc));
}
