//! The CUDA backend and the vAttention allocator on a GPU.
//!
//! These need an NVIDIA GPU. Without one (CI) each test says so and returns, unless
//! SWITCHYARD_REQUIRE_CUDA is set, when a missing GPU fails them: the GPU runs set it
//! (`scripts/gpu-tests.sh`).

use std::sync::Arc;

use switchyard_engine::backend::Device;
use switchyard_engine::cuda::forward::{CudaBackend, DeviceModel};
use switchyard_engine::cuda::kv::KvMode;
use switchyard_engine::cuda::{open_kv, Gpu};
use switchyard_engine::forward::{Forward, SeqChunk};
use switchyard_engine::kv::{HeapKv, KvAllocator, KvLayout};
use switchyard_engine::model::{Config, Model, RopeStyle};
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::{Engine, EngineOptions, GenerateRequest};
use switchyard_tests::*;

/// A seeded generator of uniform numbers in [0, 1) (64-bit LCG, the top 24 bits).
fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// [`uniform`] mapped to [-1, 1).
fn signed_uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut u = uniform(seed);
    move || u() * 2.0 - 1.0
}

fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("SWITCHYARD_REQUIRE_CUDA").is_none() => {
            eprintln!("skipped (no usable GPU): {e}");
            None
        }
        Err(e) => panic!("SWITCHYARD_REQUIRE_CUDA is set but: {e}"),
    }
}

fn reference_ids() -> Vec<u32> {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stories_dir().join("reference_greedy.json")).unwrap(),
    )
    .unwrap();
    j["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn stories_golden_text_on_the_gpu() {
    if gpu().is_none() {
        return;
    }
    let ids = reference_ids();
    for path in [stories_dir(), stories_dir().join("stories260K.f32.gguf")] {
        let opts = EngineOptions {
            threads: 1,
            device: Device::Cuda(0),
            ..Default::default()
        };
        let mut e = Engine::load(&path, opts, &mut |_, _| {}).unwrap();
        assert!(e.backend_name().starts_with("cuda"), "{}", e.backend_name());
        assert_eq!(e.kv.name(), "vattention-cuda");
        let req = GenerateRequest {
            prompt: vec![1],
            max_tokens: 200,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let out = e.generate(&req, &mut |_| {}).unwrap();
        // bf16 weights and K/V on the device against llama2.c's f32 reference: greedy ids
        // must agree for at least the first 150 of 200 tokens (they agreed on 200 with one
        // attention kernel and on 185 with the current one: a near-tie late in the text).
        let want = &ids[ids.len() - 200..];
        let same = out
            .tokens
            .iter()
            .zip(want)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{}: {same} of 200 greedy ids equal the reference",
            path.display()
        );
        assert!(
            same >= 150,
            "{}: greedy ids diverge at token {same}:\n got {:?}\nwant {:?}",
            path.display(),
            out.tokens,
            want
        );
    }
}

/// GPU logits vs the CPU backend's on the same weights (bf16 on the device), prefill rows
/// and single steps, both RoPE pairings.
#[test]
fn gpu_logits_match_the_cpu() {
    let Some(g) = gpu() else { return };
    for path in [stories_dir(), stories_dir().join("stories260K.f32.gguf")] {
        let (m, _src) = Model::load(&path, &mut |_, _| {}).unwrap();
        let dm = Arc::new(DeviceModel::upload(g.clone(), &m, &mut |_, _| {}).unwrap());
        let toks: Vec<u32> = (0..96u32).map(|i| (i * 37 + 5) % 512).collect();
        let lay = KvLayout {
            n_layers: m.cfg.n_layers,
            kv_heads: m.cfg.n_kv_heads,
            head_dim: m.cfg.head_dim,
            max_context: 128,
            max_slots: 2,
        };
        let mut gkv = open_kv(&dm, lay, None, KvMode::Background).unwrap();
        let mut hkv = HeapKv::new(lay);
        let gs = gkv.acquire().unwrap();
        let hs = hkv.acquire().unwrap();
        let mut be = CudaBackend::new(dm.clone());
        let mut cpu = Forward::new(Arc::new(switchyard_engine::pool::ThreadPool::new(2)));
        let ch = SeqChunk {
            slot: gs,
            pos: 0,
            tokens: &toks[..64],
            logits_from: 0,
        };
        let g_rows = be.forward_logits(&mut gkv, &[ch]).unwrap().to_vec();
        let h_rows = cpu
            .forward(&m, &mut hkv, &[SeqChunk { slot: hs, ..ch }])
            .unwrap()
            .to_vec();
        let mut rows = vec![(g_rows, h_rows)];
        for p in 64..96 {
            let t = [toks[p]];
            let gr = be
                .forward_logits(&mut gkv, &[SeqChunk::last_logits(gs, p, &t)])
                .unwrap()
                .to_vec();
            let hr = cpu
                .forward(&m, &mut hkv, &[SeqChunk::last_logits(hs, p, &t)])
                .unwrap()
                .to_vec();
            rows.push((gr, hr));
        }
        let v = m.cfg.vocab_size;
        let mut worst = 0f32;
        let mut agree = 0;
        let mut n = 0;
        for (gr, hr) in &rows {
            assert_eq!(gr.len(), hr.len());
            for (a, b) in gr.chunks(v).zip(hr.chunks(v)) {
                let scale = b.iter().fold(0f32, |s, x| s.max(x.abs()));
                let d = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
                worst = worst.max(d / scale);
                let am = |r: &[f32]| {
                    (0..r.len())
                        .max_by(|&i, &j| r[i].total_cmp(&r[j]).then(j.cmp(&i)))
                        .unwrap()
                };
                agree += (am(a) == am(b)) as usize;
                n += 1;
            }
        }
        eprintln!(
            "{}: max |gpu - cpu| / max |logit| = {worst:.2e}, argmax agreement {agree}/{n}",
            path.display()
        );
        assert_eq!(n, 64 + 32);
        assert!(worst < 3e-2, "GPU logits differ by {worst} of the largest");
        assert!(
            agree * 100 >= n * 95,
            "argmax agrees on {agree} of {n} rows"
        );
    }
}

fn dummy_cfg() -> Config {
    // Llama-2-7B's attention shapes, two layers, small FFN: K/V of one token and layer is
    // 8 KiB, so a 2 MiB page holds 256 tokens.
    Config {
        dim: 4096,
        n_layers: 2,
        n_heads: 32,
        n_kv_heads: 32,
        head_dim: 128,
        ffn_dim: 1024,
        vocab_size: 512,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        max_context: 1024,
        rope: RopeStyle::Half,
    }
}

/// The KV layout of `dummy_cfg`'s attention (2 layers, 32 heads of 128: 8 KiB per token
/// and layer, 256 tokens per 2 MiB page).
fn dummy_layout(max_context: usize, max_slots: usize) -> KvLayout {
    KvLayout {
        n_layers: 2,
        kv_heads: 32,
        head_dim: 128,
        max_context,
        max_slots,
    }
}

/// A kernel writes `n` bf16 values at device address `at` (through whatever is mapped
/// there); the bytes read back must equal the same kernel's output in a plain allocation.
fn assert_kernel_writes_hold(g: &Arc<Gpu>, at: u64, n: usize, seed: u32, what: &str) {
    let plain = g.alloc(n * 2).unwrap();
    // SAFETY: the caller maps `at .. at + 2n`; `plain` holds 2n bytes.
    unsafe {
        g.fill_random_at(at, n, seed, 1.0).unwrap();
        g.fill_random_at(plain.ptr, n, seed, 1.0).unwrap();
        let a = g.read_at(at, n * 2).unwrap();
        let b = g.read_at(plain.ptr, n * 2).unwrap();
        assert!(a == b, "bytes written through {what} differ");
    }
}

