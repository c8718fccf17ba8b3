//! WebDataset tar shards, streamed: at most one member is held in memory at a time
//! (bounded by `ReadLimits::max_member_bytes`), besides the sample being assembled.
//!
//! Grouping follows WebDataset: a member `dir/name.ext.more` has key `dir/name` and
//! extension `ext.more` (the key ends at the first dot of the file name); consecutive
//! members with the same key form one sample. Members without a dot, directories and
//! other non-file entries are skipped, as WebDataset does.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::io::StreamReader;

use super::{ReadLimits, SampleReceiver, ShardError, ShardInput};
use crate::sample::{Defect, DenseMembers, Sample, Status};

/// Extensions that carry the image, in order of preference within one sample.
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// Extensions that carry the label, in order of preference.
const LABEL_EXTENSIONS: [&str; 3] = ["cls", "json", "txt"];

/// Streams one shard from its store into `sink`; returns the samples found (skipped ones
/// included).
pub async fn read_shard<S: SampleReceiver>(
    input: &ShardInput,
    limits: ReadLimits,
    sink: &mut S,
) -> Result<u64, ShardError> {
    let body = input.store.get(&input.path).await?.into_stream();
    let reader = StreamReader::new(body.map_err(std::io::Error::other));
    read_tar(reader, input.skip, limits, sink).await
}

