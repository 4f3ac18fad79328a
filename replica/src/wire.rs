//! Wire format: typed messages, frames, authenticators.
//!
//! In: bytes from a socket (or the simulator's network). Out: [`Authenticated<Message>`], which
//! only [`Authenticator::open`] can build, after it has
//! - refused frames over [`FRAME_BYTES_MAX`] before reading them whole ([`frame_length`],
//!   [`FrameReader`]),
//! - decoded with a size limit (bincode 2, standard configuration, no trailing bytes),
//! - checked the sender's HMAC-SHA256 tag (pairwise keys; a broadcast carries one tag per
//!   receiver, computed over one digest of the message),
//! - checked every Ed25519 signature inside the message (requests, pre-prepares, prepares,
//!   checkpoints, view changes, new views and the certificates they carry) and that each batch
//!   hashes to the digest its pre-prepare signs,
//! - with one exception: a commit received on its own is not signature-checked (its MAC
//!   authenticates its sender, which is all a local "committed" decision needs); commits are
//!   checked where they become transferable evidence, inside a relayed [`CommitCertificate`],
//!   and those that fail are dropped from it ([`Authenticated::stripped_commits`]).
//!
//! What is signed: statements later forwarded as evidence ([`Statement`] types). What is only
//! MAC'd: everything point-to-point (replies, fetches, state-transfer data). Digests are taken
//! over canonical encodings (no maps, no floats) with a domain tag per statement kind.
//!
//! Semantic checks (quorum sizes, matching views, whose turn it is) are the core's job; the
//! verifier guarantees only that every signature and tag is genuine.

use crate::config::{ClientSecrets, ClusterConfig, ReplicaSecrets};
use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;
use state_abstraction::digest::Hasher;
pub use state_abstraction::{ClientId, Digest};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest frame accepted or produced.
pub const FRAME_BYTES_MAX: usize = 32 << 20;
/// Length prefix of a frame: a big-endian `u32`.
pub const FRAME_HEADER_BYTES: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub u32);

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct View(pub u64);

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SeqNo(pub u64);

/// A client's request number: unique per client and increasing.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl View {
    pub fn primary(self, n: usize) -> ReplicaId {
        ReplicaId((self.0 % n as u64) as u32)
    }
    pub fn next(self) -> View {
        View(self.0 + 1)
    }
}

impl SeqNo {
    pub fn next(self) -> SeqNo {
        SeqNo(self.0 + 1)
    }
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Who sent a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Principal {
    Replica(ReplicaId),
    Client(ClientId),
}

/// An Ed25519 signature, stored as two halves because serde derives arrays up to 32 only.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature([u8; 32], [u8; 32]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sig:{:02x}{:02x}{:02x}", self.0[0], self.0[1], self.0[2])
    }
}

impl Signature {
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.0);
        out[32..].copy_from_slice(&self.1);
        out
    }
    pub fn from_bytes(bytes: &[u8; 64]) -> Self {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a.copy_from_slice(&bytes[..32]);
        b.copy_from_slice(&bytes[32..]);
        Signature(a, b)
    }
}

/// A statement that is signed because it may be forwarded as evidence.
pub trait Statement: Serialize {
    /// Domain tag for its digest, so a signature on one kind never passes for another.
    const DOMAIN: &'static str;
    /// The principal whose key must have signed it.
    fn signer(&self) -> Principal;
}

/// A statement with its signer's signature over [`statement_digest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub body: T,
    pub signature: Signature,
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Byte strings as one block rather than a sequence of `u8`s. The encoding is the same (a
/// varint length, then the bytes: bincode writes a `u8` as one raw byte), but the serde
/// default visits every byte, which costs about a second per megabyte sealed and opened in a
/// test build: simulating 4 MiB operations was dominated by it.
mod byte_string {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                // Self-describing formats (JSON) hand a byte string back as a sequence.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// Canonical encoding (bincode 2 standard configuration).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    bincode::serde::encode_to_vec(value, codec()).map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes with the frame size limit; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { bytes: bytes.len() });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, codec())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Decode("trailing bytes".into()));
    }
    Ok(value)
}

