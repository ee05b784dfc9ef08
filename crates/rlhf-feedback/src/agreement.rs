//! Inter-annotator agreement statistics for human-feedback labelling.
//!
//! Labels are nominal categories given as (small) strings, or — for
//! [`krippendorff_alpha_interval`] — numbers such as ordinal ranks. Data are
//! organised per item: each item carries the `(annotator id, label)` pairs it
//! received. An annotator labels an item at most once; items may have any
//! number of labels (missing data is allowed wherever the statistic allows it).
//!
//! Statistics provided:
//!
//! * observed agreement — mean pairwise percent agreement
//!   ([`observed_agreement`]);
//! * Cohen's kappa for two raters (Cohen 1960, [`cohen_kappa`]);
//! * Fleiss' kappa for a fixed number of raters per item (Fleiss 1971,
//!   [`fleiss_kappa`]);
//! * Krippendorff's alpha with missing data, nominal and interval metrics
//!   (Krippendorff 2011, [`krippendorff_alpha_nominal`],
//!   [`krippendorff_alpha_interval`]);
//! * the majority label of one item ([`majority`]).
//!
//! [`agreement`] bundles them into one [`Agreement`] report.
//!
//! No function panics on empty or degenerate input: statistics that are
//! undefined (no data, or chance agreement equal to 1) are returned as `None`.
//!
//! The reference values in the tests were produced by
//! `crates/rlhf-feedback/tests/agreement_reference.py` (scikit-learn,
//! statsmodels and the `krippendorff` PyPI package).

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One item's labels: (annotator id, category). An annotator labels an item at most once.
pub type ItemLabels = Vec<(i64, String)>;

/// Summary of the agreement between annotators over a set of items.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// Number of items (including items with fewer than two labels).
    pub items: usize,
    /// Total number of labels over all items.
    pub labels: usize,
    /// Number of distinct annotator ids.
    pub annotators: usize,
    /// Mean pairwise percent agreement over items with >= 2 labels, in `[0, 1]`
    /// (`0.0` when no item has two labels). See [`observed_agreement`].
    pub observed: f64,
    /// Cohen's kappa; `Some` only when exactly two annotators labelled every
    /// item that has >= 2 labels (computed over those items) and it is defined.
    pub cohen_kappa: Option<f64>,
    /// Fleiss' kappa over the items with the modal label count, see [`fleiss_kappa`].
    pub fleiss_kappa: Option<f64>,
    /// Krippendorff's alpha (nominal metric) over all pairable items, see
    /// [`krippendorff_alpha_nominal`].
    pub krippendorff_alpha: Option<f64>,
}

/// Computes all agreement statistics for `items`.
///
/// * `observed`: [`observed_agreement`] over items with >= 2 labels.
/// * `cohen_kappa`: [`cohen_kappa`] when exactly two annotators labelled every
///   item that has >= 2 labels (those items then have exactly one label from
///   each of them); the lower annotator id is rater "a". Items with a single
///   label are ignored. `None` otherwise.
/// * `fleiss_kappa`: [`fleiss_kappa`] (items with the modal label count).
/// * `krippendorff_alpha`: [`krippendorff_alpha_nominal`] (all pairable items).
///
/// Empty input gives zero counts, `observed == 0.0` and `None` statistics.
pub fn agreement(items: &[ItemLabels]) -> Agreement {
    let annotators: BTreeSet<i64> = items
        .iter()
        .flat_map(|item| item.iter().map(|(annotator, _)| *annotator))
        .collect();
    Agreement {
        items: items.len(),
        labels: items.iter().map(Vec::len).sum(),
        annotators: annotators.len(),
        observed: observed_agreement(items),
        cohen_kappa: two_rater_cohen(items),
        fleiss_kappa: fleiss_kappa(items),
        krippendorff_alpha: krippendorff_alpha_nominal(items),
    }
}

