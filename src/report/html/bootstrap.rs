//! The bootstrap behind the gain intervals: resample IMAGES with replacement, take the
//! mean over all the paired differences (method minus reference) of the drawn images, and
//! report the percentile interval. An image contributes one difference per variant it
//! appears under; those differences are not independent (the same picture, the same
//! label), so an image's variants are resampled together ([`clustered`]). Resampling
//! them as independent pairs would make the interval of a pool of variants too narrow.
//!
//! The generator is SplitMix64, written out here so that an interval depends only on the
//! data, the seed and the resample count, never on a crate's version.

use serde::Serialize;

/// The seed every report uses; stated on the page.
pub const SEED: u64 = 20_240_601;
/// Resamples per interval.
pub const RESAMPLES: usize = 2000;
/// The interval's coverage.
pub const LEVEL: f64 = 0.95;

/// How the intervals were made, as the page and `report.json` state it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spec {
    pub seed: u64,
    pub resamples: usize,
    pub level: f64,
    /// The resampling unit, in words.
    pub unit: &'static str,
}

pub const SPEC: Spec = Spec {
    seed: SEED,
    resamples: RESAMPLES,
    level: LEVEL,
    unit: UNIT,
};

/// What one bootstrap draw picks, as the page states it.
pub const UNIT: &str = "bootstrap over images; an image's variants are resampled together";

/// A mean with its percentile-bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

/// SplitMix64 (Steele, Lea and Flood 2014): 64 bits of state, passes BigCrush.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An index below `n` (multiply-shift; the bias is below n / 2^64).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

/// The mean of `diffs` and its `spec.level` percentile interval over `spec.resamples`
/// resamples of the same size, each difference independent (one per image); `None` for
/// no data.
pub fn paired(diffs: &[f64], spec: Spec) -> Option<Interval> {
    let singletons: Vec<Vec<f64>> = diffs.iter().map(|d| vec![*d]).collect();
    clustered(&singletons, spec)
}

/// The mean over every difference of `clusters` (one cluster per image: its differences
/// under every variant) and its `spec.level` percentile interval over `spec.resamples`
/// resamples. A resample draws as many clusters as there are, with replacement, and its
/// statistic is the mean over all the differences of the drawn clusters (their sum over
/// their count), so all of an image's variants move together. Empty clusters are
/// dropped; `None` when no difference is left. With one difference per cluster this is
/// [`paired`], draw for draw.
pub fn clustered(clusters: &[Vec<f64>], spec: Spec) -> Option<Interval> {
    let sums: Vec<(f64, usize)> = clusters
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| (c.iter().sum::<f64>(), c.len()))
        .collect();
    if sums.is_empty() {
        return None;
    }
    let k = sums.len();
    let ratio = |drawn: &mut dyn Iterator<Item = (f64, usize)>| {
        let (sum, count) = drawn.fold((0.0, 0usize), |(s, n), (cs, cn)| (s + cs, n + cn));
        sum / count as f64
    };
    let mean = ratio(&mut sums.iter().copied());
    let mut rng = SplitMix64(spec.seed);
    let mut means: Vec<f64> = (0..spec.resamples.max(1))
        .map(|_| ratio(&mut (0..k).map(|_| sums[rng.below(k)])))
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - spec.level) / 2.0;
    Some(Interval {
        mean,
        low: quantile_sorted(&means, tail),
        high: quantile_sorted(&means, 1.0 - tail),
    })
}