/// The digest a statement's signature covers.
pub fn statement_digest<T: Statement>(body: &T) -> Digest {
    let mut h = Hasher::new(T::DOMAIN);
    // Encoding plain protocol structs cannot fail; an empty encoding would still be
    // domain-separated and would simply fail verification.
    h.bytes(&encode(body).unwrap_or_default());
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Statements

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

impl Statement for Request {
    const DOMAIN: &'static str = "bftfs.request";
    fn signer(&self) -> Principal {
        Principal::Client(self.client)
    }
}
impl Statement for PrePrepare {
    const DOMAIN: &'static str = "bftfs.pre_prepare";
    fn signer(&self) -> Principal {
        Principal::Replica(self.primary)
    }
}
impl Statement for Prepare {
    const DOMAIN: &'static str = "bftfs.prepare";
    fn signer(&self) -> Principal {
        Principal::Replica(self.replica)
    }
}
impl Statement for Commit {
    const DOMAIN: &'static str = "bftfs.commit";
    fn signer(&self) -> Principal {
        Principal::Replica(self.replica)
    }
}
impl Statement for Checkpoint {
    const DOMAIN: &'static str = "bftfs.checkpoint";
    fn signer(&self) -> Principal {
        Principal::Replica(self.replica)
    }
}
impl Statement for ViewChange {
    const DOMAIN: &'static str = "bftfs.view_change";
    fn signer(&self) -> Principal {
        Principal::Replica(self.replica)
    }
}
impl Statement for NewView {
    const DOMAIN: &'static str = "bftfs.new_view";
    fn signer(&self) -> Principal {
        Principal::Replica(self.primary)
    }
}

// ---------------------------------------------------------------------------------------------
// Compound values

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
    fn digest_of(request_digests: &[Digest]) -> Digest {
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
    fn ordered_digest_of(batch_digest: Digest, nondet: &[u8]) -> Digest {
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

// ---------------------------------------------------------------------------------------------
// Messages: one enum per protocol

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    Request(Signed<Request>),
    Reply(Reply),
    SpecResponse(Box<SpecResponse>),
    /// From a client that saw the primary equivocate, to every replica.
    Pom(Box<Pom>),
    /// Sent by a client when it connects to a replica, so the replica's driver knows the
    /// connection to send this client's replies on before any request arrives there (an
    /// ordered request goes to the primary only, but every replica replies). The core
    /// ignores it.
    Hello,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgreementMessage {
    PrePrepare(Proposal),
    Prepare(Signed<Prepare>),
    Commit(Signed<Commit>),
    Checkpoint(Signed<Checkpoint>),
    /// Asks for commit certificates of sequence numbers `from..=to` (a replica that fell behind).
    FetchCommitted {
        from: SeqNo,
        to: SeqNo,
    },
    /// Answer to `FetchCommitted`.
    Committed(Box<CommitCertificate>),
    /// Asks for the current view's proposals `from..=to` (a hole below proposals this
    /// replica holds): first the primary, then everyone.
    FillHole {
        view: View,
        from: SeqNo,
        to: SeqNo,
    },
    /// Answer to `FillHole`: a proposal signed by its view's primary, relayed by anyone.
    Filled(Box<Proposal>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewChangeMessage {
    ViewChange(Signed<ViewChange>),
    NewView(Signed<NewView>),
    /// Asks for the new-view message that installed the sender's current view (sent by a
    /// replica that sees traffic from a view it never entered).
    QueryNewView {
        view: View,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateTransferMessage {
    /// Asks for the sender's newest stable checkpoint certificate.
    QueryStable,
    ReplyStable(CheckpointCertificate),
    /// Asks for partition-tree node `(level, index)` at checkpoint `seq`.
    GetNode {
        seq: SeqNo,
        level: u32,
        index: u64,
    },
    /// `object_count` is meaningful at the root only (it enters the root digest).
    Node {
        seq: SeqNo,
        level: u32,
        index: u64,
        object_count: u64,
        children: Vec<Digest>,
    },
    GetPieceDigests {
        seq: SeqNo,
        index: u64,
    },
    PieceDigests {
        seq: SeqNo,
        index: u64,
        digests: Vec<Digest>,
    },
    GetPiece {
        seq: SeqNo,
        index: u64,
        piece: u32,
    },
    Piece {
        seq: SeqNo,
        index: u64,
        piece: u32,
        #[serde(with = "byte_string")]
        bytes: Vec<u8>,
    },
    /// Asks for the reply cache as of checkpoint `seq`.
    GetReplies {
        seq: SeqNo,
    },
    Replies {
        seq: SeqNo,
        #[serde(with = "byte_string")]
        table: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Client(ClientMessage),
    Agreement(AgreementMessage),
    ViewChange(ViewChangeMessage),
    StateTransfer(StateTransferMessage),
}

impl Message {
    /// Short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Client(ClientMessage::Request(_)) => "request",
            Message::Client(ClientMessage::Reply(_)) => "reply",
            Message::Client(ClientMessage::Hello) => "hello",
            Message::Client(ClientMessage::SpecResponse(_)) => "spec_response",
            Message::Client(ClientMessage::Pom(_)) => "pom",
            Message::Agreement(AgreementMessage::FillHole { .. }) => "fill_hole",
            Message::Agreement(AgreementMessage::Filled(_)) => "filled",
            Message::Agreement(AgreementMessage::PrePrepare(_)) => "pre_prepare",
            Message::Agreement(AgreementMessage::Prepare(_)) => "prepare",
            Message::Agreement(AgreementMessage::Commit(_)) => "commit",
            Message::Agreement(AgreementMessage::Checkpoint(_)) => "checkpoint",
            Message::Agreement(AgreementMessage::FetchCommitted { .. }) => "fetch_committed",
            Message::Agreement(AgreementMessage::Committed(_)) => "committed",
            Message::ViewChange(ViewChangeMessage::ViewChange(_)) => "view_change",
            Message::ViewChange(ViewChangeMessage::NewView(_)) => "new_view",
            Message::ViewChange(ViewChangeMessage::QueryNewView { .. }) => "query_new_view",
            Message::StateTransfer(_) => "state_transfer",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {bytes} bytes exceeds the limit")]
    FrameTooLarge { bytes: usize },
    #[error("decode: {0}")]
    Decode(String),
    #[error("encode: {0}")]
    Encode(String),
    #[error("unknown principal {0:?}")]
    UnknownPrincipal(Principal),
    #[error("frame carries no tag for this receiver")]
    NoTag,
    #[error("bad MAC from {0:?}")]
    BadMac(Principal),
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    #[error("batch does not match the digest its pre-prepare signs")]
    BadBatchDigest,
    #[error("{0:?} may not send {1}")]
    ForbiddenSender(Principal, &'static str),
}

impl WireError {
    /// Counter name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::FrameTooLarge { .. } => "oversized",
            WireError::Decode(_) => "garbled",
            WireError::Encode(_) => "encode",
            WireError::UnknownPrincipal(_) | WireError::NoTag | WireError::BadMac(_) => {
                "unauthenticated"
            }
            WireError::BadSignature(_) | WireError::BadBatchDigest => "bad_signature",
            WireError::ForbiddenSender(..) => "forbidden",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

/// Checks a frame's length prefix before its body is read.
pub fn frame_length(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { bytes: len });
    }
    Ok(len)
}

/// Prefixes `body` with its length.
pub fn frame(body: &[u8]) -> Result<Vec<u8>, WireError> {
    if body.len() > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { bytes: body.len() });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Splits a byte stream into frame bodies (sans-IO). An oversized length is an error as soon
/// as its header arrives; the connection should then be closed.
#[derive(Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        if self.buffer.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let header = [
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ];
        let len = frame_length(header)?;
        if self.buffer.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        let body = self.buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len].to_vec();
        self.buffer.drain(..FRAME_HEADER_BYTES + len);
        Ok(Some(body))
    }
}

/// The body of a frame: who sent it, one MAC tag per intended receiver, the encoded message.
#[derive(Serialize, Deserialize)]
struct FrameBody {
    sender: Principal,
    tags: Vec<(Principal, [u8; 32])>,
    #[serde(with = "byte_string")]
    message: Vec<u8>,
}

/// The sender a frame body claims, read without authenticating it: only for counting
/// failed frames per peer, never for trusting anything (a forger can claim anyone).
pub fn claimed_sender(body: &[u8]) -> Option<Principal> {
    decode::<FrameBody>(body).ok().map(|f| f.sender)
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// A message whose sender and signatures were verified. Only [`Authenticator::open`] makes one.
#[derive(Clone, Debug)]
pub struct Authenticated<M> {
    sender: Principal,
    message: M,
    /// See [`Authenticated::stripped_commits`].
    stripped: Vec<ReplicaId>,
}

impl<M> Authenticated<M> {
    pub fn sender(&self) -> Principal {
        self.sender
    }
    pub fn message(&self) -> &M {
        &self.message
    }
    /// The replicas named by commits that were dropped from a relayed commit certificate
    /// because their signature did not verify (they are gone from [`Self::message`]). Either
    /// that replica signed badly or the relayer tampered with the commit: like a bad MAC's
    /// claimed sender, it is a hint for people, never proof.
    pub fn stripped_commits(&self) -> &[ReplicaId] {
        &self.stripped
    }
    pub fn into_parts(self) -> (Principal, M) {
        (self.sender, self.message)
    }
}

/// Signs statements with one principal's Ed25519 key. Ed25519 signing is deterministic, so the
/// sans-IO core can own one.
#[derive(Clone)]
pub struct Signer {
    key: ed25519_dalek::SigningKey,
}

impl Signer {
    pub fn from_secret(bytes: &[u8; 32]) -> Self {
        Signer {
            key: ed25519_dalek::SigningKey::from_bytes(bytes),
        }
    }
    pub fn sign<T: Statement>(&self, body: T) -> Signed<T> {
        use ed25519_dalek::Signer as _;
        let digest = statement_digest(&body);
        let signature = Signature::from_bytes(&self.key.sign(&digest.0).to_bytes());
        Signed { body, signature }
    }
}

/// Counters of frames refused, by reason (shared with the driver for metrics).
#[derive(Debug, Default)]
pub struct WireCounters {
    pub oversized: AtomicU64,
    pub garbled: AtomicU64,
    pub unauthenticated: AtomicU64,
    /// Frames refused for a bad signature, plus commits dropped from accepted commit
    /// certificates for one ([`Authenticated::stripped_commits`]).
    pub bad_signature: AtomicU64,
    pub forbidden: AtomicU64,
    pub accepted: AtomicU64,
}

impl WireCounters {
    pub fn count(&self, error: &WireError) {
        let counter = match error {
            WireError::FrameTooLarge { .. } => &self.oversized,
            WireError::Decode(_) | WireError::Encode(_) => &self.garbled,
            WireError::UnknownPrincipal(_) | WireError::NoTag | WireError::BadMac(_) => {
                &self.unauthenticated
            }
            WireError::BadSignature(_) | WireError::BadBatchDigest => &self.bad_signature,
            WireError::ForbiddenSender(..) => &self.forbidden,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn rejected(&self) -> u64 {
        self.oversized.load(Ordering::Relaxed)
            + self.garbled.load(Ordering::Relaxed)
            + self.unauthenticated.load(Ordering::Relaxed)
            + self.bad_signature.load(Ordering::Relaxed)
            + self.forbidden.load(Ordering::Relaxed)
    }
}

type HmacSha256 = Hmac<Sha256>;

/// One principal's view of the keys: seals outgoing frames with MACs and opens (verifies)
/// incoming ones. `Sync`, so a driver may verify on several threads.
pub struct Authenticator {
    me: Principal,
    mac_keys: BTreeMap<Principal, [u8; 32]>,
    public_keys: BTreeMap<Principal, ed25519_dalek::VerifyingKey>,
    pub counters: Arc<WireCounters>,
    /// Signatures already verified (retransmissions and certificates repeat them a lot).
    verified: std::sync::Mutex<VerifiedCache>,
}

/// A bounded set of (statement digest, signature) pairs known to be valid, evicted oldest
/// first.
#[derive(Default)]
struct VerifiedCache {
    set: std::collections::BTreeSet<(Digest, [u8; 64])>,
    order: std::collections::VecDeque<(Digest, [u8; 64])>,
}

const VERIFIED_CACHE_ENTRIES: usize = 8192;

impl VerifiedCache {
    fn contains(&self, key: &(Digest, [u8; 64])) -> bool {
        self.set.contains(key)
    }
    fn insert(&mut self, key: (Digest, [u8; 64])) {
        if self.set.insert(key) {
            self.order.push_back(key);
            if self.order.len() > VERIFIED_CACHE_ENTRIES {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl Authenticator {
    fn with_keys(
        me: Principal,
        config: &ClusterConfig,
        mac_keys: BTreeMap<Principal, [u8; 32]>,
    ) -> Self {
        let mut public_keys = BTreeMap::new();
        for r in &config.replicas {
            if let Ok(k) = ed25519_dalek::VerifyingKey::from_bytes(&r.public_key.0) {
                public_keys.insert(Principal::Replica(r.id), k);
            }
        }
        for c in &config.clients {
            if let Ok(k) = ed25519_dalek::VerifyingKey::from_bytes(&c.public_key.0) {
                public_keys.insert(Principal::Client(c.id), k);
            }
        }
        Authenticator {
            me,
            mac_keys,
            public_keys,
            counters: Arc::new(WireCounters::default()),
            verified: std::sync::Mutex::new(VerifiedCache::default()),
        }
    }

    pub fn for_replica(config: &ClusterConfig, secrets: &ReplicaSecrets) -> Self {
        let keys = secrets.mac_keys.iter().map(|(p, k)| (*p, k.0)).collect();
        Self::with_keys(Principal::Replica(secrets.id), config, keys)
    }

    pub fn for_client(config: &ClusterConfig, secrets: &ClientSecrets) -> Self {
        let keys = secrets
            .mac_keys
            .iter()
            .map(|(r, k)| (Principal::Replica(*r), k.0))
            .collect();
        Self::with_keys(Principal::Client(secrets.id), config, keys)
    }

    pub fn me(&self) -> Principal {
        self.me
    }

    fn tag(
        &self,
        key: &[u8; 32],
        sender: Principal,
        receiver: Principal,
        digest: &Digest,
    ) -> [u8; 32] {
        let mut mac = match HmacSha256::new_from_slice(key) {
            Ok(m) => m,
            // HMAC accepts keys of any length; this arm is unreachable.
            Err(_) => return [0; 32],
        };
        mac.update(&encode(&(sender, receiver)).unwrap_or_default());
        mac.update(&digest.0);
        mac.finalize().into_bytes().into()
    }

    fn message_digest(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new("bftfs.frame");
        h.bytes(bytes);
        h.finish()
    }

    /// Encodes `message` into one frame (length prefix included) that every principal in `to`
    /// can authenticate: the message is hashed once and one tag per receiver is added.
    pub fn seal(&self, message: &Message, to: &[Principal]) -> Result<Vec<u8>, WireError> {
        let bytes = encode(message)?;
        let digest = Self::message_digest(&bytes);
        let mut tags = Vec::with_capacity(to.len());
        for receiver in to {
            let key = self
                .mac_keys
                .get(receiver)
                .ok_or(WireError::UnknownPrincipal(*receiver))?;
            tags.push((*receiver, self.tag(key, self.me, *receiver, &digest)));
        }
        frame(&encode(&FrameBody {
            sender: self.me,
            tags,
            message: bytes,
        })?)
    }

    /// Verifies a frame body (without its length prefix) and everything signed inside it.
    /// Failures are counted in [`Authenticator::counters`].
    pub fn open(&self, body: &[u8]) -> Result<Authenticated<Message>, WireError> {
        let result = self.open_uncounted(body);
        match &result {
            Ok(m) => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                if !m.stripped.is_empty() {
                    self.counters
                        .bad_signature
                        .fetch_add(m.stripped.len() as u64, Ordering::Relaxed);
                }
            }
            Err(e) => self.counters.count(e),
        }
        result
    }

    fn open_uncounted(&self, body: &[u8]) -> Result<Authenticated<Message>, WireError> {
        let frame: FrameBody = decode(body)?;
        let key = self
            .mac_keys
            .get(&frame.sender)
            .ok_or(WireError::UnknownPrincipal(frame.sender))?;
        let tag = frame
            .tags
            .iter()
            .find(|(p, _)| *p == self.me)
            .map(|(_, t)| *t)
            .ok_or(WireError::NoTag)?;
        let digest = Self::message_digest(&frame.message);
        let expected = self.tag(key, frame.sender, self.me, &digest);
        // Constant-time comparison through the hmac crate is not needed for a 32-byte tag
        // checked once per frame, but it costs nothing to avoid an early exit.
        if expected
            .iter()
            .zip(tag.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
        {
            return Err(WireError::BadMac(frame.sender));
        }
        let mut message: Message = decode(&frame.message)?;
        self.check_message(frame.sender, &message)?;
        let stripped = self.strip_forged_commits(&mut message);
        Ok(Authenticated {
            sender: frame.sender,
            message,
            stripped,
        })
    }

    /// Verifies the commits of a relayed commit certificate and drops those whose signature
    /// fails; returns the replicas they name. The certificate itself is still delivered: the
    /// core counts the distinct signers left and refuses it below 2f+1 (the one place where
    /// that quorum is enforced). A correct relayer cannot tell a forged commit from a good one
    /// (it never verified them), so a forged one is no reason to refuse its whole frame.
    fn strip_forged_commits(&self, message: &mut Message) -> Vec<ReplicaId> {
        let Message::Agreement(AgreementMessage::Committed(cert)) = message else {
            return Vec::new();
        };
        let mut stripped = Vec::new();
        cert.commits.retain(|c| {
            let valid = self.verify(c, "commit").is_ok();
            if !valid {
                stripped.push(c.body.replica);
            }
            valid
        });
        stripped
    }

    fn verify<T: Statement>(
        &self,
        signed: &Signed<T>,
        what: &'static str,
    ) -> Result<(), WireError> {
        self.verify_digest(signed, statement_digest(&signed.body), what)
    }

    /// [`Authenticator::verify`] with the statement's digest already computed by the caller.
    fn verify_digest<T: Statement>(
        &self,
        signed: &Signed<T>,
        digest: Digest,
        what: &'static str,
    ) -> Result<(), WireError> {
        use ed25519_dalek::Verifier as _;
        let signer = signed.body.signer();
        let key = self
            .public_keys
            .get(&signer)
            .ok_or(WireError::UnknownPrincipal(signer))?;
        // The digest covers the signer (every statement names it), so a cached pair can only
        // stand for the same signer's signature.
        let bytes = signed.signature.to_bytes();
        let cache_key = (digest, bytes);
        if self
            .verified
            .lock()
            .is_ok_and(|cache| cache.contains(&cache_key))
        {
            return Ok(());
        }
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        key.verify(&digest.0, &signature)
            .map_err(|_| WireError::BadSignature(what))?;
        if let Ok(mut cache) = self.verified.lock() {
            cache.insert(cache_key);
        }
        Ok(())
    }

    fn verify_proposal(&self, proposal: &Proposal) -> Result<(), WireError> {
        self.verify(&proposal.pre_prepare, "pre_prepare")?;
        // Each request is encoded and hashed once, for the batch digest and for its signature
        // (a request carries its whole operation: 4 KiB and more for writes).
        let requests: Vec<Digest> = proposal
            .batch
            .requests
            .iter()
            .map(|r| statement_digest(&r.body))
            .collect();
        let ordered = Batch::ordered_digest_of(
            Batch::digest_of(&requests),
            &proposal.pre_prepare.body.nondet,
        );
        if ordered != proposal.pre_prepare.body.batch_digest {
            return Err(WireError::BadBatchDigest);
        }
        for (r, digest) in proposal.batch.requests.iter().zip(requests) {
            self.verify_digest(r, digest, "request")?;
        }
        Ok(())
    }

    fn verify_checkpoint_certificate(&self, cert: &CheckpointCertificate) -> Result<(), WireError> {
        for c in &cert.checkpoints {
            self.verify(c, "checkpoint")?;
        }
        Ok(())
    }

    fn verify_view_change(&self, vc: &Signed<ViewChange>) -> Result<(), WireError> {
        self.verify(vc, "view_change")?;
        self.verify_checkpoint_certificate(&vc.body.stable)?;
        for e in &vc.body.evidence {
            match e {
                Evidence::Prepared(cert) => {
                    self.verify(&cert.pre_prepare, "pre_prepare")?;
                    for p in &cert.prepares {
                        self.verify(p, "prepare")?;
                    }
                }
                Evidence::Accepted(pp) => self.verify(pp, "pre_prepare")?,
            }
        }
        Ok(())
    }

    /// Checks every signature in `message` and that the sender may send it at all; that a
    /// top-level statement is signed by its sender is checked here so the core can trust
    /// `sender()` and the statement's own replica field alike.
    fn check_message(&self, sender: Principal, message: &Message) -> Result<(), WireError> {
        let from_replica = matches!(sender, Principal::Replica(_));
        let forbid = |what| Err(WireError::ForbiddenSender(sender, what));
        match message {
            Message::Client(ClientMessage::Request(r)) => {
                if let Principal::Client(c) = sender {
                    if c != r.body.client {
                        return forbid("another client's request");
                    }
                }
                self.verify(r, "request")
            }
            Message::Client(ClientMessage::Reply(reply)) => {
                if sender != Principal::Replica(reply.replica) {
                    return forbid("reply");
                }
                Ok(())
            }
            Message::Client(ClientMessage::Hello) => {
                if from_replica {
                    return forbid("hello");
                }
                Ok(())
            }
            Message::Client(ClientMessage::SpecResponse(spec)) => {
                if sender != Principal::Replica(spec.reply.replica) {
                    return forbid("spec_response");
                }
                self.verify(&spec.order, "pre_prepare")
            }
            Message::Client(ClientMessage::Pom(pom)) => {
                self.verify(&pom.first, "pre_prepare")?;
                self.verify(&pom.second, "pre_prepare")
            }
            _ if !from_replica => forbid(message.kind()),
            Message::Agreement(m) => match m {
                AgreementMessage::PrePrepare(p) => {
                    if sender != p.pre_prepare.body.signer() {
                        return forbid("pre_prepare");
                    }
                    self.verify_proposal(p)
                }
                AgreementMessage::Prepare(p) => {
                    if sender != p.body.signer() {
                        return forbid("prepare");
                    }
                    self.verify(p, "prepare")
                }
                AgreementMessage::Commit(c) => {
                    if sender != c.body.signer() {
                        return forbid("commit");
                    }
                    // The signature is not checked here. The MAC already proved that the
                    // commit comes from the replica it names, and a replica's local decision
                    // that a batch committed needs only that 2f+1 replicas sent matching
                    // commits (PBFT's normal case with MACs). The signature matters only once
                    // the commit is shown to a third party, inside a commit certificate, and is
                    // checked there (`strip_forged_commits`). Commits never enter view-change
                    // evidence. This saves one Ed25519 verification per peer per batch.
                    Ok(())
                }
                AgreementMessage::Checkpoint(c) => {
                    if sender != c.body.signer() {
                        return forbid("checkpoint");
                    }
                    self.verify(c, "checkpoint")
                }
                AgreementMessage::FetchCommitted { .. } | AgreementMessage::FillHole { .. } => {
                    Ok(())
                }
                AgreementMessage::Filled(p) => self.verify_proposal(p),
                // Its commits are verified one by one, and the forged ones dropped, by
                // `strip_forged_commits`. At most one per replica (a correct relayer keeps one),
                // so a relayer cannot make this replica verify more than n signatures.
                AgreementMessage::Committed(cert) => {
                    let mut signers = std::collections::BTreeSet::new();
                    if !cert.commits.iter().all(|c| signers.insert(c.body.replica)) {
                        return Err(WireError::Decode(
                            "commit certificate names a replica twice".into(),
                        ));
                    }
                    self.verify_proposal(&cert.proposal)
                }
            },
            Message::ViewChange(m) => match m {
                ViewChangeMessage::ViewChange(vc) => {
                    if sender != vc.body.signer() {
                        return forbid("view_change");
                    }
                    self.verify_view_change(vc)
                }
                ViewChangeMessage::NewView(nv) => {
                    // A new view may be relayed by any replica (to one that missed it).
                    self.verify(nv, "new_view")?;
                    for vc in &nv.body.view_changes {
                        self.verify_view_change(vc)?;
                    }
                    for pp in &nv.body.pre_prepares {
                        self.verify(pp, "pre_prepare")?;
                    }
                    Ok(())
                }
                ViewChangeMessage::QueryNewView { .. } => Ok(()),
            },
            Message::StateTransfer(StateTransferMessage::ReplyStable(cert)) => {
                self.verify_checkpoint_certificate(cert)
            }
            Message::StateTransfer(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{generate, ClusterKeys, ProtocolConfig};

    #[test]
    fn byte_strings_encode_as_sequences_of_bytes_did() {
        // Digests and signatures are over encodings: the faster form must not change them.
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let request = Request {
                client: ClientId(9),
                timestamp: Timestamp(len as u64),
                operation: bytes.clone(),
                read_only: false,
            };
            #[derive(Serialize)]
            struct PlainRequest {
                client: ClientId,
                timestamp: Timestamp,
                operation: Vec<u8>,
                read_only: bool,
            }
            let plain = PlainRequest {
                client: ClientId(9),
                timestamp: Timestamp(len as u64),
                operation: bytes,
                read_only: false,
            };
            let encoded = encode(&request).expect("encodes");
            assert_eq!(encoded, encode(&plain).expect("encodes"));
            assert_eq!(decode::<Request>(&encoded).expect("decodes"), request);
        }
    }

    pub(crate) fn keys() -> ClusterKeys {
        let mut x = 7u64;
        let mut random = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (x >> 33) as u8;
            }
        };
        let addresses = (0..4).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
        generate(
            1,
            addresses,
            &[ClientId(1)],
            ProtocolConfig::default(),
            &mut random,
        )
        .expect("keygen")
    }

    fn strip(frame: Vec<u8>) -> Vec<u8> {
        frame[FRAME_HEADER_BYTES..].to_vec()
    }

    #[test]
    fn seal_open_round_trip_and_tampering() {
        let keys = keys();
        let a0 = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
        let a1 = Authenticator::for_replica(&keys.config, &keys.replicas[1]);
        let a2 = Authenticator::for_replica(&keys.config, &keys.replicas[2]);
        let signer = Signer::from_secret(&keys.replicas[0].signing_key.0);
        let prepare = signer.sign(Prepare {
            view: View(1),
            seq: SeqNo(2),
            batch_digest: Digest::default(),
            replica: ReplicaId(0),
        });
        let message = Message::Agreement(AgreementMessage::Prepare(prepare.clone()));
        let sealed = a0
            .seal(&message, &[Principal::Replica(ReplicaId(1))])
            .expect("seal");
        let opened = a1.open(&strip(sealed.clone())).expect("open");
        assert_eq!(opened.sender(), Principal::Replica(ReplicaId(0)));
        assert_eq!(opened.message(), &message);
        // Not addressed to replica 2.
        assert!(matches!(
            a2.open(&strip(sealed.clone())),
            Err(WireError::NoTag)
        ));
        // A flipped bit anywhere is refused.
        let mut bad = strip(sealed);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(a1.open(&bad).is_err());
        // A prepare signed by replica 0 but sent by replica 2 is refused.
        let forged = a2
            .seal(&message, &[Principal::Replica(ReplicaId(1))])
            .expect("seal");
        assert!(matches!(
            a1.open(&strip(forged)),
            Err(WireError::ForbiddenSender(..))
        ));
        // A corrupted signature is refused.
        let mut corrupt = prepare;
        corrupt.signature.0[0] ^= 1;
        let m = Message::Agreement(AgreementMessage::Prepare(corrupt));
        let sealed = a0
            .seal(&m, &[Principal::Replica(ReplicaId(1))])
            .expect("seal");
        assert!(matches!(
            a1.open(&strip(sealed)),
            Err(WireError::BadSignature(_))
        ));
        assert_eq!(a1.counters.rejected(), 3);
        assert_eq!(a2.counters.rejected(), 1);
    }

    #[test]
    fn commits_are_checked_in_certificates_not_on_receipt() {
        use std::sync::atomic::Ordering::Relaxed;
        let keys = keys();
        let auth: Vec<Authenticator> = (0..4)
            .map(|i| Authenticator::for_replica(&keys.config, &keys.replicas[i]))
            .collect();
        let to1 = [Principal::Replica(ReplicaId(1))];
        let client = Signer::from_secret(&keys.clients[0].signing_key.0);
        let batch = Batch {
            requests: vec![client.sign(Request {
                client: ClientId(1),
                timestamp: Timestamp(1),
                operation: vec![1],
                read_only: false,
            })],
        };
        let pre_prepare = Signer::from_secret(&keys.replicas[0].signing_key.0).sign(PrePrepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: batch.digest(),
            nondet: vec![],
            primary: ReplicaId(0),
            history: Digest::default(),
        });
        let commit = |i: usize| {
            Signer::from_secret(&keys.replicas[i].signing_key.0).sign(Commit {
                view: View(0),
                seq: SeqNo(1),
                batch_digest: pre_prepare.body.batch_digest,
                replica: ReplicaId(i as u32),
            })
        };
        let mut forged = commit(3);
        forged.signature.1[7] ^= 4;

        // A commit with a broken signature under a valid MAC is accepted as it is...
        let m = Message::Agreement(AgreementMessage::Commit(forged.clone()));
        let sealed = strip(auth[3].seal(&m, &to1).expect("seal"));
        let opened = auth[1].open(&sealed).expect("commit with a valid MAC");
        assert_eq!(opened.message(), &m);
        assert!(opened.stripped_commits().is_empty());
        // ... but not under a broken MAC, nor from another sender than the replica it names.
        let mut bad_mac = sealed;
        let last = bad_mac.len() - 1;
        bad_mac[last] ^= 1;
        assert!(matches!(auth[1].open(&bad_mac), Err(WireError::BadMac(_))));
        let relayed = strip(auth[2].seal(&m, &to1).expect("seal"));
        assert!(matches!(
            auth[1].open(&relayed),
            Err(WireError::ForbiddenSender(..))
        ));
        assert_eq!(auth[1].counters.bad_signature.load(Relaxed), 0);

        let certificate = |commits: Vec<Signed<Commit>>| {
            Message::Agreement(AgreementMessage::Committed(Box::new(CommitCertificate {
                proposal: Proposal {
                    pre_prepare: pre_prepare.clone(),
                    batch: batch.clone(),
                },
                commits,
            })))
        };
        let committed_commits = |m: &Message| match m {
            Message::Agreement(AgreementMessage::Committed(c)) => c.commits.clone(),
            other => panic!("{other:?}"),
        };
        // 2f+1 valid commits and a forged one: the forged one is dropped and counted.
        let m = certificate(vec![commit(0), forged.clone(), commit(1), commit(2)]);
        let opened = auth[1]
            .open(&strip(auth[2].seal(&m, &to1).expect("seal")))
            .expect("certificate");
        assert_eq!(
            committed_commits(opened.message()),
            vec![commit(0), commit(1), commit(2)]
        );
        assert_eq!(opened.stripped_commits(), &[ReplicaId(3)]);
        assert_eq!(auth[1].counters.bad_signature.load(Relaxed), 1);
        // 2f valid and a forged one: 2f are left, which the core refuses (its quorum check,
        // tested in core::tests).
        let m = certificate(vec![commit(0), commit(1), forged]);
        let opened = auth[1]
            .open(&strip(auth[2].seal(&m, &to1).expect("seal")))
            .expect("certificate");
        assert_eq!(committed_commits(opened.message()).len(), 2);
        assert_eq!(auth[1].counters.bad_signature.load(Relaxed), 2);
        // A certificate naming one replica twice is refused before any commit is verified.
        let m = certificate(vec![commit(0), commit(1), commit(1), commit(2)]);
        assert!(matches!(
            auth[1].open(&strip(auth[2].seal(&m, &to1).expect("seal"))),
            Err(WireError::Decode(_))
        ));
        // The proposal inside a certificate is still checked strictly.
        let mut m = certificate(vec![commit(0), commit(1), commit(2)]);
        if let Message::Agreement(AgreementMessage::Committed(c)) = &mut m {
            c.proposal.pre_prepare.signature.0[0] ^= 1;
        }
        assert!(matches!(
            auth[1].open(&strip(auth[2].seal(&m, &to1).expect("seal"))),
            Err(WireError::BadSignature("pre_prepare"))
        ));
    }

    #[test]
    fn frames_refuse_oversize_before_body() {
        let mut reader = FrameReader::new();
        reader.push(&((FRAME_BYTES_MAX as u32) + 1).to_be_bytes());
        assert!(matches!(
            reader.next_frame(),
            Err(WireError::FrameTooLarge { .. })
        ));
        let mut reader = FrameReader::new();
        let f = frame(b"hello").expect("frame");
        reader.push(&f[..6]);
        assert_eq!(reader.next_frame().expect("ok"), None);
        reader.push(&f[6..]);
        assert_eq!(reader.next_frame().expect("ok"), Some(b"hello".to_vec()));
    }

    #[test]
    fn batch_digest_is_checked() {
        let keys = keys();
        let a0 = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
        let a1 = Authenticator::for_replica(&keys.config, &keys.replicas[1]);
        let client = Signer::from_secret(&keys.clients[0].signing_key.0);
        let primary = Signer::from_secret(&keys.replicas[0].signing_key.0);
        let request = client.sign(Request {
            client: ClientId(1),
            timestamp: Timestamp(1),
            operation: vec![1],
            read_only: false,
        });
        let batch = Batch {
            requests: vec![request],
        };
        let pp = primary.sign(PrePrepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: Batch::default().digest(),
            nondet: vec![],
            primary: ReplicaId(0),
            history: Digest::default(),
        });
        let m = Message::Agreement(AgreementMessage::PrePrepare(Proposal {
            pre_prepare: pp,
            batch,
        }));
        let sealed = a0
            .seal(&m, &[Principal::Replica(ReplicaId(1))])
            .expect("seal");
        assert!(matches!(
            a1.open(&strip(sealed)),
            Err(WireError::BadBatchDigest)
        ));
    }
}
