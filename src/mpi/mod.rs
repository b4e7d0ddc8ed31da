//! The MPI backend (feature `mpi`): ferroccl's [`Communicator`] over an MPI library, through rsmpi's
//! raw bindings (`mpi::ffi`).
//!
//! # Workflow
//!
//! Launch the program with the MPI launcher, create one communicator per process, call collectives:
//!
//! ```no_run
//! use ferroccl::prelude::*;
//! use ferroccl::mpi::MpiComm;
//! # fn main() -> ferroccl::Result<()> {
//! // mpirun -np 4 target/release/examples/allreduce
//! let comm = MpiComm::world(ferroccl::Config::from_env()?)?; // MPI_Init_thread + MPI_Comm_dup(WORLD)
//! let mut grads = vec![comm.rank() as f32; 1024];
//! comm.all_reduce(&mut grads, ReduceOp::Avg)?;                // MPI_Isend/Irecv steps, polled
//! let work = comm.iall_reduce(grads, ReduceOp::Sum)?;          // non-blocking: MPI_Iallreduce
//! let grads = work.wait()?;                                    // MPI_Test until done
//! drop(comm);                                                  // last handle: MPI_Finalize
//! # let _ = grads; Ok(()) }
//! ```
//!
//! [`launched_by_mpirun`] tells whether the process was started by an MPI launcher (tests use it to
//! re-execute themselves under `mpirun`).
//!
//! # Mapping
//!
//! | ferroccl | MPI |
//! |---|---|
//! | `all_reduce` | blocking: recursive doubling (≤ 8 KiB) / Rabenseifner over `MPI_Isend`/`MPI_Irecv` on a private duplicate communicator (`p2p.rs`: libnbc's `MPI_Iallreduce` cost up to 2× the blocking `MPI_Allreduce`); non-blocking, or > 2 GiB: `MPI_Iallreduce` (`MPI_IN_PLACE` when in place) |
//! | `reduce_scatter` | `MPI_Ireduce_scatter_block` |
//! | `all_gather` | `MPI_Iallgather` |
//! | `broadcast` | `MPI_Ibcast` |
//! | `reduce` | `MPI_Ireduce` |
//! | `all_to_all` / `all_to_allv` | `MPI_Ialltoall` / `MPI_Ialltoallv` (displacements = prefix sums) |
//! | `send` / `recv` | `MPI_Isend` / `MPI_Improbe` + `MPI_Get_count` + `MPI_Imrecv` |
//! | `barrier` | `MPI_Ibarrier` |
//! | `split` | `MPI_Comm_split` |
//!
//! Datatypes: f32 → `MPI_FLOAT`, f64 → `MPI_DOUBLE`, i32 → `MPI_INT32_T`, i64 → `MPI_INT64_T`, u8 →
//! `MPI_UINT8_T`. f16 and bf16 have no MPI datatype: they travel as a 2-byte contiguous derived type
//! and reduce with commutative user operators (`MPI_Op_create`) that compute in f32 and round once, like
//! the other backends; these are created once per process. Sum/Prod/Min/Max map to
//! `MPI_SUM`/`MPI_PROD`/`MPI_MIN`/`MPI_MAX`; Avg reduces with Sum and divides afterwards
//! ([`crate::dtype::finish_avg`]). Counts are C `int`s: a buffer (or an all-to-allv displacement) of more
//! than `i32::MAX` elements is an [`Error::InvalidArgument`]. Only host memory is accepted; other memory
//! is an [`Error::Unsupported`] that names the fix. Every MPI error code comes back as [`Error::Mpi`]
//! with `MPI_Error_string`'s text: the communicators carry `MPI_ERRORS_RETURN`, so errors do not abort
//! the job.
//!
//! # Blocking calls and timeouts
//!
//! Every blocking collective is the immediate (`MPI_I*`) call followed by an `MPI_Test` loop bounded by
//! [`Config::timeout`] (all-reduce: immediate point-to-point steps polled with `MPI_Testall`), so, as with the other backends, no blocking call waits forever: on expiry it
//! returns [`Error::Timeout`]. MPI cannot cancel a collective, so the request stays posted and MPI may
//! still write into the buffers it was given. From then on ferroccl makes **no further MPI call in
//! this process** (every call returns [`Error::Mpi`], and `MPI_Finalize` is skipped): the process
//! should exit, and mpirun then reports the ranks that did not finalise. `MPI_Abort` is never called;
//! that decision is the application's. (A transport with remote direct writes that had already been
//! given the buffer's address could in principle still write into it after the error; exit promptly.)
//! The exception is a receive whose message never arrived: until `MPI_Improbe` matched, nothing
//! refers to the buffer, so such a timeout leaves the communicator usable. An unfinished non-blocking
//! operation whose [`crate::Work`] is dropped after its timeout leaks its buffers (rather than freeing
//! memory MPI may still use) and likewise stops MPI use. `split` is not a timed MPI call
//! (`MPI_Comm_split` has no immediate form), but it first all-gathers the colours with a timed
//! collective, so every rank has arrived before it calls `MPI_Comm_split`.
//!
//! # Threads
//!
//! [`MpiComm`] is `Send + Sync`. [`MpiComm::world`] asks MPI for `MPI_THREAD_MULTIPLE`. If MPI
//! provides it, MPI calls are made from any thread without a lock. Otherwise every MPI call ferroccl
//! makes is taken under one process-wide mutex, which gives the `MPI_THREAD_SERIALIZED` guarantee that
//! no two calls are concurrent; the lock is never held while waiting (waiting is `MPI_Test` polling), so
//! one thread's pending collective does not block another thread's. If the application initialised MPI
//! itself, its provided level is used the same way; with `MPI_THREAD_SINGLE`/`FUNNELED` the application
//! must also keep to the thread that initialised MPI.
//!
//! # Lifetime: initialisation and `MPI_Finalize`
//!
//! The first [`MpiComm::world`] of a process calls `MPI_Init_thread` (unless the application already
//! initialised MPI, e.g. through rsmpi; then that is used, and never finalised by ferroccl). Every
//! communicator (world duplicates, split communicators) and every pending operation holds a share of
//! the process's MPI session; when the last one is dropped, ferroccl frees its datatypes and operators
//! and calls `MPI_Finalize`. MPI cannot be initialised twice, so keep one communicator alive for as long
//! as the program communicates: a later `MpiComm::world` fails with an [`Error::Mpi`] that says so.
//! Drop every communicator before the process exits (`std::process::exit` skips destructors, and a
//! process that exits without `MPI_Finalize` makes mpirun report an abnormal termination).
//! Each `MpiComm::world` is a collective `MPI_Comm_dup` of `MPI_COMM_WORLD` (so ferroccl's traffic never
//! matches the application's own messages); dropping a communicator calls `MPI_Comm_free`.
//!
//! # Traffic counters
//!
//! MPI chooses its algorithms internally, so [`Communicator::stats`] counts what the
//! bandwidth-optimal algorithm that nccl-tests' "bus bandwidth" assumes would send from this rank, for
//! each completed operation (world `n`, `S` the operation's size in bytes as nccl-tests counts it):
//! all-reduce `2(n-1)/n·S`; reduce-scatter `(n-1)/n·S` (`S` = send buffer); all-gather `(n-1)/n·S`
//! (`S` = receive buffer); broadcast `S` on every rank except the one before the root in ring order
//! (a pipelined chain `root → root+1 → …`); reduce `S` on every rank but the root; all-to-all and
//! all-to-allv the blocks addressed to other ranks; send `S`; receive and barrier `0`. So `bytes_sent /
//! time` is directly comparable with nccl-tests' busbw and with the other backends' counts. Bytes
//! received mirror it: all-reduce, reduce-scatter and all-gather the same as sent; broadcast `S` on
//! every rank but the root; reduce `S` on every rank but the one after the root (the chain
//! `root+1 → … → root`); all-to-all(v) the blocks from other ranks; receive `S`; send and barrier `0`.

