//! Tokenized samples, padded batches, an image cache, and a prefetcher that decodes and
//! preprocesses the next batches' images in parallel while the current step runs.

use super::Sample;
use crate::checkpoint::Tok;
use crate::data::image::Preprocess;
use crate::models::encdec::shift_tokens_right;
use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};

/// How a model consumes a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextLayout {
    /// `prompt ++ answer ++ eos` in one sequence; loss on the answer.
    DecoderOnly,
    /// Prompt to the encoder; `start ++ answer` to the decoder, predicting `answer ++ eos`.
    EncoderDecoder { decoder_start: u32 },
}

#[derive(Clone, Debug)]
pub struct Encoded {
    /// Prompt ids (with the tokenizer's special tokens).
    pub prompt: Vec<u32>,
    /// Answer ids followed by EOS.
    pub target: Vec<u32>,
    pub image: Option<PathBuf>,
}

/// Tokens an adapter puts right after the tokenizer's leading special token (BOS) of every
/// prompt, by whether the row has an image (ADEM-VL: the tokens of `"Image: "` and one slot
/// whose embedding the adapter replaces by its CLS token; `"Image: N/A"` without an image).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptInsert {
    /// Leading special tokens the tokenizer puts before the text (1 for a BOS, else 0).
    pub lead: usize,
    /// Ends with the slot when `slot` is set.
    pub with_image: Vec<u32>,
    pub without_image: Vec<u32>,
    pub slot: bool,
}

impl PromptInsert {
    /// Each piece tokenised on its own (no special tokens); the slot's id is a placeholder
    /// whose embedding is always replaced.
    pub fn new(tok: &Tok, with_image: &str, without_image: &str, slot: bool) -> Result<Self> {
        let probe = "a";
        let (with_sp, plain) = (tok.encode(probe, true)?, tok.encode(probe, false)?);
        let lead = (0..=with_sp.len().saturating_sub(plain.len()))
            .find(|&k| with_sp.get(k..k + plain.len()) == Some(&plain[..]))
            .unwrap_or(0);
        let mut w = tok.encode(with_image, false)?;
        if slot {
            w.push(0);
        }
        Ok(Self { lead, with_image: w, without_image: tok.encode(without_image, false)?, slot })
    }

    pub fn len(&self, has_image: bool) -> usize {
        if has_image { self.with_image.len() } else { self.without_image.len() }
    }

    pub fn is_empty(&self) -> bool {
        self.with_image.is_empty() && self.without_image.is_empty()
    }

    /// The slot's column in an inserted prompt (rows with an image).
    pub fn slot_column(&self) -> Option<usize> {
        self.slot.then(|| self.lead + self.with_image.len() - 1)
    }

    /// Inserts into prompt ids that start with the tokenizer's leading special tokens.
    pub fn apply(&self, ids: &mut Vec<u32>, has_image: bool) {
        let at = self.lead.min(ids.len());
        let ins = if has_image { &self.with_image } else { &self.without_image };
        ids.splice(at..at, ins.iter().copied());
    }
}

/// Tokenizes prompt and answer separately and joins them, so that the prompt's ids are always
/// a prefix of the training sequence (and of the evaluation input). `insert`: the adapter's
/// tokens after BOS and whether this row has an image.
pub fn encode(
    tok: &Tok,
    s: &Sample,
    eos: u32,
    max_len: usize,
    insert: Option<(&PromptInsert, bool)>,
) -> Result<Encoded> {
    let mut prompt = tok.encode(&s.prompt, true)?;
    // Tokenizers whose post-processor appends EOS to every input (T5) would put it mid-sequence
    // of a decoder-only model; an encoder keeps it.
    let mut target = tok.encode(&s.answer, false)?;
    target.push(eos);
    let extra = insert.map_or(0, |(i, img)| i.len(img));
    if prompt.len() + extra + target.len() > max_len {
        // Keep the answer and the start of the prompt's first token (BOS); drop the oldest text.
        keep_first_and_tail(&mut prompt, max_len.saturating_sub(target.len() + extra).max(1));
    }
    if let Some((i, img)) = insert {
        i.apply(&mut prompt, img);
    }
    Ok(Encoded { prompt, target, image: s.image.clone() })
}

