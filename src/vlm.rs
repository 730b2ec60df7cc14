//! A vision-language model: a frozen vision tower, a frozen LM, and what is trained between
//! them (MemVP, the input-space baseline, or text-only LoRA), with its adapter files.

use crate::baselines::lora::{Lora, LoraConfig, LoraHooks};
use crate::checkpoint::save_safetensors_atomic;
use crate::data::DataOptions;
use crate::data::batch::{Batch, TextLayout};
use crate::generate::{self, LlamaStepper, Sampling};
use crate::image::{Norm, Preprocess};
use crate::lm::{LanguageModel, LoadedLm, load_lm};
use crate::memvp::{Memvp, MemvpConfig, Projector};
use crate::models::encdec::{EncDecStepper, key_mask};
use crate::models::llama::Positions;
use crate::models::{LmHooks, NoHooks, Proj, Site};
use crate::ops::{self, Activation};
use crate::rng::Rng;
use crate::vision::{LoadedVision, load_vision};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Visual tokens as FFN memory (the default).
    Memvp,
    /// LLaVA-style: projected visual tokens before the text, LM adapted with LoRA.
    InputSpace,
    /// Text-only LoRA: the image-blind reference.
    Lora,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpaceConfig {
    pub hidden_proj: usize,
    pub vision_layer: isize,
    pub norm: Norm,
}

impl Default for InputSpaceConfig {
    fn default() -> Self {
        Self { hidden_proj: 128, vision_layer: -2, norm: Norm::Imagenet }
    }
}

/// A base model an adapter was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// Path (absolute) or `random:<preset>@seed`.
    pub source: String,
    /// SHA-256 of its config and weight files (or of the preset for random towers).
    pub sha256: String,
    pub family: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dims {
    pub vision_width: usize,
    pub vision_blocks: usize,
    pub image_size: usize,
    pub visual_tokens: usize,
    pub lm_width: usize,
    pub lm_layers: usize,
}

/// `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub format: String,
    pub method: Method,
    /// Trained with every image indicator at 0 (the image-blind control).
    #[serde(default)]
    pub image_blind: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memvp: Option<MemvpConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_space: Option<InputSpaceConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    pub prompt: DataOptions,
    pub max_len: usize,
    pub vision: BaseModel,
    pub lm: BaseModel,
    pub dims: Dims,
    pub trainable_parameters: usize,
}

pub const ADAPTER_FORMAT: &str = "memvp-adapter/1";

pub enum Params {
    Memvp(Memvp),
    InputSpace { projector: Projector, lora: Lora },
    Lora(Lora),
}

impl Params {
    /// Trained tensors with their adapter-file names.
    pub fn named(&self) -> Vec<(String, Var)> {
        match self {
            Params::Memvp(m) => m.named(),
            Params::InputSpace { projector, lora } => {
                let mut v = projector.named();
                v.extend(lora.named());
                v
            }
            Params::Lora(l) => l.named(),
        }
    }
}

pub struct Vlm {
    pub vision: LoadedVision,
    pub lm: LoadedLm,
    pub cfg: AdapterConfig,
    pub params: Params,
}

/// Everything `Vlm::new` needs besides the two backbones.
#[derive(Clone, Debug)]
pub struct MethodSettings {
    pub method: Method,
    pub memvp: MemvpConfig,
    pub input_space: InputSpaceConfig,
    pub lora: LoraConfig,
    pub prompt: DataOptions,
    pub max_len: usize,
    pub image_blind: bool,
    pub seed: u64,
}

/// `(in, out)` features of a LoRA target.
type ProjDims = Box<dyn Fn(Site, usize, Proj) -> (usize, usize)>;

