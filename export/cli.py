"""The `ganet-export` command. Not built yet: issue 4 (ONNX and TensorRT export) is still open."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("ganet-export is not available in this release yet (issue 4 (ONNX and TensorRT export) is still open).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
