//! The NCCL backend (feature `cuda`): collectives on device buffers, one rank per GPU per process.
//!
//! Workflow, in the manner of cudarc's sys → result → safe split: ferroccl calls NCCL's C API through
//! `cudarc::nccl::sys` with raw device pointers (so every dtype and op goes through one code path) and
//! wraps it here with errors, timeouts and a safe teardown.
//!
//! 1. The unique id travels through MPI (under mpirun, feature `mpi`) or the env rendezvous store
//!    (torchrun-style variables); [`NcclComm::single`] needs neither (world size 1).
//! 2. Each collective is enqueued on the *buffer's* CUDA stream, so it is ordered after the kernels that
//!    produced the data. Blocking calls then wait for a CUDA event, polling `ncclCommGetAsyncError`;
//!    non-blocking ones return a [`Work`] that completes on that event. A wait that outlives the timeout,
//!    or an asynchronous NCCL error, aborts the communicator (`ncclCommAbort`) and returns an error —
//!    a failed or hung peer is an error, not a hang. Every later call returns `PeerLost`.
//! 3. Dropping the communicator destroys it (or does nothing after an abort); errors there are logged,
//!    never panics (cudarc's own `Comm` would panic in `Drop`).
//!
//! 4. With [`Config::stream_ordered`] a blocking call returns once enqueued (NCCL's and torch's own
//!    semantics); [`Communicator::synchronize`] then waits for it under the timeout.
//!
//! all_to_all(v) are grouped send/recv (`ncclGroupStart`/`ncclGroupEnd`), as torch does. NCCL has no
//! message tags: point-to-point messages between two ranks match in order, and `tag` is ignored.
//! `isend`/`irecv` are posted and launched as one group with the next blocking send/recv, wait or
//! collective, so MPI-style `irecv(prev); send(next)` rings work (`src/nccl/p2p.rs` says why).
//! Host buffers are not accepted: pass `CudaSlice`s, or use a host backend for host memory.
//! NVLink multicast (NVLS) is switched off (`NCCL_NVLS_ENABLE=0`) unless the user set it.

mod p2p;
mod wait;

use crate::buffer::{Buf, BufMut, Mem, MemMut};
use crate::comm::{CollectiveOwned, CollectiveRef};
use crate::device::{drv, probe, Lib};
use crate::stats::OpKind;
use crate::{Collective, Communicator, Config, DType, Error, ReduceOp, Result, Work};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::sys;
use p2p::{Posted, Slot};
use std::ffi::c_void;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use wait::{EventWait, Handle, NcclPending, State};

/// The raw communicator handle (a pointer NCCL owns).
struct Raw(sys::ncclComm_t);
// SAFETY: NCCL communicators may be used from any thread, one call at a time (we hold a Mutex).
unsafe impl Send for Raw {}

