"""Open Inference Protocol v2 requests, well and badly formed, on the pixel probe (tests/probe_export.py): every
malformed tensor is a 400 naming what is wrong, too many images a 413 before any is parsed, and good requests
answer with the exact pixels in JSON or in the binary extension."""
from __future__ import annotations

import base64
import contextlib
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
from ganet.serve.routes_v2 import INLINE_JSON_BYTES, unpack_bytes
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


# --- exact answers, as a client reads them ---------------------------------------------------------------------

def answer(r) -> tuple[int, str, str]:
    """(status, code, error) of an error response."""
    body = r.json()
    return r.status_code, body["code"], body["error"]


BASE64_MESSAGE = "BYTES input in JSON must hold base64-encoded images (or use the binary tensor extension)"


@pytest.mark.parametrize("tensor, message", [
    ({"shape": [1, 2], "data": ["aGk="]},
     "BYTES input 'image': expected shape [B] or [B, 1] of encoded images, got [1, 2]"),
    # the count is checked before any element is decoded: one bad element of two declared is still "1 elements"
    ({"shape": [2], "data": ["not base64!"]}, "BYTES input: shape [2] but 1 elements"),
    ({"shape": [1]}, "BYTES input: shape [1] but 0 elements"),  # no data at all
    ({"shape": [1], "data": ["not base64!"]}, BASE64_MESSAGE),
    ({"shape": [1], "data": [5]}, BASE64_MESSAGE),  # not a string
])
def test_bytes_errors_are_exact(client, tensor, message):
    r = client.post(URL, json={"inputs": [{"name": "image", "datatype": "BYTES", **tensor}]})
    assert answer(r) == (400, "invalid_tensor", message)


def test_binary_bytes_with_fewer_elements_than_the_shape_is_400(client):
    data = packed(png(10))
    r = binary_request(client, {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                            "parameters": {"binary_data_size": len(data)}}]}, data)
    assert answer(r) == (400, "invalid_tensor", "BYTES input: shape [2] but 1 elements")


def test_base64_outside_the_alphabet_is_refused_not_skipped(client):
    """Strict base64: a line break (MIME-style wrapping) or a stray '@' inside an otherwise good PNG is a 400, not
    silently dropped (which would decode the PNG and answer 200)."""
    text = base64.b64encode(png(10)).decode()

    def send(data: str):
        return client.post(URL, json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                  "data": [data]}]})

    r = send(text)
    assert r.status_code == 200 and (pixels_of(r.json()["outputs"][0]["data"]) == 10).all(), r.text
    for bad in (text[:40] + "\n" + text[40:], text[:40] + "@" + text[40:], " " + text):
        assert answer(send(bad)) == (400, "invalid_tensor", BASE64_MESSAGE), repr(bad[:50])


def test_fp32_out_of_range_message_is_exact(client):
    data = [0.0] * COUNT
    data[5] = 255.5
    r = client.post(URL, json={"inputs": [uint8(data) | {"datatype": "FP32"}]})
    assert answer(r) == (400, "invalid_tensor", "input 'image': pixel values must lie in 0..255")


def test_compressed_request_message_is_exact(client):
    r = client.post(URL, content=json.dumps({"inputs": [uint8()]}), headers={"Content-Type": "application/json",
                                                                             "Content-Encoding": "deflate"})
    assert answer(r) == (415, "unsupported_media_type", "compressed requests are not accepted; send identity")


