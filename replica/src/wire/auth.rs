//! Authentication: sealing frames with pairwise HMAC-SHA256 tags, and opening them into
//! [`Authenticated`] messages after every tag and signature inside has been checked.

use super::frame::FrameBody;
use super::{
    decode, encode, frame, statement_digest, AgreementMessage, Batch, CheckpointCertificate,
    ClientMessage, Digest, Evidence, Message, Principal, Proposal, ReplicaId, Signed,
    StateTransferMessage, Statement, ViewChange, ViewChangeMessage, WireError,
};
use crate::config::{ClientSecrets, ClusterConfig, ReplicaSecrets};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use state_abstraction::digest::Hasher;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
            Message::Lock(m) => self.check_lock_message(sender, m),
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

    fn check_lock_message(
        &self,
        sender: Principal,
        message: &super::LockMessage,
    ) -> Result<(), WireError> {
        use super::LockMessage as L;
        let forbid = |what| Err(WireError::ForbiddenSender(sender, what));
        let from_replica = matches!(sender, Principal::Replica(_));
        match message {
            L::Entry(e) => {
                // Relayed entries travel in `Entries`; an `Entry` comes from its holder.
                if sender != e.entry.body.signer() {
                    return forbid("lock_entry");
                }
                self.verify(&e.entry, "lock_entry")
            }
            L::Report(r) => {
                if sender != r.body.signer() {
                    return forbid("lock_report");
                }
                if let Some(top) = &r.body.top {
                    self.verify(top, "lock_entry")?;
                }
                self.verify(r, "lock_report")
            }
            L::Ping { .. } | L::Seal { .. } | L::ReportAsk { .. } => {
                if from_replica {
                    return forbid(message.kind());
                }
                Ok(())
            }
            L::Reply(r) => {
                if sender != Principal::Replica(r.replica) {
                    return forbid("lock_reply");
                }
                Ok(())
            }
            L::Status { replica, .. } => {
                if sender != Principal::Replica(*replica) {
                    return forbid("lock_status");
                }
                Ok(())
            }
            L::Sealed(s) => {
                if sender != s.body.signer() {
                    return forbid("lock_sealed");
                }
                self.verify(s, "lock_seal")
            }
            L::Fetch { .. } | L::FetchBase { .. } => {
                if !from_replica {
                    return forbid(message.kind());
                }
                Ok(())
            }
            L::Base { page, .. } => {
                if !from_replica {
                    return forbid("lock_base");
                }
                let bytes: usize = page.pieces.iter().map(|p| p.bytes.len()).sum();
                if page.pieces.len() > 1 && bytes > super::lock::LOCK_BASE_PAGE_BYTES {
                    return Err(WireError::Decode("lock base page too large".into()));
                }
                Ok(())
            }
            L::Entries { entries, .. } => {
                if !from_replica {
                    return forbid("lock_entries");
                }
                if entries.len() > super::lock::LOCK_ENTRIES_PER_MESSAGE {
                    return Err(WireError::Decode("too many lock entries".into()));
                }
                for e in entries {
                    self.verify(&e.entry, "lock_entry")?;
                }
                Ok(())
            }
        }
    }
}
