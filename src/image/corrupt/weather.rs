//! Weather: snow, frost and fog.

use std::f64::consts::{PI, TAU};

use super::raster::{clipped_zoom, motion_blur_taps, motion_blur_u8, truncate_to_u8, with_data, Border, FloatImage};
use super::rng::Rng;
use super::tables::SnowParams;
use crate::image::decode::{Channels, DecodedImage};

/// cv2.COLOR_RGB2GRAY weights.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

fn luma(pixel: &[f32]) -> f32 {
    match pixel {
        [r, g, b] => LUMA[0] * r + LUMA[1] * g + LUMA[2] * b,
        _ => pixel[0],
    }
}

/// make_imagenet_c.py's `snow`: a Gaussian flake layer, zoomed and thresholded, motion
/// blurred at an angle in [-135°, -45°) as an 8-bit image, added twice (itself and
/// rotated 180°) to the image blended towards `max(x, 1.5·gray + 0.5)`.
pub(super) fn snow(img: &FloatImage, p: &SnowParams, rng: &mut Rng) -> FloatImage {
    let (width, height) = (img.width, img.height);
    let layer = FloatImage {
        width,
        height,
        channels: 1,
        data: (0..width * height)
            .map(|_| p.mean + p.std * rng.normal() as f32)
            .collect(),
    };
    let flakes: Vec<u8> = clipped_zoom(&layer, p.zoom)
        .data
        .iter()
        .map(|&v| {
            if v < p.threshold {
                0
            } else {
                truncate_to_u8(v.min(1.0) * 255.0)
            }
        })
        .collect();
    let taps = motion_blur_taps(p.blur_radius, p.blur_sigma, rng.uniform_in(-135.0, -45.0));
    let streaks = motion_blur_u8(&flakes, width, height, 1, &taps);
    let c = img.channels;
    let mut out = img.clone();
    for (i, pixel) in out.data.chunks_exact_mut(c).enumerate() {
        let gray = luma(pixel);
        let flake = f32::from(streaks[i]) / 255.0 + f32::from(streaks[width * height - 1 - i]) / 255.0;
        for v in pixel {
            let blended = p.image_weight * *v + (1.0 - p.image_weight) * v.max(gray * 1.5 + 0.5);
            *v = (blended + flake).clamp(0.0, 1.0);
        }
    }
    out
}

/// Bluish white of frost on glass, per RGB channel.
const FROST_TINT: [f32; 3] = [0.80, 0.90, 1.0];

/// make_imagenet_c.py's `frost`: `clip(c0·x + c1·frost, 0, 255)` on 8-bit values, with
/// the procedural [`frost_texture`] standing in for the random crop of a frost photo
/// (RGB, converted to luma for gray images, like the imagecorruptions package does).
pub(super) fn frost(
    img: &DecodedImage,
    (image_weight, frost_weight): (f32, f32),
    supersample: usize,
    rng: &mut Rng,
) -> DecodedImage {
    let (width, height) = (img.width as usize, img.height as usize);
    let texture = frost_texture(width, height, supersample, rng);
    let c = img.channels.count();
    let tint: Vec<f32> = match img.channels {
        Channels::Rgb => FROST_TINT.to_vec(),
        Channels::Gray => vec![luma(&FROST_TINT)],
    };
    let data = img
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let photo = f32::from(truncate_to_u8(texture[i / c] * tint[i % c] * 255.0));
            truncate_to_u8(image_weight * f32::from(v) + frost_weight * photo)
        })
        .collect();
    with_data(img, data)
}

