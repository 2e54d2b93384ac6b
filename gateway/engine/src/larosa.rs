//! LaRoSA (layerwise rotated sparse activation): calibration of one orthogonal rotation per
//! layer, and the rotated model built from the base weights and those rotations.
//!
//! Calibration runs the dense model over text and accumulates, per layer ℓ and in f64,
//! `H_ℓ = Σ xᵀx` over the layer's normalized attention input `x = h / rms(h)` (before the
//! norm's scale, which the rotated model folds into the next weights). `H + 0.01·mean(diag H)·I`
//! is eigendecomposed (nalgebra); `Q_ℓ` holds the eigenvectors as columns, largest eigenvalue
//! first, so that activations in the rotated basis concentrate their energy in few channels.
//!
//! The rotated model carries its residual stream as `h·Q_ℓ` inside layer ℓ:
//! - the embedding rows become `e·Q₀`;
//! - q/k/v (and gate/up) become `W·diag(γ)·Q_ℓ` (input side; γ is the attention (MLP) norm's
//!   scale, whose place is taken by ones);
//! - o_proj and down_proj become `Q_ℓᵀ·W` (output side);
//! - before layer ℓ ≥ 1 the residual stream is carried into the new basis by the adapter
//!   `Q_{ℓ-1}ᵀ·Q_ℓ` (a dim × dim product, see [`crate::model::Layer::adapter`]);
//! - the head becomes `W_head·diag(γ_final)·Q_{L-1}`.
//!
//! RMSNorm commutes with an orthogonal Q, so with no sparsity the rotated model computes the
//! same function as the base model up to float rounding.

use std::path::Path;
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::forward::matmul;
use crate::model::{Layer, Model, Weight};
use crate::pool::ThreadPool;

/// The file format's name, stored in the safetensors metadata.
pub const FORMAT: &str = "switchyard-larosa-rotation";

/// One orthogonal `dim × dim` matrix per layer.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub dim: usize,
    /// Per layer, `Q` row-major: `q[i * dim + j]` = component i of eigenvector j.
    pub q: Vec<Vec<f32>>,
    /// Per layer, the eigenvalues of the regularized `H`, largest first.
    pub eigenvalues: Vec<Vec<f64>>,
    /// Free-form provenance (model, tokens, text) kept in the file's metadata.
    pub meta: std::collections::BTreeMap<String, String>,
}

impl Rotation {
    pub fn n_layers(&self) -> usize {
        self.q.len()
    }

    /// Write as safetensors: `layers.{l}.q` (f32 `[dim, dim]`), `layers.{l}.eigenvalues`
    /// (f64 `[dim]`), metadata `format` = [`FORMAT`] plus `meta`.
    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let d = self.dim;
        let bytes: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = self
            .q
            .iter()
            .enumerate()
            .flat_map(|(l, q)| {
                [
                    (
                        format!("layers.{l}.q"),
                        q.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        Dtype::F32,
                        vec![d, d],
                    ),
                    (
                        format!("layers.{l}.eigenvalues"),
                        self.eigenvalues[l]
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                        Dtype::F64,
                        vec![d],
                    ),
                ]
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, b, t, s)| (n.clone(), TensorView::new(*t, s.clone(), b).unwrap()))
            .collect();
        let mut meta: std::collections::HashMap<String, String> = self
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("layers".into(), self.q.len().to_string());
        meta.insert("dim".into(), d.to_string());
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", path.display())))?;
        std::fs::rename(&tmp, path).map_err(|e| EngineError::io(path, e))
    }

    /// Read a file written by [`Rotation::save`], checking that every matrix is orthogonal.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| EngineError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let data = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta: std::collections::BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "not a LaRoSA rotation (metadata format is not {FORMAT:?}; make one with \
                 `switchyard calibrate larosa`)"
            )));
        }
        let get = |k: &str| -> Result<usize> {
            meta.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata {k:?} missing or not a number")))
        };
        let (n_layers, d) = (get("layers")?, get("dim")?);
        let mut q = Vec::with_capacity(n_layers);
        let mut eigenvalues = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let t = st
                .tensor(&format!("layers.{l}.q"))
                .map_err(|_| bad(format!("tensor layers.{l}.q missing")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != [d, d] {
                return Err(bad(format!(
                    "layers.{l}.q is {:?} {:?}, expected F32 [{d}, {d}]",
                    t.dtype(),
                    t.shape()
                )));
            }
            let m: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let err = orthogonality_error(&m, d);
            if err.is_nan() || err >= 1e-3 {
                return Err(bad(format!(
                    "layers.{l}.q is not orthogonal (max |QᵀQ - I| = {err:.2e})"
                )));
            }
            q.push(m);
            let ev = match st.tensor(&format!("layers.{l}.eigenvalues")) {
                Ok(t) if t.dtype() == safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                _ => Vec::new(),
            };
            eigenvalues.push(ev);
        }
        Ok(Self {
            dim: d,
            q,
            eigenvalues,
            meta,
        })
    }
}

