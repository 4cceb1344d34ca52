//! Image loading: every format and pixel type, and the ways files go wrong
//! (cut short, absurd shapes, bombs).
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::path::Path;

use flawscope_core::dataset::{DatasetError, scan_image_folder};
use flawscope_core::images::{ImageError, ImageLimits, decode_image, image_dimensions, load_image};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};

/// A 7×5 (non-square) test pattern in every pixel type; the top-left pixel
/// is a known mid grey so conversions can be checked.
fn patterns() -> Vec<(&'static str, DynamicImage)> {
    let (w, h) = (7, 5);
    let v8 = |x: u32, y: u32| (x * 30 + y * 7) as u8;
    let v16 = |x: u32, y: u32| (x * 30 + y * 7) as u16 * 257;
    vec![
        (
            "grey8",
            DynamicImage::ImageLuma8(ImageBuffer::from_fn(w, h, |x, y| Luma([v8(x, y)]))),
        ),
        (
            "greyalpha8",
            DynamicImage::ImageLumaA8(ImageBuffer::from_fn(w, h, |x, y| LumaA([v8(x, y), 255]))),
        ),
        (
            "grey16",
            DynamicImage::ImageLuma16(ImageBuffer::from_fn(w, h, |x, y| Luma([v16(x, y)]))),
        ),
        (
            "rgb8",
            DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| Rgb([v8(x, y); 3]))),
        ),
        (
            "rgba8",
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(w, h, |x, y| {
                Rgba([v8(x, y), v8(x, y), v8(x, y), 255])
            })),
        ),
        (
            "rgb16",
            DynamicImage::ImageRgb16(ImageBuffer::from_fn(w, h, |x, y| Rgb([v16(x, y); 3]))),
        ),
        (
            "rgba16",
            DynamicImage::ImageRgba16(ImageBuffer::from_fn(w, h, |x, y| {
                Rgba([v16(x, y), v16(x, y), v16(x, y), 65535])
            })),
        ),
    ]
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Option<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).ok()?;
    Some(out.into_inner())
}

fn check_pattern(bytes: &[u8], name: &str, tolerance: f32) {
    let img = decode_image(bytes, name, &ImageLimits::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(img.dimensions(), (7, 5), "{name}");
    for (x, y) in [(0, 0), (6, 4), (3, 2)] {
        let expected = (x * 30 + y * 7) as f32 / 255.0;
        let p = img.get_pixel(x, y);
        for c in 0..3 {
            assert!(
                (p[c] - expected).abs() <= tolerance,
                "{name} ({x},{y}) c{c}: {} vs {expected}",
                p[c]
            );
        }
    }
}

#[test]
fn every_format_and_pixel_type_loads_into_one_form() {
    let mut checked = 0;
    for (kind, img) in patterns() {
        for (format, tolerance) in [
            (ImageFormat::Png, 1e-6),
            (ImageFormat::Tiff, 1e-6),
            (ImageFormat::Bmp, 1e-6),
            (ImageFormat::Jpeg, 0.08),
        ] {
            // Not every encoder takes every pixel type (JPEG has no 16-bit,
            // BMP no 16-bit); the ones that do must round-trip.
            let Some(bytes) = encode(&img, format) else {
                continue;
            };
            check_pattern(&bytes, &format!("{kind}.{format:?}"), tolerance);
            checked += 1;
        }
    }
    // PNG and TIFF take all 7 types; JPEG and BMP at least grey8 and rgb8.
    assert!(checked >= 18, "only {checked} combinations were encodable");
}

#[test]
fn files_are_read_by_content_not_extension() {
    let tmp = tempfile::tempdir().unwrap();
    let jpeg = encode(&patterns()[3].1, ImageFormat::Jpeg).unwrap();
    let path = tmp.path().join("really_a_jpeg.png");
    std::fs::write(&path, jpeg).unwrap();
    let img = load_image(&path, &ImageLimits::default()).unwrap();
    assert_eq!(img.dimensions(), (7, 5));
}

#[test]
fn truncated_png_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let big = DynamicImage::ImageRgb8(ImageBuffer::from_fn(64, 48, |x, y| {
        Rgb([x as u8, y as u8, 7])
    }));
    let bytes = encode(&big, ImageFormat::Png).unwrap();
    let path = tmp.path().join("cut.png");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_image(&path, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("cut.png"), "{err}");
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid PNG whose header claims `width × height`, with a tiny body.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = encode(&patterns()[0].1, ImageFormat::Png).unwrap();
    // Signature (8) + length (4) + "IHDR" (4), then width and height.
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

#[test]
fn decompression_bomb_header_is_refused_before_decoding() {
    let bytes = png_claiming(50_000, 50_000);
    let err = decode_image(&bytes, "bomb.png", &ImageLimits::default()).unwrap_err();
    match err {
        ImageError::TooLarge {
            width,
            height,
            pixels,
            ..
        } => {
            assert_eq!((width, height, pixels), (50_000, 50_000, 2_500_000_000));
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bomb.png");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        image_dimensions(&path, &ImageLimits::default()),
        Err(ImageError::TooLarge { .. })
    ));
    // The budget is configurable: a smaller one refuses a real small image.
    let small = encode(&patterns()[0].1, ImageFormat::Png).unwrap();
    let budget = |max_pixels| ImageLimits {
        max_pixels,
        ..ImageLimits::default()
    };
    assert!(decode_image(&small, "s", &budget(34)).is_err());
    assert!(decode_image(&small, "s", &budget(35)).is_ok());
}

#[test]
fn unsupported_formats_are_named() {
    // A GIF header: a real image format we do not accept.
    let err = decode_image(
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        "anim.gif",
        &ImageLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::UnsupportedFormat { .. }), "{err}");
    assert!(err.to_string().contains("anim.gif"));
}

