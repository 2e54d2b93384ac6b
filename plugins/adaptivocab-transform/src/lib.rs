//! AdaptiVocab's model side (Nakash et al., COLM 2025) as a model-transform plugin.
//!
//! Configuration: the text of an AdaptiVocab patch file (`switchyard vocab build`).
//!
//! Every tensor is copied, except the rows of the freed ids that the patch gives to n-grams:
//! - input embedding of an n-gram t₁…tₙ: Σ wᵢ·E[tᵢ] with wᵢ ∝ 2^(i−n) (the last constituent
//!   weighs most: 1/7, 2/7, 4/7 for n = 3);
//! - LM-head row: Σ wᵢ·H[tᵢ] with wᵢ ∝ 2^(1−i) (the first constituent weighs most).
//!
//! A model with tied embeddings gets its own `lm_head.weight` (the embedding with the head
//! rows above) and `tie_word_embeddings: false`. The output config records the patch's sha256
//! under `adaptivocab.patch_sha256`, so the gateway can check that a pipeline pairs this model
//! with the patch it was made for.

use serde_json::{json, Value};
use sha2::Digest;
use switchyard_adaptivocab::Patch;
use switchyard_plugin::{
    copy_one_source, export_model_transform, ModelTransform, PluginError, PluginResult, Tensor,
};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const HEAD: &str = "lm_head.weight";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Copy,
    Embed,
    Head,
}

pub struct AdaptiVocabTransform {
    patch: Patch,
    sha256: String,
    planned: Vec<(Kind, usize)>,
}

/// Normalized weights of an n-gram's constituents: input side (last weighs most) or output
/// side (first weighs most).
pub fn weights(n: usize, input: bool) -> Vec<f32> {
    let raw: Vec<f64> = (1..=n)
        .map(|i| {
            let e = if input {
                i as i32 - n as i32
            } else {
                1 - i as i32
            };
            2f64.powi(e)
        })
        .collect();
    let s: f64 = raw.iter().sum();
    raw.iter().map(|w| (w / s) as f32).collect()
}

/// Rewrite the rows of every n-gram id of `m` ([vocab, dim], a copy of the base rows).
pub fn fill_rows(patch: &Patch, m: &mut [f32], dim: usize, input: bool) {
    for a in &patch.file.added {
        let w = weights(a.ngram.len(), input);
        let mut row = vec![0f32; dim];
        for (&t, &wi) in a.ngram.iter().zip(&w) {
            let src = &m[t as usize * dim..(t as usize + 1) * dim];
            for (r, s) in row.iter_mut().zip(src) {
                *r += wi * s;
            }
        }
        m[a.id as usize * dim..(a.id as usize + 1) * dim].copy_from_slice(&row);
    }
}

