//! The triage state and how events change it.
//!
//! [`App`] holds everything the screen shows; [`App::handle_event`] applies
//! one [`Event`] (a key, a result from the scoring worker) and returns the
//! [`Action`] the runtime must carry out (write a decision, quit). It does no
//! I/O, so tests drive it directly.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use flawscope_core::operating_point::{CalibrationView, Estimator, OperatingPoint};
use flawscope_core::prompt_layer::DefectCheck;
use flawscope_results::scoring::{BatchItem, BatchSummary, Preview};
use flawscope_results::store::{Decision, StoredResult, Verdict, flagged_by, layered_verdict};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// Threshold step of `+` / `-`.
pub const THRESHOLD_STEP: f32 = 0.01;
/// Rows moved by PageUp / PageDown.
const PAGE: usize = 10;
/// Previews kept in memory; older ones are recomputed when selected again.
pub const PREVIEW_CACHE: usize = 600;

/// Something that happened: a key, or news from the background threads.
#[derive(Debug, Clone)]
pub enum Event {
    Key(KeyEvent),
    /// The terminal was resized (the next draw adapts).
    Resize,
    /// What the worker is doing before scoring starts (loading the model).
    Phase(String),
    /// The folder holds this many images.
    Files(usize),
    /// Rows already in the store for this model and folder.
    Loaded(Vec<StoredResult>),
    /// One image of the batch.
    Item(BatchItem),
    /// A heatmap preview computed on request.
    Preview {
        path: PathBuf,
        result: Result<Preview, String>,
    },
    /// The batch is over.
    Done(BatchSummary),
    /// The worker stopped on an error.
    Failed(String),
    /// The model's calibration, to state the estimates at the threshold a
    /// person moves to (`None`: an uncalibrated model or an older file).
    Estimates(Option<Estimator>),
}

/// What the runtime must do after an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    None,
    Quit,
    /// Write this decision to the store now.
    Decide {
        path: PathBuf,
        content_hash: String,
        decision: Decision,
    },
    /// Remember the threshold in the store.
    SaveThreshold(f32),
}

/// Which rows the list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    Anomalous,
    Undecided,
}

impl Filter {
    pub fn next(self) -> Self {
        match self {
            Self::All => Self::Anomalous,
            Self::Anomalous => Self::Undecided,
            Self::Undecided => Self::All,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Anomalous => "anomalous",
            Self::Undecided => "undecided",
        }
    }
}

/// Where keys go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing a search after `/`.
    Search,
    Help,
}

/// One image in the list.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub path: PathBuf,
    /// The path inside the triaged folder (`sub/000.png`), as listed and
    /// searched: MVTec-style `000.png` in different folders stay apart.
    pub name: String,
    /// Empty when the file could not be read.
    pub content_hash: String,
    /// `None` when the image failed.
    pub score: Option<f32>,
    pub decision: Decision,
    pub error: Option<String>,
    pub scored_at: String,
    /// Typed defects checked beside the model (`tui --prompt`).
    pub defects: Vec<DefectCheck>,
}

impl Row {
    fn from_result(result: &StoredResult, root: &Path) -> Self {
        Self {
            name: display_name(&result.path, root),
            path: result.path.clone(),
            content_hash: result.content_hash.clone(),
            score: Some(result.score),
            decision: result.decision,
            error: None,
            scored_at: result.scored_at.clone(),
            defects: result.defects.clone(),
        }
    }

    /// The verdict at `threshold`, `None` for a failed image: anomalous
    /// also when a typed defect is over its own threshold.
    pub fn verdict(&self, threshold: f32) -> Option<Verdict> {
        self.score
            .map(|s| layered_verdict(s, threshold, &self.defects))
    }

    /// What flagged the image at `threshold` ([`flagged_by`]); nothing for a
    /// failed image.
    pub fn flagged_by(&self, threshold: f32) -> Vec<String> {
        self.score
            .map(|s| flagged_by(s, threshold, &self.defects))
            .unwrap_or_default()
    }
}

/// Scoring progress as the gauge shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// What the worker does before the batch starts.
    pub phase: String,
    pub total: Option<usize>,
    pub scored: usize,
    pub unchanged: usize,
    pub failed: usize,
    pub done: Option<BatchSummary>,
    /// The worker stopped on this error.
    pub error: Option<String>,
}

impl Progress {
    pub fn processed(&self) -> usize {
        self.scored + self.unchanged + self.failed
    }

