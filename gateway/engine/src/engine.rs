//! The engine: a loaded model with its tokenizer, chat template, KV allocator and thread pool,
//! and the loops built on the forward pass (generation, perplexity).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::chat::{ChatTemplate, Message};
use crate::error::{EngineError, Result};
use crate::forward::{Forward, SeqChunk};
use crate::kv::{HeapKv, KvAllocator, KvLayout};
use crate::model::{Model, ModelSource};
use crate::pool::ThreadPool;
use crate::sampling::{logprob, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub threads: usize,
    /// Sequences that can be live at once.
    pub max_slots: usize,
    /// Cap on the context (defaults to the model's).
    pub max_context: Option<usize>,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Where the forward pass runs (a GPU that cannot be used falls back to the CPU with a
    /// message on stderr).
    pub device: crate::backend::Device,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_slots: 1,
            max_context: None,
            prefill_chunk: 256,
            device: crate::backend::Device::Cpu,
        }
    }
}

pub struct Engine {
    /// Shared by the engines of one model's pipeline generations.
    pub model: Arc<Model>,
    /// Shared with request handlers (tokenizing happens off the engine thread).
    pub tokenizer: Arc<Tokenizer>,
    pub chat: Arc<ChatTemplate>,
    pub fwd: Forward,
    pub kv: Box<dyn KvAllocator>,
    /// Tokenizer patch of this pipeline generation (none: the model reads base ids).
    pub patch: Option<Arc<dyn crate::patch::TokenPatch>>,
    /// A device backend running the forward pass instead of `fwd` (then `kv` is its device
    /// allocator).
    pub device: Option<Box<dyn Backend>>,
    pub opts: EngineOptions,
    /// Keeps the mapped file alive while weights point into it.
    _source: Arc<ModelSource>,
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub bits_per_byte: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Bytes of text covered by the scored tokens.
    pub bytes: usize,
    pub chunks: usize,
    pub ctx: usize,
    pub nll: f64,
}

impl Engine {
    pub fn load(
        path: &Path,
        opts: EngineOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        if !path.exists() {
            return Err(EngineError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let (mut model, source) = Model::load(path, progress)?;
        let tokenizer = match &source {
            ModelSource::Gguf(g) => Tokenizer::from_gguf(g)?,
            ModelSource::HfDir(d) => Tokenizer::from_hf_dir(d)?,
        };
        if let Some(c) = opts.max_context {
            model.cfg.max_context = model.cfg.max_context.min(c.max(1));
        }
        let tok_str = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let chat = ChatTemplate::new(
            tokenizer.chat_template.as_deref(),
            &tok_str(tokenizer.bos),
            &tok_str(tokenizer.eos),
        )?;
        let c = &model.cfg;
        let layout = KvLayout {
            n_layers: c.n_layers,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            max_context: c.max_context,
            max_slots: opts.max_slots.max(1),
        };
        let mut kv: Box<dyn KvAllocator> = Box::new(HeapKv::new(layout));
        let mut device = None;
        match crate::backend::open(opts.device, &model, layout, progress) {
            Ok(Some((b, dkv))) => {
                eprintln!("switchyard: forward pass on {}", b.name());
                device = Some(b);
                kv = dkv;
            }
            Ok(None) => {}
            Err(e) => eprintln!("switchyard: {e}; running on the CPU"),
        }
        let fwd = Forward::new(Arc::new(ThreadPool::new(opts.threads)));
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            chat: Arc::new(chat),
            fwd,
            kv,
            patch: None,
            device,
            opts,
            _source: Arc::new(source),
        })
    }

    /// Another engine over the same weights, tokenizer and template, with its own thread
    /// pool and a fresh default KV allocator of `max_slots` (a new pipeline generation).
    pub fn fork(&self, threads: usize, max_slots: usize) -> Self {
        let mut opts = self.opts.clone();
        opts.threads = threads.max(1);
        opts.max_slots = max_slots.max(1);
        let layout = self.kv_layout(opts.max_slots);
        let mut kv: Box<dyn KvAllocator> = Box::new(HeapKv::new(layout));
        let mut device = None;
        if let Some(d) = &self.device {
            match d.fork(layout) {
                Ok((b, dkv)) => {
                    device = Some(b);
                    kv = dkv;
                }
                Err(e) => eprintln!("switchyard: {e}; this generation runs on the CPU"),
            }
        }
        Self {
            model: self.model.clone(),
            tokenizer: self.tokenizer.clone(),
            chat: self.chat.clone(),
            fwd: Forward::new(Arc::new(ThreadPool::new(opts.threads))),
            kv,
            patch: None,
            device,
            opts,
            _source: self._source.clone(),
        }
    }

