//! The key/value cache of generation: candle tensors the generic attention concatenates to,
//! or the CPU attention kernel's own buffers, written in place.

use candle_core::{Device, Tensor};

use crate::Result;

/// Per-layer key/value cache for generation.
///
/// A layer's entry is either candle tensors that the generic attention concatenates to, or
/// the fused attention's own buffers (`RawKv`), written in place. A layer moves from the
/// second form to the first if the generic form ever has to run on it.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    raw: Vec<Option<RawKv>>,
}

/// Keys (after rope) and values of one layer, `(b, nkv, cap, d)` each, of which the first
/// `len` positions of every (row, head) block are filled; `cap` grows by doubling.
#[derive(Debug, Clone)]
pub(crate) struct RawKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) b: usize,
    pub(crate) nkv: usize,
    pub(crate) d: usize,
    pub(crate) cap: usize,
    pub(crate) len: usize,
}

impl RawKv {
    pub(crate) fn new(b: usize, nkv: usize, d: usize) -> Self {
        RawKv {
            k: Vec::new(),
            v: Vec::new(),
            b,
            nkv,
            d,
            cap: 0,
            len: 0,
        }
    }

    /// Makes room for `total` positions, keeping what is cached.
    pub(crate) fn reserve(&mut self, total: usize) {
        if total <= self.cap {
            return;
        }
        let cap = total.max(2 * self.cap).max(32);
        let (blocks, d) = (self.b * self.nkv, self.d);
        for buf in [&mut self.k, &mut self.v] {
            let mut grown = vec![0f32; blocks * cap * d];
            for blk in 0..blocks {
                let old = &buf[blk * self.cap * d..][..self.len * d];
                grown[blk * cap * d..][..self.len * d].copy_from_slice(old);
            }
            *buf = grown;
        }
        self.cap = cap;
    }

