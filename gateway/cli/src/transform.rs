//! `switchyard transform …` (offline model transforms through model-transform plugins) and
//! `switchyard gstack plan` (Gstack's growth-timing formula).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use switchyard_engine::tensors::Dtype;
use switchyard_plugin_host::transform::{run_transform, TransformOptions, TransformSummary};
use switchyard_plugin_host::PluginHost;

#[derive(Subcommand)]
pub enum TransformCmd {
    /// Gstack depthwise growth: repeat the whole layer stack G times (the gstack plugin).
    Gstack(GstackArgs),
    /// AdaptiVocab: the model for a tokenizer patch (new embedding and LM-head rows for its
    /// n-gram ids; the adaptivocab-transform plugin). The patch is copied into the output as
    /// adaptivocab-patch.json.
    Adaptivocab(AdaptivocabArgs),
    /// Run any model-transform plugin.
    Run(RunArgs),
}

#[derive(Args)]
pub struct AdaptivocabArgs {
    #[command(flatten)]
    common: Common,
    /// The AdaptiVocab patch file (from `switchyard vocab build`).
    #[arg(long)]
    patch: PathBuf,
    /// The adaptivocab-transform plugin: its manifest (.toml) or library (.so). Default: the
    /// adaptivocab-transform.toml in a --plugin-dir, else the library built beside this binary.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// A directory to look for adaptivocab-transform.toml in (repeatable).
    #[arg(long)]
    plugin_dir: Vec<PathBuf>,
}

