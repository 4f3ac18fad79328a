//! The breadth-first search over schedules (see the module doc of [`super`]).

use super::*;

impl Search {
    pub(super) fn new(rule: Rule, bounds: Bounds) -> Self {
        assert!(bounds.faulty < N && (1..MAX_VIEWS).contains(&bounds.views));
        assert!((1..MAX_SLOTS).contains(&bounds.slots));
        Search {
            rule,
            bounds,
            concrete: Concrete::new(),
            memo: HashMap::new(),
            steps: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn faulty(&self) -> usize {
        self.bounds.faulty
    }

    fn correct(&self) -> impl Iterator<Item = usize> + '_ {
        (0..N).filter(move |r| *r != self.faulty())
    }

    fn correct_mask(&self) -> u8 {
        self.correct().fold(0, |m, r| m | 1 << r)
    }

    /// Every way view `view` can go at one slot under `planned`. The bool is true when a
    /// second value completed at the slot (an agreement violation).
    ///
    /// A slot the plan leaves free held nothing that completed, and a replica installing the
    /// view may discard what it had there (the core voids old proposals above the plan): each
    /// correct replica keeps its report, drops its fast item, or drops both.
    pub(super) fn run_slot(&self, slot: &Slot, view: u8, planned: Planned) -> Vec<(Slot, bool)> {
        if planned != Planned::Free {
            return self.run_slot_from(slot, view, planned);
        }
        let per_replica: Vec<Vec<(usize, Report)>> = self
            .correct()
            .map(|r| {
                let kept = slot.reports[r];
                let mut options = vec![(r, kept)];
                for forgotten in [
                    Report {
                        strong: kept.strong,
                        fast: None,
                    },
                    Report::default(),
                ] {
                    if !options.iter().any(|(_, o)| *o == forgotten) {
                        options.push((r, forgotten));
                    }
                }
                options
            })
            .collect();
        let mut out: HashSet<(Slot, bool)> = HashSet::new();
        for choice in product(&per_replica) {
            let mut start = *slot;
            for (r, report) in choice {
                start.reports[r] = report;
            }
            out.extend(self.run_slot_from(&start, view, planned));
        }
        let mut out: Vec<_> = out.into_iter().collect();
        out.sort();
        out
    }

    fn run_slot_from(&self, slot: &Slot, view: u8, planned: Planned) -> Vec<(Slot, bool)> {
        let primary = view as usize % N;
        let correct = self.correct_mask();
        // The correct replicas' choices: for each, the value it accepts (None: none).
        let mut assignments: Vec<[Option<u8>; N]> = Vec::new();
        let mut base = *slot;
        if primary == self.faulty() {
            // It signs everything; each correct replica may get any value it would accept.
            for value in 0..VALUES {
                base.signed |= bit(view, value);
            }
            let allowed: Vec<Option<u8>> = match planned {
                Planned::Value(x) => vec![None, Some(x)],
                Planned::Free => vec![None, Some(NULL), Some(A), Some(B)],
                Planned::OneOf(mask) => std::iter::once(None)
                    .chain((0..VALUES).filter(|x| mask & 1 << x != 0).map(Some))
                    .collect(),
            };
            let per_replica: Vec<Vec<Option<u8>>> =
                self.correct().map(|_| allowed.clone()).collect();
            for choice in product(&per_replica) {
                let mut a = [None; N];
                for (r, v) in self.correct().zip(choice) {
                    a[r] = v;
                }
                assignments.push(a);
            }
        } else {
            // Nothing proposed here (or the view never started), or one value, which the primary
            // accepts and any subset of the correct backups accepts.
            assignments.push([None; N]);
            let proposals: Vec<u8> = match planned {
                Planned::Value(x) => vec![x],
                Planned::Free => vec![A, B],
                Planned::OneOf(_) => unreachable!("a correct primary sends one new view"),
            };
            for x in proposals {
                for backups in subsets(correct & !(1 << primary)) {
                    let mut a = [None; N];
                    a[primary] = Some(x);
                    for r in self.correct().filter(|r| backups & 1 << r != 0) {
                        a[r] = Some(x);
                    }
                    assignments.push(a);
                }
            }
        }
        let mut out = Vec::new();
        for a in assignments {
            let mut next = base;
            let acceptors = |x: u8| {
                (0..N)
                    .filter(|r| a[*r] == Some(x))
                    .fold(0u8, |m, r| m | 1 << r)
            };
            // Per value: who may be prepared (nobody unless a certificate can exist).
            let mut may_prepare: Vec<Vec<u8>> = Vec::new();
            for x in 0..VALUES {
                let acc = acceptors(x);
                if acc != 0 {
                    next.signed |= bit(view, x);
                }
                let faulty_backup = usize::from(primary != self.faulty());
                let backup_prepares = (acc & !(1 << primary)).count_ones() as usize + faulty_backup;
                if acc != 0 && backup_prepares >= 2 * F {
                    next.certificates |= bit(view, x);
                    may_prepare.push(subsets(acc).collect());
                } else {
                    may_prepare.push(vec![0]);
                }
            }
            for prepared in product(&may_prepare) {
                let mut s = next;
                let mut conflict = false;
                for x in 0..VALUES {
                    for r in self.correct().filter(|r| a[*r] == Some(x)) {
                        let report = &mut s.reports[r];
                        if prepared[x as usize] & 1 << r != 0 {
                            *report = Report {
                                strong: Some(Item { view, value: x }),
                                fast: None,
                            };
                        } else {
                            report.fast = Some(Item { view, value: x });
                        }
                    }
                    let fast = acceptors(x) == correct;
                    let slow = prepared[x as usize].count_ones() as usize > F;
                    if fast || slow {
                        if s.completed.is_some_and(|c| c != x) {
                            conflict = true;
                        }
                        s.completed = Some(x);
                    }
                }
                out.push((s, conflict));
            }
        }
        out
    }

    /// Every way view `view` can go under `plan`, all tracked slots together.
    pub(super) fn run_view(&self, world: &World, view: u8, plan: &Plan) -> Vec<(World, bool)> {
        let per_slot: Vec<Vec<(Slot, bool)>> = world
            .iter()
            .zip(plan)
            .map(|(slot, planned)| self.run_slot(slot, view, *planned))
            .collect();
        product(&per_slot)
            .into_iter()
            .map(|outcome| {
                let conflict = outcome.iter().any(|(_, c)| *c);
                (outcome.into_iter().map(|(s, _)| s).collect(), conflict)
            })
            .collect()
    }

    /// What the faulty replica can report at one slot.
    fn faulty_reports(&self, slot: &Slot) -> Vec<Report> {
        let mut out = Vec::new();
        let strongs = std::iter::once(None).chain(items(slot.certificates).map(Some));
        for strong in strongs {
            out.push(Report { strong, fast: None });
            let higher = |f: &Item| match strong {
                Some(s) => f.view > s.view,
                None => true,
            };
            for fast in items(slot.signed).filter(higher) {
                out.push(Report {
                    strong,
                    fast: Some(fast),
                });
            }
        }
        out
    }

    /// Every quorum (with every report of the faulty replica) for the next view change.
    pub(super) fn quorums(&self, world: &World) -> Vec<Quorum> {
        let per_slot: Vec<Vec<Report>> =
            world.iter().map(|slot| self.faulty_reports(slot)).collect();
        let faulty_options = product(&per_slot);
        let correct_part =
            |r: usize| -> Vec<Report> { world.iter().map(|slot| slot.reports[r]).collect() };
        let mut members_options: Vec<Vec<(u8, Vec<Report>)>> = Vec::new();
        for left_out in 0..N {
            let members: Vec<usize> = (0..N).filter(|r| *r != left_out).collect();
            if members.contains(&self.faulty()) {
                for o in &faulty_options {
                    members_options.push(
                        members
                            .iter()
                            .map(|r| {
                                (
                                    *r as u8,
                                    if *r == self.faulty() {
                                        o.clone()
                                    } else {
                                        correct_part(*r)
                                    },
                                )
                            })
                            .collect(),
                    );
                }
            } else {
                members_options.push(
                    members
                        .iter()
                        .map(|r| (*r as u8, correct_part(*r)))
                        .collect(),
                );
            }
        }
        let higher: &[bool] = if self.bounds.higher_slot {
            &[false, true]
        } else {
            &[false]
        };
        members_options
            .into_iter()
            .flat_map(|members| {
                higher.iter().map(move |h| Quorum {
                    members: members.clone(),
                    higher_slot: *h,
                })
            })
            .collect()
    }

    pub(super) fn plan(&mut self, new_view: u8, quorum: &Quorum) -> Plan {
        if let Some(p) = self.memo.get(quorum) {
            return p.clone();
        }
        let plan = self
            .concrete
            .plan(self.rule, new_view, self.bounds.slots, quorum);
        self.stats.plans_computed += 1;
        if quorum.higher_slot {
            // The reduction's premise (see `check`), checked on the rule: a candidate above
            // the tracked slots changes nothing but turning a free slot into a null batch.
            let alone = self.plan(
                new_view,
                &Quorum {
                    members: quorum.members.clone(),
                    higher_slot: false,
                },
            );
            for (with, without) in plan.iter().zip(&alone) {
                assert!(
                    with == without || (*without == Planned::Free && *with == Planned::Value(NULL))
                );
            }
        }
        self.memo.insert(quorum.clone(), plan.clone());
        plan
    }

    /// Records that `quorum` and `plan` end `view` after `parent`; returns the new step.
    pub(super) fn record(
        &mut self,
        parent: Option<usize>,
        view: u8,
        world: &World,
        quorum: Quorum,
        plan: &Plan,
    ) -> usize {
        self.steps.push(Step {
            parent,
            view,
            world: world.clone(),
            quorum,
            plan: plan.clone(),
        });
        self.steps.len() - 1
    }

    /// The report of a plan for view `view + 1` that drops a completed value.
    pub(super) fn dropped(
        &self,
        step: Option<usize>,
        view: u8,
        world: &World,
        quorum: &Quorum,
        plan: &Plan,
    ) -> String {
        let text = self.describe(step, Some((view, world, quorum, plan)));
        format!(
            "the plan for view {} drops a completed value\n{text}",
            view + 1
        )
    }

    pub(super) fn describe(
        &self,
        mut step: Option<usize>,
        last: Option<(u8, &World, &Quorum, &Plan)>,
    ) -> String {
        let mut parts = Vec::new();
        let show = |view: u8, world: &World, quorum: &Quorum, plan: &Plan| {
            let mut text = format!("after view {view}:\n");
            for (i, s) in world.iter().enumerate() {
                text += &format!(
                    "  slot {}: completed {:?}; certificates {:?}; correct reports {:?}\n",
                    i + 1,
                    s.completed.map(value_name),
                    items(s.certificates)
                        .map(|i| (i.view, value_name(i.value)))
                        .collect::<Vec<_>>(),
                    self.correct()
                        .map(|r| (r, s.reports[r]))
                        .collect::<Vec<_>>()
                );
            }
            text += &format!(
                "  view change to {}: {quorum:?}\n  plan {plan:?}\n",
                view + 1
            );
            text
        };
        if let Some((view, world, quorum, plan)) = last {
            parts.push(show(view, world, quorum, plan));
        }
        while let Some(i) = step {
            let s = &self.steps[i];
            parts.push(show(s.view, &s.world, &s.quorum, &s.plan));
            step = s.parent;
        }
        parts.reverse();
        format!(
            "faulty replica r{}; values: 0 = null, 1 = a, 2 = b\n{}",
            self.faulty(),
            parts.concat()
        )
    }
}
