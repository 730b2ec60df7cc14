//! T5 (v1.0, v1.1 in bf16) and BART against transformers 5.24 on the small random checkpoints of
//! `scripts/make_fixtures.py`: encoder output and logits (1e-4 relative to the largest
//! magnitude), cached decoding, greedy and beam generation token for token, tokenization; the
//! adapter seams (where `ffn_branch` and `proj_delta` act, checked against a hand-written
//! evaluation) and gradients through them (central differences, f64).

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use memvp::checkpoint::{self, Cfg, Tok, Weights};
use memvp::generate::beam::{self, BeamOptions, EarlyStopping};
use memvp::generate::{self, Sampling};
use memvp::models::bart::{Bart, BartConfig};
use memvp::models::encdec::{EncDecStepper, EncoderDecoder};
use memvp::models::t5::{T5, T5Config, relative_position_bucket};
use memvp::models::{LmHooks, NoHooks, Proj, Site};
use std::cell::RefCell;
use std::collections::HashMap;

const TOL: f64 = 1e-4;
const DIRS: [&str; 3] = ["t5_v1_0", "t5_v1_1", "bart"];

enum Model {
    T5(T5),
    Bart(Bart),
}

impl Model {
    fn load(dir: &str, dtype: DType) -> Self {
        let d = fixtures().join(dir);
        let cfg = Cfg::load(&d.join("config.json")).unwrap();
        let w = Weights::from_safetensors(&checkpoint::safetensors_files(&d).unwrap(), dtype, &Device::Cpu).unwrap();
        match cfg.opt_str("model_type").unwrap().as_deref() {
            Some("t5") => Model::T5(T5::load(&w, T5Config::from_hf(&cfg).unwrap()).unwrap()),
            Some("bart") => Model::Bart(Bart::load(&w, BartConfig::from_hf(&cfg).unwrap()).unwrap()),
            other => panic!("{dir}: unexpected model_type {other:?}"),
        }
    }
    fn ed(&self) -> &dyn EncoderDecoder {
        match self {
            Model::T5(m) => m,
            Model::Bart(m) => m,
        }
    }
    fn layers(&self) -> (usize, usize) {
        match self {
            Model::T5(m) => (m.n_encoder_layers(), m.n_decoder_layers()),
            Model::Bart(m) => (m.n_encoder_layers(), m.n_decoder_layers()),
        }
    }
}

