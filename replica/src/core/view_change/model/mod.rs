//! Exhaustive model check of the view-change selection (PROTOCOLS §2.9 "Tests", §7.2 item 3).
//!
//! What is modelled: n = 4 replicas, f = 1, one of them Byzantine; a few views run one after
//! the other (4 in CI), each on a few sequence numbers ("slots", 2), each holding one of
//! three values: the null batch, *a* or *b*. The search explores every schedule of the model;
//! at every view change it builds real signed [`ViewChange`] messages from what each replica
//! reports, checks them with the real [`valid_view_change`] / [`valid_quorum`] and computes the
//! next view's plan with the rule under test (the real [`plan_new_view`], or a test-only
//! variant). The plan, mapped back to values, is what the next view's primary must re-issue.
//!
//! In each view v (primary = v mod 4), per slot:
//! - a **correct primary** re-issues the plan's value at slots the plan covers and proposes
//!   *a*, *b* or nothing at the others; it accepts its own proposal. A **Byzantine primary**
//!   signs every value (it may use any later) and sends each correct replica any value it
//!   allows: the plan's at covered slots (correct replicas check the new view), any otherwise.
//!   As the new primary it may also build different new views from different valid quorums
//!   and send each correct replica its own, so a correct replica may accept the value of any
//!   plan the view change allows ([`merge`]).
//! - **asynchrony**: any subset of correct replicas accepts (at most one value per view and
//!   slot: the one the primary sent it). Accepting means sending a signed prepare.
//! - a **prepared certificate** for x in v exists when the primary signed x and 2f backups
//!   signed prepares for it: correct backups that accepted x, plus the Byzantine replica when
//!   it is a backup (it signs prepares for anything). Any subset of the correct acceptors of x
//!   collects one (they are *prepared*).
//! - **completion**: *fast* when every correct replica accepted the same x (with the faulty
//!   one's reply, 3f+1 matching speculative responses); *slow* (committed: 2f+1 commits) when
//!   at least f+1 correct replicas are prepared for x — the faulty one may add its commit, and
//!   a committed request needs f+1 correct prepared replicas anyway.
//!
//! When the plan leaves a slot free, correct replicas may forget what they had there (the
//! core voids old-view proposals above the plan): each keeps its report, drops its accepted
//! proposal, or drops everything.
//!
//! At each view change any 2f+1 replicas form the quorum. A correct replica reports, per slot,
//! its highest-view certificate and its highest-view acceptance when that is of a higher view
//! (the format of the module doc of `view_change`). The Byzantine replica reports anything it
//! can present: any certificate that exists, and any pre-prepare a primary signed (its own for
//! any value), in the valid layout; it cannot forge signatures, so nothing else.
//!
//! Property (checked on every plan): a value completed at a slot is in every later plan at that
//! slot — never another value, never a null (unless the null itself completed), never left
//! out — and no slot ever completes two values. Plans are indexed by sequence number and must
//! be contiguous, so completed slots also keep their order.
//!
//! The search is breadth-first by view, and deduplicates what the future can depend on: each
//! correct replica's report, the certificates and pre-prepares the faulty replica can show,
//! and what completed. Plans are memoised by the quorum's reports. Concrete messages use real
//! Ed25519 signatures (made once per statement); signature checking itself is the verifier's
//! job and is exercised by the scenario test in `abraham`.

mod concrete;
mod search;
mod tests;

use super::*;
use crate::config::ClusterConfig;
use crate::wire::{
    Batch, Digest, Evidence, PrePrepare, Prepare, PreparedCertificate, ReplicaId, Request, SeqNo,
    Signed, Signer, Timestamp, View, ViewChange,
};
use concrete::Concrete;
use state_abstraction::ClientId;
use std::collections::{HashMap, HashSet};

