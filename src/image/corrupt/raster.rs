//! Float images, borders, filters and conversions to and from 8 bits; and the two
//! make_imagenet_c.py operations that both blurs and weather use: ImageMagick's motion
//! blur (motion blur, snow's streaks) and `clipped_zoom` (zoom blur, snow's flakes).

use crate::image::decode::{Channels, DecodedImage};

/// Interleaved (HWC) f32 pixels, nominally on [0, 1]; intermediate layers may leave it.
#[derive(Clone)]
pub(super) struct FloatImage {
    pub(super) width: usize,
    pub(super) height: usize,
    pub(super) channels: usize,
    pub(super) data: Vec<f32>,
}

/// Truncation slack: `k as f32 / 255.0 * 255.0` may land just under `k`.
const TRUNCATION_SLACK: f32 = 1e-3;

/// `np.uint8` of a value already on 0..=255, clipped first.
pub(super) fn truncate_to_u8(value: f32) -> u8 {
    (value + TRUNCATION_SLACK).clamp(0.0, 255.0) as u8
}

impl FloatImage {
    /// `np.array(x) / 255.`
    pub(super) fn from_u8(img: &DecodedImage) -> FloatImage {
        FloatImage {
            width: img.width as usize,
            height: img.height as usize,
            channels: img.channels.count(),
            data: img.data.iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }

    pub(super) fn from_fn(
        width: usize,
        height: usize,
        channels: usize,
        mut f: impl FnMut(usize, usize, usize) -> f32,
    ) -> FloatImage {
        let mut data = Vec::with_capacity(width * height * channels);
        for y in 0..height {
            for x in 0..width {
                for ch in 0..channels {
                    data.push(f(x, y, ch));
                }
            }
        }
        FloatImage {
            width,
            height,
            channels,
            data,
        }
    }

    /// `np.uint8(np.clip(x, 0, 1) * 255)`; `channels` must match `self.channels`.
    pub(super) fn to_u8(&self, channels: Channels) -> DecodedImage {
        debug_assert_eq!(channels.count(), self.channels);
        DecodedImage {
            width: self.width as u32,
            height: self.height as u32,
            channels,
            data: self
                .data
                .iter()
                .map(|&v| truncate_to_u8(v.clamp(0.0, 1.0) * 255.0))
                .collect(),
        }
    }

    pub(super) fn map(&self, mut f: impl FnMut(f32) -> f32) -> FloatImage {
        FloatImage {
            data: self.data.iter().map(|&v| f(v)).collect(),
            ..*self
        }
    }

    pub(super) fn at(&self, x: usize, y: usize, ch: usize) -> f32 {
        self.data[(y * self.width + x) * self.channels + ch]
    }

    /// Bilinear value at (`across`, `down`), channel `ch`.
    pub(super) fn bilinear(&self, across: &LinearSample, down: &LinearSample, ch: usize) -> f32 {
        let top = self.at(across.low, down.low, ch) * (1.0 - across.t) + self.at(across.high, down.low, ch) * across.t;
        let bottom =
            self.at(across.low, down.high, ch) * (1.0 - across.t) + self.at(across.high, down.high, ch) * across.t;
        top * (1.0 - down.t) + bottom * down.t
    }

    /// skimage.filters.gaussian / scipy.ndimage.gaussian_filter over the two spatial axes.
    pub(super) fn gaussian_filter(&self, sigma: f64, truncate: f64, border: Border) -> FloatImage {
        let radius = (truncate * sigma + 0.5) as usize;
        self.convolve_separable(&gaussian_kernel(radius, sigma), border)
    }

    /// Correlates rows, then columns, with the odd-length centred `kernel`.
    pub(super) fn convolve_separable(&self, kernel: &[f32], border: Border) -> FloatImage {
        let (width, height, channels) = (self.width, self.height, self.channels);
        let row_len = width * channels;
        let across = axis_taps(width, kernel, border);
        let mut horizontal = vec![0f32; self.data.len()];
        for (src, dst) in self
            .data
            .chunks_exact(row_len)
            .zip(horizontal.chunks_exact_mut(row_len))
        {
            for (x, taps) in across.iter().enumerate() {
                for ch in 0..channels {
                    dst[x * channels + ch] = taps.iter().map(|&(sx, w)| w * src[sx * channels + ch]).sum();
                }
            }
        }
        let down = axis_taps(height, kernel, border);
        let mut data = vec![0f32; self.data.len()];
        for (dst, taps) in data.chunks_exact_mut(row_len).zip(&down) {
            for &(sy, w) in taps {
                let src = &horizontal[sy * row_len..(sy + 1) * row_len];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += w * s);
            }
        }
        FloatImage { data, ..*self }
    }
}

