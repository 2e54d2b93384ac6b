//! `switchyard bench kv`: the vAttention allocator against static allocation and the engine's
//! heap allocator, on the layout of a real model.
//!
//! 1. Memory: every slot busy with a sequence drawn from a realistic length mix, grown a token
//!    per step until done, then the slot takes the next sequence; physical KV memory sampled
//!    every step (mean and peak).
//! 2. Capacity: how many sequences of that mix fit a fixed physical KV budget.
//! 3. Decode: the real model decoding a batch with each allocator, side by side; the time
//!    spent inside the allocator's `ensure` (mapping included) as a share of decode time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use switchyard_engine::forward::SeqChunk;
use switchyard_engine::kv::{HeapKv, KvAllocator, KvLayout};
use switchyard_engine::sampling::{Sampler, SamplingParams};
use switchyard_engine::{Engine, EngineOptions};
use switchyard_plugin_host::{CallObserver, CallOutcome, NativePlugin, PluginHost};

#[derive(Args)]
pub struct KvBenchArgs {
    /// The model whose KV layout (layers, KV heads, head size) is used, and that decodes.
    #[arg(long)]
    model: PathBuf,
    /// Context per sequence (static allocation reserves this much for every slot).
    #[arg(long, default_value_t = 2048)]
    max_context: usize,
    /// Concurrent sequences (slots) in the memory run.
    #[arg(long, default_value_t = 16)]
    slots: usize,
    /// Sequences in the memory run.
    #[arg(long, default_value_t = 256)]
    sequences: usize,
    /// Physical KV budget of the capacity run, MiB.
    #[arg(long, default_value_t = 1024)]
    budget_mb: usize,
    /// vAttention page size, KiB.
    #[arg(long, default_value_t = 64)]
    page_kb: usize,
    /// Sequences decoded together in the decode run.
    #[arg(long, default_value_t = 8)]
    decode_batch: usize,
    /// Tokens decoded per sequence in the decode run (crossing many pages).
    #[arg(long, default_value_t = 256)]
    decode_tokens: usize,
    /// Rounds of the decode run (allocators alternate within each round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    json: bool,
}

/// Sequence lengths (prompt + generation): log-normal with median 300 tokens and σ = 0.9
/// (a chat-like mix: most requests a few hundred tokens, a tail of long ones), clipped to
/// [16, max_context]. Deterministic.
pub fn lengths(n: usize, max_context: usize, seed: u64) -> Vec<usize> {
    let mut s = seed;
    let mut uni = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let z = (-2.0 * uni().ln()).sqrt() * (2.0 * std::f64::consts::PI * uni()).cos();
            ((300f64.ln() + 0.9 * z).exp() as usize).clamp(16, max_context)
        })
        .collect()
}

/// The vattention and kv-static plugins (built beside this binary), loaded once.
struct Plugins {
    vattention: NativePlugin,
    kv_static: NativePlugin,
}

impl Plugins {
    fn load() -> Result<Self> {
        let one = |name: &str| -> Result<NativePlugin> {
            let manifest = crate::transform::find_plugin(None, &[], name)?;
            let dir = manifest.parent().unwrap().to_path_buf();
            Ok(PluginHost::new(&[dir]).load_native(&manifest)?)
        };
        Ok(Self {
            vattention: one("vattention")?,
            kv_static: one("kv-static")?,
        })
    }
}

