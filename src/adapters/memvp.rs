//! MemVP: the visual features become extra key/value memory of every FFN of a frozen LM.
//!
//! ```text
//! features = post_ln(ViT_{layer}(image))[1:]            n x c   (vision adapters inside)
//! Z        = indicator * visual_scale * P(features)     n x d   P = Linear(c,h) SiLU Linear(h,d)
//! Z        = pad(Z, M rows)                             M x d
//! K = Z + E_k,  V = Z + E_v                             once per sample, shared by all layers
//! block:  out = h + FFN(u) + s * Dropout(act(u Kᵀ)) V   act = the FFN's own (gate) activation
//! vision: x + MLP(ln2 x) + s_v * Up(Dropout(GELU(Down(ln2 x))))
//! ```
//! Defaults are the released code's values; every constant is a setting.

use super::{Adapter, Build, Installed, MethodSpec, RequestVisual, Sections, Visual, section, to_section};
use crate::data::image::Norm;
use crate::models::clip::ClipVision;
use crate::models::{LmHooks, Site, VisionHooks};
use crate::ops::nn::{Projector, dropout, dropout_mask, linear_t, var, xavier_uniform};
use crate::ops::{self, Activation};
use crate::rng::Rng;
use crate::settings::{Check, Flag, Kind, Rule};
use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// Which stacks of an encoder-decoder LM get the memory branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemorySites {
    Encoder,
    Decoder,
    Both,
}

