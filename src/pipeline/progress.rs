//! Progress on long work: an indicatif bar on a terminal, a log line every 10 s
//! otherwise; and the process's peak memory for the run summary.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::tta::Outcome;

/// How progress is shown: a bar on a terminal, log lines otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Bar,
    Log,
}

/// Progress: an indicatif bar on a terminal, a log line every 10 s otherwise.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Instant,
    shards_total: usize,
    shards_done: usize,
    rows: u64,
    labelled: u64,
    correct: u64,
}

impl Progress {
    pub(super) fn new(mode: ProgressMode, shards_total: usize) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::new(shards_total as u64);
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} shards  {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
            last_log: Instant::now(),
            shards_total,
            shards_done: 0,
            rows: 0,
            labelled: 0,
            correct: 0,
        }
    }

    fn message(&self) -> String {
        let rate = self.rows as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let mut msg = format!("{} images, {rate:.1} images/s", self.rows);
        if self.labelled > 0 {
            msg += &format!(", top-1 {:.2}%", 100.0 * self.correct as f64 / self.labelled as f64);
        }
        msg
    }

    pub(super) fn row(&mut self, outcome: &Outcome) {
        self.rows += 1;
        if let Some(ok) = outcome.correct_after() {
            self.labelled += 1;
            self.correct += ok as u64;
        }
        self.tick();
    }

    pub(super) fn shard_done(&mut self) {
        self.shards_done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        self.tick();
    }

    fn tick(&mut self) {
        if let Some(bar) = &self.bar {
            if self.last_log.elapsed() >= Duration::from_millis(100) {
                bar.set_message(self.message());
                self.last_log = Instant::now();
            }
        } else if self.last_log.elapsed() >= Duration::from_secs(10) {
            tracing::info!(
                "progress: {}/{} shards, {}",
                self.shards_done,
                self.shards_total,
                self.message()
            );
            self.last_log = Instant::now();
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The process's peak resident set size in MiB (Linux reports `ru_maxrss` in KiB).
pub(super) fn peak_rss_mib() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: initialised by the successful call above.
    unsafe { usage.assume_init() }.ru_maxrss as f64 / 1024.0
}