fn lora_dims(lm: &LoadedLm) -> Result<(Vec<(Site, usize)>, ProjDims)> {
    match &lm.model {
        LanguageModel::Llama(m) => {
            let c = m.cfg.clone();
            let f = move |_s: Site, _l: usize, p: Proj| match p {
                Proj::Q => (c.hidden_size, c.num_attention_heads * c.head_dim),
                Proj::K | Proj::V => (c.hidden_size, c.num_key_value_heads * c.head_dim),
                Proj::O => (c.num_attention_heads * c.head_dim, c.hidden_size),
            };
            Ok((vec![(Site::Decoder, m.n_layers())], Box::new(f)))
        }
        LanguageModel::T5(m) => {
            let (d, inner) = (m.cfg.d_model, m.cfg.num_heads * m.cfg.d_kv);
            let f = move |_s: Site, _l: usize, p: Proj| {
                if p == Proj::O { (inner, d) } else { (d, inner) }
            };
            Ok((vec![(Site::Encoder, m.n_encoder_layers()), (Site::Decoder, m.n_decoder_layers())], Box::new(f)))
        }
        LanguageModel::Bart(m) => {
            let d = m.hidden_size();
            Ok((
                vec![(Site::Encoder, m.n_encoder_layers()), (Site::Decoder, m.n_decoder_layers())],
                Box::new(move |_, _, _| (d, d)),
            ))
        }
    }
}

impl Vlm {
    pub fn new(vision: LoadedVision, lm: LoadedLm, s: &MethodSettings) -> Result<Self> {
        let (params, cfg) = Self::init(&vision, &lm, s)?;
        Ok(Self { vision, lm, cfg, params })
    }

    /// Fresh parameters and settings of another method on these backbones.
    pub fn make(&self, s: &MethodSettings) -> Result<(Params, AdapterConfig)> {
        Self::init(&self.vision, &self.lm, s)
    }

    fn init(vision: &LoadedVision, lm: &LoadedLm, s: &MethodSettings) -> Result<(Params, AdapterConfig)> {
        let dev = lm_device(lm).clone();
        let dtype = DType::F32;
        let vc = &vision.model.cfg;
        let (lm_width, lm_layers, branch_act) = lm_shape(lm);
        let vision_layer = match s.method {
            Method::Memvp => s.memvp.vision_layer,
            _ => s.input_space.vision_layer,
        };
        vision.model.resolve_layer(vision_layer)?;
        let params = match s.method {
            Method::Memvp => Params::Memvp(Memvp::init(
                s.memvp.clone(),
                vc.hidden_size,
                vc.num_hidden_layers,
                lm_width,
                branch_act,
                s.seed,
                dtype,
                &dev,
            )?),
            Method::InputSpace | Method::Lora => {
                let (sites, dims) = lora_dims(lm)?;
                let lora = Lora::init(s.lora.clone(), &sites, dims.as_ref(), s.seed, dtype, &dev)?;
                if s.method == Method::Lora {
                    Params::Lora(lora)
                } else {
                    let mut rng = Rng::derive(s.seed, "input-space-projector");
                    let projector =
                        Projector::init(vc.hidden_size, s.input_space.hidden_proj, lm_width, &mut rng, dtype, &dev)?;
                    Params::InputSpace { projector, lora }
                }
            }
        };
        if let (Method::Memvp, Some(layers)) = (s.method, &s.memvp.memory_layers) {
            let per_stack = match &lm.model {
                LanguageModel::Llama(m) => m.n_layers(),
                LanguageModel::T5(m) => m.n_encoder_layers().max(m.n_decoder_layers()),
                LanguageModel::Bart(m) => m.n_encoder_layers().max(m.n_decoder_layers()),
            };
            if let Some(bad) = layers.iter().find(|&&l| l >= per_stack) {
                bail!(
                    "memory layer {bad} does not exist: the LM has {per_stack} blocks per stack (valid: 0..{per_stack})"
                )
            }
            if layers.is_empty() {
                bail!("memory layers: the list is empty (leave it out to give every block memory)")
            }
        }
        if let Params::Memvp(m) = &params
            && vc.num_patches() > m.cfg.slots
        {
            bail!(
                "the vision tower gives {} visual tokens but MemVP has {} memory slots (raise slots)",
                vc.num_patches(),
                m.cfg.slots
            )
        }
        let cfg = AdapterConfig {
            format: ADAPTER_FORMAT.into(),
            method: s.method,
            image_blind: s.image_blind,
            memvp: (s.method == Method::Memvp).then(|| s.memvp.clone()),
            input_space: (s.method == Method::InputSpace).then(|| s.input_space.clone()),
            lora: (s.method != Method::Memvp).then(|| s.lora.clone()),
            prompt: s.prompt.clone(),
            max_len: s.max_len,
            vision: BaseModel {
                source: vision.source.clone(),
                sha256: vision.fingerprint.clone(),
                family: "clip".into(),
            },
            lm: BaseModel { source: abs(&lm.path), sha256: lm.fingerprint.clone(), family: lm.family.into() },
            dims: Dims {
                vision_width: vc.hidden_size,
                vision_blocks: vc.num_hidden_layers,
                image_size: vc.image_size,
                visual_tokens: vc.num_patches(),
                lm_width,
                lm_layers,
            },
            trainable_parameters: params.named().iter().map(|(_, t)| t.elem_count()).sum(),
        };
        Ok((params, cfg))
    }

