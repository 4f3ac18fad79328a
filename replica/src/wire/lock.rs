//! Zzyzx's log protocol on the wire (docs/zzyzx-plan.md §5, milestone M2): the entries a lock
//! holder signs and chains, the replies and lock checkpoint statements of the log servers,
//! and the certificate that lets the holder release the lock through ordering.
//!
//! What is signed is what gets forwarded: entries (a server hands a peer the entries it
//! missed; a certificate's end is checked against them) and lock checkpoint statements
//! (2f+1 of them are the certificate inside the ordered `Release`). Replies, pings and
//! fetches are only MAC'd.

use super::codec::byte_string;
use super::{ClientId, Digest, Principal, ReplicaId, Signed, Statement};
use serde::{Deserialize, Serialize};
use state_abstraction::digest::Hasher;
use state_abstraction::locking::{BaseCursor, BasePage};
use state_abstraction::{LockId, LockPoint, LockedResult};

/// Entry k of a lock's log, ⟨op, lock, epoch, k, h_{k-1}⟩ signed by the holder. The operation
/// travels beside it; `op_digest` binds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEntry {
    pub holder: ClientId,
    pub lock: LockId,
    pub epoch: u32,
    pub k: u64,
    /// h_{k-1}: the chain after the previous entry (the anchor for k = 1).
    pub prev: Digest,
    /// The holder's clock; the log server makes it monotone per lock.
    pub time_ns: u64,
    pub op_digest: Digest,
}

impl Statement for LockEntry {
    const DOMAIN: &'static str = "bftfs.lock.entry";
    fn signer(&self) -> Principal {
        Principal::Client(self.holder)
    }
}

/// A replica's statement that its copy of a lock's log ends at `point` (entry `k`, chain
/// `chain`, the lock's objects digesting to `state`); it never signs another one at this k,
/// and appends nothing after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSeal {
    pub replica: ReplicaId,
    pub point: LockPoint,
}

impl Statement for LockSeal {
    const DOMAIN: &'static str = "bftfs.lock.seal";
    fn signer(&self) -> Principal {
        Principal::Replica(self.replica)
    }
}

/// 2f+1 seals from distinct replicas over one point: the holder's proof, in its ordered
/// `Release`, of where the log ends. At least f+1 correct replicas hold every entry up to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockCertificate {
    pub seals: Vec<Signed<LockSeal>>,
}

/// A replica's statement of where its copy of a lock's log ends after the lock froze
/// without a certified end: entry `k` with chain `chain`, and entry k as the holder signed
/// it (`None` for an empty log, whose chain is the anchor). The holder's signature makes
/// the report checkable: a replica can report only entries the holder really sent. 2f+1 of
/// them are the evidence of an ordered `Resolve`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReport {
    pub replica: ReplicaId,
    pub lock: LockId,
    pub epoch: u32,
    pub k: u64,
    pub chain: Digest,
    pub top: Option<Signed<LockEntry>>,
}

impl Statement for LockReport {
    const DOMAIN: &'static str = "bftfs.lock.report";
    fn signer(&self) -> Principal {
        Principal::Replica(self.replica)
    }
}

/// What an ordered `Resolve` carries: reports from distinct replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockResolution {
    pub reports: Vec<Signed<LockReport>>,
}

/// An entry with its operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEntry {
    pub entry: Signed<LockEntry>,
    #[serde(with = "byte_string")]
    pub op: Vec<u8>,
}

/// How a log server sees a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockServerState {
    /// Not active here (yet): no activation seen, or its content is missing.
    Unknown,
    Active,
    /// Sealed at a point (the holder is releasing): only that point's seal is answered.
    Sealed,
    /// Frozen by ordering: nothing more is appended.
    Frozen,
    /// Merged back into the ordered state here: the lock is over.
    Merged,
}

