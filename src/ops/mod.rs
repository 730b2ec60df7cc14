//! Kernels with a fast CPU forward and a correct backward.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` return no gradient,
//! and its `matmul` backward always computes the gradient of both operands, so a frozen weight
//! costs a full extra matrix product per layer. Every op here is a candle custom op whose
//! backward computes exactly the gradients that can reach a trained tensor. On a non-CPU device
//! the ops take the device-generic path (`generic.rs`: candle tensor ops, fused forwards where
//! candle has them, the same input-gradient-only backward) or candle's composite ops.

mod act;
mod attention;
mod attn_block;
pub mod dequant;
mod generic;
mod linear;
mod loss;
mod memory;
mod mlp;
pub mod nn;
mod norm;
mod rope;
mod skinny;
mod softmax;
mod weight;

pub use act::{Activation, activation, gated};
pub use attention::{AttentionOpts, attention, attention_reference};
pub use attn_block::{BlockNorm, FrozenAttnBlock};
pub use generic::force_generic;
pub use linear::{Linear, use_candle_matmul};
pub use loss::cross_entropy;
pub use memory::memory_branch;
pub use mlp::FrozenMlp;
pub use norm::{layer_norm, rms_norm};
pub use rope::{RopeTable, rope};
pub use softmax::softmax_last_dim;
pub use weight::{Weight, WeightFormat};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Storage, Tensor, WithDType, bail,
};

/// Floating types the CPU kernels are written for: f32 for work, f64 for gradient checks.
pub(crate) trait Real: WithDType + num_traits::Float + skinny::Stored {
    fn erf(self) -> Self;
    /// e^x in the element-wise loops (activations, softmax): inline arithmetic in f32 (loops
    /// over it vectorise), libm's in f64 (the gradient checks).
    fn fast_exp(self) -> Self;
}
impl Real for f32 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        act::exp_f32(self)
    }
}
impl Real for f64 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
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

/// Whether the fast kernels apply: CPU tensors of a floating type they are written for (and the
/// device-generic path not forced for a comparison).
pub(crate) fn fast_path(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && !generic::forced()
}

/// How a kernel's inputs are laid out before its custom op runs: `Tensor::contiguous` for the
/// kernels that read flat slices, a cheaper preparation for those that read strided views.
pub(crate) type Prep = fn(&Tensor) -> Result<Tensor>;

/// A candle custom op on `N` inputs, applied with a backward pass (`apply_opN`, which records a
/// graph node when an input is tracked) or without one (`apply_opN_no_bwd`).
pub(crate) trait Kernel<const N: usize> {
    /// Runs the op on `inputs`, each passed through `prep` first (in order).
    fn run(self, inputs: [&Tensor; N], prep: Prep, bwd: bool) -> Result<Tensor>;
}

impl<O: CustomOp1 + Send + Sync + 'static> Kernel<1> for O {
    fn run(self, [x]: [&Tensor; 1], prep: Prep, bwd: bool) -> Result<Tensor> {
        let x = prep(x)?;
        if bwd { x.apply_op1(self) } else { x.apply_op1_no_bwd(&self) }
    }
}

impl<O: CustomOp2 + Send + Sync + 'static> Kernel<2> for O {
    fn run(self, [x, y]: [&Tensor; 2], prep: Prep, bwd: bool) -> Result<Tensor> {
        let (x, y) = (prep(x)?, prep(y)?);
        if bwd { x.apply_op2(&y, self) } else { x.apply_op2_no_bwd(&y, &self) }
    }
}

impl<O: CustomOp3 + Send + Sync + 'static> Kernel<3> for O {
    fn run(self, [x, y, z]: [&Tensor; 3], prep: Prep, bwd: bool) -> Result<Tensor> {
        let (x, y, z) = (prep(x)?, prep(y)?, prep(z)?);
        if bwd { x.apply_op3(&y, &z, self) } else { x.apply_op3_no_bwd(&y, &z, &self) }
    }
}

