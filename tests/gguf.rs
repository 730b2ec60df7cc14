//! GGUF files: tiny LLaMA models written as llama.cpp writes them (permuted q/k, Q8_0 / Q4_0 /
//! Q4_1 / F16 tensors, gpt2 and SentencePiece tokenizers), against transformers loading the same
//! files (scripts/make_gguf_fixtures.py).

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use memvp::generate::{self, Sampling};
use memvp::models::NoHooks;
use memvp::models::llama::LlamaStepper;
use memvp::models::load_lm;

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("gguf").join(format!("{name}.reference.json"))).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn check_model(name: &str) {
    let r = reference(name);
    let lm =
        load_lm(&fixtures().join("gguf").join(format!("{name}.gguf")), DType::F32, Default::default(), &Device::Cpu)
            .unwrap();
    let m = lm.llama().unwrap();
    let prompt = ids(&r["prompt_ids"]);
    assert_eq!(lm.tok.encode(r["prompt"].as_str().unwrap(), true).unwrap(), prompt);
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = m.forward(&input, 0, None, &NoHooks).unwrap();
    let last = logits.squeeze(0).unwrap().get(prompt.len() - 1).unwrap();
    let want: Vec<f32> = serde_json::from_value(r["logits_last"].clone()).unwrap();
    let want = Tensor::new(want.as_slice(), &Device::Cpu).unwrap();
    let e = max_rel_err(&last, &want);
    eprintln!("{name}: last-position logits rel err {e:e}");
    assert!(e < 1e-4, "{name}: logits differ ({e:e})");
    let (mut st, first) = LlamaStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt)).unwrap();
    let s = Sampling { max_new_tokens: r["max_new_tokens"].as_u64().unwrap() as usize, ..Default::default() };
    let got = generate::continue_batch(&mut st, &first, &s, &lm.eos).unwrap().remove(0);
    assert_eq!(got, ids(&r["generated_ids"]), "{name}: greedy generation differs");
}

#[test]
fn gguf_gpt2_tokenizer_quantized_weights() {
    check_model("tiny_gpt2tok");
}

#[test]
fn gguf_sentencepiece_tokenizer() {
    check_model("tiny_spmtok");
    let r = reference("tiny_spmtok");
    let lm = load_lm(&fixtures().join("gguf/tiny_spmtok.gguf"), DType::F32, Default::default(), &Device::Cpu).unwrap();
    for p in r["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let got = lm.tok.encode(text, true).unwrap();
        assert_eq!(got, ids(&p["ids"]), "tokenizing {text:?}");
        assert_eq!(lm.tok.decode(&got, true).unwrap(), p["decode_skip_special"].as_str().unwrap(), "decoding {text:?}");
    }
}

#[test]
fn gguf_loads_like_the_hf_checkpoint() {
    // The SentencePiece GGUF holds exactly the f16 weights of spm_hf/.
    let a = load_lm(&fixtures().join("gguf/tiny_spmtok.gguf"), DType::F32, Default::default(), &Device::Cpu).unwrap();
    let cfg = memvp::checkpoint::Cfg::load(&fixtures().join("gguf/spm_hf/config.json")).unwrap();
    let c = memvp::models::llama::LlamaConfig::from_hf(&cfg).unwrap();
    let files = memvp::checkpoint::safetensors_files(&fixtures().join("gguf/spm_hf")).unwrap();
    let w = memvp::checkpoint::Weights::from_safetensors(&files, DType::F32, &Device::Cpu).unwrap();
    let b = memvp::models::llama::Llama::load(&w, c).unwrap();
    let x = Tensor::new(&[[1u32, 281, 279, 312, 308, 275, 297]], &Device::Cpu).unwrap();
    let la = a.llama().unwrap().forward(&x, 0, None, &NoHooks).unwrap();
    let lb = b.forward(&x, 0, None, &NoHooks).unwrap();
    assert!(max_abs_err(&la, &lb) < 1e-5);
}

/// A GGUF whose FFN width is 0 is refused naming the metadata field, not met by a panic.
#[test]
fn gguf_with_a_zero_width_is_refused_by_name() {
    use candle_core::quantized::gguf_file::{self, Value};
    let src = fixtures().join("gguf/tiny_gpt2tok.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let tensors: Vec<_> =
        content.tensor_infos.keys().map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
    let mut meta = content.metadata.clone();
    meta.insert("llama.feed_forward_length".into(), Value::U32(0));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zero_ffn.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<_> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<_> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    drop(out);
    let e = load_lm(&path, DType::F32, Default::default(), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("llama.feed_forward_length") && e.contains("is 0") && e.contains("zero_ffn.gguf"), "{e}");
}
