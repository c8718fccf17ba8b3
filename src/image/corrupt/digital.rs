//! Digital: brightness, contrast, elastic transform, pixelate and jpeg compression.

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, ImageFormat};

use super::raster::{with_data, Border, FloatImage, LinearSample};
use super::rng::Rng;
use crate::image::decode::{Channels, DecodedImage};

/// make_imagenet_c.py's `brightness`: HSV value `v → min(v + c, 1)`, hue and saturation
/// kept. With hue and saturation fixed, RGB is proportional to v, so the skimage
/// rgb2hsv/hsv2rgb round trip is a scaling by `v'/v`; a black pixel (v = 0, s = 0)
/// becomes gray `c`. Gray images are one-channel v.
pub(super) fn brightness(img: &FloatImage, increase: f32) -> FloatImage {
    let mut out = img.clone();
    for pixel in out.data.chunks_exact_mut(img.channels) {
        let value = pixel.iter().copied().fold(0.0, f32::max);
        let brighter = (value + increase).min(1.0);
        for v in pixel {
            *v = if value > 0.0 { *v * brighter / value } else { brighter };
        }
    }
    out
}

/// make_imagenet_c.py's `contrast`: `(x − mean) · c + mean`, means per channel.
pub(super) fn contrast(img: &FloatImage, factor: f32) -> FloatImage {
    let c = img.channels;
    let pixels = (img.data.len() / c).max(1) as f64;
    let means: Vec<f32> = (0..c)
        .map(|ch| (img.data.iter().skip(ch).step_by(c).map(|&v| f64::from(v)).sum::<f64>() / pixels) as f32)
        .collect();
    let mut out = img.clone();
    for (i, v) in out.data.iter_mut().enumerate() {
        let mean = means[i % c];
        *v = (*v - mean) * factor + mean;
    }
    out
}

/// The affine map taking the three points `from` to `to` (`cv2.getAffineTransform`), as
/// rows `[a, b, c]` with `x' = a·x + b·y + c`; `None` when `from` is (nearly) collinear.
fn affine_from_points(from: &[[f64; 2]; 3], to: &[[f64; 2]; 3]) -> Option<[[f64; 3]; 2]> {
    let [[x0, y0], [x1, y1], [x2, y2]] = *from;
    let det = x0 * (y1 - y2) - y0 * (x1 - x2) + (x1 * y2 - x2 * y1);
    if det.abs() < 1e-9 {
        return None;
    }
    let solve = |axis: usize| {
        let (u0, u1, u2) = (to[0][axis], to[1][axis], to[2][axis]);
        [
            (u0 * (y1 - y2) - y0 * (u1 - u2) + (u1 * y2 - u2 * y1)) / det,
            (x0 * (u1 - u2) - u0 * (x1 - x2) + (x1 * u2 - x2 * u1)) / det,
            (x0 * (y1 * u2 - y2 * u1) - y0 * (x1 * u2 - x2 * u1) + u0 * (x1 * y2 - x2 * y1)) / det,
        ]
    };
    Some([solve(0), solve(1)])
}

/// Above this sigma, [`smoothed_uniform_noise`] works on a coarser grid.
const EXACT_SMOOTHING_MAX_SIGMA: f64 = 16.0;

