"""Numerical parity of an exported artifact against the PyTorch model, on real images.

Reference: the checkpoint's model in fp32 on the CPU, fed the same uint8 batch normalised in torch as
``(x / 255 - mean) / std``. Inputs: photographs that ship with scikit-learn and scikit-image, and the held-out images
of the checkpoint's data set where this machine reaches it (:mod:`ganet.export.data`), all through
:func:`ganet.preprocess.image_to_uint8`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ganet.preprocess import Preprocessing, image_to_uint8, normalize_uint8

__all__ = ["ParityInputs", "ParityResult", "ParityError", "TOLERANCES", "tolerances", "photo_arrays", "photographs",
           "digits_images", "failure_message", "torch_reference", "compare", "run_parity", "ort_session", "ort_runner"]

# What "parity" means per artifact kind (docs/export.md#parity gives the reasons).
TOLERANCES = {"onnx": {"max_abs": 1e-4, "top1_agreement": 1.0},
              # model.fused.onnx: the kernel sums in its own order, so it sits as far from
              # the exact (float64) function as ORT's standard graph does (4.6e-5 vs 4.2e-5 on the test export) but
              # not at the same point: against PyTorch's fp32 answer -- itself ~1e-4 from the exact one there --
              # two such implementations can be twice 1e-4 apart.
              "onnx_fused": {"max_abs": 2e-4, "top1_agreement": 1.0},
              "tensorrt_fp32": {"max_abs": 1e-3, "top1_agreement": 1.0},
              "tensorrt_fp16": {"max_abs": None, "top1_agreement": 0.995}}


def tolerances(onnx_atol: float | None = None) -> dict[str, dict[str, Any]]:
    """TOLERANCES, with the fp32 ONNX bound set to ``onnx_atol`` (``ganet-export --atol``) where given; the fused
    graph's bound stays twice the ONNX one, for the reason above."""
    out = {kind: dict(tol) for kind, tol in TOLERANCES.items()}
    if onnx_atol is not None:
        out["onnx"]["max_abs"], out["onnx_fused"]["max_abs"] = onnx_atol, 2 * onnx_atol
    return out


_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry")

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 (B, 3, S, S) -> float32 (B, num_classes)


class ParityError(RuntimeError):
    """An artifact does not compute what the PyTorch model computes; the message names the worst inputs."""


@dataclass
class ParityInputs:
    images: np.ndarray  # (N, 3, S, S) uint8
    names: list[str]  # one per image, e.g. "sklearn:china.jpg", "digits-heldout:17"
    targets: np.ndarray | None = None  # (N,) int64 where the data set's labels are known, else None

    def __len__(self) -> int:
        return len(self.names)


def photo_arrays() -> dict[str, np.ndarray]:
    """The real photographs bundled with scikit-learn and scikit-image, (H, W, 3) uint8 RGB by source-qualified name
    (``sklearn:china.jpg``, ``skimage:astronaut``, ...): china, flower, astronaut, chelsea, coffee, rocket first."""
    from sklearn.datasets import load_sample_image
    from skimage import data

    arrays = {f"sklearn:{n}": load_sample_image(n) for n in ("china.jpg", "flower.jpg")}
    return arrays | {f"skimage:{n}": getattr(data, n)() for n in _SKIMAGE_PHOTOS}


def photographs(prep: Preprocessing) -> ParityInputs:
    """:func:`photo_arrays` through the checkpoint's preprocessing, as (N, 3, S, S) uint8."""
    from PIL import Image

    arrays = photo_arrays()
    images = [image_to_uint8(Image.fromarray(a), prep) for a in arrays.values()]
    return ParityInputs(np.stack(images), list(arrays))


def digits_images(prep: Preprocessing, split: str = "val", limit: int | None = None) -> ParityInputs:
    """scikit-learn's digits (ganet-train's fixed split), each 8x8 image through ``image_to_uint8``."""
    from PIL import Image

    from ganet.train.data import load_digits

    data = load_digits(prep.input_size)
    part = data.val if split == "val" else data.train
    n = len(part) if limit is None else min(limit, len(part))
    hwc = part.images[:n].permute(0, 2, 3, 1).numpy()  # (N, 8, 8, 3) uint8
    images = np.stack([image_to_uint8(Image.fromarray(a), prep) for a in hwc])
    return ParityInputs(images, [f"digits-{split}:{i}" for i in range(n)], part.targets[:n].numpy())


