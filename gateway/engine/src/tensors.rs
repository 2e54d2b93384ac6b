//! Tensor-level access to a model on disk, for offline transforms (Gstack growth, AdaptiVocab
//! embeddings): the tensors of a GGUF file or a Hugging Face safetensors directory under their
//! Hugging Face names and layout, read one at a time as f32, and a streaming safetensors
//! writer. Nothing is loaded whole: a model larger than RAM streams through.
//!
//! GGUF `llama` files store q/k projections in the interleaved RoPE layout (llama.cpp's
//! permutation); they are read back in the Hugging Face `rotate_half` layout, so the written
//! directory loads in transformers as it is.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value as Json};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::model::{self, Config, SafetensorsSource};
use crate::quant::{self, GgmlType};
use crate::tokenizer::Tokenizer;

/// One tensor of the input model, under its Hugging Face name.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub name: String,
    /// Safetensors dtype name of the stored tensor when it is F32, F16 or BF16; `F32` for a
    /// quantized GGUF tensor (it is read dequantized).
    pub dtype: String,
    /// The stored type (a GGUF quantized type, or F32/F16/BF16).
    pub stored: GgmlType,
    /// Row-major shape, outermost first (the Hugging Face order).
    pub shape: Vec<usize>,
    where_: Where,
}

#[derive(Debug, Clone)]
enum Where {
    /// Index into the GGUF tensor list; `permute` = n heads for q/k.
    Gguf {
        index: usize,
        permute: Option<usize>,
    },
    /// (file index, byte start, byte length) in the safetensors files.
    St {
        file: usize,
        start: usize,
        len: usize,
    },
}

enum Files {
    /// The file and the tokenizer built from its metadata (once, at open).
    Gguf(Arc<GgufFile>, Box<Tokenizer>),
    St(SafetensorsSource),
}

/// A model's files opened for tensor-by-tensor reading.
pub struct ModelFiles {
    pub path: PathBuf,
    /// The model's config in Hugging Face `config.json` form (synthesized for GGUF).
    pub config: Json,
    pub cfg: Config,
    pub tensors: Vec<TensorMeta>,
    files: Files,
}

