//! Micro-benchmarks of memvp's kernels against candle's own ops, forward and backward:
//! softmax, RMSNorm, RoPE, the frozen MLP and linear layers, MemVP's memory branch, and the
//! decoding of llama.cpp blocks.
//! Run with `cargo bench --bench kernels`.

use candle_core::{D, DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use memvp::ops::{self, Activation, FrozenMlp, Linear, RopeTable};
use std::hint::black_box;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = memvp::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

/// Forward, and forward + backward of `sum(f(x) * r)` with `x` trainable.
fn fwd_bwd(c: &mut Criterion, name: &str, x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
    // Drawn once, in the output's shape, so that the timed loop does not draw random numbers.
    let r = randn(f(x).dims(), 99);
    c.bench_function(&format!("{name}/forward"), |b| b.iter(|| black_box(f(x))));
    let v = Var::from_tensor(x).unwrap();
    c.bench_function(&format!("{name}/forward+backward"), |b| {
        b.iter(|| black_box((f(v.as_tensor()) * &r).unwrap().sum_all().unwrap().backward().unwrap()))
    });
}

/// As the `memvp` binary does: rayon owns the cores, candle's own pool gets one thread (and candle
/// stops re-reading /proc/cpuinfo on every op).
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: called before any other thread of this process reads the environment.
    ONCE.call_once(|| unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") });
}

fn softmax(c: &mut Criterion) {
    setup();
    // Attention probabilities: [batch * heads * queries, keys].
    let x = randn(&[4 * 9 * 64, 320], 1);
    fwd_bwd(c, "softmax/memvp", &x, &|t| ops::softmax_last_dim(t).unwrap());
    c.bench_function("softmax/candle-fused/forward (no backward exists)", |b| {
        b.iter(|| black_box(candle_nn::ops::softmax_last_dim(&x).unwrap()))
    });
    fwd_bwd(c, "softmax/candle-composite", &x, &|t| candle_nn::ops::softmax(t, D::Minus1).unwrap());
}

fn rms_norm(c: &mut Criterion) {
    let x = randn(&[4 * 64, 576], 2);
    let w = randn(&[576], 3).affine(0.1, 1.0).unwrap();
    fwd_bwd(c, "rms_norm/memvp", &x, &|t| ops::rms_norm(t, &w, 1e-5).unwrap());
    c.bench_function("rms_norm/candle-fused/forward (no backward exists)", |b| {
        b.iter(|| black_box(candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap()))
    });
    fwd_bwd(c, "rms_norm/candle-composite", &x, &|t| candle_nn::ops::rms_norm_slow(t, &w, 1e-5).unwrap());
}

fn rope(c: &mut Criterion) {
    let inv: Vec<f64> = (0..32).map(|i| 1.0 / 10000f64.powf(i as f64 / 32.0)).collect();
    let table = RopeTable::new(&inv, 128, DType::F32, &Device::Cpu).unwrap();
    let (cos, sin) = table.range(0, 64).unwrap();
    // memvp: [b, t, h, d] as the projections produce it; candle: [b, h, t, d].
    let x = randn(&[4, 64, 9, 64], 4);
    fwd_bwd(c, "rope/memvp", &x, &|t| ops::rope(t, &cos, &sin).unwrap());
    let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
    c.bench_function("rope/candle-fused/forward (no backward exists)", |b| {
        b.iter(|| black_box(candle_nn::rotary_emb::rope(&xt, &cos, &sin).unwrap()))
    });
    fwd_bwd(c, "rope/candle-composite", &xt, &|t| candle_nn::rotary_emb::rope_slow(t, &cos, &sin).unwrap());
}

fn mlp(c: &mut Criterion) {
    let (d, i) = (576, 1536);
    let lin = |o: usize, n: usize, s: u64| Linear::new((randn(&[o, n], s) * 0.02).unwrap(), None);
    let m = FrozenMlp { w1: lin(i, d, 5), w2: Some(lin(i, d, 6)), down: lin(d, i, 7), act: Activation::Silu };
    let x = randn(&[4 * 64, d], 8);
    fwd_bwd(c, "swiglu_mlp/memvp-fused", &x, &|t| m.forward(t).unwrap());
    fwd_bwd(c, "swiglu_mlp/candle-matmul", &x, &|t| {
        let g = t.matmul(&m.w1.weight.tensor().unwrap().t().unwrap()).unwrap();
        let u = t.matmul(&m.w2.as_ref().unwrap().weight.tensor().unwrap().t().unwrap()).unwrap();
        (g.silu().unwrap() * u).unwrap().matmul(&m.down.weight.tensor().unwrap().t().unwrap()).unwrap()
    });
}

/// One frozen layer of the SmolLM2-135M shape over a training batch (4 × 64 tokens), forward and
/// input gradient: the products of a training step. `MEMVP_GEMM_SPLIT=0` compares gemm's own
/// threading with memvp's split of the columns.
fn frozen_linear(c: &mut Criterion) {
    setup();
    for (name, out, inp) in
        [("q_proj-576x576", 576, 576), ("gate_proj-1536x576", 1536, 576), ("down_proj-576x1536", 576, 1536)]
    {
        let lin = Linear::new((randn(&[out, inp], 14) * 0.02).unwrap(), None);
        let x = randn(&[4 * 64, inp], 15);
        fwd_bwd(c, &format!("frozen_linear/{name}"), &x, &|t| lin.forward(t).unwrap());
    }
}

/// Decoding steps: a few rows (the requests of a serving batch) against a frozen weight.
fn decode_linear(c: &mut Criterion) {
    let w = (randn(&[1536, 576], 12) * 0.02).unwrap();
    let lin = Linear::new(w.clone(), None);
    let wt = w.t().unwrap();
    for m in [1, 4, 8, 16, 32] {
        let x = randn(&[m, 576], 13);
        c.bench_function(&format!("decode_linear/memvp/rows={m}"), |b| b.iter(|| black_box(lin.forward(&x).unwrap())));
        c.bench_function(&format!("decode_linear/candle-matmul/rows={m}"), |b| {
            b.iter(|| black_box(x.matmul(&wt).unwrap()))
        });
    }
    // One token through a LLaMA-7B FFN matrix kept in llama.cpp blocks: memvp decodes the rows to
    // f32 and multiplies in f32; candle's QMatMul rounds the input to Q8 blocks and takes integer
    // dot products (llama.cpp's way, approximate in the input).
    use candle_core::Module;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    let w = (randn(&[11008, 4096], 17) * 0.02).unwrap();
    let x = randn(&[1, 4096], 18);
    for (name, g, f) in
        [("q4_0", GgmlDType::Q4_0, ops::WeightFormat::Q4_0), ("q4_k", GgmlDType::Q4K, ops::WeightFormat::Q4K)]
    {
        let lin = Linear::new(ops::Weight::convert(w.clone(), f).unwrap(), None);
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, g).unwrap()).unwrap();
        c.bench_function(&format!("decode_linear/{name}-11008x4096/memvp"), |b| {
            b.iter(|| black_box(lin.forward(&x).unwrap()))
        });
        c.bench_function(&format!("decode_linear/{name}-11008x4096/candle-qmatmul"), |b| {
            b.iter(|| black_box(q.forward(&x).unwrap()))
        });
    }
}

