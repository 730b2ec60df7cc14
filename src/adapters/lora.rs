//! LoRA as PEFT defines it: `W x + (B A dropout(x)) · alpha / r`, `A` Kaiming-uniform
//! (`a = sqrt(5)`, i.e. U(±1/sqrt(in))), `B` zeros. File names `lora.layers.{i}.{proj}.a/b`
//! (`lora.{encoder|decoder}.layers...` for encoder-decoder LMs).

use super::{Adapter, Build, Installed, MethodSpec, RequestVisual, Sections, Visual, section, to_section};
use crate::data::image::Norm;
use crate::models::clip::ClipVision;
use crate::models::{LanguageModel, LmHooks, Proj, Site};
use crate::ops::nn::{dropout, linear_t};
use crate::rng::Rng;
use crate::settings::{Check, Flag, Kind, Rule};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Proj>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, dropout: 0.05, targets: vec![Proj::Q, Proj::V] }
    }
}

/// One LoRA pair per (site, layer, projection).
pub struct Lora {
    pub cfg: LoraConfig,
    pub pairs: HashMap<(Site, usize, Proj), (Var, Var)>,
    /// Sites in file-name order, for `named()`.
    pub prefix_sites: bool,
}

impl Lora {
    /// `dims(site, layer, proj) -> (in, out)` gives each target's shape.
    pub fn init(
        cfg: LoraConfig,
        sites: &[(Site, usize)],
        dims: &dyn Fn(Site, usize, Proj) -> (usize, usize),
        seed: u64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let mut rng = Rng::derive(seed, "lora-init");
        let mut pairs = HashMap::new();
        let prefix_sites = sites.iter().any(|(s, _)| *s == Site::Encoder);
        for &(site, layers) in sites {
            for l in 0..layers {
                for &p in &cfg.targets {
                    let (inp, out) = dims(site, l, p);
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f32> =
                        (0..cfg.rank * inp).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
                    let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), dev)?.to_dtype(dtype)?)?;
                    let b = Var::from_tensor(&Tensor::zeros((out, cfg.rank), dtype, dev)?)?;
                    pairs.insert((site, l, p), (a, b));
                }
            }
        }
        Ok(Self { cfg, pairs, prefix_sites })
    }

    /// LoRA on every block of every stack of `lm`.
    pub fn for_lm(cfg: LoraConfig, lm: &dyn LanguageModel, seed: u64) -> Result<Self> {
        if cfg.rank == 0 {
            anyhow::bail!("LoRA rank must be at least 1")
        }
        let dims = |site: Site, _layer: usize, p: Proj| lm.proj_dims(site, p);
        Self::init(cfg, &lm.stacks(), &dims, seed, DType::F32, lm.device())
    }

    pub fn scaling(&self) -> f64 {
        self.cfg.alpha / self.cfg.rank as f64
    }

    pub fn name(&self, site: Site, layer: usize, p: Proj) -> String {
        if self.prefix_sites {
            format!("lora.{}.layers.{layer}.{}", site.name(), p.name())
        } else {
            format!("lora.layers.{layer}.{}", p.name())
        }
    }

    pub fn named(&self) -> Vec<(String, Var)> {
        let mut keys: Vec<&(Site, usize, Proj)> = self.pairs.keys().collect();
        keys.sort_by_key(|(s, l, p)| (s.name(), *l, p.name()));
        let mut v = Vec::new();
        for k in keys {
            let (a, b) = &self.pairs[k];
            let n = self.name(k.0, k.1, k.2);
            v.push((format!("{n}.a"), a.clone()));
            v.push((format!("{n}.b"), b.clone()));
        }
        v
    }

    /// `(B A dropout(x)) · alpha / r`.
    pub fn delta(
        &self,
        site: Site,
        layer: usize,
        p: Proj,
        x: &Tensor,
        train: bool,
        rng: &RefCell<Rng>,
    ) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.pairs.get(&(site, layer, p)) else {
            return Ok(None);
        };
        let x = if train { dropout(x, self.cfg.dropout, &mut rng.borrow_mut())? } else { x.clone() };
        let h = linear_t(&x, a.as_tensor(), None)?;
        Ok(Some((linear_t(&h, b.as_tensor(), None)? * self.scaling())?))
    }
}

