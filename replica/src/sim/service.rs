//! The services a simulated replica runs: the key-value service (the default: small and all
//! in memory) or the file service over a real directory of its own.
//!
//! In: the scenario's [`ServiceKind`] and, per replica, a data directory (file service only).
//! Out: [`SimService`], the one service type the simulated cores run. The simulator is not
//! generic over the service: a test, a replay or a named scenario picks it at run time from
//! the scenario, so one type that holds either keeps `Sim` a single type.
//!
//! Beyond BASE's upcalls the simulator needs two things of a service: what a restart finds
//! after a crash ([`SimService::after_crash`]), and the times a faulty primary proposes
//! ([`super::Behaviour::SkewedTime`]: inside what backups accept, not what a correct primary
//! would propose).

use super::Rng;
use state_abstraction::digest::Digest;
use state_abstraction::fs::object::Header;
use state_abstraction::fs::{FileService, TIME_SKEW_MAX_NS};
use state_abstraction::kv::{KvService, MAX_CLOCK_SKEW_NS};
use state_abstraction::RequestPolicy;
use state_abstraction::{AbstractObject, ClientId, SeqNo, Service, ServiceError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which service the replicas of a scenario run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ServiceKind {
    /// [`KvService`], checked against a model map (linearizability).
    #[default]
    Kv,
    /// [`FileService`] over a directory per replica, with the file workload of
    /// [`super::fs_workload`], checked against a reference file service.
    Fs(FsWorkload),
}

/// The shape of a file-service workload (see [`super::fs_workload`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsWorkload {
    /// Large writes per client, each of a size drawn from `large_write_bytes` and sent as
    /// consecutive writes of at most the service's largest write (`object::MAX_IO`, 1 MiB),
    /// as the FUSE client sends them.
    pub large_writes: u64,
    /// Bytes of one large write (inclusive range).
    pub large_write_bytes: (u64, u64),
}

enum Inner {
    Kv(KvService),
    Fs(Box<FileService>),
}

/// A simulated replica's service. See the module doc.
pub struct SimService {
    inner: Inner,
    /// A faulty primary's clock (see [`super::Behaviour::SkewedTime`]): proposals are drawn
    /// from this seed and the primary's clock.
    skew: Option<u64>,
    /// Ordered requests run with a proposed time below this replica's newest agreed time: the
    /// ones that only the clamp at execution keeps from moving time backwards.
    backward_proposals: u64,
    /// Ordered requests this replica ran whose proposed time was below its newest agreed
    /// time, so that the time they got was the clamp's (file service only).
    clamped: u64,
}

impl SimService {
    pub fn kv() -> Self {
        SimService::new(Inner::Kv(KvService::new()))
    }

    /// The file service over `dir` (created if missing, reopened otherwise). Data
    /// directories of the simulator are never on btrfs by choice: checkpoints are then
    /// plain or reflinked copies, which is what the service runs on ext4, xfs and tmpfs.
    pub fn fs(dir: &Path) -> Result<Self, String> {
        let service = FileService::open(dir)
            .map_err(|e| format!("file service over {}: {e}", dir.display()))?;
        Ok(SimService::new(Inner::Fs(Box::new(service))))
    }

    fn new(inner: Inner) -> Self {
        SimService {
            inner,
            skew: None,
            backward_proposals: 0,
            clamped: 0,
        }
    }

    /// Makes this service's proposals those of a faulty primary (see the module doc).
    pub fn skewed(mut self, seed: u64) -> Self {
        self.skew = Some(seed);
        self
    }

    pub fn backward_proposals(&self) -> u64 {
        self.backward_proposals
    }

    pub fn clamped(&self) -> u64 {
        self.clamped
    }

