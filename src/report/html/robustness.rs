//! The robustness matrix (top-1 per method and variant, and the mean over corrupted
//! variants) and the gain over source with paired-bootstrap intervals.
//!
//! Gains pair the same image (shard id, key, variant) under a method and under the
//! reference: the `source` method's rows where an output of that method was read, else
//! each row's own prediction before adaptation (the same classifier, unadapted).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

use super::bootstrap::{self, Interval, Spec};
use super::rows::{Committed, PredRow};
use super::svg::{self, esc, Axis};
use crate::sample::Variant;

#[derive(Debug, Clone, Serialize)]
pub struct Robustness {
    pub series: Vec<String>,
    /// Variant tags, clean first.
    pub variants: Vec<String>,
    pub cells: Vec<Cell>,
    /// Per series (same order), the mean of its top-1 over corrupted variants.
    pub mean_corrupted: Vec<Option<f64>>,
    /// What gains are measured against: a series label or `before adaptation`.
    pub reference: String,
    pub gains: Vec<Gain>,
    pub bootstrap: Spec,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub series: String,
    pub variant: String,
    pub labelled: u64,
    pub correct: u64,
    pub top1: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gain {
    pub series: String,
    /// A variant tag, or `all corrupted` for every corrupted variant pooled.
    pub variant: String,
    /// Images with a labelled prediction under both the method and the reference.
    pub pairs: usize,
    #[serde(flatten)]
    pub interval: Interval,
}

/// The row label of pooled corrupted variants.
const ALL_CORRUPTED: &str = "all corrupted";

fn correct(r: &PredRow) -> Option<bool> {
    Some(r.pred_after? == r.label?)
}

pub fn compute(c: &Committed) -> Robustness {
    let variants: BTreeSet<Variant> = c.predictions.iter().map(|r| r.variant).collect();
    let variants: Vec<Variant> = variants.into_iter().collect();
    let mut counts: BTreeMap<(usize, Variant), (u64, u64)> = BTreeMap::new();
    for r in &c.predictions {
        if let Some(ok) = correct(r) {
            let e = counts.entry((r.series, r.variant)).or_default();
            e.0 += 1;
            e.1 += ok as u64;
        }
    }
    let top1 = |s: usize, v: Variant| counts.get(&(s, v)).map(|(n, k)| *k as f64 / *n as f64);
    let mut cells = Vec::new();
    for (s, name) in c.series.iter().enumerate() {
        for &v in &variants {
            let (labelled, correct) = counts.get(&(s, v)).copied().unwrap_or_default();
            cells.push(Cell {
                series: name.clone(),
                variant: v.tag(),
                labelled,
                correct,
                top1: top1(s, v),
            });
        }
    }
    let mean_corrupted = (0..c.series.len())
        .map(|s| {
            let accs: Vec<f64> = variants
                .iter()
                .filter(|v| v.severity > 0)
                .filter_map(|&v| top1(s, v))
                .collect();
            (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64)
        })
        .collect();
    let source = c.series.iter().position(|s| s == "source" || s.starts_with("source ("));
    let (reference, gains) = gains(c, source, &variants);
    Robustness {
        series: c.series.clone(),
        variants: variants.iter().map(|v| v.tag()).collect(),
        cells,
        mean_corrupted,
        reference,
        gains,
        bootstrap: bootstrap::SPEC,
    }
}

fn gains(c: &Committed, source: Option<usize>, variants: &[Variant]) -> (String, Vec<Gain>) {
    // The reference's correctness per image, when a source series exists.
    let reference: BTreeMap<(usize, &str, Variant), bool> = c
        .predictions
        .iter()
        .filter(|r| Some(r.series) == source)
        .filter_map(|r| Some(((r.shard, r.key.as_str(), r.variant), correct(r)?)))
        .collect();
    let mut diffs: BTreeMap<(usize, Option<Variant>), Vec<f64>> = BTreeMap::new();
    for r in c.predictions.iter().filter(|r| Some(r.series) != source) {
        let Some(after) = correct(r) else { continue };
        let before = match source {
            Some(_) => reference.get(&(r.shard, r.key.as_str(), r.variant)).copied(),
            None => r.pred_before.zip(r.label).map(|(p, l)| p == l),
        };
        let Some(before) = before else { continue };
        let d = after as i32 as f64 - before as i32 as f64;
        diffs.entry((r.series, Some(r.variant))).or_default().push(d);
        if r.variant.severity > 0 {
            diffs.entry((r.series, None)).or_default().push(d);
        }
    }
    let mut out = Vec::new();
    for (s, name) in c.series.iter().enumerate() {
        let rows = variants.iter().map(|&v| (Some(v), v.tag())).chain(
            variants
                .iter()
                .any(|v| v.severity > 0)
                .then(|| (None, ALL_CORRUPTED.to_string())),
        );
        for (v, tag) in rows {
            let Some(d) = diffs.get(&(s, v)) else { continue };
            if let Some(interval) = bootstrap::paired(d, bootstrap::SPEC) {
                out.push(Gain {
                    series: name.clone(),
                    variant: tag,
                    pairs: d.len(),
                    interval,
                });
            }
        }
    }
    let reference = source.map_or("before adaptation".to_string(), |s| c.series[s].clone());
    (reference, out)
}

fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{:.1}%", 100.0 * x))
}

