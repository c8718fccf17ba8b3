//! Decode and preprocess: encoded bytes to the classifier's input tensor.
//!
//! Everything here is CPU-bound and synchronous; the pipeline runs it on the decode
//! pool, never on the async I/O threads.

pub mod decode;
pub mod preprocess;

use crate::shards::{Defect, Sample, Status};

pub use decode::{decode, Channels, DecodedImage};
pub use preprocess::{ClassifierView, DiffusionView};

/// A sample ready for the model: its classifier view, or the reason it has none.
#[derive(Debug)]
pub struct Prepared {
    pub key: String,
    pub label: Option<i64>,
    /// CHW float pixels of the classifier view; `None` when the sample cannot be predicted.
    pub pixels: Option<Vec<f32>>,
    /// CHW floats in [-1, 1] of the diffusion view, when the method needs one.
    pub gen_pixels: Option<Vec<f32>>,
    /// Status other than `ok` and its reason, if any.
    pub defect: Option<Defect>,
}

/// Limits that decoding enforces.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_pixels: u64,
}

/// The views a method needs of each image.
#[derive(Debug, Clone)]
pub struct Views {
    pub classifier: ClassifierView,
    pub diffusion: Option<DiffusionView>,
}

impl Views {
    /// Channels to decode into: RGB when either view wants it.
    fn decode_channels(&self) -> Channels {
        match (&self.classifier.channels, self.diffusion.as_ref().map(|d| d.channels)) {
            (Channels::Rgb, _) | (_, Some(Channels::Rgb)) => Channels::Rgb,
            _ => Channels::Gray,
        }
    }
}

/// Decodes and preprocesses one sample. Never fails: problems become the defect.
pub fn prepare(sample: Sample, views: &Views, limits: DecodeLimits, require_label: bool) -> Prepared {
    let Sample {
        key,
        image,
        label,
        mut defect,
    } = sample;
    let mut pixels = None;
    let mut gen_pixels = None;
    if let Some(bytes) = image.filter(|_| defect.as_ref().is_none_or(|d| d.status.is_predicted())) {
        match decode(&bytes, views.decode_channels(), limits.max_pixels) {
            Ok(img) => {
                pixels = Some(views.classifier.apply(&img));
                gen_pixels = views.diffusion.as_ref().map(|d| d.apply(&img, &views.classifier));
            }
            // An image problem outranks a label problem.
            Err(d) => defect = Some(d),
        }
    }
    if defect.is_none() && require_label && label.is_none() {
        defect = Some(Defect::new(
            Status::MissingLabel,
            "no .cls/.json/.txt label and input.require_label is set",
        ));
    }
    Prepared {
        key,
        label,
        pixels,
        gen_pixels,
        defect,
    }
}
