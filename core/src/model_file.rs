//! One file per fitted model: safetensors tensors plus JSON metadata.
//!
//! The metadata (format version, feature recipe, detector, calibration, …)
//! sits in the safetensors header under the key `flawscope`, next to a
//! SHA-256 checksum of the metadata and every tensor, so a truncated or
//! edited file is caught. Files are written to a temporary name in the
//! target folder and renamed into place, so a crash never leaves half a
//! model behind.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

/// The model file format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const METADATA_KEY: &str = "flawscope";
const VERSION_KEY: &str = "flawscope_format_version";
const CHECKSUM_KEY: &str = "flawscope_sha256";

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("cannot read model file {path}: {cause}")]
    Read {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("cannot write model file {path}: {cause}")]
    Write {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("{path} is not a flawscope model file ({reason})")]
    NotAModel { path: PathBuf, reason: String },
    #[error(
        "{path} was written by a newer flawscope (model format {found}; this build reads up to {FORMAT_VERSION}); upgrade flawscope"
    )]
    NewerVersion { path: PathBuf, found: u32 },
    #[error("{path} is damaged: its checksum does not match (truncated or edited?)")]
    Checksum { path: PathBuf },
    #[error("{path} lacks tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("metadata error: {0}")]
    Metadata(#[from] serde_json::Error),
}

/// Writes `metadata` and `tensors` to `path` atomically.
pub fn save<M: Serialize>(
    path: &Path,
    metadata: &M,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), ModelFileError> {
    let json = serde_json::to_string(metadata)?;
    let host: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let checksum = checksum(&json, &host)?;
    let header = HashMap::from([
        (METADATA_KEY.to_string(), json),
        (VERSION_KEY.to_string(), FORMAT_VERSION.to_string()),
        (CHECKSUM_KEY.to_string(), checksum),
    ]);
    let bytes =
        safetensors::tensor::serialize(&host, Some(header)).map_err(|e| ModelFileError::Write {
            path: path.to_path_buf(),
            cause: std::io::Error::other(e.to_string()),
        })?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelFileError> {
    let write_err = |cause| ModelFileError::Write {
        path: path.to_path_buf(),
        cause,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".flawscope-").suffix(".tmp");
    // A temporary file is private (0600) by default, and the rename keeps
    // that mode; ask for 0666 so the result gets the user's umask.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).map_err(write_err)?;
    tmp.write_all(bytes).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(path).map_err(|e| write_err(e.error))?;
    Ok(())
}

/// Reads a model file: its metadata and tensors, checked.
pub fn load<M: DeserializeOwned>(
    path: &Path,
    device: &Device,
) -> Result<(M, HashMap<String, Tensor>), ModelFileError> {
    let bytes = std::fs::read(path).map_err(|cause| ModelFileError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let not_a_model = |reason: String| ModelFileError::NotAModel {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| not_a_model(format!("unreadable safetensors header: {e}")))?;
    let info = header
        .metadata()
        .as_ref()
        .ok_or_else(|| not_a_model("no metadata".into()))?;
    let version: u32 = info
        .get(VERSION_KEY)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| not_a_model("no format version".into()))?;
    if version > FORMAT_VERSION {
        return Err(ModelFileError::NewerVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let json = info
        .get(METADATA_KEY)
        .ok_or_else(|| not_a_model("no flawscope metadata".into()))?;
    let stored_checksum = info
        .get(CHECKSUM_KEY)
        .ok_or_else(|| not_a_model("no checksum".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| not_a_model(format!("unreadable tensors: {e}")))?;
    let sorted: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    if &checksum(json, &sorted)? != stored_checksum {
        return Err(ModelFileError::Checksum {
            path: path.to_path_buf(),
        });
    }
    let metadata: M =
        serde_json::from_str(json).map_err(|e| not_a_model(format!("unreadable metadata: {e}")))?;
    let tensors = sorted
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<Result<_, candle_core::Error>>()?;
    Ok((metadata, tensors))
}

/// Takes tensor `name` out of a loaded map.
pub fn take(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    path: &Path,
) -> Result<Tensor, ModelFileError> {
    tensors
        .remove(name)
        .ok_or_else(|| ModelFileError::MissingTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        })
}

fn checksum(json: &str, tensors: &BTreeMap<String, Tensor>) -> Result<String, ModelFileError> {
    let mut hasher = Sha256::new();
    hasher.update(json.as_bytes());
    for (name, tensor) in tensors {
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}{:?}", tensor.dtype(), tensor.dims()).as_bytes());
        let view: &Tensor = tensor;
        hasher.update(safetensors::View::data(&view));
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The written file has the mode a plain `File::create` would give it
    /// under this process's umask, not the temporary file's 0600.
    #[cfg(unix)]
    #[test]
    fn written_files_get_the_umask_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let expected = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        let path = dir.path().join("out.bin");
        write_atomically(&path, b"bytes").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, expected,
            "mode {mode:o}, a plain file gets {expected:o}"
        );
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Meta {
        name: String,
    }

    fn sample() -> (Meta, BTreeMap<String, Tensor>) {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        (
            Meta { name: "m".into() },
            BTreeMap::from([("bank".to_string(), t)]),
        )
    }

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.flawscope");
        let (meta, tensors) = sample();
        save(&path, &meta, &tensors).unwrap();
        let (back, loaded): (Meta, _) = load(&path, &Device::Cpu).unwrap();
        assert_eq!(back, meta);
        assert_eq!(
            loaded["bank"].to_vec2::<f32>().unwrap(),
            tensors["bank"].to_vec2::<f32>().unwrap()
        );
        // Only the final file is left: the temporary one was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        assert!(matches!(
            load::<Meta>(&path, &Device::Cpu),
            Err(ModelFileError::NotAModel { .. })
        ));

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x55;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            load::<Meta>(&path, &Device::Cpu),
            Err(ModelFileError::Checksum { .. })
        ));

        std::fs::write(&path, b"certainly not a model").unwrap();
        assert!(matches!(
            load::<Meta>(&path, &Device::Cpu),
            Err(ModelFileError::NotAModel { .. })
        ));
    }

    #[test]
    fn newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.flawscope");
        let (_, tensors) = sample();
        let header = HashMap::from([
            (METADATA_KEY.to_string(), "{}".to_string()),
            (VERSION_KEY.to_string(), (FORMAT_VERSION + 1).to_string()),
            (CHECKSUM_KEY.to_string(), String::new()),
        ]);
        let bytes = safetensors::tensor::serialize(&tensors, Some(header)).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let err = load::<Meta>(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(err, ModelFileError::NewerVersion { found: 2, .. }));
        assert!(err.to_string().contains("newer flawscope"));
    }
}
