//! The CUDA implementation of [`Kernels`]: the `.cu` files of `cuda/`, compiled at run time with
//! NVRTC for the device's architecture, launched on one stream.
//!
//! See the [parent module](super) for the workflow and the shared semantics. This module adds:
//!
//! * [`CudaKernels`] — owns a context and a stream of one device; buffers are `CudaSlice<T>`.
//! * [`compile_all`] — compiles every file of the [kernel registry](super::registry) for an
//!   architecture with NVRTC alone (no GPU), returning NVRTC's log per file; CI fails on any error or
//!   warning. [`compile_source`] / [`compile_ptx`] do the same for one source, with the same options
//!   (there is one NVRTC path). [`CudaKernels::load`] gives other modules' kernels (DGC's, MoE's,
//!   ...) the same compile-and-cache path at run time.
//! * [`nvrtc_available`] / [`driver_available`] — the library checks (the crate's one probe,
//!   [`crate::device::probe`]) that turn a missing `libcuda`/`libnvrtc` into an [`Error::Cuda`] with a
//!   fix, instead of cudarc's panic.
//!
//! # Index checks on the device
//!
//! Checking indices on the host would need them on the host. Instead the kernels skip out-of-range
//! rows and record the first bad index in a two-word device flag owned by the [`CudaKernels`]. By
//! default (eager mode) every indexed kernel (`gather_rows`, `scatter_rows`, `scatter_add`) reads the
//! flag back right after its launch — one small device-to-host copy, which waits for the kernel — and
//! returns [`Error::InvalidArgument`] like the CPU twin. In deferred mode
//! ([`CudaKernels::with_deferred_index_checks`]) launches do not wait; the flag is read, and an error
//! reported, by [`Kernels::synchronize`], [`Kernels::download`] and
//! [`CudaKernels::check_index_errors`]. Either way the destination's contents are unspecified after
//! such an error.

use super::registry::{self, KernelFile, COMMON_HEADER};
use super::{
    bad_index, check_gather, check_same_len, check_scatter, check_scatter_add, FloatElem,
    FloatKind, KernelElem, Kernels,
};
use crate::device::{cu_err, Lib};
use crate::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{sys as nvrtc_sys, Ptx};
use half::{bf16, f16};
use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

// ------------------------------------------------------------------------------------------------
// Sources: the kernel registry.

/// Every kernel file of `cuda/` (see [`registry`]); the shared header
/// `common.cuh` is not listed, it is supplied to each compilation.
pub fn kernel_sources() -> &'static [KernelFile] {
    registry::ALL
}

/// NVRTC options used for every compilation (plus `--gpu-architecture=<arch>`). `--fmad=false` keeps
/// products and sums separately rounded, as on the CPU twin; the kernels also use `__fmul_rn` /
/// `__fadd_rn` explicitly.
const NVRTC_OPTIONS: [&str; 5] = [
    "--std=c++17",
    "--fmad=false",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
];

/// The library checks (one probe for the crate, in [`crate::device`]), re-exported here because
/// kernel code and tests ask them before compiling.
pub use crate::device::{driver_available, nvrtc_available};

fn probe(libs: &[Lib]) -> Result<()> {
    crate::device::probe(libs)
}

// ------------------------------------------------------------------------------------------------
// NVRTC.

/// The output of one NVRTC compilation.
struct Compiled {
    /// PTX text, without the terminating NUL.
    ptx: String,
    /// CUBIN for the requested `sm_XY`.
    cubin: Vec<u8>,
    /// NVRTC's log (warnings, if any).
    log: String,
}

fn check_arch(arch: &str) -> Result<()> {
    let ok = arch
        .strip_prefix("sm_")
        .map(|rest| {
            let digits = rest.trim_end_matches(|c: char| c.is_ascii_lowercase());
            digits.len() >= 2 && digits.chars().all(|c| c.is_ascii_digit())
        })
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "GPU architecture {arch:?}: expected sm_XY (e.g. sm_80, sm_90, sm_90a)"
        )))
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument(format!("{what} contains a NUL byte")))
}

