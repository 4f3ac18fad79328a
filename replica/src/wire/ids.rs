//! Newtypes for the protocol's nouns: who (replicas, principals), when (views, sequence
//! numbers, client timestamps).

use serde::{Deserialize, Serialize};
use state_abstraction::ClientId;

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
