//! What a decoding engine needs from a model mid-generation. A leaf module: each model family
//! implements these next to its model, and the engines in `generate/` drive them.

use anyhow::Result;
use candle_core::Tensor;

/// A model mid-generation: feed one token per row, get logits `[rows, vocab]`.
pub trait Stepper {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor>;
}

/// A [`Stepper`] whose rows can be rearranged between steps (KV caches follow their beams).
pub trait BeamStepper: Stepper {
    /// New row `i` = old row `beam_indices[i]`; the number of rows may change.
    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()>;
}
