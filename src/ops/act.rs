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

    #[inline]
    pub(crate) fn f<T: Real>(self, x: T) -> T {
        let one = T::one();
        let half = T::from(0.5).unwrap();
        match self {
            Self::Silu => x / (one + (-x).exp()),
            Self::Gelu => half * x * (one + (x / T::from(std::f64::consts::SQRT_2).unwrap()).erf()),
            Self::GeluTanh => {
                let c = T::from(0.7978845608028654).unwrap();
                let k = T::from(0.044715).unwrap();
                half * x * (one + (c * (x + k * x * x * x)).tanh())
            }
            Self::QuickGelu => x / (one + (-(T::from(1.702).unwrap()) * x).exp()),
            Self::Relu => super::fmax(x, T::zero()),
        }
    }

    #[inline]
    pub(crate) fn df<T: Real>(self, x: T) -> T {
        let one = T::one();
        let half = T::from(0.5).unwrap();
        match self {
            Self::Silu => {
                let s = one / (one + (-x).exp());
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
                let s = one / (one + (-a * x).exp());
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
                .for_each(|(yc, (gc, uc))| {
                    for ((o, &gv), &uv) in yc.iter_mut().zip(gc).zip(uc) {
                        *o = a.f(gv) * uv;
                    }
                });
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
                                let o = c * CHUNK;
                                for i in 0..dgc.len() {
                                    let (gv, uv, d) = (gs[o + i], us[o + i], dys[o + i]);
                                    dgc[i] = d * uv * a.df(gv);
                                    duc[i] = d * a.f(gv);
                                }
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
