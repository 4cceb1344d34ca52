//! `flawscope tui` driven through tmux on real images, and `score --db`
//! killed mid-run then resumed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cli::flawscope;

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/solar_cell")
}

fn fit_model(dir: &Path) -> PathBuf {
    fit_model_with(dir, &[])
}

fn fit_model_with(dir: &Path, extra: &[&str]) -> PathBuf {
    let model = dir.join("cells.flawscope");
    let train = demo().join("train/good");
    let out = crate::cli::fit(&train, &model, extra);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

/// The 16 real test images, `copies` times each under distinct names.
fn copy_test_images(dir: &Path, copies: usize) -> usize {
    std::fs::create_dir_all(dir).unwrap();
    let mut n = 0;
    for kind in ["good", "defect"] {
        for entry in std::fs::read_dir(demo().join("test").join(kind)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            for copy in 0..copies {
                let target = if copies == 1 {
                    format!("{kind}_{name}")
                } else {
                    format!("{kind}_{copy}_{name}")
                };
                std::fs::copy(&path, dir.join(target)).unwrap();
                n += 1;
            }
        }
    }
    n
}

pub(crate) fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// A tmux server of our own (its own socket), killed on drop.
pub(crate) struct Tmux {
    socket: String,
}

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

impl Tmux {
    /// Starts `command` in a 160×48 session; fails clearly without tmux.
    pub(crate) fn start(command: &str) -> Self {
        Self::start_sized(command, 160, 48)
    }

    /// Starts `command` in a `width`×`height` session.
    fn start_sized(command: &str, width: u16, height: u16) -> Self {
        let available = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            available,
            "tmux is needed for this test (CI installs it; here: apt-get install -y tmux)"
        );
        let socket = format!(
            "flawscope-test-{}-{}",
            std::process::id(),
            SESSIONS.fetch_add(1, Ordering::SeqCst)
        );
        let tmux = Self { socket };
        // The shell line keeps the pane open after the program exits so the
        // exit code can be read.
        let line = format!("{command}; echo EXITED:$?; sleep 600");
        let status = tmux
            .cmd()
            .args([
                "new-session",
                "-d",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
                "-s",
                "t",
                &line,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn cmd(&self) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket, "-f", "/dev/null"]);
        command
    }

    pub(crate) fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "t"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub(crate) fn keys(&self, keys: &str) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", "t", keys])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Polls the screen until `predicate` holds; panics with the screen
    /// after `limit`.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        predicate: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if predicate(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// The name in the status line "`<name>` marked OK".
fn marked(screen: &str, label: &str) -> String {
    let needle = format!(" marked {label}");
    let line = screen
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no '{needle}' message:\n{screen}"));
    line.split(&needle).next().unwrap().trim().to_string()
}

pub(crate) fn export_jsonl(db: &Path) -> Vec<serde_json::Value> {
    let out = flawscope(&["export", "--db", db.to_str().unwrap(), "--format", "jsonl"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn file_name(row: &serde_json::Value) -> String {
    Path::new(row["path"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// MVTec-style names: `000.png` in two folders, triaged with `-r` on an
/// 80×24 terminal, are told apart on screen by their paths in the folder.
#[test]
fn tui_at_80x24_tells_same_names_in_different_folders_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fit_model(tmp.path());
    let images = tmp.path().join("images");
    for (folder, kind) in [("crack", "defect"), ("good", "good")] {
        let dir = images.join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        let source = std::fs::read_dir(demo().join("test").join(kind))
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .unwrap();
        std::fs::copy(source, dir.join("000.png")).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_flawscope");
    let command = format!(
        "{} tui {} -r --model {}",
        quote(Path::new(bin)),
        quote(&images),
        quote(&model)
    );
    let limit = Duration::from_secs(180);
    let tmux = Tmux::start_sized(&command, 80, 24);
    let screen = tmux.wait_for("scoring to finish", limit, |s| s.contains("done: 2 images"));
    let list_lines: Vec<&str> = screen.lines().filter(|l| l.contains("000.png")).collect();
    assert!(
        screen.contains("crack/000.png") && screen.contains("good/000.png"),
        "the two 000.png are not told apart at 80x24:\n{screen}"
    );
    assert!(list_lines.len() >= 2, "{screen}");
    // The selected image's details are not cut: its decision is on screen.
    assert!(screen.contains("decision"), "{screen}");
    tmux.keys("q");
    tmux.wait_for("a clean exit", limit, |s| s.contains("EXITED:0"));
}

#[test]
fn tui_triage_in_tmux_records_decisions_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fit_model(tmp.path());
    let images = tmp.path().join("images");
    let n = copy_test_images(&images, 1);
    assert_eq!(n, 16);
    let bin = env!("CARGO_BIN_EXE_flawscope");
    let command = format!(
        "{} tui {} --model {}",
        quote(Path::new(bin)),
        quote(&images),
        quote(&model)
    );
    let limit = Duration::from_secs(180);

    let tmux = Tmux::start(&command);
    let screen = tmux.wait_for("scoring to finish", limit, |s| {
        s.contains("done: 16 images")
    });
    assert!(screen.contains("16 scored"), "{screen}");
    tmux.keys("a");
    let screen = tmux.wait_for("the OK mark", limit, |s| s.contains(" marked OK"));
    let ok_name = marked(&screen, "OK");
    tmux.keys("x");
    let screen = tmux.wait_for("the NG mark", limit, |s| s.contains(" marked NG"));
    let ng_name = marked(&screen, "NG");
    assert_ne!(ok_name, ng_name);
    // The person's threshold, remembered in the store, goes to the export.
    tmux.keys("-");
    tmux.wait_for("the moved threshold", limit, |s| {
        s.contains("threshold 0.49")
    });
    tmux.keys("q");
    tmux.wait_for("a clean exit", limit, |s| s.contains("EXITED:0"));
    drop(tmux);

    // The default database sits in the folder; it holds both decisions and
    // nothing else.
    let db = images.join(".flawscope-results.sqlite");
    let rows = export_jsonl(&db);
    assert_eq!(rows.len(), 16);
    let decided: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r["decision"] != "none")
        .map(|r| (file_name(r), r["decision"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(decided.len(), 2, "{decided:?}");
    let number = |value: &serde_json::Value| value.as_f64().unwrap() as f32;
    for row in &rows {
        let at = |t: f32| {
            if number(&row["score"]) >= t {
                "anomalous"
            } else {
                "ok"
            }
        };
        assert_eq!(number(&row["person_threshold"]), 0.49);
        assert_eq!(row["person_verdict"], at(0.49), "{row}");
        assert_eq!(row["verdict"], at(number(&row["threshold"])), "{row}");
    }
    assert!(
        decided.contains(&(ok_name.clone(), "ok".into())),
        "{decided:?}"
    );
    assert!(
        decided.contains(&(ng_name.clone(), "ng".into())),
        "{decided:?}"
    );
    // Worst first: the first image marked is scored at least as high.
    let score = |name: &str| {
        rows.iter().find(|r| file_name(r) == name).unwrap()["score"]
            .as_f64()
            .unwrap()
    };
    assert!(score(&ok_name) >= score(&ng_name));

    // Reopening resumes: nothing is rescored and the decisions show.
    let tmux = Tmux::start(&command);
    let screen = tmux.wait_for("the resumed session", limit, |s| {
        s.contains("done: 16 images")
    });
    assert!(screen.contains("0 scored · 16 unchanged"), "{screen}");
    let line_of = |name: &str| {
        screen
            .lines()
            .find(|l| l.contains(name) && l.contains("  "))
            .unwrap_or_else(|| panic!("{name} not listed:\n{screen}"))
            .to_string()
    };
    assert!(line_of(&ok_name).contains(" OK "), "{screen}");
    assert!(line_of(&ng_name).contains(" NG "), "{screen}");
    tmux.keys("q");
    tmux.wait_for("a clean exit", limit, |s| s.contains("EXITED:0"));
}

#[test]
fn score_db_killed_mid_run_resumes_without_rescoring() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fit_model(tmp.path());
    let images = tmp.path().join("images");
    let n = copy_test_images(&images, 4);
    let db = tmp.path().join("results.sqlite");
    let args = [
        "score",
        images.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ];

    let mut child = crate::cli::flawscope_command()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut killed = false;
    while start.elapsed() < Duration::from_secs(180) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        // Open only once the writer has made the file a WAL database.
        if !tmp.path().join("results.sqlite-wal").exists() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let rows = flawscope_results::store::Store::open(&db)
            .and_then(|s| s.all_results())
            .map(|r| r.len())
            .unwrap_or(0);
        if rows >= 5 {
            child.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait().unwrap();
    assert!(killed, "the first run ended before it could be killed");
    let committed = export_jsonl(&db).len();
    assert!(
        (5..n).contains(&committed),
        "{committed} rows after the kill"
    );

    let out = flawscope(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let expected = format!("{} scored, {committed} unchanged", n - committed);
    assert!(stderr.contains(&expected), "{expected:?} not in {stderr}");
    let rows = export_jsonl(&db);
    assert_eq!(rows.len(), n);
    let mut paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), n);

    // The CSV export goes to a file atomically.
    let csv = tmp.path().join("out/results.csv");
    std::fs::create_dir_all(csv.parent().unwrap()).unwrap();
    let out = flawscope(&[
        "export",
        "--db",
        db.to_str().unwrap(),
        "--format",
        "csv",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("path,content_hash,model,"));
    assert_eq!(text.lines().count(), n + 1);
    let leftovers = std::fs::read_dir(csv.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "no temporary file is left behind");
}

#[test]
fn tui_refuses_a_corrupt_database_before_touching_the_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    copy_test_images(&images, 1);
    let db = tmp.path().join("broken.sqlite");
    std::fs::write(&db, b"not a database, just text".repeat(50)).unwrap();
    // The model is never loaded: the database is checked first.
    let model = tmp.path().join("missing.flawscope");
    let out = flawscope(&[
        "tui",
        images.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not a flawscope results database"),
        "{stderr}"
    );
    let out = flawscope(&["export", "--db", db.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn another_applications_database_is_refused_and_left_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    copy_test_images(&images, 1);
    // Another program's database that happens to have a `results` table.
    let db = tmp.path().join("other.sqlite");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE results (sample TEXT); INSERT INTO results VALUES ('a');")
            .unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let model = tmp.path().join("missing.flawscope");
    for args in [
        vec![
            "tui",
            images.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ],
        vec!["export", "--db", db.to_str().unwrap()],
    ] {
        let out = flawscope(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("is not a flawscope results database (application_id"),
            "{stderr}"
        );
        assert!(!stderr.contains("CREATE TABLE"), "{stderr}");
        assert_eq!(std::fs::read(&db).unwrap(), before, "{args:?} changed it");
        let names = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(names, 2, "no -wal / -shm / -journal left beside it");
    }
}

/// `tui --prompt`: the model's text layer checks the typed defect on every
/// image, the list says which layer flagged each one, and the store keeps
/// the checks under the model-with-prompt entry.
#[test]
fn tui_with_a_typed_defect_shows_which_layer_flagged() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/tiny_clip");
    let model = fit_model_with(
        tmp.path(),
        &[
            "--object",
            "solar cell",
            "--clip-weights",
            clip.to_str().unwrap(),
        ],
    );
    let images = tmp.path().join("images");
    assert_eq!(copy_test_images(&images, 1), 16);
    let bin = env!("CARGO_BIN_EXE_flawscope");
    let command = format!(
        "FLAWSCOPE_CACHE_DIR={} {} tui {} --model {} --clip-weights {} --prompt 'a crack'",
        quote(Path::new(crate::cli::TEST_CACHE_DIR)),
        quote(Path::new(bin)),
        quote(&images),
        quote(&model),
        quote(&clip)
    );
    let limit = Duration::from_secs(180);
    let tmux = Tmux::start(&command);
    let screen = tmux.wait_for("scoring to finish", limit, |s| {
        s.contains("done: 16 images")
    });
    assert!(screen.contains("+ \"a crack\""), "{screen}");
    tmux.keys("q");
    tmux.wait_for("a clean exit", limit, |s| s.contains("EXITED:0"));
    drop(tmux);

    let rows = export_jsonl(&images.join(".flawscope-results.sqlite"));
    assert_eq!(rows.len(), 16);
    for row in &rows {
        let defects: Vec<serde_json::Value> =
            serde_json::from_str(row["defects"].as_str().unwrap()).unwrap();
        assert_eq!(defects.len(), 1, "{row}");
        assert_eq!(defects[0]["description"], "a crack");
        let flagged_by = row["flagged_by"].as_str().unwrap();
        let model_flags = row["score"].as_f64().unwrap() >= row["threshold"].as_f64().unwrap();
        let text_flags = defects[0]["is_anomalous"] == true;
        let expected = match (model_flags, text_flags) {
            (true, true) => "model; a crack",
            (true, false) => "model",
            (false, true) => "a crack",
            (false, false) => "",
        };
        assert_eq!(flagged_by, expected, "{row}");
        assert_eq!(
            row["verdict"],
            if model_flags || text_flags {
                "anomalous"
            } else {
                "ok"
            },
            "{row}"
        );
        // The list line of this image names the same layers.
        let name = file_name(row);
        let line = screen
            .lines()
            .find(|l| l.contains(&format!("--  {name}")))
            .unwrap_or_else(|| panic!("{name} not listed:\n{screen}"));
        if expected.is_empty() {
            assert!(line.contains(" ok "), "{line}");
        } else {
            assert!(line.contains(&expected.replace("; ", "+")), "{line}");
        }
    }
}
