//! Small trained layers and helpers that methods share: Xavier-uniform initialisation, a linear
//! map over trained weights, inverted dropout, and the two-layer projector of MemVP and the
//! input-space baseline.

use super::{Activation, activation};
use crate::rng::Rng;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};

/// `P = Linear(c, h) -> SiLU -> Linear(h, d)`, Xavier-uniform weights, zero biases. Also the
/// input-space baseline's projector.
pub struct Projector {
    pub fc1_weight: Var,
    pub fc1_bias: Var,
    pub fc2_weight: Var,
    pub fc2_bias: Var,
}

impl Projector {
    pub fn init(c: usize, h: usize, d: usize, rng: &mut Rng, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(Self {
            fc1_weight: var(xavier_uniform(rng, h, c, dtype, dev)?)?,
            fc1_bias: var(Tensor::zeros(h, dtype, dev)?)?,
            fc2_weight: var(xavier_uniform(rng, d, h, dtype, dev)?)?,
            fc2_bias: var(Tensor::zeros(d, dtype, dev)?)?,
        })
    }

    pub fn named(&self) -> Vec<(String, Var)> {
        self.named_as("projector")
    }

    /// The tensors under `{prefix}.fc1.weight` etc.
    pub fn named_as(&self, prefix: &str) -> Vec<(String, Var)> {
        vec![
            (format!("{prefix}.fc1.weight"), self.fc1_weight.clone()),
            (format!("{prefix}.fc1.bias"), self.fc1_bias.clone()),
            (format!("{prefix}.fc2.weight"), self.fc2_weight.clone()),
            (format!("{prefix}.fc2.bias"), self.fc2_bias.clone()),
        ]
    }

    /// `[b, n, c]` → `[b, n, d]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let h = linear_t(features, self.fc1_weight.as_tensor(), Some(self.fc1_bias.as_tensor()))?;
        linear_t(&activation(&h, Activation::Silu)?, self.fc2_weight.as_tensor(), Some(self.fc2_bias.as_tensor()))
    }
}

pub fn var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t)?)
}

/// Xavier-uniform `[out, in]`.
pub fn xavier_uniform(rng: &mut Rng, out: usize, inp: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let a = (6.0 / (inp + out) as f64).sqrt();
    let v: Vec<f32> = (0..out * inp).map(|_| ((rng.uniform() * 2.0 - 1.0) * a) as f32).collect();
    Ok(Tensor::from_vec(v, (out, inp), dev)?.to_dtype(dtype)?)
}

/// `x Wᵀ + b` for trained `[out, in]` weights on `[.., in]` inputs.
pub fn linear_t(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap();
    let rows = x.elem_count() / inp;
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = w.dims()[0];
    Ok(y.reshape(out)?)
}

/// An inverted-dropout mask (0 or 1/(1-p)) drawn from `rng`, of `like`'s dtype and device.
pub fn dropout_mask(shape: &[usize], p: f64, rng: &mut Rng, like: &Tensor) -> Result<Tensor> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let n: usize = shape.iter().product();
    let mask: Vec<f32> = (0..n).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
    Ok(Tensor::from_vec(mask, shape, like.device())?.to_dtype(like.dtype())?)
}

/// Multiplies by a fresh inverted-dropout mask drawn from `rng`.
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    Ok(x.mul(&dropout_mask(x.dims(), p, rng, x)?)?)
}