/// Greedy decode of two sequences past two page boundaries: identical ids with the
/// vAttention and static allocators (the kernels read K/V through the mapped pages).
#[test]
fn vattention_and_static_give_identical_greedy_ids_across_pages() {
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 3).unwrap());
    let lay = dummy_layout(1024, 2);
    let mut outs = Vec::new();
    for mode in [KvMode::Background, KvMode::Sync, KvMode::Static] {
        let mut kv = open_kv(&dm, lay, None, mode).unwrap();
        let mut be = CudaBackend::new(dm.clone());
        let s: Vec<usize> = (0..2).map(|_| kv.acquire().unwrap()).collect();
        let p0: Vec<u32> = (0..40u32).map(|i| (i * 13) % 512).collect();
        let p1: Vec<u32> = (0..70u32).map(|i| (i * 29 + 1) % 512).collect();
        let mut next = be
            .forward_greedy(
                &mut kv,
                &[
                    SeqChunk::last_logits(s[0], 0, &p0),
                    SeqChunk::last_logits(s[1], 0, &p1),
                ],
            )
            .unwrap();
        let mut ids = vec![next.clone()];
        let (mut a, mut b) = (p0.len(), p1.len());
        while b < 600 {
            let (t0, t1) = ([next[0]], [next[1]]);
            next = be
                .forward_greedy(
                    &mut kv,
                    &[
                        SeqChunk::last_logits(s[0], a, &t0),
                        SeqChunk::last_logits(s[1], b, &t1),
                    ],
                )
                .unwrap();
            ids.push(next.clone());
            a += 1;
            b += 1;
        }
        kv.settle();
        let c = kv.counters();
        eprintln!(
            "{}: {} pages mapped, stats {:?}",
            kv.name(),
            c.pages_mapped,
            kv.stats()
        );
        if mode != KvMode::Static {
            // 600 tokens of 8 KiB in 2 MiB pages: 3 pages per region (+1 ahead) for the
            // longer sequence, 4 regions.
            assert_eq!(c.page_bytes, 2 << 20, "the H100/H200 granularity");
            assert!(kv.capacity(s[1]) >= 600);
            assert!(kv.stats().mapped_bytes < 2 * 4 * 4 * (2 << 20) + 1);
        }
        outs.push(ids);
    }
    assert_eq!(
        outs[0], outs[2],
        "vAttention (background) and static give the same ids"
    );
    assert_eq!(
        outs[1], outs[2],
        "vAttention (sync) and static give the same ids"
    );
}

/// Decode steps of five batch widths, each width met four times, with room for three
/// captured graphs: the cache stays within its cap (least recently used dropped) and the
/// greedy ids equal those of the same steps run without graphs.
#[test]
fn graph_cache_is_capped_and_replays_the_right_shapes() {
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 7).unwrap());
    let run = |graphs: bool| -> (Vec<Vec<u32>>, usize) {
        let mut kv = open_kv(&dm, dummy_layout(256, 5), None, KvMode::Sync).unwrap();
        let mut be = CudaBackend::new(dm.clone());
        be.graphs_enabled = graphs;
        be.graph_cache_max = 3;
        let s: Vec<usize> = (0..5).map(|_| kv.acquire().unwrap()).collect();
        let mut pos = [0usize; 5];
        let mut last: Vec<[u32; 1]> = (0..5u32).map(|i| [i * 37 % 512]).collect();
        let mut ids = Vec::new();
        let mut most = 0;
        for _round in 0..4 {
            for w in 1..=5 {
                let chunks: Vec<SeqChunk> = (0..w)
                    .map(|i| SeqChunk::last_logits(s[i], pos[i], &last[i]))
                    .collect();
                let next = be.forward_greedy(&mut kv, &chunks).unwrap();
                for i in 0..w {
                    pos[i] += 1;
                    last[i] = [next[i]];
                }
                most = most.max(be.cached_graphs());
                ids.push(next);
            }
        }
        (ids, most)
    };
    let (with, most) = run(true);
    let (without, none) = run(false);
    eprintln!("graphs kept at most: {most}");
    assert_eq!(none, 0);
    assert!(most > 0 && most <= 3, "{most} graphs kept, cap 3");
    assert_eq!(with, without, "graph replays give the eager steps' ids");
}

/// Logits of a fixed run of passes on `dm` (`dummy_cfg` shapes) by a backend that `setup`
/// adjusts: a prefill of 12 prompts (70, 5 and 1 tokens: tiled and per-row attention,
/// cuBLAS products), 12 chunks of 3 tokens (36 rows, per-row attention, cuBLAS), then
/// three rounds of greedy decode steps 1, 4, 8 and 12 sequences wide (GEMV, then cuBLAS or
/// the split-K products where `setup` turns them on).
fn mixed_passes(dm: &Arc<DeviceModel>, setup: impl Fn(&mut CudaBackend)) -> Vec<Vec<f32>> {
    mixed_passes_fed(dm, setup, true)
}

/// [`mixed_passes`], each decode step fed its own argmax (`greedy`) or tokens fixed in
/// advance: paths whose sums are formed in another order compare logits on the same
/// tokens (random weights give near-ties, and one flipped argmax sends the sequences apart).
fn mixed_passes_fed(
    dm: &Arc<DeviceModel>,
    setup: impl Fn(&mut CudaBackend),
    greedy: bool,
) -> Vec<Vec<f32>> {
    let mut kv = open_kv(dm, dummy_layout(256, 12), None, KvMode::Sync).unwrap();
    let mut be = CudaBackend::new(dm.clone());
    setup(&mut be);
    let s: Vec<usize> = (0..12).map(|_| kv.acquire().unwrap()).collect();
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|i| {
            (0..[70, 5, 1][i as usize % 3])
                .map(|j| (i * 31 + j * 7) % 512)
                .collect()
        })
        .collect();
    let chunks: Vec<SeqChunk> = (0..12)
        .map(|i| SeqChunk::last_logits(s[i], 0, &prompts[i]))
        .collect();
    let mut out = vec![be.forward_logits(&mut kv, &chunks).unwrap().to_vec()];
    let mut pos: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let threes: Vec<Vec<u32>> = (0..12u32)
        .map(|i| (0..3).map(|j| (i * 13 + j * 5 + 1) % 512).collect())
        .collect();
    let chunks: Vec<SeqChunk> = (0..12)
        .map(|i| SeqChunk::last_logits(s[i], pos[i], &threes[i]))
        .collect();
    out.push(be.forward_logits(&mut kv, &chunks).unwrap().to_vec());
    for p in pos.iter_mut() {
        *p += 3;
    }
    let mut last: Vec<[u32; 1]> = (0..12u32).map(|i| [i * 41 % 512]).collect();
    for round in 0..3u32 {
        for w in [1, 4, 8, 12] {
            let chunks: Vec<SeqChunk> = (0..w)
                .map(|i| SeqChunk::last_logits(s[i], pos[i], &last[i]))
                .collect();
            let logits = be.forward_logits(&mut kv, &chunks).unwrap().to_vec();
            for i in 0..w {
                pos[i] += 1;
                let row = &logits[i * 512..(i + 1) * 512];
                let best = (0..512).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                last[i] = if greedy {
                    [best as u32]
                } else {
                    [(i as u32 * 17 + round * 29 + w as u32 * 3 + 5) % 512]
                };
            }
            out.push(logits);
        }
    }
    out
}

/// Every pass of `got` against the same pass of `want` (as [`mixed_passes_fed`] returns
/// them): the logits within 5e-3 of the pass's largest logit (bf16 tolerance for sums
/// formed in another order). Returns the worst max |diff| / max |logit|; `what` names the
/// path in the failure message.
fn assert_passes_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) -> f32 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |s, x| s.max(x.abs()));
        let d = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
        worst = worst.max(d / scale);
        assert!(
            d <= 5e-3 * scale,
            "pass {i}: {what}: logits differ by {d} (largest logit {scale})"
        );
    }
    worst
}