def torch_reference(model: Any, prep: Preprocessing, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """fp32 CPU logits of ``model`` on uint8 ``images`` normalised in torch: (N, 3, S, S) -> (N, num_classes)."""
    import torch

    model = model.float().cpu().eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(model(normalize_uint8(torch.from_numpy(images[i:i + batch_size]), prep)).numpy())
    return np.concatenate(out).astype(np.float32)


@dataclass
class ParityResult:
    max_abs: float
    mean_abs: float
    top1_agreement: float
    n: int
    worst: list[dict[str, Any]]  # the inputs with the largest |dlogit|, worst first
    by_batch: dict[str, dict[str, float]]
    tolerance: dict[str, Any]
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"max |dlogit| {self.max_abs:.3g}, mean {self.mean_abs:.3g}, top-1 agreement "
                f"{100 * self.top1_agreement:.2f}% on {self.n} images")


def compare(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    diff = np.abs(output.astype(np.float64) - reference.astype(np.float64))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "top1_agreement": float((output.argmax(1) == reference.argmax(1)).mean())}


def run_parity(runner: Runner, inputs: ParityInputs, reference: np.ndarray, batch_sizes: list[int],
               tolerance: dict[str, Any], worst_k: int = 3) -> ParityResult:
    """Run ``runner`` over all inputs in chunks of each batch size; every batch size must meet ``tolerance``."""
    by_batch, outputs, worst_max = {}, reference, -1.0
    for b in batch_sizes:
        out = np.concatenate([runner(inputs.images[i:i + b]) for i in range(0, len(inputs), b)])
        if out.shape != reference.shape:
            raise ParityError(f"output shape {out.shape} at batch {b}, expected {reference.shape}")
        by_batch[str(b)] = compare(reference, out)
        if by_batch[str(b)]["max_abs"] > worst_max:  # name the worst inputs of the worst batch size
            outputs, worst_max = out, by_batch[str(b)]["max_abs"]
    per_image = np.abs(outputs.astype(np.float64) - reference).max(axis=1)
    order = np.argsort(-per_image)[:worst_k]
    worst = [{"input": inputs.names[i], "max_abs": float(per_image[i]),
              "top1_agrees": bool(outputs[i].argmax() == reference[i].argmax())} for i in order]
    max_abs = max(r["max_abs"] for r in by_batch.values())
    agreement = min(r["top1_agreement"] for r in by_batch.values())
    passed = agreement >= tolerance["top1_agreement"] and (tolerance["max_abs"] is None
                                                           or max_abs <= tolerance["max_abs"])
    return ParityResult(max_abs=max_abs, mean_abs=max(r["mean_abs"] for r in by_batch.values()),
                        top1_agreement=agreement, n=len(inputs), worst=worst, by_batch=by_batch,
                        tolerance=dict(tolerance), passed=passed)


def failure_message(kind: str, result: ParityResult) -> str:
    tol = result.tolerance
    worst = ", ".join(f"{w['input']} (max |dlogit| {w['max_abs']:.3g}"
                      f"{'' if w['top1_agrees'] else ', top-1 differs'})" for w in result.worst)
    return (f"{kind} parity failed: {result.summary()}; tolerance max |dlogit| <= {tol['max_abs']}, top-1 agreement "
            f">= {100 * tol['top1_agreement']:.1f}%; by batch size "
            + ", ".join(f"{b}: {r['max_abs']:.3g}/{100 * r['top1_agreement']:.1f}%" for b, r in result.by_batch.items())
            + f"; worst inputs: {worst}")


def ort_session(path: Any, threads: int | None = None, spinning: bool = True, kernels: bool = False) -> Any:
    """An ONNX Runtime CPU session, all graph optimisations, intra-op threads = the CPUs this process may use.

    ``spinning=False`` stops idle pool threads from busy-waiting after a run: needed when timing ORT interleaved
    with other runners, which the spinning threads would otherwise slow down. ``kernels`` loads ganet's custom-op
    library, which ``model.fused.onnx`` needs (raises ``KernelUnavailable`` where it cannot be built).
    """
    import onnxruntime as ort

    from ganet.system import usable_cpus

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if kernels:
        from ganet.kernels import register_kernels

        register_kernels(options)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(path: Any, threads: int | None = None, spinning: bool = True, kernels: bool = False) -> Runner:
    session = ort_session(path, threads, spinning, kernels)
    input_name = session.get_inputs()[0].name
    return lambda images: session.run(None, {input_name: np.ascontiguousarray(images)})[0]
