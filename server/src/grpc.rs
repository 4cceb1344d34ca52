//! Open Inference Protocol v2 over gRPC: KServe's
//! `inference.GRPCInferenceService` (ServerLive, ServerReady, ModelReady,
//! ServerMetadata, ModelMetadata, ModelInfer) with tonic, on its own port.
//! It shares everything with the HTTP service through [`AppState`]: the
//! models, the inference slots and queue, the body permits, the decoding
//! threads, the limits, the token (metadata `authorization: Bearer ...`;
//! ServerLive and ServerReady stay open, like the HTTP health routes) and
//! the metrics (route label `/inference.GRPCInferenceService/<Method>`,
//! status as the HTTP status of the same error).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Bytes;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Code, Request, Response, Status};

use crate::error::ApiError;
use crate::inference::decode;
use crate::oip::{
    EXTENSIONS, batch_outputs, bytes_elements, check_inputs, infer_image, platform, signature,
    wanted_outputs,
};
use crate::state::{AppState, MODEL_VERSION, bearer};

/// The code generated from `proto/grpc_predict_v2.proto` (package
/// `inference`).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::model_infer_request::InferInputTensor;
use proto::model_infer_response::InferOutputTensor;
use proto::model_metadata_response::TensorMetadata;

/// The gRPC service name, as it appears in request paths.
pub const SERVICE: &str = "inference.GRPCInferenceService";

/// Methods open without a token (the health checks).
const OPEN_METHODS: [&str; 2] = ["ServerLive", "ServerReady"];

/// Room for the protobuf framing around an answer's tensors.
const ENCODING_OVERHEAD: usize = 64 * 1024;

/// The status the protocol's clients get for an error; the message is the
/// one the HTTP routes send.
pub fn status(error: &ApiError) -> Status {
    let code = match error {
        ApiError::BadRequest { .. } => Code::InvalidArgument,
        ApiError::Unauthorized => Code::Unauthenticated,
        ApiError::Forbidden { .. } => Code::PermissionDenied,
        ApiError::NotFound(_) => Code::NotFound,
        ApiError::MethodNotAllowed(_) => Code::Unimplemented,
        // Only the web page's decision route needs a store; not a gRPC call.
        ApiError::NoResultsStore => Code::FailedPrecondition,
        ApiError::PayloadTooLarge(_) => Code::ResourceExhausted,
        ApiError::Overloaded | ApiError::ZeroShotUnavailable(_) | ApiError::ShuttingDown => {
            Code::Unavailable
        }
        ApiError::Timeout(_) | ApiError::BodyTimeout(_) => Code::DeadlineExceeded,
        ApiError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            Code::Internal
        }
    };
    Status::new(code, error.public_message())
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Service {
    state: AppState,
}

impl Service {
    /// Runs one call within the request timeout, counting it in the
    /// metrics under `method`.
    async fn observe<T>(
        &self,
        method: &str,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<Response<T>, Status> {
        let _in_flight = self.state.metrics().start();
        let started = Instant::now();
        let limit = self.state.config().timeout;
        let result = tokio::time::timeout(limit, call)
            .await
            .unwrap_or(Err(ApiError::Timeout(limit)));
        let code = result
            .as_ref()
            .map_or_else(|e| e.status().as_u16(), |_| 200);
        let elapsed = started.elapsed();
        let route = format!("/{SERVICE}/{method}");
        self.state.metrics().record(&route, code, elapsed);
        tracing::info!(
            route,
            status = code,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "grpc request"
        );
        result.map(Response::new).map_err(|e| status(&e))
    }
}

/// The images of a ModelInfer request, checked as REST checks them
/// ([`check_inputs`]): from `raw_input_contents` (`N` length-prefixed
/// elements) or from `contents.bytes_contents` (`N` entries).
fn image_bytes(
    inputs: &[InferInputTensor],
    raw: &mut [Vec<u8>],
    model: &str,
) -> Result<Vec<Bytes>, ApiError> {
    let bad = |message: String| ApiError::bad_request("invalid_inference_request", message);
    let listed: Vec<(&str, &str, &[i64])> = inputs
        .iter()
        .map(|i| (i.name.as_str(), i.datatype.as_str(), i.shape.as_slice()))
        .collect();
    let count = check_inputs(&listed, model)?;
    let input = &inputs[0];
    if !raw.is_empty() {
        // The protocol: raw contents for every input or for none.
        let [contents] = raw else {
            return Err(bad(format!(
                "{} raw_input_contents for 1 input; send one per input",
                raw.len()
            )));
        };
        let contents = std::mem::take(contents);
        return bytes_elements(&input.name, &contents, count);
    }
    match input.contents.as_ref().map(|c| c.bytes_contents.as_slice()) {
        Some(files) if files.len() == count => {
            Ok(files.iter().map(|f| Bytes::copy_from_slice(f)).collect())
        }
        _ => Err(bad(format!(
            "input {:?} must hold {count} bytes_contents element(s) (the image files, as its \
             shape says) or come in raw_input_contents",
            input.name
        ))),
    }
}

fn tensors(list: Vec<crate::oip::TensorMetadata>) -> Vec<TensorMetadata> {
    list.into_iter()
        .map(|t| TensorMetadata {
            name: t.name.to_owned(),
            datatype: t.datatype.to_owned(),
            shape: t.shape,
        })
        .collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _request: Request<proto::ServerLiveRequest>,
    ) -> Result<Response<proto::ServerLiveResponse>, Status> {
        self.observe("ServerLive", async {
            Ok(proto::ServerLiveResponse { live: true })
        })
        .await
    }

