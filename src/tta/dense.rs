//! Dense predictions (segmentation masks, depth maps) and their per-image metrics.
//!
//! Invariants: a model's output is upsampled bilinearly (`align_corners = false`, as
//! SegFormer's evaluation does) to the classifier crop, the geometry of the label
//! (`image::dense`), before the argmax or the depth is read. Metrics only look at
//! labelled pixels (class != 255, finite depth > 0); a label without any gives no
//! metrics. A non-finite depth prediction at a labelled pixel gives no metrics either
//! (never a plausible score): see [`depth_metrics`], and [`finite_per_image`] /
//! [`DenseMap::is_finite`] for flagging such a row.

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

impl DenseMap {
    /// Whether every value of the map is finite: false for a depth map with a NaN or
    /// infinite pixel (anywhere, labelled or not). A mask is always finite here, since
    /// the argmax in [`maps`] already turned non-finite logits into some class: check
    /// the model output itself with [`finite_per_image`] to catch those.
    pub fn is_finite(&self) -> bool {
        match self {
            DenseMap::Segmentation(_) => true,
            DenseMap::Depth(d) => d.iter().all(|v| v.is_finite()),
        }
    }
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
/// logits) or `[B,1,h,w]` (depth, metres), upsampled to `side x side`. Non-finite depth
/// values are kept as they are (and [`depth_metrics`] refuses to score them); non-finite
/// logits are hidden by the argmax, so a caller that must know checks the output with
/// [`finite_per_image`].
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

/// Per image of a model output `[B, ...]` (the one given to [`maps`]), whether all of
/// its values are finite. A method calls it on the logits or depth it maps, and marks an
/// image whose output is not finite (diverged, source kept, ...) instead of reporting a
/// mask argmax'ed out of NaNs or a depth map that cannot be scored.
pub fn finite_per_image(output: &Tensor) -> Result<Vec<bool>, tch::TchError> {
    let finite = output
        .detach()
        .f_isfinite()?
        .f_flatten(1, -1)?
        .f_all_dim(1, false)?
        .f_to_kind(Kind::Int64)?
        .to_device(Device::Cpu);
    Ok(Vec::<i64>::try_from(finite)?.into_iter().map(|f| f != 0).collect())
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
    /// SSIM of the two depth maps over valid pixels ([`ssim`]: 11x11 Gaussian window,
    /// sigma 1.5, C1/C2 on the valid label pixels' dynamic range).
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

/// Whether a depth label pixel is valid (labelled): finite and over 0.
fn valid_depth(g: f32) -> bool {
    g > 0.0 && g.is_finite()
}

/// Depth metrics of `pred` against `label` (metres, `side x side`) over the valid label
/// pixels (finite, over 0). `None` without a valid label pixel, and `None` when the
/// prediction at any valid pixel is not finite (NaN or infinite): such a map has no
/// honest score, and no metric may read it as a plausible depth (the row's columns stay
/// null and the dataset tally skips it; [`DenseMap::is_finite`] tells why). Finite
/// predictions are clamped to at least 1 mm before the ratios (a regression head may
/// predict 0 or less); predictions at invalid pixels are never read.
pub fn depth_metrics(pred: &[f32], label: &[f32], side: usize) -> Option<DepthMetrics> {
    let (mut valid, mut abs_rel, mut sq, mut d1) = (0i64, 0f64, 0f64, 0i64);
    for (&p, &g) in pred.iter().zip(label) {
        if !valid_depth(g) {
            continue;
        }
        if !p.is_finite() {
            return None;
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
        ssim: ssim(pred, label, side)?,
        valid_pixels: valid,
        abs_rel_sum: abs_rel,
        sq_err_sum: sq,
        delta1_count: d1,
    })
}

/// The dynamic range L of SSIM: the valid label values' max minus min (1 when they are
/// all equal); `None` without a valid pixel. Invalid pixels (0 or less, non-finite)
/// never widen it.
fn valid_range(label: &[f32], valid: &[bool]) -> Option<f64> {
    let (lo, hi) = label
        .iter()
        .zip(valid)
        .filter(|(_, &v)| v)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (&g, _)| {
            (lo.min(g as f64), hi.max(g as f64))
        });
    (lo <= hi).then(|| if hi > lo { hi - lo } else { 1.0 })
}

/// Mean SSIM (Wang et al. 2004) of a predicted depth map `pred` against its `label`
/// (`side x side`), over the label's valid pixels only (finite, over 0; as
/// [`depth_metrics`]): K1 = 0.01, K2 = 0.03 and the dynamic range L of the valid label
/// values (`valid_range`); the local means, variances and covariance at a pixel use
/// the 11x11 Gaussian window (sigma 1.5) restricted to the valid pixels in it, its
/// weights renormalised over them (as at the crop border, where the window is
/// truncated); the SSIM map is averaged over the valid pixels. So neither the
/// prediction nor the label at an invalid pixel is ever read. `None` without a valid
/// pixel, or when the prediction at a valid pixel is not finite.
pub fn ssim(pred: &[f32], label: &[f32], side: usize) -> Option<f32> {
    let n = side * side;
    let valid: Vec<bool> = (0..n).map(|i| label.get(i).is_some_and(|&g| valid_depth(g))).collect();
    if (0..n).any(|i| valid[i] && !pred.get(i).is_some_and(|p| p.is_finite())) {
        return None;
    }
    let l = valid_range(label, &valid)?;
    let (c1, c2) = ((0.01 * l).powi(2), (0.03 * l).powi(2));
    let g: Vec<f64> = (-5..=5)
        .map(|i: i32| (-(i * i) as f64 / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let (mut total, mut centres) = (0.0, 0usize);
    for y in 0..side {
        for x in 0..side {
            if !valid[y * side + x] {
                continue;
            }
            let (mut w, mut ma, mut mb, mut aa, mut bb, mut ab) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
            for dy in -5i64..=5 {
                for dx in -5i64..=5 {
                    let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                    if yy < 0 || xx < 0 || yy >= side as i64 || xx >= side as i64 {
                        continue;
                    }
                    let i = yy as usize * side + xx as usize;
                    if !valid[i] {
                        continue;
                    }
                    let k = g[(dy + 5) as usize] * g[(dx + 5) as usize];
                    let (va, vb) = (pred[i] as f64, label[i] as f64);
                    w += k;
                    ma += k * va;
                    mb += k * vb;
                    aa += k * va * va;
                    bb += k * vb * vb;
                    ab += k * va * vb;
                }
            }
            // The centre is valid, so w > 0.
            let (ma, mb) = (ma / w, mb / w);
            let (va, vb, cov) = (aa / w - ma * ma, bb / w - mb * mb, ab / w - ma * mb);
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            centres += 1;
        }
    }
    Some((total / centres as f64) as f32)
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
        let a: Vec<f32> = (0..64).map(|i| 1.0 + (i % 8) as f32 + (i / 8) as f32 * 0.5).collect();
        assert!((ssim(&a, &a, 8).unwrap() - 1.0).abs() < 1e-6);
        let b: Vec<f32> = a.iter().rev().cloned().collect();
        assert!(ssim(&b, &a, 8).unwrap() < 0.5);
    }

    #[test]
    fn depth_metrics_never_score_a_non_finite_prediction() {
        let label = [1.0, 2.0, 4.0, 0.0];
        // Before: NaN.max(1e-3) read as a 1 mm prediction, a plausible row.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(depth_metrics(&[bad, 2.0, 4.0, 1.0], &label, 2), None, "{bad}");
            assert_eq!(
                depth_metrics(&[1.0, 2.0, 4.0, 1.0], &[1.0, 2.0, 4.0, bad], 2).map(|m| m.valid_pixels),
                Some(3),
                "{bad} label"
            );
        }
        // At an invalid label pixel the prediction is not read at all.
        let finite = depth_metrics(&[1.1, 2.0, 2.0, 9.0], &label, 2).unwrap();
        assert_eq!(depth_metrics(&[1.1, 2.0, 2.0, f32::NAN], &label, 2), Some(finite));
        // A finite prediction of 0 or less is still clamped to 1 mm.
        let m = depth_metrics(&[-5.0], &[1.0], 1).unwrap();
        assert!((m.abs_rel - 0.999).abs() < 1e-6);
        assert_eq!(ssim(&[f32::NAN], &[1.0], 1), None);
        assert_eq!(ssim(&[1.0], &[0.0], 1), None);
    }

    /// A 16x16 depth label with a smooth valid part and invalid pixels of every kind
    /// (0, negative, NaN, infinite), and a prediction close to it.
    fn partly_valid() -> (Vec<f32>, Vec<f32>, Vec<usize>) {
        let side = 16;
        let mut label: Vec<f32> = (0..side * side)
            .map(|i| 2.0 + (i % side) as f32 * 0.1 + (i / side) as f32 * 0.05)
            .collect();
        let invalid: Vec<usize> = (0..side * side).filter(|i| (i * 7) % 5 == 0 || i / side < 2).collect();
        for (k, &i) in invalid.iter().enumerate() {
            label[i] = [0.0, -3.0, f32::NAN, f32::INFINITY][k % 4];
        }
        let pred: Vec<f32> = (0..side * side)
            .map(|i| 2.0 + (i % side) as f32 * 0.09 + ((i * 13) % 7) as f32 * 0.02)
            .collect();
        (label, pred, invalid)
    }

    #[test]
    fn ssim_reads_valid_pixels_only() {
        let (label, pred, invalid) = partly_valid();
        let base = ssim(&pred, &label, 16).unwrap();
        assert!(base > 0.0 && base < 1.0, "{base}");
        // Any prediction at an invalid pixel, NaN included, and any invalid label value.
        let (mut p2, mut l2) = (pred.clone(), label.clone());
        for (k, &i) in invalid.iter().enumerate() {
            p2[i] = [1e6, -50.0, f32::NAN, 0.0][k % 4];
            l2[i] = [-1000.0, 0.0, f32::NEG_INFINITY, f32::NAN][k % 4];
        }
        assert_eq!(ssim(&p2, &l2, 16), Some(base));
        assert_eq!(depth_metrics(&p2, &l2, 16), depth_metrics(&pred, &label, 16));
        // A prediction equal to the label where it is valid scores 1, whatever it says
        // elsewhere.
        let mut exact = label.clone();
        for &i in &invalid {
            exact[i] = 50.0;
        }
        assert!((ssim(&exact, &label, 16).unwrap() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ssim_range_is_that_of_valid_label_pixels() {
        let (label, _, _) = partly_valid();
        let valid: Vec<bool> = label.iter().map(|&g| valid_depth(g)).collect();
        let values: Vec<f64> = label.iter().filter(|&&g| valid_depth(g)).map(|&g| g as f64).collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!(valid_range(&label, &valid), Some(hi - lo));
        // Neither the 0 and -3 pixels nor the infinite ones widen it.
        assert!(lo > 2.0 && hi < 4.3, "{lo} {hi}");
        assert_eq!(valid_range(&[3.0, 0.0, 3.0], &[true, false, true]), Some(1.0));
        assert_eq!(valid_range(&[3.0], &[false]), None);
    }

    #[test]
    fn non_finite_outputs_are_flagged_per_image() {
        let out = Tensor::from_slice(&[1.0f32, 2.0, 3.0, f32::NAN, 5.0, f32::INFINITY]).view([3, 1, 1, 2]);
        assert_eq!(finite_per_image(&out).unwrap(), [true, false, false]);
        assert!(DenseMap::Depth(vec![1.0, 2.0]).is_finite());
        assert!(!DenseMap::Depth(vec![1.0, f32::NAN]).is_finite());
        assert!(DenseMap::Segmentation(vec![0, 255]).is_finite());
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
