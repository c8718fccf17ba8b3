//! The 15 ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) at severities 1..=5,
//! applied to decoded 8-bit images.
//!
//! # Sources
//!
//! Formulas and constant tables are copied from `ImageNet-C/create_c/make_imagenet_c.py`
//! (224x224 ImageNet) and `ImageNet-C/create_c/make_cifar_c.py` (32x32 CIFAR-10) of
//! github.com/hendrycks/robustness; the skimage, scipy, OpenCV, Pillow and ImageMagick
//! operations they call are reimplemented here (each helper names the one it mirrors).
//!
//! # Which constant table
//!
//! The published constants are tuned to one image size each. An image whose short side
//! is under 64 pixels (the 28x28 MNIST demo) gets the CIFAR-10-C table, anything larger
//! the ImageNet-C table (`ConstantTable::for_size`).
//!
//! # Any size, gray or RGB
//!
//! The scripts hard-code 224 (or 32) and square RGB input. Here every corruption keeps
//! the input's width, height and channel count, and works for any size (tested down to
//! 1x1). Where the scripts depend on the size:
//! - zoom blur and snow's zoom crop and trim each axis separately;
//! - glass blur shuffles over `height` rows and `width` columns;
//! - pixelate shrinks each axis by the published factor;
//! - fog's plasma map is the next power of two of the long side (256 for 224, 32 for
//!   28 or 32, as published) cropped to the image;
//! - elastic transform scales its pixel constants by the short side: CIFAR's
//!   `IMSIZE * k` with `IMSIZE` = short side, ImageNet's `244 * k` (sic, for a 224 image)
//!   times short side / 224. Because the smoothed noise's amplitude falls as 1/sigma
//!   while alpha grows with the size, the elastic displacement stays about as many
//!   pixels as at the reference size; only the affine jitter grows with the image;
//! - constants in pixels (blur radii and sigmas) are used as published.
//!
//! Gray images are treated as one channel where the scripts use RGB: the luma used by
//! snow is the pixel itself, and the frost texture is converted to luma.
//!
//! # Where this departs from the scripts
//!
//! - **frost** blends one of six frost photographs shipped with ImageNet-C; here a
//!   procedural frost texture stands in (`frost_texture`). The blend weights are the
//!   published ones; the texture is only frost-like, so frost numbers are not comparable
//!   with published ImageNet-C frost results.
//! - **motion blur** (and snow's streaks) call ImageMagick's `MotionBlurImage`; it is
//!   reimplemented after ImageMagick 7's effect.c (`motion_blur_taps`): same kernel
//!   width, one-sided Gaussian weights, offsets and edge handling, but one rounding to
//!   8 bits where ImageMagick rounds to its 16-bit quantum first.
//! - **jpeg compression** encodes with the `image` crate: the same IJG quality scaling
//!   of the standard tables as Pillow/libjpeg, but chroma is not subsampled (the crate
//!   writes 4:4:4 where Pillow writes 4:2:0), so colour artefacts are milder.
//! - **random draws** come from a local xoshiro256** generator, so a seed does not
//!   reproduce numpy's streams; the distributions are the published ones.
//! - ImageNet-C stored its results as quality-85 JPEGs; no such extra compression here.
//! - Math is f32 (the scripts mix float32 and float64); OpenCV's fixed-point bilinear
//!   weights in `warpAffine` are exact bilinear here.
//! - Converting back to 8 bits truncates like `np.uint8`, after a slack of 1/1000 of a
//!   level so that `k / 255 * 255` gives back `k` despite float rounding.
//!
//! # Determinism
//!
//! The output is a pure function of (pixels, kind, severity, seed): the generator is
//! local and specified here, no threads, no global state. Transcendental functions come
//! from the platform's libm, so bytes are reproducible on one platform; another libm may
//! in rare cases round a value across a level boundary.
//!
//! # Layout
//!
//! This file holds the configuration, the seeds and the dispatcher [`corrupt`]; one file
//! per family (`noise`, `blur`, `weather`, `digital`) holds the corruptions, on shared
//! `tables` (the constants), `rng` (the generator) and `raster` (float images, borders,
//! filters, conversions).

mod blur;
mod digital;
mod noise;
mod raster;
mod tables;
#[cfg(test)]
mod test_images;
mod weather;

use serde::{Deserialize, Serialize};

use super::decode::DecodedImage;
use crate::rng::{self, splitmix64, Rng};
pub use crate::sample::Corruption;
use crate::sample::Variant;
use blur::{defocus_blur, glass_blur, motion_blur, zoom_blur};
use digital::{brightness, contrast, elastic_transform, jpeg_roundtrip, pixelate};
use noise::{gaussian_noise, impulse_noise, shot_noise};
use raster::FloatImage;
use tables::ConstantTable;
use weather::{fog, frost, snow};