mod flight;
mod p2p;
mod session;

use crate::comm::{CollectiveOwned, CollectiveRef};
use crate::work::{Pending, Work};
use crate::{Collective, Communicator, CommunicatorExt, Config, Error, Result};
use flight::{Flight, Target};
use mpi::ffi;
use session::Session;
use std::os::raw::{c_int, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use mpi::Threading;

/// Environment variables that MPI launchers set in the processes they start (Open MPI's `mpirun`,
/// MPICH/Hydra and Intel MPI, PMIx-based launchers including `srun --mpi=pmix`, MVAPICH2).
pub const LAUNCHER_VARS: [&str; 7] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMI_RANK",
    "PMIX_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "HYDRA_CONTROL_FD",
];

/// True if this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun` with PMI), judged
/// by the environment variables of [`LAUNCHER_VARS`]. Without a launcher, MPI still works as a
/// "singleton" world of size 1.
pub fn launched_by_mpirun() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// A communicator handle plus the session it belongs to; frees the handle when the last user is gone.
struct CommInner {
    session: Arc<Session>,
    comm: ffi::MPI_Comm,
    /// A private duplicate of `comm` for the point-to-point messages of [`p2p`] all-reduces
    /// (`MPI_COMM_NULL` until created).
    p2p: ffi::MPI_Comm,
    rank: usize,
    size: usize,
    tag_ub: c_int,
}

