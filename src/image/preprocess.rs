//! The classifier view: resize the shorter side, center crop, normalise, CHW float.
//!
//! Resize-then-crop is done as one resize of the crop window only (the source region
//! that lands in the crop), which samples the same positions with the same filter as
//! torchvision's `Resize(r)` + `CenterCrop(c)` without resizing pixels that are thrown
//! away.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::decode::{Channels, DecodedImage};

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
        (left * sx, top * sy, c * sx, c * sy)
    }

    /// Produces the normalised CHW tensor data of `img`.
    pub fn apply(&self, img: &DecodedImage) -> Vec<f32> {
        let window = self.crop_window(img.width, img.height);
        let pixels = resize_window(img, self.channels, window, self.crop);
        let n = self.channels.count();
        let plane = (self.crop * self.crop) as usize;
        let mut out = vec![0f32; n * plane];
        for c in 0..n {
            let scale = 1.0 / (255.0 * self.std[c]);
            let shift = self.mean[c] / self.std[c];
            for (i, v) in out[c * plane..(c + 1) * plane].iter_mut().enumerate() {
                *v = pixels[i * n + c] as f32 * scale - shift;
            }
        }
        out
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
        let pixels = resize_window(img, self.channels, window, self.resolution);
        let n = self.channels.count();
        let plane = (self.resolution * self.resolution) as usize;
        let mut out = vec![0f32; n * plane];
        for c in 0..n {
            for (i, v) in out[c * plane..(c + 1) * plane].iter_mut().enumerate() {
                *v = pixels[i * n + c] as f32 * (2.0 / 255.0) - 1.0;
            }
        }
        out
    }
}

/// Resizes the source `window` of `img` to `side` x `side` HWC bytes with `channels`
/// (bilinear, PIL-style antialiasing). The whole image at the target size is copied as is.
fn resize_window(img: &DecodedImage, channels: Channels, window: (f64, f64, f64, f64), side: u32) -> Vec<u8> {
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
        return data.to_vec();
    }
    let pixel_type = match channels {
        Channels::Gray => PixelType::U8,
        Channels::Rgb => PixelType::U8x3,
    };
    let src = ImageRef::new(img.width, img.height, data, pixel_type).expect("decoded buffer matches its dimensions");
    let mut dst = Image::new(side, side, pixel_type);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(l, t, w, h);
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type on both sides");
    dst.into_vec()
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
}
