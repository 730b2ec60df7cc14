//! The matrix products of a memory-space training step, as `memvp bench` counts its FLOPs, and
//! the bound they set: a step that did nothing but its products, each at the best rate memvp's
//! gemm reaches at its shape, would run at `flop / Σ time` — no step can be more efficient
//! than that. `memvp bench --products` reports it beside the step's own efficiency, so that a
//! reader sees how much of the gap to the peak is the products' shapes and how much the rest.

use crate::adapters::adem::Adem;
use crate::adapters::memvp::Memvp;
use crate::ops::{gemm_strided, keep_warm, num_threads};
use crate::rng::Rng;
use crate::vlm::Vlm;
use serde::Serialize;
use std::time::Instant;

/// `count` products `[m, k] · [k, n]`.
#[derive(Clone, Debug, Serialize)]
pub struct Product {
    pub name: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The left operand is stored `[k, m]` (a weight gradient `Xᵀ dY`, or `Pᵀ dO`).
    pub lhs_t: bool,
    /// The right operand is stored `[n, k]` (a weight in `x Wᵀ`, or keys in `q Kᵀ`).
    pub rhs_t: bool,
    /// Causal attention: of the `m` query rows, row `i` reads `i + 1` keys, so the step counts
    /// `(m + 1) / 2m` of the full product.
    pub causal: bool,
    pub count: usize,
}

impl Product {
    pub fn flop(&self) -> f64 {
        let full = 2.0 * (self.m * self.n * self.k * self.count) as f64;
        if self.causal { full * (self.m as f64 + 1.0) / (2.0 * self.m as f64) } else { full }
    }
}

fn p(name: &'static str, m: usize, n: usize, k: usize, lhs_t: bool, rhs_t: bool, count: usize) -> Product {
    Product { name, m, n, k, lhs_t, rhs_t, causal: false, count }
}

fn causal(name: &'static str, m: usize, n: usize, k: usize, lhs_t: bool, rhs_t: bool, count: usize) -> Product {
    Product { name, m, n, k, lhs_t, rhs_t, causal: true, count }
}

