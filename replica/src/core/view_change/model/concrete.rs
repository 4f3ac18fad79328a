//! The concrete messages the model's abstract evidence stands for: real keys, real signed
//! pre-prepares, prepares and view changes, made once per statement.

use super::*;

/// Real keys and the signed statements the model's evidence stands for, made once.
pub(super) struct Concrete {
    config: ClusterConfig,
    signers: Vec<Signer>,
    proposals: HashMap<(u8, u8, u8), Signed<PrePrepare>>,
    certificates: HashMap<(u8, u8, u8), PreparedCertificate>,
    digests: Vec<Digest>,
    /// Signed and checked view changes by (replica, new view, reports, higher-slot item): a
    /// view change recurs in many quorums.
    view_changes: HashMap<(u8, u8, Vec<Report>, bool), Signed<ViewChange>>,
}

impl Concrete {
    pub(super) fn new() -> Self {
        let addresses = (0..N).map(|i| format!("m{i}")).collect();
        let keys = super::fixtures::seeded_keys(0x51ed_270b, addresses);
        assert_eq!(keys.config.f as usize, F);
        let (signers, client) = super::fixtures::signers(&keys);
        let batches: Vec<Batch> = (0..VALUES)
            .map(|value| match value {
                NULL => Batch::default(),
                _ => Batch {
                    requests: vec![client.sign(Request {
                        client: ClientId(1),
                        timestamp: Timestamp(value as u64),
                        operation: value_name(value).as_bytes().to_vec(),
                        read_only: false,
                    })],
                },
            })
            .collect();
        let digests: Vec<Digest> = batches.iter().map(|b| b.digest()).collect();
        let mut proposals = HashMap::new();
        let mut certificates = HashMap::new();
        for view in 0..MAX_VIEWS as u8 {
            let primary = View(view as u64).primary(N);
            // Any 2f backups will do: who signed does not change the choice, and the model
            // decides separately whether a certificate can exist.
            let backups: Vec<ReplicaId> = (0..N as u32)
                .map(ReplicaId)
                .filter(|r| *r != primary)
                .take(2 * F)
                .collect();
            for slot in 0..MAX_SLOTS as u8 {
                for value in 0..VALUES {
                    let seq = SeqNo(slot as u64 + 1);
                    let batch_digest = digests[value as usize];
                    let pre_prepare = signers[primary.0 as usize].sign(PrePrepare {
                        view: View(view as u64),
                        seq,
                        batch_digest,
                        nondet: Vec::new(),
                        primary,
                        // Histories differ from view to view here on purpose (a new view chains
                        // from its own checkpoint): grouping by content must not depend on them.
                        history: Digest([view as u8; 32]),
                    });
                    // Evidence names the batch by digest; the batch itself is not needed here.
                    let proposal = pre_prepare;
                    let prepares = backups
                        .iter()
                        .map(|r| {
                            signers[r.0 as usize].sign(Prepare {
                                view: View(view as u64),
                                seq,
                                batch_digest,
                                replica: *r,
                            })
                        })
                        .collect();
                    certificates.insert(
                        (view, slot, value),
                        PreparedCertificate {
                            pre_prepare: proposal.clone(),
                            prepares,
                        },
                    );
                    proposals.insert((view, slot, value), proposal);
                }
            }
        }
        Concrete {
            config: keys.config,
            signers,
            proposals,
            certificates,
            digests,
            view_changes: HashMap::new(),
        }
    }

    /// A real signed view change for `reports` (slot i is sequence number i + 1); with
    /// `higher_slot`, also a view-0 certificate for *a* just above them.
    fn view_change(
        &mut self,
        replica: u8,
        new_view: u8,
        reports: &[Report],
        higher_slot: bool,
    ) -> Signed<ViewChange> {
        let key = (replica, new_view, reports.to_vec(), higher_slot);
        if let Some(vc) = self.view_changes.get(&key) {
            return vc.clone();
        }
        let mut evidence = Vec::new();
        for (slot, report) in reports.iter().enumerate() {
            if let Some(i) = report.strong {
                evidence.push(Evidence::Prepared(
                    self.certificates[&(i.view, slot as u8, i.value)].clone(),
                ));
            }
            if let Some(i) = report.fast {
                evidence.push(Evidence::Accepted(
                    self.proposals[&(i.view, slot as u8, i.value)].clone(),
                ));
            }
        }
        if higher_slot {
            evidence.push(Evidence::Prepared(
                self.certificates[&(0, reports.len() as u8, A)].clone(),
            ));
        }
        let stable = super::fixtures::genesis_certificate(&GENESIS);
        let vc = ViewChange {
            new_view: View(new_view as u64),
            replica: ReplicaId(replica as u32),
            stable,
            evidence,
        };
        assert!(
            valid_view_change(&self.config, &GENESIS, &vc),
            "the model built a malformed view change: {vc:?}"
        );
        let signed = self.signers[replica as usize].sign(vc);
        self.view_changes.insert(key, signed.clone());
        signed
    }

    /// Runs `rule` on the quorum's real view changes and maps the plan of the tracked slots
    /// back to values. With `quorum.higher_slot`, the first member also shows a view-0
    /// certificate for *a* at the sequence number just above the tracked ones, which is then
    /// always a candidate.
    pub(super) fn plan(&mut self, rule: Rule, new_view: u8, slots: usize, quorum: &Quorum) -> Plan {
        let view_changes: Vec<Signed<ViewChange>> = quorum
            .members
            .iter()
            .enumerate()
            .map(|(i, (r, reports))| {
                self.view_change(*r, new_view, reports, quorum.higher_slot && i == 0)
            })
            .collect();
        assert!(valid_quorum(
            &self.config,
            &GENESIS,
            View(new_view as u64),
            &view_changes
        ));
        let plan = rule(&self.config, &view_changes);
        assert_eq!(plan.stable.seq, SeqNo(0));
        let reported = slots + usize::from(quorum.higher_slot);
        assert!(
            plan.slots.len() <= reported,
            "a plan beyond the reported slots"
        );
        let mut out = vec![Planned::Free; slots];
        for (i, (seq, proposal)) in plan.slots.iter().enumerate() {
            assert_eq!(
                seq.0,
                i as u64 + 1,
                "plans are contiguous from the checkpoint"
            );
            let digest = NewViewPlan::slot_content(proposal).0;
            let value = self
                .digests
                .iter()
                .position(|d| *d == digest)
                .expect("a reported value") as u8;
            match out.get_mut(i) {
                Some(planned) => *planned = Planned::Value(value),
                None => assert_eq!(value, A, "the higher slot's only candidate"),
            }
        }
        out
    }
}
