//! Text generation over any model that can take one token per row and return next-token
//! logits ([`Stepper`]): one batched engine ([`decode`]) in which every row is an independent
//! sequence with its own sampling settings and stop condition (greedy, temperature + nucleus
//! sampling), and beam search ([`beam`]). Used by `generate`, `eval` and the bench alike.

pub mod beam;
pub mod stepper;

pub use stepper::{BeamStepper, Stepper};

use crate::rng::Rng;
use anyhow::{Result, bail};
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

/// One sequence of a batch: how to pick its tokens and when to stop.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub sampling: Sampling,
    /// Tokens that end the sequence (kept in the output, as transformers keeps them).
    pub stop: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub ids: Vec<u32>,
    pub reason: FinishReason,
}

/// Continues every row from the logits that follow its prompt until one of its stop tokens or
/// its `max_new_tokens`. Each row draws from its own generator seeded with its `seed`, so a
/// row's output does not depend on the other rows of the batch. A finished row keeps being fed
/// its last token until the whole batch is done (its outputs are ignored).
pub fn decode(stepper: &mut dyn Stepper, first: &Tensor, seqs: &[Sequence]) -> Result<Vec<Finished>> {
    crate::ops::keep_warm(|| decode_cold(stepper, first, seqs))
}

fn decode_cold(stepper: &mut dyn Stepper, first: &Tensor, seqs: &[Sequence]) -> Result<Vec<Finished>> {
    let mut logits = rows(first)?;
    let n = logits.len();
    if n != seqs.len() {
        bail!("{} sequences for {n} rows of logits", seqs.len())
    }
    let mut rngs: Vec<Rng> = seqs.iter().map(|q| Rng::new(q.sampling.seed)).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut reason: Vec<Option<FinishReason>> =
        seqs.iter().map(|q| (q.sampling.max_new_tokens == 0).then_some(FinishReason::Length)).collect();
    loop {
        let mut feed = Vec::with_capacity(n);
        for i in 0..n {
            if reason[i].is_some() {
                feed.push(*out[i].last().unwrap_or(&0));
                continue;
            }
            let t = pick(&logits[i], &seqs[i].sampling, &mut rngs[i]);
            out[i].push(t);
            if seqs[i].stop.contains(&t) {
                reason[i] = Some(FinishReason::Stop);
            } else if out[i].len() >= seqs[i].sampling.max_new_tokens {
                reason[i] = Some(FinishReason::Length);
            }
            feed.push(t);
        }
        if reason.iter().all(Option::is_some) {
            break;
        }
        logits = rows(&stepper.step(&feed)?)?;
    }
    Ok(out
        .into_iter()
        .zip(reason)
        .map(|(ids, r)| Finished { ids, reason: r.unwrap_or(FinishReason::Length) })
        .collect())
}

/// [`decode`] with the same settings and stop tokens for every row; the generated ids only.
pub fn continue_batch(stepper: &mut dyn Stepper, first: &Tensor, s: &Sampling, eos: &[u32]) -> Result<Vec<Vec<u32>>> {
    let n = first.dims().first().copied().unwrap_or(0);
    let seqs = vec![Sequence { sampling: s.clone(), stop: eos.to_vec() }; n];
    Ok(decode(stepper, first, &seqs)?.into_iter().map(|f| f.ids).collect())
}
