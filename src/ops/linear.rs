//! A frozen linear layer: `y = x Wᵀ + b` whose backward computes the input gradient only.
//! candle's matmul backward would also form `xᵀ dy` for the weight, a full extra matrix product
//! per projection, and keep it in memory, although nothing frozen is ever updated.

use super::weight::Weight;
use super::{Real, cpu_slice, dispatch, fast_path, gemm_strided, num_threads, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`, as stored in checkpoints, in the format the user chose.
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

struct LinearOp {
    weight: Weight,
    bias: Option<Tensor>,
}

pub(crate) fn storage_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(cpu_slice::<T>(c, l)?),
        _ => bail!("linear: weight is not on the CPU"),
    }
}

/// Rows up to which a product against a frozen weight is taken as dot products of each input
/// row with each weight row, reading the weight once in its stored layout, rather than by a
/// matrix product that packs (and, for other formats, decodes) the weight first: decoding
/// steps of a batch of up to this many requests. Every output is then `dot(x_i, w_j)` in one
/// fixed order, so a row's result is the same whatever else is in the batch.
pub(crate) const SKINNY_ROWS: usize = 32;

/// Decodes rows `j0..j1` of a weight into the buffer.
type DecodeRows<'a, W> = &'a (dyn Fn(usize, usize, &mut [W]) -> Result<()> + Sync);

/// The weight of a skinny product: its rows as stored, or decoded on demand.
enum Rows<'a, W> {
    Stored(&'a [W]),
    Decoded(DecodeRows<'a, W>),
}

/// Skinny products `x Wᵀ (+ b)` (`m <= SKINNY_ROWS`): the weight rows are split over the threads
/// by chunks of 48 (whole blocks of both kernel families' 2 and 3 weight rows), and each chunk
/// (as stored, or decoded by the task into its own scratch) is multiplied by every input row
/// while it is in cache (`skinny::dots_block`).
fn skinny<T: Real, W: super::skinny::Stored>(
    x: &[T],
    b: Option<&[T]>,
    m: usize,
    k: usize,
    n: usize,
    w: Rows<'_, W>,
) -> Result<Vec<T>> {
    const CHUNK: usize = 48;
    let mut by_col = vec![T::zero(); n * m];
    by_col.par_chunks_mut(m * CHUNK).enumerate().try_for_each_init(Vec::new, |scratch, (c, out)| {
        let j0 = c * CHUNK;
        let j1 = j0 + out.len() / m;
        let rows: &[W] = match &w {
            Rows::Stored(w) => &w[j0 * k..j1 * k],
            Rows::Decoded(decode) => {
                scratch.resize((j1 - j0) * k, W::default());
                decode(j0, j1, scratch)?;
                scratch
            }
        };
        super::skinny::dots_block(x, m, rows, k, out);
        if let Some(b) = b {
            for (jj, o) in out.chunks_mut(m).enumerate() {
                for v in o {
                    *v = b[j0 + jj] + *v;
                }
            }
        }
        Ok::<_, candle_core::Error>(())
    })?;
    Ok(by_row(&by_col, m, n))
}

/// `[m, n]` row-major from the `[n, m]` column-major results of the few-rows loops.
fn by_row<T: Copy + num_traits::Zero>(by_col: &[T], m: usize, n: usize) -> Vec<T> {
    let mut dst = vec![T::zero(); m * n];
    for j in 0..n {
        for i in 0..m {
            dst[i * n + j] = by_col[j * m + i];
        }
    }
    dst
}

pub(crate) fn linear_fwd<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, m: usize, k: usize, n: usize) -> Vec<T> {
    if m > 0 && m <= SKINNY_ROWS && k > 0 && x.len() >= m * k && w.len() >= n * k && b.is_none_or(|b| b.len() >= n) {
        return skinny(x, b, m, k, n, Rows::Stored(w)).expect("a stored weight is never decoded");
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
    weight_rows(&l.weight, l.bias.as_ref(), x, m)
}

fn weight_rows<T: Real>(weight: &Weight, bias: Option<&Tensor>, x: &[T], m: usize) -> Result<Vec<T>> {
    let (n, k) = weight.dims2()?;
    let run = |b: Option<&[T]>| match weight.dense_as(T::DTYPE) {
        Some(t) => storage_slice::<T, _>(t, |w| Ok(linear_fwd(x, w, b, m, k, n))),
        None => tiled_fwd(weight, x, b, m, k, n),
    };
    match bias {
        Some(b) => storage_slice::<T, _>(b, |b| run(Some(b))),
        None => run(None),
    }
}

/// Rows of a frozen weight per tile: about 4 MB of f32, so that a tile stays in the outer
/// caches and the decoding costs O(n·k) against the product's O(m·n·k).
fn tile_rows(n: usize, k: usize) -> usize {
    ((1usize << 20) / k.max(1)).max(64).min(n.max(1))
}

/// Rows `j0..j1` of `w` decoded into `out` (as `T`), split over the threads.
fn decode_rows<T: Real>(w: &Weight, j0: usize, j1: usize, k: usize, out: &mut [T]) -> Result<()> {
    let per = (j1 - j0).div_ceil(num_threads()).max(1);
    out.par_chunks_mut(per * k).enumerate().try_for_each(|(c, o)| {
        let a = j0 + c * per;
        decode_one(w, a, a + o.len() / k, o)
    })
}

/// `x Wᵀ + b` for a weight held in another format (bf16, f16, llama.cpp blocks): a tile of
/// rows of W at a time is decoded to f32 and multiplied there, so W is never copied whole.
fn tiled_fwd<T: Real>(w: &Weight, x: &[T], b: Option<&[T]>, m: usize, k: usize, n: usize) -> Result<Vec<T>> {
    if x.len() < m * k || b.is_some_and(|b| b.len() < n) {
        bail!("linear: input of {} elements does not fit [{m}, {k}]", x.len())
    }
    if m <= SKINNY_ROWS && w.tensor().is_some_and(|t| t.dtype() == DType::BF16) {
        return few_rows_bf16(w, x, b, m, k, n);
    }
    if m <= SKINNY_ROWS {
        // Decoding: each task decodes its own chunk of rows and takes dot products.
        return skinny(x, b, m, k, n, Rows::Decoded(&|j0, j1, out: &mut [T]| decode_one(w, j0, j1, out)));
    }
    let mut dst = vec![T::zero(); m * n];
    if let Some(b) = b {
        for row in dst.chunks_mut(n) {
            row.copy_from_slice(&b[..n]);
        }
    }
    let tr = tile_rows(n, k);
    let mut tile = vec![T::zero(); tr * k];
    for j0 in (0..n).step_by(tr) {
        let j1 = (j0 + tr).min(n);
        let tn = j1 - j0;
        decode_rows(w, j0, j1, k, &mut tile[..tn * k])?;
        // dst[:, j0..j1] += x · tileᵀ, tileᵀ[kk, j] = tile[j·k + kk].
        // SAFETY: x has m·k elements (checked above), the tile tn·k, and dst m·n with the
        // columns j0..j1 < n addressed at row stride n; dst is a fresh Vec, disjoint from both.
        unsafe {
            gemm_strided(
                m,
                tn,
                k,
                dst.as_mut_ptr().add(j0),
                n as isize,
                1,
                true,
                x.as_ptr(),
                k as isize,
                1,
                tile.as_ptr(),
                1,
                k as isize,
                num_threads(),
            )
        };
    }
    Ok(dst)
}

/// Decoding against bf16 weights: each weight is widened in registers inside the dot product
/// (a bf16 is the top half of an f32), so a token reads 2 bytes per weight and nothing else.
fn few_rows_bf16<T: Real>(w: &Weight, x: &[T], b: Option<&[T]>, m: usize, k: usize, n: usize) -> Result<Vec<T>> {
    let t = w.tensor().expect("a dense weight");
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*st else { bail!("linear: weight is not on the CPU") };
    let wd = cpu_slice::<half::bf16>(c, l)?;
    if wd.len() < n * k || x.len() < m * k {
        bail!("linear: buffers do not fit [{m}, {k}] · [{n}, {k}]ᵀ")
    }
    skinny(x, b, m, k, n, Rows::Stored(wd))
}

/// Rows `j0..j1` decoded on the calling thread (inside a parallel loop).
fn decode_one<T: Real>(w: &Weight, j0: usize, j1: usize, out: &mut [T]) -> Result<()> {
    if T::DTYPE == DType::F32 {
        // SAFETY: `Real` is implemented for f32 and f64 only, and T's dtype is F32, so T is
        // f32: the same size, alignment and bit validity; the slice is borrowed exclusively.
        let o32 = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) };
        return w.rows_f32(j0, j1, o32);
    }
    let mut tmp = vec![0f32; out.len()];
    w.rows_f32(j0, j1, &mut tmp)?;
    for (d, v) in out.iter_mut().zip(tmp) {
        *d = T::from_f64(v as f64);
    }
    Ok(())
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
    let Some(wt) = l.weight.dense_as(T::DTYPE) else {
        return tiled_input_grad(&l.weight, dy, m, n, k, dst, accumulate);
    };
    storage_slice::<T, _>(wt, |w| {
        dense_input_grad(w, dy, m, n, k, dst, accumulate);
        Ok(())
    })
}

/// `dst[m, k] (+)= dy[m, n] · W[n, k]` for a weight the kernels read in place.
fn dense_input_grad<T: Real>(w: &[T], dy: &[T], m: usize, n: usize, k: usize, dst: &mut [T], accumulate: bool) {
    // The product below reads m·n elements of dy and n·k of W and writes m·k of dst through
    // raw pointers; callers derive m, n and k from shapes that nothing here ties to the buffers.
    assert!(
        dy.len() >= m * n && w.len() >= n * k && dst.len() >= m * k,
        "linear: input gradient buffers of {}, {} and {} elements do not fit [{m}, {n}] · [{n}, {k}]",
        dy.len(),
        w.len(),
        dst.len()
    );
    // SAFETY: by the assert above, dst[i·k + j] < m·k, dy[i·n + kk] < m·n and W[kk·k + j] < n·k.
    // dst is an exclusive borrow of initialized data, so it overlaps neither dy nor W and
    // nothing else touches it.
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
}

/// Runs `f` on the rows `[Σ nᵢ, k]` (and the bias) that the layers' weights are consecutive
/// views of, when they are: one buffer, laid out by [`share_storage`]. `None` otherwise.
fn joint<T: Real, R>(ls: &[&Linear], f: impl FnOnce(&[T], Option<&[T]>) -> Result<R>) -> Result<Option<R>> {
    /// The span of `ts` in their common storage, if they are consecutive views of one.
    fn span<T: Real>(ts: &[&Tensor]) -> Option<(usize, usize)> {
        let mut at: Option<(*const T, usize, usize)> = None;
        for t in ts {
            if t.dtype() != T::DTYPE {
                return None;
            }
            let (st, l) = t.storage_and_layout();
            let Storage::Cpu(c) = &*st else { return None };
            let base = c.as_slice::<T>().ok()?.as_ptr();
            let (a, b) = l.contiguous_offsets()?;
            at = match at {
                None => Some((base, a, b)),
                // Two live buffers never share a base address, so an equal base is one storage.
                Some((p, a0, end)) if p == base && a == end => Some((p, a0, b)),
                Some(_) => return None,
            };
        }
        at.map(|(_, a, b)| (a, b))
    }
    let Some(ws) = ls.iter().map(|l| l.weight.dense_as(T::DTYPE)).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let Some((a, b)) = span::<T>(&ws) else { return Ok(None) };
    let biases: Vec<&Tensor> = ls.iter().filter_map(|l| l.bias.as_ref()).collect();
    let bias_span = match biases.len() {
        0 => None,
        n if n == ls.len() => match span::<T>(&biases) {
            Some(s) => Some(s),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let (st, _) = ws[0].storage_and_layout();
    let Storage::Cpu(c) = &*st else { return Ok(None) };
    let w = &c.as_slice::<T>()?[a..b];
    match bias_span {
        None => f(w, None).map(Some),
        Some((ba, bb)) => {
            let (bst, _) = biases[0].storage_and_layout();
            let Storage::Cpu(bc) = &*bst else { return Ok(None) };
            f(w, Some(&bc.as_slice::<T>()?[ba..bb])).map(Some)
        }
    }
}

/// Lays out the weights (and biases) of frozen layers that read the same input (q/k/v, gate/up)
/// as consecutive rows of one buffer, each layer keeping a view of its own rows, so that their
/// products run as one: the input is packed for the matrix product once instead of once per
/// layer, and the input gradient is one product instead of a sum of several. Layers the
/// kernels do not read in place (other formats, trained weights, another device) are left as
/// they are.
pub fn share_storage(ls: &mut [&mut Linear]) -> Result<()> {
    let Some(first) = ls.first() else { return Ok(()) };
    let Some(w0) = first.weight.tensor() else { return Ok(()) };
    let (dtype, k) = (w0.dtype(), w0.dims2()?.1);
    let plain = |t: &Tensor| t.device().is_cpu() && t.dtype() == dtype && t.is_contiguous() && !t.is_variable();
    let dense = ls.iter().all(|l| {
        l.weight.dense_as(dtype).is_some_and(|t| plain(t) && t.dims2().is_ok_and(|(_, c)| c == k))
            && matches!(dtype, DType::F32 | DType::F64)
    });
    let with_bias = ls.iter().filter(|l| l.bias.is_some()).count();
    let biases_fit = with_bias == 0
        || (with_bias == ls.len() && ls.iter().all(|l| l.bias.as_ref().is_some_and(|b| plain(b) && b.rank() == 1)));
    if !dense || !biases_fit || ls.len() < 2 {
        return Ok(());
    }
    let ws: Vec<Tensor> = ls.iter().map(|l| l.weight.tensor().expect("dense").clone()).collect();
    let joint_w = Tensor::cat(&ws, 0)?;
    let joint_b = if with_bias > 0 {
        let bs: Vec<Tensor> = ls.iter().map(|l| l.bias.clone().expect("every layer has a bias")).collect();
        Some(Tensor::cat(&bs, 0)?)
    } else {
        None
    };
    let mut row = 0;
    for l in ls.iter_mut() {
        let n = l.out_features();
        l.weight = Weight::Dense(joint_w.narrow(0, row, n)?);
        if let Some(b) = &joint_b {
            l.bias = Some(b.narrow(0, row, n)?);
        }
        row += n;
    }
    Ok(())
}

/// `x [W₁; W₂; …]ᵀ (+ [b₁; b₂; …])`: `[m, Σ nᵢ]` for layers reading the same input `x [m, k]`,
/// as one product when their weights share storage, else layer by layer.
pub(crate) fn linear_rows_cat<T: Real>(ls: &[&Linear], x: &[T], m: usize) -> Result<Vec<T>> {
    let k = ls.first().map_or(0, |l| l.in_features());
    let total: usize = ls.iter().map(|l| l.out_features()).sum();
    if let Some(y) = joint::<T, _>(ls, |w, b| Ok(linear_fwd(x, w, b, m, k, total)))? {
        return Ok(y);
    }
    let mut y = vec![T::zero(); m * total];
    let mut col = 0;
    for l in ls {
        let n = l.out_features();
        let part = linear_rows(l, x, m)?;
        for (dst, src) in y.chunks_mut(total).zip(part.chunks(n)) {
            dst[col..col + n].copy_from_slice(src);
        }
        col += n;
    }
    Ok(y)
}

/// `dst (+)= dy [W₁; W₂; …]` for `dy [m, Σ nᵢ]`: the input gradient of layers that read the
/// same input, as one product when their weights share storage.
pub(crate) fn linear_input_grad_cat<T: Real>(
    ls: &[&Linear],
    dy: &[T],
    m: usize,
    dst: &mut [T],
    accumulate: bool,
) -> Result<()> {
    let k = ls.first().map_or(0, |l| l.in_features());
    let total: usize = ls.iter().map(|l| l.out_features()).sum();
    if dy.len() < m * total || dst.len() < m * k {
        bail!(
            "linear: input gradient buffers of {} and {} elements do not fit [{m}, {total}] · [{total}, {k}]",
            dy.len(),
            dst.len()
        )
    }
    let one_product = |w: &[T], _: Option<&[T]>| {
        dense_input_grad(w, dy, m, total, k, dst, accumulate);
        Ok(())
    };
    if joint::<T, _>(ls, one_product)?.is_some() {
        return Ok(());
    }
    let mut col = 0;
    for (i, l) in ls.iter().enumerate() {
        let n = l.out_features();
        let part: Vec<T> = dy.chunks(total).take(m).flat_map(|r| r[col..col + n].iter().copied()).collect();
        linear_input_grad(l, &part, m, dst, accumulate || i > 0)?;
        col += n;
    }
    Ok(())
}

/// `dst (+)= dy · W` for a weight held in another format, a tile of rows of W at a time.
fn tiled_input_grad<T: Real>(
    w: &Weight,
    dy: &[T],
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
) -> Result<()> {
    let tr = tile_rows(n, k);
    let mut tile = vec![T::zero(); tr * k];
    for (t, j0) in (0..n).step_by(tr).enumerate() {
        let j1 = (j0 + tr).min(n);
        let tn = j1 - j0;
        decode_rows(w, j0, j1, k, &mut tile[..tn * k])?;
        // dst[m, k] (+)= dy[:, j0..j1] · tile[tn, k].
        // SAFETY: the caller checked dy.len() >= m·n and dst.len() >= m·k; dy's columns
        // j0..j1 < n are read at row stride n, the tile has tn·k elements, and dst is an
        // exclusive borrow, disjoint from dy and from the tile.
        unsafe {
            gemm_strided(
                m,
                k,
                tn,
                dst.as_mut_ptr(),
                k as isize,
                1,
                accumulate || t > 0,
                dy.as_ptr().add(j0),
                n as isize,
                1,
                tile.as_ptr(),
                k as isize,
                1,
                num_threads(),
            )
        };
    }
    Ok(())
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
        let out = match s.dtype() {
            DType::F32 => {
                f32::to_cpu_storage_owned(weight_rows::<f32>(&self.weight, self.bias.as_ref(), cpu_slice(s, l)?, m)?)
            }
            DType::F64 => {
                f64::to_cpu_storage_owned(weight_rows::<f64>(&self.weight, self.bias.as_ref(), cpu_slice(s, l)?, m)?)
            }
            dt => bail!("linear: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from(out_dims)))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // dx = dy · W; nothing is formed for W.
        let (n, k) = self.weight.dims2()?;
        let m = dy.elem_count() / n;
        if let Some(w) = self.weight.dense_as(dy.dtype()) {
            let dx = dy.reshape((m, n))?.matmul(w)?;
            return Ok(Some(dx.reshape(x.dims())?));
        }
        let l = Linear { weight: self.weight.clone(), bias: None };
        let dx = match dy.dtype() {
            DType::F32 => Tensor::from_vec(grad_rows::<f32>(&l, dy, m, k)?, x.dims(), x.device())?,
            DType::F64 => Tensor::from_vec(grad_rows::<f64>(&l, dy, m, k)?, x.dims(), x.device())?,
            dt => bail!("linear backward: unsupported dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}

fn grad_rows<T: Real>(l: &Linear, dy: &Tensor, m: usize, k: usize) -> Result<Vec<T>> {
    let mut dx = vec![T::zero(); m * k];
    with_slice::<T, _>(dy, |g| linear_input_grad(l, g, m, &mut dx, false))?;
    Ok(dx)
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
    pub fn new(weight: impl Into<Weight>, bias: Option<Tensor>) -> Self {
        Self { weight: weight.into(), bias }
    }

    /// Whether the custom kernels can compute with this layer: a frozen weight they can read.
    pub(crate) fn kernel_ready(&self) -> bool {
        !self.weight.is_variable() && self.weight.readable()
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
        let fast = fast_path(x) && self.kernel_ready() && !CANDLE_MATMUL.load(std::sync::atomic::Ordering::Relaxed);
        dispatch(
            fast,
            [x],
            Tensor::contiguous,
            || Ok((LinearOp { weight: self.weight.clone(), bias: self.bias.clone() }, x.track_op())),
            || {
                if self.weight.is_variable() || candle_matmul_on() {
                    let y = x.broadcast_matmul(&self.weight.to_dense(x.dtype())?.t()?)?;
                    return match &self.bias {
                        Some(b) => y.broadcast_add(b),
                        None => Ok(y),
                    };
                }
                super::generic::linear(x, &self.weight, self.bias.as_ref())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn layers(fmt: super::super::WeightFormat, bias: bool) -> Vec<Linear> {
        [(12, 1), (8, 2), (8, 3)]
            .into_iter()
            .map(|(n, seed)| {
                let t = Tensor::randn(0f32, 1.0, (n, 64), &Device::Cpu).unwrap();
                let b = bias.then(|| Tensor::full(seed as f32, n, &Device::Cpu).unwrap());
                Linear::new(Weight::convert(t, fmt).unwrap(), b)
            })
            .collect()
    }

    /// `[m, Σn]` of the layers one by one.
    fn one_by_one(ls: &[&Linear], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        ls.iter().map(|l| linear_rows(l, x, m).unwrap()).collect()
    }

    #[test]
    fn shared_layers_run_as_one_product_with_the_same_results() {
        use super::super::WeightFormat as F;
        let m = 40;
        let x: Vec<f32> = (0..m * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let dy: Vec<f32> = (0..m * 28).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
        for (fmt, bias, share, joint_expected) in [
            (F::F32, false, true, true),
            (F::F32, true, true, true),
            (F::F32, true, false, false),
            (F::Bf16, false, true, false),
            (F::Q8_0, true, true, false),
        ] {
            let mut ls = layers(fmt, bias);
            let want = {
                let refs: Vec<&Linear> = ls.iter().collect();
                one_by_one(&refs, &x, m)
            };
            if share {
                let mut muts: Vec<&mut Linear> = ls.iter_mut().collect();
                share_storage(&mut muts).unwrap();
            }
            let refs: Vec<&Linear> = ls.iter().collect();
            let is_joint = joint::<f32, _>(&refs, |_, _| Ok(())).unwrap().is_some();
            assert_eq!(is_joint, joint_expected, "{fmt} bias={bias} share={share}");
            let got = linear_rows_cat(&refs, &x, m).unwrap();
            let mut col = 0;
            for w in &want {
                let n = w.len() / m;
                for i in 0..m {
                    for j in 0..n {
                        let (g, e) = (got[i * 28 + col + j], w[i * n + j]);
                        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{fmt}: y[{i}, {}] {g} vs {e}", col + j);
                    }
                }
                col += n;
            }
            // The input gradient: one product, or the sum of the layers' own.
            let mut dx = vec![0f32; m * 64];
            linear_input_grad_cat(&refs, &dy, m, &mut dx, false).unwrap();
            let mut want_dx = vec![0f32; m * 64];
            let mut col = 0;
            for (i, l) in refs.iter().enumerate() {
                let n = l.out_features();
                let part: Vec<f32> = dy.chunks(28).flat_map(|r| r[col..col + n].to_vec()).collect();
                linear_input_grad(l, &part, m, &mut want_dx, i > 0).unwrap();
                col += n;
            }
            for (g, e) in dx.iter().zip(&want_dx) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{fmt}: dx {g} vs {e}");
            }
        }
    }
}
