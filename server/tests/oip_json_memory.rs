//! Memory of reading an Open Inference Protocol JSON request is a small
//! multiple of its size, whatever it holds. Read into `serde_json::Value`,
//! 18 MB of numbers in `data` took 760 MB (a 40× inflation) for a request
//! refused anyway.
//!
//! The allocator of this test binary refuses any allocation that would take
//! the live total past the budget; an overrun aborts the binary ("memory
//! allocation of N bytes failed"), which fails the test. One test only, so
//! no other test allocates meanwhile.
#![allow(clippy::unwrap_used)]

use std::alloc::System;

use cap::Cap;
use flawscope_server::fuzzing::infer_request;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Reads `body` with at most `factor × its size` (plus 64 KiB) allocated
/// on top of what is live.
fn read_within(body: &[u8], factor: usize) -> Result<usize, String> {
    let before = ALLOCATOR.allocated();
    ALLOCATOR
        .set_limit(before + factor * body.len() + (64 << 10))
        .unwrap();
    let result = infer_request(body);
    ALLOCATOR.set_limit(usize::MAX).unwrap();
    result
        .map(|images| images.iter().map(Vec::len).sum())
        .map_err(|e| e.to_string())
}

#[test]
fn json_requests_cost_a_small_multiple_of_their_size() {
    let image = |data: String| {
        format!(r#"{{"inputs":[{{"name":"image","shape":[1],"datatype":"BYTES","data":{data}}}]}}"#)
    };
    let list = |item: &str, n: usize| format!("[{}]", vec![item; n].join(","));
    let four_mb = 2_000_000;
    let hostile = [
        // The reporter's request, at 4 MB: numbers in data.
        ("numbers in data", image(list("1", four_mb))),
        ("empty strings in data", image(list("\"\"", four_mb / 2))),
        ("nested lists in data", image(list("[]", four_mb / 2))),
        (
            "many parameters",
            format!(
                r#"{{"parameters":{{{}}},"inputs":[]}}"#,
                (0..400_000)
                    .map(|i| format!("\"k{i}\":1"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ),
        (
            "many inputs",
            format!(
                r#"{{"inputs":{}}}"#,
                list(
                    r#"{"name":"image","shape":[1],"datatype":"BYTES","data":["a"]}"#,
                    60_000
                )
            ),
        ),
        (
            "a long shape",
            format!(
                r#"{{"inputs":[{{"name":"image","shape":{},"datatype":"BYTES","data":["a"]}}]}}"#,
                list("1", four_mb)
            ),
        ),
        (
            "many outputs",
            format!(
                r#"{{"inputs":[],"outputs":{}}}"#,
                list(r#"{"name":"score"}"#, 250_000)
            ),
        ),
    ];
    for (what, body) in hostile {
        let result = read_within(body.as_bytes(), 3);
        assert!(result.is_err(), "{what}: {result:?}");
        eprintln!("{what} ({} bytes): refused within 3× its size", body.len());
    }
    // A legitimate request: a 1 MB image as base64, 8 of them in a batch.
    let b64 = "QUJD".repeat(350_000);
    let batch = format!(
        r#"{{"inputs":[{{"name":"image","shape":[8],"datatype":"BYTES","parameters":{{"content_type":"base64"}},"data":{}}}]}}"#,
        list(&format!("\"{b64}\""), 8)
    );
    let read = read_within(batch.as_bytes(), 3).unwrap();
    assert_eq!(read, 8 * 1_050_000);
}
