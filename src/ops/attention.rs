//! Fused multi-head attention on the `[batch, seq, heads, head_dim]` layout, with grouped-query
//! heads, causal masking, an optional additive bias (T5's relative positions) and an optional
//! key mask (padding), and a backward pass. One op replaces transpose, repeat_kv, two batched
//! matmuls, mask add and softmax: no copies, and the probabilities are kept for the backward
//! pass only when a gradient can flow.

use super::{Real, dispatch, fast_path, gemm_strided};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};
use rayon::prelude::*;
use std::sync::Mutex;

/// What shapes the attention pattern beyond `softmax(scale · q kᵀ)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionOpts<'a> {
    pub scale: f64,
    /// Query row `i` sees keys `j <= i + offset` (offset = number of cached positions).
    pub causal_offset: Option<usize>,
    /// Additive bias `[1 | b, heads, tq, tk]`, constant.
    pub bias: Option<&'a Tensor>,
    /// `[b, tk]`: 1 where a key may be attended, 0 where it is padding. Constant.
    pub key_mask: Option<&'a Tensor>,
}

enum Probs {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

pub(crate) struct AttnOp {
    pub(crate) scale: f64,
    pub(crate) causal: Option<usize>,
    pub(crate) bias: Option<Tensor>,
    pub(crate) mask: Option<Tensor>,
    pub(crate) keep: bool,
    probs: Mutex<Option<Probs>>,
}

impl AttnOp {
    /// Plain (causal or not) attention without bias or mask, for fused callers.
    pub(crate) fn plain(scale: f64, causal: bool) -> Self {
        Self { scale, causal: causal.then_some(0), bias: None, mask: None, keep: true, probs: Mutex::new(None) }
    }
}

/// Strided 4-d view: data, start offset, strides of the first three dims (the last is 1).
pub(crate) struct View<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) off: usize,
    pub(crate) st: [usize; 3],
    pub(crate) dims: [usize; 4],
}

impl<'a, T> View<'a, T> {
    /// A contiguous `[b, t, h, d]` buffer.
    pub(crate) fn contiguous(data: &'a [T], dims: [usize; 4]) -> Self {
        let [_, t, h, d] = dims;
        Self { data, off: 0, st: [t * h * d, h * d, d], dims }
    }

    /// Whether every element of the view lies inside `data` (the kernels read it through raw
    /// pointers). A view with a zero dimension has no element and always fits.
    fn fits(&self) -> bool {
        if self.dims.contains(&0) {
            return true;
        }
        // Offset of the last element, None on overflow.
        let mut last = self.off.checked_add(self.dims[3] - 1);
        for (&n, &s) in self.dims.iter().zip(&self.st) {
            last = last.and_then(|l| (n - 1).checked_mul(s)?.checked_add(l));
        }
        last.is_some_and(|l| l < self.data.len())
    }
}

fn view<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<View<'a, T>> {
    let st = l.stride();
    let dims = l.dims();
    if dims.len() != 4 || st[3] != 1 {
        bail!("attention: expected [b, t, h, d] with a contiguous last dim, got {:?} / {:?}", dims, st)
    }
    Ok(View {
        data: s.as_slice::<T>()?,
        off: l.start_offset(),
        st: [st[0], st[1], st[2]],
        dims: [dims[0], dims[1], dims[2], dims[3]],
    })
}

fn with_view<T: Real, R>(t: &Tensor, f: impl FnOnce(View<'_, T>) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(view::<T>(c, l)?),
        _ => bail!("attention: tensor is not on the CPU"),
    }
}

fn with_contig<T: Real, R>(t: Option<&Tensor>, f: impl FnOnce(Option<&[T]>) -> Result<R>) -> Result<R> {
    match t {
        None => f(None),
        Some(t) => super::with_slice::<T, R>(t, |s| f(Some(s))),
    }
}

struct Geometry {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    kvh: usize,
    d: usize,
    bias_b: usize,
}

