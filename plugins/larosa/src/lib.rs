//! `larosa`: activation-sparse linear layers (a `linear-kernels` plugin).
//!
//! For every token, each linear layer keeps the `⌊(1 − s')·in⌋` inputs of largest magnitude
//! and zeroes the rest, with `s' = coef_in·s` for the inputs of q/k/v and gate/up and
//! `s' = coef_out·s` for those of o_proj and down_proj (LaRoSA's defaults: 0.8 and 1.2).
//! Served on a LaRoSA-rotated model (`rotation` on the pipeline stage) this is LaRoSA; on the
//! plain model it is TEAL-style magnitude sparsity; at `sparsity = 0` it is dense.
//!
//! Weights are stored column-major (`[in][out]`), so that a kept input's weight column is one
//! contiguous run: a decode step reads only the columns of kept inputs. Storage is f32, or
//! `q8` (per column, blocks of 32 int8 with an f32 scale: a quarter of the bytes).
//!
//! Configuration (`key = value` lines): `sparsity` (0 ≤ s < 1, default 0), `coef_in` (0.8),
//! `coef_out` (1.2), `storage` (`f32` | `q8`, default f32), `threads` (default: all cores).

use std::collections::HashMap;

use switchyard_plugin::{
    abi, config_pairs, export_linear_kernels, LinearId, LinearKernels, PluginError, PluginResult,
    Tensor,
};
use switchyard_pool::{Ptr, ThreadPool};

/// Up to this many tokens per call, each token's product reads only its kept columns; more
/// (prefill) go through the blocked product over masked inputs, which reuses each weight
/// block for every token.
const SPARSE_MAX_TOKENS: usize = 4;
/// Below this many multiply-adds a call runs on the calling thread alone.
const PARALLEL_MIN_WORK: usize = 1 << 15;
/// Output alignment of the threads' ranges (floats) and the q8 block size.
const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Storage {
    F32,
    Q8,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub sparsity: f64,
    pub coef_in: f64,
    pub coef_out: f64,
    pub storage: Storage,
    pub threads: usize,
    /// Idle spins of the kernel threads before they sleep.
    pub spin: usize,
}

impl Settings {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut s = Settings {
            sparsity: 0.0,
            coef_in: 0.8,
            coef_out: 1.2,
            storage: Storage::F32,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            spin: 2_000,
        };
        for (line, k, v) in config_pairs(text)? {
            let num = |lo: f64, hi: f64| -> Result<f64, String> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| (lo..=hi).contains(x))
                    .ok_or_else(|| {
                        format!("line {line}: {k} = {v:?} must be a number in [{lo}, {hi}]")
                    })
            };
            match k {
                "sparsity" => {
                    s.sparsity = num(0.0, 0.99)?;
                }
                "coef_in" => s.coef_in = num(0.0, 10.0)?,
                "coef_out" => s.coef_out = num(0.0, 10.0)?,
                "storage" => {
                    s.storage = match v {
                        "f32" => Storage::F32,
                        "q8" => Storage::Q8,
                        _ => return Err(format!("line {line}: storage = {v:?}: use f32 or q8")),
                    }
                }
                "spin" => {
                    s.spin = v
                        .parse()
                        .map_err(|_| format!("line {line}: spin = {v:?} must be a count"))?
                }
                "threads" => {
                    s.threads = v
                        .parse()
                        .ok()
                        .filter(|&t: &usize| (1..=1024).contains(&t))
                        .ok_or_else(|| format!("line {line}: threads = {v:?} must be 1..1024"))?
                }
                _ => {
                    return Err(format!(
                        "line {line}: unknown key {k:?} (sparsity, coef_in, coef_out, storage, threads, spin)"
                    ))
                }
            }
        }
        Ok(s)
    }

    /// Inputs kept per token out of `inp` for projection `projection`.
    pub fn keep(&self, projection: u64, inp: usize) -> usize {
        let coef = match projection {
            LinearId::O | LinearId::DOWN => self.coef_out,
            _ => self.coef_in,
        };
        let s = (coef * self.sparsity).clamp(0.0, 1.0);
        // A hair of slack so that e.g. (1 − 0.25)·64 = 48 exactly is not rounded down to 47.
        (((1.0 - s) * inp as f64) + 1e-9).floor() as usize
    }
}

