//! The simulated network: loss, duplication, delay and partitions in the faulty phase, and
//! sealing and opening frames as the real driver does.

use super::*;

impl Sim {
    pub(super) fn partitioned(&self, a: Principal, b: Principal) -> bool {
        if !self.faulty_phase() {
            return false;
        }
        self.scenario.partitions.iter().any(|p| {
            let cut = Principal::Replica(ReplicaId(p.replica));
            self.tick >= p.from && self.tick < p.until && (a == cut) != (b == cut)
        })
    }

    /// Puts a frame on the network (with loss, duplication and delay in the faulty phase).
    /// Frames are shared, not copied, between the receivers and copies of one send (they
    /// are megabytes in the large-operation scenarios).
    pub(super) fn transmit(
        &mut self,
        from: Principal,
        to: Principal,
        frame: impl Into<Arc<Vec<u8>>>,
    ) {
        let body: Arc<Vec<u8>> = frame.into();
        if body.len() < FRAME_HEADER_BYTES {
            return;
        }
        if self.partitioned(from, to) {
            return;
        }
        let faulty = self.faulty_phase();
        if faulty && self.rng.chance(self.scenario.loss_per_mille) {
            return;
        }
        let copies = if faulty && self.rng.chance(self.scenario.duplicate_per_mille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay_max = if faulty {
                self.scenario.delay_max_ticks
            } else {
                self.scenario.delay_max_ticks.min(3)
            };
            let at = self.tick + self.rng.range(1, delay_max.max(1));
            self.counter += 1;
            self.queue.insert((at, self.counter), (to, body.clone()));
        }
    }

    pub(super) fn send_sealed(
        &mut self,
        from_replica: usize,
        to: Vec<Principal>,
        message: &Message,
    ) -> Result<(), Failure> {
        let from = Principal::Replica(ReplicaId(from_replica as u32));
        let sealed = seal_frame(&self.replicas[from_replica].auth, from, &to, message);
        let frame = self.sealed(sealed)?;
        for receiver in to {
            self.transmit(from, receiver, frame.clone());
        }
        Ok(())
    }

    pub(super) fn sealed(
        &mut self,
        sealed: Result<Vec<u8>, String>,
    ) -> Result<Arc<Vec<u8>>, Failure> {
        let frame = sealed.map_err(|e| self.fail(e))?;
        self.frame_bytes_max = self.frame_bytes_max.max(frame.len() as u64);
        Ok(Arc::new(frame))
    }

    pub(super) fn other_replicas(&self, me: usize) -> Vec<Principal> {
        (0..self.n())
            .filter(|r| *r != me)
            .map(|r| Principal::Replica(ReplicaId(r as u32)))
            .collect()
    }

    pub(super) fn deliver(&mut self, to: Principal, body: &[u8]) -> Result<(), Failure> {
        match to {
            Principal::Replica(r) => {
                let r = r.0 as usize;
                if !matches!(self.replicas[r].state, ReplicaState::Up(_)) {
                    return Ok(());
                }
                let Ok(message) = self.replicas[r].auth.open(body) else {
                    return Ok(());
                };
                if self.replicas[r].byzantine.is_none() {
                    self.stripped_commits += message.stripped_commits().len() as u64;
                } else if let Message::ViewChange(ViewChangeMessage::ViewChange(vc)) =
                    message.message()
                {
                    self.hold_view_change(r, vc.clone());
                }
                self.step_replica(r, Event::Message(message))
            }
            Principal::Client(c) => {
                let index = (c.0 - 100) as usize;
                let Some(node) = self.clients.get_mut(index) else {
                    return Ok(());
                };
                let Ok(message) = node.auth.open(body) else {
                    return Ok(());
                };
                if node.holder.is_some() {
                    if matches!(message.message(), Message::Lock(_)) {
                        return self.holder_message(index, message);
                    }
                    let mut actions = Vec::new();
                    let mut completed = Vec::new();
                    node.client
                        .on_message(message, &mut actions, &mut completed);
                    self.client_actions(index, actions)?;
                    for c in completed {
                        self.holder_complete(index, c)?;
                    }
                    return Ok(());
                }
                let mut actions = Vec::new();
                let mut completed = Vec::new();
                let fast_before = node.client.fast_completions;
                node.client
                    .on_message(message, &mut actions, &mut completed);
                let fast = node.client.fast_completions > fast_before;
                self.client_actions(index, actions)?;
                for c in completed {
                    self.complete(index, c)?;
                }
                self.fire_triggers(fast)
            }
        }
    }

    pub(super) fn all_replicas(&self) -> Vec<Principal> {
        (0..self.n())
            .map(|r| Principal::Replica(ReplicaId(r as u32)))
            .collect()
    }
}

/// Seals a message as the real driver would. A message the driver could not send (over
/// [`FRAME_BYTES_MAX`] once framed) is a checker failure, not a panic: on a real network it
/// never arrives, and if every peer needs it (a view change) the cluster stops for good.
pub(super) fn seal_frame(
    auth: &Authenticator,
    from: Principal,
    to: &[Principal],
    message: &Message,
) -> Result<Vec<u8>, String> {
    let frame = auth.seal(message, to).map_err(|e| {
        format!(
            "frame size: {from:?} cannot send a {} to {} receiver(s): {e} (limit {FRAME_BYTES_MAX} bytes)",
            message.kind(),
            to.len()
        )
    })?;
    if frame.len() > FRAME_BYTES_MAX + FRAME_HEADER_BYTES {
        return Err(format!(
            "frame size: {from:?} sealed a {} frame of {} bytes, over {FRAME_BYTES_MAX}",
            message.kind(),
            frame.len()
        ));
    }
    Ok(frame)
}
