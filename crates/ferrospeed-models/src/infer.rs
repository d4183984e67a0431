//! What `generate` shares across families: the key/value cache, the sampler (greedy, or nucleus with a
//! temperature, from the seed) and the loop that prefills the prompt once and then feeds one token at a
//! time. Each family's forward over new tokens is a [`Generator`] (`llama/infer.rs`, `gpt/infer.rs`).

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
            let next = sampler.sample(&last);
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

/// Greedy (`temperature = 0`) or nucleus sampling: the smallest set of most likely tokens whose
/// probabilities reach `top_p`, drawn from with the temperature.
pub struct Sampler {
    pub temperature: f64,
    pub top_p: f64,
    pub rng: Rng,
}

impl Sampler {
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        if self.temperature <= 0.0 {
            return argmax as u32;
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
                return p.0 as u32;
            }
        }
        probs[0].0 as u32
    }
}
