//! stories260K: llama2.c's exact greedy text from BOS, in both formats (the GGUF keeps
//! interleaved RoPE pairs, the safetensors directory uses rotate-half), and logits against
//! transformers' reference.

use switchyard_engine::forward::SeqChunk;
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::{FinishReason, GenerateRequest};
use switchyard_tests::*;

fn reference() -> (Vec<u32>, String) {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stories_dir().join("reference_greedy.json")).unwrap(),
    )
    .unwrap();
    let key = ["generated_ids", "ids", "tokens", "output_ids"]
        .into_iter()
        .find(|k| j[k].is_array())
        .expect("ids in reference_greedy.json");
    let ids = j[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (ids, j["text"].as_str().unwrap().to_string())
}

fn greedy_from_bos(path: &std::path::Path, threads: usize) -> (Vec<u32>, String) {
    let mut e = load(path, threads, 1);
    let prompt = e.encode_prompt("").unwrap();
    assert_eq!(prompt, vec![1], "empty prompt starts from BOS");
    let req = GenerateRequest {
        prompt,
        max_tokens: 200,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let mut streamed = String::new();
    let out = e.generate(&req, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(streamed, out.text, "streamed text equals the final text");
    (out.tokens, out.text)
}

#[test]
fn gguf_greedy_matches_llama2c() {
    let (ids, text) = reference();
    for threads in [1, 2] {
        let (got_ids, got_text) =
            greedy_from_bos(&stories_dir().join("stories260K.f32.gguf"), threads);
        assert_eq!(got_ids, ids[ids.len() - 200..]);
        assert_eq!(got_text, text);
    }
}

#[test]
fn safetensors_greedy_matches_llama2c() {
    let (ids, text) = reference();
    let (got_ids, got_text) = greedy_from_bos(&stories_dir(), 2);
    assert_eq!(got_ids, ids[ids.len() - 200..]);
    assert_eq!(got_text, text);
}

/// Full-sequence logits (prefill of [BOS]+200 tokens) against transformers fp32 logits.
#[test]
fn logits_match_transformers_reference() {
    let bytes = std::fs::read(stories_dir().join("reference_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = st
        .names()
        .into_iter()
        .find(|n| n.contains("logits"))
        .unwrap()
        .to_string();
    let t = st.tensor(&name).unwrap();
    let want: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (ids, _) = reference();
    let mut input = vec![1u32];
    input.extend_from_slice(&ids[ids.len() - 200..]);
    for path in [stories_dir(), stories_dir().join("stories260K.f32.gguf")] {
        let mut e = load(&path, 2, 1);
        let slot = e.kv.acquire().unwrap();
        // Prefill in uneven chunks to exercise chunked prefill against the cache.
        let mut got = Vec::new();
        let mut pos = 0;
        for len in [7, 64, 130] {
            let sc = SeqChunk {
                slot,
                pos,
                tokens: &input[pos..pos + len],
                logits_from: 0,
            };
            got.extend_from_slice(e.fwd.forward(&e.model, e.kv.as_mut(), &[sc]).unwrap());
            pos += len;
        }
        assert_eq!(got.len(), want.len());
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-3,
            "{}: max |logit diff| {max_diff}",
            path.display()
        );
    }
}

/// Several sequences decoded in one batch give the same tokens as each alone.
#[test]
fn batched_decode_equals_single() {
    let path = stories_dir().join("stories260K.f32.gguf");
    let mut e = load(&path, 2, 4);
    let prompts: Vec<Vec<u32>> = ["Once upon a time", "The cat", "Lily and Ben went", ""]
        .iter()
        .map(|p| e.encode_prompt(p).unwrap())
        .collect();
    let single: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let req = GenerateRequest {
                prompt: p.clone(),
                max_tokens: 40,
                sampling: SamplingParams::default(),
                stop: vec![],
            };
            e.generate(&req, &mut |_| {}).unwrap().tokens
        })
        .collect();
    let slots: Vec<usize> = prompts.iter().map(|_| e.kv.acquire().unwrap()).collect();
    let vocab = e.model.cfg.vocab_size;
    // Prefill all prompts in one batch, then decode all together.
    let chunks: Vec<SeqChunk> = slots
        .iter()
        .zip(&prompts)
        .map(|(&s, p)| SeqChunk::last_logits(s, 0, p))
        .collect();
    let logits = e
        .fwd
        .forward(&e.model, e.kv.as_mut(), &chunks)
        .unwrap()
        .to_vec();
    let mut next: Vec<u32> = (0..prompts.len())
        .map(|i| switchyard_engine::sampling::argmax(&logits[i * vocab..(i + 1) * vocab]))
        .collect();
    let mut outs: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
    for step in 0..40 {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        for (o, t) in outs.iter_mut().zip(&next) {
            o.push(*t);
        }
        if step == 39 {
            break;
        }
        let chunks: Vec<SeqChunk> = (0..prompts.len())
            .map(|i| SeqChunk::last_logits(slots[i], prompts[i].len() + step, &toks[i]))
            .collect();
        let logits = e.fwd.forward(&e.model, e.kv.as_mut(), &chunks).unwrap();
        for (i, n) in next.iter_mut().enumerate() {
            *n = switchyard_engine::sampling::argmax(&logits[i * vocab..(i + 1) * vocab]);
        }
    }
    for (i, s) in single.iter().enumerate() {
        let n = s.len();
        assert_eq!(&outs[i][..n], &s[..], "sequence {i}");
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let mut e = load(&stories_dir(), 2, 1);
    let run = |e: &mut switchyard_engine::Engine, seed| {
        let req = GenerateRequest {
            prompt: e.encode_prompt("Once upon a time").unwrap(),
            max_tokens: 60,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 40,
                top_p: 0.9,
                seed,
            },
            stop: vec![],
        };
        e.generate(&req, &mut |_| {}).unwrap().text
    };
    let a = run(&mut e, 7);
    assert_eq!(a, run(&mut e, 7));
    assert_ne!(a, run(&mut e, 8));
}

#[test]
fn stop_strings_cut_the_text() {
    let mut e = load(&stories_dir(), 1, 1);
    let req = GenerateRequest {
        prompt: e.encode_prompt("").unwrap(),
        max_tokens: 200,
        sampling: SamplingParams::default(),
        stop: vec!["park".into()],
    };
    let mut streamed = String::new();
    let out = e.generate(&req, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(out.finish, FinishReason::Stop);
    assert_eq!(
        out.text,
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    );
    assert_eq!(streamed, out.text);
}
