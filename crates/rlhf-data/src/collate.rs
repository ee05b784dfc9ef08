//! Padding tokenised examples into batches, laid out as TRL's collators lay them out.
//!
//! Every batch is right-padded with the tokenizer's pad id (else EOS, see [`pad_id`]) into an
//! [`rlhf_model::Batch`] (ids plus attention mask); labels are padded with [`IGNORE_INDEX`].
//! A reward batch of P pairs is one batch of 2P sequences, the P chosen rows then the P rejected
//! rows (TRL's `DataCollatorForPreference`), so one forward pass scores both sides and the
//! scores split in halves. A ranking's pairs stay together in the batch, and
//! [`RewardBatch::pair_weights`] weighs each ranking (or lone pair) equally, as InstructGPT's
//! loss averages over a prompt's K(K-1)/2 comparisons before averaging over prompts.

use std::ops::Range;

use rlhf_model::tokenizer::Tokenizer;
use rlhf_model::Batch;

use crate::error::{Error, Result};
use crate::tokenize::{DpoExample, RewardGroup, SftExample, IGNORE_INDEX};

/// The id to pad with: the tokenizer's pad token, else its EOS token (TRL's fallback).
pub fn pad_id(tok: &Tokenizer) -> Result<u32> {
    tok.pad_or_eos_token_id().ok_or_else(|| {
        Error::Config(
            "the tokenizer has neither a pad_token nor an eos_token to pad batches with; set \
             \"pad_token\" in tokenizer_config.json"
                .to_string(),
        )
    })
}

/// A padded SFT batch.
#[derive(Debug, Clone)]
pub struct SftBatch {
    /// Right-padded ids and attention mask.
    pub batch: Batch,
    /// Labels, padded with [`IGNORE_INDEX`] to the same width.
    pub labels: Vec<Vec<i64>>,
}

/// Pads SFT examples into one batch.
pub fn collate_sft<'a>(
    examples: impl IntoIterator<Item = &'a SftExample>,
    pad_id: u32,
) -> SftBatch {
    let examples: Vec<&SftExample> = examples.into_iter().collect();
    let ids: Vec<Vec<u32>> = examples.iter().map(|e| e.input_ids.clone()).collect();
    let batch = Batch::pad(&ids, pad_id, false);
    let width = batch.input_ids.first().map_or(0, Vec::len);
    let labels = examples
        .iter()
        .map(|e| {
            let mut l = e.labels.clone();
            l.resize(width, IGNORE_INDEX);
            l
        })
        .collect();
    SftBatch { batch, labels }
}

/// A padded reward-model batch of P pairs.
#[derive(Debug, Clone)]
pub struct RewardBatch {
    /// 2P rows: the P chosen sequences, then the P rejected ones in the same order.
    pub batch: Batch,
    /// P.
    pub num_pairs: usize,
    /// Per-pair margins, `None` when no pair in the batch has one (0.0 for pairs without one,
    /// which is the same loss as no margin).
    pub margins: Option<Vec<f32>>,
    /// The pair indices of each group (a lone pair, or one ranking's pairs), in batch order.
    pub groups: Vec<Range<usize>>,
    /// Per-pair loss weights summing to 1 with every group weighing the same; with lone pairs
    /// only they are all 1/P, TRL's plain mean.
    pub pair_weights: Vec<f32>,
}

/// Pads reward groups into one batch of chosen rows then rejected rows.
pub fn collate_reward<'a>(
    groups: impl IntoIterator<Item = &'a RewardGroup>,
    pad_id: u32,
) -> RewardBatch {
    let groups: Vec<&RewardGroup> = groups.into_iter().filter(|g| !g.pairs.is_empty()).collect();
    let pairs: Vec<_> = groups.iter().flat_map(|g| &g.pairs).collect();
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| p.chosen_ids.clone())
        .chain(pairs.iter().map(|p| p.rejected_ids.clone()))
        .collect();
    let margins = pairs
        .iter()
        .any(|p| p.margin.is_some())
        .then(|| pairs.iter().map(|p| p.margin.unwrap_or(0.0)).collect());
    let mut ranges = Vec::with_capacity(groups.len());
    let mut weights = Vec::with_capacity(pairs.len());
    let mut start = 0;
    for g in &groups {
        let n = g.pairs.len();
        ranges.push(start..start + n);
        weights.extend(std::iter::repeat_n(
            1.0 / (groups.len() as f32 * n as f32),
            n,
        ));
        start += n;
    }
    RewardBatch {
        batch: Batch::pad(&seqs, pad_id, false),
        num_pairs: pairs.len(),
        margins,
        groups: ranges,
        pair_weights: weights,
    }
}

/// A padded DPO batch of B pairs (TRL's DPO `DataCollatorForPreference` layout).
#[derive(Debug, Clone)]
pub struct DpoBatch {
    /// 2B rows: prompt+chosen for each pair, then prompt+rejected in the same order.
    pub batch: Batch,
    /// 1 on completion tokens (where log-probabilities are summed), 0 on prompt and padding.
    pub completion_mask: Vec<Vec<u8>>,
}

