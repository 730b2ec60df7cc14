//! Data parallelism: the micro-batches of one optimizer step are spread over the job's ranks,
//! and their gradients are summed in the order one process would sum them.
//!
//! One process sums `acc = g0; acc = acc + g1; ...` in micro-batch order. Here every rank sends
//! each of its micro-batch gradients (not a partial sum) to rank 0, which folds all of them in
//! the same global order with the same f32 additions and broadcasts the sum; every rank then
//! takes the same optimizer step. So N ranks give the adapter of one process bit for bit, at
//! the cost of gathering `accum` gradient vectors per step instead of reducing them in a tree.

use crate::dist::{Comm, Reader, Writer};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// Which micro-batches a rank computes. A step covers `accum` micro-batches (the count over
/// all ranks, aligned to multiples of `accum` from the epoch's start); rank r takes the r-th
/// run of `accum / ranks` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
    pub accum: usize,
}

impl Shard {
    /// One process computing everything.
    pub const ALL: Shard = Shard { rank: 0, ranks: 1, accum: 1 };

    pub fn owns(&self, i: usize) -> bool {
        if self.ranks <= 1 {
            return true;
        }
        let per = (self.accum / self.ranks).max(1);
        (i % self.accum) / per == self.rank
    }
}

/// One micro-batch's contribution to a step.
pub(crate) struct Part {
    /// Micro-batch index within the epoch.
    pub index: usize,
    pub loss: f64,
    pub samples: usize,
    pub skipped: usize,
    /// Per trained tensor (in [`super::Task::params`] order); `None` when it got no gradient.
    pub grads: Vec<Option<Tensor>>,
}

/// A step's micro-batches, combined over all ranks.
pub(crate) struct Combined {
    pub grads: Vec<Option<Tensor>>,
    pub loss_sum: f64,
    pub count: usize,
    pub samples: usize,
    pub skipped: usize,
    /// Some rank's data stream ended early.
    pub ended: bool,
    /// A stop signal some rank received.
    pub stop: Option<i32>,
}

