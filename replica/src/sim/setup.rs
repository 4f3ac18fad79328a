//! Building a run from its scenario: keys, replicas (with their services), clients and their
//! plans, faulty clients.

use super::*;

impl Sim {
    pub fn new(scenario: Scenario) -> Self {
        let n = scenario.n();
        let mut rng = Rng::new(scenario.seed);
        let clients: Vec<ClientId> = (0..scenario.clients).map(|i| ClientId(100 + i)).collect();
        let faulty_ids: Vec<ClientId> = (0..scenario.faulty_clients.len() as u64)
            .map(|i| ClientId(100 + scenario.clients + i))
            .collect();
        let all_clients: Vec<ClientId> = clients.iter().chain(&faulty_ids).copied().collect();
        let addresses = (0..n).map(|i| format!("sim:{i}")).collect();
        let key_seed = scenario.seed ^ 0x6B65_7973;
        let protocol = scenario.protocol.clone();
        let keys = match generate_seeded(scenario.f, addresses, &all_clients, protocol, key_seed) {
            Ok(k) => k,
            Err(e) => panic!("simulator keygen: {e}"),
        };
        let config = Arc::new(keys.config.clone());
        let mut setup_error = None;
        let run_dir = match &scenario.service {
            ServiceKind::Kv => None,
            ServiceKind::Fs(_) => RunDir::new(scenario.name, scenario.seed)
                .map_err(|e| setup_error = Some(e))
                .ok(),
        };
        let mut replicas = Vec::new();
        for secrets in &keys.replicas {
            let byzantine = scenario
                .byzantine
                .iter()
                .find(|(b, _)| *b == secrets.id.0)
                .map(|(_, behaviour)| *behaviour);
            let service = match (&scenario.service, &run_dir) {
                (ServiceKind::Kv, _) => Ok(SimService::kv()),
                (ServiceKind::Fs(_), Some(dir)) => {
                    SimService::fs(&dir.replica(secrets.id.0 as usize))
                }
                (ServiceKind::Fs(_), None) => Err("no data directory for the file service".into()),
            }
            .map(|service| match byzantine {
                Some(Behaviour::SkewedTime) => {
                    service.skewed(scenario.seed ^ (u64::from(secrets.id.0) << 48))
                }
                _ => service,
            });
            let state = match service {
                Ok(service) => match Replica::new(config.clone(), secrets, service) {
                    Ok(r) => ReplicaState::Up(Box::new(r)),
                    Err(e) => panic!("replica: {e}"),
                },
                Err(e) => {
                    setup_error.get_or_insert(e);
                    ReplicaState::Gone
                }
            };
            replicas.push(ReplicaNode {
                state,
                auth: Authenticator::for_replica(&config, secrets),
                wal: Vec::new(),
                persisted: 0,
                byzantine,
                signer: byzantine.map(|_| Signer::from_secret(&secrets.signing_key.0)),
                stable_history: Vec::new(),
                view_changes_held: BTreeMap::new(),
                held_new_view: None,
                max_view_spoken: View(0),
                last_view: View(0),
                restarts: 0,
                crash_pending: false,
                transferred: None,
            });
        }
        let mut client_nodes = Vec::new();
        for (i, secrets) in keys.clients.iter().take(clients.len()).enumerate() {
            let mut plan = Vec::new();
            let mut fs = None;
            if let ServiceKind::Fs(workload) = &scenario.service {
                // A stream per client, apart from the run's: the key-value draws below and
                // every later draw of the run stay what they are without a file workload.
                let mut fs_rng = Rng::new(scenario.seed ^ 0xF5_C11E_0000 ^ ((i as u64) << 40));
                // Reads are about a third of the steps, as gets are of key-value operations.
                let read_only = scenario.read_only_per_mille.saturating_mul(3).min(1000);
                for (step, read_only) in
                    fs_workload::plan(&mut fs_rng, workload, scenario.ops_per_client, read_only)
                {
                    plan.push(PlannedOp {
                        op: Step::Fs(step),
                        read_only,
                    });
                }
                fs = Some(FsClient::new(
                    i,
                    fs_rng,
                    scenario.protocol.operation_bytes_max,
                    workload.large_writes > 0,
                ));
            }
            // Key-value operations, unless the plan is a file workload's.
            let kv_ops = if fs.is_some() {
                0
            } else {
                scenario.ops_per_client
            };
            for k in 0..kv_ops {
                let key = format!("k{}", rng.below(scenario.keys)).into_bytes();
                let (op, read_only) = match scenario.value_bytes {
                    Some((low, high)) => {
                        // Large values: puts, each to a key of its own, so that replies stay
                        // small (a put returns the old value) and the simulation spends its
                        // time on what is large in the protocol: requests, batches, logs.
                        let mut value = vec![0u8; rng.range(low, high) as usize];
                        let tag = format!("c{i}.{k};");
                        value[..tag.len()].copy_from_slice(tag.as_bytes());
                        let key = if scenario.large_results {
                            key
                        } else {
                            [key, tag.into_bytes()].concat()
                        };
                        (KvOp::Put { key, value }, false)
                    }
                    None => {
                        let value = format!("c{i}.{k};").into_bytes();
                        match rng.below(10) {
                            0..=2 => (KvOp::Put { key, value }, false),
                            3..=5 => (KvOp::Append { key, value }, false),
                            6 => (KvOp::Delete { key }, false),
                            _ => (
                                KvOp::Get { key },
                                rng.chance(
                                    scenario.read_only_per_mille.saturating_mul(3).min(1000),
                                ),
                            ),
                        }
                    }
                };
                plan.push(PlannedOp {
                    op: Step::Kv(op),
                    read_only,
                });
            }
            // The plan is drawn either way, so that the others' plans do not move.
            let holder = (i == 0 && scenario.lock_holder && fs.is_none())
                .then(|| Box::new(holder::Holder::new(secrets.clone(), &scenario)));
            if holder.is_some() {
                plan.clear();
            }
            client_nodes.push(ClientNode {
                client: Client::new(config.clone(), secrets, 1),
                auth: Authenticator::for_client(&config, secrets),
                fs,
                plan,
                next: 0,
                in_flight: BTreeMap::new(),
                next_invoke_tick: rng.below(20),
                holder,
            });
        }
        let faulty_clients = scenario
            .faulty_clients
            .iter()
            .zip(keys.clients.iter().skip(clients.len()))
            .map(|(fault, secrets)| FaultyClientNode {
                fault: *fault,
                id: secrets.id,
                signer: Signer::from_secret(&secrets.signing_key.0),
                auth: Authenticator::for_client(&config, secrets),
                next_timestamp: 1,
                next_tick: 30,
                sent: 0,
            })
            .collect();
        let byzantine = scenario.byzantine.iter().map(|(b, _)| *b).collect();
        let mut checker = Checker::new(byzantine, faulty_ids);
        if scenario.lock_holder && matches!(scenario.service, ServiceKind::Kv) {
            checker = checker.with_untracked(vec![ClientId(100)]);
        }
        if let Some(dir) = &run_dir {
            checker = checker.with_fs_reference(dir.path().join("reference"));
        }
        Sim {
            checker,
            fired: vec![false; scenario.triggered_crashes.len()],
            scenario,
            rng,
            keys,
            config,
            tick: 0,
            queue: BTreeMap::new(),
            counter: 0,
            replicas,
            clients: client_nodes,
            faulty_clients,
            replay_pool: Vec::new(),
            misbehaviour_noticed: 0,
            stripped_commits: 0,
            forks: BTreeMap::new(),
            view_at_fault_end: None,
            frame_bytes_max: 0,
            record_bytes_max: 0,
            stale_view_changes: 0,
            split_new_views: 0,
            checkpoints_after_transfer: 0,
            trace: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
            setup_error,
            _run_dir: run_dir,
        }
    }
}
