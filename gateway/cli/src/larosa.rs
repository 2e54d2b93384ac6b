//! LaRoSA from the command line: `calibrate larosa` (rotations from calibration text), the
//! rotated/sparse model for `eval perplexity`, and `bench larosa` (batch-1 decode, dense vs
//! sparse, side by side).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use switchyard_engine::backend::ActivationSparsity;
use switchyard_engine::larosa::{self, Rotation};
use switchyard_engine::Engine;
use switchyard_plugin_host::{ModelLinear, PluginHost};

use crate::{bar, load, ModelArgs};

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Calibration text: files or directories (read recursively, sorted).
    #[arg(long, required = true, num_args = 1..)]
    text: Vec<PathBuf>,
    /// Calibration tokens (the reference uses 10 × 2048).
    #[arg(long, default_value_t = 20480)]
    tokens: usize,
    /// Tokens per forward window.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Added to H's diagonal, as a fraction of mean(diag H).
    #[arg(long, default_value_t = 0.01)]
    reg: f64,
    /// The rotation file to write (safetensors).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

/// Text of files and directories (recursively, sorted; `.gz` decompressed), one document
/// after another, read until `enough` bytes.
fn read_texts(paths: &[PathBuf], enough: usize) -> Result<String> {
    let mut text = String::new();
    for f in crate::vocab::corpus_files(paths)? {
        text.push_str(&crate::vocab::read_text(&f)?);
        text.push('\n');
        if text.len() >= enough {
            break;
        }
    }
    Ok(text)
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    if a.tokens == 0 || a.window == 0 {
        bail!("--tokens and --window must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.reg) {
        bail!("--reg must be in [0, 1]");
    }
    // Generously more bytes than tokens (a few bytes per token), so that reading stops early.
    let text = read_texts(&a.text, a.tokens.saturating_mul(16))?;
    let mut e = load(&a.m, 1)?;
    let mut ids = e.tokenizer.encode(&text, false)?;
    if ids.len() < a.tokens {
        eprintln!(
            "note: the text has {} tokens, fewer than --tokens {}; using all of them",
            ids.len(),
            a.tokens
        );
    }
    ids.truncate(a.tokens);
    if ids.is_empty() {
        bail!("the calibration text is empty");
    }
    let t = Instant::now();
    let pb = bar(ids.len() as u64, "calibrating");
    let cal = larosa::calibrate(&mut e, &ids, a.window, &mut |i, _| {
        pb.set_position(i as u64)
    })?;
    pb.finish_and_clear();
    let fwd_secs = t.elapsed().as_secs_f64();
    let pb = bar(e.model.cfg.n_layers as u64, "eigen");
    let tokens = cal.tokens;
    let mut rot = cal.finish(a.reg, &mut |i, _| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    rot.meta
        .insert("model".into(), a.m.model.display().to_string());
    rot.meta.insert("tokens".into(), tokens.to_string());
    rot.meta.insert("window".into(), a.window.to_string());
    rot.meta.insert("reg".into(), a.reg.to_string());
    rot.save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let worst = rot
        .q
        .iter()
        .map(|q| larosa::orthogonality_error(q, rot.dim))
        .fold(0f64, f64::max);
    // Share of H's trace in the top 50% of eigen-directions (how concentrated the rotated
    // activations are), averaged over layers.
    let top_half: f64 = rot
        .eigenvalues
        .iter()
        .map(|ev| ev[..ev.len() / 2].iter().sum::<f64>() / ev.iter().sum::<f64>())
        .sum::<f64>()
        / rot.n_layers() as f64;
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            json!({"out": a.out.display().to_string(), "tokens": tokens, "layers": rot.n_layers(),
                   "dim": rot.dim, "max_orthogonality_error": worst,
                   "energy_in_top_half": top_half, "forward_seconds": fwd_secs, "seconds": secs})
        );
    } else {
        println!(
            "wrote {} ({} layers, dim {}) from {tokens} tokens in {secs:.1} s; max |QᵀQ−I| = {worst:.1e}; {:.1}% of the energy in the top half of the directions",
            a.out.display(),
            rot.n_layers(),
            rot.dim,
            100.0 * top_half
        );
    }
    Ok(())
}

