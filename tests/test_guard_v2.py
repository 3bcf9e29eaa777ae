"""Open Inference Protocol v2 requests, well and badly formed, on the pixel probe (tests/probe_export.py): every
malformed tensor is a 400 naming what is wrong, too many images a 413 before any is parsed, and good requests
answer with the exact pixels in JSON or in the binary extension."""
from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ganet.serve.app import create_app
from ganet.serve.backends import load_backend
from ganet.serve.errors import ServeError
from ganet.serve.routes_v2 import unpack_bytes
from ganet.serve.settings import ServeSettings
from probe_export import NAME, SIZE, make_probe_export, pixels_of

URL = f"/v2/models/{NAME}/infer"
SHAPE = [1, 3, SIZE, SIZE]
COUNT = 3 * SIZE * SIZE


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    directory = make_probe_export(tmp_path_factory.mktemp("v2") / "probe")
    backend, spec = load_backend(directory, "onnxruntime", intra_op_threads=1)
    app = create_app(ServeSettings(model=directory, warmup=False, workers_decode=1, max_delay_us=0, max_files=3),
                     backends=[backend], spec=spec)
    with TestClient(app) as c:
        yield c


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def packed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def binary_request(client, header: dict, data: bytes, length: str | None = None, **headers):
    head = json.dumps(header).encode()
    return client.post(URL, content=head + data, headers={
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)) if length is None else length, **headers})


def uint8(data=None, **extra) -> dict:
    return {"name": "image", "shape": SHAPE, "datatype": "UINT8",
            "data": list(range(COUNT)) if data is None else data, **extra}


def assert_400(r, code: str, *words: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == code, body
    for w in words:
        assert w in body["error"], (w, body)


def test_unpack_bytes():
    assert unpack_bytes(b"") == []
    assert unpack_bytes(packed(b"ab", b"", b"xyz")) == [b"ab", b"", b"xyz"]
    with pytest.raises(ServeError, match="truncated element length"):
        unpack_bytes(packed(b"ab") + b"\x01\x00")
    with pytest.raises(ServeError, match="element of 5 bytes runs past the data"):
        unpack_bytes(struct.pack("<I", 5) + b"abcd")
    with pytest.raises(ServeError, match="element of 4 bytes"):
        unpack_bytes(struct.pack("<I", 4) + b"abc")
    assert unpack_bytes(struct.pack("<I", 4) + b"abcd") == [b"abcd"]


def test_good_requests_json_and_binary_both_ways(client):
    r = client.post(URL, json={"id": "q-1", "inputs": [uint8()]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "q-1" and body["model_name"] == NAME and body["model_version"] == "1"
    assert body["outputs"][0]["name"] == "logits" and body["outputs"][0]["shape"] == [1, COUNT]
    np.testing.assert_array_equal(body["outputs"][0]["data"], np.arange(COUNT))
    assert "id" not in client.post(URL, json={"inputs": [uint8()]}).json()
    want = np.arange(COUNT, dtype="<f4").tobytes()
    for header in ({"inputs": [uint8()], "parameters": {"binary_data_output": True}},
                   {"inputs": [uint8()], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}):
        r = client.post(URL, json=header)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream", r.text
        head_length = int(r.headers["inference-header-content-length"])
        head = json.loads(r.content[:head_length])
        assert head["outputs"][0]["parameters"] == {"binary_data_size": len(want)}
        assert "data" not in head["outputs"][0] and r.content[head_length:] == want
    r = client.post(URL, json={"inputs": [uint8()], "outputs": [{"name": "logits", "parameters":
                                                                  {"binary_data": False}}],
                               "parameters": {"binary_data_output": True}})
    assert r.headers["content-type"].startswith("application/json")  # the output's own choice wins
    r = binary_request(client, {"inputs": [uint8(None, parameters={"binary_data_size": COUNT}) | {"data": None}]},
                       np.arange(COUNT, dtype=np.uint8).tobytes())
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(r.json()["outputs"][0]["data"], np.arange(COUNT))
    r = client.post(f"/v2/models/{NAME}/versions/1/infer", json={"inputs": [uint8()]})
    assert r.status_code == 200


def test_bytes_inputs_json_and_binary(client):
    images = [png(10), png(200)]
    for shape in ([2], [2, 1]):
        r = client.post(URL, json={"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES",
                                               "data": [base64.b64encode(d).decode() for d in images]}]})
        assert r.status_code == 200, r.text
        got = pixels_of(r.json()["outputs"][0]["data"])
        assert (got[0] == 10).all() and (got[1] == 200).all()
    data = packed(*images)
    r = binary_request(client, {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                            "parameters": {"binary_data_size": len(data)}}]}, data)
    assert r.status_code == 200, r.text
    assert (pixels_of(r.json()["outputs"][0]["data"])[1] == 200).all()


