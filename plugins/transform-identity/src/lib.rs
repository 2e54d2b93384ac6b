//! The identity model transform: the plan keeps the config and every tensor, each produced
//! from itself. The built-in "no transform" exposed through the model-transform ABI, and the
//! smallest example of the kind.

use serde_json::{json, Value};
use switchyard_plugin::{
    copy_one_source, export_model_transform, ModelTransform, PluginError, PluginResult, Tensor,
};

pub struct Identity {
    sizes: Vec<usize>,
}

impl ModelTransform for Identity {
    fn create(config: &str) -> PluginResult<Self> {
        if !config.trim().is_empty() {
            return Err(PluginError::invalid(
                "transform-identity takes no configuration",
            ));
        }
        Ok(Self { sizes: Vec::new() })
    }

    fn plan(&mut self, model: &str) -> PluginResult<String> {
        let m: Value = serde_json::from_str(model)
            .map_err(|e| PluginError::invalid(format!("model description: {e}")))?;
        let tensors = m["tensors"]
            .as_array()
            .ok_or_else(|| PluginError::invalid("model description has no `tensors` list"))?;
        let mut out = Vec::new();
        self.sizes.clear();
        for t in tensors {
            let name = t["name"]
                .as_str()
                .ok_or_else(|| PluginError::invalid("a tensor has no name"))?;
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64())
                        .map(|d| d as usize)
                        .collect()
                })
                .unwrap_or_default();
            self.sizes.push(shape.iter().product());
            out.push(json!({"name": name, "dtype": t["dtype"], "shape": shape, "sources": [name]}));
        }
        Ok(json!({"config": m["config"], "tensors": out}).to_string())
    }

    fn produce(&mut self, index: usize, sources: &[Tensor], out: &Tensor) -> PluginResult<()> {
        let n = *self
            .sizes
            .get(index)
            .ok_or_else(|| PluginError::invalid(format!("no tensor {index} in the plan")))?;
        copy_one_source(n, sources, out)
    }
}

export_model_transform!(Identity, name = "transform-identity", version = "0.1.0");
