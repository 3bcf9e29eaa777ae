"""ganet-serve --frontends: the model owner and the front ends' RemoteBatcher over real shared memory and real
sockets (in this process, a stub backend whose answer identifies the image), then real processes killed for real:
a front end SIGKILLed is restarted, the supervisor SIGKILLed leaves no process and no /dev/shm segment, and
--reuse-port lets two instances share a port. test_serve_http.py runs the HTTP suite (tritonclient, 16 concurrent
clients, SIGTERM drain) against this mode too.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from ganet.preprocess import Preprocessing
from ganet.serve import local
from ganet.serve.backends import ModelSpec
from ganet.serve.batcher import DeadlineExceededError, QueueFullError
from ganet.serve.errors import ServeError
from ganet.serve.local import free_port, wait_ready
from ganet.serve.owner import ModelOwner
from ganet.serve.remote_batcher import RemoteBatcher
from ganet.serve.settings import ServeSettings
from ganet.serve.shm_ring import ImageRing, slots_per_frontend
from test_serve import encode, export_dir, photos  # noqa: F401  (export_dir: fixture)
from test_serve_http import descendants, gone

SPEC = ModelSpec("stub", ("r", "g", "b"), Preprocessing.for_input_size(8), max_batch=4)


class ChannelMeans:
    """A backend whose logits are each image's channel means, so an answer shows which image it belongs to."""

    name, device = "stub", "cpu"

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.seconds, self.fail, self.batches = seconds, fail, []

    def __call__(self, images: np.ndarray) -> np.ndarray:  # (B, 3, 8, 8) uint8 -> (B, 3)
        self.batches.append(len(images))
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("the stub backend failed")
        return images.reshape(len(images), 3, -1).mean(-1).astype(np.float32)

    def close(self) -> None:
        pass


def means(image: np.ndarray) -> np.ndarray:
    return image.reshape(3, -1).mean(-1).astype(np.float32)


@contextmanager
def owner_of(frontends: int, backend: ChannelMeans, **overrides):
    """A warmed-up-on-demand ModelOwner with its ring; yields (owner, ring, sockets of the front ends, slots)."""
    settings = ServeSettings(model=Path("unused"), max_delay_us=overrides.pop("max_delay_us", 20_000), **overrides)
    slots = slots_per_frontend(settings.queue_size, frontends, SPEC.max_batch)
    ring = ImageRing.create(frontends * slots, SPEC.input_shape)
    owner = ModelOwner(settings, [backend], SPEC, ring, frontends, slots)
    sockets = [owner.connect(i) for i in range(frontends)]
    try:
        yield owner, ring, sockets, slots
    finally:
        owner.close(2)
        ring.close()
    assert not Path("/dev/shm", ring.name).exists()


async def frontend(sock, ring: ImageRing, index: int, slots: int) -> tuple[RemoteBatcher, asyncio.Event, list]:
    ready, lost = asyncio.Event(), []
    batcher = await RemoteBatcher.connect(sock, ring, index * slots, slots,
                                          lambda on: ready.set() if on else ready.clear(), lambda: lost.append(1))
    return batcher, ready, lost


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, *SPEC.input_shape), dtype=np.uint8))


def test_ring_views_are_shared_and_the_segment_is_unlinked():
    ring = ImageRing.create(3, (3, 4, 4))
    other = ImageRing.attach(ring.name, 3, (3, 4, 4))
    ring.view(2)[:] = 7
    assert other.view(2).sum() == 7 * 48 and other.view(1).sum() == 0
    with pytest.raises(ValueError, match="not 4 slots"):
        ImageRing.attach(ring.name, 4, (3, 4, 4))
    other.close()
    assert Path("/dev/shm", ring.name).exists()  # only the creator unlinks
    ring.close()
    assert not Path("/dev/shm", ring.name).exists()


def test_a_ring_larger_than_the_free_shared_memory_is_refused(monkeypatch):
    from types import SimpleNamespace

    from ganet.serve.shm_ring import ShmSpaceError

    before = set(os.listdir("/dev/shm"))
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=16, f_frsize=4096))  # 64 KiB free
    with pytest.raises(ShmSpaceError, match="--shm-size"):
        ImageRing.create(4, (3, 224, 224))
    assert set(os.listdir("/dev/shm")) == before  # refused before anything was created


