//! A frozen linear layer: `y = x Wᵀ + b` whose backward computes the input gradient only.
//! candle's matmul backward would also form `xᵀ dy` for the weight, a full extra matrix product
//! per projection, and keep it in memory, although nothing frozen is ever updated.

use super::{Real, cpu_slice, dispatch, fast_path, gemm_strided, num_threads};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};

#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`, as stored in checkpoints.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

struct LinearOp {
    weight: Tensor,
    bias: Option<Tensor>,
}

pub(crate) fn storage_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(cpu_slice::<T>(c, l)?),
        _ => bail!("linear: weight is not on the CPU"),
    }
}

/// Decoding's few rows (`m <= 4`, as `gemm_strided` routes to its dot-product loop): each
/// output is the same `dot(x_i, w_j)` (+ bias) as there, but computed for all rows while `w_j`
/// is in cache and spread over the threads by output chunks, so a batch of rows reads the
/// weight once and one row uses every core. The results are bit-identical to the plain loop.
fn linear_few_rows<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, m: usize, k: usize, n: usize) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 64;
    let mut by_col = vec![T::zero(); n * m];
    by_col.par_chunks_mut(m * CHUNK).enumerate().for_each(|(c, out)| {
        for (jj, o) in out.chunks_mut(m).enumerate() {
            let j = c * CHUNK + jj;
            let col = &w[j * k..(j + 1) * k];
            for (i, oi) in o.iter_mut().enumerate() {
                let acc = super::dot(&x[i * k..(i + 1) * k], col);
                *oi = match b {
                    Some(b) => b[j] + acc,
                    None => acc,
                };
            }
        }
    });
    let mut dst = vec![T::zero(); m * n];
    for j in 0..n {
        for i in 0..m {
            dst[i * n + j] = by_col[j * m + i];
        }
    }
    dst
}

pub(crate) fn linear_fwd<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, m: usize, k: usize, n: usize) -> Vec<T> {
    if m > 0 && m <= 4 && m * n * k <= 1 << 20 && k > 0 && x.len() >= m * k && w.len() >= n * k {
        return linear_few_rows(x, w, b, m, k, n);
    }
    let mut dst = match b {
        Some(b) => {
            let mut d = Vec::with_capacity(m * n);
            for _ in 0..m {
                d.extend_from_slice(b);
            }
            d
        }
        None => vec![T::zero(); m * n],
    };
    // The product below reads m·k elements of x and n·k of W and writes m·n of dst through raw
    // pointers; callers derive m, k and n from shapes that nothing here ties to these buffers.
    assert!(
        x.len() >= m * k && w.len() >= n * k && dst.len() == m * n,
        "linear: buffers of {}, {} and {} elements do not fit [{m}, {k}] · [{n}, {k}]ᵀ",
        x.len(),
        w.len(),
        dst.len()
    );
    // dst[m,n] = x[m,k] · Wᵀ where Wᵀ[kk, j] = W[j, kk].
    // SAFETY: by the assert above, every element addressed is in bounds: dst[i·n + j] < m·n,
    // x[i·k + kk] < m·k and W[kk + j·k] < n·k. dst is a fresh, initialized Vec, so it overlaps
    // neither x nor W and nothing else accesses it.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            n as isize,
            1,
            b.is_some(),
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            num_threads(),
        )
    };
    dst
}

/// `x Wᵀ + b` for `m` rows of `x`, reading the frozen layer's own storage.
pub(crate) fn linear_rows<T: Real>(l: &Linear, x: &[T], m: usize) -> Result<Vec<T>> {
    let (n, k) = l.weight.dims2()?;
    storage_slice::<T, _>(&l.weight, |w| match &l.bias {
        Some(b) => storage_slice::<T, _>(b, |b| Ok(linear_fwd(x, w, Some(b), m, k, n))),
        None => Ok(linear_fwd(x, w, None, m, k, n)),
    })
}

/// The input gradient of a frozen layer: `dst (+)= dy · W` for `W: [n, k]`, `dy: [m, n]`.
pub(crate) fn linear_input_grad<T: Real>(
    l: &Linear,
    dy: &[T],
    m: usize,
    dst: &mut [T],
    accumulate: bool,
) -> Result<()> {
    let (n, k) = l.weight.dims2()?;
    // The product below reads m·n elements of dy and writes m·k of dst through raw pointers.
    if dy.len() < m * n || dst.len() < m * k {
        bail!(
            "linear: input gradient buffers of {} and {} elements do not fit [{m}, {n}] · [{n}, {k}]",
            dy.len(),
            dst.len()
        )
    }
    storage_slice::<T, _>(&l.weight, |w| {
        // SAFETY: dst[i·k + j] < m·k and dy[i·n + kk] < m·n by the check above, and W[kk·k + j]
        // < n·k = w.len() (storage_slice yields exactly the [n, k] weight). dst is an exclusive
        // borrow of initialized data, so it overlaps neither dy nor W and nothing else touches it.
        unsafe {
            gemm_strided(
                m,
                k,
                n,
                dst.as_mut_ptr(),
                k as isize,
                1,
                accumulate,
                dy.as_ptr(),
                n as isize,
                1,
                w.as_ptr(),
                k as isize,
                1,
                num_threads(),
            )
        };
        Ok(())
    })
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "memvp-frozen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.weight.dims2()?;
        let dims = l.dims();
        if dims.last() != Some(&k) {
            bail!("linear: input {:?} does not end in the weight's in-features {k}", dims)
        }
        let m = l.shape().elem_count() / k;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = n;
        fn go<T: Real>(op: &LinearOp, s: &CpuStorage, l: &Layout, m: usize, k: usize, n: usize) -> Result<Vec<T>> {
            let x = cpu_slice::<T>(s, l)?;
            storage_slice::<T, _>(&op.weight, |w| match &op.bias {
                Some(b) => storage_slice::<T, _>(b, |b| Ok(linear_fwd(x, w, Some(b), m, k, n))),
                None => Ok(linear_fwd(x, w, None, m, k, n)),
            })
        }
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(go::<f32>(self, s, l, m, k, n)?),
            DType::F64 => f64::to_cpu_storage_owned(go::<f64>(self, s, l, m, k, n)?),
            dt => bail!("linear: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from(out_dims)))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // dx = dy · W; nothing is formed for W.
        let n = self.weight.dims()[0];
        let m = dy.elem_count() / n;
        let dx = dy.reshape((m, n))?.matmul(&self.weight)?;
        Ok(Some(dx.reshape(x.dims())?))
    }
}

static CANDLE_MATMUL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every frozen linear use candle's own matmul (whose backward also forms the weight
/// gradient): only for benchmarks that show what the custom op saves.
pub fn use_candle_matmul(on: bool) {
    CANDLE_MATMUL.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn candle_matmul_on() -> bool {
    CANDLE_MATMUL.load(std::sync::atomic::Ordering::Relaxed)
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A weight that is itself being trained (pre-training a tiny LM) takes candle's matmul,
        // whose backward forms the weight gradient.
        let fast = fast_path(x)
            && !self.weight.is_variable()
            && !CANDLE_MATMUL.load(std::sync::atomic::Ordering::Relaxed)
            && self.weight.is_contiguous()
            && x.dtype() == self.weight.dtype();
        dispatch(
            fast,
            [x],
            Tensor::contiguous,
            || Ok((LinearOp { weight: self.weight.clone(), bias: self.bias.clone() }, x.track_op())),
            || {
                let y = x.broadcast_matmul(&self.weight.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            },
        )
    }
}
