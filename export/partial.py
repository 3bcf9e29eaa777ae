"""The hidden directories an export is built in, and the removal of those that killed exports left behind.

An export into ``DIR`` builds in ``.DIR.<pid>-<start>.<random>.partial`` beside it and, with ``--force``, moves the
previous export aside to ``.DIR.<pid>-<start>.old`` for a moment; ``pid`` is the exporting process and ``start`` its
start time (``/proc/<pid>/stat``, clock ticks since boot). A process that is killed leaves them behind. The next
export into the same ``DIR`` removes every one whose process is gone, or whose pid now belongs to another process (a
different start time): a concurrent export's directories, whose process runs, are never touched.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["owner_tag", "make_partial_dir", "old_export_path", "remove_stale_partials", "process_start_time"]

_OWNED = re.compile(r"(?P<pid>\d+)-(?P<start>\d+)\.(?:[^/]+\.partial|old)")


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such process. Where /proc does
    not exist, 0 for a live process: only a dead pid can then be told from a live one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # Linux, and the process is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # it exists, owned by someone else
        return 0
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces or ')': fields resume after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime


def owner_tag() -> str:
    """``<pid>-<start>`` of this process: what marks its directories as its own."""
    return f"{os.getpid()}-{process_start_time(os.getpid()) or 0}"


def make_partial_dir(output: Path) -> Path:
    """A fresh hidden directory beside ``output`` for this process to build the export in."""
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.{owner_tag()}.", suffix=".partial", dir=output.parent))


def old_export_path(output: Path) -> Path:
    """Where ``--force`` moves the previous export while the new one takes its place."""
    return output.with_name(f".{output.name}.{owner_tag()}.old")


def _is_stale(pid: int, start: int) -> bool:
    now = process_start_time(pid)
    return now is None or (now != 0 and start != 0 and now != start)


def remove_stale_partials(output: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove the build directories of earlier exports into ``output`` whose process is gone; returns them."""
    prefix = f".{output.name}."
    removed = []
    try:
        entries = list(os.scandir(output.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        owned = _OWNED.fullmatch(entry.name[len(prefix):])
        if owned is None or not _is_stale(int(owned["pid"]), int(owned["start"])):
            continue
        path = Path(entry.path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            log(f"[ganet-export] could not remove {path}, left by export process {owned['pid']} (no longer running)")
            continue
        removed.append(path)
        log(f"[ganet-export] removed {path.name} ({size / 1e6:.1f} MB), left by export process {owned['pid']}, which "
            "is no longer running")
    return removed
