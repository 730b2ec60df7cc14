//! A vision-language model: frozen backbones ([`Base`]) and one trained [`Adapter`] on them.
//! Several adapters may share one base (the bench holds two), since the base is never changed.

use crate::adapters::file::{ADAPTER_FORMAT, AdapterConfig, BaseModel, Dims};
use crate::adapters::{self, Adapter, Build, Sections, Visual};
use crate::data::DataOptions;
use crate::data::batch::{Batch, TextLayout};
use crate::data::image::Preprocess;
use crate::generate::{self, BeamStepper, Finished, Sampling, Sequence};
use crate::models::{LoadedLm, LoadedVision, Precision, TeacherForcing, load_lm, load_vision};
use crate::ops;
use crate::rng::Rng;
use anyhow::{Result, bail};
use candle_core::{DType, Tensor, Var};
use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

/// The frozen vision tower and language model.
pub struct Base {
    pub vision: LoadedVision,
    pub lm: LoadedLm,
}

/// What a fresh adapter is made from besides the base.
#[derive(Clone, Debug)]
pub struct AdapterSettings {
    /// A registered method (`adapters::METHODS`).
    pub method: String,
    /// Its settings sections (missing keys take their defaults).
    pub sections: Sections,
    pub prompt: DataOptions,
    pub max_len: usize,
    pub image_blind: bool,
    /// Seeds the initialisation.
    pub seed: u64,
}

pub struct Vlm {
    pub base: Arc<Base>,
    pub adapter: Box<dyn Adapter>,
    pub cfg: AdapterConfig,
    /// Training steps keep only each LM block's input and recompute the blocks in the backward
    /// (`--grad-checkpoint`): less memory, about one more forward of the LM per step.
    pub grad_checkpoint: bool,
}

impl Vlm {
    /// A fresh adapter of the given method on `base`.
    pub fn new(base: Arc<Base>, s: &AdapterSettings) -> Result<Self> {
        let spec = adapters::spec(&s.method)?;
        let vc = &base.vision.model.cfg;
        let lm = base.lm.model.as_ref();
        let b = Build { vision: vc, vision_model: &base.vision.model, lm, tok: &base.lm.tok, seed: s.seed };
        let adapter = (spec.build)(&b, &s.sections)?;
        let cfg = AdapterConfig {
            format: ADAPTER_FORMAT.into(),
            method: spec.name.to_string(),
            image_blind: s.image_blind,
            sections: adapter.sections()?,
            prompt: s.prompt.clone(),
            max_len: s.max_len,
            vision: BaseModel {
                source: base.vision.source.clone(),
                sha256: base.vision.fingerprint.clone(),
                tokenizer_sha256: None,
                family: "clip".into(),
            },
            lm: BaseModel {
                source: abs(&base.lm.path),
                sha256: base.lm.fingerprint.clone(),
                tokenizer_sha256: base.lm.tokenizer_fingerprint.clone(),
                family: base.lm.family().into(),
            },
            dims: Dims {
                vision_width: vc.hidden_size,
                vision_blocks: vc.num_hidden_layers,
                image_size: vc.image_size,
                visual_tokens: vc.num_patches(),
                lm_width: lm.width(),
                lm_layers: lm.total_layers(),
            },
            trainable_parameters: adapter.trainable_parameters(),
        };
        Ok(Self { base, adapter, cfg, grad_checkpoint: false })
    }

    /// Loads a run's adapter onto its base models (or the given ones), refusing base models
    /// whose content differs from those it was trained on.
    pub fn from_run(run: &Path, vision: Option<&str>, lm: Option<&Path>, prec: Precision) -> Result<Self> {
        let cfg = AdapterConfig::read(run)?;
        let cfg_path = run.join(adapters::file::CONFIG_FILE);
        let dev = crate::util::device();
        let vsrc = vision.map(str::to_string).unwrap_or_else(|| cfg.vision.source.clone());
        let vis = load_vision(&vsrc, DType::F32, prec.vision, &dev)?;
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
        let l = load_lm(&lpath, DType::F32, prec.lm, &dev)?;
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
        if let (Some(want), Some(got)) = (&cfg.lm.tokenizer_sha256, &l.tokenizer_fingerprint)
            && want != got
        {
            bail!(
                "{}: this adapter was trained with the tokenizer of {} (sha256 {}), but the tokenizer files in {} have sha256 {}: refusing to load it with another tokenizer",
                cfg_path.display(),
                cfg.lm.source,
                short(want),
                lpath.display(),
                short(got)
            )
        }
        let base = Arc::new(Base { vision: vis, lm: l });
        Self::from_run_on(run, base)
    }

