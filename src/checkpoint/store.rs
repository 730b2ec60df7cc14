//! A read-only weight store addressed by checkpoint tensor names, over memory-mapped
//! safetensors files, a GGUF file, or tensors in memory. Tensors are converted to the working
//! dtype on load and their shapes checked against what the config implies.

use super::gguf::GgufFile;
use crate::ops::{Weight, WeightFormat};
use anyhow::{Context, Result, bail};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

enum Source {
    Safetensors {
        files: Vec<(PathBuf, memmap2::Mmap)>,
        index: HashMap<String, usize>,
    },
    Gguf(Arc<GgufFile>),
    Memory {
        label: String,
        tensors: HashMap<String, Tensor>,
    },
    /// Trainable random tensors made on request with the shape the model asks for, so that the
    /// model code stays the one place that knows a family's tensor names and shapes.
    Random {
        label: String,
        std: f64,
        rng: std::sync::Mutex<crate::rng::Rng>,
        made: std::sync::Mutex<Vec<(String, candle_core::Var)>>,
    },
    /// Frozen random tensors made on request directly in the store's format (a LLaMA-7B shape
    /// in bf16 or Q4_0 for measuring memory, without ever holding the f32 model).
    RandomFrozen {
        label: String,
        seed: u64,
        std: f64,
    },
}

#[derive(Clone)]
pub struct Weights {
    src: Arc<Source>,
    prefix: String,
    /// The working dtype: activations, norms, biases, and matrices kept in `F32` format.
    pub dtype: DType,
    pub device: Device,
    /// The format [`Weights::matrix`] keeps frozen matrices in.
    pub format: WeightFormat,
}

