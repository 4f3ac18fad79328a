//! State transfer, serving side (PROTOCOLS §4.3): the answer to a peer's request, read from
//! the checkpoints the service keeps and the reply caches of this replica's own checkpoints.
//!
//! In: a request (`QueryStable`, `GetNode`, `GetPieceDigests`, `GetPiece`, `GetReplies`). Out:
//! its answer, or nothing when the state asked for is no longer (or not yet) held here: the
//! fetcher then asks another replica. Answers are not checked here; the fetcher checks each
//! against the digests it already trusts (see [`super::fetch`]).

use super::CheckpointReader;
use crate::wire::{CheckpointCertificate, SeqNo, StateTransferMessage};

/// The answer to `request`, or `None` if it is not a request or asks for state not held.
/// `stable` answers `QueryStable`; `replies_at(seq)` is the encoded reply cache of this
/// replica's checkpoint `seq`, if it has one.
pub fn answer<R: CheckpointReader + ?Sized>(
    service: &R,
    stable: &CheckpointCertificate,
    replies_at: impl FnOnce(SeqNo) -> Option<Vec<u8>>,
    request: &StateTransferMessage,
) -> Option<StateTransferMessage> {
    use StateTransferMessage as M;
    match request {
        M::QueryStable => Some(M::ReplyStable(stable.clone())),
        M::GetNode { seq, level, index } => {
            service
                .partition_node(seq.0, *level, *index)
                .map(|children| M::Node {
                    seq: *seq,
                    level: *level,
                    index: *index,
                    object_count: service.object_count(),
                    children,
                })
        }
        M::GetPieceDigests { seq, index } => {
            service
                .piece_digests_at(seq.0, *index)
                .map(|digests| M::PieceDigests {
                    seq: *seq,
                    index: *index,
                    digests,
                })
        }
        M::GetPiece { seq, index, piece } => {
            service
                .get_piece_at(seq.0, *index, *piece)
                .map(|bytes| M::Piece {
                    seq: *seq,
                    index: *index,
                    piece: *piece,
                    bytes,
                })
        }
        M::GetReplies { seq } => replies_at(*seq).map(|table| M::Replies { seq: *seq, table }),
        _ => None,
    }
}
