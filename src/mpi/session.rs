//! Process-wide MPI state: initialisation and finalisation, the thread-safety policy, error strings,
//! and the datatypes and operators that ferroccl creates once (for `f16`/`bf16`).
//!
//! There is one [`Session`] per process at a time, shared (`Arc`) by every [`super::MpiComm`] and every
//! pending operation. When the last one is dropped the session is dropped, which frees the derived
//! datatypes and user operators and — if ferroccl initialised MPI — calls `MPI_Finalize`. MPI cannot be
//! initialised twice in one process, so a later [`super::MpiComm::world`] then fails with a message
//! saying so.

use crate::{DType, Error, ReduceOp, Result};
use mpi::ffi;
use mpi::Threading;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// `MPI_SUCCESS` as the C `int` every MPI function returns.
pub(crate) const SUCCESS: c_int = ffi::MPI_SUCCESS as c_int;

/// How `MPI_IN_PLACE` is spelled by the MPI library we are linked to. The constant is a C macro (a
/// cast integer) that bindgen does not carry over and that differs between implementations, so it is
/// recognised from `MPI_Get_library_version` at start-up.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InPlace {
    /// The sentinel address (Open MPI: 1; MPICH and its derivatives: -1).
    Sentinel(usize),
    /// Unknown library: in-place all-reduce copies the input to a scratch buffer instead.
    Copy,
}

/// The process's MPI state. See the module docs.
pub(crate) struct Session {
    /// Present when ferroccl initialised MPI; dropping it calls `MPI_Finalize`.
    universe: Option<mpi::environment::Universe>,
    /// The thread level MPI provided.
    pub(crate) threading: Threading,
    /// True unless MPI provided `MPI_THREAD_MULTIPLE`: every MPI call then takes `lock`.
    serialize: bool,
    lock: Mutex<()>,
    /// Set when an operation was abandoned while MPI may still use its buffers (a timeout): from then
    /// on ferroccl makes no MPI call in this process, not even `MPI_Finalize`.
    poisoned: AtomicBool,
    /// What `MPI_IN_PLACE` is.
    pub(crate) in_place: InPlace,
    /// `MPI_Get_library_version`.
    pub(crate) library: String,
    /// 2-byte contiguous datatypes for f16 and bf16.
    half_types: [Option<ffi::MPI_Datatype>; 2],
    /// User operators (Sum, Prod, Min, Max) for f16 and bf16, reducing in f32.
    half_ops: [[Option<ffi::MPI_Op>; 4]; 2],
}

// SAFETY: the MPI handles inside are plain identifiers of library objects. They are created once and
// never mutated afterwards; using them from several threads is allowed by MPI when MPI provides
// MPI_THREAD_MULTIPLE, and otherwise every MPI call ferroccl makes goes through `Session::call`/`guard`,
// which hold the global `lock`, so calls are serialised (MPI_THREAD_SERIALIZED semantics).
unsafe impl Send for Session {}
// SAFETY: see `Send`; all interior mutability is through `Mutex`/`AtomicBool`.
unsafe impl Sync for Session {}

struct Global {
    session: Weak<Session>,
    initialised_here: bool,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global {
    session: Weak::new(),
    initialised_here: false,
});

