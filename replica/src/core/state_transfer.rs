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
use state_abstraction::{AbstractObject, Service};
use std::collections::BTreeMap;

use super::execution::ReplyTable;

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

#[derive(Debug)]
pub struct Transfer {
    pub target: CheckpointCertificate,
    /// The fetcher's own checkpoint whose state the service holds (diffs are against it).
    pub base: SeqNo,
    peers: Vec<ReplicaId>,
    me: ReplicaId,
    weak_quorum: usize,
    root_votes: BTreeMap<ReplicaId, (u64, Vec<Digest>)>,
    root_done: bool,
    outstanding: BTreeMap<Want, Outstanding>,
    /// Objects being assembled: remote piece digests and pieces received so far.
    assembling: BTreeMap<u64, (Vec<Digest>, Vec<Option<Vec<u8>>>)>,
    ready: Vec<(u64, AbstractObject)>,
    replies: Option<Vec<u8>>,
    pub bytes_fetched: u64,
    pub rejected_answers: u64,
    rotation: usize,
}

/// What a transfer asks the core to do.
#[derive(Debug)]
pub enum TransferStep {
    Send(ReplicaId, StateTransferMessage),
    /// A peer answered with something that failed verification.
    Misbehaved(ReplicaId, &'static str),
}

/// A finished transfer: install these objects, then the reply cache.
#[derive(Debug)]
pub struct Finished {
    pub objects: Vec<(u64, AbstractObject)>,
    /// The encoded reply cache (its digest matches the certificate).
    pub replies: Vec<u8>,
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
            outstanding: BTreeMap::new(),
            assembling: BTreeMap::new(),
            ready: Vec::new(),
            replies: None,
            bytes_fetched: 0,
            rejected_answers: 0,
            rotation: 0,
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
            out.push(TransferStep::Send(*p, StateTransferMessage::GetNode { seq: self.seq(), level: 0, index: 0 }));
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
        self.outstanding.insert(want, Outstanding { expected, peer, sent_tick: tick });
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
                out.push(TransferStep::Send(self.peers[o.peer], Self::request_static(self.target.seq, *want)));
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
    fn reject(&mut self, from: ReplicaId, want: Want, what: &'static str, tick: u64, out: &mut Vec<TransferStep>) {
        self.rejected_answers += 1;
        out.push(TransferStep::Misbehaved(from, what));
        if let Some(o) = self.outstanding.get_mut(&want) {
            let n = self.peers.len().max(1);
            o.peer = (o.peer + 1) % n;
            o.sent_tick = tick;
            if let Some(p) = self.peers.get(o.peer) {
                out.push(TransferStep::Send(*p, Self::request_static(self.target.seq, want)));
            }
        }
    }

    /// Children of `(level, index)` whose digests differ from the base state's.
    fn descend<S: Service>(
        &mut self,
        service: &S,
        level: u32,
        index: u64,
        children: &[Digest],
        tick: u64,
        out: &mut Vec<TransferStep>,
    ) {
        let local = service.partition_node(self.base.0, level, index).unwrap_or_default();
        let fanout = state_abstraction::digest::FANOUT;
        for (i, child) in children.iter().enumerate() {
            if local.get(i) == Some(child) {
                continue;
            }
            let child_index = index * fanout + i as u64;
            if level + 1 < LEVELS {
                self.want(Want::Node { level: level + 1, index: child_index }, *child, tick, out);
            } else {
                self.want(Want::PieceDigests { index: child_index }, *child, tick, out);
            }
        }
    }

    /// Handles an answer from `from`. Returns the finished transfer when everything is in.
    pub fn on_message<S: Service>(
        &mut self,
        service: &S,
        from: ReplicaId,
        message: StateTransferMessage,
        tick: u64,
        out: &mut Vec<TransferStep>,
    ) -> Option<Finished> {
        if from == self.me {
            return None;
        }
        match message {
            StateTransferMessage::Node { seq, level: 0, index: 0, object_count, children } if seq == self.seq() => {
                if self.root_done {
                    return None;
                }
                self.root_votes.insert(from, (object_count, children));
                let mut tally: BTreeMap<&(u64, Vec<Digest>), usize> = BTreeMap::new();
                for v in self.root_votes.values() {
                    *tally.entry(v).or_default() += 1;
                }
                let agreed = tally.into_iter().find(|(_, count)| *count >= self.weak_quorum).map(|(v, _)| v.clone());
                if let Some((_, children)) = agreed {
                    self.root_done = true;
                    self.descend(service, 0, 0, &children, tick, out);
                }
            }
            StateTransferMessage::Node { seq, level, index, children, .. } if seq == self.seq() => {
                let want = Want::Node { level, index };
                let o = self.outstanding.get(&want)?;
                if !PartitionTree::verify_node(level, index, &children, &o.expected) {
                    self.reject(from, want, "partition node does not match its parent", tick, out);
                    return None;
                }
                self.outstanding.remove(&want);
                self.bytes_fetched += 32 * children.len() as u64;
                self.descend(service, level, index, &children, tick, out);
            }
            StateTransferMessage::PieceDigests { seq, index, digests } if seq == self.seq() => {
                let want = Want::PieceDigests { index };
                let o = self.outstanding.get(&want)?;
                if object_digest(index, &digests) != o.expected {
                    self.reject(from, want, "piece digests do not match the object digest", tick, out);
                    return None;
                }
                self.outstanding.remove(&want);
                self.bytes_fetched += 32 * digests.len() as u64;
                let local = service.piece_digests_at(self.base.0, index).unwrap_or_default();
                let mut pieces: Vec<Option<Vec<u8>>> = vec![None; digests.len()];
                for (p, d) in digests.iter().enumerate() {
                    if local.get(p) == Some(d) {
                        pieces[p] = service.get_piece_at(self.base.0, index, p as u32);
                    }
                    if pieces[p].is_none() {
                        self.want(Want::Piece { index, piece: p as u32 }, *d, tick, out);
                    }
                }
                self.assembling.insert(index, (digests, pieces));
                self.try_assemble(index);
            }
            StateTransferMessage::Piece { seq, index, piece, bytes } if seq == self.seq() => {
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
                    self.reject(from, Want::Replies, "reply cache does not match the certificate", tick, out);
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

    fn try_assemble(&mut self, index: u64) {
        let complete = self.assembling.get(&index).is_some_and(|(_, pieces)| pieces.iter().all(Option::is_some));
        if complete {
            if let Some((_, pieces)) = self.assembling.remove(&index) {
                self.ready.push((index, AbstractObject { pieces: pieces.into_iter().flatten().collect() }));
            }
        }
    }

    fn finished(&mut self) -> Option<Finished> {
        if !self.root_done || !self.outstanding.is_empty() || !self.assembling.is_empty() {
            return None;
        }
        let replies = self.replies.clone()?;
        Some(Finished { objects: std::mem::take(&mut self.ready), replies })
    }
}
