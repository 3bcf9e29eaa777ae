"""The pixels the model receives, against values written down by hand: transparent pixels are white, FP32 tensors
are rounded to the nearest integer (not truncated), UINT8 passes unchanged.

Images are 4x4, the probe's input size, so nothing is resampled and each expected value is exact. Through the
library (``to_rgb``, ``image_to_uint8``), the service's decoder, and the service end to end: the pixel probe
(tests/probe_export.py) answers with the very pixels ONNX Runtime was given.
"""
from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ganet.preprocess import image_to_uint8, to_rgb
from ganet.serve.app import create_app
from ganet.serve.backends import load_backend
from ganet.serve.images import decode_image
from ganet.serve.settings import ServeSettings
from probe_export import NAME, PREPROCESSING, SIZE, make_probe_export, pixels_of

WHITE, RED, GREEN, BLACK = (255, 255, 255), (200, 10, 30), (20, 180, 60), (0, 0, 0)


def rgba_case() -> tuple[Image.Image, np.ndarray]:
    """Row 0: red, fully transparent -> white. Row 1: red, opaque. Row 2: green at alpha 51 (20%) over white.
    Row 3: black, opaque (a compositor that made everything white would fail here)."""
    rows = [(*RED, 0), (*RED, 255), (*GREEN, 51), (*BLACK, 255)]
    img = Image.fromarray(np.array([[row] * SIZE for row in rows], np.uint8), "RGBA")
    # 20% green over white, by hand: 0.2 * c + 0.8 * 255
    over_white = tuple(round(0.2 * c + 0.8 * 255) for c in GREEN)  # (208, 240, 216)
    want = np.array([[row] * SIZE for row in (WHITE, RED, over_white, BLACK)], np.uint8)  # (H, W, 3)
    return img, want


def la_case() -> tuple[Image.Image, np.ndarray]:
    """Grey 90 with alpha 0 (left half) and 255 (right half)."""
    grey = np.full((SIZE, SIZE), 90, np.uint8)
    alpha = np.array([[0, 0, 255, 255]] * SIZE, np.uint8)
    img = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])
    want = np.zeros((SIZE, SIZE, 3), np.uint8)
    want[:, :2], want[:, 2:] = 255, 90
    return img, want


def palette_case() -> tuple[Image.Image, np.ndarray]:
    """Palette index 0 (black) is the transparent one; index 1 is red. A checkerboard of the two."""
    index = (np.indices((SIZE, SIZE)).sum(0) % 2).astype(np.uint8)  # 0 where (y + x) is even
    img = Image.fromarray(index, "P")
    img.putpalette([*BLACK, *RED] + [0] * 254 * 3)
    img.info["transparency"] = 0
    want = np.where(index[..., None] == 0, np.array(WHITE, np.uint8), np.array(RED, np.uint8))
    return img, want


CASES = {"RGBA": rgba_case, "LA": la_case, "P with transparency": palette_case}


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "GIF":
        img.save(buf, "GIF", transparency=0)
    elif fmt == "WEBP":
        img.convert("RGBA").save(buf, "WEBP", lossless=True, exact=True)  # exact: keep colour under alpha 0
    else:
        img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", CASES)
def test_transparent_pixels_are_white_in_the_library(mode):
    img, want = CASES[mode]()
    assert img.mode == ("P" if mode.startswith("P") else mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(img)), want, err_msg=mode)
    np.testing.assert_array_equal(image_to_uint8(img, PREPROCESSING), want.transpose(2, 0, 1), err_msg=mode)


@pytest.mark.parametrize("mode, fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P with transparency", "PNG"),
                                       ("P with transparency", "GIF"), ("RGBA", "WEBP")])
def test_transparent_pixels_are_white_in_the_services_decoder(mode, fmt):
    img, want = CASES[mode]()
    data = encoded(img, fmt)
    assert Image.open(io.BytesIO(data)).mode in ("RGBA", "LA", "P")  # the file really carries transparency
    np.testing.assert_array_equal(decode_image(data, PREPROCESSING, 10_000), want.transpose(2, 0, 1),
                                  err_msg=f"{mode} {fmt}")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    directory = make_probe_export(tmp_path_factory.mktemp("pixels") / "probe")
    backend, spec = load_backend(directory, "onnxruntime", intra_op_threads=1)
    app = create_app(ServeSettings(model=directory, warmup=False, workers_decode=1, max_delay_us=0),
                     backends=[backend], spec=spec)
    with TestClient(app) as client:
        yield client


def infer(client: TestClient, tensor: dict, binary: bytes | None = None):
    url = f"/v2/models/{NAME}/infer"
    if binary is None:
        return client.post(url, json={"inputs": [tensor]})
    tensor = {**tensor, "parameters": {"binary_data_size": len(binary)}}
    head = json.dumps({"inputs": [tensor]}).encode()
    return client.post(url, content=head + binary, headers={"Content-Type": "application/octet-stream",
                                                            "Inference-Header-Content-Length": str(len(head))})


