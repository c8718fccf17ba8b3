//! Label spaces: which of the classifier's classes a run may predict (`model.class_subset`),
//! and how predicted classes map onto a dataset's classes (`model.label_map`).
//!
//! A restricted classifier is, to every method, a classifier with fewer classes: its
//! logits are the kept columns only ([`Classifier::restrict`]), so the softmax, the
//! condition mixture, TENT's entropy, DUSA's candidates and the Diffusion Classifier's
//! candidates all range over the kept classes; the class embeddings are restricted the
//! same way ([`Diffusion::restrict`]). Methods see column indices `0..kept`, the kept
//! model classes in ascending order; the `Restricted` adapter of the methods module maps
//! every class index of their rows through [`LabelSpace::output_class`] (and the top-k
//! through [`LabelSpace::output_topk`]) in one place.
//!
//! Output classes are the dataset's, never the model's:
//! - with a subset, the position of the predicted class in the subset list. The list
//!   must be ascending (an unsorted one is refused, never silently reordered), so
//!   position `i` is the `i`-th smallest kept model class. For ImageNet-R and ImageNet-A
//!   that is the benchmarks' own numbering: their 200 wnid folders, sorted by name as
//!   ImageFolder (and the `folder` input) numbers them, are in ascending ImageNet-1k
//!   index order, because ImageNet-1k's indices are its sorted wnids.
//! - with a label map, the dataset class of the predicted model class (so
//!   `pred_* == label` is the protocol's "the prediction falls in the label's class
//!   set"). A map that puts one model class into two dataset classes is refused: that
//!   protocol would then count one prediction right for two labels, which a single
//!   predicted index cannot express.
//!
//! A negative class (-1: no image-level class, as a dense model's step predictions)
//! passes through unmapped.
//!
//! [`Classifier::restrict`]: super::Classifier::restrict
//! [`Diffusion::restrict`]: super::Diffusion::restrict

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::sample::Task;

/// `model.class_subset`: a shipped list by name, a file of indices, or indices inline.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ClassSubset {
    /// `"imagenet-r"`, `"imagenet-a"`, or the path of a text file with one class index
    /// per line (`#` starts a comment).
    Named(String),
    /// `[i, j, ...]`.
    Indices(Vec<i64>),
}

/// Shipped lists, compiled in (their sources are in their comment lines).
const SHIPPED_SUBSETS: &[(&str, &str)] = &[
    ("imagenet-r", include_str!("../../configs/label_spaces/imagenet-r.txt")),
    ("imagenet-a", include_str!("../../configs/label_spaces/imagenet-a.txt")),
];
const SHIPPED_MAPS: &[(&str, &str)] = &[("objectnet", include_str!("../../configs/label_spaces/objectnet.txt"))];

#[derive(Debug, thiserror::Error)]
pub enum LabelSpaceError {
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: {origin}, line {line}: {text:?} is not a class index")]
    Parse {
        key: &'static str,
        origin: String,
        line: usize,
        text: String,
    },
    #[error("{key}: {origin}: class {index} is out of range (the classifier has {num_classes} classes, 0 to {})", num_classes - 1)]
    OutOfRange {
        key: &'static str,
        origin: String,
        index: i64,
        num_classes: usize,
    },
    #[error("{key}: {origin}: class {index} is listed twice")]
    Duplicate {
        key: &'static str,
        origin: String,
        index: i64,
    },
    #[error("model.class_subset: {origin}: class {after} is listed after class {before}; list the classes in ascending order (a prediction is written as its position in the list; for another order, use model.label_map with one class per line)")]
    Unsorted { origin: String, before: i64, after: i64 },
    #[error("{key}: a depth bundle has no classes to restrict or map")]
    NoClasses { key: &'static str },
    #[error("{key}: {origin}: lists no class")]
    Empty { key: &'static str, origin: String },
    #[error("model.label_map: {origin}: model class {index} is in dataset classes {first} and {second}; each model class may count for one dataset class only")]
    Ambiguous {
        origin: String,
        index: i64,
        first: usize,
        second: usize,
    },
}

/// A resolved label space for one classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSpace {
    /// The model classes kept, ascending: logit column `i` of the restricted classifier
    /// is model class `kept[i]`.
    kept: Vec<i64>,
    /// With a label map, the dataset class of each kept column.
    dataset: Option<Vec<i64>>,
    /// For logs: `imagenet-r: 200 of 1000 classes`.
    pub description: String,
}

impl LabelSpace {
    /// Resolves the config's subset or map against a classifier with `num_classes`
    /// classes; `None` when neither is set (the full label space). The config check
    /// guarantees at most one of the two is set.
    pub fn resolve(
        subset: Option<&ClassSubset>,
        map: Option<&str>,
        num_classes: usize,
        task: Task,
    ) -> Result<Option<LabelSpace>, LabelSpaceError> {
        if task == Task::Depth && (map.is_some() || subset.is_some()) {
            let key = if map.is_some() {
                "model.label_map"
            } else {
                "model.class_subset"
            };
            return Err(LabelSpaceError::NoClasses { key });
        }
        if let Some(map) = map {
            return Self::from_map(map, num_classes).map(Some);
        }
        let Some(subset) = subset else { return Ok(None) };
        const KEY: &str = "model.class_subset";
        let (origin, indices) = match subset {
            ClassSubset::Indices(list) => ("the inline list".to_string(), list.clone()),
            ClassSubset::Named(name) => {
                let (origin, text) = shipped_or_file(KEY, name, SHIPPED_SUBSETS)?;
                let mut indices = Vec::new();
                for (line, row) in rows(&text) {
                    indices.push(parse_index(KEY, &origin, line, row)?);
                }
                (origin, indices)
            }
        };
        let mut kept = indices.clone();
        kept.sort_unstable();
        if let Some(w) = kept.windows(2).find(|w| w[0] == w[1]) {
            return Err(LabelSpaceError::Duplicate {
                key: KEY,
                origin,
                index: w[0],
            });
        }
        check_range(KEY, &origin, &kept, num_classes)?;
        // Refused, not sorted: the written class is the position in the list as given.
        if let Some(w) = indices.windows(2).find(|w| w[0] > w[1]) {
            return Err(LabelSpaceError::Unsorted {
                origin,
                before: w[0],
                after: w[1],
            });
        }
        Ok(Some(LabelSpace {
            description: format!("{origin}: {} of {num_classes} classes", kept.len()),
            kept,
            dataset: None,
        }))
    }

