//! bf16 weights on the device and the batched forward pass (prefill chunks and decode steps
//! mixed, like the CPU's [`crate::forward::Forward`]).
//!
//! Products ([`CudaBackend::proj`]): the engine's GEMV kernel at 1-2 tokens, its tensor-core
//! kernels at 3-8 (both with Q/K/V in one launch and the residual add or SiLU gate fused in),
//! cuBLAS `GemmEx` (bf16 in, f32 out) above that. Activations stay f32; K/V are stored bf16
//! in the allocator's contiguous per-slot ranges.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as bsys};

use super::{DevBuf, Gpu};
use crate::backend::{ActivationSparsity, Backend};
use crate::error::{EngineError, Result};
use crate::forward::SeqChunk;
use crate::kv::{KvAllocator, KvLayout};
use crate::model::{Config, Model, RopeStyle, Weight};
use crate::sampling::RowSampling;

macro_rules! args {
    ($($a:expr),* $(,)?) => {
        &mut [$( &$a as *const _ as *mut c_void ),*]
    };
}

/// A bf16 matrix `[rows, cols]` on the device.
pub struct DevW {
    pub buf: DevBuf,
    pub rows: usize,
    pub cols: usize,
    /// The same matrix in the `sk*` kernels' fragment layout (`tile_w16`), when built
    /// ([`DeviceModel::prepare_tiled`]); the stream-K products then read it.
    pub tiled: Option<DevBuf>,
}

impl DevW {
    /// Whether `next` has this matrix's shape and starts where it ends (gate and up after
    /// [`join_glu`]), so one product can read both as a matrix of twice the rows.
    fn followed_by(&self, next: &DevW) -> bool {
        self.rows == next.rows
            && self.cols == next.cols
            && next.buf.ptr == self.buf.ptr + (self.rows * self.cols * 2) as u64
    }

    pub fn new(buf: DevBuf, rows: usize, cols: usize) -> Self {
        Self {
            buf,
            rows,
            cols,
            tiled: None,
        }
    }

    /// This matrix with its fragment-layout copy ([`tile_copy`]) when `tiled`.
    fn tiled_if(mut self, gpu: &Arc<Gpu>, tiled: bool) -> Result<Self> {
        if tiled {
            self.tiled = Some(tile_copy(gpu, &self)?);
        }
        Ok(self)
    }

    /// Whether [`tile_copy`] takes this matrix's shape.
    pub fn tiles(&self) -> bool {
        self.rows >= 16 && self.rows.is_multiple_of(16) && self.cols.is_multiple_of(32)
    }
}

/// `w` in the fragment layout of the `sk*` kernels (see `tile_w16` in kernels/engine.cu).
pub fn tile_copy(gpu: &Arc<Gpu>, w: &DevW) -> Result<DevBuf> {
    if !w.tiles() {
        return Err(EngineError::Invalid(format!(
            "CUDA: the fragment layout takes rows in 16s and columns in 32s, not {}x{}",
            w.rows, w.cols
        )));
    }
    let out = gpu.alloc(w.rows * w.cols * 2)?;
    let (r, c) = (w.rows as i32, w.cols as i32);
    // SAFETY: both buffers hold rows*cols bf16; one thread per 16 bytes of out.
    unsafe {
        gpu.launch(
            gpu.k.tile_w16,
            (blocks(w.rows * w.cols / 8, 256), 1, 1),
            256,
            args!(w.buf.ptr, out.ptr, r, c),
        )?;
    }
    Ok(out)
}

/// Move a layer's gate and up matrices into one allocation, gate first (`l.glu`), and make
/// `l.gate` and `l.up` views of its halves: one cuBLAS product then reads both (one wide
/// matrix ran faster than the batched pair at 16 and 32 tokens on an H100,
/// bench/results/h100/gemm-shapes.json). The memory stays the same (the old buffers go).
fn join_glu(gpu: &Arc<Gpu>, l: &mut DevLayer) -> Result<()> {
    if l.glu.is_some() || l.gate.rows != l.up.rows || l.gate.cols != l.up.cols {
        return Ok(());
    }
    let half = l.gate.rows * l.gate.cols * 2;
    let both = gpu.alloc(2 * half)?;
    gpu.copy(&both, 0, &l.gate.buf, half)?;
    gpu.copy(&both, half, &l.up.buf, half)?;
    // SAFETY: the views live in the same layer as `both` (l.glu), which is dropped with
    // them; nothing else keeps a DevW's buffer.
    unsafe {
        l.gate.buf = both.view(0, half);
        l.up.buf = both.view(half, half);
    }
    l.glu = Some(both);
    Ok(())
}

/// LaRoSA's transposed copies of a layer's projections (`[in, out]`: a kept input's
/// weight column is one contiguous row).
pub struct SparseLayer {
    wq: DevBuf,
    wk: DevBuf,
    wv: DevBuf,
    wo: DevBuf,
    gate: DevBuf,
    up: DevBuf,
    down: DevBuf,
}

pub struct DevLayer {
    /// The rotated model's residual adapter `Q_{l-1}ᵀ·Q_l` (LaRoSA), applied before the layer.
    adapter: Option<DevW>,
    sparse: Option<SparseLayer>,
    attn_norm: DevBuf,
    wq: DevW,
    wk: DevW,
    wv: DevW,
    wo: DevW,
    ffn_norm: DevBuf,
    gate: DevW,
    up: DevW,
    down: DevW,
    /// Gate and up side by side (`[2 * ffn_dim, dim]`, [`join_glu`]); `gate`
    /// and `up` are views of its halves, so cuBLAS can run both as one product.
    glu: Option<DevBuf>,
}

/// A model's weights on the device (shared by the pipeline generations of one model).
pub struct DeviceModel {
    pub gpu: Arc<Gpu>,
    pub cfg: Config,
    embd: DevW,
    layers: Vec<DevLayer>,
    norm: DevBuf,
    head: Option<DevW>,
    cos: DevBuf,
    sin: DevBuf,
}

fn bf16_of(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

fn upload_w(gpu: &Arc<Gpu>, w: &Weight) -> Result<DevW> {
    let mut row = vec![0f32; w.cols];
    let mut out: Vec<u16> = Vec::with_capacity(w.rows * w.cols);
    for r in 0..w.rows {
        w.dequantize_row(r, &mut row);
        out.extend(row.iter().map(|&x| half::bf16::from_f32(x).to_bits()));
    }
    Ok(DevW::new(gpu.upload(&out)?, w.rows, w.cols))
}

fn check_cfg(cfg: &Config) -> Result<()> {
    if cfg.head_dim > 256 || !cfg.head_dim.is_multiple_of(4) {
        return Err(EngineError::Invalid(format!(
            "CUDA backend: head size {} is not supported (a multiple of 4, at most 256)",
            cfg.head_dim
        )));
    }
    if !cfg.n_heads.is_multiple_of(cfg.n_kv_heads) {
        return Err(EngineError::Invalid(
            "CUDA backend: query heads are not a multiple of KV heads".into(),
        ));
    }
    Ok(())
}

/// Why the sparse products cannot take a model of these shapes, if they cannot.
fn sparse_unfit(c: &Config) -> Option<String> {
    let widest = c.dim.max(c.ffn_dim).max(c.n_heads * c.head_dim);
    (widest > TOPK_MAX)
        .then(|| format!("the top-k kernels take inputs up to {TOPK_MAX} wide, not {widest}"))
}

/// Device copies of host models made for pipeline generations, shared while any backend
/// uses one: (host model, device ordinal, with the sparse products' copies, device model).
#[allow(clippy::type_complexity)]
static DEVICE_MODELS: std::sync::Mutex<
    Vec<(
        std::sync::Weak<Model>,
        usize,
        bool,
        std::sync::Weak<DeviceModel>,
    )>,
> = std::sync::Mutex::new(Vec::new());

/// The device copy of `m` on `gpu` (with the transposed copies the sparse products read
/// when `sparse` and the shapes allow them), made once and shared while in use.
fn device_model_for(
    gpu: &Arc<Gpu>,
    m: &Arc<Model>,
    sparse: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Arc<DeviceModel>> {
    let mut cache = DEVICE_MODELS.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|e| e.3.strong_count() > 0);
    let hit = cache
        .iter()
        .filter(|e| e.0.as_ptr() == Arc::as_ptr(m) && e.1 == gpu.ordinal && e.2 == sparse)
        .find_map(|e| e.3.upgrade());
    if let Some(dm) = hit {
        return Ok(dm);
    }
    // The top-k kernels bound LaRoSA's widths on the GPU, the masked passes' as well as the
    // sparse products': refuse the pipeline before uploading anything.
    if sparse {
        if let Some(why) = sparse_unfit(&m.cfg) {
            return Err(EngineError::Invalid(format!("LaRoSA on the GPU: {why}")));
        }
    }
    let mut dm = DeviceModel::upload(gpu.clone(), m, progress)?;
    if let Some(line) = dm.prepare_tiled_by_policy(&mut |_, _| {})? {
        eprintln!("switchyard: {line}");
    }
    if sparse {
        dm.prepare_sparse(&mut |_, _| {})?;
    }
    let dm = Arc::new(dm);
    cache.push((Arc::downgrade(m), gpu.ordinal, sparse, Arc::downgrade(&dm)));
    Ok(dm)
}

impl DeviceModel {
    /// Upload `m` (every tensor type is dequantized, then stored bf16). `progress` gets
    /// (layers uploaded, layers).
    pub fn upload(
        gpu: Arc<Gpu>,
        m: &Model,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        check_cfg(&m.cfg)?;
        let mut layers = Vec::with_capacity(m.layers.len());
        for (i, l) in m.layers.iter().enumerate() {
            layers.push(DevLayer {
                adapter: match &l.adapter {
                    Some(a) => Some(upload_w(&gpu, a)?),
                    None => None,
                },
                sparse: None,
                attn_norm: gpu.upload(&l.attn_norm)?,
                wq: upload_w(&gpu, &l.wq)?,
                wk: upload_w(&gpu, &l.wk)?,
                wv: upload_w(&gpu, &l.wv)?,
                wo: upload_w(&gpu, &l.wo)?,
                ffn_norm: gpu.upload(&l.ffn_norm)?,
                gate: upload_w(&gpu, &l.w_gate)?,
                up: upload_w(&gpu, &l.w_up)?,
                down: upload_w(&gpu, &l.w_down)?,
                glu: None,
            });
            join_glu(&gpu, layers.last_mut().unwrap())?;
            progress(i + 1, m.layers.len());
        }
        Ok(Self {
            embd: upload_w(&gpu, &m.tok_embd)?,
            head: match &m.output {
                Some(w) => Some(upload_w(&gpu, w)?),
                None => None,
            },
            norm: gpu.upload(&m.norm)?,
            cos: gpu.upload(&m.rope_cos)?,
            sin: gpu.upload(&m.rope_sin)?,
            layers,
            cfg: m.cfg.clone(),
            gpu,
        })
    }

    /// Random weights of `cfg`'s shapes built on the device (benchmarks at real sizes, like
    /// vLLM's dummy load format). Norm scales are 1; matrices uniform in ±1/sqrt(in).
    pub fn dummy(gpu: Arc<Gpu>, cfg: Config, seed: u32) -> Result<Self> {
        check_cfg(&cfg)?;
        let mut n = seed;
        let mut mat = |rows: usize, cols: usize| -> Result<DevW> {
            let buf = gpu.alloc(rows * cols * 2)?;
            n = n.wrapping_add(1);
            gpu.fill_random_bf16(&buf, n, 1.0 / (cols as f32).sqrt())?;
            Ok(DevW::new(buf, rows, cols))
        };
        let (d, hd) = (cfg.dim, cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let ones = vec![1f32; d];
        for _ in 0..cfg.n_layers {
            layers.push(DevLayer {
                adapter: None,
                sparse: None,
                attn_norm: gpu.upload(&ones)?,
                wq: mat(cfg.n_heads * hd, d)?,
                wk: mat(cfg.n_kv_heads * hd, d)?,
                wv: mat(cfg.n_kv_heads * hd, d)?,
                wo: mat(d, cfg.n_heads * hd)?,
                ffn_norm: gpu.upload(&ones)?,
                gate: mat(cfg.ffn_dim, d)?,
                up: mat(cfg.ffn_dim, d)?,
                down: mat(d, cfg.ffn_dim)?,
                glu: None,
            });
            join_glu(&gpu, layers.last_mut().unwrap())?;
        }
        let embd = mat(cfg.vocab_size, d)?;
        let head = Some(mat(cfg.vocab_size, d)?);
        let (cos, sin) = crate::model::rope_tables(&cfg);
        gpu.sync()?;
        Ok(Self {
            embd,
            head,
            norm: gpu.upload(&ones)?,
            cos: gpu.upload(&cos)?,
            sin: gpu.upload(&sin)?,
            layers,
            cfg,
            gpu,
        })
    }

    /// Random residual adapters (`dim × dim`) before every layer but the first: the extra
    /// product a LaRoSA-rotated model carries, for benchmarks at real sizes.
    pub fn add_dummy_adapters(&mut self, seed: u32) -> Result<()> {
        let d = self.cfg.dim;
        for (i, l) in self.layers.iter_mut().enumerate().skip(1) {
            let buf = self.gpu.alloc(d * d * 2)?;
            self.gpu.fill_random_bf16(
                &buf,
                seed.wrapping_add(i as u32),
                1.0 / (d as f32).sqrt(),
            )?;
            l.adapter = Some(DevW::new(buf, d, d));
        }
        self.gpu.sync()
    }

    /// Build LaRoSA's transposed weights (one more copy of every projection, bf16) so that
    /// a backend with [`CudaBackend::larosa`] set can read only the kept inputs' columns.
    pub fn prepare_sparse(&mut self, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        if let Some(why) = sparse_unfit(&self.cfg) {
            return Err(EngineError::Invalid(format!("LaRoSA on the GPU: {why}")));
        }
        let gpu = self.gpu.clone();
        // [cols, rows] with rows padded to a multiple of 8 (zeros), for 16-byte loads.
        let t = |w: &DevW| -> Result<DevBuf> {
            let ld = w.rows.next_multiple_of(8);
            let out = gpu.alloc(ld * w.cols * 2)?;
            let (r, c, l) = (w.rows as i32, w.cols as i32, ld as i32);
            // SAFETY: in holds rows*cols bf16, out cols*ld (zeroed first).
            unsafe {
                cudarc::driver::result::memset_d8_async(out.ptr, 0, out.bytes, gpu.stream)
                    .map_err(|e| EngineError::Invalid(format!("CUDA: memset: {e:?}")))?;
                gpu.launch(
                    gpu.k.transpose_bf16,
                    (w.cols.div_ceil(32) as u32, w.rows.div_ceil(32) as u32, 1),
                    256,
                    args!(w.buf.ptr, out.ptr, r, c, l),
                )?;
            }
            Ok(out)
        };
        let n = self.layers.len();
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.sparse = Some(SparseLayer {
                wq: t(&l.wq)?,
                wk: t(&l.wk)?,
                wv: t(&l.wv)?,
                wo: t(&l.wo)?,
                gate: t(&l.gate)?,
                up: t(&l.up)?,
                down: t(&l.down)?,
            });
            gpu.sync()?;
            progress(i + 1, n);
        }
        Ok(())
    }

    /// Build every product matrix's copy in the `sk*` kernels' fragment layout
    /// ([`tile_copy`]; one more copy of the weights), so that the stream-K products read
    /// each warp's weights as one contiguous run. Matrices of other shapes keep the
    /// row-major reads. `progress` gets (layers done, layers).
    pub fn prepare_tiled(&mut self, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        let gpu = self.gpu.clone();
        let tile = |w: &mut DevW| -> Result<()> {
            if w.tiles() && w.tiled.is_none() {
                w.tiled = Some(tile_copy(&gpu, w)?);
            }
            Ok(())
        };
        let n = self.layers.len();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for w in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                tile(w)?;
            }
            if let Some(a) = l.adapter.as_mut() {
                tile(a)?;
            }
            gpu.sync()?;
            progress(i + 1, n);
        }
        tile(self.head.as_mut().unwrap_or(&mut self.embd))?;
        gpu.sync()
    }

    /// Bytes of the fragment-layout copies [`Self::prepare_tiled`] would build.
    pub fn tiled_bytes(&self) -> usize {
        let b = |w: &DevW| if w.tiles() { w.rows * w.cols * 2 } else { 0 };
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .chain(l.adapter.as_ref())
                    .map(b)
                    .sum::<usize>()
            })
            .sum();
        l + b(self.head())
    }

    /// Whether every layer's gate and up are the halves of one allocation ([`join_glu`]).
    pub fn glu_joined(&self) -> bool {
        self.layers
            .iter()
            .all(|l| l.glu.is_some() && l.gate.followed_by(&l.up))
    }

    /// Whether every layer's products have their fragment-layout copies.
    pub fn has_tiled(&self) -> bool {
        !self.layers.is_empty()
            && self.layers.iter().all(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .all(|w| !w.tiles() || w.tiled.is_some())
            })
    }

    /// Build the fragment-layout copies as [`tiled_wanted`] says: when it leaves the choice,
    /// only if they take at most half the device's free memory. Returns a line for the
    /// log saying what was done (None when nothing was asked for).
    pub fn prepare_tiled_by_policy(
        &mut self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Option<String>> {
        let bytes = self.tiled_bytes();
        let gb = bytes as f64 / 1e9;
        match tiled_wanted() {
            Some(false) => return Ok(None),
            Some(true) => {}
            None => {
                self.gpu.bind()?;
                let (free, _) = crate::cuda::mem_info()?;
                if bytes > free / 2 {
                    return Ok(Some(format!(
                        "stream-K products off: their weight copies ({gb:.2} GB) would take \
                         more than half the free device memory ({:.2} GB); cuBLAS runs instead",
                        free as f64 / 1e9
                    )));
                }
            }
        }
        self.prepare_tiled(progress)?;
        let tokens = match sk_policy() {
            SkPolicy::All => SK_TOKENS,
            _ => SK_AUTO_TOKENS,
        };
        Ok(Some(format!(
            "stream-K products on at {tokens:?} tokens, over fragment-layout weight copies \
             ({gb:.2} GB; SWITCHYARD_SK=0 turns them off)"
        )))
    }

    fn head(&self) -> &DevW {
        self.head.as_ref().unwrap_or(&self.embd)
    }

    /// Bytes of weights one decode step reads (every layer's matrices and the head).
    pub fn step_weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|w| w.buf.bytes)
                    .sum::<usize>()
                    + l.adapter.as_ref().map_or(0, |a| a.buf.bytes)
            })
            .sum();
        l + self.head().buf.bytes
    }

    /// Multiply-adds of the matrices per token (FLOPs / 2).
    pub fn macs_per_token(&self) -> usize {
        self.step_weight_bytes() / 2
    }

    /// All device bytes of the weights.
    pub fn device_bytes(&self) -> usize {
        self.step_weight_bytes()
            + if self.head.is_some() {
                self.embd.buf.bytes
            } else {
                0
            }
    }

    /// Write the weights as a Hugging Face llama directory (`config.json` and a bf16
    /// `model.safetensors`, names as transformers' `LlamaForCausalLM` expects), so the CPU
    /// backend and a PyTorch baseline load the very same values.
    pub fn save_hf_dir(&self, dir: &std::path::Path) -> Result<()> {
        let c = &self.cfg;
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "num_hidden_layers": c.n_layers, "head_dim": c.head_dim,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_context,
            "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
            "tie_word_embeddings": self.head.is_none(), "torch_dtype": "bfloat16",
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        });
        let p = dir.join("config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap())
            .map_err(|e| EngineError::io(&p, e))?;
        self.save_safetensors(&dir.join("model.safetensors"))
    }

    fn save_safetensors(&self, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mat = |w: &DevW| -> Result<Vec<u8>> {
            let v: Vec<u16> = w.buf.read(w.rows * w.cols)?;
            Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        let vecb = |b: &DevBuf, n: usize| -> Result<Vec<u8>> {
            let v: Vec<f32> = b.read(n)?;
            Ok(bf16_of(&v).iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        let d = self.cfg.dim;
        tensors.push((
            "model.embed_tokens.weight".into(),
            vec![self.embd.rows, d],
            mat(&self.embd)?,
        ));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, w) in [
                ("self_attn.q_proj", &l.wq),
                ("self_attn.k_proj", &l.wk),
                ("self_attn.v_proj", &l.wv),
                ("self_attn.o_proj", &l.wo),
                ("mlp.gate_proj", &l.gate),
                ("mlp.up_proj", &l.up),
                ("mlp.down_proj", &l.down),
            ] {
                tensors.push((format!("{p}.{n}.weight"), vec![w.rows, w.cols], mat(w)?));
            }
            tensors.push((
                format!("{p}.input_layernorm.weight"),
                vec![d],
                vecb(&l.attn_norm, d)?,
            ));
            tensors.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                vecb(&l.ffn_norm, d)?,
            ));
        }
        tensors.push(("model.norm.weight".into(), vec![d], vecb(&self.norm, d)?));
        if let Some(h) = &self.head {
            tensors.push(("lm_head.weight".into(), vec![h.rows, d], mat(h)?));
        }
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for (n, shape, data) in &tensors {
            header.insert(
                n.clone(),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + data.len()]}),
            );
            off += data.len();
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let io = |e| EngineError::io(path, e);
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&h).map_err(io)?;
        for (_, _, data) in &tensors {
            f.write_all(data).map_err(io)?;
        }
        f.flush().map_err(io)
    }
}