    /// Like [`fork`](Self::fork), but over other weights of the same architecture (e.g. an
    /// AdaptiVocab-patched model: new embedding and head rows, same shapes), which the caller
    /// has checked with [`same_shapes`](Self::same_shapes). Tokenizer and template are shared.
    pub fn fork_with_model(
        &self,
        threads: usize,
        max_slots: usize,
        model: Arc<Model>,
        source: Arc<ModelSource>,
    ) -> Self {
        let mut e = self.fork(threads, max_slots);
        e.model = model;
        e._source = source;
        e
    }

    /// Serve host weights `model` of the same shapes (a LaRoSA-rotated model, or the same
    /// weights) on this engine's device with activation sparsity `s`: the device backend and
    /// the KV allocator are rebuilt for them (the device copy is shared with every other
    /// generation over the same `model`). Errors on the CPU backend, whose linear kernels
    /// come from a plugin instead.
    pub fn set_device_weights(
        &mut self,
        model: Arc<Model>,
        s: Option<crate::backend::ActivationSparsity>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let Some(d) = &self.device else {
            return Err(EngineError::Invalid(
                "set_device_weights: this engine runs on the CPU".into(),
            ));
        };
        self.same_shapes(&model.cfg).map_err(EngineError::Invalid)?;
        let (b, kv) = d.fork_over(self.kv.layout(), &model, s, progress)?;
        self.device = Some(b);
        self.kv = kv;
        self.model = model;
        Ok(())
    }

    /// Why `other` cannot stand in for this engine's weights, if it cannot.
    pub fn same_shapes(&self, other: &crate::model::Config) -> std::result::Result<(), String> {
        let a = &self.model.cfg;
        let pairs = [
            ("layers", a.n_layers, other.n_layers),
            ("hidden size", a.dim, other.dim),
            ("attention heads", a.n_heads, other.n_heads),
            ("KV heads", a.n_kv_heads, other.n_kv_heads),
            ("head size", a.head_dim, other.head_dim),
            ("FFN size", a.ffn_dim, other.ffn_dim),
            ("vocabulary", a.vocab_size, other.vocab_size),
        ];
        for (what, x, y) in pairs {
            if x != y {
                return Err(format!("its {what} is {y}, the served model's is {x}"));
            }
        }
        if other.max_context < a.max_context {
            return Err(format!(
                "its context is {}, the served model's is {}",
                other.max_context, a.max_context
            ));
        }
        Ok(())
    }

    /// The batched forward pass on this engine's backend: the logits rows each chunk asked
    /// for, in order (`(rows, vocab)` flattened).
    pub fn forward(&mut self, batch: &[SeqChunk]) -> Result<&[f32]> {
        match &mut self.device {
            Some(d) => d.forward(&self.model, self.kv.as_mut(), batch),
            None => self.fwd.forward(&self.model, self.kv.as_mut(), batch),
        }
    }

    /// The batched pass with sampling on the device (see [`Backend::forward_sampled`]):
    /// `None`, without running the pass, on the CPU or a backend that samples on the host.
    pub fn forward_sampled(
        &mut self,
        batch: &[SeqChunk],
        rows: &[crate::sampling::RowSampling],
    ) -> Result<Option<Vec<u32>>> {
        match &mut self.device {
            Some(d) => d.forward_sampled(&self.model, self.kv.as_mut(), batch, rows),
            None => Ok(None),
        }
    }

    /// Whether the forward pass samples on a device ([`Self::forward_sampled`]).
    pub fn samples_on_device(&self) -> bool {
        self.device.as_ref().is_some_and(|d| d.samples_on_device())
    }

    /// Where the forward pass runs ("cpu" or the device's name).
    pub fn backend_name(&self) -> String {
        self.device.as_ref().map_or("cpu".into(), |d| d.name())
    }

