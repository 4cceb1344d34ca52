//! Drawing the [`App`]: header, progress gauge, the list, the heatmap
//! preview in coloured half-blocks, the score histogram and the help.

use flawscope_results::scoring::Preview;
use flawscope_results::store::{Decision, Verdict};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Gauge, Paragraph, Widget, Wrap};

use crate::app::{App, Mode, PreviewState, Row, decision_label};

/// Colours of the verdicts and decisions.
pub const ANOMALOUS: Color = Color::Red;
pub const NORMAL: Color = Color::Green;
pub const FAILED: Color = Color::Yellow;
pub const DECIDED_OK: Style = Style::new().fg(Color::Black).bg(Color::Green);
pub const DECIDED_NG: Style = Style::new().fg(Color::White).bg(Color::Red);
const SELECTED_BG: Color = Color::DarkGray;

/// The upper half block: its foreground paints the top pixel, its
/// background the bottom one.
pub const HALF_BLOCK: &str = "▀";

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let [header, gauge, body, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(area);
        render_header(self, header, buf);
        render_gauge(self, gauge, buf);
        let [list, right] = Layout::horizontal([
            Constraint::Length(list_width(self, body.width)),
            Constraint::Min(0),
        ])
        .areas(body);
        // A short terminal keeps a smaller histogram and more preview.
        let histogram_rows = if body.height < 30 { 7 } else { 9 };
        let [preview, histogram] =
            Layout::vertical([Constraint::Min(4), Constraint::Length(histogram_rows)]).areas(right);
        render_list(self, list, buf);
        render_preview(self, preview, buf);
        render_histogram(self, histogram, buf);
        render_footer(self, footer, buf);
        if self.mode() == Mode::Help {
            render_help(self, area, buf);
        }
    }
}

/// Below this many columns the list's columns are compact (`ANOM`, a
/// narrower "flagged by").
const COMPACT_BELOW: u16 = 120;

/// Characters a list line takes before the name.
fn list_prefix(app: &App, compact: bool) -> usize {
    let fixed = if compact { 16 } else { 24 };
    let defects = app.rows().iter().any(|r| !r.defects.is_empty());
    fixed
        + if defects {
            flagged_width(compact) + 2
        } else {
            0
        }
}

/// The list pane's width: as wide as its longest name needs, between 40 %
/// and 58 % of the screen, so names and the preview both get room.
fn list_width(app: &App, width: u16) -> u16 {
    let compact = width < COMPACT_BELOW;
    let longest = app
        .rows()
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(12);
    let wanted = (list_prefix(app, compact) + longest + 2).min(usize::from(u16::MAX)) as u16;
    let (min, max) = (width * 2 / 5, width * 58 / 100);
    wanted.clamp(min, max.max(min))
}

fn render_header(app: &App, area: Rect, buf: &mut Buffer) {
    let line = Line::from(vec![
        Span::from(" flawscope triage ").bold().reversed(),
        Span::from(format!(" {} ", app.info.folder)).bold(),
        Span::from(format!("· model {} ", app.info.model)),
        Span::from(format!("· db {}", app.info.db)).dark_gray(),
    ]);
    line.render(area, buf);
}

/// The gauge label; "done:" once the batch is over (the end-to-end test
/// waits for it).
pub fn progress_label(app: &App) -> String {
    let p = app.progress();
    if let Some(error) = &p.error {
        return format!("stopped: {error}");
    }
    let counts = format!(
        "{} scored · {} unchanged · {} failed",
        p.scored, p.unchanged, p.failed
    );
    match (p.done, p.total) {
        (Some(done), _) if done.cancelled => format!("stopped: {counts}"),
        (Some(_), total) => format!("done: {} images · {counts}", total.unwrap_or(0)),
        (None, Some(total)) => format!("{}: {}/{total} · {counts}", p.phase, p.processed()),
        (None, None) => format!("{}…", p.phase),
    }
}

fn render_gauge(app: &App, area: Rect, buf: &mut Buffer) {
    let p = app.progress();
    let colour = if p.error.is_some() {
        ANOMALOUS
    } else if p.done.is_some() {
        NORMAL
    } else {
        Color::Blue
    };
    Gauge::default()
        .ratio(if p.done.is_some() { 1.0 } else { p.ratio() })
        .label(progress_label(app))
        .gauge_style(Style::new().fg(colour).bg(Color::Black))
        .render(area, buf);
}