/// `img`'s size and channels with new pixels.
pub(super) fn with_data(img: &DecodedImage, data: Vec<u8>) -> DecodedImage {
    debug_assert_eq!(data.len(), img.data.len());
    DecodedImage {
        width: img.width,
        height: img.height,
        channels: img.channels,
        data,
    }
}

/// How indices outside `0..n` map back inside.
#[derive(Debug, Clone, Copy)]
pub(super) enum Border {
    /// `aaa|abcd|ddd`: scipy 'nearest' (skimage's gaussian default), ImageMagick 'edge'.
    Nearest,
    /// `dcba|abcd|dcba`: scipy 'reflect'.
    Symmetric,
    /// `dcb|abcd|cba`: OpenCV's default BORDER_REFLECT_101.
    Reflect101,
}

impl Border {
    /// Any index, however far out, maps into `0..n`; `n >= 1`.
    pub(super) fn resolve(self, i: isize, n: usize) -> usize {
        let n = n as isize;
        let inside = match self {
            Border::Nearest => i.clamp(0, n - 1),
            Border::Symmetric => {
                let m = i.rem_euclid(2 * n);
                if m >= n {
                    2 * n - 1 - m
                } else {
                    m
                }
            }
            Border::Reflect101 if n == 1 => 0,
            Border::Reflect101 => {
                let m = i.rem_euclid(2 * n - 2);
                if m >= n {
                    2 * n - 2 - m
                } else {
                    m
                }
            }
        };
        inside as usize
    }
}

/// A normalised Gaussian on `-radius..=radius`, weights `exp(-x²/2σ²)`: scipy's
/// `_gaussian_kernel1d` (radius `int(truncate·σ + 0.5)`) and OpenCV's
/// `getGaussianKernel` (radius `ksize / 2`) alike. Radius 0 is the identity, which is
/// also what scipy does for σ ≈ 0.
pub(super) fn gaussian_kernel(radius: usize, sigma: f64) -> Vec<f32> {
    if radius == 0 {
        return vec![1.0];
    }
    let weights: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let x = i as f64 - radius as f64;
            (-x * x / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| (w / total) as f32).collect()
}

/// Per output index along an axis of length `n`, the (source index, weight) pairs of the
/// centred `kernel` with `border` resolved. A kernel longer than the axis (elastic's
/// sigma can exceed the image) has its taps folded onto the `n` sources, so applying
/// the taps costs at most `n` per output.
fn axis_taps(n: usize, kernel: &[f32], border: Border) -> Vec<Vec<(usize, f32)>> {
    let radius = (kernel.len() / 2) as isize;
    let source = |i: usize, k: usize| border.resolve(i as isize + k as isize - radius, n);
    (0..n)
        .map(|i| {
            if kernel.len() <= n {
                kernel.iter().enumerate().map(|(k, &w)| (source(i, k), w)).collect()
            } else {
                let mut folded = vec![0f32; n];
                kernel.iter().enumerate().for_each(|(k, &w)| folded[source(i, k)] += w);
                folded.into_iter().enumerate().filter(|&(_, w)| w != 0.0).collect()
            }
        })
        .collect()
}

/// Linear interpolation position along one axis: `low`/`high` neighbours (borders
/// resolved) and the weight `t` of `high`.
pub(super) struct LinearSample {
    low: usize,
    high: usize,
    t: f32,
}

