//! Tests of the fetching side against the serving side, with a lying peer.

use super::fetch::Transfer;
use super::serve;
use crate::core::execution::{ReplyLimits, ReplyTable};
use crate::core::state_transfer::{Finished, TransferStep};
use crate::wire::{CheckpointCertificate, ReplicaId, SeqNo, StateTransferMessage};
use state_abstraction::kv::{KvOp, KvService};
use state_abstraction::{ClientId, Service};

/// The serving side ([`serve::answer`], and the reply cache as the core answers it), except
/// that every answer claims
/// an object count of 999 (the fetcher must read the count off the verified tree, never take
/// a replier's word), and replica 3 lies about everything.
fn serve(
    server: &KvService,
    to: ReplicaId,
    message: &StateTransferMessage,
    replies: &[u8],
) -> Option<StateTransferMessage> {
    use StateTransferMessage as M;
    let liar = to == ReplicaId(3);
    let mut answer = match message {
        M::GetReplies { seq } => M::Replies {
            seq: *seq,
            table: replies.to_vec(),
        },
        _ => serve::answer(server, message)?,
    };
    match &mut answer {
        M::Node {
            object_count,
            children,
            ..
        } => {
            *object_count = 999;
            if liar {
                children[0].0[0] ^= 1;
            }
        }
        M::Piece { bytes, .. } if liar => bytes.push(1),
        M::Replies { table, .. } if liar => *table = vec![1],
        M::ReplyStable(_) => return None,
        _ => {}
    }
    Some(answer)
}

#[test]
fn fetches_only_what_differs_checks_everything_and_installs_the_certified_state() {
    let mut fetcher = KvService::new();
    fetcher.checkpoint(0).expect("checkpoint");
    let mut server = KvService::new();
    server.checkpoint(0).expect("checkpoint");
    for i in 0..3u64 {
        let op = KvOp::Put {
            key: format!("key{i}").into_bytes(),
            value: vec![i as u8; 10],
        }
        .encode();
        server.execute(&op, ClientId(1), &(i + 1).to_le_bytes(), false);
    }
    let root = server.checkpoint(8).expect("checkpoint");
    let replies = ReplyTable::new(ReplyLimits {
        window: 4,
        bytes_per_client: 1 << 20,
    })
    .encode();
    let target = CheckpointCertificate {
        seq: SeqNo(8),
        service_root: root,
        replies_digest: ReplyTable::digest_of_encoding(&replies),
        checkpoints: vec![],
    };
    let mut out = Vec::new();
    let peers = vec![ReplicaId(1), ReplicaId(2), ReplicaId(3)];
    let mut transfer = Transfer::start(target, SeqNo(0), ReplicaId(0), peers, 2, 0, &mut out);
    let mut finished = None;
    let mut misbehaved = 0;
    for tick in 1..200 {
        for step in std::mem::take(&mut out) {
            match step {
                TransferStep::Send(to, request) => {
                    if let Some(answer) = serve(&server, to, &request, &replies) {
                        if let Some(f) = transfer.on_message(&fetcher, to, answer, tick, &mut out) {
                            finished = Some(f);
                        }
                    }
                }
                TransferStep::Misbehaved(who, _) => {
                    assert_eq!(who, ReplicaId(3));
                    misbehaved += 1;
                }
            }
        }
        if finished.is_some() {
            break;
        }
        transfer.on_tick(tick, 5, &mut out);
    }
    let finished = finished.expect("transfer finished");
    assert!(misbehaved > 0);
    // Three buckets at most and the meta object (the agreed time moved), out of 65.
    assert!(finished.objects.len() <= 4, "{}", finished.objects.len());
    assert_eq!(finished.object_count, fetcher.object_count());
    fetcher.put_objs(finished.objects).expect("install");
    fetcher
        .set_object_count(finished.object_count)
        .expect("count");
    assert_eq!(fetcher.checkpoint(8).expect("checkpoint"), root);
    assert_eq!(fetcher.value(b"key2"), Some(&vec![2u8; 10]));
}