fn render_list(app: &App, area: Rect, buf: &mut Buffer) {
    let mut title = format!(
        " Images · {} · {} shown ",
        app.filter().label(),
        app.visible_len()
    );
    if !app.search().is_empty() {
        title.push_str(&format!("· /{} ", app.search()));
    }
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.height == 0 || inner.width == 0 {
        return;
    }
    if app.visible_len() == 0 {
        let text = if app.rows().is_empty() {
            "no image scored yet"
        } else {
            "no image matches the filter (f) or search (/)"
        };
        Paragraph::new(text).dark_gray().render(inner, buf);
        return;
    }
    let height = usize::from(inner.height);
    let selected = app.selected_position();
    let offset = list_offset(selected.unwrap_or(0), height, app.visible_len());
    let compact = buf.area.width < COMPACT_BELOW;
    let name_width = usize::from(inner.width).saturating_sub(list_prefix(app, compact));
    for (i, row) in app.visible().enumerate().skip(offset).take(height) {
        let y = inner.y + (i - offset) as u16;
        let line_area = Rect::new(inner.x, y, inner.width, 1);
        let is_selected = Some(i) == selected;
        if is_selected {
            buf.set_style(line_area, Style::new().bg(SELECTED_BG));
        }
        list_line(row, app.threshold(), is_selected, compact, name_width).render(line_area, buf);
    }
}

/// First shown row: keeps the selection near the middle once the list is
/// longer than the screen.
pub fn list_offset(selected: usize, height: usize, len: usize) -> usize {
    if height == 0 {
        return 0;
    }
    selected
        .saturating_sub(height / 2)
        .min(len.saturating_sub(height))
}

/// Width of the list's "flagged by" column (with typed defects).
const FLAGGED_BY_WIDTH: usize = 18;

fn flagged_width(compact: bool) -> usize {
    if compact { 10 } else { FLAGGED_BY_WIDTH }
}

/// `▶ 0.873  ANOMALOUS  NG  name`; with typed defects (`tui --prompt`) the
/// layers that flagged the image come after the verdict
/// (`ANOMALOUS model+crack  NG  name`). `compact` (a narrow terminal):
/// `▶ 0.873 ANOM NG name`. The name (a path in the folder) is elided in the
/// middle to `name_width`.
fn list_line(
    row: &Row,
    threshold: f32,
    selected: bool,
    compact: bool,
    name_width: usize,
) -> Line<'static> {
    let marker = if selected { "▶ " } else { "  " };
    let gap = if compact { " " } else { "  " };
    let (score, verdict) = match row.verdict(threshold) {
        Some(v) if compact => (
            format!("{:.3}", row.score.unwrap_or(0.0)),
            match v {
                Verdict::Anomalous => Span::from("ANOM").fg(ANOMALOUS),
                Verdict::Ok => Span::from("ok  ").fg(NORMAL),
            },
        ),
        Some(v) => (format!("{:.3}", row.score.unwrap_or(0.0)), verdict_span(v)),
        None if compact => ("  -  ".to_string(), Span::from("FAIL").fg(FAILED)),
        None => ("  -  ".to_string(), Span::from("FAILED   ").fg(FAILED)),
    };
    let mut spans = vec![
        Span::from(marker),
        Span::from(score),
        Span::from(gap),
        verdict,
        Span::from(gap),
    ];
    if !row.defects.is_empty() {
        let width = flagged_width(compact);
        let by: String = row.flagged_by(threshold).join("+");
        let mut by: String = by.chars().take(width).collect();
        while by.chars().count() < width {
            by.push(' ');
        }
        spans.push(Span::from(by).fg(ANOMALOUS));
        spans.push(Span::from(gap));
    }
    spans.extend([
        decision_span(row.decision),
        Span::from(gap),
        Span::from(crate::app::middle_elide(&row.name, name_width.max(8))),
    ]);
    let mut line = Line::from(spans);
    if selected {
        line = line.bold();
    }
    line
}

fn verdict_span(verdict: Verdict) -> Span<'static> {
    match verdict {
        Verdict::Anomalous => Span::from("ANOMALOUS").fg(ANOMALOUS),
        Verdict::Ok => Span::from("ok       ").fg(NORMAL),
    }
}

