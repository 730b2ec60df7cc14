//! Every op used in training, checked against central finite differences in f64, plus the
//! forward of each fast kernel against a plain candle composition.
#![allow(clippy::type_complexity)]

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use memvp::ops::{self, Activation, AttentionOpts, Linear};
use memvp::rng::Rng;

const F64: DType = DType::F64;

fn weighted_sum(y: &Tensor, r: &Tensor) -> Tensor {
    (y * r).unwrap().sum_all().unwrap()
}

#[test]
fn softmax_grad() {
    let mut rng = Rng::new(1);
    let x = randn(&mut rng, &[3, 7], 1.0, F64);
    let r = randn(&mut rng, &[3, 7], 1.0, F64);
    check_grads("softmax", &[x], &[true], &|t| weighted_sum(&ops::softmax_last_dim(&t[0]).unwrap(), &r));
}

#[test]
fn rms_norm_grad() {
    let mut rng = Rng::new(2);
    let x = randn(&mut rng, &[2, 3, 8], 1.0, F64);
    let w = (randn(&mut rng, &[8], 0.2, F64) + 1.0).unwrap();
    let r = randn(&mut rng, &[2, 3, 8], 1.0, F64);
    check_grads("rms_norm", &[x, w], &[true, true], &|t| weighted_sum(&ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(), &r));
}

#[test]
fn layer_norm_grad() {
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, &[4, 6], 1.0, F64);
    let w = (randn(&mut rng, &[6], 0.2, F64) + 1.0).unwrap();
    let b = randn(&mut rng, &[6], 0.2, F64);
    let r = randn(&mut rng, &[4, 6], 1.0, F64);
    check_grads("layer_norm", &[x, w, b], &[true, true, true], &|t| {
        weighted_sum(&ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(), &r)
    });
}

#[test]
fn rope_grad_shared_and_per_sample() {
    let mut rng = Rng::new(4);
    let table = ops::RopeTable::new(&[1.0, 0.3, 0.05], 16, F64, &Device::Cpu).unwrap();
    let x = randn(&mut rng, &[2, 5, 2, 6], 1.0, F64);
    let r = randn(&mut rng, &[2, 5, 2, 6], 1.0, F64);
    let (c, s) = table.range(3, 5).unwrap();
    check_grads("rope", std::slice::from_ref(&x), &[true], &|t| weighted_sum(&ops::rope(&t[0], &c, &s).unwrap(), &r));
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 0, 5, 6, 7]], &Device::Cpu).unwrap();
    let (c, s) = table.gather(&pos).unwrap();
    check_grads("rope per-sample", &[x], &[true], &|t| weighted_sum(&ops::rope(&t[0], &c, &s).unwrap(), &r));
}

#[test]
fn activation_grads() {
    let mut rng = Rng::new(5);
    let x = randn(&mut rng, &[3, 9], 1.5, F64);
    let r = randn(&mut rng, &[3, 9], 1.0, F64);
    for a in [Activation::Silu, Activation::Gelu, Activation::GeluTanh, Activation::QuickGelu] {
        check_grads(&format!("{a:?}"), std::slice::from_ref(&x), &[true], &|t| {
            weighted_sum(&ops::activation(&t[0], a).unwrap(), &r)
        });
    }
    // ReLU: keep away from the kink.
    let xr = x.affine(1.0, 0.0).unwrap().abs().unwrap().affine(1.0, 0.1).unwrap().mul(&x.sign().unwrap()).unwrap();
    check_grads("relu", &[xr], &[true], &|t| weighted_sum(&ops::activation(&t[0], Activation::Relu).unwrap(), &r));
}

#[test]
fn gated_grads() {
    let mut rng = Rng::new(6);
    let g = randn(&mut rng, &[2, 3, 5], 1.0, F64);
    let u = randn(&mut rng, &[2, 3, 5], 1.0, F64);
    let r = randn(&mut rng, &[2, 3, 5], 1.0, F64);
    for a in [Activation::Silu, Activation::GeluTanh] {
        check_grads(&format!("gated {a:?}"), &[g.clone(), u.clone()], &[true, true], &|t| {
            weighted_sum(&ops::gated(&t[0], &t[1], a).unwrap(), &r)
        });
    }
}

