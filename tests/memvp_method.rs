//! MemVP, LoRA and the input-space baseline against direct evaluations of the formulas of
//! METHOD.md written here with plain candle ops (no `memvp::ops`), gradients of every trained
//! tensor against central finite differences in f64, and the stored PyTorch reference
//! (`tests/fixtures/memvp_llama_clip`).

mod common;
use anyhow::anyhow;
use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use common::*;
use memvp::adapters::input_space::{InputSpace, InputSpaceConfig};
use memvp::adapters::lora::{Lora, LoraConfig, LoraHooks};
use memvp::adapters::memvp::{Memvp, MemvpConfig};
use memvp::checkpoint::{Cfg, Weights};
use memvp::data::DataOptions;
use memvp::data::batch::Batch;
use memvp::data::image::Norm;
use memvp::models::clip::{ClipVision, ClipVisionConfig};
use memvp::models::llama::{Llama, LlamaConfig, Positions};
use memvp::models::load_lm;
use memvp::models::load_vision;
use memvp::models::{NoHooks, Proj, Site};
use memvp::ops::{self, Activation};
use memvp::rng::Rng;
use memvp::vlm::{AdapterSettings, Base, Vlm};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

const F64: DType = DType::F64;

fn cpu() -> Device {
    Device::Cpu
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

fn silu(x: &Tensor) -> Tensor {
    x.mul(&sigmoid(x)).unwrap()
}

fn quick_gelu(x: &Tensor) -> Tensor {
    x.mul(&sigmoid(&(x * 1.702).unwrap())).unwrap()
}

/// Exact GELU, `x Φ(x)` (candle's own erf op).
fn gelu_erf(x: &Tensor) -> Tensor {
    x.gelu_erf().unwrap()
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

/// Multi-head attention, `q: [b, t, h, hd]`, `k, v: [b, t, kv, hd]` (grouped: head `i` uses
/// kv head `i / (h / kv)`), optional causal mask; returns `[b, t, h * hd]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
    let (b, t, h, hd) = q.dims4().unwrap();
    let kv = k.dims()[2];
    let idx: Vec<u32> = (0..h).map(|i| (i / (h / kv)) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &cpu()).unwrap();
    let k = k.index_select(&idx, 2).unwrap();
    let v = v.index_select(&idx, 2).unwrap();
    let tr = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    let (q, k, v) = (tr(q), tr(&k), tr(&v));
    let mut s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
    if causal {
        let mut m = vec![0f64; t * t];
        for i in 0..t {
            for j in i + 1..t {
                m[i * t + j] = f64::NEG_INFINITY;
            }
        }
        let m = Tensor::from_vec(m, (t, t), &cpu()).unwrap().to_dtype(s.dtype()).unwrap();
        s = s.broadcast_add(&m).unwrap();
    }
    softmax(&s).matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, h * hd)).unwrap()
}

/// cos/sin `[t, hd]` for positions `start..start+t`, rotate-half layout. The inverse frequencies
/// and angles are formed in f32, as transformers does (and as the crate documents).
fn rope_tables(theta: f64, hd: usize, start: usize, t: usize, dtype: DType) -> (Tensor, Tensor) {
    let half = hd / 2;
    let inv: Vec<f32> = (0..half).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / hd as f32)).collect();
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for p in start..start + t {
        for _ in 0..2 {
            for &f in &inv {
                let a = (p as f32) * f;
                c.push(a.cos() as f64);
                s.push(a.sin() as f64);
            }
        }
    }
    let mk = |v: Vec<f64>| Tensor::from_vec(v, (t, hd), &cpu()).unwrap().to_dtype(dtype).unwrap();
    (mk(c), mk(s))
}

/// `x cos + rotate_half(x) sin` on `[b, t, h, hd]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (_, t, _, hd) = x.dims4().unwrap();
    let half = hd / 2;
    let x1 = x.narrow(3, 0, half).unwrap();
    let x2 = x.narrow(3, half, half).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
    let c = cos.reshape((1, t, 1, hd)).unwrap();
    let s = sin.reshape((1, t, 1, hd)).unwrap();
    (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
}

/// The memory branch of the hand evaluation: per-sample `K, V: [b, M, d]`, scale `s`, layers.
struct HandMemory<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    s: f64,
    layers: Option<&'a [usize]>,
}

/// A LLaMA decoder by hand, on embeddings `x: [b, t, d]` at positions `0..t`: every block
/// `h = x + o(Attn(RoPE q, RoPE k, v)(RMSNorm x)); u = RMSNorm h;
///  out = h + down(silu(gate u) * up u) [+ s silu(u Kᵀ) V]`, then the final RMSNorm.
fn hand_llama(c: &LlamaConfig, w: &HashMap<String, Tensor>, x: &Tensor, mem: Option<&HandMemory>) -> Tensor {
    let (b, t, _) = x.dims3().unwrap();
    let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let eps = c.rms_norm_eps;
    let (cos, sin) = rope_tables(c.rope_theta, hd, 0, t, x.dtype());
    let mut hs = x.clone();
    for l in 0..c.num_hidden_layers {
        let p = |n: &str| &w[&format!("model.layers.{l}.{n}")];
        let n = rms_norm(&hs, p("input_layernorm.weight"), eps);
        let q = lin(&n, p("self_attn.q_proj.weight"), None).reshape((b, t, h, hd)).unwrap();
        let k = lin(&n, p("self_attn.k_proj.weight"), None).reshape((b, t, kv, hd)).unwrap();
        let v = lin(&n, p("self_attn.v_proj.weight"), None).reshape((b, t, kv, hd)).unwrap();
        let o = attention(&rope(&q, &cos, &sin), &rope(&k, &cos, &sin), &v, true);
        let h1 = (&hs + lin(&o, p("self_attn.o_proj.weight"), None)).unwrap();
        let u = rms_norm(&h1, p("post_attention_layernorm.weight"), eps);
        let g = silu(&lin(&u, p("mlp.gate_proj.weight"), None));
        let up = lin(&u, p("mlp.up_proj.weight"), None);
        let f = lin(&(g * up).unwrap(), p("mlp.down_proj.weight"), None);
        let mut out = (h1 + f).unwrap();
        if let Some(m) = mem
            && m.layers.is_none_or(|ls| ls.contains(&l))
        {
            let kt = m.k.transpose(1, 2).unwrap().contiguous().unwrap();
            let a = silu(&u.matmul(&kt).unwrap());
            out = (out + (a.matmul(m.v).unwrap() * m.s).unwrap()).unwrap();
        }
        hs = out;
    }
    rms_norm(&hs, &w["model.norm.weight"], eps)
}

