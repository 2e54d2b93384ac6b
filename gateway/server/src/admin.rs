//! The admin API (enabled only when `server.admin_token` is set; `Authorization: Bearer T`):
//! plugins, pipelines, swaps and rollbacks. Every action is logged and counted.

use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::error::ApiError;
use crate::pipeline::PipelineSpec;
use crate::routes::State;
use crate::state::Ready;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/plugins", web::get().to(plugins))
        .route(
            "/admin/models/{model}/pipeline",
            web::get().to(get_pipeline),
        )
        .route(
            "/admin/models/{model}/pipeline",
            web::put().to(put_pipeline),
        )
        .route("/admin/models/{model}/rollback", web::post().to(rollback));
}

fn err(status: StatusCode, kind: &'static str, code: &'static str, msg: String) -> ApiError {
    ApiError {
        status,
        message: msg,
        kind,
        param: None,
        code: Some(code),
        retry_after: None,
    }
}

/// 404 when disabled, 401 without a bearer token, 403 with a wrong one.
fn authorize(st: &State, req: &HttpRequest, action: &str) -> Result<(), ApiError> {
    let Some(token) = st.cfg.server.admin_token.as_deref() else {
        return Err(err(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "admin_disabled",
            "the admin API is disabled (no server.admin_token configured)".into(),
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let count = |r: &str| {
        st.metrics
            .admin_actions
            .with_label_values(&[action, r])
            .inc()
    };
    match given {
        None => {
            count("unauthorized");
            tracing::warn!(action, "admin call without a bearer token");
            Err(ApiError::unauthorized())
        }
        Some(g) if !constant_time_eq(g.as_bytes(), token.as_bytes()) => {
            count("forbidden");
            tracing::warn!(action, "admin call with a wrong token");
            Err(err(
                StatusCode::FORBIDDEN,
                "permission_error",
                "forbidden",
                "wrong admin token".into(),
            ))
        }
        Some(_) => Ok(()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn pipeline_json(model: &str, r: &Ready) -> serde_json::Value {
    json!({
        "model": model,
        "generation": r.generation,
        "spec": r.spec,
        "plugins": r.plugins,
        "created": r.created,
    })
}

async fn plugins(st: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&st, &req, "list_plugins")?;
    let loaded = st.registry.loaded();
    let found: Vec<_> = st
        .registry
        .manifests()
        .into_iter()
        .map(|(path, m)| match m {
            Ok(m) => json!({
                "manifest": path.display().to_string(),
                "name": m.name, "version": m.version, "kind": m.kind, "abi": m.abi,
                "sha256": m.sha256.to_ascii_lowercase(),
                "loaded": loaded.iter().any(|p| p.name() == m.name && p.sha256() == m.sha256.to_ascii_lowercase()),
            }),
            Err(e) => json!({"manifest": path.display().to_string(), "error": e}),
        })
        .collect();
    st.metrics
        .admin_actions
        .with_label_values(&["list_plugins", "ok"])
        .inc();
    Ok(HttpResponse::Ok().json(json!({
        "plugin_dirs": st.cfg.server.plugin_dirs,
        "builtin": [
            {"name": "builtin", "kind": "tokenizer-patch", "stage": "tokenizer_patch", "description": "no patch: the model reads base ids"},
            {"name": "builtin", "kind": "kv-allocator", "stage": "kv_allocator", "description": "the engine's heap allocator"},
            {"name": "builtin", "kind": "linear-kernels", "stage": "linear_kernels", "description": "the engine's dense products"},
        ],
        "plugins": found,
    })))
}

async fn get_pipeline(
    st: State,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&st, &req, "get_pipeline")?;
    let (entry, ready) = st.ready(Some(path.as_str()))?;
    Ok(HttpResponse::Ok().json(pipeline_json(&entry.cfg.name, &ready)))
}

/// Run a swap (or rollback) off the async workers; count, log and answer.
async fn run_swap(
    st: State,
    model: String,
    action: &'static str,
    spec: Option<PipelineSpec>,
) -> Result<HttpResponse, ApiError> {
    let entry = st.entry(Some(&model))?.clone();
    let old = entry.current().map(|r| r.generation);
    let st2 = st.clone();
    let t0 = Instant::now();
    let r = web::block(move || match spec {
        Some(s) => entry.swap(&s, &st2.metrics, &st2.registry),
        None => entry.rollback(&st2.metrics, &st2.registry),
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let secs = t0.elapsed().as_secs_f64();
    let m = &st.metrics;
    match r {
        Ok(new) => {
            m.swaps.with_label_values(&[&model, "ok"]).inc();
            m.swap_seconds.with_label_values(&[&model]).observe(secs);
            m.generation
                .with_label_values(&[&model])
                .set(new.generation as i64);
            m.admin_actions.with_label_values(&[action, "ok"]).inc();
            tracing::info!(model = %model, action, from = ?old, to = new.generation, secs, "pipeline swapped");
            let mut v = pipeline_json(&model, &new);
            v["previous_generation"] = json!(old);
            v["swap_seconds"] = json!(secs);
            Ok(HttpResponse::Ok().json(v))
        }
        Err(e) => {
            m.swaps.with_label_values(&[&model, "failed"]).inc();
            m.admin_actions.with_label_values(&[action, "failed"]).inc();
            tracing::warn!(model = %model, action, "swap failed: {e}");
            Err(err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "swap_failed",
                format!(
                    "{action} failed: {e}; generation {} is still serving",
                    old.map_or("none".to_string(), |g| g.to_string())
                ),
            ))
        }
    }
}

async fn put_pipeline(
    st: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&st, &req, "swap")?;
    let spec: PipelineSpec = crate::api::parse(&body)?;
    st.ready(Some(path.as_str()))?;
    run_swap(st, path.into_inner(), "swap", Some(spec)).await
}

async fn rollback(
    st: State,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&st, &req, "rollback")?;
    st.ready(Some(path.as_str()))?;
    run_swap(st, path.into_inner(), "rollback", None).await
}
