//! Beam search as transformers 5.24 does it (`GenerationMixin._beam_search`) for one input,
//! without sampling or logits processors:
//!
//! 1. `B` running beams start as copies of the prompt with scores `[0, -1e9, -1e9, ...]`.
//! 2. Each step: `log_softmax` of each running beam's logits plus the beam's score; the top
//!    `K = max(2, 1 + #eos) · B` (beam, token) candidates over all beams.
//! 3. A candidate finishes when its token is an EOS or it reaches `max_new_tokens`. Only
//!    finished candidates among the first `B` of the `K` enter the pool of finished hypotheses,
//!    scored `sum_logprobs / L^length_penalty` with `L` = generated tokens including the new
//!    one (EOS included); the pool keeps the best `B`.
//! 4. The next running beams are the best `B` unfinished candidates (raw sums).
//! 5. Stop at `max_new_tokens`; or, once the pool is full, when
//!    `best_running / L'^length_penalty <= worst_finished` (`early_stopping = false`; `L'` =
//!    generated tokens of the running beams, `max_new_tokens` for `"never"` with a positive
//!    penalty); or, with `early_stopping = true`, as soon as the pool is full.
//! 6. Result: the best hypothesis of the pool.
//!
//! Scores are kept in f32 with the same additions as transformers, so that near-ties resolve
//! the same way.

use super::rows;
pub use super::stepper::BeamStepper;
use anyhow::{Result, bail};
use candle_core::Tensor;

/// transformers' `early_stopping`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStopping {
    /// `False`: stop when the best running beam, normalised at its current length, cannot beat
    /// the worst finished hypothesis.
    #[default]
    Heuristic,
    /// `True`: stop as soon as `num_beams` hypotheses are finished.
    Always,
    /// `"never"`: with a positive length penalty, assume running beams may reach
    /// `max_new_tokens`.
    Never,
}

#[derive(Clone, Debug)]
pub struct BeamOptions {
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub max_new_tokens: usize,
}

