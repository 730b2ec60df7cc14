//! Python / numpy semantics that the caption metrics depend on.

/// Python `str.isspace()` for one character: Unicode White_Space plus U+001C..U+001F.
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python `s.split()` (no argument): split on runs of whitespace, drop empty pieces.
pub fn py_split(s: &str) -> Vec<&str> {
    s.split(py_is_space).filter(|w| !w.is_empty()).collect()
}

fn pairwise(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = -0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise(&a[..n2]) + pairwise(&a[n2..])
    }
}

/// `np.mean` of a contiguous float64 array: numpy's pairwise `add.reduce` divided by `len`.
pub fn np_mean(a: &[f64]) -> f64 {
    (0.0 + pairwise(a)) / a.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_pairwise_mean_order() {
        // 1e16 + 1 + 1 ... : the summation order is observable
        let mut v = vec![1e16];
        v.extend(std::iter::repeat_n(1.0, 15));
        // numpy: 8 accumulators, then pairwise combination -> 1e16 + 8 + ... (exact value
        // checked against numpy 2.4: np.mean([1e16] + [1.0]*15) == 625000000000000.9)
        assert_eq!(np_mean(&v), 625000000000000.9);
        assert_eq!(py_split(" a\u{a0}b\tc "), vec!["a", "b", "c"]);
    }
}
