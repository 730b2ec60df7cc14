//! What is trained between two frozen backbones, in the manner of PEFT: an [`Adapter`] is a
//! small object holding named trained tensors that installs hooks into an unchanged base (and,
//! for the input-space baseline, a prefix of embeddings before the text). Each method is one
//! file; [`METHODS`] registers them by the name that `--method`, `config.toml` and
//! `adapter_config.json` use.
//!
//! Adding a method: a new file here with a struct implementing [`Adapter`], its settings
//! section(s) and a `SPEC: MethodSpec`, plus one line in [`METHODS`].

pub mod adem;
pub mod file;
pub mod input_space;
pub mod lora;
pub mod memvp;

use crate::data::image::Norm;
use crate::models::clip::{ClipVision, ClipVisionConfig};
use crate::models::{LanguageModel, LmHooks};
use crate::rng::Rng;
use crate::settings::{Check, Flag};
use anyhow::{Context, Result, bail};
use candle_core::{Tensor, Var};
use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Settings sections by name (`memvp`, `lora`, ...), as they appear in `config.toml` and
/// `adapter_config.json`.
pub type Sections = BTreeMap<String, serde_json::Value>;

/// What an adapter puts into the base for one batch.
pub struct Installed<'a> {
    pub hooks: Box<dyn LmHooks + 'a>,
    /// Embeddings `[b, n, d]` to place before the LM's input (input-space methods).
    pub prefix: Option<Tensor>,
}

/// The images of a batch as an adapter sees them.
#[derive(Clone, Copy)]
pub struct Visual<'a> {
    /// Pixels `[b, 3, s, s]`, when any row has an image.
    pub pixels: Option<&'a Tensor>,
    /// 1 for rows with an image, 0 for text-only rows.
    pub indicator: &'a [f32],
}

/// What one request's image gives an adapter, computed once and cacheable: tensors that travel
/// with the request's row of a decoding batch (`[1, ..]` each; MemVP: its K and V memory) and
/// an embedding prefix placed before its prompt at the prefill (input-space: `[1, n, d]`).
#[derive(Clone)]
pub struct RequestVisual {
    pub rows: Vec<Tensor>,
    pub prefix: Option<Tensor>,
}

impl RequestVisual {
    /// Bytes held (for the cache's bound).
    pub fn bytes(&self) -> usize {
        self.rows.iter().chain(&self.prefix).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }
}

/// A trained method on a frozen vision tower and a frozen LM.
pub trait Adapter: Send + Sync {
    /// The registered name (`memvp`, `input-space`, `lora`).
    fn method(&self) -> &'static str;
    /// Trained tensors, by their names in `adapter_model.safetensors`.
    fn named(&self) -> Vec<(String, Var)>;
    /// Whether batches should carry images.
    fn uses_images(&self) -> bool {
        true
    }
    /// How images are normalised for this adapter's vision features.
    fn norm(&self) -> Norm;
    /// Positions this adapter adds to the LM's input (0 for memory-space methods).
    fn prefix_tokens(&self) -> usize {
        0
    }
    /// Tokens put after BOS of every prompt (ADEM-VL's `"Image: "` and CLS slot).
    fn prompt_insert(&self) -> Option<&crate::data::batch::PromptInsert> {
        None
    }
    /// Runs the vision side for a batch and returns what goes into the LM. `train` turns
    /// dropout on, drawing from `rng`.
    fn install<'a>(
        &'a self,
        vision: &'a ClipVision,
        visual: Visual<'_>,
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>>;
    /// [`Adapter::install`] for generation (no dropout, no backward): what the hooks read is cut
    /// from the graph of the vision forward, so that neither that graph nor the LM's forward
    /// over the prompt is kept alive while tokens are generated (at LLaMA-7B with a ViT-L/14
    /// tower that graph was the largest thing in memory).
    fn install_inference<'a>(
        &'a self,
        vision: &'a ClipVision,
        visual: Visual<'_>,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>> {
        let inst = self.install(vision, visual, false, rng)?;
        Ok(Installed { hooks: inst.hooks, prefix: inst.prefix.map(|p| p.detach()) })
    }
    /// Serving: the visual part of one request (`pixels` `[1, 3, s, s]`, or none for a
    /// text-only question), in inference mode.
    fn request_visual(&self, vision: &ClipVision, pixels: Option<&Tensor>) -> Result<RequestVisual>;
    /// Serving: the hooks of a decoding batch whose rows carry the given [`RequestVisual::rows`],
    /// stacked along the batch (`rows[j]` is `[b, ..]`).
    fn batch_hooks<'a>(&'a self, rows: &[Tensor], rng: &'a RefCell<Rng>) -> Result<Box<dyn LmHooks + 'a>>;
    /// The settings sections written to `adapter_config.json`.
    fn sections(&self) -> Result<Sections>;
    /// For tools that need a method's internals (the bench's FLOP counts, tests).
    fn as_any(&self) -> &dyn Any;
}

