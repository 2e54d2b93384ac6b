//! Every metric the gateway exports, described once. Prefix `switchyard_`, base units
//! (seconds, bytes), `_total` on counters, label `model` (and `outcome` on requests).

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use switchyard_engine::kv::PageStats;
use switchyard_engine::scheduler::{SchedObserver, SchedState, StepInfo};

/// Request outcomes (label `outcome` of `switchyard_requests_total`).
pub mod outcome {
    /// Completed and delivered.
    pub const OK: &str = "ok";
    /// Refused before scheduling: bad JSON, invalid parameters, unknown model, too large.
    pub const INVALID: &str = "invalid";
    /// Refused because the queue was full (429).
    pub const REJECTED: &str = "rejected";
    /// The model was not ready (503).
    pub const NOT_READY: &str = "not_ready";
    /// The client went away before the end.
    pub const CANCELLED: &str = "cancelled";
    /// Failed inside the engine (500).
    pub const ERROR: &str = "error";
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    pub e2e: HistogramVec,
    pub queue_time: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub running: IntGaugeVec,
    pub waiting: IntGaugeVec,
    pub kv_reserved: IntGaugeVec,
    pub kv_mapped: IntGaugeVec,
    pub kv_used: IntGaugeVec,
    pub kv_capacity: IntGaugeVec,
    pub kv_usage: GaugeVec,
    pub kv_slots: IntGaugeVec,
    pub kv_pages_mapped: IntCounterVec,
    pub kv_pages_unmapped: IntCounterVec,
    pub kv_page_bytes: IntGaugeVec,
    pub kv_map_waits: IntCounterVec,
    pub kv_map_wait_seconds: CounterVec,
    pub kv_map_ahead_seconds: CounterVec,
    pub batch_tokens: HistogramVec,
    pub batch_seqs: HistogramVec,
    pub step_seconds: HistogramVec,
    pub sequences_cancelled: IntCounterVec,
    pub model_ready: IntGaugeVec,
    pub model_load_seconds: GaugeVec,
    pub build_info: IntGaugeVec,
    pub http_requests: IntCounterVec,
    pub swaps: IntCounterVec,
    pub swap_seconds: HistogramVec,
    pub generation: IntGaugeVec,
    pub admin_actions: IntCounterVec,
    pub generations_active: IntGaugeVec,
    pub plugin_calls: IntCounterVec,
    pub plugin_call_seconds: HistogramVec,
    pub plugin_traps: IntCounterVec,
    pub tokens_saved: IntCounterVec,
    pub activation_sparsity: GaugeVec,
}

/// Plugin call durations: 1 µs to 1 s.
const PLUGIN_CALL: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0,
];

fn hist(name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"]).unwrap()
}

const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
];