impl MemorySites {
    pub fn includes(self, s: Site) -> bool {
        matches!(
            (self, s),
            (MemorySites::Both, _) | (MemorySites::Encoder, Site::Encoder) | (MemorySites::Decoder, Site::Decoder)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemvpConfig {
    /// `M` (`emb` in the released code): memory slots, at least the number of visual tokens.
    pub slots: usize,
    /// `h` (`hidden_proj`): projector width.
    pub hidden_proj: usize,
    /// `lambda`: scale of the projected visual tokens.
    pub visual_scale: f64,
    /// `s` (`adapter_scale`): scale of the memory branch.
    pub adapter_scale: f64,
    /// Dropout on the memory branch's activations.
    pub memory_dropout: f64,
    /// Width `r` of the parallel adapters in the vision blocks (0 = none).
    pub vision_adapter_dim: usize,
    pub vision_adapter_scale: f64,
    pub vision_adapter_dropout: f64,
    /// Hidden-state index of the vision tower (transformers' counting; -2 = penultimate).
    pub vision_layer: isize,
    pub norm: Norm,
    /// LM blocks that get memory; `None` = all.
    pub memory_layers: Option<Vec<usize>>,
    /// For encoder-decoder LMs.
    pub memory_sites: MemorySites,
}

impl Default for MemvpConfig {
    fn default() -> Self {
        Self {
            slots: 320,
            hidden_proj: 128,
            visual_scale: 0.01,
            adapter_scale: 0.1,
            memory_dropout: 0.1,
            vision_adapter_dim: 12,
            vision_adapter_scale: 0.1,
            vision_adapter_dropout: 0.1,
            vision_layer: -2,
            norm: Norm::Imagenet,
            memory_layers: None,
            memory_sites: MemorySites::Both,
        }
    }
}

/// The trained tensors, named as in `adapter_model.safetensors`.
pub struct Memvp {
    pub cfg: MemvpConfig,
    pub projector: Projector,
    pub key_embed: Var,
    pub value_embed: Var,
    /// `(down [r, c], up [c, r])` per vision block.
    pub vision_adapters: Vec<(Var, Var)>,
    /// The memory branch's activation: the FFN's own, or its gate's for gated FFNs.
    pub branch_act: Activation,
}

impl Memvp {
    /// Fresh parameters initialised as the released code does.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        cfg: MemvpConfig,
        vision_width: usize,
        vision_blocks: usize,
        lm_width: usize,
        branch_act: Activation,
        seed: u64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let mut rng = Rng::derive(seed, "memvp-init");
        let (c, h, d, m) = (vision_width, cfg.hidden_proj, lm_width, cfg.slots);
        let projector = Projector::init(c, h, d, &mut rng, dtype, dev)?;
        let ek: Vec<f32> = (0..m * d).map(|_| (rng.normal() * 0.02) as f32).collect();
        let vision_adapters = init_vision_adapters(&mut rng, vision_blocks, c, cfg.vision_adapter_dim, dtype, dev)?;
        Ok(Self {
            projector,
            key_embed: var(Tensor::from_vec(ek, (m, d), dev)?.to_dtype(dtype)?)?,
            value_embed: var(Tensor::zeros((m, d), dtype, dev)?)?,
            vision_adapters,
            branch_act,
            cfg,
        })
    }

    /// Trained tensors with their file names.
    pub fn named(&self) -> Vec<(String, Var)> {
        let mut v = self.projector.named();
        v.push(("memory.key_embed".into(), self.key_embed.clone()));
        v.push(("memory.value_embed".into(), self.value_embed.clone()));
        v.extend(vision_adapter_names(&self.vision_adapters));
        v
    }

    /// Sets every tensor from a name → tensor map (an adapter file), checking shapes.
    pub fn load_tensors(&self, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        for (name, v) in self.named() {
            let t = get(&name)?;
            if t.dims() != v.dims() {
                bail!("adapter tensor `{name}` has shape {:?}, expected {:?}", t.dims(), v.dims())
            }
            v.set(&t.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    /// `P(features)`: `[b, n, c]` → `[b, n, d]`.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        self.projector.forward(features)
    }

    pub(crate) fn vision_hooks<'a>(&'a self, train: bool, rng: &'a RefCell<Rng>) -> VisionAdapters<'a> {
        let c = &self.cfg;
        VisionAdapters {
            adapters: &self.vision_adapters,
            scale: c.vision_adapter_scale,
            dropout: c.vision_adapter_dropout,
            train,
            rng,
        }
    }

    /// The visual tokens `[b, n, c]` of a batch of pixels, with the vision adapters active.
    pub fn features(&self, vision: &ClipVision, pixels: &Tensor, train: bool, rng: &RefCell<Rng>) -> Result<Tensor> {
        vision.patch_features(pixels, self.cfg.vision_layer, &self.vision_hooks(train, rng))
    }

    /// The per-sample memory `K, V: [b, M, d]` from visual tokens (or none: text only).
    /// `indicator[i]` is 1 for samples with an image and 0 for text-only samples.
    pub fn memory_from_features(
        &self,
        features: Option<&Tensor>,
        indicator: &[f32],
        b: usize,
    ) -> Result<(Tensor, Tensor)> {
        let ek = self.key_embed.as_tensor();
        let (m, d) = ek.dims2()?;
        let dev = ek.device();
        let z = match features {
            Some(f) => {
                let n = f.dims()[1];
                if n > m {
                    bail!("{n} visual tokens do not fit in {m} memory slots (raise --slots)")
                }
                let ind = Tensor::from_slice(indicator, (b, 1, 1), dev)?.to_dtype(ek.dtype())?;
                let z = (self.project(f)? * self.cfg.visual_scale)?.broadcast_mul(&ind)?;
                if n < m { Tensor::cat(&[&z, &Tensor::zeros((b, m - n, d), z.dtype(), dev)?], 1)? } else { z }
            }
            None => Tensor::zeros((b, m, d), ek.dtype(), dev)?,
        };
        let k = z.broadcast_add(&ek.unsqueeze(0)?)?;
        let v = z.broadcast_add(&self.value_embed.as_tensor().unsqueeze(0)?)?;
        Ok((k, v))
    }

    /// Everything from pixels to the memory hooks for a batch.
    pub fn memory<'a>(
        &'a self,
        vision: &ClipVision,
        pixels: Option<&Tensor>,
        indicator: &[f32],
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<Memory<'a>> {
        let b = indicator.len();
        let any_image = indicator.iter().any(|&x| x != 0.0);
        let feats = match pixels {
            Some(p) if any_image => Some(self.features(vision, p, train, rng)?),
            _ => None,
        };
        let (k, v) = self.memory_from_features(feats.as_ref(), indicator, b)?;
        Ok(Memory { m: self, k, v, train, rng, masks: Default::default() })
    }
}

/// The visual memory of a batch, plugged into every selected FFN of the LM.
pub struct Memory<'a> {
    m: &'a Memvp,
    pub k: Tensor,
    pub v: Tensor,
    train: bool,
    rng: &'a RefCell<Rng>,
    /// The dropout mask each block drew, shared with rebound copies, so that a block
    /// recomputed for gradient checkpointing sees the same mask.
    masks: Masks,
}

type Masks = std::rc::Rc<RefCell<Vec<((Site, usize), Tensor)>>>;

impl Memory<'_> {
    /// Keeps batch rows `idx` (beam search, or one image per several prompts).
    pub fn select(&self, idx: &Tensor) -> Result<Self> {
        Ok(Memory {
            m: self.m,
            k: self.k.index_select(idx, 0)?,
            v: self.v.index_select(idx, 0)?,
            train: self.train,
            rng: self.rng,
            masks: Default::default(),
        })
    }
}

impl LmHooks for Memory<'_> {
    fn ffn_branch(&self, site: Site, layer: usize, u: &Tensor) -> Result<Option<Tensor>> {
        let c = &self.m.cfg;
        if !c.memory_sites.includes(site) || c.memory_layers.as_ref().is_some_and(|l| !l.contains(&layer)) {
            return Ok(None);
        }
        // s · Dropout(act(u Kᵀ)) V
        let mask = if self.train && c.memory_dropout > 0.0 {
            let seen = self.masks.borrow().iter().find(|(at, _)| *at == (site, layer)).map(|(_, m)| m.clone());
            match seen {
                Some(m) => Some(m),
                None => {
                    let (b, t, _) = u.dims3()?;
                    let m = dropout_mask(&[b, t, self.k.dims()[1]], c.memory_dropout, &mut self.rng.borrow_mut(), u)?;
                    self.masks.borrow_mut().push(((site, layer), m.clone()));
                    Some(m)
                }
            }
        } else {
            None
        };
        Ok(Some(ops::memory_branch(u, &self.k, &self.v, self.m.branch_act, c.adapter_scale, mask.as_ref())?))
    }
    fn modifies_projections(&self) -> bool {
        false
    }
    fn checkpoint_tensors(&self) -> Option<Vec<Tensor>> {
        Some(vec![self.k.clone(), self.v.clone()])
    }
    fn rebind<'s>(&'s self, ts: &[Tensor]) -> Result<Box<dyn LmHooks + 's>> {
        let [k, v] = ts else { bail!("MemVP hooks are rebound to K and V; got {} tensors", ts.len()) };
        Ok(Box::new(Memory {
            m: self.m,
            k: k.clone(),
            v: v.clone(),
            train: self.train,
            rng: self.rng,
            masks: self.masks.clone(),
        }))
    }
}

