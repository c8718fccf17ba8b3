//! Blurs: defocus, glass, motion and zoom blur.

use super::raster::{
    clipped_zoom, gaussian_kernel, motion_blur_taps, motion_blur_u8, truncate_to_u8, with_data, Border, FloatImage,
};
use super::rng::Rng;
use crate::image::decode::DecodedImage;

/// make_imagenet_c.py's `defocus_blur`: `cv2.filter2D` of each channel with the
/// [`defocus_kernel`].
pub(super) fn defocus_blur(img: &FloatImage, (radius, alias_blur): (f32, f32)) -> FloatImage {
    let (kernel, side) = defocus_kernel(radius, alias_blur);
    filter2d_reflect101(img, &kernel, side)
}

/// make_imagenet_c.py's `disk(radius, alias_blur)`: an aliased disk `x² + y² ≤ r²` on a
/// 17x17 grid (radius ≤ 8) or a (2r+1)² grid (larger, integral radius), normalised to
/// sum 1, then `cv2.GaussianBlur` with a 3x3 (radius ≤ 8) or 5x5 kernel of sigma
/// `alias_blur` and OpenCV's REFLECT_101 border. Returns the kernel and its side.
///
/// Hazard, kept from the original: where the disk touches the grid's edge (radius 8,
/// and 10 on its 21x21 grid) REFLECT_101 folds blur mass back in, so the kernel sums to
/// about 1.013 (radius 8) and 1.011 (radius 10): ImageNet-C's defocus severities 4 and
/// 5 brighten the image by about 1%.
pub(super) fn defocus_kernel(radius: f32, alias_blur: f32) -> (Vec<f32>, usize) {
    let (half, blur_radius) = if radius <= 8.0 { (8, 1) } else { (radius as usize, 2) };
    let side = 2 * half + 1;
    let limit = f64::from(radius).powi(2);
    let inside = |i: usize| (i as f64 - half as f64).powi(2);
    let aliased = FloatImage::from_fn(side, side, 1, |x, y, _| f32::from(inside(x) + inside(y) <= limit));
    let count: f32 = aliased.data.iter().sum();
    let blurred = aliased
        .map(|v| v / count)
        .convolve_separable(&gaussian_kernel(blur_radius, f64::from(alias_blur)), Border::Reflect101);
    // A sharp anti-alias blur (sigma 0.1) leaves corner weights near e^-100, subnormal
    // in f32: they change no output level but make every multiply ~100x slower.
    let kernel = blurred.data.iter().map(|&w| if w < 1e-30 { 0.0 } else { w }).collect();
    (kernel, side)
}

/// `cv2.filter2D(x, -1, kernel)` per channel: correlation with a `side`² kernel anchored
/// at its centre, REFLECT_101 border. Zero weights are skipped.
fn filter2d_reflect101(img: &FloatImage, kernel: &[f32], side: usize) -> FloatImage {
    let (width, height, c) = (img.width, img.height, img.channels);
    let radius = side / 2;
    let row_len = width * c;
    let padded_len = (width + 2 * radius) * c;
    // Every row with `radius` border pixels on either side.
    let padded: Vec<f32> = (0..height)
        .flat_map(|y| {
            (0..width + 2 * radius).flat_map(move |px| {
                let sx = Border::Reflect101.resolve(px as isize - radius as isize, width);
                img.data[(y * width + sx) * c..][..c].iter().copied()
            })
        })
        .collect();
    let mut data = vec![0f32; img.data.len()];
    for (y, dst) in data.chunks_exact_mut(row_len).enumerate() {
        for (i, &w) in kernel.iter().enumerate().filter(|&(_, &w)| w != 0.0) {
            let (kx, ky) = (i % side, i / side);
            let sy = Border::Reflect101.resolve((y + ky) as isize - radius as isize, height);
            let src = &padded[sy * padded_len + kx * c..][..row_len];
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += w * s);
        }
    }
    FloatImage { data, ..*img }
}

