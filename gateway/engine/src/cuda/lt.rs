//! The cuBLAS products through cuBLASLt with the algorithm measured fastest for each shape,
//! instead of the one cuBLAS's `GemmEx` picks by its heuristic: at 9-16 tokens by default
//! ([`LT_DEFAULT_TOKENS`]), at every count with `SWITCHYARD_BLASLT=1`, never with `=0`.
//! The batched products (Q/K/V, gate/up in one `GemmBatchedEx`) stay on cuBLAS.
//!
//! The first time a shape (rows, cols, tokens, add) runs outside a graph capture, up to
//! [`CANDIDATES`] algorithms from `cublasLtMatmulAlgoGetHeuristic` are each timed on the
//! real weights with CUDA events, L2 flushed before every run (in decode the weights never
//! sit in L2), and the fastest is kept for the process. During a capture an untimed shape
//! takes the heuristic's first algorithm without timing it (nothing can synchronize then);
//! the decode step runs once eagerly before it is captured, so its shapes are timed first.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::sys as lt;
use cudarc::driver::{result as cu, sys};

use crate::error::{EngineError, Result};

/// Algorithms asked of the heuristic and timed per shape.
pub const CANDIDATES: usize = 12;
/// Timed runs of each candidate (after one untimed run).
const RUNS: usize = 6;
/// Bytes written before each timed run to push the weights out of L2 (L2 is 50 MiB on an
/// H100, 60 MiB on an H200).
const FLUSH_BYTES: usize = 160 << 20;

#[derive(Clone, Copy, Hash, PartialEq, Eq, Debug)]
struct Key {
    rows: usize,
    cols: usize,
    n: usize,
    add: bool,
}

struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    /// The heuristic's candidates, best first by its estimate; `algo` is one of them.
    algos: Vec<lt::cublasLtMatmulAlgo_t>,
    algo: lt::cublasLtMatmulAlgo_t,
    /// Set once the candidates have been timed (or timing failed: the heuristic's first).
    tuned: Option<Tuned>,
}

/// One shape's timing, for logs and benchmark reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tuned {
    pub rows: usize,
    pub cols: usize,
    pub tokens: usize,
    pub add: bool,
    pub candidates: usize,
    /// Index of the kept algorithm in the heuristic's order (0: the heuristic's own pick).
    pub chosen: usize,
    pub chosen_us: f64,
    pub heuristic_first_us: f64,
}

pub(crate) struct Lt {
    handle: lt::cublasLtHandle_t,
    /// The token counts whose products go through cuBLASLt.
    pub(crate) tokens: std::ops::RangeInclusive<usize>,
    ws: u64,
    ws_size: usize,
    plans: Mutex<HashMap<Key, Plan>>,
}

fn err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Invalid(format!("CUDA: cuBLASLt {what}: {e:?}"))
}

fn ok(s: lt::cublasStatus_t, what: &str) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(err(what, s))
    }
}

/// Token counts the tuned cuBLASLt products take by default: on the H100 (2026-12-07, two
/// pairs of runs in one call) batch-16 decode gained 1.6 % with them, while batches 32 and
/// 64 lost 1-4 % although each product alone timed faster.
pub const LT_DEFAULT_TOKENS: std::ops::RangeInclusive<usize> = 9..=16;

/// The token counts `SWITCHYARD_BLASLT` gives the tuned cuBLASLt products: unset,
/// [`LT_DEFAULT_TOKENS`]; "0", none (cuBLAS `GemmEx` everywhere); "1", every count.
pub fn wanted() -> Option<std::ops::RangeInclusive<usize>> {
    match std::env::var("SWITCHYARD_BLASLT").as_deref() {
        Ok("0") => None,
        Ok("1") => Some(1..=usize::MAX),
        _ => Some(LT_DEFAULT_TOKENS),
    }
}

