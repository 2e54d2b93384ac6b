//! Runs a `model-transform` plugin over a model on disk: describe the input model to the
//! plugin, take its plan, then stream every output tensor (sources read one at a time,
//! `produce`, encode, write) into a Hugging Face safetensors directory.
//!
//! The output is written under a temporary name beside the destination and renamed into
//! place only when complete, so a failed or interrupted transform leaves no partial model
//! where the output should be (a killed process leaves its `.NAME.partial-PID` folder).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_engine::tensors::{write_json, Dtype, ModelFiles, OutTensor, SafetensorsWriter};

use crate::NativeModelTransform;

/// How to run a transform.
#[derive(Debug, Clone)]
pub struct TransformOptions {
    /// Output tensor type; `None` keeps each tensor's type (F32 for quantized GGUF tensors).
    pub dtype: Option<Dtype>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Start a new safetensors shard past this many bytes.
    pub shard_bytes: usize,
    /// Recorded in `switchyard-transform.json` (plugin name, version, config).
    pub provenance: Value,
}

impl Default for TransformOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            force: false,
            shard_bytes: 4 << 30,
            provenance: Value::Null,
        }
    }
}

/// What a transform wrote.
#[derive(Debug, Clone)]
pub struct TransformSummary {
    pub out: PathBuf,
    pub tensors: usize,
    pub params: usize,
    pub bytes_written: usize,
    pub bytes_read: usize,
    pub elapsed: Duration,
    pub shards: Vec<String>,
    /// The plugin's one-line description of its plan, when it gives one.
    pub summary: Option<String>,
    pub config: Value,
}

/// Removes the temporary output directory unless the transform completed.
struct TmpDir(Option<PathBuf>);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

struct PlannedTensor {
    out: OutTensor,
    sources: Vec<String>,
}

/// Run `t` on the model at `input`, writing a Hugging Face directory at `out`.
/// `progress(bytes_done, bytes_total)` is called after every tensor.
pub fn run_transform(
    t: &mut NativeModelTransform,
    input: &Path,
    out: &Path,
    opts: &TransformOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TransformSummary, String> {
    let start = Instant::now();
    if out.exists() && !opts.force {
        return Err(format!(
            "{}: already exists (pass --force to replace it)",
            out.display()
        ));
    }
    let model = ModelFiles::open(input).map_err(|e| e.to_string())?;
    let description = json!({
        "config": model.config,
        "tensors": model.tensors.iter().map(|t| json!({
            "name": t.name, "dtype": t.dtype, "shape": t.shape,
        })).collect::<Vec<_>>(),
    });
    let plan_text = t
        .plan(&description.to_string())
        .map_err(|e| e.to_string())?;
    let plan: Value =
        serde_json::from_str(&plan_text).map_err(|e| format!("the plugin's plan: {e}"))?;
    let planned = check_plan(&plan, &model, opts.dtype)?;

    let name = out
        .file_name()
        .ok_or_else(|| format!("{}: not a directory name", out.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let tmp_path = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_path);
    std::fs::create_dir(&tmp_path).map_err(|e| format!("{}: {e}", tmp_path.display()))?;
    let mut tmp = TmpDir(Some(tmp_path.clone()));

    let outs: Vec<OutTensor> = planned.iter().map(|p| p.out.clone()).collect();
    let total: usize = outs.iter().map(OutTensor::n_bytes).sum();
    let mut writer =
        SafetensorsWriter::create(&tmp_path, outs, opts.shard_bytes).map_err(|e| e.to_string())?;
    let shards = writer.shard_names().to_vec();
    let (mut done, mut read, mut params) = (0usize, 0usize, 0usize);
    let mut bytes = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        let mut srcs = Vec::with_capacity(p.sources.len());
        for s in &p.sources {
            let v = model.read_f32(s).map_err(|e| e.to_string())?;
            read += v.len() * 4;
            srcs.push((v, model.tensor(s).expect("checked").shape.clone()));
        }
        let n: usize = p.out.shape.iter().product();
        let mut data = vec![0f32; n];
        let views: Vec<(&[f32], &[usize])> = srcs
            .iter()
            .map(|(v, s)| (v.as_slice(), s.as_slice()))
            .collect();
        t.produce(i, &views, &mut data, &p.out.shape)
            .map_err(|e| format!("tensor {}: {e}", p.out.name))?;
        if let Some(j) = data.iter().position(|x| !x.is_finite()) {
            return Err(format!(
                "the plugin produced a non-finite value in tensor {} (element {j})",
                p.out.name
            ));
        }
        p.out.dtype.encode(&data, &mut bytes);
        writer.write_next(&bytes).map_err(|e| e.to_string())?;
        done += bytes.len();
        params += n;
        progress(done, total);
    }
    writer.finish().map_err(|e| e.to_string())?;

    let mut config = plan["config"].clone();
    let main_dtype = planned
        .iter()
        .find(|p| p.out.shape.len() == 2)
        .map_or(Dtype::F32, |p| p.out.dtype);
    config["torch_dtype"] = json!(main_dtype.torch());
    write_json(&tmp_path.join("config.json"), &config).map_err(|e| e.to_string())?;
    model
        .write_tokenizer(&tmp_path)
        .map_err(|e| e.to_string())?;
    let summary = plan["summary"].as_str().map(String::from);
    write_json(
        &tmp_path.join("switchyard-transform.json"),
        &json!({
            "plugin": opts.provenance,
            "input": input.display().to_string(),
            "summary": summary,
            "tensors": planned.len(),
            "params": params,
            "bytes": done,
        }),
    )
    .map_err(|e| e.to_string())?;

    // Into place: the old output (with --force) goes only once the new one is complete.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        std::fs::rename(out, &old).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    std::fs::rename(&tmp_path, out).map_err(|e| format!("{}: {e}", out.display()))?;
    tmp.0 = None;
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(TransformSummary {
        out: out.to_path_buf(),
        tensors: planned.len(),
        params,
        bytes_written: done,
        bytes_read: read,
        elapsed: start.elapsed(),
        shards,
        summary,
        config,
    })
}

fn check_plan(
    plan: &Value,
    model: &ModelFiles,
    dtype: Option<Dtype>,
) -> Result<Vec<PlannedTensor>, String> {
    let bad = |m: String| format!("the plugin's plan: {m}");
    if !plan["config"].is_object() {
        return Err(bad("no `config` object".into()));
    }
    let list = plan["tensors"]
        .as_array()
        .ok_or_else(|| bad("no `tensors` list".into()))?;
    if list.is_empty() {
        return Err(bad("no tensors".into()));
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let name = t["name"]
            .as_str()
            .ok_or_else(|| bad(format!("tensor {i} has no name")))?;
        if !names.insert(name) {
            return Err(bad(format!("tensor {name} appears twice")));
        }
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .ok_or_else(|| bad(format!("tensor {name} has no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("tensor {name}: shape is not a list of sizes")))?;
        if shape.is_empty() || shape.contains(&0) {
            return Err(bad(format!("tensor {name}: empty shape {shape:?}")));
        }
        let sources: Vec<String> = t["sources"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for s in &sources {
            if model.tensor(s).is_none() {
                return Err(bad(format!(
                    "tensor {name}: source {s} is not in {}",
                    model.path.display()
                )));
            }
        }
        let dt = match dtype {
            Some(d) => d,
            None => t["dtype"]
                .as_str()
                .and_then(Dtype::parse)
                .unwrap_or(Dtype::F32),
        };
        out.push(PlannedTensor {
            out: OutTensor {
                name: name.to_string(),
                dtype: dt,
                shape,
            },
            sources,
        });
    }
    Ok(out)
}