impl Default for BeamOptions {
    fn default() -> Self {
        Self { num_beams: 4, length_penalty: 1.0, early_stopping: EarlyStopping::Heuristic, max_new_tokens: 32 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens (after the prompt), the final EOS included when there is one.
    pub ids: Vec<u32>,
    /// `sum_logprobs / len^length_penalty` (transformers' `sequences_scores`).
    pub score: f32,
}

#[derive(Clone, Debug)]
pub struct BeamOutput {
    /// The returned sequence: the best finished hypothesis.
    pub ids: Vec<u32>,
    pub score: f32,
    /// All finished hypotheses kept at the end, best first (at most `num_beams`).
    pub hypotheses: Vec<Hypothesis>,
}

/// `log_softmax` of one row in f32.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    let lse = sum.ln();
    row.iter().map(|&x| x - max - lse).collect()
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let order = |&a: &usize, &b: &usize| values[b].total_cmp(&values[a]).then(a.cmp(&b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// Beam search for one input. `stepper` must hold exactly one row, positioned right after the
/// prompt, and `first` the logits `[1, vocab]` that follow the prompt; the stepper is expanded
/// to `num_beams` rows here.
pub fn beam_search(
    stepper: &mut dyn BeamStepper,
    first: &Tensor,
    opts: &BeamOptions,
    eos: &[u32],
) -> Result<BeamOutput> {
    crate::ops::keep_warm(|| beam_search_cold(stepper, first, opts, eos))
}

fn beam_search_cold(
    stepper: &mut dyn BeamStepper,
    first: &Tensor,
    opts: &BeamOptions,
    eos: &[u32],
) -> Result<BeamOutput> {
    let nb = opts.num_beams;
    if nb == 0 {
        bail!("beam search needs num_beams >= 1")
    }
    let first = rows(first)?;
    if first.len() != 1 {
        bail!("beam search takes one input; got logits for {} rows", first.len())
    }
    if opts.max_new_tokens == 0 {
        return Ok(BeamOutput { ids: vec![], score: 0.0, hypotheses: vec![] });
    }
    let vocab = first[0].len();
    stepper.reorder(&vec![0; nb])?;
    let mut logits = vec![first[0].clone(); nb];
    let k = 2usize.max(1 + eos.len()) * nb;
    let lp = opts.length_penalty;
    let norm = |len: usize| (len as f64).powf(lp) as f32;

    // Running beams: tokens and accumulated log-probabilities.
    let mut run_ids: Vec<Vec<u32>> = vec![Vec::new(); nb];
    let mut run_scores: Vec<f32> = (0..nb).map(|i| if i == 0 { 0.0 } else { -1e9 }).collect();
    // Finished hypotheses, best first, at most `nb`.
    let mut pool: Vec<Hypothesis> = Vec::new();
    let mut cur = 0usize; // tokens generated by the running beams
    loop {
        // b. Accumulated scores over all (beam, token).
        let mut acc = Vec::with_capacity(nb * vocab);
        for (row, &s) in logits.iter().zip(&run_scores) {
            if row.len() != vocab {
                bail!("stepper returned rows of different vocabulary sizes")
            }
            acc.extend(log_softmax(row).into_iter().map(|x| x + s));
        }
        // c. Top-K continuations.
        let top = top_k(&acc, k);
        let cands: Vec<(usize, u32, f32, bool)> = top
            .iter()
            .map(|&i| {
                let (beam, tok) = (i / vocab, (i % vocab) as u32);
                let hits = eos.contains(&tok) || cur + 1 >= opts.max_new_tokens;
                (beam, tok, acc[i], hits)
            })
            .collect();
        // e. Next running beams: best `nb` unfinished (finished ones pushed down by 1e9).
        let masked: Vec<f32> = cands.iter().map(|&(_, _, s, hits)| if hits { s + -1.0e9 } else { s }).collect();
        let next = top_k(&masked, nb);
        // f. Finished candidates among the first `nb` enter the pool. (The loop only gets here
        // while the pool can still improve and is open: the check at the end of the last pass.)
        for &(beam, tok, s, hits) in cands.iter().take(nb) {
            if hits {
                let mut ids = run_ids[beam].clone();
                ids.push(tok);
                pool.push(Hypothesis { ids, score: s / norm(cur + 1) });
            }
        }
        // Stable: earlier entries (the old pool first) win ties, as in the concatenation
        // transformers ranks.
        pool.sort_by(|a, b| b.score.total_cmp(&a.score));
        pool.truncate(nb);
        let all_hit = cands.iter().all(|c| c.3);
        // g. Reorder the rows to follow the surviving beams.
        let src: Vec<usize> = next.iter().map(|&j| cands[j].0).collect();
        let new_ids: Vec<Vec<u32>> = next
            .iter()
            .map(|&j| {
                let mut v = run_ids[cands[j].0].clone();
                v.push(cands[j].1);
                v
            })
            .collect();
        run_scores = next.iter().map(|&j| masked[j]).collect();
        run_ids = new_ids;
        cur += 1;
        // Early-stop heuristic.
        let best_len = if opts.early_stopping == EarlyStopping::Never && lp > 0.0 { opts.max_new_tokens } else { cur };
        let best_possible = run_scores[0] / norm(best_len);
        let worst_finished =
            if pool.len() == nb { pool.iter().map(|h| h.score).fold(f32::INFINITY, f32::min) } else { -1.0e9 };
        let improvable = best_possible > worst_finished;
        let open = !(pool.len() == nb && opts.early_stopping == EarlyStopping::Always);
        if !(improvable && open && !all_hit) {
            break;
        }
        stepper.reorder(&src)?;
        let feed: Vec<u32> = run_ids.iter().map(|v| *v.last().unwrap()).collect();
        logits = rows(&stepper.step(&feed)?)?;
        if logits.len() != nb {
            bail!("stepper returned {} rows for {nb} beams", logits.len())
        }
    }
    let best = pool
        .first()
        .cloned()
        .unwrap_or(Hypothesis { ids: run_ids[0].clone(), score: run_scores[0] / norm(cur.max(1)) });
    Ok(BeamOutput { ids: best.ids, score: best.score, hypotheses: pool })
}
