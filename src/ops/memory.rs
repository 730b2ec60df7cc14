//! MemVP's memory branch as one op: `s · (act(u Kᵀ) ∘ mask) V` per sample, with
//! `u: [b, t, d]`, `K, V: [b, M, d]` and an optional dropout mask `[b, t, M]`. Its backward
//! returns gradients only for the inputs that can reach a trained tensor (in the first block
//! `u` comes from frozen layers alone, so nothing is formed for it).

use super::{Activation, Real, dispatch, fast_path, gemm_strided, num_threads, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;
use std::sync::Mutex;

struct MemoryOp {
    act: Activation,
    scale: f64,
    mask: Option<Tensor>,
    keep: bool,
    /// Pre-activations `u Kᵀ`, kept for the backward pass.
    saved: Mutex<Option<Saved>>,
}

/// The pre-activations in the dtype of the forward pass that formed them.
enum Saved {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Saved {
    fn as_f32(&self) -> Result<&[f32]> {
        match self {
            Saved::F32(a) => Ok(a),
            Saved::F64(_) => bail!("memory branch: saved activations are f64, the backward pass is f32"),
        }
    }

    fn as_f64(&self) -> Result<&[f64]> {
        match self {
            Saved::F64(a) => Ok(a),
            Saved::F32(_) => bail!("memory branch: saved activations are f32, the backward pass is f64"),
        }
    }
}

/// Runs `f(bi)` for every sample: in parallel across samples when there are enough of them,
/// else one after the other with multi-threaded products inside.
fn per_sample(b: usize, f: impl Fn(usize, usize) + Sync) {
    let th = num_threads();
    if b >= th && th > 1 {
        (0..b).into_par_iter().for_each(|i| f(i, 1));
    } else {
        (0..b).for_each(|i| f(i, th));
    }
}

struct Dims {
    b: usize,
    t: usize,
    m: usize,
    d: usize,
}

fn dims(u: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    match (u, k, v) {
        ([b, t, d], [bk, m, dk], [bv, mv, dv]) if b == bk && b == bv && d == dk && d == dv && m == mv => {
            Ok(Dims { b: *b, t: *t, m: *m, d: *d })
        }
        _ => bail!("memory branch: u {u:?}, K {k:?}, V {v:?} do not fit together"),
    }
}

fn fwd<T: Real>(op: &MemoryOp, u: &[T], k: &[T], v: &[T], mask: Option<&[T]>, g: &Dims) -> (Vec<T>, Vec<T>) {
    let Dims { b, t, m, d } = *g;
    // The products below read these through raw pointers with extents taken from g.
    assert!(u.len() >= b * t * d && k.len() >= b * m * d && v.len() >= b * m * d, "memory branch: inputs do not fit");
    let mut a = vec![T::zero(); b * t * m];
    let mut y = vec![T::zero(); b * t * d];
    // An empty shape leaves nothing to compute (the products would produce these zeros), and
    // returning here keeps them from forming row starts over empty buffers.
    if [b, t, m, d].contains(&0) {
        return (a, y);
    }
    let (ap, yp) = (super::SendPtr(a.as_mut_ptr()), super::SendPtr(y.as_mut_ptr()));
    // SAFETY: no dimension is 0 here. Sample bi reads u[bi·t·d..][..t·d] and K, V at
    // [bi·m·d..][..m·d], in bounds by the assert above, and writes only its own blocks
    // a[bi·t·m..][..t·m] (A, then read back as a slice once the product has returned) and
    // y[bi·t·d..][..t·d], so samples run in parallel write disjoint elements; a and y are fresh
    // Vecs that outlive per_sample and overlap no input. z is a local t·m Vec.
    per_sample(b, |bi, th| unsafe {
        let ab = ap.get().add(bi * t * m);
        // A = u Kᵀ
        gemm_strided(
            t,
            m,
            d,
            ab,
            m as isize,
            1,
            false,
            u.as_ptr().add(bi * t * d),
            d as isize,
            1,
            k.as_ptr().add(bi * m * d),
            1,
            d as isize,
            th,
        );
        // Z = s · act(A) ∘ mask, then Y = Z V
        let z = weights(op, std::slice::from_raw_parts(ab, t * m), mask.map(|mk| &mk[bi * t * m..(bi + 1) * t * m]));
        gemm_strided(
            t,
            d,
            m,
            yp.get().add(bi * t * d),
            d as isize,
            1,
            false,
            z.as_ptr(),
            m as isize,
            1,
            v.as_ptr().add(bi * m * d),
            d as isize,
            1,
            th,
        );
    });
    (a, y)
}

/// `Z = s · act(A) ∘ mask` for one sample: what multiplies V, in the forward and in dV.
fn weights<T: Real>(op: &MemoryOp, a: &[T], mask: Option<&[T]>) -> Vec<T> {
    op.act.scaled(a, mask, T::from(op.scale).unwrap())
}

type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

#[allow(clippy::too_many_arguments)]
fn bwd<T: Real>(
    op: &MemoryOp,
    u: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[T]>,
    a: &[T],
    dy: &[T],
    g: &Dims,
    want: [bool; 3],
) -> Grads<T> {
    let Dims { b, t, m, d } = *g;
    // The products below read these through raw pointers with extents taken from g.
    assert!(
        u.len() >= b * t * d && k.len() >= b * m * d && v.len() >= b * m * d && dy.len() >= b * t * d,
        "memory branch: inputs do not fit"
    );
    let mut du = want[0].then(|| vec![T::zero(); b * t * d]);
    let mut dk = want[1].then(|| vec![T::zero(); b * m * d]);
    let mut dv = want[2].then(|| vec![T::zero(); b * m * d]);
    // As in the forward pass: an empty shape has all-zero (or empty) gradients.
    if [b, t, m, d].contains(&0) {
        return (du, dk, dv);
    }
    let ptr = |x: &mut Option<Vec<T>>| x.as_mut().map(|v| super::SendPtr(v.as_mut_ptr()));
    let (dup, dkp, dvp) = (ptr(&mut du), ptr(&mut dk), ptr(&mut dv));
    let s = T::from(op.scale).unwrap();
    // SAFETY: no dimension is 0 here. Sample bi reads dY and u at [bi·t·d..][..t·d] and K, V
    // at [bi·m·d..][..m·d], in bounds by the assert above, plus its local z and dA (t·m each).
    // It writes only its own blocks du[bi·t·d..][..t·d], dK and dV[bi·m·d..][..m·d], so samples
    // run in parallel write disjoint elements; du, dK and dV are fresh Vecs that outlive
    // per_sample and overlap no input.
    per_sample(b, |bi, th| unsafe {
        let ar = &a[bi * t * m..(bi + 1) * t * m];
        let mkb = mask.map(|mk| &mk[bi * t * m..(bi + 1) * t * m]);
        let dyb = dy.as_ptr().add(bi * t * d);
        let (ub, kb, vb) = (u.as_ptr().add(bi * t * d), k.as_ptr().add(bi * m * d), v.as_ptr().add(bi * m * d));
        // dV = Zᵀ dY with Z = s · act(A) ∘ mask
        if let Some(p) = dvp {
            let z = weights(op, ar, mkb);
            gemm_strided(
                m,
                d,
                t,
                p.get().add(bi * m * d),
                d as isize,
                1,
                false,
                z.as_ptr(),
                1,
                m as isize,
                dyb,
                d as isize,
                1,
                th,
            );
        }
        if dup.is_none() && dkp.is_none() {
            return;
        }
        // dA = s · (dY Vᵀ) ∘ mask ∘ act'(A)
        let mut da = vec![T::zero(); t * m];
        gemm_strided(t, m, d, da.as_mut_ptr(), m as isize, 1, false, dyb, d as isize, 1, vb, 1, d as isize, th);
        op.act.scale_grad(ar, mkb, s, &mut da);
        // du = dA K, dK = dAᵀ u
        if let Some(p) = dup {
            gemm_strided(
                t,
                d,
                m,
                p.get().add(bi * t * d),
                d as isize,
                1,
                false,
                da.as_ptr(),
                m as isize,
                1,
                kb,
                d as isize,
                1,
                th,
            );
        }
        if let Some(p) = dkp {
            gemm_strided(
                m,
                d,
                t,
                p.get().add(bi * m * d),
                d as isize,
                1,
                false,
                da.as_ptr(),
                1,
                m as isize,
                ub,
                d as isize,
                1,
                th,
            );
        }
    });
    (du, dk, dv)
}

impl CustomOp3 for MemoryOp {
    fn name(&self) -> &'static str {
        "memvp-memory-branch"
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
        let g = dims(l1.dims(), l2.dims(), l3.dims())?;
        // The pre-activations `A` and the output `Y`.
        fn go<T: Real>(op: &MemoryOp, s: [(&CpuStorage, &Layout); 3], g: &Dims) -> Result<(Vec<T>, Vec<T>)> {
            let (u, k, v) = (
                super::cpu_slice::<T>(s[0].0, s[0].1)?,
                super::cpu_slice::<T>(s[1].0, s[1].1)?,
                super::cpu_slice::<T>(s[2].0, s[2].1)?,
            );
            let run = |mask: Option<&[T]>| Ok(fwd(op, u, k, v, mask, g));
            match &op.mask {
                Some(mk) => with_slice::<T, _>(mk, |mk| run(Some(mk))),
                None => run(None),
            }
        }
        let st = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1.dtype() {
            DType::F32 => {
                let (a, y) = go::<f32>(self, st, &g)?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(Saved::F32(a));
                }
                f32::to_cpu_storage_owned(y)
            }
            DType::F64 => {
                let (a, y) = go::<f64>(self, st, &g)?;
                if self.keep {
                    *self.saved.lock().unwrap() = Some(Saved::F64(a));
                }
                f64::to_cpu_storage_owned(y)
            }
            dt => bail!("memory branch: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((g.b, g.t, g.d))))
    }

    fn bwd(
        &self,
        u: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = dims(u.dims(), k.dims(), v.dims())?;
        if dy.dims() != [g.b, g.t, g.d] {
            bail!("memory branch: output gradient {:?} for an output [{}, {}, {}]", dy.dims(), g.b, g.t, g.d)
        }
        let want = [u.track_op(), k.track_op(), v.track_op()];
        // Not taken: a graph may be differentiated more than once.
        let guard = self.saved.lock().unwrap();
        let Some(saved) = guard.as_ref() else { bail!("memory branch: no saved activations") };
        #[allow(clippy::too_many_arguments)]
        fn go<T: Real>(
            op: &MemoryOp,
            u: &Tensor,
            k: &Tensor,
            v: &Tensor,
            dy: &Tensor,
            a: &[T],
            g: &Dims,
            want: [bool; 3],
        ) -> Result<Grads<T>> {
            with_slice::<T, _>(u, |us| {
                with_slice::<T, _>(k, |ks| {
                    with_slice::<T, _>(v, |vs| {
                        with_slice::<T, _>(dy, |dys| match &op.mask {
                            Some(mk) => with_slice::<T, _>(mk, |mk| Ok(bwd(op, us, ks, vs, Some(mk), a, dys, g, want))),
                            None => Ok(bwd(op, us, ks, vs, None, a, dys, g, want)),
                        })
                    })
                })
            })
        }
        type Out = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
        // The gradients as tensors shaped like `u`, `K` and `V`, on `u`'s device.
        fn wrap<T: Real>((a, b, c): Grads<T>, [u, k, v]: [&Tensor; 3]) -> Result<Out> {
            let dev = u.device();
            let w = |x: Option<Vec<T>>, like: &Tensor| x.map(|v| Tensor::from_vec(v, like.dims(), dev)).transpose();
            Ok((w(a, u)?, w(b, k)?, w(c, v)?))
        }
        match u.dtype() {
            DType::F32 => wrap(go::<f32>(self, u, k, v, dy, saved.as_f32()?, &g, want)?, [u, k, v]),
            DType::F64 => wrap(go::<f64>(self, u, k, v, dy, saved.as_f64()?, &g, want)?, [u, k, v]),
            dt => bail!("memory branch: unsupported dtype {dt:?}"),
        }
    }
}

/// `scale · (act(u Kᵀ) ∘ mask) V`, differentiable in `u`, `K` and `V`.
pub fn memory_branch(
    u: &Tensor,
    k: &Tensor,
    v: &Tensor,
    act: Activation,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    dispatch(
        fast_path(u),
        [u, k, v],
        Tensor::contiguous,
        || {
            let keep = u.track_op() || k.track_op() || v.track_op();
            let op = MemoryOp {
                act,
                scale,
                mask: mask.map(|m| m.to_dtype(u.dtype())).transpose()?,
                keep,
                saved: Mutex::new(None),
            };
            Ok((op, keep))
        },
        || {
            let a = super::activation(&u.matmul(&k.transpose(1, 2)?)?, act)?;
            let a = match mask {
                Some(m) => a.mul(m)?,
                None => a,
            };
            a.matmul(v)? * scale
        },
    )
}
