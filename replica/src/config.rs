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
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Protocol parameters. Time is in ticks of the driver's clock ([`ProtocolConfig::tick_ns`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default = "fast_path_default")]
    pub fast_path: bool,
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
pub struct ReplicaInfo {
    pub id: ReplicaId,
    /// `host:port` the replica listens on (for replicas and clients alike).
    pub address: String,
    /// Ed25519 verifying key.
    pub public_key: KeyBytes,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct ReplicaSecrets {
    pub id: ReplicaId,
    pub signing_key: KeyBytes,
    pub mac_keys: Vec<(Principal, KeyBytes)>,
}

/// One client's secrets: its signing key and the HMAC key it shares with every replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
}
