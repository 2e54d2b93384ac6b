//! deploy/ against the real thing: a real Prometheus server (Debian's `prometheus` package)
//! scrapes a running gateway and evaluates the alert rules; promtool checks the rules, their
//! unit tests and the /metrics exposition; every metric the dashboard, the rules and the
//! Kubernetes manifests name is one the gateway exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};
use switchyard_tests::gateway::Gateway;

const TOKEN: &str = "deploy-test-token";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn deploy() -> PathBuf {
    switchyard_tests::root().join("deploy")
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn tool(name: &str) -> PathBuf {
    for d in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(d).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} not found: install Debian's prometheus package (scripts/fetch-test-data.sh does)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_ok(cmd: &mut Command, stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut ch = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = stdin.unwrap_or("").to_string();
    let mut si = ch.stdin.take().unwrap();
    let w = std::thread::spawn(move || si.write_all(input.as_bytes()));
    let out = ch.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// stories260K with the test plugins, the admin API on; a few requests of each kind, a
/// plugin pipeline (kv-heap) and a failed swap (a trapping patch), so that every family
/// (plugin calls, traps, failed swaps, latency histograms) has series.
fn exercised_gateway(name: &str) -> Gateway {
    let dir = switchyard_tests::gateway::plugin_dir(bin(), &format!("deploy-{name}"));
    let gw = Gateway::stories_with_plugins(bin(), &dir, TOKEN, &[], &[]);
    let p = "/admin/models/stories260K/pipeline";
    let (s, v) = gw.admin(
        "PUT",
        p,
        Some(json!({"kv_allocator": {"plugin": "kv-heap"},
                    "tokenizer_patch": {"plugin": "faulty-patch", "config": "ok"}})),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = gw.admin(
        "PUT",
        p,
        Some(json!({"tokenizer_patch": {"plugin": "faulty-patch", "config": "trap"}})),
        Some(TOKEN),
    );
    assert_ne!(s, 200, "{v}");
    let c = client();
    for i in 0..4 {
        let r = c
            .post(gw.url("/v1/completions"))
            .json(
                &json!({"prompt": "Once upon a time", "max_tokens": 8, "seed": i,
                          "stream": i % 2 == 1}),
            )
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().unwrap();
    }
    let r = c
        .post(gw.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": -1}))
        .send()
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    gw
}

fn metrics_text(gw: &Gateway) -> String {
    client()
        .get(gw.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// The dashboard, and its queries (and variable definitions).
fn dashboard() -> (Value, Vec<String>) {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/dashboards/switchyard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    (dash, exprs)
}

/// Metric names the exposition defines (histograms and summaries with their suffixes).
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in metrics.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
        }
    }
    names
}

/// Identifiers in a query text that are gateway or process metric names.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let is_id = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        if is_id(b[i]) && (i == 0 || !is_id(b[i - 1]) && b[i - 1] != b'$') {
            let j = (i..b.len()).find(|&j| !is_id(b[j])).unwrap_or(b.len());
            let w = &text[i..j];
            if w.starts_with("switchyard_") || w.starts_with("process_") {
                out.insert(w.to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr` string in a Grafana dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_rules_and_manifests_use_is_exported() {
    let gw = exercised_gateway("names");
    let metrics = metrics_text(&gw);
    let have = exported_names(&metrics);

    let (dash, exprs) = dashboard();
    assert!(exprs.len() >= 25, "only {} queries", exprs.len());
    let mut used: Vec<(String, String)> = Vec::new();
    for e in &exprs {
        let n = names_in(e);
        assert!(!n.is_empty(), "a dashboard query names no metric: {e}");
        used.extend(n.into_iter().map(|n| ("dashboard".to_string(), n)));
    }
    // Every panel has at least one query.
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "panel {} has no query",
                p["title"]
            );
        }
    }
    for f in [
        "prometheus/rules.yml",
        "k8s/base/hpa.yaml",
        "k8s/prometheus-adapter.yaml",
    ] {
        let text = std::fs::read_to_string(deploy().join(f)).unwrap();
        let n = names_in(&text);
        assert!(!n.is_empty(), "{f} names no metric");
        used.extend(n.into_iter().map(|n| (f.to_string(), n)));
    }
    let missing: Vec<_> = used.iter().filter(|(_, n)| !have.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\nexported: {have:?}"
    );
    // And the dashboard covers the families an operator needs.
    let dash_names: BTreeSet<&str> = used
        .iter()
        .filter(|(f, _)| f == "dashboard")
        .map(|(_, n)| n.as_str())
        .collect();
    for want in [
        "switchyard_requests_total",
        "switchyard_time_to_first_token_seconds_bucket",
        "switchyard_inter_token_latency_seconds_bucket",
        "switchyard_e2e_request_latency_seconds_bucket",
        "switchyard_prompt_tokens_total",
        "switchyard_generation_tokens_total",
        "switchyard_tokens_saved_total",
        "switchyard_requests_running",
        "switchyard_requests_waiting",
        "switchyard_kv_cache_reserved_bytes",
        "switchyard_kv_cache_mapped_bytes",
        "switchyard_kv_cache_used_bytes",
        "switchyard_activation_sparsity_ratio",
        "switchyard_plugin_calls_total",
        "switchyard_plugin_traps_total",
        "switchyard_pipeline_swaps_total",
        "switchyard_pipeline_generation",
    ] {
        assert!(
            dash_names.contains(want),
            "the dashboard does not show {want}"
        );
    }
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus instant query; the result vector.
fn query(base: &str, q: &str) -> Vec<Value> {
    let r: Value = match client()
        .get(format!("{base}/api/v1/query?query={}", url_encode(q)))
        .send()
        .and_then(|r| r.json())
    {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    r["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn value(v: &Value) -> f64 {
    v["value"][1].as_str().unwrap().parse().unwrap()
}

#[test]
fn prometheus_scrapes_the_gateway_and_promtool_passes() {
    let promtool = tool("promtool");
    let prometheus = tool("prometheus");
    let rules = deploy().join("prometheus");
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "rules.yml"])
            .current_dir(&rules),
        None,
    );
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "rules.test.yml"])
            .current_dir(&rules),
        None,
    );

    let gw = exercised_gateway("prom");
    let metrics = metrics_text(&gw);
    let lint = run_ok(
        Command::new(&promtool).args(["check", "metrics"]),
        Some(&metrics),
    );
    assert!(lint.trim().is_empty(), "promtool check metrics: {lint}");

    // The compose file's Prometheus configuration, pointed at this gateway, 1 s scrapes.
    let dir = std::env::temp_dir().join(format!("sy-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let target = gw.base.trim_start_matches("http://");
    let compose_cfg = std::fs::read_to_string(rules.join("prometheus.yml")).unwrap();
    assert!(
        compose_cfg.contains("\"gateway:8080\"")
            && compose_cfg.contains("/etc/prometheus/rules.yml")
    );
    let cfg = compose_cfg
        .replace("\"gateway:8080\"", &format!("\"{target}\""))
        .replace(
            "/etc/prometheus/rules.yml",
            rules.join("rules.yml").to_str().unwrap(),
        )
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    let cfg_path = dir.join("prometheus.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    run_ok(
        Command::new(&promtool).args(["check", "config", cfg_path.to_str().unwrap()]),
        None,
    );
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _prom = Prometheus(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // More requests while Prometheus watches, then wait for the scrapes to show them all.
    let c = client();
    for i in 0..3 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .json(
                &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                          "seed": i}),
            )
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let want_ok = gw.metric(r#"switchyard_requests_total{model="stories260K",outcome="ok"}"#);
    assert!(want_ok >= 7.0, "{want_ok}");
    let t0 = Instant::now();
    loop {
        let ok = query(
            &base,
            r#"switchyard_requests_total{job="switchyard",model="stories260K",outcome="ok"}"#,
        );
        if ok.len() == 1 && value(&ok[0]) == want_ok {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "Prometheus never saw {want_ok} ok requests: {ok:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let up = query(&base, r#"up{job="switchyard"}"#);
    assert_eq!(value(&up[0]), 1.0);
    let tokens = query(
        &base,
        r#"switchyard_generation_tokens_total{model="stories260K"}"#,
    );
    assert!(value(&tokens[0]) > 0.0, "{tokens:?}");
    let prompt = query(
        &base,
        r#"switchyard_prompt_tokens_total{model="stories260K"}"#,
    );
    assert!(value(&prompt[0]) > 0.0, "{prompt:?}");
    let invalid = query(
        &base,
        r#"switchyard_requests_total{model="stories260K",outcome="invalid"}"#,
    );
    assert_eq!(value(&invalid[0]), 1.0);
    let ttft = query(
        &base,
        r#"histogram_quantile(0.5, sum by (le) (switchyard_time_to_first_token_seconds_bucket{model="stories260K"}))"#,
    );
    assert!(value(&ttft[0]) > 0.0, "{ttft:?}");

    // Rates need two scrapes: wait for three, with requests between them.
    let t0 = Instant::now();
    loop {
        let n = query(&base, r#"count_over_time(up{job="switchyard"}[1m])"#);
        if n.first().is_some_and(|v| value(v) >= 3.0) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no third scrape");
        let r = c
            .post(gw.url("/v1/completions"))
            .json(&json!({"prompt": "Once", "max_tokens": 4, "stream": true}))
            .send()
            .unwrap();
        r.text().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    // Every dashboard query is valid PromQL that returns data from this gateway (with the
    // dashboard's variables at "All" and a 1-minute rate window).
    let (_, exprs) = dashboard();
    let mut empty = Vec::new();
    for e in &exprs {
        // Grafana's label_values(SERIES, LABEL) for the variables: query SERIES.
        let e = match e.strip_prefix("label_values(") {
            Some(rest) => rest[..rest.rfind(',').unwrap()].to_string(),
            None => e.clone(),
        };
        let q = e
            .replace("$__rate_interval", "1m")
            .replace("$model", ".*")
            .replace("$instance", ".*");
        let r: Value = c
            .get(format!("{base}/api/v1/query?query={}", url_encode(&q)))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(r["status"], "success", "dashboard query {q}: {r}");
        if r["data"]["result"].as_array().is_none_or(|a| a.is_empty()) {
            empty.push(q);
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );

    // The rules loaded and evaluate without errors.
    let t0 = Instant::now();
    loop {
        let r: Value = c
            .get(format!("{base}/api/v1/rules"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let rs: Vec<Value> = r["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert_eq!(rs.len(), 9, "{r}");
        if rs.iter().all(|x| x["health"] == "ok") {
            break;
        }
        assert!(
            rs.iter().all(|x| x["health"] != "err"),
            "a rule fails to evaluate: {r}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "rules not evaluated: {r}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn manifests_and_compose_pass_the_static_checks() {
    // Strict Kubernetes schema validation (kubernetes-validate) plus the cross-reference and
    // compose checks of deploy/check.py.
    let py = switchyard_tests::venv_python();
    let out = run_ok(Command::new(&py).arg(deploy().join("check.py")), None);
    assert!(out.contains("all checks passed"), "{out}");
}

/// The `gateway.toml` block of the Kubernetes ConfigMap.
fn configmap_gateway_toml() -> String {
    let text = std::fs::read_to_string(deploy().join("k8s/base/configmap.yaml")).unwrap();
    let start = text.find("  gateway.toml: |\n").unwrap() + "  gateway.toml: |\n".len();
    let mut out = String::new();
    for l in text[start..].lines() {
        if !l.is_empty() && !l.starts_with("    ") {
            break;
        }
        out.push_str(l.strip_prefix("    ").unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn the_shipped_gateway_configs_serve_with_their_pipelines() {
    // deploy/gateway.toml (compose) and the ConfigMap's config (Kubernetes), with the image's
    // paths pointed at this machine's model and plugins: the gateway accepts them (unknown
    // keys would be errors), loads the model and serves through the configured pipeline.
    let plugins = switchyard_tests::gateway::plugin_dir(bin(), "deploy-cfg");
    let extra = std::env::temp_dir().join(format!("sy-extra-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&extra).unwrap();
    for (name, text) in [
        (
            "compose",
            std::fs::read_to_string(deploy().join("gateway.toml")).unwrap(),
        ),
        ("configmap", configmap_gateway_toml()),
    ] {
        assert!(text.contains("[[models]]"), "{name}: {text}");
        let cfg = text
            .replace(
                "/opt/switchyard/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                switchyard_tests::smollm2_gguf().to_str().unwrap(),
            )
            .replace("/opt/switchyard/plugins", plugins.to_str().unwrap())
            .replace("/etc/switchyard/plugins", extra.to_str().unwrap());
        let f = plugins.join(format!("{name}.gateway.toml"));
        std::fs::write(&f, cfg).unwrap();
        let gw = Gateway::start(bin(), &["--config", f.to_str().unwrap()], &[]);
        gw.wait_ready();
        let card: Value = client()
            .get(gw.url("/v1/models/SmolLM2-135M-Instruct"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let kv = card["pipeline"]["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["stage"] == "kv_allocator")
            .unwrap()
            .clone();
        assert_eq!(kv["name"], "vattention", "{name}: {card}");
        let r: Value = client()
            .post(gw.url("/v1/chat/completions"))
            .json(
                &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                          "temperature": 0, "max_tokens": 12}),
            )
            .send()
            .unwrap()
            .json()
            .unwrap();
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.contains("Paris"), "{name}: {r}");
    }
}
