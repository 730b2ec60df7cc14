//! MemVP in encoder-decoder LMs: T5 v1.0 (ReLU FFN), T5 v1.1 (gated-GELU FFN, whose memory
//! branch uses the gate's activation `gelu_new` without the gate) and BART (GELU, post-LN).
//!
//! - Forward: tiny random f64 models (2 encoder + 2 decoder blocks, non-trivial norms and biases)
//!   run with `Memory` as hooks equal a hand-written evaluation of the whole model in plain
//!   candle ops (relative position bias, masks, cross-attention included; only the T5 bucket
//!   function is taken from the crate, it is checked against torch in `encdec_parity.rs`):
//!   T5 `out = h + FFN(u) + s·act(u Kᵀ)V`, `u = T5LayerNorm(h)`; BART
//!   `out = LN(h + fc2(act(fc1 h)) + s·act(h Kᵀ)V)`. For the non-gated FFNs the FFN plus the
//!   branch also equals the FFN whose first matrix has K appended to its rows and whose second
//!   has s·Vᵀ appended to its columns (METHOD.md: "exactly concatenating K to W1's keys and V to
//!   W2's values"). `memory_sites` changes exactly the stacks it names, `memory_layers` the
//!   blocks (per stack); cached decoding and batched greedy generation with the memory agree
//!   with the full pass and with each row alone.
//! - Gradients of every trained tensor (projector from features `[b, n, c]`, `E_k`, `E_v`, and,
//!   from pixels, the vision adapters) against central finite differences in f64 through
//!   encoder, decoder and cross-entropy, directly and through `Vlm::loss`.
//! - `memvp train` / `memvp eval` smoke runs on the three fixtures.

mod common;
use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use common::*;
use memvp::adapters::file::{ADAPTER_FORMAT, AdapterConfig, BaseModel, Dims};
use memvp::adapters::memvp::{Memory, MemorySites, Memvp, MemvpConfig};
use memvp::checkpoint::{Cfg, Tok, Weights};
use memvp::data::DataOptions;
use memvp::data::batch::Batch;
use memvp::data::image::Norm;
use memvp::generate::{self, Sampling};
use memvp::models::LoadedVision;
use memvp::models::bart::{Bart, BartConfig};
use memvp::models::clip::{ClipVision, ClipVisionConfig};
use memvp::models::encdec::{EncDecStepper, EncoderDecoder};
use memvp::models::t5::{T5, T5Config, relative_position_bucket};
use memvp::models::{LanguageModel, LoadedLm};
use memvp::models::{LmHooks, NoHooks, Proj, Site};
use memvp::ops::{self, Activation};
use memvp::rng::Rng;
use memvp::vlm::{Base, Vlm};
use serde_json::json;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const F64: DType = DType::F64;
type W = HashMap<String, Tensor>;

fn cpu() -> Device {
    Device::Cpu
}

// ---------------------------------------------------------------------------------------------
// Tiny random backbones.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    T5V10,
    T5V11,
    Bart,
}

const FAMILIES: [Family; 3] = [Family::T5V10, Family::T5V11, Family::Bart];
const VOCAB: usize = 40;

impl Family {
    fn config(self) -> serde_json::Value {
        let t5 = |ffp: &str, tied: bool| {
            json!({
                "model_type": "t5", "vocab_size": VOCAB, "d_model": 16, "d_kv": 4, "d_ff": 24,
                "num_layers": 2, "num_decoder_layers": 2, "num_heads": 3,
                "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
                "layer_norm_epsilon": 1e-6, "feed_forward_proj": ffp, "tie_word_embeddings": tied,
                "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1
            })
        };
        match self {
            Family::T5V10 => t5("relu", true),
            Family::T5V11 => t5("gated-gelu", false),
            Family::Bart => json!({
                "model_type": "bart", "vocab_size": VOCAB, "d_model": 16, "encoder_layers": 2,
                "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 2,
                "encoder_ffn_dim": 24, "decoder_ffn_dim": 20, "activation_function": "gelu",
                "max_position_embeddings": 32, "scale_embedding": true, "tie_word_embeddings": true,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2
            }),
        }
    }

    fn cfg(self) -> Cfg {
        Cfg::from_value(self.config(), Path::new("tiny/config.json"))
    }

    /// The memory branch's activation the method prescribes: the FFN's own, or its gate's.
    fn branch_act(self) -> Activation {
        match self {
            Family::T5V10 => Activation::Relu,
            Family::T5V11 => Activation::GeluTanh,
            Family::Bart => Activation::Gelu,
        }
    }

    fn fixture(self) -> &'static str {
        match self {
            Family::T5V10 => "t5_v1_0",
            Family::T5V11 => "t5_v1_1",
            Family::Bart => "bart",
        }
    }
}

/// Non-trivial frozen weights: the random store's tensors (norm weights 1, biases 0, the rest
/// N(0, 0.3²)) with norms and biases perturbed, plus an untied head (T5 v1.1) and a
/// `final_logits_bias` (BART). Returns the model (plain tensors, nothing trainable) and its
/// weights by checkpoint name.
fn tiny_lm(fam: Family, seed: u64) -> (LoadedLm, W) {
    let cfg = fam.cfg();
    let rw = Weights::random("tiny", seed, 0.3, F64, &cpu());
    match fam {
        Family::Bart => drop(Bart::load(&rw, BartConfig::from_hf(&cfg).unwrap()).unwrap()),
        _ => drop(T5::load(&rw, T5Config::from_hf(&cfg).unwrap()).unwrap()),
    }
    let mut rng = Rng::new(seed + 1);
    let mut w = W::new();
    for (name, var) in rw.made() {
        let t = var.as_tensor().detach();
        let v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let constant = v.iter().all(|&x| x == v[0]);
        let t = if constant { (t + randn(&mut rng, var.dims(), 0.2, F64)).unwrap() } else { t };
        w.insert(name, t.detach());
    }
    match fam {
        Family::T5V11 => drop(w.insert("lm_head.weight".into(), randn(&mut rng, &[VOCAB, 16], 0.3, F64))),
        Family::Bart => drop(w.insert("final_logits_bias".into(), randn(&mut rng, &[1, VOCAB], 0.3, F64))),
        Family::T5V10 => {}
    }
    let ws = Weights::from_tensors("tiny", w.clone(), F64, &cpu());
    let model: Box<dyn LanguageModel> = match fam {
        Family::Bart => Box::new(Bart::load(&ws, BartConfig::from_hf(&cfg).unwrap()).unwrap()),
        _ => Box::new(T5::load(&ws, T5Config::from_hf(&cfg).unwrap()).unwrap()),
    };
    let tok = Tok::from_file(&fixtures().join(fam.fixture()).join("tokenizer.json")).unwrap();
    let lm = LoadedLm {
        model,
        tok,
        eos: vec![1],
        path: PathBuf::from("tiny"),
        fingerprint: format!("tiny-{fam:?}-{seed}"),
        tokenizer_fingerprint: None,
    };
    (lm, w)
}

