//! `flawscope serve`: the HTTP service and, with `--grpc-addr`, the gRPC one
//! (see the `flawscope-server` crate).

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flawscope_results::store::{Store, file_hash};
use flawscope_server::{
    AppState, ResultsStore, ServerConfig, ServerError, StoredModel, Token, load_models,
};

use super::clip::{ClipArgs, setup_error};
use super::options::DeviceChoice;
use super::{Outcome, UsageError};

#[derive(clap::Args)]
pub struct Args {
    /// Folder of model files: each NAME.flawscope is served as NAME.
    #[arg(long, default_value = ".")]
    pub models: PathBuf,
    /// Address to listen on (port 0 picks a free port). The first line on
    /// stdout is `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Also serve the Open Inference Protocol v2 over gRPC (KServe's
    /// inference.GRPCInferenceService) on this address, sharing models,
    /// limits, token and metrics with HTTP. The second line on stdout is
    /// then `grpc listening on ADDR`.
    #[arg(long, value_name = "ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// File holding a bearer token; every route but health then needs
    /// `Authorization: Bearer TOKEN`.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Inference requests at once; more wait in a queue (default: CPU cores).
    #[arg(long)]
    pub max_concurrent: Option<usize>,
    /// Requests that may wait for an inference slot; more are refused with
    /// 503 and Retry-After at once (default: 16 × --max-concurrent; 0: no queue).
    #[arg(long)]
    pub max_queued: Option<usize>,
    /// Longest wait in the queue, in seconds, before a 503.
    #[arg(long, default_value_t = 5)]
    pub queue_wait_secs: u64,
    /// Longest time one request may take, in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Longest time to receive a request body, in seconds (408 after that).
    /// Bodies are read before an inference slot is taken.
    #[arg(long, default_value_t = 10)]
    pub body_timeout_secs: u64,
    /// Largest request body, in MB.
    #[arg(long, default_value_t = 20)]
    pub body_limit_mb: usize,
    /// HTTP connections open at once; more wait until one closes (lowered
    /// to fit the process's descriptor limit, which is raised to its hard
    /// limit first).
    #[arg(long, default_value_t = flawscope_server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Longest wait, in seconds, for a request's headers, from when a
    /// connection opens or its last answer went out (also the idle
    /// keep-alive timeout); the connection is closed after it.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// CLIP checkpoint folder for /v1/zero-shot and WinCLIP model files
    /// (also FLAWSCOPE_CLIP_WEIGHTS). Without either, /v1/zero-shot answers
    /// 503 unless --clip-model is given (then the Hugging Face cache is used).
    #[arg(long, value_name = "DIR")]
    pub clip_weights: Option<PathBuf>,
    /// CLIP preset for /v1/zero-shot (vit-b-16, vit-l-14, vit-l-14-336);
    /// giving it asks for zero-shot even without a weights folder.
    #[arg(long)]
    pub clip_model: Option<String>,
    /// Where the networks run.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Also accept requests for this host name (repeatable; `*.DOMAIN` for
    /// a domain's names, `*` for any). IP addresses and localhost are always
    /// accepted; other names are refused with 403, so a rebound DNS name
    /// cannot reach the service from a browser.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
    /// Results database (the one `flawscope tui` and `score --db` use) where
    /// the web page's OK / NG decisions are recorded; without it the page
    /// shows results but cannot record decisions.
    #[arg(long)]
    pub db: Option<PathBuf>,
}

/// Opens the results store and files each served model as `score --db`
/// does: under its file's path, known by the file's SHA-256.
fn results_store(
    db: &std::path::Path,
    models: &std::path::Path,
    names: &[String],
) -> anyhow::Result<ResultsStore> {
    let store = Store::open(db)?;
    let mut entries = BTreeMap::new();
    for name in names {
        let path = models.join(format!("{name}.flawscope"));
        // Hashed again after loading: a file replaced in between would be
        // filed under its new content, which the TUI would also see.
        let identity = file_hash(&path)?;
        entries.insert(
            name.clone(),
            StoredModel {
                name: path.display().to_string(),
                identity,
            },
        );
    }
    Ok(ResultsStore::new(store, entries))
}

/// Descriptors kept for everything but HTTP connections: model and weight
/// files, the gRPC listener and its connections, logs, the results store.
const RESERVED_DESCRIPTORS: u64 = 128;

/// `wanted` HTTP connections, fewer when the descriptor limit (raised to
/// its hard limit first) leaves less room: at the limit, accepting fails
/// and `/healthz` goes unanswered, which the cap avoids by waiting instead.
fn connection_cap(wanted: usize) -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft));
    match limit {
        Ok(limit) => {
            let room = usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS).max(16))
                .unwrap_or(usize::MAX);
            if room < wanted {
                tracing::warn!(
                    "the descriptor limit ({limit}) leaves room for {room} connections; \
                     --max-connections {wanted} lowered to {room}"
                );
            }
            wanted.min(room)
        }
        Err(_) => wanted,
    }
}

