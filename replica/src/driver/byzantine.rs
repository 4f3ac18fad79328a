//! A Byzantine replica on purpose, for fault tests with real processes (cargo feature
//! `byzantine`; release builds leave it out).
//!
//! A Byzantine replica here is a correct core plus this tampering layer, which sits on the
//! driver's single seal-and-send path: in goes every message the correct core wants to send
//! (with its receivers and their links), out goes what the mode makes of it. The layer holds
//! the replica's own signing key, so what it alters still carries a valid signature unless the
//! mode is to break authentication. The core never knows. What a mode does to a message is
//! [`crate::tamper`]'s, which the simulator's Byzantine behaviours use too; this layer
//! decides which messages, and to whom.
//!
//! `corrupt-state` is the one mode that does not touch messages: [`corrupt_one_file`] flips
//! a byte of a stored file behind the file service's back (a bad disk), and the replica must
//! notice at its next checkpoint and repair itself by state transfer.
//!
//! Randomness comes from a small generator seeded with the replica id, so a mode does the
//! same thing on every run given the same traffic.

use crate::config::ReplicaSecrets;
use crate::rng::Rng;
use crate::tamper;
use crate::wire::{
    AgreementMessage, Authenticator, Batch, ClientMessage, Message, Principal, Proposal, ReplicaId,
    SeqNo, Signed, Signer, FRAME_HEADER_BYTES,
};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Frames a slow replica holds back at most; beyond it they are dropped (a slow link that
/// also loses messages, which the protocol tolerates).
const DELAY_QUEUE: usize = 64 * 1024;

/// How a replica misbehaves. Parsed from `MODE[:PARAMETER]` (see [`Mode::from_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Receives and executes, never sends anything.
    Mute,
    /// Sends everything `delay_ms` late.
    Slow { delay_ms: u64 },
    /// Wrong results in its replies to clients.
    Lie,
    /// As primary, sends a different (validly signed) proposal to every other backup: the
    /// requests of the batch reversed, or the only request dropped. As a backup, votes
    /// (prepares and commits, validly signed) for a different batch to every other replica.
    Equivocate,
    /// Breaks the MAC or a signature of `percent` percent of the frames it sends.
    BadAuth { percent: u8 },
    /// Signs checkpoints with a wrong state digest.
    WrongCheckpoint,
    /// Flips a byte of one of its stored files every `every_ms`, `times` times in all.
    CorruptState { every_ms: u64, times: u32 },
}