fn ed(lm: &LoadedLm) -> &dyn EncoderDecoder {
    lm.encdec().unwrap()
}

/// (width, blocks over both stacks, the memory branch's activation) of an LM.
fn lm_shape(lm: &LoadedLm) -> (usize, usize, Activation) {
    (lm.model.width(), lm.model.total_layers(), lm.model.ffn_activation())
}

/// A tiny f64 CLIP vision tower (4 patches of width 12) with perturbed weights.
fn tiny_clip(seed: u64) -> ClipVision {
    let c = ClipVisionConfig {
        hidden_size: 12,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 16,
        patch_size: 8,
        num_channels: 3,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    let base = c.random_weights(seed, F64, &cpu()).unwrap();
    let mut rng = Rng::new(seed + 1000);
    let mut names: Vec<&String> = base.keys().collect();
    names.sort();
    let mut w = W::new();
    for n in names {
        let t = &base[n];
        let std = if n.contains("patch_embedding") { 0.2 } else { 0.1 };
        w.insert(n.clone(), (t + randn(&mut rng, t.dims(), std, F64)).unwrap());
    }
    ClipVision::load(&Weights::from_tensors("tiny-clip", w, F64, &cpu()), c).unwrap()
}

const FEAT: usize = 12;
const SLOTS: usize = 7;

fn memvp_cfg(sites: MemorySites) -> MemvpConfig {
    MemvpConfig {
        slots: SLOTS,
        hidden_proj: 5,
        visual_scale: 0.7,
        adapter_scale: 0.3,
        memory_dropout: 0.1,
        vision_adapter_dim: 3,
        vision_adapter_scale: 0.4,
        vision_adapter_dropout: 0.1,
        vision_layer: -1,
        norm: Norm::Imagenet,
        memory_layers: None,
        memory_sites: sites,
    }
}

/// MemVP with the LM's branch activation (as `lm_shape` gives it) and random non-zero tensors.
fn tiny_memvp(lm: &LoadedLm, cfg: MemvpConfig, seed: u64) -> Memvp {
    let (d, _, act) = lm_shape(lm);
    let mv = Memvp::init(cfg, FEAT, 2, d, act, seed, F64, &cpu()).unwrap();
    let mut rng = Rng::new(seed + 7);
    for (_, v) in mv.named() {
        v.set(&randn(&mut rng, v.dims(), 0.4, F64)).unwrap();
    }
    mv
}

/// `Memory` hooks holding the given `K, V` (`memory_from_features`' output). `Memory` is only
/// made by `Memvp::memory`; without pixels it runs no vision tower, and its `k`, `v` are public.
fn memory_with<'a>(
    mv: &'a Memvp,
    clip: &ClipVision,
    kv: (Tensor, Tensor),
    train: bool,
    rng: &'a RefCell<Rng>,
) -> Memory<'a> {
    let b = kv.0.dims()[0];
    let mut mem = mv.memory(clip, None, &vec![0.0; b], train, rng).unwrap();
    (mem.k, mem.v) = kv;
    mem
}

// ---------------------------------------------------------------------------------------------
// Direct evaluations with plain candle ops.
// ---------------------------------------------------------------------------------------------

/// `x Wᵀ + b`.
fn lin(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    match b {
        Some(b) => y.broadcast_add(b).unwrap(),
        None => y,
    }
}

fn sigmoid(x: &Tensor) -> Tensor {
    (x.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap()
}

fn act(x: &Tensor, a: Activation) -> Tensor {
    match a {
        Activation::Relu => x.relu().unwrap(),
        // x Φ(x) with candle's erf.
        Activation::Gelu => x.gelu_erf().unwrap(),
        // gelu_new: 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))).
        Activation::GeluTanh => {
            let inner = ((x + (x.sqr().unwrap().mul(x).unwrap() * 0.044715).unwrap()).unwrap()
                * (2.0 / std::f64::consts::PI).sqrt())
            .unwrap();
            ((inner.tanh().unwrap() + 1.0).unwrap() * x).unwrap().affine(0.5, 0.0).unwrap()
        }
        Activation::Silu => x.mul(&sigmoid(x)).unwrap(),
        Activation::QuickGelu => x.mul(&sigmoid(&(x * 1.702).unwrap())).unwrap(),
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
}

fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let mu = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mu).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
}

fn softmax(s: &Tensor) -> Tensor {
    let m = s.max_keepdim(D::Minus1).unwrap();
    let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
}

/// Multi-head attention on `q: [b, tq, heads·hd]`, `k, v: [b, tk, heads·hd]`: scores
/// `scale · q kᵀ + bias`, keys with `key_mask = 0` and (causal) later keys excluded.
#[allow(clippy::too_many_arguments)]
fn mha(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    bias: Option<&Tensor>,
    key_mask: Option<&[Vec<f32>]>,
    causal: bool,
) -> Tensor {
    let (b, tq, e) = q.dims3().unwrap();
    let tk = k.dims()[1];
    let hd = e / heads;
    let split =
        |x: &Tensor, t: usize| x.reshape((b, t, heads, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let (q, k, v) = (split(q, tq), split(k, tk), split(v, tk));
    let mut s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
    if let Some(bias) = bias {
        s = s.broadcast_add(bias).unwrap();
    }
    let mut add = vec![0f64; b * tq * tk];
    for r in 0..b {
        for i in 0..tq {
            for j in 0..tk {
                let masked = key_mask.is_some_and(|m| m[r][j] == 0.0);
                if masked || (causal && j > i) {
                    add[(r * tq + i) * tk + j] = f64::NEG_INFINITY;
                }
            }
        }
    }
    s = s.broadcast_add(&Tensor::from_vec(add, (b, 1, tq, tk), &cpu()).unwrap()).unwrap();
    softmax(&s).matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, tq, e)).unwrap()
}

/// T5's relative position bias `[1, heads, tq, tk]` from its table `[buckets, heads]`.
fn t5_bias(table: &Tensor, tq: usize, tk: usize, bidirectional: bool, c: &T5Config) -> Tensor {
    let tab = table.to_vec2::<f64>().unwrap();
    let heads = tab[0].len();
    let mut v = vec![0f64; heads * tq * tk];
    for h in 0..heads {
        for i in 0..tq {
            for j in 0..tk {
                let bucket = relative_position_bucket(
                    j as i64 - i as i64,
                    bidirectional,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                );
                v[(h * tq + i) * tk + j] = tab[bucket][h];
            }
        }
    }
    Tensor::from_vec(v, (1, heads, tq, tk), &cpu()).unwrap()
}

