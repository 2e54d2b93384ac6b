//! The CUDA backend (feature `cuda`): cudarc with dynamic loading, so the binary builds
//! without a CUDA toolkit and finds libcuda, libnvrtc and libcublas when it runs.
//!
//! - [`Gpu`]: the device, its context and stream, the kernels of `kernels/engine.cu`
//!   (compiled by NVRTC for the device's architecture at start, PTX cached on disk) and a
//!   cuBLAS handle.
//! - [`kv::VmmKv`]: the vAttention KV cache on the device (virtual reservation per layer,
//!   2 MiB physical pages mapped as sequences grow), or its static variant.
//! - [`forward::CudaBackend`]: bf16 weights on the device and the batched forward pass.

pub mod forward;
pub mod kv;
pub mod lt;

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as cu, sys};

use crate::error::{EngineError, Result};

pub const KERNELS: &str = include_str!("../../kernels/engine.cu");

fn err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Invalid(format!("CUDA: {what}: {e:?}"))
}

/// Kernel handles of `kernels/engine.cu`.
pub(crate) struct Kernels {
    pub embed: sys::CUfunction,
    pub gather_rows: sys::CUfunction,
    pub rmsnorm: sys::CUfunction,
    pub rmsnorm16: sys::CUfunction,
    /// Decode attention with 2 and 4 positions per warp iteration, for heads up to 256 wide,
    /// then the same for heads up to 128 wide (next positions prefetched).
    pub attention: [sys::CUfunction; 4],
    /// Decode attention with half a warp per position (heads up to 128, multiples of 8).
    pub attention_hw: sys::CUfunction,
    pub attention_tiles: sys::CUfunction,
    /// Prefill attention on tensor cores, head size 64 and 128.
    pub attention_mma: [sys::CUfunction; 2],
    pub silu_mul: sys::CUfunction,
    pub silu_mul16: sys::CUfunction,
    pub silu_mul16_cat: sys::CUfunction,
    pub f32_to_bf16: sys::CUfunction,
    /// gemv for up to 1, 2, 4, 8 tokens.
    pub gemv: [sys::CUfunction; 4],
    /// The same products of the inputs' RMSNorm (`gemv*_norm`: no RMSNorm kernel before).
    pub gemv_norm: [sys::CUfunction; 4],
    /// One token's Q/K/V of RMSNorm(x) with RoPE and the K/V cache write (no rope_kv).
    pub gemv1_qkv_rope: sys::CUfunction,
    /// Tensor-core products for up to 8, 16, 32 tokens (fused Q/K/V, residual add, gated unit).
    pub mm: [sys::CUfunction; 3],
    /// Split-K tensor-core products for up to 8, 16, 32, 64 tokens (inputs staged in
    /// shared memory).
    pub mms: [sys::CUfunction; 4],
    /// Stream-K tensor-core products over bf16 inputs for up to 8, 16, 32, 64 tokens.
    pub sk: [sys::CUfunction; 4],
    /// Their persistent grids: the blocks of each that fit on the device at once.
    pub sk_grid: [u32; 4],
    pub rope_kv: sys::CUfunction,
    pub sample_rows: sys::CUfunction,
    pub fill_random: sys::CUfunction,
    /// LaRoSA: top-k selection (alone and after RMSNorm), the sparse products, bf16 transpose.
    /// Top-k (alone, after RMSNorm) by values per thread: 4, 8, 12, 16, 24, 32.
    pub topk: [sys::CUfunction; 6],
    pub rmsnorm_topk: [sys::CUfunction; 6],
    /// Threads per block of the top-k kernels (`TOPK_THREADS`, from their launch bounds).
    pub topk_threads: u32,
    /// The same top-k over a cluster of blocks (sm_90+), by values per thread: 2, 4, 6, 8,
    /// 12, 16.
    pub topk_cluster: [sys::CUfunction; 6],
    pub rmsnorm_topk_cluster: [sys::CUfunction; 6],
    /// Sparse products over kept inputs, output tiles of 512 and 1024.
    pub sparse_mm: [sys::CUfunction; 2],
    /// Threads per block of `sparse_mm*` (`SP_THREADS`, read from their launch bounds).
    pub sparse_threads: u32,
    /// Block size of the decode attention kernels (32 * ATT_WARPS).
    pub att_threads: u32,
    pub transpose_bf16: sys::CUfunction,
    /// A matrix into the `sk*` kernels' fragment layout.
    pub tile_w16: sys::CUfunction,
}

