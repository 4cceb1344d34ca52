//! Is the whole file there?
//!
//! Decoders are lenient: the JPEG decoder paints whatever is missing grey
//! and a PNG that lost its last chunk still decodes. A cut file scored that
//! way looks like a confident defect, so before decoding each format's end
//! is looked for by walking its structure (never its pixels), and JPEG is
//! decoded in strict mode, which refuses entropy data that runs out early.

use image::{DynamicImage, GrayAlphaImage, GrayImage, ImageFormat, RgbImage, RgbaImage};
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

/// Why `bytes` (of a file sniffed as `format`) is cut short, or `None` when
/// its end is there or the format has no end marker to look for. A file
/// malformed in some other way is left to the decoder to refuse.
pub(super) fn missing_end(format: ImageFormat, bytes: &[u8]) -> Option<&'static str> {
    match format {
        ImageFormat::Png => png_missing_end(bytes),
        ImageFormat::Jpeg => jpeg_end(bytes).err(),
        ImageFormat::Bmp => bmp_missing_end(bytes),
        // TIFF has no end marker; its strips are read at stated offsets
        // and a short file fails there with an end-of-file error, which
        // `decode_image` reports as truncation too.
        _ => None,
    }
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// PNG: the chunk list, from the signature, must reach `IEND`.
fn png_missing_end(bytes: &[u8]) -> Option<&'static str> {
    const CUT: &str = "the PNG file ends before its IEND chunk";
    let mut at = 8usize;
    loop {
        let Some(length) = be_u32(bytes, at) else {
            return Some(CUT);
        };
        if length > i32::MAX as u32 {
            return None; // Not a valid chunk length: the decoder says why.
        }
        let Some(kind) = bytes.get(at + 4..at + 8) else {
            return Some(CUT);
        };
        // Length, type, data, CRC.
        at = at.saturating_add(12).saturating_add(length as usize);
        if at > bytes.len() {
            return Some(CUT);
        }
        if kind == b"IEND" {
            return None;
        }
    }
}

