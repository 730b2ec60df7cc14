//! Rotary position embedding in the "rotate half" convention of Hugging Face LLaMA, applied
//! directly on the `[batch, seq, heads, head_dim]` layout the projections produce, so no
//! transpose or copy is needed around it.

use super::{Real, cpu_slice, dispatch, fast_path, tensor_from_vec, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;

/// Precomputed cos/sin of `position * inv_freq` for positions `0..max_pos`.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTable {
    pub fn new(inv_freq: &[f64], max_pos: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in inv_freq {
                // Same rounding as transformers: the angle is formed in f32.
                let a = (p as f32) * (f as f32);
                cos.push(a.cos() as f64);
                sin.push(a.sin() as f64);
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, half), dev)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    pub fn max_pos(&self) -> usize {
        self.cos.dims()[0]
    }

    /// cos/sin for positions `start..start+len`, shared by the whole batch: `[len, half]`.
    pub fn range(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        if start + len > self.max_pos() {
            bail!("position {} beyond the rope table of {} positions", start + len, self.max_pos())
        }
        Ok((self.cos.narrow(0, start, len)?, self.sin.narrow(0, start, len)?))
    }

    /// cos/sin for per-sample positions `[b, t]` (u32): `[b, t, half]`.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dims()[1];
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
        Ok((cos, sin))
    }
}

struct Rope;

/// out[i] = x[i] cos - x[i+h] sin, out[i+h] = x[i+h] cos + x[i] sin (sign = +1), and the
/// inverse rotation for sign = -1, which is the backward pass.
pub(crate) fn rope_kernel<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize),
    batched: bool,
    sign: T,
) -> Vec<T> {
    let (_, t, h, d) = dims;
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(h * d).zip(x.par_chunks(h * d)).with_min_len(super::min_rows(h * d)).enumerate().for_each(
        |(row, (or, xr))| {
            let (bi, ti) = (row / t, row % t);
            let base = if batched { (bi * t + ti) * half } else { ti * half };
            let (c, s) = (&cos[base..base + half], &sin[base..base + half]);
            for hi in 0..h {
                let xo = &xr[hi * d..(hi + 1) * d];
                let oo = &mut or[hi * d..(hi + 1) * d];
                for i in 0..half {
                    let (x1, x2) = (xo[i], xo[i + half]);
                    let si = sign * s[i];
                    oo[i] = x1 * c[i] - x2 * si;
                    oo[i + half] = x2 * c[i] + x1 * si;
                }
            }
        },
    );
    out
}

fn rope_dims(l: &Layout, lc: &Layout) -> Result<((usize, usize, usize, usize), bool)> {
    let (b, t, h, d) = l.shape().dims4()?;
    if d % 2 != 0 {
        bail!("rope: head_dim {d} is odd")
    }
    let batched = match lc.dims() {
        [tt, hh] if *tt == t && *hh == d / 2 => false,
        [bb, tt, hh] if *bb == b && *tt == t && *hh == d / 2 => true,
        other => bail!("rope: cos/sin shape {other:?} does not fit x {:?}", l.dims()),
    };
    Ok(((b, t, h, d), batched))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "memvp-rope"
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
        let (dims, batched) = rope_dims(l1, l2)?;
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(rope_kernel(
                cpu_slice(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                dims,
                batched,
                1.0,
            )),
            DType::F64 => f64::to_cpu_storage_owned(rope_kernel(
                cpu_slice(s1, l1)?,
                cpu_slice(s2, l2)?,
                cpu_slice(s3, l3)?,
                dims,
                batched,
                1.0,
            )),
            dt => bail!("rope: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn go<T: Real>(x: &Tensor, cos: &Tensor, sin: &Tensor, dy: &Tensor) -> Result<Tensor> {
            let (dims, batched) = rope_dims(x.layout(), cos.layout())?;
            with_slice::<T, _>(dy, |g| {
                with_slice::<T, _>(cos, |c| {
                    with_slice::<T, _>(sin, |s| {
                        tensor_from_vec(rope_kernel(g, c, s, dims, batched, -T::one()), x.dims(), x)
                    })
                })
            })
        }
        let dx = match x.dtype() {
            DType::F32 => go::<f32>(x, cos, sin, dy)?,
            DType::F64 => go::<f64>(x, cos, sin, dy)?,
            dt => bail!("rope: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), None, None))
    }
}

/// Applies rotary embeddings to `x: [b, t, heads, head_dim]` with `cos, sin: [t, head_dim/2]`
/// (shared positions) or `[b, t, head_dim/2]` (per-sample positions).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    dispatch(
        fast_path(x),
        [x, cos, sin],
        Tensor::contiguous,
        || Ok((Rope, true)),
        || {
            let (b, t, _h, d) = x.dims4()?;
            let half = d / 2;
            let (c, s) = if cos.rank() == 2 {
                (cos.reshape((1, t, 1, half))?, sin.reshape((1, t, 1, half))?)
            } else {
                (cos.reshape((b, t, 1, half))?, sin.reshape((b, t, 1, half))?)
            };
            let x1 = x.narrow(3, 0, half)?;
            let x2 = x.narrow(3, half, half)?;
            let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
            let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
            Tensor::cat(&[o1, o2], 3)
        },
    )
}
