//! BLEU-1..4 exactly as pycocoevalcap's `Bleu(4)` / `BleuScorer.compute_score(option="closest")`.
//!
//! * n-grams come from Python `str.split()` of the tokenised captions;
//! * clipped counts use, per n-gram, the maximum count over the image's references;
//! * the effective reference length of each image is the reference length closest to the
//!   candidate length, ties going to the *shorter* reference;
//! * corpus BLEU-n = (prod_{k<=n} (correct_k + 1e-15) / (guess_k + 1e-9))^(1/n), multiplied by
//!   the brevity penalty `exp(1 - 1/ratio)` when `ratio = (testlen + 1e-15) / (reflen + 1e-9) < 1`,
//!   where all counts are summed over the corpus first (not an average of sentence BLEUs).

use std::collections::HashMap;

use super::py::py_split;

/// Per-image cooked statistics (`cook_test` output).
struct Cooked {
    testlen: usize,
    reflens: Vec<usize>,
    guess: [usize; 4],
    correct: [usize; 4],
}

fn ngram_counts<'a>(words: &'a [&'a str], n: usize) -> HashMap<&'a [&'a str], usize> {
    let mut m: HashMap<&'a [&'a str], usize> = HashMap::new();
    for k in 1..=n {
        if words.len() >= k {
            for i in 0..=words.len() - k {
                *m.entry(&words[i..i + k]).or_insert(0) += 1;
            }
        }
    }
    m
}

fn cook(test: &str, refs: &[&str]) -> Cooked {
    let ref_words: Vec<Vec<&str>> = refs.iter().map(|r| py_split(r)).collect();
    let mut maxcounts: HashMap<&[&str], usize> = HashMap::new();
    for w in &ref_words {
        for (g, c) in ngram_counts(w, 4) {
            let e = maxcounts.entry(g).or_insert(0);
            *e = (*e).max(c);
        }
    }
    let tw = py_split(test);
    let counts = ngram_counts(&tw, 4);
    let mut correct = [0usize; 4];
    for (g, c) in counts {
        correct[g.len() - 1] += c.min(maxcounts.get(g).copied().unwrap_or(0));
    }
    let testlen = tw.len();
    let mut guess = [0usize; 4];
    for (k, g) in guess.iter_mut().enumerate() {
        *g = (testlen + 1).saturating_sub(k + 1);
    }
    Cooked { testlen, reflens: ref_words.iter().map(Vec::len).collect(), guess, correct }
}

/// Corpus BLEU-1..4 plus the per-image BLEU lists (as pycocoevalcap returns them).
#[allow(clippy::needless_range_loop)] // mirrors the reference loops
pub fn bleu(pairs: &[(&str, Vec<&str>)]) -> ([f64; 4], Vec<[f64; 4]>) {
    const SMALL: f64 = 1e-9;
    const TINY: f64 = 1e-15;
    let mut total_test = 0usize;
    let mut total_ref = 0usize;
    let mut guess = [0usize; 4];
    let mut correct = [0usize; 4];
    let mut per_image = Vec::with_capacity(pairs.len());
    for (test, refs) in pairs {
        let c = cook(test, refs);
        total_test += c.testlen;
        // closest reference length; ties -> smaller length (min over (|l - testlen|, l))
        let reflen = *c
            .reflens
            .iter()
            .min_by_key(|&&l| ((l as i64 - c.testlen as i64).unsigned_abs(), l))
            .expect("at least one reference");
        total_ref += reflen;
        for k in 0..4 {
            guess[k] += c.guess[k];
            correct[k] += c.correct[k];
        }
        let mut b = 1.0f64;
        let mut img = [0.0f64; 4];
        for k in 0..4 {
            b *= (c.correct[k] as f64 + TINY) / (c.guess[k] as f64 + SMALL);
            img[k] = b.powf(1.0 / (k as f64 + 1.0));
        }
        let ratio = (c.testlen as f64 + TINY) / (reflen as f64 + SMALL);
        if ratio < 1.0 {
            for v in img.iter_mut() {
                *v *= (1.0 - 1.0 / ratio).exp();
            }
        }
        per_image.push(img);
    }
    let mut bleus = [0.0f64; 4];
    let mut b = 1.0f64;
    for k in 0..4 {
        b *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        bleus[k] = b.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (total_test as f64 + TINY) / (total_ref as f64 + SMALL);
    if ratio < 1.0 {
        for v in bleus.iter_mut() {
            *v *= (1.0 - 1.0 / ratio).exp();
        }
    }
    (bleus, per_image)
}
