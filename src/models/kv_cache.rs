//! Key/value cache in the `[batch, seq, kv_heads, head_dim]` layout, preallocated and grown by
//! doubling, so that a decoding step writes only its new rows.

use anyhow::Result;
use candle_core::{Device, Tensor};

#[derive(Clone, Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k, v: [b, t, kvh, d]` and returns views of everything cached so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dims()[1];
        let need = self.len + t;
        let cap = self.k.as_ref().map(|x| x.dims()[1]).unwrap_or(0);
        if need > cap {
            let new_cap = need.max(cap * 2).max(16);
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let mut dims = like.dims().to_vec();
                dims[1] = new_cap;
                let buf = Tensor::zeros(dims, like.dtype(), like.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
        }
        let (kb, vb) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok((kb.narrow(1, 0, self.len)?, vb.narrow(1, 0, self.len)?))
    }

    pub fn device(&self) -> Option<Device> {
        self.k.as_ref().map(|k| k.device().clone())
    }

    /// The cached keys and values `[b, len, kvh, d]`.
    fn cached(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok(Some((k.narrow(1, 0, self.len)?, v.narrow(1, 0, self.len)?))),
            _ => Ok(None),
        }
    }

    /// From cached keys and values `[b, len, kvh, d]`.
    fn from_kv(k: Tensor, v: Tensor) -> Result<Self> {
        let len = k.dims()[1];
        Ok(Self { k: Some(k.contiguous()?), v: Some(v.contiguous()?), len })
    }

    /// Drops the first `n` cached positions.
    pub fn drop_front(&mut self, n: usize) -> Result<()> {
        if let Some((k, v)) = self.cached()? {
            let keep = self.len - n.min(self.len);
            *self = Self::from_kv(k.narrow(1, self.len - keep, keep)?, v.narrow(1, self.len - keep, keep)?)?;
        }
        Ok(())
    }

    /// The rows of `a` then those of `b`, the shorter left-padded with zeros to the longer's
    /// length (the caller masks the padding).
    pub fn merge_left_padded(a: &Self, b: &Self) -> Result<Self> {
        let (Some((ka, va)), Some((kb, vb))) = (a.cached()?, b.cached()?) else {
            anyhow::bail!("merging an empty KV cache")
        };
        let l = a.len.max(b.len);
        let pad = |t: Tensor, len: usize| -> Result<Tensor> {
            if len == l {
                return Ok(t);
            }
            let mut dims = t.dims().to_vec();
            dims[1] = l - len;
            Ok(Tensor::cat(&[&Tensor::zeros(dims, t.dtype(), t.device())?, &t], 1)?)
        };
        let k = Tensor::cat(&[&pad(ka, a.len)?, &pad(kb, b.len)?], 0)?;
        let v = Tensor::cat(&[&pad(va, a.len)?, &pad(vb, b.len)?], 0)?;
        Self::from_kv(k, v)
    }

    /// Keeps batch rows `idx` (beam search).
    pub fn reorder(&mut self, idx: &Tensor) -> Result<()> {
        if let Some(k) = &self.k {
            self.k = Some(k.index_select(idx, 0)?);
        }
        if let Some(v) = &self.v {
            self.v = Some(v.index_select(idx, 0)?);
        }
        Ok(())
    }
}

/// One cache per block.
#[derive(Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![LayerCache::default(); n_layers] }
    }

    pub fn len(&self) -> usize {
        self.layers.first().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reorder(&mut self, idx: &Tensor) -> Result<()> {
        for l in &mut self.layers {
            l.reorder(idx)?;
        }
        Ok(())
    }

    /// Bytes held by the keys and values (allocated capacity).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Drops the first `n` cached positions of every layer.
    pub fn drop_front(&mut self, n: usize) -> Result<()> {
        for l in &mut self.layers {
            l.drop_front(n)?;
        }
        Ok(())
    }

    /// The rows of `a` then those of `b`, layer by layer (see [`LayerCache::merge_left_padded`]).
    pub fn merge_left_padded(a: &Self, b: &Self) -> Result<Self> {
        if a.layers.len() != b.layers.len() {
            anyhow::bail!("merging KV caches of {} and {} layers", a.layers.len(), b.layers.len())
        }
        let layers =
            a.layers.iter().zip(&b.layers).map(|(x, y)| LayerCache::merge_left_padded(x, y)).collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}