fn memory_branch(c: &mut Criterion) {
    // A decoding step of 16 requests, each with its own memory of 320 slots.
    let (b, m, d) = (16, 320, 576);
    let u = randn(&[b, 1, d], 14);
    let k = (randn(&[b, m, d], 15) * 0.02).unwrap();
    let v = (randn(&[b, m, d], 16) * 0.02).unwrap();
    c.bench_function("memory_branch/decode-16/memvp-fused", |bch| {
        bch.iter(|| black_box(ops::memory_branch(&u, &k, &v, Activation::Silu, 0.1, None).unwrap()))
    });
    c.bench_function("memory_branch/decode-16/candle-ops", |bch| {
        bch.iter(|| {
            black_box(
                (u.matmul(&k.transpose(1, 2).unwrap()).unwrap().silu().unwrap().matmul(&v).unwrap() * 0.1).unwrap(),
            )
        })
    });
    let (b, t, m, d) = (4, 64, 320, 576);
    let u = randn(&[b, t, d], 9);
    let k = (randn(&[b, m, d], 10) * 0.02).unwrap();
    let v = (randn(&[b, m, d], 11) * 0.02).unwrap();
    fwd_bwd(c, "memory_branch/memvp-fused", &u, &|x| {
        ops::memory_branch(x, &k, &v, Activation::Silu, 0.1, None).unwrap()
    });
    fwd_bwd(c, "memory_branch/candle-ops", &u, &|x| {
        (x.matmul(&k.transpose(1, 2).unwrap()).unwrap().silu().unwrap().matmul(&v).unwrap() * 0.1).unwrap()
    });
}

