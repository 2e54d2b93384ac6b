//! LaRoSA end to end on stories260K: calibration, the rotated model's equivalence at
//! sparsity 0, sparsity through the larosa plugin (rotated and plain top-k), clear errors on
//! bad input, and live swaps of the sparsity level under load in a real gateway.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_tests::cli::{clean_error, ok};
use switchyard_tests::gateway::Gateway;

const TOKEN: &str = "larosa-token";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run switchyard")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-larosa-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Calibrate stories260K on a corpus it sampled; returns (rotation path, held-out file).
fn calibrated(dir: &Path) -> (PathBuf, PathBuf) {
    switchyard_tests::stories_corpus(&bin(), dir, 6);
    let rot = dir.join("rot.safetensors");
    let stories = switchyard_tests::stories_dir();
    let out = ok(&run(&[
        "calibrate",
        "larosa",
        "--model",
        s(&stories),
        "--text",
        s(&dir.join("train")),
        "--tokens",
        "2048",
        "--window",
        "256",
        "--out",
        s(&rot),
        "--json",
    ]));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["layers"], 5);
    assert_eq!(v["dim"], 64);
    assert!(v["tokens"].as_u64().unwrap() >= 1500, "{v}");
    assert!(v["max_orthogonality_error"].as_f64().unwrap() < 1e-4, "{v}");
    // The eigenvalues are sorted, so the top half of the directions holds more than half.
    assert!(v["energy_in_top_half"].as_f64().unwrap() > 0.5, "{v}");
    (rot, dir.join("test/story6.txt"))
}

fn ppl(file: &Path, extra: &[&str]) -> f64 {
    let stories = switchyard_tests::stories_dir();
    let mut args = vec![
        "eval",
        "perplexity",
        "--model",
        s(&stories),
        "--file",
        s(file),
        "--ctx",
        "64",
        "--json",
    ];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_str(ok(&run(&args)).trim()).unwrap();
    v["ppl"].as_f64().unwrap()
}

