//! Tiny key-value service for the simulator.
//!
//! In: bincode-encoded [`KvOp`]s, the agreed time as nondet (a little-endian `u64`).
//! Out: bincode-encoded [`KvReply`]s, and the BASE abstract view of the map.
//!
//! The abstract state is [`BUCKETS`] bucket objects (keys hashed to a bucket; one piece each
//! holding the bucket's entries in key order) plus one meta object (index [`META_OBJECT`]) that
//! holds the last agreed time, so that checkpoint digests cover every input that affects
//! later replies. Checkpoints live in memory: each keeps copies of the buckets modified since
//! the previous checkpoint (copy-on-write at bucket granularity) and its own partition tree.

use crate::digest::{object_digest, piece_digests, Digest, Hasher, PartitionTree};
use crate::locking::{
    BaseCursor, BasePage, LockCertChecker, LockEvent, LockId, LockInfo, LockPoint, LockedResult,
};
use crate::service::{AbstractObject, ClientId, RequestPolicy, SeqNo, Service, ServiceError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Number of bucket objects.
pub const BUCKETS: u64 = 64;
/// Index of the meta object (last agreed time).
pub const META_OBJECT: u64 = BUCKETS;
/// How far ahead of a backup's own clock a proposed time may be.
pub const MAX_CLOCK_SKEW_NS: u64 = 5_000_000_000;
/// A locked bucket's content, at most (far above what the simulator's values reach).
const KV_LOCK_BYTES_MAX: u64 = 64 << 20;

/// Decoding limit for operations and abstract objects: a peer or client controls these bytes.
const DECODE_LIMIT: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    /// Sets `key`; replies with the previous value.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Reads `key` (read-only).
    Get { key: Vec<u8> },
    /// Appends to `key`'s value; replies with the new value.
    Append { key: Vec<u8>, value: Vec<u8> },
    /// Removes `key`; replies with the previous value.
    Delete { key: Vec<u8> },
    /// Asks for a Zzyzx lock on the bucket of `key` (active from the next checkpoint);
    /// replies [`KvReply::Lock`] or [`KvReply::Refused`].
    Lock { key: Vec<u8> },
    /// The holder gives a lock back; `cert` is an encoded lock certificate naming where its
    /// log ends (checked with the service's [`LockCertChecker`]).
    Release { lock: LockId, cert: Option<Vec<u8>> },
    /// Any client fixes where a frozen lock's log ends with 2f+1 replicas' reports (see the
    /// file service's `FsOp::Resolve`): `Locked` within the grace, `Refused` if the evidence
    /// does not verify or the lock is not frozen.
    Resolve { lock: LockId, evidence: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvReply {
    Value(Option<Vec<u8>>),
    /// The operation bytes did not decode.
    Malformed,
    Lock(LockId),
    /// A lock operation refused (bucket already locked, not the holder, bad certificate).
    Refused,
    /// The key is in a locked bucket: nothing done, and the lock is frozen so that it merges
    /// soon; the client tries again.
    Locked,
    Done,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these plain types.
    bincode::serde::encode_to_vec(v, config()).unwrap_or_default()
}

/// Decodes `bytes` whole (trailing bytes refused).
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let (v, used) = bincode::serde::decode_from_slice(bytes, config()).ok()?;
    (used == bytes.len()).then_some(v)
}

impl KvOp {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Option<KvOp> {
        decode(bytes)
    }
    pub fn key(&self) -> &[u8] {
        match self {
            KvOp::Put { key, .. }
            | KvOp::Get { key }
            | KvOp::Append { key, .. }
            | KvOp::Delete { key }
            | KvOp::Lock { key } => key,
            KvOp::Release { .. } | KvOp::Resolve { .. } => &[],
        }
    }
}

impl KvReply {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Option<KvReply> {
        decode(bytes)
    }
}

/// The bucket a key lives in (stable across replicas: a hash, not the std `Hasher`).
pub fn bucket_of(key: &[u8]) -> u64 {
    let mut h = Hasher::new("bftfs.kv.bucket");
    h.bytes(key);
    let d = h.finish();
    u64::from_le_bytes([
        d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
    ]) % BUCKETS
}

type Bucket = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Clone, Debug)]
struct Checkpoint {
    /// Abstract values of the objects as of this checkpoint, for those modified between the
    /// previous checkpoint and this one (the rest are found in older checkpoints or the base).
    objects: BTreeMap<u64, AbstractObject>,
    tree: PartitionTree,
    root: Digest,
}

