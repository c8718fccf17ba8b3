//! Decode and preprocess: encoded bytes to the classifier's input tensor.
//!
//! Everything here is CPU-bound and synchronous; the pipeline runs it on the decode
//! pool, never on the async I/O threads.

pub mod decode;
pub mod preprocess;

use crate::shards::{Defect, Sample, Status};

pub use decode::{decode, Channels, DecodedImage};
pub use preprocess::ClassifierView;

/// A sample ready for the model: its classifier view, or the reason it has none.
#[derive(Debug)]
pub struct Prepared {
    pub key: String,
    pub label: Option<i64>,
    /// CHW float pixels of the classifier view; `None` when the sample cannot be predicted.
    pub pixels: Option<Vec<f32>>,
    /// Status other than `ok` and its reason, if any.
    pub defect: Option<Defect>,
}

/// Limits that decoding enforces.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_pixels: u64,
}

/// Decodes and preprocesses one sample. Never fails: problems become the defect.
pub fn prepare(sample: Sample, view: &ClassifierView, limits: DecodeLimits, require_label: bool) -> Prepared {
    let Sample {
        key,
        image,
        label,
        mut defect,
    } = sample;
    let mut pixels = None;
    if let Some(bytes) = image.filter(|_| defect.as_ref().is_none_or(|d| d.status.is_predicted())) {
        match decode(&bytes, view.channels, limits.max_pixels) {
            Ok(img) => pixels = Some(view.apply(img)),
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
        defect,
    }
}
