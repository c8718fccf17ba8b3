//! Dense predictions (segmentation masks, depth maps) and their per-image metrics.
//!
//! Invariants: a model's output is upsampled bilinearly (`align_corners = false`, as
//! SegFormer's evaluation does) to the classifier crop, the geometry of the label
//! (`image::dense`), before the argmax or the depth is read. Metrics only look at
//! labelled pixels (class != 255, depth > 0); a label without any gives no metrics.

use tch::{Device, Kind, Tensor};

use crate::image::dense::IGNORE;
use crate::image::DenseLabel;
use crate::sample::Task;

/// One dense prediction at crop size, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum DenseMap {
    /// A class index per pixel.
    Segmentation(Vec<u8>),
    /// Depth in metres per pixel.
    Depth(Vec<f32>),
}

/// A row's dense predictions before and after adaptation (`side x side` each), and
/// their metrics once scored against the label ([`DenseRow::score`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DenseRow {
    pub side: u32,
    pub before: DenseMap,
    pub after: DenseMap,
    /// The prediction each adaptation step saw (step `i` at index `i`, as the steps
    /// table's rows). Held only until [`DenseRow::score`], which drops them: at real size
    /// they are the largest part of a row.
    pub steps: Vec<DenseMap>,
    pub metrics_before: Option<DenseMetrics>,
    pub metrics_after: Option<DenseMetrics>,
    /// Per step, the metrics of `steps[i]` (the steps table's label metrics).
    pub step_metrics: Vec<Option<DenseMetrics>>,
}

impl DenseRow {
    pub fn new(side: u32, before: DenseMap, after: DenseMap) -> DenseRow {
        DenseRow {
            side,
            before,
            after,
            steps: Vec::new(),
            metrics_before: None,
            metrics_after: None,
            step_metrics: Vec::new(),
        }
    }

    /// With the predictions seen during each adaptation step.
    pub fn with_steps(self, steps: Vec<DenseMap>) -> DenseRow {
        DenseRow { steps, ..self }
    }

    /// Sets every metric against `label` (over `classes` classes for masks) and drops the
    /// per-step maps. Call it after every class index is final (label spaces map them
    /// first).
    pub fn score(&mut self, label: &DenseLabel, classes: usize) {
        let side = self.side as usize;
        self.metrics_before = metrics(&self.before, label, classes, side);
        self.metrics_after = metrics(&self.after, label, classes, side);
        self.step_metrics = std::mem::take(&mut self.steps)
            .iter()
            .map(|m| metrics(m, label, classes, side))
            .collect();
    }

    /// Rewrites every class index of every mask (label spaces); depth is left alone.
    pub fn map_classes(&mut self, class: impl Fn(i64) -> i64) {
        for map in [&mut self.before, &mut self.after].into_iter().chain(&mut self.steps) {
            if let DenseMap::Segmentation(mask) = map {
                mask.iter_mut().for_each(|c| *c = class(*c as i64) as u8);
            }
        }
    }
}

/// Host copies of the dense predictions of a model output `[B,K,h,w]` (segmentation
/// logits) or `[B,1,h,w]` (depth, metres), upsampled to `side x side`.
pub fn maps(output: &Tensor, task: Task, side: u32) -> Result<Vec<DenseMap>, tch::TchError> {
    let side = side as i64;
    let up = output
        .detach()
        .to_kind(Kind::Float)
        .f_upsample_bilinear2d([side, side], false, None, None)?;
    let b = up.size()[0] as usize;
    let n = (side * side) as usize;
    Ok(match task {
        Task::Segmentation => {
            let classes = Vec::<i64>::try_from(up.argmax(1, false).to_device(Device::Cpu).flatten(0, -1))?;
            (0..b)
                .map(|i| DenseMap::Segmentation(classes[i * n..(i + 1) * n].iter().map(|&c| c as u8).collect()))
                .collect()
        }
        Task::Depth => {
            let depth = Vec::<f32>::try_from(up.to_device(Device::Cpu).flatten(0, -1))?;
            (0..b)
                .map(|i| DenseMap::Depth(depth[i * n..(i + 1) * n].to_vec()))
                .collect()
        }
        Task::Classification => unreachable!("dense maps of a classifier"),
    })
}

/// Per-image segmentation metrics, and the per-class sums a dataset-level mIoU adds up.
#[derive(Debug, Clone, PartialEq)]
pub struct SegMetrics {
    /// Share of labelled pixels predicted right (`correct / labelled`).
    pub pixel_acc: f32,
    pub correct: i64,
    pub labelled: i64,
    /// Mean IoU over the classes present in the label or the prediction (labelled pixels).
    pub miou: f32,
    /// Per class (index = class): labelled pixels both predicted and labelled so, and
    /// predicted or labelled so.
    pub intersections: Vec<i64>,
    pub unions: Vec<i64>,
}

