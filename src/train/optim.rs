//! AdamW as PyTorch computes it, with a no-decay group for biases and 1-D tensors, and a state
//! that can be saved and restored exactly.

use anyhow::{Result, bail};
use candle_core::{Tensor, Var};
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub params: Vec<Param>,
    /// Number of updates made so far.
    pub t: u64,
}

/// The rule of timm's `param_groups_weight_decay`: no decay on 1-D tensors and biases.
pub fn decays(name: &str, var: &Var) -> bool {
    !(var.rank() <= 1 || name.ends_with(".bias"))
}

impl AdamW {
    pub fn new(named: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = named
            .into_iter()
            .map(|(name, var)| {
                let z = var.zeros_like()?;
                Ok(Param { decay: decays(&name, &var), m: z.clone(), v: z, name, var })
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, params, t: 0 })
    }

    /// One update with gradients `grads[i]` for `params[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let mut w = p.var.as_tensor().clone();
            if p.decay && c.weight_decay != 0.0 {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&p.v / bc2)?.sqrt()? + c.eps)?;
            let upd = ((&p.m / bc1)? / denom)?;
            p.var.set(&(w - (upd * lr)?)?)?;
        }
        Ok(())
    }

    /// Tensors to save: `m.{name}`, `v.{name}`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for p in &self.params {
            v.push((format!("m.{}", p.name), p.m.clone()));
            v.push((format!("v.{}", p.name), p.v.clone()));
        }
        v
    }

    pub fn load_state(&mut self, t: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            for (k, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{k}.{}", p.name);
                let Some(x) = tensors.get(&key) else { bail!("optimizer state: `{key}` missing") };
                if x.dims() != slot.dims() {
                    bail!("optimizer state: `{key}` has shape {:?}, expected {:?}", x.dims(), slot.dims())
                }
                *slot = x.to_dtype(slot.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}
