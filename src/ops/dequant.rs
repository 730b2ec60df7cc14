//! llama.cpp blocks decoded to f32: the tiles a frozen weight kept in blocks
//! (`--lm-dtype q4_0|q4_k|q6_k|q8_0|keep`; Q4_0 to Q8_0 and Q2_K to Q6_K) is multiplied
//! through. candle's decoders are scalar loops that index the output per value, built for
//! baseline x86-64; in a LLaMA-7B Q4_0 step they took a fifth of the time of the products they
//! feed. These read the block bytes in fixed-size chunks the compiler vectorises, compiled a
//! second time for AVX2 + F16C and picked at run time where the CPU has them. The arithmetic is
//! candle's, in candle's order, so every value equals candle's bit for bit (tests below).

use candle_core::{Result, bail};
use half::f16;

/// `(bytes, values)` per block of each format (llama.cpp's `block_*` structs).
const Q4_0: (usize, usize) = (18, 32);
const Q4_1: (usize, usize) = (20, 32);
const Q5_0: (usize, usize) = (22, 32);
const Q5_1: (usize, usize) = (24, 32);
const Q8_0: (usize, usize) = (34, 32);
const Q2K: (usize, usize) = (84, 256);
const Q3K: (usize, usize) = (110, 256);
const Q4K: (usize, usize) = (144, 256);
const Q5K: (usize, usize) = (176, 256);
const Q6K: (usize, usize) = (210, 256);

