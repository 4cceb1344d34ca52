//! HTTP and gRPC service: scores images sent by bots and other programs
//! with the models of a folder and answers with JSON (own `/v1` API,
//! chat-ops `/v1/ask`, Open Inference Protocol v2 over REST, Prometheus
//! `/metrics`) and, on its own port, the Open Inference Protocol v2 over
//! gRPC ([`grpc`]). `GET /` is a web page for engineers that uses the same
//! API. Logs go through `tracing`; the binary installs the subscriber.

mod answer;
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
    AppState, NO_ZERO_SHOT, ServedModel, ServerConfig, Slot, Token, ZeroShot, ZeroShotScorer,
    is_servable_name, load_models,
};
pub use web::UPLOAD_PREFIX;

/// Extra time, past the request timeout, that shutdown waits for requests
/// in flight before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `state` on `listener` until `shutdown` completes, then stops
/// accepting, lets requests in flight finish (for at most the request
/// timeout plus [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let grace = state.config().timeout + SHUTDOWN_GRACE;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let draining = state.clone();
    let signal = async move {
        shutdown.await;
        draining.set_draining();
        tracing::info!("shutting down; finishing the requests in flight");
        let _ = started_tx.send(());
    };
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(signal);
    let deadline = async move {
        if started_rx.await.is_err() {
            // The server ended without a shutdown signal.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server.into_future() => result,
        () = deadline => {
            tracing::warn!(?grace, "requests still open after the grace period; stopping anyway");
            Ok(())
        }
    }
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
