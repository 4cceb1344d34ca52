//! Averaged class vectors per (model, object, prompt set), kept in memory and
//! optionally in a JSON file, so the text tower runs once per object.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{PromptError, PromptSet, object_phrase};

/// Something that turns sentences into embeddings: the CLIP text tower plus
/// its tokenizer. Implemented by the caller that owns both.
pub trait SentenceEncoder {
    /// The encoder's error; it must accept this crate's errors.
    type Error: From<PromptError>;

    /// A stable name of the weights (e.g. `openai/clip-vit-base-patch16@57c2164`),
    /// part of the cache key: two models must never share an id.
    fn model_id(&self) -> String;

    /// One embedding per sentence, in order, all of the same length.
    fn encode_sentences(&self, sentences: &[String]) -> Result<Vec<Vec<f32>>, Self::Error>;
}

/// The two class vectors of WinCLIP: the mean of the embeddings of each
/// class's sentences, scaled to unit length (as anomalib's WinCLIP does: the
/// sentences are averaged as the text tower gives them, not normalised first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassVectors {
    /// Mean direction of the normal sentences (unit length).
    pub normal: Vec<f32>,
    /// Mean direction of the anomalous sentences (unit length).
    pub anomalous: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct CacheKey {
    model: String,
    object: String,
    prompts: u64,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    #[serde(flatten)]
    key: CacheKey,
    #[serde(flatten)]
    vectors: ClassVectors,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: Vec<CacheEntry>,
}

// 2: class vectors are the normalised mean of the raw sentence embeddings
// (version 1 averaged unit rows); older files are ignored, not misread.
const CACHE_VERSION: u32 = 2;

/// In-memory cache of [`ClassVectors`], optionally backed by a JSON file that
/// is read on open and rewritten (atomically) whenever an entry is added.
#[derive(Debug, Default)]
pub struct TextEmbeddingCache {
    entries: HashMap<CacheKey, Arc<ClassVectors>>,
    file: Option<PathBuf>,
}

impl TextEmbeddingCache {
    /// A cache that lives as long as the process.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A cache backed by `path`; a missing file is an empty cache.
    pub fn with_file(path: &Path) -> Result<Self, PromptError> {
        let mut cache = Self {
            entries: HashMap::new(),
            file: Some(path.to_owned()),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cache),
            Err(e) => return Err(cache_error(path, e)),
        };
        let file: CacheFile = serde_json::from_str(&text).map_err(|e| cache_error(path, e))?;
        if file.version != CACHE_VERSION {
            // An older layout: start afresh, it is only a cache.
            return Ok(cache);
        }
        for entry in file.entries {
            cache.entries.insert(entry.key, Arc::new(entry.vectors));
        }
        Ok(cache)
    }

    /// Number of cached (model, object, prompt set) entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached vectors, if any, without computing.
    pub fn get(
        &self,
        model_id: &str,
        object: &str,
        prompts: &PromptSet,
    ) -> Option<Arc<ClassVectors>> {
        self.entries.get(&key(model_id, object, prompts)).cloned()
    }

    /// The class vectors of `object` under `prompts`, computed with `encoder`
    /// on a miss (and written to the backing file, if any).
    pub fn class_vectors<E: SentenceEncoder>(
        &mut self,
        encoder: &E,
        object: &str,
        prompts: &PromptSet,
    ) -> Result<Arc<ClassVectors>, E::Error> {
        let key = key(&encoder.model_id(), object, prompts);
        if let Some(found) = self.entries.get(&key) {
            return Ok(Arc::clone(found));
        }
        let sentences = prompts.sentences(object);
        if sentences.normal.is_empty() {
            return Err(PromptError::EmptyClass { class: "normal" }.into());
        }
        if sentences.anomalous.is_empty() {
            return Err(PromptError::EmptyClass { class: "anomalous" }.into());
        }
        let normal = normalised_mean(&encoder.encode_sentences(&sentences.normal)?)?;
        let anomalous = normalised_mean(&encoder.encode_sentences(&sentences.anomalous)?)?;
        if normal.len() != anomalous.len() {
            return Err(PromptError::Embeddings(format!(
                "normal vectors have {} values, anomalous {}",
                normal.len(),
                anomalous.len()
            ))
            .into());
        }
        let vectors = Arc::new(ClassVectors { normal, anomalous });
        self.entries.insert(key, Arc::clone(&vectors));
        self.save()?;
        Ok(vectors)
    }

    /// Writes the backing file (no-op for an in-memory cache).
    pub fn save(&self) -> Result<(), PromptError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut entries: Vec<CacheEntry> = self
            .entries
            .iter()
            .map(|(k, v)| CacheEntry {
                key: k.clone(),
                vectors: (**v).clone(),
            })
            .collect();
        entries.sort_by(|a, b| {
            (&a.key.model, &a.key.object, a.key.prompts).cmp(&(
                &b.key.model,
                &b.key.object,
                b.key.prompts,
            ))
        });
        let text = serde_json::to_string(&CacheFile {
            version: CACHE_VERSION,
            entries,
        })
        .map_err(|e| cache_error(path, e))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| cache_error(path, e))?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, text).map_err(|e| cache_error(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| cache_error(path, e))
    }
}