/// The dispatch every kernel shares. Off the fast path (`fast` false: another device or dtype,
/// or a case the kernel does not cover) `fallback` computes the result with candle's composite
/// (differentiable) ops. On it, `op` builds the custom op together with whether it is applied
/// with a backward pass (`true`: `apply_opN`) or without one (`false`: `apply_opN_no_bwd`, for
/// ops that keep activations only when a gradient can flow), and the op runs on `inputs`
/// passed through `prep`. The op is built before the inputs are prepared.
pub(crate) fn dispatch<O, const N: usize>(
    fast: bool,
    inputs: [&Tensor; N],
    prep: Prep,
    op: impl FnOnce() -> Result<(O, bool)>,
    fallback: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor>
where
    O: Kernel<N>,
{
    if !fast {
        return fallback();
    }
    let (op, bwd) = op()?;
    op.run(inputs, prep, bwd)
}

/// A raw pointer that may cross rayon tasks writing disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: sending the pointer itself is harmless; what matters is how it is dereferenced, and
// every use in ops points into an f32/f64 buffer (Send + Sync) that the caller owns and keeps
// alive until the rayon loop using it has returned, with each task writing only its own
// disjoint region (as the comments at the uses explain). The impls do not bound `T`: a new use
// must keep to the same rules.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for Send: shared across tasks, the pointer is only used to write disjoint regions
// of a buffer that outlives the parallel loop.
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

/// Workers spinning in [`keep_warm`] now.
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` with the pool's other workers spinning for work instead of sleeping.
///
/// A training step alternates parallel kernels with short serial stretches (candle's graph
/// bookkeeping, small ops). In those stretches rayon puts idle workers to sleep after a few
/// dozen yields, and waking one for the next kernel costs 50-140 µs on a 2-vCPU VM (measured
/// per fork-join: 1,000 µs halves took 1,070-1,130 µs, 1,003-1,013 µs with the workers kept
/// awake) -- a few hundred times per step. OpenMP, under PyTorch, spins the same way. Each
/// other worker runs a job that takes the pool's pending work as it appears
/// ([`rayon::yield_now`]), yielding its core to the OS between looks, until `f` returns.
/// Outside a pool worker, with one thread, inside another `keep_warm`, or with
/// `MEMVP_KEEP_WARM=0`, it just runs `f`.
pub fn keep_warm<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    static ACTIVE: AtomicBool = AtomicBool::new(false);
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("MEMVP_KEEP_WARM").map_or(true, |v| v != "0"));
    let Some(me) = rayon::current_thread_index() else { return f() };
    if !on || rayon::current_num_threads() < 2 || ACTIVE.swap(true, Ordering::AcqRel) {
        return f();
    }
    /// Ends the spinning however `f` leaves (a panic included).
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            ACTIVE.store(false, Ordering::Release);
        }
    }
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    for _ in 1..rayon::current_num_threads() {
        let stop = stop.0.clone();
        rayon::spawn(move || {
            // The calling thread may pop this job itself while it waits on a kernel: it must
            // not spin there, or it would not return to its own work until `f` ended.
            // A job reached only after `f` has ended has nothing to keep warm.
            if rayon::current_thread_index() == Some(me) || stop.load(Ordering::Acquire) {
                return;
            }
            SPINNING.fetch_add(1, Ordering::AcqRel);
            while !stop.load(Ordering::Acquire) {
                if let Some(rayon::Yield::Idle) | None = rayon::yield_now() {
                    // Lets any other runnable thread of the machine have the core meanwhile.
                    std::thread::yield_now();
                }
            }
            SPINNING.fetch_sub(1, Ordering::AcqRel);
        });
    }
    f()
}

/// Largest element (NaNs ignored; -inf for an empty row). Eight independent lanes so the
/// compiler can vectorise: a single running `max` is one long dependency chain.
#[inline]
pub(crate) fn row_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let c = x.chunks_exact(8);
    let rem = c.remainder();
    for v in c {
        for l in 0..8 {
            if v[l] > acc[l] {
                acc[l] = v[l];
            }
        }
    }
    let mut m = T::neg_infinity();
    for &a in acc.iter().chain(rem) {
        if a > m {
            m = a;
        }
    }
    m
}

/// Sum in eight lanes (vectorisable, and a little more accurate than one running sum).
#[inline]
pub(crate) fn row_sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let c = x.chunks_exact(8);
    let rem = c.remainder();
    for v in c {
        for l in 0..8 {
            acc[l] += v[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rem {
        s += v;
    }
    s
}

/// A dot product with eight independent partial sums, which the compiler turns into SIMD
/// (a single running sum cannot be reordered, so it would stay scalar).
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    s
}

/// `dst (+)= lhs · rhs` for a few rows, by loops the compiler vectorises along the contiguous
/// dimension of `rhs`.
///
/// # Safety
///
/// As for [`gemm_strided`]: for every `i < m`, `j < n` and `kk < k`, `dst[i·dst_rs + j·dst_cs]`
/// must be valid for reads and writes, `lhs[i·lhs_rs + kk·lhs_cs]` and `rhs[kk·rhs_rs +
/// j·rhs_cs]` valid for reads (all offsets in elements, within one allocation each), the
/// elements of `dst` must not overlap those of `lhs` or `rhs`, and nothing else may access
/// those elements of `dst` during the call. When `k` is 0 the row and column starts
/// (`lhs + i·lhs_rs`, `rhs + j·rhs_cs`) are still formed and must stay in bounds.
#[allow(clippy::too_many_arguments)]
// SAFETY: sound under the `# Safety` contract above; its only caller, gemm_strided, passes its
// own (identical) contract on.
unsafe fn small_gemm<T: Real>(
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
) {
    // SAFETY: every offset formed below is `i·*_rs + j·*_cs` (or with `kk`) for i < m, j < n,
    // kk < k, which the caller guarantees to be in bounds. The slices cover exactly such
    // elements: a column of rhs when rhs_rs == 1, a row of lhs when lhs_cs == 1, a row of dst
    // when dst_cs == 1. The one mutable slice (a row of dst) overlaps no lhs/rhs slice alive
    // with it because dst overlaps neither operand, and no other thread touches it.
    unsafe {
        for i in 0..m as isize {
            let l = |kk: isize| *lhs.offset(i * lhs_rs + kk * lhs_cs);
            if rhs_rs == 1 {
                // Column j of rhs is contiguous: a dot product per output.
                for j in 0..n as isize {
                    let col = std::slice::from_raw_parts(rhs.offset(j * rhs_cs), k);
                    let mut acc = T::zero();
                    if lhs_cs == 1 {
                        acc = dot(std::slice::from_raw_parts(lhs.offset(i * lhs_rs), k), col);
                    } else {
                        for (kk, b) in col.iter().enumerate() {
                            acc += l(kk as isize) * *b;
                        }
                    }
                    let o = dst.offset(i * dst_rs + j * dst_cs);
                    *o = if read_dst { *o + acc } else { acc };
                }
            } else if rhs_cs == 1 && dst_cs == 1 {
                // Rows of rhs are contiguous: accumulate lhs[i, kk] · rhs[kk, :].
                let out = std::slice::from_raw_parts_mut(dst.offset(i * dst_rs), n);
                if !read_dst {
                    out.fill(T::zero());
                }
                for kk in 0..k as isize {
                    let a = l(kk);
                    let row = std::slice::from_raw_parts(rhs.offset(kk * rhs_rs), n);
                    for (o, b) in out.iter_mut().zip(row) {
                        *o += a * *b;
                    }
                }
            } else {
                for j in 0..n as isize {
                    let mut acc = T::zero();
                    for kk in 0..k as isize {
                        acc += l(kk) * *rhs.offset(kk * rhs_rs + j * rhs_cs);
                    }
                    let o = dst.offset(i * dst_rs + j * dst_cs);
                    *o = if read_dst { *o + acc } else { acc };
                }
            }
        }
    }
}

/// `dst[m,n] (+)= alpha? ..` thin wrapper over gemm for strided row-major operands:
/// dst = (read_dst ? dst : 0) + lhs[m,k] * rhs[k,n].
///
/// # Safety
///
/// Strides are in elements. For every `i < m`, `j < n` and `kk < k`:
/// - `dst.offset(i·dst_rs + j·dst_cs)` must be valid for reads and writes (initialized even
///   when `read_dst` is false: the small-product path forms `&mut` slices over it),
/// - `lhs.offset(i·lhs_rs + kk·lhs_cs)` and `rhs.offset(kk·rhs_rs + j·rhs_cs)` must be valid
///   for reads,
///
/// each within a single allocation (when `k` is 0, the row and column starts `lhs + i·lhs_rs`
/// and `rhs + j·rhs_cs` must still be in bounds); the elements of `dst` must not overlap those
/// of `lhs` or `rhs`, and no other thread may read or write those elements of `dst` until the
/// call returns (the product itself may use `threads` rayon workers, all inside this region).
#[allow(clippy::too_many_arguments)]
// SAFETY: sound under the `# Safety` contract above, which each call site (linear, attention,
// memory branch) shows it meets in the comment above the call.
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
    // A few rows (decoding: one query per head or sample) are dot products and axpys: a direct
    // loop beats gemm's packing and dispatch there.
    if m <= 4 && m * n * k <= 1 << 20 {
        // SAFETY: small_gemm has exactly this function's contract, which the caller upholds.
        unsafe { small_gemm(m, n, k, dst, dst_rs, dst_cs, read_dst, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs) };
        return;
    }
    // The product of columns j0..j0+nn (pointers as addresses, so that threads can share it).
    let (d, l, r) = (dst as usize, lhs as usize, rhs as usize);
    let columns = move |j0: usize, nn: usize, par: gemm::Parallelism| {
        // SAFETY: every call below passes j0 + nn <= n, so gemm::gemm reads and writes only
        // strided elements of the m×n, m×k and k×n regions this function's contract makes
        // valid (strides passed column-first, as gemm takes them); it reads dst only when
        // read_dst, and T is f32 or f64 (the only Real types), which gemm supports.
        unsafe {
            gemm::gemm(
                m,
                nn,
                k,
                (d as *mut T).offset(j0 as isize * dst_cs),
                dst_cs,
                dst_rs,
                read_dst,
                l as *const T,
                lhs_cs,
                lhs_rs,
                (r as *const T).offset(j0 as isize * rhs_cs),
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
    };
    if threads > 1 && n >= 32 * threads && m * n * k >= 1 << 20 && split_columns() {
        use rayon::prelude::*;
        // Each thread runs its own block of columns single-threaded: in gemm's parallel mode the
        // calling thread packs the left operand alone first, while the other threads wait. The
        // blocks of dst are disjoint, so no two tasks write one element.
        let per = n.div_ceil(threads).next_multiple_of(16);
        (0..n.div_ceil(per))
            .into_par_iter()
            .for_each(|c| columns(c * per, per.min(n - c * per), gemm::Parallelism::None));
        return;
    }
    columns(0, n, if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None });
}

/// `MEMVP_GEMM_SPLIT=0` leaves the threading to gemm (to compare the two).
fn split_columns() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MEMVP_GEMM_SPLIT").map_or(true, |v| v != "0"))
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

#[cfg(test)]
mod tests {
    use super::{SPINNING, keep_warm};
    use rayon::prelude::*;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    fn until(what: &str, cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(10), "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The other worker spins while `f` runs, takes part in its kernels, and stops when `f`
    /// returns or panics; nested and repeated calls work.
    #[test]
    fn keep_warm_spins_only_while_its_closure_runs() {
        // Told when each worker has exited, i.e. after every job spawned on the pool has run: a
        // spinner job may start after its `keep_warm` has returned, so only then is the count
        // final.
        let (exited, workers_gone) = std::sync::mpsc::channel();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .exit_handler(move |_| {
                // The receiver is gone only if the test already failed.
                let _ = exited.send(());
            })
            .build()
            .unwrap();
        pool.install(|| {
            for round in 0..3 {
                let sum = keep_warm(|| {
                    until("a worker spinning", || SPINNING.load(Ordering::Acquire) == 1);
                    let inner = keep_warm(|| (0..10_000usize).into_par_iter().with_max_len(100).sum::<usize>());
                    let threads: std::collections::HashSet<_> = (0..64)
                        .into_par_iter()
                        .with_max_len(1)
                        .map(|_| {
                            std::thread::sleep(Duration::from_millis(1));
                            rayon::current_thread_index()
                        })
                        .collect();
                    assert_eq!(threads.len(), 2, "round {round}: kernels ran on {threads:?}");
                    inner + round
                });
                assert_eq!(sum, 49_995_000 + round);
                until("the spinning to stop", || SPINNING.load(Ordering::Acquire) == 0);
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| keep_warm(|| panic!("inside"))));
            assert!(r.is_err());
            until("the spinning to stop after a panic", || SPINNING.load(Ordering::Acquire) == 0);
            keep_warm(|| until("a worker spinning again", || SPINNING.load(Ordering::Acquire) == 1));
        });
        drop(pool);
        for _ in 0..2 {
            workers_gone.recv_timeout(Duration::from_secs(10)).expect("the pool's workers to exit");
        }
        assert_eq!(SPINNING.load(Ordering::Acquire), 0, "a spinner outlived its pool");
        // Outside a pool worker it only runs the closure.
        assert_eq!(keep_warm(|| SPINNING.load(Ordering::Acquire)), 0);
    }
}