    /// The service as a restart finds it: the key-value service rolls back to its newest
    /// checkpoint (its "disk"); the file service is dropped without saving anything, as a
    /// killed process would be, and opened again over its data directory.
    pub fn after_crash(self) -> Result<Self, String> {
        let SimService {
            inner,
            skew,
            backward_proposals,
            clamped,
        } = self;
        let inner = match inner {
            Inner::Kv(mut kv) => {
                kv.reopen();
                Inner::Kv(kv)
            }
            Inner::Fs(fs) => {
                let dir = fs.data_dir().to_path_buf();
                fs.simulate_crash();
                let reopened = FileService::open(&dir)
                    .map_err(|e| format!("reopening {} after a crash: {e}", dir.display()))?;
                Inner::Fs(Box::new(reopened))
            }
        };
        Ok(SimService {
            inner,
            skew,
            backward_proposals,
            clamped,
        })
    }
}

/// The simulated service's [`RequestPolicy`]: the real service's, or with
/// [`SimService::skewed`] a faulty primary's proposals.
struct SimPolicy {
    inner: Arc<dyn RequestPolicy>,
    /// The seed, and the largest distance from the clock a correct backup accepts.
    skew: Option<(u64, u64)>,
    fs: bool,
}

impl SimPolicy {
    /// A faulty primary's time: anywhere within half of what a correct backup accepts at
    /// `now_ns`, either way (messages take a few ticks, and backups check against their own
    /// clocks), drawn afresh for each proposal, so it jumps ahead of the clocks and back below
    /// times already agreed.
    fn skewed_time(seed: u64, bound: u64, now_ns: u64) -> u64 {
        let mut rng = Rng::new(seed ^ now_ns.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let half = bound / 2;
        now_ns.saturating_sub(half) + rng.below(2 * half)
    }
}

impl RequestPolicy for SimPolicy {
    fn is_read_only(&self, op: &[u8]) -> bool {
        self.inner.is_read_only(op)
    }

    fn propose_nondet(&self, now_ns: u64) -> Vec<u8> {
        match self.skew {
            Some((seed, bound)) => {
                let time = Self::skewed_time(seed, bound, now_ns);
                if self.fs {
                    state_abstraction::fs::encode(&time)
                } else {
                    time.to_le_bytes().to_vec()
                }
            }
            None => self.inner.propose_nondet(now_ns),
        }
    }

    fn check_nondet(&self, nondet: &[u8], now_ns: u64) -> bool {
        self.inner.check_nondet(nondet, now_ns)
    }
}

impl Service for SimService {
    fn execute(&mut self, op: &[u8], client: ClientId, nondet: &[u8], read_only: bool) -> Vec<u8> {
        match &mut self.inner {
            Inner::Kv(kv) => {
                let proposed = <[u8; 8]>::try_from(nondet).map(u64::from_le_bytes);
                if !read_only && proposed.is_ok_and(|t| t < kv.last_time()) {
                    self.backward_proposals += 1;
                }
                kv.execute(op, client, nondet, read_only)
            }
            Inner::Fs(fs) => {
                if !read_only {
                    let proposed = state_abstraction::fs::decode::<u64>(nondet);
                    if proposed.is_some_and(|t| t < fs_agreed_time(fs)) {
                        self.clamped += 1;
                        self.backward_proposals += 1;
                    }
                }
                fs.execute(op, client, nondet, read_only)
            }
        }
    }

    fn policy(&self) -> Arc<dyn RequestPolicy> {
        let (inner, bound, fs) = match &self.inner {
            Inner::Kv(kv) => (kv.policy(), MAX_CLOCK_SKEW_NS, false),
            Inner::Fs(fs) => (fs.policy(), TIME_SKEW_MAX_NS, true),
        };
        Arc::new(SimPolicy {
            inner,
            skew: self.skew.map(|seed| (seed, bound)),
            fs,
        })
    }

    fn object_count(&self) -> u64 {
        match &self.inner {
            Inner::Kv(kv) => kv.object_count(),
            Inner::Fs(fs) => fs.object_count(),
        }
    }

    fn get_obj(&self, index: u64) -> Result<AbstractObject, ServiceError> {
        match &self.inner {
            Inner::Kv(kv) => kv.get_obj(index),
            Inner::Fs(fs) => fs.get_obj(index),
        }
    }

