//! Adapt stage: one std thread owns the models and the device, and runs the method over
//! batches of consecutive items.
//!
//! Invariants: a batch never spans a control event or a variant, so `End` always
//! follows the outcomes of its shard and stateful methods see one stream per variant.
//! Every item in yields one outcome out, or its shard fails: a method that errors or
//! panics on a batch is recovered and run again on it (per `runtime.shard_retries`);
//! when the tries are spent, or when it returns the wrong outcomes, every shard in the
//! batch fails with the reason and the run goes on with the others.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::event::{Control, Event};
use crate::image::Prepared;
use crate::sample::{panic_message, Variant};
use crate::storage::Backoff;
use crate::tta::{Method, Outcome};

/// Why a method produced no usable outcomes for a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("the method failed: {0}")]
    Failed(#[from] tch::TchError),
    #[error("the method panicked: {0}")]
    Panicked(String),
    #[error("the method returned {got} outcome(s) for {expected} sample(s)")]
    WrongCount { got: usize, expected: usize },
    #[error("the method returned the outcome of {got:?} where {expected:?} was due")]
    WrongOrder { got: String, expected: String },
}

impl BatchError {
    /// Whether running the batch again may help: a libtorch error (out of memory) or a
    /// panic may pass; wrong outcomes are a bug in the method.
    fn is_retryable(&self) -> bool {
        matches!(self, BatchError::Failed(_) | BatchError::Panicked(_))
    }
}

/// Runs `method` over the items of `rx` until the input ends or the output is gone.
pub(super) fn run(
    mut rx: mpsc::Receiver<Event<Prepared>>,
    tx: mpsc::Sender<Event<Outcome>>,
    mut method: Box<dyn Method>,
    busy_us: &AtomicU64,
    (retries, one_stream): (u32, bool),
) {
    let max_batch = method.batch_size().max(1);
    // Shards failed here whose remaining items and End are still on their way.
    let mut failed: HashSet<Arc<str>> = HashSet::new();
    let mut held: Option<Event<Prepared>> = None;
    // The next event worth handling: items and the end of failed shards are dropped.
    let mut next = |held: &mut Option<Event<Prepared>>, failed: &mut HashSet<Arc<str>>| loop {
        let event = held.take().or_else(|| rx.blocking_recv())?;
        match &event {
            Event::Item { shard, .. } if failed.contains(shard) => continue,
            Event::Control(c @ (Control::End { .. } | Control::Failed { .. })) if failed.contains(c.shard()) => {
                failed.remove(c.shard());
                continue;
            }
            _ => return Some(event),
        }
    };
    while let Some(event) = next(&mut held, &mut failed) {
        let (shard, item) = match event {
            Event::Control(c) => {
                if tx.blocking_send(Event::Control(c)).is_err() {
                    return;
                }
                continue;
            }
            Event::Item { shard, item } => (shard, item),
        };
        let mut shards = vec![shard];
        let variant = item.variant;
        let mut batch = vec![item];
        // A batch is full unless a control event, another variant (another stream) or
        // the end of input cuts it: TENT's batch statistics need the whole batch. Under
        // a stream protocol every variant is one stream, and a batch may mix them.
        while batch.len() < max_batch {
            match next(&mut held, &mut failed) {
                Some(Event::Item { shard, item }) if one_stream || item.variant == variant => {
                    shards.push(shard);
                    batch.push(item);
                }
                Some(other) => {
                    held = Some(other);
                    break;
                }
                None => break,
            }
        }
        // The method keys its streams by variant: under a stream protocol it sees one.
        let variants: Vec<Variant> = batch.iter().map(|p| p.variant).collect();
        if one_stream {
            batch.iter_mut().for_each(|p| p.variant = Variant::CLEAN);
        }
        let t = Instant::now();
        let result = run_batch(method.as_mut(), &batch, retries);
        busy_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(outcomes) => {
                for (((shard, mut item), prepared), variant) in
                    shards.into_iter().zip(outcomes).zip(&batch).zip(variants)
                {
                    item.variant = variant;
                    item.dense_label = prepared.dense_label.clone();
                    if tx.blocking_send(Event::Item { shard, item }).is_err() {
                        return;
                    }
                }
            }
            Err(error) => {
                let mut seen = HashSet::new();
                for shard in shards.into_iter().filter(|s| seen.insert(s.clone())) {
                    tracing::error!(shard = %shard, "{error}");
                    failed.insert(shard.clone());
                    let event = Event::Control(Control::Failed {
                        shard,
                        error: error.clone(),
                    });
                    if tx.blocking_send(event).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Runs the method on `batch`, trying again after a failure or a panic; the error names
/// the last reason and the tries spent.
fn run_batch(method: &mut dyn Method, batch: &[Prepared], retries: u32) -> Result<Vec<Outcome>, String> {
    let mut tries = Backoff::shard(retries).start();
    loop {
        let error = match catch_unwind(AssertUnwindSafe(|| method.run(batch))) {
            Ok(Ok(outcomes)) => match check_outcomes(batch, &outcomes) {
                Ok(()) => return Ok(outcomes),
                Err(e) => e,
            },
            Ok(Err(e)) => BatchError::Failed(e),
            Err(panic) => BatchError::Panicked(panic_message(panic.as_ref()).to_string()),
        };
        method.recover();
        let wait = if error.is_retryable() { tries.next_delay() } else { None };
        match wait {
            Some(wait) => {
                tracing::warn!(
                    "{error}; running the batch of {} again in {wait:?} (retry {}/{retries})",
                    batch.len(),
                    tries.attempts() - 1
                );
                std::thread::sleep(wait);
            }
            None => return Err(format!("{error} (after {} attempt(s))", tries.attempts())),
        }
    }
}

/// One outcome per sample, in order: anything else would drop or misplace rows.
fn check_outcomes(batch: &[Prepared], outcomes: &[Outcome]) -> Result<(), BatchError> {
    if outcomes.len() != batch.len() {
        return Err(BatchError::WrongCount {
            got: outcomes.len(),
            expected: batch.len(),
        });
    }
    match batch.iter().zip(outcomes).find(|(p, o)| p.key != o.key) {
        Some((p, o)) => Err(BatchError::WrongOrder {
            got: o.key.clone(),
            expected: p.key.clone(),
        }),
        None => Ok(()),
    }
}