fn usage_or_failure(err: ServerError) -> anyhow::Error {
    match err {
        ServerError::Model { .. } => anyhow::Error::new(err),
        other => UsageError(other.to_string()).into(),
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`: one line per request).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Already set (a second server in one process) is fine.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .try_init();
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    init_logging();
    if !(1..=3600).contains(&args.timeout_secs) {
        return Err(UsageError("--timeout-secs must be between 1 and 3600".into()).into());
    }
    if !(1..=3600).contains(&args.body_timeout_secs) {
        return Err(UsageError("--body-timeout-secs must be between 1 and 3600".into()).into());
    }
    if !(1..=1024).contains(&args.body_limit_mb) {
        return Err(UsageError("--body-limit-mb must be between 1 and 1024".into()).into());
    }
    if !(1..=3600).contains(&args.header_timeout_secs) {
        return Err(UsageError("--header-timeout-secs must be between 1 and 3600".into()).into());
    }
    if !(1..=1_000_000).contains(&args.max_connections) {
        return Err(UsageError("--max-connections must be between 1 and 1000000".into()).into());
    }
    let mut config = ServerConfig {
        max_connections: connection_cap(args.max_connections),
        header_timeout: Duration::from_secs(args.header_timeout_secs),
        timeout: Duration::from_secs(args.timeout_secs),
        body_timeout: Duration::from_secs(args.body_timeout_secs),
        body_limit: args.body_limit_mb * 1024 * 1024,
        allowed_hosts: args.allow_hosts.clone(),
        ..ServerConfig::default()
    };
    if let Some(n) = args.max_concurrent {
        if !(1..=1024).contains(&n) {
            return Err(UsageError("--max-concurrent must be between 1 and 1024".into()).into());
        }
        config = config.with_slots(n);
    }
    if let Some(n) = args.max_queued {
        if n > 4096 {
            return Err(UsageError("--max-queued must be at most 4096".into()).into());
        }
        config.max_queued = n;
    }
    if args.queue_wait_secs > 3600 {
        return Err(UsageError("--queue-wait-secs must be at most 3600".into()).into());
    }
    config.queue_wait = Duration::from_secs(args.queue_wait_secs);
    let token = args
        .token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()
        .map_err(usage_or_failure)?;
    let clip = ClipArgs {
        object: None,
        prompts: Vec::new(),
        clip_weights: args.clip_weights.clone(),
        clip_model: args
            .clip_model
            .clone()
            .unwrap_or_else(|| "vit-b-16".to_owned()),
    };
    let lookup = clip.lookup();
    let runtime = Arc::new(clip.runtime(args.device.device()?)?);
    let models = load_models(&args.models, &runtime).map_err(usage_or_failure)?;
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let mut state = AppState::new(models, config.clone())
        .map_err(usage_or_failure)?
        .with_runtime(Arc::clone(&runtime));
    if let Some(token) = token {
        state = state.with_token(token);
    }
    if let Some(db) = &args.db {
        state = state.with_results(results_store(db, &args.models, &names)?);
        tracing::info!("the web page's OK / NG decisions go to {}", db.display());
    }
    // Zero-shot only when asked for: a weights folder (flag or environment)
    // or an explicit --clip-model; never a surprise download at startup.
    let asked = lookup.flag_dir.is_some() || lookup.env_dir.is_some() || args.clip_model.is_some();
    if asked {
        let engine = runtime.clip().map_err(setup_error)?;
        tracing::info!(
            "zero-shot: CLIP {} from {}",
            engine.checkpoint().label(),
            engine.checkpoint().dir.display()
        );
        state = state.with_zero_shot(runtime);
    }

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    tokio.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let local = listener.local_addr().context("reading the bound address")?;
        let grpc_listener = match args.grpc_addr {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr} (gRPC)"))?,
            ),
            None => None,
        };
        let signal =
            flawscope_server::shutdown_signal().context("installing the signal handlers")?;
        // One signal stops both servers.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {local}")?;
        let grpc_local = match &grpc_listener {
            Some(l) => {
                let addr = l.local_addr().context("reading the bound gRPC address")?;
                writeln!(stdout, "grpc listening on {addr}")?;
                Some(addr)
            }
            None => None,
        };
        stdout.flush()?;
        tracing::info!(
            "serving {} model(s) [{}] on http://{local}{}; {} inference slot(s), queue of {} \
             (≤ {} s wait), {} s timeout, {} s body timeout, {} MB body limit, {} connections, \
             {} s header timeout; needs up to {} MiB at full concurrency{}",
            names.len(),
            names.join(", "),
            grpc_local.map_or_else(String::new, |a| format!(" and grpc://{a}")),
            config.max_concurrent,
            config.max_queued,
            args.queue_wait_secs,
            args.timeout_secs,
            args.body_timeout_secs,
            args.body_limit_mb,
            config.max_connections,
            args.header_timeout_secs,
            config.memory_mib(),
            if state.token().is_some() {
                ", bearer token required"
            } else {
                ""
            }
        );
        let grpc = async {
            match grpc_listener {
                Some(listener) => {
                    flawscope_server::grpc::serve(listener, state.clone(), stopped(stop_rx.clone()))
                        .await
                        .context("serving gRPC")
                }
                None => Ok(()),
            }
        };
        let http = async {
            flawscope_server::serve(listener, state.clone(), stopped(stop_rx.clone()))
                .await
                .context("serving HTTP")
        };
        // The first to fail stops the other.
        tokio::try_join!(http, grpc).map(|_| ())
    })?;
    tracing::info!("stopped");
    Ok(Outcome::Success)
}