/// Device buffers of the forward pass (grown, never shrunk).
#[derive(Default)]
struct Bufs {
    f32s: Vec<Option<DevBuf>>,
    /// Bumped on every reallocation (captured graphs hold the old addresses).
    generation: u64,
}

/// Buffer addresses and sizes of one pass.
#[derive(Clone, Copy)]
struct Pass {
    /// Device pointer arrays of the batched cuBLAS products (0: none this pass).
    bptr: u64,
    n: usize,
    n_sel: usize,
    items: usize,
    x: u64,
    xb: u64,
    q: u64,
    k: u64,
    v: u64,
    att: u64,
    tmp: u64,
    hb: u64,
    hb2: u64,
    /// Inputs of cuBLAS products rounded to bf16 (n * the widest input).
    x16: u64,
    x16b: u64,
    sel: u64,
    logits: u64,
    tok: u64,
    pos: u64,
    item: u64,
    kvp: u64,
    selidx: u64,
    sidx: u64,
    sval: u64,
    part: u64,
    cnt: u64,
    /// Rows for `attention` (row indices) and tiles for `attention_tiles` (first row, len).
    arows: u64,
    n_arows: usize,
    tiles: u64,
    n_tiles: usize,
    /// Split attention: partial results, tickets, splits per (row, head).
    att_part: u64,
    att_cnt: u64,
    att_splits: usize,
}

struct GraphExec(cudarc::driver::sys::CUgraphExec);

// SAFETY: a driver handle, used only from the backend's thread.
unsafe impl Send for GraphExec {}

impl Drop for GraphExec {
    fn drop(&mut self) {
        // SAFETY: instantiated by capture() and destroyed once.
        unsafe {
            let _ = cudarc::driver::result::graph::exec_destroy(self.0);
        }
    }
}

const X: usize = 0;
const XB: usize = 1;
const Q: usize = 2;
const K: usize = 3;
const V: usize = 4;
const ATT: usize = 5;
const TMP: usize = 6;
const HB: usize = 7;
const HB2: usize = 8;
const X16: usize = 9;
const LOGITS: usize = 10;
const SEL: usize = 11;
const TOK: usize = 12;
const POS: usize = 13;
const ITEM: usize = 14;
const KVP: usize = 15;
const SELIDX: usize = 16;
const IDS: usize = 17;
const SIDX: usize = 18;
const SVAL: usize = 19;
const PART: usize = 20;
const CNT: usize = 21;
const AROWS: usize = 22;
const TILES: usize = 23;
const SPRM: usize = 24;
const STOPK: usize = 25;
const ATTP: usize = 26;
const ATTC: usize = 27;
const MPART: usize = 28;
const MCNT: usize = 29;
const BPTR: usize = 30;
const X16B: usize = 31;
const SKP: usize = 32;
const SKC: usize = 33;
const NBUF: usize = 34;
/// Pointers per layer in the batched cuBLAS arrays: Q/K/V (3 matrices, 3 inputs, 3
/// outputs), then gate/up (2 + 2 + 2).
const BPTR_LAYER: usize = 15;

/// Decode attention splits each (row, head) over positions into this many blocks at most,
/// enough that small batches fill the device (about two blocks per SM of an H100/H200).
const ATT_SPLIT_MAX: usize = 8;
const ATT_BLOCKS_WANTED: usize = 264;

/// Query rows per tile of `attention_tiles` (FA_Q in kernels/engine.cu) and the shortest
/// chunk that goes to it (shorter chunks and decode rows use `attention`).
const FA_Q: usize = 64;
const FA_MIN_CHUNK: usize = 16;
/// Dynamic shared memory of `attention_tiles` for head size `hd` (FA_Q, FA_K = 32).
pub(crate) fn attention_tiles_smem(hd: usize) -> usize {
    (FA_Q * hd + hd * 33 + 32 * hd) * 4
}
/// Dynamic shared memory of `attention_mma<hd>`: two buffers of K and V blocks of 64
/// positions, rows padded by 8 bf16 (FM_K in kernels/engine.cu).
pub(crate) fn attention_mma_smem(hd: usize) -> usize {
    2 * 2 * 64 * (hd + 8) * 2
}
/// Threads of `attention_mma*` (FM_WARPS warps).
const FM_THREADS: u32 = 128;

/// Widest input the top-k kernels take (LaRoSA on the GPU).
const TOPK_MAX: usize = 32768;
/// Values per thread of the top-k kernel variants (`TOPK_KERNELS` in kernels/engine.cu).
const TOPK_ITEMS: [usize; 6] = [4, 8, 12, 16, 24, 32];

/// Whether the top-k kernels take rows `d` wide (LaRoSA on the GPU).
fn topk_fits(d: usize) -> Result<()> {
    if d > TOPK_MAX {
        return Err(EngineError::Invalid(format!(
            "LaRoSA on the GPU: the top-k kernel takes inputs up to {TOPK_MAX} wide, not {d}"
        )));
    }
    Ok(())
}

/// Blocks of a top-k cluster and their threads (`TKC`, `TKC_THREADS` in kernels/engine.cu).
const TKC: u32 = 8;
const TKC_THREADS: u32 = 256;
/// Values per thread of the cluster top-k kernel variants (`TOPK_CLUSTER_KERNELS`).
const TKC_ITEMS: [usize; 6] = [2, 4, 6, 8, 12, 16];

/// A top-k kernel for rows `d` wide and how to launch it.
struct TopkLaunch {
    f: cudarc::driver::sys::CUfunction,
    threads: u32,
    /// A cluster of TKC blocks per row (grid (TKC, rows)), else one block per row.
    cluster: bool,
}

impl TopkLaunch {
    fn grid(&self, rows: u32) -> (u32, u32, u32) {
        if self.cluster {
            (TKC, rows, 1)
        } else {
            (rows, 1, 1)
        }
    }
}

/// The top-k kernel for rows `d` wide (`rmsnorm_topk*` when `norm`, else `topk*`): over a
/// cluster where the device runs them ([`Gpu::topk_cluster`]), else one block per row,
/// each the variant with the fewest values per thread that holds the row.
fn topk_kernel(g: &Gpu, d: usize, norm: bool) -> Result<TopkLaunch> {
    topk_fits(d)?;
    if g.topk_cluster() {
        let per = d.div_ceil(TKC as usize).div_ceil(TKC_THREADS as usize);
        if let Some(v) = TKC_ITEMS.iter().position(|&n| n >= per) {
            let f = if norm {
                g.k.rmsnorm_topk_cluster[v]
            } else {
                g.k.topk_cluster[v]
            };
            return Ok(TopkLaunch {
                f,
                threads: TKC_THREADS,
                cluster: true,
            });
        }
    }
    let threads = g.k.topk_threads;
    let per = d.div_ceil(threads as usize);
    let Some(v) = TOPK_ITEMS.iter().position(|&n| n >= per) else {
        return Err(EngineError::Invalid(format!(
            "top-k of {d} values: {threads}-thread blocks take at most {}",
            TOPK_ITEMS[TOPK_ITEMS.len() - 1] * threads as usize
        )));
    };
    let f = if norm {
        g.k.rmsnorm_topk[v]
    } else {
        g.k.topk[v]
    };
    Ok(TopkLaunch {
        f,
        threads,
        cluster: false,
    })
}

/// Threads of an RMSNorm block: one float4 per thread for rows up to 4096 wide.
fn norm_threads(d: usize) -> u32 {
    (d / 4).next_multiple_of(32).clamp(32, 1024) as u32
}

/// Most splits of a sparse product's kept inputs (partial sums `[splits, tiles * tile]`).
const MAX_SPLITS: usize = 128;

/// LaRoSA's top-k activation sparsity on the device (METHODS.md): per token keep the
/// `⌊(1 − coef·s)·d⌋` largest |x| of each linear layer's input, with `coef_in` on the q/k/v and
/// gate/up inputs and `coef_out` on the o_proj and down_proj inputs (the CPU plugin's rule).
/// A single token reads only the kept inputs' weight columns (the transposed copies of
/// [`DeviceModel::prepare_sparse`]); larger batches run the dense product on the masked input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Larosa {
    pub sparsity: f64,
    pub coef_in: f64,
    pub coef_out: f64,
    /// Use the sparse GEMV for single tokens (off: masked input, dense product; for checks).
    pub sparse_gemv: bool,
}

impl From<ActivationSparsity> for Larosa {
    /// A pipeline's sparsity settings, with the sparse products on.
    fn from(a: ActivationSparsity) -> Self {
        Self {
            sparsity: a.sparsity,
            coef_in: a.coef_in,
            coef_out: a.coef_out,
            sparse_gemv: true,
        }
    }
}

impl Larosa {
    pub fn new(sparsity: f64) -> Self {
        Self {
            sparsity,
            coef_in: 0.8,
            coef_out: 1.2,
            sparse_gemv: true,
        }
    }

    /// Inputs kept per token out of `inp` (at least one).
    pub fn keep(&self, out_side: bool, inp: usize) -> usize {
        let coef = if out_side {
            self.coef_out
        } else {
            self.coef_in
        };
        let s = (coef * self.sparsity).clamp(0.0, 1.0);
        ((((1.0 - s) * inp as f64) + 1e-9).floor() as usize).clamp(1, inp)
    }
}

impl Bufs {
    fn get(&mut self, gpu: &Arc<Gpu>, i: usize, bytes: usize) -> Result<u64> {
        if self.f32s.len() < NBUF {
            self.f32s.resize_with(NBUF, || None);
        }
        let small = self.f32s[i].as_ref().is_none_or(|b| b.bytes < bytes);
        if small {
            self.generation += 1;
            self.f32s[i] = None;
            self.f32s[i] = Some(gpu.alloc(bytes.next_power_of_two().max(256))?);
        }
        Ok(self.f32s[i].as_ref().unwrap().ptr)
    }

    /// [`Self::get`] for ticket counters: zeroed whenever (re)allocated; the kernels that
    /// use them reset each counter they take, so they stay zero between calls.
    fn get_zeroed(&mut self, gpu: &Arc<Gpu>, i: usize, bytes: usize) -> Result<u64> {
        let before = self.generation;
        let ptr = self.get(gpu, i, bytes)?;
        if self.generation != before {
            let len = self.f32s[i].as_ref().unwrap().bytes;
            // SAFETY: ptr is a live allocation of len bytes on this device.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, len, gpu.stream) }
                .map_err(|e| EngineError::Invalid(format!("CUDA: memset: {e:?}")))?;
        }
        Ok(ptr)
    }
}