pub fn render(r: &Robustness) -> String {
    let mut h = String::new();
    if r.cells.is_empty() {
        return "<p>No committed predictions.</p>".into();
    }
    let corrupted = r.variants.iter().filter(|v| *v != "clean").count();
    let mut cols = r.variants.clone();
    if corrupted > 0 {
        cols.push("mean corrupted".into());
    }
    let values: Vec<Vec<Option<f64>>> = r
        .series
        .iter()
        .enumerate()
        .map(|(s, name)| {
            let mut row: Vec<Option<f64>> = r
                .variants
                .iter()
                .map(|v| {
                    r.cells
                        .iter()
                        .find(|c| &c.series == name && &c.variant == v)
                        .and_then(|c| c.top1)
                })
                .collect();
            if corrupted > 0 {
                row.push(r.mean_corrupted[s]);
            }
            row
        })
        .collect();
    let mut caption = format!(
        "Top-1 accuracy after adaptation (%), one row per method and one column per variant ({} variant(s), {} corrupted){}. ",
        r.variants.len(),
        corrupted,
        if corrupted > 0 { "; the last column is the mean over the corrupted variants" } else { "" }
    );
    let mut ranked: Vec<(usize, f64)> = r
        .mean_corrupted
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((i, (*m)?)))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    if !ranked.is_empty() {
        let list: Vec<String> = ranked
            .iter()
            .map(|(i, m)| format!("{} {}", r.series[*i], pct(Some(*m))))
            .collect();
        let _ = write!(
            caption,
            "Mean over corrupted variants, best first: {}.",
            list.join(", ")
        );
    } else {
        let list: Vec<String> = r
            .cells
            .iter()
            .map(|c| format!("{} {} {}", c.series, c.variant, pct(c.top1)))
            .collect();
        let _ = write!(caption, "Values: {}.", list.join(", "));
    }
    figure(
        &mut h,
        &svg::heatmap(&r.series, &cols, &values, "top-1 by method and variant"),
        &caption,
    );

    h.push_str("<h3>Gain over the reference</h3>");
    let gained: Vec<&String> = r
        .series
        .iter()
        .filter(|s| r.gains.iter().any(|g| &g.series == *s))
        .collect();
    if gained.is_empty() {
        h.push_str("<p>No method to compare with the reference: gains need labelled rows of a second method.</p>");
        return h;
    }
    let mut rows: Vec<String> = r.variants.clone();
    if corrupted > 0 {
        rows.push(ALL_CORRUPTED.into());
    }
    let series: Vec<(usize, String, Vec<Option<Interval>>)> = gained
        .iter()
        .map(|name| {
            let s = r.series.iter().position(|x| x == *name).unwrap_or(0);
            let ivs = rows
                .iter()
                .map(|v| {
                    r.gains
                        .iter()
                        .find(|g| &g.series == *name && &g.variant == v)
                        .map(|g| g.interval)
                })
                .collect();
            (s, (*name).clone(), ivs)
        })
        .collect();
    let pooled: Vec<String> = r
        .gains
        .iter()
        .filter(|g| g.variant == ALL_CORRUPTED || (corrupted == 0 && g.variant == "clean"))
        .map(|g| {
            format!(
                "{} {:+.1} points [{:+.1}, {:+.1}] over {} images",
                g.series,
                100.0 * g.interval.mean,
                100.0 * g.interval.low,
                100.0 * g.interval.high,
                g.pairs
            )
        })
        .collect();
    let caption =
        format!(
        "Top-1 gain over {} in percentage points, per variant: dot the mean paired difference, whiskers its {:.0}% \
         percentile interval from a paired bootstrap over images ({} resamples, seed {}). An interval that excludes \
         the dashed zero line is a gain (or loss) unlikely to be resampling noise. {}: {}.",
        r.reference,
        100.0 * r.bootstrap.level,
        r.bootstrap.resamples,
        r.bootstrap.seed,
        if corrupted > 0 { "Over all corrupted variants" } else { "Overall" },
        if pooled.is_empty() { "n/a".to_string() } else { pooled.join("; ") }
    );
    let chart = svg::intervals(&rows, &series, &Axis::percent("top-1 gain"), "gain over the reference");
    figure(&mut h, &chart, &caption);
    h
}

/// A chart with its caption; the caption is escaped here.
pub fn figure(h: &mut String, chart: &str, caption: &str) {
    let _ = write!(h, "<figure>{chart}<figcaption>{}</figcaption></figure>", esc(caption));
}
