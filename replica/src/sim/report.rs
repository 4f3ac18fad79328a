//! What a run reports, and how a failure names the run that replays it.

use super::*;

/// What a successful run reports.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub ticks: u64,
    /// Entries the lock holder completed under its lock (`holder.rs`).
    pub lock_entries: u64,
    /// Frozen locks the dead holder resolved when it came back (`holder_dies`).
    pub locks_resolved: u64,
    /// Locks frozen while their holder worked that it gave back itself, with a certificate
    /// (`holder_revoked`).
    pub locks_given_back: u64,
    pub completed: u64,
    pub read_only_completed: u64,
    pub view_changes: u64,
    pub state_transfers: u64,
    /// Lock contents fetched from peers after a state transfer (lock state transfer).
    pub lock_contents_fetched: u64,
    pub fetched_batches: u64,
    /// Batches of re-issued pre-prepares fetched by digest after a new view.
    pub fetched_bodies: u64,
    pub rejected_frames: u64,
    pub misbehaviour_noticed: u64,
    pub highest_executed: u64,
    pub max_view: u64,
    /// Completions on 3f+1 speculative replies.
    pub fast_completions: u64,
    pub speculated_batches: u64,
    pub rollbacks: u64,
    pub poms_sent: u64,
    pub poms_received: u64,
    /// Read-only requests the clients had to send again on the ordered path.
    pub read_only_fallbacks: u64,
    /// Commits with a bad signature that correct replicas dropped from commit certificates
    /// they were sent.
    pub stripped_commits: u64,
    /// Views that passed after the faults stopped (highest view of a correct replica at the
    /// end minus the highest at the end of the faulty phase).
    pub views_after_faults: u64,
    /// Largest frame sealed and largest WAL record encoded (bytes), to show how close a run
    /// came to [`FRAME_BYTES_MAX`] and [`RECORD_BYTES_MAX`].
    pub frame_bytes_max: u64,
    pub record_bytes_max: u64,
    /// Requests the faulty clients sent.
    pub faulty_client_requests: u64,
    /// Lying view changes sent ([`Behaviour::StaleViewChange`]).
    pub stale_view_changes: u64,
    /// New views split over different quorums ([`Behaviour::SplitNewView`]).
    pub split_new_views: u64,
    /// Times a skewed primary proposed below its own newest agreed time
    /// ([`Behaviour::SkewedTime`]).
    pub backward_proposals: u64,
    /// Ordered requests that correct replicas ran, after catching up by state transfer,
    /// with a proposed time below their newest agreed time: the clamp, carried over by the
    /// transfer, decided their time (file service).
    pub clamped_after_transfer: u64,
    /// Bytes that large writes (parts of at least half a MiB) wrote, as their clients saw
    /// them succeed (file service).
    pub large_write_bytes: u64,
    /// Checkpoints that correct replicas took after a state transfer, beyond the checkpoint
    /// they installed: each was compared with the others' (the divergence check).
    pub checkpoints_after_transfer: u64,
}

/// A checker fired (or the run did not finish).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The [`NAMED_SCENARIOS`] entry that replays the run with `seed`.
    pub scenario: &'static str,
    pub seed: u64,
    pub tick: u64,
    pub what: String,
}

impl Failure {
    /// The command that runs this scenario again, byte for byte.
    pub fn replay_command(&self) -> String {
        format!(
            "SIM_SCENARIO={} SIM_SEED={} cargo test -p replica --lib sim::tests::replay -- --ignored --nocapture",
            self.scenario, self.seed
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scenario {} seed {} failed at tick {}: {}\n  replay: {}",
            self.scenario,
            self.seed,
            self.tick,
            self.what,
            self.replay_command()
        )
    }
}

impl Sim {
    pub(super) fn report(&self) -> Result<Report, Failure> {
        let mut report = Report {
            ticks: self.tick,
            ..Default::default()
        };
        report.views_after_faults = self
            .highest_correct_view()
            .0
            .saturating_sub(self.view_at_fault_end.unwrap_or(0));
        report.frame_bytes_max = self.frame_bytes_max;
        report.record_bytes_max = self.record_bytes_max;
        report.faulty_client_requests = self.faulty_clients.iter().map(|c| c.sent).sum();
        report.stale_view_changes = self.stale_view_changes;
        report.split_new_views = self.split_new_views;
        report.checkpoints_after_transfer = self.checkpoints_after_transfer;
        report.lock_entries = self
            .clients
            .iter()
            .filter_map(|c| c.holder.as_ref())
            .map(|h| h.entries_completed)
            .sum();
        let holders = |which: fn(&holder::Holder) -> bool| {
            self.clients
                .iter()
                .filter_map(|c| c.holder.as_deref())
                .filter(|h| which(h))
                .count() as u64
        };
        report.locks_resolved = holders(|h| h.resolved);
        report.locks_given_back = holders(|h| h.given_back);
        for (i, node) in self.replicas.iter().enumerate() {
            report.rejected_frames += node.auth.counters.rejected();
            if node.byzantine.is_some() {
                if let ReplicaState::Up(r) = &node.state {
                    report.backward_proposals += r.service().backward_proposals();
                }
                continue;
            }
            if let ReplicaState::Up(r) = &node.state {
                if let Some((_, at_transfer)) = node.transferred {
                    report.clamped_after_transfer +=
                        r.service().clamped().saturating_sub(at_transfer);
                }
                let m = r.metrics();
                report.view_changes = report.view_changes.max(m.view_changes_started);
                report.state_transfers += m.state_transfers;
                report.lock_contents_fetched += m.lock_contents_fetched;
                report.fetched_batches += m.fetched_batches;
                report.fetched_bodies += m.fetched_bodies;
                report.highest_executed = report.highest_executed.max(r.last_executed().0);
                report.speculated_batches += m.speculated_batches;
                report.rollbacks += m.rollbacks;
                report.poms_received += m.poms;
                report.max_view = report.max_view.max(r.view().0);
                let _ = i;
            }
        }
        for c in &self.clients {
            report.large_write_bytes += c.fs.as_ref().map_or(0, |fs| fs.large_write_bytes);
            report.rejected_frames += c.auth.counters.rejected();
            report.fast_completions += c.client.fast_completions;
            report.read_only_fallbacks += c.client.read_only_fallbacks;
            report.poms_sent += c.client.poms_sent;
        }
        report.completed = self.checker.completed();
        report.read_only_completed = self.checker.read_only_completed();
        report.misbehaviour_noticed = self.misbehaviour_noticed;
        report.stripped_commits = self.stripped_commits;
        Ok(report)
    }
}
