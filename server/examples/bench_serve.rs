//! Load benchmark: starts the service in this process on a loopback port and
//! sends a bounded number of scoring requests from concurrent keep-alive
//! clients. A request shed with 503 is retried after a short backoff (the
//! shed is counted, not the retry); anything else that is not 200 is an
//! error.
//!
//! ```text
//! cargo run --release -p flawscope-server --example bench_serve -- \
//!     [--requests 2000] [--clients 32] [--max-concurrent N] [--backoff-ms 100] [--model FILE]
//!     [--protocols v1,v2,grpc]
//! ```
//!
//! Each protocol is a phase against the same server: `v1` posts the image
//! to `/v1/models/bench/score`; `v2` posts an Open Inference Protocol infer
//! request in the binary tensor data extension (outputs `score` and
//! `is_anomalous`, binary), as tritonclient.http sends it; `grpc` calls
//! `ModelInfer` with the image in `raw_input_contents` (same outputs), one
//! HTTP/2 connection per client, as tritonclient.grpc does.
//!
//! Without `--model`, a PatchCore model is fitted on `demo/solar_cell/train/good`.
//! The images sent are the 16 cells of `demo/solar_cell/test`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flawscope_core::Device;
use flawscope_core::features::{BackboneKind, FeatureConfig, Resize, parse_stage};
use flawscope_core::images::list_images;
use flawscope_core::model::{FitOptions, Model};
use flawscope_core::progress::NoProgress;
use flawscope_core::runtime::Runtime;
use flawscope_server::grpc::proto;
use flawscope_server::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use flawscope_server::{AppState, ServedModel, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

struct Options {
    requests: usize,
    clients: usize,
    max_concurrent: Option<usize>,
    max_queued: Option<usize>,
    backoff: Duration,
    model: Option<PathBuf>,
    protocols: Vec<String>,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        requests: 2000,
        clients: 32,
        max_concurrent: None,
        max_queued: None,
        backoff: Duration::from_millis(100),
        model: None,
        protocols: vec!["v1".into(), "v2".into(), "grpc".into()],
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--requests" => options.requests = value()?.parse()?,
            "--clients" => options.clients = value()?.parse()?,
            "--max-concurrent" => options.max_concurrent = Some(value()?.parse()?),
            "--max-queued" => options.max_queued = Some(value()?.parse()?),
            "--backoff-ms" => options.backoff = Duration::from_millis(value()?.parse()?),
            "--model" => options.model = Some(PathBuf::from(value()?)),
            "--protocols" => {
                options.protocols = value()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = options
                    .protocols
                    .iter()
                    .find(|p| !["v1", "v2", "grpc"].contains(&p.as_str()))
                {
                    return Err(format!("unknown protocol {bad}; use v1, v2, grpc").into());
                }
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if options.clients == 0 || options.requests == 0 {
        return Err("--clients and --requests must be positive".into());
    }
    Ok(options)
}

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../demo/solar_cell")
}

fn model(path: Option<&Path>) -> Result<Model> {
    let runtime = Runtime::new(Device::Cpu);
    if let Some(path) = path {
        return Ok(Model::load(path, &runtime)?);
    }
    let train = list_images(&demo().join("train/good"))?;
    let options = FitOptions {
        features: Some(FeatureConfig {
            backbone: BackboneKind::Lite0,
            stages: vec![parse_stage("stage4")?, parse_stage("stage5")?],
            resize: Resize::KeepAspect { side: 256 },
            weights: None,
            layers: Vec::new(),
            precision: Default::default(),
        }),
        // PatchCore with its default settings, at most 1 % false alarms.
        ..FitOptions::default()
    };
    Ok(Model::fit(&train, &options, &runtime, &NoProgress)?)
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct ClientStats {
    /// Latency of each request that ended in 200, from its first send
    /// (retries after 503 included).
    end_to_end: Vec<Duration>,
    /// Latency of each single attempt that got 200.
    service: Vec<Duration>,
    shed: usize,
    errors: usize,
    first_error: Option<String>,
}

/// One HTTP/1.1 exchange on a keep-alive connection: the status.
async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Result<u16> {
    stream.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    let header_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1).ok_or("no status line")?.parse()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .ok_or("no content-length")?
        .trim()
        .parse()?;
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed inside a body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if head.contains("connection: close") {
        return Err(format!("keep-alive refused ({status})").into());
    }
    Ok(status)
}

async fn client(
    addr: std::net::SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    next: Arc<AtomicUsize>,
    total: usize,
    backoff: Duration,
) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut buf = Vec::new();
    let mut connection: Option<TcpStream> = None;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return stats;
        }
        let request = &requests[i % requests.len()];
        let started = Instant::now();
        loop {
            let stream = match connection.as_mut() {
                Some(s) => s,
                None => match TcpStream::connect(addr).await {
                    Ok(s) => connection.insert(s),
                    Err(e) => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert(e.to_string());
                        break;
                    }
                },
            };
            let attempt = Instant::now();
            match exchange(stream, request, &mut buf).await {
                Ok(200) => {
                    stats.service.push(attempt.elapsed());
                    stats.end_to_end.push(started.elapsed());
                    break;
                }
                Ok(503) if String::from_utf8_lossy(&buf).contains("overloaded") => {
                    stats.shed += 1;
                    tokio::time::sleep(backoff).await;
                }
                Ok(status) => {
                    stats.errors += 1;
                    stats.first_error.get_or_insert(format!(
                        "status {status}: {}",
                        String::from_utf8_lossy(&buf)
                    ));
                    break;
                }
                Err(e) => {
                    // A closed keep-alive connection: reconnect and count it.
                    connection = None;
                    if e.to_string().starts_with("keep-alive refused (503") {
                        stats.shed += 1;
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    stats.errors += 1;
                    stats.first_error.get_or_insert(e.to_string());
                    break;
                }
            }
        }
    }
}

