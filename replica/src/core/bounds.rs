//! Upper bounds of what the protocol sends and logs, checked against the frame and WAL record
//! limits when a cluster config is validated.
//!
//! Every message and record must fit its limit whatever the log holds and however large the
//! requests are; a message that cannot be sealed is never delivered, and a view change that
//! cannot be sent never completes. What grows with the log (view changes, new views) carries
//! digests only, and what carries request bytes carries one batch; so each bound below depends
//! on f, the log window and the batch limits, never on what clients did. The bounds are
//! measured by encoding the largest instance of each message, so they follow the encoding.

use super::execution::ReplyLimits;
use super::view_change::NONDET_BYTES_MAX;
use crate::config::{ClusterConfig, ConfigError};
use crate::driver::wal::RECORD_BYTES_MAX;
use crate::wire::{
    encode, AgreementMessage, Batch, Checkpoint, CheckpointCertificate, Commit, CommitCertificate,
    Digest, Evidence, Message, NewView, PrePrepare, Prepare, PreparedCertificate, Proposal,
    ReplicaId, Request, SeqNo, Signature, Signed, Timestamp, View, ViewChange, ViewChangeMessage,
    FRAME_BYTES_MAX,
};
use state_abstraction::ClientId;

/// Room for the frame around a message: sender, one MAC tag per receiver, lengths.
fn frame_overhead(n: usize) -> usize {
    1024 + n * 64
}

fn signed<T>(body: T) -> Signed<T> {
    Signed {
        body,
        signature: Signature::from_bytes(&[0xff; 64]),
    }
}

/// Every integer at its widest encoding.
const BIG: u64 = u64::MAX;

fn pre_prepare() -> Signed<PrePrepare> {
    signed(PrePrepare {
        view: View(BIG),
        seq: SeqNo(BIG),
        batch_digest: Digest([0xff; 32]),
        nondet: vec![0xff; NONDET_BYTES_MAX],
        primary: ReplicaId(u32::MAX),
        history: Digest([0xff; 32]),
    })
}

fn stable(config: &ClusterConfig) -> CheckpointCertificate {
    CheckpointCertificate {
        seq: SeqNo(BIG),
        service_root: Digest([0xff; 32]),
        replies_digest: Digest([0xff; 32]),
        checkpoints: (0..config.n())
            .map(|_| {
                signed(Checkpoint {
                    seq: SeqNo(BIG),
                    service_root: Digest([0xff; 32]),
                    replies_digest: Digest([0xff; 32]),
                    replica: ReplicaId(u32::MAX),
                })
            })
            .collect(),
    }
}

/// The largest view change: for every slot of the window, a prepared certificate with a
/// prepare from every backup and a fast item of a higher view.
fn largest_view_change(config: &ClusterConfig) -> Signed<ViewChange> {
    let prepare = signed(Prepare {
        view: View(BIG),
        seq: SeqNo(BIG),
        batch_digest: Digest([0xff; 32]),
        replica: ReplicaId(u32::MAX),
    });
    let mut evidence = Vec::new();
    for _ in 0..config.protocol.log_window {
        evidence.push(Evidence::Prepared(PreparedCertificate {
            pre_prepare: pre_prepare(),
            prepares: vec![prepare.clone(); config.n() - 1],
        }));
        evidence.push(Evidence::Accepted(pre_prepare()));
    }
    signed(ViewChange {
        new_view: View(BIG),
        replica: ReplicaId(u32::MAX),
        stable: stable(config),
        evidence,
    })
}

fn encoded(message: &Message) -> usize {
    encode(message).map(|b| b.len()).unwrap_or(usize::MAX)
}

/// The largest new-view message: 2f+1 largest view changes and a pre-prepare per slot.
pub fn new_view_bytes(config: &ClusterConfig) -> usize {
    let vc = largest_view_change(config);
    let nv = signed(NewView {
        view: View(BIG),
        primary: ReplicaId(u32::MAX),
        view_changes: vec![vc; config.quorum()],
        pre_prepares: vec![pre_prepare(); config.protocol.log_window as usize],
    });
    encoded(&Message::ViewChange(ViewChangeMessage::NewView(nv))) + frame_overhead(config.n())
}