fn hand_embed(w: &HashMap<String, Tensor>, ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let e = &w["model.embed_tokens.weight"];
    e.index_select(&ids.flatten_all().unwrap(), 0).unwrap().reshape((b, t, e.dims()[1])).unwrap()
}

fn hand_logits(w: &HashMap<String, Tensor>, h: &Tensor) -> Tensor {
    let head = w.get("lm_head.weight").unwrap_or(&w["model.embed_tokens.weight"]);
    lin(h, head, None)
}

/// The vision adapters of the hand evaluation: `(down [r, c], up [c, r])` per block, scale.
struct HandAdapters<'a> {
    pairs: &'a [(Tensor, Tensor)],
    scale: f64,
}

/// CLIP vision by hand: patch convolution, `[cls; patches] + pos`, pre-LN, `blocks` blocks of
/// `x + out(Attn(ln1 x)); x + fc2(quick_gelu(fc1(ln2 x))) + s_v Up(GELU(Down(ln2 x)))`, then
/// `post_layernorm` of the patch tokens (CLS dropped).
fn hand_clip_features(
    c: &ClipVisionConfig,
    w: &HashMap<String, Tensor>,
    pixels: &Tensor,
    blocks: usize,
    ad: Option<&HandAdapters>,
) -> Tensor {
    let b = pixels.dims()[0];
    let (d, p, heads) = (c.hidden_size, c.patch_size, c.num_attention_heads);
    let eps = c.layer_norm_eps;
    let pe = pixels.conv2d(&w["embeddings.patch_embedding.weight"], 0, p, 1, 1).unwrap(); // [b, d, g, g]
    let pe = pe.flatten_from(2).unwrap().transpose(1, 2).unwrap(); // [b, g*g, d]
    let cls = w["embeddings.class_embedding"].reshape((1, 1, d)).unwrap().broadcast_as((b, 1, d)).unwrap();
    let mut x =
        Tensor::cat(&[&cls, &pe], 1).unwrap().broadcast_add(&w["embeddings.position_embedding.weight"]).unwrap();
    let ln = |x: &Tensor, n: &str| layer_norm(x, &w[&format!("{n}.weight")], &w[&format!("{n}.bias")], eps);
    x = ln(&x, "pre_layrnorm");
    let t = x.dims()[1];
    for l in 0..blocks {
        let pr = format!("encoder.layers.{l}");
        let lw = |n: &str| &w[&format!("{pr}.{n}.weight")];
        let lb = |n: &str| &w[&format!("{pr}.{n}.bias")];
        let n = ln(&x, &format!("{pr}.layer_norm1"));
        let proj = |name: &str| {
            let nm = format!("self_attn.{name}");
            lin(&n, lw(&nm), Some(lb(&nm))).reshape((b, t, heads, d / heads)).unwrap()
        };
        let o = attention(&proj("q_proj"), &proj("k_proj"), &proj("v_proj"), false);
        x = (&x + lin(&o, lw("self_attn.out_proj"), Some(lb("self_attn.out_proj")))).unwrap();
        let u = ln(&x, &format!("{pr}.layer_norm2"));
        let m = lin(&quick_gelu(&lin(&u, lw("mlp.fc1"), Some(lb("mlp.fc1")))), lw("mlp.fc2"), Some(lb("mlp.fc2")));
        x = (x + m).unwrap();
        if let Some(a) = ad {
            let (down, up) = &a.pairs[l];
            let br = lin(&gelu_erf(&lin(&u, down, None)), up, None);
            x = (x + (br * a.scale).unwrap()).unwrap();
        }
    }
    ln(&x.narrow(1, 1, t - 1).unwrap(), "post_layernorm")
}

/// `K = Z + E_k, V = Z + E_v` with `Z = indicator * lambda * P(f)` zero-padded to `M` rows.
fn hand_memory(m: &Memvp, f: &Tensor, indicator: &[f64]) -> (Tensor, Tensor) {
    let pj = &m.projector;
    let p = lin(
        &silu(&lin(f, pj.fc1_weight.as_tensor(), Some(pj.fc1_bias.as_tensor()))),
        pj.fc2_weight.as_tensor(),
        Some(pj.fc2_bias.as_tensor()),
    );
    let ek = m.key_embed.as_tensor();
    let ev = m.value_embed.as_tensor();
    let (slots, d) = ek.dims2().unwrap();
    let n = f.dims()[1];
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for (r, &ind) in indicator.iter().enumerate() {
        let z = (p.i(r).unwrap() * (m.cfg.visual_scale * ind)).unwrap();
        let pad = Tensor::zeros((slots - n, d), z.dtype(), &cpu()).unwrap();
        let z = Tensor::cat(&[&z, &pad], 0).unwrap();
        ks.push((&z + ek).unwrap());
        vs.push((&z + ev).unwrap());
    }
    (Tensor::stack(&ks, 0).unwrap(), Tensor::stack(&vs, 0).unwrap())
}

