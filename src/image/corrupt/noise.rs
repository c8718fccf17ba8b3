//! Noise: gaussian, shot and impulse noise, each value independently on [0, 1]; the
//! result is clipped on the way back to 8 bits.

use super::raster::FloatImage;
use super::rng::Rng;

/// make_imagenet_c.py's `gaussian_noise`: `x + N(0, std²)`.
pub(super) fn gaussian_noise(img: &FloatImage, std: f32, rng: &mut Rng) -> FloatImage {
    img.map(|v| v + std * rng.normal() as f32)
}

/// make_imagenet_c.py's `shot_noise`: `poisson(x · photons) / photons`.
pub(super) fn shot_noise(img: &FloatImage, photons: f64, rng: &mut Rng) -> FloatImage {
    img.map(|v| (rng.poisson(f64::from(v) * photons) as f64 / photons) as f32)
}

/// make_imagenet_c.py's `impulse_noise`, skimage's `random_noise(mode='s&p', amount)`:
/// a fraction `amount` of the values becomes 1 or 0 (even odds), the rest is kept.
pub(super) fn impulse_noise(img: &FloatImage, amount: f64, rng: &mut Rng) -> FloatImage {
    img.map(|v| {
        if rng.uniform() >= amount {
            v
        } else if rng.uniform() < 0.5 {
            1.0
        } else {
            0.0
        }
    })
}

#[cfg(test)]
mod tests {
    use crate::image::corrupt::test_images::{flat, mean, variance};
    use crate::image::corrupt::{corrupt, Corruption};
    use crate::image::decode::Channels;

    #[test]
    fn gaussian_noise_has_the_published_std() {
        // Severities whose noise is rarely clipped at 0 or 1 around mid-gray.
        let cases = [
            (63, [0.04, 0.06, 0.08, 0.09, 0.10].as_slice()),
            (128, [0.08, 0.12, 0.18].as_slice()),
        ];
        for (side, stds) in cases {
            let img = flat(side, side, Channels::Rgb, 128);
            for (severity, expected) in (1..).zip(stds) {
                let out = corrupt(&img, Corruption::GaussianNoise, severity, 11);
                let measured = variance(&out).sqrt() / 255.0;
                assert!(
                    (measured / expected - 1.0).abs() < 0.04,
                    "{side}px severity {severity}: std {measured}"
                );
                assert!(
                    (mean(&out) - 127.5).abs() < 1.5,
                    "{side}px severity {severity}: mean {}",
                    mean(&out)
                );
            }
        }
    }

    #[test]
    fn shot_noise_variance_is_intensity_over_photons() {
        // Intensity 0.2, so even 12 photons rarely reach the clip at 1.
        let cases = [
            (63, [500.0, 250.0, 100.0, 75.0, 50.0].as_slice()),
            (128, [60.0, 25.0, 12.0].as_slice()),
        ];
        for (side, photons) in cases {
            let img = flat(side, side, Channels::Rgb, 51);
            for (severity, c) in (1..).zip(photons) {
                let out = corrupt(&img, Corruption::ShotNoise, severity, 5);
                let measured = variance(&out) / 255f64.powi(2);
                let expected = 0.2 / c;
                assert!(
                    (measured / expected - 1.0).abs() < 0.08,
                    "{side}px severity {severity}: variance {measured} vs {expected}"
                );
                assert!(
                    (mean(&out) - 50.5).abs() < 1.5,
                    "{side}px severity {severity}: mean {}",
                    mean(&out)
                );
            }
        }
    }

    #[test]
    fn impulse_noise_salts_and_peppers_the_published_fraction() {
        let cases = [
            (63, [0.01, 0.02, 0.03, 0.05, 0.07]),
            (128, [0.03, 0.06, 0.09, 0.17, 0.27]),
        ];
        for (side, amounts) in cases {
            let img = flat(side, side, Channels::Rgb, 128);
            let n = img.data.len() as f64;
            for (severity, amount) in (1..).zip(amounts) {
                let out = corrupt(&img, Corruption::ImpulseNoise, severity, 2);
                let salt = out.data.iter().filter(|&&v| v == 255).count() as f64 / n;
                let pepper = out.data.iter().filter(|&&v| v == 0).count() as f64 / n;
                let kept = out.data.iter().filter(|&&v| v == 128).count() as f64 / n;
                assert!(
                    (salt + pepper + kept - 1.0).abs() < 1e-12,
                    "values other than 0, 128, 255"
                );
                let tolerance = 4.0 * (amount / 2.0 / n).sqrt();
                for (what, fraction) in [("salt", salt), ("pepper", pepper)] {
                    assert!(
                        (fraction - amount / 2.0).abs() < tolerance,
                        "{side}px severity {severity}: {what} {fraction}"
                    );
                }
            }
        }
    }
}
