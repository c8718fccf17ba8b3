//! Dense tasks: dataset-level segmentation and depth metrics per method and variant,
//! from the sums in the shards' commit records (mIoU from per-class intersections and unions summed
//! over the dataset; depth errors over all valid pixels), before and after adaptation, and
//! heatmaps of mIoU and depth delta1 per method and variant.

use std::fmt::Write;

use serde::Serialize;

use super::robustness::figure;
use super::rows::Committed;
use super::svg::{esc, heatmap};
use crate::sample::Variant;

/// One (method, variant) cell group.
#[derive(Debug, Clone, Serialize)]
pub struct DenseTableRow {
    pub series: String,
    pub variant: String,
    /// Images scored against a label, and their labelled (or valid) pixels.
    pub images: u64,
    pub pixels: u64,
    /// Segmentation (%): dataset mIoU and pixel accuracy; `None` for depth.
    pub miou_before: Option<f64>,
    pub miou_after: Option<f64>,
    pub pixel_acc_after: Option<f64>,
    /// Depth: AbsRel, RMSE (m) and delta1 after adaptation, AbsRel before.
    pub abs_rel_before: Option<f64>,
    pub abs_rel_after: Option<f64>,
    pub rmse_after: Option<f64>,
    pub delta1_after: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Dense {
    pub rows: Vec<DenseTableRow>,
}

pub fn compute(c: &Committed) -> Dense {
    let mut rows: Vec<DenseTableRow> = c
        .dense
        .iter()
        .map(|((series, variant), d)| {
            let (before, after) = (d.depth(false), d.depth(true));
            DenseTableRow {
                series: c.series[*series].clone(),
                variant: variant.clone(),
                images: d.scored,
                pixels: d.pixels,
                miou_before: d.miou(false).map(|v| v * 100.0),
                miou_after: d.miou(true).map(|v| v * 100.0),
                pixel_acc_after: d.pixel_acc(true).map(|v| v * 100.0),
                abs_rel_before: before.map(|t| t.0),
                abs_rel_after: after.map(|t| t.0),
                rmse_after: after.map(|t| t.1),
                delta1_after: after.map(|t| t.2),
            }
        })
        .collect();
    // Clean first, then the corruptions in tag order; methods in series order.
    let order = |v: &str| {
        (
            v.parse::<Variant>().map_or(true, |v| v.corruption.is_some()),
            v.to_string(),
        )
    };
    rows.sort_by(|a, b| (order(&a.variant), &a.series).cmp(&(order(&b.variant), &b.series)));
    Dense { rows }
}

/// A heatmap of `value` (in %) per series and variant, `None` when no row has it.
fn chart(d: &Dense, value: fn(&DenseTableRow) -> Option<f64>, label: &str) -> Option<String> {
    let rows: Vec<&DenseTableRow> = d.rows.iter().filter(|r| value(r).is_some()).collect();
    if rows.is_empty() {
        return None;
    }
    let mut series: Vec<String> = Vec::new();
    let mut variants: Vec<String> = Vec::new();
    for r in &rows {
        if !series.contains(&r.series) {
            series.push(r.series.clone());
        }
        if !variants.contains(&r.variant) {
            variants.push(r.variant.clone());
        }
    }
    let cells: Vec<Vec<Option<f64>>> = series
        .iter()
        .map(|s| {
            variants
                .iter()
                .map(|v| {
                    let row = rows.iter().find(|r| &r.series == s && &r.variant == v)?;
                    value(row).map(|x| x / 100.0)
                })
                .collect()
        })
        .collect();
    Some(heatmap(&series, &variants, &cells, label))
}

pub fn render(d: &Dense) -> String {
    let mut h = String::new();
    let f = |v: Option<f64>, digits: usize| v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"));
    h.push_str(
        "<div class=\"wide\"><table><thead><tr><th>method</th><th>variant</th><th class=\"num\">images</th>\
         <th class=\"num\">mIoU before (%)</th><th class=\"num\">mIoU after (%)</th><th class=\"num\">pixel acc (%)</th>\
         <th class=\"num\">AbsRel before</th><th class=\"num\">AbsRel after</th><th class=\"num\">RMSE (m)</th>\
         <th class=\"num\">&#948;1</th></tr></thead><tbody>",
    );
    for r in &d.rows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td></tr>",
            esc(&r.series),
            esc(&r.variant),
            r.images,
            f(r.miou_before, 1),
            f(r.miou_after, 1),
            f(r.pixel_acc_after, 1),
            f(r.abs_rel_before, 4),
            f(r.abs_rel_after, 4),
            f(r.rmse_after, 3),
            f(r.delta1_after, 3),
        );
    }
    h.push_str("</tbody></table></div>");
    let _ = write!(
        h,
        "<p class=\"caption\">Dataset-level metrics of the dense outputs, one row per method and variant \
         ({} rows): mIoU from intersections and unions summed per class over every labelled pixel \
         (not a mean of per-image values), depth errors averaged over every valid pixel; before is the \
         unadapted model on the same images. The Top-1 sections above do not apply to dense outputs.</p>",
        d.rows.len()
    );
    let miou: fn(&DenseTableRow) -> Option<f64> = |r| r.miou_after;
    let delta1: fn(&DenseTableRow) -> Option<f64> = |r| r.delta1_after.map(|v| v * 100.0);
    for (metric, label, value) in [
        ("mIoU after adaptation (%)", "dense mIoU", miou),
        ("depth \u{3b4}1 after adaptation (%)", "dense delta1", delta1),
    ] {
        if let Some(chart) = chart(d, value, label) {
            let caption = format!(
                "{metric} per method (rows) and variant (columns), from the table above; darker is higher, \
                 and higher is better."
            );
            figure(&mut h, &chart, &caption);
        }
    }
    h
}