fn decision_span(decision: Decision) -> Span<'static> {
    match decision {
        Decision::None => Span::from("--").dark_gray(),
        Decision::Ok => Span::styled("OK", DECIDED_OK),
        Decision::Ng => Span::styled("NG", DECIDED_NG),
    }
}

fn render_preview(app: &App, area: Rect, buf: &mut Buffer) {
    let Some(row) = app.selected_row() else {
        let block = Block::bordered().title(" Preview ");
        let inner = block.inner(area);
        block.render(area, buf);
        Paragraph::new("no image selected")
            .dark_gray()
            .render(inner, buf);
        return;
    };
    let title_width = usize::from(area.width.saturating_sub(4));
    let block = Block::bordered().title(format!(
        " {} ",
        crate::app::middle_elide(&row.name, title_width)
    ));
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.height < 2 {
        return;
    }
    // A narrow pane wraps the details over more lines instead of cutting
    // them.
    let details_text = details_line(row, app.threshold());
    let needed = details_text
        .width()
        .div_ceil(usize::from(inner.width.max(1)));
    // Wrapping at words takes a line more than the bare count.
    let needed = if needed > 1 { needed + 1 } else { needed };
    let details_rows = (needed.clamp(1, 4) as u16).min(inner.height.saturating_sub(1).max(1));
    let [picture, details] =
        Layout::vertical([Constraint::Min(1), Constraint::Length(details_rows)]).areas(inner);
    Paragraph::new(details_text)
        .wrap(Wrap { trim: true })
        .render(details, buf);
    if let Some(error) = &row.error {
        Paragraph::new(error.as_str())
            .fg(FAILED)
            .wrap(Wrap { trim: true })
            .render(picture, buf);
        return;
    }
    match app.preview(&row.path) {
        Some(PreviewState::Ready(preview)) => render_half_blocks(preview, picture, buf),
        Some(PreviewState::Failed(error)) => Paragraph::new(format!("no preview: {error}"))
            .fg(FAILED)
            .wrap(Wrap { trim: true })
            .render(picture, buf),
        None => Paragraph::new("computing the heatmap…")
            .dark_gray()
            .render(picture, buf),
    }
}

fn details_line(row: &Row, threshold: f32) -> Line<'static> {
    let mut spans = Vec::new();
    if let (Some(score), Some(verdict)) = (row.score, row.verdict(threshold)) {
        spans.push(Span::from(format!("score {score:.3} ")));
        spans.push(verdict_span(verdict));
        spans.push(Span::from(format!(" at {threshold:.2} · ")));
        let by = row.flagged_by(threshold);
        if !row.defects.is_empty() {
            let checked: Vec<String> = row
                .defects
                .iter()
                .map(|d| format!("\"{}\" {:.2}", d.description, d.score))
                .collect();
            spans.push(Span::from(format!("{} · ", checked.join(", "))));
        }
        if !by.is_empty() {
            spans.push(Span::from(format!("flagged by {} · ", by.join(", "))).fg(ANOMALOUS));
        }
        spans.push(Span::from("decision "));
        spans.push(match row.decision {
            Decision::None => Span::from(decision_label(row.decision)).dark_gray(),
            d => decision_span(d),
        });
        spans.push(Span::from(format!(" · scored {}", row.scored_at)).dark_gray());
    } else {
        spans.push(Span::from("could not be scored").fg(FAILED));
    }
    Line::from(spans)
}

/// Draws a preview into `area`, two pixels per cell (`▀` with the top pixel
/// as foreground and the bottom one as background), aspect kept, centred.
pub fn render_half_blocks(preview: &Preview, area: Rect, buf: &mut Buffer) {
    if area.width == 0 || area.height == 0 || preview.width == 0 || preview.height == 0 {
        return;
    }
    let (pw, ph) = (f64::from(preview.width), f64::from(preview.height));
    // Terminal pixels: one per column, two per row.
    let scale = (f64::from(area.width) / pw).min(f64::from(area.height) * 2.0 / ph);
    let cols = ((pw * scale).floor() as u16).clamp(1, area.width);
    let pixel_rows = ((ph * scale).floor() as u32).max(1);
    let rows = (pixel_rows.div_ceil(2) as u16).clamp(1, area.height);
    let x0 = area.x + (area.width - cols) / 2;
    let y0 = area.y + (area.height - rows) / 2;
    let sample = |px: u32, py: u32| -> Color {
        let sx = ((f64::from(px) + 0.5) / scale) as u32;
        let sy = ((f64::from(py) + 0.5) / scale) as u32;
        let [r, g, b] = preview.get(sx, sy);
        Color::Rgb(r, g, b)
    };
    for cy in 0..rows {
        for cx in 0..cols {
            let top = u32::from(cy) * 2;
            let fg = sample(u32::from(cx), top);
            let bg = if top + 1 < pixel_rows {
                sample(u32::from(cx), top + 1)
            } else {
                Color::Reset
            };
            if let Some(cell) = buf.cell_mut((x0 + cx, y0 + cy)) {
                cell.set_symbol(HALF_BLOCK).set_fg(fg).set_bg(bg);
            }
        }
    }
}