    /// 0–1.
    pub fn ratio(&self) -> f64 {
        match self.total {
            Some(0) => 1.0,
            Some(total) => (self.processed() as f64 / total as f64).clamp(0.0, 1.0),
            None => 0.0,
        }
    }
}

/// A heatmap preview, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum PreviewState {
    Ready(Preview),
    Failed(String),
}

/// Names shown in the header and help.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    pub folder: String,
    pub model: String,
    pub db: String,
}

#[derive(Debug, Clone)]
struct Undo {
    row: usize,
    previous: Decision,
}

/// The whole triage state.
#[derive(Debug)]
pub struct App {
    pub info: SessionInfo,
    rows: Vec<Row>,
    by_path: HashMap<PathBuf, usize>,
    /// Row indices shown, in order.
    view: Vec<usize>,
    /// Selected row (an index into `rows`).
    selected: Option<usize>,
    /// Keep the worst row selected until the user moves.
    follow_top: bool,
    filter: Filter,
    search: String,
    mode: Mode,
    threshold: f32,
    progress: Progress,
    undo: Vec<Undo>,
    previews: HashMap<PathBuf, PreviewState>,
    preview_order: VecDeque<PathBuf>,
    message: Option<(String, bool)>,
    /// Rows scored in this session (not loaded from the store).
    scored_now: usize,
    /// States the estimates at the current threshold.
    estimator: Option<Estimator>,
    /// The calibration's scores, for the histogram (made once).
    calibration: Option<CalibrationView>,
    /// The triaged folder, absolute: rows are named by their path in it.
    root: PathBuf,
    quit: bool,
}

impl App {
    pub fn new(info: SessionInfo, threshold: f32) -> Self {
        let root = if info.folder.is_empty() {
            PathBuf::new()
        } else {
            flawscope_results::scoring::store_path(Path::new(&info.folder))
        };
        Self {
            root,
            calibration: None,
            info,
            rows: Vec::new(),
            by_path: HashMap::new(),
            view: Vec::new(),
            selected: None,
            follow_top: true,
            filter: Filter::All,
            search: String::new(),
            mode: Mode::Normal,
            threshold: clamp_threshold(threshold),
            progress: Progress {
                phase: "starting".into(),
                ..Progress::default()
            },
            undo: Vec::new(),
            previews: HashMap::new(),
            preview_order: VecDeque::new(),
            message: None,
            estimator: None,
            scored_now: 0,
            quit: false,
        }
    }

    // ---- queries used by rendering and the runtime -------------------------

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The rows shown, in order.
    pub fn visible(&self) -> impl Iterator<Item = &Row> {
        self.view.iter().filter_map(|&i| self.rows.get(i))
    }

    pub fn visible_len(&self) -> usize {
        self.view.len()
    }

    /// Position of the selected row among the shown ones.
    pub fn selected_position(&self) -> Option<usize> {
        let selected = self.selected?;
        self.view.iter().position(|&i| i == selected)
    }

    pub fn selected_row(&self) -> Option<&Row> {
        self.selected_position()
            .and_then(|p| self.view.get(p))
            .and_then(|&i| self.rows.get(i))
    }

    pub fn filter(&self) -> Filter {
        self.filter
    }

