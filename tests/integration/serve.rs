//! `flawscope serve` on a real loopback socket: scoring, an OIP v2 infer
//! request as a standard client sends it, and a graceful SIGTERM while a
//! request is in flight.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::flawscope;
use crate::pipeline::demo_dir;

/// Kills the server if a test fails before it exits by itself.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_server(models: &Path, stderr_log: &Path) -> Server {
    start_server_with(models, stderr_log, &[])
}

/// `flawscope serve` on a free loopback port with `extra` arguments.
pub(crate) fn start_server_with(models: &Path, stderr_log: &Path, extra: &[&str]) -> Server {
    let mut child = crate::cli::flawscope_command()
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--max-concurrent",
            "2",
            "--models",
        ])
        .arg(models)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr_log).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "first line {first:?}; stderr: {}",
                std::fs::read_to_string(stderr_log).unwrap_or_default()
            )
        })
        .parse()
        .unwrap();
    Server { child, addr }
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

fn request_bytes(method: &str, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    request_bytes_with(method, path, content_type, "", body)
}

/// A request with `extra_headers` (each ending in `\r\n`).
fn request_bytes_with(
    method: &str,
    path: &str,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: flawscope-test\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn read_reply(mut stream: TcpStream) -> Reply {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    stream
}

/// One request with `extra_headers` (each ending in `\r\n`).
pub(crate) fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
) -> Reply {
    let mut stream = connect(addr);
    stream
        .write_all(&request_bytes_with(
            method,
            path,
            content_type,
            extra_headers,
            body,
        ))
        .unwrap();
    read_reply(stream)
}

fn http(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> Reply {
    let mut stream = connect(addr);
    stream
        .write_all(&request_bytes(method, path, content_type, body))
        .unwrap();
    read_reply(stream)
}

/// Standard base64 with padding (the test crate has no base64 dependency).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn fit_model(dir: &Path) {
    let train = demo_dir().join("train/good");
    let out = flawscope(&[
        "fit",
        "--train",
        train.to_str().unwrap(),
        "--out",
        dir.join("cells.flawscope").to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_for_exit(server: &mut Server, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_scores_answers_oip_and_drains_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir(&models).unwrap();
    fit_model(&models);
    let log = tmp.path().join("stderr.log");
    let mut server = start_server(&models, &log);
    let addr = server.addr;
    assert!(addr.ip().is_loopback());

    let png = std::fs::read(
        demo_dir()
            .join("test/defect")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();

    // Plain scoring.
    let reply = http(addr, "POST", "/v1/models/cells/score", "image/png", &png);
    assert_eq!(reply.status, 200, "{}", reply.head);
    let v = reply.json();
    assert_eq!(v["model"], "cells");
    let score = v["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert_eq!(v["is_anomalous"].as_bool().unwrap(), score >= 0.5);
    assert!(v["regions"].is_array());

    // OIP v2 infer, as the KServe / Triton JSON clients send it.
    let infer = serde_json::json!({
        "id": "42",
        "inputs": [{
            "name": "image",
            "shape": [1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": null, "content_type": "base64"},
            "data": [base64(&png)],
        }],
        "outputs": [{"name": "score", "parameters": {"binary_data": false}}],
    });
    let reply = http(
        addr,
        "POST",
        "/v2/models/cells/infer",
        "application/json",
        &serde_json::to_vec(&infer).unwrap(),
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let v = reply.json();
    assert_eq!(v["model_name"], "cells");
    assert_eq!(v["id"], "42");
    assert_eq!(v["outputs"][0]["name"], "score");
    assert_eq!(v["outputs"][0]["datatype"], "FP32");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1]));
    let oip_score = v["outputs"][0]["data"][0].as_f64().unwrap();
    assert!((oip_score - score).abs() < 1e-5, "{oip_score} vs {score}");

    // Metrics saw both.
    let metrics = http(addr, "GET", "/metrics", "text/plain", b"");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("route=\"/v2/models/{name}/infer\",status=\"200\"} 1"),
        "{text}"
    );

    // SIGTERM while a request is in flight: headers and half the body are
    // sent, then the signal, then the rest. The request completes and the
    // process exits 0.
    let mut stream = connect(addr);
    let full = request_bytes("POST", "/v1/models/cells/score", "image/png", &png);
    let half = full.len() - png.len() / 2;
    stream.write_all(&full[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );
    stream.write_all(&full[half..]).unwrap();
    let reply = read_reply(stream);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!((reply.json()["score"].as_f64().unwrap() - score).abs() < 1e-5);

    let code = wait_for_exit(&mut server, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after exit"
    );
}

#[test]
fn serve_without_models_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = flawscope(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--models",
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no model files"), "{stderr}");
}
