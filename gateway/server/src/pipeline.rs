//! Pipelines as immutable generations. A generation is one engine (sharing the model's
//! weights, tokenizer and template) with its plugins, behind its own scheduler thread.
//!
//! A swap builds generation G+1 beside G: load and hand-shake the plugins, start the
//! scheduler, run a canary request through it; only then are new requests routed to G+1
//! (one pointer store). G keeps serving the requests it accepted, and its scheduler thread
//! ends (freeing its KV cache) when the last of them is done. A failed load or canary leaves
//! G serving and returns the reason. Rollback builds a new generation from the previous spec.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard_engine::engine::Engine;
use switchyard_engine::model::{Model, ModelSource};
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::scheduler::{EventSink, SeqEvent, SeqRequest};
use switchyard_plugin_host::{
    CallObserver, Manifest, NativePlugin, PatchStage, PluginHost, WasmLimits, WasmPlugin,
};

/// One stage: a plugin by manifest name (or `builtin`) and its configuration text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub plugin: String,
    #[serde(default)]
    pub config: String,
    /// A file whose bytes are the configuration instead of `config` (e.g. an AdaptiVocab
    /// patch). Read when a generation is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<String>,
    /// Tokenizer-patch stage only: the patched model (a directory from `switchyard transform
    /// adaptivocab`) whose weights this pipeline serves with the patch, so that the two swap
    /// as one unit. Without `config`/`config_file`, the patch is the model's
    /// `adaptivocab-patch.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Linear-kernels stage only: a LaRoSA rotation (`switchyard calibrate larosa`); this
    /// generation serves the model rotated by it (built once, shared while in use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
}

impl StageSpec {
    pub fn builtin() -> Self {
        Self {
            plugin: "builtin".into(),
            config: String::new(),
            config_file: None,
            model: None,
            rotation: None,
        }
    }

    /// The configuration bytes: `config`, or the contents of `config_file`, or (with `model`)
    /// the model's `adaptivocab-patch.json`.
    pub fn config_bytes(&self) -> Result<Vec<u8>, String> {
        let file = match (&self.config_file, &self.model) {
            (Some(_), _) if !self.config.trim().is_empty() => {
                return Err("give either config or config_file, not both".into())
            }
            (Some(f), _) => PathBuf::from(f),
            (None, Some(m)) if self.config.trim().is_empty() => {
                std::path::Path::new(m).join(PATCH_FILE)
            }
            _ => return Ok(self.config.as_bytes().to_vec()),
        };
        std::fs::read(&file).map_err(|e| format!("config file {}: {e}", file.display()))
    }
}

/// The file an AdaptiVocab-patched model directory carries its patch in.
pub const PATCH_FILE: &str = "adaptivocab-patch.json";

/// What a generation is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Tokenizer patch (WebAssembly `tokenizer-patch` plugin); `builtin` is no patch.
    #[serde(default = "StageSpec::builtin")]
    pub tokenizer_patch: StageSpec,
    /// KV-cache allocator (native `kv-allocator` plugin); `builtin` is the engine's own.
    #[serde(default = "StageSpec::builtin")]
    pub kv_allocator: StageSpec,
    /// Linear layers (native `linear-kernels` plugin, e.g. larosa's sparse kernels);
    /// `builtin` is the engine's dense products.
    #[serde(default = "StageSpec::builtin")]
    pub linear_kernels: StageSpec,
}

impl Default for PipelineSpec {
    fn default() -> Self {
        Self {
            tokenizer_patch: StageSpec::builtin(),
            kv_allocator: StageSpec::builtin(),
            linear_kernels: StageSpec::builtin(),
        }
    }
}

impl PipelineSpec {
    /// The activation sparsity the linear stage's configuration asks for (`sparsity = s`),
    /// 0 for dense kernels.
    pub fn activation_sparsity(&self) -> f64 {
        let l = &self.linear_kernels;
        if l.plugin == "builtin" {
            return 0.0;
        }
        switchyard_engine::backend::ActivationSparsity::from_config(&l.config)
            .ok()
            .flatten()
            .map_or(0.0, |a| a.sparsity)
    }
}

