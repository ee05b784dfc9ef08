//! `rlhf feedback export`: labels out of the database, in the record formats the trainers read.
//!
//! Formats ([`Format`]):
//!
//! - `pairs` (`rlhf reward`, `rlhf dpo`): `{"prompt", "chosen", "rejected"}`, with Llama 2's
//!   `"degree"` and, when both answers have one, `"safety": {"chosen", "rejected"}`. From
//!   pairwise labels choosing a or b (a tie or both_bad prefers nothing and is left out), from
//!   rank labels (every pair of answers in different groups; tied or unranked answers give no
//!   pair), and from single-answer labels with a rewrite (the rewrite chosen over the answer).
//! - `rankings` (`rlhf reward`): `{"prompt", "responses", "ranking"}` from rank labels, a
//!   partial ranking reduced to the answers it ranks (re-indexed), ties written as groups
//!   (`"ranking": [[1], [0, 2]]`, which rlhf-data reads); pairwise a/b as a ranking of two.
//! - `sft` (`rlhf sft`): `{"prompt", "completion"}` from demonstrations, rewrites, and answers
//!   given a thumbs-up.
//! - `kto` (`rlhf kto`): `{"prompt", "completion", "label"}` from thumbs (a rewrite is a
//!   desirable completion), and from pairwise labels: a/b as the chosen answer desirable and
//!   the other not, both_bad as both undesirable.
//! - `labelstudio`: Label Studio's export JSON for pairwise tasks (one JSON array, not
//!   JSON lines), which `rlhf feedback import` reads back.
//! - `labels`: every label as stored (with its `label_id`), with its item, for analysis.
//!
//! Rows are per annotator ([`Aggregate::None`]), or one per item by majority
//! ([`Aggregate::Majority`]): pairwise by the most common choice (no single most common
//! choice: left out), with the most common degree among its voters (a tie goes to the weaker
//! degree) and each answer's safety by the majority of those who judged it; single answers by
//! the most common thumb, every rewrite kept; rankings by Borda count (each answer's mean
//! group position over the annotators who ranked it, equal means tied); demonstrations per
//! annotator.
//!
//! Every row carries `"item_id"`; `"annotator"` (per annotator, and for rows that are never
//! aggregated: rewrites and demonstrations) or `"annotators"` and `"agreement"` (majority: the
//! winning share of the votes); `"lead_time"` in seconds when known (majority: the mean); the
//! label's `"comment"` (per annotator); `"tags"` (the item's merged with the labels'); and the
//! item's other input fields. Item fields that the trainers or the importer would read as data
//! (`chosen`, `margin`, `safety`, `messages`, `answer1`, ...) are not copied, so an input
//! file's own labels never pass for the annotators'.
//!
//! Prompts and answers are written back as they were stored (text or a message list); a
//! written answer (a rewrite, a demonstration) to a message-list prompt is written as an
//! assistant message list, since a row's text fields must all be of one kind.
//!
//! [`export`] reads everything in one read transaction, so an export taken while the server
//! takes labels is one consistent snapshot; [`write_rows`] writes the file atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use rlhf_data::{Degree, Safety};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::agreement::{self, Agreement};
use crate::label::{Choice, Kind, Label, Notes, Thumb};
use crate::store::{Item, Project, Store, StoredLabel};
use crate::time::rfc3339;
use crate::{Error, Result};

/// What an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Preference pairs, for reward models and DPO.
    Pairs,
    /// Rankings with ties, for reward models.
    Rankings,
    /// Demonstrations, for SFT.
    Sft,
    /// Unpaired desirable/undesirable completions, for KTO.
    Kto,
    /// Label Studio's export JSON of pairwise tasks.
    LabelStudio,
    /// Every label as stored.
    Labels,
}

