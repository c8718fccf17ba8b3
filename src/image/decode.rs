//! Image decoding with a pixel limit checked on the header, before any pixel buffer
//! is allocated (decompression-bomb guard).
//!
//! Two entry points:
//! - [`decode`]: full scale, every format (JPEG, PNG, WebP through the `image` crate,
//!   zune-jpeg inside). Corruptions for robustness evaluation need this one: they are
//!   defined on the full-resolution picture.
//! - [`decode_for_view`]: a JPEG at least twice as large as the views need is decoded
//!   at 1/2, 1/4 or 1/8 scale in the DCT domain (a reduced IDCT per 8x8 block, as
//!   libjpeg's `scale_denom`), with `jpeg-decoder`; anything else as by [`decode`].
//!   Huffman decoding still reads every coefficient, but the IDCT, upsampling, colour
//!   conversion and the pixel buffer shrink by the square of the factor: on the
//!   benchmark's 2400-4000 px photos, decode and classifier view take 19 ms per image,
//!   against 30 ms through the full-scale path and 28 ms for the full-scale decode
//!   alone (PIL: 73 ms). The views compute their crop window in relative coordinates, which is exact
//!   only when the reduced image is exactly the full one divided (see
//!   [`dct_reduction`]); the pixels differ from the full-scale path by a filter
//!   difference (a block average before the bilinear filter), which
//!   `benches/preprocess.rs` measures on photographs (see
//!   [`SCALED_DECODE_MARGIN`](super::preprocess::SCALED_DECODE_MARGIN)).
//!
//! Why `jpeg-decoder` for the reduced decode: zune-jpeg (fast at full scale, used by
//! [`decode`]) has no scaled IDCT. `jpeg-decoder` is pure Rust and, with its `rayon`
//! feature, keeps its per-component work on the caller's rayon pool. libjpeg-turbo
//! through `mozjpeg-sys` (built from C by `cc`, without SIMD where nasm is missing) was
//! faster at 1/8 (12 ms against 18 ms on the same photos) but brings C code, unsafe FFI
//! and a longjmp-based error path, for a gain the 3x goal does not need.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::sample::{Defect, Status};

/// Channel layout the classifier wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channels {
    Gray,
    Rgb,
}

impl Channels {
    pub fn count(self) -> usize {
        match self {
            Channels::Gray => 1,
            Channels::Rgb => 3,
        }
    }
}

/// Interleaved 8-bit pixels (HWC), `channels.count()` bytes per pixel.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    pub width: u32,
    pub height: u32,
    pub channels: Channels,
    pub data: Vec<u8>,
}

