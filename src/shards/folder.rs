//! Folder input: image objects below a prefix, grouped into shards of `shard_size` in
//! sorted path order. With `labels = "parent"` (ImageFolder), the class of `cat/1.jpg`
//! is the index of `cat` among the sorted parent-folder names.
//!
//! Hazard: shard membership follows the listing. Adding or removing images while a job
//! (or its resumption) runs moves images between shards; keep the folder fixed for a job.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use object_store::ObjectStoreExt;

use super::{ReadLimits, SampleReceiver, ShardError, ShardInput};
use crate::sample::{Defect, DenseMembers, Sample, Status};
use crate::storage::{Member, ShardRef};
use serde::{Deserialize, Serialize};
/// Image files below a prefix (ImageFolder layout or flat).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FolderInputConfig {
    pub labels: FolderLabels,
    /// Images per shard (the unit of commit and resume), in sorted path order.
    pub shard_size: usize,
}

impl Default for FolderInputConfig {
    fn default() -> Self {
        FolderInputConfig {
            labels: FolderLabels::Parent,
            shard_size: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FolderLabels {
    /// ImageFolder: the class is the parent folder's name; classes are numbered in sorted
    /// order of the names, as torchvision does.
    Parent,
    /// No labels.
    None,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// Objects fetched concurrently within one folder shard.
const FETCHES_IN_FLIGHT: usize = 8;

/// Turns a listing (one entry per object) into shards of images.
pub fn group(listed: Vec<ShardRef>, cfg: &FolderInputConfig) -> Vec<ShardRef> {
    let images: Vec<ShardRef> = listed
        .into_iter()
        .filter(|s| {
            s.id.rsplit_once('.')
                .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
        })
        .collect();
    let parent = |id: &str| {
        id.rsplit_once('/')
            .map(|(dir, _)| dir.rsplit('/').next().unwrap_or(dir).to_string())
    };
    let classes: Vec<String> = match cfg.labels {
        FolderLabels::Parent => images
            .iter()
            .filter_map(|s| parent(&s.id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        FolderLabels::None => Vec::new(),
    };
    images
        .chunks(cfg.shard_size)
        .enumerate()
        .map(|(i, chunk)| {
            let members: Vec<Member> = chunk
                .iter()
                .map(|s| Member {
                    path: s.path.clone(),
                    size: s.size,
                    key: s.id.rsplit_once('.').map_or(s.id.as_str(), |(k, _)| k).to_string(),
                    label: parent(&s.id)
                        .and_then(|p| classes.iter().position(|c| *c == p))
                        .map(|i| i as i64),
                })
                .collect();
            ShardRef {
                id: format!("part-{i:06}"),
                path: chunk[0].path.clone(),
                size: chunk.iter().map(|s| s.size).sum(),
                members: Arc::new(members),
            }
        })
        .collect()
}

/// Fetches the shard's images (a few at a time, in order) into `sink`.
pub async fn read_shard<S: SampleReceiver>(
    input: &ShardInput,
    limits: ReadLimits,
    sink: &mut S,
) -> Result<u64, ShardError> {
    let members: Vec<Member> = input.members.iter().skip(input.skip as usize).cloned().collect();
    let store = input.store.clone();
    let mut fetched = futures::stream::iter(members)
        .map(move |m| {
            let store = store.clone();
            async move {
                if m.size > limits.max_member_bytes {
                    let defect = Defect::new(
                        Status::TooLarge,
                        format!(
                            "{} is {} bytes, over limits.max_member_bytes ({})",
                            m.path, m.size, limits.max_member_bytes
                        ),
                    );
                    return Ok::<_, object_store::Error>((m, None, Some(defect)));
                }
                let bytes = store.get(&m.path).await?.bytes().await?;
                Ok((m, Some(bytes), None))
            }
        })
        .buffered(FETCHES_IN_FLIGHT);
    let mut seen = input.skip;
    while let Some(item) = fetched.next().await {
        let (m, image, defect) = item.map_err(|e| ShardError::Read {
            samples: seen,
            source: std::io::Error::other(e),
        })?;
        let sample = Sample {
            key: m.key.clone(),
            image,
            label: m.label,
            dense: DenseMembers::default(),
            defect,
        };
        if !sink.accept(sample).await {
            return Ok(seen);
        }
        seen += 1;
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::path::Path;

    fn listed(id: &str) -> ShardRef {
        ShardRef {
            id: id.into(),
            path: Path::from(id),
            size: 10,
            members: Arc::default(),
        }
    }

    #[test]
    fn groups_images_and_numbers_classes_like_image_folder() {
        let ids = ["b/2.png", "a/1.jpg", "a/2.JPEG", "notes.txt", "b/1.webp", "c/x.png"];
        let mut all: Vec<ShardRef> = ids.iter().map(|i| listed(i)).collect();
        all.sort_by(|x, y| x.id.cmp(&y.id));
        let cfg = FolderInputConfig {
            labels: FolderLabels::Parent,
            shard_size: 2,
        };
        let shards = group(all, &cfg);
        assert_eq!(shards.len(), 3);
        let members: Vec<(String, Option<i64>)> = shards
            .iter()
            .flat_map(|s| s.members.iter().map(|m| (m.key.clone(), m.label)))
            .collect();
        assert_eq!(
            members,
            vec![
                ("a/1".into(), Some(0)),
                ("a/2".into(), Some(0)),
                ("b/1".into(), Some(1)),
                ("b/2".into(), Some(1)),
                ("c/x".into(), Some(2)),
            ]
        );
        assert_eq!(shards[0].id, "part-000000");
    }
}
