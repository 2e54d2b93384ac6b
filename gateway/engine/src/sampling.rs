//! Token sampling: greedy, temperature, top-k, top-p, with a seeded generator so that the
//! same seed gives the same output.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// One row's draw for a backend that samples on its device: the request's parameters and
/// the uniform number the host [`Sampler`] would have drawn for this token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1.0 = off.
    pub top_p: f32,
    /// Uniform in [0, 1).
    pub u: f32,
}

/// xoshiro256** seeded through splitmix64.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// (index, prob) scratch, reused.
    cand: Vec<(u32, f32)>,
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of `logits[id]`.
pub fn logprob(logits: &[f32], id: u32) -> f32 {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&v| ((v - mx) as f64).exp()).sum();
    (logits[id as usize] - mx) - sum.ln() as f32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            cand: Vec::new(),
        }
    }

    /// This token's draw for a device sampler: the same generator state advances as in
    /// [`Self::sample`] (one number per sampled token, none when greedy).
    pub fn device_draw(&mut self) -> RowSampling {
        let p = &self.params;
        let greedy = p.temperature == 0.0 || p.top_k == 1;
        RowSampling {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            u: if greedy { 0.0 } else { self.rng.next_f32() },
        }
    }

    /// Draw the next token. Costs O(vocab) (no full sort): top-k uses a selection, top-p
    /// sorts only the head of the distribution, growing it until it holds `top_p` of the mass.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u32, (v - mx) * inv_t)),
        );
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            self.cand.truncate(p.top_k);
        }
        // Weights (the maximum is 0 after the shift, so exp never overflows).
        for c in &mut self.cand {
            c.1 = c.1.exp();
        }
        if p.top_p < 1.0 {
            let total: f32 = self.cand.iter().map(|c| c.1).sum();
            let target = p.top_p * total;
            let by_w = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            let n = self.cand.len();
            let mut k = n.min(64);
            let keep = loop {
                if k < n {
                    self.cand.select_nth_unstable_by(k - 1, by_w);
                }
                self.cand[..k].sort_unstable_by(by_w);
                let mut acc = 0f32;
                let hit = self.cand[..k].iter().position(|c| {
                    acc += c.1;
                    acc >= target
                });
                match hit {
                    Some(j) => break j + 1,
                    None if k == n => break n,
                    None => k = (k * 4).min(n),
                }
            };
            self.cand.truncate(keep);
        }
        let sum: f32 = self.cand.iter().map(|c| c.1).sum();
        let r = self.rng.next_f32() * sum;
        let mut acc = 0f32;
        for c in &self.cand {
            acc += c.1;
            if r < acc {
                return c.0;
            }
        }
        self.cand.last().unwrap().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_draws_advance_the_generator_like_host_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 10,
            top_p: 0.9,
            seed: 9,
        };
        let mut host = Sampler::new(p.clone());
        let mut dev = Sampler::new(p.clone());
        for _ in 0..5 {
            host.sample(&logits);
            let d = dev.device_draw();
            assert!((0.0..1.0).contains(&d.u) && d.top_k == 10 && d.top_p == 0.9);
        }
        // Same generator state: the next host samples agree.
        let a: Vec<u32> = (0..20).map(|_| host.sample(&logits)).collect();
        let b: Vec<u32> = (0..20).map(|_| dev.sample(&logits)).collect();
        assert_eq!(a, b);
        // Greedy draws take no number.
        let mut g = Sampler::new(SamplingParams::default());
        assert_eq!(g.device_draw().u, 0.0);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 13) as f32 / 3.0).collect();
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let mut s = Sampler::new(p.clone());
        let b: Vec<u32> = (0..50).map(|_| s.sample(&logits)).collect();
        assert_eq!(a, b);
        let mut s = Sampler::new(SamplingParams { seed: 43, ..p });
        let c: Vec<u32> = (0..50).map(|_| s.sample(&logits)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_and_top_p_restrict() {
        let logits = vec![5.0, 4.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 1,
        });
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
        });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
        assert_eq!(argmax(&logits), 0);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_keeps_the_head() {
        // Nearly flat, increasing logits: top_p = 0.3 keeps well over 64 candidates (the
        // first guess), all from the top of the range.
        let logits: Vec<f32> = (0..5000).map(|i| i as f32 * 1e-3).collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
            seed: 9,
        });
        let draws: Vec<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&d| d >= 3000), "{:?}", draws.iter().min());
        assert!(
            draws.iter().any(|&d| d < 4800),
            "only the first guess was kept"
        );
    }
}
