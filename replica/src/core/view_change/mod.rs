//! View-change evidence rules (PROTOCOLS §2.8–2.9), as pure functions.
//!
//! In: view-change messages (already signature-checked by the verifier). Out: whether each is
//! well formed, and the new view's plan: the stable checkpoint to start from and, for every
//! later sequence number up to the highest chosen evidence, the proposal to re-issue (or a
//! null batch). The new primary and every backup run [`plan_new_view`] on the same 2f+1 view
//! changes and must get the same plan (safety rule 6).
//!
//! # What a view change reports (the contract with the core)
//!
//! For every sequence number above its stable checkpoint (and within the log window), in
//! increasing sequence order, at most two items:
//! 1. its **highest-view strong evidence** ([`crate::wire::Evidence::Prepared`]), if it has
//!    any;
//! 2. then, only if it accepted a proposal in a **strictly higher view** than that (or has no
//!    strong evidence), the **highest-view proposal it accepted**
//!    ([`crate::wire::Evidence::Accepted`]): the pre-prepare signed by that view's primary,
//!    with its batch, accepted inside an installed view (re-issued proposals of a new view
//!    count as accepted in that view).
//!
//! Both are needed: a replica whose only certificate is from view 1 but which accepted (and
//! speculatively executed) something in view 2 must say so, or a request completed on the
//! fast path in view 2 could lose to the view-1 certificate (the §2.6 counterexample). An
//! acceptance no higher than the certificate adds nothing, so it is not reported.
//!
//! # Selection, slot by slot above the chosen checkpoint
//!
//! - **Strong candidates**: every prepared certificate for the slot, at its own view.
//! - **Fast candidates**: items are grouped by *content* — the pre-prepare body with its view,
//!   primary and history cleared ([`proposal_content`]), so the sequence number, the batch
//!   digest and the nondeterministic input must all be equal. For each content, take per view change
//!   the highest view at which it reports that content (strong or fast item); a content
//!   reported by at least f+1 distinct view changes is a candidate at the (f+1)-th highest of
//!   those views: the highest view v such that f+1 view changes report it at v or above.
//! - The candidate with the **highest view** wins; on a tie strong beats fast (with an
//!   equivocating primary one view can hold a certificate for x and f+1 reports of y, but only
//!   x can have completed); a remaining tie (two fast contents, neither of which can have
//!   completed) goes to the smaller encoded content, so every replica picks the same one.
//! - No candidate: a null batch. The plan ends at the highest slot that has a candidate.
//!
//! Why content and not the identical (view, seq) pre-prepare of PROTOCOLS §2.8: after a
//! request *y* completes on the fast path in view u, the next view re-issues y, and some
//! replicas accept the re-issued pre-prepare (view u+1) while others are still at view u. A
//! later quorum can then hold one report of (u, y) and one of (u+1, y) from correct replicas
//! and an old certificate for x from a faulty one; counting identical pre-prepares sees two
//! groups below f+1 and picks x, losing y. The model check in `view_change::model` finds
//! exactly this schedule for the per-(view, seq) count. Counting by content with "at view v or
//! above" keeps the safety argument of §2.9: if y completed fast in view u, the f+1 or more
//! correct replicas of any later quorum all report y at a view ≥ u (everything installed since
//! kept y), so y is a candidate at a view ≥ u; any other content needs one correct reporter at
//! a view ≥ u, which cannot exist, and a certificate for another value at a view ≥ u would
//! need f+1 correct replicas that prepared it. If y completed slowly (f+1 correct replicas
//! prepared it in view u), one of them is in every quorum and reports a certificate for y at a
//! view ≥ u; another certificate in view u is impossible by quorum intersection, and a fast
//! candidate for another value in view u loses to the certificate.
//!
//! PROTOCOLS §2.9 step 4 (drop a strong certificate whose history disagrees with a lower slot
//! already chosen) applies once pre-prepares carry a history digest; with per-slot evidence
//! there is nothing to drop.

//!
//! # Where the parts are
//!
//! - [`evidence`]: what a view change may carry and the checks of its structure.
//! - [`plan`]: the selection above, as pure functions ([`plan_new_view`]).
//! - `start.rs`: the replica leaving a view (timeouts, its view change, the evidence it
//!   reports: [`crate::core::Replica`]'s `evidence`).
//! - `new_view.rs`: the replica entering a view (the new view built, checked, installed).
//! - Tests: `tests.rs` (the rules), `abraham.rs` (the published counterexample, replayed),
//!   `model/` (the exhaustive model check of the selection), `fixtures.rs` (what they share).

pub mod evidence;
mod new_view;
pub mod plan;
mod start;

#[cfg(test)]
mod abraham;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

pub use evidence::{
    valid_checkpoint_certificate, valid_order, valid_prepared_certificate, valid_proposal,
    valid_quorum, valid_view_change, Genesis, NONDET_BYTES_MAX,
};
#[cfg(test)]
pub(crate) use plan::plan_new_view_published;
pub use plan::{plan_new_view, proposal_content, NewViewPlan};
#[cfg(test)]
pub(crate) use plan::{plan_with, FastTally};
