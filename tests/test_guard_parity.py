"""What "parity" means, pinned: the default bounds themselves (fp32 ONNX 1e-4, the fused graph twice that), the
gate on either side of them, and the numbers the gate reports. Fast: synthetic logits, a two-operator ONNX model.

The recorded bound in a real default export's manifest: tests/test_guard_export.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ganet.export import parity as P
from ganet.preprocess import Preprocessing
from probe_export import PREPROCESSING, SIZE, make_probe_export

# The contract, written out here rather than read from the code under test.
DEFAULT_ONNX_MAX_ABS, DEFAULT_FUSED_MAX_ABS = 1e-4, 2e-4


def test_default_bounds_are_pinned():
    tol = P.tolerances()
    assert tol["onnx"] == {"max_abs": DEFAULT_ONNX_MAX_ABS, "top1_agreement": 1.0}
    assert tol["onnx_fused"] == {"max_abs": DEFAULT_FUSED_MAX_ABS, "top1_agreement": 1.0}
    assert tol["tensorrt_fp32"] == {"max_abs": 1e-3, "top1_agreement": 1.0}
    assert tol["tensorrt_fp16"] == {"max_abs": None, "top1_agreement": 0.995}
    assert P.tolerances(None) == tol == P.TOLERANCES


def test_atol_moves_the_onnx_bounds_only_and_copies():
    tol = P.tolerances(3e-4)
    assert tol["onnx"]["max_abs"] == 3e-4 and tol["onnx_fused"]["max_abs"] == 6e-4
    assert tol["tensorrt_fp32"]["max_abs"] == 1e-3
    tol["onnx"]["max_abs"] = 1.0
    assert P.TOLERANCES["onnx"]["max_abs"] == DEFAULT_ONNX_MAX_ABS  # callers get copies


def logits(n: int = 7, classes: int = 5) -> np.ndarray:
    """(n, classes) float32 with a clear top-1 per row (margin 1)."""
    out = np.random.default_rng(0).uniform(-1, 0, (n, classes)).astype(np.float32)
    out[np.arange(n), np.arange(n) % classes] = 2.0
    return out


def inputs(n: int = 7) -> P.ParityInputs:
    return P.ParityInputs(np.zeros((n, 3, SIZE, SIZE), np.uint8), [f"img:{i}" for i in range(n)])


def offset_runner(reference: np.ndarray, offset: np.ndarray):
    """A runner that answers reference + offset, whatever the batch size."""
    position = {"i": 0}

    def run(images: np.ndarray) -> np.ndarray:
        i = position["i"]
        position["i"] = (i + len(images)) % len(reference)
        return (reference[i:i + len(images)].astype(np.float64) + offset[i:i + len(images)]).astype(np.float32)
    return run


@pytest.mark.parametrize("error, passes", [(0.5 * DEFAULT_ONNX_MAX_ABS, True), (0.9 * DEFAULT_ONNX_MAX_ABS, True),
                                           (1.5 * DEFAULT_ONNX_MAX_ABS, False), (3 * DEFAULT_ONNX_MAX_ABS, False)])
def test_the_default_gate_on_either_side_of_its_bound(error, passes):
    reference = logits()
    offset = np.zeros(reference.shape)
    offset[4, 1] = error  # one logit of one image off by `error`
    result = P.run_parity(offset_runner(reference, offset), inputs(), reference, [1, 3, 7],
                          P.tolerances()["onnx"])
    assert result.passed is passes
    assert result.max_abs == pytest.approx(error, rel=1e-2)
    assert result.top1_agreement == 1.0 and result.n == 7
    assert result.worst[0]["input"] == "img:4" and result.worst[0]["top1_agrees"]
    assert result.tolerance == {"max_abs": DEFAULT_ONNX_MAX_ABS, "top1_agreement": 1.0}
    assert set(result.by_batch) == {"1", "3", "7"}


def test_a_changed_top1_fails_even_within_the_bound():
    reference = logits()
    offset = np.zeros(reference.shape)
    offset[2] = 0.0
    reference = reference.copy()
    reference[2, :2] = [1.0, 1.0 - 5e-5]  # a near tie
    reference[2, 2:] = 0.0
    offset[2, 1] = 8e-5  # flips the tie, stays under 1e-4
    result = P.run_parity(offset_runner(reference, offset), inputs(), reference, [1, 7], P.tolerances()["onnx"])
    assert result.max_abs < DEFAULT_ONNX_MAX_ABS and result.top1_agreement == pytest.approx(6 / 7)
    assert not result.passed
    assert result.worst[0] == {"input": "img:2", "max_abs": pytest.approx(8e-5, rel=1e-2), "top1_agrees": False}
    message = P.failure_message("ONNX Runtime fp32", result)
    assert message.startswith("ONNX Runtime fp32 parity failed: ")
    assert "top-1 agreement 85.71% on 7 images" in message and "img:2 (max |dlogit| 8e-05, top-1 differs)" in message
    assert "tolerance max |dlogit| <= 0.0001, top-1 agreement >= 100.0%" in message
    assert "1: 8e-05/85.7%" in message


def test_fp16_agreement_gate_without_a_bound():
    reference = logits(200)
    offset = np.full(reference.shape, 0.5)  # far off in value, same ranking
    tol = P.tolerances()["tensorrt_fp16"]
    assert P.run_parity(offset_runner(reference, offset), inputs(200), reference, [8], tol).passed
    offset[0, 1] = 5.0  # one of 200 top-1s changes: 99.5% agreement, still within 0.995
    assert P.run_parity(offset_runner(reference, offset), inputs(200), reference, [8], tol).passed
    offset[1, 2] = 5.0  # two: 99.0%
    assert not P.run_parity(offset_runner(reference, offset), inputs(200), reference, [8], tol).passed


def test_worst_inputs_come_from_the_worst_batch_size_and_shape_errors_are_named():
    reference = logits()
    calls = {"n": 0}

    def batch_dependent(images: np.ndarray) -> np.ndarray:
        start = calls["n"] % 7
        calls["n"] += len(images)
        out = reference[start:start + len(images)].copy()
        if len(images) == 3:  # only batch size 3 is off, on its last image of each chunk
            out[-1, 0] += 1e-3 * (start + 1)
        return out

    result = P.run_parity(batch_dependent, inputs(), reference, [1, 3], P.tolerances()["onnx"], worst_k=2)
    assert result.by_batch["1"]["max_abs"] == 0 and result.by_batch["3"]["max_abs"] == pytest.approx(4e-3, rel=1e-3)
    assert [w["input"] for w in result.worst] == ["img:5", "img:2"]
    assert result.mean_abs == pytest.approx(result.by_batch["3"]["mean_abs"])
    with pytest.raises(P.ParityError, match=r"output shape \(7, 4\) at batch 7, expected \(7, 5\)"):
        P.run_parity(lambda images: np.zeros((len(images), 4), np.float32), inputs(), reference, [7],
                     P.tolerances()["onnx"])


def test_compare_by_hand():
    reference = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    output = np.array([[0.5, 0.0], [0.0, 1.25]], np.float32)
    assert P.compare(reference, output) == {"max_abs": 0.5, "mean_abs": 0.1875, "top1_agreement": 1.0}
    assert P.compare(reference, output[::-1])["top1_agreement"] == 0.0


def test_torch_reference_normalises_as_the_graph_does():
    """(x / 255 - mean) / std in fp32, in chunks; a Flatten model shows the numbers."""
    prep = Preprocessing(SIZE, SIZE, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    images = np.random.default_rng(1).integers(0, 256, (5, 3, SIZE, SIZE), dtype=np.uint8)
    got = P.torch_reference(torch.nn.Flatten().double(), prep, images, batch_size=2)
    mean, std = np.array(prep.mean).reshape(3, 1, 1), np.array(prep.std).reshape(3, 1, 1)
    want = ((images / 255.0 - mean) / std).reshape(5, -1)
    assert got.dtype == np.float32 and got.shape == (5, 3 * SIZE * SIZE)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_ort_runner_runs_a_real_model(tmp_path):
    directory = make_probe_export(tmp_path / "probe")
    images = np.random.default_rng(2).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    for threads in (None, 1):
        run = P.ort_runner(directory / "model.onnx", threads=threads, spinning=False)
        np.testing.assert_array_equal(run(images), images.reshape(3, -1).astype(np.float32))
    assert P.ort_session(directory / "model.onnx", threads=1).get_session_options().intra_op_num_threads == 1


def test_parity_inputs_are_the_photographs_and_the_held_out_digits():
    from ganet.export.data import recorded_dataset, resolve_export_data
    from ganet.train.data import DIGITS_HOLDOUT, DIGITS_MEAN, DIGITS_STD

    names = list(P.photo_arrays())
    assert names[:6] == ["sklearn:china.jpg", "sklearn:flower.jpg", "skimage:astronaut", "skimage:chelsea",
                         "skimage:coffee", "skimage:rocket"]
    photos = P.photographs(PREPROCESSING)
    assert photos.images.shape == (len(names), 3, SIZE, SIZE) and photos.images.dtype == np.uint8
    assert photos.names == names and len(photos) == len(names) and photos.targets is None
    digits_prep = Preprocessing(8, 8, DIGITS_MEAN, DIGITS_STD)
    assert recorded_dataset({}, digits_prep) == "digits" and recorded_dataset({}, PREPROCESSING) is None
    assert recorded_dataset({"data": "digits"}, PREPROCESSING) == "digits"
    assert recorded_dataset({"dataset": "cifar10"}, digits_prep) == "cifar10"  # the record wins over statistics
    held = P.digits_images(digits_prep, "val", limit=5)
    assert held.images.shape == (5, 3, 8, 8) and held.names[0] == "digits-val:0" and held.targets.shape == (5,)
    assert len(P.digits_images(digits_prep, "train", limit=3)) == 3
    default = P.digits_images(digits_prep, limit=5)  # the held-out split unless asked: parity on unseen images
    assert default.names == held.names and np.array_equal(default.images, held.images)
    both = resolve_export_data({}, digits_prep, ()).parity_inputs()
    assert len(both) == len(names) + DIGITS_HOLDOUT and both.names[len(names)] == "digits-val:0"
    photos_only = resolve_export_data({"data": "cifar10"}, digits_prep, ())  # no folder recorded: photographs only
    assert not photos_only.reachable and len(photos_only.parity_inputs()) == len(names)
    assert "--data-dir" in photos_only.note


def exact_logits(n: int, classes: int = 3) -> np.ndarray:
    """(n, classes) float32: 2.0 on class i % classes, 0.0 elsewhere, so that adding a power of two is exact."""
    out = np.zeros((n, classes), np.float32)
    out[np.arange(n), np.arange(n) % classes] = 2.0
    return out


def test_three_worst_inputs_are_named_by_default():
    """Without worst_k, five off inputs give exactly the three worst, worst first, with their exact errors."""
    reference = exact_logits(5)
    offset = np.zeros(reference.shape)
    for i, error in zip([3, 0, 4, 1, 2], [0.5, 0.25, 0.125, 0.0625, 0.03125]):
        offset[i, (i + 1) % 3] = error  # a non-top class: top-1 kept
    result = P.run_parity(offset_runner(reference, offset), inputs(5), reference, [5], P.tolerances()["onnx"])
    assert result.worst == [{"input": "img:3", "max_abs": 0.5, "top1_agrees": True},
                            {"input": "img:0", "max_abs": 0.25, "top1_agrees": True},
                            {"input": "img:4", "max_abs": 0.125, "top1_agrees": True}]


def test_a_wrong_output_shape_is_named_exactly():
    """A runner dropping a class: the error reads exactly 'output shape ... at batch B, expected ...'."""
    reference = exact_logits(4)
    with pytest.raises(P.ParityError) as raised:
        P.run_parity(lambda images: np.zeros((len(images), 2), np.float32), inputs(4), reference, [2],
                     P.tolerances()["onnx"])
    assert str(raised.value) == "output shape (4, 2) at batch 2, expected (4, 3)"


def test_tied_batch_sizes_name_the_worst_inputs_of_the_first_one_checked():
    """Two batch sizes off by exactly 0.5 at different images: the worst inputs are those of the first listed."""
    n = 5
    reference = exact_logits(n)
    seen = {"n": 0}
    # pass 0 (batch size 3) is off at img:1 (0.5) and img:0 (0.25); pass 1 (batch size 1) at img:3 and img:4
    errors = {0: {1: 0.5, 0: 0.25}, 1: {3: 0.5, 4: 0.25}}

    def per_pass(images: np.ndarray) -> np.ndarray:
        start, k = seen["n"] % n, seen["n"] // n
        seen["n"] += len(images)
        out = reference[start:start + len(images)].copy()
        for i, error in errors[k].items():
            if start <= i < start + len(images):
                out[i - start, (i + 1) % 3] += error
        return out

    tol = {"max_abs": 1.0, "top1_agreement": 1.0}
    result = P.run_parity(per_pass, inputs(n), reference, [3, 1], tol, worst_k=2)
    assert result.by_batch["3"]["max_abs"] == result.by_batch["1"]["max_abs"] == 0.5
    assert result.worst == [{"input": "img:1", "max_abs": 0.5, "top1_agrees": True},
                            {"input": "img:0", "max_abs": 0.25, "top1_agrees": True}]


@pytest.mark.parametrize("error, passes", [(2.0 ** -10, True), (2.0 ** -10 + 2.0 ** -20, False)])
def test_an_error_exactly_at_the_bound_passes(error, passes):
    """max |dlogit| equal to the max_abs bound (2**-10, exact in fp32) passes; one fp step more fails."""
    reference = exact_logits(4)
    offset = np.zeros(reference.shape)
    offset[2, 0] = error
    tol = {"max_abs": 2.0 ** -10, "top1_agreement": 1.0}
    result = P.run_parity(offset_runner(reference, offset), inputs(4), reference, [1, 4], tol)
    assert result.max_abs == error and result.top1_agreement == 1.0
    assert result.passed is passes


def test_failure_message_pinned_with_several_worst_inputs():
    """The whole message a user reads: a differing top-1 is flagged, agreeing ones carry no suffix, ', ' between."""
    reference = exact_logits(4)
    offset = np.zeros(reference.shape)
    offset[0, 1] = 3.0  # img:0 class 1 becomes 3.0 > 2.0: top-1 differs
    offset[2, 0] = 0.5  # img:2 keeps class 2 on top
    offset[1, 2] = 0.125  # img:1 keeps class 1 on top
    result = P.run_parity(offset_runner(reference, offset), inputs(4), reference, [2, 4], P.tolerances()["onnx"])
    assert not result.passed
    # mean |dlogit| = (3 + 0.5 + 0.125) / 12 = 0.30208..., agreement 3/4
    assert P.failure_message("ONNX Runtime fp32", result) == (
        "ONNX Runtime fp32 parity failed: max |dlogit| 3, mean 0.302, top-1 agreement 75.00% on 4 images; "
        "tolerance max |dlogit| <= 0.0001, top-1 agreement >= 100.0%; by batch size 2: 3/75.0%, 4: 3/75.0%; "
        "worst inputs: img:0 (max |dlogit| 3, top-1 differs), img:2 (max |dlogit| 0.5), img:1 (max |dlogit| 0.125)")