/// Counts of scores in `bins` equal-width bins over `[0, 1]`.
pub fn histogram(scores: impl Iterator<Item = f32>, bins: usize) -> Vec<usize> {
    let mut counts = vec![0; bins];
    if bins == 0 {
        return counts;
    }
    for score in scores.filter(|s| s.is_finite()) {
        let bin = ((score.clamp(0.0, 1.0) * bins as f32) as usize).min(bins - 1);
        counts[bin] += 1;
    }
    counts
}

/// The column of a 0–1 value in a `width`-column histogram.
pub fn threshold_column(threshold: f32, width: u16) -> u16 {
    if width == 0 {
        return 0;
    }
    ((threshold.clamp(0.0, 1.0) * f32::from(width)) as u16).min(width - 1)
}

fn render_histogram(app: &App, area: Rect, buf: &mut Buffer) {
    let anomalous = app
        .scores()
        .filter(|&s| Verdict::at(s, app.threshold()).is_anomalous())
        .count();
    // What the threshold costs, from the model's calibration: moving it
    // with +/- is no longer blind.
    let costs = app.operating_point().map_or(String::new(), |p| {
        let missed = p.synthetic_missed_alarm_rate.map_or(String::new(), |m| {
            format!(", missed synthetic {:.0} %", 100.0 * m)
        });
        format!(
            " · est. false alarms {:.1} % (≤ {:.1} %){missed}",
            100.0 * p.estimated_false_alarm_rate,
            100.0 * p.false_alarm_upper_bound_95
        )
    });
    let legend = if app.calibration_view().is_some() {
        " · ░ normal calibration"
    } else {
        ""
    };
    let block = Block::bordered().title(format!(
        " Scores · threshold {:.2} (+/-) · {} anomalous{costs}{legend} ",
        app.threshold(),
        anomalous
    ));
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.height < 2 || inner.width < 4 {
        return;
    }
    let bars_height = inner.height - 1;
    let counts = histogram(app.scores(), usize::from(inner.width));
    let max = counts.iter().copied().max().unwrap_or(0).max(1);
    let marker = threshold_column(app.threshold(), inner.width);
    const EIGHTHS: [&str; 9] = [" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"];
    for (col, &count) in counts.iter().enumerate() {
        let x = inner.x + col as u16;
        // Height in eighths of a cell; any non-empty bin shows.
        let mut eighths = (count * usize::from(bars_height) * 8).div_ceil(max);
        let bin_centre = (col as f32 + 0.5) / f32::from(inner.width);
        let colour = if Verdict::at(bin_centre, app.threshold()).is_anomalous() {
            ANOMALOUS
        } else {
            NORMAL
        };
        for level in 0..bars_height {
            let y = inner.y + bars_height - 1 - level;
            let piece = eighths.min(8);
            eighths -= piece;
            if let Some(cell) = buf.cell_mut((x, y)) {
                if piece > 0 {
                    cell.set_symbol(EIGHTHS[piece]).set_fg(colour);
                } else if col as u16 == marker {
                    cell.set_symbol("│").set_fg(Color::Yellow);
                }
            }
        }
    }
    // Axis: 0 on the left, 1 on the right, ▲ under the threshold; on it
    // where the calibration's normal scores fall (░▒▓ by how many) and the
    // images marked NG at a refit (×), when the model keeps them.
    let axis_y = inner.y + bars_height;
    if let Some(view) = app.calibration_view() {
        let normal = histogram(view.normal.iter().copied(), usize::from(inner.width));
        let most = normal.iter().copied().max().unwrap_or(0).max(1);
        let labelled = histogram(view.labelled.iter().copied(), usize::from(inner.width));
        for col in 0..usize::from(inner.width) {
            let x = inner.x + col as u16;
            let (symbol, colour) = if labelled[col] > 0 {
                ("×", Color::Magenta)
            } else if normal[col] > 0 {
                let shade = ["░", "▒", "▓"][(normal[col] * 3).div_ceil(most).clamp(1, 3) - 1];
                (shade, Color::Gray)
            } else {
                continue;
            };
            buf.set_string(x, axis_y, symbol, Style::new().fg(colour));
        }
    }
    buf.set_string(inner.x, axis_y, "0", Style::new().dark_gray());
    buf.set_string(inner.right() - 1, axis_y, "1", Style::new().dark_gray());
    buf.set_string(
        inner.x + marker,
        axis_y,
        "▲",
        Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
    );
}