/// The largest batch message: a commit certificate (a proposal with its batch and a commit
/// from every replica), which is larger than the pre-prepare with the same batch.
pub fn batch_message_bytes(config: &ClusterConfig) -> usize {
    let p = &config.protocol;
    let requests = p.batch_requests_max.max(1);
    // The operation bytes of a batch are capped by `batch_bytes_max`, each one by
    // `operation_bytes_max`; the requests' own fields by their count.
    let request = signed(Request {
        client: ClientId(BIG),
        timestamp: Timestamp(BIG),
        operation: Vec::new(),
        read_only: false,
    });
    let batch = Batch {
        requests: vec![request; requests],
    };
    let commit = signed(Commit {
        view: View(BIG),
        seq: SeqNo(BIG),
        batch_digest: Digest([0xff; 32]),
        replica: ReplicaId(u32::MAX),
    });
    let cert = CommitCertificate {
        proposal: Proposal {
            pre_prepare: pre_prepare(),
            batch,
        },
        commits: vec![commit; config.n()],
    };
    let shell = encoded(&Message::Agreement(AgreementMessage::Committed(Box::new(
        cert,
    ))));
    // Each operation's length prefix is within the 16 bytes per request counted here.
    shell
        + requests * 16
        + p.batch_bytes_max.max(p.operation_bytes_max)
        + frame_overhead(config.n())
}

/// The largest reply cache (state transfer's `Replies` message, a checkpoint's WAL record):
/// each client's reply bodies within its budget, and per entry its timestamp, signature and
/// lengths.
pub fn reply_cache_bytes(config: &ClusterConfig) -> usize {
    let limits = ReplyLimits::of(config);
    let clients = config.clients.len().max(1);
    let per_entry = 8 + 64 + 16;
    clients * (limits.bytes_per_client + limits.window as usize * per_entry + 64) + 1024
}

/// The largest message or WAL record of Zzyzx's log protocol: an `Entries` answer (entries
/// up to `operation_bytes_max` of operations together, the first one whole however large,
/// at most [`crate::wire::lock::LOCK_ENTRIES_PER_MESSAGE`]); an `Entry` message or record
/// carries one of them.
pub fn lock_message_bytes(config: &ClusterConfig) -> usize {
    use crate::wire::{LockEntry, LockMessage, LoggedEntry};
    use state_abstraction::LockId;
    let entry = |op: usize| LoggedEntry {
        entry: signed(LockEntry {
            holder: ClientId(BIG),
            lock: LockId(BIG),
            epoch: u32::MAX,
            k: BIG,
            prev: Digest([0xff; 32]),
            time_ns: BIG,
            op_digest: Digest([0xff; 32]),
        }),
        op: vec![0xff; op],
    };
    let max = crate::wire::lock::LOCK_ENTRIES_PER_MESSAGE;
    let op = config.protocol.operation_bytes_max;
    // One whole operation plus up to `op` bytes of further ones (`on_lock_fetch`).
    let mut entries = vec![entry(op), entry(op)];
    entries.extend((2..max).map(|_| entry(0)));
    let m = Message::Lock(LockMessage::Entries {
        lock: LockId(BIG),
        epoch: u32::MAX,
        entries,
    });
    encoded(&m) + frame_overhead(config.n())
}

