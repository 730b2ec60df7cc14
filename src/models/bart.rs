//! BART as transformers' `BartForConditionalGeneration`.
//!
//! x0 = layernorm_embedding(shared[ids] · embed_scale + pos[position + 2])   (learned positions,
//! offset by 2; embed_scale = sqrt(d_model) when `scale_embedding`)
//! Post-LayerNorm blocks, every projection with a bias, queries scaled by head_dim^-0.5:
//! encoder block: h = ln_sa(x + SelfAttn(x));                              out = ln_f(h + FFN(h) [+ ffn_branch(h)])
//! decoder block: h = ln_sa(x + SelfAttn(x)); h = ln_ca(h + Cross(h, enc)); out = ln_f(h + FFN(h) [+ ffn_branch(h)])
//! FFN(u) = fc2(act(fc1 u)); the hooks' `u` is exactly the tensor fed to fc1.
//! logits = lm_head(dec) + final_logits_bias

use super::encdec::{EncDecCache, EncoderDecoder, SpecialTokens, cross_kv};
use super::{Hidden, LmHooks, Proj, Site, TeacherForcing, add_opt, encdec};
use crate::checkpoint::{Cfg, Weights};
use crate::generate::stepper::BeamStepper;
use crate::ops::{self, Activation, AttentionOpts, FrozenMlp, Linear};
use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// BART's learned positions are stored with 2 extra rows in front.
pub const POSITION_OFFSET: usize = 2;
const LN_EPS: f64 = 1e-5;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BartConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub activation_function: Activation,
    pub max_position_embeddings: usize,
    pub scale_embedding: bool,
    pub tie_word_embeddings: bool,
    pub pad_token_id: u32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub decoder_start_token_id: u32,
    /// Recorded for callers that emulate transformers' generation defaults; nothing here
    /// forces it.
    pub forced_eos_token_id: Option<u32>,
}

impl BartConfig {
    pub fn from_hf(c: &Cfg) -> Result<Self> {
        let d_model = c.usize_or("d_model", 1024)?;
        let heads = |k: &str| -> Result<usize> {
            let h = c.usize_or(k, 16)?;
            if h == 0 || !d_model.is_multiple_of(h) {
                return Err(c.err(k, format!("{h} does not divide d_model {d_model}")));
            }
            Ok(h)
        };
        let act = c.opt_str("activation_function")?.unwrap_or_else(|| "gelu".into());
        let activation_function = Activation::from_hf(&act)
            .ok_or_else(|| c.err("activation_function", format!("unsupported activation `{act}`")))?;
        let first = |k: &str, d: Option<u32>| -> Result<Option<u32>> {
            Ok(if c.v.get(k).is_some() { c.ids(k)?.first().copied() } else { d })
        };
        let eos_token_ids = if c.v.get("eos_token_id").is_some() { c.ids("eos_token_id")? } else { vec![2] };
        Ok(Self {
            vocab_size: c.usize_or("vocab_size", 50265)?,
            d_model,
            encoder_layers: c.usize_or("encoder_layers", 12)?,
            decoder_layers: c.usize_or("decoder_layers", 12)?,
            encoder_attention_heads: heads("encoder_attention_heads")?,
            decoder_attention_heads: heads("decoder_attention_heads")?,
            encoder_ffn_dim: c.usize_or("encoder_ffn_dim", 4096)?,
            decoder_ffn_dim: c.usize_or("decoder_ffn_dim", 4096)?,
            activation_function,
            max_position_embeddings: c.usize_or("max_position_embeddings", 1024)?,
            scale_embedding: c.bool_or("scale_embedding", false)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", true)?,
            pad_token_id: first("pad_token_id", Some(1))?.unwrap_or(1),
            bos_token_id: first("bos_token_id", Some(0))?,
            eos_token_ids,
            decoder_start_token_id: first("decoder_start_token_id", Some(2))?.unwrap_or(2),
            forced_eos_token_id: first("forced_eos_token_id", Some(2))?,
        })
    }
}

struct Attn {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    head_dim: usize,
}

