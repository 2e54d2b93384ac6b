//! Gstack end to end: `switchyard transform gstack` runs the gstack plugin through the plugin
//! host (packed with manifest and sha256, ABI handshake) on the real stories260K files, the
//! grown model loads in the engine and serves through a real gateway, and the planner
//! reproduces the paper's examples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reqwest::blocking::Client;
use serde_json::{json, Value};
use switchyard_tests::cli::{clean_error, ok};
use switchyard_tests::gateway::Gateway;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

fn run(args: &[&str]) -> Output {
    let lib = bin().parent().unwrap().join("libswitchyard_gstack.so");
    assert!(
        lib.exists(),
        "{} is missing: run `cargo build --workspace --release` first (scripts/test.sh does)",
        lib.display()
    );
    Command::new(bin())
        .args(args)
        .output()
        .expect("run switchyard")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-gstack-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn grow(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "transform",
        "gstack",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// name → (dtype, shape, bytes) of every tensor of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

fn layer_params(t: &BTreeMap<String, (String, Vec<usize>, Vec<u8>)>, layer: usize) -> usize {
    let p = format!("model.layers.{layer}.");
    t.iter()
        .filter(|(n, _)| n.starts_with(&p))
        .map(|(_, v)| v.1.iter().product::<usize>())
        .sum()
}

/// Nothing but `keep` left in `dir` (no partial output).
fn only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, keep, "leftovers in {}", dir.display());
}

