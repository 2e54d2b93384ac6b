//! Tokenizers: Hugging Face `tokenizer.json`, or built from GGUF metadata
//! (SentencePiece "llama" vocabularies and byte-level BPE "gpt2" vocabularies).
//!
//! GGUF vocabularies are turned into a `tokenizer.json` document and loaded by the
//! `tokenizers` crate, so both sources run through the same, well-tested code.

use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, Value};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation (EOS, end-of-turn, …).
    pub stop_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// Where the vocabulary came from (for error messages).
    pub source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Encode text. Special tokens written in the text (e.g. `<|im_start|>`) are parsed.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| self.err(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.err(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn err(&self, reason: String) -> EngineError {
        EngineError::Tokenizer {
            path: self.source.clone(),
            reason,
        }
    }

    /// From a Hugging Face model directory (tokenizer.json + tokenizer_config.json).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer {
                path,
                reason: "missing (a Hugging Face model directory needs tokenizer.json)".into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| EngineError::Tokenizer {
                path: cfg_path.clone(),
                reason: format!("invalid JSON: {e}"),
            })?,
            Err(_) => Json::Null,
        };
        let gen: Json = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Json::Null);
        let model_cfg: Json = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Json::Null);
        let tok_id = |key: &str| -> Option<u32> {
            let t = &cfg[key];
            let s = t.as_str().or_else(|| t["content"].as_str())?;
            inner.token_to_id(s)
        };
        let num = |v: &Json| v.as_u64().map(|x| x as u32);
        let bos = tok_id("bos_token")
            .or_else(|| num(&gen["bos_token_id"]))
            .or_else(|| num(&model_cfg["bos_token_id"]));
        let eos = tok_id("eos_token")
            .or_else(|| num(&gen["eos_token_id"]))
            .or_else(|| num(&model_cfg["eos_token_id"]));
        // Whether the post-processor adds BOS tells us what the model was trained with.
        let add_bos = match cfg["add_bos_token"].as_bool() {
            Some(b) => b,
            None => {
                let with = inner
                    .encode_fast("a", true)
                    .map(|e| e.get_ids().to_vec())
                    .unwrap_or_default();
                bos.is_some() && with.first() == bos.as_ref()
            }
        };
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for v in [&gen["eos_token_id"], &model_cfg["eos_token_id"]] {
            match v {
                Json::Array(a) => stop_ids.extend(a.iter().filter_map(num)),
                v => stop_ids.extend(num(v)),
            }
        }
        stop_ids.sort();
        stop_ids.dedup();
        let chat_template = match &cfg["chat_template"] {
            Json::String(s) => Some(s.clone()),
            Json::Array(a) => a
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str().map(String::from)),
            _ => None,
        };
        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
            add_bos,
            chat_template,
            source: path,
        })
    }

    /// From the `tokenizer.ggml.*` metadata of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let err = |reason: String| EngineError::Tokenizer {
            path: g.path.clone(),
            reason,
        };
        let model = g
            .meta("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                err("no tokenizer in the metadata (tokenizer.ggml.model missing)".into())
            })?;
        let strings = |key: &str| -> Result<Vec<String>> {
            g.meta(key)
                .and_then(|v| v.as_array())
                .ok_or_else(|| err(format!("metadata '{key}' missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| err(format!("'{key}' holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match g
            .meta("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(err("token_type and tokens differ in length".into()));
        }
        let id = |key: &str| {
            g.meta(key)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let doc = match model {
            "llama" => {
                let scores: Vec<f64> =
                    match g.meta("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                        None => {
                            return Err(err(
                                "SentencePiece vocabulary without tokenizer.ggml.scores".into(),
                            ))
                        }
                    };
                let prefix = g
                    .meta("tokenizer.ggml.add_space_prefix")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true);
                let unk = id("tokenizer.ggml.unknown_token_id").unwrap_or(0);
                spm_document(&tokens, &scores, &types, unk, prefix)
            }
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = g
                    .meta("tokenizer.ggml.pre")
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let regexes = pre_regexes(pre)
                    .ok_or_else(|| err(format!("unsupported pre-tokenizer '{pre}'")))?;
                // Llama-3-style vocabularies take a whole pre-token when it is in the vocabulary.
                let ignore_merges = matches!(
                    pre,
                    "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral"
                );
                bpe_document(&tokens, &merges, &types, regexes, ignore_merges)
            }
            other => {
                return Err(err(format!(
                    "unsupported tokenizer model '{other}' (supported: llama, gpt2)"
                )))
            }
        };
        let inner: tokenizers::Tokenizer = doc
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| err(format!("building the tokenizer: {e}")))?;
        let add_bos = g
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(model == "llama");
        let mut stop_ids: Vec<u32> = eos
            .into_iter()
            .chain(id("tokenizer.ggml.eot_token_id"))
            .collect();
        // Chat models end a turn with a control token that is often not the EOS.
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(i) = tokens.iter().position(|x| x == t) {
                stop_ids.push(i as u32);
            }
        }
        stop_ids.sort();
        stop_ids.dedup();
        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
            add_bos,
            chat_template: g
                .meta("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(String::from),
            source: g.path.clone(),
        })
    }
}

/// Token types of GGUF (llama.cpp's llama_token_type).
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;
const TYPE_BYTE: u64 = 6;

fn added_tokens(tokens: &[String], types: &[u64]) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
        .map(|(i, (s, &t))| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": t == TYPE_CONTROL})
        })
        .collect()
}

fn vocab_map(tokens: &[String]) -> serde_json::Map<String, Json> {
    let mut m = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // Duplicate pieces (some vocabularies have them) keep their first id.
        m.entry(t.clone()).or_insert(json!(i));
    }
    m
}

/// SentencePiece BPE: merges derived from the vocabulary, ranked by the merged piece's score
/// (what llama.cpp's SPM tokenizer does: merge the best-scoring adjacent pair first).
fn spm_document(
    tokens: &[String],
    scores: &[f64],
    types: &[u64],
    unk: u32,
    add_prefix: bool,
) -> Json {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types[i] == TYPE_BYTE || types[i] == TYPE_CONTROL || types[i] == 2 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores.get(i).copied().unwrap_or(0.0), li, ri, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<Json> = merges.iter().map(|m| json!([m.3, m.4])).collect();
    let mut normalizers = vec![];
    if add_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": tokens.get(unk as usize),
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_map(tokens), "merges": merges}
    })
}

fn bpe_document(
    tokens: &[String],
    merges: &[String],
    types: &[u64],
    regexes: &[&str],
    ignore_merges: bool,
) -> Json {
    let mut pre: Vec<Json> = regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    pre.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab_map(tokens), "merges": merges}
    })
}

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer regexes llama.cpp applies, in order, for each `tokenizer.ggml.pre`.
pub fn pre_regexes(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        "gpt-2" | "mpt" | "olmo" | "jais" => &[GPT2_RE],
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" => &[LLAMA3_RE],
        "qwen2" | "stablelm2" | "hunyuan" => &[QWEN2_RE],
        "starcoder" | "smollm" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            &[r"\p{N}", GPT2_RE]
        }
        _ => return None,
    })
}
