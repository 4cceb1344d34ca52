//! Any bytes as an uploaded image file: decoding with the default limits,
//! then the EfficientNet and CLIP preprocessing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = flawscope_core::fuzzing::decode_and_preprocess(data);
});
