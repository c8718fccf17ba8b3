//! Adaptation dynamics: mean loss, entropy and confidence per step from the steps table,
//! per method, with the 10th to 90th percentile band over images.

use std::collections::BTreeMap;

use serde::Serialize;

use super::bootstrap::quantile_sorted;
use super::robustness::figure;
use super::rows::Committed;
use super::svg::{self, Axis, Line};

#[derive(Debug, Clone, Serialize)]
pub struct Dynamics {
    pub series: Vec<SeriesSteps>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeriesSteps {
    pub series: String,
    pub steps: Vec<StepStat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepStat {
    pub step: i32,
    /// Steps rows (images and variants) at this step.
    pub rows: usize,
    pub loss: Band,
    pub entropy: Band,
    pub conf: Band,
}

/// A mean with the 10th and 90th percentiles.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Band {
    pub mean: f64,
    pub p10: f64,
    pub p90: f64,
}

fn band(mut v: Vec<f64>) -> Band {
    v.sort_by(f64::total_cmp);
    Band {
        mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
        p10: quantile_sorted(&v, 0.1),
        p90: quantile_sorted(&v, 0.9),
    }
}

pub fn compute(c: &Committed) -> Dynamics {
    type Values = (Vec<f64>, Vec<f64>, Vec<f64>);
    let mut by: BTreeMap<(usize, i32), Values> = BTreeMap::new();
    for r in &c.steps {
        let e = by.entry((r.series, r.step)).or_default();
        e.0.push(r.loss as f64);
        e.1.push(r.entropy as f64);
        e.2.push(r.conf as f64);
    }
    let mut series: Vec<SeriesSteps> = Vec::new();
    for ((s, step), (loss, entropy, conf)) in by {
        let name = &c.series[s];
        if series.last().is_none_or(|x| &x.series != name) {
            series.push(SeriesSteps {
                series: name.clone(),
                steps: Vec::new(),
            });
        }
        let last = series.last_mut().expect("pushed above");
        last.steps.push(StepStat {
            step,
            rows: loss.len(),
            loss: band(loss),
            entropy: band(entropy),
            conf: band(conf),
        });
    }
    Dynamics { series }
}

pub fn render(d: &Dynamics, all_series: &[String]) -> String {
    if d.series.is_empty() {
        return "<p>No steps rows: no committed output of an adaptive method that logs steps (diffusion-tta does).</p>"
            .into();
    }
    let mut h = String::new();
    type Pick = fn(&StepStat) -> Band;
    let metrics: [(&str, &str, Pick); 3] = [
        ("diffusion loss", "loss", |s| s.loss),
        ("entropy of the softmax (nats)", "entropy", |s| s.entropy),
        ("top-1 confidence", "confidence", |s| s.conf),
    ];
    h.push_str(r#"<div class="row">"#);
    for (title, word, pick) in metrics {
        let lines: Vec<Line> = d
            .series
            .iter()
            .map(|s| Line {
                series: all_series.iter().position(|x| x == &s.series).unwrap_or(0),
                name: s.series.clone(),
                points: s
                    .steps
                    .iter()
                    .map(|st| {
                        let b = pick(st);
                        (st.step as f64, b.mean, b.p10, b.p90)
                    })
                    .collect(),
            })
            .collect();
        let trend: Vec<String> = d
            .series
            .iter()
            .filter_map(|s| {
                let (first, last) = (s.steps.first()?, s.steps.last()?);
                Some(format!(
                    "{} from {:.3} at step {} to {:.3} at step {} ({} rows per step)",
                    s.series,
                    pick(first).mean,
                    first.step,
                    pick(last).mean,
                    last.step,
                    first.rows
                ))
            })
            .collect();
        let caption = format!(
            "Mean {word} per adaptation step, with a band from the 10th to the 90th percentile over images: {}.",
            trend.join("; ")
        );
        let chart = svg::lines(&lines, &Axis::linear("step"), &Axis::linear(title), title);
        figure(&mut h, &chart, &caption);
    }
    h.push_str("</div>");
    h
}