    fn put_objs(&mut self, objs: Vec<(u64, AbstractObject)>) -> Result<(), ServiceError> {
        match &mut self.inner {
            Inner::Kv(kv) => kv.put_objs(objs),
            Inner::Fs(fs) => fs.put_objs(objs),
        }
    }

    fn set_object_count(&mut self, count: u64) -> Result<(), ServiceError> {
        match &mut self.inner {
            Inner::Kv(kv) => kv.set_object_count(count),
            Inner::Fs(fs) => fs.set_object_count(count),
        }
    }

    fn checkpoint(&mut self, seq: SeqNo) -> Result<Digest, ServiceError> {
        match &mut self.inner {
            Inner::Kv(kv) => kv.checkpoint(seq),
            Inner::Fs(fs) => fs.checkpoint(seq),
        }
    }

    fn rollback_to(&mut self, seq: SeqNo) -> Result<(), ServiceError> {
        match &mut self.inner {
            Inner::Kv(kv) => kv.rollback_to(seq),
            Inner::Fs(fs) => fs.rollback_to(seq),
        }
    }

    fn discard_before(&mut self, seq: SeqNo) {
        match &mut self.inner {
            Inner::Kv(kv) => kv.discard_before(seq),
            Inner::Fs(fs) => fs.discard_before(seq),
        }
    }

    fn checkpoints(&self) -> Vec<(SeqNo, Digest)> {
        match &self.inner {
            Inner::Kv(kv) => kv.checkpoints(),
            Inner::Fs(fs) => fs.checkpoints(),
        }
    }

    fn modified_since(&self, seq: SeqNo) -> Result<Vec<u64>, ServiceError> {
        match &self.inner {
            Inner::Kv(kv) => kv.modified_since(seq),
            Inner::Fs(fs) => fs.modified_since(seq),
        }
    }

    fn partition_node(&self, seq: SeqNo, level: u32, index: u64) -> Option<Vec<Digest>> {
        match &self.inner {
            Inner::Kv(kv) => kv.partition_node(seq, level, index),
            Inner::Fs(fs) => fs.partition_node(seq, level, index),
        }
    }

    fn get_obj_at(&self, seq: SeqNo, index: u64) -> Option<AbstractObject> {
        match &self.inner {
            Inner::Kv(kv) => kv.get_obj_at(seq, index),
            Inner::Fs(fs) => fs.get_obj_at(seq, index),
        }
    }

    fn piece_digests_at(&self, seq: SeqNo, index: u64) -> Option<Vec<Digest>> {
        match &self.inner {
            Inner::Kv(kv) => kv.piece_digests_at(seq, index),
            Inner::Fs(fs) => fs.piece_digests_at(seq, index),
        }
    }

    fn get_piece_at(&self, seq: SeqNo, index: u64, piece: u32) -> Option<Vec<u8>> {
        match &self.inner {
            Inner::Kv(kv) => kv.get_piece_at(seq, index, piece),
            Inner::Fs(fs) => fs.get_piece_at(seq, index, piece),
        }
    }

    fn checkpoint_work_pending(&self) -> bool {
        match &self.inner {
            Inner::Kv(kv) => kv.checkpoint_work_pending(),
            Inner::Fs(fs) => fs.checkpoint_work_pending(),
        }
    }

    fn lock_infos(&self) -> Vec<state_abstraction::locking::LockInfo> {
        match &self.inner {
            Inner::Kv(kv) => kv.lock_infos(),
            Inner::Fs(fs) => fs.lock_infos(),
        }
    }

    fn lock_base_page(
        &self,
        lock: state_abstraction::LockId,
        from: state_abstraction::locking::BaseCursor,
        budget: usize,
    ) -> Option<state_abstraction::locking::BasePage> {
        match &self.inner {
            Inner::Kv(kv) => kv.lock_base_page(lock, from, budget),
            Inner::Fs(fs) => fs.lock_base_page(lock, from, budget),
        }
    }

