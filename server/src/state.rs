//! What every request shares: the models (loaded once, at startup), the
//! limits, the token, the inference slots and the metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flawscope_core::images::ImageLimits;
use flawscope_core::model::{Inspection, Model};
use flawscope_core::runtime::Runtime;
use image::Rgb32FImage;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ApiError, ServerError};
use crate::metrics::Metrics;
use crate::results_store::{ResultsStore, SharedResults};

/// Default queue length per inference slot (the queue wait bounds the
/// time a request can spend in it anyway).
const QUEUE_PER_SLOT: usize = 16;

/// Memory of the process without requests, in MiB (a model, the network
/// runtime, the allocator's reserve; measured at about 100 MiB).
pub const MEMORY_BASE_MIB: usize = 256;
/// Memory of one request at the default pixel budget (40 MP), in MiB:
/// the decoded image and what scoring it takes (measured at 0.8 GiB for a
/// 6 300 × 6 300 16-bit RGBA PNG).
pub const MEMORY_PER_SLOT_MIB: usize = 1024;

/// Default cap on open HTTP connections (`serve` lowers it to fit the
/// process's descriptor limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Limits of the service.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Inference requests running at once; more wait in the queue.
    pub max_concurrent: usize,
    /// Requests that may wait for a slot; beyond that they are refused with
    /// 503 at once (0: no queue).
    pub max_queued: usize,
    /// Longest wait in the queue before a 503.
    pub queue_wait: Duration,
    /// Longest time one request may take.
    pub timeout: Duration,
    /// Longest time to receive a request body, from when reading starts;
    /// 408 after that. Bodies are read before an inference slot is taken.
    pub body_timeout: Duration,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Pixel budget, checked from the image header before decoding.
    pub image_limits: ImageLimits,
    /// HTTP connections open at once; past it new ones wait in the
    /// kernel's backlog until one closes.
    pub max_connections: usize,
    /// Longest wait for a request's headers, from when the connection opens
    /// or its last answer went out (so also the idle keep-alive timeout);
    /// the connection is closed after it.
    pub header_timeout: Duration,
    /// Host names served besides IP addresses and `localhost`
    /// (`--allow-host`; `*.domain` for a domain's names, `*` for any); see
    /// [`crate::site`].
    pub allowed_hosts: Vec<String>,
}

impl ServerConfig {
    /// `slots` inference slots, with the default queue for that many.
    pub fn with_slots(self, slots: usize) -> Self {
        Self {
            max_concurrent: slots,
            max_queued: QUEUE_PER_SLOT * slots,
            ..self
        }
    }

    /// Requests that may hold a whole body (being decoded, queued or
    /// scored) at once; beyond that a request is refused with 503 when its
    /// body has arrived. Twice what the slots and the queue can admit.
    pub fn max_buffered(&self) -> usize {
        self.max_concurrent
            .saturating_add(self.max_queued)
            .saturating_mul(2)
    }

    /// Pixels of decoded images held at once (decoding, queued or scored):
    /// the pixel budget once per inference slot, so the slots at full
    /// concurrency fit however many requests wait, and memory stays within
    /// [`ServerConfig::memory_mib`]. A request waits for room within the
    /// queue wait (503 after).
    pub fn max_decoded_pixels(&self) -> usize {
        usize::try_from(self.image_limits.max_pixels)
            .unwrap_or(usize::MAX)
            .saturating_mul(self.max_concurrent)
            .min(Semaphore::MAX_PERMITS)
    }

    /// The memory, in MiB, this configuration needs at full concurrency
    /// with the largest allowed image in every slot: [`MEMORY_BASE_MIB`]
    /// (the process, a model, the runtime) + [`MEMORY_PER_SLOT_MIB`] per
    /// slot (one image at the 40 MP budget, decoded and scored; measured
    /// at 0.8 GiB) + the request bytes held ([`Self::max_body_bytes`]).
    /// The shipped KServe runtime's memory limit is set by it.
    pub fn memory_mib(&self) -> usize {
        let per_slot = MEMORY_PER_SLOT_MIB as f64 * self.image_limits.max_pixels as f64
            / flawscope_core::images::DEFAULT_MAX_PIXELS as f64;
        MEMORY_BASE_MIB
            + (per_slot.ceil() as usize).saturating_mul(self.max_concurrent)
            + self.max_body_bytes().div_ceil(1 << 20)
    }

