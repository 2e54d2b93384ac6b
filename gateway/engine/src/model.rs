//! Llama-family model: configuration, weights (GGUF or Hugging Face safetensors), forward pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::quant::{self, GgmlType};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// (x[2i], x[2i+1]): llama.cpp's `llama` arch in GGUF (weights un-permuted).
    Interleaved,
    /// (x[i], x[i + d/2]): Hugging Face `rotate_half`.
    Half,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_eps: f32,
    pub max_context: usize,
    pub rope: RopeStyle,
}

/// Bytes of a tensor: borrowed from an mmap, or owned.
#[derive(Clone)]
enum Bytes {
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned(v) => v,
        }
    }
}

/// A 2-D weight `[rows, cols]` (row-major; one row = one output feature) in its stored type.
#[derive(Clone)]
pub struct Weight {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: Bytes,
    row_bytes: usize,
}

impl Weight {
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
    pub fn n_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        quant::dequantize_row(self.ty, self.row(r), &mut out[..self.cols]);
    }
    /// An f32 weight owning `data` (`rows × cols`, row-major).
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "weight data is not rows x cols");
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Weight {
            ty: GgmlType::F32,
            rows,
            cols,
            data: Bytes::Owned(Arc::new(bytes)),
            row_bytes: cols * 4,
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, o) in v.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, o);
        }
        v
    }
    /// The same weight in the layout the fastest kernel of this CPU reads (see
    /// [`quant::split_type`]); unchanged when there is none.
    pub fn for_kernels(self) -> Self {
        match quant::split_type(self.ty) {
            Some(st) if quant::has_fused_dot(st) => {
                let mut bytes = Vec::with_capacity(self.n_bytes());
                for r in 0..self.rows {
                    quant::split_row(self.ty, self.row(r), &mut bytes);
                }
                Weight {
                    ty: st,
                    data: Bytes::Owned(Arc::new(bytes)),
                    ..self
                }
            }
            _ => self,
        }
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Weight,
    pub w_up: Weight,
    pub w_down: Weight,
    /// A `dim × dim` map applied to the residual stream before this layer (LaRoSA's change of
    /// basis `Q_{l-1}ᵀ·Q_l` between layers rotated differently); `None` in a plain model.
    pub adapter: Option<Weight>,
}

pub struct Model {
    pub path: PathBuf,
    pub cfg: Config,
    pub tok_embd: Weight,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when tied to `tok_embd`.
    pub output: Option<Weight>,
    /// `[max_context, head_dim/2]` each.
    pub rope_cos: Vec<f32>,
    pub rope_sin: Vec<f32>,
}

/// Where tensors come from, so loading is one code path for both formats.
trait TensorSource {
    fn path(&self) -> &Path;
    /// The tensor as a `[rows, cols]` weight, or None if absent.
    fn weight(&self, name: &str) -> Result<Option<Weight>>;
}

struct GgufSource<'a>(&'a GgufFile);

impl TensorSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        &self.0.path
    }
    fn weight(&self, name: &str) -> Result<Option<Weight>> {
        let Some(t) = self.0.tensor(name) else {
            return Ok(None);
        };
        let cols = t.dims[0] as usize;
        let rows = t.dims[1..].iter().product::<u64>() as usize;
        let start = (self.0.header.data_offset + t.offset) as usize;
        Ok(Some(Weight {
            ty: t.dtype,
            rows,
            cols,
            data: Bytes::Mapped {
                map: self.0.mmap.clone(),
                start,
                len: t.n_bytes,
            },
            row_bytes: t.dtype.row_bytes(cols),
        }))
    }
}

/// tensor name → (dtype, shape, byte offset in the file, byte length)
pub(crate) type StIndex = std::collections::HashMap<String, (String, Vec<usize>, usize, usize)>;

pub(crate) struct SafetensorsSource {
    dir: PathBuf,
    /// (file, mmap, tensor name → (dtype, shape, byte range within the mmap))
    pub(crate) files: Vec<(PathBuf, Arc<memmap2::Mmap>, StIndex)>,
}

