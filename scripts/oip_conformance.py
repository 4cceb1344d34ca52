#!/usr/bin/env python3
"""Open Inference Protocol v2 conformance with the standard clients.

Starts a freshly built `flawscope serve` on loopback ports (HTTP and gRPC)
with a model fitted on the shipped demo cells, and drives it through
tritonclient.http and tritonclient.grpc with their default settings:
health, server and model metadata, model readiness (also with
model_version="1"), inference with the image as raw bytes
(np.array([png_bytes], dtype=object)), a batch of four images (shape [4])
whose four scores must equal four single requests, an unknown model, a
garbage image and inputs Triton refuses (an unknown name, two inputs). The
outputs must equal what /v1/models/{name}/score says for the same file.
Exits non-zero on any mismatch.

    python3 -m venv target/oip-venv
    target/oip-venv/bin/pip install 'tritonclient[http,grpc]' numpy
    target/oip-venv/bin/python scripts/oip_conformance.py [--bin target/release/flawscope]
"""

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "solar_cell"

failures = []


def check(client, what, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'}  {client:<5} {what}{'  ' + detail if detail else ''}")
    if not ok:
        failures.append(f"{client}: {what} {detail}")


def v1_score(http_addr, png):
    request = urllib.request.Request(
        f"http://{http_addr}/v1/models/cells/score",
        data=png,
        headers={"Content-Type": "image/png"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def start_server(binary, models, log):
    server = subprocess.Popen(
        [
            str(binary),
            "serve",
            "--models",
            str(models),
            "--addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--max-concurrent",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    http_line = server.stdout.readline().strip()
    grpc_line = server.stdout.readline().strip()
    if not http_line.startswith("listening on ") or not grpc_line.startswith("grpc listening on "):
        server.kill()
        raise SystemExit(f"unexpected server output: {http_line!r} {grpc_line!r}")
    return server, http_line.removeprefix("listening on "), grpc_line.removeprefix("grpc listening on ")


def metadata_dict(client, value):
    """The HTTP client answers dicts; the gRPC one protobuf messages."""
    if isinstance(value, dict):
        return value
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(value, preserving_proto_field_name=True)


def check_outputs(name, result, reference):
    score = result.as_numpy("score")
    anomalous = result.as_numpy("is_anomalous")
    amap = result.as_numpy("anomaly_map")
    check(name, "score is FP32 [1]", score is not None and score.dtype == np.float32 and score.shape == (1,),
          f"{None if score is None else (score.dtype, score.shape)}")
    check(name, "score equals /v1", score is not None and float(score[0]) == float(np.float32(reference["score"])),
          f"{None if score is None else float(score[0])} vs {reference['score']}")
    check(name, "is_anomalous equals /v1",
          anomalous is not None and anomalous.dtype == np.bool_ and bool(anomalous[0]) == reference["is_anomalous"],
          f"{None if anomalous is None else anomalous.tolist()} vs {reference['is_anomalous']}")
    shape = (reference["height"], reference["width"])
    check(name, "anomaly_map is FP32 [H, W]", amap is not None and amap.dtype == np.float32 and amap.shape == shape,
          f"{None if amap is None else (amap.dtype, amap.shape)} vs {shape}")
    if amap is None or amap.shape != shape:
        return
    # /v1 reports the share of the map at or above the threshold and the
    # regions' peaks; the map must give the same.
    fraction = float(np.count_nonzero(amap >= np.float32(reference["threshold"]))) / amap.size
    check(name, "anomaly_map share over threshold equals /v1 anomalous_fraction",
          abs(fraction - reference["anomalous_fraction"]) < 1e-9,
          f"{fraction} vs {reference['anomalous_fraction']}")
    peaks_ok = all(
        amap[r["y"]:r["y"] + r["h"], r["x"]:r["x"] + r["w"]].max() >= np.float32(r["peak"]) - 1e-6
        for r in reference["regions"]
    )
    peak_present = all(np.any(np.isclose(amap, r["peak"], rtol=0, atol=1e-6)) for r in reference["regions"])
    check(name, "anomaly_map holds every /v1 region peak", peaks_ok and peak_present,
          f"{len(reference['regions'])} regions")


def expect_error(name, what, call, needle):
    try:
        call()
    except InferenceServerException as error:
        text = str(error)  # must not raise
        check(name, what, needle in text, f"message: {text}")
        return
    except Exception as error:  # noqa: BLE001 - any other failure is a finding
        check(name, what, False, f"{type(error).__name__}: {error}")
        return
    check(name, what, False, "no error raised")


def drive(name, module, client, cases):
    png, reference = cases[0][1], cases[0][2]
    check(name, "server live", client.is_server_live())
    check(name, "server ready", client.is_server_ready())
    check(name, "model ready", client.is_model_ready("cells"))
    check(name, "model ready, version 1", client.is_model_ready("cells", "1"))
    check(name, "model version 2 not ready", not client.is_model_ready("cells", "2"))
    check(name, "unknown model not ready", not client.is_model_ready("nope"))

    server = metadata_dict(client, client.get_server_metadata())
    check(name, "server metadata", server.get("name") == "flawscope" and "version" in server, json.dumps(server))
    for version in ("", "1"):
        meta = metadata_dict(client, client.get_model_metadata("cells", version))
        inputs = meta.get("inputs", [])
        outputs = [o["name"] for o in meta.get("outputs", [])]
        check(name, f"model metadata (version {version!r})",
              meta.get("name") == "cells" and meta.get("versions") == ["1"]
              and len(inputs) == 1 and inputs[0]["datatype"] == "BYTES"
              and outputs == ["score", "is_anomalous", "anomaly_map"],
              json.dumps(meta))

    def image_input(data):
        tensor = module.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=object))
        return tensor

    for label, image, expected in cases:
        result = client.infer("cells", [image_input(image)])
        check_outputs(f"{name} {label}", result, expected)
    result = client.infer("cells", [image_input(png)], model_version="1", request_id="7")
    check(name, "infer with model_version 1 keeps the id", result.get_response(as_json=True)["id"] == "7"
          if name == "grpc" else result.get_response()["id"] == "7")
    check_outputs(name + " defect, version 1", result, reference)
    if name == "http":
        # Outputs asked for as JSON rather than binary.
        outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("score", "is_anomalous")]
        result = client.infer("cells", [image_input(png)], outputs=outputs)
        check(name, "JSON outputs equal /v1",
              float(result.as_numpy("score")[0]) == float(np.float32(reference["score"]))
              and bool(result.as_numpy("is_anomalous")[0]) == reference["is_anomalous"])

    # A batch: shape [4], four PNGs in one request, one score per image,
    # equal to four single requests.
    batch_files = [p.read_bytes() for label in ("defect", "good")
                   for p in sorted((DEMO / "test" / label).glob("*.png"))[:2]]
    batch = module.InferInput("image", [4], "BYTES")
    batch.set_data_from_numpy(np.array(batch_files, dtype=object))
    result = client.infer("cells", [batch])
    scores = result.as_numpy("score")
    singles = [float(client.infer("cells", [image_input(f)]).as_numpy("score")[0]) for f in batch_files]
    check(name, "batch of 4: four scores equal to four single requests",
          scores is not None and scores.shape == (4,) and [float(s) for s in scores] == singles,
          f"{None if scores is None else list(scores)} vs {singles}")
    amap = result.as_numpy("anomaly_map")
    check(name, "batch of 4: anomaly_map is [4, H, W]",
          amap is not None and amap.shape[0] == 4 and amap.ndim == 3,
          f"{None if amap is None else amap.shape}")
    nonsense = module.InferInput("nonsense_name", [1], "BYTES")
    nonsense.set_data_from_numpy(np.array([png], dtype=object))
    expect_error(name, "an unknown input name is refused",
                 lambda: client.infer("cells", [nonsense]), "unexpected inference input")
    expect_error(name, "two inputs are refused",
                 lambda: client.infer("cells", [image_input(png), image_input(png)]), "specified 2 times")

    expect_error(name, "unknown model is refused with the server's message",
                 lambda: client.infer("nope", [image_input(png)]), 'no model named "nope"')
    expect_error(name, "garbage image is refused with the server's message",
                 lambda: client.infer("cells", [image_input(b"definitely not an image")]),
                 "is not a supported image")
    expect_error(name, "unknown version is refused with the server's message",
                 lambda: client.infer("cells", [image_input(png)], model_version="2"), 'has no version "2"')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default=str(ROOT / "target" / "release" / "flawscope"))
    parser.add_argument("--models", help="folder holding cells.flawscope (default: fit one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(args.models) if args.models else Path(tmp) / "models"
        if not args.models:
            models.mkdir()
            subprocess.run(
                [args.bin, "fit", "--train", str(DEMO / "train" / "good"), "--out", str(models / "cells.flawscope")],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "w") as log:
            server, http_addr, grpc_addr = start_server(args.bin, models, log)
            try:
                cases = []
                for label in ("defect", "good"):
                    path = sorted((DEMO / "test" / label).glob("*.png"))[0]
                    png = path.read_bytes()
                    reference = v1_score(http_addr, png)
                    print(f"/v1 reference for {path.name} ({label}): score {reference['score']} "
                          f"is_anomalous {reference['is_anomalous']} "
                          f"anomalous_fraction {reference['anomalous_fraction']} regions {len(reference['regions'])}")
                    cases.append((label, png, reference))
                drive("http", httpclient, httpclient.InferenceServerClient(url=http_addr), cases)
                drive("grpc", grpcclient, grpcclient.InferenceServerClient(url=grpc_addr), cases)
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    code = server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
                    code = None
            check("serve", "exits 0 on SIGTERM", code == 0, f"exit {code}")
        if failures:
            print(open(log_path).read()[-4000:], file=sys.stderr)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