    /// Bytes of request bodies held at once, counted as they arrive: the
    /// body limit times (slots + 4). A body that would take the total past
    /// it is refused with 503; a stalled upload holds only the bytes it
    /// sent, so stalled uploads cannot lock the others out.
    pub fn max_body_bytes(&self) -> usize {
        self.body_limit
            .saturating_mul(self.max_concurrent.saturating_add(4))
            .min(Semaphore::MAX_PERMITS)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        // One slot per CPU core; `with_slots` sets both slot fields.
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            max_concurrent: 0,
            max_queued: 0,
            queue_wait: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
            body_limit: 20 * 1024 * 1024,
            image_limits: ImageLimits::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(10),
            allowed_hosts: Vec::new(),
        }
        .with_slots(slots)
    }
}

/// A zero-shot (text-prompted) anomaly scorer, such as WinCLIP; plugged into
/// [`AppState::with_zero_shot`] once one exists.
pub trait ZeroShotScorer: Send + Sync {
    /// Scores `image` as an `object`, with user defect descriptions.
    fn inspect(
        &self,
        image: &Rgb32FImage,
        object: &str,
        prompts: &[String],
    ) -> Result<Inspection, flawscope_core::Error>;
}

/// Why `/v1/zero-shot` answers 503 when nothing else was said.
pub const NO_ZERO_SHOT: &str = "zero-shot scoring is not available: no CLIP weights are configured \
     (start the server with --clip-weights DIR or set FLAWSCOPE_CLIP_WEIGHTS)";

/// The zero-shot engine, or why there is none.
#[derive(Clone)]
pub enum ZeroShot {
    Engine(Arc<dyn ZeroShotScorer>),
    Unavailable(String),
}

/// One served model file.
pub struct ServedModel {
    pub name: String,
    pub model: Arc<Model>,
}

/// The runtime answers `/v1/zero-shot` with a WinCLIP model made per
/// request from its object and prompts; the text side is cached across
/// requests by the shared CLIP engine.
impl ZeroShotScorer for Runtime {
    fn inspect(
        &self,
        image: &Rgb32FImage,
        object: &str,
        prompts: &[String],
    ) -> Result<Inspection, flawscope_core::Error> {
        Model::zero_shot(self, object, prompts)?.inspect(image)
    }
}

/// The credentials of an `Authorization` value (HTTP header or gRPC
/// metadata) in the `Bearer` scheme (any case), trimmed; `None` for any
/// other scheme or a value without credentials.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The one version of every served model (a model file has one).
pub const MODEL_VERSION: &str = "1";

/// A bearer token, kept as its SHA-256 so comparison takes the same time
/// whatever the candidate's length or content.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    pub fn new(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Reads a token file (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ServerError::TokenFile {
            path: path.to_owned(),
            cause,
        })?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(ServerError::EmptyToken(path.to_owned()));
        }
        Ok(Self::new(secret))
    }

    /// Constant-time comparison with a candidate.
    pub fn matches(&self, candidate: &str) -> bool {
        let other: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        self.0
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Shared state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    models: Arc<BTreeMap<String, Arc<Model>>>,
    config: Arc<ServerConfig>,
    token: Option<Token>,
    slots: Arc<Semaphore>,
    /// Bounds the request bodies held at once ([`ServerConfig::max_buffered`]).
    bodies: Arc<Semaphore>,
    /// Bounds the bytes of bodies held, as they arrive
    /// ([`ServerConfig::max_body_bytes`]).
    body_bytes: Arc<Semaphore>,
    /// Bounds the pixels of images decoded and held at once
    /// ([`ServerConfig::max_decoded_pixels`]).
    pixels: Arc<Semaphore>,
    /// Decodes uploads before they wait for a slot. Its own few threads,
    /// not Tokio's blocking pool: inference then stays on few threads and so
    /// in few allocator arenas (sharing the pool doubled the benchmark's RSS).
    decoders: Arc<rayon::ThreadPool>,
    /// Requests waiting for a slot now.
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    zero_shot: ZeroShot,
    /// Where batch scoring (`/v1/batch/score`) runs: the server's device.
    runtime: Arc<Runtime>,
    /// Where the web page's OK / NG decisions go (`serve --db`).
    results: Option<SharedResults>,
    draining: Arc<AtomicBool>,
}