/// `[corrupt]`: every input sample becomes one row per variant: `clean` (unless
/// `clean = false`), then each kind at each severity, corrupted after decode
/// (src/image/corrupt/). No corrupted copy of the data set is ever written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorruptConfig {
    /// ImageNet-C corruption names; `["all"]` means all 15.
    pub kinds: Vec<String>,
    /// Severities in 1..=5.
    pub severities: Vec<u8>,
    /// Also emit the uncorrupted image (the `clean` variant).
    #[serde(default = "yes")]
    pub clean: bool,
}

fn yes() -> bool {
    true
}

impl CorruptConfig {
    /// The parsed kinds, in config order (`all` expands to the ImageNet-C order).
    pub fn corruptions(&self) -> Result<Vec<Corruption>, String> {
        if self.kinds.iter().any(|k| k == "all") {
            return Ok(Corruption::ALL.to_vec());
        }
        self.kinds.iter().map(|k| k.parse::<Corruption>()).collect()
    }

    /// The variants of one sample, in output order.
    pub fn variants(&self) -> Vec<Variant> {
        let kinds = self.corruptions().expect("validated");
        let clean = self.clean.then_some(Variant::CLEAN);
        clean
            .into_iter()
            .chain(kinds.into_iter().flat_map(|c| {
                self.severities.iter().map(move |&severity| Variant {
                    corruption: Some(c),
                    severity,
                })
            }))
            .collect()
    }
}

/// The seed for one (image key, corruption, severity) from the run's seed.
///
/// Stable across platforms, Rust versions and releases of this crate: FNV-1a (64-bit)
/// over `seed` (8 bytes LE), the key's length (8 bytes LE), the key's UTF-8 bytes, the
/// corruption's [`name`](Corruption::name) and the severity byte, then one splitmix64
/// step to spread the bits. Changing this layout changes every corrupted pixel of every
/// rerun; a test pins one value.
pub fn variant_seed(seed: u64, key: &str, kind: Corruption, severity: u8) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let fields: [&[u8]; 5] = [
        &seed.to_le_bytes(),
        &(key.len() as u64).to_le_bytes(),
        key.as_bytes(),
        kind.name().as_bytes(),
        &[severity],
    ];
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in fields.into_iter().flatten() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    }
    splitmix64(&mut hash)
}

