//! ADEM-VL (Hao et al., "Adaptive and Embedded Fusion for Efficient Vision-Language Tuning",
//! arXiv 2410.17779), as its released code (built on MemVP's) does it:
//!
//! ```text
//! F        = post_ln(ViT_{layer}(image))                  [CLS; G x G patches] x c (vision adapters inside)
//! entries  = [patches ; adaptive_avg_pool(patches, g x g) ...]   M x c   (default g = floor(G/2))
//! Z        = indicator * beta * P(entries)                M x d   P = Linear(c,h) SiLU Linear(h,d)
//! K = Z + E_k,  V = Z + E_v                               once per sample, shared by all layers
//! block:   out = h + FFN(u) + alpha * drop(SiLU(u) SiLU(K)ᵀ) V
//!          drop: per query row, entries below the row's value at sorted position floor(r·M)
//!          become 0 (no gradient through the threshold; training and inference alike)
//! prompt:  BOS "Image: " P_cls(CLS) text...   (no image: BOS "Image: N/A" text...)
//! ```
//! The CLS projection is not scaled by beta nor multiplied by the indicator; its prompt
//! positions carry no loss (they are prompt). `no_cls` leaves the CLS and its words out.

use super::memvp::{MemorySites, VisionAdapters, check_placement, init_vision_adapters, vision_adapter_names};
use super::{Adapter, Build, Installed, MethodSpec, RequestVisual, Sections, Visual, section, to_section};
use crate::data::batch::PromptInsert;
use crate::data::image::Norm;
use crate::models::clip::ClipVision;
use crate::models::{LmHooks, Site};
use crate::ops::nn::{Projector, var};
use crate::ops::{self, Activation};
use crate::rng::Rng;
use crate::settings::{Check, Flag, Kind, Rule};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// The words before the CLS token, and what a row without an image reads instead.
pub const IMAGE_WORDS: &str = "Image: ";
pub const NO_IMAGE_WORDS: &str = "Image: N/A";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdemConfig {
    /// Projector width `h` (both projectors).
    pub hidden_proj: usize,
    /// `beta`: scale of the projected entries.
    pub visual_scale: f64,
    /// `alpha`: scale of the fusion branch.
    pub adapter_scale: f64,
    /// Share of each query row's smallest attention entries set to 0.
    pub drop_ratio: f64,
    /// Entries per scale (`down_sample_num`), each a square number of at most the grid's;
    /// default `[G*G, floor(G/2)^2]` for a `G x G` patch grid.
    pub down_sample: Option<Vec<usize>>,
    /// Leave out the CLS token and its words.
    pub no_cls: bool,
    pub vision_adapter_dim: usize,
    pub vision_adapter_scale: f64,
    pub vision_adapter_dropout: f64,
    /// Hidden-state index of the vision tower (transformers' counting; -2 = penultimate).
    pub vision_layer: isize,
    pub norm: Norm,
    /// LM blocks that get the branch; `None` = all.
    pub memory_layers: Option<Vec<usize>>,
    /// For encoder-decoder LMs.
    pub memory_sites: MemorySites,
}