// SAFETY: `comm` is an MPI handle (an identifier, not memory ferroccl dereferences); it is only passed to
// MPI, through `Session::call`, which serialises calls when MPI did not provide MPI_THREAD_MULTIPLE.
unsafe impl Send for CommInner {}
// SAFETY: as for `Send`; there is no interior mutability.
unsafe impl Sync for CommInner {}

impl CommInner {
    fn target(&self) -> Target<'_> {
        Target {
            session: &self.session,
            comm: self.comm,
            world: self.size,
            rank: self.rank,
            tag_ub: self.tag_ub,
        }
    }
}

impl Drop for CommInner {
    fn drop(&mut self) {
        if self.session.is_poisoned() || mpi::is_finalized() {
            return;
        }
        let _g = self.session.guard();
        // SAFETY: communicators this process created (dup or split) and nobody uses any more.
        unsafe {
            if self.p2p != ffi::RSMPI_COMM_NULL {
                ffi::MPI_Comm_free(&mut self.p2p);
            }
            ffi::MPI_Comm_free(&mut self.comm)
        };
    }
}

/// A communicator over MPI. See the [module docs](self) for the workflow, the mapping onto MPI calls,
/// timeouts, threads and finalisation.
pub struct MpiComm {
    inner: Arc<CommInner>,
    cfg: Config,
    traffic: Arc<crate::stats::Traffic>,
    local_rank: usize,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.inner.rank)
            .field("world_size", &self.inner.size)
            .field("threading", &self.inner.session.threading)
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl MpiComm {
    /// A communicator over all processes of the job (a duplicate of `MPI_COMM_WORLD`). Initialises MPI
    /// on the first call in the process (asking for `MPI_THREAD_MULTIPLE`). Collective: every process
    /// must call it.
    pub fn world(cfg: Config) -> Result<MpiComm> {
        let session = session::session()?;
        // SAFETY: reading rsmpi's exported handle.
        let world = unsafe { ffi::RSMPI_COMM_WORLD };
        let dup = timed_dup(
            &session,
            world,
            cfg.timeout,
            "MPI_Comm_idup(MPI_COMM_WORLD)",
        )?;
        MpiComm::adopt(session, dup, cfg)
    }

    /// Wrap a communicator this process owns (freed on drop): set `MPI_ERRORS_RETURN`, read rank, size
    /// and `MPI_TAG_UB`.
    fn adopt(session: Arc<Session>, comm: ffi::MPI_Comm, cfg: Config) -> Result<MpiComm> {
        // Wrap first, so that the handle is freed if a query below fails.
        let mut inner = CommInner {
            session,
            comm,
            // SAFETY: reading rsmpi's exported handle.
            p2p: unsafe { ffi::RSMPI_COMM_NULL },
            rank: 0,
            size: 1,
            tag_ub: 32767, // the minimum the standard guarantees
        };
        let s = inner.session.clone();
        // SAFETY: reading rsmpi's exported handle.
        let ret = unsafe { ffi::RSMPI_ERRORS_RETURN };
        // SAFETY: `comm` is live.
        s.call("MPI_Comm_set_errhandler", || unsafe {
            ffi::MPI_Comm_set_errhandler(comm, ret)
        })?;
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: valid out-pointers.
        s.call("MPI_Comm_rank", || unsafe {
            ffi::MPI_Comm_rank(comm, &mut rank)
        })?;
        // SAFETY: valid out-pointers.
        s.call("MPI_Comm_size", || unsafe {
            ffi::MPI_Comm_size(comm, &mut size)
        })?;
        inner.rank = usize::try_from(rank)
            .map_err(|_| Error::mpi(format!("MPI_Comm_rank returned {rank}")))?;
        inner.size = usize::try_from(size)
            .map_err(|_| Error::mpi(format!("MPI_Comm_size returned {size}")))?;
        let mut val: *mut c_int = std::ptr::null_mut();
        let mut flag: c_int = 0;
        // SAFETY: for a predefined attribute MPI stores a pointer to the value into `val`.
        s.call("MPI_Comm_get_attr(MPI_TAG_UB)", || unsafe {
            ffi::MPI_Comm_get_attr(
                comm,
                ffi::MPI_TAG_UB as c_int,
                (&mut val as *mut *mut c_int).cast::<c_void>(),
                &mut flag,
            )
        })?;
        if flag != 0 && !val.is_null() {
            // SAFETY: MPI returned a pointer to the attribute's int value.
            inner.tag_ub = unsafe { *val }.max(32767);
        }
        // it inherits MPI_ERRORS_RETURN
        inner.p2p = timed_dup(&s, comm, cfg.timeout, "MPI_Comm_idup")?;
        let mut c = MpiComm {
            inner: Arc::new(inner),
            cfg,
            traffic: Arc::new(crate::stats::Traffic::new()),
            local_rank: 0,
        };
        c.local_rank = c.find_local_rank()?;
        c.traffic.reset(); // count the user's traffic only
        Ok(c)
    }

    /// This rank's index among the ranks of this communicator on the same host (what an
    /// `MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)` would number it), found by a timed all-gather of
    /// a hash of `MPI_Get_processor_name`, so that it is bounded by the timeout like every
    /// collective (the split itself cannot be).
    fn find_local_rank(&self) -> Result<usize> {
        // SAFETY: reading rsmpi's exported constant.
        let cap = usize::try_from(unsafe { ffi::RSMPI_MAX_PROCESSOR_NAME }).unwrap_or(256);
        let mut name = vec![0u8; cap.max(1) + 1];
        let mut len: c_int = 0;
        let p = name.as_mut_ptr().cast();
        // SAFETY: `name` holds MPI_MAX_PROCESSOR_NAME bytes (and one more); `len` is an out-pointer.
        self.inner
            .session
            .call("MPI_Get_processor_name", || unsafe {
                ffi::MPI_Get_processor_name(p, &mut len)
            })?;
        name.truncate(usize::try_from(len).unwrap_or(0).min(cap));
        // FNV-1a: stable across processes (std's hasher is seeded per process)
        let hash = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        }) as i64;
        let mut all = vec![0i64; self.inner.size];
        self.all_gather(&[hash], &mut all)?;
        Ok(all[..self.inner.rank]
            .iter()
            .filter(|&&h| h == hash)
            .count())
    }

    /// The thread level MPI provided (see the module docs on threads).
    pub fn threading(&self) -> Threading {
        self.inner.session.threading
    }

    /// The MPI library's version string (`MPI_Get_library_version`).
    pub fn library_version(&self) -> &str {
        &self.inner.session.library
    }

    /// True if ferroccl initialised MPI in this process, and so calls `MPI_Finalize` when the last
    /// communicator (and pending operation) is dropped; false if the application initialised MPI.
    pub fn finalizes_mpi(&self) -> bool {
        self.inner.session.owns_mpi()
    }

    /// The largest message tag this MPI library accepts (`MPI_TAG_UB`).
    pub fn tag_ub(&self) -> u32 {
        u32::try_from(self.inner.tag_ub).unwrap_or(32767)
    }

    /// The raw MPI communicator, for interoperating with other MPI code. It stays owned by this
    /// `MpiComm` (do not free it); calls on it must respect [`MpiComm::threading`].
    pub fn as_raw(&self) -> ffi::MPI_Comm {
        self.inner.comm
    }

    fn p2p(&self) -> p2p::P2p<'_> {
        p2p::P2p {
            t: self.inner.target(),
            p2p: self.inner.p2p,
            deadline: std::cell::Cell::new(None),
            timeout: self.cfg.timeout,
        }
    }

    /// Poll `flight` until it completes, for at most the timeout; see the module docs for what a
    /// timeout means.
    fn wait_blocking(
        &self,
        mut flight: Flight,
        during: &'static str,
        peer: Option<usize>,
    ) -> Result<()> {
        let t = self.inner.target();
        let deadline = Instant::now().checked_add(self.cfg.timeout);
        let mut spins = 0u32;
        loop {
            let r = flight.poll(&t);
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    abandon(&self.inner.session, flight);
                    return Err(e);
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                abandon(&self.inner.session, flight);
                return Err(Error::Timeout {
                    during,
                    after: self.cfg.timeout,
                    waiting_for: peer,
                });
            }
            backoff(&mut spins);
        }
    }
}

