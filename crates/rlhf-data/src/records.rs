//! The record formats of DESIGN.md, as validated Rust values.
//!
//! - [`Demonstration`] (SFT): `{"prompt", "completion"}` | `{"messages"}` | `{"text"}`;
//!   prompt and completion may also be message lists (TRL's conversational prompt-completion).
//! - [`Comparison`] (reward, DPO): a [`Preference`] pair `{"prompt", "chosen", "rejected"}`
//!   with optional `margin` or Llama 2 `degree` and `safety` labels, the implicit-prompt form
//!   `{"chosen", "rejected"}`, the conversational forms (TRL's: message lists), or a
//!   [`Ranking`] `{"prompt", "responses", "ranking"}` that stands for all K-choose-2 pairs
//!   (or, with ties and partial rankings in the grouped form `[[1], [0, 2]]`, for the pairs of
//!   answers in different groups).
//! - [`UnpairedPreference`] (KTO): `{"prompt", "completion", "label": true|false}`, prompt and
//!   completion both text or both message lists (TRL's unpaired preference format).
//! - [`PromptRecord`] (PPO, sampling): `{"prompt"}` | `{"messages"}`, optional `"tags"`.
//!
//! Parsing rows into these types and loading files is in [`crate::load`].

use rlhf_model::tokenizer::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Location;

/// A text field: plain text, or a conversation rendered through the chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text, tokenised as is.
    Text(String),
    /// A list of messages (TRL's "conversational" format).
    Messages(Vec<ChatMessage>),
}

impl Content {
    /// Whether this is a message list (TRL's `is_conversational`).
    pub fn is_conversational(&self) -> bool {
        matches!(self, Content::Messages(_))
    }
}

/// A demonstration for supervised fine-tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct Demonstration {
    /// Where the row came from.
    pub at: Location,
    /// The row's format and content.
    pub body: DemonstrationBody,
}

/// The three demonstration formats.
#[derive(Debug, Clone, PartialEq)]
pub enum DemonstrationBody {
    /// `{"prompt", "completion"}`: both text or both message lists.
    PromptCompletion {
        /// The prompt (no loss on its tokens).
        prompt: Content,
        /// The completion.
        completion: Content,
    },
    /// `{"messages"}`: a whole conversation.
    Messages(Vec<ChatMessage>),
    /// `{"text"}`: plain text, loss on every token.
    Text(String),
}

/// How strongly the annotator preferred the chosen answer (Llama 2's four levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Degree {
    /// "significantly better".
    SignificantlyBetter,
    /// "better".
    Better,
    /// "slightly better".
    SlightlyBetter,
    /// "negligibly better / unsure".
    NegligiblyBetter,
}

/// Which of Llama 2's margin tables (Touvron et al. 2023, Table 28) maps a [`Degree`] to a margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarginTable {
    /// Margin small: 1, 2/3, 1/3, 0 (the default: Llama 2 found it the safer choice).
    #[default]
    Small,
    /// Margin large: 3, 2, 1, 0.
    Large,
}

impl Degree {
    /// The accepted spellings, for messages.
    pub const NAMES: &'static str =
        "significantly_better, better, slightly_better or negligibly_better";

    /// Parses `significantly_better`, `Significantly Better`, `slightly-better`, `unsure`, ...
    pub fn parse(s: &str) -> Option<Self> {
        let norm: String = s
            .trim()
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c == ' ' || c == '-' { '_' } else { c })
            .collect();
        match norm.as_str() {
            "significantly_better" => Some(Degree::SignificantlyBetter),
            "better" => Some(Degree::Better),
            "slightly_better" => Some(Degree::SlightlyBetter),
            // Llama 2's fourth level reads "negligibly better / unsure".
            "negligibly_better" | "unsure" | "negligibly_better_/_unsure" => {
                Some(Degree::NegligiblyBetter)
            }
            _ => None,
        }
    }

    /// The margin Llama 2's table gives this degree.
    pub fn margin(self, table: MarginTable) -> f32 {
        let level = match self {
            Degree::SignificantlyBetter => 3.0,
            Degree::Better => 2.0,
            Degree::SlightlyBetter => 1.0,
            Degree::NegligiblyBetter => 0.0,
        };
        match table {
            MarginTable::Small => level / 3.0,
            MarginTable::Large => level,
        }
    }
}

/// A safety label of one answer (Llama 2's safety reward model data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Safety {
    /// The answer is safe.
    Safe,
    /// The answer is unsafe.
    Unsafe,
}

/// Safety labels of both answers of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSafety {
    /// Label of the chosen answer.
    pub chosen: Safety,
    /// Label of the rejected answer.
    pub rejected: Safety,
}

/// A pairwise preference: `chosen` was preferred to `rejected`.
#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    /// Where the row came from.
    pub at: Location,
    /// The prompt; `None` for the implicit-prompt form (the prompt is inside both answers).
    pub prompt: Option<Content>,
    /// The preferred answer (or whole conversation, implicit form).
    pub chosen: Content,
    /// The other answer.
    pub rejected: Content,
    /// An explicit margin (`"margin"`), which wins over `degree`.
    pub margin: Option<f32>,
    /// A Llama 2 preference degree (`"degree"`).
    pub degree: Option<Degree>,
    /// Safety labels (`"safety"`).
    pub safety: Option<PairSafety>,
}