fn linear(w: &Weights, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(w.matrix((out, inp), &format!("{name}.weight"))?, Some(w.get(out, &format!("{name}.bias"))?)))
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn load(w: &Weights, name: &str, d: usize) -> Result<Self> {
        Ok(Self { w: w.get(d, &format!("{name}.weight"))?, b: w.get(d, &format!("{name}.bias"))? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, &self.w, &self.b, LN_EPS)?)
    }
}

impl Attn {
    fn load(w: &Weights, d: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q: linear(w, "q_proj", d, d)?,
            k: linear(w, "k_proj", d, d)?,
            v: linear(w, "v_proj", d, d)?,
            o: linear(w, "out_proj", d, d)?,
            heads,
            head_dim: d / heads,
        })
    }

    fn split(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, self.heads, self.head_dim))?)
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }
}

struct Block {
    self_attn: Attn,
    self_attn_layer_norm: Norm,
    /// Decoder blocks: `encoder_attn` and its norm.
    cross: Option<(Attn, Norm)>,
    /// fc1, activation, fc2 as one fused op.
    mlp: FrozenMlp,
    final_layer_norm: Norm,
}

struct Stack {
    embed_positions: Tensor,
    layernorm_embedding: Norm,
    blocks: Vec<Block>,
    site: Site,
}

pub struct Bart {
    /// `[vocab, d_model]`, unscaled: the encoder's token table (`model.shared`, or
    /// `model.encoder.embed_tokens` when the file keeps untied per-stack tables).
    pub shared: Tensor,
    /// The decoder's token table: `shared` unless the file keeps an untied
    /// `model.decoder.embed_tokens` (what `transformers` then uses).
    decoder_embed_tokens: Tensor,
    embed_scale: f64,
    encoder: Stack,
    decoder: Stack,
    lm_head: Linear,
    final_logits_bias: Option<Tensor>,
    pub cfg: BartConfig,
}

struct Pass<'a> {
    causal: Option<usize>,
    mask: Option<&'a Tensor>,
    enc: Option<(&'a Tensor, Option<&'a Tensor>)>,
    hooks: &'a dyn LmHooks,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        site: Site,
        p: &Pass,
        mut cache: Option<&mut EncDecCache>,
    ) -> Result<Tensor> {
        let a = &self.self_attn;
        let proj = |l: &Linear, which: Proj| -> Result<Tensor> {
            add_opt(l.forward(x)?, p.hooks.proj_delta(site, layer, which, x)?)
        };
        let q = a.split(&proj(&a.q, Proj::Q)?)?;
        let k = a.split(&proj(&a.k, Proj::K)?)?;
        let v = a.split(&proj(&a.v, Proj::V)?)?;
        let (k, v) = match cache.as_deref_mut() {
            Some(c) => c.self_attn.layers[layer].append(&k, &v)?,
            None => (k, v),
        };
        let o = ops::attention(
            &q,
            &k,
            &v,
            AttentionOpts { scale: a.scale(), causal_offset: p.causal, bias: None, key_mask: p.mask },
        )?;
        let o = o.flatten_from(2)?;
        let o = add_opt(a.o.forward(&o)?, p.hooks.proj_delta(site, layer, Proj::O, &o)?)?;
        let mut h = self.self_attn_layer_norm.forward(&(x + o)?)?;
        if let (Some((c, ln)), Some((enc, enc_mask))) = (&self.cross, p.enc) {
            let q = c.split(&c.q.forward(&h)?)?;
            let (k, v) = cross_kv(cache, layer, || Ok((c.split(&c.k.forward(enc)?)?, c.split(&c.v.forward(enc)?)?)))?;
            let o = ops::attention(
                &q,
                &k,
                &v,
                AttentionOpts { scale: c.scale(), causal_offset: None, bias: None, key_mask: enc_mask },
            )?;
            h = ln.forward(&(&h + c.o.forward(&o.flatten_from(2)?)?)?)?;
        }
        // Feed-forward; `h` is both the residual and the FFN input (post-LN).
        let f = self.mlp.forward(&h)?;
        let f = add_opt(f, p.hooks.ffn_branch(site, layer, &h)?)?;
        self.final_layer_norm.forward(&(h + f)?)
    }
}

