//! State transfer's work on the state (PROTOCOLS §4.3), run by the execution stage: the
//! fetcher ([`fetch::Transfer`]), which walks the certified partition tree and fetches only
//! what differs from our own checkpoint, and the answers to peers' requests ([`serve`]). The
//! core decides when to transfer and what to (see [`crate::core::state_transfer`]).

pub mod fetch;
pub mod serve;
#[cfg(test)]
mod tests;

pub use fetch::Transfer;

use crate::wire::Digest;
use state_abstraction::Service;

/// What state transfer reads of the checkpoints the service keeps: serving a peer
/// ([`serve`]) and comparing fetched state with our own ([`fetch`]). Read-only, and about
/// checkpoints only (never the live state).
pub trait CheckpointReader {
    fn object_count(&self) -> u64;
    fn partition_node(&self, seq: u64, level: u32, index: u64) -> Option<Vec<Digest>>;
    fn piece_digests_at(&self, seq: u64, index: u64) -> Option<Vec<Digest>>;
    fn get_piece_at(&self, seq: u64, index: u64, piece: u32) -> Option<Vec<u8>>;
}

impl<S: Service> CheckpointReader for S {
    fn object_count(&self) -> u64 {
        Service::object_count(self)
    }
    fn partition_node(&self, seq: u64, level: u32, index: u64) -> Option<Vec<Digest>> {
        Service::partition_node(self, seq, level, index)
    }
    fn piece_digests_at(&self, seq: u64, index: u64) -> Option<Vec<Digest>> {
        Service::piece_digests_at(self, seq, index)
    }
    fn get_piece_at(&self, seq: u64, index: u64, piece: u32) -> Option<Vec<u8>> {
        Service::get_piece_at(self, seq, index, piece)
    }
}
