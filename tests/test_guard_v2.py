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


def refused(call, *args, **kwargs) -> tuple[int, str, str]:
    """(status, code, message) of the ServeError ``call`` raises."""
    with pytest.raises(ServeError) as e:
        call(*args, **kwargs)
    return e.value.status, e.value.code, e.value.message


def test_unpack_bytes():
    assert unpack_bytes(b"") == []
    assert unpack_bytes(packed(b"ab", b"", b"xyz")) == [b"ab", b"", b"xyz"]
    assert unpack_bytes(packed(b"ab", b"")) == [b"ab", b""]  # a trailing empty element: exactly 4 bytes left
    assert unpack_bytes(struct.pack("<I", 4) + b"abcd") == [b"abcd"]
    assert refused(unpack_bytes, packed(b"ab") + b"\x01\x00") == (
        400, "invalid_tensor", "BYTES tensor: truncated element length")
    assert refused(unpack_bytes, packed(b"ab") + b"\x00\x00\x00") == (
        400, "invalid_tensor", "BYTES tensor: truncated element length")
    assert refused(unpack_bytes, struct.pack("<I", 5) + b"abcd") == (
        400, "invalid_tensor", "BYTES tensor: element of 5 bytes runs past the data")
    message = refused(unpack_bytes, struct.pack("<I", 4) + b"abc")[2]
    assert message == "BYTES tensor: element of 4 bytes runs past the data"


def test_unpack_bytes_stops_at_the_declared_count():
    assert unpack_bytes(packed(b"a", b"b"), limit=2) == [b"a", b"b"]  # exactly the limit is fine
    assert unpack_bytes(packed(b"a"), limit=None) == [b"a"]
    assert refused(unpack_bytes, packed(b"a", b"b", b""), limit=2) == (
        400, "invalid_tensor", "BYTES tensor: more than the 2 elements its shape declares")
    # refused before the next element is read: a huge count of empty elements costs one length at most
    assert refused(unpack_bytes, packed(b"") * 3 + b"\xff", limit=3)[2].startswith("BYTES tensor: more than the 3")


def test_invalid_requests_name_each_problem_by_its_path():
    from ganet.serve.routes_v2 import _parse

    status, code, message = refused(_parse, b'{"inputs":[{"name":"image","shape":"x","datatype":5}]}')
    assert (status, code) == (400, "bad_request")
    assert message == ("invalid inference request: inputs.0.shape: Input should be a valid array; "
                       "inputs.0.datatype: Input should be a valid string")


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


def test_tensor_errors_say_exactly_what_was_expected():
    from ganet.serve.routes_v2 import _pixels
    from ganet.serve.schemas import V2Tensor

    sample = (3, SIZE, SIZE)

    def tensor(shape, datatype="UINT8", data=None):
        return V2Tensor(name="image", shape=shape, datatype=datatype, data=data)

    assert refused(_pixels, tensor([1, 3, SIZE]), None, sample) == (
        400, "invalid_tensor", f"input 'image' UINT8: expected shape [B, 3, {SIZE}, {SIZE}], got [1, 3, {SIZE}]")
    # binary FP32 whose length is not a whole number of floats: no value is read from it
    assert refused(_pixels, tensor([1, 3, SIZE, SIZE], "FP32"), b"\x00" * (4 * COUNT - 1), sample) == (
        400, "invalid_tensor", f"input 'image': shape [1, 3, {SIZE}, {SIZE}] needs {COUNT} values, got 0")
    assert refused(_pixels, tensor([1, 3, SIZE, SIZE], "FP32"), b"\x00" * 4 * (COUNT - 1), sample)[2] == (
        f"input 'image': shape [1, 3, {SIZE}, {SIZE}] needs {COUNT} values, got {COUNT - 1}")
    status, code, message = refused(_pixels, tensor([1, 3, SIZE, SIZE], data=["x"] * COUNT), None, sample)
    assert (status, code) == (400, "invalid_tensor")
    assert message == ("input 'image': data is not a flat list of numbers (ValueError: could not convert string to "
                       "float: 'x')")


def test_echoed_error_text_is_cut_to_its_bound(monkeypatch):
    """What a client's bytes make the parser say is echoed only up to a bound: 500 characters of a ValueError,
    5 validation errors and 2,000 characters of them, 200 characters of a conversion error."""
    import pydantic_core

    import ganet.serve.routes_v2 as routes

    def raising(error):
        def validate(cls, data):
            raise error
        return classmethod(validate)

    monkeypatch.setattr(routes.V2InferRequest, "model_validate_json", raising(ValueError("v" * 900)))
    assert refused(routes._parse, b"{}") == (400, "bad_request", "invalid inference request: " + "v" * 500)

    errors = [{"type": "missing", "loc": ("inputs", i, "k" * 600), "input": None} for i in range(7)]
    error = pydantic_core.ValidationError.from_exception_data("V2InferRequest", errors)
    monkeypatch.setattr(routes.V2InferRequest, "model_validate_json", raising(error))
    listed = "; ".join(f"inputs.{i}.{'k' * 600}: Field required" for i in range(5))
    assert refused(routes._parse, b"{}")[2] == "invalid inference request: " + listed[:2000]
    assert len(listed) > 2000
    short = [{"type": "missing", "loc": ("inputs", i), "input": None} for i in range(7)]
    monkeypatch.setattr(routes.V2InferRequest, "model_validate_json",
                        raising(pydantic_core.ValidationError.from_exception_data("V2InferRequest", short)))
    assert refused(routes._parse, b"{}")[2] == "invalid inference request: " + "; ".join(
        f"inputs.{i}: Field required" for i in range(5))  # the first 5 of 7

    real_asarray = np.asarray

    def asarray(data, dtype=None):
        if dtype is np.float64:
            raise TypeError("t" * 300)
        return real_asarray(data, dtype=dtype)

    monkeypatch.setattr(routes.np, "asarray", asarray)
    message = refused(routes._pixels, routes.V2Tensor(name="image", shape=[1, 3, SIZE, SIZE], datatype="UINT8",
                                                      data=[0] * COUNT), None, (3, SIZE, SIZE))[2]
    assert message == f"input 'image': data is not a flat list of numbers (TypeError: {'t' * 200})"
