//! The tables `dtta summarize` and `dtta plan` print.

use std::collections::BTreeSet;
use std::io::{self, Write};

use super::percent;
use super::summary::{Summary, VariantRow};
use crate::sink::dense::DenseTally;
use crate::sink::maintenance::{HistoryEntry, VacuumReport};
use crate::sink::Tally;
use crate::storage::ShardRef;
use crate::worker::Worker;

/// `dtta summarize`: one line per method over all workers and per worker, the shards
/// that failed and are still not committed, then the robustness table when there is one.
pub fn write_summary(w: &mut impl Write, summary: &Summary) -> io::Result<()> {
    writeln!(
        w,
        "{}: {} committed shard(s) from {} run(s)",
        summary.output, summary.committed_shards, summary.runs
    )?;
    writeln!(
        w,
        "{:<22} {:>6} {:>7} {:>8} {:>7} {:>9} {:>13} {:>12} {:>10} {:>12} {:>10}",
        "method",
        "worker",
        "shards",
        "rows",
        "not ok",
        "labelled",
        "top-1 before",
        "top-1 after",
        "ms/image",
        "evals/image",
        "images/s"
    )?;
    for r in &summary.rows {
        writeln!(
            w,
            "{:<22} {:>6} {:>7} {:>8} {:>7} {:>9} {:>13} {:>12} {:>10.2} {:>12.1} {:>10}",
            r.method,
            r.worker.map_or("all".to_string(), |w| w.to_string()),
            r.shards,
            r.tally.rows,
            r.tally.not_ok(),
            r.tally.labelled,
            percent(r.tally.accuracy_before()),
            percent(r.tally.accuracy_after()),
            r.ms_per_image(),
            r.denoiser_evals_per_image(),
            r.images_per_s.map_or("n/a".to_string(), |v| format!("{v:.1}"))
        )?;
    }
    for r in summary.rows.iter().filter(|r| r.worker.is_none()) {
        if let Some(d) = &r.tally.dense {
            write_dense_line(w, &r.method, d)?;
        }
    }
    for (shard, error) in &summary.failed_shards {
        writeln!(w, "failed (not committed): {shard}: {error}")?;
    }
    let unknown = "unknown (before dtta recorded it)";
    for (digest, shards) in &summary.bundles {
        let digest = digest.as_deref().unwrap_or(unknown);
        writeln!(w, "bundle sha256 {digest}: {shards} committed shard(s)")?;
    }
    if summary.bundles.len() > 1 {
        writeln!(
            w,
            "note: these committed shards come from {} model bundles",
            summary.bundles.len()
        )?;
    }
    for r in &summary.run_list {
        writeln!(
            w,
            "run {} ({}worker {}, {}): {} shard(s) committed, bundle sha256 {}",
            r.run_id,
            // Below a parent of outputs, say which output the run wrote.
            if r.output == summary.output {
                String::new()
            } else {
                format!("{}, ", r.output)
            },
            r.worker,
            r.method,
            r.shards_committed,
            r.bundle_sha256.as_deref().unwrap_or(unknown)
        )?;
    }
    if !summary.variants.is_empty() {
        writeln!(w)?;
        write_robustness(w, &summary.variants)?;
    }
    Ok(())
}

/// One line of dataset-level dense metrics (sums over every labelled pixel, not means of
/// per-image values), before -> after adaptation.
fn write_dense_line(w: &mut impl Write, method: &str, d: &DenseTally) -> io::Result<()> {
    let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.1}", v * 100.0));
    if d.is_segmentation() {
        writeln!(
            w,
            "{method}: segmentation over {} labelled image(s), {} pixels: mIoU {} -> {} %, pixel acc {} -> {} %",
            d.scored,
            d.pixels,
            pct(d.miou(false)),
            pct(d.miou(true)),
            pct(d.pixel_acc(false)),
            pct(d.pixel_acc(true))
        )
    } else {
        let f = |v: Option<(f64, f64, f64)>, i: usize| {
            v.map_or("n/a".to_string(), |t| format!("{:.4}", [t.0, t.1, t.2][i]))
        };
        let (b, a) = (d.depth(false), d.depth(true));
        writeln!(
            w,
            "{method}: depth over {} labelled image(s), {} valid pixels: AbsRel {} -> {}, RMSE {} -> {} m, delta1 {} -> {}",
            d.scored,
            d.pixels,
            f(b, 0),
            f(a, 0),
            f(b, 1),
            f(a, 1),
            f(b, 2),
            f(a, 2)
        )
    }
}

/// The robustness table's metric: top-1 (%), or for dense outputs the dataset-level
/// mIoU (%) or AbsRel, after adaptation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Headline {
    Top1,
    Miou,
    AbsRel,
}

