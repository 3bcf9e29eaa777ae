"""JPEG DCT-domain downscaling in serve/images.py: used for large JPEGs (the reduced size Pillow reports), never
for ordinary ones (bit-identical to ``image_to_uint8``), and close to a full decode on real photographs."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ganet.preprocess import Preprocessing, image_to_uint8
from ganet.serve.errors import ServeError
from ganet.serve.images import decode_image, jpeg_draft_scale, open_image

import real_images
from real_images import jpeg

P224, P32 = Preprocessing.for_input_size(224), Preprocessing.for_input_size(32)  # resize 256 / 32
LIMIT = 50_000_000


def photos() -> dict[str, np.ndarray]:
    return {name: np.asarray(img) for name, img in
            real_images.photos("astronaut", "coffee", "chelsea", "rocket", "china", "flower").items()}


def full_decode(data: bytes, prep: Preprocessing) -> np.ndarray:
    return image_to_uint8(Image.open(io.BytesIO(data)), prep)


@pytest.fixture(scope="module")
def large() -> dict[str, bytes]:
    """A 4032x3024 phone-sized mosaic of the photographs at near-native detail, and astronaut upscaled to 3000x2000."""
    tiles = [Image.fromarray(p).resize((672, 504)) for p in photos().values()]
    mosaic = Image.new("RGB", (4032, 3024))
    for i in range(36):
        mosaic.paste(tiles[(i + i // 6) % 6], ((i % 6) * 672, (i // 6) * 504))
    astronaut = Image.fromarray(photos()["astronaut"]).resize((3000, 2000), Image.Resampling.BICUBIC)
    return {"mosaic": jpeg(mosaic), "astronaut": jpeg(astronaut)}


@pytest.mark.parametrize("size, prep, scale", [
    ((4032, 3024), P224, 4),  # 3024 / 4 = 756 >= 2 x 256 (DRAFT_MARGIN x resize_size); / 8 = 378 is not
    ((3024, 4032), P224, 4),  # portrait: the shorter side decides
    ((3000, 2000), P224, 2),
    ((1920, 1080), P224, 2),
    ((2728, 2048), P224, 4),  # 2048 / 4 = 512: exactly the margin
    ((2731, 2048), P224, 1),  # an odd side: a partial last block would shift the crop
    ((1024, 768), P224, 1),  # 768 / 2 = 384 < 512
    ((640, 427), P224, 1),
    ((512, 512), P32, 1),  # 64 >= 2 x 32 at 1/8, but under a megapixel: decoded exactly
    ((4000, 3000), P32, 8),
])
def test_draft_scale_choice(size, prep, scale):
    assert jpeg_draft_scale(size, prep) == scale


def test_large_jpeg_is_decoded_at_reduced_scale(large):
    img = open_image(large["mosaic"], P224, LIMIT)
    assert img.size == (1008, 756)  # libjpeg decoded at 1/4
    assert open_image(large["astronaut"], P224, LIMIT).size == (1500, 1000)
    out = decode_image(large["mosaic"], P224, LIMIT)
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8
    # jpeg_draft=False: the full decode, exactly
    assert open_image(large["mosaic"], P224, LIMIT, jpeg_draft=False).size == (4032, 3024)
    np.testing.assert_array_equal(decode_image(large["mosaic"], P224, LIMIT, jpeg_draft=False),
                                  full_decode(large["mosaic"], P224))


@pytest.mark.parametrize("prep", [P224, P32], ids=["224", "32"])
def test_ordinary_jpegs_are_bit_identical_to_image_to_uint8(prep):
    for name, array in photos().items():
        data = jpeg(Image.fromarray(array))
        np.testing.assert_array_equal(decode_image(data, prep, LIMIT), full_decode(data, prep), err_msg=name)
    odd = jpeg(Image.fromarray(photos()["coffee"]).resize((2731, 2048)))  # large, but not divisible by 2
    assert open_image(odd, prep, LIMIT).size == (2731, 2048)
    np.testing.assert_array_equal(decode_image(odd, prep, LIMIT), full_decode(odd, prep))


def test_draft_agrees_with_full_decode_on_real_photographs(large):
    """Tolerance on the network's (3, 224, 224) uint8 input: mean |delta| <= 0.6 / 255, PSNR >= 45 dB, and no more
    than twice what one extra save at JPEG q85 changes (measured: mosaic 0.38 vs 0.22, astronaut 0.15 vs 0.25)."""
    for name, data in large.items():
        full = full_decode(data, P224).astype(np.float64)
        draft = decode_image(data, P224, LIMIT).astype(np.float64)
        resaved = full_decode(jpeg(Image.open(io.BytesIO(data)), 85), P224).astype(np.float64)
        err = np.abs(draft - full)
        psnr = 10 * np.log10(255.0 ** 2 / np.mean(err ** 2))
        assert err.mean() <= 0.6, (name, err.mean())
        assert psnr >= 45.0, (name, psnr)
        assert err.mean() <= 2 * np.abs(resaved - full).mean(), name
        assert err.mean() > 0, name  # the reduced path really ran (a full decode would be identical)


def test_truncated_large_jpeg_is_a_clear_400(large):
    data = large["astronaut"]
    with pytest.raises(ServeError) as e:
        decode_image(data[: len(data) // 3], P224, LIMIT)
    assert e.value.status == 400 and e.value.code == "corrupt_image"


def test_draft_keeps_cmyk_grey_and_exif_rotation():
    """The reduced decode keeps the JPEG's mode, and EXIF orientation is applied after it as before."""
    base = Image.fromarray(photos()["astronaut"]).resize((3000, 2000))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    cases = {"CMYK": jpeg(base.convert("CMYK")), "L": jpeg(base.convert("L"))}
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    cases["RGB"] = buf.getvalue()
    for mode, data in cases.items():
        img = open_image(data, P224, LIMIT)
        assert (img.mode, img.size) == (mode, (1500, 1000)), mode
        err = np.abs(decode_image(data, P224, LIMIT).astype(np.float64) - full_decode(data, P224))
        assert 0 < err.mean() <= 0.6, (mode, err.mean())
    rotated = decode_image(cases["RGB"], P224, LIMIT).astype(np.float64)
    upright = decode_image(jpeg(base), P224, LIMIT).astype(np.float64)
    assert np.abs(rotated - upright).mean() > 10  # the rotation was applied
