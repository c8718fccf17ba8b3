//! The predictions table's dense columns (segmentation and depth tasks), after the
//! classification ones. Masks and depth maps are PNGs at the label's (the crop's)
//! size; metrics are per image, and the `*_sum`/`intersections`/`unions` columns are
//! what a dataset-level metric adds up (`dtta summarize`): mIoU from per-class sums,
//! depth metrics averaged over valid pixels, never means of per-image values.

use std::io::Cursor;
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder};
use arrow_array::{ArrayRef, BinaryArray, Float32Array, Float64Array, Int64Array};
use arrow_schema::{DataType, Field};
use image::{ImageBuffer, Luma};
use serde::{Deserialize, Serialize};

use super::predictions::Layout;
use crate::sample::Task;
use crate::tta::dense::{DenseMetrics, DepthMetrics, SegMetrics};
use crate::tta::{DenseMap, Outcome, StepRecord};

/// The dense columns of `task`, in order.
pub fn fields(task: Task) -> Vec<Field> {
    let f32_pair = |name: &str| {
        [
            Field::new(format!("{name}_before"), DataType::Float32, true),
            Field::new(format!("{name}_after"), DataType::Float32, true),
        ]
    };
    let list = DataType::List(Arc::new(Field::new("item", DataType::Int64, true)));
    let mut fields = Vec::new();
    match task {
        Task::Segmentation => {
            fields.push(Field::new("mask_before", DataType::Binary, true));
            fields.push(Field::new("mask_after", DataType::Binary, true));
            fields.extend(f32_pair("pixel_acc"));
            fields.extend(f32_pair("miou"));
            fields.push(Field::new("intersections_after", list.clone(), true));
            fields.push(Field::new("unions_after", list, true));
        }
        Task::Depth => {
            fields.push(Field::new("depth_before", DataType::Binary, true));
            fields.push(Field::new("depth_after", DataType::Binary, true));
            for m in ["abs_rel", "rmse", "delta1", "ssim"] {
                fields.extend(f32_pair(m));
            }
            fields.push(Field::new("valid_pixels", DataType::Int64, true));
            fields.push(Field::new("abs_rel_sum_after", DataType::Float64, true));
            fields.push(Field::new("sq_err_sum_after", DataType::Float64, true));
            fields.push(Field::new("delta1_count_after", DataType::Int64, true));
        }
        Task::Classification => {}
    }
    fields
}

/// Encodes a mask (8-bit) or a depth map (16-bit, units of `depth_scale` metres,
/// clamped to 1..=65535 so that a prediction never reads as invalid) as PNG.
fn png(map: &DenseMap, side: u32, depth_scale: f64) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    let written = match map {
        DenseMap::Segmentation(mask) => ImageBuffer::<Luma<u8>, _>::from_raw(side, side, mask.clone())
            .expect("a mask is side x side")
            .write_to(&mut out, image::ImageFormat::Png),
        DenseMap::Depth(d) => {
            let units: Vec<u16> = d
                .iter()
                .map(|&m| (m as f64 / depth_scale).round().clamp(1.0, 65535.0) as u16)
                .collect();
            ImageBuffer::<Luma<u16>, _>::from_raw(side, side, units)
                .expect("a depth map is side x side")
                .write_to(&mut out, image::ImageFormat::Png)
        }
    };
    written.expect("PNG encoding into memory cannot fail");
    out.into_inner()
}

/// A row's metrics before and after adaptation, where it was scored.
type Scored = (Option<DenseMetrics>, Option<DenseMetrics>);

