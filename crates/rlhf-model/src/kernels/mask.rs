//! Attention masks: the additive bias of padded batches and of rows that pack several
//! sequences ([`Packing`]), and the position ids that go with them.

use candle_core::{Device, Tensor};

use crate::Result;

/// Additive attention bias: 0 where query i may see key j, a large negative number elsewhere.
///
/// Key j is visible to query i when j is not padding and j <= past_len + i (causal). A query
/// row with no visible key (a left-pad position) gets all zeros, which keeps softmax finite;
/// its output is never used.
// key_mask: (b, past_len + t) of 0/1 -> (b, 1, t, past_len + t)
pub fn attention_bias(key_mask: &[Vec<u8>], t: usize, device: &Device) -> Result<Tensor> {
    let b = key_mask.len();
    let k = key_mask.first().map(|r| r.len()).unwrap_or(0);
    let past = k - t;
    let mut v = vec![0f32; b * t * k];
    for (bi, row) in key_mask.iter().enumerate() {
        for i in 0..t {
            let base = (bi * t + i) * k;
            let mut any = false;
            for j in 0..k {
                let ok = row[j] != 0 && j <= past + i;
                any |= ok;
                v[base + j] = if ok { 0.0 } else { MASKED };
            }
            if !any {
                v[base..base + k].fill(0.0);
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, t, k), device)?)
}

/// Sequences packed into one row (a batch of one), without padding.
///
/// Each segment is a causal sequence, or a shared prefix followed by branches: a prompt and
/// its completions, laid out `[prompt, completion 1, completion 2, …]`. Every token sees the
/// earlier tokens of its own segment, except that a branch's tokens do not see the other
/// branches. Positions are the caller's: a branch's count on from the end of its prefix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packing {
    /// Where each segment starts, then the total length (`segments + 1` entries).
    pub starts: Vec<usize>,
    /// Per segment, where its branches start, as offsets from the segment's start,
    /// ascending; the first one ends the shared prefix. Empty for a plain sequence.
    pub branches: Vec<Vec<usize>>,
    /// A root: a plain segment (no branches, no root of its own) that every other segment
    /// sees whole before its own tokens, as a prefix common to all of them (a chat
    /// template's system turn). Only segment 0 can be the root; `false` when there is none.
    pub root: bool,
}

impl Packing {
    /// Plain causal sequences starting at `starts` (then the total).
    pub fn sequences(starts: Vec<usize>) -> Self {
        let n = starts.len().saturating_sub(1);
        Packing {
            starts,
            branches: vec![Vec::new(); n],
            root: false,
        }
    }

    /// The rows of the root segment that segment `s` sees before its own: `0..0` for the
    /// root itself and where there is no root.
    pub fn root_of(&self, s: usize) -> std::ops::Range<usize> {
        if self.root && s > 0 {
            self.starts[0]..self.starts[1]
        } else {
            0..0
        }
    }

    /// Total tokens.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Whether it packs no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every segment and branch is non-empty and in order.
    pub fn is_valid(&self) -> bool {
        self.starts.first() == Some(&0)
            && self.starts.windows(2).all(|w| w[0] < w[1])
            && self.branches.len() + 1 == self.starts.len()
            && self
                .branches
                .iter()
                .zip(self.starts.windows(2))
                .all(|(b, w)| {
                    b.windows(2).all(|x| x[0] < x[1]) && b.last().is_none_or(|&l| l < w[1] - w[0])
                })
            && (!self.root || self.branches.first().is_some_and(|b| b.is_empty()))
    }

    /// The keys `[lo, hi)` that query `i` (an offset in segment `s`) may not see besides the
    /// future: the branches before its own; empty for the prefix and the first branch.
    pub fn hidden_keys(&self, s: usize, i: usize) -> (usize, usize) {
        hidden_keys(&self.branches[s], i)
    }
}

/// [`Packing::hidden_keys`] from a segment's branch offsets.
#[inline(always)]
pub(crate) fn hidden_keys(branches: &[usize], i: usize) -> (usize, usize) {
    let Some(&prefix) = branches.first() else {
        return (0, 0);
    };
    let own = branches.iter().rev().find(|&&b| b <= i).copied();
    match own {
        Some(b) if i >= prefix => (prefix, b),
        _ => (0, 0),
    }
}

/// The additive bias of a [`Packing`]: `(1, 1, total, total)`, 0 where a token may look.
pub fn packed_attention_bias(packing: &Packing, device: &Device) -> Result<Tensor> {
    let total = packing.len();
    let mut v = vec![MASKED; total * total];
    for (s, w) in packing.starts.windows(2).enumerate() {
        let root = packing.root_of(s);
        for i in w[0]..w[1] {
            v[i * total + root.start..i * total + root.end].fill(0.0);
            v[i * total + w[0]..=i * total + i].fill(0.0);
            let (lo, hi) = packing.hidden_keys(s, i - w[0]);
            v[i * total + w[0] + lo..i * total + w[0] + hi].fill(MASKED);
        }
    }
    Ok(Tensor::from_vec(v, (1, 1, total, total), device)?)
}

/// What masked scores get: finite, so that fully masked rows stay free of NaN.
pub const MASKED: f32 = -1e9;

/// Position ids from an attention mask: each row counts from its first real token, so a
/// left-padded row sees the positions its unpadded twin sees (transformers' `generate` rule)
/// and a right-padded row keeps `arange` (transformers' forward default), padding included.
/// Leading pads get 0; their outputs are never used.
// mask: (b, t) of 0/1 -> (b, t) positions
pub fn positions_from_mask(mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let lead = row.iter().take_while(|&&m| m == 0).count();
            (0..row.len())
                .map(|j| j.saturating_sub(lead) as u32)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt of 3 and branches of 2 and 3: prompt rows and the first branch hide nothing
    /// but the future; the second branch hides the first; a plain segment hides nothing.
    #[test]
    fn branches_hide_each_other_and_nothing_else() {
        let packing = Packing {
            starts: vec![0, 8, 12],
            branches: vec![vec![3, 5], Vec::new()],
            root: false,
        };
        assert!(packing.is_valid());
        let none = (0, 0);
        // An empty range hides nothing, wherever it starts.
        let hidden_of = |s: usize, i: usize| match packing.hidden_keys(s, i) {
            (lo, hi) if lo >= hi => none,
            range => range,
        };
        let hidden: Vec<(usize, usize)> = (0..8).map(|i| hidden_of(0, i)).collect();
        assert_eq!(
            hidden,
            vec![none, none, none, none, none, (3, 5), (3, 5), (3, 5)]
        );
        assert_eq!(hidden_of(1, 3), none);
        let bad = Packing {
            starts: vec![0, 4],
            branches: vec![vec![2, 4]],
            root: false,
        };
        assert!(
            !bad.is_valid(),
            "a branch starting at the segment's end is empty"
        );
        assert!(
            !Packing::sequences(vec![0, 3, 3]).is_valid(),
            "an empty segment"
        );
    }
}