/// Mean cross-entropy by hand: `lse(logits) - logits[target]`.
fn hand_cross_entropy(logits: &Tensor, targets: &[u32]) -> f64 {
    let l = logits.to_dtype(F64).unwrap().to_vec2::<f64>().unwrap();
    let mut s = 0.0;
    for (row, &t) in l.iter().zip(targets) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        s += lse - row[t as usize];
    }
    s / targets.len() as f64
}

// ---------------------------------------------------------------------------------------------
// Tiny random f64 backbones.
// ---------------------------------------------------------------------------------------------

fn tiny_llama_cfg(layers: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 1000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        hidden_act: Activation::Silu,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
    }
}

fn tiny_llama_weights(c: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let (d, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let mut w = HashMap::new();
    let mut put = |n: String, shape: &[usize], std: f64, add: f64, rng: &mut Rng| {
        let t = (randn(rng, shape, std, F64) + add).unwrap();
        w.insert(n, t);
    };
    put("model.embed_tokens.weight".into(), &[v, d], 1.0, 0.0, &mut rng);
    put("lm_head.weight".into(), &[v, d], 0.3, 0.0, &mut rng);
    put("model.norm.weight".into(), &[d], 0.2, 1.0, &mut rng);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[d], 0.2, 1.0, &mut rng);
        put(format!("{p}.post_attention_layernorm.weight"), &[d], 0.2, 1.0, &mut rng);
        for (n, o, inp) in [
            ("self_attn.q_proj", h * hd, d),
            ("self_attn.k_proj", kv * hd, d),
            ("self_attn.v_proj", kv * hd, d),
            ("self_attn.o_proj", d, h * hd),
            ("mlp.gate_proj", i, d),
            ("mlp.up_proj", i, d),
            ("mlp.down_proj", d, i),
        ] {
            put(format!("{p}.{n}.weight"), &[o, inp], 1.0 / (inp as f64).sqrt(), 0.0, &mut rng);
        }
    }
    w
}

fn build_llama(c: &LlamaConfig, w: &HashMap<String, Tensor>, dtype: DType) -> Llama {
    Llama::load(&Weights::from_tensors("tiny-llama", w.clone(), dtype, &cpu()), c.clone()).unwrap()
}

fn tiny_clip(blocks: usize, seed: u64) -> (ClipVisionConfig, HashMap<String, Tensor>, ClipVision) {
    let c = ClipVisionConfig {
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: blocks,
        num_attention_heads: 2,
        image_size: 16,
        patch_size: 8,
        num_channels: 3,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    };
    let base = c.random_weights(seed, F64, &cpu()).unwrap();
    // Non-trivial norms and biases: perturb every tensor.
    let mut rng = Rng::new(seed + 1000);
    let mut names: Vec<&String> = base.keys().collect();
    names.sort();
    let mut w = HashMap::new();
    for n in names {
        let t = &base[n];
        let std = if n.contains("patch_embedding") { 0.2 } else { 0.1 };
        w.insert(n.clone(), (t + randn(&mut rng, t.dims(), std, F64)).unwrap());
    }
    let v = ClipVision::load(&Weights::from_tensors("tiny-clip", w.clone(), F64, &cpu()), c.clone()).unwrap();
    (c, w, v)
}

fn randomize(named: &[(String, Var)], rng: &mut Rng, std: f64) {
    for (_, v) in named {
        v.set(&randn(rng, v.dims(), std, v.dtype())).unwrap();
    }
}

fn memvp_cfg(slots: usize, vision_layer: isize) -> MemvpConfig {
    MemvpConfig {
        slots,
        hidden_proj: 6,
        visual_scale: 0.7,
        adapter_scale: 0.3,
        memory_dropout: 0.1,
        vision_adapter_dim: 3,
        vision_adapter_scale: 0.4,
        vision_adapter_dropout: 0.1,
        vision_layer,
        norm: Norm::Imagenet,
        memory_layers: None,
        memory_sites: memvp::adapters::memvp::MemorySites::Both,
    }
}

fn adapter_pairs(m: &Memvp) -> Vec<(Tensor, Tensor)> {
    m.vision_adapters.iter().map(|(d, u)| (d.as_tensor().clone(), u.as_tensor().clone())).collect()
}

fn pixels(rng: &mut Rng, b: usize, size: usize, dtype: DType) -> Tensor {
    randn(rng, &[b, 3, size, size], 1.0, dtype)
}

fn ids_tensor(v: &[Vec<u32>]) -> Tensor {
    Tensor::new(v.to_vec(), &cpu()).unwrap()
}

fn random_ids(rng: &mut Rng, b: usize, t: usize, vocab: usize) -> Tensor {
    let v: Vec<Vec<u32>> = (0..b).map(|_| (0..t).map(|_| rng.below(vocab) as u32).collect()).collect();
    ids_tensor(&v)
}

// ---------------------------------------------------------------------------------------------
// 1a. Forward against the formula.
// ---------------------------------------------------------------------------------------------