    /// Loads a run's adapter onto its base models (or the given ones), refusing base models
    /// whose content differs from those it was trained on.
    pub fn from_run(run: &Path, vision: Option<&str>, lm: Option<&Path>) -> Result<Self> {
        let cfg_path = run.join("adapter_config.json");
        crate::checkpoint::require_file(&cfg_path)?;
        let cfg: AdapterConfig = serde_json::from_value(crate::checkpoint::read_json(&cfg_path)?)
            .with_context(|| format!("{}: not a memvp adapter config", cfg_path.display()))?;
        if cfg.format != ADAPTER_FORMAT {
            bail!("{}: unknown adapter format `{}` (expected {ADAPTER_FORMAT})", cfg_path.display(), cfg.format)
        }
        let dev = crate::util::device();
        let vsrc = vision.map(str::to_string).unwrap_or_else(|| cfg.vision.source.clone());
        let vis = load_vision(&vsrc, DType::F32, &dev)?;
        if vis.fingerprint != cfg.vision.sha256 {
            bail!(
                "{}: this adapter was trained on the vision tower {} (sha256 {}), but {} has sha256 {}: refusing to load it on another base model",
                cfg_path.display(),
                cfg.vision.source,
                short(&cfg.vision.sha256),
                vsrc,
                short(&vis.fingerprint)
            )
        }
        let lpath = lm.map(Path::to_path_buf).unwrap_or_else(|| cfg.lm.source.clone().into());
        let l = load_lm(&lpath, DType::F32, &dev)?;
        if l.fingerprint != cfg.lm.sha256 {
            bail!(
                "{}: this adapter was trained on the language model {} (sha256 {}), but {} has sha256 {}: refusing to load it on another base model",
                cfg_path.display(),
                cfg.lm.source,
                short(&cfg.lm.sha256),
                lpath.display(),
                short(&l.fingerprint)
            )
        }
        let s = MethodSettings {
            method: cfg.method,
            memvp: cfg.memvp.clone().unwrap_or_default(),
            input_space: cfg.input_space.clone().unwrap_or_default(),
            lora: cfg.lora.clone().unwrap_or_default(),
            prompt: cfg.prompt.clone(),
            max_len: cfg.max_len,
            image_blind: cfg.image_blind,
            seed: 0,
        };
        let v = Self::new(vis, l, &s)?;
        let wf = run.join("adapter_model.safetensors");
        crate::checkpoint::require_file(&wf)?;
        let tensors = candle_core::safetensors::load(&wf, &dev)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", wf.display()))?;
        for (name, var) in v.named() {
            let t = tensors.get(&name).with_context(|| format!("{}: tensor `{name}` missing", wf.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, this base model needs {:?}",
                    wf.display(),
                    t.dims(),
                    var.dims()
                )
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(Self { cfg: AdapterConfig { trainable_parameters: v.cfg.trainable_parameters, ..cfg }, ..v })
    }

    pub fn named(&self) -> Vec<(String, Var)> {
        self.params.named()
    }

    /// `adapter_config.json` + `adapter_model.safetensors` (trained tensors only, f32).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .named()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let meta = [
            ("format".to_string(), "pt".to_string()),
            ("method".to_string(), serde_json::to_string(&self.cfg.method)?),
        ];
        save_safetensors_atomic(&tensors, Some(meta.into_iter().collect()), &dir.join("adapter_model.safetensors"))?;
        crate::util::write_json_atomic(&dir.join("adapter_config.json"), &self.cfg)
    }

    pub fn layout(&self) -> TextLayout {
        match self.lm.model.encdec() {
            None => TextLayout::DecoderOnly,
            Some(m) => TextLayout::EncoderDecoder { decoder_start: m.special_tokens().decoder_start },
        }
    }

