//! PNG chunks the pixels do not need are dropped before decoding.
//!
//! The pixel budget is checked from IHDR, but a decoder inflates a
//! compressed ICC profile (`iCCP`) or text (`zTXt`, `iTXt`) while reading
//! the header, to whatever size the stream says: a 2 MB file held a 2 GB
//! profile. Nothing here uses colour profiles or text, so only the chunks
//! that make the pixels (IHDR, PLTE, tRNS, IDAT, IEND) reach the decoder;
//! every allocation left is then bounded by the image's own size.

use std::borrow::Cow;

/// The chunk types kept: the critical ones and the transparency table.
const KEPT: [&[u8; 4]; 5] = [b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"];

/// `bytes` (a PNG file) with every chunk but [`KEPT`] left out; borrowed
/// when there is none to leave out. A chunk whose length runs past the end
/// ends the walk: it and what follows are kept as they are, for the decoder
/// to refuse.
pub(super) fn png_pixel_chunks(bytes: &[u8]) -> Cow<'_, [u8]> {
    const SIGNATURE: usize = 8;
    let mut spans = Vec::new();
    let mut dropped = false;
    let mut at = SIGNATURE;
    while at < bytes.len() {
        let end = bytes
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .and_then(|length| at.checked_add(12)?.checked_add(length))
            .filter(|end| *end <= bytes.len());
        let Some(end) = end else {
            spans.push(at..bytes.len());
            break;
        };
        let kind = &bytes[at + 4..at + 8];
        if KEPT.iter().any(|k| k.as_slice() == kind) {
            spans.push(at..end);
        } else {
            dropped = true;
        }
        at = end;
        if kind == b"IEND" {
            break;
        }
    }
    if !dropped {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(
        bytes
            .len()
            .min(SIGNATURE + spans.iter().map(|s| s.len()).sum::<usize>()),
    );
    out.extend_from_slice(&bytes[..SIGNATURE.min(bytes.len())]);
    for span in spans {
        out.extend_from_slice(&bytes[span]);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&[0, 0, 0, 0]); // CRC, not checked here.
        out
    }

    #[test]
    fn only_the_pixel_chunks_are_kept() {
        let sig = b"\x89PNG\r\n\x1a\n".to_vec();
        let ihdr = chunk(b"IHDR", &[0; 13]);
        let idat = chunk(b"IDAT", b"xyz");
        let iend = chunk(b"IEND", b"");
        let clean = [sig.clone(), ihdr.clone(), idat.clone(), iend.clone()].concat();
        assert!(matches!(png_pixel_chunks(&clean), Cow::Borrowed(_)));
        let noisy = [
            sig,
            ihdr,
            chunk(b"iCCP", b"icc\0\0zzzz"),
            chunk(b"zTXt", b"k\0\0zz"),
            idat,
            chunk(b"tEXt", b"a\0b"),
            iend,
            b"trailing".to_vec(),
        ]
        .concat();
        assert_eq!(png_pixel_chunks(&noisy).as_ref(), &clean[..]);
        // A length past the end: kept as is from there.
        let mut cut = clean[..8 + 25].to_vec();
        cut.extend_from_slice(&chunk(b"iCCP", b"x")[..6]);
        assert_eq!(png_pixel_chunks(&cut).as_ref(), &cut[..]);
    }
}
