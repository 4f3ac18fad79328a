//! Cluster configuration and key material.
//!
//! In: the fault threshold, replica addresses, the client identities, protocol parameters and a
//! source of random bytes. Out: a public [`ClusterConfig`] (addresses, public keys, parameters)
//! that every node reads, and one secret file per replica ([`ReplicaSecrets`]) and per client
//! ([`ClientSecrets`]): an Ed25519 signing key plus the pairwise HMAC keys it shares with each
//! peer. Everything serialises to JSON; keys are written as hex strings.

use crate::wire::{Principal, ReplicaId};
use serde::{Deserialize, Serialize};
use state_abstraction::fs::Squash;
use state_abstraction::ClientId;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("a cluster tolerating f={f} faults needs {need} replicas, {got} addresses given")]
    WrongReplicaCount { f: u32, need: usize, got: usize },
    #[error("replica {0} is listed out of order (replica i must be entry i)")]
    ReplicaOrder(u32),
    #[error("client {0} is listed twice")]
    DuplicateClient(u64),
    #[error("bad public key for {0:?}")]
    BadPublicKey(Principal),
    #[error("protocol parameter {0} is invalid")]
    BadParameter(&'static str),
    #[error("{what} could reach {bytes} bytes, over the {limit}-byte limit: lower {fix}")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        limit: usize,
        fix: &'static str,
    },
    #[error("no random bytes: {0}")]
    Random(String),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Mismatch(String),
}

/// Protocol parameters. Time is in ticks of the driver's clock ([`ProtocolConfig::tick_ns`]).
///
/// In `cluster.json` the times are written as durations (`"2s"`, `"500ms"`; see
/// [`ProtocolFile`]), not ticks: a number of ticks means nothing without the tick length, and
/// someone editing one of them by hand had to know both. Files from before, with
/// `view_change_timeout_ticks: 200` and `tick_ns`, still load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ProtocolFile", into = "ProtocolFile")]
pub struct ProtocolConfig {
    /// A checkpoint is taken after every `checkpoint_interval` batches.
    pub checkpoint_interval: u64,
    /// Sequence numbers in `(stable, stable + log_window]` are accepted (the high-water mark).
    /// A multiple of `checkpoint_interval`, at least twice it, so the log keeps moving while
    /// the next checkpoint becomes stable.
    pub log_window: u64,
    pub batch_requests_max: usize,
    /// Batches a primary keeps proposed but not yet executed; requests arriving meanwhile
    /// queue up and form the next, larger batch.
    pub pipeline_batches_max: u64,
    pub batch_bytes_max: usize,
    /// Largest encoded operation accepted in a request.
    pub operation_bytes_max: usize,
    /// Requests queued at a primary, across all clients.
    pub pending_requests_max: usize,
    /// Requests a client may have in flight; replicas keep this many cached replies per client.
    pub client_window: u64,
    /// First view-change timeout; it doubles on each consecutive view change.
    pub view_change_timeout_ticks: u64,
    pub view_change_timeout_ticks_max: u64,
    /// Period of retransmission of this replica's messages for batches not yet committed.
    pub retransmit_ticks: u64,
    /// How long a replica waits, seeing others ahead, before fetching what it lacks.
    pub catch_up_ticks: u64,
    /// Client: first retransmission timeout (then doubles up to `client_retransmit_ticks_max`).
    pub client_retransmit_ticks: u64,
    pub client_retransmit_ticks_max: u64,
    /// Nominal duration of one tick for real drivers.
    pub tick_ns: u64,
    /// Zyzzyva's speculative fast path (PROTOCOLS §6.1): replicas execute a batch as soon as
    /// they accept its pre-prepare and clients complete on 3f+1 matching speculative replies;
    /// PBFT's commit keeps running behind it. Off: batches execute only once committed.
    /// Config files written before the field existed get the fast path.
    pub fast_path: bool,
}

