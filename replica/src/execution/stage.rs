//! The execution stage: the service and the reply cache it checkpoints with, driven by the
//! core's execution actions, answering with events. Actions are performed in the order given;
//! that order is what makes the answers mean what the core expects (a checkpoint after the
//! batches before it, a read on the state every earlier batch left).

use super::transfer::{serve, Transfer};
use crate::config::ClusterConfig;
use crate::core::execution::{ExecutorCheckpoint, ReplyLimits, ReplyTable};
use crate::core::{Event, StageAction as Action};
use crate::wire::{ReplicaId, SeqNo};
use state_abstraction::Service;

pub struct Stage<S> {
    service: S,
    /// The reply cache: replicated state, in every checkpoint with the service's root.
    replies: ReplyTable,
    limits: ReplyLimits,
    /// State transfer's fetcher, while one runs.
    transfer: Option<Transfer>,
    me: ReplicaId,
    weak_quorum: usize,
    retransmit_ticks: u64,
}

impl<S: Service> Stage<S> {
    /// A stage over a service whose state is that of a checkpoint with an empty reply cache,
    /// or that the core's first actions bring to one (a restart rolls back and the core's
    /// restored cache comes with it: see [`Stage::perform`] for `Rollback`).
    pub fn new(service: S, config: &ClusterConfig, me: ReplicaId) -> Self {
        let limits = ReplyLimits::of(config);
        Stage {
            service,
            replies: ReplyTable::new(limits),
            limits,
            transfer: None,
            me,
            weak_quorum: config.weak_quorum(),
            retransmit_ticks: config.protocol.retransmit_ticks,
        }
    }

    pub fn service(&self) -> &S {
        &self.service
    }

    pub fn into_service(self) -> S {
        self.service
    }

    pub fn replies(&self) -> &ReplyTable {
        &self.replies
    }

    /// Replaces the reply cache (a restart: the one of the checkpoint the service resumes at).
    pub fn set_replies(&mut self, replies: ReplyTable) {
        self.replies = replies;
    }