    fn from_map(name: &str, num_classes: usize) -> Result<LabelSpace, LabelSpaceError> {
        const KEY: &str = "model.label_map";
        let (origin, text) = shipped_or_file(KEY, name, SHIPPED_MAPS)?;
        let mut owner: BTreeMap<i64, usize> = BTreeMap::new();
        for (class, (line, row)) in rows(&text).enumerate() {
            let members: Vec<&str> = row.split_whitespace().collect();
            if members.is_empty() {
                return Err(LabelSpaceError::Parse {
                    key: KEY,
                    origin,
                    line,
                    text: row.to_string(),
                });
            }
            for m in members {
                let index = parse_index(KEY, &origin, line, m)?;
                if let Some(first) = owner.insert(index, class) {
                    return Err(if first == class {
                        LabelSpaceError::Duplicate {
                            key: KEY,
                            origin,
                            index,
                        }
                    } else {
                        LabelSpaceError::Ambiguous {
                            origin,
                            index,
                            first,
                            second: class,
                        }
                    });
                }
            }
        }
        let kept: Vec<i64> = owner.keys().copied().collect();
        check_range(KEY, &origin, &kept, num_classes)?;
        let classes = owner.values().max().map_or(0, |m| m + 1);
        Ok(LabelSpace {
            description: format!(
                "{origin}: {} of {num_classes} model classes onto {classes} dataset classes",
                kept.len()
            ),
            dataset: Some(owner.values().map(|&c| c as i64).collect()),
            kept,
        })
    }

    /// How many classes the restricted classifier has.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The kept model classes as an int64 index tensor on `device`, for `index_select`.
    pub fn kept_index(&self, device: Device) -> Tensor {
        Tensor::from_slice(&self.kept).to_device(device)
    }

    /// The class written to the output for column `column` of the restricted logits:
    /// its position in the subset (the column itself: the columns are the kept classes
    /// in ascending order, as the list is), or the dataset class of its model class
    /// (label map). A negative class (-1, no image-level class) is returned unchanged.
    ///
    /// Panics if `column` is at or past [`LabelSpace::len`]; a method that reports such a
    /// column has broken its contract.
    pub fn output_class(&self, column: i64) -> i64 {
        let Ok(c) = usize::try_from(column) else {
            return column;
        };
        assert!(
            c < self.kept.len(),
            "class column {column} of a classifier restricted to {} classes",
            self.kept.len()
        );
        match &self.dataset {
            Some(d) => d[c],
            None => column,
        }
    }

    /// The original model class of column `column` of the restricted logits (for logs
    /// and checks; never written in place of [`LabelSpace::output_class`]).
    pub fn model_class(&self, column: usize) -> i64 {
        self.kept[column]
    }

