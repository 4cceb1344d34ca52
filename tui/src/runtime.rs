//! Running the TUI on a real terminal: threads, channels, terminal set-up
//! and restore, and the optional timing trace.
//!
//! Three background threads feed one channel of [`Event`]s: the input
//! thread (keys, resizes), the scoring worker (stored rows, then one item
//! per image) and the preview worker (heatmaps for images that have none in
//! memory). The main thread waits on the channel with a short timeout,
//! applies events to the [`App`], carries out the returned [`Action`]s and
//! redraws. Scoring never runs on the main thread, so keys are answered
//! while it works.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write, stdout};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use flawscope_core::dataset::{DatasetError, scan_image_folder, scan_image_tree};
use flawscope_core::images::{ImageLimits, decode_image};
use flawscope_core::model::{Inspection, Model};
use flawscope_core::musc::{self, MuscConfig};
use flawscope_core::progress::NoProgress;
use flawscope_core::runtime::Runtime;
use ratatui::crossterm::cursor::Show;
use ratatui::crossterm::event::{self as term_event, Event as TermEvent, KeyEventKind};
use ratatui::crossterm::execute;
use ratatui::{DefaultTerminal, Frame};

use flawscope_results::scoring::{
    BatchOptions, InspectorScorer, PREVIEW_SIDE, Preview, ScoreError, Scored, Scorer, never,
    run_batch, store_path,
};
use flawscope_results::store::{
    ModelRef, Store, StoreError, content_hash, file_hash, layered_model,
};

use crate::app::{Action, App, Event, SessionInfo};

/// The database file used when none is given, inside the image folder.
pub const DEFAULT_DB_NAME: &str = ".flawscope-results.sqlite";

/// How long the main loop waits for an event before looking again.
const POLL: Duration = Duration::from_millis(50);

/// Prefix of the background threads' names (the panic hook leaves the
/// terminal alone when one of them panics; the UI reports it instead).
const THREAD_PREFIX: &str = "flawscope-";

#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("terminal error: {0}")]
    Terminal(#[source] std::io::Error),
    #[error("cannot write the trace file {path}: {cause}")]
    Trace {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("scoring stopped: {0}")]
    Worker(String),
    #[error("{0}")]
    Batch(#[source] flawscope_core::Error),
}

/// What to triage and where to keep the results.
#[derive(Debug, Clone)]
pub struct Options {
    /// Folder of images.
    pub folder: PathBuf,
    /// Read the folder's subfolders too (hidden ones skipped).
    pub recursive: bool,
    /// Model file from `flawscope fit` (classical or WinCLIP); `None`: no
    /// model, the folder's images scored as one batch against each other
    /// (core's mutual scoring, [`flawscope_core::musc`]).
    pub model: Option<PathBuf>,
    /// Typed defects the model's text layer checks on every image (the
    /// list then shows which layer flagged each one).
    pub prompts: Vec<String>,
    /// Results database; [`default_db`] when `None`.
    pub db: Option<PathBuf>,
    /// Where the model runs and where its CLIP weights come from, made by
    /// the caller (the CLI's `--device`, `--clip-weights`, `--clip-model`).
    pub runtime: Arc<Runtime>,
    /// Append timing lines here (first row shown, key-to-redraw latency).
    pub trace: Option<PathBuf>,
    /// When the program started (for the trace).
    pub started: Instant,
}

/// `<folder>/.flawscope-results.sqlite`.
pub fn default_db(folder: &Path) -> PathBuf {
    folder.join(DEFAULT_DB_NAME)
}

/// Timestamps, in milliseconds since the program started.
struct Trace {
    out: Option<BufWriter<File>>,
    started: Instant,
}

impl Trace {
    fn open(path: Option<&Path>, started: Instant) -> Result<Self, TuiError> {
        let out = match path {
            Some(path) => Some(BufWriter::new(File::create(path).map_err(|cause| {
                TuiError::Trace {
                    path: path.to_path_buf(),
                    cause,
                }
            })?)),
            None => None,
        };
        Ok(Self { out, started })
    }

    fn enabled(&self) -> bool {
        self.out.is_some()
    }

    fn log(&mut self, what: fmt::Arguments<'_>) {
        if let Some(out) = &mut self.out {
            let ms = self.started.elapsed().as_secs_f64() * 1e3;
            // Tracing must never stop the UI: write errors are ignored.
            let _ = writeln!(out, "{ms:.1} {what}");
            let _ = out.flush();
        }
    }
}

/// Restores the terminal when dropped (normal exit and errors).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Raw mode off, main screen back, cursor shown.
fn restore_terminal() {
    ratatui::restore();
    // Nothing more can be done when the terminal is gone.
    let _ = execute!(stdout(), Show);
}

/// On the main thread a panic restores the terminal (raw mode off, main
/// screen back), then prints as usual (the previous hook); a background
/// thread's panic is caught by [`spawn`] and shown in the UI instead, so it
/// must not restore the terminal under the running interface.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let name = thread::current().name().map(str::to_owned);
        if name
            .as_deref()
            .is_some_and(|n| n.starts_with(THREAD_PREFIX))
        {
            return;
        }
        restore_terminal();
        previous(info);
    }));
}

