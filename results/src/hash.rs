//! Identities as the store records them: `sha256:<hex>` of an image's
//! bytes ([`content_hash`]) or of a model file ([`file_hash`]).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::StoreError;

/// `sha256:<hex>` of bytes.
pub fn content_hash(bytes: &[u8]) -> String {
    hex_digest(Sha256::digest(bytes).as_slice())
}

/// `sha256:<hex>` of a file, read in chunks (model files can be large).
pub fn file_hash(path: &Path) -> Result<String, StoreError> {
    let io = |cause| StoreError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex_digest(hasher.finalize().as_slice()))
}

fn hex_digest(digest: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(7 + digest.len() * 2);
    out.push_str("sha256:");
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_tagged_sha256() {
        let h = content_hash(b"abc");
        assert_eq!(
            h,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(file_hash(&f).unwrap(), h);
        assert!(matches!(
            file_hash(&tmp.path().join("missing")),
            Err(StoreError::Io { .. })
        ));
    }
}
