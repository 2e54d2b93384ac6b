//! From validated requests to scheduler sequences and back: event sinks, the non-streaming
//! response, the SSE stream, and the per-request latency metrics.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use actix_web::web::Bytes;
use serde_json::{json, Value};
use switchyard_engine::scheduler::{EventSink, SeqEvent, SeqRequest, SubmitError, TokenLogprob};
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_engine::FinishReason;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::api::GenParams;
use crate::error::ApiError;
use crate::metrics::{outcome, Metrics};
use crate::state::Ready;

/// Sends a choice's events into the request's channel.
struct ChanSink {
    index: usize,
    tx: UnboundedSender<(usize, SeqEvent)>,
}

impl EventSink for ChanSink {
    fn send(&mut self, ev: SeqEvent) -> bool {
        self.tx.send((self.index, ev)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Everything a response needs besides the events.
pub struct Job {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub choices: usize,
    pub prompt_tokens: usize,
    pub params: GenParams,
    pub ready: Arc<Ready>,
    pub metrics: Arc<Metrics>,
    pub arrived: Instant,
}

/// Queue one sequence per (prompt, n) pair. Prompts must already fit the context.
pub fn submit(
    ready: &Ready,
    prompts: &[Vec<u32>],
    p: &GenParams,
) -> Result<UnboundedReceiver<(usize, SeqEvent)>, ApiError> {
    let (tx, rx) = unbounded_channel();
    let mut reqs = Vec::with_capacity(prompts.len() * p.n);
    for (pi, prompt) in prompts.iter().enumerate() {
        let max_new = p.max_tokens.unwrap_or(usize::MAX);
        for j in 0..p.n {
            let mut sampling = p.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(j as u64);
            reqs.push(SeqRequest {
                prompt: prompt.clone(),
                max_tokens: max_new,
                sampling,
                stop: p.stop.clone(),
                logprobs: p.logprobs,
                sink: Box::new(ChanSink {
                    index: pi * p.n + j,
                    tx: tx.clone(),
                }),
            });
        }
    }
    ready.sched.submit(reqs).map_err(|e| match e {
        SubmitError::QueueFull { .. } => ApiError::overloaded(e.to_string()),
        SubmitError::Stopped => ApiError::not_ready(e.to_string()),
    })?;
    Ok(rx)
}

/// Per-request timing into the histograms; a request dropped before its end counts as
/// cancelled.
struct Recorder {
    metrics: Arc<Metrics>,
    ready: Arc<Ready>,
    model: String,
    arrived: Instant,
    first: bool,
    last_token: Vec<Option<Instant>>,
    outcome: Option<&'static str>,
    /// Tokens the tokenizer patch saved in this request: prompt, completion.
    saved: (usize, usize),
}

impl Recorder {
    fn new(job: &Job) -> Self {
        job.ready
            .metrics
            .prompt_tokens
            .inc_by((job.prompt_tokens * job.params.n) as u64);
        Self {
            metrics: job.metrics.clone(),
            ready: job.ready.clone(),
            model: job.model.clone(),
            arrived: job.arrived,
            first: true,
            last_token: vec![None; job.choices],
            outcome: None,
            saved: (0, 0),
        }
    }

    fn event(&mut self, index: usize, ev: &SeqEvent) {
        let m = &self.ready.metrics;
        match ev {
            SeqEvent::Started {
                queue_secs,
                prompt_saved,
            } => {
                m.queue_time.observe(*queue_secs);
                m.prompt_saved.inc_by(*prompt_saved as u64);
                // The prompt is counted once in usage, however many choices read it.
                self.saved.0 = self.saved.0.max(*prompt_saved);
            }
            SeqEvent::Finished {
                completion_saved, ..
            } => {
                m.completion_saved.inc_by(*completion_saved as u64);
                self.saved.1 += completion_saved;
            }
            SeqEvent::Token { .. } => {
                let now = Instant::now();
                if self.first {
                    self.first = false;
                    m.ttft.observe((now - self.arrived).as_secs_f64());
                }
                if let Some(prev) = self.last_token[index] {
                    m.itl.observe((now - prev).as_secs_f64());
                }
                self.last_token[index] = Some(now);
                m.generation_tokens.inc();
            }
            _ => {}
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
            if outcome == outcome::OK {
                self.ready
                    .metrics
                    .e2e
                    .observe(self.arrived.elapsed().as_secs_f64());
            }
            self.metrics.request(&self.model, outcome);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if self.outcome.is_none() {
            self.finish(outcome::CANCELLED);
            tracing::info!(model = %self.model, "client went away; sequence cancelled");
        }
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The text of one token. SentencePiece decoders drop the leading space of a lone token
/// ("▁Paris" decodes to "Paris"); it is put back so that tokens concatenate to the text.
fn token_text(tok: &Tokenizer, id: u32) -> String {
    let piece = tok.id_to_token(id);
    let mut t = tok
        .decode(&[id], false)
        .ok()
        .or_else(|| piece.clone())
        .unwrap_or_default();
    if piece.is_some_and(|p| p.starts_with('\u{2581}')) && !t.starts_with(' ') {
        t.insert(0, ' ');
    }
    t
}

fn chat_logprob(tok: &Tokenizer, id: u32, lp: &TokenLogprob) -> Value {
    let t = token_text(tok, id);
    json!({
        "token": t,
        "logprob": lp.logprob,
        "bytes": t.as_bytes(),
        "top_logprobs": lp.top.iter().map(|&(i, l)| {
            let s = token_text(tok, i);
            json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
        }).collect::<Vec<_>>(),
    })
}

/// Completions-style logprobs of a run of tokens; `offset` is the text offset of the first.
#[derive(Default)]
struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl LegacyLogprobs {
    fn push(&mut self, tok: &Tokenizer, id: u32, lp: &TokenLogprob, offset: usize) {
        self.tokens.push(token_text(tok, id));
        self.token_logprobs.push(lp.logprob);
        let mut m = serde_json::Map::new();
        for &(i, l) in &lp.top {
            m.entry(token_text(tok, i)).or_insert(json!(l));
        }
        self.top.push(Value::Object(m));
        self.offsets.push(offset);
    }
    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        })
    }
}

struct ChoiceAcc {
    text: String,
    completion_tokens: usize,
    finish: Option<&'static str>,
    chat_lp: Vec<Value>,
    legacy_lp: LegacyLogprobs,
}

/// Wait for every choice and build the whole response body.
pub async fn collect(
    job: Job,
    mut rx: UnboundedReceiver<(usize, SeqEvent)>,
) -> Result<Value, ApiError> {
    let mut rec = Recorder::new(&job);
    let tok = job.ready.tokenizer.clone();
    let mut acc: Vec<ChoiceAcc> = (0..job.choices)
        .map(|_| ChoiceAcc {
            text: String::new(),
            completion_tokens: 0,
            finish: None,
            chat_lp: Vec::new(),
            legacy_lp: LegacyLogprobs::default(),
        })
        .collect();
    let mut left = job.choices;
    while left > 0 {
        let Some((i, ev)) = rx.recv().await else {
            rec.finish(outcome::ERROR);
            return Err(ApiError::internal(
                "the model's scheduler stopped mid-request",
            ));
        };
        rec.event(i, &ev);
        let a = &mut acc[i];
        match ev {
            SeqEvent::Started { .. } => {}
            SeqEvent::Token { id, text, logprob } => {
                if let Some(lp) = &logprob {
                    match job.kind {
                        Kind::Chat => a.chat_lp.push(chat_logprob(&tok, id, lp)),
                        Kind::Completion => a.legacy_lp.push(&tok, id, lp, a.text.len()),
                    }
                }
                a.text.push_str(&text);
                a.completion_tokens += 1;
            }
            SeqEvent::Finished {
                reason,
                text,
                completion_tokens,
                ..
            } => {
                a.text.push_str(&text);
                a.completion_tokens = completion_tokens;
                a.finish = Some(finish_str(reason));
                left -= 1;
            }
            SeqEvent::Failed(msg) => {
                rec.finish(outcome::ERROR);
                tracing::error!(id = %job.id, "generation failed: {msg}");
                return Err(ApiError::generation_failed(&msg));
            }
        }
    }
    rec.finish(outcome::OK);
    let completion_tokens: usize = acc.iter().map(|a| a.completion_tokens).sum();
    let prompt_tokens = job.prompt_tokens;
    let want_lp = job.params.logprobs.is_some();
    let choices: Vec<Value> = acc
        .into_iter()
        .enumerate()
        .map(|(i, a)| match job.kind {
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": a.text},
                "logprobs": if want_lp { json!({"content": a.chat_lp}) } else { Value::Null },
                "finish_reason": a.finish,
            }),
            Kind::Completion => json!({
                "index": i,
                "text": a.text,
                "logprobs": if want_lp { a.legacy_lp.json() } else { Value::Null },
                "finish_reason": a.finish,
            }),
        })
        .collect();
    Ok(json!({
        "id": job.id,
        "object": if job.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": job.created,
        "model": job.model,
        "system_fingerprint": Value::Null,
        "choices": choices,
        "usage": usage(&job, prompt_tokens, completion_tokens, rec.saved),
    }))
}

/// The `usage` object. Under a tokenizer patch, prompt and completion tokens are the ids the
/// model read and wrote, and `tokens_saved` (prompt and completion) says how many fewer that
/// is than the base tokenizer's count.
fn usage(job: &Job, prompt: usize, completion: usize, saved: (usize, usize)) -> Value {
    // Under a patch, prompt_tokens counts the ids the model read (base count minus saved).
    let prompt = prompt.saturating_sub(saved.0);
    let mut u = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    });
    if job.ready.spec.tokenizer_patch.plugin != "builtin" {
        u["tokens_saved"] = json!({"prompt": saved.0, "completion": saved.1});
    }
    u
}