/// One CUDA device with a stream, the engine's kernels and cuBLAS.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub cc: (i32, i32),
    pub total_mem: usize,
    /// Streaming multiprocessors.
    pub sms: usize,
    pub dev: sys::CUdevice,
    ctx: sys::CUcontext,
    pub(crate) stream: sys::CUstream,
    pub(crate) k: Kernels,
    pub(crate) blas: blas_sys::cublasHandle_t,
    /// cuBLASLt with per-shape timed algorithms for the cuBLAS products at its token counts
    /// (see `lt`; None with `SWITCHYARD_BLASLT=0` or without libcublasLt).
    pub(crate) lt: Option<lt::Lt>,
    /// Seconds NVRTC took (0 when the PTX came from the cache).
    pub compile_secs: f64,
    /// Launch kernels with programmatic dependent launch (sm_90 and newer, on by default;
    /// `SWITCHYARD_PDL=0` or [`Self::set_pdl`] turns it off): the next kernel's blocks are
    /// scheduled while the previous kernel finishes and may stream their weights before
    /// waiting for it (`pdl_wait` in kernels/engine.cu).
    pdl: AtomicBool,
    /// The L2 fetch granularity in bytes: (the driver's default, the one set).
    pub l2_fetch: (usize, usize),
    /// LaRoSA's top-k selections run over a cluster of blocks (sm_90+, on by default;
    /// `SWITCHYARD_TOPK_CLUSTER=0` or [`Self::set_topk_cluster`] turns it off): one row's
    /// keys on 8 SMs instead of one block on one SM.
    topk_cluster: AtomicBool,
}

// SAFETY: the handles are plain driver handles; every entry point makes the context current
// on the calling thread first, and the engine uses one Gpu from one thread at a time.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