impl Default for AdemConfig {
    fn default() -> Self {
        Self {
            hidden_proj: 128,
            visual_scale: 0.01,
            adapter_scale: 0.1,
            drop_ratio: 0.1,
            down_sample: None,
            no_cls: false,
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

/// The trained tensors (named as in `adapter_model.safetensors`) and what they need.
pub struct Adem {
    pub cfg: AdemConfig,
    pub projector: Projector,
    /// The CLS token's projector (`projector_cls.*`), unless `no_cls`.
    pub projector_cls: Option<Projector>,
    pub key_embed: Var,
    pub value_embed: Var,
    pub vision_adapters: Vec<(Var, Var)>,
    /// Entries per scale and, for a pooled scale, its averaging matrix `[s, G*G]`.
    pub scales: Vec<(usize, Option<Tensor>)>,
    pub insert: Option<PromptInsert>,
}

/// The `[g*g, G*G]` matrix of PyTorch's `adaptive_avg_pool2d` from a `G x G` grid to `g x g`
/// (window `i` spans `[floor(i*G/g), ceil((i+1)*G/g))`, overlapping when `g` does not divide
/// `G`), grids flattened row by row.
pub fn pool_matrix(grid: usize, g: usize) -> Vec<f32> {
    let win = |i: usize| (i * grid / g, ((i + 1) * grid).div_ceil(g));
    let mut m = vec![0f32; g * g * grid * grid];
    for i in 0..g {
        let (r0, r1) = win(i);
        for j in 0..g {
            let (c0, c1) = win(j);
            let w = 1.0 / ((r1 - r0) * (c1 - c0)) as f32;
            for r in r0..r1 {
                for c in c0..c1 {
                    m[(i * g + j) * grid * grid + r * grid + c] = w;
                }
            }
        }
    }
    m
}

fn square_root(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n).then_some(r)
}

/// Which entries of each query row survive the adaptive drop: a row keeps the entries at least
/// as large as its value at sorted position `floor(ratio * M)` (ties kept). `a`: `[rows, M]`.
pub fn drop_mask(a: &[f32], m: usize, ratio: f64) -> Vec<f32> {
    let k = (ratio * m as f64).floor() as usize;
    if k == 0 || m == 0 {
        return vec![1.0; a.len()];
    }
    let k = k.min(m - 1);
    let mut out = Vec::with_capacity(a.len());
    let mut row = vec![0f32; m];
    for r in a.chunks(m) {
        row.copy_from_slice(r);
        let (_, thr, _) = row.select_nth_unstable_by(k, |x, y| x.total_cmp(y));
        let thr = *thr;
        out.extend(r.iter().map(|&x| if x < thr { 0.0 } else { 1.0 }));
    }
    out
}

impl Adem {
    pub fn init(cfg: AdemConfig, b: &Build, dtype: DType) -> Result<Self> {
        let dev = b.lm.device();
        let (c, d, h) = (b.vision.hidden_size, b.lm.width(), cfg.hidden_proj);
        let n = b.vision.num_patches();
        let Some(grid) = square_root(n) else {
            bail!("ADEM-VL pools a square grid of patches; this vision tower gives {n}")
        };
        let sizes = cfg.down_sample.clone().unwrap_or_else(|| {
            let g = grid / 2;
            if g == 0 { vec![n] } else { vec![n, g * g] }
        });
        if sizes.is_empty() {
            bail!("adem.down_sample is empty")
        }
        let mut scales = Vec::new();
        for &s in &sizes {
            let g = square_root(s).filter(|&g| (1..=grid).contains(&g));
            let Some(g) = g else {
                bail!(
                    "adem.down_sample: {s} entries is not the square of a grid size 1..={grid} (the patch grid is {grid} x {grid})"
                )
            };
            let pool = if g == grid {
                None
            } else {
                Some(Tensor::from_vec(pool_matrix(grid, g), (s, n), dev)?.to_dtype(dtype)?)
            };
            scales.push((s, pool));
        }
        let m: usize = sizes.iter().sum();
        let mut rng = Rng::derive(b.seed, "adem-init");
        let projector = Projector::init(c, h, d, &mut rng, dtype, dev)?;
        let projector_cls = if cfg.no_cls { None } else { Some(Projector::init(c, h, d, &mut rng, dtype, dev)?) };
        let ek: Vec<f32> = (0..m * d).map(|_| (rng.normal() * 0.02) as f32).collect();
        let vision_adapters =
            init_vision_adapters(&mut rng, b.vision.num_hidden_layers, c, cfg.vision_adapter_dim, dtype, dev)?;
        let insert = if cfg.no_cls { None } else { Some(PromptInsert::new(b.tok, IMAGE_WORDS, NO_IMAGE_WORDS, true)?) };
        Ok(Self {
            projector,
            projector_cls,
            key_embed: var(Tensor::from_vec(ek, (m, d), dev)?.to_dtype(dtype)?)?,
            value_embed: var(Tensor::zeros((m, d), dtype, dev)?)?,
            vision_adapters,
            scales,
            insert,
            cfg,
        })
    }

    pub fn named(&self) -> Vec<(String, Var)> {
        let mut v = self.projector.named();
        if let Some(p) = &self.projector_cls {
            v.extend(p.named_as("projector_cls"));
        }
        v.push(("memory.key_embed".into(), self.key_embed.clone()));
        v.push(("memory.value_embed".into(), self.value_embed.clone()));
        v.extend(vision_adapter_names(&self.vision_adapters));
        v
    }

    /// The multiscale entries `[b, M, c]` of patch features `[b, G*G, c]`.
    pub fn entries(&self, patches: &Tensor) -> Result<Tensor> {
        let parts: Vec<Tensor> = self
            .scales
            .iter()
            .map(|(_, pool)| match pool {
                None => Ok(patches.clone()),
                Some(p) => Ok(p.broadcast_matmul(patches)?),
            })
            .collect::<Result<_>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Everything from pixels to the hooks of a batch.
    pub fn fusion<'a>(
        &'a self,
        vision: &ClipVision,
        pixels: Option<&Tensor>,
        indicator: &[f32],
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<Fusion<'a>> {
        let b = indicator.len();
        let ek = self.key_embed.as_tensor();
        let (m, d) = ek.dims2()?;
        let dev = ek.device();
        let any_image = indicator.iter().any(|&x| x != 0.0);
        let (z, cls) = match pixels {
            Some(p) if any_image => {
                let hooks = VisionAdapters {
                    adapters: &self.vision_adapters,
                    scale: self.cfg.vision_adapter_scale,
                    dropout: self.cfg.vision_adapter_dropout,
                    train,
                    rng,
                };
                let f = vision.features_with_cls(p, self.cfg.vision_layer, &hooks)?;
                let n = f.dims()[1] - 1;
                let entries = self.entries(&f.narrow(1, 1, n)?)?;
                let ind = Tensor::from_slice(indicator, (b, 1, 1), dev)?.to_dtype(ek.dtype())?;
                let z = (self.projector.forward(&entries)? * self.cfg.visual_scale)?.broadcast_mul(&ind)?;
                let cls = match &self.projector_cls {
                    Some(pc) => Some(pc.forward(&f.narrow(1, 0, 1)?)?.squeeze(1)?),
                    None => None,
                };
                (z, cls)
            }
            _ => (Tensor::zeros((b, m, d), ek.dtype(), dev)?, None),
        };
        let k = z.broadcast_add(&ek.unsqueeze(0)?)?;
        let v = z.broadcast_add(&self.value_embed.as_tensor().unsqueeze(0)?)?;
        let has: Vec<bool> = indicator.iter().map(|&x| x != 0.0 && cls.is_some()).collect();
        Fusion::new(self, k, v, cls, has)
    }
}

/// The fusion of a batch: the branch in every selected block and the CLS in the prompt.
pub struct Fusion<'a> {
    m: &'a Adem,
    /// K itself, for gradient checkpointing's rebind; absent when serving, which keeps only
    /// `SiLU(K)ᵀ` per request so that a decoding step does not recompute it.
    pub k: Option<Tensor>,
    pub v: Tensor,
    /// `SiLU(K)ᵀ` `[b, d, M]`, shared by every block.
    sk_t: Tensor,
    /// The projected CLS token per row `[b, d]`, and which rows have one.
    pub cls: Option<Tensor>,
    pub has_cls: Vec<bool>,
}

impl<'a> Fusion<'a> {
    fn new(m: &'a Adem, k: Tensor, v: Tensor, cls: Option<Tensor>, has_cls: Vec<bool>) -> Result<Self> {
        let sk_t = ops::activation(&k, Activation::Silu)?.transpose(1, 2)?.contiguous()?;
        Ok(Self { m, k: Some(k), v, sk_t, cls, has_cls })
    }
}

impl Fusion<'_> {
    /// K (the dense entries plus their projection) of the batch.
    pub fn keys(&self) -> Result<&Tensor> {
        self.k.as_ref().context("ADEM-VL: this fusion was made for serving and keeps SiLU(K)ᵀ, not K")
    }
}

