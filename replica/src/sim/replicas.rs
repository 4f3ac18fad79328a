//! Correct replicas: performing their actions, persisting WAL records, crashes and restarts.

use super::*;

impl Sim {
    /// A WAL record the driver could not write (over [`RECORD_BYTES_MAX`], or refused by the
    /// encoder) or could not read back is a checker failure: the replica would stop there, or
    /// fail to restart. Reading back is `wire::decode` (see `driver::node`), which refuses
    /// anything over [`FRAME_BYTES_MAX`], a lower limit than the log's own.
    pub(super) fn check_record(&mut self, r: usize, record: &WalRecord) -> Result<(), Failure> {
        let len = match encoded_len(record) {
            Ok(len) => len,
            Err(e) => {
                return Err(self.fail(format!(
                    "wal record size: replica {r} cannot encode a {} record: {e}",
                    record_kind(record)
                )))
            }
        };
        self.record_bytes_max = self.record_bytes_max.max(len as u64);
        if len > RECORD_BYTES_MAX {
            return Err(self.fail(format!(
                "wal record size: replica {r} wrote a {} record of {len} bytes, over {RECORD_BYTES_MAX}",
                record_kind(record)
            )));
        }
        if len > FRAME_BYTES_MAX {
            return Err(self.fail(format!(
                "wal record size: replica {r} wrote a {} record of {len} bytes, which a restart cannot decode (over {FRAME_BYTES_MAX})",
                record_kind(record)
            )));
        }
        Ok(())
    }

    /// Performs a correct replica's actions (up to `cut` of them, if it crashes mid-step).
    pub(super) fn perform(&mut self, r: usize, actions: Vec<Action>) -> Result<(), Failure> {
        for action in actions {
            match action {
                Action::Persist(record) => {
                    self.check_record(r, &record)?;
                    if matches!(record, WalRecord::Snapshot(_)) {
                        self.replicas[r].wal.clear();
                    }
                    self.replicas[r].wal.push(record);
                    self.replicas[r].persisted += 1;
                }
                Action::Send { to, message } => {
                    if self.trace {
                        eprintln!("[{}] r{r} -> r{}: {}", self.tick, to.0, message.kind());
                    }
                    self.note_spoken(r, &message);
                    self.send_sealed(r, vec![Principal::Replica(to)], &message)?;
                }
                Action::Broadcast { message } => {
                    self.note_spoken(r, &message);
                    let to = self.other_replicas(r);
                    self.send_sealed(r, to, &message)?;
                }
                Action::SendClient { to, message } => {
                    if let Message::Client(ClientMessage::Reply(reply)) = &message {
                        self.checker
                            .observe_reply(r as u32, reply)
                            .map_err(|e| self.fail(e))?;
                    }
                    self.send_sealed(r, vec![Principal::Client(to)], &message)?
                }
                Action::Notify(n) => {
                    if self.trace {
                        eprintln!("[{}] r{r}: {n:?}", self.tick);
                    }
                    if let Notification::Misbehaviour { .. } = n {
                        self.misbehaviour_noticed += 1;
                    }
                    match (&n, &self.replicas[r].state) {
                        (Notification::StateTransferred { seq, .. }, ReplicaState::Up(replica)) => {
                            self.replicas[r].transferred =
                                Some((*seq, replica.service().clamped()));
                        }
                        (Notification::CheckpointTaken { seq, .. }, _)
                            if self.replicas[r].transferred.is_some_and(|(t, _)| *seq > t) =>
                        {
                            self.checkpoints_after_transfer += 1;
                        }
                        _ => {}
                    }
                    self.checker
                        .observe(r as u32, &n)
                        .map_err(|e| self.fail(e))?;
                }
                // The replica's execution stage performed these already.
                Action::Stage(_) => {}
                Action::Halt { reason } => {
                    return Err(self.fail(format!("replica {r} halted: {reason}")))
                }
            }
        }
        Ok(())
    }

    pub(super) fn note_spoken(&mut self, r: usize, message: &Message) {
        let me = ReplicaId(r as u32);
        let view = match message {
            Message::Agreement(AgreementMessage::PrePrepare(p))
                if p.pre_prepare.body.primary == me =>
            {
                Some(p.pre_prepare.body.view)
            }
            Message::Agreement(AgreementMessage::Prepare(p)) if p.body.replica == me => {
                Some(p.body.view)
            }
            Message::Agreement(AgreementMessage::Commit(c)) if c.body.replica == me => {
                Some(c.body.view)
            }
            Message::ViewChange(ViewChangeMessage::ViewChange(v)) if v.body.replica == me => {
                Some(v.body.new_view)
            }
            Message::ViewChange(ViewChangeMessage::NewView(v)) if v.body.primary == me => {
                Some(v.body.view)
            }
            _ => None,
        };
        if let Some(v) = view {
            let node = &mut self.replicas[r];
            node.max_view_spoken = node.max_view_spoken.max(v);
        }
    }

