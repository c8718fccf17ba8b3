//! Small SVG charts, written by hand: a heatmap, a scatter, lines with quantile bands,
//! an interval (forest) plot and a grouped histogram. Each returns one `<svg>` element
//! meant to be inlined in HTML: no scripts, no external references, no `xmlns` (inline
//! SVG in HTML needs none, and the page must hold no URL). Every text is escaped with
//! [`esc`]; the output is well-formed XML (tested below).
//!
//! Colours are the Okabe-Ito palette (distinguishable with colour-vision deficiencies);
//! a series keeps its colour across every chart of a page.

use std::fmt::Write;

use super::bootstrap::Interval;

const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

/// The colour of series `i`.
pub fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Text escaped for XML and HTML (element content and quoted attributes).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One axis: its title, whether it is logarithmic, whether values are fractions shown
/// as percentages.
#[derive(Debug, Clone)]
pub struct Axis {
    pub title: String,
    pub log: bool,
    pub percent: bool,
}

impl Axis {
    pub fn linear(title: &str) -> Axis {
        Axis {
            title: title.into(),
            log: false,
            percent: false,
        }
    }

    pub fn percent(title: &str) -> Axis {
        Axis {
            percent: true,
            ..Axis::linear(title)
        }
    }

    pub fn log(title: &str) -> Axis {
        Axis {
            log: true,
            ..Axis::linear(title)
        }
    }

    fn label(&self, v: f64) -> String {
        if self.percent {
            return format!("{}%", trim(100.0 * v));
        }
        trim(v)
    }
}

/// A number with at most 3 significant decimals and no trailing zeros.
fn trim(v: f64) -> String {
    let s = if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A value range mapped onto a pixel range.
#[derive(Debug, Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    from: f64,
    to: f64,
}