/// The CUDA backend of one pipeline generation: shared device weights, its own buffers.
pub struct CudaBackend {
    pub dm: Arc<DeviceModel>,
    /// Replay decode steps from CUDA graphs (SWITCHYARD_CUDA_GRAPHS=0 turns it off).
    pub graphs_enabled: bool,
    larosa: Option<Larosa>,
    /// Token counts that use the tensor-core products (`mms*`, or `mm*` without `mm_split`;
    /// none by default, see [`MM_TOKENS`]); outside it the GEMV kernels (up to `gemv_max`
    /// tokens) or cuBLAS.
    pub mm_tokens: std::ops::RangeInclusive<usize>,
    /// Decode steps of up to this many tokens replay CUDA graphs.
    pub graph_max_tokens: usize,
    /// Captured graphs kept (least recently used dropped first).
    pub graph_cache_max: usize,
    /// LaRoSA's sparse products: outputs per block (512 or 1024) and how many blocks
    /// a product aims for (the kept inputs are split to get there).
    pub sparse_tile: usize,
    pub sparse_blocks: usize,
    /// Sample on the device when the caller allows it (SWITCHYARD_DEVICE_SAMPLING=0 turns
    /// it off: logits rows go to the host).
    pub device_sampling: bool,
    /// Prefill tiles of head size 64 or 128 run the tensor-core attention (`attention_mma*`);
    /// off (SWITCHYARD_MMA_ATTENTION=0), or for other head sizes, the f32 `attention_tiles`.
    pub mma_attention: bool,
    /// Decode attention takes 4 positions per warp iteration (`attention4`); off
    /// (SWITCHYARD_ATT_U=2), 2 (`attention`). 8 was slower at batch 32 and 64
    /// (bench/results/experiments/).
    pub attention4: bool,
    /// Products inside `mm_tokens` use the split-K kernels (`mms*`) instead of `mm*`.
    pub mm_split: bool,
    /// Blocks an `mms*` product aims for (the inputs are split to get there).
    pub mm_blocks: usize,
    /// cuBLAS passes run Q/K/V (equal rows) and gate/up as one batched product each
    /// (SWITCHYARD_BLAS_BATCHED=0: one product per matrix).
    pub blas_batched: bool,
    /// The kernels before cuBLAS products write their inputs rounded to bf16 (RMSNorm,
    /// decode attention, SiLU·up; see [`Via16`]); off (SWITCHYARD_BF16_INPUTS=0), a
    /// conversion pass runs before each product.
    pub bf16_inputs: bool,
    /// Decode attention's blocks run head-fastest (grid x = heads), so the blocks running
    /// at once read whole K/V rows of fewer sequences; off (SWITCHYARD_ATT_HEADS_X=0),
    /// sequence-fastest.
    pub att_heads_x: bool,
    /// Heads up to 128 wide take the decode attention kernels made for them (one 128-wide
    /// half per lane, the next positions' K/V prefetched); off (SWITCHYARD_ATT_HALF=0), the
    /// kernels for heads up to 256 wide.
    pub att_half: bool,
    /// Token counts outside `mm_tokens` up to this (at most 8) take the GEMV kernels, more
    /// take cuBLAS (SWITCHYARD_GEMV_MAX, default [`GEMV_MAX`]).
    pub gemv_max: usize,
    /// Most waves of blocks an `mms*` product's split count may give (SWITCHYARD_MM_WAVES).
    pub mm_waves: usize,
    /// GEMV products take RMSNorm'd inputs as the raw residual and normalize them on the
    /// way (`gemv*_norm`), so no RMSNorm kernel runs before Q/K/V, gate/up or the head of
    /// one token (see [`Self::fuses_norm`]); off (SWITCHYARD_NORM_GEMV=0), the RMSNorm
    /// kernel writes them first.
    pub norm_gemv: bool,
    /// With `norm_gemv`, one token's Q/K/V GEMV also applies RoPE and writes K/V to the
    /// cache (`gemv1_qkv_rope`), so no RoPE kernel runs; off (SWITCHYARD_ROPE_GEMV=0),
    /// `rope_kv` does.
    pub rope_gemv: bool,
    /// LaRoSA's selections are launched with programmatic dependent launch like the other
    /// kernels (they let the sparse product after them in only when they exit, SEL_LATE in
    /// kernels/engine.cu); off (SWITCHYARD_SELECTION_PDL=0), each selection starts once the
    /// kernel before it has ended (about 1 % slower on the H200, see
    /// bench/results/experiments/README.md).
    pub selection_pdl: bool,
    /// Scratch of the `mms*` products for the current pass (partial sums, tickets).
    mm_scratch: (u64, u64),
    /// Token counts whose products above the GEMV run the stream-K tensor-core kernels
    /// (`sk*`) instead of cuBLAS ([`SkPolicy`]): by default [`SK_AUTO_TOKENS`] when the
    /// model has its fragment-layout copies, else none; none with SWITCHYARD_SK=0;
    /// [`SK_TOKENS`] with SWITCHYARD_SK=1.
    /// Row-major, they lost to cuBLAS from 16 tokens up on an H100 (batch 64: 4,956 vs
    /// 7,708 tok/s; bench/results/experiments/sk-2026-12-07-h100-*).
    pub sk_tokens: std::ops::RangeInclusive<usize>,
    /// Scratch of the `sk*` products for the current pass (partial sums, tickets).
    sk_scratch: (u64, u64),
    /// Decode attention splits a (row, head)'s positions until the grid has this many
    /// blocks (at most 8 splits; SWITCHYARD_ATT_BLOCKS, default 264).
    pub att_blocks: usize,
    /// Heads up to 128 wide (multiples of 8) take the decode attention kernel with half a
    /// warp per position (`attention_hw`: 16-byte loads, 4 shuffles a score); on with
    /// SWITCHYARD_ATT_HW=1.
    pub att_hw: bool,
    /// Token counts whose gated units run on cuBLAS as one product over the joined
    /// gate|up matrix ([`join_glu`]) instead of a batched pair ([`GLU_TOKENS`];
    /// SWITCHYARD_GLU_ONE=0: none, `A-B`: A..=B).
    pub glu_tokens: std::ops::RangeInclusive<usize>,
    graphs: Vec<((usize, usize, usize, u64), GraphExec)>,
    /// Shapes run once eagerly (captured when they come again).
    seen: Vec<(usize, usize, usize, u64)>,
    bufs: Bufs,
    logits: Vec<f32>,
    kvp: Vec<u64>,
    tok: Vec<u32>,
    pos: Vec<i32>,
    item: Vec<i32>,
    selidx: Vec<i32>,
    arows: Vec<i32>,
    tiles: Vec<i32>,
    bptr: Vec<u64>,
    /// (buffer generation, device array) the batched cuBLAS pointers were last uploaded for.
    bptr_sent: (u64, u64),
}

/// Default token range of the split-K tensor-core products: none. Since the kernels before
/// cuBLAS write its inputs as bf16 (no conversion passes), cuBLAS decodes batch 8 faster
/// than these kernels at 3-8 tokens (H200, one call: 1,789 / 1,801 vs 1,666 / 1,687 tok/s,
/// batch 4 883 / 890 vs 875 / 882; `bench/results/experiments/dense-2026-11-30e-*`);
/// `bench gpu --mm-max 8` or [`CudaBackend::mm_tokens`] turn them on.
/// (Empty on purpose: `3..=2` holds no token count.)
#[allow(clippy::reversed_empty_ranges)]
pub const MM_TOKENS: std::ops::RangeInclusive<usize> = 3..=2;
/// Token range of the stream-K products (`sk*`, in place of cuBLAS above the GEMV) with
/// SWITCHYARD_SK=1.
pub const SK_TOKENS: std::ops::RangeInclusive<usize> = 1..=64;
/// Token range of the stream-K products by default ([`SkPolicy::Auto`], over the
/// fragment-layout copies): where they beat cuBLAS on an H100 (decode batch 4: 721 vs
/// 681 tok/s, batch 8: 1,381 vs 1,358; bench/results/experiments/tiled-2026-12-07-h100).
pub const SK_AUTO_TOKENS: std::ops::RangeInclusive<usize> = 3..=8;
/// Token range of the one-product gated unit by default (cuBLAS through PyTorch on an
/// H100, L2 flushed: gate|up of 16 and 32 tokens as one 22,016-row matrix 73.7 / 74.7 µs
/// against 79.2 / 78.6 µs batched; at 64, 77.8 against 75.9;
/// bench/results/h100/gemm-shapes.json).
pub const GLU_TOKENS: std::ops::RangeInclusive<usize> = 9..=32;

/// [`GLU_TOKENS`], or what SWITCHYARD_GLU_ONE says: `0` none, `A-B` the range A..=B.
fn glu_tokens_env() -> std::ops::RangeInclusive<usize> {
    match std::env::var("SWITCHYARD_GLU_ONE").ok().as_deref() {
        None | Some("") | Some("1") => GLU_TOKENS,
        Some("0") => NO_TOKENS,
        Some(v) => match v.split_once('-').map(|(a, b)| (a.parse(), b.parse())) {
            Some((Ok(a), Ok(b))) => a..=b,
            _ => {
                eprintln!(
                    "switchyard: SWITCHYARD_GLU_ONE={v:?}: want 0, 1 or A-B; using the default"
                );
                GLU_TOKENS
            }
        },
    }
}

/// No token count.
#[allow(clippy::reversed_empty_ranges)]
pub const NO_TOKENS: std::ops::RangeInclusive<usize> = 1..=0;
/// Default largest token count of the GEMV kernels (faster than cuBLAS at 1-2 tokens in
/// the product sweep: gate/up 22.4 / 24.2 µs vs 27.3 / 27.4 µs).
pub const GEMV_MAX: usize = 2;
/// Default largest decode step replayed from a CUDA graph.
pub const GRAPH_MAX_TOKENS: usize = 64;
/// Captured decode graphs kept per backend (least recently used dropped first): a shape is
/// (tokens, sampled rows, sequences), so a busy server meets many; each graph holds its
/// nodes' driver memory.
pub const GRAPH_CACHE_MAX: usize = 128;
/// Default output tile and block target of LaRoSA's sparse products (from `bench gpu
/// --larosa`'s kernel sweep on the H200: 512 outputs, 264 blocks were fastest on every
/// Llama-2-7B matrix).
pub const SPARSE_TILE: usize = 512;
pub const SPARSE_BLOCKS: usize = 264;
/// Kept inputs a warp has in flight in the sparse products (`SP_U` in kernels/engine.cu).
const SPARSE_U: usize = 4;

/// How a bf16-input product's input and the gated unit's result travel (Self::proj): the
/// kernel before a cuBLAS or stream-K (`sk*`) product writes its input rounded to bf16
/// itself (RMSNorm and decode attention into the pass's `x16`, SiLU·up into `x16b`), so no
/// conversion pass runs in between.
#[derive(Clone, Copy, Default)]
pub(crate) struct Via16 {
    /// The input is already rounded to bf16: in `src16`, or in `x16` when that is 0.
    input: bool,
    src16: u64,
    /// The gated unit writes bf16(silu(gate)·up) to the pass's `x16b` (the down product's
    /// input), not to y_0.
    glu_out: bool,
    /// What the GEMV does with its input besides the product (RMSNorm on the way, RoPE
    /// after; see [`GemvIn`]).
    gemv: GemvIn,
}

/// What a GEMV does with its input `x` besides the product.
#[derive(Clone, Copy, Debug, Default)]
enum GemvIn {
    /// The product of x as it is.
    #[default]
    Plain,
    /// x is the raw residual: the product of its RMSNorm (weight, eps), taken on the way, so
    /// no RMSNorm kernel runs before it (`gemv*_norm`).
    Norm(u64, f32),
    /// The same for one token's Q/K/V (the three matrices, store), which also apply RoPE and
    /// write K/V to the cache (`gemv1_qkv_rope`), so no `rope_kv` runs after.
    NormRope(u64, f32, RopeIn),
}

/// The RoPE and cache arguments of `gemv1_qkv_rope` (those of `rope_kv` for one token).
#[derive(Clone, Copy, Debug)]
struct RopeIn {
    pos: u64,
    item: u64,
    cos: u64,
    sin: u64,
    /// The layer's K/V pointers per item.
    kvl: u64,
    hd: i32,
    inter: i32,
}

impl Via16 {
    /// The input in `x16` already (`ready`), or to be converted; no bf16 gated output.
    fn input(ready: bool) -> Self {
        Self {
            input: ready,
            src16: 0,
            glu_out: false,
            gemv: GemvIn::Plain,
        }
    }

    /// The input in bf16 in `buf` already (`ready`), or to be converted.
    fn input_at(ready: bool, buf: u64) -> Self {
        Self {
            src16: buf,
            ..Self::input(ready)
        }
    }

    /// The raw residual, for a GEMV that applies its RMSNorm (and maybe RoPE, see [`GemvIn`]).
    fn gemv(gemv: GemvIn) -> Self {
        Self {
            gemv,
            ..Self::default()
        }
    }
}

/// RMSNorm of `rows` rows of `x` (width `d`) with weight `w`: into `out` as f32, or rounded
/// to bf16 when `to16` (the input of a cuBLAS product).
fn launch_rmsnorm(
    g: &Gpu,
    x: u64,
    w: u64,
    (out, to16): (u64, bool),
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let f = if to16 { g.k.rmsnorm16 } else { g.k.rmsnorm };
    let di = d as i32;
    // SAFETY: x holds rows*d f32, w d f32, out rows*d f32 (bf16 with to16).
    unsafe {
        g.launch(
            f,
            (rows as u32, 1, 1),
            norm_threads(d),
            args!(x, w, out, di, eps),
        )
    }
}

/// What a fused product does with its result.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Epilogue {
    /// y_i = W_i·x for each (W_i, y_i).
    Store,
    /// y += W·x (the residual add).
    Add,
    /// y_0 = silu(W_0·x) * (W_1·x) (gate and up; y_1 is scratch for the unfused path).
    Glu,
}

impl Epilogue {
    /// The kernels' `mode` argument (MM_ARGS / SP_ARGS in kernels/engine.cu).
    fn mode(self) -> i32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::Add => 1,
            Epilogue::Glu => 2,
        }
    }
}

/// (weights, output, rows) of each of the up to three matrices of a fused launch; absent
/// ones are zeros.
fn fused_segments(outs: &[(&DevW, u64)], tiled: bool) -> [(u64, u64, i32); 3] {
    let ptr = |w: &DevW| match (&w.tiled, tiled) {
        (Some(b), true) => b.ptr,
        _ => w.buf.ptr,
    };
    let seg = |i: usize| {
        outs.get(i)
            .map_or((0u64, 0u64, 0i32), |(w, y)| (ptr(w), *y, w.rows as i32))
    };
    [seg(0), seg(1), seg(2)]
}

/// The engine's GEMV kernel for up to 8 tokens: y[n, rows] = x[n, cols] · wᵀ.
fn launch_gemv(g: &Gpu, w: &DevW, x: u64, n: usize, y: u64) -> Result<()> {
    launch_fused(
        g,
        Fused::Gemv,
        &[(w, y)],
        x,
        n,
        Epilogue::Store,
        GemvIn::Plain,
    )
}

/// A product kernel with the fused interface (`MM_ARGS` in kernels/engine.cu).
#[derive(Clone, Copy, Debug)]
enum Fused {
    /// gemv1/2/4/8 by token count (f32 inputs, CUDA cores).
    Gemv,
    /// mm8/mm16/mm32 by token count (inputs rounded to bf16, tensor cores).
    Mm,
    /// mms8/16/32/64 by token count (split-K, inputs rounded to bf16 in shared memory,
    /// tensor cores): partial sums in `part`, tickets in `cnt` (zeroed), sized by
    /// [`mms_scratch`].
    Mms {
        part: u64,
        cnt: u64,
        blocks: usize,
        waves: usize,
    },
}

/// Shared memory of one `mms*` block at most (its staged inputs): room for two blocks per
/// SM of an H100/H200 (228 KiB).
pub(crate) const MS_SMEM_MAX: usize = 112 << 10;
/// Matrix rows per `mms*` block (MS_ROWS in kernels/engine.cu).
const MS_ROWS: usize = 128;
/// Blocks an `mms*` launch aims for by default (the inputs are split to get there): two
/// per SM of an H100/H200.
pub const MS_BLOCKS_WANTED: usize = 264;
/// Most waves of blocks the split count of an `mms*` product may give by default.
pub const MS_WAVES_MAX: usize = 2;

/// The launch shape of one `mms*` product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsPlan {
    /// Kernel index (8, 16, 32, 64 tokens) and the token rows it stages.
    kernel: usize,
    ntok: usize,
    /// Row tiles, splits of the inputs, columns per split, dynamic shared memory.
    tiles: usize,
    splits: usize,
    ks: usize,
    smem: usize,
}

impl MsPlan {
    fn new(
        rows: &[usize],
        cols: usize,
        n: usize,
        epi: Epilogue,
        (want_blocks, max_waves): (usize, usize),
    ) -> Self {
        // (kernel, token rows, 32-column blocks a warp has in flight: U in kernels/engine.cu)
        let (kernel, ntok, u) = match n {
            0..=8 => (0, 8, 8),
            9..=16 => (1, 16, 8),
            17..=32 => (2, 32, 4),
            _ => (3, 64, 4),
        };
        let tiles = if epi == Epilogue::Glu {
            rows[0].div_ceil(MS_ROWS / 2)
        } else {
            rows.iter().map(|r| r.div_ceil(MS_ROWS)).sum()
        };
        let nkb = (cols / 32).max(1);
        // 32-column blocks of staged inputs that fit (a row holds ks + 32 values at most).
        let kb_fit = (MS_SMEM_MAX / (ntok * 2) - 32) / 32;
        // `want_blocks` is what runs at once (two blocks per SM). Blocks run in waves, so a
        // grid of 1.1 waves takes as long as two: the split count is chosen for the fullest
        // last wave (fewest splits among equals), with at least one batch of loads per warp
        // and at most `max_waves` waves; the inputs of a split must fit in shared memory.
        let least = nkb.div_ceil(kb_fit).max(1);
        let most = (nkb / u).max(least);
        let wave = want_blocks.max(1);
        let mut best = (least, 0.0f64);
        for s0 in least..=most {
            let s = nkb.div_ceil(nkb.div_ceil(s0));
            let blocks = tiles * s;
            let waves = blocks.div_ceil(wave);
            if waves > max_waves.max(1) && s > least {
                break;
            }
            let full = blocks as f64 / (waves * wave) as f64;
            if full > best.1 + 1e-9 {
                best = (s, full);
            }
        }
        let kbs = nkb.div_ceil(best.0);
        let ks = kbs * 32;
        Self {
            kernel,
            ntok,
            tiles,
            splits: nkb.div_ceil(kbs),
            ks,
            smem: ntok * ms_ld(ks) * 2,
        }
    }

    fn part_floats(&self) -> usize {
        self.splits * self.tiles * self.ntok * MS_ROWS
    }
}

/// Staged input row length of `mms*` for split width `ks` (ldx in kernels/engine.cu): rows
/// 64 bytes off a multiple of 128, so the B reads of two token rows never share a bank.
fn ms_ld(ks: usize) -> usize {
    if ks % 64 == 32 {
        ks
    } else {
        ks + 32
    }
}

/// Floats of partial sums and tickets the `mms*` products of a layer for `n` tokens over
/// model `c` need at most.
fn mms_scratch(c: &Config, n: usize, shape: (usize, usize)) -> (usize, usize) {
    pass_products(c)
        .iter()
        .fold((1, 1), |(f, t), (rows, cols, epi)| {
            let p = MsPlan::new(rows, *cols, n, *epi, shape);
            (f.max(p.part_floats()), t.max(p.tiles))
        })
}

