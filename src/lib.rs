//! dtta: Diffusion-TTA at dataset scale.
//!
//! Data flows plan -> fetch -> parse ([`shards`]) -> decode ([`image`], on a CPU pool)
//! -> adapt ([`tta`], on one thread that owns the models) -> sink ([`sink`]); see
//! [`pipeline`] for the wiring and DESIGN.md for the whole picture.

pub mod config;
pub mod image;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod rng;
pub mod sample;
pub mod shards;
pub mod sink;
pub mod storage;
pub mod tta;
pub mod worker;
