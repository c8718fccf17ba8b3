//! Which worker this process is, and which shards are its share.
//!
//! Invariant: every worker computes the same split from the same sorted listing:
//! shard i goes to worker i mod count.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Worker {
    pub index: usize,
    pub count: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("--worker-index {index} is out of range for --worker-count {count}")]
    OutOfRange { index: usize, count: usize },
    #[error("--worker-count must be at least 1")]
    ZeroCount,
    #[error("--worker-index and --worker-count go together")]
    Incomplete,
}

impl Worker {
    pub const SOLO: Worker = Worker { index: 0, count: 1 };

    /// From `--worker-index` / `--worker-count`; neither means a single worker.
    pub fn from_flags(index: Option<usize>, count: Option<usize>) -> Result<Worker, WorkerError> {
        match (index, count) {
            (None, None) => Ok(Worker::SOLO),
            (Some(_), None) => Err(WorkerError::Incomplete),
            (index, Some(count)) => {
                let index = index.unwrap_or(0);
                if count == 0 {
                    Err(WorkerError::ZeroCount)
                } else if index >= count {
                    Err(WorkerError::OutOfRange { index, count })
                } else {
                    Ok(Worker { index, count })
                }
            }
        }
    }

    /// This worker's share of a sorted list.
    pub fn share<T>(&self, sorted: Vec<T>) -> Vec<T> {
        sorted
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, t)| t)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_partition_the_list() {
        let all: Vec<usize> = (0..10).collect();
        let mut union: Vec<usize> = (0..3)
            .flat_map(|i| Worker { index: i, count: 3 }.share(all.clone()))
            .collect();
        union.sort();
        assert_eq!(union, all);
        assert_eq!(Worker { index: 1, count: 3 }.share(all), vec![1, 4, 7]);
    }

    #[test]
    fn flags_are_checked() {
        assert_eq!(Worker::from_flags(None, None).unwrap(), Worker::SOLO);
        assert!(Worker::from_flags(Some(3), Some(3)).is_err());
        assert!(Worker::from_flags(Some(0), None).is_err());
        assert!(Worker::from_flags(None, Some(0)).is_err());
    }
}