/// The live session, initialising MPI if no one has.
pub(crate) fn session() -> Result<Arc<Session>> {
    let mut g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = g.session.upgrade() {
        return Ok(s);
    }
    if g.initialised_here {
        return Err(Error::mpi(
            "MPI was finalised when the last MpiComm of this process was dropped, and MPI cannot be \
             initialised twice in one process; keep one MpiComm alive for as long as the program communicates",
        ));
    }
    let (universe, threading) = if mpi::is_initialized() {
        if mpi::is_finalized() {
            return Err(Error::mpi(
                "MPI has already been finalised by the application; create the MpiComm before MPI_Finalize",
            ));
        }
        let mut provided: c_int = 0;
        // SAFETY: MPI is initialised and not finalised; `provided` is a valid out-pointer.
        let rc = unsafe { ffi::MPI_Query_thread(&mut provided) };
        if rc != SUCCESS {
            return Err(Error::mpi_code(
                rc,
                format!("MPI_Query_thread failed: {}", error_string(rc)),
            ));
        }
        // SAFETY: reading link-time constants exported by the rsmpi C shim.
        let level = unsafe {
            if provided == ffi::RSMPI_THREAD_MULTIPLE {
                Threading::Multiple
            } else if provided == ffi::RSMPI_THREAD_SERIALIZED {
                Threading::Serialized
            } else if provided == ffi::RSMPI_THREAD_FUNNELED {
                Threading::Funneled
            } else {
                Threading::Single
            }
        };
        (None, level)
    } else {
        let (u, t) = mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| {
            Error::mpi("MPI_Init_thread did not initialise MPI (was it initialised concurrently?)")
        })?;
        g.initialised_here = true;
        (Some(u), t)
    };
    let s = Arc::new(Session::new(universe, threading)?);
    g.session = Arc::downgrade(&s);
    Ok(s)
}

/// The message of an MPI error code.
pub(crate) fn error_string(code: c_int) -> String {
    let cap = (ffi::MPI_MAX_ERROR_STRING as usize).max(1024);
    let mut buf: Vec<c_char> = vec![0; cap];
    let mut len: c_int = 0;
    // SAFETY: `buf` holds at least MPI_MAX_ERROR_STRING characters, as the standard requires.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr(), &mut len) };
    if rc != SUCCESS {
        return format!("MPI error code {code}");
    }
    let len = usize::try_from(len).unwrap_or(0).min(cap);
    let bytes: Vec<u8> = buf[..len].iter().map(|&c| c as u8).collect();
    format!(
        "{} (error code {code})",
        String::from_utf8_lossy(&bytes).trim_end_matches('\0')
    )
}

fn library_version() -> String {
    let cap = 8192; // MPI_MAX_LIBRARY_VERSION_STRING is 256 (Open MPI) to 8192 (MPICH)
    let mut buf: Vec<c_char> = vec![0; cap];
    let mut len: c_int = 0;
    // SAFETY: `buf` is larger than MPI_MAX_LIBRARY_VERSION_STRING of every implementation.
    let rc = unsafe { ffi::MPI_Get_library_version(buf.as_mut_ptr(), &mut len) };
    if rc != SUCCESS {
        return String::new();
    }
    let len = usize::try_from(len).unwrap_or(0).min(cap);
    let bytes: Vec<u8> = buf[..len].iter().map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

fn detect_in_place(library: &str) -> InPlace {
    if library.contains("Open MPI") {
        InPlace::Sentinel(1) // mpi.h: #define MPI_IN_PLACE ((void *) 1)
    } else if ["MPICH", "MVAPICH", "Intel(R) MPI", "CRAY MPICH"]
        .iter()
        .any(|n| library.contains(n))
    {
        InPlace::Sentinel(usize::MAX) // mpi.h: #define MPI_IN_PLACE ((void *) -1)
    } else {
        InPlace::Copy
    }
}

fn op_index(op: ReduceOp) -> usize {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => 0,
        ReduceOp::Prod => 1,
        ReduceOp::Min => 2,
        ReduceOp::Max => 3,
    }
}

#[inline(always)]
fn half_to_f32<const BF: bool>(bits: u16) -> f32 {
    if BF {
        half::bf16::from_bits(bits).to_f32()
    } else {
        half::f16::from_bits(bits).to_f32()
    }
}

#[inline(always)]
fn f32_to_half<const BF: bool>(x: f32) -> u16 {
    if BF {
        half::bf16::from_f32(x).to_bits()
    } else {
        half::f16::from_f32(x).to_bits()
    }
}