impl LmHooks for Fusion<'_> {
    fn checkpoint_tensors(&self) -> Option<Vec<Tensor>> {
        Some(vec![self.k.clone()?, self.v.clone()])
    }
    fn rebind<'s>(&'s self, ts: &[Tensor]) -> Result<Box<dyn LmHooks + 's>> {
        let [k, v] = ts else { bail!("ADEM-VL hooks are rebound to K and V; got {} tensors", ts.len()) };
        Ok(Box::new(Fusion::new(self.m, k.clone(), v.clone(), self.cls.clone(), self.has_cls.clone())?))
    }
    fn ffn_branch(&self, site: Site, layer: usize, u: &Tensor) -> Result<Option<Tensor>> {
        let c = &self.m.cfg;
        if !c.memory_sites.includes(site) || c.memory_layers.as_ref().is_some_and(|l| !l.contains(&layer)) {
            return Ok(None);
        }
        // alpha · drop(SiLU(u) SiLU(K)ᵀ) V
        let a = ops::activation(u, Activation::Silu)?.contiguous()?.matmul(&self.sk_t)?;
        let (b, t, m) = a.dims3()?;
        let keep = drop_mask(&a.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?, m, c.drop_ratio);
        let a = if keep.iter().all(|&x| x == 1.0) {
            a
        } else {
            (a * Tensor::from_vec(keep, (b, t, m), u.device())?.to_dtype(u.dtype())?)?
        };
        Ok(Some((a.matmul(&self.v)? * c.adapter_scale)?))
    }
    fn modifies_projections(&self) -> bool {
        false
    }
    fn edit_input(&self, x: &Tensor, starts: &[usize]) -> Result<Option<Tensor>> {
        let (Some(cls), Some(col)) = (&self.cls, self.m.insert.as_ref().and_then(PromptInsert::slot_column)) else {
            return Ok(None);
        };
        let (b, t, _) = x.dims3()?;
        if starts.len() != b || self.has_cls.len() != b {
            bail!("ADEM-VL: {} row starts and {} CLS flags for {b} rows", starts.len(), self.has_cls.len())
        }
        let mut onehot = vec![0f32; b * t];
        for i in (0..b).filter(|&i| self.has_cls[i]) {
            let at = starts[i] + col;
            if at >= t {
                bail!(
                    "ADEM-VL: row {i}'s CLS slot (column {at}) is past its {t} positions: the prompt lacks the inserted words"
                )
            }
            onehot[i * t + at] = 1.0;
        }
        let oh = Tensor::from_vec(onehot, (b, t, 1), x.device())?.to_dtype(x.dtype())?;
        let kept = x.broadcast_mul(&(1.0 - &oh)?)?;
        Ok(Some((kept + oh.broadcast_mul(&cls.unsqueeze(1)?.to_dtype(x.dtype())?)?)?))
    }
}