const N: usize = 4;
const F: usize = 1;
/// Values: the null batch, a, b.
const VALUES: u8 = 3;
const NULL: u8 = 0;
const A: u8 = 1;
const B: u8 = 2;
/// Bit masks over (view, value) are `u32`s: room for 10 views of 3 values; the search itself
/// stops being practical well before that (see [`model_check_exhaustive`]).
const MAX_VIEWS: usize = 10;
/// Sequence numbers the concrete messages cover (tracked slots plus one above them).
const MAX_SLOTS: usize = 3;

const GENESIS: Genesis = Genesis {
    service_root: Digest([3; 32]),
    replies_digest: Digest([4; 32]),
};

/// One evidence item, abstractly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Item {
    view: u8,
    value: u8,
}

/// What one view change says about one slot: a strong item, then a fast one of a higher view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Report {
    strong: Option<Item>,
    fast: Option<Item>,
}

/// Everything about one slot the future can depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Slot {
    /// The reports of the correct replicas (the faulty one's entry stays empty).
    reports: [Report; N],
    /// (view, value) pairs with a prepared certificate.
    certificates: u32,
    /// (view, value) pairs whose pre-prepare the view's primary signed.
    signed: u32,
    /// The value that completed here, if any.
    completed: Option<u8>,
}

/// The tracked slots (sequence numbers 1, 2, ...).
type World = Vec<Slot>;

/// A plan's slot: left free for the new primary, or a value to re-issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Planned {
    Free,
    Value(u8),
    /// Only for a faulty new primary, which may send different correct replicas new-view
    /// messages built from different valid quorums: a correct replica accepts the value of
    /// whichever plan it received, so any value in this mask.
    OneOf(u8),
}

/// What correct replicas may accept under any of `plans` (the new views a faulty primary can
/// build from different quorums).
fn merge(plans: &[Plan]) -> Plan {
    let slots = plans.first().map_or(0, |p| p.len());
    (0..slots)
        .map(|i| {
            let mut mask = 0u8;
            for plan in plans {
                match plan[i] {
                    Planned::Free => return Planned::Free,
                    Planned::Value(x) => mask |= 1 << x,
                    Planned::OneOf(m) => mask |= m,
                }
            }
            if mask.count_ones() == 1 {
                Planned::Value(mask.trailing_zeros() as u8)
            } else {
                Planned::OneOf(mask)
            }
        })
        .collect()
}

type Plan = Vec<Planned>;

/// A view change's inputs: per member (replica, per tracked slot report), and whether a slot
/// above the tracked ones holds a candidate (see [`Bounds::higher_slot`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Quorum {
    members: Vec<(u8, Vec<Report>)>,
    higher_slot: bool,
}

/// What a search covers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bounds {
    /// Views run (plans are computed for views 1..=views).
    pub views: usize,
    /// Slots tracked in full, jointly (sequence numbers 1..=slots).
    pub slots: usize,
    /// The Byzantine replica.
    pub faulty: usize,
    /// Whether every view change may also see a candidate at a slot above the tracked ones
    /// (the only way a higher slot influences a lower one; see `check`).
    pub higher_slot: bool,
}

fn bit(view: u8, value: u8) -> u32 {
    debug_assert!((view as usize) < MAX_VIEWS && value < VALUES);
    1 << (view as u32 * VALUES as u32 + value as u32)
}

fn items(mask: u32) -> impl Iterator<Item = Item> {
    (0..MAX_VIEWS as u8)
        .flat_map(|view| (0..VALUES).map(move |value| Item { view, value }))
        .filter(move |i| mask & bit(i.view, i.value) != 0)
}

fn value_name(value: u8) -> &'static str {
    ["null", "a", "b"][value as usize]
}

/// The rule under test.
pub(super) type Rule = fn(&ClusterConfig, &[Signed<ViewChange>]) -> NewViewPlan;

fn literal_tally(config: &ClusterConfig, view_changes: &[Signed<ViewChange>]) -> NewViewPlan {
    plan_with(
        config.f as usize,
        view_changes,
        FastTally::IdenticalPrePrepare,
    )
}