/// The products of one training step of a memory-space method (MemVP, ADEM-VL) on a LLaMA-family
/// LM with `b` samples of `t` text tokens, `answer` of them supervised: the same terms as
/// `count_flops` in bench.rs (input gradients through frozen layers from the first trained
/// tensor on, both gradients of trained or activation products). `None` for other methods.
pub fn memory_space_products(vlm: &Vlm, b: usize, t: usize, answer: usize) -> Option<Vec<Product>> {
    let c = &vlm.lm().llama()?.cfg;
    let (d, i, h, kv, hd, l, v) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.num_hidden_layers,
        c.vocab_size,
    );
    let vc = &vlm.vision().model.cfg;
    let (cw, iv, pp, vh) = (vc.hidden_size, vc.intermediate_size, vc.patch_size, vc.num_attention_heads);
    let n = vc.num_patches();
    let nt = n + 1;
    let vl = vlm.vision().model.resolve_layer(-2).unwrap_or(vc.num_hidden_layers);
    // (slots, adapter width, projector width, projected tokens, pooled entries)
    let (mm, r, hp, projected, pooled) = if let Some(mv) = vlm.adapter.downcast::<Memvp>() {
        (mv.cfg.slots, mv.cfg.vision_adapter_dim, mv.cfg.hidden_proj, n, 0)
    } else {
        let a = vlm.adapter.downcast::<Adem>()?;
        let mm = a.key_embed.dims()[0];
        let pooled: usize = a.scales.iter().filter(|(_, p)| p.is_some()).map(|(s, _)| *s).sum();
        (mm, a.cfg.vision_adapter_dim, a.cfg.hidden_proj, mm + usize::from(a.projector_cls.is_some()), pooled)
    };
    let (rows, vrows, qkv) = (b * t, b * nt, (h + 2 * kv) * hd);
    let mut out = vec![
        // LM forward: the fused q/k/v and gate/up products, o and down, in every layer.
        p("lm q/k/v", rows, qkv, d, false, true, l),
        p("lm o", rows, d, h * hd, false, true, l),
        p("lm gate/up", rows, 2 * i, d, false, true, l),
        p("lm down", rows, d, i, false, true, l),
        causal("lm q kᵀ", t, t, hd, false, true, l * b * h),
        causal("lm p v", t, hd, t, false, false, l * b * h),
        // The memory branch per sample: S = u Kᵀ, y = act(S) V.
        p("memory u Kᵀ", t, mm, d, false, true, l * b),
        p("memory act(S) V", t, d, mm, false, false, l * b),
        p("lm head", b * answer, v, d, false, true, 1),
        p("lm head input grad", b * answer, d, v, false, false, 1),
        // LM backward: input gradients through layers 1.. (layer 0 reads the embedding).
        p("lm q/k/v input grad", rows, d, qkv, false, false, l - 1),
        p("lm o input grad", rows, h * hd, d, false, false, l - 1),
        p("lm gate/up input grad", rows, d, 2 * i, false, false, l - 1),
        p("lm down input grad", rows, i, d, false, false, l - 1),
        causal("lm dO Vᵀ", t, t, hd, false, true, (l - 1) * b * h),
        causal("lm Pᵀ dO", t, hd, t, true, false, (l - 1) * b * h),
        causal("lm dS K", t, hd, t, false, false, (l - 1) * b * h),
        causal("lm dSᵀ Q", t, hd, t, true, false, (l - 1) * b * h),
        // The memory branch's backward in every layer.
        p("memory dy Vᵀ", t, mm, d, false, true, l * b),
        p("memory act(S)ᵀ dy", mm, d, t, true, false, l * b),
        p("memory dS K", t, d, mm, false, false, l * b),
        p("memory dSᵀ u", mm, d, t, true, false, l * b),
        // Vision forward through the blocks the LM reads, with the parallel adapters.
        p("vit patch embedding", b * n, cw, 3 * pp * pp, false, true, 1),
        p("vit q/k/v", vrows, 3 * cw, cw, false, true, vl),
        p("vit o", vrows, cw, cw, false, true, vl),
        p("vit fc1", vrows, iv, cw, false, true, vl),
        p("vit fc2", vrows, cw, iv, false, true, vl),
        p("vit q kᵀ", nt, nt, cw / vh, false, true, vl * b * vh),
        p("vit p v", nt, cw / vh, nt, false, false, vl * b * vh),
        p("vit adapter down", vrows, r, cw, false, true, vl),
        p("vit adapter up", vrows, cw, r, false, true, vl),
        p("projector fc1", b * projected, hp, cw, false, true, 1),
        p("projector fc2", b * projected, d, hp, false, true, 1),
        // Vision backward: input gradients through blocks 1..; adapters and projector both ways.
        p("vit q/k/v input grad", vrows, cw, 3 * cw, false, false, vl - 1),
        p("vit o input grad", vrows, cw, cw, false, false, vl - 1),
        p("vit fc1 input grad", vrows, cw, iv, false, false, vl - 1),
        p("vit fc2 input grad", vrows, iv, cw, false, false, vl - 1),
        p("vit dO Vᵀ", nt, nt, cw / vh, false, true, (vl - 1) * b * vh),
        p("vit Pᵀ dO", nt, cw / vh, nt, true, false, (vl - 1) * b * vh),
        p("vit dS K", nt, cw / vh, nt, false, false, (vl - 1) * b * vh),
        p("vit dSᵀ Q", nt, cw / vh, nt, true, false, (vl - 1) * b * vh),
        p("vit adapter down input grad", vrows, cw, r, false, false, vl),
        p("vit adapter down weight grad", r, cw, vrows, true, false, vl),
        p("vit adapter up input grad", vrows, r, cw, false, false, vl),
        p("vit adapter up weight grad", cw, r, vrows, true, false, vl),
        p("projector fc1 input grad", b * projected, cw, hp, false, false, 1),
        p("projector fc1 weight grad", hp, cw, b * projected, true, false, 1),
        p("projector fc2 input grad", b * projected, hp, d, false, false, 1),
        p("projector fc2 weight grad", d, hp, b * projected, true, false, 1),
    ];
    if pooled > 0 {
        // ADEM-VL's average pooling `[s, G·G] · [G·G, c]` per sample, and its two gradients.
        out.push(p("adem pooling", pooled, cw, n, false, false, b));
        out.push(p("adem pooling grads", pooled, cw, n, false, false, 2 * b));
    }
    out.retain(|p| p.m > 0 && p.n > 0 && p.k > 0 && p.count > 0);
    Some(out)
}

/// Runs `p` once (`dst = lhs · rhs`) through the gemm path memvp's kernels use, on all
/// threads. `lhs`, `rhs` and `dst` hold `m·k`, `k·n` and `m·n` elements in `p`'s layouts.
pub fn run_product(p: &Product, lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    let (m, n, k) = (p.m, p.n, p.k);
    assert!(
        lhs.len() == m * k && rhs.len() == k * n && dst.len() == m * n,
        "product {}: buffers of {}, {} and {} elements do not fit [{m}, {k}] · [{k}, {n}]",
        p.name,
        lhs.len(),
        rhs.len(),
        dst.len()
    );
    let (lrs, lcs) = if p.lhs_t { (1, m as isize) } else { (k as isize, 1) };
    let (rrs, rcs) = if p.rhs_t { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: by the assert above the buffers hold exactly m·k, k·n and m·n elements, and the
    // strides address lhs[i, kk] at i·lrs + kk·lcs < m·k, rhs[kk, j] at kk·rrs + j·rcs < k·n
    // and dst[i, j] at i·n + j < m·n. dst is an exclusive borrow, so it overlaps neither
    // operand and nothing else touches it during the call.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            n as isize,
            1,
            false,
            lhs.as_ptr(),
            lrs,
            lcs,
            rhs.as_ptr(),
            rrs,
            rcs,
            num_threads(),
        )
    };
}

/// One product's best time.
#[derive(Debug, Serialize)]
pub struct Timed {
    #[serde(flatten)]
    pub product: Product,
    /// Best time of one product, ms.
    pub ms: f64,
    /// Its rate over the FLOPs counted for it (the causal half for causal products).
    pub gflops: f64,
}

