//! Tokenizers: `tokenizer.json` of Hugging Face directories, or one built from GGUF metadata
//! the way transformers' GGUF converters build it (`integrations/ggml.py`), so that both give
//! the same ids for the same file.

use super::GgufFile;
use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use std::path::Path;

pub struct Tok {
    pub inner: tokenizers::Tokenizer,
}

impl Tok {
    pub fn from_file(path: &Path) -> Result<Self> {
        super::require_file(path)?;
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Self { inner })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let inner: tokenizers::Tokenizer = v.to_string().parse().map_err(|e| anyhow!("cannot build tokenizer: {e}"))?;
        Ok(Self { inner })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let e = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(e.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }
}

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    match g.meta(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.to_string().cloned().map_err(|_| anyhow!("{}: metadata `{key}` must hold strings", g.path.display()))
            })
            .collect(),
        Some(_) => bail!("{}: metadata `{key}` must be an array", g.path.display()),
        None => Ok(vec![]),
    }
}

fn ints(g: &GgufFile, key: &str) -> Vec<i64> {
    match g.meta(key) {
        Some(Value::Array(a)) => {
            a.iter().map(|v| v.to_i32().map(i64::from).or_else(|_| v.to_u32().map(i64::from)).unwrap_or(1)).collect()
        }
        _ => vec![],
    }
}

fn floats(g: &GgufFile, key: &str) -> Vec<f64> {
    match g.meta(key) {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().map(f64::from).unwrap_or(0.0)).collect(),
        _ => vec![],
    }
}

fn id(g: &GgufFile, key: &str) -> Option<u32> {
    g.meta(key).and_then(|v| v.to_u32().ok())
}

fn flag(g: &GgufFile, key: &str) -> Option<bool> {
    g.meta(key).and_then(|v| v.to_bool().ok())
}

/// llama.cpp token types.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Builds the tokenizer of a GGUF file (`tokenizer.ggml.model` = `gpt2` or `llama`).
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tok> {
    let model = match g.meta("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.clone(),
        _ => bail!("{}: metadata field `tokenizer.ggml.model` missing", g.path.display()),
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        bail!("{}: metadata field `tokenizer.ggml.tokens` missing or empty", g.path.display())
    }
    let types = ints(g, "tokenizer.ggml.token_type");
    let bos = id(g, "tokenizer.ggml.bos_token_id");
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(&CONTROL) | Some(&USER_DEFINED)))
        .map(|(i, t)| {
            let special = types.get(i) == Some(&CONTROL);
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": !special, "special": special})
        })
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let template = |add_bos: bool, bos_tok: Option<&String>| -> serde_json::Value {
        match (add_bos, bos_tok) {
            (true, Some(b)) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [bos.unwrap()], "tokens": [b]}}
            }),
            _ => serde_json::Value::Null,
        }
    };
    let bos_tok = bos.and_then(|b| tokens.get(b as usize));
    let v = match model.as_str() {
        "gpt2" => {
            let merges = strings(g, "tokenizer.ggml.merges")?;
            let add_bos = flag(g, "tokenizer.ggml.add_bos_token").unwrap_or(false);
            let add_prefix = flag(g, "tokenizer.ggml.add_space_prefix").unwrap_or(false);
            let post = match template(add_bos, bos_tok) {
                serde_json::Value::Null => {
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
                }
                t => t,
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": add_prefix, "trim_offsets": false, "use_regex": true},
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let scores = floats(g, "tokenizer.ggml.scores");
            let mut merges = strings(g, "tokenizer.ggml.merges")?;
            if merges.is_empty() {
                merges = generate_merges(&tokens, MergeOrder::Scores(&scores));
            }
            let add_bos = flag(g, "tokenizer.ggml.add_bos_token").unwrap_or(true);
            let add_prefix = flag(g, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
            spm_json(added, vocab, merges, template(add_bos, bos_tok), add_prefix)
        }
        other => bail!("{}: unsupported tokenizer.ggml.model `{other}` (supported: gpt2, llama)", g.path.display()),
    };
    Tok::from_json(&v).with_context(|| format!("{}: building the {model} tokenizer", g.path.display()))
}

/// The tokenizer of a SentencePiece `tokenizer.model` (LLaMA 1/2, Meta's layout) as
/// transformers 5 builds it (`SentencePieceExtractor` + `LlamaTokenizer`): a byte-fallback BPE
/// whose merges follow the vocabulary order, control and unknown pieces special, BOS added.
pub fn tokenizer_from_spm(path: &std::path::Path) -> Result<Tok> {
    use super::spm::{self, SpmModel};
    let m = SpmModel::read(path)?;
    if m.model_type != spm::BPE {
        bail!(
            "{}: a SentencePiece {} model; memvp reads BPE models (LLaMA's)",
            path.display(),
            if m.model_type == spm::UNIGRAM { "Unigram" } else { "non-BPE" }
        )
    }
    if !m.byte_fallback {
        bail!("{}: a SentencePiece BPE model without byte fallback; LLaMA's has it", path.display())
    }
    let tokens: Vec<String> = m.pieces.iter().map(|p| p.0.clone()).collect();
    let added: Vec<serde_json::Value> = m
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p.2, spm::UNKNOWN | spm::CONTROL | spm::USER_DEFINED))
        .map(|(i, p)| {
            let special = p.2 != spm::USER_DEFINED;
            json!({"id": i, "content": p.0, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special})
        })
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let merges = generate_merges(&tokens, MergeOrder::Vocabulary);
    let post = match SpmModel::id(m.bos_id).and_then(|b| tokens.get(b as usize).map(|t| (b, t))) {
        Some((id, b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [id], "tokens": [b]}}
        }),
        None => serde_json::Value::Null,
    };
    let v = spm_json(added, vocab, merges, post, m.add_dummy_prefix);
    Tok::from_json(&v).with_context(|| format!("{}: building the tokenizer", path.display()))
}