/// A frost-on-glass intensity texture on [0, 1], `height × width`: cloudy fractal haze
/// plus bright ice needles with side branches at ±60° (ice grows hexagonally), drawn
/// at `supersample`× the image's resolution and box-averaged down, the way
/// make_cifar_c.py shrinks the frost photos by 0.2. Mean about 0.55, standard
/// deviation about 0.1, needles up to ~34 photo pixels long. Not the ImageNet-C
/// photos: see the module doc.
fn frost_texture(width: usize, height: usize, supersample: usize, rng: &mut Rng) -> Vec<f32> {
    let (fine_w, fine_h) = (width * supersample, height * supersample);
    let haze = fractal_haze(fine_w, fine_h, rng);
    let needles = ice_needles(fine_w, fine_h, rng);
    let fine: Vec<f32> = haze
        .iter()
        .zip(&needles)
        .map(|(h, n)| (0.15 + 0.45 * h + 0.7 * n).min(1.0))
        .collect();
    let area = (supersample * supersample) as f32;
    (0..width * height)
        .map(|i| {
            let (x, y) = (i % width * supersample, i / width * supersample);
            let block = (0..supersample).flat_map(|dy| (0..supersample).map(move |dx| (y + dy) * fine_w + x + dx));
            block.map(|j| fine[j]).sum::<f32>() / area
        })
        .collect()
}

/// Value noise on [0, 1]: five octaves of smoothly interpolated random lattices, cells
/// 64 down to 4 pixels, amplitude halving per octave.
fn fractal_haze(width: usize, height: usize, rng: &mut Rng) -> Vec<f32> {
    let mut haze = vec![0f32; width * height];
    let mut total_amplitude = 0.0;
    for octave in 0..5 {
        let cell = (64 >> octave) as f32;
        let amplitude = 0.5f32.powi(octave);
        let lattice_w = (width as f32 / cell) as usize + 2;
        let lattice_h = (height as f32 / cell) as usize + 2;
        let lattice: Vec<f32> = (0..lattice_w * lattice_h).map(|_| rng.uniform() as f32).collect();
        // Lattice cell and smoothstep weight of a pixel coordinate.
        let position = |i: usize| {
            let f = i as f32 / cell;
            let node = f as usize;
            let t = f - node as f32;
            (node, t * t * (3.0 - 2.0 * t))
        };
        let columns: Vec<(usize, f32)> = (0..width).map(position).collect();
        for (y, row) in haze.chunks_exact_mut(width).enumerate() {
            let (cy, ty) = position(y);
            let upper = &lattice[cy * lattice_w..][..lattice_w];
            let lower = &lattice[(cy + 1) * lattice_w..][..lattice_w];
            for (h, &(cx, tx)) in row.iter_mut().zip(&columns) {
                let top = upper[cx] + (upper[cx + 1] - upper[cx]) * tx;
                let bottom = lower[cx] + (lower[cx + 1] - lower[cx]) * tx;
                *h += amplitude * (top + (bottom - top) * ty);
            }
        }
        total_amplitude += amplitude;
    }
    haze.iter().map(|h| h / total_amplitude).collect()
}

/// Ice needles on [0, 1), mean about 0.25: one needle per 25 pixels, random position
/// and direction, length 4–32 (mostly short), fading along its length, with a side
/// branch per 8 pixels of length; overlapping needles saturate (`1 − e^−sum`), then a
/// light blur.
fn ice_needles(width: usize, height: usize, rng: &mut Rng) -> Vec<f32> {
    let mut sum = FloatImage {
        width,
        height,
        channels: 1,
        data: vec![0.0; width * height],
    };
    for _ in 0..width * height / 25 + 1 {
        let (x, y) = (rng.uniform() * width as f64, rng.uniform() * height as f64);
        let angle = rng.uniform() * TAU;
        let length = 4.0 + 28.0 * rng.uniform().powi(2);
        let brightness = 0.3 + 0.7 * rng.uniform() as f32;
        draw_needle(&mut sum, (x, y), angle, length, brightness);
        for _ in 0..(length / 8.0) as usize {
            let along = rng.uniform() * length;
            let side = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            let start = (x + along * angle.cos(), y + along * angle.sin());
            let branch_length = length * (0.2 + 0.3 * rng.uniform());
            draw_needle(
                &mut sum,
                start,
                angle + side * PI / 3.0,
                branch_length,
                0.7 * brightness,
            );
        }
    }
    sum.map(|s| 1.0 - (-s).exp())
        .gaussian_filter(0.7, 4.0, Border::Nearest)
        .data
}

