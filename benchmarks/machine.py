"""The machine a benchmark ran on, as the report states it: CPU model, cores, AVX-512 VNNI, GPU, versions, and how
busy the machine was while it ran (CPU time of other processes, from /proc/stat)."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
from dataclasses import asdict, dataclass, field

__all__ = ["describe", "BusyMeter"]


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def describe() -> dict:
    """CPU model (``lscpu``'s Model name), usable cores, AVX-512 VNNI, GPU, library versions."""
    from ganet.system import usable_cpus

    info = _lscpu()
    flags = set(info.get("Flags", "").split())
    if not flags:  # no lscpu: the kernel's view
        try:
            flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
        except (OSError, StopIteration):
            pass
    out = {"cpu_model": info.get("Model name", platform.processor() or platform.machine()),
           "cpus_online": os.cpu_count(), "cpus_usable": usable_cpus(),
           "avx512_vnni": "avx512_vnni" in flags, "avx2": "avx2" in flags,
           "hypervisor": info.get("Hypervisor vendor"), "python": platform.python_version(), "gpu": None}
    versions = {}
    for module in ("torch", "onnxruntime", "onnx", "fastapi", "uvicorn", "litserve", "matplotlib"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    out["versions"] = versions
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return out


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class BusyMeter:
    """How much CPU other processes used while a benchmark ran: machine busy time minus our own (children that were
    waited for included)."""

    start: tuple[int, int] = field(default_factory=_cpu_jiffies)
    own_start: float = field(default_factory=_own_cpu_s)
    loadavg_start: tuple[float, ...] = field(default_factory=os.getloadavg)

    def summary(self) -> dict:
        busy1, total1 = _cpu_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        busy_s, wall_cpu_s = (busy1 - self.start[0]) / tick, (total1 - self.start[1]) / tick
        own_s = _own_cpu_s() - self.own_start
        others = max(0.0, busy_s - own_s)
        return {"machine_busy_cpu_s": busy_s, "own_cpu_s": own_s, "others_cpu_s": others,
                "others_share_of_machine": others / wall_cpu_s if wall_cpu_s else 0.0,
                "loadavg_start": self.loadavg_start, "loadavg_end": os.getloadavg()}
