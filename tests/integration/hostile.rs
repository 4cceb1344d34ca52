//! Inputs that used to mislead or lose work: shared heatmap names, private
//! output files, a bad limit found only after the work, a closed pipe.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::flawscope;
use crate::pipeline::demo_dir;

/// A small PatchCore model fitted on 8 demo cells (one scale, fast).
fn small_model(dir: &Path) -> PathBuf {
    let train = dir.join("train");
    std::fs::create_dir_all(&train).unwrap();
    let mut cells: Vec<PathBuf> = std::fs::read_dir(demo_dir().join("train/good"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cells.sort();
    for cell in &cells[..8] {
        std::fs::copy(cell, train.join(cell.file_name().unwrap())).unwrap();
    }
    let model = dir.join("small.flawscope");
    let out = flawscope(&[
        "fit",
        "--train",
        train.to_str().unwrap(),
        "--coarse-size",
        "0",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

/// `test/good/000.png` and `test/crack/000.png`, as in an MVTec test folder.
fn same_stems(dir: &Path) -> PathBuf {
    let test = dir.join("test");
    for (sub, cell) in [
        ("good", "test/good/cell0060.png"),
        ("crack", "test/defect/cell0001.png"),
    ] {
        std::fs::create_dir_all(test.join(sub)).unwrap();
        std::fs::copy(demo_dir().join(cell), test.join(sub).join("000.png")).unwrap();
    }
    test
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn heatmaps_keep_relative_paths_and_files_get_the_umask_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let model = small_model(tmp.path());
    let test = same_stems(tmp.path());
    let maps = tmp.path().join("maps");

    // Without --recursive the folder has no images of its own: a usage
    // slip (exit 2) that says --recursive.
    let flat = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        test.to_str().unwrap(),
    ]);
    assert_eq!(flat.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&flat.stderr).contains("--recursive"));

    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--recursive",
        "--heatmaps",
        maps.to_str().unwrap(),
        "--json",
        test.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let good = maps.join("good/000_heatmap.png");
    let crack = maps.join("crack/000_heatmap.png");
    assert!(good.is_file() && crack.is_file());
    assert_ne!(
        std::fs::read(&good).unwrap(),
        std::fs::read(&crack).unwrap()
    );

    // Files named directly keep the path they were given.
    let direct = tmp.path().join("direct");
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--heatmaps",
        direct.to_str().unwrap(),
        test.join("good/000.png").to_str().unwrap(),
        test.join("crack/000.png").to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_dir(&direct).unwrap().count();
    assert_eq!(written, 1, "one top folder mirroring the given paths");
    let mut count = 0;
    for entry in walk(&direct) {
        assert!(entry.ends_with("000_heatmap.png"), "{}", entry.display());
        count += 1;
    }
    assert_eq!(count, 2, "two inputs, two maps");

    #[cfg(unix)]
    {
        let plain = tmp.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        assert_eq!(mode(&model), mode(&plain), "model file mode");
        assert_eq!(mode(&good), mode(&plain), "heatmap mode");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_bad_false_alarm_limit_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = flawscope(&[
        "fit",
        "--train",
        demo_dir().join("train/good").to_str().unwrap(),
        "--max-far",
        "1.5",
        "--out",
        tmp.path().join("m.flawscope").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-far"), "{stderr}");
    assert!(!stderr.contains("fitted"), "{stderr}");
}

#[test]
fn a_closed_pipe_ends_score_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = small_model(tmp.path());
    let db = tmp.path().join("results.sqlite");
    for extra in [&[][..], &["--db", db.to_str().unwrap()][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flawscope"))
            .args(["score", "--model", model.to_str().unwrap()])
            .args(extra)
            .arg(demo_dir().join("train/good"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        // The reader goes away, as `| head -1` does.
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.to_lowercase().contains("broken pipe"),
            "{extra:?}: {stderr}"
        );
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {stderr}");
        assert!(!first.is_empty());
    }
}

#[test]
fn repeated_causes_are_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("short.flawscope");
    std::fs::write(&bad, [1u8, 0, 0]).unwrap();
    let out = flawscope(&["score", "--model", bad.to_str().unwrap(), "x.png"]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    for part in first.split(": ") {
        if part.len() > 12 {
            assert_eq!(first.matches(part).count(), 1, "{first}");
        }
    }
}