impl Format {
    /// Every format, in the order messages list them.
    pub const ALL: [Format; 6] = [
        Format::Pairs,
        Format::Rankings,
        Format::Sft,
        Format::Kto,
        Format::LabelStudio,
        Format::Labels,
    ];

    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Pairs => "pairs",
            Format::Rankings => "rankings",
            Format::Sft => "sft",
            Format::Kto => "kto",
            Format::LabelStudio => "labelstudio",
            Format::Labels => "labels",
        }
    }

    /// Parses a format name (`label-studio` and `label_studio` too).
    pub fn parse(s: &str) -> Result<Format> {
        let norm = s.trim().to_ascii_lowercase().replace(['-', '_'], "");
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == norm)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown export format {s:?}; use pairs, rankings, sft, kto, labelstudio or \
                     labels"
                ))
            })
    }

    /// The task kinds whose labels this format can hold.
    pub fn kinds(self) -> &'static [Kind] {
        match self {
            Format::Pairs => &[Kind::Pairwise, Kind::Rank, Kind::Single],
            Format::Rankings => &[Kind::Pairwise, Kind::Rank],
            Format::Sft => &[Kind::Single, Kind::Demo],
            Format::Kto => &[Kind::Pairwise, Kind::Single],
            Format::LabelStudio => &[Kind::Pairwise],
            Format::Labels => &Kind::ALL,
        }
    }

    /// Whether labels of `kind` can be exported in this format.
    pub fn uses(self, kind: Kind) -> bool {
        self.kinds().contains(&kind)
    }

    /// The file extension [`write_rows`] writes: `json` for Label Studio, else `jsonl`.
    pub fn extension(self) -> &'static str {
        match self {
            Format::LabelStudio => "json",
            _ => "jsonl",
        }
    }

    /// The formats that can hold labels of `kind`, for messages.
    fn for_kind(kind: Kind) -> String {
        let names: Vec<&str> = Format::ALL
            .into_iter()
            .filter(|f| f.uses(kind))
            .map(Format::as_str)
            .collect();
        names.join(", ")
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per annotator, or one row per item by majority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// One row per label (per annotator).
    #[default]
    None,
    /// One row per item, by majority (rankings by Borda count).
    Majority,
}

impl Aggregate {
    /// The name on the command line and in pipeline configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::None => "none",
            Aggregate::Majority => "majority",
        }
    }

    /// Parses `none` or `majority`.
    pub fn parse(s: &str) -> Result<Aggregate> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Aggregate::None),
            "majority" => Ok(Aggregate::Majority),
            _ => Err(Error::Invalid(format!(
                "unknown aggregation {s:?}; use none (a row per annotator) or majority (a row \
                 per item)"
            ))),
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The record format.
    pub format: Format,
    /// Per annotator or by majority.
    pub aggregate: Aggregate,
    /// One project by name; `None`: every project whose kind the format can use.
    pub project: Option<String>,
}

/// What an export found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExportReport {
    /// Rows written (Label Studio: tasks).
    pub rows: usize,
    /// Labels read from the exported projects.
    pub labels_read: usize,
    /// Labels (per annotator) or items (by majority) that gave no row, by reason.
    pub left_out: Vec<(String, usize)>,
}

impl ExportReport {
    fn leave_out(&mut self, reason: &str) {
        match self.left_out.iter_mut().find(|(r, _)| r == reason) {
            Some((_, n)) => *n += 1,
            None => self.left_out.push((reason.to_string(), 1)),
        }
    }

    /// How many labels or items were left out, for every reason.
    pub fn left_out_total(&self) -> usize {
        self.left_out.iter().map(|(_, n)| n).sum()
    }
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rows from {} labels", self.rows, self.labels_read)?;
        if !self.left_out.is_empty() {
            let parts: Vec<String> = self
                .left_out
                .iter()
                .map(|(r, n)| format!("{n} {r}"))
                .collect();
            write!(f, "; left out: {}", parts.join(", "))?;
        }
        Ok(())
    }
}

// Reasons a label (or an item, by majority) gives no row.
const TIE: &str = "tie (no answer preferred)";
const BOTH_BAD: &str = "both_bad (no answer preferred)";
const NO_REWRITE: &str = "thumb without a rewrite (no pair)";
const DOWN_NO_REWRITE: &str = "thumbs-down without a rewrite (no demonstration)";
const NO_MAJORITY: &str = "no majority";
const ALL_TIED: &str = "all answers tied (no pair)";
const LS_NO_SIDE: &str = "tie or both_bad (Label Studio's choice is left or right)";

/// Input fields the trainers or the importer read as data: an item's copies of them are not
/// exported (they would pass for the annotators' labels, or clash with the row's own text).
const RESERVED: [&str; 14] = [
    "prompt",
    "chosen",
    "rejected",
    "margin",
    "degree",
    "safety",
    "responses",
    "ranking",
    "completion",
    "label",
    "messages",
    "text",
    "answer1",
    "answer2",
];