fn geometry<T>(q: &View<T>, k: &View<T>, v: &View<T>, bias: Option<&Tensor>) -> Result<Geometry> {
    let [b, tq, h, d] = q.dims;
    let [bk, tk, kvh, dk] = k.dims;
    if bk != b || dk != d || v.dims != k.dims || kvh == 0 || h % kvh != 0 {
        bail!("attention: q {:?}, k {:?}, v {:?} do not fit together", q.dims, k.dims, v.dims)
    }
    if !(q.fits() && k.fits() && v.fits()) {
        bail!("attention: q {:?}, k {:?} or v {:?} reaches past its buffer", q.dims, k.dims, v.dims)
    }
    let bias_b = match bias.map(|t| t.dims().to_vec()) {
        None => 1,
        Some(bd) if bd.len() == 4 && (bd[0] == 1 || bd[0] == b) && bd[1] == h && bd[2] == tq && bd[3] == tk => bd[0],
        Some(bd) => bail!("attention: bias {bd:?} does not fit [1|{b}, {h}, {tq}, {tk}]"),
    };
    Ok(Geometry { b, tq, tk, h, kvh, d, bias_b })
}

/// Forward for all heads; returns the output `[b, tq, h, d]` and, if asked, the probabilities.
pub(crate) fn attn_fwd<T: Real>(
    op: &AttnOp,
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    bias: Option<&[T]>,
    mask: Option<&[T]>,
    keep: bool,
) -> Result<(Vec<T>, Option<Vec<T>>)> {
    let g = geometry(q, k, v, op.bias.as_ref())?;
    let Geometry { b, tq, tk, h, kvh, d, bias_b } = g;
    let group = h / kvh;
    let mut out = vec![T::zero(); b * tq * h * d];
    let mut probs = if keep { vec![T::zero(); b * h * tq * tk] } else { Vec::new() };
    // An empty shape leaves nothing to compute (the kernel below would produce these zeros), and
    // returning here keeps it from forming strided offsets over buffers that may be empty.
    if [b, tq, tk, h, d].contains(&0) {
        return Ok((out, keep.then_some(probs)));
    }
    let out_p = super::SendPtr(out.as_mut_ptr());
    let probs_p = super::SendPtr(probs.as_mut_ptr());
    let scale = T::from(op.scale).unwrap();
    (0..b * h).into_par_iter().with_min_len(super::min_rows(tq * tk + tq * d + tk * d)).for_each(|bh| {
        let (bi, hi) = (bh / h, bh % h);
        let gi = hi / group;
        let mut local = Vec::new();
        let p: *mut T = if keep {
            // SAFETY: bh < b·h, so the tq·tk block starting here lies inside probs (b·h·tq·tk
            // elements, alive until the loop ends); only task bh uses it.
            unsafe { probs_p.get().add(bh * tq * tk) }
        } else {
            local.resize(tq * tk, T::zero());
            local.as_mut_ptr()
        };
        // SAFETY: p is this task's own initialized tq·tk block (of probs, or the local buffer),
        // written through p and through `s` one after the other, never both at once. The q, k
        // and v offsets address elements [bi, i, hi or gi, c] of views that `geometry` checked
        // to fit their data (bi < b, hi < h, gi < kvh, i < tq or tk, c < d, and no dimension is
        // 0 here); they are only read. The output rows written, out[bi, i, hi, 0..d] (row stride
        // h·d), lie inside out (b·tq·h·d elements) and belong to head (bi, hi) alone, so the
        // tasks write disjoint elements. Neither buffer overlaps the inputs: both are fresh Vecs.
        unsafe {
            // S = Q_h K_gᵀ
            gemm_strided(
                tq,
                tk,
                d,
                p,
                tk as isize,
                1,
                false,
                q.data.as_ptr().add(q.off + bi * q.st[0] + hi * q.st[2]),
                q.st[1] as isize,
                1,
                k.data.as_ptr().add(k.off + bi * k.st[0] + gi * k.st[2]),
                1,
                k.st[1] as isize,
                1,
            );
            let s = std::slice::from_raw_parts_mut(p, tq * tk);
            let brow = bias.map(|bs| &bs[((bi % bias_b) * h + hi) * tq * tk..][..tq * tk]);
            let mrow = mask.map(|m| &m[bi * tk..(bi + 1) * tk]);
            for i in 0..tq {
                let row = &mut s[i * tk..(i + 1) * tk];
                let lim = match op.causal {
                    Some(off) => (i + off + 1).min(tk),
                    None => tk,
                };
                for j in 0..tk {
                    let mut x = row[j] * scale;
                    if let Some(br) = brow {
                        x += br[i * tk + j];
                    }
                    if j >= lim || mrow.is_some_and(|m| m[j] == T::zero()) {
                        x = T::neg_infinity();
                    }
                    row[j] = x;
                }
                let max = super::row_max(row);
                if max == T::neg_infinity() {
                    row.fill(T::zero());
                    continue;
                }
                for x in row.iter_mut() {
                    *x = (*x - max).fast_exp();
                }
                let sum = super::row_sum(row);
                let inv = T::one() / sum;
                for x in row.iter_mut() {
                    *x *= inv;
                }
            }
            // O_h = P V_g
            gemm_strided(
                tq,
                d,
                tk,
                out_p.get().add(bi * tq * h * d + hi * d),
                (h * d) as isize,
                1,
                false,
                p,
                tk as isize,
                1,
                v.data.as_ptr().add(v.off + bi * v.st[0] + gi * v.st[2]),
                v.st[1] as isize,
                1,
                1,
            );
        }
    });
    Ok((out, keep.then_some(probs)))
}