/// The parallel adapters of the vision blocks (MemVP's, also used by ADEM-VL):
/// `s_v · Up(Dropout(GELU(Down(u))))` beside each block's MLP.
pub(crate) struct VisionAdapters<'a> {
    /// `(down [r, c], up [c, r])` per block.
    pub adapters: &'a [(Var, Var)],
    pub scale: f64,
    pub dropout: f64,
    pub train: bool,
    pub rng: &'a RefCell<Rng>,
}

impl VisionHooks for VisionAdapters<'_> {
    fn mlp_branch(&self, layer: usize, u: &Tensor) -> Result<Option<Tensor>> {
        let Some((down, up)) = self.adapters.get(layer) else {
            return Ok(None);
        };
        let a = ops::activation(&linear_t(u, down.as_tensor(), None)?, Activation::Gelu)?;
        let a = if self.train { dropout(&a, self.dropout, &mut self.rng.borrow_mut())? } else { a };
        Ok(Some((linear_t(&a, up.as_tensor(), None)? * self.scale)?))
    }
}

/// Fresh vision adapters for `blocks` blocks of width `c` (`Up` zero, as released).
pub(crate) fn init_vision_adapters(
    rng: &mut Rng,
    blocks: usize,
    c: usize,
    r: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Vec<(Var, Var)>> {
    let mut v = Vec::new();
    if r > 0 {
        for _ in 0..blocks {
            let down = xavier_uniform(rng, r, c, dtype, dev)?;
            let up = Tensor::zeros((c, r), dtype, dev)?;
            v.push((var(down)?, var(up)?));
        }
    }
    Ok(v)
}

impl Adapter for Memvp {
    fn method(&self) -> &'static str {
        SPEC.name
    }
    fn named(&self) -> Vec<(String, Var)> {
        Memvp::named(self)
    }
    fn norm(&self) -> Norm {
        self.cfg.norm
    }
    fn install<'a>(
        &'a self,
        vision: &'a ClipVision,
        visual: Visual<'_>,
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>> {
        let memory = self.memory(vision, visual.pixels, visual.indicator, train, rng)?;
        Ok(Installed { hooks: Box::new(memory), prefix: None })
    }
    fn install_inference<'a>(
        &'a self,
        vision: &'a ClipVision,
        visual: Visual<'_>,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>> {
        let m = self.memory(vision, visual.pixels, visual.indicator, false, rng)?;
        let memory = Memory { k: m.k.detach(), v: m.v.detach(), ..m };
        Ok(Installed { hooks: Box::new(memory), prefix: None })
    }
    fn request_visual(&self, vision: &ClipVision, pixels: Option<&Tensor>) -> Result<RequestVisual> {
        let rng = RefCell::new(Rng::new(0));
        let ind = [if pixels.is_some() { 1.0 } else { 0.0 }];
        let m = self.memory(vision, pixels, &ind, false, &rng)?;
        // Detached: a kept tensor must not hold the graph of the vision forward that made it
        // (its inputs include trained variables, so candle records one).
        Ok(RequestVisual { rows: vec![m.k.detach(), m.v.detach()], prefix: None })
    }
    fn batch_hooks<'a>(&'a self, rows: &[Tensor], rng: &'a RefCell<Rng>) -> Result<Box<dyn LmHooks + 'a>> {
        let [k, v] = rows else { bail!("MemVP rows are K and V; got {} tensors", rows.len()) };
        Ok(Box::new(Memory { m: self, k: k.clone(), v: v.clone(), train: false, rng, masks: Default::default() }))
    }
    fn sections(&self) -> Result<Sections> {
        Ok([to_section("memvp", &self.cfg)?].into())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The vision layer, memory sites and memory layers of a memory-space method against the bases
/// (MemVP's and ADEM-VL's settings share them).
pub(crate) fn check_placement(
    b: &Build,
    vision_layer: isize,
    sites: MemorySites,
    layers: Option<&Vec<usize>>,
) -> Result<()> {
    b.vision_model.resolve_layer(vision_layer)?;
    if !b.lm.stacks().iter().any(|(site, _)| sites.includes(*site)) {
        bail!(
            "memory sites `{sites:?}`: this {} LM has no such stack (a decoder-only LM takes decoder or both)",
            b.lm.family()
        )
    }
    let per_stack = b.lm.layers_per_stack();
    if let Some(layers) = layers {
        if let Some(bad) = layers.iter().find(|&&l| l >= per_stack) {
            bail!("memory layer {bad} does not exist: the LM has {per_stack} blocks per stack (valid: 0..{per_stack})")
        }
        if layers.is_empty() {
            bail!("memory layers: the list is empty (leave it out to give every block memory)")
        }
    }
    Ok(())
}

/// The file names of the vision adapters.
pub(crate) fn vision_adapter_names(adapters: &[(Var, Var)]) -> Vec<(String, Var)> {
    let mut v = Vec::new();
    for (i, (d, u)) in adapters.iter().enumerate() {
        v.push((format!("vision.layers.{i}.adapter.down.weight"), d.clone()));
        v.push((format!("vision.layers.{i}.adapter.up.weight"), u.clone()));
    }
    v
}

fn build(b: &Build, s: &Sections) -> Result<Box<dyn Adapter>> {
    let cfg: MemvpConfig = section(s, "memvp")?;
    check_placement(b, cfg.vision_layer, cfg.memory_sites, cfg.memory_layers.as_ref())?;
    if b.vision.num_patches() > cfg.slots {
        bail!(
            "the vision tower gives {} visual tokens but MemVP has {} memory slots (raise slots)",
            b.vision.num_patches(),
            cfg.slots
        )
    }
    let m = Memvp::init(
        cfg,
        b.vision.hidden_size,
        b.vision.num_hidden_layers,
        b.lm.width(),
        b.lm.ffn_activation(),
        b.seed,
        DType::F32,
        b.lm.device(),
    )?;
    Ok(Box::new(m))
}

fn resolve(s: &Sections) -> Result<Sections> {
    Ok([to_section("memvp", &section::<MemvpConfig>(s, "memvp")?)?].into())
}

pub const SPEC: MethodSpec = MethodSpec {
    name: "memvp",
    about: "visual tokens as extra keys and values of every FFN (the default)",
    sections: &["memvp"],
    flags: &[
        Flag { name: "slots", keys: &["memvp.slots"], kind: Kind::UInt, help: "MemVP memory slots M [default: 320]" },
        Flag {
            name: "hidden-proj",
            keys: &["memvp.hidden_proj"],
            kind: Kind::UInt,
            help: "Projector width h [default: 128]",
        },
        Flag {
            name: "visual-scale",
            keys: &["memvp.visual_scale"],
            kind: Kind::Float,
            help: "MemVP's lambda [default: 0.01]",
        },
        Flag {
            name: "adapter-scale",
            keys: &["memvp.adapter_scale"],
            kind: Kind::Float,
            help: "MemVP's memory-branch scale s [default: 0.1]",
        },
        Flag {
            name: "memory-dropout",
            keys: &["memvp.memory_dropout"],
            kind: Kind::Float,
            help: "Dropout on the memory branch [default: 0.1]",
        },
        Flag {
            name: "vision-adapter-dim",
            keys: &["memvp.vision_adapter_dim"],
            kind: Kind::UInt,
            help: "Width of the vision blocks' parallel adapters (0 = none) [default: 12]",
        },
        Flag {
            name: "vision-adapter-scale",
            keys: &["memvp.vision_adapter_scale"],
            kind: Kind::Float,
            help: "Scale of the vision adapters [default: 0.1]",
        },
        Flag {
            name: "vision-adapter-dropout",
            keys: &["memvp.vision_adapter_dropout"],
            kind: Kind::Float,
            help: "Dropout in the vision adapters [default: 0.1]",
        },
        Flag {
            name: "vision-layer",
            keys: &["memvp.vision_layer"],
            kind: Kind::Int,
            help: "Hidden-state index of the vision tower (-2 = penultimate block)",
        },
        Flag {
            name: "norm",
            keys: &["memvp.norm"],
            kind: Kind::Str,
            help: "Image normalisation: imagenet (default) or clip",
        },
        Flag {
            name: "memory-layers",
            keys: &["memvp.memory_layers"],
            kind: Kind::UIntList,
            help: "LM blocks that get memory, e.g. 0,1,2 (default all; per stack for encoder-decoder LMs)",
        },
        Flag {
            name: "memory-sites",
            keys: &["memvp.memory_sites"],
            kind: Kind::Str,
            help: "Encoder-decoder LMs: which stacks get memory: encoder, decoder, both [default: both]",
        },
    ],
    checks: &[
        Check { key: "memvp.slots", rule: Rule::AtLeast(1.0) },
        Check { key: "memvp.hidden_proj", rule: Rule::AtLeast(1.0) },
        Check { key: "memvp.visual_scale", rule: Rule::Finite },
        Check { key: "memvp.adapter_scale", rule: Rule::Finite },
        Check { key: "memvp.memory_dropout", rule: Rule::Fraction },
        Check { key: "memvp.vision_adapter_scale", rule: Rule::Finite },
        Check { key: "memvp.vision_adapter_dropout", rule: Rule::Fraction },
    ],
    build,
    resolve,
};
