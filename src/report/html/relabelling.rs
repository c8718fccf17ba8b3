//! Relabelling: how many predictions adaptation changed (after against before), the most
//! frequent changes, whether they fixed or broke labelled images, and how confident the
//! model is before and after.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::robustness::figure;
use super::rows::Committed;
use super::svg::{self, esc, Axis};

/// Confidence histogram bins: [0, 0.1), ..., [0.9, 1.0].
const BINS: usize = 10;
/// Confusion pairs listed per method.
const TOP_PAIRS: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Relabelling {
    pub series: Vec<SeriesChanges>,
    /// Bin edges of the confidence histograms.
    pub confidence_edges: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeriesChanges {
    pub series: String,
    /// Rows with a prediction before and after adaptation.
    pub compared: u64,
    pub changed: u64,
    pub share_changed: Option<f64>,
    /// The most frequent (before, after) pairs among changed rows, most frequent first.
    pub top_pairs: Vec<ChangePair>,
    /// Changed rows with a label, split by whether they were right before and after.
    pub split: Option<Split>,
    /// Rows per confidence bin, before and after adaptation.
    pub confidence_before: Vec<u64>,
    pub confidence_after: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangePair {
    pub before: i64,
    pub after: i64,
    pub rows: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Split {
    pub labelled_changed: u64,
    /// Right before, wrong after: adaptation broke it.
    pub right_to_wrong: u64,
    /// Wrong before, right after: adaptation fixed it.
    pub wrong_to_right: u64,
    /// Wrong before and after, with a different wrong class.
    pub wrong_to_wrong: u64,
}

fn bin(conf: f32) -> usize {
    ((conf.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1)
}

pub fn compute(c: &Committed) -> Relabelling {
    let series = c
        .series
        .iter()
        .enumerate()
        .map(|(s, name)| {
            let mut out = SeriesChanges {
                series: name.clone(),
                compared: 0,
                changed: 0,
                share_changed: None,
                top_pairs: Vec::new(),
                split: None,
                confidence_before: vec![0; BINS],
                confidence_after: vec![0; BINS],
            };
            let mut pairs: BTreeMap<(i64, i64), u64> = BTreeMap::new();
            let mut split = Split::default();
            for r in c.predictions.iter().filter(|r| r.series == s) {
                if let Some(conf) = r.conf_before {
                    out.confidence_before[bin(conf)] += 1;
                }
                if let Some(conf) = r.conf_after {
                    out.confidence_after[bin(conf)] += 1;
                }
                let (Some(before), Some(after)) = (r.pred_before, r.pred_after) else {
                    continue;
                };
                out.compared += 1;
                if before == after {
                    continue;
                }
                out.changed += 1;
                *pairs.entry((before, after)).or_default() += 1;
                if let Some(label) = r.label {
                    split.labelled_changed += 1;
                    match (before == label, after == label) {
                        (true, _) => split.right_to_wrong += 1,
                        (false, true) => split.wrong_to_right += 1,
                        (false, false) => split.wrong_to_wrong += 1,
                    }
                }
            }
            out.share_changed = (out.compared > 0).then(|| out.changed as f64 / out.compared as f64);
            let mut pairs: Vec<ChangePair> = pairs
                .into_iter()
                .map(|((before, after), rows)| ChangePair { before, after, rows })
                .collect();
            // Most frequent first; ties by class, so the list is deterministic.
            pairs.sort_by(|a, b| b.rows.cmp(&a.rows).then((a.before, a.after).cmp(&(b.before, b.after))));
            pairs.truncate(TOP_PAIRS);
            out.top_pairs = pairs;
            out.split = (split.labelled_changed > 0).then_some(split);
            out
        })
        .collect();
    Relabelling {
        series,
        confidence_edges: (0..=BINS).map(|i| i as f64 / BINS as f64).collect(),
    }
}

pub fn render(r: &Relabelling) -> String {
    let mut h = String::new();
    h.push_str(
        "<table><thead><tr><th>method</th><th class=\"num\">compared</th><th class=\"num\">changed</th>\
         <th class=\"num\">share changed</th><th class=\"num\">right &#8594; wrong</th>\
         <th class=\"num\">wrong &#8594; right</th><th class=\"num\">wrong &#8594; other wrong</th></tr></thead><tbody>",
    );
    for s in &r.series {
        let split = |f: fn(&Split) -> u64| s.split.as_ref().map_or("n/a".into(), |x| f(x).to_string());
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&s.series),
            s.compared,
            s.changed,
            s.share_changed.map_or("n/a".into(), |x| format!("{:.2}%", 100.0 * x)),
            split(|x| x.right_to_wrong),
            split(|x| x.wrong_to_right),
            split(|x| x.wrong_to_wrong)
        );
    }
    h.push_str("</tbody></table>");
    let words: Vec<String> = r
        .series
        .iter()
        .map(|s| {
            let mut w = format!(
                "{} changed {} of {} predictions ({})",
                s.series,
                s.changed,
                s.compared,
                s.share_changed.map_or("n/a".into(), |x| format!("{:.2}%", 100.0 * x))
            );
            if let Some(x) = &s.split {
                let _ = write!(
                    w,
                    ", fixing {} and breaking {} labelled images ({} went from one wrong class to another)",
                    x.wrong_to_right, x.right_to_wrong, x.wrong_to_wrong
                );
            }
            w
        })
        .collect();
    let _ = write!(
        h,
        "<p class=\"caption\">Predictions after adaptation against each row's own prediction before it (pred_before: \
         the classifier unadapted for episodic methods; for online methods the adapting stream before its update, \
         and for DUSA online the same forward as after). {}. \
         Where no label exists the split reads n/a.</p>",
        esc(&words.join("; "))
    );
    for s in r.series.iter().filter(|s| !s.top_pairs.is_empty()) {
        let pairs: Vec<String> = s
            .top_pairs
            .iter()
            .map(|p| {
                format!(
                    "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    p.before, p.after, p.rows
                )
            })
            .collect();
        let _ = write!(
            h,
            "<details open><summary>{}: the {} most frequent changes, class before &#8594; class after</summary>\
             <table class=\"narrow\"><thead><tr><th class=\"num\">before</th><th class=\"num\">after</th>\
             <th class=\"num\">rows</th></tr></thead><tbody>{}</tbody></table></details>",
            esc(&s.series),
            s.top_pairs.len(),
            pairs.join("")
        );
    }
    // One histogram: each method after adaptation, and the unadapted classifier once
    // (taken from the first method, whose rows saw the same images).
    let mut series: Vec<(usize, String, Vec<u64>)> = Vec::new();
    if let Some(first) = r.series.first() {
        series.push((6, "before adaptation".into(), first.confidence_before.clone()));
    }
    for (i, s) in r.series.iter().enumerate() {
        series.push((i, format!("{} after", s.series), s.confidence_after.clone()));
    }
    let mean = |counts: &[u64]| {
        let total = counts.iter().sum::<u64>();
        (total > 0).then(|| {
            counts
                .iter()
                .enumerate()
                .map(|(b, &n)| n as f64 * (b as f64 + 0.5) / BINS as f64)
                .sum::<f64>()
                / total as f64
        })
    };
    let described: Vec<String> = series
        .iter()
        .map(|(_, name, counts)| {
            let high = counts.last().copied().unwrap_or(0);
            let total = counts.iter().sum::<u64>().max(1);
            format!(
                "{name}: {:.1}% of images at confidence 0.9 or more, binned mean {}",
                100.0 * high as f64 / total as f64,
                mean(counts).map_or("n/a".into(), |m| format!("{m:.2}"))
            )
        })
        .collect();
    let caption = format!(
        "Distribution of the top-1 confidence (softmax probability of the predicted class) in bins of 0.1, as a share of \
         each method's images. {}.",
        described.join("; ")
    );
    let chart = svg::histogram(
        &r.confidence_edges,
        &series,
        &Axis::linear("top-1 confidence"),
        "confidence histogram",
    );
    figure(&mut h, &chart, &caption);
    h
}