impl Lt {
    /// A cuBLASLt handle sharing cuBLAS's workspace (`ws`, `ws_size` bytes; every product
    /// runs on the one stream, so they never use it at the same time). None when
    /// libcublasLt cannot be loaded.
    pub(crate) fn new(
        ws: u64,
        ws_size: usize,
        tokens: std::ops::RangeInclusive<usize>,
    ) -> Result<Option<Lt>> {
        let present =
            std::panic::catch_unwind(|| unsafe { lt::is_culib_present() }).unwrap_or(false);
        if !present {
            eprintln!(
                "switchyard: CUDA: libcublasLt was not found; the products stay on cuBLAS GemmEx"
            );
            return Ok(None);
        }
        let handle = cudarc::cublaslt::result::create_handle().map_err(|e| err("create", e))?;
        Ok(Some(Lt {
            handle,
            tokens,
            ws,
            ws_size,
            plans: Mutex::new(HashMap::new()),
        }))
    }

    /// The shapes timed so far, by rows, columns, tokens.
    pub fn tuned(&self) -> Vec<Tuned> {
        let mut v: Vec<Tuned> = self
            .plans
            .lock()
            .map(|p| p.values().filter_map(|p| p.tuned.clone()).collect())
            .unwrap_or_default();
        v.sort_by_key(|t| (t.rows, t.cols, t.tokens, t.add));
        v
    }

