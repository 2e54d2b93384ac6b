//! Pipelines under load: swaps between the built-in stages and plugins (a WebAssembly tokenizer
//! patch and the kv-heap allocator) while 32 clients stream; failed swaps leave the old generation serving; the admin API's auth.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};
use switchyard_tests::gateway::Gateway;

const TOKEN: &str = "test-admin-token";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn plugin_dir(name: &str) -> PathBuf {
    switchyard_tests::gateway::plugin_dir(bin(), &format!("swap-{name}"))
}

fn admin(
    gw: &Gateway,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    gw.admin(method, path, body, token)
}

fn start(dir: &Path) -> Gateway {
    Gateway::stories_with_plugins(
        bin(),
        dir,
        TOKEN,
        &["--max-batch", "16"],
        &[
            ("SWITCHYARD_SERVER__WASM_CALL_DEADLINE_MS", "300"),
            ("SWITCHYARD_SERVER__WASM_MAX_MEMORY_MB", "32"),
        ],
    )
}

#[test]
fn swaps_under_load_drop_nothing() {
    let dir = plugin_dir("load");
    let gw = start(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let url = gw.url("/v1/completions");
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = client();
                let mut done = Vec::new();
                let mut j = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"prompt": "Once upon a time", "max_tokens": 40,
                        "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
                        "seed": i * 1000 + j});
                    let r = c.post(&url).json(&body).send().unwrap();
                    assert_eq!(r.status(), 200);
                    let generation: u64 = r.headers()["x-switchyard-generation"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let mut text = String::new();
                    let mut tokens = 0;
                    let mut finished = false;
                    let mut got_done = false;
                    for line in BufReader::new(r).lines() {
                        let line = line.unwrap();
                        let Some(d) = line.strip_prefix("data: ") else {
                            continue;
                        };
                        if d == "[DONE]" {
                            got_done = true;
                            break;
                        }
                        let v: Value = serde_json::from_str(d).unwrap();
                        assert!(v.get("error").is_none(), "{v}");
                        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                            tokens = u["completion_tokens"].as_u64().unwrap();
                        }
                        if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
                            text.push_str(c["text"].as_str().unwrap_or(""));
                            finished |= c["finish_reason"].is_string();
                        }
                    }
                    assert!(got_done && finished, "truncated response");
                    done.push((generation, text, tokens));
                    j += 1;
                }
                done
            })
        })
        .collect();

    // 20 swaps back and forth while the clients stream.
    let mut swap_secs = Vec::new();
    let mut last_gen = 1;
    for i in 0..20 {
        // In turn: the WebAssembly identity patch + the kv-heap plugin; built-ins; the static
        // allocator; vAttention (4 KiB pages, so sequences cross many); so every fourth swap
        // goes from static allocation to vAttention under load.
        let none = json!({"plugin": "builtin"});
        let (patch, plugin, config) = match i % 4 {
            0 => (
                json!({"plugin": "faulty-patch", "config": "ok"}),
                "kv-heap",
                "",
            ),
            1 => (none, "builtin", ""),
            2 => (none, "kv-static", ""),
            _ => (none, "vattention", "page_kb = 4\nahead_pages = 2"),
        };
        let t0 = Instant::now();
        let (s, v) = admin(
            &gw,
            "PUT",
            "/admin/models/stories260K/pipeline",
            Some(json!({"tokenizer_patch": patch,
                        "kv_allocator": {"plugin": plugin, "config": config}})),
            Some(TOKEN),
        );
        assert_eq!(s, 200, "{v}");
        swap_secs.push(t0.elapsed().as_secs_f64());
        let g = v["generation"].as_u64().unwrap();
        assert_eq!(g, last_gen + 1);
        assert_eq!(v["plugins"][1]["name"], plugin);
        last_gen = g;
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u64, String, u64)> = clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    // Greedy, same prompt: every generation (either allocator) must give the same text.
    let first = &results[0].1;
    assert!(results.iter().all(|r| &r.1 == first && r.2 == 40));
    let gens: std::collections::BTreeSet<u64> = results.iter().map(|r| r.0).collect();
    assert!(gens.len() >= 10, "requests saw only generations {gens:?}");
    swap_secs.sort_by(f64::total_cmp);
    eprintln!(
        "{} requests over generations {:?}; swap latency median {:.1} ms, max {:.1} ms",
        results.len(),
        gens,
        swap_secs[10] * 1e3,
        swap_secs[19] * 1e3
    );
    assert_eq!(
        gw.metric(r#"switchyard_pipeline_swaps_total{model="stories260K",result="ok"}"#),
        20.0
    );
    assert_eq!(
        gw.metric(r#"switchyard_requests_total{model="stories260K",outcome="ok"}"#),
        results.len() as f64
    );
    // vAttention's page counters reach Prometheus through the ABI 1.1 `page_stats` call:
    // 4 KiB pages, sequences of ~40 tokens crossing several of them.
    let m = |s: &str| {
        gw.metric(&format!(
            r#"switchyard_kv_cache_{s}{{model="stories260K"}}"#
        ))
    };
    assert!(m("pages_mapped_total") > 0.0, "no pages mapped in /metrics");
    assert_eq!(m("page_bytes"), 4096.0);
    assert!(m("map_waits_total") > 0.0);
    assert!(m("map_wait_seconds_total") > 0.0);
}

#[test]
fn failed_swaps_keep_the_old_generation_and_rollback_works() {
    let dir = plugin_dir("bad");
    let gw = start(&dir);
    let p = "/admin/models/stories260K/pipeline";
    let (s, v) = admin(
        &gw,
        "PUT",
        p,
        Some(json!({"kv_allocator": {"plugin": "kv-heap"}})),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["generation"], 2);
    assert_eq!(v["plugins"][1]["sha256"].as_str().unwrap().len(), 64);

    for (body, needle) in [
        (
            json!({"kv_allocator": {"plugin": "faulty-kv", "config": "error"}}),
            "refusing to start",
        ),
        (
            json!({"kv_allocator": {"plugin": "faulty-kv", "config": "panic"}}),
            "panicked: deliberate panic in create",
        ),
        (
            json!({"kv_allocator": {"plugin": "faulty-kv", "config": "panic-acquire"}}),
            "canary",
        ),
        (
            json!({"kv_allocator": {"plugin": "faulty-kv", "config": "bad-kv"}}),
            "returned no K/V",
        ),
        (
            json!({"kv_allocator": {"plugin": "nope"}}),
            "no plugin named \"nope\"",
        ),
        (
            json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "trap"}}),
            "faulty-patch: encode trapped",
        ),
        (
            json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "loop"}}),
            "ran past its deadline of 300ms",
        ),
        (
            json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "grow"}}),
            "past the cap of 32 MiB",
        ),
        (
            json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "init-error"}}),
            "refusing to start",
        ),
        (
            json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "bad-roundtrip"}}),
            "decode(encode(x)) != x",
        ),
        (
            json!({"tokenizer_patch": {"plugin": "kv-heap"}}),
            "not a tokenizer patch",
        ),
        (
            json!({"kv_allocator": {"plugin": "faulty-patch", "config": "ok"}}),
            "not a native one",
        ),
        (
            json!({"kv_allocator": {"plugin": "kv-heap", "config": "x = 1"}}),
            "takes no configuration",
        ),
    ] {
        let (s, v) = admin(&gw, "PUT", p, Some(body), Some(TOKEN));
        assert_eq!(s, 422, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle) && msg.contains("generation 2 is still serving"),
            "{msg}"
        );
        let (s, v) = admin(&gw, "GET", p, None, Some(TOKEN));
        assert_eq!((s, v["generation"].as_u64()), (200, Some(2)));
        let r = client()
            .post(gw.url("/v1/completions"))
            .json(&json!({"prompt": "Hi", "max_tokens": 3}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-switchyard-generation"], "2");
    }
    let (s, v) = admin(
        &gw,
        "PUT",
        p,
        Some(json!({"kv_allocator": {"plugni": "x"}})),
        Some(TOKEN),
    );
    assert_eq!(s, 422, "{v}");

    // Rollback: back to the builtin spec, as generation 3 (failed swaps used no number that serves).
    let (s, v) = admin(
        &gw,
        "POST",
        "/admin/models/stories260K/rollback",
        None,
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plugins"][1]["name"], "builtin");
    assert_eq!(v["previous_generation"], 2);
    let (s, v) = admin(
        &gw,
        "POST",
        "/admin/models/stories260K/rollback",
        None,
        Some(TOKEN),
    );
    assert_eq!(s, 422, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no earlier generation"));

    let (s, v) = admin(&gw, "GET", "/admin/plugins", None, Some(TOKEN));
    assert_eq!(s, 200);
    let names: Vec<&str> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "adaptivocab",
            "faulty-kv",
            "faulty-patch",
            "kv-heap",
            "kv-static",
            "larosa",
            "vattention"
        ]
    );
    // Plugin panics are caught (the default hook still prints them); none in the server.
    assert!(
        !gw.log().contains("panicked at gateway/server"),
        "{}",
        gw.log()
    );
}

