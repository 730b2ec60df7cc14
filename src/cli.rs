//! What each command does, callable from tests and from `main.rs`.

use crate::generate::{self, LlamaStepper, Sampling};
use crate::image::{Norm, Preprocess};
use crate::lm::{LanguageModel, load_lm};
use crate::models::NoHooks;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub fn device() -> Device {
    Device::Cpu
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Hugging Face model directory or GGUF file.
    #[arg(long)]
    pub lm: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let dev = device();
    let lm = load_lm(&a.lm, DType::F32, &dev)?;
    let prompt_ids = lm.tok.encode(&a.prompt, true)?;
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens")
    }
    let s = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let start = std::time::Instant::now();
    let generated = match &lm.model {
        LanguageModel::Llama(m) => {
            let (mut st, first) =
                LlamaStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt_ids))?;
            generate::continue_batch(&mut st, &first, &s, &lm.eos)?.remove(0)
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let text = lm.tok.decode(&generated, true)?;
    if a.json {
        let v = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": text,
            "stopped_at_eos": generated.last().is_some_and(|t| lm.eos.contains(t)),
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!("{text}");
    }
    Ok(())
}

pub fn encode_image(
    vision: &str,
    image: &Path,
    layer: isize,
    norm: Norm,
    out: &Path,
) -> Result<()> {
    let dev = device();
    let v = crate::vision::load_vision(vision, DType::F32, &dev)?;
    let pre = Preprocess {
        size: v.model.cfg.image_size,
        norm,
    };
    let px = pre.load(image)?;
    let s = pre.size;
    let px = Tensor::from_vec(px, (1, 3, s, s), &dev)?;
    let f = v.model.patch_features(&px, layer, &NoHooks)?.squeeze(0)?;
    crate::checkpoint::save_safetensors_atomic(&[("features".to_string(), f.clone())], None, out)?;
    eprintln!(
        "wrote {} features {:?} to {}",
        vision,
        f.dims(),
        out.display()
    );
    Ok(())
}
