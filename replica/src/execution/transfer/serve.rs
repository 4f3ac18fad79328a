//! State transfer, serving side (PROTOCOLS §4.3): the answer to a peer's request for state,
//! read from the checkpoints the service keeps (run by the execution stage).
//!
//! In: a request (`GetNode`, `GetPieceDigests`, `GetPiece`). Out:
//! its answer, or nothing when the state asked for is no longer (or not yet) held here: the
//! fetcher then asks another replica. Answers are not checked here; the fetcher checks each
//! against the digests it already trusts (see [`super::fetch`]).

use super::CheckpointReader;
use crate::wire::StateTransferMessage;

/// The answer to `request`, or `None` if it is not a request for checkpointed state
/// (`GetNode`, `GetPieceDigests`, `GetPiece`) or asks for state not held. `QueryStable` and
/// `GetReplies` are the core's to answer: it holds the stable certificate and the reply caches
/// of its checkpoints.
pub fn answer<R: CheckpointReader + ?Sized>(
    service: &R,
    request: &StateTransferMessage,
) -> Option<StateTransferMessage> {
    use StateTransferMessage as M;
    match request {
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
        _ => None,
    }
}