/// A plugin in use, as the admin API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub stage: String,
    pub name: String,
    pub kind: String,
    pub version: String,
    pub sha256: Option<String>,
    pub path: Option<String>,
    /// The weights this stage brings (a patched model), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The LaRoSA rotation the model is served under (linear_kernels stage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
}

/// A plugin the registry has loaded.
#[derive(Clone)]
pub enum Loaded {
    Native(NativePlugin),
    Wasm(Arc<WasmPlugin>),
}

impl Loaded {
    pub fn name(&self) -> &str {
        match self {
            Loaded::Native(p) => &p.name,
            Loaded::Wasm(p) => &p.name,
        }
    }
    pub fn sha256(&self) -> &str {
        match self {
            Loaded::Native(p) => &p.sha256,
            Loaded::Wasm(p) => &p.sha256,
        }
    }
}

type Weights = (std::sync::Weak<Model>, std::sync::Weak<ModelSource>);

/// A rotated model's key: the address of the model it was built from, and the rotation file.
type RotatedKey = (usize, PathBuf);
/// (the rotated model, the base it was built from)
type RotatedEntry = (std::sync::Weak<Model>, std::sync::Weak<Model>);

/// Plugins found in the configured directories (manifests), loaded on first use.
pub struct Registry {
    host: PluginHost,
    dirs: Vec<PathBuf>,
    loaded: Mutex<HashMap<PathBuf, Loaded>>,
    /// Patched models in use by some generation, by (path, context cap): loaded once.
    models: Mutex<HashMap<(PathBuf, usize), Weights>>,
    /// LaRoSA-rotated models in use by some generation (built once per base and rotation),
    /// with the base they were built from (its address is the key while it lives).
    rotated: Mutex<HashMap<RotatedKey, RotatedEntry>>,
    /// Limits of every WebAssembly plugin instance.
    pub wasm_limits: WasmLimits,
}

impl Registry {
    pub fn new(dirs: &[PathBuf], wasm_limits: WasmLimits) -> Self {
        Self {
            host: PluginHost::new(dirs),
            dirs: dirs.to_vec(),
            loaded: Mutex::new(HashMap::new()),
            models: Mutex::new(HashMap::new()),
            rotated: Mutex::new(HashMap::new()),
            wasm_limits,
        }
    }

    /// Every manifest in the plugin directories (read now, so new plugins show up).
    pub fn manifests(&self) -> Vec<(PathBuf, Result<Manifest, String>)> {
        let mut out = Vec::new();
        for d in &self.dirs {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            let mut paths: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            for p in paths {
                let m = Manifest::read(&p).map_err(|e| e.to_string());
                out.push((p, m));
            }
        }
        out
    }

