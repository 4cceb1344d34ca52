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

/// Whether any `": "`-separated part of a line (longer than a word) is
/// said twice in it.
fn doubled_parts(line: &str) -> Vec<String> {
    line.split(": ")
        .filter(|part| part.len() > 12 && line.matches(*part).count() > 1)
        .map(str::to_owned)
        .collect()
}

/// A PNG whose pixel data holds half its rows (IEND present).
fn short_idat_png() -> PathBuf {
    crate::cli::root().join("fuzz/regressions/decode/any_short_idat.png")
}

#[test]
fn score_with_a_store_writes_heatmaps_for_relative_paths_and_says_each_error_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = small_model(tmp.path());
    let cells = tmp.path().join("cells");
    std::fs::create_dir_all(&cells).unwrap();
    std::fs::copy(
        demo_dir().join("test/good/cell0060.png"),
        cells.join("a.png"),
    )
    .unwrap();
    std::fs::copy(short_idat_png(), cells.join("b.png")).unwrap();
    // Relative paths, as typed at a prompt: the store keeps them absolute.
    let out = crate::cli::flawscope_command()
        .current_dir(tmp.path())
        .args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--db",
            "results.sqlite",
            "--heatmaps",
            "maps",
            "cells",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        tmp.path().join("maps/a_heatmap.png").is_file(),
        "no heatmap written: {:?}\n{stderr}",
        walk(tmp.path())
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("b.png"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(doubled_parts(line).is_empty(), "{line}");
    // Without the store, the same: one message per cause.
    let out = flawscope(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        cells.join("b.png").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(line.contains("b.png"), "{stderr}");
    assert!(doubled_parts(line).is_empty(), "{line}");
}

#[test]
fn fit_skips_unreadable_training_images_and_says_how_many() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train");
    std::fs::create_dir_all(&train).unwrap();
    let mut cells: Vec<PathBuf> = std::fs::read_dir(demo_dir().join("train/good"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cells.sort();
    for cell in &cells[..8] {
        std::fs::copy(cell, train.join(cell.file_name().unwrap())).unwrap();
    }
    // Sorted first, so a fit that stops at the first bad image stops here.
    std::fs::copy(short_idat_png(), train.join("0000_bad.png")).unwrap();
    std::fs::write(train.join("0001_empty.png"), b"").unwrap();
    let model = tmp.path().join("m.flawscope");
    let out = flawscope(&[
        "fit",
        "--train",
        train.to_str().unwrap(),
        "--coarse-size",
        "0",
        "--out",
        model.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(model.is_file());
    assert!(stderr.contains("0000_bad.png"), "{stderr}");
    assert!(stderr.contains("0001_empty.png"), "{stderr}");
    assert!(
        stderr.contains("2 of 10 training images could not be read"),
        "{stderr}"
    );
    assert!(stderr.contains("on 8 images"), "{stderr}");

    // Nothing readable: a clear failure, no model.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(short_idat_png(), bad.join("a.png")).unwrap();
    let out = flawscope(&[
        "fit",
        "--train",
        bad.to_str().unwrap(),
        "--out",
        tmp.path().join("n.flawscope").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("none of the 1 training images"), "{stderr}");
    assert!(!tmp.path().join("n.flawscope").exists());
}
