//! Reading images safely.
//!
//! Every image, whatever its format (PNG, JPEG, BMP, TIFF) or pixel type
//! (grey, RGB, RGBA, 8 or 16 bit), becomes one form: [`Rgb32FImage`], three
//! channels of `f32` in `[0, 1]`. The header is read first and an image whose
//! pixel count exceeds the budget, or whose sides differ by more than
//! [`DEFAULT_MAX_ASPECT_RATIO`], is refused before any pixel buffer is
//! allocated, so a decompression bomb costs nothing. A file that ends before
//! its image does (a cut download or upload) is refused as
//! [`ImageError::Truncated`] instead of being scored with the decoder's
//! filler pixels. Chunks a decoder would inflate besides the pixels (a PNG's
//! compressed colour profile or text) never reach it, so every allocation
//! is bounded by the budget ([`ancillary`]).

use std::borrow::Cow;
use std::io::{Cursor, Read as _};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader, Rgb32FImage};

mod ancillary;
mod truncation;

/// Default pixel budget: 40 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Default bound on `long side / short side`. Past it an image is a line
/// rather than a picture: the backbone sees it squeezed to at most 14:1
/// anyway, so nothing useful is lost by refusing, and every per-image
/// buffer stays a small multiple of the pixel count.
pub const DEFAULT_MAX_ASPECT_RATIO: u32 = 10_000;

/// Extensions treated as images when scanning folders.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Limits applied before an image is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted `width × height`.
    pub max_pixels: u64,
    /// Largest accepted `long side / short side` (10 000 accepts a
    /// 10 000 × 1 image and refuses a 10 001 × 1 one).
    pub max_aspect_ratio: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
            max_aspect_ratio: DEFAULT_MAX_ASPECT_RATIO,
        }
    }
}

/// Why an image could not be read. Each variant names the source.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {source_name}: {cause}")]
    Io {
        source_name: String,
        #[source]
        cause: std::io::Error,
    },
    #[error("{source_name} is empty")]
    Empty { source_name: String },
    #[error("{source_name} is not a supported image (PNG, JPEG, BMP or TIFF expected)")]
    UnsupportedFormat { source_name: String },
    #[error(
        "{source_name} is {width}×{height} = {pixels} pixels, over the budget of {max_pixels} pixels"
    )]
    TooLarge {
        source_name: String,
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    #[error(
        "{source_name} is {width}×{height}, a side ratio over the limit of {max_aspect_ratio}:1"
    )]
    ExtremeAspect {
        source_name: String,
        width: u32,
        height: u32,
        max_aspect_ratio: u32,
    },
    #[error("{source_name} is truncated: {detail}")]
    Truncated { source_name: String, detail: String },
    #[error("{source_name} has a zero-sized dimension ({width}×{height})")]
    ZeroSized {
        source_name: String,
        width: u32,
        height: u32,
    },
    #[error("{source_name} is corrupt or truncated: {cause}")]
    Corrupt {
        source_name: String,
        #[source]
        cause: image::ImageError,
    },
}

/// True when `path` has one of the [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads an image file. The format is taken from the content, not the
/// extension, so a JPEG named `.png` still loads.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<Rgb32FImage, ImageError> {
    let source_name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|cause| ImageError::Io {
        source_name: source_name.clone(),
        cause,
    })?;
    decode_image(&bytes, &source_name, limits)
}

/// Decodes image bytes (from a file or a request body). `source_name` is
/// used in error messages only.
pub fn decode_image(
    bytes: &[u8],
    source_name: &str,
    limits: &ImageLimits,
) -> Result<Rgb32FImage, ImageError> {
    let source_name = source_name.to_string();
    if bytes.is_empty() {
        return Err(ImageError::Empty { source_name });
    }
    let format = sniff_format(bytes).ok_or_else(|| ImageError::UnsupportedFormat {
        source_name: source_name.clone(),
    })?;
    if let Some(detail) = truncation::missing_end(format, bytes) {
        return Err(ImageError::Truncated {
            source_name,
            detail: detail.to_string(),
        });
    }
    let bytes = match format {
        ImageFormat::Png => ancillary::png_pixel_chunks(bytes),
        _ => Cow::Borrowed(bytes),
    };
    let bytes = bytes.as_ref();
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|cause| decode_failure(&source_name, cause))?;
    check_dimensions(&source_name, width, height, limits)?;

    let decoded = if format == ImageFormat::Jpeg {
        truncation::decode_jpeg_strictly(bytes, width, height)
    } else {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut decoder_limits = image::Limits::default();
        decoder_limits.max_image_width = Some(width);
        decoder_limits.max_image_height = Some(height);
        // Room for the decoded image at 16 bits × 4 channels plus the f32 copy.
        decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8 + 12));
        reader.limits(decoder_limits);
        reader.decode()
    };
    decoded
        .map(into_rgb32f)
        .map_err(|cause| decode_failure(&source_name, cause))
}