/// Splats a line from `start` along `angle`, bilinearly, every half pixel; brightness
/// fades to 40% at the tip. Parts outside the image are dropped.
fn draw_needle(canvas: &mut FloatImage, start: (f64, f64), angle: f64, length: f64, brightness: f32) {
    let steps = (length * 2.0).ceil() as usize;
    let (sin, cos) = angle.sin_cos();
    for step in 0..=steps {
        let along = step as f64 * 0.5;
        let (x, y) = (start.0 + along * cos, start.1 + along * sin);
        let value = 0.5 * brightness * (1.0 - 0.6 * (along / length) as f32);
        let (x0, y0) = (x.floor(), y.floor());
        let (tx, ty) = ((x - x0) as f32, (y - y0) as f32);
        for (dx, dy, w) in [
            (0, 0, (1.0 - tx) * (1.0 - ty)),
            (1, 0, tx * (1.0 - ty)),
            (0, 1, (1.0 - tx) * ty),
            (1, 1, tx * ty),
        ] {
            let (px, py) = (x0 as isize + dx, y0 as isize + dy);
            if (0..canvas.width as isize).contains(&px) && (0..canvas.height as isize).contains(&py) {
                canvas.data[py as usize * canvas.width + px as usize] += value * w;
            }
        }
    }
}

/// make_imagenet_c.py's `plasma_fractal(mapsize, wibbledecay)`: diamond-square on a
/// wrapping `mapsize²` grid (`mapsize` a power of two), displacement
/// `wibble · U(−wibble, wibble)` with `wibble` starting at 100 and divided by
/// `wibble_decay` per level, normalised to [0, 1]. Row-major; 4·mapsize² bytes.
fn plasma_fractal(mapsize: usize, wibble_decay: f64, rng: &mut Rng) -> Vec<f32> {
    debug_assert!(mapsize.is_power_of_two());
    let n = mapsize;
    let mut map = vec![0f32; n * n];
    let at = |row: usize, col: usize| row * n + col;
    let mut step = n;
    let mut wibble = 100.0;
    while step >= 2 {
        let half = step / 2;
        let cells = n / step;
        let displaced = |sum: f32, rng: &mut Rng| sum / 4.0 + (wibble * rng.uniform_in(-wibble, wibble)) as f32;
        // Squares: each cell's centre from its four corners.
        for i in 0..cells {
            for j in 0..cells {
                let (down, right) = ((i + 1) % cells, (j + 1) % cells);
                let sum = map[at(i * step, j * step)]
                    + map[at(down * step, j * step)]
                    + map[at(i * step, right * step)]
                    + map[at(down * step, right * step)];
                map[at(i * step + half, j * step + half)] = displaced(sum, rng);
            }
        }
        // Diamonds: edge midpoints from the two adjacent centres and two corners.
        for i in 0..cells {
            for j in 0..cells {
                let (up, right) = ((i + cells - 1) % cells, (j + 1) % cells);
                let sum = map[at(i * step + half, j * step + half)]
                    + map[at(up * step + half, j * step + half)]
                    + map[at(i * step, j * step)]
                    + map[at(i * step, right * step)];
                map[at(i * step, j * step + half)] = displaced(sum, rng);
            }
        }
        for i in 0..cells {
            for j in 0..cells {
                let (down, left) = ((i + 1) % cells, (j + cells - 1) % cells);
                let sum = map[at(i * step + half, j * step + half)]
                    + map[at(i * step + half, left * step + half)]
                    + map[at(i * step, j * step)]
                    + map[at(down * step, j * step)];
                map[at(i * step + half, j * step)] = displaced(sum, rng);
            }
        }
        step /= 2;
        wibble /= wibble_decay;
    }
    let min = map.iter().copied().fold(f32::INFINITY, f32::min);
    let range = map.iter().copied().fold(f32::NEG_INFINITY, f32::max) - min;
    map.iter()
        .map(|v| if range > 0.0 { (v - min) / range } else { 0.0 })
        .collect()
}