/// A held inference slot; the slot frees when the last clone drops, so work
/// that outlives a timed-out request still counts against the limit.
#[derive(Clone)]
pub struct Slot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// Leave to hold one request body (and the image decoded from it) until
/// dropped, with the body's bytes.
pub(crate) struct BodyPermit {
    #[allow(dead_code)]
    body: OwnedSemaphorePermit,
    #[allow(dead_code)]
    bytes: Option<OwnedSemaphorePermit>,
}

/// Room for one decoded image, held until the answer is ready.
pub(crate) struct PixelPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Counts a request body's bytes against [`ServerConfig::max_body_bytes`]
/// as they arrive ([`AppState::meter`]).
pub(crate) struct Meter {
    held: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    exhausted: Arc<AtomicBool>,
}

impl Meter {
    /// A reading error as the client's answer: 503 when the byte budget
    /// ran out (the body stream failed for that), else `err`.
    pub(crate) fn explain(&self, err: ApiError) -> ApiError {
        if self.exhausted.load(Ordering::SeqCst) {
            ApiError::Overloaded
        } else {
            err
        }
    }

    /// The bytes counted so far, to hold as long as the body.
    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.held.lock().ok().and_then(|mut held| held.take())
    }
}

impl AppState {
    /// State serving `models` under their names.
    pub fn new(models: Vec<ServedModel>, config: ServerConfig) -> Result<Self, ServerError> {
        if config.max_concurrent == 0 || config.max_concurrent > Semaphore::MAX_PERMITS {
            return Err(ServerError::InvalidConfig(
                "the concurrency limit must be at least 1".into(),
            ));
        }
        if config.timeout.is_zero() || config.body_timeout.is_zero() {
            return Err(ServerError::InvalidConfig(
                "the request and body timeouts must be positive".into(),
            ));
        }
        if config.max_connections == 0 || config.header_timeout.is_zero() {
            return Err(ServerError::InvalidConfig(
                "the connection cap and the header timeout must be positive".into(),
            ));
        }
        if config.body_limit == 0 {
            return Err(ServerError::InvalidConfig(
                "the body limit must be positive".into(),
            ));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let decoders = rayon::ThreadPoolBuilder::new()
            .num_threads(config.max_concurrent.min(cores))
            .thread_name(|i| format!("flawscope-decode-{i}"))
            // A decoder that panics on a hostile file fails that request
            // (500), not the process.
            .panic_handler(|_| tracing::error!("an image decoder panicked"))
            .build()
            .map_err(ServerError::DecodeThreads)?;
        let mut map = BTreeMap::new();
        for model in models {
            if !is_servable_name(&model.name) {
                return Err(ServerError::BadModelName(PathBuf::from(model.name)));
            }
            map.insert(model.name, model.model);
        }
        Ok(Self {
            models: Arc::new(map),
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            decoders: Arc::new(decoders),
            bodies: Arc::new(Semaphore::new(
                config.max_buffered().min(Semaphore::MAX_PERMITS),
            )),
            body_bytes: Arc::new(Semaphore::new(config.max_body_bytes())),
            pixels: Arc::new(Semaphore::new(config.max_decoded_pixels())),
            queued: Arc::new(AtomicUsize::new(0)),
            config: Arc::new(config),
            token: None,
            metrics: Arc::new(Metrics::default()),
            zero_shot: ZeroShot::Unavailable(NO_ZERO_SHOT.into()),
            runtime: Arc::new(Runtime::new(flawscope_core::Device::Cpu)),
            results: None,
            draining: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Requires `Authorization: Bearer <token>` on every route but health.
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// Plugs in a zero-shot engine.
    pub fn with_zero_shot(mut self, engine: Arc<dyn ZeroShotScorer>) -> Self {
        self.zero_shot = ZeroShot::Engine(engine);
        self
    }

    /// Scores batches (`/v1/batch/score`) on `runtime`'s device instead of
    /// the CPU.
    pub fn with_runtime(mut self, runtime: Arc<Runtime>) -> Self {
        self.runtime = runtime;
        self
    }

    /// Where batch scoring runs.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Says why `/v1/zero-shot` is unavailable.
    pub fn with_zero_shot_unavailable(mut self, reason: impl Into<String>) -> Self {
        self.zero_shot = ZeroShot::Unavailable(reason.into());
        self
    }

    /// Records the web page's OK / NG decisions in `results`.
    pub fn with_results(mut self, results: ResultsStore) -> Self {
        self.results = Some(Arc::new(results));
        self
    }

    pub fn results(&self) -> Option<&SharedResults> {
        self.results.as_ref()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn models(&self) -> &BTreeMap<String, Arc<Model>> {
        &self.models
    }

    /// The model called `name`, or 404. Names are only looked up in the map
    /// built at startup; they never reach the file system.
    pub fn model(&self, name: &str) -> Result<Arc<Model>, ApiError> {
        self.models
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no model named {name:?}")))
    }

    /// The model `name` at `version` (empty or absent: the latest, the
    /// only one, [`MODEL_VERSION`]), or 404.
    pub(crate) fn versioned_model(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<Model>, ApiError> {
        let model = self.model(name)?;
        match version {
            None | Some("") | Some(MODEL_VERSION) => Ok(model),
            Some(other) => Err(ApiError::NotFound(format!(
                "model {name:?} has no version {other:?}; its only version is \"{MODEL_VERSION}\""
            ))),
        }
    }

    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn zero_shot(&self) -> &ZeroShot {
        &self.zero_shot
    }

    /// An inference slot at once, or 503 when all are busy.
    pub fn try_slot(&self) -> Result<Slot, ApiError> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map(|permit| Slot(Arc::new(permit)))
            .map_err(|_| ApiError::Overloaded)
    }

    /// An inference slot: at once when one is free, else after waiting in
    /// the queue (at most `queue_wait`); 503 when the queue is full or the
    /// wait runs out.
    pub async fn slot(&self) -> Result<Slot, ApiError> {
        if let Ok(slot) = self.try_slot() {
            return Ok(slot);
        }
        let place = QueuePlace::join(&self.queued);
        if place.ahead >= self.config.max_queued {
            return Err(ApiError::Overloaded);
        }
        let wait = Arc::clone(&self.slots).acquire_owned();
        match tokio::time::timeout(self.config.queue_wait, wait).await {
            Ok(Ok(permit)) => Ok(Slot(Arc::new(permit))),
            Ok(Err(_)) | Err(_) => Err(ApiError::Overloaded),
        }
    }

    /// Leave to hold a request body (with what `meter` counted of it), or
    /// 503 at once when [`ServerConfig::max_buffered`] bodies are already
    /// held.
    pub(crate) fn body_permit(&self, meter: Option<&Meter>) -> Result<BodyPermit, ApiError> {
        Arc::clone(&self.bodies)
            .try_acquire_owned()
            .map(|body| BodyPermit {
                body,
                bytes: meter.and_then(Meter::take),
            })
            .map_err(|_| ApiError::Overloaded)
    }

    /// `request` with its body counted against
    /// [`ServerConfig::max_body_bytes`] as it arrives: a chunk past the
    /// budget fails the body (the meter then says 503).
    pub(crate) fn meter(&self, request: axum::extract::Request) -> (axum::extract::Request, Meter) {
        use futures_util::StreamExt as _;
        let held = Arc::new(Mutex::new(None::<OwnedSemaphorePermit>));
        let exhausted = Arc::new(AtomicBool::new(false));
        let meter = Meter {
            held: Arc::clone(&held),
            exhausted: Arc::clone(&exhausted),
        };
        let budget = Arc::clone(&self.body_bytes);
        let request = request.map(|body| {
            axum::body::Body::from_stream(body.into_data_stream().map(move |chunk| {
                let chunk = chunk?;
                let size = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                match Arc::clone(&budget).try_acquire_many_owned(size) {
                    Ok(permit) => {
                        if let Ok(mut held) = held.lock() {
                            match held.as_mut() {
                                Some(all) => all.merge(permit),
                                None => *held = Some(permit),
                            }
                        }
                        Ok(chunk)
                    }
                    Err(_) => {
                        exhausted.store(true, Ordering::SeqCst);
                        Err(axum::Error::new(std::io::Error::other(
                            "the server holds as many request bytes as it may",
                        )))
                    }
                }
            }))
        });
        (request, meter)
    }

    /// Room for a decoded image of `pixels` pixels, waiting at most the
    /// queue wait; 503 after.
    pub(crate) async fn pixel_permit(&self, pixels: u64) -> Result<PixelPermit, ApiError> {
        let pixels = u32::try_from(pixels).unwrap_or(u32::MAX);
        let room = Arc::clone(&self.pixels);
        if let Ok(permit) = Arc::clone(&room).try_acquire_many_owned(pixels) {
            return Ok(PixelPermit(Some(permit)));
        }
        match tokio::time::timeout(self.config.queue_wait, room.acquire_many_owned(pixels)).await {
            Ok(Ok(permit)) => Ok(PixelPermit(Some(permit))),
            _ => Err(ApiError::Overloaded),
        }
    }

    /// Bytes of request bodies held now (arrived and not yet answered).
    pub fn body_bytes_held(&self) -> usize {
        self.config
            .max_body_bytes()
            .saturating_sub(self.body_bytes.available_permits())
    }

    /// The threads that decode uploads.
    pub(crate) fn decoders(&self) -> &rayon::ThreadPool {
        &self.decoders
    }

    /// Request bodies held now (being read, decoded, queued or scored).
    pub fn buffered(&self) -> usize {
        self.config
            .max_buffered()
            .min(Semaphore::MAX_PERMITS)
            .saturating_sub(self.bodies.available_permits())
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Inference slots in use.
    pub fn busy_slots(&self) -> usize {
        self.config
            .max_concurrent
            .saturating_sub(self.slots.available_permits())
    }

    /// Marks the service as shutting down: readiness turns 503.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// A place in the slot queue; leaving (also by a cancelled request) frees
/// it.
struct QueuePlace<'a> {
    queued: &'a AtomicUsize,
    /// Requests that were already waiting when this one joined.
    ahead: usize,
}

impl<'a> QueuePlace<'a> {
    fn join(queued: &'a AtomicUsize) -> Self {
        let ahead = queued.fetch_add(1, Ordering::SeqCst);
        Self { queued, ahead }
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Model names: `[A-Za-z0-9._-]+`, not starting with '.', at most 128 bytes.
pub fn is_servable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Loads every `*.flawscope` file directly inside `dir`, named by file stem;
/// models find their networks (CLIP weights included) through `runtime`.
pub fn load_models(dir: &Path, runtime: &Runtime) -> Result<Vec<ServedModel>, ServerError> {
    let dir_error = |cause| ServerError::ModelDir {
        dir: dir.to_owned(),
        cause,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let path = entry.map_err(dir_error)?.path();
        if path.extension().is_some_and(|e| e == "flawscope") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(ServerError::NoModels(dir.to_owned()));
    }
    let mut models = Vec::with_capacity(paths.len());
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| is_servable_name(s))
            .ok_or_else(|| ServerError::BadModelName(path.clone()))?
            .to_owned();
        let model =
            Model::load(&path, runtime).map_err(|cause| ServerError::Model { path, cause })?;
        models.push(ServedModel {
            name,
            model: Arc::new(model),
        });
    }
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compares_whole_secret() {
        let token = Token::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret "));
        assert!(!token.matches(""));
    }

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("  bearer   abc  "), Some("abc"));
        assert_eq!(bearer("BEARER a b"), Some("a b"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn servable_names() {
        for ok in ["cells", "solar_cell-v2.1"] {
            assert!(is_servable_name(ok), "{ok}");
        }
        for bad in ["", "..", ".hidden", "a/b", "a\\b", "a b", "é"] {
            assert!(!is_servable_name(bad), "{bad}");
        }
    }
}