/// Exports the labels `opts` asks for, read in one snapshot: the rows, and what was read and
/// left out.
pub fn export(store: &mut Store, opts: &ExportOptions) -> Result<(Vec<Value>, ExportReport)> {
    if opts.aggregate == Aggregate::Majority
        && matches!(opts.format, Format::LabelStudio | Format::Labels)
    {
        return Err(Error::Invalid(format!(
            "--format {} holds each annotator's labels; export it without --aggregate majority",
            opts.format
        )));
    }
    let db = store.path().to_path_buf();
    store.snapshot(|s| {
        let projects = projects_to_export(s, &db, opts)?;
        let mut ex = Exporter {
            format: opts.format,
            aggregate: opts.aggregate,
            rows: Vec::new(),
            report: ExportReport::default(),
        };
        for p in &projects {
            let labels = s.labels(p.id)?;
            ex.report.labels_read += labels.len();
            let mut by_item: BTreeMap<i64, Vec<StoredLabel>> = BTreeMap::new();
            for l in labels {
                by_item.entry(l.item_id).or_default().push(l);
            }
            for (item_id, labels) in by_item {
                let item = s.item(item_id)?.ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: labels of item {item_id}, which does not exist",
                        db.display()
                    ))
                })?;
                ex.item(p, &item, &labels)?;
            }
        }
        ex.report.rows = ex.rows.len();
        Ok((ex.rows, ex.report))
    })
}

fn projects_to_export(s: &Store, db: &Path, opts: &ExportOptions) -> Result<Vec<Project>> {
    let Some(name) = &opts.project else {
        return Ok(s
            .projects()?
            .into_iter()
            .filter(|p| opts.format.uses(p.kind))
            .collect());
    };
    let Some(p) = s.project(name)? else {
        let names: Vec<String> = s
            .projects()?
            .iter()
            .map(|p| format!("{:?} ({})", p.name, p.kind))
            .collect();
        return Err(Error::Invalid(format!(
            "{}: no project {name:?}; {}",
            db.display(),
            if names.is_empty() {
                "the database has no projects (rlhf feedback import creates them)".to_string()
            } else {
                format!("the projects are {}", names.join(", "))
            }
        )));
    };
    if !opts.format.uses(p.kind) {
        return Err(Error::Invalid(format!(
            "project {name:?} is a {} project, which --format {} cannot hold; use --format {}",
            p.kind,
            opts.format,
            Format::for_kind(p.kind)
        )));
    }
    Ok(vec![p])
}

/// Writes `rows` to `out` atomically (a temporary file beside it, then a rename): JSON lines,
/// or for [`Format::LabelStudio`] one JSON array, as Label Studio writes its exports.
pub fn write_rows(rows: &[Value], format: Format, out: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: out.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    if format == Format::LabelStudio {
        serde_json::to_writer_pretty(&mut bytes, rows).map_err(|e| io(e.into()))?;
        bytes.push(b'\n');
    } else {
        for r in rows {
            serde_json::to_writer(&mut bytes, r).map_err(|e| io(e.into()))?;
            bytes.push(b'\n');
        }
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the output must be a file name, not a directory",
                out.display()
            ))
        })?;
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// Agreement between a project's annotators, for the admin page: pairwise labels as nominal
/// categories (the choice), single-answer labels by thumb; rank labels by Krippendorff's alpha
/// with the interval metric over (item, answer) units whose values are the answer's group
/// position (`observed` is the share of annotator pairs that put an answer in the same place;
/// the kappas are `None`). `None` for demonstrations, which have nothing to agree on.
pub fn project_agreement(kind: Kind, labels: &[StoredLabel]) -> Option<Agreement> {
    let mut by_item: BTreeMap<i64, Vec<&StoredLabel>> = BTreeMap::new();
    for l in labels.iter().filter(|l| l.label.kind() == kind) {
        by_item.entry(l.item_id).or_default().push(l);
    }
    let nominal = |category: &dyn Fn(&Label) -> Option<String>| -> Agreement {
        let items: Vec<agreement::ItemLabels> = by_item
            .values()
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| category(&l.label).map(|c| (l.user_id, c)))
                    .collect()
            })
            .collect();
        agreement::agreement(&items)
    };
    match kind {
        Kind::Pairwise => Some(nominal(&|l| match l {
            Label::Pairwise { choice, .. } => Some(choice.as_str().to_string()),
            _ => None,
        })),
        Kind::Single => Some(nominal(&|l| match l {
            Label::Single { thumb, .. } => Some(thumb_str(*thumb).to_string()),
            _ => None,
        })),
        Kind::Rank => {
            // One unit per (item, answer): each annotator's group position for the answer.
            let mut units: BTreeMap<(i64, usize), Vec<(i64, f64)>> = BTreeMap::new();
            for l in by_item.values().flatten() {
                if let Label::Rank { ranking, .. } = &l.label {
                    for (pos, group) in ranking.iter().enumerate() {
                        for &answer in group {
                            units
                                .entry((l.item_id, answer))
                                .or_default()
                                .push((l.user_id, pos as f64));
                        }
                    }
                }
            }
            let units: Vec<Vec<(i64, f64)>> = units.into_values().collect();
            let as_categories: Vec<agreement::ItemLabels> = units
                .iter()
                .map(|u| u.iter().map(|&(a, v)| (a, v.to_string())).collect())
                .collect();
            let annotators: BTreeSet<i64> = by_item.values().flatten().map(|l| l.user_id).collect();
            Some(Agreement {
                items: by_item.len(),
                labels: by_item.values().map(Vec::len).sum(),
                annotators: annotators.len(),
                observed: agreement::observed_agreement(&as_categories),
                cohen_kappa: None,
                fleiss_kappa: None,
                krippendorff_alpha: agreement::krippendorff_alpha_interval(&units),
            })
        }
        Kind::Demo => None,
    }
}