#[test]
fn frozen_linear_grad_and_no_weight_gradient() {
    let mut rng = Rng::new(7);
    let w = randn(&mut rng, &[4, 6], 0.5, F64);
    let b = randn(&mut rng, &[4], 0.5, F64);
    let x = randn(&mut rng, &[2, 3, 6], 1.0, F64);
    let r = randn(&mut rng, &[2, 3, 4], 1.0, F64);
    let lin = Linear::new(w.clone(), Some(b.clone()));
    check_grads("linear", std::slice::from_ref(&x), &[true], &|t| weighted_sum(&lin.forward(&t[0]).unwrap(), &r));
    // Forward equals x Wᵀ + b.
    let want = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    assert!(max_abs_err(&lin.forward(&x).unwrap(), &want) < 1e-12);
    // The backward pass forms nothing for the frozen weight; candle's matmul would.
    let xv = Var::from_tensor(&x).unwrap();
    let grads = weighted_sum(&lin.forward(xv.as_tensor()).unwrap(), &r).backward().unwrap();
    assert!(grads.get(lin.weight.tensor().unwrap()).is_none(), "a gradient was computed for the frozen weight");
    let grads_mm = weighted_sum(&xv.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap(), &r).backward().unwrap();
    let _ = grads_mm; // (candle's own matmul: kept only to document the contrast)
}

fn attn_cases() -> Vec<(&'static str, usize, usize, usize, usize, usize, Option<usize>, bool, bool)> {
    // name, b, tq, tk, h, kvh, causal offset, bias, key mask
    vec![
        ("bidirectional", 2, 4, 4, 2, 2, None, false, false),
        ("causal gqa", 2, 5, 5, 4, 2, Some(0), false, false),
        ("causal with cache offset", 1, 2, 6, 2, 1, Some(4), false, false),
        ("bias (t5)", 2, 3, 4, 2, 2, None, true, false),
        ("key mask", 2, 4, 4, 2, 2, Some(0), false, true),
    ]
}