/// Applies `kind` at `severity` to `img`; the result has the same size and channels.
///
/// Deterministic: the same (img, kind, severity, seed) always gives the same bytes.
/// Defocus blur, zoom blur, brightness, contrast, pixelate and jpeg compression draw no
/// random numbers and ignore the seed.
///
/// # Panics
/// If `severity` is outside 1..=5 (callers validate configuration first).
pub fn corrupt(img: &DecodedImage, kind: Corruption, severity: u8, seed: u64) -> DecodedImage {
    assert!(
        (1..=5).contains(&severity),
        "corruption severity must be in 1..=5, got {severity}"
    );
    let level = usize::from(severity - 1);
    let params = ConstantTable::for_size(img.width, img.height).params();
    let mut rng = Rng::new(seed);
    let channels = img.channels;
    match kind {
        Corruption::GaussianNoise => {
            gaussian_noise(&FloatImage::from_u8(img), params.gaussian_noise[level], &mut rng).to_u8(channels)
        }
        Corruption::ShotNoise => {
            shot_noise(&FloatImage::from_u8(img), params.shot_noise[level], &mut rng).to_u8(channels)
        }
        Corruption::ImpulseNoise => {
            impulse_noise(&FloatImage::from_u8(img), params.impulse_noise[level], &mut rng).to_u8(channels)
        }
        Corruption::DefocusBlur => defocus_blur(&FloatImage::from_u8(img), params.defocus_blur[level]).to_u8(channels),
        Corruption::GlassBlur => {
            glass_blur(&FloatImage::from_u8(img), params.glass_blur[level], &mut rng).to_u8(channels)
        }
        Corruption::MotionBlur => motion_blur(img, params.motion_blur[level], &mut rng),
        Corruption::ZoomBlur => zoom_blur(&FloatImage::from_u8(img), params.zoom_blur[level]).to_u8(channels),
        Corruption::Snow => snow(&FloatImage::from_u8(img), &params.snow[level], &mut rng).to_u8(channels),
        Corruption::Frost => frost(img, params.frost[level], params.frost_supersample, &mut rng),
        Corruption::Fog => fog(&FloatImage::from_u8(img), params.fog[level], &mut rng).to_u8(channels),
        Corruption::Brightness => brightness(&FloatImage::from_u8(img), params.brightness[level]).to_u8(channels),
        Corruption::Contrast => contrast(&FloatImage::from_u8(img), params.contrast[level]).to_u8(channels),
        Corruption::ElasticTransform => {
            let (alpha, sigma, jitter) = params.elastic_transform[level];
            let unit = params.elastic_unit_per_short_side * img.width.min(img.height) as f32;
            let scaled = (alpha * unit, sigma * unit, jitter * unit);
            elastic_transform(&FloatImage::from_u8(img), scaled, &mut rng).to_u8(channels)
        }
        Corruption::Pixelate => pixelate(img, params.pixelate[level]),
        Corruption::JpegCompression => jpeg_roundtrip(img, params.jpeg_quality[level]),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Instant;

    use super::*;
    use crate::image::corrupt::blur::defocus_kernel;
    use crate::image::corrupt::raster::truncate_to_u8;
    use crate::image::corrupt::test_images::{
        correlation, flat, image, max_abs_diff, mean_abs_diff, smooth_texture, textured, SEVERITIES,
    };
    use crate::image::decode::Channels;

    fn is_random(kind: Corruption) -> bool {
        !matches!(
            kind,
            Corruption::DefocusBlur
                | Corruption::ZoomBlur
                | Corruption::Brightness
                | Corruption::Contrast
                | Corruption::Pixelate
                | Corruption::JpegCompression
        )
    }

    #[test]
    fn names_round_trip_through_from_str_display_and_serde() {
        let names: HashSet<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), 15);
        for kind in Corruption::ALL {
            assert_eq!(kind.name().parse::<Corruption>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.name());
            let quoted = format!("\"{}\"", kind.name());
            assert_eq!(serde_json::from_str::<Corruption>(&quoted).unwrap(), kind);
            assert_eq!(serde_json::to_string(&kind).unwrap(), quoted);
        }
    }

    #[test]
    fn unknown_names_are_rejected_with_the_valid_list() {
        let err = "gaussian".parse::<Corruption>().unwrap_err();
        assert!(err.contains("\"gaussian\""), "{err}");
        for kind in Corruption::ALL {
            assert!(err.contains(kind.name()), "{err} lacks {kind}");
        }
        assert!(serde_json::from_str::<Corruption>("\"GaussianNoise\"").is_err());
    }

    #[test]
    fn variant_seed_is_pinned_and_depends_on_every_field() {
        let base = variant_seed(7, "img_0001", Corruption::Fog, 3);
        assert_eq!(
            base, PINNED_VARIANT_SEED,
            "variant_seed changed: every rerun's pixels would change"
        );
        let others = [
            variant_seed(8, "img_0001", Corruption::Fog, 3),
            variant_seed(7, "img_0002", Corruption::Fog, 3),
            variant_seed(7, "img_0001", Corruption::Frost, 3),
            variant_seed(7, "img_0001", Corruption::Fog, 4),
            variant_seed(7, "", Corruption::Fog, 3),
        ];
        let distinct: HashSet<u64> = others.iter().copied().chain([base]).collect();
        assert_eq!(distinct.len(), others.len() + 1);
    }

    const PINNED_VARIANT_SEED: u64 = 17_965_030_441_387_025_700;

    #[test]
    fn spatial_corruptions_keep_flat_images_flat_and_change_textured_ones() {
        let spatial = [
            Corruption::DefocusBlur,
            Corruption::GlassBlur,
            Corruption::MotionBlur,
            Corruption::ZoomBlur,
            Corruption::ElasticTransform,
            Corruption::Pixelate,
        ];
        let flats = [
            flat(28, 28, Channels::Gray, 90),
            image(96, 80, Channels::Rgb, |_, _, ch| [90, 140, 200][ch]),
        ];
        let textures = [textured(28, 28, Channels::Gray), textured(96, 80, Channels::Rgb)];
        for kind in spatial {
            for severity in SEVERITIES {
                for img in &flats {
                    // Defocus scales a flat image by its kernel's sum (see defocus_kernel).
                    let level = usize::from(severity - 1);
                    let (radius, alias_blur) =
                        ConstantTable::for_size(img.width, img.height).params().defocus_blur[level];
                    let gain = match kind {
                        Corruption::DefocusBlur => defocus_kernel(radius, alias_blur).0.iter().sum(),
                        _ => 1.0,
                    };
                    let expected = DecodedImage {
                        data: img.data.iter().map(|&v| truncate_to_u8(f32::from(v) * gain)).collect(),
                        ..img.clone()
                    };
                    let out = corrupt(img, kind, severity, 9);
                    assert!(
                        max_abs_diff(&out, &expected) <= 1,
                        "{kind} {severity} on flat {}px",
                        img.width
                    );
                }
                for img in &textures {
                    let change = mean_abs_diff(&corrupt(img, kind, severity, 9), img);
                    assert!(change > 3.0, "{kind} {severity} on textured {}px: {change}", img.width);
                }
            }
        }
    }

    #[test]
    fn every_corruption_is_deterministic_and_keeps_the_shape() {
        let images = [
            textured(28, 28, Channels::Gray),
            textured(224, 224, Channels::Rgb),
            textured(500, 375, Channels::Rgb),
        ];
        for img in &images {
            for kind in Corruption::ALL {
                let first = corrupt(img, kind, 3, 1);
                assert_eq!(
                    (first.width, first.height, first.channels, first.data.len()),
                    (img.width, img.height, img.channels, img.data.len()),
                    "{kind} on {}x{}",
                    img.width,
                    img.height
                );
                assert_eq!(first.data, corrupt(img, kind, 3, 1).data, "{kind} is not deterministic");
                let other_seed = corrupt(img, kind, 3, 2);
                assert_eq!(
                    first.data != other_seed.data,
                    is_random(kind),
                    "{kind}: seed dependence"
                );
            }
        }
    }

    #[test]
    fn severity_5_changes_the_image_more_than_severity_1() {
        // Frost's blend `c0·x + c1·frost` swaps image for texture: with CIFAR's constants
        // its mean absolute change is flat across severities, while what is left of the
        // image (the correlation with the clean one) drops. Frost is measured by that.
        // Elastic is left out: its published severities 1-2 are a large affine jitter
        // (24 px at 224, 2.6 px at 32) and 3-5 small local warps, ranked by classifier
        // error, so the pixel change falls from severity 1 to 5 by construction.
        let change = |img: &DecodedImage, kind: Corruption, severity: u8| {
            let per_seed = |seed| {
                let out = corrupt(img, kind, severity, seed);
                match kind {
                    Corruption::Frost => 1.0 - correlation(&out, img),
                    _ => mean_abs_diff(&out, img),
                }
            };
            (0..3).map(per_seed).sum::<f64>() / 3.0
        };
        for img in [
            smooth_texture(28, 28, Channels::Gray),
            smooth_texture(96, 96, Channels::Rgb),
        ] {
            for kind in Corruption::ALL
                .into_iter()
                .filter(|&k| k != Corruption::ElasticTransform)
            {
                let (mild, severe) = (change(&img, kind, 1), change(&img, kind, 5));
                assert!(
                    severe > mild,
                    "{kind} on {}px: severity 1 {mild}, 5 {severe}",
                    img.width
                );
            }
        }
    }

    #[test]
    fn tiny_images_survive_every_corruption() {
        for (width, height) in [(1, 1), (2, 9), (3, 5), (8, 8)] {
            for channels in [Channels::Gray, Channels::Rgb] {
                let img = textured(width, height, channels);
                for kind in Corruption::ALL {
                    for severity in [1, 5] {
                        let out = corrupt(&img, kind, severity, 3);
                        assert_eq!(out.data.len(), img.data.len(), "{kind} on {width}x{height}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "severity must be in 1..=5")]
    fn severity_0_panics() {
        corrupt(&flat(8, 8, Channels::Gray, 0), Corruption::Fog, 0, 0);
    }

    #[test]
    #[should_panic(expected = "severity must be in 1..=5")]
    fn severity_6_panics() {
        corrupt(&flat(8, 8, Channels::Gray, 0), Corruption::Contrast, 6, 0);
    }

    /// `cargo test --release --lib image::corrupt::tests::timing -- --ignored --nocapture`:
    /// milliseconds per image for severities 1..=5.
    #[test]
    #[ignore]
    fn timing() {
        for img in [
            smooth_texture(28, 28, Channels::Gray),
            smooth_texture(224, 224, Channels::Rgb),
        ] {
            let runs = if img.width < 64 { 200 } else { 10 };
            for kind in Corruption::ALL {
                let per_severity: Vec<String> = SEVERITIES
                    .map(|severity| {
                        let start = Instant::now();
                        for seed in 0..runs {
                            std::hint::black_box(corrupt(&img, kind, severity, seed));
                        }
                        format!("{:7.3}", start.elapsed().as_secs_f64() * 1e3 / runs as f64)
                    })
                    .collect();
                println!("{}x{} {kind:<18} {}", img.width, img.height, per_severity.join(" "));
            }
        }
    }
}