    pub fn search(&self) -> &str {
        &self.search
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// The estimated false- and missed-alarm rates at the current threshold
    /// (from the model's calibration; `None` until known or for
    /// uncalibrated models).
    /// The model's calibration scores (normal, labelled NG), when known.
    pub fn calibration_view(&self) -> Option<&CalibrationView> {
        self.calibration.as_ref()
    }

    pub fn operating_point(&self) -> Option<OperatingPoint> {
        self.estimator.as_ref()?.at(self.threshold)
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn message(&self) -> Option<(&str, bool)> {
        self.message.as_ref().map(|(m, e)| (m.as_str(), *e))
    }

    pub fn preview(&self, path: &Path) -> Option<&PreviewState> {
        self.previews.get(path)
    }

    /// Rows scored by this session's worker (not loaded from the store).
    pub fn scored_this_session(&self) -> usize {
        self.scored_now
    }

    /// Scores of all scored rows, for the histogram.
    pub fn scores(&self) -> impl Iterator<Item = f32> + '_ {
        self.rows.iter().filter_map(|r| r.score)
    }

    pub fn should_quit(&self) -> bool {
        self.quit
    }

    /// The selected image when it has a score but no preview yet.
    pub fn preview_wanted(&self) -> Option<&Path> {
        let row = self.selected_row()?;
        (row.score.is_some() && !self.previews.contains_key(&row.path)).then_some(&row.path)
    }

    /// Shows a message in the status line (errors in red).
    pub fn report(&mut self, text: impl Into<String>, is_error: bool) {
        self.message = Some((text.into(), is_error));
    }

    // ---- events ----------------------------------------------------------------

    pub fn handle_event(&mut self, event: Event) -> Action {
        match event {
            Event::Key(key) => self.handle_key(key),
            Event::Resize => Action::None,
            Event::Phase(phase) => {
                self.progress.phase = phase;
                Action::None
            }
            Event::Estimates(estimator) => {
                self.calibration = estimator.as_ref().map(Estimator::view);
                self.estimator = estimator;
                Action::None
            }
            Event::Files(total) => {
                self.progress.total = Some(total);
                Action::None
            }
            Event::Loaded(results) => {
                for result in &results {
                    self.upsert(Row::from_result(result, &self.root));
                }
                self.rebuild_view();
                Action::None
            }
            Event::Item(item) => {
                self.apply_item(item);
                Action::None
            }
            Event::Preview { path, result } => {
                let state = match result {
                    Ok(preview) => PreviewState::Ready(preview),
                    Err(error) => PreviewState::Failed(error),
                };
                self.cache_preview(path, state);
                Action::None
            }
            Event::Done(summary) => {
                self.progress.done = Some(summary);
                Action::None
            }
            Event::Failed(error) => {
                self.progress.error = Some(error.clone());
                self.report(error, true);
                Action::None
            }
        }
    }

    fn apply_item(&mut self, item: BatchItem) {
        let changed = match item {
            BatchItem::Unchanged(result) => {
                self.progress.unchanged += 1;
                self.upsert(Row::from_result(&result, &self.root))
            }
            BatchItem::Scored(result, preview) => {
                self.progress.scored += 1;
                self.scored_now += 1;
                if let Some(preview) = preview {
                    self.cache_preview(result.path.clone(), PreviewState::Ready(preview));
                } else {
                    self.forget_preview(&result.path);
                }
                self.upsert(Row::from_result(&result, &self.root))
            }
            BatchItem::Failed { path, error } => {
                self.progress.failed += 1;
                self.upsert(Row {
                    name: display_name(&path, &self.root),
                    path,
                    content_hash: String::new(),
                    score: None,
                    decision: Decision::None,
                    error: Some(error),
                    scored_at: String::new(),
                    defects: Vec::new(),
                })
            }
        };
        if changed {
            self.rebuild_view();
        }
    }

    /// Adds or replaces a row; true when anything shown changed.
    fn upsert(&mut self, row: Row) -> bool {
        if let Some(&i) = self.by_path.get(&row.path)
            && let Some(existing) = self.rows.get_mut(i)
        {
            if *existing == row {
                return false;
            }
            *existing = row;
            return true;
        }
        self.by_path.insert(row.path.clone(), self.rows.len());
        self.rows.push(row);
        true
    }

    fn cache_preview(&mut self, path: PathBuf, state: PreviewState) {
        if self.previews.insert(path.clone(), state).is_none() {
            self.preview_order.push_back(path);
        }
        while self.preview_order.len() > PREVIEW_CACHE {
            if let Some(old) = self.preview_order.pop_front() {
                self.previews.remove(&old);
            }
        }
    }

    fn forget_preview(&mut self, path: &Path) {
        if self.previews.remove(path).is_some() {
            self.preview_order.retain(|p| p != path);
        }
    }

    fn handle_key(&mut self, key: KeyEvent) -> Action {
        if key.kind != KeyEventKind::Press {
            return Action::None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return Action::Quit;
        }
        match self.mode {
            Mode::Help => {
                // Any key closes the help.
                self.mode = Mode::Normal;
                Action::None
            }
            Mode::Search => self.search_key(key),
            Mode::Normal => self.normal_key(key),
        }
    }

    fn search_key(&mut self, key: KeyEvent) -> Action {
        match key.code {
            KeyCode::Enter => self.mode = Mode::Normal,
            KeyCode::Esc => {
                self.mode = Mode::Normal;
                self.search.clear();
                self.rebuild_view();
            }
            KeyCode::Backspace => {
                self.search.pop();
                self.rebuild_view();
            }
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.search.push(c);
                self.rebuild_view();
            }
            KeyCode::Down => self.move_by(1),
            KeyCode::Up => self.move_by(-1),
            _ => {}
        }
        Action::None
    }