/// The indices of the `k` largest |x| (ascending index order), ties broken by index.
pub fn top_k(x: &[f32], k: usize, mag: &mut Vec<f32>, idx: &mut Vec<u32>) {
    idx.clear();
    if k >= x.len() {
        idx.extend(0..x.len() as u32);
        return;
    }
    if k == 0 {
        return;
    }
    mag.clear();
    mag.extend(x.iter().map(|v| v.abs()));
    let pos = x.len() - k;
    let (_, thr, _) = mag.select_nth_unstable_by(pos, |a, b| a.total_cmp(b));
    let thr = *thr;
    let above = x.iter().filter(|v| v.abs().total_cmp(&thr).is_gt()).count();
    let mut ties = k - above;
    for (i, v) in x.iter().enumerate() {
        match v.abs().total_cmp(&thr) {
            std::cmp::Ordering::Greater => idx.push(i as u32),
            std::cmp::Ordering::Equal if ties > 0 => {
                ties -= 1;
                idx.push(i as u32)
            }
            _ => {}
        }
    }
}

enum Cols {
    /// `[in][out_pad]`
    F32(Vec<f32>),
    /// `q[in][out_pad]`, `scales[in][out_pad / 32]`
    Q8 { q: Vec<i8>, scales: Vec<f32> },
}

struct Stored {
    out: usize,
    inp: usize,
    /// `out` rounded up to a multiple of 32 (columns are padded with zeros).
    out_pad: usize,
    cols: Cols,
}

pub struct Larosa {
    s: Settings,
    weights: HashMap<LinearId, Stored>,
    pool: ThreadPool,
    /// The last single-token selection: q/k/v (and gate/up) read the same input with the
    /// same k, so it is selected once.
    last: std::sync::Mutex<LastTopK>,
}

#[derive(Default)]
struct LastTopK {
    x: Vec<f32>,
    k: usize,
    idx: Vec<u32>,
    mag: Vec<f32>,
}

impl LinearKernels for Larosa {
    fn create(config: &str) -> PluginResult<Self> {
        let s = Settings::parse(config).map_err(PluginError::invalid)?;
        Ok(Self {
            // Short spinning: the engine's own workers share these cores between our calls.
            pool: ThreadPool::with_spin(s.threads, s.spin),
            s,
            weights: HashMap::new(),
            last: std::sync::Mutex::new(LastTopK::default()),
        })
    }

    fn prepare(&mut self, id: LinearId, weight: &Tensor) -> PluginResult<()> {
        let sh = weight.shape();
        if sh.len() != 2 || sh[0] <= 0 || sh[1] <= 0 {
            return Err(PluginError::invalid(format!(
                "weight {id:?} must be a non-empty 2-D tensor, got {sh:?}"
            )));
        }
        let (out, inp) = (sh[0] as usize, sh[1] as usize);
        // SAFETY: the host's view is valid for this call; we copy it.
        let w = unsafe { weight.as_f32()? };
        let out_pad = out.div_ceil(BLOCK) * BLOCK;
        let mut t = vec![0f32; inp * out_pad];
        for (r, row) in w.chunks_exact(inp).enumerate() {
            for (j, v) in row.iter().enumerate() {
                t[j * out_pad + r] = *v;
            }
        }
        let cols = match self.s.storage {
            Storage::F32 => Cols::F32(t),
            Storage::Q8 => {
                let mut q = vec![0i8; t.len()];
                let mut scales = vec![0f32; t.len() / BLOCK];
                for ((b, qb), sc) in t
                    .chunks_exact(BLOCK)
                    .zip(q.chunks_exact_mut(BLOCK))
                    .zip(&mut scales)
                {
                    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                    *sc = amax / 127.0;
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    for (o, v) in qb.iter_mut().zip(b) {
                        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    }
                }
                Cols::Q8 { q, scales }
            }
        };
        self.weights.insert(
            id,
            Stored {
                out,
                inp,
                out_pad,
                cols,
            },
        );
        Ok(())
    }

