//! A pairwise judge: a language model asked which of two responses better answers an
//! instruction, read off its next-token probabilities of "1" and "2" as RLAIF does (Lee et al.
//! 2023, §2.1: the log-probs of the two answer tokens, softmax-normalised against each other).
//!
//! LLM judges favour whichever answer they see first, so [`PairwiseJudgeApi::judge`] asks in
//! both orders and calls a win only when both orders agree. The both-orders logic sits on the
//! [`PairwiseJudgeApi`] trait, so a fake judge tests it and an OpenAI-compatible endpoint can
//! implement it later; [`PairwiseJudge`] is the local-model implementation.

use std::path::Path;

use candle_core::{DType, Tensor};
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use rlhf_model::{Batch, Heads, LoadOptions, Model};
use serde::{Deserialize, Serialize};

use crate::stats::Verdict;
use crate::{Error, Result};

/// The default judge prompt. It ends with RLAIF's "Preferred Response=" so that the next token
/// is the bare digit with no leading space (see [`PairwiseJudge::answer_ids`]).
pub const DEFAULT_TEMPLATE: &str = "\
You are comparing two responses to an instruction. A good response follows the instruction, \
is correct, helpful and honest, and is no longer than it needs to be. Judge the content, not \
the order or the length of the responses.

Instruction:
{prompt}

Response 1:
{response_1}

Response 2:
{response_2}

Which response is better? Answer 1 or 2.
Preferred Response=";

/// The placeholders a template must hold, each once or more.
const PLACEHOLDERS: [&str; 3] = ["{prompt}", "{response_1}", "{response_2}"];

/// One worked example shown to the judge before the pair it labels (RLAIF's few-shot
/// exemplars): the template filled with it, followed by the preferred answer's digit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShot {
    /// The instruction.
    pub prompt: String,
    /// The response shown first.
    pub response_1: String,
    /// The response shown second.
    pub response_2: String,
    /// 1 or 2: the better response.
    pub preferred: u8,
}

/// What the judge reads, in RLAIF's order (Lee et al. 2023, §2.1): a preamble describing the
/// task, optional few-shot exemplars, then the pair to label, the template ending where the
/// answer digit comes next.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgePrompt {
    /// Text before everything else (a blank line follows it).
    pub preamble: Option<String>,
    /// Worked examples, each the filled template and its answer digit.
    pub few_shot: Vec<FewShot>,
    /// The per-pair text with `{prompt}`, `{response_1}` and `{response_2}`.
    pub template: String,
}

impl JudgePrompt {
    /// A prompt of `template` alone.
    pub fn template(template: impl Into<String>) -> Self {
        Self {
            preamble: None,
            few_shot: Vec::new(),
            template: template.into(),
        }
    }

    /// Checks the template's placeholders and the examples' answers.
    pub fn check(&self) -> Result<()> {
        for p in PLACEHOLDERS {
            if !self.template.contains(p) {
                return Err(Error::invalid(
                    "judge template",
                    format!("{:?}", self.template),
                    format!("a template holding {p} (and {})", PLACEHOLDERS.join(", ")),
                ));
            }
        }
        for (i, ex) in self.few_shot.iter().enumerate() {
            if !matches!(ex.preferred, 1 | 2) {
                return Err(Error::invalid(
                    format!("few_shot[{i}].preferred"),
                    ex.preferred,
                    "1 or 2",
                ));
            }
        }
        Ok(())
    }

    /// The judge's text for one pair: preamble, exemplars, then the filled template.
    pub fn render(&self, prompt: &str, first: &str, second: &str) -> String {
        let mut out = String::new();
        if let Some(p) = self.preamble.as_deref().filter(|p| !p.trim().is_empty()) {
            out.push_str(p.trim_end());
            out.push_str("\n\n");
        }
        for ex in &self.few_shot {
            out.push_str(&fill(
                &self.template,
                &ex.prompt,
                &ex.response_1,
                &ex.response_2,
            ));
            out.push_str(&ex.preferred.to_string());
            out.push_str("\n\n");
        }
        out.push_str(&fill(&self.template, prompt, first, second));
        out
    }
}

