//! What T5 and BART share as encoder-decoder models: the decoder cache (self-attention keys and
//! values grown per step, cross-attention keys and values computed once from the encoder
//! output), the [`EncoderDecoder`] trait, and [`EncDecStepper`], which runs the encoder once and
//! then feeds the decoder one token per row, for `generate::decode` (greedy, sampling) and
//! `generate::beam::beam_search`; and the teacher-forcing pass both families share.

use super::{Hidden, KvCache, LmHooks, TeacherForcing};
use crate::generate::stepper::{BeamStepper, Stepper};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

/// Decoder state between steps.
#[derive(Clone)]
pub struct EncDecCache {
    /// Self-attention keys and values, one entry per decoder block.
    pub self_attn: KvCache,
    /// Cross-attention keys and values `[b, t_enc, heads, head_dim]` per decoder block, filled
    /// by the first decoder call and reused after it.
    pub cross: Vec<Option<(Tensor, Tensor)>>,
}

impl EncDecCache {
    pub fn new(n_layers: usize) -> Self {
        Self { self_attn: KvCache::new(n_layers), cross: vec![None; n_layers] }
    }

    /// Number of decoder positions already cached.
    pub fn len(&self) -> usize {
        self.self_attn.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps batch rows `idx` (u32, may repeat rows or change their number).
    pub fn reorder(&mut self, idx: &Tensor) -> Result<()> {
        self.self_attn.reorder(idx)?;
        self.reorder_cross(idx)
    }

    /// Reorders only the cross-attention keys and values.
    pub fn reorder_cross(&mut self, idx: &Tensor) -> Result<()> {
        for c in self.cross.iter_mut().flatten() {
            *c = (c.0.index_select(idx, 0)?, c.1.index_select(idx, 0)?);
        }
        Ok(())
    }
}

/// Cross-attention keys and values of block `layer`: from the cache when already there,
/// otherwise computed by `make` (and stored when a cache is given).
pub(crate) fn cross_kv(
    cache: Option<&mut EncDecCache>,
    layer: usize,
    make: impl FnOnce() -> Result<(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)> {
    match cache {
        Some(c) => {
            if let Some(kv) = &c.cross[layer] {
                return Ok(kv.clone());
            }
            let kv = make()?;
            c.cross[layer] = Some(kv.clone());
            Ok(kv)
        }
        None => make(),
    }
}

/// Token ids that generation needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub decoder_start: u32,
    pub eos: Vec<u32>,
    pub pad: u32,
}

/// An encoder-decoder language model (T5, BART). Masks are `[b, t]` with 1 for tokens and 0
/// for padding; hidden states are `[b, t, d]`.
pub trait EncoderDecoder {
    /// The encoder's token embeddings `[b, t, d]` as it consumes them (BART: already scaled).
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// The decoder's (its own table when the checkpoint keeps untied per-stack tables).
    fn embed_decoder(&self, ids: &Tensor) -> Result<Tensor>;
    /// Runs the encoder on embeddings (`Site::Encoder` hooks); returns its last hidden state.
    fn encode_embeds(&self, x: &Tensor, mask: Option<&Tensor>, hooks: &dyn LmHooks) -> Result<Tensor>;
    /// Runs the decoder on token ids `[b, t]` placed after the `cache.len()` cached positions
    /// (`Site::Decoder` hooks); returns the hidden states that [`Self::logits`] takes. The
    /// decoder has no key mask: right-padded decoder inputs only affect the padded positions
    /// themselves (causal attention), which a loss should skip.
    fn decode(
        &self,
        ids: &Tensor,
        enc: &Tensor,
        enc_mask: Option<&Tensor>,
        cache: Option<&mut EncDecCache>,
        hooks: &dyn LmHooks,
    ) -> Result<Tensor>;
    /// Logits `[.., vocab]` from decoder hidden states `[.., d]`.
    fn logits(&self, h: &Tensor) -> Result<Tensor>;
    fn new_cache(&self) -> EncDecCache;
    fn special_tokens(&self) -> SpecialTokens;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;