impl dyn Adapter + '_ {
    pub fn downcast<T: 'static>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }
    pub fn trainable_parameters(&self) -> usize {
        self.named().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// What a method's constructor gets.
pub struct Build<'a> {
    pub vision: &'a ClipVisionConfig,
    pub vision_model: &'a ClipVision,
    pub lm: &'a dyn LanguageModel,
    /// The LM's tokenizer (for methods that put tokens into the prompt).
    pub tok: &'a crate::checkpoint::Tok,
    /// Seeds the initialisation.
    pub seed: u64,
}

/// A registered method.
pub struct MethodSpec {
    /// The name `--method` takes.
    pub name: &'static str,
    pub about: &'static str,
    /// The settings sections it reads (each a table of `config.toml` and an object of
    /// `adapter_config.json`).
    pub sections: &'static [&'static str],
    /// Its command-line flags (each sets keys of its sections).
    pub flags: &'static [Flag],
    /// The ranges of its numeric settings, checked before any work.
    pub checks: &'static [Check],
    /// Fresh parameters from settings (missing keys take their defaults).
    pub build: fn(&Build, &Sections) -> Result<Box<dyn Adapter>>,
    /// Its sections from the given ones: defaults filled in, unknown keys refused.
    pub resolve: fn(&Sections) -> Result<Sections>,
}

/// Every method memvp knows.
pub const METHODS: &[&MethodSpec] = &[&memvp::SPEC, &adem::SPEC, &input_space::SPEC, &lora::SPEC];

pub fn spec(name: &str) -> Result<&'static MethodSpec> {
    METHODS.iter().copied().find(|m| m.name == name).with_context(|| {
        format!("unknown method `{name}` (known: {})", METHODS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "))
    })
}

/// Every section name any method reads.
pub fn all_sections() -> Vec<&'static str> {
    let mut v: Vec<&str> = METHODS.iter().flat_map(|m| m.sections.iter().copied()).collect();
    v.sort();
    v.dedup();
    v
}

/// Section `name` of `sections` as `T`, its defaults for missing keys; unknown keys are
/// refused by `T` (`deny_unknown_fields`).
pub fn section<T: serde::de::DeserializeOwned + Default + serde::Serialize>(
    sections: &Sections,
    name: &str,
) -> Result<T> {
    match sections.get(name) {
        None => Ok(T::default()),
        Some(v) => {
            let mut base = serde_json::to_value(T::default())?;
            let serde_json::Value::Object(over) = v else { bail!("settings section `{name}` is not a table") };
            if let serde_json::Value::Object(b) = &mut base {
                for (k, x) in over {
                    b.insert(k.clone(), x.clone());
                }
            }
            serde_json::from_value(base).map_err(|e| anyhow::anyhow!("settings section `{name}`: {e}"))
        }
    }
}

/// `(name, value)` of a typed section, for [`Adapter::sections`].
pub fn to_section(name: &str, v: &impl serde::Serialize) -> Result<(String, serde_json::Value)> {
    Ok((name.to_string(), serde_json::to_value(v)?))
}