/// The kernels before cuBLAS products write their inputs rounded to bf16 (RMSNorm, decode
/// attention, SiLU·up) instead of a conversion pass; decode attention may run its blocks
/// head-fastest, and heads up to 128 wide take the kernels made for them (one half per
/// lane, next positions prefetched): the same roundings of the same values in the same
/// order, so every pass's logits must equal those of the conversion passes,
/// sequence-fastest blocks and the 256-wide kernels bit for bit.
#[test]
fn bf16_inputs_and_attention_variants_give_the_same_logits() {
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 13).unwrap());
    let run = |(bf16_inputs, heads_x, half): (bool, bool, bool)| {
        mixed_passes(&dm, |be| {
            // Without bf16 inputs gate and up run as a pair: compare like with like.
            be.glu_tokens = switchyard_engine::cuda::forward::NO_TOKENS;
            be.bf16_inputs = bf16_inputs;
            be.att_heads_x = heads_x;
            be.att_half = half;
        })
    };
    let base = run((false, false, false));
    for v in [
        (true, false, false),
        (false, true, false),
        (false, false, true),
        (true, true, true),
    ] {
        let other = run(v);
        assert_eq!(base.len(), other.len());
        for (i, (a, b)) in base.iter().zip(&other).enumerate() {
            assert!(
                a == b,
                "pass {i}: logits differ with (bf16 inputs, head-major, half-width) {v:?}"
            );
        }
    }
}

/// At one token the GEMVs take the raw residual and apply RMSNorm themselves (sum of
/// squares on the way, weight on the inputs, 1/rms on the sums), and the Q/K/V GEMV also
/// applies RoPE and writes K/V to the cache (its blocks take the two rotated pairs of one
/// head's frequencies): the same values as the RMSNorm kernel, the product and `rope_kv`,
/// up to f32 rounding (the sums are formed in another order). K/V are stored as bf16, so a
/// rounding difference can move a cached value by one bf16 step and later passes see it:
/// the logits of every pass must agree within 5e-3 of the largest logit (bf16 tolerance,
/// 2.2e-3 measured on the H200), and the greedy tokens chosen between passes must be the
/// same (else the passes diverge). A row or cache slot written wrong fails it by far.
#[test]
fn rmsnorm_and_rope_in_the_gemv_match_the_kernels() {
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 17).unwrap());
    let plain = mixed_passes_fed(&dm, |be| be.norm_gemv = false, false);
    for (norm, rope) in [(true, true), (true, false)] {
        let fused = mixed_passes_fed(
            &dm,
            |be| {
                be.norm_gemv = norm;
                be.rope_gemv = rope;
            },
            false,
        );
        let worst = assert_passes_close(&fused, &plain, &format!("RoPE in the GEMV {rope}"));
        // The one-sequence decode passes went through the fused kernels: their logits are
        // not bit-identical (else the test would not see the fused path at all).
        assert!(fused != plain, "no pass took the fused GEMV (RoPE {rope})");
        eprintln!(
            "fused RMSNorm (RoPE {rope}) vs the kernels: max |diff| / max |logit| = {worst:.2e}"
        );
    }
}

/// The products at 3-8 tokens by default (SWITCHYARD_SK unset or "auto"): the stream-K kernels over the
/// fragment-layout weight copies, when the model has them. Against cuBLAS on the same passes (decode steps
/// 4 and 8 wide take them; the sums are formed in another order): every pass's logits
/// within 5e-3 of its largest logit, and not bit-identical (else sk never ran).
#[test]
fn stream_k_products_at_3_to_8_tokens_match_cublas() {
    use switchyard_engine::cuda::forward::{NO_TOKENS, SK_AUTO_TOKENS};
    let Some(g) = gpu() else { return };
    let mut dm = DeviceModel::dummy(g.clone(), dummy_cfg(), 19).unwrap();
    assert!(!dm.has_tiled());
    dm.prepare_tiled(&mut |_, _| {}).unwrap();
    assert!(dm.has_tiled());
    let dm = Arc::new(dm);
    // The default (SWITCHYARD_SK unset or "auto") takes them on a model with the copies.
    if std::env::var("SWITCHYARD_SK").map_or(true, |v| v == "auto") {
        assert_eq!(CudaBackend::new(dm.clone()).sk_tokens, SK_AUTO_TOKENS);
    }
    let blas = mixed_passes_fed(&dm, |be| be.sk_tokens = NO_TOKENS, false);
    let sk = mixed_passes_fed(&dm, |be| be.sk_tokens = SK_AUTO_TOKENS, false);
    let worst = assert_passes_close(&sk, &blas, "stream-K against cuBLAS");
    assert!(sk != blas, "no pass took the stream-K products");
    eprintln!("stream-K vs cuBLAS: max |diff| / max |logit| = {worst:.2e}");
}

/// Gate and up live side by side in one allocation on the device (`join_glu`), so cuBLAS
/// can run a gated unit as one product twice as wide, SiLU·up reading its two halves.
/// Every cuBLAS pass of the mixed passes (304 and 36 tokens, decode steps 4, 8 and 12)
/// taking it must give the logits of the batched pair within 5e-3 of the largest logit
/// (cuBLAS may sum in another order for the wider shape); a half read from the wrong place
/// misses by far.
#[test]
fn joined_gate_up_product_matches_the_pair() {
    use switchyard_engine::cuda::forward::NO_TOKENS;
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 23).unwrap());
    assert!(dm.glu_joined(), "gate and up were not joined on upload");
    let pair = mixed_passes_fed(&dm, |be| be.glu_tokens = NO_TOKENS, false);
    let one = mixed_passes_fed(&dm, |be| be.glu_tokens = 1..=4096, false);
    let worst = assert_passes_close(&one, &pair, "the joined gate|up product");
    eprintln!("joined gate|up vs the pair: max |diff| / max |logit| = {worst:.2e}");
}

/// Decode attention with half a warp per position (8 dimensions a lane) against the
/// warp-per-position kernel on the same passes (the sums form in another order): every
/// pass's logits within 5e-3 of its largest logit; a position skipped, counted twice or
/// mixed up between the halves misses by far.
#[test]
fn half_warp_decode_attention_matches_the_warp_kernel() {
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 29).unwrap());
    let warp = mixed_passes_fed(&dm, |be| be.att_hw = false, false);
    let half = mixed_passes_fed(&dm, |be| be.att_hw = true, false);
    let worst = assert_passes_close(&half, &warp, "half-warp attention");
    assert!(half != warp, "no pass took the half-warp attention");
    eprintln!("half-warp vs warp decode attention: max |diff| / max |logit| = {worst:.2e}");
}

/// Programmatic dependent launch lets each kernel start (and stream its weights) before the
/// previous one ends; every kernel waits for its predecessor before touching its data. A
/// missing or misplaced wait is a race: the logits of prefill chunks (tiled and per-row
/// attention), the GEMV (1), cuBLAS (4, 8, 12; its inputs written as bf16 by the kernels
/// before it) and the split-K products (4 and 8 tokens when turned on), eager and as graph
/// replays, must equal those of plain launches bit for bit.
#[test]
fn programmatic_dependent_launch_gives_the_plain_launches_logits() {
    let Some(g) = gpu() else { return };
    if g.cc.0 < 9 {
        eprintln!(
            "skipped: programmatic dependent launch needs sm_90 ({:?})",
            g.cc
        );
        return;
    }
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 11).unwrap());
    // The default products (GEMV, cuBLAS), then the split-K kernels at 3-8 tokens.
    for split_k in [false, true] {
        let run = |pdl: bool| -> Vec<Vec<f32>> {
            g.set_pdl(pdl);
            assert_eq!(g.pdl(), pdl);
            mixed_passes(&dm, |be| {
                if split_k {
                    be.mm_tokens = 3..=8;
                }
            })
        };
        let plain = run(false);
        let pdl = run(true);
        g.set_pdl(true);
        assert_eq!(plain.len(), pdl.len());
        for (i, (a, b)) in plain.iter().zip(&pdl).enumerate() {
            assert!(
                a == b,
                "pass {i} (split-K {split_k}): logits differ with programmatic dependent launch"
            );
        }
    }
}

