//! The Zzyzx locks a mount holds (docs/zzyzx-plan.md §7, milestone M2): taken with
//! `bftfs lock PATH`, given back with `bftfs unlock PATH` or at unmount.
//!
//! While a lock is held, every call is first sent as an entry of the lock's log (one round
//! trip to the replicas, no agreement among them). A call that reaches outside the lock comes
//! back `NeedsAgreement` and takes the ordered path. If the servers froze the lock (another
//! client touched its objects, or one of this mount's calls reached it from outside), the
//! mount has the log sealed and releases the lock through ordering with the certificate, so
//! everything its calls completed under the lock is what merges.
//!
//! M2 sends reads as log entries too, one at a time per lock: correct, not yet fast (the
//! client cache and pipelining are M4).

use super::transport::ReplicatedTransport;
use crate::transport::TransportError;
use replica::driver::client::CallError;
use state_abstraction::fs::locks::{LockRefusal, LockUnit};
use state_abstraction::fs::{decode, encode, Caller, FsOp, FsReply, FsRequest, FsResult, Handle};
use state_abstraction::{LockId, LockedResult};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A lock is renewed when it is older than this (its life is extended 10 minutes at a time).
const RENEW_AFTER: Duration = Duration::from_secs(5 * 60);

struct Held {
    id: LockId,
    root: Handle,
    caller: Caller,
    renewed: Instant,
}

#[derive(Default)]
pub struct HeldLocks {
    held: Mutex<Vec<Held>>,
}

fn refusal_errno(why: LockRefusal) -> i32 {
    match why {
        LockRefusal::Banned => libc::EPERM,
        LockRefusal::Root => libc::EINVAL,
        LockRefusal::TooMany | LockRefusal::AlreadyCovered | LockRefusal::Recent => libc::EBUSY,
    }
}

impl HeldLocks {
    fn first(&self) -> Option<(LockId, bool)> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.first()
            .map(|h| (h.id, h.renewed.elapsed() >= RENEW_AFTER))
    }

    pub fn holds_any(&self) -> bool {
        self.first().is_some()
    }

    /// Runs `req` as the next entry of the held lock's log; `None`: it needs the ordered path.
    pub fn try_locked(
        &self,
        t: &ReplicatedTransport,
        req: &FsRequest,
    ) -> Option<Result<FsResult, TransportError>> {
        let (id, renew) = self.first()?;
        if renew {
            self.renew(t, id);
        }
        match t.client().locked_call(id, encode(req), t.timeout()) {
            Ok(LockedResult::Done(bytes)) => Some(
                decode::<FsResult>(&bytes)
                    .ok_or_else(|| TransportError::Malformed(format!("{} bytes", bytes.len()))),
            ),
            Ok(LockedResult::NeedsAgreement) => None,
            Err(CallError::LockGone) => {
                info!(lock = id.0, "the replicas froze the lock; releasing it");
                self.release(t, id);
                None
            }
            Err(CallError::Timeout(d)) => Some(Err(TransportError::Timeout(d))),
            Err(e) => Some(Err(TransportError::Unreachable(e.to_string()))),
        }
    }

    fn renew(&self, t: &ReplicatedTransport, id: LockId) {
        let caller = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let Some(h) = held.iter_mut().find(|h| h.id == id) else {
                return;
            };
            h.renewed = Instant::now();
            h.caller.clone()
        };
        let req = FsRequest {
            caller,
            op: FsOp::Renew { lock: id },
        };
        match t.ordered(&req) {
            Ok(Ok(_)) => {}
            other => warn!(lock = id.0, result = ?other, "renewing the lock failed"),
        }
    }

    /// Takes a subtree lock on `h` and waits until the replicas serve it.
    pub fn lock(&self, t: &ReplicatedTransport, caller: Caller, h: Handle) -> Result<(), i32> {
        let req = FsRequest {
            caller: caller.clone(),
            op: FsOp::Lock {
                h,
                unit: LockUnit::Subtree,
            },
        };
        let id = match t.ordered(&req) {
            Ok(Ok(FsReply::LockPending { lock })) => lock,
            Ok(Ok(FsReply::LockRefused { why })) => {
                info!(?why, "lock refused");
                return Err(refusal_errno(why));
            }
            Ok(Err(e)) => return Err(e.errno()),
            Ok(Ok(other)) => {
                warn!(?other, "unexpected answer to a lock request");
                return Err(libc::EIO);
            }
            Err(e) => {
                warn!(error = %e, "lock request failed");
                return Err(libc::EIO);
            }
        };
        match t.client().lock_start(id, t.timeout()) {
            Ok(k) => {
                info!(
                    lock = id.0,
                    index = h.index,
                    k,
                    "lock active; calls go through its log"
                );
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                held.push(Held {
                    id,
                    root: h,
                    caller,
                    renewed: Instant::now(),
                });
                Ok(())
            }
            Err(e) => {
                warn!(lock = id.0, error = %e, "the lock did not become active; giving it back");
                let req = FsRequest {
                    caller,
                    op: FsOp::Release {
                        lock: id,
                        cert: None,
                    },
                };
                let _ = t.ordered(&req);
                t.client().lock_end(id);
                Err(libc::EBUSY)
            }
        }
    }

    /// Gives back the lock whose root is `h`.
    pub fn unlock(&self, t: &ReplicatedTransport, h: Handle) -> Result<(), i32> {
        let id = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().find(|x| x.root == h).map(|x| x.id)
        };
        match id {
            Some(id) => {
                if self.release(t, id) {
                    Ok(())
                } else {
                    Err(libc::EIO)
                }
            }
            None => Err(libc::ENOENT),
        }
    }

    /// Seals the lock's log (certificate of where it ends) and releases it through
    /// ordering. Without a certificate (the replicas are unreachable) the release still
    /// freezes it; what completed is then at 2f+1 servers and merges after the grace.
    fn release(&self, t: &ReplicatedTransport, id: LockId) -> bool {
        let held = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let Some(i) = held.iter().position(|x| x.id == id) else {
                return true;
            };
            held.remove(i)
        };
        let cert = match t.client().lock_seal(id, t.timeout()) {
            Ok(cert) => Some(cert),
            Err(e) => {
                warn!(lock = id.0, error = %e, "no seal certificate; releasing without one");
                None
            }
        };
        t.client().lock_end(id);
        let req = FsRequest {
            caller: held.caller,
            op: FsOp::Release { lock: id, cert },
        };
        match t.ordered(&req) {
            Ok(Ok(_)) => {
                info!(lock = id.0, "lock released");
                true
            }
            other => {
                warn!(lock = id.0, result = ?other, "releasing the lock failed");
                false
            }
        }
    }

    pub fn release_all(&self, t: &ReplicatedTransport) {
        let ids: Vec<LockId> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().map(|h| h.id).collect()
        };
        for id in ids {
            self.release(t, id);
        }
    }
}