fn thumb_str(t: Thumb) -> &'static str {
    match t {
        Thumb::Up => "up",
        Thumb::Down => "down",
    }
}

/// Who a row's judgement comes from.
enum Who<'a> {
    /// One annotator's label.
    One(&'a StoredLabel),
    /// A majority over an item's labels.
    Many {
        labels: &'a [StoredLabel],
        /// The winning share; `None` where undefined.
        agreement: Option<f64>,
    },
}

struct Exporter {
    format: Format,
    aggregate: Aggregate,
    rows: Vec<Value>,
    report: ExportReport,
}

impl Exporter {
    /// Exports one item's labels.
    fn item(&mut self, project: &Project, item: &Item, labels: &[StoredLabel]) -> Result<()> {
        match self.format {
            Format::Labels => {
                for l in labels {
                    self.raw_label(project, item, l);
                }
                return Ok(());
            }
            Format::LabelStudio => return self.label_studio_task(item, labels),
            _ => {}
        }
        let per_annotator = self.aggregate == Aggregate::None || project.kind == Kind::Demo;
        if per_annotator {
            for l in labels {
                let before = self.rows.len();
                if let Some(reason) = self.label(item, l)? {
                    if self.rows.len() == before {
                        self.report.leave_out(reason);
                    }
                }
            }
            return Ok(());
        }
        match project.kind {
            Kind::Pairwise => self.pairwise_majority(item, labels),
            Kind::Rank => self.rank_majority(item, labels),
            Kind::Single => self.single_majority(item, labels),
            Kind::Demo => Ok(()), // per annotator, above
        }
    }