/// A log server's answer to an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReply {
    pub replica: ReplicaId,
    pub lock: LockId,
    pub epoch: u32,
    pub k: u64,
    /// h_k after the entry.
    pub chain: Digest,
    pub result: LockedResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMessage {
    /// Holder → every server of the lock: append and execute this entry.
    Entry(Box<LoggedEntry>),
    /// Server → holder.
    Reply(Box<LockReply>),
    /// Holder → servers: how do you see this lock? Answered with `Status`.
    Ping { lock: LockId },
    /// Server → holder. `anchor` is h_0 (from the activation), `k`/`chain` the log's end.
    Status {
        replica: ReplicaId,
        lock: LockId,
        epoch: u32,
        state: LockServerState,
        anchor: Digest,
        k: u64,
        chain: Digest,
    },
    /// Holder → servers: seal the log at entry `k` with chain `chain` (the holder releases).
    Seal {
        lock: LockId,
        epoch: u32,
        k: u64,
        chain: Digest,
    },
    /// Server → holder: the signed seal.
    Sealed(Box<Signed<LockSeal>>),
    /// Server → server: entries `from..=to` of the lock's log, which the sender lacks.
    Fetch {
        lock: LockId,
        epoch: u32,
        from: u64,
        to: u64,
        /// The fixed end (k, h_k) the asker's log must reach: only a server whose log has
        /// h_k at k answers, so a log on another chain (a forking holder's) is not copied.
        want: Option<(u64, Digest)>,
    },
    /// Answer to `Fetch`: consecutive entries from `Fetch`'s `from` (each checked by the
    /// receiver: signature by the wire, chain and op digest by the core).
    Entries {
        lock: LockId,
        epoch: u32,
        entries: Vec<LoggedEntry>,
    },
    /// Server → server: the lock's objects at activation from `from` on, which the sender
    /// lacks (it got the ordered state by transfer, with placeholders only).
    FetchBase { lock: LockId, from: BaseCursor },
    /// Answer to `FetchBase`: a page of at most [`LOCK_BASE_PAGE_BYTES`] (or one piece).
    /// The receiver's service checks the whole content against the lock's base digest in
    /// the ordered state before using it.
    Base {
        lock: LockId,
        from: BaseCursor,
        page: BasePage,
    },
    /// Any client → servers: report where your copy of this frozen log ends (the client
    /// then resolves the lock through ordering).
    ReportAsk { lock: LockId },
    /// Server → client: the signed report (only for a log frozen without an end).
    Report(Box<Signed<LockReport>>),
}

impl LockMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            LockMessage::Entry(_) => "lock_entry",
            LockMessage::Reply(_) => "lock_reply",
            LockMessage::Ping { .. } => "lock_ping",
            LockMessage::Status { .. } => "lock_status",
            LockMessage::Seal { .. } => "lock_seal",
            LockMessage::Sealed(_) => "lock_sealed",
            LockMessage::Fetch { .. } => "lock_fetch",
            LockMessage::Entries { .. } => "lock_entries",
            LockMessage::FetchBase { .. } => "lock_fetch_base",
            LockMessage::Base { .. } => "lock_base",
            LockMessage::ReportAsk { .. } => "lock_report_ask",
            LockMessage::Report(_) => "lock_report",
        }
    }
}

/// h_0 of a lock's chain: fixed at activation by the lock's identity and the digest of its
/// objects then, so a log can never be replayed onto another lock or another activation.
pub fn lock_anchor(lock: LockId, epoch: u32, base: &Digest) -> Digest {
    let mut h = Hasher::new("bftfs.lock.anchor");
    h.u64(lock.0);
    h.u64(epoch as u64);
    h.digest(base);
    h.finish()
}

/// h_k from h_{k-1} and entry k. The entry's own `prev` is what the server compares with its
/// log's end; the chain covers what executes (k, time, operation), so equal chains at k mean
/// equal logs up to k.
pub fn lock_chain_next(prev: &Digest, entry: &LockEntry) -> Digest {
    let mut h = Hasher::new("bftfs.lock.chain");
    h.digest(prev);
    h.u64(entry.k);
    h.u64(entry.time_ns);
    h.digest(&entry.op_digest);
    h.finish()
}

/// The digest an entry's `op_digest` must equal.
pub fn lock_op_digest(op: &[u8]) -> Digest {
    let mut h = Hasher::new("bftfs.lock.op");
    h.bytes(op);
    h.finish()
}

/// Most entries in one `Entries` answer (each is signature-checked on arrival).
pub const LOCK_ENTRIES_PER_MESSAGE: usize = 64;

/// Checks lock certificates with the replicas' public keys: the [`state_abstraction::locking::LockCertChecker`]
/// the file service uses for an ordered `Release`.
pub struct LockCertVerifier {
    keys: std::collections::BTreeMap<ReplicaId, ed25519_dalek::VerifyingKey>,
    /// The clients' keys, for the holder's signature on a report's entry.
    clients: std::collections::BTreeMap<ClientId, ed25519_dalek::VerifyingKey>,
    quorum: usize,
}

/// Most bytes of a `Resolve`'s evidence (n reports, each with one entry header).
pub const LOCK_RESOLUTION_BYTES_MAX: usize = 64 << 10;

/// What a server puts in one page of a lock's content (a piece larger than this, which the
/// file service's 64 KiB chunks never are, goes alone).
pub const LOCK_BASE_PAGE_BYTES: usize = 1 << 20;

fn verify_statement<T: Statement + Serialize>(
    key: &ed25519_dalek::VerifyingKey,
    s: &Signed<T>,
) -> bool {
    use ed25519_dalek::Verifier as _;
    let digest = super::statement_digest(&s.body);
    let signature = ed25519_dalek::Signature::from_bytes(&s.signature.to_bytes());
    key.verify(&digest.0, &signature).is_ok()
}