/// One pair's judgement in both orders (eval.json keeps both probabilities).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairJudgement {
    /// Policy if both orders prefer the policy, baseline if both prefer the baseline, else tie.
    pub verdict: Verdict,
    /// P(policy better) with the policy shown as response 1.
    pub p_policy_shown_first: f64,
    /// P(policy better) with the policy shown as response 2.
    pub p_policy_shown_second: f64,
}

impl PairJudgement {
    /// The judgement from P(policy better) in each order: a win only when both exceed ½, a
    /// loss only when both fall below ½, anything else (disagreement, exactly ½, NaN) a tie.
    pub fn from_orders(p_policy_shown_first: f64, p_policy_shown_second: f64) -> Self {
        let (a, b) = (p_policy_shown_first, p_policy_shown_second);
        let verdict = if a > 0.5 && b > 0.5 {
            Verdict::Policy
        } else if a < 0.5 && b < 0.5 {
            Verdict::Baseline
        } else {
            Verdict::Tie
        };
        Self {
            verdict,
            p_policy_shown_first: a,
            p_policy_shown_second: b,
        }
    }

    /// RLAIF's position-debiased preference: the mean of the two orders' P(policy better).
    pub fn p_policy(&self) -> f64 {
        0.5 * (self.p_policy_shown_first + self.p_policy_shown_second)
    }
}

/// Anything that can say how likely the first of two responses is the better one: a local
/// model ([`PairwiseJudge`]), a fake in tests, an OpenAI-compatible endpoint.
pub trait PairwiseJudgeApi {
    /// P(response 1 is better) for each `(prompt, response_1, response_2)`, in order.
    fn prob_first_batch(&self, pairs: &[(&str, &str, &str)]) -> Result<Vec<f64>>;

    /// P(`first` is better than `second`) as answers to `prompt`.
    fn prob_first(&self, prompt: &str, first: &str, second: &str) -> Result<f64> {
        Ok(self.prob_first_batch(&[(prompt, first, second)])?[0])
    }

    /// Judges `policy` against `baseline` in both orders (see [`PairJudgement::from_orders`]).
    fn judge(&self, prompt: &str, policy: &str, baseline: &str) -> Result<PairJudgement> {
        Ok(self.judge_batch(&[(prompt, policy, baseline)])?[0])
    }

    /// [`judge`](Self::judge) for many `(prompt, policy, baseline)` rows: both orders of every
    /// row go to one [`prob_first_batch`](Self::prob_first_batch) call.
    fn judge_batch(&self, rows: &[(&str, &str, &str)]) -> Result<Vec<PairJudgement>> {
        let queries: Vec<(&str, &str, &str)> = rows
            .iter()
            .copied()
            .chain(rows.iter().map(|&(p, policy, base)| (p, base, policy)))
            .collect();
        let probs = self.prob_first_batch(&queries)?;
        if probs.len() != queries.len() {
            return Err(Error::Config(format!(
                "pairwise judge returned {} probabilities for {} pairs",
                probs.len(),
                queries.len()
            )));
        }
        let (policy_first, baseline_first) = probs.split_at(rows.len());
        Ok(policy_first
            .iter()
            .zip(baseline_first)
            .map(|(&a, &b)| PairJudgement::from_orders(a, 1.0 - b))
            .collect())
    }
}

/// A local causal LM used as a pairwise judge.
pub struct PairwiseJudge {
    model: Model,
    tok: Tokenizer,
    prompt: JudgePrompt,
    /// Render the text as the user's turn through the tokenizer's chat template (when it has
    /// one); else encode it as raw text.
    chat: bool,
    /// Token ids of the answers "1" and "2" as the template's end makes them the next token.
    answer_ids: [u32; 2],
    /// The longest input the model's positions allow, where config.json says.
    max_positions: Option<usize>,
    batch_size: usize,
}

