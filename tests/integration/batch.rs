//! The batch route (`POST /v1/batch/score`) on a real server, against
//! `score --detector musc` on the same folder: the same scores to 1e-6, a
//! bad image answered with its error without changing the others, and the
//! route's bounds (too few, too many images, a write from another site).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cli::flawscope;
use crate::pipeline::{demo_dir, json_lines};
use crate::serve::{http_with, start_server_with};

/// Images of the agreement batch: 9 normal demo cells and 3 cracked ones.
pub(crate) const NORMAL: usize = 9;
pub(crate) const CRACKED: usize = 3;

fn sorted_pngs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}

/// A folder of [`NORMAL`] normal and [`CRACKED`] cracked demo cells, named
/// `good-*` and `crack-*` (one flat folder, as the page sends it).
pub(crate) fn batch_folder(root: &Path) -> PathBuf {
    let dir = root.join("batch");
    std::fs::create_dir_all(&dir).unwrap();
    let picks = sorted_pngs(&demo_dir().join("train/good"))
        .into_iter()
        .take(NORMAL)
        .map(|p| ("good", p))
        .chain(
            sorted_pngs(&demo_dir().join("test/defect"))
                .into_iter()
                .take(CRACKED)
                .map(|p| ("crack", p)),
        );
    for (kind, path) in picks {
        let name = format!("{kind}-{}", path.file_name().unwrap().to_string_lossy());
        std::fs::copy(&path, dir.join(name)).unwrap();
    }
    dir
}

/// `(score, raw_score, is_anomalous)` of every image of `dir` by file name,
/// from `flawscope score --detector musc DIR --json`.
pub(crate) fn cli_scores(dir: &Path) -> BTreeMap<String, (f64, f64, bool)> {
    let out = flawscope(&[
        "score",
        "--detector",
        "musc",
        dir.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stderr}");
    json_lines(&out.stdout)
        .iter()
        .map(|l| {
            let name = Path::new(l["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (
                name,
                (
                    l["score"].as_f64().unwrap(),
                    l["raw_score"].as_f64().unwrap(),
                    l["is_anomalous"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

/// A multipart form with one `image` file per `(name, bytes)`.
pub(crate) fn batch_form(images: &[(String, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "flawscope-batch-test-boundary";
    let mut body = Vec::new();
    for (name, bytes) in images {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; \
                 filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    sorted_pngs(dir)
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(p).unwrap(),
            )
        })
        .collect()
}

/// Asserts that a batch answer's scores are the CLI's to 1e-6.
pub(crate) fn assert_agrees(
    cli: &BTreeMap<String, (f64, f64, bool)>,
    name: &str,
    got: (f64, f64, bool),
) {
    let want = cli
        .get(name)
        .unwrap_or_else(|| panic!("{name} not scored by the CLI: {cli:?}"));
    assert!(
        (want.0 - got.0).abs() <= 1e-6 && (want.1 - got.1).abs() <= 1e-6 && want.2 == got.2,
        "{name}: CLI {want:?}, other face {got:?}"
    );
}

#[test]
fn the_batch_route_scores_as_score_detector_musc_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = batch_folder(tmp.path());
    let cli = cli_scores(&dir);
    assert_eq!(cli.len(), NORMAL + CRACKED);
    let models = crate::web::model_dir();
    let server = start_server_with(&models, &tmp.path().join("server.log"), &[]);

    // The folder's images, with a file that is not an image among them.
    let mut images = files_of(&dir);
    images.insert(4, ("broken.png".into(), b"not a png at all".to_vec()));
    let (content_type, body) = batch_form(&images);
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/batch/score?heatmap=png",
        &content_type,
        "",
        &body,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let answer = reply.json();
    assert_eq!(answer["detector"], "musc");
    assert_eq!(answer["images"], images.len());
    assert_eq!(answer["scored"], NORMAL + CRACKED);
    assert_eq!(answer["failed"], 1);
    assert!(
        answer["warning"]
            .as_str()
            .unwrap()
            .starts_with("uncalibrated: mutual scoring of a batch of 12 images"),
        "{answer}"
    );
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), images.len());
    let broken = &results[4];
    assert_eq!(broken["name"], "broken.png");
    assert_eq!(broken["error"]["code"], "unsupported_image", "{broken}");
    assert!(broken.get("score").is_none() && broken.get("rank").is_none());
    for (sent, result) in images
        .iter()
        .zip(results)
        .filter(|(s, _)| s.0 != "broken.png")
    {
        assert_eq!(result["name"].as_str().unwrap(), sent.0);
        assert_agrees(
            &cli,
            &sent.0,
            (
                result["score"].as_f64().unwrap(),
                result["raw_score"].as_f64().unwrap(),
                result["is_anomalous"].as_bool().unwrap(),
            ),
        );
        assert_eq!(result["model"], "musc");
        assert_eq!(result["operating_point"]["normal_images"], 0);
        assert!(result["answer"].as_str().unwrap().contains("Uncalibrated"));
        assert!(!result["heatmap_png"].as_str().unwrap().is_empty());
    }
    // The ranking: every scored image once, highest score first, and each
    // result's rank its place in it.
    let ranking: Vec<usize> = answer["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(ranking.len(), NORMAL + CRACKED);
    let scores: Vec<f64> = ranking
        .iter()
        .map(|i| results[*i]["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    for (place, index) in ranking.iter().enumerate() {
        assert_eq!(results[*index]["rank"], place + 1);
    }
    // The cracked cells rank first.
    let top: Vec<&str> = ranking[..CRACKED]
        .iter()
        .map(|i| results[*i]["name"].as_str().unwrap())
        .collect();
    assert!(top.iter().all(|n| n.starts_with("crack-")), "{top:?}");

    // Pixels together over the budget of one image (8 × 2 300², 42 MP):
    // 413, read from the headers.
    let mut big = Vec::new();
    image::GrayImage::new(2300, 2300)
        .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .unwrap();
    let bigs: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("big{i}.png"), big.clone()))
        .collect();
    let (content_type, body) = batch_form(&bigs);
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/batch/score",
        &content_type,
        "",
        &body,
    );
    assert_eq!(
        reply.status,
        413,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("42320000 pixels together"),
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    // Too few images: the minimum, said.
    let (content_type, body) = batch_form(&images[..7]);
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/batch/score",
        &content_type,
        "",
        &body,
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "batch_too_small");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least 8 readable images")
    );
    // Eight sent, one unreadable: too few readable, and which one said.
    let mut eight: Vec<(String, Vec<u8>)> = images[..9].to_vec();
    eight.remove(0);
    let (content_type, body) = batch_form(&eight);
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/batch/score",
        &content_type,
        "",
        &body,
    );
    assert_eq!(reply.status, 400);
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("got 7 (of 8)") && message.contains("broken.png"),
        "{message}"
    );
    // Too many: refused by count.
    let many: Vec<(String, Vec<u8>)> = (0..=200)
        .map(|i| (format!("{i}.png"), vec![0u8; 8]))
        .collect();
    let (content_type, body) = batch_form(&many);
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/batch/score",
        &content_type,
        "",
        &body,
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "too_many_images");
    // Not a form.
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/batch/score",
        "image/png",
        "",
        &images[0].1,
    );
    assert_eq!(reply.json()["error"]["code"], "expected_multipart");
    // A write from another site.
    let (content_type, body) = batch_form(&images);
    let reply = http_with(
        server.addr,
        "POST",
        "/v1/batch/score",
        &content_type,
        "Sec-Fetch-Site: cross-site\r\n",
        &body,
    );
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["error"]["code"], "cross_site");
}