    /// Runs one event at replica `r`.
    pub(super) fn step_replica(&mut self, r: usize, event: Event) -> Result<(), Failure> {
        let ReplicaState::Up(replica) = &mut self.replicas[r].state else {
            return Ok(());
        };
        let mut actions = Vec::new();
        replica.step(event, &mut actions);
        if !replica.is_halted() && !replica.reply_caches_agree() {
            return Err(self.fail(format!(
                "replica {r}: the core's copy of the reply cache differs from the stage's"
            )));
        }
        let view = replica.view();
        if self.replicas[r].crash_pending {
            self.replicas[r].crash_pending = false;
            return self.crash(r, Some(actions));
        }
        if self.replicas[r].byzantine.is_some() {
            self.perform_byzantine(r, actions)?;
            return self.tell_persisted(r);
        }
        if view < self.replicas[r].last_view {
            return Err(self.fail(format!(
                "replica {r}: view went back from {:?} to {view:?}",
                self.replicas[r].last_view
            )));
        }
        self.replicas[r].last_view = view;
        self.perform(r, actions)?;
        self.tell_persisted(r)
    }

    /// Tells replica `r` that the records it asked for are durable (the simulator's WAL is
    /// durable as soon as a record is performed).
    fn tell_persisted(&mut self, r: usize) -> Result<(), Failure> {
        let upto = self.replicas[r].persisted;
        let ReplicaState::Up(replica) = &mut self.replicas[r].state else {
            return Ok(());
        };
        let mut actions = Vec::new();
        replica.step(Event::Persisted { upto }, &mut actions);
        if self.replicas[r].byzantine.is_some() {
            return self.perform_byzantine(r, actions);
        }
        self.perform(r, actions)
    }

    pub(super) fn crash(
        &mut self,
        r: usize,
        cut_actions: Option<Vec<Action>>,
    ) -> Result<(), Failure> {
        if let Some(actions) = cut_actions {
            // The step was interrupted: only a prefix of its actions happened.
            let mut keep = self.rng.below(actions.len() as u64 + 1) as usize;
            // A snapshot and the records that follow it are one atomic rewrite of the log
            // (see `WalRecord::Snapshot`): a cut inside the group undoes all of it.
            if matches!(actions.get(keep), Some(Action::Persist(_))) {
                let group_start = actions[..keep].iter().rposition(
                    |a| !matches!(a, Action::Persist(r) if !matches!(r, WalRecord::Snapshot(_))),
                );
                if let Some(i) = group_start {
                    if matches!(actions[i], Action::Persist(WalRecord::Snapshot(_))) {
                        keep = i;
                    }
                }
            }
            // What the replica executed in memory before dying still counts for agreement.
            for action in &actions[keep..] {
                if let Action::Notify(n) = action {
                    self.checker
                        .observe(r as u32, n)
                        .map_err(|e| self.fail(e))?;
                }
            }
            let prefix: Vec<Action> = actions.into_iter().take(keep).collect();
            self.perform(r, prefix)?;
        }
        let state = std::mem::replace(&mut self.replicas[r].state, ReplicaState::Gone);
        self.replicas[r].state = match state {
            ReplicaState::Up(replica) => match replica.into_service().after_crash() {
                Ok(service) => ReplicaState::Down(Box::new(service)),
                Err(e) => return Err(self.fail(format!("replica {r} cannot restart: {e}"))),
            },
            other => other,
        };
        Ok(())
    }

    pub(super) fn restart(&mut self, r: usize) -> Result<(), Failure> {
        let state = std::mem::replace(&mut self.replicas[r].state, ReplicaState::Gone);
        let ReplicaState::Down(service) = state else {
            self.replicas[r].state = state;
            return Ok(());
        };
        let wal = self.replicas[r].wal.clone();
        let replica = Replica::restore(self.config.clone(), &self.keys.replicas[r], *service, wal)
            .map_err(|e| self.fail(format!("replica {r} cannot restart: {e}")))?;
        if replica.view() < self.replicas[r].max_view_spoken {
            return Err(self.fail(format!(
                "replica {r} restarted in view {:?} below {:?} it had spoken in",
                replica.view(),
                self.replicas[r].max_view_spoken
            )));
        }
        let node = &mut self.replicas[r];
        node.last_view = replica.view();
        node.restarts += 1;
        node.persisted = 0;
        node.state = ReplicaState::Up(Box::new(replica));
        Ok(())
    }
}

/// The length of [`crate::wire::encode`]'s output, counted rather than built (the same
/// bincode configuration; its size limit only applies to decoding).
pub(super) fn encoded_len<T: serde::Serialize>(value: &T) -> Result<usize, String> {
    struct Counter(usize);
    impl bincode::enc::write::Writer for Counter {
        fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
            self.0 += bytes.len();
            Ok(())
        }
    }
    let mut counter = Counter(0);
    bincode::serde::encode_into_writer(value, &mut counter, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    Ok(counter.0)
}

pub(super) fn record_kind(record: &WalRecord) -> &'static str {
    match record {
        WalRecord::Snapshot(_) => "snapshot",
        WalRecord::EnteredView { .. } => "entered-view",
        WalRecord::InstalledView { .. } => "installed-view",
        WalRecord::NewViewMessage(_) => "new-view",
        WalRecord::Accepted(_) => "accepted",
        WalRecord::Prepared(_) => "prepared",
        WalRecord::CheckpointTaken { .. } => "checkpoint",
        WalRecord::Stable(_) => "stable",
        WalRecord::Lock(_) => "lock",
    }
}