fn reference(dir: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(dir).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn generation(dir: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join(dir).join("generation.json")).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Encoder output and logits of the reference inputs.
fn run_reference(m: &dyn EncoderDecoder, r: &HashMap<String, Tensor>) -> (Tensor, Tensor, Tensor) {
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = r["attention_mask"].to_dtype(DType::F32).unwrap();
    let dec = r["decoder_input_ids"].to_dtype(DType::U32).unwrap();
    let enc = m.encode(&ids, Some(&mask), &NoHooks).unwrap();
    let h = m.decode(&dec, &enc, Some(&mask), None, &NoHooks).unwrap();
    (enc, m.logits(&h).unwrap(), mask)
}

fn check_parity(dir: &str) {
    let model = Model::load(dir, DType::F32);
    let m = model.ed();
    let r = reference(dir);
    let (enc, logits, mask) = run_reference(m, &r);
    let e_enc = max_rel_err(&enc, &r["encoder_last_hidden_state"]);
    let e_log = max_rel_err(&logits, &r["logits"]);
    eprintln!("{dir}: encoder_last_hidden_state rel err {e_enc:e}, logits rel err {e_log:e}");
    assert!(e_enc < TOL, "{dir}: encoder output differs ({e_enc:e})");
    assert!(e_log < TOL, "{dir}: logits differ ({e_log:e})");
    {
        let m64 = Model::load(dir, DType::F64);
        let (enc64, log64, _) = run_reference(m64.ed(), &r);
        eprintln!(
            "{dir}: f64 weights: encoder rel err {:e}, logits rel err {:e}; f32 vs f64 logits {:e}; max |logit| {}",
            max_rel_err(&enc64, &r["encoder_last_hidden_state"]),
            max_rel_err(&log64, &r["logits"]),
            max_rel_err(&logits, &log64),
            r["logits"].abs().unwrap().max_all().unwrap()
        );
    }

    // Cached decoding: three tokens, then one at a time, equals the full decoder pass.
    let dec = r["decoder_input_ids"].to_dtype(DType::U32).unwrap();
    let t = dec.dims()[1];
    let mut cache = m.new_cache();
    let mut parts = Vec::new();
    let mut p = 0;
    while p < t {
        let n = if p == 0 { 3 } else { 1 };
        let h = m.decode(&dec.narrow(1, p, n).unwrap(), &enc, Some(&mask), Some(&mut cache), &NoHooks).unwrap();
        parts.push(m.logits(&h).unwrap());
        p += n;
    }
    assert_eq!(cache.len(), t);
    let inc = Tensor::cat(&parts, 1).unwrap();
    let e_inc = max_rel_err(&inc, &logits);
    eprintln!("{dir}: cached vs full decoder rel err {e_inc:e}");
    assert!(e_inc < 1e-5, "{dir}: cached decoding differs ({e_inc:e})");

    // Tokenization, greedy and beam generation.
    let g = generation(dir);
    let prompt = ids_of(&g["input_ids"]);
    let tok = Tok::from_file(&fixtures().join(dir).join("tokenizer.json")).unwrap();
    assert_eq!(tok.encode(g["prompt"].as_str().unwrap(), true).unwrap(), prompt, "{dir}: tokenization differs");
    let st = m.special_tokens();
    assert_eq!(st.decoder_start as u64, g["decoder_start_token_id"].as_u64().unwrap());
    assert_eq!(st.eos, vec![g["eos_token_id"].as_u64().unwrap() as u32]);
    let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
    let s = Sampling { max_new_tokens: max_new, ..Default::default() };
    let (mut stepper, first) =
        EncDecStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt), st.decoder_start).unwrap();
    let greedy = generate::continue_batch(&mut stepper, &first, &s, &st.eos).unwrap();
    assert_eq!(greedy[0], ids_of(&g["greedy_ids"]), "{dir}: greedy ids differ");

    // A batch with a shorter (right-padded, masked) second input gives each row's own result.
    let short: Vec<u32> = prompt[..prompt.len() / 2].iter().copied().chain(prompt.last().copied()).collect();
    let (mut st1, f1) = EncDecStepper::prefill(m, &NoHooks, std::slice::from_ref(&short), st.decoder_start).unwrap();
    let alone = generate::continue_batch(&mut st1, &f1, &s, &st.eos).unwrap();
    let (mut st2, f2) =
        EncDecStepper::prefill(m, &NoHooks, &[prompt.clone(), short.clone()], st.decoder_start).unwrap();
    let both = generate::continue_batch(&mut st2, &f2, &s, &st.eos).unwrap();
    assert_eq!(both[0], greedy[0], "{dir}: batched greedy row 0 differs");
    assert_eq!(both[1], alone[0], "{dir}: batched (padded) greedy row 1 differs");

    let b = &g["beam"];
    let opts = BeamOptions {
        num_beams: b["num_beams"].as_u64().unwrap() as usize,
        length_penalty: b["length_penalty"].as_f64().unwrap(),
        early_stopping: if b["early_stopping"].as_bool().unwrap() {
            EarlyStopping::Always
        } else {
            EarlyStopping::Heuristic
        },
        max_new_tokens: b["max_new_tokens"].as_u64().unwrap() as usize,
    };
    let (mut stepper, first) =
        EncDecStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt), st.decoder_start).unwrap();
    let out = beam::beam_search(&mut stepper, &first, &opts, &st.eos).unwrap();
    let want_score = g["beam_score"].as_f64().unwrap();
    eprintln!(
        "{dir}: beam {:?} score {} (transformers {want_score}), {} hypotheses",
        out.ids,
        out.score,
        out.hypotheses.len()
    );
    assert_eq!(out.ids, ids_of(&g["beam_ids"]), "{dir}: beam ids differ");
    assert!((out.score as f64 - want_score).abs() < 1e-4, "{dir}: beam score {} vs {want_score}", out.score);
    assert_eq!(g["beam_stopped_at_eos"].as_bool().unwrap(), st.eos.contains(out.ids.last().unwrap()));
}

#[test]
fn t5_v1_0_matches_transformers() {
    check_parity("t5_v1_0");
}

#[test]
fn t5_v1_1_bf16_matches_transformers() {
    check_parity("t5_v1_1");
}

#[test]
fn bart_matches_transformers() {
    check_parity("bart");
}

/// `tie_word_embeddings: false` files whose `encoder.embed_tokens` / `decoder.embed_tokens`
/// differ from `shared`: transformers embeds each stack with its own table, and so must memvp
/// (reading `shared` for both gave other logits and other greedy output from the first token).
#[test]
fn bart_with_untied_per_stack_tables_matches_transformers() {
    check_parity("bart_untied");
}

#[test]
fn t5_with_untied_per_stack_tables_matches_transformers() {
    check_parity("t5_untied");
}