fn nvrtc_err(what: &str, r: nvrtc_sys::nvrtcResult) -> Error {
    Error::cuda_code(r as i32, format!("NVRTC {what} failed: {r:?}"))
}

/// Destroys an NVRTC program on drop.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once, here.
        unsafe {
            let _ = nvrtc_sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn nvrtc_compile(name: &str, source: &str, arch: &str) -> Result<Compiled> {
    check_arch(arch)?;
    probe(&[Lib::Nvrtc])?;
    let src = cstring(name, source)?;
    let c_name = cstring("kernel file name", name)?;
    let header = cstring(COMMON_HEADER.name, COMMON_HEADER.source)?;
    let header_name = cstring("header name", COMMON_HEADER.name)?;
    let headers = [header.as_ptr()];
    let include_names = [header_name.as_ptr()];
    let mut raw = std::ptr::null_mut();
    // SAFETY: every pointer is a live NUL-terminated string that outlives the program.
    let r = unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            &mut raw,
            src.as_ptr(),
            c_name.as_ptr(),
            1,
            headers.as_ptr(),
            include_names.as_ptr(),
        )
    };
    if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("nvrtcCreateProgram", r));
    }
    let prog = Program(raw);

    let mut opts = vec![cstring("option", &format!("--gpu-architecture={arch}"))?];
    for o in NVRTC_OPTIONS {
        opts.push(cstring("option", o)?);
    }
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: prog is live; the option strings outlive the call.
    let compiled =
        unsafe { nvrtc_sys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = program_log(&prog)?;
    if compiled != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::cuda_code(
            compiled as i32,
            format!("NVRTC could not compile {name} for {arch} ({compiled:?}):\n{log}"),
        ));
    }
    let ptx_bytes = get_bytes(
        &prog,
        "PTX",
        nvrtc_sys::nvrtcGetPTXSize,
        nvrtc_sys::nvrtcGetPTX,
    )?;
    let cubin = get_bytes(
        &prog,
        "CUBIN",
        nvrtc_sys::nvrtcGetCUBINSize,
        nvrtc_sys::nvrtcGetCUBIN,
    )?;
    let ptx = ptx_text(ptx_bytes)
        .ok_or_else(|| Error::cuda(format!("NVRTC returned malformed PTX for {name}")))?;
    Ok(Compiled { ptx, cubin, log })
}

/// Strips the trailing NULs; `None` if the rest is not NUL-free UTF-8.
fn ptx_text(mut bytes: Vec<u8>) -> Option<String> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

type SizeFn = unsafe fn(nvrtc_sys::nvrtcProgram, *mut usize) -> nvrtc_sys::nvrtcResult;
type GetFn = unsafe fn(nvrtc_sys::nvrtcProgram, *mut c_char) -> nvrtc_sys::nvrtcResult;

fn get_bytes(prog: &Program, what: &str, size: SizeFn, get: GetFn) -> Result<Vec<u8>> {
    let mut n = 0usize;
    // SAFETY: prog is live; `n` is a valid out-pointer.
    let r = unsafe { size(prog.0, &mut n) };
    if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err(&format!("getting the {what} size"), r));
    }
    let mut buf = vec![0u8; n];
    // SAFETY: `buf` has the size NVRTC asked for.
    let r = unsafe { get(prog.0, buf.as_mut_ptr().cast()) };
    if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err(&format!("getting the {what}"), r));
    }
    Ok(buf)
}

fn program_log(prog: &Program) -> Result<String> {
    let bytes = get_bytes(
        prog,
        "program log",
        nvrtc_sys::nvrtcGetProgramLogSize,
        nvrtc_sys::nvrtcGetProgramLog,
    )?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).trim().to_string())
}

/// Compiles every registered kernel file (see [`kernel_sources`]) for `arch` (`"sm_80"`, `"sm_90"`,
/// ...) with NVRTC — no GPU needed, only `libnvrtc`. Returns `(file name, NVRTC log)` per file; an
/// empty log means no warnings. A compilation error, or a missing `libnvrtc`, is [`Error::Cuda`]
/// (with the log).
pub fn compile_all(arch: &str) -> Result<Vec<(String, String)>> {
    check_arch(arch)?;
    probe(&[Lib::Nvrtc])?;
    registry::ALL
        .iter()
        .map(|f| compile_source(f.name, f.source, arch).map(|log| (f.name.to_string(), log)))
        .collect()
}

