//! Gstack (Du et al., NeurIPS 2024): grow a trained model of L layers into g·L layers by
//! repeating the whole stack g times in order (layers 0..L−1, 0..L−1, …). Every copy is an
//! independent deep copy; embeddings, final norm and head are copied unchanged; width is
//! unchanged.
//!
//! Configuration (one `key = value` per line, `#` comments):
//! - `factor = G`: growth factor g ≥ 1 (default 4); g = 1 is the identity.
//! - `layers = T`: a target layer count T ≥ L instead of a factor. With T = q·L + r the stack
//!   is repeated q times, then the **last** r layers (L−r … L−1) are appended once more, so
//!   the grown model still ends with the original top layers right below the final norm.
//!   Give one of `factor` and `layers`, not both.
//!
//! The plan maps output layer i to source layer `src(i)`; `produce` copies the source tensor.

use serde_json::{json, Value};
use switchyard_plugin::{
    copy_one_source, export_model_transform, ModelTransform, PluginError, PluginResult, Tensor,
};

/// Architectures whose decoder layers are `model.layers.N.*` with `num_hidden_layers`.
const ARCHS: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    Factor(usize),
    Layers(usize),
}

/// Parse the plugin configuration.
pub fn parse_config(config: &str) -> Result<Growth, String> {
    let mut factor = None;
    let mut layers = None;
    for (n, k, v) in switchyard_plugin::config_pairs(config)? {
        let num: i64 = v
            .parse()
            .map_err(|_| format!("line {n}: {k} must be an integer, got {v:?}"))?;
        match k {
            "factor" => factor = Some(num),
            "layers" => layers = Some(num),
            other => {
                return Err(format!(
                    "line {n}: unknown key {other:?} (known: factor, layers)"
                ))
            }
        }
    }
    match (factor, layers) {
        (Some(_), Some(_)) => Err("give either factor or layers, not both".into()),
        (Some(g), None) if g < 1 => Err(format!("growth factor must be at least 1, got {g}")),
        (Some(g), None) => Ok(Growth::Factor(g as usize)),
        (None, Some(t)) if t < 1 => Err(format!("target layer count must be positive, got {t}")),
        (None, Some(t)) => Ok(Growth::Layers(t as usize)),
        (None, None) => Ok(Growth::Factor(4)),
    }
}

/// Source layer of each output layer for a model of `l` layers.
pub fn layer_map(growth: Growth, l: usize) -> Result<Vec<usize>, String> {
    if l == 0 {
        return Err("the model has no layers".into());
    }
    let t = match growth {
        Growth::Factor(g) => g
            .checked_mul(l)
            .ok_or_else(|| format!("factor {g} overflows"))?,
        Growth::Layers(t) if t < l => {
            return Err(format!(
                "target of {t} layers is fewer than the model's {l}: Gstack only grows"
            ))
        }
        Growth::Layers(t) => t,
    };
    let (q, r) = (t / l, t % l);
    let mut map: Vec<usize> = (0..q).flat_map(|_| 0..l).collect();
    map.extend(l - r..l);
    Ok(map)
}

pub struct Gstack {
    growth: Growth,
    /// element count of each planned output tensor
    sizes: Vec<usize>,
}

fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (i, suffix) = rest.split_once('.')?;
    Some((i.parse().ok()?, suffix))
}

impl ModelTransform for Gstack {
    fn create(config: &str) -> PluginResult<Self> {
        let growth = parse_config(config).map_err(PluginError::invalid)?;
        Ok(Self {
            growth,
            sizes: Vec::new(),
        })
    }

