//! The execution stage, and a replica made of the protocol core and an in-process stage
//! (profile A).
//!
//! The core ([`crate::core::Core`]) holds no service: it asks for execution with actions and
//! learns results from events (see [`crate::core::execution`]). [`Stage`] performs those
//! actions on a service and its reply cache. [`Replica`] puts the two together: each
//! execution action is performed where it stands in the core's list of actions, and its answer
//! is handed straight back to the core, whose resulting actions take the execution action's
//! place. The driver and the simulator see one list of actions to perform in order, as before.

mod stage;
pub mod transfer;

pub use stage::Stage;

use crate::config::{ClusterConfig, ReplicaSecrets};
use crate::core::{restore, Action, Core, CoreError, Event, WalRecord};
use state_abstraction::Service;
use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;

/// A replica: the protocol core with its execution stage in the same process.
pub struct Replica<S: Service> {
    core: Core,
    stage: Stage<S>,
}

impl<S: Service> Deref for Replica<S> {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

/// Tests reach into the core's state (to corrupt it, say).
#[cfg(test)]
impl<S: Service> std::ops::DerefMut for Replica<S> {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

impl<S: Service> Replica<S> {
    /// A replica with an empty write-ahead log over a fresh service.
    pub fn new(
        config: Arc<ClusterConfig>,
        secrets: &ReplicaSecrets,
        service: S,
    ) -> Result<Self, CoreError> {
        Self::restore(config, secrets, service, Vec::new())
    }

    /// A replica restarted from its durable state: the service reopened over its data, and
    /// every durable WAL record in order (see the driver contract in [`crate::core`]).
    pub fn restore(
        config: Arc<ClusterConfig>,
        secrets: &ReplicaSecrets,
        mut service: S,
        wal: Vec<WalRecord>,
    ) -> Result<Self, CoreError> {
        // Certificates inside ordered operations (a lock's release) are checked with the
        // replicas' keys, which the service does not hold.
        service.set_lock_cert_checker(Arc::new(crate::wire::LockCertVerifier::new(&config)));
        // With no snapshot in the WAL the genesis is the service's checkpoint 0.
        if !restore::wal_records_genesis(&wal) && service.checkpoints().is_empty() {
            service.checkpoint(0)?;
        }
        let policy = service.policy();
        let (core, rollback) =
            Core::restore(config.clone(), secrets, policy, wal, service.checkpoints())?;
        if let Some(seq) = rollback {
            service.rollback_to(seq.0)?;
        }
        let mut stage = Stage::new(service, &config, secrets.id);
        stage.set_replies(core.reply_cache().clone());
        Ok(Replica { core, stage })
    }

    /// Handles one event (see [`Core::step`]); execution happens here, in order.
    ///
    /// The stage must perform execution actions in the order the core asked for them, and an
    /// answer's own actions are asked after everything already in the list: so they go to the
    /// back of the queue, not in place. A failed stage halts the core, and the rest of the
    /// queue is dropped (it assumed the failed action succeeded).
    pub fn step(&mut self, event: Event, actions: &mut Vec<Action>) {
        let mut first = Vec::new();
        self.core.step(event, &mut first);
        let mut queue: VecDeque<Action> = first.into();
        while let Some(action) = queue.pop_front() {
            let Action::Stage(action) = action else {
                actions.push(action);
                continue;
            };
            let Some(answer) = self.stage.perform(action) else {
                continue;
            };
            let failed = matches!(answer, Event::ExecutionFailed { .. });
            let mut more = Vec::new();
            self.core.step(answer, &mut more);
            if failed {
                actions.extend(more.into_iter().filter(|a| !matches!(a, Action::Stage(_))));
                return;
            }
            queue.extend(more);
        }
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    pub fn service(&self) -> &S {
        self.stage.service()
    }

    /// Gives the service back (the simulator reopens it to model a crash).
    pub fn into_service(self) -> S {
        self.stage.into_service()
    }

    /// The stage's reply cache equals the core's copy (checked by the simulator).
    pub fn reply_caches_agree(&self) -> bool {
        self.stage.replies() == self.core.reply_cache()
    }
}
