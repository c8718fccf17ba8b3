//! Shard readers: turn one shard's bytes into [`Sample`]s, in shard order.
//!
//! Invariant: every sample a reader finds is handed on, including broken ones: a
//! problem with one member becomes a [`Defect`] on its sample (and later a `status`
//! row), never a dropped sample. Only a broken shard stream is an error.

pub mod folder;
pub mod parquet;
pub mod webdataset;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::ObjectStore;

/// Why a sample got no regular prediction, or what is off with it. Written as the
/// `status` column; the names are part of the output contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// The image member could not be decoded (truncated, empty, not an image).
    DecodeError,
    /// The image member or its pixel count is over a configured limit.
    TooLarge,
    /// The sample has no member with an image extension.
    NoImage,
    /// A label member exists but does not hold a class index. Predicted anyway.
    BadLabel,
    /// `input.require_label` is set and the sample has no label. Predicted anyway.
    MissingLabel,
    /// Adaptation produced a NaN or infinite loss; the source prediction is kept and the
    /// weights are restored.
    Diverged,
}

impl Status {
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
}

/// One sample as read from a shard, before decoding.
#[derive(Debug, Clone)]
pub struct Sample {
    pub key: String,
    /// The encoded image, when the sample has one within the size limit.
    pub image: Option<Bytes>,
    pub label: Option<i64>,
    /// The first problem found while reading this sample, if any.
    pub defect: Option<Defect>,
}

/// Per-member limits readers enforce.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub max_member_bytes: u64,
}

/// Where readers hand samples. The pipeline implements it over a bounded channel, so
/// `accept` waits when downstream is busy (backpressure).
pub trait SampleSink: Send {
    /// Hands on one sample; `false` means downstream is gone and reading should stop.
    fn accept(&mut self, sample: Sample) -> impl Future<Output = bool> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("cannot open shard: {0}")]
    Open(#[from] object_store::Error),
    #[error("not a readable Parquet shard: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("{0}")]
    Layout(String),
    #[error("shard stream broke after {samples} sample(s): {source}")]
    Read { samples: u64, source: std::io::Error },
}

impl ShardError {
    /// Whether reading the shard again may succeed (a broken connection), as opposed to
    /// a shard that is wrong in itself (its layout).
    pub fn is_transient(&self) -> bool {
        !matches!(self, ShardError::Layout(_))
    }
}

/// A shard to read: where it is, and how many leading samples to skip because an
/// earlier attempt already handed them on.
#[derive(Debug, Clone)]
pub struct ShardInput {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    pub size: u64,
    /// The objects of a grouped shard (folder input); empty otherwise.
    pub members: Arc<Vec<crate::storage::Member>>,
    pub skip: u64,
}

/// Reads one shard of `format` into `sink`; returns the samples found (skipped ones
/// included).
pub async fn read_shard<S: SampleSink>(
    format: &crate::config::InputConfig,
    input: &ShardInput,
    limits: ReadLimits,
    sink: &mut S,
) -> Result<u64, ShardError> {
    match format.format {
        crate::config::InputFormat::Webdataset => webdataset::read_shard(input, limits, sink).await,
        crate::config::InputFormat::Parquet => parquet::read_shard(input, &format.parquet, limits, sink).await,
        crate::config::InputFormat::Folder => folder::read_shard(input, limits, sink).await,
    }
}