pub(crate) type Grads3<T> = (Vec<T>, Vec<T>, Vec<T>);

pub(crate) fn attn_bwd<T: Real>(
    op: &AttnOp,
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    probs: &[T],
    dout: &[T],
) -> Result<Grads3<T>> {
    let Geometry { b, tq, tk, h, kvh, d, .. } = geometry(q, k, v, op.bias.as_ref())?;
    if dout.len() < b * tq * h * d {
        bail!("attention: output gradient of {} elements for [{b}, {tq}, {h}, {d}]", dout.len())
    }
    let group = h / kvh;
    let mut dq = vec![T::zero(); b * tq * h * d];
    let mut dk = vec![T::zero(); b * tk * kvh * d];
    let mut dv = vec![T::zero(); b * tk * kvh * d];
    // As in the forward pass: an empty shape has all-zero (or empty) gradients.
    if [b, tq, tk, h, d].contains(&0) {
        return Ok((dq, dk, dv));
    }
    let (dqp, dkp, dvp) =
        (super::SendPtr(dq.as_mut_ptr()), super::SendPtr(dk.as_mut_ptr()), super::SendPtr(dv.as_mut_ptr()));
    let scale = T::from(op.scale).unwrap();
    (0..b * kvh).into_par_iter().with_min_len(super::min_rows(group * (tq * tk + tq * d) + tk * d)).for_each(|bg| {
        let (bi, gi) = (bg / kvh, bg % kvh);
        let mut ds = vec![T::zero(); tq * tk];
        // SAFETY: element [bi, 0, gi, 0] of k, inside its data: `geometry` checked that the view
        // fits, bi < b and gi < kvh, and no dimension is 0 here.
        let kbase = unsafe { k.data.as_ptr().add(k.off + bi * k.st[0] + gi * k.st[2]) };
        // SAFETY: likewise element [bi, 0, gi, 0] of v (same dims as k, checked to fit).
        let vbase = unsafe { v.data.as_ptr().add(v.off + bi * v.st[0] + gi * v.st[2]) };
        // SAFETY: element [bi, 0, gi, 0] of dk ([b, tk, kvh, d], alive until the loop ends).
        let dkb = unsafe { dkp.get().add((bi * tk * kvh + gi) * d) };
        // SAFETY: element [bi, 0, gi, 0] of dv ([b, tk, kvh, d], alive until the loop ends).
        let dvb = unsafe { dvp.get().add((bi * tk * kvh + gi) * d) };
        for hi in gi * group..(gi + 1) * group {
            let p = &probs[(bi * h + hi) * tq * tk..][..tq * tk];
            // SAFETY: element [bi, 0, hi, 0] of dout, whose length was checked to be at least
            // b·tq·h·d; bi < b and hi < h.
            let dob = unsafe { dout.as_ptr().add(bi * tq * h * d + hi * d) };
            // SAFETY: element [bi, 0, hi, 0] of q, inside its data (view checked to fit, hi < h).
            let qb = unsafe { q.data.as_ptr().add(q.off + bi * q.st[0] + hi * q.st[2]) };
            // SAFETY: the products read p (a checked slice of probs), dout rows [bi, i, hi, ·]
            // (i < tq, in bounds by the length check) and v rows [bi, j, gi, ·] (j < tk, view
            // checked to fit). They write ds, this task's own tq·tk buffer, and dv[bi, j, gi, ·]
            // for j < tk (row stride kvh·d): inside dv, and written only by task (bi, gi), so the
            // tasks write disjoint elements. dv and ds are fresh Vecs overlapping no input.
            unsafe {
                // dV_g += Pᵀ dO_h
                gemm_strided(
                    tk,
                    d,
                    tq,
                    dvb,
                    (kvh * d) as isize,
                    1,
                    true,
                    p.as_ptr(),
                    1,
                    tk as isize,
                    dob,
                    (h * d) as isize,
                    1,
                    1,
                );
                // dP = dO_h V_gᵀ
                gemm_strided(
                    tq,
                    tk,
                    d,
                    ds.as_mut_ptr(),
                    tk as isize,
                    1,
                    false,
                    dob,
                    (h * d) as isize,
                    1,
                    vbase,
                    1,
                    v.st[1] as isize,
                    1,
                );
            }
            // dS = scale · P ∘ (dP − rowsum(dP ∘ P))
            for i in 0..tq {
                let (pr, dr) = (&p[i * tk..(i + 1) * tk], &mut ds[i * tk..(i + 1) * tk]);
                let dot = pr.iter().zip(dr.iter()).fold(T::zero(), |a, (&x, &y)| a + x * y);
                for (o, &x) in dr.iter_mut().zip(pr) {
                    *o = scale * x * (*o - dot);
                }
            }
            // SAFETY: the products read ds (tq·tk, this task's), k rows [bi, j, gi, ·] and q rows
            // [bi, i, hi, ·] (views checked to fit). They write dq[bi, i, hi, ·] for i < tq (row
            // stride h·d) and dk[bi, j, gi, ·] for j < tk (row stride kvh·d): inside dq and dk,
            // and written only by task (bi, gi), whose heads hi are its own. dq and dk are fresh
            // Vecs overlapping no input.
            unsafe {
                // dQ_h = dS K_g
                gemm_strided(
                    tq,
                    d,
                    tk,
                    dqp.get().add(bi * tq * h * d + hi * d),
                    (h * d) as isize,
                    1,
                    false,
                    ds.as_ptr(),
                    tk as isize,
                    1,
                    kbase,
                    k.st[1] as isize,
                    1,
                    1,
                );
                // dK_g += dSᵀ Q_h
                gemm_strided(
                    tk,
                    d,
                    tq,
                    dkb,
                    (kvh * d) as isize,
                    1,
                    true,
                    ds.as_ptr(),
                    1,
                    tk as isize,
                    qb,
                    q.st[1] as isize,
                    1,
                    1,
                );
            }
        }
    });
    Ok((dq, dk, dv))
}