pub const MODES_HELP: &str = "mute | slow[:MS] | lie | equivocate | bad-auth[:PERCENT] | wrong-checkpoint | corrupt-state[:SECONDS[:TIMES]]";

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(text: &str) -> Result<Mode, String> {
        let mut parts = text.split(':');
        let name = parts.next().unwrap_or_default();
        let params: Vec<&str> = parts.collect();
        let number = |i: usize, default: u64, what: &str| -> Result<u64, String> {
            match params.get(i) {
                None => Ok(default),
                Some(p) => p
                    .parse::<u64>()
                    .map_err(|_| format!("{what} in `{text}` must be a whole number, not `{p}`")),
            }
        };
        let no_params = |mode: Mode| {
            if params.is_empty() {
                Ok(mode)
            } else {
                Err(format!("`{name}` takes no parameter"))
            }
        };
        match name {
            "mute" => no_params(Mode::Mute),
            "slow" => {
                let delay_ms = number(0, 500, "the delay (milliseconds)")?;
                if !(1..=60_000).contains(&delay_ms) {
                    return Err("the delay of `slow` must be 1..=60000 milliseconds".into());
                }
                Ok(Mode::Slow { delay_ms })
            }
            "lie" => no_params(Mode::Lie),
            "equivocate" => no_params(Mode::Equivocate),
            "bad-auth" => {
                let percent = number(0, 100, "the percentage")?;
                if !(1..=100).contains(&percent) {
                    return Err("the percentage of `bad-auth` must be 1..=100".into());
                }
                Ok(Mode::BadAuth {
                    percent: percent as u8,
                })
            }
            "wrong-checkpoint" => no_params(Mode::WrongCheckpoint),
            "corrupt-state" => {
                let seconds = number(0, 3, "the period (seconds)")?;
                let times = number(1, 3, "the number of corruptions")?;
                if seconds == 0 || times == 0 || times > 1_000_000 {
                    return Err(
                        "`corrupt-state` needs a period ≥ 1 s and 1..=1000000 corruptions".into(),
                    );
                }
                Ok(Mode::CorruptState {
                    every_ms: seconds * 1000,
                    times: times as u32,
                })
            }
            _ => Err(format!(
                "unknown Byzantine mode `{name}`; modes: {MODES_HELP}"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Mute => write!(f, "mute"),
            Mode::Slow { delay_ms } => write!(f, "slow:{delay_ms}"),
            Mode::Lie => write!(f, "lie"),
            Mode::Equivocate => write!(f, "equivocate"),
            Mode::BadAuth { percent } => write!(f, "bad-auth:{percent}"),
            Mode::WrongCheckpoint => write!(f, "wrong-checkpoint"),
            Mode::CorruptState { every_ms, times } => {
                write!(f, "corrupt-state:{}:{times}", every_ms / 1000)
            }
        }
    }
}

/// A receiver of a message and the link that reaches it.
pub type Destination = (Principal, mpsc::Sender<Vec<u8>>);

struct Delayed {
    due: Instant,
    frame: Vec<u8>,
    links: Vec<mpsc::Sender<Vec<u8>>>,
}

/// The tampering layer of one replica. See the module doc.
pub struct Byzantine {
    mode: Mode,
    me: ReplicaId,
    signer: Signer,
    rng: Rng,
    /// Slow mode: frames wait here for the delay thread.
    delay_line: Option<std_mpsc::SyncSender<Delayed>>,
    /// Messages this layer altered, withheld or broke (logged now and then).
    pub tampered: u64,
}

impl Byzantine {
    pub fn new(mode: Mode, secrets: &ReplicaSecrets) -> Byzantine {
        let delay_line = match mode {
            Mode::Slow { .. } => Some(spawn_delay_line()),
            _ => None,
        };
        tracing::warn!(replica = secrets.id.0, %mode, "this replica is Byzantine on purpose");
        Byzantine {
            mode,
            me: secrets.id,
            signer: Signer::from_secret(&secrets.signing_key.0),
            rng: Rng::new(0xB1A5 ^ u64::from(secrets.id.0)),
            delay_line,
            tampered: 0,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sends what the mode makes of `message` (which the correct core wants to go to
    /// `destinations`), sealing it with `auth`.
    pub fn send(&mut self, message: Message, destinations: Vec<Destination>, auth: &Authenticator) {
        if destinations.is_empty() {
            return;
        }
        match self.mode {
            Mode::Mute => self.count(),
            Mode::Slow { delay_ms } => {
                let Some(frame) = seal(&message, &destinations, auth) else {
                    return;
                };
                let links = destinations.into_iter().map(|(_, l)| l).collect();
                let item = Delayed {
                    due: Instant::now() + Duration::from_millis(delay_ms),
                    frame,
                    links,
                };
                if let Some(line) = &self.delay_line {
                    // Full means the replica sends faster than the delay drains: drop.
                    let _ = line.try_send(item);
                }
                self.count();
            }
            Mode::Lie => {
                let message = match message {
                    Message::Client(ClientMessage::Reply(mut reply)) => {
                        tamper::plausible_lie(&mut reply.result);
                        self.count();
                        Message::Client(ClientMessage::Reply(reply))
                    }
                    // A log server's answer to a lock holder's entry (Zzyzx).
                    Message::Lock(crate::wire::LockMessage::Reply(mut reply)) => {
                        if let state_abstraction::LockedResult::Done(result) = &mut reply.result {
                            tamper::plausible_lie(result);
                        }
                        self.count();
                        Message::Lock(crate::wire::LockMessage::Reply(reply))
                    }
                    other => other,
                };
                deliver(&message, &destinations, auth);
            }
            Mode::Equivocate => match message {
                Message::Agreement(AgreementMessage::PrePrepare(proposal))
                    if proposal.pre_prepare.body.primary == self.me && destinations.len() >= 2 =>
                {
                    self.equivocate(proposal, destinations, auth)
                }
                Message::Agreement(AgreementMessage::Prepare(p)) if p.body.replica == self.me => {
                    let seq = p.body.seq;
                    let prepare = |p| Message::Agreement(AgreementMessage::Prepare(p));
                    self.equivocate_vote(seq, p, prepare, destinations, auth)
                }
                Message::Agreement(AgreementMessage::Commit(c)) if c.body.replica == self.me => {
                    let seq = c.body.seq;
                    let commit = |c| Message::Agreement(AgreementMessage::Commit(c));
                    self.equivocate_vote(seq, c, commit, destinations, auth)
                }
                other => deliver(&other, &destinations, auth),
            },
            Mode::BadAuth { percent } => {
                if self.rng.below(100) >= u64::from(percent) {
                    return deliver(&message, &destinations, auth);
                }
                self.count();
                // Alternate: a broken signature inside a correctly MAC'd frame (the receiver
                // knows who sent it), or a broken MAC (it knows only who the frame claims).
                let mut message = message;
                if self.rng.below(2) == 0 && tamper::break_message_signature(&mut message, 7, 0x80)
                {
                    return deliver(&message, &destinations, auth);
                }
                let Some(mut frame) = seal(&message, &destinations, auth) else {
                    return;
                };
                if let Some(last) = (frame.len() - FRAME_HEADER_BYTES).checked_sub(1) {
                    tamper::corrupt_frame(&mut frame, last, 0x5A);
                }
                send_frame(frame, &destinations);
            }
            Mode::WrongCheckpoint => {
                let message = match message {
                    Message::Agreement(AgreementMessage::Checkpoint(cp))
                        if cp.body.replica == self.me =>
                    {
                        self.count();
                        let wrong = tamper::derived_digest(
                            "bftfs.byzantine.wrong_checkpoint",
                            &cp.body.service_root,
                        );
                        Message::Agreement(AgreementMessage::Checkpoint(
                            tamper::checkpoint_with_root(&self.signer, &cp.body, wrong),
                        ))
                    }
                    other => other,
                };
                deliver(&message, &destinations, auth);
            }
            Mode::CorruptState { .. } => deliver(&message, &destinations, auth),
        }
    }

    /// Every other backup (alternating with the sequence number which half) gets a
    /// different batch under the same view and sequence number, signed with our key.
    fn equivocate(
        &mut self,
        proposal: Proposal,
        destinations: Vec<Destination>,
        auth: &Authenticator,
    ) {
        let seq = proposal.pre_prepare.body.seq.0;
        let mut batch = proposal.batch.clone();
        if batch.requests.len() >= 2 {
            batch.requests.reverse();
        } else {
            batch = Batch::default();
        }
        // Validly signed and well formed (the digest binds the agreed value), so only the
        // comparison with what the others got exposes it. The history is left as it was: the
        // previous link is not known here, and a backup that finds it unchained still votes.
        let nondet = proposal.pre_prepare.body.nondet.clone();
        let other = tamper::repropose(&self.signer, &proposal, batch, nondet, None);
        self.split(
            seq,
            Message::Agreement(AgreementMessage::PrePrepare(proposal)),
            Message::Agreement(AgreementMessage::PrePrepare(other)),
            destinations,
            auth,
        );
    }

    /// Our own vote to half the destinations and the same vote for another batch to the
    /// others (see [`Self::split`]), both validly signed.
    fn equivocate_vote<V: tamper::Vote>(
        &mut self,
        seq: SeqNo,
        vote: Signed<V>,
        message: fn(Signed<V>) -> Message,
        destinations: Vec<Destination>,
        auth: &Authenticator,
    ) {
        let other =
            tamper::derived_digest("bftfs.byzantine.other_batch", &vote.body.batch_digest());
        let forked = message(tamper::vote_for(&self.signer, &vote.body, other));
        self.split(seq.0, message(vote), forked, destinations, auth)
    }

    /// `honest` to every other destination, `forked` to the rest; which half gets which
    /// alternates with the sequence number, and a retransmission goes the same way.
    fn split(
        &mut self,
        seq: u64,
        honest: Message,
        forked: Message,
        destinations: Vec<Destination>,
        auth: &Authenticator,
    ) {
        let (mut to_honest, mut to_forked) = (Vec::new(), Vec::new());
        for (i, d) in destinations.into_iter().enumerate() {
            if (i as u64 + seq) % 2 == 1 {
                to_forked.push(d);
            } else {
                to_honest.push(d);
            }
        }
        if !to_forked.is_empty() {
            self.count();
        }
        deliver(&honest, &to_honest, auth);
        deliver(&forked, &to_forked, auth);
    }

    fn count(&mut self) {
        self.tampered += 1;
        if self.tampered <= 3 || self.tampered % 500 == 0 {
            tracing::warn!(replica = self.me.0, mode = %self.mode, tampered = self.tampered, "misbehaving on purpose");
        }
    }
}

fn seal(message: &Message, destinations: &[Destination], auth: &Authenticator) -> Option<Vec<u8>> {
    let receivers: Vec<Principal> = destinations.iter().map(|(p, _)| *p).collect();
    match auth.seal(message, &receivers) {
        Ok(frame) => Some(frame),
        Err(e) => {
            tracing::error!(error = %e, "cannot seal a message");
            None
        }
    }
}

fn send_frame(frame: Vec<u8>, destinations: &[Destination]) {
    for (_, link) in destinations {
        let _ = link.try_send(frame.clone());
    }
}

fn deliver(message: &Message, destinations: &[Destination], auth: &Authenticator) {
    if destinations.is_empty() {
        return;
    }
    if let Some(frame) = seal(message, destinations, auth) {
        send_frame(frame, destinations);
    }
}

/// The thread behind `slow`: holds each frame until it is due. Every frame waits the same
/// delay, so they leave in the order they were sent.
fn spawn_delay_line() -> std_mpsc::SyncSender<Delayed> {
    let (tx, rx) = std_mpsc::sync_channel::<Delayed>(DELAY_QUEUE);
    let _ = std::thread::Builder::new()
        .name("bftfs-slow".into())
        .spawn(move || {
            while let Ok(item) = rx.recv() {
                let now = Instant::now();
                if item.due > now {
                    std::thread::sleep(item.due - now);
                }
                for link in &item.links {
                    let _ = link.try_send(item.frame.clone());
                }
            }
        });
    tx
}

/// `corrupt-state`: flips one byte in the middle of a non-empty regular file of the file
/// service's mirror tree under `tree_root` (chosen with `rng`), as a failing disk would,
/// without telling the service. Returns the file it damaged.
pub fn corrupt_one_file(tree_root: &Path, rng: &mut Rng) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::FileExt;
    let mut files = Vec::new();
    let mut dirs = vec![tree_root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                dirs.push(e.path());
            } else if kind.is_file() && e.metadata().is_ok_and(|m| m.len() > 0) {
                files.push(e.path());
            }
            if files.len() > 100_000 {
                break;
            }
        }
    }
    // Sorted so that the same tree and seed pick the same file.
    files.sort();
    if files.is_empty() {
        return Ok(None);
    }
    let path = files.swap_remove(rng.below(files.len() as u64) as usize);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    let len = file.metadata()?.len();
    let at = rng.below(len);
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at)?;
    byte[0] ^= 0xFF;
    file.write_all_at(&byte, at)?;
    file.sync_data()?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;
    use crate::wire::{Checkpoint, Prepare, SeqNo, View};

    #[test]
    fn modes_parse_and_print() {
        for (text, mode) in [
            ("mute", Mode::Mute),
            ("slow", Mode::Slow { delay_ms: 500 }),
            ("slow:1500", Mode::Slow { delay_ms: 1500 }),
            ("lie", Mode::Lie),
            ("equivocate", Mode::Equivocate),
            ("bad-auth", Mode::BadAuth { percent: 100 }),
            ("bad-auth:30", Mode::BadAuth { percent: 30 }),
            ("wrong-checkpoint", Mode::WrongCheckpoint),
            (
                "corrupt-state",
                Mode::CorruptState {
                    every_ms: 3000,
                    times: 3,
                },
            ),
            (
                "corrupt-state:5:1",
                Mode::CorruptState {
                    every_ms: 5000,
                    times: 1,
                },
            ),
        ] {
            assert_eq!(text.parse::<Mode>(), Ok(mode), "{text}");
            assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
        }
        for bad in [
            "",
            "loud",
            "mute:1",
            "slow:0",
            "slow:x",
            "bad-auth:0",
            "bad-auth:101",
            "corrupt-state:0",
        ] {
            assert!(bad.parse::<Mode>().is_err(), "{bad} parsed");
        }
    }

    fn cluster() -> (ClusterConfig, Vec<ReplicaSecrets>) {
        let keys = crate::config::generate_seeded(
            1,
            (0..4).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect(),
            &[state_abstraction::ClientId(1)],
            crate::config::ProtocolConfig::default(),
            7,
        )
        .expect("config");
        (keys.config, keys.replicas)
    }

    /// What each receiver gets when replica 0 sends `message` in `mode`: the opened message,
    /// or the kind of error.
    fn outcome(mode: Mode, message: Message) -> Vec<Result<Message, &'static str>> {
        let (config, secrets) = cluster();
        let sender = Authenticator::for_replica(&config, &secrets[0]);
        let mut byz = Byzantine::new(mode, &secrets[0]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let mut receivers = Vec::new();
        let mut destinations = Vec::new();
        for s in &secrets[1..] {
            let (tx, rx) = mpsc::channel(16);
            destinations.push((Principal::Replica(s.id), tx));
            receivers.push((Authenticator::for_replica(&config, s), rx));
        }
        byz.send(message, destinations, &sender);
        receivers
            .into_iter()
            .flat_map(|(auth, mut rx)| {
                let mut got = Vec::new();
                while let Ok(frame) = rx.try_recv() {
                    got.push(
                        auth.open(&frame[4..])
                            .map(|m| m.message().clone())
                            .map_err(|e| e.kind()),
                    );
                }
                got
            })
            .collect()
    }

    fn prepare() -> Message {
        let (_, secrets) = cluster();
        let signer = Signer::from_secret(&secrets[0].signing_key.0);
        Message::Agreement(AgreementMessage::Prepare(signer.sign(Prepare {
            view: View(0),
            seq: SeqNo(1),
            batch_digest: state_abstraction::Digest([3; 32]),
            replica: ReplicaId(0),
        })))
    }

    #[test]
    fn mute_sends_nothing_and_bad_auth_breaks_everything() {
        assert!(outcome(Mode::Mute, prepare()).is_empty());
        for _ in 0..4 {
            let got = outcome(Mode::BadAuth { percent: 100 }, prepare());
            assert_eq!(got.len(), 3);
            assert!(
                got.iter()
                    .all(|r| matches!(r, Err("unauthenticated" | "bad_signature"))),
                "{got:?}"
            );
        }
        let got = outcome(Mode::Lie, prepare());
        assert!(
            got.iter().all(|r| r.as_ref().ok() == Some(&prepare())),
            "lie leaves agreement alone"
        );
    }

    #[test]
    fn wrong_checkpoint_is_validly_signed_but_wrong() {
        let (_, secrets) = cluster();
        let signer = Signer::from_secret(&secrets[0].signing_key.0);
        let body = Checkpoint {
            seq: SeqNo(64),
            service_root: state_abstraction::Digest([1; 32]),
            replies_digest: state_abstraction::Digest([2; 32]),
            replica: ReplicaId(0),
        };
        let got = outcome(
            Mode::WrongCheckpoint,
            Message::Agreement(AgreementMessage::Checkpoint(signer.sign(body.clone()))),
        );
        assert_eq!(got.len(), 3);
        for r in got {
            match r {
                Ok(Message::Agreement(AgreementMessage::Checkpoint(c))) => {
                    assert_ne!(c.body.service_root, body.service_root);
                    assert_eq!(c.body.seq, body.seq);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
