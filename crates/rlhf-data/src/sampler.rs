//! A seeded sampler over example indices that reshuffles every epoch and can be resumed.
//!
//! Epoch `e` visits the indices in a permutation drawn from `(seed, e)` alone, so the order
//! never depends on how many batches were drawn before: a run resumed from a saved
//! [`SamplerState`] (epoch, index) yields exactly the batches the uninterrupted run would
//! have. The permutation is a Fisher-Yates shuffle driven by SplitMix64, written out here
//! rather than taken from `rand`, whose generators may change between versions and would
//! break resuming across an upgrade. Batches never straddle epochs: the last batch of an epoch
//! may be short, as with a PyTorch `DataLoader` without `drop_last`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a [`Sampler`] is: everything needed to continue with the same next batch. Save it
/// with a checkpoint (it serialises to a small JSON object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The seed the permutations are drawn from.
    pub seed: u64,
    /// Whether indices are shuffled (`false`: 0, 1, 2, ... every epoch).
    pub shuffle: bool,
    /// Number of examples the sampler was built for.
    pub len: usize,
    /// Current epoch, from 0.
    pub epoch: u64,
    /// Position of the next example within the epoch's order.
    pub index: usize,
}

/// A seeded, resumable sampler of example indices.
#[derive(Debug, Clone)]
pub struct Sampler {
    state: SamplerState,
    /// The current epoch's order.
    order: Vec<usize>,
}

impl Sampler {
    /// A sampler over `len` examples at the start of epoch 0.
    pub fn new(len: usize, seed: u64, shuffle: bool) -> Self {
        let state = SamplerState {
            seed,
            shuffle,
            len,
            epoch: 0,
            index: 0,
        };
        Self {
            order: epoch_order(&state),
            state,
        }
    }

    /// Continues from a saved state; `len` is the data set's size now, which must match.
    pub fn from_state(state: SamplerState, len: usize) -> Result<Self> {
        if state.len != len {
            return Err(Error::Resume(format!(
                "the checkpoint's data order was for {} examples but the data now has {len}; \
                 resume with the same data files and max_length/skip settings, or start a new run",
                state.len
            )));
        }
        if state.index > len {
            return Err(Error::Resume(format!(
                "position {} is past the end of an epoch of {len} examples",
                state.index
            )));
        }
        Ok(Self {
            order: epoch_order(&state),
            state,
        })
    }

    /// The position to save.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The current epoch (the next batch's).
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Epochs done as a fraction (`1.5` halfway through the second), as transformers logs it.
    pub fn epoch_progress(&self) -> f64 {
        if self.state.len == 0 {
            return self.state.epoch as f64;
        }
        self.state.epoch as f64 + self.state.index as f64 / self.state.len as f64
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.state.len
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.state.len == 0
    }

    /// Batches in one epoch of `batch_size` (the last one may be short).
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.state.len.div_ceil(batch_size.max(1))
    }

    /// The next batch of up to `batch_size` indices. At the end of an epoch the sampler moves
    /// to the next one and reshuffles; an empty data set gives empty batches.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        let s = &mut self.state;
        if s.len == 0 {
            return Vec::new();
        }
        let end = (s.index + batch_size.max(1)).min(s.len);
        let batch = self.order[s.index..end].to_vec();
        s.index = end;
        // Move on eagerly so that `epoch()` after an epoch's last batch reads the new epoch.
        if s.index == s.len {
            s.epoch += 1;
            s.index = 0;
            self.order = epoch_order(s);
        }
        batch
    }
}

/// The order of `state.epoch`: a permutation drawn from (seed, epoch), or 0..len unshuffled.
fn epoch_order(state: &SamplerState) -> Vec<usize> {
    let mut order: Vec<usize> = (0..state.len).collect();
    if state.shuffle {
        // Mixing the epoch through the generator's own step keeps nearby seeds and epochs apart.
        let mut rng = SplitMix64(state.seed ^ SplitMix64(state.epoch).next());
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// SplitMix64 (Steele, Lea and Flood 2014): tiny, fast, and fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-and-reject, so no modulo bias).
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation_and_epochs_differ() {
        let mut s = Sampler::new(10, 3, true);
        let mut epochs = Vec::new();
        for _ in 0..3 {
            let mut seen: Vec<usize> = (0..4).flat_map(|_| s.next_batch(3)).collect();
            epochs.push(seen.clone());
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        assert_eq!(s.epoch(), 3);
        assert_ne!(epochs[0], epochs[1]);
        assert_ne!(epochs[0], (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn unshuffled_is_sequential_with_short_last_batch() {
        let mut s = Sampler::new(5, 0, false);
        assert_eq!(s.next_batch(2), [0, 1]);
        assert_eq!(s.next_batch(2), [2, 3]);
        assert_eq!(s.next_batch(2), [4]);
        assert_eq!((s.epoch(), s.next_batch(2)), (1, vec![0, 1]));
        assert_eq!(s.batches_per_epoch(2), 3);
    }
}