/// Mean pairwise percent agreement.
///
/// For each item `i` with `m_i >= 2` labels, `P_i` is the share of its
/// `m_i (m_i - 1) / 2` unordered label pairs that agree; the result is the
/// unweighted mean of `P_i` over those items. Items with fewer than two labels
/// are skipped; `0.0` when no item has two labels.
pub fn observed_agreement(items: &[ItemLabels]) -> f64 {
    let mut sum = 0.0;
    let mut count = 0usize;
    for item in items {
        let m = item.len();
        if m < 2 {
            continue;
        }
        let agreeing: usize = category_counts(item.iter().map(|(_, c)| c.as_str()))
            .values()
            .map(|&k| k * (k - 1) / 2)
            .sum();
        sum += agreeing as f64 / (m * (m - 1) / 2) as f64;
        count += 1;
    }
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// Cohen's kappa for two raters who labelled the same items (Cohen 1960,
/// "A coefficient of agreement for nominal scales").
///
/// `a[i]` and `b[i]` are the two labels of item `i`. With `N` items,
/// `p_o = (#items where a == b) / N` and chance agreement
/// `p_e = Σ_c (n_ac / N) (n_bc / N)` from each rater's marginal counts,
/// `kappa = (p_o - p_e) / (1 - p_e)`.
///
/// Returns `None` when the inputs are empty, have different lengths, or
/// `p_e == 1` (both raters used one and the same category throughout).
pub fn cohen_kappa(a: &[String], b: &[String]) -> Option<f64> {
    if a.is_empty() || a.len() != b.len() {
        return None;
    }
    let n = a.len() as f64;
    let matches = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64;
    let count_a = category_counts(a.iter().map(String::as_str));
    let count_b = category_counts(b.iter().map(String::as_str));
    // Σ_c n_ac n_bc, an exact integer (as f64 for large inputs).
    let chance: f64 = count_a
        .iter()
        .filter_map(|(c, &na)| count_b.get(c).map(|&nb| na as f64 * nb as f64))
        .sum();
    // kappa = (p_o - p_e) / (1 - p_e), multiplied through by N^2.
    let denominator = n * n - chance;
    if denominator == 0.0 {
        return None;
    }
    Some((n * matches - chance) / denominator)
}

/// Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement among many
/// raters").
///
/// Fleiss' kappa needs the same number of ratings `n` per item, so it uses only
/// the items whose label count equals the modal label count among items with
/// `>= 2` labels (ties between counts go to the larger count). With `N` such
/// items and `n_ij` the number of labels of category `j` on item `i`:
///
/// * `p_j = Σ_i n_ij / (N n)` (share of all labels in category `j`),
/// * `P_i = (Σ_j n_ij² - n) / (n (n - 1))` (agreeing pairs on item `i`),
/// * `P̄ = Σ_i P_i / N`, `P_e = Σ_j p_j²`,
/// * `kappa = (P̄ - P_e) / (1 - P_e)`.
///
/// Returns `None` when there is no item with `>= 2` labels, or when it is
/// undefined (`P_e == 1`: a single category was used).
pub fn fleiss_kappa(items: &[ItemLabels]) -> Option<f64> {
    // Frequency of each label count among items with >= 2 labels.
    let mut count_frequency: BTreeMap<usize, usize> = BTreeMap::new();
    for item in items.iter().filter(|item| item.len() >= 2) {
        *count_frequency.entry(item.len()).or_insert(0) += 1;
    }
    // Modal count; `max_by_key` returns the last maximum, i.e. the larger count on ties.
    let (&n, _) = count_frequency.iter().max_by_key(|(_, &freq)| freq)?;
    let used: Vec<&ItemLabels> = items.iter().filter(|item| item.len() == n).collect();

    let mut category_totals: BTreeMap<&str, usize> = BTreeMap::new();
    let mut p_bar = 0.0;
    for item in &used {
        let counts = category_counts(item.iter().map(|(_, c)| c.as_str()));
        let squares: usize = counts.values().map(|&k| k * k).sum();
        p_bar += (squares - n) as f64 / (n * (n - 1)) as f64;
        for (category, k) in counts {
            *category_totals.entry(category).or_insert(0) += k;
        }
    }
    if category_totals.len() < 2 {
        return None; // P_e == 1
    }
    let n_items = used.len() as f64;
    p_bar /= n_items;
    let total = n_items * n as f64;
    let p_e: f64 = category_totals
        .values()
        .map(|&k| {
            let p = k as f64 / total;
            p * p
        })
        .sum();
    Some((p_bar - p_e) / (1.0 - p_e))
}

/// Krippendorff's alpha with the nominal metric, allowing missing data
/// (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability").
///
/// Only pairable values count: items with fewer than two labels are dropped.
/// From the coincidence matrix `o_ck = Σ_u (#ordered pairs (c, k) in unit u) /
/// (m_u - 1)`, with marginals `n_c = Σ_k o_ck` and `n = Σ_c n_c` (the number of
/// pairable values):
///
/// `alpha = 1 - D_o / D_e = 1 - (n - 1) Σ_{c≠k} o_ck / Σ_{c≠k} n_c n_k`,
/// computed as `((n - 1) Σ_c o_cc - Σ_c n_c (n_c - 1)) / (n (n - 1) - Σ_c n_c (n_c - 1))`.
///
/// Returns `None` when no item is pairable or `D_e == 0` (a single category).
pub fn krippendorff_alpha_nominal(items: &[ItemLabels]) -> Option<f64> {
    let mut totals: BTreeMap<&str, usize> = BTreeMap::new();
    let mut diagonal = 0.0; // Σ_c o_cc
    for item in items.iter().filter(|item| item.len() >= 2) {
        let m = item.len();
        let counts = category_counts(item.iter().map(|(_, c)| c.as_str()));
        let same_pairs: usize = counts.values().map(|&k| k * (k - 1)).sum();
        diagonal += same_pairs as f64 / (m - 1) as f64;
        for (category, k) in counts {
            *totals.entry(category).or_insert(0) += k;
        }
    }
    if totals.len() < 2 {
        return None; // no pairable values, or D_e == 0
    }
    let n: usize = totals.values().sum();
    let expected_same: f64 = totals.values().map(|&k| (k * (k - 1)) as f64).sum();
    let n = n as f64;
    Some(((n - 1.0) * diagonal - expected_same) / (n * (n - 1.0) - expected_same))
}

/// Krippendorff's alpha with the interval metric `δ²(v, v') = (v - v')²`,
/// allowing missing data (Krippendorff 2011, "Computing Krippendorff's
/// Alpha-Reliability"); suited to ranks and other ordinal numbers treated as
/// equally spaced.
///
/// Each item is a list of `(annotator id, value)`. Items with fewer than two
/// values are dropped. With `m_u` values in unit `u` and `n = Σ_u m_u`:
///
/// * `D_o = (1/n) Σ_u Σ_{i≠j in u} (v_i - v_j)² / (m_u - 1)`,
/// * `D_e = (1/(n (n - 1))) Σ_{i≠j over all pairable values} (v_i - v_j)²`,
/// * `alpha = 1 - D_o / D_e`.
///
/// (Both sums use `Σ_{i≠j} (v_i - v_j)² = 2 m Σ_i (v_i - v̄)²`.)
///
/// Returns `None` when no item is pairable, any pairable value is not finite,
/// or `D_e == 0` (all pairable values are equal).
pub fn krippendorff_alpha_interval(items: &[Vec<(i64, f64)>]) -> Option<f64> {
    let pairable: Vec<&Vec<(i64, f64)>> = items.iter().filter(|item| item.len() >= 2).collect();
    let values = || {
        pairable
            .iter()
            .flat_map(|item| item.iter().map(|&(_, v)| v))
    };
    let first = values().next()?;
    if values().any(|v| !v.is_finite()) || values().all(|v| v == first) {
        return None;
    }
    let n = values().count() as f64;
    let observed: f64 = pairable
        .iter()
        .map(|item| {
            let m = item.len() as f64;
            let item_values = || item.iter().map(|&(_, v)| v);
            let mean = item_values().sum::<f64>() / m;
            let squares: f64 = item_values().map(|v| (v - mean) * (v - mean)).sum();
            2.0 * m * squares / (m - 1.0)
        })
        .sum();
    let mean = values().sum::<f64>() / n;
    let expected = 2.0 * n * values().map(|v| (v - mean) * (v - mean)).sum::<f64>();
    let d_o = observed / n;
    let d_e = expected / (n * (n - 1.0));
    if d_e <= 0.0 {
        return None;
    }
    Some(1.0 - d_o / d_e)
}

/// The most frequent label and its share of all labels, e.g. `("b", 0.75)`
/// for `[b, b, a, b]`. `None` for empty input or when two or more labels tie
/// for first place.
pub fn majority(labels: &[String]) -> Option<(String, f64)> {
    let counts = category_counts(labels.iter().map(String::as_str));
    let top = counts.values().copied().max()?;
    let mut leaders = counts.iter().filter(|(_, &k)| k == top);
    let (label, _) = leaders.next()?;
    if leaders.next().is_some() {
        return None;
    }
    Some((label.to_string(), top as f64 / labels.len() as f64))
}

/// Number of occurrences of each category.
fn category_counts<'a>(labels: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, usize> {
    let mut counts = BTreeMap::new();
    for label in labels {
        *counts.entry(label).or_insert(0) += 1;
    }
    counts
}

