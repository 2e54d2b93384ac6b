//! `switchyard bench gpu`: the CUDA backend against its rooflines (decode at several batch
//! sizes, prefill), the vAttention allocator on the device, and a check of the GPU's logits
//! against the CPU backend's.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct GpuBenchArgs {
    /// A model to upload (.gguf or Hugging Face directory) ...
    #[arg(long, conflicts_with = "dummy")]
    pub model: Option<PathBuf>,
    /// ... or random weights of a known shape built on the device: llama2-7b, smollm2-135m.
    #[arg(long)]
    pub dummy: Option<String>,
    /// Write the dummy weights as a Hugging Face llama directory (config.json and bf16
    /// model.safetensors) for the CPU backend and the PyTorch baseline, then exit.
    #[arg(long)]
    pub save_weights: Option<PathBuf>,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence before decoding.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 128)]
    pub gen: usize,
    /// Prefill lengths timed (one sequence each).
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub prefill: Vec<usize>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// KV budget (GiB) for the max-concurrent-sequences test.
    #[arg(long, default_value_t = 16.0)]
    pub kv_budget_gib: f64,
    /// With --model: also compare the GPU's logits with the CPU backend's over this many
    /// tokens of a fixed prompt.
    #[arg(long, default_value_t = 0)]
    pub check_tokens: usize,
    /// How the decode runs' vAttention allocator maps pages: `background` (a mapping thread
    /// keeps each sequence one page ahead) or `sync` (mapped inside the step that needs it).
    #[arg(long, default_value = "background", value_parser = ["background", "sync"])]
    pub kv_mode: String,
    /// LaRoSA sparsities to time at batch 1 against dense decode (e.g. 0.4,0.5). With
    /// --dummy, random residual adapters are added so the rotated model's extra product is
    /// paid; transposed weight copies are built on the device for the sparse GEMV.
    #[arg(long, value_delimiter = ',')]
    pub larosa: Vec<f64>,
    /// LaRoSA's sparse products: outputs per block (512 or 1024).
    #[arg(long, default_value_t = 512)]
    pub sparse_tile: usize,
    /// LaRoSA's sparse products: blocks a launch aims for.
    #[arg(long, default_value_t = 264)]
    pub sparse_blocks: usize,
    /// Largest token count of the split-K tensor-core products (from 3 tokens; 0, the
    /// default: GEMV and cuBLAS only).
    #[arg(long, default_value_t = 0)]
    pub mm_max: usize,
    /// Largest token count of the GEMV kernels (at most 8; cuBLAS above, outside --mm-max).
    /// Default: the backend's (SWITCHYARD_GEMV_MAX, else 2).
    #[arg(long)]
    pub gemv_max: Option<usize>,
    /// The tensor-core products with the previous kernels (`mm*`, whole inputs per warp)
    /// instead of the split-K ones (`mms*`, inputs staged in shared memory).
    #[arg(long)]
    pub no_mm_split: bool,
    /// Blocks a split-K tensor-core product aims for.
    #[arg(long, default_value_t = switchyard_engine::cuda::forward::MS_BLOCKS_WANTED)]
    pub mm_blocks: usize,
    /// Largest decode batch replayed from a CUDA graph (0: no graphs).
    #[arg(long, default_value_t = 64)]
    pub graph_max: usize,
    /// Also time every decode batch with the previous engine's products (GEMV up to 8
    /// tokens, cuBLAS above, graphs up to 8 sequences), side by side in the same run.
    #[arg(long)]
    pub baseline: bool,
    /// Time each product kernel (GEMV, tensor-core, cuBLAS) alone on the model's matrix
    /// shapes at 1..64 tokens, as effective weight bandwidth.
    #[arg(long)]
    pub products: bool,
    #[arg(long)]
    pub json: bool,
}

#[cfg(not(feature = "cuda"))]
pub fn bench(_a: GpuBenchArgs) -> Result<()> {
    anyhow::bail!("this binary was built without the `cuda` feature")
}

