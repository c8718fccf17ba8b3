//! The robustness matrix (top-1 per method and variant, and the mean over corrupted
//! variants) and the gain over source with bootstrap intervals.
//!
//! Gains pair the same image (shard id, key, variant) under a method and under the
//! reference: the `source` method's rows where an output of that method was read, else
//! each row's own `pred_before`. That is the unadapted classifier for episodic methods
//! (reset before every image), but for online methods (TENT, Diffusion-TTA and DUSA
//! online) it comes from the live adapting stream, so without a source series their
//! gains have no unadapted reference, and the page says so ([`Robustness::live_reference`]).
//!
//! Intervals resample images (shard id, key): the pooled `all corrupted` row holds up to
//! one difference per variant of each image, and those move together
//! ([`bootstrap::clustered`]); a per-variant row has one difference per image.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

use super::bootstrap::{self, Interval, Spec};
use super::rows::{Committed, PredRow};
use super::svg::{self, esc, Axis};
use crate::sample::Variant;

#[derive(Debug, Clone, Serialize)]
pub struct Robustness {
    pub series: Vec<String>,
    /// Variant tags, clean first.
    pub variants: Vec<String>,
    pub cells: Vec<Cell>,
    /// Per series (same order), the mean of its top-1 over corrupted variants.
    pub mean_corrupted: Vec<Option<f64>>,
    /// What gains are measured against: a series label or `before adaptation`.
    pub reference: String,
    /// Series of online methods whose gains are against their own `pred_before` from the
    /// live adapting stream, because no source series was read: they have no unadapted
    /// reference. Empty when there is a source series.
    pub live_reference: Vec<String>,
    pub gains: Vec<Gain>,
    pub bootstrap: Spec,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub series: String,
    pub variant: String,
    pub labelled: u64,
    pub correct: u64,
    pub top1: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gain {
    pub series: String,
    /// A variant tag, or `all corrupted` for every corrupted variant pooled.
    pub variant: String,
    /// (image, variant) pairs with a labelled prediction under both the method and the
    /// reference: the differences the mean is over.
    pub pairs: usize,
    /// Distinct images (shard id, key) among those pairs: the bootstrap's resampling
    /// unit. Equal to `pairs` for a single variant.
    pub images: usize,
    #[serde(flatten)]
    pub interval: Interval,
}

/// The row label of pooled corrupted variants.
const ALL_CORRUPTED: &str = "all corrupted";

/// The `method` column values (see `TtaConfig::method_column`) of methods that adapt
/// online: their `pred_before` is the live stream's, not the unadapted classifier's.
const ONLINE_METHODS: [&str; 5] = ["tent", "eata", "sar", "diffusion-tta-online", "dusa-online"];

/// Whether a series label (`method` or `method (output folder)`) names an online method.
fn is_online(series: &str) -> bool {
    let label = series.split(" (").next().unwrap_or(series);
    // A stream protocol's suffix (`tent-continual`) leaves the method as it was.
    let method = ["-continual", "-gradual", "-mixed"]
        .iter()
        .find_map(|suffix| label.strip_suffix(suffix))
        .unwrap_or(label);
    ONLINE_METHODS.contains(&method)
}

/// Differences grouped by image, images in the order first seen.
#[derive(Default)]
struct ByImage<'a> {
    index: BTreeMap<(usize, &'a str), usize>,
    diffs: Vec<Vec<f64>>,
}

impl<'a> ByImage<'a> {
    fn push(&mut self, shard: usize, key: &'a str, d: f64) {
        let next = self.diffs.len();
        let i = *self.index.entry((shard, key)).or_insert(next);
        if i == next {
            self.diffs.push(Vec::new());
        }
        self.diffs[i].push(d);
    }
}

fn correct(r: &PredRow) -> Option<bool> {
    Some(r.pred_after? == r.label?)
}

pub fn compute(c: &Committed) -> Robustness {
    let variants: BTreeSet<Variant> = c.predictions.iter().map(|r| r.variant).collect();
    let variants: Vec<Variant> = variants.into_iter().collect();
    let mut counts: BTreeMap<(usize, Variant), (u64, u64)> = BTreeMap::new();
    for r in &c.predictions {
        if let Some(ok) = correct(r) {
            let e = counts.entry((r.series, r.variant)).or_default();
            e.0 += 1;
            e.1 += ok as u64;
        }
    }
    let top1 = |s: usize, v: Variant| counts.get(&(s, v)).map(|(n, k)| *k as f64 / *n as f64);
    let mut cells = Vec::new();
    for (s, name) in c.series.iter().enumerate() {
        for &v in &variants {
            let (labelled, correct) = counts.get(&(s, v)).copied().unwrap_or_default();
            cells.push(Cell {
                series: name.clone(),
                variant: v.tag(),
                labelled,
                correct,
                top1: top1(s, v),
            });
        }
    }
    let mean_corrupted = (0..c.series.len())
        .map(|s| {
            let accs: Vec<f64> = variants
                .iter()
                .filter(|v| v.severity > 0)
                .filter_map(|&v| top1(s, v))
                .collect();
            (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64)
        })
        .collect();
    let source = c.series.iter().position(|s| s == "source" || s.starts_with("source ("));
    let (reference, gains) = gains(c, source, &variants);
    let live_reference = match source {
        Some(_) => Vec::new(),
        None => c
            .series
            .iter()
            .filter(|s| is_online(s) && gains.iter().any(|g| &g.series == *s))
            .cloned()
            .collect(),
    };
    Robustness {
        series: c.series.clone(),
        variants: variants.iter().map(|v| v.tag()).collect(),
        cells,
        mean_corrupted,
        reference,
        live_reference,
        gains,
        bootstrap: bootstrap::SPEC,
    }
}

fn gains(c: &Committed, source: Option<usize>, variants: &[Variant]) -> (String, Vec<Gain>) {
    // The reference's correctness per image, when a source series exists.
    let reference: BTreeMap<(usize, &str, Variant), bool> = c
        .predictions
        .iter()
        .filter(|r| Some(r.series) == source)
        .filter_map(|r| Some(((r.shard, r.key.as_str(), r.variant), correct(r)?)))
        .collect();
    // Per (series, variant or None for all corrupted), the differences by image.
    let mut diffs: BTreeMap<(usize, Option<Variant>), ByImage> = BTreeMap::new();
    for r in c.predictions.iter().filter(|r| Some(r.series) != source) {
        let Some(after) = correct(r) else { continue };
        let before = match source {
            Some(_) => reference.get(&(r.shard, r.key.as_str(), r.variant)).copied(),
            None => r.pred_before.zip(r.label).map(|(p, l)| p == l),
        };
        let Some(before) = before else { continue };
        let d = after as i32 as f64 - before as i32 as f64;
        diffs
            .entry((r.series, Some(r.variant)))
            .or_default()
            .push(r.shard, &r.key, d);
        if r.variant.severity > 0 {
            diffs.entry((r.series, None)).or_default().push(r.shard, &r.key, d);
        }
    }
    let mut out = Vec::new();
    for (s, name) in c.series.iter().enumerate() {
        let rows = variants.iter().map(|&v| (Some(v), v.tag())).chain(
            variants
                .iter()
                .any(|v| v.severity > 0)
                .then(|| (None, ALL_CORRUPTED.to_string())),
        );
        for (v, tag) in rows {
            let Some(d) = diffs.get(&(s, v)) else { continue };
            if let Some(interval) = bootstrap::clustered(&d.diffs, bootstrap::SPEC) {
                out.push(Gain {
                    series: name.clone(),
                    variant: tag,
                    pairs: d.diffs.iter().map(Vec::len).sum(),
                    images: d.diffs.len(),
                    interval,
                });
            }
        }
    }
    let reference = source.map_or("before adaptation".to_string(), |s| c.series[s].clone());
    (reference, out)
}

fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{:.1}%", 100.0 * x))
}