/// The state of one SSE response.
pub struct SseStream {
    job: Job,
    rx: UnboundedReceiver<(usize, SeqEvent)>,
    rec: Recorder,
    pending: VecDeque<Bytes>,
    left: usize,
    completion_tokens: usize,
    text_len: Vec<usize>,
    done: bool,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl SseStream {
    pub fn new(job: Job, rx: UnboundedReceiver<(usize, SeqEvent)>) -> Self {
        let rec = Recorder::new(&job);
        let mut s = Self {
            left: job.choices,
            text_len: vec![0; job.choices],
            job,
            rx,
            rec,
            pending: VecDeque::new(),
            completion_tokens: 0,
            done: false,
        };
        if s.job.kind == Kind::Chat {
            // The role comes first, as OpenAI's stream does.
            for i in 0..s.job.choices {
                let c = s.chunk(
                    json!({"index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": Value::Null, "finish_reason": Value::Null}),
                );
                s.pending.push_back(c);
            }
        }
        s
    }

    fn chunk(&self, choice: Value) -> Bytes {
        let j = &self.job;
        let mut v = json!({
            "id": j.id,
            "object": if j.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": j.created,
            "model": j.model,
            "system_fingerprint": Value::Null,
            "choices": [choice],
        });
        if j.params.include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }

    fn text_choice(&self, i: usize, text: &str, lp: Value, finish: Option<&str>) -> Value {
        match self.job.kind {
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
            }
        }
    }