impl Headline {
    fn of(rows: &[VariantRow]) -> Headline {
        match rows.iter().find_map(|r| r.tally.dense.as_ref()) {
            Some(d) if d.is_segmentation() => Headline::Miou,
            Some(_) => Headline::AbsRel,
            None => Headline::Top1,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Headline::Top1 => "top-1 (%)",
            Headline::Miou => "mIoU (%)",
            Headline::AbsRel => "AbsRel (lower is better)",
        }
    }

    fn value(self, t: &Tally) -> Option<f64> {
        match self {
            Headline::Top1 => t.accuracy_after(),
            Headline::Miou => t.dense.as_ref()?.miou(true),
            Headline::AbsRel => t.dense.as_ref()?.depth(true).map(|d| d.0),
        }
    }

    fn show(self, v: Option<f64>) -> String {
        match (self, v) {
            (_, None) => "n/a".into(),
            (Headline::AbsRel, Some(v)) => format!("{v:.4}"),
            (_, Some(v)) => format!("{:.1}", v * 100.0),
        }
    }
}

/// The robustness table: one line per variant, top-1 after adaptation per method (the
/// dataset-level mIoU or AbsRel for dense outputs), then
/// the mean over corrupted variants, each method's ms per image and its mean denoiser
/// evaluations per image.
pub fn write_robustness(w: &mut impl Write, rows: &[VariantRow]) -> io::Result<()> {
    let mut methods: Vec<&str> = Vec::new();
    let mut variants: Vec<(&str, u8)> = Vec::new();
    for r in rows {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
        if !variants.contains(&(r.corruption.as_str(), r.severity)) {
            variants.push((&r.corruption, r.severity));
        }
    }
    let cell = |method: &str, v: (&str, u8)| {
        rows.iter()
            .find(|r| r.method == method && r.corruption == v.0 && r.severity == v.1)
    };
    let width = methods.iter().map(|m| m.len()).max().unwrap_or(0).max(8);
    let headline = Headline::of(rows);
    let pct = |a: Option<f64>| headline.show(a);
    // The first column, then one right-aligned cell per method.
    let mut line = |first: String, cells: Vec<String>| {
        let cells: String = cells.iter().map(|c| format!(" {c:>width$}")).collect();
        writeln!(w, "{first}{cells}")
    };
    line(
        format!("{:<22} {:>3}", headline.title(), "sev"),
        methods.iter().map(|m| m.to_string()).collect(),
    )?;
    for &v in &variants {
        let severity = if v.1 == 0 { "-".to_string() } else { v.1.to_string() };
        let cells = methods
            .iter()
            .map(|m| pct(cell(m, v).and_then(|r| headline.value(&r.tally))))
            .collect();
        line(format!("{:<22} {:>3}", v.0, severity), cells)?;
    }
    let means = methods
        .iter()
        .map(|m| {
            let accs: Vec<f64> = variants
                .iter()
                .filter(|v| v.1 > 0)
                .filter_map(|&v| cell(m, v).and_then(|r| headline.value(&r.tally)))
                .collect();
            pct((!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64))
        })
        .collect();
    line(format!("{:<26}", "mean over corrupted"), means)?;
    // Per method over all its variants.
    let totals: Vec<Tally> = methods
        .iter()
        .map(|m| {
            let mut t = Tally::default();
            rows.iter().filter(|r| r.method == *m).for_each(|r| t.merge(&r.tally));
            t
        })
        .collect();
    line(
        format!("{:<26}", "ms per image"),
        totals.iter().map(|t| format!("{:.1}", t.ms_per_image())).collect(),
    )?;
    line(
        format!("{:<26}", "denoiser evals per image"),
        totals
            .iter()
            .map(|t| format!("{:.1}", t.denoiser_evals_per_image()))
            .collect(),
    )
}

/// `dtta plan`: this worker's share of the listed shards, each committed or to do.
pub fn write_plan(
    w: &mut impl Write,
    worker: &Worker,
    shards: &[ShardRef],
    total_listed: usize,
    committed: &BTreeSet<String>,
) -> io::Result<()> {
    let todo = shards.iter().filter(|s| !committed.contains(&s.id)).count();
    writeln!(
        w,
        "worker {}/{}: {} of {} listed shard(s), {} committed, {} to do",
        worker.index,
        worker.count,
        shards.len(),
        total_listed,
        shards.len() - todo,
        todo
    )?;
    for s in shards {
        let state = if committed.contains(&s.id) { "committed" } else { "todo" };
        writeln!(w, "{state:>9}  {}  ({} bytes)", s.id, s.size)?;
    }
    Ok(())
}

