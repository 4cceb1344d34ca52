#!/usr/bin/env python3
"""Validates the manifests under deploy/ against published schemas.

- Core Kubernetes kinds (the Indexed Job) with `kubernetes-validate
  --strict` (PyPI), which bundles the Kubernetes OpenAPI schemas and refuses
  unknown fields.
- KServe kinds (ServingRuntime, InferenceService) against the models of
  KServe's Python SDK (PyPI `kserve`), which are generated from KServe's
  published OpenAPI definitions of its CRDs: every field must be one the
  schema names, with the type it gives (nested Kubernetes types, such as
  the container of a runtime, are checked against the Kubernetes client's
  models the same way), and required fields must be present.

    python3 -m venv target/deploy-venv
    target/deploy-venv/bin/pip install 'kubernetes==37.0.2' 'six==1.17.0' 'kubernetes-validate==1.37.0'
    target/deploy-venv/bin/pip install --no-deps 'kserve==0.21.0'
    target/deploy-venv/bin/python deploy/validate.py
"""

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import kubernetes.client.models as k8s_models
import yaml


def import_kserve_models():
    """Imports `kserve.models` without `kserve/__init__.py`.

    The package's top level starts KServe's model server (FastAPI, pandas,
    gRPC: half a gigabyte installed); the schema models need only `six` and
    the Kubernetes client, so kserve is installed with --no-deps.
    """
    spec = importlib.util.find_spec("kserve")
    if spec is None:
        sys.exit("kserve is not installed (pip install --no-deps 'kserve==0.21.0')")
    package = types.ModuleType("kserve")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = package
    import kserve.models

    return kserve.models


kserve_models = import_kserve_models()

DEPLOY = Path(__file__).resolve().parent

KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}

# Kubernetes' quantities and int-or-string fields, which the client models
# type loosely.
LOOSE = {"object"}


def model_class(name):
    return getattr(kserve_models, name, None) or getattr(k8s_models, name, None)


def check(value, type_name, where, errors):
    """Checks `value` against an OpenAPI-generated type name."""
    if type_name in LOOSE:
        return
    # kserve's models write list[X] and dict(str, X); the Kubernetes
    # client's (pydantic) List[X] and Dict[str, X].
    list_of = re.fullmatch(r"[lL]ist\[(.+)\]", type_name)
    if list_of:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            check(item, list_of.group(1), f"{where}[{i}]", errors)
        return
    dict_of = re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name)
    if dict_of:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a map, got {type(value).__name__}")
            return
        for key, item in value.items():
            check(item, dict_of.group(1) or dict_of.group(2), f"{where}.{key}", errors)
        return
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}
    if type_name in scalars:
        expected = scalars[type_name]
        if type_name == "int" and isinstance(value, bool) or not isinstance(value, expected):
            errors.append(f"{where}: expected {type_name}, got {value!r}")
        return
    cls = model_class(type_name)
    if cls is None:
        errors.append(f"{where}: the schema names an unknown type {type_name}")
        return
    if not isinstance(value, dict):
        errors.append(f"{where}: expected an object ({type_name}), got {value!r}")
        return
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{where}: unknown field {key!r} for {type_name}")
            continue
        check(item, cls.openapi_types[by_json[key]], f"{where}.{key}", errors)
    # Required fields: the pydantic models say so; kserve's generated
    # setters refuse None for them.
    fields = getattr(cls, "model_fields", None)
    for attr, json_key in cls.attribute_map.items():
        if json_key in value:
            continue
        if fields is not None:
            if attr in fields and fields[attr].is_required():
                errors.append(f"{where}: missing required field {json_key!r} of {type_name}")
            continue
        probe = cls.__new__(cls)
        probe.local_vars_configuration = type("Config", (), {"client_side_validation": True})()
        try:
            setattr(probe, attr, None)
        except ValueError:
            errors.append(f"{where}: missing required field {json_key!r} of {type_name}")
        except Exception:  # noqa: BLE001 - a setter that needs more state is not a required check
            pass


def self_test():
    """The checks must refuse broken manifests, or passing means nothing."""
    import copy
    import tempfile

    runtime = yaml.safe_load((DEPLOY / "kserve" / "serving-runtime.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inference-service.yaml").read_text())
    broken = []
    typo = copy.deepcopy(runtime)
    typo["spec"]["protocolVersion"] = ["v2"]
    broken.append(("ServingRuntime", typo))
    wrong_type = copy.deepcopy(runtime)
    wrong_type["spec"]["containers"][0]["ports"] = {"containerPort": 8080}
    broken.append(("ServingRuntime", wrong_type))
    no_name = copy.deepcopy(runtime)
    del no_name["spec"]["containers"][0]["name"]
    broken.append(("ServingRuntime", no_name))
    bad_scale = copy.deepcopy(service)
    bad_scale["spec"]["predictor"]["scaleTarget"] = "two"
    broken.append(("InferenceService", bad_scale))
    for kind, document in broken:
        key = (document["apiVersion"], kind)
        errors = []
        check(document, KSERVE_KINDS[key], kind, errors)
        if not errors:
            raise SystemExit(f"self-test: a broken {kind} passed the KServe check")
    job = yaml.safe_load((DEPLOY / "batch" / "score-job.yaml").read_text())
    job["spec"]["completionsMode"] = "Indexed"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(job, file)
        file.flush()
        result = subprocess.run(["kubernetes-validate", "--strict", file.name], capture_output=True)
    if result.returncode == 0:
        raise SystemExit("self-test: a broken Job passed kubernetes-validate")
    print(f"ok    self-test: {len(broken) + 1} broken manifests refused")


def main():
    self_test()
    failures = 0
    core = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            key = (document.get("apiVersion"), document.get("kind"))
            name = f"{path.relative_to(DEPLOY)} {key[1]}"
            if key in KSERVE_KINDS:
                errors = []
                check(document, KSERVE_KINDS[key], key[1], errors)
                print(f"{'ok  ' if not errors else 'FAIL'}  {name} (KServe schema)")
                for error in errors:
                    print(f"      {error}")
                failures += bool(errors)
            else:
                core.append(path)
    for path in sorted(set(core)):
        result = subprocess.run(
            ["kubernetes-validate", "--strict", str(path)], capture_output=True, text=True
        )
        output = (result.stdout + result.stderr).strip()
        print(f"{'ok  ' if result.returncode == 0 else 'FAIL'}  {path.relative_to(DEPLOY)} (Kubernetes schema)")
        for line in output.splitlines():
            print(f"      {line}")
        failures += result.returncode != 0
    print(f"{failures} manifest(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