/// A rank's NCCL communicator.
pub struct NcclComm {
    rank: usize,
    size: usize,
    cfg: Config,
    h: Handle,
    stream: Arc<CudaStream>,
    /// Streams with stream-ordered work not yet synchronised (`Config::stream_ordered`).
    inflight: Mutex<Vec<Arc<CudaStream>>>,
    traffic: crate::stats::Traffic,
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

fn err_string(r: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static C string.
    unsafe {
        let p = sys::ncclGetErrorString(r);
        if p.is_null() {
            format!("{r:?}")
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn ck(r: sys::ncclResult_t, what: &str) -> Result<()> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(Error::cuda_code(
            e as i32,
            format!("NCCL {what}: {} ({e:?})", err_string(e)),
        )),
    }
}

fn nccl_dtype(d: DType) -> sys::ncclDataType_t {
    use sys::ncclDataType_t as T;
    match d {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
        DType::U8 => T::ncclUint8,
    }
}

fn nccl_op(o: ReduceOp) -> sys::ncclRedOp_t {
    use sys::ncclRedOp_t as O;
    match o {
        ReduceOp::Sum => O::ncclSum,
        ReduceOp::Prod => O::ncclProd,
        ReduceOp::Min => O::ncclMin,
        ReduceOp::Max => O::ncclMax,
        ReduceOp::Avg => O::ncclAvg,
    }
}

/// Keep NVLink multicast off unless the user chose otherwise (it can take shared GPUs out of service).
pub fn default_nvls_off() {
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        // SAFETY: called before NCCL initialises, from the thread creating the communicator.
        unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
    }
}

/// `ncclCommInitRank` under a timeout. The call blocks until every rank of the id has joined, and a
/// rank that died after the rendezvous would hang the others for good, so it runs on a helper thread
/// and the caller waits at most `timeout`. On a timeout the helper is left behind: when (if ever) its
/// init returns, it finds nobody waiting and destroys the communicator itself.
fn init_rank(
    ctx: &Arc<CudaContext>,
    rank: usize,
    size: usize,
    id: [u8; 128],
    timeout: std::time::Duration,
) -> Result<sys::ncclComm_t> {
    let too_big = |what: &str, v: usize| {
        Error::InvalidArgument(format!("NCCL {what} {v} does not fit NCCL's int"))
    };
    let nranks = i32::try_from(size).map_err(|_| too_big("world size", size))?;
    let me = i32::try_from(rank).map_err(|_| too_big("rank", rank))?;
    let uid = sys::ncclUniqueId {
        internal: id.map(|b| b as std::ffi::c_char),
    };
    // The result is handed over under a lock, so that exactly one side owns it: the caller if it
    // is still waiting (or finds it just after its timeout), else the helper, which destroys it.
    let slot: Arc<Mutex<(bool, Option<Result<Raw>>)>> = Arc::new(Mutex::new((false, None)));
    let (tx, rx) = crossbeam::channel::bounded::<()>(1);
    let (ctx, theirs) = (ctx.clone(), slot.clone());
    std::thread::Builder::new()
        .name(format!("ferroccl-nccl-init-{rank}"))
        .spawn(move || {
            let r = ctx
                .bind_to_thread()
                .map_err(|e| drv("binding the CUDA context", e))
                .and_then(|_| {
                    let mut raw: sys::ncclComm_t = std::ptr::null_mut();
                    // SAFETY: valid out-pointer; id from ncclGetUniqueId on some rank.
                    ck(
                        unsafe { sys::ncclCommInitRank(&mut raw, nranks, uid, me) },
                        "ncclCommInitRank",
                    )
                    .map(|_| Raw(raw))
                });
            let mut g = theirs.lock().unwrap_or_else(|e| e.into_inner());
            if g.0 {
                // the caller timed out and left: nobody else will ever free this communicator
                if let Ok(late) = r {
                    // SAFETY: a communicator this thread created and nobody else holds.
                    let _ = unsafe { sys::ncclCommDestroy(late.0) };
                }
            } else {
                g.1 = Some(r);
                let _ = tx.send(());
            }
        })
        .map_err(|e| Error::io("spawning the NCCL init thread", e))?;
    let _ = rx.recv_timeout(timeout);
    let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
    match g.1.take() {
        Some(r) => r.map(|raw| raw.0),
        None => {
            g.0 = true; // abandoned: the helper destroys what it may still create
            Err(Error::Timeout {
                during: "ncclCommInitRank (every rank must join; one did not)",
                after: timeout,
                waiting_for: None,
            })
        }
    }
}

/// A fresh NCCL unique id (128 bytes), made by one rank and shared with the others.
pub fn unique_id() -> Result<[u8; 128]> {
    probe(&[Lib::Cuda, Lib::Nccl])?;
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: valid out-pointer.
    ck(unsafe { sys::ncclGetUniqueId(&mut id) }, "ncclGetUniqueId")?;
    Ok(id.internal.map(|c| c as u8))
}

struct DevOp {
    ptr: u64,
    stream: Arc<CudaStream>,
}

fn dev(b: &Buf<'_>) -> Result<DevOp> {
    match b.mem {
        Mem::Device(d) => Ok(DevOp {
            ptr: d.ptr,
            stream: d.stream.clone(),
        }),
        _ => Err(host_err()),
    }
}

fn dev_mut(b: &BufMut<'_>) -> Result<DevOp> {
    match &b.mem {
        MemMut::Device(d) => Ok(DevOp {
            ptr: d.ptr,
            stream: d.stream.clone(),
        }),
        _ => Err(host_err()),
    }
}

fn host_err() -> Error {
    Error::Unsupported(
        "the NCCL backend takes device buffers (cudarc CudaSlice); for host memory use the local, tcp or mpi backend (FERROCCL_BACKEND)".into(),
    )
}

impl NcclComm {
    /// Join communicator `id` as `rank` of `size` on CUDA device `ordinal`.
    pub fn new(
        rank: usize,
        size: usize,
        id: [u8; 128],
        ordinal: usize,
        cfg: Config,
    ) -> Result<NcclComm> {
        probe(&[Lib::Cuda, Lib::Nccl])?;
        default_nvls_off();
        if rank >= size {
            return Err(Error::RankOutOfRange {
                what: "NCCL rank",
                rank,
                world: size,
            });
        }
        let n = crate::device::device_count();
        if ordinal >= n {
            return Err(Error::InvalidArgument(format!(
                "CUDA device {ordinal} does not exist ({n} visible); one rank per GPU: check LOCAL_RANK / CUDA_VISIBLE_DEVICES"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("creating the CUDA context", e))?;
        ctx.bind_to_thread()
            .map_err(|e| drv("binding the CUDA context", e))?;
        let stream = ctx.new_stream().map_err(|e| drv("creating a stream", e))?;
        let raw = init_rank(&ctx, rank, size, id, cfg.timeout)?;
        Ok(NcclComm {
            rank,
            size,
            cfg,
            h: Handle::new(raw, ctx, rank),
            stream,
            inflight: Mutex::new(Vec::new()),
            traffic: crate::stats::Traffic::new(),
            _keep: None,
        })
    }

    /// World size 1 on device `ordinal` (no rendezvous needed).
    pub fn single(ordinal: usize, cfg: Config) -> Result<NcclComm> {
        NcclComm::new(0, 1, unique_id()?, ordinal, cfg)
    }

    /// Torchrun-style: id through the env rendezvous store, device = `LOCAL_RANK`.
    pub fn from_env(cfg: Config) -> Result<NcclComm> {
        let env = crate::rendezvous::EnvRendezvous::from_env()?.ok_or_else(|| Error::Config {
            var: "RANK/WORLD_SIZE".into(),
            value: String::new(),
            why: "the NCCL backend needs torchrun-style variables or mpirun".into(),
        })?;
        let (server, store) = env.connect(cfg.timeout)?;
        let id = if env.rank == 0 {
            let id = unique_id()?;
            store.set("nccl/unique_id", &id)?;
            id
        } else {
            let v = store.get("nccl/unique_id", cfg.timeout)?;
            v.try_into().map_err(|_| {
                Error::Rendezvous("the NCCL unique id in the store is not 128 bytes".into())
            })?
        };
        let mut c = NcclComm::new(env.rank, env.world_size, id, env.local_rank, cfg)?;
        c._keep = Some(Box::new((server, store)));
        Ok(c)
    }

    /// Under mpirun: id broadcast over MPI, device = the node-local rank.
    #[cfg(feature = "mpi")]
    pub fn from_mpi(cfg: Config) -> Result<NcclComm> {
        use crate::CommunicatorExt;
        let mpi = crate::mpi::MpiComm::world(cfg.clone())?;
        let mut id = if mpi.rank() == 0 {
            unique_id()?
        } else {
            [0u8; 128]
        };
        mpi.broadcast(&mut id, 0)?;
        let local = [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
            "LOCAL_RANK",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(mpi.rank() % crate::device::device_count().max(1));
        let mut c = NcclComm::new(mpi.rank(), mpi.world_size(), id, local, cfg)?;
        c._keep = Some(Box::new(mpi));
        Ok(c)
    }

    /// The communicator's own stream (for barrier and callers that want one).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context of this rank's device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.h.ctx
    }

    fn lost(&self, during: &'static str) -> Error {
        self.h.lost(during)
    }

    /// A send or receive as a posted operation (not launched).
    fn posted(&self, c: &CollectiveRef<'_>) -> Result<Posted> {
        let (send, d, len, dtype, peer) = match c {
            Collective::Send { buf, peer, .. } => (true, dev(buf)?, buf.len, buf.dtype, *peer),
            Collective::Recv { buf, peer, .. } => (false, dev_mut(buf)?, buf.len, buf.dtype, *peer),
            _ => {
                return Err(Error::InvalidArgument(
                    "internal: only send and recv are posted".into(),
                ))
            }
        };
        let (k, b) = if send {
            (OpKind::Send, (len * dtype.size()) as u64)
        } else {
            (OpKind::Recv, 0)
        };
        self.count(k, b, (len * dtype.size()) as u64 - b);
        Ok(Posted {
            send,
            ptr: d.ptr,
            len,
            dtype,
            peer,
            stream: d.stream,
            slot: Arc::new(Slot::default()),
        })
    }

    /// Launch `c`: a send/recv joins the posted ones in one group; a collective goes after them.
    /// Returns the stream that orders its completion.
    fn launch(&self, c: &CollectiveRef<'_>) -> Result<Arc<CudaStream>> {
        if matches!(c, Collective::Send { .. } | Collective::Recv { .. }) {
            let op = self.posted(c)?;
            let stream = op.stream.clone();
            p2p::launch(&self.h, Some(op))?;
            return Ok(stream);
        }
        p2p::launch(&self.h, None)?;
        self.enqueue(c)
    }

    /// Wait for `s`'s work so far, with the timeout.
    fn wait_stream(&self, s: &Arc<CudaStream>, during: &'static str) -> Result<()> {
        EventWait {
            event: self.event_on(s)?,
            h: self.h.clone(),
        }
        .wait(self.cfg.timeout, during)
    }

    /// Remember `s` for `synchronize` (stream-ordered mode); at most a few distinct streams.
    fn note_inflight(&self, s: Arc<CudaStream>) {
        let mut v = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|x| Arc::ptr_eq(x, &s)) {
            v.push(s);
        }
    }

    /// Enqueue `c` on its buffers' stream; returns that stream.
    fn enqueue(&self, c: &CollectiveRef<'_>) -> Result<Arc<CudaStream>> {
        if self.h.broken.load(Ordering::Acquire) {
            return Err(self.lost("a collective on an aborted NCCL communicator"));
        }
        self.h
            .ctx
            .bind_to_thread()
            .map_err(|e| drv("binding the CUDA context", e))?;
        let g = self.h.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = g.0;
        let p = |x: u64| x as *mut c_void;
        let sid = |s: &Arc<CudaStream>| s.cu_stream() as sys::cudaStream_t;
        let n = self.size;
        let es = c.dtype().size();
        use Collective as C;
        // SAFETY (all calls below): pointers come from validated device views of the right sizes.
        let stream = match c {
            C::AllReduce { send, recv, op } => {
                let r = dev_mut(recv)?;
                let s = match send {
                    Some(s) => dev(s)?.ptr,
                    None => r.ptr,
                };
                ck(
                    unsafe {
                        sys::ncclAllReduce(
                            p(s),
                            p(r.ptr),
                            recv.len,
                            nccl_dtype(recv.dtype),
                            nccl_op(*op),
                            comm,
                            sid(&r.stream),
                        )
                    },
                    "all_reduce",
                )?;
                let b = (2 * (n - 1) * recv.byte_len() / n) as u64;
                self.count(OpKind::AllReduce, b, b);
                r.stream
            }
            C::ReduceScatter { send, recv, op } => {
                let (s, r) = (dev(send)?, dev_mut(recv)?);
                ck(
                    unsafe {
                        sys::ncclReduceScatter(
                            p(s.ptr),
                            p(r.ptr),
                            recv.len,
                            nccl_dtype(recv.dtype),
                            nccl_op(*op),
                            comm,
                            sid(&r.stream),
                        )
                    },
                    "reduce_scatter",
                )?;
                let b = ((n - 1) * recv.byte_len()) as u64;
                self.count(OpKind::ReduceScatter, b, b);
                r.stream
            }
            C::AllGather { send, recv } => {
                let (s, r) = (dev(send)?, dev_mut(recv)?);
                ck(
                    unsafe {
                        sys::ncclAllGather(
                            p(s.ptr),
                            p(r.ptr),
                            send.len,
                            nccl_dtype(send.dtype),
                            comm,
                            sid(&r.stream),
                        )
                    },
                    "all_gather",
                )?;
                let b = ((n - 1) * send.byte_len()) as u64;
                self.count(OpKind::AllGather, b, b);
                r.stream
            }
            C::Broadcast { buf, root } => {
                let b = dev_mut(buf)?;
                ck(
                    unsafe {
                        sys::ncclBroadcast(
                            p(b.ptr),
                            p(b.ptr),
                            buf.len,
                            nccl_dtype(buf.dtype),
                            *root as i32,
                            comm,
                            sid(&b.stream),
                        )
                    },
                    "broadcast",
                )?;
                let bytes = buf.byte_len() as u64;
                let got = if self.rank == *root { 0 } else { bytes };
                self.count(OpKind::Broadcast, bytes, got);
                b.stream
            }
            C::Reduce {
                send,
                recv,
                op,
                root,
            } => {
                let s = dev(send)?;
                let rp = match recv.as_ref().filter(|_| self.rank == *root) {
                    Some(r) => dev_mut(r)?.ptr,
                    None => s.ptr,
                };
                ck(
                    unsafe {
                        sys::ncclReduce(
                            p(s.ptr),
                            p(rp),
                            send.len,
                            nccl_dtype(send.dtype),
                            nccl_op(*op),
                            *root as i32,
                            comm,
                            sid(&s.stream),
                        )
                    },
                    "reduce",
                )?;
                let b = send.byte_len() as u64;
                let last = (root + 1) % n == self.rank;
                self.count(OpKind::Reduce, b, if last { 0 } else { b });
                s.stream
            }
            C::AllToAll { send, recv } => {
                let counts = vec![send.len / n; n];
                self.grouped(
                    comm,
                    dev(send)?,
                    &counts,
                    dev_mut(recv)?,
                    &counts,
                    send.dtype,
                    es,
                    OpKind::AllToAll,
                )?
            }
            C::AllToAllv {
                send,
                send_counts,
                recv,
                recv_counts,
            } => self.grouped(
                comm,
                dev(send)?,
                send_counts,
                dev_mut(recv)?,
                recv_counts,
                send.dtype,
                es,
                OpKind::AllToAllv,
            )?,
            C::Send { .. } | C::Recv { .. } => {
                return Err(Error::InvalidArgument(
                    "internal: send/recv go through NcclComm::launch".into(),
                ))
            }
            C::Barrier => {
                drop(g);
                return self.barrier_enqueue();
            }
        };
        Ok(stream)
    }

    #[allow(clippy::too_many_arguments)]
    fn grouped(
        &self,
        comm: sys::ncclComm_t,
        s: DevOp,
        sc: &[usize],
        r: DevOp,
        rc: &[usize],
        dtype: DType,
        es: usize,
        kind: OpKind,
    ) -> Result<Arc<CudaStream>> {
        let st = r.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: offsets are prefix sums of validated counts inside the buffers.
        unsafe {
            ck(sys::ncclGroupStart(), "group_start")?;
            let (mut so, mut ro) = (0usize, 0usize);
            let mut res = Ok(());
            for j in 0..self.size {
                if res.is_ok() {
                    res = ck(
                        sys::ncclSend(
                            (s.ptr as usize + so * es) as *const c_void,
                            sc[j],
                            nccl_dtype(dtype),
                            j as i32,
                            comm,
                            st,
                        ),
                        "all_to_all send",
                    );
                }
                if res.is_ok() {
                    res = ck(
                        sys::ncclRecv(
                            (r.ptr as usize + ro * es) as *mut c_void,
                            rc[j],
                            nccl_dtype(dtype),
                            j as i32,
                            comm,
                            st,
                        ),
                        "all_to_all recv",
                    );
                }
                so += sc[j];
                ro += rc[j];
            }
            ck(sys::ncclGroupEnd(), "group_end")?;
            res?;
        }
        self.count(
            kind,
            ((sc.iter().sum::<usize>() - sc[self.rank]) * es) as u64,
            ((rc.iter().sum::<usize>() - rc[self.rank]) * es) as u64,
        );
        Ok(r.stream)
    }

    fn barrier_enqueue(&self) -> Result<Arc<CudaStream>> {
        let mut one = self
            .stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| drv("allocating the barrier word", e))?;
        let v = crate::BufferMut::buf_mut(&mut one);
        let c: CollectiveRef<'_> = Collective::AllReduce {
            send: None,
            recv: v,
            op: ReduceOp::Sum,
        };
        let s = self.enqueue(&c)?;
        // a barrier is a host-side rendezvous (and the word must outlive the kernel): wait here,
        // under the timeout
        self.wait_stream(&s, "barrier")?;
        Ok(s)
    }