    fn on_event(&mut self, i: usize, ev: SeqEvent) {
        self.rec.event(i, &ev);
        let tok = self.job.ready.tokenizer.clone();
        match ev {
            SeqEvent::Started { .. } => {}
            SeqEvent::Token { id, text, logprob } => {
                self.completion_tokens += 1;
                let lp = match (&logprob, self.job.kind) {
                    (None, _) => Value::Null,
                    (Some(lp), Kind::Chat) => json!({"content": [chat_logprob(&tok, id, lp)]}),
                    (Some(lp), Kind::Completion) => {
                        let mut l = LegacyLogprobs::default();
                        l.push(&tok, id, lp, self.text_len[i]);
                        l.json()
                    }
                };
                if text.is_empty() && lp.is_null() {
                    return;
                }
                self.text_len[i] += text.len();
                let c = self.chunk(self.text_choice(i, &text, lp, None));
                self.pending.push_back(c);
            }
            SeqEvent::Finished { reason, text, .. } => {
                if !text.is_empty() {
                    self.text_len[i] += text.len();
                    let c = self.chunk(self.text_choice(i, &text, Value::Null, None));
                    self.pending.push_back(c);
                }
                let c = self.chunk(self.text_choice(i, "", Value::Null, Some(finish_str(reason))));
                self.pending.push_back(c);
                self.left -= 1;
                if self.left == 0 {
                    self.end(outcome::OK, None);
                }
            }
            SeqEvent::Failed(msg) => {
                tracing::error!(id = %self.job.id, "generation failed: {msg}");
                self.end(outcome::ERROR, Some(ApiError::generation_failed(&msg)));
            }
        }
    }

    fn end(&mut self, outcome: &'static str, err: Option<ApiError>) {
        if let Some(e) = err {
            self.pending.push_back(sse(&e.body()));
        } else if self.job.params.include_usage {
            let p = self.job.prompt_tokens;
            let c = self.completion_tokens;
            let j = &self.job;
            let v = json!({
                "id": j.id,
                "object": if j.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                "created": j.created,
                "model": j.model,
                "system_fingerprint": Value::Null,
                "choices": [],
                "usage": usage(j, p, c, self.rec.saved),
            });
            self.pending.push_back(sse(&v));
        }
        self.pending
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.rec.finish(outcome);
        self.done = true;
    }

    /// The next piece of the body, or None at the end.
    pub async fn next_bytes(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some(b);
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Some((i, ev)) => self.on_event(i, ev),
                None => self.end(
                    outcome::ERROR,
                    Some(ApiError::internal(
                        "the model's scheduler stopped mid-request",
                    )),
                ),
            }
        }
    }
}