fn embed(table: &Tensor, ids: &[Vec<u32>]) -> Tensor {
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat();
    let idx = Tensor::new(flat.as_slice(), &cpu()).unwrap();
    table.index_select(&idx, 0).unwrap().reshape((b, t, table.dims()[1])).unwrap()
}

/// The memory of the hand evaluation: `K, V: [b, M, d]`, scale, activation, where it acts.
struct HandMem<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    s: f64,
    act: Activation,
    sites: MemorySites,
    layers: Option<&'a [usize]>,
}

/// `s · act(u Kᵀ) V` per sample.
fn hand_branch(u: &Tensor, k: &Tensor, v: &Tensor, a: Activation, s: f64) -> Tensor {
    let kt = k.transpose(1, 2).unwrap().contiguous().unwrap();
    (act(&u.matmul(&kt).unwrap(), a).matmul(v).unwrap() * s).unwrap()
}

impl HandMem<'_> {
    fn branch(&self, site: Site, layer: usize, u: &Tensor) -> Option<Tensor> {
        let on = self.sites.includes(site) && self.layers.is_none_or(|l| l.contains(&layer));
        on.then(|| hand_branch(u, self.k, self.v, self.act, self.s))
    }
}

/// One FFN block of the hand evaluation.
struct Rec {
    site: Site,
    layer: usize,
    /// The FFN's input (T5: `T5LayerNorm(h)`; BART: `h` itself).
    u: Tensor,
    /// The FFN's output and the memory branch's.
    ffn: Tensor,
    branch: Option<Tensor>,
}

struct HandOut {
    enc: Tensor,
    /// The decoder's last hidden state as `decode` returns it.
    dec: Tensor,
    logits: Tensor,
    recs: Vec<Rec>,
}

/// `resid + FFN(u) [+ branch(u)]`, recorded.
fn ffn_sum(
    recs: &mut Vec<Rec>,
    mem: Option<&HandMem>,
    site: Site,
    layer: usize,
    resid: &Tensor,
    u: Tensor,
    ffn: Tensor,
) -> Tensor {
    let branch = mem.and_then(|m| m.branch(site, layer, &u));
    let mut out = (resid + &ffn).unwrap();
    if let Some(br) = &branch {
        out = (out + br).unwrap();
    }
    recs.push(Rec { site, layer, u, ffn, branch });
    out
}