/// `gaussian(np.random.uniform(-1, 1, (height, width)), sigma, mode='reflect',
/// truncate=3)`, elastic_transform's displacement field before `alpha`.
///
/// Up to sigma 16 this is exactly that (direct convolution, ~6·sigma taps per pixel and
/// axis). Larger sigmas (ImageNet-C's severities 1 and 2: 0.76 and 0.087 times the short
/// side, so O(W·H·(W+H)) directly) are computed on a grid coarsened by
/// `f = floor(sigma / 8)`: each coarse cell is the mean of its f×f uniforms (the same
/// distribution as block means of the fine noise), smoothed with sigma / f and
/// upsampled bilinearly. The field's covariance then differs by O((f/sigma)²) ≈ 2%,
/// plus partial cells at the right and bottom edges, which average fewer uniforms.
/// Since the draws do not reproduce numpy's anyway, only the field's distribution is
/// meaningful, and that is kept.
fn smoothed_uniform_noise(width: usize, height: usize, sigma: f64, rng: &mut Rng) -> Vec<f32> {
    let factor = if sigma > EXACT_SMOOTHING_MAX_SIGMA {
        (sigma / 8.0) as usize
    } else {
        1
    };
    let (coarse_w, coarse_h) = (width.div_ceil(factor), height.div_ceil(factor));
    let mut sums = vec![0f32; coarse_w * coarse_h];
    let mut counts = vec![0u32; coarse_w * coarse_h];
    for y in 0..height {
        for x in 0..width {
            let cell = y / factor * coarse_w + x / factor;
            sums[cell] += rng.uniform_in(-1.0, 1.0) as f32;
            counts[cell] += 1;
        }
    }
    let coarse = FloatImage {
        width: coarse_w,
        height: coarse_h,
        channels: 1,
        data: sums.iter().zip(&counts).map(|(&s, &n)| s / n as f32).collect(),
    }
    .gaussian_filter(sigma / factor as f64, 3.0, Border::Symmetric);
    if factor == 1 {
        return coarse.data;
    }
    // Fine pixel i lies at coarse coordinate (i + 0.5) / f - 0.5 (cell centres).
    let samples = |n: usize, coarse_n: usize| -> Vec<LinearSample> {
        (0..n)
            .map(|i| LinearSample::new((i as f64 + 0.5) / factor as f64 - 0.5, coarse_n, Border::Symmetric))
            .collect()
    };
    let (across, down) = (samples(width, coarse_w), samples(height, coarse_h));
    FloatImage::from_fn(width, height, 1, |x, y, _| coarse.bilinear(&across[x], &down[y], 0)).data
}

/// make_imagenet_c.py's `elastic_transform` (alpha, sigma, jitter in pixels): a random
/// affine warp (three points around the centre, `min(h, w) // 3` out, each coordinate
/// jittered by `U(−jitter, jitter)`; `cv2.warpAffine`, bilinear, REFLECT_101), then a
/// displacement field `alpha · gaussian(U(−1, 1), sigma, mode='reflect', truncate=3)`
/// per axis ([`smoothed_uniform_noise`]), sampled bilinearly with scipy's 'reflect'
/// border (`map_coordinates`). A degenerate affine (images under 3 pixels) is skipped.
pub(super) fn elastic_transform(
    img: &FloatImage,
    (alpha, sigma, jitter): (f32, f32, f32),
    rng: &mut Rng,
) -> FloatImage {
    let (width, height, c) = (img.width, img.height, img.channels);
    let (cx, cy) = ((width / 2) as f64, (height / 2) as f64);
    let s = (width.min(height) / 3) as f64;
    let anchors = [[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]];
    let jitter = f64::from(jitter);
    let moved = anchors.map(|point| point.map(|v| v + rng.uniform_in(-jitter, jitter) as f32 as f64));
    // warpAffine maps anchors to moved and samples the source at the inverse map.
    let warped = match affine_from_points(&moved, &anchors) {
        Some([[a, b, tx], [d, e, ty]]) => FloatImage::from_fn(width, height, c, |x, y, ch| {
            let (x, y) = (x as f64, y as f64);
            let across = LinearSample::new(a * x + b * y + tx, width, Border::Reflect101);
            let down = LinearSample::new(d * x + e * y + ty, height, Border::Reflect101);
            img.bilinear(&across, &down, ch)
        }),
        None => img.clone(),
    };
    let mut displacement = || -> Vec<f32> {
        let field = smoothed_uniform_noise(width, height, f64::from(sigma), rng);
        field.iter().map(|v| v * alpha).collect()
    };
    let (dx, dy) = (displacement(), displacement());
    let mut out = warped.clone();
    for i in 0..width * height {
        let across = LinearSample::new((i % width) as f64 + f64::from(dx[i]), width, Border::Symmetric);
        let down = LinearSample::new((i / width) as f64 + f64::from(dy[i]), height, Border::Symmetric);
        for ch in 0..c {
            out.data[i * c + ch] = warped.bilinear(&across, &down, ch);
        }
    }
    out
}