/// max |QᵀQ − I| over all entries.
pub fn orthogonality_error(q: &[f32], d: usize) -> f64 {
    let mut worst = 0f64;
    for i in 0..d {
        for j in i..d {
            let dot: f64 = (0..d)
                .map(|k| q[k * d + i] as f64 * q[k * d + j] as f64)
                .sum();
            let want = if i == j { 1.0 } else { 0.0 };
            worst = worst.max((dot - want).abs());
        }
    }
    worst
}

/// Accumulates `H_ℓ = Σ xᵀx` per layer in f64 (upper triangle; mirrored at the end).
pub struct Calibrator {
    dim: usize,
    h: Vec<Vec<f64>>,
    pub tokens: usize,
}

impl Calibrator {
    pub fn new(n_layers: usize, dim: usize) -> Self {
        Self {
            dim,
            h: vec![vec![0f64; dim * dim]; n_layers],
            tokens: 0,
        }
    }

    /// Add the rows captured by one forward pass (`rows[l]` is `(n, dim)` for layer l).
    pub fn add(&mut self, rows: &[Vec<f32>]) {
        let d = self.dim;
        let n = rows.first().map_or(0, |r| r.len() / d);
        self.tokens += n;
        let work = |h: &mut Vec<f64>, x: &Vec<f32>| {
            let mut xr = vec![0f64; d];
            for row in x.chunks_exact(d) {
                for (a, b) in xr.iter_mut().zip(row) {
                    *a = *b as f64;
                }
                for i in 0..d {
                    let xi = xr[i];
                    for (hv, xj) in h[i * d + i..(i + 1) * d].iter_mut().zip(&xr[i..]) {
                        *hv += xi * xj;
                    }
                }
            }
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = self.h.len().div_ceil(threads).max(1);
        std::thread::scope(|sc| {
            for (hs, xs) in self.h.chunks_mut(per).zip(rows.chunks(per)) {
                sc.spawn(move || {
                    for (h, x) in hs.iter_mut().zip(xs) {
                        work(h, x);
                    }
                });
            }
        });
    }

    /// Regularize (`+ reg · mean(diag H)` on the diagonal) and eigendecompose every layer.
    pub fn finish(self, reg: f64, progress: &mut dyn FnMut(usize, usize)) -> Result<Rotation> {
        let d = self.dim;
        if self.tokens == 0 {
            return Err(EngineError::Invalid("no calibration tokens".into()));
        }
        let n = self.h.len();
        let mut q = Vec::with_capacity(n);
        let mut eigenvalues = Vec::with_capacity(n);
        for (l, h) in self.h.into_iter().enumerate() {
            let mean_diag = (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64;
            let m = nalgebra::DMatrix::<f64>::from_fn(d, d, |i, j| {
                let v = if i <= j { h[i * d + j] } else { h[j * d + i] };
                if i == j {
                    v + reg * mean_diag
                } else {
                    v
                }
            });
            let eig = nalgebra::SymmetricEigen::try_new(m, 1e-12, 10_000).ok_or_else(|| {
                EngineError::Invalid(format!(
                    "layer {l}: the eigendecomposition did not converge"
                ))
            })?;
            let mut order: Vec<usize> = (0..d).collect();
            order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
            let mut ql = vec![0f32; d * d];
            for (col, &src) in order.iter().enumerate() {
                for i in 0..d {
                    ql[i * d + col] = eig.eigenvectors[(i, src)] as f32;
                }
            }
            q.push(ql);
            eigenvalues.push(order.iter().map(|&i| eig.eigenvalues[i]).collect());
            progress(l + 1, n);
        }
        Ok(Rotation {
            dim: d,
            q,
            eigenvalues,
            meta: Default::default(),
        })
    }
}

/// `Qᵀ` as a weight, so that the engine's product `x·Wᵀ` computes `x·Q`.
fn qt_weight(q: &[f32], d: usize) -> Weight {
    Weight::from_f32(d, d, transpose(q, d, d))
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// `W·diag(scale)·Q` for `W` `[rows, d]`: every row (times `scale`) carried into the basis Q.
fn rows_into(pool: &ThreadPool, w: &Weight, scale: Option<&[f32]>, qt: &Weight) -> Weight {
    let mut x = w.to_f32();
    if let Some(s) = scale {
        for row in x.chunks_exact_mut(w.cols) {
            for (v, g) in row.iter_mut().zip(s) {
                *v *= g;
            }
        }
    }
    let mut out = vec![0f32; w.rows * qt.rows];
    let mut xsum = Vec::new();
    matmul(pool, qt, &x, w.rows, &mut out, &mut xsum);
    Weight::from_f32(w.rows, qt.rows, out)
}

/// `Qᵀ·W` for `W` `[d, cols]`: the outputs carried into the basis Q.
fn outputs_into(pool: &ThreadPool, w: &Weight, qt: &Weight) -> Weight {
    // (Qᵀ W)ᵀ = Wᵀ Q: rotate the rows of Wᵀ, then transpose back.
    let wt = Weight::from_f32(w.cols, w.rows, transpose(&w.to_f32(), w.rows, w.cols));
    let r = rows_into(pool, &wt, None, qt);
    Weight::from_f32(w.rows, w.cols, transpose(&r.to_f32(), r.rows, r.cols))
}

/// The rotated model (f32 weights) of `base` under `rot`; `progress(layers done, total)`.
pub fn rotate_model(
    base: &Model,
    rot: &Rotation,
    pool: &ThreadPool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Model> {
    let c = &base.cfg;
    if rot.dim != c.dim || rot.n_layers() != c.n_layers {
        return Err(EngineError::Invalid(format!(
            "the rotation is for {} layers of width {}; the model has {} layers of width {}",
            rot.n_layers(),
            rot.dim,
            c.n_layers,
            c.dim
        )));
    }
    if base.layers.iter().any(|l| l.adapter.is_some()) {
        return Err(EngineError::Invalid("the model is already rotated".into()));
    }
    let d = c.dim;
    let qts: Vec<Weight> = rot.q.iter().map(|q| qt_weight(q, d)).collect();
    let ones = vec![1f32; d];
    let tok_embd = rows_into(pool, &base.tok_embd, None, &qts[0]);
    let mut layers = Vec::with_capacity(c.n_layers);
    for (l, bl) in base.layers.iter().enumerate() {
        let qt = &qts[l];
        let adapter = (l > 0).then(|| {
            // Q_{l-1}ᵀ Q_l as the weight (Q_lᵀ Q_{l-1}): rows of Q_{l-1}ᵀ carried into Q_l.
            let prev_t = Weight::from_f32(d, d, transpose(&rot.q[l - 1], d, d));
            let m = rows_into(pool, &prev_t, None, qt); // Q_{l-1}ᵀ·Q_l
            Weight::from_f32(d, d, transpose(&m.to_f32(), d, d))
        });
        layers.push(Layer {
            attn_norm: ones.clone(),
            wq: rows_into(pool, &bl.wq, Some(&bl.attn_norm), qt),
            wk: rows_into(pool, &bl.wk, Some(&bl.attn_norm), qt),
            wv: rows_into(pool, &bl.wv, Some(&bl.attn_norm), qt),
            wo: outputs_into(pool, &bl.wo, qt),
            ffn_norm: ones.clone(),
            w_gate: rows_into(pool, &bl.w_gate, Some(&bl.ffn_norm), qt),
            w_up: rows_into(pool, &bl.w_up, Some(&bl.ffn_norm), qt),
            w_down: outputs_into(pool, &bl.w_down, qt),
            adapter,
        });
        progress(l + 1, c.n_layers);
    }
    let output = rows_into(pool, base.output(), Some(&base.norm), &qts[c.n_layers - 1]);
    Ok(Model {
        path: base.path.clone(),
        cfg: c.clone(),
        tok_embd,
        layers,
        norm: ones,
        output: Some(output),
        rope_cos: base.rope_cos.clone(),
        rope_sin: base.rope_sin.clone(),
    })
}

/// Calibrate on `tokens` (already encoded), in windows of `window` tokens, with the engine's
/// dense model. `progress(tokens done, total)`.
pub fn calibrate(
    engine: &mut crate::Engine,
    tokens: &[u32],
    window: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibrator> {
    let m: Arc<Model> = engine.model.clone();
    let window = window.clamp(1, m.cfg.max_context);
    let mut cal = Calibrator::new(m.cfg.n_layers, m.cfg.dim);
    let slot = engine.kv.acquire()?;
    engine.fwd.capture = Some(Vec::new());
    let mut run = || -> Result<()> {
        for (i, chunk) in tokens.chunks(window).enumerate() {
            let sc = crate::forward::SeqChunk {
                slot,
                pos: 0,
                tokens: chunk,
                logits_from: chunk.len(),
            };
            engine.fwd.forward(&m, engine.kv.as_mut(), &[sc])?;
            cal.add(engine.fwd.capture.as_ref().unwrap());
            progress((i * window + chunk.len()).min(tokens.len()), tokens.len());
        }
        Ok(())
    };
    let r = run();
    engine.fwd.capture = None;
    engine.kv.release(slot);
    r.map(|_| cal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigenvectors_are_orthogonal_and_sorted() {
        let d = 16;
        let mut cal = Calibrator::new(2, d);
        let mut s = 1u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let rows: Vec<Vec<f32>> = (0..2)
            .map(|_| (0..64 * d).map(|i| rnd() * (1 + i % d) as f32).collect())
            .collect();
        cal.add(&rows);
        let rot = cal.finish(0.01, &mut |_, _| {}).unwrap();
        for l in 0..2 {
            assert!(orthogonality_error(&rot.q[l], d) < 1e-5);
            assert!(rot.eigenvalues[l].windows(2).all(|w| w[0] >= w[1]));
        }
        let dir = std::env::temp_dir().join(format!("larosa-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("rot.safetensors");
        rot.save(&p).unwrap();
        let back = Rotation::load(&p).unwrap();
        assert_eq!(back.q, rot.q);
        assert_eq!(back.eigenvalues, rot.eigenvalues);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
