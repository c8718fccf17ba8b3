//! Which worker this process is, and which shards are its share.
//!
//! Identity comes from `--worker-index` / `--worker-count` (or `DTTA_WORKER_INDEX` /
//! `DTTA_WORKER_COUNT`), or from the scheduler that started the process: a Kubernetes
//! Indexed Job, a Slurm array, an AWS Batch array job, GCP Batch. Sources that disagree
//! are an error naming both, never a silent pick.
//!
//! Invariant: every worker computes the same split from the same sorted listing:
//! shard i goes to worker i mod count.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Worker {
    pub index: usize,
    pub count: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkerError {
    #[error("worker index {index} (from {source_name}) is out of range for {count} workers (from {count_source})")]
    OutOfRange {
        index: usize,
        count: usize,
        source_name: String,
        count_source: String,
    },
    #[error("the worker count must be at least 1 (from {0})")]
    ZeroCount(String),
    #[error("conflicting worker {what}: {a} from {a_source}, {b} from {b_source}")]
    Conflict {
        what: &'static str,
        a: usize,
        a_source: String,
        b: usize,
        b_source: String,
    },
    #[error("a worker index is set (from {0}) but no worker count: set --worker-count, DTTA_WORKER_COUNT or runtime.worker_count")]
    MissingCount(String),
    #[error("{name} = `{value}` is not a non-negative integer")]
    NotANumber { name: String, value: String },
}

/// Where index and count may come from, besides flags: (index variable, count variable,
/// variable whose value is subtracted from the index).
const SCHEDULERS: [(&str, Option<&str>, Option<&str>); 4] = [
    ("JOB_COMPLETION_INDEX", None, None), // Kubernetes Indexed Job
    (
        "SLURM_ARRAY_TASK_ID",
        Some("SLURM_ARRAY_TASK_COUNT"),
        Some("SLURM_ARRAY_TASK_MIN"),
    ), // Slurm array
    ("AWS_BATCH_JOB_ARRAY_INDEX", None, None), // AWS Batch array job
    ("BATCH_TASK_INDEX", Some("BATCH_TASK_COUNT"), None), // GCP Batch
];

impl Worker {
    pub const SOLO: Worker = Worker { index: 0, count: 1 };

    /// From `--worker-index` / `--worker-count`; neither means a single worker.
    pub fn from_flags(index: Option<usize>, count: Option<usize>) -> Result<Worker, WorkerError> {
        Self::resolve(index, count, None, &HashMap::new())
    }

