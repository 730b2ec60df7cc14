//! RMSNorm (LLaMA, T5) and LayerNorm (CLIP, BART) with backward passes. The weight and bias
//! gradients are only computed when those tensors are being trained.

use super::{Real, cpu_slice, dispatch, fast_path, tensor_from_vec, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

struct RmsNorm {
    eps: f64,
}

pub(crate) fn rms_fwd<T: Real>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let n = w.len();
    let mut y = vec![T::zero(); x.len()];
    let nf = T::from(n).unwrap();
    y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(super::min_rows(n)).for_each(|(yr, xr)| {
        let ms = super::dot(xr, xr) / nf;
        let r = T::one() / (ms + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    });
    y
}

/// dx = r (g - x̂ <g, x̂>/n) with g = dy ∘ w; dw = Σ_rows dy ∘ x̂.
pub(crate) fn rms_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: T, want_dw: bool) -> (Vec<T>, Option<Vec<T>>) {
    let n = w.len();
    let nf = T::from(n).unwrap();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(n).zip(x.par_chunks(n).zip(dy.par_chunks(n))).with_min_len(super::min_rows(n)).for_each(
        |(dxr, (xr, dyr))| {
            let ms = super::dot(xr, xr) / nf;
            let r = T::one() / (ms + eps).sqrt();
            let mut dot = T::zero();
            for i in 0..n {
                dot += dyr[i] * w[i] * xr[i] * r;
            }
            let c = dot / nf;
            for i in 0..n {
                dxr[i] = r * (dyr[i] * w[i] - xr[i] * r * c);
            }
        },
    );
    let dw = want_dw.then(|| {
        let mut dw = vec![T::zero(); n];
        for (xr, dyr) in x.chunks(n).zip(dy.chunks(n)) {
            let ms = super::dot(xr, xr) / nf;
            let r = T::one() / (ms + eps).sqrt();
            for i in 0..n {
                dw[i] += dyr[i] * xr[i] * r;
            }
        }
        dw
    });
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "memvp-rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(rms_fwd(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, self.eps as f32)),
            DType::F64 => f64::to_cpu_storage_owned(rms_fwd(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, self.eps)),
            dt => bail!("rms_norm: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn go<T: Real>(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Option<Tensor>, Option<Tensor>)> {
            with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(w, |ws| {
                    with_slice::<T, _>(dy, |dys| {
                        let (dx, dw) = rms_bwd(xs, ws, dys, T::from(eps).unwrap(), w.track_op());
                        let dx = tensor_from_vec(dx, x.dims(), x)?;
                        let dw = dw.map(|d| tensor_from_vec(d, w.dims(), w)).transpose()?;
                        Ok((Some(dx), dw))
                    })
                })
            })
        }
        match x.dtype() {
            DType::F32 => go::<f32>(x, w, dy, self.eps),
            DType::F64 => go::<f64>(x, w, dy, self.eps),
            dt => bail!("rms_norm: unsupported dtype {dt:?}"),
        }
    }
}

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    dispatch(
        fast_path(x),
        [x, w],
        Tensor::contiguous,
        || Ok((RmsNorm { eps }, true)),
        || {
            if super::generic::fused_dtype(x) && !w.track_op() {
                return super::generic::rms_norm(x, w, eps);
            }
            let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
        },
    )
}

struct LayerNorm {
    eps: f64,
}

fn ln_stats<T: Real>(xr: &[T], eps: T) -> (T, T) {
    let nf = T::from(xr.len()).unwrap();
    let mean = super::row_sum(xr) / nf;
    let var = xr.iter().fold(T::zero(), |a, &v| a + (v - mean) * (v - mean)) / nf;
    (mean, T::one() / (var + eps).sqrt())
}

pub(crate) fn ln_fwd<T: Real>(x: &[T], w: &[T], b: &[T], eps: T) -> Vec<T> {
    let n = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(super::min_rows(n)).for_each(|(yr, xr)| {
        let (mean, r) = ln_stats(xr, eps);
        for i in 0..n {
            yr[i] = (xr[i] - mean) * r * w[i] + b[i];
        }
    });
    y
}

pub(crate) type LnGrads<T> = (Vec<T>, Option<Vec<T>>, Option<Vec<T>>);

/// dx = r (g - mean(g) - x̂ mean(g ∘ x̂)) with g = dy ∘ w.
pub(crate) fn ln_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: T, want_dw: bool, want_db: bool) -> LnGrads<T> {
    let n = w.len();
    let nf = T::from(n).unwrap();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(n).zip(x.par_chunks(n).zip(dy.par_chunks(n))).with_min_len(super::min_rows(n)).for_each(
        |(dxr, (xr, dyr))| {
            let (mean, r) = ln_stats(xr, eps);
            let (mut sg, mut sgx) = (T::zero(), T::zero());
            for i in 0..n {
                let g = dyr[i] * w[i];
                sg += g;
                sgx += g * (xr[i] - mean) * r;
            }
            let (mg, mgx) = (sg / nf, sgx / nf);
            for i in 0..n {
                let xh = (xr[i] - mean) * r;
                dxr[i] = r * (dyr[i] * w[i] - mg - xh * mgx);
            }
        },
    );
    let mut dw = want_dw.then(|| vec![T::zero(); n]);
    let mut db = want_db.then(|| vec![T::zero(); n]);
    if want_dw || want_db {
        for (xr, dyr) in x.chunks(n).zip(dy.chunks(n)) {
            let (mean, r) = ln_stats(xr, eps);
            for i in 0..n {
                if let Some(dw) = dw.as_mut() {
                    dw[i] += dyr[i] * (xr[i] - mean) * r;
                }
                if let Some(db) = db.as_mut() {
                    db[i] += dyr[i];
                }
            }
        }
    }
    (dx, dw, db)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "memvp-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(ln_fwd(
                cpu_slice(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                self.eps as f32,
            )),
            DType::F64 => {
                f64::to_cpu_storage_owned(ln_fwd(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?, self.eps))
            }
            dt => bail!("layer_norm: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        type G = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
        fn go<T: Real>(x: &Tensor, w: &Tensor, b: &Tensor, dy: &Tensor, eps: f64) -> Result<G> {
            with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(w, |ws| {
                    with_slice::<T, _>(dy, |dys| {
                        let (dx, dw, db) = ln_bwd(xs, ws, dys, T::from(eps).unwrap(), w.track_op(), b.track_op());
                        let dx = tensor_from_vec(dx, x.dims(), x)?;
                        let dw = dw.map(|d| tensor_from_vec(d, w.dims(), w)).transpose()?;
                        let db = db.map(|d| tensor_from_vec(d, b.dims(), b)).transpose()?;
                        Ok((Some(dx), dw, db))
                    })
                })
            })
        }
        match x.dtype() {
            DType::F32 => go::<f32>(x, w, b, dy, self.eps),
            DType::F64 => go::<f64>(x, w, b, dy, self.eps),
            dt => bail!("layer_norm: unsupported dtype {dt:?}"),
        }
    }
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    dispatch(
        fast_path(x),
        [x, w, b],
        Tensor::contiguous,
        || Ok((LayerNorm { eps }, true)),
        || {
            if super::generic::fused_dtype(x) && !w.track_op() && !b.track_op() {
                return super::generic::layer_norm(x, w, b, eps);
            }
            let mean = x.mean_keepdim(candle_core::D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?.broadcast_add(b)
        },
    )
}