impl PairwiseJudge {
    /// Loads the judge model (an HF directory, or a PEFT adapter directory merged into its
    /// base) and its tokenizer; `template` replaces [`DEFAULT_TEMPLATE`] and must hold
    /// `{prompt}`, `{response_1}` and `{response_2}`. When the tokenizer has a chat template,
    /// the filled template is the user's turn of a one-turn conversation, rendered with the
    /// generation prompt (as `rlhf_data::prompt_ids` builds a conversational prompt);
    /// otherwise it is the text itself, encoded with the tokenizer's special tokens.
    pub fn load(dir: &Path, template: Option<String>) -> Result<Self> {
        let template = template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        Self::load_with(dir, JudgePrompt::template(template), true)
    }

    /// [`load`](Self::load) with a whole [`JudgePrompt`] (preamble, few-shot exemplars,
    /// template); `chat = false` encodes the text raw even where the tokenizer has a chat
    /// template.
    pub fn load_with(dir: &Path, prompt: JudgePrompt, chat: bool) -> Result<Self> {
        prompt.check()?;
        let model = Model::load(
            dir,
            &LoadOptions {
                heads: Heads::Lm,
                ..Default::default()
            },
        )?;
        let tok = Tokenizer::from_dir(dir)?;
        let max_positions = ["max_position_embeddings", "n_positions"]
            .iter()
            .find_map(|k| model.raw_config.get(*k)?.as_u64())
            .map(|n| n as usize);
        let mut judge = Self {
            model,
            tok,
            prompt,
            chat,
            answer_ids: [0, 0],
            max_positions,
            batch_size: 8,
        };
        judge.answer_ids = judge.find_answer_ids()?;
        tracing::debug!(
            answer_ids = ?judge.answer_ids,
            chat = judge.chat && judge.tok.chat_template().is_some(),
            "pairwise judge loaded from {}",
            dir.display()
        );
        Ok(judge)
    }

    /// How many queries share one forward pass (default 8; at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The token ids of "1" and "2" that the judge's probabilities are read from.
    ///
    /// Which form of the digit comes next depends on the template's end and the tokenizer: a
    /// byte-level BPE writes " 1" (after "is:") as one token `Ġ1` but "1" (after "=" or a
    /// newline) as `1`. So at load the template is filled with placeholder text and the forms
    /// "1" then " 1" are tried: a form is taken when appending it (and its "2" twin) to the
    /// judge's input adds exactly one token each, two different ones, to the input's own ids.
    /// The default template ends in "=", where every tokenizer seen so far takes "1".
    pub fn answer_ids(&self) -> [u32; 2] {
        self.answer_ids
    }

    fn find_answer_ids(&self) -> Result<[u32; 2]> {
        let (text, special) = self.input_text("x", "x", "x")?;
        let base = self.tok.encode(&text, special)?;
        let next = |answer: &str| -> Result<Option<u32>> {
            let ids = self.tok.encode(&format!("{text}{answer}"), special)?;
            Ok((ids.len() == base.len() + 1 && ids.starts_with(&base)).then(|| ids[base.len()]))
        };
        for (one, two) in [("1", "2"), (" 1", " 2")] {
            if let (Some(a), Some(b)) = (next(one)?, next(two)?) {
                if a != b {
                    return Ok([a, b]);
                }
            }
        }
        let tail: String = {
            let chars: Vec<char> = text.chars().collect();
            chars[chars.len().saturating_sub(40)..].iter().collect()
        };
        Err(Error::Config(format!(
            "judge template: neither \"1\"/\"2\" nor \" 1\"/\" 2\" is a single next token after \
             the judge's input, which ends {tail:?}: end the template so that the answer digit \
             is its own token (e.g. with \"Preferred Response=\")"
        )))
    }

    /// The judge's input text for one query and whether to encode it with special tokens.
    fn input_text(&self, prompt: &str, first: &str, second: &str) -> Result<(String, bool)> {
        self.wrap(self.prompt.render(prompt, first, second))
    }

    /// The judge's text for a rendered query ([`JudgePrompt::render`]): the user's turn of a
    /// one-turn conversation, or the text itself; and whether to encode it with special tokens.
    fn wrap(&self, filled: String) -> Result<(String, bool)> {
        if self.chat && self.tok.chat_template().is_some() {
            let chat = [ChatMessage::new("user", filled)];
            // Rendered text carries its own BOS: encoded without special tokens.
            Ok((self.tok.apply_chat_template(&chat, true)?, false))
        } else {
            Ok((filled, true))
        }
    }

