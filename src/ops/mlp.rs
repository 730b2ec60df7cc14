//! A frozen feed-forward block as one op: `down(act(x W1ᵀ + b1) [∘ (x W2ᵀ + b2)]) + bd`
//! (SwiGLU / GeGLU when gated, plain MLP otherwise). Forward and backward are a handful of
//! matrix products and one elementwise sweep, with no graph nodes in between: the backward
//! forms the input gradient only, and no intermediate gradient is accumulated through candle.

use super::linear::{linear_input_grad, linear_rows};
use super::{Activation, Linear, Real, cpu_slice, dispatch, fast_path, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;
use std::sync::Mutex;

#[derive(Clone, Debug)]
pub struct FrozenMlp {
    /// `[inter, d]`: gate (gated) or fc1.
    pub w1: Linear,
    /// `[inter, d]`: up projection of a gated FFN.
    pub w2: Option<Linear>,
    /// `[d, inter]`.
    pub down: Linear,
    pub act: Activation,
}

enum Saved {
    F32(Vec<f32>, Vec<f32>),
    F64(Vec<f64>, Vec<f64>),
}

struct MlpOp {
    mlp: FrozenMlp,
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// (h1, h2, y) for rows `x [m, d]`.
fn fwd<T: Real>(op: &MlpOp, x: &[T], m: usize) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let p = &op.mlp;
    let inter = p.w1.out_features();
    let h1 = linear_rows(&p.w1, x, m)?;
    let h2 = match &p.w2 {
        Some(l) => linear_rows(l, x, m)?,
        None => Vec::new(),
    };
    let mut a = vec![T::zero(); m * inter];
    let act = p.act;
    let gated = !h2.is_empty();
    a.par_chunks_mut(inter).enumerate().with_min_len(super::min_rows(inter)).for_each(|(r, ar)| {
        let g = &h1[r * inter..(r + 1) * inter];
        if gated {
            let u = &h2[r * inter..(r + 1) * inter];
            for j in 0..inter {
                ar[j] = act.f(g[j]) * u[j];
            }
        } else {
            for j in 0..inter {
                ar[j] = act.f(g[j]);
            }
        }
    });
    let y = linear_rows(&p.down, &a, m)?;
    Ok((h1, h2, y))
}

/// dx from dy, given the saved pre-activations.
fn bwd<T: Real>(op: &MlpOp, h1: &[T], h2: &[T], dy: &[T], m: usize) -> Result<Vec<T>> {
    let p = &op.mlp;
    let (inter, d) = p.w1.weight.dims2()?;
    // da = dy · Wd   ([m, d] · [d, inter])
    let mut da = vec![T::zero(); m * inter];
    linear_input_grad(&p.down, dy, m, &mut da, false)?;
    let gated = !h2.is_empty();
    let act = p.act;
    let mut dh2 = if gated { vec![T::zero(); m * inter] } else { Vec::new() };
    // da becomes dh1 in place.
    if gated {
        da.par_chunks_mut(inter)
            .zip(dh2.par_chunks_mut(inter))
            .enumerate()
            .with_min_len(super::min_rows(inter))
            .for_each(|(r, (a, b))| {
                let (g, u) = (&h1[r * inter..(r + 1) * inter], &h2[r * inter..(r + 1) * inter]);
                for j in 0..inter {
                    let dv = a[j];
                    b[j] = dv * act.f(g[j]);
                    a[j] = dv * u[j] * act.df(g[j]);
                }
            });
    } else {
        da.par_chunks_mut(inter).enumerate().with_min_len(super::min_rows(inter)).for_each(|(r, a)| {
            let g = &h1[r * inter..(r + 1) * inter];
            for j in 0..inter {
                a[j] *= act.df(g[j]);
            }
        });
    }
    // dx = dh1 · W1 (+ dh2 · W2)   ([m, inter] · [inter, d])
    let mut dx = vec![T::zero(); m * d];
    linear_input_grad(&p.w1, &da, m, &mut dx, false)?;
    if let Some(l) = &p.w2 {
        linear_input_grad(l, &dh2, m, &mut dx, true)?;
    }
    Ok(dx)
}

impl CustomOp1 for MlpOp {
    fn name(&self) -> &'static str {
        "memvp-frozen-mlp"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.mlp.w1.weight.dims()[1];
        let m = l.shape().elem_count() / d;
        let out = match s.dtype() {
            DType::F32 => {
                let (h1, h2, y) = fwd::<f32>(self, cpu_slice(s, l)?, m)?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(Saved::F32(h1, h2));
                }
                f32::to_cpu_storage_owned(y)
            }
            DType::F64 => {
                let (h1, h2, y) = fwd::<f64>(self, cpu_slice(s, l)?, m)?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(Saved::F64(h1, h2));
                }
                f64::to_cpu_storage_owned(y)
            }
            dt => bail!("mlp: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let d = self.mlp.w1.weight.dims()[1];
        let m = x.elem_count() / d;
        // Kept (not taken) so that a graph can be differentiated more than once.
        let saved = self.saved.lock().unwrap();
        let dx = match (x.dtype(), saved.as_ref()) {
            (DType::F32, Some(Saved::F32(h1, h2))) => {
                let v = with_slice::<f32, _>(dy, |g| bwd(self, h1, h2, g, m))?;
                Tensor::from_vec(v, x.dims(), x.device())?
            }
            (DType::F64, Some(Saved::F64(h1, h2))) => {
                let v = with_slice::<f64, _>(dy, |g| bwd(self, h1, h2, g, m))?;
                Tensor::from_vec(v, x.dims(), x.device())?
            }
            (dt, _) => bail!("mlp backward: no saved activations for dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}

impl FrozenMlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let plain = |l: &Linear| l.kernel_ready();
        let fusable = fast_path(x)
            && !super::linear::candle_matmul_on()
            && plain(&self.w1)
            && plain(&self.down)
            && self.w2.as_ref().is_none_or(plain);
        dispatch(
            fusable,
            [x],
            Tensor::contiguous,
            || {
                let op = MlpOp { mlp: self.clone(), keep: x.track_op(), saved: Mutex::new(None) };
                let keep = op.keep;
                Ok((op, keep))
            },
            || {
                let h1 = self.w1.forward(x)?;
                let a = match &self.w2 {
                    Some(l) => super::gated(&h1, &l.forward(x)?, self.act)?,
                    None => super::activation(&h1, self.act)?,
                };
                self.down.forward(&a)
            },
        )
    }
}