/// How one step of the search came about, for printing a counterexample.
#[derive(Clone, Debug)]
struct Step {
    parent: Option<usize>,
    /// The world after running `view` under the previous plan.
    view: u8,
    world: World,
    /// The quorum and plan of the view change to `view + 1`.
    quorum: Quorum,
    plan: Plan,
}

#[derive(Debug, Default)]
pub(super) struct Stats {
    /// Per view: distinct (world, plan) pairs that start it.
    pub starts: Vec<usize>,
    /// Per view: distinct worlds after running it.
    pub worlds: Vec<usize>,
    /// Per view: how many of those hold a completed value (what the property is about).
    pub with_completion: Vec<usize>,
    /// View changes examined (quorum and faulty report combinations).
    pub view_changes: u64,
    /// Calls of the rule on real messages (distinct quorum reports).
    pub plans_computed: usize,
}

pub(super) struct Outcome {
    pub stats: Stats,
    pub violation: Option<String>,
}

struct Search {
    rule: Rule,
    bounds: Bounds,
    concrete: Concrete,
    memo: HashMap<Quorum, Plan>,
    steps: Vec<Step>,
    stats: Stats,
}

/// Every subset of `mask`.
fn subsets(mask: u8) -> impl Iterator<Item = u8> {
    (0..=mask).filter(move |s| s & !mask == 0)
}

/// Every combination of one choice per position.
fn product<T: Clone>(choices: &[Vec<T>]) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = vec![Vec::new()];
    for options in choices {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                options.iter().map(move |o| {
                    let mut v = prefix.clone();
                    v.push(o.clone());
                    v
                })
            })
            .collect();
    }
    out
}

fn violated(world: &World, plan: &Plan) -> bool {
    world
        .iter()
        .zip(plan)
        .any(|(s, p)| s.completed.is_some_and(|x| *p != Planned::Value(x)))
}

/// Explores every schedule within `bounds`, checking every plan `rule` makes. Stops at the
/// first violation.
///
/// Slots interact in only two ways: a view change's quorum is shared, and a slot with a
/// candidate makes the plan cover every slot below it (a free slot becomes a null batch).
/// Everything else — proposals, acceptances, certificates, completions, the faulty replica's
/// reports and the per-slot choice — is per slot. So with `higher_slot`, the search over
/// `slots` tracked slots, in which each view change may independently choose its quorum and
/// may or may not see a candidate above them, includes every behaviour those slots can have
/// in a log of any length. The choice at a slot does not depend on its sequence number
/// either, so one slot checked this way stands for every slot of a 2-slot (or longer) log:
/// the lower one (a candidate may sit above it) and the upper one (none does). The premise is asserted on every quorum the search meets (see [`Search::plan`]). A
/// joint search over two slots (`slots: 2`) is available too, but its state space is the
/// square of one slot's, so it runs only for few views in `model_check_exhaustive`; CI runs
/// seeded random schedules over two slots jointly instead ([`random_schedules`]).
pub(super) fn check(rule: Rule, bounds: Bounds) -> Outcome {
    let mut search = Search::new(rule, bounds);
    let views = bounds.views;
    // (world, plan) starting the view -> the step that led there.
    let mut frontier: HashMap<(World, Plan), Option<usize>> = HashMap::new();
    frontier.insert(
        (
            vec![Slot::default(); bounds.slots],
            vec![Planned::Free; bounds.slots],
        ),
        None,
    );
    for view in 0..views as u8 {
        search.stats.starts.push(frontier.len());
        // Run the view from every start; keep one history per resulting world.
        let mut worlds: HashMap<World, Option<usize>> = HashMap::new();
        let mut starts: Vec<_> = frontier.into_iter().collect();
        // Deterministic order, so a counterexample is the same on every run.
        starts.sort_by(|a, b| a.0.cmp(&b.0));
        for ((world, plan), step) in starts {
            for (w, conflict) in search.run_view(&world, view, &plan) {
                if conflict {
                    let text = search.describe(step, None);
                    return Outcome {
                        stats: search.stats,
                        violation: Some(format!(
                            "two values completed at one slot in view {view}\n{text}"
                        )),
                    };
                }
                worlds.entry(w).or_insert(step);
            }
        }
        search.stats.worlds.push(worlds.len());
        search.stats.with_completion.push(
            worlds
                .keys()
                .filter(|w| w.iter().any(|s| s.completed.is_some()))
                .count(),
        );
        let mut worlds: Vec<_> = worlds.into_iter().collect();
        worlds.sort_by(|a, b| a.0.cmp(&b.0));
        let mut next: HashMap<(World, Plan), Option<usize>> = HashMap::new();
        for (world, step) in worlds {
            let mut seen: HashSet<Plan> = HashSet::new();
            let mut seen_steps: Vec<usize> = Vec::new();
            for quorum in search.quorums(&world) {
                search.stats.view_changes += 1;
                let plan = search.plan(view + 1, &quorum);
                if violated(&world, &plan) {
                    let violation = search.dropped(step, view, &world, &quorum, &plan);
                    return Outcome {
                        stats: search.stats,
                        violation: Some(violation),
                    };
                }
                if view + 1 < views as u8 && seen.insert(plan.clone()) {
                    seen_steps.push(search.record(step, view, &world, quorum, &plan));
                }
            }
            if (view as usize + 1) % N == bounds.faulty {
                // A faulty new primary can hand out any of these plans, to each correct replica
                // its own.
                let mut plans: Vec<Plan> = seen.into_iter().collect();
                plans.sort();
                if let Some(&last) = seen_steps.last() {
                    let merged = merge(&plans);
                    search.steps[last].plan = merged.clone();
                    next.entry((world.clone(), merged)).or_insert(Some(last));
                }
            } else {
                for i in seen_steps {
                    let plan = search.steps[i].plan.clone();
                    next.entry((world.clone(), plan)).or_insert(Some(i));
                }
            }
        }
        frontier = next;
    }
    Outcome {
        stats: search.stats,
        violation: None,
    }
}

