//! `export`: which threshold each verdict used, CSV and JSON lines that read
//! back to the same rows.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use flawscope_core::prompt_layer::DefectCheck;
use flawscope_results::export::{ExportRow, rows, write_csv, write_jsonl};
use flawscope_results::rows::{Decision, NewScore, Verdict};
use flawscope_results::store::Store;

fn store_with_rows(db: &Path) -> Store {
    let store = Store::open(db).unwrap();
    let model = store.model("cells.flawscope", "sha256:m").unwrap();
    for (name, score) in [
        ("low.png", 0.3),
        ("odd, \"name\".png", 0.45),
        ("high.png", 0.7),
    ] {
        let path = Path::new("/img").join(name);
        store
            .record_score(
                &model,
                &NewScore {
                    inspection: None,
                    path: &path,
                    content_hash: &format!("sha256:{name}"),
                    score,
                    raw_score: score * 10.0,
                    threshold: 0.5,
                    defects: &[],
                },
            )
            .unwrap();
    }
    store
        .set_decision(
            &Path::new("/img").join("high.png"),
            "sha256:high.png",
            Decision::Ng,
        )
        .unwrap();
    store
}

fn by_name<'a>(rows: &'a [ExportRow], name: &str) -> &'a ExportRow {
    rows.iter().find(|r| r.path.ends_with(name)).unwrap()
}

#[test]
fn each_verdict_states_its_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_rows(&tmp.path().join("r.sqlite"));

    // No person threshold yet: only the model's verdict.
    let exported = rows(&store).unwrap();
    assert_eq!(exported.len(), 3);
    for row in &exported {
        assert_eq!(row.threshold, 0.5);
        assert_eq!(row.verdict, Verdict::at(row.score, 0.5));
        assert_eq!((row.person_threshold, row.person_verdict), (None, None));
    }

    // A person moved the threshold to 0.4 in the TUI: the model's verdict
    // stays, the person's follows the new threshold.
    store.set_person_threshold(0.4).unwrap();
    let exported = rows(&store).unwrap();
    let odd = by_name(&exported, "odd, \"name\".png");
    assert_eq!((odd.verdict, odd.threshold), (Verdict::Ok, 0.5));
    assert_eq!(odd.person_threshold, Some(0.4));
    assert_eq!(odd.person_verdict, Some(Verdict::Anomalous));
    let low = by_name(&exported, "low.png");
    assert_eq!(low.person_verdict, Some(Verdict::Ok));
    let high = by_name(&exported, "high.png");
    assert_eq!(
        (high.verdict, high.person_verdict, high.decision),
        (Verdict::Anomalous, Some(Verdict::Anomalous), Decision::Ng)
    );
    assert!(store.set_person_threshold(1.5).is_err());
}

#[test]
fn csv_has_a_header_and_reads_back_to_the_same_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_rows(&tmp.path().join("r.sqlite"));
    for person in [None, Some(0.4)] {
        if let Some(threshold) = person {
            store.set_person_threshold(threshold).unwrap();
        }
        let exported = rows(&store).unwrap();
        let mut text = Vec::new();
        write_csv(&exported, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.starts_with(
                "path,content_hash,model,model_identity,score,raw_score,threshold,verdict,\
                 person_threshold,person_verdict,decision,decided_at,scored_at,flagged_by,\
                 defects,inspection\n"
            ),
            "{text}"
        );
        assert_eq!(text.lines().count(), 4, "{text}");
        // The person's columns are empty while no threshold was set.
        let low = text.lines().find(|l| l.contains("low.png")).unwrap();
        let expected = match person {
            None => ",0.5,ok,,,none,,",
            Some(_) => ",0.5,ok,0.4,ok,none,,",
        };
        assert!(low.contains(expected), "{low}");
        let back: Vec<ExportRow> = csv::Reader::from_reader(text.as_bytes())
            .deserialize()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, exported);
    }
}

#[test]
fn jsonl_reads_back_to_the_same_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with_rows(&tmp.path().join("r.sqlite"));
    let exported = rows(&store).unwrap();
    let mut text = Vec::new();
    write_jsonl(&exported, &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    let values: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(values.len(), 3);
    assert!(values.iter().all(|v| v["person_threshold"].is_null()));
    let back: Vec<ExportRow> = values
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert_eq!(back, exported);
}

#[test]
fn an_empty_store_exports_the_csv_header_only() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("r.sqlite")).unwrap();
    let mut text = Vec::new();
    write_csv(&rows(&store).unwrap(), &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.starts_with("path,content_hash,"), "{text}");
    assert!(
        text.trim_end()
            .ends_with(",scored_at,flagged_by,defects,inspection"),
        "{text}"
    );
    let mut text = Vec::new();
    write_jsonl(&[], &mut text).unwrap();
    assert!(text.is_empty());
}

/// A row whose typed defect was over its own threshold is anomalous at any
/// model threshold, and says what flagged it; the defects read back.
#[test]
fn typed_defects_make_the_verdict_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("r.sqlite")).unwrap();
    let model = store
        .model("cells.flawscope + \"crack\"", "sha256:m+prompts:1")
        .unwrap();
    let defects = [
        DefectCheck {
            description: "crack".into(),
            score: 0.8,
            is_anomalous: true,
            estimated_false_alarm_rate: 0.05,
            ..Default::default()
        },
        DefectCheck {
            description: "dark, \"spot\"".into(),
            score: 0.2,
            is_anomalous: false,
            estimated_false_alarm_rate: 0.1,
            ..Default::default()
        },
    ];
    let path = Path::new("/img/a.png");
    // The same image and model score each time; only the typed defects vary.
    let record = |defects: &[DefectCheck]| {
        store
            .record_score(
                &model,
                &NewScore {
                    inspection: None,
                    path,
                    content_hash: "sha256:a",
                    score: 0.3,
                    raw_score: 3.0,
                    threshold: 0.5,
                    defects,
                },
            )
            .unwrap()
    };
    let row = record(&defects);
    assert_eq!(row.verdict, Verdict::Anomalous);
    assert_eq!(row.flagged_by(0.5), vec!["crack".to_owned()]);
    assert_eq!(
        row.flagged_by(0.2),
        vec!["model".to_owned(), "crack".into()]
    );
    let stored = store.lookup(&model, path).unwrap().unwrap();
    assert_eq!(stored, row);
    assert_eq!(stored.defects, defects);

    store.set_person_threshold(0.9).unwrap();
    let exported = rows(&store).unwrap();
    assert_eq!(exported[0].verdict, Verdict::Anomalous);
    assert_eq!(exported[0].person_verdict, Some(Verdict::Anomalous));
    assert_eq!(exported[0].flagged_by, "crack");
    let back: Vec<DefectCheck> = serde_json::from_str(&exported[0].defects).unwrap();
    assert_eq!(back, defects);
    let mut text = Vec::new();
    write_csv(&exported, &mut text).unwrap();
    let back: Vec<ExportRow> = csv::Reader::from_reader(text.as_slice())
        .deserialize()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(back, exported);

    // Rescored without the defect flagged: the row follows.
    let row = record(&defects[1..]);
    assert_eq!(row.verdict, Verdict::Ok);
    assert_eq!(
        store.lookup(&model, path).unwrap().unwrap().defects,
        &defects[1..]
    );
}
