"""The native resize (ganet/kernels/resample.c) against Pillow's: identical bytes, not merely close."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from real_images import photos

from ganet.kernels import resample
from ganet.preprocess import _PIL_FILTERS, Preprocessing, crop_box, image_to_uint8

FILTERS = ["bilinear", "bicubic"]
PREP_24 = Preprocessing(24, 27, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def to_uint8():
    native = resample.load()
    assert native is not None, "the kernel library should build here (gcc is installed)"
    return native


def pillow_chw(img: Image.Image, box: tuple[float, ...], size: int, interpolation: str) -> np.ndarray:
    out = img.resize((size, size), resample=_PIL_FILTERS[interpolation], box=box)
    return np.asarray(out).transpose(2, 0, 1)


@pytest.mark.parametrize("interpolation", FILTERS)
@pytest.mark.parametrize("size", [224, 160, 32])
def test_real_photos_give_pillows_bytes(to_uint8, interpolation, size):
    prep = Preprocessing(size, round(size * 256 / 224), (0.5,) * 3, (0.5,) * 3, interpolation)
    for name, photo in photos().items():
        for img in (photo, photo.transpose(Image.Transpose.ROTATE_90)):  # landscape and portrait
            expected = image_to_uint8(img, prep)
            got = to_uint8(img, prep)
            assert got.dtype == np.uint8 and got.shape == (3, size, size) and got.flags.c_contiguous
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} {img.size}")


@pytest.mark.parametrize("interpolation", FILTERS)
def test_random_sizes_and_boxes_give_pillows_bytes(interpolation):
    """Down- and upscaling, boxes that start and end between pixels, at the image's edges, one pixel wide,
    landscape and portrait (both of Pillow's pass orders), and images with hard edges (sums past 0 and 255 clip)."""
    rng = np.random.default_rng(1)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if trial % 3 == 0:
            pixels[:, ::2] = 255 * (pixels[:, ::2] > 127)
        img = Image.fromarray(pixels)
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        if trial % 5 == 0:
            x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)  # the whole image
        box = (x0, y0, max(x1, x0 + 0.25), max(y1, y0 + 0.25))
        box = (box[0], box[1], min(box[2], w), min(box[3], h))
        size = int(rng.integers(1, 260))
        np.testing.assert_array_equal(resample.resample_rgb_chw(pixels, box, size, interpolation),
                                      pillow_chw(img, box, size, interpolation),
                                      err_msg=f"{w}x{h} box {box} -> {size}")


def test_a_pass_pillow_skips_is_skipped_too():
    """Pillow runs no horizontal pass when the box spans the full width at the same size (and no vertical one
    likewise): the rows (columns) are copied, not resampled."""
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (90, 64, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    for box, size in (((0, 10.5, 64, 70.25), 64), ((5.5, 0, 60.0, 90), 90)):
        np.testing.assert_array_equal(resample.resample_rgb_chw(pixels, box, size, "bilinear"),
                                      pillow_chw(img, box, size, "bilinear"))


def test_empty_and_edge_boxes_give_pillows_bytes():
    """Zero-width and zero-height boxes on the image's far edges, and a tiny one in its corner."""
    pixels = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    for box in ((7, 0, 7, 5), (0, 5, 7, 5), (6.999, 4.999, 7, 5), (0, 0, 0.001, 0.001)):
        for size in (1, 3, 9):
            np.testing.assert_array_equal(resample.resample_rgb_chw(pixels, box, size, "bilinear"),
                                          pillow_chw(img, box, size, "bilinear"), err_msg=f"{box} -> {size}")


def test_coefficients_are_pillows_fixed_point():
    """Each output's taps sum to 1.0 in 22-bit fixed point (up to rounding), and the tap counts stay inside the
    image: what Pillow's precompute_coeffs guarantees."""
    bounds, coeffs = resample.coefficients(640, 133.5, 506.75, 224, "bilinear")
    assert bounds.shape == (224, 2) and coeffs.dtype == np.int32
    assert (bounds[:, 0] >= 0).all() and (bounds.sum(axis=1) <= 640).all()
    assert np.abs(coeffs.sum(axis=1) - (1 << 22)).max() <= coeffs.shape[1]


def test_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8"):
        resample.resample_rgb_chw(np.zeros((4, 4, 4), np.uint8), (0, 0, 4, 4), 2, "bilinear")
    with pytest.raises(ValueError, match="packed pixels"):
        resample.resample_rgb_chw(np.zeros((4, 8, 3), np.uint8)[:, ::2], (0, 0, 4, 4), 2, "bilinear")


def test_a_pillow_that_resamples_differently_is_detected(monkeypatch, caplog):
    """If Pillow ever changed its arithmetic, load() notices on its self-check and keeps Pillow."""
    monkeypatch.setattr(resample, "image_to_uint8", lambda img, prep: image_to_uint8(img, prep) ^ 1)
    with caplog.at_level(logging.WARNING, logger="ganet.kernels"):
        assert resample.load.__wrapped__() is None
    assert "differs from Pillow" in caplog.text


def test_the_pass_order_of_an_older_pillow_is_found(monkeypatch):
    """Pillow releases differ in which pass runs first on a tall image; load() matches the one installed."""
    def older_pillow(img: Image.Image, prep: Preprocessing) -> np.ndarray:  # always the horizontal pass first
        box, _ = crop_box(img.size, prep)
        return resample.resample_rgb_chw(np.asarray(img), box, prep.input_size, prep.interpolation,
                                         "horizontal first")

    # On a tall image the two orders give different bytes, and the order load() chose gives this Pillow's.
    tall = Image.fromarray(np.random.default_rng(4).integers(0, 256, (150, 61, 3), dtype=np.uint8))
    box, _ = crop_box(tall.size, PREP_24)
    by_order = {order: resample.resample_rgb_chw(np.asarray(tall), box, 24, "bilinear", order)
                for order in resample.PASS_ORDERS}
    assert not np.array_equal(*by_order.values())
    np.testing.assert_array_equal(by_order[resample.load().keywords["order"]], image_to_uint8(tall, PREP_24))
    monkeypatch.setattr(resample, "image_to_uint8", older_pillow)
    assert resample.load.__wrapped__().keywords["order"] == "horizontal first"


def test_without_the_kernel_library_serving_resizes_with_pillow():
    env = {**os.environ, "GANET_DISABLE_KERNELS": "1"}
    code = "from ganet.serve.images import resizer; print(resizer()[1])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pillow"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "native"
