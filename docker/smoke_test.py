"""End-to-end check of a built ganet-serve image: run it on an export, classify a photograph, stop it.

    python3 docker/smoke_test.py EXPORT_DIR --image ganet-serve                        # Docker
    python3 docker/smoke_test.py EXPORT_DIR --engine "podman --runtime runc" --host-network \\
        --run-args "--no-healthcheck --ulimit nofile=8192:8192 --ulimit nproc=8192:8192"   # podman on our CI VM

Checks, in order (any failure prints the container's log and exits 1):
1. the container (export mounted read-only at /models/model) turns ready: GET /v2/health/ready -> 200;
2. the image's own HEALTHCHECK command, run in the container, exits 0; the service's uid is not 0;
3. POST /classify?top_k=5 with a real photograph (scikit-learn's china.jpg unless --photo) as multipart `file`
   -> 200 with 5 predictions, scores descending; where ganet and onnxruntime import on this host, the same top-5
   classes and softmax scores (within 1e-4) as model.onnx run here on the same decoded image;
4. the stop signal (SIGTERM, from the image's STOPSIGNAL) -> exit code 0 within --grace seconds.

Prints one JSON line of timings, and which ONNX graph the service ran on the CPU according to its log ("fused":
the image's prebuilt Group Attention kernel loaded; "standard": it did not, and the log says why), and which resize
its decoder used ("native": the same prebuilt library; "pillow": it did not load). Needs only the Python standard library unless a reference check runs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

__all__ = ["SmokeFailure", "run_smoke_test", "main"]


class SmokeFailure(RuntimeError):
    """One of the checks failed; the message says which and what was seen."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise SmokeFailure(f"`{shlex.join(cmd)}` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return p


def _get(url: str, timeout: float = 2) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post_multipart(url: str, filename: str, data: bytes, content_type: str) -> tuple[int, bytes]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _default_photo() -> bytes:
    """scikit-learn's china.jpg (640x427 JPEG, ships with the package) as encoded bytes."""
    try:
        import sklearn.datasets
    except ImportError:
        raise SmokeFailure("no --photo given and scikit-learn (whose china.jpg is the default) is not installed") \
            from None
    return (Path(sklearn.datasets.__file__).parent / "images" / "china.jpg").read_bytes()


def _healthcheck_test(engine: list[str], image: str) -> list[str]:
    """The image's HEALTHCHECK test (["CMD", ...] or ["CMD-SHELL", "..."]), from Docker's or podman's inspect."""
    info = json.loads(_run([*engine, "image", "inspect", image]).stdout)[0]
    check = (info.get("Config") or {}).get("Healthcheck") or info.get("Healthcheck") or {}  # Docker, podman
    test = check.get("Test") or []
    if not test or test[0] not in ("CMD", "CMD-SHELL"):
        raise SmokeFailure(f"image {image} has no HEALTHCHECK command (inspect shows {check!r}); build it with "
                           "Docker or `podman build --format docker`")
    return test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]


def _reference_top5(export: Path, photo: bytes) -> tuple[list[int], list[float]] | None:
    """Top-5 indices and softmax scores of model.onnx on this host, or None where ganet/onnxruntime are absent."""
    try:
        import numpy as np
        import onnxruntime as ort

        from ganet.export.manifest import load_manifest
        from ganet.serve.images import decode_image
        from ganet.serve.routes_classify import softmax  # the service's own scores
    except ImportError:
        return None
    manifest = load_manifest(export)
    image = decode_image(photo, manifest.preprocessing, 50_000_000)[None]
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = softmax(session.run(None, {session.get_inputs()[0].name: image})[0][0])
    order = np.argsort(-probs, kind="stable")[:5]
    return [int(i) for i in order], [float(probs[i]) for i in order]