/// Times every product of `ps` alone, best of `reps` (small ones as runs of several, so that
/// the timer's resolution does not count), with the other workers kept awake as in a step.
/// A causal product is timed whole and charged the share of it the step counts.
pub fn time_products(ps: &[Product], reps: usize) -> Vec<Timed> {
    let mut rng = Rng::new(5);
    keep_warm(|| {
        ps.iter()
            .map(|p| {
                let (m, n, k) = (p.m, p.n, p.k);
                let lhs: Vec<f32> = (0..m * k).map(|_| rng.uniform_f32() - 0.5).collect();
                let rhs: Vec<f32> = (0..k * n).map(|_| rng.uniform_f32() - 0.5).collect();
                let mut dst = vec![0f32; m * n];
                let full = 2.0 * (m * n * k) as f64;
                let inner = (2e7 / full).clamp(1.0, 50.0) as usize;
                run_product(p, &lhs, &rhs, &mut dst);
                let mut best = f64::INFINITY;
                for _ in 0..reps.max(1) {
                    let t0 = Instant::now();
                    for _ in 0..inner {
                        run_product(p, &lhs, &rhs, &mut dst);
                    }
                    best = best.min(t0.elapsed().as_secs_f64() * 1e3 / inner as f64);
                }
                let one = p.flop() / p.count as f64;
                let ms = best * one / full;
                Timed { product: p.clone(), ms, gflops: one / ms / 1e6 }
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(p: &Product, lhs: &[f32], rhs: &[f32]) -> Vec<f32> {
        let (m, n, k) = (p.m, p.n, p.k);
        let a = |i: usize, kk: usize| if p.lhs_t { lhs[kk * m + i] } else { lhs[i * k + kk] };
        let b = |kk: usize, j: usize| if p.rhs_t { rhs[j * k + kk] } else { rhs[kk * n + j] };
        (0..m * n).map(|o| (0..k).map(|kk| a(o / n, kk) as f64 * b(kk, o % n) as f64).sum::<f64>() as f32).collect()
    }

    #[test]
    fn every_layout_computes_its_product() {
        let mut rng = Rng::new(3);
        // Sizes on both sides of gemm_strided's few-row path and of gemm's blocking.
        for (m, n, k) in [(3, 5, 7), (37, 70, 19), (130, 64, 300)] {
            for lhs_t in [false, true] {
                for rhs_t in [false, true] {
                    let pr = p("t", m, n, k, lhs_t, rhs_t, 1);
                    let lhs: Vec<f32> = (0..m * k).map(|_| rng.uniform_f32() - 0.5).collect();
                    let rhs: Vec<f32> = (0..k * n).map(|_| rng.uniform_f32() - 0.5).collect();
                    let mut dst = vec![f32::NAN; m * n];
                    run_product(&pr, &lhs, &rhs, &mut dst);
                    let want = naive(&pr, &lhs, &rhs);
                    for (o, (g, w)) in dst.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{m}x{n}x{k} lhs_t={lhs_t} rhs_t={rhs_t} [{o}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// The list and bench's FLOP count are two spellings of one step: they must agree.
    #[test]
    fn the_products_are_the_benchs_flops() {
        use crate::app::bench::{BenchArgs, count_flops, random_lm, settings};
        use crate::vlm::{Base, Vlm};
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: BenchArgs,
        }
        let a = Cli::parse_from([
            "bench",
            "--lm-layers",
            "3",
            "--lm-hidden",
            "32",
            "--lm-intermediate",
            "48",
            "--lm-heads",
            "4",
            "--lm-kv-heads",
            "2",
            "--vocab",
            "40",
        ])
        .a;
        let dev = crate::util::device();
        let vision =
            crate::models::load_vision("random:tiny", candle_core::DType::F32, Default::default(), &dev).unwrap();
        let base = std::sync::Arc::new(Base { vision, lm: random_lm(&a).unwrap() });
        for method in ["memvp", "adem"] {
            let vlm = Vlm::new(base.clone(), &settings(method)).unwrap();
            for (b, t, answer) in [(4, 64, 8), (1, 7, 3)] {
                let listed: f64 = memory_space_products(&vlm, b, t, answer).unwrap().iter().map(|p| p.flop()).sum();
                let counted = count_flops(&vlm, b, t, answer).0;
                assert!((listed - counted).abs() <= 1e-9 * counted, "{method} b={b} t={t}: {listed} vs {counted}");
            }
        }
        let lora = Vlm::new(base, &settings("input-space")).unwrap();
        assert!(memory_space_products(&lora, 1, 8, 2).is_none());
    }

    #[test]
    fn causal_products_count_the_lower_triangle() {
        // Rows 0..3 read 1, 2, 3, 4 keys: 10 of the 16 query-key pairs.
        let c = causal("c", 4, 4, 8, false, true, 3);
        assert_eq!(c.flop(), 2.0 * 10.0 * 8.0 * 3.0);
        assert_eq!(p("p", 4, 5, 6, false, false, 2).flop(), 2.0 * 4.0 * 5.0 * 6.0 * 2.0);
    }
}