/// The dense columns for `rows`, matching [`fields`].
pub fn columns(layout: &Layout, rows: &[Outcome]) -> Vec<ArrayRef> {
    let encoded = |after: bool| -> ArrayRef {
        Arc::new(BinaryArray::from_iter(rows.iter().map(|r| {
            r.dense
                .as_ref()
                .map(|d| png(if after { &d.after } else { &d.before }, d.side, layout.depth_scale))
        })))
    };
    // (before, after) metrics per row, where a label exists (scored by the writer).
    let scored: Vec<Scored> = rows
        .iter()
        .map(|r| match &r.dense {
            Some(d) => (d.metrics_before.clone(), d.metrics_after.clone()),
            None => (None, None),
        })
        .collect();
    let seg = |m: &Option<DenseMetrics>| match m {
        Some(DenseMetrics::Segmentation(s)) => Some(s.clone()),
        _ => None,
    };
    let depth = |m: &Option<DenseMetrics>| match m {
        Some(DenseMetrics::Depth(d)) => Some(d.clone()),
        _ => None,
    };
    let pair = |get: &dyn Fn(&Scored, bool) -> Option<f32>| -> [ArrayRef; 2] {
        [false, true].map(|after| Arc::new(Float32Array::from_iter(scored.iter().map(|s| get(s, after)))) as ArrayRef)
    };
    let mut columns = vec![encoded(false), encoded(true)];
    match layout.task {
        Task::Segmentation => {
            let get = |f: fn(&SegMetrics) -> f32| {
                move |s: &Scored, after: bool| seg(if after { &s.1 } else { &s.0 }).map(|m| f(&m))
            };
            columns.extend(pair(&get(|m| m.pixel_acc)));
            columns.extend(pair(&get(|m| m.miou)));
            let mut inter = ListBuilder::new(Int64Builder::new());
            let mut union = ListBuilder::new(Int64Builder::new());
            for (_, after) in &scored {
                match seg(after) {
                    Some(m) => {
                        inter.values().append_slice(&m.intersections);
                        inter.append(true);
                        union.values().append_slice(&m.unions);
                        union.append(true);
                    }
                    None => {
                        inter.append(false);
                        union.append(false);
                    }
                }
            }
            columns.push(Arc::new(inter.finish()));
            columns.push(Arc::new(union.finish()));
        }
        Task::Depth => {
            let get = |f: fn(&DepthMetrics) -> f32| {
                move |s: &Scored, after: bool| depth(if after { &s.1 } else { &s.0 }).map(|m| f(&m))
            };
            columns.extend(pair(&get(|m| m.abs_rel)));
            columns.extend(pair(&get(|m| m.rmse)));
            columns.extend(pair(&get(|m| m.delta1)));
            columns.extend(pair(&get(|m| m.ssim)));
            let after: Vec<Option<DepthMetrics>> = scored.iter().map(|s| depth(&s.1)).collect();
            columns.push(Arc::new(Int64Array::from_iter(
                after.iter().map(|m| m.as_ref().map(|m| m.valid_pixels)),
            )));
            columns.push(Arc::new(Float64Array::from_iter(
                after.iter().map(|m| m.as_ref().map(|m| m.abs_rel_sum)),
            )));
            columns.push(Arc::new(Float64Array::from_iter(
                after.iter().map(|m| m.as_ref().map(|m| m.sq_err_sum)),
            )));
            columns.push(Arc::new(Int64Array::from_iter(
                after.iter().map(|m| m.as_ref().map(|m| m.delta1_count)),
            )));
        }
        Task::Classification => unreachable!("dense columns of a classification table"),
    }
    columns
}

/// The metrics the steps table adds for `task`, by column name.
fn step_metric_names(task: Task) -> &'static [&'static str] {
    match task {
        Task::Segmentation => &["pixel_acc", "miou"],
        Task::Depth => &["abs_rel", "rmse", "delta1", "ssim"],
        Task::Classification => &[],
    }
}

/// The steps table's dense columns (after the classification ones): the metrics of the
/// prediction each step saw, against the label; null where the row has no label.
pub fn step_fields(task: Task) -> Vec<Field> {
    step_metric_names(task)
        .iter()
        .map(|name| Field::new(*name, DataType::Float32, true))
        .collect()
}