/// Per-image depth metrics over valid pixels, and the sums a dataset-level average over
/// valid pixels adds up.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthMetrics {
    pub abs_rel: f32,
    pub rmse: f32,
    /// Share of valid pixels with max(d/d*, d*/d) < 1.25.
    pub delta1: f32,
    /// SSIM of the two depth maps (11x11 Gaussian window, sigma 1.5, C1/C2 on the
    /// label's dynamic range), over the whole crop.
    pub ssim: f32,
    pub valid_pixels: i64,
    pub abs_rel_sum: f64,
    pub sq_err_sum: f64,
    pub delta1_count: i64,
}

/// Segmentation metrics of `mask` against `label` (same length) over `classes` classes;
/// `None` when the label marks no pixel. Classes at or over `classes` are counted as
/// wrong, never indexed.
pub fn segmentation_metrics(mask: &[u8], label: &[u8], classes: usize) -> Option<SegMetrics> {
    let mut inter = vec![0i64; classes];
    let mut pred_n = vec![0i64; classes];
    let mut label_n = vec![0i64; classes];
    let (mut valid, mut correct) = (0i64, 0i64);
    for (&p, &l) in mask.iter().zip(label) {
        if l == IGNORE {
            continue;
        }
        valid += 1;
        let (p, l) = (p as usize, l as usize);
        if let Some(n) = pred_n.get_mut(p) {
            *n += 1;
        }
        if let Some(n) = label_n.get_mut(l) {
            *n += 1;
        }
        if p == l {
            correct += 1;
            if let Some(i) = inter.get_mut(l) {
                *i += 1;
            }
        }
    }
    if valid == 0 {
        return None;
    }
    let unions: Vec<i64> = (0..classes).map(|c| pred_n[c] + label_n[c] - inter[c]).collect();
    let ious: Vec<f64> = (0..classes)
        .filter(|&c| unions[c] > 0)
        .map(|c| inter[c] as f64 / unions[c] as f64)
        .collect();
    Some(SegMetrics {
        pixel_acc: correct as f32 / valid as f32,
        correct,
        labelled: valid,
        miou: (ious.iter().sum::<f64>() / ious.len().max(1) as f64) as f32,
        intersections: inter,
        unions,
    })
}

/// Depth metrics of `pred` against `label` (metres, `side x side`); `None` without a
/// valid label pixel. Predictions are clamped to at least 1 mm before the ratios.
pub fn depth_metrics(pred: &[f32], label: &[f32], side: usize) -> Option<DepthMetrics> {
    let (mut valid, mut abs_rel, mut sq, mut d1) = (0i64, 0f64, 0f64, 0i64);
    for (&p, &g) in pred.iter().zip(label) {
        if !(g > 0.0 && g.is_finite()) {
            continue;
        }
        let p = (p as f64).max(1e-3);
        let g = g as f64;
        valid += 1;
        abs_rel += (p - g).abs() / g;
        sq += (p - g).powi(2);
        if (p / g).max(g / p) < 1.25 {
            d1 += 1;
        }
    }
    if valid == 0 {
        return None;
    }
    let n = valid as f64;
    Some(DepthMetrics {
        abs_rel: (abs_rel / n) as f32,
        rmse: (sq / n).sqrt() as f32,
        delta1: (d1 as f64 / n) as f32,
        ssim: ssim(pred, label, side),
        valid_pixels: valid,
        abs_rel_sum: abs_rel,
        sq_err_sum: sq,
        delta1_count: d1,
    })
}

