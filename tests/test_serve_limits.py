"""ganet-serve's limits through the TestClient and as functions: the 16-bit conversion that no longer copies the
image as float64 (same bytes), the decode budget, numbers and headers the client controls, the OpenAPI schema's
bounds, the default top_k of a model with fewer than 5 classes, and the CLI's start-up failures (one line, exit 2).
The live-server half (floods, slow clients, fuzzing, schemathesis) is tests/test_serve_reliability.py.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import hostile
import real_images
from ganet.preprocess import Preprocessing, to_rgb
from ganet.serve.app import create_app
from ganet.serve.budget import estimate_decode_bytes
from ganet.serve.limits import header_int
from ganet.serve.settings import ServeSettings
from real_images import encode
from test_serve import assert_error, export_dir  # noqa: F401  (export_dir: the session's export)

pytestmark = pytest.mark.reliability
MODEL = "ga_shufflenet_v2_cifar"
INFER = f"/v2/models/{MODEL}/infer"


# --- the 16-bit conversion -----------------------------------------------------------------------------------------

def to_rgb_before(img: Image.Image) -> Image.Image:
    """``to_rgb``'s high-bit-depth branch as it was: one float64 copy of the whole image. The reference."""
    a = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    return Image.fromarray(np.clip(a * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def sixteen_bit_photos() -> dict[str, bytes]:
    """Real photographs as real 16-bit (and 32-bit, float) files: grey levels resampled in float, so that the low
    byte carries detail (not x257 copies of 8-bit values), saved by Pillow as PNG and TIFF."""
    out = {}
    for name, img in real_images.photos("astronaut", "coffee", "china").items():
        grey = np.asarray(img.convert("F").resize((img.width * 3 // 2, img.height), Image.Resampling.BICUBIC))
        sixteen = np.clip(grey * 257.0 + np.linspace(0, 200, grey.shape[1]), 0, 65535)
        out[f"{name} I;16 PNG"] = encode(Image.fromarray(sixteen.astype(np.uint16)), "PNG")
        out[f"{name} I;16 TIFF"] = encode(Image.fromarray(sixteen.astype(np.uint16)), "TIFF")
        out[f"{name} I (>255) TIFF"] = encode(Image.fromarray((sixteen - 300).astype(np.int32), "I"), "TIFF")
        out[f"{name} I (<=255) TIFF"] = encode(Image.fromarray((grey - 20).astype(np.int32), "I"), "TIFF")
        out[f"{name} F TIFF"] = encode(Image.fromarray((np.clip(grey, 0, 255) * 0.97 - 5).astype(np.float32), "F"), "TIFF")
        if name == "astronaut":  # as an image: Pillow's encoders write no I;16B files
            out[f"{name} I;16B"] = Image.frombytes("I;16B", sixteen.shape[::-1], sixteen.astype(">u2").tobytes())
    return out


def test_to_rgb_of_high_bit_depth_images_keeps_its_bytes():
    """The chunked conversion gives exactly the bytes of the float64 one on real 16-bit, 32-bit and float images."""
    cases = sixteen_bit_photos()
    modes = set()
    for name, data in cases.items():
        img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        img.load()
        modes.add(img.mode)
        want, got = to_rgb_before(img), to_rgb(img)
        assert got.mode == "RGB" and got.size == want.size, name
        assert got.tobytes() == want.tobytes(), name
        assert len(set(np.asarray(got)[..., 0].ravel().tolist())) > 100, name  # a real image, not a constant
    assert {"I;16", "I", "F", "I;16B"} <= modes, modes


def test_to_rgb_of_a_tall_16bit_image_holds_no_float64_copy():
    """1 x 8,000,000 16-bit grey: the old path's float64 copy alone was 64 MB (with 3 temporaries of that size);
    now the conversion works 1 MiB pixels at a time, measured with tracemalloc (numpy reports its buffers)."""
    import tracemalloc

    img = Image.open(io.BytesIO(hostile.png_of_zeros(1, 8_000_000, 16, 0)))
    img.load()
    tracemalloc.start()
    try:
        to_rgb(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pixels = 8_000_000
    assert peak < 2 * pixels + pixels + 4 * 8 * 2**20, peak  # the uint16 array, the uint8 one, the chunks' temps
    assert peak < 8 * pixels, "a float64 copy of the whole image came back"


# --- numbers the client controls -----------------------------------------------------------------------------------

def test_header_int_accepts_ascii_digits_only():
    assert header_int("123") == 123 and header_int(" 42 ") == 42 and header_int(None) is None
    for bad in ("\xb2", "¹²³", "١٢٣", "-1", "1e3", "0x10", "", "9" * 19, "9" * 5000, "1 2"):
        assert header_int(bad) is None, bad


@pytest.fixture(scope="module")
def client(export_dir):  # noqa: F811
    settings = ServeSettings(model=export_dir, workers_decode=2, intra_op_threads=1, max_body_bytes=3_000_000,
                             max_decode_bytes=64 * 2**20, max_pixels=60_000_000)
    with TestClient(create_app(settings)) as c:
        yield c


def test_v2_numbers_and_headers_the_client_controls_are_4xx(client):
    """The class of the 500s: a digit-like header, huge lengths, integers past float64, more BYTES elements than
    the shape says, odd types where numbers belong. Every one a 400 in the error shape."""
    shape = [1, 3, 32, 32]

    def pixels(values) -> dict:
        return {"inputs": [{"name": "image", "shape": shape, "datatype": "UINT8", "data": values}]}

    octet = {"Content-Type": "application/octet-stream"}
    cases = [
        ("digit-like header", b"{}", {**octet, "Inference-Header-Content-Length": b"\xb2"}),
        ("superscripts", b"{}", {**octet, "Inference-Header-Content-Length": "¹²".encode()}),
        ("5000-digit header", b"{}", {**octet, "Inference-Header-Content-Length": "9" * 5000}),
        ("negative header", b"{}", {**octet, "Inference-Header-Content-Length": "-1"}),
        ("uint8 above 255", json.dumps(pixels([1000] * 3072)).encode(), {}),
        ("400-digit integers", ('{"inputs":[{"name":"image","shape":[1,3,32,32],"datatype":"UINT8","data":['
                                + ",".join(["1" + "0" * 400] * 3072) + "]}]}").encode(), {}),
        ("5000-digit integer", ('{"inputs":[{"name":"image","shape":[1,3,32,32],"datatype":"UINT8","data":['
                                + "9" * 5000 + "]}]}").encode(), {}),
        ("5000-digit shape", ('{"inputs":[{"name":"image","shape":[' + "9" * 5000
                              + '],"datatype":"BYTES","data":[]}]}').encode(), {}),
        ("strings as pixels", json.dumps(pixels(["a"] * 3072)).encode(), {}),
        ("nested pixels", json.dumps(pixels([[1, 2]] * 3072)).encode(), {}),
        ("nulls as pixels", json.dumps(pixels([None] * 3072)).encode(), {}),
        ("bool binary_data_size", json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "UINT8",
                                                          "parameters": {"binary_data_size": True}}]}).encode(), {}),
        ("non-string base64", json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                      "data": [12345]}]}).encode(), {}),
        ("BYTES count past the shape", *hostile.v2_empty_elements(400_000)),
        ("FP32 binary of odd length", json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32",
                                                             "parameters": {"binary_data_size": 7}}]}).encode()
         + b"\x00" * 7, None),
    ]
    for name, body, headers in cases:
        if headers is None:  # binary: the JSON header's length
            headers = {**octet, "Inference-Header-Content-Length": str(len(body) - 7)}
        r = client.post(INFER, content=body, headers={"Content-Type": "application/json", **headers})
        assert r.status_code in (400, 413), (name, r.status_code, r.text[:300])
        assert_error(r, r.status_code, r.json()["code"])