pub fn render(r: &Robustness) -> String {
    let mut h = String::new();
    if r.cells.is_empty() {
        return "<p>No committed predictions.</p>".into();
    }
    let corrupted = r.variants.iter().filter(|v| *v != "clean").count();
    let mut cols = r.variants.clone();
    if corrupted > 0 {
        cols.push("mean corrupted".into());
    }
    let values: Vec<Vec<Option<f64>>> = r
        .series
        .iter()
        .enumerate()
        .map(|(s, name)| {
            let mut row: Vec<Option<f64>> = r
                .variants
                .iter()
                .map(|v| {
                    r.cells
                        .iter()
                        .find(|c| &c.series == name && &c.variant == v)
                        .and_then(|c| c.top1)
                })
                .collect();
            if corrupted > 0 {
                row.push(r.mean_corrupted[s]);
            }
            row
        })
        .collect();
    let mut caption = format!(
        "Top-1 accuracy after adaptation (%), one row per method and one column per variant ({} variant(s), {} corrupted){}. ",
        r.variants.len(),
        corrupted,
        if corrupted > 0 { "; the last column is the mean over the corrupted variants" } else { "" }
    );
    let mut ranked: Vec<(usize, f64)> = r
        .mean_corrupted
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((i, (*m)?)))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    if !ranked.is_empty() {
        let list: Vec<String> = ranked
            .iter()
            .map(|(i, m)| format!("{} {}", r.series[*i], pct(Some(*m))))
            .collect();
        let _ = write!(
            caption,
            "Mean over corrupted variants, best first: {}.",
            list.join(", ")
        );
    } else {
        let list: Vec<String> = r
            .cells
            .iter()
            .map(|c| format!("{} {} {}", c.series, c.variant, pct(c.top1)))
            .collect();
        let _ = write!(caption, "Values: {}.", list.join(", "));
    }
    figure(
        &mut h,
        &svg::heatmap(&r.series, &cols, &values, "top-1 by method and variant"),
        &caption,
    );

    h.push_str("<h3>Gain over the reference</h3>");
    let gained: Vec<&String> = r
        .series
        .iter()
        .filter(|s| r.gains.iter().any(|g| &g.series == *s))
        .collect();
    if gained.is_empty() {
        h.push_str("<p>No method to compare with the reference: gains need labelled rows of a second method.</p>");
        return h;
    }
    let live = |series: &str| r.live_reference.iter().any(|s| s == series);
    let live_note = (!r.live_reference.is_empty()).then(|| {
        format!(
            "No source series given, so there is no unadapted reference for the online method(s) {}: \
             their gains are against the live stream's pred_before (the adapting model's own prediction \
             before its update on that image or batch), not against the classifier unadapted.",
            r.live_reference.join(", ")
        )
    });
    if let Some(note) = &live_note {
        let _ = write!(h, "<p class=\"caption\">{}</p>", esc(note));
    }
    let mut rows: Vec<String> = r.variants.clone();
    if corrupted > 0 {
        rows.push(ALL_CORRUPTED.into());
    }
    let series: Vec<(usize, String, Vec<Option<Interval>>)> = gained
        .iter()
        .map(|name| {
            let s = r.series.iter().position(|x| x == *name).unwrap_or(0);
            let ivs = rows
                .iter()
                .map(|v| {
                    r.gains
                        .iter()
                        .find(|g| &g.series == *name && &g.variant == v)
                        .map(|g| g.interval)
                })
                .collect();
            (s, (*name).clone(), ivs)
        })
        .collect();
    let pooled: Vec<String> = r
        .gains
        .iter()
        .filter(|g| g.variant == ALL_CORRUPTED || (corrupted == 0 && g.variant == "clean"))
        .map(|g| {
            format!(
                "{}{} {:+.1} points [{:+.1}, {:+.1}] over {} pairs of {} images",
                g.series,
                if live(&g.series) {
                    " (against the live stream's pred_before: no source series given)"
                } else {
                    ""
                },
                100.0 * g.interval.mean,
                100.0 * g.interval.low,
                100.0 * g.interval.high,
                g.pairs,
                g.images
            )
        })
        .collect();
    let reference = match r.reference.as_str() {
        "before adaptation" => "each row's own prediction before adaptation (pred_before)",
        other => other,
    };
    let caption =
        format!(
        "Top-1 gain over {} in percentage points, per variant: dot the mean paired difference, whiskers its {:.0}% \
         percentile interval ({}; {} resamples, seed {}). An interval that excludes the dashed zero line is a gain \
         (or loss) unlikely to be resampling noise. {}: {}.{}",
        reference,
        100.0 * r.bootstrap.level,
        r.bootstrap.unit,
        r.bootstrap.resamples,
        r.bootstrap.seed,
        if corrupted > 0 { "Over all corrupted variants" } else { "Overall" },
        if pooled.is_empty() { "n/a".to_string() } else { pooled.join("; ") },
        live_note.map_or(String::new(), |n| format!(" {n}"))
    );
    let chart = svg::intervals(&rows, &series, &Axis::percent("top-1 gain"), "gain over the reference");
    figure(&mut h, &chart, &caption);
    h
}

