//! The forward pass over a batch of sequences (prefill chunks and decode steps mixed).
//!
//! All tokens of the batch are rows of one activation matrix, so every linear layer is one
//! matrix product over the whole batch; attention is per sequence over its own contiguous
//! K/V (from the [`KvAllocator`]). Buffers live in [`Forward`] and only grow.

use crate::error::{EngineError, Result};
use crate::kv::KvAllocator;
use crate::linear::{proj, LinearKernels};
use crate::model::{Model, RopeStyle, Weight};
use crate::pool::ThreadPool;
use crate::quant::{self, GgmlType};

/// One sequence's part of a batch: `tokens` at positions `pos..pos + tokens.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub slot: usize,
    pub pos: usize,
    pub tokens: &'a [u32],
    /// Logits are computed for tokens with index >= `logits_from` (tokens.len() - 1: the last
    /// one only, as in generation; tokens.len(): none, as in a prefill chunk).
    pub logits_from: usize,
}

impl<'a> SeqChunk<'a> {
    pub fn last_logits(slot: usize, pos: usize, tokens: &'a [u32]) -> Self {
        Self {
            slot,
            pos,
            tokens,
            logits_from: tokens.len().saturating_sub(1),
        }
    }
}

/// Refuse chunks past the context or with ids outside the vocabulary, and make room for
/// every chunk in its slot (both backends run this before a pass).
pub fn check_batch(
    c: &crate::model::Config,
    kv: &mut dyn KvAllocator,
    batch: &[SeqChunk],
) -> Result<()> {
    for b in batch {
        let end = b.pos + b.tokens.len();
        if end > c.max_context {
            return Err(EngineError::Invalid(format!(
                "sequence of {end} tokens exceeds the model context of {}",
                c.max_context
            )));
        }
        if let Some(&t) = b.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        kv.ensure(b.slot, end)?;
    }
    Ok(())
}

