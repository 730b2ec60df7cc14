//! Frozen backbones, one file per family, each exposing the seams where adapters plug in.

pub mod bart;
pub mod clip;
pub mod encdec;
pub mod kv_cache;
pub mod llama;
pub mod t5;

pub use kv_cache::KvCache;

use anyhow::Result;
use candle_core::Tensor;

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
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
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
}

/// The plain model.
pub struct NoHooks;
impl LmHooks for NoHooks {
    fn modifies_projections(&self) -> bool {
        false
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
