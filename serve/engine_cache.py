"""TensorRT engines built on the serving host from the export's ONNX, kept in a cache directory (a volume).

A plan runs only on the TensorRT release and GPU compute capability it was built with, so an export made on one
machine rarely carries an engine for another. With ``--engine-cache DIR`` (``GANET_ENGINE_CACHE``) the TensorRT
backend serves the export's own ``model.plan`` when it fits this host; otherwise it builds one from ``model.onnx``
into DIR at start-up (before the port opens, so readiness waits for it) and reuses it on every later start.

Layout, one entry per key::

    DIR/<key>/model.plan      the engine (ganet.export.tensorrt.build_engine)
    DIR/<key>/engine.json     build_engine's info + key, ONNX and plan SHA-256: what the entry claims to be
    DIR/<key>.lock            held (flock) while one process checks or builds <key>
    DIR/timing-<gpu>.cache    TensorRT's timing cache, shared by the builds on this GPU and TensorRT version

    key = <GPU name>-sm<compute capability>-trt<TensorRT version>-<precision>-b<max batch>-<ONNX SHA-256[:16]>

An entry is served only when engine.json parses, names this key, this ONNX file's hash and a TensorRT release and
compute capability equal to this host's, and the plan's SHA-256 is the one recorded; anything else (a truncated
plan, a foreign or hand-copied entry) is rebuilt, and the log line says why. The build happens in a temporary
directory beside the entry, renamed into place as a whole, under an exclusive lock: two processes (containers) that
start at once on one cache build the engine once, and the second reuses it; nobody ever reads half a file.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ganet._io import atomic_write_bytes
from ganet.export.manifest import Artifact, Manifest, sha256_file
from ganet.export.tensorrt import build_engine, current_engine_environment, engine_mismatches

__all__ = ["EngineCacheError", "CachedEngine", "cache_key", "ensure_engine", "engine_for_host"]

log = logging.getLogger("ganet.serve")

PLAN_FILE, RECORD_FILE = "model.plan", "engine.json"


class EngineCacheError(RuntimeError):
    """The cache cannot give an engine for this export (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class CachedEngine:
    plan: Path  # the engine to deserialise
    info: dict[str, Any]  # build_engine's info (what TensorRTRunner checks before loading)
    outcome: str  # "export" (the export's own plan fits), "reused" or "built"
    key: str | None  # None for the export's own plan
    reason: str  # why it was built, or why this one was taken


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "unknown"


def _gpu_key(env: dict[str, Any]) -> str:
    return f"{_slug(env['gpu_name'])}-sm{env['compute_capability']}-trt{_slug(env['tensorrt_version'])}"


def cache_key(env: dict[str, Any], onnx_sha256: str, precision: str, max_batch: int) -> str:
    """The directory name of the entry for this GPU model, compute capability, TensorRT version, precision, max
    batch and ONNX file. Precision and max batch are part of the build, so they are part of the key too."""
    return f"{_gpu_key(env)}-{precision}-b{max_batch}-{onnx_sha256[:16]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``: released when the process exits however it exits (no stale locks)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("engine cache: waiting for another process that holds %s", path.name,
                     extra={"event": "engine_cache", "outcome": "waiting", "lock": str(path)})
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _problem(entry: Path, key: str, onnx_sha256: str, env: dict[str, Any]) -> str | None:
    """Why the entry cannot be served (None: it can)."""
    if not entry.is_dir():
        return "no cached engine"
    try:
        record = json.loads((entry / RECORD_FILE).read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"corrupt cached engine: {RECORD_FILE} unreadable ({type(e).__name__}: {e})"
    if record.get("key") != key or record.get("onnx_sha256") != onnx_sha256:
        return f"foreign cached engine: {RECORD_FILE} describes {record.get('key')!r}, not {key!r}"
    mismatches = engine_mismatches(record, env)
    if mismatches:
        return f"foreign cached engine: {'; '.join(mismatches)}"
    plan = entry / PLAN_FILE
    if not plan.is_file():
        return f"corrupt cached engine: no {PLAN_FILE}"
    if plan.stat().st_size != record.get("plan_bytes") or sha256_file(plan) != record.get("plan_sha256"):
        return f"corrupt cached engine: {PLAN_FILE}'s size or SHA-256 differs from {RECORD_FILE}'s"
    return None


def _install(staging: Path, entry: Path) -> None:
    """Rename the finished staging directory over ``entry`` (whole: a reader sees the old entry or the new one)."""
    old = None
    if entry.exists():
        old = entry.with_name(f".{entry.name}.old.{os.getpid()}")
        os.replace(entry, old)
    os.replace(staging, entry)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_engine(manifest: Manifest, cache_dir: str | os.PathLike, *, precision: str = "fp32",
                  max_batch: int | None = None, env: dict[str, Any] | None = None) -> CachedEngine:
    """The cached engine for the export's ``model.onnx`` on this host, built first if there is none that is sound.

    ``max_batch`` defaults to the export's. ``env`` is ``current_engine_environment()`` (given by callers that have
    it already). Raises EngineCacheError when the ONNX file is not the one the manifest hashed.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16 for a TensorRT engine, got {precision!r}")
    onnx = manifest.artifact("onnx")
    onnx_path = manifest.path(onnx)
    recorded = manifest.files.get(onnx.file)
    onnx_sha256 = sha256_file(onnx_path)
    if recorded is None or recorded.sha256 != onnx_sha256:
        raise EngineCacheError(f"{onnx_path}: its SHA-256 {onnx_sha256[:16]}... is not the one the manifest records "
                               f"({recorded.sha256[:16] + '...' if recorded else 'none'}); re-export the model "
                               f"rather than build an engine from a file that changed")
    env = current_engine_environment() if env is None else env
    max_batch = manifest.max_batch if max_batch is None else max_batch
    key = cache_key(env, onnx_sha256, precision, max_batch)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / key
    with _locked(cache_dir / f"{key}.lock"):
        problem = _problem(entry, key, onnx_sha256, env)
        if problem is None:
            info = json.loads((entry / RECORD_FILE).read_text(encoding="utf-8"))["engine"]
            log.info("engine cache: reused %s", key, extra={"event": "engine_cache", "outcome": "reused",
                                                            "key": key, "path": str(entry)})
            return CachedEngine(entry / PLAN_FILE, info, "reused", key, "a sound engine for this host is cached")
        for leftover in cache_dir.glob(f".{key}.*"):  # a build killed half-way; we hold the lock, so it is dead
            shutil.rmtree(leftover, ignore_errors=True)
        log.info("engine cache: building %s (%s)", key, problem,
                 extra={"event": "engine_cache", "outcome": "building", "key": key, "reason": problem})
        start = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            info = build_engine(onnx_path, staging / PLAN_FILE, max_batch=max_batch,
                                opt_batch=min(max_batch, max(1, max_batch // 2)), fp16=precision == "fp16",
                                timing_cache=cache_dir / f"timing-{_gpu_key(env)}.cache")
            plan = staging / PLAN_FILE
            record = {"key": key, "onnx_sha256": onnx_sha256, "plan_sha256": sha256_file(plan),
                      "plan_bytes": plan.stat().st_size, "tensorrt_version": info["tensorrt_version"],
                      "compute_capability": info["compute_capability"], "engine": info,
                      "export_model": manifest.model}
            atomic_write_bytes(staging / RECORD_FILE, json.dumps(record, indent=1).encode())
            os.chmod(staging, 0o755)  # mkdtemp makes it private; another uid may share the volume
            _install(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        seconds = time.monotonic() - start
        log.info("engine cache: built %s in %.1f s (%s)", key, seconds, problem,
                 extra={"event": "engine_cache", "outcome": "built", "key": key, "reason": problem,
                        "seconds": round(seconds, 3), "path": str(entry)})
        return CachedEngine(entry / PLAN_FILE, info, "built", key, problem)


def engine_for_host(manifest: Manifest, cache_dir: str | os.PathLike) -> CachedEngine:
    """The export's own engine when it fits this host's TensorRT and GPU, else ``ensure_engine``'s, at the precision
    the export's engine was built in (fp32 when it has none)."""
    env = current_engine_environment()
    own: Artifact | None = manifest.artifact("tensorrt")
    if own is not None and not engine_mismatches(own.info, env):
        log.info("engine cache: the export's own engine fits this host", extra={
            "event": "engine_cache", "outcome": "export", "path": str(manifest.path(own))})
        return CachedEngine(manifest.path(own), own.info, "export", None, "the export's engine fits this host")
    precision = own.precision if own is not None and own.precision in ("fp32", "fp16") else "fp32"
    return ensure_engine(manifest, cache_dir, precision=precision, env=env)
