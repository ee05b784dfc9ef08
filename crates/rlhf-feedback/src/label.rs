//! The task kinds and what one annotator's label of an item holds.
//!
//! Labels are stored as JSON (`labels.value`), in the shapes of [`Label`]'s variants:
//!
//! - pairwise: `{"choice": "a"|"b"|"tie"|"both_bad", "degree": "better", "safety": ["safe", "unsafe"]}`
//!   (`degree` only with `a`/`b`: Llama 2's four levels; `safety` one entry per answer, each
//!   `"safe"`, `"unsafe"` or `null` for not judged);
//! - rank: `{"ranking": [[2], [0, 3]]}`: groups best first, answers in one group tied,
//!   answers in no group left unranked (a partial ranking);
//! - single: `{"thumb": "up"|"down", "rewrite": "..."}` (`rewrite` optional);
//! - demo: `{"text": "..."}`.
//!
//! Every label may carry `"comment"` (free text) and `"tags"` (a list of strings).

use rlhf_data::{Degree, Safety};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What annotators do with a project's items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Choose the better of two answers, by how much, with a safety label per answer.
    Pairwise,
    /// Rank K answers; ties and partial rankings allowed.
    Rank,
    /// Thumbs up/down on one answer, with an optional rewrite.
    Single,
    /// Write a demonstration (InstructGPT's step 1).
    Demo,
}

impl Kind {
    /// All kinds, in the order pages list them.
    pub const ALL: [Kind; 4] = [Kind::Pairwise, Kind::Rank, Kind::Single, Kind::Demo];

    /// The name used in the database, on the command line and in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pairwise => "pairwise",
            Kind::Rank => "rank",
            Kind::Single => "single",
            Kind::Demo => "demo",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown task kind {s:?}; use pairwise, rank, single or demo"
                ))
            })
    }

    /// How many candidate answers an item of this kind needs: (min, max).
    pub fn candidates(self) -> (usize, usize) {
        match self {
            Kind::Pairwise => (2, 2),
            Kind::Rank => (2, 64),
            Kind::Single => (1, 1),
            Kind::Demo => (0, 0),
        }
    }

    /// The kind a row with `n` candidate answers suggests when none is given.
    pub fn for_candidates(n: usize) -> Kind {
        match n {
            0 => Kind::Demo,
            1 => Kind::Single,
            2 => Kind::Pairwise,
            _ => Kind::Rank,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The choice of a pairwise label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    /// Answer A (the first) is better.
    A,
    /// Answer B (the second) is better.
    B,
    /// Equally good.
    Tie,
    /// Neither is acceptable (Open-Assistant's "all answers are bad").
    BothBad,
}

impl Choice {
    /// The name stored and exported.
    pub fn as_str(self) -> &'static str {
        match self {
            Choice::A => "a",
            Choice::B => "b",
            Choice::Tie => "tie",
            Choice::BothBad => "both_bad",
        }
    }
}

/// Thumbs up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Thumb {
    /// Acceptable.
    Up,
    /// Not acceptable.
    Down,
}

/// One annotator's label of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Label {
    /// A pairwise judgement.
    Pairwise {
        /// Which answer is better.
        choice: Choice,
        /// By how much (with `a`/`b` only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        degree: Option<Degree>,
        /// A safety label per answer (`None`: not judged).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        safety: Vec<Option<Safety>>,
        /// Free-text comment and tags.
        #[serde(flatten)]
        notes: Notes,
    },
    /// A ranking: groups of answer indices, best first; one group's answers are tied.
    Rank {
        /// The groups.
        ranking: Vec<Vec<usize>>,
        /// Comment and tags.
        #[serde(flatten)]
        notes: Notes,
    },
    /// Thumbs up/down on one answer.
    Single {
        /// The verdict.
        thumb: Thumb,
        /// A corrected answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rewrite: Option<String>,
        /// Comment and tags.
        #[serde(flatten)]
        notes: Notes,
    },
    /// A demonstration written for the prompt.
    Demo {
        /// The answer the annotator wrote.
        text: String,
        /// Comment and tags.
        #[serde(flatten)]
        notes: Notes,
    },
}

