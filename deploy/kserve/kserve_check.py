"""KServe's own Python package on ganet's manifests and server; run with the interpreter of a venv holding `kserve`.

The `kserve` SDK pins much of what ganet itself depends on (FastAPI, uvicorn, pydantic, protobuf), so it lives in
a venv of its own (`.ci/run` makes one; see docs/deploy.md) and the tests run this script there as a subprocess:

    KSERVE_PY validate deploy/kserve/*.yaml        # each InferenceService against KServe's OpenAPI models
    KSERVE_PY infer http://127.0.0.1:PORT ganet_model photo.jpg   # KServe's v2 REST client -> JSON logits

`validate` walks each document through the SDK's generated models (V1beta1InferenceService and the Kubernetes
models it nests), checking every key is a field of its model (camelCase, as the CRD spells it) and every value
has the model's type; it exits 1 naming each problem by its path.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import re
import sys

import kserve
import kubernetes.client
import yaml

_PRIMITIVE = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
              "datetime": (str, datetime.datetime), "date": (str, datetime.date)}


def _model(name: str):
    return getattr(kserve, name, None) or getattr(kserve.models, name, None) or getattr(kubernetes.client, name, None)


def check(value, type_name: str, path: str, problems: list[str]) -> None:
    # kserve's models write list[X] and dict(str, X); the kubernetes client's List[X] and Dict[str, X]
    type_name = re.sub(r"^List\[(.*)\]$", r"list[\1]", type_name)
    type_name = re.sub(r"^Dict\[([^,]+), (.*)\]$", r"dict(\1, \2)", type_name)
    if type_name.startswith("list["):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            check(item, type_name[5:-1], f"{path}[{i}]", problems)
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        inner = re.match(r"dict\([^,]+, (.*)\)$", type_name).group(1)
        for k, v in value.items():
            check(v, inner, f"{path}.{k}", problems)
        return
    if type_name in _PRIMITIVE:
        if not isinstance(value, _PRIMITIVE[type_name]) or (type_name == "int" and isinstance(value, bool)):
            problems.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    if type_name in ("ResourceQuantity", "IntOrString"):
        if not isinstance(value, (str, int, float)):
            problems.append(f"{path}: expected a quantity or int-or-string, got {value!r}")
        return
    model = _model(type_name)
    if model is None:
        problems.append(f"{path}: no model named {type_name} in kserve or kubernetes.client")
        return
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a {type_name} mapping, got {type(value).__name__}")
        return
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            problems.append(f"{path}.{key}: not a field of {type_name} (fields: {', '.join(sorted(by_json))})")
            continue
        check(item, model.openapi_types[by_json[key]], f"{path}.{key}", problems)


def validate(paths: list[str]) -> int:
    problems: list[str] = []
    count = 0
    for path in paths:
        for doc in yaml.safe_load_all(open(path)):
            if doc is None:
                continue
            count += 1
            if doc.get("apiVersion") != "serving.kserve.io/v1beta1" or doc.get("kind") != "InferenceService":
                problems.append(f"{path}: apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')} is not an "
                                "InferenceService")
                continue
            check(doc, "V1beta1InferenceService", path, problems)
            if not (doc.get("spec") or {}).get("predictor"):
                problems.append(f"{path}: spec.predictor is required")
    print(json.dumps({"documents": count, "problems": problems, "kserve": _version()}))
    return 1 if problems else 0


def _version() -> str:
    from importlib.metadata import version

    return version("kserve")


async def infer(url: str, model: str, photo: str) -> int:
    import numpy as np
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    data = open(photo, "rb").read()
    image = InferInput(name="image", shape=[1], datatype="BYTES")
    image.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        response = await client.infer(url, InferRequest(model_name=model, infer_inputs=[image]), model_name=model)
        ready = await client.is_model_ready(url, model)
    finally:
        await client.close()
    logits = response.outputs[0].as_numpy()
    print(json.dumps({"model_ready": ready, "model_name": response.model_name, "output": response.outputs[0].name,
                      "datatype": response.outputs[0].datatype, "shape": list(logits.shape),
                      "logits": logits.tolist(), "kserve": _version()}))
    return 0


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    sys.exit(validate(args) if command == "validate" else asyncio.run(infer(*args)))
