//! Continuous batching with chunked prefill (the Sarathi-Serve schedule).
//!
//! One scheduler thread owns an [`Engine`]. Requests arrive through a [`SchedulerHandle`]
//! (from any thread) and wait in a bounded FIFO queue. Every step the scheduler
//!
//! 1. drops requests whose client went away (their KV slot is released at once),
//! 2. admits waiting requests in arrival order while sequence slots are free,
//! 3. builds one batch under a token budget: every decoding sequence contributes its one
//!    token first (decodes never stall behind a long prompt), then prefilling sequences take
//!    the rest of the budget as prompt chunks, oldest first,
//! 4. runs one forward pass over the batch, samples, and streams each sequence's events to
//!    its [`EventSink`].
//!
//! The engine crate knows nothing about HTTP or async runtimes: sinks are plain traits, and
//! metrics come out through a [`SchedObserver`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Engine, FinishReason, TextStream};
use crate::forward::SeqChunk;
use crate::kv::KvStats;
use crate::sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per forward pass (decodes + prefill chunks).
    pub step_tokens: usize,
    /// Requests that may wait for a slot; more are refused.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            step_tokens: 256,
            max_waiting: 256,
        }
    }
}

/// Log-probability of a sampled token and, when asked for, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// `(id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// Admitted into a slot after `queue_secs` in the waiting queue.
    Started {
        queue_secs: f64,
        /// Prompt tokens the tokenizer patch saved (base ids minus the ids the model reads).
        prompt_saved: usize,
    },
    /// One generated token and the text it released (may be empty while a multi-byte
    /// character or a possible stop string is incomplete).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end: `text` is what was still held back.
    Finished {
        reason: FinishReason,
        text: String,
        completion_tokens: usize,
        /// Generated tokens the tokenizer patch saved (base ids minus generated ids).
        completion_saved: usize,
    },
    Failed(String),
}

/// Where a sequence's events go. `send` returns false once nobody listens any more.
pub trait EventSink: Send {
    fn send(&mut self, ev: SeqEvent) -> bool;
    fn is_closed(&self) -> bool;
}

pub struct SeqRequest {
    /// Prompt ids, already validated against the vocabulary and the context.
    pub prompt: Vec<u32>,
    /// Generated tokens at most (the context bounds it too).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Some(n): report each token's logprob and the n most likely alternatives.
    pub logprobs: Option<usize>,
    pub sink: Box<dyn EventSink>,
}

/// One forward pass, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepInfo {
    pub seqs: usize,
    pub decode_seqs: usize,
    pub prefill_tokens: usize,
    pub tokens: usize,
    pub secs: f64,
}

/// Scheduler state after each loop iteration.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedState {
    pub running: usize,
    pub waiting: usize,
    pub kv: KvStats,
    pub kv_capacity_bytes: u64,
}

pub trait SchedObserver: Send + Sync {
    fn step(&self, _info: &StepInfo) {}
    fn state(&self, _state: &SchedState) {}
    /// A sequence was dropped because its client went away.
    fn cancelled(&self) {}
}

/// Observer that records nothing.
pub struct NoObserver;
impl SchedObserver for NoObserver {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full.
    QueueFull { waiting: usize, max_waiting: usize },
    /// The scheduler thread has ended.
    Stopped,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull {
                waiting,
                max_waiting,
            } => write!(
                f,
                "the server is overloaded: {waiting} requests are waiting (limit {max_waiting}); retry later"
            ),
            SubmitError::Stopped => write!(f, "the model's scheduler has stopped"),
        }
    }
}

/// Submits requests to a scheduler thread; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<SeqRequest>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl SchedulerHandle {
    /// Queue all of `reqs` (the choices of one request) or none of them.
    pub fn submit(&self, reqs: Vec<SeqRequest>) -> Result<(), SubmitError> {
        let n = reqs.len();
        let r = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w + n <= self.max_waiting).then_some(w + n)
            });
        if let Err(w) = r {
            return Err(SubmitError::QueueFull {
                waiting: w,
                max_waiting: self.max_waiting,
            });
        }
        for (i, req) in reqs.into_iter().enumerate() {
            if self.tx.send(req).is_err() {
                self.waiting.fetch_sub(n - i, Ordering::AcqRel);
                return Err(SubmitError::Stopped);
            }
        }
        Ok(())
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

struct Waiting {
    req: SeqRequest,
    arrived: Instant,
}

