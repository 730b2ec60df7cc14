//! T5 (original and v1.1 / FLAN-T5 style) as transformers' `T5ForConditionalGeneration`.
//!
//! Pre-norm blocks with RMS norms (`T5LayerNorm`), no biases, no position embeddings: block 0
//! of each stack owns a relative position bias (bidirectional buckets in the encoder, causal
//! buckets in the decoder) that every block of the stack adds to its self-attention scores.
//! Attention scores are **not** scaled by `1/sqrt(d_kv)`.
//!
//! encoder block: h = x + SelfAttn(rms(x));                    u = rms(h); out = h + FFN(u) [+ ffn_branch(u)]
//! decoder block: h = x + SelfAttn(rms(x)); h = h + Cross(rms(h), enc); u = rms(h); out = h + FFN(u) [+ ffn_branch(u)]
//! FFN(u) = wo(act(wi u))  or, gated,  wo(act(wi_0 u) * wi_1 u)
//! logits = lm_head(rms_final(dec) [* d_model^-0.5 when scale_decoder_outputs])

use super::encdec::{EncDecCache, EncoderDecoder, SpecialTokens, cross_kv};
use super::kv_cache::LayerCache;
use super::{Hidden, LmHooks, Proj, Site, TeacherForcing, add_opt, encdec};
use crate::checkpoint::{Cfg, Weights};
use crate::generate::stepper::BeamStepper;
use crate::ops::{self, Activation, AttentionOpts, FrozenMlp, Linear};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// As written in the config (`relu`, `gated-gelu`, `gated-silu`, ...).
    pub feed_forward_proj: String,
    pub is_gated_act: bool,
    /// The FFN activation derived from `feed_forward_proj` (`gated-gelu` means `gelu_new`).
    pub dense_act_fn: Activation,
    pub tie_word_embeddings: bool,
    /// Multiply the decoder output by `d_model^-0.5` before the LM head (original T5).
    pub scale_decoder_outputs: bool,
    pub decoder_start_token_id: u32,
    pub pad_token_id: u32,
    pub eos_token_ids: Vec<u32>,
}

impl T5Config {
    pub fn from_hf(c: &Cfg) -> Result<Self> {
        let d_model = c.usize_or("d_model", 512)?;
        let num_heads = c.usize_or("num_heads", 8)?;
        if num_heads == 0 {
            return Err(c.err("num_heads", "must be positive"));
        }
        let num_layers = c.usize_or("num_layers", 6)?;
        let feed_forward_proj = c.opt_str("feed_forward_proj")?.unwrap_or_else(|| "relu".into());
        // As T5Config.__post_init__: `gated-{act}` or `{act}`; `gated-gelu` means gelu_new.
        let parts: Vec<&str> = feed_forward_proj.split('-').collect();
        let (is_gated_act, act) = match parts.as_slice() {
            [a] => (false, *a),
            ["gated", a] => (true, *a),
            _ => {
                return Err(c.err(
                    "feed_forward_proj",
                    format!("`{feed_forward_proj}` is not of the form `gated-{{ACT}}` or `{{ACT}}`"),
                ));
            }
        };
        let act = if feed_forward_proj == "gated-gelu" { "gelu_new" } else { act };
        let dense_act_fn = Activation::from_hf(act).ok_or_else(|| {
            c.err(
                "feed_forward_proj",
                format!("unsupported activation `{act}` (supported: relu, gelu, gelu_new, silu)"),
            )
        })?;
        let tie_word_embeddings = c.bool_or("tie_word_embeddings", true)?;
        // transformers 5 writes `scale_decoder_outputs`; before it, the scaling followed
        // `tie_word_embeddings` (default true).
        let scale_decoder_outputs = c.bool_or("scale_decoder_outputs", tie_word_embeddings)?;
        let pad_token_id = c.ids("pad_token_id")?.first().copied().unwrap_or(0);
        let decoder_start_token_id = c.ids("decoder_start_token_id")?.first().copied().unwrap_or(pad_token_id);
        let eos = if c.has("eos_token_id") { c.ids("eos_token_id")? } else { vec![1] };
        let cfg = Self {
            vocab_size: c.usize_or("vocab_size", 32128)?,
            d_model,
            d_kv: c.usize_or("d_kv", 64)?,
            d_ff: c.usize_or("d_ff", 2048)?,
            num_layers,
            num_decoder_layers: c.usize_or("num_decoder_layers", num_layers)?,
            num_heads,
            relative_attention_num_buckets: c.usize_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: c.usize_or("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: c.f64_or("layer_norm_epsilon", 1e-6)?,
            feed_forward_proj,
            is_gated_act,
            dense_act_fn,
            tie_word_embeddings,
            scale_decoder_outputs,
            decoder_start_token_id,
            pad_token_id,
            eos_token_ids: eos,
        };
        if cfg.relative_attention_num_buckets < 4 {
            return Err(c.err(
                "relative_attention_num_buckets",
                format!("{} is too small (at least 4)", cfg.relative_attention_num_buckets),
            ));
        }
        Ok(cfg)
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// `memory_position - query_position`, with the same float32 arithmetic (log-spaced buckets
/// are truncated from f32 values, so f64 would move some boundaries).
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let n = if bidirectional {
        nb /= 2;
        if relative_position > 0 {
            bucket += nb;
        }
        relative_position.abs()
    } else {
        (-relative_position).max(0)
    };
    let max_exact = nb / 2;
    if n < max_exact {
        return (bucket + n) as usize;
    }
    let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = ((n as f32 / max_exact as f32).ln() / denom * (nb - max_exact) as f32) as i64;
    (bucket + (max_exact + large).min(nb - 1)) as usize
}

struct Attn {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
}

impl Attn {
    fn load(w: &Weights, d: usize, heads: usize, d_kv: usize) -> Result<Self> {
        let inner = heads * d_kv;
        let lin = |n: &str, o: usize, i: usize| -> Result<Linear> {
            Ok(Linear::new(w.matrix((o, i), &format!("{n}.weight"))?, None))
        };
        Ok(Self {
            q: lin("q", inner, d)?,
            k: lin("k", inner, d)?,
            v: lin("v", inner, d)?,
            o: lin("o", d, inner)?,
            heads,
            d_kv,
        })
    }

    fn split(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, self.heads, self.d_kv))?)
    }
}