#[test]
fn configs_read_as_transformers_reads_them() {
    let cfg = |dir: &str| Cfg::load(&fixtures().join(dir).join("config.json")).unwrap();
    let v0 = T5Config::from_hf(&cfg("t5_v1_0")).unwrap();
    assert!(!v0.is_gated_act && v0.scale_decoder_outputs && v0.tie_word_embeddings);
    assert_eq!(v0.dense_act_fn, memvp::ops::Activation::Relu);
    let v1 = T5Config::from_hf(&cfg("t5_v1_1")).unwrap();
    assert!(v1.is_gated_act && !v1.scale_decoder_outputs);
    assert_eq!(v1.dense_act_fn, memvp::ops::Activation::GeluTanh);
    // transformers-5 layout of the same v1.1 model: tied flag true, scaling off by the new key.
    let mut v = cfg("t5_v1_1");
    v.v["tie_word_embeddings"] = true.into();
    v.v["scale_decoder_outputs"] = false.into();
    assert!(!T5Config::from_hf(&v).unwrap().scale_decoder_outputs);
    // Old v1.0 layout without the new key: scaling follows tie_word_embeddings (default true).
    let mut v = cfg("t5_v1_0");
    v.v.as_object_mut().unwrap().remove("scale_decoder_outputs");
    v.v.as_object_mut().unwrap().remove("tie_word_embeddings");
    assert!(T5Config::from_hf(&v).unwrap().scale_decoder_outputs);
    let mut v = cfg("t5_v1_0");
    v.v["feed_forward_proj"] = "gated-silu".into();
    let c = T5Config::from_hf(&v).unwrap();
    assert!(c.is_gated_act && c.dense_act_fn == memvp::ops::Activation::Silu);
    v.v["feed_forward_proj"] = "gated-foo".into();
    let e = T5Config::from_hf(&v).unwrap_err().to_string();
    assert!(e.contains("feed_forward_proj") && e.contains("config.json"), "{e}");
    let b = BartConfig::from_hf(&cfg("bart")).unwrap();
    assert_eq!(
        (b.pad_token_id, b.bos_token_id, b.decoder_start_token_id, b.forced_eos_token_id),
        (1, Some(0), 2, None)
    );
    assert!(b.scale_embedding && b.tie_word_embeddings);
}

