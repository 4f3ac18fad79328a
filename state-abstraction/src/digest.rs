//! Domain-separated SHA-256 digests and the partition tree over abstract objects.
//!
//! Leaves are object digests; the tree has a fixed shape (fan-out [`FANOUT`], [`LEVELS`] levels
//! of interior nodes) so that two replicas with the same objects build the same tree whatever
//! order they changed them in. Updates are incremental: only the paths above changed leaves are
//! rehashed when the root is next asked for.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A hasher whose first input is a domain tag, so a digest of one kind can never be passed off
/// as a digest of another kind.
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new(domain: &str) -> Self {
        let mut h = Sha256::new();
        h.update((domain.len() as u64).to_le_bytes());
        h.update(domain.as_bytes());
        Hasher(h)
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.update(v.to_le_bytes());
        self
    }
    /// Length-prefixed, so concatenations are unambiguous.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }
    pub fn digest(&mut self, d: &Digest) -> &mut Self {
        self.0.update(d.0);
        self
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// Digest of one piece of an abstract object.
pub fn piece_digest(index: u64, piece: u32, bytes: &[u8]) -> Digest {
    let mut h = Hasher::new("bftfs.piece");
    h.u64(index).u64(piece as u64).bytes(bytes);
    h.finish()
}

/// Digest of an abstract object from the digests of its pieces.
pub fn object_digest(index: u64, pieces: &[Digest]) -> Digest {
    let mut h = Hasher::new("bftfs.object");
    h.u64(index).u64(pieces.len() as u64);
    for p in pieces {
        h.digest(p);
    }
    h.finish()
}

/// The digests of an object's pieces (given as their bytes), in order.
pub fn piece_digests(index: u64, pieces: &[Vec<u8>]) -> Vec<Digest> {
    (0u32..)
        .zip(pieces)
        .map(|(p, bytes)| piece_digest(index, p, bytes))
        .collect()
}

pub const FANOUT: u64 = 256;
/// Interior levels: level 0 is the root, level `LEVELS - 1` holds object digests as children.
/// 4 levels of fan-out 256 address 2^32 objects.
pub const LEVELS: u32 = 4;

/// The partition tree. Cheap to clone relative to the state it summarises (one digest per
/// object plus one per interior node), which is how checkpoints keep their own copy.
#[derive(Clone, Debug, Default)]
pub struct PartitionTree {
    leaves: Vec<Digest>,
    /// Digests of interior nodes, per level, for nodes that cover at least one object.
    nodes: Vec<BTreeMap<u64, Digest>>,
    /// Leaf-level node indexes whose digests are out of date.
    dirty: BTreeSet<u64>,
}

impl PartitionTree {
    pub fn new() -> Self {
        PartitionTree {
            leaves: Vec::new(),
            nodes: vec![BTreeMap::new(); LEVELS as usize],
            dirty: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> u64 {
        self.leaves.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// Sets the digest of object `index`, growing the tree if needed (new slots take `Digest::default()`
    /// until set).
    pub fn set(&mut self, index: u64, d: Digest) {
        let i = index as usize;
        if i >= self.leaves.len() {
            let old = self.leaves.len() as u64;
            self.leaves.resize(i + 1, Digest::default());
            for node in old / FANOUT..=index / FANOUT {
                self.dirty.insert(node);
            }
        }
        self.leaves[i] = d;
        self.dirty.insert(index / FANOUT);
    }

    /// Shrinks the tree to `count` objects.
    pub fn truncate(&mut self, count: u64) {
        if count >= self.len() {
            return;
        }
        self.leaves.truncate(count as usize);
        for level in self.nodes.iter_mut() {
            level.clear();
        }
        self.dirty = (0..self.len().div_ceil(FANOUT)).collect();
    }

    pub fn leaf(&self, index: u64) -> Option<Digest> {
        self.leaves.get(index as usize).copied()
    }

    fn span(level: u32) -> u64 {
        // Objects covered by one node at `level`.
        FANOUT.pow(LEVELS - level)
    }

    fn node_digest(level: u32, index: u64, children: &[Digest]) -> Digest {
        let mut h = Hasher::new("bftfs.partition");
        h.u64(level as u64).u64(index).u64(children.len() as u64);
        for c in children {
            h.digest(c);
        }
        h.finish()
    }

    fn refresh(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty: BTreeSet<u64> = std::mem::take(&mut self.dirty);
        let mut level = LEVELS - 1;
        loop {
            let mut parents = BTreeSet::new();
            for &node in &dirty {
                let children = self.children_of(level, node);
                if children.is_empty() {
                    self.nodes[level as usize].remove(&node);
                } else {
                    let d = Self::node_digest(level, node, &children);
                    self.nodes[level as usize].insert(node, d);
                }
                parents.insert(node / FANOUT);
            }
            if level == 0 {
                break;
            }
            level -= 1;
            dirty = parents;
        }
    }

    fn children_of(&self, level: u32, node: u64) -> Vec<Digest> {
        if level == LEVELS - 1 {
            let start = (node * FANOUT) as usize;
            let end = ((node + 1) * FANOUT).min(self.len()) as usize;
            if start >= end {
                return Vec::new();
            }
            self.leaves[start..end].to_vec()
        } else {
            let child_level = (level + 1) as usize;
            let first = node * FANOUT;
            let count = self
                .len()
                .div_ceil(Self::span(level + 1))
                .saturating_sub(first)
                .min(FANOUT);
            (first..first + count)
                .map(|c| self.nodes[child_level].get(&c).copied().unwrap_or_default())
                .collect()
        }
    }

    /// The root digest; it covers the object count and every object digest.
    pub fn root(&mut self) -> Digest {
        self.refresh();
        let mut h = Hasher::new("bftfs.root");
        h.u64(self.len());
        h.digest(&self.nodes[0].get(&0).copied().unwrap_or_default());
        h.finish()
    }

    /// Children digests of node `(level, index)`: interior digests, or at the leaf level object
    /// digests. `None` if the node covers no object.
    pub fn node(&mut self, level: u32, index: u64) -> Option<Vec<Digest>> {
        if level >= LEVELS {
            return None;
        }
        self.refresh();
        let c = self.children_of(level, index);
        if c.is_empty() {
            None
        } else {
            Some(c)
        }
    }

    /// The object digests, in index order (for saving a tree; rebuild with [`Self::set`]).
    pub fn leaves(&self) -> &[Digest] {
        &self.leaves
    }

    /// Like [`Self::node`] for a shared tree: `None` also when the tree has changes not yet
    /// folded in (call [`Self::root`] first), so a stale answer is never given.
    pub fn node_clean(&self, level: u32, index: u64) -> Option<Vec<Digest>> {
        if level >= LEVELS || !self.dirty.is_empty() {
            return None;
        }
        let c = self.children_of(level, index);
        if c.is_empty() {
            None
        } else {
            Some(c)
        }
    }

    /// Recomputes a node digest from claimed children, so a fetcher can check a child list it
    /// received against the parent digest it already trusts.
    pub fn verify_node(level: u32, index: u64, children: &[Digest], expected: &Digest) -> bool {
        Self::node_digest(level, index, children) == *expected
    }

    /// Checks claimed root-node children and an object count against a certified root digest.
    pub fn verify_root(count: u64, root_node: &Digest, expected: &Digest) -> bool {
        let mut h = Hasher::new("bftfs.root");
        h.u64(count);
        h.digest(root_node);
        h.finish() == *expected
    }

    /// The digest of the root node (level 0, index 0), which together with the count makes
    /// the root digest.
    pub fn root_node(&mut self) -> Digest {
        self.refresh();
        self.nodes[0].get(&0).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u8) -> Digest {
        Digest([i; 32])
    }

    #[test]
    fn order_of_updates_does_not_matter() {
        let mut a = PartitionTree::new();
        let mut b = PartitionTree::new();
        for i in 0..1000u64 {
            a.set(i, d((i % 251) as u8));
        }
        for i in (0..1000u64).rev() {
            b.set(i, d((i % 251) as u8));
        }
        assert_eq!(a.root(), b.root());
        b.set(999, d(7));
        assert_ne!(a.root(), b.root());
        a.set(999, d(7));
        assert_eq!(a.root(), b.root());
    }

    #[test]
    fn nodes_verify_against_parents() {
        let mut t = PartitionTree::new();
        for i in 0..70_000u64 {
            t.set(i, d((i % 200) as u8));
        }
        let root = t.root();
        let root_node = t.root_node();
        assert!(PartitionTree::verify_root(t.len(), &root_node, &root));
        let l0 = t.node(0, 0).expect("root node");
        assert!(PartitionTree::verify_node(0, 0, &l0, &root_node));
        let l1 = t.node(1, 0).expect("level 1");
        assert!(PartitionTree::verify_node(1, 0, &l1, &l0[0]));
        let l2 = t.node(2, 1).expect("level 2");
        assert!(PartitionTree::verify_node(2, 1, &l2, &l1[1]));
        let l3 = t.node(3, 273).expect("leaf level");
        assert!(PartitionTree::verify_node(3, 273, &l3, &l2[273 - 256]));
        assert_eq!(l3[0], t.leaf(273 * 256).expect("leaf"));
    }

    #[test]
    fn truncate_matches_fresh_tree() {
        let mut a = PartitionTree::new();
        for i in 0..600u64 {
            a.set(i, d(1));
        }
        a.root();
        a.truncate(300);
        let mut b = PartitionTree::new();
        for i in 0..300u64 {
            b.set(i, d(1));
        }
        assert_eq!(a.root(), b.root());
    }
}