impl Stack {
    fn load(w: &Weights, cfg: &BartConfig, decoder: bool) -> Result<Self> {
        let d = cfg.d_model;
        let (n, heads, ffn) = if decoder {
            (cfg.decoder_layers, cfg.decoder_attention_heads, cfg.decoder_ffn_dim)
        } else {
            (cfg.encoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_dim)
        };
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let b = w.pp(format!("layers.{i}"));
            let cross = if decoder {
                Some((Attn::load(&b.pp("encoder_attn"), d, heads)?, Norm::load(&b, "encoder_attn_layer_norm", d)?))
            } else {
                None
            };
            blocks.push(Block {
                self_attn: Attn::load(&b.pp("self_attn"), d, heads)?,
                self_attn_layer_norm: Norm::load(&b, "self_attn_layer_norm", d)?,
                cross,
                mlp: FrozenMlp {
                    w1: linear(&b, "fc1", ffn, d)?,
                    w2: None,
                    down: linear(&b, "fc2", d, ffn)?,
                    act: cfg.activation_function,
                },
                final_layer_norm: Norm::load(&b, "final_layer_norm", d)?,
            });
        }
        Ok(Self {
            embed_positions: w.get((cfg.max_position_embeddings + POSITION_OFFSET, d), "embed_positions.weight")?,
            layernorm_embedding: Norm::load(w, "layernorm_embedding", d)?,
            blocks,
            site: if decoder { Site::Decoder } else { Site::Encoder },
        })
    }

    /// `layernorm_embedding(x + pos[past..past + t])`.
    fn embed_in(&self, x: &Tensor, past: usize, label: &str) -> Result<Tensor> {
        let t = x.dims3()?.1;
        let max = self.embed_positions.dims()[0] - POSITION_OFFSET;
        if past + t > max {
            bail!("BART {}: {} positions exceed max_position_embeddings {max}", label, past + t)
        }
        let pos = self.embed_positions.narrow(0, past + POSITION_OFFSET, t)?.unsqueeze(0)?;
        self.layernorm_embedding.forward(&x.broadcast_add(&pos)?)
    }
}

impl Bart {
    pub fn load(w: &Weights, cfg: BartConfig) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let m = w.pp("model");
        // transformers 5 saves only `model.shared.weight`; older files may carry tied copies.
        let shared = if m.contains("shared.weight") || !m.contains("encoder.embed_tokens.weight") {
            m.get((v, d), "shared.weight")?
        } else {
            m.get((v, d), "encoder.embed_tokens.weight")?
        };
        // With `tie_word_embeddings: false` each stack reads its own table when the file has one.
        let own = |stack: &str| -> Result<Tensor> {
            let name = format!("{stack}.embed_tokens.weight");
            Ok(if !cfg.tie_word_embeddings && m.contains(&name) { m.get((v, d), &name)? } else { shared.clone() })
        };
        let (shared, decoder_embed_tokens) = (own("encoder")?, own("decoder")?);
        let encoder = Stack::load(&m.pp("encoder"), &cfg, false)?;
        let decoder = Stack::load(&m.pp("decoder"), &cfg, true)?;
        let lm_head = match w.contains("lm_head.weight").then(|| w.matrix((v, d), "lm_head.weight")).transpose()? {
            Some(h) => Linear::new(h, None),
            None if cfg.tie_word_embeddings => Linear::new(shared.clone(), None),
            None => bail!("{}: tensor `lm_head.weight` not found (and tie_word_embeddings is false)", w.label()),
        };
        let final_logits_bias = w.get_opt((1, v), "final_logits_bias")?.map(|b| b.reshape(v)).transpose()?;
        let embed_scale = if cfg.scale_embedding { (d as f64).sqrt() } else { 1.0 };
        Ok(Self { shared, decoder_embed_tokens, embed_scale, encoder, decoder, lm_head, final_logits_bias, cfg })
    }

    pub fn n_encoder_layers(&self) -> usize {
        self.encoder.blocks.len()
    }

    pub fn n_decoder_layers(&self) -> usize {
        self.decoder.blocks.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.d_model
    }

    /// Decoder on (scaled) token embeddings `[b, t, d]`.
    pub fn decode_embeds(
        &self,
        x: &Tensor,
        enc: &Tensor,
        enc_mask: Option<&Tensor>,
        mut cache: Option<&mut EncDecCache>,
        hooks: &dyn LmHooks,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let mut h = self.decoder.embed_in(x, past, "decoder")?;
        let p = Pass { causal: Some(past), mask: None, enc: Some((enc, enc_mask)), hooks };
        for (l, blk) in self.decoder.blocks.iter().enumerate() {
            h = blk.forward(&h, l, self.decoder.site, &p, cache.as_deref_mut())?;
        }
        Ok(h)
    }

    /// Convenience: encoder ids + mask and decoder ids → logits `[b, t_dec, vocab]`.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        decoder_ids: &Tensor,
        hooks: &dyn LmHooks,
    ) -> Result<Tensor> {
        let enc = self.encode(ids, mask, hooks)?;
        let h = self.decode(decoder_ids, &enc, mask, None, hooks)?;
        self.logits(&h)
    }
}