#[derive(Args)]
pub struct Common {
    /// The input model: a .gguf file or a Hugging Face directory.
    #[arg(long)]
    model: PathBuf,
    /// The output Hugging Face directory (must not exist unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output directory (only once the new one is complete).
    #[arg(long)]
    force: bool,
    /// Output tensor type: f32, f16 or bf16 (default: each tensor's own type; f32 for
    /// quantized GGUF tensors, which are written dequantized).
    #[arg(long)]
    dtype: Option<String>,
    /// Start a new safetensors shard past this many MiB.
    #[arg(long, default_value_t = 4096)]
    shard_mib: usize,
    /// Skip loading the output in the engine afterwards.
    #[arg(long)]
    no_verify: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GstackArgs {
    #[command(flatten)]
    common: Common,
    /// Growth factor g ≥ 1 (default 4).
    #[arg(long, allow_negative_numbers = true, conflicts_with = "layers")]
    factor: Option<i64>,
    /// A target layer count instead of a factor: full copies, then the last layers once more.
    #[arg(long, allow_negative_numbers = true)]
    layers: Option<i64>,
    /// The gstack plugin: its manifest (.toml) or library (.so). Default: the gstack.toml in
    /// a --plugin-dir, else the library built beside this binary.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// A directory to look for gstack.toml in (repeatable).
    #[arg(long)]
    plugin_dir: Vec<PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// The plugin's manifest (.toml; its directory is the plugin directory) or library (.so).
    #[arg(long)]
    plugin: PathBuf,
    /// The plugin's configuration text.
    #[arg(long, default_value = "")]
    config: String,
}

#[derive(Subcommand)]
pub enum GstackCmd {
    /// When to grow: tokens d to train the small model, for a target of N parameters trained
    /// on D tokens (log10 d = 0.88·log10 N + 163.27/log10 C − 5.74, C = 6·N·D).
    Plan(PlanArgs),
}

#[derive(Args)]
pub struct PlanArgs {
    /// Target model parameters N (e.g. 7e9, 7B, 410M).
    #[arg(long)]
    params: String,
    /// Training tokens D of the target (e.g. 2e12, 2T).
    #[arg(long)]
    tokens: String,
    /// Growth factor (the small model has 1/g of the target's layers).
    #[arg(long, default_value_t = 4)]
    factor: usize,
    #[arg(long)]
    json: bool,
}

pub fn transform(cmd: TransformCmd) -> Result<()> {
    match cmd {
        TransformCmd::Gstack(a) => {
            let config = match (a.factor, a.layers) {
                (_, Some(t)) => format!("layers = {t}"),
                (Some(g), None) => format!("factor = {g}"),
                (None, None) => "factor = 4".to_string(),
            };
            let manifest = find_plugin(a.plugin.as_deref(), &a.plugin_dir, "gstack")?;
            run(&manifest, &config, &config, &a.common)
        }
        TransformCmd::Adaptivocab(a) => {
            let (patch, bytes) = crate::vocab::read_patch(&a.patch)?;
            let text = String::from_utf8(bytes)
                .with_context(|| format!("{}: not UTF-8", a.patch.display()))?;
            let tok = crate::vocab::load_tokenizer(&a.common.model)?;
            if tok.vocab_size() != patch.base_vocab_size() as usize {
                bail!(
                    "{} was built for a vocabulary of {} ids; {} has {}",
                    a.patch.display(),
                    patch.base_vocab_size(),
                    a.common.model.display(),
                    tok.vocab_size()
                );
            }
            let manifest =
                find_plugin(a.plugin.as_deref(), &a.plugin_dir, "adaptivocab-transform")?;
            let what = format!(
                "patch {} ({} n-grams)",
                a.patch.display(),
                patch.file.added.len()
            );
            run(&manifest, &text, &what, &a.common)?;
            let dst = a.common.out.join(switchyard_server::pipeline::PATCH_FILE);
            std::fs::write(&dst, text.as_bytes())
                .with_context(|| format!("writing {}", dst.display()))?;
            Ok(())
        }
        TransformCmd::Run(a) => {
            let manifest = find_plugin(Some(&a.plugin), &[], "")?;
            run(&manifest, &a.config, &a.config, &a.common)
        }
    }
}

/// The manifest of the plugin to run: given (a manifest, or a library packed beside this
/// binary first), or `<name>.toml` in a plugin directory, or the library built beside this
/// binary.
pub(crate) fn find_plugin(given: Option<&Path>, dirs: &[PathBuf], name: &str) -> Result<PathBuf> {
    let packed_dir = || -> Result<PathBuf> {
        let exe = std::env::current_exe().context("locating this binary")?;
        Ok(exe
            .parent()
            .unwrap_or(Path::new("."))
            .join("transform-plugins"))
    };
    if let Some(p) = given {
        if p.extension().is_some_and(|e| e == "toml") {
            return Ok(p.to_path_buf());
        }
        let packed = switchyard_plugin_host::pack(p, &packed_dir()?)
            .with_context(|| format!("cannot use plugin {}", p.display()))?;
        return Ok(packed.manifest_path);
    }
    for d in dirs {
        let m = d.join(format!("{name}.toml"));
        if m.exists() {
            return Ok(m);
        }
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let lib = exe.parent().unwrap_or(Path::new(".")).join(format!(
        "{}switchyard_{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ));
    if !lib.exists() {
        bail!(
            "the {name} plugin was not found: no {name}.toml in the plugin directories and no {} \
             (build it with `cargo build --release -p switchyard-{name}`, or pass --plugin)",
            lib.display()
        );
    }
    let packed = switchyard_plugin_host::pack(&lib, &packed_dir()?)
        .with_context(|| format!("cannot use plugin {}", lib.display()))?;
    Ok(packed.manifest_path)
}

/// Run the transform plugin of `manifest` with `config`; `recorded` is what the output's
/// switchyard-transform.json says the configuration was.
fn run(manifest: &Path, config: &str, recorded: &str, c: &Common) -> Result<()> {
    let dir = manifest.parent().unwrap_or(Path::new(".")).to_path_buf();
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let plugin = host
        .load_native(manifest)
        .with_context(|| format!("loading plugin {}", manifest.display()))?;
    let mut t = plugin
        .model_transform(config)
        .with_context(|| format!("plugin {}", plugin.name))?;
    let dtype = match &c.dtype {
        None => None,
        Some(s) => Some(
            Dtype::parse(s).with_context(|| format!("--dtype {s}: expected f32, f16 or bf16"))?,
        ),
    };
    if c.shard_mib == 0 {
        bail!("--shard-mib must be at least 1");
    }
    let opts = TransformOptions {
        dtype,
        force: c.force,
        shard_bytes: c.shard_mib << 20,
        provenance: json!({"name": plugin.name, "version": plugin.version, "config": recorded}),
    };
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message("writing");
    let s = run_transform(&mut t, &c.model, &c.out, &opts, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .map_err(anyhow::Error::msg)
    .with_context(|| {
        format!(
            "transform {} -> {} failed (nothing written at the output)",
            c.model.display(),
            c.out.display()
        )
    })?;
    pb.finish_and_clear();
    let verified = if c.no_verify { None } else { Some(verify(&s)?) };
    report(&s, verified, c.json);
    Ok(())
}

/// Load the written model in the engine (weights and tokenizer); (layers, params).
fn verify(s: &TransformSummary) -> Result<(usize, usize)> {
    let (m, _) = switchyard_engine::model::Model::load(&s.out, &mut |_, _| {})
        .with_context(|| format!("the written model {} does not load", s.out.display()))?;
    switchyard_engine::tokenizer::Tokenizer::from_hf_dir(&s.out)
        .with_context(|| format!("the written tokenizer in {} does not load", s.out.display()))?;
    Ok((m.cfg.n_layers, m.n_params()))
}

fn report(s: &TransformSummary, verified: Option<(usize, usize)>, as_json: bool) {
    let secs = s.elapsed.as_secs_f64();
    let mbps = s.bytes_written as f64 / 1e6 / secs.max(1e-9);
    if as_json {
        let v = json!({
            "out": s.out.display().to_string(),
            "summary": s.summary,
            "tensors": s.tensors,
            "params": s.params,
            "layers": s.config["num_hidden_layers"],
            "bytes_written": s.bytes_written,
            "bytes_read": s.bytes_read,
            "seconds": secs,
            "write_mb_per_s": mbps,
            "shards": s.shards,
            "verified": verified.map(|(l, p)| json!({"layers": l, "params": p})),
        });
        println!("{v}");
        return;
    }
    if let Some(sum) = &s.summary {
        println!("{sum}");
    }
    println!(
        "wrote {} ({} tensors, {:.2} M params, {:.1} MB in {} file(s)) in {:.2} s ({:.0} MB/s)",
        s.out.display(),
        s.tensors,
        s.params as f64 / 1e6,
        s.bytes_written as f64 / 1e6,
        s.shards.len(),
        secs,
        mbps
    );
    if let Some((l, p)) = verified {
        println!(
            "verified: loads in the engine ({l} layers, {:.2} M params) with its tokenizer",
            p as f64 / 1e6
        );
    }
}

/// A count with an optional K/M/B/T suffix or in exponent form.
pub fn parse_count(s: &str) -> Result<f64> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') | Some('G') => (&t[..t.len() - 1], 1e9),
        Some('T') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("{s:?} is not a number (e.g. 7e9, 7B, 2T)"))?;
    let v = v * mul;
    if !v.is_finite() || v <= 1.0 {
        bail!("{s:?}: must be a number greater than 1");
    }
    Ok(v)
}

/// Gstack's growth timing: tokens to train the small model before growing.
pub fn growth_tokens(n: f64, d: f64) -> f64 {
    let c = 6.0 * n * d;
    10f64.powf(0.88 * n.log10() + 163.27 / c.log10() - 5.74)
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let n = parse_count(&a.params).context("--params")?;
    let d = parse_count(&a.tokens).context("--tokens")?;
    if a.factor == 0 {
        bail!("--factor must be at least 1");
    }
    let c = 6.0 * n * d;
    let g = growth_tokens(n, d);
    let small = n / a.factor as f64;
    if a.json {
        println!(
            "{}",
            json!({
                "params": n,
                "tokens": d,
                "compute_flops": c,
                "growth_tokens": g,
                "growth_share": g / d,
                "factor": a.factor,
                "small_params": small,
                "small_params_note": "layers scale by 1/g; embeddings and head do not shrink",
            })
        );
    } else {
        println!(
            "target: {:.3e} params on {:.3e} tokens (C = 6·N·D = {:.3e} FLOPs)",
            n, d, c
        );
        println!(
            "grow after d = {:.3e} tokens ({:.1} B, {:.2}% of D)",
            g,
            g / 1e9,
            100.0 * g / d
        );
        println!(
            "small model for g = {}: 1/{} of the target's layers, ≈ {:.3e} params (layers only; \
             embeddings and head stay full size)",
            a.factor, a.factor, small
        );
    }
    Ok(())
}
