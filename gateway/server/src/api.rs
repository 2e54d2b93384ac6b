//! OpenAI request bodies and their validation into engine parameters.
//!
//! Unknown fields are ignored (clients send `user`, `metadata`, …); fields the engine cannot
//! honour (penalties, tools, structured output, echo) are refused with 422 instead of being
//! silently dropped.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use switchyard_engine::sampling::SamplingParams;

use crate::config::ModelConfig;
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopSpec>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Filled from the same body by [`parse_request`] (not flattened: serde loses the field
    /// path of errors inside flattened structs).
    #[serde(skip)]
    pub common: Common,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptSpec,
    /// Filled from the same body by [`parse_request`] (not flattened: serde loses the field
    /// path of errors inside flattened structs).
    #[serde(skip)]
    pub common: Common,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

/// A request body with the shared sampling fields.
pub trait WithCommon: DeserializeOwned {
    fn common_mut(&mut self) -> &mut Common;
}
impl WithCommon for ChatRequest {
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
}
impl WithCommon for CompletionRequest {
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
}

/// Parse a chat or completion body (its own fields and the shared ones).
pub fn parse_request<T: WithCommon>(body: &[u8]) -> Result<T, ApiError> {
    let v = parse_value(body)?;
    let mut r: T = from_value(v.clone())?;
    *r.common_mut() = from_value(v)?;
    Ok(r)
}

/// Parse a JSON body: syntax errors are 400, a wrong shape is 422 naming the field.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(parse_value(body)?)
}

fn parse_value(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_json(
            "request body is empty; expected a JSON object",
        ));
    }
    // First a syntax check, so that 400 and 422 are told apart reliably.
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_json(format!("request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_json("request body must be a JSON object"));
    }
    Ok(v)
}

fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner().to_string();
        let msg = if path.is_empty() {
            inner
        } else {
            format!("{path}: {inner}")
        };
        ApiError::invalid(&path, msg)
    })
}

/// Validated generation parameters.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// As requested; None = fill the rest of the context (or the model's default).
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Some(k): logprobs with the k most likely alternatives.
    pub logprobs: Option<usize>,
}

pub const MAX_N: usize = 16;
pub const MAX_STOP: usize = 16;
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Common {
    /// Shared checks; `max_tokens_default` is the endpoint's default when the client sends
    /// none (16 for legacy completions, as OpenAI).
    pub fn validate(
        &self,
        m: &ModelConfig,
        max_tokens_default: Option<usize>,
    ) -> Result<GenParams, ApiError> {
        let max = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            _ => None,
        };
        let max_tokens = match max {
            Some((p, v)) if v < 1 => {
                return Err(ApiError::invalid(
                    p,
                    format!("{p} must be at least 1, got {v}"),
                ))
            }
            Some((_, v)) => Some(v as usize),
            None => max_tokens_default.or(m.default_max_tokens),
        };
        let temperature = self.temperature.unwrap_or(m.default_temperature as f64);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(m.default_top_p as f64);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None => m.default_top_k,
            Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1 (off) or at least 1, got {k}"),
                ))
            }
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N as i64).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {MAX_STOP} stop sequences, got {}", stop.len()),
            ));
        }
        for (p, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        p,
                        format!("{p} must be between -2 and 2, got {v}"),
                    ));
                }
                if v != 0.0 {
                    return Err(ApiError::invalid(
                        p,
                        format!("{p} is not supported by this server (only 0)"),
                    ));
                }
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported by this server",
            ));
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = match &self.stream_options {
            Some(o) if !stream => {
                let _ = o;
                return Err(ApiError::invalid(
                    "stream_options",
                    "stream_options is only allowed when stream is true",
                ));
            }
            Some(o) => o.include_usage.unwrap_or(false),
            None => false,
        };
        let seed = match self.seed {
            Some(s) => s as u64,
            None => random_seed(),
        };
        Ok(GenParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                seed,
            },
            stop,
            n: n as usize,
            stream,
            include_usage,
            logprobs: None,
        })
    }
}