#[test]
fn calibrate_rotate_sparsify_and_refuse_bad_input() {
    let dir = tmpdir("cal");
    let (rot, held_out) = calibrated(&dir);
    let r = s(&rot);
    let dense = ppl(&held_out, &[]);
    // Sparsity 0: the rotated model, through the engine and through the plugin, and the
    // plugin on the plain model, all compute the dense model's function.
    for extra in [
        vec!["--rotation", r],
        vec!["--rotation", r, "--linear", "sparsity = 0"],
        vec!["--linear", "sparsity = 0\nstorage = f32"],
    ] {
        let p = ppl(&held_out, &extra);
        assert!(
            (p - dense).abs() <= 1e-3 * dense,
            "{extra:?}: ppl {p} vs dense {dense}"
        );
    }
    // Sparsity costs quality, more at 0.5 than at 0.25, rotated or not.
    for rotation in [true, false] {
        let mut last = dense;
        for sp in ["0.25", "0.5"] {
            let cfg = format!("sparsity = {sp}");
            let mut extra = vec!["--linear", cfg.as_str()];
            if rotation {
                extra.extend_from_slice(&["--rotation", r]);
            }
            let p = ppl(&held_out, &extra);
            assert!(
                p > last * 0.999,
                "rotation {rotation} s={sp}: {p} after {last}"
            );
            last = p;
        }
    }
    // q8 column storage stays close to f32 at the same sparsity.
    let f = ppl(&held_out, &["--rotation", r, "--linear", "sparsity = 0.25"]);
    let q = ppl(
        &held_out,
        &["--rotation", r, "--linear", "sparsity = 0.25\nstorage = q8"],
    );
    assert!((q - f).abs() < 0.05 * f, "q8 {q} vs f32 {f}");

    // Bad inputs: clear errors naming the file or the setting, never a panic.
    let stories = switchyard_tests::stories_dir();
    let missing = dir.join("nope");
    clean_error(
        &run(&[
            "calibrate",
            "larosa",
            "--model",
            s(&stories),
            "--text",
            s(&missing),
            "--out",
            s(&dir.join("x.safetensors")),
        ]),
        &["nope", "No such file"],
    );
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a rotation").unwrap();
    let t = held_out.to_str().unwrap();
    for (args, needles) in [
        (
            vec!["--rotation", s(&junk)],
            vec!["junk.safetensors", "safetensors"],
        ),
        (
            vec!["--linear", "sparsity = 2"],
            vec!["sparsity", "[0, 0.99]"],
        ),
        (
            vec!["--linear", "colour = red"],
            vec!["unknown key", "colour"],
        ),
    ] {
        let mut a = vec![
            "eval",
            "perplexity",
            "--model",
            s(&stories),
            "--file",
            t,
            "--ctx",
            "64",
        ];
        a.extend_from_slice(&args);
        clean_error(&run(&a), &needles);
    }
    // A rotation of another shape (the test rotation has 5 layers of 64; a hand-made one
    // of 2 × 16 does not fit).
    let other = dir.join("other.safetensors");
    let mut cal = switchyard_engine::larosa::Calibrator::new(2, 16);
    cal.add(&[
        (0..64).map(|i| i as f32).collect(),
        (0..64).map(|i| (i * 7 % 13) as f32).collect(),
    ]);
    cal.finish(0.01, &mut |_, _| {})
        .unwrap()
        .save(&other)
        .unwrap();
    let mut a = vec![
        "eval",
        "perplexity",
        "--model",
        s(&stories),
        "--file",
        t,
        "--ctx",
        "64",
    ];
    a.extend_from_slice(&["--rotation", s(&other)]);
    clean_error(&run(&a), &["2 layers of width 16", "5 layers of width 64"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn metric(gw: &Gateway, name: &str) -> f64 {
    let body = reqwest::blocking::get(gw.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    body.lines()
        .find(|l| l.starts_with(name) && l.contains("stories260K"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[test]
fn sparsity_swaps_under_load_drop_nothing() {
    let dir = tmpdir("swap");
    let (rot, _) = calibrated(&dir);
    let plugins = switchyard_tests::gateway::plugin_dir(&bin(), "larosa-swap");
    let gw = Gateway::stories_with_plugins(&bin(), &plugins, TOKEN, &["--max-batch", "8"], &[]);
    let greedy = |gw: &Gateway| -> String {
        let r = reqwest::blocking::Client::new()
            .post(gw.url("/v1/completions"))
            .json(&json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let dense_text = greedy(&gw);

    let stop = Arc::new(AtomicBool::new(false));
    let url = gw.url("/v1/completions");
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(120))
                    .build()
                    .unwrap();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"prompt": "Once upon a time", "max_tokens": 32,
                        "temperature": 0.8, "seed": i * 1000 + n, "stream": true});
                    let r = c.post(&url).json(&body).send().unwrap();
                    assert_eq!(r.status(), 200);
                    let (mut done, mut finished) = (false, false);
                    for line in BufReader::new(r).lines() {
                        let line = line.unwrap();
                        let Some(d) = line.strip_prefix("data: ") else {
                            continue;
                        };
                        if d == "[DONE]" {
                            done = true;
                            break;
                        }
                        let v: Value = serde_json::from_str(d).unwrap();
                        assert!(v.get("error").is_none(), "{v}");
                        if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
                            finished |= c["finish_reason"].is_string();
                        }
                    }
                    assert!(done && finished, "truncated response");
                    n += 1;
                }
                n
            })
        })
        .collect();

    let swap = |spec: Value| -> Value {
        let (st, v) = gw.admin(
            "PUT",
            "/admin/models/stories260K/pipeline",
            Some(spec),
            Some(TOKEN),
        );
        assert_eq!(st, 200, "{v}");
        v
    };
    let larosa = |sp: &str| {
        json!({"linear_kernels": {"plugin": "larosa", "config": format!("sparsity = {sp}"),
                                  "rotation": s(&rot)}})
    };
    for sp in ["0.25", "0.5", "0.4", "0"] {
        let v = swap(larosa(sp));
        let stage = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["stage"] == "linear_kernels")
            .unwrap()
            .clone();
        assert_eq!(stage["name"], "larosa", "{v}");
        assert_eq!(stage["rotation"], s(&rot), "{v}");
        let want: f64 = sp.parse().unwrap();
        assert!((metric(&gw, "switchyard_activation_sparsity_ratio") - want).abs() < 1e-9);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Unrotated top-k (TEAL-style) and back to the built-in dense products.
    swap(json!({"linear_kernels": {"plugin": "larosa", "config": "sparsity = 0.4"}}));
    std::thread::sleep(Duration::from_millis(300));
    swap(json!({"linear_kernels": {"plugin": "builtin"}}));
    assert_eq!(metric(&gw, "switchyard_activation_sparsity_ratio"), 0.0);
    stop.store(true, Ordering::Relaxed);
    let served: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(served >= 8, "only {served} requests finished");
    assert_eq!(greedy(&gw), dense_text, "dense again after the swaps");

    // Refused swaps leave the current generation serving.
    for (spec, needle) in [
        (
            json!({"linear_kernels": {"plugin": "larosa", "config": "sparsity = 7"}}),
            "sparsity",
        ),
        (
            json!({"linear_kernels": {"plugin": "larosa", "rotation": "/nonexistent/rot.safetensors"}}),
            "rot.safetensors",
        ),
        (
            json!({"kv_allocator": {"plugin": "builtin", "rotation": s(&rot)}}),
            "only the linear_kernels stage",
        ),
    ] {
        let (st, v) = gw.admin(
            "PUT",
            "/admin/models/stories260K/pipeline",
            Some(spec),
            Some(TOKEN),
        );
        assert!((400..500).contains(&st), "{st} {v}");
        assert!(v.to_string().contains(needle), "{needle}: {v}");
    }
    assert_eq!(greedy(&gw), dense_text);
    drop(gw);
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&plugins);
}