fn render_footer(app: &App, area: Rect, buf: &mut Buffer) {
    let line = if app.mode() == Mode::Search {
        Line::from(vec![
            Span::from(" search: /").bold(),
            Span::from(app.search().to_string()),
            Span::from("▏").slow_blink(),
            Span::from("  (Enter keeps it, Esc clears it)").dark_gray(),
        ])
    } else if let Some((text, is_error)) = app.message() {
        let span = Span::from(format!(" {text}"));
        Line::from(if is_error { span.fg(ANOMALOUS) } else { span })
    } else {
        Line::from(
            " ↑/↓ move · a OK · x NG · u undo · f filter · / search · +/- threshold · ? help · q quit",
        )
        .dark_gray()
    };
    line.render(area, buf);
}

/// The help text, one key per line.
pub const HELP: &[(&str, &str)] = &[
    ("↑ ↓  j k", "move; PgUp PgDn, Home End (g G) jump"),
    ("a", "mark the selected image OK, go to the next"),
    ("x", "mark the selected image NG, go to the next"),
    ("u", "undo the last decision"),
    ("f", "filter: all → anomalous → undecided"),
    ("/", "search file names (Enter keeps, Esc clears)"),
    ("+ -", "move the threshold by 0.01 (no rescoring)"),
    ("?", "this help (any key closes it)"),
    ("q", "quit (Ctrl-C too)"),
];