#[test]
fn grown_stories_repeats_layers_bit_for_bit_and_serves() {
    let stories = switchyard_tests::stories_dir();
    let d = tmpdir("x4");
    let out = d.join("x4");
    let o = grow(&stories, &out, &["--factor", "4", "--json"]);
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(s["summary"], "G_stack x4: 5 -> 20 layers");
    assert_eq!(s["verified"]["layers"], 20);

    let input = tensors(&stories.join("model.safetensors"));
    let grown = tensors(&out.join("model.safetensors"));
    let l = 5;
    // Layer k·L + j is layer j, bit for bit; every other tensor is copied unchanged.
    assert_eq!(grown.len(), (input.len() - 2) * 4 + 2);
    for (name, v) in &grown {
        let src = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (i, suffix) = rest.split_once('.').unwrap();
                let i: usize = i.parse().unwrap();
                assert!(i < 4 * l, "{name}");
                format!("model.layers.{}.{suffix}", i % l)
            }
            None => name.clone(),
        };
        assert_eq!(Some(v), input.get(&src), "{name} is not {src}");
    }
    // Parameter counts: the input plus (g − 1) copies of its layers.
    let n_in: usize = input.values().map(|v| v.1.iter().product::<usize>()).sum();
    let per_layer = layer_params(&input, 0);
    assert_eq!(s["params"], n_in + 3 * l * per_layer);
    assert_eq!(s["verified"]["params"], n_in + 3 * l * per_layer);

    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 20);
    assert_eq!(cfg["hidden_size"], 64);
    assert_eq!(cfg["tie_word_embeddings"], true);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(stories.join(f)).unwrap(),
            "{f} is carried over"
        );
    }
    let prov: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("switchyard-transform.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(prov["plugin"]["name"], "gstack");
    assert_eq!(prov["plugin"]["config"], "factor = 4");

    // The grown model serves through a real gateway.
    let gw = Gateway::start(&bin(), &["--model", out.to_str().unwrap()], &[]);
    gw.wait_ready();
    let r = Client::new()
        .post(gw.url("/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["model"], "x4");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty(), "{v}");
    let models: Value = Client::new()
        .get(gw.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "x4");
}

#[test]
fn identity_from_gguf_reproduces_the_reference_model() {
    // g = 1 from the GGUF: the written directory is the Hugging Face model bit for bit (q/k
    // un-permuted from llama.cpp's layout), and it generates the reference text.
    let stories = switchyard_tests::stories_dir();
    let d = tmpdir("g1");
    let out = d.join("g1");
    ok(&grow(
        &stories.join("stories260K.f32.gguf"),
        &out,
        &["--factor", "1"],
    ));
    assert_eq!(
        tensors(&out.join("model.safetensors")),
        tensors(&stories.join("model.safetensors"))
    );
    let o = Command::new(bin())
        .args([
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--max-tokens",
            "200",
        ])
        .output()
        .unwrap();
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(stories.join("reference_greedy.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ok(&o).trim_end_matches('\n'),
        want["text"].as_str().unwrap()
    );
    // The tokenizer built from the GGUF metadata: same BOS/EOS as the Hugging Face files.
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["bos_token"], "<s>");
    assert_eq!(tc["eos_token"], "</s>");
    assert_eq!(tc["add_bos_token"], true);

    // Grown from the GGUF = grown from the safetensors, and bf16 output rounds every tensor.
    let a = d.join("a");
    let b = d.join("b");
    ok(&grow(
        &stories.join("stories260K.f32.gguf"),
        &a,
        &["--factor", "2"],
    ));
    ok(&grow(&stories, &b, &["--factor", "2", "--dtype", "bf16"]));
    let (ta, tb) = (
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for (n, (dt, shape, bytes)) in &tb {
        assert_eq!(dt, "BF16", "{n}");
        let f = &ta[n];
        assert_eq!(&f.1, shape);
        for (i, h) in bytes.chunks_exact(2).enumerate() {
            let x = f32::from_le_bytes(f.2[4 * i..4 * i + 4].try_into().unwrap());
            let y = f32::from_bits((u16::from_le_bytes([h[0], h[1]]) as u32) << 16);
            assert!((x - y).abs() <= x.abs() / 128.0, "{n}[{i}]: {x} vs {y}");
        }
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    ok(&Command::new(bin())
        .args([
            "generate",
            "--model",
            b.to_str().unwrap(),
            "--max-tokens",
            "8",
        ])
        .output()
        .unwrap());
}

#[test]
fn target_layer_count_appends_the_top_layers() {
    let stories = switchyard_tests::stories_dir();
    let d = tmpdir("t12");
    let out = d.join("t12");
    let s = ok(&grow(&stories, &out, &["--layers", "12"]));
    assert!(s.contains("2 full copies + the last 2"), "{s}");
    let t = tensors(&out.join("model.safetensors"));
    let input = tensors(&stories.join("model.safetensors"));
    for (i, j) in [(0, 0), (4, 4), (5, 0), (9, 4), (10, 3), (11, 4)] {
        let name = |l: usize| format!("model.layers.{l}.mlp.down_proj.weight");
        assert_eq!(
            t[&name(i)],
            input[&name(j)],
            "layer {i} should be layer {j}"
        );
    }
    assert!(!t.contains_key("model.layers.12.mlp.down_proj.weight"));
    // Fewer layers than the model is not growth.
    let o = grow(&stories, &d.join("t3"), &["--layers", "3"]);
    clean_error(&o, &["Gstack only grows"]);
}

#[test]
fn bad_input_is_refused_without_partial_output() {
    let stories = switchyard_tests::stories_dir();
    let d = tmpdir("bad");

    // g < 1
    for g in ["0", "-2"] {
        let o = grow(&stories, &d.join("g"), &["--factor", g]);
        clean_error(&o, &["growth factor must be at least 1"]);
    }
    only(&d, &[]);

    // An output that exists is kept unless --force, and replaced whole with it.
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = grow(&stories, &out, &["--factor", "2"]);
    clean_error(&o, &["already exists", "--force"]);
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    ok(&grow(&stories, &out, &["--factor", "2", "--force"]));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").exists());
    only(&d, &["out"]);

    // A truncated input: the error names the file; nothing is written.
    let trunc = d.join("trunc-in");
    std::fs::create_dir(&trunc).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(stories.join(f), trunc.join(f)).unwrap();
    }
    let full = std::fs::read(stories.join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    let o = grow(&trunc, &d.join("t-out"), &["--factor", "2"]);
    clean_error(&o, &["model.safetensors", "truncated"]);
    let gguf = std::fs::read(stories.join("stories260K.f32.gguf")).unwrap();
    std::fs::write(d.join("trunc.gguf"), &gguf[..gguf.len() - 1000]).unwrap();
    let o = grow(&d.join("trunc.gguf"), &d.join("t-out"), &["--factor", "2"]);
    clean_error(&o, &["trunc.gguf"]);
    only(&d, &["out", "trunc-in", "trunc.gguf"]);

    // An unknown architecture.
    let arch = d.join("arch");
    std::fs::create_dir(&arch).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(stories.join("config.json")).unwrap())
            .unwrap();
    cfg["model_type"] = json!("gpt2");
    std::fs::write(arch.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        stories.join("model.safetensors"),
        arch.join("model.safetensors"),
    )
    .unwrap();
    let o = grow(&arch, &d.join("a-out"), &["--factor", "2"]);
    clean_error(&o, &["unsupported architecture 'gpt2'"]);

    // A missing input, an unknown output type, a conflicting request.
    let o = grow(&d.join("nope"), &d.join("n-out"), &[]);
    clean_error(&o, &["nope", "no such file"]);
    let o = grow(&stories, &d.join("q-out"), &["--dtype", "q4"]);
    clean_error(&o, &["--dtype q4"]);
    let o = grow(
        &stories,
        &d.join("c-out"),
        &["--factor", "2", "--layers", "9"],
    );
    assert_eq!(o.status.code(), Some(2), "clap refuses conflicting flags");
    only(&d, &["arch", "out", "trunc-in", "trunc.gguf"]);
}

#[test]
fn planner_reproduces_the_paper_examples() {
    let plan = |n: &str, d: &str| -> Value {
        let o = run(&["gstack", "plan", "--params", n, "--tokens", d, "--json"]);
        serde_json::from_str(&ok(&o)).unwrap()
    };
    // Llama2-7B on 2T tokens → about 11.1B; 70B on 2T → about 42.5B (METHODS.md).
    let a = plan("7B", "2T");
    let g = a["growth_tokens"].as_f64().unwrap();
    assert!((g / 11.1e9 - 1.0).abs() < 0.005, "{a}");
    assert_eq!(a["small_params"].as_f64().unwrap(), 7e9 / 4.0);
    let b = plan("70e9", "2e12");
    let g = b["growth_tokens"].as_f64().unwrap();
    assert!((g / 42.5e9 - 1.0).abs() < 0.005, "{b}");
    // Bigger targets grow later.
    let c = plan("410M", "100B");
    assert!(c["growth_tokens"].as_f64().unwrap() < g);
    let text = ok(&run(&[
        "gstack", "plan", "--params", "7B", "--tokens", "2T",
    ]));
    assert!(text.contains("11.1 B"), "{text}");
    let o = run(&["gstack", "plan", "--params", "seven", "--tokens", "2T"]);
    clean_error(&o, &["--params", "not a number"]);
    let o = run(&["gstack", "plan", "--params", "7B", "--tokens", "0"]);
    clean_error(&o, &["--tokens", "greater than 1"]);
}
