//! Any bytes as a request to the upload routes: a mode byte, the
//! Content-Type line, then the body (raw or multipart).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = flawscope_server::fuzzing::upload(data);
});
