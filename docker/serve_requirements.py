"""Print what the serving image pip-installs: ganet's core dependencies plus its ``[serve]`` extra, one per line.

Read from pyproject.toml, so the image installs them in a layer of their own (rebuilt only when pyproject.toml
changes) and then the ganet wheel with ``--no-deps``. ``--ort onnxruntime-gpu`` swaps the ONNX Runtime package:
onnxruntime and onnxruntime-gpu both install the module ``onnxruntime``, so exactly one of them may be present.
Standard library only: it runs in the bare image before anything is installed.

    python3 docker/serve_requirements.py pyproject.toml --ort onnxruntime-gpu
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

__all__ = ["requirement_name", "serve_requirements", "main"]

ORT = "onnxruntime"
_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def requirement_name(requirement: str) -> str:
    """The PEP 503 normalised project name of a PEP 508 requirement: ``"Pillow>=10"`` -> ``"pillow"``."""
    m = _NAME.match(requirement)
    if m is None:
        raise ValueError(f"not a requirement: {requirement!r} (expected a PEP 508 string such as 'numpy>=1.24')")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def serve_requirements(pyproject: Path, extras: tuple[str, ...] = ("serve",), ort_package: str = ORT) -> list[str]:
    """Core dependencies + ``extras``, with onnxruntime replaced by ``ort_package`` (always present, once).

    A bare ``ort_package`` name keeps the version range pyproject gives onnxruntime; one with its own specifier
    (``onnxruntime-gpu==1.22.0``) is used as written.
    """
    try:
        project = tomllib.loads(Path(pyproject).read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise ValueError(f"{pyproject}: cannot read [project] from it ({e})") from None
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"{pyproject}: no [project.optional-dependencies] extra {extra!r} "
                             f"(has: {', '.join(sorted(optional)) or 'none'})")
        requirements += optional[extra]

    own = requirement_name(project.get("name", "ganet"))
    ort_bare = _NAME.fullmatch(ort_package.strip()) is not None
    out: list[str] = []
    ort_added = False
    for req in requirements:
        name = requirement_name(req)
        if name == own:
            raise ValueError(f"{pyproject}: extra requirement {req!r} refers to the project itself; list its "
                             f"dependencies in {extras} directly")
        if name == ORT:
            if not ort_added:
                out.append(ort_package.strip() + (req.strip()[_NAME.match(req).end():] if ort_bare else ""))
                ort_added = True
            continue
        if req not in out:
            out.append(req)
    if not ort_added:
        out.append(ort_package.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("pyproject", type=Path)
    p.add_argument("--extra", action="append", help="extras to include (default: serve)")
    p.add_argument("--ort", default=ORT, help="ONNX Runtime package: onnxruntime (CPU) or onnxruntime-gpu")
    args = p.parse_args(argv)
    try:
        reqs = serve_requirements(args.pyproject, tuple(args.extra or ("serve",)), args.ort)
    except ValueError as e:
        print(f"serve_requirements: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