/// transformers' `_relative_position_bucket` as run-length lists `(first position, bucket)`
/// over relative positions -1000..=1000 (torch output).
#[test]
fn t5_relative_position_buckets_match_torch() {
    type Runs = &'static [(i64, usize)];
    let cases: [(bool, usize, usize, Runs); 4] = [
        (
            true,
            32,
            128,
            &[
                (-1000, 15),
                (-90, 14),
                (-63, 13),
                (-45, 12),
                (-31, 11),
                (-22, 10),
                (-15, 9),
                (-11, 8),
                (-7, 7),
                (-6, 6),
                (-5, 5),
                (-4, 4),
                (-3, 3),
                (-2, 2),
                (-1, 1),
                (0, 0),
                (1, 17),
                (2, 18),
                (3, 19),
                (4, 20),
                (5, 21),
                (6, 22),
                (7, 23),
                (8, 24),
                (12, 25),
                (16, 26),
                (23, 27),
                (32, 28),
                (46, 29),
                (64, 30),
                (91, 31),
            ],
        ),
        (
            true,
            64,
            256,
            &[
                (-1000, 31),
                (-215, 30),
                (-181, 29),
                (-152, 28),
                (-127, 27),
                (-107, 26),
                (-90, 25),
                (-76, 24),
                (-63, 23),
                (-53, 22),
                (-45, 21),
                (-38, 20),
                (-31, 19),
                (-26, 18),
                (-22, 17),
                (-19, 16),
                (-15, 15),
                (-14, 14),
                (-13, 13),
                (-12, 12),
                (-11, 11),
                (-10, 10),
                (-9, 9),
                (-8, 8),
                (-7, 7),
                (-6, 6),
                (-5, 5),
                (-4, 4),
                (-3, 3),
                (-2, 2),
                (-1, 1),
                (0, 0),
                (1, 33),
                (2, 34),
                (3, 35),
                (4, 36),
                (5, 37),
                (6, 38),
                (7, 39),
                (8, 40),
                (9, 41),
                (10, 42),
                (11, 43),
                (12, 44),
                (13, 45),
                (14, 46),
                (15, 47),
                (16, 48),
                (20, 49),
                (23, 50),
                (27, 51),
                (32, 52),
                (39, 53),
                (46, 54),
                (54, 55),
                (64, 56),
                (77, 57),
                (91, 58),
                (108, 59),
                (128, 60),
                (153, 61),
                (182, 62),
                (216, 63),
            ],
        ),
        (
            false,
            32,
            128,
            &[
                (-1000, 31),
                (-112, 30),
                (-98, 29),
                (-86, 28),
                (-76, 27),
                (-66, 26),
                (-58, 25),
                (-51, 24),
                (-45, 23),
                (-39, 22),
                (-34, 21),
                (-30, 20),
                (-26, 19),
                (-23, 18),
                (-20, 17),
                (-18, 16),
                (-15, 15),
                (-14, 14),
                (-13, 13),
                (-12, 12),
                (-11, 11),
                (-10, 10),
                (-9, 9),
                (-8, 8),
                (-7, 7),
                (-6, 6),
                (-5, 5),
                (-4, 4),
                (-3, 3),
                (-2, 2),
                (-1, 1),
                (0, 0),
            ],
        ),
        (
            false,
            64,
            256,
            &[
                (-1000, 63),
                (-239, 62),
                (-224, 61),
                (-210, 60),
                (-197, 59),
                (-184, 58),
                (-173, 57),
                (-162, 56),
                (-152, 55),
                (-142, 54),
                (-133, 53),
                (-125, 52),
                (-117, 51),
                (-109, 50),
                (-103, 49),
                (-96, 48),
                (-90, 47),
                (-84, 46),
                (-79, 45),
                (-74, 44),
                (-69, 43),
                (-65, 42),
                (-61, 41),
                (-57, 40),
                (-53, 39),
                (-50, 38),
                (-47, 37),
                (-44, 36),
                (-41, 35),
                (-38, 34),
                (-36, 33),
                (-34, 32),
                (-31, 31),
                (-30, 30),
                (-29, 29),
                (-28, 28),
                (-27, 27),
                (-26, 26),
                (-25, 25),
                (-24, 24),
                (-23, 23),
                (-22, 22),
                (-21, 21),
                (-20, 20),
                (-19, 19),
                (-18, 18),
                (-17, 17),
                (-16, 16),
                (-15, 15),
                (-14, 14),
                (-13, 13),
                (-12, 12),
                (-11, 11),
                (-10, 10),
                (-9, 9),
                (-8, 8),
                (-7, 7),
                (-6, 6),
                (-5, 5),
                (-4, 4),
                (-3, 3),
                (-2, 2),
                (-1, 1),
                (0, 0),
            ],
        ),
    ];
    for (bi, nb, md, runs) in cases {
        for rel in -1000i64..=1000 {
            let want = runs.iter().rev().find(|r| r.0 <= rel).unwrap().1;
            assert_eq!(
                relative_position_bucket(rel, bi, nb, md),
                want,
                "bidirectional {bi}, {nb} buckets, max distance {md}, relative position {rel}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seams.

/// Adds `value · input` to one FFN or one self-attention projection (a constant would be
/// invisible to BART's LayerNorms and to the softmax over keys).
struct Const {
    site: Site,
    layer: usize,
    proj: Option<Proj>,
    value: f64,
}

impl LmHooks for Const {
    fn ffn_branch(&self, site: Site, layer: usize, u: &Tensor) -> anyhow::Result<Option<Tensor>> {
        if self.proj.is_none() && site == self.site && layer == self.layer {
            return Ok(Some(u.affine(self.value, 0.0)?));
        }
        Ok(None)
    }
    fn proj_delta(&self, site: Site, layer: usize, proj: Proj, x: &Tensor) -> anyhow::Result<Option<Tensor>> {
        if self.proj == Some(proj) && site == self.site && layer == self.layer {
            return Ok(Some(x.affine(self.value, 0.0)?));
        }
        Ok(None)
    }
}

#[test]
fn every_seam_changes_the_logits() {
    for dir in DIRS {
        let model = Model::load(dir, DType::F32);
        let m = model.ed();
        let r = reference(dir);
        let (_, base, _) = run_reference(m, &r);
        let (ne, nd) = model.layers();
        let logits = |h: &dyn LmHooks| -> Tensor {
            let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
            let mask = r["attention_mask"].to_dtype(DType::F32).unwrap();
            let dec = r["decoder_input_ids"].to_dtype(DType::U32).unwrap();
            let enc = m.encode(&ids, Some(&mask), h).unwrap();
            m.logits(&m.decode(&dec, &enc, Some(&mask), None, h).unwrap()).unwrap()
        };
        // A zero contribution changes nothing.
        let zero = Const { site: Site::Decoder, layer: 0, proj: None, value: 0.0 };
        assert_eq!(max_abs_err(&logits(&zero), &base), 0.0);
        for (site, n) in [(Site::Encoder, ne), (Site::Decoder, nd)] {
            for layer in 0..n {
                for proj in [None, Some(Proj::Q), Some(Proj::K), Some(Proj::V), Some(Proj::O)] {
                    let h = Const { site, layer, proj, value: 0.3 };
                    let d = max_abs_err(&logits(&h), &base);
                    assert!(d > 1e-3, "{dir}: {site:?} layer {layer} {proj:?}: logits unchanged ({d:e})");
                }
            }
        }
    }
}

/// `ffn_branch` returns `u · W[site, layer]` and records `u`.
struct Linear {
    w: HashMap<(Site, usize), Tensor>,
    seen: RefCell<Vec<(Site, usize, Tensor)>>,
}

impl LmHooks for Linear {
    fn ffn_branch(&self, site: Site, layer: usize, u: &Tensor) -> anyhow::Result<Option<Tensor>> {
        self.seen.borrow_mut().push((site, layer, u.clone()));
        Ok(Some(u.broadcast_matmul(&self.w[&(site, layer)])?))
    }
}

/// A hand-written evaluation of a model on one encoder token and one decoder token (attention
/// over a single key is the identity on its value), with `u · W` added to every FFN.
struct Hand<'a> {
    w: &'a Weights,
    ws: &'a HashMap<(Site, usize), Tensor>,
}

impl Hand<'_> {
    fn t(&self, n: &str) -> Tensor {
        self.w.get_any(n).unwrap()
    }
    fn lin(&self, n: &str, x: &Tensor) -> Tensor {
        let y = x.broadcast_matmul(&self.t(&format!("{n}.weight")).t().unwrap()).unwrap();
        if self.w.contains(&format!("{n}.bias")) { y.broadcast_add(&self.t(&format!("{n}.bias"))).unwrap() } else { y }
    }
    fn rms(&self, n: &str, x: &Tensor, eps: f64) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(2).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&self.t(n)).unwrap()
    }
    fn ln(&self, n: &str, x: &Tensor) -> Tensor {
        let mean = x.mean_keepdim(2).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
        xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&self.t(&format!("{n}.weight")))
            .unwrap()
            .broadcast_add(&self.t(&format!("{n}.bias")))
            .unwrap()
    }
    fn branch(&self, site: Site, l: usize, u: &Tensor) -> Tensor {
        u.broadcast_matmul(&self.ws[&(site, l)]).unwrap()
    }

    /// T5: (encoder output, expected u per (site, layer), logits).
    fn t5(&self, c: &T5Config, src: u32, start: u32) -> (Tensor, Vec<Tensor>, Tensor) {
        let eps = c.layer_norm_epsilon;
        let emb = |id: u32| self.t("shared.weight").narrow(0, id as usize, 1).unwrap().unsqueeze(0).unwrap();
        let ffn = |p: &str, u: &Tensor| -> Tensor {
            let d = format!("{p}.DenseReluDense");
            if c.is_gated_act {
                let g = self.lin(&format!("{d}.wi_0"), u).gelu().unwrap();
                let up = self.lin(&format!("{d}.wi_1"), u);
                self.lin(&format!("{d}.wo"), &(g * up).unwrap())
            } else {
                self.lin(&format!("{d}.wo"), &self.lin(&format!("{d}.wi"), u).relu().unwrap())
            }
        };
        let mut us = Vec::new();
        let mut x = emb(src);
        for l in 0..c.num_layers {
            let p = format!("encoder.block.{l}.layer");
            let n = self.rms(&format!("{p}.0.layer_norm.weight"), &x, eps);
            let a = self.lin(&format!("{p}.0.SelfAttention.o"), &self.lin(&format!("{p}.0.SelfAttention.v"), &n));
            let h = (x + a).unwrap();
            let u = self.rms(&format!("{p}.1.layer_norm.weight"), &h, eps);
            x = ((h + ffn(&format!("{p}.1"), &u)).unwrap() + self.branch(Site::Encoder, l, &u)).unwrap();
            us.push(u);
        }
        let enc = self.rms("encoder.final_layer_norm.weight", &x, eps);
        let mut y = emb(start);
        for l in 0..c.num_decoder_layers {
            let p = format!("decoder.block.{l}.layer");
            let n = self.rms(&format!("{p}.0.layer_norm.weight"), &y, eps);
            let a = self.lin(&format!("{p}.0.SelfAttention.o"), &self.lin(&format!("{p}.0.SelfAttention.v"), &n));
            let h = (y + a).unwrap();
            let ca =
                self.lin(&format!("{p}.1.EncDecAttention.o"), &self.lin(&format!("{p}.1.EncDecAttention.v"), &enc));
            let h = (h + ca).unwrap();
            let u = self.rms(&format!("{p}.2.layer_norm.weight"), &h, eps);
            y = ((h + ffn(&format!("{p}.2"), &u)).unwrap() + self.branch(Site::Decoder, l, &u)).unwrap();
            us.push(u);
        }
        let mut dec = self.rms("decoder.final_layer_norm.weight", &y, eps);
        if c.scale_decoder_outputs {
            dec = (dec * (c.d_model as f64).powf(-0.5)).unwrap();
        }
        let head = if self.w.contains("lm_head.weight") { "lm_head" } else { "shared" };
        (enc, us, self.lin(head, &dec))
    }

    fn bart(&self, c: &BartConfig, src: u32, start: u32) -> (Tensor, Vec<Tensor>, Tensor) {
        let scale = (c.d_model as f64).sqrt();
        let emb = |id: u32, stack: &str| {
            let e = (self.t("model.shared.weight").narrow(0, id as usize, 1).unwrap() * scale).unwrap();
            let pos = self.t(&format!("model.{stack}.embed_positions.weight")).narrow(0, 2, 1).unwrap();
            self.ln(&format!("model.{stack}.layernorm_embedding"), &(e + pos).unwrap().unsqueeze(0).unwrap())
        };
        let ffn = |p: &str, u: &Tensor| -> Tensor {
            self.lin(&format!("{p}.fc2"), &self.lin(&format!("{p}.fc1"), u).gelu_erf().unwrap())
        };
        let mut us = Vec::new();
        let mut x = emb(src, "encoder");
        for l in 0..c.encoder_layers {
            let p = format!("model.encoder.layers.{l}");
            let a = self.lin(&format!("{p}.self_attn.out_proj"), &self.lin(&format!("{p}.self_attn.v_proj"), &x));
            let h = self.ln(&format!("{p}.self_attn_layer_norm"), &(x + a).unwrap());
            let f = (ffn(&p, &h) + self.branch(Site::Encoder, l, &h)).unwrap();
            x = self.ln(&format!("{p}.final_layer_norm"), &(&h + f).unwrap());
            us.push(h);
        }
        let enc = x;
        let mut y = emb(start, "decoder");
        for l in 0..c.decoder_layers {
            let p = format!("model.decoder.layers.{l}");
            let a = self.lin(&format!("{p}.self_attn.out_proj"), &self.lin(&format!("{p}.self_attn.v_proj"), &y));
            let h = self.ln(&format!("{p}.self_attn_layer_norm"), &(y + a).unwrap());
            let ca =
                self.lin(&format!("{p}.encoder_attn.out_proj"), &self.lin(&format!("{p}.encoder_attn.v_proj"), &enc));
            let h = self.ln(&format!("{p}.encoder_attn_layer_norm"), &(h + ca).unwrap());
            let f = (ffn(&p, &h) + self.branch(Site::Decoder, l, &h)).unwrap();
            y = self.ln(&format!("{p}.final_layer_norm"), &(&h + f).unwrap());
            us.push(h);
        }
        let logits = self.lin("model.shared", &y).broadcast_add(&self.t("final_logits_bias")).unwrap();
        (enc, us, logits)
    }
}

