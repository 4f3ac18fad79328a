//! Execution as actions: the core asks the execution stage to run batches, take checkpoints,
//! roll back and install transferred state, and learns the results from the stage's answers.
//!
//! The core changes its own state when it asks (which batches ran, where the service stands),
//! because that never depends on the results; what does (replies, checkpoint votes, the check
//! of a transferred state) waits for the answer. The stage answers in the order it was asked,
//! so the answers are matched to `in_flight` first in, first out. A rollback makes every
//! answer still in flight about undone state: those are dropped.

use super::execution::{ExecutedRequest, ExecutorCheckpoint, ReplyTable};
use super::invariants::invariant;
use super::{Action, Core, InFlight, InFlightKind, StageAction};
use crate::wire::{
    Batch, ClientMessage, Message, PrePrepare, Proposal, Reply, SeqNo, Signed, SpecResponse,
    Timestamp, View,
};
use state_abstraction::ClientId;

/// What the core needs back from a batch's answer.
#[derive(Clone, Debug)]
pub(super) struct AskedBatch {
    pub batch: Batch,
    pub order: Signed<PrePrepare>,
}

impl Core {
    /// Asks the stage to run the batch at `seq` (the next one after the service's position).
    pub(super) fn ask_execute(
        &mut self,
        seq: SeqNo,
        proposal: &Proposal,
        speculative: bool,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::Stage(StageAction::Execute {
            seq,
            batch: proposal.batch.clone(),
            nondet: proposal.pre_prepare.body.nondet.clone(),
            speculative,
        }));
        self.in_flight.push_back(InFlight {
            what: InFlightKind::Batch {
                seq,
                speculative,
                view: self.view,
                committed: false,
                asked: Box::new(AskedBatch {
                    batch: proposal.batch.clone(),
                    order: proposal.pre_prepare.clone(),
                }),
            },
            undone: false,
        });
    }

    /// A speculative batch whose results have not come back committed: they go out as
    /// committed replies too when they do.
    pub(super) fn commit_when_executed(&mut self, seq: SeqNo) {
        let found = self
            .in_flight
            .iter_mut()
            .rev()
            .find_map(|f| match &mut f.what {
                InFlightKind::Batch {
                    seq: s,
                    speculative: true,
                    committed,
                    ..
                } if *s == seq && !f.undone => Some(committed),
                _ => None,
            });
        match found {
            Some(committed) => *committed = true,
            None => panic!(
                "replica {}: {seq:?} ran speculatively with no results and none in flight",
                self.id.0
            ),
        }
    }

    /// Asks the stage to checkpoint at `seq`.
    pub(super) fn ask_checkpoint(&mut self, seq: SeqNo, actions: &mut Vec<Action>) {
        actions.push(Action::Stage(StageAction::TakeCheckpoint { seq }));
        self.in_flight.push_back(InFlight {
            what: InFlightKind::Checkpoint { seq },
            undone: false,
        });
    }

    /// Asks the stage to go back to our checkpoint `to`, whose reply cache is `replies` (its
    /// encoding) and `table` (decoded); whatever is still in flight is undone by it.
    pub(super) fn ask_rollback(
        &mut self,
        to: SeqNo,
        replies: Vec<u8>,
        table: ReplyTable,
        actions: &mut Vec<Action>,
    ) {
        for f in self.in_flight.iter_mut() {
            // Reads of the live state asked before the rollback, and answers about
            // checkpoints, are not affected by it.
            // Nor are locked entries: the lock's objects are not the ordered state's.
            if !matches!(
                f.what,
                InFlightKind::ReadOnly
                    | InFlightKind::Serve
                    | InFlightKind::Locked { .. }
                    | InFlightKind::LockDigest { .. }
                    | InFlightKind::LockInfos
                    | InFlightKind::ServeLockBase
                    | InFlightKind::InstallLockBase
            ) {
                f.undone = true;
            }
        }
        self.replies = table;
        actions.push(Action::Stage(StageAction::Rollback { to, replies }));
    }

    /// Asks the stage to run a read-only request on the state as it stands.
    pub(super) fn ask_read_only(
        &mut self,
        request: Signed<crate::wire::Request>,
        actions: &mut Vec<Action>,
    ) {
        self.metrics.read_only_requests += 1;
        actions.push(Action::Stage(StageAction::ExecuteReadOnly { request }));
        self.in_flight.push_back(InFlight {
            what: InFlightKind::ReadOnly,
            undone: false,
        });
    }

    pub(super) fn push_in_flight(&mut self, what: InFlightKind) {
        self.in_flight.push_back(InFlight {
            what,
            undone: false,
        });
    }

    /// The answer to an action that carries nothing back but its kind: checks that kind and
    /// says whether a rollback undid it.
    pub(super) fn answered_plain(&mut self, what: &str, kind: fn(&InFlightKind) -> bool) -> bool {
        let f = self.answered(what);
        assert!(
            kind(&f.what),
            "replica {}: a {what} answer answers another action",
            self.id.0
        );
        f.undone
    }

    pub(super) fn answered(&mut self, what: &str) -> InFlight {
        match self.in_flight.pop_front() {
            Some(f) => f,
            None => panic!(
                "replica {}: an execution answer ({what}) with nothing in flight",
                self.id.0
            ),
        }
    }

    /// A batch's results.
    pub(super) fn on_executed(
        &mut self,
        seq: SeqNo,
        results: Vec<ExecutedRequest>,
        lock_events: Vec<state_abstraction::LockEvent>,
        actions: &mut Vec<Action>,
    ) {
        let f = self.answered("executed");
        let InFlightKind::Batch {
            seq: asked_seq,
            speculative,
            view,
            committed,
            asked,
        } = f.what
        else {
            panic!(
                "replica {}: results of {seq:?} answer another action",
                self.id.0
            );
        };
        assert_eq!(
            asked_seq,
            seq,
            "replica {}: results out of order (still in flight: {:?})",
            self.id.0,
            self.in_flight
                .iter()
                .map(|f| (format!("{:?}", std::mem::discriminant(&f.what)), f.undone))
                .collect::<Vec<_>>()
        );
        if f.undone {
            // Its lock events come again when the batch is run again.
            return;
        }
        // A freeze from a speculative run stays even if the run is undone (L3): a lock
        // stopped early only costs its holder a release.
        self.on_lock_events(lock_events, actions);
        self.replies.record_results(&asked.batch, &results);
        if speculative {
            for r in &results {
                self.spec_keys.insert((r.client, r.timestamp), seq);
                let reply = self.reply_in(view, r.client, r.timestamp, r.result.clone());
                let message = SpecResponse {
                    reply,
                    order: asked.order.clone(),
                };
                actions.push(Action::SendClient {
                    to: r.client,
                    message: Message::Client(ClientMessage::SpecResponse(Box::new(message))),
                });
            }
            if let Some(spec) = self.log.get_mut(&seq).and_then(|s| s.executed.as_mut()) {
                if spec.order == asked.order {
                    spec.results = Some(results.clone());
                }
            }
            if !committed {
                return;
            }
        }
        self.send_committed_replies(view, &asked.batch, results, actions);
    }

    /// Replies for a committed batch, and the watched requests it answered forgotten.
    pub(super) fn send_committed_replies(
        &mut self,
        view: View,
        batch: &Batch,
        results: Vec<ExecutedRequest>,
        actions: &mut Vec<Action>,
    ) {
        if !batch.requests.is_empty() {
            self.forget_answered_waiting(self.spec_executed > self.last_executed);
        }
        for r in results {
            let reply = self.reply_in(view, r.client, r.timestamp, r.result);
            actions.push(Action::SendClient {
                to: r.client,
                message: Message::Client(ClientMessage::Reply(reply)),
            });
        }
    }

    fn reply_in(
        &self,
        view: View,
        client: ClientId,
        timestamp: Timestamp,
        result: Vec<u8>,
    ) -> Reply {
        Reply {
            view,
            client,
            timestamp,
            replica: self.id,
            read_only: false,
            result,
        }
    }

    /// A checkpoint the stage took.
    pub(super) fn on_checkpoint_taken(
        &mut self,
        seq: SeqNo,
        checkpoint: ExecutorCheckpoint,
        lock_events: Vec<state_abstraction::LockEvent>,
        actions: &mut Vec<Action>,
    ) {
        let f = self.answered("checkpoint");
        let InFlightKind::Checkpoint { seq: asked } = f.what else {
            panic!(
                "replica {}: checkpoint {seq:?} answers another action",
                self.id.0
            );
        };
        assert_eq!(
            asked, seq,
            "replica {}: checkpoints out of order",
            self.id.0
        );
        if f.undone {
            return;
        }
        // Checkpoints are taken on committed state, so these events are final: a lock
        // activated here is activated at every correct replica at this checkpoint.
        self.on_lock_events(lock_events, actions);
        let mut checkpoint = checkpoint;
        if std::mem::take(&mut self.locks.merged_short) {
            checkpoint.suspect = true;
        }
        if seq < self.stable.seq {
            // A newer checkpoint became stable meanwhile: this one is of no use any more.
            return;
        }
        invariant!(
            seq <= self.last_executed,
            "replica {}: checkpoint {seq:?} above the committed {:?}",
            self.id.0,
            self.last_executed
        );
        self.vote_checkpoint(seq, checkpoint, actions);
    }

    /// A read-only request's result.
    pub(super) fn on_read_only_executed(
        &mut self,
        client: ClientId,
        timestamp: Timestamp,
        result: Vec<u8>,
        actions: &mut Vec<Action>,
    ) {
        self.answered_plain("read-only", |k| matches!(k, InFlightKind::ReadOnly));
        let mut reply = self.reply_in(self.view, client, timestamp, result);
        reply.read_only = true;
        actions.push(Action::SendClient {
            to: client,
            message: Message::Client(ClientMessage::Reply(reply)),
        });
    }

    /// A transferred state installed (or refused) by the stage.
    pub(super) fn on_state_installed(
        &mut self,
        seq: SeqNo,
        result: Result<ExecutorCheckpoint, String>,
        actions: &mut Vec<Action>,
    ) {
        let f = self.answered("install");
        let InFlightKind::Install { target, base } = f.what else {
            panic!(
                "replica {}: install of {seq:?} answers another action",
                self.id.0
            );
        };
        assert_eq!(
            target.seq, seq,
            "replica {}: installs out of order",
            self.id.0
        );
        if f.undone {
            return;
        }
        let installed = result.is_ok();
        if installed {
            self.suspect = false;
        }
        self.check_installed(target, base, result, actions);
        if installed {
            self.check_locks_after_transfer(actions);
        }
    }
}
