//! Skinny products `out[j·m + i] = x_i · w_j` for a few input rows (a decoding batch) against
//! the rows of a frozen weight as stored (f32, or bf16 widened in registers): the weight is read
//! once, in its own layout, with no packing. Every output is one dot product in a fixed order
//! whatever `m` is, so a row's result does not depend on the other rows of the batch.
//!
//! On x86-64 CPUs the f32 work runs in hand-written kernels chosen at run time (no build flag):
//! with AVX-512, blocks of up to eight input rows by three weight rows, sixteen lanes per
//! instruction and 24 of the 32 registers holding sums, so each weight vector loaded serves
//! eight rows; with AVX2 and FMA, blocks of four rows by two weight rows, eight lanes. A machine
//! always takes the same kernel family, whatever the batch, so results stay batch-independent.
//! Elsewhere (and for f64, used by the gradient checks) it runs portable loops with eight
//! partial sums, which the compiler vectorises to the baseline ISA.

use super::Real;

/// Weight element types the kernels read.
pub(crate) trait Stored: Copy + Default + Send + Sync + 'static {
    fn widen<T: Real>(self) -> T;
    /// Whether the element is a bf16 (read by the x86 kernel as 16-bit lanes).
    const IS_BF16: bool;
}

impl Stored for f32 {
    #[inline(always)]
    fn widen<T: Real>(self) -> T {
        T::from(self).expect("f32 fits")
    }
    const IS_BF16: bool = false;
}

impl Stored for f64 {
    #[inline(always)]
    fn widen<T: Real>(self) -> T {
        T::from(self).expect("f64 fits")
    }
    const IS_BF16: bool = false;
}

impl Stored for half::bf16 {
    #[inline(always)]
    fn widen<T: Real>(self) -> T {
        // A bf16 is the top half of an f32.
        T::from(f32::from_bits((self.to_bits() as u32) << 16)).expect("f32 fits")
    }
    const IS_BF16: bool = true;
}

/// `out[jj·m + i] = x_i · w_jj` for the `m` rows of `x` (each `k` long) and the rows of `w` (as
/// many as `out` holds).
pub(crate) fn dots_block<T: Real, W: Stored>(x: &[T], m: usize, w: &[W], k: usize, out: &mut [T]) {
    let nw = out.len() / m.max(1);
    assert!(x.len() >= m * k && w.len() >= nw * k, "skinny product: buffers do not fit");
    #[cfg(target_arch = "x86_64")]
    if let Some(x32) = as_f32(x)
        && (std::any::TypeId::of::<W>() == std::any::TypeId::of::<f32>() || W::IS_BF16)
        && let Some(level) = x86::level()
    {
        // SAFETY: T is f32 (as_f32 checked its dtype), so out's elements are f32 with the same layout.
        let out32 = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) };
        let wp = w.as_ptr() as *const u8;
        // SAFETY: the CPU has the level's features (x86::level checked them); W is f32 or bf16,
        // both read as their own bits; the lengths were checked by the assert above.
        unsafe {
            match (level, W::IS_BF16) {
                (x86::Level::Avx512, true) => x86::dots_block_512::<true>(x32, m, wp, nw, k, out32),
                (x86::Level::Avx512, false) => x86::dots_block_512::<false>(x32, m, wp, nw, k, out32),
                (_, true) => x86::dots_block::<true>(x32, m, wp, nw, k, out32),
                (_, false) => x86::dots_block::<false>(x32, m, wp, nw, k, out32),
            }
        };
        return;
    }
    portable(x, m, w, nw, k, out);
}