/// Runs `transfer` against `server` for at most `rounds` rounds of answers.
fn drive(
    transfer: &mut Transfer,
    fetcher: &KvService,
    server: &KvService,
    replies: &[u8],
    out: &mut Vec<TransferStep>,
    rounds: u64,
) -> Option<Finished> {
    for tick in 1..=rounds {
        for step in std::mem::take(out) {
            if let TransferStep::Send(to, request) = step {
                if let Some(answer) = serve(server, to, &request, replies) {
                    if let Some(f) = transfer.on_message(fetcher, to, answer, tick, out) {
                        return Some(f);
                    }
                }
            }
        }
        transfer.on_tick(tick, 5, out);
    }
    None
}

fn put(server: &mut KvService, key: u64, byte: u8, time: u64) {
    let op = KvOp::Put {
        key: format!("key{key}").into_bytes(),
        value: vec![byte; 300_000],
    }
    .encode();
    server.execute(&op, ClientId(1), &time.to_le_bytes(), false);
}

/// Under sustained writes the target moves on before a long transfer ends: the transfer
/// to the newer target reuses what the abandoned one fetched, and still checks it all.
#[test]
fn a_transfer_to_a_newer_target_reuses_what_the_older_one_fetched() {
    let mut fetcher = KvService::new();
    fetcher.checkpoint(0).expect("checkpoint");
    let mut server = KvService::new();
    server.checkpoint(0).expect("checkpoint");
    for k in 0..8 {
        put(&mut server, k, k as u8, k + 1);
    }
    let replies = ReplyTable::new(ReplyLimits {
        window: 4,
        bytes_per_client: 1 << 20,
    })
    .encode();
    let cert = |seq: u64, root| CheckpointCertificate {
        seq: SeqNo(seq),
        service_root: root,
        replies_digest: ReplyTable::digest_of_encoding(&replies),
        checkpoints: vec![],
    };
    let first = cert(8, server.checkpoint(8).expect("checkpoint"));
    let peers = vec![ReplicaId(1), ReplicaId(2)];
    let mut out = Vec::new();
    let mut old = Transfer::start(first, SeqNo(0), ReplicaId(0), peers.clone(), 2, 0, &mut out);
    // Part of the way, then the group moves on: one key changes.
    // Down to the piece requests, then half of the pieces arrive.
    assert!(drive(&mut old, &fetcher, &server, &replies, &mut out, 5).is_none());
    let pieces: Vec<TransferStep> = std::mem::take(&mut out);
    let half = pieces.len() / 2;
    for step in pieces.into_iter().take(half) {
        if let TransferStep::Send(to, request) = step {
            if let Some(answer) = serve(&server, to, &request, &replies) {
                assert!(old.on_message(&fetcher, to, answer, 6, &mut out).is_none());
            }
        }
    }
    assert!(old.bytes_fetched > 300_000, "{}", old.bytes_fetched);
    put(&mut server, 3, 0xee, 100);
    let root = server.checkpoint(16).expect("checkpoint");
    let mut out = Vec::new();
    let mut new = Transfer::start(
        cert(16, root),
        SeqNo(0),
        ReplicaId(0),
        peers,
        2,
        0,
        &mut out,
    );
    new.carry(old.into_fetched());
    let finished =
        drive(&mut new, &fetcher, &server, &replies, &mut out, 200).expect("transfer finished");
    assert!(new.bytes_reused > 0, "nothing reused");
    fetcher.put_objs(finished.objects).expect("install");
    fetcher
        .set_object_count(finished.object_count)
        .expect("count");
    assert_eq!(fetcher.checkpoint(16).expect("checkpoint"), root);
    assert_eq!(fetcher.value(b"key3"), Some(&vec![0xee; 300_000]));
    assert_eq!(fetcher.value(b"key7"), Some(&vec![7; 300_000]));
}