    pub fn eos(&self) -> u32 {
        self.lm.eos.first().copied().unwrap_or(0)
    }

    pub fn preprocess(&self) -> Preprocess {
        let norm = match &self.params {
            Params::Memvp(m) => m.cfg.norm,
            _ => self.cfg.input_space.as_ref().map(|c| c.norm).unwrap_or(Norm::Imagenet),
        };
        Preprocess { size: self.vision.model.cfg.image_size, norm }
    }

    /// The longest text (prompt and answer) that fits: `max_len`, and the positions the LM has
    /// left after the input-space baseline's visual tokens.
    pub fn max_text_len(&self) -> usize {
        let positions = match &self.lm.model {
            LanguageModel::Llama(m) => m.cfg.max_position_embeddings,
            LanguageModel::Bart(m) => m.cfg.max_position_embeddings,
            LanguageModel::T5(_) => usize::MAX,
        };
        let prefix = if self.cfg.method == Method::InputSpace { self.cfg.dims.visual_tokens } else { 0 };
        self.cfg.max_len.min(positions.saturating_sub(prefix)).max(2)
    }

    /// Whether batches should carry images.
    pub fn uses_images(&self) -> bool {
        !self.cfg.image_blind && self.cfg.method != Method::Lora
    }

    fn input_space_prefix(&self, projector: &Projector, pixels: Option<&Tensor>, b: usize) -> Result<Tensor> {
        let c = self.cfg.input_space.as_ref().unwrap();
        let n = self.vision.model.cfg.num_patches();
        match pixels {
            Some(p) => {
                let f = self.vision.model.patch_features(p, c.vision_layer, &NoHooks)?.detach();
                projector.forward(&f)
            }
            None => Ok(Tensor::zeros((b, n, self.cfg.dims.lm_width), DType::F32, lm_device(&self.lm))?),
        }
    }

    /// Mean cross-entropy over the answer tokens of a batch.
    pub fn loss(&self, batch: &Batch, rng: &mut Rng, train: bool) -> Result<Tensor> {
        let cell = RefCell::new(std::mem::replace(rng, Rng::new(0)));
        let out = self.loss_inner(batch, &cell, train);
        *rng = cell.into_inner();
        out
    }

    /// The hooks of the trained part, and the input-space baseline's visual tokens.
    fn hooks<'a>(
        &'a self,
        pixels: Option<&Tensor>,
        indicator: &[f32],
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<(Box<dyn LmHooks + 'a>, Option<Tensor>)> {
        Ok(match &self.params {
            Params::Memvp(mv) => (Box::new(mv.memory(&self.vision.model, pixels, indicator, train, rng)?), None),
            Params::InputSpace { projector, lora } => {
                let vis = self.input_space_prefix(projector, pixels, indicator.len())?;
                (Box::new(LoraHooks { lora, train, rng }), Some(vis))
            }
            Params::Lora(lora) => (Box::new(LoraHooks { lora, train, rng }), None),
        })
    }