/// Cohen's kappa for [`agreement`]: `Some` only when the items with >= 2
/// labels were all labelled by exactly the same two annotators, once each.
fn two_rater_cohen(items: &[ItemLabels]) -> Option<f64> {
    let pairable: Vec<&ItemLabels> = items.iter().filter(|item| item.len() >= 2).collect();
    let raters: BTreeSet<i64> = pairable
        .iter()
        .flat_map(|item| item.iter().map(|(annotator, _)| *annotator))
        .collect();
    let mut raters = raters.into_iter();
    let (first, second) = (raters.next()?, raters.next()?);
    if raters.next().is_some() {
        return None;
    }
    let mut a = Vec::with_capacity(pairable.len());
    let mut b = Vec::with_capacity(pairable.len());
    for item in pairable {
        // Exactly one label from each of the two raters (so exactly two labels).
        let label_of = |who: i64| {
            let mut labels = item.iter().filter(|(annotator, _)| *annotator == who);
            match (labels.next(), labels.next()) {
                (Some((_, label)), None) => Some(label.clone()),
                _ => None,
            }
        };
        a.push(label_of(first)?);
        b.push(label_of(second)?);
    }
    cohen_kappa(&a, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-9;

    fn assert_close(actual: Option<f64>, expected: f64, tol: f64) {
        match actual {
            Some(value) => assert!(
                (value - expected).abs() <= tol,
                "expected {expected}, got {value} (tolerance {tol})"
            ),
            None => panic!("expected {expected}, got None"),
        }
    }

    fn strings(labels: &[&str]) -> Vec<String> {
        labels.iter().map(|s| s.to_string()).collect()
    }

    /// Items from `&[&[(annotator, label)]]`.
    fn items(data: &[&[(i64, &str)]]) -> Vec<ItemLabels> {
        data.iter()
            .map(|item| item.iter().map(|&(a, c)| (a, c.to_string())).collect())
            .collect()
    }

    /// Items from a per-item table of category counts; raters get ids 0, 1, ...
    /// within each item, category `j` is named `c{j}`.
    fn items_from_counts(table: &[&[usize]]) -> Vec<ItemLabels> {
        table
            .iter()
            .map(|row| {
                let mut item = Vec::new();
                for (j, &k) in row.iter().enumerate() {
                    for _ in 0..k {
                        item.push((item.len() as i64, format!("c{j}")));
                    }
                }
                item
            })
            .collect()
    }

    /// Items from a coders x units matrix with NaN for missing values; coder
    /// `i` (row `i`) gets annotator id `i`.
    fn units_from_matrix(matrix: &[&[f64]]) -> Vec<Vec<(i64, f64)>> {
        let units = matrix.first().map_or(0, |row| row.len());
        (0..units)
            .map(|u| {
                matrix
                    .iter()
                    .enumerate()
                    .filter(|(_, row)| !row[u].is_nan())
                    .map(|(coder, row)| (coder as i64, row[u]))
                    .collect()
            })
            .collect()
    }

    fn nominal_from_units(units: &[Vec<(i64, f64)>]) -> Vec<ItemLabels> {
        units
            .iter()
            .map(|unit| unit.iter().map(|&(a, v)| (a, format!("{v}"))).collect())
            .collect()
    }

    // ---- hand-worked cases -------------------------------------------------

    #[test]
    fn perfect_agreement_is_one() {
        let data = items(&[
            &[(1, "x"), (2, "x")],
            &[(1, "y"), (2, "y")],
            &[(1, "x"), (2, "x")],
            &[(1, "z"), (2, "z")],
        ]);
        let report = agreement(&data);
        assert_eq!((report.items, report.labels, report.annotators), (4, 8, 2));
        assert_eq!(report.observed, 1.0);
        assert_close(report.cohen_kappa, 1.0, TOL);
        assert_close(report.fleiss_kappa, 1.0, TOL);
        assert_close(report.krippendorff_alpha, 1.0, TOL);
        let numeric = vec![vec![(1, 1.0), (2, 1.0), (3, 1.0)], vec![(1, 4.0), (3, 4.0)]];
        assert_close(krippendorff_alpha_interval(&numeric), 1.0, TOL);
    }

    #[test]
    fn systematic_disagreement_is_negative() {
        // Two raters who always disagree on a balanced binary task.
        let a = strings(&["x", "y", "x", "y"]);
        let b = strings(&["y", "x", "y", "x"]);
        // p_o = 0, p_e = 0.5 -> kappa = -1.
        assert_close(cohen_kappa(&a, &b), -1.0, TOL);
        let data: Vec<ItemLabels> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| vec![(1, x.clone()), (2, y.clone())])
            .collect();
        // Fleiss: every P_i = 0, P_e = 0.5 -> -1.
        assert_close(fleiss_kappa(&data), -1.0, TOL);
        // Krippendorff: n = 8, o_cc = 0, n_x = n_y = 4:
        // (7 * 0 - (12 + 12)) / (56 - 24) = -0.75.
        assert_close(krippendorff_alpha_nominal(&data), -0.75, TOL);
        let report = agreement(&data);
        assert_eq!(report.observed, 0.0);
        assert_close(report.cohen_kappa, -1.0, TOL);
        // Interval: units (1, 2) and (2, 1); n = 4. D_o = (2 + 2) / 4 = 1;
        // of the 12 ordered pairs of {1, 2, 2, 1}, 8 differ by 1 -> D_e = 8 / 12.
        // alpha = 1 - 1 / (2/3) = -0.5.
        let numeric = vec![vec![(1, 1.0), (2, 2.0)], vec![(1, 2.0), (2, 1.0)]];
        assert_close(krippendorff_alpha_interval(&numeric), -0.5, TOL);
    }

    #[test]
    fn undefined_cases_return_none() {
        // One category only: chance agreement is 1.
        let same = items(&[&[(1, "x"), (2, "x")], &[(1, "x"), (2, "x")]]);
        assert_eq!(
            cohen_kappa(&strings(&["x", "x"]), &strings(&["x", "x"])),
            None
        );
        assert_eq!(fleiss_kappa(&same), None);
        assert_eq!(krippendorff_alpha_nominal(&same), None);
        let report = agreement(&same);
        assert_eq!(report.observed, 1.0);
        assert_eq!(report.cohen_kappa, None);
        assert_eq!(report.fleiss_kappa, None);
        assert_eq!(report.krippendorff_alpha, None);
        assert_eq!(
            krippendorff_alpha_interval(&[vec![(1, 3.0), (2, 3.0)]]),
            None
        );

        // Empty or unpairable input.
        assert_eq!(cohen_kappa(&[], &[]), None);
        assert_eq!(
            cohen_kappa(&strings(&["x", "y"]), &strings(&["x", "y", "x"])),
            None
        );
        assert_eq!(fleiss_kappa(&[]), None);
        assert_eq!(krippendorff_alpha_nominal(&[]), None);
        assert_eq!(krippendorff_alpha_interval(&[]), None);
        let singles = items(&[&[(1, "x")], &[(2, "y")], &[]]);
        assert_eq!(fleiss_kappa(&singles), None);
        assert_eq!(krippendorff_alpha_nominal(&singles), None);
        assert_eq!(
            krippendorff_alpha_interval(&[vec![(1, 1.0)], vec![(2, 5.0)]]),
            None
        );
        let empty = agreement(&[]);
        assert_eq!((empty.items, empty.labels, empty.annotators), (0, 0, 0));
        assert_eq!(empty.observed, 0.0);
        assert_eq!(empty.cohen_kappa, None);
        assert_eq!(empty.fleiss_kappa, None);
        assert_eq!(empty.krippendorff_alpha, None);
        let report = agreement(&singles);
        assert_eq!((report.items, report.labels, report.annotators), (3, 2, 2));
        assert_eq!(report.observed, 0.0);

        // Non-finite values make the interval alpha undefined.
        let nan = vec![vec![(1, 1.0), (2, f64::NAN)], vec![(1, 2.0), (2, 3.0)]];
        assert_eq!(krippendorff_alpha_interval(&nan), None);
    }

    #[test]
    fn observed_agreement_averages_pair_shares() {
        // Item 1: 3 labels, pairs x-x agree, x-y twice disagree -> 1/3.
        // Item 2: 2 labels agree -> 1. Item 3: single label, skipped.
        let data = items(&[
            &[(1, "x"), (2, "x"), (3, "y")],
            &[(1, "z"), (3, "z")],
            &[(2, "x")],
        ]);
        assert_close(
            Some(observed_agreement(&data)),
            (1.0 / 3.0 + 1.0) / 2.0,
            TOL,
        );
    }

    #[test]
    fn majority_label() {
        assert_eq!(
            majority(&strings(&["b", "b", "a", "b"])),
            Some(("b".to_string(), 0.75))
        );
        assert_eq!(majority(&strings(&["a"])), Some(("a".to_string(), 1.0)));
        assert_eq!(majority(&strings(&["a", "b", "b", "a", "c"])), None);
        assert_eq!(majority(&[]), None);
    }

    #[test]
    fn agreement_reports_cohen_only_for_two_raters() {
        let two = items(&[
            &[(7, "x"), (3, "y")],
            &[(3, "y"), (7, "y")],
            &[(7, "x"), (3, "x")],
            &[(3, "x")], // single label: ignored for Cohen
        ]);
        // Rater 3: y y x, rater 7: x y x; p_o = 2/3, p_e = (1/3)(2/3) + (2/3)(1/3) = 4/9
        // -> kappa = (2/3 - 4/9) / (5/9) = 0.4.
        assert_close(agreement(&two).cohen_kappa, 0.4, TOL);

        let three = items(&[
            &[(1, "x"), (2, "y")],
            &[(1, "y"), (3, "y")],
            &[(2, "x"), (3, "x")],
        ]);
        assert_eq!(agreement(&three).cohen_kappa, None);
        let report = agreement(&three);
        assert_eq!(report.annotators, 3);
        assert!(report.fleiss_kappa.is_some());

        let with_third_label = items(&[&[(1, "x"), (2, "y")], &[(1, "y"), (2, "y"), (1, "x")]]);
        assert_eq!(agreement(&with_third_label).cohen_kappa, None);
    }

    #[test]
    fn fleiss_uses_only_modal_rater_count() {
        let base = items(&[
            &[(1, "x"), (2, "x"), (3, "y")],
            &[(1, "y"), (2, "y"), (3, "y")],
            &[(1, "x"), (2, "y"), (3, "x")],
        ]);
        let expected = fleiss_kappa(&base).expect("defined");
        // Items with other label counts (here 2 and 1) must not change the result.
        let mut extended = base.clone();
        extended.extend(items(&[&[(1, "z"), (2, "x")], &[(3, "z")]]));
        assert_close(fleiss_kappa(&extended), expected, TOL);
        // Hand-worked: P_i = 1/3, 1, 1/3 -> P̄ = 5/9; p_x = 4/9, p_y = 5/9 -> P_e = 41/81.
        let p_e = 41.0 / 81.0;
        assert_close(Some(expected), (5.0 / 9.0 - p_e) / (1.0 - p_e), TOL);
        // Tie between counts 2 and 3 (one item each): the larger count (3) wins.
        let tie = items(&[&[(1, "x"), (2, "y")], &[(1, "x"), (2, "x"), (3, "y")]]);
        let only_three = items(&[&[(1, "x"), (2, "x"), (3, "y")]]);
        assert_eq!(fleiss_kappa(&tie), fleiss_kappa(&only_three));
    }

    #[test]
    fn krippendorff_drops_unpairable_items() {
        let base = items(&[&[(1, "x"), (2, "x")], &[(1, "y"), (2, "x"), (3, "y")]]);
        let mut extended = base.clone();
        extended.extend(items(&[&[(3, "z")], &[]]));
        let expected = krippendorff_alpha_nominal(&base).expect("defined");
        assert_close(krippendorff_alpha_nominal(&extended), expected, TOL);
        // Hand-worked: n = 5, Σ o_cc = 2 + 1 = 3, n_x = 3, n_y = 2
        // -> (4 * 3 - (6 + 2)) / (20 - 8) = 1/3.
        assert_close(Some(expected), 1.0 / 3.0, TOL);
    }

    // ---- published examples --------------------------------------------------

    /// Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters,
    /// 5 categories; published kappa = 0.210. Reference value from
    /// `statsmodels.stats.inter_rater.fleiss_kappa(table, method="fleiss")`.
    #[test]
    fn fleiss_wikipedia_example() {
        let table: &[&[usize]] = &[
            &[0, 0, 0, 0, 14],
            &[0, 2, 6, 4, 2],
            &[0, 0, 3, 5, 6],
            &[0, 3, 9, 2, 0],
            &[2, 2, 8, 1, 1],
            &[7, 7, 0, 0, 0],
            &[3, 2, 6, 3, 0],
            &[2, 5, 3, 2, 2],
            &[6, 5, 2, 1, 0],
            &[0, 2, 2, 3, 7],
        ];
        let data = items_from_counts(table);
        assert!(data.iter().all(|item| item.len() == 14));
        assert_close(fleiss_kappa(&data), 0.210, 5e-4);
        assert_close(fleiss_kappa(&data), 0.20993070442195522, TOL);
    }

    /// Wikipedia, "Cohen's kappa", worked example: 50 items; both yes 20,
    /// A yes / B no 5, A no / B yes 10, both no 15; published kappa = 0.4.
    /// References: `sklearn.metrics.cohen_kappa_score(a, b)` = 0.4,
    /// statsmodels `fleiss_kappa` = 0.3939393939393937,
    /// `krippendorff.alpha(..., level_of_measurement="nominal")` = 0.4.
    #[test]
    fn cohen_wikipedia_example() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (count, x, y) in [
            (20, "yes", "yes"),
            (5, "yes", "no"),
            (10, "no", "yes"),
            (15, "no", "no"),
        ] {
            for _ in 0..count {
                a.push(x.to_string());
                b.push(y.to_string());
            }
        }
        assert_close(cohen_kappa(&a, &b), 0.4, TOL);
        let data: Vec<ItemLabels> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| vec![(1, x.clone()), (2, y.clone())])
            .collect();
        let report = agreement(&data);
        assert_close(Some(report.observed), 0.7, TOL);
        assert_close(report.cohen_kappa, 0.4, TOL);
        assert_close(report.fleiss_kappa, 0.3939393939393937, TOL);
        assert_close(report.krippendorff_alpha, 0.4, TOL);
    }

    /// Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability",
    /// example with 4 coders, 12 units and missing values; published
    /// nominal alpha = 0.743 and interval alpha = 0.849. References from
    /// `krippendorff.alpha(reliability_data=..., level_of_measurement="nominal")`
    /// = 0.743421052631579 and `level_of_measurement="interval"` = 0.8491071428571428.
    #[test]
    fn krippendorff_2011_example() {
        const M: f64 = f64::NAN; // missing value
        #[rustfmt::skip]
        let matrix: &[&[f64]] = &[
            // unit 1   2   3   4   5   6   7   8   9  10  11  12
            &[      1., 2., 3., 3., 2., 1., 4., 1., 2., M,  M,  M ], // coder A
            &[      1., 2., 3., 3., 2., 2., 4., 1., 2., 5., M,  3.], // coder B
            &[      M,  3., 3., 3., 2., 3., 4., 2., 2., 5., 1., M ], // coder C
            &[      1., 2., 3., 3., 2., 4., 4., 1., 2., 5., 1., M ], // coder D
        ];
        let units = units_from_matrix(matrix);
        assert_eq!(units.len(), 12);
        let nominal = nominal_from_units(&units);
        assert_close(krippendorff_alpha_nominal(&nominal), 0.743, 5e-4);
        assert_close(krippendorff_alpha_nominal(&nominal), 0.743421052631579, TOL);
        assert_close(krippendorff_alpha_interval(&units), 0.849, 5e-4);
        assert_close(krippendorff_alpha_interval(&units), 0.8491071428571428, TOL);
        assert_close(
            agreement(&nominal).krippendorff_alpha,
            0.743421052631579,
            TOL,
        );
    }

    // ---- larger pseudo-random case ---------------------------------------------

    /// 30 items, annotators 1..=3 with missing labels, categories a..d, generated
    /// by the LCG in `tests/agreement_reference.py` (section 4).
    const RANDOM_ITEMS: &[&[(i64, &str)]] = &[
        &[(1, "b"), (2, "c"), (3, "c")],
        &[(1, "b"), (2, "d"), (3, "b")],
        &[(1, "b"), (3, "c")],
        &[(1, "a"), (2, "a"), (3, "a")],
        &[(2, "a"), (3, "a")],
        &[(1, "b"), (2, "c"), (3, "c")],
        &[(1, "d"), (2, "d"), (3, "d")],
        &[(1, "d")],
        &[(1, "c"), (2, "c")],
        &[(1, "a"), (3, "a")],
        &[(1, "b"), (2, "c"), (3, "c")],
        &[(1, "d"), (3, "b")],
        &[(1, "c"), (2, "c"), (3, "c")],
        &[(1, "c"), (2, "c"), (3, "a")],
        &[(1, "c"), (2, "a"), (3, "a")],
        &[(1, "c"), (2, "c"), (3, "c")],
        &[(1, "b"), (2, "b"), (3, "d")],
        &[(1, "a"), (2, "b"), (3, "d")],
        &[(1, "a"), (2, "a")],
        &[(1, "d"), (3, "c")],
        &[(2, "d")],
        &[(1, "b"), (2, "b")],
        &[(1, "d"), (2, "d"), (3, "d")],
        &[(1, "d"), (2, "a"), (3, "a")],
        &[(1, "c"), (2, "b"), (3, "c")],
        &[(3, "a")],
        &[(1, "c"), (2, "d"), (3, "b")],
        &[(1, "b"), (2, "b"), (3, "b")],
        &[(1, "a"), (2, "b"), (3, "a")],
        &[(1, "c"), (2, "c"), (3, "c")],
    ];

    /// Reference values printed by `tests/agreement_reference.py`:
    /// * observed: direct computation in the script (mean pairwise agreement);
    /// * Fleiss: `statsmodels.stats.inter_rater.fleiss_kappa(table, method="fleiss")`
    ///   over the 19 items with the modal count of 3 labels;
    /// * alpha: `krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal")`
    ///   and `"interval"` with a, b, c, d coded as 1, 2, 3, 4;
    /// * Cohen: `sklearn.metrics.cohen_kappa_score(ann1, ann2)` over the 22 items
    ///   labelled by both annotators 1 and 2.
    #[test]
    fn random_case_matches_python_references() {
        let data = items(RANDOM_ITEMS);
        let report = agreement(&data);
        assert_eq!(
            (report.items, report.labels, report.annotators),
            (30, 76, 3)
        );
        assert_close(Some(report.observed), 0.5679012345679013, TOL);
        assert_eq!(report.cohen_kappa, None); // three annotators
        assert_close(report.fleiss_kappa, 0.3746835443037975, TOL);
        assert_close(report.krippendorff_alpha, 0.41254462009178994, TOL);

        let numeric: Vec<Vec<(i64, f64)>> = data
            .iter()
            .map(|item| {
                item.iter()
                    .map(|(a, c)| (*a, f64::from(c.as_bytes()[0] - b'a' + 1)))
                    .collect()
            })
            .collect();
        assert_close(
            krippendorff_alpha_interval(&numeric),
            0.41955835962145105,
            TOL,
        );

        let (mut ann1, mut ann2) = (Vec::new(), Vec::new());
        for item in &data {
            let find = |who| item.iter().find(|(a, _)| *a == who).map(|(_, c)| c.clone());
            if let (Some(x), Some(y)) = (find(1), find(2)) {
                ann1.push(x);
                ann2.push(y);
            }
        }
        assert_eq!(ann1.len(), 22);
        assert_close(cohen_kappa(&ann1, &ann2), 0.37142857142857144, TOL);
    }
}
