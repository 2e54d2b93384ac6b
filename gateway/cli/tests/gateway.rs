//! `switchyard serve` end to end: the real binary on a free loopback port with real models
//! (stories260K and SmolLM2 served together), driven over HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};
use switchyard_tests::gateway::Gateway;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-gw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A config file serving stories260K as "stories" and SmolLM2 as "smol".
fn two_model_config(dir: &Path) -> PathBuf {
    let f = dir.join("gateway.toml");
    std::fs::write(
        &f,
        format!(
            "[server]\nshutdown_timeout_secs = 10\n\n\
             [[models]]\nname = \"stories\"\npath = {:?}\nmax_batch = 4\n\n\
             [[models]]\nname = \"smol\"\npath = {:?}\nmax_batch = 4\nmax_context = 2048\n",
            switchyard_tests::stories_dir().display().to_string(),
            switchyard_tests::smollm2_gguf().display().to_string(),
        ),
    )
    .unwrap();
    f
}

fn post(gw: &Gateway, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(gw.url(path)).json(body).send().unwrap();
    let s = r.status().as_u16();
    (s, r.json().unwrap_or(Value::Null))
}

/// SSE `data:` payloads of a streaming response, up to and excluding `[DONE]`; the flag
/// says whether `[DONE]` came.
fn sse_events(r: Response) -> (Vec<Value>, bool) {
    let mut out = Vec::new();
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            return (out, true);
        }
        out.push(serde_json::from_str(d).unwrap());
    }
    (out, false)
}

fn stream(gw: &Gateway, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let r = client().post(gw.url(path)).json(body).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    sse_events(r)
}

/// Text, finish reason and usage of choice `i` rebuilt from stream chunks.
fn from_stream(events: &[Value], i: u64) -> (String, String, Option<Value>) {
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = None;
    for e in events {
        if let Some(u) = e.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for c in e["choices"].as_array().unwrap() {
            if c["index"] != i {
                continue;
            }
            if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish, usage)
}

fn assert_error(status: u16, body: &Value, want: u16, needles: &[&str]) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    let msg = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"));
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
}