impl SafetensorsSource {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        // The files of the model: those the shard index names, else model.safetensors, else
        // every *.safetensors (a directory may hold other safetensors, such as test data).
        let index_path = dir.join("model.safetensors.index.json");
        let mut paths: Vec<PathBuf> = if index_path.exists() {
            let bad = |reason: String| EngineError::Config {
                path: index_path.clone(),
                reason,
            };
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| EngineError::io(&index_path, e))?;
            let j: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let map = j["weight_map"]
                .as_object()
                .ok_or_else(|| bad("no weight_map object".into()))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str().map(|f| dir.join(f)))
                .collect();
            files.sort();
            files.dedup();
            files
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            std::fs::read_dir(dir)
                .map_err(|e| EngineError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        paths.sort();
        if paths.is_empty() {
            return Err(EngineError::Config {
                path: dir.to_path_buf(),
                reason: "no *.safetensors files in this directory".into(),
            });
        }
        let mut files = Vec::new();
        for p in paths {
            let f = std::fs::File::open(&p).map_err(|e| EngineError::io(&p, e))?;
            // SAFETY: read-only mapping of a file we do not modify.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| EngineError::io(&p, e))?;
            let bad = |reason: String| EngineError::Safetensors {
                path: p.clone(),
                reason,
            };
            let (hlen, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| bad(truncation(&map).unwrap_or_else(|| e.to_string())))?;
            let base = 8 + hlen;
            let mut index = std::collections::HashMap::new();
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > map.len() || s > e {
                    return Err(bad(format!(
                        "tensor '{name}' runs past the end of the file (truncated?)"
                    )));
                }
                index.insert(
                    name.clone(),
                    (
                        format!("{:?}", info.dtype),
                        info.shape.clone(),
                        base + s,
                        e - s,
                    ),
                );
            }
            files.push((p, Arc::new(map), index));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
        })
    }
}

/// Why a safetensors file is shorter than its header says, if it is.
fn truncation(map: &[u8]) -> Option<String> {
    let len = map.len();
    let Some(h) = map.get(..8) else {
        return Some(format!(
            "truncated: {len} bytes, not even the header length"
        ));
    };
    let n = u64::from_le_bytes(h.try_into().ok()?) as usize;
    if 8usize.saturating_add(n) > len {
        return Some(format!(
            "truncated: the header alone is {n} bytes, the file holds {len}"
        ));
    }
    let header: serde_json::Value = serde_json::from_slice(&map[8..8 + n]).ok()?;
    let end = header
        .as_object()?
        .values()
        .filter_map(|t| t["data_offsets"][1].as_u64())
        .max()? as usize;
    (8 + n + end > len).then(|| {
        format!(
            "truncated: the tensors need {} bytes, the file holds {len}",
            8 + n + end
        )
    })
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn weight(&self, name: &str) -> Result<Option<Weight>> {
        for (path, map, index) in &self.files {
            let Some((dtype, shape, start, len)) = index.get(name) else {
                continue;
            };
            let ty = st_dtype(path, name, dtype)?;
            let cols = *shape.last().unwrap_or(&1);
            let rows = if shape.len() > 1 {
                shape[..shape.len() - 1].iter().product()
            } else {
                1
            };
            return Ok(Some(Weight {
                ty,
                rows,
                cols,
                data: Bytes::Mapped {
                    map: map.clone(),
                    start: *start,
                    len: *len,
                },
                row_bytes: ty.row_bytes(cols),
            }));
        }
        Ok(None)
    }
}

/// The tensor type of a safetensors dtype the engine reads (F32, F16, BF16).
pub(crate) fn st_dtype(path: &Path, tensor: &str, dtype: &str) -> Result<GgmlType> {
    match dtype {
        "F32" => Ok(GgmlType::F32),
        "F16" => Ok(GgmlType::F16),
        "BF16" => Ok(GgmlType::BF16),
        other => Err(EngineError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            dtype: other.into(),
        }),
    }
}

/// Tensor names of the two formats.
struct Names {
    embd: &'static str,
    norm: &'static str,
    output: &'static str,
    layer: fn(usize, &str) -> String,
}

const GGUF_NAMES: Names = Names {
    embd: "token_embd.weight",
    norm: "output_norm.weight",
    output: "output.weight",
    layer: |i, t| {
        let n = match t {
            "attn_norm" => "attn_norm",
            "q" => "attn_q",
            "k" => "attn_k",
            "v" => "attn_v",
            "o" => "attn_output",
            "ffn_norm" => "ffn_norm",
            "gate" => "ffn_gate",
            "up" => "ffn_up",
            _ => "ffn_down",
        };
        format!("blk.{i}.{n}.weight")
    },
};

