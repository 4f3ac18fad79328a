//! The Byzantine replica: a correct core whose outgoing messages the scenario's
//! [`Behaviour`] alters, plus the unsolicited traffic it sends each tick.

use super::*;
use crate::tamper;

impl Sim {
    pub(super) fn pick(&mut self, behaviour: Behaviour) -> Behaviour {
        if behaviour == Behaviour::Mixed {
            BEHAVIOURS[self.rng.below(BEHAVIOURS.len() as u64 - 1) as usize]
        } else {
            behaviour
        }
    }

    /// Sends as a Byzantine replica. Its messages come from the real core (at most slightly
    /// altered), so one too large to seal is the core's fault and fails the run too.
    pub(super) fn byzantine_send(
        &mut self,
        r: usize,
        to: Vec<Principal>,
        message: &Message,
        behaviour: Behaviour,
    ) -> Result<(), Failure> {
        let from = Principal::Replica(ReplicaId(r as u32));
        let sealed = seal_frame(&self.replicas[r].auth, from, &to, message);
        let frame = self.sealed(sealed)?;
        for receiver in to {
            let mut frame = frame.clone();
            if behaviour == Behaviour::CorruptAuth && self.rng.chance(500) {
                let at = self.rng.below((frame.len() - FRAME_HEADER_BYTES) as u64) as usize;
                let mask = 1 << self.rng.below(8);
                tamper::corrupt_frame(Arc::make_mut(&mut frame).as_mut_slice(), at, mask);
            }
            // Large frames are left out of the pool: replaying them adds nothing and would
            // pin megabytes per entry.
            if frame.len() <= 1 << 20 {
                if self.replay_pool.len() < 512 {
                    self.replay_pool.push((receiver, frame.clone()));
                } else {
                    let i = self.rng.below(512) as usize;
                    self.replay_pool[i] = (receiver, frame.clone());
                }
            }
            self.transmit(from, receiver, frame);
        }
        Ok(())
    }

