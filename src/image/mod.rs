//! Decode and preprocess: encoded bytes to the classifier's input tensor.
//!
//! Everything here is CPU-bound and synchronous; the pipeline runs it on the decode
//! pool, never on the async I/O threads.

pub mod corrupt;
pub mod decode;
pub mod preprocess;

use crate::sample::{Defect, Sample, Status, Variant};

pub use decode::{decode, Channels, DecodedImage};
pub use preprocess::{ClassifierView, DiffusionView};

/// A sample ready for the model: its classifier view, or the reason it has none.
#[derive(Debug)]
pub struct Prepared {
    pub key: String,
    pub label: Option<i64>,
    /// Which presentation of the decoded image the views hold.
    pub variant: Variant,
    /// CHW float pixels of the classifier view; `None` when the sample cannot be predicted.
    pub pixels: Option<Vec<f32>>,
    /// CHW floats in [-1, 1] of the diffusion view, when the method needs one.
    pub gen_pixels: Option<Vec<f32>>,
    /// Status other than `ok` and its reason, if any.
    pub defect: Option<Defect>,
}

/// The variants every input sample expands into, in output order. Without a
/// `[corrupt]` section this is just [`Variant::CLEAN`]: one row per sample.
#[derive(Debug, Clone)]
pub struct Expansion {
    pub variants: Vec<Variant>,
    /// Seeds the corruptions' randomness together with the key (see `corrupt::variant_seed`).
    pub seed: u64,
}

impl Expansion {
    pub fn none() -> Expansion {
        Expansion {
            variants: vec![Variant::CLEAN],
            seed: 0,
        }
    }

    /// Whether any variant corrupts: corruptions are defined on the full-scale image.
    pub fn corrupts(&self) -> bool {
        self.variants.iter().any(|v| v.corruption.is_some())
    }
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

/// Decodes one sample once and prepares every variant of it, in `expansion` order.
/// Never fails: problems become the defect, repeated on each variant's row.
pub fn prepare(
    sample: Sample,
    views: &Views,
    limits: DecodeLimits,
    require_label: bool,
    expansion: &Expansion,
) -> Vec<Prepared> {
    let Sample {
        key,
        image,
        label,
        mut defect,
    } = sample;
    let mut decoded = None;
    if let Some(bytes) = image.filter(|_| defect.as_ref().is_none_or(|d| d.status.is_predicted())) {
        // Corruptions are defined on the full-scale image; otherwise large JPEGs may be
        // decoded at a reduced DCT scale that still covers both views.
        let result = if expansion.corrupts() {
            decode(&bytes, views.decode_channels(), limits.max_pixels)
        } else {
            decode::decode_for_view(
                &bytes,
                views.decode_channels(),
                limits.max_pixels,
                views.classifier.needed_short_side(views.diffusion.as_ref()),
            )
        };
        match result {
            Ok(img) => decoded = Some(img),
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
    expansion
        .variants
        .iter()
        .map(|&variant| {
            let corrupted;
            let img = match (&decoded, variant.corruption) {
                (Some(img), Some(kind)) => {
                    let seed = corrupt::variant_seed(expansion.seed, &key, kind, variant.severity);
                    corrupted = corrupt::corrupt(img, kind, variant.severity, seed);
                    Some(&corrupted)
                }
                (img, _) => img.as_ref(),
            };
            Prepared {
                key: key.clone(),
                label,
                variant,
                pixels: img.map(|img| views.classifier.apply(img)),
                gen_pixels: img.and_then(|img| views.diffusion.as_ref().map(|d| d.apply(img, &views.classifier))),
                defect: defect.clone(),
            }
        })
        .collect()
}
