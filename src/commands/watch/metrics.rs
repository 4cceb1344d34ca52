//! The watch's Prometheus metrics (text exposition format, as `serve`
//! writes its own) and the `/metrics` and `/healthz` routes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One sink's counters.
#[derive(Debug, Default, Clone)]
struct SinkCounters {
    delivered: u64,
    rejected: u64,
    retries: u64,
    /// Messages not yet answered.
    pending: u64,
    /// Age in seconds of the oldest message not yet answered.
    lag_seconds: f64,
    connected: bool,
}

#[derive(Debug, Default)]
pub struct Metrics {
    seen: AtomicU64,
    scored: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    queued: AtomicU64,
    waiting: AtomicU64,
    sinks: Mutex<BTreeMap<String, SinkCounters>>,
    /// False once the scorer stopped on an error.
    healthy: AtomicBool,
}

impl Metrics {
    pub fn new(sinks: &[String]) -> Self {
        let metrics = Self::default();
        metrics.healthy.store(true, Ordering::Relaxed);
        let mut map = metrics.lock();
        for sink in sinks {
            map.insert(sink.clone(), SinkCounters::default());
        }
        drop(map);
        metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SinkCounters>> {
        // Counters stay valid whatever a panicking holder did.
        self.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A file handed to the scorer.
    pub fn seen(&self) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// The scorer took a file off the queue.
    pub fn taken(&self) {
        // Never below zero, whatever the order of the two threads.
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    pub fn scored(&self) {
        self.scored.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A file whose result the ledger already held (not scored again).
    pub fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Files seen being written, not yet ready.
    pub fn set_waiting(&self, n: usize) {
        self.waiting.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_unhealthy(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn delivered(&self, sink: &str) {
        self.lock().entry(sink.to_owned()).or_default().delivered += 1;
    }

    pub fn rejected(&self, sink: &str) {
        self.lock().entry(sink.to_owned()).or_default().rejected += 1;
    }

    pub fn retried(&self, sink: &str) {
        self.lock().entry(sink.to_owned()).or_default().retries += 1;
    }

    pub fn set_connected(&self, sink: &str, connected: bool) {
        self.lock().entry(sink.to_owned()).or_default().connected = connected;
    }

    pub fn set_lag(&self, sink: &str, pending: u64, lag_seconds: f64) {
        let mut map = self.lock();
        let entry = map.entry(sink.to_owned()).or_default();
        entry.pending = pending;
        entry.lag_seconds = lag_seconds;
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "seen",
                "Files found ready and handed to the scorer.",
                &self.seen,
            ),
            ("scored", "Images scored and kept.", &self.scored),
            (
                "failed",
                "Images that could not be scored (sent as failed results).",
                &self.failed,
            ),
            (
                "skipped",
                "Files whose result the ledger already held.",
                &self.skipped,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP flawscope_watch_{name}_total {help}");
            let _ = writeln!(out, "# TYPE flawscope_watch_{name}_total counter");
            let _ = writeln!(
                out,
                "flawscope_watch_{name}_total {}",
                value.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "queue_depth",
                "Files ready and waiting for the scorer.",
                &self.queued,
            ),
            (
                "files_waiting",
                "Files seen being written, not yet ready.",
                &self.waiting,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP flawscope_watch_{name} {help}");
            let _ = writeln!(out, "# TYPE flawscope_watch_{name} gauge");
            let _ = writeln!(
                out,
                "flawscope_watch_{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let sinks = self.lock().clone();
        type Field = fn(&SinkCounters) -> String;
        let families: [(&str, &str, &str, Field); 6] = [
            (
                "sink_delivered_total",
                "counter",
                "Messages a sink acknowledged.",
                |c| c.delivered.to_string(),
            ),
            (
                "sink_rejected_total",
                "counter",
                "Messages a sink refused for good (HTTP 4xx).",
                |c| c.rejected.to_string(),
            ),
            (
                "sink_retries_total",
                "counter",
                "Failed sends retried.",
                |c| c.retries.to_string(),
            ),
            (
                "sink_pending",
                "gauge",
                "Messages a sink has not acknowledged yet.",
                |c| c.pending.to_string(),
            ),
            (
                "sink_lag_seconds",
                "gauge",
                "Age of the oldest message a sink has not acknowledged.",
                |c| format!("{:.3}", c.lag_seconds),
            ),
            (
                "sink_up",
                "gauge",
                "1 while the last send to a sink succeeded.",
                |c| u8::from(c.connected).to_string(),
            ),
        ];
        for (name, kind, help, field) in families {
            let _ = writeln!(out, "# HELP flawscope_watch_{name} {help}");
            let _ = writeln!(out, "# TYPE flawscope_watch_{name} {kind}");
            for (sink, counters) in &sinks {
                let _ = writeln!(
                    out,
                    "flawscope_watch_{name}{{sink=\"{}\"}} {}",
                    escape_label(sink),
                    field(counters)
                );
            }
        }
        out
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/metrics` and `/healthz` (503 once the scorer stopped on an error).
pub fn router(metrics: std::sync::Arc<Metrics>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let for_metrics = std::sync::Arc::clone(&metrics);
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = std::sync::Arc::clone(&for_metrics);
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let metrics = std::sync::Arc::clone(&metrics);
                async move {
                    if metrics.healthy() {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "the scorer stopped\n")
                    }
                }
            }),
        )
}