/// The `MPI_User_function` for f16 (`BF = false`) or bf16 (`BF = true`) and operator `OP` (the index of
/// [`op_index`]): `inout[i] = in[i] op inout[i]`, computed in f32 and rounded once, as
/// `crate::dtype` reduces half types. Never panics (it runs inside MPI, across an `extern "C"` edge).
unsafe extern "C" fn half_reduce<const BF: bool, const OP: u8>(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _datatype: *mut ffi::MPI_Datatype,
) {
    if invec.is_null() || inoutvec.is_null() || len.is_null() {
        return;
    }
    // SAFETY: MPI passes a valid count.
    let n = usize::try_from(unsafe { *len }).unwrap_or(0);
    let a = invec as *const u16;
    let b = inoutvec as *mut u16;
    for i in 0..n {
        // SAFETY: MPI passes two vectors of `len` elements of our 2-byte datatype; unaligned accesses
        // because MPI's scratch buffers carry no alignment promise.
        let (x, y) = unsafe { (a.add(i).read_unaligned(), b.add(i).read_unaligned()) };
        let (x, y) = (half_to_f32::<BF>(x), half_to_f32::<BF>(y));
        let r = match OP {
            0 => y + x,
            1 => y * x,
            2 => {
                if x < y {
                    x
                } else {
                    y
                }
            }
            _ => {
                if x > y {
                    x
                } else {
                    y
                }
            }
        };
        // SAFETY: as above.
        unsafe { b.add(i).write_unaligned(f32_to_half::<BF>(r)) };
    }
}

type UserFn = unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_int, *mut ffi::MPI_Datatype);

const HALF_FNS: [[UserFn; 4]; 2] = [
    [
        half_reduce::<false, 0>,
        half_reduce::<false, 1>,
        half_reduce::<false, 2>,
        half_reduce::<false, 3>,
    ],
    [
        half_reduce::<true, 0>,
        half_reduce::<true, 1>,
        half_reduce::<true, 2>,
        half_reduce::<true, 3>,
    ],
];

impl Session {
    fn new(universe: Option<mpi::environment::Universe>, threading: Threading) -> Result<Session> {
        let library = library_version();
        let mut s = Session {
            serialize: threading != Threading::Multiple,
            universe,
            threading,
            lock: Mutex::new(()),
            poisoned: AtomicBool::new(false),
            in_place: detect_in_place(&library),
            library,
            half_types: [None; 2],
            half_ops: [[None; 4]; 2],
        };
        if s.universe.is_some() {
            // We own MPI: make errors on MPI_COMM_WORLD (and the communicators duplicated from it)
            // come back as codes instead of aborting the job.
            // SAFETY: MPI is initialised; reading rsmpi's exported handles.
            s.call(
                "MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN)",
                || unsafe {
                    ffi::MPI_Comm_set_errhandler(ffi::RSMPI_COMM_WORLD, ffi::RSMPI_ERRORS_RETURN)
                },
            )?;
        }
        for (h, fns) in HALF_FNS.iter().enumerate() {
            let mut ty = std::mem::MaybeUninit::<ffi::MPI_Datatype>::uninit();
            // SAFETY: MPI is initialised; `ty` is an out-parameter written on success.
            s.call("MPI_Type_contiguous", || unsafe {
                ffi::MPI_Type_contiguous(2, ffi::RSMPI_UINT8_T, ty.as_mut_ptr())
            })?;
            // SAFETY: written by the successful call above.
            let mut ty = unsafe { ty.assume_init() };
            // SAFETY: `ty` is a valid, uncommitted datatype.
            let committed = s.call("MPI_Type_commit", || unsafe {
                ffi::MPI_Type_commit(&mut ty)
            });
            s.half_types[h] = Some(ty);
            committed?;
            for (o, f) in fns.iter().enumerate() {
                let mut op = std::mem::MaybeUninit::<ffi::MPI_Op>::uninit();
                // SAFETY: `f` has the MPI_User_function signature; commutative operator.
                s.call("MPI_Op_create", || unsafe {
                    ffi::MPI_Op_create(Some(*f), 1, op.as_mut_ptr())
                })?;
                // SAFETY: written by the successful call above.
                s.half_ops[h][o] = Some(unsafe { op.assume_init() });
            }
        }
        Ok(s)
    }