/// `ffn_branch` sees exactly the FFN's input and its result is added before the residual sum
/// (and, in BART, before the block's final LayerNorm): the model with `u · W` in every FFN
/// equals a hand-written evaluation, in f64.
#[test]
fn ffn_branch_is_wired_where_the_method_says() {
    for dir in DIRS {
        let d = fixtures().join(dir);
        let cfg = Cfg::load(&d.join("config.json")).unwrap();
        let w =
            Weights::from_safetensors(&checkpoint::safetensors_files(&d).unwrap(), DType::F64, &Device::Cpu).unwrap();
        let model = Model::load(dir, DType::F64);
        let m = model.ed();
        let (ne, nd) = model.layers();
        let dm = m.embed(&Tensor::zeros((1, 1), DType::U32, &Device::Cpu).unwrap()).unwrap().dims()[2];
        let mut rng = memvp::rng::Rng::new(7);
        let mut ws = HashMap::new();
        for (site, n) in [(Site::Encoder, ne), (Site::Decoder, nd)] {
            for l in 0..n {
                ws.insert((site, l), randn(&mut rng, &[dm, dm], 0.2, DType::F64));
            }
        }
        let hook = Linear { w: ws.clone(), seen: RefCell::new(Vec::new()) };
        let (src, start) = (5u32, m.special_tokens().decoder_start);
        let ids = Tensor::new(&[[src]], &Device::Cpu).unwrap();
        let enc = m.encode(&ids, None, &hook).unwrap();
        let logits = m
            .logits(&m.decode(&Tensor::new(&[[start]], &Device::Cpu).unwrap(), &enc, None, None, &hook).unwrap())
            .unwrap();
        let hand = Hand { w: &w, ws: &ws };
        let (enc_h, us_h, logits_h) = match &model {
            Model::T5(_) => hand.t5(&T5Config::from_hf(&cfg).unwrap(), src, start),
            Model::Bart(_) => hand.bart(&BartConfig::from_hf(&cfg).unwrap(), src, start),
        };
        let seen = hook.seen.borrow();
        let order: Vec<(Site, usize)> = seen.iter().map(|s| (s.0, s.1)).collect();
        let want: Vec<(Site, usize)> =
            (0..ne).map(|l| (Site::Encoder, l)).chain((0..nd).map(|l| (Site::Decoder, l))).collect();
        assert_eq!(order, want, "{dir}: hook call order");
        let mut worst = 0f64;
        for (s, u) in seen.iter().zip(&us_h) {
            let e = max_rel_err(&s.2, u);
            worst = worst.max(e);
            assert!(e < 1e-10, "{dir}: u at {:?} layer {} differs ({e:e})", s.0, s.1);
        }
        let e1 = max_rel_err(&enc, &enc_h);
        let e2 = max_rel_err(&logits, &logits_h);
        eprintln!("{dir}: hand evaluation: u {worst:e}, encoder {e1:e}, logits {e2:e}");
        assert!(e1 < 1e-10 && e2 < 1e-10, "{dir}: {e1:e} {e2:e}");
    }
}