def test_decode_budget_refuses_before_decoding_and_names_itself(client):
    """An image whose estimate exceeds --max-decode-bytes is a 413 that names the budget, in milliseconds; the
    estimate bounds what decoding really takes (16-bit 7000x7000 zeros: about 650 MB estimated)."""
    bomb = hostile.png_of_zeros(7000, 7000, 16, 0)
    r = client.post("/classify", content=bomb, headers={"Content-Type": "image/png"})
    assert_error(r, 413, "decode_budget_exceeded", "--max-decode-bytes 67108864", "decode budget of 64 MiB")
    prep = Preprocessing.for_input_size(32)
    assert 600 * 2**20 < estimate_decode_bytes(Image.open(io.BytesIO(bomb)), prep) < 800 * 2**20
    tall = hostile.png_of_zeros(1, 50_000_000, 16, 0)
    assert estimate_decode_bytes(Image.open(io.BytesIO(tall)), prep) > 8 * 50_000_000 * 3  # a row pointer a row
    assert_error(client.post("/classify", content=tall, headers={"Content-Type": "image/png"}), 413,
                 "decode_budget_exceeded")
    ok = encode(real_images.photos("coffee")["coffee"], "PNG")  # a normal photo still fits
    assert client.post("/classify", content=ok, headers={"Content-Type": "image/png"}).status_code == 200


# --- the schema, the default top_k, the page ---------------------------------------------------------------------

def test_openapi_declares_what_the_server_enforces(client):
    spec = client.get("/openapi.json").json()
    (top_k,) = [p for p in spec["paths"]["/classify"]["post"]["parameters"] if p["name"] == "top_k"]
    assert top_k["schema"]["maximum"] == 10 and top_k["schema"]["minimum"] == 1 and top_k["schema"]["default"] == 5
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        op = spec["paths"][path]["post"]
        assert {"application/json", "application/octet-stream"} <= set(op["requestBody"]["content"]), path
        assert "Inference-Header-Content-Length" in [p["name"] for p in op["parameters"]], path
    assert_error(client.get("/classify"), 405, "method_not_allowed")


