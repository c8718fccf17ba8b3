//! The diffusion model's noise schedule, as a bundle's `[diffusion.schedule]` states it.

/// `kind` of a bundle's `[diffusion.schedule]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// DiT: betas evenly spaced from beta_start to beta_end.
    Linear,
    /// Stable Diffusion: square roots of the betas evenly spaced.
    ScaledLinear,
}

/// Cumulative products of (1 - beta_t), t = 0..steps, computed in f64.
pub fn alphas_cumprod(kind: ScheduleKind, beta_start: f64, beta_end: f64, steps: usize) -> Vec<f64> {
    let at = |i: usize, a: f64, b: f64| {
        if steps == 1 {
            a
        } else {
            a + (b - a) * i as f64 / (steps - 1) as f64
        }
    };
    let mut acc = 1.0;
    (0..steps)
        .map(|i| {
            let beta = match kind {
                ScheduleKind::Linear => at(i, beta_start, beta_end),
                ScheduleKind::ScaledLinear => at(i, beta_start.sqrt(), beta_end.sqrt()).powi(2),
            };
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_dit() {
        let a = alphas_cumprod(ScheduleKind::Linear, 1e-4, 0.02, 1000);
        assert_eq!(a.len(), 1000);
        assert!((a[0] - (1.0 - 1e-4)).abs() < 1e-12);
        // Known value of the DiT schedule's last abar (about 4.04e-5).
        assert!((a[999] - 4.0358e-5).abs() < 1e-7, "{}", a[999]);
        assert!(a.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn scaled_linear_matches_stable_diffusion() {
        let a = alphas_cumprod(ScheduleKind::ScaledLinear, 0.00085, 0.012, 1000);
        assert!((a[0] - (1.0 - 0.00085)).abs() < 1e-12);
        assert!((a[999] - 0.0047).abs() < 1e-4, "{}", a[999]);
    }
}