/// Seeded random schedules through the same model, with `bounds.slots` slots tracked jointly
/// (the shared quorum and the plan's extent exactly as they are), for more views than the
/// exhaustive joint search reaches. A complement to [`check`], not a proof. Returns the first
/// violation, with the seed and walk that found it.
pub(super) fn random_schedules(
    rule: Rule,
    bounds: Bounds,
    walks: usize,
    seed: u64,
) -> Option<String> {
    let mut search = Search::new(rule, bounds);
    let mut rng = crate::rng::Rng::new(seed);
    let mut pick = |len: usize| -> usize { rng.below(len as u64) as usize };
    for walk in 0..walks {
        let mut world = vec![Slot::default(); bounds.slots];
        let mut plan = vec![Planned::Free; bounds.slots];
        let mut step = None;
        for view in 0..bounds.views as u8 {
            let mut next = Vec::new();
            for (slot, planned) in world.iter().zip(&plan) {
                let outcomes = search.run_slot(slot, view, *planned);
                let (s, conflict) = outcomes[pick(outcomes.len())];
                if conflict {
                    return Some(format!(
                        "seed {seed} walk {walk}: two values completed at one slot\n{}",
                        search.describe(step, None)
                    ));
                }
                next.push(s);
            }
            world = next;
            let quorums = search.quorums(&world);
            // A faulty new primary may hand out new views from two quorums.
            let faulty_primary = (view as usize + 1) % N == bounds.faulty;
            let mut plans = Vec::new();
            let mut quorum = quorums[pick(quorums.len())].clone();
            for _ in 0..1 + usize::from(faulty_primary) {
                quorum = quorums[pick(quorums.len())].clone();
                let p = search.plan(view + 1, &quorum);
                if violated(&world, &p) {
                    return Some(format!(
                        "seed {seed} walk {walk}: {}",
                        search.dropped(step, view, &world, &quorum, &p)
                    ));
                }
                plans.push(p);
            }
            plan = merge(&plans);
            step = Some(search.record(step, view, &world, quorum, &plan));
        }
        // Only the current walk's history is needed for a report.
        search.steps.clear();
    }
    None
}
