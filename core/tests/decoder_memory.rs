//! A decoder inflates nothing beyond the pixels: the PNG files of the
//! regression corpus whose colour profile (`iCCP`) or text (`zTXt`, `iTXt`)
//! inflates to 256 MB decode within a few megabytes. Before, the profile
//! was inflated in full while the header was read (a 2 MB file took 1.6 GB).
//!
//! The allocator of this test binary refuses any allocation that would take
//! the live total past the budget; an overrun aborts the binary ("memory
//! allocation of N bytes failed"), which fails the test. One test only, so
//! no other test allocates meanwhile.
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::path::PathBuf;

use cap::Cap;
use flawscope_core::images::{ImageLimits, decode_image};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Allowed on top of the file's bytes: a 64 × 64 image and the decoder's
/// buffers.
const BUDGET: usize = 16 << 20;

#[test]
fn compressed_profiles_and_text_are_never_inflated() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/decode");
    for name in ["ok_iccp_bomb.png", "ok_ztxt_bomb.png", "ok_itxt_bomb.png"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let before = ALLOCATOR.allocated();
        ALLOCATOR.set_limit(before + BUDGET).unwrap();
        let decoded = decode_image(&bytes, name, &ImageLimits::default());
        let peak_ok = ALLOCATOR.allocated();
        ALLOCATOR.set_limit(usize::MAX).unwrap();
        let image = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(image.dimensions(), (64, 64), "{name}");
        // Its pixels are the 0x80 grey the file holds.
        assert!((image.get_pixel(10, 10)[0] - 128.0 / 255.0).abs() < 1e-6);
        eprintln!("{name}: decoded within {BUDGET} bytes ({peak_ok} live after)");
    }
}
