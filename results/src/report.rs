//! A results store as one self-contained HTML file to hand on (`flawscope
//! report`, and the web page's "Report" button): each row's overlay
//! thumbnail, verdict and decision, the threshold and what it costs, and a
//! histogram of the scores against the threshold. Everything is inline (CSS,
//! a few lines of script, the histogram as SVG, images as `data:` URIs), so
//! the file opens offline and fetches nothing.

use std::fmt::Write as _;
use std::io::Cursor;
use std::path::Path;

use flawscope_core::images::{ImageLimits, load_image};
use serde_json::Value;

use crate::rows::{Decision, StoredResult, Verdict};
use crate::store::Store;
use crate::store::StoreError;

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 160;

/// Rows a report lists at most (the worst first); the count left out is
/// said in the report.
pub const MAX_ROWS: usize = 5_000;

/// Histogram bins over the 0–1 score.
const BINS: usize = 20;

/// Where a report's thumbnails come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thumbnails {
    /// Read each row's image file (`flawscope report`, on the machine that
    /// scored them).
    FromFiles,
    /// None (the server's report: it reads no files a row names).
    None,
}

/// A row with what the report shows of it.
struct Line<'a> {
    row: &'a StoredResult,
    /// The kept inspection, when the row has one.
    inspection: Option<Value>,
    thumbnail: Option<String>,
}

/// The store's rows as one HTML document.
pub fn render(store: &Store, thumbnails: Thumbnails) -> Result<String, StoreError> {
    let mut rows = store.all_results()?;
    rows.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.path.cmp(&b.path)));
    let left_out = rows.len().saturating_sub(MAX_ROWS);
    rows.truncate(MAX_ROWS);
    let person = store.person_threshold()?;
    let lines: Vec<Line> = rows
        .iter()
        .map(|row| {
            let inspection = row
                .inspection
                .as_deref()
                .and_then(|t| serde_json::from_str::<Value>(t).ok());
            let thumbnail = match thumbnails {
                Thumbnails::FromFiles => thumbnail(&row.path),
                Thumbnails::None => None,
            };
            Line {
                row,
                inspection,
                thumbnail,
            }
        })
        .collect();
    Ok(document(store.path(), &lines, person, left_out))
}

/// The image at `path` shrunk to [`THUMBNAIL_SIDE`], as a PNG `data:` URI;
/// `None` when it cannot be read (moved, an upload, not an image).
fn thumbnail(path: &Path) -> Option<String> {
    let image = load_image(path, &ImageLimits::default()).ok()?;
    let rgb = image::DynamicImage::ImageRgb32F(image).to_rgb8();
    let small = image::imageops::thumbnail(
        &rgb,
        THUMBNAIL_SIDE.min(rgb.width()),
        ((u64::from(rgb.height()) * u64::from(THUMBNAIL_SIDE.min(rgb.width())))
            / u64::from(rgb.width().max(1)))
        .max(1) as u32,
    );
    let mut png = Cursor::new(Vec::new());
    small.write_to(&mut png, image::ImageFormat::Png).ok()?;
    Some(format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png.get_ref())
    ))
}

/// `<`, `>`, `&` and quotes escaped for HTML text and attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A rate for a line operator: "1 in 4 normal parts" rather than "26 %".
pub fn one_in(rate: f64) -> String {
    if !rate.is_finite() || rate <= 0.0 {
        return "none".to_owned();
    }
    if rate >= 0.5 {
        return format!("{:.0} in 10", (rate * 10.0).round());
    }
    format!("1 in {:.0}", (1.0 / rate).round())
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

/// What the threshold of `inspection` costs, in an operator's words.
fn costs(inspection: &Value) -> Option<String> {
    let point = inspection.get("operating_point")?;
    let n = point.get("normal_images")?.as_u64()?;
    if n == 0 {
        return Some(
            "uncalibrated: no false-alarm rate has been measured for this threshold".to_owned(),
        );
    }
    let far = point.get("estimated_false_alarm_rate")?.as_f64()?;
    let bound = point.get("false_alarm_upper_bound_95")?.as_f64()?;
    let mut text = format!(
        "about {} of normal parts flagged; {} normal parts could be flagged, at worst, judging \
         from {n} normal images",
        percent(far),
        one_in(bound)
    );
    if let Some(mar) = point
        .get("synthetic_missed_alarm_rate")
        .and_then(Value::as_f64)
    {
        let _ = write!(text, "; about {} of synthetic defects missed", percent(mar));
    }
    Some(text)
}

fn decision_text(d: Decision) -> &'static str {
    match d {
        Decision::Ok => "OK",
        Decision::Ng => "NG",
        Decision::None => "—",
    }
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::Anomalous => "Anomalous",
        Verdict::Ok => "Normal",
    }
}

