//! Activations and gated activations (SwiGLU, GeGLU) with backward passes.

use super::{Real, cpu_slice, dispatch, fast_path, tensor_from_vec, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The activations found in the supported checkpoints, named as in their `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    /// Exact GELU (`gelu` in transformers).
    Gelu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (CLIP's `quick_gelu`).
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            _ => return None,
        })
    }

    #[inline(always)]
    pub(crate) fn f<T: Real>(self, x: T) -> T {
        let one = T::one();
        let half = T::from(0.5).unwrap();
        match self {
            Self::Silu => x / (one + (-x).fast_exp()),
            Self::Gelu => half * x * (one + (x / T::from(std::f64::consts::SQRT_2).unwrap()).erf()),
            Self::GeluTanh => {
                let c = T::from(0.7978845608028654).unwrap();
                let k = T::from(0.044715).unwrap();
                half * x * (one + (c * (x + k * x * x * x)).tanh())
            }
            Self::QuickGelu => x / (one + (-(T::from(1.702).unwrap()) * x).fast_exp()),
            Self::Relu => super::fmax(x, T::zero()),
        }
    }

    #[inline(always)]
    pub(crate) fn df<T: Real>(self, x: T) -> T {
        let one = T::one();
        let half = T::from(0.5).unwrap();
        match self {
            Self::Silu => {
                let s = one / (one + (-x).fast_exp());
                s * (one + x * (one - s))
            }
            Self::Gelu => {
                let cdf = half * (one + (x / T::from(std::f64::consts::SQRT_2).unwrap()).erf());
                let pdf = (-half * x * x).exp() * T::from(0.3989422804014327).unwrap();
                cdf + x * pdf
            }
            Self::GeluTanh => {
                let c = T::from(0.7978845608028654).unwrap();
                let k = T::from(0.044715).unwrap();
                let t = (c * (x + k * x * x * x)).tanh();
                half * (one + t) + half * x * (one - t * t) * c * (one + T::from(3.0).unwrap() * k * x * x)
            }
            Self::QuickGelu => {
                let a = T::from(1.702).unwrap();
                let s = one / (one + (-a * x).fast_exp());
                s * (one + a * x * (one - s))
            }
            Self::Relu => {
                if x > T::zero() {
                    one
                } else {
                    T::zero()
                }
            }
        }
    }

    /// `out = act(g) ∘ u`, with the activation chosen once outside the loop so that the loop
    /// vectorises.
    pub(crate) fn gated_rows<T: Real>(self, g: &[T], u: &[T], out: &mut [T]) {
        match self {
            Self::Silu => {
                let one = T::one();
                for ((o, &x), &v) in out.iter_mut().zip(g).zip(u) {
                    *o = x / (one + (-x).fast_exp()) * v;
                }
            }
            a => {
                for ((o, &x), &v) in out.iter_mut().zip(g).zip(u) {
                    *o = a.f(x) * v;
                }
            }
        }
    }

    /// The gradients of `act(g) ∘ u` given `d`: `dg = d ∘ u ∘ act'(g)`, `du = d ∘ act(g)` (for
    /// SiLU from one sigmoid per element).
    pub(crate) fn gated_grad_rows<T: Real>(self, g: &[T], u: &[T], d: &[T], dg: &mut [T], du: &mut [T]) {
        let n = g.len().min(u.len()).min(d.len()).min(dg.len()).min(du.len());
        let (g, u, d, dg, du) = (&g[..n], &u[..n], &d[..n], &mut dg[..n], &mut du[..n]);
        match self {
            Self::Silu => {
                let one = T::one();
                for i in 0..n {
                    let x = g[i];
                    let s = one / (one + (-x).fast_exp());
                    du[i] = d[i] * x * s;
                    dg[i] = d[i] * u[i] * s * (one + x * (one - s));
                }
            }
            a => {
                for i in 0..n {
                    du[i] = d[i] * a.f(g[i]);
                    dg[i] = d[i] * u[i] * a.df(g[i]);
                }
            }
        }
    }

    /// `s · act(a) ∘ mask` (the memory branch's weights), with the mask chosen once outside
    /// the loop, and SiLU (MemVP's activation) given a loop of its own that vectorises; the
    /// others match per element, as in [`Activation::f`].
    pub(crate) fn scaled<T: Real>(self, a: &[T], mask: Option<&[T]>, s: T) -> Vec<T> {
        fn go<T: Real>(a: &[T], mask: Option<&[T]>, s: T, f: impl Fn(T) -> T) -> Vec<T> {
            match mask {
                Some(mk) => a.iter().zip(mk).map(|(&x, &w)| s * f(x) * w).collect(),
                None => a.iter().map(|&x| s * f(x)).collect(),
            }
        }
        match self {
            Self::Silu => go(a, mask, s, |x| Self::Silu.f(x)),
            act => go(a, mask, s, move |x| act.f(x)),
        }
    }

    /// `da ← da · s · mask ∘ act'(a)` (the memory branch's backward through its weights).
    pub(crate) fn scale_grad<T: Real>(self, a: &[T], mask: Option<&[T]>, s: T, da: &mut [T]) {
        fn go<T: Real>(a: &[T], mask: Option<&[T]>, s: T, da: &mut [T], df: impl Fn(T) -> T) {
            match mask {
                Some(mk) => {
                    for ((d, &x), &w) in da.iter_mut().zip(a).zip(mk) {
                        *d = *d * s * w * df(x);
                    }
                }
                None => {
                    for (d, &x) in da.iter_mut().zip(a) {
                        *d = *d * s * df(x);
                    }
                }
            }
        }
        match self {
            Self::Silu => go(a, mask, s, da, |x| Self::Silu.df(x)),
            act => go(a, mask, s, da, move |x| act.df(x)),
        }
    }

    /// Composite candle version, for devices without the custom kernels.
    pub(crate) fn candle(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Self::Relu => x.relu(),
        }
    }
}