/// Memory run: mean and peak mapped bytes, mean used bytes.
fn memory_run(kv: &mut dyn KvAllocator, lens: &[usize]) -> Result<Value> {
    let slots = kv.layout().max_slots;
    let mut next = 0;
    let mut active: Vec<(usize, usize, usize)> = Vec::new(); // (slot, tokens, target)
    let (mut steps, mut sum_mapped, mut peak, mut sum_used) = (0u64, 0f64, 0u64, 0f64);
    let t = Instant::now();
    while next < lens.len() || !active.is_empty() {
        while active.len() < slots && next < lens.len() {
            let s = kv.acquire()?;
            active.push((s, 0, lens[next]));
            next += 1;
        }
        for a in active.iter_mut() {
            a.1 += 1;
            kv.ensure(a.0, a.1)?;
        }
        let st = kv.stats();
        steps += 1;
        sum_mapped += st.mapped_bytes as f64;
        sum_used += st.used_bytes as f64;
        peak = peak.max(st.mapped_bytes);
        let mut i = 0;
        while i < active.len() {
            if active[i].1 >= active[i].2 {
                kv.release(active[i].0);
                active.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    Ok(json!({
        "allocator": kv.name(),
        "steps": steps,
        "mean_mapped_mib": mib(sum_mapped / steps as f64),
        "peak_mapped_mib": mib(peak as f64),
        "mean_used_mib": mib(sum_used / steps as f64),
        "reserved_mib": mib(kv.stats().reserved_bytes as f64),
        "seconds": t.elapsed().as_secs_f64(),
    }))
}

#[derive(Default)]
struct EnsureTimer {
    ns: AtomicU64,
}

impl CallObserver for EnsureTimer {
    fn call(&self, _plugin: &str, op: &str, d: Duration, _o: CallOutcome) {
        if op == "ensure" {
            self.ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// Decode `tokens` greedy tokens for `batch` fresh sequences that start from token `first`
/// (one forward pass per step over the batch); seconds.
pub fn decode(e: &mut Engine, batch: usize, tokens: usize, first: u32) -> Result<f64> {
    let slots: Vec<usize> = (0..batch)
        .map(|_| e.kv.acquire())
        .collect::<Result<_, _>>()?;
    let vocab = e.model.cfg.vocab_size;
    let mut last: Vec<u32> = vec![first; batch];
    let mut sampler = Sampler::new(SamplingParams::default());
    let t = Instant::now();
    for step in 0..tokens {
        let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let chunks: Vec<SeqChunk> = slots
            .iter()
            .zip(&toks)
            .map(|(&s, t)| SeqChunk::last_logits(s, step, t))
            .collect();
        let logits = e.fwd.forward(&e.model, e.kv.as_mut(), &chunks)?;
        for (i, l) in last.iter_mut().enumerate() {
            *l = sampler.sample(&logits[i * vocab..(i + 1) * vocab]);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    for s in slots {
        e.kv.release(s);
    }
    Ok(secs)
}

pub fn bench_kv(a: KvBenchArgs) -> Result<()> {
    if a.slots == 0 || a.sequences == 0 || a.decode_batch == 0 || a.rounds == 0 {
        bail!("--slots, --sequences, --decode-batch and --rounds must be at least 1");
    }
    let opts = EngineOptions {
        max_slots: a.decode_batch,
        ..Default::default()
    };
    let mut e = Engine::load(&a.model, opts, &mut |_, _| {})
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let ctx = a.max_context.min(e.model.cfg.max_context);
    if a.decode_tokens + 1 > ctx {
        bail!("--decode-tokens must be below the context ({ctx})");
    }
    let base = KvLayout {
        max_context: ctx,
        ..e.kv_layout(a.slots)
    };
    let per_token = (2 * base.n_layers * base.token_elems() * 4) as f64;
    let lens = lengths(a.sequences, ctx, 42);
    let mean_len = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    let mut sorted = lens.clone();
    sorted.sort_unstable();
    let vcfg = format!("page_kb = {}", a.page_kb);
    eprintln!(
        "KV layout: {} layers x {} KV heads x {} = {:.1} KiB per token, context {ctx}; {} sequences, mean {:.0} tokens",
        base.n_layers,
        base.kv_heads,
        base.head_dim,
        per_token / 1024.0,
        lens.len(),
        mean_len
    );

    let plugins = Plugins::load()?;

    // 1. Memory.
    eprintln!("memory run ...");
    let mem = vec![
        memory_run(&mut HeapKv::new(base), &lens)?,
        memory_run(&mut plugins.vattention.kv_allocator(&vcfg, base)?, &lens)?,
        memory_run(&mut plugins.kv_static.kv_allocator("", base)?, &lens)?,
    ];
    let (v_mean, s_mean) = (
        mem[1]["mean_mapped_mib"].as_f64().unwrap(),
        mem[2]["mean_mapped_mib"].as_f64().unwrap(),
    );

    // 2. Capacity in a fixed budget.
    eprintln!("capacity run ...");
    let budget = (a.budget_mb as f64) * (1u64 << 20) as f64;
    let static_fit = (budget / (ctx as f64 * per_token)).floor() as usize;
    let many = KvLayout {
        // enough slots for the budget filled with the shortest sequences
        max_slots: (budget / (16.0 * per_token)) as usize + 1,
        ..base
    };
    let mut v = plugins.vattention.kv_allocator(
        &format!("{vcfg}\nbudget_mb = {}\nahead_pages = 0", a.budget_mb),
        many,
    )?;
    let mut fit = 0;
    for &len in lens.iter().cycle() {
        let Ok(s) = v.acquire() else { break };
        if v.ensure(s, len).is_err() {
            break;
        }
        fit += 1;
    }
    drop(v);

    // 3. Decode, side by side.
    eprintln!("decode run ...");
    let dl = KvLayout {
        max_slots: a.decode_batch,
        ..base
    };
    let timer = Arc::new(EnsureTimer::default());
    let names = ["heap", "vattention", "kv-static"];
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut ensure_share = Vec::new();
    for round in 0..=a.rounds {
        for (i, n) in names.iter().enumerate() {
            let kv: Box<dyn KvAllocator> = match i {
                0 => Box::new(HeapKv::new(dl)),
                1 => Box::new(
                    plugins
                        .vattention
                        .kv_allocator(&vcfg, dl)?
                        .with_observer(timer.clone()),
                ),
                _ => Box::new(plugins.kv_static.kv_allocator("", dl)?),
            };
            e.set_kv(kv);
            timer.ns.store(0, Ordering::Relaxed);
            let t = decode(&mut e, a.decode_batch, a.decode_tokens, 1)?;
            if round > 0 {
                // round 0 warms up
                secs[i].push(t);
                if *n == "vattention" {
                    ensure_share.push(timer.ns.load(Ordering::Relaxed) as f64 / 1e9 / t);
                }
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut decode_json = serde_json::Map::new();
    for (n, v) in names.iter().zip(secs) {
        let m = median(v);
        decode_json.insert(
            n.to_string(),
            json!({"median_seconds": m, "tok_s": (a.decode_batch * a.decode_tokens) as f64 / m}),
        );
    }
    let share = median(ensure_share.clone());
    let heap_s = decode_json["heap"]["median_seconds"].as_f64().unwrap();
    let vat_s = decode_json["vattention"]["median_seconds"]
        .as_f64()
        .unwrap();
    let out = json!({
        "model": a.model.display().to_string(),
        "layout": {"n_layers": base.n_layers, "kv_heads": base.kv_heads, "head_dim": base.head_dim,
                   "max_context": ctx, "kv_bytes_per_token": per_token},
        "lengths": {"distribution": "log-normal, median 300, sigma 0.9, clipped to [16, max_context], seed 42",
                    "count": lens.len(), "mean": mean_len, "p50": sorted[sorted.len() / 2],
                    "p90": sorted[sorted.len() * 9 / 10], "max": sorted[sorted.len() - 1]},
        "page_kb": a.page_kb,
        "memory": {"slots": a.slots, "runs": mem,
                   "static_over_vattention_mean": s_mean / v_mean},
        "capacity": {"budget_mib": a.budget_mb, "static_sequences": static_fit,
                     "vattention_sequences": fit,
                     "ratio": fit as f64 / static_fit.max(1) as f64},
        "decode": {"batch": a.decode_batch, "tokens": a.decode_tokens, "rounds": a.rounds,
                   "allocators": decode_json,
                   "vattention_ensure_share": share,
                   "vattention_ensure_share_runs": ensure_share,
                   "vattention_over_heap_time": vat_s / heap_s},
    });
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