    fn plan(&mut self, model: &str) -> PluginResult<String> {
        let bad = |m: String| PluginError::invalid(m);
        let m: Value =
            serde_json::from_str(model).map_err(|e| bad(format!("model description: {e}")))?;
        let cfg = &m["config"];
        let arch = cfg["model_type"].as_str().unwrap_or("");
        if !ARCHS.contains(&arch) {
            return Err(bad(format!(
                "unknown architecture {arch:?} (gstack grows: {})",
                ARCHS.join(", ")
            )));
        }
        let l = cfg["num_hidden_layers"]
            .as_u64()
            .ok_or_else(|| bad("config has no num_hidden_layers".into()))? as usize;
        let tensors = m["tensors"]
            .as_array()
            .ok_or_else(|| bad("model description has no `tensors` list".into()))?;
        // Layer tensors by layer; other tensors (embeddings, norm, head) in input order.
        let mut per_layer: Vec<Vec<&Value>> = vec![Vec::new(); l];
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        for t in tensors {
            let name = t["name"]
                .as_str()
                .ok_or_else(|| bad("a tensor has no name".into()))?;
            match layer_of(name) {
                Some((i, _)) if i >= l => {
                    return Err(bad(format!(
                        "tensor {name} belongs to layer {i} but the config has {l} layers"
                    )))
                }
                Some((i, _)) => per_layer[i].push(t),
                None if name.contains("embed") => head.push(t),
                None => tail.push(t),
            }
        }
        let suffixes = |ts: &Vec<&Value>| -> Vec<String> {
            let mut s: Vec<String> = ts
                .iter()
                .filter_map(|t| layer_of(t["name"].as_str()?).map(|(_, s)| s.to_string()))
                .collect();
            s.sort();
            s
        };
        let first = suffixes(&per_layer[0]);
        if first.is_empty() {
            return Err(bad("layer 0 has no tensors".into()));
        }
        for (i, ts) in per_layer.iter().enumerate().skip(1) {
            if suffixes(ts) != first {
                return Err(bad(format!(
                    "layer {i} does not have the same tensors as layer 0: layers must be alike to stack"
                )));
            }
        }
        let map = layer_map(self.growth, l).map_err(bad)?;
        let mut out = Vec::new();
        self.sizes.clear();
        let mut push = |name: String, t: &Value, src: &str, sizes: &mut Vec<usize>| {
            let shape: Vec<u64> = t["shape"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            sizes.push(shape.iter().product::<u64>() as usize);
            out.push(json!({"name": name, "dtype": t["dtype"], "shape": shape, "sources": [src]}));
        };
        for t in &head {
            let n = t["name"].as_str().unwrap_or_default();
            push(n.to_string(), t, n, &mut self.sizes);
        }
        for (i, &j) in map.iter().enumerate() {
            for t in &per_layer[j] {
                let n = t["name"].as_str().unwrap_or_default();
                let (_, suffix) = layer_of(n).expect("layer tensor");
                push(format!("model.layers.{i}.{suffix}"), t, n, &mut self.sizes);
            }
        }
        for t in &tail {
            let n = t["name"].as_str().unwrap_or_default();
            push(n.to_string(), t, n, &mut self.sizes);
        }
        let mut config = cfg.clone();
        config["num_hidden_layers"] = json!(map.len());
        let summary = match self.growth {
            Growth::Factor(g) => format!("G_stack x{g}: {l} -> {} layers", map.len()),
            Growth::Layers(t) => format!(
                "G_stack to {t} layers: {l} -> {} layers ({} full copies + the last {})",
                map.len(),
                t / l,
                t % l
            ),
        };
        Ok(
            json!({"config": config, "tensors": out, "summary": summary, "layer_map": map})
                .to_string(),
        )
    }

    fn produce(&mut self, index: usize, sources: &[Tensor], out: &Tensor) -> PluginResult<()> {
        let n = *self
            .sizes
            .get(index)
            .ok_or_else(|| PluginError::invalid(format!("no tensor {index} in the plan")))?;
        copy_one_source(n, sources, out)
    }
}

export_model_transform!(Gstack, name = "gstack", version = "0.1.0");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_maps() {
        assert_eq!(layer_map(Growth::Factor(1), 3).unwrap(), [0, 1, 2]);
        assert_eq!(layer_map(Growth::Factor(2), 3).unwrap(), [0, 1, 2, 0, 1, 2]);
        assert_eq!(
            layer_map(Growth::Layers(8), 3).unwrap(),
            [0, 1, 2, 0, 1, 2, 1, 2]
        );
        assert_eq!(layer_map(Growth::Layers(3), 3).unwrap(), [0, 1, 2]);
        assert!(layer_map(Growth::Layers(2), 3)
            .unwrap_err()
            .contains("only grows"));
    }

    #[test]
    fn configs() {
        assert_eq!(parse_config("").unwrap(), Growth::Factor(4));
        assert_eq!(
            parse_config("factor = 2 # twice").unwrap(),
            Growth::Factor(2)
        );
        assert_eq!(parse_config("layers=7").unwrap(), Growth::Layers(7));
        assert!(parse_config("factor = 0")
            .unwrap_err()
            .contains("at least 1"));
        assert!(parse_config("factor = -3")
            .unwrap_err()
            .contains("at least 1"));
        assert!(parse_config("factor = x").unwrap_err().contains("integer"));
        assert!(parse_config("factor = 2\nlayers = 4")
            .unwrap_err()
            .contains("not both"));
        assert!(parse_config("depth = 2")
            .unwrap_err()
            .contains("unknown key"));
    }

    #[test]
    fn plan_repeats_layers_and_updates_config() {
        let mut g = Gstack::create("factor = 3").unwrap();
        let model = json!({
            "config": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4},
            "tensors": [
                {"name": "model.embed_tokens.weight", "dtype": "F32", "shape": [10, 4]},
                {"name": "model.layers.0.mlp.up_proj.weight", "dtype": "F32", "shape": [8, 4]},
                {"name": "model.layers.0.input_layernorm.weight", "dtype": "F32", "shape": [4]},
                {"name": "model.layers.1.mlp.up_proj.weight", "dtype": "F32", "shape": [8, 4]},
                {"name": "model.layers.1.input_layernorm.weight", "dtype": "F32", "shape": [4]},
                {"name": "model.norm.weight", "dtype": "F32", "shape": [4]},
            ]
        });
        let plan: Value = serde_json::from_str(&g.plan(&model.to_string()).unwrap()).unwrap();
        assert_eq!(plan["config"]["num_hidden_layers"], 6);
        assert_eq!(plan["config"]["hidden_size"], 4);
        let t = plan["tensors"].as_array().unwrap();
        assert_eq!(t.len(), 2 + 6 * 2);
        assert_eq!(t[0]["name"], "model.embed_tokens.weight");
        assert_eq!(t[13]["name"], "model.norm.weight");
        // output layer 5 = source layer 1
        assert_eq!(t[11]["name"], "model.layers.5.mlp.up_proj.weight");
        assert_eq!(t[11]["sources"][0], "model.layers.1.mlp.up_proj.weight");
        assert_eq!(t[3]["name"], "model.layers.1.mlp.up_proj.weight");
        assert_eq!(t[3]["sources"][0], "model.layers.1.mlp.up_proj.weight");

        let mut bad = model.clone();
        bad["config"]["model_type"] = json!("gpt2");
        let e = g.plan(&bad.to_string()).unwrap_err();
        assert!(format!("{e:?}").contains("unknown architecture"), "{e:?}");
        let mut bad = model.clone();
        bad["tensors"].as_array_mut().unwrap().remove(4);
        let e = g.plan(&bad.to_string()).unwrap_err();
        assert!(format!("{e:?}").contains("layer 1 does not have"), "{e:?}");
    }
}
