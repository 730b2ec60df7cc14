//! ROUGE-L exactly as pycocoevalcap's `Rouge`: tokens from `str.split(" ")` (so an empty
//! caption is one empty token), longest common subsequence with each reference,
//! `P = max_r lcs/len(cand)`, `R = max_r lcs/len(ref)` (maxima taken separately), and
//! `F = (1 + beta^2) P R / (R + beta^2 P)` with `beta = 1.2` (0 if P or R is 0); the corpus score
//! is the numpy mean of the per-image scores.

use super::py::np_mean;

fn lcs(a: &[&str], b: &[&str]) -> usize {
    // same DP as my_lcs (the result does not depend on the orientation)
    let (string, sub) = if a.len() < b.len() { (b, a) } else { (a, b) };
    let mut lengths = vec![vec![0usize; sub.len() + 1]; string.len() + 1];
    for j in 1..=sub.len() {
        for i in 1..=string.len() {
            lengths[i][j] = if string[i - 1] == sub[j - 1] {
                lengths[i - 1][j - 1] + 1
            } else {
                lengths[i - 1][j].max(lengths[i][j - 1])
            };
        }
    }
    lengths[string.len()][sub.len()]
}

/// ROUGE-L of one candidate against its references.
pub fn rouge_l_one(candidate: &str, refs: &[&str]) -> f64 {
    let beta: f64 = 1.2;
    let token_c: Vec<&str> = candidate.split(' ').collect();
    let mut prec_max = f64::NEG_INFINITY;
    let mut rec_max = f64::NEG_INFINITY;
    for r in refs {
        let token_r: Vec<&str> = r.split(' ').collect();
        let l = lcs(&token_r, &token_c) as f64;
        prec_max = prec_max.max(l / token_c.len() as f64);
        rec_max = rec_max.max(l / token_r.len() as f64);
    }
    if prec_max != 0.0 && rec_max != 0.0 {
        let b2 = beta.powf(2.0);
        ((1.0 + b2) * prec_max * rec_max) / (rec_max + b2 * prec_max)
    } else {
        0.0
    }
}

/// Corpus ROUGE-L (numpy mean over images) and per-image scores.
pub fn rouge_l(pairs: &[(&str, Vec<&str>)]) -> (f64, Vec<f64>) {
    let scores: Vec<f64> = pairs.iter().map(|(c, r)| rouge_l_one(c, r)).collect();
    (np_mean(&scores), scores)
}