/// A kernel writes through the mapped pages of a slot (crossing page boundaries); the bytes
/// read back equal the same kernel's output in a plain allocation. Then a randomized
/// acquire/grow/release sequence is checked against a model of what must be mapped.
#[test]
fn vattention_pages_hold_kernel_writes_and_follow_the_model() {
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 5).unwrap());
    let lay = dummy_layout(1024, 4);
    let page = 2usize << 20;
    let tok = 32 * 128 * 2;
    let mut kv = open_kv(&dm, lay, Some(64 * page), KvMode::Sync).unwrap();
    let s = kv.acquire().unwrap();
    kv.ensure(s, 700).unwrap(); // 3 pages needed, 4 mapped (one ahead)
    let (k, _) = kv.kv(1, s);
    let n = 700 * tok / 2;
    assert_kernel_writes_hold(&g, k as usize as u64, n, 42, "the mapped pages");
    kv.release(s);

    // Randomized model check (budget of 64 pages, 4 regions, 4 pages per slot per region).
    let full = 1024 * tok / page; // 4
    let regions = 4;
    let mut mapped = [0usize; 4];
    let mut live = [false; 4];
    let mut rng = 12345u64;
    let mut r = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut kv = open_kv(&dm, lay, Some(64 * page), KvMode::Sync).unwrap();
    for _ in 0..400 {
        let op = r() % 3;
        if op == 0 {
            // acquire: the idle slot with the most pages (lowest index on ties)
            match kv.acquire() {
                Ok(s) => {
                    let want = (0..4)
                        .filter(|&i| !live[i])
                        .max_by_key(|&i| (mapped[i], std::cmp::Reverse(i)))
                        .unwrap();
                    assert_eq!(s, want);
                    live[s] = true;
                }
                Err(_) => assert!(live.iter().all(|&l| l)),
            }
        } else if op == 1 {
            let ls: Vec<usize> = (0..4).filter(|&i| live[i]).collect();
            if ls.is_empty() {
                continue;
            }
            let s = ls[r() as usize % ls.len()];
            let n = 1 + r() as usize % 1024;
            kv.ensure(s, n).unwrap();
            let need = (n * tok).div_ceil(page).min(full);
            if need > mapped[s] {
                mapped[s] = (need + 1).min(full);
            }
        } else {
            let ls: Vec<usize> = (0..4).filter(|&i| live[i]).collect();
            if ls.is_empty() {
                continue;
            }
            let s = ls[r() as usize % ls.len()];
            kv.release(s);
            live[s] = false;
        }
        let st = kv.stats();
        let want: usize = mapped.iter().sum::<usize>() * regions * page;
        assert_eq!(
            st.mapped_bytes as usize, want,
            "mapped bytes follow the model"
        );
        assert_eq!(st.slots_in_use, live.iter().filter(|&&l| l).count());
    }

    // Exhaustion: with 12 pages, the first sequence maps 2 per region (one ahead), the
    // second only the 1 it needs, the third finds none and gets a clear error; releasing
    // the first lets the third take its pages.
    let mut kv = open_kv(&dm, lay, Some(12 * page), KvMode::Sync).unwrap();
    let a = kv.acquire().unwrap();
    kv.ensure(a, 100).unwrap();
    assert_eq!(kv.stats().mapped_bytes as usize, 8 * page);
    let b = kv.acquire().unwrap();
    kv.ensure(b, 100).unwrap();
    assert_eq!(kv.stats().mapped_bytes as usize, 12 * page);
    let c = kv.acquire().unwrap();
    let e = kv.ensure(c, 100).unwrap_err().to_string();
    assert!(e.contains("out of KV-cache memory"), "{e}");
    kv.release(a);
    kv.ensure(c, 100).unwrap();
    assert!(kv.counters().pages_unmapped >= 4);
}

/// The mapping thread: eight sequences grow token by token in interleaved order while the
/// thread maps ahead; every `ensure` succeeds, the counters agree with what is mapped, each
/// slot ends one page ahead of its tokens, and bytes a kernel writes through pages the
/// thread mapped read back intact.
#[test]
fn background_mapping_keeps_slots_ahead_and_pages_hold_writes() {
    let Some(g) = gpu() else { return };
    let dm = Arc::new(DeviceModel::dummy(g.clone(), dummy_cfg(), 5).unwrap());
    let lay = dummy_layout(2048, 8);
    let page = 2usize << 20;
    let tok = 32 * 128 * 2; // 256 tokens per page
    let mut kv = open_kv(&dm, lay, None, KvMode::Background).unwrap();
    let slots: Vec<usize> = (0..8).map(|_| kv.acquire().unwrap()).collect();
    for n in 1..=1500 {
        for (i, &s) in slots.iter().enumerate() {
            // Slots grow at different rates so they cross pages at different steps.
            let len = (n * (i + 1)).div_ceil(8).max(1);
            kv.ensure(s, len).unwrap();
            assert!(kv.capacity(s) >= len, "slot {s} holds {len} tokens");
        }
    }
    kv.settle();
    let c = kv.counters();
    let regions = 4;
    let mut total = 0;
    for (i, &s) in slots.iter().enumerate() {
        let len = (1500 * (i + 1)).div_ceil(8);
        let need = (len * tok).div_ceil(page);
        let full = 2048 * tok / page;
        assert_eq!(
            kv.mapped_pages(s),
            (need + 1).min(full),
            "slot {s}: one page ahead"
        );
        total += kv.mapped_pages(s);
    }
    assert_eq!(c.pages_mapped as usize, total * regions);
    assert_eq!(kv.stats().mapped_bytes as usize, total * regions * page);
    let p = kv.stats().pages.unwrap();
    assert_eq!(p.mapped, c.pages_mapped);
    eprintln!(
        "{} pages mapped, {} calls waited ({:.2} ms), {:.2} ms mapped ahead",
        c.pages_mapped,
        c.sync_maps,
        c.map_secs * 1e3,
        c.ahead_secs * 1e3
    );
    assert!(c.ahead_secs > 0.0, "the thread mapped pages");

    // Kernel writes through the longest slot's pages (most mapped by the thread).
    let s = slots[7];
    let (k, _) = kv.kv(1, s);
    let n = 1500 * tok / 2;
    assert_kernel_writes_hold(&g, k as usize as u64, n, 7, "background-mapped pages");
    for s in slots {
        kv.release(s);
    }
}

