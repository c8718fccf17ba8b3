//! The one message type every stage passes on: items of a shard, and the control
//! events that frame them.
//!
//! Invariant: per shard, events travel in order at every stage: `Begin`, the shard's
//! items, then exactly one of `End` or `Failed`. Shards in flight interleave; a stage
//! that groups items (decode by variant, adapt into batches) keeps each shard's order.

use std::sync::Arc;

/// Messages between stages. Control events keep their order relative to items of the
/// same shard.
pub(super) enum Event<T> {
    Item { shard: Arc<str>, item: T },
    Control(Control),
}

pub(super) enum Control {
    Begin(Arc<str>),
    /// The shard was read to its end; `samples` items were handed on in total (rows,
    /// once the decode stage has multiplied them by the variants).
    End {
        shard: Arc<str>,
        samples: u64,
    },
    /// The shard could not be read, or its samples could not be adapted, after retries;
    /// its rows must not be committed. Items of it that follow are dropped.
    Failed {
        shard: Arc<str>,
        error: String,
    },
}

impl Control {
    /// The shard this event is about.
    pub(super) fn shard(&self) -> &Arc<str> {
        match self {
            Control::Begin(shard) | Control::End { shard, .. } | Control::Failed { shard, .. } => shard,
        }
    }
}