/// Pillow's BOX filter weights (Resample.c `precompute_coeffs` then
/// `normalize_coeffs_8bpc`): per output index, the first source index and 22-bit
/// fixed-point weights. Every source pixel whose centre falls in the output pixel's
/// span gets an equal share (no partial coverage).
fn pillow_box_coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    const PRECISION_BITS: u32 = 22;
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 0.5 * filter_scale;
    (0..out_size)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            let first = ((center - support + 0.5) as isize).max(0) as usize;
            let end = ((center + support + 0.5) as usize).min(in_size);
            let weights: Vec<f64> = (first..end)
                .map(|x| {
                    let t = (x as f64 - center + 0.5) / filter_scale;
                    if t > -0.5 && t <= 0.5 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    (0.5 + w * f64::from(1u32 << PRECISION_BITS)) as i64
                })
                .collect();
            (first, fixed)
        })
        .collect()
}

/// Pillow's 8-bit `Image.resize(size, BOX)`: horizontal pass then vertical, each
/// rounding to 8 bits (fixed point, `(sum + 2^21) >> 22`, clipped).
fn pillow_box_resize(
    data: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    (new_w, new_h): (usize, usize),
) -> Vec<u8> {
    let apply = |taps: &(usize, Vec<i64>), read: &dyn Fn(usize) -> u8| -> u8 {
        let sum: i64 = taps
            .1
            .iter()
            .enumerate()
            .map(|(k, w)| w * i64::from(read(taps.0 + k)))
            .sum();
        ((sum + (1 << 21)) >> 22).clamp(0, 255) as u8
    };
    let across = pillow_box_coefficients(width, new_w);
    let mut horizontal = Vec::with_capacity(new_w * height * channels);
    for y in 0..height {
        for taps in &across {
            for ch in 0..channels {
                horizontal.push(apply(taps, &|x| data[(y * width + x) * channels + ch]));
            }
        }
    }
    let down = pillow_box_coefficients(height, new_h);
    let mut out = Vec::with_capacity(new_w * new_h * channels);
    for taps in &down {
        for x in 0..new_w {
            for ch in 0..channels {
                out.push(apply(taps, &|y| horizontal[(y * new_w + x) * channels + ch]));
            }
        }
    }
    out
}

/// make_imagenet_c.py's `pixelate`: BOX-resize to `int(size · c)` per axis (at least 1),
/// then back.
pub(super) fn pixelate(img: &DecodedImage, factor: f64) -> DecodedImage {
    let size = (img.width as usize, img.height as usize);
    let small = (
        ((size.0 as f64 * factor) as usize).max(1),
        ((size.1 as f64 * factor) as usize).max(1),
    );
    let c = img.channels.count();
    let shrunk = pillow_box_resize(&img.data, size, c, small);
    with_data(img, pillow_box_resize(&shrunk, small, c, size))
}

/// Tile side for JPEG round trips: under JPEG's 65,535-pixel limit and a multiple of
/// the 16-pixel MCU, so tiles of a huge image meet on block boundaries.
const JPEG_TILE: usize = 65_520;

/// make_imagenet_c.py's `jpeg_compression`: encode at `quality`, decode. Images with a
/// side over 65,535 pixels (beyond what one JPEG frame can hold) are compressed in tiles.
pub(super) fn jpeg_roundtrip(img: &DecodedImage, quality: u8) -> DecodedImage {
    let (width, height, c) = (img.width as usize, img.height as usize, img.channels.count());
    let mut data = img.data.clone();
    for top in (0..height).step_by(JPEG_TILE) {
        for left in (0..width).step_by(JPEG_TILE) {
            let (tile_w, tile_h) = (JPEG_TILE.min(width - left), JPEG_TILE.min(height - top));
            let row = |y: usize| ((top + y) * width + left) * c..((top + y) * width + left + tile_w) * c;
            let tile: Vec<u8> = (0..tile_h).flat_map(|y| img.data[row(y)].iter().copied()).collect();
            let compressed = jpeg_encode_decode(&tile, tile_w as u32, tile_h as u32, img.channels, quality);
            for (y, chunk) in compressed.chunks_exact(tile_w * c).enumerate() {
                data[row(y)].copy_from_slice(chunk);
            }
        }
    }
    with_data(img, data)
}