const CHUNK: usize = 4096;

struct Act(Activation);

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "memvp-activation"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(a: Activation, x: &[T]) -> Vec<T> {
            let mut y = vec![T::zero(); x.len()];
            y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).with_min_len(super::min_rows(CHUNK)).for_each(
                |(yc, xc)| {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = a.f(v);
                    }
                },
            );
            y
        }
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(go(self.0, cpu_slice::<f32>(s, l)?)),
            DType::F64 => f64::to_cpu_storage_owned(go(self.0, cpu_slice::<f64>(s, l)?)),
            dt => bail!("activation: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        fn go<T: Real>(a: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(dy, |g| {
                    let mut dx = vec![T::zero(); xs.len()];
                    dx.par_chunks_mut(CHUNK)
                        .zip(xs.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                        .with_min_len(super::min_rows(CHUNK))
                        .for_each(|(dc, (xc, gc))| {
                            for ((o, &v), &gv) in dc.iter_mut().zip(xc).zip(gc) {
                                *o = gv * a.df(v);
                            }
                        });
                    tensor_from_vec(dx, x.dims(), x)
                })
            })
        }
        Ok(Some(match x.dtype() {
            DType::F32 => go::<f32>(self.0, x, dy)?,
            DType::F64 => go::<f64>(self.0, x, dy)?,
            dt => bail!("activation: unsupported dtype {dt:?}"),
        }))
    }
}

/// `act(x)`, differentiable.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    dispatch(fast_path(x), [x], Tensor::contiguous, || Ok((Act(act), true)), || act.candle(x))
}

