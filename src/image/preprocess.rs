//! The classifier view: resize the shorter side, center crop, normalise, CHW float.
//!
//! Resize-then-crop is done as one resize of the crop window only (the source region
//! that lands in the crop), which samples the same positions with the same filter as
//! torchvision's `Resize(r)` + `CenterCrop(c)` without resizing pixels that are thrown
//! away. Normalisation and the HWC -> CHW layout change are one pass over the resized
//! crop (AVX2 where the CPU has it), which writes each output float once; the resizer
//! and its buffers are reused per thread.
//!
//! The crop window is placed in relative coordinates, so an image decoded at a reduced
//! DCT scale that is exactly the full-scale one divided
//! ([`decode_for_view`](super::decode::decode_for_view)) gives the same window.

use std::cell::Cell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::decode::{Channels, DecodedImage};

/// How much larger than the views need a reduced JPEG decode stays (see
/// [`ClassifierView::needed_short_side`]).
///
/// A reduced decode averages each 8x8 block down to 8/d x 8/d pixels (a box filter);
/// stopping at twice the resize target leaves at least a 2x downscale to the bilinear
/// filter, whose antialiasing then does most of the work, as at full scale. Measured by
/// `benches/preprocess.rs` on photographs of 2400-4000 px: mean absolute difference
/// from the full-scale path 0.45 8-bit levels (max 22) with a margin of 2, against 1.45
/// (max 62) with none, for about 11% more time per image (3.9x PIL per core, against
/// 4.3x).
pub const SCALED_DECODE_MARGIN: u32 = 2;

/// Preprocessing of the classifier input, from the model bundle.
#[derive(Debug, Clone)]
pub struct ClassifierView {
    pub channels: Channels,
    /// Target length of the shorter side.
    pub resize: u32,
    /// Side of the square center crop; at most `resize`.
    pub crop: u32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl ClassifierView {
    /// Elements of one preprocessed image.
    pub fn numel(&self) -> usize {
        self.channels.count() * (self.crop as usize).pow(2)
    }

    /// The shorter side to ask a reduced decode
    /// ([`decode_for_view`](super::decode::decode_for_view)) for:
    /// [`SCALED_DECODE_MARGIN`] times the least that neither this view nor `diffusion`
    /// (which resizes this view's crop window) enlarges, that is `resize` for the
    /// classifier, and enough that the crop window (`crop / resize` of the shorter side)
    /// spans `resolution` pixels for the diffusion view.
    pub fn needed_short_side(&self, diffusion: Option<&DiffusionView>) -> u32 {
        let gen = diffusion.map_or(0, |d| {
            (d.resolution as u64 * self.resize as u64).div_ceil(self.crop.max(1) as u64) as u32
        });
        self.resize.max(gen).saturating_mul(SCALED_DECODE_MARGIN)
    }

    /// The source rectangle (left, top, width, height) that ends up in the crop,
    /// following torchvision: the longer side is truncated after scaling, the crop
    /// offset is rounded.
    pub fn crop_window(&self, width: u32, height: u32) -> (f64, f64, f64, f64) {
        let (w, h) = (width as f64, height as f64);
        let r = self.resize as f64;
        let (new_w, new_h) = if width <= height {
            (r, (r * h / w).trunc())
        } else {
            ((r * w / h).trunc(), r)
        };
        let c = self.crop as f64;
        let left = ((new_w - c) / 2.0).round_ties_even(); // Python's round()
        let top = ((new_h - c) / 2.0).round_ties_even();
        let (sx, sy) = (w / new_w, h / new_h);
        let (left, top) = (left * sx, top * sy);
        // Float rounding can put the far edge a hair past the image (28 * (232 / 28) =
        // 232.00000000000003), which the resizer rejects: clamp it to the image.
        (left, top, (c * sx).min(w - left), (c * sy).min(h - top))
    }

    /// Produces the normalised CHW tensor data of `img`.
    pub fn apply(&self, img: &DecodedImage) -> Vec<f32> {
        let window = self.crop_window(img.width, img.height);
        let n = self.channels.count();
        let (mut scale, mut shift) = ([0f32; 3], [0f32; 3]);
        for c in 0..n {
            scale[c] = 1.0 / (255.0 * self.std[c]);
            shift[c] = self.mean[c] / self.std[c];
        }
        with_resized_window(img, self.channels, window, self.crop, |pixels| {
            to_chw(pixels, n, scale, shift)
        })
    }
}

/// The diffusion model's view: the classifier's crop window, resized to `resolution`,
/// mapped to [-1, 1].
#[derive(Debug, Clone)]
pub struct DiffusionView {
    pub channels: Channels,
    pub resolution: u32,
}

impl DiffusionView {
    pub fn numel(&self) -> usize {
        self.channels.count() * (self.resolution as usize).pow(2)
    }