    /// The top-k as written: `classes` (restricted columns, best first) and their
    /// `probs` mapped through [`LabelSpace::output_class`], keeping the first (most
    /// probable) entry of each output class. With a subset nothing repeats and this is a
    /// plain mapping; with a label map each dataset class appears once, with the
    /// probability of its best model class among the top-k (as `conf_after` is the
    /// probability of the predicted model class), so the list can be shorter than k.
    pub fn output_topk(&self, classes: &[i64], probs: &[f32]) -> (Vec<i64>, Vec<f32>) {
        let mut out_classes = Vec::with_capacity(classes.len());
        let mut out_probs = Vec::with_capacity(probs.len());
        for (i, &column) in classes.iter().enumerate() {
            let class = self.output_class(column);
            if out_classes.contains(&class) {
                continue;
            }
            out_classes.push(class);
            if let Some(&p) = probs.get(i) {
                out_probs.push(p);
            }
        }
        (out_classes, out_probs)
    }
}

/// `(1-based line number, content)` of every line with content once comments (`#` to
/// the end of the line) and blanks are stripped.
fn rows(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let content = l.split('#').next().unwrap_or("").trim();
        (!content.is_empty()).then_some((i + 1, content))
    })
}

fn parse_index(key: &'static str, origin: &str, line: usize, text: &str) -> Result<i64, LabelSpaceError> {
    text.parse::<i64>().map_err(|_| LabelSpaceError::Parse {
        key,
        origin: origin.to_string(),
        line,
        text: text.to_string(),
    })
}

fn check_range(key: &'static str, origin: &str, kept: &[i64], num_classes: usize) -> Result<(), LabelSpaceError> {
    if kept.is_empty() {
        return Err(LabelSpaceError::Empty {
            key,
            origin: origin.to_string(),
        });
    }
    match kept.iter().find(|&&i| i < 0 || i >= num_classes as i64) {
        Some(&index) => Err(LabelSpaceError::OutOfRange {
            key,
            origin: origin.to_string(),
            index,
            num_classes,
        }),
        None => Ok(()),
    }
}

