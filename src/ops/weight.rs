//! A frozen matrix as it is held in memory: f32 (or f64 for gradient checks), bf16/f16, or
//! llama.cpp blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...). A LLaMA-7B base is 27 GB in f32,
//! 13.5 GB in bf16 and 3.8 GB in Q4_0; since MemVP never updates it, it can stay in whatever
//! format it was stored in. The kernels read a tile of rows at a time as f32 (`rows_f32`) and
//! multiply it in f32, so no f32 copy of a whole weight is ever formed.

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Storage, Tensor, bail};
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The format frozen matrices are kept in, as the user asks for it (`--lm-dtype`,
/// `--vision-dtype`). Norms, biases and position tables stay in the working dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WeightFormat {
    /// f32 on the CPU (memvp's kernels), bf16 on a GPU (tensor-core products).
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "f16")]
    F16,
    /// As stored in the checkpoint: bf16/f16 safetensors stay 16-bit, GGUF blocks stay quantized.
    #[serde(rename = "keep")]
    Keep,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_1")]
    Q4_1,
    #[serde(rename = "q4_k")]
    Q4K,
    #[serde(rename = "q6_k")]
    Q6K,
}

impl WeightFormat {
    pub const ALL: &'static [(&'static str, WeightFormat)] = &[
        ("auto", Self::Auto),
        ("f32", Self::F32),
        ("bf16", Self::Bf16),
        ("f16", Self::F16),
        ("keep", Self::Keep),
        ("q8_0", Self::Q8_0),
        ("q4_0", Self::Q4_0),
        ("q4_1", Self::Q4_1),
        ("q4_k", Self::Q4K),
        ("q6_k", Self::Q6K),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, f)| *f == self).map(|(n, _)| *n).unwrap_or("?")
    }

    /// `Auto` made concrete for a device; other formats as they are.
    pub fn resolve(self, dev: &candle_core::Device) -> Self {
        match self {
            Self::Auto if dev.is_cpu() => Self::F32,
            Self::Auto => Self::Bf16,
            f => f,
        }
    }

    /// The llama.cpp block type a quantizing format converts to.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4_1 => Some(GgmlDType::Q4_1),
            Self::Q4K => Some(GgmlDType::Q4K),
            Self::Q6K => Some(GgmlDType::Q6K),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let l = s.to_ascii_lowercase();
        Self::ALL.iter().find(|(n, _)| *n == l).map(|(_, f)| *f).ok_or_else(|| {
            format!(
                "unknown weight format `{s}` (one of {})",
                Self::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// A frozen matrix `[rows, cols]` (checkpoint layout `[out, in]`).
#[derive(Clone, Debug)]
pub enum Weight {
    /// f32/f64 (the working dtype: kernels read it in place) or bf16/f16 (read a tile at a time).
    Dense(Tensor),
    /// llama.cpp blocks along each row.
    Quant(Arc<QTensor>),
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::Dense(t)
    }
}

impl Weight {
    /// `t` (any float dtype, `[rows, cols]`) converted to `format`. `Keep` and `F32` leave it
    /// as it is (the caller has already chosen the working dtype or the stored one).
    pub fn convert(t: Tensor, format: WeightFormat) -> Result<Self> {
        match format.resolve(t.device()) {
            WeightFormat::F32 | WeightFormat::Keep | WeightFormat::Auto => Ok(Weight::Dense(t)),
            WeightFormat::Bf16 => Ok(Weight::Dense(t.to_dtype(DType::BF16)?)),
            WeightFormat::F16 => Ok(Weight::Dense(t.to_dtype(DType::F16)?)),
            q => {
                let g = q.ggml().expect("every other format quantizes");
                let (rows, cols) = t.dims2()?;
                if !cols.is_multiple_of(g.block_size()) {
                    bail!(
                        "cannot store a [{rows}, {cols}] matrix as {q}: its rows of {cols} are not a multiple of the block of {}",
                        g.block_size()
                    )
                }
                let t = if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? };
                Ok(Weight::Quant(Arc::new(quantize_rows(&t, g)?)))
            }
        }
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Quant(q) => q.shape().dims2(),
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quant(q) => q.shape().dims().to_vec(),
        }
    }

    /// A trained weight (pre-training a tiny LM): only dense tensors can be.
    pub fn is_variable(&self) -> bool {
        matches!(self, Weight::Dense(t) if t.is_variable())
    }

    /// The tensor of a dense weight (any dtype).
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        }
    }

    /// The tensor when the kernels can read it in place as `dtype`.
    pub fn dense_as(&self, dtype: DType) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) if t.dtype() == dtype && t.is_contiguous() => Some(t),
            _ => None,
        }
    }

    /// Whether the tiled kernels can read it (CPU, contiguous).
    pub fn readable(&self) -> bool {
        match self {
            Weight::Dense(t) => {
                t.device().is_cpu()
                    && t.is_contiguous()
                    && matches!(t.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16)
            }
            Weight::Quant(q) => q.device().is_cpu() && q.dtype() != GgmlDType::Q8K,
        }
    }

    /// The format's name (`f32`, `bf16`, `q4_0`, ...).
    pub fn format(&self) -> String {
        match self {
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Weight::Quant(q) => {
                let n = format!("{:?}", q.dtype()).to_lowercase();
                // llama.cpp spells the k-quants q4_k, q6_k, ...
                match n.strip_suffix('k') {
                    Some(base) if n.starts_with('q') => format!("{base}_k"),
                    _ => n,
                }
            }
        }
    }

    /// Bytes held in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.storage_size_in_bytes(),
        }
    }

    /// The whole matrix in `dtype`: only for the composite fallback (another device, candle's
    /// matmul for benchmarks) and for tests.
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(t) if t.dtype() == dtype => Ok(t.clone()),
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Quant(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }

    /// The matrix as the device-generic path multiplies by it: a dense weight as stored (bf16 on
    /// a GPU: the product runs in bf16 with f32 accumulation), llama.cpp blocks decoded to f32.
    pub fn native(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Quant(q) => q.dequantize(&q.device()),
        }
    }

    /// Rows `ids` (`u32`, any shape) as `dtype`, `[..ids, cols]`: an embedding lookup that
    /// dequantizes only the rows it reads.
    pub fn embedding(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => {
                let (_, cols) = t.dims2()?;
                let mut shape = ids.dims().to_vec();
                shape.push(cols);
                t.index_select(&ids.flatten_all()?, 0)?.to_dtype(dtype)?.reshape(shape)
            }
            Weight::Quant(q) => q.embedding(ids)?.to_dtype(dtype),
        }
    }

    /// Rows `j0..j1` as f32 into `out` (`(j1 - j0) · cols` elements).
    pub(crate) fn rows_f32(&self, j0: usize, j1: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = self.dims2()?;
        if j0 > j1 || j1 > rows || out.len() != (j1 - j0) * cols {
            bail!("weight: rows {j0}..{j1} of [{rows}, {cols}] do not fit a buffer of {}", out.len())
        }
        match self {
            Weight::Dense(t) => {
                let (st, l) = t.storage_and_layout();
                let Some((start, _)) = l.contiguous_offsets() else { bail!("weight: not contiguous") };
                let (a, b) = (start + j0 * cols, start + j1 * cols);
                match &*st {
                    Storage::Cpu(c) => match t.dtype() {
                        DType::F32 => out.copy_from_slice(&c.as_slice::<f32>()?[a..b]),
                        DType::F64 => {
                            for (o, v) in out.iter_mut().zip(&c.as_slice::<f64>()?[a..b]) {
                                *o = *v as f32
                            }
                        }
                        DType::BF16 => c.as_slice::<half::bf16>()?[a..b].convert_to_f32_slice(out),
                        DType::F16 => c.as_slice::<half::f16>()?[a..b].convert_to_f32_slice(out),
                        dt => bail!("weight: cannot read dtype {dt:?}"),
                    },
                    _ => bail!("weight: not on the CPU"),
                }
            }
            Weight::Quant(q) => {
                let g = q.dtype();
                let row_bytes = cols / g.block_size() * g.type_size();
                let data = q.data()?;
                let bytes = &data[j0 * row_bytes..j1 * row_bytes];
                match g {
                    GgmlDType::Q4_0 => super::dequant::q4_0(bytes, out)?,
                    GgmlDType::Q4_1 => super::dequant::q4_1(bytes, out)?,
                    GgmlDType::Q5_0 => super::dequant::q5_0(bytes, out)?,
                    GgmlDType::Q5_1 => super::dequant::q5_1(bytes, out)?,
                    GgmlDType::Q8_0 => super::dequant::q8_0(bytes, out)?,
                    GgmlDType::Q8_1 => blocks_to_f32::<k_quants::BlockQ8_1>(bytes, out)?,
                    GgmlDType::Q2K => super::dequant::q2_k(bytes, out)?,
                    GgmlDType::Q3K => super::dequant::q3_k(bytes, out)?,
                    GgmlDType::Q4K => super::dequant::q4_k(bytes, out)?,
                    GgmlDType::Q5K => super::dequant::q5_k(bytes, out)?,
                    GgmlDType::Q6K => super::dequant::q6_k(bytes, out)?,
                    GgmlDType::F32 => blocks_to_f32::<f32>(bytes, out)?,
                    GgmlDType::F16 => blocks_to_f32::<half::f16>(bytes, out)?,
                    GgmlDType::BF16 => blocks_to_f32::<half::bf16>(bytes, out)?,
                    GgmlDType::Q8K => bail!("weight: Q8_K is an activation format, not a weight format"),
                }
            }
        }
        Ok(())
    }
}