/// The products a pass over model `c` launches (output rows of each matrix, width,
/// epilogue): Q/K/V, o, gate/up, down, the LM head and LaRoSA's residual adapters
/// (Self::linear). The split-K and stream-K scratch is sized over these.
fn pass_products(c: &Config) -> [(Vec<usize>, usize, Epilogue); 6] {
    let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    [
        (vec![qd, kvd, kvd], c.dim, Epilogue::Store),
        (vec![c.dim], qd, Epilogue::Add),
        (vec![c.ffn_dim, c.ffn_dim], c.dim, Epilogue::Glu),
        (vec![c.dim], c.ffn_dim, Epilogue::Add),
        (vec![c.vocab_size], c.dim, Epilogue::Store),
        (vec![c.dim], c.dim, Epilogue::Store),
    ]
}

/// One launch of up to three products of `x` (`n` tokens) with matrices of equal width and
/// the epilogue `epi`.
///
/// `input` (GEMV only, else [`GemvIn::Plain`]): what the GEMV does with `x` besides the
/// product.
fn launch_fused(
    g: &Gpu,
    k: Fused,
    outs: &[(&DevW, u64)],
    x: u64,
    n: usize,
    epi: Epilogue,
    input: GemvIn,
) -> Result<()> {
    let plain = matches!(input, GemvIn::Plain);
    if !plain && !matches!(k, Fused::Gemv) {
        return Err(EngineError::Invalid(format!(
            "CUDA: only the GEMV takes {input:?}, not {k:?}"
        )));
    }
    if matches!(input, GemvIn::NormRope(..))
        && (n != 1 || epi != Epilogue::Store || outs.len() != 3)
    {
        return Err(EngineError::Invalid(format!(
            "CUDA: RoPE rides on one token's Q/K/V product, not {n} tokens of {} matrices ({epi:?})",
            outs.len()
        )));
    }
    if let Fused::Mms {
        part,
        cnt,
        blocks,
        waves,
    } = k
    {
        return launch_mms(g, outs, x, n, epi, (part, cnt), (blocks, waves));
    }
    // (kernel, output rows per block, rows per block of the gated unit, threads)
    let (r4, r8) = gemv_rows();
    // The GEMV by token count and what it does with its input.
    let gemv = |i: usize| match input {
        GemvIn::Plain => g.k.gemv[i],
        GemvIn::Norm(..) => g.k.gemv_norm[i],
        GemvIn::NormRope(..) => g.k.gemv1_qkv_rope,
    };
    let (f, rpb, rpb_glu, threads) = match (k, n) {
        (Fused::Gemv, 1) => (gemv(0), 4, 2, 128),
        (Fused::Gemv, 2) => (gemv(1), 4, 2, 128),
        (Fused::Gemv, 3..=4) => (gemv(2), r4, r4 / 2, 128),
        (Fused::Gemv, _) => (gemv(3), r8, r8 / 2, 128),
        (Fused::Mm, 0..=8) => (g.k.mm[0], 16, 16, 256),
        (Fused::Mm, 9..=16) => (g.k.mm[1], 16, 16, 256),
        (Fused::Mm, _) => (g.k.mm[2], 16, 16, 256),
        (Fused::Mms { .. }, _) => unreachable!("launched above"),
    };
    let [(w0, y0, r0), (w1, y1, r1), (w2, y2, r2)] = fused_segments(outs, false);
    let grid: usize = if epi == Epilogue::Glu {
        outs[0].0.rows.div_ceil(rpb_glu)
    } else {
        outs.iter().map(|(w, _)| w.rows.div_ceil(rpb)).sum()
    };
    let mode = epi.mode();
    let (ci, ni) = (outs[0].0.cols as i32, n as i32);
    let grid = (grid as u32, 1, 1);
    // SAFETY: x holds n*cols f32; each y_i n*rows_i f32; each W_i rows_i*cols bf16; the
    // norm weight cols f32; RoPE's arguments are those rope_kv takes for the pass.
    unsafe {
        match input {
            GemvIn::Plain => g.launch(
                f,
                grid,
                threads,
                args!(w0, w1, w2, y0, y1, y2, r0, r1, r2, x, ci, ni, mode),
            ),
            GemvIn::Norm(nw, eps) => g.launch(
                f,
                grid,
                threads,
                args!(w0, w1, w2, y0, y1, y2, r0, r1, r2, x, ci, ni, mode, nw, eps),
            ),
            GemvIn::NormRope(nw, eps, r) => g.launch(
                f,
                grid,
                threads,
                args!(
                    w0, w1, w2, y0, y1, y2, r0, r1, r2, x, ci, ni, mode, nw, eps, r.pos, r.item,
                    r.cos, r.sin, r.kvl, r.hd, r.inter
                ),
            ),
        }
    }
}

/// Rows per block of `gemv4` and `gemv8` (GEMV_R4 / GEMV_R8 in kernels/engine.cu: 2
/// unless SWITCHYARD_KERNEL_DEFINES sets them, which the kernels were compiled with).
fn gemv_rows() -> (usize, usize) {
    static ROWS: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        let get = |name: &str| {
            super::kernel_define(name)
                .filter(|&r: &usize| r >= 2 && r % 2 == 0)
                .unwrap_or(2)
        };
        (get("GEMV_R4"), get("GEMV_R8"))
    })
}

/// One `mms*` launch (see [`Fused::Mms`]).
fn launch_mms(
    g: &Gpu,
    outs: &[(&DevW, u64)],
    x: u64,
    n: usize,
    epi: Epilogue,
    (part, cnt): (u64, u64),
    shape: (usize, usize),
) -> Result<()> {
    let rows: Vec<usize> = outs.iter().map(|(w, _)| w.rows).collect();
    let cols = outs[0].0.cols;
    let p = MsPlan::new(&rows, cols, n, epi, shape);
    let [(w0, y0, r0), (w1, y1, r1), (w2, y2, r2)] = fused_segments(outs, false);
    let mode = epi.mode();
    let (ci, ni, ks) = (cols as i32, n as i32, p.ks as i32);
    // SAFETY: x holds n*cols f32; each y_i n*rows_i f32; each W_i rows_i*cols bf16; part and
    // cnt were sized by mms_scratch for this product (cnt zero between launches).
    unsafe {
        g.launch_smem(
            g.k.mms[p.kernel],
            (p.tiles as u32, p.splits as u32, 1),
            256,
            p.smem as u32,
            args!(w0, w1, w2, y0, y1, y2, r0, r1, r2, x, ci, ni, mode, part, cnt, ks),
        )
    }
}

/// Threads of an `sk*` block (8 warps of 16 rows: SK_ROWS in kernels/engine.cu).
pub(crate) const SK_THREADS: usize = 256;
/// Matrix rows per `sk*` tile.
const SK_ROWS: usize = 128;

/// 32-column blocks per step of `sk*` kernel `i` (8, 16, 32, 64 tokens): 4, and SK64_U
/// for sk64 when SWITCHYARD_KERNEL_DEFINES sets it (the kernels were compiled with it).
fn sk_u(i: usize) -> usize {
    static U64: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if i < 3 {
        return 4;
    }
    *U64.get_or_init(|| {
        super::kernel_define("SK64_U")
            .filter(|&u: &usize| (1..=8).contains(&u))
            .unwrap_or(4)
    })
}

/// Dynamic shared memory of `sk*` kernel `i`: two staging buffers of 8 << i token rows of
/// U*32 + 8 bf16, and the gated unit's 64 gate rows of sums (8 << i) + 1 wide.
pub(crate) fn sk_smem(i: usize) -> usize {
    let ntok = 8 << i;
    2 * ntok * (sk_u(i) * 32 + 8) * 2 + 64 * (ntok + 1) * 4
}

/// The launch shape of one `sk*` product (see the kernels' comment in kernels/engine.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SkPlan {
    /// Kernel index (8, 16, 32, 64 tokens) and the token rows it computes.
    kernel: usize,
    ntok: usize,
    /// Row tiles, 128-column steps per tile, units (tiles * steps), blocks, and the most
    /// blocks that share one tile (partial-sum slots per tile).
    tiles: usize,
    steps: usize,
    total: usize,
    grid: usize,
    slots: usize,
}

impl SkPlan {
    fn new(rows: &[usize], cols: usize, n: usize, epi: Epilogue, grids: [u32; 4]) -> Self {
        let kernel = match n {
            0..=8 => 0,
            9..=16 => 1,
            17..=32 => 2,
            _ => 3,
        };
        let tiles = if epi == Epilogue::Glu {
            rows[0].div_ceil(SK_ROWS / 2)
        } else {
            rows.iter().map(|r| r.div_ceil(SK_ROWS)).sum()
        };
        let steps = (cols / 32).div_ceil(sk_u(kernel)).max(1);
        let total = tiles * steps;
        let grid = (grids[kernel] as usize).clamp(1, total);
        // The block holding unit u (as sk_block in the kernel).
        let block = |u: usize| ((u + 1) * grid - 1) / total;
        let slots = (0..tiles)
            .map(|t| block(t * steps + steps - 1) - block(t * steps) + 1)
            .max()
            .unwrap_or(1);
        Self {
            kernel,
            ntok: 8 << kernel,
            tiles,
            steps,
            total,
            grid,
            slots,
        }
    }

    fn part_floats(&self) -> usize {
        self.tiles * self.slots * self.ntok * SK_ROWS
    }
}

/// Floats of partial sums and tickets the `sk*` products of a pass of `n` tokens over
/// model `c` need at most.
fn sk_scratch(c: &Config, n: usize, grids: [u32; 4]) -> (usize, usize) {
    pass_products(c)
        .iter()
        .fold((1, 1), |(f, t), (rows, cols, epi)| {
            let p = SkPlan::new(rows, *cols, n, *epi, grids);
            (f.max(p.part_floats()), t.max(p.tiles))
        })
}

/// One `sk*` launch: the products of the bf16 input `x16` (`n` tokens) with up to three
/// matrices of equal width, the epilogue `epi`; the gated unit writes bf16 into `y16`
/// when it is not 0, else f32 into y_0. `(part, cnt)` sized by [`sk_scratch`] (cnt zero
/// between launches); `grids`: the blocks of each kernel (the device's resident blocks,
/// `Kernels::sk_grid`, or fewer for tests).
#[allow(clippy::too_many_arguments)]
fn launch_sk(
    g: &Gpu,
    outs: &[(&DevW, u64)],
    x16: u64,
    n: usize,
    epi: Epilogue,
    y16: u64,
    (part, cnt): (u64, u64),
    grids: [u32; 4],
) -> Result<()> {
    let rows: Vec<usize> = outs.iter().map(|(w, _)| w.rows).collect();
    let cols = outs[0].0.cols;
    if n == 0 || n > 64 || !cols.is_multiple_of(32) {
        return Err(EngineError::Invalid(format!(
            "CUDA: the stream-K product takes 1-64 tokens of a width divisible by 32, not {n} of {cols}"
        )));
    }
    let p = SkPlan::new(&rows, cols, n, epi, grids);
    // The fragment-layout copies when every matrix has one.
    let tiled = outs.iter().all(|(w, _)| w.tiled.is_some());
    let [(w0, y0, r0), (w1, y1, r1), (w2, y2, r2)] = fused_segments(outs, tiled);
    let ti = tiled as i32;
    let mode = match epi {
        Epilogue::Glu if y16 != 0 => 3,
        e => e.mode(),
    };
    let (ci, ni) = (cols as i32, n as i32);
    let (total, slots) = (p.total as i32, p.slots as i32);
    // SAFETY: x16 holds n*cols bf16; each y_i n*rows_i f32 (y16 n*rows_0 bf16); each W_i
    // rows_i*cols bf16; part and cnt were sized by sk_scratch (cnt zero between launches).
    unsafe {
        g.launch_smem(
            g.k.sk[p.kernel],
            (p.grid as u32, 1, 1),
            SK_THREADS as u32,
            sk_smem(p.kernel) as u32,
            args!(
                w0, w1, w2, y0, y1, y2, r0, r1, r2, x16, ci, ni, mode, y16, part, cnt, total,
                slots, ti
            ),
        )
    }
}

/// Output tiles of one sparse product launch (the gated unit's tiles hold half gate, half up).
fn sparse_tiles(tile: usize, rows: &[usize], epi: Epilogue) -> usize {
    if epi == Epilogue::Glu {
        rows[0].div_ceil(tile / 2)
    } else {
        rows.iter().map(|r| r.div_ceil(tile)).sum()
    }
}

/// Floats of partial sums (`part`) and tickets (`cnt`) that sparse product launches over
/// these output sets (rows and epilogue) need at most, for any tile.
fn sparse_scratch(sets: &[(&[usize], Epilogue)]) -> (usize, usize) {
    let (mut floats, mut tiles) = (0, 1);
    for &(rows, epi) in sets {
        for tile in [512, 1024] {
            let t = sparse_tiles(tile, rows, epi);
            floats = floats.max(MAX_SPLITS * t * tile);
            tiles = tiles.max(t);
        }
    }
    (floats, tiles)
}

/// [`sparse_scratch`] for a model's products.
fn model_sparse_scratch(c: &crate::model::Config) -> (usize, usize) {
    let (qd, kvd) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    sparse_scratch(&[
        (&[qd, kvd, kvd], Epilogue::Store),
        (&[c.dim], Epilogue::Add),
        (&[c.ffn_dim, c.ffn_dim], Epilogue::Glu),
    ])
}

/// One launch of `sparse_mm{tile}`: up to three products of one token's `k` kept inputs
/// (`idx`/`val`) with transposed matrices `(Wt, rows, y)` and the epilogue; the kept inputs
/// are split until the launch has about `want_blocks` blocks. `scratch` = (idx, val, part,
/// cnt), with part and cnt sized by [`sparse_scratch`] and cnt zeroed.
fn launch_sparse(
    g: &Gpu,
    tile: usize,
    want_blocks: usize,
    outs: &[(&DevBuf, usize, u64)],
    k: usize,
    epi: Epilogue,
    scratch: (u64, u64, u64, u64),
) -> Result<()> {
    let f = match tile {
        512 => g.k.sparse_mm[0],
        1024 => g.k.sparse_mm[1],
        _ => {
            return Err(EngineError::Invalid(format!(
                "sparse product tile {tile}: 512 or 1024"
            )))
        }
    };
    let rows: Vec<usize> = outs.iter().map(|o| o.1).collect();
    let tiles = sparse_tiles(tile, &rows, epi);
    // Warps across the kept inputs, each with SPARSE_U loads in flight.
    let threads = g.k.sparse_threads;
    let per_round = (threads as usize / 32 / (tile / 256)).max(1) * SPARSE_U;
    let splits = want_blocks
        .div_ceil(tiles)
        .min(k.div_ceil(per_round))
        .clamp(1, MAX_SPLITS);
    let seg = |i: usize| {
        outs.get(i)
            .map_or((0u64, 0u64, 0i32), |(w, r, y)| (w.ptr, *y, *r as i32))
    };
    let ((w0, y0, r0), (w1, y1, r1), (w2, y2, r2)) = (seg(0), seg(1), seg(2));
    let mode = epi.mode();
    let (idx, val, part, cnt) = scratch;
    let ki = k as i32;
    // SAFETY: each Wt_i holds cols rows of rows_i rounded up to 8 bf16 (prepare_sparse's
    // layout; the gated unit's two of equal rows) and every kept index is < cols; y_i holds
    // rows_i f32; part holds MAX_SPLITS * tiles * tile f32 and cnt one zeroed u32 per tile.
    unsafe {
        g.launch(
            f,
            (tiles as u32, splits as u32, 1),
            threads,
            args!(w0, w1, w2, y0, y1, y2, r0, r1, r2, idx, val, ki, mode, part, cnt),
        )
    }
}

/// cuBLAS `GemmEx` after rounding x to bf16 into `x16` (n*cols bf16).
fn launch_cublas(g: &Gpu, w: &DevW, x: u64, x16: u64, n: usize, y: u64) -> Result<()> {
    to_bf16(g, x, x16, n * w.cols)?;
    gemm_bf16(g, w, x16, n, y, false)
}

