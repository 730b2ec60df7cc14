//! Mean cross-entropy over rows of logits, fused: the `[rows, vocab]` log-softmax is never
//! materialised, and the backward pass forms `softmax - onehot` in one sweep.

use super::{Real, cpu_slice, dispatch, fast_path, tensor_from_vec, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

struct CrossEntropy {
    targets: Vec<u32>,
}

fn row_lse<T: Real>(r: &[T]) -> T {
    let max = super::row_max(r);
    let mut s = [T::zero(); 8];
    for (i, &b) in r.iter().enumerate() {
        s[i % 8] += (b - max).exp();
    }
    let s = super::row_sum(&s);
    max + s.ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "memvp-cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        if n != self.targets.len() {
            bail!("cross_entropy: {n} rows but {} targets", self.targets.len())
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("cross_entropy: target {t} outside the vocabulary of {v}")
        }
        fn go<T: Real>(x: &[T], t: &[u32], v: usize) -> T {
            // Per-row losses in parallel, summed in a fixed order: the same bits on every run.
            let rows: Vec<f64> = x
                .par_chunks(v)
                .zip(t.par_iter())
                .map(|(r, &ti)| <T as WithDType>::to_f64(row_lse(r) - r[ti as usize]))
                .collect();
            let total: f64 = rows.iter().sum();
            <T as WithDType>::from_f64(total / t.len().max(1) as f64)
        }
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(vec![go(cpu_slice::<f32>(s, l)?, &self.targets, v)]),
            DType::F64 => f64::to_cpu_storage_owned(vec![go(cpu_slice::<f64>(s, l)?, &self.targets, v)]),
            dt => bail!("cross_entropy: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from(())))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        fn go<T: Real>(x: &Tensor, g: &Tensor, targets: &[u32]) -> Result<Tensor> {
            let (n, v) = x.dims2()?;
            let gs = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let scale = T::from(gs / n.max(1) as f64).unwrap();
            with_slice::<T, _>(x, |xs| {
                let mut dx = vec![T::zero(); xs.len()];
                dx.par_chunks_mut(v)
                    .zip(xs.par_chunks(v).zip(targets.par_iter()))
                    .with_min_len(super::min_rows(v))
                    .for_each(|(d, (r, &t))| {
                        let lse = row_lse(r);
                        for (o, &val) in d.iter_mut().zip(r) {
                            *o = (val - lse).exp() * scale;
                        }
                        d[t as usize] -= scale;
                    });
                tensor_from_vec(dx, &[n, v], x)
            })
        }
        Ok(Some(match x.dtype() {
            DType::F32 => go::<f32>(x, g, &self.targets)?,
            DType::F64 => go::<f64>(x, g, &self.targets)?,
            dt => bail!("cross_entropy: unsupported dtype {dt:?}"),
        }))
    }
}

/// Mean over rows of `-log softmax(logits)[target]`; `logits: [rows, vocab]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    dispatch(
        fast_path(logits),
        [logits],
        Tensor::contiguous,
        || Ok((CrossEntropy { targets: targets.to_vec() }, true)),
        || {
            let t = Tensor::from_slice(targets, targets.len(), logits.device())?;
            candle_nn::loss::cross_entropy(logits, &t)
        },
    )
}