fn key(model_id: &str, object: &str, prompts: &PromptSet) -> CacheKey {
    CacheKey {
        model: model_id.to_owned(),
        object: object_phrase(object),
        prompts: prompts.fingerprint(object),
    }
}

fn cache_error(path: &Path, e: impl std::fmt::Display) -> PromptError {
    PromptError::CacheFile {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// The mean of the rows, scaled to unit length.
///
/// Errors on no rows, rows of different lengths, a non-finite value, or a
/// zero mean.
pub fn normalised_mean(rows: &[Vec<f32>]) -> Result<Vec<f32>, PromptError> {
    let first = rows
        .first()
        .ok_or_else(|| PromptError::Embeddings("no embedding to average".into()))?;
    let dim = first.len();
    if dim == 0 {
        return Err(PromptError::Embeddings("empty embedding".into()));
    }
    let mut sum = vec![0f64; dim];
    for (i, row) in rows.iter().enumerate() {
        if row.len() != dim {
            return Err(PromptError::Embeddings(format!(
                "row {i} has {} values, row 0 has {dim}",
                row.len()
            )));
        }
        if row.iter().any(|v| !v.is_finite()) {
            return Err(PromptError::Embeddings(format!(
                "row {i} has a non-finite value"
            )));
        }
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(PromptError::Embeddings("the mean embedding is zero".into()));
    }
    Ok(sum.iter().map(|&v| (v / norm) as f32).collect())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    struct Fake {
        calls: Cell<usize>,
    }

    impl SentenceEncoder for Fake {
        type Error = PromptError;

        fn model_id(&self) -> String {
            "fake".into()
        }

        fn encode_sentences(&self, sentences: &[String]) -> Result<Vec<Vec<f32>>, PromptError> {
            self.calls.set(self.calls.get() + 1);
            Ok(sentences
                .iter()
                .map(|s| {
                    let damaged = s.contains("damaged ") || s.contains(" with ");
                    if damaged {
                        vec![0.0, 2.0, s.len() as f32 * 0.01]
                    } else {
                        vec![3.0, 0.0, s.len() as f32 * 0.01]
                    }
                })
                .collect())
        }
    }

    #[test]
    fn averages_rows_then_normalises() {
        // The mean (1, 2.5) is not the mean of the unit rows (0.5, 0.5).
        let v = normalised_mean(&[vec![2.0, 0.0], vec![0.0, 5.0]]).unwrap();
        let n = (1.0f32 + 6.25).sqrt();
        assert!((v[0] - 1.0 / n).abs() < 1e-6 && (v[1] - 2.5 / n).abs() < 1e-6);
        assert!(normalised_mean(&[]).is_err());
        assert!(normalised_mean(&[vec![1.0], vec![1.0, 2.0]]).is_err());
        assert!(normalised_mean(&[vec![0.0, 0.0]]).is_err());
        assert!(normalised_mean(&[vec![1.0, 0.0], vec![-1.0, 0.0]]).is_err());
        assert!(normalised_mean(&[vec![f32::NAN, 0.0]]).is_err());
    }

    #[test]
    fn caches_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("text.json");
        let fake = Fake {
            calls: Cell::new(0),
        };
        let prompts = PromptSet::winclip();
        let mut cache = TextEmbeddingCache::with_file(&path).unwrap();
        let a = cache.class_vectors(&fake, "screw", &prompts).unwrap();
        let b = cache.class_vectors(&fake, "screw", &prompts).unwrap();
        assert_eq!(fake.calls.get(), 2, "one call per class, then cached");
        assert_eq!(a, b);
        assert!(a.normal[0] > 0.9 && a.normal[1] == 0.0 && a.anomalous[1] > 0.9);

        let with_defect = prompts.clone().with_defect("scratch").unwrap();
        cache.class_vectors(&fake, "screw", &with_defect).unwrap();
        assert_eq!(fake.calls.get(), 4);
        assert_eq!(cache.len(), 2);

        let reopened = TextEmbeddingCache::with_file(&path).unwrap();
        assert_eq!(reopened.len(), 2);
        assert_eq!(reopened.get("fake", "screw", &prompts).unwrap(), a);
        assert!(reopened.get("other", "screw", &prompts).is_none());
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text.json");
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            TextEmbeddingCache::with_file(&path),
            Err(PromptError::CacheFile { .. })
        ));
    }
}
