//! The fault model's message tampering, written once: what a Byzantine replica can make of a
//! message its correct core wants to send. The simulator's Byzantine behaviours
//! ([`crate::sim::Behaviour`]) and the `--byzantine` modes of real replicas
//! (`driver::byzantine`) both alter messages only through these functions.
//!
//! Each function takes what the correct core produced and returns the lie, signed with the
//! faulty replica's own key wherever the lie must pass signature checks (a Byzantine replica
//! holds its key and can sign anything). What to change (which byte, which digest, which
//! subset) is the caller's choice: the simulator draws it from its seeded generator, the
//! driver derives it deterministically, and both keep their draws in the order they had.

use crate::config::ClusterConfig;
use crate::wire::{
    chain_history, AgreementMessage, Batch, Checkpoint, CheckpointCertificate, Commit, Digest,
    Evidence, Message, NewView, PrePrepare, Prepare, Proposal, ReplicaId, Signature, Signed,
    Signer, Statement, View, ViewChange, ViewChangeMessage, FRAME_HEADER_BYTES,
};

/// A vote (prepare or commit): a replica's statement about the batch at one slot.
pub trait Vote: Statement + Clone {
    fn batch_digest(&self) -> Digest;
    fn batch_digest_mut(&mut self) -> &mut Digest;
    fn replica_mut(&mut self) -> &mut ReplicaId;
}

// Prepares and commits have the same fields; one impl written for both.
macro_rules! impl_vote {
    ($($t:ty),*) => {$(
        impl Vote for $t {
            fn batch_digest(&self) -> Digest {
                self.batch_digest
            }
            fn batch_digest_mut(&mut self) -> &mut Digest {
                &mut self.batch_digest
            }
            fn replica_mut(&mut self) -> &mut ReplicaId {
                &mut self.replica
            }
        }
    )*};
}
impl_vote!(Prepare, Commit);

/// The same vote for another batch, validly signed: only a comparison with the others' votes
/// exposes it.
pub fn vote_for<V: Vote>(signer: &Signer, vote: &V, batch_digest: Digest) -> Signed<V> {
    let mut body = vote.clone();
    *body.batch_digest_mut() = batch_digest;
    signer.sign(body)
}

/// The same vote claiming to come from `claimed`, but signed with our key: receivers must
/// refuse it.
pub fn impersonate<V: Vote>(signer: &Signer, vote: &V, claimed: ReplicaId) -> Signed<V> {
    let mut body = vote.clone();
    *body.replica_mut() = claimed;
    signer.sign(body)
}

/// A digest derived from `d` under `domain`: differs from `d`, and from what another domain
/// derives, and is the same on every run.
pub fn derived_digest(domain: &str, d: &Digest) -> Digest {
    let mut h = state_abstraction::digest::Hasher::new(domain);
    h.digest(d);
    h.finish()
}

/// A checkpoint claiming `service_root` for its state, validly signed.
pub fn checkpoint_with_root(
    signer: &Signer,
    body: &Checkpoint,
    service_root: Digest,
) -> Signed<Checkpoint> {
    signer.sign(Checkpoint {
        service_root,
        ..body.clone()
    })
}

/// A validly signed proposal for the same view and sequence number with `batch` and `nondet`
/// instead. With `previous` the history is re-chained onto it (so a backup that was sent
/// `previous` runs it speculatively); without, the history stays the honest one (a backup
/// finds it unchained and still votes on the digest).
pub fn repropose(
    signer: &Signer,
    honest: &Proposal,
    batch: Batch,
    nondet: Vec<u8>,
    previous: Option<&Digest>,
) -> Proposal {
    let b = &honest.pre_prepare.body;
    let batch_digest = batch.ordered_digest(&nondet);
    let history = match previous {
        Some(previous) => chain_history(previous, b.seq, &batch_digest, &nondet),
        None => b.history,
    };
    let body = PrePrepare {
        batch_digest,
        history,
        nondet,
        ..b.clone()
    };
    Proposal {
        pre_prepare: signer.sign(body),
        batch,
    }
}

/// The same batch under a history that differs in one byte (`mask` into byte 1): fast-path
/// equivocation that PBFT's digest vote cannot see.
pub fn fork_history(signer: &Signer, honest: &Proposal, mask: u8) -> Proposal {
    let mut body = honest.pre_prepare.body.clone();
    body.history.0[1] ^= mask;
    Proposal {
        pre_prepare: signer.sign(body),
        batch: honest.batch.clone(),
    }
}

