//! A frozen pre-norm self-attention block as one op: `x + O(attn(rope(Q n), rope(K n), V n))`
//! with `n = norm(x)` (RMSNorm for LLaMA, LayerNorm for CLIP). Used on training paths where
//! nothing inside the block is trained (MemVP): its backward is the chain of input gradients
//! only (four matrix products, the attention backward, the inverse rotation and the norm's
//! backward) with no graph nodes, no intermediate gradient accumulation and no weight gradient.

use super::attention::{AttnOp, View, attn_bwd, attn_fwd};
use super::linear::{linear_input_grad, linear_input_grad_cat, linear_rows, linear_rows_cat, storage_slice};
use super::norm::{ln_bwd, ln_fwd, rms_bwd, rms_fwd};
use super::rope::rope_kernel;
use super::{Linear, Real, cpu_slice, dispatch, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use std::sync::Mutex;

#[derive(Clone, Debug)]
pub enum BlockNorm {
    Rms { weight: Tensor, eps: f64 },
    Layer { weight: Tensor, bias: Tensor, eps: f64 },
}

#[derive(Clone, Debug)]
pub struct FrozenAttnBlock {
    pub norm: BlockNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub causal: bool,
}

struct Saved<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    probs: Vec<T>,
}

enum AnySaved {
    F32(Saved<f32>),
    F64(Saved<f64>),
}

struct BlockOp {
    blk: FrozenAttnBlock,
    /// `[t, head_dim / 2]` cos/sin for shared positions.
    rope: Option<(Tensor, Tensor)>,
    keep: bool,
    saved: Mutex<Option<AnySaved>>,
}

fn norm_fwd<T: Real>(n: &BlockNorm, x: &[T]) -> Result<Vec<T>> {
    match n {
        BlockNorm::Rms { weight, eps } => storage_slice::<T, _>(weight, |w| Ok(rms_fwd(x, w, T::from(*eps).unwrap()))),
        BlockNorm::Layer { weight, bias, eps } => storage_slice::<T, _>(weight, |w| {
            storage_slice::<T, _>(bias, |b| Ok(ln_fwd(x, w, b, T::from(*eps).unwrap())))
        }),
    }
}

fn norm_bwd<T: Real>(n: &BlockNorm, x: &[T], dy: &[T]) -> Result<Vec<T>> {
    match n {
        BlockNorm::Rms { weight, eps } => {
            storage_slice::<T, _>(weight, |w| Ok(rms_bwd(x, w, dy, T::from(*eps).unwrap(), false).0))
        }
        BlockNorm::Layer { weight, eps, .. } => {
            storage_slice::<T, _>(weight, |w| Ok(ln_bwd(x, w, dy, T::from(*eps).unwrap(), false, false).0))
        }
    }
}