/// Decoding a tile of llama.cpp blocks to f32 into a buffer, as a frozen-linear product against
/// a weight kept in blocks does per tile of 2^20 values: candle's decoder against memvp's.
fn dequant(c: &mut Criterion) {
    use candle_core::quantized::k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
        GgmlType,
    };
    use candle_core::quantized::{GgmlDType, QTensor};
    type Decoder = fn(&[u8], &mut [f32]) -> candle_core::Result<()>;
    fn one<B: GgmlType>(c: &mut Criterion, name: &str, g: GgmlDType, ours: Decoder) {
        let t = randn(&[256, 4096], 13);
        let xs = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut blocks = vec![B::zeros(); xs.len() / B::BLCK_SIZE];
        B::from_float(&xs, &mut blocks);
        // The same blocks as bytes, as a QTensor holds them.
        let bytes = QTensor::quantize(&t, g).unwrap().data().unwrap().into_owned();
        let mut out = vec![0f32; xs.len()];
        c.bench_function(&format!("dequant/{name}/candle"), |b| {
            b.iter(|| B::to_float(black_box(&blocks), black_box(&mut out)))
        });
        c.bench_function(&format!("dequant/{name}/memvp"), |b| {
            b.iter(|| ours(black_box(&bytes), black_box(&mut out)).unwrap())
        });
    }
    one::<BlockQ4_0>(c, "q4_0", GgmlDType::Q4_0, ops::dequant::q4_0);
    one::<BlockQ4_1>(c, "q4_1", GgmlDType::Q4_1, ops::dequant::q4_1);
    one::<BlockQ5_0>(c, "q5_0", GgmlDType::Q5_0, ops::dequant::q5_0);
    one::<BlockQ5_1>(c, "q5_1", GgmlDType::Q5_1, ops::dequant::q5_1);
    one::<BlockQ8_0>(c, "q8_0", GgmlDType::Q8_0, ops::dequant::q8_0);
    one::<BlockQ2K>(c, "q2_k", GgmlDType::Q2K, ops::dequant::q2_k);
    one::<BlockQ3K>(c, "q3_k", GgmlDType::Q3K, ops::dequant::q3_k);
    one::<BlockQ4K>(c, "q4_k", GgmlDType::Q4K, ops::dequant::q4_k);
    one::<BlockQ5K>(c, "q5_k", GgmlDType::Q5K, ops::dequant::q5_k);
    one::<BlockQ6K>(c, "q6_k", GgmlDType::Q6K, ops::dequant::q6_k);
}

criterion_group! {
    name = kernels;
    config = Criterion::default().without_plots().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = softmax, rms_norm, rope, mlp, frozen_linear, decode_linear, memory_branch, dequant
}
criterion_main!(kernels);