/// Reads a tar stream; the first `skip` samples are parsed but not handed on.
pub async fn read_tar<R, S>(reader: R, skip: u64, limits: ReadLimits, sink: &mut S) -> Result<u64, ShardError>
where
    R: AsyncRead + Unpin + Send,
    S: SampleReceiver,
{
    let mut archive = tokio_tar::Archive::new(reader);
    let mut seen = 0u64;
    let broke = |seen, source| ShardError::Read { samples: seen, source };
    let mut entries = archive.entries().map_err(|e| broke(0, e))?;
    let mut current: Option<SampleBuilder> = None;

    while let Some(entry) = entries.next().await {
        let mut entry = entry.map_err(|e| broke(seen, e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path_bytes().map_err(|e| broke(seen, e))?;
        let Some((key, ext)) = split_key(&String::from_utf8_lossy(&path)) else {
            continue;
        };
        if current.as_ref().is_some_and(|c| c.key != key) {
            let done = current.take().expect("checked above");
            if seen >= skip && !sink.accept(done.finish()).await {
                return Ok(seen);
            }
            seen += 1;
        }
        let builder = current.get_or_insert_with(|| SampleBuilder::new(key));
        let size = entry.effective_size();
        if !builder.wants(&ext) {
            continue; // unread data is skipped when the next entry is requested
        }
        if size > limits.max_member_bytes {
            // An oversized dense label costs the label, not the prediction.
            let status = match dense_member(&ext) {
                Some(_) => Status::BadLabel,
                None => Status::TooLarge,
            };
            builder.note(Defect::new(
                status,
                format!(
                    "member .{ext} is {size} bytes, over limits.max_member_bytes ({})",
                    limits.max_member_bytes
                ),
            ));
            continue;
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).await.map_err(|e| broke(seen, e))?;
        builder.add(&ext, Bytes::from(data));
    }
    if let Some(done) = current {
        if seen >= skip && !sink.accept(done.finish()).await {
            return Ok(seen);
        }
        seen += 1;
    }
    Ok(seen)
}

/// WebDataset's `base_plus_ext`: the key ends at the first dot of the file name.
fn split_key(path: &str) -> Option<(String, String)> {
    let name_start = path.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dot = path[name_start..].find('.')? + name_start;
    if dot == name_start {
        return None; // hidden files (".foo") have no key
    }
    Some((path[..dot].to_string(), path[dot + 1..].to_string()))
}

/// The last dot-separated part of an extension, lowercased: `input.JPG` -> `jpg`.
fn kind_of(ext: &str) -> String {
    ext.rsplit('.').next().unwrap_or(ext).to_ascii_lowercase()
}

/// Which dense label a member holds (`seg.png`, `depth.png`, any case): these are
/// labels, never the sample's image, though they end in `png`.
fn dense_member(ext: &str) -> Option<DenseLabelMember> {
    match ext.to_ascii_lowercase().as_str() {
        "seg.png" => Some(DenseLabelMember::Seg),
        "depth.png" => Some(DenseLabelMember::Depth),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DenseLabelMember {
    Seg,
    Depth,
}

/// Collects the members of one sample and picks its image and label.
struct SampleBuilder {
    key: String,
    image: Option<(usize, Bytes)>,
    label: Option<(usize, String, Bytes)>,
    dense: DenseMembers,
    members: Vec<String>,
    defect: Option<Defect>,
}

impl SampleBuilder {
    fn new(key: String) -> Self {
        SampleBuilder {
            key,
            image: None,
            label: None,
            dense: DenseMembers::default(),
            members: Vec::new(),
            defect: None,
        }
    }

    /// Whether a member with this extension is worth reading; records it either way.
    fn wants(&mut self, ext: &str) -> bool {
        self.members.push(ext.to_string());
        if let Some(member) = dense_member(ext) {
            return match member {
                DenseLabelMember::Seg => self.dense.seg.is_none(),
                DenseLabelMember::Depth => self.dense.depth.is_none(),
            };
        }
        let kind = kind_of(ext);
        let better = |rank: Option<usize>, best: Option<usize>| match (rank, best) {
            (Some(r), Some(b)) => r < b,
            (Some(_), None) => true,
            _ => false,
        };
        let image_rank = IMAGE_EXTENSIONS.iter().position(|e| *e == kind);
        let label_rank = LABEL_EXTENSIONS.iter().position(|e| *e == kind);
        // The first image member in tar order wins: "first found".
        (image_rank.is_some() && self.image.is_none() && !self.image_too_large())
            || better(label_rank, self.label.as_ref().map(|l| l.0))
    }

    fn image_too_large(&self) -> bool {
        self.defect.as_ref().is_some_and(|d| d.status == Status::TooLarge)
    }

    /// Keeps the first problem, except that an image problem (no prediction) replaces
    /// a label problem (predicted anyway): the status says the worst that happened.
    fn note(&mut self, defect: Defect) {
        match &self.defect {
            Some(d) if d.status.is_predicted() && !defect.status.is_predicted() => self.defect = Some(defect),
            Some(_) => {}
            None => self.defect = Some(defect),
        }
    }

    fn add(&mut self, ext: &str, data: Bytes) {
        if let Some(member) = dense_member(ext) {
            let slot = match member {
                DenseLabelMember::Seg => &mut self.dense.seg,
                DenseLabelMember::Depth => &mut self.dense.depth,
            };
            slot.get_or_insert(data);
            return;
        }
        let kind = kind_of(ext);
        if let Some(rank) = IMAGE_EXTENSIONS.iter().position(|e| *e == kind) {
            if self.image.is_none() {
                self.image = Some((rank, data));
            }
        } else if let Some(rank) = LABEL_EXTENSIONS.iter().position(|e| *e == kind) {
            self.label = Some((rank, ext.to_string(), data));
        }
    }

    fn finish(mut self) -> Sample {
        let label = match self.label.take() {
            None => None,
            Some((_, ext, data)) => match parse_label(&kind_of(&ext), &data) {
                Ok(label) => label,
                Err(message) => {
                    self.note(Defect::new(Status::BadLabel, format!("member .{ext}: {message}")));
                    None
                }
            },
        };
        if self.image.is_none() && self.defect.is_none() {
            self.note(Defect::new(
                Status::NoImage,
                format!(
                    "no jpg/jpeg/png/webp member (members: {})",
                    if self.members.is_empty() {
                        "none".to_string()
                    } else {
                        self.members.join(", ")
                    }
                ),
            ));
        }
        // A label problem never hides an image problem: the image status wins.
        Sample {
            key: self.key,
            image: self.image.map(|(_, d)| d),
            label,
            dense: self.dense,
            defect: self.defect,
        }
    }
}

/// Reads a class index. `.cls` must hold an integer; `.json` an integer or an object
/// with `label`, `cls`, `class` or `target`; `.txt` is a label only when it is an
/// integer (otherwise it is a caption, and the sample simply has no label).
fn parse_label(kind: &str, data: &[u8]) -> Result<Option<i64>, String> {
    let text = std::str::from_utf8(data)
        .map_err(|_| "not UTF-8 text".to_string())?
        .trim();
    match kind {
        "cls" => text
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("`{}` is not a class index", truncate(text))),
        "json" => {
            let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
            let field = match &value {
                serde_json::Value::Object(map) => ["label", "cls", "class", "target"].iter().find_map(|k| map.get(*k)),
                other => Some(other),
            };
            match field {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| format!("label `{}` is not an integer", truncate(&v.to_string()))),
            }
        }
        _ => Ok(text.parse::<i64>().ok()),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Vec<Sample>);
    impl SampleReceiver for Collect {
        async fn accept(&mut self, sample: Sample) -> bool {
            self.0.push(sample);
            true
        }
    }

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    const LIMITS: ReadLimits = ReadLimits { max_member_bytes: 1000 };

    async fn read(bytes: Vec<u8>, skip: u64) -> (Result<u64, ShardError>, Vec<Sample>) {
        let mut sink = Collect(Vec::new());
        let r = read_tar(std::io::Cursor::new(bytes), skip, LIMITS, &mut sink).await;
        (r, sink.0)
    }

    #[test]
    fn keys_follow_webdataset_rules() {
        assert_eq!(split_key("a/b.c.jpg"), Some(("a/b".into(), "c.jpg".into())));
        assert_eq!(split_key("x.y/z.png"), Some(("x.y/z".into(), "png".into())));
        assert_eq!(split_key("noext"), None);
        assert_eq!(split_key("dir/.hidden"), None);
    }

    #[tokio::test]
    async fn groups_members_and_reads_labels() {
        let tar = tar_of(&[
            ("s/a.jpg", b"JPEG"),
            ("s/a.cls", b" 3\n"),
            ("s/b.png", b"PNG"),
            ("s/b.json", br#"{"label": 7, "w": 1}"#),
            ("s/c.webp", b"WEBP"),
            ("s/c.txt", b"a caption"),
            ("s/d.txt", b"5"),
            ("s/d.jpeg", b"J2"),
            ("s/d.png", b"P2"),
        ]);
        let (r, samples) = read(tar, 0).await;
        assert_eq!(r.unwrap(), 4);
        let got: Vec<_> = samples
            .iter()
            .map(|s| (s.key.as_str(), s.label, s.image.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("s/a", Some(3), Some(Bytes::from_static(b"JPEG"))),
                ("s/b", Some(7), Some(Bytes::from_static(b"PNG"))),
                ("s/c", None, Some(Bytes::from_static(b"WEBP"))),
                ("s/d", Some(5), Some(Bytes::from_static(b"J2"))),
            ]
        );
        assert!(samples.iter().all(|s| s.defect.is_none()));
    }

    #[tokio::test]
    async fn defects_become_statuses_not_drops() {
        let big = vec![0u8; 2000];
        let tar = tar_of(&[
            ("a.cls", b"1"),
            ("b.jpg", &big),
            ("b.cls", b"2"),
            ("c.jpg", b"J"),
            ("c.cls", b"three"),
        ]);
        let (r, samples) = read(tar, 0).await;
        assert_eq!(r.unwrap(), 3);
        let statuses: Vec<_> = samples.iter().map(|s| s.defect.as_ref().map(|d| d.status)).collect();
        assert_eq!(
            statuses,
            vec![Some(Status::NoImage), Some(Status::TooLarge), Some(Status::BadLabel)]
        );
        assert_eq!(samples[1].label, Some(2), "the label survives an oversized image");
        assert!(samples[1].image.is_none());
    }

    #[tokio::test]
    async fn dense_label_members_are_labels_not_images() {
        let big = vec![0u8; 2000];
        let tar = tar_of(&[
            // The label member comes first: it must still not be taken as the image.
            ("a.seg.png", b"SEG"),
            ("a.png", b"IMG"),
            ("b.depth.PNG", b"DEPTH"),
            ("b.jpg", b"J"),
            ("c.seg.png", &big),
            ("c.png", b"C"),
            ("d.seg.png", &big),
            ("d.png", &big),
        ]);
        let (r, samples) = read(tar, 0).await;
        assert_eq!(r.unwrap(), 4);
        assert_eq!(samples[0].image, Some(Bytes::from_static(b"IMG")));
        assert_eq!(samples[0].dense.seg, Some(Bytes::from_static(b"SEG")));
        assert_eq!(samples[1].image, Some(Bytes::from_static(b"J")));
        assert_eq!(samples[1].dense.depth, Some(Bytes::from_static(b"DEPTH")));
        assert!(samples[0].defect.is_none() && samples[1].defect.is_none());
        // An oversized label costs the label; an oversized image still outranks it.
        let status = |i: usize| samples[i].defect.as_ref().map(|d| d.status);
        assert_eq!(status(2), Some(Status::BadLabel));
        assert_eq!(samples[2].image, Some(Bytes::from_static(b"C")));
        assert_eq!(status(3), Some(Status::TooLarge));
    }

    #[tokio::test]
    async fn skip_resumes_after_handed_on_samples() {
        let tar = tar_of(&[("a.jpg", b"1"), ("b.jpg", b"2"), ("c.jpg", b"3")]);
        let (r, samples) = read(tar, 2).await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].key, "c");
    }

    #[tokio::test]
    async fn truncated_tar_is_an_error() {
        let payload = vec![7u8; 900];
        let mut tar = tar_of(&[("a.jpg", b"1"), ("b.jpg", &payload), ("c.jpg", b"3")]);
        tar.truncate(512 * 3 + 300); // in the middle of b.jpg's data
        let (r, samples) = read(tar, 0).await;
        assert!(matches!(r, Err(ShardError::Read { samples: 1, .. })), "{r:?}");
        assert_eq!(samples.len(), 1, "samples before the break were handed on");
    }
}