    /// The judge's input ids for one query: the ids `rlhf_data::prompt_ids` gives the filled
    /// template as a text row, or as a one-turn user conversation where there is a chat
    /// template (tested against it), built from [`input_text`](Self::input_text) so that the
    /// answer-token probe at load sees exactly what queries see.
    fn input_ids(&self, prompt: &str, first: &str, second: &str) -> Result<Vec<u32>> {
        self.rendered_ids(self.prompt.render(prompt, first, second))
    }

    fn rendered_ids(&self, rendered: String) -> Result<Vec<u32>> {
        let (text, special) = self.wrap(rendered)?;
        let ids = self.tok.encode(&text, special)?;
        if let Some(max) = self.max_positions {
            if ids.len() > max {
                return Err(Error::Config(format!(
                    "a judge input is {} tokens and the judge model reads at most {max} \
                     (config.json's positions): use a judge with a longer context, shorter \
                     completions (max_new_tokens) or a shorter template",
                    ids.len()
                )));
            }
        }
        Ok(ids)
    }

    /// One forward pass over left-padded queries: P("1") / (P("1") + P("2")) at each row's
    /// last position.
    fn forward(&self, seqs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let pad = self
            .tok
            .pad_or_eos_token_id()
            .or(self.model.config.pad_token_id)
            .unwrap_or(0);
        // Left padding puts every row's last real token in the last column.
        let batch = Batch::pad(seqs, pad, true);
        let hidden = self.model.hidden(&batch)?;
        // hidden: (b, t, h) -> last: (b, 1, h) -> logits: (b, vocab)
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        let logits: Tensor = self.model.logits(&last)?.squeeze(1)?;
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let [one, two] = self.answer_ids.map(|i| i as usize);
        let mut mass = 0.0;
        let probs = logits
            .iter()
            .map(|row| {
                // log-probs of the two answers; the shared normaliser cancels in p, and the
                // answers' total probability says whether the judge follows the format.
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                let (l1, l2) = (row[one] as f64 - lse, row[two] as f64 - lse);
                mass += l1.exp() + l2.exp();
                1.0 / (1.0 + (l2 - l1).exp())
            })
            .collect();
        tracing::debug!(
            "judge: mean probability of the answers \"1\" or \"2\": {:.3}",
            mass / seqs.len() as f64
        );
        Ok(probs)
    }
}

impl PairwiseJudge {
    /// The judge's prompt (what [`JudgePrompt::render`] makes of a pair).
    pub fn prompt(&self) -> &JudgePrompt {
        &self.prompt
    }

    /// Whether queries are rendered through the tokenizer's chat template.
    pub fn uses_chat_template(&self) -> bool {
        self.chat && self.tok.chat_template().is_some()
    }

    /// P(response 1 is better) for queries already rendered by [`JudgePrompt::render`], in
    /// forward passes of the judge's batch size.
    pub fn prob_first_rendered(&self, rendered: &[String]) -> Result<Vec<f64>> {
        let ids = rendered
            .iter()
            .map(|r| self.rendered_ids(r.clone()))
            .collect::<Result<Vec<_>>>()?;
        self.prob_first_ids(&ids)
    }

    fn prob_first_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<f64>> {
        let was = self.model.set_grad_enabled(false);
        let out = (|| -> Result<Vec<f64>> {
            let mut probs = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(self.batch_size) {
                probs.extend(self.forward(chunk)?);
            }
            Ok(probs)
        })();
        self.model.set_grad_enabled(was);
        out
    }
}

impl PairwiseJudgeApi for PairwiseJudge {
    fn prob_first_batch(&self, pairs: &[(&str, &str, &str)]) -> Result<Vec<f64>> {
        let ids = pairs
            .iter()
            .map(|&(p, a, b)| self.input_ids(p, a, b))
            .collect::<Result<Vec<_>>>()?;
        self.prob_first_ids(&ids)
    }
}

