//! Any bytes as the JSON body of an Open Inference Protocol `infer` request.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = flawscope_server::fuzzing::infer_request(data);
});
