//! Text generation with a KV cache: greedy (temperature 0), temperature + nucleus sampling,
//! over any model that can take one token per row and return next-token logits.

use crate::models::llama::{Llama, Positions};
use crate::models::{KvCache, LmHooks};
use crate::rng::Rng;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { max_new_tokens: 32, temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// A model mid-generation: feed one token per row, get logits `[rows, vocab]`.
pub trait Stepper {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor>;
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// One token from a row of logits.
pub fn pick(row: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(row);
    }
    let t = s.temperature as f32;
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(f32, u32)> = row.iter().enumerate().map(|(i, &v)| (((v - max) / t).exp(), i as u32)).collect();
    let z: f32 = p.iter().map(|x| x.0).sum();
    for x in p.iter_mut() {
        x.0 /= z;
    }
    p.sort_by(|a, b| b.0.total_cmp(&a.0));
    // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
    let mut keep = p.len();
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, x) in p.iter().enumerate() {
            acc += x.0;
            if acc >= s.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
    }
    let p = &p[..keep.max(1)];
    let mass: f32 = p.iter().map(|x| x.0).sum();
    let mut u = rng.uniform_f32() * mass;
    for x in p {
        if u < x.0 {
            return x.1;
        }
        u -= x.0;
    }
    p[p.len() - 1].1
}

pub(crate) fn rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Continues every row from the logits that follow its prompt until EOS (kept, as
/// transformers keeps it) or `max_new_tokens`.
pub fn continue_batch(stepper: &mut dyn Stepper, first: &Tensor, s: &Sampling, eos: &[u32]) -> Result<Vec<Vec<u32>>> {
    let mut rng = Rng::new(s.seed);
    let mut logits = rows(first)?;
    let n = logits.len();
    let mut out = vec![Vec::new(); n];
    let mut done = vec![false; n];
    for step in 0..s.max_new_tokens {
        let mut feed = Vec::with_capacity(n);
        for i in 0..n {
            if done[i] {
                feed.push(*out[i].last().unwrap_or(&0));
                continue;
            }
            let t = pick(&logits[i], s, &mut rng);
            out[i].push(t);
            if eos.contains(&t) {
                done[i] = true;
            }
            feed.push(t);
        }
        if done.iter().all(|&d| d) || step + 1 == s.max_new_tokens {
            break;
        }
        logits = rows(&stepper.step(&feed)?)?;
    }
    Ok(out)
}

/// A decoder-only model mid-generation.
pub struct LlamaStepper<'a> {
    model: &'a Llama,
    hooks: &'a dyn LmHooks,
    cache: KvCache,
    /// Next position of each row.
    next_pos: Vec<u32>,
    /// Key mask `[rows, len]` when the prompts were left-padded.
    mask: Option<Vec<Vec<f32>>>,
}

impl<'a> LlamaStepper<'a> {
    /// Runs the prompts (left-padded when their lengths differ) and returns the stepper with
    /// the logits of each prompt's last token.
    pub fn prefill(model: &'a Llama, hooks: &'a dyn LmHooks, prompts: &[Vec<u32>]) -> Result<(Self, Tensor)> {
        Self::prefill_with_prefix(model, hooks, prompts, None)
    }

    /// As [`Self::prefill`], with embeddings `[b, n, d]` placed before every prompt (the
    /// input-space baseline's visual tokens); `prefix.1[i] = 0` masks row `i`'s prefix out.
    /// Rows are laid out `[prefix][padding][prompt]`, the padding masked and skipped by the
    /// positions, which equals running each row unpadded.
    pub fn prefill_with_prefix(
        model: &'a Llama,
        hooks: &'a dyn LmHooks,
        prompts: &[Vec<u32>],
        prefix: Option<(&Tensor, &[f32])>,
    ) -> Result<(Self, Tensor)> {
        let dev = model.device().clone();
        let b = prompts.len();
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let n = prefix.map(|p| p.0.dims()[1]).unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * (n + t));
        let mut mask = Vec::with_capacity(b);
        for (i, p) in prompts.iter().enumerate() {
            let pad = t - p.len();
            ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
            pos.extend((0..n as u32).chain((0..t).map(|j| (n + j.saturating_sub(pad)) as u32)));
            let pm = prefix.map(|p| p.1[i]).unwrap_or(1.0);
            mask.push(
                std::iter::repeat_n(pm, n).chain((0..t).map(|j| if j < pad { 0.0 } else { 1.0 })).collect::<Vec<f32>>(),
            );
        }
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let mut x = model.embed(&ids)?;
        if let Some((p, _)) = prefix {
            x = Tensor::cat(&[p, &x], 1)?;
        }
        let total = n + t;
        let plain = mask.iter().all(|r| r.iter().all(|&m| m == 1.0));
        let mut cache = model.new_cache();
        let (positions, key_mask) = if plain {
            (Positions::From(0), None)
        } else {
            (
                Positions::PerSample(Tensor::from_vec(pos, (b, total), &dev)?),
                Some(Tensor::from_vec(mask.concat(), (b, total), &dev)?),
            )
        };
        let h = model.forward_embeds(&x, &positions, Some(&mut cache), key_mask.as_ref(), hooks)?;
        let logits = model.logits(&h.narrow(1, total - 1, 1)?.squeeze(1)?)?;
        let next_pos = prompts.iter().map(|p| (n + p.len()) as u32).collect();
        Ok((Self { model, hooks, cache, next_pos, mask: (!plain).then_some(mask) }, logits))
    }
}

impl Stepper for LlamaStepper<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let dev = self.model.device().clone();
        let b = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &dev)?;
        let (positions, key_mask) = match &mut self.mask {
            None => (Positions::From(self.next_pos[0] as usize), None),
            Some(m) => {
                for r in m.iter_mut() {
                    r.push(1.0);
                }
                let len = m[0].len();
                (
                    Positions::PerSample(Tensor::from_vec(self.next_pos.clone(), (b, 1), &dev)?),
                    Some(Tensor::from_vec(m.concat(), (b, len), &dev)?),
                )
            }
        };
        let h = self.model.forward_embeds(
            &self.model.embed(&ids)?,
            &positions,
            Some(&mut self.cache),
            key_mask.as_ref(),
            self.hooks,
        )?;
        for p in self.next_pos.iter_mut() {
            *p += 1;
        }
        self.model.logits(&h.squeeze(1)?)
    }
}

impl crate::beam::BeamStepper for LlamaStepper<'_> {
    fn reorder(&mut self, bi: &[usize]) -> Result<()> {
        let idx = Tensor::from_vec(bi.iter().map(|&i| i as u32).collect::<Vec<_>>(), bi.len(), self.model.device())?;
        self.cache.reorder(&idx)?;
        self.next_pos = bi.iter().map(|&i| self.next_pos[i]).collect();
        if let Some(m) = &mut self.mask {
            *m = bi.iter().map(|&i| m[i].clone()).collect();
        }
        Ok(())
    }
}
