//! The CLIP ViT vision transformer, as `CLIPVisionModel` / the vision half of `CLIPModel` in
//! transformers (tensor prefix `vision_model.`).
//!
//! x0 = pre_layrnorm([cls; patches·W] + pos)
//! block: x = x + Attn(ln1 x);  u = ln2 x;  x = x + MLP(u) [+ hooks.mlp_branch(u)]

use super::{NoHooks, VisionHooks, add_opt};
use crate::checkpoint::{Cfg, Weights};
use crate::ops::{self, Activation, AttentionOpts, BlockNorm, FrozenAttnBlock, FrozenMlp, Linear};
use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// From a `CLIPVisionModel` config, or the `vision_config` of a `CLIPModel` config.
    pub fn from_hf(c: &Cfg) -> Result<Self> {
        let mt = c.opt_str("model_type")?;
        let v = match mt.as_deref() {
            Some("clip") => c.sub("vision_config").ok_or_else(|| c.err("vision_config", "missing"))?,
            Some("clip_vision_model") | None => c.clone(),
            Some(other) => {
                return Err(c.err(
                    "model_type",
                    format!("unknown architecture `{other}` for a vision tower (supported: clip, clip_vision_model)"),
                ));
            }
        };
        let act = v.opt_str("hidden_act")?.unwrap_or_else(|| "quick_gelu".into());
        let hidden_act =
            Activation::from_hf(&act).ok_or_else(|| v.err("hidden_act", format!("unsupported activation `{act}`")))?;
        let cfg = Self {
            hidden_size: v.usize_or("hidden_size", 768)?,
            intermediate_size: v.usize_or("intermediate_size", 3072)?,
            num_hidden_layers: v.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: v.usize_or("num_attention_heads", 12)?,
            image_size: v.usize_or("image_size", 224)?,
            patch_size: v.usize_or("patch_size", 32)?,
            num_channels: v.usize_or("num_channels", 3)?,
            hidden_act,
            layer_norm_eps: v.f64_or("layer_norm_eps", 1e-5)?,
        };
        for (key, n) in [("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)] {
            if n == 0 {
                return Err(v.err(key, "is 0; a vision tower needs at least 1"));
            }
        }
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(
                v.err("patch_size", format!("{} does not divide image_size {}", cfg.patch_size, cfg.image_size))
            );
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(v.err("num_attention_heads", "does not divide hidden_size"));
        }
        Ok(cfg)
    }

    /// Built-in shapes for `random:<preset>` towers.
    pub fn preset(name: &str) -> Result<Self> {
        let (h, i, l, heads, img, patch) = match name {
            "tiny" => (64, 128, 3, 4, 32, 8),
            "mini" => (64, 128, 3, 4, 48, 8),
            // 256 visual tokens, like ViT-L/14 at 224 px, at a small width: the bench default.
            "bench" => (192, 768, 4, 3, 128, 8),
            "small" => (192, 768, 6, 3, 64, 8),
            "vit-b16" | "vit-b-16" | "b16" => (768, 3072, 12, 12, 224, 16),
            "vit-l14" | "vit-l-14" | "l14" => (1024, 4096, 24, 16, 224, 14),
            other => {
                bail!("unknown vision preset `random:{other}` (known: tiny, mini, bench, small, vit-b16, vit-l14)")
            }
        };
        Ok(Self {
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: heads,
            image_size: img,
            patch_size: patch,
            num_channels: 3,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        })
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Random weights in the manner of transformers' `CLIPPreTrainedModel._init_weights`
    /// (factor 1), seeded. Keys are the checkpoint names without the `vision_model.` prefix.
    pub fn random_weights(&self, seed: u64, dtype: DType, dev: &Device) -> Result<HashMap<String, Tensor>> {
        let mut rng = crate::rng::Rng::new(seed);
        let (d, i) = (self.hidden_size, self.intermediate_size);
        let p = self.patch_size;
        let mut m = HashMap::new();
        let mut normal = |name: String, shape: &[usize], std: f64, m: &mut HashMap<String, Tensor>| -> Result<()> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
            m.insert(name, Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?);
            Ok(())
        };
        let emb_std = (d as f64).powf(-0.5);
        normal("embeddings.class_embedding".into(), &[d], emb_std, &mut m)?;
        normal("embeddings.patch_embedding.weight".into(), &[d, self.num_channels, p, p], 0.02, &mut m)?;
        normal("embeddings.position_embedding.weight".into(), &[self.num_patches() + 1, d], 0.02, &mut m)?;
        let l = self.num_hidden_layers as f64;
        let in_std = (d as f64).powf(-0.5) * (2.0 * l).powf(-0.5);
        let out_std = (d as f64).powf(-0.5);
        let fc_std = (2.0 * d as f64).powf(-0.5);
        let ones = |n: usize| Tensor::ones(n, dtype, dev);
        let zeros = |n: usize| Tensor::zeros(n, dtype, dev);
        for ln in ["pre_layrnorm", "post_layernorm"] {
            m.insert(format!("{ln}.weight"), ones(d)?);
            m.insert(format!("{ln}.bias"), zeros(d)?);
        }
        for li in 0..self.num_hidden_layers {
            let b = format!("encoder.layers.{li}");
            for pr in ["q_proj", "k_proj", "v_proj"] {
                normal(format!("{b}.self_attn.{pr}.weight"), &[d, d], in_std, &mut m)?;
                m.insert(format!("{b}.self_attn.{pr}.bias"), zeros(d)?);
            }
            normal(format!("{b}.self_attn.out_proj.weight"), &[d, d], out_std * (2.0 * l).powf(-0.5), &mut m)?;
            m.insert(format!("{b}.self_attn.out_proj.bias"), zeros(d)?);
            normal(format!("{b}.mlp.fc1.weight"), &[i, d], fc_std, &mut m)?;
            m.insert(format!("{b}.mlp.fc1.bias"), zeros(i)?);
            normal(format!("{b}.mlp.fc2.weight"), &[d, i], in_std, &mut m)?;
            m.insert(format!("{b}.mlp.fc2.bias"), zeros(d)?);
            for ln in ["layer_norm1", "layer_norm2"] {
                m.insert(format!("{b}.{ln}.weight"), ones(d)?);
                m.insert(format!("{b}.{ln}.bias"), zeros(d)?);
            }
        }
        Ok(m)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &Weights, d: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get(d, "weight")?, bias: w.get(d, "bias")?, eps })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

