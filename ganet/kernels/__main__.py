"""``python -m ganet.kernels OUTPUT [--march ARCH]``: build the fused-kernel library ahead of time.

For images and hosts without a C compiler at run time: build it where one exists, for the oldest CPU it must run on
(``--march x86-64-v3``: AVX2 + FMA, every x86 server since ~2015), and point ``GANET_KERNEL_LIBRARY`` at it. On a
CPU without those instructions the library refuses to load and serving falls back to the standard graph.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ganet.kernels import KernelUnavailable, build_library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m ganet.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="where to write libganet_ops.so")
    parser.add_argument("--march", default="native", help="gcc -march (default: native, this CPU)")
    args = parser.parse_args(argv)
    try:
        path = build_library(args.output, march=args.march)
    except KernelUnavailable as e:
        print(f"python -m ganet.kernels: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}; use it with GANET_KERNEL_LIBRARY={path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
