//! Image preprocessing that reproduces PIL + torchvision exactly: decode, `convert("RGB")`,
//! `Resize((s, s), BICUBIC)` without crop (Pillow's two-pass, antialiased, 8-bit fixed-point
//! resampler, re-implemented here operation for operation), `ToTensor`, `Normalize`.

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which mean/std to normalise with. The released MemVP code uses ImageNet's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    Imagenet,
    Clip,
}

impl Norm {
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Norm::Imagenet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            Norm::Clip => ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.261_302_6, 0.275_777_1]),
        }
    }
}

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
#[derive(Clone, Debug)]
pub struct Rgb {
    pub w: usize,
    pub h: usize,
    pub data: Vec<u8>,
}

/// Decodes a PNG or JPEG and converts it to RGB as PIL's `convert("RGB")` does (alpha dropped,
/// grey replicated, palettes expanded).
pub fn load_rgb(path: &Path) -> Result<Rgb> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read image", path.display()))?;
    decode_rgb(&bytes).with_context(|| format!("{}: cannot decode image", path.display()))
}

pub fn decode_rgb(bytes: &[u8]) -> Result<Rgb> {
    let img = image::load_from_memory(bytes)?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        bail!("empty image")
    }
    Ok(Rgb { w: w as usize, h: h as usize, data: rgb.into_raw() })
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index, the number of taps, and fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut k = vec![0f64; xmax];
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate() {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate() {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let f = v * (1u64 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    (ksize, bounds, kk)
}

#[inline]
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((w, h), Image.BICUBIC)` on an RGB image, bit for bit.
pub fn resize_bicubic(img: &Rgb, out_w: usize, out_h: usize) -> Rgb {
    let (kh, bh, wh) = coeffs(img.w, out_w);
    let (kv, mut bv, wv) = coeffs(img.h, out_h);
    let need_h = out_w != img.w;
    let need_v = out_h != img.h;
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass over the rows the vertical pass will read.
    let (tmp, tmp_w, tmp_h) = if need_h {
        let first = bv[0].0;
        let last = bv[out_h - 1].0 + bv[out_h - 1].1;
        for b in bv.iter_mut() {
            b.0 -= first;
        }
        let rows = last - first;
        let mut out = vec![0u8; rows * out_w * 3];
        out.par_chunks_mut(out_w * 3).enumerate().for_each(|(y, row)| {
            let src = &img.data[(y + first) * img.w * 3..];
            for (xx, &(xmin, n)) in bh.iter().enumerate() {
                let k = &wh[xx * kh..xx * kh + n];
                for c in 0..3 {
                    let mut ss = half;
                    for (x, &kx) in k.iter().enumerate() {
                        ss += src[(x + xmin) * 3 + c] as i64 * kx as i64;
                    }
                    row[xx * 3 + c] = clip8(ss);
                }
            }
        });
        (out, out_w, rows)
    } else {
        (img.data.clone(), img.w, img.h)
    };
    if !need_v {
        return Rgb { w: tmp_w, h: tmp_h, data: tmp };
    }
    let mut out = vec![0u8; out_h * tmp_w * 3];
    out.par_chunks_mut(tmp_w * 3).enumerate().for_each(|(yy, row)| {
        let (ymin, n) = bv[yy];
        let k = &wv[yy * kv..yy * kv + n];
        for (i, o) in row.iter_mut().enumerate() {
            let mut ss = half;
            for (y, &ky) in k.iter().enumerate() {
                ss += tmp[(y + ymin) * tmp_w * 3 + i] as i64 * ky as i64;
            }
            *o = clip8(ss);
        }
    });
    Rgb { w: tmp_w, h: out_h, data: out }
}

/// How pixels are prepared for a vision tower.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub size: usize,
    pub norm: Norm,
}

impl Preprocess {
    /// `[3, size, size]` f32, channel-major, normalised.
    pub fn pixels(&self, img: &Rgb) -> Vec<f32> {
        let r = if img.w == self.size && img.h == self.size {
            img.clone()
        } else {
            resize_bicubic(img, self.size, self.size)
        };
        let (mean, std) = self.norm.mean_std();
        let n = self.size * self.size;
        let mut out = vec![0f32; 3 * n];
        for i in 0..n {
            for c in 0..3 {
                let v = r.data[i * 3 + c] as f32 / 255.0;
                out[c * n + i] = (v - mean[c]) / std[c];
            }
        }
        out
    }

    pub fn load(&self, path: &Path) -> Result<Vec<f32>> {
        Ok(self.pixels(&load_rgb(path)?))
    }

    /// Decodes and preprocesses files in parallel into `[n, 3, size, size]`.
    pub fn batch(&self, paths: &[&Path], dev: &Device) -> Result<Tensor> {
        let px: Vec<Vec<f32>> = paths.par_iter().map(|p| self.load(p)).collect::<Result<_>>()?;
        let s = self.size;
        Ok(Tensor::from_vec(px.concat(), (paths.len(), 3, s, s), dev)?)
    }
}