impl ChatRequest {
    pub fn validate(&self, m: &ModelConfig) -> Result<GenParams, ApiError> {
        let mut p = self.common.validate(m, None)?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        match (self.logprobs, self.top_logprobs) {
            (Some(true), k) => {
                let k = k.unwrap_or(0);
                if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                    ));
                }
                p.logprobs = Some(k as usize);
            }
            (_, Some(k)) if k > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs requires logprobs to be true",
                ))
            }
            _ => {}
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid(
                "tools",
                "tool calling is not supported by this server",
            ));
        }
        if let Some(f) = &self.response_format {
            let t = f.get("type").and_then(Value::as_str).unwrap_or("");
            if t != "text" {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("response_format {t:?} is not supported (only \"text\")"),
                ));
            }
        }
        Ok(p)
    }

    /// The messages as the chat template sees them.
    pub fn engine_messages(&self) -> Result<Vec<switchyard_engine::chat::Message>, ApiError> {
        to_engine_messages(&self.messages)
    }
}

pub fn to_engine_messages(
    msgs: &[ChatMessage],
) -> Result<Vec<switchyard_engine::chat::Message>, ApiError> {
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!(
                    "messages[{i}].role must be system, developer, user, assistant or tool, got {:?}",
                    m.role
                ),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                    "messages[{i}].content[{j}]: only text parts are supported, got type {:?}",
                                    p.kind
                                ),
                            ))
                        }
                    }
                }
                s
            }
        };
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        out.push(switchyard_engine::chat::Message::new(role, &content));
    }
    Ok(out)
}

impl CompletionRequest {
    pub fn validate(&self, m: &ModelConfig) -> Result<GenParams, ApiError> {
        let mut p = self.common.validate(m, Some(16))?;
        if let Some(k) = self.logprobs {
            if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            p.logprobs = Some(k as usize);
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid(
                "echo",
                "echo is not supported by this server",
            ));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "suffix",
                "suffix is not supported by this server",
            ));
        }
        if let Some(b) = self.best_of {
            if b != p.n as i64 && b != 1 {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("best_of other than 1 or n is not supported, got {b}"),
                ));
            }
        }
        Ok(p)
    }
}

/// A seed for requests that give none (different for every request).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// An id like `chatcmpl-3f2a…` (random, 24 hex digits).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        random_seed(),
        random_seed() as u32
    )
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_is_400_shape_is_422() {
        let e = parse_request::<ChatRequest>(b"{\"messages\": [").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = parse_request::<ChatRequest>(b"{\"model\": \"m\"}").unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = parse_request::<ChatRequest>(b"{\"messages\": [], \"temperature\": \"hot\"}")
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse_request::<ChatRequest>(b"[1]").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
    }

    #[test]
    fn ranges_are_checked() {
        let m = ModelConfig::from_path(std::path::Path::new("m.gguf"));
        let r: ChatRequest =
            parse_request(br#"{"messages":[{"role":"user","content":"hi"}],"temperature":-1}"#)
                .unwrap();
        let e = r.validate(&m).unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert!(e.message.contains("-1"));
        let r: ChatRequest = parse_request(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_completion_tokens":5,"seed":3,"stop":"x"}"#,
        )
        .unwrap();
        let p = r.validate(&m).unwrap();
        assert_eq!(p.max_tokens, Some(5));
        assert_eq!(p.sampling.seed, 3);
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert_eq!(r.engine_messages().unwrap()[0].content, "ab");
        let r: CompletionRequest = parse_request(br#"{"prompt":"a","n":0}"#).unwrap();
        assert_eq!(r.validate(&m).unwrap_err().param.as_deref(), Some("n"));
        let r: CompletionRequest = parse_request(br#"{"prompt":"a"}"#).unwrap();
        assert_eq!(r.validate(&m).unwrap().max_tokens, Some(16));
    }
}