impl ModelTransform for AdaptiVocabTransform {
    fn create(config: &str) -> PluginResult<Self> {
        if config.trim().is_empty() {
            return Err(PluginError::invalid(
                "the configuration must be an AdaptiVocab patch file (JSON)",
            ));
        }
        let patch = Patch::from_json(config.as_bytes()).map_err(PluginError::invalid)?;
        let sha256 = sha2::Sha256::digest(config.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            patch,
            sha256,
            planned: Vec::new(),
        })
    }

    fn plan(&mut self, model: &str) -> PluginResult<String> {
        let bad = |m: String| PluginError::invalid(m);
        let m: Value =
            serde_json::from_str(model).map_err(|e| bad(format!("model description: {e}")))?;
        let cfg = &m["config"];
        let vocab = cfg["vocab_size"]
            .as_u64()
            .ok_or_else(|| bad("config has no vocab_size".into()))?;
        if vocab != self.patch.base_vocab_size() as u64 {
            return Err(bad(format!(
                "the patch was built for a vocabulary of {} ids; the model has {vocab}",
                self.patch.base_vocab_size()
            )));
        }
        let tensors = m["tensors"]
            .as_array()
            .ok_or_else(|| bad("model description has no `tensors` list".into()))?;
        let find = |name: &str| tensors.iter().find(|t| t["name"] == name);
        let embed = find(EMBED).ok_or_else(|| bad(format!("the model has no {EMBED}")))?;
        let shape = |t: &Value| -> Vec<u64> {
            t["shape"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default()
        };
        let es = shape(embed);
        if es.len() != 2 || es[0] != vocab {
            return Err(bad(format!(
                "{EMBED} has shape {es:?}, expected [{vocab}, dim]"
            )));
        }
        let mut out = Vec::new();
        self.planned.clear();
        for t in tensors {
            let name = t["name"].as_str().unwrap_or_default();
            let s = shape(t);
            let kind = match name {
                EMBED => Kind::Embed,
                HEAD => {
                    if s != es {
                        return Err(bad(format!("{HEAD} has shape {s:?}, expected {es:?}")));
                    }
                    Kind::Head
                }
                _ => Kind::Copy,
            };
            self.planned
                .push((kind, s.iter().product::<u64>() as usize));
            out.push(json!({"name": name, "dtype": t["dtype"], "shape": s, "sources": [name]}));
        }
        let tied = find(HEAD).is_none();
        if tied {
            self.planned
                .push((Kind::Head, es.iter().product::<u64>() as usize));
            out.push(
                json!({"name": HEAD, "dtype": embed["dtype"], "shape": es, "sources": [EMBED]}),
            );
        }
        let mut config = cfg.clone();
        config["tie_word_embeddings"] = json!(false);
        config["adaptivocab"] = json!({
            "patch_sha256": self.sha256,
            "ngrams": self.patch.file.added.len(),
            "removed": self.patch.file.removed.len(),
        });
        let summary = format!(
            "AdaptiVocab: {} n-gram rows in the embedding and the LM head{}",
            self.patch.file.added.len(),
            if tied { " (embeddings untied)" } else { "" }
        );
        Ok(json!({"config": config, "tensors": out, "summary": summary}).to_string())
    }

    fn produce(&mut self, index: usize, sources: &[Tensor], out: &Tensor) -> PluginResult<()> {
        let (kind, n) = *self
            .planned
            .get(index)
            .ok_or_else(|| PluginError::invalid(format!("no tensor {index} in the plan")))?;
        copy_one_source(n, sources, out)?;
        if kind == Kind::Copy {
            return Ok(());
        }
        let dim = n / self.patch.base_vocab_size() as usize;
        // SAFETY: the host's output view is valid for the call and not read meanwhile.
        let o = unsafe { out.as_f32_mut()? };
        fill_rows(&self.patch, o, dim, kind == Kind::Embed);
        Ok(())
    }
}

export_model_transform!(
    AdaptiVocabTransform,
    name = "adaptivocab-transform",
    version = "0.1.0"
);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_adaptivocab::{Added, Matching, PatchFile, Removed, FORMAT, VERSION};

    #[test]
    fn weights_follow_the_paper() {
        let w = weights(3, true);
        assert!((w[0] - 1.0 / 7.0).abs() < 1e-6 && (w[2] - 4.0 / 7.0).abs() < 1e-6);
        let w = weights(3, false);
        assert!((w[0] - 4.0 / 7.0).abs() < 1e-6 && (w[2] - 1.0 / 7.0).abs() < 1e-6);
        let w = weights(2, true);
        assert!((w[0] - 1.0 / 3.0).abs() < 1e-6 && (w[1] - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn rows_of_new_ids_only_change() {
        let patch = Patch::new(PatchFile {
            format: FORMAT.into(),
            version: VERSION,
            base_vocab_size: 4,
            base_tokenizer_sha256: String::new(),
            matching: Matching::Longest,
            description: String::new(),
            removed: vec![Removed {
                id: 3,
                token: String::new(),
                count: 0,
                decomposition: vec![1, 2],
            }],
            added: vec![Added {
                id: 3,
                ngram: vec![0, 1],
                text: String::new(),
                count: 1,
            }],
        })
        .unwrap();
        let base = vec![3.0, 0.0, 0.0, 3.0, 5.0, 5.0, 9.0, 9.0];
        let mut m = base.clone();
        fill_rows(&patch, &mut m, 2, true);
        assert_eq!(&m[..6], &base[..6]);
        assert_eq!(&m[6..], &[1.0, 2.0]); // 1/3·[3,0] + 2/3·[0,3]
        let mut h = base.clone();
        fill_rows(&patch, &mut h, 2, false);
        assert_eq!(&h[6..], &[2.0, 1.0]);
    }
}
