//! The `switchyard` binary.

mod bench_gpu;
mod bench_kv;
mod bench_plugins;
mod bench_serve;
mod chat;
mod larosa;
mod transform;
mod vocab;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use switchyard_engine::chat::Message;
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::{Engine, EngineOptions, GenerateRequest};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Switchyard: a plugin-based LLM inference gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt or a chat message; the text alone goes to stdout.
    Generate(GenerateArgs),
    /// Model evaluation.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Serve models over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Chat in the terminal with a running gateway (--url) or with a model served
    /// in-process (--model PATH); answers stream as they are generated.
    Chat(chat::ChatArgs),
    /// Plugin authoring tools.
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Offline model transforms through model-transform plugins (written as a Hugging Face
    /// safetensors directory).
    #[command(subcommand)]
    Transform(transform::TransformCmd),
    /// Gstack growth planning.
    #[command(subcommand)]
    Gstack(transform::GstackCmd),
    /// AdaptiVocab domain vocabularies: build a tokenizer patch, measure it.
    #[command(subcommand)]
    Vocab(VocabCmd),
    /// Calibration of optimization operators.
    #[command(subcommand)]
    Calibrate(CalibrateCmd),
    /// Print a model's configuration and tensor summary.
    Inspect {
        #[arg(long)]
        model: PathBuf,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the forward pass runs: cpu, cuda or cuda:N (a GPU that cannot be used falls
    /// back to the CPU with a message).
    #[arg(long, default_value = "cpu")]
    device: switchyard_engine::backend::Device,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Raw prompt text (empty: start from BOS).
    #[arg(long, conflicts_with = "chat")]
    prompt: Option<String>,
    /// A user message, rendered through the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// An optional system message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML config file (also SWITCHYARD_CONFIG); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (0: any free port; the log says which).
    #[arg(long)]
    port: Option<u16>,
    /// A model to serve (repeatable; replaces the config file's models). Each is named after
    /// its file or directory.
    #[arg(long)]
    model: Vec<PathBuf>,
    /// Bearer token for the admin API (enables it).
    #[arg(long)]
    admin_token: Option<String>,
    /// Log one JSON object per line.
    #[arg(long)]
    log_json: bool,
    /// Sequences decoded together, per model.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Engine threads per model (0: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Cap on each model's context.
    #[arg(long)]
    max_context: Option<usize>,
    /// Requests that may wait per model before 429.
    #[arg(long)]
    max_waiting: Option<usize>,
    /// A directory plugins may be loaded from (repeatable).
    #[arg(long)]
    plugin_dir: Vec<PathBuf>,
    /// Where every model's forward pass runs: cpu, cuda or cuda:N (a GPU that cannot be
    /// used falls back to the CPU with a log line).
    #[arg(long)]
    device: Option<String>,
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Put a built plugin into a plugin directory with its manifest (<name>.toml, sha256
    /// included). A WebAssembly core module built with wit-bindgen is turned into a
    /// component first. Name, version, kind and ABI are read from the plugin itself.
    Pack {
        /// The built plugin: a native library (.so) or a WebAssembly module or component.
        file: PathBuf,
        /// The plugin directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MatchingArg {
    Longest,
    SelectionOrder,
}

impl From<MatchingArg> for switchyard_adaptivocab::Matching {
    fn from(m: MatchingArg) -> Self {
        match m {
            MatchingArg::Longest => Self::Longest,
            MatchingArg::SelectionOrder => Self::SelectionOrder,
        }
    }
}

#[derive(Subcommand)]
enum VocabCmd {
    /// Build an AdaptiVocab patch from a domain corpus: free K rare tokens of the base
    /// vocabulary and give their ids to the K best domain n-grams.
    Build {
        /// The base model (.gguf or Hugging Face directory); only its tokenizer is read.
        #[arg(long)]
        model: PathBuf,
        /// Corpus files or directories (recursively; .gz files are decompressed).
        #[arg(long, required = true, num_args = 1..)]
        corpus: Vec<PathBuf>,
        /// Tokens to replace (K).
        #[arg(long)]
        replace: usize,
        /// Longest n-gram (2 or 3).
        #[arg(long, default_value_t = 3)]
        max_n: usize,
        /// How the patched encoder picks among n-grams matching at one position.
        #[arg(long, value_enum, default_value = "longest")]
        matching: MatchingArg,
        /// The patch file to write (JSON).
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Cost of the patch's encode/decode per 1,000 tokens of real text: the WebAssembly
    /// plugin vs the same code native, side by side.
    Bench {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        patch: PathBuf,
        /// The adaptivocab plugin's manifest (its directory is the plugin directory).
        #[arg(long)]
        plugin: PathBuf,
        /// Text files or directories the prompts are cut from.
        #[arg(long, required = true, num_args = 1..)]
        file: Vec<PathBuf>,
        /// Prompt length in base ids.
        #[arg(long, default_value_t = 1000)]
        tokens: usize,
        /// Timed calls per measurement (median of 5 rounds).
        #[arg(long, default_value_t = 500)]
        iters: usize,
        #[arg(long)]
        json: bool,
    },
    /// Token counts of files with and without a patch, and the round trip check.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        patch: PathBuf,
        /// Files or directories to measure (repeatable).
        #[arg(long, required = true, num_args = 1..)]
        file: Vec<PathBuf>,
        /// Override the patch's matching rule.
        #[arg(long, value_enum)]
        matching: Option<MatchingArg>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CalibrateCmd {
    /// LaRoSA: one orthogonal rotation per layer from the eigenvectors of the layer's
    /// attention-input covariance over calibration text (safetensors file).
    Larosa(larosa::CalibrateArgs),
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Perplexity as llama.cpp's llama-perplexity computes it, plus bits per byte.
    Perplexity {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Score through an AdaptiVocab patch (the model must be the patched one): the text
        /// is tokenized by the base tokenizer, then encoded by the patch.
        #[arg(long)]
        patch: Option<PathBuf>,
        /// Score the LaRoSA-rotated model (a rotation from `switchyard calibrate larosa`).
        #[arg(long)]
        rotation: Option<PathBuf>,
        /// Run the linear layers through the larosa plugin with this configuration
        /// (e.g. "sparsity = 0.4"; without --rotation it is unrotated top-k, TEAL-style).
        #[arg(long)]
        linear: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill and decode tokens/s.
    Decode {
        #[command(flatten)]
        m: ModelArgs,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        /// Repetitions (the mean is reported, after one warm-up round).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Use a kv-allocator plugin (its plugin.toml; the manifest's directory is the
        /// plugin directory) instead of the built-in allocator.
        #[arg(long)]
        kv_plugin: Option<PathBuf>,
        /// Configuration text of the --kv-plugin (e.g. "page_kb = 64" for vattention).
        #[arg(long, default_value = "")]
        kv_config: String,
        #[arg(long)]
        json: bool,
    },
    /// Load test of a running gateway: N streaming clients, latency percentiles, throughput.
    Serve(bench_serve::ServeBenchArgs),
    /// Latency the gateway adds over calling the engine directly (both in this process).
    Gateway(bench_serve::GatewayBenchArgs),
    /// Cost of plugin calls: a WebAssembly tokenizer patch on a long prompt, native ABI calls.
    Plugins(bench_plugins::PluginBenchArgs),
    /// KV allocators: vAttention vs static vs heap (memory on a length mix, sequences in a
    /// fixed budget, mapping overhead in decode).
    Kv(bench_kv::KvBenchArgs),
    /// LaRoSA: batch-1 decode tokens/s, dense vs rotated top-k sparse kernels, side by side.
    Larosa(larosa::LarosaBenchArgs),
    /// The CUDA backend: decode at several batch sizes and prefill against their rooflines,
    /// vAttention on the device, GPU vs CPU logits (needs an NVIDIA GPU).
    Gpu(bench_gpu::GpuBenchArgs),
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap()
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

fn load(m: &ModelArgs, slots: usize) -> Result<Engine> {
    let mut opts = EngineOptions {
        max_slots: slots,
        device: m.device,
        ..Default::default()
    };
    if let Some(t) = m.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        opts.threads = t;
    }
    let pb = bar(0, "loading");
    let t = Instant::now();
    let e = Engine::load(&m.model, opts, &mut |i, n| {
        pb.set_length(n as u64);
        pb.set_position(i as u64);
    })
    .with_context(|| format!("loading model {}", m.model.display()))?;
    pb.finish_and_clear();
    eprintln!(
        "loaded {} ({} layers, dim {}, vocab {}, {:.1} M params) in {:.2} s",
        m.model.display(),
        e.model.cfg.n_layers,
        e.model.cfg.dim,
        e.model.cfg.vocab_size,
        e.model.n_params() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(e)
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Eval(EvalCmd::Perplexity {
            m,
            file,
            ctx,
            patch,
            rotation,
            linear,
            json,
        }) => perplexity(
            &m,
            &file,
            ctx,
            patch.as_deref(),
            rotation.as_deref(),
            linear.as_deref(),
            json,
        ),
        Cmd::Calibrate(CalibrateCmd::Larosa(a)) => larosa::calibrate(a),
        Cmd::Bench(BenchCmd::Larosa(a)) => larosa::bench(a),
        Cmd::Bench(BenchCmd::Gpu(a)) => bench_gpu::bench(a),
        Cmd::Bench(BenchCmd::Decode {
            m,
            batch,
            prompt_tokens,
            gen_tokens,
            reps,
            kv_plugin,
            kv_config,
            json,
        }) => bench_decode(
            &m,
            batch,
            prompt_tokens,
            gen_tokens,
            reps,
            kv_plugin.map(|p| (p, kv_config)),
            json,
        ),
        Cmd::Bench(BenchCmd::Serve(a)) => bench_serve::bench_serve(a),
        Cmd::Bench(BenchCmd::Gateway(a)) => bench_serve::bench_gateway(a),
        Cmd::Bench(BenchCmd::Plugins(a)) => bench_plugins::bench_plugins(a),
        Cmd::Bench(BenchCmd::Kv(a)) => bench_kv::bench_kv(a),
        Cmd::Plugin(PluginCmd::Pack { file, out }) => {
            let p = switchyard_plugin_host::pack(&file, &out)
                .with_context(|| format!("cannot pack {}", file.display()))?;
            println!(
                "packed {} {} ({}, ABI {}) into {}\nmanifest: {}\nsha256: {}",
                p.manifest.name,
                p.manifest.version,
                p.manifest.kind,
                p.manifest.abi,
                p.file_path.display(),
                p.manifest_path.display(),
                p.manifest.sha256
            );
            Ok(())
        }
        Cmd::Transform(t) => transform::transform(t),
        Cmd::Gstack(transform::GstackCmd::Plan(a)) => transform::plan(a),
        Cmd::Vocab(VocabCmd::Build {
            model,
            corpus,
            replace,
            max_n,
            matching,
            out,
            json,
        }) => vocab::build(&vocab::BuildOptions {
            model,
            corpus,
            replace,
            max_n,
            matching: matching.into(),
            out,
            json,
        }),
        Cmd::Vocab(VocabCmd::Eval {
            model,
            patch,
            file,
            matching,
            json,
        }) => vocab::eval(&model, &patch, &file, matching.map(Into::into), json),
        Cmd::Vocab(VocabCmd::Bench {
            model,
            patch,
            plugin,
            file,
            tokens,
            iters,
            json,
        }) => vocab::bench(&model, &patch, &plugin, &file, tokens, iters, json),
        Cmd::Inspect { model } => inspect(&model),
        Cmd::Serve(a) => serve(a),
        Cmd::Chat(a) => chat::chat(a),
    }
}

/// The default model: SWITCHYARD_DEFAULT_MODEL, else where scripts/fetch-default-model.sh
/// puts it.
fn default_model() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SWITCHYARD_DEFAULT_MODEL") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("SWITCHYARD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache"));
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

fn serve(a: ServeArgs) -> Result<()> {
    use switchyard_server::config::{GatewayConfig, Overrides};
    let ov = Overrides {
        config_file: a.config,
        host: a.host,
        port: a.port,
        models: a.model,
        admin_token: a.admin_token,
        log_json: a.log_json,
        max_batch: a.max_batch,
        threads: a.threads,
        max_context: a.max_context,
        max_waiting: a.max_waiting,
        plugin_dirs: a.plugin_dir,
        device: a.device,
    };
    let cfg = GatewayConfig::load(&ov, default_model())?;
    switchyard_server::init_logging(cfg.server.log_json);
    actix_web::rt::System::new().block_on(switchyard_server::serve(cfg))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let mut e = load(&a.m, 1)?;
    let prompt = match (&a.prompt, &a.chat) {
        (_, Some(c)) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", c));
            e.encode_chat(&msgs)?
        }
        (Some(p), None) => e.encode_prompt(p)?,
        (None, None) => e.encode_prompt("")?,
    };
    let req = GenerateRequest {
        prompt,
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop: a.stop,
    };
    let stdout = std::io::stdout();
    let out = e.generate(&req, &mut |t| {
        let mut s = stdout.lock();
        let _ = s.write_all(t.as_bytes());
        let _ = s.flush();
    })?;
    println!();
    let n = out.tokens.len();
    eprintln!(
        "prompt {} tokens in {:.3} s ({:.1} tok/s); generated {} tokens in {:.3} s ({:.1} tok/s); finish: {:?}",
        out.prompt_tokens,
        out.prefill_secs,
        out.prompt_tokens as f64 / out.prefill_secs.max(1e-9),
        n,
        out.decode_secs,
        n as f64 / out.decode_secs.max(1e-9),
        out.finish
    );
    Ok(())
}

fn perplexity(
    m: &ModelArgs,
    file: &Path,
    ctx: usize,
    patch: Option<&Path>,
    rotation: Option<&Path>,
    linear: Option<&str>,
    json: bool,
) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut e = load(m, 1)?;
    if let Some(p) = patch {
        e.patch = Some(std::sync::Arc::new(vocab::NativePatch::open(p, &e)?));
    }
    larosa::apply(&mut e, rotation, linear)?;
    let pb = bar(0, "perplexity");
    let t = Instant::now();
    let r = e.perplexity(&text, ctx, &mut |i, n| {
        pb.set_length(n as u64);
        pb.set_position(i as u64);
    })?;
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = secs.into();
        v["model"] = m.model.display().to_string().into();
        v["file"] = file.display().to_string().into();
        v["patch"] = patch.map(|p| p.display().to_string()).into();
        v["rotation"] = rotation.map(|p| p.display().to_string()).into();
        v["linear"] = linear.into();
        println!("{v}");
    } else {
        println!(
            "PPL = {:.4}  bits/byte = {:.4}  ({} chunks of {} tokens, {} tokens scored, {} bytes, {:.1} s)",
            r.ppl, r.bits_per_byte, r.chunks, r.ctx, r.tokens, r.bytes, secs
        );
    }
    Ok(())
}

fn bench_decode(
    m: &ModelArgs,
    batch: usize,
    prompt_tokens: usize,
    gen: usize,
    reps: usize,
    kv_plugin: Option<(PathBuf, String)>,
    json: bool,
) -> Result<()> {
    if batch == 0 || gen == 0 || prompt_tokens == 0 {
        bail!("--batch, --prompt-tokens and --gen-tokens must be at least 1");
    }
    let mut e = load(m, batch)?;
    if let Some((manifest, kv_config)) = kv_plugin {
        let dir = manifest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let host = switchyard_plugin_host::PluginHost::new(&[dir]);
        let p = host.load_native(&manifest)?;
        let kv = p.kv_allocator(&kv_config, e.kv_layout(batch))?;
        e.set_kv(Box::new(kv));
    }
    if prompt_tokens + gen > e.model.cfg.max_context {
        bail!(
            "--prompt-tokens + --gen-tokens exceeds the model context {}",
            e.model.cfg.max_context
        );
    }
    let vocab = e.model.cfg.vocab_size as u32;
    // A deterministic pseudo-random prompt (ids in the vocabulary).
    let prompt: Vec<u32> = (0..prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    // Like llama-bench: prefill of a fresh prompt (pp), and generation of `gen` tokens from
    // an empty context (tg), measured separately; one warm-up round first.
    let (mut pps, mut tgs) = (Vec::new(), Vec::new());
    for rep in 0..=reps.max(1) {
        let slots: Vec<usize> = (0..batch)
            .map(|_| e.kv.acquire())
            .collect::<Result<_, _>>()?;
        let t = Instant::now();
        for &s in &slots {
            e.prefill(s, 0, &prompt)?;
        }
        let pp = (prompt_tokens * batch) as f64 / t.elapsed().as_secs_f64();
        for &s in &slots {
            e.kv.release(s);
        }
        let tg = (gen * batch) as f64 / bench_kv::decode(&mut e, batch, gen, prompt[0])?;
        if rep > 0 {
            pps.push(pp);
            tgs.push(tg);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (best_pp, best_tg) = (mean(&pps), mean(&tgs));
    let threads = e.fwd.pool().n_threads();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "model": m.model.display().to_string(), "threads": threads, "batch": batch,
                "prompt_tokens": prompt_tokens, "gen_tokens": gen,
                "prefill_tok_s": best_pp, "decode_tok_s": best_tg,
                "prefill_tok_s_runs": pps, "decode_tok_s_runs": tgs,
                "weight_bytes": e.model.weight_bytes(),
                "kv_allocator": e.kv.name(),
            })
        );
    } else {
        println!(
            "threads {threads} batch {batch}: prefill {best_pp:.1} tok/s (pp{prompt_tokens}), decode {best_tg:.1} tok/s (tg{gen}{})",
            if batch > 1 { ", all sequences" } else { "" }
        );
    }
    Ok(())
}

fn inspect(path: &Path) -> Result<()> {
    let e = Engine::load(
        path,
        EngineOptions {
            threads: 1,
            ..Default::default()
        },
        &mut |_, _| {},
    )?;
    let c = &e.model.cfg;
    println!("{c:#?}");
    println!("params: {}", e.model.n_params());
    println!(
        "weight types: embd {}, q {}, output {}",
        e.model.tok_embd.ty.name(),
        e.model.layers[0].wq.ty.name(),
        e.model.output().ty.name()
    );
    println!(
        "tokenizer: vocab {}, bos {:?}, eos {:?}, stop {:?}, add_bos {}",
        e.tokenizer.vocab_size(),
        e.tokenizer.bos,
        e.tokenizer.eos,
        e.tokenizer.stop_ids,
        e.tokenizer.add_bos
    );
    println!(
        "chat template: {}",
        if e.tokenizer.chat_template.is_some() {
            "from the model"
        } else {
            "ChatML fallback"
        }
    );
    Ok(())
}