    /// y[n, rows] (f32) = x16[n, cols] (bf16) · wᵀ, w bf16 [rows, cols]; with `add`,
    /// y += the product. Same layout as cuBLAS `GemmEx` in forward.rs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        stream: sys::CUstream,
        w: u64,
        rows: usize,
        cols: usize,
        x16: u64,
        n: usize,
        y: u64,
        add: bool,
    ) -> Result<()> {
        let key = Key { rows, cols, n, add };
        let mut plans = self.plans.lock().map_err(|_| err("plans", "poisoned"))?;
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(self.plan(key)?),
        };
        // (the capture status is asked only while the shape is untimed)
        if plan.tuned.is_none() && !is_capturing(stream)? {
            self.time(stream, key, plan, w, x16);
        }
        self.run_algo(stream, plan, &plan.algo, w, x16, y, add)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_algo(
        &self,
        stream: sys::CUstream,
        p: &Plan,
        algo: &lt::cublasLtMatmulAlgo_t,
        w: u64,
        x16: u64,
        y: u64,
        add: bool,
    ) -> Result<()> {
        let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
        // SAFETY: the layouts describe w (rows x cols bf16), x16 (n x cols bf16) and y
        // (n x rows f32) as the caller holds them; the workspace is ws_size bytes.
        unsafe {
            ok(
                lt::cublasLtMatmul(
                    self.handle,
                    p.desc,
                    &alpha as *const f32 as *const c_void,
                    w as *const c_void,
                    p.a,
                    x16 as *const c_void,
                    p.b,
                    &beta as *const f32 as *const c_void,
                    y as *const c_void,
                    p.c,
                    y as *mut c_void,
                    p.c,
                    algo,
                    self.ws as *mut c_void,
                    self.ws_size,
                    stream as lt::cudaStream_t,
                ),
                "matmul",
            )
        }
    }

    /// Descriptors for one shape with the heuristic's first algorithm.
    fn plan(&self, k: Key) -> Result<Plan> {
        use cudarc::cublaslt::result as r;
        let bf = lt::cudaDataType::CUDA_R_16BF;
        let desc = r::create_matmul_desc(
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| err("desc", e))?;
        let t = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        // SAFETY: desc is live; the attribute is a cublasOperation_t.
        unsafe {
            r::set_matmul_desc_attribute(
                desc,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &t as *const _ as *const c_void,
                std::mem::size_of_val(&t),
            )
            .map_err(|e| err("transa", e))?;
        }
        // Column-major as cuBLAS sees them: A is w stored (cols x rows, ld cols) and used
        // transposed, B is x16 (cols x n), C/D is y (rows x n).
        let a = r::create_matrix_layout(bf, k.cols as u64, k.rows as u64, k.cols as i64)
            .map_err(|e| err("layout", e))?;
        let b = r::create_matrix_layout(bf, k.cols as u64, k.n as u64, k.cols as i64)
            .map_err(|e| err("layout", e))?;
        let c = r::create_matrix_layout(
            lt::cudaDataType::CUDA_R_32F,
            k.rows as u64,
            k.n as u64,
            k.rows as i64,
        )
        .map_err(|e| err("layout", e))?;
        let mut p = Plan {
            desc,
            a,
            b,
            c,
            algos: Vec::new(),
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
            tuned: None,
        };
        p.algos = self.candidates(&p, CANDIDATES)?;
        p.algo = p.algos[0];
        Ok(p)
    }

    /// Up to `count` algorithms for the plan's shape, best first by the heuristic.
    fn candidates(&self, p: &Plan, count: usize) -> Result<Vec<lt::cublasLtMatmulAlgo_t>> {
        use cudarc::cublaslt::result as r;
        let pref = r::create_matmul_pref().map_err(|e| err("preference", e))?;
        let ws = self.ws_size as u64;
        let mut out = vec![
            lt::cublasLtMatmulHeuristicResult_t {
                algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
                workspaceSize: 0,
                state: lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
                wavesCount: 0.0,
                reserved: [0; 4],
            };
            count
        ];
        let mut got = 0i32;
        // SAFETY: pref, desc and layouts are live; out has room for count results.
        let res = unsafe {
            r::set_matmul_pref_attribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(|e| err("preference", e))
            .and_then(|_| {
                ok(
                    lt::cublasLtMatmulAlgoGetHeuristic(
                        self.handle,
                        p.desc,
                        p.a,
                        p.b,
                        p.c,
                        p.c,
                        pref,
                        count as i32,
                        out.as_mut_ptr(),
                        &mut got,
                    ),
                    "heuristic",
                )
            })
        };
        // SAFETY: created above.
        unsafe {
            let _ = r::destroy_matmul_pref(pref);
        }
        res?;
        let algos: Vec<_> = out[..got.max(0) as usize]
            .iter()
            .filter(|h| {
                h.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && h.workspaceSize <= self.ws_size
            })
            .map(|h| h.algo)
            .collect();
        if algos.is_empty() {
            return Err(err("heuristic", "no algorithm for the shape"));
        }
        Ok(algos)
    }

    /// Time the plan's candidates and keep the fastest. A failure (e.g. no room for the
    /// flush buffer once the KV cache holds the memory) keeps the heuristic's first
    /// algorithm and is logged: it never fails the product itself.
    fn time(&self, stream: sys::CUstream, k: Key, p: &mut Plan, w: u64, x16: u64) {
        let secs = match self.time_in_scratch(stream, k, p, w, x16) {
            Ok(secs) => secs,
            Err(e) => {
                eprintln!(
                    "switchyard: cuBLASLt {}x{} at {} tokens: not timed ({e}); the heuristic's first algorithm",
                    k.rows, k.cols, k.n
                );
                vec![f64::NAN; 1]
            }
        };
        let (best, best_s) = secs
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, f64::NAN));
        p.algo = p.algos[best];
        let t = Tuned {
            rows: k.rows,
            cols: k.cols,
            tokens: k.n,
            add: k.add,
            candidates: p.algos.len(),
            chosen: best,
            chosen_us: best_s * 1e6,
            heuristic_first_us: secs[0] * 1e6,
        };
        if best_s.is_finite() {
            eprintln!(
                "switchyard: cuBLASLt {}x{} at {} tokens{}: algorithm {} of {} ({:.1} us; the heuristic's first {:.1} us)",
                t.rows,
                t.cols,
                t.tokens,
                if t.add { " (add)" } else { "" },
                t.chosen,
                t.candidates,
                t.chosen_us,
                t.heuristic_first_us
            );
        }
        p.tuned = Some(t);
    }

    /// [`Self::time_all`] over an output scratch and a flush buffer allocated for it.
    fn time_in_scratch(
        &self,
        stream: sys::CUstream,
        k: Key,
        p: &Plan,
        w: u64,
        x16: u64,
    ) -> Result<Vec<f64>> {
        // SAFETY: scratch allocations on the current context, freed before returning (after
        // the stream is done with them); the products write only into `scratch`.
        unsafe {
            let scratch = cu::malloc_sync(k.n * k.rows * 4).map_err(|x| err("scratch", x))?;
            let flush = match cu::malloc_sync(FLUSH_BYTES) {
                Ok(f) => f,
                Err(x) => {
                    let _ = cu::free_sync(scratch);
                    return Err(err("flush buffer", x));
                }
            };
            let r = self.time_all(stream, p, w, x16, scratch, flush, k.add);
            let synced = cu::stream::synchronize(stream).map_err(|x| err("synchronize", x));
            let _ = cu::free_sync(flush);
            let _ = cu::free_sync(scratch);
            synced.and(r)
        }
    }

    /// Mean seconds of each algorithm over RUNS runs, L2 flushed before each (scratch:
    /// the product's output, flush: FLUSH_BYTES of device memory).
    #[allow(clippy::too_many_arguments)]
    fn time_all(
        &self,
        stream: sys::CUstream,
        p: &Plan,
        w: u64,
        x16: u64,
        scratch: u64,
        flush: u64,
        add: bool,
    ) -> Result<Vec<f64>> {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let mut evs = Vec::with_capacity(2 * RUNS);
        let mut res = Ok(());
        for _ in 0..2 * RUNS {
            match cu::event::create(flags) {
                Ok(ev) => evs.push(ev),
                Err(x) => {
                    res = Err(err("event", x));
                    break;
                }
            }
        }
        let mut secs = Vec::with_capacity(p.algos.len());
        // SAFETY: the events are live (created above), the buffers are the caller's live
        // allocations of the sizes the plan describes.
        unsafe {
            'outer: for a in &p.algos {
                if res.is_err() {
                    break;
                }
                // One untimed run (first-launch costs), then RUNS timed ones.
                if let Err(x) = self.run_algo(stream, p, a, w, x16, scratch, add) {
                    res = Err(x);
                    break;
                }
                for i in 0..RUNS {
                    let steps = cu::memset_d8_async(flush, (i & 0xff) as u8, FLUSH_BYTES, stream)
                        .map_err(|x| err("flush", x))
                        .and_then(|_| {
                            cu::event::record(evs[2 * i], stream).map_err(|x| err("record", x))
                        })
                        .and_then(|_| self.run_algo(stream, p, a, w, x16, scratch, add))
                        .and_then(|_| {
                            cu::event::record(evs[2 * i + 1], stream).map_err(|x| err("record", x))
                        });
                    if let Err(x) = steps {
                        res = Err(x);
                        break 'outer;
                    }
                }
                if let Err(x) = cu::stream::synchronize(stream) {
                    res = Err(err("synchronize", x));
                    break;
                }
                let mut total = 0.0;
                for i in 0..RUNS {
                    match cu::event::elapsed(evs[2 * i], evs[2 * i + 1]) {
                        Ok(ms) => total += ms as f64 * 1e-3,
                        Err(x) => {
                            res = Err(err("elapsed", x));
                            break 'outer;
                        }
                    }
                }
                secs.push(total / RUNS as f64);
            }
            for ev in evs {
                let _ = cu::event::destroy(ev);
            }
        }
        res.map(|_| secs)
    }
}

/// Whether the stream is recording a graph now.
fn is_capturing(stream: sys::CUstream) -> Result<bool> {
    let mut st = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: valid stream, st a valid out pointer.
    unsafe { sys::cuStreamIsCapturing(stream, &mut st) }
        .result()
        .map_err(|e| err("capture status", e))?;
    Ok(st != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}
