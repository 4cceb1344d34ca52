//! A safetensors reader that loads one tensor at a time from the file.
//!
//! candle's memory-mapped loader is `unsafe` (the workspace denies unsafe
//! code) and its buffered loader holds the whole file in memory next to the
//! tensors made from it. This reader parses the header, then reads each
//! tensor's bytes on demand, so loading peaks at the model's size plus one
//! tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use crate::ModelError;

/// Headers larger than this are refused (real ones are a few hundred kB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Clone)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    len: u64,
}

/// An open safetensors file whose tensors are read when asked for.
pub(crate) struct SafetensorsFile {
    path: PathBuf,
    file: Mutex<File>,
    entries: HashMap<String, Entry>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Opens `path` and checks its header against the file size.
    pub(crate) fn open(path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Weights {
            path: path.to_owned(),
            reason,
        };
        let io = |source| ModelError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER || header_len.saturating_add(8) > size {
            return Err(bad(format!(
                "not a safetensors file (header of {header_len} bytes in a file of {size})"
            )));
        }
        let mut header = vec![0u8; usize::try_from(header_len).map_err(|e| bad(e.to_string()))?];
        file.read_exact(&mut header).map_err(io)?;
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
        let data_start = 8 + header_len;
        let mut entries = HashMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                continue;
            }
            let entry: RawEntry = serde_json::from_value(value)
                .map_err(|e| bad(format!("bad header entry {name}: {e}")))?;
            let [begin, end] = entry.data_offsets;
            let elem_size = dtype_of(&entry.dtype).map_or(1, |d| d.size_in_bytes() as u64);
            let count = entry
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            let fits = end >= begin
                && data_start.checked_add(end).is_some_and(|e| e <= size)
                && (dtype_of(&entry.dtype).is_none()
                    || count.and_then(|c| c.checked_mul(elem_size)) == Some(end - begin));
            if !fits {
                return Err(bad(format!(
                    "tensor {name}: offsets {begin}..{end} do not match its {} {:?} or the file size",
                    entry.dtype, entry.shape
                )));
            }
            entries.insert(
                name,
                Entry {
                    dtype: entry.dtype,
                    shape: entry.shape,
                    start: data_start + begin,
                    len: end - begin,
                },
            );
        }
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
            entries,
        })
    }

    /// The stored shape of `name`, if present.
    pub(crate) fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_owned(),
            })?;
        let stored = dtype_of(&entry.dtype).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: tensor {name} has unsupported dtype {}",
                self.path.display(),
                entry.dtype
            ))
        })?;
        let len = usize::try_from(entry.len).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut bytes = vec![0u8; len];
        {
            let mut file = self
                .file
                .lock()
                .map_err(|_| candle_core::Error::Msg("weights file lock poisoned".into()))?;
            file.seek(SeekFrom::Start(entry.start))?;
            file.read_exact(&mut bytes)?;
        }
        Tensor::from_raw_buffer(&bytes, stored, &entry.shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }
}

impl SimpleBackend for SafetensorsFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(stored) = self.shape_of(name)
            && stored != s.dims()
        {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("tensor {name} has the wrong shape"),
                expected: s,
                got: Shape::from(stored.to_vec()),
            });
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}
