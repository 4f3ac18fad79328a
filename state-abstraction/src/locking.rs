//! What a service shares with the replica about Zzyzx locks (docs/zzyzx-plan.md, milestone
//! M2): the lock's identity, the events that start and end a lock's log, a point of that log,
//! and the result of one locked entry.
//!
//! The replica's log servers run the protocol (signatures, the hash chain, completion); the
//! service only executes entries against the lock's objects and digests them. Both sides
//! agree on a lock's life through [`LockEvent`]s, which the service produces only from
//! ordered execution and checkpoints, so every correct replica sees the same events at the
//! same sequence numbers.

use crate::digest::Digest;
use crate::service::ClientId;
use serde::{Deserialize, Serialize};

/// A lock's number: a counter in the service's lock table, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LockId(pub u64);

/// A point of a lock's log, as a lock checkpoint statement signs it: after entry `k` the
/// chain hash is `chain` and the lock's objects digest to `state` (the service's
/// [`crate::Service::lock_state_digest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockPoint {
    pub lock: LockId,
    pub epoch: u32,
    pub k: u64,
    pub chain: Digest,
    pub state: Digest,
}

impl LockPoint {
    /// The `state` of a point no replica certified (a `Resolve`'s choice): the merge does
    /// not compare the lock's content with it.
    pub const UNCERTIFIED: Digest = Digest([0; 32]);

    pub fn state_certified(&self) -> bool {
        self.state != Self::UNCERTIFIED
    }
}

/// A change of a lock's life, produced by ordered execution (`Frozen`) or inside
/// `checkpoint(seq)` (`Activated`, `Merged`); drained by
/// [`crate::Service::take_lock_events`] after each `execute` and `checkpoint`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockEvent {
    /// The lock's objects are masked from the ordered state as of this checkpoint: from now
    /// on its holder's log entries may be appended and executed. `base` is the lock's state
    /// digest at activation (what `lock_state_digest` gives before any entry).
    Activated {
        lock: LockId,
        epoch: u32,
        holder: ClientId,
        base: Digest,
    },
    /// No entry may be appended any more (release, conflicting ordered access, expiry).
    /// `end` is the certified point a release named: the log must reach it before the merge.
    /// `None` (conflict, expiry, release without a certificate): the log stops where it is.
    Frozen {
        lock: LockId,
        epoch: u32,
        end: Option<LockPoint>,
    },
    /// Merged back into the ordered state (or dropped) by this checkpoint: the log and the
    /// lock's records can go once the checkpoint is durable.
    Merged { lock: LockId, epoch: u32 },
}

impl LockEvent {
    pub fn lock(&self) -> LockId {
        match self {
            LockEvent::Activated { lock, .. }
            | LockEvent::Frozen { lock, .. }
            | LockEvent::Merged { lock, .. } => *lock,
        }
    }
}

/// An active (or frozen, not yet merged) lock as the ordered state records it: what a
/// replica that got the ordered state by transfer needs to fetch the lock's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub lock: LockId,
    pub epoch: u32,
    pub holder: ClientId,
    /// The lock's state digest at activation.
    pub base: Digest,
    /// Frozen by ordering (with the certified end, if its release named one).
    pub frozen: Option<Option<LockPoint>>,
    /// How many objects the lock's content has (what a fetch of it may assemble).
    pub members: u32,
    /// The most bytes its content can hold, from what ordering recorded at activation: a
    /// fetch that assembles more is being fed by a faulty peer (pages cannot be checked
    /// one by one, only the whole against `base`), and goes to another before memory runs
    /// out.
    pub bytes_max: u64,
}

/// Where a lock content transfer goes on: the first piece not yet sent, by (object index,
/// piece number). `BaseCursor::START` is the first piece of the lowest member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BaseCursor {
    pub index: u64,
    pub piece: u32,
}

impl BaseCursor {
    pub const START: BaseCursor = BaseCursor { index: 0, piece: 0 };
}

/// One piece of a lock member's value at activation (piece 0: the header; 1..: file data
/// chunks), with the number of pieces that member has, so the receiver knows when the
/// object is whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasePiece {
    pub index: u64,
    pub piece: u32,
    pub of: u32,
    pub bytes: Vec<u8>,
}

