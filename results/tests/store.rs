//! The results store under stress: interrupted batches, a reader beside a
//! writer, damaged files.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use flawscope_results::error::StoreError;
use flawscope_results::rows::{Decision, NewScore};
use flawscope_results::scoring::{
    BatchItem, BatchOptions, ScoreError, Scored, Scorer, never, run_batch, store_path,
};
use flawscope_results::store::Store;

/// Scores from the first byte of the file; counts calls per path; can
/// "crash" (panic) on the n-th call, like a process killed mid-image.
struct FakeScorer {
    calls: Mutex<HashMap<PathBuf, usize>>,
    crash_on_call: Option<usize>,
    total: AtomicUsize,
}

impl FakeScorer {
    fn new(crash_on_call: Option<usize>) -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
            crash_on_call,
            total: AtomicUsize::new(0),
        }
    }
}

impl Scorer for FakeScorer {
    fn score(&self, path: &Path, bytes: &[u8]) -> Result<Scored, ScoreError> {
        let n = self.total.fetch_add(1, Ordering::SeqCst) + 1;
        if Some(n) == self.crash_on_call {
            panic!("simulated crash while scoring {}", path.display());
        }
        *self
            .calls
            .lock()
            .unwrap()
            .entry(path.to_path_buf())
            .or_default() += 1;
        if bytes.first() == Some(&0xff) {
            return Err(ScoreError::Other("undecodable".into()));
        }
        let score = f32::from(bytes.first().copied().unwrap_or(0)) / 255.0;
        Ok(Scored {
            inspection: None,
            score,
            raw_score: score * 40.0,
            threshold: 0.5,
            preview: None,
            defects: Vec::new(),
        })
    }
}

fn images(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("img_{i:03}.png"));
            std::fs::write(&path, [(i * 7 % 250) as u8, 1, 2, 3]).unwrap();
            path
        })
        .collect()
}

fn batch(
    files: &[PathBuf],
    scorer: &FakeScorer,
    db: &Path,
) -> Result<flawscope_results::scoring::BatchSummary, StoreError> {
    let store = Store::open(db)?;
    let model = store.model("fake.flawscope", "sha256:fake")?;
    let cancel = AtomicBool::new(false);
    let options = BatchOptions {
        cancel: &cancel,
        rescore: &never,
    };
    run_batch(files, scorer, &store, &model, &options, |_| {})
}

#[test]
fn a_batch_killed_halfway_resumes_and_scores_every_image_once() {
    let tmp = tempfile::tempdir().unwrap();
    let files = images(tmp.path(), 40);
    let db = tmp.path().join("results.sqlite");

    // First run dies on its 17th image: 16 rows were committed.
    let first = FakeScorer::new(Some(17));
    let crashed = std::panic::catch_unwind(|| batch(&files, &first, &db));
    assert!(crashed.is_err(), "the simulated crash happened");
    let committed = first.calls.lock().unwrap().clone();
    assert_eq!(committed.len(), 16);

    // A fresh process (a new connection) resumes.
    let second = FakeScorer::new(None);
    let summary = batch(&files, &second, &db).unwrap();
    assert_eq!((summary.unchanged, summary.scored), (16, 24));
    let rescored = second.calls.lock().unwrap().clone();
    for path in committed.keys() {
        assert!(
            !rescored.contains_key(path),
            "{} scored twice",
            path.display()
        );
    }
    assert_eq!(rescored.len() + committed.len(), 40);

    // Every image has exactly one row; a third run scores nothing.
    let store = Store::open(&db).unwrap();
    let rows = store.all_results().unwrap();
    assert_eq!(rows.len(), 40);
    let mut paths: Vec<_> = rows.iter().map(|r| r.path.clone()).collect();
    paths.dedup();
    assert_eq!(paths.len(), 40);
    let third = FakeScorer::new(None);
    let summary = batch(&files, &third, &db).unwrap();
    assert_eq!((summary.unchanged, summary.scored), (40, 0));
    assert_eq!(third.total.load(Ordering::SeqCst), 0);
}