    /// Performs one execution action; the answer for the core, if the action has one.
    pub fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Execute {
                seq,
                batch,
                nondet,
                speculative: _,
            } => {
                let service = &mut self.service;
                let results = self.replies.run_batch(&batch, |request| {
                    service.execute(&request.body.operation, request.body.client, &nondet, false)
                });
                let lock_events = self.service.take_lock_events();
                Some(Event::Executed {
                    seq,
                    results,
                    lock_events,
                    // Not after a null batch: padding must not feed itself (a lock frozen
                    // in its grace period keeps the work pending until agreed time passes).
                    checkpoint_work: !batch.requests.is_empty()
                        && self.service.checkpoint_work_pending(),
                })
            }
            Action::TakeCheckpoint { seq } => Some(match self.checkpoint(seq) {
                Ok(checkpoint) => Event::CheckpointTaken {
                    seq,
                    checkpoint,
                    lock_events: self.service.take_lock_events(),
                },
                Err(reason) => Event::ExecutionFailed { reason },
            }),
            Action::ExecuteLocked {
                lock,
                k,
                op,
                client,
                time_ns,
            } => {
                let result = self.service.execute_locked(lock, &op, client, time_ns);
                Some(Event::LockedExecuted { lock, k, result })
            }
            Action::LockDigest { lock } => Some(Event::LockDigest {
                lock,
                digest: self.service.lock_state_digest(lock),
            }),
            Action::LockInfos => Some(Event::LockInfos {
                locks: self.service.lock_infos(),
            }),
            Action::ServeLockBase { to, lock, from } => Some(Event::LockBaseServed {
                to,
                lock,
                from,
                page: self.service.lock_base_page(
                    lock,
                    from,
                    crate::wire::lock::LOCK_BASE_PAGE_BYTES,
                ),
            }),
            Action::InstallLockBase { lock, objects } => {
                let ok = match self.service.lock_install_base(lock, objects) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(lock = lock.0, error = %e, "lock content from a peer refused");
                        false
                    }
                };
                Some(Event::LockBaseInstalled { lock, ok })
            }
            Action::LockRestart { lock } => match self.service.lock_restart(lock) {
                Ok(()) => None,
                Err(e) => Some(Event::ExecutionFailed {
                    reason: format!("lock {} back to its activation: {e}", lock.0),
                }),
            },
            Action::Rollback { to, replies } => {
                let table = match ReplyTable::decode(&replies, self.limits) {
                    Ok(t) => t,
                    Err(e) => {
                        return Some(Event::ExecutionFailed {
                            reason: format!("reply cache of checkpoint {}: {e}", to.0),
                        })
                    }
                };
                if let Err(e) = self.service.rollback_to(to.0) {
                    return Some(Event::ExecutionFailed {
                        reason: format!("rollback to {}: {e}", to.0),
                    });
                }
                self.replies = table;
                None
            }
            Action::DiscardBefore { seq } => {
                self.service.discard_before(seq.0);
                None
            }
            Action::ExecuteReadOnly { request } => {
                let result =
                    self.service
                        .execute(&request.body.operation, request.body.client, &[], true);
                Some(Event::ReadOnlyExecuted {
                    client: request.body.client,
                    timestamp: request.body.timestamp,
                    result,
                })
            }
            Action::InstallState {
                seq,
                objects,
                object_count,
                replies,
            } => {
                let installed = ReplyTable::decode(&replies, self.limits)
                    .map_err(|e| format!("reply cache: {e}"))
                    .and_then(|table| {
                        self.service.put_objs(objects).map_err(|e| e.to_string())?;
                        // The certified state may have fewer object slots than ours.
                        self.service
                            .set_object_count(object_count)
                            .map_err(|e| e.to_string())?;
                        self.replies = table;
                        Ok(())
                    });
                Some(match installed {
                    Err(why) => Event::StateInstalled {
                        seq,
                        result: Err(why),
                    },
                    Ok(()) => match self.checkpoint(seq).inspect(|_| {
                        // A transferred state carries the lock table but not the content
                        // of locks this replica never ran (M2: it serves no entries for
                        // them; they merge through the ordered state).
                        self.service.take_lock_events();
                    }) {
                        Ok(checkpoint) => Event::StateInstalled {
                            seq,
                            result: Ok(checkpoint),
                        },
                        Err(reason) => Event::ExecutionFailed {
                            reason: format!("checkpoint after state transfer: {reason}"),
                        },
                    },
                })
            }
            Action::Serve { to, request } => {
                let answer = serve::answer(&self.service, &request);
                Some(Event::Served { to, answer })
            }
            Action::TransferStart {
                target,
                base,
                peers,
                tick,
            } => {
                let fetched = self
                    .transfer
                    .take()
                    .map(Transfer::into_fetched)
                    .unwrap_or_default();
                let mut steps = Vec::new();
                let mut transfer = Transfer::start(
                    target,
                    base,
                    self.me,
                    peers,
                    self.weak_quorum,
                    tick,
                    &mut steps,
                );
                transfer.carry(fetched);
                let bytes_fetched = transfer.bytes_fetched;
                self.transfer = Some(transfer);
                Some(Event::TransferProgress {
                    steps,
                    bytes_fetched,
                    finished: None,
                })
            }
            Action::TransferMessage {
                from,
                message,
                tick,
            } => {
                let mut steps = Vec::new();
                let (finished, bytes_fetched) = match self.transfer.as_mut() {
                    Some(t) => {
                        let finished = t.on_message(&self.service, from, message, tick, &mut steps);
                        (finished, t.bytes_fetched)
                    }
                    None => (None, 0),
                };
                if finished.is_some() {
                    self.transfer = None;
                }
                Some(Event::TransferProgress {
                    steps,
                    bytes_fetched,
                    finished: finished.map(Box::new),
                })
            }
            Action::TransferTick { tick } => {
                let mut steps = Vec::new();
                let mut bytes_fetched = 0;
                if let Some(t) = self.transfer.as_mut() {
                    t.on_tick(tick, self.retransmit_ticks, &mut steps);
                    bytes_fetched = t.bytes_fetched;
                }
                Some(Event::TransferProgress {
                    steps,
                    bytes_fetched,
                    finished: None,
                })
            }
        }
    }

    fn checkpoint(&mut self, seq: SeqNo) -> Result<ExecutorCheckpoint, String> {
        let service_root = self
            .service
            .checkpoint(seq.0)
            .map_err(|e| format!("checkpoint {}: {e}", seq.0))?;
        let replies = self.replies.encode();
        let replies_digest = ReplyTable::digest_of_encoding(&replies);
        Ok(ExecutorCheckpoint {
            service_root,
            replies,
            replies_digest,
            suspect: self.service.state_suspect(),
        })
    }
}
