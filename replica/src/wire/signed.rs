//! Signatures: the statements that are signed because they may be forwarded as evidence
//! ([`Statement`]), the digest a signature covers, and the [`Signer`] that makes them.

use super::{encode, Digest, Principal};
use serde::{Deserialize, Serialize};
use state_abstraction::digest::Hasher;

/// An Ed25519 signature, stored as two halves because serde derives arrays up to 32 only.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(pub(super) [u8; 32], pub(super) [u8; 32]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sig:{:02x}{:02x}{:02x}", self.0[0], self.0[1], self.0[2])
    }
}

impl Signature {
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.0);
        out[32..].copy_from_slice(&self.1);
        out
    }
    pub fn from_bytes(bytes: &[u8; 64]) -> Self {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a.copy_from_slice(&bytes[..32]);
        b.copy_from_slice(&bytes[32..]);
        Signature(a, b)
    }
}

/// A statement that is signed because it may be forwarded as evidence.
pub trait Statement: Serialize {
    /// Domain tag for its digest, so a signature on one kind never passes for another.
    const DOMAIN: &'static str;
    /// The principal whose key must have signed it.
    fn signer(&self) -> Principal;
}

/// A statement with its signer's signature over [`statement_digest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub body: T,
    pub signature: Signature,
}

/// The digest a statement's signature covers.
pub fn statement_digest<T: Statement>(body: &T) -> Digest {
    let mut h = Hasher::new(T::DOMAIN);
    // Encoding plain protocol structs cannot fail; an empty encoding would still be
    // domain-separated and would simply fail verification.
    h.bytes(&encode(body).unwrap_or_default());
    h.finish()
}

/// Signs statements with one principal's Ed25519 key. Ed25519 signing is deterministic, so the
/// sans-IO core can own one.
#[derive(Clone)]
pub struct Signer {
    key: ed25519_dalek::SigningKey,
}

impl Signer {
    pub fn from_secret(bytes: &[u8; 32]) -> Self {
        Signer {
            key: ed25519_dalek::SigningKey::from_bytes(bytes),
        }
    }
    pub fn sign<T: Statement>(&self, body: T) -> Signed<T> {
        use ed25519_dalek::Signer as _;
        let digest = statement_digest(&body);
        let signature = Signature::from_bytes(&self.key.sign(&digest.0).to_bytes());
        Signed { body, signature }
    }
}