/// Duplicate `comm` (collective over its ranks) by `MPI_Comm_idup` polled under `timeout`: a rank that
/// never arrives is a `Timeout`, not a hang (the blocking `MPI_Comm_dup` has no bound). On timeout the
/// request stays in flight, so the session is poisoned and the request's memory leaked, as for any
/// abandoned operation.
fn timed_dup(
    s: &Session,
    comm: ffi::MPI_Comm,
    timeout: std::time::Duration,
    during: &'static str,
) -> Result<ffi::MPI_Comm> {
    // On the heap: MPI writes both when the request completes, which may be after a timeout.
    // SAFETY: reading rsmpi's exported handles.
    let mut slot = Box::new(unsafe { (ffi::RSMPI_COMM_NULL, ffi::RSMPI_REQUEST_NULL) });
    let (dup_p, req_p) = (
        &mut slot.0 as *mut ffi::MPI_Comm,
        &mut slot.1 as *mut ffi::MPI_Request,
    );
    // SAFETY: `comm` is live; `slot` outlives the request (freed only once it completed).
    s.call(during, || unsafe { ffi::MPI_Comm_idup(comm, dup_p, req_p) })?;
    let deadline = Instant::now().checked_add(timeout);
    let mut spins = 0u32;
    loop {
        let mut flag: c_int = 0;
        // SAFETY: `req_p` is the live request above.
        let r = s.call("MPI_Test(MPI_Comm_idup)", || unsafe {
            ffi::MPI_Test(req_p, &mut flag, ffi::RSMPI_STATUS_IGNORE)
        });
        if let Err(e) = r {
            s.poison();
            Box::leak(slot);
            return Err(e);
        }
        if flag != 0 {
            return Ok(slot.0);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            s.poison();
            Box::leak(slot);
            return Err(Error::Timeout {
                during,
                after: timeout,
                waiting_for: None,
            });
        }
        backoff(&mut spins);
    }
}