/// The scores against the threshold, as inline SVG: one bar per bin,
/// stacked by decision (NG, OK, undecided), and the threshold line.
fn histogram(lines: &[Line], threshold: Option<f32>) -> String {
    let mut counts = [[0usize; 3]; BINS];
    for line in lines {
        let score = line.row.score.clamp(0.0, 1.0);
        let bin = ((score * BINS as f32) as usize).min(BINS - 1);
        let kind = match line.row.decision {
            Decision::Ng => 0,
            Decision::Ok => 1,
            Decision::None => 2,
        };
        counts[bin][kind] += 1;
    }
    let tallest = counts
        .iter()
        .map(|c| c.iter().sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let (width, height, bar) = (600.0, 160.0, 600.0 / BINS as f64);
    let mut svg = format!(
        "<svg id=\"histogram\" viewBox=\"0 0 {width} {}\" width=\"{width}\" height=\"{}\" \
         role=\"img\" aria-label=\"Histogram of the scores with the threshold\">",
        height + 24.0,
        height + 24.0
    );
    let colours = ["#a50e0e", "#1e6b34", "#8a919c"];
    for (i, c) in counts.iter().enumerate() {
        let mut top = height;
        for (kind, count) in c.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let h = height * *count as f64 / tallest as f64;
            top -= h;
            let _ = write!(
                svg,
                "<rect class=\"bin\" x=\"{:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{h:.1}\" \
                 fill=\"{}\"><title>{count} image(s), score {:.2}–{:.2}</title></rect>",
                i as f64 * bar + 1.0,
                bar - 2.0,
                colours[kind],
                i as f64 / BINS as f64,
                (i + 1) as f64 / BINS as f64
            );
        }
    }
    if let Some(t) = threshold {
        let x = f64::from(t.clamp(0.0, 1.0)) * width;
        let _ = write!(
            svg,
            "<line id=\"threshold\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"0\" y2=\"{height}\" \
             stroke=\"#0b57d0\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"12\" font-size=\"12\" \
             fill=\"#0b57d0\">threshold {t:.2}</text>",
            (x + 4.0).min(width - 90.0)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"{}\" font-size=\"12\">0</text><text x=\"{}\" y=\"{}\" \
         font-size=\"12\">score 1</text></svg>",
        height + 16.0,
        width - 48.0,
        height + 16.0
    );
    svg
}

/// A thumbnail with the kept inspection's regions outlined over it.
fn picture(line: &Line) -> String {
    let Some(uri) = &line.thumbnail else {
        return "<span class=\"noimg\">image not at hand</span>".to_owned();
    };
    let size = line.inspection.as_ref().and_then(|v| {
        Some((
            v.get("width")?.as_f64()?.max(1.0),
            v.get("height")?.as_f64()?.max(1.0),
        ))
    });
    let Some((w, h)) = size else {
        return format!("<img src=\"{uri}\" alt=\"\">");
    };
    let mut svg = format!(
        "<svg class=\"thumb\" viewBox=\"0 0 {w} {h}\" width=\"{THUMBNAIL_SIDE}\" \
         preserveAspectRatio=\"xMinYMin meet\"><image href=\"{uri}\" width=\"{w}\" height=\"{h}\"/>"
    );
    let regions = line
        .inspection
        .as_ref()
        .and_then(|v| v.get("regions"))
        .and_then(Value::as_array);
    for r in regions.into_iter().flatten() {
        let get = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let _ = write!(
            svg,
            "<rect class=\"region\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" \
             stroke=\"#ff2d2d\" stroke-width=\"{:.1}\"/>",
            get("x"),
            get("y"),
            get("w").max(1.0),
            get("h").max(1.0),
            (w.max(h) / 80.0).max(1.0)
        );
    }
    svg.push_str("</svg>");
    svg
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;color:#1a1a1a;margin:16px}\
table{border-collapse:collapse}th,td{border:1px solid #c9ced6;padding:4px 8px;text-align:left;\
vertical-align:top}th{background:#eef0f3}.Anomalous{color:#a50e0e;font-weight:700}\
.Normal{color:#1e6b34;font-weight:700}.noimg{color:#5f6368;font-size:12px}\
.thumb{display:block}#filter{margin:8px 0}";

const SCRIPT: &str = "document.getElementById('filter').addEventListener('change',function(e){\
var v=e.target.value;document.querySelectorAll('tr.row').forEach(function(r){\
r.hidden=v!=='all'&&r.dataset.verdict!==v;});});";

fn document(db: &Path, lines: &[Line], person: Option<f32>, left_out: usize) -> String {
    let threshold = lines.first().map(|l| l.row.threshold);
    let anomalous = lines
        .iter()
        .filter(|l| l.row.verdict == Verdict::Anomalous)
        .count();
    let count = |d: Decision| lines.iter().filter(|l| l.row.decision == d).count();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\
         <title>flawscope report: {}</title><style>{STYLE}</style></head><body>\
         <h1>flawscope report</h1><p>Results store <code>{}</code>: {} image(s), {anomalous} \
         anomalous; decisions: {} OK, {} NG, {} undecided.</p>",
        escape(&db.display().to_string()),
        escape(&db.display().to_string()),
        lines.len(),
        count(Decision::Ok),
        count(Decision::Ng),
        count(Decision::None),
    );
    if left_out > 0 {
        let _ = write!(
            html,
            "<p>{left_out} lower-scoring rows are left out (at most {MAX_ROWS} listed).</p>"
        );
    }
    // The threshold and its cost, per model.
    html.push_str("<h2>Threshold and what it costs</h2><ul id=\"thresholds\">");
    let mut models: Vec<&str> = lines.iter().map(|l| l.row.model.as_str()).collect();
    models.sort_unstable();
    models.dedup();
    for model in &models {
        let first = lines.iter().find(|l| l.row.model == *model);
        let cost = first
            .and_then(|l| l.inspection.as_ref())
            .and_then(costs)
            .unwrap_or_else(|| "no estimates kept with these rows".to_owned());
        let _ = write!(
            html,
            "<li><b>{}</b>: threshold {:.2}; {}.</li>",
            escape(model),
            first.map_or(0.0, |l| l.row.threshold),
            escape(&cost)
        );
    }
    if let Some(p) = person {
        let _ = write!(
            html,
            "<li>A person moved the threshold to {p:.2} in the triage screen; the column \
             \"at {p:.2}\" gives the verdict there.</li>"
        );
    }
    html.push_str("</ul><h2>Scores against the threshold</h2>");
    html.push_str(&histogram(lines, person.or(threshold)));
    html.push_str(
        "<p>Bars: red NG, green OK, grey undecided (by a person's decision).</p>\
         <h2>Images, worst first</h2><label>Show <select id=\"filter\">\
         <option value=\"all\">all</option><option value=\"Anomalous\">anomalous</option>\
         <option value=\"Normal\">normal</option></select></label>\
         <table id=\"rows\"><thead><tr><th>Image</th><th>Path</th><th>Model</th><th>Score</th>\
         <th>Threshold</th><th>Verdict</th>",
    );
    if let Some(p) = person {
        let _ = write!(html, "<th>At {p:.2}</th>");
    }
    html.push_str("<th>Decision</th><th>Decided</th></tr></thead><tbody>");
    for line in lines {
        let row = line.row;
        let verdict = verdict_text(row.verdict);
        let _ = write!(
            html,
            "<tr class=\"row\" data-verdict=\"{verdict}\"><td>{}</td><td>{}</td><td>{}</td>\
             <td>{:.3}</td><td>{:.2}</td><td class=\"{verdict}\">{verdict}</td>",
            picture(line),
            escape(&row.path.display().to_string()),
            escape(&row.model),
            row.score,
            row.threshold,
        );
        if let Some(p) = person {
            let _ = write!(html, "<td>{}</td>", verdict_text(row.verdict_at(p)));
        }
        let _ = write!(
            html,
            "<td>{}</td><td>{}</td></tr>",
            decision_text(row.decision),
            escape(row.decided_at.as_deref().unwrap_or(""))
        );
    }
    let _ = writeln!(
        html,
        "</tbody></table><script>{SCRIPT}</script></body></html>"
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_one_in_n() {
        assert_eq!(one_in(0.26), "1 in 4");
        assert_eq!(one_in(0.01), "1 in 100");
        assert_eq!(one_in(0.0), "none");
        assert_eq!(one_in(0.8), "8 in 10");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<img src=x onerror='a'>&\""),
            "&lt;img src=x onerror=&#39;a&#39;&gt;&amp;&quot;"
        );
    }
}