/// make_imagenet_c.py's `fog`: `(x + c0·plasma) · max / (max + c0)` with `max` the
/// image's largest value, so fog lifts dark regions of an image with a bright pixel and
/// dims a uniformly mid-gray one. The plasma map's side is the next power of two of the
/// long side (at least 2).
pub(super) fn fog(img: &FloatImage, (strength, wibble_decay): (f32, f64), rng: &mut Rng) -> FloatImage {
    let mapsize = img.width.max(img.height).next_power_of_two().max(2);
    let plasma = plasma_fractal(mapsize, wibble_decay, rng);
    let max_value = img.data.iter().copied().fold(0.0, f32::max);
    let scale = max_value / (max_value + strength);
    let c = img.channels;
    let mut out = img.clone();
    for (i, v) in out.data.iter_mut().enumerate() {
        let (x, y) = (i / c % img.width, i / c / img.width);
        *v = ((*v + strength * plasma[y * mapsize + x]) * scale).clamp(0.0, 1.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::corrupt::test_images::{digit_like, flat, mean, SEVERITIES};
    use crate::image::corrupt::{corrupt, Corruption};

    #[test]
    fn snow_and_frost_brighten_mid_gray() {
        for img in [flat(28, 28, Channels::Gray, 128), flat(96, 96, Channels::Rgb, 128)] {
            for kind in [Corruption::Snow, Corruption::Frost] {
                for severity in SEVERITIES {
                    let out = mean(&corrupt(&img, kind, severity, 4));
                    assert!(out > 133.0, "{kind} {severity} on {}px: mean {out}", img.width);
                }
            }
        }
    }

    #[test]
    fn fog_lifts_a_dark_image_with_a_bright_stroke_and_dims_flat_gray() {
        // The published formula scales by max / (max + c): it brightens MNIST-like
        // digits (dark background, white stroke) and darkens a uniform mid-gray.
        for severity in SEVERITIES {
            for img in [digit_like(28, 28, Channels::Gray), digit_like(96, 96, Channels::Rgb)] {
                let (before, after) = (mean(&img), mean(&corrupt(&img, Corruption::Fog, severity, 6)));
                assert!(
                    after > before + 5.0,
                    "severity {severity} {}px: {before} -> {after}",
                    img.width
                );
            }
            let gray = flat(64, 64, Channels::Gray, 128);
            assert!(mean(&corrupt(&gray, Corruption::Fog, severity, 6)) < 128.0);
        }
    }

    #[test]
    fn frost_texture_is_bright_bluish_and_textured() {
        for (side, supersample) in [(224, 1), (28, 5)] {
            let texture = frost_texture(side, side, supersample, &mut Rng::new(1));
            let m = texture.iter().sum::<f32>() / texture.len() as f32;
            let s = (texture.iter().map(|v| (v - m).powi(2)).sum::<f32>() / texture.len() as f32).sqrt();
            assert!((0.45..0.65).contains(&m) && s > 0.06, "{side}px: mean {m} std {s}");
        }
        let out = corrupt(&flat(96, 96, Channels::Rgb, 0), Corruption::Frost, 3, 1);
        let channel_mean = |ch: usize| out.data.iter().skip(ch).step_by(3).map(|&v| f64::from(v)).sum::<f64>();
        assert!(channel_mean(2) > channel_mean(0), "frost is bluish");
    }

    #[test]
    fn plasma_fractal_spans_zero_to_one() {
        for mapsize in [2, 32, 256] {
            let map = plasma_fractal(mapsize, 2.0, &mut Rng::new(5));
            assert_eq!(map.len(), mapsize * mapsize);
            let min = map.iter().copied().fold(f32::INFINITY, f32::min);
            let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!((min, max), (0.0, 1.0), "mapsize {mapsize}");
        }
    }
}