def test_every_answer_is_its_own_images_and_images_are_batched():
    backend = ChannelMeans()
    with owner_of(2, backend) as (owner, ring, sockets, slots):
        async def main():
            fronts = [await frontend(s, ring, i, slots) for i, s in enumerate(sockets)]
            owner.warm_up()
            for batcher, _, _ in fronts:
                batcher.started()
            for _, ready, _ in fronts:
                await asyncio.wait_for(ready.wait(), 10)
            backend.batches.clear()
            pictures = images(24)
            results = await asyncio.gather(*(fronts[i % 2][0].submit(im, 10.0) for i, im in enumerate(pictures)))
            for image, result in zip(pictures, results):
                np.testing.assert_allclose(result.logits, means(image), rtol=0, atol=1e-4)
            assert max(r.batch_size for r in results) > 1 and sum(backend.batches) == 24
            assert all(b.depth == 0 for b, _, _ in fronts)  # every slot answered, so free again
        asyncio.run(main())


def test_ready_only_after_the_warm_up_and_every_front_end():
    async def phases(owner, ring, sockets, slots, warm_first: bool):
        fronts = [await frontend(s, ring, i, slots) for i, s in enumerate(sockets)]
        warm = lambda: asyncio.get_running_loop().run_in_executor(None, owner.warm_up)  # noqa: E731
        if warm_first:
            await warm()
        for batcher, _, _ in fronts:  # one by one: nobody is ready until the last has started (and the warm-up)
            await asyncio.sleep(0.2)
            assert not owner.ready and not any(ready.is_set() for _, ready, _ in fronts)
            batcher.started()
        if not warm_first:
            await asyncio.sleep(0.2)
            assert not owner.ready and not any(ready.is_set() for _, ready, _ in fronts)
            await warm()
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for _, ready, _ in fronts)), 10)
        assert owner.ready

    for warm_first in (True, False):
        with owner_of(3, ChannelMeans()) as (owner, ring, sockets, slots):
            asyncio.run(phases(owner, ring, sockets, slots, warm_first))


def test_full_queue_and_full_slots_are_queue_full_errors():
    backend = ChannelMeans(seconds=0.3)
    # queue of 2 over 2 front ends, batches of 1: 1 + 2 per front end slots; one image runs, two wait, one is refused
    with owner_of(2, backend, queue_size=2, max_delay_us=0, warmup=False) as (owner, ring, sockets, slots):
        assert slots == 1 + SPEC.max_batch
        owner.warm_up()
        owner.state.batcher.max_batch = 1

        async def main():
            fronts = [await frontend(s, ring, i, slots) for i, s in enumerate(sockets)]
            first = asyncio.ensure_future(fronts[0][0].submit(images(1)[0], 10.0))
            await asyncio.sleep(0.2)  # running
            rest = [asyncio.ensure_future(fronts[i % 2][0].submit(im, 10.0)) for i, im in enumerate(images(3, 1))]
            done = await asyncio.gather(first, *rest, return_exceptions=True)
            refused = [r for r in done if isinstance(r, QueueFullError)]
            assert len(refused) == 1 and "images already wait for inference" in str(refused[0])  # the owner's queue
            assert sum(not isinstance(r, BaseException) for r in done) == 3
            # the front end's own slots: all in use -> refused before anything is sent
            many = [asyncio.ensure_future(fronts[1][0].submit(im, 10.0)) for im in images(slots + 1, 2)]
            await asyncio.sleep(0)
            outcomes = await asyncio.gather(*many, return_exceptions=True)
            assert any(isinstance(r, QueueFullError) and f"all {slots} image slots" in str(r) for r in outcomes)
        asyncio.run(main())


def test_deadline_is_exceeded_and_expired_images_never_reach_the_backend():
    backend = ChannelMeans(seconds=0.6)
    with owner_of(1, backend, max_delay_us=0, warmup=False) as (owner, ring, sockets, slots):
        owner.warm_up()
        owner.state.batcher.max_batch = 1
        backend.batches.clear()

        async def main():
            batcher, _, _ = await frontend(sockets[0], ring, 0, slots)
            outcomes = await asyncio.gather(*(batcher.submit(im, 0.3) for im in images(3)), return_exceptions=True)
            assert all(isinstance(r, DeadlineExceededError) for r in outcomes), outcomes
            await wait_until(lambda: batcher.depth == 0)  # the owner answered (ran or dropped) every slot
            assert backend.batches == [1], "images whose deadline passed in the queue were run"
        asyncio.run(main())


def test_backend_failure_is_an_error_and_a_lost_owner_is_503():
    backend = ChannelMeans(fail=True)
    with owner_of(1, backend, warmup=False) as (owner, ring, sockets, slots):
        owner.warm_up()

        async def main():
            batcher, _, lost = await frontend(sockets[0], ring, 0, slots)
            with pytest.raises(RuntimeError, match="the stub backend failed"):
                await batcher.submit(images(1)[0], 5.0)
            backend.seconds = 1.0
            pending = asyncio.ensure_future(batcher.submit(images(1)[0], 5.0))
            await asyncio.sleep(0.2)
            owner._connections[0].close()  # the owner's end goes away (the supervisor died)
            with pytest.raises(ServeError) as e:
                await pending
            assert e.value.status == 503 and lost == [1]
            with pytest.raises(ServeError):
                await batcher.submit(images(1)[0], 5.0)
        asyncio.run(main())