/// Shortens `ids` to `keep` (at least 1) tokens when longer: the first (BOS) and the newest
/// `keep - 1`.
pub fn keep_first_and_tail(ids: &mut Vec<u32>, keep: usize) {
    if keep < ids.len() {
        let tail = ids.split_off(ids.len() - (keep - 1));
        ids.truncate(1);
        ids.extend(tail);
    }
}

/// Per-sample pixels stacked as `[b, 3, size, size]` (zeros where a sample has no image, `None`
/// when none has one) and the image indicator.
pub fn stack_pixels(px: &[Option<Arc<Vec<f32>>>], size: usize, dev: &Device) -> Result<(Option<Tensor>, Vec<f32>)> {
    let indicator: Vec<f32> = px.iter().map(|p| if p.is_some() { 1.0 } else { 0.0 }).collect();
    if !px.iter().any(Option::is_some) {
        return Ok((None, indicator));
    }
    let mut buf = Vec::with_capacity(px.len() * 3 * size * size);
    for p in px {
        match p {
            Some(v) => buf.extend_from_slice(v),
            None => buf.extend(std::iter::repeat_n(0f32, 3 * size * size)),
        }
    }
    Ok((Some(Tensor::from_vec(buf, (px.len(), 3, size, size), dev)?), indicator))
}

/// The ids given to generation at evaluation: prompt ++ tokens of `eval_prefix`.
pub fn eval_input(tok: &Tok, s: &Sample) -> Result<Vec<u32>> {
    let mut ids = tok.encode(&s.prompt, true)?;
    if !s.eval_prefix.is_empty() {
        ids.extend(tok.encode(&s.eval_prefix, false)?);
    }
    Ok(ids)
}

/// Decoded, resized, normalised pixels by file, bounded in size.
pub struct ImageCache {
    pub pre: Preprocess,
    map: Mutex<HashMap<PathBuf, Arc<Vec<f32>>>>,
    budget_floats: usize,
    used: Mutex<usize>,
}

impl ImageCache {
    pub fn new(pre: Preprocess, budget_bytes: usize) -> Self {
        Self { pre, map: Mutex::new(HashMap::new()), budget_floats: budget_bytes / 4, used: Mutex::new(0) }
    }

    pub fn get(&self, p: &PathBuf) -> Result<Arc<Vec<f32>>> {
        if let Some(v) = self.map.lock().unwrap().get(p) {
            return Ok(v.clone());
        }
        let v = Arc::new(self.pre.load(p)?);
        let mut used = self.used.lock().unwrap();
        if *used + v.len() <= self.budget_floats {
            *used += v.len();
            self.map.lock().unwrap().insert(p.clone(), v.clone());
        }
        Ok(v)
    }
}

/// A padded batch.
#[derive(Clone)]
pub struct Batch {
    /// `[b, T]`: decoder-only sequences, or encoder inputs.
    pub input_ids: Tensor,
    /// Real lengths of the rows of `input_ids` (right padding).
    pub input_lens: Vec<usize>,
    /// `[b, Td]` decoder inputs (encoder-decoder only).
    pub decoder_ids: Option<Tensor>,
    /// Flat indices into the `[b, T]` (or `[b, Td]`) grid whose hidden state predicts a target.
    pub loss_positions: Vec<u32>,
    pub loss_targets: Vec<u32>,
    pub pixels: Option<Tensor>,
    /// 1 for samples with an image, 0 for text-only ones.
    pub indicator: Vec<f32>,
    /// Samples dropped because their image could not be decoded (with --skip-bad-images).
    pub skipped: usize,
    pub n: usize,
}

pub struct BatchBuilder {
    pub samples: Vec<Encoded>,
    pub cache: ImageCache,
    pub layout: TextLayout,
    pub device: Device,
    pub skip_bad_images: bool,
    /// Use no images at all (the image-blind control, text-only methods).
    pub blind: bool,
}