type Sent = (Instant, Event);

/// Runs the triage UI until the user quits.
pub fn run(options: Options) -> Result<(), TuiError> {
    let mut trace = Trace::open(options.trace.as_deref(), options.started)?;
    trace.log(format_args!("start"));
    // Everything that can fail on bad input is checked before the screen
    // switches, so its error prints plainly.
    let files = if options.recursive {
        scan_image_tree(&options.folder)?
    } else {
        scan_image_folder(&options.folder)?
    };
    let db = options
        .db
        .clone()
        .unwrap_or_else(|| default_db(&options.folder));
    let store = Store::open(&db)?;
    // Rows checked for typed defects are kept apart from the model's plain
    // rows: another entry in the store for the model with these prompts.
    let (model_name, model_identity) = match &options.model {
        Some(model) => layered_model(
            &model.display().to_string(),
            &file_hash(model)?,
            &options.prompts,
        ),
        None => {
            musc::check_batch_size(files.len(), files.len()).map_err(TuiError::Batch)?;
            batch_model(&files)?
        }
    };
    let threshold = store.person_threshold()?.unwrap_or(0.5);
    let mut app = App::new(
        SessionInfo {
            folder: options.folder.display().to_string(),
            model: model_name.clone(),
            db: db.display().to_string(),
        },
        threshold,
    );

    let (tx, rx) = mpsc::channel::<Sent>();
    let pool = compute_pool();
    let (preview_tx, preview_rx) = mpsc::channel::<PathBuf>();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = Worker {
        files,
        model: options.model.clone(),
        model_name,
        model_identity,
        prompts: options.prompts.clone(),
        db: db.clone(),
        runtime: Arc::clone(&options.runtime),
        tx: tx.clone(),
        cancel: stop.clone(),
        previews: Some(preview_rx),
        pool,
    };
    spawn("flawscope-scoring", tx.clone(), move || worker.run())?;

    // `try_init` installs ratatui's hook (restore, then report); ours goes on
    // top so that a background thread's panic leaves the screen alone.
    let mut terminal = ratatui::try_init().map_err(|err| {
        restore_terminal();
        TuiError::Terminal(err)
    })?;
    let guard = TerminalGuard;
    install_panic_hook();
    trace.log(format_args!("terminal_ready"));
    let input_stop = stop.clone();
    spawn("flawscope-input", tx.clone(), move || {
        read_input(&tx, &input_stop)
    })?;

    let result = event_loop(
        &mut terminal,
        &mut app,
        &rx,
        &preview_tx,
        &store,
        &mut trace,
    );
    stop.store(true, Ordering::Relaxed);
    drop(guard);
    result?;
    // Let a worker still scoring finish the image in hand (its row is
    // committed) before the process ends.
    if app.progress().done.is_none() && app.progress().error.is_none() {
        wait_for_worker(&rx, Duration::from_secs(5));
    }
    match &app.progress().error {
        Some(error) => Err(TuiError::Worker(error.clone())),
        None => Ok(()),
    }
}

