//! The signed statements: ⟨REQUEST⟩, ⟨PRE-PREPARE⟩, ⟨PREPARE⟩, ⟨COMMIT⟩, ⟨CHECKPOINT⟩,
//! ⟨VIEW-CHANGE⟩ and ⟨NEW-VIEW⟩, each with its signature's domain tag, and the history chain
//! the pre-prepares carry.

use super::codec::byte_string;
use super::{
    CheckpointCertificate, ClientId, Digest, Evidence, Principal, ReplicaId, SeqNo, Signed,
    Statement, Timestamp, View,
};
use serde::{Deserialize, Serialize};
use state_abstraction::digest::Hasher;

/// ⟨REQUEST, o, t, c⟩, signed by the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: ClientId,
    pub timestamp: Timestamp,
    #[serde(with = "byte_string")]
    pub operation: Vec<u8>,
    /// Asks for the unordered read-only path.
    pub read_only: bool,
}

/// ⟨PRE-PREPARE, v, n, d, ND, h_n⟩ signed by the primary of `view`; the batch travels beside
/// it. It doubles as Zyzzyva's ORDER-REQ (PROTOCOLS §6.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrePrepare {
    pub view: View,
    pub seq: SeqNo,
    pub batch_digest: Digest,
    /// The primary's proposed nondeterministic value (empty for a null batch).
    pub nondet: Vec<u8>,
    pub primary: ReplicaId,
    /// h_n = [`chain_history`]`(h_{n-1}, this)`, anchored at the view's starting checkpoint
    /// ([`history_anchor`]). Equal histories at one sequence number mean equal batches (and
    /// agreed values) at every slot since that checkpoint, which is what lets a client trust
    /// 3f+1 matching speculative replies. PBFT prepare/commit vote on `batch_digest` only: the
    /// history matters for speculation, never for what commits.
    pub history: Digest,
}

/// The history value a view's chain starts from: its new view's stable checkpoint (genesis for
/// view 0). The view is left out so that a new view re-issuing the same batches from the same
/// checkpoint reproduces the same histories.
pub fn history_anchor(stable: &CheckpointCertificate) -> Digest {
    let mut h = Hasher::new("bftfs.history.anchor");
    h.u64(stable.seq.0);
    h.digest(&stable.service_root);
    h.digest(&stable.replies_digest);
    h.finish()
}

/// h_n = H(h_{n-1} ‖ n ‖ batch digest ‖ H(ND)): the agreed value is part of what executes, so it
/// is part of the history too.
pub fn chain_history(
    previous: &Digest,
    seq: SeqNo,
    batch_digest: &Digest,
    nondet: &[u8],
) -> Digest {
    let mut h = Hasher::new("bftfs.history");
    h.digest(previous);
    h.u64(seq.0);
    h.digest(batch_digest);
    h.bytes(nondet);
    h.finish()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub view: View,
    pub seq: SeqNo,
    pub batch_digest: Digest,
    pub replica: ReplicaId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub view: View,
    pub seq: SeqNo,
    pub batch_digest: Digest,
    pub replica: ReplicaId,
}

/// ⟨CHECKPOINT, n, state digest⟩. The state is the service's partition-tree root plus the
/// digest of the replicas' reply cache (both must be transferred to a lagging replica).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: SeqNo,
    pub service_root: Digest,
    pub replies_digest: Digest,
    pub replica: ReplicaId,
}

/// ⟨VIEW-CHANGE, v+1, stable checkpoint certificate, evidence⟩ (PROTOCOLS §2.9).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    pub new_view: View,
    pub replica: ReplicaId,
    pub stable: CheckpointCertificate,
    /// For each sequence number above the stable checkpoint, the replica's highest-view
    /// evidence, in increasing sequence order.
    pub evidence: Vec<Evidence>,
}

/// ⟨NEW-VIEW, v, the view changes it was built from, the re-issued pre-prepares⟩.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    pub view: View,
    pub primary: ReplicaId,
    pub view_changes: Vec<Signed<ViewChange>>,
    /// One pre-prepare for each sequence number from the chosen checkpoint + 1 to the highest
    /// evidence (null batches fill the gaps), in increasing order.
    pub pre_prepares: Vec<Signed<PrePrepare>>,
}

/// `statement!(Type, "domain", Principal::Kind(field))`: the [`Statement`] impl of a message
/// kind, its signer being `field` of the statement.
macro_rules! statement {
    ($($t:ty, $domain:literal, $kind:ident($field:ident);)*) => {$(
        impl Statement for $t {
            const DOMAIN: &'static str = $domain;
            fn signer(&self) -> Principal {
                Principal::$kind(self.$field)
            }
        }
    )*};
}

statement! {
    Request, "bftfs.request", Client(client);
    PrePrepare, "bftfs.pre_prepare", Replica(primary);
    Prepare, "bftfs.prepare", Replica(replica);
    Commit, "bftfs.commit", Replica(replica);
    Checkpoint, "bftfs.checkpoint", Replica(replica);
    ViewChange, "bftfs.view_change", Replica(replica);
    NewView, "bftfs.new_view", Replica(primary);
}
