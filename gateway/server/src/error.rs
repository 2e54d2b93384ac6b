//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status that says what went wrong.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn with_param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    pub fn with_code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    /// 400: the body is not JSON (or not valid UTF-8).
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            .with_code("invalid_json")
    }

    /// 422: a parameter is missing, of the wrong type, or out of range.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        )
        .with_code("invalid_parameter");
        if param.is_empty() {
            e
        } else {
            e.with_param(param)
        }
    }

    pub fn unknown_model(name: &str, known: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{name}` does not exist. Served models: {}",
                known.join(", ")
            ),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route for {path}"),
        )
        .with_code("not_found")
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}"),
        )
        .with_code("method_not_allowed")
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .with_code("rate_limit_exceeded");
        e.retry_after = Some(1);
        e
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
        .with_code("model_not_ready");
        e.retry_after = Some(2);
        e
    }

    /// A sequence the engine could not finish: 503 with a retry hint when the KV cache ran
    /// out of memory (a transient condition), 500 otherwise.
    pub fn generation_failed(msg: &str) -> Self {
        if msg.starts_with("KV cache:") && msg.contains("out of capacity") {
            let mut e = Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                format!("generation stopped: {msg}; retry later"),
            )
            .with_code("kv_cache_exhausted");
            e.retry_after = Some(1);
            e
        } else {
            Self::internal(format!("generation failed: {msg}"))
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .with_code("internal_error")
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong bearer token",
        )
        .with_code("invalid_api_key")
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut b = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after {
            b.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        b.json(self.body())
    }
}