impl Weights {
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let file = std::fs::File::open(f).with_context(|| format!("{}: cannot open", f.display()))?;
            // SAFETY: the map is read as `&[u8]` for as long as these Weights live, which is sound
            // only if nobody modifies or truncates the file meanwhile (that would change bytes
            // behind a shared reference, or fault with SIGBUS). memvp opens checkpoints read-only
            // and never writes them while loaded, but cannot stop another process from doing so:
            // do not overwrite a checkpoint while a run is using it.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", f.display()))?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {e}", f.display())
            })?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            maps.push((f.clone(), mmap));
        }
        Ok(Self {
            src: Arc::new(Source::Safetensors { files: maps, index }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            format: WeightFormat::F32,
        })
    }

    pub fn from_gguf(g: Arc<GgufFile>, dtype: DType, device: &Device) -> Self {
        Self {
            src: Arc::new(Source::Gguf(g)),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            format: WeightFormat::F32,
        }
    }

    /// The same weights with frozen matrices kept in `format`.
    pub fn with_format(self, format: WeightFormat) -> Self {
        Self { format, ..self }
    }

    pub fn from_tensors(label: &str, tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self {
            src: Arc::new(Source::Memory { label: label.to_string(), tensors }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            format: WeightFormat::F32,
        }
    }

    /// Random trainable weights: norm weights 1, biases 0, everything else N(0, std²). Optional
    /// tensors are absent (`contains` is false), so heads are tied.
    pub fn random(label: &str, seed: u64, std: f64, dtype: DType, device: &Device) -> Self {
        Self {
            src: Arc::new(Source::Random {
                label: label.to_string(),
                std,
                rng: std::sync::Mutex::new(crate::rng::Rng::new(seed)),
                made: std::sync::Mutex::new(Vec::new()),
            }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            format: WeightFormat::F32,
        }
    }

    /// Frozen random weights made in `format` as the model asks for them: norm weights 1,
    /// biases 0, everything else uniform with standard deviation `std` (fast to draw in
    /// parallel, and nothing here depends on the distribution's shape).
    pub fn random_frozen(label: &str, seed: u64, std: f64, format: WeightFormat, device: &Device) -> Self {
        Self {
            src: Arc::new(Source::RandomFrozen { label: label.to_string(), seed, std }),
            prefix: String::new(),
            dtype: DType::F32,
            device: device.clone(),
            format,
        }
    }

    /// Whether tensors are made when asked for (random stores): optional ones are then absent
    /// unless the config asks for them.
    pub fn makes_on_request(&self) -> bool {
        matches!(&*self.src, Source::Random { .. } | Source::RandomFrozen { .. })
    }

    /// The tensors a random store has made, by name, in the order they were asked for.
    pub fn made(&self) -> Vec<(String, candle_core::Var)> {
        match &*self.src {
            Source::Random { made, .. } => made.lock().unwrap().clone(),
            _ => vec![],
        }
    }

    /// A view whose names are prefixed by `p.` (like candle's VarBuilder::pp).
    pub fn pp(&self, p: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { p.to_string() } else { format!("{}.{p}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    pub fn full_name(&self, n: &str) -> String {
        if self.prefix.is_empty() { n.to_string() } else { format!("{}.{n}", self.prefix) }
    }

    /// Where the weights come from, for messages.
    pub fn label(&self) -> String {
        match &*self.src {
            Source::Safetensors { files, .. } => match files.as_slice() {
                [(f, _)] => f.display().to_string(),
                fs => {
                    let dir = fs.first().and_then(|(f, _)| f.parent()).unwrap_or(Path::new("."));
                    format!("{} (sharded)", dir.join("model.safetensors.index.json").display())
                }
            },
            Source::Gguf(g) => g.path.display().to_string(),
            Source::Memory { label, .. } | Source::Random { label, .. } | Source::RandomFrozen { label, .. } => {
                label.clone()
            }
        }
    }

    pub fn contains(&self, n: &str) -> bool {
        let full = self.full_name(n);
        match &*self.src {
            Source::Safetensors { index, .. } => index.contains_key(&full),
            Source::Gguf(g) => g.contains_hf(&full),
            Source::Memory { tensors, .. } => tensors.contains_key(&full),
            Source::Random { .. } | Source::RandomFrozen { .. } => false,
        }
    }

    /// All tensor names under this view's prefix.
    pub fn names(&self) -> Vec<String> {
        let all: Vec<String> = match &*self.src {
            Source::Safetensors { index, .. } => index.keys().cloned().collect(),
            Source::Gguf(g) => g.hf_names(),
            Source::Memory { tensors, .. } => tensors.keys().cloned().collect(),
            Source::Random { made, .. } => made.lock().unwrap().iter().map(|(n, _)| n.clone()).collect(),
            Source::RandomFrozen { .. } => vec![],
        };
        let mut v: Vec<String> = if self.prefix.is_empty() {
            all
        } else {
            let p = format!("{}.", self.prefix);
            all.into_iter().filter_map(|n| n.strip_prefix(&p).map(str::to_string)).collect()
        };
        v.sort();
        v
    }

    /// Loads a tensor without checking its shape.
    pub fn get_any(&self, n: &str) -> Result<Tensor> {
        let t = self.get_stored(n)?;
        if t.dtype() == self.dtype { Ok(t) } else { Ok(t.to_dtype(self.dtype)?) }
    }

    /// A frozen matrix `[rows, cols]` in this store's [`WeightFormat`], its shape checked. The
    /// trainable tensors of a random store stay dense in the working dtype.
    pub fn matrix(&self, shape: impl Into<Shape>, n: &str) -> Result<Weight> {
        let shape = shape.into();
        let full = self.full_name(n);
        let fmt = self.format.resolve(&self.device);
        if fmt == WeightFormat::F32 || matches!(&*self.src, Source::Random { .. }) {
            return Ok(Weight::Dense(self.get(shape, n)?));
        }
        if let Source::RandomFrozen { .. } = &*self.src {
            let t = self.get(shape, n)?;
            let fmt = if fmt == WeightFormat::Keep { WeightFormat::F32 } else { fmt };
            return Weight::convert(t, fmt).with_context(|| format!("{}: tensor `{full}`", self.label()));
        }
        let w = match (&*self.src, fmt) {
            (Source::Gguf(g), WeightFormat::Keep) => g.load_hf_stored(&full, self.dtype, &self.device)?,
            (_, WeightFormat::Keep) => {
                let t = self.get_stored(n)?;
                match t.dtype() {
                    DType::BF16 | DType::F16 => Weight::Dense(t),
                    _ => Weight::Dense(t.to_dtype(self.dtype)?),
                }
            }
            _ => {
                let t = self.get_stored(n)?;
                let t = if matches!(fmt, WeightFormat::Bf16 | WeightFormat::F16) { t } else { t.to_dtype(DType::F32)? };
                Weight::convert(t, fmt).with_context(|| format!("{}: tensor `{full}`", self.label()))?
            }
        };
        if w.dims() != shape.dims() {
            bail!(
                "{}: tensor `{full}` has shape {:?}, but config.json implies {:?}",
                self.label(),
                w.dims(),
                shape.dims()
            )
        }
        Ok(w)
    }

    /// Loads a tensor in the dtype it is stored in.
    fn get_stored(&self, n: &str) -> Result<Tensor> {
        let full = self.full_name(n);
        let t = match &*self.src {
            Source::Safetensors { files, index } => {
                let Some(&i) = index.get(&full) else { bail!("{}: tensor `{full}` not found", self.label()) };
                let (path, mmap) = &files[i];
                let st = safetensors::SafeTensors::deserialize(mmap)
                    .map_err(|e| anyhow::anyhow!("{}: corrupt safetensors: {e}", path.display()))?;
                let view = st.tensor(&full).map_err(|e| anyhow::anyhow!("{}: tensor `{full}`: {e}", path.display()))?;
                view.load(&self.device).with_context(|| format!("{}: cannot read tensor `{full}`", path.display()))?
            }
            Source::Gguf(g) => g.load_hf(&full, &self.device)?,
            Source::Memory { tensors, label } => match tensors.get(&full) {
                Some(t) => t.clone(),
                None => bail!("{label}: tensor `{full}` not found"),
            },
            Source::Random { made, label, .. } => match made.lock().unwrap().iter().find(|(n, _)| *n == full) {
                Some((_, v)) => v.as_tensor().clone(),
                None => bail!("{label}: tensor `{full}` has not been made"),
            },
            Source::RandomFrozen { label, .. } => bail!("{label}: tensor `{full}` is made with a shape (use get)"),
        };
        Ok(t)
    }

    /// Loads a tensor and checks it has the shape the config implies.
    pub fn get(&self, shape: impl Into<Shape>, n: &str) -> Result<Tensor> {
        let shape = shape.into();
        if let Source::Random { std, rng, made, .. } = &*self.src {
            let full = self.full_name(n);
            let mut made = made.lock().unwrap();
            if let Some((_, v)) = made.iter().find(|(m, _)| *m == full) {
                return Ok(v.as_tensor().clone());
            }
            let count = shape.elem_count();
            let leaf = full.rsplit('.').nth(1).unwrap_or("");
            let t = if full.ends_with(".bias") || full == "final_logits_bias" {
                Tensor::zeros(shape, self.dtype, &self.device)?
            } else if leaf.contains("norm") && full.ends_with(".weight") {
                Tensor::ones(shape, self.dtype, &self.device)?
            } else {
                let mut r = rng.lock().unwrap();
                let v: Vec<f32> = (0..count).map(|_| (r.normal() * std) as f32).collect();
                Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?
            };
            let var = candle_core::Var::from_tensor(&t)?;
            made.push((full, var.clone()));
            return Ok(var.as_tensor().clone());
        }
        if let Source::RandomFrozen { seed, std, .. } = &*self.src {
            let full = self.full_name(n);
            let leaf = full.rsplit('.').nth(1).unwrap_or("");
            return Ok(if full.ends_with(".bias") || full == "final_logits_bias" {
                Tensor::zeros(shape, self.dtype, &self.device)?
            } else if leaf.contains("norm") && full.ends_with(".weight") {
                Tensor::ones(shape, self.dtype, &self.device)?
            } else {
                random_uniform(&full, *seed, *std, shape, &self.device)?.to_dtype(self.dtype)?
            });
        }
        let t = self.get_any(n)?;
        if t.shape() != &shape {
            bail!(
                "{}: tensor `{}` has shape {:?}, but config.json implies {:?}",
                self.label(),
                self.full_name(n),
                t.dims(),
                shape.dims()
            )
        }
        Ok(t)
    }

    pub fn get_opt(&self, shape: impl Into<Shape>, n: &str) -> Result<Option<Tensor>> {
        if self.contains(n) { self.get(shape, n).map(Some) } else { Ok(None) }
    }
}

/// Uniform values of standard deviation `std`, drawn in parallel chunks whose streams depend
/// on the seed, the tensor's name and the chunk only.
fn random_uniform(name: &str, seed: u64, std: f64, shape: Shape, dev: &Device) -> Result<Tensor> {
    use rayon::prelude::*;
    let mut v = vec![0f32; shape.elem_count()];
    let half_width = (std * 3f64.sqrt()) as f32;
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r = crate::rng::Rng::derive(seed, &format!("{name}/{i}"));
        for x in c {
            *x = (2.0 * r.uniform_f32() - 1.0) * half_width;
        }
    });
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// Writes tensors as safetensors through a temporary file and a rename, so that a crash never
/// leaves a half-written file under the final name.
pub fn save_safetensors_atomic(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    crate::util::write_atomic(path, &safetensors_bytes(tensors, metadata)?)
}

/// The bytes of a safetensors file holding `tensors` (header keys sorted).
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let mut owned = Vec::new();
    for (n, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let shape = t.dims().to_vec();
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            ),
            DType::F64 => (
                safetensors::Dtype::F64,
                t.flatten_all()?.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            DType::I64 => (
                safetensors::Dtype::I64,
                t.flatten_all()?.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            DType::U32 => (
                safetensors::Dtype::U32,
                t.flatten_all()?.to_vec1::<u32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            dt => bail!("cannot save dtype {dt:?} for tensor {n}"),
        };
        owned.push((n.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?)))
        .collect::<std::result::Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| anyhow::anyhow!("{e}"))?;
    canonical_header(bytes)
}

/// Objects rebuilt with their keys inserted in sorted order (whatever map serde_json uses).
fn sort_keys(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: std::collections::BTreeMap<String, serde_json::Value> = m.into_iter().collect();
            serde_json::Value::Object(sorted.into_iter().map(|(k, x)| (k, sort_keys(x))).collect())
        }
        other => other,
    }
}

/// The same file with its JSON header's keys in sorted order (safetensors writes the metadata
/// map in hash order, so identical runs would otherwise differ byte for byte). The header keeps
/// its length (the same keys and values), so the tensor offsets stay valid.
fn canonical_header(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let mut sorted = serde_json::to_vec(&sort_keys(header))?;
    if sorted.len() > n {
        bail!("safetensors header grew when sorted ({} > {n} bytes)", sorted.len())
    }
    sorted.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&sorted);
    Ok(bytes)
}
