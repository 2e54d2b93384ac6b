//! AdaptiVocab end to end on the real stories260K files: `vocab build` on a corpus the model
//! wrote itself, `vocab eval` (reduction, exact round trip), `transform adaptivocab` (the
//! model-transform plugin through the plugin host; rows checked against the paper's
//! weighting), `eval perplexity --patch`, and the WebAssembly `adaptivocab` plugin with the
//! patched model swapped into a live gateway as one pipeline unit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reqwest::blocking::Client;
use serde_json::{json, Value};
use switchyard_adaptivocab::Patch;
use switchyard_tests::cli::{clean_error, ok};
use switchyard_tests::gateway::{plugin_dir, Gateway};

const TOKEN: &str = "av-token";

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
    let d = std::env::temp_dir().join(format!("switchyard-av-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn corpus(dir: &Path, n: u64) {
    switchyard_tests::stories_corpus(&bin(), dir, n)
}

fn build(dir: &Path, out: &Path, replace: &str) -> Value {
    let stories = switchyard_tests::stories_dir();
    let o = ok(&run(&[
        "vocab",
        "build",
        "--model",
        s(&stories),
        "--corpus",
        s(&dir.join("train")),
        "--replace",
        replace,
        "--out",
        s(out),
        "--json",
    ]));
    serde_json::from_str(o.trim()).unwrap()
}

fn read_tensor(dir: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

#[test]
fn build_eval_transform_and_serve_a_patch_on_stories260k() {
    let d = tmpdir("e2e");
    corpus(&d, 6);
    let stories = switchyard_tests::stories_dir();
    let patch_path = d.join("patch.json");

    // Build: deterministic, and it saves tokens on the corpus it was built from.
    let summary = build(&d, &patch_path, "24");
    assert_eq!(summary["added"], 24, "{summary}");
    assert!(
        summary["corpus_reduction"].as_f64().unwrap() > 0.05,
        "{summary}"
    );
    let first = std::fs::read(&patch_path).unwrap();
    build(&d, &d.join("again.json"), "24");
    assert_eq!(
        first,
        std::fs::read(d.join("again.json")).unwrap(),
        "not deterministic"
    );
    let patch = Patch::from_json(&first).unwrap();
    assert_eq!(patch.base_vocab_size(), 512);
    assert_eq!(patch.file.removed.len(), 24);

    // Eval on the held-out story: fewer tokens, exact round trip.
    let ev: Value = serde_json::from_str(
        ok(&run(&[
            "vocab",
            "eval",
            "--model",
            s(&stories),
            "--patch",
            s(&patch_path),
            "--file",
            s(&d.join("test")),
            "--json",
        ]))
        .trim(),
    )
    .unwrap();
    assert_eq!(ev["roundtrip_ok"], true, "{ev}");
    assert_eq!(ev["roundtrip_text_exact"], true, "{ev}");
    let (b, p) = (
        ev["base_tokens"].as_u64().unwrap(),
        ev["patched_tokens"].as_u64().unwrap(),
    );
    assert!(p < b, "{ev}");
    assert!((ev["reduction"].as_f64().unwrap() - (1.0 - p as f64 / b as f64)).abs() < 1e-12);

    // Transform: n-gram rows follow the paper's weighting, every other row is copied, the
    // tied embedding gets its own head, and the config records the patch.
    let model = d.join("stories-patched");
    let t = run(&[
        "transform",
        "adaptivocab",
        "--model",
        s(&stories),
        "--patch",
        s(&patch_path),
        "--out",
        s(&model),
        "--json",
    ]);
    let tj: Value = serde_json::from_str(ok(&t).trim()).unwrap();
    assert!(tj["verified"].is_object(), "{tj}");
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["adaptivocab"]["ngrams"], 24);
    assert_eq!(
        std::fs::read(model.join("adaptivocab-patch.json")).unwrap(),
        first
    );
    let (base, shape) = read_tensor(&stories, "model.embed_tokens.weight");
    let (emb, _) = read_tensor(&model, "model.embed_tokens.weight");
    let (head, hshape) = read_tensor(&model, "lm_head.weight");
    assert_eq!(hshape, shape);
    let dim = shape[1];
    let row = |m: &[f32], i: u32| m[i as usize * dim..(i as usize + 1) * dim].to_vec();
    for a in &patch.file.added {
        let n = a.ngram.len() as i32;
        let (mut win, mut wout) = (vec![0f64; dim], vec![0f64; dim]);
        let zin: f64 = (1..=n).map(|i| 2f64.powi(i - n)).sum();
        let zout: f64 = (1..=n).map(|i| 2f64.powi(1 - i)).sum();
        for (k, &t) in a.ngram.iter().enumerate() {
            let i = k as i32 + 1;
            for (j, x) in row(&base, t).iter().enumerate() {
                win[j] += 2f64.powi(i - n) / zin * *x as f64;
                wout[j] += 2f64.powi(1 - i) / zout * *x as f64;
            }
        }
        for j in 0..dim {
            assert!((emb[a.id as usize * dim + j] as f64 - win[j]).abs() < 1e-5);
            assert!((head[a.id as usize * dim + j] as f64 - wout[j]).abs() < 1e-5);
        }
    }
    let added: std::collections::HashSet<u32> = patch.file.added.iter().map(|a| a.id).collect();
    for i in (0..512u32).filter(|i| !added.contains(i)) {
        assert_eq!(row(&emb, i), row(&base, i));
        assert_eq!(row(&head, i), row(&base, i));
    }

    // Bits per byte through the patch (the model reads patched ids).
    let text: String = (1..=6)
        .map(|i| {
            let sub = if i == 6 { "test" } else { "train" };
            std::fs::read_to_string(d.join(sub).join(format!("story{i}.txt"))).unwrap()
        })
        .collect();
    let all = d.join("all.txt");
    std::fs::write(&all, &text).unwrap();
    let ppl = |m: &Path, patch: Option<&Path>| -> Value {
        let mut a = vec![
            "eval",
            "perplexity",
            "--model",
            s(m),
            "--file",
            s(&all),
            "--ctx",
            "64",
            "--json",
        ];
        if let Some(p) = patch {
            a.extend(["--patch", s(p)]);
        }
        serde_json::from_str(ok(&run(&a)).trim()).unwrap()
    };
    let dense = ppl(&stories, None);
    let patched = ppl(&model, Some(&patch_path));
    assert!(
        patched["bits_per_byte"].as_f64().unwrap().is_finite(),
        "{patched}"
    );
    // Fewer tokens cover the text under the patch.
    assert!(
        patched["tokens"].as_f64().unwrap() / patched["bytes"].as_f64().unwrap()
            < dense["tokens"].as_f64().unwrap() / dense["bytes"].as_f64().unwrap(),
        "{dense} {patched}"
    );

    // The gateway: the WebAssembly plugin and the patched model swap in as one unit.
    let pd = plugin_dir(&bin(), "adaptivocab");
    let gw = Gateway::stories_with_plugins(&bin(), &pd, TOKEN, &[], &[]);
    let c = Client::new();
    let prompt = std::fs::read_to_string(d.join("test/story6.txt")).unwrap();
    let prompt: String = prompt.chars().take(300).collect();
    let body = json!({"prompt": prompt, "max_tokens": 40, "temperature": 0});
    let complete = || -> Value {
        c.post(gw.url("/v1/completions"))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let plain = complete();
    let pipeline = "/admin/models/stories260K/pipeline";

    // The patch without its model is refused, and so is a model made for another patch.
    let swap = |stage: Value| {
        gw.admin(
            "PUT",
            pipeline,
            Some(json!({ "tokenizer_patch": stage })),
            Some(TOKEN),
        )
    };
    let (st, v) = swap(json!({"plugin": "adaptivocab", "config_file": s(&patch_path)}));
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs the patched model"),
        "{v}"
    );
    let other = d.join("other.json");
    build(&d, &other, "12");
    let (st, v) =
        swap(json!({"plugin": "adaptivocab", "config_file": s(&other), "model": s(&model)}));
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another patch"),
        "{v}"
    );

    let (st, v) = swap(json!({"plugin": "adaptivocab", "model": s(&model)}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["plugins"][0]["model"], s(&model), "{v}");

    // /tokenize reports both counts; the WebAssembly encode equals the native one.
    let tk: Value = c
        .post(gw.url("/tokenize"))
        .json(&json!({"prompt": prompt}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let base_ids: Vec<u32> = serde_json::from_value(tk["tokens"].clone()).unwrap();
    let wasm_ids: Vec<u32> = serde_json::from_value(tk["patched_tokens"].clone()).unwrap();
    assert_eq!(wasm_ids, patch.encode(&base_ids).unwrap());
    assert_eq!(tk["base_count"], base_ids.len());
    assert_eq!(tk["patched_count"], wasm_ids.len());
    assert!(wasm_ids.len() < base_ids.len(), "{tk}");

    let r = complete();
    let u = &r["usage"];
    let saved = (base_ids.len() - wasm_ids.len()) as u64;
    assert_eq!(u["tokens_saved"]["prompt"], saved, "{r}");
    assert_eq!(u["prompt_tokens"], wasm_ids.len() as u64, "{r}");
    assert_eq!(u["completion_tokens"], 40, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{r}");
    // Streaming detokenizes patched ids: the streamed text equals the whole answer.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let streamed = c
        .post(gw.url("/v1/completions"))
        .json(&sb)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let joined: String = switchyard_tests::sse_events(&streamed)
        .into_iter()
        .filter_map(|v| v["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(joined, text);
    assert!(
        gw.metric(r#"switchyard_tokens_saved_total{kind="prompt",model="stories260K"}"#)
            >= 2.0 * saved as f64
    );

    // Rollback: the base model and no patch again, the same greedy answer as before.
    let (st, v) = gw.admin(
        "POST",
        "/admin/models/stories260K/rollback",
        None,
        Some(TOKEN),
    );
    assert_eq!(st, 200, "{v}");
    let back = complete();
    assert_eq!(back["choices"][0]["text"], plain["choices"][0]["text"]);
    assert!(back["usage"].get("tokens_saved").is_none(), "{back}");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let d = tmpdir("bad");
    let stories = switchyard_tests::stories_dir();
    std::fs::create_dir_all(d.join("train")).unwrap();
    std::fs::write(
        d.join("train/a.txt"),
        "Once upon a time there was a cat. ".repeat(20),
    )
    .unwrap();
    let base = |extra: &[&str]| {
        let mut a = vec!["vocab", "build", "--model", s(&stories), "--out"];
        let out = d.join("p.json");
        let out = s(&out).to_string();
        a.push(&out);
        a.extend_from_slice(extra);
        run(&a)
    };
    clean_error(
        &base(&["--corpus", "/nonexistent/corpus", "--replace", "4"]),
        &["/nonexistent/corpus"],
    );
    clean_error(
        &base(&["--corpus", s(&d.join("train")), "--replace", "0"]),
        &["--replace must be at least 1"],
    );
    clean_error(
        &base(&["--corpus", s(&d.join("train")), "--replace", "100000"]),
        &["only", "can be removed"],
    );
    let ok_build = base(&["--corpus", s(&d.join("train")), "--replace", "4"]);
    ok(&ok_build);

    // A corrupted patch and a patch for another vocabulary name the file.
    std::fs::write(d.join("broken.json"), "{\"format\": 1").unwrap();
    let eval = |m: &Path, p: &Path| {
        run(&[
            "vocab",
            "eval",
            "--model",
            s(m),
            "--patch",
            s(p),
            "--file",
            s(&d.join("train")),
        ])
    };
    clean_error(
        &eval(&stories, &d.join("broken.json")),
        &["broken.json", "not an AdaptiVocab patch file"],
    );
    let smol = switchyard_tests::smollm2_gguf();
    clean_error(
        &eval(&smol, &d.join("p.json")),
        &["p.json", "vocabulary of 512 ids"],
    );
    let t = run(&[
        "transform",
        "adaptivocab",
        "--model",
        s(&stories),
        "--patch",
        s(&d.join("broken.json")),
        "--out",
        s(&d.join("out")),
    ]);
    clean_error(&t, &["broken.json"]);
    assert!(!d.join("out").exists());
    // A gzip file that is not gzip.
    std::fs::write(d.join("train/bad.gz"), b"not gzip").unwrap();
    clean_error(
        &base(&["--corpus", s(&d.join("train")), "--replace", "4"]),
        &["bad.gz", "not a valid gzip file"],
    );
}