/// `count` products of equal shape in one cuBLAS call (`cublasGemmBatchedEx`): `arrays` is
/// a device array of 3 * count pointers, the matrices (like `w`: w.rows x w.cols bf16),
/// then the bf16 inputs (`n` x w.cols), then the f32 outputs (`n` x w.rows). One launch
/// fills the device where three 4096x4096 products each leave it half idle.
fn gemm_bf16_batched(g: &Gpu, w: &DevW, arrays: u64, count: usize, n: usize) -> Result<()> {
    let (rows, cols) = (w.rows as i32, w.cols as i32);
    let (alpha, beta) = (1f32, 0f32);
    let per = (count * 8) as u64;
    // SAFETY: arrays holds 3 * count device pointers to buffers of the sizes above.
    unsafe {
        bsys::cublasGemmBatchedEx(
            g.blas,
            bsys::cublasOperation_t::CUBLAS_OP_T,
            bsys::cublasOperation_t::CUBLAS_OP_N,
            rows,
            n as i32,
            cols,
            &alpha as *const f32 as *const c_void,
            arrays as *const *const c_void,
            bsys::cudaDataType::CUDA_R_16BF,
            cols,
            (arrays + per) as *const *const c_void,
            bsys::cudaDataType::CUDA_R_16BF,
            cols,
            &beta as *const f32 as *const c_void,
            (arrays + 2 * per) as *const *mut c_void,
            bsys::cudaDataType::CUDA_R_32F,
            rows,
            count as i32,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .result()
        .map_err(|e| EngineError::Invalid(format!("CUDA: cuBLAS GemmBatchedEx: {e:?}")))
    }
}

/// x16 = x rounded to bf16 (`len` values): the input of [`gemm_bf16`].
fn to_bf16(g: &Gpu, x: u64, x16: u64, len: usize) -> Result<()> {
    let total = len as u64;
    // SAFETY: x holds len f32, x16 len bf16.
    unsafe {
        g.launch(
            g.k.f32_to_bf16,
            (blocks(len, 256).min(4096), 1, 1),
            256,
            args!(x, x16, total),
        )
    }
}

/// y[n, w.rows] = x16[n, w.cols] · wᵀ on cuBLAS (bf16 in, f32 out and accumulation); with
/// `add`, y += the product (cuBLAS's beta = 1: no separate add kernel).
fn gemm_bf16(g: &Gpu, w: &DevW, x16: u64, n: usize, y: u64, add: bool) -> Result<()> {
    // SAFETY: w's buffer holds rows*cols bf16; the caller's x16 and y are sized as asked.
    unsafe { gemm_bf16_raw(g, w.buf.ptr, w.rows, w.cols, x16, n, y, add) }
}

/// [`gemm_bf16`] over a matrix given by address (`rows × cols` bf16 at `w`).
///
/// # Safety
/// `w` holds rows*cols bf16, `x16` n*cols bf16 and `y` n*rows f32.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_bf16_raw(
    g: &Gpu,
    w: u64,
    rows: usize,
    cols: usize,
    x16: u64,
    n: usize,
    y: u64,
    add: bool,
) -> Result<()> {
    if let Some(lt) = g.lt.as_ref().filter(|l| l.tokens.contains(&n)) {
        return lt.gemm(g.stream, w, rows, cols, x16, n, y, add);
    }
    let (rows, cols) = (rows as i32, cols as i32);
    // SAFETY: as the caller promised.
    unsafe {
        let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
        blas::gemm_ex(
            g.blas,
            bsys::cublasOperation_t::CUBLAS_OP_T,
            bsys::cublasOperation_t::CUBLAS_OP_N,
            rows,
            n as i32,
            cols,
            &alpha as *const f32 as *const c_void,
            w as *const c_void,
            bsys::cudaDataType::CUDA_R_16BF,
            cols,
            x16 as *const c_void,
            bsys::cudaDataType::CUDA_R_16BF,
            cols,
            &beta as *const f32 as *const c_void,
            y as *mut c_void,
            bsys::cudaDataType::CUDA_R_32F,
            rows,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| EngineError::Invalid(format!("CUDA: cuBLAS GemmEx: {e:?}")))
    }
}

/// One tensor-core product on the device, for tests: `mats` are bf16 `[rows_i, cols]`
/// matrices, `x` is `[n, cols]`; returns each y_i (`[n, rows_i]`). With [`Epilogue::Add`]
/// y_0 starts as `y0`; with [`Epilogue::Glu`] only y_0 is meaningful. `kernel`:
/// [`ProductKernel::Mm`] (up to 32 tokens), [`ProductKernel::Mms`] or
/// [`ProductKernel::Sk`] (up to 64; x rounded to bf16 first). With `Sk` and
/// [`Epilogue::Glu`], y_1 holds the gated unit's bf16 output (mode 3), widened to f32.
#[allow(clippy::too_many_arguments)]
pub fn mm_product(
    gpu: &Arc<Gpu>,
    kernel: ProductKernel,
    mats: &[(&[u16], usize)],
    cols: usize,
    x: &[f32],
    n: usize,
    epi: Epilogue,
    y0: Option<&[f32]>,
) -> Result<Vec<Vec<f32>>> {
    let (most, blocks) = match kernel {
        ProductKernel::Mm => (32, MS_BLOCKS_WANTED),
        ProductKernel::Mms { blocks } => (64, blocks.max(1)),
        ProductKernel::Sk { blocks } | ProductKernel::SkTiled { blocks } => (64, blocks),
        _ => (0, MS_BLOCKS_WANTED),
    };
    if n == 0 || n > most || !cols.is_multiple_of(32) || mats.is_empty() || mats.len() > 3 {
        return Err(EngineError::Invalid(format!(
            "tensor-core product ({kernel:?}): {n} tokens of width {cols} with {} matrices",
            mats.len()
        )));
    }
    if epi == Epilogue::Glu && (mats.len() != 2 || mats[0].1 != mats[1].1) {
        return Err(EngineError::Invalid(
            "tensor-core product: a gated unit takes two matrices of equal rows".into(),
        ));
    }
    let tiled = matches!(kernel, ProductKernel::SkTiled { .. });
    let ws = mats
        .iter()
        .map(|(w, rows)| -> Result<DevW> {
            // (refused for shapes the layout does not take: no silent row-major reads)
            DevW::new(gpu.upload(w)?, *rows, cols).tiled_if(gpu, tiled)
        })
        .collect::<Result<Vec<_>>>()?;
    let ys = mats
        .iter()
        .map(|(_, rows)| gpu.alloc(n * rows * 4))
        .collect::<Result<Vec<_>>>()?;
    if let Some(y0) = y0 {
        ys[0].write(y0)?;
    }
    let xb = gpu.upload(x)?;
    let outs: Vec<(&DevW, u64)> = ws.iter().zip(&ys).map(|(w, y)| (w, y.ptr)).collect();
    let rows: Vec<usize> = mats.iter().map(|(_, r)| *r).collect();
    if let ProductKernel::Sk { blocks } | ProductKernel::SkTiled { blocks } = kernel {
        let grids = if blocks == 0 {
            gpu.k.sk_grid
        } else {
            [blocks as u32; 4]
        };
        let x16 = gpu.alloc(n * cols * 2)?;
        to_bf16(gpu, xb.ptr, x16.ptr, n * cols)?;
        let plan = SkPlan::new(&rows, cols, n, epi, grids);
        let part = gpu.alloc(plan.part_floats() * 4)?;
        let cnt = gpu.upload(&vec![0u32; plan.tiles])?;
        let sc = (part.ptr, cnt.ptr);
        let y16 = gpu.alloc(n * rows[0] * 2)?;
        launch_sk(gpu, &outs, x16.ptr, n, epi, 0, sc, grids)?;
        if epi != Epilogue::Add {
            // Again: the tickets must be back at zero for the second launch to finish right.
            launch_sk(gpu, &outs, x16.ptr, n, epi, 0, sc, grids)?;
        }
        let mut got = ys
            .iter()
            .zip(mats)
            .map(|(y, (_, rows))| y.read::<f32>(n * rows))
            .collect::<Result<Vec<_>>>()?;
        if epi == Epilogue::Glu {
            launch_sk(gpu, &outs, x16.ptr, n, epi, y16.ptr, sc, grids)?;
            got[1] = y16
                .read::<u16>(n * rows[0])?
                .into_iter()
                .map(|h| f32::from_bits((h as u32) << 16))
                .collect();
        }
        return Ok(got);
    }
    // Partial sums and tickets for the split-K kernel (held until the launches are done).
    let mut scratch = Vec::new();
    let k = match kernel {
        ProductKernel::Mms { .. } => {
            let plan = MsPlan::new(&rows, cols, n, epi, (blocks, MS_WAVES_MAX));
            scratch.push(gpu.alloc(plan.part_floats() * 4)?);
            scratch.push(gpu.upload(&vec![0u32; plan.tiles])?);
            Fused::Mms {
                part: scratch[0].ptr,
                cnt: scratch[1].ptr,
                blocks,
                waves: MS_WAVES_MAX,
            }
        }
        _ => Fused::Mm,
    };
    launch_fused(gpu, k, &outs, xb.ptr, n, epi, GemvIn::Plain)?;
    // Twice: the tickets must be back at zero for the second launch to finish right.
    if let (ProductKernel::Mms { .. }, Epilogue::Store | Epilogue::Glu) = (kernel, epi) {
        launch_fused(gpu, k, &outs, xb.ptr, n, epi, GemvIn::Plain)?;
    }
    ys.iter()
        .zip(mats)
        .map(|(y, (_, rows))| y.read::<f32>(n * rows))
        .collect()
}

/// One sparse product on the device, for tests: `mats` are transposed bf16 `[cols, rows_i]`
/// matrices (any rows; padded here as [`DeviceModel::prepare_sparse`] pads them), one
/// token's kept inputs `idx` (ascending, < cols) with values `val`; returns each y_i
/// (`rows_i`). With [`Epilogue::Add`] y_0 starts as `y0`; with [`Epilogue::Glu`]
/// only y_0 is meaningful. `tile` and `want_blocks` as [`CudaBackend::sparse_tile`] and
/// [`CudaBackend::sparse_blocks`].
#[allow(clippy::too_many_arguments)]
pub fn sparse_product(
    gpu: &Arc<Gpu>,
    mats: &[(&[u16], usize)],
    cols: usize,
    idx: &[i32],
    val: &[f32],
    tile: usize,
    want_blocks: usize,
    epi: Epilogue,
    y0: Option<&[f32]>,
) -> Result<Vec<Vec<f32>>> {
    let bad_rows = mats.iter().any(|(w, r)| *r == 0 || w.len() != r * cols);
    let bad_idx = idx.iter().any(|&i| i < 0 || i as usize >= cols);
    let bad_glu = epi == Epilogue::Glu && (mats.len() != 2 || mats[0].1 != mats[1].1);
    if mats.is_empty() || mats.len() > 3 || bad_rows || bad_idx || bad_glu || idx.len() != val.len()
    {
        return Err(EngineError::Invalid(format!(
            "sparse product: {} matrices of width {cols} (the gated unit: two of equal rows), \
             {} kept inputs",
            mats.len(),
            idx.len()
        )));
    }
    // Rows padded to a multiple of 8 with zeros, as prepare_sparse lays them out.
    let ws = mats
        .iter()
        .map(|(w, rows)| {
            let ld = rows.next_multiple_of(8);
            let mut p = vec![0u16; cols * ld];
            for c in 0..cols {
                p[c * ld..c * ld + rows].copy_from_slice(&w[c * rows..(c + 1) * rows]);
            }
            gpu.upload(&p)
        })
        .collect::<Result<Vec<_>>>()?;
    let ys = mats
        .iter()
        .map(|(_, rows)| gpu.alloc(rows * 4))
        .collect::<Result<Vec<_>>>()?;
    if let Some(y0) = y0 {
        ys[0].write(y0)?;
    }
    let rows: Vec<usize> = mats.iter().map(|m| m.1).collect();
    let (floats, tiles) = sparse_scratch(&[(&rows, epi)]);
    let part = gpu.alloc(floats * 4)?;
    let cnt = gpu.upload(&vec![0u32; tiles])?;
    let (ib, vb) = (gpu.upload(idx)?, gpu.upload(val)?);
    let outs: Vec<(&DevBuf, usize, u64)> = ws
        .iter()
        .zip(&ys)
        .zip(&rows)
        .map(|((w, y), &r)| (w, r, y.ptr))
        .collect();
    let scratch = (ib.ptr, vb.ptr, part.ptr, cnt.ptr);
    launch_sparse(gpu, tile, want_blocks, &outs, idx.len(), epi, scratch)?;
    ys.iter()
        .zip(&rows)
        .map(|(y, &r)| y.read::<f32>(r))
        .collect()
}

/// Rows of logits a batch asks for.
fn logits_rows(batch: &[SeqChunk]) -> usize {
    batch
        .iter()
        .map(|b| b.tokens.len().saturating_sub(b.logits_from))
        .sum()
}

/// The sampler's parameter arrays: (temperature, top_p, u) per row, and top_k per row.
fn sample_params(rows: &[RowSampling]) -> (Vec<f32>, Vec<i32>) {
    let prm = rows
        .iter()
        .flat_map(|r| [r.temperature, r.top_p, r.u])
        .collect();
    let topk = rows
        .iter()
        .map(|r| r.top_k.min(i32::MAX as u32) as i32)
        .collect();
    (prm, topk)
}

/// Upload the sampler's parameters (into `p`, `tk`) and run `sample_rows` over
/// `prm.len() / 3` rows of `logits`, ids into `ids`.
#[allow(clippy::too_many_arguments)]
fn launch_sample(
    g: &Gpu,
    logits: u64,
    vocab: usize,
    prm: &[f32],
    topk: &[i32],
    p: u64,
    tk: u64,
    ids: u64,
) -> Result<()> {
    let n = topk.len();
    let vocab = vocab as i32;
    // SAFETY: logits holds n rows of vocab f32, p 3n f32, tk and ids n values; prm and topk
    // outlive the copies (pageable copies are staged before the call returns).
    unsafe {
        use cudarc::driver::result as cu;
        cu::memcpy_htod_async(p, bytes_of(prm), g.stream)
            .and_then(|_| cu::memcpy_htod_async(tk, bytes_of(topk), g.stream))
            .map_err(|e| EngineError::Invalid(format!("CUDA: upload: {e:?}")))?;
        g.launch(
            g.k.sample_rows,
            (n as u32, 1, 1),
            1024,
            args!(logits, vocab, p, tk, ids),
        )
    }
}

/// The device sampler on host logits rows (`[rows.len(), vocab]`), for tests.
pub fn sample_on_device(
    gpu: &Arc<Gpu>,
    logits: &[f32],
    vocab: usize,
    rows: &[RowSampling],
) -> Result<Vec<u32>> {
    if rows.is_empty() || logits.len() != rows.len() * vocab {
        return Err(EngineError::Invalid(format!(
            "device sampling: {} logits for {} rows of {vocab}",
            logits.len(),
            rows.len()
        )));
    }
    let l = gpu.upload(logits)?;
    let (prm, topk) = sample_params(rows);
    let p = gpu.alloc(prm.len() * 4)?;
    let tk = gpu.alloc(topk.len() * 4)?;
    let ids = gpu.alloc(rows.len() * 4)?;
    launch_sample(gpu, l.ptr, vocab, &prm, &topk, p.ptr, tk.ptr, ids.ptr)?;
    ids.read::<u32>(rows.len())
}

/// Which product kernel [`product_secs`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductKernel {
    /// The GEMV kernels (up to 8 tokens, f32 inputs).
    Gemv,
    /// The tensor-core `mm*` kernels (up to 32 tokens, inputs 32-aligned).
    Mm,
    /// The split-K tensor-core `mms*` kernels (up to 64 tokens, inputs 32-aligned), the
    /// inputs split to aim for `blocks` blocks.
    Mms { blocks: usize },
    /// cuBLAS GemmEx with the bf16 rounding of the input.
    Cublas,
    /// The stream-K tensor-core `sk*` kernels (up to 64 tokens, bf16 inputs 32-aligned) on
    /// `blocks` blocks (0: the device's persistent grid), with the bf16 rounding of the input.
    Sk { blocks: usize },
    /// cuBLAS GemmEx on an input already in bf16 (what the pass runs: the kernel before
    /// writes it), to set beside [`ProductKernel::Sk`] without the rounding pass.
    Cublas16,
    /// [`ProductKernel::Sk`] on an input already in bf16.
    Sk16,
    /// [`ProductKernel::Sk`] over the weights' fragment-layout copies ([`tile_copy`]).
    SkTiled { blocks: usize },
    /// [`ProductKernel::Sk16`] over the weights' fragment-layout copies.
    SkTiled16,
}

/// Random bf16 weight buffers of `bytes` each (seeds from `seed`), enough of them to
/// exceed the L2 cache, so that timed launches cycling through them read DRAM.
fn weight_copies(gpu: &Arc<Gpu>, bytes: usize, seed: u32) -> Result<Vec<DevBuf>> {
    (0..(256 << 20) / bytes + 1)
        .map(|i| {
            let buf = gpu.alloc(bytes)?;
            gpu.fill_random_bf16(&buf, seed + i as u32, 0.05)?;
            Ok(buf)
        })
        .collect()
}