#[test]
fn two_models_serve_together_and_streaming_matches() {
    let dir = tmpdir("two");
    let gw = Gateway::start(
        bin(),
        &["--config", two_model_config(&dir).to_str().unwrap()],
        &[],
    );
    gw.wait_ready();

    let (s, models) = {
        let r = client().get(gw.url("/v1/models")).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(s, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["stories", "smol"]);

    // Greedy answers from both models.
    let (s, r) = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "smol", "temperature": 0, "max_tokens": 20,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    );
    assert_eq!(s, 200, "{r}");
    assert!(
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{r}"
    );
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "smol");
    let (s, r) = post(
        &gw,
        "/v1/completions",
        &json!({"model": "stories", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12}),
    );
    assert_eq!(s, 200, "{r}");
    assert!(
        r["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(", there was a little girl named Lily."),
        "{r}"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 12);

    // Streaming and non-streaming agree for the same seed (sampled, n = 2), on both
    // endpoints and both models.
    for (model, path, body) in [
        (
            "smol",
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Tell me a story."}]}),
        ),
        (
            "stories",
            "/v1/completions",
            json!({"prompt": "The little dog"}),
        ),
        (
            "smol",
            "/v1/completions",
            json!({"prompt": "The best thing about Rust is"}),
        ),
    ] {
        let mut body = body;
        body["model"] = json!(model);
        body["temperature"] = json!(0.9);
        body["seed"] = json!(1234);
        body["max_tokens"] = json!(24);
        body["n"] = json!(2);
        let (s, whole) = post(&gw, path, &body);
        assert_eq!(s, 200, "{whole}");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (events, done) = stream(&gw, path, &body);
        assert!(done, "stream of {model} {path} did not end with [DONE]");
        let texts: Vec<String> = (0..2)
            .map(|i| {
                let (t, f, _) = from_stream(&events, i);
                let c = &whole["choices"][i as usize];
                let want = c["message"]["content"]
                    .as_str()
                    .or(c["text"].as_str())
                    .unwrap();
                assert_eq!(t, want, "{model} {path} choice {i}");
                assert_eq!(f, c["finish_reason"].as_str().unwrap());
                t
            })
            .collect();
        assert_ne!(texts[0], texts[1], "n = 2 gave two identical samples");
        let (_, _, usage) = from_stream(&events, 0);
        assert_eq!(usage.unwrap(), whole["usage"], "{model} {path}");
    }

    // Logprobs: one entry per generated token, top alternatives sorted.
    let (s, r) = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "smol", "temperature": 0, "max_tokens": 6, "logprobs": true, "top_logprobs": 3,
                "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(s, 200, "{r}");
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        r["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let joined: String = lp.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(
        joined,
        r["choices"][0]["message"]["content"].as_str().unwrap()
    );
    for t in lp {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["logprob"], t["logprob"]);
    }

    // Stop strings end the text before the stop string.
    let (_, r) = post(
        &gw,
        "/v1/completions",
        &json!({"model": "stories", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 40, "stop": ["Lily"]}),
    );
    assert_eq!(r["choices"][0]["text"], ", there was a little girl named ");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // Tokenize / detokenize.
    let (s, t) = post(
        &gw,
        "/tokenize",
        &json!({"model": "stories", "prompt": "Once upon a time"}),
    );
    assert_eq!(s, 200);
    assert_eq!(
        t["count"].as_u64().unwrap() as usize,
        t["tokens"].as_array().unwrap().len()
    );
    assert_eq!(t["max_model_len"], 512);
    let (s, d) = post(
        &gw,
        "/detokenize",
        &json!({"model": "stories", "tokens": t["tokens"]}),
    );
    assert_eq!(s, 200);
    assert!(
        d["prompt"].as_str().unwrap().ends_with("Once upon a time"),
        "{d}"
    );
    let (s, t) = post(
        &gw,
        "/tokenize",
        &json!({"model": "smol", "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(s, 200);
    assert!(t["count"].as_u64().unwrap() > 3);

    // Metrics carry both models.
    assert!(gw.metric(r#"switchyard_requests_total{model="smol",outcome="ok"}"#) >= 4.0);
    assert!(gw.metric(r#"switchyard_requests_total{model="stories",outcome="ok"}"#) >= 4.0);
    assert!(gw.metric(r#"switchyard_generation_tokens_total{model="stories"}"#) > 0.0);
    assert!(!gw.log().contains("panicked"));
}

#[test]
fn errors_have_status_and_openai_body() {
    let stories = switchyard_tests::stories_dir();
    let gw = Gateway::start(
        bin(),
        &["--model", stories.to_str().unwrap()],
        &[("SWITCHYARD_SERVER__MAX_BODY_BYTES", "4096")],
    );
    gw.wait_ready();
    let chat = |extra: Value| {
        let mut b =
            json!({"model": "stories260K", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(&gw, "/v1/chat/completions", &b)
    };

    // 400: not JSON.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().unwrap(), 400, &["not valid JSON"]);

    // 422: invalid parameters, with the numbers.
    let (s, b) = chat(json!({"temperature": -0.5}));
    assert_error(s, &b, 422, &["temperature", "-0.5"]);
    assert_eq!(b["error"]["param"], "temperature");
    let (s, b) = chat(json!({"max_tokens": 100000}));
    assert_error(s, &b, 422, &["512", "100000"]);
    let (s, b) = chat(json!({"top_p": 0}));
    assert_error(s, &b, 422, &["top_p"]);
    let (s, b) = chat(json!({"n": 0}));
    assert_error(s, &b, 422, &["n must be"]);
    let (s, b) = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "stories260K", "messages": "hi"}),
    );
    assert_error(s, &b, 422, &["messages"]);
    let (s, b) = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "stories260K"}),
    );
    assert_error(s, &b, 422, &["messages"]);
    let (s, b) = post(
        &gw,
        "/v1/completions",
        &json!({"model": "stories260K", "prompt": [1, 99999]}),
    );
    assert_error(s, &b, 422, &["99999", "512"]);
    let long = "hello ".repeat(600);
    let (s, b) = post(
        &gw,
        "/v1/completions",
        &json!({"model": "stories260K", "prompt": long}),
    );
    assert_error(s, &b, 422, &["512", "prompt is"]);
    let (s, b) = chat(json!({"frequency_penalty": 0.5}));
    assert_error(s, &b, 422, &["frequency_penalty"]);

    // 404: unknown model, unknown route.
    let (s, b) = chat(json!({"model": "gpt-4"}));
    assert_error(s, &b, 404, &["gpt-4", "stories260K"]);
    assert_eq!(b["error"]["code"], "model_not_found");
    let r = client().get(gw.url("/v2/nothing")).send().unwrap();
    assert_eq!(r.status(), 404);

    // 413: body over the configured limit (set through the environment).
    let big = json!({"model": "stories260K", "prompt": "a".repeat(5000)});
    let (s, b) = post(&gw, "/v1/completions", &big);
    assert_error(s, &b, 413, &["4096"]);

    // A failed request leaves the server serving; the request id is echoed and logged.
    let (s, _) = chat(json!({"max_tokens": 3}));
    assert_eq!(s, 200);
    let r = client()
        .post(gw.url("/v1/completions"))
        .header("x-request-id", "test-req-42")
        .json(&json!({"prompt": "Hi", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "test-req-42");
    let body: Value = r.json().unwrap();
    assert_eq!(body["id"], "cmpl-test-req-42");
    std::thread::sleep(Duration::from_millis(100));
    assert!(gw.log().contains("test-req-42"), "{}", gw.log());
    assert!(
        gw.metric(r#"switchyard_requests_total{model="stories260K",outcome="invalid"}"#) >= 9.0
    );
    assert!(!gw.log().contains("panicked"));
}

#[test]
fn not_ready_is_503_until_loaded() {
    let stories = switchyard_tests::stories_dir();
    let gw = Gateway::start(
        bin(),
        &["--model", stories.to_str().unwrap()],
        &[("SWITCHYARD_LOAD_DELAY_MS", "1500")],
    );
    let r = client().get(gw.url("/health")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let (s, b) = post(
        &gw,
        "/v1/completions",
        &json!({"model": "stories260K", "prompt": "x", "max_tokens": 2}),
    );
    assert_error(s, &b, 503, &["loading"]);
    gw.wait_ready();
    let (s, _) = post(
        &gw,
        "/v1/completions",
        &json!({"model": "stories260K", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(s, 200);
}

/// One slot, one waiting place: the third request is refused with 429, and clients that hang
/// up mid-stream free their sequence at once.
#[test]
fn overload_is_429_and_disconnect_frees_the_sequence() {
    let smol = switchyard_tests::smollm2_gguf();
    let gw = Gateway::start(
        bin(),
        &[
            "--model",
            smol.to_str().unwrap(),
            "--max-batch",
            "1",
            "--max-waiting",
            "1",
        ],
        &[],
    );
    gw.wait_ready();
    let name = "SmolLM2-135M-Instruct.Q4_1";
    let long = json!({"model": name, "prompt": "Once upon a time", "max_tokens": 1500,
                      "temperature": 0, "stream": true});
    let c = client();
    // A: running (we have its first token).
    let a = c
        .post(gw.url("/v1/completions"))
        .json(&long)
        .send()
        .unwrap();
    assert_eq!(a.status(), 200);
    let mut a = BufReader::new(a);
    let mut line = String::new();
    a.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    // B: queued behind A.
    let b = c
        .post(gw.url("/v1/completions"))
        .json(&long)
        .send()
        .unwrap();
    assert_eq!(b.status(), 200);
    let t0 = Instant::now();
    while gw.metric(&format!("switchyard_requests_waiting{{model=\"{name}\"}}")) < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "B never waited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // C: no room.
    let r = c
        .post(gw.url("/v1/completions"))
        .json(&long)
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().unwrap();
    assert_error(429, &body, 429, &["overloaded"]);
    assert_eq!(
        gw.metric(&format!("switchyard_requests_running{{model=\"{name}\"}}")),
        1.0
    );

    // Both clients hang up: A mid-decode, B still waiting.
    drop(a);
    drop(b);
    let t0 = Instant::now();
    loop {
        let running = gw.metric(&format!("switchyard_requests_running{{model=\"{name}\"}}"));
        let waiting = gw.metric(&format!("switchyard_requests_waiting{{model=\"{name}\"}}"));
        let slots = gw.metric(&format!(
            "switchyard_kv_cache_slots_in_use{{model=\"{name}\"}}"
        ));
        let cancelled = gw.metric(&format!(
            "switchyard_sequences_cancelled_total{{model=\"{name}\"}}"
        ));
        if running == 0.0 && waiting == 0.0 && slots == 0.0 && cancelled == 2.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "sequences not freed: running {running} waiting {waiting} slots {slots} cancelled {cancelled}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        gw.metric(&format!(
            "switchyard_requests_total{{model=\"{name}\",outcome=\"cancelled\"}}"
        )),
        2.0
    );
    assert_eq!(
        gw.metric(&format!(
            "switchyard_kv_cache_used_bytes{{model=\"{name}\"}}"
        )),
        0.0
    );
    // The slot serves the next request.
    let (s, _) = post(
        &gw,
        "/v1/completions",
        &json!({"model": name, "prompt": "Hi", "max_tokens": 3}),
    );
    assert_eq!(s, 200);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let smol = switchyard_tests::smollm2_gguf();
    // A drain limit far above the stream's length even on a slow, shared CI machine: what is
    // tested is that SIGTERM lets the in-flight stream finish, not how fast the CPU is.
    let dir = tmpdir("sigterm");
    let cfg = dir.join("gateway.toml");
    std::fs::write(&cfg, "[server]\nshutdown_timeout_secs = 300\n").unwrap();
    let mut gw = Gateway::start(
        bin(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--model",
            smol.to_str().unwrap(),
        ],
        &[],
    );
    gw.wait_ready();
    let url = gw.url("/v1/completions");
    let r = client()
        .post(&url)
        .json(
            &json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut rd = BufReader::new(r);
    let mut first = String::new();
    rd.read_line(&mut first).unwrap();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let killed = Instant::now();
    let mut rest = String::new();
    for l in rd.lines() {
        match l {
            Ok(l) => rest.push_str(&l),
            Err(e) => panic!(
                "the stream broke {:.1} s after SIGTERM: {e}\nreceived:\n{rest}\ngateway log:\n{}",
                killed.elapsed().as_secs_f64(),
                gw.log()
            ),
        }
        rest.push('\n');
    }
    assert!(rest.contains("\"completion_tokens\":40"), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let status = gw
        .wait_exit(30)
        .expect("gateway did not exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", gw.log());
}

#[test]
fn concurrent_streams_all_complete_with_batching() {
    let stories = switchyard_tests::stories_dir();
    let gw = Gateway::start(
        bin(),
        &["--model", stories.to_str().unwrap(), "--max-batch", "16"],
        &[],
    );
    gw.wait_ready();
    let clients = 32;
    let per_client = 4;
    let url = gw.url("/v1/completions");
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let c = client();
                let mut ok = 0;
                for j in 0..per_client {
                    let body = json!({"prompt": "Once upon a time", "max_tokens": 48,
                        "temperature": 0.8, "seed": i * 100 + j, "stream": true,
                        "stream_options": {"include_usage": true}});
                    let r = c.post(&url).json(&body).send().unwrap();
                    assert_eq!(r.status(), 200);
                    let (events, done) = sse_events(r);
                    assert!(done);
                    let (_, _, usage) = from_stream(&events, 0);
                    assert!(usage.unwrap()["completion_tokens"].as_u64().unwrap() > 0);
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, clients as usize * per_client as usize);
    let m = |s: &str| gw.metric(s);
    assert_eq!(
        m(r#"switchyard_requests_total{model="stories260K",outcome="ok"}"#),
        (clients * per_client) as f64
    );
    // Continuous batching happened: forward passes carried several sequences on average.
    let seqs = m(r#"switchyard_batch_size_sum{model="stories260K"}"#);
    let steps = m(r#"switchyard_batch_size_count{model="stories260K"}"#);
    assert!(seqs / steps > 2.0, "mean batch {seqs}/{steps}");
    assert_eq!(
        m(r#"switchyard_requests_running{model="stories260K"}"#),
        0.0
    );
}

#[test]
fn openai_python_client_works() {
    let dir = tmpdir("py");
    let gw = Gateway::start(
        bin(),
        &["--config", two_model_config(&dir).to_str().unwrap()],
        &[],
    );
    gw.wait_ready();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/openai_client.py");
    let out = std::process::Command::new(switchyard_tests::venv_python())
        .arg(&script)
        .arg(&gw.base)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{text}\n--- gateway log ---\n{}",
        gw.log()
    );
    assert!(text.contains("openai client: all checks passed"), "{text}");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let dir = tmpdir("badcfg");
    let f = dir.join("bad.toml");
    std::fs::write(&f, "[server]\nprot = 8080\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config", f.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.toml") && err.contains("prot"), "{err}");

    let out = std::process::Command::new(bin())
        .args(["serve", "--port", "0", "--model", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("does not exist"),
        "{err}"
    );

    // A file that exists but is no model: the server stops with the reason.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--port", "0", "--model", junk.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("junk.gguf") && !err.contains("panicked"),
        "{err}"
    );
}
