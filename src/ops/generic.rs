//! The device-generic path: what the kernels compute, for any candle device (CUDA, Metal), as
//! candle tensor ops — with a backward that, like the CPU kernels', computes only the gradients
//! that can reach a trained tensor.
//!
//! The forward runs on a detached input, so candle records nothing of it; [`attach`] then joins
//! the result to the input's graph through a custom op whose forward is a copy and whose
//! backward is the given input-gradient formula. A frozen linear thus costs one matrix product
//! forward and one backward (`dx = dy W`), never the weight gradient `xᵀ dy` that candle's
//! matmul backward forms; norms and softmax use candle's fused forward kernels, which have no
//! backward of their own. On the CPU the same path is taken when [`force_generic`] is on: the
//! tests and `memvp device-check --device cpu` compare it with the CPU kernels.

use super::weight::Weight;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Storage, Tensor, bail};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static FORCE: AtomicBool = AtomicBool::new(false);

/// Makes the CPU take the device-generic path too (tests, `device-check`).
pub fn force_generic(on: bool) {
    FORCE.store(on, Ordering::Relaxed);
}

pub(crate) fn forced() -> bool {
    FORCE.load(Ordering::Relaxed)
}

/// The input gradient from the output gradient and the output.
type InputGrad = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Joins a value computed off the graph to an input's graph. The value is handed over in the op
/// and taken out by the forward, so the graph keeps only the result (and the input), not a
/// second copy of every output until the backward.
struct Attach {
    value: Mutex<Option<Tensor>>,
    grad: InputGrad,
}

impl Attach {
    /// The value's storage, cloned (the value is a fresh result, contiguous from offset 0, so
    /// cloning its storage is the whole forward), by `pick` for the device's storage type.
    fn take<S>(
        &self,
        pick: impl FnOnce(&Storage) -> Option<&S>,
        clone: impl FnOnce(&S, &Layout) -> Result<S>,
    ) -> Result<(S, Shape)> {
        let y = self
            .value
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach: forward ran twice".into()))?;
        let (st, l) = y.storage_and_layout();
        if !l.is_contiguous() || l.start_offset() != 0 {
            bail!("attach: the value must be contiguous from offset 0 (strides {:?})", l.stride());
        }
        let s = pick(&st)
            .ok_or_else(|| candle_core::Error::Msg("attach: the value is on another device than the input".into()))?;
        Ok((clone(s, l)?, l.shape().clone()))
    }
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        "memvp-attach"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.take(|s| if let Storage::Cpu(c) = s { Some(c) } else { None }, |s, l| s.try_clone(l))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.take(|s| if let Storage::Cuda(c) = s { Some(c) } else { None }, |s, l| s.try_clone(l))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, _: &candle_core::MetalStorage, _: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        self.take(|s| if let Storage::Metal(c) = s { Some(c) } else { None }, |s, l| s.try_clone(l))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.grad)(dy, res)?))
    }
}

/// `y` (computed from `x.detach()`) with `x`'s graph behind it: backward maps the output
/// gradient to `grad(dy, y)`. Untracked `x`: `y` itself.
pub(crate) fn attach(x: &Tensor, y: Tensor, grad: InputGrad) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    let y = y.contiguous()?;
    let y = if y.layout().start_offset() == 0 { y } else { y.copy()? };
    x.apply_op1(Attach { value: Mutex::new(Some(y)), grad })
}

/// `x Wᵀ + b` with `W: [out, in]` frozen, computed in the weight's dtype (bf16 weights on a GPU:
/// tensor-core products with f32 accumulation) and returned in `x`'s. llama.cpp blocks are
/// decoded for the product and decoded again in backward, so that no f32 copy of a quantized
/// matrix lives from the forward to the backward.
pub(crate) fn linear(x: &Tensor, weight: &Weight, b: Option<&Tensor>) -> Result<Tensor> {
    let xdt = x.dtype();
    // One [rows, in] x [in, out] product (a single GEMM, not a batch of them).
    let rows2d = |t: &Tensor| -> Result<Tensor> {
        let k = t.dim(D::Minus1)?;
        t.reshape((t.elem_count() / k, k))
    };
    let back = |y: Tensor, like: &Tensor, n: usize| -> Result<Tensor> {
        let mut dims = like.dims().to_vec();
        *dims.last_mut().unwrap() = n;
        y.reshape(dims)
    };
    let w = weight.native()?;
    let (n, k) = w.dims2()?;
    let wdt = w.dtype();
    let y = back(rows2d(&x.detach())?.to_dtype(wdt)?.matmul(&w.t()?)?.to_dtype(xdt)?, x, n)?;
    drop(w);
    let y = match b {
        Some(b) => y.broadcast_add(&b.to_dtype(xdt)?)?,
        None => y,
    };
    let weight = weight.clone();
    attach(
        x,
        y,
        Box::new(move |dy, _| {
            let w = weight.native()?;
            back(rows2d(dy)?.to_dtype(w.dtype())?.matmul(&w)?.to_dtype(xdt)?, dy, k)
        }),
    )
}

/// `x / sqrt(mean(x²) + eps) · w` (last dimension): candle's fused forward; backward
/// `dx = r (g - x̂ · mean(g x̂))` with `g = dy · w`, `x̂ = x r`, `r = 1 / rms`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let y = candle_nn::ops::rms_norm(&xd, &w.to_dtype(x.dtype())?, eps as f32)?;
    let w = w.clone();
    attach(
        x,
        y,
        Box::new(move |dy, _| {
            let r = (xd.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let xh = xd.broadcast_mul(&r)?;
            let g = dy.broadcast_mul(&w.to_dtype(dy.dtype())?)?;
            let m = (&g * &xh)?.mean_keepdim(D::Minus1)?;
            (g - xh.broadcast_mul(&m)?)?.broadcast_mul(&r)
        }),
    )
}

