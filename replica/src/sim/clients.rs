//! Correct clients (plans, completions, the triggers they set off) and faulty clients.

use super::*;

impl Sim {
    pub(super) fn client_actions(
        &mut self,
        index: usize,
        actions: Vec<ClientAction>,
    ) -> Result<(), Failure> {
        let from = Principal::Client(self.clients[index].client.id());
        for action in actions {
            let (to, message) = match action {
                ClientAction::Send { to, message } => (vec![Principal::Replica(to)], message),
                ClientAction::Broadcast { message } => (self.all_replicas(), message),
            };
            let sealed = seal_frame(&self.clients[index].auth, from, &to, &message);
            let frame = self.sealed(sealed)?;
            for receiver in to {
                self.transmit(from, receiver, frame.clone());
            }
        }
        Ok(())
    }

    /// Fires the triggered crashes whose event just happened (`fast`: a request completed
    /// on the fast path in this delivery).
    pub(super) fn fire_triggers(&mut self, fast: bool) -> Result<(), Failure> {
        for i in 0..self.scenario.triggered_crashes.len() {
            let t = self.scenario.triggered_crashes[i];
            let due = match t.when {
                Trigger::Completions(k) => self.checker.completed() >= k,
                Trigger::FastCompletion => fast,
            };
            if self.fired[i] || !due || !self.faulty_phase() {
                continue;
            }
            self.fired[i] = true;
            let victims: Vec<usize> = match t.victims {
                Victims::Primary => {
                    vec![self.highest_correct_view().primary(self.n()).0 as usize]
                }
                Victims::All => (0..self.n()).collect(),
            };
            let restart = (self.tick + t.down_ticks).min(self.scenario.fault_end_tick);
            for r in victims {
                if !matches!(self.replicas[r].state, ReplicaState::Up(_)) {
                    continue;
                }
                if self.trace {
                    eprintln!("[{}] r{r} crashes ({:?})", self.tick, t.when);
                }
                // Inside its next step (a tick at the latest), like a scheduled crash.
                self.replicas[r].crash_pending = true;
                self.scenario.crashes.push(CrashPlan {
                    replica: r as u32,
                    at: self.tick,
                    restart,
                });
            }
        }
        Ok(())
    }

    pub(super) fn complete(&mut self, index: usize, c: Completion) -> Result<(), Failure> {
        let node = &mut self.clients[index];
        let Some(h) = node.in_flight.remove(&c.id) else {
            return Err(self.fail(format!(
                "client {index} completed unknown request {:?}",
                c.id
            )));
        };
        if let (Some(fs), Some(Operation::Fs(request))) = (&mut node.fs, self.checker.operation(h))
        {
            fs.completed(request, &c.result);
        }
        self.checker
            .complete(h, self.tick, c.result, c.read_only)
            .map_err(|e| self.fail(e))
    }

    pub(super) fn client_tick(&mut self, index: usize) -> Result<(), Failure> {
        if self.clients[index].holder.is_some() {
            return self.holder_tick(index);
        }
        let tick = self.tick;
        let mut actions = Vec::new();
        let node = &mut self.clients[index];
        node.client.on_tick(&mut actions);
        if node.next < node.plan.len()
            && tick >= node.next_invoke_tick
            && (node.in_flight.len() as u64) < self.scenario.client_parallelism
            && node.client.can_invoke()
        {
            let planned = &node.plan[node.next];
            let op = match (&planned.op, &mut node.fs) {
                (Step::Kv(op), _) => Operation::Kv(op.clone()),
                (Step::Fs(step), Some(fs)) => Operation::Fs(Box::new(fs.request(*step))),
                (Step::Fs(_), None) => {
                    return Err(
                        self.fail(format!("client {index}: a file step without a file client"))
                    )
                }
            };
            match node
                .client
                .invoke(op.encode(), planned.read_only, &mut actions)
            {
                Ok(id) => {
                    let h = self.checker.invoke(HistoryEntry {
                        client: node.client.id(),
                        id,
                        op,
                        invoked: tick,
                        completed: None,
                        result: None,
                        read_only_path: false,
                    });
                    node.in_flight.insert(id, h);
                    node.next += 1;
                    node.next_invoke_tick = tick + self.rng.below(30);
                }
                Err(e) => panic!("client {index}: {e}"),
            }
        }
        self.client_actions(index, actions)
    }

    /// One tick of faulty client `c` (faulty phase only; see [`ClientFault`]).
    pub(super) fn faulty_client_tick(&mut self, c: usize) -> Result<(), Failure> {
        if self.tick < self.faulty_clients[c].next_tick {
            return Ok(());
        }
        let n = self.n();
        let primary = self.highest_correct_view().primary(n);
        let backups: Vec<Principal> = (0..n as u32)
            .map(ReplicaId)
            .filter(|r| *r != primary)
            .map(Principal::Replica)
            .collect();
        let everyone = self.all_replicas();
        let window = self.scenario.protocol.client_window;
        let node = &self.faulty_clients[c];
        let own_key = format!("faulty{}", node.id.0).into_bytes();
        let put = |value: String| KvOp::Put {
            key: own_key.clone(),
            value: value.into_bytes(),
        };
        let t = node.next_timestamp;
        // (receivers, timestamp, operation, read-only)
        let mut sends: Vec<(Vec<Principal>, u64, KvOp, bool)> = Vec::new();
        let (advance, pause) = match node.fault {
            ClientFault::SplitStale => {
                sends.push((backups, t, put(format!("stale {t}")), false));
                for later in t + 1..=t + window {
                    sends.push((
                        vec![Principal::Replica(primary)],
                        later,
                        put(format!("later {later}")),
                        false,
                    ));
                }
                (window + 1, 150)
            }
            ClientFault::ReuseTimestamp => {
                sends.push((
                    vec![Principal::Replica(primary)],
                    t,
                    put(format!("first {t}")),
                    false,
                ));
                sends.push((everyone, t, put(format!("second {t}")), false));
                (1, 40)
            }
            ClientFault::FloodReads => {
                // Every replica verifies every request's signature: this rate is already
                // several times what the correct clients send.
                for k in 0..2 {
                    let key = format!("k{}", (t + k) % self.scenario.keys.max(1)).into_bytes();
                    sends.push((everyone.clone(), t + k, KvOp::Get { key }, true));
                }
                (2, 3)
            }
        };
        let from = Principal::Client(node.id);
        for (to, timestamp, op, read_only) in sends {
            let node = &self.faulty_clients[c];
            let request = node.signer.sign(crate::wire::Request {
                client: node.id,
                timestamp: crate::wire::Timestamp(timestamp),
                operation: op.encode(),
                read_only,
            });
            let message = Message::Client(ClientMessage::Request(request));
            let sealed = seal_frame(&node.auth, from, &to, &message);
            let frame = self.sealed(sealed)?;
            for receiver in to {
                self.transmit(from, receiver, frame.clone());
            }
            self.faulty_clients[c].sent += 1;
        }
        let node = &mut self.faulty_clients[c];
        node.next_timestamp += advance;
        node.next_tick = self.tick + pause;
        Ok(())
    }
}
