//! SentencePiece's `tokenizer.model` (a `ModelProto` protocol buffer), read without the
//! sentencepiece library: the pieces with their scores and types, and the trainer and normalizer
//! settings a tokenizer needs. Field numbers from sentencepiece's `sentencepiece_model.proto`.

use anyhow::{Context, Result, bail};
use std::path::Path;

/// `SentencePiece.Type`.
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const BYTE: i32 = 6;

/// `TrainerSpec.ModelType`.
pub const UNIGRAM: i32 = 1;
pub const BPE: i32 = 2;

#[derive(Clone, Debug)]
pub struct SpmModel {
    /// (piece, score, type) by id.
    pub pieces: Vec<(String, f32, i32)>,
    pub model_type: i32,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    /// `NormalizerSpec.add_dummy_prefix`: a `▁` before the text.
    pub add_dummy_prefix: bool,
}

struct Proto<'a> {
    b: &'a [u8],
    at: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Fixed64,
}

impl<'a> Proto<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.b.get(self.at) else { bail!("truncated varint at byte {}", self.at) };
            self.at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("a varint longer than 10 bytes at byte {}", self.at)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.at + n > self.b.len() {
            bail!("a field of {n} bytes runs past the end ({} bytes) at byte {}", self.b.len(), self.at)
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>> {
        if self.at >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let f = match wire {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            w => bail!("unsupported wire type {w} (field {num}) at byte {}", self.at),
        };
        Ok(Some((num, f)))
    }
}

fn piece(b: &[u8]) -> Result<(String, f32, i32)> {
    let (mut text, mut score, mut ty) = (String::new(), 0f32, NORMAL);
    let mut p = Proto::new(b);
    while let Some((num, f)) = p.next()? {
        match (num, f) {
            (1, Field::Bytes(s)) => text = String::from_utf8(s.to_vec()).context("a piece is not UTF-8")?,
            (2, Field::Fixed32(x)) => score = f32::from_bits(x),
            (3, Field::Varint(x)) => ty = x as i32,
            _ => {}
        }
    }
    Ok((text, score, ty))
}

impl SpmModel {
    pub fn parse(b: &[u8]) -> Result<Self> {
        let mut m = SpmModel {
            pieces: Vec::new(),
            model_type: UNIGRAM,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            add_dummy_prefix: true,
        };
        let mut p = Proto::new(b);
        while let Some((num, f)) = p.next()? {
            match (num, f) {
                (1, Field::Bytes(s)) => m.pieces.push(piece(s)?),
                (2, Field::Bytes(s)) => {
                    let mut t = Proto::new(s);
                    while let Some((n, f)) = t.next()? {
                        match (n, f) {
                            (3, Field::Varint(x)) => m.model_type = x as i32,
                            (35, Field::Varint(x)) => m.byte_fallback = x != 0,
                            (40, Field::Varint(x)) => m.unk_id = x as i32,
                            (41, Field::Varint(x)) => m.bos_id = x as i32,
                            (42, Field::Varint(x)) => m.eos_id = x as i32,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(s)) => {
                    let mut t = Proto::new(s);
                    while let Some((n, f)) = t.next()? {
                        if let (3, Field::Varint(x)) = (n, f) {
                            m.add_dummy_prefix = x != 0;
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            bail!("no pieces (not a SentencePiece model?)")
        }
        Ok(m)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let b = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::parse(&b).with_context(|| format!("{}: not a SentencePiece model", path.display()))
    }

    /// The id of `bos_id` etc. when set (SentencePiece writes -1 for "none").
    pub fn id(x: i32) -> Option<u32> {
        (x >= 0).then_some(x as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field_bytes(num: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    #[test]
    fn a_hand_made_model_reads_back() {
        let mut p = Vec::new();
        field_bytes(1, "▁the".as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&(-3.5f32).to_bits().to_le_bytes());
        varint(3 << 3, &mut p);
        varint(CONTROL as u64, &mut p);
        let mut trainer = Vec::new();
        varint(3 << 3, &mut trainer);
        varint(BPE as u64, &mut trainer);
        varint(35 << 3, &mut trainer);
        varint(1, &mut trainer);
        varint(41 << 3, &mut trainer);
        varint(u64::MAX, &mut trainer); // -1 as int32 is written as a 10-byte varint
        let mut m = Vec::new();
        field_bytes(1, &p, &mut m);
        field_bytes(2, &trainer, &mut m);
        let s = SpmModel::parse(&m).unwrap();
        assert_eq!(s.pieces, vec![("▁the".to_string(), -3.5, CONTROL)]);
        assert_eq!((s.model_type, s.byte_fallback, SpmModel::id(s.bos_id), s.eos_id), (BPE, true, None, 2));
        assert!(s.add_dummy_prefix);
        assert!(SpmModel::parse(&m[..m.len() - 3]).is_err());
        assert!(SpmModel::parse(b"").is_err());
    }
}