    /// Loads a run's adapter onto already loaded base models (a server shares them between
    /// adapters), refusing bases whose content differs from the adapter's.
    pub fn from_run_on(run: &Path, base: Arc<Base>) -> Result<Self> {
        let cfg = AdapterConfig::read(run)?;
        if !cfg.matches(&base) {
            bail!(
                "{}: this adapter was trained on other base models ({} / {}) than the given ones ({} / {})",
                run.join(adapters::file::CONFIG_FILE).display(),
                cfg.vision.source,
                cfg.lm.source,
                base.vision.source,
                base.lm.path.display()
            )
        }
        let v = Self::new(base, &cfg.adapter_settings())?;
        adapters::file::load_weights(run, &v.named())?;
        Ok(Self { cfg: AdapterConfig { trainable_parameters: v.cfg.trainable_parameters, ..cfg }, ..v })
    }

    pub fn lm(&self) -> &LoadedLm {
        &self.base.lm
    }

    pub fn vision(&self) -> &LoadedVision {
        &self.base.vision
    }

    pub fn named(&self) -> Vec<(String, Var)> {
        self.adapter.named()
    }

    /// The tokens the adapter puts after BOS of every prompt (ADEM-VL), if any.
    pub fn prompt_insert(&self) -> Option<&crate::data::batch::PromptInsert> {
        self.adapter.prompt_insert()
    }

    /// Puts the adapter's tokens into prompt ids (see [`Self::prompt_insert`]); a row has an
    /// image only when the adapter uses images.
    pub fn insert_prompt(&self, ids: &mut Vec<u32>, has_image: bool) {
        if let Some(i) = self.prompt_insert() {
            i.apply(ids, has_image && self.uses_images());
        }
    }

    /// `adapter_config.json` + `adapter_model.safetensors` (trained tensors only, f32).
    pub fn save(&self, dir: &Path) -> Result<()> {
        adapters::file::write(dir, &self.cfg, &self.named())
    }

    pub fn layout(&self) -> TextLayout {
        match self.lm().model.decoder_start() {
            None => TextLayout::DecoderOnly,
            Some(decoder_start) => TextLayout::EncoderDecoder { decoder_start },
        }
    }

    pub fn eos(&self) -> u32 {
        self.lm().eos.first().copied().unwrap_or(0)
    }

    pub fn preprocess(&self) -> Preprocess {
        Preprocess { size: self.vision().model.cfg.image_size, norm: self.adapter.norm() }
    }

    /// The longest text (prompt and answer) that fits: `max_len`, and the positions the LM has
    /// left after the adapter's prefix.
    pub fn max_text_len(&self) -> usize {
        let positions = self.lm().model.max_positions().unwrap_or(usize::MAX);
        self.cfg.max_len.min(positions.saturating_sub(self.adapter.prefix_tokens())).max(2)
    }

    /// Whether batches should carry images.
    pub fn uses_images(&self) -> bool {
        !self.cfg.image_blind && self.adapter.uses_images()
    }

    /// Mean cross-entropy over the answer tokens of a batch.
    pub fn loss(&self, batch: &Batch, rng: &mut Rng, train: bool) -> Result<Tensor> {
        let cell = RefCell::new(std::mem::replace(rng, Rng::new(0)));
        let out = self.loss_inner(batch, &cell, train);
        *rng = cell.into_inner();
        out
    }