/// Trainable tensors inside the hooks: an FFN branch `u · W` in every block and a LoRA-style
/// delta `x · A` on every self-attention query.
struct Trainable {
    w: Tensor,
    a: Tensor,
}

impl LmHooks for Trainable {
    fn ffn_branch(&self, _: Site, _: usize, u: &Tensor) -> anyhow::Result<Option<Tensor>> {
        Ok(Some(u.broadcast_matmul(&self.w)?))
    }
    fn proj_delta(&self, _: Site, _: usize, p: Proj, x: &Tensor) -> anyhow::Result<Option<Tensor>> {
        Ok((p == Proj::Q).then(|| x.broadcast_matmul(&self.a)).transpose()?)
    }
}

#[test]
fn gradients_flow_through_the_seams() {
    for dir in ["t5_v1_0", "bart"] {
        let model = Model::load(dir, DType::F64);
        let m = model.ed();
        let r = reference(dir);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = r["attention_mask"].to_dtype(DType::F32).unwrap();
        let dec = r["decoder_input_ids"].to_dtype(DType::U32).unwrap();
        let mut rng = memvp::rng::Rng::new(11);
        let d = m.embed(&ids).unwrap().dims()[2];
        let w0 = randn(&mut rng, &[d, d], 0.05, DType::F64);
        let a0 = randn(&mut rng, &[d, d], 0.05, DType::F64);
        let (b, t) = dec.dims2().unwrap();
        let vocab = 128;
        let weights = randn(&mut rng, &[b, t, vocab], 1.0, DType::F64);
        let loss = |h: &Trainable| -> Tensor {
            let enc = m.encode(&ids, Some(&mask), h).unwrap();
            let l = m.logits(&m.decode(&dec, &enc, Some(&mask), None, h).unwrap()).unwrap();
            (l * &weights).unwrap().sum_all().unwrap()
        };
        let (wv, av) = (Var::from_tensor(&w0).unwrap(), Var::from_tensor(&a0).unwrap());
        let l = loss(&Trainable { w: wv.as_tensor().clone(), a: av.as_tensor().clone() });
        let grads = l.backward().unwrap();
        let gw = grads.get(wv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ga = grads.get(av.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let bump = |t: &Tensor, i: usize, e: f64| -> Tensor {
            let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v[i] += e;
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
        };
        let eps = 1e-5;
        for (name, g, which) in [("W", &gw, 0), ("A", &ga, 1)] {
            for i in [0, 7 * d + 3, d * d - 1] {
                let at = |e: f64| -> f64 {
                    let h = if which == 0 {
                        Trainable { w: bump(&w0, i, e), a: a0.clone() }
                    } else {
                        Trainable { w: w0.clone(), a: bump(&a0, i, e) }
                    };
                    loss(&h).to_scalar::<f64>().unwrap()
                };
                let num = (at(eps) - at(-eps)) / (2.0 * eps);
                let err = (num - g[i]).abs() / num.abs().max(1.0);
                eprintln!("{dir}: d loss / d {name}[{i}]: analytic {} numeric {num} (rel err {err:e})", g[i]);
                assert!(err < 1e-6, "{dir}: gradient of {name}[{i}] differs");
                assert!(g[i].abs() > 1e-6, "{dir}: gradient of {name}[{i}] vanishes");
            }
        }
    }
}

/// A fully masked encoder prefix leaves T5 unchanged (relative positions between the tokens do
/// not move), and a kept one changes it.
#[test]
fn t5_masked_prefix_is_inert() {
    let model = Model::load("t5_v1_0", DType::F32);
    let m = model.ed();
    let prompt = ids_of(&generation("t5_v1_0")["input_ids"]);
    let start = m.special_tokens().decoder_start;
    let (_, base) = EncDecStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt), start).unwrap();
    let mut rng = memvp::rng::Rng::new(3);
    let prefix = randn(&mut rng, &[1, 4, 64], 1.0, DType::F32);
    let (_, masked) =
        EncDecStepper::prefill_with_prefix(m, &NoHooks, std::slice::from_ref(&prompt), Some((&prefix, &[0.0])), start)
            .unwrap();
    let (_, kept) =
        EncDecStepper::prefill_with_prefix(m, &NoHooks, std::slice::from_ref(&prompt), Some((&prefix, &[1.0])), start)
            .unwrap();
    assert!(max_rel_err(&masked, &base) < 1e-5);
    assert!(max_abs_err(&kept, &base) > 1e-3);
}

