//! What a new view re-issues: the selection, slot by slot, from a quorum of valid view changes
//! (the rules and why they are safe are in the module doc of [`super`]). Pure functions: the new
//! primary and every backup run [`plan_new_view`] on the same 2f+1 view changes and must get the
//! same plan (safety rule 6).

use crate::config::ClusterConfig;
use crate::wire::{
    Batch, CheckpointCertificate, Digest, Evidence, PrePrepare, ReplicaId, SeqNo, Signed, View,
    ViewChange,
};

/// What a new view re-issues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewViewPlan {
    pub stable: CheckpointCertificate,
    /// Every sequence number from `stable.seq + 1` to the highest chosen evidence, in order:
    /// the reported pre-prepare whose content is re-issued, or `None` for a null batch.
    pub slots: Vec<(SeqNo, Option<Signed<PrePrepare>>)>,
}

impl NewViewPlan {
    /// The digest and nondet a slot's re-issued pre-prepare must carry.
    pub fn slot_content(chosen: &Option<Signed<PrePrepare>>) -> (Digest, Vec<u8>) {
        match chosen {
            Some(p) => (p.body.batch_digest, p.body.nondet.clone()),
            None => (Batch::default().digest(), Vec::new()),
        }
    }
}

/// What a proposal says, whoever proposed it in whichever view: its pre-prepare with view,
/// primary and history cleared (sequence number, batch digest and agreed value remain). A
/// re-issued proposal has the same content as the original.
pub fn proposal_content(pre_prepare: &Signed<PrePrepare>) -> PrePrepare {
    // The history digest is cleared too: a new view re-issues a batch with a history chained
    // from its own starting checkpoint, so correct replicas that accepted one batch in two
    // views report two histories for it. What runs (batch and agreed value) is the content;
    // the history only matters for a client comparing speculative replies.
    PrePrepare {
        view: View(0),
        primary: ReplicaId(0),
        history: Digest::default(),
        ..pre_prepare.body.clone()
    }
}

/// How fast evidence is grouped. Only [`FastTally::Content`] is the protocol; the other is the
/// literal reading of PROTOCOLS §2.8 ("f+1 identical order-reqs"), kept for tests that show
/// the model check catches its flaw (see the module doc of [`super`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FastTally {
    Content,
    #[cfg(test)]
    IdenticalPrePrepare,
}

/// Selects the new view's plan from a quorum of valid view changes (see the module doc of [`super`]).
/// `config` gives f, the threshold of fast evidence.
pub fn plan_new_view(config: &ClusterConfig, view_changes: &[Signed<ViewChange>]) -> NewViewPlan {
    plan_with(config.f as usize, view_changes, FastTally::Content)
}

/// The highest stable checkpoint any of the view changes proves.
fn chosen_stable(view_changes: &[Signed<ViewChange>]) -> CheckpointCertificate {
    view_changes
        .iter()
        .map(|vc| &vc.body.stable)
        .max_by_key(|c| c.seq)
        .cloned()
        .unwrap_or(CheckpointCertificate {
            seq: SeqNo(0),
            service_root: Digest::default(),
            replies_digest: Digest::default(),
            checkpoints: Vec::new(),
        })
}

/// Per view change, its evidence items for `seq`.
fn reports_for(view_changes: &[Signed<ViewChange>], seq: SeqNo) -> Vec<Vec<&Evidence>> {
    view_changes
        .iter()
        .map(|vc| vc.body.evidence.iter().filter(|e| e.seq() == seq).collect())
        .collect()
}

/// Highest sequence number with any evidence above `stable` (where a plan could end).
fn highest_reported(view_changes: &[Signed<ViewChange>], stable: SeqNo) -> SeqNo {
    view_changes
        .iter()
        .flat_map(|vc| vc.body.evidence.iter().map(|e| e.seq()))
        .max()
        .unwrap_or(stable)
        .max(stable)
}

pub(crate) fn plan_with(
    f: usize,
    view_changes: &[Signed<ViewChange>],
    tally: FastTally,
) -> NewViewPlan {
    let stable = chosen_stable(view_changes);
    plan_slots(view_changes, stable, |seq| {
        select_slot(f, &reports_for(view_changes, seq), tally)
    })
}

/// The plan from `stable`: `choose` picks each slot's proposal, from the one after the
/// checkpoint to the highest reported; slots above the last one with a candidate are left to
/// the new primary.
fn plan_slots<'a>(
    view_changes: &[Signed<ViewChange>],
    stable: CheckpointCertificate,
    mut choose: impl FnMut(SeqNo) -> Option<&'a Signed<PrePrepare>>,
) -> NewViewPlan {
    let mut slots = Vec::new();
    let mut end = 0;
    let highest = highest_reported(view_changes, stable.seq);
    let mut seq = stable.seq.next();
    while seq <= highest {
        let chosen = choose(seq);
        slots.push((seq, chosen.cloned()));
        if chosen.is_some() {
            end = slots.len();
        }
        seq = seq.next();
    }
    slots.truncate(end);
    NewViewPlan { stable, slots }
}