impl LinearSample {
    pub(super) fn new(coordinate: f64, n: usize, border: Border) -> LinearSample {
        let floor = coordinate.floor();
        let low = floor as isize;
        LinearSample {
            low: border.resolve(low, n),
            high: border.resolve(low + 1, n),
            t: (coordinate - floor) as f32,
        }
    }
}

/// One tap of a motion blur: output (x, y) reads input (x + dx, y + dy).
#[derive(Debug, Clone, Copy)]
pub(super) struct MotionTap {
    dx: isize,
    dy: isize,
    weight: f32,
}

/// ImageMagick 7 `MotionBlurImage(radius, sigma, angle)`: kernel width
/// `2·ceil(radius) + 1` (`GetOptimalKernelWidth1D`), one-sided Gaussian weights
/// `exp(-i²/2σ²)` for i = 0..width normalised to sum 1, tap i at offset
/// `(ceil(i·cos θ − ½), ceil(i·sin θ − ½))`. The blur therefore trails up to
/// `2·ceil(radius)` pixels along θ (degrees, clockwise from +x since y points down).
pub(super) fn motion_blur_taps(radius: f64, sigma: f64, angle_degrees: f64) -> Vec<MotionTap> {
    let width = 2 * radius.ceil() as usize + 1;
    let (sin, cos) = angle_degrees.to_radians().sin_cos();
    let weights: Vec<f64> = (0..width)
        .map(|i| (-((i * i) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| MotionTap {
            dx: (i as f64 * cos - 0.5).ceil() as isize,
            dy: (i as f64 * sin - 0.5).ceil() as isize,
            weight: (w / total) as f32,
        })
        .collect()
}

/// Applies motion-blur taps to 8-bit HWC pixels with ImageMagick's default 'edge'
/// virtual pixels (clamp), rounding to the nearest level.
pub(super) fn motion_blur_u8(data: &[u8], width: usize, height: usize, channels: usize, taps: &[MotionTap]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for y in 0..height {
        for x in 0..width {
            for ch in 0..channels {
                let sum: f32 = taps
                    .iter()
                    .map(|t| {
                        let sx = Border::Nearest.resolve(x as isize + t.dx, width);
                        let sy = Border::Nearest.resolve(y as isize + t.dy, height);
                        t.weight * f32::from(data[(sy * width + sx) * channels + ch])
                    })
                    .sum();
                out.push(sum.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// Source coordinates, along an axis of length `n`, of make_imagenet_c.py's
/// `clipped_zoom`: the centred crop of `ceil(n / zoom)` samples is enlarged by
/// `scipy.ndimage.zoom(order=1)` (output length `round(crop·zoom)`, output j reading crop
/// coordinate `j·(crop−1)/(out−1)`) and the centred `n` outputs are kept.
fn clipped_zoom_coordinates(n: usize, zoom: f64) -> Vec<f64> {
    let crop = ((n as f64 / zoom).ceil() as usize).clamp(1, n);
    let top = (n - crop) / 2;
    let zoomed = ((crop as f64 * zoom).round_ties_even() as usize).max(n);
    let trim = (zoomed - n) / 2;
    let step = if zoomed > 1 {
        (crop - 1) as f64 / (zoomed - 1) as f64
    } else {
        0.0
    };
    (0..n).map(|i| top as f64 + (i + trim) as f64 * step).collect()
}

/// `clipped_zoom` of a whole image, each axis zoomed about its own centre.
pub(super) fn clipped_zoom(img: &FloatImage, zoom: f64) -> FloatImage {
    let samples = |n: usize| -> Vec<LinearSample> {
        clipped_zoom_coordinates(n, zoom)
            .into_iter()
            .map(|c| LinearSample::new(c, n, Border::Nearest))
            .collect()
    };
    let (across, down) = (samples(img.width), samples(img.height));
    FloatImage::from_fn(img.width, img.height, img.channels, |x, y, ch| {
        img.bilinear(&across[x], &down[y], ch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn motion_blur_taps_follow_imagemagick() {
        let taps = motion_blur_taps(10.0, 3.0, 0.0);
        assert_eq!(taps.len(), 21);
        assert!(taps.iter().enumerate().all(|(i, t)| t.dx == i as isize && t.dy == 0));
        assert!((taps.iter().map(|t| t.weight).sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(taps.windows(2).all(|w| w[0].weight >= w[1].weight));
        let diagonal = motion_blur_taps(10.0, 3.0, 45.0);
        assert_eq!((diagonal[20].dx, diagonal[20].dy), (14, 14));
        let down = motion_blur_taps(6.0, 1.0, 90.0);
        assert_eq!(down.len(), 13);
        assert!(down.iter().enumerate().all(|(i, t)| t.dx == 0 && t.dy == i as isize));
    }

    #[test]
    fn motion_blur_smears_a_point_against_the_angle() {
        let (width, height) = (64, 40);
        let mut data = vec![0u8; width * height];
        data[20 * width + 40] = 255;
        let taps = motion_blur_taps(10.0, 8.0, 0.0);
        let out = motion_blur_u8(&data, width, height, 1, &taps);
        for (i, &v) in out.iter().enumerate() {
            let (x, y) = (i % width, i / width);
            let expected = if y == 20 && x <= 40 && 40 - x < taps.len() {
                (255.0 * taps[40 - x].weight).round() as u8
            } else {
                0
            };
            assert_eq!(v, expected, "at ({x}, {y})");
        }
        assert!(out[20 * width + 40 - 20] > 0, "the trail reaches 2·radius");
    }

    #[test]
    fn clipped_zoom_coordinates_match_scipy() {
        // make_imagenet_c.py's clipped_zoom (scipy 1.17) on a column of row indices.
        let cases: [(usize, f64, &[f64]); 3] = [
            (
                7,
                1.3,
                &[0.0, 0.714286, 1.428571, 2.142857, 2.857143, 3.571429, 4.285714],
            ),
            (
                32,
                1.26,
                &[
                    3.0, 3.78125, 4.5625, 5.34375, 6.125, 6.90625, 7.6875, 8.46875, 9.25, 10.03125, 10.8125, 11.59375,
                    12.375, 13.15625, 13.9375, 14.71875, 15.5, 16.28125, 17.0625, 17.84375, 18.625, 19.40625, 20.1875,
                    20.96875, 21.75, 22.53125, 23.3125, 24.09375, 24.875, 25.65625, 26.4375, 27.21875,
                ],
            ),
            (
                28,
                1.75,
                &[
                    6.0, 6.555556, 7.111111, 7.666667, 8.222222, 8.777778, 9.333333, 9.888889, 10.444444, 11.0,
                    11.555556, 12.111111, 12.666667, 13.222222, 13.777778, 14.333333, 14.888889, 15.444444, 16.0,
                    16.555556, 17.111111, 17.666667, 18.222222, 18.777778, 19.333333, 19.888889, 20.444444, 21.0,
                ],
            ),
        ];
        for (n, zoom, expected) in cases {
            let got = clipped_zoom_coordinates(n, zoom);
            assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() < 1e-5, "n {n} zoom {zoom}: {got:?}");
            }
        }
    }

    #[test]
    fn gaussian_filter_matches_scipy_including_kernels_longer_than_the_image() {
        let signal = FloatImage {
            width: 9,
            height: 1,
            channels: 1,
            data: vec![3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0],
        };
        // scipy.ndimage.gaussian_filter1d(signal, sigma, mode=..., truncate=...), scipy 1.17.
        let cases: [(f64, f64, Border, [f32; 9]); 2] = [
            (
                1.5,
                4.0,
                Border::Nearest,
                [
                    2.632692, 2.579169, 2.844408, 3.533371, 4.437223, 5.028312, 5.111079, 5.032652, 5.024719,
                ],
            ),
            (
                10.0,
                3.0,
                Border::Symmetric,
                [
                    3.99629, 3.998488, 3.998077, 3.999582, 4.000121, 4.000996, 4.003096, 4.001392, 4.001959,
                ],
            ),
        ];
        for (sigma, truncate, border, expected) in cases {
            let got = signal.gaussian_filter(sigma, truncate, border).data;
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() < 2e-5, "sigma {sigma} {border:?}: {got:?}");
            }
        }
    }
}