struct Gated(Activation);

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "memvp-gated-activation"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(a: Activation, g: &[T], u: &[T]) -> Vec<T> {
            let mut y = vec![T::zero(); g.len()];
            y.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .with_min_len(super::min_rows(CHUNK))
                .for_each(|(yc, (gc, uc))| a.gated_rows(gc, uc, yc));
            y
        }
        if l1.shape() != l2.shape() {
            bail!("gated activation: shapes {:?} and {:?} differ", l1.dims(), l2.dims())
        }
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(go(self.0, cpu_slice::<f32>(s1, l1)?, cpu_slice::<f32>(s2, l2)?)),
            DType::F64 => f64::to_cpu_storage_owned(go(self.0, cpu_slice::<f64>(s1, l1)?, cpu_slice::<f64>(s2, l2)?)),
            dt => bail!("gated activation: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn go<T: Real>(a: Activation, g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
            with_slice::<T, _>(g, |gs| {
                with_slice::<T, _>(u, |us| {
                    with_slice::<T, _>(dy, |dys| {
                        let n = gs.len();
                        let (mut dg, mut du) = (vec![T::zero(); n], vec![T::zero(); n]);
                        dg.par_chunks_mut(CHUNK)
                            .zip(du.par_chunks_mut(CHUNK))
                            .with_min_len(super::min_rows(CHUNK))
                            .enumerate()
                            .for_each(|(c, (dgc, duc))| {
                                let r = c * CHUNK..c * CHUNK + dgc.len();
                                a.gated_grad_rows(&gs[r.clone()], &us[r.clone()], &dys[r], dgc, duc);
                            });
                        Ok((Some(tensor_from_vec(dg, g.dims(), g)?), Some(tensor_from_vec(du, u.dims(), u)?)))
                    })
                })
            })
        }
        match g.dtype() {
            DType::F32 => go::<f32>(self.0, g, u, dy),
            DType::F64 => go::<f64>(self.0, g, u, dy),
            dt => bail!("gated activation: unsupported dtype {dt:?}"),
        }
    }
}

/// `act(gate) * up` (SwiGLU for LLaMA, GeGLU for T5 v1.1), differentiable.
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    dispatch(fast_path(gate), [gate, up], Tensor::contiguous, || Ok((Gated(act), true)), || act.candle(gate)?.mul(up))
}

/// e^x in f32 as inline arithmetic (Cephes' `expf`: x = n ln 2 + r with ln 2 in two parts, a
/// degree-6 polynomial in r, 2^n put into the exponent bits), so that loops over activations
/// and softmax rows vectorise instead of calling libm per element. Within 2 ulp of libm's
/// `expf` on [-87.3, 88.3]; 0 below (where libm's result is subnormal or 0, and where a masked
/// score of -inf must give exactly 0), about 2e38 above (SiLU and sigmoids then reach the same
/// limits as with libm's inf); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is an integer in [-126, 127] here, so 2^n is a normal f32. Its exponent bits come from
    // the shifted sum's low mantissa bits (ROUND + n is exact: its ulp is 1), integer work that
    // vectorises where a float-to-int cast would not.
    let biased = shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let e = y * f32::from_bits(biased << 23);
    if below { 0.0 } else { e }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_exp_is_within_2_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x), x.exp());
            let ulp = (want.to_bits() as i64 - got.to_bits() as i64).unsigned_abs() as f32;
            worst = worst.max(ulp);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(1000.0) > 1e38 && exp_f32(1000.0).is_finite());
    }

    #[test]
    fn silu_gradients_from_one_sigmoid_equal_the_two_formulas() {
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 40.0).collect();
        let u: Vec<f32> = g.iter().map(|v| 0.5 - v / 7.0).collect();
        let d: Vec<f32> = g.iter().map(|v| 1.0 + v / 3.0).collect();
        let (mut dg, mut du) = (vec![0f32; 1000], vec![0f32; 1000]);
        Activation::Silu.gated_grad_rows(&g, &u, &d, &mut dg, &mut du);
        for i in 0..1000 {
            let a = Activation::Silu;
            let (wg, wu) = (d[i] * u[i] * a.df(g[i]), d[i] * a.f(g[i]));
            assert!((dg[i] - wg).abs() <= 1e-6 * (1.0 + wg.abs()), "dg at {}: {} vs {wg}", g[i], dg[i]);
            assert!((du[i] - wu).abs() <= 1e-6 * (1.0 + wu.abs()), "du at {}: {} vs {wu}", g[i], du[i]);
        }
    }
}