    fn normal_key(&mut self, key: KeyEvent) -> Action {
        self.message = None;
        match key.code {
            KeyCode::Char('q') => {
                self.quit = true;
                Action::Quit
            }
            KeyCode::Char('?') => {
                self.mode = Mode::Help;
                Action::None
            }
            KeyCode::Char('/') => {
                self.mode = Mode::Search;
                Action::None
            }
            KeyCode::Esc => {
                if !self.search.is_empty() {
                    self.search.clear();
                    self.rebuild_view();
                }
                Action::None
            }
            KeyCode::Down | KeyCode::Char('j') => self.nav(1),
            KeyCode::Up | KeyCode::Char('k') => self.nav(-1),
            KeyCode::PageDown => self.nav(PAGE as isize),
            KeyCode::PageUp => self.nav(-(PAGE as isize)),
            KeyCode::Home | KeyCode::Char('g') => self.nav(isize::MIN),
            KeyCode::End | KeyCode::Char('G') => self.nav(isize::MAX),
            KeyCode::Char('f') => {
                self.filter = self.filter.next();
                self.rebuild_view();
                Action::None
            }
            KeyCode::Char('+') | KeyCode::Char('=') => self.move_threshold(THRESHOLD_STEP),
            KeyCode::Char('-') | KeyCode::Char('_') => self.move_threshold(-THRESHOLD_STEP),
            KeyCode::Char('a') => self.decide(Decision::Ok),
            KeyCode::Char('x') => self.decide(Decision::Ng),
            KeyCode::Char('u') => self.undo(),
            _ => Action::None,
        }
    }

    fn nav(&mut self, delta: isize) -> Action {
        self.move_by(delta);
        Action::None
    }

    fn move_by(&mut self, delta: isize) {
        if self.view.is_empty() {
            return;
        }
        self.follow_top = false;
        let last = self.view.len() - 1;
        let current = self.selected_position().unwrap_or(0);
        let target = if delta >= 0 {
            current.saturating_add(delta.unsigned_abs()).min(last)
        } else {
            current.saturating_sub(delta.unsigned_abs())
        };
        self.selected = self.view.get(target).copied();
    }

    fn move_threshold(&mut self, delta: f32) -> Action {
        let next = clamp_threshold(self.threshold + delta);
        if next == self.threshold {
            return Action::None;
        }
        self.threshold = next;
        self.rebuild_view();
        Action::SaveThreshold(next)
    }

    fn decide(&mut self, decision: Decision) -> Action {
        let Some(position) = self.selected_position() else {
            return Action::None;
        };
        let Some(&index) = self.view.get(position) else {
            return Action::None;
        };
        let Some(row) = self.rows.get_mut(index) else {
            return Action::None;
        };
        if row.score.is_none() || row.content_hash.is_empty() {
            let text = format!("{} could not be scored; nothing to decide", row.name);
            self.report(text, true);
            return Action::None;
        }
        let previous = row.decision;
        row.decision = decision;
        let action = Action::Decide {
            path: row.path.clone(),
            content_hash: row.content_hash.clone(),
            decision,
        };
        let text = format!("{} marked {}", row.name, decision_label(decision));
        self.undo.push(Undo {
            row: index,
            previous,
        });
        self.follow_top = false;
        self.rebuild_view();
        // Move on to the next image.
        let next = match self.view.iter().position(|&i| i == index) {
            Some(p) => p + 1,
            None => position,
        };
        self.selected = self
            .view
            .get(next.min(self.view.len().saturating_sub(1)))
            .copied();
        self.report(text, false);
        action
    }

    fn undo(&mut self) -> Action {
        let Some(undo) = self.undo.pop() else {
            self.report("nothing to undo", false);
            return Action::None;
        };
        let Some(row) = self.rows.get_mut(undo.row) else {
            return Action::None;
        };
        row.decision = undo.previous;
        let action = Action::Decide {
            path: row.path.clone(),
            content_hash: row.content_hash.clone(),
            decision: undo.previous,
        };
        let text = format!(
            "undone: {} is {} again",
            row.name,
            decision_label(undo.previous)
        );
        self.follow_top = false;
        self.selected = Some(undo.row);
        self.rebuild_view();
        self.report(text, false);
        action
    }