const HF_NAMES: Names = Names {
    embd: "model.embed_tokens.weight",
    norm: "model.norm.weight",
    output: "lm_head.weight",
    layer: |i, t| {
        let n = match t {
            "attn_norm" => "input_layernorm",
            "q" => "self_attn.q_proj",
            "k" => "self_attn.k_proj",
            "v" => "self_attn.v_proj",
            "o" => "self_attn.o_proj",
            "ffn_norm" => "post_attention_layernorm",
            "gate" => "mlp.gate_proj",
            "up" => "mlp.up_proj",
            _ => "mlp.down_proj",
        };
        format!("model.layers.{i}.{n}.weight")
    },
};

fn need(src: &dyn TensorSource, name: &str, rows: usize, cols: usize) -> Result<Weight> {
    let w = src
        .weight(name)?
        .ok_or_else(|| EngineError::MissingTensor {
            path: src.path().to_path_buf(),
            tensor: name.into(),
        })?;
    if w.rows != rows || w.cols != cols {
        return Err(EngineError::Shape {
            path: src.path().to_path_buf(),
            tensor: name.into(),
            got: vec![w.rows, w.cols],
            expected: vec![rows, cols],
        });
    }
    // Row lengths that are not a multiple of the block size were refused by the GGUF parser.
    Ok(w.for_kernels())
}

fn need_vec(src: &dyn TensorSource, name: &str, n: usize) -> Result<Vec<f32>> {
    Ok(need(src, name, 1, n)?.to_f32())
}

impl Model {
    /// Load from a `.gguf` file or a Hugging Face directory. `progress` is called with
    /// (layers loaded, total layers).
    pub fn load(
        path: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Self, ModelSource)> {
        if path.is_dir() {
            let cfg = hf_config(path)?;
            let src = SafetensorsSource::open(path)?;
            let m = Self::from_source(&src, &HF_NAMES, cfg, progress)?;
            Ok((m, ModelSource::HfDir(path.to_path_buf())))
        } else {
            let g = GgufFile::open(path)?;
            let cfg = gguf_config(&g)?;
            let m = Self::from_source(&GgufSource(&g), &GGUF_NAMES, cfg, progress)?;
            Ok((m, ModelSource::Gguf(Arc::new(g))))
        }
    }

    fn from_source(
        src: &dyn TensorSource,
        names: &Names,
        mut cfg: Config,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let embd = src
            .weight(names.embd)?
            .ok_or_else(|| EngineError::MissingTensor {
                path: src.path().to_path_buf(),
                tensor: names.embd.into(),
            })?;
        if cfg.vocab_size == 0 {
            cfg.vocab_size = embd.rows;
        }
        let (d, hd) = (cfg.dim, cfg.head_dim);
        let tok_embd = need(src, names.embd, cfg.vocab_size, d)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |t| (names.layer)(i, t);
            layers.push(Layer {
                attn_norm: need_vec(src, &n("attn_norm"), d)?,
                wq: need(src, &n("q"), cfg.n_heads * hd, d)?,
                wk: need(src, &n("k"), cfg.n_kv_heads * hd, d)?,
                wv: need(src, &n("v"), cfg.n_kv_heads * hd, d)?,
                wo: need(src, &n("o"), d, cfg.n_heads * hd)?,
                ffn_norm: need_vec(src, &n("ffn_norm"), d)?,
                w_gate: need(src, &n("gate"), cfg.ffn_dim, d)?,
                w_up: need(src, &n("up"), cfg.ffn_dim, d)?,
                w_down: need(src, &n("down"), d, cfg.ffn_dim)?,
                adapter: None,
            });
            progress(i + 1, cfg.n_layers);
        }
        let norm = need_vec(src, names.norm, d)?;
        let output = match src.weight(names.output)? {
            Some(_) => Some(need(src, names.output, cfg.vocab_size, d)?),
            None => None,
        };
        let (rope_cos, rope_sin) = rope_tables(&cfg);
        Ok(Model {
            path: src.path().to_path_buf(),
            cfg,
            tok_embd,
            layers,
            norm,
            output,
            rope_cos,
            rope_sin,
        })
    }

    pub fn output(&self) -> &Weight {
        self.output.as_ref().unwrap_or(&self.tok_embd)
    }

    /// Parameter count (elements of all weights).
    pub fn n_params(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|w| w.rows * w.cols)
                    .sum::<usize>()
                    + l.attn_norm.len()
                    + l.ffn_norm.len()
            })
            .sum();
        l + self.tok_embd.rows * self.tok_embd.cols
            + self.norm.len()
            + self.output.as_ref().map_or(0, |w| w.rows * w.cols)
    }

    /// Bytes of weights read for one decode token (all layers + head).
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|w| w.n_bytes())
                    .sum::<usize>()
            })
            .sum::<usize>()
            + self.output().n_bytes()
    }
}

