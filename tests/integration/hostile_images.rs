//! Hostile files in a folder being scored: each is refused on its own and
//! the rest are still scored (exit 3).

use std::io::Cursor;

use crate::cli::flawscope;
use crate::pipeline::demo_dir;

fn copy_first(split: &str, n: usize, to: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(demo_dir().join(split))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .take(n)
        .map(|f| {
            let out = to.join(f.file_name().unwrap());
            std::fs::copy(&f, &out).unwrap();
            out
        })
        .collect()
}

#[test]
fn score_refuses_a_line_image_and_a_cut_jpeg_and_scores_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train");
    copy_first("train/good", 8, &train);
    let model = tmp.path().join("tiny.flawscope");
    let fit = flawscope(&[
        "fit",
        "--train",
        train.to_str().unwrap(),
        "--size",
        "128",
        "--coarse-size",
        "0",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(
        fit.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fit.stderr)
    );

    let batch = tmp.path().join("batch");
    let good = copy_first("test/good", 2, &batch);
    // 40 000 000 × 1 grey, 40 MP (within the pixel budget), a few hundred
    // KB: named to sort first, it used to abort the whole run (exit 134).
    let line = image::GrayImage::from_pixel(40_000_000, 1, image::Luma([128]));
    line.save(batch.join("a_line.png")).unwrap();
    // The first 60 % of a JPEG used to be scored as a confident defect.
    let mut jpeg = Cursor::new(Vec::new());
    image::open(&good[0])
        .unwrap()
        .write_to(&mut jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    let jpeg = jpeg.into_inner();
    std::fs::write(batch.join("b_cut.jpg"), &jpeg[..jpeg.len() * 6 / 10]).unwrap();

    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        batch.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("a_line.png") && stderr.contains("side ratio"),
        "{stderr}"
    );
    assert!(
        stderr.contains("b_cut.jpg") && stderr.contains("truncated"),
        "{stderr}"
    );
    let scored: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(scored.len(), 2, "{scored:?}");
    for (line, path) in scored.iter().zip(&good) {
        assert_eq!(line["path"].as_str().unwrap(), path.to_str().unwrap());
        assert!((0.0..=1.0).contains(&line["score"].as_f64().unwrap()));
    }
}