    fn loss_inner(&self, batch: &Batch, rng: &RefCell<Rng>, train: bool) -> Result<Tensor> {
        let (b, t) = batch.input_ids.dims2()?;
        let dev = batch.input_ids.device().clone();
        let (hooks, prefix) = self.hooks(batch.pixels.as_ref(), &batch.indicator, train, rng)?;
        let n = prefix.as_ref().map(|p| p.dims()[1]).unwrap_or(0);
        // Key mask `[b, n + t]`: the prefix of text-only rows, and (encoders) text padding.
        let mask = |pad_text: bool| {
            let lens = pad_text.then_some(batch.input_lens.as_slice());
            key_mask(b, t, lens, Some((n, batch.indicator.as_slice())), &dev)
        };
        let with_prefix = |x: Tensor| -> Result<Tensor> {
            Ok(match &prefix {
                Some(p) => Tensor::cat(&[p, &x], 1)?,
                None => x,
            })
        };
        // (hidden states, rows per sample in them, rows before the first text position)
        let (h, rows, offset) = match &self.lm.model {
            LanguageModel::Llama(m) => {
                // Right padding under a causal mask needs no key mask for the trained positions.
                let x = with_prefix(m.embed(&batch.input_ids)?)?;
                (m.forward_embeds(&x, &Positions::From(0), None, mask(false)?.as_ref(), hooks.as_ref())?, t + n, n)
            }
            lm => {
                let m = lm.encdec().unwrap();
                let dec = batch.decoder_ids.as_ref().context("an encoder-decoder batch without decoder inputs")?;
                let enc_mask = mask(true)?;
                let enc =
                    m.encode_embeds(&with_prefix(m.embed(&batch.input_ids)?)?, enc_mask.as_ref(), hooks.as_ref())?;
                let td = dec.dims()[1];
                (m.decode(dec, &enc, enc_mask.as_ref(), None, hooks.as_ref())?, td, 0)
            }
        };
        let d = h.dims()[2];
        let grid = rows - offset;
        // Only the answer positions go through the LM head.
        let pos: Vec<u32> = batch
            .loss_positions
            .iter()
            .map(|&p| (p as usize / grid * rows + offset + p as usize % grid) as u32)
            .collect();
        let idx = Tensor::from_vec(pos, batch.loss_positions.len(), h.device())?;
        let hs = h.reshape((b * rows, d))?.index_select(&idx, 0)?;
        let logits = match &self.lm.model {
            LanguageModel::Llama(m) => m.logits(&hs)?,
            lm => lm.encdec().unwrap().logits(&hs)?,
        };
        Ok(ops::cross_entropy(&logits, &batch.loss_targets)?)
    }

    /// Greedy (or sampled) answers for prompts (ids) with their images.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        pixels: Option<&Tensor>,
        indicator: &[f32],
        s: &Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_until(prompts, pixels, indicator, s, &self.lm.eos)
    }

    /// As [`Self::generate`], stopping at the given end tokens.
    pub fn generate_until(
        &self,
        prompts: &[Vec<u32>],
        pixels: Option<&Tensor>,
        indicator: &[f32],
        s: &Sampling,
        eos: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        self.with_stepper(prompts, pixels, indicator, &mut |st, first| generate::continue_batch(st, first, s, eos))
    }

    /// Runs the vision side and the prompts (the prefill), then hands the decoding state and
    /// the logits after each prompt to `f`.
    pub fn with_stepper<R>(
        &self,
        prompts: &[Vec<u32>],
        pixels: Option<&Tensor>,
        indicator: &[f32],
        f: &mut dyn FnMut(&mut dyn generate::Stepper, &Tensor) -> Result<R>,
    ) -> Result<R> {
        let rng = RefCell::new(Rng::new(0));
        let pixels = if self.uses_images() { pixels } else { None };
        let indicator: Vec<f32> = if self.uses_images() { indicator.to_vec() } else { vec![0.0; prompts.len()] };
        let (hooks, prefix) = self.hooks(pixels, &indicator, false, &rng)?;
        let prefix = prefix.as_ref().map(|p| (p, indicator.as_slice()));
        match &self.lm.model {
            LanguageModel::Llama(m) => {
                let (mut st, first) = LlamaStepper::prefill_with_prefix(m, hooks.as_ref(), prompts, prefix)?;
                f(&mut st, &first)
            }
            lm => {
                let m = lm.encdec().unwrap();
                let start = m.special_tokens().decoder_start;
                let (mut st, first) = EncDecStepper::prefill_with_prefix(m, hooks.as_ref(), prompts, prefix, start)?;
                f(&mut st, &first)
            }
        }
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

fn abs(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

pub fn lm_device(lm: &LoadedLm) -> &Device {
    match &lm.model {
        LanguageModel::Llama(m) => m.device(),
        other => other.encdec().unwrap().device(),
    }
}

/// (width, blocks, the memory branch's activation) of an LM: the FFN's own activation, or its
/// gate's for gated FFNs (no gate, as the released LLaMA code does).
pub fn lm_shape(lm: &LoadedLm) -> (usize, usize, Activation) {
    match &lm.model {
        LanguageModel::Llama(m) => (m.hidden_size(), m.n_layers(), m.cfg.hidden_act),
        LanguageModel::T5(m) => (m.hidden_size(), m.n_encoder_layers() + m.n_decoder_layers(), m.cfg.dense_act_fn),
        LanguageModel::Bart(m) => {
            (m.hidden_size(), m.n_encoder_layers() + m.n_decoder_layers(), m.cfg.activation_function)
        }
    }
}