/// `QTensor::quantize`, over chunks of rows in parallel (a LLaMA-7B shape has 6.7 G values).
fn quantize_rows(t: &Tensor, g: GgmlDType) -> Result<QTensor> {
    use rayon::prelude::*;
    let (rows, cols) = t.dims2()?;
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    let chunk_rows = ((1usize << 20) / cols.max(1)).max(1);
    let parts: Vec<Vec<u8>> = data
        .par_chunks(chunk_rows * cols)
        .map(|xs| {
            let mut q = g.cpu_zeros(xs.len());
            q.from_float(xs);
            // SAFETY: as_ptr and storage_size_in_bytes describe the quantized Vec that `q` owns
            // and keeps alive (and unchanged) while these bytes are copied out.
            unsafe { std::slice::from_raw_parts(q.as_ptr(), q.storage_size_in_bytes()) }.to_vec()
        })
        .collect();
    let st = QStorage::from_data(std::borrow::Cow::Owned(parts.concat()), &Device::Cpu, g)?;
    QTensor::new(st, (rows, cols))
}

/// Decodes whole llama.cpp blocks.
fn blocks_to_f32<B: GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()) {
        bail!("weight: {} bytes at {:p} are not whole, aligned {:?} blocks", bytes.len(), bytes.as_ptr(), B::DTYPE)
    }
    if out.len() != bytes.len() / size * B::BLCK_SIZE {
        bail!("weight: {} blocks do not fill {} values", bytes.len() / size, out.len())
    }
    // SAFETY: the bytes are whole blocks at B's alignment (checked above) and come from a
    // QTensor whose storage is a Vec<B>, borrowed for this call; B is a plain-old-data struct of
    // floats and integers (candle's llama.cpp block layouts, `#[repr(C)]`), for which every bit
    // pattern is a valid value.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / size) };
    B::to_float(blocks, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn auto_is_f32_on_the_cpu_and_others_stay() {
        let cpu = Device::Cpu;
        assert_eq!(WeightFormat::Auto.resolve(&cpu), WeightFormat::F32);
        for (_, f) in WeightFormat::ALL.iter().filter(|(n, _)| *n != "auto") {
            assert_eq!(f.resolve(&cpu), *f);
        }
        assert_eq!(WeightFormat::default(), WeightFormat::Auto);
        assert_eq!("auto".parse::<WeightFormat>().unwrap(), WeightFormat::Auto);
    }

    use super::*;

    #[test]
    fn formats_parse_and_print() {
        for (n, f) in WeightFormat::ALL {
            assert_eq!(n.parse::<WeightFormat>().unwrap(), *f);
            assert_eq!(f.to_string(), *n);
        }
        let e = "q3".parse::<WeightFormat>().unwrap_err();
        assert!(e.contains("q3") && e.contains("q4_0"), "{e}");
    }

    #[test]
    fn rows_decode_like_the_whole_matrix() {
        let t = Tensor::randn(0f32, 1.0, (40, 256), &Device::Cpu).unwrap();
        for f in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q4K] {
            let w = Weight::convert(t.clone(), f).unwrap();
            if let (Some(g), Weight::Quant(q)) = (f.ggml(), &w) {
                let whole = QTensor::quantize(&t, g).unwrap();
                assert_eq!(q.data().unwrap(), whole.data().unwrap(), "{f}: quantized in chunks differs");
            }
            let whole = w.to_dense(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            let mut rows = vec![0f32; 7 * 256];
            w.rows_f32(11, 18, &mut rows).unwrap();
            for (i, r) in rows.chunks(256).enumerate() {
                assert_eq!(r, whole[11 + i].as_slice(), "{f}: row {}", 11 + i);
            }
        }
    }

    #[test]
    fn quantizing_in_chunks_of_rows_equals_quantizing_whole() {
        // 32,768 wide: chunks of 32 rows, so 70 rows are three chunks.
        let t = Tensor::randn(0f32, 1.0, (70, 32768), &Device::Cpu).unwrap();
        for g in [GgmlDType::Q4_0, GgmlDType::Q6K] {
            let chunked = quantize_rows(&t, g).unwrap();
            let whole = QTensor::quantize(&t, g).unwrap();
            assert_eq!(chunked.data().unwrap(), whole.data().unwrap(), "{g:?}");
        }
    }

    #[test]
    fn a_row_width_off_the_block_is_refused() {
        let t = Tensor::zeros((4, 576), DType::F32, &Device::Cpu).unwrap();
        let e = Weight::convert(t, WeightFormat::Q4K).unwrap_err().to_string();
        assert!(e.contains("576") && e.contains("256"), "{e}");
    }
}