    async fn server_ready(
        &self,
        _request: Request<proto::ServerReadyRequest>,
    ) -> Result<Response<proto::ServerReadyResponse>, Status> {
        self.observe("ServerReady", async {
            Ok(proto::ServerReadyResponse {
                ready: !self.state.is_draining(),
            })
        })
        .await
    }

    async fn model_ready(
        &self,
        request: Request<proto::ModelReadyRequest>,
    ) -> Result<Response<proto::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        self.observe("ModelReady", async {
            // An unknown model or version is just not ready (as the
            // reference server answers; REST says so with 404).
            let known = self
                .state
                .versioned_model(&request.name, Some(&request.version))
                .is_ok();
            Ok(proto::ModelReadyResponse {
                ready: known && !self.state.is_draining(),
            })
        })
        .await
    }

    async fn server_metadata(
        &self,
        _request: Request<proto::ServerMetadataRequest>,
    ) -> Result<Response<proto::ServerMetadataResponse>, Status> {
        self.observe("ServerMetadata", async {
            Ok(proto::ServerMetadataResponse {
                name: "flawscope".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
            })
        })
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<proto::ModelMetadataRequest>,
    ) -> Result<Response<proto::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        self.observe("ModelMetadata", async {
            let model = self
                .state
                .versioned_model(&request.name, Some(&request.version))?;
            let (inputs, outputs) = signature();
            Ok(proto::ModelMetadataResponse {
                platform: platform(&model),
                name: request.name,
                versions: vec![MODEL_VERSION.to_owned()],
                inputs: tensors(inputs),
                outputs: tensors(outputs),
            })
        })
        .await
    }

    async fn model_infer(
        &self,
        request: Request<proto::ModelInferRequest>,
    ) -> Result<Response<proto::ModelInferResponse>, Status> {
        let mut request = request.into_inner();
        self.observe("ModelInfer", async {
            let model = self
                .state
                .versioned_model(&request.model_name, Some(&request.model_version))?;
            let wanted = wanted_outputs(request.outputs.iter().map(|o| o.name.as_str()))?;
            let images = image_bytes(
                &request.inputs,
                &mut request.raw_input_contents,
                &request.model_name,
            )?;
            request.raw_input_contents = Vec::new();
            // The message was read under the body permit the gate took; each
            // image is decoded before a slot is taken, as over HTTP, and the
            // images of a batch one at a time.
            let mut answers = Vec::with_capacity(images.len());
            for bytes in images {
                let (image, _pixels) = decode(&self.state, bytes).await?;
                answers.push(
                    infer_image(
                        &self.state,
                        std::sync::Arc::clone(&model),
                        image,
                        &wanted,
                        None,
                    )
                    .await?,
                );
            }
            let outputs = batch_outputs(answers)?;
            // Raw contents, as the reference servers answer: the clients
            // read them by output index.
            let mut raw_output_contents = Vec::with_capacity(outputs.len());
            let outputs = outputs
                .into_iter()
                .map(|o| {
                    raw_output_contents.push(o.data.to_le_bytes());
                    InferOutputTensor {
                        name: o.name.to_owned(),
                        datatype: o.data.datatype().to_owned(),
                        shape: o.shape.iter().map(|&d| d as i64).collect(),
                        parameters: Default::default(),
                        contents: None,
                    }
                })
                .collect();
            Ok(proto::ModelInferResponse {
                model_name: request.model_name,
                model_version: MODEL_VERSION.to_owned(),
                id: request.id,
                parameters: Default::default(),
                outputs,
                raw_output_contents,
            })
        })
        .await
    }
}

/// Checks the token and takes a body permit before a request's message is
/// read (a refused request costs no decoding), holding the permit until the
/// answer is ready.
#[derive(Clone)]
struct Gate<S> {
    inner: S,
    state: AppState,
}

type GateFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = GateFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .unwrap_or("")
            .to_owned();
        let refuse = |error: ApiError, state: &AppState, method: &str| -> Self::Future {
            state.metrics().record(
                &format!("/{SERVICE}/{method}"),
                error.status().as_u16(),
                Default::default(),
            );
            let response = status(&error).into_http::<Body>();
            Box::pin(async move { Ok(response) })
        };
        if let Some(token) = self.state.token()
            && !OPEN_METHODS.contains(&method.as_str())
        {
            let presented = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            if !presented.is_some_and(|candidate| token.matches(candidate)) {
                return refuse(ApiError::Unauthorized, &self.state, &method);
            }
        }
        let permit = if method == "ModelInfer" {
            match self.state.body_permit(None) {
                Ok(permit) => Some(permit),
                Err(error) => return refuse(error, &self.state, &method),
            }
        } else {
            None
        };
        // The clone that was made ready is the one that serves the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}

/// Serves the gRPC service for `state` on `listener` until `shutdown`
/// completes, then stops accepting and lets calls in flight finish (for at
/// most the request timeout plus [`crate::SHUTDOWN_GRACE`], as HTTP does).
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let config = state.config().clone();
    // An answer holds at most the anomaly map (4 bytes per pixel of the
    // pixel budget) besides two scalars.
    let max_pixels = usize::try_from(config.image_limits.max_pixels).unwrap_or(usize::MAX);
    let encoding_limit = max_pixels
        .saturating_mul(4)
        .saturating_add(ENCODING_OVERHEAD);
    let service = GrpcInferenceServiceServer::new(Service {
        state: state.clone(),
    })
    .max_decoding_message_size(config.body_limit)
    .max_encoding_message_size(encoding_limit);
    let gate = tower::layer::layer_fn(move |inner| Gate {
        inner,
        state: state.clone(),
    });
    let streams = u32::try_from(config.max_buffered()).unwrap_or(u32::MAX);
    let grace = config.timeout + crate::SHUTDOWN_GRACE;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = started_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(streams)
        .layer(gate)
        .serve_with_incoming_shutdown(
            service,
            tonic::transport::server::TcpIncoming::from(listener),
            signal,
        );
    let deadline = async move {
        if started_rx.await.is_err() {
            // The server ended without a shutdown signal.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(?grace, "gRPC calls still open after the grace period; stopping anyway");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, datatype: &str, bytes: Option<Vec<Vec<u8>>>) -> InferInputTensor {
        InferInputTensor {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape: vec![1],
            parameters: Default::default(),
            contents: bytes.map(|b| proto::InferTensorContents {
                bytes_contents: b,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn image_from_raw_or_bytes_contents() {
        let bytes = |r: Result<Vec<Bytes>, ApiError>| r.unwrap();
        let mut raw = vec![[&3u32.to_le_bytes()[..], b"png"].concat()];
        assert_eq!(
            bytes(image_bytes(&[input("image", "BYTES", None)], &mut raw, "m")),
            vec![Bytes::from_static(b"png")]
        );
        let inputs = [input("image", "BYTES", Some(vec![b"jpg".to_vec()]))];
        assert_eq!(
            bytes(image_bytes(&inputs, &mut Vec::new(), "m")),
            vec![Bytes::from_static(b"jpg")]
        );
        // A batch of two.
        let mut two = input("image", "BYTES", Some(vec![b"a".to_vec(), b"b".to_vec()]));
        two.shape = vec![2];
        assert_eq!(bytes(image_bytes(&[two], &mut Vec::new(), "m")).len(), 2);
        for (inputs, mut raw) in [
            (vec![input("image", "FP32", None)], vec![vec![0u8; 4]]),
            (vec![input("image", "BYTES", None)], vec![b"png".to_vec()]),
            (vec![input("image", "BYTES", None)], Vec::new()),
            (
                vec![input("x", "BYTES", Some(vec![b"a".to_vec()]))],
                Vec::new(),
            ),
            (
                vec![input(
                    "image",
                    "BYTES",
                    Some(vec![b"a".to_vec(), b"b".to_vec()]),
                )],
                Vec::new(),
            ),
            (vec![], Vec::new()),
            (
                vec![
                    input("image", "BYTES", Some(vec![b"a".to_vec()])),
                    input("image", "BYTES", Some(vec![b"a".to_vec()])),
                ],
                Vec::new(),
            ),
        ] {
            assert!(image_bytes(&inputs, &mut raw, "m").is_err(), "{inputs:?}");
        }
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        assert_eq!(
            status(&ApiError::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(status(&ApiError::Overloaded).code(), Code::Unavailable);
        assert_eq!(
            status(&ApiError::Unauthorized).code(),
            Code::Unauthenticated
        );
        let bad = ApiError::bad_request("invalid_image", "not an image");
        assert_eq!(status(&bad).code(), Code::InvalidArgument);
        assert_eq!(status(&bad).message(), "not an image");
    }
}