/// The text of a shipped list by name, or of the local file `name` (relative to the
/// working directory).
fn shipped_or_file(
    key: &'static str,
    name: &str,
    shipped: &[(&str, &'static str)],
) -> Result<(String, String), LabelSpaceError> {
    if let Some((_, text)) = shipped.iter().find(|(n, _)| *n == name) {
        return Ok((name.to_string(), text.to_string()));
    }
    let path = PathBuf::from(name);
    let text = std::fs::read_to_string(&path).map_err(|source| LabelSpaceError::Read {
        key,
        path: path.clone(),
        source,
    })?;
    Ok((path.display().to_string(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subset(s: ClassSubset, n: usize) -> Result<Option<LabelSpace>, LabelSpaceError> {
        LabelSpace::resolve(Some(&s), None, n, Task::Classification)
    }

    /// The subset that a list file holding `text` gives over `n` classes.
    fn subset_file(text: &str, n: usize) -> Result<Option<LabelSpace>, LabelSpaceError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.txt");
        std::fs::write(&path, text).unwrap();
        subset(ClassSubset::Named(path.display().to_string()), n)
    }

    /// The label map that a map file holding `text` gives over 10 classes.
    fn map_file(text: &str, task: Task) -> Result<Option<LabelSpace>, LabelSpaceError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.txt");
        std::fs::write(&path, text).unwrap();
        LabelSpace::resolve(None, Some(path.to_str().unwrap()), 10, task)
    }

    #[test]
    fn no_subset_and_no_map_is_the_full_space() {
        assert_eq!(LabelSpace::resolve(None, None, 10, Task::Classification).unwrap(), None);
    }

    #[test]
    fn a_subset_writes_positions_in_its_list() {
        let s = subset(ClassSubset::Indices(vec![2, 5, 7]), 10).unwrap().unwrap();
        assert_eq!(s.len(), 3);
        // Column i is the i-th kept model class, written as its position i.
        assert_eq!((0..3).map(|c| s.model_class(c)).collect::<Vec<_>>(), [2, 5, 7]);
        assert_eq!((0..3).map(|c| s.output_class(c)).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(s.description, "the inline list: 3 of 10 classes");
        assert_eq!(
            s.output_topk(&[2, 0, 1], &[0.5, 0.3, 0.2]),
            (vec![2, 0, 1], vec![0.5, 0.3, 0.2])
        );
    }

    #[test]
    fn an_unsorted_subset_is_refused_not_reordered() {
        let e = subset(ClassSubset::Indices(vec![7, 2, 5]), 10).unwrap_err().to_string();
        assert!(
            e.starts_with("model.class_subset: the inline list: class 2 is listed after class 7; list the classes in ascending order"),
            "{e}"
        );
        let e = subset_file("1\n3\n9\n4\n", 10).unwrap_err().to_string();
        assert!(e.contains("class 4 is listed after class 9"), "{e}");
    }

    #[test]
    fn no_class_passes_through_unmapped() {
        let s = subset(ClassSubset::Indices(vec![2, 5, 7]), 10).unwrap().unwrap();
        assert_eq!(s.output_class(-1), -1);
        let m = map_file("4\n8 9\n", Task::Segmentation).unwrap().unwrap();
        assert_eq!(m.output_class(-1), -1);
        assert_eq!(m.output_topk(&[], &[]), (vec![], vec![]));
    }

    #[test]
    #[should_panic(expected = "class column 3 of a classifier restricted to 3 classes")]
    fn a_column_past_the_kept_classes_is_a_broken_contract() {
        let s = subset(ClassSubset::Indices(vec![2, 5, 7]), 10).unwrap().unwrap();
        s.output_class(3);
    }

    #[test]
    fn label_map_top_k_lists_each_dataset_class_once() {
        let m = map_file("0 2 4 6 8\n1 3 5 7 9\n", Task::Classification)
            .unwrap()
            .unwrap();
        // Model classes 4, 6, 3, 8, 1 (columns = model classes here): even, even, odd, ...
        assert_eq!(
            m.output_topk(&[4, 6, 3, 8, 1], &[0.4, 0.2, 0.15, 0.1, 0.05]),
            (vec![0, 1], vec![0.4, 0.15])
        );
        assert_eq!(m.output_topk(&[4, 6], &[0.6, 0.3]), (vec![0], vec![0.6]));
    }

    #[test]
    fn bad_subsets_name_the_problem() {
        let err = |s| subset(s, 10).unwrap_err().to_string();
        assert!(err(ClassSubset::Indices(vec![1, 10]))
            .contains("class 10 is out of range (the classifier has 10 classes, 0 to 9)"));
        assert!(err(ClassSubset::Indices(vec![-1])).contains("class -1 is out of range"));
        assert!(err(ClassSubset::Indices(vec![3, 1, 3])).contains("class 3 is listed twice"));
        assert!(err(ClassSubset::Indices(vec![])).contains("lists no class"));
        assert!(err(ClassSubset::Named("/nonexistent/list.txt".into()))
            .starts_with("model.class_subset: cannot read /nonexistent/list.txt"));
    }

    #[test]
    fn subset_file_with_comments_and_a_bad_line() {
        let s = subset_file("# five digits\n1\n3 # three\n\n5\n7\n9\n", 10)
            .unwrap()
            .unwrap();
        assert_eq!((0..5).map(|c| s.model_class(c)).collect::<Vec<_>>(), [1, 3, 5, 7, 9]);
        assert_eq!((0..5).map(|c| s.output_class(c)).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        let e = subset_file("1\nthree\n", 10).unwrap_err().to_string();
        assert!(e.ends_with("line 2: \"three\" is not a class index"), "{e}");
    }

    #[test]
    fn label_map_sends_each_model_class_to_its_dataset_class() {
        let m = map_file("# even, odd\n0 2 4 6 8 # even\n1 3 5 7 9 # odd\n", Task::Classification)
            .unwrap()
            .unwrap();
        assert_eq!(m.len(), 10);
        assert_eq!(
            (0..10).map(|c| m.output_class(c)).collect::<Vec<_>>(),
            [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
        );
        // A partial map keeps only the mapped classes.
        let m = map_file("4\n8 9\n", Task::Classification).unwrap().unwrap();
        assert_eq!((0..3).map(|c| m.output_class(c)).collect::<Vec<_>>(), [0, 1, 1]);
        let e = map_file("4 5\n5\n", Task::Classification).unwrap_err().to_string();
        assert!(e.contains("model class 5 is in dataset classes 0 and 1"), "{e}");
    }

    #[test]
    fn shipped_lists_resolve_against_imagenet_1k() {
        for (name, size, first) in [("imagenet-r", 200, [1, 2, 4, 6]), ("imagenet-a", 200, [6, 11, 13, 15])] {
            // Resolving means ascending: an unsorted list is refused.
            let s = subset(ClassSubset::Named(name.into()), 1000).unwrap().unwrap();
            assert_eq!(s.len(), size, "{name}");
            assert_eq!((0..4).map(|c| s.model_class(c)).collect::<Vec<_>>(), first, "{name}");
            // Written as positions 0..199: the sorted wnid folders' numbering.
            assert_eq!(
                (0..size as i64).map(|c| s.output_class(c)).collect::<Vec<_>>(),
                (0..size as i64).collect::<Vec<_>>()
            );
            // Not a 1000-class model: refused with the range.
            assert!(subset(ClassSubset::Named(name.into()), 10).is_err());
        }
        let m = LabelSpace::resolve(None, Some("objectnet"), 1000, Task::Classification)
            .unwrap()
            .unwrap();
        let dataset: std::collections::BTreeSet<i64> = (0..m.len() as i64).map(|c| m.output_class(c)).collect();
        assert_eq!(dataset.len(), 113);
        assert_eq!(dataset.last(), Some(&112));
    }
}