    /// The plugin whose manifest is named `name`, verified and loaded (once per file
    /// content: a file replaced on disk is noticed, as the manifest is verified on every use).
    fn get(&self, name: &str) -> Result<Loaded, String> {
        let found: Vec<PathBuf> = self
            .manifests()
            .into_iter()
            .filter(|(_, m)| m.as_ref().is_ok_and(|m| m.name == name))
            .map(|(p, _)| p)
            .collect();
        let path = match found.as_slice() {
            [] if self.dirs.is_empty() => {
                return Err(format!(
                    "no plugin named {name:?}: no plugin directories are configured \
                     (server.plugin_dirs or --plugin-dir)"
                ))
            }
            [] => {
                return Err(format!(
                    "no plugin named {name:?} in the plugin directories ({})",
                    self.dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            [p] => p.clone(),
            _ => return Err(format!("several manifests name plugin {name:?}")),
        };
        let (m, file) = self.host.verify(&path).map_err(|e| e.to_string())?;
        let mut loaded = self.loaded.lock().unwrap();
        if let Some(p) = loaded.get(&file) {
            if p.sha256() == m.sha256.to_ascii_lowercase() {
                return Ok(p.clone());
            }
        }
        let p = if m.kind == "tokenizer-patch" {
            Loaded::Wasm(Arc::new(
                self.host.load_wasm(&path).map_err(|e| e.to_string())?,
            ))
        } else {
            Loaded::Native(self.host.load_native(&path).map_err(|e| e.to_string())?)
        };
        loaded.insert(file, p.clone());
        Ok(p)
    }

    /// A native plugin by manifest name.
    pub fn native(&self, name: &str) -> Result<NativePlugin, String> {
        match self.get(name)? {
            Loaded::Native(p) => Ok(p),
            Loaded::Wasm(_) => Err(format!(
                "plugin {name:?} is a WebAssembly tokenizer-patch plugin, not a native one"
            )),
        }
    }

    /// A WebAssembly plugin by manifest name.
    pub fn wasm(&self, name: &str) -> Result<Arc<WasmPlugin>, String> {
        match self.get(name)? {
            Loaded::Wasm(p) => Ok(p),
            Loaded::Native(p) => Err(format!(
                "plugin {name:?} is a native {} plugin, not a tokenizer patch",
                switchyard_plugin_abi::kind::name(p.kind)
            )),
        }
    }

    /// The weights of the model at `path` with its context capped at `max_context`: shared
    /// while any generation holds them, loaded again after the last one is gone.
    pub fn weights(
        &self,
        path: &str,
        max_context: usize,
    ) -> Result<(Arc<Model>, Arc<ModelSource>), String> {
        let key = (PathBuf::from(path), max_context);
        let mut models = self.models.lock().unwrap();
        models.retain(|_, w| w.0.strong_count() > 0);
        if let Some((m, s)) = models.get(&key) {
            if let (Some(m), Some(s)) = (m.upgrade(), s.upgrade()) {
                return Ok((m, s));
            }
        }
        let t = Instant::now();
        let (mut m, src) = Model::load(std::path::Path::new(path), &mut |_, _| {})
            .map_err(|e| format!("model {path}: {e}"))?;
        m.cfg.max_context = m.cfg.max_context.min(max_context);
        tracing::info!(
            model = path,
            seconds = t.elapsed().as_secs_f64(),
            "loaded pipeline weights"
        );
        let (m, src) = (Arc::new(m), Arc::new(src));
        models.insert(key, (Arc::downgrade(&m), Arc::downgrade(&src)));
        Ok((m, src))
    }

    /// `base` rotated by the LaRoSA rotation in file `rotation`: shared while any generation
    /// holds it.
    pub fn rotated(
        &self,
        base: &Arc<Model>,
        rotation: &str,
        pool: &switchyard_engine::pool::ThreadPool,
    ) -> Result<Arc<Model>, String> {
        let key = (Arc::as_ptr(base) as usize, PathBuf::from(rotation));
        let mut rotated = self.rotated.lock().unwrap();
        rotated.retain(|_, (m, b)| m.strong_count() > 0 && b.strong_count() > 0);
        if let Some(m) = rotated.get(&key).and_then(|(m, _)| m.upgrade()) {
            return Ok(m);
        }
        let t = Instant::now();
        let rot = switchyard_engine::larosa::Rotation::load(std::path::Path::new(rotation))
            .map_err(|e| format!("rotation: {e}"))?;
        let m = switchyard_engine::larosa::rotate_model(base, &rot, pool, &mut |_, _| {})
            .map_err(|e| format!("rotation {rotation}: {e}"))?;
        tracing::info!(
            rotation,
            seconds = t.elapsed().as_secs_f64(),
            "built the rotated model"
        );
        let m = Arc::new(m);
        rotated.insert(key, (Arc::downgrade(&m), Arc::downgrade(base)));
        Ok(m)
    }

    pub fn loaded(&self) -> Vec<Loaded> {
        self.loaded.lock().unwrap().values().cloned().collect()
    }
}

/// A short text whose ids every tokenizer patch must round-trip before it serves.
const ROUNDTRIP_TEXT: &str = "The quick brown fox jumps over the lazy dog. \
    Once upon a time, in 2024, 3.14159 != 2.71828; naïve café — ünïcödé, 東京, \
    def f(x): return x ** 2  # code";

/// A GPU generation's weights and sparsity: `e.model` (the rotated model, if any) on the
/// device, with LaRoSA's activation sparsity `s` run by the engine's CUDA kernels.
fn device_weights(
    e: &mut Engine,
    s: Option<switchyard_engine::backend::ActivationSparsity>,
) -> Result<(), String> {
    let t = Instant::now();
    e.set_device_weights(e.model.clone(), s, &mut |_, _| {})
        .map_err(|x| format!("linear_kernels on {}: {x}", e.backend_name()))?;
    tracing::info!(
        seconds = t.elapsed().as_secs_f64(),
        sparsity = s.map_or(0.0, |s| s.sparsity),
        "device weights ready"
    );
    Ok(())
}

/// Build the engine of a new generation from `template` and `spec`. Plugin calls are
/// reported to `observer`.
pub fn build_engine(
    template: &Engine,
    spec: &PipelineSpec,
    threads: usize,
    max_slots: usize,
    registry: &Registry,
    observer: Arc<dyn CallObserver>,
) -> Result<(Engine, Vec<PluginInfo>), String> {
    let tp = &spec.tokenizer_patch;
    // On a GPU the tokenizer patch and KV allocator stages are the engine's own; the
    // linear_kernels stage takes a LaRoSA rotation and the larosa plugin's settings, run by
    // the engine's CUDA kernels (below).
    if template.device.is_some() {
        let plugged = [&spec.tokenizer_patch, &spec.kv_allocator]
            .iter()
            .any(|s| s.plugin != "builtin" || s.model.is_some() || s.rotation.is_some());
        if plugged {
            return Err(format!(
                "this model is served on {}; the tokenizer_patch and kv_allocator plugin \
                 stages run on the CPU backend only (serve it with device = \"cpu\" to use \
                 them)",
                template.backend_name()
            ));
        }
        let lin = &spec.linear_kernels;
        if lin.plugin != "builtin" && lin.plugin != "larosa" {
            return Err(format!(
                "this model is served on {}: linear-kernels plugin {} has no CUDA kernels \
                 (a GPU model takes builtin or larosa, whose sparsity the engine's CUDA \
                 kernels run)",
                template.backend_name(),
                lin.plugin
            ));
        }
    }
    let mut e = match &tp.model {
        Some(_) if tp.plugin == "builtin" => {
            return Err(
                "tokenizer_patch.model needs a tokenizer-patch plugin: a patched model \
                        serves only with its patch"
                    .into(),
            )
        }
        Some(m) => {
            let (w, src) = registry.weights(m, template.model.cfg.max_context)?;
            template
                .same_shapes(&w.cfg)
                .map_err(|r| format!("model {m} cannot stand in for the served model: {r}"))?;
            template.fork_with_model(threads, max_slots, w, src)
        }
        None => template.fork(threads, max_slots),
    };
    let mut infos = Vec::new();

    infos.push(if tp.plugin == "builtin" {
        if !tp.config.trim().is_empty() || tp.config_file.is_some() {
            return Err("the builtin tokenizer patch (none) takes no configuration".into());
        }
        builtin_info("tokenizer_patch", "tokenizer-patch")
    } else {
        let p = registry.wasm(&tp.plugin)?;
        let config = tp.config_bytes()?;
        let inst = p
            .tokenizer_patch(&config, registry.wasm_limits, Some(observer.clone()))
            .map_err(|e| e.to_string())?;
        let info = inst.info().map_err(|e| e.to_string())?;
        let vocab = e.model.cfg.vocab_size as u32;
        if info.base_vocab_size != 0 && info.base_vocab_size != vocab {
            return Err(format!(
                "tokenizer patch {} was built for a base vocabulary of {} ids, the model has {vocab}",
                p.name, info.base_vocab_size
            ));
        }
        if info.patched_vocab_size > vocab {
            return Err(format!(
                "tokenizer patch {} produces ids up to {}, but the model reads only {vocab}: \
                 a patch that adds ids needs the patched model in the same pipeline",
                p.name,
                info.patched_vocab_size - 1
            ));
        }
        match &tp.model {
            None if info.patched_vocab_size != 0 => {
                return Err(format!(
                    "tokenizer patch {} gives ids new meanings: a patch that adds ids needs \
                     the patched model in the same pipeline (tokenizer_patch.model = the \
                     directory written by `switchyard transform adaptivocab`)",
                    p.name
                ))
            }
            None => {}
            Some(m) => {
                let cfg_path = std::path::Path::new(m).join("config.json");
                let recorded = std::fs::read(&cfg_path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["adaptivocab"]["patch_sha256"].as_str().map(String::from));
                let have = switchyard_plugin_host::sha256_bytes(&config);
                match recorded {
                    Some(r) if r == have => {}
                    Some(r) => {
                        return Err(format!(
                            "model {m} was made for another patch (sha256 {r}) than this \
                             stage's (sha256 {have})"
                        ))
                    }
                    None => {
                        return Err(format!(
                            "model {m} records no tokenizer patch ({} has no \
                             adaptivocab.patch_sha256): make it with `switchyard transform \
                             adaptivocab` from this patch",
                            cfg_path.display()
                        ))
                    }
                }
            }
        }
        let ids = e
            .encode_prompt(ROUNDTRIP_TEXT)
            .map_err(|e| format!("round-trip check: {e}"))?;
        let enc = inst.encode(&ids).map_err(|e| e.to_string())?;
        let dec = inst.decode(&enc).map_err(|e| e.to_string())?;
        // Ids must come back, or (a patch that removed tokens writes them as their
        // decompositions) at least the very same text.
        let text = |x: &[u32]| e.tokenizer.decode(x, false).map_err(|e| e.to_string());
        if dec != ids && text(&dec)? != text(&ids)? {
            return Err(format!(
                "tokenizer patch {}: decode(encode(x)) != x on the round-trip check \
                 ({} ids in, {} encoded, {} decoded)",
                p.name,
                ids.len(),
                enc.len(),
                dec.len()
            ));
        }
        e.patch = Some(Arc::new(PatchStage(Arc::new(inst))));
        PluginInfo {
            stage: "tokenizer_patch".into(),
            name: p.name.clone(),
            kind: "tokenizer-patch".into(),
            version: p.version.clone(),
            sha256: Some(p.sha256.clone()),
            path: Some(p.path.display().to_string()),
            model: tp.model.clone(),
            rotation: None,
        }
    });

    let kv = &spec.kv_allocator;
    if kv.model.is_some() {
        return Err("kv_allocator takes no model (only tokenizer_patch does)".into());
    }
    infos.push(if kv.plugin == "builtin" {
        if !kv.config.trim().is_empty() || kv.config_file.is_some() {
            return Err("the builtin KV allocator takes no configuration".into());
        }
        builtin_info("kv_allocator", "kv-allocator")
    } else {
        let p = registry.native(&kv.plugin)?;
        let config = String::from_utf8(kv.config_bytes()?)
            .map_err(|_| "kv_allocator configuration is not UTF-8 text".to_string())?;
        let alloc = p
            .kv_allocator(&config, e.kv_layout(max_slots))
            .map_err(|e| e.to_string())?
            .with_observer(observer);
        e.set_kv(Box::new(alloc));
        PluginInfo {
            stage: "kv_allocator".into(),
            name: p.name.clone(),
            kind: "kv-allocator".into(),
            version: p.version.clone(),
            sha256: Some(p.sha256.clone()),
            path: Some(p.path.display().to_string()),
            model: None,
            rotation: None,
        }
    });
    let lin = &spec.linear_kernels;
    if lin.model.is_some() {
        return Err("linear_kernels takes no model (only tokenizer_patch does)".into());
    }
    if tp.rotation.is_some() || spec.kv_allocator.rotation.is_some() {
        return Err("only the linear_kernels stage takes a rotation".into());
    }
    if let Some(r) = &lin.rotation {
        e.model = registry.rotated(&e.model, r, e.fwd.pool())?;
    }
    let on_device = e.device.is_some();
    infos.push(if lin.plugin == "builtin" {
        if !lin.config.trim().is_empty() || lin.config_file.is_some() {
            return Err("the builtin linear kernels take no configuration".into());
        }
        if on_device && lin.rotation.is_some() {
            device_weights(&mut e, None)?;
        }
        let mut i = builtin_info("linear_kernels", "linear-kernels");
        i.rotation = lin.rotation.clone();
        i
    } else {
        let p = registry.native(&lin.plugin)?;
        let config = String::from_utf8(lin.config_bytes()?)
            .map_err(|_| "linear_kernels configuration is not UTF-8 text".to_string())?;
        // The plugin checks its configuration either way.
        let k = p.linear_kernels(&config).map_err(|e| e.to_string())?;
        if on_device {
            let s = switchyard_engine::backend::ActivationSparsity::from_config(&config)
                .map_err(|e| format!("linear_kernels configuration: {e}"))?;
            if s.is_some() || lin.rotation.is_some() {
                device_weights(&mut e, s)?;
            }
        } else {
            let t = Instant::now();
            let ml = switchyard_plugin_host::ModelLinear::prepare(k, &e.model, &mut |_, _| {})
                .map_err(|e| e.to_string())?;
            tracing::info!(
                plugin = p.name,
                seconds = t.elapsed().as_secs_f64(),
                "linear kernels prepared the weights"
            );
            e.fwd.linear = Some(Arc::new(ml));
        }
        PluginInfo {
            stage: "linear_kernels".into(),
            name: p.name.clone(),
            kind: "linear-kernels".into(),
            version: p.version.clone(),
            sha256: Some(p.sha256.clone()),
            path: Some(p.path.display().to_string()),
            model: None,
            rotation: lin.rotation.clone(),
        }
    });

    Ok((e, infos))
}

fn builtin_info(stage: &str, kind: &str) -> PluginInfo {
    PluginInfo {
        stage: stage.into(),
        name: "builtin".into(),
        kind: kind.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        sha256: None,
        path: None,
        model: None,
        rotation: None,
    }
}

struct CanarySink(mpsc::Sender<SeqEvent>);
impl EventSink for CanarySink {
    fn send(&mut self, ev: SeqEvent) -> bool {
        self.0.send(ev).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

/// A short greedy request through a new generation's scheduler; Err says what went wrong.
pub fn canary(
    sched: &switchyard_engine::scheduler::SchedulerHandle,
    prompt: Vec<u32>,
    timeout: Duration,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    sched
        .submit(vec![SeqRequest {
            prompt,
            max_tokens: 4,
            sampling: SamplingParams::default(),
            stop: vec![],
            logprobs: None,
            sink: Box::new(CanarySink(tx)),
        }])
        .map_err(|e| format!("canary not accepted: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(SeqEvent::Finished { .. }) => return Ok(()),
            Ok(SeqEvent::Failed(m)) => return Err(format!("canary request failed: {m}")),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("canary request did not finish in {timeout:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("canary request: the new generation's scheduler stopped".into())
            }
        }
    }
}
