//! State transfer, fetching side (PROTOCOLS §4.3).
//!
//! In: a stable checkpoint certificate (2f+1 signed checkpoints) naming the target state, the
//! replica's own newest checkpoint (the base it diffs against), and the peers' answers. Out:
//! requests to send, and finally the objects to install and the reply cache of the target.
//!
//! The walk: the root node's children are accepted when f+1 replicas report them identically
//! (at least one is correct; the root node's own digest is not exposed by the partition tree,
//! so it cannot be checked against the certified root directly — the whole state is checked
//! against it after installation instead). Every deeper node is checked against its parent's
//! digest with [`PartitionTree::verify_node`]; only subtrees whose digests differ from the base
//! are descended; for a differing object only the pieces whose digests differ are fetched, and
//! each piece is checked against its digest. A reply that fails a check is counted against
//! its sender and the request goes to another peer.

use crate::wire::{CheckpointCertificate, Digest, ReplicaId, SeqNo, StateTransferMessage};
use state_abstraction::digest::{object_digest, piece_digest, PartitionTree, LEVELS};
use state_abstraction::AbstractObject;
use std::collections::BTreeMap;

use super::CheckpointReader;
use crate::core::execution::ReplyTable;
use crate::core::state_transfer::{Finished, TransferStep};

/// One thing the fetcher is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Want {
    Node { level: u32, index: u64 },
    PieceDigests { index: u64 },
    Piece { index: u64, piece: u32 },
    Replies,
}

#[derive(Clone, Debug)]
struct Outstanding {
    /// What the answer must hash to (unused for `Replies`, checked against the certificate).
    expected: Digest,
    peer: usize,
    sent_tick: u64,
}

/// An object being assembled: its piece digests and the pieces received so far.
type Assembling = (Vec<Digest>, Vec<Option<Vec<u8>>>);

#[derive(Debug)]
pub struct Transfer {
    pub target: CheckpointCertificate,
    /// The fetcher's own checkpoint whose state the service holds (diffs are against it).
    pub base: SeqNo,
    peers: Vec<ReplicaId>,
    me: ReplicaId,
    weak_quorum: usize,
    root_votes: BTreeMap<ReplicaId, Vec<Digest>>,
    root_done: bool,
    /// The object count of the certified state, once known: it is read off the rightmost
    /// path of the verified tree (the last leaf-level node's index and width), never taken
    /// from a replier's word.
    object_count: Option<u64>,
    /// The rightmost node whose children we still need to learn the count: (level, index,
    /// its digest).
    count_path: Option<(u32, u64, Digest)>,
    outstanding: BTreeMap<Want, Outstanding>,
    /// Objects being assembled: remote piece digests and pieces received so far.
    assembling: BTreeMap<u64, Assembling>,
    ready: Vec<(u64, AbstractObject)>,
    replies: Option<Vec<u8>>,
    pub bytes_fetched: u64,
    pub rejected_answers: u64,
    rotation: usize,
    /// Pieces an earlier transfer to an older target already fetched, by (object, piece):
    /// used instead of fetching again wherever they match the new target's digests, so a
    /// transfer that takes longer than a checkpoint interval under sustained writes still
    /// converges (the target moves on, what was fetched stays useful).
    carried: BTreeMap<(u64, u32), Vec<u8>>,
    /// Bytes taken from `carried` instead of the network.
    pub bytes_reused: u64,
}

impl Transfer {
    /// Starts fetching `target`. `peers` should be the replicas that signed it first.
    pub fn start(
        target: CheckpointCertificate,
        base: SeqNo,
        me: ReplicaId,
        mut peers: Vec<ReplicaId>,
        weak_quorum: usize,
        tick: u64,
        out: &mut Vec<TransferStep>,
    ) -> Self {
        peers.retain(|p| *p != me);
        let mut t = Transfer {
            target,
            base,
            peers,
            me,
            weak_quorum,
            root_votes: BTreeMap::new(),
            root_done: false,
            object_count: None,
            count_path: None,
            outstanding: BTreeMap::new(),
            assembling: BTreeMap::new(),
            ready: Vec::new(),
            replies: None,
            bytes_fetched: 0,
            rejected_answers: 0,
            rotation: 0,
            carried: BTreeMap::new(),
            bytes_reused: 0,
        };
        t.ask_root(out);
        t.want(Want::Replies, Digest::default(), tick, out);
        t
    }