/// Seconds per `[rows, cols]` product of `n` tokens with `kernel` (random bf16 weights, mean
/// of `reps` back-to-back launches after a warm-up): the product sweep of `bench gpu`.
pub fn product_secs(
    gpu: &Arc<Gpu>,
    rows: usize,
    cols: usize,
    n: usize,
    kernel: ProductKernel,
    reps: usize,
) -> Result<f64> {
    let tiled = matches!(
        kernel,
        ProductKernel::SkTiled { .. } | ProductKernel::SkTiled16
    );
    let ws: Vec<DevW> = weight_copies(gpu, rows * cols * 2, 7)?
        .into_iter()
        .map(|buf| DevW::new(buf, rows, cols).tiled_if(gpu, tiled))
        .collect::<Result<_>>()?;
    let x = gpu.alloc(n * cols * 4)?;
    let x16 = gpu.alloc(n * cols * 2)?;
    let y = gpu.alloc(n * rows * 4)?;
    x.write(&vec![0.5f32; n * cols])?;
    let blocks = match kernel {
        ProductKernel::Mms { blocks } => blocks.max(1),
        _ => MS_BLOCKS_WANTED,
    };
    let plan = MsPlan::new(&[rows], cols, n, Epilogue::Store, (blocks, MS_WAVES_MAX));
    let part = gpu.alloc(plan.part_floats() * 4)?;
    let cnt = gpu.upload(&vec![0u32; plan.tiles])?;
    let sk_grids = match kernel {
        ProductKernel::Sk { blocks } | ProductKernel::SkTiled { blocks } if blocks > 0 => {
            [blocks as u32; 4]
        }
        _ => gpu.k.sk_grid,
    };
    let skp = SkPlan::new(&[rows], cols, n.clamp(1, 64), Epilogue::Store, sk_grids);
    let sk_part = gpu.alloc(skp.part_floats() * 4)?;
    let sk_cnt = gpu.upload(&vec![0u32; skp.tiles])?;
    let sk_sc = (sk_part.ptr, sk_cnt.ptr);
    let run = |w: &DevW| -> Result<()> {
        match kernel {
            ProductKernel::Mms { .. } => {
                let k = Fused::Mms {
                    part: part.ptr,
                    cnt: cnt.ptr,
                    blocks,
                    waves: MS_WAVES_MAX,
                };
                launch_fused(
                    gpu,
                    k,
                    &[(w, y.ptr)],
                    x.ptr,
                    n,
                    Epilogue::Store,
                    GemvIn::Plain,
                )
            }
            ProductKernel::Gemv => launch_gemv(gpu, w, x.ptr, n, y.ptr),
            ProductKernel::Mm => launch_fused(
                gpu,
                Fused::Mm,
                &[(w, y.ptr)],
                x.ptr,
                n,
                Epilogue::Store,
                GemvIn::Plain,
            ),
            ProductKernel::Cublas => launch_cublas(gpu, w, x.ptr, x16.ptr, n, y.ptr),
            ProductKernel::Cublas16 => gemm_bf16(gpu, w, x16.ptr, n, y.ptr, false),
            ProductKernel::Sk { .. } | ProductKernel::SkTiled { .. } => {
                to_bf16(gpu, x.ptr, x16.ptr, n * cols)?;
                let outs = [(w, y.ptr)];
                launch_sk(gpu, &outs, x16.ptr, n, Epilogue::Store, 0, sk_sc, sk_grids)
            }
            ProductKernel::Sk16 | ProductKernel::SkTiled16 => {
                let outs = [(w, y.ptr)];
                launch_sk(gpu, &outs, x16.ptr, n, Epilogue::Store, 0, sk_sc, sk_grids)
            }
        }
    };
    gpu.mean_secs(ws.len(), reps, |i| run(&ws[i % ws.len()]))
}

/// Seconds per sparse product (`sparse_mm{tile}`, store) of one token's `keep` kept inputs
/// (evenly spread over `cols`) with a transposed `[cols, rows]` matrix: random bf16
/// weights in copies larger than the L2 cache, mean of `reps` launches after a warm-up.
pub fn sparse_product_secs(
    gpu: &Arc<Gpu>,
    rows: usize,
    cols: usize,
    keep: usize,
    tile: usize,
    want_blocks: usize,
    reps: usize,
) -> Result<f64> {
    let keep = keep.clamp(1, cols);
    let ws = weight_copies(gpu, rows.next_multiple_of(8) * cols * 2, 11)?;
    let idx: Vec<i32> = (0..keep).map(|j| (j * cols / keep) as i32).collect();
    let idx = gpu.upload(&idx)?;
    let val = gpu.upload(&vec![0.5f32; keep])?;
    let y = gpu.alloc(rows * 4)?;
    let (floats, tiles) = sparse_scratch(&[(&[rows], Epilogue::Store)]);
    let part = gpu.alloc(floats * 4)?;
    let cnt = gpu.upload(&vec![0u32; tiles])?;
    let run = |w: &DevBuf| {
        launch_sparse(
            gpu,
            tile,
            want_blocks,
            &[(w, rows, y.ptr)],
            keep,
            Epilogue::Store,
            (idx.ptr, val.ptr, part.ptr, cnt.ptr),
        )
    };
    gpu.mean_secs(ws.len(), reps, |i| run(&ws[i % ws.len()]))
}

/// Seconds per top-k launch on one row of `d` values keeping `k` (mode 0, kept list):
/// `topk` alone, or `rmsnorm_topk` when `norm` (the LaRoSA path's selection cost).
pub fn topk_secs(gpu: &Arc<Gpu>, d: usize, k: usize, norm: bool, reps: usize) -> Result<f64> {
    let tl = topk_kernel(gpu, d, norm)?;
    let x: Vec<f32> = (0..d)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let xd = gpu.upload(&x)?;
    let w = gpu.upload(&vec![1f32; d])?;
    let out = gpu.alloc(d * 4)?;
    let idx = gpu.alloc(d * 4)?;
    let val = gpu.alloc(d * 4)?;
    let (di, ki, mode, eps) = (d as i32, k as i32, 0i32, 1e-5f32);
    let run = || -> Result<()> {
        // SAFETY: xd/out hold d f32, idx/val d entries.
        unsafe {
            if norm {
                gpu.launch(
                    tl.f,
                    tl.grid(1),
                    tl.threads,
                    args!(xd.ptr, w.ptr, out.ptr, di, eps, ki, idx.ptr, val.ptr, mode),
                )
            } else {
                gpu.launch(
                    tl.f,
                    tl.grid(1),
                    tl.threads,
                    args!(xd.ptr, di, ki, idx.ptr, val.ptr, mode),
                )
            }
        }
    };
    gpu.mean_secs(1, reps, |_| run())
}

/// RMSNorm and top-k of one row on the device (`rmsnorm_topk`, mode 0): the kept indices
/// (ascending) and their normalized values (checks).
pub fn norm_topk(
    gpu: &Arc<Gpu>,
    x: &[f32],
    w: &[f32],
    eps: f32,
    k: usize,
) -> Result<(Vec<i32>, Vec<f32>)> {
    if x.is_empty() || x.len() > TOPK_MAX || w.len() != x.len() {
        return Err(EngineError::Invalid(format!(
            "RMSNorm + top-k of {} values with {} weights: 1 to {TOPK_MAX}, equal",
            x.len(),
            w.len()
        )));
    }
    let k = k.clamp(1, x.len());
    let tl = topk_kernel(gpu, x.len(), true)?;
    let xd = gpu.upload(x)?;
    let wd = gpu.upload(w)?;
    let out = gpu.alloc(x.len() * 4)?;
    let idx = gpu.alloc(k * 4)?;
    let val = gpu.alloc(k * 4)?;
    let (d, ki, mode) = (x.len() as i32, k as i32, 0i32);
    // SAFETY: xd/wd/out hold d f32, idx/val k entries.
    unsafe {
        gpu.launch(
            tl.f,
            tl.grid(1),
            tl.threads,
            args!(xd.ptr, wd.ptr, out.ptr, d, eps, ki, idx.ptr, val.ptr, mode),
        )?;
    }
    Ok((idx.read::<i32>(k)?, val.read::<f32>(k)?))
}

/// How the stream-K tensor-core products (`sk*`) are used, from SWITCHYARD_SK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkPolicy {
    /// Unset or "auto": at [`SK_AUTO_TOKENS`] tokens, over the weights' fragment-layout
    /// copies, which are built when they take at most half the device's free memory after
    /// the upload (else no `sk*` at all); cuBLAS above.
    Auto,
    /// "0": never (cuBLAS above the GEMV), and no copies.
    Off,
    /// "1": at every count in [`SK_TOKENS`], row-major unless SWITCHYARD_SK_TILED=1
    /// (an experiment: they lose to cuBLAS from 16 tokens up).
    All,
}

/// [`SkPolicy`] from SWITCHYARD_SK.
pub fn sk_policy() -> SkPolicy {
    match std::env::var("SWITCHYARD_SK").as_deref() {
        Ok("1") => SkPolicy::All,
        Ok("0") => SkPolicy::Off,
        _ => SkPolicy::Auto,
    }
}

/// Whether models get the stream-K products' fragment-layout weight copies: `Some(true)`
/// always (SWITCHYARD_SK_TILED=1 with the products on), `Some(false)` never
/// (SWITCHYARD_SK=0, SWITCHYARD_SK_TILED=0, or SWITCHYARD_SK=1 without
/// SWITCHYARD_SK_TILED=1), `None` when they fit ([`DeviceModel::prepare_tiled_by_policy`]).
pub fn tiled_wanted() -> Option<bool> {
    let env = std::env::var("SWITCHYARD_SK_TILED");
    match (sk_policy(), env.as_deref()) {
        (SkPolicy::Off, _) | (_, Ok("0")) => Some(false),
        (_, Ok("1")) => Some(true),
        (SkPolicy::All, _) => Some(false),
        (SkPolicy::Auto, _) => None,
    }
}

/// A switch that is on unless the variable `name` is "0".
/// Variable `name` parsed, else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// Whether new backends launch LaRoSA's selections with programmatic dependent launch
/// (unless SWITCHYARD_SELECTION_PDL=0; see [`CudaBackend::selection_pdl`]).
pub fn selection_pdl_default() -> bool {
    env_on("SWITCHYARD_SELECTION_PDL")
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).clamp(1, 65535) as u32
}

impl CudaBackend {
    pub fn new(dm: Arc<DeviceModel>) -> Self {
        let tiled = dm.has_tiled();
        Self {
            dm,
            graphs_enabled: env_on("SWITCHYARD_CUDA_GRAPHS"),
            larosa: None,
            mm_tokens: MM_TOKENS,
            graph_max_tokens: GRAPH_MAX_TOKENS,
            graph_cache_max: GRAPH_CACHE_MAX,
            sparse_tile: SPARSE_TILE,
            sparse_blocks: SPARSE_BLOCKS,
            device_sampling: env_on("SWITCHYARD_DEVICE_SAMPLING"),
            mma_attention: env_on("SWITCHYARD_MMA_ATTENTION"),
            attention4: std::env::var("SWITCHYARD_ATT_U").map_or(true, |v| v != "2"),
            mm_split: true,
            mm_blocks: MS_BLOCKS_WANTED,
            blas_batched: env_on("SWITCHYARD_BLAS_BATCHED"),
            bf16_inputs: env_on("SWITCHYARD_BF16_INPUTS"),
            att_heads_x: env_on("SWITCHYARD_ATT_HEADS_X"),
            att_half: env_on("SWITCHYARD_ATT_HALF"),
            gemv_max: env_or("SWITCHYARD_GEMV_MAX", GEMV_MAX),
            mm_waves: env_or("SWITCHYARD_MM_WAVES", MS_WAVES_MAX),
            norm_gemv: env_on("SWITCHYARD_NORM_GEMV"),
            rope_gemv: env_on("SWITCHYARD_ROPE_GEMV"),
            selection_pdl: selection_pdl_default(),
            mm_scratch: (0, 0),
            sk_tokens: match sk_policy() {
                SkPolicy::All => SK_TOKENS,
                SkPolicy::Auto if tiled => SK_AUTO_TOKENS,
                _ => NO_TOKENS,
            },
            sk_scratch: (0, 0),
            glu_tokens: glu_tokens_env(),
            att_blocks: env_or("SWITCHYARD_ATT_BLOCKS", ATT_BLOCKS_WANTED),
            att_hw: std::env::var("SWITCHYARD_ATT_HW").is_ok_and(|v| v == "1"),
            graphs: Vec::new(),
            seen: Vec::new(),
            bufs: Bufs::default(),
            logits: Vec::new(),
            kvp: Vec::new(),
            tok: Vec::new(),
            pos: Vec::new(),
            item: Vec::new(),
            selidx: Vec::new(),
            arows: Vec::new(),
            tiles: Vec::new(),
            bptr: Vec::new(),
            bptr_sent: (u64::MAX, 0),
        }
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.dm.gpu
    }

    /// Decode graphs captured and kept now.
    pub fn cached_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Turn LaRoSA's activation sparsity on (or off with `None`). The sparse GEMV needs
    /// the model's transposed weights ([`DeviceModel::prepare_sparse`]); without them, or
    /// for more than one token, the dense product runs on the masked input.
    pub fn set_larosa(&mut self, l: Option<Larosa>) {
        self.larosa = l;
        self.graphs.clear();
    }

    pub fn larosa(&self) -> Option<Larosa> {
        self.larosa
    }

    /// Whether LaRoSA keeps fewer than all `d` inputs of a product, and how many it keeps.
    fn kept(&self, out_side: bool, d: usize) -> Option<(Larosa, usize)> {
        let l = self.larosa?;
        let k = l.keep(out_side, d);
        (k < d).then_some((l, k))
    }

    /// Whether the pass's products read only kept inputs (one token, transposed weights).
    fn sparse_pass(&self, p: &Pass, l: Larosa, have_weights: bool) -> bool {
        have_weights && l.sparse_gemv && p.n == 1
    }

    /// RMSNorm of the `n` rows of `x` into `xb` with LaRoSA's top-k on the result (input
    /// side) in the same kernel. Returns `Some(k)` when the single token's `k` kept inputs
    /// are in `sidx`/`sval` for the sparse products (xb is then not written); `None` when
    /// `xb` holds the rows, masked if LaRoSA is on.
    ///
    /// With `to16` (no LaRoSA) the rows go to `p.x16` rounded to bf16 instead of `xb`.
    fn norm(
        &self,
        p: &Pass,
        x: u64,
        w: &DevBuf,
        (xb, to16): (u64, bool),
        sparse: bool,
    ) -> Result<Option<usize>> {
        let g = &self.dm.gpu;
        let c = &self.dm.cfg;
        let (d, eps, nu) = (c.dim, c.rms_eps, p.n as u32);
        let di = d as i32;
        let Some((l, k)) = self.kept(false, d) else {
            let out = if to16 { p.x16 } else { xb };
            launch_rmsnorm(g, x, w.ptr, (out, to16), p.n, d, eps)?;
            return Ok(None);
        };
        let tl = topk_kernel(g, d, true)?;
        let use_sparse = self.sparse_pass(p, l, sparse);
        let (ki, mode) = (k as i32, if use_sparse { 0i32 } else { 1 });
        // SAFETY: x/xb hold n rows of d f32 (d <= TOPK_MAX, checked above);
        // sidx/sval hold k entries for one row.
        unsafe {
            self.launch_selection(
                tl.f,
                tl.grid(nu),
                tl.threads,
                args!(x, w.ptr, xb, di, eps, ki, p.sidx, p.sval, mode),
            )?;
        }
        Ok(use_sparse.then_some(k))
    }

    /// Launch a LaRoSA selection: plainly (it starts once the kernel before it has ended)
    /// unless [`Self::selection_pdl`].
    ///
    /// # Safety
    /// As for [`Gpu::launch`].
    unsafe fn launch_selection(
        &self,
        f: cudarc::driver::sys::CUfunction,
        grid: (u32, u32, u32),
        threads: u32,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        let g = &self.dm.gpu;
        // SAFETY: upheld by the caller.
        unsafe {
            if self.selection_pdl {
                g.launch(f, grid, threads, args)
            } else {
                g.launch_serial(f, grid, threads, args)
            }
        }
    }

    /// LaRoSA's top-k on the `n` rows of `x` (width `d`, output side: the o_proj and
    /// down_proj inputs). Returns `Some(k)` when the single token's `k` kept inputs are in
    /// `sidx`/`sval` for the sparse products; `None` when `x` is used densely (no sparsity,
    /// or masked in place).
    fn sparsify(&self, p: &Pass, x: u64, d: usize, sparse: bool) -> Result<Option<usize>> {
        let Some((l, k)) = self.kept(true, d) else {
            return Ok(None);
        };
        let g = &self.dm.gpu;
        let tl = topk_kernel(g, d, false)?;
        let use_sparse = self.sparse_pass(p, l, sparse);
        let (di, ki, mode) = (d as i32, k as i32, if use_sparse { 0i32 } else { 1 });
        // SAFETY: x holds n rows of d f32; sidx/sval hold k entries for one row.
        unsafe {
            self.launch_selection(
                tl.f,
                tl.grid(p.n as u32),
                tl.threads,
                args!(x, di, ki, p.sidx, p.sval, mode),
            )?;
        }
        Ok(use_sparse.then_some(k))
    }

    /// Products of one token's `k` kept inputs (`sidx`/`sval`) with up to three transposed
    /// matrices (`(Wt, rows, y)`) and the epilogue, in one launch of `sparse_mm*`.
    fn sparse_proj(
        &self,
        p: &Pass,
        outs: &[(&DevBuf, usize, u64)],
        k: usize,
        epi: Epilogue,
    ) -> Result<()> {
        launch_sparse(
            &self.dm.gpu,
            self.sparse_tile,
            self.sparse_blocks,
            outs,
            k,
            epi,
            (p.sidx, p.sval, p.part, p.cnt),
        )
    }

    /// The fused kernel that takes `n` tokens of inputs `cols` wide, if one does: the
    /// tensor-core products inside [`Self::mm_tokens`] (inputs 32-aligned), else the GEMV up
    /// to [`Self::gemv_max`] tokens; above that cuBLAS, unfused.
    fn fused_kernel(&self, n: usize, cols: usize) -> Option<Fused> {
        if self.mm_tokens.contains(&n) && cols.is_multiple_of(32) {
            Some(if self.mm_split && n <= 64 {
                let (part, cnt) = self.mm_scratch;
                Fused::Mms {
                    part,
                    cnt,
                    blocks: self.mm_blocks.max(1),
                    waves: self.mm_waves,
                }
            } else {
                Fused::Mm
            })
        } else if n <= self.gemv_max.min(8) {
            Some(Fused::Gemv)
        } else {
            None
        }
    }