fn event_loop(
    terminal: &mut DefaultTerminal,
    app: &mut App,
    rx: &Receiver<Sent>,
    preview_tx: &Sender<PathBuf>,
    store: &Store,
    trace: &mut Trace,
) -> Result<(), TuiError> {
    let mut requested: Option<PathBuf> = None;
    let mut first_row_logged = false;
    let mut first_scored_logged = false;
    let mut done_logged = false;
    let mut frames = 0u64;
    terminal
        .draw(|frame| draw(frame, app))
        .map_err(TuiError::Terminal)?;
    trace.log(format_args!("first_frame"));
    loop {
        let mut batch: Vec<Sent> = Vec::new();
        match rx.recv_timeout(POLL) {
            Ok(sent) => batch.push(sent),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        // Take what else is waiting, bounded so keys are never starved.
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(sent) => batch.push(sent),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut keys: Vec<(Instant, Instant, String)> = Vec::new();
        for (at, event) in batch {
            let key = match &event {
                Event::Key(k) if trace.enabled() => Some(format!("{:?}", k.code)),
                _ => None,
            };
            let action = app.handle_event(event);
            perform(action, app, store);
            if let Some(key) = key {
                keys.push((at, Instant::now(), key));
            }
        }
        if app.should_quit() {
            return Ok(());
        }
        if let Some(path) = app.preview_wanted()
            && requested.as_deref() != Some(path)
        {
            requested = Some(path.to_path_buf());
            // The preview worker may be gone (model failed): no preview then.
            let _ = preview_tx.send(path.to_path_buf());
        }
        let drawing = Instant::now();
        terminal
            .draw(|frame| draw(frame, app))
            .map_err(TuiError::Terminal)?;
        frames += 1;
        let drawn = Instant::now();
        for (at, handled, key) in keys {
            trace.log(format_args!(
                "key {key} latency_ms {:.2} queue_ms {:.2} draw_ms {:.2}",
                (drawn - at).as_secs_f64() * 1e3,
                (handled - at).as_secs_f64() * 1e3,
                (drawn - drawing).as_secs_f64() * 1e3,
            ));
        }
        if !first_row_logged && app.visible_len() > 0 {
            first_row_logged = true;
            trace.log(format_args!(
                "first_row_visible rows {} frame {frames}",
                app.visible_len()
            ));
        }
        if !first_scored_logged && app.scored_this_session() > 0 {
            first_scored_logged = true;
            trace.log(format_args!(
                "first_scored_row_visible scored {}",
                app.scored_this_session()
            ));
        }
        if !done_logged && app.progress().done.is_some() {
            done_logged = true;
            let p = app.progress();
            trace.log(format_args!(
                "scoring_done scored {} unchanged {} failed {}",
                p.scored, p.unchanged, p.failed
            ));
        }
    }
}

fn draw(frame: &mut Frame<'_>, app: &App) {
    frame.render_widget(app, frame.area());
}

/// Carries out an action (the store writes happen here, at once).
fn perform(action: Action, app: &mut App, store: &Store) {
    match action {
        Action::None | Action::Quit => {}
        Action::Decide {
            path,
            content_hash,
            decision,
        } => {
            if let Err(err) = store.set_decision(&path, &content_hash, decision) {
                app.report(format!("decision NOT saved: {err}"), true);
            }
        }
        Action::SaveThreshold(threshold) => {
            if let Err(err) = store.set_person_threshold(threshold) {
                app.report(format!("threshold not saved: {err}"), true);
            }
        }
    }
}

fn wait_for_worker(rx: &Receiver<Sent>, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, Event::Done(_) | Event::Failed(_))) => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Starts a named thread whose panic becomes an [`Event::Failed`].
fn spawn(
    name: &str,
    tx: Sender<Sent>,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), TuiError> {
    let thread_name = name.to_string();
    thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let _ = tx.send((
                    Instant::now(),
                    Event::Failed(format!("{thread_name} crashed: {text}")),
                ));
            }
        })
        .map(|_| ())
        .map_err(TuiError::Terminal)
}

/// Forwards terminal events until `stop` is set or the UI is gone.
fn read_input(tx: &Sender<Sent>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match term_event::poll(Duration::from_millis(50)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(err) => {
                let _ = tx.send((Instant::now(), Event::Failed(format!("input: {err}"))));
                return;
            }
        }
        let event = match term_event::read() {
            Ok(event) => event,
            Err(err) => {
                let _ = tx.send((Instant::now(), Event::Failed(format!("input: {err}"))));
                return;
            }
        };
        let at = Instant::now();
        let event = match event {
            TermEvent::Key(key) if key.kind == KeyEventKind::Press => Event::Key(key),
            TermEvent::Resize(_, _) => Event::Resize,
            _ => continue,
        };
        if tx.send((at, event)).is_err() {
            return;
        }
    }
}

