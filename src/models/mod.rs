//! Frozen backbones, one file per family, each exposing the seams where adapters plug in.

pub mod bart;
pub mod clip;
pub mod encdec;
pub mod kv_cache;
pub mod llama;
pub mod load;
pub mod meta;
pub mod t5;

pub use kv_cache::KvCache;
pub use load::{LoadedLm, LoadedVision, Precision, load_lm, load_vision};

use crate::generate::stepper::BeamStepper;
use crate::ops::Activation;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::any::Any;

/// A batch in teacher-forcing form: what one training step feeds a language model.
pub struct TeacherForcing<'a> {
    /// Encoder input (encoder-decoder) or the whole sequence (decoder-only) `[b, t]`,
    /// right-padded.
    pub input_ids: &'a Tensor,
    /// Real tokens per row of `input_ids`.
    pub input_lens: &'a [usize],
    /// Decoder inputs `[b, t_dec]` (encoder-decoder LMs only).
    pub decoder_ids: Option<&'a Tensor>,
    /// Embeddings `[b, n, d]` placed before the input (the input-space baseline's visual
    /// tokens), with a flag per row: 0 masks that row's prefix out.
    pub prefix: Option<(&'a Tensor, &'a [f32])>,
}

/// Hidden states `[b, rows, d]` of a teacher-forcing pass, of which the positions from `offset`
/// on line up with the text (the positions before it belong to a prefix).
pub struct Hidden {
    pub h: Tensor,
    pub rows: usize,
    pub offset: usize,
}

/// A decoding state that rows can join and leave between steps (continuous batching). The
/// hooks are given at every step, since the rows, and so the visual memory, change.
pub trait BatchState: Send {
    fn rows(&self) -> usize;
    /// New row `i` = old row `rows[i]`.
    fn keep(&mut self, rows: &[usize]) -> Result<()>;
    /// Appends the rows of another state of the same model.
    fn merge(&mut self, other: Box<dyn BatchState>) -> Result<()>;
    /// Bytes of its KV cache.
    fn bytes(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// What every frozen language model offers the layers above it: dimensions, a teacher-forcing
/// pass with hooks, logits, and a decoding state for generation. LLaMA, T5 and BART implement it
/// in their own files; nothing above `models/` matches on the family.
pub trait LanguageModel: Send + Sync {
    /// `llama`, `t5` or `bart`.
    fn family(&self) -> &'static str;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
    /// Model width `d`.
    fn width(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// The stacks and their numbers of blocks: the decoder alone, or encoder then decoder.
    fn stacks(&self) -> Vec<(Site, usize)>;
    /// Positions the model can take (`None`: no limit, as T5's relative positions).
    fn max_positions(&self) -> Option<usize>;
    /// How many tokens can be generated after a prompt of `prompt_len` positions (an
    /// embedding prefix included) before the positions run out; `None`: no limit.
    fn max_new_tokens(&self, prompt_len: usize) -> Option<usize> {
        // The last generated token is never fed back.
        self.max_positions().map(|p| (p + 1).saturating_sub(prompt_len))
    }
    /// The FFN's activation (its gate's for gated FFNs): the memory branch uses it.
    fn ffn_activation(&self) -> Activation;
    /// `(in, out)` features of an attention projection of `site` (LoRA targets).
    fn proj_dims(&self, site: Site, proj: Proj) -> (usize, usize);
    /// The decoder's start token for encoder-decoder LMs; `None` for decoder-only LMs.
    fn decoder_start(&self) -> Option<u32>;
    /// Token embeddings `[b, t, d]` as the first block consumes them.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// The final hidden states of a teacher-forcing pass.
    fn teacher_forcing(&self, tf: &TeacherForcing, hooks: &dyn LmHooks) -> Result<Hidden>;
    /// Teacher forcing with gradient checkpointing: only each block's input is kept, and the
    /// blocks are recomputed one at a time for the backward. `loss` maps the hidden states to
    /// the scalar loss. Returns a tensor equal to the loss whose backward gives every trained
    /// tensor the gradient it would get without checkpointing.
    fn teacher_forcing_checkpointed(
        &self,
        _tf: &TeacherForcing,
        _hooks: &dyn LmHooks,
        _loss: &mut dyn FnMut(&Hidden) -> Result<Tensor>,
    ) -> Result<Tensor> {
        anyhow::bail!("gradient checkpointing is implemented for LLaMA-family language models only")
    }
    /// Logits `[.., vocab]` from final hidden states `[.., d]`.
    fn logits(&self, h: &Tensor) -> Result<Tensor>;
    /// Runs the prompts (and an optional embedding prefix per row, as in [`TeacherForcing`])
    /// and returns the decoding state with the logits `[rows, vocab]` that follow each prompt.
    fn prefill<'a>(
        &'a self,
        hooks: &'a dyn LmHooks,
        prompts: &[Vec<u32>],
        prefix: Option<(&Tensor, &[f32])>,
    ) -> Result<(Box<dyn BeamStepper + 'a>, Tensor)>;
    /// As [`Self::prefill`], as a state that rows can join and leave (decoder-only LMs).
    fn start_batch(
        &self,
        _hooks: &dyn LmHooks,
        _prompts: &[Vec<u32>],
        _prefix: Option<(&Tensor, &[f32])>,
    ) -> Result<(Box<dyn BatchState>, Tensor)> {
        anyhow::bail!("continuous batching needs a decoder-only LM; this one is {}", self.family())
    }
    /// One token per row of a [`BatchState`] made by this model; logits `[rows, vocab]`.
    fn step_batch(&self, _state: &mut dyn BatchState, _tokens: &[u32], _hooks: &dyn LmHooks) -> Result<Tensor> {
        anyhow::bail!("continuous batching needs a decoder-only LM; this one is {}", self.family())
    }
    /// The encoder-decoder view (T5, BART).
    fn as_encdec(&self) -> Option<&dyn encdec::EncoderDecoder> {
        None
    }
    /// For tools that need a family's internals (parity tests, the bench's FLOP counts).
    fn as_any(&self) -> &dyn Any;
}

impl dyn LanguageModel + '_ {
    /// Blocks over all stacks.
    pub fn total_layers(&self) -> usize {
        self.stacks().iter().map(|s| s.1).sum()
    }
    /// Blocks of the deepest stack (the range of a per-stack layer index).
    pub fn layers_per_stack(&self) -> usize {
        self.stacks().iter().map(|s| s.1).max().unwrap_or(0)
    }
    pub fn downcast<T: 'static>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }
}

/// Which stack of a language model a block belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// The only stack of a decoder-only LM, or the decoder of an encoder-decoder LM.
    Decoder,
    Encoder,
}

impl Site {
    pub fn name(self) -> &'static str {
        match self {
            Site::Decoder => "decoder",
            Site::Encoder => "encoder",
        }
    }
}

