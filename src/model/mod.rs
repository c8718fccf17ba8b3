//! Model bundles (bundle.toml + TorchScript) and the compute device.

pub mod bundle;
pub mod device;
pub mod label_space;
pub mod schedule;

pub use bundle::{Bundle, BundleError, Classifier, Diffusion};
pub use label_space::{ClassSubset, LabelSpace, LabelSpaceError};