/// [`ProtocolConfig`] as `cluster.json` spells it: times as durations (`"tick": "10ms"`,
/// `"view_change_timeout": "2s"`), each also accepted in the older form of a number of ticks
/// (`view_change_timeout_ticks`) with `tick_ns`, never both forms of one time.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolFile {
    checkpoint_interval: u64,
    log_window: u64,
    batch_requests_max: usize,
    pipeline_batches_max: u64,
    batch_bytes_max: usize,
    operation_bytes_max: usize,
    pending_requests_max: usize,
    client_window: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tick: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tick_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    view_change_timeout: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    view_change_timeout_ticks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    view_change_timeout_max: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    view_change_timeout_ticks_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retransmit: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retransmit_ticks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    catch_up: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    catch_up_ticks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_retransmit: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_retransmit_ticks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_retransmit_max: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_retransmit_ticks_max: Option<u64>,
    #[serde(default = "fast_path_default")]
    fast_path: bool,
}

impl From<ProtocolConfig> for ProtocolFile {
    fn from(p: ProtocolConfig) -> Self {
        let tick = p.tick_ns.max(1);
        let time = |ticks: u64| {
            Some(DurationText(std::time::Duration::from_nanos(
                ticks.saturating_mul(tick),
            )))
        };
        ProtocolFile {
            checkpoint_interval: p.checkpoint_interval,
            log_window: p.log_window,
            batch_requests_max: p.batch_requests_max,
            pipeline_batches_max: p.pipeline_batches_max,
            batch_bytes_max: p.batch_bytes_max,
            operation_bytes_max: p.operation_bytes_max,
            pending_requests_max: p.pending_requests_max,
            client_window: p.client_window,
            tick: time(1),
            tick_ns: None,
            view_change_timeout: time(p.view_change_timeout_ticks),
            view_change_timeout_ticks: None,
            view_change_timeout_max: time(p.view_change_timeout_ticks_max),
            view_change_timeout_ticks_max: None,
            retransmit: time(p.retransmit_ticks),
            retransmit_ticks: None,
            catch_up: time(p.catch_up_ticks),
            catch_up_ticks: None,
            client_retransmit: time(p.client_retransmit_ticks),
            client_retransmit_ticks: None,
            client_retransmit_max: time(p.client_retransmit_ticks_max),
            client_retransmit_ticks_max: None,
            fast_path: p.fast_path,
        }
    }
}

impl TryFrom<ProtocolFile> for ProtocolConfig {
    type Error = String;

    fn try_from(f: ProtocolFile) -> Result<Self, String> {
        let tick_ns = match (&f.tick, f.tick_ns) {
            (Some(_), Some(_)) => return Err("give `tick` or `tick_ns`, not both".into()),
            (Some(t), None) => {
                u64::try_from(t.0.as_nanos()).map_err(|_| format!("tick {t} is too long"))?
            }
            (None, Some(ns)) => ns,
            (None, None) => return Err("missing field `tick` (e.g. \"10ms\")".into()),
        };
        if tick_ns == 0 {
            return Err("`tick` must be longer than 0".into());
        }
        // A time given as a duration becomes the smallest number of ticks at least that long,
        // so a timeout never fires earlier than written.
        let ticks =
            |name: &str, old_name: &str, text: &Option<DurationText>, old: Option<u64>| match (
                text, old,
            ) {
                (Some(_), Some(_)) => Err(format!("give `{name}` or `{old_name}`, not both")),
                (Some(d), None) => u64::try_from(d.0.as_nanos().div_ceil(u128::from(tick_ns)))
                    .map_err(|_| format!("{name} {d} is too long")),
                (None, Some(n)) => Ok(n),
                (None, None) => Err(format!(
                    "missing field `{name}` (a duration such as \"2s\")"
                )),
            };
        Ok(ProtocolConfig {
            checkpoint_interval: f.checkpoint_interval,
            log_window: f.log_window,
            batch_requests_max: f.batch_requests_max,
            pipeline_batches_max: f.pipeline_batches_max,
            batch_bytes_max: f.batch_bytes_max,
            operation_bytes_max: f.operation_bytes_max,
            pending_requests_max: f.pending_requests_max,
            client_window: f.client_window,
            view_change_timeout_ticks: ticks(
                "view_change_timeout",
                "view_change_timeout_ticks",
                &f.view_change_timeout,
                f.view_change_timeout_ticks,
            )?,
            view_change_timeout_ticks_max: ticks(
                "view_change_timeout_max",
                "view_change_timeout_ticks_max",
                &f.view_change_timeout_max,
                f.view_change_timeout_ticks_max,
            )?,
            retransmit_ticks: ticks(
                "retransmit",
                "retransmit_ticks",
                &f.retransmit,
                f.retransmit_ticks,
            )?,
            catch_up_ticks: ticks("catch_up", "catch_up_ticks", &f.catch_up, f.catch_up_ticks)?,
            client_retransmit_ticks: ticks(
                "client_retransmit",
                "client_retransmit_ticks",
                &f.client_retransmit,
                f.client_retransmit_ticks,
            )?,
            client_retransmit_ticks_max: ticks(
                "client_retransmit_max",
                "client_retransmit_ticks_max",
                &f.client_retransmit_max,
                f.client_retransmit_ticks_max,
            )?,
            tick_ns,
            fast_path: f.fast_path,
        })
    }
}