/// T5 by hand: pre-norm blocks with RMS norms, unscaled attention with the relative bias of
/// block 0 in every self-attention, `h + FFN(u) + s·act(u Kᵀ)V` with `u = rms(h)`.
fn hand_t5(
    c: &T5Config,
    w: &W,
    src: &[Vec<u32>],
    mask: Option<&[Vec<f32>]>,
    dec: &[Vec<u32>],
    mem: Option<&HandMem>,
) -> HandOut {
    let eps = c.layer_norm_epsilon;
    let heads = c.num_heads;
    let g = |n: String| &w[&n];
    let ffn = |p: &str, u: &Tensor| -> Tensor {
        let f = |n: &str| &w[&format!("{p}.DenseReluDense.{n}.weight")];
        if c.is_gated_act {
            let gate = act(&lin(u, f("wi_0"), None), c.dense_act_fn);
            lin(&(gate * lin(u, f("wi_1"), None)).unwrap(), f("wo"), None)
        } else {
            lin(&act(&lin(u, f("wi"), None), c.dense_act_fn), f("wo"), None)
        }
    };
    let mut recs = Vec::new();
    let (ts, td) = (src[0].len(), dec[0].len());
    let ebias =
        t5_bias(g("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into()), ts, ts, true, c);
    let mut x = embed(&w["shared.weight"], src);
    for l in 0..c.num_layers {
        let p = format!("encoder.block.{l}.layer");
        let n = rms_norm(&x, g(format!("{p}.0.layer_norm.weight")), eps);
        let sa = |nm: &str| lin(&n, g(format!("{p}.0.SelfAttention.{nm}.weight")), None);
        let o = mha(&sa("q"), &sa("k"), &sa("v"), heads, 1.0, Some(&ebias), mask, false);
        let h = (&x + lin(&o, g(format!("{p}.0.SelfAttention.o.weight")), None)).unwrap();
        let u = rms_norm(&h, g(format!("{p}.1.layer_norm.weight")), eps);
        let f = ffn(&format!("{p}.1"), &u);
        x = ffn_sum(&mut recs, mem, Site::Encoder, l, &h, u, f);
    }
    let enc = rms_norm(&x, &w["encoder.final_layer_norm.weight"], eps);
    let dbias =
        t5_bias(g("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into()), td, td, false, c);
    let mut y = embed(&w["shared.weight"], dec);
    for l in 0..c.num_decoder_layers {
        let p = format!("decoder.block.{l}.layer");
        let n = rms_norm(&y, g(format!("{p}.0.layer_norm.weight")), eps);
        let sa = |nm: &str| lin(&n, g(format!("{p}.0.SelfAttention.{nm}.weight")), None);
        let o = mha(&sa("q"), &sa("k"), &sa("v"), heads, 1.0, Some(&dbias), None, true);
        let h = (&y + lin(&o, g(format!("{p}.0.SelfAttention.o.weight")), None)).unwrap();
        let n = rms_norm(&h, g(format!("{p}.1.layer_norm.weight")), eps);
        let ca = |nm: &str, x: &Tensor| lin(x, g(format!("{p}.1.EncDecAttention.{nm}.weight")), None);
        let o = mha(&ca("q", &n), &ca("k", &enc), &ca("v", &enc), heads, 1.0, None, mask, false);
        let h = (h + ca("o", &o)).unwrap();
        let u = rms_norm(&h, g(format!("{p}.2.layer_norm.weight")), eps);
        let f = ffn(&format!("{p}.2"), &u);
        y = ffn_sum(&mut recs, mem, Site::Decoder, l, &h, u, f);
    }
    let dec = rms_norm(&y, &w["decoder.final_layer_norm.weight"], eps);
    let scaled = if c.scale_decoder_outputs { (&dec * (c.d_model as f64).powf(-0.5)).unwrap() } else { dec.clone() };
    let head = w.get("lm_head.weight").unwrap_or(&w["shared.weight"]);
    HandOut { enc, logits: lin(&scaled, head, None), dec, recs }
}

/// BART by hand: scaled embeddings plus learned positions (offset 2), `layernorm_embedding`,
/// post-LN blocks with biased projections and `head_dim^-0.5` scaling,
/// `LN(h + fc2(act(fc1 h)) + s·act(h Kᵀ)V)`; logits with `final_logits_bias`.
fn hand_bart(
    c: &BartConfig,
    w: &W,
    src: &[Vec<u32>],
    mask: Option<&[Vec<f32>]>,
    dec: &[Vec<u32>],
    mem: Option<&HandMem>,
) -> HandOut {
    let eps = 1e-5;
    let d = c.d_model;
    let g = |n: String| &w[&n];
    let l_ = |x: &Tensor, n: &str| lin(x, g(format!("{n}.weight")), Some(g(format!("{n}.bias"))));
    let ln = |x: &Tensor, n: &str| layer_norm(x, g(format!("{n}.weight")), g(format!("{n}.bias")), eps);
    let emb = |ids: &[Vec<u32>], stack: &str| {
        let t = ids[0].len();
        let e = (embed(&w["model.shared.weight"], ids) * (d as f64).sqrt()).unwrap();
        let pos = g(format!("model.{stack}.embed_positions.weight")).narrow(0, 2, t).unwrap();
        ln(&e.broadcast_add(&pos).unwrap(), &format!("model.{stack}.layernorm_embedding"))
    };
    let attn = |p: &str, xq: &Tensor, xkv: &Tensor, heads: usize, m: Option<&[Vec<f32>]>, causal: bool| {
        let scale = ((d / heads) as f64).powf(-0.5);
        let o = mha(
            &l_(xq, &format!("{p}.q_proj")),
            &l_(xkv, &format!("{p}.k_proj")),
            &l_(xkv, &format!("{p}.v_proj")),
            heads,
            scale,
            None,
            m,
            causal,
        );
        l_(&o, &format!("{p}.out_proj"))
    };
    let ffn = |p: &str, u: &Tensor| l_(&act(&l_(u, &format!("{p}.fc1")), c.activation_function), &format!("{p}.fc2"));
    let mut recs = Vec::new();
    let mut x = emb(src, "encoder");
    for l in 0..c.encoder_layers {
        let p = format!("model.encoder.layers.{l}");
        let a = attn(&format!("{p}.self_attn"), &x, &x, c.encoder_attention_heads, mask, false);
        let h = ln(&(&x + a).unwrap(), &format!("{p}.self_attn_layer_norm"));
        let f = ffn(&p, &h);
        let s = ffn_sum(&mut recs, mem, Site::Encoder, l, &h, h.clone(), f);
        x = ln(&s, &format!("{p}.final_layer_norm"));
    }
    let enc = x;
    let mut y = emb(dec, "decoder");
    for l in 0..c.decoder_layers {
        let p = format!("model.decoder.layers.{l}");
        let a = attn(&format!("{p}.self_attn"), &y, &y, c.decoder_attention_heads, None, true);
        let h = ln(&(&y + a).unwrap(), &format!("{p}.self_attn_layer_norm"));
        let a = attn(&format!("{p}.encoder_attn"), &h, &enc, c.decoder_attention_heads, mask, false);
        let h = ln(&(&h + a).unwrap(), &format!("{p}.encoder_attn_layer_norm"));
        let f = ffn(&p, &h);
        let s = ffn_sum(&mut recs, mem, Site::Decoder, l, &h, h.clone(), f);
        y = ln(&s, &format!("{p}.final_layer_norm"));
    }
    let logits = lin(&y, &w["model.shared.weight"], None).broadcast_add(&w["final_logits_bias"]).unwrap();
    HandOut { enc, dec: y, logits, recs }
}

fn hand(
    fam: Family,
    w: &W,
    src: &[Vec<u32>],
    mask: Option<&[Vec<f32>]>,
    dec: &[Vec<u32>],
    mem: Option<&HandMem>,
) -> HandOut {
    match fam {
        Family::Bart => hand_bart(&BartConfig::from_hf(&fam.cfg()).unwrap(), w, src, mask, dec, mem),
        _ => hand_t5(&T5Config::from_hf(&fam.cfg()).unwrap(), w, src, mask, dec, mem),
    }
}

/// The non-gated FFN of a block as `(W1, b1, W2, b2)`.
fn ffn_weights(fam: Family, w: &W, site: Site, layer: usize) -> (Tensor, Option<Tensor>, Tensor, Option<Tensor>) {
    match fam {
        Family::T5V10 => {
            let p = match site {
                Site::Encoder => format!("encoder.block.{layer}.layer.1.DenseReluDense"),
                Site::Decoder => format!("decoder.block.{layer}.layer.2.DenseReluDense"),
            };
            (w[&format!("{p}.wi.weight")].clone(), None, w[&format!("{p}.wo.weight")].clone(), None)
        }
        Family::Bart => {
            let p = format!("model.{}.layers.{layer}", site.name());
            let t = |n: &str| Some(w[&format!("{p}.{n}")].clone());
            (t("fc1.weight").unwrap(), t("fc1.bias"), t("fc2.weight").unwrap(), t("fc2.bias"))
        }
        Family::T5V11 => unreachable!("gated FFN"),
    }
}

/// `K, V` by hand: `Z = indicator · lambda · P(f)` zero-padded to `M` rows, `K = Z + E_k`,
/// `V = Z + E_v`, `P = Linear SiLU Linear`.
fn hand_memory(m: &Memvp, f: &Tensor, indicator: &[f64]) -> (Tensor, Tensor) {
    let pj = &m.projector;
    let p = lin(
        &act(&lin(f, pj.fc1_weight.as_tensor(), Some(pj.fc1_bias.as_tensor())), Activation::Silu),
        pj.fc2_weight.as_tensor(),
        Some(pj.fc2_bias.as_tensor()),
    );
    let (ek, ev) = (m.key_embed.as_tensor(), m.value_embed.as_tensor());
    let (slots, d) = ek.dims2().unwrap();
    let n = f.dims()[1];
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for (r, &ind) in indicator.iter().enumerate() {
        let z = (p.i(r).unwrap() * (m.cfg.visual_scale * ind)).unwrap();
        let z = Tensor::cat(&[&z, &Tensor::zeros((slots - n, d), F64, &cpu()).unwrap()], 0).unwrap();
        ks.push((&z + ek).unwrap());
        vs.push((&z + ev).unwrap());
    }
    (Tensor::stack(&ks, 0).unwrap(), Tensor::stack(&vs, 0).unwrap())
}

/// Mean cross-entropy by hand: `lse(logits) - logits[target]`.
fn hand_cross_entropy(logits: &Tensor, targets: &[u32]) -> f64 {
    let l = logits.to_vec2::<f64>().unwrap();
    let mut s = 0.0;
    for (row, &t) in l.iter().zip(targets) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        s += lse - row[t as usize];
    }
    s / targets.len() as f64
}

// ---------------------------------------------------------------------------------------------
// Running the crate's model, recording what its FFN seam sees.
// ---------------------------------------------------------------------------------------------

struct Seen {
    site: Site,
    layer: usize,
    u: Tensor,
    branch: Option<Tensor>,
}

/// Delegates to `inner` and records every `ffn_branch` call: the FFN input `u` and the branch.
struct Recorder<'a> {
    inner: &'a dyn LmHooks,
    seen: RefCell<Vec<Seen>>,
}

impl<'a> Recorder<'a> {
    fn new(inner: &'a dyn LmHooks) -> Self {
        Self { inner, seen: RefCell::new(Vec::new()) }
    }
}

impl LmHooks for Recorder<'_> {
    fn ffn_branch(&self, site: Site, layer: usize, u: &Tensor) -> anyhow::Result<Option<Tensor>> {
        let branch = self.inner.ffn_branch(site, layer, u)?;
        self.seen.borrow_mut().push(Seen { site, layer, u: u.clone(), branch: branch.clone() });
        Ok(branch)
    }
    fn proj_delta(&self, site: Site, layer: usize, proj: Proj, x: &Tensor) -> anyhow::Result<Option<Tensor>> {
        self.inner.proj_delta(site, layer, proj, x)
    }
}

/// Source ids `[2, 6]` (row 1 right-padded after 4 tokens) with their mask, decoder ids `[2, 5]`.
struct Inputs {
    src: Vec<Vec<u32>>,
    mask: Vec<Vec<f32>>,
    dec: Vec<Vec<u32>>,
}

impl Inputs {
    fn new(rng: &mut Rng, pad: u32) -> Self {
        let mut id = || 3 + rng.below(VOCAB - 3) as u32;
        let mut src: Vec<Vec<u32>> = (0..2).map(|_| (0..6).map(|_| id()).collect()).collect();
        let mut mask = vec![vec![1f32; 6]; 2];
        for j in 4..6 {
            src[1][j] = pad;
            mask[1][j] = 0.0;
        }
        let dec = (0..2).map(|_| (0..5).map(|_| id()).collect()).collect();
        Self { src, mask, dec }
    }
    fn src_t(&self) -> Tensor {
        Tensor::new(self.src.clone(), &cpu()).unwrap()
    }
    fn mask_t(&self) -> Tensor {
        Tensor::new(self.mask.clone(), &cpu()).unwrap()
    }
    fn dec_t(&self) -> Tensor {
        Tensor::new(self.dec.clone(), &cpu()).unwrap()
    }
}

/// Encoder output, decoder hidden state and logits of the crate's model.
fn run(m: &dyn EncoderDecoder, x: &Inputs, hooks: &dyn LmHooks) -> (Tensor, Tensor, Tensor) {
    let mask = x.mask_t();
    let enc = m.encode(&x.src_t(), Some(&mask), hooks).unwrap();
    let h = m.decode(&x.dec_t(), &enc, Some(&mask), None, hooks).unwrap();
    let l = m.logits(&h).unwrap();
    (enc, h, l)
}

// ---------------------------------------------------------------------------------------------
// 1. Forward against the formula.
// ---------------------------------------------------------------------------------------------

fn check_forward(fam: Family) {
    let mut rng = Rng::new(100 + fam as u64);
    let (lm, w) = tiny_lm(fam, 200 + fam as u64);
    let m = ed(&lm);
    let (d, layers, branch_act) = lm_shape(&lm);
    assert_eq!((d, layers, branch_act), (16, 4, fam.branch_act()), "{fam:?}: lm_shape");
    let clip = tiny_clip(300);
    let mut mv = tiny_memvp(&lm, memvp_cfg(MemorySites::Both), 400);
    let x = Inputs::new(&mut rng, m.special_tokens().pad);

    // K, V from arbitrary features [b, n, c]; row 1 is text-only.
    let feats = randn(&mut rng, &[2, 5, FEAT], 1.0, F64);
    let ind = [1f32, 0.0];
    let (k, v) = mv.memory_from_features(Some(&feats), &ind, 2).unwrap();
    let (hk, hv) = hand_memory(&mv, &feats, &[1.0, 0.0]);
    let ekv = max_abs_err(&k, &hk).max(max_abs_err(&v, &hv));
    assert!(ekv < 1e-12, "{fam:?}: K, V differ from the formula ({ekv:e})");
    assert_eq!(max_abs_err(&k.i(1).unwrap(), mv.key_embed.as_tensor()), 0.0);
    assert_eq!(max_abs_err(&v.i(1).unwrap(), mv.value_embed.as_tensor()), 0.0);

    let cell = RefCell::new(Rng::new(0));
    let (plain_enc, plain_dec, _) = run(m, &x, &NoHooks);
    let plain_hand = hand(fam, &w, &x.src, Some(&x.mask), &x.dec, None);
    assert!(max_rel_err(&plain_enc, &plain_hand.enc) < 1e-10 && max_rel_err(&plain_dec, &plain_hand.dec) < 1e-10);
    let mut worst = [0f64; 5];
    let cases: [(MemorySites, Option<Vec<usize>>); 4] = [
        (MemorySites::Both, None),
        (MemorySites::Encoder, None),
        (MemorySites::Decoder, None),
        (MemorySites::Both, Some(vec![1])),
    ];
    for (sites, only) in cases {
        mv.cfg.memory_sites = sites;
        mv.cfg.memory_layers = only.clone();
        let mem = memory_with(&mv, &clip, (k.clone(), v.clone()), false, &cell);
        let rec = Recorder::new(&mem);
        let (enc, dec, logits) = run(m, &x, &rec);
        let hm =
            HandMem { k: &hk, v: &hv, s: mv.cfg.adapter_scale, act: fam.branch_act(), sites, layers: only.as_deref() };
        let ho = hand(fam, &w, &x.src, Some(&x.mask), &x.dec, Some(&hm));
        let what = format!("{fam:?} sites {sites:?} layers {only:?}");
        let (e1, e2, e3) = (max_rel_err(&enc, &ho.enc), max_rel_err(&dec, &ho.dec), max_rel_err(&logits, &ho.logits));
        assert!(e1 < 1e-10 && e2 < 1e-10 && e3 < 1e-10, "{what}: encoder {e1:e}, decoder {e2:e}, logits {e3:e}");
        worst[0] = worst[0].max(e1).max(e2).max(e3);
        // Every FFN was visited once, in order, on the FFN input of the formula; the branch is
        // present exactly where the settings put it and equals s·act(u Kᵀ)V on the u it got.
        let seen = rec.seen.borrow();
        let order: Vec<(Site, usize)> = seen.iter().map(|s| (s.site, s.layer)).collect();
        let want: Vec<(Site, usize)> = ho.recs.iter().map(|r| (r.site, r.layer)).collect();
        assert_eq!(order, want, "{what}: FFN order");
        assert_eq!(order.len(), 4);
        for (s, r) in seen.iter().zip(&ho.recs) {
            let eu = max_rel_err(&s.u, &r.u);
            assert!(eu < 1e-10, "{what}: u at {:?} {} differs ({eu:e})", s.site, s.layer);
            worst[1] = worst[1].max(eu);
            assert_eq!(s.branch.is_some(), r.branch.is_some(), "{what}: branch at {:?} {}", s.site, s.layer);
            let on = sites.includes(s.site) && only.as_ref().is_none_or(|l| l.contains(&s.layer));
            assert_eq!(s.branch.is_some(), on);
            if let (Some(b), Some(hb)) = (&s.branch, &r.branch) {
                let direct = hand_branch(&s.u, &hk, &hv, fam.branch_act(), mv.cfg.adapter_scale);
                let eb = max_rel_err(b, &direct);
                assert!(eb < 1e-12, "{what}: branch at {:?} {} differs from s·act(u Kᵀ)V ({eb:e})", s.site, s.layer);
                assert!(max_rel_err(b, hb) < 1e-10);
                worst[2] = worst[2].max(eb);
                assert!(b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 1e-3, "{what}: tiny branch");
                if fam == Family::T5V11 {
                    // gelu_new, not the exact GELU, and no gate: the test can tell them apart.
                    let exact = hand_branch(&s.u, &hk, &hv, Activation::Gelu, mv.cfg.adapter_scale);
                    assert!(max_abs_err(b, &exact) > 1e-7, "{what}: gelu_new vs exact GELU indistinguishable");
                }
            }
        }
        // The paper's reading: for a non-gated FFN, FFN + branch = the FFN with K appended to W1's
        // rows (no bias for them) and s·Vᵀ to W2's columns, per sample.
        if fam != Family::T5V11 {
            for r in ho.recs.iter().filter(|r| r.branch.is_some()) {
                let (w1, b1, w2, b2) = ffn_weights(fam, &w, r.site, r.layer);
                let ff = w1.dims()[0];
                for row in 0..2 {
                    let (kr, vr) = (hk.i(row).unwrap(), hv.i(row).unwrap());
                    let w1c = Tensor::cat(&[&w1, &kr], 0).unwrap();
                    let b1c =
                        b1.as_ref().map(|b| Tensor::cat(&[b, &Tensor::zeros(SLOTS, F64, &cpu()).unwrap()], 0).unwrap());
                    let w2c = Tensor::cat(&[&w2, &(vr.t().unwrap() * mv.cfg.adapter_scale).unwrap()], 1).unwrap();
                    assert_eq!(w1c.dims(), [ff + SLOTS, d]);
                    let u = r.u.i(row).unwrap();
                    let cat = lin(&act(&lin(&u, &w1c, b1c.as_ref()), fam.branch_act()), &w2c, b2.as_ref());
                    let want = (r.ffn.i(row).unwrap() + r.branch.as_ref().unwrap().i(row).unwrap()).unwrap();
                    let e = max_rel_err(&cat, &want);
                    assert!(e < 1e-12, "{what}: concatenated FFN differs at {:?} {} ({e:e})", r.site, r.layer);
                    worst[3] = worst[3].max(e);
                }
            }
        }
        // Sites: a stack without memory is exactly the plain one.
        let enc_same = max_abs_err(&enc, &plain_enc);
        match sites {
            MemorySites::Decoder => assert_eq!(enc_same, 0.0, "{what}: the encoder must be the plain one"),
            _ => assert!(enc_same > 1e-3, "{what}: the encoder's memory changes nothing ({enc_same:e})"),
        }
        let plain_dec_here = m.decode(&x.dec_t(), &enc, Some(&x.mask_t()), None, &NoHooks).unwrap();
        let dec_same = max_abs_err(&dec, &plain_dec_here);
        match sites {
            MemorySites::Encoder => assert_eq!(dec_same, 0.0, "{what}: the decoder must be the plain one"),
            _ => assert!(dec_same > 1e-3, "{what}: the decoder's memory changes nothing ({dec_same:e})"),
        }
        // The text-only row is changed too (through E_k, E_v alone).
        for row in 0..2 {
            assert!(max_abs_err(&dec.i(row).unwrap(), &plain_dec.i(row).unwrap()) > 1e-3, "{what}: row {row}");
        }
        // Training mode draws a dropout mask on the branch.
        let mem_t = memory_with(&mv, &clip, (k.clone(), v.clone()), true, &cell);
        let (_, dec_t, _) = run(m, &x, &mem_t);
        assert!(max_abs_err(&dec_t, &dec) > 1e-6, "{what}: no dropout in training mode");
    }
    // Cached decoding with the memory equals the full decoder pass, and batched greedy generation
    // gives each row what it gets alone with its own memory row (`Memory::select`).
    mv.cfg.memory_sites = MemorySites::Both;
    mv.cfg.memory_layers = None;
    let mem = memory_with(&mv, &clip, (k.clone(), v.clone()), false, &cell);
    let mask = x.mask_t();
    let enc = m.encode(&x.src_t(), Some(&mask), &mem).unwrap();
    let full = m.decode(&x.dec_t(), &enc, Some(&mask), None, &mem).unwrap();
    let mut cache = m.new_cache();
    let parts: Vec<Tensor> = (0..5)
        .map(|p| m.decode(&x.dec_t().narrow(1, p, 1).unwrap(), &enc, Some(&mask), Some(&mut cache), &mem).unwrap())
        .collect();
    let e_cache = max_rel_err(&Tensor::cat(&parts, 1).unwrap(), &full);
    assert!(e_cache < 1e-10, "{fam:?}: cached decoding with memory differs ({e_cache:e})");
    let prompts = [x.src[0].clone(), x.src[1][..4].to_vec()];
    let st = m.special_tokens();
    let s = Sampling { max_new_tokens: 6, ..Default::default() };
    let (mut stepper, first) = EncDecStepper::prefill(m, &mem, &prompts, st.decoder_start).unwrap();
    let both = generate::continue_batch(&mut stepper, &first, &s, &st.eos).unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let one = mem.select(&Tensor::new(&[r as u32], &cpu()).unwrap()).unwrap();
        let (mut st1, f1) = EncDecStepper::prefill(m, &one, std::slice::from_ref(p), st.decoder_start).unwrap();
        assert!(max_rel_err(&f1, &first.i(r..r + 1).unwrap()) < 1e-10, "{fam:?}: row {r} first logits");
        let alone = generate::continue_batch(&mut st1, &f1, &s, &st.eos).unwrap();
        assert_eq!(both[r], alone[0], "{fam:?}: batched greedy row {r} differs from the row alone");
    }
    eprintln!(
        "{fam:?}: forward rel err {:e}, u {:e}, branch {:e}, concatenated FFN {:e}, K/V abs {ekv:e}",
        worst[0], worst[1], worst[2], worst[3]
    );
    eprintln!("{fam:?}: cached decoding with memory rel err {e_cache:e}; greedy {both:?}");
}