    /// Flags, `runtime.worker_count` and the process environment together.
    pub fn detect(
        index: Option<usize>,
        count: Option<usize>,
        config_count: Option<usize>,
    ) -> Result<Worker, WorkerError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::resolve(index, count, config_count, &env)
    }

    /// The pure rule behind [`Worker::detect`], over an explicit environment.
    pub fn resolve(
        flag_index: Option<usize>,
        flag_count: Option<usize>,
        config_count: Option<usize>,
        env: &HashMap<String, String>,
    ) -> Result<Worker, WorkerError> {
        let number = |name: &str| -> Result<Option<usize>, WorkerError> {
            match env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| WorkerError::NotANumber {
                    name: name.to_string(),
                    value: v.to_string(),
                }),
            }
        };
        let mut indexes: Vec<(usize, String)> = Vec::new();
        let mut counts: Vec<(usize, String)> = Vec::new();
        if let Some(i) = flag_index {
            indexes.push((i, "--worker-index".into()));
        }
        if let Some(c) = flag_count {
            counts.push((c, "--worker-count".into()));
        }
        if let Some(c) = config_count {
            counts.push((c, "runtime.worker_count".into()));
        }
        for (index_var, count_var, min_var) in SCHEDULERS {
            if let Some(i) = number(index_var)? {
                let min = match min_var {
                    Some(m) => number(m)?.unwrap_or(0),
                    None => 0,
                };
                let source = match min_var {
                    Some(m) if min > 0 => format!("{index_var} - {m}"),
                    _ => index_var.to_string(),
                };
                indexes.push((i.saturating_sub(min), source));
            }
            if let Some(c) = count_var.map(number).transpose()?.flatten() {
                counts.push((c, count_var.expect("checked").to_string()));
            }
        }
        let agree = |what: &'static str, found: &[(usize, String)]| -> Result<Option<(usize, String)>, WorkerError> {
            let Some(first) = found.first() else { return Ok(None) };
            if let Some(other) = found.iter().find(|(v, _)| *v != first.0) {
                return Err(WorkerError::Conflict {
                    what,
                    a: first.0,
                    a_source: first.1.clone(),
                    b: other.0,
                    b_source: other.1.clone(),
                });
            }
            Ok(Some(first.clone()))
        };
        let index = agree("index", &indexes)?;
        let count = agree("count", &counts)?;
        match (index, count) {
            (None, None) => Ok(Worker::SOLO),
            (Some((_, source)), None) => Err(WorkerError::MissingCount(source)),
            (index, Some((count, count_source))) => {
                let (index, source_name) = index.unwrap_or((0, "default".into()));
                if count == 0 {
                    Err(WorkerError::ZeroCount(count_source))
                } else if index >= count {
                    Err(WorkerError::OutOfRange {
                        index,
                        count,
                        source_name,
                        count_source,
                    })
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

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

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

    #[test]
    fn schedulers_set_identity() {
        let w = |e: &[(&str, &str)], cfg| Worker::resolve(None, None, cfg, &env(e));
        // Kubernetes: index from the Job, count from the manifest's env or the config.
        assert_eq!(
            w(&[("JOB_COMPLETION_INDEX", "2")], Some(4)).unwrap(),
            Worker { index: 2, count: 4 }
        );
        let k8s = Worker::resolve(None, Some(4), None, &env(&[("JOB_COMPLETION_INDEX", "3")])).unwrap();
        assert_eq!(k8s, Worker { index: 3, count: 4 });
        // Slurm arrays may start at 1.
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ];
        assert_eq!(w(&slurm, None).unwrap(), Worker { index: 4, count: 8 });
        assert_eq!(
            w(&[("AWS_BATCH_JOB_ARRAY_INDEX", "0")], Some(2)).unwrap(),
            Worker { index: 0, count: 2 }
        );
        let gcp = [("BATCH_TASK_INDEX", "1"), ("BATCH_TASK_COUNT", "3")];
        assert_eq!(w(&gcp, None).unwrap(), Worker { index: 1, count: 3 });
        assert_eq!(w(&[], None).unwrap(), Worker::SOLO);
    }

    #[test]
    fn conflicts_and_bad_values_name_their_source() {
        let err = Worker::resolve(Some(1), Some(4), None, &env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--worker-index") && msg.contains("JOB_COMPLETION_INDEX"),
            "{msg}"
        );
        let err = Worker::resolve(
            None,
            None,
            Some(3),
            &env(&[("BATCH_TASK_INDEX", "0"), ("BATCH_TASK_COUNT", "4")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("runtime.worker_count") && err.contains("BATCH_TASK_COUNT"),
            "{err}"
        );
        let err = Worker::resolve(
            None,
            None,
            None,
            &env(&[("SLURM_ARRAY_TASK_ID", "9"), ("SLURM_ARRAY_TASK_COUNT", "4")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("SLURM_ARRAY_TASK_ID") && err.contains("out of range"),
            "{err}"
        );
        let err = Worker::resolve(None, None, None, &env(&[("JOB_COMPLETION_INDEX", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("JOB_COMPLETION_INDEX"), "{err}");
        let err = Worker::resolve(None, None, None, &env(&[("JOB_COMPLETION_INDEX", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no worker count"), "{err}");
    }
}