    /// Traffic of one operation (see [`crate::stats`]: NCCL's own algorithm is invisible here, so
    /// these are the bus-bandwidth figures nccl-tests uses: all-reduce `2(n-1)/n·S`, reduce-scatter
    /// and all-gather `(n-1)·S` of the per-rank block, broadcast and reduce `S`, all-to-all the
    /// blocks to and from other ranks, point-to-point the message).
    fn count(&self, kind: OpKind, sent: u64, received: u64) {
        self.traffic.sent(kind, sent);
        self.traffic.received(kind, received);
    }

    fn event_on(&self, s: &Arc<CudaStream>) -> Result<CudaEvent> {
        s.record_event(None)
            .map_err(|e| drv("recording a completion event", e))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn config(&self) -> &Config {
        &self.cfg
    }
    fn supports_device(&self) -> bool {
        true
    }
    fn local_rank(&self) -> usize {
        // one rank per GPU: the device it was given is its slot on the host (LOCAL_RANK under
        // torchrun, the node-local rank under mpirun)
        self.stream.context().ordinal()
    }
    fn device(&self) -> Option<usize> {
        Some(self.stream.context().ordinal())
    }
    fn exec(&self, c: CollectiveRef<'_>) -> Result<()> {
        // Again here, not only in `run`: this hook is public and hands NCCL device pointers and
        // counts taken from the views (a few integer compares).
        c.validate(self.rank, self.size)?;
        let name = c.name();
        if self.cfg.stream_ordered && !matches!(c, Collective::Barrier) {
            // errors of earlier stream-ordered work surface here, at the next call
            self.h.async_error()?;
            let s = self.launch(&c)?;
            self.note_inflight(s);
            return Ok(());
        }
        let s = self.launch(&c)?;
        self.wait_stream(&s, name)
    }
    fn exec_async(&self, mut c: CollectiveOwned) -> Result<Work<CollectiveOwned>> {
        let state = {
            let v = c.views();
            v.validate(self.rank, self.size)?; // as in `exec`
            if matches!(v, Collective::Send { .. } | Collective::Recv { .. }) {
                if self.h.broken.load(Ordering::Acquire) {
                    return Err(self.lost("a send/recv on an aborted NCCL communicator"));
                }
                let op = self.posted(&v)?;
                let slot = op.slot.clone();
                p2p::post(&self.h, op);
                State::Posted(slot, self.h.clone())
            } else {
                let s = self.launch(&v)?;
                State::Launched(EventWait {
                    event: self.event_on(&s)?,
                    h: self.h.clone(),
                })
            }
        };
        let p = NcclPending {
            state,
            op: Some(c),
            timeout: self.cfg.timeout,
        };
        Ok(Work::new(
            Box::new(p),
            self.cfg.timeout,
            "non-blocking NCCL collective",
        ))
    }
    fn synchronize(&self) -> Result<()> {
        let streams = std::mem::take(&mut *self.inflight.lock().unwrap_or_else(|e| e.into_inner()));
        for s in &streams {
            self.wait_stream(s, "synchronize")?;
        }
        Ok(())
    }
    fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Box<dyn Communicator>>> {
        if self.h.broken.load(Ordering::Acquire) {
            return Err(self.lost("split of an aborted NCCL communicator"));
        }
        let col = match color {
            None => -1, // NCCL_SPLIT_NOCOLOR
            Some(c) => i32::try_from(c).map_err(|_| {
                Error::InvalidArgument(format!(
                    "split: color {c} does not fit NCCL's non-negative int colors (max {})",
                    i32::MAX
                ))
            })?,
        };
        // A timed collective first, so that every rank has arrived before the untimed
        // ncclCommSplit (a missing rank then aborts the communicator instead of hanging it).
        let mut all = vec![0i64; 2 * self.size];
        self.exchange_signatures(&[i64::from(col), i64::from(key)], &mut all)?;
        p2p::launch(&self.h, None)?; // issue order: posted send/recv go before the split
        self.h
            .ctx
            .bind_to_thread()
            .map_err(|e| drv("binding the CUDA context", e))?;
        let g = self.h.comm.lock().unwrap_or_else(|e| e.into_inner());
        let mut new: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid communicator and out-pointer; NULL config = inherit.
        ck(
            unsafe { sys::ncclCommSplit(g.0, col, key, &mut new, std::ptr::null_mut()) },
            "ncclCommSplit",
        )?;
        drop(g);
        if new.is_null() {
            return Ok(None);
        }
        let (mut nr, mut nn) = (0i32, 0i32);
        // SAFETY: valid new communicator and out-pointers.
        unsafe {
            ck(sys::ncclCommUserRank(new, &mut nr), "ncclCommUserRank")?;
            ck(sys::ncclCommCount(new, &mut nn), "ncclCommCount")?;
        }
        Ok(Some(Box::new(NcclComm {
            rank: nr as usize,
            size: nn as usize,
            cfg: self.cfg.clone(),
            h: Handle::new(new, self.h.ctx.clone(), nr as usize),
            stream: self.stream.clone(),
            inflight: Mutex::new(Vec::new()),
            traffic: crate::stats::Traffic::new(),
            _keep: None,
        })))
    }
    fn traffic(&self) -> Option<&crate::stats::Traffic> {
        Some(&self.traffic)
    }
    fn exchange_signatures(&self, mine: &[i64], all: &mut [i64]) -> Result<()> {
        // NCCL only moves device memory: round-trip the few words through the communicator's stream
        let s = &self.stream;
        let send = s
            .clone_htod(mine)
            .map_err(|e| drv("uploading the call signature", e))?;
        let mut recv = s
            .alloc_zeros::<i64>(all.len())
            .map_err(|e| drv("allocating the signature buffer", e))?;
        self.exec(Collective::AllGather {
            send: crate::Buffer::buf(&send),
            recv: crate::BufferMut::buf_mut(&mut recv),
        })?;
        // stream-ordered mode returned at once: wait (under the timeout) before reading
        self.wait_stream(s, "checked mode's signature exchange")?;
        s.memcpy_dtoh(&recv, all)
            .map_err(|e| drv("downloading the signatures", e))?;
        s.synchronize()
            .map_err(|e| drv("synchronising the signature exchange", e))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // posted but never launched send/recv: their waiters get an error, not a destroyed comm
        p2p::cancel(&self.h);
        if self.h.broken.load(Ordering::Acquire) {
            return; // aborted: NCCL already released it
        }
        let _ = self.h.ctx.bind_to_thread();
        // stream-ordered work still in flight: wait for it (bounded; a timeout aborts)
        if self.synchronize().is_err() || self.wait_stream(&self.stream, "drop").is_err() {
            return;
        }
        let g = self.h.comm.lock().unwrap_or_else(|e| e.into_inner());
        if self.h.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: valid communicator, destroyed once; `broken` (set above, under the lock) keeps
        // pending operations' handles from calling into it afterwards.
        if let Err(e) = ck(unsafe { sys::ncclCommDestroy(g.0) }, "ncclCommDestroy") {
            tracing::warn!("{e}");
        }
    }
}
