//! The `switchyard` binary end to end: real model files, real process, stdout/stderr/exit code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use switchyard_tests::cli::clean_error;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn stories() -> PathBuf {
    let p = std::env::var_os("SWITCHYARD_STORIES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K")
        });
    assert!(p.exists(), "stories260K not found at {}", p.display());
    p
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run switchyard")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run, expect success, parse stdout as one JSON object.
fn run_json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `switchyard generate --model PATH --prompt x`
fn generate_with(model: &Path) -> Output {
    run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
    ])
}

#[test]
fn generate_prints_only_text_on_stdout() {
    let gguf = stories().join("stories260K.f32.gguf");
    let out = run(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--max-tokens",
        "200",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("Once upon a time, there was a little girl named Lily."),
        "{text}"
    );
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stories().join("reference_greedy.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(text.trim_end_matches('\n'), want["text"].as_str().unwrap());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("generated 200 tokens"), "{err}");
}

#[test]
fn perplexity_json() {
    let d = tmpdir("ppl");
    let text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. ".repeat(30);
    std::fs::write(d.join("t.txt"), text).unwrap();
    let j = run_json(&[
        "eval",
        "perplexity",
        "--model",
        stories().to_str().unwrap(),
        "--file",
        d.join("t.txt").to_str().unwrap(),
        "--ctx",
        "128",
        "--json",
    ]);
    for k in ["ppl", "bits_per_byte", "tokens", "bytes"] {
        assert!(j[k].is_number(), "{k} missing in {j}");
    }
    // Repeated text is easy to predict.
    assert!(j["ppl"].as_f64().unwrap() < 3.0, "{j}");
    // A file too short for two windows is a clear error.
    std::fs::write(d.join("short.txt"), "Once upon a time").unwrap();
    let out = run(&[
        "eval",
        "perplexity",
        "--model",
        stories().to_str().unwrap(),
        "--file",
        d.join("short.txt").to_str().unwrap(),
    ]);
    clean_error(&out, &["needs at least"]);
}

#[test]
fn bench_decode_json() {
    let gguf = stories().join("stories260K.f32.gguf");
    let j = run_json(&[
        "bench",
        "decode",
        "--model",
        gguf.to_str().unwrap(),
        "--batch",
        "3",
        "--threads",
        "2",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(
        j["decode_tok_s"].as_f64().unwrap() > 0.0 && j["prefill_tok_s"].as_f64().unwrap() > 0.0
    );
    assert_eq!(j["batch"], 3);
}

#[test]
fn truncated_and_corrupt_gguf() {
    let d = tmpdir("gguf");
    let bytes = std::fs::read(stories().join("stories260K.f32.gguf")).unwrap();
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = generate_with(&cut);
    clean_error(&out, &["cut.gguf", "truncated"]);

    let junk = d.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model at all").unwrap();
    let out = generate_with(&junk);
    clean_error(&out, &["junk.gguf", "bad magic"]);

    let missing = d.join("missing.gguf");
    let out = generate_with(&missing);
    clean_error(&out, &["missing.gguf", "no such file"]);
}

/// A minimal GGUF with the given architecture and one tensor of GGML type `ty`.
fn tiny_gguf(arch: &str, ty: u32) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, arch);
    s(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(vec![0u8; 4 * 32 * 4]);
    b
}

#[test]
fn unsupported_arch_and_tensor_type() {
    let d = tmpdir("unsupported");
    let p = d.join("gpt2.gguf");
    std::fs::write(&p, tiny_gguf("gpt2", 0)).unwrap();
    clean_error(
        &run(&["generate", "--model", p.to_str().unwrap()]),
        &["gpt2.gguf", "unsupported architecture 'gpt2'"],
    );
    let p = d.join("q5.gguf");
    std::fs::write(&p, tiny_gguf("llama", 6)).unwrap();
    clean_error(
        &run(&["generate", "--model", p.to_str().unwrap()]),
        &["q5.gguf", "unsupported tensor type Q5_0"],
    );
}

#[test]
fn broken_hf_directories() {
    let src = stories();
    // Missing tokenizer.
    let d = tmpdir("notok");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    clean_error(
        &run(&["generate", "--model", d.to_str().unwrap()]),
        &["tokenizer.json", "missing"],
    );
    // Truncated weights.
    let d = tmpdir("cut");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let w = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &w[..w.len() - 1000]).unwrap();
    clean_error(
        &run(&["generate", "--model", d.to_str().unwrap()]),
        &["model.safetensors"],
    );
    // Unsupported element type.
    let d = tmpdir("i32");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let data = vec![0u8; 512 * 64 * 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![512, 64], &data)
        .unwrap();
    safetensors::serialize_to_file(
        [("model.embed_tokens.weight", view)],
        None,
        &d.join("model.safetensors"),
    )
    .unwrap();
    clean_error(
        &run(&["generate", "--model", d.to_str().unwrap()]),
        &["model.safetensors", "unsupported tensor type I32"],
    );
    // Wrong architecture in config.json.
    let d = tmpdir("arch");
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"mamba\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    clean_error(
        &run(&["generate", "--model", d.to_str().unwrap()]),
        &["config.json", "mamba"],
    );
}

#[test]
fn bad_arguments() {
    let gguf = stories().join("stories260K.f32.gguf");
    let g = gguf.to_str().unwrap();
    clean_error(
        &run(&["generate", "--model", g, "--temperature=-1"]),
        &["temperature"],
    );
    clean_error(
        &run(&["generate", "--model", g, "--threads", "0"]),
        &["--threads"],
    );
    clean_error(
        &run(&["generate", "--model", g, "--top-p", "0"]),
        &["top_p"],
    );
}