    fn seq(&self) -> SeqNo {
        self.target.seq
    }

    fn ask_root(&self, out: &mut Vec<TransferStep>) {
        for p in &self.peers {
            out.push(TransferStep::Send(
                *p,
                StateTransferMessage::GetNode {
                    seq: self.seq(),
                    level: 0,
                    index: 0,
                },
            ));
        }
    }

    fn request_for(&self, want: Want) -> StateTransferMessage {
        let seq = self.seq();
        match want {
            Want::Node { level, index } => StateTransferMessage::GetNode { seq, level, index },
            Want::PieceDigests { index } => StateTransferMessage::GetPieceDigests { seq, index },
            Want::Piece { index, piece } => StateTransferMessage::GetPiece { seq, index, piece },
            Want::Replies => StateTransferMessage::GetReplies { seq },
        }
    }

    fn want(&mut self, want: Want, expected: Digest, tick: u64, out: &mut Vec<TransferStep>) {
        if self.peers.is_empty() {
            return;
        }
        self.rotation = (self.rotation + 1) % self.peers.len();
        let peer = self.rotation;
        out.push(TransferStep::Send(self.peers[peer], self.request_for(want)));
        self.outstanding.insert(
            want,
            Outstanding {
                expected,
                peer,
                sent_tick: tick,
            },
        );
    }

    /// Sends again, to the next peer, whatever has waited longer than `timeout_ticks`.
    pub fn on_tick(&mut self, tick: u64, timeout_ticks: u64, out: &mut Vec<TransferStep>) {
        if self.peers.is_empty() {
            return;
        }
        if !self.root_done && tick % timeout_ticks == 0 {
            self.ask_root(out);
        }
        let n = self.peers.len();
        for (want, o) in self.outstanding.iter_mut() {
            if tick.saturating_sub(o.sent_tick) >= timeout_ticks {
                o.peer = (o.peer + 1) % n;
                o.sent_tick = tick;
                out.push(TransferStep::Send(
                    self.peers[o.peer],
                    Self::request_static(self.target.seq, *want),
                ));
            }
        }
    }

    fn request_static(seq: SeqNo, want: Want) -> StateTransferMessage {
        match want {
            Want::Node { level, index } => StateTransferMessage::GetNode { seq, level, index },
            Want::PieceDigests { index } => StateTransferMessage::GetPieceDigests { seq, index },
            Want::Piece { index, piece } => StateTransferMessage::GetPiece { seq, index, piece },
            Want::Replies => StateTransferMessage::GetReplies { seq },
        }
    }

    /// A failed answer: count it and ask the next peer at once.
    fn reject(
        &mut self,
        from: ReplicaId,
        want: Want,
        what: &'static str,
        tick: u64,
        out: &mut Vec<TransferStep>,
    ) {
        self.rejected_answers += 1;
        out.push(TransferStep::Misbehaved(from, what));
        if let Some(o) = self.outstanding.get_mut(&want) {
            let n = self.peers.len().max(1);
            o.peer = (o.peer + 1) % n;
            o.sent_tick = tick;
            if let Some(p) = self.peers.get(o.peer) {
                out.push(TransferStep::Send(
                    *p,
                    Self::request_static(self.target.seq, want),
                ));
            }
        }
    }

    /// Children of `(level, index)` whose digests differ from the base state's.
    fn descend<R: CheckpointReader + ?Sized>(
        &mut self,
        service: &R,
        level: u32,
        index: u64,
        children: &[Digest],
        tick: u64,
        out: &mut Vec<TransferStep>,
    ) {
        let local = service
            .partition_node(self.base.0, level, index)
            .unwrap_or_default();
        let fanout = state_abstraction::digest::FANOUT;
        for (i, child) in children.iter().enumerate() {
            if local.get(i) == Some(child) {
                continue;
            }
            let child_index = index * fanout + i as u64;
            if level + 1 < LEVELS {
                self.want(
                    Want::Node {
                        level: level + 1,
                        index: child_index,
                    },
                    *child,
                    tick,
                    out,
                );
            } else {
                self.want(Want::PieceDigests { index: child_index }, *child, tick, out);
            }
        }
    }