/// LoRA as the LM's hooks.
pub struct LoraHooks<'a> {
    pub lora: &'a Lora,
    pub train: bool,
    pub rng: &'a RefCell<Rng>,
}

impl LmHooks for LoraHooks<'_> {
    fn modifies_projections(&self) -> bool {
        true
    }
    fn proj_delta(&self, site: Site, layer: usize, proj: Proj, x: &Tensor) -> Result<Option<Tensor>> {
        self.lora.delta(site, layer, proj, x, self.train, self.rng)
    }
}

/// Text-only LoRA: the image-blind reference.
impl Adapter for Lora {
    fn method(&self) -> &'static str {
        SPEC.name
    }
    fn named(&self) -> Vec<(String, Var)> {
        Lora::named(self)
    }
    fn uses_images(&self) -> bool {
        false
    }
    fn norm(&self) -> Norm {
        Norm::Imagenet
    }
    fn install<'a>(
        &'a self,
        _vision: &'a ClipVision,
        _visual: Visual<'_>,
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>> {
        Ok(Installed { hooks: Box::new(LoraHooks { lora: self, train, rng }), prefix: None })
    }
    fn request_visual(&self, _vision: &ClipVision, _pixels: Option<&Tensor>) -> Result<RequestVisual> {
        Ok(RequestVisual { rows: vec![], prefix: None })
    }
    fn batch_hooks<'a>(&'a self, _rows: &[Tensor], rng: &'a RefCell<Rng>) -> Result<Box<dyn LmHooks + 'a>> {
        Ok(Box::new(LoraHooks { lora: self, train: false, rng }))
    }
    fn sections(&self) -> Result<Sections> {
        Ok([to_section("lora", &self.cfg)?].into())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn build(b: &Build, s: &Sections) -> Result<Box<dyn Adapter>> {
    Ok(Box::new(Lora::for_lm(section(s, "lora")?, b.lm, b.seed)?))
}

fn resolve(s: &Sections) -> Result<Sections> {
    Ok([to_section("lora", &section::<LoraConfig>(s, "lora")?)?].into())
}

/// The LoRA flags (shared with the input-space baseline).
pub const FLAGS: &[Flag] = &[
    Flag { name: "lora-rank", keys: &["lora.rank"], kind: Kind::UInt, help: "LoRA rank r [default: 8]" },
    Flag {
        name: "lora-alpha",
        keys: &["lora.alpha"],
        kind: Kind::Float,
        help: "LoRA alpha (scale alpha / r) [default: 16]",
    },
    Flag {
        name: "lora-dropout",
        keys: &["lora.dropout"],
        kind: Kind::Float,
        help: "Dropout on LoRA's input [default: 0.05]",
    },
    Flag {
        name: "lora-targets",
        keys: &["lora.targets"],
        kind: Kind::StrList,
        help: "LoRA targets, e.g. q_proj,v_proj [default: q_proj,v_proj]",
    },
];

/// The LoRA settings' ranges (shared with the input-space baseline).
pub const CHECKS: &[Check] = &[
    Check { key: "lora.rank", rule: Rule::AtLeast(1.0) },
    Check { key: "lora.alpha", rule: Rule::Positive },
    Check { key: "lora.dropout", rule: Rule::Fraction },
];

pub const SPEC: MethodSpec = MethodSpec {
    name: "lora",
    about: "text-only LoRA on the LM's attention projections (the image-blind reference)",
    sections: &["lora"],
    flags: FLAGS,
    checks: CHECKS,
    build,
    resolve,
};