/// Pads DPO examples into one batch of prompt+chosen rows then prompt+rejected rows.
pub fn collate_dpo<'a>(
    examples: impl IntoIterator<Item = &'a DpoExample>,
    pad_id: u32,
) -> DpoBatch {
    let examples: Vec<&DpoExample> = examples.into_iter().collect();
    let join = |p: &[u32], c: &[u32]| p.iter().chain(c).copied().collect::<Vec<u32>>();
    let seqs: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| join(&e.prompt_ids, &e.chosen_ids))
        .chain(
            examples
                .iter()
                .map(|e| join(&e.prompt_ids, &e.rejected_ids)),
        )
        .collect();
    let batch = Batch::pad(&seqs, pad_id, false);
    let width = batch.input_ids.first().map_or(0, Vec::len);
    let mask = |e: &DpoExample, completion: usize| {
        let mut m = vec![0u8; e.prompt_ids.len()];
        m.resize(e.prompt_ids.len() + completion, 1);
        m.resize(width, 0);
        m
    };
    let completion_mask = examples
        .iter()
        .map(|e| mask(e, e.chosen_ids.len()))
        .chain(examples.iter().map(|e| mask(e, e.rejected_ids.len())))
        .collect();
    DpoBatch {
        batch,
        completion_mask,
    }
}

/// Left-pads prompts for generation (new tokens then line up at the right edge).
pub fn collate_prompts(prompts: &[Vec<u32>], pad_id: u32) -> Batch {
    Batch::pad(prompts, pad_id, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Location;
    use crate::tokenize::RewardPair;
    use std::path::Path;

    fn group(pairs: &[(&[u32], &[u32], Option<f32>)]) -> RewardGroup {
        RewardGroup {
            at: Location::line(Path::new("t.jsonl"), 1),
            pairs: pairs
                .iter()
                .map(|(c, r, m)| RewardPair {
                    chosen_ids: c.to_vec(),
                    rejected_ids: r.to_vec(),
                    margin: *m,
                })
                .collect(),
        }
    }

    #[test]
    fn reward_batch_matches_trl_layout() {
        // TRL's DataCollatorForPreference docstring example, with pad id 0.
        let groups = [
            group(&[(&[1, 2, 3], &[4, 5], Some(0.5))]),
            group(&[(&[6, 7], &[8], None)]),
        ];
        let b = collate_reward(&groups, 0);
        assert_eq!(
            b.batch.input_ids,
            vec![vec![1, 2, 3], vec![6, 7, 0], vec![4, 5, 0], vec![8, 0, 0]]
        );
        assert_eq!(
            b.batch.attention_mask,
            vec![vec![1, 1, 1], vec![1, 1, 0], vec![1, 1, 0], vec![1, 0, 0]]
        );
        assert_eq!(b.margins, Some(vec![0.5, 0.0]));
        assert_eq!(b.pair_weights, vec![0.5, 0.5]);
    }

    #[test]
    fn ranking_groups_weigh_as_one_element() {
        let groups = [
            group(&[(&[1], &[2], None), (&[1], &[3], None), (&[2], &[3], None)]),
            group(&[(&[4], &[5], None)]),
        ];
        let b = collate_reward(&groups, 0);
        assert_eq!(b.num_pairs, 4);
        assert_eq!(b.batch.len(), 8);
        assert_eq!(b.groups, vec![0..3, 3..4]);
        let w = &b.pair_weights;
        assert!((w[0] - 1.0 / 6.0).abs() < 1e-7 && (w[3] - 0.5).abs() < 1e-7);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(b.margins, None);
    }

    #[test]
    fn dpo_batch_matches_trl_layout() {
        // TRL's DPO DataCollatorForPreference docstring example.
        let at = Location::line(Path::new("t.jsonl"), 1);
        let ex = |p: &[u32], c: &[u32], r: &[u32]| DpoExample {
            at: at.clone(),
            prompt_ids: p.to_vec(),
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
        };
        let b = collate_dpo(
            &[ex(&[1, 2, 3], &[4, 5], &[6]), ex(&[7, 8], &[9], &[10, 11])],
            0,
        );
        assert_eq!(
            b.batch.input_ids,
            vec![
                vec![1, 2, 3, 4, 5],
                vec![7, 8, 9, 0, 0],
                vec![1, 2, 3, 6, 0],
                vec![7, 8, 10, 11, 0]
            ]
        );
        assert_eq!(
            b.completion_mask,
            vec![
                vec![0, 0, 0, 1, 1],
                vec![0, 0, 1, 0, 0],
                vec![0, 0, 0, 1, 0],
                vec![0, 0, 1, 1, 0]
            ]
        );
    }
}
