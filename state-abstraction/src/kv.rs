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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvReply {
    Value(Option<Vec<u8>>),
    /// The operation bytes did not decode.
    Malformed,
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
            | KvOp::Delete { key } => key,
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
            None => *self = KvService::new(),
        }
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
            return AbstractObject {
                pieces: vec![self.last_time.to_le_bytes().to_vec()],
            };
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
        if obj.pieces.len() != 1 {
            return Err(bad("expected one piece"));
        }
        let piece = &obj.pieces[0];
        if index == META_OBJECT {
            let bytes: [u8; 8] = piece
                .as_slice()
                .try_into()
                .map_err(|_| bad("meta object is not 8 bytes"))?;
            self.last_time = u64::from_le_bytes(bytes);
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
        let bucket = bucket_of(op.key());
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
        };
        reply.encode()
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
        Ok(())
    }

    fn checkpoint(&mut self, seq: SeqNo) -> Result<Digest, ServiceError> {
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