fn fold_tensors(parts: Vec<Part>, n_vars: usize) -> Result<Combined> {
    let mut c = Combined {
        grads: vec![None; n_vars],
        loss_sum: 0.0,
        count: 0,
        samples: 0,
        skipped: 0,
        ended: false,
        stop: None,
    };
    for p in parts {
        for (a, g) in c.grads.iter_mut().zip(p.grads) {
            if let Some(g) = g {
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        c.loss_sum += p.loss;
        c.count += 1;
        c.samples += p.samples;
        c.skipped += p.skipped;
    }
    Ok(c)
}

fn encode_grads(w: &mut Writer, grads: &[Option<Tensor>]) -> Result<()> {
    for g in grads {
        match g {
            Some(g) => {
                if g.dtype() != DType::F32 {
                    bail!("data-parallel training sums f32 gradients; a trained tensor is {:?}", g.dtype())
                }
                w.u64(1).f32s(&g.flatten_all()?.to_vec1::<f32>()?);
            }
            None => {
                w.u64(0);
            }
        }
    }
    Ok(())
}

fn decode_grads(r: &mut Reader, vars: &[Var]) -> Result<Vec<Option<Vec<f32>>>> {
    vars.iter().map(|v| Ok(if r.u64()? == 1 { Some(r.f32s(v.elem_count())?) } else { None })).collect()
}

/// Sums the step's micro-batches of every rank in global micro-batch order (see the module
/// doc); every rank gets the same result.
pub(crate) fn combine(
    comm: &dyn Comm,
    vars: &[Var],
    parts: Vec<Part>,
    ended: bool,
    stop: Option<i32>,
) -> Result<Combined> {
    if comm.size() == 1 {
        let mut c = fold_tensors(parts, vars.len())?;
        c.ended = ended;
        c.stop = stop;
        return Ok(c);
    }
    let mut w = Writer::default();
    w.u64(ended as u64).u64(stop.map_or(0, |s| s as u64)).u64(parts.len() as u64);
    for p in &parts {
        w.u64(p.index as u64).f64(p.loss).u64(p.samples as u64).u64(p.skipped as u64);
        encode_grads(&mut w, &p.grads)?;
    }
    drop(parts);
    let gathered = comm.gather(&w.0)?;
    let mut out = Writer::default();
    if let Some(all) = gathered {
        // Rank 0: decode every micro-batch, fold in index order.
        let (mut any_ended, mut signal) = (false, 0u64);
        // (micro-batch, loss, samples, skipped, gradients)
        type Item = (usize, f64, u64, u64, Vec<Option<Vec<f32>>>);
        let mut items: Vec<Item> = Vec::new();
        for (rank, msg) in all.iter().enumerate() {
            let mut r = Reader::new(msg);
            any_ended |= r.u64()? == 1;
            let s = r.u64()?;
            if signal == 0 {
                signal = s;
            }
            let n = r.u64()?;
            for _ in 0..n {
                let index = r.u64()? as usize;
                let (loss, samples, skipped) = (r.f64()?, r.u64()?, r.u64()?);
                let g = decode_grads(&mut r, vars).with_context(|| format!("the gradients of rank {rank}"))?;
                items.push((index, loss, samples, skipped, g));
            }
        }
        items.sort_by_key(|x| x.0);
        let mut acc: Vec<Option<Vec<f32>>> = vec![None; vars.len()];
        let (mut loss_sum, mut samples, mut skipped) = (0f64, 0u64, 0u64);
        let count = items.len();
        for (_, loss, s, k, grads) in items {
            for (a, g) in acc.iter_mut().zip(grads) {
                let Some(g) = g else { continue };
                match a {
                    // The same f32 additions, in the same order, as `prev + g` on tensors.
                    Some(a) => a.iter_mut().zip(&g).for_each(|(x, y)| *x += *y),
                    None => *a = Some(g),
                }
            }
            loss_sum += loss;
            samples += s;
            skipped += k;
        }
        out.u64(any_ended as u64).u64(signal).u64(count as u64).f64(loss_sum).u64(samples).u64(skipped);
        for a in &acc {
            match a {
                Some(a) => out.u64(1).f32s(a),
                None => out.u64(0),
            };
        }
    }
    let msg = comm.broadcast(out.0)?;
    let mut r = Reader::new(&msg);
    let ended = r.u64()? == 1;
    let signal = r.u64()?;
    let count = r.u64()? as usize;
    let loss_sum = r.f64()?;
    let (samples, skipped) = (r.u64()? as usize, r.u64()? as usize);
    let sums = decode_grads(&mut r, vars)?;
    let grads = sums
        .into_iter()
        .zip(vars)
        .map(|(s, v)| s.map(|s| Tensor::from_vec(s, v.shape(), v.device())).transpose())
        .collect::<candle_core::Result<_>>()?;
    Ok(Combined {
        grads,
        loss_sum,
        count,
        samples,
        skipped,
        ended,
        stop: if signal == 0 { None } else { Some(signal as i32) },
    })
}

/// Rank 0's trained tensors, optimizer state and run state (`state`) on every rank, so all
/// ranks start a fresh or resumed run from the same numbers. Returns the state as rank 0 sent it.
pub(crate) fn broadcast_state(
    comm: &dyn Comm,
    params: &[(String, Var)],
    opt: &mut super::optim::AdamW,
    state: &serde_json::Value,
) -> Result<serde_json::Value> {
    let mut w = Writer::default();
    if comm.is_root() {
        let mut tensors: Vec<(String, Tensor)> =
            params.iter().map(|(n, v)| (format!("param.{n}"), v.as_tensor().clone())).collect();
        tensors.extend(opt.state_tensors());
        let st = crate::checkpoint::safetensors_bytes(&tensors, None)?;
        w.bytes(&serde_json::to_vec(state)?).u64(opt.t).bytes(&st);
    }
    let msg = comm.broadcast(w.0)?;
    let mut r = Reader::new(&msg);
    let state: serde_json::Value = serde_json::from_slice(r.bytes()?)?;
    let t = r.u64()?;
    if !comm.is_root() {
        let map: HashMap<String, Tensor> =
            candle_core::safetensors::load_buffer(r.bytes()?, &candle_core::Device::Cpu)?;
        for (n, v) in params {
            let x = map.get(&format!("param.{n}")).with_context(|| format!("`{n}` missing from rank 0's state"))?;
            v.set(&x.to_device(v.device())?)?;
        }
        let opt_map: HashMap<String, Tensor> = map.into_iter().filter(|(k, _)| !k.starts_with("param.")).collect();
        opt.load_state(t, &opt_map)?;
    }
    Ok(state)
}

/// Refuses to start unless every rank describes the same job (`what`: settings, base-model
/// hashes, data digest): ranks that differ would train different models into one run.
pub fn agree(comm: &dyn Comm, what: &serde_json::Value) -> Result<()> {
    let mine = serde_json::to_vec(what)?;
    let verdict = match comm.gather(&mine)? {
        Some(all) => {
            let mut problems = Vec::new();
            for (rank, msg) in all.iter().enumerate().skip(1) {
                let theirs: serde_json::Value = serde_json::from_slice(msg)?;
                let d = super::checkpoint::differences_as(what, &theirs, "", ("rank 0", &format!("rank {rank}")));
                if !d.is_empty() {
                    problems.push(format!("rank {rank} differs from rank 0:\n  {}", d.join("\n  ")));
                }
            }
            problems.join("\n")
        }
        None => String::new(),
    };
    let verdict = String::from_utf8_lossy(&comm.broadcast(verdict.into_bytes())?).to_string();
    if !verdict.is_empty() {
        if comm.is_root() {
            bail!(
                "refusing to start: the ranks of this job were not given the same run (same models, data and settings on every rank):\n{verdict}"
            )
        }
        // Rank 0 reports it; the others wait for the job to be ended.
        std::thread::sleep(std::time::Duration::from_secs(60));
        bail!("rank 0 refused the job (see its message)")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_each_step_into_runs() {
        let s = |rank| Shard { rank, ranks: 3, accum: 6 };
        let owned: Vec<Vec<usize>> = (0..3).map(|r| (0..12).filter(|&i| s(r).owns(i)).collect()).collect();
        assert_eq!(owned, vec![vec![0, 1, 6, 7], vec![2, 3, 8, 9], vec![4, 5, 10, 11]]);
        assert!((0..10).all(|i| Shard::ALL.owns(i)));
    }
}
