//! Served models: each loads on a thread of its own, then runs a scheduler thread; request
//! handlers reach it through a [`SchedulerHandle`] and tokenize on their own threads with the
//! shared tokenizer.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use switchyard_engine::chat::ChatTemplate;
use switchyard_engine::scheduler::{Scheduler, SchedulerConfig, SchedulerHandle};
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_engine::{Engine, EngineOptions};

use crate::config::{GatewayConfig, ModelConfig};
use crate::error::ApiError;
use crate::metrics::{Metrics, ModelMetrics};

/// A model that is loaded and serving.
pub struct Ready {
    pub tokenizer: Arc<Tokenizer>,
    pub chat: Arc<ChatTemplate>,
    pub sched: SchedulerHandle,
    pub max_context: usize,
    pub vocab_size: usize,
    pub metrics: Arc<ModelMetrics>,
    pub created: u64,
}

pub enum ModelState {
    Loading { done: usize, total: usize },
    Ready(Arc<Ready>),
    Failed(String),
}

pub struct ModelEntry {
    pub cfg: ModelConfig,
    pub state: RwLock<ModelState>,
}

pub struct AppState {
    pub cfg: GatewayConfig,
    pub models: Vec<Arc<ModelEntry>>,
    pub metrics: Arc<Metrics>,
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
                })
            })
            .collect();
        Self {
            cfg,
            models,
            metrics,
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
pub fn load_model(entry: &ModelEntry, metrics: &Metrics) -> Result<(), String> {
    let c = &entry.cfg;
    let t0 = Instant::now();
    let threads = if c.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        c.threads
    };
    let opts = EngineOptions {
        threads,
        max_slots: c.max_batch,
        max_context: c.max_context,
        prefill_chunk: c.step_tokens,
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
    let mm = Arc::new(metrics.model(&c.name));
    let ready = Ready {
        tokenizer: engine.tokenizer.clone(),
        chat: engine.chat.clone(),
        max_context: engine.model.cfg.max_context,
        vocab_size: engine.model.cfg.vocab_size,
        metrics: mm.clone(),
        created: crate::api::unix_now(),
        sched: {
            let sc = SchedulerConfig {
                step_tokens: c.step_tokens,
                max_waiting: c.max_waiting,
            };
            let (h, _join) = Scheduler::spawn(engine, sc, mm, &c.name)
                .map_err(|e| format!("cannot start the scheduler thread: {e}"))?;
            h
        },
    };
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
    *entry.state.write().unwrap() = ModelState::Ready(Arc::new(ready));
    Ok(())
}