    fn linear(
        &self,
        id: LinearId,
        x: &Tensor,
        y: &Tensor,
        cuda: Option<&abi::CudaContext>,
    ) -> PluginResult<()> {
        if cuda.is_some() {
            return Err(PluginError::invalid(
                "larosa's kernels here run on the CPU only",
            ));
        }
        let w = self
            .weights
            .get(&id)
            .ok_or_else(|| PluginError::invalid(format!("weight {id:?} was not prepared")))?;
        // SAFETY: views valid for the call.
        let (xs, ys) = unsafe { (x.as_f32()?, y.as_f32_mut()?) };
        if xs.len() % w.inp != 0 || ys.len() != xs.len() / w.inp * w.out {
            return Err(PluginError::invalid(format!(
                "x {:?} / y {:?} do not fit weight {} x {}",
                x.shape(),
                y.shape(),
                w.out,
                w.inp
            )));
        }
        let n = xs.len() / w.inp;
        let k = self.s.keep(id.projection(), w.inp);
        if n == 1 {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let l = &mut *last;
            // Bit-for-bit the same input and k: the same selection.
            let same = l.k == k
                && l.x.len() == xs.len()
                && l.x.iter().zip(xs).all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                top_k(xs, k, &mut l.mag, &mut l.idx);
                l.x.clear();
                l.x.extend_from_slice(xs);
                l.k = k;
            }
            self.sparse_row(w, xs, &l.idx, ys);
        } else if n <= SPARSE_MAX_TOKENS {
            for (xr, yr) in xs.chunks_exact(w.inp).zip(ys.chunks_exact_mut(w.out)) {
                let mut mag = Vec::new();
                let mut idx = Vec::with_capacity(k);
                top_k(xr, k, &mut mag, &mut idx);
                self.sparse_row(w, xr, &idx, yr);
            }
        } else {
            let mut xm = vec![0f32; xs.len()];
            let (mut mag, mut idx) = (Vec::new(), Vec::new());
            for (xr, mr) in xs.chunks_exact(w.inp).zip(xm.chunks_exact_mut(w.inp)) {
                top_k(xr, k, &mut mag, &mut idx);
                for &j in &idx {
                    mr[j as usize] = xr[j as usize];
                }
            }
            self.blocked(w, &xm, n, ys);
        }
        Ok(())
    }
}

impl Larosa {
    /// Output ranges of `nt` threads (multiples of [`BLOCK`]).
    fn range(w: &Stored, ti: usize, nt: usize) -> (usize, usize) {
        let blocks = w.out_pad / BLOCK;
        let per = blocks.div_ceil(nt);
        let (b0, b1) = ((ti * per).min(blocks), ((ti + 1) * per).min(blocks));
        (b0 * BLOCK, (b1 * BLOCK).min(w.out))
    }

    fn threads_for(&self, work: usize) -> bool {
        self.pool.n_threads() > 1 && work >= PARALLEL_MIN_WORK
    }

    /// One token: `y = Σ_{j ∈ idx} x_j · column_j`. The threads split the kept columns
    /// (each streams whole, nearly adjacent columns) into partial sums, added up at the end.
    fn sparse_row(&self, w: &Stored, x: &[f32], idx: &[u32], y: &mut [f32]) {
        let one = |ids: &[u32], acc: &mut [f32]| match &w.cols {
            Cols::F32(t) => kernels::sparse_f32(t, w.out_pad, 0, x, ids, acc),
            Cols::Q8 { q, scales } => kernels::sparse_q8(q, scales, w.out_pad, 0, x, ids, acc),
        };
        if !self.threads_for(idx.len() * w.out) {
            one(idx, y);
            return;
        }
        let nt = self.pool.n_threads();
        let out = w.out;
        let mut part = vec![0f32; nt * out];
        let pp = Ptr(part.as_mut_ptr());
        let per = idx.len().div_ceil(nt);
        self.pool.run(&|ti, _| {
            let ids = &idx[(ti * per).min(idx.len())..((ti + 1) * per).min(idx.len())];
            // SAFETY: each thread owns its partial-sum row.
            let acc = unsafe { std::slice::from_raw_parts_mut(pp.at(ti * out), out) };
            one(ids, acc);
        });
        y.copy_from_slice(&part[..out]);
        for p in part[out..].chunks_exact(out) {
            for (a, b) in y.iter_mut().zip(p) {
                *a += b;
            }
        }
    }

