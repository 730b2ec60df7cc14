//! Meta's original LLaMA layout: `params.json`, `consolidated.NN.pth` (one PyTorch pickle per
//! model-parallel rank) and SentencePiece's `tokenizer.model`, read without Python and turned
//! into the Hugging Face names and layout that [`super::llama::Llama`] loads, as transformers'
//! `convert_llama_weights_to_hf.py` does:
//!
//! - shards merged: column-parallel weights (`wq wk wv w1 w3 output`) along dim 0, row-parallel
//!   ones (`wo w2`) and `tok_embeddings` along dim 1, norms taken from shard 0;
//! - `wq`/`wk` from Meta's rotary layout (pairs of adjacent features) to Hugging Face's (halves):
//!   `w.view(heads, d/heads/2, 2, dim).transpose(1, 2).reshape(d, dim)`;
//! - `intermediate_size` from `dim`, `multiple_of` and `ffn_dim_multiplier` as Meta's code
//!   computes it.

use super::load::{LoadedLm, model_from_config};
use crate::checkpoint::{self, Cfg, Tok, Weights};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            n.starts_with("consolidated.") && n.ends_with(".pth")
        })
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("{}: params.json but no consolidated.NN.pth shards", dir.display())
    }
    for (i, p) in v.iter().enumerate() {
        let want = format!("consolidated.{i:02}.pth");
        if p.file_name().map(|n| n.to_string_lossy() != want).unwrap_or(true) {
            bail!(
                "{}: expected shards consolidated.00.pth .. consolidated.{:02}.pth, found {}",
                dir.display(),
                v.len() - 1,
                p.display()
            )
        }
    }
    Ok(v)
}

/// Meta's FFN width: `int(2 * 4 * dim / 3)`, times `ffn_dim_multiplier`, rounded up to a
/// multiple of `multiple_of`.
pub fn ffn_width(dim: usize, multiple_of: usize, ffn_dim_multiplier: Option<f64>) -> usize {
    let mut h = 2 * (4 * dim) / 3;
    if let Some(m) = ffn_dim_multiplier {
        h = (m * h as f64) as usize;
    }
    multiple_of * h.div_ceil(multiple_of.max(1))
}

/// Meta → Hugging Face rotary layout of a `[d, dim]` projection with `heads` heads.
fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (d, dim) = w.dims2()?;
    if d % (2 * heads) != 0 {
        bail!("a [{d}, {dim}] projection cannot hold {heads} heads of even width")
    }
    Ok(w.reshape((heads, d / heads / 2, 2, dim))?.transpose(1, 2)?.contiguous()?.reshape((d, dim))?)
}