/// A page of a lock's content at activation, from a cursor on: the pieces in (index, piece)
/// order, and whether they reach the last piece of the last member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasePage {
    pub pieces: Vec<BasePiece>,
    pub done: bool,
}

impl BasePage {
    /// A page cut from whole objects (sorted by index): the pieces from `from` on, at least
    /// one, then more while the page stays within `budget` bytes. For services whose lock
    /// content is small and kept whole.
    pub fn of_objects(
        objects: &[(u64, crate::AbstractObject)],
        from: BaseCursor,
        budget: usize,
    ) -> BasePage {
        let mut page = BasePage::default();
        let mut bytes = 0usize;
        for (index, obj) in objects.iter().filter(|(i, _)| *i >= from.index) {
            let first = if *index == from.index { from.piece } else { 0 };
            for (p, piece) in obj.pieces.iter().enumerate().skip(first as usize) {
                if !page.pieces.is_empty() && bytes + piece.len() > budget {
                    return page;
                }
                bytes += piece.len();
                page.pieces.push(BasePiece {
                    index: *index,
                    piece: p as u32,
                    of: obj.pieces.len() as u32,
                    bytes: piece.clone(),
                });
            }
        }
        page.done = true;
        page
    }
}

/// Assembles a lock's content from pages, checking that each continues where the last
/// stopped; what a replica fetching the content keeps until the last page.
#[derive(Clone, Debug, Default)]
pub struct BaseAssembly {
    pub objects: Vec<(u64, crate::AbstractObject)>,
    /// Of the last object: how many pieces it has in all.
    of: u32,
    pub bytes: u64,
}

impl BaseAssembly {
    /// Where the next page must start.
    pub fn cursor(&self) -> BaseCursor {
        self.clone_shape().cursor_of()
    }

    /// Appends `page`; `Err` (and nothing appended) when it does not continue the assembly:
    /// a piece out of order, a piece count that changes within an object, an object left
    /// short by a page that says it is the last, or more than `objects_max` objects.
    pub fn append(&mut self, page: BasePage, objects_max: usize) -> Result<bool, &'static str> {
        let mut probe = self.clone_shape();
        for p in &page.pieces {
            let at = probe.cursor_of();
            let fits = if p.piece == 0 {
                at.piece == 0 && p.index >= at.index && p.of >= 1
            } else {
                p.index == at.index && p.piece == at.piece && p.of == probe.of
            };
            if !fits {
                return Err("a piece out of order");
            }
            if p.piece == 0 {
                probe.count += 1;
                probe.last = Some((p.index, 1));
                probe.of = p.of;
            } else if let Some((_, have)) = probe.last.as_mut() {
                *have += 1;
            }
            if probe.count > objects_max {
                return Err("more objects than the lock has");
            }
        }
        if page.done && probe.cursor_of().piece != 0 {
            return Err("the last page leaves an object short");
        }
        for p in page.pieces {
            self.bytes += p.bytes.len() as u64;
            if p.piece == 0 {
                self.of = p.of;
                self.objects.push((
                    p.index,
                    crate::AbstractObject {
                        pieces: vec![p.bytes],
                    },
                ));
            } else if let Some((_, o)) = self.objects.last_mut() {
                o.pieces.push(p.bytes);
            }
        }
        Ok(page.done)
    }

    fn clone_shape(&self) -> Shape {
        Shape {
            count: self.objects.len(),
            last: self
                .objects
                .last()
                .map(|(i, o)| (*i, o.pieces.len() as u32)),
            of: self.of,
        }
    }
}

/// The assembly's shape without its bytes, to check a page before taking it.
struct Shape {
    count: usize,
    last: Option<(u64, u32)>,
    of: u32,
}

impl Shape {
    fn cursor_of(&self) -> BaseCursor {
        match self.last {
            Some((i, have)) if have < self.of => BaseCursor {
                index: i,
                piece: have,
            },
            Some((i, _)) => BaseCursor {
                index: i + 1,
                piece: 0,
            },
            None => BaseCursor::START,
        }
    }
}

/// What one locked entry did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockedResult {
    /// Executed on the lock's objects; the service's reply bytes.
    Done(Vec<u8>),
    /// The operation reaches outside the lock (or the lock is not active here): no effect;
    /// the client sends it on the ordered path.
    NeedsAgreement,
    /// The operation creates an object and the lock's pool has no free slot left: no
    /// effect. The holder gives the lock back and takes it again (a fresh pool), then sends
    /// the operation anew; sent ordered instead, it would only meet its own lock.
    PoolEmpty,
}

