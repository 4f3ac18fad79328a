//! What one replica observes about each of its peers, for `bftfs status` to name the
//! replicas that misbehave or fall silent.
//!
//! In: every frame the driver receives (authenticated or not, with the sender the frame
//! claims), the core's misbehaviour and checkpoint notifications. Out: one [`PeerReport`] per
//! replica. The core is not involved: these are observations for people, never inputs to the
//! protocol, so they may use the wall clock and need not be deterministic.
//!
//! What is counted against a peer:
//! - frames whose MAC or signature did not verify, by the sender the frame claims (a forger
//!   can blame someone else, which is why `bftfs status` says how many peers saw it), and
//!   commits dropped from a relayed commit certificate for a bad signature, by the replica
//!   they name;
//! - messages the core refused as invalid (its `misbehaved` path);
//! - checkpoints whose digest differs from the stable certificate for that sequence number
//!   (a replica whose state is wrong, or that lies about it);
//! - equivocation proven by two pre-prepares the peer signed for one view and sequence number
//!   with different batches (one received directly, one inside view-change evidence);
//! - how late its commits and checkpoints arrive after the first one for the same sequence
//!   number (a moving average), and how long ago it last sent anything.

use crate::wire::{
    AgreementMessage, Digest, Message, PrePrepare, Principal, ReplicaId, Signed, ViewChangeMessage,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Sequence numbers (commits, checkpoints) and proposals remembered for comparisons.
const REMEMBERED: usize = 1024;

/// One peer as seen by the reporting replica.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PeerReport {
    pub id: u32,
    /// Authenticated frames received from it.
    pub frames: u64,
    /// Frames claiming to be from it whose MAC or signatures did not verify.
    pub auth_failures: u64,
    /// Authenticated messages the protocol core refused as invalid.
    pub invalid: u64,
    /// Its checkpoints that disagree with the stable certificate.
    pub checkpoint_mismatches: u64,
    /// Pairs of conflicting pre-prepares it signed (proof of equivocation).
    pub equivocations: u64,
    /// Its prepares and commits for another batch than the one the primary proposed to us in
    /// that view (it equivocates, or the primary does).
    pub conflicting_votes: u64,
    /// `conflicting_votes` by view, for the most recent views: (view, count). Votes in a
    /// view whose primary is proven to equivocate are the primary's doing.
    pub conflicting_votes_by_view: Vec<(u64, u64)>,
    /// Views in which it was proven to equivocate as primary (the most recent ones).
    pub equivocation_views: Vec<u64>,
    /// Milliseconds since its last authenticated frame; None if it never sent one.
    pub last_message_ms_ago: Option<u64>,
    /// Milliseconds since its first authenticated frame; None if it never sent one.
    pub first_message_ms_ago: Option<u64>,
    /// Moving average of how late its commits and checkpoints arrive after the first one for
    /// the same sequence number, in milliseconds.
    pub lateness_ms: Option<u64>,
}

#[derive(Default)]
struct Peer {
    report: PeerReport,
    last_message: Option<Instant>,
    first_message: Option<Instant>,
    /// Moving average in microseconds, and whether any sample was taken.
    lateness_us: Option<u64>,
}

#[derive(Default)]
struct Inner {
    peers: BTreeMap<u32, Peer>,
    highest_seq: u64,
    /// First arrival of a commit (kind 0) or checkpoint (kind 1) per sequence number.
    first_arrival: BTreeMap<(u64, u8), Instant>,
    /// Checkpoint digests received per sequence number, until it is stable.
    checkpoints: BTreeMap<u64, BTreeMap<u32, (Digest, Digest)>>,
    /// Stable digests of recent checkpoints, for checkpoints that arrive after.
    stable: BTreeMap<u64, (Digest, Digest)>,
    /// The batch digest each primary signed per (view, sequence number).
    proposals: BTreeMap<(u64, u64), (u32, Digest)>,
    /// The pre-prepare the primary sent us per (view, sequence number).
    direct: BTreeMap<(u64, u64), Digest>,
    /// Votes (prepares and commits) per (view, sequence number): (peer, kind) → digest.
    votes: BTreeMap<(u64, u64), BTreeMap<(u32, u8), Digest>>,
}

/// See the module doc. Shared by the socket tasks and the core thread.
pub struct PeerWatch {
    me: u32,
    inner: Mutex<Inner>,
}

/// Views remembered per peer in the by-view lists.
const VIEWS_REMEMBERED: usize = 16;

fn count_in_view(list: &mut Vec<(u64, u64)>, view: u64) {
    match list.iter_mut().find(|(v, _)| *v == view) {
        Some((_, n)) => *n += 1,
        None => {
            list.push((view, 1));
            list.sort_unstable();
            if list.len() > VIEWS_REMEMBERED {
                list.remove(0);
            }
        }
    }
}