struct Seq {
    req: SeqRequest,
    slot: usize,
    /// Prompt then generated ids.
    tokens: Vec<u32>,
    n_prompt: usize,
    /// Tokens already written to the KV cache.
    cached: usize,
    generated: usize,
    /// Base ids the generated tokens stand for (more than `generated` under a patch).
    generated_base: usize,
    max_new: usize,
    sampler: Sampler,
    text: TextStream,
    /// Admission number (prefill goes first come, first served).
    admitted: u64,
}

pub struct Scheduler {
    engine: Engine,
    cfg: SchedulerConfig,
    rx: mpsc::Receiver<SeqRequest>,
    waiting_count: Arc<AtomicUsize>,
    queue: VecDeque<Waiting>,
    running: Vec<Seq>,
    observer: Arc<dyn SchedObserver>,
    logits: Vec<f32>,
    admissions: u64,
}

impl Scheduler {
    /// A scheduler for `engine`; run it with [`Scheduler::run`] on its own thread.
    pub fn new(
        engine: Engine,
        cfg: SchedulerConfig,
        observer: Arc<dyn SchedObserver>,
    ) -> (Self, SchedulerHandle) {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let handle = SchedulerHandle {
            tx,
            waiting: waiting.clone(),
            max_waiting: cfg.max_waiting,
        };
        let s = Self {
            engine,
            cfg,
            rx,
            waiting_count: waiting,
            queue: VecDeque::new(),
            running: Vec::new(),
            observer,
            logits: Vec::new(),
            admissions: 0,
        };
        (s, handle)
    }