    fn loss_inner(&self, batch: &Batch, rng: &RefCell<Rng>, train: bool) -> Result<Tensor> {
        let (b, _) = batch.input_ids.dims2()?;
        // Batches are built on the CPU; the models may live on a GPU.
        let dev = self.lm().model.device().clone();
        let on_dev = |t: &Tensor| t.to_device(&dev);
        let pixels = batch.pixels.as_ref().map(on_dev).transpose()?;
        let (input_ids, decoder_ids) = (on_dev(&batch.input_ids)?, batch.decoder_ids.as_ref().map(on_dev).transpose()?);
        let visual = Visual { pixels: pixels.as_ref(), indicator: &batch.indicator };
        let inst = self.adapter.install(&self.vision().model, visual, train, rng)?;
        let tf = TeacherForcing {
            input_ids: &input_ids,
            input_lens: &batch.input_lens,
            decoder_ids: decoder_ids.as_ref(),
            prefix: inst.prefix.as_ref().map(|p| (p, batch.indicator.as_slice())),
        };
        let lm = self.lm().model.as_ref();
        let mut loss = |hd: &crate::models::Hidden| -> anyhow::Result<Tensor> {
            let (h, rows, offset) = (&hd.h, hd.rows, hd.offset);
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
            Ok(ops::cross_entropy(&lm.logits(&hs)?, &batch.loss_targets)?)
        };
        if self.grad_checkpoint && train {
            return lm.teacher_forcing_checkpointed(&tf, inst.hooks.as_ref(), &mut loss);
        }
        let hd = lm.teacher_forcing(&tf, inst.hooks.as_ref())?;
        loss(&hd)
    }

    /// Greedy (or sampled) answers for prompts (ids) with their images.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        pixels: Option<&Tensor>,
        indicator: &[f32],
        s: &Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        let seqs = vec![Sequence { sampling: s.clone(), stop: self.lm().eos.clone() }; prompts.len()];
        Ok(self.decode(prompts, pixels, indicator, &seqs)?.into_iter().map(|f| f.ids).collect())
    }

    /// Each prompt with its own sampling settings and stop tokens, batched.
    pub fn decode(
        &self,
        prompts: &[Vec<u32>],
        pixels: Option<&Tensor>,
        indicator: &[f32],
        seqs: &[Sequence],
    ) -> Result<Vec<Finished>> {
        self.with_stepper(prompts, pixels, indicator, &mut |st, first| generate::decode(st, first, seqs))
    }

    /// Runs the vision side and the prompts (the prefill), then hands the decoding state and
    /// the logits after each prompt to `f`.
    pub fn with_stepper<R>(
        &self,
        prompts: &[Vec<u32>],
        pixels: Option<&Tensor>,
        indicator: &[f32],
        f: &mut dyn FnMut(&mut dyn BeamStepper, &Tensor) -> Result<R>,
    ) -> Result<R> {
        let rng = RefCell::new(Rng::new(0));
        let pixels =
            if self.uses_images() { pixels.map(|p| p.to_device(self.lm().model.device())).transpose()? } else { None };
        let indicator: Vec<f32> = if self.uses_images() { indicator.to_vec() } else { vec![0.0; prompts.len()] };
        let visual = Visual { pixels: pixels.as_ref(), indicator: &indicator };
        let inst = self.adapter.install_inference(&self.vision().model, visual, &rng)?;
        let prefix = inst.prefix.as_ref().map(|p| (p, indicator.as_slice()));
        let (mut st, first) = self.lm().model.prefill(inst.hooks.as_ref(), prompts, prefix)?;
        f(st.as_mut(), &first)
    }
}

impl AdapterConfig {
    /// Whether `base` holds the models (by content) this adapter was trained on.
    pub fn matches(&self, base: &Base) -> bool {
        let tok_ok = match (&self.lm.tokenizer_sha256, &base.lm.tokenizer_fingerprint) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.vision.sha256 == base.vision.fingerprint && self.lm.sha256 == base.lm.fingerprint && tok_ok
    }

    /// The settings that rebuild this adapter's parameters (before its weights are loaded).
    pub fn adapter_settings(&self) -> AdapterSettings {
        AdapterSettings {
            method: self.method.clone(),
            sections: self.sections.clone(),
            prompt: self.prompt.clone(),
            max_len: self.max_len,
            image_blind: self.image_blind,
            seed: 0,
        }
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

fn abs(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}