pub fn load_meta(dir: &Path, dtype: DType, format: crate::ops::WeightFormat, dev: &Device) -> Result<LoadedLm> {
    let params_path = dir.join("params.json");
    let params = Cfg::load(&params_path)?;
    let int = |k: &str| -> Result<usize> {
        params
            .v
            .get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .with_context(|| format!("{}: field `{k}` missing or not a positive integer", params_path.display()))
    };
    let (dim, n_layers, n_heads) = (int("dim")?, int("n_layers")?, int("n_heads")?);
    let n_kv = params.v.get("n_kv_heads").and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(n_heads);
    let multiple_of = params.v.get("multiple_of").and_then(|v| v.as_u64()).unwrap_or(256) as usize;
    let ffn_mult = params.v.get("ffn_dim_multiplier").and_then(|v| v.as_f64());
    let eps = params.v.get("norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5);
    let theta = params.v.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(10000.0);
    if dim % n_heads != 0 || n_heads % n_kv != 0 {
        bail!("{}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv} do not divide", params_path.display())
    }
    let tok_path = dir.join("tokenizer.model");
    let tok: Tok = checkpoint::tokenizer_from_spm(&tok_path)?;
    let spm = checkpoint::spm::SpmModel::read(&tok_path)?;
    let files = shard_files(dir)?;
    let shards: Vec<HashMap<String, Tensor>> = files
        .iter()
        .map(|f| {
            let t = candle_core::pickle::read_all(f)
                .with_context(|| format!("{}: not a PyTorch checkpoint", f.display()))?;
            Ok(t.into_iter().collect())
        })
        .collect::<Result<_>>()?;
    let merged = |name: &str, cat_dim: Option<usize>| -> Result<Tensor> {
        let parts: Vec<&Tensor> = shards
            .iter()
            .zip(&files)
            .map(|(s, f)| s.get(name).with_context(|| format!("{}: tensor `{name}` missing", f.display())))
            .collect::<Result<_>>()?;
        Ok(match cat_dim {
            Some(d) if parts.len() > 1 => Tensor::cat(&parts, d)?,
            _ => parts[0].clone(),
        })
    };
    let hd = dim / n_heads;
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let emb = merged("tok_embeddings.weight", Some(1))?;
    let vocab = emb.dims()[0];
    w.insert("model.embed_tokens.weight".into(), emb);
    w.insert("model.norm.weight".into(), merged("norm.weight", None)?);
    w.insert("lm_head.weight".into(), merged("output.weight", Some(0))?);
    for i in 0..n_layers {
        let (m, h) = (format!("layers.{i}."), format!("model.layers.{i}."));
        let q = merged(&format!("{m}attention.wq.weight"), Some(0))?;
        let k = merged(&format!("{m}attention.wk.weight"), Some(0))?;
        if q.dims() != [n_heads * hd, dim] || k.dims() != [n_kv * hd, dim] {
            bail!(
                "{}: layer {i}: wq {:?} / wk {:?} do not match params.json ({n_heads} heads, {n_kv} kv heads of {hd})",
                dir.display(),
                q.dims(),
                k.dims()
            )
        }
        w.insert(format!("{h}self_attn.q_proj.weight"), permute(&q, n_heads)?);
        w.insert(format!("{h}self_attn.k_proj.weight"), permute(&k, n_kv)?);
        for (meta, hf, d) in [
            ("attention.wv", "self_attn.v_proj", Some(0)),
            ("attention.wo", "self_attn.o_proj", Some(1)),
            ("feed_forward.w1", "mlp.gate_proj", Some(0)),
            ("feed_forward.w2", "mlp.down_proj", Some(1)),
            ("feed_forward.w3", "mlp.up_proj", Some(0)),
            ("attention_norm", "input_layernorm", None),
            ("ffn_norm", "post_attention_layernorm", None),
        ] {
            w.insert(format!("{h}{hf}.weight"), merged(&format!("{m}{meta}.weight"), d)?);
        }
    }
    let inter = ffn_width(dim, multiple_of, ffn_mult);
    let got = w["model.layers.0.mlp.gate_proj.weight"].dims()[0];
    if got != inter {
        bail!("{}: w1 has {got} rows but params.json gives an FFN width of {inter}", dir.display())
    }
    if vocab != tok.vocab_size() {
        bail!("{}: the embedding has {vocab} rows but tokenizer.model has {} pieces", dir.display(), tok.vocab_size())
    }
    let hf = serde_json::json!({
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "vocab_size": vocab,
        "max_position_embeddings": params.v.get("max_seq_len").and_then(|v| v.as_u64()).unwrap_or(2048),
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": spm.bos_id,
        "eos_token_id": spm.eos_id,
    });
    let cfg = Cfg::from_value(hf, &params_path);
    let weights = Weights::from_tensors(&format!("{} (Meta layout)", dir.display()), w, dtype, dev).with_format(format);
    let (model, eos) = model_from_config(&cfg, &weights)?;
    let mut hashed = vec![params_path.clone()];
    hashed.extend(files.iter().cloned());
    Ok(LoadedLm {
        model,
        tok,
        eos,
        path: dir.to_path_buf(),
        fingerprint: checkpoint::fingerprint(&hashed)?,
        tokenizer_fingerprint: Some(checkpoint::fingerprint(&[tok_path])?),
    })
}

#[cfg(test)]
mod tests {
    use super::ffn_width;

    #[test]
    fn ffn_widths_are_metas() {
        // LLaMA-7B / 13B (multiple_of 256) and LLaMA-2-70B (ffn_dim_multiplier 1.3, 4096).
        assert_eq!(ffn_width(4096, 256, None), 11008);
        assert_eq!(ffn_width(5120, 256, None), 13824);
        assert_eq!(ffn_width(8192, 4096, Some(1.3)), 28672);
    }
}