/// Refuses a config under which some message or WAL record could outgrow its limit.
pub fn check(config: &ClusterConfig) -> Result<(), ConfigError> {
    let frame = FRAME_BYTES_MAX;
    let checks: [(&'static str, usize, usize, &'static str); 5] = [
        (
            "a lock log message or WAL record",
            lock_message_bytes(config),
            frame.min(RECORD_BYTES_MAX),
            "operation_bytes_max",
        ),
        (
            "a new-view message",
            new_view_bytes(config),
            frame,
            "log_window",
        ),
        (
            "a message carrying one batch",
            batch_message_bytes(config),
            frame,
            "batch_bytes_max / operation_bytes_max",
        ),
        (
            "a WAL record carrying one batch",
            batch_message_bytes(config),
            RECORD_BYTES_MAX,
            "batch_bytes_max / operation_bytes_max",
        ),
        (
            "a WAL record or state-transfer message carrying the reply cache",
            reply_cache_bytes(config),
            frame.min(RECORD_BYTES_MAX),
            "the number of clients or client_window",
        ),
    ];
    for (what, bytes, limit, fix) in checks {
        if bytes > limit {
            return Err(ConfigError::TooLarge {
                what,
                bytes,
                limit,
                fix,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{generate, ProtocolConfig};

    fn config(f: u32, clients: u64, protocol: ProtocolConfig) -> ClusterConfig {
        try_config(f, clients, protocol).expect("keys")
    }

    fn try_config(
        f: u32,
        clients: u64,
        protocol: ProtocolConfig,
    ) -> Result<ClusterConfig, ConfigError> {
        let mut x = 3u8;
        let addresses = (0..3 * f + 1).map(|i| format!("a{i}")).collect();
        let ids: Vec<ClientId> = (1..=clients).map(ClientId).collect();
        generate(f, addresses, &ids, ProtocolConfig::default(), &mut |b| {
            for byte in b.iter_mut() {
                x = x.wrapping_mul(31).wrapping_add(7);
                *byte = x;
            }
        })
        .map(|k| ClusterConfig {
            protocol,
            ..k.config
        })
    }

    /// The default parameters fit every limit at f = 1, 2 and 3, with room to spare: a view
    /// change after a log full of 4 MiB batches is a few hundred KiB.
    #[test]
    fn default_parameters_fit_every_limit() {
        for f in 1..=3 {
            let c = config(f, 16, ProtocolConfig::default());
            check(&c).expect("fits");
            let nv = new_view_bytes(&c);
            assert!(nv < FRAME_BYTES_MAX / 4, "f={f}: new view of {nv} bytes");
            assert!(batch_message_bytes(&c) < FRAME_BYTES_MAX);
            assert!(reply_cache_bytes(&c) < FRAME_BYTES_MAX);
            assert!(lock_message_bytes(&c) < FRAME_BYTES_MAX / 2);
            eprintln!(
                "f={f}: new view <= {nv} B, batch message <= {} B, reply cache <= {} B",
                batch_message_bytes(&c),
                reply_cache_bytes(&c)
            );
        }
    }

    #[test]
    fn parameters_that_could_outgrow_a_limit_are_refused() {
        let huge_window = ProtocolConfig {
            log_window: 1 << 16,
            ..ProtocolConfig::default()
        };
        let err = check(&config(1, 2, huge_window)).expect_err("refused");
        assert!(err.to_string().contains("log_window"), "{err}");
        let huge_batch = ProtocolConfig {
            batch_bytes_max: 40 << 20,
            ..ProtocolConfig::default()
        };
        let err = check(&config(1, 2, huge_batch)).expect_err("refused");
        assert!(err.to_string().contains("batch_bytes_max"), "{err}");
        // Too many clients for the reply cache: refused when the keys are made.
        let err = try_config(1, 1000, ProtocolConfig::default()).expect_err("refused");
        assert!(err.to_string().contains("clients"), "{err}");
    }

    /// The bound is an upper bound of what the core really builds: a view change it signs
    /// over a full log of the widest evidence is no larger.
    #[test]
    fn the_measured_view_change_is_the_largest() {
        let c = config(2, 2, ProtocolConfig::default());
        let vc = largest_view_change(&c);
        let one = encoded(&Message::ViewChange(ViewChangeMessage::ViewChange(vc)));
        assert!(one * c.quorum() < new_view_bytes(&c));
    }
}