fn trim<K: Ord + Clone, V>(map: &mut BTreeMap<K, V>) {
    while map.len() > REMEMBERED {
        let Some(first) = map.keys().next().cloned() else {
            break;
        };
        map.remove(&first);
    }
}

impl PeerWatch {
    pub fn new(me: ReplicaId, n: usize) -> PeerWatch {
        let mut inner = Inner::default();
        for id in (0..n as u32).filter(|i| *i != me.0) {
            inner.peers.insert(
                id,
                Peer {
                    report: PeerReport {
                        id,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            );
        }
        PeerWatch {
            me: me.0,
            inner: Mutex::new(inner),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut inner) = self.inner.lock() {
            f(&mut inner);
        }
    }

    /// A frame that authenticated.
    pub fn on_accepted(&self, sender: Principal, message: &Message) {
        let Principal::Replica(from) = sender else {
            return;
        };
        let now = Instant::now();
        self.with(|inner| {
            let Some(peer) = inner.peers.get_mut(&from.0) else {
                return;
            };
            peer.report.frames += 1;
            // Silence is judged on the ordering protocol, which every correct replica takes
            // part in: lock fetches go between some replicas only, when they lack entries, so
            // one replica's fetch would make the others look silent.
            if !matches!(message, Message::Lock(_)) {
                peer.last_message = Some(now);
                peer.first_message.get_or_insert(now);
            }
            match message {
                Message::Agreement(AgreementMessage::PrePrepare(p)) => {
                    let b = &p.pre_prepare.body;
                    inner.highest_seq = inner.highest_seq.max(b.seq.0);
                    note_proposal(inner, &p.pre_prepare);
                    if b.primary == from {
                        let slot = (b.view.0, b.seq.0);
                        inner.direct.insert(slot, b.batch_digest);
                        trim(&mut inner.direct);
                        let votes = inner.votes.get(&slot).cloned().unwrap_or_default();
                        for ((peer, _), digest) in votes {
                            if digest != b.batch_digest {
                                if let Some(p) = inner.peers.get_mut(&peer) {
                                    p.report.conflicting_votes += 1;
                                    count_in_view(
                                        &mut p.report.conflicting_votes_by_view,
                                        b.view.0,
                                    );
                                }
                            }
                        }
                    }
                }
                Message::Agreement(AgreementMessage::Prepare(p)) => {
                    inner.highest_seq = inner.highest_seq.max(p.body.seq.0);
                    let b = &p.body;
                    note_vote(inner, from.0, 0, (b.view.0, b.seq.0), b.batch_digest);
                }
                Message::Agreement(AgreementMessage::Committed(cert)) => {
                    note_proposal(inner, &cert.proposal.pre_prepare)
                }
                Message::Agreement(AgreementMessage::Commit(c)) => {
                    inner.highest_seq = inner.highest_seq.max(c.body.seq.0);
                    note_arrival(inner, from.0, (c.body.seq.0, 0), now);
                    let b = &c.body;
                    note_vote(inner, from.0, 1, (b.view.0, b.seq.0), b.batch_digest);
                }
                Message::Agreement(AgreementMessage::Checkpoint(c)) => {
                    let seq = c.body.seq.0;
                    inner.highest_seq = inner.highest_seq.max(seq);
                    note_arrival(inner, from.0, (seq, 1), now);
                    let digests = (c.body.service_root, c.body.replies_digest);
                    match inner.stable.get(&seq) {
                        Some(stable) => {
                            if *stable != digests {
                                if let Some(p) = inner.peers.get_mut(&from.0) {
                                    p.report.checkpoint_mismatches += 1;
                                }
                            }
                        }
                        None => {
                            inner
                                .checkpoints
                                .entry(seq)
                                .or_default()
                                .insert(from.0, digests);
                            trim(&mut inner.checkpoints);
                        }
                    }
                }
                Message::ViewChange(ViewChangeMessage::ViewChange(vc)) => {
                    for e in &vc.body.evidence {
                        note_proposal(inner, e.pre_prepare());
                    }
                }
                Message::ViewChange(ViewChangeMessage::NewView(nv)) => {
                    for vc in &nv.body.view_changes {
                        for e in &vc.body.evidence {
                            note_proposal(inner, e.pre_prepare());
                        }
                    }
                }
                _ => {}
            }
        });
    }

    /// A frame that did not authenticate, with the sender it claims (if it decodes that far).
    pub fn on_rejected(&self, claimed: Option<Principal>) {
        let Some(Principal::Replica(r)) = claimed else {
            return;
        };
        self.with(|inner| {
            if let Some(p) = inner.peers.get_mut(&r.0) {
                p.report.auth_failures += 1;
            }
        });
    }

    /// The core refused a message from `from` as invalid.
    pub fn on_misbehaviour(&self, from: Principal) {
        let Principal::Replica(r) = from else { return };
        self.with(|inner| {
            if let Some(p) = inner.peers.get_mut(&r.0) {
                p.report.invalid += 1;
            }
        });
    }

    /// Checkpoint `seq` became stable with these digests: whoever sent others disagrees.
    pub fn on_stable(&self, seq: u64, service_root: Digest, replies_digest: Digest) {
        self.with(|inner| {
            let digests = (service_root, replies_digest);
            inner.stable.insert(seq, digests);
            trim(&mut inner.stable);
            let votes = inner.checkpoints.remove(&seq).unwrap_or_default();
            for (id, d) in votes {
                if d != digests {
                    if let Some(p) = inner.peers.get_mut(&id) {
                        p.report.checkpoint_mismatches += 1;
                    }
                }
            }
            // Votes for older checkpoints that never became stable here are of no more use.
            inner.checkpoints = inner.checkpoints.split_off(&seq);
        });
    }

    /// The highest sequence number any peer was seen working on.
    pub fn highest_seq(&self) -> u64 {
        self.inner.lock().map(|i| i.highest_seq).unwrap_or(0)
    }

    pub fn reports(&self) -> Vec<PeerReport> {
        let now = Instant::now();
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        inner
            .peers
            .values()
            .map(|p| {
                let mut r = p.report.clone();
                r.last_message_ms_ago = p
                    .last_message
                    .map(|t| now.duration_since(t).as_millis() as u64);
                r.first_message_ms_ago = p
                    .first_message
                    .map(|t| now.duration_since(t).as_millis() as u64);
                r.lateness_ms = p.lateness_us.map(|us| us / 1000);
                r
            })
            .collect()
    }

    pub fn me(&self) -> u32 {
        self.me
    }
}

fn note_arrival(inner: &mut Inner, from: u32, key: (u64, u8), now: Instant) {
    let first = *inner.first_arrival.entry(key).or_insert(now);
    trim(&mut inner.first_arrival);
    let sample = now.duration_since(first).as_micros() as u64;
    if let Some(p) = inner.peers.get_mut(&from) {
        // An average over about the last eight samples: one slow message is noise, a replica
        // that is always late stands out.
        p.lateness_us = Some(match p.lateness_us {
            None => sample,
            Some(avg) => (avg * 7 + sample) / 8,
        });
    }
}

fn note_vote(inner: &mut Inner, from: u32, kind: u8, slot: (u64, u64), digest: Digest) {
    let votes = inner.votes.entry(slot).or_default();
    // Only a peer's first vote of a kind per slot counts (retransmissions repeat it).
    if votes.contains_key(&(from, kind)) {
        return;
    }
    votes.insert((from, kind), digest);
    trim(&mut inner.votes);
    if inner.direct.get(&slot).is_some_and(|d| *d != digest) {
        if let Some(p) = inner.peers.get_mut(&from) {
            p.report.conflicting_votes += 1;
            count_in_view(&mut p.report.conflicting_votes_by_view, slot.0);
        }
    }
}

fn note_proposal(inner: &mut Inner, pre_prepare: &Signed<PrePrepare>) {
    // Every signature inside an authenticated message was verified: the primary really signed
    // both, so two digests for one slot prove it equivocated.
    let PrePrepare {
        view,
        seq,
        batch_digest,
        primary,
        ..
    } = &pre_prepare.body;
    match inner.proposals.get(&(view.0, seq.0)) {
        Some((signer, digest)) if *signer == primary.0 && digest != batch_digest => {
            if let Some(p) = inner.peers.get_mut(&primary.0) {
                p.report.equivocations += 1;
                if !p.report.equivocation_views.contains(&view.0) {
                    p.report.equivocation_views.push(view.0);
                    if p.report.equivocation_views.len() > VIEWS_REMEMBERED {
                        p.report.equivocation_views.remove(0);
                    }
                }
            }
            // Count a slot once.
            inner
                .proposals
                .insert((view.0, seq.0), (primary.0, *batch_digest));
        }
        Some(_) => {}
        None => {
            inner
                .proposals
                .insert((view.0, seq.0), (primary.0, *batch_digest));
            trim(&mut inner.proposals);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        Batch, Checkpoint, CommitCertificate, Prepare, Proposal, SeqNo, Signer, View,
    };

    fn signer(id: u8) -> Signer {
        Signer::from_secret(&[id + 1; 32])
    }

    fn proposal(batch_digest: Digest) -> Proposal {
        let body = PrePrepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest,
            nondet: Vec::new(),
            primary: ReplicaId(0),
            history: Digest::default(),
        };
        Proposal {
            pre_prepare: signer(0).sign(body),
            batch: Batch::default(),
        }
    }

    fn report(w: &PeerWatch, id: u32) -> PeerReport {
        w.reports().into_iter().find(|r| r.id == id).expect("peer")
    }

    /// Lock traffic between replicas (fetching entries one lacks) says nothing about who
    /// takes part in ordering: it does not make a replica the "liveliest" one that others
    /// are judged silent against.
    #[test]
    fn lock_fetches_do_not_count_as_talking() {
        let w = PeerWatch::new(ReplicaId(1), 4);
        let fetch = Message::Lock(crate::wire::LockMessage::Fetch {
            lock: state_abstraction::LockId(0),
            epoch: 1,
            from: 1,
            to: 2,
            want: None,
        });
        w.on_accepted(Principal::Replica(ReplicaId(2)), &fetch);
        assert_eq!(report(&w, 2).last_message_ms_ago, None);
        assert_eq!(report(&w, 2).frames, 1);
        w.on_accepted(
            Principal::Replica(ReplicaId(2)),
            &Message::Agreement(AgreementMessage::PrePrepare(proposal(Digest([1; 32])))),
        );
        assert!(report(&w, 2).last_message_ms_ago.is_some());
    }

    #[test]
    fn counts_each_kind_of_misbehaviour_against_the_right_peer() {
        let w = PeerWatch::new(ReplicaId(1), 4);
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        // The primary proposes A to us; replica 2 votes for B in the same slot.
        w.on_accepted(
            Principal::Replica(ReplicaId(0)),
            &Message::Agreement(AgreementMessage::PrePrepare(proposal(a))),
        );
        let prepare = |digest| Prepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: digest,
            replica: ReplicaId(2),
        };
        w.on_accepted(
            Principal::Replica(ReplicaId(2)),
            &Message::Agreement(AgreementMessage::Prepare(signer(2).sign(prepare(b)))),
        );
        w.on_accepted(
            Principal::Replica(ReplicaId(3)),
            &Message::Agreement(AgreementMessage::Prepare(signer(3).sign(Prepare {
                replica: ReplicaId(3),
                ..prepare(a)
            }))),
        );
        assert_eq!(report(&w, 2).conflicting_votes, 1);
        assert_eq!(report(&w, 3).conflicting_votes, 0);
        assert_eq!(report(&w, 0).equivocations, 0);
        // A commit certificate shows the primary signed B for the same slot: proof.
        let cert = CommitCertificate {
            proposal: proposal(b),
            commits: Vec::new(),
        };
        w.on_accepted(
            Principal::Replica(ReplicaId(3)),
            &Message::Agreement(AgreementMessage::Committed(Box::new(cert))),
        );
        assert_eq!(report(&w, 0).equivocations, 1);
        assert_eq!(report(&w, 0).equivocation_views, vec![0]);
        assert_eq!(report(&w, 3).equivocations, 0);
        // Checkpoints: replica 3 disagrees with the stable certificate, before and after it.
        let checkpoint = |replica: u32, root: Digest, seq: u64| {
            Message::Agreement(AgreementMessage::Checkpoint(signer(replica as u8).sign(
                Checkpoint {
                    seq: SeqNo(seq),
                    service_root: root,
                    replies_digest: Digest([9; 32]),
                    replica: ReplicaId(replica),
                },
            )))
        };
        w.on_accepted(Principal::Replica(ReplicaId(0)), &checkpoint(0, a, 64));
        w.on_accepted(Principal::Replica(ReplicaId(3)), &checkpoint(3, b, 64));
        w.on_stable(64, a, Digest([9; 32]));
        w.on_accepted(Principal::Replica(ReplicaId(2)), &checkpoint(2, a, 64));
        w.on_accepted(Principal::Replica(ReplicaId(3)), &checkpoint(3, b, 128));
        w.on_stable(128, a, Digest([9; 32]));
        assert_eq!(report(&w, 3).checkpoint_mismatches, 2);
        assert_eq!(
            report(&w, 0).checkpoint_mismatches + report(&w, 2).checkpoint_mismatches,
            0
        );
        // Frames that fail authentication and invalid messages.
        w.on_rejected(Some(Principal::Replica(ReplicaId(2))));
        w.on_rejected(None);
        w.on_misbehaviour(Principal::Replica(ReplicaId(3)));
        assert_eq!(report(&w, 2).auth_failures, 1);
        assert_eq!(report(&w, 3).invalid, 1);
        assert!(report(&w, 0).last_message_ms_ago.is_some());
        assert_eq!(w.highest_seq(), 128);
        assert!(
            w.reports().iter().all(|r| r.id != 1),
            "no report about ourselves"
        );
    }
}