impl Preference {
    /// The margin of the pair: `margin` if given, else `degree` through `table`, else `None`.
    pub fn margin(&self, table: MarginTable) -> Option<f32> {
        self.margin.or_else(|| self.degree.map(|d| d.margin(table)))
    }
}

/// K answers to one prompt ranked best first (InstructGPT): stands for every pair of answers
/// in different places.
///
/// The ranking is a list of groups, best first. A file's flat form `[2, 0, 1]` (a permutation
/// of `0..K`) is read as groups of one, `[[2], [0], [1]]`, and gives all K(K-1)/2 pairs. The
/// grouped form (`[[1], [0, 2]]`, or mixed: `[1, [0, 2]]`) allows ties, answers in one group,
/// which give no pair between them, and partial rankings: responses in no group are unranked
/// and give no pair at all (an annotator's "I cannot tell these apart").
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    /// Where the row came from.
    pub at: Location,
    /// The prompt.
    pub prompt: Content,
    /// The K answers.
    pub responses: Vec<Content>,
    /// Groups of indices into `responses`, best first: at least two non-empty groups, each
    /// index in at most one group; answers in one group are tied.
    pub ranking: Vec<Vec<usize>>,
}

impl Ranking {
    /// Every `(better, worse)` index pair of answers in different groups: for groups `i < j`,
    /// each answer of group `i` with each of group `j`, ordered by `i`, then the better
    /// answer's place in its group, then `j`, then the worse one's place. Without ties this
    /// is all K(K-1)/2 pairs `(ranking[i], ranking[j])` of the flat form, by `i` then `j`.
    pub fn index_pairs(&self) -> Vec<(usize, usize)> {
        let g = &self.ranking;
        let mut out = Vec::with_capacity(self.num_pairs());
        for i in 0..g.len() {
            for &better in &g[i] {
                for worse_group in &g[i + 1..] {
                    out.extend(worse_group.iter().map(|&worse| (better, worse)));
                }
            }
        }
        out
    }

    /// How many pairs [`Ranking::index_pairs`] gives: `(n² − Σ gᵢ²) / 2` for `n` ranked
    /// answers in groups of sizes `gᵢ`.
    pub fn num_pairs(&self) -> usize {
        let n: usize = self.ranking.iter().map(Vec::len).sum();
        let same: usize = self.ranking.iter().map(|g| g.len() * g.len()).sum();
        (n * n - same) / 2
    }

    /// The indices of the responses that are ranked (in some group), best first.
    pub fn ranked(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranking.iter().flatten().copied()
    }

    /// The pairs as preferences (no margin), in [`Ranking::index_pairs`] order.
    pub fn to_pairs(&self) -> Vec<Preference> {
        self.index_pairs()
            .into_iter()
            .map(|(better, worse)| Preference {
                at: self.at.clone(),
                prompt: Some(self.prompt.clone()),
                chosen: self.responses[better].clone(),
                rejected: self.responses[worse].clone(),
                margin: None,
                degree: None,
                safety: None,
            })
            .collect()
    }
}

/// One row of a preference file: a pair or a ranking.
#[derive(Debug, Clone, PartialEq)]
pub enum Comparison {
    /// A pairwise preference.
    Pair(Preference),
    /// A ranking of K answers.
    Ranking(Ranking),
}

impl Comparison {
    /// Where the row came from.
    pub fn at(&self) -> &Location {
        match self {
            Comparison::Pair(p) => &p.at,
            Comparison::Ranking(r) => &r.at,
        }
    }

    /// The row's pairs: itself, or a ranking's pairs (K(K-1)/2 without ties).
    pub fn pairs(&self) -> Vec<Preference> {
        match self {
            Comparison::Pair(p) => vec![p.clone()],
            Comparison::Ranking(r) => r.to_pairs(),
        }
    }

    /// How many pairs [`Comparison::pairs`] gives.
    pub fn num_pairs(&self) -> usize {
        match self {
            Comparison::Pair(_) => 1,
            Comparison::Ranking(r) => r.num_pairs(),
        }
    }
}

/// One completion judged on its own (KTO's binary feedback): desirable or not.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedPreference {
    /// Where the row came from.
    pub at: Location,
    /// The prompt.
    pub prompt: Content,
    /// The completion the label is about (the same kind as the prompt).
    pub completion: Content,
    /// `true`: desirable (a thumbs-up), `false`: undesirable.
    pub label: bool,
}

/// A prompt for generation (PPO rollouts, sampling, scoring).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    /// Where the row came from.
    pub at: Location,
    /// `"prompt"` (text or messages) or `"messages"`.
    pub prompt: Content,
    /// `"tags"`, e.g. `["safety"]` to route the prompt to a safety reward model.
    pub tags: Vec<String>,
    /// The whole input row, so outputs can be "the input row plus completion, score, ...".
    pub row: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_follow_llama2_tables() {
        let small: Vec<f32> = [
            Degree::SignificantlyBetter,
            Degree::Better,
            Degree::SlightlyBetter,
            Degree::NegligiblyBetter,
        ]
        .iter()
        .map(|d| d.margin(MarginTable::Small))
        .collect();
        assert_eq!(small, [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]);
        assert_eq!(Degree::Better.margin(MarginTable::Large), 2.0);
        assert_eq!(
            Degree::parse("Slightly Better"),
            Some(Degree::SlightlyBetter)
        );
        assert_eq!(Degree::parse("unsure"), Some(Degree::NegligiblyBetter));
        assert_eq!(Degree::parse("much better"), None);
    }
}
