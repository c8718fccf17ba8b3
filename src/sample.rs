//! The row contract shared by every stage: a [`Sample`] as read, its [`Status`] and
//! [`Defect`], and the [`Variant`] (clean or one ImageNet-C [`Corruption`]) a row is
//! about.
//!
//! Invariant: this module depends on nothing else in the crate, so any stage may name
//! these types without creating an import cycle. The names written by `as_str` and
//! `name` are part of the output contract (the `status` and `corruption` columns).

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Why a sample got no regular prediction, or what is off with it. Written as the
/// `status` column; the names are part of the output contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// The image member could not be decoded (truncated, empty, not an image).
    DecodeError,
    /// The image member or its pixel count is over a configured limit.
    TooLarge,
    /// The sample has no member with an image extension.
    NoImage,
    /// A label member exists but does not hold a class index, or a dense label cannot
    /// be read or differs in size from its image. Predicted anyway.
    BadLabel,
    /// `input.require_label` is set and the sample has no label. Predicted anyway.
    MissingLabel,
    /// Adaptation produced a NaN or infinite loss; the source prediction is kept and the
    /// weights are restored.
    Diverged,
}

impl Status {
    /// Every status, in column-documentation order.
    pub const ALL: [Status; 7] = [
        Status::Ok,
        Status::DecodeError,
        Status::TooLarge,
        Status::NoImage,
        Status::BadLabel,
        Status::MissingLabel,
        Status::Diverged,
    ];

    /// The `status` column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::DecodeError => "decode_error",
            Status::TooLarge => "too_large",
            Status::NoImage => "no_image",
            Status::BadLabel => "bad_label",
            Status::MissingLabel => "missing_label",
            Status::Diverged => "diverged",
        }
    }

    /// Whether a sample with this status still gets a prediction.
    pub fn is_predicted(self) -> bool {
        matches!(
            self,
            Status::Ok | Status::BadLabel | Status::MissingLabel | Status::Diverged
        )
    }
}

/// A problem found with one sample: its status and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect {
    pub status: Status,
    pub message: String,
}

impl Defect {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Defect {
            status,
            message: message.into(),
        }
    }

    /// The `decode_error` of a sample whose `what` (decoder, corruption) panicked, with
    /// the panic's message: the sample loses its pixels, not its row.
    pub fn from_panic(what: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        Defect::new(
            Status::DecodeError,
            format!("{what} panicked: {}", panic_message(payload)),
        )
    }
}

/// The message of a caught panic (`panic!` with a string literal or a formatted one).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

/// What a model predicts (the bundle's `task`): one class per image, a class per pixel,
/// or a depth per pixel. Serialized as `classification`, `segmentation`, `depth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    #[default]
    Classification,
    Segmentation,
    Depth,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Segmentation => "segmentation",
            Task::Depth => "depth",
        }
    }

    /// Segmentation and depth predict a map, not one class.
    pub fn is_dense(self) -> bool {
        self != Task::Classification
    }
}

/// A sample's dense label members as read, still encoded: `seg.png` (8-bit, one class
/// index per pixel, 255 = ignore) and `depth.png` (16-bit, depth in units of
/// `label.depth_scale` metres, 0 = invalid). Decoded with the image (`image::dense`).
#[derive(Debug, Clone, Default)]
pub struct DenseMembers {
    pub seg: Option<Bytes>,
    pub depth: Option<Bytes>,
}

/// One sample as read from a shard, before decoding.
#[derive(Debug, Clone)]
pub struct Sample {
    pub key: String,
    /// The encoded image, when the sample has one within the size limit.
    pub image: Option<Bytes>,
    pub label: Option<i64>,
    /// Encoded dense labels, when the sample has them.
    pub dense: DenseMembers,
    /// The first problem found while reading this sample, if any.
    pub defect: Option<Defect>,
}

/// One presentation of a decoded image: as decoded (`corruption = None`, severity 0), or
/// with an ImageNet-C corruption at a severity in 1..=5.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub corruption: Option<Corruption>,
    pub severity: u8,
}

impl Variant {
    pub const CLEAN: Variant = Variant {
        corruption: None,
        severity: 0,
    };

    /// The `corruption` column: the corruption's name, or `clean`.
    pub fn corruption_name(self) -> &'static str {
        self.corruption.map_or("clean", Corruption::name)
    }

    /// `clean`, or `<corruption>/<severity>`: the key of per-variant tallies. Read back
    /// with [`Variant::from_str`].
    pub fn tag(self) -> String {
        match self.corruption {
            None => "clean".into(),
            Some(c) => format!("{}/{}", c.name(), self.severity),
        }
    }
}

impl FromStr for Variant {
    type Err = String;

    /// Parses what [`Variant::tag`] writes; anything else is an error, never a guess.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "clean" {
            return Ok(Variant::CLEAN);
        }
        let (name, severity) = s
            .split_once('/')
            .ok_or_else(|| format!("variant {s:?}: expected `clean` or `<corruption>/<severity>`"))?;
        let severity: u8 = severity
            .parse()
            .ok()
            .filter(|n| (1..=5).contains(n))
            .ok_or_else(|| format!("variant {s:?}: the severity must be 1..=5"))?;
        Ok(Variant {
            corruption: Some(name.parse()?),
            severity,
        })
    }
}

/// One of the 15 ImageNet-C benchmark corruptions. Serialized as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    GaussianNoise,
    ShotNoise,
    ImpulseNoise,
    DefocusBlur,
    GlassBlur,
    MotionBlur,
    ZoomBlur,
    Snow,
    Frost,
    Fog,
    Brightness,
    Contrast,
    ElasticTransform,
    Pixelate,
    JpegCompression,
}

impl Corruption {
    /// All corruptions, in the benchmark's order (noise, blur, weather, digital).
    pub const ALL: [Corruption; 15] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::DefocusBlur,
        Corruption::GlassBlur,
        Corruption::MotionBlur,
        Corruption::ZoomBlur,
        Corruption::Snow,
        Corruption::Frost,
        Corruption::Fog,
        Corruption::Brightness,
        Corruption::Contrast,
        Corruption::ElasticTransform,
        Corruption::Pixelate,
        Corruption::JpegCompression,
    ];

    /// The snake_case name, as in the ImageNet-C scripts and the serde form.
    pub fn name(self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::DefocusBlur => "defocus_blur",
            Corruption::GlassBlur => "glass_blur",
            Corruption::MotionBlur => "motion_blur",
            Corruption::ZoomBlur => "zoom_blur",
            Corruption::Snow => "snow",
            Corruption::Frost => "frost",
            Corruption::Fog => "fog",
            Corruption::Brightness => "brightness",
            Corruption::Contrast => "contrast",
            Corruption::ElasticTransform => "elastic_transform",
            Corruption::Pixelate => "pixelate",
            Corruption::JpegCompression => "jpeg_compression",
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Corruption {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Corruption::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let valid: Vec<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
            format!("unknown corruption {s:?}; valid: {}", valid.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_labels_round_trip() {
        for v in [
            Variant::CLEAN,
            Variant {
                corruption: Some(Corruption::Fog),
                severity: 3,
            },
        ] {
            assert_eq!(v.tag().parse::<Variant>().unwrap(), v);
        }
        assert!("fog".parse::<Variant>().is_err());
        assert!("fog/x".parse::<Variant>().is_err());
        assert!("fog/0".parse::<Variant>().is_err());
        assert!("smog/2".parse::<Variant>().is_err());
    }
}
