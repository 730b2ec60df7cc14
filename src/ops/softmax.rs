//! Softmax over the last dimension with a backward pass.

use super::{Real, cpu_slice, dispatch, fast_path, tensor_from_vec, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

struct Softmax;

pub(crate) fn softmax_rows<T: Real>(x: &[T], y: &mut [T], n: usize) {
    y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(super::min_rows(n)).for_each(|(yr, xr)| {
        let max = super::row_max(xr);
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = (v - max).fast_exp();
        }
        let sum = super::row_sum(yr);
        let inv = T::one() / sum;
        for o in yr.iter_mut() {
            *o *= inv;
        }
    });
}

/// dx = y * (dy - <dy, y>) row by row.
pub(crate) fn softmax_rows_bwd<T: Real>(y: &[T], dy: &[T], dx: &mut [T], n: usize, scale: T) {
    dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).with_min_len(super::min_rows(n)).for_each(
        |(dxr, (yr, dyr))| {
            let dot = super::dot(yr, dyr);
            for ((o, &a), &b) in dxr.iter_mut().zip(yr).zip(dyr) {
                *o = scale * a * (b - dot);
            }
        },
    );
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "memvp-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1);
        fn go<T: Real>(s: &CpuStorage, l: &Layout, n: usize) -> Result<CpuStorage> {
            let x = cpu_slice::<T>(s, l)?;
            let mut y = vec![T::zero(); x.len()];
            softmax_rows(x, &mut y, n);
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = match s.dtype() {
            DType::F32 => go::<f32>(s, l, n)?,
            DType::F64 => go::<f64>(s, l, n)?,
            dt => bail!("softmax: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = res.dim(candle_core::D::Minus1)?;
        fn go<T: Real>(res: &Tensor, grad: &Tensor, n: usize) -> Result<Tensor> {
            with_slice::<T, _>(res, |y| {
                with_slice::<T, _>(grad, |dy| {
                    let mut dx = vec![T::zero(); y.len()];
                    softmax_rows_bwd(y, dy, &mut dx, n, T::one());
                    tensor_from_vec(dx, res.dims(), res)
                })
            })
        }
        let dx = match res.dtype() {
            DType::F32 => go::<f32>(res, grad, n)?,
            DType::F64 => go::<f64>(res, grad, n)?,
            dt => bail!("softmax: unsupported dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    dispatch(
        fast_path(x),
        [x],
        Tensor::contiguous,
        || Ok((Softmax, true)),
        || {
            if super::generic::fused_dtype(x) {
                return super::generic::softmax_last_dim(x);
            }
            candle_nn::ops::softmax(x, candle_core::D::Minus1)
        },
    )
}