/// Mean SSIM (Wang et al. 2004) of two `side x side` maps: 11x11 Gaussian window with
/// sigma 1.5 (truncated at the border and renormalised), K1 = 0.01, K2 = 0.03 and the
/// dynamic range L = the label's max minus min.
pub fn ssim(a: &[f32], b: &[f32], side: usize) -> f32 {
    let range = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max) - b.iter().cloned().fold(f32::INFINITY, f32::min);
    let l = if range > 0.0 { range as f64 } else { 1.0 };
    let (c1, c2) = ((0.01 * l).powi(2), (0.03 * l).powi(2));
    let g: Vec<f64> = (-5..=5)
        .map(|i: i32| (-(i * i) as f64 / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let mut total = 0.0;
    for y in 0..side {
        for x in 0..side {
            let (mut w, mut ma, mut mb, mut aa, mut bb, mut ab) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
            for dy in -5i64..=5 {
                for dx in -5i64..=5 {
                    let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                    if yy < 0 || xx < 0 || yy >= side as i64 || xx >= side as i64 {
                        continue;
                    }
                    let k = g[(dy + 5) as usize] * g[(dx + 5) as usize];
                    let i = yy as usize * side + xx as usize;
                    let (va, vb) = (a[i] as f64, b[i] as f64);
                    w += k;
                    ma += k * va;
                    mb += k * vb;
                    aa += k * va * va;
                    bb += k * vb * vb;
                    ab += k * va * vb;
                }
            }
            let (ma, mb) = (ma / w, mb / w);
            let (va, vb, cov) = (aa / w - ma * ma, bb / w - mb * mb, ab / w - ma * mb);
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2));
        }
    }
    (total / (side * side) as f64) as f32
}

/// The metrics of one dense prediction against its label, by task.
#[derive(Debug, Clone, PartialEq)]
pub enum DenseMetrics {
    Segmentation(SegMetrics),
    Depth(DepthMetrics),
}

/// Metrics of `map` against `label`, `None` when they do not match in kind or the label
/// has no labelled pixel.
pub fn metrics(map: &DenseMap, label: &DenseLabel, classes: usize, side: usize) -> Option<DenseMetrics> {
    match (map, label) {
        (DenseMap::Segmentation(m), DenseLabel::Segmentation(l)) => {
            segmentation_metrics(m, l, classes).map(DenseMetrics::Segmentation)
        }
        (DenseMap::Depth(d), DenseLabel::Depth(l)) => depth_metrics(d, l, side).map(DenseMetrics::Depth),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segmentation_metrics_count_labelled_pixels_only() {
        // label: 0 0 1 255 ; prediction: 0 1 1 2
        let m = segmentation_metrics(&[0, 1, 1, 2], &[0, 0, 1, IGNORE], 3).unwrap();
        assert_eq!(m.pixel_acc, 2.0 / 3.0);
        assert_eq!(m.intersections, [1, 1, 0]);
        assert_eq!(m.unions, [2, 2, 0]);
        // Classes 0 and 1 present: IoU 1/2 each; class 2 only on an ignored pixel.
        assert_eq!(m.miou, 0.5);
        assert_eq!(segmentation_metrics(&[1], &[IGNORE], 3), None);
        // A predicted class beyond the table is wrong, not a panic.
        let m = segmentation_metrics(&[7], &[0], 3).unwrap();
        assert_eq!((m.pixel_acc, m.miou), (0.0, 0.0));
    }

    #[test]
    fn depth_metrics_follow_their_definitions() {
        let label = [1.0, 2.0, 4.0, 0.0];
        let pred = [1.1, 2.0, 2.0, 9.0];
        let m = depth_metrics(&pred, &label, 2).unwrap();
        assert_eq!(m.valid_pixels, 3);
        assert!((m.abs_rel - ((0.1 + 0.0 + 0.5) / 3.0) as f32).abs() < 1e-6);
        assert!((m.rmse - ((0.01f64 + 0.0 + 4.0) / 3.0).sqrt() as f32).abs() < 1e-6);
        assert!((m.delta1 - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(depth_metrics(&[1.0], &[0.0], 1), None);
    }

    #[test]
    fn ssim_is_one_for_identical_maps_and_lower_otherwise() {
        let a: Vec<f32> = (0..64).map(|i| (i % 8) as f32 + (i / 8) as f32 * 0.5).collect();
        assert!((ssim(&a, &a, 8) - 1.0).abs() < 1e-6);
        let b: Vec<f32> = a.iter().rev().cloned().collect();
        assert!(ssim(&b, &a, 8) < 0.5);
    }

    #[test]
    fn maps_upsample_before_the_argmax() {
        // 2 classes on a 1x2 grid; upsampled to 4x4, the left half is class 0.
        let logits = Tensor::from_slice(&[1.0f32, -1.0, -1.0, 1.0]).view([1, 2, 1, 2]);
        let m = maps(&logits, Task::Segmentation, 4).unwrap();
        let DenseMap::Segmentation(mask) = &m[0] else { panic!() };
        assert_eq!(&mask[..4], &[0, 0, 1, 1]);
        let depth = Tensor::from_slice(&[1.0f32, 3.0]).view([1, 1, 1, 2]);
        let DenseMap::Depth(d) = &maps(&depth, Task::Depth, 4).unwrap()[0] else {
            panic!()
        };
        assert_eq!(&d[..4], &[1.0, 1.5, 2.5, 3.0]);
    }
}
