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

use object_store::path::Path;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

pub use folder::{FolderInputConfig, FolderLabels};
pub use parquet::ParquetInputConfig;

use crate::sample::Sample;
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Object-store URL or local path; may hold brace ranges and `*` globs.
    pub url: String,
    #[serde(default)]
    pub format: InputFormat,
    /// When true, a sample without a label gets status `missing_label` (it is still predicted).
    #[serde(default)]
    pub require_label: bool,
    #[serde(default)]
    pub parquet: ParquetInputConfig,
    #[serde(default)]
    pub folder: FolderInputConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// Tar shards, samples grouped by key (WebDataset).
    #[default]
    Webdataset,
    /// Parquet shards, one sample per row (Hugging Face datasets layout).
    Parquet,
    /// Image files below a prefix, grouped into shards of `folder.shard_size`.
    Folder,
}

impl InputFormat {
    /// File extension of this format's shards, used when the URL names a folder; empty
    /// for `folder`, which lists every object and keeps the images.
    pub fn shard_extension(self) -> &'static str {
        match self {
            InputFormat::Webdataset => ".tar",
            InputFormat::Parquet => ".parquet",
            InputFormat::Folder => "",
        }
    }
}

/// Per-member limits readers enforce.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub max_member_bytes: u64,
}

/// Where readers hand samples. The pipeline implements it over a bounded channel, so
/// `accept` waits when downstream is busy (backpressure).
pub trait SampleReceiver: Send {
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
pub async fn read_shard<S: SampleReceiver>(
    format: &InputConfig,
    input: &ShardInput,
    limits: ReadLimits,
    sink: &mut S,
) -> Result<u64, ShardError> {
    match format.format {
        InputFormat::Webdataset => webdataset::read_shard(input, limits, sink).await,
        InputFormat::Parquet => parquet::read_shard(input, &format.parquet, limits, sink).await,
        InputFormat::Folder => folder::read_shard(input, limits, sink).await,
    }
}