impl ModelFiles {
    /// Open a `.gguf` file or a Hugging Face directory (llama architecture).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_hf(path)
        } else if path.exists() {
            Self::open_gguf(path)
        } else {
            Err(EngineError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let cfg = model::hf_config(dir)?;
        let cp = dir.join("config.json");
        let text = std::fs::read_to_string(&cp).map_err(|e| EngineError::io(&cp, e))?;
        let config: Json = serde_json::from_str(&text).map_err(|e| EngineError::Config {
            path: cp.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
        let st = SafetensorsSource::open(dir)?;
        let mut tensors = Vec::new();
        for (fi, (path, _, index)) in st.files.iter().enumerate() {
            let mut list: Vec<_> = index.iter().collect();
            list.sort_by_key(|(_, v)| v.2);
            for (name, (dtype, shape, start, len)) in list {
                let stored = model::st_dtype(path, name, dtype)?;
                let n: usize = shape.iter().product();
                if stored.row_bytes(n) != *len {
                    return Err(EngineError::Safetensors {
                        path: path.clone(),
                        reason: format!("tensor '{name}': {len} bytes for shape {shape:?}"),
                    });
                }
                tensors.push(TensorMeta {
                    name: name.clone(),
                    dtype: dtype.clone(),
                    stored,
                    shape: shape.clone(),
                    where_: Where::St {
                        file: fi,
                        start: *start,
                        len: *len,
                    },
                });
            }
        }
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            cfg,
            tensors,
            files: Files::St(st),
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let cfg = model::gguf_config(&g)?;
        let mut tensors = Vec::new();
        let mut vocab = 0;
        for (index, t) in g.header.tensors.iter().enumerate() {
            let Some((name, permute)) = hf_name(&t.name, &cfg) else {
                continue; // rope tables and the like: not weights of the HF model
            };
            let mut shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
            if shape.len() > 2 {
                let cols = shape[shape.len() - 1];
                shape = vec![shape.iter().product::<usize>() / cols, cols];
            }
            if name == "model.embed_tokens.weight" {
                vocab = shape[0];
            }
            if let Some(h) = permute {
                if shape.len() != 2 || shape[0] != h * cfg.head_dim {
                    return Err(EngineError::Shape {
                        path: path.to_path_buf(),
                        tensor: t.name.clone(),
                        got: shape,
                        expected: vec![h * cfg.head_dim, cfg.dim],
                    });
                }
            }
            let dtype = match t.dtype {
                GgmlType::F16 => "F16",
                GgmlType::BF16 => "BF16",
                _ => "F32",
            };
            tensors.push(TensorMeta {
                name,
                dtype: dtype.into(),
                stored: t.dtype,
                shape,
                where_: Where::Gguf { index, permute },
            });
        }
        let tok = Tokenizer::from_gguf(&g)?;
        let tied = !tensors.iter().any(|t| t.name == "lm_head.weight");
        let eos: Json = match tok.stop_ids.as_slice() {
            [one] => json!(one),
            [] => Json::Null,
            many => json!(many),
        };
        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": cfg.max_context,
            // the f32 epsilon printed shortest (1e-5, not 9.99999974e-6)
            "rms_norm_eps": cfg.rms_eps.to_string().parse::<f64>().unwrap_or(cfg.rms_eps as f64),
            "rope_theta": cfg.rope_theta,
            "rope_scaling": null,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "tie_word_embeddings": tied,
            "bos_token_id": tok.bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        Ok(Self {
            path: path.to_path_buf(),
            config,
            cfg,
            tensors,
            files: Files::Gguf(Arc::new(g), Box::new(tok)),
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of the input file(s) covered by the tensors.
    pub fn stored_bytes(&self) -> usize {
        self.tensors.iter().map(|t| self.raw(t).len()).sum()
    }

    fn raw(&self, t: &TensorMeta) -> &[u8] {
        match (&self.files, &t.where_) {
            (Files::Gguf(g, _), Where::Gguf { index, .. }) => {
                g.tensor_bytes(&g.header.tensors[*index])
            }
            (Files::St(st), Where::St { file, start, len }) => &st.files[*file].1[*start..][..*len],
            _ => unreachable!("tensor location does not match the file kind"),
        }
    }

    /// Tensor `name` as f32 in the Hugging Face layout (dequantized, q/k un-permuted).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.path.clone(),
                tensor: name.into(),
            })?;
        let bytes = self.raw(t);
        let cols = *t.shape.last().unwrap_or(&1);
        let rows = t.shape.iter().product::<usize>() / cols.max(1);
        let rb = t.stored.row_bytes(cols);
        if bytes.len() != rows * rb {
            return Err(EngineError::Config {
                path: self.path.clone(),
                reason: format!(
                    "tensor '{name}': {} bytes stored, {} expected for {:?} {}",
                    bytes.len(),
                    rows * rb,
                    t.shape,
                    t.stored.name()
                ),
            });
        }
        let mut out = vec![0f32; rows * cols];
        let permute = match t.where_ {
            Where::Gguf { permute, .. } => permute,
            Where::St { .. } => None,
        };
        let hd = self.cfg.head_dim;
        for r in 0..rows {
            // HF row h·hd + j·hd/2 + i holds the interleaved row h·hd + 2i + j.
            let dst = match permute {
                Some(_) => {
                    let (h, k) = (r / hd, r % hd);
                    let (i, j) = (k / 2, k % 2);
                    h * hd + j * (hd / 2) + i
                }
                None => r,
            };
            quant::dequantize_row(
                t.stored,
                &bytes[r * rb..(r + 1) * rb],
                &mut out[dst * cols..(dst + 1) * cols],
            );
        }
        Ok(out)
    }

    /// Write the tokenizer files of a Hugging Face directory into `dir`: copied from a
    /// Hugging Face input, built from the GGUF metadata otherwise.
    pub fn write_tokenizer(&self, dir: &Path) -> Result<Vec<String>> {
        let mut written = Vec::new();
        match &self.files {
            Files::St(_) => {
                for f in [
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "generation_config.json",
                    "tokenizer.model",
                    "vocab.json",
                    "merges.txt",
                ] {
                    let src = self.path.join(f);
                    if src.exists() {
                        let dst = dir.join(f);
                        std::fs::copy(&src, &dst).map_err(|e| EngineError::io(&dst, e))?;
                        written.push(f.to_string());
                    }
                }
            }
            Files::Gguf(_, tok) => {
                let p = dir.join("tokenizer.json");
                tok.inner()
                    .save(&p, false)
                    .map_err(|e| EngineError::Tokenizer {
                        path: p.clone(),
                        reason: format!("writing: {e}"),
                    })?;
                let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
                let mut tc = json!({
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "add_bos_token": tok.add_bos,
                    "add_eos_token": false,
                    "model_max_length": self.cfg.max_context,
                    "clean_up_tokenization_spaces": false,
                });
                if let Some(b) = name(tok.bos) {
                    tc["bos_token"] = json!(b);
                }
                if let Some(e) = name(tok.eos) {
                    tc["eos_token"] = json!(e);
                }
                if let Some(t) = &tok.chat_template {
                    tc["chat_template"] = json!(t);
                }
                write_json(&dir.join("tokenizer_config.json"), &tc)?;
                let gen = json!({
                    "bos_token_id": tok.bos,
                    "eos_token_id": self.config["eos_token_id"],
                });
                write_json(&dir.join("generation_config.json"), &gen)?;
                written.extend(
                    [
                        "tokenizer.json",
                        "tokenizer_config.json",
                        "generation_config.json",
                    ]
                    .map(String::from),
                );
            }
        }
        Ok(written)
    }
}

/// Write `v` as pretty JSON to `path`.
pub fn write_json(path: &Path, v: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| EngineError::io(path, e))
}

/// The Hugging Face name of a GGUF llama tensor, and the head count to un-permute by for q/k.
fn hf_name(gguf: &str, cfg: &Config) -> Option<(String, Option<usize>)> {
    match gguf {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), None)),
        "output.weight" => return Some(("lm_head.weight".into(), None)),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (i, t) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (n, permute) = match t {
        "attn_norm.weight" => ("input_layernorm", None),
        "attn_q.weight" => ("self_attn.q_proj", Some(cfg.n_heads)),
        "attn_k.weight" => ("self_attn.k_proj", Some(cfg.n_kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj", None),
        "attn_output.weight" => ("self_attn.o_proj", None),
        "ffn_norm.weight" => ("post_attention_layernorm", None),
        "ffn_gate.weight" => ("mlp.gate_proj", None),
        "ffn_up.weight" => ("mlp.up_proj", None),
        "ffn_down.weight" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{i}.{n}.weight"), permute))
}

/// Output tensor types of the safetensors writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "F32" | "FLOAT32" => Some(Dtype::F32),
            "F16" | "FLOAT16" => Some(Dtype::F16),
            "BF16" | "BFLOAT16" => Some(Dtype::BF16),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }
    /// transformers' `torch_dtype` name.
    pub fn torch(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
    /// Little-endian bytes of `v` in this type (round to nearest even).
    pub fn encode(self, v: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(v.len() * self.size());
        match self {
            Dtype::F32 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Dtype::F16 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
            Dtype::BF16 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes())),
        }
    }
}

