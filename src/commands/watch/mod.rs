//! `flawscope watch`: score every image that appears in a folder, once,
//! and push each result to webhooks and MQTT topics until acknowledged.
//!
//! A face like `serve`: the transport (folder events, HTTP, MQTT, metrics)
//! lives here; scoring is the results crate's scorer over core's model, and
//! the results store is the ledger (`flawscope_results::outbox`), so a
//! restart neither scores an image twice nor loses a message.

mod folder;
mod metrics;
mod sinks;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use flawscope_core::images::ImageLimits;
use flawscope_core::operating_point::{OperatingPoint, Target};
use flawscope_results::outbox::{NewMessage, idempotency_key};
use flawscope_results::scoring::{InspectorScorer, Scorer, store_path};
use flawscope_results::store::{ModelRef, Store, Verdict, content_hash};
use serde_json::{Value, json};
use tokio::sync::watch;

use self::folder::FolderOptions;
use self::metrics::Metrics;
use self::sinks::{Mqtt, Phase, Sink, SinkTask, Webhook};
use super::clip::{ClipArgs, check_typed_defects, load_model, setup_error};
use super::options::{DeviceChoice, parse_rate};
use super::score::{ScoreLine, store_model_entry, stored_answer};
use super::{Outcome, UsageError};

/// The ledger file when `--db` is not given, inside the watched folder
/// (hidden, so never taken for an image).
pub const DEFAULT_DB: &str = ".flawscope-watch.sqlite";