/// An attention projection that an adapter may modify (LoRA targets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Proj {
    #[serde(rename = "q_proj", alias = "q")]
    Q,
    #[serde(rename = "k_proj", alias = "k")]
    K,
    #[serde(rename = "v_proj", alias = "v")]
    V,
    #[serde(rename = "o_proj", alias = "o", alias = "out_proj")]
    O,
}

impl Proj {
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "q_proj" | "q" => Proj::Q,
            "k_proj" | "k" => Proj::K,
            "v_proj" | "v" => Proj::V,
            "o_proj" | "o" | "out_proj" => Proj::O,
            _ => return None,
        })
    }
}

/// The seam between a frozen language model and what is trained inside it. The model calls
/// these at fixed points of every block; the default adds nothing.
pub trait LmHooks {
    /// Added in parallel to the FFN of block `layer` of `site`, computed on the same
    /// normalised input `u` that the FFN receives (MemVP's memory branch).
    fn ffn_branch(&self, _site: Site, _layer: usize, _u: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Added to the output of self-attention projection `proj` of block `layer` (LoRA).
    fn proj_delta(&self, _site: Site, _layer: usize, _proj: Proj, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether `proj_delta` can return anything: models then keep the attention projections
    /// separate instead of running the fused block. True unless a hook says otherwise, so that
    /// a hook overriding `proj_delta` cannot be skipped by forgetting this.
    fn modifies_projections(&self) -> bool {
        true
    }
    /// Replaces input embeddings before the first block of the stack that reads the prompt
    /// (ADEM-VL puts its CLS token into a slot of the prompt). `x` is `[b, t, d]`; row `i`'s
    /// own tokens start at column `starts[i]` (after a prefix or left padding). Called once per
    /// prompt pass (teacher forcing, prefill), never for generated tokens.
    fn edit_input(&self, _x: &Tensor, _starts: &[usize]) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// The tensors carrying a gradient that these hooks read inside the blocks, for gradient
    /// checkpointing (each block is recomputed with them replaced by fresh leaves); `None`
    /// when the hooks cannot be recomputed that way.
    fn checkpoint_tensors(&self) -> Option<Vec<Tensor>> {
        None
    }
    /// These hooks reading `ts` (in the order of `checkpoint_tensors`) instead; random draws
    /// (dropout masks) repeat those of the first pass through the same block.
    fn rebind<'s>(&'s self, _ts: &[Tensor]) -> Result<Box<dyn LmHooks + 's>> {
        anyhow::bail!("these hooks cannot be recomputed block by block (gradient checkpointing)")
    }
}

/// `x` with `hooks`' input edit applied.
pub(crate) fn edit_input(hooks: &dyn LmHooks, x: Tensor, starts: &[usize]) -> Result<Tensor> {
    Ok(hooks.edit_input(&x, starts)?.unwrap_or(x))
}

/// The plain model.
pub struct NoHooks;
impl LmHooks for NoHooks {
    fn modifies_projections(&self) -> bool {
        false
    }
    fn checkpoint_tensors(&self) -> Option<Vec<Tensor>> {
        Some(vec![])
    }
    fn rebind<'s>(&'s self, _ts: &[Tensor]) -> Result<Box<dyn LmHooks + 's>> {
        Ok(Box::new(NoHooks))
    }
}

/// The seam in the vision tower: a branch parallel to each block's MLP.
pub trait VisionHooks {
    fn mlp_branch(&self, _layer: usize, _u: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
impl VisionHooks for NoHooks {}

/// `base + delta` when a hook returned something.
pub(crate) fn add_opt(base: Tensor, delta: Option<Tensor>) -> Result<Tensor> {
    Ok(match delta {
        Some(d) => (base + d)?,
        None => base,
    })
}
