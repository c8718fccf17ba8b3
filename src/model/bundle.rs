//! Model bundles: a folder with `bundle.toml` and TorchScript files, local or in an
//! object store (remote bundles are downloaded once into a temporary folder).
//!
//! Invariant: a loaded [`Classifier`] has been run once on a zero batch and its output
//! shape checked against `bundle.toml`, so shape mistakes fail at start, not mid-run.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use tch::{CModule, Device, Kind, Tensor};

use crate::image::{Channels, ClassifierView};
use crate::storage::{self, StoreOptions};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {bundle}: cannot read {file}: {message}")]
    Read {
        bundle: String,
        file: String,
        message: String,
    },
    #[error("bundle {bundle}: bundle.toml: {message}")]
    Spec { bundle: String, message: String },
    #[error("bundle {bundle}: cannot load {file}: {source}")]
    Load {
        bundle: String,
        file: String,
        source: tch::TchError,
    },
    #[error("bundle {bundle}: {message}")]
    Shape { bundle: String, message: String },
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
}

/// `bundle.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSpec {
    pub name: String,
    /// One name per class, optional.
    #[serde(default)]
    pub class_names: Vec<String>,
    pub classifier: ClassifierSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// TorchScript module: `[B,C,H,W]` float -> logits `[B,K]`.
    #[serde(default = "default_classifier_file")]
    pub file: String,
    pub num_classes: usize,
    /// Names of the final layer's parameters (never adapted).
    #[serde(default)]
    pub head: Vec<String>,
    pub preprocess: PreprocessSpec,
}

fn default_classifier_file() -> String {
    "classifier.pt".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    pub resize: u32,
    pub crop: u32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A bundle on local disk, ready to load.
#[derive(Debug)]
pub struct Bundle {
    pub spec: BundleSpec,
    pub dir: PathBuf,
    /// Where it came from, for messages (credentials redacted).
    pub source: String,
    /// Keeps a downloaded bundle's folder alive.
    _download: Option<tempfile::TempDir>,
}

impl Bundle {
    /// Opens a bundle from a local folder or an object-store URL.
    pub async fn open(location: &str, options: &StoreOptions) -> Result<Bundle, BundleError> {
        let local = Path::new(location);
        if !location.contains("://") || location.starts_with("file://") {
            let dir = if let Some(p) = location.strip_prefix("file://") {
                PathBuf::from(p)
            } else {
                local.to_owned()
            };
            return Self::from_dir(dir, location.to_string(), None);
        }
        let root = storage::open(location, options)?;
        let tmp = tempfile::tempdir().map_err(|e| BundleError::Read {
            bundle: root.display.clone(),
            file: "(temporary folder)".into(),
            message: e.to_string(),
        })?;
        let read_err = |file: String, message: String| BundleError::Read {
            bundle: root.display.clone(),
            file,
            message,
        };
        let objects: Vec<_> = root
            .store
            .list(Some(&root.prefix))
            .try_collect()
            .await
            .map_err(|e| read_err("(listing)".into(), e.to_string()))?;
        for meta in objects {
            let Some(rel) = root.relative(&meta.location) else {
                continue;
            };
            let data = async { root.store.get(&meta.location).await?.bytes().await }
                .await
                .map_err(|e| read_err(rel.clone(), e.to_string()))?;
            let dest = tmp.path().join(&rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| read_err(rel.clone(), e.to_string()))?;
            }
            std::fs::write(&dest, &data).map_err(|e| read_err(rel.clone(), e.to_string()))?;
        }
        let dir = tmp.path().to_owned();
        Self::from_dir(dir, root.display.clone(), Some(tmp))
    }

    fn from_dir(dir: PathBuf, source: String, download: Option<tempfile::TempDir>) -> Result<Bundle, BundleError> {
        let path = dir.join("bundle.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| BundleError::Read {
            bundle: source.clone(),
            file: "bundle.toml".into(),
            message: e.to_string(),
        })?;
        let spec_err = |message: String| BundleError::Spec {
            bundle: source.clone(),
            message,
        };
        let value: toml::Value = toml::from_str(&text).map_err(|e| spec_err(e.message().to_string()))?;
        let spec: BundleSpec = serde_path_to_error::deserialize(value)
            .map_err(|e| spec_err(format!("key `{}`: {}", e.path(), e.inner().message())))?;
        validate(&spec).map_err(spec_err)?;
        Ok(Bundle {
            spec,
            dir,
            source,
            _download: download,
        })
    }

    /// The classifier's preprocessing as a [`ClassifierView`].
    pub fn classifier_view(&self) -> ClassifierView {
        let p = &self.spec.classifier.preprocess;
        ClassifierView {
            channels: if p.channels == 1 { Channels::Gray } else { Channels::Rgb },
            resize: p.resize,
            crop: p.crop,
            mean: p.mean.clone(),
            std: p.std.clone(),
        }
    }

    /// Loads the classifier on `device`, in eval mode, and checks its output shape.
    pub fn load_classifier(&self, device: Device) -> Result<Classifier, BundleError> {
        let spec = &self.spec.classifier;
        let mut module =
            CModule::load_on_device(self.dir.join(&spec.file), device).map_err(|source| BundleError::Load {
                bundle: self.source.clone(),
                file: spec.file.clone(),
                source,
            })?;
        module.set_eval();
        let view = self.classifier_view();
        let classifier = Classifier {
            module,
            device,
            num_classes: spec.num_classes,
            view,
        };
        let shape_err = |message: String| BundleError::Shape {
            bundle: self.source.clone(),
            message,
        };
        let probe = tch::no_grad(|| classifier.logits(&classifier.zeros(1)))
            .map_err(|e| shape_err(format!("{} failed on a zero batch: {e}", spec.file)))?;
        if probe.size() != [1, spec.num_classes as i64] {
            return Err(shape_err(format!(
                "{} returns shape {:?} for one image of {:?}, but bundle.toml says num_classes = {} (expected [1, {}])",
                spec.file,
                probe.size(),
                classifier.input_shape(1),
                spec.num_classes,
                spec.num_classes
            )));
        }
        let names: Vec<String> = classifier.parameter_names().map_err(|e| shape_err(e.to_string()))?;
        if let Some(missing) = spec.head.iter().find(|h| !names.contains(h)) {
            return Err(shape_err(format!(
                "head parameter `{missing}` is not a parameter of {} (it has {})",
                spec.file,
                names.join(", ")
            )));
        }
        Ok(classifier)
    }
}