    fn encode(&self, ids: &Tensor, mask: Option<&Tensor>, hooks: &dyn LmHooks) -> Result<Tensor> {
        self.encode_embeds(&self.embed(ids)?, mask, hooks)
    }
}

/// The teacher-forcing pass of an encoder-decoder LM: the encoder on the (prefixed, masked)
/// input, the decoder on the decoder inputs.
pub(crate) fn teacher_forcing(m: &dyn EncoderDecoder, tf: &TeacherForcing, hooks: &dyn LmHooks) -> Result<Hidden> {
    let (b, t) = tf.input_ids.dims2()?;
    let dec = tf.decoder_ids.context("an encoder-decoder batch without decoder inputs")?;
    let mut x = m.embed(tf.input_ids)?;
    let n = tf.prefix.map_or(0, |p| p.0.dims()[1]);
    if let Some((p, _)) = tf.prefix {
        x = Tensor::cat(&[p, &x], 1)?;
    }
    let x = super::edit_input(hooks, x, &vec![n; b])?;
    let enc_mask = key_mask(b, t, Some(tf.input_lens), tf.prefix.map(|p| (n, p.1)), x.device())?;
    let enc = m.encode_embeds(&x, enc_mask.as_ref(), hooks)?;
    let rows = dec.dims()[1];
    let h = m.decode(dec, &enc, enc_mask.as_ref(), None, hooks)?;
    Ok(Hidden { h, rows, offset: 0 })
}

/// Encodes the prompts and starts the decoder: [`super::LanguageModel::prefill`] of T5 and BART.
pub(crate) fn prefill<'a>(
    m: &'a dyn EncoderDecoder,
    hooks: &'a dyn LmHooks,
    prompts: &[Vec<u32>],
    prefix: Option<(&Tensor, &[f32])>,
) -> Result<(Box<dyn BeamStepper + 'a>, Tensor)> {
    let start = m.special_tokens().decoder_start;
    let (st, first) = EncDecStepper::prefill_with_prefix(m, hooks, prompts, prefix, start)?;
    Ok((Box::new(st), first))
}

/// Decoder inputs for teacher forcing, as transformers' `shift_tokens_right`: the start token
/// followed by the labels without their last token.
pub fn shift_tokens_right(labels: &[u32], decoder_start: u32) -> Vec<u32> {
    std::iter::once(decoder_start).chain(labels.iter().copied().take(labels.len().saturating_sub(1))).collect()
}

/// Right-pads `rows` with `pad` into ids `[b, t]`.
pub fn right_pad(rows: &[Vec<u32>], pad: u32, dev: &Device) -> Result<Tensor> {
    let b = rows.len();
    if b == 0 {
        bail!("no encoder inputs")
    }
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    if t == 0 {
        bail!("empty encoder input")
    }
    let mut ids = Vec::with_capacity(b * t);
    for r in rows {
        ids.extend(r.iter().copied().chain(std::iter::repeat_n(pad, t - r.len())));
    }
    Ok(Tensor::from_vec(ids, (b, t), dev)?)
}

/// Key mask `[b, n + t]` (1 attend, 0 not): `n` prefix positions carrying each row's image
/// indicator, then `t` text positions of which the first `lens[r]` are real (all when `lens`
/// is `None`). `None` when every key is attended.
pub fn key_mask(
    b: usize,
    t: usize,
    lens: Option<&[usize]>,
    prefix: Option<(usize, &[f32])>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let n = prefix.map_or(0, |p| p.0);
    let flag = |r: usize| prefix.map_or(1.0, |p| p.1[r]);
    let len = |r: usize| lens.map_or(t, |l| l[r]);
    if (0..b).all(|r| (n == 0 || flag(r) == 1.0) && len(r) == t) {
        return Ok(None);
    }
    let mut mk = Vec::with_capacity(b * (n + t));
    for r in 0..b {
        mk.extend(std::iter::repeat_n(flag(r), n).chain((0..t).map(|j| if j < len(r) { 1.0 } else { 0.0 })));
    }
    Ok(Some(Tensor::from_vec(mk, (b, n + t), dev)?))
}

/// An encoder-decoder model mid-generation: the encoder output is fixed, the decoder takes one
/// token per row per step.
pub struct EncDecStepper<'a> {
    model: &'a dyn EncoderDecoder,
    hooks: &'a dyn LmHooks,
    enc: Tensor,
    enc_mask: Option<Tensor>,
    cache: EncDecCache,
    /// Every row holds the same encoder output (one input expanded to beams), so reordering
    /// rows leaves the encoder side unchanged.
    same_source: bool,
}

impl<'a> EncDecStepper<'a> {
    /// Encodes `encoder_ids` (right-padded with the pad id and masked when their lengths
    /// differ), runs the decoder on `decoder_start` for every row, and returns the stepper with
    /// the logits `[b, vocab]` that follow the start token.
    pub fn prefill(
        model: &'a dyn EncoderDecoder,
        hooks: &'a dyn LmHooks,
        encoder_ids: &[Vec<u32>],
        decoder_start: u32,
    ) -> Result<(Self, Tensor)> {
        Self::prefill_with_prefix(model, hooks, encoder_ids, None, decoder_start)
    }