#[test]
fn memvp_forward_matches_formula_with_text_only_row() {
    let mut rng = Rng::new(11);
    let lc = tiny_llama_cfg(1);
    let lw = tiny_llama_weights(&lc, 12);
    let llama = build_llama(&lc, &lw, F64);
    let (vc, vw, vision) = tiny_clip(2, 13);
    let mv = Memvp::init(
        memvp_cfg(7, -1),
        vc.hidden_size,
        vc.num_hidden_layers,
        lc.hidden_size,
        Activation::Silu,
        14,
        F64,
        &cpu(),
    )
    .unwrap();
    randomize(&mv.named(), &mut rng, 0.4);
    let px = pixels(&mut rng, 2, 16, F64);
    let ids = random_ids(&mut rng, 2, 6, lc.vocab_size);
    let ind = [1f32, 0.0];
    let cell = RefCell::new(Rng::new(0));

    // The project's path.
    let mem = mv.memory(&vision, Some(&px), &ind, false, &cell).unwrap();
    let h = llama.forward_embeds(&llama.embed(&ids).unwrap(), &Positions::From(0), None, None, &mem).unwrap();
    let logits = llama.logits(&h).unwrap();

    // By hand.
    let pairs = adapter_pairs(&mv);
    let ad = HandAdapters { pairs: &pairs, scale: mv.cfg.vision_adapter_scale };
    let f = hand_clip_features(&vc, &vw, &px, 2, Some(&ad));
    let (k, v) = hand_memory(&mv, &f, &[1.0, 0.0]);
    let ek_err = max_abs_err(&mem.k, &k);
    let ev_err = max_abs_err(&mem.v, &v);
    eprintln!("K abs err {ek_err:e}, V abs err {ev_err:e}");
    assert!(ek_err < 1e-12 && ev_err < 1e-12);
    // Text-only row: K = E_k, V = E_v exactly; padded rows of the image row too.
    assert_eq!(max_abs_err(&mem.k.i(1).unwrap(), mv.key_embed.as_tensor()), 0.0);
    assert_eq!(max_abs_err(&mem.v.i(1).unwrap(), mv.value_embed.as_tensor()), 0.0);
    let n = vc.num_patches();
    assert_eq!(
        max_abs_err(
            &mem.k.i(0).unwrap().narrow(0, n, 7 - n).unwrap(),
            &mv.key_embed.as_tensor().narrow(0, n, 7 - n).unwrap()
        ),
        0.0
    );
    let hm = HandMemory { k: &k, v: &v, s: mv.cfg.adapter_scale, layers: None };
    let hh = hand_llama(&lc, &lw, &hand_embed(&lw, &ids), Some(&hm));
    let hl = hand_logits(&lw, &hh);
    let eh = max_rel_err(&h, &hh);
    let el = max_rel_err(&logits, &hl);
    eprintln!("MemVP block: hidden rel err {eh:e}, logits rel err {el:e}");
    assert!(eh < 1e-10, "hidden states differ from the formula ({eh:e})");
    assert!(el < 1e-10, "logits differ from the formula ({el:e})");
    // The branch matters for both rows (the text-only one through E_k, E_v alone).
    let plain = hand_llama(&lc, &lw, &hand_embed(&lw, &ids), None);
    for r in 0..2 {
        let d = max_abs_err(&hh.i(r).unwrap(), &plain.i(r).unwrap());
        assert!(d > 1e-3, "row {r}: the memory branch changes nothing ({d:e})");
    }

    // memory_from_features on arbitrary features [b, n, c] = the hand K, V.
    let feats = randn(&mut rng, &[2, 5, vc.hidden_size], 1.0, F64);
    let (k2, v2) = mv.memory_from_features(Some(&feats), &ind, 2).unwrap();
    let (hk2, hv2) = hand_memory(&mv, &feats, &[1.0, 0.0]);
    assert!(max_abs_err(&k2, &hk2) < 1e-12 && max_abs_err(&v2, &hv2) < 1e-12);
    // No image at all: every row holds the tables.
    let (k3, v3) = mv.memory_from_features(None, &[0.0, 0.0], 2).unwrap();
    for r in 0..2 {
        assert_eq!(max_abs_err(&k3.i(r).unwrap(), mv.key_embed.as_tensor()), 0.0);
        assert_eq!(max_abs_err(&v3.i(r).unwrap(), mv.value_embed.as_tensor()), 0.0);
    }
    // More visual tokens than slots is an error, not a panic.
    let too_many = randn(&mut rng, &[2, 8, vc.hidden_size], 1.0, F64);
    let e = mv.memory_from_features(Some(&too_many), &ind, 2).expect_err("8 tokens in 7 slots must fail");
    assert!(e.to_string().contains("slots"), "{e}");
}

#[test]
fn memory_layers_restrict_the_branch() {
    let mut rng = Rng::new(21);
    let lc = tiny_llama_cfg(2);
    let lw = tiny_llama_weights(&lc, 22);
    let llama = build_llama(&lc, &lw, F64);
    let (vc, vw, vision) = tiny_clip(2, 23);
    let ids = random_ids(&mut rng, 2, 5, lc.vocab_size);
    let px = pixels(&mut rng, 2, 16, F64);
    let ind = [0f32, 1.0];
    let x = hand_embed(&lw, &ids);
    let mut outs = Vec::new();
    for layers in [None, Some(vec![1usize]), Some(vec![0usize])] {
        let mut cfg = memvp_cfg(6, -2);
        cfg.memory_layers = layers.clone();
        let mv =
            Memvp::init(cfg, vc.hidden_size, vc.num_hidden_layers, lc.hidden_size, Activation::Silu, 24, F64, &cpu())
                .unwrap();
        randomize(&mv.named(), &mut Rng::new(25), 0.4);
        let cell = RefCell::new(Rng::new(0));
        let mem = mv.memory(&vision, Some(&px), &ind, false, &cell).unwrap();
        let h = llama.forward_embeds(&llama.embed(&ids).unwrap(), &Positions::From(0), None, None, &mem).unwrap();
        let pairs = adapter_pairs(&mv);
        let ad = HandAdapters { pairs: &pairs, scale: mv.cfg.vision_adapter_scale };
        // vision_layer -2 of a 2-block tower: only block 0 (and its adapter) runs.
        let f = hand_clip_features(&vc, &vw, &px, 1, Some(&ad));
        let (k, v) = hand_memory(&mv, &f, &[0.0, 1.0]);
        let hm = HandMemory { k: &k, v: &v, s: mv.cfg.adapter_scale, layers: layers.as_deref() };
        let hh = hand_llama(&lc, &lw, &x, Some(&hm));
        let e = max_rel_err(&h, &hh);
        eprintln!("memory_layers {layers:?}: rel err {e:e}");
        assert!(e < 1e-10, "memory_layers {layers:?}: differs ({e:e})");
        outs.push(h);
    }
    // Restricting the layers changes the result (a layer not listed gets no branch).
    assert!(max_abs_err(&outs[0], &outs[1]) > 1e-3);
    assert!(max_abs_err(&outs[1], &outs[2]) > 1e-3);
    // Memory in layer 0 alone is not the plain model either.
    let plain = hand_llama(&lc, &lw, &x, None);
    assert!(max_abs_err(&outs[2], &plain) > 1e-3);
}