/// Serve `e` as LaRoSA / top-k asks: the rotated model when `rotation` is given, and the
/// larosa plugin's kernels with configuration `linear` when given. On a GPU the engine's
/// CUDA kernels run the configuration's sparsity (the plugin still checks it).
pub fn apply(e: &mut Engine, rotation: Option<&Path>, linear: Option<&str>) -> Result<()> {
    if let Some(r) = rotation {
        let rot = Rotation::load(r).with_context(|| format!("rotation {}", r.display()))?;
        let pb = bar(e.model.cfg.n_layers as u64, "rotating");
        let t = Instant::now();
        let m = larosa::rotate_model(&e.model, &rot, e.fwd.pool(), &mut |i, _| {
            pb.set_position(i as u64)
        })
        .with_context(|| format!("rotation {}", r.display()))?;
        pb.finish_and_clear();
        eprintln!("rotated the model in {:.1} s", t.elapsed().as_secs_f64());
        e.model = Arc::new(m);
    }
    if e.device.is_some() {
        let s = match linear {
            Some(cfg) => {
                plugin()?
                    .linear_kernels(cfg)
                    .with_context(|| format!("larosa configuration {cfg:?}"))?;
                ActivationSparsity::from_config(cfg)
                    .map_err(|x| anyhow::anyhow!("larosa configuration {cfg:?}: {x}"))?
            }
            None => None,
        };
        if s.is_some() || rotation.is_some() {
            let pb = bar(e.model.cfg.n_layers as u64, "uploading");
            e.set_device_weights(e.model.clone(), s, &mut |i, _| pb.set_position(i as u64))?;
            pb.finish_and_clear();
            eprintln!(
                "{} serves the model{} at sparsity {}",
                e.backend_name(),
                if rotation.is_some() { " rotated" } else { "" },
                s.map_or(0.0, |s| s.sparsity)
            );
        }
        return Ok(());
    }
    if let Some(cfg) = linear {
        e.fwd.linear = Some(Arc::new(linear_kernels(e, cfg)?));
    }
    Ok(())
}

/// The larosa plugin built beside this binary.
fn plugin() -> Result<switchyard_plugin_host::NativePlugin> {
    let manifest = crate::transform::find_plugin(None, &[], "larosa")?;
    let dir = manifest.parent().unwrap().to_path_buf();
    Ok(PluginHost::new(&[dir]).load_native(&manifest)?)
}

