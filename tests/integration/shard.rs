//! Batch at cluster scale: `score --shard I/N` on N workers plus `results
//! merge` give exactly the rows of one unsharded run.

use std::path::{Path, PathBuf};

use flawscope_results::store::{Decision, Store};

use crate::cli::flawscope;
use crate::pipeline::demo_dir;

fn run_ok(args: &[&str]) -> String {
    let out = flawscope(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A model fitted on 12 of the demo's good cells (enough for a threshold,
/// quick to fit).
pub(crate) fn fit_small(dir: &Path) -> PathBuf {
    let train = dir.join("train");
    std::fs::create_dir(&train).unwrap();
    let mut good: Vec<PathBuf> = std::fs::read_dir(demo_dir().join("train/good"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    good.sort();
    for path in good.iter().take(12) {
        std::fs::copy(path, train.join(path.file_name().unwrap())).unwrap();
    }
    let model = dir.join("cells.flawscope");
    run_ok(&[
        "fit",
        "--train",
        train.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    model
}

/// Every row without its time stamp, in order.
fn rows(db: &Path) -> Vec<String> {
    Store::open_existing(db)
        .unwrap()
        .all_results()
        .unwrap()
        .into_iter()
        .map(|r| {
            format!(
                "{} {} {} {} {} {} {:?} {:?}",
                r.path.display(),
                r.content_hash,
                r.model_identity,
                r.score,
                r.raw_score,
                r.threshold,
                r.verdict,
                r.decision
            )
        })
        .collect()
}

#[test]
fn two_shards_and_a_merge_give_the_rows_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fit_small(tmp.path());
    let model = model.to_str().unwrap();
    let test = demo_dir().join("test");
    let test = test.to_str().unwrap();
    let db = |name: &str| tmp.path().join(name);

    let whole = db("whole.sqlite");
    run_ok(&[
        "score",
        "--model",
        model,
        "-r",
        test,
        "--db",
        whole.to_str().unwrap(),
    ]);
    let expected = rows(&whole);
    let images = ["good", "defect"]
        .iter()
        .map(|d| {
            std::fs::read_dir(demo_dir().join("test").join(d))
                .unwrap()
                .count()
        })
        .sum::<usize>();
    assert_eq!(expected.len(), images, "{expected:#?}");

    let mut parts = Vec::new();
    for index in 0..2 {
        let part = db(&format!("part{index}.sqlite"));
        let shard = format!("{index}/2");
        let stderr = run_ok(&[
            "score",
            "--model",
            model,
            "-r",
            test,
            "--shard",
            &shard,
            "--db",
            part.to_str().unwrap(),
        ]);
        assert!(stderr.contains(&format!("shard {shard}: ")), "{stderr}");
        parts.push(part);
    }
    let (first, second) = (rows(&parts[0]), rows(&parts[1]));
    assert!(
        !first.is_empty() && !second.is_empty(),
        "{first:?} {second:?}"
    );
    assert_eq!(first.len() + second.len(), expected.len());
    assert!(first.iter().all(|r| !second.contains(r)));

    // A decision made on one worker's store survives the merge.
    let decided = Store::open_existing(&parts[1])
        .unwrap()
        .all_results()
        .unwrap()[0]
        .clone();
    Store::open_existing(&parts[1])
        .unwrap()
        .set_decision(&decided.path, &decided.content_hash, Decision::Ng)
        .unwrap();

    let merged = db("merged.sqlite");
    let mut args = vec!["results", "merge"];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", merged.to_str().unwrap()]);
    let stderr = run_ok(&args);
    assert!(stderr.contains(&format!("{images} rows in")), "{stderr}");
    let got = rows(&merged);
    let mut want = expected.clone();
    let key = format!("{} ", decided.path.display());
    for row in &mut want {
        if row.starts_with(&key) {
            *row = row.replace("None", "Ng");
        }
    }
    assert_eq!(got, want);

    // The same store twice: every image kept once.
    let twice = db("twice.sqlite");
    let p0 = parts[0].to_str().unwrap();
    run_ok(&["results", "merge", p0, p0, "--out", twice.to_str().unwrap()]);
    assert_eq!(rows(&twice), first);

    // An existing output and a foreign database are refused; nothing is written.
    let out = flawscope(&["results", "merge", p0, "--out", merged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let foreign = db("foreign.sqlite");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let never = db("never.sqlite");
    let out = flawscope(&[
        "results",
        "merge",
        p0,
        foreign.to_str().unwrap(),
        "--out",
        never.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a flawscope results database"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!never.exists());
}

#[test]
fn bad_shards_are_usage_errors() {
    for bad in ["2/2", "0/0", "x", "1", "-1/2", "1/2/3"] {
        let shard = format!("--shard={bad}");
        let out = flawscope(&["score", "--model", "m.flawscope", &shard, "img.png"]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("shard"), "{bad}: {stderr}");
    }
}