@pytest.mark.parametrize("tensor, words", [
    ({"name": "image", "shape": [0, 3, SIZE, SIZE], "datatype": "UINT8", "data": []}, ("expected shape",)),
    ({"name": "image", "shape": [1, 3, SIZE], "datatype": "UINT8", "data": [0] * 12}, ("[B, 3, 4, 4]", "[1, 3, 4]")),
    ({"name": "image", "shape": [1, 1, SIZE, SIZE], "datatype": "UINT8", "data": [0] * 16}, ("[1, 1, 4, 4]",)),
    ({"name": "image", "shape": [1, 3, SIZE, SIZE + 1], "datatype": "FP32", "data": [0] * 60}, ("FP32",)),
    ({"name": "image", "shape": SHAPE, "datatype": "UINT8", "data": [0] * (COUNT - 1)},
     (f"needs {COUNT} values, got {COUNT - 1}",)),
    ({"name": "image", "shape": SHAPE, "datatype": "UINT8"}, (f"needs {COUNT} values, got 0",)),
    ({"name": "image", "shape": SHAPE, "datatype": "UINT8", "data": ["a"] * COUNT}, ("not a flat list of numbers",)),
    ({"name": "image", "shape": SHAPE, "datatype": "INT32", "data": [0] * COUNT}, ("'INT32' is not accepted",)),
    ({"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["aGk="]}, ("[B] or [B, 1]", "[1, 2]")),
    ({"name": "image", "shape": [0], "datatype": "BYTES", "data": []}, ("[B] or [B, 1]",)),
    ({"name": "image", "shape": [1, 1, 1], "datatype": "BYTES", "data": ["aGk="]}, ("[1, 1, 1]",)),
    ({"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}, ("shape [2] but 1 elements",)),
    ({"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}, ("base64",)),
])
def test_malformed_tensors_are_400(client, tensor, words):
    assert_400(client.post(URL, json={"inputs": [tensor]}), "invalid_tensor", *words)


def test_malformed_requests_are_400_or_413(client):
    assert_400(client.post(URL, json={"inputs": [uint8(), uint8()]}), "invalid_tensor", "exactly one input")
    assert_400(client.post(URL, json={"inputs": [uint8() | {"name": "x"}]}), "invalid_tensor", "['x']")
    assert_400(client.post(URL, json={"inputs": []}), "invalid_tensor", "[]")
    assert_400(client.post(URL, json={"inputs": [uint8()], "outputs": [{"name": "probs"}]}), "invalid_tensor",
               "unknown output 'probs'")
    assert_400(client.post(URL, content=b"{not json", headers={"Content-Type": "application/json"}), "bad_request",
               "invalid inference request")
    assert_400(client.post(URL, json={"inputs": "nope"}), "bad_request", "inputs")
    for length in ("abc", "-1", "100000"):
        assert_400(binary_request(client, {"inputs": [uint8()]}, b"", length=length), "bad_request",
                   f"Inference-Header-Content-Length {length!r}")
    for size in (-1, COUNT + 1, "12"):
        r = binary_request(client, {"inputs": [uint8(None, parameters={"binary_data_size": size}) | {"data": None}]},
                           bytes(COUNT))
        assert_400(r, "invalid_tensor", f"binary_data_size {str(size)!r} does not fit the {COUNT} binary bytes")
    r = client.post(URL, json={"inputs": [{"name": "image", "shape": [4, 3, SIZE, SIZE], "datatype": "UINT8",
                                           "data": [0] * 4 * COUNT}]})
    assert r.status_code == 413 and r.json()["code"] == "too_many_files" and "4 images exceed the limit of 3" in r.text
    r = client.post(URL, content=json.dumps({"inputs": [uint8()]}), headers={"Content-Type": "application/json",
                                                                             "Content-Encoding": "gzip"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    r = client.post("/v2/models/other/infer", json={"inputs": [uint8()]})
    assert r.status_code == 404 and "unknown model 'other'" in r.text
    r = client.post(f"/v2/models/{NAME}/versions/2/infer", json={"inputs": [uint8()]})
    assert r.status_code == 404 and "unknown version '2'" in r.text
