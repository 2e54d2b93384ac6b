//! Benchmarks against the HTTP gateway:
//! - `bench serve`: a closed-loop load test (N streaming clients for a fixed time, or a fixed
//!   number of requests), reporting TTFT / inter-token / end-to-end percentiles, aggregate
//!   decode throughput, failures and the server's resident memory before and after;
//! - `bench gateway`: the latency the gateway adds (HTTP + scheduling) over calling the
//!   engine directly, alternating the two on the same prompt.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// Base URL of a running gateway.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model name (default: the first the gateway lists).
    #[arg(long)]
    model: Option<String>,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds during which clients start new requests (in-flight ones then finish).
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Stop after this many requests in total (whichever comes first).
    #[arg(long)]
    max_requests: Option<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Prompt text (a completion prompt).
    #[arg(
        long,
        default_value = "Once upon a time, in a small village at the edge of a great forest, there lived"
    )]
    prompt: String,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Sample {
    ok: bool,
    error: Option<String>,
    ttft: f64,
    e2e: f64,
    itl: Vec<f64>,
    tokens: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn rss(client: &reqwest::blocking::Client, url: &str) -> Option<f64> {
    let body = client
        .get(format!("{url}/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse().ok())
}

fn one_request(client: &reqwest::blocking::Client, url: &str, body: &Value) -> Sample {
    let t0 = Instant::now();
    let mut s = Sample::default();
    let r = match client
        .post(format!("{url}/v1/completions"))
        .json(body)
        .send()
    {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    if !r.status().is_success() {
        s.error = Some(format!(
            "HTTP {}: {}",
            r.status(),
            r.text().unwrap_or_default()
        ));
        return s;
    }
    let mut last: Option<Instant> = None;
    let mut done = false;
    for line in BufReader::new(r).lines() {
        let Ok(line) = line else {
            s.error = Some("stream broke".into());
            return s;
        };
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            done = true;
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(d) else {
            s.error = Some(format!("bad chunk {d}"));
            return s;
        };
        if v.get("error").is_some() {
            s.error = Some(v["error"]["message"].to_string());
            return s;
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            s.tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let has_text = v["choices"]
            .as_array()
            .and_then(|c| c.first())
            .and_then(|c| c["text"].as_str())
            .is_some_and(|t| !t.is_empty());
        if has_text {
            let now = Instant::now();
            match last {
                None => s.ttft = (now - t0).as_secs_f64(),
                Some(p) => s.itl.push((now - p).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    if !done {
        s.error = Some("stream ended without [DONE]".into());
        return s;
    }
    s.e2e = t0.elapsed().as_secs_f64();
    s.ok = true;
    s
}

pub fn bench_serve(a: ServeBenchArgs) -> Result<()> {
    let url = a.url.trim_end_matches('/').to_string();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(a.concurrency + 4)
        .build()?;
    let models: Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .with_context(|| format!("cannot reach the gateway at {url}"))?
        .json()?;
    let model = match a.model.clone() {
        Some(m) => m,
        None => models["data"][0]["id"]
            .as_str()
            .context("the gateway lists no model")?
            .to_string(),
    };
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let rss0 = rss(&client, &url);
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.duration);
    let handles: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let (client, url, model) = (client.clone(), url.clone(), model.clone());
            let (samples, started, stop) = (samples.clone(), started.clone(), stop.clone());
            let (prompt, max_tokens, temp, max_req) = (
                a.prompt.clone(),
                a.max_tokens,
                a.temperature,
                a.max_requests,
            );
            std::thread::spawn(move || {
                let mut i = 0u64;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let n = started.fetch_add(1, Ordering::Relaxed);
                    if max_req.is_some_and(|m| n >= m) {
                        break;
                    }
                    let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": temp, "seed": (w as u64) << 32 | i, "stream": true,
                        "stream_options": {"include_usage": true}});
                    let s = one_request(&client, &url, &body);
                    samples.lock().unwrap().push(s);
                    i += 1;
                }
            })
        })
        .collect();
    // Progress on stderr; the server's resident memory every 5 s.
    let mut rss_series = vec![(0.0, rss0)];
    let mut next_rss = 5.0;
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(500));
        if t0.elapsed().as_secs_f64() >= next_rss {
            rss_series.push((t0.elapsed().as_secs_f64(), rss(&client, &url)));
            next_rss += 5.0;
        }
        if !a.json {
            let n = samples.lock().unwrap().len();
            eprint!("\r{:6.1} s  {n} requests done", t0.elapsed().as_secs_f64());
        }
    }
    if !a.json {
        eprintln!();
    }
    for h in handles {
        let _ = h.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let rss1 = rss(&client, &url);
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let failed: Vec<&Sample> = samples.iter().filter(|s| !s.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|s| s.e2e).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.itl.iter().copied()).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let v = json!({
        "url": url,
        "model": model,
        "concurrency": a.concurrency,
        "duration_s": wall,
        "max_tokens": a.max_tokens,
        "requests_ok": ok.len(),
        "requests_failed": failed.len(),
        "first_errors": failed.iter().take(3).map(|s| s.error.clone()).collect::<Vec<_>>(),
        "generated_tokens": tokens,
        "decode_tokens_per_s": tokens as f64 / wall,
        "requests_per_s": ok.len() as f64 / wall,
        "ttft_s": {"p50": percentile(&mut ttft, 50.0), "p90": percentile(&mut ttft, 90.0), "p99": percentile(&mut ttft, 99.0)},
        "itl_s": {"p50": percentile(&mut itl, 50.0), "p90": percentile(&mut itl, 90.0), "p99": percentile(&mut itl, 99.0)},
        "e2e_s": {"p50": percentile(&mut e2e, 50.0), "p99": percentile(&mut e2e, 99.0)},
        "server_rss_bytes": {"before": rss0, "after": rss1},
        "server_rss_mb_every_5s": rss_series.iter().map(|(t, r)| json!([t.round(), r.map(|b| (b / 1e6).round())])).collect::<Vec<_>>(),
    });
    if a.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if !failed.is_empty() {
        bail!("{} requests failed", failed.len());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct GatewayBenchArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    threads: Option<usize>,
    /// Rounds (each runs the engine directly, then through the gateway).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    #[arg(
        long,
        default_value = "Once upon a time, in a small village at the edge of a great forest, there lived"
    )]
    prompt: String,
    #[arg(long)]
    json: bool,
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 50.0)
}