/// A wrong result of the same length (the last byte changed): a careless client that trusted
/// one reply would get a plausible wrong answer (a size, a byte of data).
pub fn plausible_lie(result: &mut Vec<u8>) {
    match result.last_mut() {
        Some(b) => *b ^= 0x01,
        None => result.push(1),
    }
}

/// Flips bits (`mask`) of byte `byte` of a signature: the statement no longer verifies.
pub fn break_signature<T>(signed: &mut Signed<T>, byte: usize, mask: u8) {
    let mut bytes = signed.signature.to_bytes();
    bytes[byte] ^= mask;
    signed.signature = Signature::from_bytes(&bytes);
}

/// Breaks the signature of the signed statement `message` carries, if it carries one; false
/// if it does not.
pub fn break_message_signature(message: &mut Message, byte: usize, mask: u8) -> bool {
    match message {
        Message::Agreement(AgreementMessage::PrePrepare(p)) => {
            break_signature(&mut p.pre_prepare, byte, mask)
        }
        Message::Agreement(AgreementMessage::Prepare(p)) => break_signature(p, byte, mask),
        Message::Agreement(AgreementMessage::Commit(c)) => break_signature(c, byte, mask),
        Message::Agreement(AgreementMessage::Checkpoint(c)) => break_signature(c, byte, mask),
        Message::ViewChange(ViewChangeMessage::ViewChange(v)) => break_signature(v, byte, mask),
        Message::ViewChange(ViewChangeMessage::NewView(v)) => break_signature(v, byte, mask),
        _ => return false,
    }
    true
}

/// Flips bits (`mask`) of byte `at` of a sealed frame's body (header excluded): every
/// authenticator covers the body, so the frame no longer opens.
pub fn corrupt_frame(frame: &mut [u8], at: usize, mask: u8) {
    frame[FRAME_HEADER_BYTES + at] ^= mask;
}

/// A new view whose pre-prepares differ from what its view changes determine: the last one
/// for another batch, or, if there is none, one invented past the highest stable checkpoint.
pub fn lying_new_view(signer: &Signer, honest: &NewView, me: ReplicaId) -> Signed<NewView> {
    let mut body = honest.clone();
    match body.pre_prepares.last_mut() {
        Some(last) => {
            let mut pp = last.body.clone();
            pp.batch_digest.0[0] ^= 0x33;
            *last = signer.sign(pp);
        }
        None => {
            let seq = body
                .view_changes
                .iter()
                .map(|v| v.body.stable.seq)
                .max()
                .unwrap_or_default()
                .next();
            body.pre_prepares.push(signer.sign(PrePrepare {
                view: body.view,
                seq,
                batch_digest: Batch::default().digest(),
                nondet: Vec::new(),
                primary: me,
                history: Default::default(),
            }));
        }
    }
    signer.sign(body)
}

/// A lying but well-formed view change, one lie chosen by `lie` (0, 1 or anything else):
/// 0: an `older` stable checkpoint (when there is one), evidence beyond its window withheld;
/// 1: every certificate withheld, a lone certificate turned into the bare pre-prepare it
/// certifies (still "accepted"); otherwise: all evidence withheld.
pub fn stale_view_change(
    honest: &ViewChange,
    older: Option<CheckpointCertificate>,
    lie: u64,
    log_window: u64,
) -> ViewChange {
    let mut body = honest.clone();
    match lie {
        0 if older.is_some() => {
            if let Some(old) = older {
                let high = old.seq.0 + log_window;
                body.evidence.retain(|e| e.seq().0 <= high);
                body.stable = old;
            }
        }
        1 => {
            let mut evidence: Vec<Evidence> = Vec::new();
            for e in &honest.evidence {
                match e {
                    Evidence::Prepared(cert) => {
                        let followed = honest
                            .evidence
                            .iter()
                            .any(|x| x.seq() == e.seq() && !x.is_strong());
                        if !followed {
                            evidence.push(Evidence::Accepted(cert.pre_prepare.clone()));
                        }
                    }
                    Evidence::Accepted(_) => evidence.push(e.clone()),
                }
            }
            body.evidence = evidence;
        }
        _ => body.evidence.clear(),
    }
    body
}

