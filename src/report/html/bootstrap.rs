//! The paired bootstrap behind the gain intervals: resample the paired differences
//! (method minus reference, one per key) with replacement, take the mean of each
//! resample, and report the percentile interval.
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
}

pub const SPEC: Spec = Spec {
    seed: SEED,
    resamples: RESAMPLES,
    level: LEVEL,
};

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
/// resamples of the same size; `None` for no data.
pub fn paired(diffs: &[f64], spec: Spec) -> Option<Interval> {
    if diffs.is_empty() {
        return None;
    }
    let n = diffs.len();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let mut rng = SplitMix64(spec.seed);
    let mut means: Vec<f64> = (0..spec.resamples.max(1))
        .map(|_| (0..n).map(|_| diffs[rng.below(n)]).sum::<f64>() / n as f64)
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
    fn quantiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 0.5), 2.5);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert!((quantile_sorted(&v, 0.1) - 1.3).abs() < 1e-12);
    }
}