    /// As [`Self::prefill`], with embeddings `[b, n, d]` placed before every encoder input (the
    /// input-space baseline's visual tokens, in the space [`EncoderDecoder::embed`] returns);
    /// `prefix.1[i] = 0` masks row `i`'s prefix out.
    pub fn prefill_with_prefix(
        model: &'a dyn EncoderDecoder,
        hooks: &'a dyn LmHooks,
        encoder_ids: &[Vec<u32>],
        prefix: Option<(&Tensor, &[f32])>,
        decoder_start: u32,
    ) -> Result<(Self, Tensor)> {
        let dev = model.device().clone();
        let pad = model.special_tokens().pad;
        let ids = right_pad(encoder_ids, pad, &dev)?;
        let (b, t) = ids.dims2()?;
        let lens: Vec<usize> = encoder_ids.iter().map(Vec::len).collect();
        let mut x = model.embed(&ids)?;
        let mut flags = None;
        if let Some((p, keep)) = prefix {
            let (pb, n, _) = p.dims3()?;
            if pb != b || keep.len() != b {
                bail!("prefix has {pb} rows and {} flags for {b} encoder inputs", keep.len())
            }
            x = Tensor::cat(&[&p.to_dtype(x.dtype())?, &x], 1)?;
            flags = Some((n, keep));
        }
        let n = flags.map_or(0, |f| f.0);
        let x = super::edit_input(hooks, x, &vec![n; b])?;
        let mask = key_mask(b, t, Some(&lens), flags, &dev)?;
        let enc = model.encode_embeds(&x, mask.as_ref(), hooks)?;
        let mut s = Self { model, hooks, enc, enc_mask: mask, cache: model.new_cache(), same_source: b == 1 };
        let logits = s.step(&vec![decoder_start; b])?;
        Ok((s, logits))
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.enc.dims()[0]
    }

    /// The encoder output `[rows, t, d]`.
    pub fn encoder_output(&self) -> &Tensor {
        &self.enc
    }
}

impl Stepper for EncDecStepper<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let b = tokens.len();
        if b != self.rows() {
            bail!("decoder step with {b} tokens for {} encoder rows", self.rows())
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), self.model.device())?;
        let h = self.model.decode(&ids, &self.enc, self.enc_mask.as_ref(), Some(&mut self.cache), self.hooks)?;
        self.model.logits(&h.squeeze(1)?)
    }
}

impl BeamStepper for EncDecStepper<'_> {
    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        let idx: Vec<u32> = beam_indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, beam_indices.len(), self.enc.device())?;
        self.cache.self_attn.reorder(&idx)?;
        if self.same_source && beam_indices.len() == self.rows() {
            return Ok(());
        }
        self.enc = self.enc.index_select(&idx, 0)?;
        if let Some(m) = &self.enc_mask {
            self.enc_mask = Some(m.index_select(&idx, 0)?);
        }
        self.cache.reorder_cross(&idx)?;
        self.same_source = beam_indices.windows(2).all(|w| w[0] == w[1]) || self.same_source;
        Ok(())
    }
}

/// The methods of [`super::LanguageModel`] that T5 and BART implement alike (their
/// `EncoderDecoder` view and the shared teacher-forcing pass and stepper); each family's file
/// adds its dimensions and activation.
macro_rules! encdec_language_model {
    () => {
        fn device(&self) -> &Device {
            EncoderDecoder::device(self)
        }
        fn dtype(&self) -> DType {
            EncoderDecoder::dtype(self)
        }
        fn vocab_size(&self) -> usize {
            self.cfg.vocab_size
        }
        fn stacks(&self) -> Vec<(Site, usize)> {
            vec![(Site::Encoder, self.n_encoder_layers()), (Site::Decoder, self.n_decoder_layers())]
        }
        fn decoder_start(&self) -> Option<u32> {
            Some(self.special_tokens().decoder_start)
        }
        fn embed(&self, ids: &Tensor) -> Result<Tensor> {
            EncoderDecoder::embed(self, ids)
        }
        fn teacher_forcing(&self, tf: &TeacherForcing, hooks: &dyn LmHooks) -> Result<Hidden> {
            encdec::teacher_forcing(self, tf, hooks)
        }
        fn logits(&self, h: &Tensor) -> Result<Tensor> {
            EncoderDecoder::logits(self, h)
        }
        fn prefill<'a>(
            &'a self,
            hooks: &'a dyn LmHooks,
            prompts: &[Vec<u32>],
            prefix: Option<(&Tensor, &[f32])>,
        ) -> Result<(Box<dyn BeamStepper + 'a>, Tensor)> {
            encdec::prefill(self, hooks, prompts, prefix)
        }
        fn as_encdec(&self) -> Option<&dyn EncoderDecoder> {
            Some(self)
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    };
}
pub(crate) use encdec_language_model;