/// The scoring worker's inputs.
struct Worker {
    files: Vec<PathBuf>,
    model: Option<PathBuf>,
    model_name: String,
    model_identity: String,
    prompts: Vec<String>,
    db: PathBuf,
    runtime: Arc<Runtime>,
    tx: Sender<Sent>,
    cancel: Arc<AtomicBool>,
    previews: Option<Receiver<PathBuf>>,
    /// Where scoring and previews compute; `None` uses the global pool.
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// Scoring and previews share a pool that leaves one core to the interface
/// and the terminal (on a 2-core machine the model gets one), so keys are
/// answered quickly while a folder is scored.
fn compute_pool() -> Option<Arc<rayon::ThreadPool>> {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    rayon::ThreadPoolBuilder::new()
        .num_threads(cores.saturating_sub(1).max(1))
        .thread_name(|i| format!("{THREAD_PREFIX}compute-{i}"))
        .build()
        .ok()
        .map(Arc::new)
}

/// A scorer that computes in the compute pool.
struct Pooled<'a> {
    scorer: &'a InspectorScorer,
    pool: Option<&'a rayon::ThreadPool>,
}

impl Scorer for Pooled<'_> {
    fn score(&self, path: &Path, bytes: &[u8]) -> Result<Scored, ScoreError> {
        in_pool(self.pool, || self.scorer.score(path, bytes))
    }
}

/// Runs `work` in `pool` when there is one.
fn in_pool<T: Send>(pool: Option<&rayon::ThreadPool>, work: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

impl Worker {
    fn send(&self, event: Event) {
        // The UI may have quit: nothing to tell then.
        let _ = self.tx.send((Instant::now(), event));
    }

    fn run(mut self) {
        if let Err(error) = self.score() {
            self.send(Event::Failed(error));
        }
    }

    fn score(&mut self) -> Result<(), String> {
        let store = Store::open(&self.db).map_err(|e| e.to_string())?;
        let model = store
            .model(&self.model_name, &self.model_identity)
            .map_err(|e| e.to_string())?;
        self.send(Event::Files(self.files.len()));
        self.send_stored(&store, &model)?;
        let pool = self.pool.clone();
        let Some(model_file) = self.model.clone() else {
            return self.score_batch(&store, &model);
        };
        self.send(Event::Phase("loading model".into()));
        let inspector = in_pool(pool.as_deref(), || Model::load(&model_file, &self.runtime))
            .map_err(|e| format!("loading model {}: {e}", model_file.display()))?;
        self.send(Event::Estimates(inspector.estimator()));
        let scorer = InspectorScorer::new(
            Arc::new(inspector),
            ImageLimits::default(),
            Some(PREVIEW_SIDE),
        )
        .with_prompts(self.prompts.clone())
        .map_err(|e| format!("{} with --prompt: {e}", model_file.display()))?;
        self.start_previews(scorer.clone());
        self.send(Event::Phase("scoring".into()));
        let options = BatchOptions {
            cancel: &self.cancel,
            rescore: &never,
        };
        let pooled = Pooled {
            scorer: &scorer,
            pool: pool.as_deref(),
        };
        let summary = run_batch(&self.files, &pooled, &store, &model, &options, |item| {
            self.send(Event::Item(item))
        })
        .map_err(|e| e.to_string())?;
        self.send(Event::Done(summary));
        Ok(())
    }

    /// No model: the folder scored as one batch through core (as `score
    /// --detector musc` does), then filed row by row as a model's scores
    /// are. Every row is written again (the batch's scores depend on all its
    /// images, and each row gets its preview); decisions are kept.
    fn score_batch(&self, store: &Store, model: &ModelRef) -> Result<(), String> {
        self.send(Event::Phase("mutual scoring (no model)".into()));
        let limits = ImageLimits::default();
        let pool = self.pool.clone();
        let (files, runtime) = (&self.files, &self.runtime);
        let raw = in_pool(pool.as_deref(), || {
            musc::score_batch(files, &MuscConfig::default(), runtime, &limits, &NoProgress)
        })
        .map_err(|e| e.to_string())?;
        let answers = musc::answers(&raw.iter().map(|r| r.as_ref().ok()).collect::<Vec<_>>());
        let mut scored = std::collections::HashMap::new();
        for ((file, result), answer) in self.files.iter().zip(&raw).zip(answers) {
            let outcome = match (result, answer) {
                (Err(err), _) => Err(err.to_string()),
                (Ok(_), None) => Err("left unscored".to_owned()),
                (Ok(_), Some(inspection)) => Ok(inspection),
            };
            scored.insert(store_path(file), outcome);
        }
        self.send(Event::Phase("filing the batch's scores".into()));
        let scorer = BatchScorer { scored, limits };
        let options = BatchOptions {
            cancel: &self.cancel,
            rescore: &|_| true,
        };
        let summary = run_batch(&self.files, &scorer, store, model, &options, |item| {
            self.send(Event::Item(item))
        })
        .map_err(|e| e.to_string())?;
        self.send(Event::Done(summary));
        Ok(())
    }

    /// Shows the rows the store already has for these files at once.
    fn send_stored(&self, store: &Store, model: &ModelRef) -> Result<(), String> {
        let wanted: HashSet<PathBuf> = self.files.iter().map(|f| store_path(f)).collect();
        let stored: Vec<_> = store
            .results_for_model(model)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| wanted.contains(&r.path))
            .collect();
        if !stored.is_empty() {
            self.send(Event::Loaded(stored));
        }
        Ok(())
    }

    /// Starts the preview worker; it takes over the UI's request channel.
    fn start_previews(&mut self, scorer: InspectorScorer) {
        let Some(requests) = self.previews.take() else {
            return;
        };
        let tx = self.tx.clone();
        let panic_tx = self.tx.clone();
        let pool = self.pool.clone();
        if let Err(err) = spawn("flawscope-preview", panic_tx, move || {
            preview_worker(&scorer, &requests, &tx, pool.as_deref())
        }) {
            self.send(Event::Phase(format!("scoring (no previews: {err})")));
        }
    }
}

