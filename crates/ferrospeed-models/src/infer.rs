//! What `generate` shares across families: the key/value cache, the sampler (greedy, or nucleus with a
//! temperature, from the seed) and the loop that prefills the prompt once and then feeds one token at a
//! time. Each family's forward over new tokens is a [`Generator`] (`llama/infer.rs`, `gpt/infer.rs`).
//!
//! A sampler is built only from settings it can use ([`Sampler::new`]: a temperature that is a finite
//! number ≥ 0, a top-p above 0 and at most 1) and refuses logits it cannot draw from (a NaN or +∞),
//! so a bad setting or a broken model is an error rather than a NaN that picks some token.

use candle_core::{Device, Result, Tensor};
use ferrospeed::checkpoint::WeightFiles;
use ferrospeed::rng::Rng;

/// A model that extends a cached context by new tokens.
pub trait Generator {
    /// Logits `[s, vocab]` (f32) of the new `tokens` after the cached ones; the cache grows by them.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor>;
    /// The longest context it can hold.
    fn max_len(&self) -> usize;

    /// Continue `prompt` by up to `max_new` tokens (stopping after `stop`), sampling with `sampler`.
    /// Returns the new tokens and the seconds spent on the prompt (prefill).
    fn generate(&self, prompt: &[u32], max_new: usize, stop: Option<u32>, sampler: &mut Sampler) -> Result<(Vec<u32>, f64)> {
        let mut cache = KvCache::default();
        let t0 = std::time::Instant::now();
        let logits = self.forward(prompt, &mut cache)?;
        let mut last: Vec<f32> = logits.get(prompt.len() - 1)?.to_vec1()?;
        let prefill = t0.elapsed().as_secs_f64();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let next = sampler.sample(&last).map_err(candle_core::Error::wrap)?;
            out.push(next);
            if Some(next) == stop || cache.len() + 1 > self.max_len() {
                break;
            }
            last = self.forward(&[next], &mut cache)?.get(0)?.to_vec1()?;
        }
        Ok((out, prefill))
    }
}

/// The keys and values of every layer for the tokens seen so far (`[1, nkv, t, hd]` each).
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) len: usize,
}

impl KvCache {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Tensor `name` of `files`, whole, as f32 on `device`.
pub(crate) fn load(files: &mut WeightFiles, name: &str, device: &Device) -> std::result::Result<Tensor, String> {
    let info = files.info(name).ok_or_else(|| format!("the weights have no tensor {name}"))?;
    let shape = info.shape.clone();
    let mut out = vec![0f32; shape.iter().product()];
    let n = out.len();
    files.read_f32(name, 0..n, &mut out).map_err(|e| e.to_string())?;
    Tensor::from_vec(out, shape, device).map_err(|e| e.to_string())
}

/// A sampling setting it cannot use, or logits it cannot draw from.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SamplerError {
    #[error("temperature {0} is not allowed: it must be a finite number ≥ 0 (0 is greedy)")]
    Temperature(f64),
    #[error("top-p {0} is not allowed: it must be above 0 and at most 1 (1 keeps every token)")]
    TopP(f64),
    #[error("the logit of token {token} is {value}: the model's weights or its input are broken")]
    Logit { token: usize, value: f32 },
}

/// Greedy (`temperature = 0`) or nucleus sampling: the smallest set of most likely tokens whose
/// probabilities reach `top_p`, drawn from with the temperature.
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: Rng,
}

impl Sampler {
    /// A sampler with these settings, drawing from `rng`; see [`Sampler::check_temperature`] and
    /// [`Sampler::check_top_p`] for what they may be.
    pub fn new(temperature: f64, top_p: f64, rng: Rng) -> std::result::Result<Self, SamplerError> {
        Ok(Self { temperature: Self::check_temperature(temperature)?, top_p: Self::check_top_p(top_p)?, rng })
    }