#[derive(clap::Args)]
pub struct Args {
    /// The folder images arrive in.
    pub dir: PathBuf,
    /// Model file written by `flawscope fit`.
    #[arg(long)]
    pub model: PathBuf,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// A typed defect ("a crack") checked on every image by the model's
    /// text layer, as `score --defect` (repeatable).
    #[arg(long = "defect", value_name = "TEXT")]
    pub defects: Vec<String>,
    /// CLIP checkpoint folder for typed defects (else
    /// FLAWSCOPE_CLIP_WEIGHTS, else the Hugging Face cache).
    #[arg(long, value_name = "DIR")]
    pub clip_weights: Option<PathBuf>,
    /// CLIP preset looked up in the Hugging Face cache.
    #[arg(long, default_value = "vit-b-16")]
    pub clip_model: String,
    /// Judge at this false-alarm limit, as `score --max-far`.
    #[arg(long, value_parser = parse_rate, conflicts_with = "max_mar")]
    pub max_far: Option<f64>,
    /// Or at this missed-alarm limit, as `score --max-mar`.
    #[arg(long, value_parser = parse_rate)]
    pub max_mar: Option<f64>,
    /// The results store, which is also the ledger of what was scored and
    /// sent [default: DIR/.flawscope-watch.sqlite].
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// POST every result's JSON here (repeatable); retried on 5xx and
    /// connection errors until acknowledged (2xx).
    #[arg(long, value_name = "URL")]
    pub webhook: Vec<String>,
    /// Send `Authorization: Bearer <the file's text>` to the webhooks.
    #[arg(long, value_name = "FILE")]
    pub webhook_token_file: Option<PathBuf>,
    /// Seconds a webhook may take to answer before the send is retried.
    #[arg(long, default_value_t = 10)]
    pub webhook_timeout_secs: u64,
    /// Publish every result's JSON to this topic with QoS 1 (repeatable):
    /// mqtt://[user[:password]@]host[:port]/topic, mqtts:// for TLS.
    #[arg(long, value_name = "URL")]
    pub mqtt: Vec<String>,
    /// The MQTT client id [default: flawscope-watch-<process id>].
    #[arg(long)]
    pub mqtt_client_id: Option<String>,
    /// PEM file of certificates to trust for mqtts:// besides the system's.
    #[arg(long, value_name = "FILE")]
    pub mqtt_ca: Option<PathBuf>,
    /// Also watch the subfolders (hidden ones skipped).
    #[arg(long, short = 'r')]
    pub recursive: bool,
    /// Move each scored image to OK/ or NG/ under this folder (its path
    /// inside DIR kept); images that could not be scored stay where they are.
    #[arg(long, value_name = "DIR")]
    pub move_to: Option<PathBuf>,
    /// Serve Prometheus metrics (/metrics) and /healthz on this address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Milliseconds a file found by a rescan must keep its size and time
    /// stamp before it is scored (a file closed after writing, or renamed
    /// in, is scored at once).
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Seconds between rescans of the folder (for events a file system
    /// does not give).
    #[arg(long, default_value_t = 5)]
    pub rescan_secs: u64,
    /// Longest wait, in seconds, between tries of a send that failed.
    #[arg(long, default_value_t = 30.0)]
    pub max_backoff_secs: f64,
    /// Seconds to go on sending after SIGTERM before exiting (what is left
    /// is sent after the next start).
    #[arg(long, default_value_t = 10)]
    pub flush_secs: u64,
    /// Largest image file read, in MB (a bigger one is a failed result).
    #[arg(long, default_value_t = 256)]
    pub max_file_mb: u64,
}

fn check(args: &Args) -> Result<(), UsageError> {
    if !args.dir.is_dir() {
        return Err(UsageError(format!(
            "{} is not a folder to watch",
            args.dir.display()
        )));
    }
    let ranges = [
        ("--settle-ms", args.settle_ms, 0, 600_000),
        ("--rescan-secs", args.rescan_secs, 1, 3600),
        ("--webhook-timeout-secs", args.webhook_timeout_secs, 1, 3600),
        ("--flush-secs", args.flush_secs, 0, 3600),
        ("--max-file-mb", args.max_file_mb, 1, 4096),
    ];
    for (flag, value, low, high) in ranges {
        if !(low..=high).contains(&value) {
            return Err(UsageError(format!(
                "{flag} must be between {low} and {high}"
            )));
        }
    }
    if !(0.05..=3600.0).contains(&args.max_backoff_secs) {
        return Err(UsageError(
            "--max-backoff-secs must be between 0.05 and 3600".into(),
        ));
    }
    Ok(())
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading --webhook-token-file {}", path.display()))?;
    if meta.len() > 64 * 1024 {
        return Err(UsageError(format!(
            "--webhook-token-file {} is over 64 KiB: not a token",
            path.display()
        ))
        .into());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --webhook-token-file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.contains(['\n', '\r']) {
        return Err(UsageError(format!(
            "--webhook-token-file {} must hold one line, the token",
            path.display()
        ))
        .into());
    }
    Ok(token.to_owned())
}

/// The sinks the command line names, checked before anything starts.
fn sinks(args: &Args) -> anyhow::Result<Vec<Sink>> {
    let token = args
        .webhook_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let timeout = Duration::from_secs(args.webhook_timeout_secs);
    let mut sinks = Vec::new();
    for url in &args.webhook {
        sinks.push(Sink::Webhook(Webhook::new(url, token.clone(), timeout)?));
    }
    let base = args
        .mqtt_client_id
        .clone()
        .unwrap_or_else(|| format!("flawscope-watch-{}", std::process::id()));
    for (i, url) in args.mqtt.iter().enumerate() {
        // Two connections with one id would throw each other off the broker.
        let id = if i == 0 {
            base.clone()
        } else {
            format!("{base}-{}", i + 1)
        };
        sinks.push(Sink::Mqtt(Box::new(Mqtt::new(
            url,
            &id,
            args.mqtt_ca.as_deref(),
        )?)));
    }
    let mut names: Vec<String> = sinks.iter().map(Sink::name).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(UsageError("the same sink is named twice".into()).into());
    }
    Ok(sinks)
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    super::serve::init_logging();
    check(args)?;
    check_typed_defects(&args.defects)?;
    // Webhooks (reqwest) and mqtts:// both use rustls with ring; an
    // already installed provider is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sinks = sinks(args)?;
    if sinks.is_empty() {
        tracing::warn!("no --webhook or --mqtt: results go to the store and standard output only");
    }
    let clip = ClipArgs {
        clip_weights: args.clip_weights.clone(),
        clip_model: args.clip_model.clone(),
        ..ClipArgs::default()
    };
    let runtime = clip.runtime(args.device.device()?)?;
    let inspector = load_model(&args.model, &runtime)?;
    inspector
        .prepare_defects(&args.defects)
        .map_err(setup_error)?;
    let target =
        Target::from_request(args.max_far, args.max_mar).map_err(|e| UsageError(e.to_string()))?;
    let point = inspector
        .operating_point(target)
        .map_err(|e| UsageError(e.to_string()))?;
    tracing::info!("operating point: {}", point.describe());
    let (name, identity) = store_model_entry(Some(&args.model), &inspector, &args.defects, &point)?;
    let scorer = InspectorScorer::new(Arc::new(inspector), ImageLimits::default(), None)
        .with_prompts(args.defects.clone())
        .map_err(|e| UsageError(format!("--defect: {e}")))?
        .with_operating_point(point.clone());

    let dir = std::path::absolute(&args.dir).context("reading the current folder")?;
    let db = args.db.clone().unwrap_or_else(|| dir.join(DEFAULT_DB));
    let store = Store::open(&db)?;
    let model = store.model(&name, &identity)?;
    let move_to = match &args.move_to {
        Some(target) => {
            for sub in ["OK", "NG"] {
                std::fs::create_dir_all(target.join(sub))
                    .with_context(|| format!("creating {}", target.join(sub).display()))?;
            }
            Some(std::path::absolute(target).context("reading the current folder")?)
        }
        None => None,
    };
    let names: Vec<String> = sinks.iter().map(Sink::name).collect();
    let metrics = Arc::new(Metrics::new(&names));
    // A sink seen for the first time starts after the newest message, not
    // with the ledger's whole history.
    let mut tasks_since = Vec::new();
    for sink_name in &names {
        let key = format!("watch.sink.{sink_name}");
        let since = match store.setting(&key)? {
            Some(text) => text.parse::<i64>().unwrap_or(0),
            None => {
                let newest = store.newest_message()?;
                store.set_setting(&key, &newest.to_string())?;
                newest
            }
        };
        tasks_since.push(since);
    }
    let folder = FolderOptions {
        dir: dir.clone(),
        recursive: args.recursive,
        skip: move_to.iter().cloned().chain([db.clone()]).collect(),
        settle: Duration::from_millis(args.settle_ms),
        stalled: Duration::from_millis(args.settle_ms).max(Duration::from_secs(10)),
        rescan: Duration::from_secs(args.rescan_secs),
    };

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = tokio.block_on(async {
        let signal =
            flawscope_server::shutdown_signal().context("installing the signal handlers")?;
        if let Some(addr) = args.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} (--metrics-addr)"))?;
            let local = listener.local_addr().context("reading the bound address")?;
            let mut stdout = std::io::stdout();
            writeln!(stdout, "metrics on http://{local}/metrics")?;
            stdout.flush()?;
            let router = metrics::router(Arc::clone(&metrics));
            tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, router).await {
                    tracing::error!("metrics server: {err}");
                }
            });
        }
        let news = Arc::new(watch::Sender::new(0u64));
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let mut running = Vec::new();
        for (sink, since) in sinks.into_iter().zip(tasks_since) {
            let task = SinkTask {
                name: sink.name(),
                sink,
                store: Arc::new(Mutex::new(Store::open(&db)?)),
                since,
                metrics: Arc::clone(&metrics),
                max_backoff: Duration::from_secs_f64(args.max_backoff_secs),
                news: news.subscribe(),
                phase: phase_rx.clone(),
            };
            running.push(tokio::spawn(task.run()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        // Bounded: a scorer that falls behind holds the folder reader back.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1024);
        let watcher = {
            let (stop, metrics) = (Arc::clone(&stop), Arc::clone(&metrics));
            std::thread::Builder::new()
                .name("watch-folder".into())
                .spawn(move || folder::watch(folder, ready_tx, stop, metrics))
                .context("starting the folder watcher")?
        };
        let line = Line {
            scorer,
            store,
            model,
            point,
            dir,
            move_to,
            max_file: args.max_file_mb * 1024 * 1024,
            metrics: Arc::clone(&metrics),
            news: Arc::clone(&news),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let scorer = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("watch-scorer".into())
                .spawn(move || {
                    let result = line.run(&ready_rx, &stop);
                    let _ = done_tx.send(());
                    result
                })
                .context("starting the scorer")?
        };
        tracing::info!(
            "watching {}{} with {name}; ledger {}; sinks: {}",
            args.dir.display(),
            if args.recursive {
                " and its subfolders"
            } else {
                ""
            },
            db.display(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
        tokio::select! {
            () = signal => tracing::info!("stopping: finishing the image in hand"),
            _ = done_rx => {}
        }
        stop.store(true, Ordering::Relaxed);
        let scored = tokio::task::spawn_blocking(move || scorer.join())
            .await
            .context("waiting for the scorer")?;
        let _ = tokio::task::spawn_blocking(move || watcher.join()).await;
        let flush = Duration::from_secs(args.flush_secs);
        let _ = phase_tx.send(Phase::Draining(tokio::time::Instant::now() + flush));
        for task in running {
            match tokio::time::timeout(flush + Duration::from_secs(5), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => tracing::error!("a sink stopped: {err:#}"),
                Ok(Err(err)) => tracing::error!("a sink stopped: {err}"),
                Err(_) => tracing::warn!("a sink did not stop in time"),
            }
        }
        drop(news);
        match scored {
            Ok(Ok(())) => anyhow::Ok(Outcome::Success),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(anyhow::anyhow!("the scorer panicked")),
        }
    });
    // Sends still waiting on a slow answer are dropped with the runtime.
    tokio.shutdown_timeout(Duration::from_secs(1));
    let outcome = outcome?;
    tracing::info!("stopped");
    Ok(outcome)
}

/// The scorer's side: each ready file scored once, kept, and announced.
struct Line {
    scorer: InspectorScorer,
    store: Store,
    model: ModelRef,
    point: OperatingPoint,
    dir: PathBuf,
    move_to: Option<PathBuf>,
    max_file: u64,
    metrics: Arc<Metrics>,
    news: Arc<watch::Sender<u64>>,
}

/// A result before it is kept: the JSON sent, and the verdict for
/// `--move-to` (`None` when the image could not be scored).
struct Made {
    payload: Value,
    verdict: Option<Verdict>,
}

impl Line {
    fn run(&self, ready: &Receiver<PathBuf>, stop: &AtomicBool) -> anyhow::Result<()> {
        let result = self.take(ready, stop);
        if let Err(err) = &result {
            self.metrics.set_unhealthy();
            tracing::error!("the scorer stopped: {err:#}");
        }
        result
    }

    fn take(&self, ready: &Receiver<PathBuf>, stop: &AtomicBool) -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            match ready.recv_timeout(Duration::from_millis(100)) {
                Ok(path) => {
                    self.metrics.taken();
                    self.process(&path)?;
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The watcher also ends on a stop, maybe first.
                Err(RecvTimeoutError::Disconnected) if stop.load(Ordering::Relaxed) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(anyhow::anyhow!("the folder watcher stopped"));
                }
            }
        }
        Ok(())
    }

    /// Scores one file unless the ledger already holds its result; only a
    /// store failure is an error (a bad image is a failed result).
    fn process(&self, file: &Path) -> anyhow::Result<()> {
        let path = store_path(file);
        let bytes = match read_bounded(&path, self.max_file) {
            Ok(bytes) => bytes,
            Err(Unreadable::Gone(err)) => {
                // Moved or deleted before it could be read: nothing to say.
                tracing::warn!("{}: {err}; skipped", path.display());
                return Ok(());
            }
            Err(Unreadable::TooBig(len)) => {
                // Not read whole, so named by its size alone.
                let hash = format!("size:{len}");
                let error = format!(
                    "{} is {len} bytes, over --max-file-mb {}",
                    path.display(),
                    self.max_file / (1024 * 1024)
                );
                return self.keep(&path, &hash, failed(&path, &error));
            }
        };
        let hash = content_hash(&bytes);
        if path.to_str().is_none() {
            // JSON strings are UTF-8: such a name could not be sent as is.
            let error = format!(
                "{}: the file name is not UTF-8; rename the file",
                path.to_string_lossy()
            );
            return self.keep(&path, &hash, failed(&path, &error));
        }
        let key = idempotency_key(&self.model, &path, &hash);
        if let Some(kept) = self.store.message_by_key(&key)? {
            self.metrics.skipped();
            tracing::debug!("{}: already scored ({key})", path.display());
            let verdict = serde_json::from_str::<Value>(&kept.payload)
                .ok()
                .and_then(|v| v.get("is_anomalous").and_then(Value::as_bool))
                .map(|bad| if bad { Verdict::Anomalous } else { Verdict::Ok });
            self.move_file(&path, verdict);
            return Ok(());
        }
        let made = match self.store.lookup(&self.model, &path)? {
            // Scored and kept before a stop, its message not yet made:
            // not scored again.
            Some(row) if row.content_hash == hash => self.made_of(&row)?,
            _ => match self.scorer.score(&path, &bytes) {
                Ok(scored) => {
                    let row = scored.record(&self.store, &self.model, &path, &hash)?;
                    self.made_of(&row)?
                }
                Err(err) => failed(&path, &err.to_string()),
            },
        };
        self.keep(&path, &hash, made)
    }

    fn made_of(&self, row: &flawscope_results::store::StoredResult) -> anyhow::Result<Made> {
        let line = ScoreLine {
            path: &row.path,
            heatmap: None,
            answer: stored_answer(row, &self.point),
        };
        Ok(Made {
            payload: serde_json::to_value(&line).context("writing a result as JSON")?,
            verdict: Some(row.verdict),
        })
    }

    /// Keeps the result in the ledger, prints it, wakes the sinks, and
    /// moves the file.
    fn keep(&self, path: &Path, hash: &str, made: Made) -> anyhow::Result<()> {
        let key = idempotency_key(&self.model, path, hash);
        if self.store.message_by_key(&key)?.is_some() {
            // Made before a restart (a file refused before scoring).
            self.metrics.skipped();
            return Ok(());
        }
        let mut payload = made.payload;
        if let Value::Object(fields) = &mut payload {
            fields.insert("id".into(), Value::String(key.clone()));
            let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
            fields.insert("sha256".into(), Value::String(hex.to_owned()));
            let status = if made.verdict.is_some() {
                "scored"
            } else {
                "failed"
            };
            fields.insert("status".into(), Value::String(status.into()));
        }
        let text = serde_json::to_string(&payload).context("writing a result as JSON")?;
        self.store.add_message(
            &self.model,
            &NewMessage {
                key: &key,
                path,
                content_hash: hash,
                failed: made.verdict.is_none(),
                payload: &text,
            },
        )?;
        match made.verdict {
            Some(verdict) => {
                self.metrics.scored();
                tracing::info!("{}: {}", path.display(), verdict.as_str());
            }
            None => {
                self.metrics.failed();
                let why = payload.get("error").and_then(Value::as_str).unwrap_or("");
                tracing::warn!("{}: could not be scored: {why}", path.display());
            }
        }
        let mut stdout = std::io::stdout().lock();
        // Standard output is a convenience (a pipe, the journal): a closed
        // one does not stop the watch.
        let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
        drop(stdout);
        self.news.send_modify(|n| *n = n.wrapping_add(1));
        self.move_file(path, made.verdict);
        Ok(())
    }

    /// `--move-to`: the image to OK/ or NG/, its path inside the watched
    /// folder kept; never over another file.
    fn move_file(&self, path: &Path, verdict: Option<Verdict>) {
        let (Some(target), Some(verdict)) = (&self.move_to, verdict) else {
            return;
        };
        let sub = if verdict == Verdict::Anomalous {
            "NG"
        } else {
            "OK"
        };
        let relative = match path.strip_prefix(&self.dir) {
            Ok(inside) => inside.to_path_buf(),
            Err(_) => PathBuf::from(path.file_name().unwrap_or_default()),
        };
        let mut dest = target.join(sub).join(relative);
        if let Err(err) = move_no_clobber(path, &mut dest) {
            tracing::error!(
                "{}: could not move to {}: {err}",
                path.display(),
                dest.display()
            );
        }
    }
}