    pub(super) fn perform_byzantine(
        &mut self,
        r: usize,
        actions: Vec<Action>,
    ) -> Result<(), Failure> {
        let Some(base) = self.replicas[r].byzantine else {
            return Ok(());
        };
        let me = ReplicaId(r as u32);
        for action in actions {
            let behaviour = self.pick(base);
            let (to, message) = match action {
                Action::Persist(record) => {
                    self.check_record(r, &record)?;
                    let stable = match &record {
                        WalRecord::Stable(cert) => Some(&**cert),
                        WalRecord::Snapshot(state) => Some(&state.stable),
                        _ => None,
                    };
                    if let Some(cert) = stable {
                        let history = &mut self.replicas[r].stable_history;
                        if history.last().is_none_or(|last| last.seq < cert.seq) {
                            history.push(cert.clone());
                        }
                        if history.len() > 4 {
                            history.remove(0);
                        }
                    }
                    if matches!(record, WalRecord::Snapshot(_)) {
                        self.replicas[r].wal.clear();
                    }
                    self.replicas[r].wal.push(record);
                    self.replicas[r].persisted += 1;
                    continue;
                }
                Action::Send { to, message } => (vec![Principal::Replica(to)], message),
                Action::Broadcast { message } => (self.other_replicas(r), message),
                Action::SendClient { to, message } => (vec![Principal::Client(to)], message),
                Action::Notify(_) | Action::Halt { .. } => continue,
                // The replica's execution stage performed these already.
                Action::Stage(_) => continue,
            };
            if behaviour == Behaviour::Silent {
                continue;
            }
            let Some(signer) = self.replicas[r].signer.clone() else {
                continue;
            };
            if let Message::ViewChange(ViewChangeMessage::ViewChange(vc)) = &message {
                if vc.body.replica == me {
                    self.hold_view_change(r, vc.clone());
                }
            }
            match (&message, behaviour) {
                (
                    Message::ViewChange(ViewChangeMessage::ViewChange(vc)),
                    Behaviour::StaleViewChange,
                ) if vc.body.replica == me => {
                    let body = self.stale_view_change(r, &vc.body);
                    if self.trace {
                        eprintln!(
                            "[{}] r{r} lies in its view change for {:?}: stable {:?} -> {:?}, {} -> {} evidence items",
                            self.tick,
                            vc.body.new_view,
                            vc.body.stable.seq,
                            body.stable.seq,
                            vc.body.evidence.len(),
                            body.evidence.len()
                        );
                    }
                    self.stale_view_changes += u64::from(body != vc.body);
                    let m = Message::ViewChange(ViewChangeMessage::ViewChange(signer.sign(body)));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::ViewChange(ViewChangeMessage::NewView(nv)), Behaviour::SplitNewView)
                    if nv.body.primary == me =>
                {
                    let held = self.view_changes_for(r, nv.body.view).len();
                    if to.len() > 1 && held <= self.config.quorum() && held < self.n() {
                        // Wait for more view changes than a quorum, so that the subsets
                        // differ; the deadline keeps a view with only a quorum alive.
                        let deadline = self.tick + 2 * self.scenario.protocol.retransmit_ticks;
                        self.replicas[r].held_new_view = Some((nv.clone(), to, deadline));
                    } else {
                        self.send_split_new_view(r, nv, to)?;
                    }
                }
                (Message::ViewChange(ViewChangeMessage::NewView(nv)), Behaviour::LyingNewView) => {
                    let lie = tamper::lying_new_view(&signer, &nv.body, me);
                    let m = Message::ViewChange(ViewChangeMessage::NewView(lie));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::Agreement(AgreementMessage::PrePrepare(p)), Behaviour::Equivocate)
                    if to.len() > 1 =>
                {
                    // A different, validly signed batch for every other backup, each chained onto
                    // what that backup was sent before, so that it runs speculatively.
                    let b = &p.pre_prepare.body;
                    let own_previous = match &self.replicas[r].state {
                        ReplicaState::Up(core) => core.proposed_history(SeqNo(b.seq.0 - 1)),
                        _ => None,
                    };
                    for (k, receiver) in to.iter().enumerate() {
                        let Principal::Replica(rid) = receiver else {
                            continue;
                        };
                        let previous = self
                            .forks
                            .get(&(rid.0, b.view.0, b.seq.0 - 1))
                            .copied()
                            .or(own_previous)
                            .unwrap_or_default();
                        let mut proposal = p.clone();
                        if k > 0 {
                            proposal = self.alternative_proposal(&signer, p, k as u64, &previous);
                        }
                        if self.forks.len() > 4096 {
                            self.forks.clear();
                        }
                        self.forks.insert(
                            (rid.0, b.view.0, b.seq.0),
                            proposal.pre_prepare.body.history,
                        );
                        let m = Message::Agreement(AgreementMessage::PrePrepare(proposal));
                        self.byzantine_send(r, vec![*receiver], &m, behaviour)?;
                    }
                }
                (Message::Agreement(AgreementMessage::Prepare(p)), Behaviour::ForgeSignatures) => {
                    // Claim to be another replica (signature by our key: refused), or vote for
                    // a digest nobody proposed.
                    let prepare = if self.rng.chance(500) {
                        let claimed = ReplicaId((me.0 + 1) % self.n() as u32);
                        tamper::impersonate(&signer, &p.body, claimed)
                    } else {
                        let mut nobody_proposed = p.body.batch_digest;
                        nobody_proposed.0[0] ^= 0xff;
                        tamper::vote_for(&signer, &p.body, nobody_proposed)
                    };
                    let m = Message::Agreement(AgreementMessage::Prepare(prepare));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::Agreement(AgreementMessage::Commit(c)), Behaviour::ForgeSignatures) => {
                    // Claim to be another replica (refused), or send our own commit with a
                    // broken signature under a valid MAC: receivers count it without checking
                    // the signature, so it ends up in their commit certificates, and a
                    // replica catching up from one must drop it and still find 2f+1 valid.
                    let commit = if self.rng.chance(500) {
                        let claimed = ReplicaId((me.0 + 2) % self.n() as u32);
                        tamper::impersonate(&signer, &c.body, claimed)
                    } else {
                        let mut forged = c.clone();
                        // Drawn in this order since the generator was first used here (the
                        // mask was the right operand of a compound assignment, evaluated
                        // first), so that seeds replay the runs they always did.
                        let mask = 1 << self.rng.below(8);
                        let byte = self.rng.below(64) as usize;
                        tamper::break_signature(&mut forged, byte, mask);
                        forged
                    };
                    let m = Message::Agreement(AgreementMessage::Commit(commit));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (
                    Message::Lock(crate::wire::LockMessage::Reply(reply)),
                    Behaviour::WrongReplies,
                ) => {
                    let mut reply = reply.clone();
                    reply.result = state_abstraction::LockedResult::Done(b"wrong".to_vec());
                    let m = Message::Lock(crate::wire::LockMessage::Reply(reply));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (
                    Message::Lock(crate::wire::LockMessage::Base { lock, from, .. }),
                    Behaviour::WrongReplies,
                ) => {
                    // Lock content that never ends: an object of u32::MAX pieces, each page
                    // well formed and continuing the last, so that only a bound on the
                    // assembly stops a fetcher from taking it all.
                    let first = from.piece;
                    let pieces = (0..15u32)
                        .map(|k| state_abstraction::locking::BasePiece {
                            index: from.index,
                            piece: first + k,
                            of: u32::MAX,
                            bytes: vec![0xA5; 64 * 1024],
                        })
                        .collect();
                    let m = Message::Lock(crate::wire::LockMessage::Base {
                        lock: *lock,
                        from: *from,
                        page: state_abstraction::locking::BasePage {
                            pieces,
                            done: false,
                        },
                    });
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::Client(ClientMessage::Reply(reply)), Behaviour::WrongReplies) => {
                    let mut reply = reply.clone();
                    reply.result = b"wrong".to_vec();
                    let m = Message::Client(ClientMessage::Reply(reply));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::Client(ClientMessage::SpecResponse(spec)), Behaviour::WrongReplies) => {
                    let mut spec = spec.clone();
                    if spec.order.body.primary == me && self.rng.chance(500) {
                        let mut order = spec.order.body.clone();
                        order.history.0[0] ^= 0x77;
                        spec.order = signer.sign(order);
                    } else {
                        spec.reply.result = b"wrong".to_vec();
                    }
                    let m = Message::Client(ClientMessage::SpecResponse(spec));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (Message::Agreement(AgreementMessage::PrePrepare(p)), Behaviour::ForkHistory)
                    if to.len() > 1 =>
                {
                    for (k, receiver) in to.iter().enumerate() {
                        let proposal = tamper::fork_history(&signer, p, k as u8);
                        let m = Message::Agreement(AgreementMessage::PrePrepare(proposal));
                        self.byzantine_send(r, vec![*receiver], &m, behaviour)?;
                    }
                }
                (
                    Message::Agreement(AgreementMessage::Checkpoint(c)),
                    Behaviour::WrongCheckpoints,
                ) => {
                    let mut wrong = c.body.service_root;
                    wrong.0[1] ^= 0x5a;
                    let m = Message::Agreement(AgreementMessage::Checkpoint(
                        tamper::checkpoint_with_root(&signer, &c.body, wrong),
                    ));
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                (
                    Message::StateTransfer(StateTransferMessage::Piece {
                        seq,
                        index,
                        piece,
                        bytes,
                    }),
                    Behaviour::WrongCheckpoints,
                ) => {
                    let mut bytes = bytes.clone();
                    bytes.push(0);
                    let m = Message::StateTransfer(StateTransferMessage::Piece {
                        seq: *seq,
                        index: *index,
                        piece: *piece,
                        bytes,
                    });
                    self.byzantine_send(r, to, &m, behaviour)?;
                }
                _ => self.byzantine_send(r, to, &message, behaviour)?,
            }
        }
        Ok(())
    }

    /// A validly signed proposal for the same view and sequence number with a different batch
    /// (variant `k` differs from variants of other `k`).
    pub(super) fn alternative_proposal(
        &mut self,
        signer: &Signer,
        p: &Proposal,
        k: u64,
        previous: &crate::wire::Digest,
    ) -> Proposal {
        let mut batch: Batch = p.batch.clone();
        let mut nondet = p.pre_prepare.body.nondet.clone();
        if k % 2 == 0 && nondet.len() == 8 && self.rng.chance(500) {
            // The same batch at another agreed time: it must not commit at both.
            nondet[0] = nondet[0].wrapping_add(1);
        } else if k % 2 == 1 {
            batch.requests.pop();
        } else if let Some(first) = batch.requests.first().cloned() {
            // The same request twice: executing it must still happen once.
            batch.requests.push(first);
        }
        tamper::repropose(signer, p, batch, nondet, Some(previous))
    }

    /// Unsolicited traffic from the Byzantine replica each tick.
    pub(super) fn byzantine_extra(&mut self, r: usize) -> Result<(), Failure> {
        let Some(base) = self.replicas[r].byzantine else {
            return Ok(());
        };
        if let Some((nv, _, deadline)) = &self.replicas[r].held_new_view {
            let held = self.view_changes_for(r, nv.body.view).len();
            if self.tick >= *deadline || held > self.config.quorum() {
                if let Some((nv, to, _)) = self.replicas[r].held_new_view.take() {
                    self.send_split_new_view(r, &nv, to)?;
                }
            }
        }
        let n = self.n() as u64;
        let behaviour = self.pick(base);
        let from = Principal::Replica(ReplicaId(r as u32));
        match behaviour {
            Behaviour::Replay if !self.replay_pool.is_empty() && self.rng.chance(300) => {
                let i = self.rng.below(self.replay_pool.len() as u64) as usize;
                let (to, frame) = self.replay_pool[i].clone();
                self.transmit(from, to, frame);
            }
            Behaviour::Flood if self.rng.chance(500) => {
                let victim = Principal::Replica(ReplicaId(
                    ((r as u64 + 1 + self.rng.below(n - 1)) % n) as u32,
                ));
                match self.rng.below(5) {
                    0 => {
                        // Garbage bytes.
                        let mut junk = vec![0u8; self.rng.range(1, 300) as usize];
                        self.rng.fill(&mut junk);
                        let mut frame = (junk.len() as u32).to_be_bytes().to_vec();
                        frame.extend_from_slice(&junk);
                        self.transmit(from, victim, frame);
                    }
                    1 => {
                        // A frame claiming to be larger than the limit: its header alone is
                        // refused (the body is never read).
                        let mut frame = ((FRAME_BYTES_MAX as u32) + 1).to_be_bytes().to_vec();
                        frame.extend_from_slice(&[0u8; 16]);
                        if crate::wire::frame_length([frame[0], frame[1], frame[2], frame[3]])
                            .is_ok()
                        {
                            panic!("oversized frame accepted");
                        }
                        self.replicas[r]
                            .auth
                            .counters
                            .oversized
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    2 => {
                        let m = Message::Agreement(AgreementMessage::FetchCommitted {
                            from: SeqNo(0),
                            to: SeqNo(u64::MAX),
                        });
                        if let Ok(frame) = self.replicas[r].auth.seal(&m, &[victim]) {
                            self.transmit(from, victim, frame);
                        }
                    }
                    3 => {
                        let m = Message::StateTransfer(StateTransferMessage::GetNode {
                            seq: SeqNo(0),
                            level: 0,
                            index: 0,
                        });
                        if let Ok(frame) = self.replicas[r].auth.seal(&m, &[victim]) {
                            self.transmit(from, victim, frame);
                        }
                    }
                    _ => {
                        // A view change for a far view: alone (not f+1) it must not move anyone.
                        let m = Message::ViewChange(ViewChangeMessage::QueryNewView {
                            view: View(u64::MAX),
                        });
                        if let Ok(frame) = self.replicas[r].auth.seal(&m, &[victim]) {
                            self.transmit(from, victim, frame);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Remembers a view change a Byzantine replica holds (a few views' worth).
    pub(super) fn hold_view_change(&mut self, r: usize, vc: Signed<ViewChange>) {
        let held = &mut self.replicas[r].view_changes_held;
        held.entry(vc.body.new_view)
            .or_default()
            .insert(vc.body.replica, vc);
        while held.len() > 4 {
            held.pop_first();
        }
    }

    pub(super) fn view_changes_for(&self, r: usize, view: View) -> Vec<Signed<ViewChange>> {
        self.replicas[r]
            .view_changes_held
            .get(&view)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A lying but well-formed view change (see [`Behaviour::StaleViewChange`]): one lie per
    /// message, chosen at random.
    pub(super) fn stale_view_change(&mut self, r: usize, honest: &ViewChange) -> ViewChange {
        let older = self.replicas[r]
            .stable_history
            .iter()
            .find(|c| c.seq < honest.stable.seq)
            .cloned();
        let lie = self.rng.below(3);
        tamper::stale_view_change(honest, older, lie, self.scenario.protocol.log_window)
    }

    /// Sends each receiver a new view for `nv`'s view built from its own 2f+1 subset of the
    /// view changes this (Byzantine) primary holds, re-signed, each valid on its own.
    pub(super) fn send_split_new_view(
        &mut self,
        r: usize,
        nv: &Signed<NewView>,
        to: Vec<Principal>,
    ) -> Result<(), Failure> {
        let Some(signer) = self.replicas[r].signer.clone() else {
            return Ok(());
        };
        let view = nv.body.view;
        let held = self.view_changes_for(r, view);
        let quorum = self.config.quorum();
        if held.len() <= quorum {
            return self.byzantine_send(
                r,
                to,
                &Message::ViewChange(ViewChangeMessage::NewView(nv.clone())),
                Behaviour::SplitNewView,
            );
        }
        self.split_new_views += 1;
        for (k, receiver) in to.into_iter().enumerate() {
            // Receiver k gets the quorum starting at offset k (wrapping): neighbours differ.
            let subset: Vec<Signed<ViewChange>> = (0..quorum)
                .map(|i| held[(k + i) % held.len()].clone())
                .collect();
            let me = ReplicaId(r as u32);
            let split = tamper::new_view_from(&signer, &self.config, view, me, subset);
            let m = Message::ViewChange(ViewChangeMessage::NewView(split));
            self.byzantine_send(r, vec![receiver], &m, Behaviour::SplitNewView)?;
        }
        Ok(())
    }
}