/// Compiles one CUDA source (named `name` in messages) for `arch` with NVRTC, exactly as kernels are
/// compiled at run time (same options; `#include "common.cuh"` resolves to `cuda/common.cuh`), and
/// returns NVRTC's log (empty when clean).
pub fn compile_source(name: &str, source: &str, arch: &str) -> Result<String> {
    nvrtc_compile(name, source, arch).map(|c| c.log)
}

/// Compiles one registered file for `arch` exactly as at run time and returns its PTX text (for
/// checks of which entry points a file defines, e.g. `dgc::gpu::compile_ptx`).
pub fn compile_ptx(file: KernelFile, arch: &str) -> Result<String> {
    nvrtc_compile(file.name, file.source, arch).map(|c| c.ptx)
}

// ------------------------------------------------------------------------------------------------
// Module cache: in-process per (context, file), and optionally on disk.

/// (context, file name, hash of the source).
type ModuleKey = (usize, &'static str, u64);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn modules() -> &'static Mutex<HashMap<ModuleKey, Arc<CudaModule>>> {
    static MODULES: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// FNV-1a, 64 bit: a hash that is stable across Rust versions (for on-disk cache keys).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes().iter().chain([0xffu8].iter()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn disk_cache_dir() -> Option<PathBuf> {
    std::env::var_os("FERROCCL_KERNEL_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn cache_paths(dir: &std::path::Path, name: &str, source: &str, arch: &str) -> (PathBuf, PathBuf) {
    let mut parts = vec![COMMON_HEADER.source, source, arch];
    parts.extend(NVRTC_OPTIONS);
    let key = fnv1a(&parts);
    let stem: String = name
        .trim_end_matches(".cu")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        dir.join(format!("{stem}-{arch}-{key:016x}.cubin")),
        dir.join(format!("{stem}-{arch}-{key:016x}.ptx")),
    )
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn load_compiled(ctx: &Arc<CudaContext>, name: &str, c: Compiled) -> Result<Arc<CudaModule>> {
    match ctx.load_module(Ptx::from_binary(c.cubin)) {
        Ok(m) => Ok(m),
        Err(cubin_err) => ctx.load_module(Ptx::from_src(c.ptx)).map_err(|ptx_err| {
            Error::cuda(format!(
                "loading the compiled {name} failed: as CUBIN ({cubin_err}) and as PTX ({ptx_err}); \
                 the driver may be older than the NVRTC that compiled it (CUDA 13)"
            ))
        }),
    }
}

fn load_module(
    ctx: &Arc<CudaContext>,
    arch: &str,
    name: &'static str,
    source: &'static str,
) -> Result<Arc<CudaModule>> {
    let key = (ctx.cu_ctx() as usize, name, fnv1a(&[source]));
    // Held while compiling: each (context, file) is compiled once, even with concurrent first calls.
    let mut map = lock(modules());
    if let Some(m) = map.get(&key) {
        return Ok(m.clone());
    }
    let cache = disk_cache_dir().map(|d| cache_paths(&d, name, source, arch));
    if let Some((cubin_path, _)) = &cache {
        if let Ok(cubin) = std::fs::read(cubin_path) {
            match ctx.load_module(Ptx::from_binary(cubin)) {
                Ok(m) => {
                    tracing::debug!(file = name, path = %cubin_path.display(), "loaded cached kernel");
                    map.insert(key, m.clone());
                    return Ok(m);
                }
                Err(e) => tracing::warn!(
                    path = %cubin_path.display(),
                    "cached kernel could not be loaded ({e}); recompiling"
                ),
            }
        }
    }
    let compiled = nvrtc_compile(name, source, arch)?;
    if !compiled.log.is_empty() {
        tracing::debug!(file = name, log = %compiled.log, "NVRTC log");
    }
    if let Some((cubin_path, ptx_path)) = &cache {
        let stored = write_atomically(cubin_path, &compiled.cubin)
            .and_then(|_| write_atomically(ptx_path, compiled.ptx.as_bytes()));
        if let Err(e) = stored {
            tracing::warn!(path = %cubin_path.display(), "could not store compiled kernel: {e}");
        }
    }
    let m = load_compiled(ctx, name, compiled)?;
    map.insert(key, m.clone());
    Ok(m)
}

// ------------------------------------------------------------------------------------------------
// CudaKernels.

/// Rows handled per thread per grid-stride iteration in the row kernels (`UNROLL` in the .cu files).
const ROW_UNROLL: usize = 4;
/// Threads per block of every kernel.
const BLOCK: usize = 256;

const ERR_GATHER: u32 = 1;
const ERR_SCATTER: u32 = 2;
const ERR_SCATTER_ADD: u32 = 3;

/// CUDA implementation of [`Kernels`] on one device and stream; buffers are `CudaSlice<T>` allocated
/// by [`Kernels::alloc`]/[`Kernels::upload`] (or any `CudaSlice` of the same context).
///
/// ```no_run
/// use ferroccl::kernels::{CudaKernels, Kernels};
/// let k = CudaKernels::new(0)?; // probes libcuda/libnvrtc, reads the compute capability
/// let src = k.upload(&[1.0f32, 2.0, 3.0, 4.0])?;
/// let idx = k.upload(&[1u32, 0])?;
/// let mut dst = k.alloc::<f32>(4)?;
/// k.gather_rows(&src, &idx, 2, &mut dst)?; // compiles pack.cu on first use
/// assert_eq!(k.download(&dst)?, vec![3.0, 4.0, 1.0, 2.0]);
/// # Ok::<(), ferroccl::Error>(())
/// ```
#[derive(Debug)]
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sm_count: usize,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// Device error flag: [code of the first failing kernel family, its bad index].
    err: Mutex<CudaSlice<u32>>,
    deferred: bool,
}

impl CudaKernels {
    /// Kernels on device `ordinal` (its primary context), on a new stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        let mut libs = vec![Lib::Cuda];
        if disk_cache_dir().is_none() {
            libs.push(Lib::Nvrtc);
        }
        probe(&libs)?;
        let ctx = CudaContext::new(ordinal)
            .map_err(cu_err(format_args!("opening CUDA device {ordinal}")))?;
        let stream = ctx.new_stream().map_err(cu_err("creating a CUDA stream"))?;
        Self::from_stream(stream)
    }

    /// Kernels that enqueue their work on an existing stream (and its context).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        probe(&[Lib::Cuda])?;
        let ctx = stream.context().clone();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cu_err("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cu_err("reading the multiprocessor count"))?;
        let err = stream
            .alloc_zeros::<u32>(2)
            .map_err(cu_err("allocating the error flag"))?;
        Ok(CudaKernels {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            sm_count: sm_count.max(1) as usize,
            functions: Mutex::new(HashMap::new()),
            err: Mutex::new(err),
            deferred: false,
        })
    }

    /// Deferred index checks (see the [module docs](self)): indexed kernels do not wait for the
    /// device; an out-of-range index is reported by the next [`Kernels::synchronize`],
    /// [`Kernels::download`] or [`CudaKernels::check_index_errors`].
    pub fn with_deferred_index_checks(mut self, deferred: bool) -> Self {
        self.deferred = deferred;
        self
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kernel is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture the kernels are compiled for (`sm_XY`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Compiles (or loads from the caches) every kernel file now instead of at first use.
    pub fn warm_up(&self) -> Result<()> {
        for f in [
            registry::PACK,
            registry::UNPACK,
            registry::SCATTER_ADD,
            registry::CAST,
            registry::AXPY,
        ] {
            load_module(&self.ctx, &self.arch, f.name, f.source)?;
        }
        Ok(())
    }

    /// Waits for the stream and reports (and clears) an out-of-range index recorded by an indexed
    /// kernel since the last check.
    pub fn check_index_errors(&self) -> Result<()> {
        let mut err = lock(&self.err);
        self.take_index_error(&mut err, None)
    }

    fn take_index_error(
        &self,
        err: &mut CudaSlice<u32>,
        op: Option<(&str, &str, usize)>,
    ) -> Result<()> {
        let flag = self
            .stream
            .clone_dtoh(&*err)
            .map_err(cu_err("reading the kernels' error flag"))?;
        self.stream
            .synchronize()
            .map_err(cu_err("synchronizing the kernel stream"))?;
        let (code, index) = match flag.as_slice() {
            [code, index, ..] => (*code, *index),
            _ => return Err(Error::cuda("the kernels' error flag is too short")),
        };
        if code == 0 {
            return Ok(());
        }
        self.stream
            .memset_zeros(err)
            .map_err(cu_err("clearing the kernels' error flag"))?;
        let name = match code {
            ERR_GATHER => "gather_rows",
            ERR_SCATTER => "scatter_rows",
            ERR_SCATTER_ADD => "scatter_add",
            _ => "an indexed kernel",
        };
        Err(match op {
            Some((op, what, bound)) if op == name => bad_index(op, index, what, bound),
            _ => Error::InvalidArgument(format!(
                "{name} (an earlier call, deferred index check): index {index} was out of range"
            )),
        })
    }

    fn after_indexed(
        &self,
        err: &mut CudaSlice<u32>,
        op: &str,
        what: &str,
        bound: usize,
    ) -> Result<()> {
        if self.deferred {
            Ok(())
        } else {
            self.take_index_error(err, Some((op, what, bound)))
        }
    }

    fn function(&self, file: KernelFile, name: &'static str) -> Result<CudaFunction> {
        let mut fns = lock(&self.functions);
        if let Some(f) = fns.get(name) {
            return Ok(f.clone());
        }
        let module = load_module(&self.ctx, &self.arch, file.name, file.source)?;
        let f = module.load_function(name).map_err(cu_err(format_args!(
            "loading kernel {name} from {}",
            file.name
        )))?;
        fns.insert(name, f.clone());
        Ok(f)
    }

    /// Kernel `kernel` of the registered file `file` (e.g. `registry::DGC`), compiled and cached like
    /// this module's own kernels. Launch it on [`CudaKernels::stream`] with cudarc's
    /// `launch_builder`.
    pub fn load(&self, file: KernelFile, kernel: &str) -> Result<CudaFunction> {
        self.load_function(file.name, file.source, kernel)
    }

    /// A kernel from any CUDA source (prefer [`CudaKernels::load`] with a registered file, so CI
    /// compiles it too),
    /// compiled and cached exactly like this module's own kernels (per device in the process, and on
    /// disk under `FERROCCL_KERNEL_CACHE`). `file` names the source in messages and cache files and
    /// must be unique per source; `#include "common.cuh"` is available. Launch the returned function
    /// on [`CudaKernels::stream`] with cudarc's `launch_builder`.
    pub fn load_function(
        &self,
        file: &'static str,
        source: &'static str,
        kernel: &str,
    ) -> Result<CudaFunction> {
        if kernel.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "kernel name {kernel:?} contains a NUL byte"
            )));
        }
        let module = load_module(&self.ctx, &self.arch, file, source)?;
        module
            .load_function(kernel)
            .map_err(cu_err(format_args!("loading kernel {kernel} from {file}")))
    }

    fn check_ctx<T>(&self, op: &str, what: &str, b: &CudaSlice<T>) -> Result<()> {
        if **b.context() != *self.ctx {
            return Err(Error::InvalidArgument(format!(
                "{op}: {what} lives on device {} (another context), these kernels on device {}",
                b.ordinal(),
                self.ctx.ordinal()
            )));
        }
        Ok(())
    }

    fn ptr<T>(&self, b: &CudaSlice<T>) -> u64 {
        let (p, _record) = b.device_ptr(&self.stream);
        p
    }

    /// Grid for the row kernels: x over units of a row, y over rows.
    fn rows_cfg(&self, n_rows: usize, units_per_row: usize) -> LaunchConfig {
        let tx = units_per_row.max(1).next_power_of_two().min(BLOCK);
        let ty = BLOCK / tx;
        let blocks = n_rows.div_ceil(ty * ROW_UNROLL).clamp(1, self.sm_count * 8);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (tx as u32, ty as u32, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Grid for the 1-D kernels: `per_thread` items per thread per iteration.
    fn elems_cfg(&self, n: usize, per_thread: usize) -> LaunchConfig {
        let blocks = n.div_ceil(BLOCK * per_thread).clamp(1, self.sm_count * 16);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn launch_cast<A, B>(
        &self,
        op: &str,
        name: &'static str,
        x: &CudaSlice<A>,
        y: &mut CudaSlice<B>,
    ) -> Result<()> {
        check_same_len(op, x.len(), y.len())?;
        self.check_ctx(op, "x", x)?;
        self.check_ctx(op, "y", y)?;
        let n = x.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let f = self.function(registry::CAST, name)?;
        let cfg = self.elems_cfg(x.len(), 1);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(y).arg(&n);
        // SAFETY: cast.cu's kernels take (const A*, B*, u64 n) and touch elements 0..n of each.
        unsafe { b.launch(cfg) }.map_err(cu_err(format_args!("launching {name}")))?;
        Ok(())
    }
}

/// Widest unit (16, 8, 4, 2 or 1 bytes) dividing the row size and every pointer.
fn unit_bytes(row_bytes: usize, ptrs: &[u64]) -> usize {
    [16usize, 8, 4, 2, 1]
        .into_iter()
        .find(|&w| row_bytes % w == 0 && ptrs.iter().all(|&p| p % w as u64 == 0))
        .unwrap_or(1)
}

fn copy_kernel(prefix: &'static str, unit: usize) -> &'static str {
    match (prefix, unit) {
        ("gather", 16) => "gather_rows_v16",
        ("gather", 8) => "gather_rows_v8",
        ("gather", 4) => "gather_rows_v4",
        ("gather", 2) => "gather_rows_v2",
        ("gather", _) => "gather_rows_v1",
        (_, 16) => "scatter_rows_copy_v16",
        (_, 8) => "scatter_rows_copy_v8",
        (_, 4) => "scatter_rows_copy_v4",
        (_, 2) => "scatter_rows_copy_v2",
        (_, _) => "scatter_rows_copy_v1",
    }
}

impl Kernels for CudaKernels {
    type Buf<T: KernelElem> = CudaSlice<T>;

    fn alloc<T: KernelElem>(&self, n: usize) -> Result<CudaSlice<T>> {
        if n == 0 {
            // No memset of an empty (possibly null) allocation.
            return self
                .stream
                .null::<T>()
                .map_err(cu_err("allocating an empty buffer"));
        }
        self.stream.alloc_zeros::<T>(n).map_err(cu_err(format_args!(
            "allocating {n} x {}",
            std::any::type_name::<T>()
        )))
    }

    fn upload<T: KernelElem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.alloc(0);
        }
        self.stream
            .clone_htod(host)
            .map_err(cu_err("copying to the device"))
    }

    fn download<T: KernelElem>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.check_ctx("download", "buffer", buf)?;
        let v = if buf.is_empty() {
            Vec::new()
        } else {
            self.stream
                .clone_dtoh(buf)
                .map_err(cu_err("copying to the host"))?
        };
        self.synchronize()?;
        Ok(v)
    }

    fn len<T: KernelElem>(&self, buf: &CudaSlice<T>) -> usize {
        buf.len()
    }

    fn gather_rows<T: KernelElem>(
        &self,
        src: &CudaSlice<T>,
        idx: &CudaSlice<u32>,
        row_len: usize,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        const OP: &str = "gather_rows";
        let src_rows = check_gather(src.len(), idx.len(), row_len, dst.len())?;
        self.check_ctx(OP, "src", src)?;
        self.check_ctx(OP, "idx", idx)?;
        self.check_ctx(OP, "dst", dst)?;
        if idx.is_empty() {
            return Ok(());
        }
        let row_bytes = row_len * std::mem::size_of::<T>();
        let unit = unit_bytes(row_bytes, &[self.ptr(src), self.ptr(dst)]);
        let units = row_bytes / unit;
        let f = self.function(registry::PACK, copy_kernel("gather", unit))?;
        let cfg = self.rows_cfg(idx.len(), units);
        let (n_out, n_src, upr) = (idx.len() as u64, src_rows as u64, units as u64);
        let mut err = lock(&self.err);
        {
            let mut b = self.stream.launch_builder(&f);
            b.arg(src)
                .arg(idx)
                .arg(dst)
                .arg(&n_out)
                .arg(&n_src)
                .arg(&upr)
                .arg(&mut *err);
            // SAFETY: gather_rows_v* take (const V*, const u32*, V*, u64, u64, u64, u32*); rows are
            // bounds-checked on the device against n_src, dst has n_out * units units of V.
            unsafe { b.launch(cfg) }.map_err(cu_err("launching gather_rows"))?;
        }
        self.after_indexed(&mut err, OP, "src rows", src_rows)
    }

    fn scatter_rows<T: FloatElem>(
        &self,
        src: &CudaSlice<T>,
        idx: &CudaSlice<u32>,
        weights: Option<&CudaSlice<f32>>,
        row_len: usize,
        accumulate: bool,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        const OP: &str = "scatter_rows";
        let dst_rows = check_scatter(
            src.len(),
            idx.len(),
            weights.map(|w| w.len()),
            row_len,
            dst.len(),
        )?;
        self.check_ctx(OP, "src", src)?;
        self.check_ctx(OP, "idx", idx)?;
        self.check_ctx(OP, "dst", dst)?;
        if let Some(w) = weights {
            self.check_ctx(OP, "weights", w)?;
        }
        if idx.is_empty() {
            return Ok(());
        }
        let (n_in, n_dst) = (idx.len() as u64, dst_rows as u64);
        let ptrs = [self.ptr(src), self.ptr(dst)];
        let row_bytes = row_len * std::mem::size_of::<T>();

        let mut err = lock(&self.err);
        if weights.is_none() && !accumulate {
            // Plain overwrite: a byte copy, like gather.
            let unit = unit_bytes(row_bytes, &ptrs);
            let units = row_bytes / unit;
            let f = self.function(registry::UNPACK, copy_kernel("scatter", unit))?;
            let cfg = self.rows_cfg(idx.len(), units);
            let upr = units as u64;
            let mut b = self.stream.launch_builder(&f);
            b.arg(src)
                .arg(idx)
                .arg(dst)
                .arg(&n_in)
                .arg(&n_dst)
                .arg(&upr)
                .arg(&mut *err);
            // SAFETY: scatter_rows_copy_v* take (const V*, const u32*, V*, u64, u64, u64, u32*);
            // destination rows are bounds-checked on the device against n_dst.
            unsafe { b.launch(cfg) }.map_err(cu_err("launching scatter_rows"))?;
        } else {
            // Elements per unit: f32 x4 when 16-byte units fit; 16-bit x8 / x4 / x2 when 16- / 8- /
            // 4-byte units fit (accumulation: one native packed atomic per unit where the
            // architecture has it, see cuda/unpack.cu).
            let ub = unit_bytes(row_bytes, &ptrs);
            let (name, per_unit) = match T::KIND {
                FloatKind::F32 if ub == 16 => ("scatter_rows_f32_v4", 4),
                FloatKind::F32 => ("scatter_rows_f32_v1", 1),
                FloatKind::BF16 if ub == 16 => ("scatter_rows_bf16_v8", 8),
                FloatKind::BF16 if ub >= 8 => ("scatter_rows_bf16_v4", 4),
                FloatKind::BF16 if ub >= 4 => ("scatter_rows_bf16_v2", 2),
                FloatKind::BF16 => ("scatter_rows_bf16_v1", 1),
                FloatKind::F16 if ub == 16 => ("scatter_rows_f16_v8", 8),
                FloatKind::F16 if ub >= 8 => ("scatter_rows_f16_v4", 4),
                FloatKind::F16 if ub >= 4 => ("scatter_rows_f16_v2", 2),
                FloatKind::F16 => ("scatter_rows_f16_v1", 1),
            };
            let units = row_len / per_unit;
            let f = self.function(registry::UNPACK, name)?;
            let cfg = self.rows_cfg(idx.len(), units);
            let upr = units as u64;
            let acc = u32::from(accumulate);
            let null: u64 = 0;
            let mut b = self.stream.launch_builder(&f);
            b.arg(src).arg(idx);
            match weights {
                Some(w) => b.arg(w),
                None => b.arg(&null),
            };
            b.arg(dst)
                .arg(&n_in)
                .arg(&n_dst)
                .arg(&upr)
                .arg(&acc)
                .arg(&mut *err);
            // SAFETY: scatter_rows_{f32,bf16,f16}_v* take (const U*, const u32*, const float* (may be
            // null), U*, u64, u64, u64, u32, u32*); weights has n_in entries when present.
            unsafe { b.launch(cfg) }.map_err(cu_err(format_args!("launching {name}")))?;
        }
        self.after_indexed(&mut err, OP, "dst rows", dst_rows)
    }

    fn scatter_add(
        &self,
        idx: &CudaSlice<u32>,
        val: &CudaSlice<f32>,
        dense: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "scatter_add";
        check_scatter_add(idx.len(), val.len())?;
        self.check_ctx(OP, "idx", idx)?;
        self.check_ctx(OP, "val", val)?;
        self.check_ctx(OP, "dense", dense)?;
        if idx.is_empty() {
            return Ok(());
        }
        let f = self.function(registry::SCATTER_ADD, "scatter_add_f32")?;
        let cfg = self.elems_cfg(idx.len(), ROW_UNROLL);
        let (n, n_dense) = (idx.len() as u64, dense.len() as u64);
        let mut err = lock(&self.err);
        {
            let mut b = self.stream.launch_builder(&f);
            b.arg(idx)
                .arg(val)
                .arg(dense)
                .arg(&n)
                .arg(&n_dense)
                .arg(&mut *err);
            // SAFETY: scatter_add_f32 takes (const u32*, const float*, float*, u64, u64, u32*);
            // indices are bounds-checked on the device against n_dense.
            unsafe { b.launch(cfg) }.map_err(cu_err("launching scatter_add_f32"))?;
        }
        self.after_indexed(&mut err, OP, "a dense buffer", n_dense as usize)
    }

    fn cast_f32_to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<bf16>) -> Result<()> {
        self.launch_cast("cast_f32_to_bf16", "cast_f32_to_bf16", x, y)
    }

    fn cast_bf16_to_f32(&self, x: &CudaSlice<bf16>, y: &mut CudaSlice<f32>) -> Result<()> {
        self.launch_cast("cast_bf16_to_f32", "cast_bf16_to_f32", x, y)
    }

    fn cast_f32_to_f16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f16>) -> Result<()> {
        self.launch_cast("cast_f32_to_f16", "cast_f32_to_f16", x, y)
    }

    fn cast_f16_to_f32(&self, x: &CudaSlice<f16>, y: &mut CudaSlice<f32>) -> Result<()> {
        self.launch_cast("cast_f16_to_f32", "cast_f16_to_f32", x, y)
    }

    fn scale_add(&self, a: f32, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "scale_add";
        check_same_len(OP, x.len(), y.len())?;
        self.check_ctx(OP, "x", x)?;
        self.check_ctx(OP, "y", y)?;
        if x.is_empty() {
            return Ok(());
        }
        let vec4 = unit_bytes(16, &[self.ptr(x), self.ptr(y)]) == 16;
        let (name, per_thread) = if vec4 {
            ("axpy_f32_v4", 4)
        } else {
            ("axpy_f32_v1", 1)
        };
        let f = self.function(registry::AXPY, name)?;
        let cfg = self.elems_cfg(x.len(), per_thread);
        let n = x.len() as u64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&a).arg(x).arg(y).arg(&n);
        // SAFETY: axpy_f32_v* take (float, const float*, float*, u64 n); the v4 variant needs
        // 16-byte aligned pointers (checked above) and handles the n % 4 tail itself.
        unsafe { b.launch(cfg) }.map_err(cu_err(format_args!("launching {name}")))?;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cu_err("synchronizing the kernel stream"))?;
        self.ctx
            .check_err()
            .map_err(cu_err("an earlier asynchronous CUDA call"))?;
        if self.deferred {
            self.check_index_errors()?;
        }
        Ok(())
    }
}
