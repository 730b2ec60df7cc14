//! GGUF (llama.cpp) files of LLaMA-architecture models: hyper-parameters and tokenizer from the
//! metadata, tensors dequantized on load and renamed to the Hugging Face names, with the q/k
//! rows put back in the order Hugging Face's rotate-half rope expects (llama.cpp's converter
//! permutes them for its interleaved rope).

use crate::ops::Weight;
use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    file: Mutex<std::fs::File>,
    pub(crate) arch: String,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        super::require_file(path)?;
        let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let content = Content::read(&mut f)
            .map_err(|e| anyhow::anyhow!("{}: not a valid GGUF file (truncated or corrupt?): {e}", path.display()))?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => bail!("{}: metadata field `general.architecture` missing", path.display()),
        };
        if arch != "llama" {
            bail!(
                "{}: unknown architecture `{arch}` (metadata field general.architecture); GGUF files are supported for: llama",
                path.display()
            )
        }
        Ok(Self { path: path.to_path_buf(), content, file: Mutex::new(f), arch })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// `{arch}.{key}` as an unsigned integer.
    pub fn arch_usize(&self, key: &str) -> Result<Option<usize>> {
        let full = format!("{}.{key}", self.arch);
        match self.meta(&full) {
            None => Ok(None),
            Some(v) => Ok(Some(
                v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64)).map_err(
                    |_| anyhow::anyhow!("{}: metadata field `{full}` is not an integer", self.path.display()),
                )? as usize,
            )),
        }
    }

    pub fn arch_f64(&self, key: &str) -> Result<Option<f64>> {
        let full = format!("{}.{key}", self.arch);
        match self.meta(&full) {
            None => Ok(None),
            Some(v) => {
                Ok(Some(v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|_| {
                    anyhow::anyhow!("{}: metadata field `{full}` is not a number", self.path.display())
                })?))
            }
        }
    }

    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.arch_usize(key)?
            .with_context(|| format!("{}: metadata field `{}.{key}` missing", self.path.display(), self.arch))
    }

    fn heads(&self) -> Result<(usize, usize)> {
        let h = self.require_usize("attention.head_count")?;
        let kv = self.arch_usize("attention.head_count_kv")?.unwrap_or(h);
        Ok((h, kv))
    }

    /// The GGUF name of a Hugging Face LLaMA tensor name.
    fn gguf_name(hf: &str) -> Option<String> {
        if hf == "model.embed_tokens.weight" {
            return Some("token_embd.weight".into());
        }
        if hf == "model.norm.weight" {
            return Some("output_norm.weight".into());
        }
        if hf == "lm_head.weight" {
            return Some("output.weight".into());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (i, tail) = rest.split_once('.')?;
        let g = match tail {
            "input_layernorm.weight" => "attn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        };
        Some(format!("blk.{i}.{g}"))
    }

    pub fn contains_hf(&self, hf: &str) -> bool {
        Self::gguf_name(hf).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    pub fn hf_names(&self) -> Vec<String> {
        let mut v = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".into(), "lm_head.weight".into()];
        let layers = self.arch_usize("block_count").ok().flatten().unwrap_or(0);
        for i in 0..layers {
            for t in [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                v.push(format!("model.layers.{i}.{t}"));
            }
        }
        v.retain(|n| self.contains_hf(n));
        v
    }

    /// Reads and dequantizes a raw GGUF tensor.
    pub fn load_raw(&self, name: &str, dev: &Device) -> Result<Tensor> {
        if !self.content.tensor_infos.contains_key(name) {
            bail!("{}: tensor `{name}` not found", self.path.display())
        }
        let mut f = self.file.lock().unwrap();
        let q = self.content.tensor(&mut *f, name, dev).map_err(|e| {
            anyhow::anyhow!("{}: cannot read tensor `{name}` (truncated or corrupt?): {e}", self.path.display())
        })?;
        q.dequantize(dev).with_context(|| format!("{}: cannot dequantize tensor `{name}`", self.path.display()))
    }

    /// Loads a tensor by its Hugging Face name.
    pub fn load_hf(&self, hf: &str, dev: &Device) -> Result<Tensor> {
        let Some(g) = Self::gguf_name(hf) else {
            bail!("{}: no GGUF tensor corresponds to `{hf}`", self.path.display())
        };
        if !self.content.tensor_infos.contains_key(&g) {
            bail!("{}: tensor `{g}` (for `{hf}`) not found", self.path.display())
        }
        let t = self.load_raw(&g, dev)?;
        let (h, kv) = self.heads()?;
        if hf.ends_with("self_attn.q_proj.weight") {
            unpermute(&t, h)
        } else if hf.ends_with("self_attn.k_proj.weight") {
            unpermute(&t, kv)
        } else {
            Ok(t)
        }
    }
}

impl GgufFile {
    /// A matrix by its Hugging Face name as stored: llama.cpp blocks stay blocks (q/k rows
    /// reordered as whole rows of blocks), 16-bit tables stay 16-bit, f32 becomes `dtype`.
    pub fn load_hf_stored(&self, hf: &str, dtype: DType, dev: &Device) -> Result<Weight> {
        let Some(g) = Self::gguf_name(hf) else {
            bail!("{}: no GGUF tensor corresponds to `{hf}`", self.path.display())
        };
        let Some(info) = self.content.tensor_infos.get(&g) else {
            bail!("{}: tensor `{g}` (for `{hf}`) not found", self.path.display())
        };
        let stored = match info.ggml_dtype {
            GgmlDType::F32 => return Ok(Weight::Dense(self.load_hf(hf, dev)?.to_dtype(dtype)?)),
            GgmlDType::F16 => return Ok(Weight::Dense(self.load_hf(hf, dev)?.to_dtype(DType::F16)?)),
            GgmlDType::BF16 => return Ok(Weight::Dense(self.load_hf(hf, dev)?.to_dtype(DType::BF16)?)),
            t => t,
        };
        let q = {
            let mut f = self.file.lock().unwrap();
            self.content.tensor(&mut *f, &g, &Device::Cpu).map_err(|e| {
                anyhow::anyhow!("{}: cannot read tensor `{g}` (truncated or corrupt?): {e}", self.path.display())
            })?
        };
        let (rows, cols) =
            q.shape().dims2().with_context(|| format!("{}: tensor `{g}` is not a matrix", self.path.display()))?;
        let (h, kv) = self.heads()?;
        let heads = if hf.ends_with("self_attn.q_proj.weight") {
            h
        } else if hf.ends_with("self_attn.k_proj.weight") {
            kv
        } else {
            return Ok(Weight::Quant(Arc::new(q)));
        };
        // The rows of blocks in Hugging Face's order, as `unpermute` does for a dense matrix.
        if rows % (2 * heads) != 0 {
            bail!("{}: q/k weight `{g}` of {rows} rows cannot be split into {heads} heads", self.path.display())
        }
        let row_bytes = cols / stored.block_size() * stored.type_size();
        let data = q.data()?;
        let half = rows / heads / 2;
        let mut out = Vec::with_capacity(data.len());
        // New row (h, s, j) = h·2·half + s·half + j is file row h·2·half + 2·j + s.
        for hh in 0..heads {
            for s in 0..2 {
                for j in 0..half {
                    let r = hh * 2 * half + 2 * j + s;
                    out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                }
            }
        }
        let st = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, stored)?;
        Ok(Weight::Quant(Arc::new(QTensor::new(st, (rows, cols))?)))
    }
}

/// Inverse of llama.cpp's `permute`: rows `[h, 2, d/2]` interleaved back to `[h, d/2, 2]`
/// order, as transformers' `reverse_permute_weights` does.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if out % (2 * heads) != 0 {
        bail!("q/k weight of {out} rows cannot be split into {heads} heads")
    }
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}
