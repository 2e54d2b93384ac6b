//! HTTP handlers: the OpenAI endpoints, vLLM's /tokenize and /detokenize, health, metrics.

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::json;

use crate::api::{self, ChatRequest, CompletionRequest, DetokenizeRequest, GenParams, PromptSpec};
use crate::error::ApiError;
use crate::generate::{self, Job, Kind, SseStream};
use crate::metrics::outcome;
use crate::state::{AppState, ModelState, Ready};

pub type State = web::Data<AppState>;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/chat/completions", web::post().to(chat))
        .route("/v1/completions", web::post().to(completions))
        .route("/v1/models", web::get().to(models))
        .route("/v1/models/{id:.*}", web::get().to(model_info))
        .route("/tokenize", web::post().to(tokenize))
        .route("/detokenize", web::post().to(detokenize))
        .route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics))
        .route("/version", web::get().to(version));
}

/// Read the body with a size limit (413 beyond it).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::too_large(limit));
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_json(format!("cannot read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Record a refused request against the model it named (if it names a known one).
fn refuse(st: &AppState, model: Option<&str>, e: ApiError) -> ApiError {
    let name = st
        .entry(model)
        .map(|m| m.cfg.name.clone())
        .unwrap_or_else(|_| "unknown".into());
    let o = match e.status.as_u16() {
        429 => outcome::REJECTED,
        503 => outcome::NOT_READY,
        500..=599 => outcome::ERROR,
        _ => outcome::INVALID,
    };
    st.metrics.request(&name, o);
    e
}

/// Check lengths against the context: 422 naming the numbers.
fn fit_context(
    prompt_len: usize,
    ctx: usize,
    p: &mut GenParams,
    what: &str,
) -> Result<(), ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid(what, format!("the {what} is empty")));
    }
    if prompt_len >= ctx {
        return Err(ApiError::invalid(
            what,
            format!(
                "This model's maximum context length is {ctx} tokens, but the {what} is \
                 {prompt_len} tokens (at least one token must be left for the completion)."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    match p.max_tokens {
        Some(m) if prompt_len + m > ctx => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you \
                     requested {} tokens ({prompt_len} in the {what}, {m} in the completion). \
                     Please reduce the length of the {what} or completion.",
                    prompt_len + m
                ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(_) => {}
        None => p.max_tokens = Some(ctx - prompt_len),
    }
    Ok(())
}

async fn run_job(
    st: &State,
    req: &HttpRequest,
    kind: Kind,
    name: String,
    ready: Arc<Ready>,
    prompts: Vec<Vec<u32>>,
    params: GenParams,
    arrived: Instant,
) -> Result<HttpResponse, ApiError> {
    let rx = generate::submit(&ready, &prompts, &params).map_err(|e| refuse(st, Some(&name), e))?;
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let generation = ready.generation.to_string();
    let job = Job {
        kind,
        id: format!("{prefix}-{}", crate::request_id(req)),
        created: api::unix_now(),
        model: name,
        choices: prompts.len() * params.n,
        prompt_tokens: prompts.iter().map(|p| p.len()).sum(),
        params,
        ready,
        metrics: st.metrics.clone(),
        arrived,
    };
    if job.params.stream {
        let s = SseStream::new(job, rx);
        let body = futures_util::stream::unfold(s, |mut s| async move {
            s.next_bytes()
                .await
                .map(|b| (Ok::<_, actix_web::Error>(b), s))
        });
        Ok(HttpResponse::Ok()
            .insert_header(("x-switchyard-generation", generation))
            .insert_header((header::CONTENT_TYPE, "text/event-stream"))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(body))
    } else {
        let v = generate::collect(job, rx).await?;
        Ok(HttpResponse::Ok()
            .insert_header(("x-switchyard-generation", generation))
            .json(v))
    }
}

/// Read and parse a chat or completion body; refusals are counted.
async fn read_request<T: api::WithCommon>(
    st: &State,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, ApiError> {
    let body = read_body(req, payload, st.cfg.server.max_body_bytes)
        .await
        .map_err(|e| refuse(st, None, e))?;
    api::parse_request(&body).map_err(|e| refuse(st, None, e))
}

/// Token ids from a request, checked against the vocabulary.
fn check_ids(v: &[i64], vocab: usize, param: &str) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .map(|&t| {
            if t < 0 || t as usize >= vocab {
                Err(ApiError::invalid(
                    param,
                    format!("token id {t} is outside the vocabulary of {vocab}"),
                ))
            } else {
                Ok(t as u32)
            }
        })
        .collect()
}

async fn chat(
    st: State,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let arrived = Instant::now();
    let r: ChatRequest = read_request(&st, &req, payload).await?;
    let model = r.common.model.clone();
    let fail = |e| refuse(&st, model.as_deref(), e);
    let (entry, ready) = st.ready(model.as_deref()).map_err(fail)?;
    let mut params = r.validate(&entry.cfg).map_err(fail)?;
    let msgs = r.engine_messages().map_err(fail)?;
    let (tok, chat) = (ready.tokenizer.clone(), ready.chat.clone());
    let ids = web::block(move || switchyard_engine::engine::encode_chat(&tok, &chat, &msgs, true))
        .await
        .map_err(|e| fail(ApiError::internal(e.to_string())))?
        .map_err(|e| fail(ApiError::invalid("messages", e.to_string())))?;
    fit_context(ids.len(), ready.max_context, &mut params, "messages").map_err(fail)?;
    let name = entry.cfg.name.clone();
    run_job(
        &st,
        &req,
        Kind::Chat,
        name,
        ready,
        vec![ids],
        params,
        arrived,
    )
    .await
}

async fn completions(
    st: State,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let arrived = Instant::now();
    let r: CompletionRequest = read_request(&st, &req, payload).await?;
    let model = r.common.model.clone();
    let fail = |e| refuse(&st, model.as_deref(), e);
    let (entry, ready) = st.ready(model.as_deref()).map_err(fail)?;
    let mut params = r.validate(&entry.cfg).map_err(fail)?;
    let vocab = ready.vocab_size;
    let ids_ok = |v: &[i64]| check_ids(v, vocab, "prompt");
    let prompts: Vec<Vec<u32>> = match r.prompt {
        PromptSpec::Ids(v) => vec![ids_ok(&v).map_err(fail)?],
        PromptSpec::IdLists(v) => v
            .iter()
            .map(|x| ids_ok(x))
            .collect::<Result<_, _>>()
            .map_err(fail)?,
        PromptSpec::Text(s) => encode_texts(&ready, vec![s]).await.map_err(fail)?,
        PromptSpec::Texts(v) if v.len() <= api::MAX_N => {
            encode_texts(&ready, v).await.map_err(fail)?
        }
        PromptSpec::Texts(v) => {
            return Err(fail(ApiError::invalid(
                "prompt",
                format!("at most {} prompts, got {}", api::MAX_N, v.len()),
            )))
        }
    };
    if prompts.is_empty() {
        return Err(fail(ApiError::invalid("prompt", "prompt list is empty")));
    }
    if prompts.len() * params.n > api::MAX_N {
        return Err(fail(ApiError::invalid(
            "prompt",
            format!(
                "{} prompts × n = {} makes more than {} choices",
                prompts.len(),
                params.n,
                api::MAX_N
            ),
        )));
    }
    for p in &prompts {
        fit_context(p.len(), ready.max_context, &mut params, "prompt").map_err(fail)?;
    }
    let name = entry.cfg.name.clone();
    run_job(
        &st,
        &req,
        Kind::Completion,
        name,
        ready,
        prompts,
        params,
        arrived,
    )
    .await
}

/// Tokenize completion prompts off the async workers.
async fn encode_texts(ready: &Ready, texts: Vec<String>) -> Result<Vec<Vec<u32>>, ApiError> {
    let tok = ready.tokenizer.clone();
    web::block(move || {
        texts
            .iter()
            .map(|t| tok.encode(t, tok.add_bos))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::invalid("prompt", e.to_string()))
}

async fn models(st: State) -> HttpResponse {
    let data: Vec<_> = st.models.iter().map(|m| model_card(m)).collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

fn model_card(m: &crate::state::ModelEntry) -> serde_json::Value {
    let (ready, ctx, created, pipeline) = match &*m.state.read().unwrap() {
        ModelState::Ready(r) => {
            let plugins: Vec<_> = r
                .plugins
                .iter()
                .map(|p| json!({"stage": p.stage, "name": p.name, "kind": p.kind, "version": p.version}))
                .collect();
            let pipeline = json!({"generation": r.generation, "plugins": plugins});
            (true, Some(r.max_context), r.created, pipeline)
        }
        _ => (false, None, 0, serde_json::Value::Null),
    };
    json!({
        "id": m.cfg.name,
        "object": "model",
        "created": created,
        "owned_by": "switchyard",
        "root": m.cfg.path.display().to_string(),
        "max_model_len": ctx,
        "ready": ready,
        "pipeline": pipeline,
    })
}

async fn model_info(st: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let e = st.entry(Some(path.as_str()))?;
    Ok(HttpResponse::Ok().json(model_card(e)))
}

async fn tokenize(
    st: State,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, st.cfg.server.max_body_bytes).await?;
    let r: api::TokenizeRequest = api::parse(&body)?;
    let (_, ready) = st.ready(r.model.as_deref())?;
    let tok = ready.tokenizer.clone();
    let chat = ready.chat.clone();
    let ids = match (r.prompt, r.messages) {
        (Some(p), None) => {
            let add = r.add_special_tokens.unwrap_or(true) && tok.add_bos;
            web::block(move || tok.encode(&p, add))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
        }
        (None, Some(m)) => {
            let msgs = api::to_engine_messages(&m)?;
            let gen = r.add_generation_prompt.unwrap_or(true);
            web::block(move || switchyard_engine::engine::encode_chat(&tok, &chat, &msgs, gen))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of prompt (text) or messages (chat)",
            ))
        }
    };
    let mut v = json!({
        "count": ids.len(),
        "max_model_len": ready.max_context,
        "tokens": ids,
    });
    // Under a tokenizer patch: the ids the model reads, and both counts.
    if let Some(p) = ready.patch.clone() {
        let base = ids.len();
        let patched = web::block(move || p.encode(&ids))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(format!("tokenizer patch: {e}")))?;
        v["base_count"] = json!(base);
        v["patched_count"] = json!(patched.len());
        v["patched_tokens"] = json!(patched);
    }
    Ok(HttpResponse::Ok().json(v))
}

async fn detokenize(
    st: State,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, st.cfg.server.max_body_bytes).await?;
    let r: DetokenizeRequest = api::parse(&body)?;
    let (_, ready) = st.ready(r.model.as_deref())?;
    let ids = check_ids(&r.tokens, ready.vocab_size, "tokens")?;
    let text = ready
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({"prompt": text})))
}

async fn health(st: State) -> HttpResponse {
    let mut models = serde_json::Map::new();
    for m in &st.models {
        let s = match &*m.state.read().unwrap() {
            ModelState::Ready(_) => json!("ready"),
            ModelState::Loading { done, total } => json!(format!("loading ({done}/{total})")),
            ModelState::Failed(e) => json!(format!("failed: {e}")),
        };
        models.insert(m.cfg.name.clone(), s);
    }
    if st.all_ready() {
        HttpResponse::Ok().json(json!({"status": "ok", "models": models}))
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "2"))
            .json(json!({"status": "loading", "models": models}))
    }
}

async fn metrics(st: State) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        ))
        .body(st.metrics.render())
}

async fn version() -> HttpResponse {
    HttpResponse::Ok().json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

pub async fn not_found(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    let known = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
        "/version",
    ];
    let e = if known.contains(&req.path()) {
        ApiError::method_not_allowed(req.method().as_str(), req.path())
    } else {
        ApiError::not_found(req.path())
    };
    e.error_response()
}
