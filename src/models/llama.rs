//! LLaMA-family decoders (LLaMA 1/2/3, SmolLM2, Mistral-style grouped-query attention), as in
//! transformers' `modeling_llama.py`, from a Hugging Face directory or a GGUF file.
//!
//! block:  h = x + Attn(RMSNorm(x));  u = RMSNorm(h);  out = h + FFN(u) [+ hooks.ffn_branch(u)]
//! FFN(u) = down(silu(gate(u)) * up(u))

use super::encdec::key_mask;
use super::{Hidden, KvCache, LanguageModel, LmHooks, Proj, Site, TeacherForcing, add_opt};
use crate::checkpoint::{Cfg, GgufFile, Weights};
use crate::generate::stepper::{BeamStepper, Stepper};
use crate::ops::{self, Activation, AttentionOpts, BlockNorm, FrozenAttnBlock, FrozenMlp, Linear, RopeTable, Weight};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors as stored by llama.cpp (`rope_freqs.weight`).
    Factors {
        factors: Vec<f64>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub hidden_act: Activation,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    pub fn from_hf(c: &Cfg) -> Result<Self> {
        for key in ["hidden_size", "intermediate_size", "vocab_size"] {
            if c.usize(key)? == 0 {
                return Err(c.err(key, "is 0; a LLaMA-family model needs at least 1"));
            }
        }
        let hidden_size = c.usize("hidden_size")?;
        let num_attention_heads = c.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 && !c.has("head_dim") {
            return Err(c.err(
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let num_key_value_heads = c.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(c.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = c.usize_or("head_dim", hidden_size / num_attention_heads)?;
        // transformers 5 moved rope settings into `rope_parameters`; older files have
        // `rope_theta` at top level and `rope_scaling` beside it.
        let rp = c.sub("rope_parameters");
        let rope_theta = match rp.as_ref().and_then(|r| r.opt_f64("rope_theta").transpose()) {
            Some(t) => t?,
            None => c.f64_or("rope_theta", 10000.0)?,
        };
        let scaling_cfg = c.sub("rope_scaling").or(rp);
        let rope_scaling = match scaling_cfg {
            None => None,
            Some(s) => {
                let ty = s.opt_str("rope_type")?.or(s.opt_str("type")?).unwrap_or_else(|| "default".into());
                match ty.as_str() {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear { factor: s.f64("factor")? }),
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: s.f64("factor")?,
                        low_freq_factor: s.f64("low_freq_factor")?,
                        high_freq_factor: s.f64("high_freq_factor")?,
                        original_max_position_embeddings: s.usize("original_max_position_embeddings")?,
                    }),
                    other => {
                        return Err(s.err(
                            "rope_type",
                            format!("unsupported rope scaling `{other}` (supported: default, linear, llama3)"),
                        ));
                    }
                }
            }
        };
        let act = c.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into());
        let hidden_act =
            Activation::from_hf(&act).ok_or_else(|| c.err("hidden_act", format!("unsupported activation `{act}`")))?;
        Ok(Self {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_hidden_layers: c.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.usize_or("max_position_embeddings", 2048)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
            hidden_act,
            attention_bias: c.bool_or("attention_bias", false)?,
            mlp_bias: c.bool_or("mlp_bias", false)?,
            bos_token_id: c.ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.ids("eos_token_id")?,
        })
    }

    pub fn from_gguf(g: &GgufFile, vocab_from_tokenizer: usize) -> Result<Self> {
        for key in ["embedding_length", "feed_forward_length", "attention.head_count"] {
            if g.require_usize(key)? == 0 {
                bail!(
                    "{}: metadata field `{}.{key}` is 0; a LLaMA-family model needs at least 1",
                    g.path.display(),
                    g.arch
                )
            }
        }
        let hidden_size = g.require_usize("embedding_length")?;
        let heads = g.require_usize("attention.head_count")?;
        let kv = g.arch_usize("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = g
            .arch_usize("attention.key_length")?
            .or(g.arch_usize("rope.dimension_count")?)
            .unwrap_or(hidden_size / heads);
        let mut rope_scaling = None;
        if g.content.tensor_infos.contains_key("rope_freqs.weight") {
            let f = g.load_raw("rope_freqs.weight", &Device::Cpu)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            rope_scaling = Some(RopeScaling::Factors { factors: f });
        } else if let Some(candle_core::quantized::gguf_file::Value::String(t)) = g.meta("llama.rope.scaling.type") {
            if t == "linear" {
                let factor = g.arch_f64("rope.scaling.factor")?.unwrap_or(1.0);
                rope_scaling = Some(RopeScaling::Linear { factor });
            } else if t != "none" {
                bail!("{}: unsupported rope scaling `{t}` (metadata field llama.rope.scaling.type)", g.path.display())
            }
        }
        let meta_id = |k: &str| g.meta(k).and_then(|v| v.to_u32().ok());
        Ok(Self {
            vocab_size: g.arch_usize("vocab_size")?.unwrap_or(vocab_from_tokenizer),
            hidden_size,
            intermediate_size: g.require_usize("feed_forward_length")?,
            num_hidden_layers: g.require_usize("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: g.arch_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: g.arch_f64("rope.freq_base")?.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: g.arch_usize("context_length")?.unwrap_or(2048),
            tie_word_embeddings: !g.content.tensor_infos.contains_key("output.weight"),
            hidden_act: Activation::Silu,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: meta_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: meta_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        })
    }

    /// Inverse frequencies, computed in f32 as transformers does.
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        let out: Vec<f32> = match &self.rope_scaling {
            None => inv,
            Some(RopeScaling::Linear { factor }) => inv.iter().map(|f| f / *factor as f32).collect(),
            Some(RopeScaling::Factors { factors }) => inv.iter().zip(factors).map(|(f, d)| f / *d as f32).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, lo, hi) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
                let old = *original_max_position_embeddings as f32;
                let (lo_wl, hi_wl) = (old / lo, old / hi);
                inv.iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wl > lo_wl { f / factor } else { f };
                        // NaN-free: wavelengths are finite and positive.
                        let medium = wl >= hi_wl && wl <= lo_wl;
                        if medium {
                            let s = (old / wl - lo) / (hi - lo);
                            (1.0 - s) * scaled / factor + s * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        };
        out.into_iter().map(f64::from).collect()
    }
}

struct Block {
    /// input_layernorm and self_attn.{q,k,v,o}_proj (fused when nothing inside is trained).
    self_attn: FrozenAttnBlock,
    post_attention_layernorm: Tensor,
    /// gate_proj, up_proj, down_proj as one fused op.
    mlp: FrozenMlp,
}

/// Positions of the tokens fed to a forward pass.
#[derive(Clone, Debug)]
pub enum Positions {
    /// All rows at `start..start + t`.
    From(usize),
    /// Per-sample positions `[b, t]` (u32), for left-padded batches.
    PerSample(Tensor),
}

pub struct Llama {
    /// `[vocab, d]` in the frozen format (rows are decoded as they are looked up).
    pub embed_tokens: Weight,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTable,
    pub cfg: LlamaConfig,
    dtype: DType,
    device: Device,
}

fn linear(w: &Weights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let weight = w.matrix((out, inp), &format!("{name}.weight"))?;
    let bias = if bias { Some(w.get(out, &format!("{name}.bias"))?) } else { None };
    Ok(Linear::new(weight, bias))
}

impl Llama {
    pub fn load(w: &Weights, cfg: LlamaConfig) -> Result<Self> {
        let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let m = w.pp("model");
        let embed_tokens = m.matrix((v, d), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let b = m.pp(format!("layers.{l}"));
            let a = b.pp("self_attn");
            let f = b.pp("mlp");
            layers.push(Block {
                self_attn: FrozenAttnBlock {
                    norm: BlockNorm::Rms { weight: b.get(d, "input_layernorm.weight")?, eps: cfg.rms_norm_eps },
                    q: linear(&a, "q_proj", h * hd, d, cfg.attention_bias)?,
                    k: linear(&a, "k_proj", kv * hd, d, cfg.attention_bias)?,
                    v: linear(&a, "v_proj", kv * hd, d, cfg.attention_bias)?,
                    o: linear(&a, "o_proj", d, h * hd, cfg.attention_bias)?,
                    heads: h,
                    kv_heads: kv,
                    head_dim: hd,
                    scale: 1.0 / (hd as f64).sqrt(),
                    causal: true,
                }
                .share_storage()?,
                post_attention_layernorm: b.get(d, "post_attention_layernorm.weight")?,
                mlp: FrozenMlp {
                    w1: linear(&f, "gate_proj", i, d, cfg.mlp_bias)?,
                    w2: Some(linear(&f, "up_proj", i, d, cfg.mlp_bias)?),
                    down: linear(&f, "down_proj", d, i, cfg.mlp_bias)?,
                    act: cfg.hidden_act,
                }
                .share_storage()?,
            });
        }
        let norm = m.get(d, "norm.weight")?;
        let lm_head = if w.contains("lm_head.weight") || (!cfg.tie_word_embeddings && w.makes_on_request()) {
            Linear::new(w.matrix((v, d), "lm_head.weight")?, None)
        } else if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            bail!("{}: tensor `lm_head.weight` not found (and tie_word_embeddings is false)", w.label())
        };
        let rope = RopeTable::new(&cfg.inv_freq(), cfg.max_position_embeddings.max(1), w.dtype, &w.device)
            .context("building the rope table")?;
        Ok(Self { embed_tokens, layers, norm, lm_head, rope, cfg, dtype: w.dtype, device: w.device.clone() })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The embeddings a teacher-forcing pass starts from (prefix, text, the hooks' edit), its
    /// key mask, its rows and the prefix length.
    fn teacher_input(
        &self,
        tf: &TeacherForcing,
        hooks: &dyn LmHooks,
    ) -> Result<(Tensor, Option<Tensor>, usize, usize)> {
        let (b, t) = tf.input_ids.dims2()?;
        let mut x = self.embed(tf.input_ids)?;
        let n = tf.prefix.map_or(0, |p| p.0.dims()[1]);
        if let Some((p, _)) = tf.prefix {
            x = Tensor::cat(&[p, &x], 1)?;
        }
        let x = super::edit_input(hooks, x, &vec![n; b])?;
        // Right padding under a causal mask needs no key mask for the trained positions; a
        // prefix of a text-only row is masked out.
        let mask = key_mask(b, t, None, tf.prefix.map(|p| (n, p.1)), x.device())?;
        Ok((x, mask, t + n, n))
    }

    /// Token embeddings `[b, t, d]` of ids `[b, t]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.embed_tokens.embedding(ids, self.dtype)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Runs every block on embeddings `x: [b, t, d]` and applies the final norm.
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        pos: &Positions,
        mut cache: Option<&mut KvCache>,
        key_mask: Option<&Tensor>,
        hooks: &dyn LmHooks,
    ) -> Result<Tensor> {
        let (_b, t, _) = x.dims3()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let (cos, sin) = match pos {
            Positions::From(s) => self.rope.range(*s, t)?,
            Positions::PerSample(p) => self.rope.gather(p)?,
        };
        let mut h = x.clone();
        for (l, blk) in self.layers.iter().enumerate() {
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            h = blk.forward(&h, l, &cos, &sin, past, lc, key_mask, hooks, self.cfg.rms_norm_eps)?;
        }
        Ok(ops::rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// Logits from final hidden states `[.., d]`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(h)?)
    }

    /// Convenience: ids → logits for every position.
    pub fn forward(
        &self,
        ids: &Tensor,
        pos: usize,
        cache: Option<&mut KvCache>,
        hooks: &dyn LmHooks,
    ) -> Result<Tensor> {
        let h = self.forward_embeds(&self.embed(ids)?, &Positions::From(pos), cache, None, hooks)?;
        self.logits(&h)
    }

    /// Hidden states after the embedding and after every block (the last one normalised), as
    /// transformers' `output_hidden_states` reports them.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        let x = self.embed(ids)?;
        let t = x.dims()[1];
        let (cos, sin) = self.rope.range(0, t)?;
        let mut out = vec![x.clone()];
        let mut h = x;
        for (l, blk) in self.layers.iter().enumerate() {
            h = blk.forward(&h, l, &cos, &sin, 0, None, None, &super::NoHooks, self.cfg.rms_norm_eps)?;
            out.push(h.clone());
        }
        let last = out.pop().unwrap();
        out.push(ops::rms_norm(&last, &self.norm, self.cfg.rms_norm_eps)?);
        Ok(out)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cos: &Tensor,
        sin: &Tensor,
        past: usize,
        cache: Option<&mut super::kv_cache::LayerCache>,
        key_mask: Option<&Tensor>,
        hooks: &dyn LmHooks,
        eps: f64,
    ) -> Result<Tensor> {
        let a = &self.self_attn;
        let h =
            if cache.is_none() && key_mask.is_none() && !hooks.modifies_projections() && a.fusable(x, Some((cos, sin)))
            {
                // Training and scoring: the whole pre-norm attention block as one op.
                a.forward(x, Some((cos, sin)))?
            } else {
                let (b, t, _) = x.dims3()?;
                let BlockNorm::Rms { weight, .. } = &a.norm else { unreachable!("LLaMA blocks use RMSNorm") };
                let n = ops::rms_norm(x, weight, eps)?;
                let proj = |p: &Linear, which: Proj| -> Result<Tensor> {
                    add_opt(p.forward(&n)?, hooks.proj_delta(Site::Decoder, layer, which, &n)?)
                };
                let q = proj(&a.q, Proj::Q)?.reshape((b, t, a.heads, a.head_dim))?;
                let k = proj(&a.k, Proj::K)?.reshape((b, t, a.kv_heads, a.head_dim))?;
                let v = proj(&a.v, Proj::V)?.reshape((b, t, a.kv_heads, a.head_dim))?;
                let q = ops::rope(&q, cos, sin)?;
                let k = ops::rope(&k, cos, sin)?;
                let (k, v) = match cache {
                    Some(c) => c.append(&k, &v)?,
                    None => (k, v),
                };
                let o = ops::attention(
                    &q,
                    &k,
                    &v,
                    AttentionOpts { scale: a.scale, causal_offset: Some(past), bias: None, key_mask },
                )?;
                let o = o.reshape((b, t, a.heads * a.head_dim))?;
                let o = add_opt(a.o.forward(&o)?, hooks.proj_delta(Site::Decoder, layer, Proj::O, &o)?)?;
                (x + o)?
            };
        let u = ops::rms_norm(&h, &self.post_attention_layernorm, eps)?;
        let f = self.mlp.forward(&u)?;
        let f = add_opt(f, hooks.ffn_branch(Site::Decoder, layer, &u)?)?;
        Ok((h + f)?)
    }
}

impl LanguageModel for Llama {
    fn family(&self) -> &'static str {
        "llama"
    }
    fn device(&self) -> &Device {
        Llama::device(self)
    }
    fn dtype(&self) -> DType {
        Llama::dtype(self)
    }
    fn width(&self) -> usize {
        self.cfg.hidden_size
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn stacks(&self) -> Vec<(Site, usize)> {
        vec![(Site::Decoder, self.n_layers())]
    }
    fn max_positions(&self) -> Option<usize> {
        Some(self.cfg.max_position_embeddings)
    }
    fn ffn_activation(&self) -> Activation {
        self.cfg.hidden_act
    }
    fn proj_dims(&self, _site: Site, proj: Proj) -> (usize, usize) {
        let c = &self.cfg;
        match proj {
            Proj::Q => (c.hidden_size, c.num_attention_heads * c.head_dim),
            Proj::K | Proj::V => (c.hidden_size, c.num_key_value_heads * c.head_dim),
            Proj::O => (c.num_attention_heads * c.head_dim, c.hidden_size),
        }
    }
    fn decoder_start(&self) -> Option<u32> {
        None
    }
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Llama::embed(self, ids)
    }
    fn teacher_forcing(&self, tf: &TeacherForcing, hooks: &dyn LmHooks) -> Result<Hidden> {
        let (x, mask, rows, n) = self.teacher_input(tf, hooks)?;
        let h = self.forward_embeds(&x, &Positions::From(0), None, mask.as_ref(), hooks)?;
        Ok(Hidden { h, rows, offset: n })
    }
    fn teacher_forcing_checkpointed(
        &self,
        tf: &TeacherForcing,
        hooks: &dyn LmHooks,
        loss: &mut dyn FnMut(&Hidden) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Some(ts) = hooks.checkpoint_tensors() else {
            bail!("gradient checkpointing: this method's hooks cannot be recomputed block by block")
        };
        let (x0, mask, rows, n) = self.teacher_input(tf, hooks)?;
        let (cos, sin) = self.rope.range(0, rows)?;
        let eps = self.cfg.rms_norm_eps;
        // The forward on detached inputs records no graph, so the fused kernels keep nothing.
        let detached: Vec<Tensor> = ts.iter().map(Tensor::detach).collect();
        let plain = hooks.rebind(&detached)?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut h = x0.detach();
        for (l, blk) in self.layers.iter().enumerate() {
            inputs.push(h.clone());
            h = blk.forward(&h, l, &cos, &sin, 0, None, mask.as_ref(), plain.as_ref(), eps)?;
        }
        drop(plain);
        let top = candle_core::Var::from_tensor(&h)?;
        drop(h);
        let hn = ops::rms_norm(top.as_tensor(), &self.norm, eps)?;
        let l = loss(&Hidden { h: hn, rows, offset: n })?;
        let g = l.backward()?;
        let mut dh = match g.get(top.as_tensor()) {
            Some(d) => d.clone(),
            None => top.as_tensor().zeros_like()?,
        };
        drop(g);
        // Backward block by block: recompute block l from its input with fresh leaves for the
        // input and the hooks' tensors, and carry the input's gradient down.
        let mut dts: Vec<Option<Tensor>> = vec![None; ts.len()];
        for (l, blk) in self.layers.iter().enumerate().rev() {
            let xin = candle_core::Var::from_tensor(&inputs[l])?;
            let leaves = detached.iter().map(candle_core::Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
            let lt: Vec<Tensor> = leaves.iter().map(|v| v.as_tensor().clone()).collect();
            let hk = hooks.rebind(&lt)?;
            let out = blk.forward(xin.as_tensor(), l, &cos, &sin, 0, None, mask.as_ref(), hk.as_ref(), eps)?;
            let g = (out * &dh)?.sum_all()?.backward()?;
            dh = match g.get(xin.as_tensor()) {
                Some(d) => d.clone(),
                None => xin.as_tensor().zeros_like()?,
            };
            for (acc, v) in dts.iter_mut().zip(&leaves) {
                if let Some(gv) = g.get(v.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + gv)?,
                        None => gv.clone(),
                    });
                }
            }
            inputs.truncate(l);
        }
        // A tensor equal to the loss whose gradient is the true one: for every tensor t that
        // the blocks read with a graph behind it, sum(t · dt) - its detached value.
        let mut out = l.detach();
        let terms = std::iter::once((&x0, Some(dh))).chain(ts.iter().zip(dts));
        for (t, d) in terms {
            if let Some(d) = d
                && t.track_op()
            {
                let p = (t * d)?.sum_all()?;
                out = (out + (&p - p.detach())?)?;
            }
        }
        Ok(out)
    }
    fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Llama::logits(self, h)
    }
    fn prefill<'a>(
        &'a self,
        hooks: &'a dyn LmHooks,
        prompts: &[Vec<u32>],
        prefix: Option<(&Tensor, &[f32])>,
    ) -> Result<(Box<dyn BeamStepper + 'a>, Tensor)> {
        let (st, first) = LlamaStepper::prefill_with_prefix(self, hooks, prompts, prefix)?;
        Ok((Box::new(st), first))
    }
    fn start_batch(
        &self,
        hooks: &dyn LmHooks,
        prompts: &[Vec<u32>],
        prefix: Option<(&Tensor, &[f32])>,
    ) -> Result<(Box<dyn super::BatchState>, Tensor)> {
        let (st, first) = LlamaState::prefill(self, hooks, prompts, prefix)?;
        Ok((Box::new(st), first))
    }
    fn step_batch(&self, state: &mut dyn super::BatchState, tokens: &[u32], hooks: &dyn LmHooks) -> Result<Tensor> {
        let st = state.as_any_mut().downcast_mut::<LlamaState>().context("a decoding state of another model family")?;
        st.step(self, tokens, hooks)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The decoding state of a batch of rows, without the hooks: the KV cache, each row's next
/// position and, when rows are left-padded, the key mask. Rows can join ([`Self::merge`]) and
/// leave ([`Self::keep`]) between steps, which is what continuous batching needs.
pub struct LlamaState {
    cache: KvCache,
    /// Next position of each row.
    next_pos: Vec<u32>,
    /// Key mask `[rows, len]` when rows are left-padded.
    mask: Option<Vec<Vec<f32>>>,
}

impl LlamaState {
    /// Runs the prompts (left-padded when their lengths differ), with embeddings `[b, n, d]`
    /// placed before every prompt when a prefix is given (the input-space baseline's visual
    /// tokens; `prefix.1[i] = 0` masks row `i`'s prefix out). Rows are laid out
    /// `[prefix][padding][prompt]`, the padding masked and skipped by the positions, which
    /// equals running each row unpadded. Returns the state and each prompt's last logits.
    pub fn prefill(
        model: &Llama,
        hooks: &dyn LmHooks,
        prompts: &[Vec<u32>],
        prefix: Option<(&Tensor, &[f32])>,
    ) -> Result<(Self, Tensor)> {
        let dev = model.device().clone();
        let b = prompts.len();
        if b == 0 {
            bail!("no prompts to run")
        }
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let n = prefix.map(|p| p.0.dims()[1]).unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * (n + t));
        let mut mask = Vec::with_capacity(b);
        for (i, p) in prompts.iter().enumerate() {
            let pad = t - p.len();
            ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
            pos.extend((0..n as u32).chain((0..t).map(|j| (n + j.saturating_sub(pad)) as u32)));
            let pm = prefix.map(|p| p.1[i]).unwrap_or(1.0);
            mask.push(
                std::iter::repeat_n(pm, n).chain((0..t).map(|j| if j < pad { 0.0 } else { 1.0 })).collect::<Vec<f32>>(),
            );
        }
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let mut x = model.embed(&ids)?;
        if let Some((p, _)) = prefix {
            x = Tensor::cat(&[p, &x], 1)?;
        }
        let starts: Vec<usize> = prompts.iter().map(|p| n + t - p.len()).collect();
        let x = super::edit_input(hooks, x, &starts)?;
        let total = n + t;
        let plain = mask.iter().all(|r| r.iter().all(|&m| m == 1.0));
        let mut cache = model.new_cache();
        let (positions, key_mask) = if plain {
            (Positions::From(0), None)
        } else {
            (
                Positions::PerSample(Tensor::from_vec(pos, (b, total), &dev)?),
                Some(Tensor::from_vec(mask.concat(), (b, total), &dev)?),
            )
        };
        let h = model.forward_embeds(&x, &positions, Some(&mut cache), key_mask.as_ref(), hooks)?;
        let logits = model.logits(&h.narrow(1, total - 1, 1)?.squeeze(1)?)?;
        let next_pos = prompts.iter().map(|p| (n + p.len()) as u32).collect();
        Ok((Self { cache, next_pos, mask: (!plain).then_some(mask) }, logits))
    }

    pub fn rows(&self) -> usize {
        self.next_pos.len()
    }

    /// Positions cached (padding included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feeds one token per row; logits `[rows, vocab]`.
    pub fn step(&mut self, model: &Llama, tokens: &[u32], hooks: &dyn LmHooks) -> Result<Tensor> {
        let dev = model.device().clone();
        let b = tokens.len();
        if b != self.rows() {
            bail!("{b} tokens for {} rows", self.rows())
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &dev)?;
        let (positions, key_mask) = match &mut self.mask {
            None => (Positions::From(self.next_pos[0] as usize), None),
            Some(m) => {
                for r in m.iter_mut() {
                    r.push(1.0);
                }
                let len = m[0].len();
                (
                    Positions::PerSample(Tensor::from_vec(self.next_pos.clone(), (b, 1), &dev)?),
                    Some(Tensor::from_vec(m.concat(), (b, len), &dev)?),
                )
            }
        };
        let h =
            model.forward_embeds(&model.embed(&ids)?, &positions, Some(&mut self.cache), key_mask.as_ref(), hooks)?;
        for p in self.next_pos.iter_mut() {
            *p += 1;
        }
        model.logits(&h.squeeze(1)?)
    }

    /// New row `i` = old row `rows[i]` (rows may repeat or be dropped); cache columns that no
    /// row attends to any more are dropped.
    pub fn keep(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows()) {
            bail!("row {bad} of {}", self.rows())
        }
        let dev = self.cache.layers.first().and_then(|l| l.device()).unwrap_or(Device::Cpu);
        let idx = Tensor::from_vec(rows.iter().map(|&i| i as u32).collect::<Vec<_>>(), rows.len(), &dev)?;
        self.cache.reorder(&idx)?;
        self.next_pos = rows.iter().map(|&i| self.next_pos[i]).collect();
        if let Some(m) = &mut self.mask {
            *m = rows.iter().map(|&i| m[i].clone()).collect();
        }
        self.trim()
    }

    /// Drops the leading cache columns that every row masks out, and the mask once no row
    /// needs one.
    fn trim(&mut self) -> Result<()> {
        let Some(m) = &mut self.mask else { return Ok(()) };
        if m.is_empty() {
            self.mask = None;
            return Ok(());
        }
        let lead = (0..m[0].len()).take_while(|&j| m.iter().all(|r| r[j] == 0.0)).count();
        if lead > 0 {
            self.cache.drop_front(lead)?;
            for r in m.iter_mut() {
                r.drain(..lead);
            }
        }
        let len = m[0].len();
        if m.iter().all(|r| r.iter().all(|&x| x == 1.0)) && self.next_pos.iter().all(|&p| p as usize == len) {
            self.mask = None;
        }
        Ok(())
    }

    /// Appends the rows of `other` after this state's rows; the shorter state is left-padded
    /// (masked) to the longer one's cache length.
    pub fn merge(&mut self, other: LlamaState) -> Result<()> {
        let (la, lb) = (self.len(), other.len());
        let l = la.max(lb);
        let rows_mask = |s: &LlamaState, len: usize| -> Vec<Vec<f32>> {
            (0..s.rows())
                .map(|i| {
                    let own: Vec<f32> = match &s.mask {
                        Some(m) => m[i].clone(),
                        None => vec![1.0; s.len()],
                    };
                    std::iter::repeat_n(0.0, len - s.len()).chain(own).collect()
                })
                .collect()
        };
        let mut mask = rows_mask(self, l);
        mask.extend(rows_mask(&other, l));
        self.cache = KvCache::merge_left_padded(&self.cache, &other.cache)?;
        self.next_pos.extend(other.next_pos);
        self.mask = Some(mask);
        self.trim()
    }
}

