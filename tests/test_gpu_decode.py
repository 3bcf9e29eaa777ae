"""--decode gpu (ganet.serve.gpu_decode, gpu_resize) in its CPU form -- torchvision's decode_jpeg on CPU tensors and
the same tensor resize -- against the one preprocessing definition (Pillow's image_to_uint8): the bytes must be equal
here. On a GPU (gpu marker) nvJPEG decodes, and the agreement is measured and held to the stated bounds.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ganet.preprocess import Preprocessing, image_to_uint8
from ganet.serve.app import create_app
from ganet.serve.backends import load_backend
from ganet.serve.errors import ServeError
from ganet.serve.gpu_decode import GpuDecoder
from ganet.serve.gpu_resize import TensorResize
from ganet.serve.routes_classify import softmax
from ganet.serve.settings import ServeSettings

import real_images
from real_images import encode, jpeg
from test_serve import export_dir, photos, scores_by_index  # noqa: F401 (fixture)

P224 = Preprocessing.for_input_size(224)
P32 = Preprocessing.for_input_size(32)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CROPS = {"cpu": 3, "cuda": 30}  # crops per photograph: 45 images here (equal bytes), 288 on a GPU (a few hundred)


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_tensor_resize_gives_pillows_bytes():
    """Real photographs (landscape, portrait) and random noisy images of random sizes, both filters, down- and
    upscaling: Pillow's exact bytes (one pass order is chosen by checking against this Pillow)."""
    for prep in (P224, Preprocessing(32, 36, P32.mean, P32.std, "bicubic")):
        resize = TensorResize(prep)
        for img in real_images.photos("china", "chelsea", "astronaut").values():
            for im in (img, img.transpose(Image.Transpose.TRANSPOSE)):
                rgb = torch.from_numpy(np.array(im)).permute(2, 0, 1)
                assert np.array_equal(resize(rgb).numpy(), image_to_uint8(im, prep))
    rng = np.random.default_rng(0)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(9, 90, 2))
        size = int(rng.integers(4, 40))
        prep = Preprocessing(size, size + int(rng.integers(0, 12)), P32.mean, P32.std,
                             str(rng.choice(["bilinear", "bicubic"])))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[:, ::5] = 255  # hard edges: the bicubic overshoot is clipped
        img = Image.fromarray(pixels)
        out = TensorResize(prep)(torch.from_numpy(pixels).permute(2, 0, 1)[None])  # a batch of one
        assert out.shape == (1, 3, size, size) and np.array_equal(out[0].numpy(), image_to_uint8(img, prep))


