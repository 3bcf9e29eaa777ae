"""The `ganet-serve` command. Not built yet: issue 5 (the FastAPI service) is still open."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("ganet-serve is not available in this release yet (issue 5 (the FastAPI service) is still open).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