/// JPEG: the marker segments, skipped by their lengths, and the
/// entropy-coded data after each start-of-scan must reach an end-of-image
/// marker, whose offset is returned with whether a start-of-frame said
/// progressive. Skipping by length keeps the end marker of an embedded EXIF
/// thumbnail from counting. A malformed file (a length under 2) gives the
/// file's length: the decoder says why.
pub(super) fn jpeg_end(bytes: &[u8]) -> Result<JpegEnd, &'static str> {
    let mut progressive = false;
    const CUT: &str = "the JPEG data ends before its end-of-image marker";
    let mut at = 2usize; // After SOI.
    loop {
        // Find the next marker (tolerating stray bytes and 0xFF fill).
        while bytes.get(at).is_some_and(|&b| b != 0xFF) {
            at += 1;
        }
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&marker) = bytes.get(at) else {
            return Err(CUT);
        };
        at += 1;
        match marker {
            0xD9 => {
                return Ok(JpegEnd {
                    eoi: at - 2,
                    progressive,
                });
            }
            // Markers without a length: TEM, SOI, RST0–7.
            0x01 | 0xD8 | 0xD0..=0xD7 => {}
            _ => {
                let Some(length) = bytes.get(at..at + 2) else {
                    return Err(CUT);
                };
                let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
                if length < 2 {
                    // Malformed: the decoder says why.
                    return Ok(JpegEnd {
                        eoi: bytes.len(),
                        progressive,
                    });
                }
                progressive |= matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
                at += length;
                if at > bytes.len() {
                    return Err(CUT);
                }
                if marker == 0xDA {
                    // Entropy-coded data: 0xFF is followed by 0x00 (a
                    // stuffed byte), a restart marker or fill; anything
                    // else is the next marker.
                    loop {
                        let Some(&b) = bytes.get(at) else {
                            return Err(CUT);
                        };
                        if b == 0xFF {
                            match bytes.get(at + 1) {
                                None => return Err(CUT),
                                Some(0x00 | 0xD0..=0xD7) => at += 2,
                                Some(0xFF) => at += 1,
                                Some(_) => break,
                            }
                        } else {
                            at += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Where a JPEG's image ends.
pub(super) struct JpegEnd {
    /// Offset of the end-of-image marker.
    eoi: usize,
    /// Whether its frame is progressive (several scans over the image).
    progressive: bool,
}

/// Zero bytes after the entropy data in place of the end marker: more than
/// the decoder reads ahead (8 bytes), far fewer than a missing row needs.
const ENTROPY_PADDING: usize = 16;

/// BMP: uncompressed pixel rows must all be inside the file (the decoder
/// itself reports a short read; this names it).
fn bmp_missing_end(bytes: &[u8]) -> Option<&'static str> {
    const CUT: &str = "the BMP file ends before its last pixel row";
    let offset = u64::from(le_u32(bytes, 10)?);
    let header = le_u32(bytes, 14)?;
    let (width, height, bits, compression) = if header == 12 {
        // OS/2 core header: 16-bit sides, never compressed.
        (
            u64::from(le_u16(bytes, 18)?),
            u64::from(le_u16(bytes, 20)?),
            u64::from(le_u16(bytes, 24)?),
            0,
        )
    } else {
        let height = le_u32(bytes, 22)? as i32;
        (
            u64::from((le_u32(bytes, 18)? as i32).unsigned_abs()),
            u64::from(height.unsigned_abs()),
            u64::from(le_u16(bytes, 28)?),
            le_u32(bytes, 30)?,
        )
    };
    // BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS store plain rows; the
    // run-length encodings fail on a short read in the decoder.
    if !matches!(compression, 0 | 3 | 6) {
        return None;
    }
    let stride = width.checked_mul(bits)?.div_ceil(32).checked_mul(4)?;
    let end = offset.checked_add(stride.checked_mul(height)?)?;
    (end > bytes.len() as u64).then_some(CUT)
}

/// Decodes a JPEG as the `image` crate does (same decoder, same output
/// colour types) but in strict mode, so entropy data that runs out before
/// the last block is an error rather than grey filler.
///
/// The decoder treats an end marker inside the entropy data as the data's
/// end and paints the rest: a file cut in half with `FF D9` appended was
/// scored. So a sequential JPEG is decoded without its end marker, followed
/// by [`ENTROPY_PADDING`] zero bytes: data cut short then runs out, which
/// strict mode refuses. (A progressive file's scans need the marker; it
/// keeps the lenient end.)
pub(super) fn decode_jpeg_strictly(
    bytes: &[u8],
    width: u32,
    height: u32,
) -> Result<DynamicImage, image::ImageError> {
    let failed = |err: zune_jpeg::errors::DecodeErrors| {
        use zune_jpeg::errors::DecodeErrors::{ExhaustedData, FormatStatic};
        if matches!(&err, ExhaustedData)
            || matches!(&err, FormatStatic(m) if m.starts_with("Premature"))
        {
            // Reported as truncation by `decode_failure`.
            return image::ImageError::IoError(std::io::ErrorKind::UnexpectedEof.into());
        }
        image::ImageError::Decoding(image::error::DecodingError::new(
            ImageFormat::Jpeg.into(),
            err,
        ))
    };
    let padded;
    let bytes = match jpeg_end(bytes) {
        Ok(JpegEnd {
            eoi,
            progressive: false,
        }) if eoi < bytes.len() => {
            padded = [&bytes[..eoi], &[0u8; ENTROPY_PADDING][..]].concat();
            &padded[..]
        }
        _ => bytes,
    };
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(width as usize)
        .set_max_height(height as usize);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(failed)?;
    let out = match decoder.input_colorspace() {
        Some(space @ (ColorSpace::Luma | ColorSpace::LumaA | ColorSpace::RGBA)) => space,
        _ => ColorSpace::RGB,
    };
    decoder.set_options(decoder.options().jpeg_set_out_colorspace(out));
    let pixels = decoder.decode().map_err(failed)?;
    let (w, h) = decoder
        .dimensions()
        .map_or((0, 0), |(w, h)| (w as u32, h as u32));
    let image = match out {
        ColorSpace::Luma => GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
        ColorSpace::LumaA => GrayAlphaImage::from_raw(w, h, pixels).map(DynamicImage::ImageLumaA8),
        ColorSpace::RGBA => RgbaImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgba8),
        _ => RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
    };
    image.ok_or_else(|| {
        image::ImageError::Decoding(image::error::DecodingError::new(
            ImageFormat::Jpeg.into(),
            "the decoded pixels do not match the image size",
        ))
    })
}
