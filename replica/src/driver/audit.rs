//! The client's check of the replicas: which replicas' replies disagreed with the result the
//! client accepted.
//!
//! Only a client can see a replica that lies in its replies (the replicas never see each
//! other's replies), so the client counts them, per replica, for `bftfs status`. In: every
//! authenticated ordered reply and every completed ordered request. Out: counts per replica.
//! Read-only replies are left out: a correct replica that lags may answer a read-only request
//! with an older state, while an ordered reply from a correct replica is always the agreed
//! result. A reply that arrives after its request completed is still compared (a lying
//! replica is often not among the first 2f+1 to answer).

use state_abstraction::digest::Hasher;
use state_abstraction::Digest;
use std::collections::BTreeMap;

/// Requests remembered (waiting for their result, or completed and waiting for late replies).
const REMEMBERED: usize = 4096;

#[derive(Default)]
pub struct ReplyAudit {
    /// Replies to requests that have not completed: timestamp → (replica, result digest).
    waiting: BTreeMap<u64, Vec<(u32, Digest)>>,
    /// Results of completed requests, by timestamp.
    completed: BTreeMap<u64, Digest>,
    /// Replies that disagreed with the completed result, per replica.
    disagreed: BTreeMap<u32, u64>,
    /// Replies compared, per replica.
    compared: BTreeMap<u32, u64>,
}

fn result_digest(result: &[u8]) -> Digest {
    let mut h = Hasher::new("bftfs.audit.result");
    h.bytes(result);
    h.finish()
}

fn trim<V>(map: &mut BTreeMap<u64, V>) {
    while map.len() > REMEMBERED {
        map.pop_first();
    }
}

impl ReplyAudit {
    /// An authenticated ordered reply from `replica` to request `timestamp`.
    pub fn on_reply(&mut self, replica: u32, timestamp: u64, result: &[u8]) {
        let digest = result_digest(result);
        if let Some(agreed) = self.completed.get(&timestamp) {
            let agreed = *agreed;
            self.compare(replica, digest, agreed);
            return;
        }
        let replies = self.waiting.entry(timestamp).or_default();
        // A retransmitted reply replaces the replica's earlier one.
        replies.retain(|(r, _)| *r != replica);
        replies.push((replica, digest));
        trim(&mut self.waiting);
    }

    /// Ordered request `timestamp` completed with `result`.
    pub fn on_complete(&mut self, timestamp: u64, result: &[u8]) {
        let agreed = result_digest(result);
        for (replica, digest) in self.waiting.remove(&timestamp).unwrap_or_default() {
            self.compare(replica, digest, agreed);
        }
        self.completed.insert(timestamp, agreed);
        trim(&mut self.completed);
    }

    fn compare(&mut self, replica: u32, digest: Digest, agreed: Digest) {
        *self.compared.entry(replica).or_default() += 1;
        if digest != agreed {
            *self.disagreed.entry(replica).or_default() += 1;
        }
    }

    /// Replies per replica that disagreed with the accepted result.
    pub fn disagreed(&self) -> &BTreeMap<u32, u64> {
        &self.disagreed
    }

    /// Replies per replica compared with an accepted result.
    pub fn compared(&self) -> &BTreeMap<u32, u64> {
        &self.compared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_early_and_late_disagreeing_replies() {
        let mut a = ReplyAudit::default();
        a.on_reply(0, 7, b"ok");
        a.on_reply(1, 7, b"ok");
        a.on_reply(3, 7, b"lie");
        a.on_complete(7, b"ok");
        a.on_reply(2, 7, b"ok");
        a.on_reply(3, 8, b"lie again");
        a.on_complete(8, b"fine");
        a.on_reply(3, 7, b"late lie");
        assert_eq!(a.disagreed().get(&3), Some(&3));
        assert_eq!(a.disagreed().len(), 1, "{:?}", a.disagreed());
        assert_eq!(a.compared().get(&2), Some(&1));
    }
}