fn validate(spec: &BundleSpec) -> Result<(), String> {
    let c = &spec.classifier;
    let p = &c.preprocess;
    if p.channels != 1 && p.channels != 3 {
        return Err(format!(
            "classifier.preprocess.channels = {}: must be 1 or 3",
            p.channels
        ));
    }
    if p.mean.len() != p.channels || p.std.len() != p.channels {
        return Err(format!(
            "classifier.preprocess: mean has {} and std {} values, but channels = {}",
            p.mean.len(),
            p.std.len(),
            p.channels
        ));
    }
    if p.std.iter().any(|s| *s <= 0.0) {
        return Err("classifier.preprocess.std: every value must be positive".into());
    }
    if p.crop == 0 || p.crop > p.resize {
        return Err(format!(
            "classifier.preprocess: crop = {} must be in 1..=resize ({})",
            p.crop, p.resize
        ));
    }
    if c.num_classes == 0 {
        return Err("classifier.num_classes must be at least 1".into());
    }
    if !spec.class_names.is_empty() && spec.class_names.len() != c.num_classes {
        return Err(format!(
            "class_names has {} names but classifier.num_classes = {}",
            spec.class_names.len(),
            c.num_classes
        ));
    }
    Ok(())
}

/// A loaded TorchScript classifier and its input geometry.
pub struct Classifier {
    module: CModule,
    pub device: Device,
    pub num_classes: usize,
    pub view: ClassifierView,
}

impl Classifier {
    /// `[batch, C, crop, crop]`.
    pub fn input_shape(&self, batch: usize) -> [i64; 4] {
        let side = self.view.crop as i64;
        [batch as i64, self.view.channels.count() as i64, side, side]
    }

    fn zeros(&self, batch: usize) -> Tensor {
        Tensor::zeros(self.input_shape(batch), (Kind::Float, self.device))
    }

    /// Logits for a batch already on this classifier's device.
    pub fn logits(&self, batch: &Tensor) -> Result<Tensor, tch::TchError> {
        self.module.forward_ts(&[batch])
    }

    /// Builds a device batch from preprocessed images (each `view.numel()` floats).
    pub fn batch_from(&self, images: &[&[f32]]) -> Tensor {
        let numel = self.view.numel();
        let mut flat = Vec::with_capacity(images.len() * numel);
        for img in images {
            debug_assert_eq!(img.len(), numel);
            flat.extend_from_slice(img);
        }
        Tensor::from_slice(&flat)
            .view(self.input_shape(images.len()))
            .to_device(self.device)
    }

    pub fn parameter_names(&self) -> Result<Vec<String>, tch::TchError> {
        Ok(self.module.named_parameters()?.into_iter().map(|(n, _)| n).collect())
    }

    /// (parameter count, of which in the head) for `inspect`.
    pub fn parameter_counts(&self, head: &[String]) -> Result<(i64, i64), tch::TchError> {
        let mut total = 0;
        let mut in_head = 0;
        for (name, t) in self.module.named_parameters()? {
            total += t.numel() as i64;
            if head.contains(&name) {
                in_head += t.numel() as i64;
            }
        }
        Ok((total, in_head))
    }
}