    /// Handles an answer from `from`. Returns the finished transfer when everything is in.
    pub fn on_message<R: CheckpointReader + ?Sized>(
        &mut self,
        service: &R,
        from: ReplicaId,
        message: StateTransferMessage,
        tick: u64,
        out: &mut Vec<TransferStep>,
    ) -> Option<Finished> {
        if from == self.me {
            return None;
        }
        match message {
            StateTransferMessage::Node {
                seq,
                level: 0,
                index: 0,
                object_count,
                children,
            } if seq == self.seq() => {
                if self.root_done {
                    return None;
                }
                // The replier's object count is its current one, which may differ from the
                // checkpoint's: only the children are compared.
                let _ = object_count;
                self.root_votes.insert(from, children);
                let mut tally: BTreeMap<&Vec<Digest>, usize> = BTreeMap::new();
                for v in self.root_votes.values() {
                    *tally.entry(v).or_default() += 1;
                }
                let agreed = tally
                    .into_iter()
                    .find(|(_, count)| *count >= self.weak_quorum)
                    .map(|(v, _)| v.clone());
                if let Some(children) = agreed {
                    self.root_done = true;
                    self.descend(service, 0, 0, &children, tick, out);
                    self.follow_count_path(service, 0, 0, &children);
                }
            }
            StateTransferMessage::Node {
                seq,
                level,
                index,
                children,
                ..
            } if seq == self.seq() => {
                let want = Want::Node { level, index };
                let o = self.outstanding.get(&want)?;
                if !PartitionTree::verify_node(level, index, &children, &o.expected) {
                    self.reject(
                        from,
                        want,
                        "partition node does not match its parent",
                        tick,
                        out,
                    );
                    return None;
                }
                self.outstanding.remove(&want);
                self.bytes_fetched += 32 * children.len() as u64;
                self.descend(service, level, index, &children, tick, out);
                if self
                    .count_path
                    .is_some_and(|(l, i, _)| l == level && i == index)
                {
                    self.follow_count_path(service, level, index, &children);
                }
            }
            StateTransferMessage::PieceDigests {
                seq,
                index,
                digests,
            } if seq == self.seq() => {
                let want = Want::PieceDigests { index };
                let o = self.outstanding.get(&want)?;
                if object_digest(index, &digests) != o.expected {
                    self.reject(
                        from,
                        want,
                        "piece digests do not match the object digest",
                        tick,
                        out,
                    );
                    return None;
                }
                self.outstanding.remove(&want);
                self.bytes_fetched += 32 * digests.len() as u64;
                let local = service
                    .piece_digests_at(self.base.0, index)
                    .unwrap_or_default();
                let mut pieces: Vec<Option<Vec<u8>>> = vec![None; digests.len()];
                for (p, d) in digests.iter().enumerate() {
                    if local.get(p) == Some(d) {
                        pieces[p] = service.get_piece_at(self.base.0, index, p as u32);
                    }
                    if pieces[p].is_none() {
                        if let Some(bytes) = self.carried.remove(&(index, p as u32)) {
                            if piece_digest(index, p as u32, &bytes) == *d {
                                self.bytes_reused += bytes.len() as u64;
                                pieces[p] = Some(bytes);
                            }
                        }
                    }
                    if pieces[p].is_none() {
                        self.want(
                            Want::Piece {
                                index,
                                piece: p as u32,
                            },
                            *d,
                            tick,
                            out,
                        );
                    }
                }
                self.assembling.insert(index, (digests, pieces));
                self.try_assemble(index);
            }
            StateTransferMessage::Piece {
                seq,
                index,
                piece,
                bytes,
            } if seq == self.seq() => {
                let want = Want::Piece { index, piece };
                let o = self.outstanding.get(&want)?;
                if piece_digest(index, piece, &bytes) != o.expected {
                    self.reject(from, want, "piece does not match its digest", tick, out);
                    return None;
                }
                self.outstanding.remove(&want);
                self.bytes_fetched += bytes.len() as u64;
                if let Some((_, pieces)) = self.assembling.get_mut(&index) {
                    if let Some(slot) = pieces.get_mut(piece as usize) {
                        *slot = Some(bytes);
                    }
                }
                self.try_assemble(index);
            }
            StateTransferMessage::Replies { seq, table } if seq == self.seq() => {
                if !self.outstanding.contains_key(&Want::Replies) {
                    return None;
                }
                if ReplyTable::digest_of_encoding(&table) != self.target.replies_digest {
                    self.reject(
                        from,
                        Want::Replies,
                        "reply cache does not match the certificate",
                        tick,
                        out,
                    );
                    return None;
                }
                self.outstanding.remove(&Want::Replies);
                self.bytes_fetched += table.len() as u64;
                self.replies = Some(table);
            }
            _ => return None,
        }
        self.finished()
    }

