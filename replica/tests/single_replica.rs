//! A cluster with f=0 (one replica, no replication) orders and executes on its own: the
//! unreplicated baseline of the benchmarks runs the same core.

use replica::client::{Client, ClientAction};
use replica::config::{generate_seeded, ProtocolConfig};
use replica::core::{Action, Event, Replica};
use replica::wire::{Authenticator, Principal, FRAME_HEADER_BYTES};
use state_abstraction::kv::{KvOp, KvReply, KvService};
use state_abstraction::ClientId;
use std::sync::Arc;

#[test]
fn one_replica_commits_and_replies() {
    let address = vec!["127.0.0.1:1".into()];
    let keys =
        generate_seeded(0, address, &[ClientId(1)], ProtocolConfig::default(), 7).expect("keygen");
    let config = Arc::new(keys.config.clone());
    let mut replica =
        Replica::new(config.clone(), &keys.replicas[0], KvService::new()).expect("replica");
    let replica_auth = Authenticator::for_replica(&keys.config, &keys.replicas[0]);
    let client_auth = Authenticator::for_client(&keys.config, &keys.clients[0]);
    let mut client = Client::new(config, &keys.clients[0], 1);

    let mut results = Vec::new();
    for (i, op) in [
        KvOp::Put {
            key: b"k".to_vec(),
            value: b"v1".to_vec(),
        },
        KvOp::Append {
            key: b"k".to_vec(),
            value: b"+2".to_vec(),
        },
    ]
    .into_iter()
    .enumerate()
    {
        let mut client_actions = Vec::new();
        client
            .invoke(op.encode(), false, &mut client_actions)
            .expect("invoke");
        let mut completed = Vec::new();
        for ca in client_actions {
            let message = match ca {
                ClientAction::Send { message, .. } | ClientAction::Broadcast { message } => message,
            };
            let frame = client_auth
                .seal(&message, &[Principal::Replica(replica.id())])
                .expect("seal");
            let opened = replica_auth
                .open(&frame[FRAME_HEADER_BYTES..])
                .expect("open");
            let mut actions = Vec::new();
            replica.step(Event::Message(opened), &mut actions);
            replica.step(
                Event::Tick {
                    now_ns: 1_000 + i as u64,
                },
                &mut actions,
            );
            for a in actions {
                if let Action::SendClient { message, .. } = a {
                    let frame = replica_auth
                        .seal(&message, &[Principal::Client(ClientId(1))])
                        .expect("seal");
                    let opened = client_auth
                        .open(&frame[FRAME_HEADER_BYTES..])
                        .expect("open");
                    let mut more = Vec::new();
                    client.on_message(opened, &mut more, &mut completed);
                }
            }
        }
        assert_eq!(
            completed.len(),
            1,
            "request {i} completed by the single replica"
        );
        results.push(KvReply::decode(&completed[0].result).expect("reply"));
    }
    assert_eq!(
        results,
        vec![KvReply::Value(None), KvReply::Value(Some(b"v1+2".to_vec()))]
    );
    assert_eq!(replica.last_executed().0, 2);
}
