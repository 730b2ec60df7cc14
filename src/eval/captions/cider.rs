//! CIDEr-D exactly as pycocoevalcap's `Cider` (`CiderScorer`, n = 4, sigma = 6):
//!
//! * n-grams (1..4) from Python `str.split()`;
//! * document frequency of an n-gram = number of images (of the evaluated set) in whose
//!   references it appears; `ref_len = ln(number of images)`;
//! * tf-idf vector entries `tf * (ref_len - ln(max(1, df)))`, one vector per n;
//! * per n: `sum_g min(v_cand[g], v_ref[g]) * v_ref[g] / (|v_cand| |v_ref|)` (the "clipping" of
//!   CIDEr-D; no division when a norm is 0), times the Gaussian length penalty
//!   `e^(-(delta^2) / (2 sigma^2))` where **delta is the difference of the bigram counts**
//!   (pycocoevalcap counts `length` only for n-grams of index 1, i.e. bigrams);
//! * image score = mean over n of the sum over references, divided by the number of
//!   references, times 10; corpus score = numpy mean over images.
//!
//! Floating-point operations are done in the same order as the Python/numpy code. The only
//! possible bit-level difference is `ln`: numpy's vectorised `np.log` and the C library's `log`
//! (which Rust uses) disagree in the last bit for a handful of arguments.

use std::collections::HashMap;

use super::py::{np_mean, py_split};

struct Counts<'a> {
    order: Vec<&'a [&'a str]>,
    counts: HashMap<&'a [&'a str], usize>,
}

fn counts<'a>(words: &'a [&'a str]) -> Counts<'a> {
    let mut order = Vec::new();
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for k in 1..=4usize {
        if words.len() >= k {
            for i in 0..=words.len() - k {
                let g = &words[i..i + k];
                let e = counts.entry(g).or_insert(0);
                if *e == 0 {
                    order.push(g);
                }
                *e += 1;
            }
        }
    }
    Counts { order, counts }
}

struct Vecs<'a> {
    /// per n: (ngram, weight) in insertion order
    vec: [Vec<(&'a [&'a str], f64)>; 4],
    map: [HashMap<&'a [&'a str], f64>; 4],
    norm: [f64; 4],
    length: usize,
}

fn counts2vec<'a>(c: &Counts<'a>, df: &HashMap<&[&str], f64>, ref_len: f64) -> Vecs<'a> {
    let mut vec: [Vec<(&[&str], f64)>; 4] = Default::default();
    let mut map: [HashMap<&[&str], f64>; 4] = Default::default();
    let mut norm = [0.0f64; 4];
    let mut length = 0usize;
    for g in &c.order {
        let tf = c.counts[g];
        let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
        let n = g.len() - 1;
        let v = tf as f64 * (ref_len - d);
        vec[n].push((g, v));
        map[n].insert(g, v);
        norm[n] += v * v;
        if n == 1 {
            length += tf;
        }
    }
    for x in norm.iter_mut() {
        *x = x.sqrt();
    }
    Vecs { vec, map, norm, length }
}

#[allow(clippy::needless_range_loop)] // mirrors the reference loops
fn sim(h: &Vecs, r: &Vecs, sigma: f64) -> [f64; 4] {
    let delta = h.length as f64 - r.length as f64;
    let mut val = [0.0f64; 4];
    for n in 0..4 {
        for (g, vh) in &h.vec[n] {
            let vr = r.map[n].get(g).copied().unwrap_or(0.0);
            val[n] += vh.min(vr) * vr;
        }
        if h.norm[n] != 0.0 && r.norm[n] != 0.0 {
            val[n] /= h.norm[n] * r.norm[n];
        }
        assert!(!val[n].is_nan());
        val[n] *= std::f64::consts::E.powf(-(delta.powf(2.0)) / (2.0 * sigma.powf(2.0)));
    }
    val
}

/// Corpus CIDEr-D and per-image scores.
pub fn cider(pairs: &[(&str, Vec<&str>)]) -> (f64, Vec<f64>) {
    let sigma = 6.0f64;
    let test_words: Vec<Vec<&str>> = pairs.iter().map(|(t, _)| py_split(t)).collect();
    let ref_words: Vec<Vec<Vec<&str>>> = pairs.iter().map(|(_, rs)| rs.iter().map(|r| py_split(r)).collect()).collect();
    let test_counts: Vec<Counts> = test_words.iter().map(|w| counts(w)).collect();
    let ref_counts: Vec<Vec<Counts>> = ref_words.iter().map(|rs| rs.iter().map(|w| counts(w)).collect()).collect();
    // document frequency over the references of the evaluated images
    let mut df: HashMap<&[&str], f64> = HashMap::new();
    for refs in &ref_counts {
        let mut seen: std::collections::HashSet<&[&str]> = std::collections::HashSet::new();
        for r in refs {
            for g in &r.order {
                seen.insert(g);
            }
        }
        for g in seen {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (pairs.len() as f64).ln();
    let mut scores = Vec::with_capacity(pairs.len());
    for (tc, rcs) in test_counts.iter().zip(&ref_counts) {
        let hv = counts2vec(tc, &df, ref_len);
        let mut score = [0.0f64; 4];
        for rc in rcs {
            let rv = counts2vec(rc, &df, ref_len);
            let v = sim(&hv, &rv, sigma);
            for n in 0..4 {
                score[n] += v[n];
            }
        }
        let mut avg = np_mean(&score);
        avg /= rcs.len() as f64;
        avg *= 10.0;
        scores.push(avg);
    }
    (np_mean(&scores), scores)
}