#[test]
fn memvp_t5_v1_0_forward_matches_formula() {
    check_forward(Family::T5V10);
}

#[test]
fn memvp_t5_v1_1_forward_matches_formula() {
    check_forward(Family::T5V11);
}

#[test]
fn memvp_bart_forward_matches_formula() {
    check_forward(Family::Bart);
}

/// The fixtures' configs give the branch activations the method prescribes.
#[test]
fn fixture_branch_activations() {
    for fam in FAMILIES {
        let lm = memvp::models::load_lm(&fixtures().join(fam.fixture()), F64, Default::default(), &cpu()).unwrap();
        let (_, _, a) = lm_shape(&lm);
        assert_eq!(a, fam.branch_act(), "{}", fam.fixture());
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Gradients against central finite differences.
// ---------------------------------------------------------------------------------------------

/// Central finite differences on `n_el` random elements of each var; returns the worst relative
/// error per var name.
fn fd_check(
    named: &[(String, Var)],
    loss: &dyn Fn() -> Tensor,
    n_el: usize,
    rng: &mut Rng,
    tol: f64,
) -> Vec<(String, f64)> {
    let l = loss();
    let grads = l.backward().unwrap();
    let eps = 1e-5;
    let mut report = Vec::new();
    for (name, v) in named {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = v.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let gmax = g.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(gmax > 1e-8, "{name}: gradient is zero everywhere");
        let mut worst = 0f64;
        for _ in 0..n_el {
            let j = rng.below(base.len());
            let at = |delta: f64| -> f64 {
                let mut b = base.clone();
                b[j] += delta;
                v.set(&Tensor::from_vec(b, v.dims(), &cpu()).unwrap()).unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let num = (at(eps) - at(-eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(base.clone(), v.dims(), &cpu()).unwrap()).unwrap();
            // Relative to the element's own size, floored at a small fraction of the tensor's
            // largest gradient (an element whose gradient is ~0 has no meaningful ratio).
            let den = num.abs().max(g[j].abs()).max(1e-3 * gmax);
            let err = (num - g[j]).abs() / den;
            worst = worst.max(err);
            assert!(err < tol, "{name}[{j}]: analytic {} vs numeric {num} (rel err {err:e})", g[j]);
        }
        report.push((name.clone(), worst));
    }
    report
}

/// Answer positions in the flat `[2, 5]` decoder grid.
const POS: [u32; 6] = [0, 2, 4, 5, 7, 9];

fn ce_at(m: &dyn EncoderDecoder, h: &Tensor, targets: &[u32]) -> Tensor {
    let (b, t, d) = h.dims3().unwrap();
    let idx = Tensor::new(POS.as_slice(), &cpu()).unwrap();
    let hs = h.reshape((b * t, d)).unwrap().index_select(&idx, 0).unwrap();
    ops::cross_entropy(&m.logits(&hs).unwrap(), targets).unwrap()
}

fn check_grads(fam: Family) {
    let mut rng = Rng::new(500 + fam as u64);
    let (lm, _) = tiny_lm(fam, 600 + fam as u64);
    let m = ed(&lm);
    let clip = tiny_clip(700);
    let mv = tiny_memvp(&lm, memvp_cfg(MemorySites::Both), 800);
    let x = Inputs::new(&mut rng, m.special_tokens().pad);
    let targets: Vec<u32> = POS.iter().map(|_| rng.below(VOCAB) as u32).collect();
    let ind = [1f32, 0.0];
    let mask = x.mask_t();
    let loss_of = |hooks: &dyn LmHooks| -> Tensor {
        let enc = m.encode(&x.src_t(), Some(&mask), hooks).unwrap();
        ce_at(m, &m.decode(&x.dec_t(), &enc, Some(&mask), None, hooks).unwrap(), &targets)
    };
    // (a) From features [b, n, c]: projector, E_k, E_v (the vision adapters get nothing here).
    let feats = randn(&mut rng, &[2, 5, FEAT], 1.0, F64);
    let from_features = || -> Tensor {
        let cell = RefCell::new(Rng::new(0));
        let kv = mv.memory_from_features(Some(&feats), &ind, 2).unwrap();
        loss_of(&memory_with(&mv, &clip, kv, false, &cell))
    };
    let named: Vec<(String, Var)> = mv.named().into_iter().filter(|(n, _)| !n.starts_with("vision.")).collect();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "projector.fc1.weight",
            "projector.fc1.bias",
            "projector.fc2.weight",
            "projector.fc2.bias",
            "memory.key_embed",
            "memory.value_embed"
        ]
    );
    let rep = fd_check(&named, &from_features, 5, &mut rng, 1e-5);
    for (n, e) in &rep {
        eprintln!("{fam:?} features: grad {n}: worst rel err {e:e}");
    }
    // (b) From pixels through the f64 CLIP: every trained tensor, vision adapters included.
    let px = randn(&mut rng, &[2, 3, 16, 16], 1.0, F64);
    let from_pixels = || -> Tensor {
        let cell = RefCell::new(Rng::new(0));
        loss_of(&mv.memory(&clip, Some(&px), &ind, false, &cell).unwrap())
    };
    let all = mv.named();
    assert_eq!(all.len(), 10);
    let rep = fd_check(&all, &from_pixels, 3, &mut rng, 1e-5);
    for (n, e) in &rep {
        eprintln!("{fam:?} pixels: grad {n}: worst rel err {e:e}");
    }
}

#[test]
fn memvp_t5_v1_0_gradients_match_finite_differences() {
    check_grads(Family::T5V10);
}

#[test]
fn memvp_t5_v1_1_gradients_match_finite_differences() {
    check_grads(Family::T5V11);
}

#[test]
fn memvp_bart_gradients_match_finite_differences() {
    check_grads(Family::Bart);
}

/// `Vlm::loss` on an encoder-decoder batch (padded source, text-only row): equals the hand
/// evaluation's cross-entropy, and its gradients match finite differences (an f64 `Vlm`
/// assembled from its public parts; `Vlm::new` makes f32 parameters).
#[test]
fn vlm_loss_encdec_matches_hand_and_finite_differences() {
    for fam in FAMILIES {
        let mut rng = Rng::new(900 + fam as u64);
        let (lm, w) = tiny_lm(fam, 1000 + fam as u64);
        let mut cfg = memvp_cfg(MemorySites::Both);
        cfg.vision_layer = -2;
        let mv = tiny_memvp(&lm, cfg, 1100);
        let clip = tiny_clip(1200);
        let x = Inputs::new(&mut rng, ed(&lm).special_tokens().pad);
        let targets: Vec<u32> = POS.iter().map(|_| rng.below(VOCAB) as u32).collect();
        let px = randn(&mut rng, &[2, 3, 16, 16], 1.0, F64);
        let ind = [0f32, 1.0];
        // K, V as the crate makes them from pixels (checked against the formula for CLIP in
        // memvp_method.rs), the rest by hand.
        let cell = RefCell::new(Rng::new(0));
        let mem = mv.memory(&clip, Some(&px), &ind, false, &cell).unwrap();
        let (k, v) = (mem.k.clone(), mem.v.clone());
        drop(mem);
        let hm = HandMem {
            k: &k,
            v: &v,
            s: mv.cfg.adapter_scale,
            act: fam.branch_act(),
            sites: MemorySites::Both,
            layers: None,
        };
        let ho = hand(fam, &w, &x.src, Some(&x.mask), &x.dec, Some(&hm));
        let (b, td, vocab) = ho.logits.dims3().unwrap();
        let rows: Vec<Tensor> =
            POS.iter().map(|&p| ho.logits.reshape((b * td, vocab)).unwrap().i(p as usize).unwrap()).collect();
        let want = hand_cross_entropy(&Tensor::stack(&rows, 0).unwrap(), &targets);

        let d = lm_shape(&lm).0;
        let family = lm.family();
        let sections = [("memvp".to_string(), serde_json::to_value(&mv.cfg).unwrap())].into();
        let vlm = Vlm {
            grad_checkpoint: false,
            cfg: AdapterConfig {
                format: ADAPTER_FORMAT.into(),
                method: "memvp".into(),
                image_blind: false,
                sections,
                prompt: DataOptions::default(),
                max_len: 64,
                vision: BaseModel {
                    source: "tiny-clip".into(),
                    sha256: String::new(),
                    tokenizer_sha256: None,
                    family: "clip".into(),
                },
                lm: BaseModel {
                    source: "tiny".into(),
                    sha256: String::new(),
                    tokenizer_sha256: None,
                    family: family.into(),
                },
                dims: Dims {
                    vision_width: FEAT,
                    vision_blocks: 2,
                    image_size: 16,
                    visual_tokens: 4,
                    lm_width: d,
                    lm_layers: 4,
                },
                trainable_parameters: 0,
            },
            base: Arc::new(Base {
                vision: LoadedVision { model: clip, source: "tiny-clip".into(), fingerprint: String::new() },
                lm,
            }),
            adapter: Box::new(mv),
        };
        let batch = Batch {
            input_ids: x.src_t(),
            input_lens: vec![6, 4],
            decoder_ids: Some(x.dec_t()),
            loss_positions: POS.to_vec(),
            loss_targets: targets.clone(),
            pixels: Some(px.clone()),
            indicator: ind.to_vec(),
            skipped: 0,
            n: 2,
        };
        let got = vlm.loss(&batch, &mut Rng::new(0), false).unwrap().to_scalar::<f64>().unwrap();
        let e = (got - want).abs() / want.abs();
        eprintln!("{fam:?}: Vlm::loss {got} vs hand {want} (rel err {e:e})");
        assert!(e < 1e-12, "{fam:?}: Vlm::loss differs from the hand evaluation ({got} vs {want})");
        // Padding matters: the hand loss without the source mask differs.
        let unmasked = hand(fam, &w, &x.src, None, &x.dec, Some(&hm));
        let rows: Vec<Tensor> =
            POS.iter().map(|&p| unmasked.logits.reshape((b * td, vocab)).unwrap().i(p as usize).unwrap()).collect();
        assert!((hand_cross_entropy(&Tensor::stack(&rows, 0).unwrap(), &targets) - want).abs() > 1e-6);
        // Training mode applies dropout (memory branch and vision adapters).
        let tr = vlm.loss(&batch, &mut Rng::new(1), true).unwrap().to_scalar::<f64>().unwrap();
        assert!((tr - got).abs() > 1e-9, "{fam:?}: training mode equals eval mode");

        let loss = || vlm.loss(&batch, &mut Rng::new(0), false).unwrap();
        let named = vlm.named();
        // vision_layer -2 of a 2-block tower: only block 0's adapter is used.
        let used: Vec<(String, Var)> = named.into_iter().filter(|(n, _)| !n.starts_with("vision.layers.1.")).collect();
        assert_eq!(used.len(), 8);
        let rep = fd_check(&used, &loss, 3, &mut rng, 1e-5);
        for (n, e) in &rep {
            eprintln!("{fam:?} Vlm::loss: grad {n}: worst rel err {e:e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Training and evaluation from the command line.
// ---------------------------------------------------------------------------------------------

fn run_ok(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "memvp failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn smoke(fixture: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = memvp::data::synthetic::write_shapes(&tmp.path().join("data"), 8, 4, 32, 0).unwrap();
    let spec = format!("jsonl:{}", data.display());
    let lm = fixtures().join(fixture);
    let variants: [(&str, &[&str]); 3] =
        [("memvp", &[]), ("input-space", &["--method", "input-space"]), ("encoder", &["--memory-sites", "encoder"])];
    for (tag, extra) in variants {
        let out = tmp.path().join(tag);
        let mut c = Command::new(env!("CARGO_BIN_EXE_memvp"));
        c.args(["train", "--vision", "random:tiny", "--lm"]).arg(&lm);
        c.args(["--data", &spec, "--out"]).arg(&out).args(["--max-steps", "3", "--batch-size", "4"]).args(extra);
        let o = run_ok(&mut c);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("trained 3 steps"), "{fixture} {tag}: {stdout}");
        let final_loss: f64 =
            stdout.split("final loss ").nth(1).and_then(|r| r.split(',').next()).unwrap().trim().parse().unwrap();
        assert!(final_loss.is_finite() && final_loss > 0.0, "{fixture} {tag}: {stdout}");
        let ac: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
        match tag {
            "input-space" => assert_eq!(ac["method"], "input-space", "{fixture}: {ac}"),
            _ => {
                assert_eq!(ac["method"], "memvp", "{fixture}: {ac}");
                let sites = if tag == "encoder" { "encoder" } else { "both" };
                assert_eq!(ac["memvp"]["memory_sites"], sites, "{fixture}: {ac}");
            }
        }
        assert!(out.join("adapter_model.safetensors").is_file());
        let mut e = Command::new(env!("CARGO_BIN_EXE_memvp"));
        e.args(["eval", "--run"]).arg(&out).args(["--data", &spec, "--split", "test"]);
        run_ok(&mut e);
        let ev: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
        assert_eq!(ev["n"], 8, "{fixture} {tag}: {ev}");
        assert!(ev["accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{fixture} {tag}: {ev}");
        assert!(out.join("preds.json").is_file());
        eprintln!("{fixture} {tag}: final loss {final_loss}, eval {ev}");
    }
    // Memory in the encoder only trains differently from memory in both stacks.
    let adapter = |tag: &str| std::fs::read(tmp.path().join(tag).join("adapter_model.safetensors")).unwrap();
    assert_ne!(adapter("memvp"), adapter("encoder"), "{fixture}: --memory-sites encoder trained the same tensors");
}

#[test]
fn train_and_eval_t5_v1_0() {
    smoke("t5_v1_0");
}

#[test]
fn train_and_eval_t5_v1_1() {
    smoke("t5_v1_1");
}

#[test]
fn train_and_eval_bart() {
    smoke("bart");
}
