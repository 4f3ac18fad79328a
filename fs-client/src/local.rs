//! The unreplicated transport: one [`FileService`] in this process, behind a mutex.
//!
//! This is `bftfs up --f 0`: no replication, no network. It stands in for the cluster's
//! agreement on time by reading the system clock, kept monotonic, as the primary would
//! propose it. Durability: the service's state is saved at every fsync and every few seconds
//! (see `up`), so a crash of the process loses at most the last few seconds of unsynced work.

use crate::transport::{FsTransport, TransportError};
use state_abstraction::fs::{FileService, FsError, FsOp, FsRequest, FsResult};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct LocalTransport {
    inner: Mutex<Local>,
}

struct Local {
    service: FileService,
    /// The last time handed to the service: time given to it never goes backwards, even if
    /// the system clock does.
    last_ns: u64,
}

impl LocalTransport {
    /// Opens (or creates) the file service over `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<LocalTransport> {
        std::fs::create_dir_all(dir)?;
        let service = FileService::open(dir).map_err(|e| {
            anyhow::anyhow!("cannot open the file service in {}: {e}", dir.display())
        })?;
        Ok(LocalTransport {
            inner: Mutex::new(Local {
                service,
                last_ns: 0,
            }),
        })
    }
}

impl LocalTransport {
    /// Saves the service's state so that a reopen finds it.
    pub fn flush(&self) -> anyhow::Result<()> {
        let mut local = self
            .inner
            .lock()
            .map_err(|_| anyhow::anyhow!("the local file service panicked earlier"))?;
        local.service.flush().map_err(|e| anyhow::anyhow!("{e}"))
    }
}

fn clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl FsTransport for LocalTransport {
    fn call(&self, req: FsRequest) -> Result<FsResult, TransportError> {
        let mut local = self.inner.lock().map_err(|_| {
            TransportError::Unreachable("the local file service panicked earlier".into())
        })?;
        let now = clock_ns().max(local.last_ns);
        local.last_ns = now;
        let result = local.service.apply(&req, now);
        // fsync(2) promises durability. Without replicas to hold a copy, that means the
        // service's own table must be on disk too, not just the file's data.
        if let (FsOp::Commit { .. }, Ok(_)) = (&req.op, &result) {
            if let Err(e) = local.service.flush() {
                tracing::error!("fsync: saving the file service state failed: {e}");
                return Ok(Err(FsError::Io));
            }
        }
        Ok(result)
    }
}