/// The device's top-k keeps exactly the k largest |x|, ties broken by the lowest index,
/// like the CPU plugin's `top_k` (checked against a sort on the host).
#[test]
fn larosa_topk_matches_a_host_sort() {
    let Some(g) = gpu() else { return };
    let mut rng = 99u64;
    let mut r = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (d, k) in [
        (4096, 2785),
        (11008, 5723),
        // Wider FFNs (Qwen2-7B 18,944; Llama-2-70B 28,672): the 12 and 16 values per
        // thread variants.
        (18944, 9850),
        (28672, 14909),
        (576, 400),
        (64, 1),
        (100, 100),
        (33, 7),
    ] {
        // Few distinct magnitudes in some rows so that ties matter.
        let levels = if d % 2 == 0 { 1 << 20 } else { 5 };
        let x: Vec<f32> = (0..d)
            .map(|_| {
                let v = (r() % levels) as f32 / levels as f32 + 1e-3;
                if r() % 2 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| x[b].abs().total_cmp(&x[a].abs()).then(a.cmp(&b)));
        let mut want: Vec<i32> = order[..k].iter().map(|&i| i as i32).collect();
        want.sort();
        // Over a cluster of blocks (sm_90+) and one block per row.
        let was = g.topk_cluster();
        for cluster in [true, false] {
            g.set_topk_cluster(cluster);
            let got = switchyard_engine::cuda::forward::topk_indices(&g, &x, k);
            g.set_topk_cluster(was);
            assert_eq!(got.unwrap(), want, "top-{k} of {d} (cluster {cluster})");
        }
    }
}

/// RMSNorm and top-k in one kernel (the LaRoSA path's input side): the kept values are
/// the normalized ones, exactly k of them in ascending index order, and none dropped is
/// larger than one kept (against an f64 host RMSNorm; equal up to the sum's rounding).
#[test]
fn larosa_rmsnorm_topk_matches_the_host() {
    use switchyard_engine::cuda::forward::norm_topk;
    let Some(g) = gpu() else { return };
    let mut rnd = signed_uniform(5);
    for (d, k) in [
        (4096usize, 3276usize),
        (576, 460),
        (2048, 1),
        (11008, 7485),
        (18944, 12882),
        (96, 96),
    ] {
        let x: Vec<f32> = (0..d).map(|_| rnd() * 3.0).collect();
        let w: Vec<f32> = (0..d).map(|_| 0.5 + rnd().abs()).collect();
        let eps = 1e-5f32;
        let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        let want: Vec<f64> = (0..d).map(|i| x[i] as f64 * inv * w[i] as f64).collect();
        let was = g.topk_cluster();
        for cluster in [true, false] {
            g.set_topk_cluster(cluster);
            let got = norm_topk(&g, &x, &w, eps, k);
            g.set_topk_cluster(was);
            check_norm_topk(d, k, &want, got.unwrap(), cluster);
        }
    }
}

/// [`larosa_rmsnorm_topk_matches_the_host`]'s checks of one selection.
fn check_norm_topk(
    d: usize,
    k: usize,
    want: &[f64],
    (idx, val): (Vec<i32>, Vec<f32>),
    cluster: bool,
) {
    assert_eq!(idx.len(), k, "d {d} (cluster {cluster})");
    assert!(idx.windows(2).all(|p| p[0] < p[1]), "d {d}: not ascending");
    let mut kept = vec![false; d];
    for (&i, &v) in idx.iter().zip(&val) {
        let e = want[i as usize];
        assert!(
            (v as f64 - e).abs() <= 1e-5 * e.abs().max(1e-3),
            "d {d} [{i}]: {v} vs {e}"
        );
        kept[i as usize] = true;
    }
    let min_kept = (0..d)
        .filter(|&i| kept[i])
        .map(|i| want[i].abs())
        .fold(f64::MAX, f64::min);
    let max_dropped = (0..d)
        .filter(|&i| !kept[i])
        .map(|i| want[i].abs())
        .fold(0f64, f64::max);
    assert!(
        max_dropped <= min_kept * (1.0 + 1e-5),
        "d {d} k {k} (cluster {cluster}): dropped {max_dropped} above kept {min_kept}"
    );
}

/// LaRoSA's sparse products (`sparse_mm512/1024`: Q/K/V in one launch, the residual
/// add, the gated unit) against an f64 host sum over the kept inputs, with output counts
/// off the tiles and off the 8-output lanes, and the kept inputs in one split or many.
#[test]
fn sparse_products_match_a_host_reference() {
    use switchyard_engine::cuda::forward::{sparse_product, Epilogue};
    let Some(g) = gpu() else { return };
    let bf = |v: f32| half::bf16::from_f32(v);
    let mut rnd = signed_uniform(23);
    for (cols, rows, keep) in [
        (576usize, [576usize, 192, 192], 300usize),
        (2048, [2752, 1024, 1024], 1100),
        // Output counts off the 8-output lanes (stories260K's 172), padded as prepared.
        (172, [100, 172, 172], 90),
    ] {
        // Transposed weights: mats[m][i * rows + o] is W_m[o, i].
        let mats: Vec<Vec<u16>> = rows
            .iter()
            .map(|&r| (0..r * cols).map(|_| bf(rnd() * 0.1).to_bits()).collect())
            .collect();
        let idx: Vec<i32> = (0..keep).map(|j| ((j * cols) / keep) as i32).collect();
        let val: Vec<f32> = (0..keep).map(|_| rnd()).collect();
        let reference = |m: usize| -> Vec<f32> {
            let r = rows[m];
            (0..r)
                .map(|o| {
                    idx.iter()
                        .zip(&val)
                        .map(|(&i, &v)| {
                            let w = half::bf16::from_bits(mats[m][i as usize * r + o]).to_f32();
                            w as f64 * v as f64
                        })
                        .sum::<f64>() as f32
                })
                .collect()
        };
        let refs: Vec<Vec<f32>> = (0..3).map(reference).collect();
        let close = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1e-3f32, |s, v| s.max(v.abs()));
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "{what} cols {cols} [{i}]: {a} vs {b}"
                );
            }
        };
        let three: Vec<(&[u16], usize)> = mats
            .iter()
            .zip(rows)
            .map(|(m, r)| (m.as_slice(), r))
            .collect();
        for tile in [512usize, 1024] {
            for blocks in [1usize, 528] {
                let at = format!("tile {tile} blocks {blocks}");
                let got = sparse_product(
                    &g,
                    &three,
                    cols,
                    &idx,
                    &val,
                    tile,
                    blocks,
                    Epilogue::Store,
                    None,
                )
                .unwrap();
                for m in 0..3 {
                    close(&got[m], &refs[m], &format!("{at}: product {m}"));
                }
                let y0: Vec<f32> = (0..rows[0]).map(|_| rnd()).collect();
                let got = sparse_product(
                    &g,
                    &three[..1],
                    cols,
                    &idx,
                    &val,
                    tile,
                    blocks,
                    Epilogue::Add,
                    Some(&y0),
                )
                .unwrap();
                let want: Vec<f32> = y0.iter().zip(&refs[0]).map(|(a, b)| a + b).collect();
                close(&got[0], &want, &format!("{at}: residual add"));
                let got = sparse_product(
                    &g,
                    &three[1..],
                    cols,
                    &idx,
                    &val,
                    tile,
                    blocks,
                    Epilogue::Glu,
                    None,
                )
                .unwrap();
                let want: Vec<f32> = (0..rows[1])
                    .map(|o| {
                        let a = refs[1][o];
                        a / (1.0 + (-a).exp()) * refs[2][o]
                    })
                    .collect();
                close(&got[0], &want, &format!("{at}: gated unit"));
            }
        }
    }
    // A matrix whose size is not cols × rows, or a kept index past the inputs, is refused.
    assert!(sparse_product(
        &g,
        &[(&[0u16; 12][..], 5)],
        2,
        &[0],
        &[1.0],
        1024,
        1,
        Epilogue::Store,
        None
    )
    .is_err());
}