#[test]
fn changed_files_and_other_models_are_rescored_and_failures_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let files = images(tmp.path(), 5);
    std::fs::write(&files[4], [0xff]).unwrap();
    let db = tmp.path().join("results.sqlite");
    let summary = batch(&files, &FakeScorer::new(None), &db).unwrap();
    assert_eq!((summary.scored, summary.failed), (4, 1));

    // Decide on one image, then change another's bytes.
    let store = Store::open(&db).unwrap();
    let row = store.all_results().unwrap().remove(0);
    store
        .set_decision(&row.path, &row.content_hash, Decision::Ng)
        .unwrap();
    std::fs::write(&files[1], [200, 9]).unwrap();

    let scorer = FakeScorer::new(None);
    let mut items = Vec::new();
    let model = store.model("fake.flawscope", "sha256:fake").unwrap();
    let cancel = AtomicBool::new(false);
    let options = BatchOptions {
        cancel: &cancel,
        rescore: &never,
    };
    run_batch(&files, &scorer, &store, &model, &options, |item| {
        items.push(item)
    })
    .unwrap();
    let rescored: Vec<_> = scorer.calls.lock().unwrap().keys().cloned().collect();
    let mut expected = vec![store_path(&files[1]), store_path(&files[4])];
    expected.sort();
    let mut rescored = rescored;
    rescored.sort();
    assert_eq!(rescored, expected);
    assert!(matches!(items[4], BatchItem::Failed { .. }));
    // The decision survived (unchanged content) and a second model's row
    // for the same content inherits it.
    let other = store.model("other.flawscope", "sha256:other").unwrap();
    let inherited = store
        .record_score(
            &other,
            &NewScore {
                inspection: None,
                path: &row.path,
                content_hash: &row.content_hash,
                score: 0.1,
                raw_score: 1.0,
                threshold: 0.5,
                defects: &[],
            },
        )
        .unwrap();
    assert_eq!(inherited.decision, Decision::Ng);

    // A cancelled batch stops before the next image.
    cancel.store(true, Ordering::Relaxed);
    let summary = run_batch(&files, &scorer, &store, &model, &options, |_| {}).unwrap();
    assert!(summary.cancelled);
    assert_eq!(summary.scored + summary.unchanged, 0);
}

#[test]
fn a_reader_sees_consistent_rows_while_a_writer_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("results.sqlite");
    let store = Store::open(&db).unwrap();
    let a = store.model("a", "sha256:a").unwrap();
    let b = store.model("b", "sha256:b").unwrap();
    drop(store);
    let done = AtomicBool::new(false);
    let paths: Vec<PathBuf> = (0..150)
        .map(|i| PathBuf::from(format!("/img/{i:03}.png")))
        .collect();

    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let store = Store::open(&db).unwrap();
            for (i, path) in paths.iter().enumerate() {
                let hash = format!("h{i}");
                for model in [&a, &b] {
                    let score = NewScore {
                        inspection: None,
                        path,
                        content_hash: &hash,
                        score: 0.3,
                        raw_score: 3.0,
                        threshold: 0.5,
                        defects: &[],
                    };
                    store.record_score(model, &score).unwrap();
                }
                // One statement updates both models' rows of the image.
                let decision = if i % 2 == 0 {
                    Decision::Ok
                } else {
                    Decision::Ng
                };
                store.set_decision(path, &hash, decision).unwrap();
                if i >= 2 {
                    store
                        .set_decision(&paths[i - 2], &format!("h{}", i - 2), Decision::None)
                        .unwrap();
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        let reader = scope.spawn(|| {
            let store = Store::open(&db).unwrap();
            let mut snapshots = 0;
            let mut last_len = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let rows = store.all_results().unwrap();
                assert!(rows.len() >= last_len, "rows never disappear");
                last_len = rows.len();
                let mut by_image: HashMap<(PathBuf, String), Vec<Decision>> = HashMap::new();
                for row in &rows {
                    assert!(row.score.is_finite() && !row.scored_at.is_empty());
                    by_image
                        .entry((row.path.clone(), row.content_hash.clone()))
                        .or_default()
                        .push(row.decision);
                }
                for ((path, _), decisions) in by_image {
                    assert!(
                        decisions.windows(2).all(|w| w[0] == w[1]),
                        "half-applied decision on {}: {decisions:?}",
                        path.display()
                    );
                }
                snapshots += 1;
                if finished {
                    return (snapshots, last_len);
                }
            }
        });
        writer.join().unwrap();
        let (snapshots, rows) = reader.join().unwrap();
        assert!(snapshots > 1);
        assert_eq!(rows, 300);
    });
}

#[test]
fn a_corrupt_database_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();

    // Not a database at all.
    let garbage = tmp.path().join("garbage.sqlite");
    std::fs::write(
        &garbage,
        b"this is certainly not an SQLite file, just some text....".repeat(100),
    )
    .unwrap();
    let err = Store::open(&garbage).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("garbage.sqlite"), "{message}");
    assert!(
        message.contains("not a flawscope results database"),
        "{message}"
    );

    // A real database whose pages were overwritten.
    let damaged = tmp.path().join("damaged.sqlite");
    {
        let store = Store::open(&damaged).unwrap();
        let model = store.model("m", "sha256:m").unwrap();
        for i in 0..500 {
            let path = PathBuf::from(format!("/img/{i:04}-{}.png", "x".repeat(60)));
            store
                .record_score(
                    &model,
                    &NewScore {
                        inspection: None,
                        path: &path,
                        content_hash: "sha256:00",
                        score: 0.5,
                        raw_score: 1.0,
                        threshold: 0.5,
                        defects: &[],
                    },
                )
                .unwrap();
        }
    }
    let mut bytes = std::fs::read(&damaged).unwrap();
    assert!(bytes.len() > 16 * 4096, "{}", bytes.len());
    for b in &mut bytes[4096 + 100..12 * 4096] {
        *b = 0xA5;
    }
    std::fs::write(&damaged, &bytes).unwrap();
    let err = Store::open(&damaged).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");

    // An empty file is a fresh database, not an error.
    let empty = tmp.path().join("empty.sqlite");
    std::fs::write(&empty, b"").unwrap();
    Store::open(&empty).unwrap();
}
