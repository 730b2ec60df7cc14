//! Key/value cache in the `[batch, seq, kv_heads, head_dim]` layout, preallocated and grown by
//! doubling, so that a decoding step writes only its new rows.

use anyhow::Result;
use candle_core::Tensor;

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
}