/// transformers' `GGUFLlamaConverter` / `LlamaTokenizer`: a byte-fallback BPE, Metaspace
/// pre-tokenizer, SentencePiece-style decoder.
fn spm_json(
    added: Vec<serde_json::Value>,
    vocab: serde_json::Map<String, serde_json::Value>,
    merges: Vec<String>,
    post: serde_json::Value,
    add_prefix: bool,
) -> serde_json::Value {
    // transformers 5: no normalizer; Metaspace with prepend_scheme "first" (a `▁` before the
    // first piece unless the text starts with one), no split.
    let pre = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": if add_prefix { "first" } else { "never" }, "split": false});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// How [`generate_merges`] orders the merges.
enum MergeOrder<'a> {
    /// By the merged piece's score, highest first (GGUF, `generate_merges(vocab, scores)`).
    Scores(&'a [f64]),
    /// By the merged piece's id, lowest first (`generate_merges(vocab)`, tokenizer.model).
    Vocabulary,
}

/// transformers' `generate_merges`: every split of every piece into two pieces of the
/// vocabulary, ordered by the piece's score (highest first) or id (lowest first), then by the
/// lengths of the two parts (the same direction).
fn generate_merges(tokens: &[String], by: MergeOrder) -> Vec<String> {
    use std::collections::HashMap;
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(String, String, f64, usize)> = Vec::new();
    let mut order = 0usize;
    for (i, piece) in tokens.iter().enumerate() {
        let score = match by {
            MergeOrder::Scores(s) => s.get(i).copied().unwrap_or(0.0),
            MergeOrder::Vocabulary => i as f64,
        };
        let mut local = Vec::new();
        let cuts: Vec<usize> = piece.char_indices().map(|(b, _)| b).skip(1).collect();
        for c in cuts {
            let (l, r) = piece.split_at(c);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                local.push((l.to_string(), r.to_string(), li, ri));
            }
        }
        local.sort_by_key(|x| (x.2, x.3));
        for (l, r, _, _) in local {
            merges.push((l, r, score, order));
            order += 1;
        }
    }
    // Python's sort is stable, also with reverse=True: equal keys keep their original order.
    let descending = matches!(by, MergeOrder::Scores(_));
    merges.sort_by(|a, b| {
        let ka = (a.2, a.0.chars().count(), a.1.chars().count());
        let kb = (b.2, b.0.chars().count(), b.1.chars().count());
        let by_key = ka.0.total_cmp(&kb.0).then(ka.1.cmp(&kb.1)).then(ka.2.cmp(&kb.2));
        (if descending { by_key.reverse() } else { by_key }).then(a.3.cmp(&b.3))
    });
    merges.into_iter().map(|(l, r, _, _)| format!("{l} {r}")).collect()
}