/// The page's batch mode in headless Chromium: the folder's images and a
/// file that is not an image picked at once under "no model: score this
/// batch against itself"; every score equals `score --detector musc` on the
/// folder to 1e-6, the list is ranked worst first with heatmaps drawn, the
/// bad file is shown as an error, and the answer says it is uncalibrated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_batch_mode_scores_as_score_detector_musc_does() {
    use crate::web::{browser, list, screenshot, session, start_driver, text, upload, wait_for};
    let Some(browser) = browser("the_page_batch_mode_scores_as_score_detector_musc_does") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = batch_folder(tmp.path());
    let cli = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || cli_scores(&dir))
            .await
            .unwrap()
    };
    let models = tokio::task::spawn_blocking(crate::web::model_dir)
        .await
        .unwrap();
    let server = start_server_with(&models, &tmp.path().join("server.log"), &[]);
    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"this is a text file, not a PNG\n").unwrap();
    let mut files = sorted_pngs(&dir);
    files.push(broken);

    let driver = start_driver(&browser, &tmp.path().join("chromedriver.log"));
    let client = session(&driver, &browser, tmp.path()).await;
    client
        .goto(&format!("http://{}/", server.addr))
        .await
        .unwrap();
    wait_for(
        &client,
        "the batch option",
        "const s = document.getElementById('source');
         const o = [...s.options].find(o => o.value === '\\u0000batch');
         if (!o) return false;
         s.value = o.value; s.dispatchEvent(new Event('change')); return o.textContent;",
    )
    .await;
    let note = text(&client, "clip-note").await;
    assert!(note.contains("uncalibrated"), "{note}");
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    upload(&client, &paths).await;
    wait_for(
        &client,
        "the batch's results",
        "const li = [...document.querySelectorAll('#list li')];
         return li.length === 13 && li.every(l => l.dataset.status === 'done' || l.dataset.status === 'error');",
    )
    .await;
    let rows = list(&client).await;
    let scored: Vec<&Value> = rows.iter().filter(|r| r["status"] == "done").collect();
    assert_eq!(scored.len(), NORMAL + CRACKED, "{rows:?}");
    for row in &scored {
        let name = row["name"].as_str().unwrap();
        let want = cli[name];
        let score = row["score"].as_f64().unwrap();
        assert!(
            (score - want.0).abs() <= 1e-6,
            "{name}: page {score}, CLI {want:?}"
        );
        assert_eq!(row["verdict"] == "anomalous", want.2, "{name}");
    }
    // Worst first, the cracked cells on top, the bad file last.
    let scores: Vec<f64> = scored
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(
        scored[..CRACKED]
            .iter()
            .all(|r| r["name"].as_str().unwrap().starts_with("crack-")),
        "{rows:?}"
    );
    assert_eq!(rows[12]["name"], "broken.png");
    assert_eq!(rows[12]["status"], "error");
    // The first row's detail: its rank, uncalibrated, a heatmap drawn.
    client
        .execute(
            "document.querySelector('#list li').click(); return true;",
            vec![],
        )
        .await
        .unwrap();
    let costs = text(&client, "false-alarm").await;
    assert!(costs.starts_with("Rank 1 of 12 in its batch"), "{costs}");
    let answer = text(&client, "answer").await;
    assert!(answer.contains("Uncalibrated"), "{answer}");
    wait_for(
        &client,
        "every scored image's heatmap",
        "return state.items.filter(i => i.batch && i.overlay).length === 12;",
    )
    .await;
    screenshot(&client, "web-batch.png").await;
    // Picked alone, too few: said, nothing sent.
    let before = requests(server.addr);
    upload(&client, &paths[..3]).await;
    wait_for(
        &client,
        "the too-small batch refused",
        "return [...document.querySelectorAll('#list li')].filter(l => l.dataset.status === 'error').length === 4;",
    )
    .await;
    assert_eq!(requests(server.addr), before);
    client.close().await.unwrap();
}