    fn shows(&self, row: &Row) -> bool {
        let by_filter = match self.filter {
            Filter::All => true,
            Filter::Anomalous => row.verdict(self.threshold) == Some(Verdict::Anomalous),
            Filter::Undecided => row.score.is_some() && row.decision == Decision::None,
        };
        by_filter && (self.search.is_empty() || contains_ignore_case(&row.name, &self.search))
    }

    /// Recomputes the shown rows (worst first, failed last) and keeps the
    /// selection on the same image when it is still shown.
    fn rebuild_view(&mut self) {
        let old_position = self.selected_position();
        let mut view: Vec<usize> = (0..self.rows.len())
            .filter(|&i| self.shows(&self.rows[i]))
            .collect();
        let rows = &self.rows;
        view.sort_by(|&a, &b| {
            let (ra, rb) = (&rows[a], &rows[b]);
            let sa = ra.score.unwrap_or(f32::NEG_INFINITY);
            let sb = rb.score.unwrap_or(f32::NEG_INFINITY);
            sb.total_cmp(&sa).then_with(|| ra.name.cmp(&rb.name))
        });
        self.view = view;
        let still_shown = self.selected.is_some_and(|s| self.view.contains(&s));
        if self.follow_top {
            self.selected = self.view.first().copied();
        } else if !still_shown {
            let position = old_position
                .unwrap_or(0)
                .min(self.view.len().saturating_sub(1));
            self.selected = self.view.get(position).copied();
        }
    }
}

