#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use memvp::rng::Rng;

pub fn randn(rng: &mut Rng, shape: &[usize], std: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() * std).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

pub fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// max |a-b| / max(|b|) style relative error over all elements.
pub fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    memvp::util::max_rel_err(a, b).expect("comparable tensors")
}

pub fn max_abs_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

/// Checks the gradient of `f(inputs)` (a scalar) with respect to every input marked trainable
/// against central finite differences, in f64.
pub fn check_grads(name: &str, inputs: &[Tensor], trainable: &[bool], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Tensor> = inputs
        .iter()
        .zip(trainable)
        .map(|(t, &tr)| if tr { candle_core::Var::from_tensor(t).unwrap().as_tensor().clone() } else { t.clone() })
        .collect();
    let loss = f(&vars);
    let grads = loss.backward().unwrap();
    let eps = 1e-6;
    for (i, (t, &tr)) in inputs.iter().zip(trainable).enumerate() {
        if !tr {
            continue;
        }
        let g = grads.get(&vars[i]).unwrap_or_else(|| panic!("{name}: no gradient for input {i}"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut worst = 0f64;
        for j in 0..base.len() {
            let eval = |delta: f64| -> f64 {
                let mut v = base.clone();
                v[j] += delta;
                let tj = Tensor::from_vec(v, t.dims(), t.device()).unwrap();
                let mut ins: Vec<Tensor> = inputs.to_vec();
                ins[i] = tj;
                f(&ins).to_scalar::<f64>().unwrap()
            };
            let num = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let err = (num - g[j]).abs() / (1.0f64).max(num.abs());
            worst = worst.max(err);
            assert!(err < 1e-6, "{name}: input {i} element {j}: analytic {} vs numeric {num} (rel err {err:e})", g[j]);
        }
        eprintln!("{name}: input {i}: {} elements, worst rel err {worst:e}", base.len());
    }
}