def test_transparent_pixels_are_white_end_to_end(probe):
    images = [encoded(CASES[m]()[0], "PNG") for m in CASES]
    r = infer(probe, {"name": "image", "shape": [len(images)], "datatype": "BYTES",
                      "data": [base64.b64encode(d).decode() for d in images]})
    assert r.status_code == 200, r.text
    got = pixels_of(r.json()["outputs"][0]["data"])  # (3, 3, S, S): what the model was given
    for seen, mode in zip(got, CASES):
        np.testing.assert_array_equal(seen, CASES[mode]()[1].transpose(2, 0, 1), err_msg=mode)


# (sent as FP32, the uint8 the model must see): nearest integer. Truncation would give the second column's floor.
ROUNDING = [(0.0, 0), (0.4, 0), (0.6, 1), (1.5, 2), (2.49, 2), (2.51, 3), (3.0, 3), (99.9, 100), (127.01, 127),
            (127.99, 128), (200.7, 201), (254.4, 254), (254.6, 255), (255.0, 255)]


def fp32_batch() -> tuple[np.ndarray, np.ndarray]:
    """(2, 3, S, S) float32 values cycling through ROUNDING, and the uint8 images they must become."""
    count = 2 * 3 * SIZE * SIZE
    sent = np.array([ROUNDING[i % len(ROUNDING)][0] for i in range(count)], np.float32).reshape(2, 3, SIZE, SIZE)
    want = np.array([ROUNDING[i % len(ROUNDING)][1] for i in range(count)], np.uint8).reshape(2, 3, SIZE, SIZE)
    return sent, want


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_fp32_pixels_are_rounded_to_the_nearest_integer(probe, encoding):
    sent, want = fp32_batch()
    tensor = {"name": "image", "shape": list(sent.shape), "datatype": "FP32"}
    if encoding == "json":
        r = infer(probe, {**tensor, "data": [float(v) for v in sent.reshape(-1)]})
    else:
        r = infer(probe, tensor, sent.astype("<f4").tobytes())
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels_of(r.json()["outputs"][0]["data"]), want)


def test_uint8_pixels_pass_unchanged(probe):
    sent = np.arange(2 * 3 * SIZE * SIZE, dtype=np.int64).reshape(2, 3, SIZE, SIZE) * 2 + 1  # 1, 3, ..., 191
    sent[1, 2, 3, 3] = 255
    for binary in (None, sent.astype(np.uint8).tobytes()):
        tensor = {"name": "image", "shape": list(sent.shape), "datatype": "UINT8"}
        r = infer(probe, tensor if binary else {**tensor, "data": sent.reshape(-1).tolist()}, binary)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels_of(r.json()["outputs"][0]["data"]), sent)


@pytest.mark.parametrize("value", [-0.01, 255.01, float("nan"), float("inf"), -float("inf")])
def test_fp32_pixels_outside_0_to_255_are_400(probe, value):
    sent, _ = fp32_batch()
    sent[1, 2, 1, 1] = value
    r = infer(probe, {"name": "image", "shape": list(sent.shape), "datatype": "FP32"}, sent.astype("<f4").tobytes())
    assert r.status_code == 400 and r.json()["code"] == "invalid_tensor", r.text
    assert "0..255" in r.json()["error"]


def test_binary_tensor_sizes_that_do_not_fit_are_400(probe):
    sent, _ = fp32_batch()
    raw = sent.astype("<f4").tobytes()
    tensor = {"name": "image", "shape": list(sent.shape), "datatype": "FP32"}
    for data, why in ((raw[:-4], "one value short"), (raw + struct.pack("<f", 1.0), "one value over")):
        r = infer(probe, tensor, data)
        assert r.status_code == 400 and r.json()["code"] == "invalid_tensor", (why, r.text)
        assert str(sent.size) in r.json()["error"], why


def test_standard_statistics_are_the_published_ones():
    """ImageNet's and CIFAR's per-channel statistics, as published (torchvision's and the CIFAR papers' numbers):
    a wrong digit here shifts every normalised input of every model trained with it."""
    from ganet.preprocess import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocessing

    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert CIFAR_MEAN == (0.5071, 0.4865, 0.4409) and CIFAR_STD == (0.2673, 0.2564, 0.2762)  # CIFAR-100 train
    assert Preprocessing.for_input_size(224) == Preprocessing(224, 256, IMAGENET_MEAN, IMAGENET_STD)
    assert Preprocessing.for_input_size(160).resize_size == 183  # 160 * 256 / 224, rounded
    assert Preprocessing.for_input_size(32) == Preprocessing(32, 32, CIFAR_MEAN, CIFAR_STD)
    assert Preprocessing.for_input_size(33).mean == IMAGENET_MEAN