impl super::BatchState for LlamaState {
    fn rows(&self) -> usize {
        LlamaState::rows(self)
    }
    fn keep(&mut self, rows: &[usize]) -> Result<()> {
        LlamaState::keep(self, rows)
    }
    fn merge(&mut self, other: Box<dyn super::BatchState>) -> Result<()> {
        let other = other
            .into_any()
            .downcast::<LlamaState>()
            .map_err(|_| anyhow::anyhow!("merging states of two model families"))?;
        LlamaState::merge(self, *other)
    }
    fn bytes(&self) -> usize {
        self.cache.bytes()
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// A decoder-only model mid-generation: a [`LlamaState`] with its model and hooks.
pub struct LlamaStepper<'a> {
    model: &'a Llama,
    hooks: &'a dyn LmHooks,
    state: LlamaState,
}

impl<'a> LlamaStepper<'a> {
    /// Runs the prompts (left-padded when their lengths differ) and returns the stepper with
    /// the logits of each prompt's last token.
    pub fn prefill(model: &'a Llama, hooks: &'a dyn LmHooks, prompts: &[Vec<u32>]) -> Result<(Self, Tensor)> {
        Self::prefill_with_prefix(model, hooks, prompts, None)
    }

    /// As [`Self::prefill`], with an embedding prefix per row (see [`LlamaState::prefill`]).
    pub fn prefill_with_prefix(
        model: &'a Llama,
        hooks: &'a dyn LmHooks,
        prompts: &[Vec<u32>],
        prefix: Option<(&Tensor, &[f32])>,
    ) -> Result<(Self, Tensor)> {
        let (state, logits) = LlamaState::prefill(model, hooks, prompts, prefix)?;
        Ok((Self { model, hooks, state }, logits))
    }
}

impl Stepper for LlamaStepper<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        self.state.step(self.model, tokens, self.hooks)
    }
}

impl BeamStepper for LlamaStepper<'_> {
    fn reorder(&mut self, bi: &[usize]) -> Result<()> {
        let idx = Tensor::from_vec(bi.iter().map(|&i| i as u32).collect::<Vec<_>>(), bi.len(), self.model.device())?;
        let st = &mut self.state;
        st.cache.reorder(&idx)?;
        st.next_pos = bi.iter().map(|&i| st.next_pos[i]).collect();
        if let Some(m) = &mut st.mask {
            *m = bi.iter().map(|&i| m[i].clone()).collect();
        }
        Ok(())
    }
}
