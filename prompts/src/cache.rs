//! Averaged class vectors per (model, object, prompt set), kept in memory and
//! optionally on disk, so the text tower runs once per object: in a process,
//! and, with a cache folder, once per machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ensemble::Fnv1a;
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
    version: u32,
    #[serde(flatten)]
    key: CacheKey,
    #[serde(flatten)]
    vectors: ClassVectors,
}

// 2: class vectors are the normalised mean of the raw sentence embeddings
// (version 1 averaged unit rows); older entries are ignored, not misread.
const CACHE_VERSION: u32 = 2;

/// In-memory cache of [`ClassVectors`], optionally backed by a folder with
/// one JSON file per entry.
///
/// Several processes may share the folder: an entry is written to a
/// temporary file and renamed into place, so a reader sees a whole entry or
/// none, and two processes computing the same entry write the same bytes.
/// A file that cannot be read back (cut short, another version, another key
/// under the same name) is a miss, recomputed and replaced.
#[derive(Debug, Default)]
pub struct TextEmbeddingCache {
    entries: HashMap<CacheKey, Arc<ClassVectors>>,
    dir: Option<PathBuf>,
}

impl TextEmbeddingCache {
    /// A cache that lives as long as the process.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A cache backed by the folder `dir` (created if missing).
    pub fn in_dir(dir: &Path) -> Result<Self, PromptError> {
        std::fs::create_dir_all(dir).map_err(|e| cache_error(dir, e))?;
        Ok(Self {
            entries: HashMap::new(),
            dir: Some(dir.to_owned()),
        })
    }

    /// The backing folder, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Number of entries held in memory.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether memory holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached vectors, if any (from memory, else the folder), without
    /// computing.
    pub fn get(
        &mut self,
        model_id: &str,
        object: &str,
        prompts: &PromptSet,
    ) -> Option<Arc<ClassVectors>> {
        self.lookup(&key(model_id, object, prompts))
    }

    fn lookup(&mut self, key: &CacheKey) -> Option<Arc<ClassVectors>> {
        if let Some(found) = self.entries.get(key) {
            return Some(Arc::clone(found));
        }
        let path = self.entry_path(key)?;
        let text = std::fs::read_to_string(path).ok()?;
        let entry: CacheEntry = serde_json::from_str(&text).ok()?;
        if entry.version != CACHE_VERSION || &entry.key != key {
            return None;
        }
        let vectors = Arc::new(entry.vectors);
        self.entries.insert(key.clone(), Arc::clone(&vectors));
        Some(vectors)
    }

    fn entry_path(&self, key: &CacheKey) -> Option<PathBuf> {
        let mut hash = Fnv1a::new();
        for part in [key.model.as_bytes(), key.object.as_bytes()] {
            hash.write(&(part.len() as u64).to_le_bytes());
            hash.write(part);
        }
        hash.write(&key.prompts.to_le_bytes());
        Some(
            self.dir
                .as_ref()?
                .join(format!("{:016x}.json", hash.finish())),
        )
    }

    /// The class vectors of `object` under `prompts`, computed with `encoder`
    /// on a miss (and written to the folder, if any).
    pub fn class_vectors<E: SentenceEncoder>(
        &mut self,
        encoder: &E,
        object: &str,
        prompts: &PromptSet,
    ) -> Result<Arc<ClassVectors>, E::Error> {
        let key = key(&encoder.model_id(), object, prompts);
        if let Some(found) = self.lookup(&key) {
            return Ok(found);
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
        self.store(&key, &vectors)?;
        self.entries.insert(key, Arc::clone(&vectors));
        Ok(vectors)
    }

    fn store(&self, key: &CacheKey, vectors: &ClassVectors) -> Result<(), PromptError> {
        let Some(path) = self.entry_path(key) else {
            return Ok(());
        };
        let text = serde_json::to_string(&CacheEntry {
            version: CACHE_VERSION,
            key: key.clone(),
            vectors: vectors.clone(),
        })
        .map_err(|e| cache_error(&path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut builder = tempfile::Builder::new();
        builder.prefix(".entry-").suffix(".tmp");
        // Temporary files are private (0600); ask for 0666 so the entry gets
        // the user's umask, like every file flawscope writes.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let mut tmp = builder.tempfile_in(dir).map_err(|e| cache_error(dir, e))?;
        std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|e| cache_error(&path, e))?;
        tmp.persist(&path)
            .map_err(|e| cache_error(&path, e.error))?;
        Ok(())
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
        let folder = dir.path().join("sub").join("text");
        let fake = Fake {
            calls: Cell::new(0),
        };
        let prompts = PromptSet::winclip();
        let mut cache = TextEmbeddingCache::in_dir(&folder).unwrap();
        let a = cache.class_vectors(&fake, "screw", &prompts).unwrap();
        let b = cache.class_vectors(&fake, "screw", &prompts).unwrap();
        assert_eq!(fake.calls.get(), 2, "one call per class, then cached");
        assert_eq!(a, b);
        assert!(a.normal[0] > 0.9 && a.normal[1] == 0.0 && a.anomalous[1] > 0.9);

        let with_defect = prompts.clone().with_defect("scratch").unwrap();
        cache.class_vectors(&fake, "screw", &with_defect).unwrap();
        assert_eq!(fake.calls.get(), 4);
        assert_eq!(cache.len(), 2);
        assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 2);

        // A second process: nothing is encoded again.
        let second = Fake {
            calls: Cell::new(0),
        };
        let mut reopened = TextEmbeddingCache::in_dir(&folder).unwrap();
        assert!(reopened.is_empty());
        let again = reopened.class_vectors(&second, "screw", &prompts).unwrap();
        reopened
            .class_vectors(&second, "screw", &with_defect)
            .unwrap();
        assert_eq!(second.calls.get(), 0, "both entries come from the folder");
        assert_eq!(again, a);
        assert!(reopened.get("other", "screw", &prompts).is_none());
    }

    #[test]
    fn broken_entries_are_misses_and_get_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake {
            calls: Cell::new(0),
        };
        let prompts = PromptSet::winclip();
        let mut cache = TextEmbeddingCache::in_dir(dir.path()).unwrap();
        let a = cache.class_vectors(&fake, "screw", &prompts).unwrap();
        let entry = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let whole = std::fs::read_to_string(&entry).unwrap();
        for broken in [&whole[..whole.len() / 2], "{not json", ""] {
            std::fs::write(&entry, broken).unwrap();
            let mut fresh = TextEmbeddingCache::in_dir(dir.path()).unwrap();
            let calls = fake.calls.get();
            assert_eq!(fresh.class_vectors(&fake, "screw", &prompts).unwrap(), a);
            assert_eq!(fake.calls.get(), calls + 2, "recomputed");
            assert_eq!(std::fs::read_to_string(&entry).unwrap(), whole, "replaced");
        }
    }

    #[test]
    fn processes_sharing_a_folder_agree() {
        // Threads stand in for processes: each has its own cache on the
        // same folder, and all race to write the same entry.
        let dir = tempfile::tempdir().unwrap();
        let prompts = PromptSet::winclip();
        let results: Vec<Arc<ClassVectors>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let fake = Fake {
                            calls: Cell::new(0),
                        };
                        let mut cache = TextEmbeddingCache::in_dir(dir.path()).unwrap();
                        cache.class_vectors(&fake, "screw", &prompts).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "one entry, no temporary file left: {names:?}"
        );
    }
}