/// Whether the driver library can be loaded at all (never panics).
pub fn driver_present() -> bool {
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC compile of the engine's kernels for `arch` (e.g. "compute_90") with the macro
/// settings `defines` (`NAME=VALUE`, see [`kernel_defines`]); the PTX text.
pub fn compile_kernels(arch: &'static str, defines: &[String]) -> Result<String> {
    let present = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
        .unwrap_or(false);
    if !present {
        return Err(EngineError::Invalid(
            "CUDA: libnvrtc was not found (put the CUDA library directory on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let mut options = vec!["--std=c++17".to_string()];
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options,
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts).map_err(|e| {
        EngineError::Invalid(format!("CUDA: NVRTC failed on kernels/engine.cu: {e}"))
    })?;
    Ok(ptx.to_src())
}

fn arch_name(cc: (i32, i32)) -> &'static str {
    match cc {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 10 => "compute_100",
        (m, _) if m >= 9 => "compute_90",
        _ => "compute_80",
    }
}

/// Macro settings for the kernels from `SWITCHYARD_KERNEL_DEFINES` (`NAME=VALUE ...`, for
/// side-by-side runs of a kernel's tuning constants, e.g. `SP_U=16`); none by default.
pub fn kernel_defines() -> Vec<String> {
    std::env::var("SWITCHYARD_KERNEL_DEFINES")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The value SWITCHYARD_KERNEL_DEFINES gives macro `name` (`NAME=VALUE`), if it gives one
/// that parses: what the kernels were compiled with, for the host's launch shapes.
pub fn kernel_define<T: std::str::FromStr>(name: &str) -> Option<T> {
    kernel_defines()
        .iter()
        .find_map(|d| d.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// FNV-1a of `s`, continuing from hash `h` (`FNV_OFFSET` to start).
fn fnv(h: u64, s: &str) -> u64 {
    s.bytes()
        .fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}
const FNV_OFFSET: u64 = 0xcbf29ce484222325;

/// PTX for this architecture: from the cache (`$XDG_CACHE_HOME` or `~/.cache`,
/// `switchyard/kernels-<hash>-<arch>.ptx`) or compiled and stored there.
fn cached_ptx(arch: &'static str) -> Result<(String, f64)> {
    let defines = kernel_defines();
    let key = defines
        .iter()
        .fold(fnv(FNV_OFFSET, KERNELS), |h, d| fnv(h, d));
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")));
    let file = base.map(|b| {
        b.join("switchyard")
            .join(format!("kernels-{key:016x}-{arch}.ptx"))
    });
    if let Some(f) = &file {
        if let Ok(p) = std::fs::read_to_string(f) {
            return Ok((p, 0.0));
        }
    }
    let t = std::time::Instant::now();
    let ptx = compile_kernels(arch, &defines)?;
    let secs = t.elapsed().as_secs_f64();
    if let Some(f) = &file {
        let _ = std::fs::create_dir_all(f.parent().unwrap());
        let _ = std::fs::write(f, &ptx);
    }
    Ok((ptx, secs))
}

impl Gpu {
    /// Open device `ordinal`; a clear error (never a panic) when there is no driver or GPU.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        if !driver_present() {
            return Err(EngineError::Invalid(
                "CUDA: no NVIDIA driver found (libcuda.so could not be loaded)".into(),
            ));
        }
        std::panic::catch_unwind(|| Self::open_inner(ordinal))
            .unwrap_or_else(|p| {
                let what = crate::forward::panic_message(p.as_ref());
                Err(EngineError::Invalid(format!("CUDA: {what}")))
            })
            .map(Arc::new)
    }

    fn open_inner(ordinal: usize) -> Result<Self> {
        cu::init().map_err(|e| err("cuInit", e))?;
        let count = cu::device::get_count().map_err(|e| err("device count", e))?;
        if ordinal as i32 >= count {
            return Err(EngineError::Invalid(format!(
                "CUDA: device {ordinal} asked for, {count} present"
            )));
        }
        let dev = cu::device::get(ordinal as i32).map_err(|e| err("device", e))?;
        let name = cu::device::get_name(dev).map_err(|e| err("device name", e))?;
        // SAFETY: dev is a valid device handle.
        let (ctx, total_mem, cc) = unsafe {
            let ctx = cu::primary_ctx::retain(dev).map_err(|e| err("context", e))?;
            cu::ctx::set_current(ctx).map_err(|e| err("context", e))?;
            let total = cu::device::total_mem(dev).map_err(|e| err("memory", e))?;
            let major = cu::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .map_err(|e| err("attribute", e))?;
            let minor = cu::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            )
            .map_err(|e| err("attribute", e))?;
            (ctx, total, (major, minor))
        };
        // L2 fetches from memory in 128-byte lines (the driver's default is reported in
        // `l2_fetch`): the tensor-core products read 64 bytes of each of 8 weight rows per
        // load instruction (the mma fragment layout), and measured 5-6 points of copy
        // bandwidth faster with it (bench/results/gpu-llama2-7b-l2fetch.json).
        // SWITCHYARD_L2_FETCH=BYTES sets another value, 0 leaves the driver's.
        let fetch = match std::env::var("SWITCHYARD_L2_FETCH") {
            Ok(v) => v.parse().map_err(|_| {
                EngineError::Invalid(format!("SWITCHYARD_L2_FETCH={v}: expected a byte count"))
            })?,
            Err(_) => 128usize,
        };
        let limit = sys::CUlimit::CU_LIMIT_MAX_L2_FETCH_GRANULARITY;
        let mut driver_fetch = 0usize;
        // SAFETY: the context is current; the out-pointer is a live usize.
        unsafe {
            sys::cuCtxGetLimit(&mut driver_fetch, limit)
                .result()
                .map_err(|e| err("L2 fetch granularity", e))?;
            if fetch > 0 {
                sys::cuCtxSetLimit(limit, fetch)
                    .result()
                    .map_err(|e| err("L2 fetch granularity", e))?;
            }
        }
        let l2_fetch = (driver_fetch, if fetch > 0 { fetch } else { driver_fetch });
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| err("stream", e))?;
        let (ptx, compile_secs) = cached_ptx(arch_name(cc))?;
        let image = CString::new(ptx).map_err(|e| err("PTX", e))?;
        // SAFETY: the image is NUL-terminated PTX text; the context is current.
        let module = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| err("loading the kernels' PTX", e))?;
        let f = |n: &str| -> Result<sys::CUfunction> {
            let c = CString::new(n).unwrap();
            // SAFETY: module is loaded.
            unsafe { cu::module::get_function(module, c) }.map_err(|e| err(n, e))
        };
        let mut k = Kernels {
            embed: f("embed")?,
            gather_rows: f("gather_rows")?,
            rmsnorm: f("rmsnorm")?,
            rmsnorm16: f("rmsnorm16")?,
            attention: [
                f("attention")?,
                f("attention4")?,
                f("attention_h")?,
                f("attention4_h")?,
            ],
            attention_hw: f("attention_hw")?,
            attention_tiles: f("attention_tiles")?,
            attention_mma: [f("attention_mma64")?, f("attention_mma128")?],
            silu_mul: f("silu_mul")?,
            silu_mul16: f("silu_mul16")?,
            silu_mul16_cat: f("silu_mul16_cat")?,
            f32_to_bf16: f("f32_to_bf16")?,
            gemv: [f("gemv1")?, f("gemv2")?, f("gemv4")?, f("gemv8")?],
            gemv_norm: [
                f("gemv1_norm")?,
                f("gemv2_norm")?,
                f("gemv4_norm")?,
                f("gemv8_norm")?,
            ],
            gemv1_qkv_rope: f("gemv1_qkv_rope")?,
            mm: [f("mm8")?, f("mm16")?, f("mm32")?],
            mms: [f("mms8")?, f("mms16")?, f("mms32")?, f("mms64")?],
            sk: [f("sk8")?, f("sk16")?, f("sk32")?, f("sk64")?],
            sk_grid: [0; 4],
            rope_kv: f("rope_kv")?,
            sample_rows: f("sample_rows")?,
            fill_random: f("fill_random")?,
            topk: [
                f("topk4")?,
                f("topk8")?,
                f("topk12")?,
                f("topk16")?,
                f("topk24")?,
                f("topk32")?,
            ],
            rmsnorm_topk: [
                f("rmsnorm_topk4")?,
                f("rmsnorm_topk8")?,
                f("rmsnorm_topk12")?,
                f("rmsnorm_topk16")?,
                f("rmsnorm_topk24")?,
                f("rmsnorm_topk32")?,
            ],
            topk_threads: 0,
            topk_cluster: [
                f("topk_cluster2")?,
                f("topk_cluster4")?,
                f("topk_cluster6")?,
                f("topk_cluster8")?,
                f("topk_cluster12")?,
                f("topk_cluster16")?,
            ],
            rmsnorm_topk_cluster: [
                f("rmsnorm_topk_cluster2")?,
                f("rmsnorm_topk_cluster4")?,
                f("rmsnorm_topk_cluster6")?,
                f("rmsnorm_topk_cluster8")?,
                f("rmsnorm_topk_cluster12")?,
                f("rmsnorm_topk_cluster16")?,
            ],
            sparse_mm: [f("sparse_mm512")?, f("sparse_mm1024")?],
            sparse_threads: 0,
            att_threads: 0,
            transpose_bf16: f("transpose_bf16")?,
            tile_w16: f("tile_w16")?,
        };
        // `__launch_bounds__(N, ..)` makes a kernel's largest block N: the block sizes of the
        // sparse products and the top-k kernels are tuning macros (SP_THREADS, TOPK_THREADS),
        // so the host reads them rather than assume them.
        let block = |func: sys::CUfunction, n: &str| -> Result<u32> {
            // SAFETY: a function of the loaded module.
            unsafe {
                cu::function::get_function_attribute(
                    func,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
                )
            }
            .map(|t| t as u32)
            .map_err(|e| err(n, e))
        };
        k.sparse_threads = block(k.sparse_mm[0], "sparse_mm512 block size")?;
        k.topk_threads = block(k.topk[0], "topk4 block size")?;
        // Decode attention carries no launch bounds by default (they changed its registers):
        // its block is 32 * ATT_WARPS warps as the kernels were compiled (8 unless the
        // defines set 1..=32).
        k.att_threads = 32
            * kernel_define("ATT_WARPS")
                .filter(|w: &u32| (1..=32).contains(w))
                .unwrap_or(8);
        // The prefill attention kernels (head size 128) and the split-K products take more
        // than the default 48 KiB of shared memory.
        for (func, bytes) in [
            (k.attention_tiles, forward::attention_tiles_smem(128)),
            (k.attention_mma[0], forward::attention_mma_smem(64)),
            (k.attention_mma[1], forward::attention_mma_smem(128)),
            (k.mms[0], forward::MS_SMEM_MAX),
            (k.mms[1], forward::MS_SMEM_MAX),
            (k.mms[2], forward::MS_SMEM_MAX),
            (k.mms[3], forward::MS_SMEM_MAX),
            (k.sk[0], forward::sk_smem(0)),
            (k.sk[1], forward::sk_smem(1)),
            (k.sk[2], forward::sk_smem(2)),
            (k.sk[3], forward::sk_smem(3)),
        ] {
            // SAFETY: a function of the loaded module.
            unsafe {
                cu::function::set_function_attribute(
                    func,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .map_err(|e| err("kernel shared memory", e))?;
        }
        // The stream-K products run a persistent grid: as many blocks as are resident at once.
        // SAFETY: dev is a valid device handle, the functions are of the loaded module.
        let sms = unsafe {
            cu::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
        }
        .map_err(|e| err("attribute", e))? as u32;
        for i in 0..4 {
            // SAFETY: as above.
            let per = unsafe {
                cu::occupancy::max_active_block_per_multiprocessor(
                    k.sk[i],
                    forward::SK_THREADS as i32,
                    forward::sk_smem(i),
                )
            }
            .map_err(|e| err("occupancy", e))?;
            k.sk_grid[i] = sms * per.max(1) as u32;
        }
        let present =
            std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(EngineError::Invalid(
                "CUDA: libcublas was not found (put the CUDA library directory on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let handle = blas::create_handle().map_err(|e| err("cuBLAS", e))?;
        // SAFETY: valid handle and stream.
        unsafe { blas::set_stream(handle, stream as _) }.map_err(|e| err("cuBLAS stream", e))?;
        // A workspace of our own: cuBLAS then allocates nothing per call, so its products
        // can be captured in the decode step's CUDA graph. It lives as long as the process's
        // context (the Gpu is never torn down before exit).
        const BLAS_WORKSPACE: usize = 32 << 20;
        // SAFETY: plain allocation on the current context; the handle is valid.
        let ws = unsafe {
            let ws = cu::malloc_sync(BLAS_WORKSPACE).map_err(|e| err("cuBLAS workspace", e))?;
            blas_sys::cublasSetWorkspace_v2(handle, ws as *mut c_void, BLAS_WORKSPACE)
                .result()
                .map_err(|e| err("cuBLAS workspace", e))?;
            ws
        };
        let lt = match lt::wanted() {
            Some(tokens) => lt::Lt::new(ws, BLAS_WORKSPACE, tokens)?,
            None => None,
        };
        let gpu = Gpu {
            ordinal,
            name,
            cc,
            total_mem,
            sms: sms as usize,
            dev,
            ctx,
            stream,
            k,
            blas: handle,
            lt,
            compile_secs,
            l2_fetch,
            pdl: AtomicBool::new(false),
            topk_cluster: AtomicBool::new(false),
        };
        gpu.set_pdl(std::env::var("SWITCHYARD_PDL").as_deref() != Ok("0"));
        gpu.set_topk_cluster(std::env::var("SWITCHYARD_TOPK_CLUSTER").as_deref() != Ok("0"));
        Ok(gpu)
    }

    /// The token counts whose single products go through cuBLASLt (None: all on `GemmEx`).
    pub fn blaslt_tokens(&self) -> Option<std::ops::RangeInclusive<usize>> {
        self.lt.as_ref().map(|l| l.tokens.clone())
    }

    /// The cuBLASLt shapes timed so far (None: the products are on cuBLAS `GemmEx`).
    pub fn blaslt_tuned(&self) -> Option<Vec<lt::Tuned>> {
        self.lt.as_ref().map(|l| l.tuned())
    }

    /// Make this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: ctx is the retained primary context.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| err("context", e))
    }

    pub fn sync(&self) -> Result<()> {
        // SAFETY: valid stream.
        unsafe { cu::stream::synchronize(self.stream) }.map_err(|e| err("synchronize", e))
    }

    /// Launch `f` on the stream; `args` point at each parameter's value (sizes must match
    /// the kernel's parameter types).
    ///
    /// # Safety
    /// Pointers passed as arguments must be device memory of the sizes the kernel reads.
    pub(crate) unsafe fn launch(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: upheld by the caller.
        unsafe { self.launch_smem(f, grid, block, 0, args) }
    }

    /// [`Self::launch`] without programmatic dependent launch even when it is on: the
    /// kernel starts only once the previous one has ended, and so do the kernels after it
    /// (nothing is let in early, whose blocks would wait on the SMs that the previous
    /// kernel's blocks still need).
    ///
    /// # Safety
    /// As for [`Self::launch`].
    pub(crate) unsafe fn launch_serial(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: upheld by the caller.
        unsafe { self.launch_with(f, (grid, block, 0), false, args) }
    }

    /// [`Self::launch`] with `smem` bytes of dynamic shared memory.
    ///
    /// # Safety
    /// As for [`Self::launch`].
    pub(crate) unsafe fn launch_smem(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: upheld by the caller.
        unsafe { self.launch_with(f, (grid, block, smem), self.pdl(), args) }
    }

    /// One launch of `f` (grid, block, dynamic shared memory), with programmatic dependent
    /// launch when `pdl`.
    ///
    /// # Safety
    /// As for [`Self::launch`].
    unsafe fn launch_with(
        &self,
        f: sys::CUfunction,
        (grid, block, smem): ((u32, u32, u32), u32, u32),
        pdl: bool,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        if !pdl {
            // SAFETY: upheld by the caller.
            return unsafe { cu::launch_kernel(f, grid, (block, 1, 1), smem, self.stream, args) }
                .map_err(|e| err("kernel launch", e));
        }
        // SAFETY: a zeroed attribute is a valid bit pattern; the id names the union member set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: upheld by the caller; cfg and attr outlive the call. Every kernel of
        // engine.cu waits for its predecessor (pdl_wait) before touching its data.
        unsafe { sys::cuLaunchKernelEx(&cfg, f, args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| err("kernel launch", e))
    }

    /// Whether kernels are launched with programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// Turn programmatic dependent launch on (only where the device has it, sm_90 and
    /// newer) or off, for side-by-side runs. Graphs captured before keep their launches.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on && self.cc.0 >= 9, Ordering::Relaxed);
    }

    /// Whether LaRoSA's top-k selections run over a cluster of blocks.
    pub fn topk_cluster(&self) -> bool {
        self.topk_cluster.load(Ordering::Relaxed)
    }

    /// Run the top-k selections over clusters (only where the device has them, sm_90 and
    /// newer) or one block per row, for side-by-side runs. Graphs captured before keep
    /// their launches.
    pub fn set_topk_cluster(&self, on: bool) {
        self.topk_cluster
            .store(on && self.cc.0 >= 9, Ordering::Relaxed);
    }

    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        self.bind()?;
        // SAFETY: plain allocation.
        let ptr = unsafe { cu::malloc_sync(bytes.max(1)) }.map_err(|e| {
            err(
                &format!("allocating {:.1} MiB", bytes as f64 / (1 << 20) as f64),
                e,
            )
        })?;
        Ok(DevBuf {
            ptr,
            bytes,
            gpu: self.clone(),
            owned: true,
        })
    }

    /// Copy `bytes` from `src` to `dst` on the engine's stream, then wait for it.
    pub fn copy(&self, dst: &DevBuf, dst_off: usize, src: &DevBuf, bytes: usize) -> Result<()> {
        assert!(dst_off + bytes <= dst.bytes && bytes <= src.bytes);
        self.bind()?;
        // SAFETY: both ranges lie inside live allocations (asserted above).
        unsafe { cu::memcpy_dtod_async(dst.ptr + dst_off as u64, src.ptr, bytes, self.stream) }
            .map_err(|e| err("copy", e))?;
        self.sync()
    }

    pub fn upload<T: Copy>(self: &Arc<Self>, data: &[T]) -> Result<DevBuf> {
        let b = self.alloc(std::mem::size_of_val(data))?;
        b.write(data)?;
        Ok(b)
    }

    /// Mean seconds of `run(i)` for i in 0..reps, after `warm` warm-up calls (`run(i)` for
    /// i in 0..warm): enqueue work on this device's stream; timed from sync to sync.
    pub fn mean_secs(
        &self,
        warm: usize,
        reps: usize,
        mut run: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        for i in 0..warm {
            run(i)?;
        }
        self.sync()?;
        let t = std::time::Instant::now();
        for i in 0..reps {
            run(i)?;
        }
        self.sync()?;
        Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
    }

    /// Device-to-device copy bandwidth (bytes read + written per second) over `bytes`.
    pub fn copy_bandwidth(self: &Arc<Self>, bytes: usize, reps: usize) -> Result<f64> {
        let a = self.alloc(bytes)?;
        let b = self.alloc(bytes)?;
        let secs = self.mean_secs(1, reps, |_| {
            // SAFETY: both buffers hold `bytes`.
            unsafe { cu::memcpy_dtod_async(b.ptr, a.ptr, bytes, self.stream) }
                .map_err(|e| err("copy", e))
        })?;
        Ok(2.0 * bytes as f64 / secs)
    }

    /// Fill bf16 elements of `buf` with deterministic random values in [-scale, scale).
    pub fn fill_random_bf16(&self, buf: &DevBuf, seed: u32, scale: f32) -> Result<()> {
        // SAFETY: buf is a live allocation of buf.bytes.
        unsafe { self.fill_random_at(buf.ptr, buf.bytes / 2, seed, scale) }
    }

    /// Copy `bytes` bytes at device address `ptr` to the host (after the stream's work).
    ///
    /// # Safety
    /// `ptr..ptr + bytes` must be mapped device memory.
    pub unsafe fn read_at(&self, ptr: u64, bytes: usize) -> Result<Vec<u8>> {
        self.bind()?;
        self.sync()?;
        let mut v = vec![0u8; bytes];
        // SAFETY: upheld by the caller.
        unsafe { cu::memcpy_dtoh_sync(&mut v, ptr) }.map_err(|e| err("download", e))?;
        Ok(v)
    }

    /// The `fill_random` kernel over `n` bf16 values at device address `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + 2n` must be mapped device memory.
    pub unsafe fn fill_random_at(&self, ptr: u64, n: usize, seed: u32, scale: f32) -> Result<()> {
        self.bind()?;
        let n = n as u64;
        let buf = DevPtr(ptr);
        // SAFETY: buf holds n bf16 values.
        unsafe {
            self.launch(
                self.k.fill_random,
                (1024, 1, 1),
                256,
                &mut [
                    &buf.0 as *const _ as *mut c_void,
                    &n as *const _ as *mut c_void,
                    &seed as *const _ as *mut c_void,
                    &scale as *const _ as *mut c_void,
                ],
            )
        }
    }
}

struct DevPtr(u64);

/// A plain device allocation, freed on drop; or a view of part of one ([`DevBuf::view`]),
/// which frees nothing.
pub struct DevBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
    gpu: Arc<Gpu>,
    owned: bool,
}

impl DevBuf {
    /// `bytes` of this allocation from `offset`, as a buffer that frees nothing.
    ///
    /// # Safety
    /// The view must not be used after this buffer is dropped.
    pub unsafe fn view(&self, offset: usize, bytes: usize) -> DevBuf {
        assert!(offset + bytes <= self.bytes);
        DevBuf {
            ptr: self.ptr + offset as u64,
            bytes,
            gpu: self.gpu.clone(),
            owned: false,
        }
    }
    pub fn write<T: Copy>(&self, data: &[T]) -> Result<()> {
        assert!(std::mem::size_of_val(data) <= self.bytes);
        self.gpu.bind()?;
        // On the engine's stream, then waited for. A synchronous cuMemcpyHtoD from pageable
        // memory may return before its DMA lands, and it is not ordered before the kernels
        // of our non-blocking stream: a kernel launched right after could read part of the
        // buffer's old contents (the stream-K repeat test caught the tail of an input so).
        // SAFETY: the buffer holds at least data's bytes; data outlives the copy (synced).
        unsafe { cu::memcpy_htod_async(self.ptr, data, self.gpu.stream) }
            .map_err(|e| err("upload", e))?;
        self.gpu.sync()
    }
    pub fn read<T: Copy + Default>(&self, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        assert!(std::mem::size_of_val(v.as_slice()) <= self.bytes);
        self.gpu.bind()?;
        self.gpu.sync()?;
        // SAFETY: the buffer holds at least n values.
        unsafe { cu::memcpy_dtoh_sync(&mut v, self.ptr) }.map_err(|e| err("download", e))?;
        Ok(v)
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = self.gpu.bind();
        // SAFETY: allocated by malloc_sync and not freed before.
        unsafe {
            let _ = cu::free_sync(self.ptr);
        }
    }
}

/// (free, total) bytes of the current context's device.
pub fn mem_info() -> Result<(usize, usize)> {
    cu::mem_get_info().map_err(|e| err("memory info", e))
}

/// The device KV allocator for `dm`'s shapes: vAttention (pages on demand) or static.
/// `budget` caps the physical bytes (default: 90 % of the device memory free now).
pub fn open_kv(
    dm: &forward::DeviceModel,
    layout: crate::kv::KvLayout,
    budget: Option<usize>,
    mode: kv::KvMode,
) -> Result<kv::VmmKv> {
    dm.gpu.bind()?;
    let budget = match budget {
        Some(b) => b,
        None => {
            let (free, _) = mem_info()?;
            free / 10 * 9
        }
    };
    kv::VmmKv::new(dm.gpu.clone(), layout, budget, mode)
}

/// Open device `ordinal`, upload `m` and build its backend and KV allocator.
pub fn open(
    ordinal: usize,
    m: &crate::model::Model,
    layout: crate::kv::KvLayout,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(
    Box<dyn crate::backend::Backend>,
    Box<dyn crate::kv::KvAllocator>,
)> {
    let gpu = Gpu::open(ordinal)?;
    let dm = Arc::new(forward::DeviceModel::upload(gpu, m, progress)?);
    let kv = open_kv(&dm, layout, None, kv::KvMode::Background)?;
    Ok((Box::new(forward::CudaBackend::new(dm)), Box::new(kv)))
}

#[cfg(test)]
mod tests {
    /// The kernels compile with NVRTC for Hopper and Ampere (needs libnvrtc on the library
    /// path, no GPU; `.ci/run` fetches it). Without libnvrtc this test says so and passes
    /// only when SWITCHYARD_REQUIRE_NVRTC is unset.
    #[test]
    fn kernels_compile_with_nvrtc() {
        for arch in ["compute_90", "compute_80"] {
            match super::compile_kernels(arch, &super::kernel_defines()) {
                Ok(ptx) => {
                    for k in [
                        "embed",
                        "attention",
                        "attention_tiles",
                        "gemv8",
                        "gemv1_norm",
                        "gemv1_qkv_rope",
                        "sample_rows",
                        "topk4",
                        "topk12",
                        "topk_cluster2",
                        "rmsnorm_topk_cluster8",
                        "topk32",
                        "rmsnorm_topk8",
                        "rmsnorm_topk32",
                        "sparse_mm512",
                        "sparse_mm1024",
                        "transpose_bf16",
                        "mm8",
                        "mm16",
                        "mm32",
                        "rope_kv",
                    ] {
                        assert!(
                            ptx.contains(&format!(".entry {k}(")),
                            "{arch}: no kernel {k} in the PTX"
                        );
                    }
                }
                Err(e) if std::env::var_os("SWITCHYARD_REQUIRE_NVRTC").is_none() => {
                    eprintln!("skipped: {e}");
                    return;
                }
                Err(e) => panic!("{arch}: {e}"),
            }
        }
    }
}