impl BatchBuilder {
    pub fn build(&self, idx: &[usize]) -> Result<Batch> {
        let s = self.cache.pre.size;
        // Decode images in parallel (none at all for an image-blind builder).
        let px: Vec<Option<Result<Arc<Vec<f32>>>>> = if self.blind {
            idx.iter().map(|_| None).collect()
        } else {
            idx.par_iter().map(|&i| self.samples[i].image.as_ref().map(|p| self.cache.get(p))).collect()
        };
        let mut rows = Vec::new();
        let mut pixels: Vec<Option<Arc<Vec<f32>>>> = Vec::new();
        let mut skipped = 0;
        for (&i, p) in idx.iter().zip(px) {
            match p {
                Some(Err(e)) if self.skip_bad_images => {
                    skipped += 1;
                    eprintln!("skipping a sample: {e:#}");
                    continue;
                }
                Some(Err(e)) => return Err(e.context("use --skip-bad-images to skip such samples")),
                Some(Ok(v)) => pixels.push(Some(v)),
                None => pixels.push(None),
            }
            rows.push(&self.samples[i]);
        }
        if rows.is_empty() {
            bail!("every sample of this batch was skipped")
        }
        let b = rows.len();
        let (pixels, indicator) = stack_pixels(&pixels, s, &self.device)?;
        let (mut pos, mut tgt) = (Vec::new(), Vec::new());
        let (input_ids, input_lens, decoder_ids) = match self.layout {
            TextLayout::DecoderOnly => {
                let t = rows.iter().map(|r| r.prompt.len() + r.target.len()).max().unwrap();
                let mut ids = vec![0u32; b * t];
                let mut lens = Vec::with_capacity(b);
                for (ri, r) in rows.iter().enumerate() {
                    let row = &mut ids[ri * t..];
                    row[..r.prompt.len()].copy_from_slice(&r.prompt);
                    row[r.prompt.len()..r.prompt.len() + r.target.len()].copy_from_slice(&r.target);
                    for (j, &y) in r.target.iter().enumerate() {
                        pos.push((ri * t + r.prompt.len() - 1 + j) as u32);
                        tgt.push(y);
                    }
                    lens.push(r.prompt.len() + r.target.len());
                }
                (Tensor::from_vec(ids, (b, t), &self.device)?, lens, None)
            }
            TextLayout::EncoderDecoder { decoder_start } => {
                let te = rows.iter().map(|r| r.prompt.len()).max().unwrap();
                let td = rows.iter().map(|r| r.target.len()).max().unwrap();
                let (mut enc, mut dec) = (vec![0u32; b * te], vec![0u32; b * td]);
                let mut lens = Vec::with_capacity(b);
                for (ri, r) in rows.iter().enumerate() {
                    enc[ri * te..ri * te + r.prompt.len()].copy_from_slice(&r.prompt);
                    lens.push(r.prompt.len());
                    let shifted = shift_tokens_right(&r.target, decoder_start);
                    dec[ri * td..ri * td + shifted.len()].copy_from_slice(&shifted);
                    for (j, &y) in r.target.iter().enumerate() {
                        pos.push((ri * td + j) as u32);
                        tgt.push(y);
                    }
                }
                (
                    Tensor::from_vec(enc, (b, te), &self.device)?,
                    lens,
                    Some(Tensor::from_vec(dec, (b, td), &self.device)?),
                )
            }
        };
        Ok(Batch {
            input_ids,
            input_lens,
            decoder_ids,
            loss_positions: pos,
            loss_targets: tgt,
            pixels,
            indicator,
            skipped,
            n: b,
        })
    }
}

/// Builds batches on a background thread, two ahead of the consumer.
pub struct Prefetcher {
    rx: Receiver<Result<Batch>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Prefetcher {
    pub fn new(builder: Arc<BatchBuilder>, plan: Vec<Vec<usize>>) -> Self {
        let (tx, rx) = sync_channel(2);
        let handle = std::thread::spawn(move || {
            for idx in plan {
                let b = builder.build(&idx);
                let stop = b.is_err();
                if tx.send(b).is_err() || stop {
                    break;
                }
            }
        });
        Self { rx, handle: Some(handle) }
    }

    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        // The consumer may be a worker of the pool that the producer's parallel image decoding
        // needs; while waiting, it runs pool jobs instead of blocking (with one thread, a plain
        // `recv` would deadlock).
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => match self.rx.try_recv() {
                    Ok(b) => return Some(b),
                    Err(std::sync::mpsc::TryRecvError::Empty) => continue,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
                },
                _ => match self.rx.recv_timeout(std::time::Duration::from_micros(500)) {
                    Ok(b) => return Some(b),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return None,
                },
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Unblock the producer, then wait for it.
        let (_tx, rx) = sync_channel(0);
        self.rx = rx;
        if let Some(h) = self.handle.take() {
            // As in `next_batch`: the producer may be waiting for pool jobs only this thread
            // can run, so help the pool until it is done instead of blocking in `join`.
            while !h.is_finished() {
                if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
            let _ = h.join();
        }
    }
}
