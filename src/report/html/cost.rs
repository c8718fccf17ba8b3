//! Cost: top-1 against milliseconds per image, and against denoiser evaluations per
//! image where the predictions table has a `denoiser_evals` column; one point per method.

use serde::Serialize;

use super::robustness::figure;
use super::rows::Committed;
use super::svg::{self, Axis, Point};

#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub points: Vec<CostPoint>,
    /// Whether any predictions file had `denoiser_evals`.
    pub has_denoiser_evals: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostPoint {
    pub series: String,
    /// Rows with a prediction.
    pub predicted: u64,
    /// Top-1 after adaptation over every labelled row (all variants).
    pub top1: Option<f64>,
    /// Mean `adapt_ms` over predicted rows.
    pub ms_per_image: f64,
    /// Mean `denoiser_evals` over predicted rows that have it.
    pub denoiser_evals_per_image: Option<f64>,
}

pub fn compute(c: &Committed) -> Cost {
    let points = c
        .series
        .iter()
        .enumerate()
        .map(|(s, name)| {
            let (mut predicted, mut ms, mut labelled, mut right, mut evals, mut with_evals) =
                (0u64, 0.0, 0u64, 0u64, 0i64, 0u64);
            for r in c.predictions.iter().filter(|r| r.series == s && r.pred_after.is_some()) {
                predicted += 1;
                ms += r.adapt_ms;
                if let Some(l) = r.label {
                    labelled += 1;
                    right += (r.pred_after == Some(l)) as u64;
                }
                if let Some(e) = r.denoiser_evals {
                    evals += e;
                    with_evals += 1;
                }
            }
            CostPoint {
                series: name.clone(),
                predicted,
                top1: (labelled > 0).then(|| right as f64 / labelled as f64),
                ms_per_image: ms / predicted.max(1) as f64,
                denoiser_evals_per_image: (with_evals > 0).then(|| evals as f64 / with_evals as f64),
            }
        })
        .collect();
    Cost {
        points,
        has_denoiser_evals: c.has_denoiser_evals,
    }
}

pub fn render(cost: &Cost) -> String {
    let mut h = String::new();
    let shown: Vec<(usize, &CostPoint)> = cost
        .points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.top1.is_some())
        .collect();
    if shown.is_empty() {
        return "<p>No labelled predictions: accuracy against cost needs labels.</p>".into();
    }
    let describe = |unit: &str, x: &dyn Fn(&CostPoint) -> Option<f64>| {
        shown
            .iter()
            .filter_map(|(_, p)| Some(format!("{} {:.1}% at {:.3} {unit}", p.series, 100.0 * p.top1?, x(p)?)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let points: Vec<Point> = shown
        .iter()
        .map(|(s, p)| Point {
            series: *s,
            label: p.series.clone(),
            x: p.ms_per_image,
            y: p.top1.unwrap_or(f64::NAN),
        })
        .collect();
    let chart = svg::scatter(
        &points,
        &Axis::log("milliseconds per image (log scale)"),
        &Axis::percent("top-1 over all variants"),
        "top-1 against milliseconds per image",
    );
    let caption = format!(
        "Top-1 over every labelled row against the adaptation time per image (adapt_ms, log scale), one point per \
         method: up and to the left is better. {}.",
        describe("ms per image", &|p| Some(p.ms_per_image))
    );
    figure(&mut h, &chart, &caption);
    if !cost.has_denoiser_evals {
        h.push_str("<p>The predictions have no <code>denoiser_evals</code> column, so there is no chart against denoiser evaluations.</p>");
        return h;
    }
    let points: Vec<Point> = shown
        .iter()
        .filter_map(|(s, p)| {
            Some(Point {
                series: *s,
                label: p.series.clone(),
                x: p.denoiser_evals_per_image?,
                y: p.top1?,
            })
        })
        .collect();
    let chart = svg::scatter(
        &points,
        &Axis::linear("denoiser evaluations per image"),
        &Axis::percent("top-1 over all variants"),
        "top-1 against denoiser evaluations per image",
    );
    let caption = format!(
        "Top-1 against the mean number of denoiser evaluations per image (the denoiser_evals column), one point per \
         method; methods without a denoiser sit at zero. {}.",
        describe("evaluations per image", &|p| p.denoiser_evals_per_image)
    );
    figure(&mut h, &chart, &caption);
    h
}