/// `s` as f32 values when `T` is f32.
fn as_f32<T: Real>(s: &[T]) -> Option<&[f32]> {
    // SAFETY: `Real` is implemented for f32 and f64 only, so T is f32 when its dtype is F32:
    // the same size, alignment and bit validity; the borrow is shared and keeps its length.
    (T::DTYPE == candle_core::DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

/// Eight partial sums per product, reduced as `ops::dot` reduces them.
fn portable<T: Real, W: Stored>(x: &[T], m: usize, w: &[W], nw: usize, k: usize, out: &mut [T]) {
    let full = k - k % 8;
    for j in 0..nw {
        let wj = &w[j * k..(j + 1) * k];
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc = [T::zero(); 8];
            for (a, b) in xi[..full].chunks_exact(8).zip(wj[..full].chunks_exact(8)) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l].widen::<T>();
                }
            }
            let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for q in full..k {
                s += xi[q] * wj[q].widen::<T>();
            }
            out[j * m + i] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(super) enum Level {
        Avx2,
        Avx512,
    }

    /// The widest kernel family this CPU runs; `MEMVP_NO_AVX512=1` keeps AVX2 (to compare them).
    pub(super) fn level() -> Option<Level> {
        static LEVEL: std::sync::OnceLock<Option<Level>> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            let no512 = std::env::var_os("MEMVP_NO_AVX512").is_some_and(|v| v == "1");
            if avx512 && !no512 {
                Some(Level::Avx512)
            } else if avx2 {
                Some(Level::Avx2)
            } else {
                None
            }
        })
    }

    /// Sixteen weights from `p` (f32, or bf16 widened into the top half of an f32).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16<const BF16: bool>(p: *const u8) -> __m512 {
        // SAFETY: the caller gives 16 readable elements at p (64 bytes of f32 or 32 of bf16).
        unsafe {
            if BF16 {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            } else {
                _mm512_loadu_ps(p as *const f32)
            }
        }
    }

    /// Eight weights from `p` (f32, or bf16 widened: shifted into the top half of an f32).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8<const BF16: bool>(p: *const u8) -> __m256 {
        // SAFETY: the caller gives 8 readable elements at p (32 bytes of f32 or 16 of bf16).
        unsafe {
            if BF16 {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            } else {
                _mm256_loadu_ps(p as *const f32)
            }
        }
    }

    /// # Safety
    /// One readable element (f32, or bf16 when `BF16`) at p.
    #[inline(always)]
    unsafe fn widen1<const BF16: bool>(p: *const u8) -> f32 {
        // SAFETY: the caller gives one readable element at p.
        unsafe {
            if BF16 {
                f32::from_bits((std::ptr::read_unaligned(p as *const u16) as u32) << 16)
            } else {
                std::ptr::read_unaligned(p as *const f32)
            }
        }
    }

    /// The lanes of one sum in a fixed tree: sixteen folded to eight, then pairs of pairs.
    #[inline(always)]
    fn sum_lanes<const L: usize>(a: [f32; L]) -> f32 {
        debug_assert!(L == 8 || L == 16);
        let h: [f32; 8] = std::array::from_fn(|l| if L == 16 { a[l] + a[l + 8] } else { a[l] });
        ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
    }

    /// One kernel family: `$name::<R, C, BF16>` forms the `R x C` products of input rows
    /// `i0..i0+R` with weight rows `j0..j0+C`, `$lanes` lanes per instruction, each sum's
    /// lanes reduced by `sum_lanes`, then the tail past a multiple of `$lanes`.
    macro_rules! kernel {
        ($name:ident, $feat:literal, $lanes:literal, $v:ty, $zero:ident, $loadx:ident, $loadw:ident, $fma:ident, $store:ident) => {
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn $name<const R: usize, const C: usize, const BF16: bool>(
                x: &[f32],
                i0: usize,
                w: *const u8,
                j0: usize,
                k: usize,
                out: &mut [f32],
                m: usize,
            ) {
                let es = if BF16 { 2 } else { 4 };
                let xr: [*const f32; R] = std::array::from_fn(|r| x[(i0 + r) * k..].as_ptr());
                // SAFETY (for every pointer formed and read below): the caller guarantees rows
                // j0..j0+C of w (k elements of es bytes each) and rows i0..i0+R of x are in
                // bounds; p + lanes <= full <= k, and the tail reads q < k.
                unsafe {
                    let wr: [*const u8; C] = std::array::from_fn(|c| w.add((j0 + c) * k * es));
                    let full = k - k % $lanes;
                    let mut acc: [[$v; C]; R] = [[$zero(); C]; R];
                    let mut p = 0;
                    while p < full {
                        let wv: [$v; C] = std::array::from_fn(|c| $loadw::<BF16>(wr[c].add(p * es)));
                        for r in 0..R {
                            let xv = $loadx(xr[r].add(p));
                            for c in 0..C {
                                acc[r][c] = $fma(xv, wv[c], acc[r][c]);
                            }
                        }
                        p += $lanes;
                    }
                    for r in 0..R {
                        for c in 0..C {
                            let mut a = [0f32; $lanes];
                            $store(a.as_mut_ptr(), acc[r][c]);
                            let mut s = sum_lanes(a);
                            for q in full..k {
                                s += *xr[r].add(q) * widen1::<BF16>(wr[c].add(q * es));
                            }
                            out[(j0 + c) * m + i0 + r] = s;
                        }
                    }
                }
            }
        };
    }
    kernel!(dots8, "avx2,fma", 8, __m256, _mm256_setzero_ps, _mm256_loadu_ps, load8, _mm256_fmadd_ps, _mm256_storeu_ps);
    kernel!(
        dots16,
        "avx512f,avx512bw",
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        load16,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );

    /// Calls `f(r, c, i, j)` for the blocks of at most `rmax` input rows by `cmax` weight rows
    /// that tile the `m x nw` products.
    #[inline(always)]
    fn blocks(m: usize, nw: usize, rmax: usize, cmax: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut j = 0;
        while j < nw {
            let c = (nw - j).min(cmax);
            let mut i = 0;
            while i < m {
                let r = (m - i).min(rmax);
                f(r, c, i, j);
                i += r;
            }
            j += c;
        }
    }

    /// `$call!(R, C)` for the runtime `$r` and `$c`, over the listed block sizes.
    macro_rules! pick {
        ($call:ident; $r:expr, $c:expr; [$($rr:literal)*]; $cs:tt) => {
            match $r {
                $($rr => pick!(@cols $call; $rr, $c; $cs),)*
                _ => unreachable!("no kernel for {} input rows", $r),
            }
        };
        (@cols $call:ident; $rr:literal, $c:expr; [$($cc:literal)*]) => {
            match $c {
                $($cc => $call!($rr, $cc),)*
                _ => unreachable!("no kernel for {} weight rows", $c),
            }
        };
    }

    /// A family's entry point `$name::<BF16>`: every block of the `m x nw` products, in blocks
    /// of up to `$rows` input rows by `$cols` weight rows, each by `$kernel`.
    ///
    /// # Safety (of the generated function)
    /// The CPU has `$feat`; `x` holds `m·k` f32, `w` holds `nw·k` elements (f32, or bf16 when
    /// `BF16`), `out` holds `nw·m`.
    macro_rules! entry {
        ($name:ident, $kernel:ident, $feat:literal, $rows:tt, $cols:tt, $rmax:literal, $cmax:literal) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const BF16: bool>(
                x: &[f32],
                m: usize,
                w: *const u8,
                nw: usize,
                k: usize,
                out: &mut [f32],
            ) {
                blocks(m, nw, $rmax, $cmax, |r, c, i, j| {
                    macro_rules! call {
                        ($rr:literal, $cc:literal) => {
                            // SAFETY: i + r <= m and j + c <= nw: the rows read are in bounds.
                            unsafe { $kernel::<$rr, $cc, BF16>(x, i, w, j, k, out, m) }
                        };
                    }
                    pick!(call; r, c; $rows; $cols)
                })
            }
        };
    }
    entry!(dots_block, dots8, "avx2,fma", [1 2 3 4], [1 2], 4, 2);
    entry!(dots_block_512, dots16, "avx512f,avx512bw", [1 2 3 4 5 6 7 8], [1 2 3], 8, 3);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    type Kernel = fn(&[f32], usize, &[f32], &[half::bf16], usize, &mut [f32], &mut [f32]);

    /// The entry point, and on x86-64 each kernel family this CPU can run, called directly.
    fn kernels() -> Vec<(&'static str, Kernel)> {
        let mut ks: Vec<(&'static str, Kernel)> = vec![("dispatch", |x, m, w, wb, k, o, ob| {
            dots_block(x, m, w, k, o);
            dots_block(x, m, wb, k, ob);
        })];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                ks.push(("avx2", |x, m, w, wb, k, o, ob| {
                    let nw = o.len() / m;
                    // SAFETY: AVX2 and FMA were detected; the buffers hold m·k, nw·k and nw·m.
                    unsafe {
                        x86::dots_block::<false>(x, m, w.as_ptr() as *const u8, nw, k, o);
                        x86::dots_block::<true>(x, m, wb.as_ptr() as *const u8, nw, k, ob);
                    }
                }));
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                ks.push(("avx512", |x, m, w, wb, k, o, ob| {
                    let nw = o.len() / m;
                    // SAFETY: AVX-512F and BW were detected; the buffers hold m·k, nw·k and nw·m.
                    unsafe {
                        x86::dots_block_512::<false>(x, m, w.as_ptr() as *const u8, nw, k, o);
                        x86::dots_block_512::<true>(x, m, wb.as_ptr() as *const u8, nw, k, ob);
                    }
                }));
            }
        }
        ks
    }

    /// Every block shape and tail of every kernel against a plain f64 product (f32 and bf16
    /// weights), and the same row computed alone and among others gives the same bits.
    #[test]
    fn skinny_products_match_a_plain_product_and_do_not_depend_on_the_batch() {
        for (name, kernel) in kernels() {
            check_kernel(name, kernel);
        }
    }

    fn check_kernel(name: &str, kernel: Kernel) {
        for &k in &[1usize, 7, 8, 9, 16, 17, 40, 64, 70] {
            for m in 1..=17 {
                for nw in 1..=7 {
                    let (x, w) = (vals(m * k, 1 + k as u64), vals(nw * k, 2 + m as u64));
                    let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
                    let mut out = vec![0f32; nw * m];
                    let mut outb = vec![0f32; nw * m];
                    kernel(&x, m, &w, &wb, k, &mut out, &mut outb);
                    for j in 0..nw {
                        for i in 0..m {
                            let (mut e, mut eb) = (0f64, 0f64);
                            for q in 0..k {
                                e += x[i * k + q] as f64 * w[j * k + q] as f64;
                                eb += x[i * k + q] as f64 * wb[j * k + q].to_f64();
                            }
                            let tol = 1e-5 * (1.0 + k as f64);
                            let at = format!("{name} k {k} m {m} nw {nw} ({i}, {j})");
                            assert!((out[j * m + i] as f64 - e).abs() < tol, "{at}");
                            assert!((outb[j * m + i] as f64 - eb).abs() < tol, "bf16 {at}");
                            let (mut alone, mut aloneb) = (vec![0f32; nw], vec![0f32; nw]);
                            kernel(&x[i * k..(i + 1) * k], 1, &w, &wb, k, &mut alone, &mut aloneb);
                            assert_eq!(alone[j].to_bits(), out[j * m + i].to_bits(), "alone {at}");
                            assert_eq!(aloneb[j].to_bits(), outb[j * m + i].to_bits(), "alone bf16 {at}");
                        }
                    }
                }
            }
        }
    }
}