/// Keeps the file behind a model reachable (tokenizer, metadata).
pub enum ModelSource {
    Gguf(Arc<GgufFile>),
    HfDir(PathBuf),
}

pub fn rope_tables(cfg: &Config) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let mut cos = vec![0f32; cfg.max_context * half];
    let mut sin = vec![0f32; cfg.max_context * half];
    for p in 0..cfg.max_context {
        for i in 0..half {
            let inv = cfg.rope_theta.powf(-((2 * i) as f64) / cfg.head_dim as f64);
            let a = p as f64 * inv;
            cos[p * half + i] = a.cos() as f32;
            sin[p * half + i] = a.sin() as f32;
        }
    }
    (cos, sin)
}

pub(crate) fn gguf_config(g: &GgufFile) -> Result<Config> {
    let bad = |reason: String| EngineError::Config {
        path: g.path.clone(),
        reason,
    };
    let arch = g
        .meta("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if arch != "llama" {
        return Err(EngineError::UnsupportedArch {
            path: g.path.clone(),
            arch: arch.into(),
        });
    }
    let u = |k: &str| -> Result<usize> {
        g.meta(&format!("llama.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| {
                bad(format!(
                    "metadata key 'llama.{k}' is missing or not an integer"
                ))
            })
    };
    let dim = u("embedding_length")?;
    let n_heads = u("attention.head_count")?;
    let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
    let head_dim = u("rope.dimension_count").unwrap_or(dim.checked_div(n_heads).unwrap_or(0));
    let cfg = Config {
        dim,
        n_layers: u("block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim: u("feed_forward_length")?,
        vocab_size: 0,
        rope_theta: g
            .meta("llama.rope.freq_base")
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0),
        rms_eps: g
            .meta("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-5) as f32,
        max_context: u("context_length").unwrap_or(2048),
        rope: RopeStyle::Interleaved,
    };
    validate(&cfg).map_err(bad)?;
    Ok(cfg)
}

pub(crate) fn hf_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let bad = |reason: String| EngineError::Config {
        path: path.clone(),
        reason,
    };
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let mt = j["model_type"].as_str().unwrap_or("");
    if mt != "llama" {
        return Err(EngineError::UnsupportedArch {
            path,
            arch: mt.into(),
        });
    }
    if !j["rope_scaling"].is_null() && j.get("rope_scaling").is_some() {
        return Err(bad("rope_scaling is not supported yet".into()));
    }
    let u = |k: &str| -> Result<usize> {
        j[k].as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("'{k}' is missing or not an integer")))
    };
    let dim = u("hidden_size")?;
    let n_heads = u("num_attention_heads")?;
    let cfg = Config {
        dim,
        n_layers: u("num_hidden_layers")?,
        n_heads,
        n_kv_heads: u("num_key_value_heads").unwrap_or(n_heads),
        head_dim: u("head_dim").unwrap_or(dim.checked_div(n_heads).unwrap_or(0)),
        ffn_dim: u("intermediate_size")?,
        vocab_size: u("vocab_size")?,
        rope_theta: j["rope_theta"].as_f64().unwrap_or(10000.0),
        rms_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        max_context: u("max_position_embeddings").unwrap_or(2048),
        rope: RopeStyle::Half,
    };
    validate(&cfg).map_err(bad)?;
    Ok(cfg)
}

fn validate(c: &Config) -> std::result::Result<(), String> {
    if c.dim == 0 || c.n_layers == 0 || c.n_heads == 0 || c.n_kv_heads == 0 || c.ffn_dim == 0 {
        return Err(format!("implausible model shape {c:?}"));
    }
    if !c.n_heads.is_multiple_of(c.n_kv_heads) {
        return Err(format!(
            "{} heads is not a multiple of {} KV heads",
            c.n_heads, c.n_kv_heads
        ));
    }
    if !c.head_dim.is_multiple_of(2) || c.head_dim == 0 {
        return Err(format!("head dimension {} must be even", c.head_dim));
    }
    if c.max_context == 0 || c.max_context > 1 << 20 {
        return Err(format!("implausible context length {}", c.max_context));
    }
    Ok(())
}