/// A chart with its caption; the caption is escaped here.
pub fn figure(h: &mut String, chart: &str, caption: &str) {
    let _ = write!(h, "<figure>{chart}<figcaption>{}</figcaption></figure>", esc(caption));
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORRUPTED: [&str; 6] = [
        "gaussian_noise/1",
        "gaussian_noise/5",
        "contrast/1",
        "contrast/5",
        "fog/3",
        "motion_blur/3",
    ];

    fn row(series: usize, key: usize, variant: &str, before: bool, after: bool) -> PredRow {
        PredRow {
            series,
            shard: key % 2,
            key: format!("k{key:04}"),
            variant: variant.parse().unwrap(),
            label: Some(3),
            pred_before: Some(if before { 3 } else { 4 }),
            conf_before: Some(0.5),
            pred_after: Some(if after { 3 } else { 4 }),
            conf_after: Some(0.5),
            adapt_ms: 1.0,
            denoiser_evals: None,
        }
    }

    /// 120 images under clean and 6 corrupted variants. `source` gets every image right
    /// under clean only; the method fixes 3 images in 5 under every corrupted variant
    /// (the easy ones), breaks 1 in 10 (of the rest) everywhere: image-level effects,
    /// as real gains are.
    fn committed(series: &[&str]) -> Committed {
        let mut c = Committed {
            series: series.iter().map(|s| s.to_string()).collect(),
            ..Committed::default()
        };
        for s in 0..series.len() {
            let is_source = series[s] == "source";
            for key in 0..120 {
                let easy = key % 5 < 3;
                let broken = !easy && key % 10 == 9;
                for (v, variant) in std::iter::once("clean").chain(CORRUPTED).enumerate() {
                    let before = v == 0 || (key + v) % 7 == 0;
                    let after = if is_source { before } else { (easy || before) && !broken };
                    c.predictions.push(row(s, key, variant, before, after));
                }
            }
        }
        c
    }

    fn gain<'a>(r: &'a Robustness, series: &str, variant: &str) -> &'a Gain {
        r.gains
            .iter()
            .find(|g| g.series == series && g.variant == variant)
            .unwrap()
    }

    #[test]
    fn the_pooled_interval_resamples_images_with_all_their_variants() {
        let c = committed(&["diffusion-tta", "source"]);
        let r = compute(&c);
        assert_eq!(r.reference, "source");
        assert!(r.live_reference.is_empty());

        // By hand: each image's differences under the 6 corrupted variants, one cluster.
        let ok = |s: usize, key: usize, v: &str| {
            let p = c
                .predictions
                .iter()
                .find(|p| p.series == s && p.key == format!("k{key:04}") && p.variant.tag() == v)
                .unwrap();
            (p.pred_after == p.label) as i32 as f64
        };
        let clusters: Vec<Vec<f64>> = (0..120)
            .map(|key| CORRUPTED.iter().map(|v| ok(0, key, v) - ok(1, key, v)).collect())
            .collect();
        let pooled = gain(&r, "diffusion-tta", ALL_CORRUPTED);
        assert_eq!((pooled.pairs, pooled.images), (720, 120));
        assert_eq!(Some(pooled.interval), bootstrap::clustered(&clusters, bootstrap::SPEC));

        // The old interval, (image, variant) pairs resampled as independent, is too narrow.
        let flat: Vec<f64> = clusters.iter().flatten().copied().collect();
        let by_pair = bootstrap::paired(&flat, bootstrap::SPEC).unwrap();
        assert_eq!(by_pair.mean, pooled.interval.mean);
        let (wide, narrow) = (pooled.interval.high - pooled.interval.low, by_pair.high - by_pair.low);
        eprintln!("pooled interval width: by image {wide:.4}, by pair {narrow:.4}");
        assert!(
            wide > 1.5 * narrow,
            "by image {:?}, by pair {by_pair:?}",
            pooled.interval
        );

        // A per-variant row has one difference per image: the paired bootstrap as before.
        for v in CORRUPTED {
            let g = gain(&r, "diffusion-tta", v);
            let d: Vec<f64> = (0..120).map(|key| ok(0, key, v) - ok(1, key, v)).collect();
            assert_eq!((g.pairs, g.images), (120, 120));
            assert_eq!(Some(g.interval), bootstrap::paired(&d, bootstrap::SPEC), "{v}");
        }

        let page = render(&r);
        assert!(page.contains(&esc(bootstrap::UNIT)), "{page}");
        assert!(page.contains("over 720 pairs of 120 images"), "{page}");
        assert!(!page.contains("no source series given"), "{page}");
    }

    #[test]
    fn online_gains_without_a_source_series_claim_no_unadapted_reference() {
        let r = compute(&committed(&["tent", "diffusion-tta", "dusa-online (b)"]));
        assert_eq!(r.reference, "before adaptation");
        assert_eq!(r.live_reference, ["tent", "dusa-online (b)"]);
        let page = render(&r);
        assert!(
            page.contains("tent (against the live stream&#39;s pred_before: no source series given) +"),
            "{page}"
        );
        assert!(
            page.contains("no unadapted reference for the online method(s) tent, dusa-online (b)"),
            "{page}"
        );
        assert!(
            page.contains("dusa-online (b): their gains are against the live stream&#39;s pred_before (the adapting"),
            "{page}"
        );
        assert!(!page.contains("diffusion-tta (against"), "{page}");
        assert!(!page.contains("classifier, unadapted"), "{page}");

        // With a source series, every gain is against it.
        let r = compute(&committed(&["tent", "source"]));
        assert!(r.live_reference.is_empty());
        assert!(!render(&r).contains("no source series given"));
    }

    #[test]
    fn online_methods_are_those_whose_method_column_says_so() {
        use crate::tta::{MethodName, Mode, TtaConfig};
        for method in [
            MethodName::Source,
            MethodName::Tent,
            MethodName::Eata,
            MethodName::Sar,
            MethodName::DiffusionClassifier,
            MethodName::DiffusionTta,
            MethodName::Dusa,
        ] {
            for mode in [Mode::Episodic, Mode::Online] {
                let cfg = TtaConfig {
                    method,
                    mode,
                    ..TtaConfig::default()
                };
                let online = matches!(method, MethodName::Tent | MethodName::Eata | MethodName::Sar)
                    || (mode == Mode::Online && matches!(method, MethodName::DiffusionTta | MethodName::Dusa));
                let label = cfg.method_column();
                assert_eq!(is_online(label), online, "{label}");
                assert_eq!(is_online(&format!("{label} (run-b)")), online, "{label}");
                assert_eq!(is_online(&format!("{label}-continual (run-b)")), online, "{label}");
            }
        }
    }
}