#[inline(always)]
fn scale(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0: `d` (f16), then 16 bytes of 4-bit values `q`; value `(q - 8)·d`, low nibbles first.
#[inline(always)]
fn q4_0_block(b: &[u8; Q4_0.0], y: &mut [f32; Q4_0.1]) {
    let d = scale(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        let q = b[2 + j];
        lo[j] = ((q & 0x0F) as i16 - 8) as f32 * d;
        hi[j] = ((q >> 4) as i16 - 8) as f32 * d;
    }
}

/// Q4_1: `d` and `m` (f16), then 16 bytes of 4-bit values `q`; value `q·d + m`.
#[inline(always)]
fn q4_1_block(b: &[u8; Q4_1.0], y: &mut [f32; Q4_1.1]) {
    let (d, m) = (scale(b, 0), scale(b, 2));
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        let q = b[4 + j];
        lo[j] = (q & 0x0F) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of Q5_0 / Q5_1: low nibbles in `qs`, fifth bits in the 32-bit word `qh`
/// (bit `j` for value `j`).
#[inline(always)]
fn q5_values(qh: [u8; 4], qs: &[u8], lo: &mut [f32], hi: &mut [f32], f: impl Fn(u32) -> f32) {
    let qh = u32::from_le_bytes(qh);
    for j in 0..16 {
        let q = qs[j] as u32;
        lo[j] = f((q & 0x0F) | (((qh >> j) << 4) & 0x10));
        hi[j] = f((q >> 4) | ((qh >> (j + 12)) & 0x10));
    }
}

/// Q5_0: `d` (f16), `qh` (4 bytes), 16 bytes of low nibbles; value `(q - 16)·d`.
#[inline(always)]
fn q5_0_block(b: &[u8; Q5_0.0], y: &mut [f32; Q5_0.1]) {
    let d = scale(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    q5_values([b[2], b[3], b[4], b[5]], &b[6..22], lo, hi, |q| (q as i32 - 16) as f32 * d);
}

/// Q5_1: `d` and `m` (f16), `qh` (4 bytes), 16 bytes of low nibbles; value `q·d + m`.
#[inline(always)]
fn q5_1_block(b: &[u8; Q5_1.0], y: &mut [f32; Q5_1.1]) {
    let (d, m) = (scale(b, 0), scale(b, 2));
    let (lo, hi) = y.split_at_mut(16);
    q5_values([b[4], b[5], b[6], b[7]], &b[8..24], lo, hi, |q| q as f32 * d + m);
}

/// Q8_0: `d` (f16), then 32 signed bytes `q`; value `q·d`.
#[inline(always)]
fn q8_0_block(b: &[u8; Q8_0.0], y: &mut [f32; Q8_0.1]) {
    let d = scale(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// Q2_K: 16 bytes of 4-bit scale / min pairs (one per 16 values), 64 bytes of 2-bit values,
/// `d`, `dmin` (f16). Each half of 128 values reads 32 bytes four times, at shifts 0, 2, 4, 6;
/// value `d·(sc & 15)·q - dmin·(sc >> 4)`.
#[inline(always)]
fn q2_k_block(b: &[u8; Q2K.0], y: &mut [f32; Q2K.1]) {
    let (d, min) = (scale(b, 80), scale(b, 82));
    let (ys, _) = y.as_chunks_mut::<16>();
    for (g, y) in ys.iter_mut().enumerate() {
        let q = crumbs(&b[16..80], g);
        let sc = b[g];
        let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
        for i in 0..16 {
            y[i] = dl * q[i] as f32 - ml;
        }
    }
}

/// The 2-bit values of group `g` (16 values) of a Q2_K / Q3_K block, whose 64 bytes of them are
/// `qs`: half `g / 8` of the block reads its 32 bytes four times, at shifts 0, 2, 4, 6, 16 bytes
/// (`g % 2`) per group. The shift is a constant in each arm: x86 has no byte shift by a variable
/// amount, and with one the compiler leaves the loop scalar.
#[inline(always)]
fn crumbs(qs: &[u8], g: usize) -> [u8; 16] {
    #[inline(always)]
    fn at<const S: u32>(q: &[u8; 16]) -> [u8; 16] {
        let mut out = [0u8; 16];
        for i in 0..16 {
            out[i] = (q[i] >> S) & 3;
        }
        out
    }
    let from = 32 * (g / 8) + 16 * (g % 2);
    let q: &[u8; 16] = qs[from..from + 16].try_into().expect("16 bytes");
    match g / 2 % 4 {
        0 => at::<0>(q),
        1 => at::<2>(q),
        2 => at::<4>(q),
        _ => at::<6>(q),
    }
}

/// Q3_K: 32 bytes of high bits `hmask`, 64 bytes of 2-bit values, 12 bytes of 6-bit scales (one
/// per 16 values, offset by 32), `d` (f16). Group `g` of 16 values reads its 2-bit values as
/// Q2_K does and its high bit from `hmask` bit `g / 2`; value `d·(sc - 32)·(q - 4·(1 - h))`.
#[inline(always)]
fn q3_k_block(b: &[u8; Q3K.0], y: &mut [f32; Q3K.1]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let d = scale(b, 108);
    let word = |i: usize| u32::from_le_bytes([b[96 + 4 * i], b[97 + 4 * i], b[98 + 4 * i], b[99 + 4 * i]]);
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let hmask: &[u8; 32] = b[..32].try_into().expect("32 bytes");
    let (ys, _) = y.as_chunks_mut::<16>();
    for (g, y) in ys.iter_mut().enumerate() {
        let q = crumbs(&b[32..96], g);
        let h: &[u8; 16] = hmask[16 * (g % 2)..16 * (g % 2) + 16].try_into().expect("16 bytes");
        let m = 1u8 << (g / 2);
        let sc = aux[g / 4].to_le_bytes()[g % 4] as i8;
        let dl = d * (sc as f32 - 32.0);
        for i in 0..16 {
            y[i] = dl * (q[i] as i8 - if h[i] & m == 0 { 4 } else { 0 }) as f32;
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block, packed in 12 bytes
/// (llama.cpp's `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K and Q5_K: `d`, `dmin` (f16), 12 bytes of 6-bit sub-block scales and mins, then the
/// nibbles `qs` (128 bytes). Each 64 values share 32 bytes: low nibbles for the first 32
/// (sub-block `2i`), high nibbles for the next (`2i + 1`); value `d·sc·q - dmin·m`. `fifth(i, j)`
/// gives the fifth bits (as 16 or 0) of byte `j`'s two values in group `i`.
#[inline(always)]
fn k_nibbles(b: &[u8], qs: &[u8], y: &mut [f32; 256], fifth: impl Fn(usize, usize) -> (u8, u8)) {
    let (d, min) = (scale(b, 0), scale(b, 2));
    let scales = &b[4..16];
    let (qs, _) = qs.as_chunks::<32>();
    let (ys, _) = y.as_chunks_mut::<64>();
    for (i, (y, q)) in ys.iter_mut().zip(qs).enumerate() {
        let (sc, m) = scale_min_k4(2 * i, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * i + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (lo, hi) = y.split_at_mut(32);
        for j in 0..32 {
            let (h1, h2) = fifth(i, j);
            lo[j] = d1 * ((q[j] & 0xF) | h1) as f32 - m1;
            hi[j] = d2 * ((q[j] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q4_K: the nibbles follow the scales.
#[inline(always)]
fn q4_k_block(b: &[u8; Q4K.0], y: &mut [f32; Q4K.1]) {
    k_nibbles(b, &b[16..], y, |_, _| (0, 0));
}

/// Q5_K: 32 bytes `qh` between the scales and the nibbles hold each value's fifth bit (bit `2i`
/// of byte `j` for the low nibbles of group `i`, bit `2i + 1` for its high ones).
#[inline(always)]
fn q5_k_block(b: &[u8; Q5K.0], y: &mut [f32; Q5K.1]) {
    let qh: &[u8; 32] = b[16..48].try_into().expect("32 bytes");
    let bit = |j: usize, at: usize| if qh[j] & (1 << at) != 0 { 16 } else { 0 };
    k_nibbles(b, &b[48..], y, |i, j| (bit(j, 2 * i), bit(j, 2 * i + 1)));
}

/// Q6_K: 128 bytes of low nibbles `ql`, 64 bytes of high 2-bit pairs `qh`, 16 signed scales (one
/// per 16 values), `d` (f16) last; value `d·sc·(q - 32)`. Each half of 128 values reads 64 bytes
/// of `ql` and 32 of `qh`.
#[inline(always)]
fn q6_k_block(b: &[u8; Q6K.0], y: &mut [f32; Q6K.1]) {
    let d = scale(b, 208);
    let (ys, _) = y.as_chunks_mut::<128>();
    for (n, y) in ys.iter_mut().enumerate() {
        let ql: &[u8; 64] = b[64 * n..64 * n + 64].try_into().expect("64 bytes");
        let qh: &[u8; 32] = b[128 + 32 * n..128 + 32 * n + 32].try_into().expect("32 bytes");
        let sc: &[u8; 8] = b[192 + 8 * n..192 + 8 * n + 8].try_into().expect("8 bytes");
        // Two runs of 16 values, each with its own four scales.
        for half in 0..2 {
            let s = |k: usize| d * sc[half + 2 * k] as i8 as f32;
            let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
            for l in 16 * half..16 * half + 16 {
                let (a, c, h) = (ql[l], ql[l + 32], qh[l]);
                y[l] = s0 * (((a & 0xF) | ((h & 3) << 4)) as i8 - 32) as f32;
                y[l + 32] = s1 * (((c & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32) as f32;
                y[l + 64] = s2 * (((a >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32) as f32;
                y[l + 96] = s3 * (((c >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32) as f32;
            }
        }
    }
}

/// Each whole block of `bytes` with its `V` values in `out`.
#[inline(always)]
fn blocks<'a, const B: usize, const V: usize>(
    bytes: &'a [u8],
    out: &'a mut [f32],
) -> impl Iterator<Item = (&'a [u8; B], &'a mut [f32; V])> {
    bytes
        .chunks_exact(B)
        .zip(out.chunks_exact_mut(V))
        .map(|(b, y)| (b.try_into().expect("B bytes"), y.try_into().expect("V values")))
}

/// For each format: the portable loop, the same loop compiled for AVX2 (eight lanes where
/// baseline x86-64 has four) and F16C, and the public entry that checks the sizes and picks one.
/// Each loop calls its block function directly, so that it is inlined and compiled with the
/// loop's features.
macro_rules! decoders {
    ($($(#[$doc:meta])* $pub_name:ident, $name:ident, $avx2:ident, $block:ident, $fmt:ident;)*) => {$(
        #[inline(always)]
        fn $name(bytes: &[u8], out: &mut [f32]) {
            for (b, y) in blocks::<{ $fmt.0 }, { $fmt.1 }>(bytes, out) {
                $block(b, y);
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,f16c")]
        fn $avx2(bytes: &[u8], out: &mut [f32]) {
            $name(bytes, out)
        }
        $(#[$doc])*
        pub fn $pub_name(bytes: &[u8], out: &mut [f32]) -> Result<()> {
            decode(
                stringify!($fmt),
                $fmt,
                bytes,
                out,
                $name,
                #[cfg(target_arch = "x86_64")]
                $avx2,
            )
        }
    )*};
}

decoders! {
    /// Whole Q4_0 blocks (`bytes`) decoded into `out` (32 values per 18-byte block).
    q4_0, q4_0_all, q4_0_avx2, q4_0_block, Q4_0;
    /// Whole Q4_1 blocks (`bytes`) decoded into `out` (32 values per 20-byte block).
    q4_1, q4_1_all, q4_1_avx2, q4_1_block, Q4_1;
    /// Whole Q5_0 blocks (`bytes`) decoded into `out` (32 values per 22-byte block).
    q5_0, q5_0_all, q5_0_avx2, q5_0_block, Q5_0;
    /// Whole Q5_1 blocks (`bytes`) decoded into `out` (32 values per 24-byte block).
    q5_1, q5_1_all, q5_1_avx2, q5_1_block, Q5_1;
    /// Whole Q8_0 blocks (`bytes`) decoded into `out` (32 values per 34-byte block).
    q8_0, q8_0_all, q8_0_avx2, q8_0_block, Q8_0;
    /// Whole Q2_K blocks (`bytes`) decoded into `out` (256 values per 84-byte block).
    q2_k, q2_k_all, q2_k_avx2, q2_k_block, Q2K;
    /// Whole Q3_K blocks (`bytes`) decoded into `out` (256 values per 110-byte block).
    q3_k, q3_k_all, q3_k_avx2, q3_k_block, Q3K;
    /// Whole Q4_K blocks (`bytes`) decoded into `out` (256 values per 144-byte block).
    q4_k, q4_k_all, q4_k_avx2, q4_k_block, Q4K;
    /// Whole Q5_K blocks (`bytes`) decoded into `out` (256 values per 176-byte block).
    q5_k, q5_k_all, q5_k_avx2, q5_k_block, Q5K;
    /// Whole Q6_K blocks (`bytes`) decoded into `out` (256 values per 210-byte block).
    q6_k, q6_k_all, q6_k_avx2, q6_k_block, Q6K;
}

/// Checks that `bytes` are whole blocks of `format` filling `out`, then decodes them with the
/// AVX2 loop where the CPU has AVX2 and F16C, else the portable one.
fn decode(
    name: &str,
    (block_bytes, block_values): (usize, usize),
    bytes: &[u8],
    out: &mut [f32],
    portable: fn(&[u8], &mut [f32]),
    #[cfg(target_arch = "x86_64")] avx2: unsafe fn(&[u8], &mut [f32]),
) -> Result<()> {
    if !bytes.len().is_multiple_of(block_bytes) || out.len() != bytes.len() / block_bytes * block_values {
        let name = name.replace('K', "_K");
        bail!("{name}: {} bytes are not whole blocks filling {} values", bytes.len(), out.len())
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: `avx2` is one of this file's loops compiled for AVX2 + F16C, which the CPU
        // has (checked just above); it has no other precondition.
        unsafe { avx2(bytes, out) };
        return Ok(());
    }
    portable(bytes, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};

    /// Random blocks whose f16 scales (at byte offsets `scales`) are finite f16s of every kind
    /// (zero, subnormal, negative, large of either sign) and whose other bytes, quants and packed
    /// sub-block scales alike, take every value.
    fn blocks(n: usize, bytes_per: usize, scales: &[usize], seed: u64) -> Vec<u8> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut v = vec![0u8; n * bytes_per];
        for (i, b) in v.chunks_mut(bytes_per).enumerate() {
            for byte in b.iter_mut() {
                *byte = (rng.uniform() * 256.0) as u8;
            }
            for &at in scales {
                let h = match i % 4 {
                    0 => f16::from_bits((rng.uniform() * 65536.0) as u16 & 0xFBFF), // finite, either sign
                    1 => f16::from_bits((rng.uniform() * 1024.0) as u16),           // subnormal
                    2 => f16::from_f32(-0.5 + rng.uniform() as f32),
                    _ => f16::ZERO,
                };
                b[at..at + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        v
    }

    type Decoder = fn(&[u8], &mut [f32]) -> Result<()>;

    /// Every format memvp decodes itself: candle's type, `(bytes, values)` per block, where its
    /// f16 scales sit, the public decoder and the portable loop.
    #[allow(clippy::type_complexity)]
    const FORMATS: [(GgmlDType, (usize, usize), &[usize], Decoder, fn(&[u8], &mut [f32])); 10] = [
        (GgmlDType::Q4_0, Q4_0, &[0], q4_0, q4_0_all),
        (GgmlDType::Q4_1, Q4_1, &[0, 2], q4_1, q4_1_all),
        (GgmlDType::Q5_0, Q5_0, &[0], q5_0, q5_0_all),
        (GgmlDType::Q5_1, Q5_1, &[0, 2], q5_1, q5_1_all),
        (GgmlDType::Q8_0, Q8_0, &[0], q8_0, q8_0_all),
        (GgmlDType::Q2K, Q2K, &[80, 82], q2_k, q2_k_all),
        (GgmlDType::Q3K, Q3K, &[108], q3_k, q3_k_all),
        (GgmlDType::Q4K, Q4K, &[0, 2], q4_k, q4_k_all),
        (GgmlDType::Q5K, Q5K, &[0, 2], q5_k, q5_k_all),
        (GgmlDType::Q6K, Q6K, &[208], q6_k, q6_k_all),
    ];

    #[test]
    fn blocks_decode_as_candle_does_bit_for_bit() {
        for (g, (bytes_per, values_per), scales, ours, portable_loop) in FORMATS {
            assert_eq!((g.type_size(), g.block_size()), (bytes_per, values_per), "{g:?}: block size");
            let (rows, cols) = (12, 512);
            let data = blocks(rows * cols / values_per, bytes_per, scales, 7);
            let q = QTensor::new(
                QStorage::from_data(std::borrow::Cow::Owned(data.clone()), &Device::Cpu, g).unwrap(),
                (rows, cols),
            )
            .unwrap();
            let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let mut got = vec![f32::NAN; rows * cols];
            ours(&data, &mut got).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{g:?}: value {i}: {a} against candle's {b}");
            }
            // The portable loop, which CPUs without AVX2 run, gives the same values.
            let mut portable = vec![f32::NAN; rows * cols];
            portable_loop(&data, &mut portable);
            assert!(portable.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{g:?}: portable loop");
        }
    }

    #[test]
    fn partial_blocks_are_refused() {
        let mut out = vec![0f32; 32];
        let e = q4_0(&[0u8; 17], &mut out).unwrap_err().to_string();
        assert!(e.contains("Q4_0") && e.contains("17 bytes"), "{e}");
        let e = q8_0(&[0u8; 34], &mut [0f32; 31]).unwrap_err().to_string();
        assert!(e.contains("31 values"), "{e}");
        let e = q6_k(&[0u8; 211], &mut [0f32; 256]).unwrap_err().to_string();
        assert!(e.contains("Q6_K") && e.contains("211 bytes"), "{e}");
    }
}