    /// Whether cuBLAS runs a gated unit's gate and up of `n` tokens as one product over the
    /// joined matrix ([`join_glu`]: `wu` right after `wg`), with the gate's output buffer
    /// sized for both halves ([`Self::run`]).
    fn glu_one(&self, n: usize, wg: &DevW, wu: &DevW) -> bool {
        self.glu_tokens.contains(&n) && wg.followed_by(wu)
    }

    /// Whether products of `n` tokens `cols` wide that the fused kernels do not take run
    /// the stream-K kernels (`sk*`) rather than cuBLAS.
    fn sk_for(&self, n: usize, cols: usize) -> bool {
        self.sk_tokens.contains(&n) && n <= 64 && cols.is_multiple_of(32)
    }

    /// Products of one input `x` (`n` tokens) with up to three matrices of equal width, and
    /// the epilogue: one launch when [`Self::fused_kernel`] has a kernel, else cuBLAS (one
    /// batched call when `batched` holds this group's pointer arrays, see
    /// [`gemm_bf16_batched`]; else one product per matrix), the residual add as cuBLAS's
    /// beta and the gate kernel after.
    pub(crate) fn proj(
        &mut self,
        outs: &[(&DevW, u64)],
        x: u64,
        n: usize,
        epi: Epilogue,
        batched: Option<u64>,
        via: Via16,
    ) -> Result<()> {
        let cols = outs[0].0.cols;
        debug_assert!(outs.iter().all(|(w, _)| w.cols == cols) && outs.len() <= 3);
        let gpu = self.dm.gpu.clone();
        let g = &gpu;
        if let Some(k) = self.fused_kernel(n, cols) {
            if via.input || via.glu_out {
                return Err(EngineError::Invalid(
                    "CUDA: a fused product was handed a bf16 input".into(),
                ));
            }
            return launch_fused(g, k, outs, x, n, epi, via.gemv);
        }
        if !matches!(via.gemv, GemvIn::Plain) {
            return Err(EngineError::Invalid(format!(
                "CUDA: cuBLAS was handed {:?}",
                via.gemv
            )));
        }
        // cuBLAS or the stream-K kernels: the input rounded to bf16 once for all the
        // matrices (unless the kernel before wrote it so).
        let x16 = if via.input && via.src16 != 0 {
            via.src16
        } else {
            self.bufs.get(g, X16, n * cols * 2)?
        };
        if !via.input {
            to_bf16(g, x, x16, n * cols)?;
        }
        let out16 = if via.glu_out && epi == Epilogue::Glu {
            self.bufs.get(g, X16B, n * outs[0].0.rows * 2)?
        } else {
            0
        };
        if self.sk_for(n, cols) {
            return launch_sk(g, outs, x16, n, epi, out16, self.sk_scratch, g.k.sk_grid);
        }
        match (epi, batched) {
            (Epilogue::Store, Some(arrays)) if outs.len() > 1 => {
                gemm_bf16_batched(g, outs[0].0, arrays, outs.len(), n)?;
            }
            (Epilogue::Store, _) => {
                for (w, y) in outs {
                    gemm_bf16(g, w, x16, n, *y, false)?;
                }
            }
            (Epilogue::Add, _) => {
                let (w, y) = outs[0];
                gemm_bf16(g, w, x16, n, y, true)?;
            }
            (Epilogue::Glu, _) if via.glu_out && self.glu_one(n, outs[0].0, outs[1].0) => {
                // Gate and up side by side: one product 2 * rows wide into yg (sized so by
                // Self::run), then SiLU·up from its two halves.
                let (wg, yg) = outs[0];
                // SAFETY: wg's buffer is the first half of the joined gate|up allocation
                // (glu_one), so 2 * rows * cols bf16 from it; yg holds n * 2 * rows f32.
                unsafe { gemm_bf16_raw(g, wg.buf.ptr, 2 * wg.rows, wg.cols, x16, n, yg, false)? };
                let (f, m) = (wg.rows as u64, (n * wg.rows) as u64);
                let grid = (blocks(n * wg.rows, 256).min(4096), 1, 1);
                // SAFETY: yg holds n * 2f f32, out16 n * f bf16.
                unsafe { g.launch(g.k.silu_mul16_cat, grid, 256, args!(yg, out16, f, m))? };
            }
            (Epilogue::Glu, _) => {
                let ((wg, yg), (wu, yu)) = (outs[0], outs[1]);
                match batched {
                    Some(arrays) => gemm_bf16_batched(g, wg, arrays, 2, n)?,
                    None => {
                        gemm_bf16(g, wg, x16, n, yg, false)?;
                        gemm_bf16(g, wu, x16, n, yu, false)?;
                    }
                }
                let m = (n * wg.rows) as u64;
                let grid = (blocks(n * wg.rows, 256).min(4096), 1, 1);
                // SAFETY: yg and yu hold n*rows f32; x16 n*rows bf16 (sized for the widest
                // input of the pass).
                unsafe {
                    if via.glu_out {
                        g.launch(g.k.silu_mul16, grid, 256, args!(yg, yu, out16, m))?
                    } else {
                        g.launch(g.k.silu_mul, grid, 256, args!(yg, yu, m))?
                    }
                };
            }
        }
        Ok(())
    }

    /// y[n, w.rows] = x[n, w.cols] · wᵀ (with `via.input`, cuBLAS reads `x16` as it is).
    fn linear(&mut self, w: &DevW, x: u64, n: usize, y: u64, via: Via16) -> Result<()> {
        self.proj(&[(w, y)], x, n, Epilogue::Store, None, via)
    }

    /// Whether the kernel that makes the input of an `n`-token product `cols` wide should
    /// write it rounded to bf16 into `x16` (the product runs on cuBLAS and LaRoSA, whose
    /// selections read the f32 rows, is off).
    fn writes16(&self, n: usize, cols: usize) -> bool {
        self.bf16_inputs && self.larosa.is_none() && self.fused_kernel(n, cols).is_none()
    }

    /// Whether the products of `n` tokens of RMSNorm'd rows `cols` wide take the raw rows
    /// and normalize them themselves: one token on the GEMV, and no LaRoSA selection on
    /// the normalized rows (sparsity 0 keeps every input, like dense). At 2 tokens the
    /// fused kernel measured slower than the RMSNorm kernel and the plain GEMV.
    fn fuses_norm(&self, n: usize, cols: usize) -> bool {
        self.norm_gemv
            && n == 1
            && self.kept(false, cols).is_none()
            && matches!(self.fused_kernel(n, cols), Some(Fused::Gemv))
    }

