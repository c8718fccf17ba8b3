//! Clean reference images a method needs before its first batch (EATA's Fisher
//! information): the first N decodable images at a URL, read as `[input]` reads, decoded
//! and preprocessed to the classifier view.
//!
//! Hazard: the images are held in memory as float views (N x C x crop x crop x 4
//! bytes: 2,000 ImageNet crops are 1.2 GB); `fisher_samples` bounds it.

use crate::image::{DecodeLimits, Expansion, Views};
use crate::sample::Sample;
use crate::shards::{self, InputConfig, ReadLimits, SampleReceiver, ShardError, ShardInput};
use crate::storage::{self, StorageError, StoreOptions};

/// Why the clean images could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CleanImagesError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{url}: {source}")]
    Shard { url: String, source: ShardError },
    #[error("{url}: no decodable image ({skipped} sample(s) without a usable image)")]
    Empty { url: String, skipped: usize },
    #[error("decoding the clean images failed: {0}")]
    Decode(String),
}

/// Samples up to a count; then asks the reader to stop.
struct Take {
    want: usize,
    samples: Vec<Sample>,
}

impl SampleReceiver for Take {
    async fn accept(&mut self, sample: Sample) -> bool {
        self.samples.push(sample);
        self.samples.len() < self.want
    }
}

/// The images of the first `count` samples at `url`, in shard order, as classifier
/// views, decoded on a blocking thread (not the async I/O threads). A sample that does
/// not decode is left out and counted in a warning, not fatal.
pub async fn read(
    url: &str,
    count: usize,
    input: &InputConfig,
    views: &Views,
    (read, decode): (ReadLimits, DecodeLimits),
    options: &StoreOptions,
) -> Result<Vec<Vec<f32>>, CleanImagesError> {
    let shown = storage::redact_url(url);
    let (location, listed) = storage::list_shards(url, input.format.shard_extension(), options).await?;
    let mut take = Take {
        want: count,
        samples: Vec::new(),
    };
    for shard in listed {
        if take.samples.len() >= count {
            break;
        }
        let source = ShardInput {
            store: location.store.clone(),
            path: shard.path.clone(),
            size: shard.size,
            members: shard.members.clone(),
            skip: 0,
        };
        shards::read_shard(input, &source, read, &mut take)
            .await
            .map_err(|source| CleanImagesError::Shard {
                url: shown.clone(),
                source,
            })?;
    }
    let samples = take.samples.len();
    let views = Views {
        diffusion: None,
        ..views.clone()
    };
    let images: Vec<Vec<f32>> = tokio::task::spawn_blocking(move || {
        take.samples
            .into_iter()
            .flat_map(|sample| crate::image::prepare(sample, &views, decode, false, &Expansion::none()))
            .filter_map(|prepared| prepared.pixels)
            .collect()
    })
    .await
    .map_err(|e| CleanImagesError::Decode(e.to_string()))?;
    let skipped = samples - images.len();
    if images.is_empty() {
        return Err(CleanImagesError::Empty { url: shown, skipped });
    }
    if images.len() < count {
        tracing::warn!(
            "{shown}: {} clean image(s) of the {count} asked for ({samples} sample(s) read, {skipped} without a usable image)",
            images.len()
        );
    }
    Ok(images)
}