/// Give up on a flight: if MPI may still use its memory, stop all MPI use and leak what it owns.
fn abandon(session: &Session, flight: Flight) {
    if flight.in_flight() {
        session.poison();
        std::mem::forget(flight);
    }
}

/// Between two `MPI_Test`s: spin briefly (latency), then yield (ranks may share cores).
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Bytes this rank sends for `c` under the convention of the module docs.
/// (bytes sent, bytes received) for one completed operation; see the module docs.
fn traffic(c: &CollectiveRef<'_>, rank: usize, n: usize) -> (u64, u64) {
    use Collective as C;
    if n <= 1 && !matches!(c, C::Send { .. } | C::Recv { .. }) {
        return (0, 0);
    }
    let share = |bytes: usize| (bytes as u128 * (n as u128 - 1) / n as u128) as u64;
    let unless = |skip: bool, bytes: usize| if skip { 0 } else { bytes as u64 };
    match c {
        C::AllReduce { recv, .. } => (2 * share(recv.byte_len()), 2 * share(recv.byte_len())),
        C::ReduceScatter { send, .. } => (share(send.byte_len()), share(send.byte_len())),
        C::AllGather { recv, .. } => (share(recv.byte_len()), share(recv.byte_len())),
        C::Broadcast { buf, root } => (
            unless((root + n - 1) % n == rank, buf.byte_len()),
            unless(*root == rank, buf.byte_len()),
        ),
        C::Reduce { send, root, .. } => (
            unless(*root == rank, send.byte_len()),
            unless((root + 1) % n == rank, send.byte_len()),
        ),
        C::AllToAll { send, .. } => (share(send.byte_len()), share(send.byte_len())),
        C::AllToAllv {
            send,
            send_counts,
            recv_counts,
            ..
        } => {
            let others = |counts: &[usize]| {
                let own = counts.get(rank).copied().unwrap_or(0);
                (counts.iter().sum::<usize>().saturating_sub(own) * send.dtype.size()) as u64
            };
            (others(send_counts), others(recv_counts))
        }
        C::Send { buf, .. } => (buf.byte_len() as u64, 0),
        C::Recv { buf, .. } => (0, buf.byte_len() as u64),
        C::Barrier => (0, 0),
    }
}