#[test]
fn vision_adapter_branch_matches_formula() {
    let mut rng = Rng::new(31);
    let (vc, vw, vision) = tiny_clip(2, 32);
    let px = pixels(&mut rng, 2, 16, F64);
    for (layer, blocks) in [(-1isize, 2usize), (-2, 1), (1, 1), (0, 0)] {
        let mv = Memvp::init(
            memvp_cfg(6, layer),
            vc.hidden_size,
            vc.num_hidden_layers,
            16,
            Activation::Silu,
            33,
            F64,
            &cpu(),
        )
        .unwrap();
        // Fresh init: Up = 0, so the adapters add nothing.
        let cell = RefCell::new(Rng::new(0));
        let f0 = mv.features(&vision, &px, false, &cell).unwrap();
        let plain = vision.patch_features(&px, layer, &NoHooks).unwrap();
        assert_eq!(max_abs_err(&f0, &plain), 0.0, "Up = 0 must be a no-op");
        randomize(&mv.named(), &mut rng, 0.5);
        let f = mv.features(&vision, &px, false, &cell).unwrap();
        let pairs = adapter_pairs(&mv);
        let ad = HandAdapters { pairs: &pairs, scale: mv.cfg.vision_adapter_scale };
        let hf = hand_clip_features(&vc, &vw, &px, blocks, Some(&ad));
        let e = max_rel_err(&f, &hf);
        eprintln!("vision layer {layer}: features rel err {e:e}");
        assert!(e < 1e-10, "vision layer {layer}: features differ ({e:e})");
        // The plain tower equals the hand tower without adapters.
        let hp = hand_clip_features(&vc, &vw, &px, blocks, None);
        assert!(max_rel_err(&plain, &hp) < 1e-10);
        if blocks > 0 {
            assert!(max_abs_err(&f, &plain) > 1e-3, "the adapter changes nothing");
        }
        // Training mode draws dropout masks: different features, same shape.
        let ft = mv.features(&vision, &px, true, &cell).unwrap();
        if blocks > 0 {
            assert!(max_abs_err(&ft, &f) > 0.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1b. Gradients of every trained tensor, pixels → CLIP → MemVP → LLaMA → cross-entropy.
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

#[test]
fn memvp_gradients_match_finite_differences() {
    let mut rng = Rng::new(41);
    let lc = tiny_llama_cfg(2);
    let lw = tiny_llama_weights(&lc, 42);
    let llama = build_llama(&lc, &lw, F64);
    let (vc, _vw, vision) = tiny_clip(2, 43);
    let mut cfg = memvp_cfg(6, -1);
    cfg.visual_scale = 0.5;
    let mv = Memvp::init(cfg, vc.hidden_size, vc.num_hidden_layers, lc.hidden_size, Activation::Silu, 44, F64, &cpu())
        .unwrap();
    randomize(&mv.named(), &mut rng, 0.4);
    let px = pixels(&mut rng, 2, 16, F64);
    let ids = random_ids(&mut rng, 2, 6, lc.vocab_size);
    let ind = [1f32, 0.0];
    // Answer positions in the flat [b, t] grid, and their targets.
    let pos: Vec<u32> = vec![2, 3, 5, 7, 10, 11];
    let targets: Vec<u32> = (0..pos.len()).map(|_| rng.below(lc.vocab_size) as u32).collect();
    let loss = || -> Tensor {
        let cell = RefCell::new(Rng::new(0));
        let mem = mv.memory(&vision, Some(&px), &ind, false, &cell).unwrap();
        let h = llama.forward_embeds(&llama.embed(&ids).unwrap(), &Positions::From(0), None, None, &mem).unwrap();
        let (b, t, d) = h.dims3().unwrap();
        let idx = Tensor::new(pos.as_slice(), &cpu()).unwrap();
        let hs = h.reshape((b * t, d)).unwrap().index_select(&idx, 0).unwrap();
        ops::cross_entropy(&llama.logits(&hs).unwrap(), &targets).unwrap()
    };
    let named = mv.named();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "projector.fc1.weight",
            "projector.fc1.bias",
            "projector.fc2.weight",
            "projector.fc2.bias",
            "memory.key_embed",
            "memory.value_embed",
            "vision.layers.0.adapter.down.weight",
            "vision.layers.0.adapter.up.weight",
            "vision.layers.1.adapter.down.weight",
            "vision.layers.1.adapter.up.weight",
        ]
    );
    let rep = fd_check(&named, &loss, 4, &mut rng, 1e-5);
    for (n, e) in &rep {
        eprintln!("grad {n}: worst rel err {e:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1c. The stored PyTorch reference.
// ---------------------------------------------------------------------------------------------

#[test]
fn memvp_matches_pytorch_reference() {
    let dir = fixtures().join("memvp_llama_clip");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("settings.json")).unwrap()).unwrap();
    let cfg = MemvpConfig {
        slots: s["slots"].as_u64().unwrap() as usize,
        hidden_proj: s["hidden_proj"].as_u64().unwrap() as usize,
        visual_scale: s["visual_scale"].as_f64().unwrap(),
        adapter_scale: s["adapter_scale"].as_f64().unwrap(),
        vision_adapter_dim: s["vision_adapter_dim"].as_u64().unwrap() as usize,
        vision_adapter_scale: s["vision_adapter_scale"].as_f64().unwrap(),
        vision_layer: s["vision_layer"].as_i64().unwrap() as isize,
        ..MemvpConfig::default()
    };
    assert_eq!((cfg.slots, cfg.hidden_proj, cfg.vision_adapter_dim, cfg.vision_layer), (24, 12, 6, -2));
    let lm = load_lm(&fixtures().join("llama_gqa_tied"), DType::F32, Default::default(), &cpu()).unwrap();
    let vis =
        load_vision(fixtures().join("clip_vision_quickgelu").to_str().unwrap(), DType::F32, Default::default(), &cpu())
            .unwrap();
    let llama = lm.llama().unwrap();
    let vc = &vis.model.cfg;
    let mv = Memvp::init(
        cfg,
        vc.hidden_size,
        vc.num_hidden_layers,
        llama.hidden_size(),
        Activation::Silu,
        0,
        DType::F32,
        &cpu(),
    )
    .unwrap();
    let ad = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &cpu()).unwrap();
    let mut file_names: Vec<&String> = ad.keys().collect();
    file_names.sort();
    let mut ours: Vec<String> = mv.named().into_iter().map(|(n, _)| n).collect();
    ours.sort();
    assert_eq!(
        file_names.into_iter().cloned().collect::<Vec<_>>(),
        ours,
        "the adapter file's tensor names differ from the model's"
    );
    mv.load_tensors(&|n| ad.get(n).cloned().ok_or_else(|| anyhow!("missing {n}"))).unwrap();
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &cpu()).unwrap();
    let ind: Vec<f32> = r["indicator"].to_vec1::<f32>().unwrap();
    assert_eq!(ind, [1.0, 0.0]);
    let cell = RefCell::new(Rng::new(0));
    let f = mv.features(&vis.model, &r["pixel_values"], false, &cell).unwrap();
    let ef = max_rel_err(&f, &r["features"]);
    let mem = mv.memory(&vis.model, Some(&r["pixel_values"]), &ind, false, &cell).unwrap();
    let ek = max_rel_err(&mem.k, &r["keys"]);
    let ev = max_rel_err(&mem.v, &r["values"]);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let h = llama.forward_embeds(&llama.embed(&ids).unwrap(), &Positions::From(0), None, None, &mem).unwrap();
    let logits = llama.logits(&h).unwrap();
    let el = max_rel_err(&logits, &r["logits"]);
    let plain = llama.forward(&ids, 0, None, &NoHooks).unwrap();
    let ep = max_rel_err(&plain, &r["logits_plain"]);
    eprintln!("reference: features {ef:e}, keys {ek:e}, values {ev:e}, logits {el:e}, plain logits {ep:e}");
    for (what, e) in [("features", ef), ("keys", ek), ("values", ev), ("logits", el), ("logits_plain", ep)] {
        assert!(e < 1e-4, "{what} differ from the PyTorch reference ({e:e})");
    }
    // The reference's branch is visible in both rows; so must ours be.
    for row in 0..2 {
        let d = max_abs_err(&logits.i(row).unwrap(), &plain.i(row).unwrap());
        assert!(d > 0.1, "row {row}: memory changes logits by only {d}");
    }
    // Generation keeps no graph: `install` (training) returns K and V carrying the vision
    // forward's graph (they have gradients); `install_inference` cuts them from it, so the
    // LM's forward over a prompt records nothing. Same values either way.
    use memvp::adapters::{Adapter, Visual};
    let visual = Visual { pixels: Some(&r["pixel_values"]), indicator: &ind };
    let trained = mv.install(&vis.model, visual, false, &cell).unwrap();
    let inference = mv.install_inference(&vis.model, visual, &cell).unwrap();
    let (kt, ki) = (trained.hooks.checkpoint_tensors().unwrap(), inference.hooks.checkpoint_tensors().unwrap());
    assert!(kt.iter().all(|t| t.track_op()) && ki.iter().all(|t| !t.track_op()));
    for (a, b) in kt.iter().zip(&ki) {
        assert_eq!(max_abs_err(a, b), 0.0);
    }
    let h =
        llama.forward_embeds(&llama.embed(&ids).unwrap(), &Positions::From(0), None, None, inference.hooks.as_ref());
    assert!(!h.unwrap().track_op(), "the LM's forward recorded a graph during generation");
    // A tensor of the wrong shape is refused with its name.
    let mut small = mv.cfg.clone();
    small.slots = 20;
    let mv2 = Memvp::init(
        small,
        vc.hidden_size,
        vc.num_hidden_layers,
        llama.hidden_size(),
        Activation::Silu,
        0,
        DType::F32,
        &cpu(),
    )
    .unwrap();
    let e = mv2
        .load_tensors(&|n| ad.get(n).cloned().ok_or_else(|| anyhow!("missing {n}")))
        .expect_err("a [24, 64] table must not load into 20 slots");
    assert!(e.to_string().contains("memory.key_embed"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 1d. LoRA.
// ---------------------------------------------------------------------------------------------

fn lora_dims(c: &LlamaConfig) -> impl Fn(Site, usize, Proj) -> (usize, usize) + use<> {
    let (d, h, kv, hd) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    move |_s, _l, p| match p {
        Proj::Q => (d, h * hd),
        Proj::K | Proj::V => (d, kv * hd),
        Proj::O => (h * hd, d),
    }
}

#[test]
fn lora_initialisation_is_pefts() {
    // Kaiming-uniform with a = sqrt(5) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)); B = 0.
    let cfg = LoraConfig { rank: 8, alpha: 16.0, dropout: 0.05, targets: vec![Proj::Q, Proj::V] };
    let (inp, out) = (256usize, 48usize);
    let l = Lora::init(cfg, &[(Site::Decoder, 2)], &|_, _, _| (inp, out), 3, DType::F32, &cpu()).unwrap();
    assert_eq!(l.scaling(), 2.0);
    assert_eq!(l.pairs.len(), 4);
    let bound = 1.0 / (inp as f64).sqrt();
    let mut firsts = Vec::new();
    for ((_, _, _), (a, b)) in &l.pairs {
        assert_eq!(a.dims(), [8, inp]);
        assert_eq!(b.dims(), [out, 8]);
        let bv = b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(bv.iter().all(|&x| x == 0.0), "B must start at zero");
        let av: Vec<f64> =
            a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&x| x as f64).collect();
        let max = av.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(max <= bound * (1.0 + 1e-6), "A exceeds 1/sqrt(in): {max}");
        assert!(max > 0.95 * bound, "A is too small for U(±1/sqrt(in)): {max}");
        let n = av.len() as f64;
        let mean = av.iter().sum::<f64>() / n;
        let var = av.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let want = bound * bound / 3.0;
        assert!(mean.abs() < 0.1 * bound, "mean {mean}");
        assert!((var / want - 1.0).abs() < 0.15, "variance {var} vs U(±b) {want}");
        firsts.push(av[0]);
    }
    firsts.dedup();
    assert_eq!(firsts.len(), 4, "every pair must have its own A");
    // File names.
    let names: Vec<String> = l.named().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "lora.layers.0.q_proj.a",
            "lora.layers.0.q_proj.b",
            "lora.layers.0.v_proj.a",
            "lora.layers.0.v_proj.b",
            "lora.layers.1.q_proj.a",
            "lora.layers.1.q_proj.b",
            "lora.layers.1.v_proj.a",
            "lora.layers.1.v_proj.b",
        ]
    );
}

#[test]
fn lora_forward_equals_merged_weights_and_gradients_match() {
    let mut rng = Rng::new(51);
    let lc = tiny_llama_cfg(2);
    let lw = tiny_llama_weights(&lc, 52);
    let llama = build_llama(&lc, &lw, F64);
    let cfg = LoraConfig { rank: 3, alpha: 7.0, dropout: 0.1, targets: vec![Proj::Q, Proj::V] };
    let dims = lora_dims(&lc);
    let lora = Lora::init(cfg, &[(Site::Decoder, 2)], &dims, 53, F64, &cpu()).unwrap();
    randomize(&lora.named(), &mut rng, 0.4);
    let s = 7.0 / 3.0;
    assert!((lora.scaling() - s).abs() < 1e-15);
    let cell = RefCell::new(Rng::new(0));
    let hooks = LoraHooks { lora: &lora, train: false, rng: &cell };
    // One projection: delta = (x Aᵀ Bᵀ) alpha / r.
    let x = randn(&mut rng, &[2, 3, lc.hidden_size], 1.0, F64);
    let (a, b) = &lora.pairs[&(Site::Decoder, 1, Proj::V)];
    let want = (lin(&lin(&x, a.as_tensor(), None), b.as_tensor(), None) * s).unwrap();
    let got = lora.delta(Site::Decoder, 1, Proj::V, &x, false, &cell).unwrap().unwrap();
    assert!(max_rel_err(&got, &want) < 1e-12);
    assert!(lora.delta(Site::Decoder, 1, Proj::K, &x, false, &cell).unwrap().is_none());
    // The whole LM with LoRA = the LM with W' = W + (alpha / r) B A for q and v.
    let mut merged = lw.clone();
    for l in 0..2 {
        for p in [Proj::Q, Proj::V] {
            let (a, b) = &lora.pairs[&(Site::Decoder, l, p)];
            let n = format!("model.layers.{l}.self_attn.{}.weight", p.name());
            let ba = b.as_tensor().matmul(a.as_tensor()).unwrap();
            merged.insert(n.clone(), (&lw[&n] + (ba * s).unwrap()).unwrap());
        }
    }
    let llama_merged = build_llama(&lc, &merged, F64);
    let ids = random_ids(&mut rng, 2, 7, lc.vocab_size);
    let with_lora = llama.forward(&ids, 0, None, &hooks).unwrap();
    let with_merged = llama_merged.forward(&ids, 0, None, &NoHooks).unwrap();
    let plain = llama.forward(&ids, 0, None, &NoHooks).unwrap();
    let e = max_rel_err(&with_lora, &with_merged);
    eprintln!("LoRA vs merged weights: logits rel err {e:e}");
    assert!(e < 1e-10, "LoRA forward differs from W + s B A ({e:e})");
    assert!(max_abs_err(&with_lora, &plain) > 1e-3);
    // And = the hand LLaMA with the merged weights.
    let hand = hand_logits(&merged, &hand_llama(&lc, &merged, &hand_embed(&merged, &ids), None));
    assert!(max_rel_err(&with_lora, &hand) < 1e-10);
    // Training mode applies dropout to the LoRA input only.
    let train_hooks = LoraHooks { lora: &lora, train: true, rng: &cell };
    let tr = llama.forward(&ids, 0, None, &train_hooks).unwrap();
    assert!(max_abs_err(&tr, &with_lora) > 0.0);

    // Gradients of every A and B.
    let pos: Vec<u32> = vec![1, 4, 6, 8, 13];
    let targets: Vec<u32> = (0..pos.len()).map(|_| rng.below(lc.vocab_size) as u32).collect();
    let loss = || -> Tensor {
        let h = llama.forward_embeds(&llama.embed(&ids).unwrap(), &Positions::From(0), None, None, &hooks).unwrap();
        let (b, t, d) = h.dims3().unwrap();
        let idx = Tensor::new(pos.as_slice(), &cpu()).unwrap();
        let hs = h.reshape((b * t, d)).unwrap().index_select(&idx, 0).unwrap();
        ops::cross_entropy(&llama.logits(&hs).unwrap(), &targets).unwrap()
    };
    let rep = fd_check(&lora.named(), &loss, 4, &mut rng, 1e-5);
    for (n, e) in &rep {
        eprintln!("grad {n}: worst rel err {e:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1e. The input-space baseline.
// ---------------------------------------------------------------------------------------------

#[test]
fn input_space_loss_matches_concatenation_by_hand() {
    let mut rng = Rng::new(61);
    let vision = load_vision("random:tiny", DType::F32, Default::default(), &cpu()).unwrap();
    let lm_dir = fixtures().join("llama_gqa_tied");
    let lm = load_lm(&lm_dir, DType::F32, Default::default(), &cpu()).unwrap();
    let sections = [
        (
            "input_space".to_string(),
            serde_json::to_value(InputSpaceConfig { hidden_proj: 8, vision_layer: -2, norm: Norm::Imagenet }).unwrap(),
        ),
        (
            "lora".to_string(),
            serde_json::to_value(LoraConfig { rank: 4, alpha: 8.0, dropout: 0.05, targets: vec![Proj::Q, Proj::V] })
                .unwrap(),
        ),
    ]
    .into();
    let settings = AdapterSettings {
        method: "input-space".into(),
        sections,
        prompt: DataOptions::default(),
        max_len: 64,
        image_blind: false,
        seed: 5,
    };
    let vlm = Vlm::new(Arc::new(Base { vision, lm }), &settings).unwrap();
    randomize(&vlm.named(), &mut rng, 0.2);
    let Some(InputSpace { projector, lora, .. }) = vlm.adapter.downcast::<InputSpace>() else {
        panic!("not the input-space method")
    };
    let t = 7;
    let ids = random_ids(&mut rng, 2, t, 128);
    let px = pixels(&mut rng, 2, 32, DType::F32);
    // (row, position) of each target.
    let at: Vec<(usize, usize)> = vec![(0, 3), (0, 4), (0, 6), (1, 2), (1, 5)];
    let targets: Vec<u32> = at.iter().map(|_| rng.below(128) as u32).collect();
    let batch = Batch {
        input_ids: ids.clone(),
        input_lens: vec![t, t],
        decoder_ids: None,
        loss_positions: at.iter().map(|&(r, p)| (r * t + p) as u32).collect(),
        loss_targets: targets.clone(),
        pixels: Some(px.clone()),
        indicator: vec![1.0, 0.0],
        skipped: 0,
        n: 2,
    };
    let got = vlm.loss(&batch, &mut Rng::new(0), false).unwrap().to_scalar::<f32>().unwrap() as f64;

    // By hand: the LM with LoRA merged into W, the projected visual tokens before the text of
    // the image row, nothing before the text-only row (masked out = absent: RoPE attention
    // depends only on relative positions).
    let cfg = LlamaConfig::from_hf(&Cfg::load(&lm_dir.join("config.json")).unwrap()).unwrap();
    let mut w = candle_core::safetensors::load(lm_dir.join("model.safetensors"), &cpu()).unwrap();
    let s = lora.scaling();
    for l in 0..cfg.num_hidden_layers {
        for p in [Proj::Q, Proj::V] {
            let (a, b) = &lora.pairs[&(Site::Decoder, l, p)];
            let n = format!("model.layers.{l}.self_attn.{}.weight", p.name());
            let ba = b.as_tensor().matmul(a.as_tensor()).unwrap();
            let nw = (&w[&n] + (ba * s).unwrap()).unwrap();
            w.insert(n, nw);
        }
    }
    let feats = vlm.vision().model.patch_features(&px, -2, &NoHooks).unwrap();
    let vis_tokens = lin(
        &silu(&lin(&feats, projector.fc1_weight.as_tensor(), Some(projector.fc1_bias.as_tensor()))),
        projector.fc2_weight.as_tensor(),
        Some(projector.fc2_bias.as_tensor()),
    );
    let n = vis_tokens.dims()[1];
    assert_eq!(n, 16);
    let emb = hand_embed(&w, &ids);
    let row = |r: usize, with_image: bool| -> Tensor {
        let e = emb.i(r).unwrap().unsqueeze(0).unwrap();
        let x = if with_image {
            Tensor::cat(&[&vis_tokens.i(r).unwrap().unsqueeze(0).unwrap(), &e], 1).unwrap()
        } else {
            e
        };
        let h = hand_llama(&cfg, &w, &x, None);
        let off = if with_image { n } else { 0 };
        hand_logits(&w, &h.i(0).unwrap().narrow(0, off, t).unwrap())
    };
    let (l0, l1) = (row(0, true), row(1, false));
    let rows: Vec<Tensor> = at.iter().map(|&(r, p)| if r == 0 { l0.i(p).unwrap() } else { l1.i(p).unwrap() }).collect();
    let want = hand_cross_entropy(&Tensor::stack(&rows, 0).unwrap(), &targets);
    let e = (got - want).abs() / want.abs();
    eprintln!("input-space loss {got} vs hand {want} (rel err {e:e})");
    assert!(e < 1e-5, "input-space loss differs ({got} vs {want})");
    // The test can tell: had the text-only row seen the image tokens, the loss would differ.
    let l1_img = row(1, true);
    let rows: Vec<Tensor> =
        at.iter().map(|&(r, p)| if r == 0 { l0.i(p).unwrap() } else { l1_img.i(p).unwrap() }).collect();
    let wrong = hand_cross_entropy(&Tensor::stack(&rows, 0).unwrap(), &targets);
    assert!((wrong - want).abs() > 1e-3 * want.abs());
}