struct Layer {
    /// layer_norm1 and self_attn.{q,k,v,out}_proj as one block.
    self_attn: FrozenAttnBlock,
    /// fc1, activation, fc2 as one fused op.
    mlp: FrozenMlp,
    layer_norm2: LayerNorm,
}

pub struct ClipVision {
    patch_embedding: Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<Layer>,
    post_layernorm: LayerNorm,
    pub cfg: ClipVisionConfig,
}

fn lin(w: &Weights, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(w.matrix((out, inp), &format!("{name}.weight"))?, Some(w.get(out, &format!("{name}.bias"))?)))
}

impl ClipVision {
    /// Loads from weights whose names start at `embeddings.` / `encoder.` (pass
    /// `weights.pp("vision_model")` for Hugging Face files).
    pub fn load(w: &Weights, cfg: ClipVisionConfig) -> Result<Self> {
        let (d, i, p, c) = (cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.num_channels);
        let e = w.pp("embeddings");
        let patch = e.get((d, c, p, p), "patch_embedding.weight")?.reshape((d, c * p * p))?;
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let b = w.pp(format!("encoder.layers.{l}"));
            let a = b.pp("self_attn");
            let ln1 = LayerNorm::load(&b.pp("layer_norm1"), d, eps)?;
            let heads = cfg.num_attention_heads;
            layers.push(Layer {
                self_attn: FrozenAttnBlock {
                    norm: BlockNorm::Layer { weight: ln1.weight, bias: ln1.bias, eps },
                    q: lin(&a, "q_proj", d, d)?,
                    k: lin(&a, "k_proj", d, d)?,
                    v: lin(&a, "v_proj", d, d)?,
                    o: lin(&a, "out_proj", d, d)?,
                    heads,
                    kv_heads: heads,
                    head_dim: d / heads,
                    scale: 1.0 / ((d / heads) as f64).sqrt(),
                    causal: false,
                }
                .share_storage()?,
                mlp: FrozenMlp {
                    w1: lin(&b.pp("mlp"), "fc1", i, d)?,
                    w2: None,
                    down: lin(&b.pp("mlp"), "fc2", d, i)?,
                    act: cfg.hidden_act,
                },
                layer_norm2: LayerNorm::load(&b.pp("layer_norm2"), d, eps)?,
            });
        }
        // transformers spells it `pre_layrnorm`.
        let pre = if w.contains("pre_layrnorm.weight") { "pre_layrnorm" } else { "pre_layernorm" };
        Ok(Self {
            patch_embedding: Linear::new(patch, None),
            class_embedding: e.get(d, "class_embedding")?,
            position_embedding: e.get((cfg.num_patches() + 1, d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::load(&w.pp(pre), d, eps)?,
            layers,
            post_layernorm: LayerNorm::load(&w.pp("post_layernorm"), d, eps)?,
            cfg,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// `pixels: [b, c, s, s]` → `pre_layrnorm(embeddings)`: `[b, 1 + patches, d]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hgt, wid) = pixels.dims4()?;
        let (s, p) = (self.cfg.image_size, self.cfg.patch_size);
        if hgt != s || wid != s || c != self.cfg.num_channels {
            bail!("vision tower expects pixels [b, {}, {s}, {s}], got {:?}", self.cfg.num_channels, pixels.dims())
        }
        let g = s / p;
        // Patch convolution with stride = kernel is a matrix product over (c, ky, kx) patches.
        let patches =
            pixels.reshape((b, c, g, p, g, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, g * g, c * p * p))?;
        let x = self.patch_embedding.forward(&patches)?;
        let d = self.cfg.hidden_size;
        let cls = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        self.pre_layrnorm.forward(&x)
    }

    /// Resolves a hidden-states index as transformers counts them (0 = embeddings, i = output of
    /// block i-1; negative from the end: -1 = last block, -2 = penultimate).
    pub fn resolve_layer(&self, k: isize) -> Result<usize> {
        let n = self.layers.len() as isize + 1;
        let idx = if k < 0 { n + k } else { k };
        if idx < 0 || idx >= n {
            bail!("vision layer {k} out of range for a tower with {} blocks (valid: {}..={})", n - 1, -n, n - 1)
        }
        Ok(idx as usize)
    }

    /// Hidden state number `k` (see [`Self::resolve_layer`]), running only the blocks it needs.
    pub fn hidden_state(&self, pixels: &Tensor, k: isize, hooks: &dyn VisionHooks) -> Result<Tensor> {
        let idx = self.resolve_layer(k)?;
        let mut x = self.embed(pixels)?;
        for (l, layer) in self.layers.iter().enumerate().take(idx) {
            x = layer.forward(&x, l, self.cfg.num_attention_heads, hooks)?;
        }
        Ok(x)
    }

    /// Every hidden state, as `output_hidden_states` reports them.
    pub fn hidden_states(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let mut x = self.embed(pixels)?;
        let mut out = vec![x.clone()];
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, l, self.cfg.num_attention_heads, &NoHooks)?;
            out.push(x.clone());
        }
        Ok(out)
    }

    /// `post_layernorm` of the CLS token of the last block (transformers' `pooler_output`).
    pub fn pooled(&self, last_hidden: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(&last_hidden.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// MemVP's visual tokens: hidden state `k`, CLS dropped, `post_layernorm` applied:
    /// `[b, patches, d]`.
    /// `post_layernorm` of every token of hidden state `k`, the CLS token first: `[b, 1 + n, c]`.
    pub fn features_with_cls(&self, pixels: &Tensor, k: isize, hooks: &dyn VisionHooks) -> Result<Tensor> {
        self.post_layernorm.forward(&self.hidden_state(pixels, k, hooks)?)
    }

    pub fn patch_features(&self, pixels: &Tensor, k: isize, hooks: &dyn VisionHooks) -> Result<Tensor> {
        let h = self.hidden_state(pixels, k, hooks)?;
        let n = h.dims()[1];
        self.post_layernorm.forward(&h.narrow(1, 1, n - 1)?)
    }
}

impl Layer {
    fn forward(&self, x: &Tensor, l: usize, heads: usize, hooks: &dyn VisionHooks) -> Result<Tensor> {
        let a = &self.self_attn;
        let x = if a.fusable(x, None) {
            a.forward(x, None)?
        } else {
            let (b, t, d) = x.dims3()?;
            let hd = d / heads;
            let BlockNorm::Layer { weight, bias, eps } = &a.norm else { unreachable!("CLIP blocks use LayerNorm") };
            let n = ops::layer_norm(x, weight, bias, *eps)?;
            let q = a.q.forward(&n)?.reshape((b, t, heads, hd))?;
            let k = a.k.forward(&n)?.reshape((b, t, heads, hd))?;
            let v = a.v.forward(&n)?.reshape((b, t, heads, hd))?;
            let o = ops::attention(&q, &k, &v, AttentionOpts { scale: a.scale, ..Default::default() })?;
            (x + a.o.forward(&o.reshape((b, t, d))?)?)?
        };
        let u = self.layer_norm2.forward(&x)?;
        let m = self.mlp.forward(&u)?;
        let m = add_opt(m, hooks.mlp_branch(l, &u)?)?;
        Ok((x + m)?)
    }
}