def test_json_answer_is_exactly_the_protocols_tensor(client):
    """Without binary_data: true (no output parameters, or an empty dict) the answer is JSON, and its one output is
    exactly {name, datatype FP32, shape, data}; with it, the header holds the same tensor minus data plus its size."""
    want = {"model_name": NAME, "model_version": "1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [1, COUNT], "data": [float(v) for v in range(COUNT)]}]}
    for outputs in (None, [{"name": "logits"}], [{"name": "logits", "parameters": {}}],
                    [{"name": "logits", "parameters": {"other": 1}}]):
        request = {"inputs": [uint8()]} | ({"outputs": outputs} if outputs is not None else {})
        r = client.post(URL, json=request)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", (outputs, r.text)
        assert r.json() == want, outputs
    r = client.post(URL, json={"inputs": [uint8()],
                               "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    head_length = int(r.headers["inference-header-content-length"])
    assert json.loads(r.content[:head_length]) == {"model_name": NAME, "model_version": "1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [1, COUNT], "parameters": {"binary_data_size": 4 * COUNT}}]}


# --- large JSON bodies: parsed on a decode thread, inside the decode budget and the request's deadline ----------

def padded(request: dict, size: int) -> bytes:
    """``request`` as JSON of exactly ``size`` bytes (trailing whitespace, as a pretty-printer leaves)."""
    text = json.dumps(request).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


def post_json(client, body: bytes):
    return client.post(URL, content=body, headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return make_probe_export(tmp_path_factory.mktemp("v2-budget") / "probe")


@contextlib.contextmanager
def served(directory, held: int, **settings):
    """A client of the probe with ``held`` bytes of its decode budget taken (as by decodes in flight)."""
    backend, spec = load_backend(directory, "onnxruntime", intra_op_threads=1)
    app = create_app(ServeSettings(model=directory, warmup=False, workers_decode=1, max_delay_us=0, **settings),
                     backends=[backend], spec=spec)
    with TestClient(app) as c:
        budget = app.state.serve.budget
        assert budget.try_acquire(held)
        yield c
        assert budget.in_use == held  # every reservation of the requests was given back
        budget.release(held)


def test_a_large_json_request_is_answered(client):
    """A JSON request over INLINE_JSON_BYTES (parsed off the event loop) answers like a small one."""
    sent = np.arange(2 * COUNT).reshape(2, 3, SIZE, SIZE)
    request = {"id": "big", "inputs": [{"name": "image", "shape": list(sent.shape), "datatype": "UINT8",
                                        "data": sent.reshape(-1).tolist()}]}
    r = post_json(client, padded(request, INLINE_JSON_BYTES + 5000))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "big"
    np.testing.assert_array_equal(pixels_of(r.json()["outputs"][0]["data"]), sent)


def test_json_up_to_the_inline_size_is_parsed_without_the_budget(probe_dir):
    """With the decode budget (1 MiB, the least allowed) one byte short of what parsing INLINE_JSON_BYTES of JSON
    reserves (16 bytes per byte: ganet.serve.budget.json_parse_bytes), a body of exactly INLINE_JSON_BYTES is still
    answered: it is parsed on the event loop, outside the budget. One byte more goes through the budget, which it can
    never fit: a 413 naming the JSON request."""
    assert INLINE_JSON_BYTES == 64 * 1024
    with served(probe_dir, held=1, max_decode_bytes=2**20) as c:
        request = {"inputs": [uint8()]}
        r = post_json(c, padded(request, INLINE_JSON_BYTES))
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["outputs"][0]["data"], np.arange(COUNT))
        assert answer(post_json(c, padded(request, INLINE_JSON_BYTES + 1))) == (
            413, "decode_budget_exceeded", "the JSON request needs about 1 MiB to decode, over the decode budget of "
                                           "1 MiB (--max-decode-bytes 1048576)")


def test_a_large_json_request_waits_for_the_budget_only_until_its_deadline(probe_dir):
    """A large JSON body whose parse fits the budget but not what is free now waits, until the request's deadline
    (--timeout-ms from its arrival): then a 504 naming the JSON request."""
    with served(probe_dir, held=2**20 + 1, max_decode_bytes=2**21, timeout_ms=400) as c:
        r = post_json(c, padded({"inputs": [uint8()]}, INLINE_JSON_BYTES + 1))
        assert answer(r) == (504, "deadline_exceeded", "the request's deadline passed while the JSON request waited "
                                                       "for 1 MiB of the decode budget")