/// A duration as people write it in a config: a number and a unit (`ns`, `us`, `ms`, `s`,
/// `m`, `h`), e.g. `"2s"`, `"1.5s"`, `"250ms"`. Written back in the largest unit that
/// represents it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationText(pub std::time::Duration);

impl std::fmt::Display for DurationText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ns = self.0.as_nanos();
        for (unit, size) in DURATION_UNITS.iter().rev() {
            if ns != 0 && ns % size == 0 {
                return write!(f, "{}{unit}", ns / size);
            }
        }
        write!(f, "{ns}ns")
    }
}

/// Units of [`DurationText`], in nanoseconds, smallest first.
const DURATION_UNITS: [(&str, u128); 6] = [
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

impl std::str::FromStr for DurationText {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{text}` is not a duration: write a number and a unit, e.g. \"2s\", \"500ms\" (units: ns, us, ms, s, m, h)")
        };
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, unit) = (&t[..split], t[split..].trim());
        let unit = if unit == "µs" { "us" } else { unit };
        let size = DURATION_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, s)| *s)
            .ok_or_else(bad)?;
        // Whole and fractional parts in integers: "0.1s" is exactly 100ms, which a float is not.
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let parse = |digits: &str| -> Result<u128, String> {
            if digits.is_empty() {
                Ok(0)
            } else {
                digits.parse::<u128>().map_err(|_| bad())
            }
        };
        let mut ns = parse(whole)?.checked_mul(size).ok_or_else(bad)?;
        let mut scale = size;
        for digit in frac.chars() {
            scale /= 10;
            let d = u128::from(digit.to_digit(10).ok_or_else(bad)?);
            ns = ns.checked_add(d * scale).ok_or_else(bad)?;
        }
        let ns = u64::try_from(ns).map_err(|_| format!("`{text}` is too long a duration"))?;
        Ok(DurationText(std::time::Duration::from_nanos(ns)))
    }
}

impl Serialize for DurationText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn fast_path_default() -> bool {
    true
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            checkpoint_interval: 64,
            log_window: 256,
            batch_requests_max: 64,
            pipeline_batches_max: 4,
            batch_bytes_max: 4 << 20,
            operation_bytes_max: 4 << 20,
            pending_requests_max: 8192,
            client_window: 64,
            view_change_timeout_ticks: 200,
            view_change_timeout_ticks_max: 6400,
            retransmit_ticks: 50,
            catch_up_ticks: 100,
            client_retransmit_ticks: 100,
            client_retransmit_ticks_max: 1600,
            tick_ns: 10_000_000,
            fast_path: fast_path_default(),
        }
    }
}

impl ProtocolConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.checkpoint_interval == 0 {
            return Err(ConfigError::BadParameter("checkpoint_interval"));
        }
        if self.log_window < 2 * self.checkpoint_interval
            || self.log_window % self.checkpoint_interval != 0
        {
            return Err(ConfigError::BadParameter("log_window"));
        }
        if self.batch_requests_max == 0
            || self.batch_bytes_max == 0
            || self.pipeline_batches_max == 0
        {
            return Err(ConfigError::BadParameter("batch limits"));
        }
        if self.client_window == 0 || self.pending_requests_max == 0 {
            return Err(ConfigError::BadParameter(
                "client_window / pending_requests_max",
            ));
        }
        if self.view_change_timeout_ticks == 0
            || self.retransmit_ticks == 0
            || self.client_retransmit_ticks == 0
        {
            return Err(ConfigError::BadParameter("timeouts"));
        }
        Ok(())
    }
}

/// 32 bytes of key material, written as hex.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBytes(#[serde(with = "hex32")] pub [u8; 32]);

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material into logs.
        write!(f, "KeyBytes(..)")
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 64 {
            return Err(serde::de::Error::custom("expected 64 hex digits"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaInfo {
    pub id: ReplicaId,
    /// `host:port` the replica listens on (for replicas and clients alike).
    pub address: String,
    /// Ed25519 verifying key.
    pub public_key: KeyBytes,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientInfo {
    pub id: ClientId,
    pub public_key: KeyBytes,
    /// Which of the uids and gids this client states are believed (NFS `root_squash` /
    /// `all_squash`). Left out of the JSON when `none`, so older configs read the same.
    #[serde(default, skip_serializing_if = "Squash::is_none")]
    pub squash: Squash,
}

/// What every node of a cluster knows: no secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub f: u32,
    /// Replica `i` is entry `i`.
    pub replicas: Vec<ReplicaInfo>,
    pub clients: Vec<ClientInfo>,
    pub protocol: ProtocolConfig,
}

impl ClusterConfig {
    pub fn n(&self) -> usize {
        self.replicas.len()
    }
    /// 2f+1: prepare, commit, checkpoint and view-change quorums.
    pub fn quorum(&self) -> usize {
        2 * self.f as usize + 1
    }
    /// f+1: a set that holds at least one correct replica.
    pub fn weak_quorum(&self) -> usize {
        self.f as usize + 1
    }
    pub fn replica_ids(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        (0..self.replicas.len() as u32).map(ReplicaId)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let need = 3 * self.f as usize + 1;
        if self.replicas.len() != need {
            return Err(ConfigError::WrongReplicaCount {
                f: self.f,
                need,
                got: self.replicas.len(),
            });
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if r.id.0 as usize != i {
                return Err(ConfigError::ReplicaOrder(r.id.0));
            }
            ed25519_dalek::VerifyingKey::from_bytes(&r.public_key.0)
                .map_err(|_| ConfigError::BadPublicKey(Principal::Replica(r.id)))?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.clients {
            if !seen.insert(c.id) {
                return Err(ConfigError::DuplicateClient(c.id.0));
            }
            ed25519_dalek::VerifyingKey::from_bytes(&c.public_key.0)
                .map_err(|_| ConfigError::BadPublicKey(Principal::Client(c.id)))?;
        }
        self.protocol.validate()?;
        crate::core::bounds::check(self)
    }

    pub fn to_json(&self) -> Result<String, ConfigError> {
        Ok(serde_json::to_string_pretty(self)?)
    }
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: ClusterConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }
}

/// One replica's secrets: its signing key and the HMAC key it shares with every replica and
/// client.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSecrets {
    pub id: ReplicaId,
    pub signing_key: KeyBytes,
    pub mac_keys: Vec<(Principal, KeyBytes)>,
}

/// One client's secrets: its signing key and the HMAC key it shares with every replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSecrets {
    pub id: ClientId,
    pub signing_key: KeyBytes,
    pub mac_keys: Vec<(ReplicaId, KeyBytes)>,
}

impl ReplicaSecrets {
    pub fn to_json(&self) -> Result<String, ConfigError> {
        Ok(serde_json::to_string_pretty(self)?)
    }
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }
}

impl ClientSecrets {
    pub fn to_json(&self) -> Result<String, ConfigError> {
        Ok(serde_json::to_string_pretty(self)?)
    }
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }
}

fn public_key_of(signing: &KeyBytes) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(&signing.0)
        .verifying_key()
        .to_bytes()
}

impl ReplicaSecrets {
    /// Whether these secrets belong to `config`: the replica is in it with this signing key's
    /// public half, and there is a MAC key for every other replica and every client. Keys from
    /// another `keygen` run fail here rather than as refused messages once running.
    pub fn check_against(&self, config: &ClusterConfig) -> Result<(), ConfigError> {
        let Some(me) = config.replicas.get(self.id.0 as usize) else {
            return Err(ConfigError::Mismatch(format!(
                "the secrets are for replica {}, but the cluster config has only {} replicas",
                self.id.0,
                config.n()
            )));
        };
        if public_key_of(&self.signing_key) != me.public_key.0 {
            return Err(ConfigError::Mismatch(format!(
                "the signing key is not replica {}'s in the cluster config (keys from another `bftfs keygen`?)",
                self.id.0
            )));
        }
        let has = |p: Principal| self.mac_keys.iter().any(|(q, _)| *q == p);
        let missing: Vec<String> = config
            .replica_ids()
            .filter(|r| *r != self.id)
            .map(Principal::Replica)
            .chain(config.clients.iter().map(|c| Principal::Client(c.id)))
            .filter(|p| !has(*p))
            .map(|p| match p {
                Principal::Replica(r) => format!("replica {}", r.0),
                Principal::Client(c) => format!("client {}", c.0),
            })
            .collect();
        if !missing.is_empty() {
            return Err(ConfigError::Mismatch(format!(
                "no MAC key shared with {}: the cluster config names principals these secrets were not made for",
                missing.join(", ")
            )));
        }
        Ok(())
    }
}

impl ClientSecrets {
    /// Whether these secrets belong to `config` (see [`ReplicaSecrets::check_against`]).
    pub fn check_against(&self, config: &ClusterConfig) -> Result<(), ConfigError> {
        let Some(me) = config.clients.iter().find(|c| c.id == self.id) else {
            return Err(ConfigError::Mismatch(format!(
                "client {} is not in the cluster config",
                self.id.0
            )));
        };
        if public_key_of(&self.signing_key) != me.public_key.0 {
            return Err(ConfigError::Mismatch(format!(
                "the signing key is not client {}'s in the cluster config (keys from another `bftfs keygen`?)",
                self.id.0
            )));
        }
        let missing: Vec<String> = config
            .replica_ids()
            .filter(|r| !self.mac_keys.iter().any(|(q, _)| q == r))
            .map(|r| r.0.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(ConfigError::Mismatch(format!(
                "no MAC key shared with replica {}",
                missing.join(", ")
            )));
        }
        Ok(())
    }
}

/// Everything [`generate`] makes.
#[derive(Clone, Debug)]
pub struct ClusterKeys {
    pub config: ClusterConfig,
    pub replicas: Vec<ReplicaSecrets>,
    pub clients: Vec<ClientSecrets>,
}

/// Makes keys for a cluster of `3f+1` replicas at `addresses` and the given clients.
/// `random` fills buffers with random bytes: the OS generator in real use
/// ([`generate_with_os_random`]), a seeded generator in the simulator.
pub fn generate(
    f: u32,
    addresses: Vec<String>,
    clients: &[ClientId],
    protocol: ProtocolConfig,
    random: &mut dyn FnMut(&mut [u8]),
) -> Result<ClusterKeys, ConfigError> {
    let n = 3 * f as usize + 1;
    if addresses.len() != n {
        return Err(ConfigError::WrongReplicaCount {
            f,
            need: n,
            got: addresses.len(),
        });
    }
    let mut key = || {
        let mut bytes = [0u8; 32];
        random(&mut bytes);
        KeyBytes(bytes)
    };
    let replica_signing: Vec<KeyBytes> = (0..n).map(|_| key()).collect();
    let client_signing: Vec<KeyBytes> = clients.iter().map(|_| key()).collect();
    // One key per unordered pair of principals.
    let mut pair_keys: BTreeMap<(Principal, Principal), KeyBytes> = BTreeMap::new();
    let replica_ids: Vec<ReplicaId> = (0..n as u32).map(ReplicaId).collect();
    for (i, a) in replica_ids.iter().enumerate() {
        for b in &replica_ids[i + 1..] {
            pair_keys.insert((Principal::Replica(*a), Principal::Replica(*b)), key());
        }
        for c in clients {
            pair_keys.insert((Principal::Replica(*a), Principal::Client(*c)), key());
        }
    }
    let pair = |a: Principal, b: Principal| -> KeyBytes {
        let k = if a <= b { (a, b) } else { (b, a) };
        pair_keys.get(&k).cloned().unwrap_or(KeyBytes([0; 32]))
    };
    let public = |k: &KeyBytes| {
        KeyBytes(
            ed25519_dalek::SigningKey::from_bytes(&k.0)
                .verifying_key()
                .to_bytes(),
        )
    };
    let config = ClusterConfig {
        f,
        replicas: replica_ids
            .iter()
            .zip(addresses)
            .map(|(id, address)| ReplicaInfo {
                id: *id,
                address,
                public_key: public(&replica_signing[id.0 as usize]),
            })
            .collect(),
        clients: clients
            .iter()
            .zip(&client_signing)
            .map(|(id, k)| ClientInfo {
                id: *id,
                public_key: public(k),
                squash: Squash::None,
            })
            .collect(),
        protocol,
    };
    let replicas = replica_ids
        .iter()
        .map(|id| {
            let me = Principal::Replica(*id);
            let mut mac_keys: Vec<(Principal, KeyBytes)> = replica_ids
                .iter()
                .filter(|other| *other != id)
                .map(|other| {
                    (
                        Principal::Replica(*other),
                        pair(me, Principal::Replica(*other)),
                    )
                })
                .collect();
            mac_keys.extend(
                clients
                    .iter()
                    .map(|c| (Principal::Client(*c), pair(me, Principal::Client(*c)))),
            );
            ReplicaSecrets {
                id: *id,
                signing_key: replica_signing[id.0 as usize].clone(),
                mac_keys,
            }
        })
        .collect();
    let client_secrets = clients
        .iter()
        .zip(client_signing)
        .map(|(c, signing_key)| ClientSecrets {
            id: *c,
            signing_key,
            mac_keys: replica_ids
                .iter()
                .map(|r| (*r, pair(Principal::Replica(*r), Principal::Client(*c))))
                .collect(),
        })
        .collect();
    config.validate()?;
    Ok(ClusterKeys {
        config,
        replicas,
        clients: client_secrets,
    })
}

/// [`generate`] with the project's seeded generator ([`crate::rng::Rng`]): the same keys for
/// the same seed on every run, for tests and the simulator. A real cluster's keys come from
/// [`generate_with_os_random`].
pub fn generate_seeded(
    f: u32,
    addresses: Vec<String>,
    clients: &[ClientId],
    protocol: ProtocolConfig,
    seed: u64,
) -> Result<ClusterKeys, ConfigError> {
    let mut rng = crate::rng::Rng::new(seed);
    generate(f, addresses, clients, protocol, &mut |b| rng.fill(b))
}

/// [`generate`] with the operating system's random generator.
pub fn generate_with_os_random(
    f: u32,
    addresses: Vec<String>,
    clients: &[ClientId],
    protocol: ProtocolConfig,
) -> Result<ClusterKeys, ConfigError> {
    let mut failure = None;
    let mut random = |buf: &mut [u8]| {
        if let Err(e) = getrandom::getrandom(buf) {
            failure = Some(e.to_string());
        }
    };
    let keys = generate(f, addresses, clients, protocol, &mut random)?;
    match failure {
        Some(e) => Err(ConfigError::Random(e)),
        None => Ok(keys),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_are_64_hex_digits() {
        let key = KeyBytes([0xAB; 32]);
        let json = serde_json::to_string(&key).expect("json");
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
        assert_eq!(serde_json::from_str::<KeyBytes>(&json).expect("parse"), key);
        let upper = format!("\"{}\"", "AB".repeat(32));
        assert_eq!(
            serde_json::from_str::<KeyBytes>(&upper).expect("parse"),
            key
        );
        for bad in [
            "ab".repeat(31),
            "ab".repeat(33),
            format!("{}zz", "ab".repeat(31)),
        ] {
            assert!(serde_json::from_str::<KeyBytes>(&format!("\"{bad}\"")).is_err());
        }
    }

    #[test]
    fn keys_round_trip_through_json_and_pair_up() {
        let addresses = (0..4).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
        let clients = [ClientId(7), ClientId(9)];
        let keys =
            generate_seeded(1, addresses, &clients, ProtocolConfig::default(), 1).expect("keygen");
        let json = keys.config.to_json().expect("json");
        assert_eq!(ClusterConfig::from_json(&json).expect("parse"), keys.config);
        let secrets =
            ReplicaSecrets::from_json(&keys.replicas[1].to_json().expect("json")).expect("parse");
        assert_eq!(secrets.mac_keys.len(), 3 + 2);
        // Replica 1 and client 9 hold the same pairwise key.
        let r = secrets
            .mac_keys
            .iter()
            .find(|(p, _)| *p == Principal::Client(ClientId(9)))
            .expect("key");
        let c = keys.clients[1]
            .mac_keys
            .iter()
            .find(|(p, _)| *p == ReplicaId(1))
            .expect("key");
        assert_eq!(r.1, c.1);
        assert!(generate(
            1,
            vec!["a".into()],
            &[],
            ProtocolConfig::default(),
            &mut |_| {}
        )
        .is_err());
    }

    /// The `protocol` object as bftfs wrote it before durations: ticks and `tick_ns`.
    const OLD_PROTOCOL: &str = r#"{
        "checkpoint_interval": 64, "log_window": 256, "batch_requests_max": 64,
        "pipeline_batches_max": 4, "batch_bytes_max": 4194304,
        "operation_bytes_max": 4194304, "pending_requests_max": 8192, "client_window": 64,
        "view_change_timeout_ticks": 200, "view_change_timeout_ticks_max": 6400,
        "retransmit_ticks": 50, "catch_up_ticks": 100, "client_retransmit_ticks": 100,
        "client_retransmit_ticks_max": 1600, "tick_ns": 10000000, "fast_path": true
    }"#;

    #[test]
    fn protocol_times_are_durations_and_the_tick_form_still_loads() {
        let old: ProtocolConfig = serde_json::from_str(OLD_PROTOCOL).expect("old form");
        assert_eq!(old, ProtocolConfig::default());
        let json = serde_json::to_value(ProtocolConfig::default()).expect("json");
        assert_eq!(json["view_change_timeout"], "2s");
        assert_eq!(json["tick"], "10ms");
        assert_eq!(json["retransmit"], "500ms");
        assert_eq!(json["client_retransmit_max"], "16s");
        assert!(json.get("tick_ns").is_none() && json.get("retransmit_ticks").is_none());
        let back: ProtocolConfig = serde_json::from_value(json.clone()).expect("new form");
        assert_eq!(back, ProtocolConfig::default());
        // A duration that is not a whole number of ticks rounds up: never earlier than written.
        let mut edited = json.clone();
        edited["view_change_timeout"] = "1.234s".into();
        let p: ProtocolConfig = serde_json::from_value(edited).expect("edited");
        assert_eq!(p.view_change_timeout_ticks, 124);
        // One time in both forms is ambiguous.
        let mut both = json.clone();
        both["retransmit_ticks"] = 7.into();
        let e = serde_json::from_value::<ProtocolConfig>(both).expect_err("both");
        assert!(
            e.to_string().contains("`retransmit` or `retransmit_ticks`"),
            "{e}"
        );
        let mut missing = json;
        missing.as_object_mut().expect("object").remove("catch_up");
        let e = serde_json::from_value::<ProtocolConfig>(missing).expect_err("missing");
        assert!(e.to_string().contains("missing field `catch_up`"), "{e}");
    }

    #[test]
    fn duration_text() {
        let ms = std::time::Duration::from_millis;
        for (text, want) in [
            ("2s", ms(2000)),
            ("1.5s", ms(1500)),
            ("0.1s", ms(100)),
            ("250ms", ms(250)),
            (" 3 m ", ms(180_000)),
            ("1h", ms(3_600_000)),
            ("10us", std::time::Duration::from_micros(10)),
            ("10µs", std::time::Duration::from_micros(10)),
            ("7ns", std::time::Duration::from_nanos(7)),
            (".5s", ms(500)),
        ] {
            assert_eq!(
                text.parse::<DurationText>(),
                Ok(DurationText(want)),
                "{text}"
            );
        }
        for bad in [
            "",
            "2",
            "s",
            "2 seconds",
            "-1s",
            "1.2.3s",
            "1e3ms",
            ".s",
            "99999999999h",
        ] {
            let e = bad.parse::<DurationText>().expect_err(bad);
            assert!(!e.contains('\n'), "{e}");
        }
        for (d, text) in [
            (ms(2000), "2s"),
            (ms(1500), "1500ms"),
            (ms(120_000), "2m"),
            (std::time::Duration::ZERO, "0ns"),
            (std::time::Duration::from_nanos(1_000_001), "1000001ns"),
        ] {
            assert_eq!(DurationText(d).to_string(), text);
            assert_eq!(text.parse::<DurationText>(), Ok(DurationText(d)));
        }
    }

    #[test]
    fn misspelt_fields_are_refused_by_name() {
        let keys = generate(
            1,
            (0..4).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect(),
            &[ClientId(1)],
            ProtocolConfig::default(),
            &mut |b: &mut [u8]| b.fill(3),
        )
        .expect("keygen");
        let config = serde_json::to_value(&keys.config).expect("json");
        let misspell = |path: &[&str], wrong: &str| {
            let mut v = config.clone();
            let mut at = &mut v;
            for p in path {
                at = match p.parse::<usize>() {
                    Ok(i) => &mut at[i],
                    Err(_) => &mut at[*p],
                };
            }
            at.as_object_mut()
                .expect("object")
                .insert(wrong.into(), "root".into());
            ClusterConfig::from_json(&v.to_string())
                .expect_err(wrong)
                .to_string()
        };
        for (path, wrong) in [
            (&["clients", "0"][..], "sqaush"),
            (&[][..], "protocl"),
            (&["protocol"][..], "view_change_timout"),
            (&["replicas", "2"][..], "adress"),
        ] {
            let e = misspell(path, wrong);
            assert!(e.contains(&format!("unknown field `{wrong}`")), "{e}");
        }
        let secrets = serde_json::to_value(&keys.replicas[0]).expect("json");
        let mut bad = secrets.clone();
        bad["signing_keys"] = "x".into();
        let e = ReplicaSecrets::from_json(&bad.to_string()).expect_err("replica");
        assert!(
            e.to_string().contains("unknown field `signing_keys`"),
            "{e}"
        );
        let mut bad = serde_json::to_value(&keys.clients[0]).expect("json");
        bad["mac_key"] = "x".into();
        let e = ClientSecrets::from_json(&bad.to_string()).expect_err("client");
        assert!(e.to_string().contains("unknown field `mac_key`"), "{e}");
    }

    #[test]
    fn secrets_are_checked_against_the_config() {
        let make = |fill: u8| {
            generate(
                1,
                (0..4).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect(),
                &[ClientId(1)],
                ProtocolConfig::default(),
                &mut |b: &mut [u8]| {
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = fill.wrapping_add(i as u8);
                    }
                },
            )
            .expect("keygen")
        };
        let (a, b) = (make(1), make(2));
        a.replicas[2].check_against(&a.config).expect("own");
        a.clients[0].check_against(&a.config).expect("own");
        let e = b.replicas[2].check_against(&a.config).expect_err("other");
        assert!(e.to_string().contains("another `bftfs keygen`"), "{e}");
        let e = b.clients[0].check_against(&a.config).expect_err("other");
        assert!(e.to_string().contains("another `bftfs keygen`"), "{e}");
        let mut short = a.replicas[1].clone();
        short
            .mac_keys
            .retain(|(p, _)| *p != Principal::Client(ClientId(1)));
        let e = short.check_against(&a.config).expect_err("missing");
        assert!(e.to_string().contains("client 1"), "{e}");
    }
}
