"""The serving side of fixed-size batches on the CPU: ONNX Runtime's IO-binding path (the one its CUDA graphs run
through, here on the CPU execution provider), the --precision/--cuda-graphs options and their refusals, and a
warm-up that records every bucket before the service turns ready.
"""
from __future__ import annotations

import numpy as np
import torch
import pytest
from fastapi.testclient import TestClient

from ganet.buckets import BucketedRunner, bucket_sizes
from ganet.preprocess import Preprocessing, image_to_uint8
from ganet.serve.app import create_app
from ganet.serve.backends import BackendError, ModelSpec, OnnxRuntimeBackend, choose_backend, load_backend
from ganet.serve.cli import build_parser
from ganet.serve.ort_graphs import IOBindingCapture
from ganet.serve.settings import ServeSettings

from test_serve import CIFAR10, export_dir, photos  # noqa: F401 (fixture)


def test_onnxruntime_io_binding_per_bucket_equals_session_run(export_dir):
    backend = OnnxRuntimeBackend(export_dir / "model.onnx", intra_op_threads=1)
    capture = IOBindingCapture(backend.session, "cpu", cuda_graph=False)
    assert capture.sample_shape == (3, 32, 32) and capture.num_classes == 10
    captured = []
    runner = BucketedRunner(lambda n: captured.append(n) or capture(n), bucket_sizes(8), capture.sample_shape)
    prep = Preprocessing.for_input_size(32)
    images = np.stack([image_to_uint8(img, prep) for img in photos().values()])
    images = np.concatenate([images, images[::-1]])  # (10, 3, 32, 32)
    for b in (5, 1, 3, 8, 2):
        np.testing.assert_allclose(runner(images[:b]), backend(images[:b]), rtol=0, atol=1e-6)
    assert captured == [8, 1, 4, 2] and capture.graph_ids == {}  # no graph ids without CUDA graphs
    tagged = IOBindingCapture(backend.session, "cpu", cuda_graph=True)  # ids from 1 (0 and -1 are reserved)
    replays = {n: tagged(n) for n in (4, 2)}
    assert tagged.graph_ids == {4: 1, 2: 2}
    np.testing.assert_allclose(replays[2](images[:2]), backend(images[:2]), rtol=0, atol=1e-6)  # CPU ignores the tag


def test_cuda_graphs_and_precisions_refuse_what_cannot_run_here(export_dir):
    with pytest.raises(BackendError, match="needs its CUDA execution provider .*onnxruntime-gpu"):
        OnnxRuntimeBackend(export_dir / "model.onnx", intra_op_threads=1, cuda_graphs=True)
    with pytest.raises(BackendError, match="--precision fp16 converts the checkpoint's model in the torch backend"):
        load_backend(export_dir, "onnxruntime", precision="fp16")
    checkpoint = export_dir.parent / "cifar.safetensors"
    assert choose_backend(checkpoint, "auto", "bf16")[0] == "torch"
    assert choose_backend(export_dir, "auto", "bf16") == ("torch", "--precision bf16: the torch backend converts the "
                                                                    "checkpoint's model")


def test_torch_backend_on_the_cpu_stays_eager_in_any_precision(export_dir):
    checkpoint = export_dir.parent / "cifar.safetensors"
    fp32, spec = load_backend(checkpoint, "torch", device="cpu", intra_op_threads=1)
    bf16, _ = load_backend(checkpoint, "torch", device="cpu", intra_op_threads=1, precision="bf16")
    assert fp32.batch_sizes == () and bf16.batch_sizes == () and bf16.precision == "bf16"  # no CUDA, no graphs
    images = np.stack([image_to_uint8(img, spec.preprocessing) for img in photos().values()])
    reference = OnnxRuntimeBackend(export_dir / "model.onnx", intra_op_threads=1)(images)
    np.testing.assert_allclose(fp32(images), reference, rtol=0, atol=2e-4)  # unchanged by the options
    low = bf16(images)
    assert low.dtype == np.float32 and 1e-3 < np.abs(low - reference).max() < 0.5 * np.abs(reference).max()


def test_options_are_flags_with_their_environment_names():
    help_text = build_parser().format_help()
    for flag in ("--cuda-graphs", "--no-cuda-graphs", "--decode {cpu,gpu}", "{fp32,int8,fp16,bf16}"):
        assert flag in help_text
    args = build_parser().parse_args(["m", "--precision", "bf16", "--no-cuda-graphs", "--decode", "gpu"])
    assert (args.precision, args.cuda_graphs, args.decode) == ("bf16", False, "gpu")
    assert ServeSettings(model="m").cuda_graphs is None and ServeSettings(model="m").decode == "cpu"


class RecordingBackend:
    """A backend with fixed batch sizes (as the CUDA graph backends have): records prepare() and each call."""

    name, device = "recording", "cpu"

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.batch_sizes, self.events = sizes, []

    def prepare(self) -> None:
        self.events.append("prepare")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.events.append(len(images))
        return np.zeros((len(images), len(CIFAR10)), np.float32)

    def close(self) -> None:
        pass


def test_warmup_records_every_bucket_before_ready(export_dir):
    backend = RecordingBackend(bucket_sizes(48))
    spec = ModelSpec("stub", tuple(CIFAR10), Preprocessing.for_input_size(32), max_batch=48)
    app = create_app(ServeSettings(model=export_dir, workers_decode=1), backends=[backend], spec=spec)
    with TestClient(app) as client:
        assert client.get("/v2/health/ready").status_code == 200
    assert backend.events[0] == "prepare"
    assert set(bucket_sizes(48)) <= set(backend.events[1:])  # 24 and 48 too, which warmup_sizes() alone skips
    assert backend.events[1:] == sorted(backend.events[1:])


def test_decode_gpu_without_a_gpu_is_a_clean_exit_2(export_dir, capsys):
    """Before the port is bound, one line, exit 2 (what this machine shows; a GPU host would start serving)."""
    from ganet.serve.cli import main

    if torch.cuda.is_available():
        pytest.skip("this checks the refusal on a host without CUDA")
    checkpoint = export_dir.parent / "cifar.safetensors"
    assert main([str(checkpoint), "--backend", "torch", "--decode", "gpu", "--port", "0"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # (after the structured log lines of the backend's loading)
    assert last == "ganet-serve: error: --decode gpu needs a CUDA GPU, and torch sees none (use --decode cpu)"
