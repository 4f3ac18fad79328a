//! What a replica must remember across a crash: the records it appends to its write-ahead log
//! ([`WalRecord`]), the state a snapshot captures ([`DurableState`]), and the checkpoints it took
//! ([`OwnCheckpoint`]). `restore.rs` reads them back after a restart.

use super::view_change::Genesis;
use super::{Action, Core};
use crate::wire::{
    CheckpointCertificate, Digest, NewView, PrePrepare, PreparedCertificate, Proposal, SeqNo,
    Signed, View,
};
use serde::{Deserialize, Serialize};

/// A checkpoint this replica took, with its reply cache (needed to roll back to it, to serve
/// it, and to restart from it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnCheckpoint {
    pub seq: SeqNo,
    pub service_root: Digest,
    pub replies: Vec<u8>,
    pub replies_digest: Digest,
}

/// Everything a replica must remember across a crash (see [`super::safety`] rule 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableState {
    pub genesis: Genesis,
    pub view: View,
    pub view_active: bool,
    pub stable: CheckpointCertificate,
    pub checkpoints: Vec<OwnCheckpoint>,
    /// The pre-prepares this replica accepted (its votes). Their batches are not in this
    /// record, which must stay bounded whatever the requests' sizes: they follow it as
    /// [`WalRecord::Accepted`] records (see [`WalRecord::Snapshot`]).
    pub accepted: Vec<Signed<PrePrepare>>,
    pub prepared: Vec<PreparedCertificate>,
    /// The new-view message that installed `view`, kept so a restarted replica can still hand
    /// it to replicas that missed it.
    #[serde(default)]
    pub new_view: Option<Signed<NewView>>,
}

/// One WAL record. Encode with [`crate::wire::encode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalRecord {
    /// Supersedes all earlier records. The core follows it, in the same step and with no
    /// other action between, by one [`WalRecord::Accepted`] per batch the state refers to;
    /// the driver must write the snapshot and those records as the new log atomically (every
    /// `Persist` that immediately follows a snapshot belongs to it). A record's size is thus
    /// bounded by one batch, not by the log.
    Snapshot(Box<DurableState>),
    /// About to send a view change for `view`.
    EnteredView { view: View },
    /// Installed the new view `view` (normal operation in it).
    InstalledView { view: View },
    /// The new-view message just installed (kept to relay after a restart).
    NewViewMessage(Box<Signed<NewView>>),
    /// Accepted (backup) or proposed (primary) this proposal in its view.
    Accepted(Box<Proposal>),
    /// Prepared: about to send a commit.
    Prepared(Box<PreparedCertificate>),
    /// Took a checkpoint (service checkpoint `seq` plus this reply cache).
    CheckpointTaken {
        seq: SeqNo,
        service_root: Digest,
        replies: Vec<u8>,
    },
    /// A checkpoint became stable.
    Stable(Box<CheckpointCertificate>),
    /// Zzyzx's log servers: a lock's activation, entries, seal, freeze and merge. A snapshot
    /// is followed by the records of every live log.
    Lock(super::lock::LockRecord),
}

impl Core {
    /// What a snapshot records (see [`DurableState`]).
    pub fn durable_state(&self) -> DurableState {
        DurableState {
            genesis: self.genesis,
            view: self.view,
            view_active: self.view_active,
            stable: self.stable.clone(),
            checkpoints: self.own_checkpoints.values().cloned().collect(),
            accepted: self
                .log
                .values()
                .filter_map(|s| s.proposal.as_ref().map(|p| p.pre_prepare.clone()))
                .collect(),
            prepared: self
                .log
                .values()
                .filter_map(|s| s.certificate.clone())
                .collect(),
            new_view: self.new_view_message.clone(),
        }
    }

    /// Persists a snapshot of the durable state followed by its checkpoints and the batches
    /// it refers to (the accepted proposals' and the certified ones'), each in a record of its
    /// own, so that no record grows with the log or with the requests' sizes.
    pub(super) fn persist_snapshot(&self, actions: &mut Vec<Action>) {
        // Each checkpoint carries a reply cache of up to `REPLIES_BYTES_TOTAL`: one record each.
        let mut state = self.durable_state();
        let checkpoints = std::mem::take(&mut state.checkpoints);
        actions.push(Action::Persist(WalRecord::Snapshot(Box::new(state))));
        for c in checkpoints {
            actions.push(Action::Persist(WalRecord::CheckpointTaken {
                seq: c.seq,
                service_root: c.service_root,
                replies: c.replies,
            }));
        }
        for slot in self.log.values() {
            if let (Some(c), Some(batch)) = (&slot.certificate, &slot.certified_batch) {
                let same = slot
                    .proposal
                    .as_ref()
                    .is_some_and(|p| p.pre_prepare == c.pre_prepare);
                if !same {
                    actions.push(Action::Persist(WalRecord::Accepted(Box::new(Proposal {
                        pre_prepare: c.pre_prepare.clone(),
                        batch: batch.clone(),
                    }))));
                }
            }
            if let Some(p) = &slot.proposal {
                actions.push(Action::Persist(WalRecord::Accepted(Box::new(p.clone()))));
            }
        }
        for r in self.locks.snapshot_records() {
            actions.push(Action::Persist(WalRecord::Lock(r)));
        }
    }
}
