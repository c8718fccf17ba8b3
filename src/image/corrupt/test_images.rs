//! Test images and image statistics shared by the corruptions' unit tests.

use crate::image::decode::{Channels, DecodedImage};

pub(super) fn image(width: u32, height: u32, channels: Channels, f: impl Fn(u32, u32, usize) -> u8) -> DecodedImage {
    let c = channels.count();
    let data = (0..width * height * c as u32)
        .map(|i| {
            let pixel = i / c as u32;
            f(pixel % width, pixel / width, i as usize % c)
        })
        .collect();
    DecodedImage {
        width,
        height,
        channels,
        data,
    }
}

pub(super) fn flat(width: u32, height: u32, channels: Channels, value: u8) -> DecodedImage {
    image(width, height, channels, |_, _, _| value)
}

/// Every pixel differs from its neighbours: blurs and shuffles show up.
pub(super) fn textured(width: u32, height: u32, channels: Channels) -> DecodedImage {
    image(width, height, channels, |x, y, ch| {
        ((x * 37 + y * 91 + ch as u32 * 53) % 256) as u8
    })
}

/// Photo-like: smooth waves of a few pixels' period, different per channel.
pub(super) fn smooth_texture(width: u32, height: u32, channels: Channels) -> DecodedImage {
    image(width, height, channels, |x, y, ch| {
        let (x, y, ch) = (x as f32, y as f32, ch as f32);
        (128.0 + 60.0 * (x * 0.45 + ch).sin() + 50.0 * (y * 0.3 - ch).cos()) as u8
    })
}

/// MNIST-like: black background, a white ring stroke.
pub(super) fn digit_like(width: u32, height: u32, channels: Channels) -> DecodedImage {
    let (cx, cy, r) = (width as f32 / 2.0, height as f32 / 2.0, width.min(height) as f32 / 3.0);
    image(width, height, channels, |x, y, _| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if (d - r).abs() < r / 4.0 {
            255
        } else {
            0
        }
    })
}

pub(super) fn mean(img: &DecodedImage) -> f64 {
    img.data.iter().map(|&v| f64::from(v)).sum::<f64>() / img.data.len() as f64
}

pub(super) fn variance(img: &DecodedImage) -> f64 {
    let m = mean(img);
    img.data.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / img.data.len() as f64
}

pub(super) fn mean_abs_diff(a: &DecodedImage, b: &DecodedImage) -> f64 {
    let total: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .sum();
    total / a.data.len() as f64
}

/// Pearson correlation of the values of two images of one shape.
pub(super) fn correlation(a: &DecodedImage, b: &DecodedImage) -> f64 {
    let (ma, mb) = (mean(a), mean(b));
    let cov: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| (f64::from(x) - ma) * (f64::from(y) - mb))
        .sum();
    cov / (a.data.len() as f64 * (variance(a) * variance(b)).sqrt())
}

pub(super) fn max_abs_diff(a: &DecodedImage, b: &DecodedImage) -> i32 {
    a.data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| (i32::from(x) - i32::from(y)).abs())
        .max()
        .unwrap()
}

pub(super) const SEVERITIES: std::ops::RangeInclusive<u8> = 1..=5;