struct Block {
    self_ln: Tensor,
    self_attn: Attn,
    /// Decoder blocks: the cross-attention's norm and projections.
    cross: Option<(Tensor, Attn)>,
    ff_ln: Tensor,
    ff: FrozenMlp,
}

struct Stack {
    blocks: Vec<Block>,
    /// `[num_buckets, heads]`, owned by block 0.
    rel_bias: Tensor,
    final_ln: Tensor,
    site: Site,
}

pub struct T5 {
    /// `[vocab, d_model]`, the token embeddings of both stacks.
    /// The encoder's token table (`shared`, or `encoder.embed_tokens` when the file keeps
    /// untied per-stack tables).
    pub shared: Tensor,
    /// The decoder's token table: `shared` unless the file keeps an untied
    /// `decoder.embed_tokens` (what `transformers` then uses).
    decoder_embed_tokens: Tensor,
    encoder: Stack,
    decoder: Stack,
    lm_head: Linear,
    pub cfg: T5Config,
}

/// Arguments of a block's forward that are the same for every block of a pass.
struct Pass<'a> {
    bias: &'a Tensor,
    /// Decoder: the number of cached positions (causal); encoder: `None`.
    causal: Option<usize>,
    mask: Option<&'a Tensor>,
    enc: Option<(&'a Tensor, Option<&'a Tensor>)>,
    hooks: &'a dyn LmHooks,
    eps: f64,
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
        // Self-attention.
        let a = &self.self_attn;
        let n = ops::rms_norm(x, &self.self_ln, p.eps)?;
        let proj = |l: &Linear, which: Proj| -> Result<Tensor> {
            add_opt(l.forward(&n)?, p.hooks.proj_delta(site, layer, which, &n)?)
        };
        let q = a.split(&proj(&a.q, Proj::Q)?)?;
        let k = a.split(&proj(&a.k, Proj::K)?)?;
        let v = a.split(&proj(&a.v, Proj::V)?)?;
        let lc: Option<&mut LayerCache> = cache.as_deref_mut().map(|c| &mut c.self_attn.layers[layer]);
        let (k, v) = match lc {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let o = ops::attention(
            &q,
            &k,
            &v,
            AttentionOpts { scale: 1.0, causal_offset: p.causal, bias: Some(p.bias), key_mask: p.mask },
        )?;
        let o = o.flatten_from(2)?;
        let o = add_opt(a.o.forward(&o)?, p.hooks.proj_delta(site, layer, Proj::O, &o)?)?;
        let mut h = (x + o)?;
        // Cross-attention (decoder).
        if let (Some((ln, c)), Some((enc, enc_mask))) = (&self.cross, p.enc) {
            let n = ops::rms_norm(&h, ln, p.eps)?;
            let q = c.split(&c.q.forward(&n)?)?;
            let (k, v) = cross_kv(cache, layer, || Ok((c.split(&c.k.forward(enc)?)?, c.split(&c.v.forward(enc)?)?)))?;
            let o = ops::attention(
                &q,
                &k,
                &v,
                AttentionOpts { scale: 1.0, causal_offset: None, bias: None, key_mask: enc_mask },
            )?;
            h = (h + c.o.forward(&o.flatten_from(2)?)?)?;
        }
        // Feed-forward, with the hooks' parallel branch on the same normalised input.
        let u = ops::rms_norm(&h, &self.ff_ln, p.eps)?;
        let f = self.ff.forward(&u)?;
        let f = add_opt(f, p.hooks.ffn_branch(site, layer, &u)?)?;
        Ok((h + f)?)
    }
}