/// The columns of [`step_fields`] for the steps table's rows `(outcome, step)`.
pub fn step_columns(task: Task, rows: &[(&Outcome, &StepRecord)]) -> Vec<ArrayRef> {
    let value = |m: &DenseMetrics, name: &str| -> Option<f32> {
        match (m, name) {
            (DenseMetrics::Segmentation(s), "pixel_acc") => Some(s.pixel_acc),
            (DenseMetrics::Segmentation(s), "miou") => Some(s.miou),
            (DenseMetrics::Depth(d), "abs_rel") => Some(d.abs_rel),
            (DenseMetrics::Depth(d), "rmse") => Some(d.rmse),
            (DenseMetrics::Depth(d), "delta1") => Some(d.delta1),
            (DenseMetrics::Depth(d), "ssim") => Some(d.ssim),
            _ => None,
        }
    };
    step_metric_names(task)
        .iter()
        .map(|name| {
            Arc::new(Float32Array::from_iter(rows.iter().map(|(o, s)| {
                let scored = o.dense.as_ref()?.step_metrics.get(s.step as usize)?.as_ref()?;
                value(scored, name)
            }))) as ArrayRef
        })
        .collect()
}

/// Dataset-level dense sums of a shard, run or output (in commit markers and run
/// summaries): what `summarize` turns into mIoU, pixel accuracy and depth metrics over
/// all labelled pixels. Before and after adaptation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DenseTally {
    /// Rows scored against a label.
    pub scored: u64,
    /// Segmentation: per-class intersections and unions, and labelled pixels right.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intersections_before: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unions_before: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intersections_after: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unions_after: Vec<u64>,
    /// Labelled (segmentation) or valid (depth) pixels.
    pub pixels: u64,
    #[serde(default)]
    pub correct_before: u64,
    #[serde(default)]
    pub correct_after: u64,
    /// Depth: sums over valid pixels of |d - d*| / d*, (d - d*)^2, and delta1 hits.
    #[serde(default)]
    pub abs_rel_before: f64,
    #[serde(default)]
    pub abs_rel_after: f64,
    #[serde(default)]
    pub sq_err_before: f64,
    #[serde(default)]
    pub sq_err_after: f64,
    #[serde(default)]
    pub delta1_before: u64,
    #[serde(default)]
    pub delta1_after: u64,
}

/// Adds `b` into `a` element-wise, growing `a` as needed.
fn add_into(a: &mut Vec<u64>, b: impl IntoIterator<Item = u64>) {
    for (i, v) in b.into_iter().enumerate() {
        if i == a.len() {
            a.push(0);
        }
        a[i] += v;
    }
}

impl DenseTally {
    /// Adds one scored row (metrics before and after of the same kind).
    pub fn add(&mut self, before: &DenseMetrics, after: &DenseMetrics) {
        match (before, after) {
            (DenseMetrics::Segmentation(b), DenseMetrics::Segmentation(a)) => {
                add_into(
                    &mut self.intersections_before,
                    b.intersections.iter().map(|&v| v as u64),
                );
                add_into(&mut self.unions_before, b.unions.iter().map(|&v| v as u64));
                add_into(&mut self.intersections_after, a.intersections.iter().map(|&v| v as u64));
                add_into(&mut self.unions_after, a.unions.iter().map(|&v| v as u64));
                self.pixels += a.labelled as u64;
                self.correct_before += b.correct as u64;
                self.correct_after += a.correct as u64;
            }
            (DenseMetrics::Depth(b), DenseMetrics::Depth(a)) => {
                self.pixels += a.valid_pixels as u64;
                self.abs_rel_before += b.abs_rel_sum;
                self.abs_rel_after += a.abs_rel_sum;
                self.sq_err_before += b.sq_err_sum;
                self.sq_err_after += a.sq_err_sum;
                self.delta1_before += b.delta1_count as u64;
                self.delta1_after += a.delta1_count as u64;
            }
            _ => return,
        }
        self.scored += 1;
    }

    pub fn merge(&mut self, o: &DenseTally) {
        self.scored += o.scored;
        add_into(&mut self.intersections_before, o.intersections_before.iter().copied());
        add_into(&mut self.unions_before, o.unions_before.iter().copied());
        add_into(&mut self.intersections_after, o.intersections_after.iter().copied());
        add_into(&mut self.unions_after, o.unions_after.iter().copied());
        self.pixels += o.pixels;
        self.correct_before += o.correct_before;
        self.correct_after += o.correct_after;
        self.abs_rel_before += o.abs_rel_before;
        self.abs_rel_after += o.abs_rel_after;
        self.sq_err_before += o.sq_err_before;
        self.sq_err_after += o.sq_err_after;
        self.delta1_before += o.delta1_before;
        self.delta1_after += o.delta1_after;
    }

