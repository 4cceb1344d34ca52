//! `/v1/ask` and the zero-shot answers as an operator reads them: errors in
//! chat style when chat is asked for, a request for a defect when the
//! question names none, the defect noun kept, no developer advice in the
//! answer (it is in the JSON `note`), and "uncalibrated" wherever
//! zero-shot decides.

use std::path::Path;

use crate::serve::{Reply, http_with, start_server_with};
use crate::web::{model_dir, multipart};

fn ask(addr: std::net::SocketAddr, path: &str, fields: &[(&str, &str)], image: &[u8]) -> Reply {
    let (content_type, body) = multipart(fields, image);
    http_with(addr, "POST", path, &content_type, "", &body)
}

fn text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

#[test]
fn ask_answers_like_a_colleague_and_errors_in_chat_style() {
    let models = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server_with(&models, &tmp.path().join("serve.log"), &[]);
    let addr = server.addr;
    let image = std::fs::read(crate::pipeline::demo_dir().join("test/defect/cell0001.png"))
        .or_else(|_| {
            let dir = crate::pipeline::demo_dir().join("test/defect");
            let first = std::fs::read_dir(dir).unwrap().next().unwrap().unwrap();
            std::fs::read(first.path())
        })
        .unwrap();

    // "hello" names no defect: a clear request for one, as chat text.
    let hello = ask(
        addr,
        "/v1/ask",
        &[("text", "hello"), ("style", "chat")],
        &image,
    );
    assert_eq!(hello.status, 400, "{}", text(&hello));
    assert!(
        hello
            .head
            .to_lowercase()
            .contains("content-type: text/plain"),
        "{}",
        hello.head
    );
    assert!(
        text(&hello)
            .starts_with("Sorry, I could not answer: I could not read a defect in \"hello\""),
        "{}",
        text(&hello)
    );
    assert!(
        text(&hello).contains("is this part ok?"),
        "{}",
        text(&hello)
    );
    // The same in JSON when JSON is asked for.
    let json = ask(addr, "/v1/ask", &[("text", "hello")], &image);
    assert_eq!(json.status, 400);
    assert_eq!(json.json()["error"]["code"], "no_defect_named");
    // Any error is chat text with style=chat: a file that is no image…
    let garbage = ask(
        addr,
        "/v1/ask",
        &[("text", "any cracks?"), ("style", "chat")],
        b"not an image at all",
    );
    assert_eq!(garbage.status, 400, "{}", text(&garbage));
    assert!(
        text(&garbage).starts_with("Sorry, I could not answer: "),
        "{}",
        text(&garbage)
    );
    assert!(!text(&garbage).contains("{\""), "{}", text(&garbage));
    // …and one found before the form is read (?style=chat in the query).
    let refused = http_with(addr, "POST", "/v1/ask?style=chat", "text/plain", "", b"x");
    assert_eq!(refused.status, 400, "{}", text(&refused));
    assert!(
        text(&refused).starts_with("Sorry, I could not answer: "),
        "{}",
        text(&refused)
    );

    // The defect noun is kept; why it was not checked is the note's, not
    // the answer's.
    let reply = ask(
        addr,
        "/v1/ask",
        &[("text", "is this tile cracked?")],
        &image,
    );
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let v = reply.json();
    assert_eq!(v["defects_asked"], serde_json::json!(["crack"]));
    let answer = v["answer"].as_str().unwrap();
    assert!(
        answer.contains(
            "The defects asked about (\"crack\") could not be checked here; the verdict is the \
             model's own."
        ),
        "{answer}"
    );
    for advice in ["--object", "fit it", "CLIP weights", "text layer"] {
        assert!(
            !answer.contains(advice),
            "developer advice in the answer: {answer}"
        );
    }
    assert!(v["note"].as_str().unwrap().contains("text layer"), "{v}");
    // A general question gets the general verdict, calibrated: no
    // "uncalibrated" for a fitted model.
    let general = ask(
        addr,
        "/v1/ask",
        &[("text", "is this part ok?"), ("style", "chat")],
        &image,
    );
    assert_eq!(general.status, 200, "{}", text(&general));
    assert!(text(&general).starts_with("cells: "), "{}", text(&general));
    assert!(
        !text(&general).contains("ncalibrated"),
        "{}",
        text(&general)
    );
}

/// Zero-shot (the tiny random CLIP fixture: plumbing, not accuracy)
/// decides uncalibrated, and its answer says so.
#[test]
fn zero_shot_answers_say_they_are_uncalibrated() {
    let models = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/tiny_clip");
    let server = start_server_with(
        &models,
        &tmp.path().join("serve.log"),
        &["--clip-weights", clip.to_str().unwrap()],
    );
    let dir = crate::pipeline::demo_dir().join("test/defect");
    let first = std::fs::read_dir(dir).unwrap().next().unwrap().unwrap();
    let image = std::fs::read(first.path()).unwrap();
    let reply = ask(
        server.addr,
        "/v1/zero-shot",
        &[("object", "solar cell"), ("prompt", "a crack")],
        &image,
    );
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let answer = reply.json()["answer"].as_str().unwrap().to_owned();
    assert!(
        answer.contains("Uncalibrated: no false-alarm rate has been measured for this verdict."),
        "{answer}"
    );
}