    /// Many tokens of masked input `xm` (`n × in`): `y = xm · W`, blocked so that each block
    /// of weight columns is read once for all tokens.
    fn blocked(&self, w: &Stored, xm: &[f32], n: usize, y: &mut [f32]) {
        let yp = Ptr(y.as_mut_ptr());
        let job = |ti: usize, nt: usize| {
            let (r0, r1) = Self::range(w, ti, nt);
            if r0 >= r1 {
                return;
            }
            let mut scratch = Vec::new();
            kernels::blocked(w, xm, n, r0, r1, yp, &mut scratch);
        };
        if self.threads_for(n * w.inp * w.out) {
            self.pool.run(&job);
        } else {
            job(0, 1);
        }
    }
}

mod kernels {
    use super::{Cols, Stored, BLOCK};
    use switchyard_pool::Ptr;

    #[cfg(target_arch = "x86_64")]
    fn has_fma() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    /// y[..] += a0·w0 + a1·w1 + a2·w2 + a3·w3
    #[inline(always)]
    fn axpy4<const FMA: bool>(a: [f32; 4], w: [&[f32]; 4], y: &mut [f32]) {
        let n = y.len();
        let (w0, w1, w2, w3) = (&w[0][..n], &w[1][..n], &w[2][..n], &w[3][..n]);
        for i in 0..n {
            y[i] = if FMA {
                w3[i].mul_add(
                    a[3],
                    w2[i].mul_add(a[2], w1[i].mul_add(a[1], w0[i].mul_add(a[0], y[i]))),
                )
            } else {
                y[i] + a[0] * w0[i] + a[1] * w1[i] + a[2] * w2[i] + a[3] * w3[i]
            };
        }
    }

    #[inline(always)]
    fn axpy1<const FMA: bool>(a: f32, w: &[f32], y: &mut [f32]) {
        for (yi, wi) in y.iter_mut().zip(w) {
            *yi = if FMA {
                wi.mul_add(a, *yi)
            } else {
                *yi + a * wi
            };
        }
    }