/// The larosa plugin (built beside this binary) with `cfg`, holding `e`'s weights.
pub fn linear_kernels(e: &Engine, cfg: &str) -> Result<ModelLinear> {
    let k = plugin()?
        .linear_kernels(cfg)
        .with_context(|| format!("larosa configuration {cfg:?}"))?;
    let pb = bar(e.model.cfg.n_layers as u64, "preparing");
    let ml = ModelLinear::prepare(k, &e.model, &mut |i, _| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    Ok(ml)
}

#[derive(Args)]
pub struct LarosaBenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The rotation (`switchyard calibrate larosa`).
    #[arg(long)]
    rotation: PathBuf,
    /// Sparsity levels to compare with dense (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0.4,0.5")]
    sparsity: Vec<f64>,
    /// Weight storage of the sparse kernels (f32 or q8).
    #[arg(long, default_value = "f32")]
    storage: String,
    /// Tokens decoded per measurement (batch 1, from an empty context).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Rounds; each round measures every configuration once, in turn (mean reported, after
    /// a warm-up round).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

/// Bytes of weights a batch-1 decode step reads under `keep(projection, in)` inputs kept.
fn step_bytes(m: &switchyard_engine::model::Model, keep: &dyn Fn(u64, usize) -> usize) -> f64 {
    let mut b = 0f64;
    for l in &m.layers {
        let ws = [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down];
        for (p, w) in ws.iter().enumerate() {
            b += w.n_bytes() as f64 * keep(p as u64, w.cols) as f64 / w.cols as f64;
        }
        if let Some(a) = &l.adapter {
            b += a.n_bytes() as f64;
        }
    }
    b + m.output().n_bytes() as f64
}

pub fn bench(a: LarosaBenchArgs) -> Result<()> {
    if a.gen_tokens == 0 || a.reps == 0 {
        bail!("--gen-tokens and --reps must be at least 1");
    }
    if let Some(s) = a.sparsity.iter().find(|s| !(0.0..0.99).contains(*s)) {
        bail!("--sparsity {s} must be in [0, 0.99)");
    }
    if a.storage != "f32" && a.storage != "q8" {
        bail!("--storage must be f32 or q8");
    }
    // Dense: the base model through the engine's own products.
    let mut dense = load(&a.m, 1)?;
    let threads = dense.fwd.pool().n_threads();
    // Sparse: one engine per level, each over the same rotated weights.
    let mut rotated = dense.fork(threads, 1);
    apply(&mut rotated, Some(&a.rotation), None)?;
    let mut levels = vec![0.0];
    levels.extend(a.sparsity.iter().copied().filter(|&s| s > 0.0));
    let mut sparse = Vec::new();
    for &s in &levels {
        let mut e = rotated.fork(threads, 1);
        let cfg = format!(
            "sparsity = {s}\nstorage = {}\nthreads = {threads}",
            a.storage
        );
        e.fwd.linear = Some(Arc::new(linear_kernels(&e, &cfg)?));
        sparse.push((s, cfg, e));
    }
    let first = dense.tokenizer.bos.unwrap_or(1);
    let mut dense_runs = Vec::new();
    let mut sparse_runs = vec![Vec::new(); sparse.len()];
    let pb = bar((a.reps + 1) as u64, "rounds");
    for rep in 0..=a.reps {
        let tps =
            a.gen_tokens as f64 / crate::bench_kv::decode(&mut dense, 1, a.gen_tokens, first)?;
        if rep > 0 {
            dense_runs.push(tps);
        }
        for (i, (_, _, e)) in sparse.iter_mut().enumerate() {
            let tps = a.gen_tokens as f64 / crate::bench_kv::decode(e, 1, a.gen_tokens, first)?;
            if rep > 0 {
                sparse_runs[i].push(tps);
            }
        }
        pb.set_position(rep as u64 + 1);
    }
    pb.finish_and_clear();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let dense_tps = mean(&dense_runs);
    let dense_bytes = step_bytes(&dense.model, &|_, c| c);
    let mut rows = Vec::new();
    for ((s, cfg, e), runs) in sparse.iter().zip(&sparse_runs) {
        let settings = switchyard_larosa::Settings::parse(cfg).map_err(anyhow::Error::msg)?;
        // The kernels' bytes per f32 weight of the rotated model: 1, or for q8 columns
        // (blocks of 32 int8 and an f32 scale) 36/32 bytes of 4.
        let per_weight = if a.storage == "q8" {
            36.0 / 32.0 / 4.0
        } else {
            1.0
        };
        let other = step_bytes(&e.model, &|_, _| 0);
        let proj_bytes = step_bytes(&e.model, &|p, c| settings.keep(p, c)) - other;
        let bytes = proj_bytes * per_weight + other;
        let tps = mean(runs);
        // Per round (each round times every configuration back to back): robust to drift.
        let mut ratios: Vec<f64> = runs.iter().zip(&dense_runs).map(|(s, d)| s / d).collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        rows.push(json!({
            "speedup_per_round_sorted": ratios, "speedup_median_of_rounds": median,
            "sparsity": s, "decode_tok_s": tps, "decode_tok_s_runs": runs,
            "speedup_vs_dense": tps / dense_tps,
            "weight_bytes_per_token": bytes,
            "bytes_bound_speedup": dense_bytes / bytes,
        }));
    }
    let out = json!({
        "model": a.m.model.display().to_string(), "rotation": a.rotation.display().to_string(),
        "threads": threads, "gen_tokens": a.gen_tokens, "reps": a.reps, "storage": a.storage,
        "dense": {"decode_tok_s": dense_tps, "decode_tok_s_runs": dense_runs,
                  "weight_bytes_per_token": dense_bytes,
                  "weight_type": format!("{:?}", dense.model.layers[0].wq.ty)},
        "larosa": rows,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "dense ({:?} weights, engine products): {dense_tps:.2} tok/s",
            dense.model.layers[0].wq.ty
        );
        for r in out["larosa"].as_array().unwrap() {
            println!(
                "larosa s={:.2} ({} columns): {:.2} tok/s = {:.2}x dense (median of rounds {:.2}x; bytes bound {:.2}x)",
                r["sparsity"].as_f64().unwrap(),
                a.storage,
                r["decode_tok_s"].as_f64().unwrap(),
                r["speedup_vs_dense"].as_f64().unwrap(),
                r["speedup_median_of_rounds"].as_f64().unwrap(),
                r["bytes_bound_speedup"].as_f64().unwrap()
            );
        }
    }
    Ok(())
}