/// Checks a lock certificate carried inside an ordered operation (a release's): 2f+1
/// replica signatures over one [`LockPoint`]. The replica builds it from the cluster's keys
/// and gives it to the service, which stays free of keys and signatures. Deterministic: every
/// replica holds the same keys.
pub trait LockCertChecker: Send + Sync {
    /// The point the certificate proves, or `None` if it does not verify.
    fn check(&self, cert: &[u8]) -> Option<LockPoint>;

    /// Where the log of a lock frozen without a certified end ends, chosen from `evidence`
    /// (an ordered `Resolve`'s: 2f+1 replicas' signed reports of their frozen logs, each
    /// ending in an entry the holder signed): deterministic, so every replica picks the same
    /// point. `None` if the evidence does not hold 2f+1 valid reports for this lock. The
    /// point's `state` is [`LockPoint::UNCERTIFIED`]: no replica vouched for the content.
    fn resolve(&self, evidence: &[u8], lock: &ResolveSubject) -> Option<Resolution> {
        let _ = (evidence, lock);
        None
    }
}

/// What a `Resolve`'s evidence settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// Where the lock's log ends.
    pub point: LockPoint,
    /// Two valid reports end in different entries the holder signed at one position: the
    /// holder forked its log (PROTOCOLS §3.5), and is refused further locks.
    pub equivocation: bool,
}

/// The lock a `Resolve` is about, as the ordered state records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolveSubject {
    pub lock: LockId,
    pub epoch: u32,
    pub holder: ClientId,
    /// The lock's state digest at activation (the chain's anchor derives from it).
    pub base: Digest,
}

impl std::fmt::Debug for dyn LockCertChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockCertChecker")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AbstractObject;

    fn objects() -> Vec<(u64, AbstractObject)> {
        vec![
            (
                3,
                AbstractObject {
                    pieces: vec![vec![1; 10], vec![2; 100], vec![3; 100]],
                },
            ),
            (
                7,
                AbstractObject {
                    pieces: vec![vec![4; 10]],
                },
            ),
        ]
    }

    #[test]
    fn pages_assemble_back_into_the_objects_whatever_the_budget() {
        for budget in [0, 1, 109, 110, 111, 220, 1 << 20] {
            let mut a = BaseAssembly::default();
            let mut pages = 0;
            loop {
                let page = BasePage::of_objects(&objects(), a.cursor(), budget);
                pages += 1;
                assert!(pages < 10, "budget {budget}: no progress");
                if a.append(page, 2).expect("in order") {
                    break;
                }
            }
            assert_eq!(a.objects, objects(), "budget {budget}");
            assert_eq!(a.bytes, 220);
        }
    }

    #[test]
    fn a_page_that_does_not_continue_the_assembly_is_refused_whole() {
        let mut a = BaseAssembly::default();
        let first = BasePage::of_objects(&objects(), BaseCursor::START, 110);
        assert_eq!(first.pieces.len(), 2);
        assert_eq!(a.append(first.clone(), 2), Ok(false));
        // The same page again: its first piece is not where the assembly stands.
        assert!(a.append(first, 2).is_err());
        // Skipping a piece, or changing an object's piece count.
        let mut rest = BasePage::of_objects(&objects(), a.cursor(), 1 << 20);
        let mut skip = rest.clone();
        skip.pieces.remove(0);
        assert!(a.append(skip, 2).is_err());
        let mut recount = rest.clone();
        recount.pieces[0].of = 4;
        assert!(a.append(recount, 2).is_err());
        // A last page that leaves an object short, and more objects than the lock has.
        let mut short = rest.clone();
        short.pieces.truncate(0);
        assert!(a.append(short, 2).is_err());
        assert!(a.append(rest.clone(), 1).is_err());
        assert_eq!(
            a.cursor(),
            BaseCursor { index: 3, piece: 2 },
            "nothing taken"
        );
        rest.done = true;
        assert_eq!(a.append(rest, 2), Ok(true));
        assert_eq!(a.objects, objects());
    }
}