impl Adapter for Adem {
    fn method(&self) -> &'static str {
        SPEC.name
    }
    fn named(&self) -> Vec<(String, Var)> {
        Adem::named(self)
    }
    fn norm(&self) -> Norm {
        self.cfg.norm
    }
    fn prompt_insert(&self) -> Option<&PromptInsert> {
        self.insert.as_ref()
    }
    fn install<'a>(
        &'a self,
        vision: &'a ClipVision,
        visual: Visual<'_>,
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>> {
        let f = self.fusion(vision, visual.pixels, visual.indicator, train, rng)?;
        Ok(Installed { hooks: Box::new(f), prefix: None })
    }
    fn install_inference<'a>(
        &'a self,
        vision: &'a ClipVision,
        visual: Visual<'_>,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>> {
        let f = self.fusion(vision, visual.pixels, visual.indicator, false, rng)?;
        // Inference reads SiLU(K)ᵀ only (no checkpointing to rebind), so K is not kept.
        let (v, sk_t, cls) = (f.v.detach(), f.sk_t.detach(), f.cls.as_ref().map(Tensor::detach));
        Ok(Installed { hooks: Box::new(Fusion { k: None, v, sk_t, cls, ..f }), prefix: None })
    }
    fn request_visual(&self, vision: &ClipVision, pixels: Option<&Tensor>) -> Result<RequestVisual> {
        let rng = RefCell::new(Rng::new(0));
        let ind = [if pixels.is_some() { 1.0 } else { 0.0 }];
        let f = self.fusion(vision, pixels, &ind, false, &rng)?;
        let d = f.v.dims()[2];
        let cls = match &f.cls {
            Some(c) => c.detach(),
            None => Tensor::zeros((1, d), f.v.dtype(), f.v.device())?,
        };
        let has = Tensor::new(&[if f.has_cls[0] { 1f32 } else { 0.0 }], f.v.device())?;
        // Detached: a kept tensor must not hold the graph of the vision forward that made it.
        // SiLU(K)ᵀ rather than K: the one form every decoding step reads.
        Ok(RequestVisual { rows: vec![f.sk_t.detach(), f.v.detach(), cls, has], prefix: None })
    }
    fn batch_hooks<'a>(&'a self, rows: &[Tensor], _rng: &'a RefCell<Rng>) -> Result<Box<dyn LmHooks + 'a>> {
        let [sk_t, v, cls, has] = rows else {
            bail!("ADEM-VL rows are SiLU(K)ᵀ, V, CLS and its flag; got {} tensors", rows.len())
        };
        let has_cls: Vec<bool> = has.flatten_all()?.to_vec1::<f32>()?.iter().map(|&x| x != 0.0).collect();
        let cls = self.projector_cls.as_ref().map(|_| cls.clone());
        Ok(Box::new(Fusion { m: self, k: None, v: v.clone(), sk_t: sk_t.clone(), cls, has_cls }))
    }
    fn sections(&self) -> Result<Sections> {
        Ok([to_section("adem", &self.cfg)?].into())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn build(b: &Build, s: &Sections) -> Result<Box<dyn Adapter>> {
    let cfg: AdemConfig = section(s, "adem")?;
    check_placement(b, cfg.vision_layer, cfg.memory_sites, cfg.memory_layers.as_ref())?;
    Ok(Box::new(Adem::init(cfg, b, DType::F32)?))
}

fn resolve(s: &Sections) -> Result<Sections> {
    Ok([to_section("adem", &section::<AdemConfig>(s, "adem")?)?].into())
}

pub const SPEC: MethodSpec = MethodSpec {
    name: "adem",
    about: "ADEM-VL: multiscale visual entries fused by parameter-free attention with adaptive drop, plus a CLS token in the prompt",
    sections: &["adem"],
    flags: &[
        Flag {
            name: "hidden-proj",
            keys: &["adem.hidden_proj"],
            kind: Kind::UInt,
            help: "Projector width h [default: 128]",
        },
        Flag { name: "visual-scale", keys: &["adem.visual_scale"], kind: Kind::Float, help: "" },
        Flag { name: "adapter-scale", keys: &["adem.adapter_scale"], kind: Kind::Float, help: "" },
        Flag {
            name: "drop-ratio",
            keys: &["adem.drop_ratio"],
            kind: Kind::Float,
            help: "ADEM-VL: share of each row's smallest attention entries dropped [default: 0.1]",
        },
        Flag {
            name: "down-sample",
            keys: &["adem.down_sample"],
            kind: Kind::UIntList,
            help: "ADEM-VL: entries per scale, e.g. 256,64 [default: G*G,(G/2)^2 for a GxG patch grid]",
        },
        Flag {
            name: "no-cls",
            keys: &["adem.no_cls"],
            kind: Kind::Bool,
            help: "ADEM-VL: leave out the CLS token and its \"Image: \" words",
        },
        Flag { name: "vision-adapter-dim", keys: &["adem.vision_adapter_dim"], kind: Kind::UInt, help: "" },
        Flag { name: "vision-adapter-scale", keys: &["adem.vision_adapter_scale"], kind: Kind::Float, help: "" },
        Flag { name: "vision-adapter-dropout", keys: &["adem.vision_adapter_dropout"], kind: Kind::Float, help: "" },
        Flag { name: "vision-layer", keys: &["adem.vision_layer"], kind: Kind::Int, help: "" },
        Flag { name: "norm", keys: &["adem.norm"], kind: Kind::Str, help: "" },
        Flag { name: "memory-layers", keys: &["adem.memory_layers"], kind: Kind::UIntList, help: "" },
        Flag { name: "memory-sites", keys: &["adem.memory_sites"], kind: Kind::Str, help: "" },
    ],
    checks: &[
        Check { key: "adem.hidden_proj", rule: Rule::AtLeast(1.0) },
        Check { key: "adem.visual_scale", rule: Rule::Finite },
        Check { key: "adem.adapter_scale", rule: Rule::Finite },
        Check { key: "adem.drop_ratio", rule: Rule::Fraction },
        Check { key: "adem.vision_adapter_scale", rule: Rule::Finite },
        Check { key: "adem.vision_adapter_dropout", rule: Rule::Fraction },
    ],
    build,
    resolve,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_is_pytorch_adaptive_average_pooling() {
        // 3x3 -> 2x2: windows [0,2) and [1,3) overlap on the middle row and column.
        let m = pool_matrix(3, 2);
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let y: Vec<f32> = (0..4).map(|o| (0..9).map(|i| m[o * 9 + i] * x[i]).sum()).collect();
        // torch.nn.functional.adaptive_avg_pool2d(torch.arange(9.).view(1,1,3,3), 2)
        assert_eq!(y, vec![2.0, 3.0, 5.0, 6.0]);
        // 4x4 -> 2x2: disjoint 2x2 windows.
        let m = pool_matrix(4, 2);
        assert_eq!(m.iter().filter(|&&w| w != 0.0).count(), 16);
        assert!(m.iter().all(|&w| w == 0.0 || w == 0.25));
    }

    #[test]
    fn adaptive_drop_zeroes_the_smallest_entries_and_keeps_ties() {
        // M = 10, ratio 0.1: the threshold is the value at sorted position 1.
        let a = [5.0, 1.0, 3.0, 0.5, 9.0, 2.0, 8.0, 7.0, 6.0, 4.0];
        let k = drop_mask(&a, 10, 0.1);
        assert_eq!(k, vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        // Ties at the threshold are kept: [1, 1, 0] sorted is [0, 1, 1], position 1 -> 1.
        assert_eq!(drop_mask(&[1.0, 1.0, 0.0], 3, 0.5), vec![1.0, 1.0, 0.0]);
        // Ratio 0.3 of 10: position 3; three entries strictly below it go.
        assert_eq!(drop_mask(&a, 10, 0.3).iter().filter(|&&x| x == 0.0).count(), 3);
        // A ratio below one entry drops nothing.
        assert!(drop_mask(&a, 10, 0.05).iter().all(|&x| x == 1.0));
    }
}