/// One slot's choice. `reports[i]` holds view change i's items for the slot (at most two).
fn select_slot<'a>(
    f: usize,
    reports: &[Vec<&'a Evidence>],
    tally: FastTally,
) -> Option<&'a Signed<PrePrepare>> {
    // (view, strong, pre-prepare) per candidate.
    let mut candidates: Vec<(View, bool, &Signed<PrePrepare>)> = Vec::new();
    for items in reports {
        for e in items.iter().filter(|e| e.is_strong()) {
            candidates.push((e.view(), true, e.pre_prepare()));
        }
    }
    // Fast groups: the content (or whole pre-prepare), and per view change the highest view
    // at which it reports it, with the proposal it reports there.
    struct Group<'a> {
        key: PrePrepare,
        by_reporter: Vec<(usize, View, &'a Signed<PrePrepare>)>,
    }
    let mut groups: Vec<Group<'a>> = Vec::new();
    for (reporter, items) in reports.iter().enumerate() {
        for e in items {
            let key = match tally {
                FastTally::Content => proposal_content(e.pre_prepare()),
                #[cfg(test)]
                FastTally::IdenticalPrePrepare => e.pre_prepare().body.clone(),
            };
            let index = match groups.iter().position(|g| g.key == key) {
                Some(i) => i,
                None => {
                    groups.push(Group {
                        key,
                        by_reporter: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let group = &mut groups[index];
            match group
                .by_reporter
                .iter_mut()
                .find(|(r, _, _)| *r == reporter)
            {
                Some(entry) if entry.1 < e.view() => *entry = (reporter, e.view(), e.pre_prepare()),
                Some(_) => {}
                None => group
                    .by_reporter
                    .push((reporter, e.view(), e.pre_prepare())),
            }
        }
    }
    for mut g in groups {
        if g.by_reporter.len() <= f {
            // f or fewer reports: faulty replicas alone can make them.
            continue;
        }
        g.by_reporter
            .sort_by_key(|entry| std::cmp::Reverse(entry.1));
        // At least f+1 view changes report it at this view or above, so at least one correct
        // replica accepted it at this view or above.
        let view = g.by_reporter[f].1;
        // Re-issue the highest-view copy; all copies have the same content.
        candidates.push((view, false, g.by_reporter[0].2));
    }
    let rank =
        |c: &(View, bool, &Signed<PrePrepare>)| (c.0, c.1, std::cmp::Reverse(content_bytes(c.2)));
    candidates
        .into_iter()
        .max_by(|a, b| rank(a).cmp(&rank(b)))
        .map(|c| c.2)
}

/// A canonical byte string of a proposal's content, for the last tie-break.
fn content_bytes(pre_prepare: &Signed<PrePrepare>) -> Vec<u8> {
    crate::wire::encode(&proposal_content(pre_prepare)).unwrap_or_default()
}

/// Zyzzyva's published VC3 (TOCS'09, PROTOCOLS §2.5), for tests only: start from the
/// certificate with the highest sequence number, whatever its view, then add each later
/// proposal that at least f+1 view changes report. It is unsafe (§2.6); the scenario test and
/// the model check show that it loses a completed request, which is how they show they can
/// fail. Mapping to our per-slot evidence: Zyzzyva's commit certificate covers its whole
/// prefix through the history chain, so slots up to the chosen certificate take the choosing
/// view change's own items (strong, else fast, else null); a tie on the sequence number goes
/// to the first view change in the quorum, as a naive implementation would do.
#[cfg(test)]
pub(crate) fn plan_new_view_published(
    config: &ClusterConfig,
    view_changes: &[Signed<ViewChange>],
) -> NewViewPlan {
    let f = config.f as usize;
    let stable = chosen_stable(view_changes);
    let mut best: Option<(SeqNo, usize)> = None;
    for (i, vc) in view_changes.iter().enumerate() {
        for e in vc
            .body
            .evidence
            .iter()
            .filter(|e| e.is_strong() && e.seq() > stable.seq)
        {
            if !matches!(best, Some((s, _)) if e.seq() <= s) {
                best = Some((e.seq(), i));
            }
        }
    }
    plan_slots(view_changes, stable, |seq| {
        match best {
            Some((cc_seq, i)) if seq <= cc_seq => {
                let items: Vec<&Evidence> = view_changes[i]
                    .body
                    .evidence
                    .iter()
                    .filter(|e| e.seq() == seq)
                    .collect();
                items
                    .iter()
                    .find(|e| e.is_strong())
                    .or(items.first())
                    .map(|e| e.pre_prepare())
            }
            _ => {
                // Later requests that appear in at least f+1 messages, by content.
                let reports = reports_for(view_changes, seq);
                let mut counted: Vec<(PrePrepare, usize, &Signed<PrePrepare>)> = Vec::new();
                for items in &reports {
                    let mut seen: Vec<PrePrepare> = Vec::new();
                    for e in items {
                        let key = proposal_content(e.pre_prepare());
                        if seen.contains(&key) {
                            continue;
                        }
                        seen.push(key.clone());
                        match counted.iter_mut().find(|(k, _, _)| *k == key) {
                            Some(entry) => entry.1 += 1,
                            None => counted.push((key, 1, e.pre_prepare())),
                        }
                    }
                }
                counted
                    .into_iter()
                    .filter(|(_, count, _)| *count > f)
                    .max_by_key(|(_, count, p)| (*count, std::cmp::Reverse(content_bytes(p))))
                    .map(|(_, _, p)| p)
            }
        }
    })
}