/// The text of a caught panic's payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[derive(Default)]
struct Scratch {
    x: Vec<f32>,      // (n, dim) residual stream
    xb: Vec<f32>,     // (n, dim) normed input
    q: Vec<f32>,      // (n, n_heads*head_dim)
    k: Vec<f32>,      // (n, kv_heads*head_dim)
    v: Vec<f32>,      // (n, kv_heads*head_dim)
    att: Vec<f32>,    // (n, n_heads*head_dim) attention output
    tmp: Vec<f32>,    // (n, dim)
    hb: Vec<f32>,     // (n, ffn)
    hb2: Vec<f32>,    // (n, ffn)
    sel: Vec<f32>,    // (n_sel, dim) normed rows that need logits
    logits: Vec<f32>, // (n_sel, vocab)
    scores: Vec<f32>, // (threads, max_context) attention scores
    xsum: Vec<f32>,
    row_pos: Vec<usize>,
    row_item: Vec<usize>,
    kv_ptrs: Vec<(usize, usize)>,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

pub use switchyard_pool::Ptr;

pub struct Forward {
    pool: std::sync::Arc<ThreadPool>,
    s: Scratch,
    /// The layers' projections through these kernels instead of the engine's products.
    pub linear: Option<std::sync::Arc<dyn LinearKernels>>,
    /// When set, each forward pass stores every layer's normalized attention input (before
    /// the norm's scale: `x / rms(x)`, `(n, dim)` per layer) here (LaRoSA calibration).
    pub capture: Option<Vec<Vec<f32>>>,
}

impl Forward {
    pub fn new(pool: std::sync::Arc<ThreadPool>) -> Self {
        Self {
            pool,
            s: Scratch::default(),
            linear: None,
            capture: None,
        }
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// Run the batch; returns the logits rows requested by each chunk, in order
    /// (`(rows, vocab)` flattened).
    pub fn forward(
        &mut self,
        m: &Model,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
    ) -> Result<&[f32]> {
        let c = &m.cfg;
        let (dim, hd, nh, nkv) = (c.dim, c.head_dim, c.n_heads, c.n_kv_heads);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n: usize = batch.iter().map(|b| b.tokens.len()).sum();
        if n == 0 {
            return Ok(&[]);
        }
        check_batch(c, kv, batch)?;
        let n_sel: usize = batch
            .iter()
            .map(|b| b.tokens.len().saturating_sub(b.logits_from))
            .sum();
        let s = &mut self.s;
        let pool = &*self.pool;
        grow(&mut s.x, n * dim);
        grow(&mut s.xb, n * dim);
        grow(&mut s.tmp, n * dim);
        grow(&mut s.q, n * qd);
        grow(&mut s.att, n * qd);
        grow(&mut s.k, n * kvd);
        grow(&mut s.v, n * kvd);
        grow(&mut s.hb, n * c.ffn_dim);
        grow(&mut s.hb2, n * c.ffn_dim);
        grow(&mut s.sel, n_sel * dim);
        grow(&mut s.logits, n_sel * c.vocab_size);
        grow(&mut s.scores, pool.n_threads() * c.max_context);
        s.row_pos.clear();
        s.row_item.clear();
        for (i, b) in batch.iter().enumerate() {
            for j in 0..b.tokens.len() {
                s.row_pos.push(b.pos + j);
                s.row_item.push(i);
            }
        }

        // Embeddings: x[r] = E[token_r]
        let mut r = 0;
        for b in batch {
            for &t in b.tokens {
                m.tok_embd
                    .dequantize_row(t as usize, &mut s.x[r * dim..(r + 1) * dim]);
                r += 1;
            }
        }

        let linear = self.linear.clone();
        if let Some(cap) = &mut self.capture {
            cap.resize(m.layers.len(), Vec::new());
        }
        for (li, l) in m.layers.iter().enumerate() {
            if let Some(a) = &l.adapter {
                matmul(
                    pool,
                    a,
                    &s.x[..n * dim],
                    n,
                    &mut s.tmp[..n * dim],
                    &mut s.xsum,
                );
                s.x[..n * dim].copy_from_slice(&s.tmp[..n * dim]);
            }
            if let Some(cap) = &mut self.capture {
                let c = &mut cap[li];
                c.clear();
                for xr in s.x[..n * dim].chunks_exact(dim) {
                    let inv = 1.0 / (quant::dot_f32(xr, xr) / dim as f32 + m.cfg.rms_eps).sqrt();
                    c.extend(xr.iter().map(|v| v * inv));
                }
            }
            // Attention block.
            rmsnorm_rows(
                &s.x[..n * dim],
                &l.attn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            let lin = linear.as_deref();
            project(
                pool,
                lin,
                li,
                proj::Q,
                &l.wq,
                &s.xb[..n * dim],
                n,
                &mut s.q[..n * qd],
                &mut s.xsum,
            )?;
            project(
                pool,
                lin,
                li,
                proj::K,
                &l.wk,
                &s.xb[..n * dim],
                n,
                &mut s.k[..n * kvd],
                &mut s.xsum,
            )?;
            project(
                pool,
                lin,
                li,
                proj::V,
                &l.wv,
                &s.xb[..n * dim],
                n,
                &mut s.v[..n * kvd],
                &mut s.xsum,
            )?;
            for r in 0..n {
                let p = s.row_pos[r];
                rope(m, p, &mut s.q[r * qd..(r + 1) * qd]);
                rope(m, p, &mut s.k[r * kvd..(r + 1) * kvd]);
            }
            s.kv_ptrs.clear();
            for b in batch {
                let (kp, vp) = kv.kv(li, b.slot);
                s.kv_ptrs.push((kp as usize, vp as usize));
            }
            // Write this step's K/V into the cache: (ctx, kv_heads, head_dim) per slot.
            for r in 0..n {
                let (kp, vp) = s.kv_ptrs[s.row_item[r]];
                let p = s.row_pos[r];
                // SAFETY: ensure() above made room for position p in this slot.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        s.k.as_ptr().add(r * kvd),
                        (kp as *mut f32).add(p * kvd),
                        kvd,
                    );
                    std::ptr::copy_nonoverlapping(
                        s.v.as_ptr().add(r * kvd),
                        (vp as *mut f32).add(p * kvd),
                        kvd,
                    );
                }
            }
            attention(pool, c.max_context, hd, nh, nkv, s);
            project(
                pool,
                lin,
                li,
                proj::O,
                &l.wo,
                &s.att[..n * qd],
                n,
                &mut s.tmp[..n * dim],
                &mut s.xsum,
            )?;
            add_in_place(&mut s.x[..n * dim], &s.tmp[..n * dim]);

            // MLP block.
            rmsnorm_rows(
                &s.x[..n * dim],
                &l.ffn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            let f = c.ffn_dim;
            project(
                pool,
                lin,
                li,
                proj::GATE,
                &l.w_gate,
                &s.xb[..n * dim],
                n,
                &mut s.hb[..n * f],
                &mut s.xsum,
            )?;
            project(
                pool,
                lin,
                li,
                proj::UP,
                &l.w_up,
                &s.xb[..n * dim],
                n,
                &mut s.hb2[..n * f],
                &mut s.xsum,
            )?;
            for (g, u) in s.hb[..n * f].iter_mut().zip(&s.hb2[..n * f]) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            project(
                pool,
                lin,
                li,
                proj::DOWN,
                &l.w_down,
                &s.hb[..n * f],
                n,
                &mut s.tmp[..n * dim],
                &mut s.xsum,
            )?;
            add_in_place(&mut s.x[..n * dim], &s.tmp[..n * dim]);
        }

        // Final norm and head, only for rows that want logits.
        let mut k = 0;
        let mut r0 = 0;
        for b in batch {
            for j in b.logits_from..b.tokens.len() {
                let r = r0 + j;
                s.sel[k * dim..(k + 1) * dim].copy_from_slice(&s.x[r * dim..(r + 1) * dim]);
                k += 1;
            }
            r0 += b.tokens.len();
        }
        let sel = std::mem::take(&mut s.sel);
        rmsnorm_rows(
            &sel[..n_sel * dim],
            &m.norm,
            c.rms_eps,
            &mut s.xb[..n_sel * dim],
        );
        s.sel = sel;
        let vocab = c.vocab_size;
        matmul(
            pool,
            m.output(),
            &s.xb[..n_sel * dim],
            n_sel,
            &mut s.logits[..n_sel * vocab],
            &mut s.xsum,
        );
        Ok(&self.s.logits[..n_sel * vocab])
    }
}

/// One projection of layer `li`: through the pipeline's linear kernels when it has them
/// (the engine's workers rest meanwhile, leaving the cores to the kernels' threads), else the
/// engine's own product.
fn project(
    pool: &ThreadPool,
    linear: Option<&dyn LinearKernels>,
    li: usize,
    projection: u64,
    w: &Weight,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    xsum: &mut Vec<f32>,
) -> Result<()> {
    match linear {
        Some(k) => {
            pool.rest();
            k.linear(li, projection, x, n, out)
        }
        None => {
            matmul(pool, w, x, n, out, xsum);
            Ok(())
        }
    }
}

fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = quant::dot_f32(xr, xr) / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for i in 0..d {
            or[i] = xr[i] * inv * w[i];
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn rope(m: &Model, pos: usize, v: &mut [f32]) {
    let hd = m.cfg.head_dim;
    let half = hd / 2;
    let cos = &m.rope_cos[pos * half..(pos + 1) * half];
    let sin = &m.rope_sin[pos * half..(pos + 1) * half];
    for head in v.chunks_exact_mut(hd) {
        for i in 0..half {
            let (a, b) = match m.cfg.rope {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Half => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// Causal attention of every row's query heads over its sequence's cached K/V.
fn attention(pool: &ThreadPool, max_ctx: usize, hd: usize, nh: usize, nkv: usize, s: &mut Scratch) {
    let n = s.row_pos.len();
    let qd = nh * hd;
    let kvd = nkv * hd;
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let att = Ptr(s.att.as_mut_ptr());
    let scores = Ptr(s.scores.as_mut_ptr());
    let (q, row_pos, row_item, kv_ptrs) = (&s.q, &s.row_pos, &s.row_item, &s.kv_ptrs);
    let total = n * nh;
    pool.run(&|ti, nt| {
        let per = total.div_ceil(nt);
        let (start, end) = ((ti * per).min(total), ((ti + 1) * per).min(total));
        // SAFETY: each thread owns its scores row and writes disjoint (row, head) outputs.
        let sc = unsafe { std::slice::from_raw_parts_mut(scores.at(ti * max_ctx), max_ctx) };
        for w in start..end {
            let (r, h) = (w / nh, w % nh);
            let len = row_pos[r] + 1;
            let (kp, vp) = kv_ptrs[row_item[r]];
            let kvh = h / group;
            let qh = &q[r * qd + h * hd..r * qd + (h + 1) * hd];
            let mut mx = f32::NEG_INFINITY;
            for t in 0..len {
                // SAFETY: positions 0..len were written to this slot's cache.
                let kt = unsafe {
                    std::slice::from_raw_parts((kp as *const f32).add(t * kvd + kvh * hd), hd)
                };
                let v = quant::dot_f32(qh, kt) * scale;
                sc[t] = v;
                mx = mx.max(v);
            }
            let mut sum = 0f32;
            for v in &mut sc[..len] {
                *v = (*v - mx).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            let out = unsafe { std::slice::from_raw_parts_mut(att.at(r * qd + h * hd), hd) };
            out.fill(0.0);
            for t in 0..len {
                let vt = unsafe {
                    std::slice::from_raw_parts((vp as *const f32).add(t * kvd + kvh * hd), hd)
                };
                quant::axpy(sc[t] * inv, vt, out);
            }
        }
    });
}

const ROW_TILE: usize = 8;
/// Up to this many inputs, matrix products run on the quantized rows directly.
const FUSED_MAX_INPUTS: usize = 4;

/// Rows per work item handed out to pool threads (dynamic scheduling balances the threads).
const CHUNK_ROWS: usize = 64;

thread_local! {
    static DEQ: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// out (n, w.rows) = x (n, w.cols) · wᵀ
pub fn matmul(
    pool: &ThreadPool,
    w: &Weight,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    xsum: &mut Vec<f32>,
) {
    matmul_multi(pool, &mut [(w, out)], x, n, xsum);
}

/// Several products of the same input in one dispatch to the pool (q/k/v, gate/up):
/// out_i (n, w_i.rows) = x (n, cols) · w_iᵀ.
pub fn matmul_multi(
    pool: &ThreadPool,
    jobs: &mut [(&Weight, &mut [f32])],
    x: &[f32],
    n: usize,
    xsum: &mut Vec<f32>,
) {
    let cols = jobs[0].0.cols;
    debug_assert_eq!(x.len(), n * cols);
    // Few rows of input (decode steps): dot products straight on the quantized rows.
    // Many (prefill): dequantize tiles of rows once and reuse them for every input.
    let fused = n <= FUSED_MAX_INPUTS && jobs.iter().all(|(w, _)| quant::has_fused_dot(w.ty));
    xsum.clear();
    if fused
        && jobs
            .iter()
            .any(|(w, _)| matches!(w.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_1S))
    {
        for t in 0..n {
            quant::block_sums(&x[t * cols..(t + 1) * cols], xsum);
        }
    }
    let nb = cols / 32;
    // (weight, output, first global chunk index)
    let mut table: [(Option<&Weight>, Ptr, usize); 4] = [(None, Ptr(std::ptr::null_mut()), 0); 4];
    assert!(jobs.len() <= table.len());
    let mut total_chunks = 0;
    for (i, (w, o)) in jobs.iter_mut().enumerate() {
        debug_assert_eq!(w.cols, cols);
        debug_assert_eq!(o.len(), n * w.rows);
        table[i] = (Some(*w), Ptr(o.as_mut_ptr()), total_chunks);
        total_chunks += w.rows.div_ceil(CHUNK_ROWS);
    }
    let n_jobs = jobs.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let xs = &xsum[..];
    let work = |chunk: usize| {
        let j = (0..n_jobs).rev().find(|&j| table[j].2 <= chunk).unwrap();
        let (w, o, first) = (table[j].0.unwrap(), table[j].1, table[j].2);
        let r0 = (chunk - first) * CHUNK_ROWS;
        let r1 = (r0 + CHUNK_ROWS).min(w.rows);
        if fused && n == 1 {
            for r in r0..r1 {
                let v = quant::dot_row(w.ty, w.row(r), x, xs);
                // SAFETY: each row index is written by exactly one thread.
                unsafe { *o.at(r) = v };
            }
        } else if fused {
            let xrow = |t: usize| &x[t.min(n - 1) * cols..(t.min(n - 1) + 1) * cols];
            let srow = |t: usize| {
                if xs.is_empty() {
                    xs
                } else {
                    &xs[t.min(n - 1) * nb..(t.min(n - 1) + 1) * nb]
                }
            };
            for r in r0..r1 {
                let row = w.row(r);
                for t0 in (0..n).step_by(4) {
                    let k = (n - t0).min(4);
                    let v = quant::dot_row_multi(
                        w.ty,
                        row,
                        [xrow(t0), xrow(t0 + 1), xrow(t0 + 2), xrow(t0 + 3)],
                        [srow(t0), srow(t0 + 1), srow(t0 + 2), srow(t0 + 3)],
                        k,
                    );
                    for i in 0..k {
                        // SAFETY: each (input, row) element is written by exactly one thread.
                        unsafe { *o.at((t0 + i) * w.rows + r) = v[i] };
                    }
                }
            }
        } else {
            rows_tiled(w, r0..r1, x, n, o);
        }
    };
    if pool.n_threads() == 1 || total_chunks == 1 {
        (0..total_chunks).for_each(work);
        return;
    }
    pool.run(&|_, _| loop {
        let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if c >= total_chunks {
            break;
        }
        work(c);
    });
}

/// Rows `range` of w against all n inputs: dequantize a tile of rows to f32 once, then
/// reuse it for every input (4 rows × 4 inputs per micro-kernel call).
fn rows_tiled(w: &Weight, range: std::ops::Range<usize>, x: &[f32], n: usize, o: Ptr) {
    let (rows, cols) = (w.rows, w.cols);
    DEQ.with(|d| {
        let mut d = d.borrow_mut();
        if d.len() < ROW_TILE * cols {
            d.resize(ROW_TILE * cols, 0.0);
        }
        let mut r0 = range.start;
        while r0 < range.end {
            let r1 = (r0 + ROW_TILE).min(range.end);
            for r in r0..r1 {
                w.dequantize_row(r, &mut d[(r - r0) * cols..(r - r0 + 1) * cols]);
            }
            let drow = |r: usize| &d[(r - r0) * cols..(r - r0 + 1) * cols];
            let mut t = 0;
            while t + 4 <= n {
                let xs = [
                    &x[t * cols..(t + 1) * cols],
                    &x[(t + 1) * cols..(t + 2) * cols],
                    &x[(t + 2) * cols..(t + 3) * cols],
                    &x[(t + 3) * cols..(t + 4) * cols],
                ];
                let mut r = r0;
                while r + 4 <= r1 {
                    let v =
                        quant::dot_f32_4x4([drow(r), drow(r + 1), drow(r + 2), drow(r + 3)], xs);
                    for (j, vr) in v.iter().enumerate() {
                        for k in 0..4 {
                            // SAFETY: disjoint (token, row) elements per thread.
                            unsafe { *o.at((t + k) * rows + r + j) = vr[k] };
                        }
                    }
                    r += 4;
                }
                while r + 2 <= r1 {
                    let v = quant::dot_f32_2x4(drow(r), drow(r + 1), xs);
                    for k in 0..4 {
                        // SAFETY: disjoint (token, row) elements per thread.
                        unsafe {
                            *o.at((t + k) * rows + r) = v[0][k];
                            *o.at((t + k) * rows + r + 1) = v[1][k];
                        }
                    }
                    r += 2;
                }
                if r < r1 {
                    let v = quant::dot_f32_x4(drow(r), xs);
                    for k in 0..4 {
                        unsafe { *o.at((t + k) * rows + r) = v[k] };
                    }
                }
                t += 4;
            }
            while t < n {
                for r in r0..r1 {
                    let v = quant::dot_f32(drow(r), &x[t * cols..(t + 1) * cols]);
                    unsafe { *o.at(t * rows + r) = v };
                }
                t += 1;
            }
            r0 = r1;
        }
    });
}