/// Requests the server counted on the batch route, from `/metrics`.
fn requests(addr: std::net::SocketAddr) -> u64 {
    let reply = http_with(addr, "GET", "/metrics", "text/plain", "", b"");
    String::from_utf8_lossy(&reply.body)
        .lines()
        .filter(|l| l.starts_with("flawscope_http_requests_total{route=\"/v1/batch/score\","))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// `flawscope tui DIR --detector musc` in tmux: the folder scored as one
/// batch with no model; the rows it files equal `score --detector musc` on
/// the folder to 1e-6, the worst image is listed first, and reopening
/// keeps a decision.
#[test]
fn the_tui_batch_mode_scores_as_score_detector_musc_does() {
    use crate::tui::{Tmux, export_jsonl, quote};
    let tmp = tempfile::tempdir().unwrap();
    let dir = batch_folder(tmp.path());
    let cli = cli_scores(&dir);
    let db = tmp.path().join("results.sqlite");
    let bin = env!("CARGO_BIN_EXE_flawscope");
    let command = format!(
        "{} tui {} --detector musc --db {}",
        quote(Path::new(bin)),
        quote(&dir),
        quote(&db)
    );
    let limit = std::time::Duration::from_secs(180);
    let tmux = Tmux::start(&command);
    let screen = tmux.wait_for("the batch to be filed", limit, |s| {
        s.contains("done: 12 images")
    });
    assert!(
        screen.contains("no model: musc batch of 12 images"),
        "{screen}"
    );
    tmux.keys("x");
    let screen = tmux.wait_for("the NG mark", limit, |s| s.contains(" marked NG"));
    let first = screen
        .lines()
        .find(|l| l.contains(" marked NG"))
        .unwrap()
        .to_owned();
    tmux.keys("q");
    tmux.wait_for("a clean exit", limit, |s| s.contains("EXITED:0"));
    drop(tmux);

    let rows = export_jsonl(&db);
    assert_eq!(rows.len(), NORMAL + CRACKED);
    for row in &rows {
        let name = Path::new(row["path"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let score = row["score"].as_f64().unwrap();
        let want = cli[&name];
        assert!(
            (score - want.0).abs() <= 1e-6,
            "{name}: TUI {score}, CLI {want:?}"
        );
    }
    // The first row (worst first) was marked: the highest score, a crack.
    let worst = rows
        .iter()
        .max_by(|a, b| {
            a["score"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["score"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(worst["decision"], "ng", "{rows:?}");
    assert!(first.contains("crack-"), "{first}");

    // Reopened: the batch is scored again, the decision kept.
    let tmux = Tmux::start(&command);
    tmux.wait_for("the batch to be filed again", limit, |s| {
        s.contains("done: 12 images")
    });
    tmux.keys("q");
    tmux.wait_for("a clean exit", limit, |s| s.contains("EXITED:0"));
    drop(tmux);
    let rows = export_jsonl(&db);
    assert_eq!(
        rows.iter().filter(|r| r["decision"] == "ng").count(),
        1,
        "{rows:?}"
    );
    // Too few images: refused before the screen opens, with the minimum.
    let few = tmp.path().join("few");
    std::fs::create_dir_all(&few).unwrap();
    for path in sorted_pngs(&dir).iter().take(3) {
        std::fs::copy(path, few.join(path.file_name().unwrap())).unwrap();
    }
    let out = flawscope(&["tui", few.to_str().unwrap(), "--detector", "musc"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("at least 8 readable images"), "{stderr}");
}