impl Bart {
    fn embed_with(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?;
        Ok(if self.embed_scale == 1.0 { e } else { (e * self.embed_scale)? })
    }
}

impl EncoderDecoder for Bart {
    /// Scaled token embeddings `[b, t, d]` of ids `[b, t]` (`BartScaledWordEmbedding`).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_with(&self.shared, ids)
    }
    fn embed_decoder(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_with(&self.decoder_embed_tokens, ids)
    }
    /// Encoder on (scaled) token embeddings `[b, t, d]`; positions are added here.
    fn encode_embeds(&self, x: &Tensor, mask: Option<&Tensor>, hooks: &dyn LmHooks) -> Result<Tensor> {
        let mut h = self.encoder.embed_in(x, 0, "encoder")?;
        let p = Pass { causal: None, mask, enc: None, hooks };
        for (l, blk) in self.encoder.blocks.iter().enumerate() {
            h = blk.forward(&h, l, self.encoder.site, &p, None)?;
        }
        Ok(h)
    }
    /// Decoder on ids `[b, t]` that follow the `cache.len()` cached positions; returns its last
    /// hidden state.
    fn decode(
        &self,
        ids: &Tensor,
        enc: &Tensor,
        enc_mask: Option<&Tensor>,
        cache: Option<&mut EncDecCache>,
        hooks: &dyn LmHooks,
    ) -> Result<Tensor> {
        self.decode_embeds(&self.embed_decoder(ids)?, enc, enc_mask, cache, hooks)
    }
    /// Logits from decoder hidden states `[.., d]`, with `final_logits_bias`.
    fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let l = self.lm_head.forward(h)?;
        Ok(match &self.final_logits_bias {
            Some(b) => l.broadcast_add(b)?,
            None => l,
        })
    }
    fn new_cache(&self) -> EncDecCache {
        EncDecCache::new(self.decoder.blocks.len())
    }
    fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            decoder_start: self.cfg.decoder_start_token_id,
            eos: self.cfg.eos_token_ids.clone(),
            pad: self.cfg.pad_token_id,
        }
    }
    fn device(&self) -> &Device {
        self.shared.device()
    }
    fn dtype(&self) -> DType {
        self.shared.dtype()
    }
}

impl super::LanguageModel for Bart {
    encdec::encdec_language_model!();
    fn family(&self) -> &'static str {
        "bart"
    }
    fn width(&self) -> usize {
        self.hidden_size()
    }
    fn max_positions(&self) -> Option<usize> {
        Some(self.cfg.max_position_embeddings)
    }
    /// The decoder's positions: the start token and every fed token take one.
    fn max_new_tokens(&self, _prompt_len: usize) -> Option<usize> {
        Some(self.cfg.max_position_embeddings)
    }
    fn ffn_activation(&self) -> Activation {
        self.cfg.activation_function
    }
    fn proj_dims(&self, _site: Site, _proj: Proj) -> (usize, usize) {
        let d = self.hidden_size();
        (d, d)
    }
}