    /// CHW floats in [-1, 1] of the same source window the classifier sees.
    pub fn apply(&self, img: &DecodedImage, classifier: &ClassifierView) -> Vec<f32> {
        let window = classifier.crop_window(img.width, img.height);
        let n = self.channels.count();
        with_resized_window(img, self.channels, window, self.resolution, |pixels| {
            to_chw(pixels, n, [2.0 / 255.0; 3], [1.0; 3])
        })
    }
}

/// HWC bytes with `n` (1 or 3) channels to CHW floats `v * scale[c] - shift[c]`, in one
/// pass that writes every output element once (no zero-filling first).
fn to_chw(pixels: &[u8], n: usize, scale: [f32; 3], shift: [f32; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(pixels.len());
    let spare = &mut out.spare_capacity_mut()[..pixels.len()];
    if n == 3 {
        let plane = pixels.len() / 3;
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; `spare` holds `pixels.len()` elements.
            done = unsafe { simd::rgb_to_chw_avx2(pixels, spare, scale, shift) };
        }
        for i in done..plane {
            for c in 0..3 {
                spare[c * plane + i].write(pixels[i * 3 + c] as f32 * scale[c] - shift[c]);
            }
        }
    } else {
        for (o, p) in spare.iter_mut().zip(pixels) {
            o.write(*p as f32 * scale[0] - shift[0]);
        }
    }
    // SAFETY: every one of the `pixels.len()` elements was written above (the AVX2 part
    // writes pixels `0..done` of every plane, the loop the rest).
    unsafe { out.set_len(pixels.len()) };
    out
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// De-interleaves RGB bytes 16 pixels at a time (SSSE3 shuffles), converts them to
    /// f32 and writes `v * scale - shift` (a multiply then a subtract, as the scalar
    /// code, so the results are the same to the bit) into the three planes of `out`.
    /// Returns how many pixels it did: a multiple of 16; the caller does the rest.
    ///
    /// # Safety
    /// The CPU must support AVX2; `out.len() >= pixels.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rgb_to_chw_avx2(
        pixels: &[u8],
        out: &mut [MaybeUninit<f32>],
        scale: [f32; 3],
        shift: [f32; 3],
    ) -> usize {
        let plane = pixels.len() / 3;
        let blocks = plane / 16;
        assert!(out.len() >= 3 * plane);
        #[rustfmt::skip]
        const MASKS: [[[i8; 16]; 3]; 3] = [
            [
                [0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
                [-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1],
                [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13],
            ],
            [
                [1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
                [-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1],
                [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14],
            ],
            [
                [2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
                [-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1],
                [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15],
            ],
        ];
        let masks = MASKS.map(|m| m.map(|v| _mm_loadu_si128(v.as_ptr().cast())));
        let scale = scale.map(|v| _mm256_set1_ps(v));
        let shift = shift.map(|v| _mm256_set1_ps(v));
        let src = pixels.as_ptr();
        let dst = out.as_mut_ptr().cast::<f32>();
        for i in 0..blocks {
            let p = src.add(i * 48);
            let x = [
                _mm_loadu_si128(p.cast()),
                _mm_loadu_si128(p.add(16).cast()),
                _mm_loadu_si128(p.add(32).cast()),
            ];
            for c in 0..3 {
                let m = &masks[c];
                let bytes = _mm_or_si128(
                    _mm_or_si128(_mm_shuffle_epi8(x[0], m[0]), _mm_shuffle_epi8(x[1], m[1])),
                    _mm_shuffle_epi8(x[2], m[2]),
                );
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(bytes)));
                let d = dst.add(c * plane + i * 16);
                _mm256_storeu_ps(d, _mm256_sub_ps(_mm256_mul_ps(lo, scale[c]), shift[c]));
                _mm256_storeu_ps(d.add(8), _mm256_sub_ps(_mm256_mul_ps(hi, scale[c]), shift[c]));
            }
        }
        blocks * 16
    }
}

thread_local! {
    /// A resizer (its scratch buffers) and an output buffer per thread, reused from image
    /// to image; taken out while in use.
    static RESIZE: Cell<Option<(Resizer, Vec<u8>)>> = const { Cell::new(None) };
}

/// Resizes the source `window` of `img` to `side` x `side` HWC bytes with `channels`
/// (bilinear, PIL-style antialiasing) and hands them to `f`. The whole image at the
/// target size is handed over as is.
fn with_resized_window<T>(
    img: &DecodedImage,
    channels: Channels,
    window: (f64, f64, f64, f64),
    side: u32,
    f: impl FnOnce(&[u8]) -> T,
) -> T {
    let converted;
    let data: &[u8] = if img.channels == channels {
        &img.data
    } else {
        converted = convert_channels(&img.data, img.channels, channels);
        &converted
    };
    let (l, t, w, h) = window;
    let whole = l == 0.0 && t == 0.0 && w == img.width as f64 && h == img.height as f64;
    if whole && img.width == side && img.height == side {
        return f(data);
    }
    let pixel_type = match channels {
        Channels::Gray => PixelType::U8,
        Channels::Rgb => PixelType::U8x3,
    };
    let src = ImageRef::new(img.width, img.height, data, pixel_type).expect("decoded buffer matches its dimensions");
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(l, t, w, h);
    let (mut resizer, mut buffer) = RESIZE.take().unwrap_or_else(|| (Resizer::new(), Vec::new()));
    // Every byte is overwritten by the resize: no clearing when the size is unchanged.
    buffer.resize(side as usize * side as usize * channels.count(), 0);
    let mut dst = Image::from_slice_u8(side, side, &mut buffer, pixel_type).expect("buffer sized for the image");
    resizer
        .resize(&src, &mut dst, &options)
        .expect("same pixel type on both sides");
    let out = f(&buffer);
    RESIZE.set(Some((resizer, buffer)));
    out
}

/// Gray <-> RGB: replicate gray; RGB to luma with ITU-R 601 weights (as PIL's "L").
fn convert_channels(data: &[u8], from: Channels, to: Channels) -> Vec<u8> {
    match (from, to) {
        (Channels::Gray, Channels::Rgb) => data.iter().flat_map(|v| [*v, *v, *v]).collect(),
        (Channels::Rgb, Channels::Gray) => data
            .chunks_exact(3)
            .map(|p| ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8)
            .collect(),
        _ => data.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(resize: u32, crop: u32) -> ClassifierView {
        ClassifierView {
            channels: Channels::Rgb,
            resize,
            crop,
            mean: vec![0.5, 0.5, 0.5],
            std: vec![0.5, 0.5, 0.5],
        }
    }

    #[test]
    fn crop_window_matches_torchvision_geometry() {
        // 500x375 -> resize 232 -> 309x232 -> crop 224 at (42, 4) in resized space.
        let (l, t, w, h) = view(232, 224).crop_window(500, 375);
        let s = 375.0 / 232.0;
        assert!((t - 4.0 * s).abs() < 1e-9 && (h - 224.0 * s).abs() < 1e-9);
        let sx = 500.0 / 309.0;
        assert!((l - 42.0 * sx).abs() < 1e-9 && (w - 224.0 * sx).abs() < 1e-9, "{l} {w}");
    }

    #[test]
    fn crop_windows_stay_inside_the_image_and_resize() {
        // 28/28 and a short side of 232 once gave a window 232.00000000000003 tall, which
        // the resizer rejected (found by tests/mutated_shard.rs).
        for (resize, crop) in [(28, 28), (32, 28), (232, 224), (256, 224)] {
            let v = view(resize, crop);
            for short in 1..=1100 {
                for (width, height) in [(short, short), (short, short * 5 / 4 + 1), (short * 4 / 3 + 1, short)] {
                    let (l, t, w, h) = v.crop_window(width, height);
                    assert!(
                        l >= 0.0 && t >= 0.0 && l + w <= width as f64 && t + h <= height as f64,
                        "{resize}/{crop} {width}x{height}: {l} {t} {w} {h}"
                    );
                }
            }
        }
        let img = DecodedImage {
            width: 288,
            height: 232,
            channels: Channels::Gray,
            data: vec![7; 288 * 232],
        };
        let mut gray = view(28, 28);
        gray.channels = Channels::Gray;
        gray.mean = vec![0.0];
        gray.std = vec![1.0];
        assert_eq!(gray.apply(&img).len(), 28 * 28);
    }

    #[test]
    fn normalises_to_chw() {
        let img = DecodedImage {
            width: 2,
            height: 2,
            channels: Channels::Rgb,
            data: vec![0, 255, 51, 0, 255, 51, 0, 255, 51, 0, 255, 51],
        };
        let out = view(2, 2).apply(&img);
        assert_eq!(out.len(), 12);
        assert!(out[..4].iter().all(|v| (*v + 1.0).abs() < 1e-6));
        assert!(out[4..8].iter().all(|v| (*v - 1.0).abs() < 1e-6));
        assert!(out[8..].iter().all(|v| (*v - (0.2 / 0.5 - 1.0)).abs() < 1e-6));
    }

    #[test]
    fn diffusion_view_uses_the_same_window_in_minus_one_to_one() {
        let img = DecodedImage {
            width: 8,
            height: 4,
            channels: Channels::Rgb,
            data: (0..8 * 4)
                .flat_map(|i| {
                    if i % 8 == 0 || i % 8 == 7 {
                        [0, 0, 0]
                    } else {
                        [255, 255, 255]
                    }
                })
                .collect(),
        };
        // Classifier: resize 4 -> crop 4 keeps columns 2..6; the 2x filter support reaches
        // columns 1..7 (as resize-then-crop would), still white; columns 0 and 7 are black.
        let gen = DiffusionView {
            channels: Channels::Gray,
            resolution: 2,
        };
        let out = gen.apply(&img, &view(4, 4));
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-6), "{out:?}");
    }

