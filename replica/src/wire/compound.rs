//! Compound values built from statements: batches, proposals, the prepared, commit and
//! checkpoint certificates, view-change evidence, and the replies a client receives.

use super::codec::byte_string;
use super::{
    statement_digest, Checkpoint, ClientId, Commit, Digest, PrePrepare, Prepare, ReplicaId,
    Request, SeqNo, Signed, Timestamp, View,
};
use serde::{Deserialize, Serialize};
use state_abstraction::digest::Hasher;

/// The requests ordered under one sequence number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub requests: Vec<Signed<Request>>,
}

impl Batch {
    /// Hashes every request body once; the pre-prepare signs this digest.
    pub fn digest(&self) -> Digest {
        let requests: Vec<Digest> = self
            .requests
            .iter()
            .map(|r| statement_digest(&r.body))
            .collect();
        Self::digest_of(&requests)
    }
    /// [`Batch::digest`] from the requests' [`statement_digest`]s, for a caller that needs
    /// those anyway (the verifier checks each request's signature over its digest).
    pub(super) fn digest_of(request_digests: &[Digest]) -> Digest {
        let mut h = Hasher::new("bftfs.batch");
        h.u64(request_digests.len() as u64);
        for d in request_digests {
            h.digest(d);
        }
        h.finish()
    }
    /// What a pre-prepare's `batch_digest` signs: the batch and the agreed value it runs with.
    /// Prepares and commits vote on this digest, so a primary cannot get one batch committed
    /// with different agreed values (different times) at different replicas. A null batch
    /// (no agreed value) keeps the plain batch digest.
    pub fn ordered_digest(&self, nondet: &[u8]) -> Digest {
        Self::ordered_digest_of(self.digest(), nondet)
    }
    pub(super) fn ordered_digest_of(batch_digest: Digest, nondet: &[u8]) -> Digest {
        if nondet.is_empty() {
            return batch_digest;
        }
        let mut h = Hasher::new("bftfs.ordered_batch");
        h.digest(&batch_digest);
        h.bytes(nondet);
        h.finish()
    }
    /// Bytes of operations carried (what batch limits count).
    pub fn operation_bytes(&self) -> usize {
        self.requests.iter().map(|r| r.body.operation.len()).sum()
    }
}

/// A pre-prepare with its batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub pre_prepare: Signed<PrePrepare>,
    pub batch: Batch,
}

/// PBFT's prepared certificate: a pre-prepare and 2f prepares from distinct backups, all for
/// the same view, sequence number and digest. Strong evidence (PROTOCOLS §2.8).
///
/// It names its batch by digest only. Certificates travel inside view changes and new views,
/// which carry one per slot of the log: with the batches inside, a log of large writes made
/// those messages larger than any frame and a view change could never complete. A replica
/// that needs the batch fetches it by digest (`FillHole`), and one correct replica of the
/// 2f+1 that prepared it still holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCertificate {
    pub pre_prepare: Signed<PrePrepare>,
    pub prepares: Vec<Signed<Prepare>>,
}

/// A proposal and at least 2f+1 commits for it: proof that the batch committed at its sequence
/// number, used to catch up a replica that missed it.
///
/// Commits are not signature-checked when they arrive on their own (see the module doc), so a
/// correct replica may hold a commit with a broken signature from a faulty one. It therefore
/// keeps every matching commit it has (up to n, and later ones as they arrive) so that the
/// receiver, which verifies them and drops those that fail, still finds 2f+1 valid ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitCertificate {
    pub proposal: Proposal,
    pub commits: Vec<Signed<Commit>>,
}

/// 2f+1 matching signed checkpoints (empty for the genesis checkpoint at sequence number 0,
/// whose digest every replica computes itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCertificate {
    pub seq: SeqNo,
    pub service_root: Digest,
    pub replies_digest: Digest,
    pub checkpoints: Vec<Signed<Checkpoint>>,
}

/// Evidence about one sequence number carried by a view change (PROTOCOLS §2.8). Ranked by
/// view first (§2.9); strong beats fast within a view. A view change carries, per sequence
/// number, at most one strong item and, after it, at most one fast item of a strictly higher
/// view (see `core::view_change::valid_view_change`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Evidence {
    /// Strong: PBFT's prepared certificate (2f+1 replicas stand behind it).
    Prepared(PreparedCertificate),
    /// Fast: a pre-prepare signed by that view's primary that the reporting replica accepted
    /// (with its batch) inside an installed view. One report proves nothing (its sender may be
    /// faulty); the new view counts it only when f+1 view changes report the same content.
    /// Like a certificate, it names the batch by digest only.
    Accepted(Signed<PrePrepare>),
}

impl Evidence {
    pub fn view(&self) -> View {
        self.pre_prepare().body.view
    }
    pub fn seq(&self) -> SeqNo {
        self.pre_prepare().body.seq
    }
    pub fn is_strong(&self) -> bool {
        match self {
            Evidence::Prepared(_) => true,
            Evidence::Accepted(_) => false,
        }
    }
    pub fn pre_prepare(&self) -> &Signed<PrePrepare> {
        match self {
            Evidence::Prepared(c) => &c.pre_prepare,
            Evidence::Accepted(p) => p,
        }
    }
}

/// A reply to a client; MAC'd only. Sent for a batch that committed (`read_only` false) or
/// from committed state on the read-only path (`read_only` true); a speculative result travels
/// as a [`SpecResponse`] instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub view: View,
    pub client: ClientId,
    pub timestamp: Timestamp,
    pub replica: ReplicaId,
    pub read_only: bool,
    #[serde(with = "byte_string")]
    pub result: Vec<u8>,
}

/// ⟨SPEC-RESPONSE⟩: the result of executing a batch before it committed, with the primary's
/// signed order (view, seq, history). A client completes on 3f+1 of these that agree on the
/// whole order body and the result; two validly signed orders for one (view, seq) that differ
/// are a proof of misbehaviour ([`Pom`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecResponse {
    pub reply: Reply,
    pub order: Signed<PrePrepare>,
}

/// ⟨POM, OR1, OR2⟩: two pre-prepares signed by one primary for one (view, seq) that differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pom {
    pub first: Signed<PrePrepare>,
    pub second: Signed<PrePrepare>,
}

impl Pom {
    /// Whether the two orders convict the primary of their view (signatures are the
    /// verifier's job).
    pub fn convicts(&self, n: usize) -> bool {
        let (a, b) = (&self.first.body, &self.second.body);
        a.view == b.view
            && a.seq == b.seq
            && a != b
            && a.primary == a.view.primary(n)
            && b.primary == a.primary
    }
}