impl Metrics {
    pub fn new() -> Self {
        let g = |n: &str, h: &str| IntGaugeVec::new(Opts::new(n, h), &["model"]).unwrap();
        let c = |n: &str, h: &str| IntCounterVec::new(Opts::new(n, h), &["model"]).unwrap();
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "switchyard_requests_total",
                    "Generation requests by outcome (ok, invalid, rejected, not_ready, cancelled, error).",
                ),
                &["model", "outcome"],
            )
            .unwrap(),
            ttft: hist(
                "switchyard_time_to_first_token_seconds",
                "Time from request arrival to the first generated token.",
                LATENCY.to_vec(),
            ),
            itl: hist(
                "switchyard_inter_token_latency_seconds",
                "Time between consecutive generated tokens of one sequence.",
                LATENCY.to_vec(),
            ),
            e2e: hist(
                "switchyard_e2e_request_latency_seconds",
                "Time from request arrival to its last token.",
                LATENCY.to_vec(),
            ),
            queue_time: hist(
                "switchyard_queue_time_seconds",
                "Time a sequence waited for a slot before its prefill began.",
                LATENCY.to_vec(),
            ),
            prompt_tokens: c(
                "switchyard_prompt_tokens_total",
                "Prompt tokens of scheduled sequences.",
            ),
            generation_tokens: c(
                "switchyard_generation_tokens_total",
                "Tokens generated.",
            ),
            running: g(
                "switchyard_requests_running",
                "Sequences holding a slot (prefilling or decoding).",
            ),
            waiting: g(
                "switchyard_requests_waiting",
                "Sequences waiting for a slot.",
            ),
            kv_reserved: g(
                "switchyard_kv_cache_reserved_bytes",
                "KV-cache address space reserved by the allocator.",
            ),
            kv_mapped: g(
                "switchyard_kv_cache_mapped_bytes",
                "KV-cache memory actually backed (allocated or mapped).",
            ),
            kv_used: g(
                "switchyard_kv_cache_used_bytes",
                "KV-cache bytes holding live tokens.",
            ),
            kv_capacity: g(
                "switchyard_kv_cache_capacity_bytes",
                "KV-cache bytes needed if every slot held a full context.",
            ),
            kv_usage: GaugeVec::new(
                Opts::new(
                    "switchyard_kv_cache_usage_ratio",
                    "KV-cache bytes used by live tokens over capacity (0..1).",
                ),
                &["model"],
            )
            .unwrap(),
            kv_slots: g(
                "switchyard_kv_cache_slots_in_use",
                "Sequence slots held in the KV cache.",
            ),
            kv_pages_mapped: c(
                "switchyard_kv_cache_pages_mapped_total",
                "Physical pages mapped by a paging KV allocator (vAttention), per reservation.",
            ),
            kv_pages_unmapped: c(
                "switchyard_kv_cache_pages_unmapped_total",
                "Physical pages unmapped (reclaimed) by a paging KV allocator.",
            ),
            kv_page_bytes: g(
                "switchyard_kv_cache_page_bytes",
                "Page size of the paging KV allocator.",
            ),
            kv_map_waits: c(
                "switchyard_kv_cache_map_waits_total",
                "Allocator calls of the scheduler that had to map pages before returning.",
            ),
            kv_map_wait_seconds: CounterVec::new(
                Opts::new(
                    "switchyard_kv_cache_map_wait_seconds_total",
                    "Time forward steps waited on page mapping (divide by map_waits_total for the latency).",
                ),
                &["model"],
            )
            .unwrap(),
            kv_map_ahead_seconds: CounterVec::new(
                Opts::new(
                    "switchyard_kv_cache_map_ahead_seconds_total",
                    "Time the allocator's background thread spent mapping pages ahead of need.",
                ),
                &["model"],
            )
            .unwrap(),
            batch_tokens: hist(
                "switchyard_batch_tokens",
                "Tokens per forward pass (decodes + prefill chunk tokens).",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
            ),
            batch_seqs: hist(
                "switchyard_batch_size",
                "Sequences per forward pass.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            ),
            step_seconds: hist(
                "switchyard_step_seconds",
                "Duration of one scheduler step (forward pass and sampling).",
                LATENCY.to_vec(),
            ),
            sequences_cancelled: c(
                "switchyard_sequences_cancelled_total",
                "Sequences dropped by the scheduler because the client went away (KV freed).",
            ),
            model_ready: g(
                "switchyard_model_ready",
                "1 when the model is loaded and serving, 0 while loading or after a failure.",
            ),
            model_load_seconds: GaugeVec::new(
                Opts::new("switchyard_model_load_seconds", "Time the model took to load."),
                &["model"],
            )
            .unwrap(),
            build_info: IntGaugeVec::new(
                Opts::new("switchyard_build_info", "Build information (value 1)."),
                &["version"],
            )
            .unwrap(),
            swaps: IntCounterVec::new(
                Opts::new(
                    "switchyard_pipeline_swaps_total",
                    "Pipeline swaps and rollbacks by result (ok, failed).",
                ),
                &["model", "result"],
            )
            .unwrap(),
            swap_seconds: hist(
                "switchyard_pipeline_swap_seconds",
                "From a swap request to the new generation serving (load, handshake, canary).",
                LATENCY.to_vec(),
            ),
            generation: g(
                "switchyard_pipeline_generation",
                "The pipeline generation new requests go to.",
            ),
            generations_active: g(
                "switchyard_pipeline_generations_active",
                "Pipeline generations with a running scheduler (the current one plus any still \
                 finishing their requests).",
            ),
            plugin_calls: IntCounterVec::new(
                Opts::new(
                    "switchyard_plugin_calls_total",
                    "Plugin calls by model, pipeline generation, plugin, operation and outcome \
                     (ok, error, trap, deadline, memory).",
                ),
                &["model", "generation", "plugin", "op", "outcome"],
            )
            .unwrap(),
            plugin_call_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_plugin_call_seconds",
                    "Duration of plugin calls by model, plugin and operation.",
                )
                .buckets(PLUGIN_CALL.to_vec()),
                &["model", "plugin", "op"],
            )
            .unwrap(),
            plugin_traps: IntCounterVec::new(
                Opts::new(
                    "switchyard_plugin_traps_total",
                    "Plugin calls that trapped or panicked, by reason (trap, deadline, memory).",
                ),
                &["model", "generation", "plugin", "reason"],
            )
            .unwrap(),
            tokens_saved: IntCounterVec::new(
                Opts::new(
                    "switchyard_tokens_saved_total",
                    "Tokens the tokenizer patch saved, by kind (prompt, completion): base-tokenizer \
                     ids minus the ids the model processed.",
                ),
                &["model", "kind"],
            )
            .unwrap(),
            activation_sparsity: GaugeVec::new(
                Opts::new(
                    "switchyard_activation_sparsity_ratio",
                    "Share of linear-layer inputs the pipeline's linear kernels skip \
                     (0 = dense).",
                ),
                &["model"],
            )
            .unwrap(),
            admin_actions: IntCounterVec::new(
                Opts::new(
                    "switchyard_admin_actions_total",
                    "Admin API calls by action and result.",
                ),
                &["action", "result"],
            )
            .unwrap(),
            http_requests: IntCounterVec::new(
                Opts::new(
                    "switchyard_http_requests_total",
                    "HTTP requests by route and status code.",
                ),
                &["route", "status"],
            )
            .unwrap(),
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone())).unwrap();
        r.register(Box::new(m.ttft.clone())).unwrap();
        r.register(Box::new(m.itl.clone())).unwrap();
        r.register(Box::new(m.e2e.clone())).unwrap();
        r.register(Box::new(m.queue_time.clone())).unwrap();
        r.register(Box::new(m.prompt_tokens.clone())).unwrap();
        r.register(Box::new(m.generation_tokens.clone())).unwrap();
        r.register(Box::new(m.running.clone())).unwrap();
        r.register(Box::new(m.waiting.clone())).unwrap();
        r.register(Box::new(m.kv_reserved.clone())).unwrap();
        r.register(Box::new(m.kv_mapped.clone())).unwrap();
        r.register(Box::new(m.kv_used.clone())).unwrap();
        r.register(Box::new(m.kv_capacity.clone())).unwrap();
        r.register(Box::new(m.kv_usage.clone())).unwrap();
        r.register(Box::new(m.kv_slots.clone())).unwrap();
        r.register(Box::new(m.kv_pages_mapped.clone())).unwrap();
        r.register(Box::new(m.kv_pages_unmapped.clone())).unwrap();
        r.register(Box::new(m.kv_page_bytes.clone())).unwrap();
        r.register(Box::new(m.kv_map_waits.clone())).unwrap();
        r.register(Box::new(m.kv_map_wait_seconds.clone())).unwrap();
        r.register(Box::new(m.kv_map_ahead_seconds.clone()))
            .unwrap();
        r.register(Box::new(m.batch_tokens.clone())).unwrap();
        r.register(Box::new(m.batch_seqs.clone())).unwrap();
        r.register(Box::new(m.step_seconds.clone())).unwrap();
        r.register(Box::new(m.sequences_cancelled.clone())).unwrap();
        r.register(Box::new(m.model_ready.clone())).unwrap();
        r.register(Box::new(m.model_load_seconds.clone())).unwrap();
        r.register(Box::new(m.build_info.clone())).unwrap();
        r.register(Box::new(m.http_requests.clone())).unwrap();
        r.register(Box::new(m.swaps.clone())).unwrap();
        r.register(Box::new(m.swap_seconds.clone())).unwrap();
        r.register(Box::new(m.generation.clone())).unwrap();
        r.register(Box::new(m.generations_active.clone())).unwrap();
        r.register(Box::new(m.plugin_calls.clone())).unwrap();
        r.register(Box::new(m.plugin_call_seconds.clone())).unwrap();
        r.register(Box::new(m.plugin_traps.clone())).unwrap();
        r.register(Box::new(m.admin_actions.clone())).unwrap();
        r.register(Box::new(m.tokens_saved.clone())).unwrap();
        r.register(Box::new(m.activation_sparsity.clone())).unwrap();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .unwrap();
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Zero every per-model series so that dashboards see the model before its first request.
    pub fn init_model(&self, model: &str) {
        for o in [
            outcome::OK,
            outcome::INVALID,
            outcome::REJECTED,
            outcome::NOT_READY,
            outcome::CANCELLED,
            outcome::ERROR,
        ] {
            self.requests.with_label_values(&[model, o]);
        }
        for h in [&self.ttft, &self.itl, &self.e2e, &self.queue_time] {
            h.with_label_values(&[model]);
        }
        self.prompt_tokens.with_label_values(&[model]);
        self.generation_tokens.with_label_values(&[model]);
        self.sequences_cancelled.with_label_values(&[model]);
        self.model_ready.with_label_values(&[model]).set(0);
        for r in ["ok", "failed"] {
            self.swaps.with_label_values(&[model, r]);
        }
        self.swap_seconds.with_label_values(&[model]);
        for k in ["prompt", "completion"] {
            self.tokens_saved.with_label_values(&[model, k]);
        }
        self.activation_sparsity
            .with_label_values(&[model])
            .set(0.0);
        self.generations_active.with_label_values(&[model]);
    }

    pub fn request(&self, model: &str, outcome: &str) {
        self.requests.with_label_values(&[model, outcome]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of metrics");
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Handles of one model's series (resolved once, used on every step).
    pub fn model(&self, model: &str) -> ModelMetrics {
        let l = &[model];
        ModelMetrics {
            ttft: self.ttft.with_label_values(l),
            itl: self.itl.with_label_values(l),
            e2e: self.e2e.with_label_values(l),
            queue_time: self.queue_time.with_label_values(l),
            prompt_tokens: self.prompt_tokens.with_label_values(l),
            generation_tokens: self.generation_tokens.with_label_values(l),
            running: self.running.with_label_values(l),
            waiting: self.waiting.with_label_values(l),
            kv_reserved: self.kv_reserved.with_label_values(l),
            kv_mapped: self.kv_mapped.with_label_values(l),
            kv_used: self.kv_used.with_label_values(l),
            kv_capacity: self.kv_capacity.with_label_values(l),
            kv_usage: self.kv_usage.with_label_values(l),
            kv_slots: self.kv_slots.with_label_values(l),
            kv_pages_mapped: self.kv_pages_mapped.with_label_values(l),
            kv_pages_unmapped: self.kv_pages_unmapped.with_label_values(l),
            kv_page_bytes: self.kv_page_bytes.with_label_values(l),
            kv_map_waits: self.kv_map_waits.with_label_values(l),
            kv_map_wait_seconds: self.kv_map_wait_seconds.with_label_values(l),
            kv_map_ahead_seconds: self.kv_map_ahead_seconds.with_label_values(l),
            pages_seen: std::sync::Mutex::new(PageStats::default()),
            batch_tokens: self.batch_tokens.with_label_values(l),
            batch_seqs: self.batch_seqs.with_label_values(l),
            step_seconds: self.step_seconds.with_label_values(l),
            cancelled: self.sequences_cancelled.with_label_values(l),
            prompt_saved: self.tokens_saved.with_label_values(&[model, "prompt"]),
            completion_saved: self.tokens_saved.with_label_values(&[model, "completion"]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One model's series; also the scheduler's observer.
pub struct ModelMetrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    running: IntGauge,
    waiting: IntGauge,
    kv_reserved: IntGauge,
    kv_mapped: IntGauge,
    kv_used: IntGauge,
    kv_capacity: IntGauge,
    kv_usage: Gauge,
    kv_slots: IntGauge,
    kv_pages_mapped: IntCounter,
    kv_pages_unmapped: IntCounter,
    kv_page_bytes: IntGauge,
    kv_map_waits: IntCounter,
    kv_map_wait_seconds: Counter,
    kv_map_ahead_seconds: Counter,
    /// The allocator's cumulative page counters at the last report (counters export deltas).
    pages_seen: std::sync::Mutex<PageStats>,
    batch_tokens: Histogram,
    batch_seqs: Histogram,
    step_seconds: Histogram,
    cancelled: IntCounter,
    pub prompt_saved: IntCounter,
    pub completion_saved: IntCounter,
}

impl SchedObserver for ModelMetrics {
    fn step(&self, i: &StepInfo) {
        self.batch_tokens.observe(i.tokens as f64);
        self.batch_seqs.observe(i.seqs as f64);
        self.step_seconds.observe(i.secs);
    }
    fn state(&self, s: &SchedState) {
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        self.kv_reserved.set(s.kv.reserved_bytes as i64);
        self.kv_mapped.set(s.kv.mapped_bytes as i64);
        self.kv_used.set(s.kv.used_bytes as i64);
        self.kv_capacity.set(s.kv_capacity_bytes as i64);
        self.kv_slots.set(s.kv.slots_in_use as i64);
        let cap = s.kv_capacity_bytes.max(1) as f64;
        self.kv_usage.set(s.kv.used_bytes as f64 / cap);
        if let Some(p) = s.kv.pages {
            let mut seen = self.pages_seen.lock().unwrap_or_else(|e| e.into_inner());
            // One allocator per generation (and per ModelMetrics): counters only grow.
            let d = |now: u64, was: u64| now.saturating_sub(was);
            self.kv_pages_mapped.inc_by(d(p.mapped, seen.mapped));
            self.kv_pages_unmapped.inc_by(d(p.unmapped, seen.unmapped));
            self.kv_map_waits.inc_by(d(p.sync_maps, seen.sync_maps));
            self.kv_map_wait_seconds
                .inc_by(d(p.sync_map_ns, seen.sync_map_ns) as f64 * 1e-9);
            self.kv_map_ahead_seconds
                .inc_by(d(p.ahead_map_ns, seen.ahead_map_ns) as f64 * 1e-9);
            self.kv_page_bytes.set(p.page_bytes as i64);
            *seen = p;
        }
    }
    fn cancelled(&self) {
        self.cancelled.inc();
    }
}

/// Plugin calls of one pipeline generation, as metrics.
pub struct PluginCallMetrics {
    pub metrics: std::sync::Arc<Metrics>,
    pub model: String,
    pub generation: String,
}

impl switchyard_plugin_host::CallObserver for PluginCallMetrics {
    fn call(
        &self,
        plugin: &str,
        op: &str,
        duration: std::time::Duration,
        outcome: switchyard_plugin_host::CallOutcome,
    ) {
        let m = &self.metrics;
        let o = outcome.as_str();
        m.plugin_calls
            .with_label_values(&[&self.model, &self.generation, plugin, op, o])
            .inc();
        m.plugin_call_seconds
            .with_label_values(&[&self.model, plugin, op])
            .observe(duration.as_secs_f64());
        if matches!(
            outcome,
            switchyard_plugin_host::CallOutcome::Trap
                | switchyard_plugin_host::CallOutcome::Deadline
                | switchyard_plugin_host::CallOutcome::Memory
        ) {
            m.plugin_traps
                .with_label_values(&[&self.model, &self.generation, plugin, o])
                .inc();
        }
    }
}