    /// One label's rows; the reason when it gives none.
    fn label(&mut self, item: &Item, l: &StoredLabel) -> Result<Option<&'static str>> {
        let who = Who::One(l);
        match &l.label {
            Label::Pairwise {
                choice,
                degree,
                safety,
                ..
            } => {
                let safety = [
                    safety.first().copied().flatten(),
                    safety.get(1).copied().flatten(),
                ];
                self.pairwise(item, *choice, *degree, safety, &who)
            }
            Label::Rank { ranking, .. } => self.ranking(item, ranking, &who),
            Label::Single { thumb, rewrite, .. } => {
                let answer = answer(item, 0)?;
                let mut reason = None;
                if let Some(text) = rewrite {
                    self.rewrite(item, answer, text, &who);
                }
                match (self.format, thumb) {
                    (Format::Sft, Thumb::Up) => self.completion(item, answer, None, &who),
                    (Format::Sft, Thumb::Down) => reason = Some(DOWN_NO_REWRITE),
                    (Format::Kto, t) => self.completion(item, answer, Some(*t == Thumb::Up), &who),
                    (Format::Pairs, _) => reason = Some(NO_REWRITE),
                    _ => {}
                }
                Ok(reason)
            }
            Label::Demo { text, .. } => {
                if self.format == Format::Sft {
                    self.completion(item, &Value::String(text.clone()), None, &who);
                }
                Ok(None)
            }
        }
    }

    /// A pairwise judgement (one label's, or the majority's); the reason when it gives no row.
    fn pairwise(
        &mut self,
        item: &Item,
        choice: Choice,
        degree: Option<Degree>,
        safety: [Option<Safety>; 2],
        who: &Who,
    ) -> Result<Option<&'static str>> {
        let (a, b) = (answer(item, 0)?, answer(item, 1)?);
        let winner = match choice {
            Choice::A => 0,
            Choice::B => 1,
            Choice::Tie => return Ok(Some(TIE)),
            Choice::BothBad if self.format == Format::Kto => {
                self.completion(item, a, Some(false), who);
                self.completion(item, b, Some(false), who);
                return Ok(None);
            }
            Choice::BothBad => return Ok(Some(BOTH_BAD)),
        };
        let (chosen, rejected) = if winner == 0 { (a, b) } else { (b, a) };
        match self.format {
            Format::Pairs => {
                let mut row = Map::new();
                row.insert("prompt".into(), item.prompt.clone());
                row.insert("chosen".into(), like_prompt(&item.prompt, chosen));
                row.insert("rejected".into(), like_prompt(&item.prompt, rejected));
                if let Some(d) = degree {
                    row.insert("degree".into(), json!(d));
                }
                if let (Some(c), Some(r)) = (safety[winner], safety[1 - winner]) {
                    row.insert("safety".into(), json!({"chosen": c, "rejected": r}));
                }
                self.push(row, item, who);
            }
            Format::Rankings => {
                let order = if winner == 0 { [0, 1] } else { [1, 0] };
                self.ranking_row(item, &[a.clone(), b.clone()], json!(order), who);
            }
            Format::Kto => {
                self.completion(item, chosen, Some(true), who);
                self.completion(item, rejected, Some(false), who);
            }
            _ => {}
        }
        Ok(None)
    }

    /// A ranking (one label's, or Borda's); the reason when it gives no row.
    fn ranking(
        &mut self,
        item: &Item,
        groups: &[Vec<usize>],
        who: &Who,
    ) -> Result<Option<&'static str>> {
        if groups.len() < 2 {
            return Ok(Some(ALL_TIED));
        }
        for &i in groups.iter().flatten() {
            answer(item, i)?;
        }
        match self.format {
            Format::Pairs => {
                for (gi, better_group) in groups.iter().enumerate() {
                    for &better in better_group {
                        for &worse in groups[gi + 1..].iter().flatten() {
                            let mut row = Map::new();
                            row.insert("prompt".into(), item.prompt.clone());
                            row.insert(
                                "chosen".into(),
                                like_prompt(&item.prompt, &item.candidates[better].text),
                            );
                            row.insert(
                                "rejected".into(),
                                like_prompt(&item.prompt, &item.candidates[worse].text),
                            );
                            self.push(row, item, who);
                        }
                    }
                }
            }
            Format::Rankings => {
                // The ranked answers only, in page order, re-indexed.
                let mut ranked: Vec<usize> = groups.iter().flatten().copied().collect();
                ranked.sort_unstable();
                let new_index = |i: usize| ranked.binary_search(&i).unwrap_or_default();
                let responses: Vec<Value> = ranked
                    .iter()
                    .map(|&i| item.candidates[i].text.clone())
                    .collect();
                let ranking = if groups.iter().all(|g| g.len() == 1) {
                    json!(groups.iter().map(|g| new_index(g[0])).collect::<Vec<_>>())
                } else {
                    json!(groups
                        .iter()
                        .map(|g| g.iter().map(|&i| new_index(i)).collect::<Vec<_>>())
                        .collect::<Vec<_>>())
                };
                self.ranking_row(item, &responses, ranking, who);
            }
            _ => {}
        }
        Ok(None)
    }

    fn ranking_row(&mut self, item: &Item, responses: &[Value], ranking: Value, who: &Who) {
        let mut row = Map::new();
        row.insert("prompt".into(), item.prompt.clone());
        row.insert(
            "responses".into(),
            Value::Array(
                responses
                    .iter()
                    .map(|r| like_prompt(&item.prompt, r))
                    .collect(),
            ),
        );
        row.insert("ranking".into(), ranking);
        self.push(row, item, who);
    }

    /// A rewrite of `answer`: a pair (the rewrite preferred), a demonstration, or a desirable
    /// completion.
    fn rewrite(&mut self, item: &Item, answer: &Value, text: &str, who: &Who) {
        let text = like_prompt(&item.prompt, &Value::String(text.to_string()));
        match self.format {
            Format::Pairs => {
                let mut row = Map::new();
                row.insert("prompt".into(), item.prompt.clone());
                row.insert("chosen".into(), text);
                row.insert("rejected".into(), like_prompt(&item.prompt, answer));
                self.push(row, item, who);
            }
            Format::Sft => self.completion(item, &text, None, who),
            Format::Kto => self.completion(item, &text, Some(true), who),
            _ => {}
        }
    }

    /// `{"prompt", "completion"}`, with `"label"` for KTO.
    fn completion(&mut self, item: &Item, completion: &Value, label: Option<bool>, who: &Who) {
        let mut row = Map::new();
        row.insert("prompt".into(), item.prompt.clone());
        row.insert("completion".into(), like_prompt(&item.prompt, completion));
        if let Some(l) = label {
            row.insert("label".into(), Value::Bool(l));
        }
        self.push(row, item, who);
    }

    /// Adds the fields every row carries and keeps the row.
    fn push(&mut self, mut row: Map<String, Value>, item: &Item, who: &Who) {
        row.insert("item_id".into(), json!(item.id));
        let mut tags: Vec<String> = match item.meta.get("tags") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let mut add_tags = |notes: &Notes| {
            for t in &notes.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        };
        match who {
            Who::One(l) => {
                row.insert("annotator".into(), json!(l.user));
                if let Some(ms) = l.lead_time_ms {
                    row.insert("lead_time".into(), json!(ms as f64 / 1000.0));
                }
                if let Some(c) = &l.label.notes().comment {
                    row.insert("comment".into(), json!(c));
                }
                add_tags(l.label.notes());
            }
            Who::Many { labels, agreement } => {
                let names: Vec<&str> = labels.iter().map(|l| l.user.as_str()).collect();
                row.insert("annotators".into(), json!(names));
                row.insert("agreement".into(), json!(agreement));
                let leads: Vec<i64> = labels.iter().filter_map(|l| l.lead_time_ms).collect();
                if !leads.is_empty() {
                    let mean = leads.iter().sum::<i64>() as f64 / leads.len() as f64 / 1000.0;
                    row.insert("lead_time".into(), json!(mean));
                }
                for l in labels.iter() {
                    add_tags(l.label.notes());
                }
            }
        }
        // Tags that are not text (an object, a number) are the input's own business: kept as
        // they are, unmerged.
        let meta_tags_merged = matches!(
            item.meta.get("tags"),
            None | Some(Value::String(_) | Value::Array(_))
        );
        if meta_tags_merged && !tags.is_empty() && !row.contains_key("tags") {
            row.insert("tags".into(), json!(tags));
        }
        for (k, v) in &item.meta {
            let merged = k == "tags" && meta_tags_merged;
            if !merged && !RESERVED.contains(&k.as_str()) && !row.contains_key(k) {
                row.insert(k.clone(), v.clone());
            }
        }
        self.rows.push(Value::Object(row));
    }

    /// `--format labels`: the label as stored, with its item.
    fn raw_label(&mut self, project: &Project, item: &Item, l: &StoredLabel) {
        let mut row = Map::new();
        row.insert("label_id".into(), json!(l.id));
        row.insert("project".into(), json!(project.name));
        row.insert("kind".into(), json!(project.kind));
        row.insert("prompt".into(), item.prompt.clone());
        row.insert(
            "candidates".into(),
            Value::Array(item.candidates.iter().map(|c| c.text.clone()).collect()),
        );
        row.insert(
            "label".into(),
            serde_json::to_value(&l.label).unwrap_or(Value::Null),
        );
        row.insert("created_at".into(), json!(rfc3339(l.created_at)));
        row.insert("updated_at".into(), json!(rfc3339(l.updated_at)));
        self.push(row, item, &Who::One(l));
    }

    /// `--format labelstudio`: one task per item with its a/b labels as annotations.
    fn label_studio_task(&mut self, item: &Item, labels: &[StoredLabel]) -> Result<()> {
        let mut annotations = Vec::new();
        for l in labels {
            let Label::Pairwise { choice, degree, .. } = &l.label else {
                continue;
            };
            let selected = match choice {
                Choice::A => "left",
                Choice::B => "right",
                Choice::Tie | Choice::BothBad => {
                    self.report.leave_out(LS_NO_SIDE);
                    continue;
                }
            };
            let mut result = vec![json!({
                "value": {"selected": selected},
                "from_name": "comparison",
                "to_name": "prompt",
                "type": "pairwise",
                "origin": "manual",
            })];
            if let Some(d) = degree {
                result.push(json!({
                    "value": {"choices": [degree_text(*d)]},
                    "from_name": "degree",
                    "to_name": "prompt",
                    "type": "choices",
                    "origin": "manual",
                }));
            }
            let mut a = json!({
                "id": l.id,
                "completed_by": l.user,
                "result": result,
                "was_cancelled": false,
                "created_at": rfc3339(l.created_at),
                "updated_at": rfc3339(l.updated_at),
            });
            if let Some(ms) = l.lead_time_ms {
                a["lead_time"] = json!(ms as f64 / 1000.0);
            }
            annotations.push(a);
        }
        if annotations.is_empty() {
            return Ok(());
        }
        let mut data = Map::new();
        data.insert("prompt".into(), item.prompt.clone());
        data.insert("answer1".into(), answer(item, 0)?.clone());
        data.insert("answer2".into(), answer(item, 1)?.clone());
        for (k, v) in &item.meta {
            if !RESERVED.contains(&k.as_str()) {
                data.insert(k.clone(), v.clone());
            }
        }
        self.rows.push(json!({
            "id": item.id,
            "data": data,
            "annotations": annotations,
        }));
        Ok(())
    }

    /// Pairwise by majority: the most common choice, its voters' most common degree, each
    /// answer's majority safety label.
    fn pairwise_majority(&mut self, item: &Item, labels: &[StoredLabel]) -> Result<()> {
        let mut votes = Vec::new();
        for l in labels {
            if let Label::Pairwise {
                choice,
                degree,
                safety,
                ..
            } = &l.label
            {
                votes.push((*choice, *degree, safety.clone()));
            }
        }
        let choices: Vec<String> = votes.iter().map(|v| v.0.as_str().to_string()).collect();
        let Some((won, share)) = agreement::majority(&choices) else {
            self.report.leave_out(NO_MAJORITY);
            return Ok(());
        };
        let choice = votes
            .iter()
            .map(|v| v.0)
            .find(|c| c.as_str() == won)
            .unwrap_or(Choice::Tie);
        let degrees: Vec<Degree> = votes
            .iter()
            .filter(|v| v.0 == choice)
            .filter_map(|v| v.1)
            .collect();
        let degree = most_common_degree(&degrees);
        let safety = [0, 1].map(|i| {
            let labels: Vec<String> = votes
                .iter()
                .filter_map(|v| v.2.get(i).copied().flatten())
                .map(|s| safety_str(s).to_string())
                .collect();
            agreement::majority(&labels).map(|(s, _)| {
                if s == "safe" {
                    Safety::Safe
                } else {
                    Safety::Unsafe
                }
            })
        });
        let who = Who::Many {
            labels,
            agreement: Some(share),
        };
        if let Some(reason) = self.pairwise(item, choice, degree, safety, &who)? {
            self.report.leave_out(reason);
        }
        Ok(())
    }

    /// Rankings by Borda count: each answer's mean group position over the annotators who
    /// ranked it, lower first, equal means tied.
    fn rank_majority(&mut self, item: &Item, labels: &[StoredLabel]) -> Result<()> {
        let rankings: Vec<&Vec<Vec<usize>>> = labels
            .iter()
            .filter_map(|l| match &l.label {
                Label::Rank { ranking, .. } => Some(ranking),
                _ => None,
            })
            .collect();
        // answer -> (sum of positions, count); exact, so equal means compare equal.
        let mut score: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        for r in &rankings {
            for (pos, group) in r.iter().enumerate() {
                for &a in group {
                    let e = score.entry(a).or_default();
                    e.0 += pos as u64;
                    e.1 += 1;
                }
            }
        }
        let mut answers: Vec<(usize, (u64, u64))> = score.into_iter().collect();
        let cmp = |x: &(u64, u64), y: &(u64, u64)| (x.0 * y.1).cmp(&(y.0 * x.1));
        answers.sort_by(|a, b| cmp(&a.1, &b.1).then(a.0.cmp(&b.0)));
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut last: Option<(u64, u64)> = None;
        for (a, s) in answers {
            match last {
                Some(l) if cmp(&l, &s).is_eq() => {
                    if let Some(g) = groups.last_mut() {
                        g.push(a);
                    }
                }
                _ => groups.push(vec![a]),
            }
            last = Some(s);
        }
        if groups.len() < 2 {
            self.report.leave_out(ALL_TIED);
            return Ok(());
        }
        // The agreement: of the annotators' judgements on the pairs the aggregate orders
        // (both answers ranked by that annotator), the share that order them the same way.
        let (mut agree, mut judged) = (0usize, 0usize);
        for r in &rankings {
            let pos = |a: usize| r.iter().position(|g| g.contains(&a));
            for (gi, better_group) in groups.iter().enumerate() {
                for &b in better_group {
                    for &w in groups[gi + 1..].iter().flatten() {
                        if let (Some(pb), Some(pw)) = (pos(b), pos(w)) {
                            judged += 1;
                            agree += (pb < pw) as usize;
                        }
                    }
                }
            }
        }
        let who = Who::Many {
            labels,
            agreement: (judged > 0).then(|| agree as f64 / judged as f64),
        };
        if let Some(reason) = self.ranking(item, &groups, &who)? {
            self.report.leave_out(reason);
        }
        Ok(())
    }

    /// Single answers by majority: the most common thumb; every rewrite kept, per annotator.
    fn single_majority(&mut self, item: &Item, labels: &[StoredLabel]) -> Result<()> {
        let answer = answer(item, 0)?;
        let before = self.rows.len();
        let mut thumbs = Vec::new();
        for l in labels {
            if let Label::Single { thumb, rewrite, .. } = &l.label {
                thumbs.push(thumb_str(*thumb).to_string());
                if let Some(text) = rewrite {
                    self.rewrite(item, answer, text, &Who::One(l));
                }
            }
        }
        let majority = agreement::majority(&thumbs);
        let who = Who::Many {
            labels,
            agreement: majority.as_ref().map(|m| m.1),
        };
        match (self.format, majority.as_ref().map(|(t, _)| t.as_str())) {
            (Format::Sft | Format::Kto, None) => self.report.leave_out(NO_MAJORITY),
            (Format::Sft, Some("up")) => self.completion(item, answer, None, &who),
            (Format::Kto, Some(t)) => self.completion(item, answer, Some(t == "up"), &who),
            (Format::Sft, Some(_)) if self.rows.len() == before => {
                self.report.leave_out(DOWN_NO_REWRITE)
            }
            (Format::Pairs, _) if self.rows.len() == before => self.report.leave_out(NO_REWRITE),
            _ => {}
        }
        Ok(())
    }
}

