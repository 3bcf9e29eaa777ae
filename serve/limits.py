"""Reading numbers the client controls, and the connection limits that follow from the host.

Every integer taken from a header goes through :func:`header_int`: ``str.isdigit()`` also accepts ``"²"`` and
other Unicode digits, which ``int()`` then refuses (a 500 before this module), and ``int()`` of a 5,000-digit
string raises too. Numbers inside JSON bodies are checked where they are used (``routes_v2``).
"""
from __future__ import annotations

import os
import re
import resource

__all__ = ["header_int", "MAX_HEADER_DIGITS", "connection_cap", "FD_RESERVE"]

MAX_HEADER_DIGITS = 18  # < 2**63: every length a body limit can allow, and never a bignum
_ASCII_DIGITS = re.compile(rf"[0-9]{{1,{MAX_HEADER_DIGITS}}}")

# Descriptors the process needs besides its connections: the listening socket, model files, the kernel library,
# the log, the decode and inference threads' pipes, /proc reads of the metrics... with room to spare.
FD_RESERVE = 64


def header_int(value: str | None) -> int | None:
    """A header's value as a non-negative integer: ASCII digits only (surrounding spaces allowed), at most
    ``MAX_HEADER_DIGITS`` of them. None if absent or anything else; the caller says what it expected."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if _ASCII_DIGITS.fullmatch(value) else None


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def connection_cap(requested: int | None) -> tuple[int, str]:
    """How many client connections to hold open at once, and why: ``requested`` (--max-connections), but never so
    many that accept() would run out of file descriptors (RLIMIT_NOFILE less what the process already uses less
    ``FD_RESERVE``). Running out would stall every new connection, the real ones too, until one closes."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = (soft - _open_descriptors() - FD_RESERVE) if soft != resource.RLIM_INFINITY else 1 << 20
    room = max(room, 8)
    if requested is None:
        cap = min(room, 1024)
        return cap, f"min(1024, RLIMIT_NOFILE {soft} less {soft - room} descriptors in use or reserved)"
    if requested > room:
        return room, (f"--max-connections {requested} lowered to {room}: RLIMIT_NOFILE is {soft} (raise it with "
                      "`ulimit -n`)")
    return requested, "--max-connections"