#[test]
fn attention_grads() {
    let mut rng = Rng::new(8);
    for (name, b, tq, tk, h, kvh, causal, use_bias, use_mask) in attn_cases() {
        let d = 3;
        let q = randn(&mut rng, &[b, tq, h, d], 1.0, F64);
        let k = randn(&mut rng, &[b, tk, kvh, d], 1.0, F64);
        let v = randn(&mut rng, &[b, tk, kvh, d], 1.0, F64);
        let r = randn(&mut rng, &[b, tq, h, d], 1.0, F64);
        let bias = randn(&mut rng, &[1, h, tq, tk], 1.0, F64);
        let mask = Tensor::new(&[[1.0f64, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let opts = AttentionOpts {
            scale: 0.7,
            causal_offset: causal,
            bias: use_bias.then_some(&bias),
            key_mask: use_mask.then_some(&mask),
        };
        // Fast forward equals the plain composition.
        let fast = ops::attention(&q, &k, &v, opts).unwrap();
        let slow = ops::attention_reference(&q, &k, &v, opts).unwrap();
        assert!(max_abs_err(&fast, &slow) < 1e-12, "{name}: forward differs");
        check_grads(&format!("attention {name}"), &[q, k, v], &[true, true, true], &|t| {
            weighted_sum(&ops::attention(&t[0], &t[1], &t[2], opts).unwrap(), &r)
        });
    }
}

#[test]
fn attention_on_strided_cache_views() {
    // Keys/values read through a narrowed, preallocated cache buffer.
    let mut rng = Rng::new(9);
    let q = randn(&mut rng, &[2, 1, 4, 8], 1.0, DType::F32);
    let kbuf = randn(&mut rng, &[2, 10, 2, 8], 1.0, DType::F32);
    let vbuf = randn(&mut rng, &[2, 10, 2, 8], 1.0, DType::F32);
    let (k, v) = (kbuf.narrow(1, 0, 6).unwrap(), vbuf.narrow(1, 0, 6).unwrap());
    let o = AttentionOpts { scale: 0.35, causal_offset: Some(5), ..Default::default() };
    let fast = ops::attention(&q, &k, &v, o).unwrap();
    let slow = ops::attention_reference(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap(), o).unwrap();
    assert!(max_abs_err(&fast, &slow) < 1e-5);
}

#[test]
fn cross_entropy_grad() {
    let mut rng = Rng::new(10);
    let x = randn(&mut rng, &[4, 11], 2.0, F64);
    let targets = [3u32, 0, 10, 5];
    check_grads("cross_entropy", std::slice::from_ref(&x), &[true], &|t| ops::cross_entropy(&t[0], &targets).unwrap());
    // Value equals candle's own.
    let want = candle_nn::loss::cross_entropy(&x, &Tensor::new(&targets, &Device::Cpu).unwrap()).unwrap();
    assert!(
        (ops::cross_entropy(&x, &targets).unwrap().to_scalar::<f64>().unwrap() - want.to_scalar::<f64>().unwrap())
            .abs()
            < 1e-12
    );
}

#[test]
fn f32_kernels_match_candle_compositions() {
    let mut rng = Rng::new(11);
    let x = randn(&mut rng, &[3, 5, 16], 1.0, DType::F32);
    let w = (randn(&mut rng, &[16], 0.1, DType::F32) + 1.0).unwrap();
    let b = randn(&mut rng, &[16], 0.1, DType::F32);
    let rms = ops::rms_norm(&x, &w, 1e-6).unwrap();
    let rms_ref = candle_nn::ops::rms_norm_slow(&x, &w, 1e-6).unwrap();
    assert!(max_rel_err(&rms, &rms_ref) < 1e-5);
    let ln = ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    let ln_ref = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
    assert!(max_rel_err(&ln, &ln_ref) < 1e-5);
    let sm = ops::softmax_last_dim(&x).unwrap();
    let sm_ref = candle_nn::ops::softmax_last_dim(&x).unwrap();
    assert!(max_rel_err(&sm, &sm_ref) < 1e-5);
}

#[test]
fn frozen_mlp_grads_and_forward() {
    use memvp::ops::FrozenMlp;
    let mut rng = Rng::new(12);
    let (d, i) = (6, 10);
    let lin = |rng: &mut Rng, o: usize, n: usize, bias: bool| {
        Linear::new(randn(rng, &[o, n], 0.4, F64), bias.then(|| randn(rng, &[o], 0.2, F64)))
    };
    let x = randn(&mut rng, &[2, 3, d], 1.0, F64);
    let r = randn(&mut rng, &[2, 3, d], 1.0, F64);
    // `shared`: gate and up as views of one buffer (as the models load them), one product each way.
    for (gated, act, bias, shared) in [
        (true, Activation::Silu, false, false),
        (true, Activation::Silu, true, true),
        (true, Activation::GeluTanh, false, true),
        (false, Activation::Relu, true, false),
        (false, Activation::QuickGelu, true, true),
    ] {
        let mut mlp = FrozenMlp {
            w1: lin(&mut rng, i, d, bias),
            w2: gated.then(|| lin(&mut rng, i, d, bias)),
            down: lin(&mut rng, d, i, bias),
            act,
        };
        if shared {
            mlp = mlp.share_storage().unwrap();
            if let Some(w2) = &mlp.w2 {
                assert_eq!(w2.weight.tensor().unwrap().layout().start_offset(), i * d, "up follows gate");
            }
        }
        // Forward equals the op-by-op composition.
        let h1 = mlp.w1.forward(&x).unwrap();
        let a = match &mlp.w2 {
            Some(w2) => ops::gated(&h1, &w2.forward(&x).unwrap(), act).unwrap(),
            None => ops::activation(&h1, act).unwrap(),
        };
        let want = mlp.down.forward(&a).unwrap();
        assert!(max_abs_err(&mlp.forward(&x).unwrap(), &want) < 1e-12);
        check_grads(&format!("mlp {act:?} gated={gated} shared={shared}"), std::slice::from_ref(&x), &[true], &|t| {
            weighted_sum(&mlp.forward(&t[0]).unwrap(), &r)
        });
        // Nothing is formed for the frozen weights.
        let xv = Var::from_tensor(&x).unwrap();
        let g = weighted_sum(&mlp.forward(xv.as_tensor()).unwrap(), &r).backward().unwrap();
        assert!(g.get(mlp.w1.weight.tensor().unwrap()).is_none() && g.get(mlp.down.weight.tensor().unwrap()).is_none());
    }
}

/// A zero-width FFN (a programmatic config; files with one are refused at load) gives its
/// down projection's bias and a zero input gradient, without a panic in the row loops.
#[test]
fn frozen_mlp_of_zero_width() {
    use memvp::ops::FrozenMlp;
    let mut rng = Rng::new(14);
    let d = 5;
    let x = Var::from_tensor(&randn(&mut rng, &[2, 3, d], 1.0, F64)).unwrap();
    let b = randn(&mut rng, &[d], 0.2, F64);
    for gated in [true, false] {
        let mlp = FrozenMlp {
            w1: Linear::new(Tensor::zeros((0, d), F64, &Device::Cpu).unwrap(), None),
            w2: gated.then(|| Linear::new(Tensor::zeros((0, d), F64, &Device::Cpu).unwrap(), None)),
            down: Linear::new(Tensor::zeros((d, 0), F64, &Device::Cpu).unwrap(), Some(b.clone())),
            act: Activation::Silu,
        };
        let y = mlp.forward(x.as_tensor()).unwrap();
        assert!(max_abs_err(&y, &b.broadcast_as((2, 3, d)).unwrap()) == 0.0, "gated={gated}");
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).map(|t| t.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap());
        assert!(dx.is_none_or(|s| s == 0.0), "gated={gated}: {dx:?}");
    }
}

#[test]
fn memory_branch_grads_and_forward() {
    let mut rng = Rng::new(13);
    let (b, t, m, d) = (2, 3, 5, 4);
    let u = randn(&mut rng, &[b, t, d], 1.0, F64);
    let k = randn(&mut rng, &[b, m, d], 1.0, F64);
    let v = randn(&mut rng, &[b, m, d], 1.0, F64);
    let r = randn(&mut rng, &[b, t, d], 1.0, F64);
    let mask = memvp::ops::nn::dropout_mask(&[b, t, m], 0.3, &mut rng, &u).unwrap();
    for (act, mk) in [
        (Activation::Silu, None),
        (Activation::Silu, Some(&mask)),
        (Activation::Gelu, Some(&mask)),
        (Activation::GeluTanh, None),
    ] {
        // Forward: s · (act(u Kᵀ) ∘ mask) V
        let a = ops::activation(&u.matmul(&k.transpose(1, 2).unwrap()).unwrap(), act).unwrap();
        let a = match mk {
            Some(m) => a.mul(m).unwrap(),
            None => a,
        };
        let want = (a.matmul(&v).unwrap() * 0.7).unwrap();
        let got = ops::memory_branch(&u, &k, &v, act, 0.7, mk).unwrap();
        assert!(max_abs_err(&got, &want) < 1e-12);
        check_grads(&format!("memory branch {act:?}"), &[u.clone(), k.clone(), v.clone()], &[true, true, true], &|x| {
            weighted_sum(&ops::memory_branch(&x[0], &x[1], &x[2], act, 0.7, mk).unwrap(), &r)
        });
    }
    // Gradients only for what is tracked: a frozen u gets nothing.
    let (kv, vv) = (Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
    let g =
        weighted_sum(&ops::memory_branch(&u, kv.as_tensor(), vv.as_tensor(), Activation::Silu, 0.7, None).unwrap(), &r)
            .backward()
            .unwrap();
    assert!(g.get(&u).is_none());
    assert!(g.get(kv.as_tensor()).is_some() && g.get(vv.as_tensor()).is_some());
}

#[test]
fn frozen_attention_block_grads_and_forward() {
    use memvp::ops::{BlockNorm, FrozenAttnBlock};
    let mut rng = Rng::new(14);
    let (b, t, d) = (2, 5, 8);
    let x = randn(&mut rng, &[b, t, d], 1.0, F64);
    let r = randn(&mut rng, &[b, t, d], 1.0, F64);
    let table = ops::RopeTable::new(&[1.0, 0.3], t, F64, &Device::Cpu).unwrap();
    let (cos, sin) = table.range(0, t).unwrap();
    // `shared`: q, k and v as views of one buffer (as the models load them), one product each way.
    for (rms, heads, kv, bias, shared) in
        [(true, 2, 1, false, false), (true, 2, 1, false, true), (false, 2, 2, true, false), (false, 2, 2, true, true)]
    {
        let hd = 4;
        let lin = |rng: &mut Rng, o: usize, i: usize| {
            Linear::new(randn(rng, &[o, i], 0.4, F64), bias.then(|| randn(rng, &[o], 0.2, F64)))
        };
        let norm = if rms {
            BlockNorm::Rms { weight: (randn(&mut rng, &[d], 0.1, F64) + 1.0).unwrap(), eps: 1e-5 }
        } else {
            BlockNorm::Layer {
                weight: (randn(&mut rng, &[d], 0.1, F64) + 1.0).unwrap(),
                bias: randn(&mut rng, &[d], 0.1, F64),
                eps: 1e-5,
            }
        };
        let blk = FrozenAttnBlock {
            norm,
            q: lin(&mut rng, heads * hd, d),
            k: lin(&mut rng, kv * hd, d),
            v: lin(&mut rng, kv * hd, d),
            o: lin(&mut rng, d, heads * hd),
            heads,
            kv_heads: kv,
            head_dim: hd,
            scale: 0.5,
            causal: rms,
        };
        let blk = if shared { blk.share_storage().unwrap() } else { blk };
        let offset = |l: &Linear| l.weight.tensor().unwrap().layout().start_offset();
        let starts = [offset(&blk.q), offset(&blk.k), offset(&blk.v)];
        let want = if shared { [0, heads * hd * d, (heads + kv) * hd * d] } else { [0, 0, 0] };
        assert_eq!(starts, want, "rows of q, k and v in one buffer only when shared");
        let rope = rms.then_some((&cos, &sin));
        // Op-by-op reference.
        let reference = |x: &Tensor| -> Tensor {
            let n = match &blk.norm {
                BlockNorm::Rms { weight, eps } => ops::rms_norm(x, weight, *eps).unwrap(),
                BlockNorm::Layer { weight, bias, eps } => ops::layer_norm(x, weight, bias, *eps).unwrap(),
            };
            let mut q = blk.q.forward(&n).unwrap().reshape((b, t, heads, hd)).unwrap();
            let mut k = blk.k.forward(&n).unwrap().reshape((b, t, kv, hd)).unwrap();
            let v = blk.v.forward(&n).unwrap().reshape((b, t, kv, hd)).unwrap();
            if let Some((c, s)) = rope {
                q = ops::rope(&q, c, s).unwrap();
                k = ops::rope(&k, c, s).unwrap();
            }
            let o = ops::attention_reference(
                &q,
                &k,
                &v,
                AttentionOpts { scale: 0.5, causal_offset: rms.then_some(0), ..Default::default() },
            )
            .unwrap();
            (x + blk.o.forward(&o.reshape((b, t, heads * hd)).unwrap()).unwrap()).unwrap()
        };
        assert!(max_abs_err(&blk.forward(&x, rope).unwrap(), &reference(&x)) < 1e-12);
        check_grads(&format!("attention block rms={rms} shared={shared}"), std::slice::from_ref(&x), &[true], &|t| {
            weighted_sum(&blk.forward(&t[0], rope).unwrap(), &r)
        });
    }
}