/// More beam settings (every `early_stopping` mode, penalties below, at and above zero, 2-5
/// beams), recorded from transformers 5.24 `model.generate(input_ids, num_beams=..,
/// length_penalty=.., early_stopping=.., max_new_tokens=.., do_sample=False)` on each
/// fixture's `generation.json` prompt with the same neutral settings; `score` is
/// `sequences_scores`.
#[test]
fn beam_settings_match_transformers() {
    type Case = (&'static str, usize, f64, EarlyStopping, usize, &'static [u32], f64);
    let cases: &[Case] = &[
        (
            "t5_v1_0",
            4,
            1.0,
            EarlyStopping::Heuristic,
            12,
            &[126, 31, 126, 29, 40, 44, 31, 9, 44, 31, 102, 36],
            -3.594827890396118,
        ),
        (
            "t5_v1_0",
            2,
            2.0,
            EarlyStopping::Heuristic,
            10,
            &[126, 100, 29, 89, 21, 29, 89, 31, 16, 20],
            -0.3686005771160126,
        ),
        (
            "t5_v1_0",
            3,
            0.7,
            EarlyStopping::Always,
            16,
            &[126, 31, 126, 29, 40, 44, 31, 35, 108, 85, 31, 23, 31, 9, 44, 31],
            -8.336113929748535,
        ),
        ("t5_v1_0", 5, -0.5, EarlyStopping::Never, 8, &[126, 31, 126, 29, 40, 44, 31, 102], -79.95087432861328),
        (
            "t5_v1_0",
            3,
            1.5,
            EarlyStopping::Never,
            12,
            &[126, 31, 126, 29, 40, 44, 31, 102, 37, 116, 108, 85],
            -1.0423039197921753,
        ),
        ("t5_v1_0", 2, 0.0, EarlyStopping::Always, 10, &[126, 100, 29, 89, 21, 29, 89, 31, 16, 20], -36.86005783081055),
        (
            "t5_v1_1",
            4,
            1.0,
            EarlyStopping::Heuristic,
            12,
            &[103, 124, 72, 33, 79, 22, 43, 27, 53, 117, 38, 77],
            -2.2623450756073,
        ),
        (
            "t5_v1_1",
            2,
            2.0,
            EarlyStopping::Heuristic,
            10,
            &[103, 124, 72, 33, 79, 22, 43, 46, 55, 73],
            -0.2387414425611496,
        ),
        (
            "t5_v1_1",
            3,
            0.7,
            EarlyStopping::Always,
            16,
            &[103, 124, 72, 33, 79, 22, 43, 46, 55, 124, 79, 112, 76, 83, 28, 40],
            -5.079533100128174,
        ),
        ("t5_v1_1", 5, -0.5, EarlyStopping::Never, 8, &[57, 107, 116, 63, 58, 72, 14, 61], -49.85786437988281),
        (
            "t5_v1_1",
            3,
            1.5,
            EarlyStopping::Never,
            12,
            &[103, 124, 72, 33, 79, 22, 43, 46, 55, 73, 4, 76],
            -0.6529309749603271,
        ),
        (
            "t5_v1_1",
            2,
            0.0,
            EarlyStopping::Always,
            10,
            &[103, 124, 72, 33, 79, 22, 43, 46, 55, 73],
            -23.874143600463867,
        ),
        (
            "bart",
            4,
            1.0,
            EarlyStopping::Heuristic,
            12,
            &[26, 70, 100, 102, 44, 33, 108, 26, 33, 108, 2],
            -1.688778281211853,
        ),
        (
            "bart",
            2,
            2.0,
            EarlyStopping::Heuristic,
            10,
            &[26, 57, 100, 108, 44, 100, 93, 57, 57, 57],
            -0.20214232802391052,
        ),
        ("bart", 3, 0.7, EarlyStopping::Always, 16, &[26, 70, 100, 102, 44, 33, 108, 14, 2], -3.333193778991699),
        ("bart", 5, -0.5, EarlyStopping::Never, 8, &[26, 70, 100, 102, 44, 33, 108, 14], -38.03001022338867),
        (
            "bart",
            3,
            1.5,
            EarlyStopping::Never,
            12,
            &[26, 70, 100, 102, 44, 33, 108, 26, 33, 26, 93, 26],
            -0.48824286460876465,
        ),
        ("bart", 2, 0.0, EarlyStopping::Always, 10, &[26, 57, 100, 108, 44, 100, 93, 57, 57, 57], -20.2142333984375),
    ];
    let mut models = HashMap::new();
    for &(dir, nb, lp, es, max_new, want, score) in cases {
        let model = models.entry(dir).or_insert_with(|| Model::load(dir, DType::F32));
        let m = model.ed();
        let prompt = ids_of(&generation(dir)["input_ids"]);
        let st = m.special_tokens();
        let (mut stepper, first) =
            EncDecStepper::prefill(m, &NoHooks, std::slice::from_ref(&prompt), st.decoder_start).unwrap();
        let opts = BeamOptions { num_beams: nb, length_penalty: lp, early_stopping: es, max_new_tokens: max_new };
        let out = beam::beam_search(&mut stepper, &first, &opts, &st.eos).unwrap();
        assert_eq!(out.ids, want, "{dir} {opts:?}");
        let e = (out.score as f64 - score).abs() / score.abs().max(1.0);
        assert!(e < 1e-4, "{dir} {opts:?}: score {} vs {score}", out.score);
    }
}