/// The sides of an encoded image, read from its header and checked
/// against `limits` (the budget, the aspect bound), without decoding it:
/// what a server reserves memory by before decoding.
pub fn peek_dimensions(
    bytes: &[u8],
    source_name: &str,
    limits: &ImageLimits,
) -> Result<(u32, u32), ImageError> {
    let source_name = source_name.to_string();
    if bytes.is_empty() {
        return Err(ImageError::Empty { source_name });
    }
    let format = sniff_format(bytes).ok_or_else(|| ImageError::UnsupportedFormat {
        source_name: source_name.clone(),
    })?;
    let bytes = match format {
        ImageFormat::Png => ancillary::png_pixel_chunks(bytes),
        _ => Cow::Borrowed(bytes),
    };
    let (width, height) = ImageReader::with_format(Cursor::new(bytes.as_ref()), format)
        .into_dimensions()
        .map_err(|cause| decode_failure(&source_name, cause))?;
    check_dimensions(&source_name, width, height, limits)?;
    Ok((width, height))
}

/// A decoder's error as ours: a read past the end of the bytes (TIFF
/// strips, BMP rows, a header cut short) is truncation.
fn decode_failure(source_name: &str, cause: image::ImageError) -> ImageError {
    match cause {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated {
                source_name: source_name.to_string(),
                detail: "the data ends early".into(),
            }
        }
        cause => ImageError::Corrupt {
            source_name: source_name.to_string(),
            cause,
        },
    }
}

/// The one form, without a copy when the decoder already produced it.
fn into_rgb32f(image: DynamicImage) -> Rgb32FImage {
    match image {
        DynamicImage::ImageRgb32F(rgb) => rgb,
        other => other.to_rgb32f(),
    }
}

/// Reads only the header and returns `(width, height)`, enforcing the budget.
pub fn image_dimensions(path: &Path, limits: &ImageLimits) -> Result<(u32, u32), ImageError> {
    let source_name = path.display().to_string();
    // A PNG's sides are read from IHDR, its first chunk, by hand: the
    // decoder would read (and inflate) every chunk up to the pixels.
    let mut head = Vec::with_capacity(24);
    std::fs::File::open(path)
        .and_then(|f| f.take(24).read_to_end(&mut head))
        .map_err(|cause| ImageError::Io {
            source_name: source_name.clone(),
            cause,
        })?;
    if sniff_format(&head) == Some(ImageFormat::Png) && head.len() == 24 && &head[12..16] == b"IHDR"
    {
        let side =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let (width, height) = (side(16), side(20));
        check_dimensions(&source_name, width, height, limits)?;
        return Ok((width, height));
    }
    let reader = ImageReader::open(path)
        .map_err(|cause| ImageError::Io {
            source_name: source_name.clone(),
            cause,
        })?
        .with_guessed_format()
        .map_err(|cause| ImageError::Io {
            source_name: source_name.clone(),
            cause,
        })?;
    if reader.format().is_none_or(|f| !is_supported(f)) {
        return Err(ImageError::UnsupportedFormat { source_name });
    }
    let (width, height) = reader
        .into_dimensions()
        .map_err(|cause| ImageError::Corrupt {
            source_name: source_name.clone(),
            cause,
        })?;
    check_dimensions(&source_name, width, height, limits)?;
    Ok((width, height))
}

fn check_dimensions(
    source_name: &str,
    width: u32,
    height: u32,
    limits: &ImageLimits,
) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSized {
            source_name: source_name.to_string(),
            width,
            height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(ImageError::TooLarge {
            source_name: source_name.to_string(),
            width,
            height,
            pixels,
            max_pixels: limits.max_pixels,
        });
    }
    let (long, short) = (width.max(height), width.min(height));
    if u64::from(long) > u64::from(short) * u64::from(limits.max_aspect_ratio) {
        return Err(ImageError::ExtremeAspect {
            source_name: source_name.to_string(),
            width,
            height,
            max_aspect_ratio: limits.max_aspect_ratio,
        });
    }
    Ok(())
}

fn is_supported(format: ImageFormat) -> bool {
    matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Bmp | ImageFormat::Tiff
    )
}

fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    image::guess_format(bytes).ok().filter(|f| is_supported(*f))
}

/// Lists the image files directly inside `dir`, sorted by name.
pub fn list_images(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() && has_image_extension(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    fn png_bytes(img: &GrayImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn grey_png_becomes_rgb_in_unit_range() {
        let img = GrayImage::from_fn(5, 3, |x, _| Luma([(x * 60) as u8]));
        let rgb = decode_image(&png_bytes(&img), "mem", &ImageLimits::default()).unwrap();
        assert_eq!(rgb.dimensions(), (5, 3));
        let p = rgb.get_pixel(4, 0);
        assert!((p[0] - 240.0 / 255.0).abs() < 1e-6);
        assert_eq!(p[0], p[2]);
    }

    #[test]
    fn budget_is_enforced_from_the_header() {
        let img = GrayImage::new(100, 100);
        let limits = ImageLimits {
            max_pixels: 9_999,
            ..ImageLimits::default()
        };
        let err = decode_image(&png_bytes(&img), "big.png", &limits).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { pixels: 10_000, .. }));
        assert!(err.to_string().contains("big.png"));
    }

    #[test]
    fn garbage_is_unsupported_and_empty_is_empty() {
        let limits = ImageLimits::default();
        assert!(matches!(
            decode_image(b"hello world, not an image", "x", &limits),
            Err(ImageError::UnsupportedFormat { .. })
        ));
        assert!(matches!(
            decode_image(b"", "x", &limits),
            Err(ImageError::Empty { .. })
        ));
    }
}