/// LayerNorm (last dimension): candle's fused forward; backward
/// `dx = r (g - mean(g) - x̂ · mean(g x̂))` with `g = dy · w`.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let dt = x.dtype();
    let y = candle_nn::ops::layer_norm(&xd, &w.to_dtype(dt)?, &b.to_dtype(dt)?, eps as f32)?;
    let w = w.clone();
    attach(
        x,
        y,
        Box::new(move |dy, _| {
            let mean = xd.mean_keepdim(D::Minus1)?;
            let xc = xd.broadcast_sub(&mean)?;
            let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let xh = xc.broadcast_mul(&r)?;
            let g = dy.broadcast_mul(&w.to_dtype(dy.dtype())?)?;
            let mg = g.mean_keepdim(D::Minus1)?;
            let mgx = (&g * &xh)?.mean_keepdim(D::Minus1)?;
            (g.broadcast_sub(&mg)? - xh.broadcast_mul(&mgx)?)?.broadcast_mul(&r)
        }),
    )
}

/// Softmax over the last dimension: candle's fused forward; backward `dx = y (dy - Σ dy y)`.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    attach(
        x,
        y,
        Box::new(|dy, y| {
            let s = (dy * y)?.sum_keepdim(D::Minus1)?;
            y * dy.broadcast_sub(&s)?
        }),
    )
}

/// Whether candle's fused forwards cover this dtype (they do f32, f16, bf16; f64 only on CPU).
pub(crate) fn fused_dtype(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) || t.device().is_cpu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::rng::Rng::new(seed);
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| r.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Value and input gradient of `f` (a weighted sum of its output, so every output element
    /// matters) at `x`.
    fn value_and_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let w = randn(y.dims(), 99);
        let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn generic_ops_match_candle_autograd() {
        let x = randn(&[2, 5, 16], 1);
        let w = ((randn(&[16], 2) * 0.1).unwrap() + 1.0).unwrap();
        let b = randn(&[16], 9);
        let lw = randn(&[24, 16], 3);
        let lwd = Weight::Dense(lw.clone());
        let lb = randn(&[24], 4);
        type F<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;
        let cases: Vec<(&str, F, F)> = vec![
            (
                "linear",
                Box::new(|x| linear(x, &lwd, Some(&lb))),
                Box::new(|x| x.broadcast_matmul(&lw.t()?)?.broadcast_add(&lb)),
            ),
            (
                "rms_norm",
                Box::new(|x| rms_norm(x, &w, 1e-5)),
                Box::new(|x| x.broadcast_div(&(x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?)?.broadcast_mul(&w)),
            ),
            (
                "layer_norm",
                Box::new(|x| layer_norm(x, &w, &b, 1e-5)),
                Box::new(|x| {
                    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(&w)?.broadcast_add(&b)
                }),
            ),
            ("softmax", Box::new(softmax_last_dim), Box::new(|x| candle_nn::ops::softmax(x, D::Minus1))),
        ];
        for (name, ours, reference) in &cases {
            let (y, g) = value_and_grad(&x, ours);
            let (yr, gr) = value_and_grad(&x, reference);
            let (dy, dg) = (max_diff(&y, &yr), max_diff(&g, &gr));
            assert!(dy < 1e-5 && dg < 1e-4, "{name}: value off by {dy}, input gradient by {dg}");
        }
    }

    /// llama.cpp blocks on the generic path: the product and the input gradient are those of
    /// the decoded matrix (decoded once for forward and once again for backward).
    #[test]
    fn generic_linear_on_quantized_blocks_is_the_decoded_product() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let w = randn(&[24, 64], 11);
        let q = Weight::Quant(std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()));
        let dense = q.to_dense(DType::F32).unwrap();
        let x = randn(&[2, 3, 64], 12);
        let (y, g) = value_and_grad(&x, |x| linear(x, &q, None));
        let (yr, gr) = value_and_grad(&x, |x| x.broadcast_matmul(&dense.t()?));
        let (dy, dg) = (max_diff(&y, &yr), max_diff(&g, &gr));
        assert!(dy < 1e-4 && dg < 1e-4, "value off by {dy}, input gradient by {dg}");
    }

    /// The point of the generic path: backward never forms a frozen weight's gradient, where
    /// candle's matmul backward does (and norms' weights get none either).
    #[test]
    fn generic_backward_forms_no_frozen_weight_gradient() {
        let x = Var::from_tensor(&randn(&[3, 16], 5)).unwrap();
        let w = randn(&[8, 16], 6);
        let wd = Weight::Dense(w.clone());
        let nw = (randn(&[8], 7) + 1.0).unwrap();
        // Gradients shaped like W or Wᵀ (x is [3, 16], y [3, 8]): weight gradients.
        let weight_grads = |g: &candle_core::backprop::GradStore| {
            g.get_ids().filter(|id| matches!(g.get_id(**id).unwrap().dims(), [8, 16] | [16, 8])).count()
        };
        let g = rms_norm(&linear(x.as_tensor(), &wd, None).unwrap(), &nw, 1e-5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert_eq!(weight_grads(&g), 0, "the generic path formed a frozen weight's gradient");
        assert!(g.get(&nw).is_none(), "the generic path formed the norm weight's gradient");
        let g = x.as_tensor().matmul(&w.t().unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(weight_grads(&g) > 0, "candle's matmul backward no longer forms the weight gradient: update the docs");
        // Untracked input: the plain value, no graph node.
        assert!(!linear(&randn(&[3, 16], 8), &wd, None).unwrap().track_op());
    }
}