/// A new view for `view` built from `subset` (a quorum of view changes), re-signed: valid on
/// its own, so that different receivers can each be sent a different one.
pub fn new_view_from(
    signer: &Signer,
    config: &ClusterConfig,
    view: View,
    me: ReplicaId,
    subset: Vec<Signed<ViewChange>>,
) -> Signed<NewView> {
    let plan = crate::core::view_change::plan_new_view(config, &subset);
    let pre_prepares = crate::core::fast_path::reissue(view, me, &plan)
        .into_iter()
        .map(|pp| signer.sign(pp))
        .collect();
    signer.sign(NewView {
        view,
        primary: me,
        view_changes: subset,
        pre_prepares,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::SeqNo;

    fn prepare() -> Prepare {
        Prepare {
            view: View(2),
            seq: SeqNo(5),
            batch_digest: Digest([3; 32]),
            replica: ReplicaId(1),
        }
    }

    #[test]
    fn forged_votes_change_one_field_and_are_signed_by_the_liar() {
        let liar = Signer::from_secret(&[9; 32]);
        let other = Digest([4; 32]);
        let forked = vote_for(&liar, &prepare(), other);
        // Ed25519 signatures are deterministic: the same body signed again is the same.
        assert_eq!(
            forked,
            liar.sign(Prepare {
                batch_digest: other,
                ..prepare()
            })
        );
        let claimed = impersonate(&liar, &prepare(), ReplicaId(3));
        assert_eq!(
            claimed.body,
            Prepare {
                replica: ReplicaId(3),
                ..prepare()
            }
        );
        assert_eq!(claimed, liar.sign(claimed.body.clone()));
    }

    #[test]
    fn a_broken_signature_differs_from_the_valid_one_in_the_bits_flipped() {
        let signer = Signer::from_secret(&[9; 32]);
        let valid = signer.sign(prepare());
        let mut message = Message::Agreement(AgreementMessage::Prepare(valid.clone()));
        assert!(break_message_signature(&mut message, 7, 0x80));
        let Message::Agreement(AgreementMessage::Prepare(broken)) = message else {
            panic!("kind changed");
        };
        assert_eq!(broken.body, valid.body);
        let (a, b) = (valid.signature.to_bytes(), broken.signature.to_bytes());
        let diff: Vec<(usize, u8)> = (0..64)
            .filter(|&i| a[i] != b[i])
            .map(|i| (i, a[i] ^ b[i]))
            .collect();
        assert_eq!(diff, vec![(7, 0x80)]);
        let mut unsigned = Message::Agreement(AgreementMessage::FetchCommitted {
            from: SeqNo(0),
            to: SeqNo(1),
        });
        assert!(!break_message_signature(&mut unsigned, 7, 0x80));
    }

    #[test]
    fn a_reproposal_binds_its_batch_and_rechains_only_when_told() {
        let signer = Signer::from_secret(&[9; 32]);
        let honest_batch = Batch::default();
        let nondet = vec![1, 2, 3];
        let honest = Proposal {
            pre_prepare: signer.sign(PrePrepare {
                view: View(1),
                seq: SeqNo(7),
                batch_digest: honest_batch.ordered_digest(&nondet),
                nondet: nondet.clone(),
                primary: ReplicaId(1),
                history: Digest([5; 32]),
            }),
            batch: honest_batch,
        };
        let other_nondet = vec![4];
        let kept = repropose(
            &signer,
            &honest,
            Batch::default(),
            other_nondet.clone(),
            None,
        );
        let body = &kept.pre_prepare.body;
        assert_eq!(
            body.batch_digest,
            Batch::default().ordered_digest(&other_nondet)
        );
        assert_eq!(body.history, Digest([5; 32]));
        assert_eq!(
            (body.view, body.seq, body.primary),
            (View(1), SeqNo(7), ReplicaId(1))
        );
        let previous = Digest([6; 32]);
        let chained = repropose(
            &signer,
            &honest,
            Batch::default(),
            other_nondet,
            Some(&previous),
        );
        let body = &chained.pre_prepare.body;
        assert_eq!(
            body.history,
            chain_history(&previous, SeqNo(7), &body.batch_digest, &body.nondet)
        );
        let forked = fork_history(&signer, &honest, 2);
        assert_eq!(forked.batch, honest.batch);
        assert_eq!(forked.pre_prepare.body.history.0[1], 5 ^ 2);
    }
}