    fn lock_install_base(
        &mut self,
        lock: state_abstraction::LockId,
        objects: Vec<(u64, AbstractObject)>,
    ) -> Result<(), ServiceError> {
        match &mut self.inner {
            Inner::Kv(kv) => kv.lock_install_base(lock, objects),
            Inner::Fs(fs) => fs.lock_install_base(lock, objects),
        }
    }

    fn state_suspect(&self) -> bool {
        match &self.inner {
            Inner::Kv(kv) => kv.state_suspect(),
            Inner::Fs(fs) => fs.state_suspect(),
        }
    }

    fn take_lock_events(&mut self) -> Vec<state_abstraction::LockEvent> {
        match &mut self.inner {
            Inner::Kv(kv) => kv.take_lock_events(),
            Inner::Fs(fs) => fs.take_lock_events(),
        }
    }

    fn execute_locked(
        &mut self,
        lock: state_abstraction::LockId,
        op: &[u8],
        client: ClientId,
        time_ns: u64,
    ) -> state_abstraction::LockedResult {
        match &mut self.inner {
            Inner::Kv(kv) => kv.execute_locked(lock, op, client, time_ns),
            Inner::Fs(fs) => fs.execute_locked(lock, op, client, time_ns),
        }
    }

    fn lock_state_digest(&self, lock: state_abstraction::LockId) -> Option<Digest> {
        match &self.inner {
            Inner::Kv(kv) => kv.lock_state_digest(lock),
            Inner::Fs(fs) => fs.lock_state_digest(lock),
        }
    }

    fn lock_restart(&mut self, lock: state_abstraction::LockId) -> Result<(), ServiceError> {
        match &mut self.inner {
            Inner::Kv(kv) => kv.lock_restart(lock),
            Inner::Fs(fs) => fs.lock_restart(lock),
        }
    }

    fn set_lock_cert_checker(
        &mut self,
        checker: Arc<dyn state_abstraction::locking::LockCertChecker>,
    ) {
        match &mut self.inner {
            Inner::Kv(kv) => kv.set_lock_cert_checker(checker),
            Inner::Fs(fs) => fs.set_lock_cert_checker(checker),
        }
    }
}

/// The file service's newest agreed time, from its root's header (table format 3).
fn fs_agreed_time(fs: &FileService) -> u64 {
    fs.get_obj(0)
        .ok()
        .and_then(|root| root.pieces.into_iter().next())
        .and_then(|bytes| Header::decode_canonical(&bytes).ok())
        .map_or(0, |header| match header {
            Header::Live(live) => live.agreed_time,
            Header::Free { .. } => 0,
        })
}

/// The directory holding one run's replica data directories (and the checker's reference
/// file service), removed when the run is dropped. Unique per process and run, so that
/// tests running in parallel threads never share one.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Under `SIM_FS_DIR` if set, else `/dev/shm` where it exists, else the system's
    /// temporary directory. Where it lives never changes a run (the file service's abstract
    /// state is the same on every backend), only its speed: a simulated crash is a process
    /// crash, whose page cache survives, so the service's fsyncs buy nothing here, and on a
    /// disk shared with builds they made a seed of `random_fs` about seven times slower
    /// (waiting, not computing) than on tmpfs.
    pub fn new(scenario: &str, seed: u64) -> Result<Self, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "bftfs-sim-{}-{}-{scenario}-{seed}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        let bases = match std::env::var_os("SIM_FS_DIR") {
            Some(dir) => vec![PathBuf::from(dir)],
            None => vec![PathBuf::from("/dev/shm"), std::env::temp_dir()],
        };
        let mut why = String::new();
        for base in bases {
            let path = base.join(&name);
            // A leftover of an earlier process with the same pid would hold stale state.
            let _ = std::fs::remove_dir_all(&path);
            match std::fs::create_dir_all(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) => why = format!("simulator data directory {}: {e}", path.display()),
            }
        }
        Err(why)
    }

    pub fn replica(&self, r: usize) -> PathBuf {
        self.path.join(format!("r{r}"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
