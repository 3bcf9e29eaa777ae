"""A fixed ring of image slots in POSIX shared memory: front ends write uint8 images, the model owner reads them.

``ganet-serve --frontends N``: the supervisor creates one segment of ``frontends x slots_per_frontend`` slots, each
one (3, S, S) uint8 image; front end ``i`` owns slots ``[i * K, (i + 1) * K)`` and hands them out from its own free
list, so no lock spans processes. A slot goes back to its free list only when the owner has answered for it (result,
drop or refusal), so the owner never reads an image that is being overwritten. Pixel data is never pickled or sent
over a pipe: only slot numbers travel (``ganet.serve.wire``).
"""
from __future__ import annotations

import math
import os
import secrets
from multiprocessing.shared_memory import SharedMemory

import numpy as np

__all__ = ["ImageRing", "ShmSpaceError", "slots_per_frontend"]

SHM_DIR = "/dev/shm"


class ShmSpaceError(OSError):
    """/dev/shm has less free space than the ring needs (a container's default is 64 MB: raise --shm-size)."""


def slots_per_frontend(queue_size: int, frontends: int, in_flight: int) -> int:
    """A front end's share of --queue-size, plus the images one round of batches can hold (``in_flight``: max batch x
    instances), so that the queue, not the slots, is what fills first when the load is spread evenly."""
    return math.ceil(queue_size / frontends) + in_flight


class ImageRing:
    """``count`` slots of ``shape`` uint8 in one shared-memory segment; ``view(slot)`` is a numpy view, no copy."""

    def __init__(self, shm: SharedMemory, count: int, shape: tuple[int, ...], owner: bool) -> None:
        self.shm, self.count, self.shape, self.owner = shm, count, tuple(shape), owner
        self.slot_bytes = math.prod(shape)
        self._views: list[np.ndarray] | None = [
            np.ndarray(shape, np.uint8, buffer=shm.buf, offset=i * self.slot_bytes) for i in range(count)]

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def nbytes(self) -> int:
        return self.count * self.slot_bytes

    @classmethod
    def create(cls, count: int, shape: tuple[int, ...]) -> ImageRing:
        """A new segment (``/dev/shm/ganet-<random>``), refused up front if /dev/shm cannot hold it: writing past a
        full tmpfs would kill the writer with SIGBUS instead."""
        size = count * math.prod(shape)
        if os.path.isdir(SHM_DIR):
            st = os.statvfs(SHM_DIR)
            free = st.f_bavail * st.f_frsize
            if free < size:
                raise ShmSpaceError(f"the image ring needs {size / 2**20:.0f} MiB of shared memory, {SHM_DIR} has "
                                    f"{free / 2**20:.0f} MiB free: raise the container's --shm-size, or lower "
                                    "--queue-size, --max-batch or --frontends")
        shm = SharedMemory(f"ganet-{os.getpid()}-{secrets.token_hex(4)}", create=True, size=size)
        return cls(shm, count, shape, owner=True)

    @classmethod
    def attach(cls, name: str, count: int, shape: tuple[int, ...]) -> ImageRing:
        """The segment another process created. Front ends are multiprocessing children of the creator and share
        its resource tracker, to which this attach's registration is a duplicate: the tracker unlinks the segment
        once, if the creator dies without doing so (SIGKILL), after the last of them exits."""
        shm = SharedMemory(name)
        if shm.size < count * math.prod(shape):
            shm.close()
            raise ValueError(f"shared memory {name!r} holds {shm.size} bytes, not {count} slots of {shape}")
        return cls(shm, count, shape, owner=False)

    def view(self, slot: int) -> np.ndarray:
        """(3, S, S) uint8 over slot ``slot`` of the segment."""
        return self._views[slot]

    def close(self) -> None:
        """Unmap (and, for the creator, unlink) the segment. Views still held elsewhere keep the mapping alive
        until they go; the name is gone either way, so nothing is left in /dev/shm."""
        self._views = None
        try:
            self.shm.close()
        except BufferError:  # a view is still referenced (an in-flight item): the mapping dies with the process
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
