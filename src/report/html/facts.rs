//! Run facts: which runs made the committed rows, with what bundle and config, how many
//! images with which statuses, and when.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::rows::Committed;
use super::svg::esc;

#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub committed_shards: usize,
    /// Committed rows (one per image and variant).
    pub rows: u64,
    pub labelled: u64,
    /// Committed rows per status.
    pub statuses: BTreeMap<String, u64>,
    pub runs: Vec<RunLine>,
    pub first_started: Option<String>,
    pub last_finished: Option<String>,
    /// Wall time of all runs, summed.
    pub run_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunLine {
    pub run_id: String,
    pub output: String,
    /// The `[protocol]` the run streamed its variants in (`reset_each_shift` where the
    /// config has none).
    pub protocol: String,
    pub method: String,
    pub bundle: String,
    /// The bundle's content digest, where the run summary records one.
    pub bundle_sha256: Option<String>,
    /// sha256 of the run's config as its run summary holds it (credentials stripped),
    /// serialized compactly by serde_json.
    pub config_sha256: String,
    pub device: String,
    pub dtta_version: String,
    pub started_at: String,
    pub finished_at: String,
    pub elapsed_s: f64,
    /// Rows the run wrote (committed or not: a run's own count).
    pub rows: u64,
    pub shards_committed: usize,
}

pub fn compute(c: &Committed) -> Facts {
    let mut runs: Vec<RunLine> = c
        .runs
        .iter()
        .map(|(output, r)| RunLine {
            run_id: r.run_id.clone(),
            output: output.clone(),
            protocol: r.config["protocol"]["kind"]
                .as_str()
                .unwrap_or("reset_each_shift")
                .to_string(),
            method: r.method.clone(),
            bundle: r.bundle.clone(),
            bundle_sha256: r.bundle_sha256.clone(),
            config_sha256: crate::config::digest(&r.config),
            device: r.device.clone(),
            dtta_version: r.dtta_version.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
            elapsed_s: r.elapsed_s,
            rows: r.tally.rows,
            shards_committed: r.shards_committed.len(),
        })
        .collect();
    runs.sort_by(|a, b| (&a.started_at, &a.run_id).cmp(&(&b.started_at, &b.run_id)));
    Facts {
        committed_shards: c.committed_shards,
        rows: c.tally.rows,
        labelled: c.tally.labelled,
        statuses: c.tally.statuses.clone(),
        first_started: runs.iter().map(|r| r.started_at.clone()).min(),
        last_finished: runs.iter().map(|r| r.finished_at.clone()).max(),
        run_seconds: runs.iter().map(|r| r.elapsed_s).sum(),
        runs,
    }
}

pub fn render(f: &Facts) -> String {
    let mut h = String::new();
    let statuses: Vec<String> = f.statuses.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let bundles: std::collections::BTreeSet<&str> = f.runs.iter().map(|r| r.bundle.as_str()).collect();
    let _ = write!(
        h,
        "<p>{} committed shard(s) hold {} row(s) ({} labelled) from {} run(s) of {} bundle(s). Statuses: {}. \
         The runs took {:.1} s of wall time in all, from {} to {} UTC.</p>",
        f.committed_shards,
        f.rows,
        f.labelled,
        f.runs.len(),
        bundles.len(),
        esc(&if statuses.is_empty() {
            "none".into()
        } else {
            statuses.join(", ")
        }),
        f.run_seconds,
        esc(&f.first_started.as_deref().map_or("n/a".into(), to_second)),
        esc(&f.last_finished.as_deref().map_or("n/a".into(), to_second)),
    );
    h.push_str(
        "<div class=\"wide\"><table><thead><tr><th>run</th><th>method</th><th>protocol</th><th>output</th><th>bundle</th><th>bundle sha256</th>\
         <th>config sha256</th><th>device</th><th class=\"num\">rows</th><th class=\"num\">shards</th>\
         <th>started (UTC)</th><th class=\"num\">seconds</th></tr></thead><tbody>",
    );
    for r in &f.runs {
        let short = |d: &str| esc(&d.chars().take(12).collect::<String>());
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code title=\"{}\">{}</code></td>\
             <td><code title=\"{}\">{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td title=\"{}\">{}</td><td class=\"num\">{:.1}</td></tr>",
            esc(&r.run_id),
            esc(&r.method),
            esc(&r.protocol),
            esc(&r.output),
            esc(&r.bundle),
            esc(r.bundle_sha256.as_deref().unwrap_or("")),
            r.bundle_sha256.as_deref().map_or("not recorded".into(), short),
            esc(&r.config_sha256),
            short(&r.config_sha256),
            esc(&r.device),
            r.rows,
            r.shards_committed,
            esc(&r.started_at),
            esc(&to_second(&r.started_at)),
            r.elapsed_s
        );
    }
    h.push_str("</tbody></table></div>");
    h
}

/// An RFC 3339 time to the second, for reading (`2026-11-30 03:03:28`); the full
/// value stays in the cell's title and in report.json.
fn to_second(rfc3339: &str) -> String {
    rfc3339.get(..19).unwrap_or(rfc3339).replacen('T', " ", 1)
}