/// One tensor the writer will write.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn n_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Streams tensors, in a fixed order known up front, into `model.safetensors` (or into
/// shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` when the
/// total passes `shard_bytes`, as transformers writes them).
pub struct SafetensorsWriter {
    dir: PathBuf,
    plan: Vec<OutTensor>,
    /// shard index of each tensor, and the shard file names.
    shard_of: Vec<usize>,
    shard_names: Vec<String>,
    next: usize,
    file: Option<(usize, std::io::BufWriter<std::fs::File>)>,
}

impl SafetensorsWriter {
    pub fn create(dir: &Path, plan: Vec<OutTensor>, shard_bytes: usize) -> Result<Self> {
        let mut shard_of = Vec::with_capacity(plan.len());
        let (mut shard, mut in_shard) = (0usize, 0usize);
        for t in &plan {
            if in_shard > 0 && in_shard + t.n_bytes() > shard_bytes {
                shard += 1;
                in_shard = 0;
            }
            in_shard += t.n_bytes();
            shard_of.push(shard);
        }
        let n = shard + 1;
        let shard_names: Vec<String> = if n == 1 {
            vec!["model.safetensors".into()]
        } else {
            (1..=n)
                .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
                .collect()
        };
        if n > 1 {
            let map: serde_json::Map<String, Json> = plan
                .iter()
                .zip(&shard_of)
                .map(|(t, &s)| (t.name.clone(), json!(shard_names[s])))
                .collect();
            let total: usize = plan.iter().map(OutTensor::n_bytes).sum();
            write_json(
                &dir.join("model.safetensors.index.json"),
                &json!({"metadata": {"total_size": total}, "weight_map": map}),
            )?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            plan,
            shard_of,
            shard_names,
            next: 0,
            file: None,
        })
    }

    pub fn shard_names(&self) -> &[String] {
        &self.shard_names
    }

    fn open_shard(&mut self, s: usize) -> Result<()> {
        let path = self.dir.join(&self.shard_names[s]);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0usize;
        for (t, _) in self
            .plan
            .iter()
            .zip(&self.shard_of)
            .filter(|(_, &ts)| ts == s)
        {
            let n = t.n_bytes();
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let mut h = serde_json::to_vec(&Json::Object(header)).expect("JSON values serialize");
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let f = std::fs::File::create(&path).map_err(|e| EngineError::io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(&h))
            .map_err(|e| EngineError::io(&path, e))?;
        self.file = Some((s, w));
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((s, w)) = self.file.take() {
            let path = self.dir.join(&self.shard_names[s]);
            let f = w
                .into_inner()
                .map_err(|e| EngineError::io(&path, e.into_error()))?;
            f.sync_all().map_err(|e| EngineError::io(&path, e))?;
        }
        Ok(())
    }

    /// Write the next tensor of the plan (its bytes in the plan's dtype).
    pub fn write_next(&mut self, bytes: &[u8]) -> Result<()> {
        let t = self
            .plan
            .get(self.next)
            .ok_or_else(|| EngineError::Invalid("more tensors written than planned".into()))?;
        if bytes.len() != t.n_bytes() {
            return Err(EngineError::Invalid(format!(
                "tensor '{}': {} bytes given, {} planned",
                t.name,
                bytes.len(),
                t.n_bytes()
            )));
        }
        let s = self.shard_of[self.next];
        if self.file.as_ref().map(|f| f.0) != Some(s) {
            self.close_shard()?;
            self.open_shard(s)?;
        }
        let path = self.dir.join(&self.shard_names[s]);
        let (_, w) = self.file.as_mut().expect("shard is open");
        w.write_all(bytes).map_err(|e| EngineError::io(&path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flush and sync; every planned tensor must have been written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(EngineError::Invalid(format!(
                "{} of {} planned tensors written",
                self.next,
                self.plan.len()
            )));
        }
        self.close_shard()
    }
}