def three_class_export(source: Path, root: Path) -> Path:
    """The export with its graph's logits cut to the first 3 classes (a Slice appended to model.onnx), its labels
    and hashes rewritten: a real export of a model with fewer than 5 classes."""
    import onnx
    from onnx import helper

    from ganet.export.manifest import hash_directory

    out = root / "three"
    shutil.copytree(source, out)
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    logits = graph.output[0].name
    for name, values in (("s_starts", [0]), ("s_ends", [3]), ("s_axes", [1])):
        graph.initializer.append(helper.make_tensor(name, onnx.TensorProto.INT64, [1], values))
    graph.node.append(helper.make_node("Slice", [logits, "s_starts", "s_ends", "s_axes"], ["logits3"]))
    graph.output[0].name = "logits3"
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.save(model, str(out / "model.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    for f in ("model.fused.onnx", "model.int8.onnx"):
        (out / f).unlink()
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["kind"] == "onnx"]
    manifest["labels"], manifest["num_classes"] = ["cat", "dog", "bird"], 3
    manifest["output"]["shape"][-1] = 3
    (out / "labels.txt").write_text("cat\ndog\nbird\n")
    manifest["files"] = hash_directory(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_model_with_three_classes_answers_without_top_k(export_dir, tmp_path):  # noqa: F811
    """The README's raw-body curl and the page send no top_k: the default is min(5, classes), not a 422 that would
    hide the 415 or 400 a bad request deserves."""
    three = three_class_export(export_dir, tmp_path)
    photo = real_images.jpeg(real_images.photos("chelsea")["chelsea"])
    with TestClient(create_app(ServeSettings(model=three, workers_decode=1, intra_op_threads=1))) as c:
        r = c.post("/classify", content=photo, headers={"Content-Type": "image/jpeg"})  # the README's curl
        assert r.status_code == 200, r.text
        assert sorted(p["label"] for p in r.json()["predictions"]) == ["bird", "cat", "dog"]
        page = c.post("/classify", files={"file": ("c.jpg", photo, "image/jpeg")})  # what the page sends
        assert page.status_code == 200 and len(page.json()["predictions"]) == 3
        assert_error(c.post("/classify", content=b"hello", headers={"Content-Type": "text/plain"}), 415,
                     "unsupported_media_type")
        assert_error(c.post("/classify", content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty_body")
        assert_error(c.post("/classify?top_k=4", content=photo, headers={"Content-Type": "image/jpeg"}), 422,
                     "validation_error", "between 1 and 3")
        top_k = [p for p in c.get("/openapi.json").json()["paths"]["/classify"]["post"]["parameters"]
                 if p["name"] == "top_k"][0]["schema"]
        assert (top_k["maximum"], top_k["default"]) == (3, 3)


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_rejects_abbreviations_and_documents_its_limits(export_dir):  # noqa: F811
    result = subprocess.run(["ganet-serve", str(export_dir), "--workers", "2"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "unrecognized arguments: --workers 2" in result.stderr
    help_text = subprocess.run(["ganet-serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    for words in ("--max-decode-bytes", "--header-timeout-s", "--keep-alive-s", "--max-connections",
                  "--skip-verify", "exit codes", "port in use"):
        assert words in help_text, words


class BrokenBackend:
    """A stand-in backend that fails (a bug in the server, as far as the client is concerned): ONLY for the 500."""

    name, device = "broken", "cpu"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        raise RuntimeError("the backend broke")

    def close(self) -> None:
        pass


def test_a_server_bug_is_a_500_that_carries_the_request_id(export_dir, caplog):  # noqa: F811
    import logging

    from ganet.serve.backends import ModelSpec

    spec = ModelSpec("stub", tuple("abcdefghij"), Preprocessing.for_input_size(32), max_batch=1)
    app = create_app(ServeSettings(model=export_dir, warmup=False, workers_decode=1), backends=[BrokenBackend()],
                     spec=spec)
    logger = logging.getLogger("ganet.serve")
    logger.addHandler(caplog.handler)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.post("/classify", content=encode(real_images.photos("coffee")["coffee"], "PNG"),
                       headers={"Content-Type": "image/png", "X-Request-ID": "bug-42"})
    finally:
        logger.removeHandler(caplog.handler)
    assert_error(r, 500, "internal_error")
    assert r.json()["request_id"] == "bug-42" and "the backend broke" not in r.text
    logged = {id(rec) for rec in caplog.records if getattr(rec, "request_id", None) == "bug-42" and rec.exc_info}
    assert len(logged) == 1  # the trace, once, under the request's id (caplog may see a record twice)
