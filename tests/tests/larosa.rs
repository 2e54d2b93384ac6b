//! LaRoSA's rotated model computes the dense model's function: stories260K calibrated on its
//! own greedy text, rotated, and its logits over 200 tokens (prefilled in chunks) compared
//! with the dense model's, for both formats (rotate-half and interleaved RoPE).

use switchyard_engine::forward::SeqChunk;
use switchyard_engine::larosa::{self, orthogonality_error};
use switchyard_tests::*;

fn logits(e: &mut switchyard_engine::Engine, input: &[u32]) -> Vec<f32> {
    let slot = e.kv.acquire().unwrap();
    let (mut got, mut pos) = (Vec::new(), 0);
    for len in [9, 64, 127] {
        let sc = SeqChunk {
            slot,
            pos,
            tokens: &input[pos..pos + len],
            logits_from: 0,
        };
        got.extend_from_slice(e.fwd.forward(&e.model, e.kv.as_mut(), &[sc]).unwrap());
        pos += len;
    }
    e.kv.release(slot);
    got
}

#[test]
fn rotated_model_matches_dense_logits() {
    for path in [stories_dir(), stories_dir().join("stories260K.f32.gguf")] {
        let mut e = load(&path, 2, 1);
        // Calibration text: the model's own sampled continuation of a prompt.
        let text = "Once upon a time, there was a little girl named Lily. She loved to play \
                    outside in the park with her friends and her big red ball.";
        let ids = e.encode_prompt(text).unwrap();
        let cal = larosa::calibrate(&mut e, &ids, 16, &mut |_, _| {}).unwrap();
        assert_eq!(cal.tokens, ids.len());
        let rot = cal.finish(0.01, &mut |_, _| {}).unwrap();
        for q in &rot.q {
            assert!(orthogonality_error(q, rot.dim) < 1e-5);
        }
        let input: Vec<u32> = (0..200u32).map(|i| 1 + (i * 37 + 11) % 500).collect();
        let dense = logits(&mut e, &input);
        let m = larosa::rotate_model(&e.model, &rot, e.fwd.pool(), &mut |_, _| {}).unwrap();
        assert!(m.layers[0].adapter.is_none() && m.layers[1].adapter.is_some());
        assert!(m.norm.iter().all(|&g| g == 1.0));
        // Rotating a rotated model is refused.
        assert!(larosa::rotate_model(&m, &rot, e.fwd.pool(), &mut |_, _| {}).is_err());
        e.model = std::sync::Arc::new(m);
        let rotated = logits(&mut e, &input);
        let scale = dense.iter().fold(0f32, |a, b| a.max(b.abs()));
        let max_diff = dense
            .iter()
            .zip(&rotated)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-4 * scale.max(1.0),
            "{}: max |logit diff| {max_diff} (max |logit| {scale})",
            path.display()
        );
    }
}