    #[inline(always)]
    fn sparse_f32_impl<const FMA: bool>(
        t: &[f32],
        stride: usize,
        r0: usize,
        x: &[f32],
        idx: &[u32],
        y: &mut [f32],
    ) {
        y.fill(0.0);
        let len = y.len();
        let col = |j: u32| &t[j as usize * stride + r0..j as usize * stride + r0 + len];
        let mut c = idx.chunks_exact(4);
        for g in &mut c {
            let a = [
                x[g[0] as usize],
                x[g[1] as usize],
                x[g[2] as usize],
                x[g[3] as usize],
            ];
            axpy4::<FMA>(a, [col(g[0]), col(g[1]), col(g[2]), col(g[3])], y);
        }
        for &j in c.remainder() {
            axpy1::<FMA>(x[j as usize], col(j), y);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sparse_f32_avx2(
        t: &[f32],
        stride: usize,
        r0: usize,
        x: &[f32],
        idx: &[u32],
        y: &mut [f32],
    ) {
        sparse_f32_impl::<true>(t, stride, r0, x, idx, y)
    }

    pub fn sparse_f32(t: &[f32], stride: usize, r0: usize, x: &[f32], idx: &[u32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: features detected above.
            return unsafe { sparse_f32_avx2(t, stride, r0, x, idx, y) };
        }
        sparse_f32_impl::<false>(t, stride, r0, x, idx, y)
    }

    #[inline(always)]
    fn sparse_q8_impl<const FMA: bool>(
        q: &[i8],
        scales: &[f32],
        stride: usize,
        r0: usize,
        x: &[f32],
        idx: &[u32],
        y: &mut [f32],
    ) {
        y.fill(0.0);
        let len = y.len();
        let nb = stride / BLOCK;
        for &j in idx {
            let j = j as usize;
            let a = x[j];
            let col = &q[j * stride + r0..j * stride + r0 + len];
            let sc = &scales[j * nb + r0 / BLOCK..];
            for ((yb, qb), s) in y.chunks_mut(BLOCK).zip(col.chunks(BLOCK)).zip(sc) {
                let f = a * s;
                for (yi, qi) in yb.iter_mut().zip(qb) {
                    *yi = if FMA {
                        (*qi as f32).mul_add(f, *yi)
                    } else {
                        *yi + f * *qi as f32
                    };
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sparse_q8_avx2(
        q: &[i8],
        scales: &[f32],
        stride: usize,
        r0: usize,
        x: &[f32],
        idx: &[u32],
        y: &mut [f32],
    ) {
        sparse_q8_impl::<true>(q, scales, stride, r0, x, idx, y)
    }

    pub fn sparse_q8(
        q: &[i8],
        scales: &[f32],
        stride: usize,
        r0: usize,
        x: &[f32],
        idx: &[u32],
        y: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: features detected above.
            return unsafe { sparse_q8_avx2(q, scales, stride, r0, x, idx, y) };
        }
        sparse_q8_impl::<false>(q, scales, stride, r0, x, idx, y)
    }

    /// Columns per block of the blocked product (the block stays in L2 for every token).
    const JB: usize = 64;
    /// Tokens per micro-kernel call.
    const TB: usize = 4;

    #[inline(always)]
    fn blocked_impl<const FMA: bool>(
        w: &Stored,
        xm: &[f32],
        n: usize,
        r0: usize,
        r1: usize,
        y: Ptr,
        scratch: &mut Vec<f32>,
    ) {
        let (inp, out, len) = (w.inp, w.out, r1 - r0);
        let lpad = len.div_ceil(BLOCK) * BLOCK;
        let mut acc = vec![0f32; n * lpad];
        for j0 in (0..inp).step_by(JB) {
            let j1 = (j0 + JB).min(inp);
            // The block's columns as f32 rows of `lpad` (stride `bs`, first at `off`).
            let (blk, bs, off): (&[f32], usize, usize) = match &w.cols {
                Cols::F32(t) => (&t[..], w.out_pad, r0),
                Cols::Q8 { q, scales } => {
                    scratch.resize(JB * lpad, 0.0);
                    let nb = w.out_pad / BLOCK;
                    for j in j0..j1 {
                        let row = &mut scratch[(j - j0) * lpad..(j - j0 + 1) * lpad];
                        let qc = &q[j * w.out_pad + r0..j * w.out_pad + r0 + lpad];
                        for (b, (rb, qb)) in row.chunks_mut(BLOCK).zip(qc.chunks(BLOCK)).enumerate()
                        {
                            let s = scales[j * nb + r0 / BLOCK + b];
                            for (o, v) in rb.iter_mut().zip(qb) {
                                *o = *v as f32 * s;
                            }
                        }
                    }
                    (&scratch[..], lpad, 0)
                }
            };
            let base = |j: usize| match &w.cols {
                Cols::F32(_) => j * bs + off,
                Cols::Q8 { .. } => (j - j0) * bs,
            };
            for t0 in (0..n).step_by(TB) {
                let tn = (n - t0).min(TB);
                for c0 in (0..lpad).step_by(BLOCK) {
                    let mut a = [[0f32; BLOCK]; TB];
                    for (t, at) in a.iter_mut().enumerate().take(tn) {
                        at.copy_from_slice(
                            &acc[(t0 + t) * lpad + c0..(t0 + t) * lpad + c0 + BLOCK],
                        );
                    }
                    for j in j0..j1 {
                        let b = base(j) + c0;
                        let wc: &[f32; BLOCK] = blk[b..b + BLOCK].try_into().unwrap();
                        for t in 0..TB {
                            let xv = if t < tn { xm[(t0 + t) * inp + j] } else { 0.0 };
                            for i in 0..BLOCK {
                                a[t][i] = if FMA {
                                    wc[i].mul_add(xv, a[t][i])
                                } else {
                                    a[t][i] + xv * wc[i]
                                };
                            }
                        }
                    }
                    for (t, at) in a.iter().enumerate().take(tn) {
                        acc[(t0 + t) * lpad + c0..(t0 + t) * lpad + c0 + BLOCK].copy_from_slice(at);
                    }
                }
            }
        }
        for t in 0..n {
            for i in 0..len {
                // SAFETY: each thread writes its own output range of every token.
                unsafe { *y.at(t * out + r0 + i) = acc[t * lpad + i] };
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn blocked_avx2(
        w: &Stored,
        xm: &[f32],
        n: usize,
        r0: usize,
        r1: usize,
        y: Ptr,
        s: &mut Vec<f32>,
    ) {
        blocked_impl::<true>(w, xm, n, r0, r1, y, s)
    }

    pub fn blocked(
        w: &Stored,
        xm: &[f32],
        n: usize,
        r0: usize,
        r1: usize,
        y: Ptr,
        s: &mut Vec<f32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: features detected above.
            return unsafe { blocked_avx2(w, xm, n, r0, r1, y, s) };
        }
        blocked_impl::<false>(w, xm, n, r0, r1, y, s)
    }
}

export_linear_kernels!(Larosa, name = "larosa", version = "0.1.0");

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_test_support as ts;

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f()).collect()
        }
    }

    #[test]
    fn dense_at_zero_sparsity_passes_the_sdk_conformance_suite() {
        ts::linear_kernels::conformance::<Larosa>("");
        ts::linear_kernels::conformance::<Larosa>("threads = 1");
        let d = ts::root_descriptor(switchyard_plugin_v1).unwrap();
        assert_eq!(
            (d.kind.as_str(), d.name.as_str()),
            ("linear-kernels", "larosa")
        );
    }

    #[test]
    fn top_k_keeps_exactly_k_of_the_largest() {
        let mut rng = Rng(7);
        let (mut mag, mut idx) = (Vec::new(), Vec::new());
        for len in [1usize, 2, 7, 64, 576, 1536] {
            // Ties on purpose: values from a small set.
            let x: Vec<f32> = (0..len).map(|_| (rng.f() * 4.0).round() / 4.0).collect();
            for k in [0, 1, len / 3, len / 2, len.saturating_sub(1), len] {
                top_k(&x, k, &mut mag, &mut idx);
                assert_eq!(idx.len(), k, "len {len} k {k}");
                assert!(idx.windows(2).all(|w| w[0] < w[1]));
                let kept_min = idx
                    .iter()
                    .map(|&i| x[i as usize].abs())
                    .fold(f32::INFINITY, f32::min);
                let dropped_max = (0..len as u32)
                    .filter(|i| !idx.contains(i))
                    .map(|i| x[i as usize].abs())
                    .fold(0f32, f32::max);
                if k > 0 && k < len {
                    assert!(kept_min >= dropped_max, "len {len} k {k}");
                }
            }
        }
    }

    #[test]
    fn keep_counts_follow_the_coefficients() {
        let s = Settings::parse("sparsity = 0.5").unwrap();
        assert_eq!(s.keep(LinearId::Q, 576), 345); // ⌊(1 − 0.4)·576⌋
        assert_eq!(s.keep(LinearId::DOWN, 1536), 614); // ⌊(1 − 0.6)·1536⌋
        let s = Settings::parse("sparsity = 0.25\ncoef_in = 1\ncoef_out = 1").unwrap();
        assert_eq!(s.keep(LinearId::UP, 64), 48);
        assert_eq!(Settings::parse("").unwrap().keep(LinearId::O, 100), 100);
        for bad in [
            "sparsity = 1.5",
            "storage = f16",
            "colour = red",
            "threads = 0",
            "sparsity",
        ] {
            assert!(Larosa::create(bad).is_err(), "{bad}");
        }
    }

    /// q/k/v share one selection when their input is the same; a changed input (even one
    /// element) or another k selects again.
    #[test]
    fn the_selection_is_reused_only_for_the_same_input() {
        let mut rng = Rng(5);
        let mut k = Larosa::create("sparsity = 0.5\nthreads = 2").unwrap();
        let inp = 96;
        let ws: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(inp * inp)).collect();
        let ids = [
            LinearId::new(0, LinearId::Q),
            LinearId::new(0, LinearId::K),
            LinearId::new(0, LinearId::O),
        ];
        for (id, w) in ids.iter().zip(&ws) {
            k.prepare(*id, &Tensor::from_f32(w, &[inp, inp])).unwrap();
        }
        let mut x = rng.vec(inp);
        let check = |k: &Larosa, x: &[f32], id: LinearId, w: &[f32]| {
            let y = vec![0f32; inp];
            k.linear(
                id,
                &Tensor::from_f32(x, &[1, inp]),
                &Tensor::from_f32(&y, &[1, inp]),
                None,
            )
            .unwrap();
            let (mut mag, mut idx) = (Vec::new(), Vec::new());
            top_k(x, k.s.keep(id.projection(), inp), &mut mag, &mut idx);
            for o in 0..inp {
                let want: f32 = idx
                    .iter()
                    .map(|&j| x[j as usize] * w[o * inp + j as usize])
                    .sum();
                assert!((y[o] - want).abs() < 1e-4, "{id:?} output {o}");
            }
        };
        for round in 0..3 {
            for (id, w) in ids.iter().zip(&ws) {
                check(&k, &x, *id, w);
            }
            // One element changes: the cached selection must not be used.
            x[round] = 1e-9;
        }
    }

    /// Both storages, both paths (per-token sparse and blocked), many shapes, against a dense
    /// product of the masked input.
    #[test]
    fn sparse_kernels_match_the_dense_reference_on_masked_inputs() {
        let mut rng = Rng(11);
        let shapes = [
            (1, 1, 1),
            (1, 7, 3),
            (2, 64, 64),
            (1, 576, 192),
            (4, 129, 257),
            (5, 129, 257),
            (9, 96, 40),
            (1, 1536, 576),
            (17, 576, 1536),
        ];
        for storage in ["f32", "q8"] {
            for sp in [0.0, 0.4, 0.5] {
                for threads in [1, 3] {
                    let cfg = format!("sparsity = {sp}\nstorage = {storage}\nthreads = {threads}");
                    let mut k = Larosa::create(&cfg).unwrap();
                    for (case, &(n, inp, out)) in shapes.iter().enumerate() {
                        let proj = if case % 2 == 0 {
                            LinearId::Q
                        } else {
                            LinearId::DOWN
                        };
                        let id = LinearId::new(case, proj);
                        let w = rng.vec(out * inp);
                        k.prepare(id, &Tensor::from_f32(&w, &[out, inp])).unwrap();
                        let x = rng.vec(n * inp);
                        let y = vec![f32::NAN; n * out];
                        k.linear(
                            id,
                            &Tensor::from_f32(&x, &[n, inp]),
                            &Tensor::from_f32(&y, &[n, out]),
                            None,
                        )
                        .unwrap();
                        let keep = k.s.keep(proj, inp);
                        let (mut mag, mut idx) = (Vec::new(), Vec::new());
                        for t in 0..n {
                            let xr = &x[t * inp..(t + 1) * inp];
                            top_k(xr, keep, &mut mag, &mut idx);
                            for o in 0..out {
                                let want: f64 = idx
                                    .iter()
                                    .map(|&j| {
                                        xr[j as usize] as f64 * w[o * inp + j as usize] as f64
                                    })
                                    .sum();
                                let got = y[t * out + o] as f64;
                                // q8: per-element error ≤ amax/254 of its 32-block.
                                let tol = if storage == "q8" {
                                    0.01 * (keep as f64).sqrt() + 1e-4
                                } else {
                                    1e-4 * (inp as f64).sqrt()
                                };
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{cfg:?} shape {n}x{inp}x{out} token {t} output {o}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