impl CustomOp3 for AttnOp {
    fn name(&self) -> &'static str {
        "memvp-attention"
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
        let dims = l1.dims().to_vec();
        fn go<T: Real>(op: &AttnOp, s: [(&CpuStorage, &Layout); 3]) -> Result<(Vec<T>, Option<Vec<T>>)> {
            let (q, k, v) = (view::<T>(s[0].0, s[0].1)?, view::<T>(s[1].0, s[1].1)?, view::<T>(s[2].0, s[2].1)?);
            with_contig::<T, _>(op.bias.as_ref(), |bias| {
                with_contig::<T, _>(op.mask.as_ref(), |mask| attn_fwd(op, &q, &k, &v, bias, mask, op.keep))
            })
        }
        let st = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1.dtype() {
            DType::F32 => {
                let (o, p) = go::<f32>(self, st)?;
                if let Some(p) = p {
                    *self.probs.lock().unwrap() = Some(Probs::F32(p));
                }
                f32::to_cpu_storage_owned(o)
            }
            DType::F64 => {
                let (o, p) = go::<f64>(self, st)?;
                if let Some(p) = p {
                    *self.probs.lock().unwrap() = Some(Probs::F64(p));
                }
                f64::to_cpu_storage_owned(o)
            }
            dt => bail!("attention: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Not taken: a graph may be differentiated more than once.
        let stored = self.probs.lock().unwrap();
        fn go<T: Real>(
            op: &AttnOp,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            dout: &Tensor,
            stored: Option<&[T]>,
        ) -> Result<Grads3<T>> {
            with_view::<T, _>(q, |qv| {
                with_view::<T, _>(k, |kv| {
                    with_view::<T, _>(v, |vv| {
                        let recomputed;
                        let probs = match stored {
                            Some(p) => p,
                            None => {
                                recomputed = with_contig::<T, _>(op.bias.as_ref(), |bias| {
                                    with_contig::<T, _>(op.mask.as_ref(), |mask| {
                                        Ok(attn_fwd(op, &qv, &kv, &vv, bias, mask, true)?.1.unwrap())
                                    })
                                })?;
                                &recomputed
                            }
                        };
                        super::with_slice::<T, _>(dout, |dy| attn_bwd(op, &qv, &kv, &vv, probs, dy))
                    })
                })
            })
        }
        let wrap = |(dq, dk, dv): (Tensor, Tensor, Tensor)| Ok((Some(dq), Some(dk), Some(dv)));
        match q.dtype() {
            DType::F32 => {
                let p = match stored.as_ref() {
                    Some(Probs::F32(p)) => Some(p.as_slice()),
                    _ => None,
                };
                let (a, b, c) = go::<f32>(self, q, k, v, dout, p)?;
                wrap((
                    Tensor::from_vec(a, q.dims(), q.device())?,
                    Tensor::from_vec(b, k.dims(), k.device())?,
                    Tensor::from_vec(c, v.dims(), v.device())?,
                ))
            }
            DType::F64 => {
                let p = match stored.as_ref() {
                    Some(Probs::F64(p)) => Some(p.as_slice()),
                    _ => None,
                };
                let (a, b, c) = go::<f64>(self, q, k, v, dout, p)?;
                wrap((
                    Tensor::from_vec(a, q.dims(), q.device())?,
                    Tensor::from_vec(b, k.dims(), k.device())?,
                    Tensor::from_vec(c, v.dims(), v.device())?,
                ))
            }
            dt => bail!("attention: unsupported dtype {dt:?}"),
        }
    }
}

fn inner_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.stride().last() == Some(&1) { Ok(t.clone()) } else { t.contiguous() }
}

