//! Tokenizers built from GGUF metadata against llama.cpp's own test vectors
//! (vendor/llama.cpp/models/ggml-vocab-*.gguf with .inp/.out, from llama-cpp-python 0.3.36).

use switchyard_engine::gguf::GgufFile;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_tests::*;

fn check(vocab: &str) {
    let dir = vocab_dir();
    let path = dir.join(format!("ggml-vocab-{vocab}.gguf"));
    let g = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.out"))).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<&str> = out.split('\n').collect();
    let mut failures = Vec::new();
    let mut n = 0;
    for (text, want) in texts.iter().zip(&expected) {
        if text.is_empty() && texts.len() > expected.len() {
            continue;
        }
        let want: Vec<u32> = want
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        let got = tok.encode(text, false).unwrap();
        n += 1;
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(n >= 20, "{vocab}: only {n} vectors parsed");
    assert!(
        failures.is_empty(),
        "{vocab}: {} of {n} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_spm() {
    check("llama-spm");
}

#[test]
fn gpt_2() {
    check("gpt-2");
}

#[test]
fn llama_bpe() {
    check("llama-bpe");
}

#[test]
fn starcoder() {
    check("starcoder");
}

#[test]
fn qwen2() {
    check("qwen2");
}