# ------------------------------------------------------------------------------------------- real processes

def frontends_of(pid: int) -> set[int]:
    out = set()
    for child in descendants(pid):
        try:
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text(errors="replace"):
                out.add(child)
        except OSError:
            pass
    return out


def events(log: Path, event: str) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()
            if line.startswith("{") and f'"event": "{event}"' in line]


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def classify(url: str, body: bytes) -> int:
    """One POST on a new connection (so that whichever process accepts now serves it)."""
    return httpx.post(f"{url}/classify", content=body, headers={"Content-Type": "image/png"}, timeout=30).status_code


@pytest.mark.slow
def test_a_killed_front_end_is_restarted_and_a_killed_supervisor_leaves_nothing(export_dir, tmp_path):  # noqa: F811
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    proc = launch(export_dir, port, log, "--frontends", "2")
    try:
        wait_ready(f"{url}/v2/health/ready", proc, timeout_s=60, interval_s=0.1)
        first, second = sorted(frontends_of(proc.pid))
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(events(log, "frontend_started")) == 3, "the replacement front end")
        (replacement,) = frontends_of(proc.pid) - {second}
        body = encode(photos()["chelsea"], "PNG")
        for only, paused in ((replacement, second), (second, replacement)):  # each serves 8 alone: a stopped
            os.kill(paused, signal.SIGSTOP)                                   # process accepts nothing
            try:
                wait_for(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200, "readiness")
                assert [classify(url, body) for _ in range(8)] == [200] * 8
            finally:
                os.kill(paused, signal.SIGCONT)
        metrics = httpx.get(f"{url}/metrics").text
        sample = lambda name: sum(float(line.split()[-1]) for line in metrics.splitlines()  # noqa: E731
                                  if line.startswith(name + " ") or line.startswith(name + "{"))
        assert sample('ganet_requests_total{route="/classify",status="200"}') == 16  # 8 + 8 from two processes
        assert sample("ganet_images_total") == 16 and sample("ganet_queue_depth") == 0  # the owner's
        survivors = descendants(proc.pid)
        shm = Path("/dev/shm", events(log, "frontends")[0]["shm"])
        assert shm.exists()
        proc.kill()  # the supervisor, SIGKILL: no chance to clean up
        proc.wait(10)
        assert gone(survivors), "processes outlived the supervisor"
        wait_for(lambda: not shm.exists(), "the resource tracker to unlink the segment", timeout_s=10)
    finally:
        local.stop(proc)
        shutil.rmtree(events(log, "frontends")[0]["metrics_dir"], ignore_errors=True)  # what SIGKILL leaves
    (restart,) = events(log, "frontend_restart")
    assert restart["exitcode"] == -signal.SIGKILL and restart["pid"] == first


def launch(export: Path, port: int, log: Path, *args: str) -> subprocess.Popen:
    with log.open("wb") as out:  # a file, not a pipe: read while the server runs
        return subprocess.Popen(["ganet-serve", str(export), "--port", str(port), *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "GANET_INTRA_OP_THREADS": "1"})


@pytest.mark.slow
def test_reuse_port_lets_instances_share_a_port(export_dir, tmp_path):  # noqa: F811
    port = free_port()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    instances = [launch(export_dir, port, log, "--reuse-port") for log in logs]
    try:
        for proc, log in zip(instances, logs):
            wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, timeout_s=60, interval_s=0.1)
            wait_for(lambda: proc.poll() is None and '"event": "ready"' in log.read_text(), f"{log.name} ready")
        taken = subprocess.run(["ganet-serve", str(export_dir), "--port", str(port), "--frontends", "1"],
                               capture_output=True, text=True, timeout=60)  # without --reuse-port: refused
        assert taken.returncode == 2, taken.stderr[-2000:]
        assert taken.stderr.splitlines()[-1].startswith(f"ganet-serve: error: cannot listen on 127.0.0.1:{port}")
        body = encode(photos()["coffee"], "PNG")
        for _ in range(200):  # each request on a new connection: the kernel spreads them over both instances
            r = httpx.post(f"http://127.0.0.1:{port}/classify", content=body, headers={"Content-Type": "image/png"})
            assert r.status_code == 200
            if all('"path": "/classify"' in log.read_text() for log in logs):
                break
        else:
            raise AssertionError("one instance never served a request")
    finally:
        for proc in instances:
            local.stop(proc, grace_s=15)
    assert all(proc.returncode in (0, -signal.SIGTERM) for proc in instances)
