//! Kernels with a fast CPU forward and a correct backward.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` return no gradient,
//! and its `matmul` backward always computes the gradient of both operands, so a frozen weight
//! costs a full extra matrix product per layer. Every op here is a candle custom op whose
//! backward computes exactly the gradients that can reach a trained tensor. On a non-CPU device
//! the ops fall back to candle's composite (differentiable) ops.

mod act;
mod attention;
mod linear;
mod loss;
mod memory;
mod mlp;
mod norm;
mod rope;
mod softmax;

pub use act::{Activation, activation, gated};
pub use attention::{AttentionOpts, attention, attention_reference};
pub use linear::{Linear, use_candle_matmul};
pub use loss::cross_entropy;
pub use memory::memory_branch;
pub use mlp::FrozenMlp;
pub use norm::{layer_norm, rms_norm};
pub use rope::{RopeTable, rope};
pub use softmax::softmax_last_dim;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType, bail};

/// Floating types the CPU kernels are written for: f32 for work, f64 for gradient checks.
pub(crate) trait Real: WithDType + num_traits::Float + Send + Sync + 'static {
    fn erf(self) -> Self;
}
impl Real for f32 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
}
impl Real for f64 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// The contiguous data of a CPU storage as a typed slice.
pub(crate) fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("memvp kernel: expected a contiguous tensor, got strides {:?}", l.stride()),
    }
}

/// Runs `f` on the contiguous CPU data of `t`.
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(cpu_slice::<T>(c, l)?),
        _ => bail!("memvp kernel: tensor is not on the CPU"),
    }
}

pub(crate) fn tensor_from_vec<T: WithDType>(v: Vec<T>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape, like.device())
}

/// Whether the fast kernels apply: CPU tensors of a floating type they are written for.
pub(crate) fn fast_path(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// A raw pointer that may cross rayon tasks writing disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    #[inline]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// candle's `get_num_threads` reads /proc/cpuinfo on every call unless `RAYON_NUM_THREADS` is
/// set; ask once.
pub(crate) fn num_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

/// `dst[m,n] (+)= alpha? ..` thin wrapper over gemm for strided row-major operands:
/// dst = (read_dst ? dst : 0) + lhs[m,k] * rhs[k,n].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    dst_cs: isize,
    read_dst: bool,
    lhs: *const T,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const T,
    rhs_rs: isize,
    rhs_cs: isize,
    threads: usize,
) {
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

#[inline]
pub(crate) fn fmax<T: Real>(a: T, b: T) -> T {
    num_traits::Float::max(a, b)
}

/// Rows of `row_len` elements per rayon task, so that small tensors are not split into tasks
/// that cost more to schedule than to compute.
#[inline]
pub(crate) fn min_rows(row_len: usize) -> usize {
    ((1usize << 14) / row_len.max(1)).max(1)
}