/// Candidate `i` of `item`, or an error naming the item (a label that points past its item's
/// answers means the database was edited by hand).
fn answer(item: &Item, i: usize) -> Result<&Value> {
    item.candidates.get(i).map(|c| &c.text).ok_or_else(|| {
        Error::Invalid(format!(
            "item {} has {} answer(s), but a label refers to answer {}",
            item.id,
            item.candidates.len(),
            i + 1
        ))
    })
}

/// An answer as a row's text field: a text answer to a message-list prompt becomes one
/// assistant message, since a row's text fields must all be of one kind.
fn like_prompt(prompt: &Value, answer: &Value) -> Value {
    match (prompt, answer) {
        (Value::Array(_), Value::String(s)) => json!([{"role": "assistant", "content": s}]),
        _ => answer.clone(),
    }
}

fn safety_str(s: Safety) -> &'static str {
    match s {
        Safety::Safe => "safe",
        Safety::Unsafe => "unsafe",
    }
}

/// How strong a degree is: 0 (negligibly) to 3 (significantly).
fn strength(d: Degree) -> u8 {
    match d {
        Degree::NegligiblyBetter => 0,
        Degree::SlightlyBetter => 1,
        Degree::Better => 2,
        Degree::SignificantlyBetter => 3,
    }
}

/// The most common degree; among equally common ones, the weakest.
fn most_common_degree(degrees: &[Degree]) -> Option<Degree> {
    let mut counts: Vec<(Degree, usize)> = Vec::new();
    for &d in degrees {
        match counts.iter_mut().find(|(x, _)| *x == d) {
            Some((_, n)) => *n += 1,
            None => counts.push((d, 1)),
        }
    }
    counts
        .into_iter()
        .max_by(|(da, na), (db, nb)| na.cmp(nb).then(strength(*db).cmp(&strength(*da))))
        .map(|(d, _)| d)
}

/// Label Studio's choice text for a degree (what `import` parses back).
fn degree_text(d: Degree) -> &'static str {
    match d {
        Degree::SignificantlyBetter => "Significantly better",
        Degree::Better => "Better",
        Degree::SlightlyBetter => "Slightly better",
        Degree::NegligiblyBetter => "Negligibly better / unsure",
    }
}

#[cfg(test)]
mod tests;