#[test]
fn admin_api_needs_the_token() {
    let dir = plugin_dir("auth");
    let gw = start(&dir);
    let p = "/admin/models/stories260K/pipeline";
    let body = json!({"kv_allocator": {"plugin": "kv-heap"}});
    let (s, v) = admin(&gw, "PUT", p, Some(body.clone()), None);
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (s, _) = admin(&gw, "PUT", p, Some(body.clone()), Some("wrong"));
    assert_eq!(s, 403);
    let (s, _) = admin(&gw, "GET", "/admin/plugins", None, None);
    assert_eq!(s, 401);
    let (s, v) = admin(&gw, "GET", p, None, Some(TOKEN));
    assert_eq!((s, v["generation"].as_u64()), (200, Some(1)));
    assert_eq!(
        gw.metric(r#"switchyard_admin_actions_total{action="swap",result="forbidden"}"#),
        1.0
    );

    // Without a configured token the admin API does not exist.
    let stories = switchyard_tests::stories_dir();
    let plain = Gateway::start(bin(), &["--model", stories.to_str().unwrap()], &[]);
    plain.wait_ready();
    let (s, v) = admin(&plain, "GET", "/admin/plugins", None, Some(TOKEN));
    assert_eq!(s, 404, "{v}");
}

fn greedy_text(gw: &Gateway) -> (String, String) {
    let r = client()
        .post(gw.url("/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let g = r.headers()["x-switchyard-generation"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().unwrap();
    (v["choices"][0]["text"].as_str().unwrap().to_string(), g)
}

#[test]
fn a_webassembly_patch_stage_serves_and_is_metered() {
    let dir = plugin_dir("wasm");
    let gw = start(&dir);
    let (base, g) = greedy_text(&gw);
    assert_eq!(g, "1");
    let p = "/admin/models/stories260K/pipeline";
    // A trapping patch fails its swap and is counted as a trap of that attempt.
    let (s, _) = admin(
        &gw,
        "PUT",
        p,
        Some(json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "trap"}})),
        Some(TOKEN),
    );
    assert_eq!(s, 422);
    // The identity patch runs in the request path: same greedy text, calls counted.
    let (s, v) = admin(
        &gw,
        "PUT",
        p,
        Some(
            json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "ok"},
                    "kv_allocator": {"plugin": "kv-heap"}}),
        ),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plugins"][0]["name"], "faulty-patch");
    assert_eq!(v["plugins"][0]["kind"], "tokenizer-patch");
    let gen = v["generation"].as_u64().unwrap().to_string();
    let (text, g) = greedy_text(&gw);
    assert_eq!(g, gen);
    assert_eq!(text, base);
    let calls = |op: &str| {
        gw.metric(&format!(
            r#"switchyard_plugin_calls_total{{generation="{gen}",model="stories260K",op="{op}",outcome="ok",plugin="faulty-patch"}}"#
        ))
    };
    assert!(calls("encode") >= 2.0, "{}", calls("encode"));
    assert!(calls("decode") >= 40.0, "{}", calls("decode"));
    let kv_calls = gw.metric(&format!(
        r#"switchyard_plugin_calls_total{{generation="{gen}",model="stories260K",op="acquire",outcome="ok",plugin="kv-heap"}}"#
    ));
    assert!(kv_calls >= 2.0, "{kv_calls}");
    let traps = gw.metric(
        r#"switchyard_plugin_traps_total{generation="2",model="stories260K",plugin="faulty-patch",reason="trap"}"#,
    );
    assert_eq!(traps, 1.0);
    assert!(gw.metric(r#"switchyard_pipeline_generations_active{model="stories260K"}"#) >= 1.0);
}

#[test]
fn vattention_out_of_memory_fails_only_what_it_must() {
    let dir = plugin_dir("oom");
    let gw = start(&dir);
    let long = |c: &Client| {
        c.post(gw.url("/v1/completions"))
            .json(&json!({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}))
            .send()
            .unwrap()
    };
    let r = long(&client());
    assert_eq!(r.status(), 200);
    let want: Value = r.json().unwrap();
    let want = want["choices"][0]["text"].as_str().unwrap().to_string();
    // 1 MiB of physical KV: 25 page sets of 4 KiB in each of the 10 K/V reservations, 32
    // tokens per page; one 205-token sequence needs 7. Twelve at once cannot all fit.
    let (s, v) = admin(
        &gw,
        "PUT",
        "/admin/models/stories260K/pipeline",
        Some(json!({"kv_allocator": {"plugin": "vattention",
            "config": "page_kb = 4\nbudget_mb = 1\nretain_pages = 0\nahead_pages = 0"}})),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{v}");
    // One at a time, everything fits.
    for _ in 0..3 {
        let r = long(&client());
        assert_eq!(r.status(), 200);
    }
    // Twelve at once: the budget runs out.
    let burst: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..12)
            .map(|_| {
                sc.spawn(|| {
                    let r = long(&client());
                    (r.status().as_u16(), r.json::<Value>().unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = burst.iter().filter(|(s, _)| *s == 200).count();
    let full = burst.iter().filter(|(s, _)| *s == 503).count();
    assert_eq!(ok + full, 12, "{burst:?}");
    assert!(ok >= 1 && full >= 1, "ok {ok}, out of memory {full}");
    for (s, v) in &burst {
        if *s == 200 {
            // Nothing another sequence did corrupted this one.
            assert_eq!(v["choices"][0]["text"], want.as_str());
        } else {
            assert_eq!(v["error"]["code"], "kv_cache_exhausted", "{v}");
            let m = v["error"]["message"].as_str().unwrap();
            assert!(m.contains("budget exhausted") && m.contains("retry"), "{m}");
        }
    }
    // Served on, with the same text.
    let r = long(&client());
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["choices"][0]["text"], want.as_str());
}

#[test]
fn tokens_saved_by_a_patch_are_reported_in_usage_and_metrics() {
    // A patch that reads "▁Once ▁upon" (ids 403 407 of stories260K) as the byte token <0xFF>
    // (258, never produced for valid UTF-8): each occurrence saves one prompt token.
    let dir = plugin_dir("saved");
    let gw = start(&dir);
    let prompt = "Once upon a time there was a cat. Once upon a time";
    let c = client();
    let tok: Value = c
        .post(gw.url("/tokenize"))
        .json(&json!({"prompt": prompt}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<u64> = tok["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let pairs = ids.windows(2).filter(|w| w == &[403, 407]).count();
    assert_eq!(pairs, 2, "{ids:?}");
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0});
    let complete = || -> Value {
        c.post(gw.url("/v1/completions"))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let plain = complete();
    assert!(plain["usage"].get("tokens_saved").is_none(), "{plain}");

    let (s, v) = admin(
        &gw,
        "PUT",
        "/admin/models/stories260K/pipeline",
        Some(json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "merge 403 407 258"}})),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{v}");
    let r = complete();
    let u = &r["usage"];
    // prompt_tokens counts what the model read: two pairs merged.
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap(),
        ids.len() as u64 - 2,
        "{r}"
    );
    assert_eq!(u["tokens_saved"]["prompt"], 2, "{r}");
    let completion_saved = u["tokens_saved"]["completion"].as_u64().unwrap();
    // Streaming reports the same.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let text = c
        .post(gw.url("/v1/completions"))
        .json(&sbody)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let usage: Value = switchyard_tests::sse_events(&text)
        .into_iter()
        .find(|v| !v["usage"].is_null())
        .unwrap()["usage"]
        .clone();
    assert_eq!(usage["tokens_saved"]["prompt"], 2, "{usage}");
    assert_eq!(
        usage["tokens_saved"]["completion"].as_u64().unwrap(),
        completion_saved
    );
    assert_eq!(
        gw.metric(r#"switchyard_tokens_saved_total{kind="prompt",model="stories260K"}"#),
        4.0
    );
    assert_eq!(
        gw.metric(r#"switchyard_tokens_saved_total{kind="completion",model="stories260K"}"#),
        2.0 * completion_saved as f64
    );
}