/// The template with its placeholders filled in one pass, so that a placeholder written inside
/// a response is left as it is rather than filled in turn.
fn fill(template: &str, prompt: &str, first: &str, second: &str) -> String {
    let values = [prompt, first, second];
    let mut out = String::with_capacity(template.len() + prompt.len() + first.len() + second.len());
    let mut rest = template;
    loop {
        let next = PLACEHOLDERS
            .iter()
            .enumerate()
            .filter_map(|(i, p)| rest.find(p).map(|at| (at, i)))
            .min();
        let Some((at, i)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..at]);
        out.push_str(values[i]);
        rest = &rest[at + PLACEHOLDERS[i].len()..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_data::Content;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/models"
        ))
        .join(name)
    }

    /// Always prefers whichever response it is shown first.
    struct FirstPosition;
    impl PairwiseJudgeApi for FirstPosition {
        fn prob_first_batch(&self, pairs: &[(&str, &str, &str)]) -> Result<Vec<f64>> {
            Ok(vec![0.9; pairs.len()])
        }
    }

    /// Prefers the longer response, in either position; equal lengths are a coin flip.
    struct Longer;
    impl PairwiseJudgeApi for Longer {
        fn prob_first_batch(&self, pairs: &[(&str, &str, &str)]) -> Result<Vec<f64>> {
            Ok(pairs
                .iter()
                .map(|(_, a, b)| match a.len().cmp(&b.len()) {
                    std::cmp::Ordering::Greater => 0.8,
                    std::cmp::Ordering::Less => 0.2,
                    std::cmp::Ordering::Equal => 0.5,
                })
                .collect())
        }
    }

    #[test]
    fn a_position_biased_judge_only_ties() {
        let rows = [
            ("q", "long answer", "short"),
            ("q", "a", "bbb"),
            ("q", "x", "y"),
        ];
        let js = FirstPosition.judge_batch(&rows).unwrap();
        assert_eq!(js.len(), 3);
        for j in &js {
            assert_eq!(j.verdict, Verdict::Tie, "{j:?}");
            assert!((j.p_policy_shown_first - 0.9).abs() < 1e-12);
            assert!((j.p_policy_shown_second - 0.1).abs() < 1e-12);
            assert!((j.p_policy() - 0.5).abs() < 1e-12);
        }
    }

    #[test]
    fn a_consistent_judge_gives_wins_and_losses() {
        let j = Longer.judge("q", "a longer answer", "short").unwrap();
        assert_eq!(j.verdict, Verdict::Policy, "{j:?}");
        assert!((j.p_policy_shown_first - 0.8).abs() < 1e-12);
        assert!((j.p_policy_shown_second - 0.8).abs() < 1e-12);
        let j = Longer.judge("q", "short", "a longer answer").unwrap();
        assert_eq!(j.verdict, Verdict::Baseline, "{j:?}");
        assert_eq!(
            Longer.judge("q", "same", "size").unwrap().verdict,
            Verdict::Tie
        );
        let json = serde_json::to_value(j).unwrap();
        assert_eq!(json["verdict"], "baseline");
    }

    #[test]
    fn from_orders_needs_both_orders_to_agree() {
        assert_eq!(
            PairJudgement::from_orders(0.6, 0.7).verdict,
            Verdict::Policy
        );
        assert_eq!(
            PairJudgement::from_orders(0.4, 0.1).verdict,
            Verdict::Baseline
        );
        assert_eq!(PairJudgement::from_orders(0.6, 0.4).verdict, Verdict::Tie);
        assert_eq!(PairJudgement::from_orders(0.5, 0.9).verdict, Verdict::Tie);
        assert_eq!(
            PairJudgement::from_orders(f64::NAN, 0.9).verdict,
            Verdict::Tie
        );
    }

    #[test]
    fn fill_is_one_pass() {
        let t = "P={prompt} A={response_1} B={response_2} again {prompt}";
        assert_eq!(
            fill(t, "q", "{response_2}", "b"),
            "P=q A={response_2} B=b again q"
        );
    }

    #[test]
    fn a_template_without_a_placeholder_is_refused() {
        let err = PairwiseJudge::load(&fixture("llama-gqa"), Some("{prompt} {response_1}".into()))
            .err()
            .expect("template without {response_2} accepted");
        assert!(err.to_string().contains("{response_2}"), "{err}");
    }

    /// The tiny Llama fixture (random weights) as a judge: finite probabilities strictly inside
    /// (0, 1), the same in a padded batch as alone, and `judge` built from them.
    #[test]
    fn llama_fixture_judge_batches_like_single_queries() {
        let judge = PairwiseJudge::load(&fixture("llama-gqa"), None)
            .unwrap()
            .with_batch_size(4);
        // The fixture's byte-level BPE: "1" and "2" are ids 18 and 19 (its tokenizer.json).
        assert_eq!(judge.answer_ids(), [18, 19]);
        // The template is long for a 128-position model: keep the texts short.
        let judge = PairwiseJudge {
            prompt: JudgePrompt::template("{prompt}|{response_1}|{response_2}|Preferred Response="),
            ..judge
        };
        let pairs = [
            ("Name a colour.", "Blue.", "I like the sky, which is blue."),
            ("2+2?", "4", "five"),
            ("Say hi.", "Hello there, friend!", "hi"),
        ];
        let batched = judge.prob_first_batch(&pairs).unwrap();
        assert_eq!(batched.len(), 3);
        for (&(p, a, b), &pb) in pairs.iter().zip(&batched) {
            let alone = judge.prob_first(p, a, b).unwrap();
            assert!(alone.is_finite() && alone > 0.0 && alone < 1.0, "{alone}");
            assert!((alone - pb).abs() < 1e-5, "batched {pb} vs alone {alone}");
        }
        // Different inputs give different probabilities (the padding did not hide them).
        assert!((batched[0] - batched[1]).abs() > 1e-9, "{batched:?}");
        let j = judge.judge(pairs[1].0, pairs[1].1, pairs[1].2).unwrap();
        let swapped = judge
            .prob_first(pairs[1].0, pairs[1].2, pairs[1].1)
            .unwrap();
        assert!((j.p_policy_shown_first - batched[1]).abs() < 1e-5);
        assert!((j.p_policy_shown_second - (1.0 - swapped)).abs() < 1e-5);
        // The input ids are `prompt_ids` of the filled template as a text row.
        let ids = judge.input_ids("a", "b", "c").unwrap();
        let text = Content::Text("a|b|c|Preferred Response=".into());
        assert_eq!(ids, rlhf_data::prompt_ids(&judge.tok, &text).unwrap());
        // An input past the model's 128 positions is an error that says so.
        let long = "word ".repeat(200);
        let err = judge.prob_first("q", &long, "b").unwrap_err();
        assert!(err.to_string().contains("at most 128"), "{err}");
    }

    /// With a chat template the filled template is the user's turn; the answer digit after the
    /// generation prompt is still found and the probabilities are proper.
    #[test]
    fn chat_template_judge() {
        let dir = tempfile::tempdir().unwrap();
        let src = fixture("llama-gqa");
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let cfg_text = std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
        cfg["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
             {% if add_generation_prompt %}<assistant>{% endif %}"
            .into();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        let judge = PairwiseJudge::load(
            dir.path(),
            Some("{prompt}/{response_1}/{response_2}".into()),
        )
        .unwrap();
        assert_eq!(judge.answer_ids(), [18, 19]);
        let (text, special) = judge.input_text("q", "a", "b").unwrap();
        assert_eq!(text, "<user>q/a/b\n<assistant>");
        assert!(!special);
        let conv = Content::Messages(vec![ChatMessage::new("user", "q/a/b")]);
        assert_eq!(
            judge.input_ids("q", "a", "b").unwrap(),
            rlhf_data::prompt_ids(&judge.tok, &conv).unwrap()
        );
        let p = judge.prob_first("q", "a", "b").unwrap();
        assert!(p.is_finite() && p > 0.0 && p < 1.0, "{p}");
    }
}
