//! Parity-test helpers: tiny real TorchScript bundles, tools/reference_tta.py runs, and
//! tolerant comparisons of what it saved.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dtta::model::Bundle;
use dtta::storage::StoreOptions;
use tch::{Kind, Tensor};

use super::{repo, text};

/// Runs the venv's python with `args`; panics with its output when it fails.
pub fn python(args: &[&str]) {
    let py = repo().join(".venv/bin/python");
    assert!(py.exists(), "the venv is missing: run `make setup`");
    let o = Command::new(py).args(args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

/// `tools/make_tiny_bundle.py DIR/NAME FLAGS...`.
pub fn make_tiny_bundle(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let script = repo().join("tools/make_tiny_bundle.py");
    let mut args = vec![script.to_str().unwrap(), out.to_str().unwrap()];
    args.extend_from_slice(flags);
    python(&args);
    out
}

/// `tools/reference_tta.py BUNDLE OUT ARGS...` into a fresh file beside the bundle;
/// returns what it saved, by name.
pub fn run_reference(bundle_dir: &Path, args: &[&str]) -> HashMap<String, Tensor> {
    let out = bundle_dir.join(format!("ref-{}.safetensors", rand::random::<u32>()));
    let script = repo().join("tools/reference_tta.py");
    let mut all = vec![
        script.to_str().unwrap(),
        bundle_dir.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    python(&all);
    Tensor::read_safetensors(&out).unwrap().into_iter().collect()
}

pub fn load(bundle: &Path) -> Bundle {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(Bundle::open(bundle.to_str().unwrap(), &StoreOptions::default()))
        .unwrap()
}

pub fn floats(t: &Tensor) -> Vec<f32> {
    Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

/// The largest relative difference (denominator at least 1e-3).
pub fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / (y.abs() as f64).max(1e-3))
        .fold(0.0, f64::max)
}
