//! Decode and preprocess: encoded bytes to the classifier's input tensor.
//!
//! Everything here is CPU-bound and synchronous; the pipeline runs it on the decode
//! pool, never on the async I/O threads.

pub mod corrupt;
pub mod decode;
pub mod dense;
pub mod preprocess;
pub mod protocol;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::sample::{Defect, Sample, Status, Task, Variant};

pub use decode::{decode, Channels, DecodedImage};
pub use dense::{DenseLabel, LabelConfig};
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
    /// The dense label in the classifier view's geometry (dense tasks, when the sample
    /// has a readable one), shared by every variant: corruptions never touch it.
    pub dense_label: Option<Arc<DenseLabel>>,
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
    /// The bundle's task: which dense label member (if any) to read with each image.
    pub task: Task,
    pub labels: LabelConfig,
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
/// Never fails and never panics: problems (a panic in a decoder or a corruption
/// included) become the defect of the rows they concern.
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
        dense,
        mut defect,
    } = sample;
    let mut decoded = None;
    if let Some(bytes) = image.filter(|_| defect.as_ref().is_none_or(|d| d.status.is_predicted())) {
        // Corruptions are defined on the full-scale image; otherwise large JPEGs may be
        // decoded at a reduced DCT scale that still covers both views.
        let result = catch_unwind(AssertUnwindSafe(|| {
            // Dense labels are checked against the full-scale size and cropped with it.
            if expansion.corrupts() || views.task.is_dense() {
                decode(&bytes, views.decode_channels(), limits.max_pixels)
            } else {
                decode::decode_for_view(
                    &bytes,
                    views.decode_channels(),
                    limits.max_pixels,
                    views.classifier.needed_short_side(views.diffusion.as_ref()),
                )
            }
        }))
        .unwrap_or_else(|panic| Err(Defect::from_panic("the image decoder", panic.as_ref())));
        match result {
            Ok(img) => decoded = Some(img),
            // An image problem outranks a label problem.
            Err(d) => defect = Some(d),
        }
    }
    let mut dense_label = None;
    if let Some(img) = &decoded {
        let read = catch_unwind(AssertUnwindSafe(|| {
            dense::read_label(
                &dense,
                views.task,
                &views.labels,
                (img.width, img.height),
                &views.classifier,
            )
        }))
        .unwrap_or_else(|panic| {
            let d = Defect::from_panic("the label decoder", panic.as_ref());
            Err(Defect::new(Status::BadLabel, d.message))
        });
        match read {
            Ok(l) => dense_label = l.map(Arc::new),
            Err(d) => {
                defect.get_or_insert(d);
            }
        }
    }
    let has_label = match views.task {
        Task::Classification => label.is_some(),
        _ => dense_label.is_some(),
    };
    if defect.is_none() && require_label && !has_label {
        let member = match views.task {
            Task::Classification => ".cls/.json/.txt",
            Task::Segmentation => "seg.png",
            Task::Depth => "depth.png",
        };
        defect = Some(Defect::new(
            Status::MissingLabel,
            format!("no {member} label and input.require_label is set"),
        ));
    }
    expansion
        .variants
        .iter()
        .map(|&variant| {
            // A panic in one variant's corruption or resize costs that variant's pixels.
            let views_of = || {
                let corrupted;
                let img = match (&decoded, variant.corruption) {
                    (Some(img), Some(kind)) => {
                        let seed = corrupt::variant_seed(expansion.seed, &key, kind, variant.severity);
                        corrupted = corrupt::corrupt(img, kind, variant.severity, seed);
                        Some(&corrupted)
                    }
                    (img, _) => img.as_ref(),
                };
                let pixels = img.map(|img| views.classifier.apply(img));
                let gen = img.and_then(|img| views.diffusion.as_ref().map(|d| d.apply(img, &views.classifier)));
                (pixels, gen)
            };
            let (pixels, gen_pixels, defect) = match catch_unwind(AssertUnwindSafe(views_of)) {
                Ok((pixels, gen)) => (pixels, gen, defect.clone()),
                Err(panic) => {
                    let what = format!("preparing the {} variant", variant.tag());
                    (None, None, Some(Defect::from_panic(&what, panic.as_ref())))
                }
            };
            Prepared {
                key: key.clone(),
                label,
                variant,
                pixels,
                gen_pixels,
                dense_label: dense_label.clone(),
                defect,
            }
        })
        .collect()
}