    /// Replace the KV allocator (its layout must fit the model).
    pub fn set_kv(&mut self, kv: Box<dyn KvAllocator>) {
        self.kv = kv;
    }

    pub fn kv_layout(&self, max_slots: usize) -> KvLayout {
        let c = &self.model.cfg;
        KvLayout {
            n_layers: c.n_layers,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            max_context: c.max_context,
            max_slots,
        }
    }

    /// Prompt ids for plain text (BOS first when the vocabulary wants it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, self.tokenizer.add_bos)
    }

    /// Prompt ids for a chat, rendered through the model's template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        encode_chat(&self.tokenizer, &self.chat, messages, true)
    }

    /// Feed `tokens` to `slot` from position `pos` in chunks; returns the last token's logits.
    pub fn prefill(&mut self, slot: usize, pos: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        let chunk = self.opts.prefill_chunk.max(1);
        let mut logits = Vec::new();
        for (i, c) in tokens.chunks(chunk).enumerate() {
            let p = pos + i * chunk;
            let last = p + c.len() == pos + tokens.len();
            let sc = SeqChunk {
                slot,
                pos: p,
                tokens: c,
                logits_from: if last { c.len() - 1 } else { c.len() },
            };
            let out = self.forward(&[sc])?;
            if last {
                logits = out.to_vec();
            }
        }
        Ok(logits)
    }

    /// Generate for one sequence; `on_text` receives text as it is produced.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerateOutput> {
        req.sampling.validate().map_err(EngineError::Invalid)?;
        let mut prompt = req.prompt.clone();
        if prompt.is_empty() {
            prompt.push(self.tokenizer.bos.ok_or_else(|| {
                EngineError::Invalid(
                    "empty prompt and the vocabulary has no BOS token to start from".into(),
                )
            })?);
        }
        let ctx = self.model.cfg.max_context;
        if prompt.len() >= ctx {
            return Err(EngineError::Invalid(format!(
                "prompt of {} tokens leaves no room in the context of {ctx}",
                prompt.len()
            )));
        }
        let max_new = req.max_tokens.min(ctx - prompt.len());
        let slot = self.kv.acquire()?;
        let r = self.generate_in_slot(slot, &prompt, max_new, req, on_text);
        self.kv.release(slot);
        r
    }

    fn generate_in_slot(
        &mut self,
        slot: usize,
        prompt: &[u32],
        max_new: usize,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerateOutput> {
        let t0 = Instant::now();
        let mut logits = self.prefill(slot, 0, prompt)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut out = Vec::new();
        let mut text = TextStream::new(&req.stop);
        let mut finish = FinishReason::Length;
        let mut pos = prompt.len();
        while out.len() < max_new {
            let id = sampler.sample(&logits);
            if self.tokenizer.stop_ids.contains(&id) {
                finish = FinishReason::Stop;
                break;
            }
            out.push(id);
            if text.push(&self.tokenizer, id, on_text)? {
                finish = FinishReason::Stop;
                break;
            }
            if out.len() == max_new {
                break;
            }
            let step = [id];
            let next = self.forward(&[SeqChunk::last_logits(slot, pos, &step)])?;
            // Reuse the buffer: no allocation per generated token.
            logits.clear();
            logits.extend_from_slice(next);
            pos += 1;
        }
        text.finish(on_text);
        Ok(GenerateOutput {
            text: text.text,
            tokens: out,
            finish,
            prompt_tokens: prompt.len(),
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }

    /// llama.cpp's perplexity: non-overlapping windows of `ctx` tokens (BOS first where the
    /// vocabulary adds it), scoring the second half of each window.
    pub fn perplexity(
        &mut self,
        text: &str,
        ctx: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Perplexity> {
        if ctx < 4 || ctx > self.model.cfg.max_context {
            return Err(EngineError::Invalid(format!(
                "--ctx {ctx} must be between 4 and the model context {}",
                self.model.cfg.max_context
            )));
        }
        let add_bos = self.tokenizer.add_bos && self.tokenizer.bos.is_some();
        let mut tokens = self.tokenizer.encode(text, add_bos)?;
        // Under a tokenizer patch the model reads patched ids; bytes are counted on the base
        // text they stand for, so bits per byte compare across vocabularies.
        if let Some(p) = &self.patch {
            tokens = p.encode(&tokens)?;
        }
        let n_chunks = tokens.len() / ctx;
        if tokens.len() < 2 * ctx {
            return Err(EngineError::Invalid(format!(
                "the text has {} tokens; perplexity with a context of {ctx} needs at least {}",
                tokens.len(),
                2 * ctx
            )));
        }
        let first = ctx / 2;
        let vocab = self.model.cfg.vocab_size;
        let (mut nll, mut count, mut bytes) = (0f64, 0usize, 0usize);
        let slot = self.kv.acquire()?;
        let mut run = || -> Result<()> {
            for c in 0..n_chunks {
                let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
                if add_bos {
                    chunk[0] = self.tokenizer.bos.unwrap();
                }
                let sc = SeqChunk {
                    slot,
                    pos: 0,
                    tokens: &chunk,
                    logits_from: first,
                };
                let logits = self.forward(&[sc])?;
                for j in first..ctx - 1 {
                    let row = &logits[(j - first) * vocab..(j - first + 1) * vocab];
                    nll -= logprob(row, chunk[j + 1]) as f64;
                    count += 1;
                }
                let scored = match &self.patch {
                    Some(p) => p.decode(&chunk[first + 1..])?,
                    None => chunk[first + 1..].to_vec(),
                };
                bytes += self.tokenizer.decode(&scored, false)?.len();
                progress(c + 1, n_chunks);
            }
            Ok(())
        };
        let r = run();
        self.kv.release(slot);
        r?;
        Ok(Perplexity {
            ppl: (nll / count as f64).exp(),
            bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
            tokens: count,
            bytes,
            chunks: n_chunks,
            ctx,
            nll,
        })
    }
}

/// Prompt ids for a chat rendered through `chat` (BOS added only when the template did not
/// write it and the vocabulary wants it).
pub fn encode_chat(
    tokenizer: &Tokenizer,
    chat: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<Vec<u32>> {
    let text = chat.render(messages, add_generation_prompt)?;
    let bos_text = tokenizer.bos.and_then(|b| tokenizer.id_to_token(b));
    let add = tokenizer.add_bos && !bos_text.is_some_and(|b| text.starts_with(&b));
    tokenizer.encode(&text, add)
}

/// Incremental detokenization with stop strings: text is released once it can no longer be
/// the start of a stop string, and generation ends when one appears.
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// All text produced (stop string excluded).
    pub text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stop: Vec<String>,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Add a token; returns true when a stop string was hit.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<bool> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full
                .strip_prefix(prefix.as_str())
                .unwrap_or(&full[prefix.len().min(full.len())..]);
            let search_from = self
                .text
                .len()
                .saturating_sub(self.stop.iter().map(|s| s.len()).max().unwrap_or(0));
            self.text.push_str(delta);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Search only where a new match can start.
            let mut hit = None;
            for s in &self.stop {
                let from = floor_char_boundary(&self.text, search_from);
                if let Some(i) = self.text[from..].find(s.as_str()) {
                    hit = Some(hit.map_or(from + i, |h: usize| h.min(from + i)));
                }
            }
            if let Some(h) = hit {
                self.text.truncate(h);
                self.flush(on_text, self.text.len());
                return Ok(true);
            }
            // Hold back a tail that may begin a stop string.
            let mut keep = self.text.len();
            for s in &self.stop {
                for l in (1..s.len()).rev() {
                    if self.text.len() >= l
                        && self.text.is_char_boundary(self.text.len() - l)
                        && s.is_char_boundary(l)
                        && self.text.ends_with(&s[..l])
                    {
                        keep = keep.min(self.text.len() - l);
                        break;
                    }
                }
            }
            self.flush(on_text, keep);
        }
        Ok(false)
    }

    fn flush(&mut self, on_text: &mut dyn FnMut(&str), upto: usize) {
        if upto > self.emitted {
            on_text(&self.text[self.emitted..upto]);
            self.emitted = upto;
        }
    }

    /// Release whatever was held back.
    pub fn finish(&mut self, on_text: &mut dyn FnMut(&str)) {
        let n = self.text.len();
        self.flush(on_text, n);
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