    /// Walks the rightmost path below `(level, index)`, whose verified children are given,
    /// as far as possible: through our own base tree where it has the same digest, else it
    /// stops and waits for the node to arrive (it differs, so `descend` asked for it).
    fn follow_count_path<R: CheckpointReader + ?Sized>(
        &mut self,
        service: &R,
        mut level: u32,
        mut index: u64,
        children: &[Digest],
    ) {
        let fanout = state_abstraction::digest::FANOUT;
        let mut children = children.to_vec();
        loop {
            let Some(last) = children.last().copied() else {
                // An empty node: only the empty state has one (at the root).
                self.object_count = Some(0);
                self.count_path = None;
                return;
            };
            let child_index = index * fanout + (children.len() as u64 - 1);
            if level + 1 == LEVELS {
                self.object_count = Some(child_index + 1);
                self.count_path = None;
                return;
            }
            let local_parent = service
                .partition_node(self.base.0, level, index)
                .unwrap_or_default();
            if local_parent.get(children.len() - 1) == Some(&last) {
                // Same digest: our own subtree is identical, shape included.
                let Some(local) = service.partition_node(self.base.0, level + 1, child_index)
                else {
                    self.count_path = Some((level + 1, child_index, last));
                    return;
                };
                level += 1;
                index = child_index;
                children = local;
            } else {
                self.count_path = Some((level + 1, child_index, last));
                return;
            }
        }
    }

    /// Gives up this transfer for one to a newer target, handing over every piece fetched
    /// so far (see `carried`).
    pub fn into_fetched(self) -> BTreeMap<(u64, u32), Vec<u8>> {
        let mut fetched = self.carried;
        for (index, object) in self.ready {
            for (p, bytes) in object.pieces.into_iter().enumerate() {
                fetched.insert((index, p as u32), bytes);
            }
        }
        for (index, (_, pieces)) in self.assembling {
            for (p, bytes) in pieces.into_iter().enumerate() {
                if let Some(bytes) = bytes {
                    fetched.insert((index, p as u32), bytes);
                }
            }
        }
        fetched
    }

    /// Pieces to use instead of fetching them (from [`Transfer::into_fetched`]).
    pub fn carry(&mut self, fetched: BTreeMap<(u64, u32), Vec<u8>>) {
        self.carried = fetched;
    }

    fn try_assemble(&mut self, index: u64) {
        let complete = self
            .assembling
            .get(&index)
            .is_some_and(|(_, pieces)| pieces.iter().all(Option::is_some));
        if complete {
            if let Some((_, pieces)) = self.assembling.remove(&index) {
                self.ready.push((
                    index,
                    AbstractObject {
                        pieces: pieces.into_iter().flatten().collect(),
                    },
                ));
            }
        }
    }

    fn finished(&mut self) -> Option<Finished> {
        if !self.root_done || !self.outstanding.is_empty() || !self.assembling.is_empty() {
            return None;
        }
        let object_count = self.object_count?;
        let replies = self.replies.clone()?;
        Some(Finished {
            objects: std::mem::take(&mut self.ready),
            replies,
            object_count,
        })
    }
}