    /// Enqueue the whole pass; returns (rows with logits, device pointer to the logits).
    fn run(&mut self, kv: &mut dyn KvAllocator, batch: &[SeqChunk]) -> Result<(usize, u64)> {
        let dm = self.dm.clone();
        let gpu = dm.gpu.clone();
        gpu.bind()?;
        let c = &dm.cfg;
        let (dim, hd, nh, nkv, f) = (c.dim, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n: usize = batch.iter().map(|b| b.tokens.len()).sum();
        crate::forward::check_batch(c, kv, batch)?;
        self.tok.clear();
        self.pos.clear();
        self.item.clear();
        self.selidx.clear();
        self.arows.clear();
        self.tiles.clear();
        let tiled = c.head_dim <= 128 && c.head_dim.is_multiple_of(4);
        let mut r0 = 0;
        for (i, b) in batch.iter().enumerate() {
            let len = b.tokens.len();
            if tiled && len >= FA_MIN_CHUNK {
                for s in (0..len).step_by(FA_Q) {
                    self.tiles.push((r0 + s) as i32);
                    self.tiles.push(FA_Q.min(len - s) as i32);
                }
            } else {
                self.arows.extend((r0..r0 + len).map(|r| r as i32));
            }
            for (j, &t) in b.tokens.iter().enumerate() {
                self.tok.push(t);
                self.pos.push((b.pos + j) as i32);
                self.item.push(i as i32);
                if j >= b.logits_from {
                    self.selidx.push((r0 + j) as i32);
                }
            }
            r0 += b.tokens.len();
        }
        let n_sel = self.selidx.len();
        let items = batch.len();
        self.kvp.clear();
        for l in 0..c.n_layers {
            for b in batch {
                let (k, v) = kv.kv(l, b.slot);
                self.kvp.push(k as usize as u64);
                self.kvp.push(v as usize as u64);
            }
        }
        // Passes whose products go to cuBLAS (more tokens than the fused kernels take).
        let blas = self.blas_batched && self.fused_kernel(n, dim).is_none() && !self.sk_for(n, dim);
        let g = &gpu;
        let (mm_split, mm_tokens, mm_shape) = (
            self.mm_split,
            self.mm_tokens.clone(),
            (self.mm_blocks.max(1), self.mm_waves),
        );
        // Room in hb for gate and up side by side when cuBLAS runs them as one product.
        let hb_halves = if self.glu_tokens.contains(&n) { 2 } else { 1 };
        let b = &mut self.bufs;
        let x = b.get(g, X, n * dim * 4)?;
        let xb = b.get(g, XB, n * dim * 4)?;
        let q = b.get(g, Q, n * qd * 4)?;
        let k = b.get(g, K, n * kvd * 4)?;
        let v = b.get(g, V, n * kvd * 4)?;
        let att = b.get(g, ATT, n * qd * 4)?;
        let tmp = b.get(g, TMP, n * dim * 4)?;
        let hb = b.get(g, HB, n * f * 4 * hb_halves)?;
        let hb2 = b.get(g, HB2, n * f * 4)?;
        let sel = b.get(g, SEL, n_sel.max(1) * dim * 4)?;
        let logits = b.get(g, LOGITS, n_sel.max(1) * c.vocab_size * 4)?;
        let tok = b.get(g, TOK, n * 4)?;
        let pos = b.get(g, POS, n * 4)?;
        let item = b.get(g, ITEM, n * 4)?;
        let kvp = b.get(g, KVP, self.kvp.len() * 8)?;
        let selidx = b.get(g, SELIDX, n_sel.max(1) * 4)?;
        let arows = b.get(g, AROWS, n.max(1) * 4)?;
        let n_arows = self.arows.len();
        let att_splits = (self.att_blocks / (n_arows * c.n_heads).max(1)).clamp(1, ATT_SPLIT_MAX);
        let slots = n_arows.max(1) * c.n_heads;
        let att_cnt = b.get_zeroed(g, ATTC, slots * 4)?;
        let att_part = b.get(g, ATTP, slots * att_splits * (c.head_dim + 2) * 4)?;
        let tiles = b.get(g, TILES, self.tiles.len().max(1) * 4)?;
        // The bf16 inputs of cuBLAS, sized for the widest product up front so its address
        // holds for the whole pass (the batched products' pointer arrays name it).
        let x16 = b.get(g, X16, n * dim.max(f).max(qd) * 2)?;
        // The gated unit's bf16 result (the down product's input; its own input is x16).
        let x16b = b.get(g, X16B, n * f * 2)?;
        let bptr = if blas {
            b.get(g, BPTR, dm.layers.len() * BPTR_LAYER * 8)?
        } else {
            0
        };
        // The arrays name buffers that stay put while no buffer is reallocated: they are
        // rebuilt and uploaded only when the buffers' generation (or the array) moved.
        let send_bptr = blas && self.bptr_sent != (b.generation, bptr);
        if send_bptr {
            self.bptr.clear();
            for l in &dm.layers {
                self.bptr
                    .extend([l.wq.buf.ptr, l.wk.buf.ptr, l.wv.buf.ptr, x16, x16, x16]);
                self.bptr
                    .extend([q, k, v, l.gate.buf.ptr, l.up.buf.ptr, x16, x16, hb, hb2]);
            }
            self.bptr_sent = (b.generation, bptr);
        }
        // The split-K products' scratch, for the pass's products and for the LM head's
        // rows (which can take the split-K kernel when the pass itself does not).
        let mms_for = |m: usize| mm_split && mm_tokens.contains(&m) && m <= 64;
        self.mm_scratch = if mms_for(n) || mms_for(n_sel) {
            let (mut floats, mut tiles) = (0, 0);
            for m in [n, n_sel].into_iter().filter(|&m| mms_for(m)) {
                let (f2, t2) = mms_scratch(c, m, mm_shape);
                floats = floats.max(f2);
                tiles = tiles.max(t2);
            }
            (
                b.get(g, MPART, floats * 4)?,
                b.get_zeroed(g, MCNT, tiles * 4)?,
            )
        } else {
            (0, 0)
        };
        // The stream-K products' scratch, for the pass's tokens and the LM head's rows.
        let sk_rows: Vec<usize> = [n, n_sel]
            .into_iter()
            .filter(|&m| {
                self.fused_kernel(m, dim).is_none() && self.sk_tokens.contains(&m) && m <= 64
            })
            .collect();
        let b = &mut self.bufs;
        self.sk_scratch = if sk_rows.is_empty() {
            (0, 0)
        } else {
            let (mut floats, mut tiles) = (0, 0);
            for &m in &sk_rows {
                let (f2, t2) = sk_scratch(c, m, g.k.sk_grid);
                floats = floats.max(f2);
                tiles = tiles.max(t2);
            }
            (b.get(g, SKP, floats * 4)?, b.get_zeroed(g, SKC, tiles * 4)?)
        };
        let (sidx, sval, part, cnt) = if self.larosa.is_some() {
            let wide = dim.max(f).max(qd);
            let (part_floats, tiles) = model_sparse_scratch(c);
            let cnt = b.get_zeroed(g, CNT, tiles * 4)?;
            (
                b.get(g, SIDX, wide * 4)?,
                b.get(g, SVAL, wide * 4)?,
                b.get(g, PART, part_floats * 4)?,
                cnt,
            )
        } else {
            (0, 0, 0, 0)
        };
        // SAFETY: host vectors outlive the copies (the pass ends with a synchronizing read).
        unsafe {
            use cudarc::driver::result as cu;
            let up = |dst: u64, src: &[u8]| {
                cu::memcpy_htod_async(dst, src, g.stream)
                    .map_err(|e| EngineError::Invalid(format!("CUDA: upload: {e:?}")))
            };
            up(tok, bytes_of(&self.tok))?;
            up(pos, bytes_of(&self.pos))?;
            up(item, bytes_of(&self.item))?;
            up(kvp, bytes_of(&self.kvp))?;
            up(selidx, bytes_of(&self.selidx))?;
            up(arows, bytes_of(&self.arows))?;
            up(tiles, bytes_of(&self.tiles))?;
            if send_bptr {
                up(bptr, bytes_of(&self.bptr))?;
            }
        }
        let pass = Pass {
            bptr,
            n,
            n_sel,
            items,
            x,
            xb,
            q,
            k,
            v,
            att,
            tmp,
            hb,
            hb2,
            x16,
            x16b,
            sel,
            logits,
            tok,
            pos,
            item,
            kvp,
            selidx,
            sidx,
            sval,
            part,
            cnt,
            arows,
            n_arows,
            tiles,
            n_tiles: self.tiles.len() / 2,
            att_part,
            att_cnt,
            att_splits,
        };
        // Passes of up to graph_max_tokens tokens (decode batches; cuBLAS runs on our own
        // workspace, so it can be captured) replay a CUDA graph of the whole pass: one
        // launch per step instead of ~8 per layer. Kernel arguments are buffer
        // addresses and sizes, fixed for a batch shape while no buffer is reallocated; the
        // per-step contents (tokens, positions, K/V bases) were uploaded above.
        // (Tiled prefill attention has a per-pass tile layout: not replayed.)
        let graphable = self.graphs_enabled && n <= self.graph_max_tokens && pass.n_tiles == 0;
        let key = (n, n_sel, items, self.bufs.generation);
        let captured = self.graphs.iter().any(|(k2, _)| *k2 == key);
        // A shape is captured the second time it is seen: the first pass runs eagerly, so
        // cuBLAS and the driver finish their lazy set-up outside a capture.
        if graphable && (captured || self.seen.contains(&key)) {
            if captured {
                // Most recently used last: eviction takes the front.
                let i = self.graphs.iter().position(|(k2, _)| *k2 == key).unwrap();
                let hit = self.graphs.remove(i);
                self.graphs.push(hit);
            } else {
                let exec = self.capture(&pass)?;
                self.graphs.retain(|(k2, _)| k2.3 == key.3);
                if self.graphs.len() >= self.graph_cache_max.max(1) {
                    // Destroying an executable graph that is still in flight is deferred by
                    // the driver until it completes.
                    self.graphs.remove(0);
                }
                self.graphs.push((key, exec));
            }
            let exec = self.graphs.last().unwrap().1 .0;
            // SAFETY: an instantiated graph of this backend's kernels on live buffers.
            unsafe { cudarc::driver::result::graph::launch(exec, gpu.stream) }
                .map_err(|e| EngineError::Invalid(format!("CUDA: graph launch: {e:?}")))?;
        } else {
            if graphable {
                self.seen.retain(|k2| k2.3 == key.3);
                // Room for more shapes than graphs, so shapes that take turns still get
                // their second sighting.
                if self.seen.len() >= 4 * self.graph_cache_max.max(1) {
                    self.seen.remove(0);
                }
                self.seen.push(key);
            }
            self.enqueue(&pass)?;
        }
        Ok((n_sel, logits))
    }

    /// Record the pass into a CUDA graph (instantiated, ready to launch).
    fn capture(&mut self, p: &Pass) -> Result<GraphExec> {
        use cudarc::driver::{result as cu, sys};
        let gpu = self.dm.gpu.clone();
        let e =
            |what: &str, x: cu::DriverError| EngineError::Invalid(format!("CUDA: {what}: {x:?}"));
        // SAFETY: the stream is ours; capture ends below on every path.
        unsafe {
            cu::stream::begin_capture(
                gpu.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|x| e("begin capture", x))?;
            let r = self.enqueue(p);
            let graph = cu::stream::end_capture(gpu.stream).map_err(|x| e("end capture", x))?;
            r?;
            let exec = cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0))
                .map_err(|x| e("graph instantiate", x));
            let _ = cu::graph::destroy(graph);
            Ok(GraphExec(exec?))
        }
    }

    /// Enqueue every kernel of the pass on the stream.
    fn enqueue(&mut self, p: &Pass) -> Result<()> {
        let dm = self.dm.clone();
        let gpu = dm.gpu.clone();
        let g = &gpu;
        let c = &dm.cfg;
        let (dim, hd, nh, nkv, f) = (c.dim, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let Pass {
            bptr,
            n,
            n_sel,
            items,
            x,
            xb,
            q,
            k,
            v,
            att,
            tmp,
            hb,
            hb2,
            x16,
            x16b,
            sel,
            logits,
            tok,
            pos,
            item,
            kvp,
            selidx,
            arows,
            n_arows,
            tiles,
            n_tiles,
            att_part,
            att_cnt,
            att_splits,
            ..
        } = *p;
        let (dim_i, hd_i, nh_i, nkv_i) = (dim as i32, hd as i32, nh as i32, nkv as i32);
        let eps = c.rms_eps;
        let inter = matches!(c.rope, RopeStyle::Interleaved) as i32;
        let scale = 1.0 / (hd as f32).sqrt();
        let nu = n as u32;
        let kk = &g.k;
        // SAFETY: every buffer was sized above for this batch; kernels index within them.
        unsafe {
            g.launch(
                kk.embed,
                (nu, 1, 1),
                256,
                args!(dm.embd.buf.ptr, tok, x, dim_i),
            )?;
            // cuBLAS products read bf16 inputs that the kernels before them write (the
            // RMSNorms' for Q/K/V and gate/up, attention's for o, SiLU·up's for down).
            let (norm16, o16, down16) = (
                self.writes16(n, dim),
                self.writes16(n, qd) && n_tiles == 0,
                self.writes16(n, f),
            );
            // At one token the GEMVs normalize the residual themselves (no RMSNorm kernel).
            let fuse_norm = self.fuses_norm(n, dim);
            let normed = |x: u64, w: &DevBuf| {
                if fuse_norm {
                    (x, Via16::gemv(GemvIn::Norm(w.ptr, eps)))
                } else {
                    (xb, Via16::input(norm16))
                }
            };
            // ... and apply RoPE and write K/V in the Q/K/V product (no rope_kv launch).
            let fuse_rope = fuse_norm && self.rope_gemv && hd.is_multiple_of(4);
            let (cos, sin) = (dm.cos.ptr, dm.sin.ptr);
            // The residual stream: `x`, or `tmp` after an odd number of LaRoSA adapters (each
            // writes the other buffer, so no copy runs between kernels).
            let (mut x, mut spare) = (x, tmp);
            for (li, l) in dm.layers.iter().enumerate() {
                if let Some(a) = &l.adapter {
                    // The rotated residual stream moves into this layer's basis.
                    self.linear(a, x, n, spare, Via16::default())?;
                    std::mem::swap(&mut x, &mut spare);
                }
                // Q/K/V in one launch, the residual adds ride on the output products and
                // SiLU·up on the gate/up product (Self::proj); with LaRoSA the inputs are
                // top-k sparsified first (in the RMSNorm kernel on the input side), and a
                // single token's products read only the kept inputs' weight columns.
                let sp = l.sparse.as_ref();
                let kvl = kvp + (li * items * 2 * 8) as u64;
                let kq = if fuse_norm {
                    None
                } else {
                    self.norm(p, x, &l.attn_norm, (xb, norm16), sp.is_some())?
                };
                match (kq, sp) {
                    (Some(kk), Some(s)) => self.sparse_proj(
                        p,
                        &[(&s.wq, qd, q), (&s.wk, kvd, k), (&s.wv, kvd, v)],
                        kk,
                        Epilogue::Store,
                    )?,
                    _ => {
                        let (input, mut via) = normed(x, &l.attn_norm);
                        if fuse_rope {
                            let rope = RopeIn {
                                pos,
                                item,
                                cos,
                                sin,
                                kvl,
                                hd: hd_i,
                                inter,
                            };
                            via.gemv = GemvIn::NormRope(l.attn_norm.ptr, eps, rope);
                        }
                        self.proj(
                            &[(&l.wq, q), (&l.wk, k), (&l.wv, v)],
                            input,
                            n,
                            Epilogue::Store,
                            (bptr != 0 && qd == kvd).then_some(bptr + (li * BPTR_LAYER * 8) as u64),
                            via,
                        )?
                    }
                }
                if !fuse_rope {
                    let rk_items = (nh + nkv) * hd / 2 + nkv * hd;
                    g.launch(
                        kk.rope_kv,
                        (nu, blocks(rk_items, 256), 1),
                        256,
                        args!(q, k, v, pos, cos, sin, kvl, item, nh_i, nkv_i, hd_i, inter),
                    )?;
                }
                if n_arows > 0 {
                    let att16 = if o16 { x16 } else { 0 };
                    // (grid y is at most 65535)
                    let heads_x = self.att_heads_x && n_arows <= 65535;
                    let hx = heads_x as i32;
                    let grid = if heads_x {
                        (nh as u32, n_arows as u32, att_splits as u32)
                    } else {
                        (n_arows as u32, nh as u32, att_splits as u32)
                    };
                    let half = self.att_half && hd <= 128;
                    let func = if self.att_hw && hd <= 128 && hd.is_multiple_of(8) {
                        kk.attention_hw
                    } else {
                        kk.attention[self.attention4 as usize + 2 * half as usize]
                    };
                    g.launch(
                        func,
                        grid,
                        kk.att_threads,
                        args!(
                            q, kvl, item, pos, arows, att, att16, nh_i, nkv_i, hd_i, scale,
                            att_part, att_cnt, hx
                        ),
                    )?;
                }
                if n_tiles > 0 {
                    let mma = match hd {
                        64 if self.mma_attention => Some(kk.attention_mma[0]),
                        128 if self.mma_attention => Some(kk.attention_mma[1]),
                        _ => None,
                    };
                    let (f, threads, smem) = match mma {
                        Some(f) => (f, FM_THREADS, attention_mma_smem(hd)),
                        None => (kk.attention_tiles, 256, attention_tiles_smem(hd)),
                    };
                    g.launch_smem(
                        f,
                        (n_tiles as u32, nh as u32, 1),
                        threads,
                        smem as u32,
                        args!(q, kvl, item, pos, tiles, att, nh_i, nkv_i, hd_i, scale),
                    )?;
                }
                match (self.sparsify(p, att, qd, sp.is_some())?, sp) {
                    (Some(kk), Some(s)) => {
                        self.sparse_proj(p, &[(&s.wo, dim, x)], kk, Epilogue::Add)?
                    }
                    _ => self.proj(
                        &[(&l.wo, x)],
                        att,
                        n,
                        Epilogue::Add,
                        None,
                        Via16::input(o16),
                    )?,
                }
                let kf = if fuse_norm {
                    None
                } else {
                    self.norm(p, x, &l.ffn_norm, (xb, norm16), sp.is_some())?
                };
                match (kf, sp) {
                    (Some(kk), Some(s)) => self.sparse_proj(
                        p,
                        &[(&s.gate, f, hb), (&s.up, f, hb2)],
                        kk,
                        Epilogue::Glu,
                    )?,
                    _ => {
                        let (input, via) = normed(x, &l.ffn_norm);
                        self.proj(
                            &[(&l.gate, hb), (&l.up, hb2)],
                            input,
                            n,
                            Epilogue::Glu,
                            (bptr != 0).then_some(bptr + ((li * BPTR_LAYER + 9) * 8) as u64),
                            Via16 {
                                glu_out: down16,
                                ..via
                            },
                        )?
                    }
                }
                match (self.sparsify(p, hb, f, sp.is_some())?, sp) {
                    (Some(kk), Some(s)) => {
                        self.sparse_proj(p, &[(&s.down, dim, x)], kk, Epilogue::Add)?
                    }
                    _ => self.proj(
                        &[(&l.down, x)],
                        hb,
                        n,
                        Epilogue::Add,
                        None,
                        Via16::input_at(down16, x16b),
                    )?,
                }
            }
            if n_sel > 0 {
                g.launch(
                    kk.gather_rows,
                    (n_sel as u32, 1, 1),
                    256,
                    args!(x, selidx, sel, dim_i),
                )?;
                // The head's input rounded to bf16 by the RMSNorm when cuBLAS takes it, or
                // normalized by the GEMV itself.
                if self.fuses_norm(n_sel, dim) {
                    let via = Via16::gemv(GemvIn::Norm(dm.norm.ptr, eps));
                    self.linear(dm.head(), sel, n_sel, logits, via)?;
                } else {
                    let head16 = self.writes16(n_sel, dim);
                    let out = if head16 { x16 } else { xb };
                    launch_rmsnorm(g, sel, dm.norm.ptr, (out, head16), n_sel, dim, eps)?;
                    self.linear(dm.head(), xb, n_sel, logits, Via16::input(head16))?;
                }
            }
        }
        Ok(())
    }

    /// The pass with greedy sampling on the device: the argmax id of each row with logits
    /// (lowest id among equal maxima; `sample_rows` at temperature 0).
    pub fn forward_greedy(
        &mut self,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
    ) -> Result<Vec<u32>> {
        let greedy = RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            u: 0.0,
        };
        self.forward_sample(kv, batch, &vec![greedy; logits_rows(batch)])
    }

    /// The pass with sampling on the device (`sample_rows`): one id per row with logits,
    /// drawn with `rows` (temperature, top-k, top-p and the host's uniform number); only
    /// the ids come back to the host.
    pub fn forward_sample(
        &mut self,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>> {
        let want = logits_rows(batch);
        if want != rows.len() {
            return Err(EngineError::Invalid(format!(
                "device sampling: {} parameter rows for {want} rows with logits",
                rows.len()
            )));
        }
        let (n_sel, logits) = self.run(kv, batch)?;
        let gpu = self.dm.gpu.clone();
        if n_sel == 0 {
            gpu.sync()?;
            return Ok(Vec::new());
        }
        let (prm, topk) = sample_params(rows);
        let ids = self.bufs.get(&gpu, IDS, n_sel * 4)?;
        let p = self.bufs.get(&gpu, SPRM, n_sel * 3 * 4)?;
        let tk = self.bufs.get(&gpu, STOPK, n_sel * 4)?;
        launch_sample(
            &gpu,
            logits,
            self.dm.cfg.vocab_size,
            &prm,
            &topk,
            p,
            tk,
            ids,
        )?;
        let buf = self.bufs.f32s[IDS].as_ref().unwrap();
        buf.read::<u32>(n_sel)
    }

    /// The logits of the rows that asked for them, on the host.
    pub fn forward_logits(
        &mut self,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
    ) -> Result<&[f32]> {
        let (n_sel, _) = self.run(kv, batch)?;
        let len = n_sel * self.dm.cfg.vocab_size;
        self.logits = if n_sel == 0 {
            self.dm.gpu.sync()?;
            Vec::new()
        } else {
            self.bufs.f32s[LOGITS].as_ref().unwrap().read::<f32>(len)?
        };
        Ok(&self.logits)
    }
}

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain old data viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.dm.gpu.ordinal, self.dm.gpu.name)
    }
    fn forward(
        &mut self,
        _m: &Model,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
    ) -> Result<&[f32]> {
        self.forward_logits(kv, batch)
    }
    fn samples_on_device(&self) -> bool {
        self.device_sampling
    }
    fn forward_sampled(
        &mut self,
        _m: &Model,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
        rows: &[RowSampling],
    ) -> Result<Option<Vec<u32>>> {
        if !self.device_sampling {
            return Ok(None);
        }
        self.forward_sample(kv, batch, rows).map(Some)
    }
    fn fork(&self, layout: KvLayout) -> Result<(Box<dyn Backend>, Box<dyn KvAllocator>)> {
        let kv = super::open_kv(&self.dm, layout, None, super::kv::KvMode::Background)?;
        Ok((Box::new(CudaBackend::new(self.dm.clone())), Box::new(kv)))
    }
    fn fork_over(
        &self,
        layout: KvLayout,
        m: &Arc<Model>,
        s: Option<ActivationSparsity>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Box<dyn Backend>, Box<dyn KvAllocator>)> {
        let dm = device_model_for(&self.dm.gpu, m, s.is_some(), progress)?;
        let kv = super::open_kv(&dm, layout, None, super::kv::KvMode::Background)?;
        let mut be = CudaBackend::new(dm);
        be.set_larosa(s.map(Larosa::from));
        Ok((Box::new(be), Box::new(kv)))
    }
}

/// The device's top-k selection on one row `x`: the kept indices, ascending (checks).
pub fn topk_indices(gpu: &Arc<Gpu>, x: &[f32], k: usize) -> Result<Vec<i32>> {
    if x.is_empty() || x.len() > TOPK_MAX {
        return Err(EngineError::Invalid(format!(
            "top-k of {} values: 1 to {TOPK_MAX} are supported",
            x.len()
        )));
    }
    let k = k.clamp(1, x.len());
    let tl = topk_kernel(gpu, x.len(), false)?;
    let xd = gpu.upload(x)?;
    let idx = gpu.alloc(k * 4)?;
    let val = gpu.alloc(k * 4)?;
    let (d, ki, mode) = (x.len() as i32, k as i32, 0i32);
    // SAFETY: xd holds d f32, idx/val k entries.
    unsafe {
        gpu.launch(
            tl.f,
            tl.grid(1),
            tl.threads,
            args!(xd.ptr, d, ki, idx.ptr, val.ptr, mode),
        )?;
    }
    idx.read::<i32>(k)
}

/// bf16 GEMM throughput through cuBLAS (`m×k · k×n`, f32 accumulate), FLOP/s: the compute
/// roofline the benchmarks compare against.
pub fn gemm_flops(gpu: &Arc<Gpu>, m: usize, n: usize, k: usize, reps: usize) -> Result<f64> {
    let a = gpu.alloc(m * k * 2)?;
    let b = gpu.alloc(k * n * 2)?;
    let c = gpu.alloc(m * n * 2)?;
    gpu.fill_random_bf16(&a, 1, 1.0)?;
    gpu.fill_random_bf16(&b, 2, 1.0)?;
    let (alpha, beta) = (1f32, 0f32);
    let run = || -> Result<()> {
        // SAFETY: the buffers hold the matrices' elements.
        unsafe {
            blas::gemm_ex(
                gpu.blas,
                bsys::cublasOperation_t::CUBLAS_OP_T,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                a.ptr as *const c_void,
                bsys::cudaDataType::CUDA_R_16BF,
                k as i32,
                b.ptr as *const c_void,
                bsys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                c.ptr as *mut c_void,
                bsys::cudaDataType::CUDA_R_16BF,
                m as i32,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| EngineError::Invalid(format!("CUDA: cuBLAS GemmEx: {e:?}")))
    };
    run()?;
    run()?;
    gpu.sync()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        run()?;
    }
    gpu.sync()?;
    Ok(2.0 * (m * n * k) as f64 * reps as f64 / t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// The split-K plans of Llama-2-7B's products fill their last wave (two blocks per SM
    /// of a 132-SM device) and cover every input column exactly once.
    #[test]
    fn mms_plans_fill_their_waves() {
        for (rows, cols, epi) in [
            (&[4096usize, 4096, 4096][..], 4096usize, Epilogue::Store),
            (&[4096], 4096, Epilogue::Add),
            (&[11008, 11008], 4096, Epilogue::Glu),
            (&[4096], 11008, Epilogue::Add),
        ] {
            // (wave cap, least fill of the last wave): two waves leave less room to fill.
            for ((waves, least), n) in [(2, 0.8), (4, 0.9)]
                .into_iter()
                .flat_map(|c| [3usize, 8, 16, 32, 64].map(|n| (c, n)))
            {
                let p = MsPlan::new(rows, cols, n, epi, (264, waves));
                let blocks = p.tiles * p.splits;
                let fill = blocks as f64 / (blocks.div_ceil(264) * 264) as f64;
                eprintln!("{rows:?}x{cols} n={n} waves<={waves}: {p:?}, {blocks} blocks");
                assert!(fill > least, "{rows:?}x{cols} n={n}: {p:?} fills {fill:.2}");
                assert!(
                    p.ks.is_multiple_of(32)
                        && p.ks * p.splits >= cols
                        && p.ks * (p.splits - 1) < cols
                );
                assert!(p.smem <= MS_SMEM_MAX, "{p:?}");
            }
        }
    }
}