pub fn bench_gateway(a: GatewayBenchArgs) -> Result<()> {
    use switchyard_engine::sampling::SamplingParams;
    use switchyard_engine::{Engine, EngineOptions, GenerateRequest};
    use switchyard_server::config::{GatewayConfig, ModelConfig};
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = EngineOptions {
        threads,
        max_slots: 1,
        ..Default::default()
    };
    let mut engine = Engine::load(&a.model, opts, &mut |_, _| {})
        .with_context(|| format!("loading model {}", a.model.display()))?;
    // The gateway, in this process, on a free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut mc = ModelConfig::from_path(&a.model);
    mc.name = "bench".into();
    mc.threads = threads;
    mc.max_batch = 1;
    let mut cfg = GatewayConfig::default();
    cfg.server.port = port;
    cfg.server.workers = 1;
    cfg.models.push(mc);
    cfg.validate().map_err(anyhow::Error::msg)?;
    std::thread::spawn(move || {
        let _ = actix_web::rt::System::new().block_on(switchyard_server::serve(cfg));
    });
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    let t0 = Instant::now();
    loop {
        if client
            .get(format!("{url}/health"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the in-process gateway did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = json!({"model": "bench", "prompt": a.prompt, "max_tokens": a.max_tokens,
                      "temperature": 0});
    let mut direct = Vec::new();
    let mut http = Vec::new();
    let mut tokens = (0, 0);
    let run_direct = |engine: &mut Engine| -> Result<(f64, usize)> {
        let t = Instant::now();
        let req = GenerateRequest {
            prompt: engine.encode_prompt(&a.prompt)?,
            max_tokens: a.max_tokens,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let out = engine.generate(&req, &mut |_| {})?;
        Ok((t.elapsed().as_secs_f64(), out.tokens.len()))
    };
    let run_http = || -> Result<(f64, usize)> {
        let t = Instant::now();
        let v: Value = client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()?
            .json()?;
        let n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        Ok((t.elapsed().as_secs_f64(), n))
    };
    // Alternating, in A-B-B-A order so that neither side always runs first.
    for r in 0..=a.reps {
        let ((d, nd), (h, nh)) = if r % 2 == 0 {
            let d = run_direct(&mut engine)?;
            (d, run_http()?)
        } else {
            let h = run_http()?;
            (run_direct(&mut engine)?, h)
        };
        if r == 0 {
            continue; // warm-up
        }
        tokens = (nd, nh);
        direct.push(d);
        http.push(h);
    }
    if tokens.0 != tokens.1 {
        bail!(
            "direct and gateway runs generated different lengths ({} vs {})",
            tokens.0,
            tokens.1
        );
    }
    let (dm, hm) = (median(&mut direct), median(&mut http));
    let (dmin, hmin) = (direct[0], http[0]); // sorted by median()
    let v = json!({
        "model": a.model.display().to_string(),
        "threads": threads,
        "reps": a.reps,
        "prompt": a.prompt,
        "max_tokens": a.max_tokens,
        "generated_tokens": tokens.0,
        "direct_median_s": dm,
        "gateway_median_s": hm,
        "direct_min_s": dmin,
        "gateway_min_s": hmin,
        "overhead_ms": (hm - dm) * 1e3,
        "overhead_min_ms": (hmin - dmin) * 1e3,
        "overhead_ratio": hm / dm,
    });
    if a.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