    /// `t` when it is a temperature: finite and ≥ 0 (0 is greedy).
    pub fn check_temperature(t: f64) -> std::result::Result<f64, SamplerError> {
        if t.is_finite() && t >= 0.0 { Ok(t) } else { Err(SamplerError::Temperature(t)) }
    }

    /// `p` when it is a nucleus probability: above 0 and at most 1.
    pub fn check_top_p(p: f64) -> std::result::Result<f64, SamplerError> {
        if p > 0.0 && p <= 1.0 { Ok(p) } else { Err(SamplerError::TopP(p)) }
    }

    /// The next token after `logits` (one per vocabulary entry). A logit that is NaN or +∞ is an
    /// error (−∞, a token ruled out, is not).
    pub fn sample(&mut self, logits: &[f32]) -> std::result::Result<u32, SamplerError> {
        if let Some((token, &value)) = logits.iter().enumerate().find(|(_, l)| l.is_nan() || **l == f32::INFINITY) {
            return Err(SamplerError::Logit { token, value });
        }
        let argmax = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        if self.temperature == 0.0 {
            return Ok(argmax as u32);
        }
        let max = logits[argmax] as f64;
        let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, ((l as f64 - max) / self.temperature).exp())).collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0;
        let mut n = 0;
        for p in &probs {
            kept += p.1 / total;
            n += 1;
            if kept >= self.top_p {
                break;
            }
        }
        let mut r = self.rng.next_f64() * probs[..n].iter().map(|p| p.1).sum::<f64>();
        for p in &probs[..n] {
            r -= p.1;
            if r <= 0.0 {
                return Ok(p.0 as u32);
            }
        }
        Ok(probs[0].0 as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_outside_their_range_are_refused() {
        for t in [-1.0, -1e-300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(Sampler::new(t, 0.9, Rng::new(1)), Err(SamplerError::Temperature(_))), "temperature {t}");
        }
        for p in [0.0, -0.5, 1.000_001, 2.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(Sampler::new(1.0, p, Rng::new(1)), Err(SamplerError::TopP(_))), "top-p {p}");
        }
        for (t, p) in [(0.0, 1.0), (1e-9, 1e-9), (0.7, 0.9), (100.0, 1.0)] {
            assert!(Sampler::new(t, p, Rng::new(1)).is_ok(), "temperature {t}, top-p {p}");
        }
        let e = Sampler::new(f64::NAN, 0.9, Rng::new(1)).err().unwrap().to_string();
        assert!(e.contains("NaN") && e.contains("finite number ≥ 0"), "{e}");
    }

    #[test]
    fn greedy_is_the_argmax_and_a_tiny_top_p_keeps_only_it() {
        let logits = [0.5f32, 3.0, -1.0, 2.9, f32::NEG_INFINITY];
        assert_eq!(Sampler::new(0.0, 0.9, Rng::new(1)).unwrap().sample(&logits), Ok(1));
        let mut s = Sampler::new(5.0, 1e-6, Rng::new(3)).unwrap();
        assert!((0..50).all(|_| s.sample(&logits) == Ok(1)));
        // A high temperature with every token kept draws the others too, never the ruled-out one.
        let mut s = Sampler::new(5.0, 1.0, Rng::new(3)).unwrap();
        let drawn: std::collections::BTreeSet<u32> = (0..200).map(|_| s.sample(&logits).unwrap()).collect();
        assert_eq!(drawn, [0, 1, 2, 3].into_iter().collect());
    }

    #[test]
    fn logits_that_are_nan_or_infinite_are_an_error() {
        for (t, bad) in [(0.0, f32::NAN), (0.8, f32::NAN), (0.0, f32::INFINITY), (0.8, f32::INFINITY)] {
            let logits = [0.5f32, bad, 1.0];
            let e = Sampler::new(t, 0.9, Rng::new(1)).unwrap().sample(&logits).unwrap_err();
            assert!(matches!(e, SamplerError::Logit { token: 1, .. }), "temperature {t}: {e}");
        }
    }
}
