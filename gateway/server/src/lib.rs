//! Switchyard's HTTP gateway: an OpenAI-compatible API over several models, each with its own
//! continuous-batching scheduler thread, Prometheus metrics, and graceful shutdown.
//!
//! - [`config`]: file + environment + flags into one validated [`config::GatewayConfig`].
//! - [`routes`]: the endpoints; [`api`]: request bodies and validation; [`generate`]: from
//!   scheduler events to JSON and SSE; [`error`]: OpenAI-style errors.
//! - [`state`]: models loading and serving; [`metrics`]: every exported metric.

pub mod admin;
pub mod api;
pub mod config;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod pipeline;
pub mod routes;
pub mod state;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpRequest, HttpServer};
use anyhow::Context;

use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::state::{AppState, ModelState};

#[derive(Clone)]
struct RequestId(String);

/// The id of this request (the client's `X-Request-Id` when it sent a sane one).
pub fn request_id(req: &HttpRequest) -> String {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| api::new_id("req"))
}

/// One log line per request, the request id on the response, HTTP counters.
async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let t0 = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", api::random_seed()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().to_string();
    let path = req.path().to_owned();
    let mut res = next.call(req).await?;
    let status = res.status().as_u16();
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    if let Some(st) = res.request().app_data::<web::Data<AppState>>() {
        st.metrics
            .http_requests
            .with_label_values(&[route.as_str(), &status.to_string()])
            .inc();
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    tracing::info!(
        id = %id,
        method = %method,
        path = %path,
        status,
        ms = format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3),
        "request"
    );
    Ok(res)
}

/// Logs to stderr: human-readable, or one JSON object per line. `RUST_LOG` filters.
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        b.json().flatten_event(true).try_init()
    } else {
        b.try_init()
    };
}

/// Serve until SIGINT/SIGTERM (graceful: in-flight requests finish within the configured
/// timeout) or until a model fails to load (error).
pub async fn serve(cfg: GatewayConfig) -> anyhow::Result<()> {
    serve_notify(cfg, None, true).await
}

/// [`serve`], sending the bound addresses to `bound` once it listens (for in-process use
/// with port 0). Without `signals` the server leaves SIGINT/SIGTERM to its host program.
pub async fn serve_notify(
    cfg: GatewayConfig,
    bound: Option<std::sync::mpsc::Sender<Vec<std::net::SocketAddr>>>,
    signals: bool,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let state = web::Data::new(AppState::new(cfg.clone(), metrics));
    let s = &cfg.server;
    let workers = if s.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    } else {
        s.workers
    };
    let app_state = state.clone();
    let srv = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .wrap(from_fn(access_log))
            .configure(routes::configure)
            .configure(admin::configure)
            .default_service(web::to(routes::not_found))
    })
    .workers(workers)
    .shutdown_timeout(s.shutdown_timeout_secs);
    let srv = if signals { srv } else { srv.disable_signals() };
    let srv = srv
        .bind((s.host.as_str(), s.port))
        .with_context(|| format!("cannot listen on {}:{}", s.host, s.port))?;
    for a in srv.addrs() {
        tracing::info!("listening on http://{a}");
    }
    if let Some(tx) = bound {
        let _ = tx.send(srv.addrs());
    }
    let server = srv.run();
    let handle = server.handle();
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for m in &state.models {
        let m = m.clone();
        let st = state.clone();
        let tx = fail_tx.clone();
        std::thread::Builder::new()
            .name(format!("load-{}", m.cfg.name))
            .spawn(move || {
                tracing::info!(model = %m.cfg.name, path = %m.cfg.path.display(), "loading");
                if let Err(e) = state::load_model(&m, &st.metrics, &st.registry) {
                    tracing::error!(model = %m.cfg.name, "cannot load: {e}");
                    *m.state.write().unwrap() = ModelState::Failed(e.clone());
                    let _ = tx.send(format!("model `{}`: {e}", m.cfg.name));
                }
            })
            .context("cannot start a loader thread")?;
    }
    drop(fail_tx);
    tokio::select! {
        r = server => {
            r.context("HTTP server")?;
            tracing::info!("shut down");
            Ok(())
        }
        Some(msg) = fail_rx.recv() => {
            handle.stop(false).await;
            anyhow::bail!("{msg}")
        }
    }
}
