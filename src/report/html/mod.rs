//! `dtta report`: one self-contained HTML page (inline SVG and CSS; no script, font,
//! image or style from anywhere else) over the committed shards below one or more output
//! URLs, and the same numbers as `_runs/report.json`.
//!
//! [`rows`] reads committed data only; each section computes its numbers from those rows
//! (a serde struct, the JSON) and renders them: [`facts`], [`robustness`] (matrix and
//! gains), [`cost`], [`dynamics`], [`relabelling`], [`dense`] (segmentation and depth
//! outputs). [`svg`] draws the charts and
//! [`bootstrap`] makes the gain intervals. Every chart has a caption that states its
//! numbers in words, so the page reads without the pictures.
//!
//! Invariant: the page names no URL (the static check in tests/report_browser.rs and
//! the browser's network log both hold it to that); output URLs appear as text only.

pub mod bootstrap;
pub mod cost;
pub mod dense;
pub mod dynamics;
pub mod facts;
pub mod relabelling;
pub mod robustness;
pub mod rows;
pub mod svg;

use std::fmt::Write;

use serde::Serialize;

use crate::sink::SinkError;
use crate::storage::Location;
use svg::esc;

/// Everything the page shows, as written to `_runs/report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dtta_version: &'static str,
    pub generated_at: String,
    /// Every output read (a parent of outputs counts as its children).
    pub outputs: Vec<String>,
    pub facts: facts::Facts,
    pub robustness: robustness::Robustness,
    pub cost: cost::Cost,
    pub dynamics: dynamics::Dynamics,
    pub relabelling: relabelling::Relabelling,
    /// Dense tasks: dataset-level mIoU or depth errors per method and variant (empty
    /// for classification outputs).
    pub dense: dense::Dense,
}

/// Reads the committed shards below `outs` as of `at` and computes every section.
pub async fn build(outs: &[Location], at: crate::sink::delta::At) -> Result<Report, SinkError> {
    let committed = rows::read(outs, at).await?;
    Ok(compute(&committed))
}

pub fn compute(c: &rows::Committed) -> Report {
    Report {
        dtta_version: env!("CARGO_PKG_VERSION"),
        generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        outputs: c.outputs.clone(),
        facts: facts::compute(c),
        robustness: robustness::compute(c),
        cost: cost::compute(c),
        dynamics: dynamics::compute(c),
        relabelling: relabelling::compute(c),
        dense: dense::compute(c),
    }
}

const CSS: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#1b1b1b;\
background:#fff;margin:0 auto;max-width:1180px;padding:12px 24px 48px}\
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}\
h3{font-size:15px;margin:18px 0 6px}\
.meta{color:#555;margin:0 0 8px}\
table{border-collapse:collapse;margin:6px 0 10px;font-size:12.5px}\
th,td{border-bottom:1px solid #e6e6e6;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f5f5f5;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
table.narrow{min-width:240px}\
.wide{overflow-x:auto;max-width:100%}\
code{font:12px ui-monospace,'DejaVu Sans Mono',monospace}\
figure{margin:8px 12px 14px 0;display:inline-block;vertical-align:top;max-width:100%}\
figure svg{display:block;max-width:100%;height:auto;font-family:inherit}\
figcaption,.caption{color:#444;font-size:12.5px;max-width:560px;margin-top:4px}\
.row{display:flex;flex-wrap:wrap}\
details{margin:4px 0}summary{cursor:pointer;color:#333}";

/// The page: a header, then one section per part of the report.
pub fn render(r: &Report) -> String {
    let mut h = String::with_capacity(64 << 10);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>dtta report: {}</title><style>{CSS}</style></head><body>\
         <h1>dtta report</h1><p class=\"meta\">{} &#183; generated {} by dtta {} from committed shards only</p>",
        esc(&r.outputs.join(", ")),
        esc(&r.outputs.join(", ")),
        esc(&r.generated_at),
        esc(r.dtta_version)
    );
    let sections: [(&str, &str, String); 5] = [
        ("facts", "Run facts", facts::render(&r.facts)),
        ("robustness", "Robustness", robustness::render(&r.robustness)),
        ("cost", "Cost", cost::render(&r.cost)),
        (
            "dynamics",
            "Adaptation dynamics",
            dynamics::render(&r.dynamics, &r.robustness.series),
        ),
        ("relabelling", "Relabelling", relabelling::render(&r.relabelling)),
    ];
    for (id, title, body) in sections {
        let _ = write!(h, "<section id=\"{id}\"><h2>{title}</h2>{body}</section>");
    }
    if !r.dense.rows.is_empty() {
        let _ = write!(
            h,
            "<section id=\"dense\"><h2>Dense tasks</h2>{}</section>",
            dense::render(&r.dense)
        );
    }
    h.push_str("</body></html>\n");
    h
}

/// Writes `_runs/report.json` below `out`; returns its display path.
pub async fn write_json(out: &Location, r: &Report) -> Result<String, SinkError> {
    let body = serde_json::to_vec_pretty(r).expect("reports serialize");
    super::summary::put(out, "_runs/report.json", body).await
}

/// Writes the page as `_runs/report.html` below `out`; returns its display path.
pub async fn write_html(out: &Location, page: String) -> Result<String, SinkError> {
    super::summary::put(out, "_runs/report.html", page.into_bytes()).await
}