impl LockCertVerifier {
    pub fn new(config: &crate::config::ClusterConfig) -> Self {
        let keys = config
            .replicas
            .iter()
            .filter_map(|r| {
                ed25519_dalek::VerifyingKey::from_bytes(&r.public_key.0)
                    .ok()
                    .map(|k| (r.id, k))
            })
            .collect();
        let clients = config
            .clients
            .iter()
            .filter_map(|c| {
                ed25519_dalek::VerifyingKey::from_bytes(&c.public_key.0)
                    .ok()
                    .map(|k| (c.id, k))
            })
            .collect();
        LockCertVerifier {
            keys,
            clients,
            quorum: config.quorum(),
        }
    }

    /// The point 2f+1 distinct replicas sealed, if the certificate proves one.
    pub fn verify(&self, cert: &LockCertificate) -> Option<LockPoint> {
        let first = cert.seals.first()?.body.point;
        let mut signers = std::collections::BTreeSet::new();
        for s in &cert.seals {
            if s.body.point != first || !signers.insert(s.body.replica) {
                return None;
            }
            let key = self.keys.get(&s.body.replica)?;
            if !verify_statement(key, s) {
                return None;
            }
        }
        (signers.len() >= self.quorum).then_some(first)
    }

    /// Whether one report is a replica's signed statement about this lock whose end the
    /// holder's signature backs.
    pub fn report_valid(
        &self,
        r: &Signed<LockReport>,
        subject: &state_abstraction::ResolveSubject,
    ) -> bool {
        let b = &r.body;
        if b.lock != subject.lock || b.epoch != subject.epoch {
            return false;
        }
        let Some(key) = self.keys.get(&b.replica) else {
            return false;
        };
        let backed = match &b.top {
            None => b.k == 0 && b.chain == lock_anchor(subject.lock, subject.epoch, &subject.base),
            Some(t) => {
                let e = &t.body;
                e.k == b.k
                    && e.k > 0
                    && e.lock == b.lock
                    && e.epoch == b.epoch
                    && e.holder == subject.holder
                    && lock_chain_next(&e.prev, e) == b.chain
                    && self
                        .clients
                        .get(&subject.holder)
                        .is_some_and(|k| verify_statement(k, t))
            }
        };
        backed && verify_statement(key, r)
    }

    /// The end of a frozen log that 2f+1 reports show (docs/zzyzx-plan.md §6.3, without
    /// lock checkpoints): the longest chain any valid report ends in. Every entry the holder
    /// completed was logged by 2f+1 replicas, so at least one correct replica among any 2f+1
    /// reporters holds it, and a correct holder signs one chain only, so the longest report
    /// includes every completed entry. Between different chains at one k (a holder that
    /// forked its log) the one more replicas report wins, then the smaller chain digest.
    pub fn choose(
        &self,
        resolution: &LockResolution,
        subject: &state_abstraction::ResolveSubject,
    ) -> Option<state_abstraction::Resolution> {
        let mut ends: std::collections::BTreeMap<ReplicaId, (u64, Digest)> = Default::default();
        for r in &resolution.reports {
            if !ends.contains_key(&r.body.replica) && self.report_valid(r, subject) {
                ends.insert(r.body.replica, (r.body.k, r.body.chain));
            }
        }
        if ends.len() < self.quorum {
            return None;
        }
        let mut counts: std::collections::BTreeMap<(u64, Digest), usize> = Default::default();
        for end in ends.values() {
            *counts.entry(*end).or_default() += 1;
        }
        // Two valid ends at one k with different chains: the holder signed both entries.
        let equivocation = counts
            .keys()
            .zip(counts.keys().skip(1))
            .any(|(a, b)| a.0 == b.0 && a.1 != b.1);
        let ((k, chain), _) = counts
            .into_iter()
            .max_by(|(a, na), (b, nb)| a.0.cmp(&b.0).then(na.cmp(nb)).then(b.1.cmp(&a.1)))?;
        Some(state_abstraction::Resolution {
            point: LockPoint {
                lock: subject.lock,
                epoch: subject.epoch,
                k,
                chain,
                state: LockPoint::UNCERTIFIED,
            },
            equivocation,
        })
    }
}

impl state_abstraction::locking::LockCertChecker for LockCertVerifier {
    fn check(&self, cert: &[u8]) -> Option<LockPoint> {
        // A certificate names at most n replicas: bound the decode before trusting a length.
        if cert.len() > 64 << 10 {
            return None;
        }
        self.verify(&super::decode(cert).ok()?)
    }

    fn resolve(
        &self,
        evidence: &[u8],
        subject: &state_abstraction::ResolveSubject,
    ) -> Option<state_abstraction::Resolution> {
        if evidence.len() > LOCK_RESOLUTION_BYTES_MAX {
            return None;
        }
        self.choose(&super::decode(evidence).ok()?, subject)
    }
}