/// make_imagenet_c.py's `glass_blur`: Gaussian blur, quantize to 8 bits, locally shuffle
/// pixels (for each pass, rows `height - d` down to `d + 1` and likewise columns, swap
/// with a neighbour offset by `randint(-d, d)` per axis), blur again.
pub(super) fn glass_blur(
    img: &FloatImage,
    (sigma, max_delta, iterations): (f64, i64, u32),
    rng: &mut Rng,
) -> FloatImage {
    let blurred = img.gaussian_filter(sigma, 4.0, Border::Nearest);
    let mut pixels: Vec<u8> = blurred.data.iter().map(|&v| truncate_to_u8(v * 255.0)).collect();
    let (width, height, c) = (img.width as i64, img.height as i64, img.channels);
    let d = max_delta;
    for _ in 0..iterations {
        for row in (d + 1..=height - d).rev() {
            for col in (d + 1..=width - d).rev() {
                let dx = rng.int_in(-d, d);
                let dy = rng.int_in(-d, d);
                let here = (row * width + col) as usize * c;
                let there = ((row + dy) * width + col + dx) as usize * c;
                for ch in 0..c {
                    pixels.swap(here + ch, there + ch);
                }
            }
        }
    }
    let shuffled = FloatImage {
        data: pixels.iter().map(|&v| f32::from(v) / 255.0).collect(),
        ..*img
    };
    shuffled.gaussian_filter(sigma, 4.0, Border::Nearest)
}

/// make_imagenet_c.py's `motion_blur`: ImageMagick's motion blur ([`motion_blur_taps`])
/// at an angle drawn from `U(-45, 45)` degrees, on the 8-bit image.
pub(super) fn motion_blur(img: &DecodedImage, (radius, sigma): (f64, f64), rng: &mut Rng) -> DecodedImage {
    let taps = motion_blur_taps(radius, sigma, rng.uniform_in(-45.0, 45.0));
    let (width, height) = (img.width as usize, img.height as usize);
    with_data(
        img,
        motion_blur_u8(&img.data, width, height, img.channels.count(), &taps),
    )
}

/// make_imagenet_c.py's `zoom_blur`: the mean of the image and its clipped zooms by
/// `1 + i·step` for i in `0..count`.
pub(super) fn zoom_blur(img: &FloatImage, (step, count): (f64, usize)) -> FloatImage {
    let mut sum = img.clone();
    for i in 0..count {
        let zoomed = clipped_zoom(img, 1.0 + i as f64 * step);
        sum.data.iter_mut().zip(&zoomed.data).for_each(|(s, z)| *s += z);
    }
    sum.map(|v| v / (count + 1) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defocus_kernels_reach_one_pixel_past_the_disk() {
        // Radii whose 3x3 anti-alias blur stays inside the 17x17 grid: unit sum.
        for (radius, alias_blur) in [(0.3, 0.4), (1.0, 0.2), (1.5, 0.1), (3.0, 0.1), (4.0, 0.5), (6.0, 0.5)] {
            let (kernel, side) = defocus_kernel(radius, alias_blur);
            assert_eq!(side, 17);
            let sum: f32 = kernel.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "radius {radius}: sum {sum}");
            let on_axis = |d: usize| kernel[8 * side + 8 + d];
            let reach = radius.floor() as usize + 1;
            assert!(on_axis(reach) > 0.0, "radius {radius}: nothing at {reach}");
            assert_eq!(on_axis(reach + 1), 0.0, "radius {radius}: weight beyond {reach}");
        }
        // Disks touching the grid's edge gain the mass REFLECT_101 folds back.
        for (radius, side, gain) in [(8.0, 17, 1.013), (10.0, 21, 1.011)] {
            let (kernel, got_side) = defocus_kernel(radius, 0.5);
            assert_eq!(got_side, side);
            let sum: f32 = kernel.iter().sum();
            assert!((sum - gain).abs() < 5e-4, "radius {radius}: sum {sum}");
        }
    }
}