impl Stack {
    fn load(w: &Weights, cfg: &T5Config, decoder: bool) -> Result<Self> {
        let (d, h, dkv, dff) = (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff);
        let n = if decoder { cfg.num_decoder_layers } else { cfg.num_layers };
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let b = w.pp(format!("block.{i}"));
            let l0 = b.pp("layer.0");
            let (cross, ff_idx) = if decoder {
                let l1 = b.pp("layer.1");
                (Some((l1.get(d, "layer_norm.weight")?, Attn::load(&l1.pp("EncDecAttention"), d, h, dkv)?)), 2)
            } else {
                (None, 1)
            };
            let lf = b.pp(format!("layer.{ff_idx}"));
            let dr = lf.pp("DenseReluDense");
            let lin = |n: &str, o: usize, i: usize| -> Result<Linear> {
                Ok(Linear::new(dr.matrix((o, i), &format!("{n}.weight"))?, None))
            };
            let ff = if cfg.is_gated_act {
                FrozenMlp {
                    w1: lin("wi_0", dff, d)?,
                    w2: Some(lin("wi_1", dff, d)?),
                    down: lin("wo", d, dff)?,
                    act: cfg.dense_act_fn,
                }
                .share_storage()?
            } else {
                FrozenMlp { w1: lin("wi", dff, d)?, w2: None, down: lin("wo", d, dff)?, act: cfg.dense_act_fn }
            };
            blocks.push(Block {
                self_ln: l0.get(d, "layer_norm.weight")?,
                self_attn: Attn::load(&l0.pp("SelfAttention"), d, h, dkv)?,
                cross,
                ff_ln: lf.get(d, "layer_norm.weight")?,
                ff,
            });
        }
        Ok(Self {
            blocks,
            rel_bias: w.get(
                (cfg.relative_attention_num_buckets, h),
                "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            )?,
            final_ln: w.get(d, "final_layer_norm.weight")?,
            site: if decoder { Site::Decoder } else { Site::Encoder },
        })
    }
}

impl T5 {
    pub fn load(w: &Weights, cfg: T5Config) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        // transformers 5 saves only `shared.weight`; older files may carry tied copies.
        let shared = if w.contains("shared.weight") || !w.contains("encoder.embed_tokens.weight") {
            w.get((v, d), "shared.weight")?
        } else {
            w.get((v, d), "encoder.embed_tokens.weight")?
        };
        // With `tie_word_embeddings: false` each stack reads its own table when the file has one.
        let own = |stack: &str| -> Result<Tensor> {
            let name = format!("{stack}.embed_tokens.weight");
            Ok(if !cfg.tie_word_embeddings && w.contains(&name) { w.get((v, d), &name)? } else { shared.clone() })
        };
        let (enc_table, decoder_embed_tokens) = (own("encoder")?, own("decoder")?);
        let encoder = Stack::load(&w.pp("encoder"), &cfg, false)?;
        let decoder = Stack::load(&w.pp("decoder"), &cfg, true)?;
        let lm_head = match w.contains("lm_head.weight").then(|| w.matrix((v, d), "lm_head.weight")).transpose()? {
            Some(h) => Linear::new(h, None),
            None => Linear::new(shared.clone(), None),
        };
        Ok(Self { shared: enc_table, decoder_embed_tokens, encoder, decoder, lm_head, cfg })
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