fn render_help(app: &App, area: Rect, buf: &mut Buffer) {
    let width = area.width.min(72);
    let height = area.height.min(HELP.len() as u16 + 7);
    let popup = Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height - height) / 2,
        width,
        height,
    );
    Clear.render(popup, buf);
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(keys, what)| {
            Line::from(vec![
                Span::from(format!(" {keys:<10}")).bold().fg(Color::Cyan),
                Span::from(*what),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from(format!(" Decisions are saved at once in {}", app.info.db)).dark_gray());
    lines.push(
        Line::from(" Reopening the folder resumes: unchanged images are not rescored.").dark_gray(),
    );
    Paragraph::new(lines)
        .block(Block::bordered().title(" Help · keys "))
        .wrap(Wrap { trim: false })
        .render(popup, buf);
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use flawscope_results::scoring::{BatchItem, BatchSummary};
    use flawscope_results::store::StoredResult;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

    use super::*;
    use crate::app::{Event, SessionInfo};

    fn result(name: &str, score: f32) -> StoredResult {
        StoredResult {
            inspection: None,
            path: PathBuf::from(format!("/imgs/{name}")),
            content_hash: format!("sha256:{name}"),
            model: "m".into(),
            model_identity: "sha256:m".into(),
            score,
            raw_score: score,
            threshold: 0.5,
            verdict: Verdict::at(score, 0.5),
            decision: Decision::None,
            decided_at: None,
            scored_at: "2025-01-01T00:00:00.000Z".into(),
            defects: Vec::new(),
        }
    }

    fn app() -> App {
        let mut app = App::new(
            SessionInfo {
                folder: "/imgs".into(),
                model: "cells.flawscope".into(),
                db: "/imgs/.flawscope-results.sqlite".into(),
            },
            0.5,
        );
        app.handle_event(Event::Files(3));
        for (name, score) in [("bad.png", 0.93), ("good.png", 0.12), ("edge.png", 0.55)] {
            app.handle_event(Event::Item(BatchItem::Scored(result(name, score), None)));
        }
        app
    }

    fn key(app: &mut App, code: KeyCode) {
        app.handle_event(Event::Key(KeyEvent::new(code, KeyModifiers::NONE)));
    }

    fn render(app: &App, width: u16, height: u16) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| frame.render_widget(app, frame.area()))
            .unwrap();
        terminal.backend().buffer().clone()
    }

    fn lines(buf: &Buffer) -> Vec<String> {
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    /// `(x, y)` of the first occurrence of `text`.
    fn find(buf: &Buffer, text: &str) -> Option<(u16, u16)> {
        lines(buf).iter().enumerate().find_map(|(y, line)| {
            line.find(text).map(|byte| {
                let x = line[..byte].chars().count();
                (x as u16, y as u16)
            })
        })
    }

    #[test]
    fn list_is_sorted_worst_first_with_scores_and_names() {
        let buf = render(&app(), 120, 30);
        let (_, y_bad) = find(&buf, "bad.png").unwrap();
        let (_, y_edge) = find(&buf, "edge.png").unwrap();
        let (_, y_good) = find(&buf, "good.png").unwrap();
        assert!(y_bad < y_edge && y_edge < y_good);
        let text = lines(&buf).join("\n");
        assert!(text.contains("0.930"), "{text}");
        assert!(text.contains("Images · all · 3 shown"), "{text}");
        assert!(!text.contains("done:"));
        assert!(text.contains("3/3"), "{text}");
        // The selection marker is on the worst image.
        let (x, _) = find(&buf, "▶ 0.930").unwrap();
        assert!(x < 5);
    }

    #[test]
    fn verdict_and_decision_colours() {
        let mut app = app();
        // Mark bad.png (selected, worst) NG; the selection moves to edge.png.
        key(&mut app, KeyCode::Char('x'));
        key(&mut app, KeyCode::Char('j'));
        key(&mut app, KeyCode::Char('a'));
        let buf = render(&app, 120, 30);
        let (x, y) = find(&buf, "ANOMALOUS  NG  bad.png").unwrap();
        assert_eq!(buf[(x, y)].fg, ANOMALOUS);
        let ng = buf[(x + 11, y)].clone();
        assert_eq!(ng.symbol(), "N");
        assert_eq!((ng.fg, ng.bg), (Color::White, Color::Red));
        let (x, y) = find(&buf, "ok         OK  good.png").unwrap();
        assert_eq!(buf[(x, y)].fg, NORMAL);
        let ok = buf[(x + 11, y)].clone();
        assert_eq!((ok.fg, ok.bg), (Color::Black, Color::Green));
        let (x, y) = find(&buf, "ANOMALOUS  --  edge.png").unwrap();
        assert_eq!(buf[(x, y)].fg, ANOMALOUS);

        // Raising the threshold past 0.55 turns edge.png green, no rescoring.
        for _ in 0..6 {
            key(&mut app, KeyCode::Char('+'));
        }
        let buf = render(&app, 120, 30);
        let (x, y) = find(&buf, "ok         --  edge.png").unwrap();
        assert_eq!(buf[(x, y)].fg, NORMAL);
        assert!(find(&buf, "threshold 0.56").is_some());
    }

    #[test]
    fn preview_draws_half_blocks_from_the_overlay() {
        let mut app = app();
        let preview = Preview {
            width: 4,
            height: 2,
            pixels: vec![
                [255, 0, 0],
                [255, 0, 0],
                [0, 0, 255],
                [0, 0, 255],
                [0, 255, 0],
                [0, 255, 0],
                [9, 9, 9],
                [9, 9, 9],
            ],
        };
        let text = lines(&render(&app, 120, 30)).join("\n");
        assert!(text.contains("computing the heatmap"), "{text}");
        app.handle_event(Event::Preview {
            path: PathBuf::from("/imgs/bad.png"),
            result: Ok(preview),
        });
        // The first height where each preview pixel spans an odd number
        // of half rows, so one cell holds two of them (the seam checked
        // below); the panes size themselves, so it is searched for.
        let blocks_of = |buf: &Buffer, height: u16| -> Vec<(u16, u16)> {
            (0..height)
                .flat_map(|y| (0..120).map(move |x| (x, y)))
                .filter(|&(x, y)| buf[(x, y)].symbol() == HALF_BLOCK)
                .collect()
        };
        let (buf, blocks) = (26..=44)
            .map(|h| {
                let buf = render(&app, 120, h);
                let blocks = blocks_of(&buf, h);
                (buf, blocks)
            })
            .find(|(buf, blocks)| {
                blocks.iter().any(|&(x, y)| {
                    buf[(x, y)].fg != buf[(x, y)].bg && buf[(x, y)].bg != Color::Reset
                })
            })
            .expect("no terminal height shows a preview seam");
        assert!(!blocks.is_empty());
        // Top left red, bottom left green, top right blue: each pixel of the
        // preview covers several cells, top pixel as foreground, bottom as
        // background.
        let top = blocks.iter().map(|b| b.1).min().unwrap();
        let bottom = blocks.iter().map(|b| b.1).max().unwrap();
        let left = blocks.iter().map(|b| b.0).min().unwrap();
        let right = blocks.iter().map(|b| b.0).max().unwrap();
        let cell = &buf[(left, top)];
        assert_eq!(
            (cell.fg, cell.bg),
            (Color::Rgb(255, 0, 0), Color::Rgb(255, 0, 0))
        );
        assert_eq!(buf[(left, bottom)].fg, Color::Rgb(0, 255, 0));
        assert_eq!(buf[(right, top)].fg, Color::Rgb(0, 0, 255));
        assert_eq!(buf[(right, bottom)].fg, Color::Rgb(9, 9, 9));
        // Where the two rows meet inside one cell: red over green.
        let seam = (top..=bottom)
            .find(|&y| buf[(left, y)].fg != buf[(left, y)].bg)
            .unwrap();
        assert_eq!(buf[(left, seam)].fg, Color::Rgb(255, 0, 0));
        assert_eq!(buf[(left, seam)].bg, Color::Rgb(0, 255, 0));
        // The picture keeps its 2:1 aspect: twice as many columns as rows.
        let xs: std::collections::BTreeSet<u16> = blocks.iter().map(|b| b.0).collect();
        let ys: std::collections::BTreeSet<u16> = blocks.iter().map(|b| b.1).collect();
        assert_eq!(xs.len(), ys.len() * 4);
        let text = lines(&buf).join("\n");
        assert!(text.contains("score 0.930 ANOMALOUS at 0.50"), "{text}");
    }

    #[test]
    fn help_lists_every_key() {
        let mut app = app();
        key(&mut app, KeyCode::Char('?'));
        let text = lines(&render(&app, 120, 30)).join("\n");
        assert!(text.contains("Help · keys"), "{text}");
        for (keys, what) in HELP {
            assert!(text.contains(keys), "{keys} missing:\n{text}");
            assert!(text.contains(what), "{what} missing:\n{text}");
        }
        assert!(text.contains("/imgs/.flawscope-results.sqlite"));
        key(&mut app, KeyCode::Esc);
        let text = lines(&render(&app, 120, 30)).join("\n");
        assert!(!text.contains("Help · keys"));
    }

    #[test]
    fn gauge_says_done_and_histogram_marks_the_threshold() {
        let mut app = app();
        app.handle_event(Event::Done(BatchSummary {
            scored: 3,
            ..BatchSummary::default()
        }));
        let buf = render(&app, 120, 30);
        let text = lines(&buf).join("\n");
        assert!(
            text.contains("done: 3 images · 3 scored · 0 unchanged · 0 failed"),
            "{text}"
        );
        let (x, y) = find(&buf, "▲").unwrap();
        assert_eq!(buf[(x, y)].fg, Color::Yellow);
        // One bar on each side of the marker, coloured by side.
        let bars: Vec<Color> = (0..120)
            .flat_map(|x| (0..30).map(move |y| (x, y)))
            .filter(|&p| buf[p].symbol() == "█")
            .map(|p| buf[p].fg)
            .collect();
        assert!(bars.contains(&NORMAL) && bars.contains(&ANOMALOUS));
    }

    #[test]
    fn tiny_and_empty_screens_do_not_panic() {
        let empty = App::new(SessionInfo::default(), 0.5);
        for (w, h) in [(1, 1), (10, 3), (20, 8), (200, 60)] {
            render(&empty, w, h);
            render(&app(), w, h);
        }
        let text = lines(&render(&empty, 80, 20)).join("\n");
        assert!(text.contains("no image scored yet"));
    }

    #[test]
    fn control_characters_in_names_never_reach_the_terminal() {
        let mut app = app();
        let evil = "evil\x1b]52;c;aGk=\x07\x1b[2J.png";
        app.handle_event(Event::Item(BatchItem::Scored(result(evil, 0.99), None)));
        let text = lines(&render(&app, 120, 30)).join("\n");
        assert!(text.contains("evil"), "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\x07'));
    }

    #[test]
    fn offsets_keep_the_selection_visible() {
        assert_eq!(list_offset(0, 10, 100), 0);
        assert_eq!(list_offset(50, 10, 100), 45);
        assert_eq!(list_offset(99, 10, 100), 90);
        assert_eq!(list_offset(3, 10, 5), 0);
        assert_eq!(
            histogram([0.0, 0.5, 1.0, 1.5, f32::NAN].into_iter(), 4),
            [1, 0, 1, 2]
        );
        assert_eq!(threshold_column(0.5, 10), 5);
        assert_eq!(threshold_column(1.0, 10), 9);
    }

    /// With typed defects (`tui --prompt`) the list says which layer flagged
    /// each image, and a defect over its threshold flags an image the model
    /// passes.
    #[test]
    fn typed_defects_show_which_layer_flagged() {
        let mut app = App::new(
            SessionInfo {
                folder: "/imgs".into(),
                model: "cells.flawscope + \"crack\"".into(),
                db: "/imgs/.flawscope-results.sqlite".into(),
            },
            0.5,
        );
        app.handle_event(Event::Files(3));
        let defect = |flagged: bool| flawscope_core::prompt_layer::DefectCheck {
            description: "crack".into(),
            score: if flagged { 0.8 } else { 0.1 },
            is_anomalous: flagged,
            estimated_false_alarm_rate: 0.05,
            ..Default::default()
        };
        for (name, score, flagged) in [
            ("both.png", 0.93, true),
            ("text.png", 0.12, true),
            ("none.png", 0.2, false),
        ] {
            let mut row = result(name, score);
            row.defects = vec![defect(flagged)];
            app.handle_event(Event::Item(BatchItem::Scored(row, None)));
        }
        let text = lines(&render(&app, 220, 30)).join("\n");
        let line = |name: &str| {
            text.lines()
                .find(|l| l.contains(name) && l.contains("0."))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .to_owned()
        };
        assert!(
            line("both.png").contains("ANOMALOUS  model+crack"),
            "{text}"
        );
        assert!(line("text.png").contains("ANOMALOUS  crack "), "{text}");
        assert!(line("none.png").contains("ok"), "{text}");
        assert!(!line("none.png").contains("crack"), "{text}");
        // The details of the selected image (the top score) name each
        // defect's score and the layers.
        assert!(text.contains("\"crack\" 0.80"), "{text}");
        assert!(text.contains("flagged by model, crack"), "{text}");
    }

    #[test]
    fn at_80x24_paths_stay_apart_and_the_details_wrap() {
        let mut app = App::new(
            SessionInfo {
                folder: "/imgs".into(),
                model: "cells.flawscope".into(),
                db: "/imgs/db.sqlite".into(),
            },
            0.5,
        );
        app.handle_event(Event::Files(2));
        for (name, score) in [
            ("bottle/test/broken_large/000.png", 0.93),
            ("bottle/test/good/000.png", 0.12),
        ] {
            app.handle_event(Event::Item(BatchItem::Scored(result(name, score), None)));
        }
        let text = lines(&render(&app, 80, 24)).join("\n");
        // The list shows both paths whole or elided in the middle: the
        // folder that tells them apart and the file name stay.
        assert!(text.contains("ANOM"), "{text}");
        let rows: Vec<&str> = text.lines().filter(|l| l.contains("000.png")).collect();
        assert!(
            rows.iter().any(|l| l.contains("broken_large/000.png")),
            "{text}"
        );
        assert!(rows.iter().any(|l| l.contains("good/000.png")), "{text}");
        // The details are wrapped, not cut: the decision and the scored
        // time are on screen.
        assert!(text.contains("decision"), "{text}");
        assert!(text.contains("2025-01-01"), "{text}");
    }
}