def agreement_images(crops: int) -> list[tuple[str, bytes]]:
    """JPEGs (quality 90) of the photographs, ``crops`` random crops of each (quality 60-95), greyscale and
    progressive ones, one of each EXIF orientation: what the decoder must reproduce."""
    rng = np.random.default_rng(0)
    out = []
    for name, img in real_images.photos().items():
        out.append((name, jpeg(img)))
        w, h = img.size
        for k in range(crops):
            s = int(rng.integers(min(w, h) // 5, min(w, h)))
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            crop = img.crop((x, y, x + int(s * rng.uniform(0.6, 1.0)), y + s))
            out.append((f"{name}-crop{k}", jpeg(crop, quality=int(rng.integers(60, 96)))))
    china = photos()["china"]
    out.append(("grey", encode(china.convert("L"), "JPEG", quality=90)))
    out.append(("progressive", encode(china, "JPEG", quality=90, progressive=True)))
    out += [(f"exif{o}", with_orientation(photos()["chelsea"], o)) for o in range(2, 9)]
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_decoded_batch_against_image_to_uint8(device, record_gpu_figure):
    """Every image of the set through decode_batch: the CPU form gives Pillow's bytes; nvJPEG may differ by a few
    levels (measured: max and mean |delta| of the uint8 input)."""
    images = agreement_images(CROPS[device])
    decoder = GpuDecoder(P224, 50_000_000, device=device)
    try:
        routes = [decoder.route(data) for _, data in images]
        assert all(r.path == "gpu" for r in routes)
        got = decoder.decode_batch([d for _, d in images], routes)
    finally:
        decoder.close()
    expected = np.stack([image_to_uint8(Image.open(io.BytesIO(d)), P224) for _, d in images])
    refused = [name for (name, _), g in zip(images, got) if g is None]
    delta = np.abs(np.stack([g if g is not None else e for g, e in zip(got, expected)]).astype(int) - expected)
    figures = {"images": len(images), "refused_by_decoder": refused, "max_abs_uint8": int(delta.max()),
               "mean_abs_uint8": float(delta.mean()), "pixels_off_by_more_than_2": float((delta > 2).mean())}
    print(f"{device} decode vs Pillow at 224: {figures}")
    record_gpu_figure(f"decode_uint8_{device}", figures)
    if device == "cpu":
        assert refused == [] and delta.max() == 0
    else:
        assert len(refused) <= 2 and delta.mean() <= 1.0, figures


@pytest.mark.parametrize("device", DEVICES)
def test_top1_agreement_with_pillow_decoding(device, export_dir, record_gpu_figure):
    """The serving test model (answers depend on the image) on the same set at 32x32: top-1 of the decoder's input
    against top-1 of image_to_uint8's, >= 99.5%."""
    backend, spec = load_backend(export_dir, "onnxruntime", intra_op_threads=1)
    images = agreement_images(CROPS[device])
    decoder = GpuDecoder(spec.preprocessing, 50_000_000, device=device)
    try:
        got = decoder.decode_batch([d for _, d in images], [decoder.route(d) for _, d in images])
    finally:
        decoder.close()
    expected = np.stack([image_to_uint8(Image.open(io.BytesIO(d)), spec.preprocessing) for _, d in images])
    decoded = np.stack([g if g is not None else e for g, e in zip(got, expected)])
    a, b = backend(decoded), backend(expected)
    agreement = float((a.argmax(1) == b.argmax(1)).mean())
    figures = {"images": len(images), "top1_agreement": agreement, "max_abs_logit": float(np.abs(a - b).max()),
               "max_abs_uint8": int(np.abs(decoded.astype(int) - expected).max())}
    print(f"{device} decode, top-1 vs Pillow: {figures}")
    record_gpu_figure(f"decode_top1_{device}", figures)
    assert agreement >= 0.995, figures


def test_routing_limits_and_errors_match_the_cpu_path():
    decoder = GpuDecoder(P32, max_pixels=1_000_000, device="cpu")
    try:
        decoder.warm_up()  # what make_gpu_decoder does before serving: one small JPEG through the device path
        assert decoder.batches == [1]
        china = photos()["china"]
        assert decoder.route(jpeg(china)).path == "gpu"
        assert (decoder.route(encode(china, "PNG")).path, decoder.route(encode(china, "PNG")).reason) == ("cpu",
                                                                                                        "format")
        assert decoder.route(encode(china.convert("CMYK"), "JPEG")).reason == "mode"
        route = decoder.route(with_orientation(china, 6))
        assert (route.path, route.orientation, route.size) == ("gpu", 6, (640, 427))
        big = jpeg(china.resize((1500, 1000)))
        with pytest.raises(ServeError) as e:  # from the header, before any pixel is decoded
            decoder.route(big)
        assert e.value.status == 413
        with pytest.raises(ServeError) as e:
            decoder.route(b"not an image at all")
        assert e.value.status == 415
        truncated = jpeg(china)[:3000]  # a valid header, a stream that ends early
        assert decoder.route(truncated).path == "gpu"
        assert decoder.decode_batch([truncated, jpeg(china)], [decoder.route(truncated), decoder.route(jpeg(china))])[0] \
            is None  # refused alone: the CPU path then answers (here: its 400)
    finally:
        decoder.close()
    nearest = GpuDecoder(Preprocessing(32, 32, P32.mean, P32.std, "nearest"), 10**7, device="cpu")
    assert nearest.route(jpeg(photos()["china"])).reason == "filter"
    nearest.close()


def test_service_with_the_gpu_decoder_answers_as_the_cpu_path_and_counts_paths(export_dir):
    """The service with the decoder in its CPU form: the same scores as ONNX Runtime on image_to_uint8, a bad
    JPEG gets the CPU path's 400, and /metrics counts each image by path and reason."""
    settings = ServeSettings(model=export_dir, workers_decode=2, intra_op_threads=1, decode="gpu", max_delay_us=1000)
    backend, spec = load_backend(export_dir, "onnxruntime", intra_op_threads=1)
    decoder = GpuDecoder(spec.preprocessing, settings.max_pixels, device="cpu", max_delay_us=20_000)
    jpegs = [jpeg(img) for img in photos().values()]
    png = encode(photos()["coffee"], "PNG")
    with TestClient(create_app(settings, gpu_decoder=decoder)) as client:
        files = [("file", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)] + [("file", ("c.png", png,
                                                                                                   "image/png"))]
        r = client.post("/classify", files=files, params={"top_k": 10})
        assert r.status_code == 200, r.text
        for body, data in zip(r.json()["results"], jpegs + [png]):
            expected = softmax(backend(image_to_uint8(Image.open(io.BytesIO(data)), spec.preprocessing)[None])[0])
            np.testing.assert_allclose(scores_by_index(body), expected, rtol=0, atol=1e-6)
        assert max(decoder.batches) > 1  # the five JPEGs of one request were decoded together
        bad = client.post("/classify", content=jpegs[0][:3000], headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 400 and bad.json()["code"] == "corrupt_image"
        metrics = client.get("/metrics").text
    counts = {m[0]: float(m[1]) for m in re.findall(r'^ganet_decode_images_total\{(.*)\} (\S+)$', metrics, re.M)}
    # the truncated JPEG failed on both paths: an error, not a decoded image
    assert counts == {'path="gpu",reason="jpeg"': 5, 'path="cpu",reason="format"': 1}
