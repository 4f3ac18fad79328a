//! How the FUSE adapter reaches the file service.
//!
//! In: an [`FsRequest`] (the caller and the operation). Out: the service's [`FsResult`], or a
//! [`TransportError`] when no answer could be had (cluster unreachable, timeout). The adapter
//! turns a transport error into EIO; it never retries on its own, because a transport that can
//! retry (the replicated one) knows better when a retry is safe.
//!
//! Two implementations: [`crate::local::LocalTransport`] (one in-process file service, no
//! replication: `bftfs up --f 0`) and [`crate::cluster::ReplicatedTransport`] (the BFT client
//! protocol through `replica::driver::client::ClientHandle`: `up --f N`, `mount`).

use state_abstraction::fs::{Caller, FsRequest, FsResult, Handle};
use std::time::Duration;

/// Why a request got no answer from the file service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No (sufficient) answer within the configured time.
    #[error("no answer from the file service within {0:?}")]
    Timeout(Duration),
    /// The cluster (or the local service) cannot be reached at all.
    #[error("file service unreachable: {0}")]
    Unreachable(String),
    /// The service answered with bytes that do not decode as an `FsResult`.
    #[error("malformed reply from the file service: {0}")]
    Malformed(String),
}

/// A way to run one file-service request and wait for its result.
///
/// Called concurrently from several FUSE threads: an implementation must allow many requests
/// in flight (or serialise them itself, as the local one does).
pub trait FsTransport: Send + Sync {
    fn call(&self, req: FsRequest) -> Result<FsResult, TransportError>;

    /// Takes a Zzyzx lock on the subtree at `h` for this mount (docs/zzyzx-plan.md §7.5)
    /// and waits until it is served. Errors are errnos for the caller of `setxattr`.
    /// Transports without locks refuse with EOPNOTSUPP.
    fn lock(&self, _caller: Caller, _h: Handle) -> Result<(), i32> {
        Err(libc::EOPNOTSUPP)
    }

    /// Gives back this mount's lock whose root is `h` (ENOENT: none).
    fn unlock(&self, _caller: Caller, _h: Handle) -> Result<(), i32> {
        Err(libc::EOPNOTSUPP)
    }

    /// Gives back every lock this mount holds (unmount).
    fn release_all(&self) {}
}

impl<T: FsTransport + ?Sized> FsTransport for std::sync::Arc<T> {
    fn call(&self, req: FsRequest) -> Result<FsResult, TransportError> {
        (**self).call(req)
    }
    fn lock(&self, caller: Caller, h: Handle) -> Result<(), i32> {
        (**self).lock(caller, h)
    }
    fn unlock(&self, caller: Caller, h: Handle) -> Result<(), i32> {
        (**self).unlock(caller, h)
    }
    fn release_all(&self) {
        (**self).release_all()
    }
}
