//! Random numbers: a local xoshiro256** generator and the draws dtta needs (uniform,
//! integer, normal, Poisson), with numpy's conventions where they matter.
//!
//! Every random draw that shapes a result comes from an [`Rng`] owned by the code that
//! draws, seeded from (run seed, sample key, ...): the corruptions' pixels and the
//! diffusion methods' timesteps and noise. Never torch's global generator: it is shared
//! by the whole process (any other user shifts it, parallel tests reseed it) and its
//! CPU and CUDA streams differ for one seed.

use std::f64::consts::TAU;

/// One splitmix64 step (Steele, Lea & Flood): advances `state`, returns a mixed value.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256** (Blackman & Vigna) seeded through splitmix64. Local and fully specified
/// so that a seed's bytes never change with a dependency upgrade (rand's `StdRng`
/// promises no such stability).
pub struct Rng {
    state: [u64; 4],
    /// The second value of the last Box–Muller pair.
    spare_normal: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut mixer = seed;
        Rng {
            state: [(); 4].map(|_| splitmix64(&mut mixer)),
            spare_normal: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform on [0, 1), 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn uniform_in(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }

    /// Uniform integer on [low, high), numpy's `randint` convention; `high > low`.
    pub fn int_in(&mut self, low: i64, high: i64) -> i64 {
        let span = (high - low) as u64;
        low + ((u128::from(self.next_u64()) * u128::from(span)) >> 64) as i64
    }

    /// Standard normal, Box–Muller.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let radius = (-2.0 * (1.0 - self.uniform()).ln()).sqrt();
        let (sin, cos) = (TAU * self.uniform()).sin_cos();
        self.spare_normal = Some(radius * sin);
        radius * cos
    }

    /// Poisson with mean `lambda`, numpy's algorithms: multiplication for `lambda < 10`,
    /// Hörmann's PTRS transformed rejection above (exact, O(1) expected).
    pub fn poisson(&mut self, lambda: f64) -> u64 {
        if lambda <= 0.0 {
            return 0;
        }
        if lambda < 10.0 {
            let limit = (-lambda).exp();
            let mut product = 1.0;
            let mut count = 0;
            loop {
                product *= self.uniform();
                if product <= limit {
                    return count;
                }
                count += 1;
            }
        }
        let sqrt_lambda = lambda.sqrt();
        let log_lambda = lambda.ln();
        let b = 0.931 + 2.53 * sqrt_lambda;
        let a = -0.059 + 0.02483 * b;
        let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
        let v_r = 0.9277 - 3.6224 / (b - 2.0);
        loop {
            let u = self.uniform() - 0.5;
            let v = self.uniform();
            let us = 0.5 - u.abs();
            let k = ((2.0 * a / us + b) * u + lambda + 0.43).floor();
            if us >= 0.07 && v <= v_r {
                return k as u64;
            }
            if k < 0.0 || (us < 0.013 && v > us) {
                continue;
            }
            if v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln() <= -lambda + k * log_lambda - log_gamma(k + 1.0) {
                return k as u64;
            }
        }
    }
}

/// ln Γ(x) for x ≥ 1, numpy's `random_loggam` (Stirling series after shifting x ≥ 7).
fn log_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 10] = [
        8.333333333333333e-02,
        -2.777777777777778e-03,
        7.936507936507937e-04,
        -5.952380952380952e-04,
        8.417508417508418e-04,
        -1.917526917526918e-03,
        6.41025641025641e-03,
        -2.955065359477124e-02,
        1.796443723688307e-01,
        -1.39243221690590e+00,
    ];
    if x == 1.0 || x == 2.0 {
        return 0.0;
    }
    let shift = if x < 7.0 { (7.0 - x).floor() } else { 0.0 };
    let mut x0 = x + shift;
    let inv_sq = 1.0 / (x0 * x0);
    let series = COEFFICIENTS.iter().rev().fold(0.0, |acc, &c| acc * inv_sq + c);
    let mut result = series / x0 + 0.5 * TAU.ln() + (x0 - 0.5) * x0.ln() - x0;
    for _ in 0..shift as u32 {
        x0 -= 1.0;
        result -= x0.ln();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_draws_have_mean_and_variance_lambda() {
        let mut rng = Rng::new(3);
        for lambda in [0.5, 7.0, 10.0, 33.3, 250.0] {
            let n = 40_000;
            let draws: Vec<f64> = (0..n).map(|_| rng.poisson(lambda) as f64).collect();
            let m = draws.iter().sum::<f64>() / n as f64;
            let var = draws.iter().map(|d| (d - m).powi(2)).sum::<f64>() / n as f64;
            assert!(
                (m - lambda).abs() < 4.0 * (lambda / n as f64).sqrt(),
                "lambda {lambda}: mean {m}"
            );
            assert!((var / lambda - 1.0).abs() < 0.05, "lambda {lambda}: variance {var}");
        }
    }
}
