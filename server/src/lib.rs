//! HTTP and gRPC service: scores images sent by bots and other programs
//! with the models of a folder and answers with JSON (own `/v1` API,
//! chat-ops `/v1/ask`, Open Inference Protocol v2 over REST, Prometheus
//! `/metrics`) and, on its own port, the Open Inference Protocol v2 over
//! gRPC ([`grpc`]). `GET /` is a web page for engineers that uses the same
//! API. Logs go through `tracing`; the binary installs the subscriber.

mod answer;
mod batch;
mod error;
mod extract;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
mod inference;
mod metrics;
mod oip;
mod oip_json;
mod question;
mod results_store;
mod routes;
pub mod site;
mod state;
mod upload;
mod web;

use std::future::Future;
use std::time::Duration;

pub use error::{ApiError, ServerError, error_json};
pub use metrics::Metrics;
pub use results_store::{ResultsStore, StoredModel};
pub use routes::{HEALTH_ROUTES, app};
pub use state::{
    AppState, DEFAULT_MAX_CONNECTIONS, MEMORY_BASE_MIB, MEMORY_PER_SLOT_MIB, NO_ZERO_SHOT,
    ServedModel, ServerConfig, Slot, Token, ZeroShot, ZeroShotScorer, is_servable_name,
    load_models,
};
pub use web::UPLOAD_PREFIX;

/// Extra time, past the request timeout, that shutdown waits for requests
/// in flight before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `state` on `listener` until `shutdown` completes, then stops
/// accepting, lets requests in flight finish (for at most the request
/// timeout plus [`SHUTDOWN_GRACE`]) and returns.
///
/// Each connection is served by hyper's HTTP/1 connection builder (not
/// `axum::serve`, which sets no timeouts): `header_read_timeout`
/// ([`ServerConfig::header_timeout`]) closes a connection that has not sent
/// a whole request head in time, counted from when it opened or its last
/// answer went out, so it is also the idle keep-alive timeout; at most
/// [`ServerConfig::max_connections`] are open at once (a semaphore around
/// accept); further ones wait in the kernel's backlog. 300 idle sockets or
/// 70 stalled uploads then leave `/healthz` answering.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let config = state.config().clone();
    let grace = config.timeout + SHUTDOWN_GRACE;
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(
        config
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let router = app(state.clone());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = std::sync::Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: wait a little rather than spin.
                    tracing::warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(err) = connection.await {
                tracing::debug!(%err, "connection ended");
            }
        });
    }
    drop(listener);
    state.set_draining();
    tracing::info!("shutting down; finishing the requests in flight");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "requests still open after the grace period; stopping anyway");
        }
    }
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C (SIGINT). The handlers are installed when
/// this is called, so call it before announcing the server. Must be called
/// within a Tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}