    /// Start the scheduler on a thread of its own.
    pub fn spawn(
        engine: Engine,
        cfg: SchedulerConfig,
        observer: Arc<dyn SchedObserver>,
        name: &str,
    ) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<()>)> {
        let (s, h) = Self::new(engine, cfg, observer);
        let j = std::thread::Builder::new()
            .name(format!("sched-{name}"))
            .spawn(move || s.run())?;
        Ok((h, j))
    }

    /// Serve until every handle is dropped and all accepted work is done.
    pub fn run(mut self) {
        loop {
            if self.running.is_empty() && self.queue.is_empty() {
                match self.rx.recv() {
                    Ok(r) => self.enqueue(r),
                    Err(_) => break,
                }
            }
            while let Ok(r) = self.rx.try_recv() {
                self.enqueue(r);
            }
            self.drop_closed();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.report();
        }
    }

    fn enqueue(&mut self, req: SeqRequest) {
        self.queue.push_back(Waiting {
            req,
            arrived: Instant::now(),
        });
    }

    fn report(&self) {
        let kv = self.engine.kv.stats();
        let l = self.engine.kv.layout();
        let per_token = (2 * l.n_layers * l.token_elems() * 4) as u64;
        self.observer.state(&SchedState {
            running: self.running.len(),
            waiting: self.waiting_count.load(Ordering::Acquire),
            kv,
            kv_capacity_bytes: per_token * (l.max_context * l.max_slots) as u64,
        });
    }

    /// Forget sequences nobody listens to; free their slots now.
    fn drop_closed(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|w| !w.req.sink.is_closed());
        let gone = before - self.queue.len();
        if gone > 0 {
            self.waiting_count.fetch_sub(gone, Ordering::AcqRel);
            for _ in 0..gone {
                self.observer.cancelled();
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.sink.is_closed() {
                let s = self.running.swap_remove(i);
                self.engine.kv.release(s.slot);
                self.observer.cancelled();
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        let ctx = self.engine.model.cfg.max_context;
        while !self.queue.is_empty() {
            if self.running.len() >= self.engine.kv.layout().max_slots {
                break;
            }
            let slot = match self.engine.kv.acquire() {
                Ok(s) => s,
                Err(e) => {
                    if self.running.is_empty() {
                        // Nothing will free a slot: fail this request instead of spinning.
                        let mut w = self.queue.pop_front().unwrap();
                        self.waiting_count.fetch_sub(1, Ordering::AcqRel);
                        w.req.sink.send(SeqEvent::Failed(e.to_string()));
                        continue;
                    }
                    break;
                }
            };
            let mut w = self.queue.pop_front().unwrap();
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            let mut prompt_saved = 0;
            if let Some(p) = &self.engine.patch {
                match p.encode(&w.req.prompt) {
                    Ok(ids) => {
                        prompt_saved = w.req.prompt.len().saturating_sub(ids.len());
                        w.req.prompt = ids;
                    }
                    Err(e) => {
                        self.engine.kv.release(slot);
                        w.req.sink.send(SeqEvent::Failed(e.to_string()));
                        continue;
                    }
                }
            }
            let vocab = self.engine.model.cfg.vocab_size as u32;
            if let Some(bad) = w.req.prompt.iter().find(|&&t| t >= vocab) {
                self.engine.kv.release(slot);
                w.req.sink.send(SeqEvent::Failed(format!(
                    "token id {bad} is outside the model's vocabulary of {vocab}"
                )));
                continue;
            }
            let n_prompt = w.req.prompt.len();
            if n_prompt == 0 || n_prompt >= ctx {
                self.engine.kv.release(slot);
                w.req.sink.send(SeqEvent::Failed(format!(
                    "prompt of {n_prompt} tokens does not fit the context of {ctx}"
                )));
                continue;
            }
            let queue_secs = w.arrived.elapsed().as_secs_f64();
            if !w.req.sink.send(SeqEvent::Started {
                queue_secs,
                prompt_saved,
            }) {
                self.engine.kv.release(slot);
                self.observer.cancelled();
                continue;
            }
            let max_new = w.req.max_tokens.min(ctx - n_prompt);
            let mut tokens = std::mem::take(&mut w.req.prompt);
            tokens.reserve(max_new);
            self.admissions += 1;
            self.running.push(Seq {
                slot,
                tokens,
                n_prompt,
                cached: 0,
                generated: 0,
                generated_base: 0,
                max_new,
                sampler: Sampler::new(w.req.sampling.clone()),
                text: TextStream::new(&w.req.stop),
                admitted: self.admissions,
                req: w.req,
            });
        }
    }

    fn step(&mut self) {
        let t0 = Instant::now();
        let mut budget = self.cfg.step_tokens.max(1);
        // (index into running, chunk length, wants logits)
        let mut plan: Vec<(usize, usize, bool)> = Vec::with_capacity(self.running.len());
        let mut info = StepInfo::default();
        for (i, s) in self.running.iter().enumerate() {
            if s.cached >= s.n_prompt {
                plan.push((i, 1, true));
                budget = budget.saturating_sub(1);
                info.decode_seqs += 1;
            }
        }
        // Prefill in admission order: first come, first served.
        let mut order: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].cached < self.running[i].n_prompt)
            .collect();
        order.sort_by_key(|&i| self.running[i].admitted);
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            let n = (s.n_prompt - s.cached).min(budget);
            budget -= n;
            info.prefill_tokens += n;
            plan.push((i, n, s.cached + n == s.n_prompt));
        }
        // Make room in the KV cache first, sequence by sequence: when an allocator runs out
        // of physical memory, that sequence alone fails (its memory goes back for the others)
        // and the rest of the batch goes ahead. (Admission already waits while an allocator
        // refuses new sequences.)
        let mut failed: Vec<(usize, String)> = Vec::new();
        plan.retain(|&(i, n, _)| {
            let s = &self.running[i];
            match self.engine.kv.ensure(s.slot, s.cached + n) {
                Ok(()) => true,
                Err(e) => {
                    failed.push((i, e.to_string()));
                    false
                }
            }
        });
        failed.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, msg) in failed {
            let last = self.running.len() - 1;
            let mut s = self.running.swap_remove(i);
            self.engine.kv.release(s.slot);
            s.req.sink.send(SeqEvent::Failed(msg));
            // The sequence that moved into i keeps its place in the plan.
            for p in plan.iter_mut().filter(|p| p.0 == last) {
                p.0 = i;
            }
        }
        if plan.is_empty() {
            return;
        }
        // On a device, sample there when no row asks for logprobs: only ids come back.
        let device_rows: Option<Vec<crate::sampling::RowSampling>> =
            (self.engine.samples_on_device()
                && plan
                    .iter()
                    .all(|&(i, _, wants)| !wants || self.running[i].req.logprobs.is_none()))
            .then(|| {
                plan.iter()
                    .filter(|p| p.2)
                    .map(|&(i, _, _)| self.running[i].sampler.device_draw())
                    .collect()
            });
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .map(|&(i, n, logits)| {
                let s = &self.running[i];
                SeqChunk {
                    slot: s.slot,
                    pos: s.cached,
                    tokens: &s.tokens[s.cached..s.cached + n],
                    logits_from: if logits { n - 1 } else { n },
                }
            })
            .collect();
        info.seqs = chunks.len();
        info.tokens = chunks.iter().map(|c| c.tokens.len()).sum();
        let e = &mut self.engine;
        let mut ids: Option<Vec<u32>> = None;
        // A panic inside the pass (e.g. a KV plugin handing out no memory) fails this batch's
        // sequences instead of ending the scheduler thread and every other request with it.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(rows) = &device_rows {
                if let Some(v) = e.forward_sampled(&chunks, rows)? {
                    ids = Some(v);
                    return Ok(());
                }
            }
            e.forward(&chunks).map(|l| {
                self.logits.clear();
                self.logits.extend_from_slice(l);
            })
        }))
        .unwrap_or_else(|p| {
            let what = crate::forward::panic_message(p.as_ref());
            Err(crate::EngineError::Invalid(format!("panic: {what}")))
        });
        drop(chunks);
        match r {
            Ok(()) => {}
            Err(err) => {
                // The batch failed as a whole: fail its sequences, keep serving the rest.
                let msg = format!("forward pass failed: {err}");
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let mut s = self.running.swap_remove(i);
                    self.engine.kv.release(s.slot);
                    s.req.sink.send(SeqEvent::Failed(msg.clone()));
                }
                return;
            }
        }
        let vocab = self.engine.model.cfg.vocab_size;
        let mut row = 0;
        let mut done: Vec<usize> = Vec::new();
        for &(i, n, wants) in &plan {
            let s = &mut self.running[i];
            s.cached += n;
            if !wants {
                continue;
            }
            let pick = match &ids {
                Some(v) => Pick::Id(v[row]),
                None => Pick::Logits(&self.logits[row * vocab..(row + 1) * vocab]),
            };
            row += 1;
            let patch = self.engine.patch.as_deref();
            match sample_one(s, pick, &self.engine.tokenizer, patch) {
                Next::Continue => {}
                Next::Done => done.push(i),
                Next::Abandoned => {
                    self.observer.cancelled();
                    done.push(i);
                }
            }
        }
        done.sort_unstable_by(|a, b| b.cmp(a));
        for i in done {
            let s = self.running.swap_remove(i);
            self.engine.kv.release(s.slot);
        }
        info.secs = t0.elapsed().as_secs_f64();
        self.observer.step(&info);
    }
}