impl BlockOp {
    fn fwd<T: Real>(&self, x: &[T], dims: [usize; 3]) -> Result<(Vec<T>, Saved<T>)> {
        let [b, t, _] = dims;
        let m = b * t;
        let p = &self.blk;
        let (h, kvh, hd) = (p.heads, p.kv_heads, p.head_dim);
        let n = norm_fwd(&p.norm, x)?;
        // [q k v] per row from one product, then each as its own contiguous [m, ·].
        let qkv = linear_rows_cat(&[&p.q, &p.k, &p.v], &n, m)?;
        let (nq, nkv) = (h * hd, kvh * hd);
        let width = nq + 2 * nkv;
        let columns = |from: usize, n: usize| -> Vec<T> {
            qkv.chunks(width).flat_map(|r| r[from..from + n].iter().copied()).collect()
        };
        let (mut q, mut k, v) = (columns(0, nq), columns(nq, nkv), columns(nq + nkv, nkv));
        drop(qkv);
        if let Some((c, s)) = &self.rope {
            (q, k) = with_slice::<T, _>(c, |c| {
                with_slice::<T, _>(s, |s| {
                    Ok((
                        rope_kernel(&q, c, s, (b, t, h, hd), false, T::one()),
                        rope_kernel(&k, c, s, (b, t, kvh, hd), false, T::one()),
                    ))
                })
            })?;
        }
        let op = AttnOp::plain(p.scale, p.causal);
        let (o, probs) = attn_fwd(
            &op,
            &View::contiguous(&q, [b, t, h, hd]),
            &View::contiguous(&k, [b, t, kvh, hd]),
            &View::contiguous(&v, [b, t, kvh, hd]),
            None,
            None,
            true,
        )?;
        let mut y = linear_rows(&p.o, &o, m)?;
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += *xi;
        }
        Ok((y, Saved { q, k, v, probs: probs.unwrap_or_default() }))
    }

    fn bwd<T: Real>(&self, x: &[T], sv: &Saved<T>, dy: &[T], dims: [usize; 3]) -> Result<Vec<T>> {
        let [b, t, d] = dims;
        let m = b * t;
        let p = &self.blk;
        let (h, kvh, hd) = (p.heads, p.kv_heads, p.head_dim);
        // d(attention output) = dy · Wo
        let mut dattn = vec![T::zero(); m * h * hd];
        linear_input_grad(&p.o, dy, m, &mut dattn, false)?;
        let op = AttnOp::plain(p.scale, p.causal);
        let (mut dq, mut dk, dv) = attn_bwd(
            &op,
            &View::contiguous(&sv.q, [b, t, h, hd]),
            &View::contiguous(&sv.k, [b, t, kvh, hd]),
            &View::contiguous(&sv.v, [b, t, kvh, hd]),
            &sv.probs,
            &dattn,
        )?;
        if let Some((c, s)) = &self.rope {
            (dq, dk) = with_slice::<T, _>(c, |c| {
                with_slice::<T, _>(s, |s| {
                    Ok((
                        rope_kernel(&dq, c, s, (b, t, h, hd), false, -T::one()),
                        rope_kernel(&dk, c, s, (b, t, kvh, hd), false, -T::one()),
                    ))
                })
            })?;
        }
        // dn = [dq dk dv] [Wq; Wk; Wv], then through the norm; plus the residual.
        let (nq, nkv) = (h * hd, kvh * hd);
        let mut dqkv = Vec::with_capacity(m * (nq + 2 * nkv));
        for i in 0..m {
            dqkv.extend_from_slice(&dq[i * nq..(i + 1) * nq]);
            dqkv.extend_from_slice(&dk[i * nkv..(i + 1) * nkv]);
            dqkv.extend_from_slice(&dv[i * nkv..(i + 1) * nkv]);
        }
        drop((dq, dk, dv));
        let mut dn = vec![T::zero(); m * d];
        linear_input_grad_cat(&[&p.q, &p.k, &p.v], &dqkv, m, &mut dn, false)?;
        let mut dx = norm_bwd(&p.norm, x, &dn)?;
        for (a, g) in dx.iter_mut().zip(dy) {
            *a += *g;
        }
        Ok(dx)
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "memvp-frozen-attention-block"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = l.shape().dims3()?;
        let out = match s.dtype() {
            DType::F32 => {
                let (y, sv) = self.fwd::<f32>(cpu_slice(s, l)?, [b, t, d])?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(AnySaved::F32(sv));
                }
                f32::to_cpu_storage_owned(y)
            }
            DType::F64 => {
                let (y, sv) = self.fwd::<f64>(cpu_slice(s, l)?, [b, t, d])?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(AnySaved::F64(sv));
                }
                f64::to_cpu_storage_owned(y)
            }
            dt => bail!("attention block: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, d) = x.dims3()?;
        let saved = self.saved.lock().unwrap();
        let dx = match saved.as_ref() {
            Some(AnySaved::F32(sv)) => {
                let v = with_slice::<f32, _>(x, |xs| with_slice::<f32, _>(dy, |g| self.bwd(xs, sv, g, [b, t, d])))?;
                Tensor::from_vec(v, x.dims(), x.device())?
            }
            Some(AnySaved::F64(sv)) => {
                let v = with_slice::<f64, _>(x, |xs| with_slice::<f64, _>(dy, |g| self.bwd(xs, sv, g, [b, t, d])))?;
                Tensor::from_vec(v, x.dims(), x.device())?
            }
            None => bail!("attention block: no saved activations"),
        };
        Ok(Some(dx))
    }
}

impl FrozenAttnBlock {
    /// q, k and v as views of one buffer, so that the fused op runs their products as one.
    pub fn share_storage(mut self) -> Result<Self> {
        super::linear::share_storage(&mut [&mut self.q, &mut self.k, &mut self.v])?;
        Ok(self)
    }

    /// Whether the fused op applies (CPU, plain frozen weights, shared positions).
    pub fn fusable(&self, x: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> bool {
        let plain = |l: &Linear| l.kernel_ready();
        super::fast_path(x)
            && !super::linear::candle_matmul_on()
            && [&self.q, &self.k, &self.v, &self.o].iter().all(|l| plain(l))
            && rope.is_none_or(|(c, _)| c.rank() == 2)
    }

    /// `x + attention(norm(x))` for `x: [b, t, d]` (no KV cache, no key mask).
    pub fn forward(&self, x: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        dispatch(
            self.fusable(x, rope),
            [x],
            Tensor::contiguous,
            || {
                let op = BlockOp {
                    blk: self.clone(),
                    rope: rope
                        .map(|(c, s)| Ok::<_, candle_core::Error>((c.contiguous()?, s.contiguous()?)))
                        .transpose()?,
                    keep: x.track_op(),
                    saved: Mutex::new(None),
                };
                let keep = op.keep;
                Ok((op, keep))
            },
            // No composite fallback: callers check `fusable` and take the op-by-op path.
            || -> Result<Tensor> { bail!("attention block: not fusable here (use the op-by-op path)") },
        )
    }
}