fn clamp_threshold(value: f32) -> f32 {
    let value = if value.is_finite() { value } else { 0.5 };
    ((value * 100.0).round() / 100.0).clamp(0.0, 1.0)
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// The path inside `root` (`sub/000.png`); the file name of a path outside
/// it; the whole path if it has none.
pub fn display_name(path: &Path, root: &Path) -> String {
    if !root.as_os_str().is_empty()
        && let Ok(inside) = path.strip_prefix(root)
        && inside.file_name().is_some()
    {
        return inside.to_string_lossy().into_owned();
    }
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `text` in at most `width` characters, its middle replaced by `…` when
/// longer: both the folder and the file name stay readable.
pub fn middle_elide(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width {
        return text.to_owned();
    }
    if width <= 1 {
        return "…".chars().take(width).collect();
    }
    let keep = width - 1;
    // The end (the file name) is worth more than the start.
    let head = keep / 3;
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

pub fn decision_label(decision: Decision) -> &'static str {
    match decision {
        Decision::None => "undecided",
        Decision::Ok => "OK",
        Decision::Ng => "NG",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::crossterm::event::KeyEvent;

    pub(crate) fn result(name: &str, score: f32) -> StoredResult {
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

    fn key(app: &mut App, code: KeyCode) -> Action {
        app.handle_event(Event::Key(KeyEvent::new(code, KeyModifiers::NONE)))
    }

    fn chars(app: &mut App, text: &str) {
        for c in text.chars() {
            key(app, KeyCode::Char(c));
        }
    }

    fn app_with(scores: &[(&str, f32)]) -> App {
        let mut app = App::new(SessionInfo::default(), 0.5);
        app.handle_event(Event::Files(scores.len()));
        for (name, score) in scores {
            app.handle_event(Event::Item(BatchItem::Scored(result(name, *score), None)));
        }
        app
    }

    fn names(app: &App) -> Vec<String> {
        app.visible().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn list_is_worst_first_and_follows_the_top_while_scoring() {
        let mut app = app_with(&[("a.png", 0.2), ("b.png", 0.9)]);
        assert_eq!(names(&app), ["b.png", "a.png"]);
        assert_eq!(app.selected_row().unwrap().name, "b.png");
        app.handle_event(Event::Item(BatchItem::Scored(result("c.png", 0.95), None)));
        assert_eq!(app.selected_row().unwrap().name, "c.png");
        // Once the user moves, the selection stays on the same image.
        key(&mut app, KeyCode::Char('j'));
        assert_eq!(app.selected_row().unwrap().name, "b.png");
        app.handle_event(Event::Item(BatchItem::Scored(result("d.png", 0.99), None)));
        assert_eq!(app.selected_row().unwrap().name, "b.png");
        assert_eq!(app.progress().processed(), 4);
    }

    #[test]
    fn decisions_advance_undo_and_ask_for_writes() {
        let mut app = app_with(&[("a.png", 0.2), ("b.png", 0.9), ("c.png", 0.6)]);
        let action = key(&mut app, KeyCode::Char('a'));
        assert_eq!(
            action,
            Action::Decide {
                path: PathBuf::from("/imgs/b.png"),
                content_hash: "sha256:b.png".into(),
                decision: Decision::Ok
            }
        );
        assert_eq!(app.selected_row().unwrap().name, "c.png");
        let action = key(&mut app, KeyCode::Char('x'));
        assert!(matches!(
            action,
            Action::Decide {
                decision: Decision::Ng,
                ..
            }
        ));
        let decisions: Vec<Decision> = app.visible().map(|r| r.decision).collect();
        assert_eq!(decisions, [Decision::Ok, Decision::Ng, Decision::None]);

        let undo = key(&mut app, KeyCode::Char('u'));
        assert_eq!(
            undo,
            Action::Decide {
                path: PathBuf::from("/imgs/c.png"),
                content_hash: "sha256:c.png".into(),
                decision: Decision::None
            }
        );
        assert_eq!(app.selected_row().unwrap().name, "c.png");
        key(&mut app, KeyCode::Char('u'));
        assert_eq!(
            app.rows()
                .iter()
                .filter(|r| r.decision != Decision::None)
                .count(),
            0
        );
        assert_eq!(key(&mut app, KeyCode::Char('u')), Action::None);
    }

    #[test]
    fn filters_cycle_and_search_narrows() {
        let mut app = app_with(&[("good_1.png", 0.2), ("bad_1.png", 0.9), ("bad_2.png", 0.7)]);
        key(&mut app, KeyCode::Char('f'));
        assert_eq!(app.filter(), Filter::Anomalous);
        assert_eq!(names(&app), ["bad_1.png", "bad_2.png"]);
        key(&mut app, KeyCode::Char('a'));
        key(&mut app, KeyCode::Char('f'));
        assert_eq!(app.filter(), Filter::Undecided);
        assert_eq!(names(&app), ["bad_2.png", "good_1.png"]);
        key(&mut app, KeyCode::Char('f'));
        assert_eq!(app.filter(), Filter::All);

        key(&mut app, KeyCode::Char('/'));
        assert_eq!(app.mode(), Mode::Search);
        // Keys are text while searching: 'q' does not quit.
        chars(&mut app, "GOOD");
        assert!(!app.should_quit());
        assert_eq!(names(&app), ["good_1.png"]);
        key(&mut app, KeyCode::Enter);
        assert_eq!(app.mode(), Mode::Normal);
        assert_eq!(app.search(), "GOOD");
        key(&mut app, KeyCode::Esc);
        assert_eq!(app.visible_len(), 3);
    }

    #[test]
    fn moving_the_threshold_states_what_it_costs() {
        use flawscope_core::calibration::Calibration;
        use flawscope_core::folds::Procedure;
        use flawscope_core::operating_point::CalibrationScores;
        use flawscope_core::synthetic::DefectKind;
        let normal: Vec<f32> = (1..=200).map(|i| i as f32).collect();
        let scores = CalibrationScores {
            procedure: Procedure::BankFolds,
            folds: 10,
            normal: normal.clone(),
            normal_images: 200,
            synthetic: vec![(DefectKind::Blotch, (150..250).map(|i| i as f32).collect())],
            labelled: Vec::new(),
        };
        let calibration = Calibration::from_normal_scores(&normal, 0.01).unwrap();
        let mut app = app_with(&[("a.png", 0.45), ("b.png", 0.9)]);
        assert!(app.operating_point().is_none(), "no calibration known yet");
        app.handle_event(Event::Estimates(Some(Estimator {
            calibration,
            scores,
        })));
        let at_model = app.operating_point().unwrap();
        assert!((at_model.estimated_false_alarm_rate - 0.01).abs() < 1e-9);
        for _ in 0..10 {
            key(&mut app, KeyCode::Char('-'));
        }
        let lower = app.operating_point().unwrap();
        assert!(lower.estimated_false_alarm_rate > at_model.estimated_false_alarm_rate);
        assert!(lower.synthetic_missed_alarm_rate < at_model.synthetic_missed_alarm_rate);
        assert_eq!(lower.threshold, app.threshold());
    }

    #[test]
    fn threshold_moves_verdicts_without_rescoring() {
        let mut app = app_with(&[("a.png", 0.45), ("b.png", 0.9)]);
        key(&mut app, KeyCode::Char('f'));
        assert_eq!(app.visible_len(), 1);
        let mut last = Action::None;
        for _ in 0..5 {
            last = key(&mut app, KeyCode::Char('-'));
        }
        assert_eq!(last, Action::SaveThreshold(0.45));
        assert_eq!(app.visible_len(), 2);
        assert_eq!(
            app.rows()[0].verdict(app.threshold()),
            Some(Verdict::Anomalous)
        );
        for _ in 0..200 {
            key(&mut app, KeyCode::Char('+'));
        }
        assert_eq!(app.threshold(), 1.0);
        assert_eq!(key(&mut app, KeyCode::Char('+')), Action::None);
        assert_eq!(app.visible_len(), 0);
        // Nothing selected: deciding does nothing.
        assert_eq!(key(&mut app, KeyCode::Char('a')), Action::None);
    }

    #[test]
    fn help_quit_and_failed_rows() {
        let mut app = app_with(&[("a.png", 0.3)]);
        app.handle_event(Event::Item(BatchItem::Failed {
            path: PathBuf::from("/imgs/broken.png"),
            error: "corrupt".into(),
        }));
        assert_eq!(names(&app), ["a.png", "broken.png"]);
        key(&mut app, KeyCode::End);
        assert_eq!(key(&mut app, KeyCode::Char('x')), Action::None);
        assert!(app.message().unwrap().1);
        assert_eq!(app.preview_wanted(), None);
        key(&mut app, KeyCode::Home);
        assert_eq!(app.preview_wanted(), Some(Path::new("/imgs/a.png")));

        key(&mut app, KeyCode::Char('?'));
        assert_eq!(app.mode(), Mode::Help);
        key(&mut app, KeyCode::Char('q'));
        assert_eq!(app.mode(), Mode::Normal);
        assert!(!app.should_quit());
        assert_eq!(key(&mut app, KeyCode::Char('q')), Action::Quit);
        assert!(app.should_quit());
    }

    #[test]
    fn stored_rows_load_and_unchanged_items_change_nothing() {
        let mut app = App::new(SessionInfo::default(), 0.5);
        let mut decided = result("a.png", 0.8);
        decided.decision = Decision::Ng;
        app.handle_event(Event::Loaded(vec![decided.clone(), result("b.png", 0.1)]));
        assert_eq!(app.visible_len(), 2);
        assert_eq!(app.scored_this_session(), 0);
        app.handle_event(Event::Item(BatchItem::Unchanged(decided)));
        assert_eq!(app.progress().unchanged, 1);
        assert_eq!(app.rows().len(), 2);
        assert_eq!(app.rows()[0].decision, Decision::Ng);
        app.handle_event(Event::Done(BatchSummary::default()));
        assert!(app.progress().done.is_some());
    }

    #[test]
    fn preview_cache_is_bounded() {
        let mut app = App::new(SessionInfo::default(), 0.5);
        let preview = Preview {
            width: 1,
            height: 1,
            pixels: vec![[0, 0, 0]],
        };
        for i in 0..PREVIEW_CACHE + 5 {
            app.handle_event(Event::Preview {
                path: PathBuf::from(format!("/p/{i}")),
                result: Ok(preview.clone()),
            });
        }
        assert_eq!(app.previews.len(), PREVIEW_CACHE);
        assert!(app.preview(Path::new("/p/0")).is_none());
    }

    #[test]
    fn names_are_paths_in_the_folder_elided_in_the_middle() {
        let root = Path::new("/data/bottle");
        assert_eq!(
            display_name(Path::new("/data/bottle/test/crack/000.png"), root),
            "test/crack/000.png"
        );
        assert_eq!(display_name(Path::new("/elsewhere/1.png"), root), "1.png");
        assert_eq!(display_name(Path::new("/x/a.png"), Path::new("")), "a.png");
        assert_eq!(middle_elide("short.png", 20), "short.png");
        let long = "test/broken_large/000.png";
        let cut = middle_elide(long, 16);
        assert_eq!(cut.chars().count(), 16);
        assert!(
            cut.starts_with("test") && cut.ends_with("/000.png"),
            "{cut}"
        );
        assert!(cut.contains('…'));
        assert_eq!(middle_elide(long, 0), "");
        assert_eq!(middle_elide(long, 1), "…");
    }
}