    /// The cached keys and values as `(b, nkv, len, d)` tensors.
    fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (blocks, d, len) = (self.b * self.nkv, self.d, self.len);
        let gather = |buf: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(blocks * len * d);
            for blk in 0..blocks {
                out.extend_from_slice(&buf[blk * self.cap * d..][..len * d]);
            }
            Ok(Tensor::from_vec(out, (self.b, self.nkv, len, d), device)?)
        };
        Ok((gather(&self.k)?, gather(&self.v)?))
    }

    /// Moves every row's cached positions `n` to the right, zeros in front: `n` positions of
    /// left padding, which the caller masks.
    fn pad_left(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let (len, d) = (self.len, self.d);
        self.reserve(len + n);
        let cap = self.cap;
        for buf in [&mut self.k, &mut self.v] {
            for blk in 0..self.b * self.nkv {
                let base = blk * cap * d;
                buf.copy_within(base..base + len * d, base + n * d);
                buf[base..base + n * d].fill(0.0);
            }
        }
        self.len = len + n;
    }

    /// Drops the first `n` cached positions of every row.
    fn drop_leading(&mut self, n: usize) {
        let (n, len, d, cap) = (n.min(self.len), self.len, self.d, self.cap);
        if n == 0 {
            return;
        }
        for buf in [&mut self.k, &mut self.v] {
            for blk in 0..self.b * self.nkv {
                let base = blk * cap * d;
                buf.copy_within(base + n * d..base + len * d, base);
            }
        }
        self.len = len - n;
    }

    /// Appends the rows of `other`, which holds as many positions as this one.
    fn append_rows(&mut self, other: &RawKv) {
        let (len, d, nkv) = (self.len, self.d, self.nkv);
        let cap = self.cap.max(other.cap).max(len);
        let blocks = (self.b + other.b) * nkv;
        for (buf, theirs) in [(&mut self.k, &other.k), (&mut self.v, &other.v)] {
            let mut out = vec![0f32; blocks * cap * d];
            let ours = (self.b * nkv, self.cap, &buf[..]);
            for (first, (n, src_cap, src)) in
                [(0, ours), (ours.0, (other.b * nkv, other.cap, theirs))]
            {
                for blk in 0..n {
                    out[(first + blk) * cap * d..][..len * d]
                        .copy_from_slice(&src[blk * src_cap * d..][..len * d]);
                }
            }
            *buf = out;
        }
        self.cap = cap;
        self.b += other.b;
    }

    /// Keeps only the batch rows `keep`, in that order.
    fn select_rows(&mut self, keep: &[usize]) {
        let per_row = self.nkv * self.cap * self.d;
        for buf in [&mut self.k, &mut self.v] {
            let mut out = Vec::with_capacity(keep.len() * per_row);
            for &r in keep {
                out.extend_from_slice(&buf[r * per_row..][..per_row]);
            }
            *buf = out;
        }
        self.b = keep.len();
    }
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            raw: vec![None; n_layers],
        }
    }

    /// Appends this step's keys and values for `layer` and returns the full sequences.
    // k, v: (b, h, t, d) -> (b, h, past + t, d)
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if let Some(raw) = self.raw[layer].take() {
            self.layers[layer] = Some(raw.tensors(k.device())?);
        }
        let (k, v) = match &self.layers[layer] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// The fused attention's buffers for `layer` (empty at first), or `None` when the layer
    /// already holds the composed path's tensors.
    pub(crate) fn raw_slot(&mut self, layer: usize) -> Option<&mut Option<RawKv>> {
        if self.layers[layer].is_some() {
            return None;
        }
        Some(&mut self.raw[layer])
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        if let Some(Some(r)) = self.raw.first() {
            return r.len;
        }
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cache of `shifts.len()` rows holding `len` positions from this one-row cache (which
    /// must hold at least `len`): row r's position j is this cache's position `j - shifts[r]`,
    /// zero before `shifts[r]` (left padding, masked by the caller). `None` where a layer
    /// holds the composed path's tensors rather than the fused buffers.
    pub(crate) fn shifted_rows(&self, shifts: &[usize], len: usize) -> Option<KvCache> {
        let mut raw = Vec::with_capacity(self.raw.len());
        for (slot, layer) in self.raw.iter().zip(&self.layers) {
            let src = match (slot, layer) {
                (Some(r), None) if r.b == 1 && r.len >= len => r,
                _ => return None,
            };
            let (nkv, d) = (src.nkv, src.d);
            let mut dst = RawKv::new(shifts.len(), nkv, d);
            dst.reserve(len);
            dst.len = len;
            for (row, &shift) in shifts.iter().enumerate() {
                for h in 0..nkv {
                    let from = h * src.cap * d;
                    let to = (row * nkv + h) * dst.cap * d;
                    let n = len.saturating_sub(shift) * d;
                    for (a, b) in [(&mut dst.k, &src.k), (&mut dst.v, &src.v)] {
                        a[to + shift.min(len) * d..][..n].copy_from_slice(&b[from..from + n]);
                    }
                }
            }
            raw.push(Some(dst));
        }
        Some(KvCache {
            layers: vec![None; self.layers.len()],
            raw,
        })
    }

    /// Number of batch rows cached (0 when nothing is).
    pub fn rows(&self) -> usize {
        if let Some(Some(r)) = self.raw.first() {
            return r.b;
        }
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(0).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Appends the rows of `other` (a cache of the same model) after this cache's rows,
    /// aligned at their ends: the one holding fewer positions is left-padded with zeros up
    /// to the other's length. Returns the padding added to (this cache's rows, `other`'s
    /// rows), which the caller masks by prepending as many 0s to those rows' key masks.
    /// This is how a request joins a running batch (continuous batching): each row keeps
    /// its own positions, so left padding changes nothing it computes.
    pub fn append_rows(&mut self, mut other: KvCache) -> Result<(usize, usize)> {
        if self.rows() == 0 {
            *self = other;
            return Ok((0, 0));
        }
        if other.rows() == 0 {
            return Ok((0, 0));
        }
        if other.layers.len() != self.layers.len() {
            return Err(crate::Error::Config(format!(
                "cannot join KV caches of {} and {} layers",
                self.layers.len(),
                other.layers.len()
            )));
        }
        let (ours, theirs) = (self.len(), other.len());
        let (pad_ours, pad_theirs) = (theirs.saturating_sub(ours), ours.saturating_sub(theirs));
        self.pad_left(pad_ours)?;
        other.pad_left(pad_theirs)?;
        for l in 0..self.layers.len() {
            let both_raw = self.layers[l].is_none() && other.layers[l].is_none();
            if let (true, Some(a), Some(b)) = (both_raw, &mut self.raw[l], &other.raw[l]) {
                if (a.nkv, a.d) == (b.nkv, b.d) {
                    a.append_rows(b);
                    continue;
                }
            }
            let (Some((ka, va)), Some((kb, vb))) = (self.take_tensors(l)?, other.take_tensors(l)?)
            else {
                return Err(crate::Error::Config(format!(
                    "cannot join KV caches: layer {l} is cached in one and not the other"
                )));
            };
            self.layers[l] = Some((Tensor::cat(&[&ka, &kb], 0)?, Tensor::cat(&[&va, &vb], 0)?));
        }
        Ok((pad_ours, pad_theirs))
    }

    /// Left-pads every row with `n` zero positions (masked by the caller).
    pub fn pad_left(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for raw in self.raw.iter_mut().flatten() {
            raw.pad_left(n);
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let (b, h, _, d) = k.dims4()?;
            let zeros = Tensor::zeros((b, h, n, d), k.dtype(), k.device())?;
            *k = Tensor::cat(&[&zeros, &*k], 2)?;
            *v = Tensor::cat(&[&zeros, &*v], 2)?;
        }
        Ok(())
    }

    /// Drops the first `n` positions of every row: columns every row masks (left padding
    /// that a batch no longer needs once the rows it aligned have left).
    pub fn drop_leading(&mut self, n: usize) -> Result<()> {
        for raw in self.raw.iter_mut().flatten() {
            raw.drop_leading(n);
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let len = k.dim(2)?;
            let n = n.min(len);
            *k = k.narrow(2, n, len - n)?.contiguous()?;
            *v = v.narrow(2, n, len - n)?.contiguous()?;
        }
        Ok(())
    }

    /// Layer `l` as the composed path's tensors (converting the fused buffers), taken out.
    fn take_tensors(&mut self, l: usize) -> Result<Option<(Tensor, Tensor)>> {
        if let Some(raw) = self.raw[l].take() {
            return Ok(Some(raw.tensors(&Device::Cpu)?));
        }
        Ok(self.layers[l].take())
    }

    /// Keeps only the batch rows in `keep` (finished sequences leave the batch).
    pub fn select_rows(&mut self, keep: &Tensor) -> Result<()> {
        let rows: Vec<usize> = keep
            .to_dtype(candle_core::DType::U32)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|r| r as usize)
            .collect();
        for raw in self.raw.iter_mut().flatten() {
            raw.select_rows(&rows);
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(keep, 0)?;
            *v = v.index_select(keep, 0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer cache of `b` rows and `len` positions whose values name their place:
    /// k = 1000·row + 10·position + head (+ 0.5 for v), in the fused buffers or as tensors.
    fn cache(b: usize, len: usize, row0: usize, raw: bool) -> KvCache {
        let (nkv, d) = (2, 3);
        let val =
            |r: usize, h: usize, p: usize, off: f32| (1000 * (row0 + r) + 10 * p + h) as f32 + off;
        let mut c = KvCache::new(1);
        if raw {
            let mut kv = RawKv::new(b, nkv, d);
            kv.reserve(len);
            for r in 0..b {
                for h in 0..nkv {
                    for p in 0..len {
                        let at = ((r * nkv + h) * kv.cap + p) * d;
                        kv.k[at..at + d].fill(val(r, h, p, 0.0));
                        kv.v[at..at + d].fill(val(r, h, p, 0.5));
                    }
                }
            }
            kv.len = len;
            c.raw[0] = Some(kv);
        } else {
            let t = |off: f32| {
                let v: Vec<f32> = (0..b * nkv * len * d)
                    .map(|i| val(i / (nkv * len * d), i / (len * d) % nkv, i / d % len, off))
                    .collect();
                Tensor::from_vec(v, (b, nkv, len, d), &Device::Cpu).unwrap()
            };
            c.layers[0] = Some((t(0.0), t(0.5)));
        }
        c
    }

    /// What a row holds per position: `None` for zero padding, else the position it came from.
    fn positions(c: &mut KvCache) -> Vec<Vec<Option<(usize, usize)>>> {
        let (k, v) = c.take_tensors(0).unwrap().unwrap();
        let (b, nkv, len, d) = k.dims4().unwrap();
        let (k, v) = (
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        (0..b)
            .map(|r| {
                (0..len)
                    .map(|p| {
                        let at = |h: usize| ((r * nkv + h) * len + p) * d;
                        let x = k[at(1)];
                        assert_eq!(v[at(1)], if x == 0.0 { 0.0 } else { x + 0.5 });
                        assert_eq!(k[at(0)], if x == 0.0 { 0.0 } else { x - 1.0 }, "head 0");
                        (x != 0.0).then_some(((x as usize) / 1000, (x as usize) % 1000 / 10))
                    })
                    .collect()
            })
            .collect()
    }

    /// Joining a cache of 3 positions to one of 5 left-pads the shorter by 2, whichever side
    /// it is on, in the fused buffers and in the composed path's tensors alike; dropping
    /// leading columns then shifts every row left.
    #[test]
    fn appended_rows_are_aligned_at_their_ends() {
        for raw in [true, false] {
            for (la, lb) in [(5, 3), (3, 5), (4, 4)] {
                let mut a = cache(2, la, 0, raw);
                let b = cache(1, lb, 7, raw);
                let pads = a.append_rows(b).unwrap();
                let len = la.max(lb);
                assert_eq!(pads, (len - la, len - lb), "raw {raw}: {la} + {lb}");
                assert_eq!((a.rows(), a.len()), (3, len));
                let got = positions(&mut a);
                for (r, (id, l)) in [(0, la), (1, la), (7, lb)].into_iter().enumerate() {
                    let want: Vec<_> = (0..len)
                        .map(|p| (p + l >= len).then(|| (id, p + l - len)))
                        .collect();
                    assert_eq!(got[r], want, "raw {raw}: {la} + {lb}, row {r}");
                }
            }
            // Growing past the buffer's capacity keeps what is cached; dropping the 10
            // columns of padding gives the first row its own positions back.
            let mut a = cache(1, 30, 0, raw);
            assert_eq!(a.append_rows(cache(2, 40, 3, raw)).unwrap(), (10, 0));
            a.drop_leading(10).unwrap();
            let got = positions(&mut a);
            let want: Vec<_> = (0..30).map(|p| Some((0, p))).collect();
            assert_eq!(got[0], want, "raw {raw}");
            assert_eq!(got[2][29], Some((4, 39)), "raw {raw}");
        }
    }
}
