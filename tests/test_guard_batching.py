"""The dynamic batcher never hands the model more than max_batch images (a TensorRT engine built for the export's
maximum would fail on more), keeps each answer with its image, and fails the way the service promises: a full
queue, a passed deadline, a failing backend.

The backend is the real ONNX Runtime one on the pixel probe (tests/probe_export.py), wrapped to record the batch
sizes it is called with; its answers are its input pixels, so every image's answer is checked exactly.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ganet.serve.app import create_app
from ganet.serve.backends import OnnxRuntimeBackend, load_backend
from ganet.serve.batcher import BatchResult, DeadlineExceededError, DynamicBatcher, QueueFullError
from ganet.serve.settings import ServeSettings
from probe_export import NAME, SIZE, make_probe_export, pixels_of


class Recording:
    """A backend wrapped to record the batch size of every call (and to take ``seconds`` longer, or fail)."""

    def __init__(self, backend, seconds: float = 0.0, error: Exception | None = None) -> None:
        self.backend, self.seconds, self.error = backend, seconds, error
        self.name, self.device, self.calls = backend.name, backend.device, []
        self.lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(len(images))
        time.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        return self.backend(images)

    def close(self) -> None:
        self.backend.close()


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return make_probe_export(tmp_path_factory.mktemp("batching") / "probe", max_batch=8)


def images(n: int) -> np.ndarray:
    """n distinct (3, S, S) uint8 images: image i is filled with i + 1, its first pixel 200 - i."""
    batch = np.repeat(np.arange(1, n + 1, dtype=np.uint8), 3 * SIZE * SIZE).reshape(n, 3, SIZE, SIZE)
    batch[:, 0, 0, 0] = 200 - np.arange(n)
    return batch


def infer_uint8(client: TestClient, batch: np.ndarray) -> np.ndarray:
    r = client.post(f"/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "image", "shape": list(batch.shape), "datatype": "UINT8", "data": batch.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    return pixels_of(r.json()["outputs"][0]["data"])


@pytest.mark.parametrize("max_batch", [1, 3, 4])
def test_batches_never_exceed_max_batch_and_answers_stay_in_order(probe_dir, max_batch):
    backend, spec = load_backend(probe_dir, "onnxruntime", intra_op_threads=1, max_batch=max_batch)
    recording = Recording(backend)
    # A long delay, so that every batch fills up to the cap if the cap lets it: 10 images come in one request.
    settings = ServeSettings(model=probe_dir, warmup=False, workers_decode=1, max_delay_us=300_000)
    with TestClient(create_app(settings, backends=[recording], spec=spec)) as client:
        sent = images(10)
        np.testing.assert_array_equal(infer_uint8(client, sent), sent)
    full, rest = divmod(10, max_batch)
    assert recording.calls == [max_batch] * full + ([rest] if rest else []), recording.calls


def test_two_instances_never_exceed_max_batch(probe_dir):
    recordings = [Recording(load_backend(probe_dir, "onnxruntime", intra_op_threads=1)[0], seconds=0.02)
                  for _ in range(2)]
    spec = load_backend(probe_dir, "onnxruntime", intra_op_threads=1, max_batch=3)[1]
    settings = ServeSettings(model=probe_dir, warmup=False, workers_decode=1, max_delay_us=50_000)
    with TestClient(create_app(settings, backends=recordings, spec=spec)) as client:
        sent = images(20)
        np.testing.assert_array_equal(infer_uint8(client, sent), sent)
    calls = recordings[0].calls + recordings[1].calls
    assert sum(calls) == 20 and max(calls) <= 3, calls


def test_the_cpu_default_cap_reaches_the_backend(probe_dir, monkeypatch):
    """Loaded the way ganet-serve loads it (no backend injected): ONNX Runtime on the CPU is called with at most 4
    images although the export allows 8; --max-batch 8 lets 8 through."""
    calls = []
    run = OnnxRuntimeBackend.__call__

    def recording(self, batch):
        calls.append(len(batch))
        return run(self, batch)

    monkeypatch.setattr(OnnxRuntimeBackend, "__call__", recording)
    for max_batch, expected in ((None, [4, 4, 2]), (8, [8, 2])):
        settings = ServeSettings(model=probe_dir, intra_op_threads=1, instances=1, workers_decode=1,
                                 max_delay_us=300_000, max_batch=max_batch)
        with TestClient(create_app(settings)) as client:
            warmup = list(calls)
            assert max(warmup) == (max_batch or 4)  # warmed up at every size it can run, none larger
            calls.clear()
            sent = images(10)
            np.testing.assert_array_equal(infer_uint8(client, sent), sent)
            assert calls == expected, (max_batch, calls)
            calls.clear()


# --- the batcher on its own -------------------------------------------------------------------------------------

async def submit_all(batcher: DynamicBatcher, batch: np.ndarray, timeout_s: float = 10.0) -> list:
    return await asyncio.gather(*(batcher.submit(image, timeout_s) for image in batch), return_exceptions=True)


def test_results_carry_their_batch_and_metrics_hear_of_each_batch(probe_dir):
    recording = Recording(load_backend(probe_dir, "onnxruntime", intra_op_threads=1)[0])
    seen = []
    batcher = DynamicBatcher([recording], max_batch=4, max_delay_us=300_000, queue_size=16,
                             on_batch=lambda n, seconds, queued: seen.append((n, seconds, list(queued))))
    try:
        sent = images(6)
        results = asyncio.run(submit_all(batcher, sent))
    finally:
        batcher.close()
    assert all(isinstance(r, BatchResult) for r in results), results
    np.testing.assert_array_equal(pixels_of(np.stack([r.logits for r in results])), sent)
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2] and recording.calls == [4, 2]
    assert [n for n, _, _ in seen] == [4, 2] and all(len(q) == n for n, _, q in seen)
    assert all(s > 0 for _, s, _ in seen) and all(0 <= q < 5 for _, _, qs in seen for q in qs)
    assert all(r.inference_s > 0 and r.queue_s >= 0 for r in results)
    assert not any(t.is_alive() for t in batcher._threads)  # close() stopped the worker
    with pytest.raises(dataclasses.FrozenInstanceError):  # one result object per image, never edited in place
        results[0].batch_size = 1


def test_a_full_queue_refuses_at_once(probe_dir):
    recording = Recording(load_backend(probe_dir, "onnxruntime", intra_op_threads=1)[0], seconds=0.3)
    batcher = DynamicBatcher([recording], max_batch=1, max_delay_us=0, queue_size=2)
    try:
        results = asyncio.run(submit_all(batcher, images(6)))
    finally:
        batcher.close()
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert refused and all("2 images already wait" in str(r) for r in refused), results
    answered = [r for r in results if isinstance(r, BatchResult)]
    assert len(answered) + len(refused) == 6 and len(answered) == sum(recording.calls) >= 2


def test_a_passed_deadline_is_an_error_and_its_image_never_runs(probe_dir):
    recording = Recording(load_backend(probe_dir, "onnxruntime", intra_op_threads=1)[0], seconds=0.3)
    batcher = DynamicBatcher([recording], max_batch=1, max_delay_us=0, queue_size=8)
    try:
        results = asyncio.run(submit_all(batcher, images(3), timeout_s=0.15))
        time.sleep(0.7)  # the worker finishes the first and drops the two expired ones
    finally:
        batcher.close()
    assert all(isinstance(r, DeadlineExceededError) for r in results), results
    assert "150 ms" in str(results[0])
    # The images still queued when their deadline passed were never run (on a stalled host, not even the first).
    assert recording.calls in ([1], []), recording.calls


def test_a_failing_backend_fails_every_image_of_its_batch(probe_dir, caplog):
    boom = RuntimeError("engine exploded")
    recording = Recording(load_backend(probe_dir, "onnxruntime", intra_op_threads=1)[0], error=boom)
    batcher = DynamicBatcher([recording], max_batch=4, max_delay_us=300_000, queue_size=8)
    try:
        with caplog.at_level(logging.ERROR, logger="ganet.serve"):
            results = asyncio.run(submit_all(batcher, images(3)))
        assert results == [boom] * 3 and recording.calls == [3]
        logged = [r for r in caplog.records if getattr(r, "event", None) == "inference_error"]
        assert len(logged) == 1 and logged[0].name == "ganet.serve" and logged[0].exc_info[1] is boom
        recording.error = None
        (after,) = asyncio.run(submit_all(batcher, images(1)))  # the worker survived the failure
        assert isinstance(after, BatchResult) and after.batch_size == 1
    finally:
        batcher.close()


def test_put_answers_through_on_done_and_refuses_like_submit(probe_dir):
    """``put`` (the model owner's path under --frontends): each image's answer or error reaches its ``on_done`` once,
    a passed deadline is an error there, and a full queue raises at once with the queue's size in the message."""
    recording = Recording(load_backend(probe_dir, "onnxruntime", intra_op_threads=1)[0], seconds=0.2)
    batcher = DynamicBatcher([recording], max_batch=2, max_delay_us=0, queue_size=2)
    answers: dict[int, list] = {i: [] for i in range(5)}
    done = threading.Event()

    def on_done_of(i: int):
        def on_done(result, error) -> None:
            answers[i].append((result, error))
            if sum(map(len, answers.values())) == 4:
                done.set()
        return on_done

    sent = images(5)
    try:
        batcher.put(sent[0], 5.0, on_done_of(0))  # taken by the worker at once (0.2 s of inference)
        time.sleep(0.05)
        batcher.put(sent[1], 5.0, on_done_of(1))
        batcher.put(sent[2], 0.01, on_done_of(2))  # its deadline passes while the first runs
        with pytest.raises(QueueFullError) as full:
            batcher.put(sent[3], 5.0, on_done_of(3))
        assert str(full.value) == "2 images already wait for inference" and batcher.depth == 2
        assert done.wait(0.0) is False
        time.sleep(0.5)
        batcher.put(sent[4], 5.0, on_done_of(4))
        assert done.wait(5.0) and batcher.depth == 0
    finally:
        batcher.close()
    assert answers[3] == []
    for i in (0, 1, 4):
        ((result, error),) = answers[i]
        assert error is None and isinstance(result, BatchResult)
        np.testing.assert_array_equal(pixels_of(result.logits[None]), sent[i:i + 1])
    ((result, error),) = answers[2]
    assert result is None and isinstance(error, DeadlineExceededError)
    assert recording.calls == [1, 1, 1]  # the expired image never ran


def test_the_first_image_waits_up_to_max_delay_for_company(probe_dir):
    """With max_delay 400 ms, an image arriving 200 ms after the first joins its batch; with 0, it does not."""
    for delay_us, expected in ((400_000, [2]), (0, [1, 1])):
        recording = Recording(load_backend(probe_dir, "onnxruntime", intra_op_threads=1)[0])
        batcher = DynamicBatcher([recording], max_batch=4, max_delay_us=delay_us, queue_size=8)
        assert batcher.max_delay_s == delay_us / 1e6

        async def staggered():
            first = asyncio.ensure_future(batcher.submit(images(1)[0], 5.0))
            await asyncio.sleep(0.2)
            return await asyncio.gather(first, batcher.submit(images(2)[1], 5.0))

        try:
            results = asyncio.run(staggered())
        finally:
            batcher.close()
        assert recording.calls == expected, (delay_us, recording.calls)
        assert [r.batch_size for r in results] == ([2, 2] if expected == [2] else [1, 1])


def test_deadline_message_and_worker_threads():
    """The 504's message gives the deadline in milliseconds; the workers are daemon threads named for py-spy's
    per-thread CPU split (benchmarks/bench_serve.py)."""
    gate = threading.Event()

    def stalled(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return np.zeros((len(batch), 4), np.float32)

    batcher = DynamicBatcher([stalled, stalled], max_batch=1, max_delay_us=0, queue_size=4)
    try:
        assert [t.name for t in batcher._threads] == ["ganet-infer-0", "ganet-infer-1"]
        assert all(t.daemon for t in batcher._threads)
        with pytest.raises(DeadlineExceededError) as late:
            asyncio.run(batcher.submit(images(1)[0], 0.25))
        assert str(late.value) == "no result within 250 ms"
    finally:
        gate.set()
        batcher.close()
