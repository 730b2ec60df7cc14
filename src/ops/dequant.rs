//! llama.cpp blocks decoded to f32: the tiles a frozen weight kept as Q4_0, Q4_1 or Q8_0
//! (`--lm-dtype q4_0|q8_0|keep`) is multiplied through. candle's decoders are scalar loops that
//! index the output per value, built for baseline x86-64; in a LLaMA-7B Q4_0 step they took a
//! fifth of the time of the products they feed. These read the block bytes in fixed-size
//! chunks the compiler vectorises, compiled a second time for AVX2 + F16C and picked at run time
//! where the CPU has them. The arithmetic is candle's, in candle's order, so every value equals
//! candle's bit for bit (tests below).

use candle_core::{Result, bail};
use half::f16;

/// `(bytes, values)` per block of each format.
const Q4_0: (usize, usize) = (18, 32);
const Q4_1: (usize, usize) = (20, 32);
const Q8_0: (usize, usize) = (34, 32);

#[inline(always)]
fn scale(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0: `d` (f16), then 16 bytes of 4-bit values `q`; value `(q - 8)·d`, low nibbles first.
#[inline(always)]
fn q4_0_block(b: &[u8; Q4_0.0], y: &mut [f32; 32]) {
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
fn q4_1_block(b: &[u8; Q4_1.0], y: &mut [f32; 32]) {
    let (d, m) = (scale(b, 0), scale(b, 2));
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        let q = b[4 + j];
        lo[j] = (q & 0x0F) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

/// Q8_0: `d` (f16), then 32 signed bytes `q`; value `q·d`.
#[inline(always)]
fn q8_0_block(b: &[u8; Q8_0.0], y: &mut [f32; 32]) {
    let d = scale(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// Each whole block of `bytes` with its 32 values in `out`.
#[inline(always)]
fn blocks<'a, const B: usize>(
    bytes: &'a [u8],
    out: &'a mut [f32],
) -> impl Iterator<Item = (&'a [u8; B], &'a mut [f32; 32])> {
    bytes
        .chunks_exact(B)
        .zip(out.chunks_exact_mut(32))
        .map(|(b, y)| (b.try_into().expect("B bytes"), y.try_into().expect("32 values")))
}

/// The portable loops, and the same loops compiled for AVX2 (eight lanes where baseline x86-64
/// has four) and F16C. Each calls its block function directly, so that it is inlined and
/// compiled with the loop's features.
macro_rules! decoders {
    ($($name:ident, $avx2:ident, $block:ident, $bytes:expr;)*) => {$(
        #[inline(always)]
        fn $name(bytes: &[u8], out: &mut [f32]) {
            for (b, y) in blocks::<{ $bytes }>(bytes, out) {
                $block(b, y);
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,f16c")]
        fn $avx2(bytes: &[u8], out: &mut [f32]) {
            $name(bytes, out)
        }
    )*};
}

decoders! {
    q4_0_all, q4_0_avx2, q4_0_block, Q4_0.0;
    q4_1_all, q4_1_avx2, q4_1_block, Q4_1.0;
    q8_0_all, q8_0_avx2, q8_0_block, Q8_0.0;
}

/// Checks that `bytes` are whole blocks of `block_bytes` filling `out`, then decodes them with
/// the AVX2 loop where the CPU has AVX2 and F16C, else the portable one.
fn decode(
    name: &str,
    block_bytes: usize,
    bytes: &[u8],
    out: &mut [f32],
    portable: fn(&[u8], &mut [f32]),
    #[cfg(target_arch = "x86_64")] avx2: unsafe fn(&[u8], &mut [f32]),
) -> Result<()> {
    if !bytes.len().is_multiple_of(block_bytes) || out.len() != bytes.len() / block_bytes * 32 {
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

/// Whole Q4_0 blocks (`bytes`) decoded into `out` (32 values per 18-byte block).
pub fn q4_0(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    decode(
        "Q4_0",
        Q4_0.0,
        bytes,
        out,
        q4_0_all,
        #[cfg(target_arch = "x86_64")]
        q4_0_avx2,
    )
}

/// Whole Q4_1 blocks (`bytes`) decoded into `out` (32 values per 20-byte block).
pub fn q4_1(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    decode(
        "Q4_1",
        Q4_1.0,
        bytes,
        out,
        q4_1_all,
        #[cfg(target_arch = "x86_64")]
        q4_1_avx2,
    )
}

/// Whole Q8_0 blocks (`bytes`) decoded into `out` (32 values per 34-byte block).
pub fn q8_0(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    decode(
        "Q8_0",
        Q8_0.0,
        bytes,
        out,
        q8_0_all,
        #[cfg(target_arch = "x86_64")]
        q8_0_avx2,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};

    /// Random blocks whose scales are finite f16s of every kind (zero, subnormal, negative,
    /// large) and whose quants take every value.
    fn blocks(n: usize, bytes_per: usize, scales: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut v = vec![0u8; n * bytes_per];
        for (i, b) in v.chunks_mut(bytes_per).enumerate() {
            for byte in b.iter_mut() {
                *byte = (rng.uniform() * 256.0) as u8;
            }
            for s in 0..scales {
                let h = match i % 4 {
                    0 => f16::from_bits((rng.uniform() * 65536.0) as u16 & 0xFBFF), // finite, either sign
                    1 => f16::from_bits((rng.uniform() * 1024.0) as u16),           // subnormal
                    2 => f16::from_f32(-0.5 + rng.uniform() as f32),
                    _ => f16::ZERO,
                };
                b[2 * s..2 * s + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        v
    }

    #[test]
    fn blocks_decode_as_candle_does_bit_for_bit() {
        type Decoder = fn(&[u8], &mut [f32]) -> Result<()>;
        let cases: [(GgmlDType, usize, usize, Decoder); 3] =
            [(GgmlDType::Q4_0, 18, 1, q4_0), (GgmlDType::Q4_1, 20, 2, q4_1), (GgmlDType::Q8_0, 34, 1, q8_0)];
        for (g, bytes_per, scales, ours) in cases {
            let (rows, cols) = (12, 256);
            let data = blocks(rows * cols / 32, bytes_per, scales, 7);
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
            match g {
                GgmlDType::Q4_0 => q4_0_all(&data, &mut portable),
                GgmlDType::Q4_1 => q4_1_all(&data, &mut portable),
                _ => q8_0_all(&data, &mut portable),
            }
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
    }
}
