//! Merging the stores of separate workers (`flawscope score --shard I/N
//! --db PART.sqlite` on a cluster) into one: `flawscope results merge`.
//!
//! Every source is opened as a results store (another application's
//! database, a damaged one or a missing one is refused before anything is
//! written). The merged store is built under a temporary name beside the
//! output and renamed into place at the end, so a failed merge leaves no
//! half-written file. The same image scored by the same model in two
//! sources is kept once (see [`Store::import`]); decisions are kept.

use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::store::Store;

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeSummary {
    pub sources: usize,
    /// Rows read from all sources.
    pub rows_read: usize,
    /// Rows in the merged store.
    pub rows_written: usize,
}

/// Merges `sources` into a new store at `out` (which must not exist).
pub fn merge(sources: &[PathBuf], out: &Path) -> Result<MergeSummary, StoreError> {
    if out.exists() {
        return Err(StoreError::Exists(out.to_path_buf()));
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let io = |cause| StoreError::Io {
        path: out.to_path_buf(),
        cause,
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".flawscope-merge-").suffix(".sqlite");
    // A temporary file is private (0600) by default, and the rename keeps
    // that mode; ask for 0666 so the result gets the user's umask.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let tmp = builder.tempfile_in(dir).map_err(io)?;
    let mut merged = Store::open(tmp.path())?;
    let mut rows_read = 0;
    for source in sources {
        let store = Store::open_existing(source)?;
        let rows = store.all_results()?;
        rows_read += rows.len();
        merged.import(&rows)?;
        for (key, value) in store.settings()? {
            // The first source's setting wins.
            if merged.setting(&key)?.is_none() {
                merged.set_setting(&key, &value)?;
            }
        }
    }
    let rows_written = merged.all_results()?.len();
    merged.into_single_file()?;
    tmp.as_file().sync_all().map_err(io)?;
    // Refuses to replace a file that appeared meanwhile.
    tmp.persist_noclobber(out).map_err(|e| io(e.error))?;
    Ok(MergeSummary {
        sources: sources.len(),
        rows_read,
        rows_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::{Decision, NewScore};

    fn score(store: &Store, model: &str, path: &str, hash: &str, value: f32) {
        let model = store.model(model, &format!("sha256:{model}")).unwrap();
        store
            .record_score(
                &model,
                &NewScore {
                    inspection: None,
                    path: Path::new(path),
                    content_hash: hash,
                    score: value,
                    raw_score: value * 10.0,
                    threshold: 0.5,
                    defects: &[],
                },
            )
            .unwrap();
    }

    #[test]
    fn merges_keeps_one_row_per_image_and_model_and_the_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.sqlite"), dir.path().join("b.sqlite"));
        let store_a = Store::open(&a).unwrap();
        score(&store_a, "m", "x.png", "h1", 0.9);
        score(&store_a, "m", "y.png", "h2", 0.1);
        store_a
            .set_decision(Path::new("x.png"), "h1", Decision::Ng)
            .unwrap();
        store_a.set_person_threshold(0.4).unwrap();
        drop(store_a);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let store_b = Store::open(&b).unwrap();
        // x.png again (same content, scored later, undecided here) and z.png.
        score(&store_b, "m", "x.png", "h1", 0.8);
        score(&store_b, "m", "z.png", "h3", 0.7);
        drop(store_b);

        let out = dir.path().join("all.sqlite");
        let summary = merge(&[a.clone(), b.clone()], &out).unwrap();
        assert_eq!(summary.rows_read, 4);
        assert_eq!(summary.rows_written, 3);
        let merged = Store::open_existing(&out).unwrap();
        let rows = merged.all_results().unwrap();
        let paths: Vec<_> = rows.iter().map(|r| r.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["x.png", "y.png", "z.png"]);
        // The later score, the decision made in A.
        assert_eq!(rows[0].score, 0.8);
        assert_eq!(rows[0].decision, Decision::Ng);
        assert_eq!(merged.person_threshold().unwrap(), Some(0.4));
        // No side files left at the temporary name; the output exists once.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".flawscope-merge"))
            .collect();
        assert!(names.is_empty(), "{names:?}");

        // An existing output is refused, and so is a foreign source.
        assert!(matches!(
            merge(std::slice::from_ref(&a), &out),
            Err(StoreError::Exists(_))
        ));
        let foreign = dir.path().join("foreign.sqlite");
        rusqlite::Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let out2 = dir.path().join("all2.sqlite");
        assert!(matches!(
            merge(&[a, foreign], &out2),
            Err(StoreError::Foreign { .. })
        ));
        assert!(!out2.exists());
    }
}