/// The result of an image that could not be scored.
fn failed(path: &Path, error: &str) -> Made {
    Made {
        payload: json!({ "path": path.to_string_lossy(), "error": error }),
        verdict: None,
    }
}

enum Unreadable {
    Gone(std::io::Error),
    TooBig(u64),
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, Unreadable> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(Unreadable::Gone)?;
    let len = file.metadata().map_err(Unreadable::Gone)?.len();
    if len > max {
        return Err(Unreadable::TooBig(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // Read no further than the bound, whatever the file grew to.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(Unreadable::Gone)?;
    if bytes.len() as u64 > max {
        return Err(Unreadable::TooBig(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Renames `from` to `dest` (or `name-2.ext`, … when taken); across file
/// systems, copies to a temporary name beside `dest`, renames it into place
/// and removes `from`.
fn move_no_clobber(from: &Path, dest: &mut PathBuf) -> std::io::Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let stem = dest
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = dest
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut n = 2;
    while dest.exists() {
        dest.set_file_name(format!("{stem}-{n}{ext}"));
        n += 1;
    }
    match std::fs::rename(from, &*dest) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(18) => {
            // EXDEV: another file system.
            let tmp = dest.with_file_name(format!(".{stem}{ext}.part"));
            std::fs::copy(from, &tmp)?;
            std::fs::rename(&tmp, &*dest)?;
            std::fs::remove_file(from)
        }
        Err(err) => Err(err),
    }
}