#[cfg(feature = "cuda")]
pub fn bench(a: GpuBenchArgs) -> Result<()> {
    imp::bench(a)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use anyhow::{bail, Context};
    use serde_json::json;
    use std::sync::Arc;
    use std::time::Instant;

    use switchyard_engine::cuda::forward::{CudaBackend, DeviceModel, Larosa};
    use switchyard_engine::cuda::kv::KvMode;
    use switchyard_engine::cuda::{open_kv, Gpu};
    use switchyard_engine::forward::SeqChunk;
    use switchyard_engine::kv::{KvAllocator, KvLayout};
    use switchyard_engine::model::{Config, RopeStyle};

    /// The fragment-layout weight copies for the stream-K products as SWITCHYARD_SK and
    /// SWITCHYARD_SK_TILED say (see [`DeviceModel::prepare_tiled_by_policy`]).
    fn tile_if_wanted(dm: &mut DeviceModel) -> Result<()> {
        let t = Instant::now();
        let line =
            dm.prepare_tiled_by_policy(&mut |i, n| eprint!("\rfragment layout: layer {i}/{n}"))?;
        if let Some(line) = line {
            eprintln!("\n{line} ({:.2} s)", t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn dummy_config(name: &str) -> Result<Config> {
        let (dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size, ctx) = match name {
            "llama2-7b" => (4096, 32, 32, 32, 11008, 32000, 4096),
            "smollm2-135m" => (576, 30, 9, 3, 1536, 49152, 8192),
            _ => bail!("--dummy {name}: unknown shape (llama2-7b or smollm2-135m)"),
        };
        Ok(Config {
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads,
            ffn_dim,
            vocab_size,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            max_context: ctx,
            rope: RopeStyle::Half,
        })
    }

    fn layout(c: &Config, slots: usize, ctx: usize) -> KvLayout {
        KvLayout {
            n_layers: c.n_layers,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            max_context: ctx.min(c.max_context),
            max_slots: slots,
        }
    }

    /// Deterministic token ids in the vocabulary.
    fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % vocab as u64) as u32
            })
            .collect()
    }

    pub fn bench(a: GpuBenchArgs) -> Result<()> {
        let gpu = Gpu::open(a.gpu)?;
        eprintln!(
            "device {}: {} (compute {}.{}, {:.1} GiB), kernels compiled in {:.2} s",
            a.gpu,
            gpu.name,
            gpu.cc.0,
            gpu.cc.1,
            gpu.total_mem as f64 / (1u64 << 30) as f64,
            gpu.compile_secs
        );
        let mut check = serde_json::Value::Null;
        let (dm, what) = match (&a.model, &a.dummy) {
            (Some(p), _) => {
                let (m, _src) = switchyard_engine::model::Model::load(p, &mut |_, _| {})
                    .with_context(|| format!("loading {}", p.display()))?;
                let t = Instant::now();
                let mut dm = DeviceModel::upload(gpu.clone(), &m, &mut |i, n| {
                    eprint!("\ruploading layer {i}/{n}");
                })?;
                eprintln!(" in {:.2} s", t.elapsed().as_secs_f64());
                tile_if_wanted(&mut dm)?;
                let dm = Arc::new(dm);
                if a.check_tokens > 0 {
                    check = check_logits(&dm, &m, a.check_tokens)?;
                    eprintln!("logits check: {check}");
                }
                (dm, p.display().to_string())
            }
            (None, Some(d)) => {
                let t = Instant::now();
                let mut dm = DeviceModel::dummy(gpu.clone(), dummy_config(d)?, 1)?;
                eprintln!(
                    "dummy {d} weights built on the device in {:.2} s ({:.2} GB)",
                    t.elapsed().as_secs_f64(),
                    dm.device_bytes() as f64 / 1e9
                );
                if let Some(p) = &a.save_weights {
                    let t = Instant::now();
                    dm.save_hf_dir(p)?;
                    eprintln!(
                        "wrote {} in {:.1} s",
                        p.display(),
                        t.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                tile_if_wanted(&mut dm)?;
                (Arc::new(dm), format!("dummy:{d}"))
            }
            (None, None) => bail!("give --model PATH or --dummy SHAPE"),
        };
        let c = dm.cfg.clone();
        let bw = gpu.copy_bandwidth(1 << 30, 20)?;
        let peak = switchyard_engine::cuda::forward::gemm_flops(&gpu, 8192, 8192, 8192, 10)?;
        eprintln!(
            "device copy bandwidth {:.0} GB/s (read + write), bf16 GEMM {:.0} TFLOP/s",
            bw / 1e9,
            peak / 1e12
        );
        let wbytes = dm.step_weight_bytes() as f64;
        let kv_tok = (2 * c.n_layers * c.n_kv_heads * c.head_dim * 2) as f64;
        let kv_mode = if a.kv_mode == "sync" {
            KvMode::Sync
        } else {
            KvMode::Background
        };
        let products = if a.products {
            product_sweep(&gpu, &c, bw)?
        } else {
            serde_json::Value::Null
        };
        let mut decode = Vec::new();
        let new = Tune::of(&a);
        let mut runs: Vec<(usize, Tune)> = Vec::new();
        for &b in &a.batch {
            if b == 1 {
                runs.push((
                    1,
                    Tune {
                        graph_max: 0,
                        label: "engine, no CUDA graph",
                        ..new
                    },
                ));
            }
            if a.baseline {
                runs.push((b, Tune::PREVIOUS));
            }
            runs.push((b, new));
        }
        for (b, tune) in runs {
            let graphs = b <= tune.graph_max;
            let r = decode_run(&dm, b, a.prompt, a.gen, tune, kv_mode, None)?;
            let avg_ctx = a.prompt as f64 + a.gen as f64 / 2.0;
            let bytes = wbytes + kv_tok * avg_ctx * b as f64;
            let flops = 2.0 * dm.macs_per_token() as f64 * b as f64
                + 4.0 * (c.n_layers * c.n_heads * c.head_dim) as f64 * avg_ctx * b as f64;
            let t_roof = (bytes / bw).max(flops / peak);
            let step = r.decode_secs / a.gen as f64;
            let tps = (b * a.gen) as f64 / r.decode_secs;
            eprintln!(
                "decode batch {b:>3} [{}]: {tps:>9.1} tok/s, {:.3} ms/step, roofline {:.3} ms/step ({}), {:.0} % of it; mapping {:.3} % of decode",
                tune.label,
                step * 1e3,
                t_roof * 1e3,
                if bytes / bw >= flops / peak { "bytes" } else { "FLOPs" },
                100.0 * t_roof / step,
                100.0 * r.map_secs_decode / r.decode_secs
            );
            decode.push(json!({
                "batch": b, "prompt": a.prompt, "gen": a.gen, "cuda_graphs": graphs,
                "kernels": tune.label, "mm_max_tokens": tune.mm_max, "mm_split": tune.mm_split,
                "mm_blocks": tune.mm_blocks, "settings": r.settings,
                "tokens_per_s": tps, "ms_per_step": step * 1e3,
                "roofline_ms_per_step": t_roof * 1e3,
                "roofline_bound": if bytes / bw >= flops / peak { "bytes" } else { "flops" },
                "fraction_of_roofline": t_roof / step,
                "bytes_per_step": bytes, "flops_per_step": flops,
                "prefill_tokens_per_s": r.prefill_tps,
                "map_share_of_decode": r.map_secs_decode / r.decode_secs,
                "kv_mode": a.kv_mode,
                "sync_maps_in_decode": r.sync_maps_decode,
                "ahead_map_secs_in_decode": r.ahead_secs_decode,
                "pages_mapped": r.pages_mapped,
                "kv_mapped_bytes": r.kv_mapped, "kv_static_bytes": r.kv_static,
            }));
        }
        let mut prefill = Vec::new();
        for &p in &a.prefill {
            if p > c.max_context {
                continue;
            }
            let flops = 2.0 * dm.macs_per_token() as f64 * p as f64
                + 2.0 * (c.n_layers * c.n_heads * c.head_dim) as f64 * (p * p) as f64;
            let t_roof = flops / peak;
            // Side by side: the tensor-core prefill attention, then the f32 tiles.
            for (attention, mma) in [("tensor cores", true), ("f32 tiles", false)] {
                let t = prefill_run(&dm, p, mma)?;
                eprintln!(
                    "prefill {p:>5} tokens, {attention:>12} attention: {:>9.0} tok/s, {:.1} ms, \
                     FLOP roofline {:.1} ms, {:.0} %",
                    p as f64 / t,
                    t * 1e3,
                    t_roof * 1e3,
                    100.0 * t_roof / t
                );
                prefill.push(json!({"tokens": p, "attention": attention,
                    "tokens_per_s": p as f64 / t, "secs": t,
                    "roofline_secs": t_roof, "fraction_of_roofline": t_roof / t}));
            }
        }
        let mut dm = dm;
        let larosa = if a.larosa.is_empty() {
            serde_json::Value::Null
        } else {
            larosa_runs(&mut dm, &a, kv_mode, bw)?
        };
        let fit = fit_runs(&dm, a.kv_budget_gib)?;
        eprintln!("KV budget test: {fit}");
        let out = json!({
            "device": gpu.name, "compute_capability": format!("{}.{}", gpu.cc.0, gpu.cc.1),
            "weights": what, "weight_bytes_per_step": wbytes,
            "copy_bandwidth_bytes_per_s": bw, "gemm_bf16_flops_per_s": peak,
            "kernels_compile_secs": gpu.compile_secs,
            "programmatic_dependent_launch": gpu.pdl(),
            "l2_fetch_bytes": {"driver_default": gpu.l2_fetch.0, "set": gpu.l2_fetch.1},
            "products": products, "decode": decode, "prefill": prefill, "kv_fit": fit, "logits_check": check,
            "larosa": larosa,
            "blaslt_tuned": gpu.blaslt_tuned(),
        });
        if a.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Ok(())
    }

    /// The product and graph settings of one decode run.
    #[derive(Clone, Copy)]
    struct Tune {
        mm_max: usize,
        gemv_max: Option<usize>,
        mm_split: bool,
        mm_blocks: usize,
        graph_max: usize,
        sparse_tile: usize,
        sparse_blocks: usize,
        label: &'static str,
    }

    impl Tune {
        fn of(a: &GpuBenchArgs) -> Tune {
            Tune {
                mm_max: a.mm_max,
                gemv_max: a.gemv_max,
                mm_split: !a.no_mm_split,
                mm_blocks: a.mm_blocks,
                graph_max: a.graph_max,
                sparse_tile: a.sparse_tile,
                sparse_blocks: a.sparse_blocks,
                label: "engine",
            }
        }
        /// Without this session's tensor-core products and large graphs: the (fused) GEMV
        /// up to 8 tokens, then cuBLAS; graphs up to 8 sequences.
        const PREVIOUS: Tune = Tune {
            mm_max: 0,
            gemv_max: Some(8),
            mm_split: false,
            mm_blocks: switchyard_engine::cuda::forward::MS_BLOCKS_WANTED,
            graph_max: 8,
            sparse_tile: switchyard_engine::cuda::forward::SPARSE_TILE,
            sparse_blocks: switchyard_engine::cuda::forward::SPARSE_BLOCKS,
            label: "no tensor-core products, graphs up to 8",
        };
    }

    /// Each product kernel alone on the model's shapes: effective weight bandwidth.
    fn product_sweep(
        gpu: &Arc<switchyard_engine::cuda::Gpu>,
        c: &switchyard_engine::model::Config,
        bw: f64,
    ) -> Result<serde_json::Value> {
        use switchyard_engine::cuda::forward::{product_secs, ProductKernel};
        let shapes = [
            ("o", c.dim, c.n_heads * c.head_dim),
            ("gate/up", c.ffn_dim, c.dim),
            ("down", c.dim, c.ffn_dim),
        ];
        let mut out = Vec::new();
        for (name, rows, cols) in shapes {
            for n in [1usize, 2, 4, 8, 16, 32, 64] {
                // The kernels a pass can take at n tokens (the GEMV, the split-K kernels that
                // `--mm-max` turns on, cuBLAS and the stream-K kernels on bf16 inputs as the
                // pass hands them over) and the variants with the rounding pass.
                for k in [
                    ProductKernel::Gemv,
                    ProductKernel::Mms { blocks: 264 },
                    ProductKernel::Cublas16,
                    ProductKernel::Sk16,
                    ProductKernel::SkTiled16,
                ] {
                    let ok = match k {
                        ProductKernel::Gemv => n <= 2,
                        ProductKernel::Mm => n <= 32 && cols % 32 == 0,
                        ProductKernel::Mms { .. }
                        | ProductKernel::Sk { .. }
                        | ProductKernel::Sk16
                        | ProductKernel::SkTiled { .. }
                        | ProductKernel::SkTiled16 => n <= 64 && cols % 32 == 0,
                        ProductKernel::Cublas | ProductKernel::Cublas16 => true,
                    };
                    if !ok {
                        continue;
                    }
                    let secs = product_secs(gpu, rows, cols, n, k, 200)?;
                    let gbs = (rows * cols * 2) as f64 / secs;
                    eprintln!(
                        "product {name:>7} [{rows}x{cols}] n={n:<2} {k:?}: {:.1} us, {:.0} GB/s of weights ({:.0} % of copy bandwidth)",
                        secs * 1e6,
                        gbs / 1e9,
                        100.0 * gbs / bw
                    );
                    out.push(
                        json!({"matrix": name, "rows": rows, "cols": cols, "tokens": n,
                        "kernel": format!("{k:?}"), "secs": secs, "weight_bytes_per_s": gbs,
                        "fraction_of_copy_bandwidth": gbs / bw}),
                    );
                }
            }
        }
        Ok(serde_json::Value::Array(out))
    }

    struct DecodeRun {
        prefill_tps: f64,
        decode_secs: f64,
        map_secs_decode: f64,
        sync_maps_decode: u64,
        ahead_secs_decode: f64,
        pages_mapped: u64,
        kv_mapped: u64,
        kv_static: u64,
        /// The backend's kernel settings (from SWITCHYARD_* variables).
        settings: serde_json::Value,
    }

    fn decode_run(
        dm: &Arc<DeviceModel>,
        b: usize,
        prompt: usize,
        gen: usize,
        tune: Tune,
        mode: KvMode,
        larosa: Option<Larosa>,
    ) -> Result<DecodeRun> {
        let c = &dm.cfg;
        let ctx = prompt + gen + 8;
        let mut kv = open_kv(dm, layout(c, b, ctx), None, mode)?;
        let mut be = CudaBackend::new(dm.clone());
        be.graphs_enabled = tune.graph_max > 0;
        be.graph_max_tokens = tune.graph_max;
        be.mm_tokens = 3..=tune.mm_max;
        if let Some(g) = tune.gemv_max {
            be.gemv_max = g;
        }
        be.mm_split = tune.mm_split;
        be.mm_blocks = tune.mm_blocks;
        be.sparse_tile = tune.sparse_tile;
        be.sparse_blocks = tune.sparse_blocks;
        be.set_larosa(larosa);
        let slots: Vec<usize> = (0..b).map(|_| kv.acquire()).collect::<Result<_, _>>()?;
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|i| tokens(prompt, i as u64 + 7, c.vocab_size))
            .collect();
        // Warm-up: a short prefill + decode on slot 0, then forget it.
        {
            let w = tokens(16, 99, c.vocab_size);
            be.forward_greedy(&mut kv, &[SeqChunk::last_logits(slots[0], 0, &w)])?;
            for p in 16..20 {
                let t = [w[p % 16]];
                be.forward_greedy(&mut kv, &[SeqChunk::last_logits(slots[0], p, &t)])?;
            }
        }
        let t = Instant::now();
        let mut next = Vec::with_capacity(b);
        // Prefill in groups that keep a pass under ~8k tokens.
        let group = (8192 / prompt.max(1)).max(1);
        for g in (0..b).step_by(group) {
            let chunks: Vec<SeqChunk> = (g..(g + group).min(b))
                .map(|i| SeqChunk::last_logits(slots[i], 0, &prompts[i]))
                .collect();
            next.extend(be.forward_greedy(&mut kv, &chunks)?);
        }
        let prefill_tps = (b * prompt) as f64 / t.elapsed().as_secs_f64();
        kv.settle();
        let before = kv.counters();
        let t = Instant::now();
        for s in 0..gen {
            let steps: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let chunks: Vec<SeqChunk> = (0..b)
                .map(|i| SeqChunk::last_logits(slots[i], prompt + s, &steps[i]))
                .collect();
            next = be.forward_greedy(&mut kv, &chunks)?;
        }
        let decode_secs = t.elapsed().as_secs_f64();
        let after = kv.counters();
        let st = kv.stats();
        let c = &dm.cfg;
        let full = (2 * c.n_layers) as u64
            * ((ctx * c.n_kv_heads * c.head_dim * 2) as u64).div_ceil(after.page_bytes)
            * after.page_bytes
            * b as u64;
        Ok(DecodeRun {
            prefill_tps,
            decode_secs,
            map_secs_decode: after.map_secs - before.map_secs,
            sync_maps_decode: after.sync_maps - before.sync_maps,
            ahead_secs_decode: after.ahead_secs - before.ahead_secs,
            pages_mapped: after.pages_mapped,
            kv_mapped: st.mapped_bytes,
            kv_static: full,
            settings: json!({
                "bf16_inputs": be.bf16_inputs, "att_heads_x": be.att_heads_x,
                "mm_waves": be.mm_waves, "gemv_max": be.gemv_max,
                "attention4": be.attention4, "att_half": be.att_half,
                "norm_gemv": be.norm_gemv, "rope_gemv": be.rope_gemv,
                "sk_tokens": format!("{:?}", be.sk_tokens),
                "glu_one_tokens": format!("{:?}", be.glu_tokens),
                "blaslt_tokens": be.dm.gpu.blaslt_tokens().map(|r| format!("{r:?}")),
            }),
        })
    }

    /// Batch-1 decode with LaRoSA's top-k sparsity against dense decode, side by side.
    fn larosa_runs(
        dm: &mut Arc<DeviceModel>,
        a: &GpuBenchArgs,
        mode: KvMode,
        bw: f64,
    ) -> Result<serde_json::Value> {
        let kernels = larosa_kernels(dm, a, bw)?;
        let dense = decode_run(dm, 1, a.prompt, a.gen, Tune::of(a), mode, None)?;
        let dense_tps = a.gen as f64 / dense.decode_secs;
        let dmm = Arc::get_mut(dm).context("the device model is still shared")?;
        let t = Instant::now();
        dmm.prepare_sparse(&mut |i, n| eprint!("\rLaRoSA: transposing layer {i}/{n}"))?;
        eprintln!(" in {:.2} s", t.elapsed().as_secs_f64());
        let adapters = a.dummy.is_some();
        if adapters {
            dmm.add_dummy_adapters(77)?;
        }
        // The rotated model without sparsity: dense products plus the adapters.
        let rot = decode_run(
            dm,
            1,
            a.prompt,
            a.gen,
            Tune::of(a),
            mode,
            Some(Larosa::new(0.0)),
        )?;
        let rot_tps = a.gen as f64 / rot.decode_secs;
        eprintln!(
            "LaRoSA: dense {dense_tps:.1} tok/s, rotated dense {rot_tps:.1} tok/s (adapters: {adapters})"
        );
        let mut runs = Vec::new();
        for &s in &a.larosa {
            let l = Larosa::new(s);
            let r = decode_run(dm, 1, a.prompt, a.gen, Tune::of(a), mode, Some(l))?;
            let tps = a.gen as f64 / r.decode_secs;
            eprintln!(
                "LaRoSA sparsity {s:.2}: {tps:.1} tok/s, {:.3} ms/step, {:.2}x dense",
                r.decode_secs / a.gen as f64 * 1e3,
                tps / dense_tps
            );
            runs.push(
                json!({"sparsity": s, "coef_in": l.coef_in, "coef_out": l.coef_out,
                "tokens_per_s": tps, "ms_per_step": r.decode_secs / a.gen as f64 * 1e3,
                "speedup_vs_dense": tps / dense_tps, "speedup_vs_rotated_dense": tps / rot_tps}),
            );
        }
        Ok(json!({"batch": 1, "dense_tokens_per_s": dense_tps,
            "topk_cluster": dm.gpu.topk_cluster(), "pdl": dm.gpu.pdl(),
            "selection_pdl": switchyard_engine::cuda::forward::selection_pdl_default(),
            "rotated_dense_tokens_per_s": rot_tps, "dummy_adapters": adapters, "runs": runs,
            "sparse_tile": a.sparse_tile, "sparse_blocks": a.sparse_blocks, "kernels": kernels}))
    }

    /// LaRoSA's kernels alone at the first --larosa sparsity: each sparse product (store)
    /// over the kept inputs at every tile and block target, against the dense GEMV of the
    /// same matrix, and the top-k selections.
    fn larosa_kernels(
        dm: &Arc<DeviceModel>,
        a: &GpuBenchArgs,
        bw: f64,
    ) -> Result<serde_json::Value> {
        use switchyard_engine::cuda::forward::{
            product_secs, sparse_product_secs, topk_secs, ProductKernel,
        };
        let (gpu, c) = (&dm.gpu, &dm.cfg);
        let l = Larosa::new(a.larosa[0]);
        let qd = c.n_heads * c.head_dim;
        // (matrix, rows, cols, output side)
        let shapes = [
            ("q", qd, c.dim, false),
            ("o", c.dim, qd, true),
            ("gate", c.ffn_dim, c.dim, false),
            ("down", c.dim, c.ffn_dim, true),
        ];
        let mut products = Vec::new();
        for (name, rows, cols, out_side) in shapes {
            let keep = l.keep(out_side, cols);
            let dense = product_secs(gpu, rows, cols, 1, ProductKernel::Gemv, 200)?;
            let kept_bytes = (keep * rows * 2) as f64;
            for tile in [512usize, 1024] {
                for blocks in [264usize, 528, 1056] {
                    let secs = sparse_product_secs(gpu, rows, cols, keep, tile, blocks, 200)?;
                    eprintln!(
                        "sparse {name:>4} [{rows}x{cols}] keep {keep} tile {tile} blocks {blocks}: {:.1} us ({:.0} % of copy bandwidth on kept bytes), dense GEMV {:.1} us, {:.2}x",
                        secs * 1e6,
                        100.0 * kept_bytes / secs / bw,
                        dense * 1e6,
                        dense / secs
                    );
                    products.push(json!({"matrix": name, "rows": rows, "cols": cols,
                        "keep": keep, "tile": tile, "blocks": blocks, "secs": secs,
                        "dense_gemv_secs": dense, "speedup_vs_dense": dense / secs,
                        "fraction_of_copy_bandwidth": kept_bytes / secs / bw}));
                }
            }
        }
        let mut selections = Vec::new();
        for (name, d, out_side, norm) in [
            ("rmsnorm+topk (q/k/v, gate/up inputs)", c.dim, false, true),
            ("topk (o input)", qd, true, false),
            ("topk (down input)", c.ffn_dim, true, false),
        ] {
            let k = l.keep(out_side, d);
            let secs = topk_secs(gpu, d, k, norm, 200)?;
            eprintln!("{name}: {d} -> {k}: {:.1} us", secs * 1e6);
            selections.push(json!({"kernel": name, "width": d, "keep": k, "secs": secs}));
        }
        Ok(json!({"sparsity": l.sparsity, "products": products, "selections": selections}))
    }

    fn prefill_run(dm: &Arc<DeviceModel>, p: usize, mma_attention: bool) -> Result<f64> {
        let c = &dm.cfg;
        let mut kv = open_kv(dm, layout(c, 1, p), None, KvMode::Sync)?;
        let mut be = CudaBackend::new(dm.clone());
        be.mma_attention = mma_attention;
        let s = kv.acquire()?;
        let toks = tokens(p, 3, c.vocab_size);
        be.forward_greedy(&mut kv, &[SeqChunk::last_logits(s, 0, &toks)])?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            be.forward_greedy(&mut kv, &[SeqChunk::last_logits(s, 0, &toks)])?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    }

    /// Sequences of a length mix admitted into a fixed KV budget, static vs vAttention.
    /// Lengths: uniform in [64, 2048] tokens (deterministic), context 4096 (or the model's).
    fn fit_runs(dm: &Arc<DeviceModel>, gib: f64) -> Result<serde_json::Value> {
        let c = &dm.cfg;
        let ctx = 4096.min(c.max_context);
        let budget = (gib * (1u64 << 30) as f64) as usize;
        let lens: Vec<usize> = tokens(4096, 11, 1 << 20)
            .iter()
            .map(|&r| 64 + r as usize % (2048 - 64 + 1))
            .collect();
        let mut res = serde_json::Map::new();
        for (name, mode) in [("static", KvMode::Static), ("vattention", KvMode::Sync)] {
            let slots = 512;
            let mut kv = open_kv(dm, layout(c, slots, ctx), Some(budget), mode)?;
            let mut n = 0;
            let t = Instant::now();
            for &l in &lens {
                let s = match kv.acquire() {
                    Ok(s) => s,
                    Err(_) => break,
                };
                if kv.ensure(s, l.min(ctx)).is_err() {
                    kv.release(s);
                    break;
                }
                n += 1;
                if n == slots {
                    break;
                }
            }
            let s = kv.stats();
            let k = kv.counters();
            res.insert(
                name.into(),
                json!({"sequences": n, "mapped_bytes": s.mapped_bytes, "used_bytes": s.used_bytes,
                       "pages_mapped": k.pages_mapped, "map_secs": k.map_secs,
                       "secs": t.elapsed().as_secs_f64()}),
            );
        }
        res.insert("budget_bytes".into(), json!(budget));
        res.insert("context".into(), json!(ctx));
        res.insert("lengths".into(), json!("uniform 64..2048 tokens"));
        Ok(serde_json::Value::Object(res))
    }

    /// GPU vs CPU logits over `n` tokens of a fixed prompt, fed one token at a time after a
    /// prefill: max |diff| relative to the largest |logit|, and greedy agreement.
    fn check_logits(
        dm: &Arc<DeviceModel>,
        m: &switchyard_engine::model::Model,
        n: usize,
    ) -> Result<serde_json::Value> {
        use switchyard_engine::forward::Forward;
        use switchyard_engine::kv::HeapKv;
        let c = &m.cfg;
        let toks = tokens(n, 5, c.vocab_size);
        let lay = layout(c, 1, n + 1);
        let mut gkv = open_kv(dm, lay, None, KvMode::Background)?;
        let mut hkv = HeapKv::new(lay);
        let gs = gkv.acquire()?;
        let hs = hkv.acquire()?;
        let mut be = CudaBackend::new(dm.clone());
        let mut cpu = Forward::new(Arc::new(switchyard_engine::pool::ThreadPool::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )));
        let half = n / 2;
        let mut worst = 0f64;
        let mut agree = 0;
        let mut total = 0;
        let mut cmp = |g: &[f32], h: &[f32]| {
            let scale = h.iter().fold(0f32, |a, &v| a.max(v.abs())) as f64;
            let d = g
                .iter()
                .zip(h)
                .fold(0f64, |a, (&x, &y)| a.max((x - y).abs() as f64));
            worst = worst.max(d / scale.max(1e-6));
            let am = |v: &[f32]| {
                v.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                    .0
            };
            agree += (am(g) == am(h)) as usize;
            total += 1;
        };
        // A prefill chunk with logits for every row, then single steps.
        let ch = SeqChunk {
            slot: gs,
            pos: 0,
            tokens: &toks[..half],
            logits_from: 0,
        };
        let g = be.forward_logits(&mut gkv, &[ch])?.to_vec();
        let h = cpu
            .forward(m, &mut hkv, &[SeqChunk { slot: hs, ..ch }])?
            .to_vec();
        for (gr, hr) in g.chunks(c.vocab_size).zip(h.chunks(c.vocab_size)) {
            cmp(gr, hr);
        }
        for p in half..n {
            let t = [toks[p]];
            let g = be
                .forward_logits(&mut gkv, &[SeqChunk::last_logits(gs, p, &t)])?
                .to_vec();
            let h = cpu
                .forward(m, &mut hkv, &[SeqChunk::last_logits(hs, p, &t)])?
                .to_vec();
            cmp(&g, &h);
        }
        Ok(
            json!({"tokens": n, "rows": total, "max_abs_diff_over_max_logit": worst,
                  "argmax_agreement": agree as f64 / total as f64}),
        )
    }
}