/// LaRoSA decode on the GPU: one token at a time through the sparse products (kept columns
/// only) gives the logits of the dense products on the masked input, at 40% and 50%
/// sparsity, with residual adapters; sparsity 0 changes nothing. The two paths round
/// differently, so an activation at the top-k threshold can flip between kept and dropped:
/// 4 of 5 steps must agree to 2e-3 (tokens alone). As one sequence only the first step is
/// held to it: after a flip the K/V of every later step differ (printed for the record).
#[test]
fn larosa_sparse_gemv_matches_the_masked_dense_product() {
    let Some(g) = gpu() else { return };
    let mut cfg = dummy_cfg();
    cfg.ffn_dim = 2752;
    let mut dm = DeviceModel::dummy(g.clone(), cfg.clone(), 9).unwrap();
    dm.prepare_sparse(&mut |_, _| {}).unwrap();
    dm.add_dummy_adapters(3).unwrap();
    larosa_sparse_vs_masked("Llama-2-7B attention shapes", Arc::new(dm), cfg);
    // stories260K: its FFN's 172 outputs are padded to 176 for the sparse products.
    let (m, _src) = Model::load(&stories_dir(), &mut |_, _| {}).unwrap();
    let mut dm = DeviceModel::upload(g.clone(), &m, &mut |_, _| {}).unwrap();
    dm.prepare_sparse(&mut |_, _| {}).unwrap();
    larosa_sparse_vs_masked("stories260K", Arc::new(dm), m.cfg.clone());
}