/// One JPEG encode at `quality` and decode back to `channels`; sides ≤ 65,535.
fn jpeg_encode_decode(pixels: &[u8], width: u32, height: u32, channels: Channels, quality: u8) -> Vec<u8> {
    let color = match channels {
        Channels::Gray => ExtendedColorType::L8,
        Channels::Rgb => ExtendedColorType::Rgb8,
    };
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode(pixels, width, height, color)
        .expect("JPEG encoding of an in-memory 8-bit image within JPEG's size limit");
    let decoded =
        image::load_from_memory_with_format(&bytes, ImageFormat::Jpeg).expect("decoding a JPEG we just encoded");
    match channels {
        Channels::Gray => decoded.into_luma8().into_raw(),
        Channels::Rgb => decoded.into_rgb8().into_raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::corrupt::test_images::{flat, max_abs_diff, mean_abs_diff, textured};
    use crate::image::corrupt::{corrupt, Corruption};

    #[test]
    fn brightness_matches_skimage_hsv_round_trip() {
        // CIFAR table, severity 3: value + 0.15. Expected bytes from skimage 0.26
        // rgb2hsv/hsv2rgb + np.uint8. skimage's float64 round trip turns 10 into 9.99..
        // (then 9) where the scaling here keeps 10, hence ±1.
        let input = [[100, 50, 0], [255, 10, 10], [0, 0, 0], [30, 200, 90]];
        let expected = [[138, 69, 0], [255, 9, 9], [38, 38, 38], [35, 238, 107]];
        let img = DecodedImage {
            width: 2,
            height: 2,
            channels: Channels::Rgb,
            data: input.concat(),
        };
        let out = corrupt(&img, Corruption::Brightness, 3, 0);
        let want = DecodedImage {
            data: expected.concat(),
            ..img.clone()
        };
        assert!(max_abs_diff(&out, &want) <= 1, "{:?}", out.data);
        assert_eq!(out.data[..3], [138, 69, 0]);
        // Gray is value alone: 100 + 0.15 * 255 = 138.25.
        assert_eq!(
            corrupt(&flat(2, 2, Channels::Gray, 100), Corruption::Brightness, 3, 0).data,
            [138; 4]
        );
    }

    #[test]
    fn contrast_matches_the_numpy_formula() {
        // CIFAR table, severity 2: factor 0.5; expected from numpy on the same pixels.
        let input = [[100, 50, 0], [255, 10, 10], [0, 0, 0], [30, 200, 90]];
        let expected = [[98, 57, 12], [175, 37, 17], [48, 32, 12], [63, 132, 57]];
        let img = DecodedImage {
            width: 2,
            height: 2,
            channels: Channels::Rgb,
            data: input.concat(),
        };
        assert_eq!(corrupt(&img, Corruption::Contrast, 2, 0).data, expected.concat());
    }

    #[test]
    fn affine_from_points_maps_the_three_points() {
        let from = [[40.0, 40.0], [40.0, 8.0], [8.0, 8.0]];
        let to = [[43.5, 38.0], [37.25, 9.5], [10.0, 6.75]];
        let [[a, b, c], [d, e, f]] = affine_from_points(&from, &to).unwrap();
        for ([x, y], [u, v]) in from.iter().zip(&to) {
            assert!((a * x + b * y + c - u).abs() < 1e-9 && (d * x + e * y + f - v).abs() < 1e-9);
        }
        assert!(affine_from_points(&[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], &to).is_none());
    }

    #[test]
    fn elastic_warp_is_affine_at_alpha_0_and_local_beyond() {
        // A linear ramp stays exactly linear under an affine warp (bilinear sampling of a
        // linear function is exact); the smoothed displacement field bends it.
        let ramp = FloatImage::from_fn(60, 60, 1, |x, y, _| (3.0 * x as f32 + y as f32) / 240.0);
        let plane_residual = |img: &FloatImage| {
            let interior: Vec<(f64, f64, f64)> = (15..45)
                .flat_map(|y| (15..45).map(move |x| (x as f64, y as f64)))
                .map(|(x, y)| (x, y, f64::from(img.at(x as usize, y as usize, 0))))
                .collect();
            // Least-squares plane v = a·x + b·y + c from the normal equations.
            let sum = |f: &dyn Fn(&(f64, f64, f64)) -> f64| interior.iter().map(f).sum::<f64>();
            let normal = [
                [sum(&|p| p.0 * p.0), sum(&|p| p.0 * p.1), sum(&|p| p.0)],
                [sum(&|p| p.0 * p.1), sum(&|p| p.1 * p.1), sum(&|p| p.1)],
                [sum(&|p| p.0), sum(&|p| p.1), interior.len() as f64],
            ];
            let rhs = [sum(&|p| p.0 * p.2), sum(&|p| p.1 * p.2), sum(&|p| p.2)];
            let [a, b, c] = solve_3x3(normal, rhs);
            let squared: f64 = interior.iter().map(|p| (a * p.0 + b * p.1 + c - p.2).powi(2)).sum();
            (squared / interior.len() as f64).sqrt()
        };
        let affine_only = elastic_transform(&ramp, (0.0, 0.0, 4.8), &mut Rng::new(1));
        assert!(affine_only.data != ramp.data, "the affine jitter moves the image");
        assert!(plane_residual(&affine_only) < 1e-4, "{}", plane_residual(&affine_only));
        // CIFAR severity 5 at 60 px: alpha 6, sigma 1.8, jitter 1.8.
        let local = elastic_transform(&ramp, (6.0, 1.8, 1.8), &mut Rng::new(1));
        assert!(plane_residual(&local) > 1e-3, "{}", plane_residual(&local));
    }

    /// Solves `m · v = rhs` by Cramer's rule.
    fn solve_3x3(m: [[f64; 3]; 3], rhs: [f64; 3]) -> [f64; 3] {
        let det = |m: [[f64; 3]; 3]| {
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        };
        let whole = det(m);
        [0, 1, 2].map(|col| {
            let mut replaced = m;
            (0..3).for_each(|row| replaced[row][col] = rhs[row]);
            det(replaced) / whole
        })
    }

    #[test]
    fn coarsened_noise_fields_keep_the_exact_fields_statistics() {
        // Standard deviation and correlation at a lag of sigma / 2, over 16 draws, of the
        // coarsened field against the exact convolution of fine noise.
        let stats = |field: &[f32], width: usize, lag: usize| {
            let n = field.len() as f64;
            let m = field.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = field.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / n;
            let pairs: Vec<(f64, f64)> = (0..field.len())
                .filter(|i| i % width + lag < width)
                .map(|i| (f64::from(field[i]) - m, f64::from(field[i + lag]) - m))
                .collect();
            let cov = pairs.iter().map(|(a, b)| a * b).sum::<f64>() / pairs.len() as f64;
            (var.sqrt(), cov / var)
        };
        let (width, height) = (160, 120);
        for sigma in [24.0, 40.0] {
            let lag = (sigma / 2.0) as usize;
            let (mut coarse, mut exact) = ((0.0, 0.0), (0.0, 0.0));
            for seed in 0..16 {
                let (std, corr) = stats(
                    &smoothed_uniform_noise(width, height, sigma, &mut Rng::new(seed)),
                    width,
                    lag,
                );
                coarse = (coarse.0 + std / 16.0, coarse.1 + corr / 16.0);
                let mut rng = Rng::new(seed + 100);
                let noise = FloatImage::from_fn(width, height, 1, |_, _, _| rng.uniform_in(-1.0, 1.0) as f32);
                let (std, corr) = stats(&noise.gaussian_filter(sigma, 3.0, Border::Symmetric).data, width, lag);
                exact = (exact.0 + std / 16.0, exact.1 + corr / 16.0);
            }
            assert!(
                (coarse.0 / exact.0 - 1.0).abs() < 0.15,
                "sigma {sigma}: std {coarse:?} vs {exact:?}"
            );
            assert!(
                (coarse.1 - exact.1).abs() < 0.05,
                "sigma {sigma}: correlation {coarse:?} vs {exact:?}"
            );
        }
    }

    #[test]
    fn pillow_box_resize_matches_pillow() {
        // Image.fromarray(g, 'L').resize((8, 5), Image.BOX) and back to (10, 7), Pillow 13.
        let source: Vec<u8> = (0..7)
            .flat_map(|y| (0..10).map(move |x| ((x * 37 + y * 91) % 256) as u8))
            .collect();
        let down = pillow_box_resize(&source, (10, 7), 1, (8, 5));
        let expected_down = [
            [0, 56, 111, 148, 185, 113, 40, 77],
            [137, 129, 120, 157, 66, 122, 177, 86],
            [17, 73, 128, 165, 202, 130, 57, 94],
            [154, 146, 137, 46, 83, 139, 194, 103],
            [34, 90, 145, 182, 219, 19, 74, 111],
        ];
        assert_eq!(down, expected_down.concat());
        let up = pillow_box_resize(&down, (8, 5), 1, (10, 7));
        let expected_up = [
            [0, 56, 111, 111, 148, 185, 113, 40, 40, 77],
            [137, 129, 120, 120, 157, 66, 122, 177, 177, 86],
            [137, 129, 120, 120, 157, 66, 122, 177, 177, 86],
            [17, 73, 128, 128, 165, 202, 130, 57, 57, 94],
            [154, 146, 137, 137, 46, 83, 139, 194, 194, 103],
            [154, 146, 137, 137, 46, 83, 139, 194, 194, 103],
            [34, 90, 145, 145, 182, 219, 19, 74, 74, 111],
        ];
        assert_eq!(up, expected_up.concat());
    }

    #[test]
    fn pixelate_makes_blocks_of_the_shrink_ratio() {
        // ImageNet severity 5: 224 -> int(224 * 0.25) = 56 -> 224, blocks of 4x4.
        let img = textured(224, 224, Channels::Rgb);
        let out = corrupt(&img, Corruption::Pixelate, 5, 0);
        for y in 0..224 {
            for x in 0..224 {
                for ch in 0..3 {
                    let at = |im: &DecodedImage, x: usize, y: usize| f64::from(im.data[(y * 224 + x) * 3 + ch]);
                    let (bx, by) = (x / 4 * 4, y / 4 * 4);
                    assert_eq!(at(&out, x, y), at(&out, bx, by), "({x}, {y}) differs from its block");
                    let block_mean = (0..16).map(|k| at(&img, bx + k % 4, by + k / 4)).sum::<f64>() / 16.0;
                    assert!(
                        (at(&out, x, y) - block_mean).abs() <= 1.0,
                        "block ({bx}, {by}) is not its mean"
                    );
                }
            }
        }
        // Severity 1 keeps more detail than 5.
        let mild = corrupt(&img, Corruption::Pixelate, 1, 0);
        assert!(mean_abs_diff(&mild, &img) < mean_abs_diff(&out, &img));
    }

    #[test]
    fn jpeg_compression_is_an_encode_at_the_published_quality() {
        let rgb = textured(96, 96, Channels::Rgb);
        let out = corrupt(&rgb, Corruption::JpegCompression, 3, 0);
        assert_eq!(out.data, jpeg_encode_decode(&rgb.data, 96, 96, Channels::Rgb, 15));
        assert_ne!(out.data, jpeg_encode_decode(&rgb.data, 96, 96, Channels::Rgb, 25));
        let gray = textured(28, 28, Channels::Gray);
        let out = corrupt(&gray, Corruption::JpegCompression, 1, 0);
        assert_eq!(out.data, jpeg_encode_decode(&gray.data, 28, 28, Channels::Gray, 80));
        assert_ne!(out.data, gray.data);
    }

    #[test]
    fn jpeg_compression_tiles_images_beyond_the_jpeg_size_limit() {
        let wide = textured(65_600, 8, Channels::Gray);
        let out = corrupt(&wide, Corruption::JpegCompression, 5, 0);
        assert_eq!((out.width, out.height, out.data.len()), (65_600, 8, wide.data.len()));
        let first_tile: Vec<u8> = (0..8)
            .flat_map(|y| wide.data[y * 65_600..y * 65_600 + JPEG_TILE].to_vec())
            .collect();
        let expected = jpeg_encode_decode(&first_tile, JPEG_TILE as u32, 8, Channels::Gray, 40);
        let got: Vec<u8> = (0..8)
            .flat_map(|y| out.data[y * 65_600..y * 65_600 + JPEG_TILE].to_vec())
            .collect();
        assert_eq!(got, expected);
    }
}