/// What every label may carry besides its judgement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Notes {
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Tags such as `"safety"` or `"factual_error"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl Label {
    /// The kind of task this label answers.
    pub fn kind(&self) -> Kind {
        match self {
            Label::Pairwise { .. } => Kind::Pairwise,
            Label::Rank { .. } => Kind::Rank,
            Label::Single { .. } => Kind::Single,
            Label::Demo { .. } => Kind::Demo,
        }
    }

    /// The comment and tags.
    pub fn notes(&self) -> &Notes {
        match self {
            Label::Pairwise { notes, .. }
            | Label::Rank { notes, .. }
            | Label::Single { notes, .. }
            | Label::Demo { notes, .. } => notes,
        }
    }

    /// Checks the label against its task: the kind, and indices against `n` answers.
    pub fn validate(&self, kind: Kind, n: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.kind() != kind {
            return bad(format!(
                "a {} label was given for a {kind} task",
                self.kind()
            ));
        }
        match self {
            Label::Pairwise {
                choice,
                degree,
                safety,
                ..
            } => {
                if degree.is_some() && !matches!(choice, Choice::A | Choice::B) {
                    return bad(format!(
                        "a degree goes with choice a or b, not {}",
                        choice.as_str()
                    ));
                }
                if !safety.is_empty() && safety.len() != n {
                    return bad(format!(
                        "safety has {} entries for {n} answers",
                        safety.len()
                    ));
                }
            }
            Label::Rank { ranking, .. } => {
                let mut seen = vec![false; n];
                let mut ranked = 0;
                for g in ranking {
                    if g.is_empty() {
                        return bad("a ranking group is empty".into());
                    }
                    for &i in g {
                        if i >= n {
                            return bad(format!("answer {i} does not exist ({n} answers)"));
                        }
                        if std::mem::replace(&mut seen[i], true) {
                            return bad(format!("answer {} is ranked twice", i + 1));
                        }
                        ranked += 1;
                    }
                }
                if ranked < 2 || ranking.len() < 2 {
                    return bad("a ranking needs at least two answers in different places".into());
                }
            }
            Label::Single { rewrite, .. } => {
                if rewrite.as_deref().is_some_and(|r| r.trim().is_empty()) {
                    return bad("the rewrite is empty".into());
                }
            }
            Label::Demo { text, .. } => {
                if text.trim().is_empty() {
                    return bad("the demonstration is empty".into());
                }
            }
        }
        Ok(())
    }

    /// Parses a stored label of a known kind (the untagged enum alone cannot tell a rank
    /// label without notes from others reliably, so the kind picks the variant).
    pub fn from_json(kind: Kind, value: &str) -> Result<Label> {
        #[derive(Deserialize)]
        struct P {
            choice: Choice,
            #[serde(default)]
            degree: Option<Degree>,
            #[serde(default)]
            safety: Vec<Option<Safety>>,
            #[serde(flatten)]
            notes: Notes,
        }
        #[derive(Deserialize)]
        struct R {
            ranking: Vec<Vec<usize>>,
            #[serde(flatten)]
            notes: Notes,
        }
        #[derive(Deserialize)]
        struct S {
            thumb: Thumb,
            #[serde(default)]
            rewrite: Option<String>,
            #[serde(flatten)]
            notes: Notes,
        }
        #[derive(Deserialize)]
        struct D {
            text: String,
            #[serde(flatten)]
            notes: Notes,
        }
        let err = |e: serde_json::Error| Error::Invalid(format!("a stored {kind} label: {e}"));
        Ok(match kind {
            Kind::Pairwise => {
                let p: P = serde_json::from_str(value).map_err(err)?;
                Label::Pairwise {
                    choice: p.choice,
                    degree: p.degree,
                    safety: p.safety,
                    notes: p.notes,
                }
            }
            Kind::Rank => {
                let r: R = serde_json::from_str(value).map_err(err)?;
                Label::Rank {
                    ranking: r.ranking,
                    notes: r.notes,
                }
            }
            Kind::Single => {
                let s: S = serde_json::from_str(value).map_err(err)?;
                Label::Single {
                    thumb: s.thumb,
                    rewrite: s.rewrite,
                    notes: s.notes,
                }
            }
            Kind::Demo => {
                let d: D = serde_json::from_str(value).map_err(err)?;
                Label::Demo {
                    text: d.text,
                    notes: d.notes,
                }
            }
        })
    }

    /// The label as stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("labels serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_through_json() {
        let labels = [
            (
                Kind::Pairwise,
                Label::Pairwise {
                    choice: Choice::B,
                    degree: Some(Degree::SlightlyBetter),
                    safety: vec![Some(Safety::Unsafe), None],
                    notes: Notes {
                        comment: Some("A leaks an address".into()),
                        tags: vec!["privacy".into()],
                    },
                },
            ),
            (
                Kind::Rank,
                Label::Rank {
                    ranking: vec![vec![2], vec![0, 3]],
                    notes: Notes::default(),
                },
            ),
            (
                Kind::Single,
                Label::Single {
                    thumb: Thumb::Down,
                    rewrite: Some("Paris.".into()),
                    notes: Notes::default(),
                },
            ),
            (
                Kind::Demo,
                Label::Demo {
                    text: "Hello".into(),
                    notes: Notes::default(),
                },
            ),
        ];
        for (kind, l) in labels {
            let json = l.to_json();
            assert_eq!(Label::from_json(kind, &json).unwrap(), l, "{json}");
        }
        let json = r#"{"choice":"b","degree":"slightly_better","safety":["unsafe",null],"comment":"A leaks an address","tags":["privacy"]}"#;
        assert!(Label::from_json(Kind::Pairwise, json).is_ok());
    }

    #[test]
    fn validation_names_the_problem() {
        let tie_with_degree = Label::Pairwise {
            choice: Choice::Tie,
            degree: Some(Degree::Better),
            safety: vec![],
            notes: Notes::default(),
        };
        assert!(tie_with_degree.validate(Kind::Pairwise, 2).is_err());
        let twice = Label::Rank {
            ranking: vec![vec![0], vec![0]],
            notes: Notes::default(),
        };
        let e = twice.validate(Kind::Rank, 4).unwrap_err().to_string();
        assert!(e.contains("ranked twice"), "{e}");
        let all_tied = Label::Rank {
            ranking: vec![vec![0, 1, 2]],
            notes: Notes::default(),
        };
        assert!(all_tied.validate(Kind::Rank, 3).is_err());
        let partial = Label::Rank {
            ranking: vec![vec![3], vec![1]],
            notes: Notes::default(),
        };
        partial.validate(Kind::Rank, 4).unwrap();
        assert!(partial.validate(Kind::Pairwise, 4).is_err());
    }
}