fn peer_of<S, R>(c: &Collective<S, R>) -> Option<usize> {
    match c {
        Collective::Send { peer, .. } | Collective::Recv { peer, .. } => Some(*peer),
        _ => None,
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.inner.rank
    }
    fn world_size(&self) -> usize {
        self.inner.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn config(&self) -> &Config {
        &self.cfg
    }

    fn exec(&self, c: CollectiveRef<'_>) -> Result<()> {
        // Again here, not only in `run`: this hook is public and hands MPI pointers and counts
        // taken from the views (a few integer compares).
        c.validate(self.inner.rank, self.inner.size)?;
        let (during, peer) = (c.name(), peer_of(&c));
        let bytes = traffic(&c, self.inner.rank, self.inner.size);
        let kind = c.kind();
        let count = |(sent, received): (u64, u64)| {
            self.traffic.sent(kind, sent);
            self.traffic.received(kind, received);
        };
        let c = match c {
            Collective::AllReduce { send, mut recv, op }
                if self.inner.size > 1 && recv.byte_len() <= p2p::MAX_BYTES =>
            {
                let dtype = recv.dtype;
                match (send.as_ref().map(|s| s.host_bytes()), recv.host_bytes_mut()) {
                    (host_send @ (None | Some(Some(_))), Some(out)) => {
                        self.p2p().all_reduce(host_send.flatten(), out, dtype, op)?;
                        count(bytes);
                        return Ok(());
                    }
                    // not host memory: the flight below reports it
                    _ => Collective::AllReduce { send, recv, op },
                }
            }
            c => c,
        };
        let flight = Flight::post(&self.inner.target(), c)?;
        self.wait_blocking(flight, during, peer)?;
        count(bytes);
        Ok(())
    }

    fn exec_async(&self, mut c: CollectiveOwned) -> Result<Work<CollectiveOwned>> {
        let during = c.name();
        let (flight, bytes) = {
            let v = c.views();
            v.validate(self.inner.rank, self.inner.size)?; // as in `exec`
            let bytes = (v.kind(), traffic(&v, self.inner.rank, self.inner.size));
            // The views point into the boxes' heap memory, which does not move when `c` does.
            (Flight::post(&self.inner.target(), v)?, bytes)
        };
        let pending = MpiPending {
            inner: self.inner.clone(),
            flight: Some(flight),
            c: Some(c),
            bytes,
            counter: self.traffic.clone(),
        };
        Ok(Work::new(Box::new(pending), self.cfg.timeout, during))
    }

    fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>> {
        let c = match color {
            None => None,
            Some(c) => Some(c_int::try_from(c).map_err(|_| {
                Error::InvalidArgument(format!(
                    "split: color {c} does not fit MPI's non-negative int colors (max {})",
                    c_int::MAX
                ))
            })?),
        };
        // A timed collective first, so that every rank has arrived before the untimed MPI_Comm_split.
        let mine = [c.map(i64::from).unwrap_or(-1), i64::from(key)];
        let mut all = vec![0i64; 2 * self.inner.size];
        self.all_gather(&mine, &mut all)?;
        // SAFETY: reading rsmpi's exported constants.
        let (undefined, mut newcomm) = unsafe { (ffi::RSMPI_UNDEFINED, ffi::RSMPI_COMM_NULL) };
        let comm = self.inner.comm;
        // SAFETY: `comm` is live; `newcomm` is an out-parameter.
        self.inner.session.call("MPI_Comm_split", || unsafe {
            ffi::MPI_Comm_split(comm, c.unwrap_or(undefined), key, &mut newcomm)
        })?;
        // SAFETY: reading rsmpi's exported constant.
        if newcomm == unsafe { ffi::RSMPI_COMM_NULL } {
            return Ok(None);
        }
        let sub = MpiComm::adopt(self.inner.session.clone(), newcomm, self.cfg.clone())?;
        Ok(Some(Box::new(sub)))
    }

    fn traffic(&self) -> Option<&crate::stats::Traffic> {
        Some(&self.traffic)
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }
}

/// A non-blocking operation: the flight plus the owned buffers it points into.
struct MpiPending {
    inner: Arc<CommInner>,
    flight: Option<Flight>,
    c: Option<CollectiveOwned>,
    bytes: (crate::stats::OpKind, (u64, u64)),
    counter: Arc<crate::stats::Traffic>,
}

impl Pending<CollectiveOwned> for MpiPending {
    fn poll(&mut self) -> Option<Result<CollectiveOwned>> {
        let Some(f) = self.flight.as_mut() else {
            return Some(Err(Error::InvalidArgument(
                "non-blocking MPI operation already completed".into(),
            )));
        };
        match f.poll(&self.inner.target()) {
            Ok(false) => None,
            Ok(true) => {
                self.flight = None;
                let (kind, (sent, received)) = self.bytes;
                self.counter.sent(kind, sent);
                self.counter.received(kind, received);
                Some(
                    self.c
                        .take()
                        .ok_or_else(|| Error::InvalidArgument("internal: buffers missing".into())),
                )
            }
            Err(e) => {
                if f.in_flight() {
                    // MPI may still use the buffers: keep them (Drop leaks them).
                    return Some(Err(e));
                }
                self.flight = None;
                Some(Err(e))
            }
        }
    }

    fn wait_for(&mut self, d: Duration) -> Option<Result<CollectiveOwned>> {
        let deadline = Instant::now().checked_add(d);
        let mut spins = 0u32;
        loop {
            if let Some(r) = self.poll() {
                return Some(r);
            }
            if deadline.is_some_and(|end| Instant::now() >= end) {
                return None;
            }
            backoff(&mut spins);
        }
    }
}

impl Drop for MpiPending {
    fn drop(&mut self) {
        if let Some(f) = self.flight.take() {
            if f.in_flight() {
                // Abandoned while MPI may still read or write the buffers: never free them.
                self.inner.session.poison();
                std::mem::forget(f);
                std::mem::forget(self.c.take());
            }
        }
    }
}

/// All-reduce (sum) `buf` with rsmpi's safe API (`CommunicatorCollectives::all_reduce_into`, i.e. a
/// plain blocking `MPI_Allreduce`) on `comm`'s MPI communicator, bypassing ferroccl's validation,
/// polling and timeout: the baseline that benches compare the MPI backend against in the same run.
/// rsmpi has no in-place form, so this first copies `buf` into a send buffer; to time the MPI call
/// alone use [`raw_allreduce_into_f32`]. Not bounded by the timeout; rsmpi ignores MPI's return code.
pub fn raw_allreduce_f32(comm: &MpiComm, buf: &mut [f32]) -> Result<()> {
    let send = buf.to_vec();
    raw_allreduce_into_f32(comm, &send, buf)
}

/// Out-of-place form of [`raw_allreduce_f32`]: `recv = sum over ranks of send` through rsmpi's
/// `all_reduce_into`, with no copy.
pub fn raw_allreduce_into_f32(comm: &MpiComm, send: &[f32], recv: &mut [f32]) -> Result<()> {
    use mpi::collective::SystemOperation;
    use mpi::traits::{CommunicatorCollectives, FromRaw};
    if send.len() != recv.len() {
        return Err(Error::LengthMismatch {
            what: "raw_allreduce_into_f32: recv must have as many elements as send".into(),
            expected: send.len(),
            got: recv.len(),
        });
    }
    let s = &comm.inner.session;
    s.alive()?;
    let _g = s.guard();
    // SAFETY: `comm.inner.comm` is a live intra-communicator owned by `comm`; ManuallyDrop makes sure
    // rsmpi never frees it.
    let rs = std::mem::ManuallyDrop::new(unsafe {
        mpi::topology::SimpleCommunicator::from_raw(comm.inner.comm)
    });
    rs.all_reduce_into(send, recv, SystemOperation::sum());
    Ok(())
}