/// One gRPC client: its own connection, `ModelInfer` until the shared
/// count runs out; UNAVAILABLE (shed) is retried after the backoff.
async fn grpc_client(
    url: String,
    request: Arc<proto::ModelInferRequest>,
    next: Arc<AtomicUsize>,
    total: usize,
    backoff: Duration,
) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut client = match GrpcInferenceServiceClient::connect(url).await {
        Ok(client) => client,
        Err(e) => {
            stats.errors += 1;
            stats.first_error = Some(e.to_string());
            return stats;
        }
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return stats;
        }
        let started = Instant::now();
        loop {
            let attempt = Instant::now();
            match client.model_infer((*request).clone()).await {
                Ok(_) => {
                    stats.service.push(attempt.elapsed());
                    stats.end_to_end.push(started.elapsed());
                    break;
                }
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    stats.shed += 1;
                    tokio::time::sleep(backoff).await;
                }
                Err(status) => {
                    stats.errors += 1;
                    stats.first_error.get_or_insert(status.to_string());
                    break;
                }
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// An Open Inference Protocol infer request in the binary tensor data
/// extension: the JSON header, then the image as one BYTES element.
fn v2_request(image: &[u8]) -> Vec<u8> {
    let mut element = (image.len() as u32).to_le_bytes().to_vec();
    element.extend_from_slice(image);
    let header = format!(
        "{{\"inputs\":[{{\"name\":\"image\",\"shape\":[1],\"datatype\":\"BYTES\",\
         \"parameters\":{{\"binary_data_size\":{}}}}}],\
         \"outputs\":[{{\"name\":\"score\",\"parameters\":{{\"binary_data\":true}}}},\
         {{\"name\":\"is_anomalous\",\"parameters\":{{\"binary_data\":true}}}}]}}",
        element.len()
    );
    let mut r = format!(
        "POST /v2/models/bench/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {}\r\n\
         Content-Length: {}\r\n\r\n",
        header.len(),
        header.len() + element.len()
    )
    .into_bytes();
    r.extend_from_slice(header.as_bytes());
    r.extend_from_slice(&element);
    r
}

fn grpc_request(image: &[u8]) -> proto::ModelInferRequest {
    let mut element = (image.len() as u32).to_le_bytes().to_vec();
    element.extend_from_slice(image);
    let output = |name: &str| proto::model_infer_request::InferRequestedOutputTensor {
        name: name.to_owned(),
        ..Default::default()
    };
    proto::ModelInferRequest {
        model_name: "bench".to_owned(),
        inputs: vec![proto::model_infer_request::InferInputTensor {
            name: "image".to_owned(),
            datatype: "BYTES".to_owned(),
            shape: vec![1],
            ..Default::default()
        }],
        outputs: vec![output("score"), output("is_anomalous")],
        raw_input_contents: vec![element],
        ..Default::default()
    }
}

fn main() -> Result<()> {
    let options = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let fit_started = Instant::now();
    let inspector = model(options.model.as_deref())?;
    eprintln!(
        "model ready in {:.1} s",
        fit_started.elapsed().as_secs_f64()
    );

    let mut config = ServerConfig::default();
    if let Some(n) = options.max_concurrent {
        config = config.with_slots(n);
    }
    if let Some(n) = options.max_queued {
        config.max_queued = n;
    }
    let (slots, queue) = (config.max_concurrent, config.max_queued);
    let state = AppState::new(
        vec![ServedModel {
            name: "bench".into(),
            model: Arc::new(inspector),
        }],
        config,
    )?;
    let mut images = list_images(&demo().join("test/good"))?;
    images.extend(list_images(&demo().join("test/defect"))?);
    let images: Vec<Vec<u8>> = images
        .iter()
        .map(std::fs::read)
        .collect::<std::io::Result<_>>()?;
    let v1: Vec<Vec<u8>> = images
        .iter()
        .map(|body| {
            let mut r = format!(
                "POST /v1/models/bench/score HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: image/png\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        })
        .collect();
    let v2: Vec<Vec<u8>> = images.iter().map(|i| v2_request(i)).collect();
    let grpc: Vec<proto::ModelInferRequest> = images.iter().map(|i| grpc_request(i)).collect();

    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc_url = format!("http://{}", grpc_listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let server = tokio::spawn(flawscope_server::serve(
            listener,
            state.clone(),
            stopped(stop_rx.clone()),
        ));
        let grpc_server = tokio::spawn(flawscope_server::grpc::serve(
            grpc_listener,
            state,
            stopped(stop_rx),
        ));
        // Warm-up: one request, so lazy initialisation is not measured.
        let mut warm = TcpStream::connect(addr).await?;
        let mut buf = Vec::new();
        for request in [&v1[0], &v2[0]] {
            let status = exchange(&mut warm, request, &mut buf).await?;
            if status != 200 {
                return Err(
                    format!("warm-up got {status}: {}", String::from_utf8_lossy(&buf)).into(),
                );
            }
        }
        drop(warm);
        GrpcInferenceServiceClient::connect(grpc_url.clone())
            .await?
            .model_infer(grpc[0].clone())
            .await?;
        println!(
            "requests {} per protocol  clients {}  inference slots {}  queue {}  cpus {}",
            options.requests,
            options.clients,
            slots,
            queue,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );

        let v1 = Arc::new(v1);
        let v2 = Arc::new(v2);
        for protocol in &options.protocols {
            let (rss_before, _) = memory();
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let next = Arc::new(AtomicUsize::new(0));
            let started = Instant::now();
            let tasks: Vec<_> = (0..options.clients)
                .map(|c| match protocol.as_str() {
                    "grpc" => tokio::spawn(grpc_client(
                        grpc_url.clone(),
                        Arc::new(grpc[c % grpc.len()].clone()),
                        Arc::clone(&next),
                        options.requests,
                        options.backoff,
                    )),
                    "v2" => tokio::spawn(client(
                        addr,
                        Arc::clone(&v2),
                        Arc::clone(&next),
                        options.requests,
                        options.backoff,
                    )),
                    _ => tokio::spawn(client(
                        addr,
                        Arc::clone(&v1),
                        Arc::clone(&next),
                        options.requests,
                        options.backoff,
                    )),
                })
                .collect();
            let mut all = ClientStats::default();
            for task in tasks {
                let s = task.await?;
                all.end_to_end.extend(s.end_to_end);
                all.service.extend(s.service);
                all.shed += s.shed;
                all.errors += s.errors;
                if all.first_error.is_none() {
                    all.first_error = s.first_error;
                }
            }
            let elapsed = started.elapsed();
            let (rss_after, hwm) = memory();
            all.end_to_end.sort();
            all.service.sort();
            let ok = all.end_to_end.len();
            println!(
                "== {protocol}  load before: {}",
                load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
            );
            println!(
                "ok {ok}  errors (not 503) {}  shed 503 (retried after {} ms) {}",
                all.errors,
                options.backoff.as_millis(),
                all.shed
            );
            println!(
                "wall {:.1} s  throughput {:.1} req/s",
                elapsed.as_secs_f64(),
                ok as f64 / elapsed.as_secs_f64()
            );
            println!(
                "latency of a 200 attempt: p50 {:.1} ms  p99 {:.1} ms",
                percentile(&all.service, 50.0),
                percentile(&all.service, 99.0)
            );
            println!(
                "end to end incl. shed retries: p50 {:.1} ms  p99 {:.1} ms",
                percentile(&all.end_to_end, 50.0),
                percentile(&all.end_to_end, 99.0)
            );
            println!(
                "RSS before {rss_before:.0} MiB  after {rss_after:.0} MiB  peak {hwm:.0} MiB (server and clients, one process)"
            );
            if let Some(e) = all.first_error {
                println!("first error: {e}");
            }
        }
        let _ = stop_tx.send(true);
        server.await??;
        grpc_server.await??;
        Ok(())
    })
}