/// Decodes JPEG, PNG or WebP into `channels`; the format comes from the bytes, not the
/// member's extension.
pub fn decode(bytes: &[u8], channels: Channels, max_pixels: u64) -> Result<DecodedImage, Defect> {
    let fail = |m: String| Defect::new(Status::DecodeError, m);
    if bytes.is_empty() {
        return Err(fail("empty image member (0 bytes)".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    if reader.format().is_none() {
        return Err(fail("not an image: unknown format (expected JPEG, PNG or WebP)".into()));
    }
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    let pixels = check_pixels(w, h, max_pixels)?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(alloc_limit(pixels));
    decoder.set_limits(limits).map_err(|e| fail(e.to_string()))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    Ok(into_channels(img, channels))
}

/// Like [`decode`], but a JPEG whose sides allow it (see [`dct_reduction`]) is decoded
/// at 1/2, 1/4 or 1/8 scale in the DCT domain, the largest that keeps its shorter side
/// at or above `needed_short_side`; `width` and `height` are then the reduced ones,
/// exactly the full-scale ones divided by the factor. Everything else (other formats,
/// smaller JPEGs, sides the factor does not divide, JPEG flavours the reduced decoder
/// does not produce as 8-bit gray or RGB, incomplete files, and any error) goes through
/// [`decode`], so defects and their messages are the same as there. The pixel limit
/// applies to the image as encoded, whatever the scale it is decoded at.
///
/// Pass the shorter side the views need (see
/// [`ClassifierView::needed_short_side`](super::ClassifierView::needed_short_side)).
/// Not for images that get corrupted afterwards: corruptions are defined at full scale.
///
/// The reduced decoder does its per-component work on the current rayon pool (the
/// decode pool in the pipeline), never on threads of its own.
pub fn decode_for_view(
    bytes: &[u8],
    channels: Channels,
    max_pixels: u64,
    needed_short_side: u32,
) -> Result<DecodedImage, Defect> {
    match decode_jpeg_reduced(bytes, channels, max_pixels, needed_short_side) {
        Reduced::Done(img) => Ok(img),
        Reduced::TooLarge(defect) => Err(defect),
        Reduced::NotApplicable => decode(bytes, channels, max_pixels),
    }
}

/// The DCT-domain reduction (1, 2, 4 or 8) for a `width` x `height` image whose shorter
/// side must stay at least `needed_short_side`: the largest `d` that divides both sides
/// with `min(width, height) / d >= needed_short_side`.
///
/// Both sides must be multiples of `d` because the views place their crop window in
/// relative coordinates: a reduced side of `ceil(side / d)` pixels, the last of them
/// partly encoder padding, would stretch the window by up to `d - 1` full-scale pixels,
/// which on detailed photographs is several times the error of the reduction itself.
/// Camera pictures have sides that are multiples of 8 (4032x3024, 6000x4000, ...);
/// resized ones often do not, and are decoded at full scale.
pub fn dct_reduction(width: u32, height: u32, needed_short_side: u32) -> u32 {
    let short = width.min(height) as u64;
    let needed = needed_short_side.max(1) as u64;
    [8u32, 4, 2]
        .into_iter()
        .find(|&d| width.is_multiple_of(d) && height.is_multiple_of(d) && short >= needed * d as u64)
        .unwrap_or(1)
}

enum Reduced {
    Done(DecodedImage),
    TooLarge(Defect),
    NotApplicable,
}

fn decode_jpeg_reduced(bytes: &[u8], channels: Channels, max_pixels: u64, needed: u32) -> Reduced {
    // SOI followed by the start of a marker (what the `image` crate sniffs as JPEG), and
    // EOI at the end: anything but a complete file goes to `decode`, so a truncated one
    // gets the same verdict (and pixels) as at full scale, whatever each decoder's
    // tolerance of truncation. Files with bytes after EOI just lose the speed-up.
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || !bytes.ends_with(&[0xFF, 0xD9]) {
        return Reduced::NotApplicable;
    }
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    if decoder.read_info().is_err() {
        return Reduced::NotApplicable;
    }
    let Some(info) = decoder.info() else {
        return Reduced::NotApplicable;
    };
    let (w, h) = (info.width as u32, info.height as u32);
    // The limit applies to the image as encoded, whatever scale it is decoded at.
    let pixels = match check_pixels(w, h, max_pixels) {
        Ok(p) => p,
        Err(d) if d.status == Status::TooLarge => return Reduced::TooLarge(d),
        Err(_) => return Reduced::NotApplicable,
    };
    let d = dct_reduction(w, h, needed);
    if d == 1
        || !matches!(
            info.pixel_format,
            jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::RGB24
        )
    {
        return Reduced::NotApplicable;
    }
    decoder.set_max_decoding_buffer_size(alloc_limit(pixels) as usize);
    let Ok((rw, rh)) = decoder.scale((w / d) as u16, (h / d) as u16) else {
        return Reduced::NotApplicable;
    };
    let (rw, rh) = (rw as u32, rh as u32);
    if (rw * d, rh * d) != (w, h) {
        return Reduced::NotApplicable; // not the scale asked for
    }
    let Ok(data) = decoder.decode() else {
        return Reduced::NotApplicable; // `decode` reports the defect in its own words
    };
    let img = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => image::GrayImage::from_raw(rw, rh, data).map(DynamicImage::ImageLuma8),
        _ => image::RgbImage::from_raw(rw, rh, data).map(DynamicImage::ImageRgb8),
    };
    match img {
        Some(img) => Reduced::Done(into_channels(img, channels)),
        None => Reduced::NotApplicable,
    }
}

/// The pixel count of a `w` x `h` header, or the defect: over `max_pixels`, or empty.
fn check_pixels(w: u32, h: u32, max_pixels: u64) -> Result<u64, Defect> {
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(Defect::new(
            Status::TooLarge,
            format!("{w}x{h} = {pixels} pixels, over limits.max_pixels ({max_pixels})"),
        ));
    }
    if pixels == 0 {
        return Err(Defect::new(
            Status::DecodeError,
            format!("image has no pixels ({w}x{h})"),
        ));
    }
    Ok(pixels)
}

/// Bytes a decoder may allocate for an image of `pixels` pixels.
fn alloc_limit(pixels: u64) -> u64 {
    pixels.saturating_mul(16).max(1 << 20)
}

/// Gray or RGB with the `image` crate's conversions, so both paths convert alike.
fn into_channels(img: DynamicImage, channels: Channels) -> DecodedImage {
    let (width, height) = (img.width(), img.height());
    let data = match channels {
        Channels::Gray => img.into_luma8().into_raw(),
        Channels::Rgb => img.into_rgb8().into_raw(),
    };
    DecodedImage {
        width,
        height,
        channels,
        data,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 128]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 64]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_and_jpeg_to_requested_channels() {
        let d = decode(&png(5, 3), Channels::Rgb, 1000).unwrap();
        assert_eq!((d.width, d.height, d.data.len()), (5, 3, 45));
        assert_eq!(&d.data[3..6], &[1, 0, 128]);
        let d = decode(&jpeg(16, 8), Channels::Gray, 1000).unwrap();
        assert_eq!(d.data.len(), 128);
    }

    #[test]
    fn broken_inputs_are_defects() {
        assert_eq!(decode(b"", Channels::Rgb, 10).unwrap_err().status, Status::DecodeError);
        assert_eq!(
            decode(b"hello world", Channels::Rgb, 10).unwrap_err().status,
            Status::DecodeError
        );
        let mut truncated = jpeg(64, 64);
        truncated.truncate(truncated.len() / 3);
        assert_eq!(
            decode(&truncated, Channels::Rgb, 1 << 20).unwrap_err().status,
            Status::DecodeError
        );
        let big = decode(&png(100, 100), Channels::Rgb, 9_999).unwrap_err();
        assert_eq!(big.status, Status::TooLarge);
        assert!(big.message.contains("100x100"), "{}", big.message);
    }

    /// A smooth colour picture (gradients), so that a reduced decode is close to a box
    /// average of the full one.
    pub(crate) fn smooth_jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            image::Rgb([
                (40.0 + 180.0 * fx) as u8,
                (200.0 - 150.0 * fy) as u8,
                (60.0 + 120.0 * fx * fy) as u8,
            ])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn dct_reduction_keeps_the_shorter_side_and_divides_both_sides() {
        assert_eq!(dct_reduction(4000, 3000, 232), 8);
        assert_eq!(dct_reduction(3000, 4000, 464), 4);
        assert_eq!(dct_reduction(2400, 1600, 464), 2);
        assert_eq!(dct_reduction(500, 375, 232), 1);
        assert_eq!(dct_reduction(464, 1000, 232), 2);
        assert_eq!(dct_reduction(463, 1000, 232), 1);
        assert_eq!(dct_reduction(64, 64, 0), 8);
        // 2002 = 2 * 1001: only 1/2 keeps the reduced image exactly the full one divided.
        assert_eq!(dct_reduction(3000, 2002, 232), 2);
        assert_eq!(dct_reduction(2400, 1601, 232), 1);
    }

    #[test]
    fn decode_for_view_reduces_large_jpegs_in_the_dct_domain() {
        let bytes = smooth_jpeg(256, 192);
        let full = decode(&bytes, Channels::Rgb, 1 << 20).unwrap();
        let s = decode_for_view(&bytes, Channels::Rgb, 1 << 20, 24).unwrap();
        assert_eq!((s.width, s.height, s.data.len()), (32, 24, 32 * 24 * 3));
        // Each reduced pixel is about the average of its 8x8 block at full scale.
        for (y, x) in [(0, 0), (5, 17), (23, 31)] {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..8 {
                    for dx in 0..8 {
                        sum += full.data[(((y * 8 + dy) * 256 + x * 8 + dx) * 3 + c) as usize] as u32;
                    }
                }
                let got = s.data[((y * 32 + x) * 3 + c) as usize] as i32;
                assert!(
                    (got - (sum / 64) as i32).abs() <= 6,
                    "({x},{y}) c{c}: {got} vs {}",
                    sum / 64
                );
            }
        }
        // Gray from a colour JPEG; 250 and 130 are even but not multiples of 4.
        let s = decode_for_view(&smooth_jpeg(250, 130), Channels::Gray, 1 << 20, 30).unwrap();
        assert_eq!((s.width, s.height, s.data.len()), (125, 65, 125 * 65));
    }

    #[test]
    fn decode_for_view_falls_back_to_full_scale() {
        let same = |bytes: &[u8], needed: u32| {
            let s = decode_for_view(bytes, Channels::Rgb, 1 << 20, needed).unwrap();
            let full = decode(bytes, Channels::Rgb, 1 << 20).unwrap();
            assert_eq!((s.width, s.height), (full.width, full.height));
            assert_eq!(s.data, full.data);
        };
        // Small enough, a side no factor divides, or not a JPEG: the full-scale decode.
        same(&smooth_jpeg(100, 60), 40);
        same(&smooth_jpeg(257, 192), 24);
        same(&png(64, 48), 4);
        // Defects are those of `decode`, the pixel limit on the encoded size.
        let big = decode_for_view(&smooth_jpeg(256, 192), Channels::Rgb, 256 * 192 - 1, 24).unwrap_err();
        assert_eq!(big.status, Status::TooLarge);
        assert!(big.message.contains("256x192"), "{}", big.message);
        // Truncated: whatever `decode` makes of it.
        let mut truncated = smooth_jpeg(256, 192);
        truncated.truncate(truncated.len() / 2);
        same(&truncated, 24);
        let mut truncated = jpeg(64, 64);
        truncated.truncate(truncated.len() / 3);
        assert_eq!(
            decode_for_view(&truncated, Channels::Rgb, 1 << 20, 4)
                .unwrap_err()
                .status,
            Status::DecodeError
        );
        assert_eq!(
            decode_for_view(b"", Channels::Rgb, 10, 1).unwrap_err().status,
            Status::DecodeError
        );
    }
}