enum Next {
    Continue,
    /// Finished or failed.
    Done,
    /// Nobody listens any more.
    Abandoned,
}

/// A row's next token: sampled on the device already, or to sample from its logits.
enum Pick<'a> {
    Id(u32),
    Logits(&'a [f32]),
}

/// Take the next token of `s`.
fn sample_one(
    s: &mut Seq,
    pick: Pick,
    tok: &crate::tokenizer::Tokenizer,
    patch: Option<&dyn crate::patch::TokenPatch>,
) -> Next {
    let (id, logprob) = match pick {
        // Device rows never ask for logprobs (the scheduler samples those on the host).
        Pick::Id(id) => (id, None),
        Pick::Logits(logits) => {
            let id = s.sampler.sample(logits);
            (id, s.req.logprobs.map(|n| token_logprob(logits, id, n)))
        }
    };
    let finish = |s: &mut Seq, reason| {
        let mut tail = String::new();
        s.text.finish(&mut |t| tail.push_str(t));
        s.req.sink.send(SeqEvent::Finished {
            reason,
            text: tail,
            completion_tokens: s.generated,
            completion_saved: s.generated_base.saturating_sub(s.generated),
        });
        Next::Done
    };
    // The base ids this token stands for (one, unless a tokenizer patch merged several).
    let base = match patch {
        None => vec![id],
        Some(p) => match p.decode(&[id]) {
            Ok(b) => b,
            Err(e) => {
                s.req.sink.send(SeqEvent::Failed(e.to_string()));
                return Next::Done;
            }
        },
    };
    if base.len() == 1 && tok.stop_ids.contains(&base[0]) {
        return finish(s, FinishReason::Stop);
    }
    s.tokens.push(id);
    s.generated += 1;
    s.generated_base += base.len();
    let mut delta = String::new();
    let mut hit = false;
    for &b in &base {
        match s.text.push(tok, b, &mut |t| delta.push_str(t)) {
            Ok(true) => {
                hit = true;
                break;
            }
            Ok(false) => {}
            Err(e) => {
                s.req
                    .sink
                    .send(SeqEvent::Failed(format!("detokenization failed: {e}")));
                return Next::Done;
            }
        }
    }
    if !s.req.sink.send(SeqEvent::Token {
        id,
        text: delta,
        logprob,
    }) {
        return Next::Abandoned;
    }
    if hit {
        return finish(s, FinishReason::Stop);
    }
    if s.generated >= s.max_new {
        return finish(s, FinishReason::Length);
    }
    Next::Continue
}

/// Log-softmax of the raw logits at `id`, plus the `top` most likely ids.
pub fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = mx + logits.iter().map(|&v| (v - mx).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = top.min(idx.len());
        let by = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
        idx.sort_unstable_by(by);
        best = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
    }
    TokenLogprob {
        logprob: logits[id as usize] - lse,
        top: best,
    }
}
