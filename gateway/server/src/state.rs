//! Served models: each loads on a thread of its own, then runs a scheduler thread; request
//! handlers reach it through a [`SchedulerHandle`] and tokenize on their own threads with the
//! shared tokenizer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use switchyard_engine::chat::ChatTemplate;
use switchyard_engine::scheduler::{Scheduler, SchedulerConfig, SchedulerHandle};
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_engine::{Engine, EngineOptions};

use crate::config::{GatewayConfig, ModelConfig};
use crate::error::ApiError;
use crate::metrics::{Metrics, ModelMetrics};
use crate::pipeline::{self, PipelineSpec, PluginInfo, Registry};

/// A model that is loaded and serving.
pub struct Ready {
    pub tokenizer: Arc<Tokenizer>,
    pub chat: Arc<ChatTemplate>,
    pub sched: SchedulerHandle,
    pub max_context: usize,
    pub vocab_size: usize,
    pub metrics: Arc<ModelMetrics>,
    pub created: u64,
    /// Pipeline generation (1 for the first).
    pub generation: u64,
    pub spec: PipelineSpec,
    pub plugins: Vec<PluginInfo>,
    /// The generation's tokenizer patch (for /tokenize), if any.
    pub patch: Option<Arc<dyn switchyard_engine::patch::TokenPatch>>,
}

pub enum ModelState {
    Loading { done: usize, total: usize },
    Ready(Arc<Ready>),
    Failed(String),
}

pub struct ModelEntry {
    pub cfg: ModelConfig,
    pub state: RwLock<ModelState>,
    /// The engine new generations are forked from (weights shared).
    template: Mutex<Option<Engine>>,
    /// Specs of earlier generations, newest last (for rollback).
    history: Mutex<Vec<PipelineSpec>>,
    /// One swap at a time per model.
    swap_lock: Mutex<()>,
    next_generation: AtomicU64,
}

pub struct AppState {
    pub cfg: GatewayConfig,
    pub models: Vec<Arc<ModelEntry>>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
}

impl AppState {
    pub fn new(cfg: GatewayConfig, metrics: Arc<Metrics>) -> Self {
        let models = cfg
            .models
            .iter()
            .map(|m| {
                metrics.init_model(&m.name);
                Arc::new(ModelEntry {
                    cfg: m.clone(),
                    state: RwLock::new(ModelState::Loading { done: 0, total: 0 }),
                    template: Mutex::new(None),
                    history: Mutex::new(Vec::new()),
                    swap_lock: Mutex::new(()),
                    next_generation: AtomicU64::new(1),
                })
            })
            .collect();
        let registry = Arc::new(Registry::new(
            &cfg.server.plugin_dirs,
            switchyard_plugin_host::WasmLimits {
                call_deadline: Duration::from_millis(cfg.server.wasm_call_deadline_ms),
                max_memory: cfg.server.wasm_max_memory_mb << 20,
            },
        ));
        Self {
            cfg,
            models,
            metrics,
            registry,
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.cfg.name.clone()).collect()
    }

    /// The entry a request names; a missing `model` field means the first configured model.
    pub fn entry(&self, name: Option<&str>) -> Result<&Arc<ModelEntry>, ApiError> {
        match name {
            None | Some("") => Ok(&self.models[0]),
            Some(n) => self
                .models
                .iter()
                .find(|m| m.cfg.name == n)
                .ok_or_else(|| ApiError::unknown_model(n, &self.names())),
        }
    }

    /// The serving model a request names (404 unknown, 503 not loaded yet or failed).
    pub fn ready(&self, name: Option<&str>) -> Result<(&Arc<ModelEntry>, Arc<Ready>), ApiError> {
        let e = self.entry(name)?;
        let st = e.state.read().unwrap();
        match &*st {
            ModelState::Ready(r) => Ok((e, r.clone())),
            ModelState::Loading { done, total } => Err(ApiError::not_ready(format!(
                "model `{}` is still loading ({done}/{total} tensors); retry shortly",
                e.cfg.name
            ))),
            ModelState::Failed(msg) => Err(ApiError::not_ready(format!(
                "model `{}` failed to load: {msg}",
                e.cfg.name
            ))),
        }
    }

    pub fn all_ready(&self) -> bool {
        self.models
            .iter()
            .all(|m| matches!(*m.state.read().unwrap(), ModelState::Ready(_)))
    }
}