/// The `q` quantile of sorted values, linearly interpolated (type 7, as numpy's default).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs for seed 1234567 from the reference C implementation (Vigna).
        let mut rng = SplitMix64(1234567);
        let got: Vec<u64> = (0..3).map(|_| rng.next()).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn constant_differences_give_a_zero_width_interval() {
        let iv = paired(&[0.5; 40], SPEC).unwrap();
        assert_eq!((iv.mean, iv.low, iv.high), (0.5, 0.5, 0.5));
        assert_eq!(paired(&[], SPEC), None);
    }

    #[test]
    fn same_seed_same_interval_other_seed_other_interval() {
        let diffs: Vec<f64> = (0..200).map(|i| [1.0, 0.0, 0.0, -1.0, 1.0][i % 5]).collect();
        let a = paired(&diffs, SPEC).unwrap();
        assert_eq!(Some(a), paired(&diffs, SPEC));
        let other = paired(&diffs, Spec { seed: 7, ..SPEC }).unwrap();
        assert_ne!((a.low, a.high), (other.low, other.high));
        assert!(a.low < a.mean && a.mean < a.high, "{a:?}");
    }

    #[test]
    fn interval_matches_the_normal_approximation_for_a_large_sample() {
        // 3,000 differences, 60% +1 and 40% 0: mean 0.6, standard error sqrt(0.24 / 3000)
        // = 0.008944, so the 95% interval is 0.6 +- 0.01753 up to bootstrap noise.
        let diffs: Vec<f64> = (0..3000).map(|i| if i % 5 < 3 { 1.0 } else { 0.0 }).collect();
        let iv = paired(&diffs, SPEC).unwrap();
        assert!((iv.mean - 0.6).abs() < 1e-12);
        let half = 1.959964 * (0.24f64 / 3000.0).sqrt();
        assert!((iv.low - (0.6 - half)).abs() < 0.003, "{iv:?}");
        assert!((iv.high - (0.6 + half)).abs() < 0.003, "{iv:?}");
    }

    #[test]
    fn clusters_of_one_give_the_paired_interval() {
        let diffs: Vec<f64> = (0..300).map(|i| [1.0, 0.0, -1.0, 1.0, 0.0, 1.0, 0.0][i % 7]).collect();
        let singletons: Vec<Vec<f64>> = diffs.iter().map(|d| vec![*d]).collect();
        assert_eq!(clustered(&singletons, SPEC), paired(&diffs, SPEC));
        assert_eq!(clustered(&[], SPEC), None);
        assert_eq!(clustered(&[vec![], vec![]], SPEC), None);
    }

    /// 300 images under 8 variants (some images miss a variant); an image's differences
    /// lean the same way under every variant, as real ones do.
    fn repeated_images() -> Vec<Vec<f64>> {
        (0..300)
            .map(|i: usize| {
                let variants = if i % 10 == 0 { 5 } else { 8 };
                (0..variants)
                    .map(|v| match (i % 5 < 3, (i + v) % 4 == 0) {
                        (true, false) => 1.0,
                        (false, true) => -1.0,
                        _ => 0.0,
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn repeated_images_widen_the_interval_to_the_cluster_bootstrap() {
        let images = repeated_images();
        let pooled: Vec<f64> = images.iter().flatten().copied().collect();
        let by_image = clustered(&images, SPEC).unwrap();
        let by_pair = paired(&pooled, SPEC).unwrap();

        // By hand: draw images with the same generator, pool every difference of the
        // drawn images, take the mean; percentiles of the sorted means.
        let mut rng = SplitMix64(SEED);
        let mut means = Vec::new();
        for _ in 0..RESAMPLES {
            let mut drawn = Vec::new();
            for _ in 0..images.len() {
                drawn.extend_from_slice(&images[rng.below(images.len())]);
            }
            means.push(drawn.iter().sum::<f64>() / drawn.len() as f64);
        }
        means.sort_by(f64::total_cmp);
        let mean = pooled.iter().sum::<f64>() / pooled.len() as f64;
        assert!((by_image.mean - mean).abs() < 1e-12 && by_image.mean == by_pair.mean);
        assert!(
            (by_image.low - quantile_sorted(&means, 0.025)).abs() < 1e-12,
            "{by_image:?}"
        );
        assert!(
            (by_image.high - quantile_sorted(&means, 0.975)).abs() < 1e-12,
            "{by_image:?}"
        );

        // Far wider than resampling the 2,250 (image, variant) pairs as independent.
        let (wide, narrow) = (by_image.high - by_image.low, by_pair.high - by_pair.low);
        eprintln!("interval width: by image {wide:.4}, by pair {narrow:.4}");
        assert!(wide > 1.8 * narrow, "by image {by_image:?}, by pair {by_pair:?}");

        // And near the normal approximation of the ratio sum_i s_i / sum_i n_i (s_i the
        // sum, n_i the count of image i's differences) under resampling of K images:
        // var = sum_i (s_i - mean n_i)^2 / (K^2 nbar^2), nbar the mean count.
        let k = images.len() as f64;
        let nbar = pooled.len() as f64 / k;
        let var: f64 = images
            .iter()
            .map(|c| (c.iter().sum::<f64>() - mean * c.len() as f64).powi(2))
            .sum::<f64>()
            / (k * k * nbar * nbar);
        let half = 1.959964 * var.sqrt();
        assert!(
            (by_image.low - (mean - half)).abs() < 0.12 * half,
            "{by_image:?} half {half}"
        );
        assert!(
            (by_image.high - (mean + half)).abs() < 0.12 * half,
            "{by_image:?} half {half}"
        );
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 0.5), 2.5);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert!((quantile_sorted(&v, 0.1) - 1.3).abs() < 1e-12);
    }
}