    #[test]
    fn resizes_a_uniform_image_to_the_same_value() {
        let img = DecodedImage {
            width: 40,
            height: 30,
            channels: Channels::Rgb,
            data: vec![200; 40 * 30 * 3],
        };
        let out = view(16, 12).apply(&img);
        assert_eq!(out.len(), 3 * 12 * 12);
        let expected = 200.0 / 255.0 / 0.5 - 1.0;
        assert!(out.iter().all(|v| (v - expected).abs() < 1e-5));
    }

    #[test]
    fn needed_short_side_covers_both_views_with_the_margin() {
        let v = view(232, 224);
        assert_eq!(v.needed_short_side(None), 232 * SCALED_DECODE_MARGIN);
        let gen = DiffusionView {
            channels: Channels::Rgb,
            resolution: 256,
        };
        // The crop window must span 256 pixels: 256 * 232 / 224 = 265.1 -> 266.
        assert_eq!(v.needed_short_side(Some(&gen)), 266 * SCALED_DECODE_MARGIN);
    }

    #[test]
    fn reduced_decode_gives_nearly_the_full_scale_view() {
        let bytes = crate::image::decode::tests::smooth_jpeg(640, 468);
        let v = view(40, 32);
        let full = v.apply(&crate::image::decode(&bytes, Channels::Rgb, 1 << 20).unwrap());
        let needed = v.needed_short_side(None);
        let scaled = crate::image::decode::decode_for_view(&bytes, Channels::Rgb, 1 << 20, needed).unwrap();
        assert_eq!((scaled.width, scaled.height), (160, 117), "a 1/4 decode");
        let out = v.apply(&scaled);
        assert_eq!(out.len(), full.len());
        // In 8-bit levels (std 0.5): max and mean absolute difference.
        let levels: Vec<f32> = out
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs() * 0.5 * 255.0)
            .collect();
        let max = levels.iter().cloned().fold(0f32, f32::max);
        let mean = levels.iter().sum::<f32>() / levels.len() as f32;
        assert!(max <= 4.0 && mean <= 1.0, "max {max} mean {mean}");
    }

    #[test]
    fn chw_conversion_matches_the_plain_formula() {
        // 37 pixels: two 16-pixel blocks for the AVX2 path and a remainder.
        let pixels: Vec<u8> = (0..37 * 3).map(|i| (i * 97 % 256) as u8).collect();
        let (scale, shift) = ([0.1, 0.2, 0.3], [1.0, -2.0, 0.5]);
        let out = to_chw(&pixels, 3, scale, shift);
        for i in 0..37 {
            for c in 0..3 {
                assert_eq!(
                    out[c * 37 + i],
                    pixels[i * 3 + c] as f32 * scale[c] - shift[c],
                    "pixel {i} c{c}"
                );
            }
        }
        let out = to_chw(&pixels[..5], 1, scale, shift);
        assert_eq!(
            out,
            pixels[..5].iter().map(|v| *v as f32 * 0.1 - 1.0).collect::<Vec<_>>()
        );
    }
}