/// Load one model and start its scheduler; updates `entry` as it goes.
pub fn load_model(
    entry: &ModelEntry,
    metrics: &Arc<Metrics>,
    registry: &Registry,
) -> Result<(), String> {
    let c = &entry.cfg;
    let t0 = Instant::now();
    let threads = entry.threads();
    // The loaded engine only serves as the template generations are forked from: one thread,
    // one slot (each generation gets its own pool and allocator).
    let opts = EngineOptions {
        threads: 1,
        max_slots: 1,
        max_context: c.max_context,
        prefill_chunk: c.step_tokens,
        device: c.device.parse()?,
    };
    let mut last_pct = 0;
    let mut progress = |done: usize, total: usize| {
        if let Ok(mut s) = entry.state.try_write() {
            *s = ModelState::Loading { done, total };
        }
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if pct >= last_pct + 25 {
            last_pct = pct;
            tracing::info!(model = %c.name, "loading: {pct}% ({done}/{total} tensors)");
        }
    };
    // Lets readiness probes and tests see the loading state on a model that loads in
    // milliseconds.
    if let Some(ms) = std::env::var("SWITCHYARD_LOAD_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let engine = Engine::load(&c.path, opts, &mut progress)
        .map_err(|e| format!("{}: {e}", c.path.display()))?;
    *entry.template.lock().unwrap() = Some(engine);
    let ready = entry
        .start_generation(&c.pipeline, metrics, registry)
        .map_err(|e| format!("pipeline: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        model = %c.name,
        path = %c.path.display(),
        context = ready.max_context,
        max_batch = c.max_batch,
        threads,
        "model ready in {secs:.2}s"
    );
    metrics
        .model_load_seconds
        .with_label_values(&[c.name.as_str()])
        .set(secs);
    metrics
        .model_ready
        .with_label_values(&[c.name.as_str()])
        .set(1);
    metrics
        .generation
        .with_label_values(&[c.name.as_str()])
        .set(ready.generation as i64);
    metrics
        .activation_sparsity
        .with_label_values(&[c.name.as_str()])
        .set(ready.spec.activation_sparsity());
    *entry.state.write().unwrap() = ModelState::Ready(ready);
    Ok(())
}

impl ModelEntry {
    fn threads(&self) -> usize {
        if self.cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.cfg.threads
        }
    }

    /// Build, start and canary-test a generation from `spec` (not yet routed to).
    fn start_generation(
        &self,
        spec: &PipelineSpec,
        metrics: &Arc<Metrics>,
        registry: &Registry,
    ) -> Result<Arc<Ready>, String> {
        let c = &self.cfg;
        let tpl = self.template.lock().unwrap();
        let tpl = tpl.as_ref().ok_or("the model is not loaded")?;
        let generation = self.next_generation.fetch_add(1, Ordering::AcqRel);
        let observer = Arc::new(crate::metrics::PluginCallMetrics {
            metrics: metrics.clone(),
            model: c.name.clone(),
            generation: generation.to_string(),
        });
        let (engine, plugins) =
            pipeline::build_engine(tpl, spec, self.threads(), c.max_batch, registry, observer)?;
        let mm = Arc::new(metrics.model(&c.name));
        let canary_prompt = engine
            .encode_prompt("Hello")
            .map_err(|e| format!("canary prompt: {e}"))?;
        let tokenizer = engine.tokenizer.clone();
        let chat = engine.chat.clone();
        let patch = engine.patch.clone();
        let max_context = engine.model.cfg.max_context;
        let vocab_size = engine.model.cfg.vocab_size;
        let sc = SchedulerConfig {
            step_tokens: c.step_tokens,
            max_waiting: c.max_waiting,
        };
        let (sched, join) =
            Scheduler::spawn(engine, sc, mm.clone(), &format!("{}-g{generation}", c.name))
                .map_err(|e| format!("cannot start the scheduler thread: {e}"))?;
        // Count the generation as active until its scheduler thread ends (after its last
        // request, once it is no longer current).
        let active = metrics
            .generations_active
            .with_label_values(&[c.name.as_str()]);
        active.inc();
        let _ = std::thread::Builder::new()
            .name(format!("{}-g{generation}-watch", c.name))
            .spawn(move || {
                let _ = join.join();
                active.dec();
            });
        pipeline::canary(&sched, canary_prompt, Duration::from_secs(60))?;
        Ok(Arc::new(Ready {
            tokenizer,
            chat,
            sched,
            max_context,
            vocab_size,
            metrics: mm,
            created: crate::api::unix_now(),
            generation,
            spec: spec.clone(),
            plugins,
            patch,
        }))
    }

    /// Build generation G+1 from `spec` and route new requests to it; G drains and retires.
    pub fn swap(
        &self,
        spec: &PipelineSpec,
        metrics: &Arc<Metrics>,
        registry: &Registry,
    ) -> Result<Arc<Ready>, String> {
        let _one = self.swap_lock.lock().unwrap();
        self.swap_locked(spec, metrics, registry, true)
    }

    fn swap_locked(
        &self,
        spec: &PipelineSpec,
        metrics: &Arc<Metrics>,
        registry: &Registry,
        remember: bool,
    ) -> Result<Arc<Ready>, String> {
        let old = match &*self.state.read().unwrap() {
            ModelState::Ready(r) => r.clone(),
            _ => return Err("the model is not serving yet".into()),
        };
        let new = self.start_generation(spec, metrics, registry)?;
        *self.state.write().unwrap() = ModelState::Ready(new.clone());
        metrics
            .activation_sparsity
            .with_label_values(&[self.cfg.name.as_str()])
            .set(new.spec.activation_sparsity());
        if remember {
            self.history.lock().unwrap().push(old.spec.clone());
        }
        Ok(new)
    }

    /// Swap back to the previous generation's spec (as a new generation).
    pub fn rollback(
        &self,
        metrics: &Arc<Metrics>,
        registry: &Registry,
    ) -> Result<Arc<Ready>, String> {
        let _one = self.swap_lock.lock().unwrap();
        let prev = self
            .history
            .lock()
            .unwrap()
            .last()
            .cloned()
            .ok_or("no earlier generation to roll back to")?;
        let new = self.swap_locked(&prev, metrics, registry, false)?;
        self.history.lock().unwrap().pop();
        Ok(new)
    }

    pub fn current(&self) -> Option<Arc<Ready>> {
        match &*self.state.read().unwrap() {
            ModelState::Ready(r) => Some(r.clone()),
            _ => None,
        }
    }
}
