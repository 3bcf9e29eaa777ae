"""Native CPU kernels for ONNX Runtime: the fused Group Attention custom ops (``ganet.ops::GroupAttention``, and
``GroupAttentionShuffle[Split]``, which also write the ShuffleNetV2 channel shuffle that follows the block) and the
fused ImageNet stem (``ganet.ops::Stem``).

Standard ONNX has no op that fuses a per-pixel scale with a rank-1 update, so the exported GA block makes about nine
full passes over its feature map on a CPU. ``group_attention.c`` computes a whole block per sample while the
sample's map sits in the L2 cache (see the file's header for the op's contract). It is a plain C file written
against ONNX Runtime's ABI-stable C API, compiled here, on first use, with the host's C compiler for the host's CPU
(``-march=native``), and cached by the hash of source, flags and compiler.

The same library holds ``resample.c``, the serving decoder's resize + crop: Pillow's resampling, bit for bit, in
SIMD (:mod:`ganet.kernels.resample` calls it through ctypes).

Where no compiler exists (a slim container, say) :func:`library_path` raises :class:`KernelUnavailable` and the
callers fall back to the standard graph: the fused graph is only ever an optimisation, never the only artifact.
Imports neither torch nor onnxruntime.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["DOMAIN", "OP_TYPE", "OP_TYPE_SHUFFLE", "OP_TYPE_SHUFFLE_SPLIT", "OP_TYPE_STEM", "SOURCE",
           "RESAMPLE_SOURCE", "LIBRARY_ENV", "KernelUnavailable", "library_path", "build_library", "compile_flags",
           "register_kernels"]

DOMAIN = "ganet.ops"
OP_TYPE = "GroupAttention"
# The same block, its output then channel-shuffled with the unit's other branch (and split into halves):
# see group_attention.c's header.
OP_TYPE_SHUFFLE = "GroupAttentionShuffle"
OP_TYPE_SHUFFLE_SPLIT = "GroupAttentionShuffleSplit"
# The ImageNet stem (normalise, 3x3/2 conv, ReLU, 3x3/2 max pool) in one pass: see group_attention.c's header.
OP_TYPE_STEM = "Stem"
OPSET_VERSION = 1
SOURCE = Path(__file__).with_name("group_attention.c")
RESAMPLE_SOURCE = Path(__file__).with_name("resample.c")
LIBRARY_NAME = "libganet_ops.so"
# A prebuilt library (the Docker image builds one for x86-64-v3 and sets this): used instead of compiling.
LIBRARY_ENV = "GANET_KERNEL_LIBRARY"


class KernelUnavailable(RuntimeError):
    """The custom-op library cannot be built or loaded here; the standard ONNX graph must be used instead."""


LINK_FLAGS = ["-lm", "-pthread"]


def compile_flags(march: str = "native") -> list[str]:
    # -ffast-math lets gcc vectorise the reductions; the kernel's own exp keeps its accuracy (see the source).
    return ["-O3", f"-march={march}", "-ffast-math", "-fPIC", "-shared", "-fvisibility=hidden"]


def _compiler() -> str:
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not cc or not shutil.which(cc):
        raise KernelUnavailable(f"no C compiler found (looked for $CC, cc, gcc, clang) to build {LIBRARY_NAME}; "
                                "install gcc, or run the standard ONNX graph")
    return cc


def _cache_dir() -> Path:
    root = os.environ.get("GANET_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ganet", "kernels")
    return Path(root)


def build_library(output: Path, march: str = "native", cc: str | None = None) -> Path:
    """Compile ``group_attention.c`` and ``resample.c`` into ``output`` (atomically: a failed build leaves nothing
    there)."""
    if platform.system() != "Linux":
        raise KernelUnavailable(f"the fused kernel is built for Linux only (this is {platform.system()})")
    cc = cc or _compiler()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=output.parent)
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot write the kernel library to {output.parent}: {e} (set GANET_KERNEL_CACHE "
                                "to a writable directory)") from e
    try:
        cmd = [cc, *compile_flags(march), "-o", tmp, *map(str, _sources()), *LINK_FLAGS]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"building {LIBRARY_NAME} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.chmod(tmp, 0o755)  # readable by every user, like any shared library (mkstemp made it 0600; the linker
        # keeps an existing file's mode, and dlopen needs read permission: a service user could not load it)
        os.replace(tmp, output)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"building {LIBRARY_NAME} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


def library_path() -> Path:
    """The custom-op library for this host: $GANET_KERNEL_LIBRARY, else a cached build, else built now (~1 s)."""
    if os.environ.get("GANET_DISABLE_KERNELS"):
        raise KernelUnavailable("disabled by GANET_DISABLE_KERNELS")
    if os.environ.get(LIBRARY_ENV):
        prebuilt = Path(os.environ[LIBRARY_ENV])
        if not prebuilt.is_file():
            raise KernelUnavailable(f"{LIBRARY_ENV}={prebuilt} does not exist")
        return prebuilt
    cc = _compiler()
    path = _cache_dir() / _build_key(cc, _sources()) / LIBRARY_NAME
    return path if path.is_file() else build_library(path, cc=cc)


def _sources() -> tuple[Path, ...]:
    return SOURCE, RESAMPLE_SOURCE


@functools.lru_cache(maxsize=None)
def _build_key(cc: str, sources: tuple[Path, ...]) -> str:
    """What a build depends on: source, flags, compiler, CPU. Once per process: every ONNX Runtime session (each
    serving instance, each parity and timing runner) asks for the library, and `cc --version` is a subprocess."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in sources), " ".join(compile_flags() + LINK_FLAGS).encode(),
                 "".join(version).encode(), platform.machine().encode(), _cpu_flags().encode()):
        key.update(part)
    return key.hexdigest()[:16]


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a cache shared across machines (an NFS home) must not mix them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def register_kernels(session_options: Any) -> Path:
    """Make the custom ops known to an ``onnxruntime.SessionOptions`` (before the session is created)."""
    path = library_path()
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
        raise KernelUnavailable(f"ONNX Runtime could not load {path}: {e}") from e
    return path
