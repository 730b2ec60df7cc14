//! A frozen feed-forward block as one op: `down(act(x W1ᵀ + b1) [∘ (x W2ᵀ + b2)]) + bd`
//! (SwiGLU / GeGLU when gated, plain MLP otherwise). Forward and backward are a handful of
//! matrix products and one elementwise sweep, with no graph nodes in between: the backward
//! forms the input gradient only, and no intermediate gradient is accumulated through candle.

use super::linear::{linear_input_grad, linear_input_grad_cat, linear_rows, linear_rows_cat};
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
    F32(Vec<f32>),
    F64(Vec<f64>),
}

struct MlpOp {
    mlp: FrozenMlp,
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

impl FrozenMlp {
    /// The layers that read the block's input: w1, and w2 when gated.
    fn inputs(&self) -> Vec<&Linear> {
        std::iter::once(&self.w1).chain(&self.w2).collect()
    }
}

/// (h, y) for rows `x [m, d]`: `h [m, inter]` is x W1ᵀ, or `[m, 2·inter]` with x W2ᵀ beside it
/// when gated (one product when the two weights share storage).
fn fwd<T: Real>(op: &MlpOp, x: &[T], m: usize) -> Result<(Vec<T>, Vec<T>)> {
    let p = &op.mlp;
    let inter = p.w1.out_features();
    let h = linear_rows_cat(&p.inputs(), x, m)?;
    let gated = p.w2.is_some();
    let width = if gated { 2 * inter } else { inter };
    let mut a = vec![T::zero(); m * inter];
    let act = p.act;
    // A zero-width FFN (rayon's chunks cannot be empty) has nothing to activate.
    a.par_chunks_mut(inter.max(1)).zip(h.par_chunks(width.max(1))).with_min_len(super::min_rows(inter)).for_each(
        |(ar, hr)| {
            if gated {
                let (g, u) = hr.split_at(inter);
                act.gated_rows(g, u, ar);
            } else {
                for j in 0..inter {
                    ar[j] = act.f(hr[j]);
                }
            }
        },
    );
    let y = linear_rows(&p.down, &a, m)?;
    Ok((h, y))
}

/// dx from dy, given the saved pre-activations `h`.
fn bwd<T: Real>(op: &MlpOp, h: &[T], dy: &[T], m: usize) -> Result<Vec<T>> {
    let p = &op.mlp;
    let (inter, d) = p.w1.weight.dims2()?;
    // da = dy · Wd   ([m, d] · [d, inter])
    let mut da = vec![T::zero(); m * inter];
    linear_input_grad(&p.down, dy, m, &mut da, false)?;
    let act = p.act;
    let width = if p.w2.is_some() { 2 * inter } else { inter };
    // dh = [dh1 dh2] per row (dh1 alone when not gated), laid out like h.
    let mut dh = vec![T::zero(); m * width];
    dh.par_chunks_mut(width.max(1))
        .zip(h.par_chunks(width.max(1)))
        .zip(da.par_chunks(inter.max(1)))
        .with_min_len(super::min_rows(inter))
        .for_each(|((dr, hr), a)| {
            if width > inter {
                let (g, u) = hr.split_at(inter);
                let (d1, d2) = dr.split_at_mut(inter);
                act.gated_grad_rows(g, u, a, d1, d2);
            } else {
                for j in 0..inter {
                    dr[j] = a[j] * act.df(hr[j]);
                }
            }
        });
    drop(da);
    // dx = [dh1 dh2] [W1; W2]   ([m, width] · [width, d])
    let mut dx = vec![T::zero(); m * d];
    linear_input_grad_cat(&p.inputs(), &dh, m, &mut dx, false)?;
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
                let (h, y) = fwd::<f32>(self, cpu_slice(s, l)?, m)?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(Saved::F32(h));
                }
                f32::to_cpu_storage_owned(y)
            }
            DType::F64 => {
                let (h, y) = fwd::<f64>(self, cpu_slice(s, l)?, m)?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(Saved::F64(h));
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
            (DType::F32, Some(Saved::F32(h))) => {
                let v = with_slice::<f32, _>(dy, |g| bwd(self, h, g, m))?;
                Tensor::from_vec(v, x.dims(), x.device())?
            }
            (DType::F64, Some(Saved::F64(h))) => {
                let v = with_slice::<f64, _>(dy, |g| bwd(self, h, g, m))?;
                Tensor::from_vec(v, x.dims(), x.device())?
            }
            (dt, _) => bail!("mlp backward: no saved activations for dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}

impl FrozenMlp {
    /// The gate and up weights as views of one buffer, so that the fused op runs their
    /// products as one.
    pub fn share_storage(mut self) -> Result<Self> {
        if let Some(w2) = &mut self.w2 {
            super::linear::share_storage(&mut [&mut self.w1, w2])?;
        }
        Ok(self)
    }

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
