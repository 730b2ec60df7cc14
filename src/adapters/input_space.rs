//! The input-space baseline (LLaVA / VL-Adapter style): the projected visual tokens are placed
//! before the text in the LM's input, and the LM is adapted with LoRA.
//!
//! ```text
//! prefix = P(post_ln(ViT_{layer}(image))[1:])     n x d   (zeros, masked out, for text-only rows)
//! LM input = [prefix; embed(text)]                 the sequence grows by n positions
//! ```

use super::lora::{self, Lora, LoraConfig, LoraHooks};
use super::{Adapter, Build, Installed, MethodSpec, RequestVisual, Sections, Visual, section, to_section};
use crate::data::image::Norm;
use crate::models::LmHooks;
use crate::models::NoHooks;
use crate::models::clip::ClipVision;
use crate::ops::nn::Projector;
use crate::rng::Rng;
use crate::settings::{Check, Flag, Kind, Rule};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpaceConfig {
    /// Projector width.
    pub hidden_proj: usize,
    /// Hidden-state index of the vision tower (-2 = penultimate block).
    pub vision_layer: isize,
    pub norm: Norm,
}

impl Default for InputSpaceConfig {
    fn default() -> Self {
        Self { hidden_proj: 128, vision_layer: -2, norm: Norm::Imagenet }
    }
}

pub struct InputSpace {
    pub cfg: InputSpaceConfig,
    pub projector: Projector,
    pub lora: Lora,
    /// Visual tokens per image (the prefix length).
    pub visual_tokens: usize,
    pub lm_width: usize,
    device: Device,
}

impl InputSpace {
    /// The prefix `[b, n, d]` of a batch: projected visual tokens, or zeros without images.
    pub fn prefix(&self, vision: &ClipVision, pixels: Option<&Tensor>, b: usize) -> Result<Tensor> {
        match pixels {
            Some(p) => {
                let f = vision.patch_features(p, self.cfg.vision_layer, &NoHooks)?.detach();
                self.projector.forward(&f)
            }
            None => Ok(Tensor::zeros((b, self.visual_tokens, self.lm_width), DType::F32, &self.device)?),
        }
    }
}

impl Adapter for InputSpace {
    fn method(&self) -> &'static str {
        SPEC.name
    }
    fn named(&self) -> Vec<(String, Var)> {
        let mut v = self.projector.named();
        v.extend(self.lora.named());
        v
    }
    fn norm(&self) -> Norm {
        self.cfg.norm
    }
    fn prefix_tokens(&self) -> usize {
        self.visual_tokens
    }
    fn install<'a>(
        &'a self,
        vision: &'a ClipVision,
        visual: Visual<'_>,
        train: bool,
        rng: &'a RefCell<Rng>,
    ) -> Result<Installed<'a>> {
        let prefix = self.prefix(vision, visual.pixels, visual.indicator.len())?;
        Ok(Installed { hooks: Box::new(LoraHooks { lora: &self.lora, train, rng }), prefix: Some(prefix) })
    }
    fn request_visual(&self, vision: &ClipVision, pixels: Option<&Tensor>) -> Result<RequestVisual> {
        // Detached: the kept prefix must not hold the graph of the projector that made it.
        Ok(RequestVisual { rows: vec![], prefix: Some(self.prefix(vision, pixels, 1)?.detach()) })
    }
    fn batch_hooks<'a>(&'a self, _rows: &[Tensor], rng: &'a RefCell<Rng>) -> Result<Box<dyn LmHooks + 'a>> {
        Ok(Box::new(LoraHooks { lora: &self.lora, train: false, rng }))
    }
    fn sections(&self) -> Result<Sections> {
        Ok([to_section("input_space", &self.cfg)?, to_section("lora", &self.lora.cfg)?].into())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn build(b: &Build, s: &Sections) -> Result<Box<dyn Adapter>> {
    let cfg: InputSpaceConfig = section(s, "input_space")?;
    let lcfg: LoraConfig = section(s, "lora")?;
    b.vision_model.resolve_layer(cfg.vision_layer)?;
    let lora = Lora::for_lm(lcfg, b.lm, b.seed)?;
    let mut rng = Rng::derive(b.seed, "input-space-projector");
    let projector =
        Projector::init(b.vision.hidden_size, cfg.hidden_proj, b.lm.width(), &mut rng, DType::F32, b.lm.device())?;
    Ok(Box::new(InputSpace {
        cfg,
        projector,
        lora,
        visual_tokens: b.vision.num_patches(),
        lm_width: b.lm.width(),
        device: b.lm.device().clone(),
    }))
}

fn resolve(s: &Sections) -> Result<Sections> {
    Ok([
        to_section("input_space", &section::<InputSpaceConfig>(s, "input_space")?)?,
        to_section("lora", &section::<LoraConfig>(s, "lora")?)?,
    ]
    .into())
}

const FLAGS: &[Flag] = &[
    Flag { name: "hidden-proj", keys: &["input_space.hidden_proj"], kind: Kind::UInt, help: "" },
    Flag { name: "vision-layer", keys: &["input_space.vision_layer"], kind: Kind::Int, help: "" },
    Flag { name: "norm", keys: &["input_space.norm"], kind: Kind::Str, help: "" },
    lora::FLAGS[0],
    lora::FLAGS[1],
    lora::FLAGS[2],
    lora::FLAGS[3],
];

pub const SPEC: MethodSpec = MethodSpec {
    name: "input-space",
    about: "LLaVA-style: projected visual tokens before the text, LM adapted with LoRA",
    sections: &["input_space", "lora"],
    flags: FLAGS,
    checks: &[
        Check { key: "input_space.hidden_proj", rule: Rule::AtLeast(1.0) },
        lora::CHECKS[0],
        lora::CHECKS[1],
        lora::CHECKS[2],
    ],
    build,
    resolve,
};
