//! Image decoding with a pixel limit checked on the header, before any pixel buffer
//! is allocated (decompression-bomb guard).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::shards::{Defect, Status};

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
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(Defect::new(
            Status::TooLarge,
            format!("{w}x{h} = {pixels} pixels, over limits.max_pixels ({max_pixels})"),
        ));
    }
    if pixels == 0 {
        return Err(fail(format!("image has no pixels ({w}x{h})")));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    decoder.set_limits(limits).map_err(|e| fail(e.to_string()))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    let data = match channels {
        Channels::Gray => img.into_luma8().into_raw(),
        Channels::Rgb => img.into_rgb8().into_raw(),
    };
    Ok(DecodedImage {
        width: w,
        height: h,
        channels,
        data,
    })
}

#[cfg(test)]
mod tests {
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
}