#[test]
fn empty_folder_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "no images here").unwrap();
    let err = scan_image_folder(tmp.path()).unwrap_err();
    assert!(matches!(err, DatasetError::NoImages(_)));
    assert!(err.to_string().contains("holds no images"), "{err}");
    assert!(scan_image_folder(Path::new("/definitely/not/here")).is_err());
}

/// A real grey PNG of `width × height` (a gradient along the long side);
/// a 40 000 000 × 1 one compresses to about 40 KB.
fn grey_png(width: u32, height: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(width, height, |x, y| Luma([((x + y) / 4096 % 256) as u8]));
    encode(&DynamicImage::ImageLuma8(img), ImageFormat::Png).unwrap()
}

#[test]
fn lines_past_the_aspect_bound_are_refused_from_the_header() {
    // 40 000 000 × 1 is within the pixel budget; it used to abort the
    // process resizing (a 41 GB intermediate buffer).
    let line = grey_png(40_000_000, 1);
    assert!(line.len() < 1 << 20, "{} bytes", line.len());
    let err = decode_image(&line, "line.png", &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::ExtremeAspect {
                width: 40_000_000,
                height: 1,
                max_aspect_ratio: 10_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("line.png"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("line.png");
    std::fs::write(&path, &line).unwrap();
    assert!(matches!(
        load_image(&path, &ImageLimits::default()),
        Err(ImageError::ExtremeAspect { .. })
    ));
    assert!(matches!(
        image_dimensions(&path, &ImageLimits::default()),
        Err(ImageError::ExtremeAspect { .. })
    ));
    // 1 000 000 × 1 peaked at 1.19 GB; both orientations, and a band.
    for (w, h) in [(1_000_000, 1), (1, 1_000_000), (2_000_000, 20), (10_001, 1)] {
        let err = decode_image(&png_claiming(w, h), "x", &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(err, ImageError::ExtremeAspect { .. }),
            "{w}×{h}: {err}"
        );
    }
}

#[test]
fn shapes_at_the_aspect_bound_decode_and_preprocess() {
    use flawscope_core::features::Resize;
    use flawscope_models::Preprocess;
    use flawscope_models::clip::{ClipPreprocessor, ResizeMode};
    for (w, h) in [(10_000, 1), (1, 10_000), (20_000, 2)] {
        let img = decode_image(&grey_png(w, h), "x", &ImageLimits::default())
            .unwrap_or_else(|e| panic!("{w}×{h}: {e}"));
        let (iw, ih) = Resize::KeepAspect { side: 224 }.input_size(w, h);
        assert!(iw.max(ih) <= 896 && iw.min(ih) >= 64, "{iw}×{ih}");
        let chw = Preprocess::new(iw, ih).to_chw_rgb32f(&img).unwrap();
        assert_eq!(chw.len(), 3 * (iw * ih) as usize);
        let dynamic = DynamicImage::ImageRgb32F(img);
        for mode in [ResizeMode::ShortestSideCenterCrop, ResizeMode::Stretch] {
            let pixels = ClipPreprocessor::new(224)
                .with_mode(mode)
                .pixels(&dynamic)
                .unwrap();
            assert_eq!(pixels.len(), 3 * 224 * 224);
        }
    }
}

/// A 300 × 300 pattern in `format`.
fn photo(format: ImageFormat, grey: bool) -> Vec<u8> {
    let rgb = ImageBuffer::from_fn(300, 300, |x, y| {
        Rgb([(x ^ y) as u8, (x * 3) as u8, (y * 7) as u8])
    });
    let img = DynamicImage::ImageRgb8(rgb);
    let img = if grey {
        DynamicImage::ImageLuma8(img.to_luma8())
    } else {
        img
    };
    encode(&img, format).unwrap()
}

#[test]
fn truncated_files_of_every_format_are_refused() {
    for format in [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
    ] {
        for grey in [false, true] {
            let bytes = photo(format, grey);
            let name = format!("{format:?} grey={grey}");
            assert!(decode_image(&bytes, &name, &ImageLimits::default()).is_ok());
            // The reporter's cuts (30–90 % of a JPEG scored 1.0), the first
            // bytes only, and the last two bytes missing (a JPEG's end
            // marker, a PNG's checksum).
            let cuts = [1, 10, 30, 50, 70, 90, 99].map(|pct| bytes.len() * pct / 100);
            for cut in cuts.into_iter().chain([bytes.len() - 2]) {
                let err = decode_image(&bytes[..cut], &name, &ImageLimits::default()).unwrap_err();
                assert!(
                    matches!(err, ImageError::Truncated { .. }),
                    "{name} cut at {cut} of {}: {err}",
                    bytes.len()
                );
                assert!(err.to_string().contains("truncated"), "{err}");
            }
        }
    }
}

#[test]
fn bytes_after_the_end_are_tolerated() {
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        let mut bytes = photo(format, false);
        bytes.extend_from_slice(b"\0\0trailing bytes some writers leave");
        assert!(
            decode_image(&bytes, "x", &ImageLimits::default()).is_ok(),
            "{format:?}"
        );
    }
}

/// The JPEG with an APP1 segment inserted after SOI whose payload holds a
/// complete little JPEG (SOI ... EOI), as an EXIF thumbnail does.
fn jpeg_with_thumbnail(jpeg: &[u8]) -> Vec<u8> {
    let payload = [b"Exif\0\0".as_slice(), &[0xFF, 0xD8, 0xFF, 0xD9]].concat();
    let length = u16::try_from(payload.len() + 2).unwrap().to_be_bytes();
    [&jpeg[..2], &[0xFF, 0xE1], &length, &payload, &jpeg[2..]].concat()
}

#[test]
fn an_end_marker_inside_a_thumbnail_does_not_make_a_cut_jpeg_whole() {
    let jpeg = jpeg_with_thumbnail(&photo(ImageFormat::Jpeg, false));
    assert!(decode_image(&jpeg, "x", &ImageLimits::default()).is_ok());
    let cut = &jpeg[..jpeg.len() * 2 / 3];
    assert!(matches!(
        decode_image(cut, "x", &ImageLimits::default()),
        Err(ImageError::Truncated { .. })
    ));
}

#[test]
fn jpeg_pixels_are_the_image_crates() {
    // JPEG is decoded by the same decoder in strict mode: valid files must
    // give exactly what `image` gives.
    for grey in [false, true] {
        let bytes = photo(ImageFormat::Jpeg, grey);
        let ours = decode_image(&bytes, "x", &ImageLimits::default()).unwrap();
        let theirs = image::load_from_memory(&bytes).unwrap().to_rgb32f();
        assert_eq!(ours, theirs, "grey={grey}");
    }
}

#[test]
fn a_cut_jpeg_with_an_end_marker_appended_is_truncated() {
    // The reporter's file: a JPEG cut at 50 % with FF D9 appended scored as
    // a confident defect, the decoder painting the rest.
    for grey in [false, true] {
        let bytes = photo(ImageFormat::Jpeg, grey);
        for pct in [20, 50, 90] {
            let cut = [&bytes[..bytes.len() * pct / 100], &[0xFF, 0xD9][..]].concat();
            let err = decode_image(&cut, "x", &ImageLimits::default()).unwrap_err();
            assert!(
                matches!(err, ImageError::Truncated { .. }),
                "grey={grey} {pct}%: {err}"
            );
        }
    }
    // Whole files whose last rows hold few bytes still decode: flat, narrow
    // and tall (many rows of a byte or two), and tiny ones.
    for (w, h) in [(8, 2000), (1, 64), (16, 17), (2000, 9), (1, 1), (3, 100)] {
        for value in [0u8, 128, 255] {
            let flat = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(w, h, Rgb([value; 3])));
            let bytes = encode(&flat, ImageFormat::Jpeg).unwrap();
            let ours = decode_image(&bytes, "x", &ImageLimits::default())
                .unwrap_or_else(|e| panic!("{w}×{h} at {value}: {e}"));
            let theirs = image::load_from_memory(&bytes).unwrap().to_rgb32f();
            assert_eq!(ours, theirs, "{w}×{h} at {value}");
        }
    }
}

#[test]
fn png_profiles_and_text_are_left_out_not_inflated() {
    // The corpus's 256 MB profile: a 64 × 64 grey image; its memory is
    // checked by tests/decoder_memory.rs. Here: the pixels are the same
    // with and without the chunks.
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/decode");
    let bomb = std::fs::read(dir.join("ok_iccp_bomb.png")).unwrap();
    let image = decode_image(&bomb, "bomb", &ImageLimits::default()).unwrap();
    assert_eq!(image.dimensions(), (64, 64));
    let path = dir.join("ok_iccp_bomb.png");
    assert_eq!(
        flawscope_core::images::image_dimensions(&path, &ImageLimits::default()).unwrap(),
        (64, 64)
    );
}