    /// The relative position bias `[1, heads, tq, tk]` of `stack` for queries at positions
    /// `past..past + tq` and keys at `0..tk`.
    fn position_bias(&self, stack: &Stack, tq: usize, tk: usize, past: usize) -> Result<Tensor> {
        let bidirectional = stack.site == Site::Encoder;
        let (nb, md) = (self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance);
        // The bucket depends on the distance alone: one log per distance, not per pair.
        let lo = -((tq + past) as i64);
        let buckets: Vec<u32> =
            (lo..tk as i64).map(|rel| relative_position_bucket(rel, bidirectional, nb, md) as u32).collect();
        let mut idx = Vec::with_capacity(tq * tk);
        for i in 0..tq {
            for j in 0..tk {
                idx.push(buckets[(j as i64 - (i + past) as i64 - lo) as usize]);
            }
        }
        let idx = Tensor::from_vec(idx, tq * tk, self.device())?;
        let h = self.cfg.num_heads;
        Ok(stack
            .rel_bias
            .index_select(&idx, 0)?
            .reshape((tq, tk, h))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    /// Decoder on embeddings `[b, t, d]`.
    pub fn decode_embeds(
        &self,
        x: &Tensor,
        enc: &Tensor,
        enc_mask: Option<&Tensor>,
        mut cache: Option<&mut EncDecCache>,
        hooks: &dyn LmHooks,
    ) -> Result<Tensor> {
        let t = x.dims3()?.1;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let bias = self.position_bias(&self.decoder, t, past + t, past)?;
        let p = Pass {
            bias: &bias,
            causal: Some(past),
            mask: None,
            enc: Some((enc, enc_mask)),
            hooks,
            eps: self.cfg.layer_norm_epsilon,
        };
        let mut h = x.clone();
        for (l, blk) in self.decoder.blocks.iter().enumerate() {
            h = blk.forward(&h, l, Site::Decoder, &p, cache.as_deref_mut())?;
        }
        Ok(ops::rms_norm(&h, &self.decoder.final_ln, p.eps)?)
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

impl EncoderDecoder for T5 {
    /// Token embeddings `[b, t, d]` of ids `[b, t]` (no scaling in T5).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.shared.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?)
    }
    fn embed_decoder(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.decoder_embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.d_model))?)
    }
    /// Encoder on embeddings `[b, t, d]`.
    fn encode_embeds(&self, x: &Tensor, mask: Option<&Tensor>, hooks: &dyn LmHooks) -> Result<Tensor> {
        let t = x.dims3()?.1;
        let bias = self.position_bias(&self.encoder, t, t, 0)?;
        let p = Pass { bias: &bias, causal: None, mask, enc: None, hooks, eps: self.cfg.layer_norm_epsilon };
        let mut h = x.clone();
        for (l, blk) in self.encoder.blocks.iter().enumerate() {
            h = blk.forward(&h, l, Site::Encoder, &p, None)?;
        }
        Ok(ops::rms_norm(&h, &self.encoder.final_ln, p.eps)?)
    }
    /// Decoder on ids `[b, t]` that follow the `cache.len()` cached positions; `enc` is the
    /// encoder output `[b, t_enc, d]` with its mask. Returns the decoder's last hidden state
    /// (after the final norm, before the output scaling that [`Self::logits`] applies).
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
    /// Logits from decoder hidden states `[.., d]`.
    fn logits(&self, h: &Tensor) -> Result<Tensor> {
        if self.cfg.scale_decoder_outputs {
            let s = (self.cfg.d_model as f64).powf(-0.5);
            Ok(self.lm_head.forward(&(h * s)?)?)
        } else {
            Ok(self.lm_head.forward(h)?)
        }
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

impl super::LanguageModel for T5 {
    encdec::encdec_language_model!();
    fn family(&self) -> &'static str {
        "t5"
    }
    fn width(&self) -> usize {
        self.cfg.d_model
    }
    fn max_positions(&self) -> Option<usize> {
        None
    }
    fn ffn_activation(&self) -> Activation {
        self.cfg.dense_act_fn
    }
    fn proj_dims(&self, _site: Site, proj: Proj) -> (usize, usize) {
        let (d, inner) = (self.cfg.d_model, self.cfg.num_heads * self.cfg.d_kv);
        if proj == Proj::O { (inner, d) } else { (d, inner) }
    }
}