/// `dtta history`: one line per version of the predictions table.
pub fn write_history(w: &mut impl Write, output: &str, history: &[HistoryEntry]) -> io::Result<()> {
    writeln!(w, "{output}: predictions table, {} version(s)", history.len())?;
    writeln!(
        w,
        "{:>7}  {:<24}  {:<24}  {:>6}  {:<12}  {:>6}  {:>8}  shards",
        "version", "committed at", "run", "worker", "bundle", "files", "rows"
    )?;
    for h in history {
        let when = h.timestamp_ms.map_or("-".into(), |ms| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map_or(ms.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        });
        let worker = h.worker.map_or("-".into(), |(i, n)| format!("{i}/{n}"));
        let bundle: String = h.bundle_sha256.as_deref().unwrap_or("-").chars().take(12).collect();
        writeln!(
            w,
            "{:>7}  {:<24}  {:<24}  {:>6}  {:<12}  {:>6}  {:>8}  {}",
            h.version,
            when,
            h.run_id.as_deref().unwrap_or("-"),
            worker,
            bundle,
            h.files,
            h.rows,
            h.shards.join(" ")
        )?;
    }
    Ok(())
}

/// `dtta vacuum`: what each table kept and removed.
pub fn write_vacuum(
    w: &mut impl Write,
    reports: &[VacuumReport],
    retention: crate::config::units::HumanDuration,
    dry_run: bool,
) -> io::Result<()> {
    let verb = if dry_run { "would remove" } else { "removed" };
    let secs = retention.0.as_secs();
    let retention = match secs {
        0 => format!("{retention}"),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{retention}"),
    };
    for r in reports {
        writeln!(
            w,
            "{}: {} referenced file(s) kept, {} unreferenced younger than {retention} kept, {verb} {} ({} bytes)",
            r.table,
            r.referenced,
            r.recent,
            r.removed.len(),
            r.removed_bytes
        )?;
        for f in &r.removed {
            writeln!(w, "  {verb} {f}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::report::summary::{RunLine, SummaryRow};
    use crate::sink::Tally;

    /// 10 rows, one not decoded; 8 of 9 labelled right before adaptation, 9 after;
    /// 32 denoiser evaluations per predicted row.
    fn tally(adapt_ms: f64) -> Tally {
        Tally {
            denoiser_evals: 9 * 32,
            rows: 10,
            statuses: [("ok".to_string(), 9), ("decode_error".to_string(), 1)].into(),
            labelled: 9,
            correct_before: 8,
            correct_after: 9,
            adapt_ms,
            by_variant: Default::default(),
            dense: None,
        }
    }

    #[test]
    fn dense_outputs_get_dataset_level_lines_and_their_own_headline() {
        use crate::tta::dense::{segmentation_metrics, DenseMetrics};
        let mut t = tally(1.0);
        let mut d = DenseTally::default();
        let before = segmentation_metrics(&[0, 0, 1, 1], &[0, 1, 1, 1], 2).unwrap();
        let after = segmentation_metrics(&[0, 1, 1, 1], &[0, 1, 1, 1], 2).unwrap();
        d.add(&DenseMetrics::Segmentation(before), &DenseMetrics::Segmentation(after));
        t.dense = Some(d.clone());
        let mut out = Vec::new();
        write_dense_line(&mut out, "source", &d).unwrap();
        let line = String::from_utf8(out).unwrap();
        // Before: class 0 IoU 1/2, class 1 IoU 2/3; after: both 1.
        assert_eq!(
            line,
            "source: segmentation over 1 labelled image(s), 4 pixels: mIoU 58.3 -> 100.0 %, pixel acc 75.0 -> 100.0 %\n"
        );
        let rows = vec![VariantRow {
            method: "source".into(),
            corruption: "clean".into(),
            severity: 0,
            tally: t,
        }];
        let table = text(|w| write_robustness(w, &rows));
        assert!(table.starts_with("mIoU (%)"), "{table}");
        assert!(table.contains("100.0"), "{table}");
    }

    fn text(write: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        write(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn summary_table_has_one_line_per_method_and_worker() {
        let row = |worker, images_per_s| SummaryRow {
            method: "tent".into(),
            worker,
            shards: 2,
            tally: tally(18.0),
            images_per_s,
        };
        let summary = Summary {
            output: "out/demo/".into(),
            committed_shards: 2,
            rows: vec![row(None, Some(123.44)), row(Some(0), None)],
            variants: vec![],
            failed_shards: vec![("out/demo/shard-000002".into(), "timed out".into())],
            runs: 1,
            bundles: vec![(Some("e25f".into()), 2)],
            run_list: vec![RunLine {
                output: "out/demo/".into(),
                started_at: "2026-11-30T00:00:00.250+00:00".into(),
                run_id: "20261130T000000Z-00ab".into(),
                worker: 0,
                method: "tent".into(),
                shards_committed: 2,
                bundle_sha256: Some("e25f".into()),
            }],
        };
        assert_eq!(
            text(|w| write_summary(w, &summary)),
            "\
out/demo/: 2 committed shard(s) from 1 run(s)
method                 worker  shards     rows  not ok  labelled  top-1 before  top-1 after   ms/image  evals/image   images/s
tent                      all       2       10       1         9        88.89%      100.00%       2.00         32.0      123.4
tent                        0       2       10       1         9        88.89%      100.00%       2.00         32.0        n/a
failed (not committed): out/demo/shard-000002: timed out
bundle sha256 e25f: 2 committed shard(s)
run 20261130T000000Z-00ab (worker 0, tent): 2 shard(s) committed, bundle sha256 e25f
"
        );
    }

    #[test]
    fn summary_notes_committed_shards_of_several_bundles() {
        let run = |output: &str, run_id: &str, digest: Option<&str>| RunLine {
            output: output.into(),
            started_at: String::new(),
            run_id: run_id.into(),
            worker: 1,
            method: "source".into(),
            shards_committed: 1,
            bundle_sha256: digest.map(str::to_string),
        };
        let summary = Summary {
            output: "out/".into(),
            committed_shards: 2,
            rows: vec![],
            variants: vec![],
            failed_shards: vec![],
            runs: 2,
            bundles: vec![(None, 1), (Some("aaaa".into()), 1)],
            run_list: vec![run("out/a/", "r1", None), run("out/b/", "r2", Some("aaaa"))],
        };
        let out = text(|w| write_summary(w, &summary));
        assert!(
            out.ends_with(
                "\
bundle sha256 unknown (before dtta recorded it): 1 committed shard(s)
bundle sha256 aaaa: 1 committed shard(s)
note: these committed shards come from 2 model bundles
run r1 (out/a/, worker 1, source): 1 shard(s) committed, bundle sha256 unknown (before dtta recorded it)
run r2 (out/b/, worker 1, source): 1 shard(s) committed, bundle sha256 aaaa
"
            ),
            "{out}"
        );
    }

    #[test]
    fn robustness_table_has_one_line_per_variant_then_mean_and_speed() {
        let row = |method: &str, corruption: &str, severity, correct_after, adapt_ms| VariantRow {
            method: method.into(),
            corruption: corruption.into(),
            severity,
            tally: Tally {
                correct_after,
                // The source spends no denoiser evaluation.
                denoiser_evals: if method == "source" { 0 } else { 9 * 32 },
                ..tally(adapt_ms)
            },
        };
        let rows = [
            row("source", "clean", 0, 9, 1.0),
            row("diffusion-tta", "clean", 0, 8, 90.0),
            row("source", "gaussian_noise", 3, 3, 1.0),
            row("diffusion-tta", "gaussian_noise", 3, 6, 90.0),
            row("source", "fog", 5, 0, 1.0),
        ];
        assert_eq!(
            text(|w| write_robustness(w, &rows)),
            "\
top-1 (%)              sev        source diffusion-tta
clean                    -         100.0          88.9
gaussian_noise           3          33.3          66.7
fog                      5           0.0           n/a
mean over corrupted                 16.7          66.7
ms per image                         0.1          10.0
denoiser evals per image             0.0          32.0
"
        );
    }

    #[test]
    fn summary_with_variants_ends_with_the_robustness_table() {
        let summary = Summary {
            output: "s3://bucket/eval/".into(),
            committed_shards: 0,
            rows: vec![],
            variants: vec![VariantRow {
                method: "source".into(),
                corruption: "clean".into(),
                severity: 0,
                tally: Tally::default(),
            }],
            failed_shards: vec![],
            runs: 0,
            bundles: vec![],
            run_list: vec![],
        };
        let out = text(|w| write_summary(w, &summary));
        let tail = "\n\ntop-1 (%)              sev   source\nclean                    -      n/a\n";
        assert!(out.contains(tail), "{out}");
    }

    #[test]
    fn plan_lists_each_shard_committed_or_todo() {
        let shard = |id: &str, size| ShardRef {
            id: id.into(),
            path: id.into(),
            size,
            members: Arc::default(),
        };
        let shards = [shard("shard-000001", 1024), shard("shard-000004", 2048)];
        let committed = BTreeSet::from(["shard-000001".to_string()]);
        let worker = Worker { index: 1, count: 3 };
        assert_eq!(
            text(|w| write_plan(w, &worker, &shards, 10, &committed)),
            "\
worker 1/3: 2 of 10 listed shard(s), 1 committed, 1 to do
committed  shard-000001  (1024 bytes)
     todo  shard-000004  (2048 bytes)
"
        );
    }

    #[test]
    fn a_closed_pipe_reaches_the_caller() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let worker = Worker { index: 0, count: 1 };
        let err = write_plan(&mut Closed, &worker, &[], 0, &BTreeSet::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