    /// Whether these are segmentation sums (per-class tables present).
    pub fn is_segmentation(&self) -> bool {
        !self.unions_after.is_empty()
    }

    /// Dataset-level mIoU: per class, summed intersections over summed unions, averaged
    /// over the classes with a non-empty union.
    pub fn miou(&self, after: bool) -> Option<f64> {
        let (i, u) = if after {
            (&self.intersections_after, &self.unions_after)
        } else {
            (&self.intersections_before, &self.unions_before)
        };
        let ious: Vec<f64> = i
            .iter()
            .zip(u)
            .filter(|(_, &u)| u > 0)
            .map(|(&i, &u)| i as f64 / u as f64)
            .collect();
        (!ious.is_empty()).then(|| ious.iter().sum::<f64>() / ious.len() as f64)
    }

    /// Share of labelled pixels right.
    pub fn pixel_acc(&self, after: bool) -> Option<f64> {
        let c = if after { self.correct_after } else { self.correct_before };
        (self.pixels > 0 && self.is_segmentation()).then(|| c as f64 / self.pixels as f64)
    }

    /// Depth metrics over all valid pixels: (AbsRel, RMSE, delta1).
    pub fn depth(&self, after: bool) -> Option<(f64, f64, f64)> {
        if self.pixels == 0 || self.is_segmentation() {
            return None;
        }
        let n = self.pixels as f64;
        Some(if after {
            (
                self.abs_rel_after / n,
                (self.sq_err_after / n).sqrt(),
                self.delta1_after as f64 / n,
            )
        } else {
            (
                self.abs_rel_before / n,
                (self.sq_err_before / n).sqrt(),
                self.delta1_before as f64 / n,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tta::dense::{depth_metrics, segmentation_metrics};

    #[test]
    fn dataset_miou_sums_before_dividing() {
        let mut t = DenseTally::default();
        // Image 1: class 1 perfect on 1 pixel. Image 2: class 1 wrong on 3 of 3 pixels.
        let a = segmentation_metrics(&[0, 1], &[0, 1], 2).unwrap();
        let b = segmentation_metrics(&[0, 0, 0, 0], &[0, 1, 1, 1], 2).unwrap();
        t.add(&DenseMetrics::Segmentation(a.clone()), &DenseMetrics::Segmentation(a));
        let mut u = DenseTally::default();
        u.add(&DenseMetrics::Segmentation(b.clone()), &DenseMetrics::Segmentation(b));
        t.merge(&u);
        // Class 0: I = 1 + 1, U = 1 + 4; class 1: I = 1, U = 1 + 3.
        let expected = (2.0 / 5.0 + 1.0 / 4.0) / 2.0;
        assert!((t.miou(true).unwrap() - expected).abs() < 1e-12);
        assert_eq!(t.pixel_acc(true), Some(3.0 / 6.0));
        assert_eq!(t.scored, 2);
        assert_eq!(t.depth(true), None);
    }

    #[test]
    fn dataset_depth_metrics_average_over_valid_pixels() {
        let mut t = DenseTally::default();
        let a = depth_metrics(&[2.0], &[1.0], 1).unwrap();
        let b = depth_metrics(&[1.0, 1.0, 1.0], &[1.0, 1.0, 1.0], 1).unwrap();
        t.add(&DenseMetrics::Depth(a.clone()), &DenseMetrics::Depth(a));
        t.add(&DenseMetrics::Depth(b.clone()), &DenseMetrics::Depth(b));
        let (abs_rel, rmse, d1) = t.depth(true).unwrap();
        assert!((abs_rel - 0.25).abs() < 1e-12, "{abs_rel}");
        assert!((rmse - 0.5).abs() < 1e-12);
        assert!((d1 - 0.75).abs() < 1e-12);
        assert_eq!(t.miou(true), None);
    }
}