    /// Fail if an earlier timeout left MPI in an unknown state.
    pub(crate) fn alive(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::mpi(
                "an earlier MPI operation of this process timed out while MPI may still have been using its \
                 buffers, so ferroccl makes no further MPI call in this process (MPI_Finalize included); \
                 exit and relaunch the job",
            ));
        }
        Ok(())
    }

    /// Mark the session unusable (see [`Session::alive`]).
    pub(crate) fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// True once [`Session::poison`] was called.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// The serialisation lock, when MPI did not provide `MPI_THREAD_MULTIPLE`.
    pub(crate) fn guard(&self) -> Option<MutexGuard<'_, ()>> {
        self.serialize
            .then(|| self.lock.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Make one MPI call (under the lock if serialised) and turn its return code into a `Result`.
    pub(crate) fn call(&self, what: &str, f: impl FnOnce() -> c_int) -> Result<()> {
        self.alive()?;
        let _g = self.guard();
        let rc = f();
        if rc == SUCCESS {
            Ok(())
        } else {
            Err(Error::mpi_code(
                rc,
                format!("{what} failed: {}", error_string(rc)),
            ))
        }
    }

    /// The MPI datatype of a dtype.
    pub(crate) fn datatype(&self, d: DType) -> Result<ffi::MPI_Datatype> {
        // SAFETY: reading rsmpi's exported predefined handles.
        Ok(unsafe {
            match d {
                DType::F32 => ffi::RSMPI_FLOAT,
                DType::F64 => ffi::RSMPI_DOUBLE,
                DType::I32 => ffi::RSMPI_INT32_T,
                DType::I64 => ffi::RSMPI_INT64_T,
                DType::U8 => ffi::RSMPI_UINT8_T,
                DType::F16 | DType::BF16 => {
                    return self.half_types[usize::from(d == DType::BF16)]
                        .ok_or_else(|| Error::mpi("internal: half-precision datatype missing"))
                }
            }
        })
    }

    /// The MPI operator of a reduction on a dtype (`Avg` reduces as `Sum`; divide afterwards).
    pub(crate) fn op(&self, d: DType, op: ReduceOp) -> Result<ffi::MPI_Op> {
        if matches!(d, DType::F16 | DType::BF16) {
            return self.half_ops[usize::from(d == DType::BF16)][op_index(op)]
                .ok_or_else(|| Error::mpi("internal: half-precision operator missing"));
        }
        // SAFETY: reading rsmpi's exported predefined handles.
        Ok(unsafe {
            match op {
                ReduceOp::Sum | ReduceOp::Avg => ffi::RSMPI_SUM,
                ReduceOp::Prod => ffi::RSMPI_PROD,
                ReduceOp::Min => ffi::RSMPI_MIN,
                ReduceOp::Max => ffi::RSMPI_MAX,
            }
        })
    }

    /// True when ferroccl initialised MPI (and so finalises it).
    pub(crate) fn owns_mpi(&self) -> bool {
        self.universe.is_some()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.is_poisoned() {
            // MPI may still write into abandoned buffers; do not touch it again, not even to finalise.
            if let Some(u) = self.universe.take() {
                std::mem::forget(u);
            }
            return;
        }
        if mpi::is_finalized() {
            return;
        }
        {
            // No lock: `&mut self` means no other ferroccl MPI call can be running.
            for ops in self.half_ops.iter_mut() {
                for op in ops.iter_mut().filter_map(Option::take) {
                    let mut op = op;
                    // SAFETY: a live user operator created by this session.
                    unsafe { ffi::MPI_Op_free(&mut op) };
                }
            }
            for ty in self.half_types.iter_mut().filter_map(Option::take) {
                let mut ty = ty;
                // SAFETY: a live datatype created by this session.
                unsafe { ffi::MPI_Type_free(&mut ty) };
            }
        }
        // Dropping the universe calls MPI_Finalize (only if ferroccl initialised MPI).
        drop(self.universe.take());
    }
}