/// `softmax(scale · q kᵀ + bias + masks) v` per head. `q: [b, tq, h, d]`, `k, v: [b, tk, kvh, d]`
/// with `h` a multiple of `kvh`; returns `[b, tq, h, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, o: AttentionOpts) -> Result<Tensor> {
    dispatch(
        fast_path(q),
        [q, k, v],
        inner_contiguous,
        || {
            let track = q.track_op() || k.track_op() || v.track_op();
            let op = AttnOp {
                scale: o.scale,
                causal: o.causal_offset,
                bias: o.bias.map(|b| b.to_dtype(q.dtype())).transpose()?,
                mask: o.key_mask.map(|m| m.to_dtype(q.dtype())).transpose()?,
                keep: track,
                probs: Mutex::new(None),
            };
            Ok((op, track))
        },
        || attention_reference(q, k, v, o),
    )
}

/// Plain candle composition of the same computation: used off the CPU and as a test oracle.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, o: AttentionOpts) -> Result<Tensor> {
    let (b, tq, h, d) = q.dims4()?;
    let (_, tk, kvh, _) = k.dims4()?;
    let group = h / kvh;
    let q = q.transpose(1, 2)?.contiguous()?; // b h tq d
    let expand = |t: &Tensor| -> Result<Tensor> {
        let t = t.transpose(1, 2)?; // b kvh tk d
        let t = t.unsqueeze(2)?.broadcast_as((b, kvh, group, tk, d))?.reshape((b, h, tk, d))?;
        t.contiguous()
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let mut s = (q.matmul(&k.t()?)? * o.scale)?;
    if let Some(bias) = o.bias {
        s = s.broadcast_add(&bias.to_dtype(s.dtype())?)?;
    }
    let dev = q.device();
    let mut neg = vec![0f32; b * tq * tk];
    for bi in 0..b {
        for i in 0..tq {
            for j in 0..tk {
                if o.causal_offset.is_some_and(|off| j > i + off) {
                    neg[(bi * tq + i) * tk + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    if let Some(m) = o.key_mask {
        let m = m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for bi in 0..b {
            for i in 0..tq {
                for j in 0..tk {
                    if m[bi][j] == 0.0 {
                        neg[(bi * tq + i) * tk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
    let neg = Tensor::from_vec(neg, (b, 1, tq, tk), dev)?.to_dtype(s.dtype())?;
    let s = s.broadcast_add(&neg)?;
    let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}