/// The store's model entry of a batch scored against itself: named for
/// it, and identified by every file's content, so a changed folder is
/// another batch.
fn batch_model(files: &[PathBuf]) -> Result<(String, String), TuiError> {
    let mut hashes = String::new();
    for file in files {
        hashes.push_str(&file_hash(file)?);
        hashes.push('\n');
    }
    Ok((
        format!(
            "no model: musc batch of {} images, uncalibrated",
            files.len()
        ),
        format!("musc-batch:{}", content_hash(hashes.as_bytes())),
    ))
}

/// A batch's answers, computed together beforehand, handed out one file
/// at a time to [`run_batch`] (which files them and reports each).
struct BatchScorer {
    scored: std::collections::HashMap<PathBuf, Result<Inspection, String>>,
    limits: ImageLimits,
}

impl Scorer for BatchScorer {
    fn score(&self, path: &Path, bytes: &[u8]) -> Result<Scored, ScoreError> {
        let inspection = match self.scored.get(path) {
            Some(Ok(inspection)) => inspection,
            Some(Err(err)) => return Err(ScoreError::Other(err.clone())),
            None => return Err(ScoreError::Other("not in the batch".into())),
        };
        // The preview needs the pixels: decoded again, one at a time.
        let image = decode_image(bytes, &path.display().to_string(), &self.limits)?;
        Ok(Scored {
            score: inspection.score,
            raw_score: inspection.raw_score,
            threshold: inspection.threshold,
            preview: Some(Preview::from_map(
                &image,
                &inspection.map,
                inspection.threshold,
                PREVIEW_SIDE,
            )),
            defects: Vec::new(),
            inspection: serde_json::to_string(inspection).ok(),
        })
    }
}

/// Computes previews on request, always the newest request first.
fn preview_worker(
    scorer: &InspectorScorer,
    requests: &Receiver<PathBuf>,
    tx: &Sender<Sent>,
    pool: Option<&rayon::ThreadPool>,
) {
    while let Ok(mut path) = requests.recv() {
        while let Ok(newer) = requests.try_recv() {
            path = newer;
        }
        let result = in_pool(pool, || {
            std::fs::read(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|bytes| scorer.inspect(&path, &bytes).map_err(|e| e.to_string()))
                .map(|(image, inspection)| {
                    Preview::from_map(&image, &inspection.map, inspection.threshold, PREVIEW_SIDE)
                })
        });
        if tx
            .send((Instant::now(), Event::Preview { path, result }))
            .is_err()
        {
            return;
        }
    }
}