fn larosa_sparse_vs_masked(name: &str, dm: Arc<DeviceModel>, cfg: Config) {
    use switchyard_engine::cuda::forward::Larosa;
    let lay = KvLayout {
        n_layers: cfg.n_layers,
        kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        max_context: 256,
        max_slots: 1,
    };
    let prompt: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 512).collect();
    // One token per pass, so every product goes through the chosen path: the prompt as one
    // sequence, or (independent) each token alone in a fresh sequence, so that a top-k
    // membership flip at a near-tie stays in its own step instead of entering the K/V of
    // every later one.
    let run = |l: Option<Larosa>, independent: bool| -> Vec<Vec<f32>> {
        let mut kv = open_kv(&dm, lay, None, KvMode::Sync).unwrap();
        let mut be = CudaBackend::new(dm.clone());
        be.set_larosa(l);
        let mut s = kv.acquire().unwrap();
        let mut rows = Vec::new();
        for (p, &t) in prompt.iter().enumerate() {
            let tt = [t];
            let at = if independent {
                kv.release(s);
                s = kv.acquire().unwrap();
                0
            } else {
                p
            };
            rows.push(
                be.forward_logits(&mut kv, &[SeqChunk::last_logits(s, at, &tt)])
                    .unwrap()
                    .to_vec(),
            );
        }
        rows
    };
    // Per step: max |a - b| / max |b|.
    let diffs = |a: &[Vec<f32>], b: &[Vec<f32>]| -> Vec<f32> {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                x.iter()
                    .zip(y)
                    .fold(0f32, |m, (p, q)| m.max((p - q).abs() / scale))
            })
            .collect()
    };
    let show = |d: &[f32]| {
        d.iter()
            .map(|w| format!("{w:.1e}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let dense = run(None, false);
    assert_eq!(
        run(Some(Larosa::new(0.0)), false),
        dense,
        "sparsity 0 is dense"
    );
    let dense_alone = run(None, true);
    for s in [0.4, 0.5] {
        let masked_of = |independent| {
            run(
                Some(Larosa {
                    sparse_gemv: false,
                    ..Larosa::new(s)
                }),
                independent,
            )
        };
        let (sparse, masked) = (run(Some(Larosa::new(s)), true), masked_of(true));
        let worst = diffs(&sparse, &masked);
        let am = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
        let agree = sparse
            .iter()
            .zip(&masked)
            .filter(|(a, b)| am(a) == am(b))
            .count();
        let changed = diffs(&masked, &dense_alone)
            .into_iter()
            .fold(0f32, f32::max);
        let seq = diffs(&run(Some(Larosa::new(s)), false), &masked_of(false));
        eprintln!(
            "{name}, sparsity {s}: sparse vs masked dense, tokens alone [{}], argmax {agree}/{}, masked vs dense {changed:.2e}; as one sequence [{}]",
            show(&worst),
            worst.len(),
            show(&seq)
        );
        let close = worst.iter().filter(|&&w| w < 2e-3).count();
        assert!(
            close * 5 >= worst.len() * 4,
            "sparse products differ from the masked dense ones in {} of {} steps",
            worst.len() - close,
            worst.len()
        );
        assert!(
            agree * 10 >= worst.len() * 9,
            "argmax agreement {agree}/{}",
            worst.len()
        );
        assert!(
            seq[0] < 2e-3,
            "as one sequence, the first step differs: {}",
            seq[0]
        );
        assert!(changed > 1e-3, "sparsity {s} had no effect");
    }
}

/// The tensor-core products (Q/K/V in one launch, the residual add, the gated unit) against
/// a host reference on the same bf16 weights and bf16-rounded inputs, at token counts on
/// and off the 8-token tiles and row counts off the 16-row tiles.
#[test]
fn tensor_core_products_match_a_host_reference() {
    use switchyard_engine::cuda::forward::{mm_product, Epilogue, ProductKernel};
    let Some(g) = gpu() else { return };
    let bf = |v: f32| half::bf16::from_f32(v);
    let mut rnd = signed_uniform(11);
    for (cols, rows) in [
        (64usize, [48usize, 24, 24]),
        (96, [200, 40, 8]),
        (96, [208, 48, 16]),
        (4096, [4096, 1024, 1024]),
    ] {
        let mats: Vec<Vec<u16>> = rows
            .iter()
            .map(|&r| (0..r * cols).map(|_| bf(rnd() * 0.1).to_bits()).collect())
            .collect();
        for n in [1usize, 3, 8, 9, 16, 17, 32, 33, 64] {
            let x: Vec<f32> = (0..n * cols).map(|_| rnd()).collect();
            // Host reference: f64 sums of bf16 weights times bf16-rounded inputs.
            let reference = |m: usize| -> Vec<f32> {
                let r = rows[m];
                let mut y = vec![0f32; n * r];
                for j in 0..n {
                    for o in 0..r {
                        let mut s = 0f64;
                        for i in 0..cols {
                            let w = half::bf16::from_bits(mats[m][o * cols + i]).to_f32();
                            s += w as f64 * bf(x[j * cols + i]).to_f32() as f64;
                        }
                        y[j * r + o] = s as f32;
                    }
                }
                y
            };
            let close = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(1e-3f32, |s, v| s.max(v.abs()));
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-4 * scale,
                        "{what} cols {cols} n {n} [{i}]: {a} vs {b}"
                    );
                }
            };
            let refs: Vec<Vec<f32>> = (0..3).map(reference).collect();
            let three: Vec<(&[u16], usize)> = mats
                .iter()
                .zip(rows)
                .map(|(m, r)| (m.as_slice(), r))
                .collect();
            let y0: Vec<f32> = (0..n * rows[0]).map(|_| rnd()).collect();
            // silu(gate·x) * (up·x) with equal rows.
            let pair: Vec<(&[u16], usize)> = vec![
                (&mats[1][..rows[2] * cols], rows[2]),
                (&mats[2][..], rows[2]),
            ];
            let gate = &refs[1];
            let glu: Vec<f32> = (0..n * rows[2])
                .map(|e| {
                    let (j, o) = (e / rows[2], e % rows[2]);
                    let a = gate[j * rows[1] + o];
                    a / (1.0 + (-a).exp()) * refs[2][e]
                })
                .collect();
            for kernel in [
                ProductKernel::Mm,
                ProductKernel::Mms { blocks: 264 },
                ProductKernel::Mms { blocks: 1 },
                // Stream-K: the device's grid, one block (every tile whole), and seven
                // blocks (tiles cut across blocks: partial sums added by the last).
                ProductKernel::Sk { blocks: 0 },
                ProductKernel::Sk { blocks: 1 },
                ProductKernel::Sk { blocks: 7 },
                // The same over the weights' fragment-layout copies (rows in 16s).
                ProductKernel::SkTiled { blocks: 0 },
                ProductKernel::SkTiled { blocks: 1 },
                ProductKernel::SkTiled { blocks: 7 },
            ] {
                if matches!(kernel, ProductKernel::SkTiled { .. })
                    && rows.iter().any(|r| r % 16 != 0)
                {
                    // The layout takes rows in 16s only: refused, not read row-major.
                    assert!(
                        mm_product(&g, kernel, &three, cols, &x, n, Epilogue::Store, None).is_err()
                    );
                    continue;
                }
                if kernel == ProductKernel::Mm && n > 32 {
                    // mm* stops at 32 tokens: refused.
                    assert!(
                        mm_product(&g, kernel, &three, cols, &x, n, Epilogue::Store, None).is_err()
                    );
                    continue;
                }
                let k = format!("{kernel:?}");
                let got =
                    mm_product(&g, kernel, &three, cols, &x, n, Epilogue::Store, None).unwrap();
                for m in 0..3 {
                    close(&got[m], &refs[m], &format!("{k} Q/K/V product {m}"));
                }
                // y += W·x onto a random residual.
                let got = mm_product(
                    &g,
                    kernel,
                    &three[..1],
                    cols,
                    &x,
                    n,
                    Epilogue::Add,
                    Some(&y0),
                )
                .unwrap();
                let want: Vec<f32> = y0.iter().zip(&refs[0]).map(|(a, b)| a + b).collect();
                close(&got[0], &want, &format!("{k} residual add"));
                let got = mm_product(&g, kernel, &pair, cols, &x, n, Epilogue::Glu, None).unwrap();
                close(&got[0], &glu, &format!("{k} gated unit"));
                if let ProductKernel::Sk { .. } | ProductKernel::SkTiled { .. } = kernel {
                    // The bf16 output for the down product: within bf16 rounding.
                    let scale = glu.iter().fold(1e-3f32, |s, v| s.max(v.abs()));
                    for (i, (a, b)) in got[1].iter().zip(&glu).enumerate() {
                        assert!(
                            (a - b).abs() <= b.abs() / 128.0 + 2e-4 * scale,
                            "{k} bf16 gated unit cols {cols} n {n} [{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
    // Inputs whose width is not a multiple of 32 are refused, not miscomputed.
    assert!(mm_product(
        &g,
        ProductKernel::Mms { blocks: 264 },
        &[(&[0u16; 40][..], 1)],
        40,
        &[0.0; 40],
        1,
        Epilogue::Store,
        None
    )
    .is_err());
}

/// The stream-K products are deterministic by design (partial sums added in slot order), so
/// the same launch repeated must give the same bits; a race in the split-tile reduction
/// shows up here as a difference. `SWITCHYARD_SK_REPEATS` sets the repeats (default 6).
#[test]
fn stream_k_products_repeat_bit_for_bit() {
    use switchyard_engine::cuda::forward::{mm_product, Epilogue, ProductKernel};
    let Some(g) = gpu() else { return };
    let repeats: usize = std::env::var("SWITCHYARD_SK_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let bf = |v: f32| half::bf16::from_f32(v).to_bits();
    let mut rnd = signed_uniform(5);
    let (cols, rows) = (4096usize, [1024usize, 1024, 512]);
    let mats: Vec<Vec<u16>> = rows
        .iter()
        .map(|&r| (0..r * cols).map(|_| bf(rnd() * 0.1)).collect())
        .collect();
    let three: Vec<(&[u16], usize)> = mats.iter().zip(rows).map(|(m, r)| (&m[..], r)).collect();
    let mut bad = Vec::new();
    for n in [8usize, 32, 64] {
        let x: Vec<f32> = (0..n * cols).map(|_| rnd()).collect();
        for kernel in [
            ProductKernel::Sk { blocks: 0 },
            ProductKernel::Sk { blocks: 7 },
            ProductKernel::SkTiled { blocks: 0 },
        ] {
            for (epi, ms) in [(Epilogue::Glu, &three[..2]), (Epilogue::Store, &three[..])] {
                let first = mm_product(&g, kernel, ms, cols, &x, n, epi, None).unwrap();
                for rep in 1..repeats {
                    let got = mm_product(&g, kernel, ms, cols, &x, n, epi, None).unwrap();
                    for (m, (a, b)) in got.iter().zip(&first).enumerate() {
                        let r = ms[m].1;
                        let diff: Vec<String> = a
                            .iter()
                            .zip(b)
                            .enumerate()
                            .filter(|(_, (p, q))| p.to_bits() != q.to_bits())
                            .map(|(i, (p, q))| format!("(t{} r{}: {p} vs {q})", i / r, i % r))
                            .collect();
                        if !diff.is_empty() {
                            bad.push(format!(
                                "{kernel:?} {epi:?} n {n} output {m} repeat {rep}: {} differ, {}",
                                diff.len(),
                                diff[..diff.len().min(6)].join(" ")
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Prefill attention over 64-row tiles, on tensor cores (`attention_mma*`) and in f32
/// (`attention_tiles`), against the per-row decode kernel (the same tokens in chunks of 15,
/// which the same cuBLAS products take): a 150-token prompt after a 40-token prefix, so tiles
/// start mid-sequence, cross K/V blocks and end part-full. Llama-2-7B's heads (32 of 128)
/// and SmolLM2-135M's (9 query heads of 64 over 3 K/V heads). The reference runs cuBLAS
/// one matrix at a time, the tiled runs batched (Q/K/V, gate/up).
#[test]
fn tiled_prefill_attention_matches_the_row_kernel() {
    let Some(g) = gpu() else { return };
    for (name, dim, nh, nkv, hd) in [
        ("32 heads of 128", 4096, 32, 32, 128),
        ("9 heads of 64, 3 K/V heads", 576, 9, 3, 64),
    ] {
        let cfg = Config {
            dim,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            ..dummy_cfg()
        };
        let layout = KvLayout {
            kv_heads: nkv,
            head_dim: hd,
            ..dummy_layout(1024, 1)
        };
        let dm = Arc::new(DeviceModel::dummy(g.clone(), cfg, 5).unwrap());
        let toks: Vec<u32> = (0..190u32).map(|i| (i * 31 + 7) % 512).collect();
        let run = |chunk: usize, mma: bool, batched: bool| -> Vec<f32> {
            let mut kv = open_kv(&dm, layout, None, KvMode::Sync).unwrap();
            let mut be = CudaBackend::new(dm.clone());
            be.mma_attention = mma;
            be.blas_batched = batched;
            let s = kv.acquire().unwrap();
            // Every row's logits, so each row's attention output is compared.
            let mut out = Vec::new();
            let mut p = 0;
            for part in [&toks[..40], &toks[40..]] {
                for c in part.chunks(chunk) {
                    let ch = SeqChunk {
                        slot: s,
                        pos: p,
                        tokens: c,
                        logits_from: 0,
                    };
                    out.extend_from_slice(be.forward_logits(&mut kv, &[ch]).unwrap());
                    p += c.len();
                }
            }
            out
        };
        // The reference also runs cuBLAS one matrix at a time (the tiled runs batch Q/K/V
        // and gate/up): a wrong batched product shows here too.
        let rows = run(15, true, false);
        let scale = rows.iter().fold(0f32, |s, v| s.max(v.abs()));
        for (kernel, mma) in [("tensor-core", true), ("f32", false)] {
            let tiled = run(190, mma, true);
            assert_eq!(tiled.len(), rows.len());
            let worst = tiled
                .iter()
                .zip(&rows)
                .fold(0f32, |s, (a, b)| s.max((a - b).abs()));
            eprintln!(
                "{name}: {kernel} tiles vs row attention: max |Δ| / max |logit| = {:.2e}",
                worst / scale
            );
            // bf16 K/V: a last-bit change upstream flips single cache entries by 2^-8 (the
            // H200 measured 3.1e-3 and 3.5e-3 of the largest logit for the f32 tiles); the
            // tensor-core kernel also rounds Q and the softmax weights to bf16. A wrong mask
            // or tile is O(1).
            assert!(
                worst <= 2e-2 * scale,
                "{name}: {kernel} tiled prefill differs by {worst} (scale {scale})"
            );
        }
    }
}

/// The device sampler against the host's rules: greedy takes the lowest id among equal
/// maxima; with top-k/top-p every draw lands in the host's kept set (top-k by logit, ties to
/// the lowest id, then the smallest by-weight prefix holding top_p of the mass), and a grid
/// of uniform numbers reproduces each kept id's probability to within the grid's step.
#[test]
fn device_sampling_follows_the_host_rules() {
    use switchyard_engine::cuda::forward::sample_on_device;
    use switchyard_engine::sampling::RowSampling;
    let Some(g) = gpu() else { return };
    let mut rnd = uniform(5);
    for vocab in [100usize, 32000, 49152] {
        let mut l: Vec<f32> = (0..vocab).map(|_| rnd() * 8.0 - 4.0).collect();
        // Ties: two equal maxima, and a run of equal logits around the top-k boundary.
        l[vocab / 3] = 9.0;
        l[vocab / 2] = 9.0;
        for i in 0..6 {
            l[vocab / 5 + 7 * i] = 7.5;
        }
        let greedy = sample_on_device(
            &g,
            &[l.clone(), l.clone()].concat(),
            vocab,
            &[
                RowSampling {
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                    u: 0.3,
                },
                RowSampling {
                    temperature: 1.0,
                    top_k: 1,
                    top_p: 1.0,
                    u: 0.9,
                },
            ],
        )
        .unwrap();
        assert_eq!(greedy, vec![(vocab / 3) as u32; 2], "greedy, vocab {vocab}");
        for (t, k, p) in [
            (1.0f32, 0u32, 1.0f32),
            (0.7, 5, 1.0),
            (1.0, 0, 0.6),
            (1.3, 40, 0.9),
        ] {
            // Host reference: kept ids and their probabilities.
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
            if k > 0 {
                order.truncate(k as usize);
            }
            let mx = l[order[0]];
            let w: Vec<f64> = order
                .iter()
                .map(|&i| (((l[i] - mx) / t) as f64).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut keep = order.len();
            if p < 1.0 {
                let mut acc = 0.0;
                keep = w
                    .iter()
                    .position(|x| {
                        acc += x;
                        acc >= p as f64 * total
                    })
                    .unwrap()
                    + 1;
            }
            let kept = &order[..keep];
            let mass: f64 = w[..keep].iter().sum();
            let n = 4000;
            let rows: Vec<RowSampling> = (0..n)
                .map(|j| RowSampling {
                    temperature: t,
                    top_k: k,
                    top_p: p,
                    u: (j as f32 + 0.5) / n as f32,
                })
                .collect();
            let logits: Vec<f32> = (0..n).flat_map(|_| l.iter().copied()).collect();
            let ids = sample_on_device(&g, &logits, vocab, &rows).unwrap();
            let mut count = std::collections::HashMap::new();
            for &id in &ids {
                assert!(
                    kept.contains(&(id as usize)),
                    "vocab {vocab} t {t} k {k} p {p}: drew {id}, outside the kept set"
                );
                *count.entry(id as usize).or_insert(0usize) += 1;
            }
            for (j, &i) in kept.iter().enumerate() {
                let want = w[j] / mass;
                let got = *count.get(&i).unwrap_or(&0) as f64 / n as f64;
                assert!(
                    (got - want).abs() <= 2.0 / n as f64 + 1e-4,
                    "vocab {vocab} t {t} k {k} p {p}: id {i} drawn {got}, probability {want}"
                );
            }
        }
    }
}

/// LaRoSA as a GPU pipeline generation gets it (`Engine::set_device_weights`): stories260K
/// rotated by a rotation calibrated on pseudo-random activations. Dense, the GPU's logits
/// match the CPU engine's on the same rotated weights; at 40% sparsity (prefill on masked
/// inputs, decode steps through the sparse products) the logits move but stay finite.
#[test]
fn larosa_generation_through_the_engine_on_the_gpu() {
    use switchyard_engine::backend::ActivationSparsity;
    use switchyard_engine::larosa::{rotate_model, Calibrator};
    if gpu().is_none() {
        return;
    }
    let opts = |device| EngineOptions {
        device,
        max_slots: 1,
        threads: 2,
        ..Default::default()
    };
    let mut ge = Engine::load(&stories_dir(), opts(Device::Cuda(0)), &mut |_, _| {}).unwrap();
    let mut ce = Engine::load(&stories_dir(), opts(Device::Cpu), &mut |_, _| {}).unwrap();
    assert!(ge.device.is_some(), "no GPU backend");
    let c = ce.model.cfg.clone();
    let mut rnd = signed_uniform(17);
    let mut cal = Calibrator::new(c.n_layers, c.dim);
    let rows: Vec<Vec<f32>> = (0..c.n_layers)
        .map(|_| (0..256 * c.dim).map(|_| rnd()).collect())
        .collect();
    cal.add(&rows);
    let rot = cal.finish(0.01, &mut |_, _| {}).unwrap();
    let rotated = Arc::new(rotate_model(&ce.model, &rot, ce.fwd.pool(), &mut |_, _| {}).unwrap());
    ce.model = rotated.clone();
    ge.set_device_weights(rotated.clone(), None, &mut |_, _| {})
        .unwrap();
    let toks: Vec<u32> = (0..48u32).map(|i| (i * 37 + 5) % 512).collect();
    // Logits of a 40-token prefill's last row, then of 8 single-token steps.
    let run = |e: &mut Engine| -> Vec<Vec<f32>> {
        let s = e.kv.acquire().unwrap();
        let mut out = vec![e
            .forward(&[SeqChunk::last_logits(s, 0, &toks[..40])])
            .unwrap()
            .to_vec()];
        for p in 40..48 {
            let t = [toks[p]];
            out.push(
                e.forward(&[SeqChunk::last_logits(s, p, &t)])
                    .unwrap()
                    .to_vec(),
            );
        }
        e.kv.release(s);
        out
    };
    let diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter().zip(b).fold(0f32, |w, (x, y)| {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            x.iter()
                .zip(y)
                .fold(w, |w, (p, q)| w.max((p - q).abs() / scale))
        })
    };
    let (gpu_dense, cpu_dense) = (run(&mut ge), run(&mut ce));
    let d = diff(&gpu_dense, &cpu_dense);
    let sparse = ActivationSparsity {
        sparsity: 0.4,
        coef_in: 0.8,
        coef_out: 1.2,
    };
    ge.set_device_weights(rotated, Some(sparse), &mut |_, _| {})
        .unwrap();
    let gpu_sparse = run(&mut ge);
    let moved = diff(&gpu_sparse, &gpu_dense);
    eprintln!(
        "rotated stories260K: GPU vs CPU {d:.2e}; 40% sparsity moved the logits by {moved:.2e}"
    );
    assert!(
        d < 3e-2,
        "rotated model: GPU logits differ from the CPU's by {d}"
    );
    assert!(moved > 1e-3, "sparsity had no effect");
    assert!(gpu_sparse.iter().flatten().all(|v| v.is_finite()));
    // A model of other shapes cannot stand in.
    let (other, _src) = Model::load(&stories_dir(), &mut |_, _| {}).unwrap();
    let mut other = other;
    other.cfg.max_context = 8;
    assert!(ge
        .set_device_weights(Arc::new(other), None, &mut |_, _| {})
        .is_err());
}