def run_smoke_test(export: Path, image: str, engine: list[str], run_args: list[str], host_network: bool = False,
                   photo: bytes | None = None, ready_timeout: float = 90,
                   grace: float = 20) -> dict[str, float | str | None]:
    """The four checks of the module docstring; returns timings in seconds and the ``graph`` the service ran
    (None: no such log line, e.g. a GPU backend). Raises SmokeFailure."""
    export = Path(export).resolve()
    if not (export / "manifest.json").is_file():
        raise SmokeFailure(f"{export} is not a ganet export: no manifest.json (make one with ganet-export)")
    photo = photo if photo is not None else _default_photo()
    port = _free_port()
    name = f"ganet-smoke-{uuid.uuid4().hex[:10]}"
    network = ["--network", "host", "-e", f"GANET_PORT={port}"] if host_network else ["-p", f"127.0.0.1:{port}:8000"]
    base = f"http://127.0.0.1:{port}"
    timings: dict[str, float | str | None] = {}
    _run([*engine, "run", "-d", "--name", name, *network, "-v", f"{export}:/models/model:ro", *run_args, image],
         timeout=120)
    try:
        try:
            # 1. ready
            start = time.monotonic()
            while True:
                state = _run([*engine, "inspect", "--format", "{{.State.Running}}", name]).stdout.strip()
                if state != "true":
                    raise SmokeFailure(f"the container stopped before turning ready (running={state})")
                try:
                    status, _ = _get(f"{base}/v2/health/ready")
                except OSError:
                    status = 0
                if status == 200:
                    break
                if time.monotonic() - start > ready_timeout:
                    raise SmokeFailure(f"not ready after {ready_timeout:g} s (last /v2/health/ready status {status})")
                time.sleep(0.25)
            timings["ready_s"] = time.monotonic() - start

            # 2. the image's HEALTHCHECK, exactly as the engine would run it; and not as root
            check = _run([*engine, "exec", name, *_healthcheck_test(engine, image)], check=False)
            if check.returncode != 0:
                raise SmokeFailure(f"HEALTHCHECK exited {check.returncode}: {(check.stderr or check.stdout)[-500:]}")
            uid = _run([*engine, "exec", name, "id", "-u"]).stdout.strip()
            if uid == "0":
                raise SmokeFailure("the service runs as root (uid 0); the image should set a non-root USER")

            # 3. a photograph through /classify
            start = time.monotonic()
            status, body = _post_multipart(f"{base}/classify?top_k=5", "china.jpg", photo, "image/jpeg")
            timings["classify_s"] = time.monotonic() - start
            if status != 200:
                raise SmokeFailure(f"POST /classify -> {status}: {body[:500]!r}")
            predictions = json.loads(body)["predictions"]
            scores = [p["score"] for p in predictions]
            if len(predictions) != 5 or scores != sorted(scores, reverse=True) or not 0 < sum(scores) <= 1 + 1e-6:
                raise SmokeFailure(f"expected 5 predictions with descending scores in (0, 1], got {predictions}")
            reference = _reference_top5(export, photo)
            if reference is not None:
                indices, ref_scores = reference
                got = [p["index"] for p in predictions]
                worst = max(abs(a - b) for a, b in zip(scores, ref_scores))
                if got != indices or worst > 1e-4:
                    raise SmokeFailure(f"the container's top-5 {got} {scores} differs from model.onnx run here "
                                       f"{indices} {ref_scores} (largest score difference {worst:.2e} > 1e-4)")
                timings["max_score_diff"] = worst

            # 4. SIGTERM (the image's STOPSIGNAL) -> a clean drain and exit 0
            start = time.monotonic()
            _run([*engine, "stop", "-t", f"{grace:g}", name], timeout=grace + 30)
            timings["stop_s"] = time.monotonic() - start
            code = _run([*engine, "inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip()
            if code != "0" or timings["stop_s"] >= grace:
                raise SmokeFailure(f"after SIGTERM: exit code {code} in {timings['stop_s']:.1f} s (expected 0 "
                                   f"within {grace:g} s)")
            log = _run([*engine, "logs", name], check=False)
            timings["graph"] = _from_log(log, "graph", "graph")
            timings["resize"] = _from_log(log, "decoder", "resize")
        except SmokeFailure:
            logs = _run([*engine, "logs", name], check=False)
            print(f"--- container log ({name}) ---\n{logs.stdout}{logs.stderr}", file=sys.stderr)
            raise
    finally:
        _run([*engine, "rm", "-f", name], check=False)
    return timings


def _from_log(logs: subprocess.CompletedProcess, event: str, field: str) -> str | None:
    """``field`` of the service's first JSON log line with this ``event`` ("graph": which ONNX graph ONNX Runtime
    runs on the CPU; "decoder": which resize the decoder uses)."""
    for line in (logs.stdout + logs.stderr).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            return entry.get(field)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="export directory from ganet-export (mounted at /models/model)")
    p.add_argument("--image", default="localhost/ganet-serve:latest", help="image to run (default: %(default)s)")
    p.add_argument("--engine", default=None, help="container CLI, split like a shell (default: docker if on PATH, "
                                                  "else podman)")
    p.add_argument("--run-args", default="", help="extra `run` options, split like a shell")
    p.add_argument("--host-network", action="store_true",
                   help="--network host and GANET_PORT instead of publishing port 8000")
    p.add_argument("--photo", type=Path, help="image file to classify (default: scikit-learn's china.jpg)")
    p.add_argument("--ready-timeout", type=float, default=90, help="seconds to wait for ready (default: 90)")
    p.add_argument("--grace", type=float, default=20, help="`stop -t` seconds; exit 0 must come sooner (default: 20)")
    args = p.parse_args(argv)
    engine = shlex.split(args.engine) if args.engine else ["docker" if shutil.which("docker") else "podman"]
    try:
        photo = args.photo.read_bytes() if args.photo else None
        timings = run_smoke_test(args.export, args.image, engine, shlex.split(args.run_args), args.host_network,
                                 photo, args.ready_timeout, args.grace)
    except (SmokeFailure, OSError, subprocess.TimeoutExpired) as e:
        print(f"smoke_test: FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"ok": True, "image": args.image,
                      **{k: round(v, 6) if isinstance(v, float) else v for k, v in timings.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