impl Scale {
    /// A scale over the data's range (padded, and with `ticks` at nice values).
    fn fit(values: impl Iterator<Item = f64>, axis: &Axis, from: f64, to: f64) -> (Scale, Vec<f64>) {
        let values: Vec<f64> = values.filter(|v| v.is_finite() && (!axis.log || *v > 0.0)).collect();
        let (mut lo, mut hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        if !lo.is_finite() {
            (lo, hi) = if axis.log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if axis.log {
            let (a, b) = (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0));
            let ticks = (a as i32..=b as i32).map(|e| 10f64.powi(e)).collect();
            let s = Scale {
                lo: 10f64.powf(a),
                hi: 10f64.powf(b),
                log: true,
                from,
                to,
            };
            return (s, ticks);
        }
        if hi - lo < 1e-9 {
            (lo, hi) = (lo - 0.5f64.max(lo.abs() * 0.1), hi + 0.5f64.max(hi.abs() * 0.1));
        }
        let step = nice_step((hi - lo) / 5.0);
        let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
        let n = ((hi - lo) / step).round() as usize;
        let ticks = (0..=n).map(|i| lo + i as f64 * step).collect();
        (
            Scale {
                lo,
                hi,
                log: false,
                from,
                to,
            },
            ticks,
        )
    }

    fn at(&self, v: f64) -> f64 {
        let t = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        self.from + t * (self.to - self.from)
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-12);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// Plot area margins: left leaves room for tick labels and the y title.
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 46.0;

fn open(out: &mut String, width: f64, height: f64, label: &str) {
    let _ = write!(
        out,
        r#"<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{}" font-size="12">"#,
        esc(label)
    );
}

/// Axes with ticks, grid lines and titles around the plot area.
fn axes(out: &mut String, x: (&Scale, &[f64], &Axis), y: (&Scale, &[f64], &Axis), width: f64, height: f64) {
    let (x0, x1, y0, y1) = (LEFT, width - RIGHT, height - BOTTOM, TOP);
    for &t in y.1 {
        let py = y.0.at(t);
        let _ = write!(
            out,
            r##"<line x1="{x0}" x2="{x1}" y1="{py:.1}" y2="{py:.1}" stroke="#e3e3e3"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            py + 4.0,
            esc(&y.2.label(t))
        );
    }
    for &t in x.1 {
        let px = x.0.at(t);
        let _ = write!(
            out,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{y0}" y2="{}" stroke="#999"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + 4.0,
            y0 + 17.0,
            esc(&x.2.label(t))
        );
    }
    let _ = write!(
        out,
        r##"<path d="M{x0} {y1}V{y0}H{x1}" fill="none" stroke="#555"/><text x="{:.1}" y="{}" text-anchor="middle">{}</text><text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        (x0 + x1) / 2.0,
        height - 8.0,
        esc(&x.2.title),
        (y0 + y1) / 2.0,
        esc(&y.2.title)
    );
}

/// A legend row at the top: a swatch and a name per series.
fn legend(out: &mut String, names: &[(usize, &str)]) {
    let mut x = LEFT;
    for (c, name) in names {
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="8" width="12" height="12" fill="{}"/><text x="{:.1}" y="18">{}</text>"#,
            colour(*c),
            x + 16.0,
            esc(name)
        );
        x += 28.0 + 7.0 * name.chars().count() as f64;
    }
}

/// A white-to-blue colour for `t` in 0..=1, and a text colour readable on it.
fn shade(t: f64) -> (String, &'static str) {
    let t = t.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    let fill = format!(
        "#{:02x}{:02x}{:02x}",
        mix(247.0, 8.0),
        mix(251.0, 48.0),
        mix(255.0, 107.0)
    );
    (fill, if t > 0.55 { "#fff" } else { "#111" })
}

/// A heatmap of fractions (shown as percentages with one decimal): one row per
/// `rows`, one column per `cols`, `None` for cells without data. Colours run from the
/// lowest to the highest value shown.
pub fn heatmap(rows: &[String], cols: &[String], cells: &[Vec<Option<f64>>], label: &str) -> String {
    let (cw, ch) = (58.0, 26.0);
    let row_w = 12.0 + 7.0 * rows.iter().map(|r| r.chars().count()).max().unwrap_or(4) as f64;
    let head_h = 8.0 + 6.5 * cols.iter().map(|c| c.chars().count()).max().unwrap_or(4).min(28) as f64;
    // Headers are rotated -40 degrees from their column's centre: the last one reaches
    // about cos(40) x its length past the grid, so the canvas leaves room for it.
    let overhang = 5.0 * cols.last().map_or(0, |c| c.chars().count().min(28)) as f64;
    let (width, height) = (
        row_w + cw * cols.len() as f64 + 8.0 + overhang,
        head_h + ch * rows.len() as f64 + 8.0,
    );
    let values: Vec<f64> = cells.iter().flatten().flatten().copied().collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut out = String::new();
    open(&mut out, width, height, label);
    for (j, c) in cols.iter().enumerate() {
        let x = row_w + cw * (j as f64 + 0.5);
        let _ = write!(
            out,
            r#"<text transform="translate({x:.1} {:.1}) rotate(-40)">{}</text>"#,
            head_h - 6.0,
            esc(c)
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y = head_h + ch * i as f64;
        let _ = write!(out, r#"<text x="4" y="{:.1}">{}</text>"#, y + 17.0, esc(r));
        for (j, v) in cells[i].iter().enumerate() {
            let x = row_w + cw * j as f64;
            let (fill, ink, text) = match v {
                Some(v) => {
                    let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
                    let (fill, ink) = shade(t);
                    (fill, ink, format!("{:.1}", 100.0 * v))
                }
                None => ("#eee".to_string(), "#777", "n/a".to_string()),
            };
            let _ = write!(
                out,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{cw}" height="{ch}" fill="{fill}" stroke="#fff"><title>{}, {}: {}</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{ink}">{text}</text>"##,
                esc(r),
                esc(&cols[j]),
                text,
                x + cw / 2.0,
                y + 17.0
            );
        }
    }
    out.push_str("</svg>");
    out
}

/// One point of a scatter: its series (for the colour) and a label written beside it.
#[derive(Debug, Clone)]
pub struct Point {
    pub series: usize,
    pub label: String,
    pub x: f64,
    pub y: f64,
}

/// A scatter with a labelled point per entry.
pub fn scatter(points: &[Point], x: &Axis, y: &Axis, label: &str) -> String {
    let (width, height) = (560.0, 340.0);
    let (xs, xt) = Scale::fit(points.iter().map(|p| p.x), x, LEFT, width - RIGHT - 90.0);
    let (ys, yt) = Scale::fit(points.iter().map(|p| p.y), y, height - BOTTOM, TOP);
    let mut out = String::new();
    open(&mut out, width, height, label);
    axes(&mut out, (&xs, &xt, x), (&ys, &yt, y), width, height);
    for p in points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()) {
        let (px, py) = (xs.at(p.x), ys.at(p.y));
        let _ = write!(
            out,
            r##"<circle cx="{px:.1}" cy="{py:.1}" r="5" fill="{}"><title>{}: {} , {}</title></circle><text x="{:.1}" y="{:.1}" fill="#333">{}</text>"##,
            colour(p.series),
            esc(&p.label),
            esc(&x.label(p.x)),
            esc(&y.label(p.y)),
            px + 8.0,
            py + 4.0,
            esc(&p.label)
        );
    }
    out.push_str("</svg>");
    out
}

/// One line of a line chart: a mean per x, with a band from `low` to `high`.
#[derive(Debug, Clone)]
pub struct Line {
    pub series: usize,
    pub name: String,
    /// (x, mean, low, high), in increasing x.
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// Lines with shaded bands (one per series) and a legend.
pub fn lines(lines: &[Line], x: &Axis, y: &Axis, label: &str) -> String {
    let (width, height) = (420.0, 280.0);
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let (xs, xt) = Scale::fit(all().map(|p| p.0), x, LEFT, width - RIGHT);
    let (ys, yt) = Scale::fit(all().flat_map(|p| [p.2, p.3]), y, height - BOTTOM, TOP);
    let mut out = String::new();
    open(&mut out, width, height, label);
    axes(&mut out, (&xs, &xt, x), (&ys, &yt, y), width, height);
    for l in lines {
        let c = colour(l.series);
        let upper: Vec<String> = l
            .points
            .iter()
            .map(|p| format!("{:.1} {:.1}", xs.at(p.0), ys.at(p.3)))
            .collect();
        let lower: Vec<String> = l
            .points
            .iter()
            .rev()
            .map(|p| format!("{:.1} {:.1}", xs.at(p.0), ys.at(p.2)))
            .collect();
        let mean: Vec<String> = l
            .points
            .iter()
            .map(|p| format!("{:.1} {:.1}", xs.at(p.0), ys.at(p.1)))
            .collect();
        if !upper.is_empty() {
            let _ = write!(
                out,
                r#"<path d="M{}L{}Z" fill="{c}" fill-opacity="0.15" stroke="none"/><path d="M{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                upper.join("L"),
                lower.join("L"),
                mean.join("L")
            );
        }
        for p in &l.points {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{c}"><title>{} step {}: {}</title></circle>"#,
                xs.at(p.0),
                ys.at(p.1),
                esc(&l.name),
                p.0,
                esc(&y.label(p.1))
            );
        }
    }
    let names: Vec<(usize, &str)> = lines.iter().map(|l| (l.series, l.name.as_str())).collect();
    legend(&mut out, &names);
    out.push_str("</svg>");
    out
}

/// An interval plot: one row per `rows` entry, one dot with whiskers per series in it,
/// and a dashed line at zero.
pub fn intervals(rows: &[String], series: &[(usize, String, Vec<Option<Interval>>)], x: &Axis, label: &str) -> String {
    let per = 10.0 * series.len().max(1) as f64;
    let row_h = per + 10.0;
    let row_w = 12.0 + 7.0 * rows.iter().map(|r| r.chars().count()).max().unwrap_or(4) as f64;
    let (width, height) = (row_w + 460.0, TOP + row_h * rows.len() as f64 + BOTTOM);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().flatten().flat_map(|i| [i.low, i.high]))
        .chain([0.0])
        .collect();
    let (xs, xt) = Scale::fit(all.into_iter(), x, row_w, width - RIGHT);
    let mut out = String::new();
    open(&mut out, width, height, label);
    let (y0, y1) = (height - BOTTOM, TOP);
    for &t in &xt {
        let px = xs.at(t);
        let _ = write!(
            out,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{y1}" y2="{y0}" stroke="#e3e3e3"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + 17.0,
            esc(&x.label(t))
        );
    }
    let zero = xs.at(0.0);
    let _ = write!(
        out,
        r##"<line x1="{zero:.1}" x2="{zero:.1}" y1="{y1}" y2="{y0}" stroke="#555" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
        (row_w + width - RIGHT) / 2.0,
        height - 8.0,
        esc(&x.title)
    );
    for (i, r) in rows.iter().enumerate() {
        let top = TOP + row_h * i as f64;
        let _ = write!(
            out,
            r#"<text x="4" y="{:.1}">{}</text>"#,
            top + row_h / 2.0 + 4.0,
            esc(r)
        );
        for (k, (c, name, ivs)) in series.iter().enumerate() {
            let Some(iv) = ivs.get(i).copied().flatten() else {
                continue;
            };
            let y = top + 10.0 + 10.0 * k as f64;
            let c = colour(*c);
            let _ = write!(
                out,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{c}" stroke-width="2"/><circle cx="{:.1}" cy="{y:.1}" r="4" fill="{c}"><title>{}, {}: {} [{}, {}]</title></circle>"#,
                xs.at(iv.low),
                xs.at(iv.high),
                xs.at(iv.mean),
                esc(name),
                esc(r),
                esc(&x.label(iv.mean)),
                esc(&x.label(iv.low)),
                esc(&x.label(iv.high))
            );
        }
    }
    let names: Vec<(usize, &str)> = series.iter().map(|s| (s.0, s.1.as_str())).collect();
    legend(&mut out, &names);
    out.push_str("</svg>");
    out
}

/// A histogram over bins `edges[i]..edges[i + 1]`: per bin, one bar per series side by
/// side, as shares of that series' total.
pub fn histogram(edges: &[f64], series: &[(usize, String, Vec<u64>)], x: &Axis, label: &str) -> String {
    let (width, height) = (560.0, 280.0);
    let shares: Vec<Vec<f64>> = series
        .iter()
        .map(|s| {
            let total = s.2.iter().sum::<u64>().max(1) as f64;
            s.2.iter().map(|&n| n as f64 / total).collect()
        })
        .collect();
    let y = Axis::percent("share of images");
    let (xs, xt) = Scale::fit(edges.iter().copied(), x, LEFT, width - RIGHT);
    let (ys, yt) = Scale::fit(shares.iter().flatten().copied().chain([0.0]), &y, height - BOTTOM, TOP);
    let mut out = String::new();
    open(&mut out, width, height, label);
    axes(&mut out, (&xs, &xt, x), (&ys, &yt, &y), width, height);
    let k = series.len().max(1) as f64;
    for (s, (c, name, _)) in series.iter().enumerate() {
        for (b, share) in shares[s].iter().enumerate() {
            let (a, z) = (xs.at(edges[b]), xs.at(edges[b + 1]));
            let w = (z - a - 2.0).max(1.0) / k;
            let (top, base) = (ys.at(*share), ys.at(0.0));
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{top:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{}, {}-{}: {}</title></rect>"#,
                a + 1.0 + w * s as f64,
                (base - top).max(0.0),
                colour(*c),
                esc(name),
                esc(&x.label(edges[b])),
                esc(&x.label(edges[b + 1])),
                esc(&y.label(*share))
            );
        }
    }
    let names: Vec<(usize, &str)> = series.iter().map(|s| (s.0, s.1.as_str())).collect();
    legend(&mut out, &names);
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `svg` as XML: every element closed, attributes quoted, entities known.
    /// Returns the element names in document order.
    fn elements(svg: &str) -> Vec<String> {
        let mut reader = quick_xml::Reader::from_str(svg);
        let mut names = Vec::new();
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Start(e)) | Ok(quick_xml::events::Event::Empty(e)) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    for attr in e.attributes() {
                        attr.unwrap_or_else(|err| panic!("bad attribute in {name}: {err}\n{svg}"));
                    }
                    names.push(name);
                }
                Ok(quick_xml::events::Event::Text(t)) => {
                    t.decode().unwrap_or_else(|err| panic!("bad text: {err}\n{svg}"));
                }
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(err) => panic!("not well-formed at {}: {err}\n{svg}", reader.error_position()),
            }
        }
        assert_eq!(names.first().map(String::as_str), Some("svg"));
        names
    }

    fn count(names: &[String], name: &str) -> usize {
        names.iter().filter(|n| *n == name).count()
    }

    #[test]
    fn heatmap_has_a_cell_per_value_and_escapes_names() {
        let rows = vec!["source".to_string(), "a<b & \"c\"".to_string()];
        let cols = vec!["clean".to_string(), "fog/3".to_string()];
        let cells = vec![vec![Some(0.9), None], vec![Some(0.5), Some(0.75)]];
        let svg = heatmap(&rows, &cols, &cells, "top-1 <by> method");
        let names = elements(&svg);
        assert_eq!(count(&names, "rect"), 4);
        assert!(svg.contains(">90.0<") && svg.contains(">n/a<") && svg.contains(">75.0<"));
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot;"));
        // The lowest value is the lightest cell, the highest the darkest.
        assert!(svg.contains(r##"fill="#f7fbff""##) && svg.contains(r##"fill="#08306b""##));
    }

    #[test]
    fn charts_are_well_formed_with_their_marks() {
        let x = Axis::log("ms per image");
        let y = Axis::percent("top-1");
        let points = [
            Point {
                series: 0,
                label: "source".into(),
                x: 0.4,
                y: 0.8,
            },
            Point {
                series: 1,
                label: "diffusion-tta".into(),
                x: 950.0,
                y: 0.86,
            },
        ];
        let names = elements(&scatter(&points, &x, &y, "cost"));
        assert_eq!(count(&names, "circle"), 2);

        let line = Line {
            series: 2,
            name: "tent".into(),
            points: vec![(0.0, 1.0, 0.5, 1.5), (1.0, 0.8, 0.4, 1.1), (2.0, 0.7, 0.3, 0.9)],
        };
        let names = elements(&lines(&[line], &Axis::linear("step"), &Axis::linear("loss"), "loss"));
        assert_eq!(count(&names, "circle"), 3);
        assert_eq!(count(&names, "path"), 3, "axes, band, mean line");

        let iv = |m, l, h| {
            Some(Interval {
                mean: m,
                low: l,
                high: h,
            })
        };
        let series = vec![
            (1, "tent".to_string(), vec![iv(0.02, -0.01, 0.05), None]),
            (2, "dtta".to_string(), vec![iv(0.1, 0.05, 0.15), iv(-0.2, -0.3, -0.1)]),
        ];
        let rows = vec!["clean".to_string(), "fog/3".to_string()];
        let names = elements(&intervals(&rows, &series, &Axis::percent("gain"), "gain"));
        assert_eq!(count(&names, "circle"), 3, "one per interval present");

        let edges: Vec<f64> = (0..=4).map(|i| i as f64 / 4.0).collect();
        let series = vec![
            (0, "before".to_string(), vec![1, 2, 3, 4]),
            (1, "after".to_string(), vec![0, 0, 5, 5]),
        ];
        let names = elements(&histogram(&edges, &series, &Axis::linear("confidence"), "hist"));
        assert_eq!(count(&names, "rect"), 8 + 2, "bars and legend swatches");
    }

    #[test]
    fn charts_without_data_are_still_well_formed() {
        elements(&scatter(&[], &Axis::log("ms"), &Axis::percent("top-1"), "empty"));
        elements(&lines(&[], &Axis::linear("step"), &Axis::linear("loss"), "empty"));
        elements(&intervals(&[], &[], &Axis::percent("gain"), "empty"));
        elements(&heatmap(&[], &[], &[], "empty"));
    }

    #[test]
    fn scales_pick_nice_ticks() {
        let round = |t: Vec<f64>| t.iter().map(|v| (v * 1e9).round() / 1e9).collect::<Vec<_>>();
        let (s, ticks) = Scale::fit([0.13, 0.87].into_iter(), &Axis::linear("x"), 0.0, 100.0);
        assert_eq!(round(ticks), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!((s.at(0.0), s.at(1.0)), (0.0, 100.0));
        let (s, ticks) = Scale::fit([0.4, 950.0].into_iter(), &Axis::log("x"), 0.0, 400.0);
        assert_eq!(round(ticks), vec![0.1, 1.0, 10.0, 100.0, 1000.0]);
        assert!((s.at(10.0) - 200.0).abs() < 1e-9);
        assert_eq!(trim(0.25), "0.25");
        assert_eq!(trim(12.0), "12");
        assert_eq!(Axis::percent("p").label(0.125), "12.5%");
    }
}