/// The key-value service. See the module doc.
#[derive(Clone, Debug)]
pub struct KvService {
    buckets: Vec<Bucket>,
    last_time: u64,
    /// Objects modified since the newest checkpoint.
    dirty: BTreeSet<u64>,
    /// Full abstract values as of the oldest retained checkpoint: the base that checkpoint
    /// deltas apply to.
    base: BTreeMap<u64, AbstractObject>,
    checkpoints: BTreeMap<SeqNo, Checkpoint>,
    /// Partition tree of the current state, kept up to date at checkpoints.
    tree: PartitionTree,
    /// Zzyzx bucket locks, in the meta object (ordered state).
    locks: KvLocks,
    /// The lock timeline: each active lock's bucket (live, and as at activation). Not
    /// ordered state: rollback leaves it alone.
    lock_content: BTreeMap<LockId, (Bucket, Bucket)>,
    lock_events: Vec<LockEvent>,
    cert_checker: Option<Arc<dyn LockCertChecker>>,
    /// A lock merged here with content its certified end does not vouch for (see
    /// `Service::state_suspect`); cleared by `put_objs`.
    suspect: bool,
}

/// A grace after a freeze without a certificate, for the holder's `Release` with one; a
/// `Resolve` is taken only after it.
pub const RELEASE_GRACE_NS: u64 = 5_000_000_000;
/// A frozen lock nobody resolved merges with each replica's own log after this.
pub const UNRESOLVED_MERGE_NS: u64 = crate::fs::locks::UNRESOLVED_MERGE_NS;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct KvLocks {
    next: u64,
    /// By id.
    locks: Vec<KvLock>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct KvLock {
    id: LockId,
    bucket: u64,
    holder: ClientId,
    state: KvLockState,
    /// The bucket's digest at activation (what fetched content is checked against).
    base: Digest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum KvLockState {
    Pending,
    Active,
    Frozen { since: u64, end: Option<LockPoint> },
}

fn bucket_digest(lock: LockId, bucket: &Bucket) -> Digest {
    let mut h = Hasher::new("bftfs.kv.lockstate");
    h.u64(lock.0);
    let entries: Vec<(&Vec<u8>, &Vec<u8>)> = bucket.iter().collect();
    h.bytes(&encode(&entries));
    h.finish()
}

impl Default for KvService {
    fn default() -> Self {
        Self::new()
    }
}

fn digest_of(index: u64, obj: &AbstractObject) -> Digest {
    object_digest(index, &piece_digests(index, &obj.pieces))
}

impl KvService {
    /// An empty map with no checkpoints (the replica takes the genesis checkpoint).
    pub fn new() -> Self {
        let mut s = KvService {
            buckets: vec![Bucket::new(); BUCKETS as usize],
            last_time: 0,
            dirty: BTreeSet::new(),
            base: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            tree: PartitionTree::new(),
            locks: KvLocks::default(),
            lock_content: BTreeMap::new(),
            lock_events: Vec::new(),
            cert_checker: None,
            suspect: false,
        };
        for i in 0..=META_OBJECT {
            let obj = s.abstract_of(i);
            s.tree.set(i, digest_of(i, &obj));
            s.base.insert(i, obj);
        }
        s
    }

    /// Simulates a restart over durable storage: the in-memory state since the newest
    /// checkpoint is lost and the state is that of the newest checkpoint (see
    /// [`Service::checkpoints`]). With no checkpoint, the state is empty.
    pub fn reopen(&mut self) {
        match self.checkpoints.keys().next_back().copied() {
            Some(seq) => {
                // rollback_to cannot fail for a checkpoint we hold.
                let _ = self.rollback_to(seq);
            }
            None => {
                let checker = self.cert_checker.take();
                *self = KvService::new();
                self.cert_checker = checker;
            }
        }
    }

    /// The lock (not merged) on `bucket`, if any.
    fn lock_on(&self, bucket: u64) -> Option<&KvLock> {
        self.locks.locks.iter().find(|l| l.bucket == bucket)
    }

    fn lock_mut(&mut self, id: LockId) -> Option<&mut KvLock> {
        self.locks.locks.iter_mut().find(|l| l.id == id)
    }

    /// The value of `key` as the lock's holder sees it (tests, checkers).
    pub fn locked_value(&self, key: &[u8]) -> Option<&Vec<u8>> {
        let lock = self.lock_on(bucket_of(key))?;
        self.lock_content.get(&lock.id)?.0.get(key)
    }

    fn execute_lock_op(&mut self, op: KvOp, client: ClientId) -> KvReply {
        let now = self.last_time;
        match op {
            KvOp::Lock { key } => {
                let bucket = bucket_of(&key);
                if self.lock_on(bucket).is_some() || self.locks.locks.len() >= BUCKETS as usize {
                    return KvReply::Refused;
                }
                let id = LockId(self.locks.next);
                self.locks.next += 1;
                self.locks.locks.push(KvLock {
                    id,
                    bucket,
                    holder: client,
                    state: KvLockState::Pending,
                    base: Digest::default(),
                });
                self.dirty.insert(META_OBJECT);
                KvReply::Lock(id)
            }
            KvOp::Release { lock, cert } => {
                let point = match &cert {
                    None => None,
                    Some(bytes) => {
                        let p = self.cert_checker.as_ref().and_then(|c| c.check(bytes));
                        match p {
                            Some(p) if p.lock == lock && p.epoch == 1 => Some(p),
                            _ => return KvReply::Refused,
                        }
                    }
                };
                let Some(l) = self.lock_mut(lock) else {
                    return KvReply::Refused;
                };
                if l.holder != client {
                    return KvReply::Refused;
                }
                match l.state {
                    // Never active: it simply goes.
                    KvLockState::Pending => {
                        self.locks.locks.retain(|l| l.id != lock);
                    }
                    KvLockState::Active => {
                        l.state = KvLockState::Frozen {
                            since: now,
                            end: point,
                        };
                        self.lock_events.push(LockEvent::Frozen {
                            lock,
                            epoch: 1,
                            end: point,
                        });
                    }
                    KvLockState::Frozen {
                        end: Some(resolved),
                        ..
                    } if point.is_some_and(|p| p.k < resolved.k) => {
                        // A `Resolve` took a longer chain than the holder certified.
                        return KvReply::Refused;
                    }
                    KvLockState::Frozen { since, end: None } if point.is_some() => {
                        l.state = KvLockState::Frozen { since, end: point };
                        self.lock_events.push(LockEvent::Frozen {
                            lock,
                            epoch: 1,
                            end: point,
                        });
                    }
                    KvLockState::Frozen { .. } => {}
                }
                self.dirty.insert(META_OBJECT);
                KvReply::Done
            }
            KvOp::Resolve { lock, evidence } => {
                let Some(l) = self.lock_mut(lock) else {
                    return KvReply::Done;
                };
                let KvLockState::Frozen { since, end } = l.state else {
                    return KvReply::Refused;
                };
                if end.is_some() {
                    return KvReply::Done;
                }
                if now < since.saturating_add(RELEASE_GRACE_NS) {
                    return KvReply::Locked;
                }
                let subject = crate::locking::ResolveSubject {
                    lock,
                    epoch: 1,
                    holder: l.holder,
                    base: l.base,
                };
                // (The key-value service keeps no ban list: equivocation is not acted on.)
                let Some(p) = self
                    .cert_checker
                    .as_ref()
                    .and_then(|c| c.resolve(&evidence, &subject))
                    .map(|r| r.point)
                    .filter(|p| p.lock == lock && p.epoch == 1)
                else {
                    return KvReply::Refused;
                };
                let _ = since;
                if let Some(l) = self.lock_mut(lock) {
                    // As the file service: `since` becomes the time the end was fixed.
                    l.state = KvLockState::Frozen {
                        since: now,
                        end: Some(p),
                    };
                }
                self.lock_events.push(LockEvent::Frozen {
                    lock,
                    epoch: 1,
                    end: Some(p),
                });
                self.dirty.insert(META_OBJECT);
                KvReply::Done
            }
            _ => KvReply::Malformed,
        }
    }

    /// Lock transitions, inside `checkpoint` only (committed state; see the plan §4.3):
    /// merge frozen locks whose end is known (or whose grace ran out), then activate pending
    /// ones.
    fn lock_transitions(&mut self) {
        let now = self.last_time;
        let mut merged = Vec::new();
        for l in &self.locks.locks {
            if let KvLockState::Frozen { since, end } = l.state {
                if crate::fs::locks::merge_due(since, end, now) {
                    merged.push((l.id, l.bucket, end.filter(LockPoint::state_certified)));
                }
            }
        }
        for (id, bucket, end) in merged {
            match self.lock_content.remove(&id) {
                Some((live, _)) => {
                    if let Some(p) = end {
                        if bucket_digest(id, &live) != p.state {
                            self.suspect = true;
                            tracing::warn!(
                                lock = id.0,
                                "merging a lock whose log here differs from its certified end; \
                                 the checkpoint will disagree and state transfer repairs it"
                            );
                        }
                    }
                    self.buckets[bucket as usize] = live;
                }
                None => {
                    self.suspect = true;
                    tracing::warn!(lock = id.0, "merging a lock whose content is missing")
                }
            }
            self.locks.locks.retain(|l| l.id != id);
            self.dirty.insert(bucket);
            self.dirty.insert(META_OBJECT);
            self.lock_events
                .push(LockEvent::Merged { lock: id, epoch: 1 });
        }
        let ids: Vec<LockId> = self
            .locks
            .locks
            .iter()
            .filter(|l| l.state == KvLockState::Pending)
            .map(|l| l.id)
            .collect();
        for id in ids {
            let Some(l) = self.lock_mut(id) else { continue };
            l.state = KvLockState::Active;
            let (bucket, holder) = (l.bucket, l.holder);
            let content = std::mem::take(&mut self.buckets[bucket as usize]);
            let base = bucket_digest(id, &content);
            if let Some(l) = self.lock_mut(id) {
                l.base = base;
            }
            self.lock_content.insert(id, (content.clone(), content));
            self.dirty.insert(bucket);
            self.dirty.insert(META_OBJECT);
            self.lock_events.push(LockEvent::Activated {
                lock: id,
                epoch: 1,
                holder,
                base,
            });
        }
        // Content of locks the table no longer has (a rollback below their activation).
        let live: BTreeSet<LockId> = self.locks.locks.iter().map(|l| l.id).collect();
        self.lock_content.retain(|id, _| live.contains(id));
    }

    /// The current value of `key` (for tests and checkers).
    pub fn value(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.buckets[bucket_of(key) as usize].get(key)
    }

    pub fn last_time(&self) -> u64 {
        self.last_time
    }

    fn abstract_of(&self, index: u64) -> AbstractObject {
        if index == META_OBJECT {
            let mut pieces = vec![self.last_time.to_le_bytes().to_vec()];
            // Only once a lock was asked for, so states without locks digest as before.
            if self.locks.next > 0 {
                pieces.push(encode(&self.locks));
            }
            return AbstractObject { pieces };
        }
        let entries: Vec<(&Vec<u8>, &Vec<u8>)> = self.buckets[index as usize].iter().collect();
        let bytes = encode(&entries);
        AbstractObject {
            pieces: vec![bytes],
        }
    }

    fn install(&mut self, index: u64, obj: &AbstractObject) -> Result<(), ServiceError> {
        let bad = |why: &str| ServiceError::BadObject {
            index,
            why: why.to_string(),
        };
        let meta_pieces = if index == META_OBJECT { 2 } else { 1 };
        if obj.pieces.is_empty() || obj.pieces.len() > meta_pieces {
            return Err(bad("wrong number of pieces"));
        }
        let piece = &obj.pieces[0];
        if index == META_OBJECT {
            let bytes: [u8; 8] = piece
                .as_slice()
                .try_into()
                .map_err(|_| bad("meta object is not 8 bytes"))?;
            let locks = match obj.pieces.get(1) {
                None => KvLocks::default(),
                Some(p) => {
                    let locks: KvLocks = decode(p).ok_or_else(|| bad("lock table"))?;
                    if locks.next == 0 || locks.locks.iter().any(|l| l.id.0 >= locks.next) {
                        return Err(bad("lock table"));
                    }
                    locks
                }
            };
            self.last_time = u64::from_le_bytes(bytes);
            self.locks = locks;
        } else if index < BUCKETS {
            let (entries, used): (Vec<(Vec<u8>, Vec<u8>)>, usize) =
                bincode::serde::decode_from_slice(piece, config())
                    .map_err(|e| bad(&e.to_string()))?;
            if used != piece.len() {
                return Err(bad("trailing bytes"));
            }
            // Canonical form: strictly increasing keys, each in this bucket.
            if entries.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err(bad("entries not sorted"));
            }
            if entries.iter().any(|(k, _)| bucket_of(k) != index) {
                return Err(bad("entry in the wrong bucket"));
            }
            self.buckets[index as usize] = entries.into_iter().collect();
        } else {
            return Err(ServiceError::BadIndex(index));
        }
        self.dirty.insert(index);
        Ok(())
    }

    /// The abstract value of `index` as of checkpoint `seq`: the newest delta at or before
    /// `seq` that holds it, else the base.
    fn object_at(&self, seq: SeqNo, index: u64) -> Option<AbstractObject> {
        if !self.checkpoints.contains_key(&seq) || index > META_OBJECT {
            return None;
        }
        for (_, cp) in self.checkpoints.range(..=seq).rev() {
            if let Some(obj) = cp.objects.get(&index) {
                return Some(obj.clone());
            }
        }
        self.base.get(&index).cloned()
    }
}

/// The key-value service's [`RequestPolicy`]: `Get` is read-only; the agreed time is the
/// primary's clock, accepted within [`MAX_CLOCK_SKEW_NS`] of a backup's (execution keeps it
/// monotone).
#[derive(Clone, Copy, Debug, Default)]
pub struct KvPolicy;

impl RequestPolicy for KvPolicy {
    fn is_read_only(&self, op: &[u8]) -> bool {
        matches!(KvOp::decode(op), Some(KvOp::Get { .. }))
    }

    fn propose_nondet(&self, now_ns: u64) -> Vec<u8> {
        now_ns.to_le_bytes().to_vec()
    }

    fn check_nondet(&self, nondet: &[u8], now_ns: u64) -> bool {
        match <[u8; 8]>::try_from(nondet) {
            Ok(bytes) => u64::from_le_bytes(bytes).abs_diff(now_ns) <= MAX_CLOCK_SKEW_NS,
            Err(_) => false,
        }
    }
}

impl Service for KvService {
    fn execute(&mut self, op: &[u8], _client: ClientId, nondet: &[u8], read_only: bool) -> Vec<u8> {
        let Some(op) = KvOp::decode(op) else {
            return KvReply::Malformed.encode();
        };
        if read_only && !matches!(op, KvOp::Get { .. }) {
            return KvReply::Malformed.encode();
        }
        if !read_only {
            // The agreed time only moves forward; a value that fails to parse leaves it as is
            // (deterministically at every replica).
            if let Ok(bytes) = <[u8; 8]>::try_from(nondet) {
                let time = u64::from_le_bytes(bytes);
                if time > self.last_time {
                    self.last_time = time;
                    self.dirty.insert(META_OBJECT);
                }
            }
        }
        if matches!(
            op,
            KvOp::Lock { .. } | KvOp::Release { .. } | KvOp::Resolve { .. }
        ) {
            if read_only {
                return KvReply::Malformed.encode();
            }
            return self.execute_lock_op(op, _client).encode();
        }
        let bucket = bucket_of(op.key());
        if let Some(l) = self.lock_on(bucket) {
            if l.state != KvLockState::Pending {
                // A conflicting ordered access: freeze the lock so it merges (M2: with the
                // grace for the holder's certified release).
                if !read_only && l.state == KvLockState::Active {
                    let id = l.id;
                    let now = self.last_time;
                    if let Some(l) = self.lock_mut(id) {
                        l.state = KvLockState::Frozen {
                            since: now,
                            end: None,
                        };
                    }
                    self.dirty.insert(META_OBJECT);
                    self.lock_events.push(LockEvent::Frozen {
                        lock: id,
                        epoch: 1,
                        end: None,
                    });
                }
                return KvReply::Locked.encode();
            }
        }
        let map = &mut self.buckets[bucket as usize];
        let reply = match op {
            KvOp::Get { key } => KvReply::Value(map.get(&key).cloned()),
            KvOp::Put { key, value } => {
                self.dirty.insert(bucket);
                KvReply::Value(map.insert(key, value))
            }
            KvOp::Append { key, value } => {
                self.dirty.insert(bucket);
                let entry = map.entry(key).or_default();
                entry.extend_from_slice(&value);
                KvReply::Value(Some(entry.clone()))
            }
            KvOp::Delete { key } => {
                self.dirty.insert(bucket);
                KvReply::Value(map.remove(&key))
            }
            KvOp::Lock { .. } | KvOp::Release { .. } | KvOp::Resolve { .. } => KvReply::Malformed,
        };
        reply.encode()
    }

    fn take_lock_events(&mut self) -> Vec<LockEvent> {
        std::mem::take(&mut self.lock_events)
    }

    fn execute_locked(
        &mut self,
        lock: LockId,
        op: &[u8],
        client: ClientId,
        _time_ns: u64,
    ) -> LockedResult {
        let Some(op) = KvOp::decode(op) else {
            return LockedResult::Done(KvReply::Malformed.encode());
        };
        let Some(l) = self.locks.locks.iter().find(|l| l.id == lock) else {
            return LockedResult::NeedsAgreement;
        };
        if l.holder != client
            || l.state == KvLockState::Pending
            || matches!(
                op,
                KvOp::Lock { .. } | KvOp::Release { .. } | KvOp::Resolve { .. }
            )
            || bucket_of(op.key()) != l.bucket
        {
            return LockedResult::NeedsAgreement;
        }
        let Some((map, _)) = self.lock_content.get_mut(&lock) else {
            return LockedResult::NeedsAgreement;
        };
        let reply = match op {
            KvOp::Get { key } => KvReply::Value(map.get(&key).cloned()),
            KvOp::Put { key, value } => KvReply::Value(map.insert(key, value)),
            KvOp::Append { key, value } => {
                let entry = map.entry(key).or_default();
                entry.extend_from_slice(&value);
                KvReply::Value(Some(entry.clone()))
            }
            KvOp::Delete { key } => KvReply::Value(map.remove(&key)),
            KvOp::Lock { .. } | KvOp::Release { .. } | KvOp::Resolve { .. } => KvReply::Malformed,
        };
        LockedResult::Done(reply.encode())
    }

    fn lock_state_digest(&self, lock: LockId) -> Option<Digest> {
        self.locks.locks.iter().find(|l| l.id == lock)?;
        let (live, _) = self.lock_content.get(&lock)?;
        Some(bucket_digest(lock, live))
    }

    fn lock_restart(&mut self, lock: LockId) -> Result<(), ServiceError> {
        if let Some((live, base)) = self.lock_content.get_mut(&lock) {
            *live = base.clone();
        }
        Ok(())
    }

    fn set_lock_cert_checker(&mut self, checker: Arc<dyn LockCertChecker>) {
        self.cert_checker = Some(checker);
    }

    fn state_suspect(&self) -> bool {
        self.suspect
    }

    fn lock_infos(&self) -> Vec<LockInfo> {
        self.locks
            .locks
            .iter()
            .filter(|l| l.state != KvLockState::Pending)
            .map(|l| LockInfo {
                lock: l.id,
                epoch: 1,
                holder: l.holder,
                base: l.base,
                frozen: match l.state {
                    KvLockState::Frozen { end, .. } => Some(end),
                    _ => None,
                },
                members: 1,
                bytes_max: KV_LOCK_BYTES_MAX,
            })
            .collect()
    }

    fn lock_base_page(&self, lock: LockId, from: BaseCursor, budget: usize) -> Option<BasePage> {
        let l = self.locks.locks.iter().find(|l| l.id == lock)?;
        let (_, base) = self.lock_content.get(&lock)?;
        let entries: Vec<(&Vec<u8>, &Vec<u8>)> = base.iter().collect();
        let objects = [(
            l.bucket,
            AbstractObject {
                pieces: vec![encode(&entries)],
            },
        )];
        Some(BasePage::of_objects(&objects, from, budget))
    }

    fn lock_install_base(
        &mut self,
        lock: LockId,
        objects: Vec<(u64, AbstractObject)>,
    ) -> Result<(), ServiceError> {
        let bad = |why: &str| ServiceError::bad_lock_content(lock, why);
        let l = self
            .locks
            .locks
            .iter()
            .find(|l| l.id == lock && l.state != KvLockState::Pending)
            .ok_or_else(|| bad("not active here"))?;
        let [(index, obj)] = objects.as_slice() else {
            return Err(bad("one bucket expected"));
        };
        if *index != l.bucket || obj.pieces.len() != 1 {
            return Err(bad("not the lock's bucket"));
        }
        let entries: Vec<(Vec<u8>, Vec<u8>)> =
            decode(&obj.pieces[0]).ok_or_else(|| bad("undecodable bucket"))?;
        let content: Bucket = entries.into_iter().collect();
        if bucket_digest(lock, &content) != l.base {
            return Err(bad("content does not hash to the base digest"));
        }
        self.lock_content.insert(lock, (content.clone(), content));
        Ok(())
    }

    fn checkpoint_work_pending(&self) -> bool {
        let now = self.last_time;
        self.locks.locks.iter().any(|l| match l.state {
            KvLockState::Pending => true,
            KvLockState::Frozen { since, end } => crate::fs::locks::merge_due(since, end, now),
            KvLockState::Active => false,
        })
    }

    fn policy(&self) -> Arc<dyn RequestPolicy> {
        Arc::new(KvPolicy)
    }

    fn object_count(&self) -> u64 {
        META_OBJECT + 1
    }

    fn get_obj(&self, index: u64) -> Result<AbstractObject, ServiceError> {
        if index > META_OBJECT {
            return Err(ServiceError::BadIndex(index));
        }
        Ok(self.abstract_of(index))
    }

    fn put_objs(&mut self, objs: Vec<(u64, AbstractObject)>) -> Result<(), ServiceError> {
        // Validate everything first so a bad object leaves the state untouched.
        let mut scratch = self.clone();
        for (index, obj) in &objs {
            scratch.install(*index, obj)?;
        }
        for (index, obj) in &objs {
            self.install(*index, obj)?;
        }
        self.suspect = false;
        Ok(())
    }

    fn checkpoint(&mut self, seq: SeqNo) -> Result<Digest, ServiceError> {
        self.lock_transitions();
        let mut objects = BTreeMap::new();
        for index in std::mem::take(&mut self.dirty) {
            let obj = self.abstract_of(index);
            self.tree.set(index, digest_of(index, &obj));
            objects.insert(index, obj);
        }
        let root = self.tree.root();
        if self.checkpoints.is_empty() {
            // The first checkpoint becomes the base: fold its delta in.
            for (index, obj) in objects {
                self.base.insert(index, obj);
            }
            self.checkpoints.insert(
                seq,
                Checkpoint {
                    objects: BTreeMap::new(),
                    tree: self.tree.clone(),
                    root,
                },
            );
        } else {
            // Retaking a checkpoint at the same number (after a rollback to it) adds what changed
            // since to its delta.
            let tree = self.tree.clone();
            let cp = self.checkpoints.entry(seq).or_insert_with(|| Checkpoint {
                objects: BTreeMap::new(),
                tree: tree.clone(),
                root,
            });
            cp.objects.extend(objects);
            cp.tree = tree;
            cp.root = root;
        }
        Ok(root)
    }

    fn rollback_to(&mut self, seq: SeqNo) -> Result<(), ServiceError> {
        if !self.checkpoints.contains_key(&seq) {
            return Err(ServiceError::NoCheckpoint(seq));
        }
        for index in 0..=META_OBJECT {
            let obj = self
                .object_at(seq, index)
                .ok_or(ServiceError::NoCheckpoint(seq))?;
            self.install(index, &obj)?;
        }
        self.dirty.clear();
        let later: Vec<SeqNo> = self.checkpoints.range(seq + 1..).map(|(s, _)| *s).collect();
        for s in later {
            self.checkpoints.remove(&s);
        }
        if let Some(cp) = self.checkpoints.get(&seq) {
            self.tree = cp.tree.clone();
        }
        Ok(())
    }

    fn discard_before(&mut self, seq: SeqNo) {
        let older: Vec<SeqNo> = self.checkpoints.range(..seq).map(|(s, _)| *s).collect();
        for s in older {
            if let Some(cp) = self.checkpoints.remove(&s) {
                // Fold the discarded delta into the base so newer checkpoints still resolve.
                for (index, obj) in cp.objects {
                    self.base.insert(index, obj);
                }
            }
        }
    }

    fn checkpoints(&self) -> Vec<(SeqNo, Digest)> {
        self.checkpoints
            .iter()
            .map(|(s, cp)| (*s, cp.root))
            .collect()
    }

    fn modified_since(&self, seq: SeqNo) -> Result<Vec<u64>, ServiceError> {
        if !self.checkpoints.contains_key(&seq) {
            return Err(ServiceError::NoCheckpoint(seq));
        }
        let mut set: BTreeSet<u64> = self.dirty.clone();
        for (_, cp) in self.checkpoints.range(seq + 1..) {
            set.extend(cp.objects.keys().copied());
        }
        Ok(set.into_iter().collect())
    }

    fn partition_node(&self, seq: SeqNo, level: u32, index: u64) -> Option<Vec<Digest>> {
        let mut tree = self.checkpoints.get(&seq)?.tree.clone();
        tree.node(level, index)
    }

    fn get_obj_at(&self, seq: SeqNo, index: u64) -> Option<AbstractObject> {
        self.object_at(seq, index)
    }

    fn piece_digests_at(&self, seq: SeqNo, index: u64) -> Option<Vec<Digest>> {
        let obj = self.object_at(seq, index)?;
        Some(piece_digests(index, &obj.pieces))
    }

    fn get_piece_at(&self, seq: SeqNo, index: u64, piece: u32) -> Option<Vec<u8>> {
        self.object_at(seq, index)?
            .pieces
            .get(piece as usize)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut KvService, k: &str, v: &str, t: u64) -> KvReply {
        let op = KvOp::Put {
            key: k.into(),
            value: v.into(),
        }
        .encode();
        KvReply::decode(&s.execute(&op, ClientId(1), &t.to_le_bytes(), false)).expect("reply")
    }

    #[test]
    fn put_get_append_delete() {
        let mut s = KvService::new();
        assert_eq!(put(&mut s, "a", "1", 5), KvReply::Value(None));
        assert_eq!(
            put(&mut s, "a", "2", 6),
            KvReply::Value(Some(b"1".to_vec()))
        );
        let op = KvOp::Append {
            key: b"a".to_vec(),
            value: b"3".to_vec(),
        }
        .encode();
        assert_eq!(
            KvReply::decode(&s.execute(&op, ClientId(1), &[], false)),
            Some(KvReply::Value(Some(b"23".to_vec())))
        );
        let get = KvOp::Get { key: b"a".to_vec() }.encode();
        assert!(s.is_read_only(&get));
        assert_eq!(
            KvReply::decode(&s.execute(&get, ClientId(1), &[], true)),
            Some(KvReply::Value(Some(b"23".to_vec())))
        );
        let del = KvOp::Delete { key: b"a".to_vec() }.encode();
        assert_eq!(
            KvReply::decode(&s.execute(&del, ClientId(1), &[], false)),
            Some(KvReply::Value(Some(b"23".to_vec())))
        );
        assert_eq!(s.value(b"a"), None);
        assert_eq!(s.last_time(), 6);
        assert_eq!(
            KvReply::decode(&s.execute(b"junk", ClientId(1), &[], false)),
            Some(KvReply::Malformed)
        );
    }

    #[test]
    fn nondet_is_monotone_and_bounded() {
        let mut s = KvService::new();
        put(&mut s, "a", "1", 100);
        assert!(s.check_nondet(&100u64.to_le_bytes(), 0));
        // An older value is acceptable (batches are proposed before earlier ones run) but
        // does not move the agreed time back.
        assert!(s.check_nondet(&99u64.to_le_bytes(), 1000));
        put(&mut s, "b", "2", 99);
        assert_eq!(s.last_time(), 100);
        assert!(!s.check_nondet(&(MAX_CLOCK_SKEW_NS + 2000).to_le_bytes(), 1000));
        assert!(!s.check_nondet(&[1, 2], 1000));
        assert_eq!(s.propose_nondet(50), 50u64.to_le_bytes().to_vec());
    }

    #[test]
    fn checkpoints_rollback_and_history() {
        let mut s = KvService::new();
        let d0 = s.checkpoint(0).expect("cp");
        put(&mut s, "a", "1", 1);
        let d1 = s.checkpoint(10).expect("cp");
        assert_ne!(d0, d1);
        put(&mut s, "b", "2", 2);
        put(&mut s, "a", "3", 3);
        assert_eq!(s.modified_since(10).expect("mod").len(), 3);
        let d2 = s.checkpoint(20).expect("cp");
        assert_eq!(s.get_obj_at(10, bucket_of(b"a")).expect("obj"), {
            let mut t = KvService::new();
            put(&mut t, "a", "1", 1);
            t.get_obj(bucket_of(b"a")).expect("obj")
        });
        s.discard_before(10);
        assert_eq!(s.checkpoints(), vec![(10, d1), (20, d2)]);
        put(&mut s, "c", "4", 4);
        s.rollback_to(10).expect("rollback");
        assert_eq!(s.value(b"a"), Some(&b"1".to_vec()));
        assert_eq!(s.value(b"b"), None);
        assert_eq!(s.checkpoints(), vec![(10, d1)]);
        assert_eq!(s.checkpoint(10).expect("cp"), d1);
    }

    #[test]
    fn state_transfer_by_objects_reproduces_root() {
        let mut a = KvService::new();
        let mut b = KvService::new();
        a.checkpoint(0).expect("cp");
        b.checkpoint(0).expect("cp");
        for i in 0..100u64 {
            put(&mut a, &format!("k{i}"), &format!("v{i}"), i);
        }
        let root = a.checkpoint(5).expect("cp");
        let mut objs = Vec::new();
        for i in 0..a.object_count() {
            let pd = a.piece_digests_at(5, i).expect("digests");
            let mine = b.piece_digests_at(0, i).expect("digests");
            if pd != mine {
                let pieces = (0..pd.len() as u32)
                    .map(|p| a.get_piece_at(5, i, p).expect("piece"))
                    .collect();
                objs.push((i, AbstractObject { pieces }));
            }
        }
        b.put_objs(objs).expect("put");
        assert_eq!(b.checkpoint(5).expect("cp"), root);
        assert_eq!(b.partition_node(5, 3, 0), a.partition_node(5, 3, 0));
        let bad = AbstractObject {
            pieces: vec![vec![1, 2, 3]],
        };
        assert!(b.put_objs(vec![(1, bad)]).is_err());
    }

    #[test]
    fn reopen_returns_to_newest_checkpoint() {
        let mut s = KvService::new();
        s.checkpoint(0).expect("cp");
        put(&mut s, "a", "1", 1);
        s.checkpoint(4).expect("cp");
        put(&mut s, "a", "2", 2);
        s.reopen();
        assert_eq!(s.value(b"a"), Some(&b"1".to_vec()));
    }
}
